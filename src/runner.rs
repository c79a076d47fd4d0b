//! `trt-diff run`: any engine on .npy inputs, outputs to .npy, latency statistics, and a comparison of two
//! backends on the same inputs.
use crate::backend::ort_backend::{OrtEngine, OrtOptions};
use crate::backend::{Engine, HostTensor};
use crate::manifest::{Manifest, sidecar_path};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// TensorRT when a usable GPU and flavour exist, else the CPU.
    #[default]
    Auto,
    Trt,
    Cpu,
}

/// The ONNX file a plan was built from, per its manifest (for running a plan on the CPU backend).
fn source_onnx(plan: &Path) -> Result<PathBuf> {
    let m = Manifest::read(&sidecar_path(plan)).with_context(|| {
        format!("'{}' has no readable manifest, so its source ONNX is unknown; run the .onnx file on the CPU", plan.display())
    })?;
    let p = PathBuf::from(&m.source.onnx);
    let p = if p.is_absolute() || p.exists() {
        p
    } else {
        plan.parent().unwrap_or(Path::new(".")).join(p)
    };
    if !p.exists() {
        bail!(
            "'{}' was built from '{}', which is gone; run the ONNX file itself on the CPU",
            plan.display(),
            m.source.onnx
        );
    }
    Ok(p)
}

/// The CPU graph an LLM plan's manifest names (`models::llama_cpu`), when it is there.
fn cpu_graph(plan: &Path) -> Option<PathBuf> {
    let m = Manifest::read(&sidecar_path(plan)).ok()?;
    let Some(crate::manifest::Pipeline::Llm {
        cpu_onnx: Some(f), ..
    }) = m.pipeline
    else {
        return None;
    };
    let p = plan.parent().unwrap_or(Path::new(".")).join(f);
    if p.exists() {
        tracing::info!("CPU backend: running '{}'", p.display());
        Some(p)
    } else {
        tracing::warn!(
            "'{}' is missing; running the TensorRT graph on the CPU instead (slower: fp16 weights widened, the KV cache copied every token)",
            p.display()
        );
        None
    }
}

fn is_plan(path: &Path) -> bool {
    path.extension().is_some_and(|e| e != "onnx")
}

/// Opens `path` (.onnx or .plan) on the chosen backend.
pub fn open_engine(
    path: &Path,
    choice: BackendChoice,
    ort: &OrtOptions,
) -> Result<Box<dyn Engine>> {
    open_engine_with(path, choice, ort, &TrtSetup::default())
}

/// What only the TensorRT backend does: run options and weights to refit after loading.
#[derive(Clone, Debug, Default)]
pub struct TrtSetup {
    pub run: crate::trt::runtime::TrtRunOptions,
    pub refit: Option<PathBuf>,
}

/// [`open_engine`] with TensorRT run options.
pub fn open_engine_with(
    path: &Path,
    choice: BackendChoice,
    ort: &OrtOptions,
    trt: &TrtSetup,
) -> Result<Box<dyn Engine>> {
    if !path.exists() {
        bail!(
            "cannot open engine '{}': no such file; check the path",
            path.display()
        );
    }
    let plan = is_plan(path);
    let use_trt = match choice {
        BackendChoice::Cpu => false,
        BackendChoice::Trt => true,
        BackendChoice::Auto => {
            if !plan {
                tracing::info!(
                    "running '{}' on the CPU backend (ONNX Runtime): an .onnx file has no TensorRT engine",
                    path.display()
                );
                false
            } else {
                match crate::trt::runtime::plan_runs_here(path) {
                    Ok(gpu) => {
                        tracing::info!("running on {gpu} with TensorRT");
                        true
                    }
                    Err(why) => {
                        tracing::info!("running on the CPU backend: {why}");
                        false
                    }
                }
            }
        }
    };
    if use_trt {
        if !plan {
            bail!(
                "--backend trt needs a TensorRT plan; build one with `trt-diff build {} --out NAME.plan`",
                path.display()
            );
        }
        let mut e = crate::trt::runtime::TrtEngine::open_with(path, trt.run.clone())?;
        if let Some(w) = &trt.refit {
            let n = e.refit_from_safetensors(w)?;
            tracing::info!(
                "refitted {n} weights of '{}' from '{}'",
                path.display(),
                w.display()
            );
        }
        return Ok(Box::new(e));
    }
    if trt.refit.is_some() || trt.run.weight_budget.is_some() || trt.run.cuda_graph {
        bail!(
            "--refit, --weight-budget and --cuda-graph apply to TensorRT engines, and '{}' runs on the CPU backend \
             here; drop them, or run on a machine where TensorRT can execute the plan",
            path.display()
        );
    }
    let onnx = if plan {
        match cpu_graph(path) {
            Some(p) => p,
            None => source_onnx(path)?,
        }
    } else {
        path.to_path_buf()
    };
    Ok(Box::new(OrtEngine::open(&onnx, ort)?))
}

/// Parses `NAME=file.npy` arguments.
pub fn load_inputs(args: &[String]) -> Result<Vec<(String, HostTensor)>> {
    args.iter()
        .map(|a| {
            let (name, file) = a
                .split_once('=')
                .with_context(|| format!("--input '{a}': expected NAME=FILE.npy"))?;
            Ok((name.to_string(), crate::npy::read(Path::new(file))?))
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
