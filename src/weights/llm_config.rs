//! A decoder-only LLM's hyper-parameters as its checkpoints record them (GGUF metadata, `config.json`, llama2.c
//! headers): plain data, read by the loaders here and used by `models::llama` to emit the graph.

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Which layers the window applies to: layer i is windowed when `i % n < n - 1` (llama.cpp's SWA pattern;
    /// Gemma 2: 2, every other layer; Gemma 3: 6, five local layers to one global). None: every layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub swa_pattern: Option<usize>,
    /// RoPE base of the windowed layers, which then take no RoPE scaling (Gemma 3's `rope_local_base_freq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rope_theta: Option<f32>,
    /// The factor on attention scores when it is not `1 / sqrt(head_dim)` (Gemma's `query_pre_attn_scalar^-0.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_scale: Option<f32>,
    /// `c * tanh(x / c)` on attention scores and on the final logits (Gemma 2's soft-capping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_softcap: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_softcap: Option<f32>,
    /// The factor on token embeddings (Gemma: `sqrt(dim)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embed_scale: Option<f32>,
    /// Gemma 2/3's extra RMSNorms on the attention's and the MLP's outputs before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`); the MLP's input norm is then
    /// `pre_feedforward_layernorm`.
    #[serde(default)]
    pub sandwich_norms: bool,
    #[serde(default)]
    pub mlp_act: MlpAct,
}

/// The `swa_pattern` that windows exactly the layers marked true, when one does: `Some(None)` for all of them
/// (no pattern needed), None when no pattern of llama.cpp's form (`i % n < n - 1`) fits.
pub fn swa_pattern_of(windowed: &[bool]) -> Option<Option<usize>> {
    if windowed.iter().all(|&w| w) {
        return Some(None);
    }
    (1..=windowed.len().max(1))
        .find(|&n| {
            windowed
                .iter()
                .enumerate()
                .all(|(i, &w)| w == (i % n + 1 < n))
        })
        .map(Some)
}

/// The gated MLP's activation: `act(x W_gate^T) * (x W_up^T)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpAct {
    /// SwiGLU (Llama, Qwen, Mistral, Phi-3).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

impl MlpAct {
    /// The `activation` attribute of trt-diff's gated CPU operators (absent: SiLU).
    pub fn attr(self) -> i64 {
        match self {
            MlpAct::Silu => 0,
            MlpAct::GeluTanh => 1,
        }
    }

    pub fn from_attr(a: Option<i64>) -> Option<MlpAct> {
        match a {
            None | Some(0) => Some(MlpAct::Silu),
            Some(1) => Some(MlpAct::GeluTanh),
            _ => None,
        }
    }

    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            MlpAct::Silu => x / (1.0 + (-x).exp()),
            MlpAct::GeluTanh => {
                const SQRT_2_OVER_PI: f32 = 0.797_884_6;
                0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
            }
        }
    }
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

    /// Drops a pattern that marks no layer local (and the local RoPE with it) or every layer, so that one model
    /// read from two files compares equal. A window dropped because it covers the whole context keeps the pattern
    /// and the local RoPE: Gemma 3's local layers still take their own RoPE base.
    pub fn normalize_window(&mut self) {
        if self.swa_pattern == Some(1) {
            self.sliding_window = None;
            self.local_rope_theta = None;
            self.swa_pattern = None;
        }
        if self.swa_pattern.is_some_and(|n| n > self.n_layers) {
            self.swa_pattern = None;
        }
        if self.sliding_window.is_none() && self.local_rope_theta.is_none() {
            self.swa_pattern = None;
        }
    }

    /// Whether layer `i` is a local (windowed) layer of the pattern (`swa_pattern`; every layer without one).
    fn is_local(&self, i: usize) -> bool {
        self.swa_pattern.is_none_or(|n| i % n + 1 < n)
    }

    /// The attention window of layer `i` (see `sliding_window`, `swa_pattern`).
    pub fn layer_window(&self, i: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_local(i))
    }

    /// Whether layer `i` takes the local RoPE (`local_rope_theta`) rather than the global one.
    pub fn local_rope(&self, i: usize) -> bool {
        self.local_rope_theta.is_some() && self.is_local(i)
    }

    pub fn attention_scale(&self) -> f32 {
        self.attn_scale
            .unwrap_or(1.0 / (self.head_dim() as f32).sqrt())
    }

    /// The config of the local layers' RoPE: their base and no scaling.
    pub fn local_rope_config(&self) -> Option<LlamaConfig> {
        self.local_rope_theta.map(|theta| LlamaConfig {
            rope_theta: theta,
            rope_scaling: None,
            ..self.clone()
        })
    }
}

/// Hugging Face tensor names to GGUF names (`{i}` is the layer), with Gemma's norms where `c` has them.
pub fn hf_to_gguf(c: &LlamaConfig) -> Vec<(&'static str, &'static str)> {
    if !c.sandwich_norms {
        return HF_TO_GGUF.to_vec();
    }
    let mut t: Vec<_> = HF_TO_GGUF
        .iter()
        .map(|&(hf, gg)| match hf {
            "model.layers.{i}.post_attention_layernorm.weight" => {
                (hf, "blk.{i}.post_attention_norm.weight")
            }
            _ => (hf, gg),
        })
        .collect();
    t.extend(SANDWICH_TO_GGUF);
    t
}

const SANDWICH_TO_GGUF: [(&str, &str); 2] = [
    (
        "model.layers.{i}.pre_feedforward_layernorm.weight",
        "blk.{i}.ffn_norm.weight",
    ),
    (
        "model.layers.{i}.post_feedforward_layernorm.weight",
        "blk.{i}.post_ffw_norm.weight",
    ),
];

/// Hugging Face tensor names to GGUF names (`{i}` is the layer) of the Llama-shaped models.
const HF_TO_GGUF: &[(&str, &str)] = &[
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
