//! Broker settings: Kafka's property names where Kafka has one, a properties file, `key=value`
//! overrides from the command line, and an embedded default (`keel serve` with nothing else runs a
//! single node on 127.0.0.1:9092 with its data in `./keel-data`).

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use keel_engine::constants::{batch_bytes_max, segment_bytes_max, segment_bytes_min};
use keel_engine::{FlushPolicy, PartitionConfig, RecoveryMode};

use crate::error::ConfigError;

/// `compression.type`, per topic or broker-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Keep whatever codec the producer used (Kafka's default).
    Producer,
    Uncompressed,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

impl Compression {
    pub fn parse(value: &str) -> Option<Compression> {
        Some(match value {
            "producer" => Compression::Producer,
            "uncompressed" | "none" => Compression::Uncompressed,
            "gzip" => Compression::Gzip,
            "snappy" => Compression::Snappy,
            "lz4" => Compression::Lz4,
            "zstd" => Compression::Zstd,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Producer => "producer",
            Compression::Uncompressed => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }

    /// The codec id in a batch's attributes (bits 0-2), `None` for `producer`.
    pub fn codec(self) -> Option<u8> {
        match self {
            Compression::Producer => None,
            Compression::Uncompressed => Some(0),
            Compression::Gzip => Some(1),
            Compression::Snappy => Some(2),
            Compression::Lz4 => Some(3),
            Compression::Zstd => Some(4),
        }
    }
}

/// Everything `keel serve` can be told.
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// `node.id`
    pub node_id: i32,
    /// `listeners`: where to accept Kafka connections (`PLAINTEXT://host:port` or `host:port`).
    pub listen: SocketAddr,
    /// `advertised.listeners`: the host and port clients are told to connect to. Defaults to `listen`.
    pub advertised: Option<(String, u16)>,
    /// `log.dirs`: the data directory (one directory).
    pub data_dir: PathBuf,
    /// `num.partitions`: partitions of an auto-created topic or of CreateTopics with -1.
    pub num_partitions: u32,
    /// `default.replication.factor`
    pub default_replication_factor: i16,
    /// `auto.create.topics.enable`
    pub auto_create_topics_enable: bool,
    /// `message.max.bytes`: the largest batch (topic default of `max.message.bytes`).
    pub message_max_bytes: usize,
    /// `socket.request.max.bytes`: a larger request frame closes the connection.
    pub socket_request_max_bytes: usize,
    /// `max.connections`
    pub max_connections: usize,
    /// `fetch.max.bytes`: the most one Fetch response carries (the first batch excepted, KIP-74).
    pub fetch_max_bytes: usize,
    /// Topic defaults: `log.segment.bytes`, `log.segment.ms`, `log.retention.ms`,
    /// `log.retention.bytes`, `log.flush.policy`/`log.flush.interval.ms`/`log.flush.interval.bytes`,
    /// `compression.type`.
    pub topic_defaults: TopicConfig,
    /// `num.shards` (Keel): threads with an io_uring each; 0 = one per core.
    pub shards: usize,
    /// `log.recovery.mode` (Keel): `strict` or `truncate`.
    pub recovery: RecoveryMode,
    /// `log.journal.bytes` (Keel): each shard's journal ring; 0 turns the journal off.
    pub journal_bytes: u64,
    /// `log.cache.bytes` (Keel): each shard's memory for recent batches, shared by its partitions.
    pub cache_bytes: usize,
    /// `log.recovery.point.bytes` (Keel): a partition's recovery point moves into its active
    /// segment each time this much more of it is durable; 0 moves it only at rolls.
    pub recovery_point_bytes: u64,
    /// `metrics.listener` (Keel): Prometheus text metrics over HTTP; `none` to disable.
    pub metrics_listen: Option<SocketAddr>,
    /// `shutdown.timeout.ms` (Keel): how long SIGTERM waits for in-flight requests.
    pub shutdown_timeout_ms: u64,
    /// `producer.id.expiration.ms`: forget an idle producer's sequence state after this long.
    pub producer_id_expiration_ms: u64,
    /// `cluster.id`
    pub cluster_id: String,
    /// Group coordinator settings: `group.min.session.timeout.ms`, `group.max.session.timeout.ms`,
    /// `group.initial.rebalance.delay.ms`, `group.max.size`.
    pub groups: crate::groups::GroupConfig,
    /// `offsets.topic.num.partitions`: partitions of `__consumer_offsets` (fixed at first start).
    pub offsets_topic_num_partitions: u32,
    /// `offsets.topic.segment.bytes`: segment size of `__consumer_offsets` (fixed at first start).
    pub offsets_topic_segment_bytes: u64,
    /// `offset.metadata.max.bytes`
    pub offset_metadata_max_bytes: usize,
    /// The engine's storage backend: the real disk, or (tests, embedders) the fault-injecting
    /// simulator. Not a property.
    pub backend: keel_engine::io::Backend,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            node_id: 0,
            listen: SocketAddr::from(([127, 0, 0, 1], 9092)),
            advertised: None,
            data_dir: PathBuf::from("keel-data"),
            num_partitions: 1,
            default_replication_factor: 1,
            auto_create_topics_enable: true,
            message_max_bytes: 1_048_588,
            socket_request_max_bytes: 100 * 1024 * 1024,
            max_connections: 10_000,
            fetch_max_bytes: 57_671_680,
            topic_defaults: TopicConfig::default(),
            shards: 0,
            recovery: RecoveryMode::Strict,
            journal_bytes: keel_engine::constants::journal_bytes_default,
            recovery_point_bytes: keel_engine::constants::recovery_point_bytes_default,
            cache_bytes: keel_engine::constants::shard_cache_bytes_default,
            metrics_listen: None,
            shutdown_timeout_ms: 30_000,
            producer_id_expiration_ms: 86_400_000,
            cluster_id: "keel-cluster".into(),
            groups: crate::groups::GroupConfig::default(),
            offsets_topic_num_partitions: 8,
            offsets_topic_segment_bytes: crate::offsets::offsets_segment_bytes_default,
            offset_metadata_max_bytes: 4096,
            backend: keel_engine::io::Backend::Uring,
        }
    }
}

impl BrokerConfig {
    /// Read a Kafka-style properties file (`key=value`, `#` comments) over the defaults.
    pub fn from_file(path: &std::path::Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            source: e,
        })?;
        let mut config = BrokerConfig::default();
        for (key, value) in parse_properties(&text)? {
            config.set(&key, &value)?;
        }
        Ok(config)
    }

    /// Set one property by its Kafka name.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = |why: &str| ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        let value = value.trim();
        match key {
            "node.id" | "broker.id" => self.node_id = number(key, value)?,
            "listeners" => self.listen = parse_listener(value).map_err(|w| bad(&w))?,
            "advertised.listeners" => {
                let (host, port) = split_listener(value).map_err(|w| bad(&w))?;
                self.advertised = Some((host, port));
            }
            "log.dirs" | "log.dir" => {
                let first = value.split(',').next().unwrap_or("").trim();
                if first.is_empty() {
                    return Err(bad("empty path"));
                }
                self.data_dir = PathBuf::from(first);
            }
            "num.partitions" => {
                self.num_partitions = number(key, value)?;
                if self.num_partitions == 0 {
                    return Err(bad("must be at least 1"));
                }
            }
            "default.replication.factor" => self.default_replication_factor = number(key, value)?,
            "auto.create.topics.enable" => self.auto_create_topics_enable = boolean(key, value)?,
            "message.max.bytes" => {
                self.message_max_bytes = number(key, value)?;
                self.topic_defaults.set("max.message.bytes", value)?;
            }
            "socket.request.max.bytes" => self.socket_request_max_bytes = number(key, value)?,
            "max.connections" => self.max_connections = number(key, value)?,
            "fetch.max.bytes" => {
                self.fetch_max_bytes = number(key, value)?;
                if self.fetch_max_bytes == 0 {
                    return Err(bad("must be at least 1"));
                }
            }
            "num.shards" => self.shards = number(key, value)?,
            "log.journal.bytes" => self.journal_bytes = number(key, value)?,
            "log.cache.bytes" => self.cache_bytes = number(key, value)?,
            "log.recovery.point.bytes" => self.recovery_point_bytes = number(key, value)?,
            "log.recovery.mode" => {
                self.recovery = match value {
                    "strict" => RecoveryMode::Strict,
                    "truncate" => RecoveryMode::TruncateTail,
                    _ => return Err(bad("expected strict or truncate")),
                }
            }
            "metrics.listener" => {
                self.metrics_listen = match value {
                    "" | "none" => None,
                    v => Some(parse_listener(v).map_err(|w| bad(&w))?),
                }
            }
            "shutdown.timeout.ms" => self.shutdown_timeout_ms = number(key, value)?,
            "producer.id.expiration.ms" => self.producer_id_expiration_ms = number(key, value)?,
            "cluster.id" => self.cluster_id = value.to_string(),
            "group.min.session.timeout.ms" => {
                self.groups.min_session_timeout =
                    std::time::Duration::from_millis(number(key, value)?)
            }
            "group.max.session.timeout.ms" => {
                self.groups.max_session_timeout =
                    std::time::Duration::from_millis(number(key, value)?)
            }
            "group.initial.rebalance.delay.ms" => {
                self.groups.initial_rebalance_delay =
                    std::time::Duration::from_millis(number(key, value)?)
            }
            "group.max.size" => self.groups.max_size = number(key, value)?,
            "offsets.topic.num.partitions" => {
                self.offsets_topic_num_partitions = number(key, value)?;
                if self.offsets_topic_num_partitions == 0 {
                    return Err(bad("must be at least 1"));
                }
            }
            "offsets.topic.segment.bytes" => {
                let bytes: u64 = number(key, value)?;
                let (min, max) = (
                    keel_engine::constants::segment_bytes_min,
                    keel_engine::constants::segment_bytes_max,
                );
                if !(min..=max).contains(&bytes) {
                    return Err(bad(&format!("between {min} and {max}")));
                }
                self.offsets_topic_segment_bytes = bytes;
            }
            "offset.metadata.max.bytes" => {
                self.offset_metadata_max_bytes = number(key, value)?;
                // Stored with a 16-bit length in the offsets log.
                if self.offset_metadata_max_bytes > i16::MAX as usize {
                    return Err(bad("at most 32767"));
                }
            }
            _ => match key.strip_prefix("log.") {
                // Broker-wide topic defaults carry a `log.` prefix in Kafka.
                Some(topic_key) if TopicConfig::knows(&broker_to_topic_key(topic_key)) => {
                    self.topic_defaults
                        .set(&broker_to_topic_key(topic_key), value)?;
                }
                _ if key == "compression.type" => self.topic_defaults.set(key, value)?,
                _ => return Err(ConfigError::Unknown(key.to_string())),
            },
        }
        Ok(())
    }

    /// The host and port given to clients in Metadata.
    pub fn advertised(&self, bound: SocketAddr) -> (String, u16) {
        self.advertised
            .clone()
            .unwrap_or_else(|| (bound.ip().to_string(), bound.port()))
    }
}

/// `log.segment.bytes` → `segment.bytes`, `log.flush.interval.ms` → `flush.ms`, ...
fn broker_to_topic_key(key: &str) -> String {
    match key {
        "flush.interval.ms" => "flush.ms".into(),
        "flush.interval.bytes" => "flush.bytes".into(),
        other => other.into(),
    }
}

/// Per-topic configuration, Kafka's names. Kept as given (for DescribeConfigs) and checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicConfig {
    /// Only the keys set explicitly for this topic (or broker-wide).
    pub overrides: BTreeMap<String, String>,
    pub segment_bytes: u64,
    pub segment_ms: Option<u64>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub max_message_bytes: usize,
    pub flush: FlushPolicy,
    pub compression: Compression,
    pub min_insync_replicas: u32,
}

impl Default for TopicConfig {
    fn default() -> Self {
        TopicConfig {
            overrides: BTreeMap::new(),
            segment_bytes: 1024 * 1024 * 1024,
            segment_ms: Some(7 * 24 * 3_600_000),
            retention_ms: Some(7 * 24 * 3_600_000),
            retention_bytes: None,
            max_message_bytes: 1_048_588,
            flush: FlushPolicy::EveryBatch,
            compression: Compression::Producer,
            min_insync_replicas: 1,
        }
    }
}

const TOPIC_KEYS: &[&str] = &[
    "segment.bytes",
    "segment.ms",
    "retention.ms",
    "retention.bytes",
    "max.message.bytes",
    "flush.policy",
    "flush.ms",
    "flush.bytes",
    "compression.type",
    "min.insync.replicas",
    "cleanup.policy",
    "message.timestamp.type",
];

impl TopicConfig {
    pub fn knows(key: &str) -> bool {
        TOPIC_KEYS.contains(&key)
    }

    /// Every topic config key with its current value, for DescribeConfigs.
    pub fn describe(&self) -> Vec<(&'static str, String, bool)> {
        let opt = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
        let (policy, ms, bytes) = match self.flush {
            FlushPolicy::EveryBatch => ("every-batch", "-1".into(), "-1".into()),
            FlushPolicy::Interval { ms, bytes } => ("interval", ms.to_string(), bytes.to_string()),
        };
        let values = [
            ("segment.bytes", self.segment_bytes.to_string()),
            ("segment.ms", opt(self.segment_ms)),
            ("retention.ms", opt(self.retention_ms)),
            ("retention.bytes", opt(self.retention_bytes)),
            ("max.message.bytes", self.max_message_bytes.to_string()),
            ("flush.policy", policy.to_string()),
            ("flush.ms", ms),
            ("flush.bytes", bytes),
            ("compression.type", self.compression.name().to_string()),
            ("min.insync.replicas", self.min_insync_replicas.to_string()),
            ("cleanup.policy", "delete".to_string()),
            ("message.timestamp.type", "CreateTime".to_string()),
        ];
        values
            .into_iter()
            .map(|(k, v)| (k, v, self.overrides.contains_key(k)))
            .collect()
    }

    /// Set one key, checking its value. Unknown keys and unsupported values are errors.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let bad = |why: &str| ConfigError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        };
        let opt = |n: i64| (n >= 0).then_some(n as u64);
        match key {
            "segment.bytes" => {
                let n: u64 = number(key, value)?;
                if !(segment_bytes_min..=segment_bytes_max).contains(&n) {
                    return Err(bad(&format!(
                        "outside [{segment_bytes_min}, {segment_bytes_max}]"
                    )));
                }
                self.segment_bytes = n;
            }
            "segment.ms" => self.segment_ms = opt(number(key, value)?),
            "retention.ms" => self.retention_ms = opt(number(key, value)?),
            "retention.bytes" => self.retention_bytes = opt(number(key, value)?),
            "max.message.bytes" => {
                let n: usize = number(key, value)?;
                if !(64..=batch_bytes_max).contains(&n) {
                    return Err(bad(&format!("outside [64, {batch_bytes_max}]")));
                }
                self.max_message_bytes = n;
            }
            "flush.policy" => {
                self.flush = match (value, self.flush) {
                    ("every-batch", _) => FlushPolicy::EveryBatch,
                    ("interval", FlushPolicy::Interval { ms, bytes }) => {
                        FlushPolicy::Interval { ms, bytes }
                    }
                    ("interval", FlushPolicy::EveryBatch) => {
                        FlushPolicy::Interval { ms: 1000, bytes: 0 }
                    }
                    _ => return Err(bad("expected every-batch or interval")),
                }
            }
            "flush.ms" | "flush.bytes" => {
                let n: i64 = number(key, value)?;
                let n = n.max(0) as u64;
                let (mut ms, mut bytes) = match self.flush {
                    FlushPolicy::Interval { ms, bytes } => (ms, bytes),
                    FlushPolicy::EveryBatch => (0, 0),
                };
                if key == "flush.ms" {
                    ms = n;
                } else {
                    bytes = n;
                }
                // Kafka's flush.ms/flush.messages imply interval flushing; Keel says so explicitly,
                // but a value given without a policy means interval (every-batch ignores both).
                let explicit_every_batch =
                    self.overrides.get("flush.policy").map(String::as_str) == Some("every-batch");
                if !explicit_every_batch && (ms > 0 || bytes > 0) {
                    self.flush = FlushPolicy::Interval { ms, bytes };
                }
            }
            "compression.type" => {
                self.compression = Compression::parse(value).ok_or_else(|| {
                    bad("expected producer, uncompressed, gzip, snappy, lz4 or zstd")
                })?
            }
            "min.insync.replicas" => {
                self.min_insync_replicas = number(key, value)?;
                if self.min_insync_replicas == 0 {
                    return Err(bad("must be at least 1"));
                }
            }
            "cleanup.policy" if value == "delete" => {}
            "cleanup.policy" => return Err(bad("only delete is supported (no compaction yet)")),
            "message.timestamp.type" if value == "CreateTime" => {}
            "message.timestamp.type" => {
                return Err(bad(
                    "only CreateTime is supported (LogAppendTime would rewrite stored batches)",
                ))
            }
            _ => return Err(ConfigError::Unknown(key.to_string())),
        }
        self.overrides.insert(key.to_string(), value.to_string());
        Ok(())
    }

    /// The engine's view of this topic's partitions.
    pub fn partition_config(&self) -> PartitionConfig {
        PartitionConfig {
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            retention_bytes: self.retention_bytes,
            retention_ms: self.retention_ms,
            max_message_bytes: self.max_message_bytes.min(self.segment_bytes as usize),
            flush: self.flush,
            ..PartitionConfig::default()
        }
    }

    /// Properties text of the explicit overrides (what is persisted per topic).
    pub fn to_properties(&self) -> String {
        self.overrides
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }
}

/// `key=value` lines; `#` and `!` start comments.
pub fn parse_properties(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!'))
        .map(|line| {
            line.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .ok_or_else(|| ConfigError::Malformed(line.to_string()))
        })
        .collect()
}

fn number<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| ConfigError::Invalid {
        key: key.into(),
        value: value.into(),
        why: "not a number in range".into(),
    })
}

fn boolean(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(ConfigError::Invalid {
            key: key.into(),
            value: value.into(),
            why: "expected true or false".into(),
        }),
    }
}

/// `PLAINTEXT://host:port` or `host:port` (the first of a comma-separated list).
fn split_listener(value: &str) -> Result<(String, u16), String> {
    let first = value.split(',').next().unwrap_or("").trim();
    let address = match first.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("PLAINTEXT") => rest,
        Some((scheme, _)) => return Err(format!("listener scheme {scheme} is not supported")),
        None => first,
    };
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_string())?;
    let port = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    Ok((host.to_string(), port))
}

fn parse_listener(value: &str) -> Result<SocketAddr, String> {
    let (host, port) = split_listener(value)?;
    (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host} resolves to nothing"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_names_set_broker_and_topic_defaults() {
        let mut c = BrokerConfig::default();
        c.set("listeners", "PLAINTEXT://127.0.0.1:19092").unwrap();
        c.set("log.segment.bytes", "2097152").unwrap();
        c.set("log.retention.ms", "-1").unwrap();
        c.set("log.flush.interval.ms", "50").unwrap();
        c.set("num.partitions", "3").unwrap();
        assert_eq!(c.listen.port(), 19092);
        assert_eq!(c.topic_defaults.segment_bytes, 2_097_152);
        assert_eq!(c.topic_defaults.retention_ms, None);
        assert_eq!(
            c.topic_defaults.flush,
            FlushPolicy::Interval { ms: 50, bytes: 0 }
        );
        assert_eq!(c.num_partitions, 3);
        assert!(matches!(
            c.set("no.such.key", "1"),
            Err(ConfigError::Unknown(_))
        ));
        assert!(c.set("num.partitions", "0").is_err());
        assert!(c.set("fetch.max.bytes", "0").is_err());
        c.set("fetch.max.bytes", "1048576").unwrap();
        assert_eq!(c.fetch_max_bytes, 1 << 20);
        assert!(c.set("listeners", "SSL://x:1").is_err());
        assert_eq!(
            c.recovery_point_bytes,
            keel_engine::constants::recovery_point_bytes_default
        );
        c.set("log.recovery.point.bytes", "0").unwrap();
        assert_eq!(c.recovery_point_bytes, 0);
        assert!(c.set("log.recovery.point.bytes", "-1").is_err());
    }

    #[test]
    fn topic_config_rejects_what_keel_cannot_honour() {
        let mut t = TopicConfig::default();
        assert!(t.set("cleanup.policy", "compact").is_err());
        assert!(t.set("message.timestamp.type", "LogAppendTime").is_err());
        assert!(t.set("segment.bytes", "10").is_err());
        assert!(t.set("compression.type", "brotli").is_err());
        t.set("flush.policy", "every-batch").unwrap();
        t.set("flush.ms", "100").unwrap();
        assert_eq!(
            t.flush,
            FlushPolicy::EveryBatch,
            "explicit every-batch wins"
        );
        t.set("retention.bytes", "1048576").unwrap();
        let round: Vec<_> = parse_properties(&t.to_properties()).unwrap();
        let mut again = TopicConfig::default();
        for (k, v) in round {
            again.set(&k, &v).unwrap();
        }
        assert_eq!(again, t);
    }
}
