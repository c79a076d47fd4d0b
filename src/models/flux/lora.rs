//! Where LoRA modules land in a Flux transformer, for either checkpoint layout: the table of BFL names and the
//! diffusers layers they hold (fused q/k/v and single-block linear1 as row ranges; the final AdaLN's halves
//! swapped), read the same way whichever naming the LoRA and the model use. The same table serves checkpoints
//! (build-time merge) and the initializers of an exported graph (run-time merge, refit), which keep the
//! checkpoint's names.
use crate::weights::lora::{AddressBook, Piece};
use anyhow::{Result, bail};
use std::collections::BTreeMap;

/// Row widths in units of the hidden size `D` or the MLP width `M`.
#[derive(Clone, Copy)]
enum W {
    D,
    M,
}

/// One-to-one layers: (BFL name, diffusers name), `{i}` the block index.
const GLOBAL: &[(&str, &str)] = &[
    ("img_in", "x_embedder"),
    ("txt_in", "context_embedder"),
    (
        "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_1",
    ),
    (
        "time_in.out_layer",
        "time_text_embed.timestep_embedder.linear_2",
    ),
    (
        "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_1",
    ),
    (
        "vector_in.out_layer",
        "time_text_embed.text_embedder.linear_2",
    ),
    (
        "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_1",
    ),
    (
        "guidance_in.out_layer",
        "time_text_embed.guidance_embedder.linear_2",
    ),
    ("final_layer.linear", "proj_out"),
];
const DOUBLE: &[(&str, &str)] = &[
    ("img_mod.lin", "norm1.linear"),
    ("txt_mod.lin", "norm1_context.linear"),
    ("img_attn.proj", "attn.to_out.0"),
    ("txt_attn.proj", "attn.to_add_out"),
    ("img_mlp.0", "ff.net.0.proj"),
    ("img_mlp.2", "ff.net.2"),
    ("txt_mlp.0", "ff_context.net.0.proj"),
    ("txt_mlp.2", "ff_context.net.2"),
];
const SINGLE: &[(&str, &str)] = &[("linear2", "proj_out"), ("modulation.lin", "norm.linear")];

/// Fused BFL layers: the diffusers layers in BFL row order.
const DOUBLE_FUSED: &[(&str, &[(&str, W)])] = &[
    (
        "img_attn.qkv",
        &[
            ("attn.to_q", W::D),
            ("attn.to_k", W::D),
            ("attn.to_v", W::D),
        ],
    ),
    (
        "txt_attn.qkv",
        &[
            ("attn.add_q_proj", W::D),
            ("attn.add_k_proj", W::D),
            ("attn.add_v_proj", W::D),
        ],
    ),
];
const SINGLE_FUSED: &[(&str, &[(&str, W)])] = &[(
    "linear1",
    &[
        ("attn.to_q", W::D),
        ("attn.to_k", W::D),
        ("attn.to_v", W::D),
        ("proj_mlp", W::M),
    ],
)];

/// A stretch of rows that one diffusers layer and one BFL layer share.
struct Segment {
    diffusers: String,
    diffusers_rows: std::ops::Range<usize>,
    bfl: String,
    bfl_rows: std::ops::Range<usize>,
}

/// The address book of a Flux transformer whose weights are `shapes` (tensor name -> shape: a checkpoint's or an
/// exported graph's initializers, BFL or diffusers names, under any prefix such as ComfyUI's
/// `model.diffusion_model.`). LoRA modules in BFL names (kohya `lora_unet_*`, ComfyUI `diffusion_model.*`) and in
/// diffusers names (PEFT `transformer.*`, `lora_transformer_*`) both land on it.
pub fn address_book(shapes: &BTreeMap<String, Vec<usize>>) -> Result<AddressBook> {
    let found = |suffix: &str| {
        shapes.keys().find_map(|k| {
            k.strip_suffix(suffix)
                .filter(|p| p.is_empty() || p.ends_with('.'))
                .map(|p| p.to_string())
        })
    };
    let (bfl_layout, prefix) = match (found("img_in.weight"), found("x_embedder.weight")) {
        (Some(p), _) => (true, p),
        (None, Some(p)) => (false, p),
        (None, None) => bail!(
            "the weights are not a Flux transformer's (neither img_in nor x_embedder): LoRA needs the transformer"
        ),
    };
    let shape = |name: &str| shapes.get(&format!("{prefix}{name}.weight"));
    let hidden = shape(if bfl_layout { "img_in" } else { "x_embedder" })
        .and_then(|s| s.first().copied())
        .unwrap_or(0);
    let count = |blocks: &str| {
        let pre = format!("{prefix}{blocks}.");
        shapes
            .keys()
            .filter_map(|k| {
                k.strip_prefix(&pre)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1)
    };
    let (double, single) = if bfl_layout {
        (count("double_blocks"), count("single_blocks"))
    } else {
        (
            count("transformer_blocks"),
            count("single_transformer_blocks"),
        )
    };
    let mlp = if bfl_layout {
        shape("single_blocks.0.linear1")
            .map(|s| s[0].saturating_sub(3 * hidden))
            .or_else(|| shape("double_blocks.0.img_mlp.0").map(|s| s[0]))
    } else {
        shape("single_transformer_blocks.0.proj_mlp")
            .or_else(|| shape("transformer_blocks.0.ff.net.0.proj"))
            .map(|s| s[0])
    }
    .unwrap_or(0);
    let width = |w: W| match w {
        W::D => hidden,
        W::M => mlp,
    };
    let mut segments = Vec::new();
    let mut one = |bfl: String, diffusers: String, rows: usize| {
        segments.push(Segment {
            diffusers,
            diffusers_rows: 0..rows,
            bfl,
            bfl_rows: 0..rows,
        })
    };
    let out_rows =
        |bfl: &str, diffusers: &str| shape(if bfl_layout { bfl } else { diffusers }).map(|s| s[0]);
    for (b, d) in GLOBAL {
        if let Some(r) = out_rows(b, d) {
            one(b.to_string(), d.to_string(), r);
        }
    }
    for i in 0..double {
        for (b, d) in DOUBLE {
            let (b, d) = (
                format!("double_blocks.{i}.{b}"),
                format!("transformer_blocks.{i}.{d}"),
            );
            if let Some(r) = out_rows(&b, &d) {
                one(b, d, r);
            }
        }
    }
    for i in 0..single {
        for (b, d) in SINGLE {
            let (b, d) = (
                format!("single_blocks.{i}.{b}"),
                format!("single_transformer_blocks.{i}.{d}"),
            );
            if let Some(r) = out_rows(&b, &d) {
                one(b, d, r);
            }
        }
    }
    let mut fused = |bfl: String, parts: &[(String, W)]| {
        let mut row = 0;
        for (d, w) in parts {
            let n = width(*w);
            segments.push(Segment {
                diffusers: d.clone(),
                diffusers_rows: 0..n,
                bfl: bfl.clone(),
                bfl_rows: row..row + n,
            });
            row += n;
        }
    };
    for i in 0..double {
        for (b, parts) in DOUBLE_FUSED {
            let parts: Vec<(String, W)> = parts
                .iter()
                .map(|(d, w)| (format!("transformer_blocks.{i}.{d}"), *w))
                .collect();
            fused(format!("double_blocks.{i}.{b}"), &parts);
        }
    }
    for i in 0..single {
        for (b, parts) in SINGLE_FUSED {
            let parts: Vec<(String, W)> = parts
                .iter()
                .map(|(d, w)| (format!("single_transformer_blocks.{i}.{d}"), *w))
                .collect();
            fused(format!("single_blocks.{i}.{b}"), &parts);
        }
    }
    // BFL's final AdaLN holds (shift, scale), diffusers' norm_out (scale, shift).
    let d = hidden;
    for (drows, brows) in [(d..2 * d, 0..d), (0..d, d..2 * d)] {
        segments.push(Segment {
            diffusers: "norm_out.linear".into(),
            diffusers_rows: drows,
            bfl: "final_layer.adaLN_modulation.1".into(),
            bfl_rows: brows,
        });
    }
    let mut book = AddressBook::default();
    for s in segments {
        let (tensor, dst) = if bfl_layout {
            (&s.bfl, &s.bfl_rows)
        } else {
            (&s.diffusers, &s.diffusers_rows)
        };
        let tensor = format!("{prefix}{tensor}.weight");
        match shapes.get(&tensor) {
            Some(sh) if sh.first().is_some_and(|r| *r >= dst.end) => {}
            _ => continue,
        }
        book.add(
            &s.diffusers,
            vec![Piece {
                tensor: tensor.clone(),
                dst_row: dst.start,
                src_rows: s.diffusers_rows.clone(),
            }],
        );
        book.add(
            &s.bfl,
            vec![Piece {
                tensor,
                dst_row: dst.start,
                src_rows: s.bfl_rows.clone(),
            }],
        );
    }
    Ok(book)
}

/// Modelled cost per denoising step (batch 1, `img` image tokens, `txt` text tokens) of the transformer's
/// quantized GEMMs as `policy` decides them, and of a rank-`rank` LoRA side path beside each of those layers:
/// `(base FLOPs, side-path FLOPs)`, 2 FLOPs per multiply-add. Layers as a BFL checkpoint has them (fused q/k/v
/// and linear1, one side path each), named for the policy as the exporter names them.
pub fn side_path_cost(
    cfg: &super::FluxConfig,
    policy: &crate::quant::policy::Policy,
    img: u64,
    txt: u64,
    rank: u64,
) -> (u64, u64) {
    use crate::quant::policy::LayerKind;
    let (d, m) = (cfg.hidden_size as u64, cfg.mlp_hidden as u64);
    // (policy name, in, out, tokens) of the per-token linears of one block.
    let double = [
        ("attn.to_q", d, 3 * d, img),
        ("attn.to_out.0", d, d, img),
        ("ff.net.0.proj", d, m, img),
        ("ff.net.2", m, d, img),
        ("attn.add_q_proj", d, 3 * d, txt),
        ("attn.to_add_out", d, d, txt),
        ("ff_context.net.0.proj", d, m, txt),
        ("ff_context.net.2", m, d, txt),
    ];
    let single = [
        ("attn.to_q", d, 3 * d + m, img + txt),
        ("proj_out", d + m, d, img + txt),
    ];
    let mut layers = Vec::new();
    for i in 0..cfg.depth {
        for (n, a, b, t) in double {
            layers.push((format!("transformer_blocks.{i}.{n}"), a, b, t));
        }
    }
    for i in 0..cfg.depth_single {
        for (n, a, b, t) in single {
            layers.push((format!("single_transformer_blocks.{i}.{n}"), a, b, t));
        }
    }
    let (mut base, mut side) = (0u64, 0u64);
    for (name, i, o, t) in layers {
        if policy.decide(&name, LayerKind::Linear).is_some() {
            base += 2 * t * i * o;
            side += 2 * t * rank * (i + o);
        }
    }
    (base, side)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::flux::{FluxConfig, bfl_tensor_shapes};

    fn tiny() -> FluxConfig {
        FluxConfig {
            hidden_size: 8,
            num_heads: 2,
            mlp_hidden: 32,
            depth: 1,
            depth_single: 1,
            axes_dim: vec![2, 1, 1],
            ..FluxConfig::dev()
        }
    }

    #[test]
    fn side_path_costs_a_few_percent_at_flux_dev_size() {
        let policy = crate::models::flux::default_policy(crate::quant::LinearPrecision::Nvfp4);
        let (base, side) = side_path_cost(&FluxConfig::dev(), &policy, 4096, 512, 32);
        // 19 double blocks of 4096 + 512 tokens and 38 single blocks of 4608: ~59 TFLOP of quantized GEMMs.
        assert!((58e12..61e12).contains(&(base as f64)), "{base}");
        let ratio = side as f64 / base as f64;
        assert!((0.01..0.03).contains(&ratio), "{ratio}");
    }

    #[test]
    fn bfl_books_put_diffusers_layers_on_fused_rows() {
        let shapes: BTreeMap<String, Vec<usize>> = bfl_tensor_shapes(&tiny())
            .into_iter()
            .map(|(n, s)| (format!("model.diffusion_model.{n}"), s))
            .collect();
        let book = address_book(&shapes).unwrap();
        let p = |tensor: &str, dst_row, src_rows| Piece {
            tensor: format!("model.diffusion_model.{tensor}"),
            dst_row,
            src_rows,
        };
        assert_eq!(
            book.lookup("transformer_blocks.0.attn.to_k").unwrap(),
            &[p("double_blocks.0.img_attn.qkv.weight", 8, 0..8)]
        );
        assert_eq!(
            book.lookup("single_transformer_blocks.0.proj_mlp").unwrap(),
            &[p("single_blocks.0.linear1.weight", 24, 0..32)]
        );
        // A kohya fused module lands whole on its own tensor, in four pieces.
        let l1 = book.lookup("single_blocks_0_linear1").unwrap();
        assert_eq!(l1.len(), 4);
        assert_eq!(l1[3], p("single_blocks.0.linear1.weight", 24, 24..56));
        // diffusers' norm_out (scale, shift) onto BFL's (shift, scale).
        assert_eq!(
            book.lookup("norm_out.linear").unwrap(),
            &[
                p("final_layer.adaLN_modulation.1.weight", 0, 8..16),
                p("final_layer.adaLN_modulation.1.weight", 8, 0..8)
            ]
        );
        assert_eq!(
            book.lookup("time_text_embed.guidance_embedder.linear_2")
                .unwrap(),
            &[p("guidance_in.out_layer.weight", 0, 0..8)]
        );
    }
}
