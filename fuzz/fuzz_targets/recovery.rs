//! Recovery over an arbitrary segment file: opening never panics or hangs; if the partition opens,
//! every batch it serves passes validation and offsets only grow.
#![no_main]

mod common;

use std::path::Path;

use keel_engine::io::sim::SimFs;
use keel_engine::{block_on, PartitionId, RecoveryMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mode, segment) = match data.split_first() {
        Some((m, rest)) => (if m & 1 == 0 { RecoveryMode::Strict } else { RecoveryMode::TruncateTail }, rest),
        None => return,
    };
    let fs = SimFs::default();
    fs.create_file(Path::new("/sim/data/fuzz-0/00000000000000000000.log"), segment.to_vec());
    let Some(engine) = common::open(fs, mode, None) else { return };
    block_on(common::read_all_checked(&engine, &PartitionId::new("fuzz", 0)));
});
