//! The FLUX.2 transformer (diffusers `Flux2Transformer2DModel`, FLUX.2 [klein] 4B and 9B) as one ONNX graph, weights
//! taken zero-copy from a diffusers-layout safetensors checkpoint (`transformer/`).
//!
//! ## Graph contract (inputs named as diffusers' `forward`, all float32)
//! - `hidden_states` [batch, img_seq, in_channels]: the packed latents (the 2x2-patchified, batch-norm normalized
//!   32-channel VAE latents, 128 features per token, tokens in row-major order);
//! - `encoder_hidden_states` [batch, txt_seq, joint_attention_dim]: the Qwen3 encoder's hidden states 9, 18 and 27
//!   side by side per token (padding tokens included, as the pipeline pads every prompt);
//! - `timestep` `[batch]`: the flow-matching sigma (what diffusers' pipeline passes, `t / 1000`); the graph
//!   multiplies by 1000 itself;
//! - `img_ids` [img_seq, 4], `txt_ids` [txt_seq, 4]: RoPE positions `(t, h, w, l)`: `(0, row, col, 0)` per latent
//!   token and `(0, 0, 0, i)` per text token ([`image_ids`], [`text_ids`]).
//!
//! Output `sample` [batch, img_seq, out_channels]: the velocity (noise - x0), packed like the input.
//!
//! Inside: the timestep embedding gives `temb`; three modulations shared by all blocks of a kind (double-stream
//! image and text, single-stream) are computed once from `silu(temb)`; double-stream blocks (joint attention over
//! [text | image], SwiGLU feed-forwards), single-stream blocks on [text | image] (one fused q/k/v/MLP projection,
//! one fused output projection), the final AdaLN (scale first) and projection on the image tokens. Guidance
//! embedding is never used by FLUX.2 [klein] (the pipeline passes none) and is not emitted.
//!
//! ## Precisions
//! As Flux.1: f32/f16/bf16 compute, or FP8/NVFP4 GEMMs chosen per layer by a [`Policy`] ([`default_policy`]: the
//! embedders, the three shared modulations, `norm_out` and `proj_out` stay high precision); LayerNorm, RMSNorm, RoPE
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

/// How many transformer blocks a streaming export reads ahead of the one it emits (as Flux.1's export).
const PREFETCH_BLOCKS: usize = 2;

/// `transformer/config.json` of a FLUX.2 model. Keys absent take `Flux2Transformer2DModel.__init__`'s defaults, as
/// diffusers does.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Flux2Config {
    #[serde(default = "defaults::one")]
    pub patch_size: usize,
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default = "defaults::num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "defaults::head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "defaults::heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::joint_attention_dim")]
    pub joint_attention_dim: usize,
    #[serde(default = "defaults::timestep_channels")]
    pub timestep_guidance_channels: usize,
    #[serde(default = "defaults::mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "defaults::axes")]
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "defaults::eps")]
    pub eps: f32,
    #[serde(default)]
    pub guidance_embeds: bool,
}

/// diffusers' defaults of the config keys.
mod defaults {
    pub fn one() -> usize {
        1
    }
    pub fn in_channels() -> usize {
        128
    }
    pub fn num_layers() -> usize {
        8
    }
    pub fn num_single_layers() -> usize {
        48
    }
    pub fn head_dim() -> usize {
        128
    }
    pub fn heads() -> usize {
        48
    }
    pub fn joint_attention_dim() -> usize {
        15360
    }
    pub fn timestep_channels() -> usize {
        256
    }
    pub fn mlp_ratio() -> f64 {
        3.0
    }
    pub fn axes() -> Vec<usize> {
        vec![32, 32, 32, 32]
    }
    pub fn rope_theta() -> f32 {
        2000.0
    }
    pub fn eps() -> f32 {
        1e-6
    }
}

impl Flux2Config {
    /// Reads `config.json` (`path` names it in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("'{}' is not valid JSON", path.display()))?;
        if let Some(c) = v.get("_class_name").and_then(|c| c.as_str())
            && c != "Flux2Transformer2DModel"
        {
            bail!(
                "'{}' describes a {c}, not a Flux2Transformer2DModel: point --arch flux2-klein-4b/9b at a FLUX.2 \
                 [klein] model folder",
                path.display()
            );
        }
        let c: Flux2Config = serde_json::from_value(v).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not a Flux2Transformer2DModel config: {e}. Fix: use the config.json diffusers saved with \
                 the transformer weights",
                path.display()
            )
        })?;
        c.check()
            .with_context(|| format!("'{}' has an unsupported config", path.display()))?;
        Ok(c)
    }

    /// Reads the config off a diffusers-named checkpoint (a BFL file's [`diffusers_view`]; it carries no config):
    /// widths, depths, head size (the qk norms), MLP ratio and guidance embedder from the tensors; the rotary axes
    /// split the head in four equal parts (klein: 32 x 4 = 128) with theta 2000, as every FLUX.2 model.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            ck.shape(name).map(<[usize]>::to_vec).with_context(|| {
                format!(
                    "'{}' has no tensor '{name}': not a FLUX.2 transformer",
                    ck.path.display()
                )
            })
        };
        let x = shape("x_embedder.weight")?;
        let dim = x[0];
        let out = shape("proj_out.weight")?[0];
        let head = shape("transformer_blocks.0.attn.norm_q.weight")?[0];
        let count = |f: &dyn Fn(usize) -> String| (0..).take_while(|i| ck.contains(&f(*i))).count();
        let c = Flux2Config {
            patch_size: 1,
            in_channels: x[1],
            // diffusers' None: as many as in.
            out_channels: (out != x[1]).then_some(out),
            num_layers: count(&|i| format!("transformer_blocks.{i}.attn.to_q.weight")),
            num_single_layers: count(&|i| {
                format!("single_transformer_blocks.{i}.attn.to_out.weight")
            }),
            attention_head_dim: head,
            num_attention_heads: dim.checked_div(head).unwrap_or(0),
            joint_attention_dim: shape("context_embedder.weight")?[1],
            timestep_guidance_channels: shape(
                "time_guidance_embed.timestep_embedder.linear_1.weight",
            )?[1],
            mlp_ratio: shape("transformer_blocks.0.ff.linear_in.weight")?[0] as f64
                / 2.0
                / dim.max(1) as f64,
            axes_dims_rope: vec![head / 4; 4],
            rope_theta: defaults::rope_theta(),
            eps: defaults::eps(),
            guidance_embeds: ck.contains("time_guidance_embed.guidance_embedder.linear_1.weight"),
        };
        c.check()
            .with_context(|| format!("'{}' has an unsupported shape", ck.path.display()))?;
        c.check_checkpoint(ck)?;
        Ok(c)
    }

    /// The model width (heads x head size).
    pub fn dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The feed-forward hidden width (`int(dim * mlp_ratio)`).
    pub fn mlp_hidden(&self) -> usize {
        (self.dim() as f64 * self.mlp_ratio) as usize
    }

    /// Parameters of the transformer (for the size shown by build).
    pub fn param_count(&self) -> u64 {
        let (d, m) = (self.dim() as u64, self.mlp_hidden() as u64);
        let double = 8 * d * d + 2 * (2 * m * d + m * d);
        let single = d * (3 * d + 2 * m) + (d + m) * d;
        self.num_layers as u64 * double
            + self.num_single_layers as u64 * single
            + d * (self.in_channels + self.joint_attention_dim + self.out_channels()) as u64
            + 18 * d * d
            + 256 * d
    }

    /// Every tensor of a diffusers checkpoint of this config (name, shape), in emission order: what a synthetic
    /// checkpoint needs (benches/flux2_export.rs).
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, m, hd) = (self.dim(), self.mlp_hidden(), self.attention_head_dim);
        let mut v: Vec<(String, Vec<usize>)> = vec![
            (
                "time_guidance_embed.timestep_embedder.linear_1.weight".into(),
                vec![d, 256],
            ),
            (
                "time_guidance_embed.timestep_embedder.linear_2.weight".into(),
                vec![d, d],
            ),
            (
                "double_stream_modulation_img.linear.weight".into(),
                vec![6 * d, d],
            ),
            (
                "double_stream_modulation_txt.linear.weight".into(),
                vec![6 * d, d],
            ),
            (
                "single_stream_modulation.linear.weight".into(),
                vec![3 * d, d],
            ),
            ("x_embedder.weight".into(), vec![d, self.in_channels]),
            (
                "context_embedder.weight".into(),
                vec![d, self.joint_attention_dim],
            ),
        ];
        for i in 0..self.num_layers {
            let a = format!("transformer_blocks.{i}.attn");
            for p in [
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "add_q_proj",
                "add_k_proj",
                "add_v_proj",
                "to_add_out",
            ] {
                v.push((format!("{a}.{p}.weight"), vec![d, d]));
            }
            for n in ["norm_q", "norm_k", "norm_added_q", "norm_added_k"] {
                v.push((format!("{a}.{n}.weight"), vec![hd]));
            }
            for f in ["ff", "ff_context"] {
                let f = format!("transformer_blocks.{i}.{f}");
                v.push((format!("{f}.linear_in.weight"), vec![2 * m, d]));
                v.push((format!("{f}.linear_out.weight"), vec![d, m]));
            }
        }
        for i in 0..self.num_single_layers {
            let a = format!("single_transformer_blocks.{i}.attn");
            v.push((
                format!("{a}.to_qkv_mlp_proj.weight"),
                vec![3 * d + 2 * m, d],
            ));
            v.push((format!("{a}.norm_q.weight"), vec![hd]));
            v.push((format!("{a}.norm_k.weight"), vec![hd]));
            v.push((format!("{a}.to_out.weight"), vec![d, d + m]));
        }
        v.push(("norm_out.linear.weight".into(), vec![2 * d, d]));
        v.push(("proj_out.weight".into(), vec![self.out_channels(), d]));
        v
    }

    fn check(&self) -> Result<()> {
        if self.num_attention_heads == 0 || self.attention_head_dim == 0 {
            bail!("num_attention_heads and attention_head_dim must be positive");
        }
        if self.patch_size != 1 {
            bail!(
                "patch_size {} is not supported: FLUX.2 patchifies its latents in the pipeline (patch_size 1)",
                self.patch_size
            );
        }
        if self.axes_dims_rope.iter().sum::<usize>() != self.attention_head_dim
            || self.axes_dims_rope.iter().any(|d| d % 2 != 0)
        {
            bail!(
                "axes_dims_rope {:?} must be even sizes summing to attention_head_dim {}",
                self.axes_dims_rope,
                self.attention_head_dim
            );
        }
        if self.timestep_guidance_channels != 256 {
            bail!(
                "timestep_guidance_channels {} is not supported (every FLUX.2 model uses 256)",
                self.timestep_guidance_channels
            );
        }
        Ok(())
    }

    /// Checks that the checkpoint's tensors have this config's shapes (a config of another model fails here,
    /// not deep inside the export).
    pub fn check_checkpoint(&self, ck: &Checkpoint) -> Result<()> {
        let (d, m) = (self.dim(), self.mlp_hidden());
        let expect = [
            ("x_embedder.weight", vec![d, self.in_channels]),
            ("context_embedder.weight", vec![d, self.joint_attention_dim]),
            (
                "time_guidance_embed.timestep_embedder.linear_1.weight",
                vec![d, 256],
            ),
            ("double_stream_modulation_img.linear.weight", vec![6 * d, d]),
            ("single_stream_modulation.linear.weight", vec![3 * d, d]),
            ("norm_out.linear.weight", vec![2 * d, d]),
            ("proj_out.weight", vec![self.out_channels(), d]),
        ];
        for (name, shape) in expect {
            match ck.shape(name) {
                Some(s) if s == shape.as_slice() => {}
                Some(s) => bail!(
                    "the transformer weights do not fit its config: '{name}' is {s:?}, the config gives {shape:?}"
                ),
                None => bail!(
                    "the transformer checkpoint has no '{name}': it is not a diffusers Flux2Transformer2DModel \
                     (use the diffusers model folder, e.g. black-forest-labs/FLUX.2-klein-4B)"
                ),
            }
        }
        for (prefix, n, probe, shape) in [
            (
                "transformer_blocks",
                self.num_layers,
                "ff.linear_in.weight",
                vec![2 * m, d],
            ),
            (
                "single_transformer_blocks",
                self.num_single_layers,
                "attn.to_qkv_mlp_proj.weight",
                vec![3 * d + 2 * m, d],
            ),
        ] {
            if n == 0 {
                continue;
            }
            let last = format!("{prefix}.{}.{probe}", n - 1);
            match ck.shape(&last) {
                Some(s) if s == shape.as_slice() => {}
                Some(s) => bail!(
                    "the transformer weights do not fit its config: '{last}' is {s:?}, the config gives {shape:?}"
                ),
                None => bail!("the transformer checkpoint does not have the config's {n} {prefix}"),
            }
            if ck.contains(&format!("{prefix}.{n}.{probe}")) {
                bail!("the transformer checkpoint has more {prefix} than the config's {n}");
            }
        }
        Ok(())
    }
}

/// The key every Black Forest Labs FLUX.2 transformer file has, after its prefix (none in BFL's
/// `flux-2-klein-*.safetensors`, `model.diffusion_model.` in whole-model files).
const BFL_MARKER: &str = "double_blocks.0.img_attn.qkv.weight";

/// The prefix of a BFL-layout FLUX.2 transformer in `ck`, if it holds one.
pub fn bfl_prefix(ck: &Checkpoint) -> Option<String> {
    ck.names()
        .find(|n| n.ends_with(BFL_MARKER))
        .map(|n| n[..n.len() - BFL_MARKER.len()].to_string())
        .filter(|_| {
            ck.names()
                .any(|n| n.ends_with("single_stream_modulation.lin.weight"))
        })
}

/// A BFL-layout FLUX.2 transformer as a diffusers-named view (diffusers'
/// `convert_flux2_transformer_checkpoint_to_diffusers`: fused double-block qkv split into q, k, v without copying,
/// `*.scale` norms as weights, the final AdaLN from shift|scale to scale|shift). A key it does not know is an error.
pub fn diffusers_view(ck: &Checkpoint, prefix: &str) -> Result<Checkpoint> {
    use crate::weights::safetensors_file::Derived::{Rows, Same, SwapHalves};
    const TOP: [(&str, &str); 10] = [
        ("img_in", "x_embedder"),
        ("txt_in", "context_embedder"),
        (
            "time_in.in_layer",
            "time_guidance_embed.timestep_embedder.linear_1",
        ),
        (
            "time_in.out_layer",
            "time_guidance_embed.timestep_embedder.linear_2",
        ),
        (
            "guidance_in.in_layer",
            "time_guidance_embed.guidance_embedder.linear_1",
        ),
        (
            "guidance_in.out_layer",
            "time_guidance_embed.guidance_embedder.linear_2",
        ),
        (
            "double_stream_modulation_img.lin",
            "double_stream_modulation_img.linear",
        ),
        (
            "double_stream_modulation_txt.lin",
            "double_stream_modulation_txt.linear",
        ),
        (
            "single_stream_modulation.lin",
            "single_stream_modulation.linear",
        ),
        ("final_layer.linear", "proj_out"),
    ];
    const DOUBLE: [(&str, &str); 10] = [
        ("img_attn.norm.query_norm", "attn.norm_q"),
        ("img_attn.norm.key_norm", "attn.norm_k"),
        ("img_attn.proj", "attn.to_out.0"),
        ("img_mlp.0", "ff.linear_in"),
        ("img_mlp.2", "ff.linear_out"),
        ("txt_attn.norm.query_norm", "attn.norm_added_q"),
        ("txt_attn.norm.key_norm", "attn.norm_added_k"),
        ("txt_attn.proj", "attn.to_add_out"),
        ("txt_mlp.0", "ff_context.linear_in"),
        ("txt_mlp.2", "ff_context.linear_out"),
    ];
    const SINGLE: [(&str, &str); 4] = [
        ("linear1", "attn.to_qkv_mlp_proj"),
        ("linear2", "attn.to_out"),
        ("norm.query_norm", "attn.norm_q"),
        ("norm.key_norm", "attn.norm_k"),
    ];
    fn lookup(table: &[(&str, &'static str)], module: &str) -> Option<&'static str> {
        table
            .iter()
            .find(|(from, _)| *from == module)
            .map(|(_, to)| *to)
    }
    let mut t = Vec::new();
    for name in ck.names().filter(|n| n.starts_with(prefix)) {
        let key = &name[prefix.len()..];
        let unknown = || {
            anyhow::anyhow!(
                "'{}': '{name}' is not a key of Black Forest Labs' FLUX.2 transformer layout (a different model, or a \
                 newer layout trt-diff does not know)",
                ck.path.display()
            )
        };
        let (module, param) = key.rsplit_once('.').ok_or_else(unknown)?;
        let param = if param == "scale" { "weight" } else { param };
        if module == "final_layer.adaLN_modulation.1" {
            t.push((
                format!("norm_out.linear.{param}"),
                SwapHalves(name.to_string()),
            ));
            continue;
        }
        let block = |kind: &str| -> Option<(&str, &str)> {
            let rest = module.strip_prefix(kind)?.strip_prefix('.')?;
            rest.split_once('.')
        };
        if let Some((i, within)) = block("double_blocks") {
            let qkv = match within {
                "img_attn.qkv" => Some(["attn.to_q", "attn.to_k", "attn.to_v"]),
                "txt_attn.qkv" => Some(["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
                _ => None,
            };
            if let Some(parts) = qkv {
                for (index, to) in parts.iter().enumerate() {
                    t.push((
                        format!("transformer_blocks.{i}.{to}.{param}"),
                        Rows {
                            name: name.to_string(),
                            index,
                            parts: 3,
                        },
                    ));
                }
            } else {
                let to = lookup(&DOUBLE, within).ok_or_else(unknown)?;
                t.push((
                    format!("transformer_blocks.{i}.{to}.{param}"),
                    Same(name.to_string()),
                ));
            }
        } else if let Some((i, within)) = block("single_blocks") {
            let to = lookup(&SINGLE, within).ok_or_else(unknown)?;
            t.push((
                format!("single_transformer_blocks.{i}.{to}.{param}"),
                Same(name.to_string()),
            ));
        } else {
            let to = lookup(&TOP, module).ok_or_else(unknown)?;
            t.push((format!("{to}.{param}"), Same(name.to_string())));
        }
    }
    ck.renamed(t)
}

/// ModelOpt-like defaults for FLUX.2: [`Policy::defaults`] (embedders incl. `time_guidance_embed`, `norm_out`,
/// `proj_out` stay high precision) plus the three shared modulations, which scale every block.
pub fn default_policy(target: LinearPrecision) -> Policy {
    Policy::defaults(target)
        .with_overrides(&[], &["*_modulation*".into()])
        .expect("valid globs")
}

/// The amax key of a layer's input: projections reading one activation share the first one's name.
pub fn amax_key(layer: &str) -> String {
    for (from, to) in [
        ("attn.to_k", "attn.to_q"),
        ("attn.to_v", "attn.to_q"),
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

/// RoPE positions of an `h x w` grid of packed latent tokens: `(0, row, col, 0)` (diffusers'
/// `_prepare_latent_ids`).
pub fn image_ids(h: usize, w: usize) -> Vec<f32> {
    (0..h)
        .flat_map(|i| (0..w).flat_map(move |j| [0.0, i as f32, j as f32, 0.0]))
        .collect()
}

/// RoPE positions of `len` text tokens: `(0, 0, 0, i)` (diffusers' `_prepare_text_ids`).
pub fn text_ids(len: usize) -> Vec<f32> {
    (0..len).flat_map(|i| [0.0, 0.0, 0.0, i as f32]).collect()
}

fn batch() -> Dim {
    Dim::Sym("batch".into())
}
fn img_seq() -> Dim {
    Dim::Sym("img_seq".into())
}
fn txt_seq() -> Dim {
    Dim::Sym("txt_seq".into())
}
fn seq() -> Dim {
    Dim::Sym("seq".into())
}

/// (shift, scale, gate) of one modulated sub-block, each [B, 1, dim].
type Mod = [Value; 3];

struct Emitter<'a> {
    o: Ops,
    cfg: &'a Flux2Config,
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

    /// Splits `x` along the last axis into pieces of the given sizes.
    fn split(&mut self, name: &str, x: &Value, sizes: &[usize]) -> Result<Vec<Value>> {
        let s = self.o.i64s(
            &format!("{name}.sizes"),
            &sizes.iter().map(|&v| v as i64).collect::<Vec<_>>(),
        )?;
        let outs = sizes
            .iter()
            .map(|&sz| {
                let mut sh = x.shape.clone();
                *sh.last_mut().expect("rank >= 1") = Dim::Fixed(sz as i64);
                (x.dtype, sh)
            })
            .collect();
        self.o
            .g
            .node("Split", name, &[x, &s], vec![("axis", Attr::Int(-1))], outs)
    }

    /// A shared modulation: `linear(silu(temb))` split into `sets` (shift, scale, gate) triples of [B, 1, dim].
    fn modulation(&mut self, temb_silu: &Value, base: &str, sets: usize) -> Result<Vec<Mod>> {
        let d = self.cfg.dim();
        let m = self.linear(temb_silu, base)?;
        let ax = self.o.i64s(&format!("{base}.ax"), &[1])?;
        let mut m = self
            .o
            .same("Unsqueeze", &format!("{base}/seq_axis"), &[&m, &ax], vec![])?;
        m.shape = vec![batch(), Dim::Fixed(1), Dim::Fixed((3 * sets * d) as i64)];
        let parts = self.split(&format!("{base}/chunks"), &m, &vec![d; 3 * sets])?;
        Ok(parts
            .chunks(3)
            .map(|c| [c[0].clone(), c[1].clone(), c[2].clone()])
            .collect())
    }

    /// `LayerNorm(x) * (1 + scale) + shift` (no affine LayerNorm, the config's eps).
    fn modulate(&mut self, name: &str, x: &Value, m: &Mod) -> Result<Value> {
        let d = self.cfg.dim();
        let n = self
            .o
            .layer_norm_plain(&format!("{name}/ln"), x, d, self.cfg.eps)?;
        let one = self.o.constant(&format!("{name}.one"), &[], &[1.0])?;
        let s1 = self.o.same(
            "Add",
            &format!("{name}/one_plus_scale"),
            &[&m[1], &one],
            vec![],
        )?;
        let y = self
            .o
            .same("Mul", &format!("{name}/scaled"), &[&n, &s1], vec![])?;
        let mut y = self
            .o
            .same("Add", &format!("{name}/shifted"), &[&y, &m[0]], vec![])?;
        y.shape = x.shape.clone();
        Ok(y)
    }

    /// `x + gate * y`, clipped to f16's range in f16 graphs where diffusers clips (`clip`).
    fn gated(
        &mut self,
        name: &str,
        x: &Value,
        gate: &Value,
        y: &Value,
        clip: bool,
    ) -> Result<Value> {
        let gy = self
            .o
            .same("Mul", &format!("{name}/gate"), &[y, gate], vec![])?;
        let mut r = self
            .o
            .same("Add", &format!("{name}/residual"), &[x, &gy], vec![])?;
        r.shape = x.shape.clone();
        if clip && self.o.dtype == DataType::FLOAT16 {
            let lo = self.o.constant(&format!("{name}.lo"), &[], &[-65504.0])?;
            let hi = self.o.constant(&format!("{name}.hi"), &[], &[65504.0])?;
            r = self
                .o
                .same("Clip", &format!("{name}/clip"), &[&r, &lo, &hi], vec![])?;
        }
        Ok(r)
    }

    /// [B, S, dim] -> [B, H, S, hd].
    fn heads(&mut self, name: &str, x: &Value, s: Dim) -> Result<Value> {
        let (h, hd) = (
            self.cfg.num_attention_heads as i64,
            self.cfg.attention_head_dim as i64,
        );
        let shape = self.o.i64s(&format!("{name}.shape"), &[0, 0, h, hd])?;
        let r = self
            .o
            .same("Reshape", &format!("{name}/heads"), &[x, &shape], vec![])?;
        let mut t = self.o.same(
            "Transpose",
            &format!("{name}/bhsd"),
            &[&r],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?;
        t.shape = vec![batch(), Dim::Fixed(h), s, Dim::Fixed(hd)];
        Ok(t)
    }

    /// Per-head RMSNorm (diffusers' `torch.nn.RMSNorm(head_dim, eps)` with weight) of [B, H, S, hd].
    fn head_norm(&mut self, x: &Value, weight: &str) -> Result<Value> {
        let w = self.t(weight)?;
        let eps = self.cfg.eps;
        self.o
            .rms_norm(weight.trim_end_matches(".weight"), x, &w, eps)
    }

    /// [B, H, S, hd] -> [B, S, dim].
    fn merge_heads(&mut self, name: &str, x: &Value, s: Dim) -> Result<Value> {
        let t = self.o.same(
            "Transpose",
            &format!("{name}/bshd"),
            &[x],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?;
        let d = self.cfg.dim() as i64;
        let shape = self.o.i64s(&format!("{name}.merged"), &[0, 0, d])?;
        let mut y = self
            .o
            .same("Reshape", &format!("{name}/merged"), &[&t, &shape], vec![])?;
        y.shape = vec![batch(), s, Dim::Fixed(d)];
        Ok(y)
    }

    fn concat(
        &mut self,
        name: &str,
        parts: &[&Value],
        axis: i64,
        shape: Vec<Dim>,
    ) -> Result<Value> {
        let mut y = self
            .o
            .same("Concat", name, parts, vec![("axis", Attr::Int(axis))])?;
        y.shape = shape;
        Ok(y)
    }

    /// [B, S, D] -> ([B, txt, D], [B, img, D]) at the text length.
    fn split_seq(&mut self, name: &str, x: &Value, txt_len: &Value) -> Result<(Value, Value)> {
        let zero = self.o.i64s(&format!("{name}.zero"), &[0])?;
        let end = self.o.i64s(&format!("{name}.end"), &[i64::MAX])?;
        let ax = self.o.i64s(&format!("{name}.axis"), &[1])?;
        let mut t = self.o.same(
            "Slice",
            &format!("{name}/txt"),
            &[x, &zero, txt_len, &ax],
            vec![],
        )?;
        let mut i = self.o.same(
            "Slice",
            &format!("{name}/img"),
            &[x, txt_len, &end, &ax],
            vec![],
        )?;
        t.shape[1] = txt_seq();
        i.shape[1] = img_seq();
        Ok((t, i))
    }

    /// SwiGLU of `[a | b]` along the last axis: `silu(a) * b`.
    fn swiglu(&mut self, name: &str, x: &Value, half: usize) -> Result<Value> {
        let p = self.split(&format!("{name}/halves"), x, &[half, half])?;
        let a = self.o.silu(&format!("{name}/silu"), &p[0])?;
        self.o
            .same("Mul", &format!("{name}/gated"), &[&a, &p[1]], vec![])
    }

    fn feed_forward(&mut self, base: &str, x: &Value) -> Result<Value> {
        let h = self.linear(x, &format!("{base}.linear_in"))?;
        let h = self.swiglu(base, &h, self.cfg.mlp_hidden())?;
        self.linear(&h, &format!("{base}.linear_out"))
    }

    /// One `Flux2TransformerBlock`: joint attention over [text | image], then each stream's feed-forward.
    fn double_block(
        &mut self,
        i: usize,
        (img, txt): (&Value, &Value),
        (im, tm): (&[Mod], &[Mod]),
        pe: &(Value, Value),
        txt_len: &Value,
    ) -> Result<(Value, Value)> {
        let p = format!("transformer_blocks.{i}");
        let a = format!("{p}.attn");
        let img_n = self.modulate(&format!("{p}/norm1"), img, &im[0])?;
        let txt_n = self.modulate(&format!("{p}/norm1_context"), txt, &tm[0])?;
        let mut qkv = Vec::new();
        for (proj, norm) in [
            ("to_q", Some("norm_q")),
            ("to_k", Some("norm_k")),
            ("to_v", None),
        ] {
            let (tproj, tnorm) = match proj {
                "to_q" => ("add_q_proj", Some("norm_added_q")),
                "to_k" => ("add_k_proj", Some("norm_added_k")),
                _ => ("add_v_proj", None),
            };
            let y = self.linear(&img_n, &format!("{a}.{proj}"))?;
            let y = self.heads(&format!("{a}.{proj}"), &y, img_seq())?;
            let y = match norm {
                Some(n) => self.head_norm(&y, &format!("{a}.{n}.weight"))?,
                None => y,
            };
            let c = self.linear(&txt_n, &format!("{a}.{tproj}"))?;
            let c = self.heads(&format!("{a}.{tproj}"), &c, txt_seq())?;
            let c = match tnorm {
                Some(n) => self.head_norm(&c, &format!("{a}.{n}.weight"))?,
                None => c,
            };
            let h = self.cfg.num_attention_heads as i64;
            let hd = self.cfg.attention_head_dim as i64;
            let j = self.concat(
                &format!("{a}/{proj}_joint"),
                &[&c, &y],
                2,
                vec![batch(), Dim::Fixed(h), seq(), Dim::Fixed(hd)],
            )?;
            let j = match norm {
                Some(_) => ops::rope_pairs(&mut self.o, &format!("{a}/rope_{proj}"), &j, hd, pe)?,
                None => j,
            };
            qkv.push(j);
        }
        let ctx = attention(&mut self.o.g, &a, &qkv[0], &qkv[1], &qkv[2], None)?;
        let ctx = self.merge_heads(&a, &ctx, seq())?;
        let (tctx, ictx) = self.split_seq(&format!("{a}/split"), &ctx, txt_len)?;
        let ia = self.linear(&ictx, &format!("{a}.to_out.0"))?;
        let ta = self.linear(&tctx, &format!("{a}.to_add_out"))?;

        let img = self.gated(&format!("{p}/attn"), img, &im[0][2], &ia, false)?;
        let n = self.modulate(&format!("{p}/norm2"), &img, &im[1])?;
        let f = self.feed_forward(&format!("{p}.ff"), &n)?;
        let img = self.gated(&format!("{p}/ff"), &img, &im[1][2], &f, false)?;

        let txt = self.gated(&format!("{p}/context_attn"), txt, &tm[0][2], &ta, false)?;
        let n = self.modulate(&format!("{p}/norm2_context"), &txt, &tm[1])?;
        let f = self.feed_forward(&format!("{p}.ff_context"), &n)?;
        // diffusers clips the text stream only.
        let txt = self.gated(&format!("{p}/ff_context"), &txt, &tm[1][2], &f, true)?;
        Ok((img, txt))
    }

    /// One `Flux2SingleTransformerBlock` on [text | image].
    fn single_block(&mut self, i: usize, x: &Value, m: &Mod, pe: &(Value, Value)) -> Result<Value> {
        let p = format!("single_transformer_blocks.{i}");
        let a = format!("{p}.attn");
        let (d, mh) = (self.cfg.dim(), self.cfg.mlp_hidden());
        let n = self.modulate(&format!("{p}/norm"), x, m)?;
        let y = self.linear(&n, &format!("{a}.to_qkv_mlp_proj"))?;
        let parts = self.split(&format!("{a}/split"), &y, &[d, d, d, 2 * mh])?;
        let hd = self.cfg.attention_head_dim as i64;
        let mut qkv = Vec::new();
        for (k, (proj, norm)) in [("q", Some("norm_q")), ("k", Some("norm_k")), ("v", None)]
            .into_iter()
            .enumerate()
        {
            let h = self.heads(&format!("{a}.{proj}"), &parts[k], seq())?;
            let h = match norm {
                Some(nm) => {
                    let h = self.head_norm(&h, &format!("{a}.{nm}.weight"))?;
                    ops::rope_pairs(&mut self.o, &format!("{a}/rope_{proj}"), &h, hd, pe)?
                }
                None => h,
            };
            qkv.push(h);
        }
        let ctx = attention(&mut self.o.g, &a, &qkv[0], &qkv[1], &qkv[2], None)?;
        let ctx = self.merge_heads(&a, &ctx, seq())?;
        let mlp = self.swiglu(&format!("{a}/mlp"), &parts[3], mh)?;
        let cat = self.concat(
            &format!("{a}/attn_mlp"),
            &[&ctx, &mlp],
            -1,
            vec![batch(), seq(), Dim::Fixed((d + mh) as i64)],
        )?;
        let out = self.linear(&cat, &format!("{a}.to_out"))?;
        self.gated(&format!("{p}/out"), x, &m[2], &out, true)
    }
}

/// Builds the transformer graph; with `stream_to` (the .onnx path) weights stream to its external data file.
fn emit(
    cfg: &Flux2Config,
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
    let mut o = Ops::new("flux2_transformer", opset, compute);
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
    let dt = e.o.dtype;
    let axes = cfg.axes_dims_rope.len() as i64;
    let hs = e.o.g.input(
        "hidden_states",
        f32t,
        vec![batch(), img_seq(), Dim::Fixed(cfg.in_channels as i64)],
    )?;
    let ehs = e.o.g.input(
        "encoder_hidden_states",
        f32t,
        vec![
            batch(),
            txt_seq(),
            Dim::Fixed(cfg.joint_attention_dim as i64),
        ],
    )?;
    let timestep = e.o.g.input("timestep", f32t, vec![batch()])?;
    let img_ids =
        e.o.g
            .input("img_ids", f32t, vec![img_seq(), Dim::Fixed(axes)])?;
    let txt_ids =
        e.o.g
            .input("txt_ids", f32t, vec![txt_seq(), Dim::Fixed(axes)])?;

    // temb = TimestepEmbedding(Timesteps(t * 1000)); the modulations read silu(temb).
    let tproj = ops::timestep_embedding(&mut e.o, "time_proj", &timestep, 1000.0)?;
    let te = "time_guidance_embed.timestep_embedder";
    let temb = e.linear(&tproj, &format!("{te}.linear_1"))?;
    let temb = e.o.silu(&format!("{te}.act"), &temb)?;
    let mut temb = e.linear(&temb, &format!("{te}.linear_2"))?;
    temb.shape = vec![batch(), Dim::Fixed(cfg.dim() as i64)];
    let temb_silu = e.o.silu("temb", &temb)?;
    let mod_img = e.modulation(&temb_silu, "double_stream_modulation_img.linear", 2)?;
    let mod_txt = e.modulation(&temb_silu, "double_stream_modulation_txt.linear", 2)?;
    let mod_single = e.modulation(&temb_silu, "single_stream_modulation.linear", 1)?;

    let hs = e.o.cast("hidden_states/cast", &hs, dt)?;
    let ehs = e.o.cast("encoder_hidden_states/cast", &ehs, dt)?;
    let mut img = e.linear(&hs, "x_embedder")?;
    let mut txt = e.linear(&ehs, "context_embedder")?;

    // RoPE of the joint sequence [text | image].
    let ids = e.o.g.op(
        "Concat",
        "rope/ids",
        &[&txt_ids, &img_ids],
        vec![("axis", Attr::Int(0))],
        f32t,
        vec![seq(), Dim::Fixed(axes)],
    )?;
    let pe = ops::rope_tables(&mut e.o, "rope", &ids, &cfg.axes_dims_rope, cfg.rope_theta)?;
    let txt_len = e.o.g.op(
        "Shape",
        "txt_len",
        &[&txt_ids],
        vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
        DataType::INT64,
        vec![Dim::Fixed(1)],
    )?;
    // Streaming exports read the checkpoint's blocks PREFETCH_BLOCKS ahead of the one being emitted, so the disk
    // stays busy while a block is quantized and written (the pages behind are released as they are written).
    let mut order: Vec<Vec<String>> = (0..cfg.num_layers)
        .map(|i| vec![format!("transformer_blocks.{i}.")])
        .chain((0..cfg.num_single_layers).map(|i| vec![format!("single_transformer_blocks.{i}.")]))
        .collect();
    order.push(vec!["norm_out.".into(), "proj_out.".into()]);
    let prefetch = |step: usize| {
        if let (Some(group), Some(_)) = (order.get(step), stream_to) {
            for p in group {
                ck.prefetch_prefix(p);
            }
        }
    };
    for step in 0..PREFETCH_BLOCKS {
        prefetch(step);
    }
    for i in 0..cfg.num_layers {
        prefetch(i + PREFETCH_BLOCKS);
        (img, txt) = e.double_block(i, (&img, &txt), (&mod_img, &mod_txt), &pe, &txt_len)?;
    }
    let d = cfg.dim() as i64;
    let mut x = e.concat(
        "joint",
        &[&txt, &img],
        1,
        vec![batch(), seq(), Dim::Fixed(d)],
    )?;
    for i in 0..cfg.num_single_layers {
        prefetch(cfg.num_layers + i + PREFETCH_BLOCKS);
        x = e.single_block(i, &x, &mod_single[0], &pe)?;
    }
    let (_, img) = e.split_seq("joint/split", &x, &txt_len)?;

    // norm_out: AdaLayerNormContinuous, (scale, shift) = chunk(linear(silu(temb)), 2).
    let m = e.linear(&temb_silu, "norm_out.linear")?;
    let ax = e.o.i64s("norm_out.ax", &[1])?;
    let mut m =
        e.o.same("Unsqueeze", "norm_out/seq_axis", &[&m, &ax], vec![])?;
    m.shape = vec![batch(), Dim::Fixed(1), Dim::Fixed(2 * d)];
    let sc = e.split("norm_out/chunks", &m, &[d as usize; 2])?;
    let (scale, shift) = (sc[0].clone(), sc[1].clone());
    let y = e.modulate("norm_out", &img, &[shift, scale.clone(), scale])?;
    let y = e.linear(&y, "proj_out")?;
    let y = e.o.cast("sample/f32", &y, f32t)?;
    let y = e.o.g.op(
        "Identity",
        "sample",
        &[&y],
        vec![],
        f32t,
        vec![batch(), img_seq(), Dim::Fixed(cfg.out_channels() as i64)],
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
pub fn graph(cfg: &Flux2Config, ck: &Checkpoint, opts: &ExportOptions) -> Result<ModelProto> {
    Ok(emit(cfg, ck, opts, None)?.0)
}

/// Exports the transformer to `out` (an .onnx path; weights stream to `<out>.data`). Returns the linear layers
/// by precision name.
pub fn export(
    cfg: &Flux2Config,
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
    fn parameter_count_is_the_checkpoints() {
        // FLUX.2 [klein] 4B: 5 double + 20 single blocks of 24 x 128, Qwen3-4B's 3 x 2560 features.
        let cfg: Flux2Config = serde_json::from_value(serde_json::json!({
            "num_layers": 5, "num_single_layers": 20, "num_attention_heads": 24, "joint_attention_dim": 7680
        }))
        .unwrap();
        let norms = (4 * 5 + 2 * 20) * 128;
        let total: usize = cfg
            .tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(cfg.param_count() as usize, total - norms);
        assert!((3.8e9..3.95e9).contains(&(total as f64)), "{total}");
    }

    #[test]
    fn positions_follow_the_klein_pipeline() {
        let i = image_ids(3, 2);
        assert_eq!(i.len(), 6 * 4);
        assert_eq!(&i[4..8], &[0.0, 0.0, 1.0, 0.0]);
        assert_eq!(&i[20..24], &[0.0, 2.0, 1.0, 0.0]);
        assert_eq!(&text_ids(3)[8..12], &[0.0, 0.0, 0.0, 2.0]);
    }

    #[test]
    fn default_policy_keeps_embedders_modulations_and_the_output() {
        let p = default_policy(LinearPrecision::Nvfp4);
        let q = |n: &str| p.decide(n, LayerKind::Linear);
        for quantized in [
            "transformer_blocks.1.attn.to_q",
            "transformer_blocks.1.attn.add_v_proj",
            "transformer_blocks.1.attn.to_add_out",
            "transformer_blocks.1.ff_context.linear_in",
            "single_transformer_blocks.3.attn.to_qkv_mlp_proj",
            "single_transformer_blocks.3.attn.to_out",
        ] {
            assert_eq!(q(quantized), Some(LinearPrecision::Nvfp4), "{quantized}");
        }
        for keep in [
            "x_embedder",
            "context_embedder",
            "time_guidance_embed.timestep_embedder.linear_1",
            "double_stream_modulation_img.linear",
            "double_stream_modulation_txt.linear",
            "single_stream_modulation.linear",
            "norm_out.linear",
            "proj_out",
        ] {
            assert_eq!(q(keep), None, "{keep}");
        }
        assert_eq!(
            amax_key("transformer_blocks.0.attn.add_v_proj"),
            "transformer_blocks.0.attn.add_q_proj"
        );
        assert_eq!(
            amax_key("transformer_blocks.0.attn.to_k"),
            "transformer_blocks.0.attn.to_q"
        );
    }
}
