//! Llama-family decoder (Llama 2, llama2.c's models; Qwen2 and Qwen3 share the shape) as one ONNX graph that serves both
//! prefill and decode: new tokens plus the KV cache of earlier positions in, logits plus the extended cache out.
//!
//! Inputs: `input_ids` [1, seq] int64, `position_ids` [1, seq] int64 (absolute positions of the new tokens),
//! `past_key_{i}` / `past_value_{i}` [1, n_kv_heads, past, head_dim] f32 (past may be 0).
//! Outputs: `logits` [1, seq, vocab], `present_key_{i}` / `present_value_{i}` [1, n_kv_heads, past+seq, head_dim].
//! Grouped-query attention multiplies q reshaped to [1, kv, rep, seq, hd] with k/v broadcast over `rep`, so the
//! cache is never repeated in memory.
use crate::models::ops::Ops;
use crate::models::qdq::{BlockTable, LinearWeights, Linears, Weight, linear_int_blocks};
use crate::onnx::{Attr, DataType, Dim, GraphBuilder, Value, proto::ModelProto};
use crate::quant::LinearPrecision;
use crate::quant::int::{Bits, IntBlocks};
use crate::quant::policy::Policy;
pub use crate::weights::llm_config::{LlamaConfig, MlpAct, RopeScaling};
use anyhow::{Context, Result};
use std::collections::HashMap;

/// Inverse RoPE frequencies per pair (transformers' rope init functions; `factors`: GGUF `rope_freqs`).
pub fn rope_inv_freq(cfg: &LlamaConfig, factors: Option<&[f32]>) -> Vec<f64> {
    let hd = cfg.head_dim();
    (0..hd / 2)
        .map(|j| {
            let f = 1.0 / (cfg.rope_theta as f64).powf((2 * j) as f64 / hd as f64);
            let f = match cfg.rope_scaling {
                None => f,
                Some(RopeScaling::Linear { factor }) => f / factor as f64,
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_context,
                }) => {
                    let (factor, lo, hi) = (
                        factor as f64,
                        low_freq_factor as f64,
                        high_freq_factor as f64,
                    );
                    let orig = original_context as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen > orig / lo {
                        f / factor
                    } else if wavelen < orig / hi {
                        f
                    } else {
                        let smooth = (orig / wavelen - lo) / (hi - lo);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                }
            };
            f / factors.and_then(|v| v.get(j)).map_or(1.0, |&x| x as f64)
        })
        .collect()
}

const F32: DataType = DataType::FLOAT;

fn seq() -> Dim {
    Dim::Sym("seq".into())
}

struct Emitter<'a> {
    o: Ops,
    cfg: &'a LlamaConfig,
    w: &'a HashMap<String, Vec<f32>>,
    linears: Linears<'a>,
    blocks: &'a HashMap<String, IntBlocks>,
    /// See [`DecoderOptions::int4_only`].
    int4_only: bool,
}

impl Emitter<'_> {
    fn weight(&self, name: &str) -> Result<&Vec<f32>> {
        self.w
            .get(name)
            .with_context(|| format!("checkpoint has no tensor '{name}'"))
    }

    fn const_i64(&mut self, base: &str, v: &[i64]) -> Result<Value> {
        let name = self.o.g.fresh(base);
        self.o.g.const_i64(&name, &[v.len() as i64], v)
    }

    fn op(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        dtype: DataType,
    ) -> Result<Value> {
        self.o.g.op(op, name, inputs, attrs, dtype, vec![])
    }

    fn rms_norm(&mut self, name: &str, x: &Value, weight: &str) -> Result<Value> {
        let w = self.weight(weight)?.clone();
        let wv = self.o.g.const_f32(weight, &[w.len() as i64], &w)?;
        let eps = self
            .o
            .g
            .const_f32(&format!("{name}.eps"), &[], &[self.cfg.norm_eps])?;
        let sq = self.op("Mul", &format!("{name}/sq"), &[x, x], vec![], F32)?;
        let axes = self.const_i64(&format!("{name}.axes"), &[-1])?;
        let ms = self.op(
            "ReduceMean",
            &format!("{name}/mean"),
            &[&sq, &axes],
            vec![("keepdims", Attr::Int(1))],
            F32,
        )?;
        let ms = self.op("Add", &format!("{name}/eps_add"), &[&ms, &eps], vec![], F32)?;
        let rms = self.op("Sqrt", &format!("{name}/sqrt"), &[&ms], vec![], F32)?;
        let y = self.op("Div", &format!("{name}/div"), &[x, &rms], vec![], F32)?;
        let mut out = self.op("Mul", &format!("{name}/scale"), &[&y, &wv], vec![], F32)?;
        out.shape = x.shape.clone();
        Ok(out)
    }

    fn proj(&mut self, name: &str, x: &Value, out: usize, inp: usize) -> Result<Value> {
        let bias = self.w.get(&format!("{name}.bias")).cloned();
        if let Some(b) = self.blocks.get(&format!("{name}.weight")) {
            return self.int_blocks_linear(name, x, b, bias.as_deref());
        }
        let w = self.weight(&format!("{name}.weight"))?.clone();
        let lw = LinearWeights {
            weight: &w,
            bias: bias.as_deref(),
            out_features: out,
            in_features: inp,
        };
        self.linears
            .linear(&mut self.o, name, name, name, x, Weight::F32(lw))
    }

    /// What INT4/INT8 block products compute in: f16 (TensorRT's W4A16), f32 for models whose activations outgrow
    /// f16 (Gemma's scaled embeddings).
    fn blocks_compute(&self) -> DataType {
        if self.cfg.embed_scale.is_some() {
            F32
        } else {
            DataType::FLOAT16
        }
    }

    /// A projection whose weights stay in the checkpoint's INT4/INT8 blocks (`--precision gguf`).
    fn int_blocks_linear(
        &mut self,
        name: &str,
        x: &Value,
        b: &IntBlocks,
        bias: Option<&[f32]>,
    ) -> Result<Value> {
        let label = match b.bits {
            Bits::Int8 => "int8 weights",
            Bits::Int4 => "int4 weights",
        };
        *self.linears.counts.entry(label.into()).or_default() += 1;
        let compute = self.blocks_compute();
        linear_int_blocks(&mut self.o.g, name, x, b, bias, compute, self.int4_only)
    }

    /// Rotary embedding on [1, seq, heads, hd] with cos/sin [1, seq, hd/2] gathered by position.
    fn rope(&mut self, name: &str, x: &Value, cos: &Value, sin: &Value) -> Result<Value> {
        let hd = self.cfg.head_dim() as i64;
        let (x0, x1) = if self.cfg.rope_interleaved {
            let pairs = self.const_i64(&format!("{name}.pairs"), &[0, 0, 0, hd / 2, 2])?;
            let xp = self.op(
                "Reshape",
                &format!("{name}/pairs"),
                &[x, &pairs],
                vec![],
                F32,
            )?;
            (
                self.slice(name, &xp, 0, 1, -1)?,
                self.slice(name, &xp, 1, 2, -1)?,
            )
        } else {
            (
                self.slice(name, x, 0, hd / 2, -1)?,
                self.slice(name, x, hd / 2, hd, -1)?,
            )
        };
        // cos/sin broadcast over heads (and over the pair axis when interleaved).
        let axes: &[i64] = if self.cfg.rope_interleaved {
            &[2, 4]
        } else {
            &[2]
        };
        let ax = self.const_i64(&format!("{name}.bcast"), axes)?;
        let c = self.op(
            "Unsqueeze",
            &format!("{name}/cos"),
            &[cos, &ax],
            vec![],
            F32,
        )?;
        let s = self.op(
            "Unsqueeze",
            &format!("{name}/sin"),
            &[sin, &ax],
            vec![],
            F32,
        )?;
        let a = self.op("Mul", &format!("{name}/x0c"), &[&x0, &c], vec![], F32)?;
        let b = self.op("Mul", &format!("{name}/x1s"), &[&x1, &s], vec![], F32)?;
        let r0 = self.op("Sub", &format!("{name}/r0"), &[&a, &b], vec![], F32)?;
        let a = self.op("Mul", &format!("{name}/x0s"), &[&x0, &s], vec![], F32)?;
        let b = self.op("Mul", &format!("{name}/x1c"), &[&x1, &c], vec![], F32)?;
        let r1 = self.op("Add", &format!("{name}/r1"), &[&a, &b], vec![], F32)?;
        let cat = self.op(
            "Concat",
            &format!("{name}/cat"),
            &[&r0, &r1],
            vec![("axis", Attr::Int(-1))],
            F32,
        )?;
        if self.cfg.rope_interleaved {
            let back = self.const_i64(&format!("{name}.unpairs"), &[0, 0, 0, hd])?;
            self.op(
                "Reshape",
                &format!("{name}/unpairs"),
                &[&cat, &back],
                vec![],
                F32,
            )
        } else {
            Ok(cat)
        }
    }

    fn slice(&mut self, name: &str, x: &Value, start: i64, end: i64, axis: i64) -> Result<Value> {
        let s = self.const_i64(&format!("{name}.s{start}"), &[start])?;
        let e = self.const_i64(&format!("{name}.e{end}"), &[end])?;
        let a = self.const_i64(&format!("{name}.a"), &[axis])?;
        self.op(
            "Slice",
            &format!("{name}/slice{start}"),
            &[x, &s, &e, &a],
            vec![],
            F32,
        )
    }

    /// `c * tanh(x / c)`.
    fn softcap(&mut self, name: &str, x: &Value, cap: f32) -> Result<Value> {
        let cv = self.o.g.const_f32(&format!("{name}.cap"), &[], &[cap])?;
        let y = self.op("Div", &format!("{name}/div"), &[x, &cv], vec![], F32)?;
        let y = self.op("Tanh", &format!("{name}/tanh"), &[&y], vec![], F32)?;
        let mut y = self.op("Mul", &format!("{name}/mul"), &[&y, &cv], vec![], F32)?;
        y.shape = x.shape.clone();
        Ok(y)
    }

    fn layer(
        &mut self,
        i: usize,
        h: &Value,
        shared: &LayerInputs,
        past: Option<(&Value, &Value)>,
    ) -> Result<Value> {
        let c = self.cfg.clone();
        let local = c.layer_window(i).is_some();
        let [cos, sin] = if c.local_rope(i) {
            &shared.local_rope
        } else {
            &shared.rope
        };
        let mask = if local {
            &shared.window_mask
        } else {
            &shared.causal_mask
        };
        let (d, hd, kv, heads) = (c.dim, c.head_dim(), c.n_kv_heads, c.n_heads);
        let p = format!("model.layers.{i}");
        let xn = self.rms_norm(
            &format!("{p}.input_layernorm"),
            h,
            &format!("{p}.input_layernorm.weight"),
        )?;
        let q = self.proj(&format!("{p}.self_attn.q_proj"), &xn, c.q_dim(), d)?;
        let k = self.proj(&format!("{p}.self_attn.k_proj"), &xn, kv * hd, d)?;
        let v = self.proj(&format!("{p}.self_attn.v_proj"), &xn, kv * hd, d)?;
        let qs = self.const_i64(&format!("{p}.q_shape"), &[0, 0, heads as i64, hd as i64])?;
        let ks = self.const_i64(&format!("{p}.kv_shape"), &[0, 0, kv as i64, hd as i64])?;
        let q = self.op("Reshape", &format!("{p}/q_heads"), &[&q, &qs], vec![], F32)?;
        let k = self.op("Reshape", &format!("{p}/k_heads"), &[&k, &ks], vec![], F32)?;
        let v = self.op("Reshape", &format!("{p}/v_heads"), &[&v, &ks], vec![], F32)?;
        // Qwen3: RMSNorm over each head of q and k (weights of head_dim values), before RoPE.
        let (q, k) = if c.qk_norm {
            let a = format!("{p}.self_attn");
            (
                self.rms_norm(&format!("{a}.q_norm"), &q, &format!("{a}.q_norm.weight"))?,
                self.rms_norm(&format!("{a}.k_norm"), &k, &format!("{a}.k_norm.weight"))?,
            )
        } else {
            (q, k)
        };
        let q = self.rope(&format!("{p}.rope_q"), &q, cos, sin)?;
        let k = self.rope(&format!("{p}.rope_k"), &k, cos, sin)?;
        let perm = || vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))];
        let q = self.op("Transpose", &format!("{p}/q_t"), &[&q], perm(), F32)?;
        let k = self.op("Transpose", &format!("{p}/k_t"), &[&k], perm(), F32)?;
        let v = self.op("Transpose", &format!("{p}/v_t"), &[&v], perm(), F32)?;
        let cache_shape = |len: &str| {
            vec![
                Dim::Fixed(1),
                Dim::Fixed(kv as i64),
                Dim::Sym(len.into()),
                Dim::Fixed(hd as i64),
            ]
        };
        // A decoder extends and returns the KV cache; an encoder attends to this call's tokens only.
        let (k_all, v_all) = match past {
            Some((pk, pv)) => {
                let cat = || vec![("axis", Attr::Int(2))];
                let mut k_all =
                    self.op("Concat", &format!("present_key_{i}"), &[pk, &k], cat(), F32)?;
                let mut v_all = self.op(
                    "Concat",
                    &format!("present_value_{i}"),
                    &[pv, &v],
                    cat(),
                    F32,
                )?;
                k_all.shape = cache_shape("total");
                v_all.shape = cache_shape("total");
                self.o.g.output(&k_all);
                self.o.g.output(&v_all);
                (k_all, v_all)
            }
            None => (k, v),
        };
        // Grouped-query attention without repeating the cache: q as [1, kv, rep, seq, hd], k/v as [1, kv, 1, T, hd].
        let rep = (heads / kv) as i64;
        let qg = self.const_i64(
            &format!("{p}.q_groups"),
            &[1, kv as i64, rep, -1, hd as i64],
        )?;
        let q = self.op("Reshape", &format!("{p}/q_groups"), &[&q, &qg], vec![], F32)?;
        let ax = self.const_i64(&format!("{p}.kv_axis"), &[2])?;
        let k5 = self.op("Unsqueeze", &format!("{p}/k5"), &[&k_all, &ax], vec![], F32)?;
        let v5 = self.op("Unsqueeze", &format!("{p}/v5"), &[&v_all, &ax], vec![], F32)?;
        let kt = self.op(
            "Transpose",
            &format!("{p}/k5_t"),
            &[&k5],
            vec![("perm", Attr::Ints(vec![0, 1, 2, 4, 3]))],
            F32,
        )?;
        let scores = self.op("MatMul", &format!("{p}/qk"), &[&q, &kt], vec![], F32)?;
        let scale = self
            .o
            .g
            .const_f32(&format!("{p}.attn_scale"), &[], &[c.attention_scale()])?;
        let scores = self.op(
            "Mul",
            &format!("{p}/scaled"),
            &[&scores, &scale],
            vec![],
            F32,
        )?;
        let scores = match c.attn_softcap {
            Some(cap) => self.softcap(&format!("{p}/softcap"), &scores, cap)?,
            None => scores,
        };
        let scores = self.op("Add", &format!("{p}/masked"), &[&scores, mask], vec![], F32)?;
        let probs = self.op(
            "Softmax",
            &format!("{p}/softmax"),
            &[&scores],
            vec![("axis", Attr::Int(-1))],
            F32,
        )?;
        let ctx = self.op("MatMul", &format!("{p}/pv"), &[&probs, &v5], vec![], F32)?;
        let hs = self.const_i64(
            &format!("{p}.heads_shape"),
            &[1, heads as i64, -1, hd as i64],
        )?;
        let ctx = self.op(
            "Reshape",
            &format!("{p}/ctx_heads"),
            &[&ctx, &hs],
            vec![],
            F32,
        )?;
        let ctx = self.op("Transpose", &format!("{p}/ctx_t"), &[&ctx], perm(), F32)?;
        let qd = c.q_dim() as i64;
        let flat = self.const_i64(&format!("{p}.flat"), &[1, -1, qd])?;
        let mut ctx = self.op("Reshape", &format!("{p}/ctx"), &[&ctx, &flat], vec![], F32)?;
        ctx.shape = vec![Dim::Fixed(1), seq(), Dim::Fixed(qd)];
        let mut o = self.proj(&format!("{p}.self_attn.o_proj"), &ctx, d, c.q_dim())?;
        // Gemma: the attention's output is normed before the residual add, and the MLP's input norm is its own.
        let ffn_norm = if c.sandwich_norms {
            o.shape = vec![Dim::Fixed(1), seq(), Dim::Fixed(d as i64)];
            o = self.rms_norm(
                &format!("{p}.post_attention_layernorm"),
                &o,
                &format!("{p}.post_attention_layernorm.weight"),
            )?;
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        };
        let mut h = self.op("Add", &format!("{p}/attn_residual"), &[h, &o], vec![], F32)?;
        h.shape = vec![Dim::Fixed(1), seq(), Dim::Fixed(d as i64)];
        let xn = self.rms_norm(
            &format!("{p}.{ffn_norm}"),
            &h,
            &format!("{p}.{ffn_norm}.weight"),
        )?;
        let gate = self.proj(&format!("{p}.mlp.gate_proj"), &xn, c.hidden_dim, d)?;
        let up = self.proj(&format!("{p}.mlp.up_proj"), &xn, c.hidden_dim, d)?;
        let gate = match c.mlp_act {
            MlpAct::Silu => self.o.silu(&format!("{p}/silu"), &gate)?,
            MlpAct::GeluTanh => self.o.gelu_tanh(&format!("{p}/gelu"), &gate)?,
        };
        let mut act = self.op("Mul", &format!("{p}/gated"), &[&gate, &up], vec![], F32)?;
        act.shape = vec![Dim::Fixed(1), seq(), Dim::Fixed(c.hidden_dim as i64)];
        let mut down = self.proj(&format!("{p}.mlp.down_proj"), &act, d, c.hidden_dim)?;
        if c.sandwich_norms {
            down.shape = h.shape.clone();
            down = self.rms_norm(
                &format!("{p}.post_feedforward_layernorm"),
                &down,
                &format!("{p}.post_feedforward_layernorm.weight"),
            )?;
        }
        let mut out = self.op(
            "Add",
            &format!("{p}/ffn_residual"),
            &[&h, &down],
            vec![],
            F32,
        )?;
        out.shape = h.shape.clone();
        Ok(out)
    }
}

/// What every layer reads besides its weights: RoPE's cos/sin rows of this call's positions (the local layers' own
/// where `local_rope_theta` is set) and the additive attention masks (the windowed one where `sliding_window` is).
struct LayerInputs {
    rope: [Value; 2],
    local_rope: [Value; 2],
    causal_mask: Value,
    window_mask: Value,
}

/// The `past_key_{i}` / `past_value_{i}` inputs [1, n_kv_heads, `positions`, `hd`] of every layer, in `dtype`.
pub(crate) fn cache_inputs(
    g: &mut GraphBuilder,
    cfg: &LlamaConfig,
    batch: Dim,
    positions: &str,
    hd: usize,
    dtype: DataType,
) -> Result<Vec<[Value; 2]>> {
    let shape = vec![
        batch,
        Dim::Fixed(cfg.n_kv_heads as i64),
        Dim::Sym(positions.into()),
        Dim::Fixed(hd as i64),
    ];
    (0..cfg.n_layers)
        .map(|i| {
            Ok([
                g.input(&format!("past_key_{i}"), dtype, shape.clone())?,
                g.input(&format!("past_value_{i}"), dtype, shape.clone())?,
            ])
        })
        .collect()
}

/// RoPE's cos and sin [.., `pairs`] (f32) at `positions` (int64, any shape): the angles `position * inv_freq`
/// computed in f32 as transformers computes them; pairs beyond the model's (padded heads) get angle 0. Computed on
/// each call rather than stored: tables for every position of a 131,072-token context are 34 MB per graph.
pub(crate) fn rope_at(
    g: &mut GraphBuilder,
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    pairs: usize,
    positions: &Value,
) -> Result<[Value; 2]> {
    rope_at_named(g, "rope", cfg, weights, pairs, positions)
}

/// The local layers' RoPE ([`rope_at`] at `local_rope_theta`), when the model has them.
pub(crate) fn local_rope_at(
    g: &mut GraphBuilder,
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    pairs: usize,
    positions: &Value,
) -> Result<Option<[Value; 2]>> {
    cfg.local_rope_config()
        .map(|local| rope_at_named(g, "rope_local", &local, weights, pairs, positions))
        .transpose()
}

fn rope_at_named(
    g: &mut GraphBuilder,
    name: &str,
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    pairs: usize,
    positions: &Value,
) -> Result<[Value; 2]> {
    let mut inv_freq = rope_inv_freq(cfg, weights.get("rope.freq_factors").map(|v| &v[..]));
    inv_freq.resize(pairs, 0.0);
    let inv_freq: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
    let freqs = g.const_f32(&format!("{name}.inv_freq"), &[pairs as i64], &inv_freq)?;
    let pos = g.cast(&format!("{name}/positions"), positions, F32)?;
    let last = g.const_i64(&format!("{name}.pair_axis"), &[1], &[-1])?;
    let mut column = pos.shape.clone();
    column.push(Dim::Fixed(1));
    let pos = g.op(
        "Unsqueeze",
        &format!("{name}/position_column"),
        &[&pos, &last],
        vec![],
        F32,
        column,
    )?;
    let mut shape = positions.shape.clone();
    shape.push(Dim::Fixed(pairs as i64));
    let angles = g.op(
        "Mul",
        &format!("{name}/angles"),
        &[&pos, &freqs],
        vec![],
        F32,
        shape.clone(),
    )?;
    Ok([
        g.op(
            "Cos",
            &format!("{name}/cos"),
            &[&angles],
            vec![],
            F32,
            shape.clone(),
        )?,
        g.op(
            "Sin",
            &format!("{name}/sin"),
            &[&angles],
            vec![],
            F32,
            shape,
        )?,
    ])
}

/// The decoder graph with weights under Hugging Face names; `policy` picks each projection's precision.
pub fn decoder_graph(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    policy: &Policy,
) -> Result<ModelProto> {
    decoder_graph_with(cfg, weights, policy, false)
}

/// The decoder as a text encoder (Z-Image's Qwen3, diffusers' `hidden_states[-2]`): `input_ids` [1, seq] int64 in
/// (positions 0..seq, causal attention, no KV cache), `hidden_states` [1, seq, dim] out: the residual stream after
/// the first `layers` layers, before the final norm. Weights of later layers and the LM head are not read.
pub fn encoder_graph(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    policy: &Policy,
    layers: usize,
) -> Result<ModelProto> {
    encoder_graph_opts(
        cfg,
        weights,
        &EncoderOptions {
            policy,
            taps: &[layers],
            attention_mask: false,
        },
    )
}

/// How [`encoder_graph_opts`] cuts the decoder into a text encoder.
pub struct EncoderOptions<'a> {
    pub policy: &'a Policy,
    /// The residual stream after each of these layer counts (transformers' `hidden_states[k]`, no final norm),
    /// side by side per token: `hidden_states` is [1, seq, taps.len() * dim] (FLUX.2 [klein]: 9, 18, 27).
    pub taps: &'a [usize],
    /// An `attention_mask` [1, seq] int64 input (1 = token, 0 = padding, transformers' convention): padding keys
    /// are hidden from every query, so padded positions attend to the prompt only, as transformers computes them.
    pub attention_mask: bool,
}

/// The decoder as a text encoder returning the hidden states of several layers ([`EncoderOptions`]).
pub fn encoder_graph_opts(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    o: &EncoderOptions,
) -> Result<ModelProto> {
    if o.taps.is_empty() || o.taps.iter().any(|&l| l == 0 || l > cfg.n_layers) {
        anyhow::bail!(
            "an encoder of the hidden states after layers {:?} from a model of {} layers",
            o.taps,
            cfg.n_layers
        );
    }
    graph(
        cfg,
        weights,
        o.policy,
        Mode::Encoder {
            taps: o.taps,
            attention_mask: o.attention_mask,
        },
    )
}

#[derive(Clone, Copy)]
enum Mode<'a> {
    Decoder {
        last_logits_only: bool,
    },
    Encoder {
        taps: &'a [usize],
        attention_mask: bool,
    },
}

/// As [`decoder_graph`]; with `last_logits_only` the LM head runs on the last position only (`logits` is
/// [1, 1, vocab]): generation samples only that row, and prefill skips a [seq, vocab] product.
pub fn decoder_graph_with(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    policy: &Policy,
    last_logits_only: bool,
) -> Result<ModelProto> {
    graph(cfg, weights, policy, Mode::Decoder { last_logits_only })
}

/// How [`decoder_graph_opts`] emits the decoder.
pub struct DecoderOptions<'a> {
    pub policy: &'a Policy,
    /// The LM head on the last position only (see [`decoder_graph_with`]).
    pub last_logits_only: bool,
    /// Calibrated input activation maxima by layer name; layers without one get a static 8 (RMS-normed inputs of
    /// these models stay within a few units).
    pub amax: &'a HashMap<String, f32>,
    /// Adds an `amax.<layer>` output per linear layer's input (see [`Linears`]).
    pub calibration: bool,
    /// Matrices kept in INT4/INT8 blocks by Hugging Face name (a GGUF's formats, `--precision gguf`); the policy
    /// decides the others.
    pub blocks: Option<&'a HashMap<String, IntBlocks>>,
    /// The graph runs on ONNX Runtime's CUDA provider too (an ONNX-only or `--keep-onnx` build): blocks use INT4
    /// DQs only ([`BlockTable::new`]) under f16 scales (no INT8 DQ of K-quant scales).
    pub int4_only: bool,
}

/// The decoder graph and its linear layers (name, shape), as `build --precision auto` measures them.
pub fn decoder_graph_opts(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    o: &DecoderOptions,
) -> Result<(ModelProto, Vec<crate::quant::auto::LinearShape>)> {
    let mode = Mode::Decoder {
        last_logits_only: o.last_logits_only,
    };
    emit(cfg, weights, o, mode)
}

fn graph(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    policy: &Policy,
    mode: Mode,
) -> Result<ModelProto> {
    let amax = HashMap::new();
    let o = DecoderOptions {
        policy,
        last_logits_only: matches!(
            mode,
            Mode::Decoder {
                last_logits_only: true
            }
        ),
        amax: &amax,
        calibration: false,
        blocks: None,
        int4_only: false,
    };
    Ok(emit(cfg, weights, &o, mode)?.0)
}

fn emit(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    opts: &DecoderOptions,
    mode: Mode,
) -> Result<(ModelProto, Vec<crate::quant::auto::LinearShape>)> {
    let policy = opts.policy;
    let no_blocks = HashMap::new();
    let blocks = opts.blocks.unwrap_or(&no_blocks);
    // Blocked DQ needs opset 21.
    let min_blocks = if blocks.is_empty() { 18 } else { 21 };
    let opset = policy.target.min_opset().max(min_blocks);
    let mut e = Emitter {
        blocks,
        int4_only: opts.int4_only,
        o: Ops::new("llama_decoder", opset, F32),
        cfg,
        w: weights,
        linears: Linears::new(Some(policy), opts.amax, Some(8.0), 8.0, opts.calibration),
    };
    if policy.target == LinearPrecision::Nvfp4 {
        e.o.g.use_domain("trt", 1);
    }
    let (d, hd) = (cfg.dim, cfg.head_dim());
    let ids =
        e.o.g
            .input("input_ids", DataType::INT64, vec![Dim::Fixed(1), seq()])?;
    let i64t = DataType::INT64;
    let ids_shape = e.op("Shape", "mask/ids_shape", &[&ids], vec![], i64t)?;
    let one = e.o.g.const_i64("mask.one", &[], &[1])?;
    let new_len = e.op("Gather", "mask/new_len", &[&ids_shape, &one], vec![], i64t)?;
    let zero = e.o.g.const_i64("mask.zero", &[], &[0])?;
    let (pos, past, total) = match mode {
        Mode::Decoder { .. } => {
            let pos =
                e.o.g
                    .input("position_ids", DataType::INT64, vec![Dim::Fixed(1), seq()])?;
            let past = cache_inputs(&mut e.o.g, cfg, Dim::Fixed(1), "past", hd, F32)?;
            let past_shape = e.op("Shape", "mask/past_shape", &[&past[0][0]], vec![], i64t)?;
            let two = e.o.g.const_i64("mask.two", &[], &[2])?;
            let past_len = e.op(
                "Gather",
                "mask/past_len",
                &[&past_shape, &two],
                vec![],
                i64t,
            )?;
            let total = e.op("Add", "mask/total", &[&past_len, &new_len], vec![], i64t)?;
            (pos, Some(past), total)
        }
        Mode::Encoder { .. } => {
            let r = e.op("Range", "positions", &[&zero, &new_len, &one], vec![], i64t)?;
            let ax = e.const_i64("positions.batch", &[0])?;
            let mut pos = e.op("Unsqueeze", "position_ids", &[&r, &ax], vec![], i64t)?;
            pos.shape = vec![Dim::Fixed(1), seq()];
            (pos, None, new_len.clone())
        }
    };
    // The table in blocks (`--precision gguf`) serves the lookup and a tied head; a float one, the lookup.
    let block_table = match blocks.get("model.embed_tokens.weight") {
        Some(b) => {
            let compute = e.blocks_compute();
            Some(BlockTable::new(
                &mut e.o.g,
                "model.embed_tokens",
                b,
                compute,
                opts.int4_only,
            )?)
        }
        None => None,
    };
    let mut h = match &block_table {
        Some(t) => t.lookup(&mut e.o.g, "embed", &ids)?,
        None => {
            let emb = e.weight("model.embed_tokens.weight")?.clone();
            let table = e.o.g.const_f32(
                "model.embed_tokens.weight",
                &[cfg.vocab_size as i64, d as i64],
                &emb,
            )?;
            e.op("Gather", "embed", &[&table, &ids], vec![], F32)?
        }
    };
    if let Some(scale) = cfg.embed_scale {
        let sv = e.o.g.const_f32("embed.scale", &[], &[scale])?;
        h = e.op("Mul", "embed/scaled", &[&h, &sv], vec![], F32)?;
    }
    h.shape = vec![Dim::Fixed(1), seq(), Dim::Fixed(d as i64)];
    // RoPE at each token's absolute position.
    let rope = rope_at(&mut e.o.g, cfg, weights, hd / 2, &pos)?;
    let local_rope =
        local_rope_at(&mut e.o.g, cfg, weights, hd / 2, &pos)?.unwrap_or_else(|| rope.clone());
    // Causal mask over all keys: key t is visible to a query at absolute position p when t <= p.
    let keys = e.op("Range", "mask/keys", &[&zero, &total, &one], vec![], i64t)?;
    let last = e.const_i64("mask.last_axis", &[-1])?;
    let qpos = e.op("Unsqueeze", "mask/query_pos", &[&pos, &last], vec![], i64t)?;
    let hidden = e.op(
        "Greater",
        "mask/future",
        &[&keys, &qpos],
        vec![],
        DataType::BOOL,
    )?;
    // Sliding-window attention: keys w or more positions back are out of the window (p - t >= w).
    let windowed = match cfg.sliding_window {
        Some(w) => {
            let age = e.op("Sub", "mask/age", &[&qpos, &keys], vec![], i64t)?;
            let wv = e.o.g.const_i64("mask.window", &[], &[w as i64])?;
            let old = e.op(
                "GreaterOrEqual",
                "mask/out_of_window",
                &[&age, &wv],
                vec![],
                DataType::BOOL,
            )?;
            Some(e.op(
                "Or",
                "mask/windowed",
                &[&hidden, &old],
                vec![],
                DataType::BOOL,
            )?)
        }
        None => None,
    };
    let neg = e.o.g.const_f32("mask.neg", &[], &[-1e30])?;
    let zf = e.o.g.const_f32("mask.zero_f", &[], &[0.0])?;
    let padding = match mode {
        Mode::Encoder {
            attention_mask: true,
            ..
        } => {
            // Padding keys are hidden too: [1, seq] -> [1, 1, seq], or-ed into the masks.
            let am =
                e.o.g
                    .input("attention_mask", i64t, vec![Dim::Fixed(1), seq()])?;
            let pad = e.op(
                "Equal",
                "mask/padding",
                &[&am, &zero],
                vec![],
                DataType::BOOL,
            )?;
            let ax0 = e.const_i64("mask.padding_rows", &[1])?;
            Some(e.op(
                "Unsqueeze",
                "mask/padding_keys",
                &[&pad, &ax0],
                vec![],
                DataType::BOOL,
            )?)
        }
        _ => None,
    };
    // The additive [1, 1, seq, total] form of a boolean "hidden" mask.
    let additive = |e: &mut Emitter, name: &str, hidden: &Value| -> Result<Value> {
        let hidden = match &padding {
            Some(pad) => e.op(
                "Or",
                &format!("{name}/padded"),
                &[hidden, pad],
                vec![],
                DataType::BOOL,
            )?,
            None => hidden.clone(),
        };
        let m = e.op(
            "Where",
            &format!("{name}/additive"),
            &[&hidden, &neg, &zf],
            vec![],
            F32,
        )?;
        let ax = e.const_i64(&format!("{name}.bcast"), &[1, 2])?;
        e.op(
            "Unsqueeze",
            &format!("{name}/bcast"),
            &[&m, &ax],
            vec![],
            F32,
        )
    };
    // Every layer is windowed unless a pattern leaves some global (Gemma).
    let (causal_mask, window_mask) = match (&windowed, cfg.swa_pattern) {
        (Some(w), Some(_)) => (
            additive(&mut e, "mask", &hidden)?,
            additive(&mut e, "window_mask", w)?,
        ),
        (Some(w), None) => {
            let m = additive(&mut e, "mask", w)?;
            (m.clone(), m)
        }
        (None, _) => {
            let m = additive(&mut e, "mask", &hidden)?;
            (m.clone(), m)
        }
    };
    let shared = LayerInputs {
        rope,
        local_rope,
        causal_mask,
        window_mask,
    };
    let last_logits_only = match (mode, &past) {
        (Mode::Encoder { taps, .. }, _) => {
            let last = taps.iter().copied().max().unwrap_or(0);
            let mut after = HashMap::new();
            for i in 0..last {
                h = e.layer(i, &h, &shared, None)?;
                if taps.contains(&(i + 1)) {
                    after.insert(i + 1, h.clone());
                }
            }
            let parts: Vec<Value> = taps.iter().map(|t| after[t].clone()).collect();
            let h = if parts.len() == 1 {
                parts[0].clone()
            } else {
                let refs: Vec<&Value> = parts.iter().collect();
                e.op(
                    "Concat",
                    "hidden_states/stacked",
                    &refs,
                    vec![("axis", Attr::Int(-1))],
                    F32,
                )?
            };
            let out = e.o.g.op(
                "Identity",
                "hidden_states",
                &[&h],
                vec![],
                F32,
                vec![Dim::Fixed(1), seq(), Dim::Fixed((taps.len() * d) as i64)],
            )?;
            e.o.g.output(&out);
            let shapes = std::mem::take(&mut e.linears.shapes);
            return Ok((e.o.g.finish(), shapes));
        }
        (Mode::Decoder { last_logits_only }, Some(past)) => {
            for (i, [pk, pv]) in past.iter().enumerate() {
                h = e.layer(i, &h, &shared, Some((pk, pv)))?;
            }
            last_logits_only
        }
        (Mode::Decoder { .. }, None) => {
            anyhow::bail!("internal: a decoder graph without its KV cache")
        }
    };
    let mut hn = e.rms_norm("model.norm", &h, "model.norm.weight")?;
    let logits_seq = if last_logits_only {
        hn = e.slice("last", &hn, -1, i64::MAX, 1)?;
        hn.shape = vec![Dim::Fixed(1), Dim::Fixed(1), Dim::Fixed(d as i64)];
        Dim::Fixed(1)
    } else {
        seq()
    };
    let tied_table = block_table.as_ref().filter(|_| cfg.tied_embeddings);
    let mut logits = if let Some(t) = tied_table {
        *e.linears
            .counts
            .entry("tied to the embedding blocks".into())
            .or_default() += 1;
        let mut y = t.head(&mut e.o.g, "lm_head", &hn)?;
        y.shape = vec![
            Dim::Fixed(1),
            logits_seq.clone(),
            Dim::Fixed(cfg.vocab_size as i64),
        ];
        y
    } else if let Some(b) = blocks.get("lm_head.weight") {
        e.int_blocks_linear("lm_head", &hn, b, None)?
    } else {
        let head = e.weight("lm_head.weight")?.clone();
        let lw = LinearWeights {
            weight: &head,
            bias: None,
            out_features: cfg.vocab_size,
            in_features: d,
        };
        e.linears.linear(
            &mut e.o,
            "lm_head",
            "lm_head",
            "lm_head",
            &hn,
            Weight::F32(lw),
        )?
    };
    if let Some(cap) = cfg.final_softcap {
        logits = e.softcap("logits_softcap", &logits, cap)?;
    }
    logits = e.o.g.op(
        "Identity",
        "logits",
        &[&logits],
        vec![],
        F32,
        vec![Dim::Fixed(1), logits_seq, Dim::Fixed(cfg.vocab_size as i64)],
    )?;
    e.o.g.output(&logits);
    let shapes = std::mem::take(&mut e.linears.shapes);
    Ok((e.o.g.finish(), shapes))
}
