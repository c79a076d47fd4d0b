//! Where LoRA modules land on the Stable Diffusion UNet (SD1.x, SD2.x, SDXL): the module names LoRAs use and the
//! UNet's tensors, in either checkpoint layout.
//!
//! LoRA files name UNet modules in two ways: diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`:
//! diffusers/PEFT files, and kohya's SD1.x LoRAs with '_' for '.') and the original CompVis/SGM one
//! (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`: kohya's SDXL LoRAs, ComfyUI's `diffusion_model.*`). A
//! model's tensors are in one of the two (a diffusers `unet/` folder or a single-file checkpoint). The book gives
//! every weight both names. The renames are the tables below; block indices follow diffusers'
//! `convert_ldm_unet_checkpoint` (down block i, layer j is input block `1 + i (layers + 1) + j`).
use crate::weights::lora::{AddressBook, Piece};
use anyhow::{Result, bail};
use std::collections::BTreeMap;

/// Whole modules renamed (diffusers, original).
const TOP: &[(&str, &str)] = &[
    ("time_embedding.linear_1", "time_embed.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("conv_in", "input_blocks.0.0"),
    ("conv_norm_out", "out.0"),
    ("conv_out", "out.2"),
];

/// The mid block's three parts (diffusers, original); the two ResNets' inner names follow [`RESNET`].
const MID: &[(&str, &str)] = &[
    ("mid_block.resnets.0", "middle_block.0"),
    ("mid_block.attentions.0", "middle_block.1"),
    ("mid_block.resnets.1", "middle_block.2"),
];

/// Inside a ResNet (diffusers, original).
const RESNET: &[(&str, &str)] = &[
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("time_emb_proj", "emb_layers.1"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("conv_shortcut", "skip_connection"),
];

/// `rest` (a module path inside a ResNet) renamed by `table` from column `from` to the other one.
fn rename(rest: &str, table: &[(&str, &str)], to_original: bool) -> String {
    for (d, o) in table {
        let (src, dst) = if to_original { (d, o) } else { (o, d) };
        if rest == *src {
            return dst.to_string();
        }
        if let Some(tail) = rest.strip_prefix(src).and_then(|t| t.strip_prefix('.')) {
            return format!("{dst}.{tail}");
        }
    }
    rest.to_string()
}

/// What the book needs of the UNet's structure, read off its tensor names.
struct Layout {
    /// ResNets per down block.
    layers: usize,
    /// Up blocks (diffusers order) with attention: their upsampler is the block's third module, else its second.
    up_attention: Vec<bool>,
}

/// diffusers module name -> original name.
fn to_original(name: &str, lay: &Layout) -> Option<String> {
    for (d, o) in TOP {
        if name == *d {
            return Some(o.to_string());
        }
    }
    for (d, o) in MID {
        if let Some(rest) = name.strip_prefix(d).and_then(|r| r.strip_prefix('.')) {
            return Some(format!("{o}.{}", rename(rest, RESNET, true)));
        }
    }
    let l = lay.layers;
    let p: Vec<&str> = name.splitn(5, '.').collect();
    let num = |i: usize| p.get(i).and_then(|s| s.parse::<usize>().ok());
    let rest = p.get(4).copied().unwrap_or("");
    let (i, kind, j) = (num(1)?, *p.get(2)?, num(3)?);
    Some(match (p[0], kind) {
        ("down_blocks", "resnets") => format!(
            "input_blocks.{}.0.{}",
            1 + i * (l + 1) + j,
            rename(rest, RESNET, true)
        ),
        ("down_blocks", "attentions") => format!("input_blocks.{}.1.{rest}", 1 + i * (l + 1) + j),
        ("down_blocks", "downsamplers") if rest == "conv" => {
            format!("input_blocks.{}.0.op", (i + 1) * (l + 1))
        }
        ("up_blocks", "resnets") => format!(
            "output_blocks.{}.0.{}",
            i * (l + 1) + j,
            rename(rest, RESNET, true)
        ),
        ("up_blocks", "attentions") => format!("output_blocks.{}.1.{rest}", i * (l + 1) + j),
        ("up_blocks", "upsamplers") if rest == "conv" => {
            let slot = if lay.up_attention.get(i).copied().unwrap_or(false) {
                2
            } else {
                1
            };
            format!("output_blocks.{}.{slot}.conv", i * (l + 1) + l)
        }
        _ => return None,
    })
}

/// Original module name -> diffusers name.
fn to_diffusers(name: &str, lay: &Layout) -> Option<String> {
    for (d, o) in TOP {
        if name == *o {
            return Some(d.to_string());
        }
    }
    for (d, o) in MID {
        if let Some(rest) = name.strip_prefix(o).and_then(|r| r.strip_prefix('.')) {
            return Some(format!("{d}.{}", rename(rest, RESNET, false)));
        }
    }
    let l1 = lay.layers + 1;
    let p: Vec<&str> = name.splitn(4, '.').collect();
    let num = |i: usize| p.get(i).and_then(|s| s.parse::<usize>().ok());
    let (n, slot) = (num(1)?, num(2)?);
    let rest = p.get(3).copied().unwrap_or("");
    Some(match (p[0], slot) {
        ("input_blocks", 0) if n > 0 && rest == "op" => {
            format!("down_blocks.{}.downsamplers.0.conv", n / l1 - 1)
        }
        ("input_blocks", 0) if n > 0 => format!(
            "down_blocks.{}.resnets.{}.{}",
            (n - 1) / l1,
            (n - 1) % l1,
            rename(rest, RESNET, false)
        ),
        ("input_blocks", 1) if n > 0 => {
            format!(
                "down_blocks.{}.attentions.{}.{rest}",
                (n - 1) / l1,
                (n - 1) % l1
            )
        }
        ("output_blocks", 0) => format!(
            "up_blocks.{}.resnets.{}.{}",
            n / l1,
            n % l1,
            rename(rest, RESNET, false)
        ),
        // An attention's modules are never named `conv`: slot 1 holding `conv` is a block without attention's
        // upsampler.
        ("output_blocks", 1 | 2) if rest == "conv" => {
            format!("up_blocks.{}.upsamplers.0.conv", n / l1)
        }
        ("output_blocks", 1) => format!("up_blocks.{}.attentions.{}.{rest}", n / l1, n % l1),
        _ => return None,
    })
}

/// The UNet's address book from its tensor names and shapes (a checkpoint's or an exported graph's: the graph keeps
/// the checkpoint's names): every linear and convolution weight under its diffusers and its original module name.
/// A 1x1 `proj_in` stored as [out, in, 1, 1] or [out, in] takes either form of delta.
pub fn address_book(shapes: &BTreeMap<String, Vec<usize>>) -> Result<AddressBook> {
    let found = |suffix: &str| {
        shapes.keys().find_map(|k| {
            k.strip_suffix(suffix)
                .filter(|p| p.is_empty() || p.ends_with('.'))
                .map(|p| p.to_string())
        })
    };
    let (original, prefix) = match (
        found("time_embedding.linear_1.weight"),
        found("time_embed.0.weight"),
    ) {
        (Some(p), _) => (false, p),
        (None, Some(p)) => (true, p),
        (None, None) => bail!(
            "the denoiser's weights are not a Stable Diffusion UNet's (no time_embedding.linear_1 or time_embed.0)"
        ),
    };
    let has = |n: &str| shapes.contains_key(&format!("{prefix}{n}"));
    let layers = if original {
        (1..64)
            .find(|k| has(&format!("input_blocks.{k}.0.op.weight")))
            .map(|k| k - 1)
    } else {
        (0..64).find(|j| !has(&format!("down_blocks.0.resnets.{j}.conv1.weight")))
    }
    .filter(|l| *l > 0);
    let Some(layers) = layers else {
        bail!(
            "the UNet's weights have no down-block ResNets and downsampler the LoRA table can place"
        );
    };
    // Up blocks with attention, from whichever names the weights use.
    let up_attention = (0..16)
        .map(|i| {
            if original {
                has(&format!("output_blocks.{}.1.norm.weight", i * (layers + 1)))
            } else {
                has(&format!("up_blocks.{i}.attentions.0.norm.weight"))
            }
        })
        .collect();
    let lay = Layout {
        layers,
        up_attention,
    };
    let mut book = AddressBook::default();
    for (name, shape) in shapes {
        let Some(module) = name
            .strip_prefix(&prefix)
            .and_then(|n| n.strip_suffix(".weight"))
        else {
            continue;
        };
        if !matches!(shape.len(), 2 | 4) {
            continue;
        }
        let (diffusers, orig) = if original {
            (to_diffusers(module, &lay), Some(module.to_string()))
        } else {
            (Some(module.to_string()), to_original(module, &lay))
        };
        let piece = Piece {
            tensor: name.clone(),
            dst_row: 0,
            src_rows: 0..shape[0],
        };
        for alias in [diffusers, orig].into_iter().flatten() {
            book.add(&alias, vec![piece.clone()]);
        }
    }
    Ok(book)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lay() -> Layout {
        Layout {
            layers: 2,
            up_attention: vec![true, true, false],
        }
    }

    #[test]
    fn names_round_trip_between_layouts() {
        for (d, o) in [
            (
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
            ),
            (
                "down_blocks.0.resnets.1.conv1",
                "input_blocks.2.0.in_layers.2",
            ),
            ("down_blocks.1.downsamplers.0.conv", "input_blocks.6.0.op"),
            (
                "mid_block.resnets.1.time_emb_proj",
                "middle_block.2.emb_layers.1",
            ),
            ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
            (
                "up_blocks.0.resnets.2.conv_shortcut",
                "output_blocks.2.0.skip_connection",
            ),
            ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
            ("up_blocks.2.upsamplers.0.conv", "output_blocks.8.1.conv"),
            (
                "up_blocks.1.attentions.2.proj_out",
                "output_blocks.5.1.proj_out",
            ),
            ("add_embedding.linear_2", "label_emb.0.2"),
            ("conv_in", "input_blocks.0.0"),
        ] {
            assert_eq!(to_original(d, &lay()).as_deref(), Some(o), "{d}");
            assert_eq!(to_diffusers(o, &lay()).as_deref(), Some(d), "{o}");
        }
    }
}
