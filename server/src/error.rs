//! The server's error types, and how engine errors map to Kafka error codes.

use std::path::PathBuf;

use kafka_protocol::ResponseError;

/// A bad setting: names the key and says what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("unknown setting {0:?}")]
    Unknown(String),
    #[error("{key}={value}: {why}")]
    Invalid {
        key: String,
        value: String,
        why: String,
    },
    #[error("malformed line {0:?} (expected key=value)")]
    Malformed(String),
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Why the broker could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Engine(#[from] keel_engine::Error),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("metadata file {path} is damaged: {why}")]
    Metadata { path: PathBuf, why: String },
}

impl Error {
    pub fn io(op: &'static str, path: impl std::fmt::Display, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.to_string(),
            source,
        }
    }
}

/// The Kafka error code a client expects for an engine error.
pub fn error_code(e: &keel_engine::Error) -> ResponseError {
    use keel_engine::batch::BatchError;
    use keel_engine::Error as E;
    match e {
        E::Io { .. } | E::Full { .. } | E::Corruption { .. } => ResponseError::KafkaStorageError,
        E::InvalidBatch(BatchError::Crc { .. }) => ResponseError::CorruptMessage,
        E::InvalidBatch(BatchError::Magic(_)) => ResponseError::UnsupportedForMessageFormat,
        E::InvalidBatch(BatchError::Truncated { .. } | BatchError::Length(_)) => {
            ResponseError::CorruptMessage
        }
        E::InvalidBatch(_) => ResponseError::InvalidRecord,
        E::BatchTooLarge { .. } => ResponseError::MessageTooLarge,
        E::UnknownPartition(_) => ResponseError::UnknownTopicOrPartition,
        E::OffsetOutOfRange { .. } => ResponseError::OffsetOutOfRange,
        E::NonContiguousOffset { .. } => ResponseError::InvalidRecord,
        E::StaleLeaderEpoch { .. } => ResponseError::FencedLeaderEpoch,
        E::Truncated { .. } => ResponseError::NotLeaderOrFollower,
        E::InvalidConfig(_) => ResponseError::InvalidConfig,
        E::ShuttingDown => ResponseError::NotLeaderOrFollower,
        E::DirectoryInUse(_) => ResponseError::KafkaStorageError,
    }
}
