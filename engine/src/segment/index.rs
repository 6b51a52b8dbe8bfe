//! Sparse indexes of a segment, kept in memory and persisted whole at roll, checkpoint and shutdown.
//!
//! Offset index (`.index`): 8-byte entries `(relative base offset: u32 BE, position: u32 BE)`, one
//! per `index_interval_bytes` of log, for the first batch at or after that many bytes. A lookup
//! gives the position of the last indexed batch whose base offset is ≤ the target; the reader scans
//! forward from there.
//!
//! Time index (`.timeindex`): 12-byte entries `(max timestamp so far: i64 BE, relative base offset:
//! u32 BE)`, appended with the offset index entry when the segment's max timestamp grew. An entry
//! `(T, O)` promises every batch before `O` has maxTimestamp ≤ T; so a lookup for `target` starts
//! its scan at the last entry with `T < target`.
//!
//! Both are derived data: a missing or inconsistent index file is rebuilt by scanning the segment.

/// Why a persisted index was not trusted (it is then rebuilt).
pub type IndexError = String;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OffsetIndex {
    entries: Vec<(u32, u32)>,
}

impl OffsetIndex {
    pub fn append(&mut self, relative_offset: u32, position: u32) {
        if let Some(&(last_offset, last_position)) = self.entries.last() {
            assert!(
                relative_offset > last_offset && position > last_position,
                "offset index must grow: ({last_offset}, {last_position}) then ({relative_offset}, {position})"
            );
        }
        self.entries.push((relative_offset, position));
    }

    /// Position of the last indexed batch with relative base offset ≤ `relative_offset` (0 if none).
    pub fn lookup(&self, relative_offset: u32) -> (u32, u32) {
        let i = self.entries.partition_point(|&(o, _)| o <= relative_offset);
        if i == 0 {
            (0, 0)
        } else {
            self.entries[i - 1]
        }
    }

    /// Drop entries for batches at or after `position` (truncation).
    pub fn truncate_to_position(&mut self, position: u32) {
        let keep = self.entries.partition_point(|&(_, p)| p < position);
        self.entries.truncate(keep);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The last entry: (relative offset, position).
    pub fn last_entry(&self) -> Option<(u32, u32)> {
        self.entries.last().copied()
    }

    pub fn last_position(&self) -> u32 {
        self.entries.last().map_or(0, |&(_, p)| p)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 8);
        for &(o, p) in &self.entries {
            out.extend_from_slice(&o.to_be_bytes());
            out.extend_from_slice(&p.to_be_bytes());
        }
        out
    }

    /// Decode entries, trusting only those with positions below `valid_bytes`.
    pub fn decode(bytes: &[u8], valid_bytes: u64) -> Result<OffsetIndex, IndexError> {
        if !bytes.len().is_multiple_of(8) {
            return Err(format!(
                "offset index length {} is not a multiple of 8",
                bytes.len()
            ));
        }
        let mut index = OffsetIndex::default();
        for chunk in bytes.chunks_exact(8) {
            let o = u32::from_be_bytes(chunk[0..4].try_into().expect("4 bytes"));
            let p = u32::from_be_bytes(chunk[4..8].try_into().expect("4 bytes"));
            if p as u64 >= valid_bytes {
                break;
            }
            if let Some(&(lo, lp)) = index.entries.last() {
                if o <= lo || p <= lp {
                    return Err(format!(
                        "offset index not increasing at entry {}",
                        index.len()
                    ));
                }
            }
            index.entries.push((o, p));
        }
        Ok(index)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimeIndex {
    entries: Vec<(i64, u32)>,
}

impl TimeIndex {
    /// Record that every batch before `relative_offset` has maxTimestamp ≤ `max_timestamp`... and
    /// that the batch at `relative_offset` is where the scan for later timestamps may start.
    pub fn maybe_append(&mut self, max_timestamp: i64, relative_offset: u32) {
        match self.entries.last() {
            Some(&(t, o)) if max_timestamp <= t || relative_offset <= o => {}
            _ => self.entries.push((max_timestamp, relative_offset)),
        }
    }

    /// The final entry of a sealed (or cleanly closed) segment: its max timestamp, at its last
    /// batch. The segment's max timestamp is read back from this entry when it is reopened, so
    /// it must be there even when the last batch already has an entry (of the timestamps before
    /// it): that entry's timestamp is raised instead, which keeps its promise (every batch before
    /// its offset is at or below it) and keeps lookups starting at or before the batch they find.
    pub fn finish(&mut self, max_timestamp: i64, last_relative: u32) {
        match self.entries.last_mut() {
            Some((t, o)) if *o == last_relative => *t = (*t).max(max_timestamp),
            _ => self.maybe_append(max_timestamp, last_relative),
        }
    }

    /// Relative offset to start scanning from for the first batch with maxTimestamp ≥ `target`.
    pub fn lookup(&self, target: i64) -> u32 {
        let i = self.entries.partition_point(|&(t, _)| t < target);
        if i == 0 {
            0
        } else {
            self.entries[i - 1].1
        }
    }

    pub fn last_timestamp(&self) -> Option<i64> {
        self.entries.last().map(|&(t, _)| t)
    }

    pub fn truncate_to_offset(&mut self, relative_offset: u32) {
        let keep = self.entries.partition_point(|&(_, o)| o < relative_offset);
        self.entries.truncate(keep);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 12);
        for &(t, o) in &self.entries {
            out.extend_from_slice(&t.to_be_bytes());
            out.extend_from_slice(&o.to_be_bytes());
        }
        out
    }

    /// Decode entries, trusting only those with offsets below `valid_relative_end`.
    pub fn decode(bytes: &[u8], valid_relative_end: u64) -> Result<TimeIndex, IndexError> {
        if !bytes.len().is_multiple_of(12) {
            return Err(format!(
                "time index length {} is not a multiple of 12",
                bytes.len()
            ));
        }
        let mut index = TimeIndex::default();
        for chunk in bytes.chunks_exact(12) {
            let t = i64::from_be_bytes(chunk[0..8].try_into().expect("8 bytes"));
            let o = u32::from_be_bytes(chunk[8..12].try_into().expect("4 bytes"));
            if o as u64 >= valid_relative_end {
                break;
            }
            if let Some(&(lt, lo)) = index.entries.last() {
                if t <= lt || o <= lo {
                    return Err(format!(
                        "time index not increasing at entry {}",
                        index.len()
                    ));
                }
            }
            index.entries.push((t, o));
        }
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_index_lookup_truncate_round_trip() {
        let mut i = OffsetIndex::default();
        for k in 1..=10u32 {
            i.append(k * 10, k * 4096);
        }
        assert_eq!(i.lookup(5), (0, 0));
        assert_eq!(i.lookup(10), (10, 4096));
        assert_eq!(i.lookup(55), (50, 5 * 4096));
        assert_eq!(i.lookup(1000), (100, 10 * 4096));
        let decoded = OffsetIndex::decode(&i.encode(), u64::MAX).unwrap();
        assert_eq!(decoded, i);
        let partial = OffsetIndex::decode(&i.encode(), 3 * 4096 + 1).unwrap();
        assert_eq!(partial.len(), 3);
        i.truncate_to_position(5 * 4096);
        assert_eq!(i.len(), 4);
        assert!(OffsetIndex::decode(&[0; 7], u64::MAX).is_err());
        let mut bad = i.encode();
        bad[8..16].copy_from_slice(&i.encode()[0..8]);
        assert!(OffsetIndex::decode(&bad, u64::MAX).is_err());
    }

    #[test]
    fn the_final_entry_carries_the_segment_max_even_when_its_last_batch_has_an_entry() {
        // Batches at relative 0, 1, 2 with max timestamps 10, 20, 30; every batch indexed.
        let mut t = TimeIndex::default();
        t.maybe_append(10, 1);
        t.maybe_append(20, 2);
        t.finish(30, 2);
        assert_eq!(
            t.last_timestamp(),
            Some(30),
            "reopened, the segment reaches 30"
        );
        assert_eq!(
            t.lookup(30),
            1,
            "the scan for 30 starts before the batch holding it"
        );
        assert_eq!(t.lookup(25), 1);
        assert_eq!(t.lookup(20), 1);
        assert_eq!(t.lookup(15), 1);
        // Without an entry at the last batch, the final entry is appended.
        let mut t = TimeIndex::default();
        t.maybe_append(10, 1);
        t.finish(30, 2);
        assert_eq!(t.last_timestamp(), Some(30));
        assert_eq!(t.lookup(30), 1);
        let decoded = TimeIndex::decode(&t.encode(), 3).unwrap();
        assert_eq!(decoded, t);
    }

    #[test]
    fn time_index_only_grows_and_lookup_starts_early_enough() {
        let mut t = TimeIndex::default();
        t.maybe_append(100, 1);
        t.maybe_append(100, 2);
        t.maybe_append(90, 3);
        t.maybe_append(200, 4);
        assert_eq!(t.len(), 2);
        assert_eq!(t.lookup(100), 0);
        assert_eq!(t.lookup(101), 1);
        assert_eq!(t.lookup(500), 4);
        assert_eq!(TimeIndex::decode(&t.encode(), 5).unwrap(), t);
        t.truncate_to_offset(4);
        assert_eq!(t.len(), 1);
    }
}
