//! The Llama/Qwen2/Qwen3 decoder graph ONNX Runtime runs on the CPU (`NAME.cpu.onnx`) for unquantized builds, weights in
//! f32, f16 or bf16, built from fused operators so that a decode step is 7 nodes per layer rather than ~45:
//! - projections: trt-diff's `trtdiff.MatMulF16`/`MatMulBF16`/`MatMulF32` (bias included) and `GateUp*`
//!   (SwiGLU's gate and up in one call) on [n, k] weights kept in the checkpoint's type (`backend::ort_ops`);
//! - norms: ONNX Runtime's `SimplifiedLayerNormalization` and `com.microsoft.SkipSimplifiedLayerNormalization`
//!   (the residual add and the next RMSNorm in one node);
//! - attention: `com.microsoft.GroupQueryAttention` (CUDA), or for the CPU trt-diff's `CausalAttention`
//!   (`backend::attention_op`, the same inputs and attributes), with RoPE applied inside from cos/sin tables the
//!   graph computes for each call's positions (zeros elsewhere), on q, k and v packed in one tensor.
//!
//! GroupQueryAttention wants heads of a multiple of 16 values; smaller heads (tiny models) are padded with zeros in
//! the graph's weights (`pad_heads`), so every model runs the same graph form. Qwen3's per-head q/k RMSNorms run
//! between the projections and the attention, on padded heads with weights and epsilon rescaled to match.
//!
//! The KV cache stays in place: `past_key_{i}` / `past_value_{i}` [batch, n_kv_heads, capacity, padded head size] and
//! the matching `present_*` outputs are bound to the same buffer, which the attention extends where the new tokens go
//! (`backend::Engine::hold_in_place`). Inputs: `input_ids` [batch, seq] int64, `seqlens_k` [batch] int32 (tokens in
//! each row's cache after this call, minus one: rows may differ, which is how the server decodes sequences of
//! different lengths in one call), `total_sequence_length` [] int32 (the largest of those plus one). Outputs:
//! `logits` [batch, seq or 1, vocab] and the `present_*`. Only ONNX Runtime sessions of this crate run it; TensorRT
//! builds `llama::decoder_graph`, whose numerics this graph matches (tests/llm_qwen2.rs).
use super::llama::{LlamaConfig, MlpAct, cache_inputs, local_rope_at, rope_at};
use crate::backend::attention_op::ATTENTION;
use crate::backend::ggml_ops::{GATE_UP, GATHER, GgmlWeights, MATMUL};
use crate::backend::ort_ops::{DOMAIN, op_name};
use crate::onnx::{Attr, DataType, Dim, GraphBuilder, Value, proto::ModelProto};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;

const F32: DataType = DataType::FLOAT;
const MS: &str = "com.microsoft";

/// Which ONNX Runtime provider a decoder graph is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// trt-diff's CPU kernels (`backend::ort_ops`) for the projections; f32 activations and KV cache.
    Cpu,
    /// Standard and `com.microsoft` operators only: `FusedMatMul` with `transB` reads the same [n, k] matrices as
    /// the CPU graph (so both can share one external data file); activations and the KV cache in the weights'
    /// type, since the CUDA provider's GroupQueryAttention (flash attention) takes float16/bfloat16 only.
    Cuda,
}

/// The input that marks graphs keeping their KV cache in place.
pub const SEQLENS_INPUT: &str = "seqlens_k";
pub const TOTAL_INPUT: &str = "total_sequence_length";

struct Emitter<'a> {
    g: GraphBuilder,
    cfg: &'a LlamaConfig,
    w: &'a HashMap<String, Vec<f32>>,
    /// Attention weights with heads padded to `hd` (see `pad_heads`), used instead of `w`'s.
    padded: HashMap<String, Vec<f32>>,
    /// FLOAT, FLOAT16 or BFLOAT16.
    wtype: DataType,
    /// Head size in the graph: the model's, rounded up to GroupQueryAttention's multiple of 16.
    hd: usize,
    /// Matrices read in place from a GGUF file in their own formats (`ggml_ops`), instead of `w`'s.
    ggml: Option<&'a GgmlWeights>,
    target: Target,
    /// The activations' and KV cache's type: FLOAT on the CPU, the weights' type for CUDA.
    act: DataType,
    /// Their initializers, made once (a tied LM head reads the embedding's).
    ggml_values: HashMap<String, Value>,
}

/// Where element `j` of a head of `hd` values goes in a head padded to `hd_pad`: RoPE pairs `(j, j + hd/2)` (halves
/// layout) must stay `hd_pad/2` apart, adjacent pairs (interleaved layout) stay put; the zeros added never mix in.
fn padded_index(j: usize, hd: usize, hd_pad: usize, interleaved: bool) -> usize {
    if interleaved || j < hd / 2 {
        j
    } else {
        hd_pad / 2 + j - hd / 2
    }
}

/// Pads the heads of q/k/v (rows) and o_proj (columns) from the model's head size to the graph's, with zeros:
/// scores, softmax and outputs are unchanged (the scale stays the model's).
fn pad_heads(
    cfg: &LlamaConfig,
    w: &HashMap<String, Vec<f32>>,
    hd_pad: usize,
) -> Result<HashMap<String, Vec<f32>>> {
    let (d, hd) = (cfg.dim, cfg.head_dim());
    let map = |j: usize| padded_index(j, hd, hd_pad, cfg.rope_interleaved);
    let get = |name: &str| {
        w.get(name)
            .with_context(|| format!("checkpoint has no tensor '{name}'"))
    };
    let mut out = HashMap::new();
    for i in 0..cfg.n_layers {
        let p = format!("model.layers.{i}.self_attn");
        for (proj, heads) in [
            ("q_proj", cfg.n_heads),
            ("k_proj", cfg.n_kv_heads),
            ("v_proj", cfg.n_kv_heads),
        ] {
            for (suffix, cols) in [("weight", d), ("bias", 1)] {
                let name = format!("{p}.{proj}.{suffix}");
                let Some(src) = w.get(&name) else { continue };
                if src.len() != heads * hd * cols {
                    bail!(
                        "{name}: {} values, expected {}",
                        src.len(),
                        heads * hd * cols
                    );
                }
                let mut dst = vec![0f32; heads * hd_pad * cols];
                for h in 0..heads {
                    for j in 0..hd {
                        let (from, to) = ((h * hd + j) * cols, (h * hd_pad + map(j)) * cols);
                        dst[to..to + cols].copy_from_slice(&src[from..from + cols]);
                    }
                }
                out.insert(name, dst);
            }
        }
        // Per-head norms (Qwen3) over the padded head: the zeros add nothing to the sum of squares, but the mean
        // divides by hd_pad instead of hd. With epsilon scaled by hd / hd_pad (`head_norm_eps`), the padded norm
        // is the model's times sqrt(hd_pad / hd), which weights scaled by sqrt(hd / hd_pad) undo.
        let rescale = (hd as f64 / hd_pad as f64).sqrt();
        for norm in ["q_norm", "k_norm"] {
            let name = format!("{p}.{norm}.weight");
            let Some(src) = w.get(&name) else { continue };
            if src.len() != hd {
                bail!("{name}: {} values, expected the head size {hd}", src.len());
            }
            let mut dst = vec![0f32; hd_pad];
            for (j, &x) in src.iter().enumerate() {
                dst[map(j)] = (x as f64 * rescale) as f32;
            }
            out.insert(name, dst);
        }
        let name = format!("{p}.o_proj.weight");
        let src = get(&name)?;
        let (inp, inp_pad) = (cfg.n_heads * hd, cfg.n_heads * hd_pad);
        if src.len() != d * inp {
            bail!("{name}: {} values, expected {}", src.len(), d * inp);
        }
        let mut dst = vec![0f32; d * inp_pad];
        for r in 0..d {
            for h in 0..cfg.n_heads {
                for j in 0..hd {
                    dst[r * inp_pad + h * hd_pad + map(j)] = src[r * inp + h * hd + j];
                }
            }
        }
        out.insert(name, dst);
    }
    Ok(out)
}

/// The epsilon of a per-head RMSNorm over heads padded from `hd` to `hd_pad` values (see `pad_heads`).
fn head_norm_eps(eps: f32, hd: usize, hd_pad: usize) -> f32 {
    (eps as f64 * hd as f64 / hd_pad as f64) as f32
}

fn seq() -> Dim {
    Dim::Sym("seq".into())
}

/// Sequences in a call: one for `generate`, one per active slot for the server's batched decode steps.
fn batch() -> Dim {
    Dim::Sym("batch".into())
}

fn act_shape(features: usize) -> Vec<Dim> {
    vec![batch(), seq(), Dim::Fixed(features as i64)]
}

impl Emitter<'_> {
    fn weight(&self, name: &str) -> Result<&Vec<f32>> {
        self.padded
            .get(name)
            .or_else(|| self.w.get(name))
            .with_context(|| format!("checkpoint has no tensor '{name}'"))
    }

    /// Stacked [sum(n), k] 16-bit weight of the projections `parts` (`(name, n)`), and their stacked biases when any
    /// has one (zeros for the others).
    fn stacked(
        &mut self,
        name: &str,
        parts: &[(String, usize)],
        k: usize,
    ) -> Result<(Value, Option<Value>)> {
        let total: usize = parts.iter().map(|p| p.1).sum();
        let mut bytes = Vec::with_capacity(total * k * elem_bytes(self.wtype));
        let mut bias = Vec::with_capacity(total);
        let mut any_bias = false;
        for (p, n) in parts {
            let wi = self.weight(&format!("{p}.weight"))?;
            if wi.len() != n * k {
                bail!(
                    "{p}: weight has {} values, [{n}, {k}] needs {}",
                    wi.len(),
                    n * k
                );
            }
            push_weights(&mut bytes, wi, self.wtype);
            match self
                .padded
                .get(&format!("{p}.bias"))
                .or_else(|| self.w.get(&format!("{p}.bias")))
            {
                Some(b) if b.len() == *n => {
                    any_bias = true;
                    bias.extend_from_slice(b);
                }
                Some(b) => bail!("{p}: bias has {} values, expected {n}", b.len()),
                None => bias.extend(std::iter::repeat_n(0.0, *n)),
            }
        }
        let wv = self.g.initializer(
            &format!("{name}.weight"),
            self.wtype,
            &[total as i64, k as i64],
            bytes.into(),
        )?;
        let bv = if any_bias {
            Some(self.vector(&format!("{name}.bias"), &bias)?)
        } else {
            None
        };
        Ok((wv, bv))
    }

    /// A small constant (norm weights, biases) in the activations' type.
    fn vector(&mut self, name: &str, v: &[f32]) -> Result<Value> {
        if self.act == F32 {
            return self.g.const_f32(name, &[v.len() as i64], v);
        }
        let mut bytes = Vec::with_capacity(v.len() * elem_bytes(self.act));
        push_weights(&mut bytes, v, self.act);
        self.g
            .initializer(name, self.act, &[v.len() as i64], bytes.into())
    }

    /// `x @ w^T` on the [n, k] matrix `w`, for the CUDA graph (`FusedMatMul` transposes on the fly).
    fn matmul_t(&mut self, node: &str, x: &Value, w: &Value, n: usize) -> Result<Value> {
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = Dim::Fixed(n as i64);
        }
        Ok(self
            .g
            .node_in(
                MS,
                "FusedMatMul",
                node,
                &[x, w],
                vec![("transB", Attr::Int(1)), ("alpha", Attr::Float(1.0))],
                vec![(self.act, shape)],
            )?
            .remove(0))
    }

    /// `x @ W^T (+ b)` for the projections `parts` of the same input, as one product.
    fn linear(
        &mut self,
        name: &str,
        x: &Value,
        parts: &[(String, usize)],
        k: usize,
    ) -> Result<Value> {
        if self.ggml.is_some() {
            return self.linear_ggml(name, x, parts, false);
        }
        let (w, b) = self.stacked(name, parts, k)?;
        let n: usize = parts.iter().map(|p| p.1).sum();
        if self.target == Target::Cuda {
            let y = self.matmul_t(&format!("{name}/FusedMatMul"), x, &w, n)?;
            return match &b {
                None => Ok(y),
                Some(b) => {
                    let shape = y.shape.clone();
                    self.g.op(
                        "Add",
                        &format!("{name}/bias"),
                        &[&y, b],
                        vec![],
                        self.act,
                        shape,
                    )
                }
            };
        }
        let mut inputs = vec![x, &w];
        if let Some(b) = &b {
            inputs.push(b);
        }
        let op = op_name(self.wtype, false);
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = Dim::Fixed(n as i64);
        }
        Ok(self
            .g
            .node_in(
                DOMAIN,
                op,
                &format!("{name}/{op}"),
                &inputs,
                vec![],
                vec![(F32, shape)],
            )?
            .remove(0))
    }

    /// The GGUF matrix `name` (a Hugging Face name) as an initializer over the file's bytes: [rows, row bytes] uint8.
    fn ggml_weight(&mut self, name: &str) -> Result<(Value, i64, usize)> {
        let gw = self.ggml.context("no GGUF weights")?;
        let t = gw
            .tensors
            .get(name)
            .with_context(|| format!("GGUF file has no matrix for '{name}'"))?;
        let row_bytes = t.bytes / t.rows.max(1) as u64;
        if let Some(v) = self.ggml_values.get(name) {
            return Ok((v.clone(), t.kind.ggml().0 as i64, t.rows));
        }
        let v = self.g.external_initializer(
            name,
            DataType::UINT8,
            &[t.rows as i64, row_bytes as i64],
            &gw.location,
            t.offset,
            t.bytes,
        )?;
        self.ggml_values.insert(name.to_string(), v.clone());
        Ok((v, t.kind.ggml().0 as i64, t.rows))
    }

    /// `linear` (or, with `gated`, SwiGLU's gate and up) on GGUF matrices: one `MatMulGgml`/`GateUpGgml` node whose
    /// outputs are the parts' rows side by side (the model's head size: no padding), biases from `w`.
    fn linear_ggml(
        &mut self,
        name: &str,
        x: &Value,
        parts: &[(String, usize)],
        gated: bool,
    ) -> Result<Value> {
        let mut ws = Vec::new();
        let mut types = Vec::new();
        let mut bias = Vec::new();
        let mut any_bias = false;
        let mut n = 0;
        for (p, _) in parts {
            let (v, t, rows) = self.ggml_weight(&format!("{p}.weight"))?;
            ws.push(v);
            types.push(t);
            match self.w.get(&format!("{p}.bias")) {
                Some(b) if b.len() == rows => {
                    any_bias = true;
                    bias.extend_from_slice(b);
                }
                Some(b) => bail!("{p}: bias has {} values, expected {rows}", b.len()),
                None => bias.extend(std::iter::repeat_n(0.0, rows)),
            }
            n += rows;
        }
        if ws.len() > 3 || (gated && (ws.len() != 2 || any_bias)) {
            bail!(
                "{name}: {} GGUF matrices cannot form one projection",
                ws.len()
            );
        }
        let absent = Value::absent();
        let b = if any_bias {
            Some(
                self.g
                    .const_f32(&format!("{name}.bias"), &[n as i64], &bias)?,
            )
        } else {
            None
        };
        let mut inputs: Vec<&Value> = vec![x];
        inputs.extend(ws.iter());
        if let Some(b) = &b {
            inputs.resize(4, &absent);
            inputs.push(b);
        }
        let n_out = if gated { n / 2 } else { n };
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = Dim::Fixed(n_out as i64);
        }
        let op = if gated { GATE_UP } else { MATMUL };
        // The LM head's node is named after the graph output it makes.
        let node = if name == "logits" {
            name.to_string()
        } else {
            format!("{name}/{op}")
        };
        let mut attrs = vec![("types", Attr::Ints(types))];
        if gated {
            attrs.extend(self.activation_attr());
        }
        Ok(self
            .g
            .node_in(DOMAIN, op, &node, &inputs, attrs, vec![(F32, shape)])?
            .remove(0))
    }

    /// Heads of the model's size `hd` in `v` ([1, seq, heads * hd]) padded with zeros to the graph's (`pad_heads`'s
    /// layout), or back (`unpad`).
    fn repad_heads(&mut self, name: &str, v: &Value, heads: usize, unpad: bool) -> Result<Value> {
        let (hd, hd_pad) = (self.cfg.head_dim(), self.hd);
        // The halves layout pads each half of a head; the interleaved one pads its end.
        let p = if self.cfg.rope_interleaved { 1 } else { 2 };
        let (from, to) = if unpad { (hd_pad, hd) } else { (hd, hd_pad) };
        let split = self.g.const_i64(
            &format!("{name}.split_shape"),
            &[5],
            &[0, 0, heads as i64, p, (from / p as usize) as i64],
        )?;
        let five = vec![
            batch(),
            seq(),
            Dim::Fixed(heads as i64),
            Dim::Fixed(p),
            Dim::Fixed((from / p as usize) as i64),
        ];
        let r = self.g.op(
            "Reshape",
            &format!("{name}/split"),
            &[v, &split],
            vec![],
            F32,
            five.clone(),
        )?;
        let mut out_shape = five;
        out_shape[4] = Dim::Fixed((to / p as usize) as i64);
        let moved = if unpad {
            let c = |g: &mut GraphBuilder, n: &str, v: i64| {
                g.const_i64(&format!("{name}.{n}"), &[1], &[v])
            };
            let (s, e, ax) = (
                c(&mut self.g, "start", 0)?,
                c(&mut self.g, "end", (to / p as usize) as i64)?,
                c(&mut self.g, "axis", 4)?,
            );
            self.g.op(
                "Slice",
                &format!("{name}/slice"),
                &[&r, &s, &e, &ax],
                vec![],
                F32,
                out_shape,
            )?
        } else {
            let mut pads = vec![0i64; 10];
            pads[9] = ((to - from) / p as usize) as i64;
            let pv = self.g.const_i64(&format!("{name}.pads"), &[10], &pads)?;
            self.g.op(
                "Pad",
                &format!("{name}/pad"),
                &[&r, &pv],
                vec![],
                F32,
                out_shape,
            )?
        };
        let flat = self.g.const_i64(
            &format!("{name}.flat_shape"),
            &[3],
            &[0, 0, (heads * to) as i64],
        )?;
        self.g.op(
            "Reshape",
            &format!("{name}/merge"),
            &[&moved, &flat],
            vec![],
            F32,
            act_shape(heads * to),
        )
    }

    /// RMSNorm over each head of `x` ([1, seq, heads * hd] in the graph's padded head size), weights `weight`.
    fn head_norm(&mut self, name: &str, x: &Value, heads: usize, weight: &str) -> Result<Value> {
        let hd = self.hd;
        let w = self.weight(weight)?.clone();
        if w.len() != hd {
            bail!("{weight}: {} values, expected the head size {hd}", w.len());
        }
        let wv = self.vector(weight, &w)?;
        let split = self.g.const_i64(
            &format!("{name}.heads_shape"),
            &[4],
            &[0, 0, heads as i64, hd as i64],
        )?;
        let four = vec![
            batch(),
            seq(),
            Dim::Fixed(heads as i64),
            Dim::Fixed(hd as i64),
        ];
        let r = self.g.op(
            "Reshape",
            &format!("{name}/heads"),
            &[x, &split],
            vec![],
            self.act,
            four.clone(),
        )?;
        let eps = head_norm_eps(self.cfg.norm_eps, self.cfg.head_dim(), hd);
        let n = self.g.op(
            "SimplifiedLayerNormalization",
            &format!("{name}/norm"),
            &[&r, &wv],
            vec![
                ("epsilon", Attr::Float(eps)),
                ("axis", Attr::Int(-1)),
                ("stash_type", Attr::Int(1)),
            ],
            self.act,
            four,
        )?;
        let flat = self.g.const_i64(
            &format!("{name}.flat_shape"),
            &[3],
            &[0, 0, (heads * hd) as i64],
        )?;
        self.g.op(
            "Reshape",
            &format!("{name}/merge"),
            &[&n, &flat],
            vec![],
            self.act,
            act_shape(heads * hd),
        )
    }

    fn norm_weight(&mut self, name: &str) -> Result<Value> {
        let w = self.weight(name)?.clone();
        if w.len() != self.cfg.dim {
            bail!("{name}: {} values, expected {}", w.len(), self.cfg.dim);
        }
        self.vector(name, &w)
    }

    /// RMSNorm of `residual + delta`; returns (normed, residual + delta), the sum only where `keep_sum` (the
    /// final norm's is not needed).
    fn add_norm(
        &mut self,
        name: &str,
        delta: &Value,
        residual: &Value,
        weight: &str,
        keep_sum: bool,
    ) -> Result<(Value, Value)> {
        let w = self.norm_weight(weight)?;
        let d = self.cfg.dim;
        let none = || (DataType::UNDEFINED, vec![]);
        let sum = if keep_sum {
            (self.act, act_shape(d))
        } else {
            none()
        };
        let mut outs = self.g.node_in(
            MS,
            "SkipSimplifiedLayerNormalization",
            name,
            &[delta, residual, &w],
            vec![("epsilon", Attr::Float(self.cfg.norm_eps))],
            vec![(self.act, act_shape(d)), none(), none(), sum],
        )?;
        let sum = outs.remove(3);
        Ok((outs.remove(0), sum))
    }

    fn layer(
        &mut self,
        i: usize,
        x: &Value,
        h: &Value,
        rope: &Rope,
        past: [&Value; 2],
    ) -> Result<(Value, Value)> {
        let c = self.cfg;
        let (d, hd, kv, heads) = (c.dim, self.hd, c.n_kv_heads, c.n_heads);
        let p = format!("model.layers.{i}");
        let qkv = self.linear(
            &format!("{p}.self_attn.qkv"),
            x,
            &[
                (format!("{p}.self_attn.q_proj"), heads * hd),
                (format!("{p}.self_attn.k_proj"), kv * hd),
                (format!("{p}.self_attn.v_proj"), kv * hd),
            ],
            d,
        )?;
        let padded_ggml = self.ggml.is_some() && hd != c.head_dim();
        let qkv = if padded_ggml {
            self.repad_heads(
                &format!("{p}.self_attn.qkv_pad"),
                &qkv,
                heads + 2 * kv,
                false,
            )?
        } else {
            qkv
        };
        let absent = Value::absent();
        // Packed q/k/v, or (Qwen3) q, k and v apart with k and q normed per head.
        let qkv_inputs: [Value; 3] = if c.qk_norm {
            let sizes = self.g.const_i64(
                &format!("{p}.self_attn.qkv_sizes"),
                &[3],
                &[(heads * hd) as i64, (kv * hd) as i64, (kv * hd) as i64],
            )?;
            let mut parts = self.g.node_in(
                "",
                "Split",
                &format!("{p}.self_attn/qkv_split"),
                &[&qkv, &sizes],
                vec![("axis", Attr::Int(-1))],
                vec![
                    (self.act, act_shape(heads * hd)),
                    (self.act, act_shape(kv * hd)),
                    (self.act, act_shape(kv * hd)),
                ],
            )?;
            let v = parts.remove(2);
            let k = parts.remove(1);
            let q = parts.remove(0);
            let a = format!("{p}.self_attn");
            let q = self.head_norm(
                &format!("{a}.q_norm"),
                &q,
                heads,
                &format!("{a}.q_norm.weight"),
            )?;
            let k = self.head_norm(
                &format!("{a}.k_norm"),
                &k,
                kv,
                &format!("{a}.k_norm.weight"),
            )?;
            [q, k, v]
        } else {
            [qkv, absent.clone(), absent.clone()]
        };
        let act = self.act;
        let cache = |kind: &str| {
            (
                Some(format!("present_{kind}_{i}")),
                act,
                vec![
                    batch(),
                    Dim::Fixed(kv as i64),
                    Dim::Sym("capacity".into()),
                    Dim::Fixed(hd as i64),
                ],
            )
        };
        let [cos, sin] = match &rope.local {
            Some(local) if c.local_rope(i) => local,
            _ => &rope.global,
        };
        let mut attrs = vec![
            ("num_heads", Attr::Int(heads as i64)),
            ("kv_num_heads", Attr::Int(kv as i64)),
            ("do_rotary", Attr::Int(1)),
            ("rotary_interleaved", Attr::Int(c.rope_interleaved as i64)),
            ("scale", Attr::Float(c.attention_scale())),
            // Sliding-window attention: ONNX Runtime's window is transformers' `sliding_window` (checked against
            // MistralForCausalLM, Phi3ForCausalLM and the Gemmas in tests/llm_archs.rs).
            (
                "local_window_size",
                Attr::Int(c.layer_window(i).map_or(-1, |w| w as i64)),
            ),
        ];
        if let Some(cap) = c.attn_softcap {
            attrs.push(("softcap", Attr::Float(cap)));
        }
        // The CPU graph's attention is trt-diff's own operator (same inputs and attributes, `attention_op`).
        let (domain, op) = match self.target {
            Target::Cpu => (DOMAIN, ATTENTION),
            Target::Cuda => (MS, "GroupQueryAttention"),
        };
        let mut outs = self.g.node_named(
            domain,
            op,
            &format!("{p}/attention"),
            &[
                &qkv_inputs[0],
                &qkv_inputs[1],
                &qkv_inputs[2],
                past[0],
                past[1],
                &rope.seqlens,
                &rope.total,
                cos,
                sin,
            ],
            attrs,
            vec![
                (None, act, act_shape(heads * hd)),
                cache("key"),
                cache("value"),
            ],
        )?;
        self.g.output(&outs[1]);
        self.g.output(&outs[2]);
        let attn = outs.remove(0);
        let attn = if padded_ggml {
            self.repad_heads(&format!("{p}.self_attn.unpad"), &attn, heads, true)?
        } else {
            attn
        };
        let mut o = self.linear(
            &format!("{p}.self_attn.o_proj"),
            &attn,
            &[(format!("{p}.self_attn.o_proj"), d)],
            heads * hd,
        )?;
        // Gemma: the attention's output is normed before the residual add, and the MLP's input norm is its own.
        let ffn_norm = if c.sandwich_norms {
            o = self.norm(
                &format!("{p}/post_attention_norm"),
                &o,
                &format!("{p}.post_attention_layernorm.weight"),
            )?;
            "pre_feedforward_layernorm"
        } else {
            "post_attention_layernorm"
        };
        let (xn, h) = self.add_norm(
            &format!("{p}/{ffn_norm}"),
            &o,
            h,
            &format!("{p}.{ffn_norm}.weight"),
            true,
        )?;
        let gate_up = [
            (format!("{p}.mlp.gate_proj"), c.hidden_dim),
            (format!("{p}.mlp.up_proj"), c.hidden_dim),
        ];
        let act = if self.ggml.is_some() {
            self.linear_ggml(&format!("{p}.mlp.gate_up"), &xn, &gate_up, true)?
        } else {
            let (w, bias) = self.stacked(&format!("{p}.mlp.gate_up"), &gate_up, d)?;
            if bias.is_some() {
                bail!("{p}.mlp: gate/up projections with biases are not a Llama/Qwen2 MLP");
            }
            match self.target {
                Target::Cuda => self.gated_mlp(&p, &xn, &w)?,
                Target::Cpu => {
                    let op = op_name(self.wtype, true);
                    self.g
                        .node_in(
                            DOMAIN,
                            op,
                            &format!("{p}.mlp/{op}"),
                            &[&xn, &w],
                            self.activation_attr(),
                            vec![(F32, act_shape(c.hidden_dim))],
                        )?
                        .remove(0)
                }
            }
        };
        let mut down = self.linear(
            &format!("{p}.mlp.down_proj"),
            &act,
            &[(format!("{p}.mlp.down_proj"), d)],
            c.hidden_dim,
        )?;
        if c.sandwich_norms {
            down = self.norm(
                &format!("{p}/post_feedforward_norm"),
                &down,
                &format!("{p}.post_feedforward_layernorm.weight"),
            )?;
        }
        Ok((down, h))
    }
}

impl Emitter<'_> {
    /// The gated MLP's `activation` attribute on trt-diff's operators: none for SiLU (their default).
    fn activation_attr(&self) -> Vec<(&'static str, Attr)> {
        match self.cfg.mlp_act {
            MlpAct::Silu => vec![],
            act => vec![("activation", Attr::Int(act.attr()))],
        }
    }

    /// RMSNorm of `x` ([batch, seq, dim]) with the weights `weight`.
    fn norm(&mut self, name: &str, x: &Value, weight: &str) -> Result<Value> {
        let w = self.norm_weight(weight)?;
        self.g.op(
            "SimplifiedLayerNormalization",
            name,
            &[x, &w],
            vec![
                ("epsilon", Attr::Float(self.cfg.norm_eps)),
                ("axis", Attr::Int(-1)),
                ("stash_type", Attr::Int(1)),
            ],
            self.act,
            act_shape(self.cfg.dim),
        )
    }

    /// `c * tanh(x / c)` on `x` (f32).
    fn softcap(&mut self, name: &str, x: &Value, cap: f32) -> Result<Value> {
        let cv = self.g.const_f32(&format!("{name}.cap"), &[], &[cap])?;
        let y = self.g.op(
            "Div",
            &format!("{name}/div"),
            &[x, &cv],
            vec![],
            F32,
            x.shape.clone(),
        )?;
        let y = self.g.op(
            "Tanh",
            &format!("{name}/tanh"),
            &[&y],
            vec![],
            F32,
            x.shape.clone(),
        )?;
        self.g
            .op("Mul", name, &[&y, &cv], vec![], F32, x.shape.clone())
    }

    /// The gated MLP for the CUDA graph: `act(x @ gate^T) * (x @ up^T)` from the stacked [gate; up] matrix `w`
    /// (SiLU, or GELU's tanh form as `com.microsoft.FastGelu`).
    fn gated_mlp(&mut self, p: &str, x: &Value, w: &Value) -> Result<Value> {
        let h = self.cfg.hidden_dim;
        let both = self.matmul_t(&format!("{p}.mlp/gate_up"), x, w, 2 * h)?;
        let halves = self
            .g
            .const_i64(&format!("{p}.mlp.halves"), &[2], &[h as i64, h as i64])?;
        let mut parts = self.g.node_in(
            "",
            "Split",
            &format!("{p}.mlp/split"),
            &[&both, &halves],
            vec![("axis", Attr::Int(-1))],
            vec![(self.act, act_shape(h)), (self.act, act_shape(h))],
        )?;
        let (up, gate) = (parts.remove(1), parts.remove(0));
        let activated = match self.cfg.mlp_act {
            MlpAct::Silu => {
                let sg = self.g.op(
                    "Sigmoid",
                    &format!("{p}.mlp/sigmoid"),
                    &[&gate],
                    vec![],
                    self.act,
                    act_shape(h),
                )?;
                self.g.op(
                    "Mul",
                    &format!("{p}.mlp/silu"),
                    &[&gate, &sg],
                    vec![],
                    self.act,
                    act_shape(h),
                )?
            }
            MlpAct::GeluTanh => self
                .g
                .node_in(
                    MS,
                    "FastGelu",
                    &format!("{p}.mlp/gelu"),
                    &[&gate],
                    vec![],
                    vec![(self.act, act_shape(h))],
                )?
                .remove(0),
        };
        self.g.op(
            "Mul",
            &format!("{p}.mlp/swiglu"),
            &[&activated, &up],
            vec![],
            self.act,
            act_shape(h),
        )
    }
}

impl Emitter<'_> {
    /// Outputs `logits` (f32), soft-capped first where the model says so (Gemma 2).
    fn finish_logits(mut self, logits: Value) -> Result<ModelProto> {
        let logits = match self.cfg.final_softcap {
            Some(cap) => self.softcap("logits", &logits, cap)?,
            None => logits,
        };
        self.g.output(&logits);
        Ok(self.g.finish())
    }
}

/// The positions whose RoPE rows one call needs (GroupQueryAttention reads row p for a new token at position p).
struct CallPositions {
    /// int64 [n]: from the shortest sequence's first new token to the longest's last, `lo..total`.
    range: Value,
    /// int64 [4]: Pad's `[lo, 0, rows - total, 0]`, where `rows` is what GroupQueryAttention checks the tables for
    /// (the larger of the total length and the cache's capacity).
    pads: Value,
}

impl Emitter<'_> {
    fn call_positions(
        &mut self,
        ids: &Value,
        seqlens: &Value,
        total: &Value,
        past_key: &Value,
    ) -> Result<CallPositions> {
        let i64t = DataType::INT64;
        let g = &mut self.g;
        // int64 arithmetic on scalars (and Range's 1-d result).
        let int = |g: &mut GraphBuilder, op: &str, name: &str, inputs: &[&Value]| {
            g.op(op, &format!("rope/{name}"), inputs, vec![], i64t, vec![])
        };
        let zero = g.const_i64("rope.zero", &[], &[0])?;
        let one = g.const_i64("rope.one", &[], &[1])?;
        let two = g.const_i64("rope.two", &[], &[2])?;
        let ids_shape = int(g, "Shape", "ids_shape", &[ids])?;
        let new_len = int(g, "Gather", "new_len", &[&ids_shape, &one])?;
        let shortest = g.op(
            "ReduceMin",
            "rope/shortest",
            &[seqlens],
            vec![("keepdims", Attr::Int(0))],
            seqlens.dtype,
            vec![],
        )?;
        let shortest = g.cast("rope/shortest_i64", &shortest, i64t)?;
        let total = g.cast("rope/total_i64", total, i64t)?;
        // seqlens_k counts a sequence's tokens minus one, so its first new token sits at seqlens_k + 1 - new_len.
        let after = int(g, "Add", "shortest_end", &[&shortest, &one])?;
        let first = int(g, "Sub", "first", &[&after, &new_len])?;
        let lo = int(g, "Max", "lo", &[&first, &zero])?;
        let past_shape = int(g, "Shape", "past_shape", &[past_key])?;
        let capacity = int(g, "Gather", "capacity", &[&past_shape, &two])?;
        let rows = int(g, "Max", "rows", &[&total, &capacity])?;
        let tail = int(g, "Sub", "tail", &[&rows, &total])?;
        let mut range = int(g, "Range", "range", &[&lo, &total, &one])?;
        range.shape = vec![Dim::Sym("rope_rows".into())];
        let axis = g.const_i64("rope.axis", &[1], &[0])?;
        let none = g.const_i64("rope.none", &[1], &[0])?;
        let lo1 = int(g, "Unsqueeze", "lo_1", &[&lo, &axis])?;
        let tail1 = int(g, "Unsqueeze", "tail_1", &[&tail, &axis])?;
        let pads = g.op(
            "Concat",
            "rope/pads",
            &[&lo1, &none, &tail1, &none],
            vec![("axis", Attr::Int(0))],
            i64t,
            vec![Dim::Fixed(4)],
        )?;
        Ok(CallPositions { range, pads })
    }

    /// This call's RoPE rows (f32) padded with zeros into the tables GroupQueryAttention reads, in the activations'
    /// type.
    fn rope_table(
        &mut self,
        name: &str,
        rows: [Value; 2],
        at: &CallPositions,
    ) -> Result<[Value; 2]> {
        let mut table = vec![Dim::Sym("rope_table".into())];
        table.extend(rows[0].shape.last().cloned());
        let mut out = Vec::new();
        for (kind, r) in ["cos", "sin"].iter().zip(rows) {
            let padded = self.g.op(
                "Pad",
                &format!("{name}/{kind}_table"),
                &[&r, &at.pads],
                vec![],
                F32,
                table.clone(),
            )?;
            out.push(
                self.g
                    .cast(&format!("{name}/{kind}_act"), &padded, self.act)?,
            );
        }
        Ok([out.remove(0), out.remove(0)])
    }
}

/// The graph-wide inputs of every attention node: RoPE's cos/sin tables, the local layers' own where
/// `local_rope_theta` is set.
struct Rope {
    seqlens: Value,
    total: Value,
    global: [Value; 2],
    local: Option<[Value; 2]>,
}

fn elem_bytes(ty: DataType) -> usize {
    ty.bits().unwrap_or(32) as usize / 8
}

/// Appends `v` in the graph's weight type (FLOAT, FLOAT16 or BFLOAT16).
fn push_weights(out: &mut Vec<u8>, v: &[f32], ty: DataType) {
    match ty {
        DataType::BFLOAT16 => out.extend(
            v.iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
        ),
        DataType::FLOAT16 => {
            out.extend(v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()))
        }
        _ => out.extend(v.iter().flat_map(|x| x.to_le_bytes())),
    }
}

/// The CPU decoder graph with matrices stored in `wtype` (FLOAT16, BFLOAT16, or FLOAT for f32 checkpoints);
/// activations, norms, attention and the KV cache are f32. `last_logits_only`: logits of the last position only
/// ([1, 1, vocab]).
pub fn decoder_graph_cpu(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    wtype: DataType,
    last_logits_only: bool,
) -> Result<ModelProto> {
    graph(cfg, weights, wtype, None, Target::Cpu, last_logits_only)
}

/// The decoder graph for ONNX Runtime's CUDA provider (`Target::Cuda`): the CPU graph's form, inputs and in-place KV
/// cache, with standard operators instead of trt-diff's CPU kernels and activations in `wtype`. Its matrices have
/// the CPU graph's names, types and layout, so a build stores them once (`llm_build` points this graph's
/// initializers into the CPU graph's data file). FLOAT `wtype` builds a graph that ONNX Runtime's CPU provider can
/// run (tests); the CUDA provider's GroupQueryAttention needs FLOAT16 or BFLOAT16.
pub fn decoder_graph_cuda(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    wtype: DataType,
    last_logits_only: bool,
) -> Result<ModelProto> {
    graph(cfg, weights, wtype, None, Target::Cuda, last_logits_only)
}

/// The CPU decoder graph of a GGUF file whose matrices stay in the file, in their own formats (quantized blocks
/// included): `MatMulGgml`/`GateUpGgml`/`GatherGgml` nodes read initializers whose external data points into the
/// GGUF (`ggml`, from `backend::ggml_ops::block_weights`). `weights` provides the norms, biases and RoPE factors.
/// Heads of a size that is not a multiple of 16 are padded between the projections and the attention.
pub fn decoder_graph_cpu_gguf(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    ggml: &GgmlWeights,
    last_logits_only: bool,
) -> Result<ModelProto> {
    graph(cfg, weights, F32, Some(ggml), Target::Cpu, last_logits_only)
}

fn graph(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Vec<f32>>,
    wtype: DataType,
    ggml: Option<&GgmlWeights>,
    target: Target,
    last_logits_only: bool,
) -> Result<ModelProto> {
    if ![DataType::FLOAT, DataType::FLOAT16, DataType::BFLOAT16].contains(&wtype) {
        bail!("CPU decoder graphs store weights in float, float16 or bfloat16, not {wtype}");
    }
    let (d, hd) = (cfg.dim, cfg.head_dim());
    if !hd.is_multiple_of(2) || cfg.n_kv_heads == 0 || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads) {
        bail!(
            "{} heads of size {hd} over {} KV heads cannot run through GroupQueryAttention",
            cfg.n_heads,
            cfg.n_kv_heads
        );
    }
    let hd_pad = hd.next_multiple_of(16);
    let (name, act) = match target {
        Target::Cpu => ("llama_decoder_cpu", F32),
        Target::Cuda => ("llama_decoder_cuda", wtype),
    };
    let mut e = Emitter {
        g: GraphBuilder::new(name, 18),
        cfg,
        w: weights,
        padded: if hd_pad == hd {
            HashMap::new()
        } else {
            pad_heads(cfg, weights, hd_pad)?
        },
        wtype,
        hd: hd_pad,
        ggml,
        ggml_values: HashMap::new(),
        target,
        act,
    };
    if target == Target::Cpu {
        e.g.use_domain(DOMAIN, 1);
    }
    e.g.use_domain(MS, 1);
    let i32t = DataType::INT32;
    let ids =
        e.g.input("input_ids", DataType::INT64, vec![batch(), seq()])?;
    let seqlens = e.g.input(SEQLENS_INPUT, i32t, vec![batch()])?;
    let total = e.g.input(TOTAL_INPUT, i32t, vec![])?;
    let past = cache_inputs(&mut e.g, cfg, batch(), "capacity", hd_pad, act)?;
    // The embedding table in the weight type; a tied LM head reads the same initializer.
    let tensor = |name: &str| {
        weights
            .get(name)
            .with_context(|| format!("checkpoint has no tensor '{name}'"))
    };
    let emb = tensor("model.embed_tokens.weight")?;
    if emb.len() != cfg.vocab_size * d {
        bail!(
            "model.embed_tokens.weight: {} values, [{}, {d}] needs {}",
            emb.len(),
            cfg.vocab_size,
            cfg.vocab_size * d
        );
    }
    let (table, h) = if ggml.is_some() {
        let (table, ty, rows) = e.ggml_weight("model.embed_tokens.weight")?;
        if rows != cfg.vocab_size {
            bail!(
                "token_embd.weight has {rows} rows for a vocabulary of {}",
                cfg.vocab_size
            );
        }
        let h =
            e.g.node_in(
                DOMAIN,
                GATHER,
                "embed",
                &[&table, &ids],
                vec![("type", Attr::Int(ty)), ("k", Attr::Int(d as i64))],
                vec![(F32, act_shape(d))],
            )?
            .remove(0);
        (table, h)
    } else {
        let mut bytes = Vec::with_capacity(emb.len() * elem_bytes(wtype));
        push_weights(&mut bytes, emb, wtype);
        let table = e.g.initializer(
            "model.embed_tokens.weight",
            wtype,
            &[cfg.vocab_size as i64, d as i64],
            bytes.into(),
        )?;
        let h = if wtype == act {
            e.g.op(
                "Gather",
                "embed",
                &[&table, &ids],
                vec![],
                act,
                act_shape(d),
            )?
        } else {
            let rows = e.g.op(
                "Gather",
                "embed_half",
                &[&table, &ids],
                vec![],
                wtype,
                act_shape(d),
            )?;
            e.g.op(
                "Cast",
                "embed",
                &[&rows],
                vec![("to", Attr::Int(F32.0 as i64))],
                F32,
                act_shape(d),
            )?
        };
        (table, h)
    };
    // RoPE tables for GroupQueryAttention, which reads row p for a token at position p: rows for this call's
    // positions only (from the shortest sequence's first new token to the longest's last), zeros before and after up
    // to the rows it checks for (the larger of the total length and the cache's capacity). Padded pairs hold angle 0.
    let positions = e.call_positions(&ids, &seqlens, &total, &past[0][0])?;
    let global = rope_at(&mut e.g, cfg, weights, hd_pad / 2, &positions.range)?;
    let global = e.rope_table("rope", global, &positions)?;
    let local = match local_rope_at(&mut e.g, cfg, weights, hd_pad / 2, &positions.range)? {
        Some(t) => Some(e.rope_table("rope_local", t, &positions)?),
        None => None,
    };
    let rope = Rope {
        seqlens,
        total,
        global,
        local,
    };
    // Gemma scales the embeddings (in the activations' type, as transformers does).
    let h = match cfg.embed_scale {
        Some(scale) => {
            let sv = e.g.const_f32("embed.scale", &[], &[scale])?;
            let sv = if act == F32 {
                sv
            } else {
                let to = vec![("to", Attr::Int(act.0 as i64))];
                e.g.op("Cast", "embed.scale_act", &[&sv], to, act, vec![])?
            };
            e.g.op("Mul", "embed/scaled", &[&h, &sv], vec![], act, act_shape(d))?
        }
        None => h,
    };
    let w0 = e.norm_weight("model.layers.0.input_layernorm.weight")?;
    let mut x = e.g.op(
        "SimplifiedLayerNormalization",
        "model.layers.0/input_norm",
        &[&h, &w0],
        vec![
            ("epsilon", Attr::Float(cfg.norm_eps)),
            ("axis", Attr::Int(-1)),
            ("stash_type", Attr::Int(1)),
        ],
        act,
        act_shape(d),
    )?;
    let mut h = h;
    for (i, [pk, pv]) in past.iter().enumerate() {
        let (down, hi) = e.layer(i, &x, &h, &rope, [pk, pv])?;
        let (next, weight) = if i + 1 < cfg.n_layers {
            (
                format!("model.layers.{}/input_norm", i + 1),
                format!("model.layers.{}.input_layernorm.weight", i + 1),
            )
        } else {
            ("model.norm".to_string(), "model.norm.weight".to_string())
        };
        (x, h) = e.add_norm(&next, &down, &hi, &weight, i + 1 < cfg.n_layers)?;
    }
    let mut hn = x;
    let logits_seq = if last_logits_only {
        let c = |g: &mut GraphBuilder, n: &str, v: i64| g.const_i64(n, &[1], &[v]);
        let (s, en, ax) = (
            c(&mut e.g, "last.start", -1)?,
            c(&mut e.g, "last.end", i64::MAX)?,
            c(&mut e.g, "last.axis", 1)?,
        );
        hn = e.g.op(
            "Slice",
            "last",
            &[&hn, &s, &en, &ax],
            vec![],
            act,
            vec![batch(), Dim::Fixed(1), Dim::Fixed(d as i64)],
        )?;
        Dim::Fixed(1)
    } else {
        seq()
    };
    if ggml.is_some() {
        let head = if cfg.tied_embeddings {
            "model.embed_tokens"
        } else {
            "lm_head"
        };
        let name = if cfg.final_softcap.is_some() {
            "logits_raw"
        } else {
            "logits"
        };
        let logits = e.linear_ggml(name, &hn, &[(head.to_string(), cfg.vocab_size)], false)?;
        let shape = vec![batch(), logits_seq, Dim::Fixed(cfg.vocab_size as i64)];
        let logits = Value { shape, ..logits };
        return e.finish_logits(logits);
    }
    let head = tensor("lm_head.weight")?;
    let tied = cfg.tied_embeddings && head == emb;
    let head_w = if tied {
        table
    } else {
        e.stacked("lm_head", &[("lm_head".into(), cfg.vocab_size)], d)?
            .0
    };
    let logits_shape = vec![batch(), logits_seq, Dim::Fixed(cfg.vocab_size as i64)];
    let name = if cfg.final_softcap.is_some() {
        "logits_raw"
    } else {
        "logits"
    };
    if target == Target::Cuda {
        let logits = if act == F32 {
            e.matmul_t(name, &hn, &head_w, cfg.vocab_size)?
        } else {
            let l = e.matmul_t("logits_act", &hn, &head_w, cfg.vocab_size)?;
            let to = vec![("to", Attr::Int(F32.0 as i64))];
            e.g.op("Cast", name, &[&l], to, F32, logits_shape)?
        };
        return e.finish_logits(logits);
    }
    let op = op_name(wtype, false);
    let logits = e.g.node_in(
        DOMAIN,
        op,
        name,
        &[&hn, &head_w],
        vec![],
        vec![(F32, logits_shape)],
    )?;
    e.finish_logits(logits.into_iter().next().context("no logits")?)
}
