//! Llama and Qwen2 models from GGUF files: the `{arch}.*` keys become a [`LlamaConfig`], tensors are dequantized
//! to f32 under Hugging Face names. GGUF `llama` files hold Meta's interleaved RoPE layout (llama.cpp's converter
//! permutes q/k), `qwen2` files the halves layout; the config records which.
use crate::models::llama::{LlamaConfig, RopeScaling};
use crate::weights::gguf::GgufFile;
use crate::weights::gguf_convert::HF_TO_GGUF;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;

pub struct GgufModel {
    pub arch: String,
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Vec<f32>>,
}

/// Reads config and tensors; `max_context` caps the context (the RoPE table and the engine profile follow it).
pub fn load(g: &GgufFile, max_context: Option<usize>) -> Result<GgufModel> {
    let path = g.path().display().to_string();
    let arch = g
        .get_str("general.architecture")
        .with_context(|| format!("'{path}': general.architecture is missing; not a model GGUF"))?
        .to_string();
    let interleaved = match arch.as_str() {
        "llama" => true,
        "qwen2" => false,
        other => {
            bail!("'{path}': architecture '{other}' is not supported (supported: llama, qwen2)")
        }
    };
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> Result<usize> {
        g.get_u64(&key(k))
            .map(|v| v as usize)
            .with_context(|| format!("'{path}': metadata key '{}' is missing", key(k)))
    };
    let dim = num("embedding_length")?;
    let n_heads = num("attention.head_count")?;
    let n_layers = num("block_count")?;
    let embd = g
        .tensor("token_embd.weight")
        .with_context(|| format!("'{path}': tensor token_embd.weight is missing"))?;
    let vocab_size = embd.shape()[0] as usize;
    let mut ctx = num("context_length")?;
    if let Some(m) = max_context {
        ctx = ctx.min(m);
    }
    let rope_scaling = match (
        g.get_str(&key("rope.scaling.type")),
        g.get_f64(&key("rope.scaling.factor")),
    ) {
        (Some("linear"), Some(f)) if f > 0.0 && f != 1.0 => {
            Some(RopeScaling::Linear { factor: f as f32 })
        }
        (Some(t), _) if t != "none" && t != "linear" => {
            bail!(
                "'{path}': rope scaling '{t}' is not supported (linear, or per-dimension rope_freqs)"
            )
        }
        _ => None,
    };
    let config = LlamaConfig {
        dim,
        hidden_dim: num("feed_forward_length")?,
        n_layers,
        n_heads,
        n_kv_heads: g
            .get_u64(&key("attention.head_count_kv"))
            .map_or(n_heads, |v| v as usize),
        vocab_size,
        max_seq_len: ctx,
        rope_theta: g.get_f64(&key("rope.freq_base")).unwrap_or(10000.0) as f32,
        norm_eps: g
            .get_f64(&key("attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5) as f32,
        rope_interleaved: interleaved,
        tied_embeddings: g.tensor("output.weight").is_none(),
        attn_bias: g.tensor("blk.0.attn_q.bias").is_some(),
        rope_scaling,
    };
    if dim % n_heads != 0 || n_heads % config.n_kv_heads.max(1) != 0 {
        bail!(
            "'{path}': {dim} features do not split into {n_heads} heads / {} KV heads",
            config.n_kv_heads
        );
    }
    let mut tensors = HashMap::new();
    for (hf, gg) in HF_TO_GGUF {
        let layers: Vec<Option<usize>> = if hf.contains("{i}") {
            (0..n_layers).map(Some).collect()
        } else {
            vec![None]
        };
        for i in layers {
            let sub = |s: &str| i.map_or(s.to_string(), |i| s.replace("{i}", &i.to_string()));
            let (hf, gg) = (sub(hf), sub(gg));
            if g.tensor(&gg).is_some() {
                tensors.insert(hf, g.tensor_f32(&gg)?);
            }
        }
    }
    if config.tied_embeddings {
        let e = tensors
            .get("model.embed_tokens.weight")
            .cloned()
            .unwrap_or_default();
        tensors.insert("lm_head.weight".into(), e);
    }
    if g.tensor("rope_freqs.weight").is_some() {
        tensors.insert(
            "rope.freq_factors".into(),
            g.tensor_f32("rope_freqs.weight")?,
        );
    }
    Ok(GgufModel {
        arch,
        config,
        tensors,
    })
}

/// The matrices of `g` as the CPU graph reads them in place (`backend::ggml_ops`), under Hugging Face names
/// (`lm_head.weight` is `token_embd.weight` for tied embeddings); None when a matrix has a type those operators do
/// not read (then the graph takes dequantized weights).
pub fn block_weights(
    g: &GgufFile,
    config: &LlamaConfig,
    location: &str,
) -> Result<Option<crate::backend::ggml_ops::GgmlWeights>> {
    use crate::backend::ggml_ops::{GgmlWeight, GgmlWeights, WKind};
    let path = g.path().display().to_string();
    let mut tensors = HashMap::new();
    let mut add = |hf: String, gg: &str| -> Result<bool> {
        let Some(t) = g.tensor(gg) else {
            return Ok(true);
        };
        if t.dims.len() != 2 {
            return Ok(true);
        }
        let Some(kind) = WKind::from_ggml(t.ty) else {
            return Ok(false);
        };
        let (k, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        if kind.row_bytes(k).and_then(|b| b.checked_mul(rows)) != Some(t.n_bytes as usize) {
            bail!(
                "'{path}': tensor '{gg}' ({}, {rows} x {k}) has {} bytes, which do not fit its type; the file is corrupt",
                t.ty,
                t.n_bytes
            );
        }
        tensors.insert(
            hf,
            GgmlWeight {
                kind,
                rows,
                k,
                offset: g.data_offset + t.offset,
                bytes: t.n_bytes,
            },
        );
        Ok(true)
    };
    for (hf, gg) in HF_TO_GGUF {
        let layers: Vec<Option<usize>> = if hf.contains("{i}") {
            (0..config.n_layers).map(Some).collect()
        } else {
            vec![None]
        };
        for i in layers {
            let sub = |s: &str| i.map_or(s.to_string(), |i| s.replace("{i}", &i.to_string()));
            if !add(sub(hf), &sub(gg))? {
                return Ok(None);
            }
        }
    }
    if config.tied_embeddings
        && let Some(e) = tensors.get("model.embed_tokens.weight").cloned()
    {
        tensors.insert("lm_head.weight".into(), e);
    }
    Ok(Some(GgmlWeights {
        location: location.to_string(),
        tensors,
    }))
}
