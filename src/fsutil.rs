//! Output files appear whole or not at all: everything is written to a temporary name beside the target and
//! renamed into place once complete. Dropping an uncommitted file removes it.
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub struct AtomicFile {
    target: PathBuf,
    temp: PathBuf,
    writer: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(target: &Path) -> Result<Self> {
        let temp = temp_path(target);
        let file = File::create(&temp).with_context(|| {
            format!(
                "cannot create '{}' (is the directory there and writable?)",
                temp.display()
            )
        })?;
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
        std::fs::rename(&self.temp, &self.target).with_context(|| {
            format!(
                "cannot move '{}' to '{}'",
                self.temp.display(),
                self.target.display()
            )
        })?;
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
