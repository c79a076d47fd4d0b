//! Flux.1 text-to-image (and img2img) on `Engine`s: CLIP-L (pooled) and T5 (sequence) encode the prompt, the
//! transformer predicts the flow velocity on 2x2-packed latent tokens inside any registered sampler (default:
//! Euler over diffusers' FluxPipeline schedule, `linspace(1, 1/n, n)` shifted by the resolution-dependent mu for
//! dev and unshifted for schnell), the VAE decodes `latents / scaling + shift`, and PNGs carry the parameters.
//! Each engine is TensorRT or ONNX Runtime; this file does not care which. The generic request handling (CFG,
//! sampler loop, img2img, batches, previews) is `pipelines::image`.
use super::device_io;
use super::engines::{
    Backend, VaeScaling, add_outputs, float_input, ids_input, inputs_taken, open_components,
    output_f32, resolve, run_f32, vae_decode, vae_encode,
};
use super::image::{ImageDefaults, ImageModel, ImagePipeline, Latent, Latents, Prediction};
use super::image_io::to_rgb8;
use crate::backend::{BackendChoice, DeviceTensor, Engine, HostTensor};
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::device::Device;
use crate::manifest::{EngineFile, ImageBundle, Pipeline};
use crate::onnx::DataType;
use crate::samplers::schedule;
use crate::tokenizer::{clip::ClipTokenizer, t5::T5Tokenizer};
use crate::weights::lora::{LoraFile, Part};
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
    /// FLUX.1 Canny/Depth: packed control-latent channels the transformer takes after the image latents'
    /// (its input is [latents | control latents] per token); 0 for the plain models.
    #[serde(default)]
    pub control_channels: usize,
    /// FLUX.1 Fill: channels of the packed masked-image latents and packed mask the transformer takes after the
    /// image latents' (64 + 256 for FLUX.1-Fill-dev); 0 for the other models.
    #[serde(default)]
    pub fill_channels: usize,
    /// The bundle's ControlNet-Union modes (diffusers' `num_mode`); 0 without one or for a plain ControlNet.
    #[serde(default)]
    pub controlnet_modes: usize,
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
            control_channels: 0,
            fill_channels: 0,
            controlnet_modes: 0,
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
    /// A ControlNet (diffusers FluxControlNetModel); the transformer then takes its residuals.
    pub controlnet: Option<Box<dyn Engine>>,
}

/// A control condition prepared for a run: packed control latents, strength and step window.
struct ActiveControl {
    cond: Vec<f32>,
    strength: f32,
    start: f32,
    end: f32,
    /// ControlNet-Union: the control mode.
    mode: Option<usize>,
}

/// The control modes of the InstantX / Shakker-Labs FLUX.1-dev ControlNet-Union checkpoints (`--control-mode`).
pub const UNION_MODES: &[(&str, usize)] = &[
    ("canny", 0),
    ("tile", 1),
    ("depth", 2),
    ("blur", 3),
    ("pose", 4),
    ("gray", 5),
    ("lq", 6),
];

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
    /// Run-time LoRA: where each part's built weights are and what the current LoRA set changed.
    lora: Option<super::lora::RuntimeLora>,
    /// The current run's ControlNet conditions and its schedule (a sigma's step index picks the windows).
    controls: Vec<ActiveControl>,
    control_sigmas: Vec<f64>,
    /// FLUX.1 Canny/Depth: the current run's packed control latents, concatenated to the latents' channels.
    concat_control: Option<Vec<f32>>,
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
            lora: None,
            controls: Vec::new(),
            control_sigmas: Vec::new(),
            concat_control: None,
        }
    }

    /// Enables run-time LoRA ([`ImageModel::set_loras`]) for engines built from these graphs (CLIP as text
    /// encoder 0, T5 as 1, the transformer as the denoiser; each graph's initializers are its engine's weights).
    pub fn enable_lora(&mut self, graphs: std::collections::BTreeMap<Part, std::path::PathBuf>) {
        self.lora = Some(super::lora::RuntimeLora::new(
            graphs,
            super::lora::flux_book,
        ));
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
                ("controlnet", false),
            ],
            backend,
            &bundle.arch,
        )?;
        let mut lora_graphs = std::collections::BTreeMap::new();
        for (name, part) in [
            ("transformer", Part::Denoiser),
            ("clip", Part::TextEncoder(0)),
            ("t5", Part::TextEncoder(1)),
        ] {
            let Some(c) = bundle.components.get(name) else {
                continue;
            };
            // TensorRT refits with the plan's own graph's element types; ONNX Runtime runs the component's ONNX.
            // A graph that cannot be found only matters once a LoRA is applied (then its part is reported).
            let graph = match (&c.plan, backend) {
                (Some(plan), Backend::Trt) => engine
                    .file(plan, &format!("component {name}"))
                    .and_then(|p| EngineFile::open_with(&p, engine.allow_external))
                    .and_then(|f| f.source_onnx()),
                _ => engine.file(&c.onnx, &format!("component {name}")),
            };
            match graph {
                Ok(g) => {
                    lora_graphs.insert(part, g);
                }
                Err(e) => tracing::debug!("no graph of the {name} for run-time LoRA: {e:#}"),
            }
        }
        let [
            clip,
            t5,
            transformer,
            vae_decoder,
            vae_encoder,
            tae_decoder,
            controlnet,
        ]: [Option<Box<dyn Engine>>; 7] = parts
            .try_into()
            .map_err(|_| anyhow::anyhow!("seven components were asked for"))?;
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
                controlnet,
            },
            amax: None,
            // On a GPU (TensorRT or ONNX Runtime CUDA) the sampler's latents live there too.
            device: device_io::open_device(backend)?,
            device_ids: None,
            lora: Some(super::lora::RuntimeLora::new(
                lora_graphs,
                super::lora::flux_book,
            )),
            controls: Vec::new(),
            control_sigmas: Vec::new(),
            concat_control: None,
        })
    }

    /// The transformer's ControlNet residual inputs for a call at `sigma` (`inputs`: the transformer's own):
    /// the active controls' ControlNet outputs summed (diffusers' multi-ControlNet), zeros when none is active.
    /// Empty when the transformer takes no residuals.
    fn controlnet_residuals(
        &mut self,
        inputs: &[(String, HostTensor)],
        sigma: f64,
        batch: usize,
        tokens: usize,
    ) -> Result<Vec<(String, HostTensor)>> {
        let wanted: Vec<crate::backend::TensorDesc> = self
            .engines
            .transformer
            .inputs()
            .iter()
            .filter(|d| d.name.starts_with("controlnet_"))
            .cloned()
            .collect();
        if wanted.is_empty() {
            if !self.controls.is_empty() {
                bail!(
                    "this bundle's transformer takes no ControlNet residuals; rebuild it with --controlnet DIR"
                );
            }
            return Ok(Vec::new());
        }
        // diffusers: keep step i when i/n >= start and (i+1)/n <= end, n the number of steps.
        let n = self.control_sigmas.len().saturating_sub(1).max(1);
        let step = self
            .control_sigmas
            .windows(2)
            .position(|w| sigma <= w[0] && sigma > w[1])
            .unwrap_or(0);
        let mut sums: Vec<super::engines::OutputF32> = Vec::new();
        for ctl in &self.controls {
            let (i, n) = (step as f32, n as f32);
            if i / n < ctl.start || (i + 1.0) / n > ctl.end {
                continue;
            }
            let cn = self
                .engines
                .controlnet
                .as_mut()
                .context("a control image was given and the bundle has no ControlNet")?;
            let mut cin = inputs_taken(cn.as_ref(), inputs);
            let ch = ctl.cond.len() / tokens.max(1);
            cin.push(float_input(
                cn.as_ref(),
                "controlnet_cond",
                &[batch, tokens, ch],
                &ctl.cond.repeat(batch),
            )?);
            cin.push(float_input(
                cn.as_ref(),
                "conditioning_scale",
                &[1],
                &[ctl.strength],
            )?);
            if let Some(mode) = ctl.mode {
                cin.push((
                    "controlnet_mode".into(),
                    HostTensor {
                        dtype: DataType::INT64,
                        shape: vec![batch],
                        data: (0..batch)
                            .flat_map(|_| (mode as i64).to_le_bytes())
                            .collect(),
                    },
                ));
            }
            add_outputs(&mut sums, run_f32(cn.as_mut(), &cin, "Flux ControlNet")?);
        }
        let e = self.engines.transformer.as_ref();
        wanted
            .iter()
            .map(|d| {
                let shape: Vec<usize> = match sums.iter().find(|(n, _, _)| *n == d.name) {
                    Some((_, s, _)) => s.clone(),
                    None => {
                        let layers = d.shape.first().copied().unwrap_or(1).max(1) as usize;
                        let hidden = d.shape.last().copied().unwrap_or(1).max(1) as usize;
                        vec![layers, batch, tokens, hidden]
                    }
                };
                let zeros;
                let v = match sums.iter().find(|(n, _, _)| *n == d.name) {
                    Some((_, _, v)) => v,
                    None => {
                        zeros = vec![0f32; shape.iter().product()];
                        &zeros
                    }
                };
                float_input(e, &d.name, &shape, v)
            })
            .collect()
    }

    /// The transformer's host inputs for latents `x` at `sigma` (ControlNet residuals aside).
    fn host_inputs(
        &self,
        x: &[f32],
        sigma: f64,
        cond: &Cond,
        lat: &Latents,
        guidance: f32,
    ) -> Result<Vec<(String, HostTensor)>> {
        let c = &self.config;
        let (b, tokens, ch) = (lat.batch, tokens(lat), 4 * c.latent_channels);
        let t5_len = c.t5_max_len;
        let e = self.engines.transformer.as_ref();
        let (d, pd) = (cond.t5_dim, cond.pooled.len());
        let joined;
        let (x, ch) = match (&self.concat_control, c.control_channels + c.fill_channels) {
            (_, 0) => (x, ch),
            (Some(ctl), cc) => {
                // [latents | control latents] per token, as diffusers' FluxControlPipeline concatenates them.
                joined = x
                    .chunks_exact(ch)
                    .zip(ctl.chunks_exact(cc).cycle())
                    .flat_map(|(a, b)| a.iter().chain(b).copied())
                    .collect::<Vec<f32>>();
                (&joined[..], ch + cc)
            }
            (None, _) if c.fill_channels > 0 => bail!(
                "this Flux model is FLUX.1 Fill (inpainting): give --init-image IMAGE and --mask MASK (white where \
                 it is repainted)"
            ),
            (None, _) => bail!(
                "this Flux model ({}) is a control variant (FLUX.1 Canny/Depth): give its condition with --control \
                 IMAGE (e.g. --control-preprocess canny)",
                c.arch
            ),
        };
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
        Ok(inputs)
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
        let (b, tokens) = (lat.batch, tokens(lat));
        let mut inputs = self.host_inputs(x, sigma, cond, lat, guidance)?;
        let residuals = self.controlnet_residuals(&inputs, sigma, b, tokens)?;
        inputs.extend(residuals);
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
        // ControlNet residuals go in as host inputs; the ControlNet runs on host copies of the latents.
        let takes_residuals = self
            .engines
            .transformer
            .inputs()
            .iter()
            .any(|d| d.name.starts_with("controlnet_"));
        let residuals = if takes_residuals {
            dev.synchronize()?;
            let hx = x.to_host()?;
            let hi = self.host_inputs(&hx, sigma, cond, lat, guidance)?;
            self.controlnet_residuals(&hi, sigma, lat.batch, tokens(lat))?
        } else {
            Vec::new()
        };
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
        host.extend(residuals);
        // The sampler's kernels wrote `x` on our stream; the engine reads it on its own.
        tracing::trace!("synchronizing the sampler's stream before the transformer");
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

    fn set_controls(
        &mut self,
        controls: &[super::image::ControlImage],
        lat: &Latents,
        sigmas: &[f64],
    ) -> Result<()> {
        self.controls.clear();
        if self.config.control_channels > 0 {
            self.concat_control = None;
        }
        self.control_sigmas = sigmas.to_vec();
        if controls.is_empty() {
            return Ok(());
        }
        if self.config.control_channels > 0 && self.engines.controlnet.is_none() {
            // FLUX.1 Canny/Depth: one condition, part of the transformer's input at every step.
            let [c] = controls else {
                bail!(
                    "FLUX.1 Canny/Depth takes one --control image, {} were given",
                    controls.len()
                );
            };
            if let Some(m) = &c.mode {
                bail!(
                    "--control-mode {m}: FLUX.1 Canny/Depth takes no control mode (ControlNet-Union bundles do); \
                     drop --control-mode"
                );
            }
            if c.strength != 1.0 || c.start != 0.0 || c.end != 1.0 {
                tracing::warn!(
                    "--control-strength/--control-start/--control-end apply to ControlNets; FLUX.1 Canny/Depth \
                     takes its condition at every step"
                );
            }
            let vs = self.config.vae_scale_factor;
            let rgb = super::image_io::load_control_image(
                &c.image,
                lat.width * vs,
                lat.height * vs,
                c.preprocess,
            )?;
            let z = self
                .encode_image(&rgb, lat)
                .with_context(|| format!("encoding the control image '{}'", c.image.display()))?;
            self.concat_control = Some(z);
            return Ok(());
        }
        if self.engines.controlnet.is_none() {
            bail!(
                "--control needs a ControlNet in the bundle; rebuild it with `trt-diff build MODEL --controlnet DIR`"
            );
        }
        let union = self
            .engines
            .controlnet
            .as_ref()
            .is_some_and(|e| e.inputs().iter().any(|d| d.name == "controlnet_mode"));
        let modes = self.config.controlnet_modes;
        let vs = self.config.vae_scale_factor;
        let (w, h) = (lat.width * vs, lat.height * vs);
        for c in controls {
            let mode = match (&c.mode, union) {
                (None, false) => None,
                (Some(m), false) => bail!(
                    "--control-mode {m}: this bundle's ControlNet is not a ControlNet-Union (it takes no control \
                     mode); drop --control-mode"
                ),
                (_, true) if modes == 0 => bail!(
                    "this bundle's ControlNet is a ControlNet-Union but its manifest records no mode count \
                     (controlnet_modes); rebuild the bundle with --controlnet DIR"
                ),
                (None, true) => bail!(
                    "this bundle's ControlNet is a ControlNet-Union ({modes} modes): give --control-mode for '{}' \
                     (an index 0..{} or a name: {})",
                    c.image.display(),
                    modes - 1,
                    UNION_MODES
                        .iter()
                        .filter(|(_, i)| *i < modes)
                        .map(|(n, i)| format!("{n}={i}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                (Some(m), true) => Some(m.resolve(UNION_MODES, modes)?),
            };
            let rgb = super::image_io::load_control_image(&c.image, w, h, c.preprocess)?;
            let cond = self
                .encode_image(&rgb, lat)
                .with_context(|| format!("encoding the control image '{}'", c.image.display()))?;
            self.controls.push(ActiveControl {
                cond,
                strength: c.strength,
                start: c.start,
                end: c.end,
                mode,
            });
        }
        Ok(())
    }

    fn set_inpaint(
        &mut self,
        inpaint: Option<(&std::path::Path, &std::path::Path)>,
        lat: &Latents,
    ) -> Result<()> {
        let fill = self.config.fill_channels;
        if fill > 0 {
            self.concat_control = None;
        }
        let Some((image, mask)) = inpaint else {
            return Ok(());
        };
        if fill == 0 {
            bail!(
                "--mask needs a FLUX.1 Fill model (its transformer takes the masked image and the mask); this \
                 bundle's does not: use plain img2img (--init-image, --strength) or build FLUX.1-Fill-dev"
            );
        }
        // diffusers' FluxFillPipeline: the image with the masked part zeroed (in [-1, 1]), encoded and packed;
        // the mask folded from pixels into vs x vs channels per latent position, packed.
        let vs = self.config.vae_scale_factor;
        let (w, h) = (lat.width * vs, lat.height * vs);
        let rgb = super::image_io::load_init_image(image, w, h)?;
        let m = super::image_io::load_mask(mask, w, h)?;
        let masked: Vec<f32> = rgb
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1.0 - m[i % (w * h)]))
            .collect();
        let z = self
            .encode_image(&masked, lat)
            .context("encoding the masked image")?;
        let mut folded = vec![0f32; vs * vs * lat.height * lat.width];
        for y in 0..h {
            for x in 0..w {
                let c = (y % vs) * vs + x % vs;
                folded[(c * lat.height + y / vs) * lat.width + x / vs] = m[y * w + x];
            }
        }
        let packed_mask = pack(&folded, 1, vs * vs, lat.height, lat.width);
        let tokens = tokens(lat);
        let (zc, mc) = (z.len() / tokens, packed_mask.len() / tokens);
        if zc + mc != fill {
            bail!(
                "the masked image and mask give {} channels per token; this FLUX.1 Fill transformer takes {fill}",
                zc + mc
            );
        }
        let cond: Vec<f32> = z
            .chunks_exact(zc)
            .zip(packed_mask.chunks_exact(mc))
            .flat_map(|(a, b)| a.iter().chain(b).copied())
            .collect();
        self.concat_control = Some(cond);
        Ok(())
    }

    fn set_loras(&mut self, loras: &[(LoraFile, f32)]) -> Result<()> {
        let Some(lora) = self.lora.as_mut() else {
            bail!(
                "these Flux engines were opened without their graphs; open the bundle to apply LoRAs"
            );
        };
        let pending = lora.weights_for(loras)?;
        let mut done = Vec::new();
        for (part, weights) in &pending.by_part {
            let engine = match part {
                Part::Denoiser => &mut self.engines.transformer,
                Part::TextEncoder(0) => &mut self.engines.clip,
                Part::TextEncoder(_) => &mut self.engines.t5,
            };
            if let Err(e) = engine.set_weights(weights) {
                lora.commit_parts(&pending, &done);
                return Err(e.context(format!("applying the LoRAs to the {part}")));
            }
            done.push(*part);
            tracing::info!("LoRA: {} weights of the {part} replaced", weights.len());
        }
        lora.commit(pending);
        Ok(())
    }

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
            // The channel-concatenated control variants run the transformer on host copies of the latents.
            (Latent::Device(x), Latent::Device(out))
                if self.config.control_channels + self.config.fill_channels > 0 =>
            {
                let dev = self
                    .device
                    .clone()
                    .context("device latents without a GPU engine")?;
                dev.synchronize()?;
                let v = self.predict_host(&x.to_host()?, sigma, cond, lat, guidance)?;
                *out = DeviceBuffer::from_host(&dev, &v)?;
                Ok(())
            }
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
        // Per image: Philox noise of seed + i into [C, H, W], packed into its slice of the batch.
        let dims = [lat.batch, lat.channels, lat.height, lat.width];
        let per = lat.channels * lat.height * lat.width;
        Ok(
            match device_io::batch_noise(self.device.as_ref(), seed, lat.batch, per)? {
                Latent::Host(z) => Latent::Host(pack(&z, dims[0], dims[1], dims[2], dims[3])),
                Latent::Device(z) => {
                    let mut x = DeviceBuffer::zeros(&z.dev, z.data.len())?;
                    z.dev.flux_pack(&mut x.data, &z.data, dims)?;
                    Latent::Device(x)
                }
            },
        )
    }

    fn latent(&mut self, v: Vec<f32>) -> Result<Latent> {
        device_io::to_latent(self.device.as_ref(), v)
    }
    /// Init image -> packed, scaled latents [1, tokens, 4C] (VAE encoder mean).
    /// FLUX.1 Fill takes the mask as a transformer input (`set_inpaint`): no latent blend (all ones). Plain Flux
    /// models do not inpaint.
    fn mask_latent(&mut self, mask: &[f32], rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let _ = (mask, rgb);
        if self.config.fill_channels == 0 {
            bail!(
                "--mask needs a FLUX.1 Fill model (its transformer takes the masked image and the mask); this \
                 bundle's does not: use plain img2img (--init-image, --strength) or build FLUX.1-Fill-dev"
            );
        }
        Ok(vec![1.0; lat.per_image])
    }

    fn encode_image(&mut self, rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let c = &self.config;
        let s = VaeScaling {
            scale: c.scaling_factor,
            shift: c.shift_factor,
            spatial: c.vae_scale_factor,
        };
        let size = (lat.height * s.spatial, lat.width * s.spatial);
        let z = vae_encode(
            self.engines.vae_encoder.as_mut(),
            rgb,
            size,
            lat.per_image,
            s,
        )?;
        Ok(pack(&z, 1, lat.channels, lat.height, lat.width))
    }

    /// Packed latents -> RGB8 images through the VAE decoder.
    fn decode(&mut self, x: &Latent, lat: &Latents) -> Result<Vec<Vec<u8>>> {
        let c = &self.config;
        let s = VaeScaling {
            scale: c.scaling_factor,
            shift: c.shift_factor,
            spatial: c.vae_scale_factor,
        };
        let (b, ch, lh, lw) = (lat.batch, c.latent_channels, lat.height, lat.width);
        let z = unpack(&x.to_host()?, b, ch, lh, lw);
        vae_decode(self.engines.vae_decoder.as_mut(), &z, [b, ch, lh, lw], s)
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
