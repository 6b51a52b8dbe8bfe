//! Idempotent-producer state of one partition: per producer id, its epoch and its last five
//! batches (sequence ranges and offsets), as Kafka keeps them.
//!
//! A batch is checked and recorded *before* it is handed to the engine, under the partition's
//! lock, so a retry that arrives while the original is still being written finds it (and waits
//! for its offsets) instead of appending a second copy.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

use futures::channel::oneshot;
use futures::future::{FutureExt, Shared};
use kafka_protocol::ResponseError;
use keel_engine::batch::BatchHeader;

/// Kafka keeps this many batches per producer for duplicate detection (and so do clients:
/// `max.in.flight.requests.per.connection` ≤ 5 with idempotence).
pub const batches_per_producer_max: usize = 5;

/// The base offset of a batch whose append has not completed yet; `Err` if it failed.
pub type PendingOffset = Shared<oneshot::Receiver<u64>>;

#[derive(Clone, Debug)]
pub enum BatchOffset {
    Known(u64),
    Pending(PendingOffset),
}

#[derive(Clone, Debug)]
struct BatchEntry {
    first_seq: i32,
    last_seq: i32,
    offset: BatchOffset,
    /// The append attempt that recorded this entry, to remove exactly it on failure.
    ticket: u64,
}

#[derive(Clone, Debug, Default)]
struct Producer {
    epoch: i16,
    batches: VecDeque<BatchEntry>,
    /// Wall-clock milliseconds of its last batch here (for `producer.id.expiration.ms`).
    last_ms: i64,
}

/// What to do with an incoming idempotent batch.
#[derive(Debug)]
pub enum Check {
    /// Append it; report the outcome with [`ProducerStates::complete`] or [`ProducerStates::fail`].
    Append {
        ticket: u64,
        done: oneshot::Sender<u64>,
    },
    /// A retry of a batch already accepted: answer with the original offsets, do not append.
    Duplicate(BatchOffset),
    Reject(ResponseError),
}

#[derive(Debug, Default)]
pub struct ProducerStates {
    producers: HashMap<i64, Producer>,
    next_ticket: u64,
    /// Forget producers idle this long (`producer.id.expiration.ms`); 0 keeps them forever.
    pub expiration_ms: i64,
    checks: u64,
}

/// Look for expired producers once every this many checks (cheap, and bounded work per batch).
const expiry_sweep_every: u64 = 1024;

fn next_seq(seq: i32) -> i32 {
    if seq == i32::MAX {
        0
    } else {
        seq + 1
    }
}

fn last_seq_of(header: &BatchHeader) -> i32 {
    // Sequences wrap at i32::MAX, like offsets deltas within a batch.
    ((header.base_sequence as i64 + header.last_offset_delta as i64) % (i32::MAX as i64 + 1)) as i32
}

impl ProducerStates {
    /// Kafka's sequence rules (`ProducerAppendInfo.checkSequence`): an older epoch is fenced; a new
    /// epoch starts at sequence 0; within an epoch a batch is either one of the last five (a
    /// duplicate) or continues the last one. A producer this partition has never seen (or has
    /// forgotten, e.g. after retention) may start anywhere.
    pub fn check(&mut self, header: &BatchHeader) -> Check {
        self.checks += 1;
        if self.checks.is_multiple_of(expiry_sweep_every) {
            self.expire(crate::now_ms());
        }
        let (pid, epoch) = (header.producer_id, header.producer_epoch);
        let (first, last) = (header.base_sequence, last_seq_of(header));
        if first < 0 {
            return Check::Reject(ResponseError::InvalidRecord);
        }
        if let Some(p) = self.producers.get(&pid) {
            if epoch < p.epoch {
                return Check::Reject(ResponseError::InvalidProducerEpoch);
            }
            if epoch == p.epoch {
                if let Some(dup) = p
                    .batches
                    .iter()
                    .find(|b| b.first_seq == first && b.last_seq == last)
                {
                    return Check::Duplicate(dup.offset.clone());
                }
                match p.batches.back() {
                    Some(prev) if next_seq(prev.last_seq) != first => {
                        return Check::Reject(ResponseError::OutOfOrderSequenceNumber)
                    }
                    None if first != 0 => {
                        return Check::Reject(ResponseError::OutOfOrderSequenceNumber)
                    }
                    _ => {}
                }
            } else if first != 0 {
                return Check::Reject(ResponseError::OutOfOrderSequenceNumber);
            }
        }
        let (done, rx) = oneshot::channel();
        self.next_ticket += 1;
        let ticket = self.next_ticket;
        self.record(
            pid,
            epoch,
            first,
            last,
            BatchOffset::Pending(rx.shared()),
            ticket,
        );
        Check::Append { ticket, done }
    }

    /// Forget producers whose last batch is older than `expiration_ms` and which have nothing
    /// in flight. A forgotten producer may start again at any sequence, as Kafka allows.
    pub fn expire(&mut self, now_ms: i64) {
        if self.expiration_ms <= 0 {
            return;
        }
        let horizon = now_ms - self.expiration_ms;
        self.producers.retain(|_, p| {
            p.last_ms >= horizon
                || p.batches
                    .iter()
                    .any(|b| matches!(b.offset, BatchOffset::Pending(_)))
        });
    }

    fn record(
        &mut self,
        pid: i64,
        epoch: i16,
        first: i32,
        last: i32,
        offset: BatchOffset,
        ticket: u64,
    ) {
        let p = self.producers.entry(pid).or_default();
        p.last_ms = crate::now_ms();
        if epoch != p.epoch {
            p.epoch = epoch;
            p.batches.clear();
        }
        p.batches.push_back(BatchEntry {
            first_seq: first,
            last_seq: last,
            offset,
            ticket,
        });
        while p.batches.len() > batches_per_producer_max {
            p.batches.pop_front();
        }
    }

    /// The append recorded as `ticket` completed at `base_offset`.
    pub fn complete(
        &mut self,
        pid: i64,
        ticket: u64,
        base_offset: u64,
        done: oneshot::Sender<u64>,
    ) {
        if let Some(entry) = self
            .producers
            .get_mut(&pid)
            .and_then(|p| p.batches.iter_mut().find(|b| b.ticket == ticket))
        {
            entry.offset = BatchOffset::Known(base_offset);
        }
        let _ = done.send(base_offset);
    }

    /// The append recorded as `ticket` failed: forget it and every later batch of that producer
    /// (they cannot follow a batch that is not in the log), so the client's retry is accepted.
    pub fn fail(&mut self, pid: i64, ticket: u64) {
        if let Some(p) = self.producers.get_mut(&pid) {
            if let Some(at) = p.batches.iter().position(|b| b.ticket == ticket) {
                p.batches.truncate(at);
            }
            if p.batches.is_empty() {
                self.producers.remove(&pid);
            }
        }
    }

    /// Replay one batch read back from the log (rebuild after restart). The producer counts as
    /// seen now: the expiry clock restarts with the broker.
    pub fn replay(&mut self, header: &BatchHeader) {
        if !header.has_producer_id() || header.is_control() {
            return;
        }
        let (first, last) = (header.base_sequence, last_seq_of(header));
        let p = self.producers.get(&header.producer_id);
        if p.is_some_and(|p| header.producer_epoch < p.epoch) {
            return;
        }
        self.record(
            header.producer_id,
            header.producer_epoch,
            first,
            last,
            BatchOffset::Known(header.base_offset),
            0,
        );
    }

    /// True when no append is in flight, i.e. [`ProducerStates::snapshot`] describes the log exactly.
    pub fn is_settled(&self) -> bool {
        self.producers
            .values()
            .flat_map(|p| &p.batches)
            .all(|b| matches!(b.offset, BatchOffset::Known(_)))
    }

    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Text snapshot: one `pid epoch first_seq last_seq base_offset` line per known batch, after a
    /// first line `end <log end offset>`. Pending batches are left out (call when settled).
    pub fn snapshot(&self, log_end_offset: u64) -> String {
        let mut out = format!("end {log_end_offset}\n");
        let mut pids: Vec<_> = self.producers.keys().copied().collect();
        pids.sort_unstable();
        for pid in pids {
            let p = &self.producers[&pid];
            for b in &p.batches {
                if let BatchOffset::Known(offset) = b.offset {
                    let _ = writeln!(
                        out,
                        "{pid} {} {} {} {offset}",
                        p.epoch, b.first_seq, b.last_seq
                    );
                }
            }
        }
        out
    }

    /// Parse a snapshot; returns the state and the log end offset it describes.
    pub fn from_snapshot(text: &str) -> Option<(ProducerStates, u64)> {
        let mut lines = text.lines();
        let end = lines.next()?.strip_prefix("end ")?.trim().parse().ok()?;
        let mut states = ProducerStates::default();
        for line in lines {
            let f: Vec<&str> = line.split_whitespace().collect();
            let [pid, epoch, first, last, offset] = f.as_slice() else {
                return None;
            };
            states.record(
                pid.parse().ok()?,
                epoch.parse().ok()?,
                first.parse().ok()?,
                last.parse().ok()?,
                BatchOffset::Known(offset.parse().ok()?),
                0,
            );
        }
        Some((states, end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(pid: i64, epoch: i16, seq: i32, records: i32) -> BatchHeader {
        let b = keel_engine::batch::BatchBuilder {
            records_count: records,
            producer_id: pid,
            producer_epoch: epoch,
            base_sequence: seq,
            ..Default::default()
        }
        .build(b"x");
        BatchHeader::parse(&b).unwrap()
    }

    fn accept(s: &mut ProducerStates, h: &BatchHeader, offset: u64) {
        match s.check(h) {
            Check::Append { ticket, done } => s.complete(h.producer_id, ticket, offset, done),
            other => panic!("expected append, got {other:?}"),
        }
    }

    #[test]
    fn duplicates_gaps_and_epochs() {
        let mut s = ProducerStates::default();
        accept(&mut s, &header(7, 0, 0, 2), 100);
        accept(&mut s, &header(7, 0, 2, 1), 102);
        match s.check(&header(7, 0, 0, 2)) {
            Check::Duplicate(BatchOffset::Known(100)) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.check(&header(7, 0, 5, 1)),
            Check::Reject(ResponseError::OutOfOrderSequenceNumber)
        ));
        accept(&mut s, &header(7, 1, 0, 1), 103);
        assert!(matches!(
            s.check(&header(7, 0, 3, 1)),
            Check::Reject(ResponseError::InvalidProducerEpoch)
        ));
        assert!(matches!(
            s.check(&header(7, 2, 4, 1)),
            Check::Reject(ResponseError::OutOfOrderSequenceNumber)
        ));
        // An unknown producer may start anywhere (its state may have aged out).
        accept(&mut s, &header(8, 3, 40, 1), 104);
    }

    #[test]
    fn a_failed_append_is_forgotten_with_its_successors() {
        let mut s = ProducerStates::default();
        accept(&mut s, &header(1, 0, 0, 1), 0);
        let Check::Append { ticket: t1, .. } = s.check(&header(1, 0, 1, 1)) else {
            panic!()
        };
        let Check::Append { .. } = s.check(&header(1, 0, 2, 1)) else {
            panic!()
        };
        assert!(!s.is_settled());
        s.fail(1, t1);
        assert!(s.is_settled());
        accept(&mut s, &header(1, 0, 1, 1), 1);
    }

    #[test]
    fn only_five_batches_are_remembered_and_snapshots_round_trip() {
        let mut s = ProducerStates::default();
        for i in 0..7 {
            accept(&mut s, &header(3, 0, i, 1), i as u64 * 10);
        }
        assert!(
            matches!(s.check(&header(3, 0, 1, 1)), Check::Reject(_)),
            "too old to be known"
        );
        assert!(matches!(
            s.check(&header(3, 0, 2, 1)),
            Check::Duplicate(BatchOffset::Known(20))
        ));
        let text = s.snapshot(70);
        let (mut again, end) = ProducerStates::from_snapshot(&text).unwrap();
        assert_eq!(end, 70);
        assert_eq!(again.snapshot(70), text);
        assert!(matches!(
            again.check(&header(3, 0, 6, 1)),
            Check::Duplicate(BatchOffset::Known(60))
        ));
        assert!(ProducerStates::from_snapshot("end x\n").is_none());
    }

    #[test]
    fn idle_producers_expire_and_may_then_start_anywhere() {
        let mut s = ProducerStates {
            expiration_ms: 1000,
            ..Default::default()
        };
        accept(&mut s, &header(5, 0, 0, 1), 0);
        s.expire(crate::now_ms() + 500);
        assert_eq!(s.len(), 1, "not idle long enough");
        s.expire(crate::now_ms() + 5_000);
        assert!(s.is_empty());
        accept(&mut s, &header(5, 0, 77, 1), 1);
    }
}
