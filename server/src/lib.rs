//! `keel-server`: the Kafka-protocol broker around `keel-engine` (the broker itself is the next
//! piece of work; today the crate carries the operator tools of the `keel` binary).

pub mod cli;
pub mod tools;
