//! T5 encoder (transformers' `T5EncoderModel`; T5 v1.1 XXL is Flux's second text encoder): token embedding,
//! pre-norm blocks with RMS-style T5 LayerNorm (no mean, no bias), unscaled self-attention with a learned relative
//! position bias (bidirectional log buckets, table in block 0, shared by all blocks), gated-GELU feed-forward
//! (`gelu_new(wi_0 x) * wi_1 x`), a final norm. No attention mask: Flux feeds the padded sequence whole.
//!
//! Precision: T5's activations exceed f16's range (transformers clamps them in f16; XXL still degrades), so the
//! graph computes in f32 or bf16 (bf16 has f32's exponent range); norms and softmax run in f32 either way.
//!
//! Input `input_ids` [batch, seq] int64 (seq up to `max_len`); output `last_hidden_state` [batch, seq, d_model] f32.
use crate::models::ops::{Ops, activation, attention};
use crate::models::qdq::Linears;
use crate::onnx::builder::ExternalSink;
use crate::onnx::{Attr, DataType, Dim, Value, proto::ModelProto};
use crate::weights::safetensors_file::Checkpoint;
use anyhow::{Result, bail};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub relative_attention_num_buckets: usize,
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f32,
    /// "gated-gelu" (v1.1) or "relu" (original T5).
    pub feed_forward_proj: String,
    /// Longest sequence the graph accepts (the relative-position table covers it).
    pub max_len: usize,
}

impl T5Config {
    /// google/t5-v1_1-xxl's encoder, as Flux.1 ships it (`text_encoder_2`).
    pub fn xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            max_len: 512,
        }
    }

    /// Reads the architecture off the weights (single files carry no config): widths, depth and heads from the
    /// tensors (heads: the relative-position table's columns), gated-GELU when `wi_0` is there, transformers'
    /// defaults for the rest (max distance 128, epsilon 1e-6).
    pub fn from_checkpoint(ck: &Checkpoint, max_len: usize) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            ck.shape(name).map(<[usize]>::to_vec).ok_or_else(|| {
                anyhow::anyhow!(
                    "'{}' has no tensor '{name}': not a T5 encoder",
                    ck.path.display()
                )
            })
        };
        let emb = ["encoder.embed_tokens.weight", "shared.weight"]
            .into_iter()
            .find(|n| ck.contains(n))
            .map_or_else(|| shape("shared.weight"), shape)?;
        let b0 = "encoder.block.0.layer";
        let rel = shape(&format!(
            "{b0}.0.SelfAttention.relative_attention_bias.weight"
        ))?;
        let q = shape(&format!("{b0}.0.SelfAttention.q.weight"))?;
        let gated = ck.contains(&format!("{b0}.1.DenseReluDense.wi_0.weight"));
        let wi = shape(&format!(
            "{b0}.1.DenseReluDense.{}.weight",
            if gated { "wi_0" } else { "wi" }
        ))?;
        let (num_buckets, num_heads) = (rel[0], rel[1]);
        if num_heads == 0 || q[0] % num_heads != 0 {
            bail!(
                "'{}': {} query rows do not split into {num_heads} heads",
                ck.path.display(),
                q[0]
            );
        }
        Ok(Self {
            vocab_size: emb[0],
            d_model: emb[1],
            d_kv: q[0] / num_heads,
            d_ff: wi[0],
            num_layers: (0..)
                .take_while(|i| {
                    ck.contains(&format!("encoder.block.{i}.layer.0.layer_norm.weight"))
                })
                .count(),
            num_heads,
            relative_attention_num_buckets: num_buckets,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: if gated { "gated-gelu" } else { "relu" }.into(),
            max_len,
        })
    }

    /// Reads a transformers T5 `config.json`.
    pub fn from_json(text: &str, max_len: usize) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let num = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| anyhow::anyhow!("T5 config has no integer '{k}'"))
        };
        Ok(Self {
            vocab_size: num("vocab_size")?,
            d_model: num("d_model")?,
            d_kv: num("d_kv")?,
            d_ff: num("d_ff")?,
            num_layers: num("num_layers")?,
            num_heads: num("num_heads")?,
            relative_attention_num_buckets: num("relative_attention_num_buckets")?,
            relative_attention_max_distance: num("relative_attention_max_distance").unwrap_or(128),
            layer_norm_epsilon: v
                .get("layer_norm_epsilon")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6) as f32,
            feed_forward_proj: v
                .get("feed_forward_proj")
                .and_then(|x| x.as_str())
                .unwrap_or("relu")
                .to_string(),
            max_len,
        })
    }
}

/// Bucket of each relative position `key - query` in `-(max_len-1)..=max_len-1` (index `rel + max_len - 1`),
/// by transformers' `_relative_position_bucket(bidirectional=True)`, with its float32 arithmetic.
pub fn relative_buckets(num_buckets: usize, max_distance: usize, max_len: usize) -> Vec<i64> {
    let half = (num_buckets / 2) as i64;
    let max_exact = half / 2;
    let denom = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    (-(max_len as i64 - 1)..max_len as i64)
        .map(|rel| {
            let base = if rel > 0 { half } else { 0 };
            let r = rel.abs();
            let b = if r < max_exact {
                r
            } else {
                let v = (r as f32 / max_exact as f32).ln() / denom * (half - max_exact) as f32;
                (max_exact + v as i64).min(half - 1)
            };
            base + b
        })
        .collect()
}

/// The encoder graph computing in `dtype` (FLOAT or BFLOAT16).
pub fn graph(cfg: &T5Config, ck: &Checkpoint, dtype: DataType) -> Result<ModelProto> {
    Ok(emit(cfg, ck, dtype, None)?.0)
}

/// Writes the graph to `out`, weights streamed to `<out>.data` as they are emitted (T5-XXL: 9.5 GB of bf16).
pub fn export(
    cfg: &T5Config,
    ck: &Checkpoint,
    dtype: DataType,
    out: &std::path::Path,
) -> Result<()> {
    let (model, sink) = emit(cfg, ck, dtype, Some(out))?;
    crate::onnx::save_streamed(model, sink, out)
}

fn emit(
    cfg: &T5Config,
    ck: &Checkpoint,
    dtype: DataType,
    stream: Option<&std::path::Path>,
) -> Result<(ModelProto, Option<ExternalSink>)> {
    if !matches!(dtype, DataType::FLOAT | DataType::BFLOAT16) {
        bail!(
            "the T5 encoder runs in f32 or bf16 only: its activations overflow f16 (asked for {dtype})"
        );
    }
    let (gated, act) = match cfg.feed_forward_proj.as_str() {
        "gated-gelu" => (true, "gelu_new"),
        "relu" => (false, "relu"),
        other => bail!("T5 feed_forward_proj '{other}' is not supported (gated-gelu, relu)"),
    };
    let (d, inner, ff, heads) = (
        cfg.d_model,
        cfg.d_kv * cfg.num_heads,
        cfg.d_ff,
        cfg.num_heads,
    );
    let mut o = Ops::new("t5_encoder", 18, dtype);
    // The shared linear without a precision policy: every projection in `dtype` (a policy here quantizes them).
    let no_amax = std::collections::HashMap::new();
    let mut lin = Linears::new(None, &no_amax, None, 0.0, false);
    if let Some(out) = stream {
        o.g.stream_external_data(out, 1024)?;
    }
    let (batch, seq) = (Dim::Sym("batch".into()), Dim::Sym("seq".into()));
    let ids = o.g.input(
        "input_ids",
        DataType::INT64,
        vec![batch.clone(), seq.clone()],
    )?;
    let emb_name = ["encoder.embed_tokens.weight", "shared.weight"]
        .into_iter()
        .find(|n| ck.contains(n));
    let Some(emb_name) = emb_name else {
        bail!(
            "'{}' is not a T5 encoder: it has neither 'encoder.embed_tokens.weight' nor 'shared.weight' (expected \
             transformers' T5EncoderModel layout, e.g. Flux's text_encoder_2)",
            ck.path.display()
        );
    };
    let emb = ck.get_shaped(emb_name, &[cfg.vocab_size, d])?;
    let table = o.weight(emb_name, &emb, dtype)?;
    let mut h = o.g.op(
        "Gather",
        "embed",
        &[&table, &ids],
        vec![],
        dtype,
        vec![batch.clone(), seq.clone(), Dim::Fixed(d as i64)],
    )?;
    let bias = position_bias(&mut o, cfg, ck, &ids)?;
    for i in 0..cfg.num_layers {
        let l = format!("encoder.block.{i}");
        let w = |n: &str, shape: &[usize]| ck.get_shaped(&format!("{l}.{n}"), shape);
        let x = o.rms_norm(
            &format!("{l}.layer.0.layer_norm"),
            &h,
            &w("layer.0.layer_norm.weight", &[d])?,
            cfg.layer_norm_epsilon,
        )?;
        let mut qkv = Vec::new();
        for t in ["q", "k", "v"] {
            let name = format!("{l}.layer.0.SelfAttention.{t}");
            let wt = w(&format!("layer.0.SelfAttention.{t}.weight"), &[inner, d])?;
            qkv.push(lin.tensor(&mut o, &name, &x, &wt, None)?);
        }
        let a = attention(
            &mut o,
            &format!("{l}.layer.0.SelfAttention"),
            (&qkv[0], &qkv[1], &qkv[2]),
            heads,
            None,
            Some(&bias),
        )?;
        let a = lin.tensor(
            &mut o,
            &format!("{l}.layer.0.SelfAttention.o"),
            &a,
            &w("layer.0.SelfAttention.o.weight", &[d, inner])?,
            None,
        )?;
        h = o.same("Add", &format!("{l}/attn_residual"), &[&h, &a], vec![])?;
        let x = o.rms_norm(
            &format!("{l}.layer.1.layer_norm"),
            &h,
            &w("layer.1.layer_norm.weight", &[d])?,
            cfg.layer_norm_epsilon,
        )?;
        let f = if gated {
            let p = format!("{l}.layer.1.DenseReluDense");
            let g = lin.tensor(
                &mut o,
                &format!("{p}.wi_0"),
                &x,
                &w("layer.1.DenseReluDense.wi_0.weight", &[ff, d])?,
                None,
            )?;
            let g = activation(&mut o, &format!("{p}.act"), &g, act)?;
            let u = lin.tensor(
                &mut o,
                &format!("{p}.wi_1"),
                &x,
                &w("layer.1.DenseReluDense.wi_1.weight", &[ff, d])?,
                None,
            )?;
            o.same("Mul", &format!("{p}/gated"), &[&g, &u], vec![])?
        } else {
            let p = format!("{l}.layer.1.DenseReluDense");
            let u = lin.tensor(
                &mut o,
                &format!("{p}.wi"),
                &x,
                &w("layer.1.DenseReluDense.wi.weight", &[ff, d])?,
                None,
            )?;
            o.same("Relu", &format!("{p}/relu"), &[&u], vec![])?
        };
        let f = lin.tensor(
            &mut o,
            &format!("{l}.layer.1.DenseReluDense.wo"),
            &f,
            &w("layer.1.DenseReluDense.wo.weight", &[d, ff])?,
            None,
        )?;
        h = o.same("Add", &format!("{l}/ff_residual"), &[&h, &f], vec![])?;
    }
    let fw = ck.get_shaped("encoder.final_layer_norm.weight", &[d])?;
    let h = o.rms_norm("encoder.final_layer_norm", &h, &fw, cfg.layer_norm_epsilon)?;
    let out = o.g.op(
        "Cast",
        "last_hidden_state",
        &[&h],
        vec![("to", Attr::Int(DataType::FLOAT.0 as i64))],
        DataType::FLOAT,
        vec![batch, seq, Dim::Fixed(d as i64)],
    )?;
    o.g.output(&out);
    Ok(o.g.finish_streamed())
}

/// [1, heads, seq, seq] f32: the learned bias of each (query, key) pair's relative-position bucket.
fn position_bias(o: &mut Ops, cfg: &T5Config, ck: &Checkpoint, ids: &Value) -> Result<Value> {
    let i64t = DataType::INT64;
    let name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let table = ck.get_shaped(name, &[cfg.relative_attention_num_buckets, cfg.num_heads])?;
    let table = o.weight(name, &table, DataType::FLOAT)?;
    let buckets = relative_buckets(
        cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance,
        cfg.max_len,
    );
    let n = buckets.len() as i64;
    let buckets = o.g.const_i64("relative_buckets", &[n], &buckets)?;
    let shape =
        o.g.op("Shape", "bias/ids_shape", &[ids], vec![], i64t, vec![])?;
    let one = o.g.const_i64("bias.one", &[], &[1])?;
    let zero = o.g.const_i64("bias.zero", &[], &[0])?;
    let len = o.g.op(
        "Gather",
        "bias/seq_len",
        &[&shape, &one],
        vec![],
        i64t,
        vec![],
    )?;
    let r = o.g.op(
        "Range",
        "bias/positions",
        &[&zero, &len, &one],
        vec![],
        i64t,
        vec![],
    )?;
    let ax1 = o.i64s("bias.ax1", &[1])?;
    let ax0 = o.i64s("bias.ax0", &[0])?;
    let q =
        o.g.op("Unsqueeze", "bias/query", &[&r, &ax1], vec![], i64t, vec![])?;
    let k =
        o.g.op("Unsqueeze", "bias/key", &[&r, &ax0], vec![], i64t, vec![])?;
    let rel =
        o.g.op("Sub", "bias/relative", &[&k, &q], vec![], i64t, vec![])?;
    let off =
        o.g.const_i64("bias.offset", &[], &[cfg.max_len as i64 - 1])?;
    let idx =
        o.g.op("Add", "bias/index", &[&rel, &off], vec![], i64t, vec![])?;
    let b = o.g.op(
        "Gather",
        "bias/buckets",
        &[&buckets, &idx],
        vec![],
        i64t,
        vec![],
    )?;
    let v = o.g.op(
        "Gather",
        "bias/values",
        &[&table, &b],
        vec![],
        DataType::FLOAT,
        vec![],
    )?;
    let t = o.g.op(
        "Transpose",
        "bias/heads_first",
        &[&v],
        vec![("perm", Attr::Ints(vec![2, 0, 1]))],
        DataType::FLOAT,
        vec![],
    )?;
    o.g.op(
        "Unsqueeze",
        "position_bias",
        &[&t, &ax0],
        vec![],
        DataType::FLOAT,
        vec![],
    )
}
