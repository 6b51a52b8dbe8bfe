//! The engine's view of the file system, behind a trait so that a seeded, fault-injecting simulator
//! ([`sim::SimFs`]) runs exactly the code the io_uring backend ([`uring::UringStorage`]) runs.
//!
//! Data-path operations (`write_at`, `read_at`, `sync_data`, `allocate`) return `'static` futures
//! that own their buffers (the completion model of io_uring: the kernel holds the buffer until the
//! operation completes). A shard keeps them in a queue of in-flight operations and handles each
//! completion once it is finished, never from inside another completion.
//!
//! Directory operations (create, list, remove) are cold-path and synchronous.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;

pub mod aligned;
pub mod sim;
pub mod uring;

pub use aligned::AlignedBuf;
pub(crate) use aligned::BufferPool;

/// A boxed, single-threaded future: one allocation per I/O operation, never per batch.
pub type IoFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// Held while the engine takes or gives back disk space: a segment file's allocation changes (a
/// cut and the fallocate after it, a growth step) and small files' writes. Between a cut that
/// frees a file's tail and the fallocate that reserves it again, nothing else of this process
/// may take that space, or on a full disk the cut partition loses the room its acknowledged
/// data needs (a loop-mounted full ext4 showed it: another partition's leader-epoch file took
/// the freed blocks, and the journal's replay no longer fitted). These are rare, so one lock
/// for the process costs nothing measurable. Other programs can still take the space: give
/// Keel its own file system.
pub(crate) static SPACE: futures::lock::Mutex<()> = futures::lock::Mutex::new(());

/// A file system as one shard sees it.
pub trait Storage {
    /// Open (or create) a file for O_DIRECT reads and writes.
    fn open(&self, path: &Path, create: bool) -> IoFuture<io::Result<Rc<dyn StorageFile>>>;
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Names of the entries of a directory (files and directories).
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Read a small metadata file whole; `None` when it does not exist.
    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>>;
    /// Read up to `len` bytes of a file from `offset` (fewer past its end); `None` when it does
    /// not exist. This default (the simulator's) reads the whole file.
    fn read_file_at(&self, path: &Path, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
        Ok(self.read_file(path)?.map(|bytes| {
            let from = (offset as usize).min(bytes.len());
            bytes[from..(from + len).min(bytes.len())].to_vec()
        }))
    }
    /// Replace a small metadata file atomically and durably: write a temporary file, fsync it,
    /// rename it over `path`, fsync the directory.
    fn write_file_durable(&self, path: &Path, bytes: Vec<u8>) -> IoFuture<io::Result<()>>;
    /// [`write_file_durable`](Self::write_file_durable) for many files at once, each replaced
    /// atomically; the result of each, in order. The io_uring backend writes every temporary
    /// file, makes them durable with one `syncfs`, renames them all and makes the renames
    /// durable with a second one — two file-system commits for the lot instead of two fsyncs a
    /// file (a clean shutdown of 1000 partitions writes 4000 files). What a crash leaves is the
    /// same: each file old or new, never partial. This default (the simulator's) replaces each
    /// with `write_file_durable`, all at once.
    fn write_files_durable(&self, files: Vec<(PathBuf, Vec<u8>)>) -> IoFuture<Vec<io::Result<()>>> {
        let writes: Vec<_> = files
            .into_iter()
            .map(|(path, bytes)| self.write_file_durable(&path, bytes))
            .collect();
        Box::pin(futures::future::join_all(writes))
    }
    /// Make entries created or removed in a directory durable.
    fn sync_dir(&self, path: &Path) -> IoFuture<io::Result<()>>;
    /// Flushes that failed so far (an fdatasync, fsync or syncfs, the flush of an `RWF_DSYNC`
    /// write or of a whole-file write; not ENOSPC or EDQUOT), counted as each failure
    /// completes, before any engine code sees it: a sync that succeeds while this differs from
    /// what it was when its writes were issued does not vouch for them (ARCHITECTURE.md,
    /// decision 29).
    fn flush_failures(&self) -> u64;
}

/// Count `result` as a failed flush if it is one (see [`Storage::flush_failures`]).
pub(crate) fn count_flush(counter: &std::sync::atomic::AtomicU64, result: &io::Result<()>) {
    if let Err(e) = result {
        if !crate::error::is_full(e) {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// An open file. Offsets, lengths and buffers of reads and writes are multiples of
/// [`crate::constants::block_bytes`] (O_DIRECT's rule; the simulator asserts it).
pub trait StorageFile {
    fn path(&self) -> &Path;
    /// Write the whole of `buf` (its length rounded up to blocks) at `position`.
    fn write_at(&self, position: u64, buf: AlignedBuf) -> IoFuture<(io::Result<()>, AlignedBuf)>;
    /// Read up to `buf.capacity()` bytes at `position`; `buf.len()` is what was read (short at EOF).
    fn read_at(&self, position: u64, buf: AlignedBuf) -> IoFuture<(io::Result<()>, AlignedBuf)>;
    /// [`write_at`](Self::write_at), and this write is durable when it completes (io_uring: one
    /// `RWF_DSYNC` write, no separate fdatasync). Only this write: others completed before it
    /// still need a sync. The default is the write followed by `sync_data`.
    fn write_at_durable(
        &self,
        position: u64,
        buf: AlignedBuf,
    ) -> IoFuture<(io::Result<()>, AlignedBuf)> {
        let write = self.write_at(position, buf);
        let sync = self.sync_data();
        Box::pin(async move {
            let (result, buf) = write.await;
            if result.is_err() {
                return (result, buf);
            }
            (sync.await, buf)
        })
    }
    fn sync_data(&self) -> IoFuture<io::Result<()>>;
    /// syncfs(2) on this file's file system: everything written to any file on it before the call
    /// is durable when it returns (one journal commit and one device flush for many files).
    fn sync_filesystem(&self) -> IoFuture<io::Result<()>>;
    /// fsync including metadata (used when the file's size changes outside writes).
    fn sync_all(&self) -> IoFuture<io::Result<()>>;
    /// Allocate blocks so the file is at least `len` bytes long (fallocate; grows the size).
    fn allocate(&self, len: u64) -> IoFuture<io::Result<()>>;
    /// Make `[from, to)` read as zeros while its blocks stay allocated (fallocate
    /// `FALLOC_FL_ZERO_RANGE`; grows the size to `to` if it is shorter).
    fn zero_range(&self, from: u64, to: u64) -> IoFuture<io::Result<()>>;
    fn set_len(&self, len: u64) -> IoFuture<io::Result<()>>;
    /// Current size in bytes.
    fn file_len(&self) -> io::Result<u64>;
}

/// Which backend an engine runs on.
#[derive(Clone, Debug, Default)]
pub enum Backend {
    /// The real disk, through io_uring and O_DIRECT.
    #[default]
    Uring,
    /// The in-memory simulator, shared by all shards, with its fault plan.
    Sim(sim::SimFs),
}

impl Backend {
    pub(crate) fn storage(&self) -> io::Result<Rc<dyn Storage>> {
        Ok(match self {
            Backend::Uring => Rc::new(uring::UringStorage::new()),
            Backend::Sim(fs) => Rc::new(fs.clone()),
        })
    }
}

pub(crate) fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}
