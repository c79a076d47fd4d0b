//! Flux.1 text-to-image (and img2img) on `Engine`s: CLIP-L (pooled) and T5 (sequence) encode the prompt, the
//! transformer predicts the flow velocity on 2x2-packed latent tokens inside any registered sampler (default:
//! Euler over diffusers' FluxPipeline schedule, `linspace(1, 1/n, n)` shifted by the resolution-dependent mu for
//! dev and unshifted for schnell), the VAE decodes `latents / scaling + shift`, and PNGs carry the parameters.
//! Each engine is TensorRT or ONNX Runtime; this file does not care which. The generic request handling (CFG,
//! sampler loop, img2img, batches, previews) is `pipelines::image`.
use super::engines::{Backend, float_input, ids_input, open_components, output_f32, resolve};
use super::image::{ImageDefaults, ImageModel, ImagePipeline, Latent, Latents, Prediction};
use super::image_io::to_rgb8;
use crate::backend::{BackendChoice, DeviceTensor, Engine};
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::device::Device;
use crate::manifest::{EngineFile, ImageBundle, Pipeline};
use crate::onnx::DataType;
use crate::samplers::schedule;
use crate::tokenizer::{clip::ClipTokenizer, t5::T5Tokenizer};
use anyhow::{Context, Result, bail};
use cudarc::driver::DevicePtr;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What differs between Flux variants and what `generate` defaults to; recorded in the bundle's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FluxPipelineConfig {
    /// "flux-dev" or "flux-schnell".
    pub arch: String,
    /// Distilled guidance input (dev).
    pub guidance_embeds: bool,
    /// Resolution-dependent time shift (dev); schnell's schedule is unshifted.
    pub dynamic_shift: bool,
    pub latent_channels: usize,
    pub vae_scale_factor: usize,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// T5 sequence length (diffusers' max_sequence_length: 512 dev, 256 schnell).
    pub t5_max_len: usize,
    /// CLIP pad id (`<|endoftext|>` for Flux's CLIP-L).
    pub clip_pad: u32,
    pub default_steps: usize,
    pub default_guidance: f32,
    pub default_sampler: String,
    /// "flux" is diffusers' FluxPipeline schedule; any name of `samplers::schedule::SCHEDULERS` works too.
    pub default_scheduler: String,
    pub default_width: usize,
    pub default_height: usize,
}

impl FluxPipelineConfig {
    pub fn for_arch(arch: &str) -> Result<Self> {
        let dev = match arch {
            "flux-dev" => true,
            "flux-schnell" => false,
            other => bail!("unknown Flux arch '{other}'; valid: flux-dev, flux-schnell"),
        };
        Ok(Self {
            arch: arch.into(),
            guidance_embeds: dev,
            dynamic_shift: dev,
            latent_channels: 16,
            vae_scale_factor: 8,
            scaling_factor: 0.3611,
            shift_factor: 0.1159,
            t5_max_len: if dev { 512 } else { 256 },
            clip_pad: crate::tokenizer::clip::EOS,
            default_steps: if dev { 28 } else { 4 },
            default_guidance: if dev { 3.5 } else { 0.0 },
            default_sampler: "euler".into(),
            default_scheduler: "flux".into(),
            default_width: 1024,
            default_height: 1024,
        })
    }
}

pub struct FluxEngines {
    pub clip: Box<dyn Engine>,
    pub t5: Box<dyn Engine>,
    pub transformer: Box<dyn Engine>,
    pub vae_decoder: Box<dyn Engine>,
    pub vae_encoder: Option<Box<dyn Engine>>,
    /// Tiny autoencoder decoder for live previews.
    pub tae_decoder: Option<Box<dyn Engine>>,
}

/// The Flux family on the image seam.
pub struct FluxModel {
    pub config: FluxPipelineConfig,
    pub clip_tok: ClipTokenizer,
    pub t5_tok: T5Tokenizer,
    pub engines: FluxEngines,
    /// When set, every transformer run's `amax.<key>` outputs (a calibration graph's) are folded in here.
    pub amax: Option<std::collections::HashMap<String, f32>>,
    /// The GPU the engines run on: the sampler's latents, noise and guidance then stay there.
    pub device: Option<Arc<Device>>,
    /// Device copies of the constant transformer inputs: image ids per latent size, text ids.
    device_ids: Option<((usize, usize), DeviceBuffer, DeviceBuffer)>,
}

pub type FluxPipeline = ImagePipeline<FluxModel>;

/// Text conditioning of one prompt: T5 sequence [1, L, d] and CLIP pooled [1, 768]; on a GPU also their copies
/// repeated for a batch, uploaded once per prompt and batch size.
pub struct Cond {
    t5: Vec<f32>,
    t5_dim: usize,
    pooled: Vec<f32>,
    on_device: std::cell::RefCell<Option<(usize, DeviceBuffer, DeviceBuffer)>>,
}

/// The sigma schedule (n+1 values ending in 0): "flux" is diffusers' FluxPipeline (`linspace(1, 1/n, n)`,
/// time-shifted by mu when dynamic), other names come from the samplers' schedules.
pub fn flux_sigmas(
    cfg: &FluxPipelineConfig,
    scheduler: &str,
    steps: usize,
    tokens: usize,
) -> Result<Vec<f64>> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let mu = schedule::flux_mu(tokens as f64);
    if scheduler == "flux" {
        let mut v: Vec<f64> = (0..steps)
            .map(|i| {
                let s = if steps == 1 {
                    1.0
                } else {
                    1.0 + (1.0 / steps as f64 - 1.0) * i as f64 / (steps - 1) as f64
                } as f32;
                let s = if cfg.dynamic_shift {
                    (mu.exp() as f32) / (mu.exp() as f32 + (1.0 / s - 1.0))
                } else {
                    s
                };
                s as f64
            })
            .collect();
        v.push(0.0);
        return Ok(v);
    }
    let ms = if cfg.dynamic_shift {
        schedule::ModelSampling::flux(mu)
    } else {
        schedule::ModelSampling::sd3(1.0)
    };
    schedule::by_name(scheduler, steps, &ms, None).map_err(|e| {
        anyhow::anyhow!("{e} (or 'flux', diffusers' FluxPipeline schedule, the default)")
    })
}

impl FluxModel {
    /// A model on engines opened on the CPU or with host I/O (latents in host memory).
    pub fn new(
        config: FluxPipelineConfig,
        clip_tok: ClipTokenizer,
        t5_tok: T5Tokenizer,
        engines: FluxEngines,
    ) -> Self {
        FluxModel {
            config,
            clip_tok,
            t5_tok,
            engines,
            amax: None,
            device: None,
            device_ids: None,
        }
    }

    /// Opens a Flux bundle's components on `backend`.
    pub fn open(engine: &EngineFile, bundle: &ImageBundle, backend: Backend) -> Result<Self> {
        let config: FluxPipelineConfig = serde_json::from_value(bundle.config.clone())
            .with_context(|| {
                format!(
                    "the manifest of '{}' has no valid Flux settings; rebuild the bundle with this trt-diff",
                    engine.path.display()
                )
            })?;
        let parts = open_components(
            engine,
            &bundle.components,
            &[
                ("clip", true),
                ("t5", true),
                ("transformer", true),
                ("vae_decoder", true),
                ("vae_encoder", false),
                ("tae_decoder", false),
            ],
            backend,
            &bundle.arch,
        )?;
        let [clip, t5, transformer, vae_decoder, vae_encoder, tae_decoder]: [Option<
            Box<dyn Engine>,
        >; 6] = parts
            .try_into()
            .map_err(|_| anyhow::anyhow!("six components were asked for"))?;
        let required = |e: Option<Box<dyn Engine>>| e.context("a required component is missing");
        let tokenizer = |name: &str| -> Result<std::path::PathBuf> {
            let f = bundle.tokenizers.get(name).with_context(|| {
                format!(
                    "the bundle '{}' names no {name} tokenizer; rebuild it",
                    engine.path.display()
                )
            })?;
            engine.file(f, &format!("the {name} tokenizer"))
        };
        Ok(FluxModel {
            clip_tok: load_clip_tokenizer(&tokenizer("clip")?, config.clip_pad)?,
            t5_tok: T5Tokenizer::load(&tokenizer("t5")?)?,
            config,
            engines: FluxEngines {
                clip: required(clip)?,
                t5: required(t5)?,
                transformer: required(transformer)?,
                vae_decoder: required(vae_decoder)?,
                vae_encoder,
                tae_decoder,
            },
            amax: None,
            // On a GPU (TensorRT or ONNX Runtime CUDA) the sampler's latents live there too.
            device: match backend {
                Backend::Cuda(id) => Some(Device::open(id as usize)?),
                Backend::Trt => Some(Device::open(0)?),
                Backend::Cpu => None,
            },
            device_ids: None,
        })
    }

    /// The transformer on host latents.
    fn predict_host(
        &mut self,
        x: &[f32],
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
        guidance: f32,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let (b, tokens, ch) = (lat.batch, tokens(lat), 4 * c.latent_channels);
        let t5_len = c.t5_max_len;
        let e = self.engines.transformer.as_ref();
        let (d, pd) = (cond.t5_dim, cond.pooled.len());
        let mut inputs = vec![
            float_input(e, "hidden_states", &[b, tokens, ch], x)?,
            float_input(
                e,
                "encoder_hidden_states",
                &[b, t5_len, d],
                &cond.t5.repeat(b),
            )?,
            float_input(e, "pooled_projections", &[b, pd], &cond.pooled.repeat(b))?,
            float_input(e, "timestep", &[b], &vec![sigma as f32; b])?,
            float_input(
                e,
                "img_ids",
                &[tokens, 3],
                &image_ids(lat.height, lat.width),
            )?,
            float_input(e, "txt_ids", &[t5_len, 3], &vec![0f32; t5_len * 3])?,
        ];
        if c.guidance_embeds {
            inputs.push(float_input(e, "guidance", &[b], &vec![guidance; b])?);
        }
        let out = self
            .engines
            .transformer
            .run(&inputs)
            .context("Flux transformer")?;
        if let Some(map) = self.amax.as_mut() {
            crate::models::flux::merge_amax(map, &out);
        }
        output_f32(&out, "sample")
    }

    /// The transformer on device latents: constant inputs uploaded once, the latents and the output bound by
    /// address, only the timestep (and guidance) copied per call.
    fn predict_device(
        &mut self,
        x: &DeviceBuffer,
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
        guidance: f32,
        out: &mut DeviceBuffer,
    ) -> Result<()> {
        let dev = self
            .device
            .clone()
            .context("device latents without a GPU engine")?;
        let dev = &dev;
        let c = &self.config;
        let (b, tokens, ch, t5_len) = (lat.batch, tokens(lat), 4 * c.latent_channels, c.t5_max_len);
        {
            let mut on = cond.on_device.borrow_mut();
            if on.as_ref().is_none_or(|(n, _, _)| *n != b) {
                *on = Some((
                    b,
                    DeviceBuffer::from_host(dev, &cond.t5.repeat(b))?,
                    DeviceBuffer::from_host(dev, &cond.pooled.repeat(b))?,
                ));
            }
        }
        if self
            .device_ids
            .as_ref()
            .is_none_or(|(k, _, _)| *k != (lat.height, lat.width))
        {
            self.device_ids = Some((
                (lat.height, lat.width),
                DeviceBuffer::from_host(dev, &image_ids(lat.height, lat.width))?,
                DeviceBuffer::from_host(dev, &vec![0f32; t5_len * 3])?,
            ));
        }
        let e = self.engines.transformer.as_mut();
        for d in e.inputs() {
            if d.dtype != DataType::FLOAT && d.name != "timestep" && d.name != "guidance" {
                bail!(
                    "the transformer's input {d} is not f32, which the device path binds; rebuild the bundle with \
                     this trt-diff"
                );
            }
        }
        let on = cond.on_device.borrow();
        let (_, t5, pooled) = on.as_ref().expect("uploaded above");
        let (_, img_ids, txt_ids) = self.device_ids.as_ref().expect("uploaded above");
        let at = |buf: &DeviceBuffer, shape: Vec<usize>| {
            let (p, _sync) = buf.data.device_ptr(&dev.stream);
            DeviceTensor {
                ptr: p,
                dtype: DataType::FLOAT,
                shape,
            }
        };
        let inputs = [
            ("hidden_states", at(x, vec![b, tokens, ch])),
            (
                "encoder_hidden_states",
                at(t5, vec![b, t5_len, cond.t5_dim]),
            ),
            ("pooled_projections", at(pooled, vec![b, cond.pooled.len()])),
            ("img_ids", at(img_ids, vec![tokens, 3])),
            ("txt_ids", at(txt_ids, vec![t5_len, 3])),
        ];
        let outputs = [("sample", at(out, vec![b, tokens, ch]))];
        let mut host = vec![float_input(e, "timestep", &[b], &vec![sigma as f32; b])?];
        if c.guidance_embeds {
            host.push(float_input(e, "guidance", &[b], &vec![guidance; b])?);
        }
        // The sampler's kernels wrote `x` on our stream; the engine reads it on its own.
        dev.synchronize()?;
        e.run_device(&inputs, &host, &outputs)
            .context("Flux transformer")
    }
}

/// Opens a Flux bundle (its manifest read once into `engine`) on the chosen backend.
pub fn open_pipeline(engine: &EngineFile, choice: BackendChoice) -> Result<FluxPipeline> {
    let Some(Pipeline::Image(bundle)) = engine.pipeline() else {
        bail!(
            "'{}' is not an image bundle; build one with `trt-diff build MODEL_DIR --arch flux-dev ...`",
            engine.path.display()
        );
    };
    let backend = resolve(choice, engine)?;
    Ok(ImagePipeline::new(FluxModel::open(
        engine, bundle, backend,
    )?))
}

pub fn load_clip_tokenizer(path: &std::path::Path, pad: u32) -> Result<ClipTokenizer> {
    let mut t = ClipTokenizer::load(path)?;
    t.pad = pad;
    Ok(t)
}

impl ImageModel for FluxModel {
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
            guidance: c.default_guidance,
            guidance_input: c.guidance_embeds,
            cfg: 1.0,
        }
    }

    fn prediction(&self) -> Prediction {
        Prediction::Flow
    }

    fn latents(&self, w: usize, h: usize, batch: usize) -> Result<Latents> {
        let c = &self.config;
        if w == 0 || h == 0 || !w.is_multiple_of(16) || !h.is_multiple_of(16) {
            bail!(
                "--width {w} --height {h}: Flux needs both to be positive multiples of 16 (the VAE's 8x and the \
                 2x2 patches); try {}x{}",
                (w.max(16) / 16) * 16,
                (h.max(16) / 16) * 16
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
        flux_sigmas(&self.config, scheduler, steps, tokens(lat))
    }

    fn encode_prompt(&mut self, prompt: &str) -> Result<Cond> {
        let (clip_ids, dropped) = self
            .clip_tok
            .encode_padded(prompt, crate::tokenizer::clip::MAX_LEN);
        if dropped > 0 {
            // As diffusers: CLIP only gives the pooled vector; T5 carries the whole prompt.
            tracing::warn!("the prompt is longer than CLIP's 77 tokens; CLIP sees the first 75");
        }
        let max = self.config.t5_max_len;
        let (t5_ids, t5_dropped) = self.t5_tok.encode_padded(prompt, max)?;
        if t5_dropped > 0 {
            bail!(
                "the prompt is {} T5 tokens, over this bundle's limit of {max} (including </s>): shorten it by {} \
                 tokens",
                max + t5_dropped,
                t5_dropped
            );
        }
        let out = self
            .engines
            .clip
            .run(&[ids_input("input_ids", &[1, 77], &clip_ids)])
            .context("CLIP text encoder")?;
        let pooled = output_f32(&out, "pooler_output")?;
        let out = self
            .engines
            .t5
            .run(&[ids_input("input_ids", &[1, max], &t5_ids)])
            .context("T5 encoder")?;
        let t5 = output_f32(&out, "last_hidden_state")?;
        Ok(Cond {
            t5_dim: t5.len() / max,
            t5,
            pooled,
            on_device: Default::default(),
        })
    }

    fn predict(
        &mut self,
        x: &Latent,
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
        guidance: f32,
        out: &mut Latent,
    ) -> Result<()> {
        match (x, out) {
            (Latent::Device(x), Latent::Device(out)) => {
                self.predict_device(x, sigma, cond, lat, guidance, out)
            }
            (Latent::Host(x), Latent::Host(out)) => {
                *out = self.predict_host(x, sigma, cond, lat, guidance)?;
                Ok(())
            }
            _ => bail!("host and device latents mixed in one call (a pipeline bug)"),
        }
    }

    fn initial_noise(&mut self, seed: u64, lat: &Latents) -> Result<Latent> {
        let per = lat.channels * lat.height * lat.width;
        let Some(dev) = self.device.clone() else {
            let mut all = Vec::with_capacity(lat.len());
            let mut z = vec![0f32; per];
            for i in 0..lat.batch {
                crate::samplers::noise::fill_normal_host(&mut z, seed + i as u64, 0);
                all.extend(pack(&z, 1, lat.channels, lat.height, lat.width));
            }
            return Ok(Latent::Host(all));
        };
        // Per image: Philox noise of seed + i into [C, H, W], packed into its slice of the batch, on the GPU.
        let mut z = DeviceBuffer::zeros(&dev, per * lat.batch)?;
        let mut one = DeviceBuffer::zeros(&dev, per)?;
        for i in 0..lat.batch {
            crate::samplers::buffer::Buffer::fill_normal(&mut one, seed + i as u64, 0)?;
            dev.stream
                .memcpy_dtod(&one.data, &mut z.data.slice_mut(i * per..(i + 1) * per))
                .context("copying noise on the GPU failed")?;
        }
        let mut x = DeviceBuffer::zeros(&dev, per * lat.batch)?;
        dev.flux_pack(
            &mut x.data,
            &z.data,
            [lat.batch, lat.channels, lat.height, lat.width],
        )?;
        Ok(Latent::Device(x))
    }

    fn latent(&mut self, v: Vec<f32>) -> Result<Latent> {
        Ok(match &self.device {
            Some(dev) => Latent::Device(DeviceBuffer::from_host(dev, &v)?),
            None => Latent::Host(v),
        })
    }
    /// Init image -> packed, scaled latents [1, tokens, 4C] (VAE encoder mean).
    fn encode_image(&mut self, rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let c = self.config.clone();
        let Some(enc) = self.engines.vae_encoder.as_mut() else {
            bail!(
                "--init-image needs the VAE encoder, which this bundle does not have; rebuild it from a model \
                 folder whose vae/ has the encoder weights"
            );
        };
        let (h, w) = (
            lat.height * c.vae_scale_factor,
            lat.width * c.vae_scale_factor,
        );
        let name = enc.inputs()[0].name.clone();
        let input = float_input(enc.as_ref(), &name, &[1, 3, h, w], rgb)?;
        let out = enc.run(&[input]).context("VAE encoder")?;
        let m = output_f32(&out, "mean")?;
        let per = lat.per_image;
        // An encoder returning the moments [mean, logvar] gives its mean (diffusers' mode()).
        if m.len() != per && m.len() != 2 * per {
            bail!(
                "the VAE encoder returned {} values, {per} expected",
                m.len()
            );
        }
        let z: Vec<f32> = m[..per]
            .iter()
            .map(|v| (v - c.shift_factor) * c.scaling_factor)
            .collect();
        Ok(pack(&z, 1, lat.channels, lat.height, lat.width))
    }

    /// Packed latents -> RGB8 images through the VAE decoder.
    fn decode(&mut self, x: &Latent, lat: &Latents) -> Result<Vec<Vec<u8>>> {
        let x = &x.to_host()?;
        let c = &self.config;
        let (b, lh, lw) = (lat.batch, lat.height, lat.width);
        let mut z = unpack(x, b, c.latent_channels, lh, lw);
        for v in z.iter_mut() {
            *v = *v / c.scaling_factor + c.shift_factor;
        }
        let e = self.engines.vae_decoder.as_ref();
        let name = e.inputs()[0].name.clone();
        let input = float_input(e, &name, &[b, c.latent_channels, lh, lw], &z)?;
        let out = self
            .engines
            .vae_decoder
            .run(&[input])
            .context("VAE decoder")?;
        let img = output_f32(&out, "image")?;
        let (h, w) = (lh * c.vae_scale_factor, lw * c.vae_scale_factor);
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
        let x0 = &x0.to_host()?;
        let tae = self
            .engines
            .tae_decoder
            .as_mut()
            .context("this bundle has no preview decoder")?;
        preview(tae.as_mut(), &self.config, x0, lat.height, lat.width)
    }
}

/// Transformer tokens of one image: its 2x2 latent patches.
fn tokens(lat: &Latents) -> usize {
    lat.height / 2 * (lat.width / 2)
}

/// The first image of packed latents (an x0 estimate) through the tiny autoencoder's decoder: (RGB8, w, h).
fn preview(
    tae: &mut dyn Engine,
    c: &FluxPipelineConfig,
    x: &[f32],
    lh: usize,
    lw: usize,
) -> Result<(Vec<u8>, usize, usize)> {
    let per = lh / 2 * (lw / 2) * c.latent_channels * 4;
    if x.len() < per {
        bail!("no latents to preview yet");
    }
    // TAESD works on the sampler's latent space itself: unpacked, no VAE scaling or shift.
    let z = unpack(&x[..per], 1, c.latent_channels, lh, lw);
    let name = tae.inputs()[0].name.clone();
    let input = float_input(tae, &name, &[1, c.latent_channels, lh, lw], &z)?;
    let out = tae.run(&[input]).context("TAE preview decoder")?;
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

/// [B, C, H, W] -> [B, (H/2)(W/2), 4C]: token (i, j) holds the 2x2 patch at (2i, 2j), channel-major within it.
pub fn pack(x: &[f32], b: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![0f32; x.len()];
    for n in 0..b {
        for i in 0..h2 {
            for j in 0..w2 {
                for ch in 0..c {
                    for di in 0..2 {
                        for dj in 0..2 {
                            let src = ((n * c + ch) * h + 2 * i + di) * w + 2 * j + dj;
                            let tok = (n * h2 + i) * w2 + j;
                            out[tok * 4 * c + ch * 4 + di * 2 + dj] = x[src];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Inverse of [`pack`].
pub fn unpack(x: &[f32], b: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let (h2, w2) = (h / 2, w / 2);
    let mut out = vec![0f32; x.len()];
    for n in 0..b {
        for i in 0..h2 {
            for j in 0..w2 {
                for ch in 0..c {
                    for di in 0..2 {
                        for dj in 0..2 {
                            let dst = ((n * c + ch) * h + 2 * i + di) * w + 2 * j + dj;
                            let tok = (n * h2 + i) * w2 + j;
                            out[dst] = x[tok * 4 * c + ch * 4 + di * 2 + dj];
                        }
                    }
                }
            }
        }
    }
    out
}

/// Image token ids [(h/2)(w/2), 3] = (0, row, col) for a latent of h x w.
pub fn image_ids(h: usize, w: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(h / 2 * w / 2 * 3);
    for i in 0..h / 2 {
        for j in 0..w / 2 {
            v.extend_from_slice(&[0.0, i as f32, j as f32]);
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_matches_diffusers_layout_and_inverts() {
        // diffusers: view(B, C, H/2, 2, W/2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, HW/4, 4C).
        let (b, c, h, w) = (2, 3, 4, 6);
        let x: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
        let p = pack(&x, b, c, h, w);
        // token (n=1, i=1, j=2), channel 2, (di, dj) = (1, 0)
        let tok = (h / 2 + 1) * (w / 2) + 2;
        assert_eq!(p[tok * 4 * c + 2 * 4 + 2], x[((c + 2) * h + 3) * w + 4]);
        assert_eq!(unpack(&p, b, c, h, w), x);
        assert_eq!(&image_ids(4, 6)[9..12], &[0.0, 1.0, 0.0]);
    }
}
