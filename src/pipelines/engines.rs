//! Engines opened on the backend chosen once per engine file or bundle: TensorRT when the plan runs on this
//! machine's GPU, else the plan's ONNX graph on ONNX Runtime. Pipelines and `trt-diff run` receive the opened
//! engines; nothing below this module decides where an engine runs.
use crate::backend::ort_backend::{OrtEngine, OrtOptions};
use crate::backend::{BackendChoice, Engine};
use crate::manifest::{BundleComponent, EngineFile, Pipeline};
use crate::trt::runtime::{DeviceArena, TrtEngine, TrtRunOptions, plan_runs_here};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;

/// Where an engine file's engines run, decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Trt,
    Cpu,
}

/// Resolves `--backend` for `engine`; `auto` logs why it falls back.
pub fn resolve(choice: BackendChoice, engine: &EngineFile) -> Result<Backend> {
    Ok(match choice {
        BackendChoice::Cpu => Backend::Cpu,
        BackendChoice::Trt => {
            if !engine.is_plan() {
                bail!(
                    "--backend trt needs a TensorRT plan; build one with `trt-diff build {} --out NAME.plan`",
                    engine.path.display()
                );
            }
            Backend::Trt
        }
        BackendChoice::Auto => match plan_runs_here(engine) {
            Ok(gpu) => {
                tracing::info!("running '{}' on {gpu} with TensorRT", engine.path.display());
                Backend::Trt
            }
            Err(why) => {
                tracing::info!(
                    "running '{}' on the CPU backend (ONNX Runtime): {why}",
                    engine.path.display()
                );
                Backend::Cpu
            }
        },
    })
}

/// What only one backend uses.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub ort: OrtOptions,
    pub trt: TrtRunOptions,
    /// TensorRT: weights to refit after loading.
    pub refit: Option<PathBuf>,
}

/// The graph the CPU backend runs for `engine`: an .onnx file itself; for a plan, the LLM's CPU graph when the
/// manifest has one, else the ONNX the plan was built from.
fn cpu_graph(engine: &EngineFile) -> Result<PathBuf> {
    if !engine.is_plan() {
        return Ok(engine.path.clone());
    }
    if let Some(Pipeline::Llm(llm)) = engine.pipeline()
        && let Some(f) = &llm.cpu_onnx
    {
        match engine.file(f, "the CPU graph") {
            Ok(p) => return Ok(p),
            Err(e) => tracing::warn!(
                "{e:#}; running the TensorRT graph on the CPU instead (slower: 16-bit weights widened, the KV cache \
                 copied every token)"
            ),
        }
    }
    engine.source_onnx().with_context(|| {
        format!(
            "'{}' cannot run on the CPU backend without its source ONNX",
            engine.path.display()
        )
    })
}

/// Opens one engine file on `backend`.
pub fn open(engine: &EngineFile, backend: Backend, opts: &OpenOptions) -> Result<Box<dyn Engine>> {
    match backend {
        Backend::Trt => {
            let mut e = TrtEngine::open_with(engine, opts.trt.clone())?;
            if let Some(w) = &opts.refit {
                let n = e.refit_from_safetensors(w)?;
                tracing::info!(
                    "refitted {n} weights of '{}' from '{}'",
                    engine.path.display(),
                    w.display()
                );
            }
            Ok(Box::new(e))
        }
        Backend::Cpu => {
            if opts.refit.is_some() || opts.trt.weight_budget.is_some() || opts.trt.cuda_graph {
                bail!(
                    "--refit, --weight-budget and --cuda-graph apply to TensorRT engines, and '{}' runs on the CPU \
                     backend here; drop them, or run on a machine where TensorRT can execute the plan",
                    engine.path.display()
                );
            }
            let onnx = cpu_graph(engine)?;
            if onnx != engine.path {
                tracing::info!("CPU backend: running '{}'", onnx.display());
            }
            Ok(Box::new(OrtEngine::open(&onnx, &opts.ort)?))
        }
    }
}

/// Resolves the backend and opens one engine file (`run`, LLM decoders).
pub fn open_file(
    engine: &EngineFile,
    choice: BackendChoice,
    opts: &OpenOptions,
) -> Result<Box<dyn Engine>> {
    open(engine, resolve(choice, engine)?, opts)
}

/// A component engine as opened: TensorRT engines stay concrete until they share their context memory.
enum Component {
    Trt(Box<TrtEngine>),
    Cpu(Box<dyn Engine>),
}

/// Opens the named components of a bundle on `backend`; `None` for optional ones the bundle lacks. TensorRT
/// components run one after another, so their execution contexts share one device-memory arena sized for the
/// largest instead of holding one each.
pub fn open_components(
    bundle: &EngineFile,
    components: &std::collections::BTreeMap<String, BundleComponent>,
    wanted: &[(&str, bool)],
    backend: Backend,
    arch: &str,
) -> Result<Vec<Option<Box<dyn Engine>>>> {
    let rebuild = format!(
        "rebuild the bundle with `trt-diff build MODEL --arch {arch} --out {}`",
        bundle.path.display()
    );
    let mut parts = Vec::with_capacity(wanted.len());
    for &(name, required) in wanted {
        let Some(c) = components.get(name) else {
            if required {
                bail!(
                    "the bundle '{}' has no {name} component; {rebuild}",
                    bundle.path.display()
                );
            }
            parts.push(None);
            continue;
        };
        let part = match (&c.plan, backend) {
            (Some(plan), Backend::Trt) => {
                let file = EngineFile::open_with(
                    &bundle.file(plan, &format!("component {name}"))?,
                    bundle.allow_external,
                )?;
                Component::Trt(Box::new(
                    TrtEngine::open(&file)
                        .with_context(|| format!("opening the {name} component"))?,
                ))
            }
            _ => {
                let onnx = bundle.file(&c.onnx, &format!("component {name}"))?;
                Component::Cpu(Box::new(
                    OrtEngine::open(&onnx, &OrtOptions::default())
                        .with_context(|| format!("opening the {name} component"))?,
                ))
            }
        };
        parts.push(Some(part));
    }
    let trt: Vec<&TrtEngine> = parts
        .iter()
        .filter_map(|p| match p {
            Some(Component::Trt(e)) => Some(&**e),
            _ => None,
        })
        .collect();
    if !trt.is_empty() {
        let arena = DeviceArena::for_engines(&trt)?;
        tracing::info!(
            "{} TensorRT engines share a {}-byte context memory arena",
            trt.len(),
            arena.bytes()
        );
        for p in parts.iter_mut() {
            if let Some(Component::Trt(e)) = p {
                e.attach_arena(arena.clone())?;
            }
        }
    }
    Ok(parts
        .into_iter()
        .map(|p| {
            p.map(|c| match c {
                Component::Trt(e) => e as Box<dyn Engine>,
                Component::Cpu(e) => e,
            })
        })
        .collect())
}
