//! Running TensorRT plans: the manifest is checked against the loaded TensorRT and the GPU first (with the
//! command that rebuilds a matching plan), then the plan is deserialized from a memory map. Execution contexts
//! (one per concurrent user) pick the optimization profile that fits their input shapes, bind device buffers
//! (cudarc) and run `enqueueV3` on a CUDA stream, timed with events. Static shapes can be replayed as a CUDA
//! graph; the engines of one pipeline can share one device-memory arena for their contexts (user-managed
//! context memory); weights can stream from host memory under a device budget, and refittable engines take new
//! weights from safetensors.
//! TensorRT-RTX runs on compute capability 8.0, 8.6, 8.9 and 12.x; TensorRT 11 on data-center GPUs.
use super::discovery::{Flavor, load_flavor};
use super::ffi::bridge;
use crate::backend::{DeviceTensor, Engine, HostTensor, TensorDesc, check_inputs};
use crate::manifest::{EngineFile, Manifest};
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream, DevicePtr, PinnedHostSlice, sys,
};
use std::path::Path;
use std::sync::Arc;

/// Compute capabilities TensorRT-RTX 1.x engines run on.
const RTX_RUNS_ON: &[(i32, i32)] = &[(8, 0), (8, 6), (8, 9), (12, 0), (12, 1)];

/// The first GPU, if one is usable for TensorRT here; otherwise why not.
pub fn usable_gpu() -> std::result::Result<String, String> {
    let report = crate::cuda::query()?;
    let gpu = report.gpus.first().ok_or("the driver reports no GPU")?;
    Ok(format!("{} ({})", gpu.name, gpu.sm()))
}

/// Can `plan` execute with TensorRT here: a GPU, its flavour's library, and (per the manifest) the same TensorRT
/// version and a supported compute capability? Nothing is deserialized. `Err` says why not, for `--backend auto`
/// to fall back to the CPU with that reason.
pub fn plan_runs_here(engine: &EngineFile) -> std::result::Result<String, String> {
    let plan = engine.path.as_path();
    if !engine.is_plan() {
        return Err(format!(
            "'{}' is an ONNX file or an ONNX-only bundle, not a TensorRT plan",
            plan.display()
        ));
    }
    let gpu = usable_gpu()?;
    let m = engine
        .manifest
        .as_ref()
        .ok_or_else(|| format!("'{}' has no manifest beside it", plan.display()))?;
    let flavor = m.trt().map_err(|e| format!("{e:#}"))?.flavor;
    let lib = load_flavor(flavor, None).map_err(|e| format!("{e:#}"))?;
    let report = crate::cuda::query()?;
    let cc = report
        .gpus
        .first()
        .map(|g| g.compute_capability)
        .ok_or("the driver reports no GPU")?;
    check_compatible(plan, m, &Flavor::version_string(lib.version), cc)
        .map_err(|e| format!("{e:#}"))?;
    Ok(gpu)
}

fn cc_text(cc: (i32, i32)) -> String {
    format!("{}.{}", cc.0, cc.1)
}

/// Can a plan described by `m` run on a GPU of compute capability `cc` with the library version `loaded`?
pub fn check_compatible(
    plan: &Path,
    m: &Manifest,
    loaded_version: &str,
    cc: (i32, i32),
) -> Result<()> {
    let rebuild = format!(
        "rebuild it here: trt-diff build {} --out {}",
        m.source.onnx,
        plan.display()
    );
    let t = m.trt()?;
    if t.version != loaded_version {
        bail!(
            "'{}' was built by {} {}, but the loaded library is {}: plans only load in the version that built them; {rebuild}",
            plan.display(),
            t.flavor.display(),
            t.version,
            loaded_version
        );
    }
    let sm = format!("sm{}{}", cc.0, cc.1);
    match t.flavor {
        Flavor::Rtx if !RTX_RUNS_ON.contains(&cc) => bail!(
            "'{}' is a TensorRT-RTX plan, and TensorRT-RTX does not run on this GPU (compute capability {}; it \
             supports {}). Data-center GPUs such as H100/H200/B200 need TensorRT 11: install it and {} --trt trt11",
            plan.display(),
            cc_text(cc),
            RTX_RUNS_ON
                .iter()
                .map(|c| cc_text(*c))
                .collect::<Vec<_>>()
                .join(", "),
            rebuild
        ),
        Flavor::Rtx if !t.targets.is_empty() && !t.targets.contains(&sm) => {
            bail!(
                "'{}' targets {} but this GPU is {sm}; {rebuild} --targets {sm}",
                plan.display(),
                t.targets.join(", ")
            )
        }
        _ => Ok(()),
    }
}

fn parse_dtype(s: &str) -> DataType {
    DataType::from_name(s).unwrap_or(DataType(0))
}

/// How a plan runs, beyond what the plan itself fixes.
#[derive(Clone, Debug, Default)]
pub struct TrtRunOptions {
    /// Device bytes the weights may occupy; the rest stream from host memory (engines built with
    /// `--weight-streaming`). None keeps every weight on the device.
    pub weight_budget: Option<i64>,
    /// Replay the execution as a CUDA graph while input shapes and buffers stay the same.
    pub cuda_graph: bool,
}

/// Device memory shared by the execution contexts of several engines that run one after another on one stream
/// (the components of a pipeline): sized for the largest, so VRAM holds one scratch area instead of one each.
pub struct DeviceArena {
    buf: CudaSlice<u8>,
}

impl DeviceArena {
    /// Allocates enough for every engine's context; attach it with [`TrtEngine::attach_arena`].
    pub fn for_engines(engines: &[&TrtEngine]) -> Result<Arc<DeviceArena>> {
        let Some(first) = engines.first() else {
            bail!("a device arena needs at least one engine");
        };
        let bytes = engines
            .iter()
            .map(|e| e.engine.device_memory_size().max(0) as usize)
            .max()
            .unwrap_or(0);
        let buf = first.stream.alloc_zeros::<u8>(bytes.max(256)).with_context(|| {
            format!("allocating a {bytes}-byte shared context memory arena failed (out of device memory?)")
        })?;
        Ok(Arc::new(DeviceArena { buf }))
    }
    pub fn bytes(&self) -> usize {
        self.buf.len()
    }
}

/// One optimization profile: per input, (min, opt, max) dimensions.
#[derive(Clone, Debug)]
pub struct Profile {
    pub inputs: Vec<(String, [Vec<i64>; 3])>,
}

impl Profile {
    fn admits(&self, shapes: &[(&str, &[usize])]) -> bool {
        shapes.iter().all(|(name, shape)| {
            let Some((_, [min, _, max])) = self.inputs.iter().find(|(n, _)| n == name) else {
                return true;
            };
            min.len() == shape.len()
                && shape
                    .iter()
                    .zip(min.iter().zip(max))
                    .all(|(&d, (&lo, &hi))| (lo..=hi).contains(&(d as i64)))
        })
    }
}

/// A device buffer bound to an I/O tensor, reused across runs while it is large enough.
struct Binding {
    buf: CudaSlice<u8>,
    /// Pinned host staging for asynchronous copies.
    host: PinnedHostSlice<u8>,
}

/// One execution context and what it keeps between runs.
struct ContextState {
    index: i32,
    profile: i32,
    bindings: std::collections::HashMap<String, Binding>,
    /// The shapes the captured graph was recorded with (TensorRT 11; TensorRT-RTX captures internally).
    graph: Option<(Vec<Vec<usize>>, CudaGraph)>,
    warmed: Option<Vec<Vec<usize>>>,
}

pub struct TrtEngine {
    name: String,
    backend: String,
    flavor: Flavor,
    engine: cxx::UniquePtr<bridge::RuntimeEngine>,
    cuda: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    inputs: Vec<TensorDesc>,
    outputs: Vec<TensorDesc>,
    profiles: Vec<Profile>,
    opts: TrtRunOptions,
    contexts: Vec<ContextState>,
    arena: Option<Arc<DeviceArena>>,
    events: (CudaEvent, CudaEvent),
    last_gpu_ms: Option<f32>,
    /// Keeps the mapped plan alive as long as the engine (TensorRT may reference it).
    _plan: memmap2::Mmap,
}

// SAFETY: TensorRT engines and contexts may be used from any thread as long as one context is not used by two
// threads at once; `&mut self` on every method that touches a context guarantees that.
unsafe impl Send for TrtEngine {}

fn cxx_err(what: &str, e: cxx::Exception) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", e.what())
}

impl TrtEngine {
    /// Opens a plan with default options (every weight on the device, no CUDA graph).
    pub fn open(engine: &EngineFile) -> Result<Self> {
        Self::open_with(engine, TrtRunOptions::default())
    }

    pub fn open_with(engine: &EngineFile, opts: TrtRunOptions) -> Result<Self> {
        let plan = engine.path.as_path();
        if !engine.is_plan() {
            bail!(
                "TensorRT runs .plan files and '{}' is an ONNX graph or an ONNX-only bundle; build a plan with \
                 `trt-diff build` (without --onnx-only)",
                plan.display(),
            );
        }
        engine.verify_plan_checksum()?;
        let gpu = crate::cuda::query().map_err(|e| {
            anyhow::anyhow!(
                "cannot run '{}' with TensorRT: {e}; use --backend cpu to run it on ONNX Runtime",
                plan.display()
            )
        })?;
        let Some(info) = gpu.gpus.first() else {
            bail!(
                "cannot run '{}' with TensorRT: the driver reports no GPU; use --backend cpu",
                plan.display()
            );
        };
        let manifest = engine.manifest.clone();
        let flavor = match &manifest {
            Some(m) => m.trt()?.flavor,
            None => Flavor::Rtx,
        };
        let lib = load_flavor(flavor, None)?;
        if let Some(m) = &manifest {
            check_compatible(
                plan,
                m,
                &Flavor::version_string(lib.version),
                info.compute_capability,
            )?;
            if opts.weight_budget.is_some()
                && !m.builder.as_ref().is_some_and(|b| b.weight_streaming)
            {
                bail!(
                    "'{}' was not built for weight streaming; rebuild it with trt-diff build ... --weight-streaming",
                    plan.display()
                );
            }
        } else {
            tracing::warn!(
                "'{}' has no manifest: trying {} without compatibility checks",
                plan.display(),
                flavor.display()
            );
        }
        let cuda = CudaContext::new(info.ordinal as usize).map_err(|e| {
            anyhow::anyhow!("cannot create a CUDA context on GPU {}: {e}", info.ordinal)
        })?;
        let stream = cuda.new_stream().context("cannot create a CUDA stream")?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = (
            cuda.new_event(timing)
                .context("cannot create a CUDA event")?,
            cuda.new_event(timing)
                .context("cannot create a CUDA event")?,
        );
        let file = std::fs::File::open(plan)
            .with_context(|| format!("cannot open '{}'", plan.display()))?;
        // SAFETY: read-only map of a plan file nothing else writes while we run.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        // SAFETY: the pointer and length describe the live map, which outlives the engine (kept in `_plan`).
        let mut engine = unsafe {
            bridge::runtime_open(
                flavor.key(),
                lib.create_runtime,
                lib.create_refitter,
                map.as_ptr(),
                map.len(),
            )
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "{} could not load '{}': {}",
                flavor.display(),
                plan.display(),
                e.what()
            )
        })?;
        let (mut inputs, mut outputs) = (Vec::new(), Vec::new());
        for i in 0..engine.io_count() {
            let d = TensorDesc {
                name: engine.io_name(i),
                dtype: parse_dtype(&engine.io_dtype(i)),
                shape: engine.io_dims(i),
            };
            if engine.io_is_input(i) {
                inputs.push(d)
            } else {
                outputs.push(d)
            }
        }
        let profiles = (0..engine.profile_count())
            .map(|p| Profile {
                inputs: inputs
                    .iter()
                    .filter(|d| d.shape.iter().any(|&v| v < 0))
                    .map(|d| {
                        let dims = |w| engine.profile_dims(&d.name, p, w);
                        (d.name.clone(), [dims(0), dims(1), dims(2)])
                    })
                    .collect(),
            })
            .collect();
        if let Some(budget) = opts.weight_budget {
            let streamable = engine.streamable_weights_size();
            if !engine.pin_mut().set_weight_streaming_budget(budget) {
                bail!(
                    "TensorRT refused a weight budget of {budget} bytes for '{}' ({streamable} bytes can stream)",
                    plan.display()
                );
            }
            tracing::info!(
                "weight streaming: {budget} of {streamable} streamable bytes kept on the device"
            );
        }
        Ok(TrtEngine {
            name: plan.display().to_string(),
            backend: format!(
                "{} {} on {} ({})",
                flavor.display(),
                Flavor::version_string(lib.version),
                info.name,
                info.sm()
            ),
            flavor,
            engine,
            cuda,
            stream,
            inputs,
            outputs,
            profiles,
            opts,
            contexts: Vec::new(),
            arena: None,
            events,
            last_gpu_ms: None,
            _plan: map,
        })
    }

    /// The stream every execution of this engine is enqueued on; pipelines put their own kernels on it too.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    pub fn cuda(&self) -> &Arc<CudaContext> {
        &self.cuda
    }
    pub fn profiles(&self) -> &[Profile] {
        &self.profiles
    }
    /// GPU time of the last execution (events around `enqueueV3` or the graph launch).
    pub fn last_gpu_ms(&self) -> Option<f32> {
        self.last_gpu_ms
    }
    /// Device memory one execution context needs.
    pub fn context_memory_bytes(&self) -> i64 {
        self.engine.device_memory_size()
    }

    /// Runs this engine's contexts in `arena` instead of memory of their own. Call before the first run.
    pub fn attach_arena(&mut self, arena: Arc<DeviceArena>) -> Result<()> {
        if !self.contexts.is_empty() {
            bail!(
                "'{}': attach the device arena before the first execution",
                self.name
            );
        }
        let need = self.engine.device_memory_size();
        if need > arena.bytes() as i64 {
            bail!(
                "'{}' needs {need} bytes of context memory but the arena has {}; size it with DeviceArena::for_engines over every engine that shares it",
                self.name,
                arena.bytes()
            );
        }
        self.arena = Some(arena);
        Ok(())
    }

    /// Adds an execution context (one per concurrent user of the engine) and returns its id.
    pub fn add_context(&mut self) -> Result<usize> {
        let graph = self.opts.cuda_graph && self.flavor == Flavor::Rtx;
        let user_memory = self.arena.is_some();
        let index = self
            .engine
            .pin_mut()
            .create_context(user_memory, graph)
            .map_err(|e| cxx_err(&format!("'{}'", self.name), e))?;
        if let Some(arena) = &self.arena {
            let (ptr, _sync) = arena.buf.device_ptr(&self.stream);
            self.engine
                .pin_mut()
                .set_device_memory(index, ptr, arena.bytes() as i64)
                .map_err(|e| cxx_err("binding the arena", e))?;
        }
        self.contexts.push(ContextState {
            index,
            profile: 0,
            bindings: Default::default(),
            graph: None,
            warmed: None,
        });
        Ok(self.contexts.len() - 1)
    }

    fn context(&mut self, ctx: usize) -> Result<usize> {
        while self.contexts.len() <= ctx {
            self.add_context()?;
        }
        Ok(ctx)
    }

    /// Sets input shapes on context `ctx`, switching to the first optimization profile that admits them.
    pub fn set_shapes(&mut self, ctx: usize, shapes: &[(&str, &[usize])]) -> Result<()> {
        let ctx = self.context(ctx)?;
        let index = self.contexts[ctx].index;
        if !self.profiles.is_empty() {
            let Some(p) = self.profiles.iter().position(|p| p.admits(shapes)) else {
                let wanted: Vec<String> =
                    shapes.iter().map(|(n, s)| format!("{n}={s:?}")).collect();
                bail!(
                    "'{}': no optimization profile admits {}; the plan's profiles are {:?}; rebuild with --shapes covering them",
                    self.name,
                    wanted.join(", "),
                    self.profiles
                );
            };
            if p as i32 != self.contexts[ctx].profile {
                let stream = self.stream.cu_stream() as u64;
                let ok = self
                    .engine
                    .pin_mut()
                    .set_profile(index, p as i32, stream)
                    .map_err(|e| cxx_err("selecting a profile", e))?;
                if !ok {
                    bail!("'{}': TensorRT refused optimization profile {p}", self.name);
                }
                self.contexts[ctx].profile = p as i32;
                self.contexts[ctx].graph = None;
            }
        }
        for (name, shape) in shapes {
            let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            let ok = self
                .engine
                .pin_mut()
                .set_input_shape(index, name, &dims)
                .map_err(|e| cxx_err("setting an input shape", e))?;
            if !ok {
                bail!(
                    "input '{name}': shape {shape:?} is outside the plan's optimization profile {}",
                    self.contexts[ctx].profile
                );
            }
        }
        Ok(())
    }

    /// An I/O tensor's shape in context `ctx` once the input shapes are set.
    pub fn tensor_shape(&self, ctx: usize, name: &str) -> Result<Vec<usize>> {
        let Some(c) = self.contexts.get(ctx) else {
            bail!("'{}': no execution context {ctx}", self.name);
        };
        let dims = self
            .engine
            .context_dims(c.index, name)
            .map_err(|e| cxx_err("reading a shape", e))?;
        if dims.iter().any(|&v| v < 0) {
            bail!(
                "'{}': tensor '{name}' has no concrete shape yet (set every input shape first)",
                self.name
            );
        }
        Ok(dims.iter().map(|&v| v as usize).collect())
    }

    /// Binds a device address to an I/O tensor of context `ctx` (buffers the caller owns, e.g. a sampler's
    /// latents; they must outlive the execution).
    pub fn bind(&mut self, ctx: usize, name: &str, device_ptr: u64) -> Result<()> {
        let ctx = self.context(ctx)?;
        let index = self.contexts[ctx].index;
        let ok = self
            .engine
            .pin_mut()
            .set_address(index, name, device_ptr)
            .map_err(|e| cxx_err("binding a buffer", e))?;
        if !ok {
            bail!(
                "'{}': TensorRT rejected the address bound to '{name}'",
                self.name
            );
        }
        self.contexts[ctx].graph = None;
        Ok(())
    }

    /// Enqueues one execution of context `ctx` on [`Self::stream`] (no synchronization). With
    /// `cuda_graph` on TensorRT 11, the second execution with the same shapes is captured and later ones replay it.
    pub fn enqueue(&mut self, ctx: usize, shapes_key: Vec<Vec<usize>>) -> Result<()> {
        let ctx = self.context(ctx)?;
        let index = self.contexts[ctx].index;
        let stream_ptr = self.stream.cu_stream() as u64;
        self.events
            .0
            .record(&self.stream)
            .context("recording a CUDA event failed")?;
        let capture = self.opts.cuda_graph && self.flavor == Flavor::Trt11;
        let state = &mut self.contexts[ctx];
        match &state.graph {
            Some((key, graph)) if capture && *key == shapes_key => {
                graph.launch().context("replaying the CUDA graph failed")?
            }
            _ if capture && state.warmed.as_ref() == Some(&shapes_key) => {
                // TensorRT needs one plain run per shape before capture (it allocates and tunes on the first).
                self.stream
                    .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
                    .context("starting CUDA graph capture failed")?;
                let ok = self.engine.pin_mut().enqueue(index, stream_ptr);
                let graph = self
                    .stream
                    .end_capture(sys::CUgraphInstantiate_flags(0))
                    .context("finishing CUDA graph capture failed")?;
                if !ok.map_err(|e| cxx_err("enqueueV3", e))? {
                    bail!(
                        "TensorRT's enqueueV3 failed while capturing '{}'",
                        self.name
                    );
                }
                let Some(graph) = graph else {
                    bail!("CUDA graph capture of '{}' produced no graph", self.name);
                };
                graph
                    .launch()
                    .context("launching the captured CUDA graph failed")?;
                self.contexts[ctx].graph = Some((shapes_key, graph));
            }
            _ => {
                let ok = self
                    .engine
                    .pin_mut()
                    .enqueue(index, stream_ptr)
                    .map_err(|e| cxx_err("enqueueV3", e))?;
                if !ok {
                    bail!(
                        "TensorRT's enqueueV3 failed for '{}' (see the TensorRT error above)",
                        self.name
                    );
                }
                self.contexts[ctx].warmed = Some(shapes_key);
            }
        }
        self.events
            .1
            .record(&self.stream)
            .context("recording a CUDA event failed")?;
        Ok(())
    }

    /// Waits for the stream and records the GPU time of the last execution.
    pub fn synchronize(&mut self) -> Result<()> {
        self.stream
            .synchronize()
            .context("the TensorRT execution failed on the GPU")?;
        self.last_gpu_ms = self.events.0.elapsed_ms(&self.events.1).ok();
        Ok(())
    }

    /// Names of the weights a refittable engine takes.
    pub fn refittable_weights(&mut self) -> Result<Vec<String>> {
        if !self.engine.refittable() {
            bail!(
                "'{}' was not built refittable; rebuild it with trt-diff build ... --refit",
                self.name
            );
        }
        self.engine
            .pin_mut()
            .refittable_weights()
            .map_err(|e| cxx_err(&format!("'{}'", self.name), e))
    }

    /// Replaces weights of a refittable engine with the same-named tensors of a safetensors file (F32, F16 or
    /// BF16). Every refittable weight must be present: TensorRT refits them together.
    pub fn refit_from_safetensors(&mut self, path: &Path) -> Result<usize> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open '{}'", path.display()))?;
        // SAFETY: read-only map; the file is not modified while we refit.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        let st = safetensors::SafeTensors::deserialize(&map).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not a valid safetensors file ({e}); re-export it",
                path.display()
            )
        })?;
        let names = self.refittable_weights()?;
        let mut weights = Vec::new();
        let mut missing = Vec::new();
        for name in &names {
            let Ok(t) = st.tensor(name) else {
                missing.push(name.clone());
                continue;
            };
            let (dtype, size) = match t.dtype() {
                safetensors::Dtype::F32 => ("float32", 4),
                safetensors::Dtype::F16 => ("float16", 2),
                safetensors::Dtype::BF16 => ("bfloat16", 2),
                other => bail!(
                    "'{}': tensor '{name}' is {other:?}; refit takes F32, F16 or BF16",
                    path.display()
                ),
            };
            weights.push(bridge::RefitWeight {
                name: name.clone(),
                dtype: dtype.into(),
                ptr: t.data().as_ptr() as usize,
                count: (t.data().len() / size) as i64,
            });
        }
        if !missing.is_empty() {
            bail!(
                "'{}' lacks {} of the engine's {} refittable weights (e.g. {}); TensorRT refits them together",
                path.display(),
                missing.len(),
                names.len(),
                missing
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let stream = self.stream.cu_stream() as u64;
        self.engine
            .pin_mut()
            .refit(&weights, stream)
            .map_err(|e| cxx_err(&format!("refitting '{}'", self.name), e))?;
        self.stream
            .synchronize()
            .context("refitting failed on the GPU")?;
        for c in &mut self.contexts {
            c.graph = None;
        }
        Ok(weights.len())
    }

    /// Refits the named weights with these values (the others keep theirs; TensorRT names any it needs together
    /// with them): a LoRA switched at run time on a 16-bit refittable engine.
    pub fn refit_tensors(
        &mut self,
        weights: &[crate::weights::safetensors_file::Tensor],
    ) -> Result<usize> {
        let names = self.refittable_weights()?;
        let mut refit = Vec::with_capacity(weights.len());
        for t in weights {
            if !names.contains(&t.name) {
                bail!(
                    "'{}' has no refittable weight '{}' (TensorRT may have folded it into a constant; FP8/NVFP4 \
                     layers take LoRA through the low-rank side path)",
                    self.name,
                    t.name
                );
            }
            let (dtype, size) = match t.dtype {
                crate::onnx::DataType::FLOAT => ("float32", 4),
                crate::onnx::DataType::FLOAT16 => ("float16", 2),
                crate::onnx::DataType::BFLOAT16 => ("bfloat16", 2),
                other => bail!(
                    "refit weight '{}' is {other}; refit takes F32, F16 or BF16",
                    t.name
                ),
            };
            refit.push(bridge::RefitWeight {
                name: t.name.clone(),
                dtype: dtype.into(),
                ptr: t.data.as_ptr() as usize,
                count: (t.data.len() / size) as i64,
            });
        }
        let stream = self.stream.cu_stream() as u64;
        self.engine
            .pin_mut()
            .refit(&refit, stream)
            .map_err(|e| cxx_err(&format!("refitting '{}'", self.name), e))?;
        self.stream
            .synchronize()
            .context("refitting failed on the GPU")?;
        // Captured CUDA graphs hold the old weights' kernels' arguments: capture again.
        for c in &mut self.contexts {
            c.graph = None;
        }
        Ok(refit.len())
    }

    /// A reusable device buffer (and pinned staging) for tensor `name` of context `ctx`, at least `bytes` long.
    /// Copies a host input into the engine's own buffer for it (through pinned staging) and binds that buffer.
    fn upload_input(&mut self, ctx: usize, name: &str, t: &HostTensor) -> Result<()> {
        let ptr = self.binding(ctx, name, t.data.len())?;
        self.bind(ctx, name, ptr)?;
        let ctx = self.context(ctx)?;
        let b = self.contexts[ctx]
            .bindings
            .get_mut(name)
            .context("a binding just made is missing")?;
        b.host.as_mut_slice().context("pinned staging")?[..t.data.len()].copy_from_slice(&t.data);
        let (host, dev) = (&b.host, &mut b.buf);
        crate::cuda::transfers::host_to_device(t.data.len());
        self.stream
            .memcpy_htod(host, dev)
            .context("copying an input to the GPU failed")
    }

    /// Binds the engine's own buffer for output `d` at its current shape: (shape, bytes).
    fn bind_own_output(&mut self, ctx: usize, d: &TensorDesc) -> Result<(Vec<usize>, usize)> {
        let shape = self.tensor_shape(ctx, &d.name)?;
        let bytes = d
            .dtype
            .storage_bytes(shape.iter().product::<usize>() as u64)
            .unwrap_or(0) as usize;
        let ptr = self.binding(ctx, &d.name, bytes)?;
        self.bind(ctx, &d.name, ptr)?;
        Ok((shape, bytes))
    }

    fn binding(&mut self, ctx: usize, name: &str, bytes: usize) -> Result<u64> {
        let need = bytes.max(1);
        let fits = self.contexts[ctx]
            .bindings
            .get(name)
            .is_some_and(|b| b.buf.len() >= need);
        if !fits {
            let buf = self.stream.alloc_zeros::<u8>(need).with_context(|| {
                format!(
                    "allocating {need} bytes on the GPU for '{name}' failed (out of device memory?)"
                )
            })?;
            // SAFETY: pinned host memory of plain bytes; every byte is written before it is read.
            let host = unsafe { self.cuda.alloc_pinned::<u8>(need) }.with_context(|| {
                format!("allocating {need} bytes of pinned host memory for '{name}' failed")
            })?;
            self.contexts[ctx]
                .bindings
                .insert(name.to_string(), Binding { buf, host });
            self.contexts[ctx].graph = None;
        }
        let b = &self.contexts[ctx].bindings[name];
        let (ptr, _sync) = b.buf.device_ptr(&self.stream);
        Ok(ptr)
    }
}

impl Engine for TrtEngine {
    fn set_weights(&mut self, weights: &[crate::weights::safetensors_file::Tensor]) -> Result<()> {
        let n = self.refit_tensors(weights)?;
        tracing::info!("refitted {n} weights of '{}'", self.name);
        Ok(())
    }
    fn backend(&self) -> String {
        self.backend.clone()
    }
    fn run_device(
        &mut self,
        device_inputs: &[(&str, DeviceTensor)],
        host_inputs: &[(String, HostTensor)],
        device_outputs: &[(&str, DeviceTensor)],
    ) -> Result<()> {
        const CTX: usize = 0;
        let shapes: Vec<(&str, &[usize])> = device_inputs
            .iter()
            .map(|(n, t)| (*n, t.shape.as_slice()))
            .chain(
                host_inputs
                    .iter()
                    .map(|(n, t)| (n.as_str(), t.shape.as_slice())),
            )
            .collect();
        for (name, _) in &shapes {
            if !self.inputs.iter().any(|d| d.name == *name) {
                bail!("'{}' has no input '{name}'", self.name);
            }
        }
        if shapes.len() != self.inputs.len() {
            bail!(
                "'{}' takes {} inputs, {} given",
                self.name,
                self.inputs.len(),
                shapes.len()
            );
        }
        self.set_shapes(CTX, &shapes)?;
        let key: Vec<Vec<usize>> = shapes.iter().map(|(_, s)| s.to_vec()).collect();
        // The caller's buffers by address: no staging, no copies.
        for (name, t) in device_inputs.iter().chain(device_outputs) {
            self.bind(CTX, name, t.ptr)?;
        }
        for (name, t) in host_inputs {
            self.upload_input(CTX, name, t)?;
        }
        for d in self.outputs.clone() {
            if device_outputs.iter().any(|(n, _)| *n == d.name) {
                continue;
            }
            // Outputs nobody reads still need a place.
            self.bind_own_output(CTX, &d)?;
        }
        self.enqueue(CTX, key)?;
        self.synchronize()
    }
    fn inputs(&self) -> &[TensorDesc] {
        &self.inputs
    }
    fn outputs(&self) -> &[TensorDesc] {
        &self.outputs
    }
    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        check_inputs(&self.name, &self.inputs, inputs)?;
        const CTX: usize = 0;
        let shapes: Vec<(&str, &[usize])> = inputs
            .iter()
            .map(|(n, t)| (n.as_str(), t.shape.as_slice()))
            .collect();
        self.set_shapes(CTX, &shapes)?;
        let key: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape.clone()).collect();
        for (name, t) in inputs {
            self.upload_input(CTX, name, t)?;
        }
        let mut outs = Vec::new();
        for d in self.outputs.clone() {
            let (shape, bytes) = self.bind_own_output(CTX, &d)?;
            outs.push((d, shape, bytes));
        }
        self.enqueue(CTX, key)?;
        for (d, _, bytes) in &outs {
            let b = self.contexts[CTX].bindings.get_mut(&d.name).unwrap();
            let (dev, host) = (&b.buf, &mut b.host);
            crate::cuda::transfers::device_to_host(*bytes);
            self.stream
                .memcpy_dtoh(dev, host)
                .context("copying an output from the GPU failed")?;
        }
        self.synchronize()?;
        outs.into_iter()
            .map(|(d, shape, bytes)| {
                let b = &self.contexts[CTX].bindings[&d.name];
                let data = b.host.as_slice().context("pinned staging")?[..bytes].to_vec();
                Ok((
                    d.name.clone(),
                    HostTensor {
                        dtype: d.dtype,
                        shape,
                        data,
                    },
                ))
            })
            .collect()
    }
}
