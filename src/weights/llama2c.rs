//! llama2.c checkpoints (legacy format v0, as karpathy's tinyllamas ship): a header of seven little-endian i32
//! (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative: separate classifier), seq_len) and f32
//! arrays in a fixed order. Tensors are exposed under Hugging Face Llama names, [out, in] layout.
use crate::weights::llm_config::LlamaConfig;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::Path;

pub struct Llama2c {
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Vec<f32>>,
}

impl Llama2c {
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| {
            format!(
                "cannot read llama2.c checkpoint '{}': check the path",
                path.display()
            )
        })?;
        if bytes.len() < 28 {
            bail!(
                "'{}' is too short for a llama2.c checkpoint ({} bytes)",
                path.display(),
                bytes.len()
            );
        }
        let h: Vec<i32> = bytes[..28]
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let (dim, hidden, layers, heads, kv_heads, vocab_signed, seq) =
            (h[0], h[1], h[2], h[3], h[4], h[5], h[6]);
        let sane = dim > 0
            && hidden > 0
            && layers > 0
            && heads > 0
            && kv_heads > 0
            && seq > 0
            && vocab_signed != 0;
        if !sane || dim % heads != 0 || heads % kv_heads != 0 || dim > 1 << 16 || layers > 1024 {
            bail!(
                "'{}' does not start with a llama2.c header (dim {dim}, hidden {hidden}, layers {layers}, heads \
                 {heads}/{kv_heads}, vocab {vocab_signed}, seq {seq}); export it with llama2.c's legacy format",
                path.display()
            );
        }
        let shared = vocab_signed > 0;
        if seq as usize > crate::weights::limits::MAX_CONTEXT
            || vocab_signed.unsigned_abs() as usize > crate::weights::limits::MAX_VOCAB
            || hidden as usize > crate::weights::limits::MAX_HIDDEN
        {
            bail!(
                "'{}': header sizes (hidden {hidden}, vocab {vocab_signed}, seq {seq}) exceed trt-diff's limits \
                 (hidden {}, vocab {}, seq {}): the file is corrupt or not a llama2.c checkpoint",
                path.display(),
                crate::weights::limits::MAX_HIDDEN,
                crate::weights::limits::MAX_VOCAB,
                crate::weights::limits::MAX_CONTEXT
            );
        }
        let vocab = vocab_signed.unsigned_abs() as usize;
        let (d, hd, l, kvd) = (
            dim as usize,
            hidden as usize,
            layers as usize,
            (dim / heads * kv_heads) as usize,
        );
        let head = d / heads as usize;
        let s = seq as usize;
        // (name, per-layer?, elements per layer or total)
        let layout: Vec<(&str, usize)> = vec![
            ("tok_embeddings", vocab * d),
            ("rms_att", l * d),
            ("wq", l * d * d),
            ("wk", l * kvd * d),
            ("wv", l * kvd * d),
            ("wo", l * d * d),
            ("rms_ffn", l * d),
            ("w1", l * hd * d),
            ("w2", l * d * hd),
            ("w3", l * hd * d),
            ("rms_final", d),
            ("freq_cis_real", s * head / 2),
            ("freq_cis_imag", s * head / 2),
        ];
        let mut need: usize = layout.iter().map(|(_, n)| n).sum();
        if !shared {
            need += vocab * d;
        }
        let have = (bytes.len() - 28) / 4;
        if have < need {
            bail!(
                "'{}' is truncated: the header describes {need} weights, the file holds {have}; re-download it",
                path.display()
            );
        }
        let mut off = 28;
        let mut raw: HashMap<&str, Vec<f32>> = HashMap::new();
        let mut take = |n: usize| {
            let v: Vec<f32> = bytes[off..off + 4 * n]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            off += 4 * n;
            v
        };
        for (name, n) in &layout {
            raw.insert(name, take(*n));
        }
        let classifier = if shared {
            raw["tok_embeddings"].clone()
        } else {
            take(vocab * d)
        };
        let mut tensors = HashMap::new();
        let per_layer = |name: &str, i: usize, n: usize| raw[name][i * n..(i + 1) * n].to_vec();
        for i in 0..l {
            let p = format!("model.layers.{i}");
            tensors.insert(
                format!("{p}.input_layernorm.weight"),
                per_layer("rms_att", i, d),
            );
            tensors.insert(
                format!("{p}.self_attn.q_proj.weight"),
                per_layer("wq", i, d * d),
            );
            tensors.insert(
                format!("{p}.self_attn.k_proj.weight"),
                per_layer("wk", i, kvd * d),
            );
            tensors.insert(
                format!("{p}.self_attn.v_proj.weight"),
                per_layer("wv", i, kvd * d),
            );
            tensors.insert(
                format!("{p}.self_attn.o_proj.weight"),
                per_layer("wo", i, d * d),
            );
            tensors.insert(
                format!("{p}.post_attention_layernorm.weight"),
                per_layer("rms_ffn", i, d),
            );
            tensors.insert(
                format!("{p}.mlp.gate_proj.weight"),
                per_layer("w1", i, hd * d),
            );
            tensors.insert(
                format!("{p}.mlp.down_proj.weight"),
                per_layer("w2", i, d * hd),
            );
            tensors.insert(
                format!("{p}.mlp.up_proj.weight"),
                per_layer("w3", i, hd * d),
            );
        }
        tensors.insert(
            "model.embed_tokens.weight".into(),
            raw["tok_embeddings"].clone(),
        );
        tensors.insert("model.norm.weight".into(), raw["rms_final"].clone());
        tensors.insert("lm_head.weight".into(), classifier);
        Ok(Llama2c {
            config: LlamaConfig {
                dim: d,
                hidden_dim: hd,
                n_layers: l,
                n_heads: heads as usize,
                n_kv_heads: kv_heads as usize,
                vocab_size: vocab,
                max_seq_len: s,
                rope_theta: 10000.0,
                norm_eps: 1e-5,
                rope_interleaved: true,
                tied_embeddings: shared,
                ..LlamaConfig::default()
            },
            tensors,
        })
    }
}
