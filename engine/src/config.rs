//! Engine- and partition-level settings, with their Kafka names where Kafka has one.

use std::path::PathBuf;
use std::time::Duration;

use crate::constants::*;
use crate::error::{Error, Result};
use crate::io::Backend;

/// When an append is acknowledged, and how often the log is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushPolicy {
    /// An append completes once an fdatasync covers it (one fdatasync serves every append written
    /// before it was issued). Survives power loss. The default.
    EveryBatch,
    /// An append completes once written (O_DIRECT: handed to the device); an fdatasync runs every
    /// `ms` milliseconds or every `bytes` bytes written, whichever comes first. A power cut loses at
    /// most that window; a process crash loses nothing that completed.
    Interval { ms: u64, bytes: u64 },
}

/// What recovery does with damage that is not a torn tail.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Refuse to open the partition, naming the file and position. The default.
    #[default]
    Strict,
    /// Truncate the log at the first damaged batch (data after it is lost) and open.
    TruncateTail,
}

#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub data_dir: PathBuf,
    /// Shards (threads, each with its own ring); 0 means one per available core.
    pub shards: usize,
    /// Pin shard `i` to core `i % cores`.
    pub pin_threads: bool,
    pub backend: Backend,
    pub recovery: RecoveryMode,
    /// How often each shard looks at retention.
    pub retention_check_interval: Duration,
    /// Each shard's journal ring in bytes (ARCHITECTURE.md, decision 10): small `every-batch`
    /// appends of many partitions become durable through it with one write and one fdatasync.
    /// 0 turns the journal off (every partition syncs its own segment).
    pub journal_bytes: u64,
    /// A shard's journal turned off by a failed write or flush is started again (a new lap, once
    /// every partition's segment holds what the old one made durable) this long after, doubling
    /// with each time it has been turned off, up to 64 times (ARCHITECTURE.md, decision 31).
    pub journal_restart_after: Duration,
    /// Each shard's memory for recently appended batches (served to tailing readers without a
    /// disk read), shared by its partitions: the oldest batches go first, whichever partition
    /// holds them; each keeps at most its own `cache_bytes`.
    /// Batches not yet durable in their segment stay in memory whatever this says.
    pub shard_cache_bytes: usize,
    /// A partition's recovery point moves into its active segment each time this many more
    /// bytes of it are durable (its indexes and `recovery-point` are written beside the data
    /// path), so a crash rescans at most about this much of each partition instead of up to
    /// `segment.bytes` (ARCHITECTURE.md, decision 39). 0: only at rolls.
    pub recovery_point_bytes: u64,
}

impl EngineConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            data_dir: data_dir.into(),
            shards: 0,
            pin_threads: true,
            backend: Backend::Uring,
            recovery: RecoveryMode::Strict,
            retention_check_interval: Duration::from_secs(30),
            journal_bytes: journal_bytes_default,
            journal_restart_after: Duration::from_secs(10),
            shard_cache_bytes: shard_cache_bytes_default,
            recovery_point_bytes: recovery_point_bytes_default,
        }
    }

    pub(crate) fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

/// Per-partition (in Kafka terms, per-topic) settings. Stored in the partition's directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionConfig {
    /// `segment.bytes`
    pub segment_bytes: u64,
    /// `segment.ms`: roll a non-empty segment this old.
    pub segment_ms: Option<u64>,
    /// `retention.bytes`: delete the oldest segments while the log is larger.
    pub retention_bytes: Option<u64>,
    /// `retention.ms`: delete segments whose newest timestamp is older.
    pub retention_ms: Option<u64>,
    /// `max.message.bytes`: the largest batch accepted.
    pub max_message_bytes: usize,
    pub flush: FlushPolicy,
    /// Segment files grow by fallocate in steps of this many bytes.
    pub preallocate_bytes: u64,
    /// Recent batches kept in memory for readers.
    pub cache_bytes: usize,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            segment_bytes: segment_bytes_default,
            segment_ms: None,
            retention_bytes: None,
            retention_ms: None,
            max_message_bytes: batch_bytes_default,
            flush: FlushPolicy::EveryBatch,
            preallocate_bytes: preallocate_bytes_default,
            cache_bytes: partition_cache_bytes_default,
        }
    }
}

impl PartitionConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidConfig(what));
        if !(segment_bytes_min..=segment_bytes_max).contains(&self.segment_bytes) {
            return bad(format!(
                "segment.bytes {} outside [{segment_bytes_min}, {segment_bytes_max}]",
                self.segment_bytes
            ));
        }
        if self.max_message_bytes < batch_header_bytes || self.max_message_bytes > batch_bytes_max {
            return bad(format!(
                "max.message.bytes {} outside [{batch_header_bytes}, {batch_bytes_max}]",
                self.max_message_bytes
            ));
        }
        if self.max_message_bytes as u64 > self.segment_bytes {
            return bad("max.message.bytes larger than segment.bytes".into());
        }
        if self.preallocate_bytes == 0 || !self.preallocate_bytes.is_multiple_of(block_bytes as u64)
        {
            return bad(format!(
                "preallocate bytes {} must be a positive multiple of {block_bytes}",
                self.preallocate_bytes
            ));
        }
        if let FlushPolicy::Interval { ms, bytes } = self.flush {
            if ms == 0 && bytes == 0 {
                return bad("flush interval needs ms or bytes".into());
            }
        }
        Ok(())
    }

    /// `key=value` lines, Kafka's property names.
    pub fn to_properties(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
        let (policy, ms, bytes) = match self.flush {
            FlushPolicy::EveryBatch => ("every-batch", 0, 0),
            FlushPolicy::Interval { ms, bytes } => ("interval", ms, bytes),
        };
        format!(
            "segment.bytes={}\nsegment.ms={}\nretention.bytes={}\nretention.ms={}\n\
             max.message.bytes={}\nflush.policy={policy}\nflush.ms={ms}\nflush.bytes={bytes}\n\
             preallocate.bytes={}\ncache.bytes={}\n",
            self.segment_bytes,
            opt(self.segment_ms),
            opt(self.retention_bytes),
            opt(self.retention_ms),
            self.max_message_bytes,
            self.preallocate_bytes,
            self.cache_bytes,
        )
    }

    pub fn from_properties(text: &str) -> Result<PartitionConfig> {
        let mut c = PartitionConfig::default();
        let (mut policy, mut ms, mut bytes) = ("every-batch".to_string(), 0u64, 0u64);
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| Error::InvalidConfig(format!("malformed line {line:?}")))?;
            let num = || -> Result<i64> {
                v.trim()
                    .parse()
                    .map_err(|_| Error::InvalidConfig(format!("{k}: {v:?} is not a number")))
            };
            let opt = |n: i64| (n >= 0).then_some(n as u64);
            match k.trim() {
                "segment.bytes" => c.segment_bytes = num()? as u64,
                "segment.ms" => c.segment_ms = opt(num()?),
                "retention.bytes" => c.retention_bytes = opt(num()?),
                "retention.ms" => c.retention_ms = opt(num()?),
                "max.message.bytes" => c.max_message_bytes = num()? as usize,
                "flush.policy" => policy = v.trim().to_string(),
                "flush.ms" => ms = num()? as u64,
                "flush.bytes" => bytes = num()? as u64,
                "preallocate.bytes" => c.preallocate_bytes = num()? as u64,
                "cache.bytes" => c.cache_bytes = num()? as usize,
                _ => {} // unknown keys are kept by whoever wrote them; the engine ignores them
            }
        }
        c.flush = match policy.as_str() {
            "every-batch" => FlushPolicy::EveryBatch,
            "interval" => FlushPolicy::Interval { ms, bytes },
            other => {
                return Err(Error::InvalidConfig(format!(
                    "unknown flush.policy {other:?}"
                )))
            }
        };
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_round_trip_and_validation() {
        let c = PartitionConfig {
            retention_ms: Some(1000),
            flush: FlushPolicy::Interval {
                ms: 5,
                bytes: 1 << 20,
            },
            ..Default::default()
        };
        assert_eq!(
            PartitionConfig::from_properties(&c.to_properties()).unwrap(),
            c
        );
        assert!(PartitionConfig::from_properties("segment.bytes=10\n").is_err());
        assert!(PartitionConfig::from_properties("flush.policy=sometimes\n").is_err());
    }
}
