//! The broker: the engine, the topic registry, idempotent-producer state and metrics behind one
//! handle, and the request dispatcher. Produce and Fetch live in `produce.rs` and `fetch.rs`, the
//! admin requests in `admin.rs`.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use kafka_protocol::messages::{RequestKind, ResponseKind};
use kafka_protocol::ResponseError;
use keel_engine::{Engine, EngineConfig, FlushPolicy, ReadUpper};

use crate::config::{BrokerConfig, TopicConfig};
use crate::error::Error;
use crate::metadata::{blocking, write_durably, Partition, Registry, Topic};
use crate::metrics::Metrics;
use crate::producers::ProducerStates;
use crate::protocol::{self, Request};

/// A response still being produced. Futures are lazy: the connection polls them one after the
/// other, so a request's work starts once the previous response is out (Kafka's per-connection
/// order), except Produce, whose appends are queued in order before its future is handed over.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Option<Reply>>>>;

/// A response ready to be written.
#[derive(Debug)]
pub enum Reply {
    Message(ResponseKind),
    /// A Fetch response and its record bytes, kept apart so they are written as the engine
    /// returned them (`records[topic][partition]` = chunks), without being copied into a buffer.
    Fetch {
        response: kafka_protocol::messages::FetchResponse,
        records: Vec<Vec<Vec<bytes::Bytes>>>,
    },
}

impl Reply {
    /// The frame(s) to write for this reply to request (`key`, `version`, `correlation_id`).
    pub fn encode(
        &self,
        key: kafka_protocol::messages::ApiKey,
        version: i16,
        correlation_id: i32,
    ) -> anyhow::Result<Vec<bytes::Bytes>> {
        match self {
            Reply::Message(body) => Ok(vec![protocol::encode_response(
                key,
                version,
                correlation_id,
                body,
            )?
            .freeze()]),
            Reply::Fetch { response, records } => {
                protocol::encode_fetch_response(version, correlation_id, response, records)
            }
        }
    }
}

/// Bytes of log read per call while rebuilding producer state.
const rebuild_read_bytes: usize = 8 * 1024 * 1024;

/// Partitions whose producer state start-up rebuilds at once (at most this many reads of
/// `rebuild_read_bytes` in flight).
const rebuild_partitions_at_once: usize = 16;

/// Who sent a request (JoinGroup reports it in DescribeGroups).
#[derive(Clone, Debug, Default)]
pub struct ClientInfo {
    pub client_id: String,
    pub peer: Option<std::net::SocketAddr>,
}

#[derive(Debug)]
pub struct Broker {
    pub config: BrokerConfig,
    pub engine: Engine,
    pub registry: Registry,
    pub metrics: Metrics,
    pub groups: Arc<crate::groups::Coordinator>,
    pub offsets: crate::offsets::OffsetStore,
    /// Host and port given to clients in Metadata (set once the listener is bound).
    pub advertised: std::sync::OnceLock<(String, u16)>,
    /// Set when shutdown begins: parked fetches answer at once instead of waiting out max.wait.ms.
    pub stopping: std::sync::atomic::AtomicBool,
}

impl Broker {
    /// Open the engine (recovering the data directory), load topics, make the engine's
    /// partitions match them (creating missing ones, deleting those of deleted topics), and
    /// rebuild idempotent-producer state.
    /// Blocking: call it from plain code, not from inside an async runtime.
    pub fn open(config: BrokerConfig) -> Result<Arc<Broker>, Error> {
        let mut engine_config = EngineConfig::new(&config.data_dir);
        engine_config.shards = config.shards;
        engine_config.recovery = config.recovery;
        engine_config.journal_bytes = config.journal_bytes;
        engine_config.shard_cache_bytes = config.cache_bytes;
        engine_config.recovery_point_bytes = config.recovery_point_bytes;
        engine_config.backend = config.backend.clone();
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| Error::io("create", config.data_dir.display(), e))?;
        // The engine first: it takes the data directory's lock, so a second broker started on the
        // same directory stops before it touches anything (loading the registry cleans up files).
        let engine = Engine::open(engine_config)?;
        let registry = Registry::load(&config.data_dir, &config.topic_defaults, config.node_id)?;
        let offsets = keel_engine::block_on(crate::offsets::OffsetStore::open(
            engine.clone(),
            &config.data_dir,
            config.offsets_topic_num_partitions,
            config.offsets_topic_segment_bytes,
        ))?;
        let groups = crate::groups::Coordinator::start(config.groups.clone());
        let broker = Arc::new(Broker {
            config,
            engine,
            registry,
            metrics: Metrics::default(),
            groups,
            offsets,
            advertised: std::sync::OnceLock::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        });
        keel_engine::block_on(broker.reconcile())?;
        Ok(broker)
    }

    /// Bring the engine's partitions and the registry's topics together at start-up: adopt
    /// orphaned partitions, create missing ones, and rebuild every partition's producer state.
    async fn reconcile(&self) -> Result<(), Error> {
        let deleting: std::collections::HashSet<String> =
            self.registry.pending_deletions().into_iter().collect();
        let existing = self.engine.partitions().await?;
        let mut orphans: BTreeMap<String, u32> = BTreeMap::new();
        {
            let topics = self.registry.snapshot();
            for id in &existing {
                if crate::offsets::OffsetStore::is_internal(id) || topics.contains_key(&*id.topic) {
                    continue;
                }
                if deleting.contains(&*id.topic) {
                    tracing::info!(partition = %id, "finishing the deletion of a topic");
                    self.engine.delete_partition(id).await?;
                    let _ = std::fs::remove_file(self.registry.producer_snapshot_path(id));
                } else {
                    let count = orphans.entry(id.topic.to_string()).or_default();
                    *count = (*count).max(id.partition + 1);
                }
            }
        }
        for name in &deleting {
            self.registry.finish_deletion(name);
        }
        // Partitions whose topic metadata is missing (lost, or never written): keep the data and
        // recreate the topic around it, with the broker's defaults.
        for (name, count) in orphans {
            if !crate::metadata::valid_topic_name(&name) {
                tracing::warn!(
                    topic = name,
                    "leaving partitions with an invalid topic name alone"
                );
                continue;
            }
            tracing::warn!(
                topic = name,
                partitions = count,
                "adopting partitions that have no topic metadata"
            );
            let mut config = self.config.topic_defaults.clone();
            config.overrides.clear();
            self.registry.add_topic(&name, count, config)?;
        }
        let topics = self.registry.snapshot();
        let existing = &existing;
        let partitions = topics.values().flat_map(|topic| {
            let wanted = topic.config.partition_config();
            topic.partitions.iter().map(move |p| (p, wanted.clone()))
        });
        // Several partitions at a time (each shard opens and reads several together): a restart
        // with thousands of partitions does not wait for their logs one by one.
        futures::stream::iter(partitions.map(|(p, wanted)| async move {
            if existing.binary_search(&p.id).is_ok() {
                let state = self.engine.partition_state(&p.id).await?;
                if state.config != wanted {
                    tracing::warn!(
                        partition = %p.id,
                        "the partition keeps the settings it was created with; changed broker defaults apply to new topics"
                    );
                }
            } else {
                self.engine.create_partition(&p.id, wanted).await?;
            }
            self.rebuild_producers(p).await
        }))
        .buffer_unordered(rebuild_partitions_at_once)
        .try_collect::<()>()
        .await?;
        Ok(())
    }

    /// Load the producer snapshot written at the last clean shutdown and replay the batches
    /// after it; without a usable snapshot, replay the whole log.
    async fn rebuild_producers(&self, p: &Partition) -> Result<(), Error> {
        let state = self.engine.partition_state(&p.id).await?;
        let log_end = state.appended.0;
        let path = self.registry.producer_snapshot_path(&p.id);
        let (mut states, mut from) = match std::fs::read_to_string(&path) {
            Ok(text) => match ProducerStates::from_snapshot(&text) {
                Some((s, end)) if end <= log_end && end >= state.log_start_offset => (s, end),
                _ => {
                    tracing::warn!(path = %path.display(), "ignoring a producer snapshot that does not fit the log");
                    (ProducerStates::default(), state.log_start_offset)
                }
            },
            Err(_) => (ProducerStates::default(), state.log_start_offset),
        };
        while from < log_end {
            let headers = self
                .engine
                .batch_headers(&p.id, from, rebuild_read_bytes)
                .await?;
            let Some(last) = headers.last() else { break };
            let next = last.next_offset();
            for h in &headers {
                states.replay(h);
            }
            from = next;
        }
        states.expiration_ms = self.config.producer_id_expiration_ms as i64;
        // The snapshot is consumed: a crash from here on must replay from the log, not from it.
        let _ = std::fs::remove_file(&path);
        *p.producers.lock().unwrap_or_else(|e| e.into_inner()) = states;
        Ok(())
    }

    /// Persist producer state of every partition whose appends are all settled (at shutdown).
    pub async fn snapshot_producers(&self) {
        for topic in self.registry.snapshot().values() {
            for p in &topic.partitions {
                let Ok(state) = self.engine.partition_state(&p.id).await else {
                    continue;
                };
                let text = {
                    let producers = p.producers.lock().unwrap_or_else(|e| e.into_inner());
                    if producers.is_empty() || !producers.is_settled() {
                        continue;
                    }
                    producers.snapshot(state.appended.0)
                };
                let path = self.registry.producer_snapshot_path(&p.id);
                if let Err(e) = write_durably(&path, text.as_bytes()) {
                    tracing::warn!(error = %e, "cannot write producer snapshot (state will be rebuilt from the log)");
                }
            }
        }
    }

    /// Prometheus gauges of consumer lag: for every committed offset, the partition's high
    /// watermark minus the committed offset (the messages the group has yet to process).
    pub async fn lag_metrics(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from("# TYPE keel_group_lag gauge\n");
        for (group, offsets) in self.offsets.all().await {
            for ((topic, partition), committed) in offsets {
                let Some(t) = self.registry.topic(&topic) else {
                    continue;
                };
                let Some(p) = t.partition(partition) else {
                    continue;
                };
                let Ok(state) = self.engine.partition_state(&p.id).await else {
                    continue;
                };
                let hw = Broker::high_watermark(&t, state.durable.0, state.written.0) as i64;
                let _ = writeln!(
                    out,
                    "keel_group_lag{{group=\"{}\",topic=\"{topic}\",partition=\"{partition}\"}} {}",
                    group.replace('\\', "\\\\").replace('"', "\\\""),
                    (hw - committed.offset).max(0)
                );
            }
        }
        out
    }

    /// Count and return an error code.
    pub fn code(&self, e: ResponseError) -> i16 {
        self.metrics.error(e.code());
        e.code()
    }

    /// Up to where consumers may read: the high watermark. On a single node the in-sync replica
    /// set is this broker, so a batch is committed once it reaches the durability the topic's
    /// flush policy promises (durable for `every-batch`, written for `interval`).
    pub fn visible(topic: &Topic) -> ReadUpper {
        match topic.config.flush {
            FlushPolicy::EveryBatch => ReadUpper::Durable,
            FlushPolicy::Interval { .. } => ReadUpper::Written,
        }
    }

    pub fn high_watermark(topic: &Topic, durable: u64, written: u64) -> u64 {
        match Broker::visible(topic) {
            ReadUpper::Durable => durable,
            _ => written,
        }
    }

    /// Leader epoch check of Fetch and ListOffsets (KIP-320): -1 means the client does not know.
    pub fn check_leader_epoch(&self, p: &Partition, current: i32) -> Result<(), ResponseError> {
        match current {
            -1 => Ok(()),
            e if e < p.leader_epoch => Err(ResponseError::FencedLeaderEpoch),
            e if e > p.leader_epoch => Err(ResponseError::UnknownLeaderEpoch),
            _ => Ok(()),
        }
    }

    /// Create a topic: its metadata file first (durable), then its partitions. The caller has
    /// validated the name and settings.
    pub async fn create_topic(
        self: &Arc<Self>,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<Arc<Topic>, (ResponseError, String)> {
        let _change = self.registry.change.lock().await;
        if self.registry.topic(name).is_some() {
            return Err((
                ResponseError::TopicAlreadyExists,
                format!("topic {name} already exists"),
            ));
        }
        let broker = self.clone();
        let owned = name.to_string();
        let topic = blocking(move || broker.registry.add_topic(&owned, partitions, config))
            .await
            .map_err(|e| (ResponseError::KafkaStorageError, e.to_string()))?;
        let wanted = topic.config.partition_config();
        for p in &topic.partitions {
            p.producers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .expiration_ms = self.config.producer_id_expiration_ms as i64;
        }
        // All at once: each shard opens several partitions together, beside its other I/O.
        let created = futures::future::join_all(
            topic
                .partitions
                .iter()
                .map(|p| self.engine.create_partition(&p.id, wanted.clone())),
        )
        .await;
        if let Some(e) = created.into_iter().find_map(Result::err) {
            tracing::error!(topic = name, error = %e, "cannot create partition; removing the topic");
            let broker = self.clone();
            let owned = name.to_string();
            let _ = blocking(move || broker.registry.remove_topic(&owned)).await;
            for p in &topic.partitions {
                let _ = self.engine.delete_partition(&p.id).await;
            }
            return Err((crate::error::error_code(&e), e.to_string()));
        }
        Metrics::bump(&self.metrics.topics_created);
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    pub async fn delete_topic(self: &Arc<Self>, name: &str) -> Result<(), (ResponseError, String)> {
        let _change = self.registry.change.lock().await;
        let broker = self.clone();
        let owned = name.to_string();
        let removed = blocking(move || broker.registry.remove_topic(&owned))
            .await
            .map_err(|e| (ResponseError::KafkaStorageError, e.to_string()))?;
        let Some(topic) = removed else {
            return Err((
                ResponseError::UnknownTopicOrPartition,
                format!("unknown topic {name}"),
            ));
        };
        let mut all_deleted = true;
        for p in &topic.partitions {
            if let Err(e) = self.engine.delete_partition(&p.id).await {
                // The tombstone stays: the next start deletes the leftover partition.
                tracing::warn!(partition = %p.id, error = %e, "partition not deleted now; it will be at the next start");
                all_deleted = false;
            }
            let _ = std::fs::remove_file(self.registry.producer_snapshot_path(&p.id));
            p.waiters.wake_all();
        }
        if all_deleted {
            let broker = self.clone();
            let owned = name.to_string();
            blocking(move || broker.registry.finish_deletion(&owned)).await;
        }
        Metrics::bump(&self.metrics.topics_deleted);
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// Start serving one request. Produce queues its appends before returning (so one
    /// connection's appends keep their order); everything else runs when the future is polled.
    pub async fn submit(
        self: &Arc<Self>,
        request: Request,
        peer: Option<std::net::SocketAddr>,
    ) -> ResponseFuture {
        self.metrics.request(request.key as i16);
        let version = request.header.request_api_version;
        let client = ClientInfo {
            client_id: request
                .header
                .client_id
                .as_ref()
                .map_or_else(String::new, |c| c.to_string()),
            peer,
        };
        match request.body {
            RequestKind::Produce(r) => self.produce(r, version).await,
            body => {
                let broker = self.clone();
                Box::pin(async move { Some(broker.handle(body, version, client).await) })
            }
        }
    }

    async fn handle(self: Arc<Self>, body: RequestKind, version: i16, client: ClientInfo) -> Reply {
        if let RequestKind::Fetch(r) = body {
            let (response, records) = self.fetch(r, version).await;
            return Reply::Fetch { response, records };
        }
        let message: ResponseKind = match body {
            RequestKind::ApiVersions(_) => protocol::api_versions_response(0).into(),
            RequestKind::Metadata(r) => self.metadata(r, version).await.into(),
            RequestKind::ListOffsets(r) => self.list_offsets(r, version).await.into(),
            RequestKind::CreateTopics(r) => self.create_topics(r).await.into(),
            RequestKind::DeleteTopics(r) => self.delete_topics(r).await.into(),
            RequestKind::DescribeConfigs(r) => self.describe_configs(r).into(),
            RequestKind::InitProducerId(r) => self.init_producer_id(r).await.into(),
            RequestKind::FindCoordinator(r) => self.find_coordinator(r, version).into(),
            RequestKind::JoinGroup(r) => self.join_group(r, version, &client).await.into(),
            RequestKind::SyncGroup(r) => self.sync_group(r).await.into(),
            RequestKind::Heartbeat(r) => self.heartbeat(r).into(),
            RequestKind::LeaveGroup(r) => self.leave_group(r, version).into(),
            RequestKind::OffsetCommit(r) => self.offset_commit(r).await.into(),
            RequestKind::OffsetFetch(r) => self.offset_fetch(r, version).await.into(),
            RequestKind::ListGroups(r) => self.list_groups(r, version).await.into(),
            RequestKind::DescribeGroups(r) => self.describe_groups(r).await.into(),
            RequestKind::DeleteGroups(r) => self.delete_groups(r).await.into(),
            other => unreachable!("decode_request admits only supported APIs: {other:?}"),
        };
        Reply::Message(message)
    }

    /// Shutdown begins: parked fetches answer now (with what they have).
    pub fn begin_stop(&self) {
        // The flag first: a fetch that registers after the wake-up below still sees it.
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        for topic in self.registry.snapshot().values() {
            for p in &topic.partitions {
                p.waiters.wake_all();
            }
        }
    }

    /// Finish: write producer snapshots, then make everything durable and stop the engine
    /// (which writes the clean-shutdown markers).
    pub async fn shutdown(&self) -> Result<(), Error> {
        self.snapshot_producers().await;
        self.offsets.snapshot_all().await;
        self.engine.shutdown().await?;
        Ok(())
    }
}
