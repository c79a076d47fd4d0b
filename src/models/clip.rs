//! CLIP text encoder (transformers' `CLIPTextModel`, the CLIP-L of Flux and SD): token + position embeddings,
//! pre-LayerNorm blocks with causal self-attention and a quick-GELU (or GELU) MLP, a final LayerNorm.
//!
//! Input `input_ids` [batch, 77] int64. Outputs `last_hidden_state` [batch, 77, hidden] and `pooler_output`
//! [batch, hidden]: the final hidden state at the position of the end-of-text token. transformers picks that
//! position with `argmax(input_ids)` when the config's `eos_token_id` is 2 (the legacy rule, which is what
//! openai/clip-vit-large-patch14 and Flux's `text_encoder` have): `<|endoftext|>` is the largest id, so this is its
//! first occurrence. The graph uses the same ArgMax. Weights come zero-copy from the checkpoint.
use crate::models::ops::Ops;
use crate::onnx::builder::ExternalSink;
use crate::onnx::{Attr, DataType, Dim, Value, proto::ModelProto};
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Result, bail};

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f32,
    /// "quick_gelu" (CLIP-L) or "gelu" (CLIP-G).
    pub hidden_act: String,
}

impl ClipTextConfig {
    /// openai/clip-vit-large-patch14's text tower, as Flux.1 ships it.
    pub fn clip_l() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".into(),
        }
    }

    /// Reads a transformers `config.json` (a CLIPTextConfig, or a CLIPConfig with `text_config`).
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)?;
        let v = v.get("text_config").unwrap_or(&v);
        let num = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .ok_or_else(|| anyhow::anyhow!("CLIP config has no integer '{k}'"))
        };
        Ok(Self {
            vocab_size: num("vocab_size")?,
            hidden_size: num("hidden_size")?,
            intermediate_size: num("intermediate_size")?,
            num_hidden_layers: num("num_hidden_layers")?,
            num_attention_heads: num("num_attention_heads")?,
            max_position_embeddings: num("max_position_embeddings")?,
            layer_norm_eps: v
                .get("layer_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-5) as f32,
            hidden_act: v
                .get("hidden_act")
                .and_then(|x| x.as_str())
                .unwrap_or("quick_gelu")
                .to_string(),
        })
    }
}

/// LayerNorm over the last axis with weight and bias from the checkpoint, computed in f32.
pub(crate) fn layer_norm(
    o: &mut Ops,
    name: &str,
    x: &Value,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<Value> {
    let xf = o.cast(&format!("{name}/to_f32"), x, DataType::FLOAT)?;
    let wv = o.weight(&format!("{name}.weight"), w, DataType::FLOAT)?;
    let bv = o.weight(&format!("{name}.bias"), b, DataType::FLOAT)?;
    let y = o.same(
        "LayerNormalization",
        name,
        &[&xf, &wv, &bv],
        vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
    )?;
    o.cast(&format!("{name}/back"), &y, x.dtype)
}

/// Multi-head attention core on projected q/k/v [batch, seq, heads*hd]: per-head scores times `scale`, plus
/// `bias` (broadcast to [batch, heads, seq, seq]) when given, softmax in f32, weighted sum, heads merged back.
pub(crate) fn attention(
    o: &mut Ops,
    name: &str,
    (q, k, v): (&Value, &Value, &Value),
    heads: usize,
    scale: Option<f32>,
    bias: Option<&Value>,
) -> Result<Value> {
    let Some(Dim::Fixed(d)) = q.shape.last().cloned() else {
        bail!("{name}: attention input needs a fixed last dimension");
    };
    let hd = d / heads as i64;
    let split = o.i64s(&format!("{name}.split"), &[0, 0, heads as i64, hd])?;
    let perm = |p: Vec<i64>| vec![("perm", Attr::Ints(p))];
    let mut hv = Vec::new();
    for (t, x) in [("q", q), ("k", k), ("v", v)] {
        let r = o.same(
            "Reshape",
            &format!("{name}/{t}_heads"),
            &[x, &split],
            vec![],
        )?;
        let p = if t == "k" {
            vec![0, 2, 3, 1]
        } else {
            vec![0, 2, 1, 3]
        };
        hv.push(o.same("Transpose", &format!("{name}/{t}_t"), &[&r], perm(p))?);
    }
    let mut s = o.same("MatMul", &format!("{name}/qk"), &[&hv[0], &hv[1]], vec![])?;
    if let Some(scale) = scale {
        let c = o.constant(&format!("{name}.scale"), &[], &[scale])?;
        s = o.same("Mul", &format!("{name}/scaled"), &[&s, &c], vec![])?;
    }
    let mut s = o.cast(&format!("{name}/scores_f32"), &s, DataType::FLOAT)?;
    if let Some(b) = bias {
        s = o.same("Add", &format!("{name}/biased"), &[&s, b], vec![])?;
    }
    let p = o.same(
        "Softmax",
        &format!("{name}/softmax"),
        &[&s],
        vec![("axis", Attr::Int(-1))],
    )?;
    let p = o.cast(&format!("{name}/probs"), &p, q.dtype)?;
    let ctx = o.same("MatMul", &format!("{name}/pv"), &[&p, &hv[2]], vec![])?;
    let ctx = o.same(
        "Transpose",
        &format!("{name}/ctx_t"),
        &[&ctx],
        perm(vec![0, 2, 1, 3]),
    )?;
    let merge = o.i64s(&format!("{name}.merge"), &[0, 0, d])?;
    let mut out = o.same("Reshape", &format!("{name}/ctx"), &[&ctx, &merge], vec![])?;
    out.shape = q.shape.clone();
    Ok(out)
}

/// The checkpoint's key prefix: "text_model." (transformers' CLIPTextModel) or none.
fn prefix(ck: &Checkpoint) -> Result<&'static str> {
    for p in ["text_model.", ""] {
        if ck.contains(&format!("{p}embeddings.token_embedding.weight")) {
            return Ok(p);
        }
    }
    bail!(
        "'{}' is not a CLIP text encoder: it has no 'text_model.embeddings.token_embedding.weight' (expected \
         transformers' CLIPTextModel layout, e.g. Flux's text_encoder/model.safetensors)",
        ck.path.display()
    )
}

/// The CLIP text encoder graph computing in `dtype` (f32, f16 or bf16; LayerNorm and softmax stay f32).
pub fn clip_text_graph(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
) -> Result<ModelProto> {
    Ok(emit(cfg, ck, dtype, None)?.0)
}

/// Writes the graph to `out` with its weights streamed from the checkpoint mapping to `<out>.data` as they are
/// emitted (both files under temporary names until complete).
pub fn export_clip_text(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
    out: &std::path::Path,
) -> Result<()> {
    let (model, sink) = emit(cfg, ck, dtype, Some(out))?;
    crate::models::t5::save_streamed(model, sink, out)
}

fn emit(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
    stream: Option<&std::path::Path>,
) -> Result<(ModelProto, Option<ExternalSink>)> {
    let p = prefix(ck)?;
    let (d, s) = (cfg.hidden_size, cfg.max_position_embeddings);
    let heads = cfg.num_attention_heads;
    if !d.is_multiple_of(heads) {
        bail!("CLIP hidden size {d} is not a multiple of {heads} heads");
    }
    let mut o = Ops::new("clip_text", 18, dtype);
    if let Some(out) = stream {
        o.g.stream_external_data(out, 1024)?;
    }
    let ids = o.g.input(
        "input_ids",
        DataType::INT64,
        vec![Dim::Sym("batch".into()), Dim::Fixed(s as i64)],
    )?;
    let get = |name: &str, shape: &[usize]| ck.get_shaped(&format!("{p}{name}"), shape);
    let tok = get("embeddings.token_embedding.weight", &[cfg.vocab_size, d])?;
    let pos = get("embeddings.position_embedding.weight", &[s, d])?;
    let tok = o.weight(&tok.name, &tok, dtype)?;
    let pos = o.weight(&pos.name, &pos, dtype)?;
    let mut h = o.g.op(
        "Gather",
        "embed/tokens",
        &[&tok, &ids],
        vec![],
        dtype,
        vec![
            Dim::Sym("batch".into()),
            Dim::Fixed(s as i64),
            Dim::Fixed(d as i64),
        ],
    )?;
    h = o.same("Add", "embed/positions", &[&h, &pos], vec![])?;
    // Causal mask: query i sees keys j <= i.
    let mut mask = vec![0f32; s * s];
    for i in 0..s {
        for j in i + 1..s {
            mask[i * s + j] = -1e30;
        }
    }
    let mask = o.constant_f32("causal_mask", &[1, 1, s as i64, s as i64], &mask)?;
    let hd = d / heads;
    for i in 0..cfg.num_hidden_layers {
        let l = format!("{p}encoder.layers.{i}");
        let w = |n: &str, shape: &[usize]| ck.get_shaped(&format!("{l}.{n}"), shape);
        let x = layer_norm(
            &mut o,
            &format!("{l}.layer_norm1"),
            &h,
            &w("layer_norm1.weight", &[d])?,
            &w("layer_norm1.bias", &[d])?,
            cfg.layer_norm_eps,
        )?;
        let mut qkv = Vec::new();
        for t in ["q_proj", "k_proj", "v_proj"] {
            let name = format!("{l}.self_attn.{t}");
            qkv.push(o.linear(
                &name,
                &x,
                &w(&format!("self_attn.{t}.weight"), &[d, d])?,
                Some(&w(&format!("self_attn.{t}.bias"), &[d])?),
            )?);
        }
        let a = attention(
            &mut o,
            &format!("{l}.self_attn"),
            (&qkv[0], &qkv[1], &qkv[2]),
            heads,
            Some((hd as f32).powf(-0.5)),
            Some(&mask),
        )?;
        let a = o.linear(
            &format!("{l}.self_attn.out_proj"),
            &a,
            &w("self_attn.out_proj.weight", &[d, d])?,
            Some(&w("self_attn.out_proj.bias", &[d])?),
        )?;
        h = o.same("Add", &format!("{l}/attn_residual"), &[&h, &a], vec![])?;
        let x = layer_norm(
            &mut o,
            &format!("{l}.layer_norm2"),
            &h,
            &w("layer_norm2.weight", &[d])?,
            &w("layer_norm2.bias", &[d])?,
            cfg.layer_norm_eps,
        )?;
        let m = cfg.intermediate_size;
        let f = o.linear(
            &format!("{l}.mlp.fc1"),
            &x,
            &w("mlp.fc1.weight", &[m, d])?,
            Some(&w("mlp.fc1.bias", &[m])?),
        )?;
        let f = activation(&mut o, &format!("{l}.mlp.act"), &f, &cfg.hidden_act)?;
        let f = o.linear(
            &format!("{l}.mlp.fc2"),
            &f,
            &w("mlp.fc2.weight", &[d, m])?,
            Some(&w("mlp.fc2.bias", &[d])?),
        )?;
        h = o.same("Add", &format!("{l}/mlp_residual"), &[&h, &f], vec![])?;
    }
    let fw = get("final_layer_norm.weight", &[d])?;
    let fb = get("final_layer_norm.bias", &[d])?;
    let h = layer_norm(
        &mut o,
        &format!("{p}final_layer_norm"),
        &h,
        &fw,
        &fb,
        cfg.layer_norm_eps,
    )?;
    let batch_seq_d = vec![
        Dim::Sym("batch".into()),
        Dim::Fixed(s as i64),
        Dim::Fixed(d as i64),
    ];
    let last = o.g.op(
        "Cast",
        "last_hidden_state",
        &[&h],
        vec![("to", Attr::Int(DataType::FLOAT.0 as i64))],
        DataType::FLOAT,
        batch_seq_d,
    )?;
    o.g.output(&last);
    // Pooled: the hidden state at argmax(input_ids) (first <|endoftext|>), gathered per batch row.
    let pos = o.g.op(
        "ArgMax",
        "pool/eos_pos",
        &[&ids],
        vec![("axis", Attr::Int(1)), ("keepdims", Attr::Int(1))],
        DataType::INT64,
        vec![Dim::Sym("batch".into()), Dim::Fixed(1)],
    )?;
    // GatherND with one batch dimension: row b takes last[b, pos[b]].
    let pooled = o.g.op(
        "GatherND",
        "pooler_output",
        &[&last, &pos],
        vec![("batch_dims", Attr::Int(1))],
        DataType::FLOAT,
        vec![Dim::Sym("batch".into()), Dim::Fixed(d as i64)],
    )?;
    o.g.output(&pooled);
    Ok(o.g.finish_streamed())
}

/// CLIP's MLP activations: quick_gelu `x * sigmoid(1.702 x)`, exact gelu (erf).
pub(crate) fn activation(o: &mut Ops, name: &str, x: &Value, act: &str) -> Result<Value> {
    match act {
        "quick_gelu" => {
            let c = o.constant(&format!("{name}.k"), &[], &[1.702])?;
            let t = o.same("Mul", &format!("{name}/scaled"), &[x, &c], vec![])?;
            let sg = o.same("Sigmoid", &format!("{name}/sigmoid"), &[&t], vec![])?;
            o.same("Mul", &format!("{name}/quick_gelu"), &[x, &sg], vec![])
        }
        "gelu" => {
            let c = o.constant(
                &format!("{name}.rsqrt2"),
                &[],
                &[std::f32::consts::FRAC_1_SQRT_2],
            )?;
            let half = o.constant(&format!("{name}.half"), &[], &[0.5])?;
            let one = o.constant(&format!("{name}.one"), &[], &[1.0])?;
            let t = o.same("Mul", &format!("{name}/scaled"), &[x, &c], vec![])?;
            let e = o.same("Erf", &format!("{name}/erf"), &[&t], vec![])?;
            let e = o.same("Add", &format!("{name}/one_plus"), &[&e, &one], vec![])?;
            let hx = o.same("Mul", &format!("{name}/half_x"), &[x, &half], vec![])?;
            o.same("Mul", &format!("{name}/gelu"), &[&hx, &e], vec![])
        }
        "gelu_new" | "gelu_pytorch_tanh" => o.gelu_tanh(name, x),
        other => bail!("activation '{other}' is not supported (quick_gelu, gelu, gelu_new)"),
    }
}
