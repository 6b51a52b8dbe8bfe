//! Produce: validate each partition's batch, apply idempotence, queue the appends in request
//! order, and answer per `acks`.
//!
//! Record bytes go from the socket buffer to the engine as a slice of the request frame; the
//! engine checks the CRC and copies them once into its aligned O_DIRECT buffer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{join_all, LocalBoxFuture};
use futures::FutureExt;
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{ProduceRequest, ProduceResponse};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError;
use keel_engine::batch::BatchHeader;
use keel_engine::{Durability, FlushPolicy};

use crate::broker::{Broker, Reply, ResponseFuture};
use crate::error::error_code;
use crate::metadata::{Partition, Topic};
use crate::metrics::Metrics;
use crate::producers::{BatchOffset, Check};

/// The highest codec id Kafka defines (zstd).
const codec_max: u8 = 4;

/// What one partition of a produce request resolves to.
struct Outcome {
    index: i32,
    result: Result<(u64, u64), (ResponseError, String)>,
}

/// A partition index and the future of its outcome.
type PartitionFuture = (i32, LocalBoxFuture<'static, Outcome>);

impl Outcome {
    fn error(index: i32, e: ResponseError, message: impl Into<String>) -> Outcome {
        Outcome {
            index,
            result: Err((e, message.into())),
        }
    }
}

impl Broker {
    pub(crate) async fn produce(
        self: &Arc<Self>,
        request: ProduceRequest,
        version: i16,
    ) -> ResponseFuture {
        let acks = request.acks;
        let timeout = Duration::from_millis(request.timeout_ms.max(0) as u64);
        let mut topics: Vec<(StrBytes, Vec<PartitionFuture>)> = Vec::new();
        for t in request.topic_data {
            let name = t.name.0.clone();
            let topic = self.registry.topic(name.as_str());
            let mut partitions = Vec::new();
            for pd in t.partition_data {
                let index = pd.index;
                let outcome = if !matches!(acks, -1..=1) {
                    ready(Outcome::error(
                        index,
                        ResponseError::InvalidRequiredAcks,
                        "acks must be 0, 1 or -1",
                    ))
                } else if request
                    .transactional_id
                    .as_ref()
                    .is_some_and(|id| !id.0.is_empty())
                {
                    ready(Outcome::error(
                        index,
                        ResponseError::InvalidRequest,
                        "transactions are not supported",
                    ))
                } else {
                    match topic
                        .as_ref()
                        .and_then(|topic| topic.partition(index).map(|p| (topic, p)))
                    {
                        None => ready(Outcome::error(
                            index,
                            ResponseError::UnknownTopicOrPartition,
                            format!("unknown topic or partition {}-{index}", name.as_str()),
                        )),
                        Some((topic, p)) => {
                            let records = pd.records.unwrap_or_default();
                            self.produce_partition(topic, p, records, acks).await
                        }
                    }
                };
                partitions.push((index, outcome));
            }
            topics.push((name, partitions));
        }
        let broker = self.clone();
        Box::pin(async move {
            let mut response = ProduceResponse::default();
            for (name, partitions) in topics {
                let outcomes = join_all(partitions.into_iter().map(|(index, f)| {
                    let broker = broker.clone();
                    async move {
                        match compio::time::timeout(timeout, f).await {
                            Ok(outcome) => outcome,
                            Err(_) => {
                                Metrics::bump(&broker.metrics.produce_timeouts);
                                Outcome::error(
                                    index,
                                    ResponseError::RequestTimedOut,
                                    "the append did not complete within timeout.ms",
                                )
                            }
                        }
                    }
                }))
                .await;
                let mut responses = Vec::with_capacity(outcomes.len());
                for outcome in outcomes {
                    let mut r = PartitionProduceResponse::default().with_index(outcome.index);
                    match outcome.result {
                        Ok((base, log_start)) => {
                            r.base_offset = base as i64;
                            r.log_start_offset = log_start as i64;
                        }
                        Err((e, message)) => {
                            r.error_code = broker.code(e);
                            r.base_offset = -1;
                            if version >= 8 {
                                r.error_message = Some(StrBytes::from_string(message));
                            }
                        }
                    }
                    responses.push(r);
                }
                response.responses.push(
                    TopicProduceResponse::default()
                        .with_name(name.into())
                        .with_partition_responses(responses),
                );
            }
            // acks=0: the client expects no response at all.
            (acks != 0).then(|| Reply::Message(response.into()))
        })
    }

    /// Check one partition's batch and queue its append. Returns the future of its outcome.
    async fn produce_partition(
        self: &Arc<Self>,
        topic: &Arc<Topic>,
        p: &Arc<Partition>,
        records: Bytes,
        acks: i16,
    ) -> LocalBoxFuture<'static, Outcome> {
        let index = p.index;
        let header = match BatchHeader::parse(&records) {
            Ok(h) => h,
            Err(e) => {
                let code = error_code(&keel_engine::Error::InvalidBatch(e.clone()));
                return ready(Outcome::error(index, code, e.to_string()));
            }
        };
        if header.size_bytes > records.len() {
            return ready(Outcome::error(
                index,
                ResponseError::CorruptMessage,
                format!(
                    "batch of {} bytes is truncated to {}",
                    header.size_bytes,
                    records.len()
                ),
            ));
        }
        if header.size_bytes < records.len() {
            return ready(Outcome::error(
                index,
                ResponseError::InvalidRecord,
                "a produce request carries exactly one record batch per partition",
            ));
        }
        if header.is_transactional() || header.is_control() {
            return ready(Outcome::error(
                index,
                ResponseError::InvalidRecord,
                "transactional and control batches are not supported",
            ));
        }
        if header.compression() > codec_max {
            return ready(Outcome::error(
                index,
                ResponseError::UnsupportedCompressionType,
                "unknown compression codec",
            ));
        }
        if header.has_producer_id() && header.producer_epoch < 0 {
            return ready(Outcome::error(
                index,
                ResponseError::InvalidRecord,
                "a producer id needs an epoch",
            ));
        }
        // compression.type: rewrite into the topic's codec unless it is `producer` or matches.
        let records =
            match crate::compression::recompress(&records, &header, topic.config.compression) {
                Ok(None) => records,
                Ok(Some(rewritten)) => {
                    Metrics::bump(&self.metrics.batches_recompressed);
                    rewritten
                }
                Err((e, message)) => return ready(Outcome::error(index, e, message)),
            };
        Metrics::bump(&self.metrics.produce_batches);
        Metrics::add(&self.metrics.produce_bytes, records.len() as u64);

        // Idempotence: check and record under the partition's lock, before the append is queued.
        let mut ticket = None;
        if header.has_producer_id() {
            let check = p
                .producers
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check(&header);
            match check {
                Check::Append { ticket: t, done } => ticket = Some((t, done)),
                Check::Reject(e) => {
                    return ready(Outcome::error(
                        index,
                        e,
                        format!("producer {} rejected: {e:?}", header.producer_id),
                    ))
                }
                Check::Duplicate(offset) => {
                    Metrics::bump(&self.metrics.produce_duplicates);
                    let broker = self.clone();
                    let id = p.id.clone();
                    return Box::pin(async move {
                        let base = match offset {
                            BatchOffset::Known(base) => Ok(base),
                            BatchOffset::Pending(pending) => pending.await.map_err(|_| ()),
                        };
                        match base {
                            Ok(base) => {
                                let log_start = broker
                                    .engine
                                    .partition_state(&id)
                                    .await
                                    .map_or(0, |s| s.log_start_offset);
                                Outcome {
                                    index,
                                    result: Ok((base, log_start)),
                                }
                            }
                            Err(()) => Outcome::error(
                                index,
                                ResponseError::KafkaStorageError,
                                "the original of this retried batch failed; retry",
                            ),
                        }
                    });
                }
            }
        }

        // acks=-1 waits for the topic's policy (durable for every-batch): the batch is then
        // committed on every in-sync replica, i.e. this broker. acks=0/1 answer once written.
        let wait = match (acks, topic.config.flush) {
            (-1, _) => None,
            (_, FlushPolicy::Interval { .. }) => None,
            _ => Some(Durability::Written),
        };
        let enqueued = self
            .engine
            .append_enqueued(&p.id, records, p.leader_epoch, wait)
            .await;
        let pending = match enqueued {
            Ok(pending) => pending,
            Err(e) => {
                if let Some((t, _)) = ticket {
                    p.producers
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .fail(header.producer_id, t);
                }
                return ready(Outcome::error(index, error_code(&e), e.to_string()));
            }
        };
        // The outcome is recorded by a task of its own: producer state and waiting fetches must
        // learn it even if this response is never awaited (the client's connection went away).
        let p = p.clone();
        let (tx, rx) = futures::channel::oneshot::channel();
        compio::runtime::spawn(async move {
            let result = pending.await;
            let mut producers = p.producers.lock().unwrap_or_else(|e| e.into_inner());
            let outcome = match result {
                Ok(done) => {
                    if let Some((t, done_tx)) = ticket {
                        producers.complete(header.producer_id, t, done.base_offset, done_tx);
                    }
                    Outcome {
                        index,
                        result: Ok((done.base_offset, done.log_start_offset)),
                    }
                }
                Err(e) => {
                    if let Some((t, _)) = ticket {
                        producers.fail(header.producer_id, t);
                    }
                    tracing::warn!(partition = %p.id, error = %e, "append failed");
                    Outcome::error(index, error_code(&e), e.to_string())
                }
            };
            drop(producers);
            p.waiters.wake_all();
            let _ = tx.send(outcome);
        })
        .detach();
        async move {
            rx.await.unwrap_or_else(|_| {
                Outcome::error(
                    index,
                    ResponseError::KafkaStorageError,
                    "the append task was dropped",
                )
            })
        }
        .boxed_local()
    }
}

fn ready(outcome: Outcome) -> LocalBoxFuture<'static, Outcome> {
    Box::pin(std::future::ready(outcome))
}
