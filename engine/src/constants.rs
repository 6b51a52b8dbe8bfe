//! Every limit the engine has, in one place, with the unit last in the name.
//!
//! Limits are what keep a log engine predictable: memory per shard, bytes per write, how much of a
//! segment can be torn by a crash. Configurable values are bounded by the `*_max` constants here, and
//! the relations between them are checked at compile time.

/// O_DIRECT alignment for offsets, lengths and buffer addresses. 4 KiB covers every device we target
/// (512e and 4Kn); a device with larger logical blocks would need this raised.
pub const block_bytes: usize = 4096;

/// Size of a RecordBatch v2 header (baseOffset through recordsCount).
pub const batch_header_bytes: usize = 61;

/// The largest batch the engine accepts at all; per-partition `max_message_bytes` is at most this.
pub const batch_bytes_max: usize = 64 * 1024 * 1024;

/// Default per-partition batch limit: Kafka's `message.max.bytes` default (1 MiB + record overhead).
pub const batch_bytes_default: usize = 1_048_588;

/// One write submitted to the ring carries at most this many bytes.
pub const write_bytes_max: usize = 1024 * 1024;

/// Writes in flight for one partition. More than one lets a single hot partition keep the device's
/// queue full; each starts on a block no other in-flight write of that partition touches.
pub const partition_writes_inflight_max: usize = 4;

/// Partitions a shard opens at once (creating their files, or recovering them at start-up): their
/// I/O runs beside the shard's other I/O; more wait their turn, which bounds the memory that
/// recovery scans take.
pub const shard_opens_inflight_max: usize = 16;

/// Writes in flight for one shard, across its partitions (bounds the aligned buffer pool).
pub const shard_writes_inflight_max: usize = 64;

/// Aligned write buffers each shard allocates at start-up (one per write that can be in flight).
pub const shard_write_buffers_count: usize = shard_writes_inflight_max;

/// Segment size bounds. Offsets inside a segment's index are u32 positions, hence the upper bound.
pub const segment_bytes_min: u64 = 1024 * 1024;
pub const segment_bytes_max: u64 = u32::MAX as u64;
pub const segment_bytes_default: u64 = 1024 * 1024 * 1024;

/// Segment files are extended by fallocate in steps of at most this size (bounded by the segment
/// size), so that a write almost never allocates blocks and a full disk shows up before data is
/// accepted.
pub const preallocate_bytes_default: u64 = 64 * 1024 * 1024;

/// A segment's first fallocate step. Each later step is as large as what the segment already
/// has (it doubles) up to `preallocate.bytes`: a hot partition reaches the full step after a few
/// allocations, while a thousand partitions holding a few kilobytes each reserve ~1 GiB of disk,
/// not 64 GiB. Equal to the runway, so a lightly loaded log's first allocation holds its runway.
pub const preallocate_first_bytes: u64 = runway_bytes;

/// Bytes between two sparse offset-index entries (Kafka's `index.interval.bytes`).
pub const index_interval_bytes: u64 = 4096;

/// Recently appended batches each partition keeps in memory to serve tailing readers without a
/// disk read.
pub const partition_cache_bytes_default: usize = 8 * 1024 * 1024;

/// Memory each shard keeps for recently appended batches, shared by its partitions (the oldest
/// batches of any partition go first): 1,000 partitions × `partition_cache_bytes_default` would
/// otherwise pin 8 GiB.
pub const shard_cache_bytes_default: usize = 64 * 1024 * 1024;

/// Durable growth of an active segment between two recovery points inside it
/// (`EngineConfig::recovery_point_bytes`): a crash rescans at most about this much of each
/// partition (~0.1 s at this VM's 1 GB/s of reads) instead of up to `segment.bytes`, for two
/// small files and three syncs per partition each time (ARCHITECTURE.md, decision 39).
pub const recovery_point_bytes_default: u64 = 128 * 1024 * 1024;

/// How often a shard holds its cache to `shard_cache_bytes` (it may overshoot by what arrives
/// meanwhile).
pub const cache_check_interval: std::time::Duration = std::time::Duration::from_millis(5);

/// Commands queued to one shard before senders wait (back-pressure instead of unbounded memory).
pub const shard_inbox_count_max: usize = 4096;

/// How far past its durable position a partition may write before the next fdatasync completes
/// (with `every-batch`). It bounds what a power cut can tear, which is what recovery relies on to
/// tell a torn tail from damage in the middle of the log.
pub const torn_tail_window_bytes: u64 = 32 * 1024 * 1024;

/// With `every-batch`, an fdatasync waits for a partition's writes in flight unless this much
/// written data already waits for it: fewer, larger group commits under load (each fdatasync on
/// freshly allocated blocks commits the file system's journal), no added latency when idle.
pub const sync_group_bytes: u64 = 8 * 1024 * 1024;

/// ... and unless a `flush` waits for data written at least this long ago: a partition whose
/// writes never pause (acks=1 producers, answered at write time) still makes its data durable, and
/// so visible, within about this plus one fdatasync while a consumer waits for it. Appends that
/// wait for durability themselves do not count: syncing while writes are in flight slowed the
/// writes of a deep every-batch pipeline by ~15% on the reference disk (ARCHITECTURE.md, 9).
pub const sync_wait_max: std::time::Duration = std::time::Duration::from_millis(2);

/// How many times a rollback's or truncation's cut is tried at once when it fails with an I/O
/// error (not a full disk), before it waits for `rewrite_backoff`.
pub const cut_attempts: u32 = 3;

/// An append whose bytes may have reached the disk is answered with its error only once the
/// rollback that removes it is on disk (ARCHITECTURE.md, decision 23). If the disk refuses that
/// many rollback steps in a row (each retried after `rewrite_backoff`), the error is answered
/// anyway, and the append may come back after a crash.
pub const rollback_answer_attempts: u32 = 5;

/// With `every-batch`, a lightly loaded partition keeps up to this much of its preallocated file
/// ahead of the write head written with zeros (the "runway"), so its small appends overwrite
/// blocks the file system has already laid out and an fdatasync does not commit an extent
/// conversion for each of them (see ARCHITECTURE.md, decisions).
pub const runway_bytes: u64 = 1024 * 1024;

/// The runway starts this far past the write head, so a small append's write (which may spill
/// into the next block) never waits for a zero write in flight.
pub const runway_gap_bytes: u64 = 64 * 1024;

/// The runway grows by one zero write of this size at a time.
pub const runway_step_bytes: usize = 512 * 1024;

/// The runway is kept only while a partition's group commits are smaller than this: larger groups
/// already share one extent conversion among many appends, and zeroing would cost bandwidth.
pub const runway_group_bytes_max: u64 = 64 * 1024;

/// Zero writes in flight per shard at most, so laying out runways never holds the write buffers
/// that appends need.
pub const shard_runway_writes_max: usize = 4;

/// The shard journal's ring by default (`EngineConfig::journal_bytes`; ARCHITECTURE.md, 10).
pub const journal_bytes_default: u64 = 64 * 1024 * 1024;

/// The smallest journal ring: room for a checkpoint's worth of writes and a few more.
pub const journal_bytes_min: u64 = 4 * journal_write_bytes_max as u64;

/// One journal write (the records of one group commit) at most.
pub const journal_write_bytes_max: usize = write_bytes_max;

/// Journal writes in flight per shard (each with a buffer of `journal_write_bytes_max`): while
/// some are in flight the next starts, and one fdatasync covers every write completed before it.
pub const journal_writes_inflight_max: usize = 4;

/// Segment writes in flight on a shard beyond which a checkpoint's writes wait (the small rests
/// of journaled partitions it forces out) while the journal ring has room. A checkpoint issues one
/// for every partition at once; queued ahead of the journal's writes and syncs they slowed the
/// journal for the checkpoint's length (ARCHITECTURE.md, decision 12). As the ring fills the gate
/// widens to `shard_writes_inflight_max` (decision 18).
pub const checkpoint_writes_inflight_max: usize = 4;

/// A partition's not yet durable data goes through the journal only while it is smaller than
/// this; a larger group is written and synced in its own segment (one copy of the bytes, not two).
/// Below it, a journaled partition's segment writes wait until this much is pending.
pub const journal_group_bytes_max: u64 = 64 * 1024;

/// After a failed write or sync, batches the journal had already made durable are written to the
/// segment again after this pause (a full disk fails them at once otherwise, in a tight loop).
pub const rewrite_backoff: std::time::Duration = std::time::Duration::from_millis(100);

/// How often a shard checks interval flushes, segment age and retention.
pub const shard_tick_ms: u64 = 10;

/// How often a partition persists its recovery point (bounds the scan after a crash).
pub const recovery_checkpoint_interval_ms: u64 = 5_000;

/// A disk read for a fetch reads at least this much (amortises the O_DIRECT round trip).
pub const read_bytes_min: usize = 64 * 1024;

/// A disk read for a fetch reads at most this much (plus one batch if a single batch is larger).
pub const read_bytes_max: usize = 4 * 1024 * 1024;

const _: () = assert!(block_bytes.is_power_of_two());
const _: () = assert!(read_bytes_min <= read_bytes_max);
const _: () = assert!(torn_tail_window_bytes >= 2 * write_bytes_max as u64);
const _: () = assert!(sync_group_bytes < torn_tail_window_bytes);
const _: () = assert!(runway_step_bytes <= write_bytes_max);
const _: () = assert!(runway_bytes.is_multiple_of(block_bytes as u64));
const _: () =
    assert!(runway_gap_bytes.is_multiple_of(block_bytes as u64) && runway_gap_bytes < runway_bytes);
const _: () = assert!(shard_runway_writes_max < shard_writes_inflight_max);
const _: () = assert!(write_bytes_max.is_multiple_of(block_bytes));
const _: () = assert!(write_bytes_max >= 2 * block_bytes);
const _: () = assert!(batch_header_bytes < block_bytes);
const _: () = assert!(batch_bytes_default <= batch_bytes_max);
const _: () = assert!((batch_bytes_max as u64) < segment_bytes_max);
const _: () = assert!(segment_bytes_min <= segment_bytes_default);
const _: () = assert!(segment_bytes_default <= segment_bytes_max);
const _: () = assert!(shard_write_buffers_count >= shard_writes_inflight_max);
const _: () = assert!(partition_writes_inflight_max <= shard_writes_inflight_max);
const _: () = assert!(preallocate_bytes_default.is_multiple_of(block_bytes as u64));
const _: () = assert!(preallocate_first_bytes.is_multiple_of(block_bytes as u64));
const _: () = assert!(read_bytes_min.is_multiple_of(block_bytes));
const _: () = assert!(journal_bytes_default >= journal_bytes_min);
const _: () = assert!(journal_bytes_min.is_multiple_of(block_bytes as u64));
const _: () = assert!((journal_group_bytes_max as usize) < journal_write_bytes_max);
const _: () = assert!(journal_writes_inflight_max >= 1);
const _: () = assert!(checkpoint_writes_inflight_max >= 1);
const _: () = assert!(checkpoint_writes_inflight_max <= shard_writes_inflight_max);
