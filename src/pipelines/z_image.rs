//! Z-Image-Turbo text-to-image (and img2img) on `Engine`s, as diffusers' `ZImagePipeline`: the prompt goes through
//! the tokenizer's chat template (one user turn plus the generation prompt), the Qwen2 BPE tokenizer (at most
//! `max_sequence_length` tokens) and the Qwen3 encoder, whose second-to-last hidden states of the prompt's tokens
//! condition the S3-DiT transformer; the transformer runs on the unpacked 16-channel latents inside any registered
//! sampler (default: Euler over the pipeline's schedule, `linspace(1, 1/n, n)` shifted by the scheduler config's
//! `shift`), without classifier-free guidance by default (diffusers' `guidance_scale` g is `--cfg 1 + g` here);
//! the VAE decodes `latents / scaling + shift`. Latents stay in host memory; each engine runs on TensorRT or ONNX
//! Runtime.
use super::device_io::{self, DeviceSlots};
use super::engines::{
    Backend, VaeScaling, float_input, ids_input, open_components, output_f32, resolve, vae_decode,
    vae_encode,
};
use super::image::{ImageDefaults, ImageModel, ImagePipeline, Latent, Latents, Prediction};
use crate::backend::{BackendChoice, Engine};
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::device::Device;
use crate::manifest::{EngineFile, ImageBundle, Pipeline};
use crate::models::z_image::{SEQ_MULTI_OF, image_ids, text_ids};
use crate::samplers::schedule;
use crate::tokenizer::qwen::QwenTokenizer;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What `generate` needs besides the engines; recorded in the bundle's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZImagePipelineConfig {
    pub arch: String,
    pub latent_channels: usize,
    pub vae_scale_factor: usize,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// The scheduler config's static time shift (Z-Image-Turbo: 3.0).
    pub shift: f32,
    /// Resolution-dependent shift (`use_dynamic_shifting`) with diffusers' `calculate_shift` line through
    /// (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).
    pub dynamic_shift: bool,
    pub base_image_seq_len: f64,
    pub max_image_seq_len: f64,
    pub base_shift: f64,
    pub max_shift: f64,
    /// Longest tokenized prompt (diffusers' `max_sequence_length`, 512); longer prompts are truncated as there.
    pub max_sequence_length: usize,
    /// The tokenizer's Jinja chat template.
    pub chat_template: String,
    pub default_steps: usize,
    pub default_sampler: String,
    /// "z-image" is diffusers' ZImagePipeline schedule; any name of `samplers::schedule::SCHEDULERS` works too.
    pub default_scheduler: String,
    pub default_width: usize,
    pub default_height: usize,
    /// Classifier-free guidance when the request leaves it unset (1 = off, Turbo's default).
    pub default_cfg: f32,
}

pub struct ZImageEngines {
    pub text_encoder: Box<dyn Engine>,
    pub transformer: Box<dyn Engine>,
    pub vae_decoder: Box<dyn Engine>,
    pub vae_encoder: Option<Box<dyn Engine>>,
}

/// The Z-Image family on the image seam.
pub struct ZImageModel {
    pub config: ZImagePipelineConfig,
    pub tokenizer: QwenTokenizer,
    pub engines: ZImageEngines,
    /// When set, every transformer run's `amax.<key>` outputs (a calibration graph's) are folded in here.
    pub amax: Option<std::collections::HashMap<String, f32>>,
    /// On a GPU backend: where the sampler's latents live, with the transformer's inputs and outputs bound to
    /// them.
    device: Option<Arc<Device>>,
    on_device: DeviceSlots,
}

pub type ZImagePipeline = ImagePipeline<ZImageModel>;

/// One prompt's conditioning: the encoder's hidden states [len, dim] of its tokens.
pub struct Cond {
    /// Identifies this conditioning's device copies (`device_io::next_cond_id`).
    id: u64,
    feats: Vec<f32>,
    len: usize,
}

/// The prompt as ZImagePipeline gives it to the tokenizer: the chat template rendered for one user message with
/// the generation prompt (diffusers passes `enable_thinking=True`, which Qwen3's template treats as unset).
pub fn format_prompt(template: &str, prompt: &str) -> Result<String> {
    let msg = super::chat::ChatMessage {
        role: "user".into(),
        content: prompt.into(),
        name: None,
    };
    super::chat::render(template, &[msg], "", "", true)
}

/// The sigma schedule (n+1 values ending in 0): "z-image" is diffusers' ZImagePipeline (`linspace(1, 1/n, n)`
/// through FlowMatchEulerDiscreteScheduler's shift, in f32 as there); other names come from the samplers'
/// schedules on the same shifted flow.
pub fn z_image_sigmas(
    c: &ZImagePipelineConfig,
    scheduler: &str,
    steps: usize,
    tokens: usize,
) -> Result<Vec<f64>> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len);
    let mu = tokens as f64 * slope + (c.base_shift - slope * c.base_image_seq_len);
    if scheduler == "z-image" {
        let mut v: Vec<f64> = (0..steps)
            .map(|i| {
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / steps as f64 - 1.0) * i as f64 / (steps - 1) as f64
                } as f32;
                let s = if c.dynamic_shift {
                    let e = mu.exp() as f32;
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
        anyhow::anyhow!("{e} (or 'z-image', diffusers' ZImagePipeline schedule, the default)")
    })
}

impl ZImageModel {
    pub fn new(
        config: ZImagePipelineConfig,
        tokenizer: QwenTokenizer,
        engines: ZImageEngines,
    ) -> Self {
        ZImageModel {
            config,
            tokenizer,
            engines,
            amax: None,
            device: None,
            on_device: DeviceSlots::default(),
        }
    }

    /// Opens a Z-Image bundle's components on `backend`.
    pub fn open(engine: &EngineFile, bundle: &ImageBundle, backend: Backend) -> Result<Self> {
        let config: ZImagePipelineConfig = serde_json::from_value(bundle.config.clone())
            .with_context(|| {
                format!(
                    "the manifest of '{}' has no valid Z-Image settings; rebuild the bundle with this trt-diff",
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
            ],
            backend,
            &bundle.arch,
        )?;
        let [text_encoder, transformer, vae_decoder, vae_encoder]: [Option<Box<dyn Engine>>; 4] =
            parts
                .try_into()
                .map_err(|_| anyhow::anyhow!("four components were asked for"))?;
        let required = |e: Option<Box<dyn Engine>>| e.context("a required component is missing");
        let tok = bundle.tokenizers.get("qwen").with_context(|| {
            format!(
                "the bundle '{}' names no qwen tokenizer; rebuild it",
                engine.path.display()
            )
        })?;
        let tokenizer = QwenTokenizer::load(&engine.file(tok, "the qwen tokenizer")?)?;
        let mut model = ZImageModel::new(
            config,
            tokenizer,
            ZImageEngines {
                text_encoder: required(text_encoder)?,
                transformer: required(transformer)?,
                vae_decoder: required(vae_decoder)?,
                vae_encoder,
            },
        );
        model.device = device_io::open_device(backend)?;
        Ok(model)
    }

    /// diffusers' raw transformer output for host latents [B, C, H, W] at `sigma`.
    fn transformer(
        &mut self,
        x: &[f32],
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
    ) -> Result<Vec<f32>> {
        let b = lat.batch;
        let e = self.engines.transformer.as_ref();
        let dim = cond.feats.len() / cond.len.max(1);
        let cap_pad = cond.len.next_multiple_of(SEQ_MULTI_OF);
        let img_pad = (lat.height / 2 * (lat.width / 2)).next_multiple_of(SEQ_MULTI_OF);
        // As the pipeline: timesteps are sigma * 1000 in f32, the model gets (1000 - t) / 1000.
        let t = (1000.0 - sigma as f32 * 1000.0) / 1000.0;
        let inputs = vec![
            float_input(e, "latents", &[b, lat.channels, lat.height, lat.width], x)?,
            float_input(e, "timestep", &[b], &vec![t; b])?,
            float_input(e, "cap_feats", &[b, cond.len, dim], &cond.feats.repeat(b))?,
            float_input(
                e,
                "img_ids",
                &[img_pad, 3],
                &image_ids(lat.height, lat.width, cap_pad),
            )?,
            float_input(e, "txt_ids", &[cap_pad, 3], &text_ids(cond.len))?,
        ];
        let out = self
            .engines
            .transformer
            .run(&inputs)
            .context("Z-Image transformer")?;
        if let Some(map) = self.amax.as_mut() {
            crate::models::qdq::merge_amax(map, &out);
        }
        let v = output_f32(&out, "sample")?;
        if v.len() != x.len() {
            bail!(
                "the transformer returned {} values, {} expected",
                v.len(),
                x.len()
            );
        }
        Ok(v)
    }

    /// The transformer on device latents, as [`ZImageModel::transformer`]: the latents and the output bound by
    /// address, the caption features uploaded once per prompt and batch, the position ids once per size, only
    /// the timestep copied per call.
    fn transformer_device(
        &mut self,
        x: &DeviceBuffer,
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
        out: &mut DeviceBuffer,
    ) -> Result<()> {
        let dev = self
            .device
            .clone()
            .context("device latents without a GPU engine")?;
        let b = lat.batch;
        let dim = cond.feats.len() / cond.len.max(1);
        let cap_pad = cond.len.next_multiple_of(SEQ_MULTI_OF);
        let img_pad = (lat.height / 2 * (lat.width / 2)).next_multiple_of(SEQ_MULTI_OF);
        let slots = &mut self.on_device;
        let feats = device_io::key(&[cond.id, b as u64]);
        slots.upload(&dev, "cap_feats", feats, || Ok(cond.feats.repeat(b)))?;
        let size = device_io::key(&[lat.height as u64, lat.width as u64, cap_pad as u64]);
        slots.upload(&dev, "img_ids", size, || {
            Ok(image_ids(lat.height, lat.width, cap_pad))
        })?;
        slots.upload(&dev, "txt_ids", cond.len as u64, || Ok(text_ids(cond.len)))?;
        let t = (1000.0 - sigma as f32 * 1000.0) / 1000.0;
        let e = self.engines.transformer.as_mut();
        let host = [float_input(e, "timestep", &[b], &vec![t; b])?];
        let slots = &self.on_device;
        let shape = vec![b, lat.channels, lat.height, lat.width];
        let inputs = [
            ("latents", x, shape.clone()),
            (
                "cap_feats",
                slots.get("cap_feats", feats)?,
                vec![b, cond.len, dim],
            ),
            ("img_ids", slots.get("img_ids", size)?, vec![img_pad, 3]),
            (
                "txt_ids",
                slots.get("txt_ids", cond.len as u64)?,
                vec![cap_pad, 3],
            ),
        ];
        let outputs = [("sample", &*out, shape)];
        device_io::run_on_device(e, &dev, "Z-Image transformer", &inputs, &host, &outputs)
    }
}

/// Opens a Z-Image bundle (its manifest read once into `engine`) on the chosen backend.
pub fn open_pipeline(engine: &EngineFile, choice: BackendChoice) -> Result<ZImagePipeline> {
    let Some(Pipeline::Image(bundle)) = engine.pipeline() else {
        bail!(
            "'{}' is not an image bundle; build one with `trt-diff build MODEL_DIR --arch z-image-turbo ...`",
            engine.path.display()
        );
    };
    let backend = resolve(choice, engine)?;
    Ok(ImagePipeline::new(ZImageModel::open(
        engine, bundle, backend,
    )?))
}

impl ImageModel for ZImageModel {
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

    fn latents(&self, w: usize, h: usize, batch: usize) -> Result<Latents> {
        let c = &self.config;
        let m = 2 * c.vae_scale_factor;
        if w == 0 || h == 0 || !w.is_multiple_of(m) || !h.is_multiple_of(m) {
            bail!(
                "--width {w} --height {h}: Z-Image needs both to be positive multiples of {m} (the VAE's \
                 {}x and the 2x2 patches); try {}x{}",
                c.vae_scale_factor,
                (w.max(m) / m) * m,
                (h.max(m) / m) * m
            );
        }
        let (lh, lw) = (h / c.vae_scale_factor, w / c.vae_scale_factor);
        Ok(Latents {
            batch,
            channels: c.latent_channels,
            height: lh,
            width: lw,
            per_image: c.latent_channels * lh * lw,
        })
    }

    fn sigmas(&self, scheduler: &str, steps: usize, lat: &Latents) -> Result<Vec<f64>> {
        z_image_sigmas(
            &self.config,
            scheduler,
            steps,
            lat.height / 2 * (lat.width / 2),
        )
    }

    fn encode_prompt(&mut self, prompt: &str) -> Result<Cond> {
        let text = format_prompt(&self.config.chat_template, prompt)?;
        let mut ids = self.tokenizer.encode(&text)?;
        let max = self.config.max_sequence_length;
        if ids.len() > max {
            // As diffusers (truncation=True): the end of the formatted prompt is cut.
            tracing::warn!(
                "the prompt is {} tokens with its chat template; the text encoder sees the first {max}",
                ids.len()
            );
            ids.truncate(max);
        }
        let out = self
            .engines
            .text_encoder
            .run(&[ids_input("input_ids", &[1, ids.len()], &ids)])
            .context("Qwen3 text encoder")?;
        let feats = output_f32(&out, "hidden_states")?;
        Ok(Cond {
            id: device_io::next_cond_id(),
            len: ids.len(),
            feats,
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
        // The pipeline steps with the negated output: the velocity noise - x0 of the seam's flow convention.
        match (x, &mut *out) {
            (Latent::Host(x), Latent::Host(o)) => {
                *o = self
                    .transformer(x, sigma, cond, lat)?
                    .into_iter()
                    .map(|v| -v)
                    .collect();
                Ok(())
            }
            (Latent::Device(x), Latent::Device(o)) => {
                self.transformer_device(x, sigma, cond, lat, o)?;
                crate::samplers::buffer::Buffer::lincomb_raw(o, -1.0, &[])
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

    /// Init image -> scaled latent [1, C, h, w] (the VAE encoder's mean).
    fn encode_image(&mut self, rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let c = &self.config;
        let s = VaeScaling {
            scale: c.scaling_factor,
            shift: c.shift_factor,
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
            shift: c.shift_factor,
            spatial: c.vae_scale_factor,
        };
        let dims = [lat.batch, c.latent_channels, lat.height, lat.width];
        vae_decode(self.engines.vae_decoder.as_mut(), &x.to_host()?, dims, s)
    }

    fn can_preview(&self) -> bool {
        false
    }

    fn preview(&mut self, _x0: &Latent, _lat: &Latents) -> Result<(Vec<u8>, usize, usize)> {
        bail!("Z-Image bundles have no preview decoder yet")
    }
}
