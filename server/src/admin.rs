//! Metadata, ListOffsets, CreateTopics, DeleteTopics, DescribeConfigs, InitProducerId.

use std::sync::Arc;

use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeConfigsRequest, DescribeConfigsResponse, InitProducerIdRequest, InitProducerIdResponse,
    ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse, ProducerId,
    TopicName,
};
use kafka_protocol::ResponseError;

use crate::broker::Broker;
use crate::config::TopicConfig;
use crate::error::error_code;
use crate::metadata::{blocking, valid_topic_name, Topic};
use crate::metrics::Metrics;
use crate::protocol::str_bytes;

/// A topic may not have more partitions than this (each is a directory and open files).
pub const partitions_per_topic_max: i32 = 10_000;

/// ListOffsets special timestamps.
const latest_timestamp: i64 = -1;
const earliest_timestamp: i64 = -2;

/// DescribeConfigs resource types and config sources (Kafka's numbering).
const resource_topic: i8 = 2;
const resource_broker: i8 = 4;
const source_dynamic_topic: i8 = 1;
const source_static_broker: i8 = 4;
const source_default: i8 = 5;

/// Name, value, source, type.
type ConfigEntry = (String, String, i8, i8);

impl Broker {
    fn broker_entry(&self) -> MetadataResponseBroker {
        let (host, port) = self
            .advertised
            .get()
            .cloned()
            .unwrap_or_else(|| self.config.advertised(self.config.listen));
        MetadataResponseBroker::default()
            .with_node_id(BrokerId(self.config.node_id))
            .with_host(str_bytes(host))
            .with_port(port as i32)
    }

    fn topic_metadata(&self, topic: &Topic) -> MetadataResponseTopic {
        let node = BrokerId(self.config.node_id);
        MetadataResponseTopic::default()
            .with_name(Some(TopicName(str_bytes(&*topic.name))))
            .with_topic_id(topic.id)
            .with_partitions(
                topic
                    .partitions
                    .iter()
                    .map(|p| {
                        let replicas: Vec<BrokerId> =
                            p.replicas.iter().map(|&r| BrokerId(r)).collect();
                        MetadataResponsePartition::default()
                            .with_partition_index(p.index)
                            .with_leader_id(node)
                            .with_leader_epoch(p.leader_epoch)
                            .with_isr_nodes(replicas.clone())
                            .with_replica_nodes(replicas)
                    })
                    .collect(),
            )
    }

    pub(crate) async fn metadata(
        self: &Arc<Self>,
        request: MetadataRequest,
        version: i16,
    ) -> MetadataResponse {
        let mut response = MetadataResponse::default()
            .with_brokers(vec![self.broker_entry()])
            .with_cluster_id(Some(str_bytes(&self.config.cluster_id)))
            .with_controller_id(BrokerId(self.config.node_id));
        let Some(requested) = request.topics else {
            response.topics = self
                .registry
                .snapshot()
                .values()
                .map(|t| self.topic_metadata(t))
                .collect();
            return response;
        };
        // Before v4 every Metadata request may create topics; after, only when the client allows.
        let may_create = self.config.auto_create_topics_enable
            && (version < 4 || request.allow_auto_topic_creation);
        for t in requested {
            let Some(name) = t.name else {
                let entry = match self.registry.topic_by_id(t.topic_id) {
                    Some(topic) => self.topic_metadata(&topic),
                    None => MetadataResponseTopic::default()
                        .with_topic_id(t.topic_id)
                        .with_error_code(self.code(ResponseError::UnknownTopicId)),
                };
                response.topics.push(entry);
                continue;
            };
            let unknown = |code: ResponseError| {
                MetadataResponseTopic::default()
                    .with_name(Some(name.clone()))
                    .with_error_code(self.code(code))
            };
            let entry = if let Some(topic) = self.registry.topic(name.as_str()) {
                self.topic_metadata(&topic)
            } else if !valid_topic_name(name.as_str()) {
                unknown(ResponseError::InvalidTopicException)
            } else if name.as_str() == crate::offsets::offsets_topic {
                // Internal: not served to clients, never auto-created.
                unknown(ResponseError::UnknownTopicOrPartition)
            } else if may_create {
                let defaults = self.config.topic_defaults.clone();
                match self
                    .create_topic(name.as_str(), self.config.num_partitions, defaults)
                    .await
                {
                    Ok(topic) => self.topic_metadata(&topic),
                    // Lost a race with another creator: report what exists now.
                    Err((ResponseError::TopicAlreadyExists, _)) => {
                        match self.registry.topic(name.as_str()) {
                            Some(topic) => self.topic_metadata(&topic),
                            None => unknown(ResponseError::LeaderNotAvailable),
                        }
                    }
                    Err((code, message)) => {
                        tracing::warn!(topic = name.as_str(), %message, "auto-create failed");
                        unknown(code)
                    }
                }
            } else {
                unknown(ResponseError::UnknownTopicOrPartition)
            };
            response.topics.push(entry);
        }
        response
    }

    pub(crate) async fn list_offsets(
        self: &Arc<Self>,
        request: ListOffsetsRequest,
        version: i16,
    ) -> ListOffsetsResponse {
        let mut response = ListOffsetsResponse::default();
        for t in request.topics {
            let topic = self.registry.topic(t.name.as_str());
            let mut partitions = Vec::new();
            for lp in t.partitions {
                let mut r = ListOffsetsPartitionResponse::default()
                    .with_partition_index(lp.partition_index);
                let found = topic
                    .as_ref()
                    .and_then(|topic| topic.partition(lp.partition_index).map(|p| (topic, p)));
                let Some((topic, p)) = found else {
                    r.error_code = self.code(ResponseError::UnknownTopicOrPartition);
                    partitions.push(r);
                    continue;
                };
                if let Err(e) = self.check_leader_epoch(p, lp.current_leader_epoch) {
                    r.error_code = self.code(e);
                    partitions.push(r);
                    continue;
                }
                let state = match self.engine.partition_state(&p.id).await {
                    Ok(s) => s,
                    Err(e) => {
                        r.error_code = self.code(error_code(&e));
                        partitions.push(r);
                        continue;
                    }
                };
                let hw = Broker::high_watermark(topic, state.durable.0, state.written.0);
                if version >= 4 {
                    r.leader_epoch = p.leader_epoch;
                }
                match lp.timestamp {
                    earliest_timestamp => r.offset = state.log_start_offset as i64,
                    latest_timestamp => r.offset = hw as i64,
                    ts if ts >= 0 => match self.engine.offset_for_timestamp(&p.id, ts).await {
                        // Only offsets below the high watermark exist for a consumer.
                        Ok(Some(found)) if found.offset < hw => {
                            r.offset = found.offset as i64;
                            r.timestamp = found.timestamp;
                        }
                        Ok(_) => {}
                        Err(e) => r.error_code = self.code(error_code(&e)),
                    },
                    _ => r.error_code = self.code(ResponseError::InvalidRequest),
                }
                partitions.push(r);
            }
            response.topics.push(
                ListOffsetsTopicResponse::default()
                    .with_name(t.name)
                    .with_partitions(partitions),
            );
        }
        response
    }

    pub(crate) async fn create_topics(
        self: &Arc<Self>,
        request: CreateTopicsRequest,
    ) -> CreateTopicsResponse {
        let mut response = CreateTopicsResponse::default();
        for t in request.topics {
            let mut result = CreatableTopicResult::default().with_name(t.name.clone());
            let outcome = self.create_one(&t, request.validate_only).await;
            match outcome {
                Ok((topic_id, config, count, replication)) => {
                    result.topic_id = topic_id;
                    result.num_partitions = count;
                    result.replication_factor = replication;
                    result.error_message = None;
                    result.configs = Some(
                        config
                            .describe()
                            .into_iter()
                            .map(|(name, value, overridden)| {
                                CreatableTopicConfigs::default()
                                    .with_name(str_bytes(name))
                                    .with_value(Some(str_bytes(value)))
                                    .with_config_source(if overridden {
                                        source_dynamic_topic
                                    } else {
                                        source_default
                                    })
                            })
                            .collect(),
                    );
                }
                Err((code, message)) => {
                    result.error_code = self.code(code);
                    result.error_message = Some(str_bytes(message));
                    result.configs = None;
                }
            }
            response.topics.push(result);
        }
        response
    }

    async fn create_one(
        self: &Arc<Self>,
        t: &kafka_protocol::messages::create_topics_request::CreatableTopic,
        validate_only: bool,
    ) -> Result<(uuid::Uuid, TopicConfig, i32, i16), (ResponseError, String)> {
        let name = t.name.as_str();
        if name == crate::offsets::offsets_topic {
            return Err((
                ResponseError::TopicAlreadyExists,
                format!("{name} is Keel's internal topic"),
            ));
        }
        if !valid_topic_name(name) {
            return Err((
                ResponseError::InvalidTopicException,
                format!(
                    "{name:?} is not a valid topic name ([a-zA-Z0-9._-], at most 249 characters)"
                ),
            ));
        }
        let count = if t.assignments.is_empty() {
            match t.num_partitions {
                -1 => self.config.num_partitions as i32,
                n if (1..=partitions_per_topic_max).contains(&n) => n,
                n => {
                    return Err((
                        ResponseError::InvalidPartitions,
                        format!("{n} partitions: must be between 1 and {partitions_per_topic_max}"),
                    ))
                }
            }
        } else {
            if t.num_partitions != -1 || t.replication_factor != -1 {
                return Err((
                    ResponseError::InvalidRequest,
                    "give either assignments or numPartitions/replicationFactor".into(),
                ));
            }
            let single = t
                .assignments
                .iter()
                .all(|a| a.broker_ids == [BrokerId(self.config.node_id)]);
            let dense = t
                .assignments
                .iter()
                .enumerate()
                .all(|(i, a)| a.partition_index == i as i32);
            if !single || !dense || t.assignments.len() > partitions_per_topic_max as usize {
                return Err((
                    ResponseError::InvalidReplicaAssignment,
                    format!(
                        "this single-node cluster can only place partitions 0..n on broker {}",
                        self.config.node_id
                    ),
                ));
            }
            t.assignments.len() as i32
        };
        let replication = match t.replication_factor {
            -1 => self.config.default_replication_factor,
            n => n,
        };
        if replication != 1 {
            return Err((
                ResponseError::InvalidReplicationFactor,
                format!("replication factor {replication}: this cluster has 1 broker"),
            ));
        }
        let mut config = self.config.topic_defaults.clone();
        config.overrides.clear();
        for c in &t.configs {
            let Some(value) = &c.value else { continue };
            config
                .set(c.name.as_str(), value.as_str())
                .map_err(|e| (ResponseError::InvalidConfig, e.to_string()))?;
        }
        if validate_only {
            if self.registry.topic(name).is_some() {
                return Err((
                    ResponseError::TopicAlreadyExists,
                    format!("topic {name} already exists"),
                ));
            }
            return Ok((uuid::Uuid::nil(), config, count, replication));
        }
        let topic = self.create_topic(name, count as u32, config).await?;
        Ok((topic.id, topic.config.clone(), count, replication))
    }

    pub(crate) async fn delete_topics(
        self: &Arc<Self>,
        request: DeleteTopicsRequest,
    ) -> DeleteTopicsResponse {
        let mut response = DeleteTopicsResponse::default();
        // v0-5 name topics in `topic_names`; v6 in `topics`, by name or by id.
        let mut targets: Vec<(Option<TopicName>, uuid::Uuid)> = request
            .topic_names
            .into_iter()
            .map(|n| (Some(n), uuid::Uuid::nil()))
            .collect();
        targets.extend(request.topics.into_iter().map(|t| (t.name, t.topic_id)));
        for (name, id) in targets {
            let mut result = DeletableTopicResult::default()
                .with_name(name.clone())
                .with_topic_id(id);
            let topic = match &name {
                Some(n) => self.registry.topic(n.as_str()),
                None => self.registry.topic_by_id(id),
            };
            let outcome = match topic {
                None if name.is_none() => Err((
                    ResponseError::UnknownTopicId,
                    format!("unknown topic id {id}"),
                )),
                None => Err((
                    ResponseError::UnknownTopicOrPartition,
                    "unknown topic".to_string(),
                )),
                Some(topic) => {
                    result.name = Some(TopicName(str_bytes(&*topic.name)));
                    result.topic_id = topic.id;
                    self.delete_topic(&topic.name).await
                }
            };
            if let Err((code, message)) = outcome {
                result.error_code = self.code(code);
                result.error_message = Some(str_bytes(message));
            }
            response.responses.push(result);
        }
        response
    }

    pub(crate) fn describe_configs(
        self: &Arc<Self>,
        request: DescribeConfigsRequest,
    ) -> DescribeConfigsResponse {
        let mut response = DescribeConfigsResponse::default();
        for r in request.resources {
            let mut result = DescribeConfigsResult::default()
                .with_resource_type(r.resource_type)
                .with_resource_name(r.resource_name.clone());
            let wanted = |key: &str| {
                r.configuration_keys
                    .as_ref()
                    .is_none_or(|keys| keys.iter().any(|k| k.as_str() == key))
            };
            let entries: Result<Vec<ConfigEntry>, (ResponseError, String)> = match r.resource_type {
                resource_topic => match self.registry.topic(r.resource_name.as_str()) {
                    Some(topic) => Ok(topic
                        .config
                        .describe()
                        .into_iter()
                        .map(|(k, v, overridden)| {
                            let source = if overridden {
                                source_dynamic_topic
                            } else {
                                source_default
                            };
                            (k.to_string(), v, source, config_type(k))
                        })
                        .collect()),
                    None => Err((
                        ResponseError::UnknownTopicOrPartition,
                        "unknown topic".into(),
                    )),
                },
                resource_broker
                    if r.resource_name.is_empty()
                        || r.resource_name.as_str() == self.config.node_id.to_string() =>
                {
                    Ok(self.broker_settings())
                }
                resource_broker => Err((
                    ResponseError::InvalidRequest,
                    "this broker is node ".to_string() + &self.config.node_id.to_string(),
                )),
                other => Err((
                    ResponseError::InvalidRequest,
                    format!("resource type {other} is not supported"),
                )),
            };
            match entries {
                Ok(entries) => {
                    result.configs = entries
                        .into_iter()
                        .filter(|(k, ..)| wanted(k))
                        .map(|(k, v, source, kind)| {
                            DescribeConfigsResourceResult::default()
                                .with_name(str_bytes(k))
                                .with_value(Some(str_bytes(v)))
                                .with_config_source(source)
                                .with_read_only(true)
                                .with_config_type(kind)
                        })
                        .collect();
                }
                Err((code, message)) => {
                    result.error_code = self.code(code);
                    result.error_message = Some(str_bytes(message));
                }
            }
            response.results.push(result);
        }
        response
    }

    fn broker_settings(&self) -> Vec<ConfigEntry> {
        let c = &self.config;
        let mut out = vec![
            (
                "node.id".to_string(),
                c.node_id.to_string(),
                source_static_broker,
                3,
            ),
            (
                "log.dirs".into(),
                c.data_dir.display().to_string(),
                source_static_broker,
                2,
            ),
            (
                "num.partitions".into(),
                c.num_partitions.to_string(),
                source_static_broker,
                3,
            ),
            (
                "default.replication.factor".into(),
                c.default_replication_factor.to_string(),
                source_static_broker,
                4,
            ),
            (
                "auto.create.topics.enable".into(),
                c.auto_create_topics_enable.to_string(),
                source_static_broker,
                1,
            ),
            (
                "message.max.bytes".into(),
                c.message_max_bytes.to_string(),
                source_static_broker,
                3,
            ),
            (
                "socket.request.max.bytes".into(),
                c.socket_request_max_bytes.to_string(),
                source_static_broker,
                3,
            ),
            (
                "max.connections".into(),
                c.max_connections.to_string(),
                source_static_broker,
                3,
            ),
        ];
        for (k, v, _) in c.topic_defaults.describe() {
            let name = match k {
                "flush.ms" => "log.flush.interval.ms".to_string(),
                "flush.bytes" => "log.flush.interval.bytes".to_string(),
                "compression.type" | "min.insync.replicas" => k.to_string(),
                _ => format!("log.{k}"),
            };
            out.push((name, v, source_static_broker, config_type(k)));
        }
        out
    }

    pub(crate) async fn init_producer_id(
        self: &Arc<Self>,
        request: InitProducerIdRequest,
    ) -> InitProducerIdResponse {
        let mut response = InitProducerIdResponse::default();
        if request
            .transactional_id
            .as_ref()
            .is_some_and(|id| !id.0.is_empty())
        {
            // Transactions are later work: say so instead of handing out an id that cannot work.
            response.error_code = self.code(ResponseError::UnsupportedVersion);
            return response;
        }
        // KIP-360: a producer that knows its id asks for the next epoch (after a timeout or an
        // UNKNOWN_PRODUCER_ID); it keeps its id unless the epoch would overflow.
        if request.producer_id.0 >= 0
            && request.producer_epoch >= 0
            && request.producer_epoch < i16::MAX - 1
        {
            response.producer_id = request.producer_id;
            response.producer_epoch = request.producer_epoch + 1;
            return response;
        }
        let broker = self.clone();
        match blocking(move || broker.registry.allocate_producer_id()).await {
            Ok(id) => {
                Metrics::bump(&self.metrics.producer_ids_allocated);
                response.producer_id = ProducerId(id);
                response.producer_epoch = 0;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reserve producer ids");
                response.error_code = self.code(ResponseError::KafkaStorageError);
            }
        }
        response
    }
}

/// DescribeConfigs `config_type` (KIP-569): 1 boolean, 2 string, 3 int, 5 long.
fn config_type(key: &str) -> i8 {
    match key {
        "flush.policy" | "compression.type" | "cleanup.policy" | "message.timestamp.type" => 2,
        "max.message.bytes" | "min.insync.replicas" => 3,
        _ => 5,
    }
}
