//! Stable Diffusion 1.x / 2.x and SDXL (base, refiner, Turbo) on the image seam: CLIP text encoders (one, or
//! CLIP-L + OpenCLIP-bigG concatenated for SDXL; bigG alone for the refiner) condition a UNet that predicts eps or
//! v on 4-channel latents; the sampler steps k-diffusion's variance-exploding view of the DDPM (`x = x0 + sigma
//! noise`, the UNet sees `x / sqrt(sigma^2 + 1)` at the discrete timestep nearest `sigma`, as ComfyUI does), with
//! sigmas from any scheduler of the catalogue over the model's 1000-step scaled-linear table (optionally rescaled
//! to zero terminal SNR); the VAE decodes `latent / scaling_factor`.
//!
//! Prompts longer than 77 tokens are split into 75-token chunks, each encoded as BOS + chunk + EOS + padding and
//! the hidden states concatenated along the sequence (A1111/ComfyUI); the pooled SDXL vector is the first chunk's.
use super::device_io::{self, DeviceSlots};
use super::engines::{
    Backend, VaeScaling, add_outputs, float_input, ids_input, inputs_taken, open_components,
    output_f32, resolve, run_f32, vae_decode, vae_encode,
};
use super::image::{ImageDefaults, ImageModel, ImagePipeline, Latent, Latents, Prediction};
use super::image_io::to_rgb8;
use crate::backend::{BackendChoice, Engine};
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::device::Device;
use crate::manifest::{EngineFile, ImageBundle, Pipeline};
use crate::samplers::schedule::{self, ModelSampling};
use crate::tokenizer::clip::{BOS, ClipTokenizer, EOS, MAX_LEN};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdPrediction {
    Eps,
    V,
}

/// One text encoder of the pipeline, in the order their hidden states are concatenated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TextEncoderSpec {
    /// Component (and tokenizer) name in the bundle: "text_encoder" or "text_encoder_2".
    pub component: String,
    /// Padding id after EOS: EOS for OpenAI's CLIP-L tokenizer, 0 ("!") for the OpenCLIP ones.
    pub pad: u32,
    /// The hidden state the UNet reads: "last_hidden_state" (SD1.x, SD2.x) or "penultimate_hidden_state" (SDXL).
    pub hidden: String,
    /// Its projected pooled output (`text_embeds`) is SDXL's pooled conditioning.
    pub pooled: bool,
}

/// What differs between SD variants and what `generate` defaults to; recorded in the bundle's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SdPipelineConfig {
    /// sd15, sd21, sdxl, sdxl-refiner, sdxl-turbo, sd-turbo.
    pub arch: String,
    pub prediction: SdPrediction,
    /// Rescale the betas to zero terminal SNR (diffusers' `rescale_betas_zero_snr`, for models trained so).
    pub zero_terminal_snr: bool,
    pub latent_channels: usize,
    /// 4, or 9 for inpainting UNets (latent + mask + masked-image latent).
    pub unet_in_channels: usize,
    pub vae_scale_factor: usize,
    pub scaling_factor: f32,
    pub text_encoders: Vec<TextEncoderSpec>,
    /// SDXL's added time ids: 0 (none), 6 (base: original size, crop, target size), 5 (refiner: original size,
    /// crop, aesthetic score).
    pub time_ids: usize,
    pub aesthetic_score: f32,
    pub negative_aesthetic_score: f32,
    pub default_steps: usize,
    pub default_cfg: f32,
    pub default_sampler: String,
    pub default_scheduler: String,
    pub default_width: usize,
    pub default_height: usize,
    /// With a ControlNet in the bundle: the resolution level of each UNet residual input (`controlnet_down_<k>`,
    /// then `controlnet_mid`; [`crate::models::unet::controlnet_residuals`]), to feed zeros when no control runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub controlnet_levels: Vec<usize>,
}

impl SdPipelineConfig {
    /// The released models' settings for an arch (a recipe or the model folder may override the defaults).
    pub fn for_arch(arch: &str) -> Result<Self> {
        let clip_l = |hidden: &str| TextEncoderSpec {
            component: "text_encoder".into(),
            pad: EOS,
            hidden: hidden.into(),
            pooled: false,
        };
        let big_g = TextEncoderSpec {
            component: "text_encoder_2".into(),
            pad: 0,
            hidden: "penultimate_hidden_state".into(),
            pooled: true,
        };
        let open_clip_h = TextEncoderSpec {
            pad: 0,
            ..clip_l("last_hidden_state")
        };
        let xl = arch.starts_with("sdxl");
        let (encoders, time_ids, prediction, scaling, size) = match arch {
            "sd15" => (
                vec![clip_l("last_hidden_state")],
                0,
                SdPrediction::Eps,
                0.18215,
                512,
            ),
            "sd21" => (vec![open_clip_h.clone()], 0, SdPrediction::V, 0.18215, 768),
            "sd-turbo" => (vec![open_clip_h], 0, SdPrediction::Eps, 0.18215, 512),
            "sdxl" | "sdxl-turbo" => (
                vec![clip_l("penultimate_hidden_state"), big_g],
                6,
                SdPrediction::Eps,
                0.13025,
                if arch == "sdxl" { 1024 } else { 512 },
            ),
            "sdxl-refiner" => (vec![big_g], 5, SdPrediction::Eps, 0.13025, 1024),
            other => bail!(
                "unknown Stable Diffusion arch '{other}'; valid: sd15, sd21, sdxl, sdxl-refiner, sdxl-turbo, \
                 sd-turbo"
            ),
        };
        let turbo = arch.ends_with("turbo");
        Ok(Self {
            arch: arch.into(),
            prediction,
            zero_terminal_snr: false,
            latent_channels: 4,
            unet_in_channels: 4,
            vae_scale_factor: 8,
            scaling_factor: scaling,
            text_encoders: encoders,
            time_ids,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
            default_steps: if turbo {
                1
            } else if xl {
                30
            } else {
                25
            },
            default_cfg: if turbo { 1.0 } else { 7.0 },
            default_sampler: "euler".into(),
            default_scheduler: if turbo { "sgm_uniform" } else { "normal" }.into(),
            default_width: size,
            default_height: size,
            controlnet_levels: Vec::new(),
        })
    }

    /// The model's 1000 training sigmas: scaled-linear betas from 0.00085 to 0.012, rescaled to zero terminal
    /// SNR when asked (diffusers' `rescale_zero_terminal_snr`; the last alpha-bar then becomes 2^-24, as its
    /// schedulers set it, so the top sigma stays finite: 4096).
    pub fn model_sampling(&self) -> ModelSampling {
        if !self.zero_terminal_snr {
            return ModelSampling::sd();
        }
        let n = 1000;
        let (a, b) = (0.00085f64.sqrt(), 0.012f64.sqrt());
        let mut abar = 1.0;
        let mut sqrt_abar: Vec<f64> = (0..n)
            .map(|i| {
                let beta = (a + (b - a) * i as f64 / (n - 1) as f64).powi(2);
                abar *= 1.0 - beta;
                abar.sqrt()
            })
            .collect();
        let (first, last) = (sqrt_abar[0], sqrt_abar[n - 1]);
        for v in sqrt_abar.iter_mut() {
            *v = (*v - last) * first / (first - last);
        }
        let sigmas = sqrt_abar
            .iter()
            .map(|s| {
                let abar = (s * s).max(2f64.powi(-24));
                ((1.0 - abar) / abar).sqrt()
            })
            .collect();
        ModelSampling::Discrete { sigmas }
    }
}

pub struct SdEngines {
    /// One per `SdPipelineConfig::text_encoders`, same order.
    pub text_encoders: Vec<Box<dyn Engine>>,
    pub unet: Box<dyn Engine>,
    pub vae_decoder: Box<dyn Engine>,
    pub vae_encoder: Option<Box<dyn Engine>>,
    pub tae_decoder: Option<Box<dyn Engine>>,
}

/// The SD family on the image seam.
pub struct SdModel {
    pub config: SdPipelineConfig,
    /// One per text encoder.
    pub tokenizers: Vec<ClipTokenizer>,
    pub engines: SdEngines,
    /// When set, every UNet run's `amax.<key>` outputs (a calibration graph's) are folded in here.
    pub amax: Option<std::collections::HashMap<String, f32>>,
    /// With `amax`: the per-channel `chmax.<key>` outputs (SmoothQuant's calibration), folded in here.
    pub channel_amax: Option<std::collections::HashMap<String, Vec<f32>>>,
    sampling: ModelSampling,
    /// A 9-channel inpainting UNet's extra inputs for one image: the latent mask [1, h, w] and the masked
    /// image's latent [4, h, w].
    inpaint: Option<(Vec<f32>, Vec<f32>)>,
    /// On a GPU backend: where the sampler's latents live, with the UNet's inputs and outputs bound to them.
    device: Option<Arc<Device>>,
    on_device: DeviceSlots,
    /// Run-time LoRA: where each part's built weights are and what the current LoRA set changed.
    lora: Option<super::lora::RuntimeLora>,
    /// The bundle's ControlNet, the current run's control images and its schedule (a sigma's step index picks
    /// each control's window).
    controlnet: Option<Box<dyn Engine>>,
    controls: Vec<SdControl>,
    control_sigmas: Vec<f64>,
}

/// A control image prepared for a run: [1, 3, h, w] in [0, 1] (diffusers' ControlNet image processor does not
/// normalize), its conditioning scale and step window.
struct SdControl {
    image: Vec<f32>,
    strength: f32,
    start: f32,
    end: f32,
    /// ControlNet-Union: the control type.
    mode: Option<usize>,
}

/// An engine output widened to f32: name, shape, values.
type NamedOutput = (String, Vec<usize>, Vec<f32>);

/// The control types of xinsir's SDXL ControlNet-Union checkpoints (controlnet-union-sdxl-1.0: 0-5; ProMax adds
/// tile and repaint), by the names of its model card (`--control-mode`).
pub const UNION_MODES: &[(&str, usize)] = &[
    ("openpose", 0),
    ("pose", 0),
    ("depth", 1),
    ("hed", 2),
    ("pidi", 2),
    ("scribble", 2),
    ("ted", 2),
    ("canny", 3),
    ("lineart", 3),
    ("anime_lineart", 3),
    ("mlsd", 3),
    ("normal", 4),
    ("segment", 5),
    ("tile", 6),
    ("repaint", 7),
    ("inpaint", 7),
];

pub type SdPipeline = ImagePipeline<SdModel>;

/// Text conditioning of one prompt: hidden states [1, seq, ctx] (seq a multiple of 77), SDXL's pooled vector,
/// and whether it is a negative prompt (the refiner's aesthetic score differs).
pub struct SdCond {
    /// Identifies this conditioning's device copies (`device_io::next_cond_id`).
    pub id: u64,
    pub hidden: Vec<f32>,
    pub seq: usize,
    pub pooled: Vec<f32>,
    pub negative: bool,
}

/// Tokens per chunk between BOS and EOS.
const CHUNK: usize = MAX_LEN - 2;

/// A prompt as 77-token rows: 75-token chunks of its ids, each BOS + chunk + EOS + `pad` (one row for an empty
/// prompt).
pub fn chunk_ids(ids: &[u32], pad: u32) -> Vec<Vec<u32>> {
    let mut rows = Vec::new();
    for chunk in ids.chunks(CHUNK) {
        let mut row = Vec::with_capacity(MAX_LEN);
        row.push(BOS);
        row.extend_from_slice(chunk);
        row.push(EOS);
        row.resize(MAX_LEN, pad);
        rows.push(row);
    }
    if rows.is_empty() {
        let mut row = vec![BOS, EOS];
        row.resize(MAX_LEN, pad);
        rows.push(row);
    }
    rows
}

impl SdModel {
    pub fn new(
        config: SdPipelineConfig,
        tokenizers: Vec<ClipTokenizer>,
        engines: SdEngines,
    ) -> Self {
        let sampling = config.model_sampling();
        SdModel {
            config,
            tokenizers,
            engines,
            amax: None,
            channel_amax: None,
            sampling,
            inpaint: None,
            device: None,
            on_device: DeviceSlots::default(),
            lora: None,
            controlnet: None,
            controls: Vec::new(),
            control_sigmas: Vec::new(),
        }
    }

    /// Gives the model a ControlNet engine ([`crate::models::unet::controlnet_graph`]) for its UNet, which must
    /// take the residuals.
    pub fn set_controlnet(&mut self, engine: Box<dyn Engine>) {
        self.controlnet = Some(engine);
    }

    /// The UNet's ControlNet residual inputs for a call at `sigma` (`inputs`: the UNet's own, which the ControlNet
    /// shares): the active controls' residuals summed (diffusers' multi-ControlNet), zeros when none is active.
    /// Empty when the UNet takes no residuals.
    fn controlnet_residuals(
        &mut self,
        inputs: &[(String, crate::backend::HostTensor)],
        sigma: f64,
        batch: usize,
        lat: &Latents,
    ) -> Result<Vec<(String, crate::backend::HostTensor)>> {
        let wanted: Vec<crate::backend::TensorDesc> = self
            .engines
            .unet
            .inputs()
            .iter()
            .filter(|d| d.name.starts_with("controlnet_"))
            .cloned()
            .collect();
        if wanted.is_empty() {
            if !self.controls.is_empty() {
                bail!(
                    "this bundle's UNet takes no ControlNet residuals; rebuild it with --controlnet DIR"
                );
            }
            return Ok(Vec::new());
        }
        // diffusers: keep step i when i/n >= start and (i+1)/n <= end, n the number of steps.
        let n = self.control_sigmas.len().saturating_sub(1).max(1) as f32;
        let step = self
            .control_sigmas
            .windows(2)
            .position(|w| sigma <= w[0] && sigma > w[1])
            .unwrap_or(0) as f32;
        let mut sums: Vec<super::engines::OutputF32> = Vec::new();
        if self.controls.iter().any(|c| c.mode.is_some()) {
            sums = self.union_residuals(inputs, step, n, batch, lat)?;
        }
        for ctl in self.controls.iter().filter(|c| c.mode.is_none()) {
            if step / n < ctl.start || (step + 1.0) / n > ctl.end {
                continue;
            }
            let cn = self
                .controlnet
                .as_mut()
                .context("a control image was given and the bundle has no ControlNet")?;
            let mut cin = inputs_taken(cn.as_ref(), inputs);
            let f = self.config.vae_scale_factor;
            cin.push(float_input(
                cn.as_ref(),
                "controlnet_cond",
                &[batch, 3, lat.height * f, lat.width * f],
                &ctl.image.repeat(batch),
            )?);
            cin.push(float_input(
                cn.as_ref(),
                "conditioning_scale",
                &[1],
                &[ctl.strength],
            )?);
            add_outputs(&mut sums, run_f32(cn.as_mut(), &cin, "ControlNet")?);
        }
        let levels = &self.config.controlnet_levels;
        if levels.len() != wanted.len() {
            bail!(
                "the UNet takes {} ControlNet residuals and the manifest lists {}; rebuild the bundle",
                wanted.len(),
                levels.len()
            );
        }
        let e = self.engines.unet.as_ref();
        wanted
            .iter()
            .zip(levels)
            .map(
                |(d, level)| match sums.iter().find(|(n, _, _)| *n == d.name) {
                    Some((_, shape, v)) => float_input(e, &d.name, shape, v),
                    None => {
                        let r = crate::models::unet::Residual {
                            name: d.name.clone(),
                            channels: d.shape.get(1).copied().unwrap_or(1).max(1) as usize,
                            level: *level,
                        };
                        let shape = r.shape(batch, lat.height, lat.width);
                        float_input(e, &d.name, &shape, &vec![0f32; shape.iter().product()])
                    }
                },
            )
            .collect()
    }

    /// A ControlNet-Union's residuals for step `step` of `n`: every control in one call, as diffusers'
    /// `StableDiffusionXLControlNetUnionPipeline` (the control types multi-hot; one control: its strength scales the
    /// output and the call is skipped outside its window; several: each strength, zero outside its window, scales
    /// its part of the fusion and the net runs at every step).
    fn union_residuals(
        &mut self,
        inputs: &[(String, crate::backend::HostTensor)],
        step: f32,
        n: f32,
        batch: usize,
        lat: &Latents,
    ) -> Result<Vec<NamedOutput>> {
        let keep: Vec<f32> = self
            .controls
            .iter()
            .map(|c| {
                let off = step / n < c.start || (step + 1.0) / n > c.end;
                if off { 0.0 } else { c.strength }
            })
            .collect();
        let (inner, outer) = match keep[..] {
            [0.0] => return Ok(Vec::new()),
            [s] => (vec![1.0], s),
            _ => (keep, 1.0),
        };
        let cn = self
            .controlnet
            .as_mut()
            .context("a control image was given and the bundle has no ControlNet")?;
        let types =
            union_types(cn.as_ref()).context("the bundle's ControlNet is not a union one")?;
        let mut cin = inputs_taken(cn.as_ref(), inputs);
        let f = self.config.vae_scale_factor;
        let k = self.controls.len();
        let images: Vec<f32> = self
            .controls
            .iter()
            .flat_map(|c| c.image.repeat(batch))
            .collect();
        cin.push(float_input(
            cn.as_ref(),
            "controlnet_cond",
            &[k, batch, 3, lat.height * f, lat.width * f],
            &images,
        )?);
        let mut multi_hot = vec![0f32; types];
        let mut modes = Vec::new();
        for c in &self.controls {
            let m = c
                .mode
                .context("a ControlNet-Union control without its mode")?;
            multi_hot[m] = 1.0;
            modes.extend((m as i64).to_le_bytes());
        }
        cin.push(float_input(
            cn.as_ref(),
            "control_type",
            &[batch, types],
            &multi_hot.repeat(batch),
        )?);
        cin.push((
            "control_mode".into(),
            crate::backend::HostTensor {
                dtype: crate::onnx::DataType::INT64,
                shape: vec![k],
                data: modes,
            },
        ));
        cin.push(float_input(cn.as_ref(), "control_scales", &[k], &inner)?);
        cin.push(float_input(
            cn.as_ref(),
            "conditioning_scale",
            &[1],
            &[outer],
        )?);
        run_f32(cn.as_mut(), &cin, "ControlNet-Union")
    }

    /// Enables run-time LoRA ([`ImageModel::set_loras`]) for engines built from these graphs (each graph's
    /// initializers are its engine's weights; parts as [`super::lora::sd_part`] names them).
    pub fn enable_lora(
        &mut self,
        graphs: std::collections::BTreeMap<crate::weights::lora::Part, std::path::PathBuf>,
    ) {
        self.lora = Some(super::lora::RuntimeLora::new(graphs, super::lora::sd_book));
    }

    /// Opens an SD bundle's components on `backend`; on a GPU the sampler's latents live there too.
    pub fn open(engine: &EngineFile, bundle: &ImageBundle, backend: Backend) -> Result<Self> {
        let config: SdPipelineConfig =
            serde_json::from_value(bundle.config.clone()).with_context(|| {
                format!(
                    "the manifest of '{}' has no valid Stable Diffusion settings; rebuild the bundle with this \
                     trt-diff",
                    engine.path.display()
                )
            })?;
        let mut wanted: Vec<(&str, bool)> = config
            .text_encoders
            .iter()
            .map(|t| (t.component.as_str(), true))
            .collect();
        wanted.extend([
            ("unet", true),
            ("vae_decoder", true),
            ("vae_encoder", false),
            ("tae_decoder", false),
            ("controlnet", false),
        ]);
        let mut parts =
            open_components(engine, &bundle.components, &wanted, backend, &bundle.arch)?;
        let n = config.text_encoders.len();
        let rest = parts.split_off(n);
        let text_encoders = parts
            .into_iter()
            .map(|e| e.context("a required text encoder is missing"))
            .collect::<Result<Vec<_>>>()?;
        let [unet, vae_decoder, vae_encoder, tae_decoder, controlnet]: [Option<Box<dyn Engine>>;
            5] = rest
            .try_into()
            .map_err(|_| anyhow::anyhow!("five components were asked for"))?;
        let mut tokenizers = Vec::new();
        for t in &config.text_encoders {
            let f = bundle.tokenizers.get(&t.component).with_context(|| {
                format!(
                    "the bundle '{}' names no tokenizer for {}; rebuild it",
                    engine.path.display(),
                    t.component
                )
            })?;
            let mut tok =
                ClipTokenizer::load(&engine.file(f, &format!("the {} tokenizer", t.component))?)?;
            tok.pad = t.pad;
            tokenizers.push(tok);
        }
        let lora_parts: Vec<(&str, crate::weights::lora::Part)> = config
            .text_encoders
            .iter()
            .map(|t| t.component.as_str())
            .chain(["unet"])
            .filter_map(|c| super::lora::sd_part(c).map(|p| (c, p)))
            .collect();
        let graphs = super::lora::bundle_graphs(engine, bundle, backend, &lora_parts);
        let mut model = SdModel::new(
            config,
            tokenizers,
            SdEngines {
                text_encoders,
                unet: unet.context("the UNet is missing")?,
                vae_decoder: vae_decoder.context("the VAE decoder is missing")?,
                vae_encoder,
                tae_decoder,
            },
        );
        model.device = device_io::open_device(backend)?;
        model.enable_lora(graphs);
        model.controlnet = controlnet;
        Ok(model)
    }

    fn encode(&mut self, prompt: &str, negative: bool) -> Result<SdCond> {
        // Every tokenizer shares CLIP's BPE: their chunk counts agree; checked anyway.
        let rows: Vec<Vec<Vec<u32>>> = self
            .config
            .text_encoders
            .iter()
            .zip(&self.tokenizers)
            .map(|(spec, tok)| chunk_ids(&tok.encode(prompt), spec.pad))
            .collect();
        let chunks = rows.first().map(|r| r.len()).unwrap_or(0);
        if rows.iter().any(|r| r.len() != chunks) {
            bail!(
                "the text encoders' tokenizers split the prompt differently; the bundle's tokenizers do not match"
            );
        }
        let seq = chunks * MAX_LEN;
        // Per encoder: hidden [chunks * 77, d]; then concatenated along the features.
        let mut per_encoder: Vec<(Vec<f32>, usize)> = Vec::new();
        let mut pooled = Vec::new();
        for (i, spec) in self.config.text_encoders.iter().enumerate() {
            let e = self.engines.text_encoders[i].as_mut();
            let mut hidden = Vec::new();
            for (c, row) in rows[i].iter().enumerate() {
                let out = e
                    .run(&[ids_input("input_ids", &[1, MAX_LEN], row)])
                    .with_context(|| format!("text encoder {}", spec.component))?;
                if !out.iter().any(|(n, _)| *n == spec.hidden) {
                    bail!(
                        "text encoder {} has no output '{}'; rebuild the bundle with this trt-diff",
                        spec.component,
                        spec.hidden
                    );
                }
                hidden.extend(output_f32(&out, &spec.hidden)?);
                if spec.pooled && c == 0 {
                    if !out.iter().any(|(n, _)| n == "text_embeds") {
                        bail!(
                            "text encoder {} has no 'text_embeds' output (SDXL's pooled conditioning); rebuild \
                             the bundle with this trt-diff",
                            spec.component
                        );
                    }
                    pooled = output_f32(&out, "text_embeds")?;
                }
            }
            let d = hidden.len() / seq;
            per_encoder.push((hidden, d));
        }
        let ctx: usize = per_encoder.iter().map(|(_, d)| d).sum();
        let mut hidden = Vec::with_capacity(seq * ctx);
        for t in 0..seq {
            for (h, d) in &per_encoder {
                hidden.extend_from_slice(&h[t * d..(t + 1) * d]);
            }
        }
        Ok(SdCond {
            id: device_io::next_cond_id(),
            hidden,
            seq,
            pooled,
            negative,
        })
    }

    /// SDXL's time ids for one image of `lat` (no crop; the original size is the target size).
    fn time_ids(&self, lat: &Latents, negative: bool) -> Vec<f32> {
        let c = &self.config;
        let (h, w) = (
            (lat.height * c.vae_scale_factor) as f32,
            (lat.width * c.vae_scale_factor) as f32,
        );
        match c.time_ids {
            5 => vec![
                h,
                w,
                0.0,
                0.0,
                if negative {
                    c.negative_aesthetic_score
                } else {
                    c.aesthetic_score
                },
            ],
            _ => vec![h, w, 0.0, 0.0, h, w],
        }
    }

    /// The UNet on host latents at `sigma`, once per conditioning in `conds` (all in one batched run: the batch's
    /// latents repeated, each copy with its own text), outputs concatenated in that order.
    fn predict_host(
        &mut self,
        x: &[f32],
        sigma: f64,
        conds: &[&SdCond],
        lat: &Latents,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let x = &x.repeat(conds.len());
        let b = lat.batch * conds.len();
        let seq = conds[0].seq;
        if conds
            .iter()
            .any(|k| k.seq != seq || k.pooled.len() != conds[0].pooled.len())
        {
            bail!("conditionings of different lengths cannot share one UNet run (a pipeline bug)");
        }
        let per = |f: &dyn Fn(&SdCond) -> Vec<f32>| -> Vec<f32> {
            conds.iter().flat_map(|k| f(k).repeat(lat.batch)).collect()
        };
        let c_in = (1.0 / (sigma * sigma + 1.0).sqrt()) as f32;
        let mut scaled: Vec<f32> = x.iter().map(|v| v * c_in).collect();
        if c.unet_in_channels != c.latent_channels {
            // Inpainting UNet: per image [latent, mask, masked-image latent] along the channels.
            let Some((mask, masked)) = &self.inpaint else {
                bail!(
                    "this bundle's UNet takes {} channels (an inpainting model): generate with --init-image and \
                     --mask",
                    c.unet_in_channels
                );
            };
            if c.unet_in_channels != c.latent_channels + 1 + masked.len() / (lat.height * lat.width)
            {
                bail!(
                    "the inpainting UNet takes {} channels; latent, mask and masked image give another count",
                    c.unet_in_channels
                );
            }
            let mut all = Vec::with_capacity(b * c.unet_in_channels * lat.height * lat.width);
            for img in scaled.chunks(lat.per_image) {
                all.extend_from_slice(img);
                all.extend_from_slice(mask);
                all.extend_from_slice(masked);
            }
            scaled = all;
        }
        let t = self.sampling.timestep(sigma) as f32;
        let ctx = conds[0].hidden.len() / seq;
        let e = self.engines.unet.as_ref();
        let mut inputs = vec![
            float_input(
                e,
                "sample",
                &[b, c.unet_in_channels, lat.height, lat.width],
                &scaled,
            )?,
            float_input(e, "timestep", &[b], &vec![t; b])?,
            float_input(
                e,
                "encoder_hidden_states",
                &[b, seq, ctx],
                &per(&|k| k.hidden.clone()),
            )?,
        ];
        if c.time_ids > 0 {
            if conds[0].pooled.is_empty() {
                bail!(
                    "SDXL needs the pooled text embedding, which no text encoder of this bundle gives"
                );
            }
            let ids = per(&|k| self.time_ids(lat, k.negative));
            inputs.push(float_input(
                e,
                "text_embeds",
                &[b, conds[0].pooled.len()],
                &per(&|k| k.pooled.clone()),
            )?);
            inputs.push(float_input(e, "time_ids", &[b, ids.len() / b], &ids)?);
        }
        let residuals = self.controlnet_residuals(&inputs, sigma, b, lat)?;
        inputs.extend(residuals);
        let out = self.engines.unet.run(&inputs).context("UNet")?;
        if let Some(map) = self.amax.as_mut() {
            crate::models::qdq::merge_amax(map, &out);
        }
        if let Some(map) = self.channel_amax.as_mut() {
            crate::models::qdq::merge_channel_amax(map, &out);
        }
        let y = output_f32(&out, "model_output")?;
        if y.len() != x.len() {
            bail!("the UNet returned {} values, {} expected", y.len(), x.len());
        }
        Ok(y)
    }

    /// The UNet on device latents, as [`SdModel::predict_host`]: the scaled latents (repeated per conditioning,
    /// with an inpainting UNet's mask and masked-image latent beside each image) assembled on the GPU, the text
    /// conditioning uploaded once per prompt pair and batch, only the timestep copied per call; output k goes to
    /// `outs[k]`.
    fn predict_device(
        &mut self,
        x: &DeviceBuffer,
        sigma: f64,
        conds: &[&SdCond],
        lat: &Latents,
        outs: &mut [&mut DeviceBuffer],
    ) -> Result<()> {
        let dev = self
            .device
            .clone()
            .context("device latents without a GPU engine")?;
        let takes_residuals = self
            .engines
            .unet
            .inputs()
            .iter()
            .any(|d| d.name.starts_with("controlnet_"));
        if takes_residuals {
            // The ControlNet runs on host copies of the UNet's inputs (as Flux's): this call goes through host
            // memory, one latent copy each way.
            dev.synchronize()?;
            let y = self.predict_host(&x.to_host()?, sigma, conds, lat)?;
            for (k, out) in outs.iter_mut().enumerate() {
                out.write_host(&y[k * x.data.len()..(k + 1) * x.data.len()])?;
            }
            return Ok(());
        }
        let c = self.config.clone();
        let (n, per, hw) = (conds.len(), lat.per_image, lat.height * lat.width);
        let b = lat.batch * n;
        let seq = conds[0].seq;
        if conds
            .iter()
            .any(|k| k.seq != seq || k.pooled.len() != conds[0].pooled.len())
        {
            bail!("conditionings of different lengths cannot share one UNet run (a pipeline bug)");
        }
        let ids: Vec<u64> = conds.iter().map(|k| k.id).collect();
        let key = device_io::key(
            &[
                &ids[..],
                &[lat.batch as u64, lat.height as u64, lat.width as u64],
            ]
            .concat(),
        );
        let per_cond = |f: &dyn Fn(&SdCond) -> Vec<f32>| -> Vec<f32> {
            conds.iter().flat_map(|k| f(k).repeat(lat.batch)).collect()
        };
        let time_ids: Vec<f32> = if c.time_ids > 0 {
            conds
                .iter()
                .flat_map(|k| self.time_ids(lat, k.negative).repeat(lat.batch))
                .collect()
        } else {
            Vec::new()
        };
        let slots = &mut self.on_device;
        slots.upload(&dev, "encoder_hidden_states", key, || {
            Ok(per_cond(&|k| k.hidden.clone()))
        })?;
        if c.time_ids > 0 {
            if conds[0].pooled.is_empty() {
                bail!(
                    "SDXL needs the pooled text embedding, which no text encoder of this bundle gives"
                );
            }
            slots.upload(&dev, "text_embeds", key, || {
                Ok(per_cond(&|k| k.pooled.clone()))
            })?;
            slots.upload(&dev, "time_ids", key, || Ok(time_ids))?;
        }
        let inpainting = c.unet_in_channels != c.latent_channels;
        if inpainting {
            let Some((mask, masked)) = &self.inpaint else {
                bail!(
                    "this bundle's UNet takes {} channels (an inpainting model): generate with --init-image and \
                     --mask",
                    c.unet_in_channels
                );
            };
            if c.unet_in_channels != c.latent_channels + 1 + masked.len() / hw {
                bail!(
                    "the inpainting UNet takes {} channels; latent, mask and masked image give another count",
                    c.unet_in_channels
                );
            }
            // Uploaded once per request (new_request drops them).
            slots.upload(&dev, "inpaint_mask", 0, || Ok(mask.clone()))?;
            slots.upload(&dev, "inpaint_masked", 0, || Ok(masked.clone()))?;
        }
        // c_in * x, then per conditioning and image its slice of the UNet's sample input (with an inpainting
        // UNet's mask and masked-image latent after each image's channels).
        let c_in = (1.0 / (sigma * sigma + 1.0).sqrt()) as f32;
        let mut scaled = slots.take_scratch(&dev, "scaled", x.data.len())?;
        dev.lincomb(&mut scaled.data, 0.0, &[(c_in, &x.data)])?;
        let in_per = c.unet_in_channels * hw;
        let assembled = n > 1 || inpainting;
        if assembled {
            let mut sample = slots.take_scratch(&dev, "sample", b * in_per)?;
            for k in 0..n {
                for i in 0..lat.batch {
                    let at = (k * lat.batch + i) * in_per;
                    device_io::copy_into(&dev, &scaled, i * per, &mut sample, at, per)?;
                    if inpainting {
                        let (m, mi) = (
                            slots.get("inpaint_mask", 0)?,
                            slots.get("inpaint_masked", 0)?,
                        );
                        let (ml, mil) = (m.data.len(), mi.data.len());
                        device_io::copy_into(&dev, m, 0, &mut sample, at + per, ml)?;
                        device_io::copy_into(&dev, mi, 0, &mut sample, at + per + ml, mil)?;
                    }
                }
            }
            slots.put("sample", sample);
        }
        slots.put("scaled", scaled);
        if n > 1 {
            let y = slots.take_scratch(&dev, "model_output", b * per)?;
            slots.put("model_output", y);
        }
        let slots = &self.on_device;
        let sample = slots.scratch(if assembled { "sample" } else { "scaled" })?;
        let ctx = conds[0].hidden.len() / seq;
        let mut inputs = vec![
            (
                "sample",
                sample,
                vec![b, c.unet_in_channels, lat.height, lat.width],
            ),
            (
                "encoder_hidden_states",
                slots.get("encoder_hidden_states", key)?,
                vec![b, seq, ctx],
            ),
        ];
        if c.time_ids > 0 {
            inputs.push((
                "text_embeds",
                slots.get("text_embeds", key)?,
                vec![b, conds[0].pooled.len()],
            ));
            inputs.push(("time_ids", slots.get("time_ids", key)?, vec![b, c.time_ids]));
        }
        let t = self.sampling.timestep(sigma) as f32;
        let e = self.engines.unet.as_mut();
        let host = [float_input(e, "timestep", &[b], &vec![t; b])?];
        let shape = vec![b, c.latent_channels, lat.height, lat.width];
        if n == 1 {
            let out: &DeviceBuffer = outs[0];
            return device_io::run_on_device(
                e,
                &dev,
                "UNet",
                &inputs,
                &host,
                &[("model_output", out, shape)],
            );
        }
        let y = slots.scratch("model_output")?;
        device_io::run_on_device(
            e,
            &dev,
            "UNet",
            &inputs,
            &host,
            &[("model_output", y, shape)],
        )?;
        for (k, out) in outs.iter_mut().enumerate() {
            device_io::copy_into(&dev, y, k * x.data.len(), out, 0, x.data.len())?;
        }
        Ok(())
    }
}

/// Opens an SD bundle (its manifest read once into `engine`) on the chosen backend.
pub fn open_pipeline(engine: &EngineFile, choice: BackendChoice) -> Result<SdPipeline> {
    let Some(Pipeline::Image(bundle)) = engine.pipeline() else {
        bail!(
            "'{}' is not an image bundle; build one with `trt-diff build MODEL --arch sdxl ...`",
            engine.path.display()
        );
    };
    let backend = resolve(choice, engine)?;
    Ok(ImagePipeline::new(SdModel::open(engine, bundle, backend)?))
}

impl ImageModel for SdModel {
    type Cond = SdCond;

    fn arch(&self) -> &str {
        &self.config.arch
    }

    fn defaults(&self) -> ImageDefaults {
        let c = &self.config;
        ImageDefaults {
            steps: c.default_steps,
            sampler: c.default_sampler.clone(),
            scheduler: c.default_scheduler.clone(),
            width: c.default_width,
            height: c.default_height,
            guidance: 0.0,
            guidance_input: false,
            cfg: c.default_cfg,
        }
    }

    fn prediction(&self) -> Prediction {
        match self.config.prediction {
            SdPrediction::Eps => Prediction::Eps,
            SdPrediction::V => Prediction::V,
        }
    }

    fn latents(&self, w: usize, h: usize, batch: usize) -> Result<Latents> {
        let c = &self.config;
        let f = c.vae_scale_factor;
        if w == 0 || h == 0 || !w.is_multiple_of(f) || !h.is_multiple_of(f) {
            bail!(
                "--width {w} --height {h}: Stable Diffusion needs both to be positive multiples of {f} (the VAE's \
                 factor); try {}x{}",
                (w.max(f) / f) * f,
                (h.max(f) / f) * f
            );
        }
        let (lh, lw) = (h / f, w / f);
        Ok(Latents {
            batch,
            channels: c.latent_channels,
            height: lh,
            width: lw,
            per_image: c.latent_channels * lh * lw,
        })
    }

    fn sigmas(&self, scheduler: &str, steps: usize, _lat: &Latents) -> Result<Vec<f64>> {
        schedule::by_name(scheduler, steps, &self.sampling, None)
    }

    fn encode_prompt(&mut self, prompt: &str) -> Result<SdCond> {
        self.encode(prompt, false)
    }

    fn encode_negative(&mut self, prompt: &str) -> Result<SdCond> {
        self.encode(prompt, true)
    }

    fn predict(
        &mut self,
        x: &Latent,
        sigma: f64,
        cond: &SdCond,
        lat: &Latents,
        _guidance: f32,
        out: &mut Latent,
    ) -> Result<()> {
        match (x, out) {
            (Latent::Host(x), Latent::Host(out)) => {
                *out = self.predict_host(x, sigma, &[cond], lat)?;
                Ok(())
            }
            (Latent::Device(x), Latent::Device(out)) => {
                self.predict_device(x, sigma, &[cond], lat, &mut [out])
            }
            _ => bail!("host and device latents mixed in one UNet call (a pipeline bug)"),
        }
    }

    /// CFG's two predictions in one UNet run (batch doubled) when the prompts have the same length, as diffusers
    /// does; prompts of different lengths (a long prompt, a short negative) run separately, as A1111 does.
    fn predict_pair(
        &mut self,
        x: &Latent,
        sigma: f64,
        (cond, uncond): (&SdCond, &SdCond),
        lat: &Latents,
        guidance: f32,
        (out, out_uncond): (&mut Latent, &mut Latent),
    ) -> Result<()> {
        if cond.seq != uncond.seq {
            self.predict(x, sigma, cond, lat, guidance, out)?;
            return self.predict(x, sigma, uncond, lat, guidance, out_uncond);
        }
        match (x, out, out_uncond) {
            (Latent::Host(x), Latent::Host(out), Latent::Host(out_uncond)) => {
                let mut both = self.predict_host(x, sigma, &[cond, uncond], lat)?;
                *out_uncond = both.split_off(x.len());
                *out = both;
                Ok(())
            }
            (Latent::Device(x), Latent::Device(out), Latent::Device(out_uncond)) => {
                self.predict_device(x, sigma, &[cond, uncond], lat, &mut [out, out_uncond])
            }
            _ => bail!("host and device latents mixed in one UNet call (a pipeline bug)"),
        }
    }

    fn initial_noise(&mut self, seed: u64, lat: &Latents) -> Result<Latent> {
        device_io::batch_noise(self.device.as_ref(), seed, lat.batch, lat.per_image)
    }

    fn latent(&mut self, v: Vec<f32>) -> Result<Latent> {
        device_io::to_latent(self.device.as_ref(), v)
    }

    /// Init image -> scaled latent [1, 4, h, w] (the VAE encoder's mean).
    fn encode_image(&mut self, rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let c = &self.config;
        let s = VaeScaling {
            scale: c.scaling_factor,
            shift: 0.0,
            spatial: c.vae_scale_factor,
        };
        let size = (lat.height * s.spatial, lat.width * s.spatial);
        vae_encode(
            self.engines.vae_encoder.as_mut(),
            rgb,
            size,
            lat.per_image,
            s,
        )
    }

    fn decode(&mut self, x: &Latent, lat: &Latents) -> Result<Vec<Vec<u8>>> {
        let c = &self.config;
        let s = VaeScaling {
            scale: c.scaling_factor,
            shift: 0.0,
            spatial: c.vae_scale_factor,
        };
        let dims = [lat.batch, c.latent_channels, lat.height, lat.width];
        vae_decode(self.engines.vae_decoder.as_mut(), &x.to_host()?, dims, s)
    }

    fn new_request(&mut self) {
        self.inpaint = None;
        self.on_device.remove("inpaint_mask");
        self.on_device.remove("inpaint_masked");
    }

    fn set_controls(
        &mut self,
        controls: &[super::image::ControlImage],
        lat: &Latents,
        sigmas: &[f64],
    ) -> Result<()> {
        self.controls.clear();
        self.control_sigmas = sigmas.to_vec();
        if controls.is_empty() {
            return Ok(());
        }
        if self.controlnet.is_none() {
            bail!(
                "--control needs a ControlNet in the bundle; rebuild it with `trt-diff build MODEL --controlnet DIR`"
            );
        }
        let f = self.config.vae_scale_factor;
        let types = self.controlnet.as_deref().and_then(union_types);
        for c in controls {
            let mode = match (&c.mode, types) {
                (None, None) => None,
                (Some(m), None) => bail!(
                    "--control-mode {m}: this bundle's ControlNet is not a ControlNet-Union (it takes no control \
                     mode); drop --control-mode"
                ),
                (None, Some(t)) => bail!(
                    "this bundle's ControlNet is a ControlNet-Union ({t} modes): give --control-mode for '{}' (an \
                     index 0..{} or a name: {})",
                    c.image.display(),
                    t.saturating_sub(1),
                    UNION_MODES
                        .iter()
                        .filter(|(_, i)| *i < t)
                        .map(|(n, i)| format!("{n}={i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (Some(m), Some(t)) => Some(m.resolve(UNION_MODES, t)?),
            };
            let rgb = super::image_io::load_control_image(
                &c.image,
                lat.width * f,
                lat.height * f,
                c.preprocess,
            )?;
            self.controls.push(SdControl {
                image: rgb.iter().map(|v| (v + 1.0) * 0.5).collect(),
                strength: c.strength,
                start: c.start,
                end: c.end,
                mode,
            });
        }
        Ok(())
    }

    fn set_loras(&mut self, loras: &[(crate::weights::lora::LoraFile, f32)]) -> Result<()> {
        use crate::weights::lora::Part;
        let Some(lora) = self.lora.as_mut() else {
            bail!(
                "these Stable Diffusion engines were opened without their graphs; open the bundle to apply LoRAs"
            );
        };
        let (config, engines) = (&self.config, &mut self.engines);
        super::lora::apply_runtime(lora, loras, &mut |part, weights| {
            let component = match part {
                Part::Denoiser => return engines.unet.set_weights(weights),
                Part::TextEncoder(0) => "text_encoder",
                Part::TextEncoder(_) => "text_encoder_2",
            };
            let i = config
                .text_encoders
                .iter()
                .position(|t| t.component == component)
                .with_context(|| format!("this bundle has no {component} for the LoRA's {part}"))?;
            engines.text_encoders[i].set_weights(weights)
        })
    }

    /// diffusers' StableDiffusionInpaintPipeline: the mask binarized at 0.5 and taken at every
    /// `vae_scale_factor`-th pixel (nearest); a 9-channel UNet also gets the latent of the image with the masked
    /// part blacked out (and no blending), a regular one blends.
    fn mask_latent(&mut self, mask: &[f32], rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let f = self.config.vae_scale_factor;
        let (h, w) = (lat.height * f, lat.width * f);
        let mut m = Vec::with_capacity(lat.height * lat.width);
        for i in 0..lat.height {
            for j in 0..lat.width {
                m.push(if mask[i * f * w + j * f] >= 0.5 {
                    1.0
                } else {
                    0.0
                });
            }
        }
        if self.config.unet_in_channels == self.config.latent_channels {
            self.inpaint = None;
            return Ok(m.repeat(lat.channels));
        }
        let plane = h * w;
        let masked: Vec<f32> = rgb
            .iter()
            .enumerate()
            .map(|(k, v)| if mask[k % plane] < 0.5 { *v } else { 0.0 })
            .collect();
        let masked_latent = self.encode_image(&masked, lat)?;
        self.inpaint = Some((m, masked_latent));
        Ok(vec![1.0; lat.per_image])
    }

    fn can_preview(&self) -> bool {
        self.engines.tae_decoder.is_some()
    }

    fn preview(&mut self, x0: &Latent, lat: &Latents) -> Result<(Vec<u8>, usize, usize)> {
        let x0 = x0.to_host()?;
        let tae = self
            .engines
            .tae_decoder
            .as_mut()
            .context("this bundle has no preview decoder")?;
        let per = lat.per_image;
        if x0.len() < per {
            bail!("no latents to preview yet");
        }
        // TAESD(XL) decodes the scaled latent space directly, to [0, 1].
        let name = tae.inputs()[0].name.clone();
        let input = float_input(
            tae.as_ref(),
            &name,
            &[1, lat.channels, lat.height, lat.width],
            &x0[..per],
        )?;
        let out = tae.run(&[input]).context("TAESD preview decoder")?;
        let shape = out.first().map(|o| o.1.shape.clone()).unwrap_or_default();
        let [1, 3, h, w] = shape[..] else {
            bail!("the TAESD decoder returned shape {shape:?}, [1, 3, H, W] expected");
        };
        let img: Vec<f32> = output_f32(&out, "")?
            .iter()
            .map(|v| v * 2.0 - 1.0)
            .collect();
        Ok((to_rgb8(&img, 1, h, w).remove(0), w, h))
    }
}

/// A ControlNet-Union engine's number of control types (its `control_type` input's width); None for others.
fn union_types(engine: &dyn Engine) -> Option<usize> {
    engine
        .inputs()
        .iter()
        .find(|d| d.name == "control_type")
        .and_then(|d| d.shape.last().copied())
        .filter(|&t| t > 0)
        .map(|t| t as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompts_split_into_75_token_chunks() {
        let ids: Vec<u32> = (1..=160).collect();
        let rows = chunk_ids(&ids, 0);
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r.len() == 77 && r[0] == BOS));
        assert_eq!(rows[0][76], EOS);
        assert_eq!(&rows[1][1..3], &[76, 77]);
        // The last chunk: 10 ids, EOS, then padding.
        assert_eq!(rows[2][11], EOS);
        assert_eq!(rows[2][12], 0);
        assert_eq!(
            chunk_ids(&[], EOS),
            vec![{
                let mut r = vec![BOS, EOS];
                r.resize(77, EOS);
                r
            }]
        );
    }

    #[test]
    fn zero_terminal_snr_keeps_the_first_sigma_and_tops_out_finite() {
        let mut c = SdPipelineConfig::for_arch("sd21").unwrap();
        let plain = c.model_sampling();
        c.zero_terminal_snr = true;
        let z = c.model_sampling();
        assert!((z.sigmas()[0] - plain.sigmas()[0]).abs() < 1e-9);
        assert!((z.sigma_max() - 4096.0).abs() < 1.0, "{}", z.sigma_max());
    }
}
