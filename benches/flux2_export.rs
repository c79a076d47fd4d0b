//! Streaming export of a full-size FLUX.2 [klein] 9B transformer with NVFP4 quantization, against the disk's plain
//! sequential read + write of the same bytes (issue 17's benchmark: target <= 1.5x, peak RSS <= 2 GB).
//!
//! `cargo bench --bench flux2_export` writes a synthetic diffusers-layout checkpoint (8 double + 24 single blocks of
//! 32 x 128, Qwen3-8B's 3 x 4096 text features: 9.1B parameters, bf16, random values; ~18 GB) under
//! FLUX2_BENCH_DIR (default target/flux2-bench), exports it to ONNX with NVFP4 weights (the family's default policy)
//! and prints wall time and peak RSS of the export beside the time to read the checkpoint and write as many bytes
//! as the export wrote. FLUX2_BENCH_SIZE=4b takes the 4B shape; FLUX2_BENCH_SCALE (e.g. 0.25) scales the block
//! counts for a quick run; FLUX2_BENCH_ROUNDS (default 2) alternates which phase goes first. The checkpoint's pages
//! are dropped from the page cache before each timed phase and both end with `sync`. All files are deleted at the
//! end.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use trt_diff::models::flux::FluxPrecision;
use trt_diff::models::flux2::{self, ExportOptions, Flux2Config};
use trt_diff::weights::safetensors_file::Checkpoint;

struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn peak_rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// User + system CPU seconds of this process so far (/proc/self/stat, clock ticks of 1/100 s).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn drop_cache(p: &Path) {
    let _ = Command::new("dd")
        .arg(format!("if={}", p.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status();
}

fn sync() {
    let _ = Command::new("sync").status();
}

/// Random bf16 values of magnitude ~2^-7..2^-1 with random signs (no NaN/Inf).
fn fill(buf: &mut [u8], seed: u64) {
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

/// The synthetic checkpoint (safetensors, tensors in emission order) with its config.json beside it.
fn write_checkpoint(cfg: &Flux2Config, dir: &Path) -> u64 {
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, shape) in cfg.tensor_shapes() {
        let n = shape.iter().product::<usize>() as u64 * 2;
        header.insert(
            name,
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
    std::fs::write(dir.join("config.json"), serde_json::to_string(cfg).unwrap()).unwrap();
    off
}

/// Reads `src` sequentially and writes `out_bytes` bytes to `dst`; returns the bytes read.
fn plain_copy(src: &Path, dst: &Path, out_bytes: u64) -> u64 {
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

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let scale: f64 = env("FLUX2_BENCH_SCALE", 1.0);
    let rounds: usize = env::<usize>("FLUX2_BENCH_ROUNDS", 2).max(1);
    let nine = env("FLUX2_BENCH_SIZE", "9b".to_string()) != "4b";
    let dir: PathBuf = std::env::var("FLUX2_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/flux2-bench"));
    let ck_dir = dir.join("transformer");
    std::fs::create_dir_all(&ck_dir).unwrap();
    // Tens of GB: removed on every exit path, panics included.
    let _cleanup = Cleanup(dir.clone());
    let (double, single, heads, joint) = if nine {
        (8.0, 24.0, 32, 3 * 4096)
    } else {
        (5.0, 20.0, 24, 3 * 2560)
    };
    let blocks = |n: f64| ((n * scale).round() as usize).max(1);
    let cfg: Flux2Config = serde_json::from_value(serde_json::json!({
        "num_layers": blocks(double), "num_single_layers": blocks(single), "num_attention_heads": heads,
        "joint_attention_dim": joint
    }))
    .unwrap();
    let params = cfg.param_count();
    println!(
        "FLUX.2 [klein] {} transformer, {} double + {} single blocks, {:.2}B parameters (scale {scale})",
        if nine { "9B" } else { "4B" },
        cfg.num_layers,
        cfg.num_single_layers,
        params as f64 / 1e9
    );
    let t = Instant::now();
    let ck_bytes = write_checkpoint(&cfg, &ck_dir);
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
                let opts = ExportOptions {
                    precision: FluxPrecision::Nvfp4,
                    ..Default::default()
                };
                let counts =
                    flux2::export(&cfg, &ck, &opts, &out_dir.join("transformer.onnx")).unwrap();
                drop(ck);
                sync();
                let wall = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                out_bytes = dir_bytes(&out_dir);
                peak = peak.max(peak_rss_bytes());
                layers = format!("{counts:?}");
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
