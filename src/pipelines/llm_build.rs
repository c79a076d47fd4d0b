//! `trt-diff build CHECKPOINT --arch llama2c --tokenizer TOK --out NAME.plan`: the decoder graph goes to
//! `NAME.onnx` (+ external data) beside the plan, the tokenizer to `NAME.tokenizer.bin`, the engine to `NAME.plan`
//! with a manifest that says how `generate` runs it. Without a usable GPU, `generate` runs `NAME.onnx` on the CPU.
use crate::manifest::Pipeline;
use crate::models::llama::{LlamaConfig, decoder_graph};
use crate::onnx::{SaveOptions, save};
use crate::quant::policy::Policy;
use crate::quant::qdq::LinearPrecision;
use crate::trt::shapes::ShapeRange;
use crate::trt::{BuildOptions, BuildOutcome, build_engine};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

/// Optimization profiles: 1..max new tokens, 0..max-1 cached positions (prefill and decode in one engine).
pub fn decoder_profiles(c: &LlamaConfig) -> Vec<ShapeRange> {
    let max = c.max_seq_len as i64;
    let ids = |name: &str| ShapeRange {
        name: name.into(),
        min: vec![1, 1],
        opt: vec![1, 1],
        max: vec![1, max],
    };
    let mut v = vec![ids("input_ids"), ids("position_ids")];
    let (kv, hd) = (c.n_kv_heads as i64, c.head_dim() as i64);
    for i in 0..c.n_layers {
        for kind in ["key", "value"] {
            v.push(ShapeRange {
                name: format!("past_{kind}_{i}"),
                min: vec![1, kv, 0, hd],
                opt: vec![1, kv, max / 2, hd],
                max: vec![1, kv, max - 1, hd],
            });
        }
    }
    v
}

pub fn precision_from_name(name: &str) -> Result<LinearPrecision> {
    Ok(match name {
        "fp32" | "f32" => LinearPrecision::F32,
        "fp16" | "f16" => LinearPrecision::F16,
        "fp8" => LinearPrecision::Fp8,
        "nvfp4" => LinearPrecision::Nvfp4,
        "int4" => LinearPrecision::Int4 { block: 32 },
        other => bail!(
            "--precision {other} is not available for LLM decoders; choose fp32, fp16, fp8, nvfp4 or int4"
        ),
    })
}

fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

/// Exports and builds a llama2.c checkpoint; `base` carries the TensorRT options.
pub fn build_llama2c(
    checkpoint: &Path,
    tokenizer: &Path,
    precision: &str,
    base: &BuildOptions,
) -> Result<BuildOutcome> {
    let model = crate::weights::llama2c::Llama2c::load(checkpoint)?;
    // Loading validates the tokenizer against the model's vocabulary before anything is written.
    crate::tokenizer::llama2c::Llama2cTokenizer::load(tokenizer, model.config.vocab_size)?;
    let p = precision_from_name(precision)?;
    let graph = decoder_graph(&model.config, &model.tensors, &Policy::defaults(p))?;
    let onnx = sibling(&base.out, ".onnx");
    save(graph, &onnx, &SaveOptions::default())?;
    let tok_out = sibling(&base.out, ".tokenizer.bin");
    std::fs::copy(tokenizer, &tok_out)
        .with_context(|| format!("cannot copy the tokenizer to '{}'", tok_out.display()))?;
    let mut opts = base.clone();
    opts.onnx = onnx;
    if opts.shapes.is_empty() {
        opts.shapes = decoder_profiles(&model.config);
    }
    opts.pipeline = Some(Pipeline::Llm {
        arch: "llama2c".into(),
        config: model.config.clone(),
        tokenizer: tok_out
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        precision: precision.into(),
    });
    build_engine(&opts)
}
