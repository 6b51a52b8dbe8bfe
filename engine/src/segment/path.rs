//! Names on disk: `<data dir>/<topic>-<partition>/<20-digit base offset>.<kind>`, as Kafka names them.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::PartitionId;

pub const LOG_SUFFIX: &str = "log";
pub const INDEX_SUFFIX: &str = "index";
pub const TIME_INDEX_SUFFIX: &str = "timeindex";
/// Kafka's name for the leader-epoch → start-offset file.
pub const LEADER_EPOCH_FILE: &str = "leader-epoch-checkpoint";
pub const RECOVERY_POINT_FILE: &str = "recovery-point";
pub const CLEAN_SHUTDOWN_FILE: &str = ".clean-shutdown";
pub const CONFIG_FILE: &str = "partition.properties";
/// The partition's incarnation (a random number, text), changed at creation and before every
/// truncation: journal records carry it, so they never replay into a log they do not belong to.
pub const INCARNATION_FILE: &str = "incarnation";
/// The shard journals' directory under the data directory (`<shard>.journal` files).
pub const JOURNAL_DIR: &str = ".journal";
/// In the data directory: the engine holds an exclusive `flock` on it while open.
pub const LOCK_FILE: &str = ".lock";
/// Topic names follow Kafka's rule: at most 249 of `[a-zA-Z0-9._-]`, not "." or "..".
pub const TOPIC_NAME_BYTES_MAX: usize = 249;

pub fn segment_file(dir: &Path, base_offset: u64, suffix: &str) -> PathBuf {
    dir.join(format!("{base_offset:020}.{suffix}"))
}

/// The base offset of a `.log` file name, if it is one.
pub fn parse_log_file_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".log")?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        stem.parse().ok()
    } else {
        None
    }
}

pub fn partition_dir(data_dir: &Path, id: &PartitionId) -> PathBuf {
    data_dir.join(format!("{}-{}", id.topic, id.partition))
}

/// `<topic>-<partition>` back into an id; `None` for anything else in the data directory.
pub fn parse_partition_dir(name: &str) -> Option<PartitionId> {
    let (topic, partition) = name.rsplit_once('-')?;
    let partition = partition.parse().ok()?;
    validate_topic(topic).ok()?;
    Some(PartitionId::new(topic, partition))
}

pub fn validate_topic(topic: &str) -> Result<()> {
    let legal = topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if topic.is_empty()
        || topic.len() > TOPIC_NAME_BYTES_MAX
        || !legal
        || topic == "."
        || topic == ".."
    {
        return Err(Error::InvalidConfig(format!(
            "illegal topic name {topic:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let f = segment_file(Path::new("/d"), 42, LOG_SUFFIX);
        assert_eq!(f, Path::new("/d/00000000000000000042.log"));
        assert_eq!(parse_log_file_name("00000000000000000042.log"), Some(42));
        assert_eq!(parse_log_file_name("42.log"), None);
        assert_eq!(parse_log_file_name("00000000000000000042.index"), None);
        let id = parse_partition_dir("my-topic-7").unwrap();
        assert_eq!((id.topic.as_ref(), id.partition), ("my-topic", 7));
        assert!(parse_partition_dir("lost+found").is_none());
        assert!(validate_topic("a/b").is_err());
    }
}
