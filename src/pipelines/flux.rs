//! Flux.1 text-to-image (and img2img) on `Engine`s: CLIP-L (pooled) and T5 (sequence) encode the prompt, the
//! transformer predicts the flow velocity on 2x2-packed latent tokens inside any registered sampler (default:
//! Euler over diffusers' FluxPipeline schedule, `linspace(1, 1/n, n)` shifted by the resolution-dependent mu for
//! dev and unshifted for schnell), the VAE decodes `latents / scaling + shift`, and PNGs carry the parameters.
//! Each engine is TensorRT or ONNX Runtime; this file does not care which.
use crate::backend::{Engine, HostTensor};
use crate::onnx::DataType;
use crate::pipelines::flux_image::{image_ids, load_init_image, pack, to_rgb8, unpack};
use crate::samplers::{model::Denoiser, noise, registry, schedule, stepper};
use crate::tokenizer::{clip::ClipTokenizer, t5::T5Tokenizer};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

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

/// One image request. `None` fields take the bundle's defaults.
#[derive(Clone, Debug, Default)]
pub struct FluxRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub sampler: Option<String>,
    pub scheduler: Option<String>,
    pub seed: u64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Distilled guidance (dev).
    pub guidance: Option<f32>,
    /// True classifier-free guidance with the negative prompt (1 = off; doubles the transformer calls).
    pub cfg: f32,
    pub batch: usize,
    pub init_image: Option<PathBuf>,
    /// img2img: fraction of the schedule re-run from the noised init image (1 = ignore the image).
    pub strength: f32,
    /// Packed initial noise [batch, tokens, 4C] instead of Philox noise (reproducing other implementations).
    pub initial_noise: Option<Vec<f32>>,
    /// Skip the VAE (tests of the latents).
    pub latents_only: bool,
    /// Write a preview PNG of the current x0 estimate here after each step (needs the TAE decoder).
    pub preview: Option<PathBuf>,
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

pub struct FluxPipeline {
    pub config: FluxPipelineConfig,
    pub clip_tok: ClipTokenizer,
    pub t5_tok: T5Tokenizer,
    pub engines: FluxEngines,
    /// When set, every transformer run's `amax.<key>` outputs (a calibration graph's) are folded in here.
    pub amax: Option<std::collections::HashMap<String, f32>>,
}

pub struct StepInfo {
    pub step: usize,
    pub steps: usize,
    pub seconds: f64,
}

pub struct FluxOutput {
    pub width: usize,
    pub height: usize,
    /// RGB8 per image (empty with `latents_only`).
    pub images: Vec<Vec<u8>>,
    /// Final packed latents [batch, tokens, 4C].
    pub latents: Vec<f32>,
    pub step_seconds: Vec<f64>,
    /// "prompt, steps, sampler, ..." as written into the PNG.
    pub parameters: String,
}

/// A float tensor for `engine`'s input `name`, converted to the input's dtype.
fn float_input(
    engine: &dyn Engine,
    name: &str,
    shape: &[usize],
    v: &[f32],
) -> Result<(String, HostTensor)> {
    let Some(d) = engine.inputs().iter().find(|d| d.name == name) else {
        let names: Vec<&str> = engine.inputs().iter().map(|d| d.name.as_str()).collect();
        bail!(
            "engine has no input '{name}' (inputs: {}); was it exported by another tool?",
            names.join(", ")
        );
    };
    let (shape, data) = (shape.to_vec(), v);
    let bytes = match d.dtype {
        DataType::FLOAT => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DataType::FLOAT16 => data
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DataType::BFLOAT16 => data
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        other => bail!("input '{name}' is {other}; a float input was expected"),
    };
    Ok((
        name.to_string(),
        HostTensor {
            dtype: d.dtype,
            shape,
            data: bytes,
        },
    ))
}

fn ids_input(name: &str, shape: &[usize], ids: &[u32]) -> (String, HostTensor) {
    (
        name.to_string(),
        HostTensor {
            dtype: DataType::INT64,
            shape: shape.to_vec(),
            data: ids.iter().flat_map(|&i| (i as i64).to_le_bytes()).collect(),
        },
    )
}

/// Output `i` of a run as f32 values.
fn output_f32(out: &[(String, HostTensor)], name: &str) -> Result<Vec<f32>> {
    let t = out
        .iter()
        .find(|(n, _)| n == name)
        .or(out.first())
        .with_context(|| format!("engine returned no output '{name}'"))?;
    Ok(t.1
        .to_f64()
        .with_context(|| format!("output '{}' is not numeric", t.0))?
        .into_iter()
        .map(|v| v as f32)
        .collect())
}

/// Text conditioning of one prompt: T5 sequence [1, L, d] and CLIP pooled [1, 768].
struct Cond {
    t5: Vec<f32>,
    t5_dim: usize,
    pooled: Vec<f32>,
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

impl FluxPipeline {
    fn encode(&mut self, prompt: &str) -> Result<Cond> {
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
        })
    }

    /// Runs a request; `on_step` sees each finished step (progress bars, previews).
    pub fn generate(
        &mut self,
        req: &FluxRequest,
        on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
    ) -> Result<FluxOutput> {
        let c = self.config.clone();
        let (w, h) = (
            req.width.unwrap_or(c.default_width),
            req.height.unwrap_or(c.default_height),
        );
        if w == 0 || h == 0 || !w.is_multiple_of(16) || !h.is_multiple_of(16) {
            bail!(
                "--width {w} --height {h}: Flux needs both to be positive multiples of 16 (the VAE's 8x and the \
                 2x2 patches); try {}x{}",
                (w.max(16) / 16) * 16,
                (h.max(16) / 16) * 16
            );
        }
        let b = req.batch.max(1);
        let steps = req.steps.unwrap_or(c.default_steps);
        let sampler_name = req.sampler.clone().unwrap_or(c.default_sampler.clone());
        let scheduler = req.scheduler.clone().unwrap_or(c.default_scheduler.clone());
        let guidance = req.guidance.unwrap_or(c.default_guidance);
        if req.guidance.is_some() && !c.guidance_embeds {
            tracing::warn!(
                "{} has no guidance input: --guidance is ignored (use --cfg with --negative-prompt)",
                c.arch
            );
        }
        let (lh, lw) = (h / c.vae_scale_factor, w / c.vae_scale_factor);
        let (tokens, ch) = (lh / 2 * (lw / 2), c.latent_channels * 4);
        let n = b * tokens * ch;
        let mut sigmas = flux_sigmas(&c, &scheduler, steps, tokens)?;
        let true_cfg = req.cfg > 1.0;
        if true_cfg && req.negative_prompt.is_none() {
            bail!(
                "--cfg {} needs --negative-prompt (true CFG compares the two predictions)",
                req.cfg
            );
        }
        let mut sampler = registry::build::<Vec<f32>>(&sampler_name, &Default::default())?;
        let cond = self.encode(&req.prompt)?;
        let uncond = match (&req.negative_prompt, true_cfg) {
            (Some(neg), true) => Some(self.encode(neg)?),
            _ => None,
        };
        // Initial latents: given, or Philox noise per image (seed + i, so image i is reproducible alone).
        let mut x = match &req.initial_noise {
            Some(v) if v.len() == n => v.clone(),
            Some(v) => bail!("initial noise has {} values, {n} expected", v.len()),
            None => {
                let per = c.latent_channels * lh * lw;
                let mut all = Vec::with_capacity(n);
                for i in 0..b {
                    let mut z = vec![0f32; per];
                    noise::fill_normal_host(&mut z, req.seed + i as u64, 0);
                    all.extend(pack(&z, 1, c.latent_channels, lh, lw));
                }
                all
            }
        };
        if let Some(path) = &req.init_image {
            if !(0.0..=1.0).contains(&req.strength) || req.strength == 0.0 {
                bail!("--strength {} must be in (0, 1]", req.strength);
            }
            // diffusers: init = min(n * strength, n), t_start = int(max(n - init, 0)).
            let n_f = steps as f64;
            let t_start = (n_f - (n_f * req.strength as f64).min(n_f)).max(0.0) as usize;
            if t_start >= steps {
                bail!(
                    "--strength {} leaves no step to run with {steps} steps",
                    req.strength
                );
            }
            sigmas = sigmas[t_start..].to_vec();
            let x0 = self.encode_image(path, w, h, lh, lw)?;
            let s0 = sigmas[0] as f32;
            for (i, v) in x.iter_mut().enumerate() {
                *v = s0 * *v + (1.0 - s0) * x0[i % x0.len()];
            }
        }
        let run_steps = sigmas.len() - 1;
        let ids = image_ids(lh, lw);
        let txt_ids = vec![0f32; c.t5_max_len * 3];
        let last_x0 = Rc::new(RefCell::new(Vec::<f32>::new()));
        let guidance_embeds = c.guidance_embeds;
        let t5_len = c.t5_max_len;
        if req.preview.is_some() && self.engines.tae_decoder.is_none() {
            bail!(
                "--preview needs a TAE decoder in the bundle; rebuild with --tae-decoder FILE (madebyollin's taef1)"
            );
        }
        let FluxEngines {
            transformer,
            tae_decoder,
            ..
        } = &mut self.engines;
        let amax = &mut self.amax;
        let mut velocity = |x: &Vec<f32>, sigma: f64, cond: &Cond| -> Result<Vec<f32>> {
            let e = transformer.as_ref();
            let d = cond.t5_dim;
            let pd = cond.pooled.len();
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
                float_input(e, "img_ids", &[tokens, 3], &ids)?,
                float_input(e, "txt_ids", &[t5_len, 3], &txt_ids)?,
            ];
            if guidance_embeds {
                inputs.push(float_input(e, "guidance", &[b], &vec![guidance; b])?);
            }
            let out = transformer.run(&inputs).context("Flux transformer")?;
            if let Some(map) = amax.as_mut() {
                crate::models::flux::merge_amax(map, &out);
            }
            output_f32(&out, "sample")
        };
        // Denoiser in k-diffusion's convention for the flow parameterization: D = x - sigma v.
        let cfg_scale = req.cfg;
        let x0_slot = last_x0.clone();
        let mut denoiser = move |x: &Vec<f32>, sigma: f64, out: &mut Vec<f32>| -> Result<()> {
            let mut v = velocity(x, sigma, &cond)?;
            if let Some(u) = &uncond {
                let vu = velocity(x, sigma, u)?;
                for (a, n) in v.iter_mut().zip(&vu) {
                    *a = n + cfg_scale * (*a - n);
                }
            }
            let s = sigma as f32;
            for ((o, xi), vi) in out.iter_mut().zip(x).zip(&v) {
                *o = xi - s * vi;
            }
            *x0_slot.borrow_mut() = out.clone();
            Ok(())
        };
        let mut noise_src = noise::PhiloxNoise::new(req.seed);
        let mut times = Vec::with_capacity(run_steps);
        let mut t_step = Instant::now();
        let mut step_err: Option<anyhow::Error> = None;
        stepper::sample(
            sampler.as_mut(),
            &mut denoiser as &mut dyn Denoiser<Vec<f32>>,
            &mut noise_src,
            &mut x,
            &sigmas,
            &mut |i, _x| {
                let s = t_step.elapsed().as_secs_f64();
                times.push(s);
                let info = StepInfo {
                    step: i + 1,
                    steps: run_steps,
                    seconds: s,
                };
                if step_err.is_none() {
                    let r =
                        on_step(&info).and_then(|_| match (&req.preview, tae_decoder.as_mut()) {
                            (Some(path), Some(tae)) => {
                                let (rgb, w, h) =
                                    preview(tae.as_mut(), &c, &last_x0.borrow(), lh, lw)?;
                                crate::pipelines::flux_image::write_png(path, &rgb, w, h, &[])
                            }
                            _ => Ok(()),
                        });
                    if let Err(e) = r {
                        step_err = Some(e);
                    }
                }
                t_step = Instant::now();
            },
        )?;
        if let Some(e) = step_err {
            return Err(e);
        }
        let parameters = format!(
            "{}\nNegative prompt: {}\nSteps: {steps}, Sampler: {sampler_name}, Schedule: {scheduler}, Guidance: \
             {guidance}, CFG: {}, Seed: {}, Size: {w}x{h}, Batch: {b}, Model: {}{}",
            req.prompt,
            req.negative_prompt.clone().unwrap_or_default(),
            req.cfg.max(1.0),
            req.seed,
            c.arch,
            req.init_image
                .as_ref()
                .map(|p| format!(", Init image: {}, Strength: {}", p.display(), req.strength))
                .unwrap_or_default()
        );
        let images = if req.latents_only {
            Vec::new()
        } else {
            self.decode(&x, b, lh, lw)?
        };
        Ok(FluxOutput {
            width: w,
            height: h,
            images,
            latents: x,
            step_seconds: times,
            parameters,
        })
    }

    /// Packed latents -> RGB8 images through the VAE decoder.
    pub fn decode(&mut self, x: &[f32], b: usize, lh: usize, lw: usize) -> Result<Vec<Vec<u8>>> {
        let c = &self.config;
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

    /// Init image -> packed, scaled latents [1, tokens, 4C] (VAE encoder mean).
    fn encode_image(
        &mut self,
        path: &std::path::Path,
        w: usize,
        h: usize,
        lh: usize,
        lw: usize,
    ) -> Result<Vec<f32>> {
        let c = self.config.clone();
        let Some(enc) = self.engines.vae_encoder.as_mut() else {
            bail!(
                "--init-image needs the VAE encoder, which this bundle does not have; rebuild it from a model \
                 folder whose vae/ has the encoder weights"
            );
        };
        let img = load_init_image(path, w, h)?;
        let name = enc.inputs()[0].name.clone();
        let input = float_input(enc.as_ref(), &name, &[1, 3, h, w], &img)?;
        let out = enc.run(&[input]).context("VAE encoder")?;
        let m = output_f32(&out, "mean")?;
        let per = c.latent_channels * lh * lw;
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
        Ok(pack(&z, 1, c.latent_channels, lh, lw))
    }
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
