//! `keel-server`: the Kafka-protocol broker around `keel-engine`, and the operator tools of the
//! `keel` binary.
//!
//! [`serve::Server`] runs a broker in-process (tests and embedders); `keel serve` runs it until
//! SIGTERM. Requests are decoded in [`protocol`], dispatched by [`broker::Broker`], and served on
//! every engine shard by [`network`].

#![allow(non_upper_case_globals)] // constants follow the engine's snake_case-with-unit-last naming

mod admin;
pub mod broker;
pub mod cli;
pub mod compression;
pub mod config;
pub mod error;
mod fetch;
mod group_api;
pub mod groups;
pub mod metadata;
pub mod metrics;
pub mod network;
pub mod offsets;
mod produce;
pub mod producers;
pub mod protocol;
pub mod serve;
pub mod tools;

pub use config::BrokerConfig;
pub use serve::Server;

/// Wall-clock milliseconds since the Unix epoch (Kafka's timestamps).
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
