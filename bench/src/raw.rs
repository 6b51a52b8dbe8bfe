//! The physical baseline, on the same file system the engine uses:
//!
//! (a) sequential bandwidth: O_DIRECT writes of `block_bytes` through io_uring, `queue_depth` in
//!     flight, into a preallocated file, one fdatasync at the end (fio: `--rw=write --direct=1
//!     --ioengine=io_uring --bs=1m --iodepth=4 --end_fsync=1`);
//! (b) sync latency: one 4 KiB O_DIRECT write followed by fdatasync, one at a time, sequential
//!     positions in a file laid out first (fio: `--rw=write --bs=4k --direct=1 --fdatasync=1`).
//!
//! and, for `keel-bench recovery`, sequential O_DIRECT reads of given files
//! ([`read_bandwidth`]; fio: `--rw=read --direct=1 --ioengine=io_uring --bs=1m --iodepth=4`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use compio::buf::{BufResult, IntoInner, IoBuf};
use compio::fs::{File, OpenOptions};
use compio::io::{AsyncReadAt, AsyncWriteAt};
use futures::stream::{FuturesUnordered, StreamExt};
use keel_engine::io::AlignedBuf;

use crate::report::{histogram, mb_per_s, Percentiles};

#[derive(Clone, Debug)]
pub struct RawConfig {
    pub dir: PathBuf,
    pub block_bytes: usize,
    pub queue_depth: usize,
    /// Bytes written by the bandwidth test (it also stops at `duration`).
    pub bytes: u64,
    pub duration: Duration,
    /// fdatasync after every this many bytes in the bandwidth test (0: only at the end).
    pub sync_every_bytes: u64,
    pub latency_block_bytes: usize,
    pub latency_duration: Duration,
    /// Write the bandwidth test's file once before measuring, so the timed writes overwrite
    /// allocated blocks instead of filling fallocated (unwritten) extents.
    pub prewrite: bool,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RawResult {
    pub bandwidth_mb_s: f64,
    pub bandwidth_bytes: u64,
    pub bandwidth_seconds: f64,
    pub sync_latency: Percentiles,
}

/// Run both measurements on a dedicated thread with its own ring.
pub fn measure(config: &RawConfig) -> std::io::Result<RawResult> {
    let config = config.clone();
    std::thread::spawn(move || {
        let runtime = compio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let (bandwidth_bytes, bandwidth_seconds) = bandwidth(&config).await?;
            let sync_latency = sync_latency(&config).await?;
            Ok(RawResult {
                bandwidth_mb_s: mb_per_s(bandwidth_bytes, bandwidth_seconds),
                bandwidth_bytes,
                bandwidth_seconds,
                sync_latency,
            })
        })
    })
    .join()
    .map_err(|_| std::io::Error::other("raw baseline thread panicked"))?
}

async fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .await
}

fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a live fd owned by `file`; no memory is passed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

async fn write_block(
    file: &File,
    buf: AlignedBuf,
    position: u64,
) -> (std::io::Result<usize>, AlignedBuf) {
    let mut writer = file;
    let len = buf.len();
    let BufResult(result, slice) = writer.write_at(buf.slice(0..len), position).await;
    (result, slice.into_inner())
}

async fn bandwidth(config: &RawConfig) -> std::io::Result<(u64, f64)> {
    let path = config.dir.join("raw-bandwidth.bin");
    let file = open_direct(&path).await?;
    preallocate(&file, config.bytes)?;
    if config.prewrite {
        let mut fill = AlignedBuf::new(1 << 20);
        fill.extend_from_slice(&vec![0u8; 1 << 20]);
        let mut at = 0;
        while at < config.bytes {
            let (r, b) = write_block(&file, fill, at).await;
            r?;
            fill = b;
            at += 1 << 20;
        }
        file.sync_all().await?;
    }
    let mut buffers: Vec<AlignedBuf> = (0..config.queue_depth)
        .map(|_| {
            let mut b = AlignedBuf::new(config.block_bytes);
            b.extend_from_slice(&vec![0xA5; config.block_bytes]);
            b
        })
        .collect();
    let mut inflight = FuturesUnordered::new();
    let mut position = 0u64;
    let mut since_sync = 0u64;
    let start = Instant::now();
    loop {
        let stop = position + config.block_bytes as u64 > config.bytes
            || start.elapsed() > config.duration;
        while !stop && inflight.len() < config.queue_depth && !buffers.is_empty() {
            let buf = buffers.pop().expect("checked");
            inflight.push(write_block(&file, buf, position));
            position += config.block_bytes as u64;
        }
        match inflight.next().await {
            Some((result, buf)) => {
                result?;
                buffers.push(buf);
                since_sync += config.block_bytes as u64;
                if config.sync_every_bytes > 0 && since_sync >= config.sync_every_bytes {
                    file.sync_data().await?;
                    since_sync = 0;
                }
            }
            None => break,
        }
    }
    file.sync_data().await?;
    let seconds = start.elapsed().as_secs_f64();
    drop(inflight);
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok((position, seconds))
}

async fn sync_latency(config: &RawConfig) -> std::io::Result<Percentiles> {
    let path = config.dir.join("raw-latency.bin");
    let file = open_direct(&path).await?;
    // Lay the file out first, as fio does, so the timed writes overwrite allocated blocks.
    let span: u64 = 64 * 1024 * 1024;
    preallocate(&file, span)?;
    let mut fill = AlignedBuf::new(1 << 20);
    fill.extend_from_slice(&vec![0u8; 1 << 20]);
    let mut at = 0;
    while at < span {
        let (r, b) = write_block(&file, fill, at).await;
        r?;
        fill = b;
        at += 1 << 20;
    }
    file.sync_all().await?;
    let mut buf = AlignedBuf::new(config.latency_block_bytes);
    buf.extend_from_slice(&vec![0x5A; config.latency_block_bytes]);
    let mut h = histogram();
    let mut position = 0;
    let start = Instant::now();
    while start.elapsed() < config.latency_duration {
        let t = Instant::now();
        let (r, b) = write_block(&file, buf, position).await;
        r?;
        buf = b;
        file.sync_data().await?;
        h.record(t.elapsed().as_micros().max(1) as u64).ok();
        position = (position + config.latency_block_bytes as u64) % span;
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    Ok(Percentiles::of(&h))
}

/// Read `files` whole, one after another, with O_DIRECT reads of `block_bytes`, `queue_depth`
/// in flight, on a dedicated thread with its own ring: (bytes read, seconds).
pub fn read_bandwidth(
    files: &[PathBuf],
    block_bytes: usize,
    queue_depth: usize,
) -> std::io::Result<(u64, f64)> {
    let files = files.to_vec();
    std::thread::spawn(move || {
        let runtime = compio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let mut buffers: Vec<AlignedBuf> = (0..queue_depth)
                .map(|_| AlignedBuf::new(block_bytes))
                .collect();
            let (mut total, start) = (0u64, Instant::now());
            for path in &files {
                let file = OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(path)
                    .await?;
                let len = std::fs::metadata(path)?.len();
                let mut inflight = FuturesUnordered::new();
                let mut position = 0u64;
                loop {
                    while position < len && !buffers.is_empty() {
                        let mut buf = buffers.pop().expect("checked");
                        buf.set_len(0);
                        let reader = &file;
                        inflight.push(async move {
                            let BufResult(result, buf) = reader.read_at(buf, position).await;
                            (result, buf)
                        });
                        position += block_bytes as u64;
                    }
                    match inflight.next().await {
                        Some((result, buf)) => {
                            total += result? as u64;
                            buffers.push(buf);
                        }
                        None => break,
                    }
                }
            }
            Ok((total, start.elapsed().as_secs_f64()))
        })
    })
    .join()
    .map_err(|_| std::io::Error::other("read baseline thread panicked"))?
}
