//! A deterministic, in-memory file system that injects faults: failed writes, failed fdatasync,
//! a full disk, slow completions, and crashes that lose or tear everything not yet synced.
//!
//! It enforces O_DIRECT's alignment rules with assertions, so an engine bug that would make the
//! kernel return EINVAL fails a simulated test too. Directory operations (create, rename, unlink)
//! are modelled as immediately durable; only file contents have a volatile state.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{temp_path, AlignedBuf, IoFuture, Storage, StorageFile};
use crate::constants::block_bytes;

/// What the simulator does wrong, and how often. Rates are probabilities in [0, 1].
#[derive(Clone, Debug, Default)]
pub struct FaultConfig {
    pub seed: u64,
    pub write_error_rate: f64,
    pub sync_error_rate: f64,
    /// Total bytes the "disk" holds across all files; writes and allocations past it get ENOSPC.
    pub capacity_bytes: Option<u64>,
    /// Every data operation takes this long (a brown-out disk).
    pub latency: Duration,
    /// Plus a random extra of up to this much, so operations complete out of order as on a real
    /// device (writes land when they complete).
    pub latency_jitter: Duration,
    /// Another tenant of a full disk takes every byte a file gives back (cut shorter) at once:
    /// the capacity shrinks by as much. What a busy shared file system can do between a
    /// truncate and the fallocate after it.
    pub freed_space_taken: bool,
    /// `zero_range` fails with `EOPNOTSUPP`, as on a file system without
    /// `FALLOC_FL_ZERO_RANGE` (or a full ext4 refusing it with `ENOSPC`).
    pub zero_range_unsupported: bool,
    /// A failed sync loses the writes it covered for good (`SimFile::fail_sync`): no later sync
    /// makes them durable, a power cut keeps any part of them or none. The device may have
    /// dropped them from its cache, and Linux reports a writeback error once (ARCHITECTURE.md,
    /// decision 26). Every other file's writes completed before the failure are lost the same
    /// way: the cache is the device's (decision 29).
    /// `random_io_errors_never_lose_or_invent_an_acknowledged_append` runs with it.
    pub failed_sync_drops_writes: bool,
}

/// How a crash treats data that was written but not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashKind {
    /// kill -9: the OS survives, every completed write is kept.
    Process,
    /// Power cut: each unsynced write is kept, lost, or torn (a random prefix of its blocks kept).
    PowerCut,
}

/// A file: `len` bytes, of which only a prefix is materialised (the rest reads as zeros, as
/// fallocated space does), so preallocating large segments costs no memory.
#[derive(Default, Debug)]
struct SimFile {
    /// What reads see now (a prefix of `len`).
    data: Vec<u8>,
    len: u64,
    /// Completed writes not yet covered by a sync, oldest first: (completion number, position,
    /// bytes).
    unsynced: Vec<(u64, u64, Vec<u8>)>,
    /// Writes a failed sync covered, in the same form: the device may have dropped them, so no
    /// later sync makes them durable; a power cut keeps any part of them, or none. Newer data
    /// made durable over them supersedes them.
    lost: Vec<(u64, u64, Vec<u8>)>,
    /// How many writes have completed: a sync covers those completed before it was issued.
    completed_writes: u64,
    /// Content as of the last successful sync (a prefix of `durable_len`).
    durable: Vec<u8>,
    durable_len: u64,
}

impl SimFile {
    fn new(bytes: Vec<u8>) -> SimFile {
        SimFile {
            len: bytes.len() as u64,
            durable_len: bytes.len() as u64,
            durable: bytes.clone(),
            data: bytes,
            unsynced: Vec::new(),
            lost: Vec::new(),
            completed_writes: 0,
        }
    }

    fn write(&mut self, position: u64, bytes: &[u8]) {
        put(&mut self.data, position, bytes);
        self.len = self.len.max(position + bytes.len() as u64);
        self.completed_writes += 1;
        self.unsynced
            .push((self.completed_writes, position, bytes.to_vec()));
    }

    /// A write issued durable (`RWF_DSYNC`): it alone becomes durable; writes completed before
    /// it stay as they were, except where it overwrote them: the device holds its bytes there
    /// now, and no later sync or crash brings theirs back.
    fn write_durable(&mut self, position: u64, bytes: &[u8]) {
        let end = position + bytes.len() as u64;
        cut_out(&mut self.unsynced, position, end);
        cut_out(&mut self.lost, position, end);
        put(&mut self.data, position, bytes);
        self.len = self.len.max(end);
        self.completed_writes += 1;
        // Like fdatasync, the write's flush commits the file's size (an allocation's too).
        self.durable_len = self.durable_len.max(self.len);
        put(&mut self.durable, position, bytes);
    }

    /// The writes completed up to `upto` (a sync's snapshot of `completed_writes` when it was
    /// issued) become durable; later ones stay unsynced, as with fdatasync(2).
    fn sync(&mut self, upto: u64, len: u64) {
        self.durable_len = self.durable_len.max(len.min(self.len));
        let (synced, rest) = std::mem::take(&mut self.unsynced)
            .into_iter()
            .partition(|(n, _, _)| *n <= upto);
        self.unsynced = rest;
        for (_, position, bytes) in synced {
            cut_out(&mut self.lost, position, position + bytes.len() as u64);
            put(&mut self.durable, position, &bytes);
            self.durable_len = self.durable_len.max(position + bytes.len() as u64);
        }
    }

    /// A sync issued when `upto` writes had completed failed: those writes may be gone from
    /// the device's cache, and a later flush does not bring them back (as Linux, which reports
    /// a writeback error once and forgets the data).
    fn fail_sync(&mut self, upto: u64) {
        let (covered, rest) = std::mem::take(&mut self.unsynced)
            .into_iter()
            .partition(|(n, _, _)| *n <= upto);
        self.unsynced = rest;
        self.lost.extend::<Vec<_>>(covered);
    }

    fn set_len(&mut self, len: u64) {
        self.len = len;
        self.durable_len = len;
        self.data.truncate(len as usize);
        self.durable.truncate(len as usize);
        for writes in [&mut self.unsynced, &mut self.lost] {
            writes.retain(|(_, p, _)| *p < len);
            for (_, p, bytes) in writes.iter_mut() {
                bytes.truncate((len - *p) as usize);
            }
        }
    }

    /// Materialise the whole file (for tests that edit bytes).
    fn materialise(&mut self) {
        self.data.resize(self.len as usize, 0);
    }
}

/// Remove the range `position..end` from `writes` (newer data is there now), keeping the parts of
/// each write outside it.
fn cut_out(writes: &mut Vec<(u64, u64, Vec<u8>)>, position: u64, end: u64) {
    let mut rest = Vec::with_capacity(writes.len());
    for (m, at, older) in std::mem::take(writes) {
        let older_end = at + older.len() as u64;
        if older_end <= position || at >= end {
            rest.push((m, at, older));
            continue;
        }
        if at < position {
            rest.push((m, at, older[..(position - at) as usize].to_vec()));
        }
        if older_end > end {
            rest.push((m, end, older[(end - at) as usize..].to_vec()));
        }
    }
    *writes = rest;
}

fn put(image: &mut Vec<u8>, position: u64, bytes: &[u8]) {
    let end = position as usize + bytes.len();
    if image.len() < end {
        image.resize(end, 0);
    }
    image[position as usize..end].copy_from_slice(bytes);
}

#[derive(Debug)]
/// Lock order: `State`, then at most one `SimFile`. `State::used` locks files one at a time.
struct State {
    files: HashMap<PathBuf, Arc<Mutex<SimFile>>>,
    dirs: BTreeSet<PathBuf>,
    faults: FaultConfig,
    rng: u64,
    fail_writes: u32,
    fail_syncs: u32,
    writes: u64,
    syncs: u64,
    /// Operations of each kind of [`Hold`] wait while its flag is set, as on a stalled disk.
    held: [bool; 3],
    /// While held: how many more operations of each kind are caught (`None`: all of them).
    catch: [Option<usize>; 3],
    /// How many of each are waiting.
    waiting: [usize; 3],
    /// Bumped by [`SimFs::release_waiting`]: an operation caught before the bump goes on.
    released: [u64; 3],
    /// Bytes another tenant took (`FaultConfig::freed_space_taken`).
    taken: u64,
    /// Failed flushes ([`Storage::flush_failures`]), counted as each fails.
    flush_failures: u64,
}

/// The simulated file system; cheap to clone, shared by every shard of an engine.
#[derive(Clone, Debug)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl Default for SimFs {
    fn default() -> Self {
        SimFs::new(FaultConfig::default())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn enospc() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOSPC)
}

impl SimFs {
    pub fn new(faults: FaultConfig) -> SimFs {
        let rng = faults.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        SimFs {
            state: Arc::new(Mutex::new(State {
                files: HashMap::new(),
                dirs: BTreeSet::new(),
                faults,
                rng,
                fail_writes: 0,
                fail_syncs: 0,
                writes: 0,
                syncs: 0,
                held: [false; 3],
                catch: [None; 3],
                waiting: [0; 3],
                released: [0; 3],
                taken: 0,
                flush_failures: 0,
            })),
        }
    }

    pub fn set_faults(&self, faults: FaultConfig) {
        lock(&self.state).faults = faults;
    }

    /// The next `n` writes fail with EIO.
    pub fn fail_next_writes(&self, n: u32) {
        lock(&self.state).fail_writes = n;
    }

    /// The next `n` fdatasyncs fail with EIO.
    pub fn fail_next_syncs(&self, n: u32) {
        lock(&self.state).fail_syncs = n;
    }

    /// Hold (or release) every operation of kind `what` until released.
    pub fn hold(&self, what: Hold, hold: bool) {
        let mut state = lock(&self.state);
        state.held[what as usize] = hold;
        state.catch[what as usize] = None;
    }

    /// Hold only the next `n` operations of kind `what` (until [`hold`](Self::hold) releases
    /// them); later ones run: a stall of one operation while the disk serves the rest.
    pub fn hold_next(&self, what: Hold, n: usize) {
        let mut state = lock(&self.state);
        state.held[what as usize] = true;
        state.catch[what as usize] = Some(n);
    }

    /// Release the operations of kind `what` waiting now, and keep holding the ones that come
    /// after (as [`hold_next`](Self::hold_next) set it up): one stalled operation goes on
    /// while the next is caught, with nothing let through in between.
    pub fn release_waiting(&self, what: Hold) {
        let mut state = lock(&self.state);
        state.released[what as usize] += 1;
        state.waiting[what as usize] = 0;
    }

    /// Operations of kind `what` held now (not counting those `release_waiting` let go).
    pub fn waiting(&self, what: Hold) -> usize {
        lock(&self.state).waiting[what as usize]
    }

    /// Counts of successful writes and syncs so far.
    pub fn op_counts(&self) -> (u64, u64) {
        let s = lock(&self.state);
        (s.writes, s.syncs)
    }

    /// Total file bytes held (the "disk usage").
    pub fn used_bytes(&self) -> u64 {
        lock(&self.state).files.values().map(|f| lock(f).len).sum()
    }

    /// What the disk would hold if the power failed right now, as a separate file system; the
    /// engine using this one carries on undisturbed. Seeded like this one.
    pub fn crash_image(&self, kind: CrashKind) -> SimFs {
        let state = lock(&self.state);
        let copy = SimFs::new(state.faults.clone());
        {
            let mut c = lock(&copy.state);
            c.rng = state.rng ^ 0x5DEE_CE66;
            c.dirs = state.dirs.clone();
            c.taken = state.taken;
            for (path, file) in &state.files {
                let f = lock(file);
                let clone = SimFile {
                    data: f.data.clone(),
                    len: f.len,
                    unsynced: f.unsynced.clone(),
                    lost: f.lost.clone(),
                    durable: f.durable.clone(),
                    durable_len: f.durable_len,
                    completed_writes: f.completed_writes,
                };
                c.files.insert(path.clone(), Arc::new(Mutex::new(clone)));
            }
        }
        drop(state);
        copy.crash(kind);
        copy
    }

    /// Simulate a crash. Call it while no engine is using this file system.
    pub fn crash(&self, kind: CrashKind) {
        let mut state = lock(&self.state);
        let files: Vec<_> = state
            .files
            .iter()
            .map(|(p, f)| (p.clone(), f.clone()))
            .collect();
        for (path, file) in files {
            let mut f = lock(&file);
            if kind == CrashKind::PowerCut {
                let mut image = f.durable.clone();
                // The lost writes are older than every unsynced one.
                let mut unsynced = std::mem::take(&mut f.lost);
                unsynced.append(&mut f.unsynced);
                for (_, position, bytes) in unsynced {
                    let blocks = bytes.len() / block_bytes;
                    let kept = match state.next_u64() % 3 {
                        0 => 0,
                        1 => blocks,
                        _ => (state.next_u64() as usize) % (blocks + 1),
                    };
                    tracing::trace!(target: "keel::sim", path = %path.display(), position,
                        len = bytes.len(), kept = kept * block_bytes, "power cut keeps");
                    put(&mut image, position, &bytes[..kept * block_bytes]);
                }
                f.data = image;
                f.len = f.durable_len.max(f.data.len() as u64);
            }
            f.unsynced.clear();
            f.lost.clear();
            f.durable = f.data.clone();
            f.durable_len = f.len;
        }
    }

    /// Direct access for corruption tests: flip, zero or cut stored bytes (in the durable image too).
    pub fn with_file<R>(&self, path: &Path, edit: impl FnOnce(&mut Vec<u8>) -> R) -> Option<R> {
        let file = lock(&self.state).files.get(path).cloned()?;
        let mut f = lock(&file);
        f.materialise();
        let r = edit(&mut f.data);
        f.len = f.data.len() as u64;
        f.unsynced.clear();
        f.lost.clear();
        f.durable = f.data.clone();
        f.durable_len = f.len;
        Some(r)
    }

    /// Create (or replace) a file holding `bytes`, durable, creating its directories: for tests
    /// and fuzzing that start from given disk contents.
    pub fn create_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut state = lock(&self.state);
        for ancestor in path.ancestors().skip(1) {
            state.dirs.insert(ancestor.to_path_buf());
        }
        state.files.insert(
            path.to_path_buf(),
            Arc::new(Mutex::new(SimFile::new(bytes))),
        );
    }

    /// A file's length (what `stat` reports: preallocated space included), if it exists.
    pub fn file_len(&self, path: &Path) -> Option<u64> {
        let file = lock(&self.state).files.get(path).cloned()?;
        let len = lock(&file).len;
        Some(len)
    }

    /// Every file path, sorted.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = lock(&self.state).files.keys().cloned().collect();
        v.sort();
        v
    }

    fn delay(&self) -> Duration {
        let mut state = lock(&self.state);
        let jitter = state.faults.latency_jitter.as_nanos() as u64;
        let extra = if jitter == 0 {
            0
        } else {
            state.next_u64() % (jitter + 1)
        };
        state.faults.latency + Duration::from_nanos(extra)
    }
}

impl State {
    fn next_u64(&mut self) -> u64 {
        // xorshift64*: deterministic for a seed, good enough to pick faults.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn chance(&mut self, rate: f64) -> bool {
        rate > 0.0 && (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= rate
    }

    /// Decide whether the sync about to run fails (an injected or random fault); counts it if not.
    /// A failure is like Linux after failed writeback: the unsynced data the sync covered may or
    /// may not be on disk, and a later sync will not report it again. With
    /// `failed_sync_drops_writes` a later sync does not make it durable either.
    fn begin_sync(&mut self) -> io::Result<()> {
        let rate = self.faults.sync_error_rate;
        if self.fail_syncs > 0 || self.chance(rate) {
            self.fail_syncs = self.fail_syncs.saturating_sub(1);
            self.flush_failures += 1;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.syncs += 1;
        Ok(())
    }

    /// A flush of `file` (or of a file not among them) covering its writes up to `upto` failed. With
    /// `failed_sync_drops_writes` those writes are lost, and so are every other file's writes
    /// completed so far: the device's cache is shared (ARCHITECTURE.md, decision 29).
    fn flush_failed(&self, file: Option<&Arc<Mutex<SimFile>>>, upto: u64) {
        if !self.faults.failed_sync_drops_writes {
            return;
        }
        if let Some(file) = file {
            lock(file).fail_sync(upto);
        }
        for other in self
            .files
            .values()
            .filter(|f| file.is_none_or(|file| !Arc::ptr_eq(f, file)))
        {
            let mut f = lock(other);
            let completed = f.completed_writes;
            f.fail_sync(completed);
        }
    }

    fn used(&self) -> u64 {
        self.files.values().map(|f| lock(f).len).sum()
    }

    fn has_room(&self, current_len: u64, new_len: u64) -> bool {
        match self.faults.capacity_bytes {
            Some(capacity) if new_len > current_len => {
                self.used() + self.taken + (new_len - current_len) <= capacity
            }
            _ => true,
        }
    }
}

struct SimHandle {
    fs: SimFs,
    file: Arc<Mutex<SimFile>>,
    path: PathBuf,
}

/// What a test can stall ([`SimFs::hold`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Whole-file writes (`write_file_durable`: the small files a partition's creation or a
    /// checkpoint of its metadata writes).
    FileWrites = 0,
    /// fdatasync and fsync of one file (`sync_data`, `sync_all`: a group of one, a roll, a cut),
    /// before they take their snapshot of what they cover. Not `syncfs`.
    FileSyncs = 1,
    /// O_DIRECT writes (`write_at`, `write_at_durable`: segment and journal data), before they
    /// reach the file: a write in flight that has not completed.
    Writes = 2,
}

async fn wait_while_held(fs: &SimFs, what: Hold) {
    let i = what as usize;
    let caught = {
        let mut state = lock(&fs.state);
        let caught = state.held[i] && state.catch[i] != Some(0);
        if caught {
            state.catch[i] = state.catch[i].map(|n| n - 1);
            state.waiting[i] += 1;
        }
        caught.then_some(state.released[i])
    };
    if let Some(generation) = caught {
        while {
            let state = lock(&fs.state);
            state.held[i] && state.released[i] == generation
        } {
            compio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut state = lock(&fs.state);
        // `release_waiting` no longer counts the operations it released.
        if state.released[i] == generation {
            state.waiting[i] -= 1;
        }
    }
}

async fn pause(fs: &SimFs) {
    let latency = fs.delay();
    if !latency.is_zero() {
        compio::time::sleep(latency).await;
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

impl Storage for SimFs {
    fn open(&self, path: &Path, create: bool) -> IoFuture<io::Result<Rc<dyn StorageFile>>> {
        let fs = self.clone();
        let path = path.to_path_buf();
        Box::pin(async move {
            let file = {
                let mut state = lock(&fs.state);
                let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
                if !state.dirs.contains(&parent) {
                    return Err(not_found(&parent));
                }
                match state.files.get(&path) {
                    Some(f) => f.clone(),
                    None if create => state.files.entry(path.clone()).or_default().clone(),
                    None => return Err(not_found(&path)),
                }
            };
            Ok(Rc::new(SimHandle { fs, file, path }) as Rc<dyn StorageFile>)
        })
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = lock(&self.state);
        for ancestor in path.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let state = lock(&self.state);
        if !state.dirs.contains(path) {
            return Err(not_found(path));
        }
        let mut names: Vec<String> = state
            .files
            .keys()
            .chain(state.dirs.iter())
            .filter(|p| p.parent() == Some(path))
            .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        lock(&self.state).files.remove(path);
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.files.retain(|p, _| !p.starts_with(path));
        state.dirs.retain(|p| !p.starts_with(path));
        Ok(())
    }

    fn read_file(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        let file = lock(&self.state).files.get(path).cloned();
        Ok(file.map(|f| {
            let mut f = lock(&f);
            f.materialise();
            f.data.clone()
        }))
    }

    fn write_file_durable(&self, path: &Path, bytes: Vec<u8>) -> IoFuture<io::Result<()>> {
        let fs = self.clone();
        let path = path.to_path_buf();
        Box::pin(async move {
            pause(&fs).await;
            wait_while_held(&fs, Hold::FileWrites).await;
            // Takes space as the real backend does: never between a cut and its re-allocation.
            let _space = super::SPACE.lock().await;
            let mut state = lock(&fs.state);
            // The new content goes to a temporary file first: it needs room of its own while
            // the old file still holds its blocks.
            if !state.has_room(0, bytes.len() as u64) {
                return Err(enospc());
            }
            if state.fail_syncs > 0 {
                state.fail_syncs -= 1;
                state.flush_failures += 1;
                // Its fsync failed: the device's flush, as for any other file (decision 29).
                state.flush_failed(None, 0);
                return Err(io::Error::other("injected fsync failure"));
            }
            state.files.remove(&temp_path(&path));
            state
                .files
                .insert(path, Arc::new(Mutex::new(SimFile::new(bytes))));
            Ok(())
        })
    }

    fn sync_dir(&self, _path: &Path) -> IoFuture<io::Result<()>> {
        Box::pin(async { Ok(()) })
    }

    fn flush_failures(&self) -> u64 {
        lock(&self.state).flush_failures
    }
}

impl SimHandle {
    /// A write; `durable`: issued with `RWF_DSYNC` (durable itself once it completes).
    fn write(
        &self,
        position: u64,
        mut buf: AlignedBuf,
        durable: bool,
    ) -> IoFuture<(io::Result<()>, AlignedBuf)> {
        buf.zero_padding();
        let fs = self.fs.clone();
        let file = self.file.clone();
        let path = self.path.clone();
        Box::pin(async move {
            assert_eq!(
                position % block_bytes as u64,
                0,
                "unaligned O_DIRECT write position"
            );
            pause(&fs).await;
            wait_while_held(&fs, Hold::Writes).await;
            let bytes = &buf.full()[..buf.padded_len()];
            let end = position + bytes.len() as u64;
            let mut state = lock(&fs.state);
            if state.fail_writes > 0 || {
                let rate = state.faults.write_error_rate;
                state.chance(rate)
            } {
                state.fail_writes = state.fail_writes.saturating_sub(1);
                tracing::trace!(target: "keel::sim", path = %path.display(), position,
                    len = bytes.len(), "write failed");
                return (Err(io::Error::from_raw_os_error(libc::EIO)), buf);
            }
            let current_len = lock(&file).len;
            if !state.has_room(current_len, end) {
                return (Err(enospc()), buf);
            }
            if durable {
                // RWF_DSYNC: the write and its flush, so a sync fault applies too.
                // A failed flush leaves the data written but not durable (and, with
                // `failed_sync_drops_writes`, lost to later syncs).
                state.writes += 1;
                if let Err(e) = state.begin_sync() {
                    // Its flush covered every write of the file completed so far.
                    let upto = {
                        let mut f = lock(&file);
                        f.write(position, bytes);
                        f.completed_writes
                    };
                    tracing::trace!(target: "keel::sim", path = %path.display(), position,
                        len = bytes.len(), covered = upto, "RWF_DSYNC write: its flush failed");
                    state.flush_failed(Some(&file), upto);
                    return (Err(e), buf);
                }
                lock(&file).write_durable(position, bytes);
                tracing::trace!(target: "keel::sim", path = %path.display(), position,
                    len = bytes.len(), completion = lock(&file).completed_writes,
                    "RWF_DSYNC write");
            } else {
                state.writes += 1;
                lock(&file).write(position, bytes);
                tracing::trace!(target: "keel::sim", path = %path.display(), position,
                    len = bytes.len(), completion = lock(&file).completed_writes, "write");
            }
            (Ok(()), buf)
        })
    }
}

impl StorageFile for SimHandle {
    fn path(&self) -> &Path {
        &self.path
    }

    fn write_at(&self, position: u64, buf: AlignedBuf) -> IoFuture<(io::Result<()>, AlignedBuf)> {
        self.write(position, buf, false)
    }

    fn write_at_durable(
        &self,
        position: u64,
        buf: AlignedBuf,
    ) -> IoFuture<(io::Result<()>, AlignedBuf)> {
        self.write(position, buf, true)
    }

    fn read_at(
        &self,
        position: u64,
        mut buf: AlignedBuf,
    ) -> IoFuture<(io::Result<()>, AlignedBuf)> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        Box::pin(async move {
            assert_eq!(
                position % block_bytes as u64,
                0,
                "unaligned O_DIRECT read position"
            );
            pause(&fs).await;
            let f = lock(&file);
            let start = position.min(f.len) as usize;
            let end = (start + buf.capacity()).min(f.len as usize);
            let from = start.min(f.data.len());
            let to = end.min(f.data.len()).max(from);
            buf.set_len(0);
            buf.extend_from_slice(&f.data[from..to]);
            // The rest reads as zeros: fallocated space.
            let read = buf.len();
            buf.set_len(end - start);
            buf.zero_tail(read);
            (Ok(()), buf)
        })
    }

    fn sync_data(&self) -> IoFuture<io::Result<()>> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        let path = self.path.clone();
        Box::pin(async move {
            wait_while_held(&fs, Hold::FileSyncs).await;
            let (upto, len) = {
                let f = lock(&file);
                (f.completed_writes, f.len)
            };
            pause(&fs).await;
            let mut state = lock(&fs.state);
            if let Err(e) = state.begin_sync() {
                state.flush_failed(Some(&file), upto);
                tracing::trace!(target: "keel::sim", path = %path.display(), covered = upto,
                    "fdatasync failed");
                return Err(e);
            }
            lock(&file).sync(upto, len);
            tracing::trace!(target: "keel::sim", path = %path.display(), covered = upto, len,
                "fdatasync");
            Ok(())
        })
    }

    fn sync_all(&self) -> IoFuture<io::Result<()>> {
        self.sync_data()
    }

    fn sync_filesystem(&self) -> IoFuture<io::Result<()>> {
        let fs = self.fs.clone();
        Box::pin(async move {
            let snapshot: Vec<_> = lock(&fs.state)
                .files
                .values()
                .map(|file| {
                    let f = lock(file);
                    (file.clone(), f.completed_writes, f.len)
                })
                .collect();
            pause(&fs).await;
            let mut state = lock(&fs.state);
            if let Err(e) = state.begin_sync() {
                tracing::trace!(target: "keel::sim", "syncfs failed");
                for (file, upto, _) in snapshot {
                    if state.faults.failed_sync_drops_writes {
                        lock(&file).fail_sync(upto);
                    }
                }
                return Err(e);
            }
            tracing::trace!(target: "keel::sim", "syncfs");
            for (file, upto, len) in snapshot {
                lock(&file).sync(upto, len);
            }
            Ok(())
        })
    }

    fn allocate(&self, len: u64) -> IoFuture<io::Result<()>> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        Box::pin(async move {
            let state = lock(&fs.state);
            let current_len = lock(&file).len;
            if !state.has_room(current_len, len) {
                return Err(enospc());
            }
            let mut f = lock(&file);
            // The size change is metadata: durable with the file's next sync (as ext4 commits
            // it with the transaction an fdatasync of the file forces), lost in a power cut
            // before that.
            f.len = f.len.max(len);
            Ok(())
        })
    }

    fn zero_range(&self, from: u64, to: u64) -> IoFuture<io::Result<()>> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        let path = self.path.clone();
        Box::pin(async move {
            let state = lock(&fs.state);
            if state.faults.zero_range_unsupported {
                return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
            }
            let current_len = lock(&file).len;
            if !state.has_room(current_len, to) {
                return Err(enospc());
            }
            let mut f = lock(&file);
            tracing::trace!(target: "keel::sim", path = %path.display(), from, to, "zero range");
            // Like a cut at `from` whose blocks stay allocated: durable at once, as metadata.
            let keep = f.len.max(to);
            f.set_len(from);
            f.len = keep;
            f.durable_len = keep;
            Ok(())
        })
    }

    fn set_len(&self, len: u64) -> IoFuture<io::Result<()>> {
        let fs = self.fs.clone();
        let file = self.file.clone();
        let path = self.path.clone();
        Box::pin(async move {
            let mut state = lock(&fs.state);
            let mut f = lock(&file);
            if state.faults.freed_space_taken {
                state.taken += f.len.saturating_sub(len);
            }
            tracing::trace!(target: "keel::sim", path = %path.display(), len, "set length");
            f.set_len(len);
            Ok(())
        })
    }

    fn file_len(&self) -> io::Result<u64> {
        Ok(lock(&self.file).len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_durable_write_supersedes_the_older_unsynced_writes_it_overlaps() {
        let mut f = SimFile::new(Vec::new());
        // Blocks 0..3 written, not synced; then block 1 written durable by itself.
        f.write(0, &[1; 3 * block_bytes]);
        f.write_durable(block_bytes as u64, &[2; block_bytes]);
        // What is left unsynced of the first write is blocks 0 and 2; a power cut may keep them,
        // but never its old bytes over block 1.
        let left: Vec<(u64, usize)> = f.unsynced.iter().map(|(_, at, b)| (*at, b.len())).collect();
        assert_eq!(
            left,
            vec![(0, block_bytes), (2 * block_bytes as u64, block_bytes)]
        );
        f.sync(f.completed_writes, f.len);
        assert_eq!(
            &f.durable[block_bytes..2 * block_bytes],
            &[2; block_bytes][..]
        );
        assert_eq!(&f.durable[..block_bytes], &[1; block_bytes][..]);
        assert_eq!(&f.durable[2 * block_bytes..], &[1; block_bytes][..]);
    }

    #[test]
    fn a_write_a_failed_sync_covered_is_never_made_durable_by_a_later_one() {
        let mut f = SimFile::new(Vec::new());
        // Blocks 0..3 written; the sync issued after it fails; block 3 written after that.
        f.write(0, &[1; 3 * block_bytes]);
        f.fail_sync(f.completed_writes);
        f.write(3 * block_bytes as u64, &[3; block_bytes]);
        // Block 1 written again; a later sync makes it and block 3 durable, not blocks 0 and 2.
        f.write(block_bytes as u64, &[2; block_bytes]);
        f.sync(f.completed_writes, f.len);
        assert_eq!(
            f.durable,
            [
                [0; block_bytes],
                [2; block_bytes],
                [0; block_bytes],
                [3; block_bytes]
            ]
            .concat()
        );
        // What a power cut may still keep of the lost write: blocks 0 and 2, never its old block 1.
        let left: Vec<(u64, usize)> = f.lost.iter().map(|(_, at, b)| (*at, b.len())).collect();
        assert_eq!(
            left,
            vec![(0, block_bytes), (2 * block_bytes as u64, block_bytes)]
        );
        // Reads still see the lost bytes (the page cache, or the device's, still holds them).
        assert_eq!(&f.data[..block_bytes], &[1; block_bytes][..]);
    }
}
