//! `keel-engine`: a durable log of Kafka RecordBatch v2 bytes, on io_uring, thread-per-core.
//!
//! An [`Engine`] owns N shards; each is a pinned thread with its own io_uring (a compio runtime) and
//! owns a set of partitions. The handle is `Send + Sync + Clone`, its methods are `async` and work
//! from any runtime; blocking code wraps them in [`block_on`]. A call for a partition is sent to the
//! shard that owns it; nothing on the data path takes a lock.
//!
//! ```no_run
//! use keel_engine::{block_on, batch::BatchBuilder, Engine, EngineConfig, PartitionConfig, PartitionId, ReadOptions};
//! let engine = Engine::open(EngineConfig::new("/tmp/keel-example")).unwrap();
//! let p = PartitionId::new("events", 0);
//! block_on(async {
//!     engine.create_partition(&p, PartitionConfig::default()).await?;
//!     let batch = BatchBuilder::default().build(b"opaque record bytes");
//!     let done = engine.append(&p, batch.into(), 0).await?; // durable when it returns
//!     let read = engine.read(&p, done.base_offset, ReadOptions::default()).await?;
//!     assert_eq!(read.next_offset, done.last_offset + 1);
//!     engine.shutdown().await
//! }).unwrap();
//! ```

#![allow(non_upper_case_globals)] // constants follow TigerBeetle's snake_case-with-unit-last naming

pub mod batch;
pub mod config;
#[allow(non_upper_case_globals)]
pub mod constants;
mod engine;
mod epochs;
pub mod error;
pub mod io;
mod journal;
pub mod metrics;
pub mod offsets;
mod partition;
mod read;
mod recovery;
pub mod segment;
mod shard;

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

pub use config::{EngineConfig, FlushPolicy, PartitionConfig, RecoveryMode};
pub use engine::{Engine, Pending};
pub use error::{Error, Result};
pub use futures::executor::block_on;
pub use offsets::{Appended, Durability, Durable, Written};

/// A topic partition, as Kafka names it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionId {
    pub topic: Arc<str>,
    pub partition: u32,
}

impl PartitionId {
    pub fn new(topic: &str, partition: u32) -> PartitionId {
        PartitionId {
            topic: topic.into(),
            partition,
        }
    }
}

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.topic, self.partition)
    }
}

impl fmt::Debug for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// What a completed append reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: u64,
    pub last_offset: u64,
    /// The level the append had reached when it completed.
    pub durability: Durability,
    /// The partition's log start offset at completion (Kafka returns it in ProduceResponse).
    pub log_start_offset: u64,
}

/// Up to which offset a read may return batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReadUpper {
    /// Only what survives a power cut.
    #[default]
    Durable,
    /// What survives a process crash.
    Written,
    /// Everything accepted (a replica leader serving followers).
    Appended,
    /// Below this offset (the broker's high watermark).
    Offset(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadOptions {
    /// Stop after this many bytes; at least one whole batch is returned if one is visible (KIP-74).
    pub max_bytes: usize,
    pub upper: ReadUpper,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            max_bytes: 1024 * 1024,
            upper: ReadUpper::Durable,
        }
    }
}

/// Whole batches, in offset order, each chunk contiguous bytes exactly as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadResult {
    pub chunks: Vec<Bytes>,
    /// The offset to read next (after the last returned batch, or the requested one if none).
    pub next_offset: u64,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    pub durable_offset: u64,
    /// Everything below this survives a process crash (the high watermark of an `interval` topic).
    pub written_offset: u64,
}

impl ReadResult {
    pub fn total_bytes(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Headers of the returned batches (already CRC-checked by the engine).
    pub fn headers(&self) -> Vec<batch::BatchHeader> {
        let mut out = Vec::new();
        for chunk in &self.chunks {
            let mut rest = &chunk[..];
            while let Ok(h) = batch::BatchHeader::parse(rest) {
                out.push(h);
                rest = &rest[h.size_bytes.min(rest.len())..];
            }
        }
        out
    }
}

/// The first batch whose maxTimestamp is at or after a requested time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimestampOffset {
    pub offset: u64,
    pub timestamp: i64,
}

/// A snapshot of one partition's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionState {
    pub log_start_offset: u64,
    pub appended: Appended,
    pub written: Written,
    pub durable: Durable,
    pub size_bytes: u64,
    pub segments: usize,
    pub latest_epoch: Option<i32>,
    pub config: PartitionConfig,
}
