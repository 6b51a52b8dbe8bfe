//! Recovery over an arbitrary segment file: opening never panics or hangs; if the partition opens,
//! every batch it serves passes validation and offsets only grow.
#![no_main]

use std::path::Path;

use keel_engine::batch::{self, OffsetCheck};
use keel_engine::io::sim::SimFs;
use keel_engine::io::Backend;
use keel_engine::{block_on, Engine, EngineConfig, PartitionId, ReadOptions, ReadUpper, RecoveryMode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (mode, segment) = match data.split_first() {
        Some((m, rest)) => (if m & 1 == 0 { RecoveryMode::Strict } else { RecoveryMode::TruncateTail }, rest),
        None => return,
    };
    let fs = SimFs::default();
    fs.create_file(Path::new("/sim/data/fuzz-0/00000000000000000000.log"), segment.to_vec());
    let mut config = EngineConfig::new("/sim/data");
    config.backend = Backend::Sim(fs);
    config.shards = 1;
    config.pin_threads = false;
    config.recovery = mode;
    let Ok(engine) = Engine::open(config) else { return };
    let p = PartitionId::new("fuzz", 0);
    let options = ReadOptions { max_bytes: usize::MAX, upper: ReadUpper::Appended };
    block_on(async {
        let mut offset = 0;
        while let Ok(read) = engine.read(&p, offset, options).await {
            if read.is_empty() {
                break;
            }
            for chunk in &read.chunks {
                let headers = batch::validate_all(chunk, OffsetCheck::Sparse).expect("served bytes validate");
                assert!(headers.iter().all(|h| h.next_offset() > offset));
            }
            assert!(read.next_offset > offset);
            offset = read.next_offset;
        }
    });
});
