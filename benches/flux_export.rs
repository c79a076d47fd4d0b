//! Streaming export of a full-size Flux.1-dev transformer with NVFP4 quantization, against the disk's plain
//! sequential read + write of the same bytes.
//!
//! `cargo bench --bench flux_export` writes a synthetic checkpoint in the real BFL layout (11.9B parameters, bf16,
//! random values; ~23.8 GB) under FLUX_BENCH_DIR (default target/flux-bench), exports it to ONNX with NVFP4 weights
//! (default policy: embedders, modulation, final layer stay bf16, zero-copy) and prints wall time and peak RSS of
//! the export beside the time to read the checkpoint and write as many bytes as the export wrote. All files are
//! deleted at the end. FLUX_BENCH_SCALE (e.g. 0.1) scales the block counts for a quick run. The checkpoint's pages
//! are dropped from the page cache (`dd iflag=nocache`) before each timed phase, and both phases end with `sync`,
//! so both measure data from and to the disk. FLUX_BENCH_ROUNDS (default 2) rounds of both, alternating
//! which goes first; the ratio is of the summed times.
#[path = "common/export.rs"]
mod common;
use common::{Cleanup, cpu_seconds, drop_cache, load_average, peak_rss_bytes, plain_copy, sync};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;
use trt_diff::models::flux::{self, ExportOptions, FluxConfig, FluxPrecision};
use trt_diff::weights::safetensors_file::Checkpoint;

fn peak_rss_reset() {
    // Writing 5 to clear_refs resets VmHWM (Linux >= 4.0).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// (read requests, sectors read, write requests, sectors written) of the block device holding `p`, from sysfs;
/// zeros where it cannot be found (the table then shows no request sizes).
fn disk_stat(p: &Path) -> [u64; 4] {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::metadata(p) else {
        return [0; 4];
    };
    let (maj, min) = (libc::major(m.dev()), libc::minor(m.dev()));
    let dev = std::fs::read_link(format!("/sys/dev/block/{maj}:{min}")).ok();
    // A partition's stat counts its own requests; a whole disk's too.
    let stat = dev
        .and_then(|d| {
            std::fs::read_to_string(Path::new("/sys/dev/block").join(d).join("stat")).ok()
        })
        .unwrap_or_default();
    let f: Vec<u64> = stat
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if f.len() < 7 {
        return [0; 4];
    }
    [f[0], f[2], f[4], f[6]]
}

/// "read KiB/request, write KiB/request" between two [`disk_stat`] readings.
fn request_sizes(a: [u64; 4], b: [u64; 4]) -> String {
    let kib = |req: u64, sec: u64| {
        if req == 0 {
            0.0
        } else {
            sec as f64 * 512.0 / 1024.0 / req as f64
        }
    };
    format!(
        "{:.0} / {:.0}",
        kib(b[0] - a[0], b[1] - a[1]),
        kib(b[2] - a[2], b[3] - a[3])
    )
}

fn free_bytes(dir: &Path) -> Option<u64> {
    let o = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .nth(1)?
        .trim()
        .parse()
        .ok()
}

/// Random bf16 values of magnitude ~2^-7..2^-1 with random signs (no NaN/Inf), chunk-seeded for parallelism.
fn fill(buf: &mut [u8], seed: u64) {
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(ci, c)| {
        let mut s = seed ^ (ci as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for pair in c.chunks_exact_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let mut r = s;
            for v in pair.chunks_exact_mut(2) {
                let sign = (r & 1) as u16;
                let exp = 120 + ((r >> 1) % 6) as u16;
                let man = ((r >> 4) & 0x7f) as u16;
                v.copy_from_slice(&((sign << 15) | (exp << 7) | man).to_le_bytes());
                r >>= 16;
            }
        }
    });
}

fn write_checkpoint(cfg: &FluxConfig, path: &Path) -> u64 {
    let tensors = flux::bfl_tensor_shapes(cfg);
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, shape) in &tensors {
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
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let mut buf = vec![0u8; 64 << 20];
    let mut left = off;
    let mut seed = 1u64;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill(&mut buf[..n], seed);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
        seed += 1;
    }
    f.flush().unwrap();
    off
}

fn main() {
    let scale: f64 = std::env::var("FLUX_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let dir: PathBuf = std::env::var("FLUX_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/flux-bench"));
    std::fs::create_dir_all(&dir).unwrap();
    // The synthetic files are tens of GB: removed on every exit path, panics included.
    let _cleanup = Cleanup(dir.clone());
    let mut cfg = FluxConfig::dev();
    cfg.depth = ((19.0 * scale).round() as usize).max(1);
    cfg.depth_single = ((38.0 * scale).round() as usize).max(1);
    let params = cfg.param_count();
    // The checkpoint plus the export (NVFP4 with bf16 modulation layers comes to ~0.97 byte per parameter).
    let need = params * 2 + params * 97 / 100;
    if let Some(free) = free_bytes(&dir)
        && free < need + (1 << 30)
    {
        eprintln!(
            "flux_export: {} needs ~{} free, {} available; set FLUX_BENCH_SCALE lower or FLUX_BENCH_DIR elsewhere",
            dir.display(),
            trt_diff::fsutil::human_bytes(need),
            trt_diff::fsutil::human_bytes(free)
        );
        drop(_cleanup);
        std::process::exit(1);
    }
    let ck_path = dir.join("flux1-dev-synthetic.safetensors");
    let out_dir = dir.join("onnx");
    std::fs::create_dir_all(&out_dir).unwrap();
    println!(
        "Flux.1-dev transformer, {} double + {} single blocks, {:.2}B parameters (scale {scale})",
        cfg.depth,
        cfg.depth_single,
        params as f64 / 1e9
    );
    let t = Instant::now();
    let ck_bytes = write_checkpoint(&cfg, &ck_path);
    sync();
    println!(
        "synthetic BFL checkpoint: {} in {:.1} s",
        trt_diff::fsutil::human_bytes(ck_bytes),
        t.elapsed().as_secs_f64()
    );

    // Rounds of (export, plain copy), the order alternating: this virtual disk's speed moves by 2x between runs
    // (a host-side cache), so a single pair says little.
    let rounds: usize = std::env::var("FLUX_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
        .max(1);
    let plain_path = dir.join("plain.bin");
    let gb = |b: u64| b as f64 / 1e9;
    let load_before = load_average();
    let mut rows = Vec::new();
    let (mut export_total, mut plain_total, mut peak_max, mut out_bytes) = (0.0, 0.0, 0u64, 0u64);
    let mut layers = String::new();
    for round in 0..rounds {
        let export_first = round % 2 == 0;
        for phase in 0..2 {
            if (phase == 0) == export_first {
                let _ = std::fs::remove_dir_all(&out_dir);
                std::fs::create_dir_all(&out_dir).unwrap();
                drop_cache(&ck_path);
                peak_rss_reset();
                let cpu0 = cpu_seconds();
                let d0 = disk_stat(&ck_path);
                let t = Instant::now();
                let ck = Checkpoint::open(&ck_path).unwrap();
                let opts = ExportOptions {
                    precision: FluxPrecision::Nvfp4,
                    ..Default::default()
                };
                let report =
                    flux::export(&cfg, &ck, &opts, &out_dir.join("transformer.onnx")).unwrap();
                drop(ck);
                sync();
                let wall = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                let peak = peak_rss_bytes();
                let req = request_sizes(d0, disk_stat(&ck_path));
                peak_max = peak_max.max(peak);
                out_bytes = report.bytes;
                layers = format!("{:?}", report.layers);
                export_total += wall;
                rows.push(format!(
                    "| {} | export + NVFP4 (trt-diff) | {:.2} GB | {:.2} GB | {wall:.1} | {cpu:.1} | {:.2} | {req} | {} |",
                    round + 1,
                    gb(ck_bytes),
                    gb(report.bytes),
                    gb(ck_bytes) / wall,
                    trt_diff::fsutil::human_bytes(peak)
                ));
                let _ = std::fs::remove_dir_all(&out_dir);
            } else {
                // Plain sequential read of the checkpoint + write of as many bytes as the export writes (known
                // after the first export; the first round exports first).
                let bytes = if out_bytes > 0 {
                    out_bytes
                } else {
                    params * 97 / 100
                };
                drop_cache(&ck_path);
                let cpu0 = cpu_seconds();
                let d0 = disk_stat(&ck_path);
                let t = Instant::now();
                let read = plain_copy(&ck_path, &plain_path, bytes);
                sync();
                let wall = t.elapsed().as_secs_f64();
                let cpu = cpu_seconds() - cpu0;
                let req = request_sizes(d0, disk_stat(&ck_path));
                let _ = std::fs::remove_file(&plain_path);
                plain_total += wall;
                rows.push(format!(
                    "| {} | plain read + write | {:.2} GB | {:.2} GB | {wall:.1} | {cpu:.1} | {:.2} | {req} | - |",
                    round + 1,
                    gb(read),
                    gb(bytes),
                    gb(read) / wall
                ));
            }
        }
    }
    println!(
        "| round | step | bytes in | bytes out | wall s | CPU s | GB/s in | KiB per disk read / write | peak RSS |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
    println!(
        "load average at the start {load_before}, at the end {} ({} cores)",
        load_average(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "ratio export / plain over {rounds} rounds: {:.2}x (target <= 1.5x); peak RSS {:.2} GB (target <= 2 GB); \
         layers {layers}",
        export_total / plain_total,
        gb(peak_max),
    );
}
