//! `keel-bench recovery`: how long the engine takes to open again after a crash, next to what
//! the device needs to read what recovery had to check.
//!
//! A child process (this binary again, `recovery-child`) fills `partitions` partitions with
//! `bytes_per_partition` each (`every-batch`: every append acknowledged durable), says so, and
//! is killed with SIGKILL — no clean shutdown, so the next open must scan what no recovery point
//! vouches for (ARCHITECTURE.md, decision 39). The parent then reads every segment file once
//! with O_DIRECT (1 MiB reads, 4 in flight: the device's sequential read bandwidth on the same
//! files), times `Engine::open`, checks every partition holds what was acknowledged, and times
//! a clean restart too.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use keel_engine::{block_on, Engine, EngineConfig, PartitionConfig, PartitionId};

use crate::engine_load::batch_template;
use crate::raw;
use crate::report::mb_per_s;

#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    pub dir: PathBuf,
    pub partitions: u32,
    pub bytes_per_partition: u64,
    pub batch_bytes: usize,
    pub segment_bytes: u64,
    pub recovery_point_bytes: u64,
    pub shards: usize,
    /// Measure the device's read bandwidth over the same files first.
    pub baseline: bool,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RecoveryResult {
    /// Bytes the child appended and had acknowledged before it was killed.
    pub written_bytes: u64,
    /// `Engine::open` after the kill.
    pub open_s: f64,
    /// Bytes of batches that open read and checked (`recovery_scanned_bytes`).
    pub scanned_bytes: u64,
    /// `Engine::open` after a clean shutdown.
    pub clean_open_s: f64,
    /// The device's sequential O_DIRECT read bandwidth over the segment files (0 without).
    pub read_mb_s: f64,
}

/// Appends in flight per partition while filling.
const fill_inflight: usize = 16;

fn data_dir(dir: &Path) -> PathBuf {
    dir.join("recovery-data")
}

fn engine_config(config: &RecoveryConfig) -> EngineConfig {
    let mut c = EngineConfig::new(data_dir(&config.dir));
    c.shards = config.shards;
    c.recovery_point_bytes = config.recovery_point_bytes;
    c
}

fn partition(i: u32) -> PartitionId {
    PartitionId::new("recovery", i)
}

/// One round: fill in a child, kill it, measure the reads, open, check, restart cleanly.
pub fn run(config: &RecoveryConfig) -> Result<RecoveryResult, String> {
    let data = data_dir(&config.dir);
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&config.dir)
        .map_err(|e| format!("create {}: {e}", config.dir.display()))?;
    let (written_bytes, appended) = fill_in_child(config)?;

    let read_mb_s = if config.baseline {
        let files = log_files(&data)?;
        let (bytes, seconds) = raw::read_bandwidth(&files, 1 << 20, 4)
            .map_err(|e| format!("reading the segments of {}: {e}", data.display()))?;
        mb_per_s(bytes, seconds)
    } else {
        0.0
    };

    let opening = Instant::now();
    let engine = Engine::open(engine_config(config)).map_err(|e| format!("open: {e}"))?;
    let open_s = opening.elapsed().as_secs_f64();
    let scanned_bytes = engine.metrics().recovery_scanned_bytes;
    for (i, &count) in appended.iter().enumerate() {
        let id = partition(i as u32);
        let state = block_on(engine.partition_state(&id)).map_err(|e| format!("{id}: {e}"))?;
        // Acknowledged appends are durable: all of them must be back (and nothing more was sent).
        if state.appended.0 != count {
            return Err(format!(
                "{id}: {count} batches acknowledged before the kill, {} after recovery",
                state.appended.0
            ));
        }
    }
    block_on(engine.shutdown()).map_err(|e| format!("shutdown: {e}"))?;
    drop(engine);
    let opening = Instant::now();
    let engine = Engine::open(engine_config(config)).map_err(|e| format!("clean open: {e}"))?;
    let clean_open_s = opening.elapsed().as_secs_f64();
    block_on(engine.shutdown()).map_err(|e| format!("shutdown: {e}"))?;
    drop(engine);
    let _ = std::fs::remove_dir_all(&data);
    Ok(RecoveryResult {
        written_bytes,
        open_s,
        scanned_bytes,
        clean_open_s,
        read_mb_s,
    })
}

fn log_files(data: &Path) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    let dirs = std::fs::read_dir(data).map_err(|e| format!("list {}: {e}", data.display()))?;
    for dir in dirs.flatten().filter(|d| d.path().is_dir()) {
        let entries = std::fs::read_dir(dir.path()).map_err(|e| e.to_string())?;
        files.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log")),
        );
    }
    files.sort();
    Ok(files)
}

/// Run the fill in a child process and kill it once it has said how much was acknowledged:
/// (bytes, batches per partition).
fn fill_in_child(config: &RecoveryConfig) -> Result<(u64, Vec<u64>), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "recovery-child",
            "--dir",
            config.dir.to_str().ok_or("the directory is not UTF-8")?,
            "--partitions",
            &config.partitions.to_string(),
            "--bytes-per-partition",
            &config.bytes_per_partition.to_string(),
            "--batch-bytes",
            &config.batch_bytes.to_string(),
            "--segment-bytes",
            &config.segment_bytes.to_string(),
            "--recovery-point-bytes",
            &config.recovery_point_bytes.to_string(),
            "--shards",
            &config.shards.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start the filling child: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut filled = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if let Some(rest) = line.strip_prefix("filled ") {
            let numbers: Result<Vec<u64>, _> = rest.split(' ').map(str::parse).collect();
            filled = Some(numbers.map_err(|e| format!("child said {line:?}: {e}"))?);
            break;
        }
    }
    // SIGKILL: the engine gets no chance to shut down cleanly.
    let _ = child.kill();
    let status = child.wait().map_err(|e| e.to_string())?;
    let numbers =
        filled.ok_or_else(|| format!("the filling child ended ({status}) before it was done"))?;
    let (&bytes, counts) = numbers.split_first().ok_or("the child said nothing")?;
    Ok((bytes, counts.to_vec()))
}

/// The child: fill, print `filled <bytes> <batches of partition 0> <batches of partition 1> …`,
/// then wait to be killed (or, if the parent is gone, for its stdin to close: no child outlives
/// the run).
pub fn child(config: &RecoveryConfig) -> Result<(), String> {
    let engine = Engine::open(engine_config(config)).map_err(|e| format!("open: {e}"))?;
    let partition_config = PartitionConfig {
        segment_bytes: config.segment_bytes,
        max_message_bytes: config.batch_bytes.max(1 << 20),
        ..Default::default()
    };
    let template = Bytes::from(batch_template(config.batch_bytes, 1));
    let per_partition = config.bytes_per_partition.div_ceil(template.len() as u64);
    let counts = block_on(async {
        let fills = (0..config.partitions).map(|i| {
            let (engine, template, partition_config) = (&engine, &template, &partition_config);
            async move {
                let id = partition(i);
                engine
                    .create_partition(&id, partition_config.clone())
                    .await?;
                let mut inflight = FuturesUnordered::new();
                let mut acknowledged = 0u64;
                for _ in 0..per_partition {
                    if inflight.len() >= fill_inflight {
                        inflight.next().await.expect("in flight")?;
                        acknowledged += 1;
                    }
                    inflight.push(engine.append(&id, template.clone(), 0));
                }
                while let Some(result) = inflight.next().await {
                    result?;
                    acknowledged += 1;
                }
                Ok::<u64, keel_engine::Error>(acknowledged)
            }
        });
        futures::future::join_all(fills)
            .await
            .into_iter()
            .collect::<Result<Vec<u64>, _>>()
    })
    .map_err(|e| format!("fill: {e}"))?;
    let bytes: u64 = counts.iter().sum::<u64>() * template.len() as u64;
    let counts: Vec<String> = counts.iter().map(u64::to_string).collect();
    println!("filled {bytes} {}", counts.join(" "));
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    // Killed here, with the engine open.
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    std::process::exit(1);
}
