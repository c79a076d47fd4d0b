//! The Flux.1 transformer (dev with the guidance embedding, schnell without) as one ONNX graph, with weights taken
//! zero-copy from a safetensors checkpoint in either layout: Black Forest Labs' original (`double_blocks.*`,
//! `single_blocks.*`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`; optionally under a
//! prefix such as ComfyUI's `model.diffusion_model.`) or diffusers' `FluxTransformer2DModel` (`transformer_blocks.*`,
//! `single_transformer_blocks.*`, ...). Fused BFL projections (`qkv`, single-block `linear1`) stay fused: one GEMM
//! and a Split.
//!
//! ## Graph contract (inputs named as diffusers' `FluxTransformer2DModel.forward`, all float32)
//! - `hidden_states` [batch, img_seq, in_channels]: packed latents (2x2 patches of the 16-channel VAE latent, so
//!   in_channels = 64 and img_seq = (H/16)*(W/16) for an H x W image: any multiple of 16 through the dynamic axes);
//! - `encoder_hidden_states` [batch, txt_seq, 4096]: T5 output; `pooled_projections` [batch, 768]: CLIP pooled;
//! - `timestep` `[batch]`: **the flow-matching sigma in [0, 1]**, exactly what diffusers' pipeline passes
//!   (`timestep / 1000`); the graph multiplies by 1000 itself, as diffusers' forward does;
//! - `img_ids` [img_seq, 3], `txt_ids` [txt_seq, 3]: RoPE positions (2-D, diffusers' current form; txt_ids are zeros
//!   for Flux.1, img_ids are (0, row, col));
//! - `guidance` `[batch]` (dev only): the distilled guidance scale itself (e.g. 3.5); the graph multiplies by 1000.
//!
//! Output `sample` [batch, img_seq, out_channels] float32: the velocity prediction. Inside, the graph runs in the
//! chosen compute dtype (f32, f16 or bf16; quantized graphs in f32, or in f16/bf16 outside their GEMMs with
//! `quantized_compute`); RMSNorm and RoPE always run in f32.
//!
//! ## Precisions and names
//! Per-layer precision comes from a [`Policy`] ([`default_policy`]: ModelOpt-like, embedders, AdaLN modulation,
//! the final layer and norms stay high precision). Policy decisions and activation amax keys use **diffusers'
//! layer names for both layouts** (e.g. `transformer_blocks.3.attn.to_q`), so a calibration made on one layout
//! serves the other. A BFL fused projection is looked up under the name of its first diffusers part (`qkv` ->
//! `attn.to_q`, txt `qkv` -> `attn.add_q_proj`, `linear1` -> `single_transformer_blocks.N.attn.to_q`); projections
//! reading the same activation share one amax key ([`amax_key`]). With `calibration`, the graph gets one extra
//! float32 output `amax.<key>` per activation: the pipeline runs it on calibration prompts, takes maxima
//! ([`merge_amax`]) and passes the map to the FP8 export (static per-tensor scales amax/448) or NVFP4 export
//! (global activation scale amax/2688; block scales are dynamic).
//!
//! ## Calibrated FP8 export, as a pipeline does it
//! ```ignore
//! let ck = Checkpoint::open(Path::new("flux1-dev.safetensors"))?;
//! let (cfg, _, _) = FluxConfig::from_checkpoint(&ck)?;
//! // 1. An f32 graph with one `amax.<layer>` output per GEMM input.
//! let calib = ExportOptions { calibration: true, ..Default::default() };
//! let onnx = export(&cfg, &ck, &calib, &dir.join("calib.onnx"))?.onnx;
//! // 2. Run it (any backend) at the sampler's steps over the calibration prompts; fold the maxima.
//! let mut amax = HashMap::new();
//! for outputs in runs { merge_amax(&mut amax, &outputs[1..]); }
//! // 3. The FP8 graph with static scales (bf16 outside the GEMMs).
//! let fp8 = ExportOptions { precision: FluxPrecision::Fp8, amax, quantized_compute: DataType::BFLOAT16,
//!                           ..Default::default() };
//! export(&cfg, &ck, &fp8, &dir.join("transformer.onnx"))?;
//! ```
//!
//! Files: `config.rs` (architecture and layout read off a checkpoint), `emit.rs` (the graph), this file (options,
//! precision policy, calibration keys, the export entry points).
use crate::manifest::ShapeRange;
use crate::onnx::{DataType, SaveOptions, proto::ModelProto, save};
use crate::quant::LinearPrecision;
use crate::quant::Precision;
use crate::quant::policy::Policy;
use crate::weights::safetensors_file::Checkpoint;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod config;
mod emit;
pub mod lora;

use config::detect_layout;
pub use config::{FluxConfig, Layout, bfl_tensor_shapes};
use emit::emit;

/// What the graph computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FluxPrecision {
    F32,
    F16,
    Bf16,
    /// FP8 E4M3 GEMMs with static per-tensor activation scales (needs an amax map).
    Fp8,
    /// NVFP4 GEMMs: FP4 weights, dynamically quantized FP4 activations.
    Nvfp4,
}

impl FluxPrecision {
    pub fn from_precision(p: Precision) -> Result<Self> {
        Ok(match p {
            Precision::Fp32 => Self::F32,
            Precision::Fp16 => Self::F16,
            Precision::Bf16 => Self::Bf16,
            Precision::Fp8 => Self::Fp8,
            Precision::Nvfp4 => Self::Nvfp4,
            other => bail!(
                "--precision {other} is not available for Flux: use fp32, fp16, bf16, fp8 or nvfp4"
            ),
        })
    }

    fn compute(self) -> DataType {
        match self {
            Self::F16 => DataType::FLOAT16,
            Self::Bf16 => DataType::BFLOAT16,
            _ => DataType::FLOAT,
        }
    }

    fn target(self) -> Option<LinearPrecision> {
        match self {
            Self::Fp8 => Some(LinearPrecision::Fp8),
            Self::Nvfp4 => Some(LinearPrecision::Nvfp4),
            _ => None,
        }
    }
}

/// ModelOpt/NVIDIA-demo-like defaults for Flux: [`Policy::defaults`] (embedders, norms incl. the AdaLN
/// modulation `norm*.linear`, `norm_out`, the final `proj_out` stay high precision), except that the single
/// blocks' own output projection (`single_transformer_blocks.N.proj_out`, BFL `linear2`) is quantized.
pub fn default_policy(target: LinearPrecision) -> Policy {
    Policy::defaults(target)
        .with_overrides(&["single_transformer_blocks.*.proj_out".into()], &[])
        .expect("valid globs")
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub precision: FluxPrecision,
    /// None: [`default_policy`] for quantized precisions.
    pub policy: Option<Policy>,
    /// Calibrated activation absolute maxima by [`amax_key`] (required for FP8; optional for NVFP4).
    pub amax: HashMap<String, f32>,
    /// NVFP4 activation amax for layers missing from `amax` (sets the global scale; block scales stay dynamic).
    pub nvfp4_default_amax: f32,
    /// Compute dtype of FP8/NVFP4 graphs outside their quantized GEMMs: FLOAT (default), FLOAT16 or BFLOAT16
    /// (as NVIDIA's demos run them; each quantized GEMM then reads and writes through a Cast to/from f32).
    pub quantized_compute: DataType,
    /// Adds an `amax.<key>` output per linear-layer input activation (use with F32 for calibration runs).
    pub calibration: bool,
    /// FP8/NVFP4: the rank of a LoRA side path beside every quantized layer (0: none), so that LoRAs switch at run
    /// time without requantizing (`models::qdq::lora_side_path`).
    pub lora_rank: usize,
    /// ControlNet: the transformer takes residuals, or the graph is a ControlNet itself.
    pub controlnet: ControlNetGraph,
}

/// How a graph takes part in ControlNet (diffusers' `FluxControlNetModel`, InstantX / Shakker style).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControlNetGraph {
    #[default]
    None,
    /// The transformer with inputs `controlnet_block_samples` [double, batch, img_seq, hidden] and
    /// `controlnet_single_block_samples` [single, batch, img_seq, hidden] (each present when its count is not 0),
    /// added to the image stream after its blocks as diffusers does (block i takes sample i / ceil(blocks /
    /// samples)); zeros leave the transformer as it is.
    Residuals { double: usize, single: usize },
    /// A ControlNet: inputs as the transformer's plus `controlnet_cond` [batch, img_seq, in_channels] (the packed
    /// VAE latents of the control image) and `conditioning_scale` [1]; outputs the two sample stacks above.
    Model,
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
            lora_rank: 0,
            controlnet: ControlNetGraph::None,
        }
    }
}

/// The amax key (a diffusers layer name) under which a layer's input activation is calibrated: projections that
/// read the same activation share the first one's name.
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
    if let Some(base) = layer.strip_suffix("proj_mlp")
        && base.starts_with("single_transformer_blocks.")
    {
        return format!("{base}attn.to_q");
    }
    layer.to_string()
}

pub use crate::models::qdq::merge_amax;

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub onnx: PathBuf,
    /// Bytes of the .onnx file plus its external data.
    pub bytes: u64,
    pub layout: Layout,
    pub config: FluxConfig,
    /// Linear layers by precision name ("nvfp4", "fp8", "kept").
    pub layers: HashMap<String, usize>,
    /// Every linear layer (policy name and shape), in graph order.
    pub linears: Vec<crate::quant::auto::LinearShape>,
}

/// The linear layers an emitter wrote: counts by precision and each layer's shape.
#[derive(Clone, Debug)]
pub struct LinearsReport {
    pub counts: HashMap<String, usize>,
    pub shapes: Vec<crate::quant::auto::LinearShape>,
}

/// The transformer graph in memory (weights inline): for tests and small models.
pub fn graph(cfg: &FluxConfig, ck: &Checkpoint, opts: &ExportOptions) -> Result<ModelProto> {
    let (layout, prefix) = detect_layout(ck)?;
    Ok(emit(ck, cfg, layout, &prefix, opts, None)?.0)
}

/// Exports the transformer of checkpoint `ck` (either layout) with `cfg` to `out` (an .onnx path; weights stream
/// to `<out>.data` beside it, both written under temporary names and renamed when complete). Peak memory stays
/// around the largest single tensor (in f32, when it is quantized), whatever the model size.
pub fn export(
    cfg: &FluxConfig,
    ck: &Checkpoint,
    opts: &ExportOptions,
    out: &Path,
) -> Result<ExportReport> {
    let (layout, prefix) = detect_layout(ck)?;
    let (model, sink, layers) = emit(ck, cfg, layout, &prefix, opts, Some(out))?;
    let data_bytes = match sink {
        Some(s) => s.commit()?,
        None => 0,
    };
    let bytes = match save(
        model,
        out,
        &SaveOptions {
            external_threshold: None,
        },
    ) {
        Ok(b) => b,
        Err(err) => {
            let _ = std::fs::remove_file(out.with_file_name(format!(
                "{}.data",
                out.file_name().unwrap_or_default().to_string_lossy()
            )));
            return Err(err);
        }
    };
    Ok(ExportReport {
        onnx: out.to_path_buf(),
        bytes: bytes + data_bytes,
        layout,
        config: cfg.clone(),
        layers: layers.counts,
        linears: layers.shapes,
    })
}

/// Opens `checkpoint` (a file or a folder of shards), reads its config off the weights
/// ([`FluxConfig::from_checkpoint`]) and exports to `out_dir/transformer.onnx`. Returns the .onnx path.
pub fn export_file(checkpoint: &Path, opts: &ExportOptions, out_dir: &Path) -> Result<PathBuf> {
    let ck = Checkpoint::open(checkpoint)?;
    let (cfg, _, _) = FluxConfig::from_checkpoint(&ck)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create '{}'", out_dir.display()))?;
    let out = out_dir.join("transformer.onnx");
    export(&cfg, &ck, opts, &out)?;
    Ok(out)
}

/// TensorRT optimization-profile ranges for the transformer inputs: batch min/opt/max, image sizes in pixels
/// (min, opt, max; each side a multiple of 16, square here: width = height) and the T5 sequence length.
pub fn profile(
    cfg: &FluxConfig,
    batch: [i64; 3],
    image_px: [i64; 3],
    txt_len: i64,
) -> Result<Vec<ShapeRange>> {
    if image_px.iter().any(|p| *p <= 0 || p % 16 != 0) {
        bail!("image sizes {image_px:?} must be positive multiples of 16");
    }
    let tokens = image_px.map(|p| (p / 16) * (p / 16));
    let r = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let (ic, cd, vd) = (
        cfg.in_channels as i64,
        cfg.context_dim as i64,
        cfg.vec_dim as i64,
    );
    let mut v = vec![
        r("hidden_states", &|i| vec![batch[i], tokens[i], ic]),
        r("encoder_hidden_states", &|i| vec![batch[i], txt_len, cd]),
        r("pooled_projections", &|i| vec![batch[i], vd]),
        r("timestep", &|i| vec![batch[i]]),
        r("img_ids", &|i| vec![tokens[i], 3]),
        r("txt_ids", &|_| vec![txt_len, 3]),
    ];
    if cfg.guidance_embed {
        v.push(r("guidance", &|i| vec![batch[i]]));
    }
    Ok(v)
}

/// The graph's input names, in order.
pub fn input_names(cfg: &FluxConfig) -> Vec<&'static str> {
    let mut v = vec![
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
    ];
    if cfg.guidance_embed {
        v.push("guidance");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::policy::LayerKind;

    #[test]
    fn full_size_counts_match_flux1() {
        // 11.9B parameters for dev (guidance embedding included), as published.
        let n = FluxConfig::dev().param_count();
        assert!((11_850_000_000..11_950_000_000).contains(&n), "{n}");
        assert!(FluxConfig::schnell().param_count() < n);
    }

    #[test]
    fn bfl_shapes_cover_every_parameter() {
        for cfg in [FluxConfig::dev(), FluxConfig::schnell()] {
            let n: u64 = bfl_tensor_shapes(&cfg)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(n, cfg.param_count());
        }
    }

    #[test]
    fn amax_keys_share_inputs() {
        assert_eq!(
            amax_key("transformer_blocks.0.attn.to_v"),
            "transformer_blocks.0.attn.to_q"
        );
        assert_eq!(
            amax_key("transformer_blocks.0.attn.add_k_proj"),
            "transformer_blocks.0.attn.add_q_proj"
        );
        assert_eq!(
            amax_key("single_transformer_blocks.3.proj_mlp"),
            "single_transformer_blocks.3.attn.to_q"
        );
        assert_eq!(
            amax_key("single_transformer_blocks.3.proj_out"),
            "single_transformer_blocks.3.proj_out"
        );
    }

    #[test]
    fn default_policy_keeps_embedders_modulation_and_final_layer() {
        let p = default_policy(LinearPrecision::Nvfp4);
        let q = |n: &str| p.decide(n, LayerKind::Linear);
        assert_eq!(
            q("transformer_blocks.0.attn.to_q"),
            Some(LinearPrecision::Nvfp4)
        );
        assert_eq!(
            q("single_transformer_blocks.5.proj_out"),
            Some(LinearPrecision::Nvfp4)
        );
        for keep in [
            "x_embedder",
            "context_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "transformer_blocks.0.norm1.linear",
            "single_transformer_blocks.0.norm.linear",
            "norm_out.linear",
            "proj_out",
        ] {
            assert_eq!(q(keep), None, "{keep}");
        }
    }
}
