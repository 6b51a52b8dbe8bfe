//! The engine's one error type.

use std::io;
use std::path::PathBuf;

use crate::batch::BatchError;
use crate::PartitionId;

/// Everything an engine call can fail with. Bad bytes on disk are [`Error::Corruption`], never a panic;
/// bad bytes from a caller are [`Error::InvalidBatch`] and change nothing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file system has no room. Nothing was accepted; retry once space is back.
    #[error("no space left on device while {op} {path}")]
    Full { op: &'static str, path: PathBuf },
    /// Stored bytes that fail their checks. Never served to a caller.
    #[error("corruption in {file} at byte {position}: {reason}")]
    Corruption {
        file: PathBuf,
        position: u64,
        reason: String,
    },
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    #[error("batch of {size} bytes exceeds the limit of {max} bytes")]
    BatchTooLarge { size: usize, max: usize },
    #[error("unknown partition {0}")]
    UnknownPartition(PartitionId),
    #[error("offset {requested} is out of range [{log_start_offset}, {log_end_offset}]")]
    OffsetOutOfRange {
        requested: u64,
        log_start_offset: u64,
        log_end_offset: u64,
    },
    /// A replicated append whose offsets do not continue the log.
    #[error("replicated batch starts at offset {got}, the log ends at {expected}")]
    NonContiguousOffset { expected: u64, got: u64 },
    #[error("leader epoch {got} is older than the log's latest epoch {latest}")]
    StaleLeaderEpoch { got: i32, latest: i32 },
    /// The append was accepted but then dropped by a truncation of the log below its offsets.
    #[error("the log was truncated to offset {offset} before this append completed")]
    Truncated { offset: u64 },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// Another engine (in this or another process) has the data directory open.
    #[error(
        "data directory {0} is in use by another Keel process (it holds the lock on {0}/.lock)"
    )]
    DirectoryInUse(PathBuf),
}

/// Is this OS error a full disk (ENOSPC, or EDQUOT: out of quota)?
pub(crate) fn is_full(source: &io::Error) -> bool {
    matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

impl Error {
    /// Wrap an OS error, turning ENOSPC/EDQUOT into [`Error::Full`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        let path = path.into();
        if is_full(&source) {
            Error::Full { op, path }
        } else {
            Error::Io { op, path, source }
        }
    }

    /// A failed fsync, fdatasync or syncfs: what was written before it is in doubt for good (the device
    /// may have dropped it, and a later sync that succeeds does not bring it back), so the log
    /// goes back to its durable point and is written again from memory.
    pub(crate) fn is_failed_sync(&self) -> bool {
        matches!(
            self,
            Error::Io {
                op: "fsync" | "fdatasync" | "syncfs",
                ..
            }
        )
    }

    /// A sync that succeeded after a flush failed elsewhere on the node (op `flush`): it vouches
    /// for nothing written before that failure, so the log goes back to its durable point as
    /// after a failed sync of its own (ARCHITECTURE.md, decision 29).
    pub(crate) fn is_lost_flush(&self) -> bool {
        matches!(self, Error::Io { op: "flush", .. })
    }

    /// Errors are handed to every waiter of a failed group commit, so they must be duplicable.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io { op, path, source } => Error::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            Error::Full { op, path } => Error::Full {
                op,
                path: path.clone(),
            },
            Error::Corruption {
                file,
                position,
                reason,
            } => Error::Corruption {
                file: file.clone(),
                position: *position,
                reason: reason.clone(),
            },
            Error::InvalidBatch(e) => Error::InvalidBatch(e.clone()),
            Error::BatchTooLarge { size, max } => Error::BatchTooLarge {
                size: *size,
                max: *max,
            },
            Error::UnknownPartition(p) => Error::UnknownPartition(p.clone()),
            Error::OffsetOutOfRange {
                requested,
                log_start_offset,
                log_end_offset,
            } => Error::OffsetOutOfRange {
                requested: *requested,
                log_start_offset: *log_start_offset,
                log_end_offset: *log_end_offset,
            },
            Error::NonContiguousOffset { expected, got } => Error::NonContiguousOffset {
                expected: *expected,
                got: *got,
            },
            Error::StaleLeaderEpoch { got, latest } => Error::StaleLeaderEpoch {
                got: *got,
                latest: *latest,
            },
            Error::Truncated { offset } => Error::Truncated { offset: *offset },
            Error::InvalidConfig(s) => Error::InvalidConfig(s.clone()),
            Error::ShuttingDown => Error::ShuttingDown,
            Error::DirectoryInUse(p) => Error::DirectoryInUse(p.clone()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
