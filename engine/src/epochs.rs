//! Leader epoch → start offset, persisted as Kafka's `leader-epoch-checkpoint`:
//!
//! ```text
//! 0                 version
//! 2                 number of entries
//! 0 0               epoch start_offset
//! 3 1500
//! ```
//!
//! Replication uses it for OffsetForLeaderEpoch: the end offset of an epoch is the start offset of
//! the next larger epoch (or the log end offset for the latest epoch).

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaderEpochCache {
    entries: Vec<(i32, u64)>,
}

impl LeaderEpochCache {
    pub fn latest_epoch(&self) -> Option<i32> {
        self.entries.last().map(|&(e, _)| e)
    }

    /// Note that `epoch` starts at `start_offset`. Returns true if the cache changed. Epochs only
    /// grow; an entry for an epoch already known is ignored.
    pub fn assign(&mut self, epoch: i32, start_offset: u64) -> bool {
        if epoch < 0 {
            return false;
        }
        match self.entries.last() {
            Some(&(last, _)) if epoch <= last => false,
            _ => {
                self.entries.push((epoch, start_offset));
                true
            }
        }
    }

    /// Kafka's OffsetForLeaderEpoch answer: `(largest epoch ≤ requested, its end offset)`, or `None`
    /// when the requested epoch is older than every known epoch.
    pub fn end_offset_for(&self, epoch: i32, log_end_offset: u64) -> Option<(i32, u64)> {
        let i = self.entries.partition_point(|&(e, _)| e <= epoch);
        if i == 0 {
            return None;
        }
        let found = self.entries[i - 1].0;
        let end = self
            .entries
            .get(i)
            .map_or(log_end_offset, |&(_, start)| start);
        Some((found, end))
    }

    /// Remove epochs that start at or after `offset` (log truncation).
    pub fn truncate_from_end(&mut self, offset: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|&(_, start)| start < offset);
        before != self.entries.len()
    }

    /// The log now starts at `offset`: entries wholly before it go, the one covering it starts there.
    pub fn truncate_from_start(&mut self, offset: u64) -> bool {
        let covering = self.entries.partition_point(|&(_, start)| start <= offset);
        if covering == 0 {
            return false;
        }
        let changed = covering > 1 || self.entries[0].1 != offset;
        self.entries.drain(..covering - 1);
        self.entries[0].1 = offset;
        changed
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut s = format!("0\n{}\n", self.entries.len());
        for (e, o) in &self.entries {
            s.push_str(&format!("{e} {o}\n"));
        }
        s.into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Result<LeaderEpochCache, String> {
        let text = std::str::from_utf8(bytes).map_err(|e| e.to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some("0") {
            return Err("unknown leader-epoch-checkpoint version".into());
        }
        let count: usize = lines
            .next()
            .and_then(|l| l.parse().ok())
            .ok_or("missing entry count")?;
        let mut cache = LeaderEpochCache::default();
        for _ in 0..count {
            let line = lines.next().ok_or("missing entry")?;
            let (e, o) = line.split_once(' ').ok_or("malformed entry")?;
            let e: i32 = e.parse().map_err(|_| "bad epoch")?;
            let o: u64 = o.parse().map_err(|_| "bad offset")?;
            if !cache.assign(e, o) {
                return Err(format!("epochs not increasing at {e}"));
            }
        }
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_semantics() {
        let mut c = LeaderEpochCache::default();
        assert!(c.assign(0, 0));
        assert!(!c.assign(0, 10));
        assert!(c.assign(3, 100));
        assert!(c.assign(5, 250));
        assert_eq!(c.end_offset_for(0, 300), Some((0, 100)));
        assert_eq!(c.end_offset_for(4, 300), Some((3, 250)));
        assert_eq!(c.end_offset_for(5, 300), Some((5, 300)));
        assert_eq!(c.end_offset_for(-1, 300), None);
        assert_eq!(LeaderEpochCache::decode(&c.encode()).unwrap(), c);
        assert!(c.truncate_from_end(250));
        assert_eq!(c.latest_epoch(), Some(3));
        assert!(c.truncate_from_start(120));
        assert_eq!(c.end_offset_for(3, 200), Some((3, 200)));
        assert_eq!(c.entries, vec![(3, 120)]);
        assert!(LeaderEpochCache::decode(b"0\n2\n1 5\n0 7\n").is_err());
    }
}
