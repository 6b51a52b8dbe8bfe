//! A shard: one pinned thread, one io_uring (compio runtime), a set of partitions.
//!
//! The loop waits for the first of: an I/O completion, a command, a tick. It then drains every
//! other completion and command that is already there, and only then schedules new I/O, so that
//! one group commit (write + fdatasync) serves every append that arrived meanwhile. Completions
//! are handled one at a time from the in-flight queue; no completion handler runs another.

use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::{FutureExt, StreamExt};

use crate::batch::BatchHeader;
use crate::config::{EngineConfig, PartitionConfig};
use crate::constants::{shard_tick_ms, shard_write_buffers_count};
use crate::error::{Error, Result};
use crate::io::{BufferPool, Storage};
use crate::metrics::{bump, Metrics};
use crate::offsets::Durability;
use crate::partition::{AppendKind, Event, Inflight, IoCtx, Partition, Reply, Validated};
use crate::read;
use crate::recovery::{open_partition, OpenRequest};
use crate::segment::path;
use crate::{AppendOutcome, PartitionId, PartitionState, ReadOptions, ReadResult, TimestampOffset};

pub(crate) enum Command {
    Open {
        id: PartitionId,
        config: Option<PartitionConfig>,
        reply: Reply<()>,
    },
    Append {
        id: PartitionId,
        bytes: Validated,
        kind: AppendKind,
        wait: Option<Durability>,
        reply: Reply<AppendOutcome>,
    },
    Read {
        id: PartitionId,
        offset: u64,
        options: ReadOptions,
        reply: Reply<ReadResult>,
    },
    OffsetForTimestamp {
        id: PartitionId,
        timestamp: i64,
        reply: Reply<Option<TimestampOffset>>,
    },
    EndOffsetForEpoch {
        id: PartitionId,
        epoch: i32,
        reply: Reply<Option<(i32, u64)>>,
    },
    TruncateTo {
        id: PartitionId,
        offset: u64,
        reply: Reply<()>,
    },
    Flush {
        id: PartitionId,
        reply: Reply<AppendOutcome>,
    },
    Delete {
        id: PartitionId,
        reply: Reply<()>,
    },
    State {
        id: PartitionId,
        reply: Reply<PartitionState>,
    },
    EnforceRetention {
        id: PartitionId,
        reply: Reply<usize>,
    },
    List {
        reply: Reply<Vec<PartitionId>>,
    },
    Shutdown {
        reply: Reply<()>,
    },
    /// Run an embedder's closure on this shard's thread, inside its runtime.
    Run {
        task: Box<dyn FnOnce() + Send>,
    },
}

/// Start-up of a shard thread: build the runtime (pinned), then serve commands until shutdown or
/// until every handle is gone.
pub(crate) fn run(
    index: usize,
    config: Arc<EngineConfig>,
    metrics: Arc<Metrics>,
    inbox: flume::Receiver<Command>,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let _drain = DrainOnExit(inbox.clone());
    let mut builder = compio::runtime::RuntimeBuilder::new();
    if config.pin_threads {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        builder.thread_affinity(HashSet::from([index % cores]));
    }
    let runtime = match builder
        .build()
        .and_then(|rt| config.backend.storage().map(|s| (rt, s)))
    {
        Ok(pair) => pair,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (runtime, storage) = runtime;
    let _ = ready.send(Ok(()));
    let mut shard = Shard {
        config,
        storage,
        partitions: HashMap::new(),
        inflight: Inflight::new(),
        buffers: BufferPool::new(shard_write_buffers_count),
        writes_inflight: 0,
        runways_inflight: 0,
        dirty: HashSet::new(),
        sync_inflight: false,
        sync_waiting: HashSet::new(),
        metrics,
        shutdown: None,
        last_retention: Instant::now(),
    };
    runtime.block_on(async move {
        shard.serve(inbox).await;
        // In-flight operations (timers among them) must be dropped inside the runtime.
        drop(shard);
    });
}

struct Shard {
    config: Arc<EngineConfig>,
    storage: Rc<dyn Storage>,
    partitions: HashMap<PartitionId, Partition>,
    inflight: Inflight,
    buffers: BufferPool,
    writes_inflight: usize,
    runways_inflight: usize,
    dirty: HashSet<PartitionId>,
    /// A shard-level sync (fdatasync of one partition, or syncfs for several) is in flight.
    sync_inflight: bool,
    /// Partitions due for a sync, waiting for the next one.
    sync_waiting: HashSet<PartitionId>,
    metrics: Arc<Metrics>,
    shutdown: Option<Reply<()>>,
    last_retention: Instant,
}

impl Shard {
    async fn serve(&mut self, inbox: flume::Receiver<Command>) {
        let mut ticker = compio::time::interval(Duration::from_millis(shard_tick_ms));
        loop {
            self.schedule();
            if self.shutdown.is_some() && self.partitions.values().all(Partition::is_quiescent) {
                self.finish_shutdown().await;
                return;
            }
            futures::select_biased! {
                done = self.inflight.select_next_some() => self.on_event(done),
                // Not `recv_async()` directly: flume reports that future as terminated once the
                // channel is disconnected, and select! would then never see the disconnection.
                command = async { inbox.recv_async().await }.fuse() => match command {
                    Ok(command) => self.on_command(command).await,
                    Err(_) => return, // every handle dropped: stop without a clean-shutdown marker
                },
                _ = ticker.tick().fuse() => self.on_tick(),
            }
            while let Some(Some(done)) = self.inflight.next().now_or_never() {
                self.on_event(done);
            }
            while let Ok(command) = inbox.try_recv() {
                self.on_command(command).await;
            }
        }
    }

    fn schedule(&mut self) {
        let Shard {
            storage,
            partitions,
            inflight,
            buffers,
            writes_inflight,
            runways_inflight,
            dirty,
            metrics,
            sync_inflight,
            sync_waiting,
            ..
        } = self;
        let mut io = IoCtx {
            storage,
            inflight,
            buffers,
            writes_inflight,
            runways_inflight,
            metrics,
            max_batch_bytes: 0,
        };
        let ids: Vec<PartitionId> = dirty.drain().collect();
        for id in ids {
            if let Some(p) = partitions.get_mut(&id) {
                io.max_batch_bytes = p.config.max_message_bytes;
                if p.schedule(&mut io) {
                    dirty.insert(id.clone());
                }
                if p.sync_due() {
                    sync_waiting.insert(id);
                }
            }
        }
        if *sync_inflight || sync_waiting.is_empty() {
            return;
        }
        // Group commit across partitions, one sync in flight per shard: partitions that become
        // due meanwhile wait and share the next one. A group of one fdatasyncs its own file; a
        // larger group shares one syncfs, which costs about what one fdatasync does (O_DIRECT
        // leaves no dirty pages: it is one journal commit and one device flush).
        let members: Vec<PartitionId> = sync_waiting
            .drain()
            .filter(|id| partitions.get(id).is_some_and(Partition::sync_due))
            .collect();
        let Some(first) = members.first().cloned() else {
            return;
        };
        let mut file = None;
        for id in &members {
            file = Some(
                partitions
                    .get_mut(id)
                    .expect("present")
                    .begin_sync(io.metrics),
            );
        }
        let file = file.expect("at least one member");
        let group = members.len() > 1;
        if group {
            bump(&io.metrics.group_syncs, 1);
        }
        *sync_inflight = true;
        io.inflight.push(Box::pin(async move {
            let result = if group {
                file.sync_filesystem().await
            } else {
                file.sync_data().await
            };
            (first, Event::GroupSynced { members, result })
        }));
    }

    fn on_event(&mut self, (id, event): (PartitionId, Event)) {
        if let Event::GroupSynced { members, result } = event {
            self.sync_inflight = false;
            for member in members {
                let result = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                self.on_event((member, Event::Synced { result }));
            }
            return;
        }
        let Shard {
            storage,
            partitions,
            inflight,
            buffers,
            writes_inflight,
            runways_inflight,
            dirty,
            metrics,
            ..
        } = self;
        match partitions.get_mut(&id) {
            Some(p) => {
                let mut io = IoCtx {
                    storage,
                    inflight,
                    buffers,
                    writes_inflight,
                    runways_inflight,
                    metrics,
                    max_batch_bytes: p.config.max_message_bytes,
                };
                p.on_event(event, &mut io);
                dirty.insert(id);
            }
            None => {
                // The partition was deleted while this was in flight: only give resources back.
                match event {
                    Event::Written { buf, .. } => {
                        buffers.give_back(buf);
                        *writes_inflight -= 1;
                    }
                    Event::RunwayWritten { buf, .. } => {
                        buffers.give_back(buf);
                        *writes_inflight -= 1;
                        *runways_inflight -= 1;
                    }
                    _ => {}
                }
            }
        }
    }

    fn partition(&mut self, id: &PartitionId) -> Result<&mut Partition> {
        self.partitions
            .get_mut(id)
            .ok_or_else(|| Error::UnknownPartition(id.clone()))
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Open { id, config, reply } => {
                let result = self.open(id, config).await;
                let _ = reply.send(result);
            }
            Command::Append {
                id,
                bytes,
                kind,
                wait,
                reply,
            } => {
                if self.shutdown.is_some() {
                    let _ = reply.send(Err(Error::ShuttingDown));
                    return;
                }
                bump(&self.metrics.append_bytes, bytes.len() as u64);
                match self.partitions.get_mut(&id) {
                    Some(p) => {
                        p.append(bytes, kind, wait, reply, &self.metrics);
                        self.dirty.insert(id);
                    }
                    None => {
                        let _ = reply.send(Err(Error::UnknownPartition(id)));
                    }
                }
            }
            Command::Read {
                id,
                offset,
                options,
                reply,
            } => self.read(id, offset, options, reply),
            Command::OffsetForTimestamp {
                id,
                timestamp,
                reply,
            } => self.offset_for_timestamp(id, timestamp, reply),
            Command::EndOffsetForEpoch { id, epoch, reply } => {
                let result = self
                    .partition(&id)
                    .map(|p| p.epochs.end_offset_for(epoch, p.offsets.appended().0));
                let _ = reply.send(result);
            }
            Command::TruncateTo { id, offset, reply } => match self.partition(&id) {
                Ok(p) => {
                    p.truncate_to(offset, reply);
                    self.dirty.insert(id);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Flush { id, reply } => match self.partition(&id) {
                Ok(p) => {
                    p.flush(reply);
                    self.dirty.insert(id);
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Command::Delete { id, reply } => {
                let _ = reply.send(self.delete(&id));
            }
            Command::State { id, reply } => {
                let _ = reply.send(self.partition(&id).map(|p| p.state()));
            }
            Command::EnforceRetention { id, reply } => {
                let result = match self.partitions.contains_key(&id) {
                    true => Ok(self.enforce_retention(&id)),
                    false => Err(Error::UnknownPartition(id)),
                };
                let _ = reply.send(result);
            }
            Command::List { reply } => {
                let mut ids: Vec<_> = self.partitions.keys().cloned().collect();
                ids.sort();
                let _ = reply.send(Ok(ids));
            }
            Command::Run { task } => task(),
            Command::Shutdown { reply } => {
                self.shutdown = Some(reply);
                let ids: Vec<_> = self.partitions.keys().cloned().collect();
                for id in ids {
                    if let Some(p) = self.partitions.get_mut(&id) {
                        let (tx, _rx) = futures::channel::oneshot::channel();
                        p.flush(tx);
                    }
                    self.dirty.insert(id);
                }
            }
        }
    }

    async fn open(&mut self, id: PartitionId, config: Option<PartitionConfig>) -> Result<()> {
        if let Some(existing) = self.partitions.get(&id) {
            return match config {
                Some(c) if c != existing.config => Err(Error::InvalidConfig(format!(
                    "partition {id} exists with a different configuration"
                ))),
                _ => Ok(()),
            };
        }
        let partition = open_partition(OpenRequest {
            storage: &self.storage,
            data_dir: &self.config.data_dir,
            id: &id,
            config,
            mode: self.config.recovery,
        })
        .await?;
        self.partitions.insert(id.clone(), partition);
        self.dirty.insert(id);
        Ok(())
    }

    fn read(
        &mut self,
        id: PartitionId,
        offset: u64,
        options: ReadOptions,
        reply: Reply<ReadResult>,
    ) {
        bump(&self.metrics.reads, 1);
        let disk = match self.partition(&id).and_then(|p| p.read(offset, options)) {
            Ok(Ok(result)) => {
                bump(&self.metrics.reads_from_memory, 1);
                let _ = reply.send(Ok(result));
                return;
            }
            Ok(Err(disk)) => disk,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let max_batch = self.partitions[&id].config.max_message_bytes;
        let storage = self.storage.clone();
        let metrics = self.metrics.clone();
        self.inflight.push(Box::pin(async move {
            let result = read::fetch(disk, storage, &metrics, max_batch).await;
            let _ = reply.send(result);
            (id, Event::Detached)
        }));
    }

    fn offset_for_timestamp(
        &mut self,
        id: PartitionId,
        timestamp: i64,
        reply: Reply<Option<TimestampOffset>>,
    ) {
        let p = match self.partition(&id) {
            Ok(p) => p,
            Err(e) => {
                let _ = reply.send(Err(e));
                return;
            }
        };
        let Some(search) = p.timestamp_search(timestamp) else {
            let _ = reply.send(Ok(None));
            return;
        };
        // The part of the segment still only in memory, in case the disk part has no match.
        let from_memory = p
            .tail_headers_from(search.offset)
            .into_iter()
            .find(|h: &BatchHeader| h.max_timestamp >= timestamp)
            .map(|h| TimestampOffset {
                offset: h.base_offset,
                timestamp: h.max_timestamp,
            });
        let max_batch = p.config.max_message_bytes;
        let storage = self.storage.clone();
        let metrics = self.metrics.clone();
        self.inflight.push(Box::pin(async move {
            let result = read::find_timestamp(&search, storage, &metrics, max_batch, timestamp)
                .await
                .map(|found| found.or(from_memory));
            let _ = reply.send(result);
            (id, Event::Detached)
        }));
    }

    fn delete(&mut self, id: &PartitionId) -> Result<()> {
        let mut p = self
            .partitions
            .remove(id)
            .ok_or_else(|| Error::UnknownPartition(id.clone()))?;
        p.close(&Error::UnknownPartition(id.clone()));
        self.storage
            .remove_dir_all(&p.dir)
            .map_err(|e| Error::io("remove", &p.dir, e))
    }

    fn on_tick(&mut self) {
        // Interval flushes come due with time alone.
        for (id, p) in &self.partitions {
            if p.offsets.written().0 > p.offsets.durable().0 {
                self.dirty.insert(id.clone());
            }
        }
        if self.last_retention.elapsed() >= self.config.retention_check_interval {
            self.last_retention = Instant::now();
            let ids: Vec<_> = self.partitions.keys().cloned().collect();
            for id in ids {
                self.enforce_retention(&id);
            }
        }
    }

    fn enforce_retention(&mut self, id: &PartitionId) -> usize {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let Some(p) = self.partitions.get_mut(id) else {
            return 0;
        };
        let expired = p.expire_segments(now_ms);
        for segment in &expired {
            for path in [
                segment.log_path.clone(),
                segment.index_path(),
                segment.time_index_path(),
            ] {
                if let Err(error) = self.storage.remove_file(&path) {
                    bump(&self.metrics.io_errors, 1);
                    tracing::warn!(path = %path.display(), %error, "could not delete an expired segment file");
                }
            }
            bump(&self.metrics.segments_deleted, 1);
        }
        if !expired.is_empty() {
            self.dirty.insert(id.clone());
        }
        expired.len()
    }

    /// Everything is durable: persist indexes and the clean-shutdown marker of every partition.
    async fn finish_shutdown(&mut self) {
        let mut result = Ok(());
        for p in self.partitions.values() {
            let (files, marker) = p.shutdown_metadata();
            for (path, bytes) in files {
                if let Err(e) = self.storage.write_file_durable(&path, bytes).await {
                    result = Err(Error::io("write", &path, e));
                }
            }
            let path = p.dir.join(path::CLEAN_SHUTDOWN_FILE);
            if let Err(e) = self
                .storage
                .write_file_durable(&path, marker.encode())
                .await
            {
                result = Err(Error::io("write", &path, e));
            }
        }
        if let Some(reply) = self.shutdown.take() {
            let _ = reply.send(result);
        }
    }
}

/// However the shard thread ends (shutdown, every handle dropped, or a panic), drop the commands
/// still queued: flume keeps them while senders live, and their callers would wait forever.
/// Dropping a command drops its reply sender, so each caller gets `Error::ShuttingDown`.
struct DrainOnExit(flume::Receiver<Command>);

impl Drop for DrainOnExit {
    fn drop(&mut self) {
        while let Ok(command) = self.0.try_recv() {
            drop(command);
        }
    }
}
