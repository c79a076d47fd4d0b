//! The Stable Diffusion 3 / 3.5 transformer (diffusers `SD3Transformer2DModel`, the MMDiT of SD3.5 large and the
//! MMDiT-X of SD3.5 medium) as one ONNX graph, weights zero-copy from a diffusers-layout checkpoint
//! (`transformer/`).
//!
//! ## Graph contract (all float32)
//! - `latents` [batch, C, H, W]: the scaled VAE latents (the graph patchifies them with `pos_embed.proj`, a
//!   stride-p convolution, and adds the 2D sin-cos position table cropped to the centre `H/p x W/p` of its
//!   `pos_embed_max_size` grid, as diffusers' `PatchEmbed.cropped_pos_embed`);
//! - `timestep` [batch]: what diffusers' pipeline passes, `sigma * 1000`;
//! - `encoder_hidden_states` [batch, seq, joint_attention_dim]: CLIP-L | CLIP-G penultimate states padded to the
//!   T5 width, then the T5 states (the pipeline builds them);
//! - `pooled_projections` [batch, pooled_projection_dim]: CLIP-L | CLIP-G pooled, projected outputs;
//! - `skip_layers` [num_layers]: 1 skips block i (its input passes through unchanged, diffusers' `skip_layers`,
//!   what skip-layer guidance runs), 0 runs it.
//!
//! Output `sample` [batch, C, H, W]: diffusers' output (the flow velocity).
//!
//! Inside: patch + position embedding; timestep embedding + pooled text projection (the AdaLN input); context
//! projection; joint blocks (AdaLN-Zero on both streams, one attention over [image | context] with optional
//! per-head RMSNorm of q and k, MMDiT-X blocks add a second image-only attention with its own modulation; the last
//! block only reads the context: `context_pre_only`); continuous AdaLN + projection; unpatchify.
//!
//! ## Precisions
//! As Flux: f32/f16/bf16 compute, or FP8/NVFP4 GEMMs chosen per layer by a [`Policy`] ([`default_policy`]: the
//! embedders, every AdaLN modulation, the context embedder and `proj_out` stay high precision); LayerNorm, RMSNorm
//! and softmax run in f32. Policy names and amax keys are diffusers' layer names.
use crate::models::flux::FluxPrecision;
use crate::models::ops::{self, Ops};
use crate::models::qdq::{Linears, Weight, attention};
use crate::onnx::{Attr, DataType, Dim, SaveOptions, Value, proto::ModelProto, save};
use crate::quant::LinearPrecision;
use crate::quant::policy::Policy;
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::Path;

/// `transformer/config.json` of an SD3 model. Sizes are required; the other keys take
/// `SD3Transformer2DModel.__init__`'s defaults when absent, as diffusers does.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Sd3Config {
    #[serde(default = "defaults::patch")]
    pub patch_size: usize,
    #[serde(default = "defaults::channels")]
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "defaults::pos_max")]
    pub pos_embed_max_size: usize,
    /// MMDiT-X blocks (SD3.5 medium: 0..=12).
    #[serde(default)]
    pub dual_attention_layers: Vec<usize>,
    /// "rms_norm" (SD3.5) or none (SD3.0).
    #[serde(default)]
    pub qk_norm: Option<String>,
}

mod defaults {
    pub fn patch() -> usize {
        2
    }
    pub fn channels() -> usize {
        16
    }
    pub fn pos_max() -> usize {
        96
    }
}

impl Sd3Config {
    /// Reads `config.json` (`path` names it in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("'{}' is not valid JSON", path.display()))?;
        if let Some(c) = v.get("_class_name").and_then(|c| c.as_str())
            && c != "SD3Transformer2DModel"
        {
            bail!(
                "'{}' describes a {c}, not an SD3Transformer2DModel: point --arch sd35-* at a Stable Diffusion 3.5 \
                 model folder",
                path.display()
            );
        }
        let c: Sd3Config = serde_json::from_value(v).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not an SD3Transformer2DModel config: {e}. Fix: use the config.json diffusers saved with \
                 the transformer weights",
                path.display()
            )
        })?;
        c.check()
            .with_context(|| format!("'{}' has an unsupported config", path.display()))?;
        Ok(c)
    }

    /// Reads the config off a diffusers-named checkpoint (a single file's [`diffusers_view`]; single files carry
    /// no config): widths, depth, patch, position grid and MMDiT-X blocks from the tensors; the head size from
    /// the qk RMSNorm weights, else 64 (every released SD3 model).
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            ck.shape(name).map(<[usize]>::to_vec).with_context(|| {
                format!(
                    "'{}' has no tensor '{name}': not an SD3 transformer",
                    ck.path.display()
                )
            })
        };
        let proj = shape("pos_embed.proj.weight")?;
        let (dim, in_channels, patch_size) = (proj[0], proj[1], proj[2]);
        let grid = shape("pos_embed.pos_embed")?[1];
        let pos_embed_max_size = (grid as f64).sqrt().round() as usize;
        if pos_embed_max_size * pos_embed_max_size != grid {
            bail!(
                "'{}': the position table has {grid} rows, not a square grid",
                ck.path.display()
            );
        }
        let num_layers = (0..)
            .take_while(|i| ck.contains(&format!("transformer_blocks.{i}.attn.to_q.weight")))
            .count();
        let qk_norm = ck.contains("transformer_blocks.0.attn.norm_q.weight");
        let attention_head_dim = if qk_norm {
            shape("transformer_blocks.0.attn.norm_q.weight")?[0]
        } else {
            64
        };
        if attention_head_dim == 0 || dim % attention_head_dim != 0 {
            bail!(
                "'{}': width {dim} is not a whole number of {attention_head_dim}-wide heads",
                ck.path.display()
            );
        }
        let context = shape("context_embedder.weight")?;
        let p_out = shape("proj_out.weight")?[0];
        let c = Sd3Config {
            patch_size,
            in_channels,
            num_layers,
            attention_head_dim,
            num_attention_heads: dim / attention_head_dim,
            joint_attention_dim: context[1],
            caption_projection_dim: context[0],
            pooled_projection_dim: shape("time_text_embed.text_embedder.linear_1.weight")?[1],
            out_channels: Some(p_out / (patch_size * patch_size).max(1)),
            pos_embed_max_size,
            dual_attention_layers: (0..num_layers)
                .filter(|i| ck.contains(&format!("transformer_blocks.{i}.attn2.to_q.weight")))
                .collect(),
            qk_norm: qk_norm.then(|| "rms_norm".to_string()),
        };
        c.check()
            .with_context(|| format!("'{}' has an unsupported shape", ck.path.display()))?;
        c.check_checkpoint(ck)?;
        Ok(c)
    }

    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Every tensor of a diffusers checkpoint of this config (name, shape), in emission order: what a synthetic
    /// checkpoint needs (benches/sd35_export.rs).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, p, hd) = (self.dim(), self.patch_size, self.attention_head_dim);
        let mut v: Vec<(String, Vec<usize>)> = Vec::new();
        let linear = |v: &mut Vec<(String, Vec<usize>)>, name: String, out: usize, inp: usize| {
            v.push((format!("{name}.weight"), vec![out, inp]));
            v.push((format!("{name}.bias"), vec![out]));
        };
        v.push((
            "pos_embed.proj.weight".into(),
            vec![d, self.in_channels, p, p],
        ));
        v.push(("pos_embed.proj.bias".into(), vec![d]));
        let m = self.pos_embed_max_size;
        v.push(("pos_embed.pos_embed".into(), vec![1, m * m, d]));
        linear(
            &mut v,
            "time_text_embed.timestep_embedder.linear_1".into(),
            d,
            256,
        );
        linear(
            &mut v,
            "time_text_embed.timestep_embedder.linear_2".into(),
            d,
            d,
        );
        linear(
            &mut v,
            "time_text_embed.text_embedder.linear_1".into(),
            d,
            self.pooled_projection_dim,
        );
        linear(
            &mut v,
            "time_text_embed.text_embedder.linear_2".into(),
            d,
            d,
        );
        linear(
            &mut v,
            "context_embedder".into(),
            d,
            self.joint_attention_dim,
        );
        for i in 0..self.num_layers {
            let b = format!("transformer_blocks.{i}");
            let last = i + 1 == self.num_layers;
            let dual = self.dual_attention_layers.contains(&i);
            linear(
                &mut v,
                format!("{b}.norm1.linear"),
                if dual { 9 } else { 6 } * d,
                d,
            );
            linear(
                &mut v,
                format!("{b}.norm1_context.linear"),
                if last { 2 } else { 6 } * d,
                d,
            );
            let mut projections = vec!["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"];
            projections.extend(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]);
            if !last {
                projections.push("attn.to_add_out");
            }
            if dual {
                projections.extend(["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]);
            }
            for name in projections {
                linear(&mut v, format!("{b}.{name}"), d, d);
            }
            if self.qk_norm.is_some() {
                let mut norms = vec![
                    "attn.norm_q",
                    "attn.norm_k",
                    "attn.norm_added_q",
                    "attn.norm_added_k",
                ];
                if dual {
                    norms.extend(["attn2.norm_q", "attn2.norm_k"]);
                }
                for n in norms {
                    v.push((format!("{b}.{n}.weight"), vec![hd]));
                }
            }
            let streams: &[&str] = if last { &["ff"] } else { &["ff", "ff_context"] };
            for f in streams {
                linear(&mut v, format!("{b}.{f}.net.0.proj"), 4 * d, d);
                linear(&mut v, format!("{b}.{f}.net.2"), d, 4 * d);
            }
        }
        linear(&mut v, "norm_out.linear".into(), 2 * d, d);
        linear(&mut v, "proj_out".into(), p * p * self.out_channels(), d);
        v
    }

    /// SD3.5 medium's MMDiT-X (dual attention) blocks.
    pub fn is_medium(&self) -> bool {
        !self.dual_attention_layers.is_empty()
    }

    fn check(&self) -> Result<()> {
        if self.num_layers == 0 || self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            bail!("num_layers, num_attention_heads and attention_head_dim must be positive");
        }
        if self.caption_projection_dim != self.dim() {
            bail!(
                "caption_projection_dim {} differs from the model width {} (heads x head size): every released \
                 SD3 model has them equal",
                self.caption_projection_dim,
                self.dim()
            );
        }
        if let Some(i) = self
            .dual_attention_layers
            .iter()
            .find(|i| **i >= self.num_layers)
        {
            bail!(
                "dual_attention_layers names block {i}, the model has {}",
                self.num_layers
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => bail!("qk_norm '{other}' is not supported (rms_norm or none)"),
        }
        if self.patch_size == 0 || self.pos_embed_max_size == 0 {
            bail!("patch_size and pos_embed_max_size must be positive");
        }
        Ok(())
    }

    /// Checks that the checkpoint's tensors have this config's shapes (a config of another model fails here,
    /// not deep inside the export).
    pub fn check_checkpoint(&self, ck: &Checkpoint) -> Result<()> {
        let (d, p, m) = (self.dim(), self.patch_size, self.pos_embed_max_size);
        let mut expect = vec![
            (
                "pos_embed.proj.weight".to_string(),
                vec![d, self.in_channels, p, p],
            ),
            ("pos_embed.pos_embed".to_string(), vec![1, m * m, d]),
            (
                "context_embedder.weight".to_string(),
                vec![d, self.joint_attention_dim],
            ),
            (
                "time_text_embed.text_embedder.linear_1.weight".to_string(),
                vec![d, self.pooled_projection_dim],
            ),
            (
                "proj_out.weight".to_string(),
                vec![p * p * self.out_channels(), d],
            ),
        ];
        for &i in &self.dual_attention_layers {
            expect.push((
                format!("transformer_blocks.{i}.norm1.linear.weight"),
                vec![9 * d, d],
            ));
        }
        for (name, shape) in expect {
            match ck.shape(&name) {
                Some(s) if s == shape.as_slice() => {}
                Some(s) => bail!(
                    "the transformer weights do not fit its config: '{name}' is {s:?}, the config gives {shape:?}"
                ),
                None => bail!(
                    "the transformer checkpoint has no '{name}': it is not a diffusers SD3Transformer2DModel \
                     (use the diffusers model folder, or a single-file SD3.5 checkpoint with --arch)"
                ),
            }
        }
        let last = format!(
            "transformer_blocks.{}.attn.to_q.weight",
            self.num_layers - 1
        );
        if !ck.contains(&last)
            || ck.contains(&format!(
                "transformer_blocks.{}.attn.to_q.weight",
                self.num_layers
            ))
        {
            bail!(
                "the transformer checkpoint does not have the config's {} blocks",
                self.num_layers
            );
        }
        Ok(())
    }
}

/// The key every original-layout (Stability AI / ComfyUI single-file) SD3 transformer has, after its prefix
/// (`model.diffusion_model.` in whole-model files, none in diffusion-model-only ones).
const ORIGINAL_MARKER: &str = "joint_blocks.0.x_block.attn.qkv.weight";

/// The prefix of an original-layout SD3 transformer in `ck`, if it holds one.
pub fn original_prefix(ck: &Checkpoint) -> Option<String> {
    ck.names()
        .find(|n| n.ends_with(ORIGINAL_MARKER))
        .map(|n| n[..n.len() - ORIGINAL_MARKER.len()].to_string())
}

/// The transformer of an original-layout single file as a diffusers-named view (diffusers'
/// `convert_sd3_transformer_checkpoint_to_diffusers`: fused qkv split into q, k, v without copying; the final
/// AdaLN and the last block's context AdaLN from shift|scale to scale|shift).
pub fn diffusers_view(ck: &Checkpoint, prefix: &str) -> Result<Checkpoint> {
    use crate::weights::safetensors_file::Derived::{Rows, Same, SwapHalves};
    let src = |k: &str| format!("{prefix}{k}");
    let layers = (0..)
        .take_while(|i| ck.contains(&src(&format!("joint_blocks.{i}.x_block.attn.qkv.weight"))))
        .count();
    let has_qk_norm = ck.contains(&src("joint_blocks.0.x_block.attn.ln_q.weight"));
    let mut t: Vec<(String, crate::weights::safetensors_file::Derived)> = Vec::new();
    let same = |t: &mut Vec<_>, to: String, from: String| t.push((to, Same(src(&from))));
    for (to, from) in [
        ("pos_embed.pos_embed", "pos_embed"),
        ("pos_embed.proj.weight", "x_embedder.proj.weight"),
        ("pos_embed.proj.bias", "x_embedder.proj.bias"),
        ("context_embedder.weight", "context_embedder.weight"),
        ("context_embedder.bias", "context_embedder.bias"),
        ("proj_out.weight", "final_layer.linear.weight"),
        ("proj_out.bias", "final_layer.linear.bias"),
    ] {
        same(&mut t, to.into(), from.into());
    }
    for (to, from) in [
        ("timestep_embedder", "t_embedder"),
        ("text_embedder", "y_embedder"),
    ] {
        for (l, m) in [("linear_1", 0), ("linear_2", 2)] {
            for p in ["weight", "bias"] {
                same(
                    &mut t,
                    format!("time_text_embed.{to}.{l}.{p}"),
                    format!("{from}.mlp.{m}.{p}"),
                );
            }
        }
    }
    for p in ["weight", "bias"] {
        t.push((
            format!("norm_out.linear.{p}"),
            SwapHalves(src(&format!("final_layer.adaLN_modulation.1.{p}"))),
        ));
    }
    for i in 0..layers {
        let (d, o) = (
            format!("transformer_blocks.{i}"),
            format!("joint_blocks.{i}"),
        );
        let last = i + 1 == layers;
        let dual = ck.contains(&src(&format!("{o}.x_block.attn2.qkv.weight")));
        let qkv = |t: &mut Vec<_>, from: String, to: [&str; 3]| {
            for p in ["weight", "bias"] {
                for (index, name) in to.iter().enumerate() {
                    t.push((
                        format!("{d}.{name}.{p}"),
                        Rows {
                            name: src(&format!("{from}.{p}")),
                            index,
                            parts: 3,
                        },
                    ));
                }
            }
        };
        qkv(
            &mut t,
            format!("{o}.x_block.attn.qkv"),
            ["attn.to_q", "attn.to_k", "attn.to_v"],
        );
        qkv(
            &mut t,
            format!("{o}.context_block.attn.qkv"),
            ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        );
        if dual {
            qkv(
                &mut t,
                format!("{o}.x_block.attn2.qkv"),
                ["attn2.to_q", "attn2.to_k", "attn2.to_v"],
            );
        }
        let mut pairs: Vec<(String, String)> = vec![
            ("attn.to_out.0".into(), "x_block.attn.proj".into()),
            ("norm1.linear".into(), "x_block.adaLN_modulation.1".into()),
            ("ff.net.0.proj".into(), "x_block.mlp.fc1".into()),
            ("ff.net.2".into(), "x_block.mlp.fc2".into()),
        ];
        if !last {
            pairs.extend([
                ("attn.to_add_out".into(), "context_block.attn.proj".into()),
                (
                    "norm1_context.linear".into(),
                    "context_block.adaLN_modulation.1".into(),
                ),
                (
                    "ff_context.net.0.proj".into(),
                    "context_block.mlp.fc1".into(),
                ),
                ("ff_context.net.2".into(), "context_block.mlp.fc2".into()),
            ]);
        }
        if dual {
            pairs.push(("attn2.to_out.0".into(), "x_block.attn2.proj".into()));
        }
        for (to, from) in pairs {
            for p in ["weight", "bias"] {
                same(&mut t, format!("{d}.{to}.{p}"), format!("{o}.{from}.{p}"));
            }
        }
        if last {
            for p in ["weight", "bias"] {
                t.push((
                    format!("{d}.norm1_context.linear.{p}"),
                    SwapHalves(src(&format!("{o}.context_block.adaLN_modulation.1.{p}"))),
                ));
            }
        }
        if has_qk_norm {
            let mut norms = vec![
                ("attn.norm_q", "x_block.attn.ln_q"),
                ("attn.norm_k", "x_block.attn.ln_k"),
                ("attn.norm_added_q", "context_block.attn.ln_q"),
                ("attn.norm_added_k", "context_block.attn.ln_k"),
            ];
            if dual {
                norms.extend([
                    ("attn2.norm_q", "x_block.attn2.ln_q"),
                    ("attn2.norm_k", "x_block.attn2.ln_k"),
                ]);
            }
            for (to, from) in norms {
                same(
                    &mut t,
                    format!("{d}.{to}.weight"),
                    format!("{o}.{from}.weight"),
                );
            }
        }
    }
    ck.renamed(t)
}

/// ModelOpt-like defaults for SD3: [`Policy::defaults`] (embedders `*embed*`, norms incl. every AdaLN modulation
/// `norm1*.linear` / `norm_out.linear`, the final `proj_out`) plus the context embedder, which reads the raw text
/// features (T5's outliers).
pub fn default_policy(target: LinearPrecision) -> Policy {
    Policy::defaults(target)
        .with_overrides(
            &[],
            &[
                "context_embedder".into(),
                "*norm1.linear".into(),
                "*norm1_context.linear".into(),
                "norm_out.linear".into(),
                "proj_out".into(),
            ],
        )
        .expect("valid globs")
}

/// The amax key of a layer's input: projections reading one activation share the first one's name.
pub fn amax_key(layer: &str) -> String {
    for (from, to) in [
        ("attn.to_k", "attn.to_q"),
        ("attn.to_v", "attn.to_q"),
        ("attn2.to_k", "attn2.to_q"),
        ("attn2.to_v", "attn2.to_q"),
        ("attn.add_k_proj", "attn.add_q_proj"),
        ("attn.add_v_proj", "attn.add_q_proj"),
    ] {
        if let Some(base) = layer.strip_suffix(from) {
            return format!("{base}{to}");
        }
    }
    layer.to_string()
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub precision: FluxPrecision,
    /// None: [`default_policy`] for quantized precisions.
    pub policy: Option<Policy>,
    /// Calibrated activation absolute maxima by [`amax_key`] (required for FP8; optional for NVFP4).
    pub amax: HashMap<String, f32>,
    /// NVFP4 activation amax for layers missing from `amax`.
    pub nvfp4_default_amax: f32,
    /// Compute dtype of FP8/NVFP4 graphs outside their quantized GEMMs (FLOAT, FLOAT16 or BFLOAT16).
    pub quantized_compute: DataType,
    /// Adds an `amax.<key>` output per linear-layer input activation (calibration runs, with F32).
    pub calibration: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            precision: FluxPrecision::F32,
            policy: None,
            amax: HashMap::new(),
            nvfp4_default_amax: 256.0,
            quantized_compute: DataType::FLOAT,
            calibration: false,
        }
    }
}

fn batch() -> Dim {
    Dim::Sym("batch".into())
}

/// The graph's input names, in order.
pub const INPUTS: [&str; 5] = [
    "latents",
    "timestep",
    "encoder_hidden_states",
    "pooled_projections",
    "skip_layers",
];

struct Emitter<'a> {
    o: Ops,
    cfg: &'a Sd3Config,
    ck: &'a Checkpoint,
    linears: Linears<'a>,
}

impl Emitter<'_> {
    fn t(&self, name: &str) -> Result<Tensor> {
        self.ck.get(name)
    }

    fn linear(&mut self, x: &Value, base: &str) -> Result<Value> {
        let weight = self.t(&format!("{base}.weight"))?;
        let bname = format!("{base}.bias");
        let bias = if self.ck.contains(&bname) {
            Some(self.t(&bname)?)
        } else {
            None
        };
        self.linears.linear(
            &mut self.o,
            base,
            base,
            &amax_key(base),
            x,
            Weight::Tensor {
                weight: &weight,
                bias: bias.as_ref(),
            },
        )
    }

    fn int_op(&mut self, op: &str, name: &str, inputs: &[&Value], n: i64) -> Result<Value> {
        self.o.g.op(
            op,
            name,
            inputs,
            vec![],
            DataType::INT64,
            vec![Dim::Fixed(n)],
        )
    }

    /// Dimensions `start..end` of `x`'s shape as an int64 vector.
    fn dims(&mut self, name: &str, x: &Value, start: i64, end: i64) -> Result<Value> {
        self.o.g.op(
            "Shape",
            name,
            &[x],
            vec![("start", Attr::Int(start)), ("end", Attr::Int(end))],
            DataType::INT64,
            vec![Dim::Fixed(end - start)],
        )
    }

    fn add(&mut self, name: &str, a: &Value, b: &Value) -> Result<Value> {
        let mut r = self.o.same("Add", name, &[a, b], vec![])?;
        r.shape = a.shape.clone();
        Ok(r)
    }

    /// `lin(silu(temb))` split into `parts` chunks of [B, 1, dim].
    fn modulation(&mut self, temb_act: &Value, base: &str, parts: usize) -> Result<Vec<Value>> {
        let d = self.cfg.dim();
        let m = self.linear(temb_act, base)?;
        let ax = self.o.i64s(&format!("{base}.ax"), &[1])?;
        let mut m = self
            .o
            .same("Unsqueeze", &format!("{base}/seq_axis"), &[&m, &ax], vec![])?;
        m.shape = vec![batch(), Dim::Fixed(1), Dim::Fixed((parts * d) as i64)];
        let sizes = self
            .o
            .i64s(&format!("{base}.sizes"), &vec![d as i64; parts])?;
        let part = (
            self.o.dtype,
            vec![batch(), Dim::Fixed(1), Dim::Fixed(d as i64)],
        );
        self.o.g.node(
            "Split",
            &format!("{base}/chunks"),
            &[&m, &sizes],
            vec![("axis", Attr::Int(-1))],
            vec![part; parts],
        )
    }

    /// `LayerNorm(x) * (1 + scale) + shift` (no affine LayerNorm, eps 1e-6); `normed` reuses a LayerNorm output.
    fn modulate(
        &mut self,
        name: &str,
        normed: &Value,
        shift: &Value,
        scale: &Value,
    ) -> Result<Value> {
        let one = self.o.constant(&format!("{name}.one"), &[], &[1.0])?;
        let s1 = self.o.same(
            "Add",
            &format!("{name}/one_plus_scale"),
            &[scale, &one],
            vec![],
        )?;
        let mut y = self
            .o
            .same("Mul", &format!("{name}/scaled"), &[normed, &s1], vec![])?;
        y.shape = normed.shape.clone();
        self.add(&format!("{name}/shifted"), &y, shift)
    }

    fn norm(&mut self, name: &str, x: &Value) -> Result<Value> {
        let d = self.cfg.dim();
        let mut y = self.o.layer_norm_plain(name, x, d, 1e-6)?;
        y.shape = x.shape.clone();
        Ok(y)
    }

    /// `x + gate * y`.
    fn gated(&mut self, name: &str, x: &Value, gate: &Value, y: &Value) -> Result<Value> {
        let gy = self
            .o
            .same("Mul", &format!("{name}/gate"), &[y, gate], vec![])?;
        let mut r = self.add(&format!("{name}/residual"), x, &gy)?;
        if self.o.dtype == DataType::FLOAT16 {
            // As diffusers does for fp16: keep the residual stream finite.
            let lo = self.o.constant(&format!("{name}.lo"), &[], &[-65504.0])?;
            let hi = self.o.constant(&format!("{name}.hi"), &[], &[65504.0])?;
            r = self
                .o
                .same("Clip", &format!("{name}/clip"), &[&r, &lo, &hi], vec![])?;
        }
        Ok(r)
    }

    /// [B, S, dim] -> [B, H, S, hd].
    fn heads(&mut self, name: &str, x: &Value) -> Result<Value> {
        let (h, hd) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.attention_head_dim as i64,
        );
        let s = self.o.i64s(&format!("{name}.shape"), &[0, 0, h, hd])?;
        let r = self
            .o
            .same("Reshape", &format!("{name}/heads"), &[x, &s], vec![])?;
        let mut t = self.o.same(
            "Transpose",
            &format!("{name}/bhsd"),
            &[&r],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?;
        t.shape = vec![batch(), Dim::Fixed(h), x.shape[1].clone(), Dim::Fixed(hd)];
        Ok(t)
    }

    /// [B, H, S, hd] -> [B, S, dim].
    fn merge(&mut self, name: &str, x: &Value, seq: Dim) -> Result<Value> {
        let t = self.o.same(
            "Transpose",
            &format!("{name}/bshd"),
            &[x],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?;
        let s = self
            .o
            .i64s(&format!("{name}.merged"), &[0, 0, self.cfg.dim() as i64])?;
        let mut y = self
            .o
            .same("Reshape", &format!("{name}/merged"), &[&t, &s], vec![])?;
        y.shape = vec![batch(), seq, Dim::Fixed(self.cfg.dim() as i64)];
        Ok(y)
    }

    /// q, k, v of `x` through `{a}.{q,k,v}` with the per-head RMSNorms `{a}.{nq,nk}` when the checkpoint has them.
    fn qkv(
        &mut self,
        a: &str,
        x: &Value,
        projs: [&str; 3],
        norms: [&str; 2],
    ) -> Result<[Value; 3]> {
        let mut out = Vec::new();
        for (i, proj) in projs.iter().enumerate() {
            let y = self.linear(x, &format!("{a}.{proj}"))?;
            let y = self.heads(&format!("{a}.{proj}"), &y)?;
            let y = match norms.get(i) {
                Some(n) if self.ck.contains(&format!("{a}.{n}.weight")) => {
                    let w = self.t(&format!("{a}.{n}.weight"))?;
                    self.o.rms_norm(&format!("{a}.{n}"), &y, &w, 1e-6)?
                }
                _ => y,
            };
            out.push(y);
        }
        let [q, k, v]: [Value; 3] = out.try_into().expect("three projections");
        Ok([q, k, v])
    }

    /// One `JointTransformerBlock`; returns the new (image, context) streams (context None after the last block).
    fn block(
        &mut self,
        i: usize,
        h: &Value,
        c: &Value,
        temb_act: &Value,
        n_img: &Value,
    ) -> Result<(Value, Option<Value>)> {
        let p = format!("transformer_blocks.{i}");
        let dual = self.cfg.dual_attention_layers.contains(&i);
        let last = i + 1 == self.cfg.num_layers;
        let m = self.modulation(
            temb_act,
            &format!("{p}.norm1.linear"),
            if dual { 9 } else { 6 },
        )?;
        let nh = self.norm(&format!("{p}.norm1.norm"), h)?;
        let h_mod = self.modulate(&format!("{p}.norm1"), &nh, &m[0], &m[1])?;
        let nc = self.norm(&format!("{p}.norm1_context.norm"), c)?;
        let (c_mod, mc) = if last {
            // AdaLayerNormContinuous: (scale, shift).
            let mc = self.modulation(temb_act, &format!("{p}.norm1_context.linear"), 2)?;
            let y = self.modulate(&format!("{p}.norm1_context"), &nc, &mc[1], &mc[0])?;
            (y, None)
        } else {
            let mc = self.modulation(temb_act, &format!("{p}.norm1_context.linear"), 6)?;
            let y = self.modulate(&format!("{p}.norm1_context"), &nc, &mc[0], &mc[1])?;
            (y, Some(mc))
        };

        // Joint attention over [image | context].
        let a = format!("{p}.attn");
        let [q, k, v] = self.qkv(&a, &h_mod, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"])?;
        let [cq, ck, cv] = self.qkv(
            &a,
            &c_mod,
            ["add_q_proj", "add_k_proj", "add_v_proj"],
            ["norm_added_q", "norm_added_k"],
        )?;
        let seq = Dim::Sym("seq".into());
        let mut joint = Vec::new();
        for (n, (x, y)) in [("q", (&q, &cq)), ("k", (&k, &ck)), ("v", (&v, &cv))] {
            let mut j = self.o.same(
                "Concat",
                &format!("{a}/joint_{n}"),
                &[x, y],
                vec![("axis", Attr::Int(2))],
            )?;
            j.shape[2] = seq.clone();
            joint.push(j);
        }
        let ctx = attention(&mut self.o.g, &a, &joint[0], &joint[1], &joint[2], None)?;
        let ctx = self.merge(&a, &ctx, seq)?;
        let zero = self.o.i64s(&format!("{a}.i0"), &[0])?;
        let axis = self.o.i64s(&format!("{a}.seq_axis"), &[1])?;
        let end = self.o.i64s(&format!("{a}.end"), &[i64::MAX])?;
        let mut img = self.o.same(
            "Slice",
            &format!("{a}/image"),
            &[&ctx, &zero, n_img, &axis],
            vec![],
        )?;
        img.shape = h.shape.clone();
        let img = self.linear(&img, &format!("{a}.to_out.0"))?;
        let mut h_new = self.gated(&format!("{p}/attn"), h, &m[2], &img)?;
        if dual {
            let a2 = format!("{p}.attn2");
            let nh2 = self.modulate(&format!("{p}.norm1_x"), &nh, &m[6], &m[7])?;
            let [q2, k2, v2] =
                self.qkv(&a2, &nh2, ["to_q", "to_k", "to_v"], ["norm_q", "norm_k"])?;
            let ctx2 = attention(&mut self.o.g, &a2, &q2, &k2, &v2, None)?;
            let ctx2 = self.merge(&a2, &ctx2, h.shape[1].clone())?;
            let o2 = self.linear(&ctx2, &format!("{a2}.to_out.0"))?;
            h_new = self.gated(&format!("{p}/attn2"), &h_new, &m[8], &o2)?;
        }
        let n2 = self.norm(&format!("{p}.norm2"), &h_new)?;
        let n2 = self.modulate(&format!("{p}.norm2_mod"), &n2, &m[3], &m[4])?;
        let f = self.feed_forward(&format!("{p}.ff"), &n2)?;
        let h_new = self.gated(&format!("{p}/ff"), &h_new, &m[5], &f)?;

        let c_new = match mc {
            None => None,
            Some(mc) => {
                let mut txt = self.o.same(
                    "Slice",
                    &format!("{a}/context"),
                    &[&ctx, n_img, &end, &axis],
                    vec![],
                )?;
                txt.shape = c.shape.clone();
                let txt = self.linear(&txt, &format!("{a}.to_add_out"))?;
                let c1 = self.gated(&format!("{p}/context_attn"), c, &mc[2], &txt)?;
                let n2c = self.norm(&format!("{p}.norm2_context"), &c1)?;
                let n2c = self.modulate(&format!("{p}.norm2_context_mod"), &n2c, &mc[3], &mc[4])?;
                let fc = self.feed_forward(&format!("{p}.ff_context"), &n2c)?;
                Some(self.gated(&format!("{p}/context_ff"), &c1, &mc[5], &fc)?)
            }
        };
        Ok((h_new, c_new))
    }

    /// diffusers' FeedForward with `gelu-approximate` (tanh GELU).
    fn feed_forward(&mut self, f: &str, x: &Value) -> Result<Value> {
        let a = self.linear(x, &format!("{f}.net.0.proj"))?;
        let a = self.o.gelu_tanh(&format!("{f}/gelu"), &a)?;
        self.linear(&a, &format!("{f}.net.2"))
    }

    /// `Where(skip[i], before, after)`: block i's output, or its input when skip-layer guidance skips it.
    fn skippable(
        &mut self,
        name: &str,
        skip: &Value,
        i: usize,
        before: &Value,
        after: &Value,
    ) -> Result<Value> {
        let idx = self.o.i64s(&format!("{name}.index"), &[i as i64])?;
        let s = self.o.g.op(
            "Gather",
            &format!("{name}/flag"),
            &[skip, &idx],
            vec![("axis", Attr::Int(0))],
            DataType::FLOAT,
            vec![Dim::Fixed(1)],
        )?;
        let half = self.o.constant_f32(&format!("{name}.half"), &[], &[0.5])?;
        let cond = self.o.g.op(
            "Greater",
            &format!("{name}/skip"),
            &[&s, &half],
            vec![],
            DataType::BOOL,
            vec![Dim::Fixed(1)],
        )?;
        let mut y = self.o.same(
            "Where",
            &format!("{name}/select"),
            &[&cond, before, after],
            vec![],
        )?;
        y.dtype = before.dtype;
        y.shape = before.shape.clone();
        Ok(y)
    }
}

/// Builds the transformer graph; with `stream_to` (the .onnx path) weights stream to its external data file.
fn emit(
    cfg: &Sd3Config,
    ck: &Checkpoint,
    opts: &ExportOptions,
    stream_to: Option<&Path>,
) -> Result<(
    ModelProto,
    Option<crate::onnx::builder::ExternalSink>,
    crate::models::flux::LinearsReport,
)> {
    cfg.check()?;
    cfg.check_checkpoint(ck)?;
    let target = match opts.precision {
        FluxPrecision::Fp8 => Some(LinearPrecision::Fp8),
        FluxPrecision::Nvfp4 => Some(LinearPrecision::Nvfp4),
        _ => None,
    };
    let policy = match (&opts.policy, target) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(t)) => Some(default_policy(t)),
        (None, None) => None,
    };
    let compute = match (target, opts.precision) {
        (Some(_), _) => opts.quantized_compute,
        (None, FluxPrecision::F16) => DataType::FLOAT16,
        (None, FluxPrecision::Bf16) => DataType::BFLOAT16,
        (None, _) => DataType::FLOAT,
    };
    if !matches!(
        compute,
        DataType::FLOAT | DataType::FLOAT16 | DataType::BFLOAT16
    ) {
        bail!("quantized_compute must be FLOAT, FLOAT16 or BFLOAT16, not {compute}");
    }
    let opset = target.map_or(18, |t| t.min_opset()).max(18);
    let mut o = Ops::new("sd3_transformer", opset, compute);
    if target == Some(LinearPrecision::Nvfp4) {
        o.g.use_domain("trt", 1);
    }
    if let Some(p) = stream_to {
        o.g.stream_external_data(p, 1024)?;
    }
    let mut e = Emitter {
        o,
        cfg,
        ck,
        linears: Linears::new(
            policy.as_ref(),
            &opts.amax,
            None,
            opts.nvfp4_default_amax,
            opts.calibration,
        ),
    };
    let f32t = DataType::FLOAT;
    let (c, d, p) = (
        cfg.in_channels as i64,
        cfg.dim() as i64,
        cfg.patch_size as i64,
    );
    let (h, w) = (Dim::Sym("height".into()), Dim::Sym("width".into()));
    let latents = e.o.g.input(
        "latents",
        f32t,
        vec![batch(), Dim::Fixed(c), h.clone(), w.clone()],
    )?;
    let timestep = e.o.g.input("timestep", f32t, vec![batch()])?;
    let context = e.o.g.input(
        "encoder_hidden_states",
        f32t,
        vec![
            batch(),
            Dim::Sym("txt_seq".into()),
            Dim::Fixed(cfg.joint_attention_dim as i64),
        ],
    )?;
    let pooled = e.o.g.input(
        "pooled_projections",
        f32t,
        vec![batch(), Dim::Fixed(cfg.pooled_projection_dim as i64)],
    )?;
    let skip =
        e.o.g
            .input("skip_layers", f32t, vec![Dim::Fixed(cfg.num_layers as i64)])?;
    let dt = e.o.dtype;

    // AdaLN input: timestep embedding + pooled text projection; every modulation reads silu of it.
    let temb = ops::timestep_embedding(&mut e.o, "time_text_embed/time_proj", &timestep, 1.0)?;
    let temb = e.linear(&temb, "time_text_embed.timestep_embedder.linear_1")?;
    let temb = e.o.silu("time_text_embed.timestep_embedder.act", &temb)?;
    let temb = e.linear(&temb, "time_text_embed.timestep_embedder.linear_2")?;
    let pooled = e.o.cast("pooled_projections/cast", &pooled, dt)?;
    let pt = e.linear(&pooled, "time_text_embed.text_embedder.linear_1")?;
    let pt = e.o.silu("time_text_embed.text_embedder.act_1", &pt)?;
    let pt = e.linear(&pt, "time_text_embed.text_embedder.linear_2")?;
    let temb = e.add("time_text_embed/sum", &temb, &pt)?;
    let temb_act = e.o.silu("temb/silu", &temb)?;

    // Patch embedding [B, C, H, W] -> [B, (H/p)(W/p), dim] plus the cropped position table.
    let lat = e.o.cast("latents/cast", &latents, dt)?;
    let pw = e.t("pos_embed.proj.weight")?;
    let pb = e.t("pos_embed.proj.bias")?;
    let x =
        e.o.conv2d("pos_embed.proj", &lat, &pw, Some(&pb), p as usize, [0; 4])?;
    let flat = e.o.i64s("pos_embed.flat", &[0, d, -1])?;
    let x =
        e.o.same("Reshape", "pos_embed/flat", &[&x, &flat], vec![])?;
    let mut x = e.o.same(
        "Transpose",
        "pos_embed/tokens",
        &[&x],
        vec![("perm", Attr::Ints(vec![0, 2, 1]))],
    )?;
    let img_seq = Dim::Sym("img_seq".into());
    x.shape = vec![batch(), img_seq.clone(), Dim::Fixed(d)];
    let hw = e.dims("pos_embed/hw", &latents, 2, 4)?;
    let pv = e.o.i64s("pos_embed.patch", &[p])?;
    let grid = e.int_op("Div", "pos_embed/grid", &[&hw, &pv], 2)?;
    let m = cfg.pos_embed_max_size as i64;
    let mv = e.o.i64s("pos_embed.max", &[m, m])?;
    let rest = e.int_op("Sub", "pos_embed/rest", &[&mv, &grid], 2)?;
    let two = e.o.i64s("pos_embed.two", &[2])?;
    let start = e.int_op("Div", "pos_embed/start", &[&rest, &two], 2)?;
    let stop = e.int_op("Add", "pos_embed/stop", &[&start, &grid], 2)?;
    let table = e.t("pos_embed.pos_embed")?;
    let table = e.o.weight("pos_embed.pos_embed", &table, dt)?;
    let square = e.o.i64s("pos_embed.square", &[m, m, d])?;
    let table =
        e.o.same("Reshape", "pos_embed/square", &[&table, &square], vec![])?;
    let axes = e.o.i64s("pos_embed.axes", &[0, 1])?;
    let crop = e.o.same(
        "Slice",
        "pos_embed/crop",
        &[&table, &start, &stop, &axes],
        vec![],
    )?;
    let rows = e.o.i64s("pos_embed.rows", &[1, -1, d])?;
    let crop =
        e.o.same("Reshape", "pos_embed/rows", &[&crop, &rows], vec![])?;
    let mut hs = e.add("pos_embed/add", &x, &crop)?;

    let ctx = e.o.cast("encoder_hidden_states/cast", &context, dt)?;
    let mut cs = e.linear(&ctx, "context_embedder")?;
    cs.shape = vec![batch(), Dim::Sym("txt_seq".into()), Dim::Fixed(d)];
    let n_img = e.dims("image_tokens", &hs, 1, 2)?;
    for i in 0..cfg.num_layers {
        let (h_out, c_out) = e.block(i, &hs, &cs, &temb_act, &n_img)?;
        hs = e.skippable(
            &format!("transformer_blocks.{i}.skip_img"),
            &skip,
            i,
            &hs,
            &h_out,
        )?;
        if let Some(c_out) = c_out {
            cs = e.skippable(
                &format!("transformer_blocks.{i}.skip_txt"),
                &skip,
                i,
                &cs,
                &c_out,
            )?;
        }
    }

    // norm_out (AdaLayerNormContinuous: scale, shift) and the projection to patches.
    let mo = e.modulation(&temb_act, "norm_out.linear", 2)?;
    let n = e.norm("norm_out.norm", &hs)?;
    let y = e.modulate("norm_out", &n, &mo[1], &mo[0])?;
    let y = e.linear(&y, "proj_out")?;

    // Unpatchify [B, N, p*p*C] -> [B, C, H, W] (diffusers' einsum nhwpqc->nchpwq).
    let oc = cfg.out_channels() as i64;
    let bdim = e.dims("unpatchify/batch", &latents, 0, 1)?;
    let ocv = e.o.i64s("unpatchify.c", &[oc])?;
    let pp = e.o.i64s("unpatchify.p", &[p, p])?;
    let tok_shape = e.o.g.op(
        "Concat",
        "unpatchify/shape",
        &[&bdim, &grid, &pp, &ocv],
        vec![("axis", Attr::Int(0))],
        DataType::INT64,
        vec![Dim::Fixed(6)],
    )?;
    let y =
        e.o.same("Reshape", "unpatchify/split", &[&y, &tok_shape], vec![])?;
    let y = e.o.same(
        "Transpose",
        "unpatchify/channels",
        &[&y],
        vec![("perm", Attr::Ints(vec![0, 5, 1, 3, 2, 4]))],
    )?;
    let full = e.o.g.op(
        "Concat",
        "unpatchify/full",
        &[&bdim, &ocv, &hw],
        vec![("axis", Attr::Int(0))],
        DataType::INT64,
        vec![Dim::Fixed(4)],
    )?;
    let y =
        e.o.same("Reshape", "unpatchify/image", &[&y, &full], vec![])?;
    let y = e.o.cast("sample/f32", &y, f32t)?;
    let y = e.o.g.op(
        "Identity",
        "sample",
        &[&y],
        vec![],
        f32t,
        vec![batch(), Dim::Fixed(oc), h, w],
    )?;
    e.o.g.output(&y);
    let layers = crate::models::flux::LinearsReport {
        counts: e.linears.counts,
        shapes: e.linears.shapes,
    };
    let (model, sink) = e.o.g.finish_streamed();
    Ok((model, sink, layers))
}

/// The transformer graph in memory (weights inline): for tests and small models.
pub fn graph(cfg: &Sd3Config, ck: &Checkpoint, opts: &ExportOptions) -> Result<ModelProto> {
    Ok(emit(cfg, ck, opts, None)?.0)
}

/// Exports the transformer to `out` (an .onnx path; weights stream to `<out>.data`). Returns the linear layers
/// by precision name.
pub fn export(
    cfg: &Sd3Config,
    ck: &Checkpoint,
    opts: &ExportOptions,
    out: &Path,
) -> Result<crate::models::flux::LinearsReport> {
    let (model, sink, layers) = emit(cfg, ck, opts, Some(out))?;
    if let Some(s) = sink {
        s.commit()?;
    }
    save(
        model,
        out,
        &SaveOptions {
            external_threshold: None,
        },
    )?;
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::policy::LayerKind;

    #[test]
    fn default_policy_keeps_embedders_modulation_and_final_layer() {
        let p = default_policy(LinearPrecision::Nvfp4);
        let q = |n: &str| p.decide(n, LayerKind::Linear);
        for quantized in [
            "transformer_blocks.3.attn.to_q",
            "transformer_blocks.3.attn.add_k_proj",
            "transformer_blocks.3.attn.to_add_out",
            "transformer_blocks.3.attn2.to_out.0",
            "transformer_blocks.3.ff.net.0.proj",
            "transformer_blocks.3.ff_context.net.2",
        ] {
            assert_eq!(q(quantized), Some(LinearPrecision::Nvfp4), "{quantized}");
        }
        for keep in [
            "context_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "time_text_embed.text_embedder.linear_2",
            "transformer_blocks.0.norm1.linear",
            "transformer_blocks.0.norm1_context.linear",
            "norm_out.linear",
            "proj_out",
        ] {
            assert_eq!(q(keep), None, "{keep}");
        }
        assert_eq!(
            amax_key("transformer_blocks.1.attn2.to_v"),
            "transformer_blocks.1.attn2.to_q"
        );
        assert_eq!(
            amax_key("transformer_blocks.1.attn.add_v_proj"),
            "transformer_blocks.1.attn.add_q_proj"
        );
    }

    #[test]
    fn configs_are_checked() {
        let p = Path::new("config.json");
        let ok = r#"{"_class_name": "SD3Transformer2DModel", "num_layers": 2, "attention_head_dim": 8,
            "num_attention_heads": 2, "joint_attention_dim": 8, "caption_projection_dim": 16,
            "pooled_projection_dim": 16, "dual_attention_layers": [0], "qk_norm": "rms_norm"}"#;
        let c = Sd3Config::from_json(ok, p).unwrap();
        assert!(c.is_medium());
        assert_eq!(
            (c.dim(), c.out_channels(), c.pos_embed_max_size),
            (16, 16, 96)
        );
        let e = Sd3Config::from_json(&ok.replace("[0]", "[5]"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("config.json"), "{e}");
        let e = format!(
            "{:#}",
            Sd3Config::from_json(&ok.replace("\"rms_norm\"", "\"layer_norm\""), p).unwrap_err()
        );
        assert!(e.contains("layer_norm"), "{e}");
        let e = Sd3Config::from_json(
            &ok.replace("SD3Transformer2DModel", "FluxTransformer2DModel"),
            p,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("FluxTransformer2DModel"), "{e}");
    }
}
