//! Opening a partition whose metadata files hold arbitrary bytes: the offset and time indexes of
//! both segments, the leader-epoch checkpoint, the recovery point, the clean-shutdown marker, the
//! configuration and the incarnation, over two segments of valid batches. Opening never panics
//! or hangs; if the partition opens, every batch it serves passes validation, offsets only grow,
//! and lookups by time and by leader epoch answer within the log.
//!
//! Input: a byte of flags (bit i: write file i, in the order of `FILES`), a byte choosing the
//! batches per segment, then for each written file a length (u16 LE) and that many bytes.
#![no_main]

mod common;

use std::path::Path;

use keel_engine::batch::{self, BatchBuilder};
use keel_engine::io::sim::SimFs;
use keel_engine::{block_on, PartitionId, RecoveryMode};
use libfuzzer_sys::fuzz_target;

const DIR: &str = "/sim/data/fuzz-0";

fn files(second: u64) -> [String; 9] {
    [
        "00000000000000000000.index".into(),
        "00000000000000000000.timeindex".into(),
        format!("{second:020}.index"),
        format!("{second:020}.timeindex"),
        "leader-epoch-checkpoint".into(),
        "recovery-point".into(),
        ".clean-shutdown".into(),
        "partition.properties".into(),
        "incarnation".into(),
    ]
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let flags = u16::from_le_bytes([data[0], data[1] & 1]);
    let (first, second) = (1 + u64::from(data[1] >> 1 & 7), 1 + u64::from(data[1] >> 4));
    let mut rest = &data[2..];
    let fs = SimFs::default();
    // Two segments of valid batches (timestamps grow, two leader epochs), large enough that
    // the indexes have entries.
    let segment = |from: u64, count: u64| {
        let mut bytes = Vec::new();
        for offset in from..from + count {
            let mut b = BatchBuilder { base_offset: offset, timestamp_ms: 1000 + offset as i64, ..Default::default() }
                .build(&[offset as u8; 3000]);
            batch::set_partition_leader_epoch(&mut b, (offset / 4) as i32);
            bytes.extend(b);
        }
        bytes
    };
    fs.create_file(Path::new(&format!("{DIR}/00000000000000000000.log")), segment(0, first));
    fs.create_file(Path::new(&format!("{DIR}/{first:020}.log")), segment(first, second));
    for (i, name) in files(first).iter().enumerate() {
        if flags & (1 << i) == 0 {
            continue;
        }
        let len = match rest {
            [a, b, ..] => usize::from(u16::from_le_bytes([*a, *b])),
            _ => 0,
        };
        let start = 2.min(rest.len());
        let bytes = &rest[start..(start + len).min(rest.len())];
        fs.create_file(Path::new(&format!("{DIR}/{name}")), bytes.to_vec());
        rest = &rest[(start + len).min(rest.len())..];
    }
    let Some(engine) = common::open(fs, RecoveryMode::Strict, None) else { return };
    let p = PartitionId::new("fuzz", 0);
    block_on(async {
        common::read_all_checked(&engine, &p).await;
        let Ok(state) = engine.partition_state(&p).await else { return };
        for timestamp in [i64::MIN, 0, 1000, 1003, 1000 + first as i64, 5000, i64::MAX] {
            if let Ok(Some(found)) = engine.offset_for_timestamp(&p, timestamp).await {
                assert!(found.offset < state.appended.0, "{found:?} past {state:?}");
                assert!(found.timestamp >= timestamp, "{found:?} for {timestamp}");
            }
        }
        for epoch in [-1, 0, 1, 3, i32::MAX] {
            if let Ok(Some((e, end))) = engine.end_offset_for_epoch(&p, epoch).await {
                assert!(e <= epoch && end <= state.appended.0, "{epoch}: {e} {end} {state:?}");
            }
        }
    });
});
