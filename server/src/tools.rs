//! Operator tools over the engine's public API and its on-disk format.

use std::io::Write;
use std::path::Path;

use keel_engine::batch::{self, BatchHeader, OffsetCheck};
use keel_engine::{block_on, Engine, EngineConfig, RecoveryMode};

/// Open `data_dir` and report each partition. Recovery runs exactly as `keel serve` would run it.
pub fn check(data_dir: &Path, truncate_damaged: bool, out: &mut impl Write) -> Result<(), String> {
    if !data_dir.is_dir() {
        return Err(format!("{} is not a directory", data_dir.display()));
    }
    let mut config = EngineConfig::new(data_dir);
    config.shards = 1;
    config.pin_threads = false;
    if truncate_damaged {
        config.recovery = RecoveryMode::TruncateTail;
    }
    let engine =
        Engine::open(config).map_err(|e| format!("cannot open {}: {e}", data_dir.display()))?;
    block_on(async {
        let partitions = engine.partitions().await.map_err(|e| e.to_string())?;
        let write =
            |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(|e| e.to_string());
        write(
            out,
            format!(
                "{:<40} {:>14} {:>14} {:>14} {:>9} {:>14}",
                "partition", "log start", "log end", "durable", "segments", "bytes"
            ),
        )?;
        for id in &partitions {
            let s = engine
                .partition_state(id)
                .await
                .map_err(|e| format!("{id}: {e}"))?;
            write(
                out,
                format!(
                    "{:<40} {:>14} {:>14} {:>14} {:>9} {:>14}",
                    id.to_string(),
                    s.log_start_offset,
                    s.appended.0,
                    s.durable.0,
                    s.segments,
                    s.size_bytes
                ),
            )?;
        }
        write(out, format!("{} partition(s) open", partitions.len()))?;
        // Leave it as found: a clean shutdown writes the markers back.
        engine.shutdown().await.map_err(|e| e.to_string())
    })
}

/// Print each batch header of a segment file; damaged bytes are reported and end the dump.
pub fn dump(file: &Path, limit: u64, out: &mut impl Write) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut position = 0usize;
    let mut count = 0u64;
    let w = |out: &mut dyn Write, line: String| writeln!(out, "{line}").map_err(|e| e.to_string());
    while position < bytes.len() && count < limit {
        let rest = &bytes[position..];
        if rest.len() < 61 || rest[..61].iter().all(|&b| b == 0) {
            w(
                out,
                format!(
                    "end of log at byte {position} ({} bytes of zeros or padding follow)",
                    rest.len()
                ),
            )?;
            return Ok(());
        }
        match batch::validate(rest, OffsetCheck::Sparse) {
            Ok(h) => {
                w(out, describe(position, &h))?;
                position += h.size_bytes;
                count += 1;
            }
            Err(e) => {
                w(out, format!("damaged batch at byte {position}: {e}"))?;
                return Err(format!("{} is damaged at byte {position}", file.display()));
            }
        }
    }
    w(out, format!("{count} batch(es)"))
}

fn describe(position: usize, h: &BatchHeader) -> String {
    format!(
        "position {position} offsets {}..={} epoch {} bytes {} records {} max_timestamp {} producer {}/{} seq {} compression {} crc ok",
        h.base_offset,
        h.last_offset(),
        h.partition_leader_epoch,
        h.size_bytes,
        h.records_count,
        h.max_timestamp,
        h.producer_id,
        h.producer_epoch,
        h.base_sequence,
        h.compression()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_engine::batch::BatchBuilder;
    use keel_engine::{PartitionConfig, PartitionId};

    fn one_shard_engine(dir: &Path) -> Engine {
        let mut config = EngineConfig::new(dir);
        config.shards = 1;
        config.pin_threads = false;
        Engine::open(config).unwrap()
    }

    #[test]
    fn check_reports_partitions_and_dump_reads_and_flags_damage() {
        let dir = tempfile::tempdir().unwrap();
        let engine = one_shard_engine(dir.path());
        let p = PartitionId::new("orders", 2);
        block_on(async {
            engine
                .create_partition(&p, PartitionConfig::default())
                .await
                .unwrap();
            for _ in 0..3 {
                let b = BatchBuilder {
                    records_count: 2,
                    ..Default::default()
                }
                .build(b"xyz");
                engine.append(&p, b.into(), 4).await.unwrap();
            }
            engine.shutdown().await.unwrap();
        });
        drop(engine);
        let mut out = Vec::new();
        check(dir.path(), false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("orders-2") && text.contains("1 partition(s) open"),
            "{text}"
        );
        let line = text.lines().find(|l| l.starts_with("orders-2")).unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&fields[1..4], &["0", "6", "6"]);

        let segment = dir.path().join("orders-2/00000000000000000000.log");
        let mut out = Vec::new();
        dump(&segment, u64::MAX, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("offsets 4..=5 epoch 4"), "{text}");
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[100] ^= 1;
        std::fs::write(&segment, &bytes).unwrap();
        let mut out = Vec::new();
        assert!(dump(&segment, u64::MAX, &mut out).is_err());
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("damaged batch at byte 64"));
        assert!(check(Path::new("/nonexistent/keel"), false, &mut Vec::new()).is_err());
    }

    /// `keel check` runs crash recovery, which cuts what looks like a torn tail: on the data
    /// directory of a running engine it would cut the live log. It is refused instead.
    #[test]
    fn check_refuses_a_data_directory_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let engine = one_shard_engine(dir.path());
        let p = PartitionId::new("live", 0);
        let b = BatchBuilder::default().build(b"record");
        block_on(engine.create_partition(&p, PartitionConfig::default())).unwrap();
        block_on(engine.append(&p, b.clone().into(), 0)).unwrap();
        let mut out = Vec::new();
        let e = check(dir.path(), true, &mut out).unwrap_err();
        assert!(e.contains("in use by another Keel process"), "{e}");
        assert!(out.is_empty());
        // The running engine noticed nothing.
        block_on(engine.append(&p, b.into(), 0)).unwrap();
        assert_eq!(block_on(engine.partition_state(&p)).unwrap().appended.0, 2);
    }
}
