//! Sanity limits on the sizes that model files declare (hyper-parameters, tensor shapes), checked before anything
//! is allocated from them: a corrupt or hostile header must give an error, not a multi-terabyte allocation or a
//! division by zero. The limits sit far above every published model.
use crate::weights::llm_config::LlamaConfig;
use anyhow::{Result, bail};
use std::collections::HashMap;

/// Largest model width (Llama 3.1 405B: 16384).
pub const MAX_DIM: usize = 1 << 16;
/// Largest feed-forward width (Llama 3.1 405B: 53248).
pub const MAX_HIDDEN: usize = 1 << 19;
/// Most layers (Llama 3.1 405B: 126).
pub const MAX_LAYERS: usize = 1024;
/// Most attention heads (Llama 3.1 405B: 128).
pub const MAX_HEADS: usize = 1024;
/// Largest vocabulary (Gemma: 262144).
pub const MAX_VOCAB: usize = 1 << 22;
/// Longest context an engine is built for (Qwen2.5-1M: 1010000); `--max-context` caps longer ones.
pub const MAX_CONTEXT: usize = 1 << 21;

/// Checks a decoder config read from `source` (a file name for errors) against the limits above and for the
/// divisibility the graph relies on.
pub fn check_config(source: &str, c: &LlamaConfig) -> Result<()> {
    let corrupt = "the file is corrupt, or the model is larger than trt-diff supports";
    for (what, v, max) in [
        ("embedding length (dim)", c.dim, MAX_DIM),
        ("feed-forward length", c.hidden_dim, MAX_HIDDEN),
        ("layer count", c.n_layers, MAX_LAYERS),
        ("attention head count", c.n_heads, MAX_HEADS),
        ("KV head count", c.n_kv_heads, MAX_HEADS),
        ("vocabulary size", c.vocab_size, MAX_VOCAB),
    ] {
        if v == 0 || v > max {
            bail!("'{source}': {what} {v} is outside 1..={max}: {corrupt}");
        }
    }
    if c.max_seq_len == 0 {
        bail!("'{source}': context length 0: {corrupt}");
    }
    if c.max_seq_len > MAX_CONTEXT {
        bail!(
            "'{source}': context length {} is more than {MAX_CONTEXT} positions: pass --max-context N to build \
             the engine for a shorter context",
            c.max_seq_len
        );
    }
    let splits = c.explicit_head_dim.is_some() || c.dim.is_multiple_of(c.n_heads);
    if !splits || !c.n_heads.is_multiple_of(c.n_kv_heads) {
        bail!(
            "'{source}': {} features do not split into {} heads / {} KV heads: {corrupt}",
            c.dim,
            c.n_heads,
            c.n_kv_heads
        );
    }
    let hd = c.head_dim();
    if hd == 0 || hd > MAX_DIM {
        bail!("'{source}': head size {hd} is outside 1..={MAX_DIM}: {corrupt}");
    }
    if !hd.is_multiple_of(2) {
        bail!("'{source}': head size {hd} is odd; RoPE needs pairs: {corrupt}");
    }
    for (what, v) in [
        ("RoPE base", Some(c.rope_theta)),
        ("local RoPE base", c.local_rope_theta),
        ("attention scale", c.attn_scale),
        ("attention soft-cap", c.attn_softcap),
        ("final logit soft-cap", c.final_softcap),
        ("embedding scale", c.embed_scale),
    ] {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0)
        {
            bail!("'{source}': {what} {v} is not a positive number: {corrupt}");
        }
    }
    Ok(())
}

/// Checks that every tensor the decoder reads is present with the element count `c` implies (names as Hugging
/// Face writes them), so that no later step indexes past a short tensor.
pub fn check_tensors(source: &str, c: &LlamaConfig, t: &HashMap<String, Vec<f32>>) -> Result<()> {
    let (d, h, v) = (c.dim, c.hidden_dim, c.vocab_size);
    let (qd, kvd, hd) = (c.q_dim(), c.kv_dim(), c.head_dim());
    let mut expect: Vec<(String, usize)> = vec![
        ("model.embed_tokens.weight".into(), v * d),
        ("model.norm.weight".into(), d),
        ("lm_head.weight".into(), v * d),
    ];
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}");
        expect.extend([
            (format!("{p}.input_layernorm.weight"), d),
            (format!("{p}.post_attention_layernorm.weight"), d),
            (format!("{p}.self_attn.q_proj.weight"), qd * d),
            (format!("{p}.self_attn.k_proj.weight"), kvd * d),
            (format!("{p}.self_attn.v_proj.weight"), kvd * d),
            (format!("{p}.self_attn.o_proj.weight"), d * qd),
            (format!("{p}.mlp.gate_proj.weight"), h * d),
            (format!("{p}.mlp.up_proj.weight"), h * d),
            (format!("{p}.mlp.down_proj.weight"), d * h),
        ]);
        if c.attn_bias {
            expect.extend([
                (format!("{p}.self_attn.q_proj.bias"), qd),
                (format!("{p}.self_attn.k_proj.bias"), kvd),
                (format!("{p}.self_attn.v_proj.bias"), kvd),
            ]);
        }
        if c.sandwich_norms {
            expect.extend([
                (format!("{p}.pre_feedforward_layernorm.weight"), d),
                (format!("{p}.post_feedforward_layernorm.weight"), d),
            ]);
        }
        if c.qk_norm {
            expect.extend([
                (format!("{p}.self_attn.q_norm.weight"), hd),
                (format!("{p}.self_attn.k_norm.weight"), hd),
            ]);
        }
    }
    for (name, n) in expect {
        match t.get(&name) {
            None => bail!(
                "'{source}': tensor '{name}' is missing (the config declares {} layers): the file is truncated or \
                 its metadata is wrong",
                c.n_layers
            ),
            Some(x) if x.len() != n => bail!(
                "'{source}': tensor '{name}' has {} values, the config implies {n} (dim {d}, feed-forward {h}, \
                 vocabulary {v}): the file's metadata does not match its tensors",
                x.len()
            ),
            _ => {}
        }
    }
    Ok(())
}
