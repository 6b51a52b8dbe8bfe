//! What the storage fuzz targets share: an engine opened over a simulated file system, and the
//! check every one of them makes of what it serves.

use keel_engine::batch::{self, OffsetCheck};
use keel_engine::io::sim::SimFs;
use keel_engine::io::Backend;
use keel_engine::{Engine, EngineConfig, PartitionId, ReadOptions, ReadUpper, RecoveryMode};

/// Open an engine of one shard over `fs` (data in `/sim/data`); `None` if opening refused.
pub fn open(fs: SimFs, recovery: RecoveryMode, journal_bytes: Option<u64>) -> Option<Engine> {
    let mut config = EngineConfig::new("/sim/data");
    config.backend = Backend::Sim(fs);
    config.shards = 1;
    config.pin_threads = false;
    config.recovery = recovery;
    if let Some(bytes) = journal_bytes {
        config.journal_bytes = bytes;
    }
    Engine::open(config).ok()
}

/// Read the partition from offset 0 to its end: every batch served passes validation and offsets
/// only grow. A read error (damage found on the way) ends the walk.
pub async fn read_all_checked(engine: &Engine, p: &PartitionId) {
    let options = ReadOptions { max_bytes: usize::MAX, upper: ReadUpper::Appended };
    let mut offset = 0;
    while let Ok(read) = engine.read(p, offset, options).await {
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
}
