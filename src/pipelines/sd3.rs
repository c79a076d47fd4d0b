//! Stable Diffusion 3.5 (medium, large, large-turbo) text-to-image and img2img on `Engine`s, as diffusers'
//! `StableDiffusion3Pipeline`: the prompt goes through CLIP-L and CLIP-G (77 tokens each; their penultimate hidden
//! states side by side, zero-padded to the T5 width) and T5-XXL (`max_sequence_length` tokens; zeros of the
//! transformer's `joint_attention_dim` when the bundle has no T5, as diffusers does), the two are stacked along
//! the sequence, and the CLIP pooled projections are concatenated. The MMDiT runs on the 16-channel latents inside
//! any registered sampler (default: Euler over FlowMatchEulerDiscreteScheduler's schedule with the scheduler
//! config's shift), with classifier-free guidance (cond and uncond in one batched call) and optional skip-layer
//! guidance; the VAE decodes `latents / scaling + shift`. Latents stay in host memory; each engine runs on TensorRT
//! or ONNX Runtime.
use super::device_io::{self, DeviceSlots};
use super::engines::{
    Backend, VaeScaling, float_input, ids_input, open_components, output_f32, resolve, vae_decode,
    vae_encode,
};
use super::image::{
    ImageDefaults, ImageModel, ImagePipeline, Latent, Latents, Prediction, SkipLayerGuidance,
};
use crate::backend::{BackendChoice, Engine};
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::device::Device;
use crate::manifest::{EngineFile, ImageBundle, Pipeline};
use crate::samplers::buffer::Buffer;
use crate::samplers::schedule;
use crate::tokenizer::clip::{ClipTokenizer, MAX_LEN};
use crate::tokenizer::t5::T5Tokenizer;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// What `generate` needs besides the engines; recorded in the bundle's manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sd3PipelineConfig {
    pub arch: String,
    pub latent_channels: usize,
    pub vae_scale_factor: usize,
    pub scaling_factor: f32,
    pub shift_factor: f32,
    /// The transformer's patch size, position grid (largest latent side / patch), depth and context width.
    pub patch_size: usize,
    pub pos_embed_max_size: usize,
    pub num_layers: usize,
    pub joint_attention_dim: usize,
    /// The scheduler config's static time shift (SD3.5: 3.0).
    pub shift: f32,
    /// Resolution-dependent shift (`use_dynamic_shifting`) with diffusers' `calculate_shift` line.
    pub dynamic_shift: bool,
    pub base_image_seq_len: f64,
    pub max_image_seq_len: f64,
    pub base_shift: f64,
    pub max_shift: f64,
    /// Pad ids of the CLIP-L and CLIP-G tokenizers (`<|endoftext|>` and `!` in SD3.5's folders).
    pub clip_pads: [u32; 2],
    /// T5 tokens (diffusers' `max_sequence_length`, 256).
    pub max_sequence_length: usize,
    pub default_steps: usize,
    pub default_sampler: String,
    /// "sd3" is diffusers' FlowMatchEulerDiscreteScheduler schedule; any `samplers::schedule` name works too.
    pub default_scheduler: String,
    pub default_width: usize,
    pub default_height: usize,
    /// Classifier-free guidance when the request leaves it unset (1 = off: large-turbo).
    pub default_cfg: f32,
}

pub struct Sd3Engines {
    pub clip_l: Box<dyn Engine>,
    pub clip_g: Box<dyn Engine>,
    /// T5-XXL; None: its part of the context is zeros.
    pub t5: Option<Box<dyn Engine>>,
    pub transformer: Box<dyn Engine>,
    pub vae_decoder: Box<dyn Engine>,
    pub vae_encoder: Option<Box<dyn Engine>>,
}

pub struct Sd3Tokenizers {
    pub clip_l: ClipTokenizer,
    pub clip_g: ClipTokenizer,
    pub t5: Option<T5Tokenizer>,
}

/// Skip-layer guidance of the current run: the flags of the skipped blocks, per step whether it applies, and the
/// run's CFG scale.
struct ActiveSlg {
    skip: Vec<f32>,
    steps: Vec<bool>,
    sigmas: Vec<f64>,
    scale: f32,
    cfg: f32,
}

/// The SD3.5 family on the image seam.
pub struct Sd3Model {
    pub config: Sd3PipelineConfig,
    pub tokenizers: Sd3Tokenizers,
    pub engines: Sd3Engines,
    /// When set, every transformer run's `amax.<key>` outputs (a calibration graph's) are folded in here.
    pub amax: Option<std::collections::HashMap<String, f32>>,
    slg: Option<ActiveSlg>,
    /// On a GPU backend: where the sampler's latents live, with the transformer's inputs and outputs bound to
    /// them.
    device: Option<Arc<Device>>,
    on_device: DeviceSlots,
}

pub type Sd3Pipeline = ImagePipeline<Sd3Model>;

/// One prompt's conditioning: `encoder_hidden_states` [seq, width] and `pooled_projections`.
pub struct Cond {
    /// Identifies this conditioning's device copies (`device_io::next_cond_id`).
    pub id: u64,
    pub embeds: Vec<f32>,
    pub seq: usize,
    pub pooled: Vec<f32>,
}

/// The sigma schedule (n+1 values ending in 0): "sd3" is diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps
/// (a linspace between the shifted training sigmas' ends, shifted again, in f32 at the end as there); other names
/// come from the samplers' schedules on the same shifted flow.
pub fn sd3_sigmas(
    c: &Sd3PipelineConfig,
    scheduler: &str,
    steps: usize,
    tokens: usize,
) -> Result<Vec<f64>> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len);
    let mu = tokens as f64 * slope + (c.base_shift - slope * c.base_image_seq_len);
    if scheduler == "sd3" {
        // The training sigmas' ends in f32: t = 1000 and 1 over 1000, shifted (dynamic configs do not shift them).
        let train_shift = |s: f32| {
            if c.dynamic_shift {
                s
            } else {
                c.shift * s / (1.0 + (c.shift - 1.0) * s)
            }
        };
        let (smax, smin) = (train_shift(1.0) as f64, train_shift(1.0f32 / 1000.0) as f64);
        let (start, stop) = (smax * 1000.0, smin * 1000.0);
        let mut v: Vec<f64> = (0..steps)
            .map(|i| {
                // numpy.linspace: start + i * step, the last value exactly stop.
                let t = if steps == 1 {
                    start
                } else if i + 1 == steps {
                    stop
                } else {
                    i as f64 * ((stop - start) / (steps - 1) as f64) + start
                };
                let s = t / 1000.0;
                let s = if c.dynamic_shift {
                    mu.exp() / (mu.exp() + (1.0 / s - 1.0))
                } else {
                    let k = c.shift as f64;
                    k * s / (1.0 + (k - 1.0) * s)
                };
                s as f32 as f64
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
        anyhow::anyhow!("{e} (or 'sd3', diffusers' StableDiffusion3Pipeline schedule, the default)")
    })
}

/// `clip` [77, a] and `t5` [n, b] as diffusers stacks them: the CLIP rows padded with zeros (or cut, as `F.pad`
/// with a negative size does) to the T5 width, then the T5 rows.
pub fn stack_context(clip: &[f32], clip_width: usize, t5: &[f32], t5_width: usize) -> Vec<f32> {
    let rows = clip.len() / clip_width.max(1);
    let mut out = Vec::with_capacity(rows * t5_width + t5.len());
    for r in clip.chunks(clip_width.max(1)).take(rows) {
        let n = clip_width.min(t5_width);
        out.extend_from_slice(&r[..n]);
        out.resize(out.len() + (t5_width - n), 0.0);
    }
    out.extend_from_slice(t5);
    out
}

impl Sd3Model {
    pub fn new(config: Sd3PipelineConfig, tokenizers: Sd3Tokenizers, engines: Sd3Engines) -> Self {
        Sd3Model {
            config,
            tokenizers,
            engines,
            amax: None,
            slg: None,
            device: None,
            on_device: DeviceSlots::default(),
        }
    }

    /// Opens an SD3.5 bundle's components on `backend`.
    pub fn open(engine: &EngineFile, bundle: &ImageBundle, backend: Backend) -> Result<Self> {
        let config: Sd3PipelineConfig = serde_json::from_value(bundle.config.clone())
            .with_context(|| {
                format!(
                    "the manifest of '{}' has no valid SD3.5 settings; rebuild the bundle with this trt-diff",
                    engine.path.display()
                )
            })?;
        let parts = open_components(
            engine,
            &bundle.components,
            &[
                ("clip_l", true),
                ("clip_g", true),
                ("t5", false),
                ("transformer", true),
                ("vae_decoder", true),
                ("vae_encoder", false),
            ],
            backend,
            &bundle.arch,
        )?;
        let [clip_l, clip_g, t5, transformer, vae_decoder, vae_encoder]: [Option<Box<dyn Engine>>;
            6] = parts
            .try_into()
            .map_err(|_| anyhow::anyhow!("six components were asked for"))?;
        let required = |e: Option<Box<dyn Engine>>| e.context("a required component is missing");
        let tok = |key: &str| -> Result<std::path::PathBuf> {
            let f = bundle.tokenizers.get(key).with_context(|| {
                format!(
                    "the bundle '{}' names no {key} tokenizer; rebuild it",
                    engine.path.display()
                )
            })?;
            engine.file(f, &format!("the {key} tokenizer"))
        };
        let clip = |key: &str, pad: u32| -> Result<ClipTokenizer> {
            let mut t = ClipTokenizer::load(&tok(key)?)?;
            t.pad = pad;
            Ok(t)
        };
        let tokenizers = Sd3Tokenizers {
            clip_l: clip("clip", config.clip_pads[0])?,
            clip_g: clip("clip", config.clip_pads[1])?,
            t5: match &t5 {
                Some(_) => Some(T5Tokenizer::load(&tok("t5")?)?),
                None => None,
            },
        };
        let mut model = Sd3Model::new(
            config,
            tokenizers,
            Sd3Engines {
                clip_l: required(clip_l)?,
                clip_g: required(clip_g)?,
                t5,
                transformer: required(transformer)?,
                vae_decoder: required(vae_decoder)?,
                vae_encoder,
            },
        );
        model.device = device_io::open_device(backend)?;
        Ok(model)
    }

    /// One CLIP encoder: (penultimate hidden states [77, d], projected pooled output).
    fn clip(&mut self, which: usize, prompt: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        let (tok, engine, name) = if which == 0 {
            (&self.tokenizers.clip_l, &mut self.engines.clip_l, "CLIP-L")
        } else {
            (&self.tokenizers.clip_g, &mut self.engines.clip_g, "CLIP-G")
        };
        let (ids, dropped) = tok.encode_padded(prompt, MAX_LEN);
        if dropped > 0 && which == 0 {
            tracing::warn!(
                "the prompt is longer than CLIP's 77 tokens; CLIP-L and CLIP-G see the first 75"
            );
        }
        let out = engine
            .run(&[ids_input("input_ids", &[1, MAX_LEN], &ids)])
            .with_context(|| format!("{name} text encoder"))?;
        Ok((
            output_f32(&out, "penultimate_hidden_state")?,
            output_f32(&out, "text_embeds")?,
        ))
    }

    /// The transformer's output for host latents [B, C, H, W] at `sigma`, every image conditioned on `conds`
    /// (one per image group: the batch is `conds.len()` copies of the latents).
    fn transformer(
        &mut self,
        x: &[f32],
        sigma: f64,
        conds: &[&Cond],
        lat: &Latents,
        skip: &[f32],
    ) -> Result<Vec<f32>> {
        let n = conds.len();
        let b = lat.batch * n;
        let seq = conds[0].seq;
        let width = conds[0].embeds.len() / seq.max(1);
        let pooled_dim = conds[0].pooled.len();
        let mut embeds = Vec::with_capacity(b * seq * width);
        let mut pooled = Vec::with_capacity(b * pooled_dim);
        for c in conds {
            if c.seq != seq {
                bail!("conditionings of different lengths in one batch (a pipeline bug)");
            }
            for _ in 0..lat.batch {
                embeds.extend_from_slice(&c.embeds);
                pooled.extend_from_slice(&c.pooled);
            }
        }
        let e = self.engines.transformer.as_ref();
        // As the pipeline: timesteps are the f32 sigmas times 1000.
        let t = sigma as f32 * 1000.0;
        let inputs = vec![
            float_input(
                e,
                "latents",
                &[b, lat.channels, lat.height, lat.width],
                &x.repeat(n),
            )?,
            float_input(e, "timestep", &[b], &vec![t; b])?,
            float_input(e, "encoder_hidden_states", &[b, seq, width], &embeds)?,
            float_input(e, "pooled_projections", &[b, pooled_dim], &pooled)?,
            float_input(e, "skip_layers", &[skip.len()], skip)?,
        ];
        let out = self
            .engines
            .transformer
            .run(&inputs)
            .context("SD3 transformer")?;
        if let Some(map) = self.amax.as_mut() {
            crate::models::qdq::merge_amax(map, &out);
        }
        let v = output_f32(&out, "sample")?;
        if v.len() != x.len() * n {
            bail!(
                "the transformer returned {} values, {} expected",
                v.len(),
                x.len() * n
            );
        }
        Ok(v)
    }

    fn no_skip(&self) -> Vec<f32> {
        vec![0.0; self.config.num_layers]
    }

    /// The transformer on device latents, as [`Sd3Model::transformer`]: the latents (repeated per conditioning on
    /// the GPU) and the outputs bound by address, the text conditioning uploaded once per prompt pair and batch,
    /// the timestep and skip mask copied per call; output k goes to `outs[k]`.
    fn transformer_device(
        &mut self,
        x: &DeviceBuffer,
        sigma: f64,
        conds: &[&Cond],
        lat: &Latents,
        skip: &[f32],
        outs: &mut [&mut DeviceBuffer],
    ) -> Result<()> {
        let dev = self
            .device
            .clone()
            .context("device latents without a GPU engine")?;
        let (n, len) = (conds.len(), x.data.len());
        let b = lat.batch * n;
        let seq = conds[0].seq;
        if conds.iter().any(|c| c.seq != seq) {
            bail!("conditionings of different lengths in one batch (a pipeline bug)");
        }
        let width = conds[0].embeds.len() / seq.max(1);
        let pooled_dim = conds[0].pooled.len();
        let ids: Vec<u64> = conds.iter().map(|c| c.id).collect();
        let key = device_io::key(&[&ids[..], &[lat.batch as u64]].concat());
        let per_cond = |f: &dyn Fn(&Cond) -> &[f32]| -> Vec<f32> {
            conds.iter().flat_map(|c| f(c).repeat(lat.batch)).collect()
        };
        let slots = &mut self.on_device;
        slots.upload(&dev, "encoder_hidden_states", key, || {
            Ok(per_cond(&|c| &c.embeds))
        })?;
        slots.upload(&dev, "pooled_projections", key, || {
            Ok(per_cond(&|c| &c.pooled))
        })?;
        if n > 1 {
            let mut xs = slots.take_scratch(&dev, "latents", n * len)?;
            for k in 0..n {
                device_io::copy_into(&dev, x, 0, &mut xs, k * len, len)?;
            }
            slots.put("latents", xs);
            let y = slots.take_scratch(&dev, "sample", n * len)?;
            slots.put("sample", y);
        }
        let e = self.engines.transformer.as_mut();
        let t = sigma as f32 * 1000.0;
        let host = [
            float_input(e, "timestep", &[b], &vec![t; b])?,
            float_input(e, "skip_layers", &[skip.len()], skip)?,
        ];
        let slots = &self.on_device;
        let shape = vec![b, lat.channels, lat.height, lat.width];
        let latents = if n > 1 { slots.scratch("latents")? } else { x };
        let inputs = [
            ("latents", latents, shape.clone()),
            (
                "encoder_hidden_states",
                slots.get("encoder_hidden_states", key)?,
                vec![b, seq, width],
            ),
            (
                "pooled_projections",
                slots.get("pooled_projections", key)?,
                vec![b, pooled_dim],
            ),
        ];
        if n == 1 {
            let out: &DeviceBuffer = outs[0];
            return device_io::run_on_device(
                e,
                &dev,
                "SD3 transformer",
                &inputs,
                &host,
                &[("sample", out, shape)],
            );
        }
        let y = slots.scratch("sample")?;
        device_io::run_on_device(
            e,
            &dev,
            "SD3 transformer",
            &inputs,
            &host,
            &[("sample", y, shape)],
        )?;
        for (k, out) in outs.iter_mut().enumerate() {
            device_io::copy_into(&dev, y, k * len, out, 0, len)?;
        }
        Ok(())
    }

    /// The transformer's outputs for `conds` into `outs`, where the latents live.
    fn run(
        &mut self,
        x: &Latent,
        sigma: f64,
        conds: &[&Cond],
        lat: &Latents,
        skip: &[f32],
        outs: &mut [&mut Latent],
    ) -> Result<()> {
        match x {
            Latent::Host(x) => {
                let v = self.transformer(x, sigma, conds, lat, skip)?;
                for (k, out) in outs.iter_mut().enumerate() {
                    **out = Latent::Host(v[k * x.len()..(k + 1) * x.len()].to_vec());
                }
                Ok(())
            }
            Latent::Device(x) => {
                for out in outs.iter_mut() {
                    if !matches!(out, Latent::Device(_)) {
                        **out = Latent::Device(x.alloc_like()?);
                    }
                }
                let mut bufs: Vec<&mut DeviceBuffer> = outs
                    .iter_mut()
                    .filter_map(|out| match &mut **out {
                        Latent::Device(d) => Some(d),
                        Latent::Host(_) => None,
                    })
                    .collect();
                self.transformer_device(x, sigma, conds, lat, skip, &mut bufs)
            }
        }
    }

    /// Skip-layer guidance's adjustment of the conditional output `v` at `sigma`, folded so that the seam's CFG
    /// `u + cfg (v' - u)` equals diffusers' `u + cfg (v - u) + scale (v - v_skip)`: v' = (1 + k) v - k v_skip
    /// with k = scale / cfg.
    fn apply_slg(
        &mut self,
        x: &Latent,
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
        v: &mut Latent,
    ) -> Result<()> {
        let Some(s) = &self.slg else { return Ok(()) };
        // The step whose interval holds sigma (intermediate sigmas of multi-stage samplers belong to their step).
        let i = s.sigmas.iter().filter(|&&t| t >= sigma).count().max(1) - 1;
        if !s.steps.get(i).copied().unwrap_or(false) {
            return Ok(());
        }
        let (skip, k) = (s.skip.clone(), (s.scale / s.cfg) as f64);
        let mut vs = v.alloc_like()?;
        self.run(x, sigma, &[cond], lat, &skip, &mut [&mut vs])?;
        v.lincomb(1.0 + k, &[(-k, &vs)])
    }
}

/// Opens an SD3.5 bundle (its manifest read once into `engine`) on the chosen backend.
pub fn open_pipeline(engine: &EngineFile, choice: BackendChoice) -> Result<Sd3Pipeline> {
    let Some(Pipeline::Image(bundle)) = engine.pipeline() else {
        bail!(
            "'{}' is not an image bundle; build one with `trt-diff build MODEL_DIR --arch sd35-medium ...`",
            engine.path.display()
        );
    };
    let backend = resolve(choice, engine)?;
    Ok(ImagePipeline::new(Sd3Model::open(engine, bundle, backend)?))
}

impl ImageModel for Sd3Model {
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
        let m = c.patch_size * c.vae_scale_factor;
        if w == 0 || h == 0 || !w.is_multiple_of(m) || !h.is_multiple_of(m) {
            bail!(
                "--width {w} --height {h}: SD3.5 needs both to be positive multiples of {m} (the VAE's {}x and \
                 the {}x{} patches); try {}x{}",
                c.vae_scale_factor,
                c.patch_size,
                c.patch_size,
                (w.max(m) / m) * m,
                (h.max(m) / m) * m
            );
        }
        let max = c.pos_embed_max_size * m;
        if w > max || h > max {
            bail!(
                "--width {w} --height {h}: the transformer's position table covers at most {max}x{max} pixels \
                 (pos_embed_max_size {}); generate smaller images",
                c.pos_embed_max_size
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
        let p = self.config.patch_size;
        sd3_sigmas(
            &self.config,
            scheduler,
            steps,
            lat.height / p * (lat.width / p),
        )
    }

    fn encode_prompt(&mut self, prompt: &str) -> Result<Cond> {
        let (l, pl) = self.clip(0, prompt)?;
        let (g, pg) = self.clip(1, prompt)?;
        let (dl, dg) = (l.len() / MAX_LEN, g.len() / MAX_LEN);
        let mut clip = Vec::with_capacity(l.len() + g.len());
        for r in 0..MAX_LEN {
            clip.extend_from_slice(&l[r * dl..(r + 1) * dl]);
            clip.extend_from_slice(&g[r * dg..(r + 1) * dg]);
        }
        let max = self.config.max_sequence_length;
        let (t5, t5_width) = match (&self.tokenizers.t5, self.engines.t5.as_mut()) {
            (Some(tok), Some(engine)) => {
                let (ids, dropped) = tok.encode_padded(prompt, max)?;
                if dropped > 0 {
                    // As diffusers (truncation=True).
                    tracing::warn!(
                        "the prompt is {} T5 tokens; T5 sees the first {max} (</s> included)",
                        max + dropped
                    );
                }
                let out = engine
                    .run(&[ids_input("input_ids", &[1, max], &ids)])
                    .context("T5 encoder")?;
                let t = output_f32(&out, "last_hidden_state")?;
                let w = t.len() / max;
                (t, w)
            }
            _ => {
                let w = self.config.joint_attention_dim;
                (vec![0.0; max * w], w)
            }
        };
        if t5_width != self.config.joint_attention_dim {
            bail!(
                "the T5 encoder gives {t5_width} features, the transformer takes {}: the bundle's components do \
                 not belong together; rebuild it from one SD3.5 folder",
                self.config.joint_attention_dim
            );
        }
        let mut pooled = pl;
        pooled.extend_from_slice(&pg);
        Ok(Cond {
            id: device_io::next_cond_id(),
            embeds: stack_context(&clip, dl + dg, &t5, t5_width),
            seq: MAX_LEN + max,
            pooled,
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
        let skip = self.no_skip();
        self.run(x, sigma, &[cond], lat, &skip, &mut [out])
    }

    fn predict_pair(
        &mut self,
        x: &Latent,
        sigma: f64,
        (cond, uncond): (&Cond, &Cond),
        lat: &Latents,
        _guidance: f32,
        (out, out_uncond): (&mut Latent, &mut Latent),
    ) -> Result<()> {
        let skip = self.no_skip();
        // One batched call, as diffusers runs [uncond, cond] together.
        self.run(
            x,
            sigma,
            &[cond, uncond],
            lat,
            &skip,
            &mut [out, out_uncond],
        )?;
        self.apply_slg(x, sigma, cond, lat, out)
    }

    fn set_skip_layer_guidance(
        &mut self,
        slg: Option<&SkipLayerGuidance>,
        sigmas: &[f64],
        cfg: f32,
    ) -> Result<()> {
        self.slg = None;
        let Some(s) = slg else { return Ok(()) };
        if cfg <= 1.0 {
            bail!(
                "skip-layer guidance works with classifier-free guidance (as diffusers): set --cfg above 1 or drop \
                 --slg-layers"
            );
        }
        let n = self.config.num_layers;
        if let Some(l) = s.layers.iter().find(|l| **l >= n) {
            bail!(
                "--slg-layers names block {l}; this transformer has blocks 0 to {}",
                n - 1
            );
        }
        let mut skip = vec![0.0; n];
        for &l in &s.layers {
            skip[l] = 1.0;
        }
        let steps = sigmas.len().saturating_sub(1);
        let nf = steps as f64;
        self.slg = Some(ActiveSlg {
            skip,
            steps: (0..steps)
                .map(|i| (i as f64) > nf * s.start as f64 && (i as f64) < nf * s.end as f64)
                .collect(),
            sigmas: sigmas.to_vec(),
            scale: s.scale,
            cfg,
        });
        Ok(())
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
        bail!("SD3.5 bundles have no preview decoder yet")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_is_padded_or_cut_to_the_t5_width() {
        let clip = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(
            stack_context(&clip, 2, &[9.0; 3], 3),
            vec![1.0, 2.0, 0.0, 3.0, 4.0, 0.0, 9.0, 9.0, 9.0]
        );
        assert_eq!(stack_context(&clip, 2, &[], 1), vec![1.0, 3.0]);
    }

    #[test]
    fn skip_layer_guidance_specs_parse() {
        let s: SkipLayerGuidance = "7,8,9".parse().unwrap();
        assert_eq!(
            (s.layers, s.scale, s.start, s.end),
            (vec![7, 8, 9], 2.8, 0.01, 0.2)
        );
        let s: SkipLayerGuidance = "1:3:0.2:0.6".parse().unwrap();
        assert_eq!(
            (s.layers, s.scale, s.start, s.end),
            (vec![1], 3.0, 0.2, 0.6)
        );
        for bad in ["", "a,b", "1:2:0.1", "1:x", "1:2:0.5:0.2"] {
            let e = bad.parse::<SkipLayerGuidance>().unwrap_err();
            assert!(e.contains("LAYERS[:SCALE[:START:END]]"), "{bad}: {e}");
        }
    }
}
