//! The Flux transformer's architecture and checkpoint layout, read off the tensor names and shapes.
use crate::weights::safetensors_file::Checkpoint;
use anyhow::{Context, Result, bail};
use std::path::Path;

/// Checkpoint naming scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// Black Forest Labs' original names (`flux1-dev.safetensors`).
    Bfl,
    /// diffusers' `FluxTransformer2DModel`.
    Diffusers,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FluxConfig {
    /// Packed latent channels in (64 = 16 latent channels x 2x2 patch).
    pub in_channels: usize,
    pub out_channels: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Double-stream blocks (19 for Flux.1).
    pub depth: usize,
    /// Single-stream blocks (38 for Flux.1).
    pub depth_single: usize,
    /// T5 hidden size (4096).
    pub context_dim: usize,
    /// CLIP pooled size (768).
    pub vec_dim: usize,
    /// MLP hidden size (4 x hidden_size).
    pub mlp_hidden: usize,
    /// RoPE dimensions per position axis; they sum to the head dimension.
    pub axes_dim: Vec<usize>,
    pub theta: f32,
    /// Flux.1-dev's distilled guidance embedding (`guidance` input); false for schnell.
    pub guidance_embed: bool,
}

impl FluxConfig {
    pub fn dev() -> Self {
        FluxConfig {
            in_channels: 64,
            out_channels: 64,
            hidden_size: 3072,
            num_heads: 24,
            depth: 19,
            depth_single: 38,
            context_dim: 4096,
            vec_dim: 768,
            mlp_hidden: 12288,
            axes_dim: vec![16, 56, 56],
            theta: 10000.0,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        FluxConfig {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Parameters of the full model (weights and biases).
    pub fn param_count(&self) -> u64 {
        let d = self.hidden_size as u64;
        let m = self.mlp_hidden as u64;
        let hd = self.head_dim() as u64;
        let lin = |i: u64, o: u64| i * o + o;
        let mlp_emb = |i: u64| lin(i, d) + lin(d, d);
        let double =
            2 * (lin(d, 6 * d) + lin(d, 3 * d) + 2 * hd + lin(d, d) + lin(d, m) + lin(m, d));
        let single = lin(d, 3 * d + m) + lin(d + m, d) + 2 * hd + lin(d, 3 * d);
        lin(self.in_channels as u64, d)
            + lin(self.context_dim as u64, d)
            + mlp_emb(256)
            + mlp_emb(self.vec_dim as u64)
            + if self.guidance_embed { mlp_emb(256) } else { 0 }
            + self.depth as u64 * double
            + self.depth_single as u64 * single
            + lin(d, 2 * d)
            + lin(d, self.out_channels as u64)
    }

    /// Reads the architecture off the tensor shapes of a checkpoint in either layout (block counts, widths,
    /// guidance). RoPE axes are not in the weights: a diffusers `config.json` beside the checkpoint
    /// (`axes_dims_rope`) is read when present, else Flux.1's [16, 56, 56] is used when the head dimension is 128.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<(Self, Layout, String)> {
        Self::from_checkpoint_with_axes(ck, None)
    }

    /// [`FluxConfig::from_checkpoint`] with the RoPE axes given (for checkpoints of other head dimensions).
    pub fn from_checkpoint_with_axes(
        ck: &Checkpoint,
        axes: Option<Vec<usize>>,
    ) -> Result<(Self, Layout, String)> {
        let (layout, prefix) = detect_layout(ck)?;
        let n = Names {
            layout,
            prefix: prefix.clone(),
        };
        let shape = |name: &str| -> Result<Vec<usize>> {
            ck.shape(&n.p(name)).map(|s| s.to_vec()).with_context(|| {
                format!(
                    "checkpoint '{}' has no tensor '{}'",
                    ck.path.display(),
                    n.p(name)
                )
            })
        };
        let count = |pre: &str| {
            let pre = format!("{prefix}{pre}.");
            let mut max = None;
            for k in ck.names() {
                if let Some(rest) = k.strip_prefix(&pre)
                    && let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok())
                {
                    max = Some(max.map_or(i, |m: usize| m.max(i)));
                }
            }
            max.map_or(0, |m| m + 1)
        };
        let (img_in, txt_in, vec_in, mlp0, qn, final_lin, guid) = match layout {
            Layout::Bfl => (
                "img_in.weight",
                "txt_in.weight",
                "vector_in.in_layer.weight",
                "double_blocks.0.img_mlp.0.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale",
                "final_layer.linear.weight",
                "guidance_in.in_layer.weight",
            ),
            Layout::Diffusers => (
                "x_embedder.weight",
                "context_embedder.weight",
                "time_text_embed.text_embedder.linear_1.weight",
                "transformer_blocks.0.ff.net.0.proj.weight",
                "transformer_blocks.0.attn.norm_q.weight",
                "proj_out.weight",
                "time_text_embed.guidance_embedder.linear_1.weight",
            ),
        };
        let (blocks, singles) = match layout {
            Layout::Bfl => ("double_blocks", "single_blocks"),
            Layout::Diffusers => ("transformer_blocks", "single_transformer_blocks"),
        };
        let img = shape(img_in)?;
        let hd = shape(qn)?[0];
        let hidden = img[0];
        if hd == 0 || hidden % hd != 0 {
            bail!(
                "checkpoint '{}': hidden size {hidden} is not a multiple of the head dimension {hd}",
                ck.path.display()
            );
        }
        let axes_dim = match axes
            .map(Ok)
            .or_else(|| read_axes(&ck.path).transpose())
            .transpose()?
        {
            Some(a) => a,
            None if hd == 128 => vec![16, 56, 56],
            None => bail!(
                "checkpoint '{}': head dimension {hd} is not Flux.1's 128 and no config.json with axes_dims_rope \
                 is beside it; add the diffusers config.json or set FluxConfig::axes_dim",
                ck.path.display()
            ),
        };
        let cfg = FluxConfig {
            in_channels: img[1],
            // A ControlNet has no final layer: its "output" width is its input's.
            out_channels: ck.shape(&n.p(final_lin)).map_or(img[1], |s| s[0]),
            hidden_size: hidden,
            num_heads: hidden / hd,
            depth: count(blocks),
            depth_single: count(singles),
            context_dim: shape(txt_in)?[1],
            vec_dim: shape(vec_in)?[1],
            mlp_hidden: shape(mlp0)?[0],
            axes_dim,
            theta: 10000.0,
            guidance_embed: ck.contains(&n.p(guid)),
        };
        cfg.check()?;
        Ok((cfg, layout, prefix))
    }

    pub(super) fn check(&self) -> Result<()> {
        let hd = self.head_dim();
        if self.axes_dim.iter().sum::<usize>() != hd || self.axes_dim.iter().any(|d| d % 2 != 0) {
            bail!(
                "RoPE axes {:?} must be even and sum to the head dimension {hd}",
                self.axes_dim
            );
        }
        if self.depth == 0 && self.depth_single == 0 {
            bail!("the checkpoint has no transformer blocks");
        }
        Ok(())
    }

    /// Reads `axes_dims_rope` and `guidance_embeds` etc. from a diffusers `config.json` text.
    pub fn axes_from_diffusers_config(json: &str) -> Result<Vec<usize>> {
        let v: serde_json::Value = serde_json::from_str(json).context("config.json is not JSON")?;
        let a = v
            .get("axes_dims_rope")
            .and_then(|a| a.as_array())
            .context("config.json has no axes_dims_rope list")?;
        a.iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .context("axes_dims_rope holds a non-integer")
            })
            .collect()
    }
}

fn read_axes(path: &Path) -> Result<Option<Vec<usize>>> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let cfg = dir.join("config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg)
        .with_context(|| format!("cannot read '{}'", cfg.display()))?;
    if !text.contains("axes_dims_rope") {
        return Ok(None);
    }
    FluxConfig::axes_from_diffusers_config(&text)
        .map(Some)
        .with_context(|| format!("'{}'", cfg.display()))
}

pub(super) fn detect_layout(ck: &Checkpoint) -> Result<(Layout, String)> {
    for (suffix, layout) in [
        ("double_blocks.0.img_attn.qkv.weight", Layout::Bfl),
        ("img_in.weight", Layout::Bfl),
        ("x_embedder.weight", Layout::Diffusers),
    ] {
        // `controlnet_x_embedder.weight` ends like `x_embedder.weight`: only a whole-name prefix counts.
        if let Some(prefix) = ck.names().find_map(|k| {
            k.strip_suffix(suffix)
                .filter(|p| p.is_empty() || p.ends_with('.'))
        }) {
            return Ok((layout, prefix.to_string()));
        }
    }
    bail!(
        "'{}' is not a Flux transformer checkpoint: it has neither BFL names (img_in, double_blocks.*) nor diffusers \
         names (x_embedder, transformer_blocks.*); for diffusers folders point at transformer/",
        ck.path.display()
    )
}

pub(super) struct Names {
    pub(super) layout: Layout,
    pub(super) prefix: String,
}
impl Names {
    pub(super) fn p(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }
}

/// Every tensor of a checkpoint of `cfg` in the BFL layout, with its shape, in file order (for synthetic
/// checkpoints in tests and benchmarks).
pub fn bfl_tensor_shapes(cfg: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let (d, m, hd) = (cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim());
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut lin = |name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    lin("img_in".into(), cfg.in_channels, d);
    lin("txt_in".into(), cfg.context_dim, d);
    for (e, i) in [
        ("time_in", 256),
        ("vector_in", cfg.vec_dim),
        ("guidance_in", 256),
    ] {
        if e == "guidance_in" && !cfg.guidance_embed {
            continue;
        }
        lin(format!("{e}.in_layer"), i, d);
        lin(format!("{e}.out_layer"), d, d);
    }
    for b in 0..cfg.depth {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{b}.{s}");
            lin(format!("{p}_mod.lin"), d, 6 * d);
            lin(format!("{p}_attn.qkv"), d, 3 * d);
            lin(format!("{p}_attn.proj"), d, d);
            lin(format!("{p}_mlp.0"), d, m);
            lin(format!("{p}_mlp.2"), m, d);
        }
    }
    for b in 0..cfg.depth_single {
        let p = format!("single_blocks.{b}");
        lin(format!("{p}.linear1"), d, 3 * d + m);
        lin(format!("{p}.linear2"), d + m, d);
        lin(format!("{p}.modulation.lin"), d, 3 * d);
    }
    lin("final_layer.adaLN_modulation.1".into(), d, 2 * d);
    lin("final_layer.linear".into(), d, cfg.out_channels);
    for b in 0..cfg.depth {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                v.push((
                    format!("double_blocks.{b}.{s}_attn.norm.{n}.scale"),
                    vec![hd],
                ));
            }
        }
    }
    for b in 0..cfg.depth_single {
        for n in ["query_norm", "key_norm"] {
            v.push((format!("single_blocks.{b}.norm.{n}.scale"), vec![hd]));
        }
    }
    v
}
