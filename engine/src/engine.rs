//! The public handle: routes each call to the shard that owns the partition.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use bytes::Bytes;
use futures::channel::oneshot;

use crate::batch::BatchHeader;
use crate::config::{EngineConfig, PartitionConfig};
use crate::constants::{block_bytes, journal_bytes_min, shard_inbox_count_max};
use crate::error::{Error, Result};
use crate::io::Backend;
use crate::io::Storage;
use crate::journal;
use crate::metrics::bump;
use crate::metrics::{Metrics, MetricsSnapshot};
use crate::offsets::Durability;
use crate::partition::{AppendKind, Reply, Validated};
use crate::segment::path;
use crate::segment::path::parse_partition_dir;
use crate::shard::{self, Command};
use crate::{
    AppendOutcome, PartitionId, PartitionState, ReadOptions, ReadResult, ReadUpper, TimestampOffset,
};

/// The outcome of a call already queued at its shard.
#[derive(Debug)]
#[must_use = "the outcome says whether the append succeeded"]
pub struct Pending<T> {
    rx: oneshot::Receiver<Result<T>>,
}

impl<T> Future for Pending<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(Error::ShuttingDown)))
    }
}

/// A running engine. Cheap to clone; every clone talks to the same shards. Dropping the last clone
/// without [`Engine::shutdown`] stops the shards like a crash would (no clean-shutdown marker).
#[derive(Clone, Debug)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    shards: Vec<flume::Sender<Command>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    metrics: Arc<Metrics>,
    config: Arc<EngineConfig>,
    /// The data directory's lock (`lock_data_dir`), released when the file is closed: once every
    /// shard has shut down cleanly (`shutdown`), else after the shards have stopped (fields drop
    /// after `Drop::drop` joins them), or when the process dies.
    lock: Mutex<Option<std::fs::File>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shards.clear();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let me = std::thread::current().id();
        for t in threads {
            // The last handle may be dropped on a shard thread itself (a task an embedder ran
            // there held it): that thread is already finishing and cannot join itself.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Engine {
    /// Start the shards and open (recovering if needed) every partition found in the data directory.
    pub fn open(config: EngineConfig) -> Result<Engine> {
        let storage = config
            .backend
            .storage()
            .map_err(|e| Error::io("initialise storage for", &config.data_dir, e))?;
        storage
            .create_dir_all(&config.data_dir)
            .map_err(|e| Error::io("create", &config.data_dir, e))?;
        let lock = match config.backend {
            Backend::Uring => Some(lock_data_dir(&config.data_dir)?),
            Backend::Sim(_) => None, // the simulator's files are not on the disk
        };
        if config.journal_bytes != 0
            && (config.journal_bytes < journal_bytes_min
                || !config.journal_bytes.is_multiple_of(block_bytes as u64))
        {
            return Err(Error::InvalidConfig(format!(
                "journal bytes {} must be 0 (off) or a multiple of {block_bytes} of at least {journal_bytes_min}",
                config.journal_bytes
            )));
        }
        let found = storage
            .list_dir(&config.data_dir)
            .map_err(|e| Error::io("list", &config.data_dir, e))?;
        let journals = read_journals(storage.as_ref(), &config.data_dir)?;
        drop(storage);

        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::default());
        let mut shards = Vec::new();
        let mut threads = Vec::new();
        for index in 0..config.shard_count() {
            let (tx, rx) = flume::bounded(shard_inbox_count_max);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (c, m) = (config.clone(), metrics.clone());
            let thread = std::thread::Builder::new()
                .name(format!("keel-shard-{index}"))
                .spawn(move || shard::run(index, c, m, rx, ready_tx))
                .map_err(|e| Error::io("spawn shard thread for", &config.data_dir, e))?;
            ready_rx
                .recv()
                .map_err(|_| Error::ShuttingDown)?
                .map_err(|e| Error::io("start io_uring runtime for", &config.data_dir, e))?;
            shards.push(tx);
            threads.push(thread);
        }
        let engine = Engine {
            inner: Arc::new(Inner {
                shards,
                threads: Mutex::new(threads),
                metrics,
                config,
                lock: Mutex::new(lock),
            }),
        };
        let mut records = journal::by_partition(
            journals
                .iter()
                .flat_map(|j| j.records.iter().cloned())
                .collect(),
        );
        let ids: Vec<PartitionId> = found
            .iter()
            .filter_map(|name| parse_partition_dir(name))
            .collect();
        let opens: Vec<_> = ids
            .iter()
            .map(|id| {
                let engine = engine.clone();
                let replay = records.remove(id).unwrap_or_default();
                async move {
                    let replayed = !replay.is_empty();
                    engine
                        .call(id, |reply| Command::Open {
                            id: id.clone(),
                            config: None,
                            replay,
                            reply,
                        })
                        .await?;
                    // Replayed batches are durable in the segment before the journal is reused.
                    if replayed {
                        engine.flush(id).await?;
                    }
                    Ok::<(), Error>(())
                }
            })
            .collect();
        for result in futures::executor::block_on(futures::future::join_all(opens)) {
            result?;
        }
        engine.start_journals(&journals)?;
        Ok(engine)
    }

    /// Every shard starts its journal past the records of the last run; journals of shards this
    /// run does not have are removed (their records are durable in the segments now).
    fn start_journals(&self, found: &[FoundJournal]) -> Result<()> {
        let config = &self.inner.config;
        if config.journal_bytes == 0 {
            return Ok(());
        }
        let starts: Vec<_> = (0..self.shard_count())
            .map(|shard| {
                let (start, seq) = found
                    .iter()
                    .find(|j| j.shard == shard)
                    .map_or((0, 0), |j| (j.next_start, j.seq));
                self.send(shard, move |reply| Command::StartJournal {
                    start,
                    seq,
                    reply,
                })
            })
            .collect();
        for result in futures::executor::block_on(futures::future::join_all(starts)) {
            result?;
        }
        let storage = config
            .backend
            .storage()
            .map_err(|e| Error::io("initialise storage for", &config.data_dir, e))?;
        for j in found.iter().filter(|j| j.shard >= self.shard_count()) {
            storage
                .remove_file(&j.path)
                .map_err(|e| Error::io("remove", &j.path, e))?;
        }
        Ok(())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    pub fn metrics(&self) -> MetricsSnapshot {
        self.inner.metrics.snapshot()
    }

    pub fn shard_count(&self) -> usize {
        self.inner.shards.len()
    }

    /// The shard that owns `id` (stable for a given shard count).
    pub fn shard_of(&self, id: &PartitionId) -> usize {
        // FNV-1a: cheap, stable across runs and platforms.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.topic.bytes().chain(id.partition.to_be_bytes()) {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % self.inner.shards.len() as u64) as usize
    }

    async fn call<T>(
        &self,
        id: &PartitionId,
        command: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T> {
        self.send(self.shard_of(id), command).await
    }

    async fn send<T>(&self, shard: usize, command: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.inner.shards[shard]
            .send_async(command(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Create a partition, or open it if it exists with the same configuration.
    pub async fn create_partition(&self, id: &PartitionId, config: PartitionConfig) -> Result<()> {
        config.validate()?;
        self.call(id, |reply| Command::Open {
            id: id.clone(),
            config: Some(config),
            replay: Vec::new(),
            reply,
        })
        .await
    }

    /// Append one or more producer batches: validated, given the next offsets and `leader_epoch`.
    /// Completes per the partition's flush policy (durable for `every-batch`).
    pub async fn append(
        &self,
        id: &PartitionId,
        batches: Bytes,
        leader_epoch: i32,
    ) -> Result<AppendOutcome> {
        self.append_inner(id, batches, AppendKind::Leader { leader_epoch }, None)
            .await
    }

    /// [`Engine::append`], completing once the append reaches `wait` whatever the flush policy.
    pub async fn append_waiting(
        &self,
        id: &PartitionId,
        batches: Bytes,
        leader_epoch: i32,
        wait: Durability,
    ) -> Result<AppendOutcome> {
        self.append_inner(id, batches, AppendKind::Leader { leader_epoch }, Some(wait))
            .await
    }

    /// Append batches whose offsets are already assigned (a follower copying its leader): they are
    /// kept byte for byte and must continue the log exactly.
    pub async fn append_replicated(
        &self,
        id: &PartitionId,
        batches: Bytes,
    ) -> Result<AppendOutcome> {
        self.append_inner(id, batches, AppendKind::Replica, None)
            .await
    }

    /// [`Engine::append_waiting`] in two steps: the returned future resolves once the append is
    /// queued at its shard, in call order, and yields a [`Pending`] outcome. A server that must keep
    /// one connection's appends in request order awaits the first step of each request in turn and
    /// the outcomes in any order.
    pub async fn append_enqueued(
        &self,
        id: &PartitionId,
        batches: Bytes,
        leader_epoch: i32,
        wait: Option<Durability>,
    ) -> Result<Pending<AppendOutcome>> {
        self.enqueue_append(id, batches, AppendKind::Leader { leader_epoch }, wait)
            .await
    }

    async fn append_inner(
        &self,
        id: &PartitionId,
        bytes: Bytes,
        kind: AppendKind,
        wait: Option<Durability>,
    ) -> Result<AppendOutcome> {
        self.enqueue_append(id, bytes, kind, wait).await?.await
    }

    async fn enqueue_append(
        &self,
        id: &PartitionId,
        bytes: Bytes,
        kind: AppendKind,
        wait: Option<Durability>,
    ) -> Result<Pending<AppendOutcome>> {
        // Validation reads every byte (CRC-32C): done here, on the caller's thread, so the shard
        // that owns the partition only assigns offsets and copies.
        let bytes = Validated::check(bytes, kind)
            .inspect_err(|_| bump(&self.inner.metrics.appends_rejected, 1))?;
        let (reply, rx) = oneshot::channel();
        self.inner.shards[self.shard_of(id)]
            .send_async(Command::Append {
                id: id.clone(),
                bytes,
                kind,
                wait,
                reply,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(Pending { rx })
    }

    /// Run `task` on shard `shard`'s thread, inside its io_uring runtime (thread-per-core
    /// embedding: a server spawns its socket tasks there with `compio::runtime::spawn`, next to
    /// the partitions the shard owns). The task must not block.
    pub async fn run_on_shard(
        &self,
        shard: usize,
        task: impl FnOnce() + Send + 'static,
    ) -> Result<()> {
        self.inner.shards[shard % self.shard_count()]
            .send_async(Command::Run {
                task: Box::new(task),
            })
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Whole batches from `offset` (the batch containing it first), CRC-checked.
    pub async fn read(
        &self,
        id: &PartitionId,
        offset: u64,
        options: ReadOptions,
    ) -> Result<ReadResult> {
        self.call(id, |reply| Command::Read {
            id: id.clone(),
            offset,
            options,
            reply,
        })
        .await
    }

    /// Headers of the batches from `from` (up to about `max_bytes` of log), e.g. to rebuild
    /// producer state. Includes batches not yet durable.
    pub async fn batch_headers(
        &self,
        id: &PartitionId,
        from: u64,
        max_bytes: usize,
    ) -> Result<Vec<BatchHeader>> {
        let options = ReadOptions {
            max_bytes,
            upper: ReadUpper::Appended,
        };
        Ok(self.read(id, from, options).await?.headers())
    }

    /// The first batch whose maxTimestamp ≥ `timestamp` (Kafka's ListOffsets by time, at batch
    /// granularity), or `None` if every batch is older.
    pub async fn offset_for_timestamp(
        &self,
        id: &PartitionId,
        timestamp: i64,
    ) -> Result<Option<TimestampOffset>> {
        self.call(id, |reply| Command::OffsetForTimestamp {
            id: id.clone(),
            timestamp,
            reply,
        })
        .await
    }

    /// OffsetForLeaderEpoch: `(largest epoch ≤ epoch, its end offset)`.
    pub async fn end_offset_for_epoch(
        &self,
        id: &PartitionId,
        epoch: i32,
    ) -> Result<Option<(i32, u64)>> {
        self.call(id, |reply| Command::EndOffsetForEpoch {
            id: id.clone(),
            epoch,
            reply,
        })
        .await
    }

    /// Remove every batch that ends after `offset` (in memory and on disk) once in-flight I/O is
    /// done. The log then ends at the start of the batch containing `offset`.
    pub async fn truncate_to(&self, id: &PartitionId, offset: u64) -> Result<()> {
        self.call(id, |reply| Command::TruncateTo {
            id: id.clone(),
            offset,
            reply,
        })
        .await
    }

    /// Make everything appended so far durable now (for `interval` partitions). An error (a
    /// failed sync: the log went back to its durable point) and a success both come only once
    /// no batch a rollback removed can come back after a crash.
    pub async fn flush(&self, id: &PartitionId) -> Result<()> {
        self.call(id, |reply| Command::Flush {
            id: id.clone(),
            reply,
        })
        .await
        .map(|_| ())
    }

    pub async fn partition_state(&self, id: &PartitionId) -> Result<PartitionState> {
        self.call(id, |reply| Command::State {
            id: id.clone(),
            reply,
        })
        .await
    }

    /// Apply retention now; returns the number of segments deleted.
    pub async fn enforce_retention(&self, id: &PartitionId) -> Result<usize> {
        self.call(id, |reply| Command::EnforceRetention {
            id: id.clone(),
            below: None,
            reply,
        })
        .await
    }

    /// Delete the sealed segments that hold only offsets below `offset` (and whatever retention
    /// would delete now); the log then starts at the first segment left. The active segment
    /// stays. For a log whose older records are kept elsewhere (the broker's offsets store keeps
    /// snapshots). Returns the number of segments deleted.
    pub async fn delete_segments_below(&self, id: &PartitionId, offset: u64) -> Result<usize> {
        self.call(id, |reply| Command::EnforceRetention {
            id: id.clone(),
            below: Some(offset),
            reply,
        })
        .await
    }

    /// Delete a partition and its files. In-flight appends fail.
    pub async fn delete_partition(&self, id: &PartitionId) -> Result<()> {
        self.call(id, |reply| Command::Delete {
            id: id.clone(),
            reply,
        })
        .await
    }

    /// Every open partition, sorted.
    pub async fn partitions(&self) -> Result<Vec<PartitionId>> {
        let mut all = Vec::new();
        for shard in 0..self.shard_count() {
            all.extend(self.send(shard, |reply| Command::List { reply }).await?);
        }
        all.sort();
        Ok(all)
    }

    /// Finish in-flight work, make everything durable, write clean-shutdown markers, stop the
    /// shards. Later calls on any clone fail with [`Error::ShuttingDown`].
    pub async fn shutdown(&self) -> Result<()> {
        // Every shard at once: each flushes its partitions and writes their files on its own
        // disk queue, and their file-system syncs overlap.
        let shutdowns = (0..self.shard_count())
            .map(|shard| self.send(shard, |reply| Command::Shutdown { reply }));
        let mut result = Ok(());
        for done in futures::future::join_all(shutdowns).await {
            result = result.and(done);
        }
        if result.is_ok() {
            // Every shard has stopped and will not write again: another engine (a restart in
            // this process) may have the directory now, even while handles to this one live on.
            drop(
                self.inner
                    .lock
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take(),
            );
        }
        result
    }
}

/// A journal file found at start-up and what replay read from it.
struct FoundJournal {
    shard: usize,
    path: std::path::PathBuf,
    seq: u64,
    /// Where the next run's records start: a new lap past everything the file holds.
    next_start: u64,
    records: Vec<journal::Record>,
}

/// Read every journal of the last run (whatever its shard count).
fn read_journals(storage: &dyn Storage, data_dir: &std::path::Path) -> Result<Vec<FoundJournal>> {
    let dir = data_dir.join(path::JOURNAL_DIR);
    let names = match storage.list_dir(&dir) {
        Ok(names) => names,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", &dir, e)),
    };
    let mut found = Vec::new();
    for name in names {
        let Some(shard) = name
            .strip_suffix(".journal")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let file = dir.join(&name);
        if storage
            .read_file_at(&file, 0, 0)
            .map_err(|e| Error::io("read", &file, e))?
            .is_none()
        {
            continue;
        }
        let read = |offset, len| {
            storage
                .read_file_at(&file, offset, len)
                .map(Option::unwrap_or_default)
        };
        let replayed = journal::replay_file(read).map_err(|e| Error::io("read", &file, e))?;
        let (seq, next_start, records) = match replayed {
            // Strictly past the lap replay ended in, even when it ended on a lap boundary: the
            // last run may have left valid-looking records there that replay never reached
            // (written behind a torn one, never acknowledged), and they must never match.
            Some((header, records, end)) => (
                header.seq,
                (end / header.capacity + 1) * header.capacity,
                records,
            ),
            None => (0, 0, Vec::new()), // no valid header: nothing was ever journaled in it
        };
        found.push(FoundJournal {
            shard,
            path: file,
            seq,
            next_start,
            records,
        });
    }
    Ok(found)
}

/// Take the data directory's exclusive lock (`flock` on `<dir>/.lock`, as Kafka guards its log
/// directories): two engines writing the same partition files would interleave their writes and
/// each truncate the other's "torn" tail. The kernel drops the lock when the process dies, so a
/// crash never leaves the directory locked.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    let path = dir.join(crate::segment::path::LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::DirectoryInUse(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
    }
}
