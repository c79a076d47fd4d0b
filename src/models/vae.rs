//! The Flux VAE (a 16-channel `AutoencoderKL`; the same code reads SD/SDXL's 4-channel ones) as two ONNX graphs,
//! decoder and encoder, with weights zero-copy from either layout: diffusers (`encoder.down_blocks.*`,
//! `decoder.up_blocks.*`, `mid_block.attentions.0.to_q`, ...) or the original one of BFL's `ae.safetensors`
//! (`encoder.down.*.block.*`, `decoder.up.*`, `mid.attn_1.q` as 1x1 convs, `nin_shortcut`).
//!
//! **Scaling is the pipeline's job, not the graph's.** Flux's latent space is normalised with scaling 0.3611 and
//! shift 0.1159 ([`FLUX_SCALING`], [`FLUX_SHIFT`]): before decoding, the pipeline computes
//! `z = latent / 0.3611 + 0.1159` and feeds `z`; after encoding it computes `latent = (mean - 0.1159) * 0.3611`
//! (or samples `mean + exp(logvar / 2) * noise` first). The graphs are the bare `AutoencoderKL` decoder/encoder:
//! - decoder: `latent` [batch, C, h, w] -> `image` [batch, 3, 8h, 8w] in [-1, 1] (unclamped);
//! - encoder: `image` [batch, 3, H, W] in [-1, 1] -> `mean`, `logvar` [batch, C, H/8, W/8] (logvar clamped to
//!   [-30, 20] as diffusers' `DiagonalGaussianDistribution` does).
use super::ops::Ops;
use crate::onnx::{Attr, DataType, Dim, SaveOptions, Value, proto::ModelProto, save};
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

pub const FLUX_SCALING: f32 = 0.3611;
pub const FLUX_SHIFT: f32 = 0.1159;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VaeLayout {
    Diffusers,
    /// The original (LDM / BFL `ae.safetensors`) names.
    Original,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeConfig {
    pub latent_channels: usize,
    /// Channels per resolution level, encoder order (Flux: 128, 256, 512, 512).
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    /// SD-style 1x1 convs around the latent (Flux has none).
    pub quant_conv: bool,
    pub layout: VaeLayout,
    /// Key prefix (e.g. "vae." or "first_stage_model." in single-file checkpoints).
    pub prefix: String,
}

impl VaeConfig {
    /// Reads the architecture off the weights; GroupNorm groups are not in them: a diffusers `config.json` beside
    /// the checkpoint (`norm_num_groups`) is read when present, else 32 (every released SD/SDXL/SD3/Flux VAE).
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let find = |suffix: &str| {
            ck.names()
                .find(|k| k.ends_with(suffix))
                .map(|k| k[..k.len() - suffix.len()].to_string())
        };
        let (layout, prefix) = if let Some(p) = find("encoder.down_blocks.0.resnets.0.conv1.weight")
            .or_else(|| find("decoder.up_blocks.0.resnets.0.conv1.weight"))
        {
            (VaeLayout::Diffusers, p)
        } else if let Some(p) = find("encoder.down.0.block.0.conv1.weight")
            .or_else(|| find("decoder.up.0.block.0.conv1.weight"))
        {
            (VaeLayout::Original, p)
        } else {
            bail!(
                "'{}' is not an AutoencoderKL checkpoint (no encoder.down_blocks / decoder.up_blocks nor \
                 encoder.down / decoder.up ResNet weights); for diffusers folders point at vae/",
                ck.path.display()
            );
        };
        let mut cfg = VaeConfig {
            latent_channels: 0,
            block_out_channels: vec![],
            layers_per_block: 0,
            norm_num_groups: 32,
            quant_conv: false,
            layout,
            prefix,
        };
        // Levels and widths from the decoder (always present); the decoder's up blocks are in reverse order.
        let mut widths = Vec::new();
        loop {
            let name = cfg.dec_block(widths.len(), 0, "conv1.weight");
            match ck.shape(&name) {
                Some(s) => widths.push(s[0]),
                None => break,
            }
        }
        if widths.is_empty() {
            bail!("'{}' has no VAE decoder blocks", ck.path.display());
        }
        // diffusers numbers up blocks from the lowest resolution (widest), the original layout from the highest.
        if layout == VaeLayout::Diffusers {
            widths.reverse();
        }
        cfg.block_out_channels = widths;
        let mut n = 0;
        while ck.contains(&cfg.dec_block(0, n, "conv1.weight")) {
            n += 1;
        }
        cfg.layers_per_block = n.saturating_sub(1);
        let conv_in = format!("{}decoder.conv_in.weight", cfg.prefix);
        cfg.latent_channels = ck
            .shape(&conv_in)
            .with_context(|| format!("'{}' has no tensor '{conv_in}'", ck.path.display()))?[1];
        cfg.quant_conv = ck.contains(&format!("{}post_quant_conv.weight", cfg.prefix));
        if let Some(g) = read_groups(&ck.path)? {
            cfg.norm_num_groups = g;
        }
        Ok(cfg)
    }

    /// Name of decoder up-block `i` (diffusers order) resnet `j`'s parameter `p`.
    fn dec_block(&self, i: usize, j: usize, p: &str) -> String {
        let n = self.block_out_channels.len();
        match self.layout {
            VaeLayout::Diffusers => format!("{}decoder.up_blocks.{i}.resnets.{j}.{p}", self.prefix),
            // During discovery block_out_channels is empty: index directly.
            VaeLayout::Original if n == 0 => format!("{}decoder.up.{i}.block.{j}.{p}", self.prefix),
            VaeLayout::Original => format!("{}decoder.up.{}.block.{j}.{p}", self.prefix, n - 1 - i),
        }
    }
}

fn read_groups(path: &Path) -> Result<Option<usize>> {
    let dir = if path.is_dir() {
        path
    } else {
        path.parent().unwrap_or(Path::new("."))
    };
    let cfg = dir.join("config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg)
        .with_context(|| format!("cannot read '{}'", cfg.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("'{}' is not JSON", cfg.display()))?;
    Ok(v.get("norm_num_groups")
        .and_then(|g| g.as_u64())
        .map(|g| g as usize))
}

/// Maps a diffusers parameter name (under `encoder.`/`decoder.`) to the checkpoint's layout.
fn original_name(cfg: &VaeConfig, name: &str) -> String {
    if cfg.layout == VaeLayout::Diffusers {
        return format!("{}{name}", cfg.prefix);
    }
    let n = cfg.block_out_channels.len();
    let parts: Vec<&str> = name.split('.').collect();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < parts.len() {
        let p = parts[i];
        match p {
            "down_blocks" => {
                out.push(format!("down.{}", parts[i + 1]));
                i += 2;
                continue;
            }
            "up_blocks" => {
                let k: usize = parts[i + 1].parse().unwrap_or(0);
                out.push(format!("up.{}", n - 1 - k));
                i += 2;
                continue;
            }
            "resnets" if parts.get(i - 1) == Some(&"mid_block") => {
                let j: usize = parts[i + 1].parse().unwrap_or(0);
                out.pop();
                out.push(format!("mid.block_{}", j + 1));
                i += 2;
                continue;
            }
            "attentions" => {
                out.pop();
                out.push("mid.attn_1".into());
                i += 2;
                continue;
            }
            "resnets" => {
                out.push(format!("block.{}", parts[i + 1]));
                i += 2;
                continue;
            }
            "downsamplers" => {
                out.push("downsample".into());
                i += 2;
                continue;
            }
            "upsamplers" => {
                out.push("upsample".into());
                i += 2;
                continue;
            }
            "conv_shortcut" => out.push("nin_shortcut".into()),
            "conv_norm_out" => out.push("norm_out".into()),
            "group_norm" => out.push("norm".into()),
            "to_q" => out.push("q".into()),
            "to_k" => out.push("k".into()),
            "to_v" => out.push("v".into()),
            "to_out" => {
                out.push("proj_out".into());
                i += 2;
                continue;
            }
            other => out.push(other.into()),
        }
        i += 1;
    }
    format!("{}{}", cfg.prefix, out.join("."))
}

struct Emitter<'a> {
    o: Ops,
    cfg: &'a VaeConfig,
    ck: &'a Checkpoint,
}

const EPS: f32 = 1e-6;

impl Emitter<'_> {
    fn t(&self, name: &str) -> Result<Tensor> {
        self.ck.get(&original_name(self.cfg, name))
    }

    fn has(&self, name: &str) -> bool {
        self.ck.contains(&original_name(self.cfg, name))
    }

    fn conv(&mut self, name: &str, x: &Value, stride: usize, pads: [usize; 4]) -> Result<Value> {
        let w = self.t(&format!("{name}.weight"))?;
        let b = self.t(&format!("{name}.bias"))?;
        self.o.conv2d(
            &original_name(self.cfg, name),
            x,
            &w,
            Some(&b),
            stride,
            pads,
        )
    }

    fn norm(&mut self, name: &str, x: &Value) -> Result<Value> {
        let w = self.t(&format!("{name}.weight"))?;
        let b = self.t(&format!("{name}.bias"))?;
        let g = self.cfg.norm_num_groups;
        self.o
            .group_norm(&original_name(self.cfg, name), x, g, &w, &b, EPS)
    }

    fn norm_silu(&mut self, name: &str, x: &Value) -> Result<Value> {
        let h = self.norm(name, x)?;
        self.o.silu(&format!("{name}/act"), &h)
    }

    fn resnet(&mut self, name: &str, x: &Value) -> Result<Value> {
        let h = self.norm_silu(&format!("{name}.norm1"), x)?;
        let h = self.conv(&format!("{name}.conv1"), &h, 1, [1; 4])?;
        let h = self.norm_silu(&format!("{name}.norm2"), &h)?;
        let h = self.conv(&format!("{name}.conv2"), &h, 1, [1; 4])?;
        let s = if self.has(&format!("{name}.conv_shortcut.weight")) {
            self.conv(&format!("{name}.conv_shortcut"), x, 1, [0; 4])?
        } else {
            x.clone()
        };
        let mut y = self
            .o
            .same("Add", &format!("{name}/residual"), &[&s, &h], vec![])?;
        y.shape = h.shape.clone();
        Ok(y)
    }

    /// Single-head self-attention over the h*w positions (the mid block's).
    fn attention(&mut self, name: &str, x: &Value, c: usize) -> Result<Value> {
        let h = self.norm(&format!("{name}.group_norm"), x)?;
        let s = self.o.i64s(&format!("{name}.flat"), &[0, c as i64, -1])?;
        let f = self
            .o
            .same("Reshape", &format!("{name}/flat"), &[&h, &s], vec![])?;
        let mut f = self.o.same(
            "Transpose",
            &format!("{name}/tokens"),
            &[&f],
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
        )?;
        f.shape = vec![
            Dim::Sym("batch".into()),
            Dim::Sym("hw".into()),
            Dim::Fixed(c as i64),
        ];
        let proj = |e: &mut Self, p: &str, x: &Value| -> Result<Value> {
            let mut w = e.t(&format!("{name}.{p}.weight"))?;
            // The original layout stores these as 1x1 convs [C, C, 1, 1]: same bytes as [C, C].
            w.shape.truncate(2);
            let b = e.t(&format!("{name}.{p}.bias"))?;
            e.o.linear(
                &original_name(e.cfg, &format!("{name}.{p}")),
                x,
                &w,
                Some(&b),
            )
        };
        let q = proj(self, "to_q", &f)?;
        let k = proj(self, "to_k", &f)?;
        let v = proj(self, "to_v", &f)?;
        let kt = self.o.same(
            "Transpose",
            &format!("{name}/k_t"),
            &[&k],
            vec![("perm", Attr::Ints(vec![0, 2, 1]))],
        )?;
        let sc = self
            .o
            .same("MatMul", &format!("{name}/qk"), &[&q, &kt], vec![])?;
        let scale = self
            .o
            .constant(&format!("{name}.scale"), &[], &[1.0 / (c as f32).sqrt()])?;
        let sc = self
            .o
            .same("Mul", &format!("{name}/scaled"), &[&sc, &scale], vec![])?;
        let p = self.o.same(
            "Softmax",
            &format!("{name}/softmax"),
            &[&sc],
            vec![("axis", Attr::Int(-1))],
        )?;
        let mut a = self
            .o
            .same("MatMul", &format!("{name}/pv"), &[&p, &v], vec![])?;
        a.shape = f.shape.clone();
        let a = proj(self, "to_out.0", &a)?;
        let a = self.o.same(
            "Transpose",
            &format!("{name}/chw"),
            &[&a],
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
        let a = self
            .o
            .same("Reshape", &format!("{name}/unflat"), &[&a, &shp], vec![])?;
        let mut y = self
            .o
            .same("Add", &format!("{name}/residual"), &[x, &a], vec![])?;
        y.shape = x.shape.clone();
        Ok(y)
    }

    fn mid(&mut self, side: &str, x: &Value, c: usize) -> Result<Value> {
        let x = self.resnet(&format!("{side}.mid_block.resnets.0"), x)?;
        let x = self.attention(&format!("{side}.mid_block.attentions.0"), &x, c)?;
        self.resnet(&format!("{side}.mid_block.resnets.1"), &x)
    }

    fn decoder(&mut self, z: &Value) -> Result<Value> {
        let cfg = self.cfg;
        let n = cfg.block_out_channels.len();
        let mut x = z.clone();
        if cfg.quant_conv {
            x = self.conv("post_quant_conv", &x, 1, [0; 4])?;
        }
        let top = *cfg.block_out_channels.last().expect("levels");
        x = self.conv("decoder.conv_in", &x, 1, [1; 4])?;
        x = self.mid("decoder", &x, top)?;
        for i in 0..n {
            for j in 0..=cfg.layers_per_block {
                x = self.resnet(&format!("decoder.up_blocks.{i}.resnets.{j}"), &x)?;
            }
            if i + 1 < n {
                let scales = self.o.constant_f32(
                    &format!("decoder.up{i}.scales"),
                    &[4],
                    &[1.0, 1.0, 2.0, 2.0],
                )?;
                let roi = Value {
                    name: String::new(),
                    dtype: DataType::FLOAT,
                    shape: vec![],
                };
                x = self.o.same(
                    "Resize",
                    &format!("decoder.up{i}/nearest"),
                    &[&x, &roi, &scales],
                    vec![
                        ("mode", Attr::Str("nearest".into())),
                        (
                            "coordinate_transformation_mode",
                            Attr::Str("asymmetric".into()),
                        ),
                        ("nearest_mode", Attr::Str("floor".into())),
                    ],
                )?;
                x = self.conv(
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    &x,
                    1,
                    [1; 4],
                )?;
            }
        }
        let x = self.norm_silu("decoder.conv_norm_out", &x)?;
        self.conv("decoder.conv_out", &x, 1, [1; 4])
    }

    fn encoder(&mut self, img: &Value) -> Result<Value> {
        let cfg = self.cfg;
        let n = cfg.block_out_channels.len();
        let mut x = self.conv("encoder.conv_in", img, 1, [1; 4])?;
        for i in 0..n {
            for j in 0..cfg.layers_per_block {
                x = self.resnet(&format!("encoder.down_blocks.{i}.resnets.{j}"), &x)?;
            }
            if i + 1 < n {
                // diffusers/LDM pad right and bottom by one, then a stride-2 conv without padding.
                x = self.conv(
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    &x,
                    2,
                    [0, 0, 1, 1],
                )?;
            }
        }
        let top = *cfg.block_out_channels.last().expect("levels");
        x = self.mid("encoder", &x, top)?;
        let x = self.norm_silu("encoder.conv_norm_out", &x)?;
        let mut m = self.conv("encoder.conv_out", &x, 1, [1; 4])?;
        if cfg.quant_conv {
            m = self.conv("quant_conv", &m, 1, [0; 4])?;
        }
        Ok(m)
    }
}

fn nchw(c: usize, h: &str, w: &str) -> Vec<Dim> {
    vec![
        Dim::Sym("batch".into()),
        Dim::Fixed(c as i64),
        Dim::Sym(h.into()),
        Dim::Sym(w.into()),
    ]
}

/// Which half of the autoencoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VaePart {
    Decoder,
    Encoder,
}

/// The decoder or encoder graph; `dtype` is the compute type (FLOAT, FLOAT16 or BFLOAT16; Flux's VAE overflows
/// in float16 at large sizes: prefer bf16 or f32). Inputs and outputs are float32.
pub fn graph(
    cfg: &VaeConfig,
    ck: &Checkpoint,
    part: VaePart,
    dtype: DataType,
) -> Result<ModelProto> {
    let mut e = Emitter {
        o: Ops::new("vae", 18, dtype),
        cfg,
        ck,
    };
    let f32t = DataType::FLOAT;
    match part {
        VaePart::Decoder => {
            let z = e.o.g.input(
                "latent",
                f32t,
                nchw(cfg.latent_channels, "latent_height", "latent_width"),
            )?;
            let z = e.o.cast("latent/cast", &z, dtype)?;
            let y = e.decoder(&z)?;
            let y = e.o.cast("image/f32", &y, f32t)?;
            let y = e.o.g.op(
                "Identity",
                "image",
                &[&y],
                vec![],
                f32t,
                nchw(3, "height", "width"),
            )?;
            e.o.g.output(&y);
        }
        VaePart::Encoder => {
            let x = e.o.g.input("image", f32t, nchw(3, "height", "width"))?;
            let x = e.o.cast("image/cast", &x, dtype)?;
            let m = e.encoder(&x)?;
            let m = e.o.cast("moments/f32", &m, f32t)?;
            let c = cfg.latent_channels;
            let sizes = e.o.i64s("moments.sizes", &[c as i64, c as i64])?;
            let shape = nchw(c, "latent_height", "latent_width");
            let parts = e.o.g.node(
                "Split",
                "moments",
                &[&m, &sizes],
                vec![("axis", Attr::Int(1))],
                vec![(f32t, shape.clone()), (f32t, shape.clone())],
            )?;
            let mean = e.o.g.op(
                "Identity",
                "mean",
                &[&parts[0]],
                vec![],
                f32t,
                shape.clone(),
            )?;
            let lo = e.o.constant_f32("logvar.min", &[], &[-30.0])?;
            let hi = e.o.constant_f32("logvar.max", &[], &[20.0])?;
            let lv = e.o.g.op(
                "Clip",
                "logvar",
                &[&parts[1], &lo, &hi],
                vec![],
                f32t,
                shape,
            )?;
            e.o.g.output(&mean);
            e.o.g.output(&lv);
        }
    }
    Ok(e.o.g.finish())
}

/// Exports the VAE decoder and encoder of `checkpoint` (a file or a diffusers `vae/` folder) to
/// `out_dir/vae_decoder.onnx` and `out_dir/vae_encoder.onnx` in `dtype`. Returns (decoder, encoder) paths.
pub fn export_file(
    checkpoint: &Path,
    dtype: DataType,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let ck = Checkpoint::open(checkpoint)?;
    let cfg = VaeConfig::from_checkpoint(&ck)?;
    export(&cfg, &ck, dtype, out_dir)
}

/// The decoder and encoder graphs of a config and checkpoint, saved in `out_dir`.
pub fn export(
    cfg: &VaeConfig,
    ck: &Checkpoint,
    dtype: DataType,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create '{}'", out_dir.display()))?;
    let dec = out_dir.join("vae_decoder.onnx");
    let enc = out_dir.join("vae_encoder.onnx");
    save(
        graph(cfg, ck, VaePart::Decoder, dtype)?,
        &dec,
        &SaveOptions::default(),
    )?;
    save(
        graph(cfg, ck, VaePart::Encoder, dtype)?,
        &enc,
        &SaveOptions::default(),
    )?;
    Ok((dec, enc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_names_follow_diffusers_conversion() {
        let cfg = VaeConfig {
            latent_channels: 16,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            quant_conv: false,
            layout: VaeLayout::Original,
            prefix: String::new(),
        };
        for (d, o) in [
            (
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight",
            ),
            (
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
                "encoder.down.0.downsample.conv.bias",
            ),
            (
                "decoder.up_blocks.0.resnets.2.norm1.weight",
                "decoder.up.3.block.2.norm1.weight",
            ),
            (
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
                "decoder.up.1.upsample.conv.weight",
            ),
            (
                "decoder.mid_block.resnets.1.conv2.weight",
                "decoder.mid.block_2.conv2.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_q.weight",
                "encoder.mid.attn_1.q.weight",
            ),
            (
                "encoder.mid_block.attentions.0.to_out.0.bias",
                "encoder.mid.attn_1.proj_out.bias",
            ),
            (
                "decoder.mid_block.attentions.0.group_norm.weight",
                "decoder.mid.attn_1.norm.weight",
            ),
            ("decoder.conv_norm_out.bias", "decoder.norm_out.bias"),
        ] {
            assert_eq!(original_name(&cfg, d), o);
        }
    }
}
