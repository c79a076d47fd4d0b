//! Llama (Mistral too), Qwen2, Qwen3 and Phi-3 models from GGUF files: the `{arch}.*` keys become a [`LlamaConfig`],
//! tensors are dequantized to f32 under Hugging Face names (Phi-3's fused `attn_qkv` and `ffn_up` split into Llama's).
//! GGUF `llama` files hold Meta's interleaved RoPE layout (llama.cpp's converter permutes q/k), `qwen2`, `qwen3` and
//! `phi3` files the halves layout; the config records which.
use crate::quant::int::{Bits, IntBlocks};
use crate::weights::gguf::{GgmlType, GgufFile};
use crate::weights::llm_config::{LlamaConfig, MlpAct, RopeScaling, swa_pattern_of};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::ops::Range;

pub struct GgufModel {
    pub arch: String,
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Vec<f32>>,
}

/// Reads config and tensors; `max_context` caps the context (the engine profile follows it).
pub fn load(g: &GgufFile, max_context: Option<usize>) -> Result<GgufModel> {
    let path = g.path().display().to_string();
    let arch = g
        .get_str("general.architecture")
        .with_context(|| format!("'{path}': general.architecture is missing; not a model GGUF"))?
        .to_string();
    let interleaved = match arch.as_str() {
        "llama" => true,
        "qwen2" | "qwen3" | "phi3" | "gemma2" | "gemma3" => false,
        other => {
            bail!(
                "'{path}': architecture '{other}' is not supported (supported: llama, qwen2, qwen3, phi3, gemma2, \
                 gemma3)"
            )
        }
    };
    let gemma = arch.starts_with("gemma");
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> Result<usize> {
        let v = g
            .get(&key(k))
            .with_context(|| format!("'{path}': metadata key '{}' is missing", key(k)))?;
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .with_context(|| {
                format!(
                    "'{path}': metadata key '{}' is {v}, not a count: the file is corrupt",
                    key(k)
                )
            })
    };
    let dim = num("embedding_length")?;
    let n_heads = num("attention.head_count")?;
    let n_layers = num("block_count")?;
    let embd = g
        .tensor("token_embd.weight")
        .with_context(|| format!("'{path}': tensor token_embd.weight is missing"))?;
    let vocab_size = embd.shape().first().copied().unwrap_or(0) as usize;
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
    // llama.cpp records a head size that differs from embedding_length / head_count (Qwen3) as key_length and
    // value_length; the decoder graphs need both equal.
    let key_length = g
        .get(&key("attention.key_length"))
        .is_some()
        .then(|| num("attention.key_length"))
        .transpose()?;
    let value_length = g
        .get(&key("attention.value_length"))
        .is_some()
        .then(|| num("attention.value_length"))
        .transpose()?;
    if let (Some(k), Some(v)) = (key_length, value_length)
        && k != v
    {
        bail!(
            "'{path}': attention.key_length {k} differs from attention.value_length {v}; trt-diff's decoders need \
             one head size"
        );
    }
    let explicit_head_dim = key_length
        .or(value_length)
        .filter(|&h| n_heads == 0 || h != dim / n_heads);
    let head_dim = explicit_head_dim.unwrap_or(dim / n_heads.max(1));
    let softcap = |k: &str| g.get_f64(&key(k)).filter(|&c| c > 0.0).map(|c| c as f32);
    let mut config = LlamaConfig {
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
        explicit_head_dim,
        // Qwen3 always has them (a file missing them is refused by `check_tensors`, naming the tensor).
        qk_norm: arch == "qwen3" || g.tensor("blk.0.attn_q_norm.weight").is_some(),
        // A window as long as the context changes nothing (as the Hugging Face loader reads it).
        sliding_window: g
            .get(&key("attention.sliding_window"))
            .is_some()
            .then(|| num("attention.sliding_window"))
            .transpose()?
            .filter(|&w| w > 0 && w < ctx),
        swa_pattern: swa_pattern(g, &arch, n_layers)?,
        // llama.cpp's Gemma 3: local layers at base 10 000, unscaled.
        local_rope_theta: (arch == "gemma3").then_some(10_000.0),
        // llama.cpp's Gemma 2/3 scale by head size, except the 27B models by embedding_length / head_count (their
        // query_pre_attn_scalar); GGUF records neither.
        attn_scale: gemma.then(|| {
            let big = (arch == "gemma2" && n_layers == 46) || (arch == "gemma3" && n_layers == 62);
            let scalar = if big { dim / n_heads.max(1) } else { head_dim };
            1.0 / (scalar as f32).sqrt()
        }),
        attn_softcap: softcap("attn_logit_softcapping"),
        final_softcap: softcap("final_logit_softcapping"),
        embed_scale: gemma.then(|| (dim as f32).sqrt()),
        sandwich_norms: gemma,
        mlp_act: if gemma {
            MlpAct::GeluTanh
        } else {
            MlpAct::Silu
        },
    };
    config.normalize_window();
    if g.tensor("rope_factors_long.weight").is_some()
        || g.tensor("rope_factors_short.weight").is_some()
    {
        bail!(
            "'{path}': per-dimension long/short RoPE factors (Phi-3's 128k variants, longrope) are not supported; \
             use a 4k variant"
        );
    }
    crate::weights::limits::check_config(&path, &config)?;
    let mut tensors = HashMap::new();
    for src in sources(g, &config) {
        let w = g.tensor_f32(&src.gguf)?;
        for (hf, rows) in src.parts {
            let part = match rows {
                None => w.clone(),
                Some(r) => match w.get(r.start * config.dim..r.end * config.dim) {
                    Some(p) => p.to_vec(),
                    None => bail!(
                        "'{path}': tensor '{}' is shorter than its parts; the file is corrupt",
                        src.gguf
                    ),
                },
            };
            tensors.insert(hf, part);
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
    crate::weights::limits::check_tensors(&path, &config, &tensors)?;
    Ok(GgufModel {
        arch,
        config,
        tensors,
    })
}

/// A GGUF tensor and the Hugging Face tensors it holds: all of it (None), or the rows of each part of a fused
/// matrix ([`fused_parts`]).
struct Source {
    gguf: String,
    parts: Vec<(String, Option<Range<usize>>)>,
}

/// Every Hugging Face tensor of `config` the file holds, by the GGUF tensor it comes from.
fn sources(g: &GgufFile, config: &LlamaConfig) -> Vec<Source> {
    let mut out = Vec::new();
    for (hf, gg) in crate::weights::llm_config::hf_to_gguf(config) {
        let layers: Vec<Option<usize>> = if hf.contains("{i}") {
            (0..config.n_layers).map(Some).collect()
        } else {
            vec![None]
        };
        for i in layers {
            let sub = |s: &str| i.map_or(s.to_string(), |i| s.replace("{i}", &i.to_string()));
            let (hf, gg) = (sub(hf), sub(gg));
            if g.tensor(&gg).is_some() {
                out.push(Source {
                    parts: vec![(hf, None)],
                    gguf: gg,
                });
            }
        }
    }
    for i in 0..config.n_layers {
        for (fused, parts) in fused_parts(config) {
            let gg = format!("blk.{i}.{fused}");
            let Some(t) = g.tensor(&gg) else { continue };
            // A fused ffn_up is twice the feed-forward width (Phi-3); a plain one is Llama's up_proj.
            if t.dims.get(1).copied() != Some(parts.iter().map(|(_, r)| *r as u64).sum()) {
                continue;
            }
            let mut at = 0;
            let parts = parts
                .into_iter()
                .map(|(hf, rows)| {
                    at += rows;
                    (format!("model.layers.{i}.{hf}"), Some(at - rows..at))
                })
                .collect();
            out.push(Source { gguf: gg, parts });
        }
    }
    out
}

/// What a GGUF block format becomes in a TensorRT engine (`--precision gguf`): INT8 for formats of more than 6 bits
/// a weight (Q8_0, Q6_K), INT4 for the rest (Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K); None for float tensors.
pub fn engine_bits(ty: GgmlType) -> Option<Bits> {
    let (elems, bytes) = ty.block()?;
    if elems == 1 {
        return None;
    }
    Some(if bytes * 8 > 6 * elems {
        Bits::Int8
    } else {
        Bits::Int4
    })
}

/// The file's quantized matrices as INT4/INT8 blocks (of 32; Q6_K's of 16) along each row ([`engine_bits`]), under
/// Hugging Face names (fused matrices split), for the TensorRT graph of `--precision gguf`:
/// - exactly as stored: Q8_0 and Q4_0 (their codes and `d`), Q6_K (INT8 blocks of 16 with `d * sc`), Q4_1 and
///   Q4_K (their codes, scales and minimums, as INT4 with a per-block offset); K-quant scales also as multiples of
///   their super-block's `d` ([`IntBlocks::with_steps`]);
/// - re-quantized from their values: Q5_0 / Q5_1 / Q5_K to INT4 over each block's range.
pub fn int_blocks(g: &GgufFile, config: &LlamaConfig) -> Result<HashMap<String, IntBlocks>> {
    let mut out = HashMap::new();
    for src in sources(g, config) {
        let Some(blocks) = tensor_blocks(g, &src.gguf)? else {
            continue;
        };
        if let [(hf, None)] = src.parts.as_slice() {
            out.insert(hf.clone(), blocks);
            continue;
        }
        for (hf, range) in src.parts {
            let part = match range {
                Some(r) if r.end <= blocks.rows => blocks.rows(r),
                Some(_) => bail!(
                    "'{}': tensor '{}' is shorter than its parts; the file is corrupt",
                    g.path().display(),
                    src.gguf
                ),
                None => blocks.clone(),
            };
            out.insert(hf, part);
        }
    }
    Ok(out)
}

/// One quantized matrix of the file as [`int_blocks`] keeps it; None for float tensors, tensors that are not
/// matrices and rows that are not whole blocks of 32.
pub fn tensor_blocks(g: &GgufFile, name: &str) -> Result<Option<IntBlocks>> {
    use crate::weights::gguf::{block_affine, block_scales, superblock_steps};
    let Some(t) = g.tensor(name) else {
        return Ok(None);
    };
    let shape = t.shape();
    let (Some(bits), [rows, cols]) = (engine_bits(t.ty), shape.as_slice()) else {
        return Ok(None);
    };
    let (rows, cols) = (*rows as usize, *cols as usize);
    if !cols.is_multiple_of(BLOCK) {
        return Ok(None);
    }
    let values = g.tensor_f32(name)?;
    let raw = g.tensor_bytes(t);
    let blocks = match (bits, block_scales(t.ty, raw), block_affine(t.ty, raw)) {
        (_, Some((block, d)), _) => IntBlocks::with_scales(&values, rows, cols, block, bits, d),
        (Bits::Int4, None, Some((scales, lows))) => {
            IntBlocks::with_affine(&values, rows, cols, BLOCK, scales, &lows)
        }
        (Bits::Int4, None, None) => IntBlocks::quantized_affine(&values, rows, cols, BLOCK),
        (Bits::Int8, None, _) => IntBlocks::quantized(&values, rows, cols, BLOCK, bits),
    };
    Ok(Some(match superblock_steps(t.ty, raw) {
        Some((group, steps)) => blocks.with_steps(group, &steps),
        None => blocks,
    }))
}

/// Elements per scale in an engine's INT4/INT8 weights.
const BLOCK: usize = 32;

/// Which layers the sliding window applies to: `{arch}.attention.sliding_window_pattern` (a period or one flag per
/// layer) when the file has it, else llama.cpp's fixed patterns of Gemma 2 (every other layer) and Gemma 3 (five in
/// six).
fn swa_pattern(g: &GgufFile, arch: &str, n_layers: usize) -> Result<Option<usize>> {
    let path = g.path().display();
    let key = format!("{arch}.attention.sliding_window_pattern");
    match g.get(&key) {
        Some(v) => {
            if let Some(n) = v.as_u64() {
                return Ok(Some(n.clamp(1, n_layers.max(1) as u64 + 1) as usize));
            }
            let flags: Option<Vec<bool>> = v
                .as_array()
                .map(|a| a.iter().map(|x| x.as_bool()).collect())
                .unwrap_or(None);
            match flags {
                Some(f) if f.len() == n_layers => swa_pattern_of(&f).with_context(|| {
                    format!(
                        "'{path}': {key} windows layers in an order trt-diff's decoders do not run (they take a \
                         period n: layer i windowed when i % n < n - 1)"
                    )
                }),
                _ => bail!(
                    "'{path}': {key} is {v}, neither a period nor one flag per layer ({n_layers}): the file is corrupt"
                ),
            }
        }
        None => Ok(match arch {
            "gemma2" => Some(2),
            "gemma3" => Some(6),
            _ => None,
        }),
    }
}

/// GGUF matrices that hold several of Llama's, with the Hugging Face names and rows of their parts in order:
/// `attn_qkv` [q | k | v] and Phi-3's `ffn_up` [gate | up].
pub fn fused_parts(c: &LlamaConfig) -> [(&'static str, Vec<(&'static str, usize)>); 2] {
    [
        (
            "attn_qkv.weight",
            vec![
                ("self_attn.q_proj.weight", c.q_dim()),
                ("self_attn.k_proj.weight", c.kv_dim()),
                ("self_attn.v_proj.weight", c.kv_dim()),
            ],
        ),
        (
            "ffn_up.weight",
            vec![
                ("mlp.gate_proj.weight", c.hidden_dim),
                ("mlp.up_proj.weight", c.hidden_dim),
            ],
        ),
    ]
}
