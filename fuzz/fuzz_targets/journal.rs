//! Recovery with a shard journal to replay: a valid journal (header and record CRCs right, built
//! as FORMAT.md describes) whose records carry arbitrary bytes, or valid batches at arbitrary
//! offsets, over a segment of valid batches. Opening never panics or hangs; if the partition
//! opens, every batch it serves passes validation and offsets only grow.
//!
//! Input: a mode byte (bit 0: TruncateTail, bits 1-3: batches already in the segment), then
//! records: `[flags, base offset, len]` and `len` bytes. Flags bit 0: a valid batch built from the
//! bytes at that base offset (bit 1: then flip one of its bytes), else the bytes as they are; bit
//! 2: another incarnation (replay skips it); bit 3: another partition.
#![no_main]

mod common;

use std::path::Path;

use keel_engine::batch::BatchBuilder;
use keel_engine::io::sim::SimFs;
use keel_engine::{block_on, PartitionId, RecoveryMode};
use libfuzzer_sys::fuzz_target;

const CAPACITY: u64 = 4 * 1024 * 1024;
const INCARNATION: u64 = 7;

fn record(at: u64, incarnation: u64, topic: &str, partition: u32, batches: &[u8]) -> Vec<u8> {
    let len = 42 + topic.len() + batches.len();
    let mut r = Vec::with_capacity(len);
    r.extend_from_slice(&0x4b4a_5231u32.to_le_bytes());
    r.extend_from_slice(&[0; 4]);
    r.extend_from_slice(&at.to_le_bytes());
    r.extend_from_slice(&(at + len as u64).to_le_bytes());
    r.extend_from_slice(&incarnation.to_le_bytes());
    r.extend_from_slice(&partition.to_le_bytes());
    r.extend_from_slice(&(batches.len() as u32).to_le_bytes());
    r.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    r.extend_from_slice(topic.as_bytes());
    r.extend_from_slice(batches);
    let crc = crc32c::crc32c(&r[8..]);
    r[4..8].copy_from_slice(&crc.to_le_bytes());
    r
}

fn header(seq: u64, checkpoint: u64) -> Vec<u8> {
    let mut h = vec![0u8; 4096];
    h[..8].copy_from_slice(b"KEELJNL\x01");
    h[8..16].copy_from_slice(&CAPACITY.to_le_bytes());
    h[16..24].copy_from_slice(&seq.to_le_bytes());
    h[24..32].copy_from_slice(&checkpoint.to_le_bytes());
    let crc = crc32c::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let recovery = if mode & 1 == 0 { RecoveryMode::Strict } else { RecoveryMode::TruncateTail };
    let fs = SimFs::default();
    let mut segment = Vec::new();
    for offset in 0..u64::from((mode >> 1) & 7) {
        segment.extend(BatchBuilder { base_offset: offset, ..Default::default() }.build(b"in the segment"));
    }
    fs.create_file(Path::new("/sim/data/fuzz-0/00000000000000000000.log"), segment);
    fs.create_file(Path::new("/sim/data/fuzz-0/incarnation"), format!("{INCARNATION}\n").into_bytes());
    let mut journal = header(1, 0);
    journal.extend(vec![0u8; 4096]); // header slot 1: empty
    let mut at = 0u64;
    while rest.len() >= 3 {
        let (flags, base, len) = (rest[0], rest[1], rest[2] as usize);
        let bytes = &rest[3..(3 + len).min(rest.len())];
        rest = &rest[(3 + len).min(rest.len())..];
        let batches = if flags & 1 == 1 {
            let records = 1 + (flags >> 4) as i32 % 4;
            let mut b = BatchBuilder { base_offset: base.into(), records_count: records, ..Default::default() }
                .build(bytes);
            if flags & 2 == 2 {
                let i = len % b.len();
                b[i] ^= 0x40;
            }
            b
        } else {
            bytes.to_vec()
        };
        let incarnation = if flags & 4 == 4 { INCARNATION + 1 } else { INCARNATION };
        let partition = u32::from(flags & 8 == 8);
        let r = record(at, incarnation, "fuzz", partition, &batches);
        at += r.len() as u64;
        journal.extend(r);
    }
    fs.create_file(Path::new("/sim/data/.journal/0.journal"), journal);
    let Some(engine) = common::open(fs, recovery, Some(CAPACITY)) else { return };
    for partition in [0, 1] {
        block_on(common::read_all_checked(&engine, &PartitionId::new("fuzz", partition)));
    }
});
