//! The shard journal: many partitions' small appends made durable by one sequential write and one
//! fdatasync (ARCHITECTURE decision 10; every byte in FORMAT.md).
//!
//! A shard owns one file, `<data dir>/.journal/<shard>.journal`: two header blocks, then a ring of
//! `capacity` bytes (allocated when the file is made). Positions are *logical*: they only grow,
//! and the byte at logical position `l` lies at `header_area + l % capacity`.
//!
//! * A **record** carries one partition's batches, exactly as its log holds them (offsets
//!   assigned), with the partition's name and incarnation (a number its directory holds, changed
//!   at creation and before every truncation, so records never replay into a log they do not
//!   belong to). Each record names its own logical position and the next record's, and a CRC-32C
//!   covers all of it: a stale record from an earlier lap, or a torn one, never matches.
//! * A **journal write** is the records of one group commit, padded to whole blocks, at the head;
//!   the last record points past the padding. It never wraps: if it does not fit before the ring's
//!   end it starts the next lap (replay tries the lap start when a record is missing mid-lap).
//!   Several writes may be in flight; one fdatasync covers those completed before it, and writes
//!   are acknowledged in journal order only, so a torn or missing record ends replay: nothing
//!   after it was acknowledged (`pipeline.rs` has the rules, the new lap's among them).
//! * The **checkpoint** (in the header) is the logical position replay starts from. Everything
//!   journaled before it is durable in the partitions' segments. The header is written to the two
//!   blocks alternately with a sequence number; the valid one with the higher number counts.

use std::collections::HashMap;

use bytes::Bytes;

use crate::constants::{block_bytes, journal_write_bytes_max};
use crate::io::AlignedBuf;

mod pipeline;
use crate::PartitionId;
pub(crate) use pipeline::Pipeline;

const HEADER_MAGIC: &[u8; 8] = b"KEELJNL\x01";
const RECORD_MAGIC: u32 = 0x4b4a_5231; // "KJR1"
/// The two header blocks before the ring.
pub(crate) const HEADER_AREA: u64 = 2 * block_bytes as u64;
/// Fixed part of a record, before the topic name and the batches.
pub(crate) const RECORD_FIXED: usize = 42;

/// Bound on logical positions and capacities a header may hold (see `Header::decode`).
const LOGICAL_MAX: u64 = 1 << 62;

/// The journal header: where replay starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    pub capacity: u64,
    pub seq: u64,
    pub checkpoint: u64,
}

impl Header {
    /// One block: magic, capacity, seq, checkpoint (u64 LE each), CRC-32C of those 32 bytes.
    pub fn encode(&self) -> [u8; 36] {
        let mut out = [0u8; 36];
        out[..8].copy_from_slice(HEADER_MAGIC);
        out[8..16].copy_from_slice(&self.capacity.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.checkpoint.to_le_bytes());
        let crc = crc32c::crc32c(&out[..32]);
        out[32..36].copy_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(block: &[u8]) -> Option<Header> {
        if block.len() < 36 || &block[..8] != HEADER_MAGIC {
            return None;
        }
        let crc = u32::from_le_bytes(block[32..36].try_into().ok()?);
        if crc != crc32c::crc32c(&block[..32]) {
            return None;
        }
        let word = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().expect("8 bytes"));
        let header = Header {
            capacity: word(8),
            seq: word(16),
            checkpoint: word(24),
        };
        // Logical positions only grow by bytes written: 2^62 is never reached, and keeping below
        // it lets replay add a lap or two without overflow, whatever a damaged header says.
        (header.capacity > 0
            && header.capacity.is_multiple_of(block_bytes as u64)
            && header.capacity <= LOGICAL_MAX
            && header.checkpoint <= LOGICAL_MAX)
            .then_some(header)
    }

    /// The block this header is written to (they alternate).
    pub fn slot_position(&self) -> u64 {
        (self.seq % 2) * block_bytes as u64
    }
}

/// The newer valid header of the file's two header blocks.
pub(crate) fn read_header(file: &[u8]) -> Option<Header> {
    let slot = |i: usize| {
        file.get(i * block_bytes..(i + 1) * block_bytes)
            .and_then(Header::decode)
    };
    match (slot(0), slot(1)) {
        (Some(a), Some(b)) => Some(if a.seq >= b.seq { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// One partition's part of a journal write, as the shard gathers it.
pub(crate) struct Entry {
    pub id: PartitionId,
    pub incarnation: u64,
    pub chunks: Vec<Bytes>,
    /// The offset after the last batch of `chunks`.
    pub end_offset: u64,
}

impl Entry {
    pub fn encoded_len(&self) -> usize {
        RECORD_FIXED + self.id.topic.len() + self.chunks.iter().map(Bytes::len).sum::<usize>()
    }
}

/// Encode the records of one journal write starting at logical position `start` into `out`
/// (cleared first), padded to whole blocks with zeros: straight into the buffer the write
/// submits, so the batches are copied once.
pub(crate) fn encode_write(start: u64, entries: &[Entry], out: &mut AlignedBuf) {
    out.clear();
    let mut starts = Vec::with_capacity(entries.len());
    for e in entries {
        let at = out.len();
        starts.push(at);
        let payload: usize = e.chunks.iter().map(Bytes::len).sum();
        let len = e.encoded_len();
        assert!(
            out.remaining() >= len,
            "a journal write is sized to its buffer before it is encoded"
        );
        out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // CRC, filled in below
        out.extend_from_slice(&(start + at as u64).to_le_bytes());
        out.extend_from_slice(&(start + (at + len) as u64).to_le_bytes());
        out.extend_from_slice(&e.incarnation.to_le_bytes());
        out.extend_from_slice(&e.id.partition.to_le_bytes());
        out.extend_from_slice(&(payload as u32).to_le_bytes());
        out.extend_from_slice(&(e.id.topic.len() as u16).to_le_bytes());
        out.extend_from_slice(e.id.topic.as_bytes());
        for c in &e.chunks {
            out.extend_from_slice(c);
        }
    }
    let unpadded = out.len();
    let padded = out.padded_len();
    out.zero_padding();
    out.set_len(padded);
    let bytes = out.as_mut_slice();
    if let Some(&last) = starts.last() {
        // The last record points past the padding: that is where the next write starts.
        bytes[last + 16..last + 24].copy_from_slice(&(start + padded as u64).to_le_bytes());
    }
    for (i, &at) in starts.iter().enumerate() {
        // A record's CRC covers its bytes after the CRC (the last record's padding excluded).
        let end = starts.get(i + 1).copied().unwrap_or(unpadded);
        let crc = crc32c::crc32c(&bytes[at + 8..end]);
        bytes[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

/// A record found by replay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub id: PartitionId,
    pub incarnation: u64,
    pub batches: Bytes,
}

/// Decode the record the ring holds at logical position `at`, if a valid one is there.
fn record_at(ring: &[u8], capacity: u64, at: u64) -> Option<(Record, u64)> {
    let offset = (at % capacity) as usize;
    let bytes = ring.get(offset..)?;
    if bytes.len() < RECORD_FIXED || u32::from_le_bytes(bytes[..4].try_into().ok()?) != RECORD_MAGIC
    {
        return None;
    }
    let word = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    let (logical, next, incarnation) = (word(8), word(16), word(24));
    let partition = u32::from_le_bytes(bytes[32..36].try_into().ok()?);
    let payload = u32::from_le_bytes(bytes[36..40].try_into().ok()?) as usize;
    let topic_len = u16::from_le_bytes(bytes[40..42].try_into().ok()?) as usize;
    let len = RECORD_FIXED + topic_len + payload;
    // A write never exceeds the ring, so neither does the step to the next record.
    if logical != at || len > bytes.len() || next < at + len as u64 || next - at > capacity {
        return None;
    }
    let crc = u32::from_le_bytes(bytes[4..8].try_into().ok()?);
    if crc != crc32c::crc32c(&bytes[8..len]) {
        return None;
    }
    let topic = std::str::from_utf8(&bytes[RECORD_FIXED..RECORD_FIXED + topic_len]).ok()?;
    let record = Record {
        id: PartitionId::new(topic, partition),
        incarnation,
        batches: Bytes::copy_from_slice(&bytes[RECORD_FIXED + topic_len..len]),
    };
    Some((record, next))
}

/// Every record from the checkpoint on, in journal order, and the logical position after the last.
pub(crate) fn replay(file: &[u8]) -> Option<(Header, Vec<Record>, u64)> {
    let header = read_header(file)?;
    let ring = file.get(HEADER_AREA as usize..)?;
    let capacity = header.capacity;
    let mut at = header.checkpoint;
    let mut records = Vec::new();
    while at - header.checkpoint < capacity {
        let found = record_at(ring, capacity, at).or_else(|| {
            // A write that did not fit before the ring's end starts the next lap.
            let lap = at.next_multiple_of(capacity);
            (lap != at)
                .then(|| record_at(ring, capacity, lap))
                .flatten()
        });
        match found {
            Some((record, next)) => {
                records.push(record);
                at = next;
            }
            None => break,
        }
    }
    Some((header, records, at))
}

/// [`replay`] over a journal file read through `read(offset, len)` (up to `len` bytes from
/// `offset`): first only its header and the two places replay looks first — the checkpoint and
/// the next lap's start, a record's worth each (a record is part of one journal write). Where
/// neither holds a record, as after a clean shutdown or when every record was checkpointed,
/// that is all replay would read of the ring, and the answer is the same: a start-up reads
/// 2 MiB of each shard's journal, not the whole ring (64 MiB). Otherwise the whole file.
pub(crate) fn replay_file(
    read: impl Fn(u64, usize) -> std::io::Result<Vec<u8>>,
) -> std::io::Result<Option<(Header, Vec<Record>, u64)>> {
    let head = read(0, HEADER_AREA as usize)?;
    let Some(header) = read_header(&head) else {
        return Ok(None);
    };
    let capacity = header.capacity;
    let file_len = HEADER_AREA + capacity;
    if capacity == 0 || read(file_len - 1, 1)?.is_empty() {
        // Shorter than its header says: replay what is there.
        return Ok(replay(&read(
            0,
            usize::try_from(file_len).unwrap_or(usize::MAX),
        )?));
    }
    // Zeroed memory is mapped lazily: only the pages read into are touched.
    let mut image = vec![0u8; file_len as usize];
    image[..head.len()].copy_from_slice(&head);
    for at in [
        header.checkpoint,
        header.checkpoint.next_multiple_of(capacity),
    ] {
        let offset = at % capacity;
        let len = (journal_write_bytes_max as u64).min(capacity - offset) as usize;
        let bytes = read(HEADER_AREA + offset, len)?;
        let start = (HEADER_AREA + offset) as usize;
        image[start..start + bytes.len()].copy_from_slice(&bytes);
    }
    match replay(&image) {
        Some((_, records, _)) if !records.is_empty() => Ok(replay(&read(0, file_len as usize)?)),
        nothing_to_replay => Ok(nothing_to_replay),
    }
}

/// Replay's records grouped by partition, in journal order.
pub(crate) fn by_partition(records: Vec<Record>) -> HashMap<PartitionId, Vec<(u64, Bytes)>> {
    let mut out: HashMap<PartitionId, Vec<(u64, Bytes)>> = HashMap::new();
    for r in records {
        out.entry(r.id)
            .or_default()
            .push((r.incarnation, r.batches));
    }
    out
}

/// Where a write of `len` bytes goes, given the head and the checkpoint: at the head, or at the
/// next lap if it would cross the ring's end; `None` if the ring has no room before the checkpoint.
pub(crate) fn place(head: u64, checkpoint: u64, capacity: u64, len: u64) -> Option<u64> {
    let start = if head % capacity + len > capacity {
        head.next_multiple_of(capacity)
    } else {
        head
    };
    (start + len - checkpoint <= capacity).then_some(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(topic: &str, partition: u32, fill: u8, len: usize) -> Entry {
        Entry {
            id: PartitionId::new(topic, partition),
            incarnation: 7,
            chunks: vec![
                Bytes::from(vec![fill; len / 2]),
                Bytes::from(vec![fill; len - len / 2]),
            ],
            end_offset: 0,
        }
    }

    fn encoded(start: u64, entries: &[Entry]) -> Vec<u8> {
        let mut out = AlignedBuf::new(64 * 1024);
        out.extend_from_slice(&[0xee; 100]); // leftovers of an earlier write are cleared
        encode_write(start, entries, &mut out);
        out.as_slice().to_vec()
    }

    /// A file image: headers, then the ring, with `writes` placed at their logical positions.
    fn image(capacity: u64, checkpoint: u64, writes: &[(u64, Vec<u8>)]) -> Vec<u8> {
        let mut file = vec![0u8; (HEADER_AREA + capacity) as usize];
        let h = Header {
            capacity,
            seq: 3,
            checkpoint,
        };
        let at = h.slot_position() as usize;
        file[at..at + 36].copy_from_slice(&h.encode());
        for (start, bytes) in writes {
            let p = (HEADER_AREA + start % capacity) as usize;
            file[p..p + bytes.len()].copy_from_slice(bytes);
        }
        file
    }

    #[test]
    fn records_round_trip_in_order_and_stop_at_the_first_gap() {
        let cap = 64 * 1024;
        let w1 = encoded(0, &[entry("a", 0, 1, 100), entry("b-c", 3, 2, 5000)]);
        assert_eq!(w1.len() % block_bytes, 0);
        let w2 = encoded(w1.len() as u64, &[entry("a", 0, 3, 10)]);
        let file = image(cap, 0, &[(0, w1.clone()), (w1.len() as u64, w2.clone())]);
        let (_, records, end) = replay(&file).expect("header");
        let got: Vec<_> = records
            .iter()
            .map(|r| (r.id.to_string(), r.batches.len(), r.batches[0]))
            .collect();
        assert_eq!(
            got,
            vec![
                ("a-0".into(), 100, 1),
                ("b-c-3".into(), 5000, 2),
                ("a-0".into(), 10, 3)
            ]
        );
        assert_eq!(end, (w1.len() + w2.len()) as u64);
        assert_eq!(records[0].incarnation, 7);

        // A torn second write ends replay after the first, whatever follows.
        let mut torn = w2.clone();
        torn[50] ^= 0xff;
        let file = image(cap, 0, &[(0, w1.clone()), (w1.len() as u64, torn)]);
        let (_, records, end) = replay(&file).expect("header");
        assert_eq!(records.len(), 2);
        assert_eq!(end, w1.len() as u64);
    }

    #[test]
    fn stale_records_of_an_earlier_lap_are_not_replayed() {
        let cap = 16 * 1024;
        let old = encoded(0, &[entry("a", 0, 1, 100)]);
        // The same bytes sit at ring offset 0, but the checkpoint is a lap later.
        let file = image(cap, cap, &[(0, old)]);
        let (_, records, end) = replay(&file).expect("header");
        assert!(records.is_empty());
        assert_eq!(end, cap);
    }

    #[test]
    fn a_write_that_does_not_fit_starts_the_next_lap() {
        let cap = 16 * 1024;
        assert_eq!(place(12 * 1024, 8 * 1024, cap, 8 * 1024), Some(cap));
        assert_eq!(place(12 * 1024, 0, cap, 8 * 1024), None); // would overwrite the checkpoint's data
        assert_eq!(place(4096, 0, cap, 8192), Some(4096));
        let w1 = encoded(12 * 1024, &[entry("a", 0, 1, 1000)]);
        let w2 = encoded(cap, &[entry("a", 0, 2, 6000)]);
        let file = image(cap, 12 * 1024, &[(12 * 1024, w1), (cap, w2)]);
        let (_, records, end) = replay(&file).expect("header");
        assert_eq!(
            records.iter().map(|r| r.batches[0]).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(end, cap + 8192);
    }

    #[test]
    fn the_newer_valid_header_wins_and_a_torn_one_is_ignored() {
        let a = Header {
            capacity: 8192,
            seq: 4,
            checkpoint: 100,
        };
        let b = Header {
            capacity: 8192,
            seq: 5,
            checkpoint: 200,
        };
        let mut file = vec![0u8; 2 * block_bytes];
        file[..36].copy_from_slice(&a.encode());
        file[block_bytes..block_bytes + 36].copy_from_slice(&b.encode());
        assert_eq!(read_header(&file), Some(b));
        file[block_bytes + 30] ^= 1;
        assert_eq!(read_header(&file), Some(a));
        assert_eq!(read_header(&[0u8; 2 * block_bytes]), None);
    }

    #[test]
    fn positions_near_the_end_of_u64_are_refused_not_overflowed() {
        // A header with a valid CRC but a checkpoint no run can reach: refused (replay would
        // step past u64::MAX looking for the next lap).
        let cap = 64 * 1024;
        let far = u64::MAX - 100;
        let file = image(cap, far, &[]);
        assert_eq!(read_header(&file), None);
        assert!(replay(&file).is_none());
        // A record whose "next" jumps further than a ring's length ends replay there.
        let mut w = encoded(0, &[entry("a", 0, 1, 100)]);
        w[16..24].copy_from_slice(&far.to_le_bytes());
        let crc = crc32c::crc32c(&w[8..RECORD_FIXED + 1 + 100]);
        w[4..8].copy_from_slice(&crc.to_le_bytes());
        let (_, records, end) = replay(&image(cap, 0, &[(0, w)])).expect("header");
        assert!(records.is_empty());
        assert_eq!(end, 0);
    }

    #[test]
    fn a_start_up_reads_only_where_replay_begins_unless_records_are_there() {
        // A ring of 8 MiB: the windows (1 MiB at the checkpoint, 1 MiB at the next lap's start)
        // leave most of it unread.
        let cap = 8 * 1024 * 1024;
        let big = |start: u64, fill: u8| encoded(start, &[entry("a", 0, fill, 60_000)]);
        let stale = encoded(2 * 1024 * 1024, &[entry("a", 0, 9, 100)]);
        let mut chain = Vec::new();
        let mut at = 3 * 1024 * 1024;
        for fill in 1..=30 {
            // 30 writes of ~60 KB from the checkpoint on: past the first window.
            let w = big(at, fill);
            let len = w.len() as u64;
            chain.push((at, w));
            at += len;
        }
        let lap = encoded(cap, &[entry("a", 0, 7, 100)]);
        let cases: Vec<(&str, usize, Vec<u8>)> = vec![
            (
                "nothing at the checkpoint",
                0,
                image(cap, 5 * 1024 * 1024, &[(2 * 1024 * 1024, stale.clone())]),
            ),
            (
                "records from the checkpoint on",
                30,
                image(cap, 3 * 1024 * 1024, &chain),
            ),
            (
                "a write at the next lap's start",
                1,
                image(cap, cap - 4096, &[(cap, lap)]),
            ),
            (
                "a stale record a lap behind",
                0,
                image(cap, cap + 2 * 1024 * 1024, &[(2 * 1024 * 1024, stale)]),
            ),
        ];
        for (what, expected, file) in cases {
            let read_bytes = std::cell::Cell::new(0usize);
            let read = |offset: u64, len: usize| {
                let from = (offset as usize).min(file.len());
                let bytes = file[from..(from + len).min(file.len())].to_vec();
                read_bytes.set(read_bytes.get() + bytes.len());
                Ok(bytes)
            };
            let found = replay_file(read).unwrap();
            assert_eq!(found, replay(&file), "{what}");
            let records = found.expect("header").1.len();
            assert_eq!(records, expected, "{what}");
            if records == 0 {
                assert!(
                    read_bytes.get() <= HEADER_AREA as usize + 2 * journal_write_bytes_max + 1,
                    "{what}: read {} bytes",
                    read_bytes.get()
                );
            } else {
                assert!(
                    read_bytes.get() >= file.len(),
                    "{what}: the whole file is read"
                );
            }
        }
        // Shorter than its header says: what is there is replayed.
        let short = image(cap, 3 * 1024 * 1024, &chain)[..4 * 1024 * 1024].to_vec();
        let read = |offset: u64, len: usize| {
            let from = (offset as usize).min(short.len());
            Ok(short[from..(from + len).min(short.len())].to_vec())
        };
        assert_eq!(replay_file(read).unwrap(), replay(&short));
    }
}
