//! Reads from segment files: self-contained async tasks that own what they need (the file handle,
//! positions and limits captured when the read was issued), check every batch's CRC, and hand back
//! the stored bytes without copying them out of the read buffer.

use std::path::PathBuf;
use std::rc::Rc;

use bytes::Bytes;

use crate::batch::BatchHeader;
use crate::constants::{block_bytes, read_bytes_max, read_bytes_min};
use crate::error::{Error, Result};
use crate::io::aligned::{align_down, align_up};
use crate::io::{AlignedBuf, Storage, StorageFile};
use crate::metrics::{bump, Metrics};
use crate::segment::reader::{slot, Slot};
use crate::{ReadResult, TimestampOffset};

/// A read the partition could not answer from memory.
pub(crate) struct DiskRead {
    pub file: Option<Rc<dyn StorageFile>>,
    pub log_path: PathBuf,
    /// A batch boundary at or before the first wanted batch (from the sparse index).
    pub start_position: u64,
    /// Bytes of the segment known to be on disk (a batch boundary).
    pub limit_position: u64,
    /// The first offset wanted.
    pub offset: u64,
    /// Batches at or after this offset are not returned.
    pub upper: u64,
    pub max_bytes: usize,
    pub result: ReadResult,
}

impl DiskRead {
    async fn open(&self, storage: &dyn Storage) -> Result<Rc<dyn StorageFile>> {
        match &self.file {
            Some(f) => Ok(f.clone()),
            None => storage
                .open(&self.log_path, false)
                .await
                .map_err(|e| Error::io("open", &self.log_path, e)),
        }
    }
}

/// Read `[position, position + len)` (clamped to `limit`), block-aligned underneath. Returns the
/// buffer as `Bytes` and the file position of its first byte.
async fn read_window(
    file: &dyn StorageFile,
    position: u64,
    len: usize,
    limit: u64,
) -> Result<(Bytes, u64)> {
    let start = align_down(position);
    let end =
        align_up(position.saturating_add(len as u64).min(limit)).max(start + block_bytes as u64);
    let buf = AlignedBuf::new((end - start) as usize);
    let (result, buf) = file.read_at(start, buf).await;
    result.map_err(|e| Error::io("read", file.path(), e))?;
    Ok((Bytes::from_owner(buf), start))
}

/// Walk batches from `position` to `limit`, calling `visit` for each CRC-checked batch with its
/// bytes; `visit` returns false to stop. Damage is an error naming the file and position.
async fn walk(
    file: &dyn StorageFile,
    mut position: u64,
    limit: u64,
    window: usize,
    max_batch_bytes: usize,
    metrics: &Metrics,
    mut visit: impl FnMut(&BatchHeader, u64, &Bytes, usize) -> bool,
) -> Result<u64> {
    let mut want = window.clamp(read_bytes_min, read_bytes_max);
    while position < limit {
        let (bytes, start) = read_window(file, position, want, limit).await?;
        let mut at = (position - start) as usize;
        let available_end = ((limit - start) as usize).min(bytes.len());
        loop {
            if position >= limit {
                return Ok(position);
            }
            match slot(&bytes[at..available_end], max_batch_bytes) {
                Slot::Batch(h) => {
                    let go_on = visit(&h, position, &bytes, at);
                    at += h.size_bytes;
                    position += h.size_bytes as u64;
                    if !go_on {
                        return Ok(position);
                    }
                }
                Slot::Incomplete { needed } => {
                    if (limit - position) < needed as u64 {
                        return Err(Error::Corruption {
                            file: file.path().to_path_buf(),
                            position,
                            reason: format!("batch of {needed} bytes runs past the end of the log"),
                        });
                    }
                    want = want.max(needed + block_bytes);
                    break;
                }
                Slot::End => {
                    return Err(Error::Corruption {
                        file: file.path().to_path_buf(),
                        position,
                        reason: "zeros inside the log".into(),
                    })
                }
                Slot::Damaged(e) => {
                    bump(&metrics.crc_failures, 1);
                    return Err(Error::Corruption {
                        file: file.path().to_path_buf(),
                        position,
                        reason: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(position)
}

/// Fetch: batches from `read.offset`, below `read.upper`, about `max_bytes` of them (at least one).
pub(crate) async fn fetch(
    mut read: DiskRead,
    storage: Rc<dyn Storage>,
    metrics: &Metrics,
    max_batch_bytes: usize,
) -> Result<ReadResult> {
    let file = read.open(storage.as_ref()).await?;
    let mut region: Option<(Bytes, usize, usize)> = None;
    let mut next_offset = read.offset;
    let offset = read.offset;
    let upper = read.upper;
    let max_bytes = read.max_bytes;
    let outcome = walk(
        file.as_ref(),
        read.start_position,
        read.limit_position,
        max_bytes.saturating_add(block_bytes),
        max_batch_bytes,
        metrics,
        |h, _position, bytes, at| {
            if h.next_offset() <= offset {
                return true;
            }
            if h.base_offset >= upper {
                return false;
            }
            match &mut region {
                Some((buf, start, end))
                    if std::ptr::eq(buf.as_ptr(), bytes.as_ptr()) && *end == at =>
                {
                    if *end - *start + h.size_bytes > max_bytes {
                        return false;
                    }
                    *end += h.size_bytes;
                }
                Some(_) => return false,
                None => region = Some((bytes.clone(), at, at + h.size_bytes)),
            }
            next_offset = h.next_offset();
            true
        },
    )
    .await;
    match (outcome, region) {
        (_, Some((bytes, start, end))) => {
            read.result.chunks.push(bytes.slice(start..end));
            read.result.next_offset = next_offset;
            Ok(read.result)
        }
        (Ok(_), None) => Ok(read.result),
        (Err(e), None) => Err(e),
    }
}

/// The first batch with maxTimestamp ≥ `timestamp`, scanning the segment from the read's start.
/// Returns `Ok(None)` if the on-disk part of the segment has none.
pub(crate) async fn find_timestamp(
    read: &DiskRead,
    storage: Rc<dyn Storage>,
    metrics: &Metrics,
    max_batch_bytes: usize,
    timestamp: i64,
) -> Result<Option<TimestampOffset>> {
    let file = read.open(storage.as_ref()).await?;
    let mut found = None;
    walk(
        file.as_ref(),
        read.start_position,
        read.limit_position,
        read_bytes_min,
        max_batch_bytes,
        metrics,
        |h, _, _, _| {
            if h.max_timestamp >= timestamp {
                found = Some(TimestampOffset {
                    offset: h.base_offset,
                    timestamp: h.max_timestamp,
                });
                return false;
            }
            true
        },
    )
    .await?;
    Ok(found)
}

/// Position and base offset of the first batch that ends after `offset` (the batch containing it),
/// or `(limit, offset)` if none does.
pub(crate) async fn locate(
    file: &dyn StorageFile,
    start: u64,
    limit: u64,
    offset: u64,
    max_batch_bytes: usize,
) -> Result<(u64, u64)> {
    let mut found = None;
    walk(
        file,
        start,
        limit,
        read_bytes_min,
        max_batch_bytes,
        &Metrics::default(),
        |h, position, _, _| {
            if h.next_offset() > offset {
                found = Some((position, h.base_offset));
                return false;
            }
            true
        },
    )
    .await?;
    Ok(found.unwrap_or((limit, offset)))
}
