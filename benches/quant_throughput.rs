//! Quantization throughput on bf16 weights (GB/s of input), and `quantize` on a synthetic checkpoint with its
//! peak resident memory. `cargo bench --bench quant_throughput`; set QUANT_PEERS_PYTHON to a Python with
//! torch, nvidia-modelopt and bitsandbytes (e.g. /work/refvenv/bin/python) to print ModelOpt's and
//! bitsandbytes' CPU numbers for the same sizes beside ours (scripts/bench/quant_peers.py); QUANT_CKPT_GB sets
//! the synthetic checkpoint size (default 1; the target is 12 with peak RSS under 1 GB).
use half::bf16;
use std::io::Write;
use std::time::Instant;
use trt_diff::quant::bnb::{self, Kind};
use trt_diff::quant::checkpoint::{Format, QuantizeOptions, quantize_file};
use trt_diff::quant::{fp8, nvfp4};

const ROWS: usize = 4096;
const COLS: usize = 4096;

fn weights(n: usize, seed: u64) -> Vec<bf16> {
    // xorshift + sum of uniforms: a cheap bell-shaped distribution, deterministic.
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            let mut acc = 0f32;
            for _ in 0..4 {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                acc += (s >> 40) as f32 / (1u64 << 24) as f32;
            }
            bf16::from_f32((acc - 2.0) * 0.05)
        })
        .collect()
}

/// Best of `reps` runs, in GB/s of input.
fn gbps(bytes: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    bytes as f64 / best / 1e9
}

fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Writes a safetensors file of bf16 [4096, 4096] weights, streaming, about `gb` GB.
fn synthetic_checkpoint(path: &std::path::Path, gb: f64) -> usize {
    let per = ROWS * COLS * 2;
    let count = ((gb * 1e9) as usize / per).max(1);
    let mut header = serde_json::Map::new();
    for i in 0..count {
        header.insert(
            format!("layers.{i}.weight"),
            serde_json::json!({"dtype": "BF16", "shape": [ROWS, COLS], "data_offsets": [i * per, (i + 1) * per]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    let block: Vec<u8> = bytemuck::cast_slice(&weights(ROWS * COLS, 7)).to_vec();
    for _ in 0..count {
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
    count
}

fn main() {
    let threads = rayon::current_num_threads();
    // The checkpoint run goes first so the peak-RSS reading is its own.
    let gb: f64 = std::env::var("QUANT_CKPT_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let tensors = synthetic_checkpoint(&input, gb);
    let before = vm_hwm_kib().unwrap_or(0);
    let t = Instant::now();
    let r = quantize_file(&QuantizeOptions {
        input: input.clone(),
        output: dir.path().join("out.safetensors"),
        format: Format::Nvfp4,
        layout: None,
        block_size: None,
        double_quant: false,
        include: vec![],
        exclude: vec![],
        progress: false,
    })
    .unwrap();
    let secs = t.elapsed().as_secs_f64();
    let peak = vm_hwm_kib().unwrap_or(0);

    let w = weights(ROWS * COLS, 1);
    let bytes = w.len() * 2;
    println!(
        "quantization throughput, bf16 [{ROWS}, {COLS}] ({} MB), {threads} threads, best of 5",
        bytes / 1_000_000
    );
    println!("{:<28} {:>10}", "format", "GB/s");
    let rows: Vec<(&str, f64)> = vec![
        (
            "nvfp4 (ModelOpt rules)",
            gbps(bytes, 5, || drop(std::hint::black_box(nvfp4::quantize(&w)))),
        ),
        (
            "fp8 per-tensor",
            gbps(bytes, 5, || {
                drop(std::hint::black_box(fp8::quantize_fp8(&w)))
            }),
        ),
        (
            "mxfp8",
            gbps(bytes, 5, || {
                drop(std::hint::black_box(fp8::quantize_mxfp8(&w)))
            }),
        ),
        (
            "nf4 block 64",
            gbps(bytes, 5, || {
                drop(std::hint::black_box(bnb::quantize(
                    &w,
                    Kind::Nf4,
                    64,
                    false,
                )))
            }),
        ),
        (
            "nf4 block 64 + double quant",
            gbps(bytes, 5, || {
                drop(std::hint::black_box(bnb::quantize(&w, Kind::Nf4, 64, true)))
            }),
        ),
        (
            "nvfp4 scalar reference",
            gbps(bytes, 1, || {
                drop(std::hint::black_box(nvfp4::quantize_scalar(&w)))
            }),
        ),
    ];
    for (name, v) in &rows {
        println!("{name:<28} {v:>10.2}");
    }
    println!(
        "\ntrt-diff quantize --format nvfp4: {tensors} x bf16 [{ROWS}, {COLS}] = {:.2} GB in {secs:.2}s ({:.2} GB/s), \
         peak RSS {:.0} MB (before: {:.0} MB)",
        r.input_bytes as f64 / 1e9,
        r.input_bytes as f64 / 1e9 / secs,
        peak as f64 / 1024.0,
        before as f64 / 1024.0
    );
    if let Ok(py) = std::env::var("QUANT_PEERS_PYTHON") {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench/quant_peers.py");
        println!("\npeers ({py} {script}):");
        match std::process::Command::new(&py)
            .args([script, &ROWS.to_string(), &COLS.to_string()])
            .output()
        {
            Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Err(e) => println!("could not run {py}: {e}"),
        }
    }
}
