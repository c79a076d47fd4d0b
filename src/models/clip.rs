//! CLIP text encoder (transformers' `CLIPTextModel`, the CLIP-L of Flux and SD): token + position embeddings,
//! pre-LayerNorm blocks with causal self-attention and a quick-GELU (or GELU) MLP, a final LayerNorm.
//!
//! Input `input_ids` [batch, 77] int64. Outputs `last_hidden_state` [batch, 77, hidden] and `pooler_output`
//! [batch, hidden]: the final hidden state at the position of the end-of-text token. transformers picks that
//! position with `argmax(input_ids)` when the config's `eos_token_id` is 2 (the legacy rule, which is what
//! openai/clip-vit-large-patch14 and Flux's `text_encoder` have): `<|endoftext|>` is the largest id, so this is its
//! first occurrence. The graph uses the same ArgMax. Weights come zero-copy from the checkpoint.
use crate::models::ops::{Ops, activation, attention, layer_norm};
use crate::models::qdq::Linears;
use crate::onnx::builder::ExternalSink;
use crate::onnx::{Attr, DataType, Dim, proto::ModelProto};
use crate::weights::safetensors_file::Checkpoint;
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
pub fn graph(cfg: &ClipTextConfig, ck: &Checkpoint, dtype: DataType) -> Result<ModelProto> {
    Ok(emit(cfg, ck, dtype, None)?.0)
}

/// Writes the graph to `out` with its weights streamed from the checkpoint mapping to `<out>.data` as they are
/// emitted (both files under temporary names until complete).
pub fn export(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
    out: &std::path::Path,
) -> Result<()> {
    let (model, sink) = emit(cfg, ck, dtype, Some(out))?;
    crate::onnx::save_streamed(model, sink, out)
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
    // The shared linear without a precision policy: every projection in `dtype` (a policy here quantizes them).
    let no_amax = std::collections::HashMap::new();
    let mut lin = Linears::new(None, &no_amax, None, 0.0, false);
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
            qkv.push(lin.tensor(
                &mut o,
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
        let a = lin.tensor(
            &mut o,
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
        let f = lin.tensor(
            &mut o,
            &format!("{l}.mlp.fc1"),
            &x,
            &w("mlp.fc1.weight", &[m, d])?,
            Some(&w("mlp.fc1.bias", &[m])?),
        )?;
        let f = activation(&mut o, &format!("{l}.mlp.act"), &f, &cfg.hidden_act)?;
        let f = lin.tensor(
            &mut o,
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
