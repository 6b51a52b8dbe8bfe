//! The engine's public API on the real io_uring backend: append, read, reopen.

mod common;

use common::*;
use keel_engine::{
    block_on, Durability, Engine, Error, PartitionConfig, PartitionId, ReadOptions, ReadUpper,
};

#[test]
fn append_read_reopen_on_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let p = PartitionId::new("events", 0);
    let engine = Engine::open(uring_config(dir.path(), 2)).unwrap();
    block_on(async {
        engine
            .create_partition(&p, PartitionConfig::default())
            .await
            .unwrap();
        let mut expected_offset = 0;
        for tag in 0..200u64 {
            let records = 1 + (tag % 3) as i32;
            let out = engine
                .append(
                    &p,
                    batch(tag, records, 100 + tag as usize * 37, 1000 + tag as i64),
                    5,
                )
                .await
                .unwrap();
            assert_eq!(out.base_offset, expected_offset);
            assert_eq!(out.last_offset, expected_offset + records as u64 - 1);
            assert_eq!(out.durability, Durability::Durable);
            expected_offset += records as u64;
        }
        let read = engine.read(&p, 0, everything()).await.unwrap();
        let batches = batches_of(&read.chunks);
        assert_eq!(batches.len(), 200);
        for (i, b) in batches.iter().enumerate() {
            assert_eq!(tag_of(b), i as u64);
        }
        assert_eq!(read.next_offset, expected_offset);
        engine.shutdown().await.unwrap();
    });
    drop(engine);
    // The clean shutdown left its marker and the segment's indexes, written in one batch
    // (temporary files, a syncfs, renames, a syncfs), and no temporary file behind.
    let names: Vec<String> =
        std::fs::read_dir(keel_engine::segment::path::partition_dir(dir.path(), &p))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    for expected in [
        ".clean-shutdown",
        "leader-epoch-checkpoint",
        "00000000000000000000.index",
        "00000000000000000000.timeindex",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
    assert!(!names.iter().any(|n| n.ends_with(".tmp")), "{names:?}");

    // Reopen: everything is there, read from disk this time (the cache is empty).
    let engine = Engine::open(uring_config(dir.path(), 2)).unwrap();
    block_on(async {
        let state = engine.partition_state(&p).await.unwrap();
        assert_eq!(state.latest_epoch, Some(5));
        let mut offset = 0;
        let mut tags = Vec::new();
        while offset < state.appended.0 {
            let read = engine
                .read(
                    &p,
                    offset,
                    ReadOptions {
                        max_bytes: 3000,
                        upper: ReadUpper::Durable,
                    },
                )
                .await
                .unwrap();
            assert!(!read.is_empty());
            tags.extend(batches_of(&read.chunks).iter().map(|b| tag_of(b)));
            offset = read.next_offset;
        }
        assert_eq!(tags, (0..200).collect::<Vec<_>>());
        assert!(engine.metrics().reads > engine.metrics().reads_from_memory);
        // Reading in the middle of a batch returns that whole batch first.
        let read = engine.read(&p, 2, everything()).await.unwrap();
        assert_eq!(read.headers()[0].base_offset, 1);
        // Appends continue after the recovered end.
        let out = engine.append(&p, batch(999, 1, 10, 0), 5).await.unwrap();
        assert_eq!(out.base_offset, state.appended.0);
        assert!(matches!(
            engine.read(&p, out.base_offset + 2, everything()).await,
            Err(Error::OffsetOutOfRange { .. })
        ));
        engine.shutdown().await.unwrap();
    });
}

#[test]
fn invalid_input_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = PartitionId::new("bad-input", 3);
    let engine = Engine::open(uring_config(dir.path(), 1)).unwrap();
    block_on(async {
        let config = PartitionConfig {
            max_message_bytes: 2000,
            ..Default::default()
        };
        engine.create_partition(&p, config).await.unwrap();
        engine.append(&p, batch(1, 1, 100, 0), 0).await.unwrap();
        let mut corrupt = batch(2, 1, 100, 0).to_vec();
        corrupt[80] ^= 0x40;
        let err = engine.append(&p, corrupt.into(), 0).await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidBatch(ref e) if e.is_crc()),
            "{err}"
        );
        let err = engine
            .append(&p, batch(3, 1, 5000, 0), 0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::BatchTooLarge { max: 2000, .. }),
            "{err}"
        );
        let truncated = batch(4, 1, 100, 0).slice(..100);
        assert!(matches!(
            engine.append(&p, truncated, 0).await,
            Err(Error::InvalidBatch(_))
        ));
        assert!(matches!(
            engine
                .append(&PartitionId::new("nope", 0), batch(5, 1, 10, 0), 0)
                .await,
            Err(Error::UnknownPartition(_))
        ));
        engine.append(&p, batch(6, 1, 10, 0), 0).await.unwrap();
        // An older leader epoch than the log has seen is fenced.
        engine.append(&p, batch(7, 1, 10, 0), 3).await.unwrap();
        assert!(matches!(
            engine.append(&p, batch(8, 1, 10, 0), 2).await,
            Err(Error::StaleLeaderEpoch { got: 2, latest: 3 })
        ));
        let state = engine.partition_state(&p).await.unwrap();
        assert_eq!(state.appended.0, 3);
        let tags: Vec<u64> = batches_of(&engine.read(&p, 0, everything()).await.unwrap().chunks)
            .iter()
            .map(|b| tag_of(b))
            .collect();
        assert_eq!(tags, vec![1, 6, 7]);
        assert_eq!(engine.metrics().appends_rejected, 3);
        engine.shutdown().await.unwrap();
    });
}

#[test]
fn dropping_the_engine_without_shutdown_stops_the_shards() {
    let dir = tempfile::tempdir().unwrap();
    let p = PartitionId::new("dropped", 0);
    let engine = Engine::open(uring_config(dir.path(), 2)).unwrap();
    block_on(engine.create_partition(&p, PartitionConfig::default())).unwrap();
    block_on(engine.append(&p, batch(1, 1, 10, 0), 0)).unwrap();
    drop(engine);
    // No clean-shutdown marker: the next open recovers by scanning, and finds the append.
    let engine = Engine::open(uring_config(dir.path(), 2)).unwrap();
    let state = block_on(engine.partition_state(&p)).unwrap();
    assert_eq!(state.appended.0, 1);
}

#[test]
fn a_data_directory_is_opened_by_one_engine_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let p = PartitionId::new("locked", 0);
    let first = Engine::open(uring_config(dir.path(), 1)).unwrap();
    block_on(first.create_partition(&p, PartitionConfig::default())).unwrap();
    block_on(first.append(&p, batch(1, 1, 10, 0), 0)).unwrap();

    // A second engine on the same directory (here in the same process; another process gets the
    // same answer) is refused before it touches a partition.
    match Engine::open(uring_config(dir.path(), 1)) {
        Err(Error::DirectoryInUse(path)) => assert_eq!(path, dir.path()),
        other => panic!(
            "expected DirectoryInUse, got {:?}",
            other.map(|_| "an engine")
        ),
    }
    let message = Engine::open(uring_config(dir.path(), 1))
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("in use by another Keel process"),
        "{message}"
    );
    // The refused open changed nothing: the first engine still serves its partition.
    block_on(first.append(&p, batch(2, 1, 10, 0), 0)).unwrap();
    assert_eq!(block_on(first.partition_state(&p)).unwrap().appended.0, 2);

    // Released when the engine is gone (a killed process releases it too: the kernel drops it).
    drop(first);
    let again = Engine::open(uring_config(dir.path(), 1)).unwrap();
    assert_eq!(block_on(again.partition_state(&p)).unwrap().appended.0, 2);
}
