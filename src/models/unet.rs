//! The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`: SD1.x, SD2.x, SDXL base and refiner, their
//! Turbo distillations and 9-channel inpainting variants) as one ONNX graph, with weights zero-copy from either
//! checkpoint layout: diffusers (`down_blocks.*`, `mid_block.*`, `up_blocks.*`, `time_embedding.*`,
//! `add_embedding.*`) or the original CompVis/SGM one of single-file checkpoints (`input_blocks.*`,
//! `middle_block.*`, `output_blocks.*`, `time_embed.*`, `label_emb.*`, usually under `model.diffusion_model.`).
//!
//! ## Graph contract (all float32)
//! - `sample` [batch, in_channels, latent_height, latent_width]: the scaled latent (`x / sqrt(sigma^2 + 1)` in
//!   k-diffusion terms; the pipeline does the scaling, as diffusers' schedulers do in `scale_model_input`);
//! - `timestep` [batch]: the discrete DDPM timestep (0..999; fractional values interpolate, as k-diffusion's
//!   `sigma_to_t` gives);
//! - `encoder_hidden_states` [batch, text_seq, cross_attention_dim]: text encoder hidden states (77 tokens, or
//!   any multiple of 77 for chunked long prompts);
//! - SDXL only: `text_embeds` [batch, pooled_dim] (OpenCLIP-bigG's projected pooled output) and `time_ids`
//!   [batch, n] (base: original size, crop top-left, target size = 6 numbers; refiner: original size, crop,
//!   aesthetic score = 5).
//!
//! Output `model_output` [batch, out_channels, latent_height, latent_width]: eps or v, as the model was trained.
//! Any latent size works: each upsampler resizes to the size of the skip connection it meets (as diffusers does
//! with `upsample_size` when sizes are not multiples of the UNet's total stride).
//!
//! ## Precisions and names
//! Linear layers (attention projections, feed-forwards, `proj_in`/`proj_out`, time-embedding projections) go
//! through [`Linears`] under their **diffusers names in both layouts**, so one calibration serves either file;
//! [`default_policy`] keeps the time and added-condition embeddings and every ResNet's `time_emb_proj` high, as
//! NVIDIA's SD demos do. Convolutions (conv_in/out, ResNet convs, shortcuts, resamplers) stay in the compute
//! dtype. GroupNorm, LayerNorm and softmax run in f32.
use crate::models::ops::{Ops, activation, attention, layer_norm};
use crate::models::qdq::{Linears, Weight};
use crate::onnx::{Attr, DataType, Dim, Value, proto::ModelProto};
use crate::quant::LinearPrecision;
use crate::quant::policy::Policy;
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Checkpoint naming scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UNetLayout {
    Diffusers,
    /// CompVis/SGM names (`input_blocks`, `middle_block`, `output_blocks`).
    Original,
}

/// SDXL's added conditioning: `time_ids` embedded like timesteps, concatenated with the pooled text embedding.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AddedConditioning {
    /// Sinusoidal channels per time id (256 in SDXL).
    pub time_embed_dim: usize,
    /// Numbers in `time_ids` (6 base, 5 refiner).
    pub time_ids: usize,
    /// Width of `text_embeds`.
    pub text_embeds_dim: usize,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Channels per level, down order (SD1.5: 320, 640, 1280, 1280; SDXL: 320, 640, 1280).
    pub block_out_channels: Vec<usize>,
    /// ResNets per down block (the up blocks have one more).
    pub layers_per_block: usize,
    /// Attention heads per level, down order (up block i uses level n-1-i, the mid block the last level).
    pub heads: Vec<usize>,
    /// Which down blocks are CrossAttnDownBlock2D (the others plain DownBlock2D).
    pub down_attention: Vec<bool>,
    /// Which up blocks (diffusers order, lowest resolution first) are CrossAttnUpBlock2D.
    pub up_attention: Vec<bool>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f32,
    /// Timestep embedding: cos before sin (diffusers' `flip_sin_to_cos`, true for every SD model).
    pub flip_sin_to_cos: bool,
    /// diffusers' `freq_shift` (0 for every SD model).
    pub freq_shift: f32,
    pub added: Option<AddedConditioning>,
    pub layout: UNetLayout,
    /// Key prefix (e.g. "model.diffusion_model." in single-file checkpoints).
    pub prefix: String,
}

impl UNetConfig {
    /// Reads the architecture off the weights. What the weights do not hold (attention heads, GroupNorm groups,
    /// the number of SDXL time ids) comes from a diffusers `config.json` beside them when there is one, else from
    /// the released models' values: 8 heads at every level when the cross-attention width is 768 (SD1.x), else
    /// 64-wide heads (SD2.x, SDXL); 32 groups; 5 time ids when the cross-attention width is 1280 (the SDXL
    /// refiner), else 6.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let json = read_config_json(&ck.path)?;
        Self::from_checkpoint_and_json(ck, json.as_deref())
    }

    /// [`UNetConfig::from_checkpoint`] with the diffusers `config.json` text given (or none).
    pub fn from_checkpoint_and_json(ck: &Checkpoint, json: Option<&str>) -> Result<Self> {
        let (layout, prefix) = detect_layout(ck)?;
        let mut cfg = UNetConfig {
            in_channels: 0,
            out_channels: 0,
            block_out_channels: vec![],
            layers_per_block: 0,
            heads: vec![],
            down_attention: vec![],
            up_attention: vec![],
            cross_attention_dim: 0,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            added: None,
            layout,
            prefix,
        };
        // Resnets per down block: diffusers counts them; the original layout finds the first downsampler.
        cfg.layers_per_block = match layout {
            UNetLayout::Diffusers => {
                let mut n = 0;
                while ck.contains(&format!(
                    "{}down_blocks.0.resnets.{n}.conv1.weight",
                    cfg.prefix
                )) {
                    n += 1;
                }
                n
            }
            UNetLayout::Original => (1..64)
                .find(|k| ck.contains(&format!("{}input_blocks.{k}.0.op.weight", cfg.prefix)))
                .map(|k| k - 1)
                .unwrap_or(0),
        };
        if cfg.layers_per_block == 0 {
            bail!(
                "'{}': cannot find the UNet's first down block (no down_blocks.0.resnets.0 nor a downsampler in \
                 input_blocks): the file is damaged or not a Stable Diffusion UNet",
                ck.path.display()
            );
        }
        while let Some(s) = ck.shape(&cfg.name(&format!(
            "down_blocks.{}.resnets.0.conv1.weight",
            cfg.block_out_channels.len()
        ))) {
            cfg.block_out_channels.push(s[0]);
        }
        let n = cfg.block_out_channels.len();
        // Down attentions map without knowing the up blocks; the up blocks' own attentions are read next (the
        // original layout's upsampler index depends on them).
        cfg.down_attention = (0..n)
            .map(|i| ck.contains(&cfg.name(&format!("down_blocks.{i}.attentions.0.norm.weight"))))
            .collect();
        cfg.up_attention = (0..n)
            .map(|i| ck.contains(&cfg.name(&format!("up_blocks.{i}.attentions.0.norm.weight"))))
            .collect();
        let shape = |cfg: &UNetConfig, name: &str| -> Result<Vec<usize>> {
            let key = cfg.name(name);
            ck.shape(&key).map(|s| s.to_vec()).with_context(|| {
                format!(
                    "'{}' has no tensor '{key}' (diffusers name '{name}'): not a complete Stable Diffusion UNet",
                    ck.path.display()
                )
            })
        };
        cfg.in_channels = shape(&cfg, "conv_in.weight")?[1];
        // A ControlNet has no up path and no conv_out.
        cfg.out_channels = if ck.contains(&cfg.name("controlnet_cond_embedding.conv_in.weight")) {
            0
        } else {
            shape(&cfg, "conv_out.weight")?[0]
        };
        // The cross-attention width: any attention block's to_k input.
        let ctx = (0..n)
            .map(|i| format!("down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.to_k.weight"))
            .chain(std::iter::once(
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight".to_string(),
            ))
            .find_map(|k| ck.shape(&cfg.name(&k)).map(|s| s[1]));
        cfg.cross_attention_dim = ctx.with_context(|| {
            format!(
                "'{}' has no cross-attention layers (attn2.to_k): not a text-conditioned Stable Diffusion UNet",
                ck.path.display()
            )
        })?;
        let v: Option<serde_json::Value> = match json {
            Some(t) => Some(serde_json::from_str(t).context("UNet config.json is not JSON")?),
            None => None,
        };
        let get = |k: &str| v.as_ref().and_then(|v| v.get(k)).filter(|x| !x.is_null());
        // diffusers' naming quirk: `attention_head_dim` holds the number of heads unless `num_attention_heads`
        // is given; either is one number for every level or a list.
        cfg.heads = match get("num_attention_heads").or_else(|| get("attention_head_dim")) {
            Some(serde_json::Value::Number(h)) => vec![h.as_u64().unwrap_or(0) as usize; n],
            Some(serde_json::Value::Array(a)) => {
                a.iter().map(|h| h.as_u64().unwrap_or(0) as usize).collect()
            }
            Some(other) => {
                bail!("UNet config.json: attention heads {other} are not a number or a list")
            }
            None if cfg.cross_attention_dim == 768 => vec![8; n],
            None => cfg
                .block_out_channels
                .iter()
                .map(|c| (c / 64).max(1))
                .collect(),
        };
        if cfg.heads.len() != n || cfg.heads.contains(&0) {
            bail!(
                "UNet config.json: attention heads {:?} do not give one positive count per level ({n} levels)",
                cfg.heads
            );
        }
        if let Some(g) = get("norm_num_groups").and_then(|x| x.as_u64()) {
            cfg.norm_num_groups = g as usize;
        }
        if let Some(e) = get("norm_eps").and_then(|x| x.as_f64()) {
            cfg.norm_eps = e as f32;
        }
        if let Some(f) = get("flip_sin_to_cos").and_then(|x| x.as_bool()) {
            cfg.flip_sin_to_cos = f;
        }
        if let Some(f) = get("freq_shift").and_then(|x| x.as_f64()) {
            cfg.freq_shift = f as f32;
        }
        if ck.contains(&cfg.name("add_embedding.linear_1.weight")) {
            let input = shape(&cfg, "add_embedding.linear_1.weight")?[1];
            let time_embed_dim = get("addition_time_embed_dim")
                .and_then(|x| x.as_u64())
                .map(|x| x as usize)
                .unwrap_or(256);
            let time_ids = match get("text_embeds_dim").and_then(|x| x.as_u64()) {
                Some(t) => (input.saturating_sub(t as usize)) / time_embed_dim,
                None if cfg.cross_attention_dim == 1280 => 5,
                None => 6,
            };
            if input <= time_ids * time_embed_dim {
                bail!(
                    "'{}': the added-condition embedding takes {input} features, not enough for {time_ids} time \
                     ids of {time_embed_dim}: give the diffusers config.json beside the weights",
                    ck.path.display()
                );
            }
            cfg.added = Some(AddedConditioning {
                time_embed_dim,
                time_ids,
                text_embeds_dim: input - time_ids * time_embed_dim,
            });
        }
        Ok(cfg)
    }

    /// Sets the number of SDXL time ids (the text-embedding width follows from the embedding's input size).
    pub fn with_time_ids(mut self, n: usize) -> Result<Self> {
        let Some(a) = self.added.as_mut() else {
            bail!("this UNet has no added time ids (only SDXL models do)");
        };
        let input = a.text_embeds_dim + a.time_ids * a.time_embed_dim;
        if input <= n * a.time_embed_dim {
            bail!(
                "{n} time ids of {} features do not fit the added embedding's {input} inputs",
                a.time_embed_dim
            );
        }
        a.time_ids = n;
        a.text_embeds_dim = input - n * a.time_embed_dim;
        Ok(self)
    }

    /// The checkpoint key of the diffusers-named parameter `name`.
    pub fn name(&self, name: &str) -> String {
        match self.layout {
            UNetLayout::Diffusers => format!("{}{name}", self.prefix),
            UNetLayout::Original => format!("{}{}", self.prefix, self.original_name(name)),
        }
    }

    /// diffusers name -> CompVis/SGM name (the inverse of diffusers' `convert_ldm_unet_checkpoint`).
    fn original_name(&self, name: &str) -> String {
        let l = self.layers_per_block;
        let parts: Vec<&str> = name.split('.').collect();
        let rest = |from: usize| parts[from..].join(".");
        let resnet = |r: String| -> String {
            for (d, o) in [
                ("norm1.", "in_layers.0."),
                ("conv1.", "in_layers.2."),
                ("time_emb_proj.", "emb_layers.1."),
                ("norm2.", "out_layers.0."),
                ("conv2.", "out_layers.3."),
                ("conv_shortcut.", "skip_connection."),
            ] {
                if let Some(s) = r.strip_prefix(d) {
                    return format!("{o}{s}");
                }
            }
            r
        };
        let idx = |i: usize| {
            parts
                .get(i)
                .and_then(|p| p.parse::<usize>().ok())
                .unwrap_or(0)
        };
        match parts[0] {
            "time_embedding" | "add_embedding" => {
                let base = if parts[0] == "time_embedding" {
                    "time_embed"
                } else {
                    "label_emb.0"
                };
                let k = if parts[1] == "linear_1" { 0 } else { 2 };
                format!("{base}.{k}.{}", rest(2))
            }
            "conv_in" => format!("input_blocks.0.0.{}", rest(1)),
            "conv_norm_out" => format!("out.0.{}", rest(1)),
            "conv_out" => format!("out.2.{}", rest(1)),
            "down_blocks" => {
                let (i, j) = (idx(1), idx(3));
                match parts[2] {
                    "resnets" => {
                        format!("input_blocks.{}.0.{}", 1 + i * (l + 1) + j, resnet(rest(4)))
                    }
                    "attentions" => format!("input_blocks.{}.1.{}", 1 + i * (l + 1) + j, rest(4)),
                    // downsamplers.0.conv.*
                    _ => format!("input_blocks.{}.0.op.{}", (i + 1) * (l + 1), rest(5)),
                }
            }
            "mid_block" => match (parts[1], idx(2)) {
                ("resnets", 0) => format!("middle_block.0.{}", resnet(rest(3))),
                ("attentions", _) => format!("middle_block.1.{}", rest(3)),
                _ => format!("middle_block.2.{}", resnet(rest(3))),
            },
            "up_blocks" => {
                let (i, j) = (idx(1), idx(3));
                match parts[2] {
                    "resnets" => format!("output_blocks.{}.0.{}", i * (l + 1) + j, resnet(rest(4))),
                    "attentions" => format!("output_blocks.{}.1.{}", i * (l + 1) + j, rest(4)),
                    _ => {
                        // The upsampler follows the attention when the block has one.
                        let k = i * (l + 1) + l;
                        let slot = if self.up_has_attention(i) { 2 } else { 1 };
                        format!("output_blocks.{k}.{slot}.conv.{}", rest(5))
                    }
                }
            }
            _ => name.to_string(),
        }
    }

    fn up_has_attention(&self, up: usize) -> bool {
        self.up_attention.get(up).copied().unwrap_or(false)
    }
}

/// Finds which layout the checkpoint uses and the prefix its UNet keys carry.
fn detect_layout(ck: &Checkpoint) -> Result<(UNetLayout, String)> {
    let find = |suffix: &str| {
        ck.names()
            .find(|k| k.ends_with(suffix))
            .map(|k| k[..k.len() - suffix.len()].to_string())
    };
    if let Some(p) = find("time_embedding.linear_1.weight") {
        return Ok((UNetLayout::Diffusers, p));
    }
    if let Some(p) = find("time_embed.0.weight")
        && ck.contains(&format!("{p}input_blocks.0.0.weight"))
    {
        return Ok((UNetLayout::Original, p));
    }
    bail!(
        "'{}' is not a Stable Diffusion UNet checkpoint: it has neither diffusers' 'time_embedding.linear_1.weight' \
         (a unet/ folder) nor the original 'time_embed.0.weight' with 'input_blocks.*' (a single-file checkpoint, \
         usually under 'model.diffusion_model.')",
        ck.path.display()
    )
}

/// The diffusers `config.json` beside a checkpoint file, or inside a checkpoint folder.
fn read_config_json(path: &Path) -> Result<Option<String>> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        match path.parent() {
            Some(p) => p.join("config.json"),
            None => return Ok(None),
        }
    };
    if !file.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("cannot read '{}'", file.display()))?;
    // Only a UNet's config counts (a single-file checkpoint may sit beside anything).
    if text.contains("\"UNet2DConditionModel\"") || text.contains("\"cross_attention_dim\"") {
        Ok(Some(text))
    } else {
        Ok(None)
    }
}

/// ModelOpt/NVIDIA-demo-like defaults for the UNet: [`Policy::defaults`] (embeddings, norms, conv_in/out and
/// `proj_out` high), plus every ResNet's time-embedding projection kept high; the transformer blocks' own
/// `proj_in`/`proj_out` are quantized.
pub fn default_policy(target: LinearPrecision) -> Policy {
    Policy::defaults(target)
        .with_overrides(
            &["*attentions.*.proj_out".into()],
            &["*time_emb_proj*".into()],
        )
        .expect("valid globs")
}

/// The amax key under which a layer's input activation is calibrated: q/k/v of self-attention read the same
/// activation; k/v of cross-attention read the text (shared per block).
pub fn amax_key(layer: &str) -> String {
    for (from, to) in [
        ("attn1.to_k", "attn1.to_q"),
        ("attn1.to_v", "attn1.to_q"),
        ("attn2.to_v", "attn2.to_k"),
    ] {
        if let Some(base) = layer.strip_suffix(from) {
            return format!("{base}{to}");
        }
    }
    layer.to_string()
}

#[derive(Clone, Debug)]
pub struct UNetExportOptions {
    /// Compute dtype outside quantized GEMMs: FLOAT, FLOAT16 or BFLOAT16.
    pub compute: DataType,
    /// FP8 / NVFP4 / INT8 linear layers (None: every layer in `compute`).
    pub quantize: Option<LinearPrecision>,
    /// None: [`default_policy`] for a quantized export.
    pub policy: Option<Policy>,
    /// Calibrated activation maxima by [`amax_key`] (FP8/INT8 need them).
    pub amax: HashMap<String, f32>,
    pub nvfp4_default_amax: f32,
    /// Adds an `amax.<key>` output per linear-layer input (use with f32 for calibration runs).
    pub calibration: bool,
    /// FP8's static activation range for layers without a calibrated one (None: such layers are an error; set
    /// only where activations do not matter, e.g. export benchmarks).
    pub fp8_default_amax: Option<f32>,
    /// FP8/NVFP4: rank of the LoRA side path beside each quantized linear (0: none; [`Linears::lora_rank`]).
    pub lora_rank: usize,
    /// The UNet takes a ControlNet's residuals ([`controlnet_residuals`]) as inputs.
    pub controlnet_residuals: bool,
    /// With `calibration`: also a `chmax.<key>` output per linear-layer input (per-channel maxima, for SmoothQuant).
    pub channel_calibration: bool,
    /// INT8 layers: SmoothQuant's migration strength (None: no smoothing) over `channel_amax`.
    pub smooth_alpha: Option<f32>,
    /// Calibrated per-channel activation maxima by [`amax_key`].
    pub channel_amax: HashMap<String, Vec<f32>>,
}

impl Default for UNetExportOptions {
    fn default() -> Self {
        UNetExportOptions {
            compute: DataType::FLOAT,
            quantize: None,
            policy: None,
            amax: HashMap::new(),
            nvfp4_default_amax: 256.0,
            calibration: false,
            fp8_default_amax: None,
            lora_rank: 0,
            controlnet_residuals: false,
            channel_calibration: false,
            smooth_alpha: None,
            channel_amax: HashMap::new(),
        }
    }
}

struct Emitter<'a> {
    o: Ops,
    cfg: &'a UNetConfig,
    ck: &'a Checkpoint,
    linears: Linears<'a>,
}

/// The transformer blocks' GroupNorm eps (diffusers' Transformer2DModel uses 1e-6 whatever the UNet's norm_eps).
const TRANSFORMER_GROUP_NORM_EPS: f32 = 1e-6;

fn sym4(name: &str, c: usize) -> Vec<Dim> {
    vec![
        Dim::Sym("batch".into()),
        Dim::Fixed(c as i64),
        Dim::Sym(format!("{name}_h")),
        Dim::Sym(format!("{name}_w")),
    ]
}

impl Emitter<'_> {
    fn t(&self, name: &str) -> Result<Tensor> {
        self.ck.get(&self.cfg.name(name))
    }

    fn has(&self, name: &str) -> bool {
        self.ck.contains(&self.cfg.name(name))
    }

    fn conv(&mut self, name: &str, x: &Value, stride: usize, pad: usize) -> Result<Value> {
        let w = self.t(&format!("{name}.weight"))?;
        let b = self.t(&format!("{name}.bias"))?;
        let mut y = self
            .o
            .conv2d(&self.cfg.name(name), x, &w, Some(&b), stride, [pad; 4])?;
        y.shape = sym4(name, w.shape[0]);
        Ok(y)
    }

    fn group_norm(&mut self, name: &str, x: &Value, eps: f32) -> Result<Value> {
        let w = self.t(&format!("{name}.weight"))?;
        let b = self.t(&format!("{name}.bias"))?;
        let g = self.cfg.norm_num_groups;
        self.o.group_norm(&self.cfg.name(name), x, g, &w, &b, eps)
    }

    /// A linear layer under its diffusers name; 1x1-conv weights [out, in, 1, 1] (SD1.x `proj_in`/`proj_out`)
    /// are the same bytes as [out, in].
    fn linear(&mut self, name: &str, x: &Value) -> Result<Value> {
        let mut weight = self.t(&format!("{name}.weight"))?;
        if weight.shape.len() == 4 && weight.shape[2..] == [1, 1] {
            weight.shape.truncate(2);
        }
        let bias = if self.has(&format!("{name}.bias")) {
            Some(self.t(&format!("{name}.bias"))?)
        } else {
            None
        };
        let node = self.cfg.name(name);
        self.linears.linear(
            &mut self.o,
            &node,
            name,
            &amax_key(name),
            x,
            Weight::Tensor {
                weight: &weight,
                bias: bias.as_ref(),
            },
        )
    }

    /// Sinusoidal embedding of `t` ([batch] or [batch, n]) over `dim` channels, diffusers' `get_timestep_embedding`
    /// (computed in f32): [..., dim].
    fn sinusoidal(&mut self, name: &str, t: &Value, dim: usize) -> Result<Value> {
        let half = dim / 2;
        let shift = self.cfg.freq_shift;
        let freqs: Vec<f32> = (0..half)
            .map(|j| (-(10000f64.ln()) * j as f64 / (half as f64 - shift as f64)).exp() as f32)
            .collect();
        let f = self
            .o
            .constant_f32(&format!("{name}.freqs"), &[half as i64], &freqs)?;
        let ax = self.o.i64s(&format!("{name}.ax"), &[-1])?;
        let mut shape = t.shape.clone();
        let tu = self.o.g.op(
            "Unsqueeze",
            &format!("{name}/t"),
            &[t, &ax],
            vec![],
            DataType::FLOAT,
            {
                let mut s = shape.clone();
                s.push(Dim::Fixed(1));
                s
            },
        )?;
        shape.push(Dim::Fixed(half as i64));
        let arg = self.o.g.op(
            "Mul",
            &format!("{name}/arg"),
            &[&tu, &f],
            vec![],
            DataType::FLOAT,
            shape.clone(),
        )?;
        let sin = self
            .o
            .same("Sin", &format!("{name}/sin"), &[&arg], vec![])?;
        let cos = self
            .o
            .same("Cos", &format!("{name}/cos"), &[&arg], vec![])?;
        let parts = if self.cfg.flip_sin_to_cos {
            [&cos, &sin]
        } else {
            [&sin, &cos]
        };
        *shape.last_mut().expect("rank >= 1") = Dim::Fixed(2 * half as i64);
        self.o.g.op(
            "Concat",
            &format!("{name}/emb"),
            &parts,
            vec![("axis", Attr::Int(-1))],
            DataType::FLOAT,
            shape,
        )
    }

    /// `linear_1 -> SiLU -> linear_2` (diffusers' TimestepEmbedding).
    fn embedding_mlp(&mut self, name: &str, x: &Value) -> Result<Value> {
        let h = self.linear(&format!("{name}.linear_1"), x)?;
        let h = self.o.silu(&format!("{name}/act"), &h)?;
        self.linear(&format!("{name}.linear_2"), &h)
    }

    /// ResnetBlock2D with the time embedding (`temb_act` = SiLU(emb)) added between the convs.
    fn resnet(&mut self, name: &str, x: &Value, temb_act: &Value) -> Result<Value> {
        let eps = self.cfg.norm_eps;
        let h = self.group_norm(&format!("{name}.norm1"), x, eps)?;
        let h = self.o.silu(&format!("{name}/act1"), &h)?;
        let h = self.conv(&format!("{name}.conv1"), &h, 1, 1)?;
        let t = self.linear(&format!("{name}.time_emb_proj"), temb_act)?;
        let ax = self.o.i64s(&format!("{name}.hw"), &[2, 3])?;
        let t = self
            .o
            .same("Unsqueeze", &format!("{name}/temb_hw"), &[&t, &ax], vec![])?;
        let mut h = self
            .o
            .same("Add", &format!("{name}/temb"), &[&h, &t], vec![])?;
        h.shape = sym4(&format!("{name}.conv1"), 0);
        let h = self.group_norm(&format!("{name}.norm2"), &h, eps)?;
        let h = self.o.silu(&format!("{name}/act2"), &h)?;
        let h = self.conv(&format!("{name}.conv2"), &h, 1, 1)?;
        let s = if self.has(&format!("{name}.conv_shortcut.weight")) {
            self.conv(&format!("{name}.conv_shortcut"), x, 1, 0)?
        } else {
            x.clone()
        };
        let mut y = self
            .o
            .same("Add", &format!("{name}/residual"), &[&s, &h], vec![])?;
        y.shape = h.shape.clone();
        Ok(y)
    }

    /// Transformer2DModel: GroupNorm, proj_in, BasicTransformerBlocks (self-attention, cross-attention, GEGLU
    /// feed-forward, each pre-LayerNorm with a residual), proj_out, residual. `heads` from the level.
    fn transformer(&mut self, name: &str, x: &Value, ctx: &Value, heads: usize) -> Result<Value> {
        let c = match x.shape.get(1) {
            Some(Dim::Fixed(c)) => *c as usize,
            _ => self.t(&format!("{name}.norm.weight"))?.numel(),
        };
        let h = self.group_norm(&format!("{name}.norm"), x, TRANSFORMER_GROUP_NORM_EPS)?;
        let flat = self.o.i64s(&format!("{name}.flat"), &[0, c as i64, -1])?;
        let h = self
            .o
            .same("Reshape", &format!("{name}/flat"), &[&h, &flat], vec![])?;
        let tokens_shape = vec![
            Dim::Sym("batch".into()),
            Dim::Sym(format!("{name}_hw")),
            Dim::Fixed(c as i64),
        ];
        let h = self.o.op(
            "Transpose",
            &format!("{name}/tokens"),
            &[&h],
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
            tokens_shape.clone(),
        )?;
        let mut h = self.linear(&format!("{name}.proj_in"), &h)?;
        let mut k = 0;
        while self.has(&format!("{name}.transformer_blocks.{k}.norm1.weight")) {
            h = self.basic_block(&format!("{name}.transformer_blocks.{k}"), &h, ctx, heads)?;
            k += 1;
        }
        let h = self.linear(&format!("{name}.proj_out"), &h)?;
        let h = self.o.same(
            "Transpose",
            &format!("{name}/channels"),
            &[&h],
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
        )?;
        let shp = self.o.g.op(
            "Shape",
            &format!("{name}/shape"),
            &[x],
            vec![],
            DataType::INT64,
            vec![Dim::Fixed(4)],
        )?;
        let h = self
            .o
            .same("Reshape", &format!("{name}/unflat"), &[&h, &shp], vec![])?;
        let mut y = self
            .o
            .same("Add", &format!("{name}/residual"), &[&h, x], vec![])?;
        y.shape = x.shape.clone();
        Ok(y)
    }

    fn layer_norm(&mut self, name: &str, x: &Value) -> Result<Value> {
        let w = self.t(&format!("{name}.weight"))?;
        let b = self.t(&format!("{name}.bias"))?;
        layer_norm(&mut self.o, &self.cfg.name(name), x, &w, &b, 1e-5)
    }

    fn attention(&mut self, name: &str, x: &Value, kv: &Value, heads: usize) -> Result<Value> {
        let q = self.linear(&format!("{name}.to_q"), x)?;
        let k = self.linear(&format!("{name}.to_k"), kv)?;
        let v = self.linear(&format!("{name}.to_v"), kv)?;
        let inner = match q.shape.last() {
            Some(Dim::Fixed(d)) => *d as usize,
            _ => bail!("{name}: attention width unknown"),
        };
        if heads == 0 || !inner.is_multiple_of(heads) {
            bail!(
                "{name}: attention width {inner} does not split into {heads} heads: wrong attention_head_dim for \
                 these weights (put the diffusers config.json beside them)"
            );
        }
        let scale = ((inner / heads) as f32).powf(-0.5);
        let a = attention(
            &mut self.o,
            &self.cfg.name(name),
            (&q, &k, &v),
            heads,
            Some(scale),
            None,
        )?;
        self.linear(&format!("{name}.to_out.0"), &a)
    }

    fn basic_block(&mut self, name: &str, x: &Value, ctx: &Value, heads: usize) -> Result<Value> {
        let n = self.layer_norm(&format!("{name}.norm1"), x)?;
        let a = self.attention(&format!("{name}.attn1"), &n, &n, heads)?;
        let h = self
            .o
            .same("Add", &format!("{name}/attn1_res"), &[x, &a], vec![])?;
        let n = self.layer_norm(&format!("{name}.norm2"), &h)?;
        let a = self.attention(&format!("{name}.attn2"), &n, ctx, heads)?;
        let h = self
            .o
            .same("Add", &format!("{name}/attn2_res"), &[&h, &a], vec![])?;
        let n = self.layer_norm(&format!("{name}.norm3"), &h)?;
        // GEGLU: the projection's first half times GELU(second half).
        let p = self.linear(&format!("{name}.ff.net.0.proj"), &n)?;
        let two_inner = match p.shape.last() {
            Some(Dim::Fixed(d)) => *d,
            _ => bail!("{name}: feed-forward width unknown"),
        };
        let mut half_shape = p.shape.clone();
        *half_shape.last_mut().expect("rank 3") = Dim::Fixed(two_inner / 2);
        let sizes = self
            .o
            .i64s(&format!("{name}.geglu"), &[two_inner / 2, two_inner / 2])?;
        let parts = self.o.g.node(
            "Split",
            &format!("{name}/geglu_split"),
            &[&p, &sizes],
            vec![("axis", Attr::Int(-1))],
            vec![(p.dtype, half_shape.clone()), (p.dtype, half_shape)],
        )?;
        let gate = activation(&mut self.o, &format!("{name}/gelu"), &parts[1], "gelu")?;
        let f = self
            .o
            .same("Mul", &format!("{name}/geglu"), &[&parts[0], &gate], vec![])?;
        let f = self.linear(&format!("{name}.ff.net.2"), &f)?;
        self.o
            .same("Add", &format!("{name}/ff_res"), &[&h, &f], vec![])
    }

    /// Nearest 2x upsampling to the size of `like` (the skip connection the result meets next), then a conv.
    fn upsample(&mut self, name: &str, x: &Value, like: &Value) -> Result<Value> {
        let nc = self.o.g.op(
            "Shape",
            &format!("{name}/nc"),
            &[x],
            vec![("end", Attr::Int(2))],
            DataType::INT64,
            vec![Dim::Fixed(2)],
        )?;
        let hw = self.o.g.op(
            "Shape",
            &format!("{name}/hw"),
            &[like],
            vec![("start", Attr::Int(2))],
            DataType::INT64,
            vec![Dim::Fixed(2)],
        )?;
        let sizes = self.o.g.op(
            "Concat",
            &format!("{name}/sizes"),
            &[&nc, &hw],
            vec![("axis", Attr::Int(0))],
            DataType::INT64,
            vec![Dim::Fixed(4)],
        )?;
        let mut up = self.o.same(
            "Resize",
            &format!("{name}/nearest"),
            &[x, &Value::absent(), &Value::absent(), &sizes],
            vec![
                ("mode", Attr::Str("nearest".into())),
                (
                    "coordinate_transformation_mode",
                    Attr::Str("asymmetric".into()),
                ),
                ("nearest_mode", Attr::Str("floor".into())),
            ],
        )?;
        up.shape = x.shape.clone();
        self.conv(&format!("{name}.conv"), &up, 1, 1)
    }

    /// The time (and SDXL's added) embedding through SiLU, the text context in the compute type, and the sample
    /// after `conv_in`.
    fn embed(&mut self, inputs: &Inputs) -> Result<(Value, Value, Value)> {
        let cfg = self.cfg;
        let dt = self.o.dtype;
        let c0 = cfg.block_out_channels[0];
        // Time (and SDXL's added) embedding; SiLU(emb) is what every ResNet projects.
        let t = self.sinusoidal("time_proj", &inputs.timestep, c0)?;
        let t = self.o.cast("time_proj/cast", &t, dt)?;
        let mut emb = self.embedding_mlp("time_embedding", &t)?;
        if let (Some(a), Some(types)) = (&cfg.added, &inputs.control_type) {
            // ControlNet-Union: the multi-hot control types through the time ids' sinusoids and an MLP.
            let n = self.t("control_add_embedding.linear_1.weight")?.shape[1];
            let e = self.sinusoidal("control_type_proj", types, a.time_embed_dim)?;
            let flat = self.o.i64s("control_type_proj.flat", &[0, -1])?;
            let e = self.o.g.op(
                "Reshape",
                "control_type_proj/flat",
                &[&e, &flat],
                vec![],
                DataType::FLOAT,
                vec![Dim::Sym("batch".into()), Dim::Fixed(n as i64)],
            )?;
            let e = self.o.cast("control_type_proj/cast", &e, dt)?;
            let c = self.embedding_mlp("control_add_embedding", &e)?;
            emb = self
                .o
                .same("Add", "control_add_embedding/sum", &[&emb, &c], vec![])?;
        }
        if let (Some(a), Some((text, ids))) = (&cfg.added, &inputs.added) {
            let e = self.sinusoidal("add_time_proj", ids, a.time_embed_dim)?;
            let flat = self.o.i64s("add_time_proj.flat", &[0, -1])?;
            let e = self.o.g.op(
                "Reshape",
                "add_time_proj/flat",
                &[&e, &flat],
                vec![],
                DataType::FLOAT,
                vec![
                    Dim::Sym("batch".into()),
                    Dim::Fixed((a.time_ids * a.time_embed_dim) as i64),
                ],
            )?;
            let width = a.text_embeds_dim + a.time_ids * a.time_embed_dim;
            let cat = self.o.g.op(
                "Concat",
                "add_embedding/input",
                &[text, &e],
                vec![("axis", Attr::Int(-1))],
                DataType::FLOAT,
                vec![Dim::Sym("batch".into()), Dim::Fixed(width as i64)],
            )?;
            let cat = self.o.cast("add_embedding/cast", &cat, dt)?;
            let aug = self.embedding_mlp("add_embedding", &cat)?;
            emb = self
                .o
                .same("Add", "add_embedding/sum", &[&emb, &aug], vec![])?;
        }
        let temb = self.o.silu("time_embedding/act_out", &emb)?;
        let ctx = self
            .o
            .cast("encoder_hidden_states/cast", &inputs.context, dt)?;
        let x = self.o.cast("sample/cast", &inputs.sample, dt)?;
        let x = self.conv("conv_in", &x, 1, 1)?;
        Ok((temb, ctx, x))
    }

    /// The down blocks and the mid block from `conv_in`'s output: the skip connections (diffusers'
    /// `down_block_res_samples`, `conv_in`'s output first) and the mid block's output.
    fn down_mid(&mut self, x: Value, temb: &Value, ctx: &Value) -> Result<(Vec<Value>, Value)> {
        let cfg = self.cfg;
        let n = cfg.block_out_channels.len();
        let l = cfg.layers_per_block;
        let (temb, ctx) = (temb.clone(), ctx.clone());
        let mut x = x;
        let mut skips = vec![x.clone()];
        for i in 0..n {
            for j in 0..l {
                x = self.resnet(&format!("down_blocks.{i}.resnets.{j}"), &x, &temb)?;
                if cfg.down_attention[i] {
                    let name = format!("down_blocks.{i}.attentions.{j}");
                    x = self.transformer(&name, &x, &ctx, cfg.heads[i])?;
                }
                skips.push(x.clone());
            }
            if i + 1 < n {
                x = self.conv(&format!("down_blocks.{i}.downsamplers.0.conv"), &x, 2, 1)?;
                skips.push(x.clone());
            }
        }
        x = self.resnet("mid_block.resnets.0", &x, &temb)?;
        if self.has("mid_block.attentions.0.norm.weight") {
            x = self.transformer("mid_block.attentions.0", &x, &ctx, cfg.heads[n - 1])?;
        }
        x = self.resnet("mid_block.resnets.1", &x, &temb)?;
        Ok((skips, x))
    }

    fn forward(&mut self, inputs: &Inputs) -> Result<Value> {
        let cfg = self.cfg;
        let n = cfg.block_out_channels.len();
        let l = cfg.layers_per_block;
        let (temb, ctx, x) = self.embed(inputs)?;
        let (mut skips, mut x) = self.down_mid(x, &temb, &ctx)?;
        if let Some((down, mid)) = &inputs.residuals {
            // A ControlNet's residuals: one per skip connection and one on the mid block's output (diffusers'
            // `down_block_additional_residuals`, `mid_block_additional_residual`), in the compute type.
            if down.len() != skips.len() {
                bail!(
                    "the UNet has {} skip connections, {} ControlNet residuals were given",
                    skips.len(),
                    down.len()
                );
            }
            for (k, (s, r)) in skips.iter_mut().zip(down).enumerate() {
                let r = self
                    .o
                    .cast(&format!("controlnet_down_{k}/cast"), r, self.o.dtype)?;
                let shape = s.shape.clone();
                *s = self
                    .o
                    .same("Add", &format!("controlnet_down_{k}/add"), &[s, &r], vec![])?;
                s.shape = shape;
            }
            let r = self.o.cast("controlnet_mid/cast", mid, self.o.dtype)?;
            let shape = x.shape.clone();
            x = self
                .o
                .same("Add", "controlnet_mid/add", &[&x, &r], vec![])?;
            x.shape = shape;
        }
        for i in 0..n {
            for j in 0..=l {
                let skip = skips.pop().with_context(|| {
                    format!("UNet up block {i} has more ResNets than the down path has outputs")
                })?;
                let c = |v: &Value| match v.shape.get(1) {
                    Some(Dim::Fixed(c)) => *c,
                    _ => 0,
                };
                let ch = c(&x) + c(&skip);
                let name = format!("up_blocks.{i}.resnets.{j}");
                x = self.o.op(
                    "Concat",
                    &format!("{name}/skip"),
                    &[&x, &skip],
                    vec![("axis", Attr::Int(1))],
                    sym4(&format!("{name}.skip"), ch as usize),
                )?;
                x = self.resnet(&name, &x, &temb)?;
                if cfg.up_attention[i] {
                    let name = format!("up_blocks.{i}.attentions.{j}");
                    x = self.transformer(&name, &x, &ctx, cfg.heads[n - 1 - i])?;
                }
            }
            if i + 1 < n {
                let like = skips
                    .last()
                    .cloned()
                    .context("UNet down path ended before the up path")?;
                x = self.upsample(&format!("up_blocks.{i}.upsamplers.0"), &x, &like)?;
            }
        }
        let eps = cfg.norm_eps;
        let h = self.group_norm("conv_norm_out", &x, eps)?;
        let h = self.o.silu("conv_norm_out/act", &h)?;
        self.conv("conv_out", &h, 1, 1)
    }
}

struct Inputs {
    sample: Value,
    timestep: Value,
    context: Value,
    /// (text_embeds, time_ids) for SDXL.
    added: Option<(Value, Value)>,
    /// A ControlNet's (down residuals, mid residual), added to the skips and the mid block's output.
    residuals: Option<(Vec<Value>, Value)>,
    /// ControlNet-Union: the control types' multi-hot vector [batch, types], embedded into the time embedding.
    control_type: Option<Value>,
}

/// TensorRT optimization-profile ranges of the UNet's inputs: batch, latent side (height and width each; pixels
/// divided by the VAE factor) and prompt length in 77-token chunks, each (min, opt, max).
pub fn profile(
    cfg: &UNetConfig,
    batch: [i64; 3],
    latent_side: [i64; 3],
    prompt_chunks: [i64; 3],
) -> Vec<crate::manifest::ShapeRange> {
    let range = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| crate::manifest::ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let (b, l) = (batch, latent_side);
    let mut v = vec![
        range("sample", &|i| {
            vec![b[i], cfg.in_channels as i64, l[i], l[i]]
        }),
        range("timestep", &|i| vec![b[i]]),
        range("encoder_hidden_states", &|i| {
            vec![b[i], 77 * prompt_chunks[i], cfg.cross_attention_dim as i64]
        }),
    ];
    if let Some(a) = &cfg.added {
        v.push(range("text_embeds", &|i| {
            vec![b[i], a.text_embeds_dim as i64]
        }));
        v.push(range("time_ids", &|i| vec![b[i], a.time_ids as i64]));
    }
    v
}

/// The graph's input names, in order.
pub fn input_names(cfg: &UNetConfig) -> Vec<&'static str> {
    let mut v = vec!["sample", "timestep", "encoder_hidden_states"];
    if cfg.added.is_some() {
        v.extend(["text_embeds", "time_ids"]);
    }
    v
}

fn emit(
    cfg: &UNetConfig,
    ck: &Checkpoint,
    opts: &UNetExportOptions,
    stream: Option<&Path>,
) -> Result<(
    ModelProto,
    Option<crate::onnx::builder::ExternalSink>,
    Emitted,
)> {
    if cfg.block_out_channels.is_empty() {
        bail!("UNet config: no levels (block_out_channels is empty)");
    }
    if cfg.heads.len() != cfg.block_out_channels.len()
        || cfg.down_attention.len() != cfg.block_out_channels.len()
        || cfg.up_attention.len() != cfg.block_out_channels.len()
    {
        bail!("UNet config: heads and attention flags need one entry per level");
    }
    let default;
    let policy = match (&opts.quantize, &opts.policy) {
        (None, _) => None,
        (Some(_), Some(p)) => Some(p),
        (Some(q), None) => {
            default = default_policy(*q);
            Some(&default)
        }
    };
    let opset = opts.quantize.map_or(18, |q| q.min_opset()).max(18);
    let mut e = Emitter {
        o: Ops::new("unet", opset, opts.compute),
        cfg,
        ck,
        linears: Linears::new(
            policy,
            &opts.amax,
            opts.fp8_default_amax,
            opts.nvfp4_default_amax,
            opts.calibration,
        ),
    };
    e.linears.lora_rank = opts.lora_rank;
    e.linears.channel_calibration = opts.channel_calibration;
    e.linears.smooth = opts.smooth_alpha.map(|a| (a, &opts.channel_amax));
    if opts.quantize == Some(LinearPrecision::Nvfp4) {
        // TensorRT's dynamic FP4 activation quantization.
        e.o.g.use_domain("trt", 1);
    }
    if let Some(out) = stream {
        e.o.g.stream_external_data(out, 1024)?;
    }
    let f32t = DataType::FLOAT;
    let sample = e.o.g.input(
        "sample",
        f32t,
        vec![
            Dim::Sym("batch".into()),
            Dim::Fixed(cfg.in_channels as i64),
            Dim::Sym("latent_height".into()),
            Dim::Sym("latent_width".into()),
        ],
    )?;
    let timestep =
        e.o.g
            .input("timestep", f32t, vec![Dim::Sym("batch".into())])?;
    let context = e.o.g.input(
        "encoder_hidden_states",
        f32t,
        vec![
            Dim::Sym("batch".into()),
            Dim::Sym("text_seq".into()),
            Dim::Fixed(cfg.cross_attention_dim as i64),
        ],
    )?;
    let added = match &cfg.added {
        Some(a) => Some((
            e.o.g.input(
                "text_embeds",
                f32t,
                vec![
                    Dim::Sym("batch".into()),
                    Dim::Fixed(a.text_embeds_dim as i64),
                ],
            )?,
            e.o.g.input(
                "time_ids",
                f32t,
                vec![Dim::Sym("batch".into()), Dim::Fixed(a.time_ids as i64)],
            )?,
        )),
        None => None,
    };
    let residuals = if opts.controlnet_residuals {
        let mut down = Vec::new();
        let mut mid = None;
        for r in controlnet_residuals(cfg) {
            let v = e.o.g.input(&r.name, f32t, r.dims())?;
            if r.name == "controlnet_mid" {
                mid = Some(v);
            } else {
                down.push(v);
            }
        }
        Some((down, mid.context("no mid residual")?))
    } else {
        None
    };
    let y = e.forward(&Inputs {
        sample,
        timestep,
        context,
        added,
        residuals,
        control_type: None,
    })?;
    let y = e.o.cast("model_output/f32", &y, f32t)?;
    let y = e.o.g.op(
        "Identity",
        "model_output",
        &[&y],
        vec![],
        f32t,
        vec![
            Dim::Sym("batch".into()),
            Dim::Fixed(cfg.out_channels as i64),
            Dim::Sym("latent_height".into()),
            Dim::Sym("latent_width".into()),
        ],
    )?;
    e.o.g.output(&y);
    let layers = Emitted {
        counts: e.linears.counts.clone(),
        linears: std::mem::take(&mut e.linears.shapes),
        smoothed: e.linears.smoothed,
    };
    let (model, sink) = e.o.g.finish_streamed();
    Ok((model, sink, layers))
}

/// One ControlNet residual: its name (`controlnet_down_<k>` per skip connection, `controlnet_mid`), channels and
/// resolution level (the latent size halved `level` times, rounding up as the stride-2 downsamplers do).
#[derive(Clone, Debug, PartialEq)]
pub struct Residual {
    pub name: String,
    pub channels: usize,
    pub level: usize,
}

impl Residual {
    fn dims(&self) -> Vec<Dim> {
        vec![
            Dim::Sym("batch".into()),
            Dim::Fixed(self.channels as i64),
            Dim::Sym(format!("{}_h", self.name)),
            Dim::Sym(format!("{}_w", self.name)),
        ]
    }

    /// [batch, channels, h, w] for a latent of `h` x `w`.
    pub fn shape(&self, batch: usize, h: usize, w: usize) -> [usize; 4] {
        let down = |mut v: usize| {
            for _ in 0..self.level {
                v = v.div_ceil(2);
            }
            v
        };
        [batch, self.channels, down(h), down(w)]
    }
}

/// The residuals a ControlNet gives a UNet of `cfg`'s shape: one per skip connection (`conv_in`'s output, each
/// down ResNet/attention, each downsampler) and the mid block's.
pub fn controlnet_residuals(cfg: &UNetConfig) -> Vec<Residual> {
    let c = &cfg.block_out_channels;
    let n = c.len();
    let mut levels = vec![(c[0], 0)];
    for (i, ch) in c.iter().enumerate() {
        levels.extend(std::iter::repeat_n((*ch, i), cfg.layers_per_block));
        if i + 1 < n {
            levels.push((*ch, i + 1));
        }
    }
    let mut out: Vec<Residual> = levels
        .into_iter()
        .enumerate()
        .map(|(k, (channels, level))| Residual {
            name: format!("controlnet_down_{k}"),
            channels,
            level,
        })
        .collect();
    out.push(Residual {
        name: "controlnet_mid".into(),
        channels: c[n - 1],
        level: n - 1,
    });
    out
}

/// What a ControlNet-Union (diffusers `ControlNetUnionModel`) adds to a ControlNet: control types, and the
/// condition transformer's width and heads.
pub struct UnionConfig {
    /// diffusers' `num_control_type` (xinsir: 6; ProMax: 8).
    pub types: usize,
    pub width: usize,
    pub heads: usize,
}

impl UnionConfig {
    /// Read off `task_embedding` [types, width] and `config.json`'s `num_trans_head` (8, xinsir's, without one).
    pub fn read(cfg: &UNetConfig, ck: &Checkpoint) -> Result<Self> {
        let task = ck.get(&cfg.name("task_embedding"))?;
        let [types, width] = task.shape[..] else {
            bail!(
                "'{}': task_embedding is {:?}, expected [num_control_type, num_trans_channel]",
                ck.path.display(),
                task.shape
            );
        };
        let heads = match read_config_json(&ck.path)? {
            Some(t) => serde_json::from_str::<serde_json::Value>(&t)
                .context("ControlNet config.json is not JSON")?
                .get("num_trans_head")
                .and_then(|v| v.as_u64())
                .unwrap_or(8) as usize,
            None => 8,
        };
        let c0 = cfg.block_out_channels.first().copied().unwrap_or(0);
        if types == 0 || heads == 0 || !width.is_multiple_of(heads) || width != c0 {
            bail!(
                "'{}': the ControlNet-Union's condition transformer ({types} types, width {width}, {heads} heads) \
                 does not fit its first level's {c0} channels",
                ck.path.display()
            );
        }
        Ok(UnionConfig {
            types,
            width,
            heads,
        })
    }
}

impl Emitter<'_> {
    /// ControlNet-Union's condition fusion (diffusers `ControlNetUnionModel.forward`): each control's embedded
    /// features `h` [controls*batch, c, h, w] pooled plus its task embedding, scaled by `scales`, and the pooled
    /// `conv_in` output, as tokens through the `transformer_layes` (nn.MultiheadAttention without batch_first: the
    /// attention runs across the batch); each control adds `scale * (h + spatial_ch_projs(token))`. Returns the sum
    /// [batch, c, h, w] to add to `x`.
    fn union_fuse(
        &mut self,
        u: &UnionConfig,
        x: &Value,
        h: &Value,
        cond: &Value,
        mode: &Value,
        scales: &Value,
    ) -> Result<Value> {
        let dt = self.o.dtype;
        let c = u.width as i64;
        let i64t = DataType::INT64;
        let lead = self.o.g.op(
            "Shape",
            "union/lead",
            &[cond],
            vec![("start", Attr::Int(0)), ("end", Attr::Int(2))],
            i64t,
            vec![Dim::Fixed(2)],
        )?;
        let hw = self.o.g.op(
            "Shape",
            "union/hw",
            &[h],
            vec![("start", Attr::Int(1))],
            i64t,
            vec![Dim::Fixed(3)],
        )?;
        let shape5 = self.o.g.op(
            "Concat",
            "union/shape5",
            &[&lead, &hw],
            vec![("axis", Attr::Int(0))],
            i64t,
            vec![Dim::Fixed(5)],
        )?;
        let ctl = || Dim::Sym("controls".into());
        let bt = || Dim::Sym("batch".into());
        let mut h5 = self
            .o
            .same("Reshape", "union/conditions", &[h, &shape5], vec![])?;
        h5.shape = vec![
            ctl(),
            bt(),
            Dim::Fixed(c),
            Dim::Sym("union_h".into()),
            Dim::Sym("union_w".into()),
        ];
        // Tokens [controls + 1, batch, width]: per control mean + task embedding (scaled), then the sample's mean.
        let axes = self.o.i64s("union.hw_axes", &[3, 4])?;
        let feat = self.o.op(
            "ReduceMean",
            "union/feat",
            &[&h5, &axes],
            vec![("keepdims", Attr::Int(0))],
            vec![ctl(), bt(), Dim::Fixed(c)],
        )?;
        let table = self.t("task_embedding")?;
        let table = self
            .o
            .weight(&self.cfg.name("task_embedding"), &table, dt)?;
        let one = self.o.i64s("union.axis1", &[1])?;
        let mode2 = self.o.g.op(
            "Unsqueeze",
            "union/mode",
            &[mode, &one],
            vec![],
            i64t,
            vec![ctl(), Dim::Fixed(1)],
        )?;
        let task = self.o.op(
            "Gather",
            "union/task",
            &[&table, &mode2],
            vec![("axis", Attr::Int(0))],
            vec![ctl(), Dim::Fixed(1), Dim::Fixed(c)],
        )?;
        let feat = self
            .o
            .same("Add", "union/feat_task", &[&feat, &task], vec![])?;
        let s = self.o.cast("union/scales", scales, dt)?;
        let s3 = self.o.i64s("union.scale3", &[-1, 1, 1])?;
        let s3 = self.o.op(
            "Reshape",
            "union/scale3",
            &[&s, &s3],
            vec![],
            vec![ctl(), Dim::Fixed(1), Dim::Fixed(1)],
        )?;
        let feat = self
            .o
            .same("Mul", "union/feat_scaled", &[&feat, &s3], vec![])?;
        let axes2 = self.o.i64s("union.sample_axes", &[2, 3])?;
        let sfeat = self.o.op(
            "ReduceMean",
            "union/sample_feat",
            &[x, &axes2],
            vec![("keepdims", Attr::Int(0))],
            vec![bt(), Dim::Fixed(c)],
        )?;
        let zero = self.o.i64s("union.axis0", &[0])?;
        let sfeat = self.o.op(
            "Unsqueeze",
            "union/sample_token",
            &[&sfeat, &zero],
            vec![],
            vec![Dim::Fixed(1), bt(), Dim::Fixed(c)],
        )?;
        let mut t = self.o.op(
            "Concat",
            "union/tokens",
            &[&feat, &sfeat],
            vec![("axis", Attr::Int(0))],
            vec![Dim::Sym("union_tokens".into()), bt(), Dim::Fixed(c)],
        )?;
        let mut k = 0;
        while self.has(&format!("transformer_layes.{k}.ln_1.weight")) {
            let name = format!("transformer_layes.{k}");
            let n = self.layer_norm(&format!("{name}.ln_1"), &t)?;
            let w = self.t(&format!("{name}.attn.in_proj_weight"))?;
            let bias = self.t(&format!("{name}.attn.in_proj_bias"))?;
            let qkv = self.linears.linear(
                &mut self.o,
                &self.cfg.name(&format!("{name}.attn.in_proj")),
                &format!("{name}.attn.in_proj"),
                &amax_key(&format!("{name}.attn.in_proj")),
                &n,
                Weight::Tensor {
                    weight: &w,
                    bias: Some(&bias),
                },
            )?;
            let mut part = t.shape.clone();
            part[2] = Dim::Fixed(c);
            let sizes = self.o.i64s(&format!("{name}.qkv"), &[c, c, c])?;
            let qkv = self.o.g.node(
                "Split",
                &format!("{name}/qkv"),
                &[&qkv, &sizes],
                vec![("axis", Attr::Int(-1))],
                vec![(dt, part.clone()), (dt, part.clone()), (dt, part)],
            )?;
            let scale = ((u.width / u.heads) as f32).powf(-0.5);
            let a = attention(
                &mut self.o,
                &self.cfg.name(&format!("{name}.attn")),
                (&qkv[0], &qkv[1], &qkv[2]),
                u.heads,
                Some(scale),
                None,
            )?;
            let a = self.linear(&format!("{name}.attn.out_proj"), &a)?;
            t = self
                .o
                .same("Add", &format!("{name}/attn_res"), &[&t, &a], vec![])?;
            let n = self.layer_norm(&format!("{name}.ln_2"), &t)?;
            let f = self.linear(&format!("{name}.mlp.c_fc"), &n)?;
            let f = activation(&mut self.o, &format!("{name}/quick_gelu"), &f, "quick_gelu")?;
            let f = self.linear(&format!("{name}.mlp.c_proj"), &f)?;
            t = self
                .o
                .same("Add", &format!("{name}/mlp_res"), &[&t, &f], vec![])?;
            k += 1;
        }
        // Each control's token (the first `controls`) projected to a per-channel shift of its features.
        let starts = self.o.i64s("union.token_start", &[0])?;
        let ends = self.o.g.op(
            "Shape",
            "union/controls",
            &[cond],
            vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
            i64t,
            vec![Dim::Fixed(1)],
        )?;
        let tok = self.o.op(
            "Slice",
            "union/control_tokens",
            &[&t, &starts, &ends, &zero],
            vec![],
            vec![ctl(), bt(), Dim::Fixed(c)],
        )?;
        let alpha = self.linear("spatial_ch_projs", &tok)?;
        let hw_axes = self.o.i64s("union.alpha_axes", &[3, 4])?;
        let alpha = self.o.op(
            "Unsqueeze",
            "union/alpha",
            &[&alpha, &hw_axes],
            vec![],
            vec![ctl(), bt(), Dim::Fixed(c), Dim::Fixed(1), Dim::Fixed(1)],
        )?;
        let fused = self
            .o
            .same("Add", "union/shifted", &[&h5, &alpha], vec![])?;
        let s5 = self.o.i64s("union.scale5", &[-1, 1, 1, 1, 1])?;
        let s5 = self.o.op(
            "Reshape",
            "union/scale5",
            &[&s, &s5],
            vec![],
            vec![
                ctl(),
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(1),
                Dim::Fixed(1),
            ],
        )?;
        let fused = self
            .o
            .same("Mul", "union/fused_scaled", &[&fused, &s5], vec![])?;
        let mut sum = self.o.op(
            "ReduceSum",
            "union/fuser",
            &[&fused, &zero],
            vec![("keepdims", Attr::Int(0))],
            x.shape.clone(),
        )?;
        sum.shape = x.shape.clone();
        Ok(sum)
    }
}

/// A diffusers `ControlNetModel` (SD1.x/SD2.x/SDXL): the UNet's embeddings, down and mid blocks (`cfg` read off
/// the ControlNet's own weights), the control image's embedding (`controlnet_cond_embedding`: 3x3 convolutions,
/// every second one strided, SiLU between) added after `conv_in`, and a zero convolution per residual.
///
/// Inputs: the UNet's (`sample`, `timestep`, `encoder_hidden_states`, SDXL's `text_embeds` and `time_ids`),
/// `controlnet_cond` [batch, 3, height, width] (the control image in [0, 1], pixel size) and
/// `conditioning_scale` [1]. Outputs: [`controlnet_residuals`] of the UNet it conditions, scaled.
pub fn controlnet_graph(
    cfg: &UNetConfig,
    ck: &Checkpoint,
    opts: &UNetExportOptions,
) -> Result<ModelProto> {
    if !ck.contains(&cfg.name("controlnet_cond_embedding.conv_in.weight")) {
        bail!(
            "'{}' is not a diffusers ControlNetModel (no controlnet_cond_embedding.conv_in): give the ControlNet's \
             folder (config.json + diffusion_pytorch_model.safetensors)",
            ck.path.display()
        );
    }
    let union = match ck.contains(&cfg.name("task_embedding")) {
        true => Some(UnionConfig::read(cfg, ck)?),
        false => None,
    };
    let mut e = Emitter {
        o: Ops::new("controlnet", 18, opts.compute),
        cfg,
        ck,
        linears: Linears::new(None, &opts.amax, None, opts.nvfp4_default_amax, false),
    };
    let f32t = DataType::FLOAT;
    let b = || Dim::Sym("batch".into());
    let sample = e.o.g.input(
        "sample",
        f32t,
        vec![
            b(),
            Dim::Fixed(cfg.in_channels as i64),
            Dim::Sym("latent_height".into()),
            Dim::Sym("latent_width".into()),
        ],
    )?;
    let timestep = e.o.g.input("timestep", f32t, vec![b()])?;
    let context = e.o.g.input(
        "encoder_hidden_states",
        f32t,
        vec![
            b(),
            Dim::Sym("text_seq".into()),
            Dim::Fixed(cfg.cross_attention_dim as i64),
        ],
    )?;
    let added = match &cfg.added {
        Some(a) => Some((
            e.o.g.input(
                "text_embeds",
                f32t,
                vec![b(), Dim::Fixed(a.text_embeds_dim as i64)],
            )?,
            e.o.g
                .input("time_ids", f32t, vec![b(), Dim::Fixed(a.time_ids as i64)])?,
        )),
        None => None,
    };
    let cond_channels = e.t("controlnet_cond_embedding.conv_in.weight")?.shape[1];
    let image_dims = vec![
        Dim::Fixed(cond_channels as i64),
        Dim::Sym("image_height".into()),
        Dim::Sym("image_width".into()),
    ];
    // A union ControlNet takes every control of a step at once: [controls, batch, channels, height, width].
    let controls = || Dim::Sym("controls".into());
    let cond = e.o.g.input(
        "controlnet_cond",
        f32t,
        match union {
            Some(_) => [vec![controls(), b()], image_dims].concat(),
            None => [vec![b()], image_dims].concat(),
        },
    )?;
    let scale =
        e.o.g
            .input("conditioning_scale", f32t, vec![Dim::Fixed(1)])?;
    let union_inputs = match &union {
        Some(u) => Some((
            e.o.g
                .input("control_type", f32t, vec![b(), Dim::Fixed(u.types as i64)])?,
            e.o.g
                .input("control_mode", DataType::INT64, vec![controls()])?,
            e.o.g.input("control_scales", f32t, vec![controls()])?,
        )),
        None => None,
    };
    let inputs = Inputs {
        sample,
        timestep,
        context,
        added,
        residuals: None,
        control_type: union_inputs.as_ref().map(|u| u.0.clone()),
    };
    if union.is_some() && cfg.added.is_none() {
        bail!(
            "'{}' is a ControlNet-Union without SDXL's added conditioning: trt-diff runs the SDXL ones \
             (diffusers ControlNetUnionModel)",
            ck.path.display()
        );
    }
    let (temb, ctx, x) = e.embed(&inputs)?;
    let dt = e.o.dtype;
    let c = e.o.cast("controlnet_cond/cast", &cond, dt)?;
    let c = match union {
        // The controls as one batch of controls x batch images.
        Some(_) => {
            let shape = e.o.g.op(
                "Shape",
                "controlnet_cond/image_shape",
                &[&cond],
                vec![("start", Attr::Int(2))],
                DataType::INT64,
                vec![Dim::Fixed(3)],
            )?;
            let lead = e.o.i64s("controlnet_cond.lead", &[-1])?;
            let target = e.o.g.op(
                "Concat",
                "controlnet_cond/flat_shape",
                &[&lead, &shape],
                vec![("axis", Attr::Int(0))],
                DataType::INT64,
                vec![Dim::Fixed(4)],
            )?;
            let mut flat =
                e.o.same("Reshape", "controlnet_cond/flat", &[&c, &target], vec![])?;
            flat.shape = vec![
                Dim::Sym("control_batch".into()),
                Dim::Fixed(cond_channels as i64),
                Dim::Sym("image_height".into()),
                Dim::Sym("image_width".into()),
            ];
            flat
        }
        None => c,
    };
    let mut h = e.conv("controlnet_cond_embedding.conv_in", &c, 1, 1)?;
    h = e.o.silu("controlnet_cond_embedding/act_in", &h)?;
    let mut k = 0;
    while e.has(&format!("controlnet_cond_embedding.blocks.{k}.weight")) {
        // diffusers' ControlNetConditioningEmbedding: pairs of (same-size, stride-2) convolutions.
        let stride = if k % 2 == 1 { 2 } else { 1 };
        h = e.conv(
            &format!("controlnet_cond_embedding.blocks.{k}"),
            &h,
            stride,
            1,
        )?;
        h =
            e.o.silu(&format!("controlnet_cond_embedding/act_{k}"), &h)?;
        k += 1;
    }
    let h = e.conv("controlnet_cond_embedding.conv_out", &h, 1, 1)?;
    let h = match (&union, &union_inputs) {
        (Some(u), Some((_, mode, scales))) => e.union_fuse(u, &x, &h, &cond, mode, scales)?,
        _ => h,
    };
    let shape = x.shape.clone();
    let mut x = e.o.same("Add", "controlnet_cond/add", &[&x, &h], vec![])?;
    x.shape = shape;
    let (skips, mid) = e.down_mid(x, &temb, &ctx)?;
    let scale = e.o.cast("conditioning_scale/cast", &scale, dt)?;
    let residuals = controlnet_residuals(cfg);
    let zero_convs: Vec<String> = (0..skips.len())
        .map(|k| format!("controlnet_down_blocks.{k}"))
        .chain(["controlnet_mid_block".to_string()])
        .collect();
    for ((r, v), conv) in residuals
        .iter()
        .zip(skips.iter().chain([&mid]))
        .zip(&zero_convs)
    {
        let y = e.conv(conv, v, 1, 0)?;
        let y =
            e.o.same("Mul", &format!("{}/scaled", r.name), &[&y, &scale], vec![])?;
        let y = e.o.cast(&format!("{}/f32", r.name), &y, f32t)?;
        let y =
            e.o.g
                .op("Identity", &r.name, &[&y], vec![], f32t, r.dims())?;
        e.o.g.output(&y);
    }
    Ok(e.o.g.finish())
}

/// The UNet graph in memory (weights inline): for tests and small models.
pub fn graph(cfg: &UNetConfig, ck: &Checkpoint, opts: &UNetExportOptions) -> Result<ModelProto> {
    Ok(emit(cfg, ck, opts, None)?.0)
}

/// What an emitter wrote besides the graph.
struct Emitted {
    counts: HashMap<String, usize>,
    linears: Vec<crate::quant::auto::LinearShape>,
    smoothed: usize,
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct UNetExportReport {
    pub onnx: PathBuf,
    /// Linear layers by precision name ("fp8", "nvfp4", "kept").
    pub layers: HashMap<String, usize>,
    /// Every linear layer (policy name, shape) in graph order: what `build --precision auto` measures.
    pub linears: Vec<crate::quant::auto::LinearShape>,
    /// INT8 layers with SmoothQuant applied.
    pub smoothed: usize,
}

/// Exports the UNet of `ck` to `out` (weights streamed to `<out>.data`, both under temporary names until
/// complete; peak memory about one tensor).
pub fn export(
    cfg: &UNetConfig,
    ck: &Checkpoint,
    opts: &UNetExportOptions,
    out: &Path,
) -> Result<UNetExportReport> {
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create '{}'", dir.display()))?;
    }
    let (model, sink, e) = emit(cfg, ck, opts, Some(out))?;
    crate::onnx::save_streamed(model, sink, out)?;
    Ok(UNetExportReport {
        onnx: out.to_path_buf(),
        layers: e.counts,
        linears: e.linears,
        smoothed: e.smoothed,
    })
}

/// Opens `checkpoint` (a file, or a diffusers `unet/` folder), reads its config and exports it to
/// `out_dir/unet.onnx` in memory-light streaming form.
pub fn export_file(
    checkpoint: &Path,
    opts: &UNetExportOptions,
    out_dir: &Path,
) -> Result<UNetExportReport> {
    let ck = Checkpoint::open(checkpoint)?;
    let cfg = UNetConfig::from_checkpoint(&ck)?;
    export(&cfg, &ck, opts, &out_dir.join("unet.onnx"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15_like() -> UNetConfig {
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            heads: vec![8; 4],
            down_attention: vec![true, true, true, false],
            up_attention: vec![false, true, true, true],
            cross_attention_dim: 768,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            added: None,
            layout: UNetLayout::Original,
            prefix: "model.diffusion_model.".into(),
        }
    }

    #[test]
    fn original_names_follow_the_ldm_layout() {
        let cfg = sd15_like();
        for (d, o) in [
            ("time_embedding.linear_1.weight", "time_embed.0.weight"),
            ("time_embedding.linear_2.bias", "time_embed.2.bias"),
            ("add_embedding.linear_2.weight", "label_emb.0.2.weight"),
            ("conv_in.weight", "input_blocks.0.0.weight"),
            (
                "down_blocks.0.resnets.1.time_emb_proj.weight",
                "input_blocks.2.0.emb_layers.1.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.bias",
                "input_blocks.4.0.skip_connection.bias",
            ),
            (
                "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.weight",
                "input_blocks.9.0.op.weight",
            ),
            (
                "mid_block.resnets.1.norm2.weight",
                "middle_block.2.out_layers.0.weight",
            ),
            (
                "mid_block.attentions.0.proj_in.weight",
                "middle_block.1.proj_in.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv2.weight",
                "output_blocks.2.0.out_layers.3.weight",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.bias",
                "output_blocks.5.2.conv.bias",
            ),
            (
                "up_blocks.3.attentions.2.norm.weight",
                "output_blocks.11.1.norm.weight",
            ),
            ("conv_norm_out.weight", "out.0.weight"),
            ("conv_out.bias", "out.2.bias"),
        ] {
            assert_eq!(cfg.name(d), format!("model.diffusion_model.{o}"), "{d}");
        }
    }

    #[test]
    fn amax_keys_share_inputs() {
        assert_eq!(
            amax_key("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"),
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
        );
        assert_eq!(
            amax_key("mid_block.attentions.0.transformer_blocks.0.attn2.to_v"),
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
        );
    }

    #[test]
    fn default_policy_keeps_embeddings_and_io() {
        let p = default_policy(LinearPrecision::Fp8);
        let q = |n: &str| p.decide(n, crate::quant::policy::LayerKind::Linear);
        assert_eq!(
            q("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
            Some(LinearPrecision::Fp8)
        );
        assert_eq!(
            q("up_blocks.1.attentions.0.proj_out"),
            Some(LinearPrecision::Fp8)
        );
        for keep in [
            "time_embedding.linear_1",
            "add_embedding.linear_2",
            "down_blocks.0.resnets.0.time_emb_proj",
        ] {
            assert_eq!(q(keep), None, "{keep}");
        }
    }
}
