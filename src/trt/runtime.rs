//! Running TensorRT plans: the manifest is checked against the loaded TensorRT and the GPU first (with the
//! command that rebuilds a matching plan), then the plan is deserialized from a memory map, input shapes are set
//! on an execution context, buffers live on the device (cudarc) and `enqueueV3` runs on a CUDA stream.
//! TensorRT-RTX runs on compute capability 8.0, 8.6, 8.9 and 12.x; TensorRT 11 on data-center GPUs.
use super::discovery::{Flavor, load_flavor};
use super::ffi::bridge;
use crate::backend::{Engine, HostTensor, TensorDesc, check_inputs};
use crate::manifest::Manifest;
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr};
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
    if m.tensorrt.version != loaded_version {
        bail!(
            "'{}' was built by {} {}, but the loaded library is {}: plans only load in the version that built them; {rebuild}",
            plan.display(),
            m.tensorrt.flavor.display(),
            m.tensorrt.version,
            loaded_version
        );
    }
    let sm = format!("sm{}{}", cc.0, cc.1);
    match m.tensorrt.flavor {
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
        Flavor::Rtx if !m.tensorrt.targets.is_empty() && !m.tensorrt.targets.contains(&sm) => {
            bail!(
                "'{}' targets {} but this GPU is {sm}; {rebuild} --targets {sm}",
                plan.display(),
                m.tensorrt.targets.join(", ")
            )
        }
        _ => Ok(()),
    }
}

pub struct TrtEngine {
    name: String,
    backend: String,
    engine: cxx::UniquePtr<bridge::RuntimeEngine>,
    stream: Arc<CudaStream>,
    inputs: Vec<TensorDesc>,
    outputs: Vec<TensorDesc>,
    /// Keeps the mapped plan alive as long as the engine (TensorRT may reference it).
    _plan: memmap2::Mmap,
}

fn parse_dtype(s: &str) -> DataType {
    DataType::from_name(s).unwrap_or(DataType(0))
}

impl TrtEngine {
    pub fn open(plan: &Path) -> Result<Self> {
        let report = crate::manifest::check_plan(plan)?;
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
        let manifest = report.manifest.clone();
        let flavor = manifest
            .as_ref()
            .map(|m| m.tensorrt.flavor)
            .unwrap_or(Flavor::Rtx);
        let lib = load_flavor(flavor, None)?;
        if let Some(m) = &manifest {
            check_compatible(
                plan,
                m,
                &Flavor::version_string(lib.version),
                info.compute_capability,
            )?;
        } else {
            tracing::warn!(
                "'{}' has no manifest: trying {} without compatibility checks",
                plan.display(),
                flavor.display()
            );
        }
        let ctx = CudaContext::new(info.ordinal as usize).map_err(|e| {
            anyhow::anyhow!("cannot create a CUDA context on GPU {}: {e}", info.ordinal)
        })?;
        let stream = ctx.default_stream();
        let file = std::fs::File::open(plan)
            .with_context(|| format!("cannot open '{}'", plan.display()))?;
        // SAFETY: read-only map of a plan file nothing else writes while we run.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        // SAFETY: the pointer and length describe the live map, which outlives the call.
        let engine = unsafe {
            bridge::runtime_open(flavor.key(), lib.create_runtime, map.as_ptr(), map.len())
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
        Ok(TrtEngine {
            name: plan.display().to_string(),
            backend: format!(
                "{} {} on {} ({})",
                flavor.display(),
                Flavor::version_string(lib.version),
                info.name,
                info.sm()
            ),
            engine,
            stream,
            inputs,
            outputs,
            _plan: map,
        })
    }
}

impl Engine for TrtEngine {
    fn backend(&self) -> String {
        self.backend.clone()
    }
    fn inputs(&self) -> &[TensorDesc] {
        &self.inputs
    }
    fn outputs(&self) -> &[TensorDesc] {
        &self.outputs
    }
    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>> {
        check_inputs(&self.name, &self.inputs, inputs)?;
        let mut buffers: Vec<CudaSlice<u8>> = Vec::new();
        for (name, t) in inputs {
            let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
            if !self.engine.pin_mut().set_input_shape(name, &dims) {
                bail!(
                    "input '{name}': shape {:?} is outside the plan's optimization profile",
                    t.shape
                );
            }
            let buf = self
                .stream
                .clone_htod(&t.data)
                .context("copying an input to the GPU failed (out of memory?)")?;
            let (ptr, _sync) = buf.device_ptr(&self.stream);
            if !self.engine.pin_mut().set_address(name, ptr) {
                bail!("input '{name}': TensorRT rejected its device address");
            }
            drop(_sync);
            buffers.push(buf);
        }
        let mut outs = Vec::new();
        for d in self.outputs.clone() {
            let dims = self.engine.context_dims(&d.name);
            if dims.iter().any(|&v| v < 0) {
                bail!(
                    "output '{}' has no concrete shape after setting the inputs",
                    d.name
                );
            }
            let shape: Vec<usize> = dims.iter().map(|&v| v as usize).collect();
            let bytes = d
                .dtype
                .storage_bytes(shape.iter().product::<usize>() as u64)
                .unwrap_or(0) as usize;
            let buf = self
                .stream
                .alloc_zeros::<u8>(bytes.max(1))
                .context("allocating an output on the GPU failed")?;
            let (ptr, _sync) = buf.device_ptr(&self.stream);
            if !self.engine.pin_mut().set_address(&d.name, ptr) {
                bail!("output '{}': TensorRT rejected its device address", d.name);
            }
            drop(_sync);
            outs.push((d, shape, bytes, buf));
        }
        let stream_ptr = self.stream.cu_stream() as u64;
        if !self.engine.pin_mut().enqueue(stream_ptr) {
            bail!(
                "TensorRT's enqueueV3 failed for '{}' (see the TensorRT error above)",
                self.name
            );
        }
        self.stream
            .synchronize()
            .context("the TensorRT execution failed on the GPU")?;
        outs.into_iter()
            .map(|(d, shape, bytes, buf)| {
                let mut data = self
                    .stream
                    .clone_dtoh(&buf)
                    .context("copying an output from the GPU failed")?;
                data.truncate(bytes);
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
