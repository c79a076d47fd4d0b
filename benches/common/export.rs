//! Shared by the streaming-export benchmarks (flux2_export, sd35_export): a synthetic bf16 checkpoint, cold-cache
//! timing of the export beside a plain read + write of the same bytes, and the table they print.
#![allow(dead_code)]
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use trt_diff::weights::safetensors_file::Checkpoint;

pub struct Cleanup(pub PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn peak_rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU seconds of this process so far (/proc/self/stat, clock ticks of 1/100 s).
pub fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn drop_cache(p: &Path) {
    let _ = Command::new("dd")
        .arg(format!("if={}", p.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status();
}

pub fn sync() {
    let _ = Command::new("sync").status();
}

/// Random bf16 values of magnitude ~2^-7..2^-1 with random signs (no NaN/Inf).
pub fn fill(buf: &mut [u8], seed: u64) {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for v in buf.chunks_exact_mut(2) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let sign = (s & 1) as u16;
        let exp = 120 + ((s >> 1) % 6) as u16;
        let man = ((s >> 4) & 0x7f) as u16;
        v.copy_from_slice(&((sign << 15) | (exp << 7) | man).to_le_bytes());
    }
}

/// A synthetic bf16 checkpoint of `shapes` (safetensors, tensors in emission order) with `config` as the
/// config.json beside it; returns the bytes of tensor data.
pub fn write_checkpoint(shapes: &[(String, Vec<usize>)], config: &str, dir: &Path) -> u64 {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, shape) in shapes {
        let n = shape.iter().product::<usize>() as u64 * 2;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let path = dir.join("diffusion_pytorch_model.safetensors");
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let mut buf = vec![0u8; 64 << 20];
    let (mut left, mut seed) = (off, 1u64);
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], seed);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
        seed += 1;
    }
    f.flush().unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    off
}

/// Reads `src` sequentially and writes `out_bytes` bytes to `dst`; returns the bytes read.
pub fn plain_copy(src: &Path, dst: &Path, out_bytes: u64) -> u64 {
    let mut r = std::fs::File::open(src).unwrap();
    let mut w = std::fs::File::create(dst).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let (mut read, mut written) = (0u64, 0u64);
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        read += n as u64;
        let m = (out_bytes - written).min(n as u64) as usize;
        w.write_all(&buf[..m]).unwrap();
        written += m as u64;
    }
    while written < out_bytes {
        let m = (out_bytes - written).min(buf.len() as u64) as usize;
        w.write_all(&buf[..m]).unwrap();
        written += m as u64;
    }
    read
}

pub fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// One transformer to export: its synthetic checkpoint and the export under test.
pub struct Subject<'a> {
    pub shapes: Vec<(String, Vec<usize>)>,
    pub config: String,
    pub params: u64,
    /// Exports the checkpoint to the ONNX path; returns its layer counts for the summary.
    pub export: &'a dyn Fn(&Checkpoint, &Path) -> String,
}

/// Writes the subject's checkpoint under `dir`, then times `rounds` alternating rounds of its streaming NVFP4 export
/// and of a plain read + write of the same bytes, each from a cold page cache and ending with `sync`; prints the
/// table and the ratio. Everything under `dir` is removed at the end.
pub fn run(subject: &Subject, dir: &Path, rounds: usize) {
    let ck_dir = dir.join("transformer");
    std::fs::create_dir_all(&ck_dir).unwrap();
    // Tens of GB: removed on every exit path, panics included.
    let _cleanup = Cleanup(dir.to_path_buf());
    let params = subject.params;
    let t = Instant::now();
    let ck_bytes = write_checkpoint(&subject.shapes, &subject.config, &ck_dir);
    sync();
    println!(
        "synthetic diffusers checkpoint: {} in {:.1} s",
        trt_diff::fsutil::human_bytes(ck_bytes),
        t.elapsed().as_secs_f64()
    );
    let ck_file = ck_dir.join("diffusion_pytorch_model.safetensors");
    let out_dir = dir.join("onnx");
    let plain = dir.join("plain.bin");
    let gb = |b: u64| b as f64 / 1e9;
    let (mut export_s, mut plain_s, mut out_bytes, mut peak) = (0.0, 0.0, 0u64, 0u64);
    let mut rows = Vec::new();
    let mut layers = String::new();
    for round in 0..rounds {
        for phase in 0..2 {
            if (phase == 0) == (round % 2 == 0) {
                let _ = std::fs::remove_dir_all(&out_dir);
                std::fs::create_dir_all(&out_dir).unwrap();
                drop_cache(&ck_file);
                let cpu0 = cpu_seconds();
                let t = Instant::now();
                let ck = Checkpoint::open(&ck_dir).unwrap();
                layers = (subject.export)(&ck, &out_dir.join("transformer.onnx"));
                drop(ck);
                sync();
                let wall = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                out_bytes = dir_bytes(&out_dir);
                peak = peak.max(peak_rss_bytes());
                export_s += wall;
                rows.push(format!(
                    "| {} | export + NVFP4 (trt-diff) | {:.2} GB | {:.2} GB | {wall:.1} | {cpu:.1} | {:.2} |",
                    round + 1,
                    gb(ck_bytes),
                    gb(out_bytes),
                    gb(ck_bytes) / wall
                ));
                let _ = std::fs::remove_dir_all(&out_dir);
            } else {
                // The export's size once known (the first round exports first).
                let bytes = if out_bytes > 0 { out_bytes } else { params / 2 };
                drop_cache(&ck_file);
                let cpu0 = cpu_seconds();
                let t = Instant::now();
                let read = plain_copy(&ck_file, &plain, bytes);
                sync();
                let wall = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                let _ = std::fs::remove_file(&plain);
                plain_s += wall;
                rows.push(format!(
                    "| {} | plain read + write | {:.2} GB | {:.2} GB | {wall:.1} | {cpu:.1} | {:.2} |",
                    round + 1,
                    gb(read),
                    gb(bytes),
                    gb(read) / wall
                ));
            }
        }
    }
    println!("| round | step | bytes in | bytes out | wall s | CPU s | GB/s in |");
    println!("|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!(
        "load average at the end {} ({} cores)",
        load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "ratio export / plain over {rounds} rounds: {:.2}x (target <= 1.5x); peak RSS {:.2} GB (target <= 2 GB); \
         layers {layers}",
        export_s / plain_s,
        gb(peak)
    );
}
