//! One partition's log on its shard: appends, the write pipeline, group commit, rolls, truncation.
//!
//! Everything here runs on the owning shard's thread and never blocks: I/O is submitted as futures
//! into the shard's in-flight set, and their completions come back as [`Event`]s through
//! [`Partition::on_event`]. [`Partition::schedule`] decides what to submit next.
//!
//! The pipeline, for the active segment:
//!
//! ```text
//!   tail: [ written, cached ............ | copied, in flight ...... | not yet copied .... ]
//!           ^ tail front                  ^ Written                  ^ copy cursor         ^ Appended
//! ```
//!
//! * An append validates, assigns offsets, and pushes its batches (the caller's bytes, not a copy)
//!   onto `tail`.
//! * A write copies the next bytes into an aligned buffer from the shard's pool, starting with the
//!   partial block the previous write ended in (the "carry"), so every write is block-aligned and
//!   the partial tail block is rewritten by the next write.
//! * Up to `partition_writes_inflight_max` writes run at once, and no two writes of one block are
//!   ever in flight together (they may reach the device in either order): a write whose carried
//!   block an earlier write is still writing sends its later blocks at once and queues that
//!   block's piece until the earlier write completes.
//! * `written` advances over the contiguous prefix of completed writes; one fdatasync then covers
//!   every write completed before it was issued, and `durable` moves to what `written` was then.
//! * Written batches stay in `tail` as a read cache while it is within `cache_bytes` and the
//!   shard's cache (which evicts the oldest batches of all its partitions first); what is not
//!   durable in the segment always stays.

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;
use futures::stream::FuturesUnordered;

use crate::batch::{self, BatchHeader, OffsetCheck};
use crate::config::{FlushPolicy, PartitionConfig};
use crate::constants::*;
use crate::epochs::LeaderEpochCache;
use crate::error::{Error, Result};
use crate::io::aligned::{align_down, align_up};
use crate::io::{AlignedBuf, BufferPool, IoFuture, Storage, StorageFile};
use crate::journal;
use crate::metrics::{bump, count_error, Metrics};
use crate::offsets::{Appended, Durability, Durable, OffsetTracker, Written};
use crate::read::{self, DiskRead};
use crate::segment::{path, Segment};
use crate::{AppendOutcome, PartitionId, PartitionState, ReadOptions, ReadResult, ReadUpper};

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;
pub(crate) type Inflight = FuturesUnordered<IoFuture<(Route, Event)>>;

/// Whom an I/O completion is for: a partition by id and instance, or the shard itself. A
/// partition deleted and created again under the same id is another instance (the shard numbers
/// them), so a completion of the old one's I/O — a write, a sync, a control operation, a journal
/// record — never reaches the new one, whose writes, syncs and durable points it would
/// otherwise claim as its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Route {
    pub id: PartitionId,
    /// The partition's [`Partition::instance`]; 0 for the shard's own completions and for
    /// events that concern whichever partition has the id now.
    pub instance: u64,
}

impl Route {
    pub fn current(id: PartitionId) -> Route {
        Route { id, instance: 0 }
    }

    /// Is this completion for `p` (and not for an earlier partition of the same id)?
    pub fn reaches(&self, p: &Partition) -> bool {
        self.instance == 0 || self.instance == p.instance
    }
}

/// What an append is: a producer's batches (offsets assigned here) or a replica's copy of its
/// leader's batches (offsets kept).
#[derive(Clone, Copy, Debug)]
pub(crate) enum AppendKind {
    Leader { leader_epoch: i32 },
    Replica,
}

/// A completed I/O operation, handed back to its partition.
pub(crate) enum Event {
    Written {
        serial: u64,
        result: io::Result<()>,
        buf: AlignedBuf,
    },
    Synced {
        result: io::Result<()>,
    },
    /// A syncfs this partition was not part of failed: the file system's flush, so this
    /// partition's unflushed segment writes may be gone too (ARCHITECTURE.md, decision 27).
    FlushLost {
        error: io::Error,
    },
    /// A zero write that extended the runway (see [`Partition::schedule_runway`]) finished.
    RunwayWritten {
        result: io::Result<()>,
        buf: AlignedBuf,
    },
    Control(Result<ControlDone>),
    /// The leader-epoch checkpoint file was written (or not): it goes beside the data path,
    /// not as a control operation (ARCHITECTURE.md, decision 34).
    EpochsWritten(Result<()>),
    /// The active segment's indexes and a recovery point at this position in it were written
    /// (or not), beside the data path (decision 39).
    RecoveryPointWritten(Result<u64>),
    /// One syncfs made every member's written data durable (the shard hands each a `Synced`).
    GroupSynced {
        members: Vec<Route>,
        result: io::Result<()>,
    },
    /// A self-contained task (a disk read) finished and answered its caller itself.
    Detached,
    /// A shard journal write (ending at logical position `end`) completed or failed.
    JournalWritten {
        end: u64,
        /// Issued with `RWF_DSYNC`.
        durable: bool,
        result: io::Result<()>,
        buf: AlignedBuf,
    },
    /// The shard journal's fdatasync for its writes up to `upto` completed or failed.
    JournalSynced {
        upto: u64,
        result: io::Result<()>,
    },
    /// A journal header (a checkpoint, or the first one) is on disk, or failed.
    JournalHeader {
        header: journal::Header,
        result: io::Result<()>,
    },
    /// A partition's files are open (created, or recovered), or could not be.
    Opened {
        result: Result<Box<Partition>>,
        /// Journal records of this partition found at start-up, to replay into it.
        replay: Vec<(u64, Bytes)>,
        reply: Reply<()>,
    },
}

impl Event {
    /// An event of the shard journal, not of a partition.
    pub fn is_journal(&self) -> bool {
        matches!(
            self,
            Event::JournalWritten { .. }
                | Event::JournalSynced { .. }
                | Event::JournalHeader { .. }
        )
    }
}

pub(crate) enum ControlDone {
    /// `short`: the disk was full, so the new segment got no preallocation.
    Rolled {
        file: Rc<dyn StorageFile>,
        allocated: u64,
        short: bool,
        durable: u64,
    },
    /// `short`: the disk was full, so only what the write needed was allocated.
    Allocated {
        len: u64,
        short: bool,
    },
    CarryLoaded {
        bytes: Vec<u8>,
    },
    /// The log was cut on disk to the in-memory state (after truncation or a failure).
    Cut {
        file: Rc<dyn StorageFile>,
        allocated: u64,
    },
    /// Where the truncation point lies on disk: the first batch ending after the requested offset.
    Located {
        position: u64,
        base_offset: u64,
    },
    /// A new incarnation is on disk (before a truncation, or after a rollback).
    IncarnationWritten {
        incarnation: u64,
    },
}

/// The shard's resources a partition borrows while scheduling.
pub(crate) struct IoCtx<'a> {
    pub storage: &'a Rc<dyn Storage>,
    pub inflight: &'a mut Inflight,
    pub buffers: &'a mut BufferPool,
    pub writes_inflight: &'a mut usize,
    /// Zero writes in flight on the shard (a subset of `writes_inflight`).
    pub runways_inflight: &'a mut usize,
    pub metrics: &'a Metrics,
    pub max_batch_bytes: usize,
    /// Segment writes in flight on the shard beyond which a checkpoint's writes wait (the
    /// journal's `checkpoint_writes_max`).
    pub checkpoint_writes_max: usize,
    /// `EngineConfig::recovery_point_bytes`.
    pub recovery_point_bytes: u64,
}

impl IoCtx<'_> {
    fn submit(&mut self, route: Route, future: impl std::future::Future<Output = Event> + 'static) {
        self.inflight
            .push(Box::pin(async move { (route, future.await) }));
    }
}

/// Producer or replica bytes that passed [`batch::validate_all`]: only [`Validated::check`] makes
/// one, so the shard that owns the partition trusts them without re-reading every byte. The
/// check (CRC-32C over every byte) runs on the caller's thread, not on the owning shard.
pub(crate) struct Validated {
    bytes: Bytes,
    headers: Vec<BatchHeader>,
}

impl Validated {
    pub fn check(bytes: Bytes, kind: AppendKind) -> Result<Validated> {
        let check = match kind {
            AppendKind::Leader { .. } => OffsetCheck::Dense,
            AppendKind::Replica => OffsetCheck::Sparse,
        };
        let headers = batch::validate_all(&bytes, check)?;
        Ok(Validated { bytes, headers })
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }
}

/// A batch in the in-memory tail of the log.
struct TailBatch {
    base_offset: u64,
    next_offset: u64,
    segment: u64,
    position: u64,
    bytes: Bytes,
    /// When it was appended: the shard's cache evicts the oldest batches of all its partitions.
    appended_at: Instant,
}

struct InflightWrite {
    serial: u64,
    /// File position of this write's first byte (block-aligned).
    position: u64,
    /// File position after the last meaningful byte of this write.
    end_position: u64,
    /// The offset after the last batch this write completes.
    end_offset: u64,
    /// More than one block: counts against `partition_writes_inflight_max` (the carried block and
    /// a partial last block go out as small writes of their own, see `start_write`).
    large: bool,
    /// Issued durable by itself (`RWF_DSYNC`, see `start_write`): durable once done, if every
    /// write before it is.
    durable: bool,
    done: bool,
    failed: bool,
    /// Not yet submitted: a carried block completed with the next bytes, waiting until the
    /// earlier write of that block is done (two writes of one block in flight may reach the
    /// device in either order). See `start_write`.
    deferred: Option<AlignedBuf>,
}

struct Waiter {
    end_offset: u64,
    outcome: AppendOutcome,
    reply: Reply<AppendOutcome>,
    /// A `flush` (someone waits to see the data durable), not an append.
    flush: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum CarryState {
    Ready,
    NeedsLoad,
    Loading,
}

/// A write or fdatasync failed: stop accepting appends, let in-flight I/O finish, then roll the log
/// back to the last point known good on disk.
struct Failure {
    error: Error,
    /// A failed fdatasync leaves written-but-unsynced data in doubt: roll back to `durable`.
    back_to_durable: bool,
    /// The rollback point is being located on disk; appends stay refused until it is applied.
    rolling_back: bool,
}

struct PendingTruncate {
    offset: u64,
    reply: Reply<()>,
}

/// What opening a partition found on disk (`recovery::open_partition`).
pub(crate) struct RecoveredLog {
    pub segments: BTreeMap<u64, Segment>,
    pub epochs: LeaderEpochCache,
    /// The leader-epoch file holds exactly `epochs`.
    pub epochs_stored: bool,
    pub incarnation: u64,
    /// Where the recovery point on disk lies in the active segment, if inside it.
    pub recovery_point_at: u64,
}

pub(crate) struct Partition {
    pub id: PartitionId,
    /// Which partition of this id this is, numbered by its shard from 1 (see [`Route`]).
    pub instance: u64,
    pub dir: PathBuf,
    pub config: PartitionConfig,
    pub segments: BTreeMap<u64, Segment>,
    pub offsets: OffsetTracker,
    pub log_start_offset: u64,
    pub epochs: LeaderEpochCache,
    tail: VecDeque<TailBatch>,
    tail_bytes: usize,
    copy_index: usize,
    copy_offset: usize,
    /// End offset of the last batch fully copied into a write buffer.
    copied_offset: u64,
    write_segment: u64,
    next_write_position: u64,
    /// Positions in the write segment that `written` and `durable` correspond to.
    written_position: u64,
    durable_position: u64,
    /// The storage's count of failed flushes (`Storage::flush_failures`) when this partition
    /// last had nothing written that was not durable: a sync that completes while the count
    /// differs does not vouch for the writes (one of those failures may have dropped them), and
    /// the log goes back to its durable point (decision 29).
    flush_failures_seen: u64,
    carry: Box<[u8; block_bytes]>,
    carry_len: usize,
    carry_state: CarryState,
    writes: VecDeque<InflightWrite>,
    write_serial: u64,
    /// The (offset, position) an fdatasync in flight will make durable.
    sync_inflight: Option<(u64, u64)>,
    control_busy: bool,
    written_waiters: VecDeque<Waiter>,
    durable_waiters: VecDeque<Waiter>,
    /// Flushes whose data is durable, waiting for the leader-epoch checkpoint file being
    /// written (or about to be): a caller's flush covers the partition's metadata too.
    epoch_waiters: VecDeque<Waiter>,
    /// How many of `durable_waiters` are flushes.
    flush_waiters: usize,
    failure: Option<Failure>,
    truncate: Option<PendingTruncate>,
    /// A truncation that has been applied in memory and waits for its cut on disk.
    truncate_reply: Option<Reply<()>>,
    /// The leader-epoch checkpoint file is behind the cache in memory. Not dirty and not being
    /// written (`epochs_inflight`) means the file holds exactly the cache: a failed write, or a
    /// failed roll or cut that would have written it, sets it again.
    epochs_dirty: bool,
    /// The leader-epoch checkpoint file is being written (`persist_epochs`).
    epochs_inflight: bool,
    /// A clean shutdown is making everything durable (`begin_shutdown`).
    closing: bool,
    /// A failed write of the leader-epoch file is tried again after this.
    epochs_retry_at: Option<Instant>,
    /// Position in the write segment of the recovery point on disk (`recovery-point`), 0 when
    /// it is at the segment's start: a crash rescans the segment from there
    /// (`persist_recovery_point`, ARCHITECTURE.md decision 39).
    recovery_point_at: u64,
    /// The active segment's indexes and a recovery point inside it are being written.
    recovery_point_inflight: bool,
    /// A failed write of them is tried again after this.
    recovery_point_retry_at: Option<Instant>,
    /// The in-memory log was truncated; the file must be cut to match before anything else.
    cut_pending: bool,
    last_sync: Instant,
    bytes_since_sync: u64,
    /// When written data last started waiting for an fdatasync (none since the last one began).
    unsynced_since: Option<Instant>,
    /// Position in the write segment up to which every block is known to be written (data or the
    /// runway's zeros): writes below it overwrite laid-out blocks.
    zeroed_end: u64,
    /// The range a zero write in flight covers; data writes stay below its start.
    runway_inflight: Option<(u64, u64)>,
    /// A zero write failed on this segment: no more runway until the next one.
    runway_off: bool,
    /// The allocated length at which an allocation ahead was last tried: on a full disk it is
    /// tried once per length, not at every scheduling.
    ahead_tried_at: Option<u64>,
    /// Bytes the last completed sync made durable (the size of the last group commit).
    last_group_bytes: u64,
    /// Appends (and flushes) the last group commit answered.
    last_group_waiters: usize,
    pub deleted: bool,
    // --- The shard journal (ARCHITECTURE.md, decision 10) ---
    /// Written in every journal record of this partition; see [`path::INCARNATION_FILE`].
    pub incarnation: u64,
    /// The shard's journal takes this partition's small groups (set by the shard).
    journaled: bool,
    /// The journal has taken data of this partition since the engine opened: truncations and
    /// rollbacks then change the incarnation first.
    journal_used: bool,
    /// End of the data handed to the journal (a journal write may be in flight up to it).
    journal_offset: u64,
    /// Everything below this is durable: in the segment, or through completed journal writes.
    journal_durable: u64,
    /// A shard checkpoint waits for the segment to be durable up to here.
    checkpoint_target: Option<u64>,
    /// After a rollback the journal stays off for this partition until its segment holds
    /// everything the journal made durable and a new incarnation is on disk.
    journal_blocked: bool,
    /// A new incarnation was written for the truncation that waits.
    incarnation_fresh: bool,
    /// After a rollback that kept journaled batches, they are written again from this moment
    /// (a full disk would otherwise fail the same writes in a tight loop).
    rewrite_at: Option<Instant>,
    /// A control operation (a cut, a roll, a file write) failed: the rollback and cut after it
    /// wait until then, so a full disk is retried every `rewrite_backoff`, not in a tight loop.
    retry_at: Option<Instant>,
    /// Appends a rollback removed whose bytes may have reached the disk (a segment or journal
    /// write took them), with their error: answered once the rollback is on disk
    /// (`rollback_settled`), so an error means the batch is not in the log and will not come
    /// back after a crash. ARCHITECTURE.md, decision 23. Flushes wait here too, failed or
    /// (`None`) answered: neither may be answered while a crash could still bring the removed
    /// batches back (decision 41).
    rolled_back: Vec<(Waiter, Option<Error>)>,
    /// Failures since `rolled_back` last emptied (see `rollback_answer_attempts`).
    rollback_failures: u32,
    /// End of the batches a segment or journal write has taken: past it nothing of the log's
    /// can be on disk (as of the last settled rollback).
    exposed_end: u64,
}

impl Partition {
    /// A partition whose on-disk state `recovery` has established: every segment's size and
    /// indexes are known, the active segment's file is open and everything in it is durable.
    pub fn recovered(
        id: PartitionId,
        dir: PathBuf,
        config: PartitionConfig,
        log: RecoveredLog,
    ) -> Partition {
        let RecoveredLog {
            segments,
            epochs,
            epochs_stored,
            incarnation,
            recovery_point_at,
        } = log;
        let (&active_base, active) = segments.last_key_value().expect("a log has a segment");
        let log_end = active.next_offset;
        let log_start = *segments.keys().next().expect("a log has a segment");
        let size = active.size;
        let carry_state = if size % block_bytes as u64 == 0 {
            CarryState::Ready
        } else {
            CarryState::NeedsLoad
        };
        Partition {
            id,
            instance: 0,
            dir,
            config,
            segments,
            offsets: OffsetTracker::recovered(log_end),
            log_start_offset: log_start,
            epochs,
            tail: VecDeque::new(),
            tail_bytes: 0,
            copy_index: 0,
            copy_offset: 0,
            copied_offset: log_end,
            write_segment: active_base,
            next_write_position: size,
            written_position: size,
            durable_position: size,
            flush_failures_seen: 0,
            carry: Box::new([0; block_bytes]),
            carry_len: 0,
            carry_state,
            writes: VecDeque::new(),
            write_serial: 0,
            sync_inflight: None,
            control_busy: false,
            written_waiters: VecDeque::new(),
            durable_waiters: VecDeque::new(),
            epoch_waiters: VecDeque::new(),
            flush_waiters: 0,
            failure: None,
            truncate: None,
            truncate_reply: None,
            // Written soon, beside the data path, if the file is behind what the scan rebuilt.
            epochs_dirty: !epochs_stored,
            epochs_inflight: false,
            closing: false,
            epochs_retry_at: None,
            recovery_point_at,
            recovery_point_inflight: false,
            recovery_point_retry_at: None,
            cut_pending: false,
            last_sync: Instant::now(),
            bytes_since_sync: 0,
            unsynced_since: None,
            // Past the log's end the file holds zeros, but whether as written blocks or as
            // unwritten extents is not known: assume the latter.
            zeroed_end: align_up(size),
            runway_inflight: None,
            runway_off: false,
            ahead_tried_at: None,
            last_group_bytes: 0,
            last_group_waiters: 0,
            deleted: false,
            incarnation,
            journaled: false,
            journal_used: false,
            journal_offset: log_end,
            journal_durable: log_end,
            checkpoint_target: None,
            journal_blocked: false,
            incarnation_fresh: false,
            rewrite_at: None,
            retry_at: None,
            rolled_back: Vec::new(),
            rollback_failures: 0,
            exposed_end: log_end,
        }
    }

    /// Where this partition's I/O completions go.
    pub fn route(&self) -> Route {
        Route {
            id: self.id.clone(),
            instance: self.instance,
        }
    }

    /// Durable in the segment or through the journal.
    pub fn durable_end(&self) -> u64 {
        self.offsets.durable().0.max(self.journal_durable)
    }

    /// Written to the segment, or durable through the journal.
    fn written_end(&self) -> u64 {
        self.offsets.written().0.max(self.journal_durable)
    }

    pub fn state(&self) -> PartitionState {
        PartitionState {
            log_start_offset: self.log_start_offset,
            appended: self.offsets.appended(),
            written: Written(self.written_end()),
            durable: Durable(self.durable_end()),
            size_bytes: self.segments.values().map(|s| s.size).sum(),
            segments: self.segments.len(),
            latest_epoch: self.epochs.latest_epoch(),
            config: self.config.clone(),
        }
    }

    fn default_wait(&self) -> Durability {
        match self.config.flush {
            FlushPolicy::EveryBatch => Durability::Durable,
            FlushPolicy::Interval { .. } => Durability::Written,
        }
    }

    /// True when no I/O of this partition is in flight.
    pub fn is_idle(&self) -> bool {
        self.journal_offset == self.journal_durable
            && self.writes.iter().all(|w| w.done)
            && self.sync_inflight.is_none()
            && !self.control_busy
            && !self.epochs_inflight
            && !self.recovery_point_inflight
            && self.runway_inflight.is_none()
    }

    /// Everything appended is durable and nothing is in flight.
    pub fn is_quiescent(&self) -> bool {
        self.is_idle()
            && self.offsets.durable().0 == self.offsets.appended().0
            && self.truncate.is_none()
            && self.rolled_back.is_empty()
    }

    /// No rollback waits to reach the disk: no failure to roll back, no cut pending or in flight,
    /// and (after a rollback of a journaled partition) the journal's records past the log retired
    /// by a new incarnation. Until then the files may hold batches past the log's end.
    pub fn rollback_settled(&self) -> bool {
        self.failure.is_none() && !self.cut_pending && !self.control_busy && !self.journal_blocked
    }

    // ---------------------------------------------------------------------------------------------
    // Appends

    pub fn append(
        &mut self,
        bytes: Validated,
        kind: AppendKind,
        wait: Option<Durability>,
        reply: Reply<AppendOutcome>,
        metrics: &Metrics,
    ) {
        match self.accept(bytes, kind) {
            Ok(outcome) => {
                bump(&metrics.appends, 1);
                let waiter = Waiter {
                    end_offset: outcome.last_offset + 1,
                    outcome,
                    reply,
                    flush: false,
                };
                match wait.unwrap_or_else(|| self.default_wait()) {
                    Durability::Appended => {
                        complete(waiter, Durability::Appended, self.log_start_offset)
                    }
                    Durability::Written => self.written_waiters.push_back(waiter),
                    Durability::Durable => self.durable_waiters.push_back(waiter),
                }
                self.complete_waiters();
            }
            Err(e) => {
                if matches!(e, Error::InvalidBatch(_) | Error::BatchTooLarge { .. }) {
                    bump(&metrics.appends_rejected, 1);
                }
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Validate and place the batches; on any error nothing has changed.
    fn accept(&mut self, validated: Validated, kind: AppendKind) -> Result<AppendOutcome> {
        if let Some(failure) = &self.failure {
            return Err(failure.error.duplicate());
        }
        if self.deleted {
            return Err(Error::UnknownPartition(self.id.clone()));
        }
        let Validated { bytes, headers } = validated;
        if let Some(h) = headers
            .iter()
            .find(|h| h.size_bytes > self.config.max_message_bytes)
        {
            return Err(Error::BatchTooLarge {
                size: h.size_bytes,
                max: self.config.max_message_bytes,
            });
        }
        let log_end = self.offsets.appended().0;
        let latest_epoch = self.epochs.latest_epoch();
        match kind {
            AppendKind::Leader { leader_epoch } => {
                if latest_epoch.is_some_and(|latest| leader_epoch < latest) {
                    return Err(Error::StaleLeaderEpoch {
                        got: leader_epoch,
                        latest: latest_epoch.unwrap_or(-1),
                    });
                }
            }
            AppendKind::Replica => {
                let mut expected = log_end;
                for h in &headers {
                    if h.base_offset < expected {
                        return Err(Error::NonContiguousOffset {
                            expected,
                            got: h.base_offset,
                        });
                    }
                    expected = h.next_offset();
                }
                if headers[0].base_offset != log_end {
                    return Err(Error::NonContiguousOffset {
                        expected: log_end,
                        got: headers[0].base_offset,
                    });
                }
            }
        }

        // Accepted: from here on nothing fails.
        let (bytes, placed) = match kind {
            AppendKind::Leader { leader_epoch } => {
                let mut buf = into_mut(bytes);
                let (mut start, mut next) = (0, log_end);
                let mut placed = headers;
                for h in &mut placed {
                    let region = &mut buf[start..start + h.size_bytes];
                    batch::set_base_offset(region, next);
                    batch::set_partition_leader_epoch(region, leader_epoch);
                    h.base_offset = next;
                    h.partition_leader_epoch = leader_epoch;
                    start += h.size_bytes;
                    next = h.next_offset();
                }
                if self.epochs.assign(leader_epoch, log_end) {
                    self.epochs_dirty = true;
                }
                (buf.freeze(), placed)
            }
            AppendKind::Replica => {
                for h in &headers {
                    if self.epochs.assign(h.partition_leader_epoch, h.base_offset) {
                        self.epochs_dirty = true;
                    }
                }
                (bytes, headers)
            }
        };
        let mut start = 0;
        for h in &placed {
            self.place(h, bytes.slice(start..start + h.size_bytes));
            start += h.size_bytes;
        }
        let last = placed
            .last()
            .expect("validate_all returns at least one batch");
        self.offsets.advance_appended(Appended(last.next_offset()));
        Ok(AppendOutcome {
            base_offset: placed[0].base_offset,
            last_offset: last.last_offset(),
            durability: Durability::Appended,
            log_start_offset: self.log_start_offset,
        })
    }

    /// Put one batch at the end of the log, rolling to a new segment first if it is due.
    fn place(&mut self, h: &BatchHeader, bytes: Bytes) {
        let active = self
            .segments
            .values()
            .next_back()
            .expect("a log has a segment");
        let full = active.size + h.size_bytes as u64 > self.config.segment_bytes;
        let old = self
            .config
            .segment_ms
            .is_some_and(|ms| active.created.elapsed().as_millis() as u64 >= ms);
        if !active.is_empty() && (full || old) {
            let log_path = path::segment_file(&self.dir, h.base_offset, path::LOG_SUFFIX);
            self.segments
                .insert(h.base_offset, Segment::new(h.base_offset, log_path));
        }
        let (&segment, active) = self
            .segments
            .iter_mut()
            .next_back()
            .expect("a log has a segment");
        let position = active.size;
        active.on_batch(h, position);
        self.tail_bytes += bytes.len();
        self.tail.push_back(TailBatch {
            base_offset: h.base_offset,
            next_offset: h.next_offset(),
            segment,
            position,
            bytes,
            appended_at: Instant::now(),
        });
    }

    fn complete_waiters(&mut self) {
        let written = self.written_end();
        let durable = self.durable_end();
        let log_start = self.log_start_offset;
        while self
            .written_waiters
            .front()
            .is_some_and(|w| w.end_offset <= written)
        {
            let w = self.written_waiters.pop_front().expect("checked");
            let level = if w.end_offset <= durable {
                Durability::Durable
            } else {
                Durability::Written
            };
            complete(w, level, log_start);
        }
        let mut completed = 0;
        while self
            .durable_waiters
            .front()
            .is_some_and(|w| w.end_offset <= durable)
        {
            let w = self.durable_waiters.pop_front().expect("checked");
            tracing::trace!(target: "keel::durability", partition = %self.id,
                end = w.end_offset, "acknowledged durable");
            self.flush_waiters -= usize::from(w.flush);
            completed += 1;
            self.complete_durable(w);
        }
        if completed > 0 {
            self.last_group_waiters = completed;
        }
        if !self.epochs_pending() {
            for w in self.epoch_waiters.drain(..) {
                complete(w, Durability::Durable, log_start);
            }
        }
        if !self.rolled_back.is_empty() && self.rollback_settled() {
            self.answer_rolled_back();
        }
    }

    /// Answer a waiter whose data is durable; a flush also waits for a rollback that removed
    /// batches from the files to reach the disk (`rolled_back`), and for the leader-epoch file,
    /// if it is behind memory (`epoch_waiters`).
    fn complete_durable(&mut self, w: Waiter) {
        if w.flush && self.removed_batches_on_disk() {
            self.rolled_back.push((w, None));
        } else {
            self.complete_after_epochs(w);
        }
    }

    /// Answer a durable waiter, a flush only once the leader-epoch file is not behind memory.
    fn complete_after_epochs(&mut self, w: Waiter) {
        if w.flush && self.epochs_pending() {
            self.epoch_waiters.push_back(w);
        } else {
            complete(w, Durability::Durable, self.log_start_offset);
        }
    }

    /// A rollback removed batches whose bytes may still be in the files: a crash now could
    /// bring them back after the log's end.
    fn removed_batches_on_disk(&self) -> bool {
        !self.rollback_settled() && self.exposed_end > self.offsets.appended().0
    }

    /// Answer the appends a rollback removed with their errors, and the flushes that waited.
    fn answer_rolled_back(&mut self) {
        for (w, error) in std::mem::take(&mut self.rolled_back) {
            match error {
                Some(error) => {
                    let _ = w.reply.send(Err(error));
                }
                None => self.complete_after_epochs(w),
            }
        }
        self.rollback_failures = 0;
        if self.rollback_settled() {
            self.exposed_end = self.exposed_end.min(self.offsets.appended().0);
        }
    }

    /// A rollback to `keep` fails every waiter whose append ends after it: at once if none of its
    /// bytes can have reached the disk, else once the rollback is on disk. A flush covers every
    /// batch the rollback removes.
    fn roll_back_waiters(&mut self, keep: u64, error: &Error) {
        for w in self.take_waiters_after(keep) {
            let first = if w.flush { keep } else { w.outcome.base_offset };
            if first < self.exposed_end {
                self.rolled_back.push((w, Some(error.duplicate())));
            } else {
                let _ = w.reply.send(Err(error.duplicate()));
            }
        }
    }

    /// Fail every waiter whose append ends after `offset`.
    fn fail_waiters_after(&mut self, offset: u64, error: &Error) {
        for w in self.take_waiters_after(offset) {
            let _ = w.reply.send(Err(error.duplicate()));
        }
    }

    /// Take every waiter whose append ends after `offset` out of its queue.
    fn take_waiters_after(&mut self, offset: u64) -> Vec<Waiter> {
        let mut taken = Vec::new();
        for queue in [&mut self.written_waiters, &mut self.durable_waiters] {
            while queue.back().is_some_and(|w| w.end_offset > offset) {
                let w = queue.pop_back().expect("checked");
                self.flush_waiters -= usize::from(w.flush);
                taken.push(w);
            }
        }
        // No longer counted in `flush_waiters`: their data is durable.
        while self
            .epoch_waiters
            .back()
            .is_some_and(|w| w.end_offset > offset)
        {
            taken.push(self.epoch_waiters.pop_back().expect("checked"));
        }
        taken
    }

    /// Make everything appended so far durable, whatever the flush policy (a caller's explicit flush).
    pub fn flush(&mut self, reply: Reply<AppendOutcome>) {
        let end = self.offsets.appended().0;
        let outcome = AppendOutcome {
            base_offset: end,
            last_offset: end.saturating_sub(1),
            durability: Durability::Durable,
            log_start_offset: self.log_start_offset,
        };
        let waiter = Waiter {
            end_offset: end,
            outcome,
            reply,
            flush: true,
        };
        if end <= self.durable_end() {
            self.complete_durable(waiter);
        } else {
            self.flush_waiters += 1;
            let at = self
                .durable_waiters
                .partition_point(|w| w.end_offset <= end);
            self.durable_waiters.insert(at, waiter);
        }
    }

    // ---------------------------------------------------------------------------------------------
    // The shard journal (ARCHITECTURE.md, decision 10)

    /// A clean shutdown: the journal takes nothing more, and everything appended is made
    /// durable in the segment, by plain writes that the shard's syncs cover together — not by a
    /// write durable by itself per partition, whose flush each would cost (1000 partitions: ~1.2 s
    /// of lone writes; ARCHITECTURE.md, decision 35).
    pub fn begin_shutdown(&mut self, reply: Reply<AppendOutcome>) {
        self.closing = true;
        self.set_journaled(false);
        self.flush(reply);
    }

    /// The shard's journal takes (or stops taking) this partition's small groups.
    pub fn set_journaled(&mut self, on: bool) {
        self.journaled = on && self.config.flush == FlushPolicy::EveryBatch;
    }

    fn journal_active(&self) -> bool {
        self.journaled && !self.journal_blocked
    }

    /// The batches the journal should make durable now: everything appended that is not durable
    /// yet, if that is a small group.
    pub fn journal_offer(&self) -> Option<journal::Entry> {
        let first = self.journal_would_take()?;
        let chunks = self.tail.range(first..).map(|b| b.bytes.clone()).collect();
        Some(journal::Entry {
            id: self.id.clone(),
            incarnation: self.incarnation,
            chunks,
            end_offset: self.offsets.appended().0,
        })
    }

    /// Would the journal take what is appended and not durable now (see `journal_offer`)? If
    /// so, where in `tail` those batches begin.
    fn journal_would_take(&self) -> Option<usize> {
        if !self.journal_active()
            || self.failure.is_some()
            || self.truncate.is_some()
            || self.cut_pending
            || self.deleted
        {
            return None;
        }
        let from = self.journal_from();
        if from >= self.offsets.appended().0 {
            return None;
        }
        // Not a small group, its space not allocated, or not in memory: the segment path makes
        // it durable.
        if !self.journal_space_reserved() {
            return None;
        }
        let first = self.journal_group_start()?;
        if self.tail.get(first).is_none_or(|b| b.base_offset != from) {
            return None; // not in memory: the segment path makes it durable
        }
        Some(first)
    }

    /// Appended data is not durable and no journal write has it (whether the journal can take it
    /// is `journal_offer`'s question).
    pub fn wants_journal(&self) -> bool {
        self.journal_active() && self.offsets.appended().0 > self.journal_from()
    }

    /// Where the journal's next record of this partition starts: everything below is durable (a
    /// sync in flight does not count: it may fail), so everything below the record's end is once
    /// the record is (the invariant of `journal_durable`).
    fn journal_from(&self) -> u64 {
        self.journal_offset.max(self.offsets.durable().0)
    }

    /// Is what the journal would have to take a small group, with its segment space allocated?
    fn journal_can_take(&self) -> bool {
        self.journal_space_reserved() && self.journal_group_start().is_some()
    }

    /// Is every appended batch bound for the write segment, within its allocated space? The
    /// journal takes only such data: what it acknowledges then always fits in its segment, and
    /// its replay after a crash cannot fail on a full disk. Otherwise the segment path writes the
    /// group, allocating first (and failing the appends cleanly if the disk is full).
    fn journal_space_reserved(&self) -> bool {
        let segment = &self.segments[&self.write_segment];
        align_up(segment.size) <= segment.allocated && self.no_batch_awaits_a_new_segment()
    }

    /// Is every batch in memory bound for the write segment (none waits for a roll)?
    fn no_batch_awaits_a_new_segment(&self) -> bool {
        self.tail
            .back()
            .is_none_or(|b| b.segment == self.write_segment)
    }

    /// Where in `tail` the batches the journal would take (from `journal_from` on) begin, if
    /// they are a small group. Found from the newest batch back, so the cost is bounded by the
    /// group limit, not by the length of the cached tail.
    fn journal_group_start(&self) -> Option<usize> {
        let from = self.journal_from();
        let mut first = self.tail.len();
        let mut bytes = 0;
        while first > 0 && self.tail[first - 1].next_offset > from {
            first -= 1;
            bytes += self.tail[first].bytes.len() as u64;
            if bytes >= journal_group_bytes_max {
                return None;
            }
        }
        Some(first)
    }

    /// A journal write with this partition's batches up to `end` is being issued.
    pub fn journal_taken(&mut self, end: u64) {
        self.journal_offset = end;
        self.exposed_end = self.exposed_end.max(end);
        self.journal_used = true;
    }

    /// The journal write that took batches up to `end` is durable, or failed. Journal writes are
    /// reported in journal order, so a later write of this partition may still be in flight.
    pub fn on_journaled(&mut self, end: u64, ok: bool) {
        if ok {
            let end = end.min(self.offsets.appended().0);
            self.journal_durable = self.journal_durable.max(end);
        } else {
            // Nothing the journal took past its durable point counts any more.
            self.journal_offset = self.journal_durable;
        }
        self.complete_waiters();
    }

    /// A shard checkpoint starts: the segment must become durable up to what the journal holds.
    /// Returns whether this partition has anything to do for it.
    pub fn begin_checkpoint(&mut self) -> bool {
        if self.journal_durable > self.offsets.durable().0 {
            self.checkpoint_target = Some(self.journal_durable);
            true
        } else {
            self.checkpoint_target = None;
            false
        }
    }

    /// Is the segment durable up to everything the journal made durable for this partition?
    /// Then no record of a journal's past run is needed to replay it.
    pub fn journal_durable_in_segment(&self) -> bool {
        self.offsets.durable().0 >= self.journal_durable
    }

    pub fn checkpoint_reached(&self) -> bool {
        self.checkpoint_target
            .is_none_or(|target| self.offsets.durable().0 >= target)
    }

    pub fn end_checkpoint(&mut self) {
        self.checkpoint_target = None;
    }

    // ---------------------------------------------------------------------------------------------
    // Scheduling I/O

    /// Submit whatever I/O can start now. Returns true if work is waiting only for shard-wide
    /// resources (a write buffer), so the shard should call again when one is free.
    pub fn schedule(&mut self, io: &mut IoCtx<'_>) -> bool {
        if self.control_busy {
            return false;
        }
        if let Some(at) = self.retry_at {
            if Instant::now() < at {
                return false;
            }
            self.retry_at = None;
        }
        if self.cut_pending && self.is_idle() {
            self.cut_pending = false;
            self.start_cut(io);
            return false;
        }
        if let Some(failure) = &self.failure {
            if !failure.rolling_back && self.is_idle() {
                self.roll_back(io);
            }
            return false;
        }
        if self.journal_blocked
            && self.is_idle()
            && !self.cut_pending
            && self.offsets.durable().0 >= self.journal_durable
        {
            // The segment now holds everything the journal made durable: a new incarnation
            // retires this partition's old records, and the journal may take its data again.
            self.start_incarnation(io);
            return false;
        }
        if self.truncate.is_some() && self.is_idle() && self.copy_index == self.tail.len() {
            if self.journal_used && !self.incarnation_fresh {
                // The journal may hold records past the truncation point: once the segment is
                // durable (sync_due asks for it), retire them with a new incarnation first.
                if self.offsets.durable().0 == self.offsets.written().0 {
                    self.start_incarnation(io);
                }
                return false;
            }
            self.incarnation_fresh = false;
            self.start_truncate(io);
            if self.control_busy {
                return false;
            }
        }
        let starved = self.schedule_writes(io);
        if self.control_busy {
            return false;
        }
        self.schedule_allocation_ahead(io);
        if self.control_busy {
            return false;
        }
        self.schedule_runway(io);
        if !self.control_busy
            && self.epochs_dirty
            && !self.epochs_inflight
            && self.epochs_retry_at.is_none_or(|at| Instant::now() >= at)
        {
            self.epochs_retry_at = None;
            self.persist_epochs(io);
        }
        if self.recovery_point_due(io.recovery_point_bytes) {
            self.persist_recovery_point(io);
        }
        starved
    }

    fn uncopied(&self) -> Option<&TailBatch> {
        self.tail.get(self.copy_index)
    }

    /// A rollback's rewrite, or a retry after a failed control operation, waits out its
    /// backoff (the shard's tick schedules it again).
    pub fn rewrite_waiting(&self) -> bool {
        self.rewrite_at.is_some() || self.retry_at.is_some() || self.epochs_retry_at.is_some()
    }

    fn schedule_writes(&mut self, io: &mut IoCtx<'_>) -> bool {
        if let Some(at) = self.rewrite_at {
            if Instant::now() < at {
                return false;
            }
            self.rewrite_at = None;
        }
        loop {
            let Some(next) = self.uncopied() else {
                return false;
            };
            if next.segment != self.write_segment {
                if self.is_idle() {
                    self.start_roll(io);
                }
                return false;
            }
            match self.carry_state {
                CarryState::Ready => {}
                CarryState::NeedsLoad => {
                    self.start_carry_load(io);
                    return false;
                }
                CarryState::Loading => return false,
            }
            let pending = self.segments[&self.write_segment].size - self.next_write_position;
            if self.lazy_hold(pending) {
                return false;
            }
            if self.checkpoint_write(pending) && *io.writes_inflight >= io.checkpoint_writes_max {
                return true; // a checkpoint's write waits for room, not a lazy or a sync's one
            }
            let want_end = align_up(self.next_write_position + pending.min(write_bytes_max as u64));
            if want_end > self.segments[&self.write_segment].allocated {
                self.start_allocate(io, want_end);
                return false;
            }
            if self
                .runway_inflight
                .is_some_and(|(from, _)| want_end > from)
            {
                return false; // the zero write in flight covers blocks this write may use
            }
            let large_inflight = self.writes.iter().filter(|w| w.large && !w.done).count();
            if large_inflight >= partition_writes_inflight_max
                || self.writes.len() >= 3 * partition_writes_inflight_max
            {
                return false;
            }
            // The block the next write starts in (the carried block) is still being written by
            // an earlier write: the blocks after it can go now and the carried block's piece
            // waits for that write (`start_write`), if there is a whole block after it to write
            // and an append waits for this one; otherwise the whole write waits.
            let defer_head = self.carry_len > 0
                && self.block_in_flight(align_down(self.next_write_position), self.writes.len());
            if defer_head
                && (self.write_in_background()
                    || (self.carry_len as u64 + pending) < 2 * block_bytes as u64)
            {
                return false;
            }
            if self.config.flush == FlushPolicy::EveryBatch
                && self.next_write_position + write_bytes_max as u64
                    > self.durable_position + torn_tail_window_bytes
            {
                return false; // the fdatasync in flight (or about to be issued) frees room
            }
            if !io.buffers.has_large() || *io.writes_inflight >= shard_writes_inflight_max {
                return true;
            }
            if !self.start_write(io, defer_head) {
                return false;
            }
        }
    }

    /// Copy the next bytes into aligned buffers and submit them. Returns false if there was not a
    /// whole block to write while other writes are in flight.
    ///
    /// One write of the log goes out as up to three, each starting on a block boundary: the
    /// carried block (rewritten with the bytes that complete it), the whole blocks after it, and
    /// a partial last block. Each then lies within one extent (the carried block is already
    /// written; what follows usually is not yet), which ext4 writes without blocking: a write
    /// spanning both kinds is refused to io_uring's non-blocking attempt and punted to an io-wq
    /// worker, which runs one file's writes one at a time. And the next write, which has to
    /// rewrite the partial last block, waits only for that small write, not for the large one.
    ///
    /// With `defer_head`, the carried block is still being written by an earlier write: its
    /// piece is queued (`InflightWrite::deferred`) and submitted once that write completes,
    /// while the pieces after it go now. A producer whose requests arrive one by one (each
    /// batch ending inside a block) would otherwise have each write wait for the one before.
    /// `written` still advances only over a contiguous prefix of completed pieces, so nothing
    /// after the queued block counts as written before it does.
    ///
    /// A write durable by itself ([`lone_write`](Self::lone_write)) is not split: it goes out as
    /// one `RWF_DSYNC` write, possibly through an io-wq worker, instead of three writes and an
    /// fdatasync (the fdatasync is punted to a worker anyway).
    fn start_write(&mut self, io: &mut IoCtx<'_>, defer_head: bool) -> bool {
        self.note_flush_failures_if_settled(io.storage.as_ref());
        let segment_size = self.segments[&self.write_segment].size;
        let pending = (segment_size - self.next_write_position) as usize;
        let start_position = align_down(self.next_write_position);
        let all = self.carry_len + pending;
        let mut total = all.min(write_bytes_max);
        // End on a block boundary, leaving the partial last block for the next write, when more
        // follows at once (the write is capped), or when no append waits for this write and
        // others are in flight (it is then coalesced with what comes next). Otherwise the
        // partial block goes now: an append waits for it, and the next write defers its
        // carried block instead of waiting (`defer_head`).
        let hold_back = total < all || (self.write_in_background() && !self.writes.is_empty());
        if hold_back {
            total = align_down(total as u64) as usize;
            if total <= self.carry_len {
                return false;
            }
        }
        let durable = !hold_back && self.lone_write();
        // A write durable by itself goes out whole: split, each piece would carry a flush of
        // its own (measured: 65,597-byte appends, one in flight, 148 MB/s in three durable
        // pieces, 177.5 with only single-piece writes durable, 217 whole, against 167 without).
        let head = if !durable && self.carry_len > 0 && total > block_bytes {
            block_bytes
        } else {
            0
        };
        let last_block = align_down(total as u64) as usize;
        let tail = if !durable && last_block > head && last_block < total {
            total - last_block
        } else {
            0
        };
        if durable {
            bump(&io.metrics.segment_durable_writes, 1);
        }
        let file = self.write_file();
        let mut from = 0;
        for to in [head, total - tail, total] {
            if to <= from {
                continue;
            }
            let large = to - from > block_bytes;
            let mut buf = if large {
                io.buffers.take_large().expect("caller checked the pool")
            } else {
                io.buffers.take_small()
            };
            if from == 0 {
                buf.extend_from_slice(&self.carry[..self.carry_len]);
            }
            let need = to - from - buf.len();
            self.copy_into(&mut buf, need);
            if to == total {
                let tail_start = align_down(buf.len() as u64) as usize;
                self.carry_len = buf.len() - tail_start;
                self.carry[..self.carry_len].copy_from_slice(&buf.as_slice()[tail_start..]);
            }
            let position = start_position + from as u64;
            if defer_head && from == 0 {
                debug_assert_eq!(to, block_bytes, "the carried block is a piece of its own");
                self.record_write(position, buf.len(), false, false, Some(buf));
                bump(&io.metrics.deferred_writes, 1);
            } else {
                let serial = self.record_write(position, buf.len(), large, durable, None);
                self.issue_write(io, &file, serial, position, buf, durable);
            }
            from = to;
        }
        self.next_write_position = start_position + total as u64;
        true
    }

    /// Copy the next `n` bytes of the tail into `buf`, advancing the copy cursor.
    fn copy_into(&mut self, buf: &mut AlignedBuf, mut n: usize) {
        while n > 0 {
            let batch = &self.tail[self.copy_index];
            self.exposed_end = self.exposed_end.max(batch.next_offset);
            let piece = &batch.bytes[self.copy_offset..];
            let taken = buf.extend_from_slice(&piece[..piece.len().min(n)]);
            n -= taken;
            self.copy_offset += taken;
            if self.copy_offset == batch.bytes.len() {
                self.copied_offset = batch.next_offset;
                self.copy_index += 1;
                self.copy_offset = 0;
            }
        }
    }

    /// Does the write about to start go out durable by itself? Only when it is all there is:
    /// an `every-batch` partition with appends waiting for it, nothing else written but not
    /// durable, no write or sync in flight. Then one `RWF_DSYNC` write replaces the write (up to
    /// three pieces, see `start_write`) and the fdatasync that would follow it alone. Writes
    /// with others pending stay
    /// plain and share one fdatasync, as before. (A leader-epoch checkpoint file being written
    /// does not hold it back: see `persist_epochs`.)
    ///
    /// And only once as many appends wait as the last group commit answered: a producer with
    /// several appends in flight sends them back to back after each group commit, so if its
    /// first write went out alone those behind it would need an fdatasync of their own — two
    /// flushes per cycle instead of one (measured: 65,597-byte appends, 5 in flight, 443 vs 476
    /// MB/s with every lone write durable). When the whole cohort has arrived — a broker hands
    /// the produce requests it read together to the engine together — nothing more is coming
    /// before the next group commit, and the one write for all of it is durable by itself
    /// (ARCHITECTURE.md decision 25).
    ///
    /// Never for appends the shard journal will take: a checkpoint forcing a journaled
    /// partition's rest onto its segment often finds a new append there too, and a durable
    /// write would spend a device flush on it that the journal's next write shares with the
    /// shard's other partitions (ARCHITECTURE.md decision 33).
    fn lone_write(&self) -> bool {
        self.config.flush == FlushPolicy::EveryBatch
            && !self.closing
            && self.last_group_waiters <= self.durable_waiters.len().max(1)
            && !self.write_in_background()
            && self.writes.is_empty()
            && self.sync_inflight.is_none()
            && self.runway_inflight.is_none()
            && self.offsets.written().0 == self.offsets.durable().0
            && self.written_position == self.durable_position
            // Last: it walks the journal group's batches.
            && self.journal_would_take().is_none()
    }

    /// Record a write of `len` bytes at `position` in `writes` (in position order); a queued
    /// write keeps its buffer there until it is issued.
    fn record_write(
        &mut self,
        position: u64,
        len: usize,
        large: bool,
        durable: bool,
        deferred: Option<AlignedBuf>,
    ) -> u64 {
        self.write_serial += 1;
        self.writes.push_back(InflightWrite {
            serial: self.write_serial,
            position,
            end_position: position + len as u64,
            end_offset: self.copied_offset,
            large,
            durable,
            done: false,
            failed: false,
            deferred,
        });
        self.write_serial
    }

    /// Does no append wait for this partition's segment writes (the journal has taken all it
    /// holds)? Then they may be held back and coalesced; otherwise they are on the append path.
    fn write_in_background(&self) -> bool {
        self.journal_active() && self.journal_offset >= self.offsets.appended().0
    }

    /// Is a write before `writes[before]` that touches the block at `block` not yet done?
    fn block_in_flight(&self, block: u64, before: usize) -> bool {
        self.writes
            .iter()
            .take(before)
            .any(|w| !w.done && w.position < block + block_bytes as u64 && w.end_position > block)
    }

    /// Issue each queued carried-block write whose block no earlier write is writing any more.
    fn issue_deferred(&mut self, io: &mut IoCtx<'_>) {
        for i in 0..self.writes.len() {
            let position = self.writes[i].position;
            if self.writes[i].deferred.is_none() || self.block_in_flight(position, i) {
                continue;
            }
            let w = &mut self.writes[i];
            let (serial, buf) = (w.serial, w.deferred.take().expect("checked"));
            let file = self.write_file();
            self.issue_write(io, &file, serial, position, buf, false);
        }
    }

    /// A failure: a queued write is never issued (the rollback waits for every write to be done).
    fn cancel_deferred(&mut self, io: &mut IoCtx<'_>) {
        for w in self.writes.iter_mut() {
            if let Some(buf) = w.deferred.take() {
                io.buffers.give_back(buf);
                w.done = true;
                w.failed = true;
            }
        }
    }

    fn issue_write(
        &mut self,
        io: &mut IoCtx<'_>,
        file: &Rc<dyn StorageFile>,
        serial: u64,
        position: u64,
        buf: AlignedBuf,
        durable: bool,
    ) {
        *io.writes_inflight += 1;
        bump(&io.metrics.writes, 1);
        bump(&io.metrics.write_bytes, buf.padded_len() as u64);
        let file = file.clone();
        io.submit(self.route(), async move {
            let (result, buf) = if durable {
                file.write_at_durable(position, buf).await
            } else {
                file.write_at(position, buf).await
            };
            Event::Written {
                serial,
                result,
                buf,
            }
        });
    }

    /// A journaled partition writes its segment in pieces of at least `journal_group_bytes_max`
    /// (its small groups are durable through the journal), unless a roll, a truncation or a
    /// checkpoint needs the data on the segment now.
    fn lazy_hold(&self, pending: u64) -> bool {
        self.journal_active()
            && pending < journal_group_bytes_max
            && self.journal_can_take()
            && self.truncate.is_none()
            && self
                .tail
                .back()
                .is_some_and(|b| b.segment == self.write_segment)
            && self
                .checkpoint_target
                .is_none_or(|target| self.copied_offset >= target)
    }

    /// Is the next segment write (of `pending` bytes) one only a shard checkpoint asks for: a
    /// journaled partition's small rest, which its lazy writes would otherwise hold back?
    fn checkpoint_write(&self, pending: u64) -> bool {
        self.checkpoint_target.is_some()
            && self.journal_active()
            && pending < journal_group_bytes_max
    }

    /// Lay out the next stretch of the write segment with zeros while the partition is lightly
    /// loaded (small group commits, no data write in flight), up to [`runway_bytes`] ahead of the
    /// write head and within the preallocated length. Appends then overwrite blocks the file
    /// system has already laid out, and their fdatasync commits no extent conversion. A zero write
    /// never touches a block a data write has used or may use while it runs: it starts at least
    /// [`runway_gap_bytes`] past the write head, and data writes that would reach it wait for it.
    fn schedule_runway(&mut self, io: &mut IoCtx<'_>) {
        if self.config.flush != FlushPolicy::EveryBatch
            || self.journal_active()
            || self.runway_off
            || self.runway_inflight.is_some()
            || !self.writes.is_empty()
            || self.failure.is_some()
            || self.truncate.is_some()
            || self.cut_pending
            || self.control_busy
            || self.last_group_bytes >= runway_group_bytes_max
        {
            return;
        }
        let segment = &self.segments[&self.write_segment];
        if segment.file.is_none() {
            return;
        }
        let head = align_up(self.next_write_position);
        let from = self.zeroed_end.max(head + runway_gap_bytes);
        let to = (from + runway_step_bytes as u64).min(align_down(segment.allocated));
        if from >= head + runway_bytes || to <= from {
            return;
        }
        if !io.buffers.has_large()
            || *io.writes_inflight >= shard_writes_inflight_max
            || *io.runways_inflight >= shard_runway_writes_max
        {
            return;
        }
        let mut buf = io.buffers.take_large().expect("checked");
        buf.fill_zeros((to - from) as usize);
        self.runway_inflight = Some((from, to));
        *io.writes_inflight += 1;
        *io.runways_inflight += 1;
        bump(&io.metrics.runway_writes, 1);
        bump(&io.metrics.runway_bytes, to - from);
        let file = self.write_file();
        io.submit(self.route(), async move {
            let (result, buf) = file.write_at(from, buf).await;
            Event::RunwayWritten { result, buf }
        });
    }

    fn on_runway_written(&mut self, result: io::Result<()>, metrics: &Metrics) {
        let (_, to) = self
            .runway_inflight
            .take()
            .expect("a zero write was in flight");
        match result {
            Ok(()) => self.zeroed_end = self.zeroed_end.max(to),
            Err(error) => {
                // Only an optimisation failed; the data path reports its own errors.
                self.runway_off = true;
                bump(&metrics.io_errors, 1);
                tracing::warn!(partition = %self.id, %error, "zero write ahead of the log failed; no runway for this segment");
            }
        }
    }

    fn write_file(&self) -> Rc<dyn StorageFile> {
        self.segments[&self.write_segment]
            .file
            .clone()
            .expect("the write segment's file is open")
    }

    /// Is an fdatasync (or a place in the shard's syncfs) due for this partition? Every-batch:
    /// when written data is not yet durable. Interval: when its time or byte budget is spent, or a
    /// caller waits for durability. In both, a write still in flight would miss the sync and need
    /// another right after it, so wait for it unless a full group (`sync_group_bytes`) is ready:
    /// idle partitions sync at once, loaded ones in large groups.
    pub fn sync_due(&self) -> bool {
        if self.sync_inflight.is_some() || self.control_busy || self.failure.is_some() {
            return false;
        }
        if self.offsets.written().0 <= self.offsets.durable().0 {
            return false;
        }
        let waited_for = self
            .durable_waiters
            .front()
            .is_some_and(|w| w.end_offset > self.offsets.durable().0);
        let due = match self.config.flush {
            FlushPolicy::EveryBatch if self.journal_active() => {
                return self.journaled_sync_due();
            }
            FlushPolicy::EveryBatch => true,
            FlushPolicy::Interval { ms, bytes } => {
                waited_for
                    || (ms > 0 && self.last_sync.elapsed().as_millis() as u64 >= ms)
                    || (bytes > 0 && self.bytes_since_sync >= bytes)
            }
        };
        let writes_in_flight = self.writes.iter().any(|w| !w.done);
        due && (!writes_in_flight
            || self.written_position - self.durable_position >= sync_group_bytes
            || self.flush_overdue())
    }

    /// A journaled partition syncs its segment when written data is not in the journal (a group
    /// too large for it), for a checkpoint or a truncation, and every `sync_group_bytes` (which
    /// bounds the torn tail a crash can leave, as for any every-batch partition).
    fn journaled_sync_due(&self) -> bool {
        let (checkpoint, other) = self.journaled_sync_reasons();
        checkpoint || other
    }

    /// Why a journaled partition's sync is due: for a checkpoint, and for anything else.
    fn journaled_sync_reasons(&self) -> (bool, bool) {
        let written = self.offsets.written().0;
        let durable = self.offsets.durable().0;
        let writes_in_flight = self.writes.iter().any(|w| !w.done);
        let large = self.written_position - self.durable_position >= sync_group_bytes;
        let checkpoint = self
            .checkpoint_target
            .is_some_and(|t| written >= t && durable < t);
        // Written data the journal has not taken, and will not (too much of it): a small rest
        // goes through the journal's next write instead of a segment sync.
        let uncovered = written > self.journal_offset.max(durable) && !self.journal_can_take();
        let other = large
            || ((uncovered || self.truncate.is_some())
                && (!writes_in_flight || self.flush_overdue()));
        (checkpoint, other)
    }

    /// Of a partition whose sync is due (`sync_due`): is it due only because a checkpoint waits
    /// for it? Nothing waits for such a sync but the checkpoint, so it may wait for the
    /// checkpoint's other writes and share one sync with them (ARCHITECTURE.md, decision 19).
    pub fn sync_due_only_for_checkpoint(&self) -> bool {
        self.journal_active()
            && self.config.flush == FlushPolicy::EveryBatch
            && self.journaled_sync_reasons() == (true, false)
    }

    /// Does a checkpoint wait for data of this partition that is not written to its segment yet?
    pub fn checkpoint_writing(&self) -> bool {
        self.checkpoint_target
            .is_some_and(|target| self.offsets.written().0 < target)
    }

    /// Someone flushing (a consumer waiting to see data answered at write time) does not wait
    /// for a pause in the writes once the data has waited `sync_wait_max`.
    fn flush_overdue(&self) -> bool {
        self.flush_waiters > 0
            && self
                .unsynced_since
                .is_some_and(|t| t.elapsed() >= sync_wait_max)
    }

    /// Record that a sync covering everything written so far is being issued; returns the file
    /// to fdatasync.
    pub fn begin_sync(&mut self, metrics: &Metrics) -> Rc<dyn StorageFile> {
        self.sync_inflight = Some((self.offsets.written().0, self.written_position));
        self.bytes_since_sync = 0;
        self.unsynced_since = None;
        self.last_sync = Instant::now();
        bump(&metrics.fsyncs, 1);
        self.write_file()
    }

    fn start_control(
        &mut self,
        io: &mut IoCtx<'_>,
        op: impl std::future::Future<Output = Result<ControlDone>> + 'static,
    ) {
        assert!(!self.control_busy, "one control operation at a time");
        self.control_busy = true;
        io.submit(self.route(), async move { Event::Control(op.await) });
    }

    fn start_carry_load(&mut self, io: &mut IoCtx<'_>) {
        self.carry_state = CarryState::Loading;
        let file = self.write_file();
        let block = align_down(self.next_write_position);
        let len = (self.next_write_position - block) as usize;
        self.start_control(io, async move {
            let (result, buf) = file.read_at(block, AlignedBuf::new(block_bytes)).await;
            result.map_err(|e| Error::io("read tail block of", file.path(), e))?;
            if buf.len() < len {
                return Err(Error::Corruption {
                    file: file.path().to_path_buf(),
                    position: block + buf.len() as u64,
                    reason: format!("file ends inside its last block (needed {len} bytes)"),
                });
            }
            Ok(ControlDone::CarryLoaded {
                bytes: buf.as_slice()[..len].to_vec(),
            })
        });
    }

    fn start_allocate(&mut self, io: &mut IoCtx<'_>, want_end: u64) {
        self.start_allocation(io, want_end, align_up(want_end));
    }

    /// Grow the write segment's file for a write that needs `want_end` bytes of it; on a full
    /// disk allocate `need` bytes alone.
    fn start_allocation(&mut self, io: &mut IoCtx<'_>, want_end: u64, need: u64) {
        let allocated = self.segments[&self.write_segment].allocated;
        let len = allocation_target(
            allocated,
            want_end,
            self.config.preallocate_bytes,
            self.config.segment_bytes,
        );
        let file = self.write_file();
        let journaled = self.journaled;
        self.start_control(io, async move {
            let (len, short) = allocate_or_less(file.as_ref(), len, need).await?;
            if journaled {
                sync_allocation(file.as_ref(), len).await?;
            }
            Ok(ControlDone::Allocated { len, short })
        });
    }

    /// A journaled partition grows its file before its appends reach the end of what is
    /// allocated: the journal takes only data whose segment space is allocated, and without this
    /// each growth of the file would send one group through the segment path (a write and a
    /// sync of its own). On a full disk nothing is allocated and nothing fails: the next group
    /// takes the segment path, which allocates what it needs or fails its appends.
    fn schedule_allocation_ahead(&mut self, io: &mut IoCtx<'_>) {
        if !self.journal_active()
            || self.failure.is_some()
            || self.truncate.is_some()
            || self.cut_pending
            || self.deleted
            || !self.no_batch_awaits_a_new_segment()
        {
            return;
        }
        let segment = &self.segments[&self.write_segment];
        let (allocated, file_open) = (segment.allocated, segment.file.is_some());
        let want_end = (align_up(segment.size) + journal_group_bytes_max)
            .min(align_up(self.config.segment_bytes));
        if want_end <= allocated || !file_open || self.ahead_tried_at == Some(allocated) {
            return;
        }
        self.ahead_tried_at = Some(allocated);
        self.start_allocation(io, want_end, allocated);
    }

    /// Seal the write segment (truncate to size, fsync, persist indexes), create the next one and
    /// move the recovery point to it. Runs with nothing else in flight.
    fn start_roll(&mut self, io: &mut IoCtx<'_>) {
        self.note_flush_failures_if_settled(io.storage.as_ref());
        let next_base = self
            .uncopied()
            .expect("a batch waits for the new segment")
            .segment;
        let durable = self.offsets.written().0;
        let old = self
            .segments
            .get_mut(&self.write_segment)
            .expect("write segment exists");
        old.finish_time_index();
        let (old_file, old_size) = (old.file.clone().expect("open"), old.size);
        let (index, time_index) = (old.index.encode(), old.time_index.encode());
        let (index_path, time_index_path) = (old.index_path(), old.time_index_path());
        let new_path = self.segments[&next_base].log_path.clone();
        let checkpoint = RecoveryPoint::segment_start(next_base);
        let storage = io.storage.clone();
        let dir = self.dir.clone();
        // The new segment starts as large a step as the one it follows holds (a partition that
        // filled a segment gets the full step, one rolled by time with little in it a small one).
        let step = self.config.preallocate_bytes;
        let preallocate = align_up(
            old_size
                .clamp(preallocate_first_bytes.min(step), step)
                .min(self.config.segment_bytes),
        );
        bump(&io.metrics.segments_rolled, 1);
        let journaled = self.journaled;
        // The recovery point moves past the sealed segment: the leader-epoch entries its batches
        // made must be on disk first, since a restart no longer scans them.
        let epochs = self
            .epochs_dirty
            .then(|| (self.dir.join(path::LEADER_EPOCH_FILE), self.epochs.encode()));
        self.epochs_dirty = false;
        // Counted before the fsync is issued: a flush that fails after it may drop nothing it
        // covers.
        let failures_seen = self.flush_failures_seen;
        self.start_control(io, async move {
            let path = old_file.path().to_path_buf();
            old_file
                .set_len(old_size)
                .await
                .map_err(|e| Error::io("truncate", &path, e))?;
            old_file
                .sync_all()
                .await
                .map_err(|e| Error::io("fsync", &path, e))?;
            // A flush failed on the node since the sealed segment's writes: the fsync does not
            // vouch for them (decision 29), so the segment must not be sealed behind a recovery
            // point that a restart would trust without scanning. The roll fails as if its fsync
            // had, before the next segment exists (decision 41).
            if storage.flush_failures() != failures_seen {
                return Err(lost_flush_error(&path));
            }
            storage
                .write_file_durable(&index_path, index)
                .await
                .map_err(|e| Error::io("write", &index_path, e))?;
            storage
                .write_file_durable(&time_index_path, time_index)
                .await
                .map_err(|e| Error::io("write", &time_index_path, e))?;
            let file = storage
                .open(&new_path, true)
                .await
                .map_err(|e| Error::io("create", &new_path, e))?;
            // On a full disk the new segment starts empty: its first write asks for what it
            // needs (`start_allocate`), and fails as a full disk only if even that does not fit.
            let (allocated, short) = allocate_or_less(file.as_ref(), preallocate, 0).await?;
            if journaled {
                sync_allocation(file.as_ref(), allocated).await?;
            }
            if let Some((epoch_path, bytes)) = epochs {
                storage
                    .write_file_durable(&epoch_path, bytes)
                    .await
                    .map_err(|e| Error::io("write", &epoch_path, e))?;
            }
            storage
                .sync_dir(&dir)
                .await
                .map_err(|e| Error::io("fsync", &dir, e))?;
            checkpoint.write(storage.as_ref(), &dir).await?;
            Ok(ControlDone::Rolled {
                file,
                allocated,
                short,
                durable,
            })
        });
    }

    fn start_incarnation(&mut self, io: &mut IoCtx<'_>) {
        let incarnation = crate::recovery::new_incarnation();
        let path = self.dir.join(path::INCARNATION_FILE);
        let storage = io.storage.clone();
        self.start_control(io, async move {
            storage
                .write_file_durable(&path, format!("{incarnation}\n").into_bytes())
                .await
                .map_err(|e| Error::io("write", &path, e))?;
            Ok(ControlDone::IncarnationWritten { incarnation })
        });
    }

    /// Is the leader-epoch checkpoint file behind the cache in memory (to be written, or being
    /// written)?
    fn epochs_pending(&self) -> bool {
        self.epochs_dirty || self.epochs_inflight
    }

    /// Write the leader-epoch checkpoint file beside the data path: the partition's writes and
    /// syncs go on meanwhile (a control operation would stop them for a file write, two fsyncs
    /// and a rename). What needs the file on disk waits for it: a roll (which moves the recovery
    /// point past the batches that made the entries) writes it itself, and everything that runs
    /// only when the partition is idle (cuts, truncations, rollbacks, shutdown) waits for this
    /// write. An entry not yet on disk at a crash is rebuilt from its batch, which lies past the
    /// recovery point (ARCHITECTURE.md, decision 34).
    fn persist_epochs(&mut self, io: &mut IoCtx<'_>) {
        self.epochs_dirty = false;
        self.epochs_inflight = true;
        let bytes = self.epochs.encode();
        let path = self.dir.join(path::LEADER_EPOCH_FILE);
        let storage = io.storage.clone();
        io.submit(self.route(), async move {
            Event::EpochsWritten(
                storage
                    .write_file_durable(&path, bytes)
                    .await
                    .map_err(|e| Error::io("write", &path, e)),
            )
        });
    }

    /// Has the active segment grown durable by `interval` bytes past its recovery point, with
    /// nothing under way that could move the log back below it?
    fn recovery_point_due(&self, interval: u64) -> bool {
        interval > 0
            && self.durable_position >= self.recovery_point_at.saturating_add(interval)
            && !self.recovery_point_inflight
            && self
                .recovery_point_retry_at
                .is_none_or(|at| Instant::now() >= at)
            // The leader-epoch file must hold every entry of the batches the point vouches for.
            && !self.epochs_pending()
            && !self.control_busy
            && self.failure.is_none()
            && !self.cut_pending
            && self.truncate.is_none()
            && self.truncate_reply.is_none()
            && !self.closing
            && !self.deleted
    }

    /// The end of the last batch durable in the write segment, and the offset after it. The
    /// durable position itself may lie inside the next batch: a write can end on a block
    /// boundary mid-batch (the rest of its last block goes with the next write), and a sync
    /// makes durable what was written.
    fn durable_boundary(&self) -> Option<(u64, u64)> {
        let durable = self.offsets.durable().0;
        let segment = &self.segments[&self.write_segment];
        let boundary = match self.tail.iter().find(|b| b.base_offset == durable) {
            // Not durable, so still in memory: where it starts.
            Some(b) if b.segment == self.write_segment => (b.position, durable),
            _ if segment.next_offset <= durable => (segment.size, segment.next_offset),
            _ => return None,
        };
        (boundary.0 <= self.durable_position).then_some(boundary)
    }

    /// Move the recovery point into the active segment, to its durable end: write the segment's
    /// indexes, then `recovery-point` naming the position, its next offset and the partition's
    /// incarnation, beside the data path (as the leader-epoch file is). A crash then rescans the
    /// segment from the last index entry before that position instead of from its start — at
    /// most `EngineConfig::recovery_point_bytes` per partition, not `segment.bytes`. Every cut
    /// moves the point back to the segment's start before it changes the file, and a roll to
    /// the next segment's (ARCHITECTURE.md, decision 39).
    fn persist_recovery_point(&mut self, io: &mut IoCtx<'_>) {
        let Some((position, next_offset)) = self.durable_boundary() else {
            return;
        };
        let segment = &self.segments[&self.write_segment];
        let point = RecoveryPoint {
            segment: self.write_segment,
            position,
            next_offset,
            incarnation: Some(self.incarnation),
        };
        // Entries past the durable position are written too; recovery ignores them.
        let files = vec![
            (segment.index_path(), segment.index.encode()),
            (segment.time_index_path(), segment.time_index.encode()),
        ];
        tracing::trace!(target: "keel::durability", partition = %self.id, ?point, "recovery point");
        self.recovery_point_inflight = true;
        let storage = io.storage.clone();
        let dir = self.dir.clone();
        io.submit(self.route(), async move {
            let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
            let results = storage.write_files_durable(files).await;
            let written = paths
                .iter()
                .zip(results)
                .try_for_each(|(path, r)| r.map_err(|e| Error::io("write", path, e)));
            let result = match written {
                Ok(()) => point
                    .write(storage.as_ref(), &dir)
                    .await
                    .map(|()| point.position),
                Err(e) => Err(e),
            };
            Event::RecoveryPointWritten(result)
        });
    }

    // ---------------------------------------------------------------------------------------------
    // Completions

    pub fn on_event(&mut self, event: Event, io: &mut IoCtx<'_>) {
        match event {
            Event::Written {
                serial,
                result,
                buf,
            } => {
                io.buffers.give_back(buf);
                *io.writes_inflight -= 1;
                self.on_written(serial, result, io);
            }
            Event::Synced { result } => self.on_synced(result, io),
            Event::FlushLost { error } => {
                // Written segment bytes not yet durable (or being written) rest on the lost
                // flush: back to the durable point, as after a failed sync of this file.
                if self.written_position > self.durable_position
                    || self.offsets.written().0 > self.offsets.durable().0
                    || !self.writes.is_empty()
                {
                    let path = self.segments[&self.write_segment].log_path.clone();
                    self.fail(Error::io("syncfs", path, error), true, io);
                }
            }
            Event::RunwayWritten { result, buf } => {
                io.buffers.give_back(buf);
                *io.writes_inflight -= 1;
                *io.runways_inflight -= 1;
                self.on_runway_written(result, io.metrics);
            }
            Event::Control(result) => {
                self.control_busy = false;
                match result {
                    Ok(done) => self.on_control(done, io),
                    Err(e) => self.on_control_failed(e, io),
                }
            }
            Event::EpochsWritten(result) => {
                self.epochs_inflight = false;
                if let Err(error) = result {
                    // Not a failure of the log: no acknowledged append needs the file (a
                    // restart rebuilds its entries from the batches past the recovery point,
                    // and a roll writes it before moving that point), so the data is not
                    // rolled back beside its writes and syncs in flight; the file is written
                    // again later (ARCHITECTURE.md, decision 34). A failed fsync still counts
                    // as the device's failed flush, which the partitions' next syncs see
                    // (decision 29).
                    count_error(io.metrics, &error);
                    tracing::warn!(partition = %self.id, %error,
                        "could not write the leader-epoch checkpoint file; trying again");
                    self.epochs_dirty = true;
                    self.epochs_retry_at = Some(Instant::now() + rewrite_backoff);
                }
            }
            Event::RecoveryPointWritten(result) => {
                self.recovery_point_inflight = false;
                match result {
                    // A cut or roll since then would have waited for this write (`is_idle`).
                    Ok(position) => self.recovery_point_at = position,
                    Err(error) => {
                        // Not a failure of the log: the old point still holds (a crash rescans
                        // more). A failed fsync is still the device's failed flush (decision 29).
                        count_error(io.metrics, &error);
                        tracing::warn!(partition = %self.id, %error,
                            "could not write the recovery point; trying again");
                        self.recovery_point_retry_at = Some(Instant::now() + rewrite_backoff);
                    }
                }
            }
            Event::GroupSynced { .. }
            | Event::JournalWritten { .. }
            | Event::JournalSynced { .. }
            | Event::JournalHeader { .. }
            | Event::Opened { .. } => {
                unreachable!("shard-level events are handled by the shard")
            }
            Event::Detached => {}
        }
        self.complete_waiters();
    }

    fn on_written(&mut self, serial: u64, result: io::Result<()>, io: &mut IoCtx<'_>) {
        let write = self
            .writes
            .iter_mut()
            .find(|w| w.serial == serial)
            .expect("a completed write is in flight");
        write.done = true;
        if let Err(e) = result {
            write.failed = true;
            if write.durable && !crate::error::is_full(&e) {
                // Its flush may be what failed.
                bump(&io.metrics.flush_failures, 1);
            }
            let path = self.segments[&self.write_segment].log_path.clone();
            self.fail(Error::io("write", path, e), false, io);
            return;
        }
        self.issue_deferred(io);
        let before = self.offsets.written().0;
        let mut made_durable = false;
        let mut lost = false;
        while self.writes.front().is_some_and(|w| w.done && !w.failed) {
            let w = self.writes.pop_front().expect("checked");
            // A durable write's bytes are durable once it is done; the log is durable through it
            // if it was durable up to where it starts.
            let durable_through = w.durable
                && self.sync_inflight.is_none()
                && self.offsets.durable().0 == self.offsets.written().0
                && self.durable_position == self.written_position;
            self.offsets
                .advance_written(Written(w.end_offset.max(self.offsets.written().0)));
            self.written_position = w.end_position;
            if durable_through && self.flush_lost(io.storage.as_ref()) {
                lost = true;
            } else if durable_through {
                self.became_durable(self.offsets.written().0, self.written_position);
                made_durable = true;
            }
        }
        if lost {
            self.fail(self.flush_lost_error(), true, io);
            return;
        }
        if made_durable && self.durable_position == self.written_position {
            // As a sync's start would have (`begin_sync`): nothing written waits for a sync.
            self.last_sync = Instant::now();
            self.bytes_since_sync = 0;
            self.unsynced_since = None;
            self.evict_cache();
            return;
        }
        self.bytes_since_sync += self.offsets.written().0 - before;
        if self.unsynced_since.is_none() && self.offsets.written().0 > before {
            self.unsynced_since = Some(Instant::now());
        }
        self.evict_cache();
    }

    fn on_synced(&mut self, result: io::Result<()>, io: &mut IoCtx<'_>) {
        let (target, position) = self.sync_inflight.take().expect("a sync was in flight");
        tracing::trace!(target: "keel::durability", partition = %self.id, target, position,
            ok = result.is_ok(), "sync done");
        match result {
            Ok(()) if self.flush_lost(io.storage.as_ref()) => {
                self.fail(self.flush_lost_error(), true, io)
            }
            Ok(()) => self.became_durable(target, position),
            Err(e) => {
                let path = self.segments[&self.write_segment].log_path.clone();
                self.fail(Error::io("fdatasync", path, e), true, io);
            }
        }
    }

    /// With nothing written but not durable and no write or sync in flight, a failed flush
    /// before now cannot have dropped anything this partition will vouch for: note the storage's
    /// count, so that only failures from here on put what it writes next in doubt. Called as a
    /// write or a roll starts (a roll's fsync vouches for the segment it seals).
    fn note_flush_failures_if_settled(&mut self, storage: &dyn Storage) {
        if self.writes.is_empty()
            && self.sync_inflight.is_none()
            && self.offsets.written().0 == self.offsets.durable().0
            && self.written_position == self.durable_position
        {
            self.flush_failures_seen = storage.flush_failures();
        }
    }

    /// Has a flush failed anywhere on the node since this partition last had nothing in doubt,
    /// with no rollback to the durable point pending yet (that one already answers for it)?
    fn flush_lost(&self, storage: &dyn Storage) -> bool {
        !self.durable_frozen() && storage.flush_failures() != self.flush_failures_seen
    }

    fn flush_lost_error(&self) -> Error {
        lost_flush_error(&self.segments[&self.write_segment].log_path)
    }

    /// The log is durable up to `offset`, the segment up to `position`: a sync completed, or a
    /// write durable by itself did.
    fn became_durable(&mut self, offset: u64, position: u64) {
        let frozen = self.durable_frozen();
        tracing::trace!(target: "keel::durability", partition = %self.id, offset, position,
            segment = self.write_segment, frozen, "durable");
        if frozen {
            return;
        }
        self.offsets.advance_durable(Durable(offset));
        self.last_group_bytes = position.saturating_sub(self.durable_position);
        self.durable_position = position;
    }

    /// A flush failed and the rollback to the durable point has not happened yet: a sync that
    /// completes meanwhile (a roll's, a durable write's) may have been issued after the failure,
    /// and the writes the failed flush covered are not durable through it. The rollback decides.
    fn durable_frozen(&self) -> bool {
        self.failure.as_ref().is_some_and(|f| f.back_to_durable)
    }

    fn on_control(&mut self, done: ControlDone, io: &mut IoCtx<'_>) {
        let metrics = io.metrics;
        match done {
            ControlDone::Rolled {
                file,
                allocated,
                short,
                durable,
            } => {
                bump(&metrics.allocations_short, u64::from(short));
                let old = self.segments.get_mut(&self.write_segment).expect("exists");
                old.sealed = true;
                old.allocated = old.size;
                // The roll's fsync vouches for the segment it sealed unless a flush failed
                // since its writes (then the log goes back into it).
                let lost = self.flush_lost(io.storage.as_ref());
                if !self.durable_frozen() && !lost {
                    self.offsets.advance_durable(Durable(durable));
                }
                let next_base = self.uncopied().expect("waiting batch").segment;
                let new = self
                    .segments
                    .get_mut(&next_base)
                    .expect("new segment exists");
                new.file = Some(file);
                new.allocated = allocated;
                self.write_segment = next_base;
                self.next_write_position = 0;
                self.written_position = 0;
                self.durable_position = 0;
                self.recovery_point_at = 0;
                self.carry_len = 0;
                self.carry_state = CarryState::Ready;
                self.zeroed_end = 0;
                self.runway_off = false;
                self.ahead_tried_at = None;
                if lost {
                    self.fail(self.flush_lost_error(), true, io);
                }
            }
            ControlDone::Allocated { len, short } => {
                bump(&metrics.allocations_short, u64::from(short));
                let segment = self.segments.get_mut(&self.write_segment).expect("exists");
                segment.allocated = segment.allocated.max(len);
            }
            ControlDone::CarryLoaded { bytes } => {
                self.carry[..bytes.len()].copy_from_slice(&bytes);
                self.carry_len = bytes.len();
                self.carry_state = CarryState::Ready;
            }
            ControlDone::Cut { file, allocated } => {
                self.recovery_point_at = 0;
                let segment = self.segments.get_mut(&self.write_segment).expect("exists");
                segment.allocated = allocated;
                segment.file = Some(file);
                if let Some(reply) = self.truncate_reply.take() {
                    let _ = reply.send(Ok(()));
                }
            }
            ControlDone::Located {
                position,
                base_offset,
            } => {
                self.apply_truncation(base_offset, position);
                self.cut_pending = true;
                // A rollback that had to find its point on disk is done: appends may resume.
                if self.failure.as_ref().is_some_and(|f| f.rolling_back) {
                    self.failure = None;
                }
            }
            ControlDone::IncarnationWritten { incarnation } => {
                self.incarnation = incarnation;
                self.journal_blocked = false;
                self.incarnation_fresh = self.truncate.is_some();
            }
        }
    }

    fn on_control_failed(&mut self, error: Error, io: &mut IoCtx<'_>) {
        self.retry_at = Some(Instant::now() + rewrite_backoff);
        if self.carry_state == CarryState::Loading {
            self.carry_state = CarryState::NeedsLoad;
        }
        if let Some(pending) = self.truncate.take() {
            let _ = pending.reply.send(Err(error.duplicate()));
        }
        if let Some(reply) = self.truncate_reply.take() {
            let _ = reply.send(Err(error.duplicate()));
        }
        // A rollback whose locate failed starts over once idle.
        if let Some(failure) = &mut self.failure {
            failure.rolling_back = false;
        }
        // A roll or a cut writes the leader-epoch file: it may not have.
        self.epochs_dirty = true;
        // A failed sync (a roll's or a cut's fsync, an allocation's fdatasync) leaves what was
        // written since the last good one in doubt, as a failed group commit does (`on_synced`).
        if error.is_failed_sync() {
            bump(&io.metrics.flush_failures, 1);
        }
        // So does any failure while a flush failed on the node since the partition last had
        // nothing in doubt: a roll whose fsync that voids (`start_roll`), or a metadata file
        // whose fsync failed (its error names the file's write).
        let back_to_durable = error.is_failed_sync()
            || error.is_lost_flush()
            || io.storage.flush_failures() != self.flush_failures_seen;
        self.fail(error, back_to_durable, io);
    }

    /// Something failed: refuse new appends, wait for in-flight I/O, then roll back.
    fn fail(&mut self, error: Error, back_to_durable: bool, io: &mut IoCtx<'_>) {
        self.cancel_deferred(io);
        if !self.rolled_back.is_empty() {
            self.rollback_failures += 1;
            if self.rollback_failures >= rollback_answer_attempts {
                tracing::warn!(partition = %self.id, %error,
                    "the disk keeps refusing a rollback: its failed appends are answered, and may come back after a crash");
                self.answer_rolled_back();
            }
        }
        count_error(io.metrics, &error);
        tracing::warn!(partition = %self.id, %error, back_to_durable,
            "I/O failed; rolling the log back to its last good point");
        match &mut self.failure {
            Some(f) => f.back_to_durable |= back_to_durable,
            None => {
                self.failure = Some(Failure {
                    error,
                    back_to_durable,
                    rolling_back: false,
                })
            }
        }
    }

    /// With nothing in flight: drop what was not written (or not synced), fail its waiters, and cut
    /// the file back so no stale bytes lie past the log's end.
    fn roll_back(&mut self, io: &mut IoCtx<'_>) {
        let failure = self.failure.as_mut().expect("called on failure");
        let to = if failure.back_to_durable {
            self.offsets.durable().0
        } else {
            self.offsets.written().0
        };
        let error = failure.error.duplicate();
        // What the journal made durable stays: it was acknowledged. It is written again.
        let keep = to.max(self.journal_durable);
        let durable_position = self.durable_position;
        tracing::trace!(target: "keel::durability", partition = %self.id, to, keep,
            durable_position, written = self.offsets.written().0, segment = self.write_segment,
            back_to_durable = failure.back_to_durable, "rolling back");
        self.writes.clear();
        self.roll_back_waiters(keep, &error);
        if self.journal_used {
            self.journal_blocked = true;
        }
        match self.position_in_memory(keep) {
            Some(position) => {
                self.failure = None;
                self.apply_truncation(keep, position);
                if keep > to {
                    self.rewind(to, durable_position);
                    self.rewrite_at = Some(Instant::now() + rewrite_backoff);
                }
                self.start_cut(io);
            }
            None => {
                self.failure.as_mut().expect("set").rolling_back = true;
                self.start_locate(io, to);
            }
        }
    }

    /// After a rollback that kept batches the journal made durable: write them again from `to`
    /// (the last point the segment is known good at), where the batch starting at `to` begins.
    fn rewind(&mut self, to: u64, durable_position: u64) {
        let index = self
            .tail
            .iter()
            .position(|b| b.base_offset == to)
            .expect("batches not durable in the segment stay in memory");
        let (segment, position) =
            self.entered(to, self.tail[index].segment, self.tail[index].position);
        self.offsets.rewind_written(to);
        self.copy_index = index;
        self.copy_offset = 0;
        self.copied_offset = to;
        self.write_segment = segment;
        self.next_write_position = position;
        self.written_position = position;
        self.durable_position = durable_position.min(position);
        self.zeroed_end = self.zeroed_end.min(align_down(position));
        self.carry_len = 0;
        self.carry_state = if position.is_multiple_of(block_bytes as u64) {
            CarryState::Ready
        } else {
            CarryState::NeedsLoad
        };
    }

    /// The log ends (or is written again from) `to`, found at `position` of `segment`. A segment
    /// the log has not rolled into yet (no file: its first batch waited for the roll when the
    /// failure came) is not entered: the log stays at the end of the segment before it, which
    /// is then cut like any write segment, and rolls again when that batch is written. Entering
    /// it would leave the segment before it unsealed — not cut to its size, not synced, without
    /// indexes — in the middle of the log, where a restart refuses it as damaged.
    fn entered(&self, to: u64, segment: u64, position: u64) -> (u64, u64) {
        if position == 0 && to == segment && self.segments[&segment].file.is_none() {
            if let Some((&before, s)) = self.segments.range(..segment).next_back() {
                return (before, s.size);
            }
        }
        (segment, position)
    }

    /// Where the batch starting at `to` lies, if known without reading the disk: in the tail, or
    /// at a segment's start or end.
    fn position_in_memory(&self, to: u64) -> Option<u64> {
        if let Some(b) = self.tail.iter().find(|b| b.base_offset == to) {
            return Some(b.position);
        }
        let segment = self.segments.range(..=to).next_back().map(|(_, s)| s)?;
        if to == segment.base_offset {
            Some(0)
        } else if to == segment.next_offset {
            Some(segment.size)
        } else {
            None
        }
    }

    // ---------------------------------------------------------------------------------------------
    // Truncation (replication's divergence repair, and rollback after failures)

    pub fn truncate_to(&mut self, offset: u64, reply: Reply<()>) {
        if let Some(old) = self.truncate.replace(PendingTruncate { offset, reply }) {
            let _ = old.reply.send(Err(Error::Truncated { offset }));
        }
    }

    fn start_truncate(&mut self, io: &mut IoCtx<'_>) {
        let PendingTruncate { offset, reply } = self.truncate.take().expect("pending");
        if offset >= self.offsets.appended().0 {
            let _ = reply.send(Ok(()));
            return;
        }
        // Answered when the cut on disk completes (or fails).
        self.truncate_reply = Some(reply);
        let offset = offset.max(self.log_start_offset);
        // The log ends at the start of the batch containing `offset`.
        let to = match self.tail.front() {
            Some(front) if front.base_offset <= offset => self
                .tail
                .iter()
                .find(|b| b.next_offset > offset)
                .map_or(offset, |b| b.base_offset),
            _ => offset,
        };
        match self.position_in_memory(to) {
            Some(position) => {
                self.apply_truncation(to, position);
                self.start_cut(io);
            }
            None => self.start_locate(io, offset),
        }
    }

    /// Find on disk the batch containing `offset`; `ControlDone::Located` applies the truncation.
    fn start_locate(&mut self, io: &mut IoCtx<'_>, offset: u64) {
        let (&base, segment) = self
            .segments
            .range(..=offset)
            .next_back()
            .expect("offset ≥ log start");
        let start = segment.index.lookup(segment.relative(offset)).1 as u64;
        let limit = self.disk_limit(base);
        let file = segment.file.clone();
        let log_path = segment.log_path.clone();
        let storage = io.storage.clone();
        let max_batch = io.max_batch_bytes;
        self.start_control(io, async move {
            let file = match file {
                Some(f) => f,
                None => storage
                    .open(&log_path, false)
                    .await
                    .map_err(|e| Error::io("open", &log_path, e))?,
            };
            let (position, base_offset) =
                read::locate(file.as_ref(), start, limit, offset, max_batch).await?;
            Ok(ControlDone::Located {
                position,
                base_offset,
            })
        });
    }

    /// Forget everything at or after offset `to` (a batch boundary) in memory; `position` is where
    /// that batch starts in its segment.
    fn apply_truncation(&mut self, to: u64, position: u64) {
        let error = Error::Truncated { offset: to };
        self.fail_waiters_after(to, &error);
        let (&found, _) = self
            .segments
            .range(..=to)
            .next_back()
            .expect("to ≥ log start");
        let (base, position) = self.entered(to, found, position);
        let removed: Vec<u64> = self.segments.range(base + 1..).map(|(&b, _)| b).collect();
        for b in removed {
            self.segments.remove(&b);
        }
        let segment = self.segments.get_mut(&base).expect("exists");
        segment.truncate(position, to);
        segment.sealed = false;
        while self.tail.back().is_some_and(|b| b.base_offset >= to) {
            let b = self.tail.pop_back().expect("checked");
            self.tail_bytes -= b.bytes.len();
        }
        self.offsets.truncate(to);
        self.journal_offset = self.journal_offset.min(to);
        self.journal_durable = self.journal_durable.min(to);
        if let Some(target) = &mut self.checkpoint_target {
            *target = (*target).min(to);
        }
        if self.epochs.truncate_from_end(to) {
            self.epochs_dirty = true;
        }
        self.copy_index = self.tail.len();
        self.copy_offset = 0;
        self.copied_offset = to;
        self.write_segment = base;
        self.next_write_position = position;
        self.written_position = position;
        // A rollback that keeps written bytes (a failed write keeps what was written before it,
        // or the journal kept more) leaves them as durable as they were: only a sync makes them
        // durable, and a failed flush before it must still find them (`Event::FlushLost`).
        if self.offsets.durable().0 >= to {
            self.durable_position = position;
        } else {
            self.durable_position = self.durable_position.min(position);
        }
        // The cut drops the file past `position`: what lies there is no longer laid out.
        self.zeroed_end = self.zeroed_end.min(align_down(position));
        self.carry_len = 0;
        self.carry_state = if position.is_multiple_of(block_bytes as u64) {
            CarryState::Ready
        } else {
            CarryState::NeedsLoad
        };
    }

    /// Make the disk match memory after a truncation: cut the active file to its size, delete
    /// later segment files, persist the recovery point and epochs.
    fn start_cut(&mut self, io: &mut IoCtx<'_>) {
        let segment = &self.segments[&self.write_segment];
        // After a rewind the batches from the write head on are written again: cut there.
        let size = segment.size.min(self.next_write_position);
        let reserved = segment.allocated;
        tracing::trace!(target: "keel::durability", partition = %self.id,
            segment = self.write_segment, size, "cut");
        let log_path = segment.log_path.clone();
        let file = segment.file.clone();
        let storage = io.storage.clone();
        let dir = self.dir.clone();
        let stale: Vec<String> = storage
            .list_dir(&dir)
            .unwrap_or_default()
            .into_iter()
            .filter(|name| {
                name.split('.')
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|b| b > self.write_segment)
            })
            .collect();
        let checkpoint = RecoveryPoint::segment_start(self.write_segment);
        // Before the file changes, nothing on disk may vouch for the bytes the cut removes
        // (decisions 39 and 41): a recovery point inside this segment trusts its bytes up to the
        // point, and one naming a later segment (the log went back past a roll, or a truncation
        // reaches into an earlier segment) lets a restart trust this one whole, unscanned. So
        // the later segments go first (a point naming one of them then names nothing, and a
        // restart scans from the first segment), and the point moves to this segment's start:
        // a restart scans it, whatever state the cut leaves it in. Otherwise the point already
        // names this segment's start, or an earlier one.
        let move_point = self.recovery_point_at > 0 || !stale.is_empty();
        let epochs = self.epochs.encode();
        self.epochs_dirty = false;
        self.start_control(io, async move {
            if !stale.is_empty() {
                let paths = stale.into_iter().map(|name| dir.join(name));
                crate::recovery::remove_durably(storage.as_ref(), &dir, paths).await?;
            }
            if move_point {
                checkpoint.write(storage.as_ref(), &dir).await?;
            }
            let file = match file {
                Some(f) => f,
                None => storage
                    .open(&log_path, true)
                    .await
                    .map_err(|e| Error::io("open", &log_path, e))?,
            };
            // The cut is what removes batches whose appends were failed: a write error in it is
            // tried again at once (a transient error would otherwise leave them on disk until
            // the retry after `rewrite_backoff`, and a crash in between would bring them back).
            // Not a failed fsync: a second one that succeeds would not make what the first
            // covered durable, so that failure goes back to the durable point (`fail`).
            let mut attempt = 1;
            let allocated = loop {
                match crate::recovery::cut(file.as_ref(), size, reserved).await {
                    Ok(allocated) => break allocated,
                    Err(e @ Error::Io { .. }) if !e.is_failed_sync() && attempt < cut_attempts => {
                        attempt += 1
                    }
                    Err(e) => return Err(e),
                }
            };
            let epoch_path = dir.join(path::LEADER_EPOCH_FILE);
            storage
                .write_file_durable(&epoch_path, epochs)
                .await
                .map_err(|e| Error::io("write", &epoch_path, e))?;
            Ok(ControlDone::Cut { file, allocated })
        });
    }

    // ---------------------------------------------------------------------------------------------
    // Reads

    /// The end of the bytes of segment `base` that are on disk: up to the first batch still only
    /// in memory (or the whole segment).
    fn disk_limit(&self, base: u64) -> u64 {
        self.tail
            .iter()
            .find(|b| b.segment == base)
            .map_or(self.segments[&base].size, |b| b.position)
    }

    fn upper(&self, upper: ReadUpper) -> u64 {
        let appended = self.offsets.appended().0;
        match upper {
            ReadUpper::Durable => self.durable_end(),
            ReadUpper::Written => self.written_end(),
            ReadUpper::Appended => appended,
            ReadUpper::Offset(o) => o.min(appended),
        }
    }

    /// Answer from memory, or return what the shard must read from disk.
    pub fn read(
        &self,
        offset: u64,
        options: ReadOptions,
    ) -> Result<std::result::Result<ReadResult, DiskRead>> {
        let log_end = self.offsets.appended().0;
        if offset < self.log_start_offset || offset > log_end {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                log_start_offset: self.log_start_offset,
                log_end_offset: log_end,
            });
        }
        let mut result = ReadResult {
            chunks: Vec::new(),
            next_offset: offset,
            log_start_offset: self.log_start_offset,
            log_end_offset: log_end,
            durable_offset: self.durable_end(),
            written_offset: self.written_end(),
        };
        let upper = self.upper(options.upper);
        if offset >= upper {
            return Ok(Ok(result));
        }
        if self.tail.front().is_some_and(|b| b.base_offset <= offset) {
            let first = self.tail.partition_point(|b| b.next_offset <= offset);
            let mut total = 0;
            for b in self.tail.range(first..) {
                if b.base_offset >= upper
                    || (total > 0 && total + b.bytes.len() > options.max_bytes)
                {
                    break;
                }
                total += b.bytes.len();
                result.chunks.push(b.bytes.clone());
                result.next_offset = b.next_offset;
            }
            return Ok(Ok(result));
        }
        let (&base, segment) = self
            .segments
            .range(..=offset)
            .next_back()
            .expect("offset ≥ log start");
        Ok(Err(DiskRead {
            file: segment.file.clone(),
            log_path: segment.log_path.clone(),
            start_position: segment.index.lookup(segment.relative(offset)).1 as u64,
            limit_position: self.disk_limit(base),
            offset,
            upper,
            max_bytes: options.max_bytes,
            result,
        }))
    }

    /// Where a search for the first batch with maxTimestamp ≥ `timestamp` starts, or `None` if no
    /// segment reaches that time.
    pub fn timestamp_search(&self, timestamp: i64) -> Option<DiskRead> {
        let (&base, segment) = self
            .segments
            .iter()
            .find(|(_, s)| s.max_timestamp >= timestamp)?;
        let relative = segment.time_index.lookup(timestamp);
        let start_position = segment.index.lookup(relative).1 as u64;
        let end = self.offsets.appended().0;
        Some(DiskRead {
            file: segment.file.clone(),
            log_path: segment.log_path.clone(),
            start_position,
            limit_position: self.disk_limit(base),
            offset: base + relative as u64,
            upper: end,
            max_bytes: usize::MAX,
            result: ReadResult {
                chunks: Vec::new(),
                next_offset: base,
                log_start_offset: self.log_start_offset,
                log_end_offset: end,
                durable_offset: self.durable_end(),
                written_offset: self.written_end(),
            },
        })
    }

    /// Batches of the in-memory tail from `offset` on (for timestamp searches that run past disk).
    pub fn tail_headers_from(&self, offset: u64) -> Vec<BatchHeader> {
        self.tail
            .iter()
            .filter(|b| b.next_offset > offset)
            .filter_map(|b| BatchHeader::parse(&b.bytes).ok())
            .collect()
    }

    /// Drop the oldest cached batches beyond this partition's own `cache.bytes`.
    fn evict_cache(&mut self) {
        while self.tail_bytes > self.config.cache_bytes && self.evict_oldest().is_some() {}
    }

    /// Bytes of batches held in memory (the read cache, and what is not yet written or durable).
    pub fn cached_bytes(&self) -> usize {
        self.tail_bytes
    }

    /// When the oldest batch that could be evicted now was appended.
    pub fn oldest_evictable(&self) -> Option<Instant> {
        // Every-batch logs keep what is not yet durable in the segment: the journal may need it,
        // and a rollback after a failed sync writes it again if the journal made it durable.
        let limit = match self.config.flush {
            FlushPolicy::EveryBatch => self.offsets.durable().0,
            FlushPolicy::Interval { .. } => self.offsets.written().0,
        };
        let front = self.tail.front()?;
        (self.copy_index > 0 && front.next_offset <= limit).then_some(front.appended_at)
    }

    /// Drop the oldest cached batch if it may go; returns the bytes freed.
    pub fn evict_oldest(&mut self) -> Option<usize> {
        self.oldest_evictable()?;
        let b = self.tail.pop_front().expect("checked");
        self.tail_bytes -= b.bytes.len();
        self.copy_index -= 1;
        Some(b.bytes.len())
    }

    // ---------------------------------------------------------------------------------------------
    // Retention

    /// Segments that retention removes now (never the active one). They leave the log at once;
    /// the caller deletes their files.
    /// Remove (and return) the oldest sealed segments that retention (`retention.bytes`,
    /// `retention.ms`) or `below` (every offset in the segment is below it) lets go. The active
    /// segment always stays.
    pub fn expire_segments(&mut self, now_ms: i64, below: Option<u64>) -> Vec<Segment> {
        let mut expired = Vec::new();
        let mut total: u64 = self.segments.values().map(|s| s.size).sum();
        while self.segments.len() > 1 {
            let first = self.segments.values().next().expect("non-empty");
            let by_size = self
                .config
                .retention_bytes
                .is_some_and(|max| total > max && total - first.size >= max);
            let by_time = self
                .config
                .retention_ms
                .is_some_and(|ms| first.max_timestamp < now_ms.saturating_sub(ms as i64));
            let by_offset = below.is_some_and(|o| first.next_offset <= o);
            if !first.sealed || !(by_size || by_time || by_offset) {
                break;
            }
            let (_, segment) = self.segments.pop_first().expect("non-empty");
            total -= segment.size;
            expired.push(segment);
        }
        if let Some(&start) = self.segments.keys().next() {
            if start != self.log_start_offset {
                self.log_start_offset = start;
                if self.epochs.truncate_from_start(start) {
                    self.epochs_dirty = true;
                }
            }
        }
        expired
    }

    /// Fail everything waiting and refuse further calls (the partition is being deleted).
    pub fn close(&mut self, error: &Error) {
        self.deleted = true;
        self.fail_waiters_after(0, error);
        for (_, e) in &mut self.rolled_back {
            e.get_or_insert_with(|| error.duplicate());
        }
        self.answer_rolled_back();
        if let Some(p) = self.truncate.take() {
            let _ = p.reply.send(Err(error.duplicate()));
        }
    }

    /// The state a clean shutdown records so the next open skips the scan.
    pub fn shutdown_metadata(&self) -> (Vec<(PathBuf, Vec<u8>)>, RecoveryPoint) {
        let active = &self.segments[&self.write_segment];
        let mut files = vec![
            (active.index_path(), active.index.encode()),
            (
                active.time_index_path(),
                active.finished_time_index().encode(),
            ),
        ];
        // The leader-epoch file only if it is behind: usually it was written when the epoch
        // began, and every file a shutdown creates costs the file system (decision 38).
        if self.epochs_pending() {
            files.push((self.dir.join(path::LEADER_EPOCH_FILE), self.epochs.encode()));
        }
        let marker = RecoveryPoint {
            segment: self.write_segment,
            position: active.size,
            next_offset: active.next_offset,
            incarnation: None,
        };
        (files, marker)
    }
}

/// Where recovery may start scanning (`recovery-point`), or, as the clean-shutdown marker, where the
/// log ends. Text: `segment position next_offset`, and for a point inside a segment the
/// partition's incarnation after them (FORMAT.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecoveryPoint {
    pub segment: u64,
    pub position: u64,
    pub next_offset: u64,
    /// Set for a point inside the active segment (`persist_recovery_point`): recovery trusts its
    /// prefix only in the incarnation that wrote it, never in a partition created again in its
    /// place.
    pub incarnation: Option<u64>,
}

impl RecoveryPoint {
    /// The start of segment `base`: everything before it is trusted, the segment is scanned.
    pub fn segment_start(base: u64) -> RecoveryPoint {
        RecoveryPoint {
            segment: base,
            position: 0,
            next_offset: base,
            incarnation: None,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut text = format!("{} {} {}", self.segment, self.position, self.next_offset);
        if let Some(incarnation) = self.incarnation {
            text.push_str(&format!(" {incarnation}"));
        }
        text.push('\n');
        text.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<RecoveryPoint> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split_whitespace().map(|p| p.parse::<u64>());
        let point = RecoveryPoint {
            segment: parts.next()?.ok()?,
            position: parts.next()?.ok()?,
            next_offset: parts.next()?.ok()?,
            incarnation: match parts.next() {
                Some(i) => Some(i.ok()?),
                None => None,
            },
        };
        parts.next().is_none().then_some(point)
    }

    pub async fn write(&self, storage: &dyn Storage, dir: &std::path::Path) -> Result<()> {
        let path = dir.join(path::RECOVERY_POINT_FILE);
        storage
            .write_file_durable(&path, self.encode())
            .await
            .map_err(|e| Error::io("write", &path, e))
    }
}

/// The length to fallocate the write segment to when a write needs `want_end` bytes of it: the
/// file grows by as much as it already has (doubling from `preallocate_first_bytes`), by
/// `preallocate` at most, and past the segment size only as far as the write itself needs.
fn allocation_target(allocated: u64, want_end: u64, preallocate: u64, segment_bytes: u64) -> u64 {
    let step = allocated.max(preallocate_first_bytes).min(preallocate);
    align_up(
        want_end
            .max(allocated + step)
            .min(segment_bytes.max(want_end)),
    )
}

/// fallocate `file` to `len` bytes; on a full disk, to `need` bytes alone (what the write at hand
/// needs; 0: nothing), so room reserved for later never refuses data that fits now. Returns the
/// length allocated and whether it was cut short.
async fn allocate_or_less(file: &dyn StorageFile, len: u64, need: u64) -> Result<(u64, bool)> {
    let _space = crate::io::SPACE.lock().await;
    match file.allocate(len).await {
        Ok(()) => Ok((len, false)),
        Err(e) if need < len && crate::error::is_full(&e) => {
            if need > 0 {
                file.allocate(need)
                    .await
                    .map_err(|e| Error::io("fallocate", file.path(), e))?;
            }
            Ok((need, true))
        }
        Err(e) => Err(Error::io("fallocate", file.path(), e)),
    }
}

/// Make an allocation durable before `Segment::allocated` counts it: the shard journal
/// acknowledges data only where segment space is allocated (`journal_space_reserved`), so a
/// replay after a power cut must find that space still there, not ask a full disk for it. An
/// fdatasync commits the file's new size with the file system's journal (an fdatasync of the
/// shard journal's pre-allocated file would not). Only for journaled partitions (elsewhere the
/// fdatasync of the data written into the space commits it), once per allocation step
/// (doubling, then `preallocate_bytes`), off the path of every append.
async fn sync_allocation(file: &dyn StorageFile, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    file.sync_data()
        .await
        .map_err(|e| Error::io("fdatasync", file.path(), e))
}

/// Take ownership of the caller's bytes for in-place header rewrites; copies only when shared.
fn into_mut(bytes: Bytes) -> BytesMut {
    bytes
        .try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

/// A sync of `path` succeeded, but a flush failed on the node since the writes it covers
/// (`Error::is_lost_flush`).
fn lost_flush_error(path: &std::path::Path) -> Error {
    Error::io(
        "flush",
        path,
        io::Error::other("a flush failed on this node since these writes completed"),
    )
}

fn complete(waiter: Waiter, durability: Durability, log_start_offset: u64) {
    let _ = waiter.reply.send(Ok(AppendOutcome {
        durability,
        log_start_offset,
        ..waiter.outcome
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_files_grow_by_doubling_up_to_the_preallocation_step() {
        let (mib, step, segment) = (1 << 20, 64 << 20, 1 << 30);
        let mut allocated = 0;
        let mut lengths = Vec::new();
        while allocated < 200 * mib {
            allocated = allocation_target(allocated, allocated + 4096, step, segment);
            lengths.push(allocated / mib);
        }
        assert_eq!(lengths, [1, 2, 4, 8, 16, 32, 64, 128, 192, 256]);
        // A write larger than the step gets what it needs; the segment size bounds the step but
        // not the write.
        assert_eq!(
            allocation_target(mib, 10 * mib + 1, 2 * mib, segment),
            10 * mib + 4096
        );
        assert_eq!(
            allocation_target(3 * mib, 3 * mib + 1, step, 4 * mib),
            4 * mib
        );
        assert_eq!(allocation_target(4 * mib, 5 * mib, step, 4 * mib), 5 * mib);
        // A step configured below the first one is used as it is.
        assert_eq!(allocation_target(0, 1, 64 << 10, segment), 64 << 10);
    }
}
