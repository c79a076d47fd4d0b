//! `cargo bench --bench build_overhead [-- --mb N --runs N]`: trt-diff's own overhead around a TensorRT build.
//!
//! Writes an MLP with ~200 MB of f32 weights in external data, then builds it in child processes (a fresh output
//! name each run) and prints, per run: wall time; the time inside TensorRT (builder creation, ONNX parse, engine
//! build, plan streaming: its own work, timed in C++, minus our hashing in its write callbacks); loading the
//! TensorRT libraries; our overhead (wall - TensorRT - library load: reading the model, profiles, plan hashing,
//! manifest, renames); and memory: peak RSS, the peak of a tiny model (TensorRT's libraries and fixed heap),
//! and what the weights add above it, split into anonymous memory and file-backed pages (the mapped external
//! data, which is clean page cache the kernel can drop). Targets: overhead < 5%, RSS < 1.5x initializer bytes.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::{SaveOptions, save};
use trt_diff::trt::{BuildOptions, TrtChoice, build_engine};

fn status_kb(key: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Child: one build in this process; results on stdout as `key=value`.
fn child(onnx: &Path, out: &Path) {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let sampler = std::thread::spawn(move || {
        let (mut anon, mut file) = (0, 0);
        while !s2.load(Ordering::Relaxed) {
            anon = anon.max(status_kb("RssAnon:"));
            file = file.max(status_kb("RssFile:"));
            std::thread::sleep(Duration::from_millis(5));
        }
        (anon, file)
    });
    let t = Instant::now();
    let o = build_engine(&BuildOptions {
        onnx: onnx.into(),
        out: out.into(),
        trt: TrtChoice::Rtx,
        ..Default::default()
    })
    .unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        std::process::exit(1)
    });
    let wall = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let (anon, file) = sampler.join().unwrap();
    let tm = &o.timings;
    println!(
        "wall={wall} trt={} load={} hash={} rss={} anon={anon} file={}",
        tm.trt_total,
        tm.library_load,
        tm.source_hash,
        status_kb("VmHWM:"),
        file
    );
}

struct Sample {
    wall: f64,
    trt: f64,
    load: f64,
    hash: f64,
    rss: f64,
    anon: f64,
    file: f64,
}

fn measure(exe: &Path, onnx: &Path, out: &Path) -> Sample {
    let o = Command::new(exe)
        .arg("--child")
        .arg(onnx)
        .arg(out)
        .output()
        .unwrap();
    if !o.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&o.stderr));
        std::process::exit(1);
    }
    let _ = std::fs::remove_file(out);
    let _ = std::fs::remove_file(trt_diff::manifest::sidecar_path(out));
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    let get = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    Sample {
        wall: get("wall"),
        trt: get("trt"),
        load: get("load"),
        hash: get("hash"),
        rss: get("rss"),
        anon: get("anon"),
        file: get("file"),
    }
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn write(dir: &Path, name: &str, cfg: &MlpConfig) -> PathBuf {
    let onnx = dir.join(name);
    if !onnx.exists() {
        save(cfg.graph().unwrap(), &onnx, &SaveOptions::default()).unwrap();
    }
    onnx
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(Path::new(&args[i + 1]), Path::new(&args[i + 2]));
        return;
    }
    let mb = arg(&args, "--mb", 200);
    let runs = arg(&args, "--runs", 3);
    let hidden = 2048usize;
    let layers = (mb << 20).div_ceil(hidden * hidden * 4).max(1) + 1;
    let cfg = MlpConfig {
        hidden,
        layers,
        input: 256,
        output: 256,
        ..Default::default()
    };
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("build_overhead");
    std::fs::create_dir_all(&dir).unwrap();
    let onnx = write(&dir, &format!("mlp_{mb}mb.onnx"), &cfg);
    let tiny = write(&dir, "mlp_tiny.onnx", &MlpConfig::default());
    let init = cfg.weight_bytes() as f64;
    let mib = |b: f64| b / 1048576.0;
    let exe = std::env::current_exe().unwrap();
    let base = measure(&exe, &tiny, &dir.join("tiny.plan"));
    println!(
        "model: {} ({layers} layers, {hidden} wide), initializers {:.1} MiB in external data",
        onnx.display(),
        mib(init)
    );
    println!(
        "baseline (tiny model): peak RSS {:.0} MiB (anon {:.0}, file-backed {:.0}): TensorRT's libraries and heap",
        mib(base.rss),
        mib(base.anon),
        mib(base.file)
    );
    println!();
    println!(
        "| run | wall s | TensorRT s | library load s | trt-diff overhead s | overhead % | source hash s (concurrent) | peak RSS MiB | RSS / init | above baseline: anon / init | file-backed / init |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for run in 1..=runs {
        let s = measure(&exe, &onnx, &dir.join(format!("bench{run}.plan")));
        let overhead = s.wall - s.trt - s.load;
        println!(
            "| {run} | {:.3} | {:.3} | {:.3} | {overhead:.3} | {:.1} | {:.3} | {:.0} | {:.2} | {:.2} | {:.2} |",
            s.wall,
            s.trt,
            s.load,
            100.0 * overhead / s.trt,
            s.hash,
            mib(s.rss),
            s.rss / init,
            (s.anon - base.anon) / init,
            (s.file - base.file) / init,
        );
    }
}
