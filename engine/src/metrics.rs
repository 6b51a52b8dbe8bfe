//! Engine counters: relaxed atomics bumped by the shards, read by anyone (the broker exports them).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Monotonic counters since the engine started.
        #[derive(Debug, Default)]
        pub struct Metrics { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A point-in-time copy of [`Metrics`].
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct MetricsSnapshot { $(pub $name: u64,)* }

        impl Metrics {
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }

        impl MetricsSnapshot {
            /// What the counters did between `earlier` and this snapshot (all are monotonic).
            pub fn since(&self, earlier: &MetricsSnapshot) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.saturating_sub(earlier.$name),)* }
            }
        }
    };
}

counters!(
    appends,
    append_bytes,
    /// Appends rejected for bad input (invalid batch, too large).
    appends_rejected,
    writes,
    write_bytes,
    /// Writes of a carried block queued until the earlier write of that block completed, while
    /// the blocks after it were written at once.
    deferred_writes,
    /// Segment writes issued durable by themselves (`RWF_DSYNC`: the write was all an
    /// `every-batch` partition had pending, so no fdatasync follows it).
    segment_durable_writes,
    /// Partition segment syncs requested (each fdatasync, and each member of a syncfs group, so a
    /// checkpoint of a shard's journal counts once per partition it waits for).
    fsyncs,
    /// syncfs calls that made several partitions durable at once.
    group_syncs,
    /// Sync calls for partitions' segments as the device sees them: each fdatasync of one file,
    /// and each syncfs once however many partitions it served (`fsyncs` counts those).
    segment_sync_calls,
    /// Batches that failed their integrity checks (CRC or header) on a read; never served.
    crc_failures,
    io_errors,
    /// Failed flushes anywhere on the node (an fdatasync, fsync or syncfs, or the flush of an
    /// `RWF_DSYNC` write): each puts every file's writes completed before it in doubt, since
    /// the device's cache is shared (ARCHITECTURE.md, decision 29).
    flush_failures,
    disk_full_errors,
    reads,
    /// Reads answered from the in-memory tail without touching the disk.
    reads_from_memory,
    segments_rolled,
    segments_deleted,
    /// Segment preallocations cut down because the disk was full: only what the write at hand
    /// needed was allocated (or, for a new segment, nothing yet).
    allocations_short,
    /// Zero writes that laid out a partition's file ahead of its write head (the runway).
    runway_writes,
    runway_bytes,
    /// Shard journal writes and the bytes they wrote.
    journal_writes,
    journal_bytes,
    /// fdatasyncs of the shard journals (each makes every journal write completed before it
    /// durable; `fsyncs` counts the partitions' segment syncs).
    journal_syncs,
    /// Journal writes issued durable by themselves (`RWF_DSYNC`: nothing else was pending, so
    /// no fdatasync follows them).
    journal_durable_writes,
    /// Checkpoints that let the journal reuse its ring.
    journal_checkpoints,
    /// Times a journal write had to wait: the ring was full until a checkpoint, or a write that
    /// starts a new lap waited for the writes before it to become durable. Each wait counts
    /// once, however many times the shard looked while it lasted.
    journal_full,
    /// Journal records appended to logs at start-up.
    journal_replayed,
    /// Times a shard's journal, turned off by a failed write or flush, started again.
    journal_restarts,
    /// Bytes of batches opening partitions read and CRC-checked because no clean shutdown or
    /// recovery point vouched for them (ARCHITECTURE.md, decision 39).
    recovery_scanned_bytes,
    /// Recovery points inside a segment that the log did not pass through (a stale or damaged
    /// file): the whole segment was scanned instead. Never expected; a `warn` line names it.
    recovery_points_mismatched,
);

pub(crate) fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Count a failed operation: a full disk in `disk_full_errors`, anything else in `io_errors`.
pub(crate) fn count_error(metrics: &Metrics, error: &crate::Error) {
    match error {
        crate::Error::Full { .. } => bump(&metrics.disk_full_errors, 1),
        _ => bump(&metrics.io_errors, 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_what_each_counter_did_in_between() {
        let m = Metrics::default();
        bump(&m.appends, 5);
        bump(&m.journal_syncs, 2);
        let earlier = m.snapshot();
        bump(&m.appends, 7);
        bump(&m.segment_durable_writes, 1);
        let window = m.snapshot().since(&earlier);
        assert_eq!(
            (
                window.appends,
                window.segment_durable_writes,
                window.journal_syncs
            ),
            (7, 1, 0)
        );
        // A later snapshot taken as the earlier one never underflows.
        assert_eq!(earlier.since(&m.snapshot()), MetricsSnapshot::default());
    }
}
