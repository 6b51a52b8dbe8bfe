//! The shard journal's write pipeline: which writes are in flight, which are written but not yet
//! synced, and which prefix of the journal is durable. Pure bookkeeping: the shard submits the
//! I/O and feeds the completions back.
//!
//! Journal writes stream: a new write starts whenever a buffer is free and partitions have small
//! groups waiting, while earlier writes are still in flight; one fdatasync at a time covers every
//! write completed before it was issued. So the device sees several journal writes queued, and
//! fdatasyncs back to back, instead of write → sync → write in lock step.
//!
//! What makes that safe (replay stops at the first torn or missing record):
//!
//! * **Acknowledged in journal order.** A sync covers the longest prefix of pending writes that
//!   are all written; only that prefix becomes durable, and its members are told in order. A write
//!   that completed (even synced by luck) behind a write still in flight is never acknowledged
//!   before it, so nothing acknowledged ever lies behind a hole replay would stop at.
//! * **A new lap waits for the durable head.** A write that does not fit before the ring's end
//!   starts the next lap, and replay reaches it by trying the lap start when the record it expects
//!   is missing. That is only right if nothing before the lap start can be missing for another
//!   reason, so such a write starts only once every earlier write is durable.
//! * **A failure ends the journal's run.** After a failed write or sync, nothing pending is
//!   acknowledged (the shard turns the journal off); completions still in flight only give their
//!   buffers back. The shard may [`restart`](Pipeline::restart) it later from a new header.

use std::collections::VecDeque;

use crate::constants::{checkpoint_writes_inflight_max, shard_writes_inflight_max};
use crate::io::AlignedBuf;
use crate::partition::Route;

use super::{place, Header};

/// One journal write that is not durable yet.
#[derive(Debug)]
struct Pending {
    /// Logical position after the write (its last record points here).
    end: u64,
    /// Each member partition and the offset its record covers up to.
    members: Vec<(Route, u64)>,
    written: bool,
    /// Issued durable by itself (`RWF_DSYNC`): durable once written, no sync needed.
    durable_when_written: bool,
}

/// The pipeline of one shard's journal.
#[derive(Debug)]
pub(crate) struct Pipeline {
    /// The header as last written: its checkpoint is where replay would start.
    pub header: Header,
    /// Logical position of the next write.
    head: u64,
    /// Every write before this position is written and synced.
    durable_head: u64,
    /// Writes issued and not yet durable, in journal order.
    pending: VecDeque<Pending>,
    /// A sync is in flight for the pending writes up to this end.
    sync_inflight: Option<u64>,
    /// A header write is in flight.
    pub header_inflight: bool,
    /// A journal I/O failed: the journal takes nothing more until the shard restarts it.
    pub failed: bool,
    /// A checkpoint at this position waits for partitions' segments to become durable.
    pub checkpoint_at: Option<u64>,
    /// Free write buffers (one per write that can be in flight).
    buffers: Vec<AlignedBuf>,
    /// All of them: fewer free means writes in flight.
    buffers_total: usize,
}

impl Pipeline {
    /// A pipeline whose next write goes to `header.checkpoint`, with `buffers` to write from.
    pub fn new(header: Header, buffers: Vec<AlignedBuf>) -> Pipeline {
        assert!(!buffers.is_empty(), "a journal needs a write buffer");
        Pipeline {
            header,
            head: header.checkpoint,
            durable_head: header.checkpoint,
            pending: VecDeque::new(),
            sync_inflight: None,
            header_inflight: false,
            failed: false,
            checkpoint_at: None,
            buffers_total: buffers.len(),
            buffers,
        }
    }

    pub fn durable_head(&self) -> u64 {
        self.durable_head
    }

    /// Logical position of the next write.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// No write, sync or header write of this pipeline is in flight (after a failure too: its
    /// late completions still come back here).
    pub fn idle(&self) -> bool {
        self.buffers.len() == self.buffers_total
            && self.sync_inflight.is_none()
            && !self.header_inflight
    }

    /// Start again after a failure, from `header` (already durable): its checkpoint is at or past
    /// every position written before, so replay never reaches an old record. Every I/O of the
    /// failed pipeline must be back ([`idle`](Self::idle)).
    pub fn restart(&mut self, header: Header) {
        assert!(self.failed, "only a failed pipeline restarts");
        assert!(self.idle(), "the failed run's I/O is back");
        assert!(header.checkpoint >= self.head, "a restart never goes back");
        self.header = header;
        self.head = header.checkpoint;
        self.durable_head = header.checkpoint;
        self.pending.clear();
        self.failed = false;
        self.checkpoint_at = None;
    }

    /// How many segment writes the shard may have in flight before a checkpoint's writes wait
    /// (ARCHITECTURE.md, decisions 12 and 18). While the ring has room, few: a checkpoint's
    /// writes queued ahead of the journal's own delay every append. As the ring fills, more, up
    /// to all the shard's: once it is full every append waits for the checkpoint to end.
    pub fn checkpoint_writes_max(&self) -> usize {
        let (low, high) = (checkpoint_writes_inflight_max, shard_writes_inflight_max);
        let capacity = self.header.capacity;
        let used = self.head - self.header.checkpoint;
        let (calm, full) = (capacity / 8 * 5, capacity / 8 * 7);
        if used <= calm {
            return low;
        }
        let urgency = (used.min(full) - calm) as f64 / (full - calm) as f64;
        low + ((high - low) as f64 * urgency).round() as usize
    }

    /// A buffer for the next write, if one is free and the journal works.
    pub fn take_buffer(&mut self) -> Option<AlignedBuf> {
        if self.failed {
            return None;
        }
        self.buffers.pop()
    }

    /// A buffer comes back (its write completed, or the write was not issued after all).
    pub fn give_back(&mut self, mut buf: AlignedBuf) {
        buf.clear();
        self.buffers.push(buf);
    }

    /// Where a write of `len` bytes (whole blocks) goes now: `None` if the ring has no room before
    /// the checkpoint, or if it would start a new lap while earlier writes are not durable.
    pub fn place(&self, len: u64) -> Option<u64> {
        let start = place(self.head, self.header.checkpoint, self.header.capacity, len)?;
        (start == self.head || self.pending.is_empty()).then_some(start)
    }

    /// Would a write of one block fit now? If not, no write does (`place` only fails more for
    /// longer writes) until a checkpoint completes or a new lap may start.
    pub fn has_room(&self) -> bool {
        self.place(crate::constants::block_bytes as u64).is_some()
    }

    /// Does the next write go out durable by itself (`StorageFile::write_at_durable`)? Yes when
    /// nothing else is pending: the write would otherwise be followed by a sync of its own, and
    /// one durable write is one I/O instead of two (and no punt to a worker thread, which
    /// io_uring does for every fsync). With writes pending, the next one is a plain write that a
    /// sync covers together with them: one flush for many writes.
    pub fn next_write_durable(&self) -> bool {
        self.pending.is_empty()
    }

    /// A write of `len` bytes at `start` (from [`place`](Self::place)) is being issued, durable
    /// by itself if `durable` (as [`next_write_durable`](Self::next_write_durable) said).
    pub fn begin_write(&mut self, start: u64, len: u64, members: Vec<(Route, u64)>, durable: bool) {
        assert!(start >= self.head, "journal writes go forward");
        assert!(
            start == self.head || self.pending.is_empty(),
            "a new lap starts once the journal is durable"
        );
        self.head = start + len;
        self.pending.push_back(Pending {
            end: self.head,
            members,
            written: false,
            durable_when_written: durable,
        });
    }

    /// The write ending at `end` completed successfully. Returns, in journal order, the members
    /// of the writes that are durable now: written durable writes at the front of the journal.
    pub fn on_written(&mut self, end: u64) -> Vec<(Route, u64)> {
        if self.failed {
            return Vec::new();
        }
        let write = self
            .pending
            .iter_mut()
            .find(|w| w.end == end)
            .expect("a completed journal write is pending");
        assert!(!write.written, "a journal write completes once");
        write.written = true;
        let mut members = Vec::new();
        while self
            .pending
            .front()
            .is_some_and(|w| w.written && w.durable_when_written)
        {
            let write = self.pending.pop_front().expect("checked");
            members.extend(write.members);
            self.durable_head = write.end;
        }
        members
    }

    /// A sync to issue now, if none is in flight and written writes wait for one: it covers the
    /// pending writes up to the returned end (the written prefix).
    pub fn next_sync(&mut self) -> Option<u64> {
        if self.failed || self.sync_inflight.is_some() {
            return None;
        }
        let upto = self.pending.iter().take_while(|w| w.written).last()?.end;
        self.sync_inflight = Some(upto);
        Some(upto)
    }

    /// The sync issued for the writes up to `upto` succeeded: they are durable. Returns their
    /// members in journal order.
    pub fn on_synced(&mut self, upto: u64) -> Vec<(Route, u64)> {
        if self.failed {
            self.sync_inflight = None; // a late completion: the sync is back
            return Vec::new();
        }
        assert_eq!(self.sync_inflight.take(), Some(upto), "the sync in flight");
        let mut members = Vec::new();
        while self.pending.front().is_some_and(|w| w.end <= upto) {
            let write = self.pending.pop_front().expect("checked");
            assert!(write.written, "a sync covers only written writes");
            members.extend(write.members);
        }
        assert!(upto > self.durable_head, "the durable head moves forward");
        self.durable_head = upto;
        members
    }

    /// The sync issued for the writes up to `upto` failed (or a failure since makes it vouch
    /// for nothing): it is back, and acknowledges nothing. [`fail`](Self::fail) follows.
    pub fn on_sync_failed(&mut self, upto: u64) {
        let inflight = self.sync_inflight.take();
        assert!(self.failed || inflight == Some(upto), "the sync in flight");
    }

    /// A write or sync failed: nothing pending becomes durable. Returns every pending member
    /// (in journal order) so its partition can fall back to its segment.
    pub fn fail(&mut self) -> Vec<(Route, u64)> {
        self.failed = true;
        self.pending.drain(..).flat_map(|w| w.members).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::constants::block_bytes;
    use crate::PartitionId;

    const B: u64 = block_bytes as u64;

    fn pipeline(capacity: u64, checkpoint: u64, buffers: usize) -> Pipeline {
        let header = Header {
            capacity,
            seq: 1,
            checkpoint,
        };
        Pipeline::new(
            header,
            (0..buffers).map(|_| AlignedBuf::new(block_bytes)).collect(),
        )
    }

    fn member(p: u32, offset: u64) -> Vec<(Route, u64)> {
        vec![(Route::current(PartitionId::new("t", p)), offset)]
    }

    /// A plain write (covered by a sync).
    fn issue(j: &mut Pipeline, len: u64, members: Vec<(Route, u64)>) -> u64 {
        let start = j.place(len).expect("room");
        j.begin_write(start, len, members, false);
        start + len
    }

    #[test]
    fn a_checkpoint_may_have_more_writes_in_flight_as_the_ring_fills() {
        let (low, high) = (checkpoint_writes_inflight_max, shard_writes_inflight_max);
        let mut j = pipeline(64 * B, 8 * B, 1);
        let mut gates = Vec::new();
        for _ in 0..64 {
            gates.push((j.head - j.header.checkpoint, j.checkpoint_writes_max()));
            let start = j.place(B).expect("room");
            j.begin_write(start, B, Vec::new(), false);
        }
        for &(used, gate) in &gates {
            match used {
                u if u <= 40 * B => assert_eq!(gate, low, "{u}: the ring has room"),
                u if u >= 56 * B => assert_eq!(gate, high, "{u}: the ring is nearly full"),
                u => assert!(low < gate && gate < high, "{u}: {gate} lies between"),
            }
        }
        assert!(
            gates.windows(2).all(|w| w[0].1 <= w[1].1),
            "the gate never narrows as the ring fills: {gates:?}"
        );
        assert_eq!(j.place(B), None, "and the ring is full");
    }

    #[test]
    fn a_write_issued_alone_is_durable_when_written_and_those_behind_it_wait_for_a_sync() {
        let mut j = pipeline(64 * B, 0, 3);
        assert!(j.next_write_durable(), "nothing pending");
        let start = j.place(B).expect("room");
        j.begin_write(start, B, member(1, 10), true);
        let w1 = start + B;
        assert!(!j.next_write_durable(), "w1 is pending");
        let w2 = issue(&mut j, B, member(2, 20));
        // w2 completes first: nothing is durable (w1 is still in flight, and w2 needs a sync).
        assert_eq!(j.on_written(w2), Vec::new());
        assert_eq!(j.next_sync(), None, "w1 in flight holds the prefix");
        // w1 completes: durable by itself, acknowledged at once, no sync for it.
        assert_eq!(j.on_written(w1), member(1, 10));
        assert_eq!(j.durable_head(), w1);
        // w2 still needs its sync.
        assert_eq!(j.next_sync(), Some(w2));
        assert_eq!(j.on_synced(w2), member(2, 20));
        assert!(j.next_write_durable());
    }

    #[test]
    fn writes_become_durable_in_journal_order_whatever_order_they_complete_in() {
        let mut j = pipeline(64 * B, 0, 3);
        let w1 = issue(&mut j, B, member(1, 10));
        let w2 = issue(&mut j, 2 * B, member(2, 20));
        let w3 = issue(&mut j, B, member(1, 30));
        // The second completes first: nothing to sync, the first is still in flight.
        j.on_written(w2);
        assert_eq!(j.next_sync(), None);
        j.on_written(w1);
        assert_eq!(j.next_sync(), Some(w2));
        // The third completes while that sync runs: it waits for the next sync.
        j.on_written(w3);
        assert_eq!(j.next_sync(), None);
        assert_eq!(j.on_synced(w2), [member(1, 10), member(2, 20)].concat());
        assert_eq!(j.durable_head(), w2);
        assert_eq!(j.next_sync(), Some(w3));
        assert_eq!(j.on_synced(w3), member(1, 30));
        assert_eq!(j.durable_head(), w3);
        assert_eq!(j.next_sync(), None);
    }

    #[test]
    fn a_new_lap_waits_until_everything_before_it_is_durable() {
        let mut j = pipeline(8 * B, 0, 2);
        let w1 = issue(&mut j, 4 * B, member(1, 1));
        j.on_written(w1);
        assert_eq!(j.next_sync(), Some(w1));
        j.on_synced(w1);
        j.header.checkpoint = w1; // as a checkpoint would
        let w2 = issue(&mut j, 2 * B, member(1, 2));
        // 3 blocks do not fit before the ring's end: they would start the next lap.
        assert_eq!(j.place(3 * B), None, "w2 is in flight");
        j.on_written(w2);
        assert_eq!(j.next_sync(), Some(w2));
        assert_eq!(j.place(3 * B), None, "written is not durable");
        j.on_synced(w2);
        assert_eq!(j.place(3 * B), Some(8 * B));
        // A write that fits stays in the lap, in flight or not.
        assert_eq!(j.place(2 * B), Some(6 * B));
        // The next lap is free only up to the checkpoint's data.
        assert_eq!(j.place(5 * B), None);
    }

    #[test]
    fn no_write_fits_once_one_block_does_not() {
        let mut j = pipeline(8 * B, 0, 2);
        for (i, blocks) in [3, 3, 2].into_iter().enumerate() {
            assert!(j.has_room(), "write {i}");
            issue(&mut j, blocks * B, member(1, i as u64));
        }
        assert!(!j.has_room(), "the ring is full up to its checkpoint");
        assert!((1..=8).all(|n| j.place(n * B).is_none()));
    }

    #[test]
    fn after_a_failure_nothing_pending_is_acknowledged() {
        let mut j = pipeline(64 * B, 0, 2);
        let w1 = issue(&mut j, B, member(1, 10));
        let w2 = issue(&mut j, B, member(2, 20));
        j.on_written(w1);
        let upto = j.next_sync().expect("w1 is written");
        // w2's write fails while w1's sync runs.
        assert_eq!(j.fail(), [member(1, 10), member(2, 20)].concat());
        // Late completions change nothing and acknowledge nothing.
        assert_eq!(j.on_synced(upto), Vec::new());
        j.on_written(w2);
        assert_eq!(j.next_sync(), None);
        assert!(j.take_buffer().is_none());
        assert_eq!(j.durable_head(), 0);
    }

    #[test]
    fn a_restart_goes_on_from_a_new_checkpoint_past_every_old_write() {
        let mut j = pipeline(64 * B, 0, 1);
        let w1 = issue(&mut j, B, member(1, 10));
        let buf = j.take_buffer().expect("one buffer");
        j.fail();
        assert!(!j.idle(), "its write is still out");
        j.give_back(buf); // the failed write's completion
        assert_eq!(j.on_written(w1), Vec::new());
        assert!(j.idle());
        let header = Header {
            capacity: 64 * B,
            seq: 2,
            checkpoint: j.head(),
        };
        j.restart(header);
        assert_eq!((j.head(), j.durable_head()), (B, B));
        assert!(j.take_buffer().is_some(), "writes again");
        // The whole ring is free from the new checkpoint on, and acknowledgements resume.
        let w2 = issue(&mut j, 64 * B - B, member(2, 20));
        assert_eq!(j.place(B), Some(64 * B), "one block of the ring is left");
        assert_eq!(j.place(2 * B), None, "and no more");
        assert_eq!(
            j.on_written(w2),
            Vec::new(),
            "a plain write waits for its sync"
        );
        let upto = j.next_sync().expect("w2 is written");
        assert_eq!(j.on_synced(upto), member(2, 20));
    }
}
