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
