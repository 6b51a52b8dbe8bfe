//! Opening a partition: trust what a clean shutdown or a segment roll vouched for, scan the rest.
//!
//! The states a partition's directory can be in, and what opening does:
//!
//! * **Clean** (`.clean-shutdown` present): every segment's size, indexes and the log end are
//!   recorded. Nothing is scanned. The marker is removed before the partition accepts appends.
//! * **Crashed**: segments before the recovery point (`recovery-point`, moved at every roll) were
//!   sealed — truncated to size and fsynced — and are trusted. From the recovery point's segment
//!   on, every batch is read and CRC-checked, indexes and the leader-epoch cache are rebuilt. A
//!   point inside the segment (moved there every `recovery_point_bytes` of durable growth,
//!   ARCHITECTURE.md decision 39) lets the scan resume at the last index entry before it, if
//!   the batches from there pass through the point; otherwise the whole segment is scanned.
//!   The scan stops at the first position that is not a valid batch continuing the log:
//!   - a **torn tail** — zeros or damage at the end of the last segment, with nothing but zeros
//!     beyond the window that writes in flight could have touched (`torn_tail_window_bytes`) — is
//!     cut off. Data there was never acknowledged as durable.
//!   - anything else is **damage in the middle**: with [`RecoveryMode::Strict`] opening fails with
//!     [`Error::Corruption`] naming the file and position; with `TruncateTail` the log is cut there.
//!   - with `flush.policy = interval`, unsynced data may be torn anywhere in its window, so damage
//!     in the last segment is always treated as a torn tail.
//! * After a scan, the last segment is cut to its logical size and fsynced, so the file holds no
//!   stale bytes past the log's end and everything recovered is durable.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::batch::BatchHeader;
use crate::config::{FlushPolicy, PartitionConfig, RecoveryMode};
use crate::constants::{batch_header_bytes, block_bytes, torn_tail_window_bytes, write_bytes_max};
use crate::epochs::LeaderEpochCache;
use crate::error::{is_full, Error, Result};
use crate::io::aligned::{align_down, align_up};
use crate::io::{AlignedBuf, Storage, StorageFile};
use crate::metrics::{bump, Metrics};
use crate::partition::{Partition, RecoveredLog, RecoveryPoint};
use crate::segment::index::{OffsetIndex, TimeIndex};
use crate::segment::path::{self, parse_log_file_name, partition_dir, segment_file};
use crate::segment::reader::{slot, Slot};
use crate::segment::Segment;
use crate::PartitionId;

pub(crate) struct OpenRequest<'a> {
    pub storage: &'a Rc<dyn Storage>,
    pub data_dir: &'a Path,
    pub id: &'a PartitionId,
    /// `Some` to create (or reconfigure); `None` to open with the stored configuration.
    pub config: Option<PartitionConfig>,
    pub mode: RecoveryMode,
    /// Journal records of this partition found at start-up (incarnation, batches).
    pub journal: &'a [(u64, bytes::Bytes)],
    pub metrics: &'a Metrics,
}

pub(crate) async fn open_partition(req: OpenRequest<'_>) -> Result<Partition> {
    let storage = req.storage;
    let dir = partition_dir(req.data_dir, req.id);
    path::validate_topic(&req.id.topic)?;
    storage
        .create_dir_all(&dir)
        .map_err(|e| Error::io("create", &dir, e))?;
    let config = settle_config(storage, &dir, req.config).await?;
    let incarnation = settle_incarnation(storage, &dir).await?;
    let names = storage
        .list_dir(&dir)
        .map_err(|e| Error::io("list", &dir, e))?;
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|n| parse_log_file_name(n))
        .collect();
    bases.sort_unstable();
    let read_point = |name: &str| -> Result<Option<RecoveryPoint>> {
        let p = dir.join(name);
        Ok(storage
            .read_file(&p)
            .map_err(|e| Error::io("read", &p, e))?
            .and_then(|b| RecoveryPoint::decode(&b)))
    };
    let clean = read_point(path::CLEAN_SHUTDOWN_FILE)?.filter(|c| bases.last() == Some(&c.segment));
    let checkpoint = read_point(path::RECOVERY_POINT_FILE)?.filter(|c| bases.contains(&c.segment));
    // A point inside a segment counts only in the incarnation that wrote it (decision 39).
    let inside = checkpoint.filter(|c| c.position > 0 && c.incarnation == Some(incarnation));
    let epoch_path = dir.join(path::LEADER_EPOCH_FILE);
    let stored_epochs = storage
        .read_file(&epoch_path)
        .map_err(|e| Error::io("read", &epoch_path, e))?;
    let mut epochs = stored_epochs
        .as_deref()
        .and_then(|b| LeaderEpochCache::decode(b).ok())
        .unwrap_or_default();

    if bases.is_empty() {
        bases.push(0);
    }
    let last = *bases.last().expect("non-empty");
    let scan_from = match (&clean, &checkpoint) {
        (Some(_), _) => u64::MAX,
        (None, Some(c)) => c.segment,
        (None, None) => bases[0],
    };
    let ctx = ScanContext {
        mode: req.mode,
        torn_window: match config.flush {
            FlushPolicy::EveryBatch => Some(torn_tail_window_bytes),
            FlushPolicy::Interval { .. } => None,
        },
        max_batch_bytes: config.max_message_bytes,
        journaled: journaled_offsets(req.journal, incarnation),
    };

    let mut segments = BTreeMap::new();
    let mut expected_next = bases[0];
    let mut scanned = 0u64;
    for (i, &base) in bases.iter().enumerate() {
        let log_path = segment_file(&dir, base, path::LOG_SUFFIX);
        let file = storage
            .open(&log_path, base == last)
            .await
            .map_err(|e| Error::io("open", &log_path, e))?;
        let file_len = file
            .file_len()
            .map_err(|e| Error::io("stat", &log_path, e))?;
        let mut segment = Segment::new(base, log_path.clone());
        let is_last = base == last;
        let mut cut_to = None;
        let trusted = if is_last {
            clean.map(|c| (c.position, c.next_offset))
        } else if base < scan_from {
            Some((file_len, bases[i + 1]))
        } else {
            None
        };
        let restored = match trusted {
            Some((size, next)) => load_indexes(storage, &segment, size, next, file_len).await,
            None => None,
        };
        match restored {
            Some((index, time_index)) => {
                let (size, next) = trusted.expect("restored implies trusted");
                segment.restore(size, next, index, time_index);
            }
            None => {
                let resume = match inside.filter(|c| c.segment == base) {
                    Some(point) => resume_at(storage, &mut segment, point, file_len).await,
                    None => None,
                };
                let mut start = segment.size;
                let from = resume.unwrap_or(ScanFrom {
                    next: expected_next,
                    vouched: None,
                });
                let mut end = scan(
                    file.as_ref(),
                    &mut segment,
                    &mut epochs,
                    from,
                    file_len,
                    is_last,
                    &ctx,
                )
                .await?;
                if end.missed_vouched {
                    bump(&req.metrics.recovery_points_mismatched, 1);
                    // The log does not pass through the recovery point as it said: trust
                    // nothing of it and scan the whole segment, as without one.
                    tracing::warn!(file = %log_path.display(), ?resume,
                        "the recovery point does not match the log; scanning the whole segment");
                    scanned += segment.size.saturating_sub(start);
                    segment = Segment::new(base, log_path.clone());
                    start = 0;
                    end = scan(
                        file.as_ref(),
                        &mut segment,
                        &mut epochs,
                        ScanFrom {
                            next: expected_next,
                            vouched: None,
                        },
                        file_len,
                        is_last,
                        &ctx,
                    )
                    .await?;
                }
                scanned += segment.size.saturating_sub(start);
                let end = end.kind;
                if let ScanEnd::Damaged { position, reason } = end {
                    if ctx.mode == RecoveryMode::Strict {
                        return Err(Error::Corruption {
                            file: log_path,
                            position,
                            reason: format!(
                                "{reason}, so this is not a torn tail. Refusing to open \
                                 (recovery mode truncate-tail discards the log from here)"
                            ),
                        });
                    }
                    tracing::warn!(file = %log_path.display(), position, %reason, "truncating damaged log");
                    // Later segments are dropped: the log ends here.
                    for &later in &bases[i + 1..] {
                        for suffix in [
                            path::LOG_SUFFIX,
                            path::INDEX_SUFFIX,
                            path::TIME_INDEX_SUFFIX,
                        ] {
                            let p = segment_file(&dir, later, suffix);
                            storage
                                .remove_file(&p)
                                .map_err(|e| Error::io("remove", &p, e))?;
                        }
                    }
                    segment.allocated = cut(file.as_ref(), segment.size, segment.size).await?;
                    segment.file = Some(file);
                    segments.insert(base, segment);
                    break;
                }
                if is_last {
                    cut_to = Some(cut(file.as_ref(), segment.size, file_len).await?);
                }
            }
        }
        segment.allocated = match cut_to {
            Some(allocated) => allocated,
            None if is_last && clean.is_some() => file_len,
            None => segment.size,
        };
        segment.sealed = !is_last;
        segment.file = Some(file);
        expected_next = segment.next_offset;
        segments.insert(base, segment);
    }

    let log_end = segments
        .values()
        .next_back()
        .expect("at least one segment")
        .next_offset;
    epochs.truncate_from_end(log_end);
    // Is the file what the cache now holds? The scan rebuilds entries the file may lack (it is
    // written beside the data path, decision 34); a clean shutdown rewrites it only if not.
    let epochs_stored = match &stored_epochs {
        Some(bytes) => *bytes == epochs.encode(),
        None => epochs.latest_epoch().is_none(),
    };

    bump(&req.metrics.recovery_scanned_bytes, scanned);
    // Where the recovery point on disk lies in the active segment, if inside it: a cut moves it
    // back first (`Partition::start_cut`).
    let recovery_point_at = inside
        .filter(|c| c.segment == last)
        .map_or(0, |c| c.position);

    let marker = clean.map(|_| dir.join(path::CLEAN_SHUTDOWN_FILE));
    remove_durably(storage.as_ref(), &dir, marker).await?;
    Ok(Partition::recovered(
        req.id.clone(),
        dir,
        config,
        RecoveredLog {
            segments,
            epochs,
            epochs_stored,
            incarnation,
            recovery_point_at,
        },
    ))
}

/// A fresh incarnation number: random, so a recreated partition never matches an old one.
pub(crate) fn new_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(now);
    hasher.finish()
}

/// The partition's stored incarnation, or a new one stored now (a new partition, or one made
/// before the journal existed).
async fn settle_incarnation(storage: &Rc<dyn Storage>, dir: &Path) -> Result<u64> {
    let path = dir.join(path::INCARNATION_FILE);
    let stored = storage
        .read_file(&path)
        .map_err(|e| Error::io("read", &path, e))?
        .and_then(|b| String::from_utf8_lossy(&b).trim().parse::<u64>().ok());
    if let Some(incarnation) = stored {
        return Ok(incarnation);
    }
    let incarnation = new_incarnation();
    storage
        .write_file_durable(&path, format!("{incarnation}\n").into_bytes())
        .await
        .map_err(|e| Error::io("write", &path, e))?;
    Ok(incarnation)
}

/// Store the given configuration, or load the stored one.
async fn settle_config(
    storage: &Rc<dyn Storage>,
    dir: &Path,
    given: Option<PartitionConfig>,
) -> Result<PartitionConfig> {
    let path = dir.join(path::CONFIG_FILE);
    let stored = storage
        .read_file(&path)
        .map_err(|e| Error::io("read", &path, e))?;
    match given {
        Some(config) => {
            config.validate()?;
            let text = config.to_properties().into_bytes();
            if stored.as_deref() != Some(&text[..]) {
                storage
                    .write_file_durable(&path, text)
                    .await
                    .map_err(|e| Error::io("write", &path, e))?;
            }
            Ok(config)
        }
        None => match stored {
            Some(bytes) => PartitionConfig::from_properties(&String::from_utf8_lossy(&bytes)),
            None => Ok(PartitionConfig::default()),
        },
    }
}

/// The persisted indexes of a trusted segment, if present and consistent with its size.
async fn load_indexes(
    storage: &Rc<dyn Storage>,
    segment: &Segment,
    size: u64,
    next: u64,
    file_len: u64,
) -> Option<(OffsetIndex, TimeIndex)> {
    // The size and next offset come from a marker or a file name on disk: only trust them if they
    // fit the file (otherwise the segment is scanned).
    if size > file_len || next < segment.base_offset {
        return None;
    }
    let index = storage.read_file(&segment.index_path()).ok()??;
    let time_index = storage.read_file(&segment.time_index_path()).ok()??;
    let index = OffsetIndex::decode(&index, size).ok()?;
    let time_index = TimeIndex::decode(&time_index, next - segment.base_offset).ok()?;
    (size == 0 || !time_index.is_empty()).then_some((index, time_index))
}

struct ScanContext {
    mode: RecoveryMode,
    /// `None`: any damage in the last segment may be a torn tail (interval flushing).
    torn_window: Option<u64>,
    max_batch_bytes: usize,
    /// Base offsets of the batches the journal holds for this incarnation.
    journaled: HashSet<u64>,
}

/// The base offsets of every batch in the journal records of this incarnation.
fn journaled_offsets(records: &[(u64, bytes::Bytes)], incarnation: u64) -> HashSet<u64> {
    let mut offsets = HashSet::new();
    for (_, bytes) in records.iter().filter(|(i, _)| *i == incarnation) {
        let mut at = 0;
        while let Ok(h) = BatchHeader::parse(&bytes[at..]) {
            offsets.insert(h.base_offset);
            at += h.size_bytes;
            if at >= bytes.len() {
                break;
            }
        }
    }
    offsets
}

/// Restore `segment` from its index files up to the last index entry before `point.position`,
/// so the scan resumes there: the batches between that entry and the point are read again,
/// which checks that the log really passes through the point (a stale or wrong point fails
/// that check and the whole segment is scanned). `None` if the index files do not fit.
async fn resume_at(
    storage: &Rc<dyn Storage>,
    segment: &mut Segment,
    point: RecoveryPoint,
    file_len: u64,
) -> Option<ScanFrom> {
    let (index, mut time_index) = load_indexes(
        storage,
        segment,
        point.position,
        point.next_offset,
        file_len,
    )
    .await?;
    // Resume at the last entry: the batch there starts at `position` with offset `base + rel`.
    let (relative, position) = index.last_entry()?;
    let next = segment.base_offset + relative as u64;
    if next >= point.next_offset {
        return None;
    }
    // Time entries promise maxima of the batches before their offset: keep those up to it.
    time_index.truncate_to_offset(relative + 1);
    segment.restore(position as u64, next, index, time_index);
    Some(ScanFrom {
        next,
        vouched: Some((point.position, point.next_offset)),
    })
}

struct Scanned {
    kind: ScanEnd,
    /// The scan was to pass a recovery point and did not.
    missed_vouched: bool,
}

enum ScanEnd {
    /// The segment's valid data ends at `segment.size` (cleanly or at a torn tail).
    Valid,
    Damaged {
        position: u64,
        reason: String,
    },
}

/// Where a scan starts: at the segment's current size (its start, or where a recovery point
/// resumes it, decision 39), expecting the batch there to carry offset `next` or later.
#[derive(Clone, Copy, Debug)]
struct ScanFrom {
    next: u64,
    /// (position, next offset) a recovery point vouched for: note whether a batch ends there
    /// with that next offset.
    vouched: Option<(u64, u64)>,
}

/// Read every batch of a segment from `from` on, rebuilding its indexes, until the data ends or
/// is damaged.
async fn scan(
    file: &dyn StorageFile,
    segment: &mut Segment,
    epochs: &mut LeaderEpochCache,
    from: ScanFrom,
    file_len: u64,
    is_last: bool,
    ctx: &ScanContext,
) -> Result<Scanned> {
    let mut passed = false;
    let mut expected_next = from.next;
    let mut position = segment.size;
    let mut want = write_bytes_max;
    let stop = loop {
        if position >= file_len {
            break None;
        }
        let start = align_down(position);
        let end = align_up((position + want as u64).min(file_len));
        let (result, buf) = file
            .read_at(start, AlignedBuf::new((end - start) as usize))
            .await;
        result.map_err(|e| Error::io("read", file.path(), e))?;
        let bytes = buf.as_slice();
        let mut at = (position - start) as usize;
        let reason = loop {
            match slot(&bytes[at.min(bytes.len())..], ctx.max_batch_bytes) {
                Slot::Batch(h) if h.base_offset < expected_next => {
                    break Some(format!(
                        "batch offset {} goes back (expected ≥ {expected_next})",
                        h.base_offset
                    ))
                }
                Slot::Batch(h) => {
                    accept(segment, epochs, &h, position);
                    expected_next = h.next_offset();
                    at += h.size_bytes;
                    position += h.size_bytes as u64;
                    passed |= from.vouched == Some((position, expected_next));
                }
                Slot::Incomplete { .. }
                    if bytes[at.min(bytes.len())..].iter().all(|&b| b == 0)
                        && position + batch_header_bytes as u64 > file_len =>
                {
                    // Fewer zeros than a header, then the file ends: the log ends here.
                    break Some("zeros".to_string());
                }
                Slot::Incomplete { needed } if position + needed as u64 > file_len => {
                    break Some(format!(
                        "batch of {needed} bytes runs past the end of the file"
                    ))
                }
                Slot::Incomplete { needed } => {
                    want = want.max(needed + block_bytes);
                    break None;
                }
                Slot::End => break Some("zeros".to_string()),
                Slot::Damaged(e) => break Some(e.to_string()),
            }
            if position >= file_len {
                break None;
            }
        };
        if let Some(reason) = reason {
            break Some(reason);
        }
    };
    let kind = match stop {
        None => ScanEnd::Valid,
        Some(reason) => {
            let stopped = Stopped {
                position,
                expected_next,
                reason,
            };
            judge_stop(file, stopped, file_len, is_last, ctx).await?
        }
    };
    Ok(Scanned {
        kind,
        missed_vouched: from.vouched.is_some() && !passed,
    })
}

/// Where and why a scan stopped before the end of the file.
struct Stopped {
    position: u64,
    /// The offset the next batch would have carried.
    expected_next: u64,
    reason: String,
}

/// A scan stopped at `stopped`: the log's end (a torn tail, or a batch the journal holds) or
/// damage.
async fn judge_stop(
    file: &dyn StorageFile,
    stopped: Stopped,
    file_len: u64,
    is_last: bool,
    ctx: &ScanContext,
) -> Result<ScanEnd> {
    let Stopped {
        position,
        expected_next,
        reason,
    } = stopped;
    if !is_last {
        return Ok(ScanEnd::Damaged {
            position,
            reason: format!("{reason} in a sealed segment (the log goes on after it)"),
        });
    }
    if ctx.journaled.contains(&expected_next) {
        // The journal holds the batch that should be here: the segment's writes past its last
        // sync were torn in some order (a crash keeps any subset of unsynced writes), and replay
        // writes them again from here.
        tracing::info!(file = %file.path().display(), position, %reason,
            "log ends early at a batch the journal holds; replaying it");
        return Ok(ScanEnd::Valid);
    }
    if !looks_torn(file, position, file_len, ctx.max_batch_bytes).await? {
        return Ok(ScanEnd::Damaged {
            position,
            reason: format!("{reason} in a batch that was written whole (no torn sector)"),
        });
    }
    if let Some(window) = ctx.torn_window {
        if let Some(found) =
            data_beyond(file, position + window, file_len, ctx.max_batch_bytes).await?
        {
            return Ok(ScanEnd::Damaged {
                position,
                reason: format!(
                    "{reason}; data continues at byte {found}, past what a crash can tear"
                ),
            });
        }
    }
    Ok(ScanEnd::Valid)
}

/// Sector size the torn-write signature is judged at: devices write whole sectors atomically.
const SECTOR_BYTES: usize = 512;

/// Does the damage at `position` look like a write the crash interrupted? A torn write leaves
/// sectors that never got their new content: zeros from preallocation (or the zeroed padding of
/// the previous version of the tail block). So: a zeroed header, a batch that runs past the end of
/// the file, or a sector the batch reaches into that is all zeros on disk — judged over the whole
/// sector, so a lost sector holding only the batch's last few bytes (or its first few) counts
/// too: there nothing but zeros follows them, where a written sector would hold them. A flipped
/// bit inside an otherwise complete batch is none of those: that is damage, not a torn tail.
async fn looks_torn(
    file: &dyn StorageFile,
    position: u64,
    file_len: u64,
    max_batch_bytes: usize,
) -> Result<bool> {
    let start = align_down(position);
    let end = align_up((position + max_batch_bytes as u64 + 61).min(file_len));
    if end <= position {
        return Ok(true);
    }
    let (result, buf) = file
        .read_at(start, AlignedBuf::new((end - start) as usize))
        .await;
    result.map_err(|e| Error::io("read", file.path(), e))?;
    let stored = buf.as_slice();
    let at = ((position - start) as usize).min(stored.len());
    let bytes = &stored[at..];
    if bytes.len() < 61 || bytes[..61].iter().all(|&b| b == 0) {
        return Ok(true);
    }
    Ok(match BatchHeader::parse(bytes) {
        Ok(h) if h.size_bytes <= max_batch_bytes => {
            if position + h.size_bytes as u64 > file_len {
                return Ok(true);
            }
            zero_sector_within(stored, at, h.size_bytes)
        }
        // The header itself is garbage: a torn sector holding part of it shows as zeros near it.
        _ => {
            let split = (SECTOR_BYTES - (position as usize % SECTOR_BYTES)) % SECTOR_BYTES;
            let torn_header = split > 0
                && split < 61
                && (bytes[..split].iter().all(|&b| b == 0)
                    || bytes[split..61].iter().all(|&b| b == 0));
            torn_header || zero_sector_within(stored, at, 2 * SECTOR_BYTES)
        }
    })
}

/// Is one of the sectors that `stored[at..at + len]` reaches into all zeros? `stored` begins on
/// a sector boundary; sectors are judged whole, as stored, including bytes outside the range.
fn zero_sector_within(stored: &[u8], at: usize, len: usize) -> bool {
    let first = at / SECTOR_BYTES;
    let last = (at + len).div_ceil(SECTOR_BYTES);
    (first..last).any(|s| {
        stored
            .get(s * SECTOR_BYTES..(s + 1) * SECTOR_BYTES)
            .is_some_and(|sector| sector.iter().all(|&b| b == 0))
    })
}

fn accept(segment: &mut Segment, epochs: &mut LeaderEpochCache, h: &BatchHeader, position: u64) {
    segment.on_batch(h, position);
    epochs.assign(h.partition_leader_epoch, h.base_offset);
}

/// Is anything but zeros stored in `[from, from + max batch)`? The log is contiguous, so if it went
/// on past the torn-tail window, bytes there are not all zero.
async fn data_beyond(
    file: &dyn StorageFile,
    from: u64,
    file_len: u64,
    max_batch_bytes: usize,
) -> Result<Option<u64>> {
    let start = align_down(from);
    if start >= file_len {
        return Ok(None);
    }
    let end = align_up((from + max_batch_bytes as u64 + 61).min(file_len));
    let (result, buf) = file
        .read_at(start, AlignedBuf::new((end - start) as usize))
        .await;
    result.map_err(|e| Error::io("read", file.path(), e))?;
    Ok(buf
        .as_slice()
        .iter()
        .position(|&b| b != 0)
        .map(|i| start + i as u64))
}

/// Remove `paths` from `dir` and make that durable with one sync of the directory (synced
/// even when there is nothing to remove).
pub(crate) async fn remove_durably(
    storage: &dyn Storage,
    dir: &Path,
    paths: impl IntoIterator<Item = PathBuf>,
) -> Result<()> {
    for path in paths {
        storage
            .remove_file(&path)
            .map_err(|e| Error::io("remove", &path, e))?;
    }
    storage
        .sync_dir(dir)
        .await
        .map_err(|e| Error::io("fsync", dir, e))
}

/// Cut a segment file at `size` (a torn, damaged, failed or truncated tail goes) and keep it
/// allocated up to `reserved`, then fsync; returns the length now allocated.
///
/// Two rules make this safe on a full disk next to O_DIRECT writers:
/// - *The blocks stay in the file.* The shard journal only acknowledges data whose segment space
///   is allocated, and writing it again (after a failure) or replaying it (after a crash) must
///   not meet a disk that filled meanwhile. Truncating and allocating again cannot promise that:
///   between the two, another process (or ext4 itself, which hands freed blocks out again only
///   after its journal commits) can take them. So the stale whole blocks are zeroed in place
///   (`FALLOC_FL_ZERO_RANGE`); where that is not supported or fails (a full ext4 refuses it at
///   times), the blocks that read back non-zero are overwritten with zeros by O_DIRECT: only
///   written blocks can hold non-zeros, and overwriting a written block allocates nothing.
///   Only what lies past the reservation is truncated.
/// - *The kernel never zeroes part of a block.* A truncate or zero range that starts inside a
///   block zeroes the rest of it through the page cache, next to the log's O_DIRECT writes of
///   the same block: a soak on a full ext4 found a batch written and acknowledged after such a
///   cut read back as zeros, from the cut's byte on. The block holding the cut is instead read
///   and written back with zeros after `size` by O_DIRECT here, and every truncate and zero
///   range starts on a block boundary. (The file may end up to a block past `size`: the log's
///   end is where its batches end, not the file's length.)
pub(crate) async fn cut(file: &dyn StorageFile, size: u64, reserved: u64) -> Result<u64> {
    let space = crate::io::SPACE.lock().await;
    let file_len = file
        .file_len()
        .map_err(|e| Error::io("stat", file.path(), e))?;
    let head = align_up(size);
    if head > size && file_len > align_down(size) {
        let start = align_down(size);
        let (result, mut buf) = file.read_at(start, AlignedBuf::new(block_bytes)).await;
        result.map_err(|e| Error::io("read", file.path(), e))?;
        if buf.len() < (size - start) as usize {
            return Err(Error::Corruption {
                file: file.path().to_path_buf(),
                position: start + buf.len() as u64,
                reason: format!("file ends before the cut at byte {size}"),
            });
        }
        buf.set_len((size - start) as usize);
        let (result, _) = file.write_at(start, buf).await;
        result.map_err(|e| Error::io("rewrite the cut block of", file.path(), e))?;
    }
    let file_len = file_len.max(head);
    let keep = align_up(reserved.min(file_len)).max(head);
    if keep > head {
        match file.zero_range(head, keep).await {
            Ok(()) => {}
            Err(e) if is_full(&e) || e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::debug!(file = %file.path().display(), error = %e,
                    "zero range refused; overwriting the cut tail's non-zero blocks instead");
                overwrite_nonzero_blocks(file, head, keep).await?;
            }
            Err(e) => return Err(Error::io("zero", file.path(), e)),
        }
    }
    let mut allocated = keep;
    if file_len > keep {
        file.set_len(keep)
            .await
            .map_err(|e| Error::io("truncate", file.path(), e))?;
    }
    if reserved > keep {
        match file.allocate(reserved).await {
            Ok(()) => allocated = reserved,
            Err(e) if is_full(&e) => {}
            Err(e) => return Err(Error::io("fallocate", file.path(), e)),
        }
    }
    drop(space);
    file.sync_all()
        .await
        .map_err(|e| Error::io("fsync", file.path(), e))?;
    Ok(allocated)
}

/// Make `[from, to)` (whole blocks) read as zeros without allocating: read it a piece at a
/// time and overwrite each run of blocks holding anything but zeros. Unwritten (fallocated)
/// blocks read as zeros at no I/O cost and are left alone, so the writes only ever land on
/// written blocks.
async fn overwrite_nonzero_blocks(file: &dyn StorageFile, from: u64, to: u64) -> Result<()> {
    let mut at = from;
    while at < to {
        let len = (to - at).min(write_bytes_max as u64) as usize;
        let (result, buf) = file.read_at(at, AlignedBuf::new(len)).await;
        result.map_err(|e| Error::io("read", file.path(), e))?;
        let blocks: Vec<bool> = buf
            .as_slice()
            .chunks(block_bytes)
            .map(|b| b.iter().any(|&x| x != 0))
            .collect();
        let mut i = 0;
        while i < blocks.len() {
            if !blocks[i] {
                i += 1;
                continue;
            }
            let run = blocks[i..].iter().take_while(|&&dirty| dirty).count();
            let mut zeros = AlignedBuf::new(run * block_bytes);
            zeros.fill_zeros(run * block_bytes);
            let (result, _) = file.write_at(at + (i * block_bytes) as u64, zeros).await;
            result.map_err(|e| Error::io("zero", file.path(), e))?;
            i += run;
        }
        if buf.len() < len {
            break; // the file ends here
        }
        at += len as u64;
    }
    Ok(())
}
