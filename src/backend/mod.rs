//! Execution backends behind one `Engine` interface: ONNX Runtime on the CPU (the embedded default, and the
//! backbone of the tests) and TensorRT (see `trt::runtime`). Pipelines and `trt-diff run` only see `Engine`.
pub mod attention_op;
pub mod cuda_graphs;
pub mod ggml_blocks;
pub mod ggml_ops;
pub mod ggml_repack;
mod ggml_repack_k;
pub mod half_matmul;
pub mod npy;
pub mod ort_backend;
pub mod ort_lib;
pub mod ort_ops;
pub mod spin_pool;

use crate::onnx::DataType;
use anyhow::{Result, bail};

/// `--backend`: where engines run, chosen once per engine file or bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum BackendChoice {
    /// TensorRT when the plan runs on this machine's GPU, else ONNX Runtime's CUDA provider when there is a GPU,
    /// else the CPU (each fallback logged with its reason).
    #[default]
    Auto,
    Trt,
    /// ONNX Runtime's CUDA execution provider (onnxruntime-gpu) on the same graphs.
    Cuda,
    Cpu,
}

/// A tensor in host memory: raw little-endian elements in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub dtype: DataType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl HostTensor {
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Self {
        HostTensor {
            dtype: DataType::FLOAT,
            shape: shape.to_vec(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// Values widened to f64 (for comparisons and statistics); None for non-numeric types.
    pub fn to_f64(&self) -> Option<Vec<f64>> {
        let d = &self.data;
        Some(match self.dtype {
            DataType::FLOAT => d
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            DataType::FLOAT16 => d
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            DataType::BFLOAT16 => d
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64())
                .collect(),
            DataType(11) => d
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            DataType::INT64 => d
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            DataType::INT32 => d
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            DataType::INT8 => d.iter().map(|&b| b as i8 as f64).collect(),
            DataType::UINT8 | DataType::BOOL => d.iter().map(|&b| b as f64).collect(),
            _ => return None,
        })
    }
}

/// A tensor in GPU memory the caller owns (on the engine's GPU): the device address, element type and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceTensor {
    pub ptr: u64,
    pub dtype: DataType,
    pub shape: Vec<usize>,
}

/// An engine input or output: -1 marks a dynamic dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
}

impl std::fmt::Display for TensorDesc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self
            .shape
            .iter()
            .map(|d| if *d < 0 { "?".into() } else { d.to_string() })
            .collect();
        write!(f, "{} {} [{}]", self.name, self.dtype, dims.join(", "))
    }
}

pub trait Engine {
    /// "onnxruntime (cpu)", "TensorRT-RTX 1.7.1", ...
    fn backend(&self) -> String;
    fn inputs(&self) -> &[TensorDesc];
    fn outputs(&self) -> &[TensorDesc];
    /// Runs once on host tensors named like `inputs()`; outputs come back in `outputs()` order.
    fn run(&mut self, inputs: &[(String, HostTensor)]) -> Result<Vec<(String, HostTensor)>>;
    /// Runs on device memory: `device_inputs` are read and `device_outputs` written where the caller keeps them
    /// (bound by address, no copies, nothing allocated per call), `host_inputs` (a few scalars such as a timestep)
    /// are copied in. The caller's writes to the inputs must be complete (its stream synchronized); the outputs
    /// are complete when this returns. Err for engines without a device path (the CPU backend).
    fn run_device(
        &mut self,
        device_inputs: &[(&str, DeviceTensor)],
        host_inputs: &[(String, HostTensor)],
        device_outputs: &[(&str, DeviceTensor)],
    ) -> Result<()> {
        let _ = (device_inputs, host_inputs, device_outputs);
        bail!(
            "the {} backend runs on host memory; use --backend cuda or trt for device buffers",
            self.backend()
        )
    }
    /// Hands each `(input, output)` of `pairs` to the next run: the output stays where the engine computed it (GPU
    /// memory for a GPU engine) and becomes that input, so a passed KV cache never crosses to the host. The first
    /// run after this call sees zero-filled inputs of shape `first`; later runs neither take nor return the chained
    /// tensors. Ok(false) when the engine cannot (callers then pass the tensors themselves).
    fn chain(&mut self, pairs: &[(String, String)], first: &[usize]) -> Result<bool> {
        let _ = (pairs, first);
        Ok(false)
    }
    /// From now on the named weights (initializers of the engine's graph; e.g. merged with a LoRA) hold these
    /// values, the others what they held: ONNX Runtime re-creates its session with them overriding the file's,
    /// TensorRT refits them (the engine must be built refittable). Same names, shapes and element types as built.
    fn set_weights(&mut self, weights: &[crate::weights::safetensors_file::Tensor]) -> Result<()> {
        let _ = weights;
        bail!(
            "the {} backend cannot replace an engine's weights; rebuild it with the weights you need",
            self.backend()
        )
    }
    /// Binds each `(input, output)` of `pairs` to one f32 buffer of `shape` that the engine keeps and every later
    /// run updates in place (a KV cache the graph extends where new tokens go, never copied); later runs take the
    /// other inputs only and return the other outputs only. Buffers of earlier calls with the same pairs are kept
    /// when they are at least as long along axis 2 (positions; what they hold is then stale, the graph reads only
    /// positions it wrote), else replaced by zeroed ones.
    fn hold_in_place(&mut self, pairs: &[(String, String)], shape: &[usize]) -> Result<()> {
        let _ = (pairs, shape);
        bail!(
            "the {} backend cannot keep tensors in place between runs; rebuild the model for it",
            self.backend()
        )
    }
    /// Whether runs that repeat the previous run's shapes replay a captured CUDA graph. A replay cannot see host
    /// values that changed since the capture, so a decoder then gives GroupQueryAttention's host-read total length
    /// as the cache's capacity on decode steps (the true lengths travel in `seqlens_k`, on the device).
    fn replays_graphs(&self) -> bool {
        false
    }
    /// After `hold_in_place`: later runs bind rows `rows` (axis 0, a batch of sequences) of the held buffers rather
    /// than all of them, so a call runs some sequences of a batched KV cache (the server's slots). `hold_in_place`
    /// binds all rows again.
    fn hold_rows(&mut self, rows: std::ops::Range<usize>) -> Result<()> {
        let _ = rows;
        bail!(
            "the {} backend cannot run part of a held batch; serve with --parallel 1",
            self.backend()
        )
    }
}

/// Checks named inputs against an engine's descriptions: every input present once, dtypes equal, ranks equal and
/// fixed dimensions equal. Errors list what the engine expects.
pub fn check_inputs(
    engine: &str,
    expected: &[TensorDesc],
    given: &[(String, HostTensor)],
) -> Result<()> {
    let list = || {
        expected
            .iter()
            .map(|d| format!("  {d}"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    for (name, t) in given {
        let Some(d) = expected.iter().find(|d| d.name == *name) else {
            bail!(
                "'{engine}' has no input '{name}'; its inputs are:\n{}",
                list()
            );
        };
        if d.dtype != t.dtype {
            bail!(
                "input '{name}' of '{engine}' is {}, got {} (convert the array, e.g. numpy .astype)",
                d.dtype,
                t.dtype
            );
        }
        let fits = d.shape.len() == t.shape.len()
            && d.shape
                .iter()
                .zip(&t.shape)
                .all(|(&e, &g)| e < 0 || e as usize == g);
        if !fits {
            bail!(
                "input '{name}' of '{engine}' has shape {:?}, which does not fit {d}",
                t.shape
            );
        }
    }
    for d in expected {
        match given.iter().filter(|(n, _)| *n == d.name).count() {
            0 => bail!(
                "input '{}' of '{engine}' is missing; its inputs are:\n{}",
                d.name,
                list()
            ),
            1 => {}
            _ => bail!("input '{}' is given more than once", d.name),
        }
    }
    Ok(())
}
