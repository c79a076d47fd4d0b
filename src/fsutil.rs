//! Output files appear whole or not at all: everything is written to a temporary name beside the target and
//! renamed into place once complete. Dropping an uncommitted file removes it.
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Paths that a signal (SIGINT/SIGTERM) must remove before the process exits: live temporaries of
/// [`AtomicFile`]s and the already written files of an unfinished bundle ([`BundleGuard`]).
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Folders already swept for stale temporaries by this process.
static SWEPT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Folders watched by unfinished bundles: (folder, name prefix, start time); see [`BundleGuard::watch`].
static WATCHED: Mutex<Vec<Watch>> = Mutex::new(Vec::new());

#[derive(Clone, PartialEq)]
struct Watch {
    dir: PathBuf,
    prefix: String,
    since: std::time::SystemTime,
}

impl Watch {
    /// Removes the files of `dir` named `prefix*` that were written since `since`.
    fn remove_new(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let written_since = e
                .metadata()
                .ok()
                .filter(|m| m.is_file())
                .and_then(|m| m.modified().ok())
                .is_some_and(|t| t >= self.since);
            if written_since && e.file_name().to_string_lossy().starts_with(&self.prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

fn watched() -> std::sync::MutexGuard<'static, Vec<Watch>> {
    WATCHED.lock().unwrap_or_else(|e| e.into_inner())
}

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

fn register(path: &Path) {
    live().push(path.to_path_buf());
}

fn unregister(path: &Path) {
    let mut l = live();
    if let Some(i) = l.iter().rposition(|p| p == path) {
        l.swap_remove(i);
    }
}

/// Installs (once) a thread that, on SIGINT or SIGTERM, removes every live temporary and unfinished bundle file,
/// then exits with 130 (SIGINT) or 143 (SIGTERM). For commands that write files (build, quantize, export,
/// convert); not for the server, which shuts down on its own terms.
pub fn cleanup_on_signals() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "cannot watch SIGINT/SIGTERM ({e}): an interrupted run may leave temporaries"
                );
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("cleanup-on-signal".into())
            .spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    remove_live_and_exit(128 + sig);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "cannot start the signal watcher ({e}): an interrupted run may leave temporaries"
            );
        }
    });
}

/// Removes every registered temporary and unfinished bundle file, then ends the process with `code`. The
/// registry stays locked until the end: temporaries are created and renamed into place under the same lock, so
/// no other thread can create or commit a file behind the cleanup.
fn remove_live_and_exit(code: i32) -> ! {
    let mut l = live();
    for p in std::mem::take(&mut *l) {
        let _ = std::fs::remove_file(&p);
    }
    for w in std::mem::take(&mut *watched()) {
        w.remove_new();
    }
    // _exit: other threads (TensorRT's builder among them) may be anywhere; running exit handlers under them
    // could hang or crash. Everything that must go is gone.
    // SAFETY: _exit has no preconditions.
    unsafe { libc::_exit(code) }
}

/// The process id in a temporary's name `.NAME.partial-PID`, if `name` is one.
pub fn partial_pid(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, pid) = name.rsplit_once(".partial-")?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    if p <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Removes the temporaries `.NAME.partial-PID` of processes that no longer run (killed with SIGKILL, or by a
/// power cut) from `dir`, and the files of their unfinished bundles (journals `.trt-diff.bundle-PID-N`); returns
/// how many temporaries and journals went. Each folder is swept once per process, when the first output
/// is created in it.
pub fn sweep_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if let Some(pid) = journal_pid(&name) {
            if !pid_alive(pid) {
                tracing::info!(
                    "removing the files of an unfinished bundle (process {pid}, interrupted) listed in '{}'",
                    e.path().display()
                );
                undo_journal(&e.path());
                removed += 1;
            }
            continue;
        }
        let Some(pid) = partial_pid(&name) else {
            continue;
        };
        let is_file = e.file_type().is_ok_and(|t| t.is_file());
        if is_file && !pid_alive(pid) && std::fs::remove_file(e.path()).is_ok() {
            tracing::info!(
                "removed '{}', left behind by an interrupted run (process {pid})",
                e.path().display()
            );
            removed += 1;
        }
    }
    removed
}

fn sweep_once(target: &Path) {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    {
        let mut swept = SWEPT.lock().unwrap_or_else(|e| e.into_inner());
        if swept.contains(&dir) {
            return;
        }
        swept.push(dir.clone());
    }
    sweep_stale_temporaries(&dir);
}

/// The files of a bundle (an LLM engine's tokenizer, ONNX graphs and plan; a Flux bundle's components) appear
/// together or not at all: each final file written before the bundle is complete is listed here, and removed
/// when the guard drops without [`BundleGuard::disarm`] (an error) or when a signal ends the process. A journal
/// `.trt-diff.bundle-PID-N` beside the files lists them too, so that when the process dies without a chance to
/// clean up (SIGKILL, power loss) the next run in the folder removes them ([`sweep_stale_temporaries`]).
#[derive(Default)]
pub struct BundleGuard {
    files: Vec<PathBuf>,
    watches: Vec<Watch>,
    /// Per folder: the journal and its lines.
    journals: Vec<(PathBuf, Vec<String>)>,
}

const JOURNAL_PREFIX: &str = ".trt-diff.bundle-";

fn journal_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(JOURNAL_PREFIX)?;
    let (pid, seq) = rest.split_once('-')?;
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

impl BundleGuard {
    pub fn new() -> Self {
        Self::default()
    }

    /// A guard over every file of `dir` whose name starts with `prefix` and that this run writes (modified from
    /// now on), for bundles whose file list is only known as they are written (a Flux bundle `NAME.*`).
    pub fn watch(dir: &Path, prefix: &str) -> Self {
        // Files' timestamps come from a coarse clock that may lag this one by a few milliseconds.
        let since = std::time::SystemTime::now() - std::time::Duration::from_secs(1);
        let w = Watch {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            since,
        };
        watched().push(w.clone());
        let mut g = Self {
            files: Vec::new(),
            watches: vec![w],
            journals: Vec::new(),
        };
        let secs = since
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        g.journal(dir, format!("watch\t{secs}\t{prefix}"));
        g
    }

    /// Appends a line to the journal of `dir` (created on first use) and rewrites it.
    fn journal(&mut self, dir: &Path, line: String) {
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let i = match self.journals.iter().position(|(p, _)| dir_of(p) == dir) {
            Some(i) => i,
            None => {
                let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p = dir.join(format!("{JOURNAL_PREFIX}{}-{n}", std::process::id()));
                self.journals.push((p, Vec::new()));
                self.journals.len() - 1
            }
        };
        let (path, lines) = &mut self.journals[i];
        lines.push(line);
        // Written and registered under the registry's lock (see `remove_live_and_exit`). Best effort: without a
        // journal only an uncatchable kill leaves the files.
        let mut l = live();
        let _ = std::fs::write(&*path, lines.join("\n") + "\n");
        if !l.contains(path) {
            l.push(path.clone());
        }
    }

    fn unwatch(&mut self) -> Vec<Watch> {
        let mine = std::mem::take(&mut self.watches);
        watched().retain(|w| !mine.contains(w));
        mine
    }

    fn drop_journals(&mut self) {
        for (p, _) in std::mem::take(&mut self.journals) {
            unregister(&p);
            let _ = std::fs::remove_file(&p);
        }
    }

    /// Lists a final path written (or about to be written) as part of the bundle.
    pub fn add(&mut self, path: impl Into<PathBuf>) {
        let p = path.into();
        if let Some(name) = p.file_name() {
            let name = name.to_string_lossy().into_owned();
            self.journal(&dir_of(&p), format!("file\t{name}"));
        }
        register(&p);
        self.files.push(p);
    }

    /// The bundle is complete: its files stay.
    pub fn disarm(mut self) {
        for p in std::mem::take(&mut self.files) {
            unregister(&p);
        }
        self.unwatch();
        self.drop_journals();
    }
}

impl Drop for BundleGuard {
    fn drop(&mut self) {
        for p in std::mem::take(&mut self.files) {
            unregister(&p);
            let _ = std::fs::remove_file(&p);
        }
        for w in self.unwatch() {
            w.remove_new();
        }
        self.drop_journals();
    }
}

/// Undoes the unfinished bundle a dead process's journal describes: removes the files it lists (by name, in the
/// journal's own folder) and those its watches cover, then the journal.
fn undo_journal(journal: &Path) {
    let dir = dir_of(journal);
    if let Ok(text) = std::fs::read_to_string(journal) {
        for line in text.lines() {
            let mut parts = line.splitn(3, '\t');
            match (parts.next(), parts.next(), parts.next()) {
                // Names only: a journal never makes us remove files outside its folder.
                (Some("file"), Some(name), None)
                    if confined_path(&dir, name).is_ok() && !name.contains('/') =>
                {
                    let _ = std::fs::remove_file(dir.join(name));
                }
                (Some("watch"), Some(secs), Some(prefix)) if !prefix.is_empty() => {
                    if let Ok(secs) = secs.parse::<u64>() {
                        Watch {
                            dir: dir.clone(),
                            prefix: prefix.to_string(),
                            since: std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
                        }
                        .remove_new();
                    }
                }
                _ => {}
            }
        }
    }
    let _ = std::fs::remove_file(journal);
}

/// Why a file name read from a model file may not be used: it would lead outside the folder it must stay in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Escape {
    Empty,
    Absolute,
    ParentDir,
    /// Through a symlink to the real path given.
    Symlink(PathBuf),
}

impl std::fmt::Display for Escape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Escape::Empty => write!(f, "is empty"),
            Escape::Absolute => write!(f, "is an absolute path"),
            Escape::ParentDir => write!(f, "climbs out with `..`"),
            Escape::Symlink(p) => write!(f, "leads through a symlink to '{}'", p.display()),
        }
    }
}

/// `dir/name`, provided `name` stays inside `dir`: relative, without `..` or a root, and (when the file exists)
/// not through a symlink whose target lies outside `dir`'s real path.
pub fn confined_path(dir: &Path, name: &str) -> std::result::Result<PathBuf, Escape> {
    use std::path::Component;
    if name.is_empty() {
        return Err(Escape::Empty);
    }
    let rel = Path::new(name);
    if rel.has_root() || rel.is_absolute() {
        return Err(Escape::Absolute);
    }
    if rel
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(Escape::ParentDir);
    }
    let joined = dir.join(rel);
    if let (Ok(real_dir), Ok(real)) = (dir.canonicalize(), joined.canonicalize())
        && !real.starts_with(&real_dir)
    {
        return Err(Escape::Symlink(real));
    }
    Ok(joined)
}

/// The first (by name) `.safetensors` file directly in `dir` whose name starts with `prefix` (a vendor's single file
/// beside or instead of a diffusers subfolder, such as `flux1-dev.safetensors`).
pub fn safetensors_named(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    Ok(std::fs::read_dir(dir)
        .with_context(|| format!("cannot list '{}'", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(prefix) && n.ends_with(".safetensors")
            })
        })
        .min())
}

/// Copies `src` to `dst` through a temporary, so `dst` appears whole or not at all.
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<()> {
    let mut input = File::open(src).with_context(|| format!("cannot open '{}'", src.display()))?;
    let mut out = AtomicFile::create(dst)?;
    std::io::copy(&mut input, &mut out).with_context(|| {
        format!(
            "cannot copy '{}' to '{}' (disk full?)",
            src.display(),
            dst.display()
        )
    })?;
    out.commit()
}

pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<Self> {
        sweep_once(target);
        let temp = temp_path(target);
        // Created and registered under the registry's lock (see `remove_live_and_exit`).
        let file = {
            let mut l = live();
            let f = File::create(&temp).with_context(|| {
                format!(
                    "cannot create '{}' (is the directory there and writable?)",
                    temp.display()
                )
            })?;
            l.push(temp.clone());
            f
        };
        Ok(Self {
            target: target.to_path_buf(),
            temp,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// The temporary path, for writers that need a path rather than a `Write` (e.g. the C++ plan writer).
    pub fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// Hands buffered bytes to the kernel and returns the file, for page-cache hints ([`WriteBehind`]).
    pub fn flushed_file(&mut self) -> std::io::Result<&File> {
        let w = self.writer.as_mut().expect("AtomicFile used after commit");
        w.flush()?;
        Ok(w.get_ref())
    }

    pub fn commit(mut self) -> Result<()> {
        if let Some(mut w) = self.writer.take() {
            // No fsync: the rename alone guarantees readers never see a partial file, and syncing a large plan
            // would cost more than the rest of trt-diff's work around a build.
            w.flush()
                .with_context(|| format!("writing '{}' failed", self.temp.display()))?;
        }
        // Renamed under the registry's lock, so a signal's cleanup sees either the temporary or the final file.
        let mut l = live();
        std::fs::rename(&self.temp, &self.target).with_context(|| {
            format!(
                "cannot move '{}' to '{}'",
                self.temp.display(),
                self.target.display()
            )
        })?;
        if let Some(i) = l.iter().rposition(|p| *p == self.temp) {
            l.swap_remove(i);
        }
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer
            .as_mut()
            .expect("AtomicFile written after commit")
            .write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self.writer.as_mut() {
            Some(w) => w.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        unregister(&self.temp);
        if self.temp.exists() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Feeds a file to `sink` in 1 MiB chunks so large files never sit in memory.
fn stream_file(path: &Path, mut sink: impl FnMut(&[u8])) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open '{}'", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading '{}' failed", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        sink(&buf[..n]);
    }
}

/// sha256 of a file (hex): the identity of source models.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut hasher = Sha256::new();
    stream_file(path, |b| hasher.update(b))?;
    Ok(hex(&hasher.finalize()))
}

/// XXH3-128 of a file (hex): a checksum for large artifacts (plans, weights), an order of magnitude faster than
/// sha256, so checking a multi-GB plan costs little next to TensorRT's own work.
pub fn xxh3_file(path: &Path) -> Result<String> {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    stream_file(path, |b| hasher.update(b))?;
    Ok(xxh3_hex(&hasher))
}

pub fn xxh3_hex(h: &xxhash_rust::xxh3::Xxh3) -> String {
    format!("{:032x}", h.digest128())
}

/// `path` as a name relative to `dir` when it lies inside it (both resolved), for manifests that must name only
/// files in their own folder; None when it lies outside.
pub fn relative_name(path: &Path, dir: &Path) -> Option<String> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let (p, d) = (path.canonicalize().ok()?, dir.canonicalize().ok()?);
    let rel = p.strip_prefix(&d).ok()?;
    Some(rel.to_string_lossy().into_owned())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Human-readable byte count (binary units).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Physical memory in bytes (0 if unknown).
pub fn physical_memory() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let (pages, size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64
    } else {
        0
    }
}

/// Whether streaming `bytes` through the page cache would crowd it: more than a quarter of physical memory. Such
/// files are read or written once, so their pages are dropped from the cache behind the work instead of pushing
/// out the pages still ahead of it (which then read back one fault at a time).
pub fn crowds_page_cache(bytes: u64) -> bool {
    bytes > page_cache_share()
}

/// A quarter of physical memory (no limit where it is unknown): what one streamed file may keep in the cache.
fn page_cache_share() -> u64 {
    match physical_memory() {
        0 => u64::MAX,
        ram => ram / 4,
    }
}

/// Drops the clean, unmapped pages of `file` in `[start, end)` from the page cache (a hint; errors ignored).
pub fn drop_cached(file: &File, start: u64, end: u64) {
    use std::os::fd::AsRawFd;
    if end > start {
        // SAFETY: a valid descriptor and a byte range; the call only advises the kernel.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                start as libc::off_t,
                (end - start) as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Write-behind for a file written sequentially once (the external data of a large export): every step (64 MiB)
/// it starts the disk write of what came before, and once the output crowds the page cache it waits for the
/// pages of a few steps back and drops them, so dirty and cached pages of the output stay at a few steps instead
/// of the kernel throttling the writer (and evicting the checkpoint pages being read) when memory runs out.
pub struct WriteBehind {
    step: u64,
    /// Output size from which written pages are dropped.
    drop_from: u64,
    /// Bytes handed to the kernel so far.
    written: u64,
    /// Start of the range whose writeback was started last, and of the range not yet dropped.
    started: u64,
    dropped: u64,
}

impl Default for WriteBehind {
    fn default() -> Self {
        Self::new(64 << 20, page_cache_share())
    }
}

impl WriteBehind {
    /// Steps of written data left in flight before the oldest is waited for and dropped.
    const LAG: u64 = 4;

    /// Starts writeback every `step` bytes; drops written pages once the output is larger than `drop_from`.
    pub fn new(step: u64, drop_from: u64) -> Self {
        WriteBehind {
            step,
            drop_from,
            written: 0,
            started: 0,
            dropped: 0,
        }
    }

    /// Call after writing `n` more bytes; `file` (called only once a step is complete, so buffered writers
    /// flush once per step) hands what was written to the kernel and returns the file.
    pub fn advance<'f>(
        &mut self,
        n: u64,
        file: impl FnOnce() -> std::io::Result<&'f File>,
    ) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        self.written += n;
        if self.written - self.started < self.step {
            return Ok(());
        }
        let file = file()?;
        let fd = file.as_raw_fd();
        // SAFETY: a valid descriptor and byte ranges; sync_file_range only schedules or waits for writeback.
        unsafe {
            libc::sync_file_range(
                fd,
                self.started as libc::off64_t,
                (self.written - self.started) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        // Ranges older than LAG steps: wait for their writeback (by now usually done), then drop them. The lag
        // keeps several steps queued at the disk.
        let until = self.started.saturating_sub(Self::LAG * self.step);
        if self.written > self.drop_from && until > self.dropped {
            // SAFETY: as above.
            unsafe {
                libc::sync_file_range(
                    fd,
                    self.dropped as libc::off64_t,
                    (until - self.dropped) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
            }
            drop_cached(file, self.dropped, until);
            self.dropped = until;
        }
        self.started = self.written;
        Ok(())
    }
}

/// The project-local cache (scripts/setup.sh): `TRT_DIFF_CACHE`, else `.cache` in the source tree.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("TRT_DIFF_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Write-behind with every hint taken (small steps, pages dropped from the first byte) loses nothing.
    #[test]
    fn write_behind_keeps_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("data.bin");
        let mut f = AtomicFile::create(&target).unwrap();
        let mut behind = WriteBehind::new(8192, 0);
        let mut expect = Vec::new();
        for i in 0..300u32 {
            let chunk: Vec<u8> = (0..(1000 + i * 37)).map(|j| (i * 31 + j) as u8).collect();
            f.write_all(&chunk).unwrap();
            behind
                .advance(chunk.len() as u64, || f.flushed_file())
                .unwrap();
            expect.extend_from_slice(&chunk);
        }
        assert!(behind.dropped > 0, "the test must exercise the drop path");
        f.commit().unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), expect);
    }
}
