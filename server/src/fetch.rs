//! Fetch: read whole batches below the high watermark, within `max.bytes` and each partition's
//! limit (KIP-74: the first batch of the first non-empty partition is returned even if larger),
//! and long-poll until `min.bytes` are there or `max.wait.ms` has passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{join_all, select, select_all, LocalBoxFuture};
use futures::FutureExt;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{FetchRequest, FetchResponse};
use kafka_protocol::ResponseError;
use keel_engine::{PartitionId, ReadOptions, ReadUpper};

use crate::broker::Broker;
use crate::error::error_code;
use crate::metadata::{Partition, Topic};
use crate::metrics::Metrics;

struct Wanted {
    topic: Option<Arc<Topic>>,
    partition: Option<Arc<Partition>>,
    index: i32,
    offset: i64,
    max_bytes: usize,
    leader_epoch: i32,
}

impl Broker {
    pub(crate) async fn fetch(
        self: Arc<Self>,
        request: FetchRequest,
        version: i16,
    ) -> (FetchResponse, Vec<Vec<Vec<Bytes>>>) {
        let mut response = FetchResponse::default();
        // Keel does not keep fetch sessions (KIP-227): it answers with session 0, which tells the
        // client to send full requests. A client asking for an existing session gets told it has none.
        if request.session_id != 0 || request.session_epoch > 0 {
            response.error_code = self.code(ResponseError::FetchSessionIdNotFound);
            return (response, Vec::new());
        }
        let mut wanted = Vec::new();
        let mut names = Vec::new();
        for t in &request.topics {
            let topic = if version >= 13 {
                self.registry.topic_by_id(t.topic_id)
            } else {
                self.registry.topic(t.topic.as_str())
            };
            let mut list = Vec::new();
            for fp in &t.partitions {
                list.push(Wanted {
                    partition: topic
                        .as_ref()
                        .and_then(|t| t.partition(fp.partition).cloned()),
                    topic: topic.clone(),
                    index: fp.partition,
                    offset: fp.fetch_offset,
                    max_bytes: (fp.partition_max_bytes.max(0) as usize)
                        .min(self.config.fetch_max_bytes),
                    leader_epoch: fp.current_leader_epoch,
                });
            }
            names.push(t.topic.clone());
            wanted.push(list);
        }
        // `fetch.max.bytes` caps what one response may carry, whatever the client asks.
        let max_bytes = (request.max_bytes.max(0) as usize).min(self.config.fetch_max_bytes);
        let min_bytes = request.min_bytes.max(0) as usize;
        let deadline = Instant::now() + Duration::from_millis(request.max_wait_ms.max(0) as u64);
        loop {
            // Listen before reading, so a produce completing during the read is not missed.
            let waiters: Vec<_> = wanted
                .iter()
                .flatten()
                .filter_map(|w| w.partition.as_ref().map(|p| p.waiters.register()))
                .collect();
            let reads = join_all(
                wanted
                    .iter()
                    .map(|list| join_all(list.iter().map(|w| self.read_partition(w, version)))),
            )
            .await;
            let mut total = 0usize;
            let mut failed = false;
            let mut hidden = Vec::new();
            let mut topics = Vec::new();
            let mut records = Vec::new();
            for (name, results) in names.iter().zip(reads) {
                let mut partitions = Vec::new();
                let mut topic_records = Vec::new();
                for (data, chunks, lagging) in results {
                    failed |= data.error_code != 0;
                    hidden.extend(lagging);
                    let size: usize = chunks.iter().map(Bytes::len).sum();
                    if total > 0 && total + size > max_bytes {
                        // Over the request's limit: this partition's data waits for the next fetch.
                        topic_records.push(Vec::new());
                    } else {
                        total += size;
                        topic_records.push(chunks);
                    }
                    partitions.push(data);
                }
                records.push(topic_records);
                topics.push(
                    FetchableTopicResponse::default()
                        .with_topic(name.clone())
                        .with_partitions(partitions),
                );
            }
            let now = Instant::now();
            let stopping = self.stopping.load(std::sync::atomic::Ordering::Acquire);
            if total >= min_bytes || failed || now >= deadline || waiters.is_empty() || stopping {
                Metrics::add(&self.metrics.fetch_bytes, total as u64);
                response.responses = topics;
                if version >= 13 {
                    for (t, req) in response.responses.iter_mut().zip(&request.topics) {
                        t.topic_id = req.topic_id;
                    }
                }
                return (response, records);
            }
            // Woken when a produce to one of these partitions completes, or when batches that are
            // there but not yet visible (answered at write time, their fdatasync to come) become
            // durable: the flush tells the engine someone waits for them (it then syncs within
            // `sync_wait_max` even while writes keep coming) and adds no fdatasync of its own.
            let mut timers: Vec<LocalBoxFuture<'_, ()>> = hidden
                .into_iter()
                .map(|id| {
                    let engine = self.engine.clone();
                    async move {
                        // A failed flush (the partition failed or is going away) wakes nobody:
                        // the fetch would re-read and flush again at once, spinning until its
                        // deadline. The append's own completion or the deadline wakes it.
                        if engine.flush(&id).await.is_err() {
                            futures::future::pending::<()>().await;
                        }
                    }
                    .boxed_local()
                })
                .collect();
            timers.push(compio::time::sleep(deadline - now).boxed_local());
            let _ = select(select_all(waiters), select_all(timers)).await;
        }
    }

    /// One partition: its response entry, its record chunks (as the engine returned them), and
    /// its id if it holds batches that become visible once durable.
    async fn read_partition(
        &self,
        w: &Wanted,
        version: i16,
    ) -> (PartitionData, Vec<Bytes>, Option<PartitionId>) {
        let mut data = PartitionData::default()
            .with_partition_index(w.index)
            .with_high_watermark(-1)
            .with_last_stable_offset(-1)
            .with_log_start_offset(-1);
        let (Some(topic), Some(p)) = (&w.topic, &w.partition) else {
            data.error_code = self.code(ResponseError::UnknownTopicOrPartition);
            return (data, Vec::new(), None);
        };
        if let Err(e) = self.check_leader_epoch(p, w.leader_epoch) {
            data.error_code = self.code(e);
            return (data, Vec::new(), None);
        }
        let Ok(offset) = u64::try_from(w.offset) else {
            data.error_code = self.code(ResponseError::OffsetOutOfRange);
            return (data, Vec::new(), None);
        };
        let options = ReadOptions {
            max_bytes: w.max_bytes,
            upper: Broker::visible(topic),
        };
        match self.engine.read(&p.id, offset, options).await {
            Ok(read) => {
                let hw = Broker::high_watermark(topic, read.durable_offset, read.written_offset);
                data.high_watermark = hw as i64;
                data.last_stable_offset = hw as i64;
                if version >= 5 {
                    data.log_start_offset = read.log_start_offset as i64;
                }
                let hidden =
                    Broker::visible(topic) == ReadUpper::Durable && read.log_end_offset > hw;
                (data, read.chunks, hidden.then(|| p.id.clone()))
            }
            Err(e) => {
                let code = error_code(&e);
                if code != ResponseError::OffsetOutOfRange {
                    tracing::warn!(partition = %p.id, error = %e, "fetch failed");
                }
                data.error_code = self.code(code);
                if let Ok(state) = self.engine.partition_state(&p.id).await {
                    let hw = Broker::high_watermark(topic, state.durable.0, state.written.0);
                    data.high_watermark = hw as i64;
                    data.last_stable_offset = hw as i64;
                    if version >= 5 {
                        data.log_start_offset = state.log_start_offset as i64;
                    }
                }
                (data, Vec::new(), None)
            }
        }
    }
}
