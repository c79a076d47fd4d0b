//! Engines opened on the backend chosen once per engine file or bundle: TensorRT when the plan runs on this
//! machine's GPU, else the plan's ONNX graph on ONNX Runtime's CUDA provider when there is a GPU, else on the CPU.
//! Pipelines and `trt-diff run` receive the opened engines; nothing below this module decides where one runs.
use crate::backend::ort_backend::{OrtDevice, OrtEngine, OrtOptions};
use crate::backend::{BackendChoice, Engine, HostTensor};
use crate::manifest::{BundleComponent, EngineFile, EngineKind, Pipeline};
use crate::onnx::DataType;
use crate::trt::runtime::{DeviceArena, TrtEngine, TrtRunOptions, plan_runs_here};
use anyhow::{Context, Result, bail};
use std::path::PathBuf;

/// Where an engine file's engines run, decided once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Trt,
    /// ONNX Runtime's CUDA execution provider on this GPU.
    Cuda(i32),
    Cpu,
}

impl Backend {
    /// The ONNX Runtime options of this backend (`base` gives threads and optimization level).
    fn ort(self, base: &OrtOptions) -> OrtOptions {
        OrtOptions {
            device: match self {
                Backend::Cuda(id) => OrtDevice::Cuda(id),
                _ => OrtDevice::Cpu,
            },
            ..base.clone()
        }
    }
}

/// Why ONNX Runtime's CUDA provider cannot run here, if it cannot: no GPU, or an ONNX Runtime without the
/// provider library beside it (the CPU build).
pub fn cuda_unavailable() -> Option<String> {
    if let Err(why) = crate::cuda::query().and_then(|r| {
        r.gpus
            .first()
            .map(|_| ())
            .ok_or_else(|| "the driver reports no GPU".to_string())
    }) {
        return Some(why);
    }
    let lib = match crate::backend::ort_lib::find() {
        Ok(l) => l.path,
        Err(e) => return Some(format!("{e:#}")),
    };
    let dir = lib
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(|d| d.to_path_buf()));
    match dir {
        Some(d) if d.join("libonnxruntime_providers_cuda.so").exists() => None,
        _ => Some(format!(
            "ONNX Runtime '{}' has no CUDA provider beside it (a CPU build); install onnxruntime-gpu with \
             `bash scripts/setup.sh --gpu`",
            lib.display()
        )),
    }
}

/// Resolves `--backend` for `engine`; `auto` logs why it falls back.
pub fn resolve(choice: BackendChoice, engine: &EngineFile) -> Result<Backend> {
    Ok(match choice {
        BackendChoice::Cpu => Backend::Cpu,
        BackendChoice::Trt => {
            match engine.kind {
                EngineKind::Plan => {}
                EngineKind::Onnx => bail!(
                    "--backend trt needs a TensorRT plan; build one with `trt-diff build {} --out NAME.plan`",
                    engine.path.display()
                ),
                EngineKind::OnnxBundle => bail!(
                    "--backend trt needs a TensorRT plan, and '{}' is an ONNX-only bundle (built with --onnx-only); \
                     rebuild it without --onnx-only on a machine with TensorRT, or use --backend cuda or cpu",
                    engine.path.display()
                ),
            }
            Backend::Trt
        }
        BackendChoice::Cuda => {
            if let Some(why) = cuda_unavailable() {
                bail!("--backend cuda cannot run here: {why}");
            }
            Backend::Cuda(0)
        }
        BackendChoice::Auto => match plan_runs_here(engine) {
            Ok(gpu) => {
                tracing::info!(
                    "'{}': running on {gpu} with TensorRT",
                    engine.path.display()
                );
                Backend::Trt
            }
            Err(why) => match cuda_unavailable().or_else(|| no_cuda_graph(engine)) {
                None => {
                    tracing::info!(
                        "'{}': running on ONNX Runtime's CUDA provider: TensorRT cannot run it ({why})",
                        engine.path.display()
                    );
                    Backend::Cuda(0)
                }
                Some(no_cuda) => {
                    let also = if no_cuda == why {
                        String::new()
                    } else {
                        format!("; ONNX Runtime CUDA cannot either: {no_cuda}")
                    };
                    tracing::info!(
                        "'{}': running on the CPU backend (ONNX Runtime): {why}{also}",
                        engine.path.display()
                    );
                    Backend::Cpu
                }
            },
        },
    })
}

/// Why ONNX Runtime's CUDA provider has nothing to run for a plan: a bundle that kept neither an LLM CUDA graph nor
/// its TensorRT graph (a quantized GGUF built without `--keep-onnx`: its CPU graph reads the GGUF).
pub fn no_cuda_graph(engine: &EngineFile) -> Option<String> {
    if engine.kind != EngineKind::Plan {
        return None;
    }
    let m = engine.manifest.as_ref()?;
    let cuda = match engine.pipeline() {
        Some(Pipeline::Llm(llm)) => llm.cuda_onnx.clone(),
        _ => None,
    };
    let kept = |f: &str| engine.file(f, "a graph").is_ok_and(|p| p.exists());
    if cuda.as_deref().is_some_and(kept) || kept(&m.source.onnx) {
        return None;
    }
    Some(format!(
        "the bundle keeps no graph for ONNX Runtime's CUDA provider (its TensorRT graph '{}' was not kept: rebuild \
         with --keep-onnx, or with --onnx-only, to run on CUDA without TensorRT)",
        m.source.onnx
    ))
}

/// What only one backend uses.
#[derive(Clone, Debug, Default)]
pub struct OpenOptions {
    pub ort: OrtOptions,
    pub trt: TrtRunOptions,
    /// TensorRT: weights to refit after loading.
    pub refit: Option<PathBuf>,
}

/// The graph ONNX Runtime runs for `engine` (an LLM's CUDA graph aside, `cuda_llm_graph`): an .onnx file itself;
/// for a plan or an ONNX-only bundle, the LLM's CPU graph when the manifest has one and the backend is the CPU (its
/// operators are trt-diff's CPU kernels), else the ONNX the manifest records as its source.
fn ort_graph(engine: &EngineFile, backend: Backend) -> Result<PathBuf> {
    if engine.kind == EngineKind::Onnx {
        return Ok(engine.path.clone());
    }
    if backend == Backend::Cpu
        && let Some(Pipeline::Llm(llm)) = engine.pipeline()
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
            "'{}' cannot run on ONNX Runtime without its source ONNX (a quantized GGUF's plan keeps it when built \
             with --keep-onnx; its CPU graph runs with --backend cpu)",
            engine.path.display()
        )
    })
}

/// The LLM's CUDA graph, when it is the one to run (`TRT_DIFF_CUDA_LLM_GRAPH=tensorrt` takes the TensorRT graph
/// instead, to compare).
fn cuda_llm_graph(engine: &EngineFile, backend: Backend) -> Option<PathBuf> {
    let Backend::Cuda(_) = backend else {
        return None;
    };
    let Some(Pipeline::Llm(llm)) = engine.pipeline() else {
        return None;
    };
    let f = llm.cuda_onnx.as_ref()?;
    if std::env::var("TRT_DIFF_CUDA_LLM_GRAPH").is_ok_and(|v| v == "tensorrt") {
        return None;
    }
    match engine.file(f, "the CUDA graph") {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(
                "{e:#}; running the TensorRT graph on CUDA instead (the KV cache passed between calls)"
            );
            None
        }
    }
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
        Backend::Cpu | Backend::Cuda(_) => {
            if opts.refit.is_some() || opts.trt.weight_budget.is_some() || opts.trt.cuda_graph {
                bail!(
                    "--refit, --weight-budget and --cuda-graph apply to TensorRT engines, and '{}' runs on ONNX \
                     Runtime here; drop them, or run on a machine where TensorRT can execute the plan",
                    engine.path.display()
                );
            }
            let cuda_graph = cuda_llm_graph(engine, backend);
            let onnx = match &cuda_graph {
                Some(p) => p.clone(),
                None => ort_graph(engine, backend)?,
            };
            if onnx != engine.path {
                tracing::info!("{backend:?}: running '{}'", onnx.display());
            }
            let mut ort = opts.ort.clone();
            ort.allow_external = engine.allow_external;
            // CUDA graphs need the CUDA graph's in-place cache; the TensorRT graph passes its cache along.
            if cuda_graph.is_none() {
                ort.cuda_graphs = None;
            }
            let opened = match OrtEngine::open(&onnx, &backend.ort(&ort)) {
                Err(e) if ort.cuda_graphs.is_some() => {
                    tracing::warn!("{e:#}; opening '{}' without CUDA graphs", onnx.display());
                    ort.cuda_graphs = None;
                    OrtEngine::open(&onnx, &backend.ort(&ort))
                }
                other => other,
            };
            match opened {
                Ok(e) => Ok(Box::new(e)),
                // The CUDA graph needs operators some ONNX Runtime builds lack; the TensorRT graph runs anywhere.
                Err(e) if cuda_graph.is_some() => {
                    let source = engine.source_onnx()?;
                    tracing::warn!(
                        "{e:#}; running '{}' on {backend:?} instead (the KV cache passed between calls)",
                        source.display()
                    );
                    ort.cuda_graphs = None;
                    Ok(Box::new(OrtEngine::open(&source, &backend.ort(&ort))?))
                }
                Err(e) => Err(e),
            }
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
                let ort = OrtOptions {
                    allow_external: bundle.allow_external,
                    ..Default::default()
                };
                Component::Cpu(Box::new(
                    OrtEngine::open(&onnx, &backend.ort(&ort))
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

/// A float tensor for `engine`'s input `name`, converted to the input's dtype.
pub fn float_input(
    engine: &dyn Engine,
    name: &str,
    shape: &[usize],
    v: &[f32],
) -> Result<(String, HostTensor)> {
    let Some(d) = engine.inputs().iter().find(|d| d.name == name) else {
        let names: Vec<&str> = engine.inputs().iter().map(|d| d.name.as_str()).collect();
        bail!(
            "engine has no input '{name}' (inputs: {}); was it exported by another tool?",
            names.join(", ")
        );
    };
    let (shape, data) = (shape.to_vec(), v);
    let bytes = match d.dtype {
        DataType::FLOAT => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DataType::FLOAT16 => data
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DataType::BFLOAT16 => data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        other => bail!("input '{name}' is {other}; a float input was expected"),
    };
    Ok((
        name.to_string(),
        HostTensor {
            dtype: d.dtype,
            shape,
            data: bytes,
        },
    ))
}

pub fn ids_input(name: &str, shape: &[usize], ids: &[u32]) -> (String, HostTensor) {
    (
        name.to_string(),
        HostTensor {
            dtype: DataType::INT64,
            shape: shape.to_vec(),
            data: ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect(),
        },
    )
}

/// The tensors of `inputs` that `engine` takes (a ControlNet shares the denoiser's inputs it has).
pub fn inputs_taken(
    engine: &dyn Engine,
    inputs: &[(String, HostTensor)],
) -> Vec<(String, HostTensor)> {
    inputs
        .iter()
        .filter(|(name, _)| engine.inputs().iter().any(|d| &d.name == name))
        .cloned()
        .collect()
}

/// An engine output as (name, shape, f32 values).
pub type OutputF32 = (String, Vec<usize>, Vec<f32>);

/// Runs `engine` and returns every output as f32 values; `what` names the engine in errors.
pub fn run_f32(
    engine: &mut dyn Engine,
    inputs: &[(String, HostTensor)],
    what: &str,
) -> Result<Vec<OutputF32>> {
    engine
        .run(inputs)
        .context(what.to_string())?
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f32> = t
                .to_f64()
                .with_context(|| format!("{what} output '{name}' is not numeric"))?
                .into_iter()
                .map(|x| x as f32)
                .collect();
            Ok((name, t.shape, v))
        })
        .collect()
}

/// Adds each output of a run into the sum of the same name (the residuals of several ControlNet calls).
pub fn add_outputs(sums: &mut Vec<OutputF32>, out: Vec<OutputF32>) {
    for (name, shape, v) in out {
        match sums.iter_mut().find(|(n, _, _)| *n == name) {
            Some((_, _, acc)) => acc.iter_mut().zip(&v).for_each(|(a, b)| *a += b),
            None => sums.push((name, shape, v)),
        }
    }
}

/// Output `i` of a run as f32 values.
pub fn output_f32(out: &[(String, HostTensor)], name: &str) -> Result<Vec<f32>> {
    let t = out
        .iter()
        .find(|(n, _)| n == name)
        .or(out.first())
        .with_context(|| format!("engine returned no output '{name}'"))?;
    Ok(t.1
        .to_f64()
        .with_context(|| format!("output '{}' is not numeric", t.0))?
        .into_iter()
        .map(|v| v as f32)
        .collect())
}

/// How a family's sampler latents relate to its VAE's: the VAE sees `x / scale + shift`, and an encoded mean m
/// becomes `(m - shift) * scale`; `spatial` pixels per latent cell.
#[derive(Clone, Copy, Debug)]
pub struct VaeScaling {
    pub scale: f32,
    pub shift: f32,
    pub spatial: usize,
}

/// The VAE decoder on sampler latents `x` ([b, c, lh, lw] on the host, scaled by `s`) to RGB8 images.
pub fn vae_decode(
    decoder: &mut dyn Engine,
    x: &[f32],
    [b, c, lh, lw]: [usize; 4],
    s: VaeScaling,
) -> Result<Vec<Vec<u8>>> {
    let z: Vec<f32> = x.iter().map(|v| v / s.scale + s.shift).collect();
    let name = decoder.inputs()[0].name.clone();
    let input = float_input(decoder, &name, &[b, c, lh, lw], &z)?;
    let out = decoder.run(&[input]).context("VAE decoder")?;
    let img = output_f32(&out, "image")?;
    let (h, w) = (lh * s.spatial, lw * s.spatial);
    if img.len() != b * 3 * h * w {
        bail!(
            "the VAE decoder returned {} values, {} expected",
            img.len(),
            b * 3 * h * w
        );
    }
    Ok(super::image_io::to_rgb8(&img, b, h, w))
}

/// One init image ([1, 3, H, W] in [-1, 1]) through the VAE encoder: its mean (diffusers' `mode()`; an encoder
/// returning the moments [mean, logvar] gives the first half), `per` values scaled into the sampler's space.
pub fn vae_encode(
    encoder: Option<&mut Box<dyn Engine>>,
    rgb: &[f32],
    (h, w): (usize, usize),
    per: usize,
    s: VaeScaling,
) -> Result<Vec<f32>> {
    let Some(enc) = encoder else {
        bail!(
            "--init-image needs the VAE encoder, which this bundle does not have; rebuild it from a model whose \
             VAE has the encoder weights"
        );
    };
    let name = enc.inputs()[0].name.clone();
    let input = float_input(enc.as_ref(), &name, &[1, 3, h, w], rgb)?;
    let out = enc.run(&[input]).context("VAE encoder")?;
    let m = output_f32(&out, "mean")?;
    if m.len() != per && m.len() != 2 * per {
        bail!(
            "the VAE encoder returned {} values, {per} expected",
            m.len()
        );
    }
    Ok(m[..per].iter().map(|v| (v - s.shift) * s.scale).collect())
}
