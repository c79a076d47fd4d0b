//! madebyollin's Tiny AutoEncoders (TAESD, TAESDXL, TAESD3, TAEF1, and TAEF2 with its GroupNorm mid-blocks) as
//! ONNX graphs, for fast previews. The checkpoints are `nn.Sequential`s of `taesd.py`, so their keys are layer
//! indices (`3.conv.0.weight`, optionally under `encoder.` / `decoder.`): the layer list is read off the keys, not
//! hard-coded. diffusers' `AutoencoderTiny` layout (`decoder.layers.N`) is not read.
//!
//! - Decoder: input `latent` [batch, C, h, w] (the diffusion model's latent exactly as the sampler holds it,
//!   unpacked to NCHW, with no VAE scaling or shift: TAESD was trained on that space), output `image`
//!   [batch, 3, 8h, 8w], unclamped (clamp to [0, 1] for display).
//! - Encoder: input `image` [batch, 3, H, W] in [0, 1], output `latent` [batch, C, H/8, W/8].
//!
//! Index rules (taesd.py's `Encoder`/`Decoder`): in a decoder, the missing index 0 is the `tanh(x/3)*3` clamp,
//! the missing index 2 a ReLU, every other missing index a 2x nearest upsample; in an encoder a bias-free 3x3 conv
//! has stride 2. A block with `pool.*` weights is the GroupNorm mid-block variant (`x + pool(x)` first).
use super::ops::Ops;
use crate::onnx::{Attr, DataType, Dim, SaveOptions, Value, proto::ModelProto, save};
use crate::weights::safetensors_file::Checkpoint;
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TaeKind {
    Encoder,
    Decoder,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TaeLayer {
    Clamp,
    Relu,
    Upsample,
    Conv {
        index: usize,
        stride: usize,
        bias: bool,
    },
    Block {
        index: usize,
        skip: bool,
        pool: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TaesdConfig {
    pub kind: TaeKind,
    pub latent_channels: usize,
    /// Key prefix in the checkpoint ("" or "encoder." / "decoder.").
    pub prefix: String,
    pub layers: Vec<TaeLayer>,
}

impl TaesdConfig {
    /// Reads the layer list of the encoder or decoder in `ck` off its keys.
    pub fn from_checkpoint(ck: &Checkpoint, kind: TaeKind) -> Result<Self> {
        let want = match kind {
            TaeKind::Encoder => "encoder.",
            TaeKind::Decoder => "decoder.",
        };
        let prefix = if ck.names().any(|k| k.starts_with(want)) {
            want.to_string()
        } else {
            String::new()
        };
        let mut by_index: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for k in ck.names() {
            let Some(rest) = k.strip_prefix(&prefix) else {
                continue;
            };
            let (i, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let Ok(i) = i.parse::<usize>() else {
                bail!(
                    "'{}': key '{k}' is not an nn.Sequential index; trt-diff reads taesd.py's encoder/decoder \
                     checkpoints (e.g. taef1_decoder.safetensors), not diffusers' AutoencoderTiny",
                    ck.path.display()
                );
            };
            by_index.entry(i).or_default().push(tail.to_string());
        }
        let Some(&last) = by_index.keys().last() else {
            bail!("'{}' holds no TAESD layers", ck.path.display());
        };
        let mut layers = Vec::new();
        for i in 0..=last {
            let keys = by_index.get(&i);
            let has = |t: &str| keys.is_some_and(|k| k.iter().any(|x| x == t));
            let layer = match keys {
                None => match (kind, i) {
                    (TaeKind::Decoder, 0) => TaeLayer::Clamp,
                    (TaeKind::Decoder, 2) => TaeLayer::Relu,
                    (TaeKind::Decoder, _) => TaeLayer::Upsample,
                    (TaeKind::Encoder, _) => bail!(
                        "'{}': encoder layer {i} has no weights; is this a decoder checkpoint?",
                        ck.path.display()
                    ),
                },
                Some(_) if has("conv.0.weight") => TaeLayer::Block {
                    index: i,
                    skip: has("skip.weight"),
                    pool: has("pool.0.weight"),
                },
                Some(_) if has("weight") => TaeLayer::Conv {
                    index: i,
                    stride: if kind == TaeKind::Encoder && !has("bias") {
                        2
                    } else {
                        1
                    },
                    bias: has("bias"),
                },
                Some(k) => bail!(
                    "'{}': layer {i} has keys {k:?}, which are neither a conv nor a TAESD block",
                    ck.path.display()
                ),
            };
            layers.push(layer);
        }
        // Latent channels: the decoder's first conv input, the encoder's last conv output.
        let conv_shape = |idx: usize| {
            ck.shape(&format!("{prefix}{idx}.weight"))
                .map(|s| s.to_vec())
        };
        let latent_channels = match kind {
            TaeKind::Decoder => layers.iter().find_map(|l| match l {
                TaeLayer::Conv { index, .. } => conv_shape(*index).map(|s| s[1]),
                _ => None,
            }),
            TaeKind::Encoder => layers.iter().rev().find_map(|l| match l {
                TaeLayer::Conv { index, .. } => conv_shape(*index).map(|s| s[0]),
                _ => None,
            }),
        }
        .with_context(|| format!("'{}' has no conv layer", ck.path.display()))?;
        Ok(TaesdConfig {
            kind,
            latent_channels,
            prefix,
            layers,
        })
    }
}

fn nchw(c: i64) -> Vec<Dim> {
    vec![
        Dim::Sym("batch".into()),
        Dim::Fixed(c),
        Dim::Sym("height".into()),
        Dim::Sym("width".into()),
    ]
}

/// The graph, in float32 (`dtype` FLOAT) or float16 (FLOAT16; inputs and outputs then float16 too).
pub fn graph(cfg: &TaesdConfig, ck: &Checkpoint, dtype: DataType) -> Result<ModelProto> {
    let mut o = Ops::new("taesd", 18, dtype);
    let t = |n: String| ck.get(&format!("{}{n}", cfg.prefix));
    let (inp, out, in_c, out_c) = match cfg.kind {
        TaeKind::Decoder => ("latent", "image", cfg.latent_channels as i64, 3),
        TaeKind::Encoder => ("image", "latent", 3, cfg.latent_channels as i64),
    };
    let mut x = o.g.input(inp, dtype, nchw(in_c))?;
    for (li, layer) in cfg.layers.iter().enumerate() {
        x = match layer {
            TaeLayer::Clamp => {
                let third = o.constant("clamp.third", &[], &[1.0 / 3.0])?;
                let three = o.constant("clamp.three", &[], &[3.0])?;
                let y = o.same("Mul", "clamp/div3", &[&x, &third], vec![])?;
                let y = o.same("Tanh", "clamp/tanh", &[&y], vec![])?;
                o.same("Mul", "clamp/mul3", &[&y, &three], vec![])?
            }
            TaeLayer::Relu => o.same("Relu", &format!("{li}/relu"), &[&x], vec![])?,
            TaeLayer::Upsample => {
                let scales =
                    o.constant_f32(&format!("{li}.scales"), &[4], &[1.0, 1.0, 2.0, 2.0])?;
                let roi = Value {
                    name: String::new(),
                    dtype: DataType::FLOAT,
                    shape: vec![],
                };
                o.same(
                    "Resize",
                    &format!("{li}/upsample"),
                    &[&x, &roi, &scales],
                    vec![
                        ("mode", Attr::Str("nearest".into())),
                        (
                            "coordinate_transformation_mode",
                            Attr::Str("asymmetric".into()),
                        ),
                        ("nearest_mode", Attr::Str("floor".into())),
                    ],
                )?
            }
            TaeLayer::Conv {
                index,
                stride,
                bias,
            } => {
                let w = t(format!("{index}.weight"))?;
                let b = if *bias {
                    Some(t(format!("{index}.bias"))?)
                } else {
                    None
                };
                let p = w.shape[2] / 2;
                o.conv2d(
                    &format!("{}{index}", cfg.prefix),
                    &x,
                    &w,
                    b.as_ref(),
                    *stride,
                    [p; 4],
                )?
            }
            TaeLayer::Block { index, skip, pool } => {
                let name = format!("{}{index}", cfg.prefix);
                let mut h = x.clone();
                if *pool {
                    // x + Conv1x1 -> GroupNorm(4) -> ReLU -> Conv1x1 (taef2's mid-blocks).
                    let w0 = t(format!("{index}.pool.0.weight"))?;
                    let p = o.conv2d(&format!("{name}.pool.0"), &h, &w0, None, 1, [0; 4])?;
                    let gw = t(format!("{index}.pool.1.weight"))?;
                    let gb = t(format!("{index}.pool.1.bias"))?;
                    let p = o.group_norm(&format!("{name}.pool.1"), &p, 4, &gw, &gb, 1e-5)?;
                    let p = o.same("Relu", &format!("{name}.pool/relu"), &[&p], vec![])?;
                    let w3 = t(format!("{index}.pool.3.weight"))?;
                    let p = o.conv2d(&format!("{name}.pool.3"), &p, &w3, None, 1, [0; 4])?;
                    h = o.same("Add", &format!("{name}/pool_add"), &[&h, &p], vec![])?;
                }
                let mut c = h.clone();
                for (j, k) in [0, 2, 4].into_iter().enumerate() {
                    let w = t(format!("{index}.conv.{k}.weight"))?;
                    let b = t(format!("{index}.conv.{k}.bias"))?;
                    c = o.conv2d(&format!("{name}.conv.{k}"), &c, &w, Some(&b), 1, [1; 4])?;
                    if j < 2 {
                        c = o.same("Relu", &format!("{name}.conv/relu{j}"), &[&c], vec![])?;
                    }
                }
                let s = if *skip {
                    let w = t(format!("{index}.skip.weight"))?;
                    o.conv2d(&format!("{name}.skip"), &h, &w, None, 1, [0; 4])?
                } else {
                    h
                };
                let y = o.same("Add", &format!("{name}/fuse_add"), &[&c, &s], vec![])?;
                o.same("Relu", &format!("{name}/fuse"), &[&y], vec![])?
            }
        };
    }
    let y = o.op("Identity", out, &[&x], vec![], nchw(out_c))?;
    o.g.output(&y);
    Ok(o.g.finish())
}

/// Exports the encoder or decoder of `checkpoint` to `out_dir/taesd_{encoder,decoder}.onnx` (float32 I/O).
/// Returns the .onnx path.
pub fn export_file(checkpoint: &Path, kind: TaeKind, out_dir: &Path) -> Result<PathBuf> {
    let ck = Checkpoint::open(checkpoint)?;
    let cfg = TaesdConfig::from_checkpoint(&ck, kind)?;
    let m = graph(&cfg, &ck, DataType::FLOAT)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create '{}'", out_dir.display()))?;
    let out = out_dir.join(match kind {
        TaeKind::Encoder => "taesd_encoder.onnx",
        TaeKind::Decoder => "taesd_decoder.onnx",
    });
    save(m, &out, &SaveOptions::default())?;
    Ok(out)
}
