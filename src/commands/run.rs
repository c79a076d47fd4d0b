//! `trt-diff run`: any engine on .npy inputs, outputs to .npy, latency statistics, and a comparison of two
//! backends on the same inputs.
use crate::backend::ort_backend::OrtOptions;
use crate::backend::{Engine, HostTensor};
use crate::cli::RunArgs;
use crate::pipelines::engines::{OpenOptions, open_file};
use crate::trt::runtime::TrtRunOptions;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::Instant;

pub fn run(a: RunArgs) -> Result<()> {
    let file = super::open_engine_file(&a.engine)?;
    let ort = OrtOptions {
        threads: a.threads,
        ..Default::default()
    };
    let inputs = load_inputs(&a.input)?;
    let opts = OpenOptions {
        ort: ort.clone(),
        trt: TrtRunOptions {
            weight_budget: a.weight_budget.map(|m| m << 20),
            cuda_graph: a.cuda_graph,
        },
        refit: a.refit.clone(),
    };
    let mut engine = open_file(&file, a.engine.backend, &opts)?;
    let (outputs, lat) = timed_runs(engine.as_mut(), &inputs, a.iterations)?;
    println!("{} on {}", file.path.display(), engine.backend());
    println!(
        "latency over {} run(s): min {:.3} ms, median {:.3} ms, p99 {:.3} ms",
        lat.runs, lat.min_ms, lat.median_ms, lat.p99_ms
    );
    for (name, t) in &outputs {
        println!("  output {name} {} {:?}", t.dtype, t.shape);
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create output folder '{}': {e}", dir.display()))?;
        for (name, t) in &outputs {
            let file: String = name
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            crate::backend::npy::write(&dir.join(format!("{file}.npy")), t)?;
        }
        println!("wrote {} output(s) to {}", outputs.len(), dir.display());
    }
    if let Some(other) = a.compare_with {
        let only_ort = OpenOptions {
            ort,
            ..Default::default()
        };
        let mut second = open_file(&file, other, &only_ort)?;
        let (theirs, lat2) = timed_runs(second.as_mut(), &inputs, a.iterations)?;
        println!(
            "compared with {} (median {:.3} ms):",
            second.backend(),
            lat2.median_ms
        );
        for d in compare(&outputs, &theirs)? {
            println!(
                "  {:<24} max abs {:.3e}  max rel {:.3e}",
                d.name, d.max_abs, d.max_rel
            );
        }
    }
    Ok(())
}

/// Parses `NAME=file.npy` arguments.
pub fn load_inputs(args: &[String]) -> Result<Vec<(String, HostTensor)>> {
    args.iter()
        .map(|a| {
            let (name, file) = a
                .split_once('=')
                .with_context(|| format!("--input '{a}': expected NAME=FILE.npy"))?;
            Ok((
                name.to_string(),
                crate::backend::npy::read(Path::new(file))?,
            ))
        })
        .collect()
}

#[derive(Clone, Debug)]
pub struct Latency {
    pub runs: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
}

/// Runs `iterations` times (after one warm-up run when iterating) and returns the last outputs and latencies.
pub fn timed_runs(
    engine: &mut dyn Engine,
    inputs: &[(String, HostTensor)],
    iterations: usize,
) -> Result<(Vec<(String, HostTensor)>, Latency)> {
    let iterations = iterations.max(1);
    if iterations > 1 {
        engine.run(inputs)?;
    }
    let mut times = Vec::with_capacity(iterations);
    let mut out = Vec::new();
    for _ in 0..iterations {
        let t = Instant::now();
        out = engine.run(inputs)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Ok((
        out,
        Latency {
            runs: iterations,
            min_ms: times[0],
            median_ms: pick(0.5),
            p99_ms: pick(0.99),
        },
    ))
}

#[derive(Clone, Debug)]
pub struct Difference {
    pub name: String,
    pub max_abs: f64,
    /// Max abs difference over the max abs of the reference.
    pub max_rel: f64,
}

/// Element-wise differences of two output sets with the same names and shapes.
pub fn compare(a: &[(String, HostTensor)], b: &[(String, HostTensor)]) -> Result<Vec<Difference>> {
    a.iter()
        .map(|(name, x)| {
            let (_, y) = b
                .iter()
                .find(|(n, _)| n == name)
                .with_context(|| format!("output '{name}' missing"))?;
            if x.shape != y.shape {
                bail!(
                    "output '{name}': shapes differ ({:?} vs {:?})",
                    x.shape,
                    y.shape
                );
            }
            let (Some(xv), Some(yv)) = (x.to_f64(), y.to_f64()) else {
                bail!("output '{name}': {} values cannot be compared", x.dtype);
            };
            let max_abs = xv
                .iter()
                .zip(&yv)
                .map(|(p, q)| (p - q).abs())
                .fold(0.0, f64::max);
            let scale = yv.iter().map(|v| v.abs()).fold(0.0, f64::max);
            Ok(Difference {
                name: name.clone(),
                max_abs,
                max_rel: if scale > 0.0 {
                    max_abs / scale
                } else {
                    max_abs
                },
            })
        })
        .collect()
}
