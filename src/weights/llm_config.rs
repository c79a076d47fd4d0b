//! A decoder-only LLM's hyper-parameters as its checkpoints record them (GGUF metadata, `config.json`, llama2.c
//! headers): plain data, read by the loaders here and used by `models::llama` to emit the graph.

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LlamaConfig {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
    /// RoPE on adjacent pairs (llama2.c, Meta's reference) rather than on the two halves (Hugging Face layout).
    pub rope_interleaved: bool,
    pub tied_embeddings: bool,
    /// Biases on the q/k/v projections (Qwen2).
    #[serde(default)]
    pub attn_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// Head size when the checkpoint states one that differs from `dim / n_heads` (Qwen3's `head_dim`, GGUF
    /// `attention.key_length`); q/k/v and o_proj then have `n_heads * head_dim` features.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explicit_head_dim: Option<usize>,
    /// An RMSNorm over every head of q and of k after the projections, before RoPE (Qwen3's `q_norm` / `k_norm`,
    /// weights of `head_dim` values).
    #[serde(default)]
    pub qk_norm: bool,
    /// Sliding-window attention (Mistral, Phi-3): a query at position p sees the keys at p - w + 1 ..= p only
    /// (transformers' `sliding_window` w). None: every earlier key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
}

/// RoPE frequency scaling of long-context checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.1: low frequencies divided by `factor`, high ones kept, a smooth blend between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
}

impl LlamaConfig {
    pub fn head_dim(&self) -> usize {
        self.explicit_head_dim
            .unwrap_or(self.dim / self.n_heads.max(1))
    }

    /// Features of q (and of the attention output o_proj reads): `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim()
    }

    /// Features of k and of v: `n_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }
}

/// Hugging Face tensor names to GGUF names (`{i}` is the layer).
pub const HF_TO_GGUF: &[(&str, &str)] = &[
    ("model.embed_tokens.weight", "token_embd.weight"),
    ("model.norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    (
        "model.layers.{i}.input_layernorm.weight",
        "blk.{i}.attn_norm.weight",
    ),
    (
        "model.layers.{i}.self_attn.q_proj.weight",
        "blk.{i}.attn_q.weight",
    ),
    (
        "model.layers.{i}.self_attn.k_proj.weight",
        "blk.{i}.attn_k.weight",
    ),
    (
        "model.layers.{i}.self_attn.v_proj.weight",
        "blk.{i}.attn_v.weight",
    ),
    (
        "model.layers.{i}.self_attn.q_proj.bias",
        "blk.{i}.attn_q.bias",
    ),
    (
        "model.layers.{i}.self_attn.k_proj.bias",
        "blk.{i}.attn_k.bias",
    ),
    (
        "model.layers.{i}.self_attn.v_proj.bias",
        "blk.{i}.attn_v.bias",
    ),
    (
        "model.layers.{i}.self_attn.q_norm.weight",
        "blk.{i}.attn_q_norm.weight",
    ),
    (
        "model.layers.{i}.self_attn.k_norm.weight",
        "blk.{i}.attn_k_norm.weight",
    ),
    (
        "model.layers.{i}.self_attn.o_proj.weight",
        "blk.{i}.attn_output.weight",
    ),
    (
        "model.layers.{i}.post_attention_layernorm.weight",
        "blk.{i}.ffn_norm.weight",
    ),
    (
        "model.layers.{i}.mlp.gate_proj.weight",
        "blk.{i}.ffn_gate.weight",
    ),
    (
        "model.layers.{i}.mlp.up_proj.weight",
        "blk.{i}.ffn_up.weight",
    ),
    (
        "model.layers.{i}.mlp.down_proj.weight",
        "blk.{i}.ffn_down.weight",
    ),
];
