//! A shard: one pinned thread, one io_uring (compio runtime), a set of partitions.
//!
//! The loop waits for the first of: an I/O completion, a command, a tick. It then drains every
//! other completion and command that is already there, and only then schedules new I/O, so that
//! one group commit (write + fdatasync) serves every append that arrived meanwhile. Completions
//! are handled one at a time from the in-flight queue; no completion handler runs another.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
// Every event and command looks partitions up by id, many times over: a fast seeded hash, not
// SipHash (which was ~8% of a shard's time at 1000 partitions).
use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use futures::{FutureExt, StreamExt};

use crate::batch::BatchHeader;
use crate::config::{EngineConfig, PartitionConfig};
use crate::constants::{
    cache_check_interval, checkpoint_writes_inflight_max, journal_write_bytes_max,
    journal_writes_inflight_max, shard_opens_inflight_max, shard_tick_ms,
    shard_write_buffers_count,
};
use crate::error::{Error, Result};
use crate::io::aligned::align_up;
use crate::io::{AlignedBuf, BufferPool, Storage, StorageFile};
use crate::journal::{self, Header};
use crate::metrics::{bump, count_error, Metrics};
use crate::offsets::Durability;
use crate::partition::{AppendKind, Event, Inflight, IoCtx, Partition, Reply, Route, Validated};
use crate::read;
use crate::recovery::{open_partition, OpenRequest};
use crate::segment::path;
use crate::{AppendOutcome, PartitionId, PartitionState, ReadOptions, ReadResult, TimestampOffset};

pub(crate) enum Command {
    Open {
        id: PartitionId,
        config: Option<PartitionConfig>,
        /// Journal records of this partition found at start-up (incarnation, batches), oldest first.
        replay: Vec<(u64, Bytes)>,
        reply: Reply<()>,
    },
    /// Start (or restart) this shard's journal once replay is durable: its next records begin at
    /// logical position `start`, the header's sequence number after `seq`.
    StartJournal {
        start: u64,
        seq: u64,
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
        /// Also delete the segments that hold only offsets below this.
        below: Option<u64>,
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

impl Command {
    /// The partition the command is for, if it is for one.
    fn partition(&self) -> Option<&PartitionId> {
        match self {
            Command::Open { id, .. }
            | Command::Append { id, .. }
            | Command::Read { id, .. }
            | Command::OffsetForTimestamp { id, .. }
            | Command::EndOffsetForEpoch { id, .. }
            | Command::TruncateTo { id, .. }
            | Command::Flush { id, .. }
            | Command::Delete { id, .. }
            | Command::State { id, .. }
            | Command::EnforceRetention { id, .. } => Some(id),
            Command::StartJournal { .. }
            | Command::List { .. }
            | Command::Shutdown { .. }
            | Command::Run { .. } => None,
        }
    }
}

/// A partition waiting for a place among the opens in flight.
struct QueuedOpen {
    id: PartitionId,
    config: Option<PartitionConfig>,
    replay: Vec<(u64, Bytes)>,
    reply: Reply<()>,
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
        builder.thread_affinity(std::collections::HashSet::from([index % cores]));
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
        index,
        journal: None,
        journal_candidates: HashSet::new(),
        checkpoint_waiting: HashSet::new(),
        opening: HashMap::new(),
        open_queue: VecDeque::new(),
        opens_inflight: 0,
        checkpoint_writers: HashSet::new(),
        config,
        storage,
        partitions: HashMap::new(),
        instances: 0,
        inflight: Inflight::new(),
        buffers: BufferPool::new(shard_write_buffers_count),
        writes_inflight: 0,
        runways_inflight: 0,
        dirty: HashSet::new(),
        starved: HashSet::new(),
        sync_inflight: false,
        sync_waiting: HashSet::new(),
        metrics,
        shutdown: None,
        last_retention: Instant::now(),
        last_cache_check: Instant::now(),
        appended_since_cache_check: 0,
    };
    runtime.block_on(async move {
        shard.serve(inbox).await;
        // In-flight operations (timers among them) must be dropped inside the runtime.
        drop(shard);
    });
}

/// The shard's journal while it runs: its file and its write pipeline (see `journal/`).
struct ShardJournal {
    file: Rc<dyn StorageFile>,
    pipeline: journal::Pipeline,
    /// The storage's count of failed flushes (`Storage::flush_failures`) when the journal last
    /// had nothing unacknowledged: a write or sync that completes while the count differs
    /// acknowledges nothing (decision 29).
    flush_failures_seen: u64,
    /// Off after a failure, and how far its restart is (decision 31).
    off: Option<JournalOff>,
    /// Times the journal has been turned off since the engine opened; each doubles the wait
    /// before the next restart.
    times_off: u32,
    /// A write waits for room in the ring (a checkpoint, or the writes before a new lap):
    /// `journal_full` counts each wait once, not each pass that finds it still waiting.
    waiting_for_room: bool,
}

/// A journal turned off by a failure, until it starts again.
struct JournalOff {
    since: Instant,
    /// The new header is being written; the storage's count of failed flushes when it was
    /// issued. A flush that fails anywhere before it is synced may drop it (decision 29), and
    /// then the old header stands, whose replay stops at the old run's torn end before it
    /// reaches the new run's records: so the restart counts only if the count has not moved.
    restarting: Option<u64>,
}

struct Shard {
    index: usize,
    journal: Option<ShardJournal>,
    /// Partitions with appends the journal has not looked at yet.
    journal_candidates: HashSet<PartitionId>,
    /// Partitions whose segments the checkpoint in progress waits for.
    checkpoint_waiting: HashSet<PartitionId>,
    /// Partitions being opened (created, or recovered from their files) off the shard's loop,
    /// with the commands for them that arrived meanwhile, handled in order once it is open.
    opening: HashMap<PartitionId, Vec<Command>>,
    /// Opens waiting for one of the `shard_opens_inflight_max` places.
    open_queue: VecDeque<QueuedOpen>,
    opens_inflight: usize,
    /// Those of them still writing what the checkpoint waits for: while any is, syncs due only
    /// for the checkpoint wait to share one sync with theirs (decision 19).
    checkpoint_writers: HashSet<PartitionId>,
    config: Arc<EngineConfig>,
    storage: Rc<dyn Storage>,
    partitions: HashMap<PartitionId, Partition>,
    /// How many partitions this shard has served: the last one's [`Partition::instance`].
    instances: u64,
    inflight: Inflight,
    buffers: BufferPool,
    writes_inflight: usize,
    runways_inflight: usize,
    dirty: HashSet<PartitionId>,
    /// Partitions with a write waiting for a shard-wide resource (a write buffer, a slot of the
    /// writes in flight): scheduled again when a segment write completes, not on every event.
    starved: HashSet<PartitionId>,
    /// A shard-level sync (fdatasync of one partition, or syncfs for several) is in flight.
    sync_inflight: bool,
    /// Partitions due for a sync, waiting for the next one.
    sync_waiting: HashSet<PartitionId>,
    metrics: Arc<Metrics>,
    shutdown: Option<Reply<()>>,
    last_retention: Instant,
    last_cache_check: Instant,
    /// Bytes appended since the cache was last held to its budget.
    appended_since_cache_check: usize,
}

impl Shard {
    async fn serve(&mut self, inbox: flume::Receiver<Command>) {
        let mut ticker = compio::time::interval(Duration::from_millis(shard_tick_ms));
        loop {
            self.schedule();
            if self.shutdown.is_some()
                && self.opening.is_empty()
                && self.partitions.values().all(Partition::is_quiescent)
            {
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
        if self.appended_since_cache_check >= self.config.shard_cache_bytes / 8
            || self.last_cache_check.elapsed() >= cache_check_interval
        {
            self.appended_since_cache_check = 0;
            self.last_cache_check = Instant::now();
            self.enforce_cache_budget();
        }
        self.schedule_journal();
        let checkpoint_writes_max = self.checkpoint_writes_max();
        let recovery_point_bytes = self.config.recovery_point_bytes;
        let Shard {
            storage,
            partitions,
            inflight,
            buffers,
            writes_inflight,
            runways_inflight,
            dirty,
            starved,
            metrics,
            sync_waiting,
            journal_candidates,
            checkpoint_waiting,
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
            checkpoint_writes_max,
            recovery_point_bytes,
        };
        let ids: Vec<PartitionId> = dirty.drain().collect();
        for id in ids {
            if let Some(p) = partitions.get_mut(&id) {
                io.max_batch_bytes = p.config.max_message_bytes;
                if p.schedule(&mut io) {
                    starved.insert(id.clone());
                }
                // Only an event or a command of its own moves a partition's durable offset,
                // and each leaves it dirty: so the checkpoint's wait shrinks here, one
                // partition at a time, never by a scan of every partition on every event.
                if p.checkpoint_reached() {
                    checkpoint_waiting.remove(&id);
                }
                if p.wants_journal() {
                    // After a sync the rest may have become small enough for the journal.
                    journal_candidates.insert(id.clone());
                }
                if p.sync_due() {
                    sync_waiting.insert(id);
                }
            }
        }
        // Partitions may have become candidates (or a checkpoint ready) just now.
        self.schedule_journal();
        let Shard {
            partitions,
            inflight,
            metrics,
            sync_inflight,
            sync_waiting,
            checkpoint_writers,
            writes_inflight,
            ..
        } = self;
        if *sync_inflight || sync_waiting.is_empty() {
            return;
        }
        // A checkpoint forces many partitions' rests out at once; each becomes due for a sync
        // as its write completes. Those due only for the checkpoint wait until the last of its
        // writes is done and share one sync, instead of a syncfs each few of them (while writes
        // are in flight, one of which will end the wait).
        let hold = *writes_inflight > 0
            && loop {
                // Those done writing (or gone) leave the set as they are found.
                let Some(id) = checkpoint_writers.iter().next().cloned() else {
                    break false;
                };
                if partitions
                    .get(&id)
                    .is_some_and(Partition::checkpoint_writing)
                {
                    break true;
                }
                checkpoint_writers.remove(&id);
            };
        let mut held = Vec::new();
        // Group commit across partitions, one sync in flight per shard: partitions that become
        // due meanwhile wait and share the next one. A group of one fdatasyncs its own file; a
        // larger group shares one syncfs, which costs about what one fdatasync does (O_DIRECT
        // leaves no dirty pages: it is one journal commit and one device flush).
        let members: Vec<Route> = sync_waiting
            .drain()
            .filter_map(|id| {
                let p = partitions.get(&id).filter(|p| p.sync_due())?;
                if hold && p.sync_due_only_for_checkpoint() {
                    held.push(id);
                    return None;
                }
                Some(p.route())
            })
            .collect();
        sync_waiting.extend(held);
        let Some(first) = members.first().cloned() else {
            return;
        };
        let mut file = None;
        for member in &members {
            file = Some(
                partitions
                    .get_mut(&member.id)
                    .expect("present")
                    .begin_sync(metrics),
            );
        }
        let file = file.expect("at least one member");
        let group = members.len() > 1;
        if group {
            bump(&metrics.group_syncs, 1);
        }
        bump(&metrics.segment_sync_calls, 1);
        *sync_inflight = true;
        inflight.push(Box::pin(async move {
            let result = if group {
                file.sync_filesystem().await
            } else {
                file.sync_data().await
            };
            (first, Event::GroupSynced { members, result })
        }));
    }

    /// Segment writes in flight beyond which a checkpoint's writes wait (see
    /// `Pipeline::checkpoint_writes_max`).
    fn checkpoint_writes_max(&self) -> usize {
        self.journal
            .as_ref()
            .map_or(checkpoint_writes_inflight_max, |j| {
                j.pipeline.checkpoint_writes_max()
            })
    }

    /// The journal's next I/O: a sync for the writes completed since the last one; a
    /// checkpoint's header once the partitions it waits for are durable (or the start of a
    /// checkpoint when half the ring is in use); and, while a write buffer is free, one write of
    /// every candidate partition's small group.
    fn schedule_journal(&mut self) {
        self.schedule_journal_restart();
        let Some(j) = self.journal.as_mut().filter(|j| !j.pipeline.failed) else {
            return;
        };
        if let Some(upto) = j.pipeline.next_sync() {
            bump(&self.metrics.journal_syncs, 1);
            let file = j.file.clone();
            self.inflight.push(Box::pin(async move {
                let result = file.sync_data().await;
                (journal_route(), Event::JournalSynced { upto, result })
            }));
        }
        self.schedule_checkpoint();
        while self.schedule_journal_write() {}
    }

    fn schedule_checkpoint(&mut self) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let pipeline = &mut j.pipeline;
        let partitions = &mut self.partitions;
        match pipeline.checkpoint_at {
            Some(at) if !pipeline.header_inflight => {
                // The wait shrinks as partitions are scheduled (`schedule`); one that has
                // reached the checkpoint and is not dirty has been seen there.
                debug_assert!(self.checkpoint_waiting.iter().all(|id| {
                    self.dirty.contains(id)
                        || partitions.get(id).is_some_and(|p| !p.checkpoint_reached())
                }));
                if self.checkpoint_waiting.is_empty() {
                    let header = Header {
                        capacity: pipeline.header.capacity,
                        seq: pipeline.header.seq + 1,
                        checkpoint: at,
                    };
                    pipeline.header_inflight = true;
                    bump(&self.metrics.journal_checkpoints, 1);
                    self.inflight
                        .push(Box::pin(write_header(j.file.clone(), header)));
                }
            }
            Some(_) => {}
            None if pipeline.durable_head() - pipeline.header.checkpoint
                >= pipeline.header.capacity / 2 =>
            {
                // Everything before the durable head is durable in the journal: once the
                // segments hold it too, replay may start there.
                pipeline.checkpoint_at = Some(pipeline.durable_head());
                for (id, p) in partitions.iter_mut() {
                    if p.begin_checkpoint() {
                        if p.checkpoint_writing() {
                            self.checkpoint_writers.insert(id.clone());
                        }
                        self.checkpoint_waiting.insert(id.clone());
                        self.dirty.insert(id.clone());
                    }
                }
            }
            None => {}
        }
    }

    /// One journal write of the candidates' small groups, if a buffer is free and the ring has
    /// room. Returns whether candidates are left that another write could take now.
    fn schedule_journal_write(&mut self) -> bool {
        let Some(j) = self.journal.as_mut() else {
            return false;
        };
        if self.journal_candidates.is_empty() {
            return false;
        }
        let Some(mut buf) = j.pipeline.take_buffer() else {
            return false;
        };
        if !j.pipeline.has_room() {
            // Offering every candidate now would only build their entries to drop them: at
            // 1000 partitions, waiting for a checkpoint, ~5% of the shard's time.
            j.wait_for_room(&self.metrics);
            j.pipeline.give_back(buf);
            return false;
        }
        let partitions = &mut self.partitions;
        let mut entries = Vec::new();
        let mut len = 0;
        let mut full = Vec::new();
        let candidates: Vec<PartitionId> = self.journal_candidates.drain().collect();
        for id in candidates {
            let Some(entry) = partitions.get(&id).and_then(Partition::journal_offer) else {
                continue; // nothing small to take: the segment path has it (appends re-add it)
            };
            let entry_len = entry.encoded_len();
            if align_up((len + entry_len) as u64) as usize > buf.capacity() {
                full.push(id);
                continue;
            }
            len += entry_len;
            entries.push(entry);
        }
        self.journal_candidates.extend(full);
        if entries.is_empty() {
            j.pipeline.give_back(buf);
            return false;
        }
        let padded = align_up(len as u64);
        let Some(start) = j.pipeline.place(padded) else {
            // The ring is full until a checkpoint completes, or a new lap waits for the writes
            // before it.
            j.wait_for_room(&self.metrics);
            self.journal_candidates
                .extend(entries.into_iter().map(|e| e.id));
            j.pipeline.give_back(buf);
            return false;
        };
        j.waiting_for_room = false;
        journal::encode_write(start, &entries, &mut buf);
        let members: Vec<(Route, u64)> = entries
            .into_iter()
            .map(|e| {
                let p = partitions
                    .get_mut(&e.id)
                    .expect("offered by a live partition");
                p.journal_taken(e.end_offset);
                (p.route(), e.end_offset)
            })
            .collect();
        let durable = j.pipeline.next_write_durable();
        if durable {
            // Nothing unacknowledged: failures before this write cannot have dropped any of it.
            j.flush_failures_seen = self.storage.flush_failures();
        }
        j.pipeline.begin_write(start, padded, members, durable);
        bump(&self.metrics.journal_writes, 1);
        if durable {
            bump(&self.metrics.journal_durable_writes, 1);
        }
        bump(&self.metrics.journal_bytes, padded);
        let file = j.file.clone();
        let position = journal::HEADER_AREA + start % j.pipeline.header.capacity;
        let end = start + padded;
        self.inflight.push(Box::pin(async move {
            let (result, buf) = if durable {
                file.write_at_durable(position, buf).await
            } else {
                file.write_at(position, buf).await
            };
            (
                journal_route(),
                Event::JournalWritten {
                    end,
                    durable,
                    result,
                    buf,
                },
            )
        }));
        !self.journal_candidates.is_empty()
    }

    fn on_journal_event(&mut self, event: Event) {
        let j = self
            .journal
            .as_mut()
            .expect("journal events come from the journal");
        let metrics = &self.metrics;
        let flush_failures = self.storage.flush_failures();
        // A write or sync that succeeded vouches for nothing if a flush failed anywhere since
        // the journal last had nothing unacknowledged (decision 29); one that failed is such a
        // failure if it flushed.
        let vouched = |result: std::io::Result<()>, flushed: bool| match result {
            Ok(()) if flush_failures != j.flush_failures_seen => Err(std::io::Error::other(
                "a flush failed on this node since these journal writes completed",
            )),
            Ok(()) => Ok(()),
            Err(e) => {
                if flushed && !crate::error::is_full(&e) {
                    bump(&metrics.flush_failures, 1);
                }
                Err(e)
            }
        };
        let result = match event {
            Event::JournalWritten {
                end,
                durable,
                result,
                buf,
            } => {
                let result = vouched(result, durable);
                j.pipeline.give_back(buf);
                if result.is_ok() {
                    for (route, offset) in j.pipeline.on_written(end) {
                        let live = self.partitions.get_mut(&route.id);
                        if let Some(p) = live.filter(|p| route.reaches(p)) {
                            p.on_journaled(offset, true);
                            self.dirty.insert(route.id);
                        }
                    }
                }
                result
            }
            Event::JournalSynced { upto, result } => {
                let result = vouched(result, true);
                if result.is_ok() {
                    for (route, offset) in j.pipeline.on_synced(upto) {
                        let live = self.partitions.get_mut(&route.id);
                        if let Some(p) = live.filter(|p| route.reaches(p)) {
                            p.on_journaled(offset, true);
                            self.dirty.insert(route.id);
                        }
                    }
                } else {
                    j.pipeline.on_sync_failed(upto);
                }
                result
            }
            Event::JournalHeader { header, result } => {
                if result.as_ref().is_err_and(|e| !crate::error::is_full(e)) {
                    bump(&metrics.flush_failures, 1); // its write and sync, either may have failed
                }
                if j.off.as_ref().is_some_and(|off| off.restarting.is_some()) {
                    self.on_journal_restarted(header, result);
                    return;
                }
                j.pipeline.header_inflight = false;
                if result.is_ok() {
                    j.pipeline.header = header;
                    if j.pipeline.checkpoint_at == Some(header.checkpoint) {
                        j.pipeline.checkpoint_at = None;
                        self.checkpoint_writers.clear();
                        for p in self.partitions.values_mut() {
                            p.end_checkpoint();
                        }
                    }
                }
                result
            }
            _ => unreachable!("not a journal event"),
        };
        if let Err(error) = result {
            self.journal_off(error);
        }
    }

    /// A syncfs failed: the file system's flush, so every file's unflushed writes may be gone,
    /// not only its members' (ARCHITECTURE.md, decision 27). The journal's records not yet
    /// acknowledged go the way of a failed journal sync, and every other partition with
    /// segment writes not yet durable rolls back to its durable point.
    fn on_filesystem_flush_failed(&mut self, members: &[Route], error: &std::io::Error) {
        self.journal_off(std::io::Error::new(error.kind(), error.to_string()));
        let others: Vec<PartitionId> = self
            .partitions
            .iter()
            .filter(|(id, p)| !members.iter().any(|m| &m.id == *id && m.reaches(p)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in others {
            let error = std::io::Error::new(error.kind(), error.to_string());
            self.on_event((Route::current(id), Event::FlushLost { error }));
        }
    }

    /// Start a journal that a failure turned off again, once its wait is over and every I/O of
    /// its failed run is back: when every partition's segment is durable up to what the old run
    /// made durable (partitions sync their own segments while it is off, so that comes by
    /// itself), write a header whose checkpoint is past every record written before. Replay then
    /// never reaches an old record, and the journal takes small groups again (decision 31).
    fn schedule_journal_restart(&mut self) {
        let Some(j) = self.journal.as_ref() else {
            return;
        };
        let Some(off) = &j.off else {
            return;
        };
        // Every I/O of the failed run is back, so no late completion meets the new one.
        if off.restarting.is_some()
            || !j.pipeline.idle()
            || off.since.elapsed() < restart_wait(self.config.journal_restart_after, j.times_off)
            || self
                .partitions
                .values()
                .any(|p| !p.journal_durable_in_segment())
        {
            return;
        }
        let j = self.journal.as_mut().expect("checked");
        let header = Header {
            capacity: j.pipeline.header.capacity,
            seq: j.pipeline.header.seq + 1,
            checkpoint: j.pipeline.head(),
        };
        j.off.as_mut().expect("checked").restarting = Some(self.storage.flush_failures());
        self.inflight
            .push(Box::pin(write_header(j.file.clone(), header)));
    }

    /// The restart's header is written (and synced), or failed: the journal runs again from
    /// it, or stays off for a longer wait.
    fn on_journal_restarted(&mut self, header: Header, result: std::io::Result<()>) {
        let j = self.journal.as_mut().expect("a restart is the journal's");
        let seen = j
            .off
            .as_ref()
            .and_then(|off| off.restarting)
            .expect("restarting");
        let result = result.and_then(|()| {
            if self.storage.flush_failures() == seen {
                Ok(())
            } else {
                Err(std::io::Error::other(
                    "a flush failed on this node while the journal's new header was written",
                ))
            }
        });
        if let Err(error) = result {
            bump(&self.metrics.io_errors, 1);
            let restart_in = j.turn_off(self.config.journal_restart_after);
            tracing::warn!(shard = self.index, path = %j.file.path().display(), %error,
                restart_in_s = restart_in.as_secs_f64(), "the journal's restart failed");
            return;
        }
        j.pipeline.restart(header);
        // Nothing is unacknowledged: failures before the header cannot drop a record to come.
        j.flush_failures_seen = seen;
        j.off = None;
        bump(&self.metrics.journal_restarts, 1);
        tracing::info!(shard = self.index, path = %j.file.path().display(),
            checkpoint = header.checkpoint, "the journal started again");
        for (id, p) in self.partitions.iter_mut() {
            p.set_journaled(true);
            self.dirty.insert(id.clone());
            self.journal_candidates.insert(id.clone());
        }
    }

    /// A journal write or sync failed (or a flush that covered it): the journal is off until
    /// it starts again (`schedule_journal_restart`).
    fn journal_off(&mut self, error: std::io::Error) {
        let Some(j) = self.journal.as_mut().filter(|j| !j.pipeline.failed) else {
            return; // no journal, or a late completion of a journal already off
        };
        // Unacknowledged records may or may not be on disk; what the journal made durable stays
        // durable. From here on every partition syncs its own segment, and truncations and
        // rollbacks retire old records with a new incarnation as always.
        for (route, offset) in j.pipeline.fail() {
            if let Some(p) = self
                .partitions
                .get_mut(&route.id)
                .filter(|p| route.reaches(p))
            {
                p.on_journaled(offset, false);
            }
        }
        bump(&self.metrics.io_errors, 1);
        let restart_in = j.turn_off(self.config.journal_restart_after);
        tracing::error!(shard = self.index, path = %j.file.path().display(), %error,
            restart_in_s = restart_in.as_secs_f64(),
            "journal I/O (or a file system flush) failed; the journal is off, partitions sync their own segments until it starts again");
        self.journal_candidates.clear();
        self.checkpoint_waiting.clear();
        self.checkpoint_writers.clear();
        for (id, p) in self.partitions.iter_mut() {
            p.set_journaled(false);
            p.end_checkpoint();
            self.dirty.insert(id.clone());
        }
    }

    fn on_event(&mut self, (route, event): (Route, Event)) {
        if event.is_journal() {
            self.on_journal_event(event);
            return;
        }
        if let Event::Opened {
            result,
            replay,
            reply,
        } = event
        {
            self.on_opened(route.id, result, replay, reply);
            return;
        }
        if matches!(event, Event::Written { .. } | Event::RunwayWritten { .. }) {
            // A write buffer and a slot of the shard's writes in flight come free.
            self.dirty.extend(self.starved.drain());
        }
        if let Event::GroupSynced { members, result } = event {
            self.sync_inflight = false;
            if let Err(error) = &result {
                if !crate::error::is_full(error) {
                    bump(&self.metrics.flush_failures, 1);
                }
                self.on_filesystem_flush_failed(&members, error);
            }
            for member in members {
                let result = match &result {
                    Ok(()) => Ok(()),
                    Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                };
                self.on_event((member, Event::Synced { result }));
            }
            return;
        }
        let checkpoint_writes_max = self.checkpoint_writes_max();
        let recovery_point_bytes = self.config.recovery_point_bytes;
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
        match partitions.get_mut(&route.id).filter(|p| route.reaches(p)) {
            Some(p) => {
                let mut io = IoCtx {
                    storage,
                    inflight,
                    buffers,
                    writes_inflight,
                    runways_inflight,
                    metrics,
                    max_batch_bytes: p.config.max_message_bytes,
                    checkpoint_writes_max,
                    recovery_point_bytes,
                };
                p.on_event(event, &mut io);
                dirty.insert(route.id);
            }
            None => {
                // The partition was deleted while this was in flight (and perhaps created
                // again: another instance): only give resources back.
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
                    event if event.is_journal() => unreachable!("handled above"),
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
            Command::StartJournal { start, seq, reply } => {
                let result = self.start_journal(start, seq).await;
                let _ = reply.send(result);
            }
            command => self.dispatch(command),
        }
    }

    /// Every command but `StartJournal`: none waits for I/O on the shard's loop.
    fn dispatch(&mut self, command: Command) {
        if let Some(id) = command
            .partition()
            .filter(|id| self.opening.contains_key(*id))
            .cloned()
        {
            self.opening.get_mut(&id).expect("checked").push(command);
            return;
        }
        match command {
            Command::Open {
                id,
                config,
                replay,
                reply,
            } => self.open(QueuedOpen {
                id,
                config,
                replay,
                reply,
            }),
            Command::StartJournal { .. } => unreachable!("on_command handles it"),
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
                self.appended_since_cache_check += bytes.len();
                match self.partitions.get_mut(&id) {
                    Some(p) => {
                        p.append(bytes, kind, wait, reply, &self.metrics);
                        if self.journal.is_some() {
                            self.journal_candidates.insert(id.clone());
                        }
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
            Command::EnforceRetention { id, below, reply } => {
                let result = match self.partitions.contains_key(&id) {
                    true => Ok(self.enforce_retention(&id, below)),
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
                        // A clean shutdown leaves every segment durable, with nothing to replay.
                        let (tx, _rx) = futures::channel::oneshot::channel();
                        p.begin_shutdown(tx);
                    }
                    self.dirty.insert(id);
                }
            }
        }
    }

    /// Open (create, or recover from its files) a partition. The files' I/O runs among the
    /// shard's other I/O, not on its loop: creating a topic or recovering a large log does not
    /// stall the partitions already serving (ARCHITECTURE.md, decision 20). Commands for the
    /// partition wait in `opening` until it is open.
    fn open(&mut self, open: QueuedOpen) {
        if let Some(existing) = self.partitions.get(&open.id) {
            let result = match open.config {
                Some(c) if c != existing.config => Err(Error::InvalidConfig(format!(
                    "partition {} exists with a different configuration",
                    open.id
                ))),
                _ => Ok(()),
            };
            let _ = open.reply.send(result);
            return;
        }
        self.opening.entry(open.id.clone()).or_default();
        if self.opens_inflight >= shard_opens_inflight_max {
            self.open_queue.push_back(open);
            return;
        }
        self.opens_inflight += 1;
        let storage = self.storage.clone();
        let data_dir = self.config.data_dir.clone();
        let mode = self.config.recovery;
        let metrics = self.metrics.clone();
        self.inflight.push(Box::pin(async move {
            let QueuedOpen {
                id,
                config,
                replay,
                reply,
            } = open;
            let result = open_partition(OpenRequest {
                storage: &storage,
                data_dir: &data_dir,
                id: &id,
                config,
                mode,
                journal: &replay,
                metrics: &metrics,
            })
            .await
            .map(Box::new);
            (
                Route::current(id),
                Event::Opened {
                    result,
                    replay,
                    reply,
                },
            )
        }));
    }

    /// A partition's files are open: replay what the journal holds for it, serve it, and handle
    /// the commands that waited for it.
    fn on_opened(
        &mut self,
        id: PartitionId,
        result: Result<Box<Partition>>,
        replay: Vec<(u64, Bytes)>,
        reply: Reply<()>,
    ) {
        self.opens_inflight -= 1;
        let result = result.and_then(|partition| {
            let mut partition = *partition;
            self.instances += 1;
            partition.instance = self.instances;
            if !replay.is_empty() {
                self.replay(&mut partition, replay)?;
            }
            partition.set_journaled(self.journal.as_ref().is_some_and(|j| !j.pipeline.failed));
            self.partitions.insert(id.clone(), partition);
            self.dirty.insert(id.clone());
            Ok(())
        });
        let _ = reply.send(result);
        for command in self.opening.remove(&id).unwrap_or_default() {
            self.dispatch(command);
        }
        while self.opens_inflight < shard_opens_inflight_max {
            let Some(next) = self.open_queue.pop_front() else {
                break;
            };
            // Its entry in `opening` (and the commands waiting in it) stays.
            self.open(next);
        }
    }

    /// Append what the journal holds past the recovered log's end (records of the partition's
    /// current incarnation only, in journal order). The engine then flushes the partition before
    /// the journal is reused.
    fn replay(&mut self, p: &mut Partition, records: Vec<(u64, Bytes)>) -> Result<()> {
        let journal_dir = self.config.data_dir.join(path::JOURNAL_DIR);
        let mut replayed = 0;
        for (incarnation, bytes) in records {
            if incarnation != p.incarnation {
                continue;
            }
            let outcome = match past_log_end(&bytes, p.offsets.appended().0) {
                Ok(None) => continue,
                Ok(Some(rest)) => append_at_once(p, rest, &self.metrics),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(()) => replayed += 1,
                Err(e) => {
                    let reason =
                        format!("journal record of {} does not continue its log: {e}", p.id);
                    if self.config.recovery == crate::RecoveryMode::Strict {
                        return Err(Error::Corruption {
                            file: journal_dir,
                            position: 0,
                            reason: format!(
                                "{reason}. Refusing to open (recovery mode truncate-tail skips it)"
                            ),
                        });
                    }
                    tracing::warn!(partition = %p.id, %reason, "journal replay stopped");
                    break;
                }
            }
        }
        if replayed > 0 {
            bump(&self.metrics.journal_replayed, replayed);
            tracing::info!(partition = %p.id, records = replayed, "replayed from the journal");
        }
        Ok(())
    }

    /// Open (creating it if needed) this shard's journal file and write its first header: the
    /// records of the last run were replayed and are durable in their segments.
    async fn start_journal(&mut self, start: u64, seq: u64) -> Result<()> {
        let capacity = self.config.journal_bytes;
        if capacity == 0 {
            return Ok(());
        }
        let dir = self.config.data_dir.join(path::JOURNAL_DIR);
        self.storage
            .create_dir_all(&dir)
            .map_err(|e| Error::io("create", &dir, e))?;
        let path = dir.join(format!("{}.journal", self.index));
        let file = self
            .storage
            .open(&path, true)
            .await
            .map_err(|e| Error::io("open", &path, e))?;
        let len = journal::HEADER_AREA + capacity;
        let mut start = start;
        if file.file_len().map_err(|e| Error::io("stat", &path, e))? != len {
            // New, or made with another capacity: start over from an empty ring.
            file.set_len(0)
                .await
                .map_err(|e| Error::io("truncate", &path, e))?;
            file.allocate(len)
                .await
                .map_err(|e| Error::io("fallocate", &path, e))?;
            start = 0;
        }
        let header = Header {
            capacity,
            seq: seq + 1,
            checkpoint: start,
        };
        let (result, _) = header_io(file.clone(), header).await;
        result
            .and(file.sync_all().await)
            .map_err(|e| Error::io("write", &path, e))?;
        self.storage
            .sync_dir(&dir)
            .await
            .map_err(|e| Error::io("fsync", &dir, e))?;
        let buffers = (0..journal_writes_inflight_max)
            .map(|_| AlignedBuf::new(journal_write_bytes_max))
            .collect();
        self.journal = Some(ShardJournal {
            file,
            pipeline: journal::Pipeline::new(header, buffers),
            flush_failures_seen: self.storage.flush_failures(),
            off: None,
            times_off: 0,
            waiting_for_room: false,
        });
        for p in self.partitions.values_mut() {
            p.set_journaled(true);
        }
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
            (Route::current(id), Event::Detached)
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
            (Route::current(id), Event::Detached)
        }));
    }

    /// Deleting a partition needs nothing from the journal: a recreated partition gets a new
    /// incarnation, so the old one's records never replay into it.
    fn delete(&mut self, id: &PartitionId) -> Result<()> {
        let mut p = self
            .partitions
            .remove(id)
            .ok_or_else(|| Error::UnknownPartition(id.clone()))?;
        self.checkpoint_waiting.remove(id);
        p.close(&Error::UnknownPartition(id.clone()));
        self.storage
            .remove_dir_all(&p.dir)
            .map_err(|e| Error::io("remove", &p.dir, e))
    }

    fn on_tick(&mut self) {
        // Interval flushes come due with time alone.
        for (id, p) in &self.partitions {
            if p.offsets.written().0 > p.offsets.durable().0 || p.rewrite_waiting() {
                self.dirty.insert(id.clone());
            }
        }
        if self.last_retention.elapsed() >= self.config.retention_check_interval {
            self.last_retention = Instant::now();
            let ids: Vec<_> = self.partitions.keys().cloned().collect();
            for id in ids {
                self.enforce_retention(&id, None);
            }
        }
    }

    /// Keep the batches cached by all of the shard's partitions within `shard_cache_bytes`,
    /// evicting the oldest first whichever partition holds them: a hot partition keeps a long
    /// tail for its readers while idle ones give theirs up. (Checked every `cache_check_interval`
    /// and every eighth of the budget appended, so it overshoots by at most about that.)
    fn enforce_cache_budget(&mut self) {
        let budget = self.config.shard_cache_bytes;
        let mut total: usize = self.partitions.values().map(Partition::cached_bytes).sum();
        if total <= budget {
            return;
        }
        let mut partitions: Vec<&mut Partition> = self.partitions.values_mut().collect();
        let mut oldest: BinaryHeap<Reverse<(Instant, usize)>> = partitions
            .iter()
            .enumerate()
            .filter_map(|(i, p)| Some(Reverse((p.oldest_evictable()?, i))))
            .collect();
        while total > budget {
            let Some(Reverse((_, i))) = oldest.pop() else {
                return; // the rest is not durable yet
            };
            let p = &mut partitions[i];
            total -= p.evict_oldest().expect("listed as evictable");
            if let Some(next) = p.oldest_evictable() {
                oldest.push(Reverse((next, i)));
            }
        }
    }

    fn enforce_retention(&mut self, id: &PartitionId, below: Option<u64>) -> usize {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let Some(p) = self.partitions.get_mut(id) else {
            return 0;
        };
        let expired = p.expire_segments(now_ms, below);
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
    /// A partition's marker is written only if the files it vouches for were. A full disk does
    /// not fail the shutdown: the logs are durable, and a partition without its marker is
    /// scanned at the next start instead. The files go in two batches
    /// ([`Storage::write_files_durable`]: two file-system syncs each, not two fsyncs a file):
    /// every partition's indexes and leader-epoch file, then the markers of the partitions
    /// whose files all landed (ARCHITECTURE.md, decisions 35 and 38).
    async fn finish_shutdown(&mut self) {
        let mut closing = Vec::new();
        let mut files = Vec::new();
        for p in self.partitions.values() {
            if !p.rollback_settled() {
                // The disk refused a rollback: its files may hold batches past the log's end,
                // which a marker would leave in place under the next appends. Scanned instead.
                tracing::warn!(partition = %p.id,
                    "a rollback is not on disk at shutdown: the partition's log will be scanned at the next start");
                continue;
            }
            let (metadata, marker) = p.shutdown_metadata();
            files.extend(metadata.into_iter().map(|file| (closing.len(), file)));
            closing.push(Closing {
                id: p.id.clone(),
                marker: (p.dir.join(path::CLEAN_SHUTDOWN_FILE), marker.encode()),
                failed: Vec::new(),
            });
        }
        write_owned(self.storage.as_ref(), files, &mut closing).await;
        let markers = closing
            .iter()
            .enumerate()
            .filter(|(_, c)| c.failed.is_empty())
            .map(|(i, c)| (i, c.marker.clone()))
            .collect();
        write_owned(self.storage.as_ref(), markers, &mut closing).await;
        let mut result = Ok(());
        for c in closing {
            for (path, e) in c.failed {
                result = result.and(shutdown_write_failed(&self.metrics, &c.id, &path, e));
            }
        }
        if let Some(reply) = self.shutdown.take() {
            let _ = reply.send(result);
        }
    }
}

/// A partition a clean shutdown writes the files of: its marker, and the files that failed.
struct Closing {
    id: PartitionId,
    marker: (PathBuf, Vec<u8>),
    failed: Vec<(PathBuf, std::io::Error)>,
}

/// Write `files` in one batch, each owned by `closing[i]`; a failure is noted with its owner.
async fn write_owned(
    storage: &dyn Storage,
    files: Vec<(usize, (PathBuf, Vec<u8>))>,
    closing: &mut [Closing],
) {
    let (owners, files): (Vec<_>, Vec<_>) = files
        .into_iter()
        .map(|(owner, (path, bytes))| ((owner, path.clone()), (path, bytes)))
        .unzip();
    let results = storage.write_files_durable(files).await;
    for ((owner, path), result) in owners.into_iter().zip(results) {
        if let Err(e) = result {
            closing[owner].failed.push((path, e));
        }
    }
}

/// A file of a clean shutdown could not be written: counted, and an error for the shutdown
/// unless the disk is full (then the logs are durable and the next start scans them).
fn shutdown_write_failed(
    metrics: &Metrics,
    id: &PartitionId,
    path: &std::path::Path,
    e: std::io::Error,
) -> Result<()> {
    let error = Error::io("write", path, e);
    count_error(metrics, &error);
    if !matches!(error, Error::Full { .. }) {
        return Err(error);
    }
    tracing::warn!(partition = %id, %error,
        "disk full at shutdown: the partition's log will be scanned at the next start");
    Ok(())
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

/// Write a journal header into its slot and fdatasync.
async fn header_io(file: Rc<dyn StorageFile>, header: Header) -> (std::io::Result<()>, ()) {
    let mut buf = AlignedBuf::new(crate::constants::block_bytes);
    buf.extend_from_slice(&header.encode());
    buf.set_len(crate::constants::block_bytes);
    let (mut result, _) = file.write_at(header.slot_position(), buf).await;
    if result.is_ok() {
        result = file.sync_data().await;
    }
    (result, ())
}

/// How long a journal turned off for the `times_off`-th time waits before it starts again:
/// `base`, doubling each time, at most 64 times `base`.
fn restart_wait(base: Duration, times_off: u32) -> Duration {
    base * (1u32 << times_off.saturating_sub(1).min(6))
}

impl ShardJournal {
    /// A write found no room: the start of a wait is counted, its later passes are not.
    fn wait_for_room(&mut self, metrics: &Metrics) {
        if !self.waiting_for_room {
            self.waiting_for_room = true;
            bump(&metrics.journal_full, 1);
        }
    }

    /// Off once more, from now (a failure, or a restart that did not take): returns the wait
    /// before it may start again, `base` doubled for each earlier time.
    fn turn_off(&mut self, base: Duration) -> Duration {
        self.times_off += 1;
        self.waiting_for_room = false;
        self.off = Some(JournalOff {
            since: Instant::now(),
            restarting: None,
        });
        restart_wait(base, self.times_off)
    }
}

async fn write_header(file: Rc<dyn StorageFile>, header: Header) -> (Route, Event) {
    let (result, ()) = header_io(file, header).await;
    (journal_route(), Event::JournalHeader { header, result })
}

/// Shard-level events still travel with a route; a journal's is never looked up.
fn journal_route() -> Route {
    Route::current(PartitionId::new(".journal", 0))
}

/// Append replayed batches to `p`, waiting for nothing (they complete when placed in memory; the
/// engine flushes the partition after replay).
fn append_at_once(p: &mut Partition, rest: Validated, metrics: &Metrics) -> Result<()> {
    let (tx, mut rx) = futures::channel::oneshot::channel();
    p.append(
        rest,
        AppendKind::Replica,
        Some(Durability::Appended),
        tx,
        metrics,
    );
    match rx.try_recv() {
        Ok(Some(outcome)) => outcome.map(|_| ()),
        _ => unreachable!("an append waiting for nothing completes at once"),
    }
}

/// The batches of a journal record that lie past the log's `end` (those below it the segment
/// already holds), checked as a replica's would be; `None` if it holds nothing new. The record's
/// CRC held, but its bytes are checked like any others: a header claiming more bytes than the
/// record has is an error, not a slice past its end.
fn past_log_end(bytes: &Bytes, end: u64) -> Result<Option<Validated>> {
    let mut at = 0;
    while at < bytes.len() {
        let h = BatchHeader::parse(&bytes[at..])?;
        if h.next_offset() > end || at + h.size_bytes > bytes.len() {
            break;
        }
        at += h.size_bytes;
    }
    if at == bytes.len() {
        return Ok(None);
    }
    Validated::check(bytes.slice(at..), AppendKind::Replica).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchBuilder;

    fn at(offset: u64) -> Vec<u8> {
        BatchBuilder {
            base_offset: offset,
            ..Default::default()
        }
        .build(b"record")
    }

    #[test]
    fn replay_skips_what_the_log_holds_and_refuses_a_batch_longer_than_its_record() {
        let mut two = at(4);
        two.extend(at(5));
        let two = Bytes::from(two);
        assert!(past_log_end(&two, 6).unwrap().is_none());
        assert_eq!(past_log_end(&two, 5).unwrap().unwrap().len(), two.len() / 2);
        assert_eq!(past_log_end(&two, 0).unwrap().unwrap().len(), two.len());
        // A header below the log end that claims more bytes than the record holds (found by
        // the journal fuzz target: replay sliced past the record's end and panicked).
        let mut long = at(4);
        let claimed = (long.len() + 100 - 12) as i32;
        long[8..12].copy_from_slice(&claimed.to_be_bytes());
        assert!(past_log_end(&Bytes::from(long), 10).is_err());
    }
}
