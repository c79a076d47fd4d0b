//! `--precision`: one enum for every command and family, parsed in one place. Each family maps it to what its
//! graphs compute in and refuses the ones it cannot build.
use serde::{Deserialize, Serialize};

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    #[value(alias = "f32")]
    Fp32,
    #[value(alias = "f16")]
    Fp16,
    Bf16,
    /// FP8 E4M3 weights and activations (Ada, Hopper, Blackwell).
    Fp8,
    /// NVFP4: FP4 E2M1 in blocks of 16 with FP8 block scales (Blackwell).
    Nvfp4,
    /// INT8 W8A8: per-output-channel weights, calibrated static activations, SmoothQuant (Turing, Ampere).
    Int8,
    /// INT4 weight-only in blocks of 32 (LLM decoders).
    Int4,
    /// A quantized GGUF's own formats kept in the engine: INT8 (Q8_0, Q6_K) or INT4 (Q4_*, Q5_*) weight-only
    /// blocks of 32 (LLM decoders; the default for quantized GGUF files).
    Gguf,
    /// Per-layer formats chosen by measured quality (`--quality`, `--policy`): see docs/precision.md.
    Auto,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
            Precision::Fp8 => "fp8",
            Precision::Nvfp4 => "nvfp4",
            Precision::Int8 => "int8",
            Precision::Int4 => "int4",
            Precision::Gguf => "gguf",
            Precision::Auto => "auto",
        }
    }

    /// Parses a name as `--precision` takes it (manifests, recipes, tests).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            anyhow::anyhow!(
                "unknown precision '{s}': use fp32, fp16, bf16, fp8, int8, nvfp4, int4, gguf or auto"
            )
        })
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How one linear layer is exported (the Q/DQ pattern `models::qdq` emits for it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearPrecision {
    F32,
    F16,
    /// FP8 E4M3 activations (per-tensor) and weights (one scale).
    Fp8,
    /// FP8 E4M3 activations (per-tensor) and weights (one scale per output channel).
    Fp8PerChannel,
    Nvfp4,
    /// INT8 activations (per-tensor, static) and weights (one scale per output channel): Ampere's low-bit GEMM.
    Int8,
    /// INT4 weights in blocks of `block` input features, activations in f32 (weight-only).
    Int4 {
        block: usize,
    },
}

impl LinearPrecision {
    /// The default-domain opset the pattern needs (FP8 Q/DQ: 19; blocked DQ: 21; FP4: 23).
    pub fn min_opset(self) -> i64 {
        match self {
            LinearPrecision::F32 | LinearPrecision::F16 => 17,
            LinearPrecision::Fp8 | LinearPrecision::Fp8PerChannel | LinearPrecision::Int8 => 19,
            LinearPrecision::Int4 { .. } => 21,
            LinearPrecision::Nvfp4 => 23,
        }
    }

    pub fn name(self) -> String {
        match self {
            LinearPrecision::F32 => "f32".into(),
            LinearPrecision::F16 => "f16".into(),
            LinearPrecision::Fp8 => "fp8".into(),
            LinearPrecision::Fp8PerChannel => "fp8-per-channel".into(),
            LinearPrecision::Nvfp4 => "nvfp4".into(),
            LinearPrecision::Int8 => "int8".into(),
            LinearPrecision::Int4 { block } => format!("int4-block{block}"),
        }
    }
}
