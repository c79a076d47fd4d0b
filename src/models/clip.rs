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

    /// Reads the architecture off the weights under `scope` (single-file checkpoints carry no config): widths,
    /// depth and vocabulary from the tensors, 64-wide heads, quick_gelu for the 768-wide CLIP-L (OpenAI's) and
    /// gelu otherwise (OpenCLIP ViT-H/bigG). `skip_last_layers` drops final layers (SD2.x's OpenCLIP-H conditions
    /// on the penultimate layer through the final LayerNorm: 1).
    pub fn from_checkpoint(ck: &Checkpoint, scope: &str, skip_last_layers: usize) -> Result<Self> {
        let names = Names {
            ck,
            layout: layout(ck, scope)?,
        };
        let shape = |name: &str| -> Result<Vec<usize>> {
            let key = names.key(name);
            ck.shape(&key)
                .map(|s| s.to_vec())
                .ok_or_else(|| anyhow::anyhow!("'{}' has no tensor '{key}'", ck.path.display()))
        };
        let tok = shape("embeddings.token_embedding.weight")?;
        let pos = shape("embeddings.position_embedding.weight")?;
        let fc1 = shape("encoder.layers.0.mlp.fc1.weight")?;
        let mut layers = 0;
        while names.contains(&format!("encoder.layers.{layers}.layer_norm1.weight")) {
            layers += 1;
        }
        if layers <= skip_last_layers {
            bail!(
                "'{}': {layers} text encoder layers, cannot skip {skip_last_layers}",
                ck.path.display()
            );
        }
        let d = tok[1];
        Ok(Self {
            vocab_size: tok[0],
            hidden_size: d,
            intermediate_size: fc1[0],
            num_hidden_layers: layers - skip_last_layers,
            num_attention_heads: (d / 64).max(1),
            max_position_embeddings: pos[0],
            layer_norm_eps: 1e-5,
            hidden_act: if d == 768 { "quick_gelu" } else { "gelu" }.into(),
        })
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

/// Where a checkpoint keeps the text tower: transformers' layout (`text_model.embeddings...`, possibly under a
/// single-file prefix such as `cond_stage_model.transformer.` or `conditioner.embedders.0.transformer.`) or
/// OpenCLIP's (`token_embedding`, `transformer.resblocks.N.attn.in_proj_weight`, `ln_final`, `text_projection`; SD2.x
/// `cond_stage_model.model.` and SDXL `conditioner.embedders.1.model.`).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Layout {
    /// Prefix up to `embeddings.`; the projection sits at `proj_prefix` + `text_projection.weight`.
    Transformers {
        prefix: String,
        proj_prefix: String,
    },
    OpenClip {
        prefix: String,
    },
}

fn find_prefix(ck: &Checkpoint, scope: &str, suffix: &str) -> Option<String> {
    ck.names()
        .find(|k| k.starts_with(scope) && k.ends_with(suffix))
        .map(|k| k[..k.len() - suffix.len()].to_string())
}

fn layout(ck: &Checkpoint, scope: &str) -> Result<Layout> {
    if let Some(prefix) = find_prefix(ck, scope, "embeddings.token_embedding.weight") {
        let proj_prefix = prefix
            .strip_suffix("text_model.")
            .unwrap_or(&prefix)
            .to_string();
        return Ok(Layout::Transformers {
            prefix,
            proj_prefix,
        });
    }
    if let Some(prefix) = find_prefix(ck, scope, "token_embedding.weight")
        && ck.contains(&format!(
            "{prefix}transformer.resblocks.0.attn.in_proj_weight"
        ))
    {
        return Ok(Layout::OpenClip { prefix });
    }
    bail!(
        "'{}' is not a CLIP text encoder{}: it has neither transformers' 'text_model.embeddings.token_embedding.weight' \
         (a text_encoder/ folder) nor OpenCLIP's 'token_embedding.weight' with 'transformer.resblocks.*' (a \
         single-file checkpoint's cond_stage_model / conditioner.embedders)",
        ck.path.display(),
        if scope.is_empty() {
            String::new()
        } else {
            format!(" under '{scope}'")
        }
    )
}

/// Reads transformers-named parameters from either layout (OpenCLIP's fused q/k/v rows are sliced out without
/// copying; its `text_projection` [hidden, proj] is transposed into a Linear weight).
struct Names<'a> {
    ck: &'a Checkpoint,
    layout: Layout,
}

impl Names<'_> {
    fn key(&self, name: &str) -> String {
        match &self.layout {
            Layout::Transformers {
                prefix,
                proj_prefix,
            } => match name {
                "text_projection.weight" => format!("{proj_prefix}{name}"),
                _ => format!("{prefix}{name}"),
            },
            Layout::OpenClip { prefix } => {
                let mapped = match name {
                    "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
                    "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
                    "text_projection.weight" => "text_projection".to_string(),
                    n => {
                        if let Some(r) = n.strip_prefix("final_layer_norm.") {
                            format!("ln_final.{r}")
                        } else if let Some(r) = n.strip_prefix("encoder.layers.") {
                            let (i, r) = r.split_once('.').unwrap_or((r, ""));
                            let r = [
                                ("layer_norm1.", "ln_1."),
                                ("layer_norm2.", "ln_2."),
                                ("self_attn.out_proj.", "attn.out_proj."),
                                ("mlp.fc1.", "mlp.c_fc."),
                                ("mlp.fc2.", "mlp.c_proj."),
                            ]
                            .iter()
                            .find_map(|(h, o)| r.strip_prefix(h).map(|x| format!("{o}{x}")))
                            .unwrap_or_else(|| r.to_string());
                            format!("transformer.resblocks.{i}.{r}")
                        } else {
                            n.to_string()
                        }
                    }
                };
                format!("{prefix}{mapped}")
            }
        }
    }

    fn contains(&self, name: &str) -> bool {
        match (&self.layout, fused_qkv(name)) {
            (Layout::OpenClip { prefix }, Some((layer, _, param))) => self.ck.contains(&format!(
                "{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"
            )),
            _ => self.ck.contains(&self.key(name)),
        }
    }

    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Layout::OpenClip { prefix } = &self.layout else {
            return self.ck.get_shaped(&self.key(name), shape);
        };
        if let Some((layer, part, param)) = fused_qkv(name) {
            let key = format!("{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}");
            let fused = self.ck.get(&key)?;
            let d = shape[0];
            let mut want = shape.to_vec();
            want[0] = 3 * d;
            if fused.shape != want {
                bail!(
                    "checkpoint '{}': tensor '{key}' has shape {:?}, expected {want:?}: the config does not match \
                     the weights",
                    self.ck.path.display(),
                    fused.shape
                );
            }
            let rows = fused.data.len() / 3;
            let data = fused.data.slice(part * rows..(part + 1) * rows);
            return Ok(Tensor {
                name: key,
                dtype: fused.dtype,
                shape: shape.to_vec(),
                data,
                quant: None,
            });
        }
        if name == "text_projection.weight" {
            // OpenCLIP multiplies x @ P with P [hidden, proj]; a Linear weight is P^T [proj, hidden].
            let key = self.key(name);
            let p = self.ck.get_shaped(&key, &[shape[1], shape[0]])?;
            let v = p.to_f32()?;
            let (rows, cols) = (shape[1], shape[0]);
            let mut t = vec![0f32; v.len()];
            for r in 0..rows {
                for c in 0..cols {
                    t[c * rows + r] = v[r * cols + c];
                }
            }
            return Ok(Tensor {
                name: key,
                dtype: DataType::FLOAT,
                shape: shape.to_vec(),
                data: t
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>()
                    .into(),
                quant: None,
            });
        }
        self.ck.get_shaped(&self.key(name), shape)
    }
}

/// `encoder.layers.N.self_attn.{q,k,v}_proj.{weight,bias}` -> (N, part 0..3, "weight"/"bias").
fn fused_qkv(name: &str) -> Option<(&str, usize, &str)> {
    let r = name.strip_prefix("encoder.layers.")?;
    let (layer, r) = r.split_once(".self_attn.")?;
    let (proj, param) = r.split_once('.')?;
    let part = ["q_proj", "k_proj", "v_proj"]
        .iter()
        .position(|p| *p == proj)?;
    Some((layer, part, param))
}

/// Which encoder of a checkpoint, and outputs beyond `last_hidden_state` and `pooler_output` (the SD family's
/// conditioning).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClipOptions {
    /// Only keys starting with this belong to the encoder (single files hold several: SDXL's
    /// `conditioner.embedders.0.` and `conditioner.embedders.1.`).
    pub scope: String,
    /// `penultimate_hidden_state`: the second-to-last layer's output without the final LayerNorm (transformers'
    /// `hidden_states[-2]`, what SDXL and "clip skip 2" condition on).
    pub penultimate: bool,
    /// `text_embeds`: the pooled output through `text_projection` (CLIPTextModelWithProjection; SDXL's pooled
    /// conditioning).
    pub projection: bool,
}

/// The CLIP text encoder graph computing in `dtype` (f32, f16 or bf16; LayerNorm and softmax stay f32).
pub fn graph(cfg: &ClipTextConfig, ck: &Checkpoint, dtype: DataType) -> Result<ModelProto> {
    Ok(emit(cfg, ck, dtype, &ClipOptions::default(), None)?.0)
}

/// [`graph`] with the extra outputs asked for.
pub fn graph_with(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
    outputs: &ClipOptions,
) -> Result<ModelProto> {
    Ok(emit(cfg, ck, dtype, outputs, None)?.0)
}

/// Writes the graph to `out` with its weights streamed from the checkpoint mapping to `<out>.data` as they are
/// emitted (both files under temporary names until complete).
pub fn export(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
    out: &std::path::Path,
) -> Result<()> {
    export_with(cfg, ck, dtype, &ClipOptions::default(), out)
}

/// [`export`] with the extra outputs asked for.
pub fn export_with(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
    outputs: &ClipOptions,
    out: &std::path::Path,
) -> Result<()> {
    let (model, sink) = emit(cfg, ck, dtype, outputs, Some(out))?;
    crate::onnx::save_streamed(model, sink, out)
}

fn emit(
    cfg: &ClipTextConfig,
    ck: &Checkpoint,
    dtype: DataType,
    outputs: &ClipOptions,
    stream: Option<&std::path::Path>,
) -> Result<(ModelProto, Option<ExternalSink>)> {
    let names = Names {
        ck,
        layout: layout(ck, &outputs.scope)?,
    };
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
    let get = |name: &str, shape: &[usize]| names.get(name, shape);
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
        if outputs.penultimate && i + 1 == cfg.num_hidden_layers {
            let mut pen = o.g.op(
                "Cast",
                "penultimate_hidden_state",
                &[&h],
                vec![("to", Attr::Int(DataType::FLOAT.0 as i64))],
                DataType::FLOAT,
                h.shape.clone(),
            )?;
            pen.shape = h.shape.clone();
            o.g.output(&pen);
        }
        let l = format!("encoder.layers.{i}");
        let w = |n: &str, shape: &[usize]| names.get(&format!("{l}.{n}"), shape);
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
    let h = layer_norm(&mut o, "final_layer_norm", &h, &fw, &fb, cfg.layer_norm_eps)?;
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
    if outputs.projection {
        if !names.contains("text_projection.weight") {
            bail!(
                "'{}' has no text projection ('{}'): it is a CLIPTextModel, not the CLIPTextModelWithProjection \
                 SDXL's second text encoder needs",
                ck.path.display(),
                names.key("text_projection.weight")
            );
        }
        let proj = names
            .ck
            .shape(&names.key("text_projection.weight"))
            .map(|s| s.to_vec());
        let pdim = match (&names.layout, proj.as_deref()) {
            (Layout::OpenClip { .. }, Some([_, p])) => *p,
            (_, Some([p, _])) => *p,
            _ => bail!("'{}': text_projection is not 2-D", ck.path.display()),
        };
        let w = names.get("text_projection.weight", &[pdim, d])?;
        // The pooled state is f32 (taken after the output cast); the projection computes in the graph's dtype.
        let dt = o.dtype;
        let pooled = o.cast("text_projection/in", &pooled, dt)?;
        let e = o.linear("text_projection", &pooled, &w, None)?;
        let e = o.g.op(
            "Cast",
            "text_embeds",
            &[&e],
            vec![("to", Attr::Int(DataType::FLOAT.0 as i64))],
            DataType::FLOAT,
            vec![Dim::Sym("batch".into()), Dim::Fixed(pdim as i64)],
        )?;
        o.g.output(&e);
    }
    Ok(o.g.finish_streamed())
}
