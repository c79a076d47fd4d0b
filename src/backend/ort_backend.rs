//! ONNX Runtime (loaded at run time) running the same ONNX graphs TensorRT builds: on the CPU (the embedded default
//! backend) or, with `OrtDevice::Cuda`, through its CUDA execution provider (onnxruntime-gpu), the GPU executor for
//! GPUs without a usable TensorRT. NVFP4/INT4 graphs go through the CPU pass first; graphs with FP8 Q/DQ run
//! without ORT's graph optimizations, which change their numerics (ORT 1.32 fuses Relu into an FP8 QuantizeLinear,
//! correct only for uint8).
use super::{DeviceTensor, Engine, HostTensor, TensorDesc, check_inputs};
use crate::onnx::cpu_pass::{CpuPassOptions, apply};
use crate::onnx::summary::OnnxSummary;
use crate::onnx::{DataType, OnnxFile, SaveOptions, save};
use anyhow::{Context, Result, bail};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where ONNX Runtime executes a graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OrtDevice {
    #[default]
    Cpu,
    /// The CUDA execution provider on this GPU ordinal.
    Cuda(i32),
}

#[derive(Clone, Debug, Default)]
pub struct OrtOptions {
    /// Intra-op threads; 0 lets ONNX Runtime choose.
    pub threads: usize,
    /// None: all optimizations, or none for graphs with FP8 Q/DQ.
    pub optimization: Option<GraphOptimizationLevel>,
    pub device: OrtDevice,
    /// Initializers whose values replace the file's (weights with a LoRA merged in), by name.
    pub weights: WeightOverrides,
    /// CUDA provider: replay calls that repeat the previous call's shapes as CUDA graphs (`cuda_graphs`); the
    /// inputs ONNX Runtime reads on the host. Needs the cache kept in place (`Engine::hold_in_place`).
    pub cuda_graphs: Option<Vec<String>>,
    /// External data may live outside the graph's folder (`--allow-external-paths`, or a model-cache entry whose
    /// links lead only to the model file the user named).
    pub allow_external: bool,
}

/// Weights that replace a graph's own initializers of the same name, shape and element type.
#[derive(Clone, Default)]
pub struct WeightOverrides(pub std::sync::Arc<std::collections::BTreeMap<String, WeightTensor>>);

impl std::fmt::Debug for WeightOverrides {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightOverrides({} tensors)", self.0.len())
    }
}

/// An initializer's replacement ([`crate::weights::safetensors_file::Tensor`]).
pub type WeightTensor = crate::weights::safetensors_file::Tensor;

/// An output that feeds an input of the next run without leaving the engine's memory (a KV cache on the GPU).
struct Chained {
    input: String,
    output: String,
    /// The last run's output; None before the first run (the input is then `empty`).
    value: Option<DynValue>,
    empty: DynValue,
}

pub struct OrtEngine {
    name: String,
    /// The graph file and options it was opened with (`set_weights` re-opens it).
    path: PathBuf,
    opts: OrtOptions,
    session: Session,
    /// Inputs and outputs go through an IO binding; outputs are bound to ONNX Runtime's CPU allocator before
    /// each run (shapes may change between runs, so earlier outputs cannot be reused).
    binding: ort::session::IoBinding,
    cpu: ort::memory::MemoryInfo<'static>,
    inputs: Vec<TensorDesc>,
    outputs: Vec<TensorDesc>,
    /// Buffers bound as both an input and an output (`Engine::hold_in_place`).
    held: Vec<(String, String, Held)>,
    /// CUDA graphs of repeated calls (`OrtOptions::cuda_graphs`, CUDA provider only).
    graphs: Option<super::cuda_graphs::CudaGraphs>,
    /// Rows (axis 0) of the held buffers that runs bind (`Engine::hold_rows`); None: the whole buffers.
    held_rows: Option<std::ops::Range<usize>>,
    /// Outputs handed to the next run's inputs (`Engine::chain`), kept where the device put them.
    chained: Vec<Chained>,
    /// Where chained outputs live: the CUDA device's memory, or the CPU's.
    device_memory: ort::memory::MemoryInfo<'static>,
    device: OrtDevice,
    /// The inputs a run takes (all but the held ones) and, per output, whether it is held; set with `held`.
    free_inputs: Vec<TensorDesc>,
    output_held: Vec<bool>,
    /// Holds the CPU-pass rewrite of the model while the session lives.
    _rewritten: Option<tempfile::TempDir>,
    /// ONNX Runtime profiles this session (`TRT_DIFF_ORT_PROFILE`): the trace is finished when it closes.
    profiling: bool,
}

impl Drop for OrtEngine {
    fn drop(&mut self) {
        if self.profiling {
            match self.session.end_profiling() {
                Ok(file) => tracing::info!("ONNX Runtime profile of '{}': {file}", self.name),
                Err(e) => {
                    tracing::warn!("ONNX Runtime profile of '{}' not written: {e}", self.name)
                }
            }
        }
    }
}

/// The process-wide ONNX Runtime environment (ONNX Runtime allows one per process).
pub fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> =
        OnceLock::new();
    let env = ENV.get_or_init(|| {
        let lib = super::ort_lib::find().map_err(|e| format!("{e:#}"))?;
        ort::init_from(&lib.path)
            .map_err(|e| format!("cannot load ONNX Runtime '{}': {e}", lib.path.display()))?
            .with_name("trt-diff")
            .build()
            .map_err(|e| format!("ONNX Runtime failed to start: {e}"))
    });
    env.as_ref().map_err(|e| anyhow::anyhow!(e.clone()))
}

fn to_dtype(t: TensorElementType) -> DataType {
    match t {
        TensorElementType::Float32 => DataType::FLOAT,
        TensorElementType::Float16 => DataType::FLOAT16,
        TensorElementType::Bfloat16 => DataType::BFLOAT16,
        TensorElementType::Float64 => DataType(11),
        TensorElementType::Int64 => DataType::INT64,
        TensorElementType::Int32 => DataType::INT32,
        TensorElementType::Int16 => DataType(5),
        TensorElementType::Int8 => DataType::INT8,
        TensorElementType::Uint8 => DataType::UINT8,
        TensorElementType::Uint16 => DataType(4),
        TensorElementType::Bool => DataType::BOOL,
        _ => DataType(0),
    }
}

fn desc(name: &str, ty: &ValueType) -> TensorDesc {
    match ty {
        ValueType::Tensor { ty, shape, .. } => TensorDesc {
            name: name.into(),
            dtype: to_dtype(*ty),
            shape: shape.iter().copied().collect(),
        },
        _ => TensorDesc {
            name: name.into(),
            dtype: DataType(0),
            shape: vec![],
        },
    }
}

/// Does the model need the CPU pass before ONNX Runtime runs it (TensorRT's own ops, FP4 or INT4 weights)?
fn needs_cpu_pass(s: &OnnxSummary) -> bool {
    s.op_histogram.keys().any(|k| k.starts_with("trt::"))
        || ["float4e2m1", "int4", "uint4", "float8e8m0"]
            .iter()
            .any(|t| s.initializers.contains_key(*t))
}

/// Does the model use trt-diff's own operators (`ort_ops`)?
fn uses_own_ops(s: &OnnxSummary) -> bool {
    let prefix = format!("{}::", super::ort_ops::DOMAIN);
    s.op_histogram.keys().any(|k| k.starts_with(&prefix))
}

/// The graph fusions the CUDA path makes: all by default; `TRT_DIFF_CUDA_FUSION` lists some of `attention`,
/// `gelu` and `rmsnorm` (comma-separated), or `none`, to compare.
fn cuda_fusions() -> Vec<String> {
    const ALL: [&str; 3] = ["attention", "gelu", "rmsnorm"];
    match std::env::var("TRT_DIFF_CUDA_FUSION") {
        Err(_) => ALL.map(String::from).to_vec(),
        Ok(v) => {
            let wanted: Vec<String> = v.split(',').map(|s| s.trim().to_string()).collect();
            for w in &wanted {
                if w != "none" && !ALL.contains(&w.as_str()) {
                    tracing::warn!(
                        "TRT_DIFF_CUDA_FUSION: '{w}' is not one of none, {}",
                        ALL.join(", ")
                    );
                }
            }
            wanted
        }
    }
}

/// Makes the fusions `which` (of `cuda_fusions`) in `model`; returns what was fused, for the log ("" when nothing).
fn fuse_for_cuda(model: &mut crate::onnx::proto::ModelProto, which: &[String]) -> Result<String> {
    use crate::onnx::{attention_fusion, elementwise_fusion};
    let mut done = Vec::new();
    for f in which {
        let n = match f.as_str() {
            "attention" => attention_fusion::fuse_attention(model)?,
            "gelu" => elementwise_fusion::fuse_gelu(model),
            "rmsnorm" => elementwise_fusion::fuse_rms_norm(model),
            _ => 0,
        };
        if n > 0 {
            done.push(format!("{n} {f}"));
        }
    }
    Ok(done.join(", "))
}

fn has_fp8_qdq(s: &OnnxSummary) -> bool {
    s.qdq.iter().any(|q| q.format.starts_with("float8"))
}

impl OrtEngine {
    /// Recomputes what runs take and return after `held` changed.
    fn refresh_held(&mut self) {
        let held_in = |n: &str| {
            self.held.iter().any(|h| h.0 == n) || self.chained.iter().any(|c| c.input == n)
        };
        self.free_inputs = self
            .inputs
            .iter()
            .filter(|d| !held_in(&d.name))
            .cloned()
            .collect();
        self.output_held = self
            .outputs
            .iter()
            .map(|d| {
                self.held.iter().any(|h| h.1 == d.name)
                    || self.chained.iter().any(|c| c.output == d.name)
            })
            .collect();
    }

    pub fn open(path: &Path, opts: &OrtOptions) -> Result<Self> {
        let load = crate::onnx::model::LoadOptions {
            allow_external: opts.allow_external,
            ..Default::default()
        };
        let onnx = OnnxFile::load_with(path, &load)?;
        let summary = OnnxSummary::of(&onnx);
        let mut model_path: PathBuf = path.to_path_buf();
        let mut rewritten = None;
        // ONNX Runtime's CPU provider has no bf16 kernels: a 16-bit graph computes in f32 there (our own
        // operators take 16-bit weights themselves).
        let widen = opts.device == OrtDevice::Cpu
            && !uses_own_ops(&summary)
            && crate::onnx::cpu_pass::computes_in_16bit(&onnx.model);
        let cpu_pass = needs_cpu_pass(&summary);
        if cpu_pass || widen {
            let mut model = if cpu_pass {
                // The CUDA provider reads INT4 weights of MatMuls as they are (MatMulNBits).
                let pass = CpuPassOptions {
                    keep_int4: opts.device != OrtDevice::Cpu,
                    ..Default::default()
                };
                let (model, report) = apply(&onnx, pass)?;
                tracing::info!(
                    "'{}': CPU pass folded {} dequantize nodes and emulated {} FP4 activation quantizers for ONNX \
                     Runtime",
                    path.display(),
                    report.folded,
                    report.emulated_fp4_activations
                );
                model
            } else {
                onnx.model.clone()
            };
            if widen {
                let n = crate::onnx::cpu_pass::widen_16bit(&onnx, &mut model)?;
                tracing::info!(
                    "'{}': 16-bit graph widened to f32 for ONNX Runtime's CPU provider ({n} weights, same values)",
                    path.display()
                );
            }
            let dir = tempfile::Builder::new().prefix("trt-diff-cpu-").tempdir()?;
            model_path = dir.path().join("model.onnx");
            save(model, &model_path, &SaveOptions::default())?;
            rewritten = Some(dir);
        }
        let level = opts.optimization.unwrap_or_else(|| {
            if has_fp8_qdq(&summary) {
                tracing::debug!(
                    "FP8 Q/DQ present: ONNX Runtime graph optimizations disabled to keep numerics"
                );
                GraphOptimizationLevel::Disable
            } else {
                GraphOptimizationLevel::All
            }
        });
        let env = environment()?;
        let err = |e: &dyn std::fmt::Display| {
            anyhow::anyhow!("ONNX Runtime cannot load '{}': {e}", path.display())
        };
        let mut builder = Session::builder(env).map_err(|e| err(&e))?;
        builder = builder
            .with_optimization_level(level)
            .map_err(|e| err(&e))?
            // Weight-only INT4/INT8 graphs (`--precision gguf`, int4) compute in f32 as TensorRT runs them: ONNX
            // Runtime's fusion into MatMulNBits would otherwise quantize the activations to int8 per block.
            .with_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
            .map_err(|e| err(&e))?;
        let own_ops = uses_own_ops(&summary);
        if own_ops {
            // Our operators run on their own threads (`spin_pool`); ONNX Runtime's spinning workers would compete.
            builder = builder.with_intra_op_spinning(false).map_err(|e| err(&e))?;
            // trt-diff's own operators (16-bit-weight MatMul), only for the graphs made for the CPU that use them.
            builder = builder
                .with_operators(super::ort_ops::domain().map_err(|e| err(&e))?)
                .map_err(|e| err(&e))?;
        }
        // ONNX Runtime's own per-node timings (a JSON trace per session, written when it closes), to see where a
        // graph spends its time: TRT_DIFF_ORT_PROFILE=DIR.
        let profile_dir = std::env::var_os("TRT_DIFF_ORT_PROFILE").filter(|d| !d.is_empty());
        if let Some(dir) = &profile_dir {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            builder = builder
                .with_profiling(Path::new(dir).join(stem.as_ref()))
                .map_err(|e| err(&e))?;
        }
        if opts.threads > 0 {
            builder = builder
                .with_intra_threads(opts.threads)
                .map_err(|e| err(&e))?;
        }
        if let OrtDevice::Cuda(id) = opts.device {
            // TF32 off: f32 graphs give the CPU backend's results within f32 round-off.
            let cuda = ort::ep::CUDA::default()
                .with_device_id(id)
                .with_tf32(false)
                .with_cuda_graph(opts.cuda_graphs.is_some())
                .build()
                .error_on_failure();
            builder = builder.with_execution_providers([cuda]).map_err(|e| {
                anyhow::anyhow!(
                    "ONNX Runtime's CUDA execution provider could not start for '{}': {e}. It needs the \
                     onnxruntime-gpu build (CUDA 13) as ORT_DYLIB_PATH and cuBLAS, cuRAND, cudart 13 and cuDNN 9 on \
                     LD_LIBRARY_PATH (`bash scripts/setup.sh --gpu`); or use --backend cpu",
                    path.display()
                )
            })?;
        }
        // ONNX Runtime registers a custom domain's schemas in shared state: two sessions loading it at once fail
        // with "domain already exist", so sessions with our operators are created one at a time.
        static OWN_OPS_LOAD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _serial = own_ops.then(|| OWN_OPS_LOAD.lock().unwrap_or_else(|e| e.into_inner()));
        // Replaced weights: external initializers are injected into the graph before its optimizations
        // (AddExternalInitializers); inline ones are patched into an in-memory copy of the model, since ONNX
        // Runtime's session initializers would be bypassed by constant folding (a Cast or Transpose of the weight
        // folded from the file's value).
        let mut patched: Option<crate::onnx::proto::ModelProto> = None;
        if !opts.weights.0.is_empty() {
            let loaded;
            let target = if rewritten.is_some() {
                loaded = OnnxFile::load(&model_path)?;
                &loaded
            } else {
                &onnx
            };
            for (name, t) in opts.weights.0.iter() {
                let Some(init) = target
                    .model
                    .graph
                    .iter()
                    .flat_map(|g| &g.initializer)
                    .find(|i| &i.name == name)
                else {
                    bail!(
                        "'{}' has no weight '{name}' to replace; the engine was built from another model",
                        path.display()
                    );
                };
                let dims: Vec<usize> = init.dims.iter().map(|&d| d as usize).collect();
                // A 16-bit graph widened for the CPU takes its 16-bit replacements widened too.
                let widened;
                let t = if widen
                    && DataType(init.data_type) == DataType::FLOAT
                    && matches!(t.dtype, DataType::BFLOAT16 | DataType::FLOAT16)
                {
                    let values = crate::onnx::dequantize::to_f32(
                        t.dtype,
                        &t.data,
                        t.shape.iter().product(),
                    )?;
                    widened = WeightTensor {
                        name: t.name.clone(),
                        dtype: DataType::FLOAT,
                        shape: t.shape.clone(),
                        data: values
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>()
                            .into(),
                        quant: None,
                    };
                    &widened
                } else {
                    t
                };
                if dims != t.shape || DataType(init.data_type) != t.dtype {
                    bail!(
                        "'{}': weight '{name}' is {} {dims:?}; its replacement is {} {:?}",
                        path.display(),
                        DataType(init.data_type),
                        t.dtype,
                        t.shape
                    );
                }
                if crate::onnx::model::external_ref(init).is_some() {
                    let value = to_value(
                        name,
                        &HostTensor {
                            dtype: t.dtype,
                            shape: t.shape.clone(),
                            data: t.data.to_vec(),
                        },
                    )?;
                    builder = builder
                        .with_external_initializer(name, value)
                        .map_err(|e| err(&e))?;
                } else {
                    let model = patched.get_or_insert_with(|| target.model.clone());
                    if let Some(i) = model
                        .graph
                        .iter_mut()
                        .flat_map(|g| g.initializer.iter_mut())
                        .find(|i| &i.name == name)
                    {
                        i.raw_data = t.data.clone();
                        i.float_data.clear();
                    }
                }
            }
        }
        // On the GPU, attention runs as ONNX Runtime's fused MultiHeadAttention (flash / memory-efficient kernels)
        // rather than as the exported MatMul-Softmax-MatMul pattern, GELU and RMSNorm as one operator each
        // (`fuse_for_cuda`). Should ONNX Runtime refuse a fused operator for this graph's types: the graph with
        // its attention fused alone, then as it was (None: the file).
        let mut fallbacks: Vec<Option<crate::onnx::proto::ModelProto>> = Vec::new();
        if matches!(opts.device, OrtDevice::Cuda(_)) {
            let was_patched = patched.is_some();
            let original = match patched.take() {
                Some(model) => model,
                None if rewritten.is_some() => OnnxFile::load(&model_path)?.model,
                None => onnx.model.clone(),
            };
            // Cheap: weights are external or reference-counted bytes.
            let mut model = original.clone();
            let which = cuda_fusions();
            let fused = fuse_for_cuda(&mut model, &which)?;
            if !fused.is_empty() {
                tracing::debug!("'{}': fused for ONNX Runtime CUDA: {fused}", path.display());
                let attention = ["attention".to_string()];
                if which.iter().any(|f| f != "attention") && which.contains(&attention[0]) {
                    let mut only = original.clone();
                    if !fuse_for_cuda(&mut only, &attention)?.is_empty() {
                        fallbacks.push(Some(only));
                    }
                }
                fallbacks.push(was_patched.then_some(original));
                patched = Some(model);
            } else if was_patched {
                patched = Some(original);
            }
        }
        let opening = std::time::Instant::now();
        tracing::debug!("opening '{}' on {:?}", path.display(), opts.device);
        let commit = |mut builder: ort::session::builder::SessionBuilder,
                      model: Option<&crate::onnx::proto::ModelProto>|
         -> Result<Session> {
            match model {
                None => builder.commit_from_file(&model_path).map_err(|e| err(&e)),
                Some(model) => {
                    let dir = model_path.parent().unwrap_or(Path::new("."));
                    builder = builder
                        .with_config_entry(
                            "session.model_external_initializers_file_folder_path",
                            dir.to_string_lossy(),
                        )
                        .map_err(|e| err(&e))?;
                    builder
                        .commit_from_memory(&prost::Message::encode_to_vec(model))
                        .map_err(|e| err(&e))
                }
            }
        };
        let mut session = commit(builder.clone(), patched.as_ref());
        for fallback in fallbacks {
            let Err(e) = &session else { break };
            tracing::warn!(
                "'{}': ONNX Runtime could not open the fused graph ({e:#}); trying {}",
                path.display(),
                if fallback
                    .as_ref()
                    .is_some_and(|m| m.opset_import.iter().any(|o| o.domain == "com.microsoft"))
                {
                    "with the attention fused alone"
                } else {
                    "the exported graph"
                }
            );
            session = commit(builder.clone(), fallback.as_ref());
        }
        let session = session?;
        tracing::debug!(
            "opened '{}' in {:.2}s",
            path.display(),
            opening.elapsed().as_secs_f64()
        );
        let inputs: Vec<TensorDesc> = session
            .inputs()
            .iter()
            .map(|o| desc(o.name(), o.dtype()))
            .collect();
        let outputs: Vec<TensorDesc> = session
            .outputs()
            .iter()
            .map(|o| desc(o.name(), o.dtype()))
            .collect();
        let binding = session.create_binding().map_err(|e| err(&e))?;
        let memory = |device, id| {
            ort::memory::MemoryInfo::new(
                device,
                id,
                ort::memory::AllocatorType::Device,
                ort::memory::MemoryType::Default,
            )
            .map_err(|e| err(&e))
        };
        let cpu = memory(ort::memory::AllocationDevice::CPU, 0)?;
        let device_memory = match opts.device {
            OrtDevice::Cpu => cpu.clone(),
            OrtDevice::Cuda(id) => memory(ort::memory::AllocationDevice::CUDA, id)?,
        };
        Ok(OrtEngine {
            name: path.display().to_string(),
            path: path.to_path_buf(),
            opts: opts.clone(),
            session,
            binding,
            cpu,
            free_inputs: inputs.clone(),
            output_held: vec![false; outputs.len()],
            inputs,
            outputs,
            held: Vec::new(),
            held_rows: None,
            graphs: match (&opts.cuda_graphs, opts.device) {
                (Some(host), OrtDevice::Cuda(id)) => Some(super::cuda_graphs::CudaGraphs::new(
                    crate::cuda::device::Device::open(id as usize)?,
                    host.clone(),
                )),
                _ => None,
            },
            chained: Vec::new(),
            device_memory,
            device: opts.device,
            _rewritten: rewritten,
            profiling: profile_dir.is_some(),
        })
    }
}

/// A buffer an engine keeps between runs, bound as both an input and an output (a KV cache written in place).
enum Held {
    /// f32 in host memory (the CPU provider).
    Host(Tensor<f32>),
    /// `dtype` elements on the GPU (the CUDA provider), bound by address: zeroed once, never copied to the host.
    Device {
        data: cudarc::driver::CudaSlice<u8>,
        dev: std::sync::Arc<crate::cuda::device::Device>,
        dtype: DataType,
        shape: Vec<usize>,
    },
}

impl Held {
    fn shape(&self) -> Vec<usize> {
        match self {
            Held::Host(t) => t.shape().iter().map(|&d| d as usize).collect(),
            Held::Device { shape, .. } => shape.clone(),
        }
    }
}

fn to_value(name: &str, t: &HostTensor) -> Result<DynValue> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    macro_rules! typed {
        ($ty:ty, $n:expr, $conv:expr) => {{
            let v: Vec<$ty> = t.data.chunks_exact($n).map($conv).collect();
            Tensor::from_array((shape, v)).map(|t| t.into_dyn())
        }};
    }
    let v = match t.dtype {
        // f32 (KV caches: megabytes per decode step) as one copy on little-endian hosts.
        #[cfg(target_endian = "little")]
        DataType::FLOAT => {
            let n = t.data.len() / 4;
            let mut v = vec![0f32; n];
            bytemuck::cast_slice_mut::<f32, u8>(&mut v).copy_from_slice(&t.data[..n * 4]);
            Tensor::from_array((shape, v)).map(|t| t.into_dyn())
        }
        #[cfg(not(target_endian = "little"))]
        DataType::FLOAT => typed!(f32, 4, |b| f32::from_le_bytes(b.try_into().unwrap())),
        DataType::FLOAT16 => typed!(half::f16, 2, |b| half::f16::from_le_bytes([b[0], b[1]])),
        DataType::BFLOAT16 => typed!(half::bf16, 2, |b| half::bf16::from_le_bytes([b[0], b[1]])),
        DataType(11) => typed!(f64, 8, |b| f64::from_le_bytes(b.try_into().unwrap())),
        DataType::INT64 => typed!(i64, 8, |b| i64::from_le_bytes(b.try_into().unwrap())),
        DataType::INT32 => typed!(i32, 4, |b| i32::from_le_bytes(b.try_into().unwrap())),
        DataType::INT8 => typed!(i8, 1, |b| b[0] as i8),
        DataType::UINT8 => typed!(u8, 1, |b| b[0]),
        DataType::BOOL => typed!(bool, 1, |b| b[0] != 0),
        other => bail!("input '{name}': {other} tensors are not supported by the CPU backend"),
    };
    v.map_err(|e| anyhow::anyhow!("input '{name}': {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bind {
    Input,
    Output,
}

/// Binds a value wrapping caller-owned memory, through ONNX Runtime's C API. The ort crate binds only values it
/// allocated as outputs, and copies borrowed inputs before binding them (on CUDA through an identity session
/// whose own set-up clones a value again and deadlocks on ort's session lock); ONNX Runtime itself takes any
/// tensor by address.
fn bind_raw(
    binding: &mut ort::session::IoBinding,
    which: Bind,
    name: &str,
    value: &ort::value::ValueRefMut<'_, ort::value::DynValueTypeMarker>,
) -> Result<()> {
    use ort::AsPointer;
    let cname = std::ffi::CString::new(name)?;
    let api = ort::api();
    // SAFETY: both pointers come from live ort objects; ONNX Runtime copies what it keeps of the name and keeps
    // a reference to the value, whose memory the caller keeps alive until the run ends.
    let status = unsafe {
        match which {
            Bind::Input => (api.BindInput)(binding.ptr_mut(), cname.as_ptr(), value.ptr()),
            Bind::Output => (api.BindOutput)(binding.ptr_mut(), cname.as_ptr(), value.ptr()),
        }
    };
    if status.0.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null status is an error status owned by us; its message is a C string.
    let msg = unsafe {
        let m = std::ffi::CStr::from_ptr((api.GetErrorMessage)(status.0))
            .to_string_lossy()
            .into_owned();
        (api.ReleaseStatus)(status.0);
        m
    };
    let kind = if which == Bind::Input {
        "input"
    } else {
        "output"
    };
    bail!("{kind} '{name}': {msg}")
}

/// A device buffer wrapped as an ONNX Runtime value by address (no copy).
fn device_value<'a>(
    memory: &ort::memory::MemoryInfo<'static>,
    name: &str,
    t: &DeviceTensor,
) -> Result<ort::value::ValueRefMut<'a, ort::value::DynValueTypeMarker>> {
    let shape: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
    let ptr = t.ptr as *mut std::ffi::c_void;
    macro_rules! wrap {
        ($ty:ty) => {{
            // SAFETY: the caller's buffer holds `shape` elements of this type on this device and outlives the run.
            unsafe { ort::value::TensorRefMut::<$ty>::from_raw(memory.clone(), ptr.cast(), shape.into()) }
                .map(|v| v.into_dyn())
        }};
    }
    let v = match t.dtype {
        DataType::FLOAT => wrap!(f32),
        DataType::FLOAT16 => wrap!(half::f16),
        DataType::BFLOAT16 => wrap!(half::bf16),
        DataType::INT64 => wrap!(i64),
        DataType::INT32 => wrap!(i32),
        other => bail!("'{name}': {other} device buffers are not supported"),
    };
    v.map_err(|e| anyhow::anyhow!("'{name}': {e}"))
}

fn from_value(name: &str, v: &DynValue) -> Result<HostTensor> {
    macro_rules! typed {
        ($ty:ty, $dt:expr, $bytes:expr) => {{
            let (shape, data) = v
                .try_extract_tensor::<$ty>()
                .map_err(|e| anyhow::anyhow!("output '{name}': {e}"))?;
            HostTensor {
                dtype: $dt,
                shape: shape.iter().map(|&d| d as usize).collect(),
                data: data.iter().flat_map($bytes).collect(),
            }
        }};
    }
    let ty = match v.dtype() {
        ValueType::Tensor { ty, .. } => *ty,
        other => bail!("output '{name}' is {other:?}, not a tensor"),
    };
    Ok(match ty {
        #[cfg(target_endian = "little")]
        TensorElementType::Float32 => {
            let (shape, data) = v
                .try_extract_tensor::<f32>()
                .map_err(|e| anyhow::anyhow!("output '{name}': {e}"))?;
            HostTensor {
                dtype: DataType::FLOAT,
                shape: shape.iter().map(|&d| d as usize).collect(),
                data: bytemuck::cast_slice::<f32, u8>(data).to_vec(),
            }
        }
        #[cfg(not(target_endian = "little"))]
        TensorElementType::Float32 => typed!(f32, DataType::FLOAT, |x: &f32| x.to_le_bytes()),
        TensorElementType::Float16 => typed!(half::f16, DataType::FLOAT16, |x: &half::f16| x
            .to_le_bytes()),
        TensorElementType::Bfloat16 => typed!(half::bf16, DataType::BFLOAT16, |x: &half::bf16| x
            .to_le_bytes()),
        TensorElementType::Float64 => typed!(f64, DataType(11), |x: &f64| x.to_le_bytes()),
        TensorElementType::Int64 => typed!(i64, DataType::INT64, |x: &i64| x.to_le_bytes()),
        TensorElementType::Int32 => typed!(i32, DataType::INT32, |x: &i32| x.to_le_bytes()),
        TensorElementType::Int8 => typed!(i8, DataType::INT8, |x: &i8| x.to_le_bytes()),
        TensorElementType::Uint8 => typed!(u8, DataType::UINT8, |x: &u8| x.to_le_bytes()),
        TensorElementType::Bool => typed!(bool, DataType::BOOL, |x: &bool| [*x as u8]),
        other => bail!("output '{name}': {other:?} tensors are not supported by the CPU backend"),
    })
}

impl Engine for OrtEngine {
    fn set_weights(&mut self, weights: &[WeightTensor]) -> Result<()> {
        if !self.held.is_empty() || !self.chained.is_empty() {
            bail!(
                "'{}' keeps tensors between runs (a KV cache); its weights cannot be replaced",
                self.name
            );
        }
        let mut opts = self.opts.clone();
        let mut map = (*opts.weights.0).clone();
        for t in weights {
            map.insert(t.name.clone(), t.clone());
        }
        opts.weights = WeightOverrides(std::sync::Arc::new(map));
        *self = OrtEngine::open(&self.path, &opts)?;
        Ok(())
    }
    fn backend(&self) -> String {
        match self.device {
            OrtDevice::Cpu => "ONNX Runtime (CPU)".into(),
            OrtDevice::Cuda(id) => format!("ONNX Runtime (CUDA, GPU {id})"),
        }
    }
    fn inputs(&self) -> &[TensorDesc] {
        &self.inputs
    }
    fn outputs(&self) -> &[TensorDesc] {
        &self.outputs
    }
    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        use super::cuda_graphs::{GRAPH_ID, NO_GRAPH};
        check_inputs(&self.name, &self.free_inputs, inputs)?;
        // A session with CUDA graphs enabled names a graph in every run (-1: none); graphs need every buffer that
        // persists between runs at a fixed device address.
        let all_device =
            self.chained.is_empty() && self.held.iter().all(|h| matches!(h.2, Held::Device { .. }));
        let sig = self
            .graphs
            .as_ref()
            .map(|g| g.ids.signature(inputs, self.held_rows.clone()));
        let graph_id = match (&mut self.graphs, &sig) {
            (Some(g), Some(sig)) if all_device => Some(g.slot_for(sig)?),
            (Some(_), _) => Some(NO_GRAPH),
            _ => None,
        };
        let slot_id = graph_id.filter(|&id| id > 0);
        if let (Some(id), Some(g)) = (slot_id, &mut self.graphs) {
            g.upload(id, inputs)?;
        }
        self.binding.clear();
        let mut views = Vec::new();
        for (o, _) in self
            .outputs
            .iter()
            .zip(&self.output_held)
            .filter(|(_, h)| !**h)
        {
            if let (Some(id), Some(g)) = (slot_id, &self.graphs) {
                let f = g
                    .slot(id)
                    .and_then(|s| s.outputs.iter().find(|f| f.name == o.name))
                    .with_context(|| format!("output '{}' has no CUDA graph buffer", o.name))?;
                let v = device_value(&self.device_memory, &o.name, &f.tensor(&g.dev))?;
                bind_raw(&mut self.binding, Bind::Output, &o.name, &v)?;
                views.push(v);
                continue;
            }
            self.binding
                .bind_output_to_device(o.name.as_str(), &self.cpu)
                .map_err(|e| anyhow::anyhow!("output '{}': {e}", o.name))?;
        }
        // Views of some rows of the held buffers, wrapped by address; they must live until the run ends.
        for (input, output, held) in &mut self.held {
            let t = match held {
                Held::Host(t) => t,
                Held::Device {
                    data,
                    dev,
                    dtype,
                    shape,
                } => {
                    use cudarc::driver::DevicePtr;
                    let mut shape = shape.clone();
                    let per_row: usize = shape[1..].iter().product();
                    let elem = dtype.bits().unwrap_or(32) as usize / 8;
                    let (base, _sync) = data.device_ptr(&dev.stream);
                    let rows = self.held_rows.clone().unwrap_or(0..shape[0]);
                    shape[0] = rows.len();
                    let view = DeviceTensor {
                        ptr: base + (rows.start * per_row * elem) as u64,
                        dtype: *dtype,
                        shape,
                    };
                    // The graph reads the cache and writes the new positions through the same address.
                    let vi = device_value(&self.device_memory, input, &view)?;
                    let vo = device_value(&self.device_memory, output, &view)?;
                    bind_raw(&mut self.binding, Bind::Input, input, &vi)?;
                    bind_raw(&mut self.binding, Bind::Output, output, &vo)?;
                    views.push(vi);
                    views.push(vo);
                    continue;
                }
            };
            // One buffer both ways: the graph reads the cache and writes the new positions in place.
            if let Some(rows) = &self.held_rows {
                let mut shape: Vec<i64> = t.shape().to_vec();
                let per_row: usize = shape[1..].iter().map(|&d| d as usize).product();
                let data = t.extract_tensor_mut().1;
                if shape.is_empty() || rows.end > shape[0] as usize || rows.is_empty() {
                    bail!(
                        "rows {rows:?} of '{input}' {shape:?} do not exist in '{}'",
                        self.name
                    );
                }
                shape[0] = rows.len() as i64;
                let ptr = data[rows.start * per_row..].as_mut_ptr();
                let view = || {
                    // SAFETY: the view covers rows `rows` of `t`, which `self.held` keeps alive past the run, and
                    // nothing else touches `t` during the run.
                    unsafe {
                        ort::value::TensorRefMut::<f32>::from_raw(
                            self.cpu.clone(),
                            ptr.cast(),
                            shape.clone().into(),
                        )
                    }
                    .map_err(|e| anyhow::anyhow!("input '{input}': {e}"))
                };
                // Bound raw: ort's `bind_input` copies borrowed tensors, and the graph must read the buffer it writes.
                let v = view()?.into_dyn();
                bind_raw(&mut self.binding, Bind::Input, input, &v)?;
                self.binding
                    .bind_output(output.as_str(), view()?)
                    .map_err(|e| anyhow::anyhow!("output '{output}': {e}"))?;
                views.push(v);
                continue;
            }
            self.binding
                .bind_input(input.as_str(), &*t)
                .map_err(|e| anyhow::anyhow!("input '{input}': {e}"))?;
            self.binding
                .bind_output(output.as_str(), &mut *t)
                .map_err(|e| anyhow::anyhow!("output '{output}': {e}"))?;
        }
        for c in &self.chained {
            self.binding
                .bind_input(c.input.as_str(), c.value.as_ref().unwrap_or(&c.empty))
                .map_err(|e| anyhow::anyhow!("input '{}': {e}", c.input))?;
            self.binding
                .bind_output_to_device(c.output.as_str(), &self.device_memory)
                .map_err(|e| anyhow::anyhow!("output '{}': {e}", c.output))?;
        }
        for (n, t) in inputs {
            if let (Some(id), Some(g)) = (slot_id, &self.graphs)
                && !g.ids.is_host_input(n)
            {
                let f = g
                    .slot(id)
                    .and_then(|s| s.inputs.iter().find(|f| f.name == *n))
                    .with_context(|| format!("input '{n}' has no CUDA graph buffer"))?;
                let v = device_value(&self.device_memory, n, &f.tensor(&g.dev))?;
                bind_raw(&mut self.binding, Bind::Input, n, &v)?;
                views.push(v);
                continue;
            }
            let v = to_value(n, t)?;
            self.binding
                .bind_input(n.as_str(), &v)
                .map_err(|e| anyhow::anyhow!("input '{n}': {e}"))?;
        }
        let ran = match graph_id {
            None => self.session.run_binding(&self.binding),
            Some(id) => {
                let mut ro = ort::session::RunOptions::new().map_err(|e| anyhow::anyhow!("{e}"))?;
                ro.set(GRAPH_ID, id.to_string())
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                self.session.run_binding_with_options(&self.binding, &ro)
            }
        };
        if let (Err(e), Some(id)) = (&ran, slot_id) {
            // A graph that cannot be captured or replayed: run as before, without graphs from now on.
            tracing::warn!(
                "'{}': CUDA graph {id} failed ({e}); running without CUDA graphs",
                self.name
            );
            drop(ran);
            drop(views);
            if let Some(g) = &mut self.graphs {
                g.ids.disabled = true;
            }
            return self.run(inputs);
        }
        let mut outputs =
            ran.with_context(|| format!("ONNX Runtime failed running '{}'", self.name))?;
        drop(views);
        for c in &mut self.chained {
            c.value = Some(
                outputs
                    .remove(&c.output)
                    .with_context(|| format!("output '{}' missing", c.output))?,
            );
        }
        let results: Vec<(String, HostTensor)> = match (slot_id, &mut self.graphs) {
            (Some(id), Some(g)) => g.download(id)?,
            (_, graphs) => {
                let results: Vec<(String, HostTensor)> = self
                    .outputs
                    .iter()
                    .zip(&self.output_held)
                    .filter(|(_, h)| !**h)
                    .map(|(d, _)| {
                        let v = outputs
                            .get(&d.name)
                            .with_context(|| format!("output '{}' missing", d.name))?;
                        Ok((d.name.clone(), from_value(&d.name, v)?))
                    })
                    .collect::<Result<_>>()?;
                if let (Some(g), Some(sig)) = (graphs, sig) {
                    g.ids.ran(sig, &results);
                }
                results
            }
        };
        if self.device != OrtDevice::Cpu {
            // Host inputs went to the GPU and host outputs came back from it.
            crate::cuda::transfers::host_to_device(inputs.iter().map(|(_, t)| t.data.len()).sum());
            crate::cuda::transfers::device_to_host(results.iter().map(|(_, t)| t.data.len()).sum());
        }
        Ok(results)
    }

    fn run_device(
        &mut self,
        device_inputs: &[(&str, DeviceTensor)],
        host_inputs: &[(String, HostTensor)],
        device_outputs: &[(&str, DeviceTensor)],
    ) -> Result<()> {
        if self.device == OrtDevice::Cpu {
            bail!(
                "'{}' runs on ONNX Runtime's CPU provider, which cannot read device buffers; use --backend cuda",
                self.name
            );
        }
        self.binding.clear();
        // Device buffers are wrapped by address; the wrappers must live until the run ends.
        let mut wrapped = Vec::with_capacity(device_inputs.len() + device_outputs.len());
        for (name, t) in device_inputs.iter().chain(device_outputs) {
            wrapped.push((*name, device_value(&self.device_memory, name, t)?));
        }
        let n_in = device_inputs.len();
        for (i, (name, v)) in wrapped.iter().enumerate() {
            let which = if i < n_in { Bind::Input } else { Bind::Output };
            bind_raw(&mut self.binding, which, name, v)?;
        }
        let host: Vec<(String, DynValue)> = host_inputs
            .iter()
            .map(|(n, t)| Ok((n.clone(), to_value(n, t)?)))
            .collect::<Result<_>>()?;
        crate::cuda::transfers::host_to_device(host_inputs.iter().map(|(_, t)| t.data.len()).sum());
        for (n, v) in &host {
            self.binding
                .bind_input(n.as_str(), v)
                .map_err(|e| anyhow::anyhow!("input '{n}': {e}"))?;
        }
        let bound: Vec<&str> = wrapped.iter().map(|(n, _)| *n).collect();
        for d in &self.inputs {
            if !bound.contains(&d.name.as_str()) && !host.iter().any(|(n, _)| *n == d.name) {
                bail!("input '{}' of '{}' is not given", d.name, self.name);
            }
        }
        for d in &self.outputs {
            if !bound.contains(&d.name.as_str()) {
                // Outputs nobody reads still need a place: ONNX Runtime allocates them on the device.
                self.binding
                    .bind_output_to_device(d.name.as_str(), &self.device_memory)
                    .map_err(|e| anyhow::anyhow!("output '{}': {e}", d.name))?;
            }
        }
        tracing::trace!("running '{}' on device buffers", self.name);
        self.session
            .run_binding(&self.binding)
            .with_context(|| format!("ONNX Runtime failed running '{}'", self.name))?;
        tracing::trace!("ran '{}'", self.name);
        Ok(())
    }

    fn chain(&mut self, pairs: &[(String, String)], first: &[usize]) -> Result<bool> {
        self.chained.clear();
        for (input, output) in pairs {
            let empty =
                Tensor::<f32>::from_array((first.to_vec(), vec![0f32; first.iter().product()]))
                    .map_err(|e| anyhow::anyhow!("input '{input}' {first:?}: {e}"))?
                    .into_dyn();
            if !self.inputs.iter().any(|d| d.name == *input)
                || !self.outputs.iter().any(|d| d.name == *output)
            {
                bail!(
                    "'{}' has no input '{input}' and output '{output}' to chain",
                    self.name
                );
            }
            self.chained.push(Chained {
                input: input.clone(),
                output: output.clone(),
                value: None,
                empty,
            });
        }
        self.refresh_held();
        Ok(true)
    }

    fn hold_in_place(&mut self, pairs: &[(String, String)], shape: &[usize]) -> Result<()> {
        // The same pairs with buffers at least this long along the third axis (a KV cache's positions) are kept:
        // a server's requests then reuse one cache instead of allocating and zeroing one each.
        let fits = |t: &Held| {
            let have = t.shape();
            have.len() == shape.len()
                && have.iter().zip(shape).enumerate().all(
                    |(i, (&h, &w))| {
                        if i == 2 { h >= w } else { h == w }
                    },
                )
        };
        if self.held.len() == pairs.len()
            && self
                .held
                .iter()
                .zip(pairs)
                .all(|((i, o, t), (pi, po))| i == pi && o == po && fits(t))
        {
            self.held_rows = None;
            return Ok(());
        }
        self.held.clear();
        self.held_rows = None;
        self.refresh_held();
        if let Some(g) = &mut self.graphs {
            g.reset();
        }
        let allocator = self.session.allocator();
        let gpu = match self.device {
            OrtDevice::Cpu => None,
            OrtDevice::Cuda(id) => Some(crate::cuda::device::Device::open(id as usize)?),
        };
        for (input, output) in pairs {
            let mut dtype = None;
            for (name, list, kind) in [
                (input, &self.inputs, "input"),
                (output, &self.outputs, "output"),
            ] {
                let d = list.iter().find(|d| d.name == *name).with_context(|| {
                    format!("'{}' has no {kind} '{name}' to keep in place", self.name)
                })?;
                // The host buffers are f32; device ones take the graph's float type (16-bit on CUDA).
                let allowed = match gpu {
                    None => d.dtype == DataType::FLOAT,
                    Some(_) => {
                        [DataType::FLOAT, DataType::FLOAT16, DataType::BFLOAT16].contains(&d.dtype)
                    }
                };
                if !allowed || d.shape.len() != shape.len() || dtype.is_some_and(|t| t != d.dtype) {
                    bail!(
                        "{kind} '{name}' of '{}' is {d}, which a buffer of shape {shape:?} kept in place does not \
                         fit",
                        self.name
                    );
                }
                dtype = Some(d.dtype);
            }
            let held = match &gpu {
                None => {
                    let mut t = Tensor::<f32>::new(allocator, shape.to_vec())
                        .map_err(|e| anyhow::anyhow!("cannot allocate '{input}' {shape:?}: {e}"))?;
                    t.extract_tensor_mut().1.fill(0.0);
                    Held::Host(t)
                }
                Some(dev) => {
                    let dtype = dtype.unwrap_or(DataType::FLOAT);
                    let bytes =
                        shape.iter().product::<usize>() * (dtype.bits().unwrap_or(32) as usize / 8);
                    let data = dev.stream.alloc_zeros::<u8>(bytes.max(1)).with_context(|| {
                        format!(
                            "allocating '{input}' {shape:?} ({bytes} bytes) on the GPU failed (out of device \
                             memory? fewer tokens or a smaller --parallel need less)"
                        )
                    })?;
                    // ONNX Runtime runs on its own stream: the zeros must be there first.
                    dev.synchronize()?;
                    Held::Device {
                        data,
                        dev: dev.clone(),
                        dtype,
                        shape: shape.to_vec(),
                    }
                }
            };
            self.held.push((input.clone(), output.clone(), held));
        }
        self.refresh_held();
        Ok(())
    }

    fn replays_graphs(&self) -> bool {
        self.graphs.as_ref().is_some_and(|g| !g.ids.disabled)
            && self.held.iter().all(|h| matches!(h.2, Held::Device { .. }))
    }

    fn hold_rows(&mut self, rows: std::ops::Range<usize>) -> Result<()> {
        let n = self.held.first().map(|h| h.2.shape()[0]);
        match n {
            Some(n) if !rows.is_empty() && rows.end <= n => {
                self.held_rows = (rows != (0..n)).then_some(rows);
                Ok(())
            }
            _ => bail!(
                "'{}' holds {} rows; rows {rows:?} cannot be bound",
                self.name,
                n.unwrap_or(0)
            ),
        }
    }
}
