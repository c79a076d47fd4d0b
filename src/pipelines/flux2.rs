//! FLUX.2 [klein] text-to-image (and img2img) on `Engine`s, as diffusers' `Flux2KleinPipeline`: the prompt goes
//! through the tokenizer's chat template (one user turn, the generation prompt, `enable_thinking=False`), the Qwen2
//! BPE tokenizer, padded to `max_sequence_length` tokens, and the Qwen3 encoder, whose hidden states 9, 18 and 27
//! (side by side per token, padding included) condition the FLUX.2 transformer; the transformer runs inside any
//! registered sampler (default: Euler over the pipeline's schedule, `linspace(1, 1/n, n)` through the exponential
//! time shift at the empirical mu of `compute_empirical_mu`). The distilled models run without classifier-free
//! guidance (4 steps); the base models guide against the empty prompt (`--cfg` is diffusers' `guidance_scale`).
//!
//! The sampler's latent is diffusers' pre-packing one: [B, 4C, H/16, W/16], the 32-channel VAE latent in 2x2 patches
//! (`_patchify_latents`) normalized by the VAE's batch-norm statistics; [`to_vae_latent`] / [`from_vae_latent`]
//! convert. Previews decode the x0 estimate through taef2 in the raw 32-channel space. Reference images (Klein's
//! editing input, diffusers' `image=`) come as `--control IMG`: encoded once per run, their tokens follow the latent
//! tokens in every transformer call.
use super::device_io::{self, DeviceSlots};
use super::engines::{Backend, float_input, ids_input, open_components, output_f32, resolve};
use super::image::{
    ControlImage, ImageDefaults, ImageModel, ImagePipeline, Latent, Latents, Prediction,
};
use super::image_io::to_rgb8;
use crate::backend::{BackendChoice, Engine};
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::device::Device;
use crate::manifest::{EngineFile, ImageBundle, Pipeline};
use crate::models::flux2::{image_ids, text_ids};
use crate::samplers::schedule;
use crate::tokenizer::qwen::QwenTokenizer;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What `generate` needs besides the engines; recorded in the bundle's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Flux2PipelineConfig {
    pub arch: String,
    /// Step-wise distilled (FLUX.2 [klein]) or base (FLUX.2 [klein] base, guided): model_index.json's
    /// `is_distilled`.
    pub distilled: bool,
    /// The VAE's latent channels (32); the sampler holds 4x as many (2x2 patches).
    pub latent_channels: usize,
    pub vae_scale_factor: usize,
    /// The VAE's batch-norm statistics over the patchified channels: mean and `sqrt(var + eps)`.
    pub bn_mean: Vec<f32>,
    pub bn_std: Vec<f32>,
    /// The scheduler's resolution-dependent shift (`use_dynamic_shifting`, klein's) at the empirical mu, or its
    /// static `shift`.
    pub dynamic_shift: bool,
    pub shift: f32,
    /// The encoder's hidden states the transformer reads (transformers' `hidden_states[k]`).
    pub text_layers: Vec<usize>,
    /// Every prompt is padded (or truncated) to this many tokens, as diffusers does (512).
    pub max_sequence_length: usize,
    pub pad_token_id: u32,
    /// The tokenizer's Jinja chat template.
    pub chat_template: String,
    pub default_steps: usize,
    pub default_sampler: String,
    /// "flux2" is diffusers' Flux2KleinPipeline schedule; any name of `samplers::schedule::SCHEDULERS` works too.
    pub default_scheduler: String,
    pub default_width: usize,
    pub default_height: usize,
    /// Classifier-free guidance when the request leaves it unset (1 = off, the distilled models').
    pub default_cfg: f32,
}

pub struct Flux2Engines {
    pub text_encoder: Box<dyn Engine>,
    pub transformer: Box<dyn Engine>,
    pub vae_decoder: Box<dyn Engine>,
    pub vae_encoder: Option<Box<dyn Engine>>,
    /// taef2's decoder, for previews.
    pub tae_decoder: Option<Box<dyn Engine>>,
}

/// The FLUX.2 family on the image seam.
pub struct Flux2Model {
    pub config: Flux2PipelineConfig,
    pub tokenizer: QwenTokenizer,
    pub engines: Flux2Engines,
    /// When set, every transformer run's `amax.<key>` outputs (a calibration graph's) are folded in here.
    pub amax: Option<std::collections::HashMap<String, f32>>,
    /// The request's reference images (`--control`), encoded once per run.
    refs: Option<References>,
    /// The GPU the sampler runs on (GPU backends); its latents are [B, 4C, h, w] device buffers there.
    device: Option<Arc<Device>>,
    on_device: DeviceSlots,
}

/// Reference-image tokens appended after the latent tokens of every image of the batch (diffusers'
/// `image_latents`): packed [n, 4C] and their positions [n, 4] (`t` = 10, 20, ... per image).
struct References {
    tokens: Vec<f32>,
    ids: Vec<f32>,
    n: usize,
    /// Identifies these references' device copies (`device_io::next_cond_id`).
    id: u64,
}

pub type Flux2Pipeline = ImagePipeline<Flux2Model>;

/// One prompt's conditioning: the stacked hidden states [len, 3 * dim] of its padded tokens.
pub struct Cond {
    feats: Vec<f32>,
    len: usize,
    /// Identifies this conditioning's device copies (`device_io::next_cond_id`).
    id: u64,
}

/// The prompt as Flux2KleinPipeline gives it to the tokenizer: the chat template rendered for one user message with
/// the generation prompt and `enable_thinking=False`.
pub fn format_prompt(template: &str, prompt: &str) -> Result<String> {
    let msg = super::chat::ChatMessage {
        role: "user".into(),
        content: prompt.into(),
        name: None,
    };
    super::chat::render_with(template, &[msg], "", "", true, Some(false))
}

/// diffusers' `compute_empirical_mu`: the time shift's mu from the image tokens and the step count.
pub fn empirical_mu(image_seq_len: usize, steps: usize) -> f64 {
    let (a1, b1) = (8.73809524e-05, 1.89833333);
    let (a2, b2) = (0.00016927, 0.45666666);
    let n = image_seq_len as f64;
    if n > 4300.0 {
        return a2 * n + b2;
    }
    let m200 = a2 * n + b2;
    let m10 = a1 * n + b1;
    let a = (m200 - m10) / 190.0;
    let b = m200 - 200.0 * a;
    a * steps as f64 + b
}

/// The sigma schedule (n+1 values ending in 0): "flux2" is Flux2KleinPipeline's (`linspace(1, 1/n, n)` through
/// FlowMatchEulerDiscreteScheduler's shift, in f32 as there); other names come from the samplers' schedules on
/// the same shifted flow.
pub fn flux2_sigmas(
    c: &Flux2PipelineConfig,
    scheduler: &str,
    steps: usize,
    tokens: usize,
) -> Result<Vec<f64>> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mu = empirical_mu(tokens, steps);
    if scheduler == "flux2" {
        let e = mu.exp() as f32;
        let mut v: Vec<f64> = (0..steps)
            .map(|i| {
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / steps as f64 - 1.0) * i as f64 / (steps - 1) as f64
                } as f32;
                let s = if c.dynamic_shift {
                    e / (e + (1.0 / s - 1.0))
                } else {
                    c.shift * s / (1.0 + (c.shift - 1.0) * s)
                };
                s as f64
            })
            .collect();
        v.push(0.0);
        return Ok(v);
    }
    let ms = if c.dynamic_shift {
        schedule::ModelSampling::flux(mu)
    } else {
        schedule::ModelSampling::sd3(c.shift as f64)
    };
    schedule::by_name(scheduler, steps, &ms, None).map_err(|e| {
        anyhow::anyhow!("{e} (or 'flux2', diffusers' Flux2KleinPipeline schedule, the default)")
    })
}

/// Sampler latents [B, 4C, h, w] (normalized 2x2 patches) -> raw VAE latents [B, C, 2h, 2w]: diffusers'
/// batch-norm de-normalization then `_unpatchify_latents`.
pub fn to_vae_latent(x: &[f32], c: &Flux2PipelineConfig, b: usize, h: usize, w: usize) -> Vec<f32> {
    let ch = c.latent_channels;
    let mut out = vec![0f32; x.len()];
    for n in 0..b {
        for k in 0..4 * ch {
            let (cc, di, dj) = (k / 4, (k % 4) / 2, k % 2);
            for i in 0..h {
                for j in 0..w {
                    let v = x[((n * 4 * ch + k) * h + i) * w + j] * c.bn_std[k] + c.bn_mean[k];
                    out[((n * ch + cc) * 2 * h + 2 * i + di) * 2 * w + 2 * j + dj] = v;
                }
            }
        }
    }
    out
}

/// Raw VAE latents [B, C, 2h, 2w] -> sampler latents: `_patchify_latents` then the batch-norm normalization.
pub fn from_vae_latent(
    z: &[f32],
    c: &Flux2PipelineConfig,
    b: usize,
    h: usize,
    w: usize,
) -> Vec<f32> {
    let ch = c.latent_channels;
    let mut out = vec![0f32; z.len()];
    for n in 0..b {
        for k in 0..4 * ch {
            let (cc, di, dj) = (k / 4, (k % 4) / 2, k % 2);
            for i in 0..h {
                for j in 0..w {
                    let v = z[((n * ch + cc) * 2 * h + 2 * i + di) * 2 * w + 2 * j + dj];
                    out[((n * 4 * ch + k) * h + i) * w + j] = (v - c.bn_mean[k]) / c.bn_std[k];
                }
            }
        }
    }
    out
}

/// [B, C, h, w] <-> [B, h*w, C] (diffusers' `_pack_latents` and its inverse).
fn transpose_tokens(x: &[f32], b: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for n in 0..b {
        let base = n * rows * cols;
        for r in 0..rows {
            for c in 0..cols {
                out[base + c * rows + r] = x[base + r * cols + c];
            }
        }
    }
    out
}

impl Flux2Model {
    pub fn new(
        config: Flux2PipelineConfig,
        tokenizer: QwenTokenizer,
        engines: Flux2Engines,
    ) -> Self {
        Flux2Model {
            config,
            tokenizer,
            engines,
            amax: None,
            refs: None,
            device: None,
            on_device: DeviceSlots::default(),
        }
    }

    /// Opens a FLUX.2 bundle's components on `backend`.
    pub fn open(engine: &EngineFile, bundle: &ImageBundle, backend: Backend) -> Result<Self> {
        let config: Flux2PipelineConfig = serde_json::from_value(bundle.config.clone())
            .with_context(|| {
                format!(
                    "the manifest of '{}' has no valid FLUX.2 settings; rebuild the bundle with this trt-diff",
                    engine.path.display()
                )
            })?;
        let parts = open_components(
            engine,
            &bundle.components,
            &[
                ("text_encoder", true),
                ("transformer", true),
                ("vae_decoder", true),
                ("vae_encoder", false),
                ("tae_decoder", false),
            ],
            backend,
            &bundle.arch,
        )?;
        let [
            text_encoder,
            transformer,
            vae_decoder,
            vae_encoder,
            tae_decoder,
        ]: [Option<Box<dyn Engine>>; 5] = parts
            .try_into()
            .map_err(|_| anyhow::anyhow!("five components were asked for"))?;
        let required = |e: Option<Box<dyn Engine>>| e.context("a required component is missing");
        let tok = bundle.tokenizers.get("qwen").with_context(|| {
            format!(
                "the bundle '{}' names no qwen tokenizer; rebuild it",
                engine.path.display()
            )
        })?;
        let tokenizer = QwenTokenizer::load(&engine.file(tok, "the qwen tokenizer")?)?;
        let mut model = Flux2Model::new(
            config,
            tokenizer,
            Flux2Engines {
                text_encoder: required(text_encoder)?,
                transformer: required(transformer)?,
                vae_decoder: required(vae_decoder)?,
                vae_encoder,
                tae_decoder,
            },
        );
        model.device = device_io::open_device(backend)?;
        Ok(model)
    }

    /// The transformer on device latents, as [`Flux2Model::transformer`]: the [B, 4C, h, w] latents transposed into
    /// the token-major input on the GPU (reference tokens copied in after each image's), the velocity transposed
    /// back into `out`; the text features, positions and reference tokens are uploaded once per prompt, size and
    /// request, so only the timestep crosses per call.
    fn transformer_device(
        &mut self,
        x: &DeviceBuffer,
        sigma: f64,
        conds: &[&Cond],
        lat: &Latents,
        out: &mut DeviceBuffer,
    ) -> Result<()> {
        let dev = self
            .device
            .clone()
            .context("device latents without a GPU engine")?;
        let b = lat.batch;
        let (c, n) = (lat.channels, lat.height * lat.width);
        let cond = conds[0];
        if conds.iter().any(|c| c.len != cond.len) || !b.is_multiple_of(conds.len()) {
            bail!("conditionings of different lengths in one transformer call (a pipeline bug)");
        }
        let share = b / conds.len();
        let dim = cond.feats.len() / cond.len.max(1);
        let (refs_n, refs_id) = self.refs.as_ref().map_or((0, 0), |r| (r.n, r.id));
        let seq = n + refs_n;
        let ids: Vec<u64> = conds.iter().map(|c| c.id).collect();
        let feats_key = device_io::key(&[&ids[..], &[share as u64]].concat());
        let pos_key = device_io::key(&[lat.height as u64, lat.width as u64, refs_id]);
        let slots = &mut self.on_device;
        slots.upload(&dev, "encoder_hidden_states", feats_key, || {
            Ok(conds.iter().flat_map(|c| c.feats.repeat(share)).collect())
        })?;
        slots.upload(&dev, "img_ids", pos_key, || {
            let mut ids = image_ids(lat.height, lat.width);
            if let Some(r) = &self.refs {
                ids.extend_from_slice(&r.ids);
            }
            Ok(ids)
        })?;
        slots.upload(&dev, "txt_ids", cond.len as u64, || Ok(text_ids(cond.len)))?;
        let mut tokens = slots.take_scratch(&dev, "hidden_states", b * seq * c)?;
        dev.transpose(&mut tokens.data, &x.data, b, [c, n], c * n, seq * c)?;
        if let Some(r) = &self.refs {
            slots.upload(&dev, "reference_tokens", r.id, || Ok(r.tokens.clone()))?;
            let rt = slots.get("reference_tokens", r.id)?;
            for i in 0..b {
                device_io::copy_into(&dev, rt, 0, &mut tokens, i * seq * c + n * c, r.n * c)?;
            }
        }
        slots.put("hidden_states", tokens);
        let v = slots.take_scratch(&dev, "sample", b * seq * c)?;
        slots.put("sample", v);
        let t = sigma as f32 * 1000.0 / 1000.0;
        let e = self.engines.transformer.as_mut();
        let host = [float_input(e, "timestep", &[b], &vec![t; b])?];
        let slots = &self.on_device;
        let inputs = [
            (
                "hidden_states",
                slots.scratch("hidden_states")?,
                vec![b, seq, c],
            ),
            (
                "encoder_hidden_states",
                slots.get("encoder_hidden_states", feats_key)?,
                vec![b, cond.len, dim],
            ),
            ("img_ids", slots.get("img_ids", pos_key)?, vec![seq, 4]),
            (
                "txt_ids",
                slots.get("txt_ids", cond.len as u64)?,
                vec![cond.len, 4],
            ),
        ];
        let v = slots.scratch("sample")?;
        device_io::run_on_device(
            e,
            &dev,
            "FLUX.2 transformer",
            &inputs,
            &host,
            &[("sample", v, vec![b, seq, c])],
        )?;
        // Each image's first n tokens, back to channel-major.
        dev.transpose(&mut out.data, &v.data, b, [n, c], seq * c, c * n)
    }

    /// The transformer's velocity for sampler latents [B, 4C, h, w] at `sigma`, in the same layout.
    fn transformer(
        &mut self,
        x: &[f32],
        sigma: f64,
        conds: &[&Cond],
        lat: &Latents,
    ) -> Result<Vec<f32>> {
        let b = lat.batch;
        let (c, n) = (lat.channels, lat.height * lat.width);
        let e = self.engines.transformer.as_ref();
        // Each conditioning serves an equal share of the batch (CFG's pair: [cond x B | uncond x B]).
        let cond = conds[0];
        if conds.iter().any(|c| c.len != cond.len) || !b.is_multiple_of(conds.len()) {
            bail!("conditionings of different lengths in one transformer call (a pipeline bug)");
        }
        let share = b / conds.len();
        let feats: Vec<f32> = conds.iter().flat_map(|c| c.feats.repeat(share)).collect();
        let dim = cond.feats.len() / cond.len.max(1);
        // As the pipeline: timesteps are sigma * 1000 in f32, the model gets t / 1000.
        let t = sigma as f32 * 1000.0 / 1000.0;
        let mut tokens = transpose_tokens(x, b, c, n);
        let mut ids = image_ids(lat.height, lat.width);
        let mut seq = n;
        if let Some(r) = &self.refs {
            // [latent tokens | reference tokens] per image; the output keeps the latent tokens.
            let per = n * c;
            tokens = (0..b)
                .flat_map(|i| tokens[i * per..(i + 1) * per].iter().chain(&r.tokens))
                .copied()
                .collect();
            ids.extend_from_slice(&r.ids);
            seq += r.n;
        }
        let inputs = vec![
            float_input(e, "hidden_states", &[b, seq, c], &tokens)?,
            float_input(e, "encoder_hidden_states", &[b, cond.len, dim], &feats)?,
            float_input(e, "timestep", &[b], &vec![t; b])?,
            float_input(e, "img_ids", &[seq, 4], &ids)?,
            float_input(e, "txt_ids", &[cond.len, 4], &text_ids(cond.len))?,
        ];
        let out = self
            .engines
            .transformer
            .run(&inputs)
            .context("FLUX.2 transformer")?;
        if let Some(map) = self.amax.as_mut() {
            crate::models::qdq::merge_amax(map, &out);
        }
        let v = output_f32(&out, "sample")?;
        if v.len() != b * seq * c {
            bail!(
                "the transformer returned {} values, {} expected",
                v.len(),
                b * seq * c
            );
        }
        let v: Vec<f32> = if seq == n {
            v
        } else {
            (0..b)
                .flat_map(|i| v[i * seq * c..(i * seq + n) * c].iter().copied())
                .collect()
        };
        Ok(transpose_tokens(&v, b, n, c))
    }
}

/// How Flux2KleinPipeline sizes a reference image of `w x h` pixels: images over 1024^2 pixels are scaled to that
/// area (Lanczos), then center-cropped to multiples of `m` (the VAE's factor times the 2x2 patches). Returns the
/// (resized, cropped) sizes; sides under 64 pixels and aspect ratios over 8 are refused as there.
pub fn reference_size(w: usize, h: usize, m: usize) -> Result<((usize, usize), (usize, usize))> {
    if w < 64 || h < 64 {
        bail!("a reference image of {w}x{h}: both sides must be at least 64 pixels");
    }
    if w.max(h) as f64 / w.min(h) as f64 > 8.0 {
        bail!("a reference image of {w}x{h}: the aspect ratio must be at most 8:1");
    }
    let area = 1024.0 * 1024.0;
    let (rw, rh) = if (w * h) as f64 > area {
        let scale = (area / (w * h) as f64).sqrt();
        ((w as f64 * scale) as usize, (h as f64 * scale) as usize)
    } else {
        (w, h)
    };
    Ok(((rw, rh), (rw / m * m, rh / m * m)))
}

impl Flux2Model {
    /// Encodes the reference images into tokens as `prepare_image_latents` (the VAE's mean, patchified and
    /// normalized, packed; image i at time coordinate 10 + 10 i).
    fn encode_references(&mut self, controls: &[ControlImage]) -> Result<Option<References>> {
        if controls.is_empty() {
            return Ok(None);
        }
        let m = 2 * self.config.vae_scale_factor;
        let mut r = References {
            tokens: Vec::new(),
            ids: Vec::new(),
            n: 0,
            id: device_io::next_cond_id(),
        };
        for (i, c) in controls.iter().enumerate() {
            if let Some(m) = &c.mode {
                bail!(
                    "--control-mode {m}: FLUX.2 [klein] reference images take no control mode; drop it"
                );
            }
            if (c.strength, c.start, c.end) != (1.0, 0.0, 1.0) {
                bail!(
                    "FLUX.2 [klein] takes --control images as reference images (editing), which condition every \
                     step fully: drop --control-strength, --control-start and --control-end"
                );
            }
            let path = &c.image;
            let (w, h) = image::image_dimensions(path).with_context(|| {
                format!(
                    "cannot read the reference image '{}' (PNG or JPEG expected)",
                    path.display()
                )
            })?;
            let ((rw, rh), (cw, ch)) = reference_size(w as usize, h as usize, m)
                .with_context(|| format!("'{}'", path.display()))?;
            let full = super::image_io::load_control_image(path, rw, rh, c.preprocess)?;
            // Center crop (FLUX.2's image processor only crops at this point).
            let (left, top) = ((rw - cw) / 2, (rh - ch) / 2);
            let mut rgb = Vec::with_capacity(3 * cw * ch);
            for k in 0..3 {
                for y in top..top + ch {
                    let row = (k * rh + y) * rw + left;
                    rgb.extend_from_slice(&full[row..row + cw]);
                }
            }
            let lat = self.latents(cw, ch, 1)?;
            let z = self.encode_image(&rgb, &lat)?;
            let n = lat.height * lat.width;
            r.tokens.extend(transpose_tokens(&z, 1, lat.channels, n));
            let t = (10 + 10 * i) as f32;
            for row in 0..lat.height {
                for col in 0..lat.width {
                    r.ids.extend_from_slice(&[t, row as f32, col as f32, 0.0]);
                }
            }
            r.n += n;
        }
        Ok(Some(r))
    }
}

/// Opens a FLUX.2 bundle (its manifest read once into `engine`) on the chosen backend.
pub fn open_pipeline(engine: &EngineFile, choice: BackendChoice) -> Result<Flux2Pipeline> {
    let Some(Pipeline::Image(bundle)) = engine.pipeline() else {
        bail!(
            "'{}' is not an image bundle; build one with `trt-diff build MODEL_DIR --arch flux2-klein-4b ...`",
            engine.path.display()
        );
    };
    let backend = resolve(choice, engine)?;
    Ok(ImagePipeline::new(Flux2Model::open(
        engine, bundle, backend,
    )?))
}

impl ImageModel for Flux2Model {
    type Cond = Cond;

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
        Prediction::Flow
    }

    /// `--control IMG` (repeatable) gives reference images, as diffusers' `image=`: their tokens join every
    /// transformer call.
    fn set_controls(
        &mut self,
        controls: &[ControlImage],
        _lat: &Latents,
        _sigmas: &[f64],
    ) -> Result<()> {
        self.refs = None;
        self.refs = self.encode_references(controls)?;
        Ok(())
    }

    fn latents(&self, w: usize, h: usize, batch: usize) -> Result<Latents> {
        let c = &self.config;
        let m = 2 * c.vae_scale_factor;
        if w == 0 || h == 0 || !w.is_multiple_of(m) || !h.is_multiple_of(m) {
            bail!(
                "--width {w} --height {h}: FLUX.2 needs both to be positive multiples of {m} (the VAE's {}x and \
                 the 2x2 patches); try {}x{}",
                c.vae_scale_factor,
                (w.max(m) / m) * m,
                (h.max(m) / m) * m
            );
        }
        let (lh, lw, ch) = (h / m, w / m, 4 * c.latent_channels);
        Ok(Latents {
            batch,
            channels: ch,
            height: lh,
            width: lw,
            per_image: ch * lh * lw,
        })
    }

    fn sigmas(&self, scheduler: &str, steps: usize, lat: &Latents) -> Result<Vec<f64>> {
        flux2_sigmas(&self.config, scheduler, steps, lat.height * lat.width)
    }

    fn encode_prompt(&mut self, prompt: &str) -> Result<Cond> {
        let c = &self.config;
        let text = format_prompt(&c.chat_template, prompt)?;
        let mut ids = self.tokenizer.encode(&text)?;
        let max = c.max_sequence_length;
        if ids.len() > max {
            // As diffusers (truncation=True): the end of the formatted prompt is cut.
            tracing::warn!(
                "the prompt is {} tokens with its chat template; the text encoder sees the first {max}",
                ids.len()
            );
            ids.truncate(max);
        }
        // padding="max_length": the transformer attends to the padded positions' states too.
        let mut mask = vec![1u32; ids.len()];
        mask.resize(max, 0);
        ids.resize(max, c.pad_token_id);
        let out = self
            .engines
            .text_encoder
            .run(&[
                ids_input("input_ids", &[1, max], &ids),
                ids_input("attention_mask", &[1, max], &mask),
            ])
            .context("Qwen3 text encoder")?;
        let feats = output_f32(&out, "hidden_states")?;
        Ok(Cond {
            len: max,
            feats,
            id: device_io::next_cond_id(),
        })
    }

    fn predict(
        &mut self,
        x: &Latent,
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
        _guidance: f32,
        out: &mut Latent,
    ) -> Result<()> {
        match (x, &mut *out) {
            (Latent::Host(x), Latent::Host(o)) => {
                *o = self.transformer(x, sigma, &[cond], lat)?;
                Ok(())
            }
            (Latent::Device(x), Latent::Device(o)) => {
                self.transformer_device(x, sigma, &[cond], lat, o)
            }
            _ => bail!("host and device latents mixed in one transformer call (a pipeline bug)"),
        }
    }

    /// The base models guide by default: both predictions in one call of twice the batch (the transformer's
    /// profile is built for it); distilled models, which guide only when asked, make two calls.
    fn predict_pair(
        &mut self,
        x: &Latent,
        sigma: f64,
        (cond, uncond): (&Cond, &Cond),
        lat: &Latents,
        guidance: f32,
        (out, out_uncond): (&mut Latent, &mut Latent),
    ) -> Result<()> {
        if self.config.distilled || cond.len != uncond.len {
            self.predict(x, sigma, cond, lat, guidance, out)?;
            return self.predict(x, sigma, uncond, lat, guidance, out_uncond);
        }
        let both = Latents {
            batch: 2 * lat.batch,
            ..*lat
        };
        match (x, out, out_uncond) {
            (Latent::Host(x), Latent::Host(o), Latent::Host(u)) => {
                let mut v =
                    self.transformer(&[&x[..], &x[..]].concat(), sigma, &[cond, uncond], &both)?;
                *u = v.split_off(x.len());
                *o = v;
                Ok(())
            }
            (Latent::Device(x), Latent::Device(o), Latent::Device(u)) => {
                let dev = x.dev.clone();
                let len = x.data.len();
                let mut xs = self.on_device.take_scratch(&dev, "pair_latents", 2 * len)?;
                let mut vs = self
                    .on_device
                    .take_scratch(&dev, "pair_velocity", 2 * len)?;
                device_io::copy_into(&dev, x, 0, &mut xs, 0, len)?;
                device_io::copy_into(&dev, x, 0, &mut xs, len, len)?;
                let ran = self.transformer_device(&xs, sigma, &[cond, uncond], &both, &mut vs);
                let copied = ran.and_then(|()| {
                    device_io::copy_into(&dev, &vs, 0, o, 0, len)?;
                    device_io::copy_into(&dev, &vs, len, u, 0, len)
                });
                self.on_device.put("pair_latents", xs);
                self.on_device.put("pair_velocity", vs);
                copied
            }
            _ => bail!("host and device latents mixed in one transformer call (a pipeline bug)"),
        }
    }

    fn initial_noise(&mut self, seed: u64, lat: &Latents) -> Result<Latent> {
        device_io::batch_noise(self.device.as_ref(), seed, lat.batch, lat.per_image)
    }

    fn latent(&mut self, v: Vec<f32>) -> Result<Latent> {
        device_io::to_latent(self.device.as_ref(), v)
    }

    /// Init image -> sampler latent [1, 4C, h, w] (the VAE encoder's mean, patchified and normalized as the
    /// pipeline's `_encode_vae_image`).
    fn encode_image(&mut self, rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let c = self.config.clone();
        let Some(enc) = self.engines.vae_encoder.as_mut() else {
            bail!(
                "--init-image needs the VAE encoder, which this bundle does not have; rebuild it from a model \
                 folder whose vae/ has the encoder weights"
            );
        };
        let m = 2 * c.vae_scale_factor;
        let (h, w) = (lat.height * m, lat.width * m);
        let name = enc.inputs()[0].name.clone();
        let input = float_input(enc.as_ref(), &name, &[1, 3, h, w], rgb)?;
        let out = enc.run(&[input]).context("VAE encoder")?;
        let mean = output_f32(&out, "mean")?;
        let per = lat.per_image;
        if mean.len() != per && mean.len() != 2 * per {
            bail!(
                "the VAE encoder returned {} values, {per} expected",
                mean.len()
            );
        }
        Ok(from_vae_latent(&mean[..per], &c, 1, lat.height, lat.width))
    }

    fn decode(&mut self, x: &Latent, lat: &Latents) -> Result<Vec<Vec<u8>>> {
        let c = &self.config;
        let (b, lh, lw) = (lat.batch, lat.height, lat.width);
        let z = to_vae_latent(&x.to_host()?, c, b, lh, lw);
        let e = self.engines.vae_decoder.as_ref();
        let name = e.inputs()[0].name.clone();
        let input = float_input(e, &name, &[b, c.latent_channels, 2 * lh, 2 * lw], &z)?;
        let out = self
            .engines
            .vae_decoder
            .run(&[input])
            .context("VAE decoder")?;
        let img = output_f32(&out, "image")?;
        let m = 2 * c.vae_scale_factor;
        let (h, w) = (lh * m, lw * m);
        if img.len() != b * 3 * h * w {
            bail!(
                "the VAE decoder returned {} values, {} expected",
                img.len(),
                b * 3 * h * w
            );
        }
        Ok(to_rgb8(&img, b, h, w))
    }

    fn can_preview(&self) -> bool {
        self.engines.tae_decoder.is_some()
    }

    fn preview(&mut self, x0: &Latent, lat: &Latents) -> Result<(Vec<u8>, usize, usize)> {
        let x0 = x0.to_host()?;
        let c = self.config.clone();
        let tae = self
            .engines
            .tae_decoder
            .as_mut()
            .context("this bundle has no preview decoder")?;
        preview(tae.as_mut(), &c, &x0, lat.height, lat.width)
    }
}

/// The first image of sampler latents (an x0 estimate) through taef2's decoder: (RGB8, w, h). taef2 works on the
/// raw 32-channel VAE latents, so the patches are de-normalized and unpatchified first.
pub fn preview(
    tae: &mut dyn Engine,
    c: &Flux2PipelineConfig,
    x: &[f32],
    lh: usize,
    lw: usize,
) -> Result<(Vec<u8>, usize, usize)> {
    let per = 4 * c.latent_channels * lh * lw;
    if x.len() < per {
        bail!("no latents to preview yet");
    }
    let z = to_vae_latent(&x[..per], c, 1, lh, lw);
    let name = tae.inputs()[0].name.clone();
    let input = float_input(tae, &name, &[1, c.latent_channels, 2 * lh, 2 * lw], &z)?;
    let out = tae.run(&[input]).context("taef2 preview decoder")?;
    let shape = out.first().map(|o| o.1.shape.clone()).unwrap_or_default();
    let [1, 3, h, w] = shape[..] else {
        bail!("the TAE decoder returned shape {shape:?}, [1, 3, H, W] expected");
    };
    // TAESD decoders give [0, 1]; map to the VAE's [-1, 1] for the shared conversion.
    let img: Vec<f32> = output_f32(&out, "")?
        .iter()
        .map(|v| v * 2.0 - 1.0)
        .collect();
    Ok((to_rgb8(&img, 1, h, w).remove(0), w, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Flux2PipelineConfig {
        Flux2PipelineConfig {
            arch: "flux2-klein-4b".into(),
            distilled: true,
            latent_channels: 2,
            vae_scale_factor: 8,
            bn_mean: (0..8).map(|i| i as f32 * 0.1).collect(),
            bn_std: (0..8).map(|i| 1.0 + i as f32 * 0.5).collect(),
            dynamic_shift: true,
            shift: 3.0,
            text_layers: vec![9, 18, 27],
            max_sequence_length: 512,
            pad_token_id: 0,
            chat_template: super::super::chat::CHATML.into(),
            default_steps: 4,
            default_sampler: "euler".into(),
            default_scheduler: "flux2".into(),
            default_width: 1024,
            default_height: 1024,
            default_cfg: 1.0,
        }
    }

    #[test]
    fn patches_round_trip_and_follow_diffusers_channel_order() {
        let c = config();
        // One raw latent [1, 2, 4, 2]: value = 100 c + 10 row + col.
        let z: Vec<f32> = (0..2)
            .flat_map(|ch| {
                (0..4).flat_map(move |r| (0..2).map(move |q| (100 * ch + 10 * r + q) as f32))
            })
            .collect();
        let x = from_vae_latent(&z, &c, 1, 2, 1);
        // Patch channel k = 4 c + 2 di + dj at patch (i, j) holds z[c, 2i + di, 2j + dj], normalized: channel 7
        // (c 1, di 1, dj 1) of patch (1, 0) is z[1, 3, 1] = 131.
        let k = 4 + 2 + 1;
        assert_eq!(z[(4 + 3) * 2 + 1], 131.0);
        let want = (131.0 - c.bn_mean[k]) / c.bn_std[k];
        assert!((x[k * 2 + 1] - want).abs() < 1e-6);
        let back = to_vae_latent(&x, &c, 1, 2, 1);
        for (a, b) in back.iter().zip(&z) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
    }

    #[test]
    fn references_are_sized_as_the_klein_image_processor() {
        // Small enough: cropped to multiples of 16 (1000x700 -> 992x688).
        assert_eq!(
            reference_size(1000, 700, 16).unwrap(),
            ((1000, 700), (992, 688))
        );
        // Over 1024^2: scaled to that area first (int() of the scaled sides), then cropped.
        assert_eq!(
            reference_size(2048, 1536, 16).unwrap(),
            ((1182, 886), (1168, 880))
        );
        assert!(reference_size(63, 100, 16).is_err());
        assert!(reference_size(64, 600, 16).is_err());
    }

    #[test]
    fn schedule_is_the_klein_pipelines() {
        // diffusers at 64 tokens and 4 steps: timesteps 1000, 954.69, 875.37, 700.71.
        let s = flux2_sigmas(&config(), "flux2", 4, 64).unwrap();
        let want = [1.0, 0.9546917, 0.8753689, 0.7007085, 0.0];
        for (a, b) in s.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{s:?}");
        }
        assert!(flux2_sigmas(&config(), "flux2", 0, 64).is_err());
        assert!(flux2_sigmas(&config(), "no-such-schedule", 4, 64).is_err());
    }
}
