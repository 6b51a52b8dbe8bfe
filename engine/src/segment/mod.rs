//! One segment: a `.log` file of whole batches plus its sparse indexes.

pub mod index;
pub mod path;
pub mod reader;

use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

use crate::batch::BatchHeader;
use crate::constants::index_interval_bytes;
use crate::io::StorageFile;
use index::{OffsetIndex, TimeIndex};

/// A segment's in-memory state. `size` counts every appended byte, written or not; the file holds
/// at least the written ones and, past the logical end, only zeros from preallocation.
pub struct Segment {
    pub base_offset: u64,
    pub log_path: PathBuf,
    /// `None` until the shard has created the file (a new segment waits for its predecessor's seal).
    pub file: Option<Rc<dyn StorageFile>>,
    pub size: u64,
    /// Bytes reserved by fallocate (the file's length while the segment is active).
    pub allocated: u64,
    /// Offset after the last appended batch (= base_offset while empty).
    pub next_offset: u64,
    pub max_timestamp: i64,
    pub index: OffsetIndex,
    pub time_index: TimeIndex,
    bytes_since_index_entry: u64,
    pub created: Instant,
    /// Truncated to its size, synced, indexes persisted: never written again.
    pub sealed: bool,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("base_offset", &self.base_offset)
            .field("size", &self.size)
            .field("next_offset", &self.next_offset)
            .field("sealed", &self.sealed)
            .finish()
    }
}

impl Segment {
    pub fn new(base_offset: u64, log_path: PathBuf) -> Segment {
        Segment {
            base_offset,
            log_path,
            file: None,
            size: 0,
            allocated: 0,
            next_offset: base_offset,
            max_timestamp: -1,
            index: OffsetIndex::default(),
            time_index: TimeIndex::default(),
            bytes_since_index_entry: 0,
            created: Instant::now(),
            sealed: false,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    pub fn relative(&self, offset: u64) -> u32 {
        offset.saturating_sub(self.base_offset).min(u32::MAX as u64) as u32
    }

    /// Account for a batch placed at `position` (= the current size); maintain the sparse indexes.
    pub fn on_batch(&mut self, header: &BatchHeader, position: u64) {
        assert_eq!(position, self.size, "batches are placed back to back");
        assert!(
            header.base_offset >= self.next_offset,
            "offsets grow within a segment"
        );
        if position > 0 && self.bytes_since_index_entry >= index_interval_bytes {
            let relative = self.relative(header.base_offset);
            self.index.append(relative, position as u32);
            self.time_index.maybe_append(self.max_timestamp, relative);
            self.bytes_since_index_entry = 0;
        }
        self.bytes_since_index_entry += header.size_bytes as u64;
        self.size += header.size_bytes as u64;
        self.next_offset = header.next_offset();
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
    }

    /// Forget everything at or after `position`/`offset` (both must be a batch boundary).
    pub fn truncate(&mut self, position: u64, offset: u64) {
        assert!(position <= self.size);
        self.size = position;
        self.next_offset = offset.max(self.base_offset);
        self.index.truncate_to_position(position as u32);
        self.time_index.truncate_to_offset(self.relative(offset));
        self.bytes_since_index_entry = position - self.index.last_position() as u64;
    }

    /// Install state established by recovery: `size` bytes holding offsets up to `next_offset`.
    pub fn restore(
        &mut self,
        size: u64,
        next_offset: u64,
        index: OffsetIndex,
        time_index: TimeIndex,
    ) {
        self.size = size;
        self.next_offset = next_offset;
        self.max_timestamp = time_index.last_timestamp().unwrap_or(-1);
        self.bytes_since_index_entry = size - index.last_position() as u64;
        self.index = index;
        self.time_index = time_index;
    }

    /// Record the final max timestamp so time lookups and time retention see the whole segment.
    pub fn finish_time_index(&mut self) {
        self.time_index = self.finished_time_index();
    }

    /// The time index with its final entry (`TimeIndex::finish`): what a sealed segment keeps,
    /// and what a clean shutdown writes for the active one.
    pub fn finished_time_index(&self) -> TimeIndex {
        let mut finished = self.time_index.clone();
        if self.next_offset > self.base_offset {
            finished.finish(self.max_timestamp, self.relative(self.next_offset - 1));
        }
        finished
    }

    pub fn index_path(&self) -> PathBuf {
        self.log_path.with_extension(path::INDEX_SUFFIX)
    }

    pub fn time_index_path(&self) -> PathBuf {
        self.log_path.with_extension(path::TIME_INDEX_SUFFIX)
    }
}
