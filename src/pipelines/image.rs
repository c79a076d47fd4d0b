//! The seam every image family plugs into (as stable-diffusion.cpp's `DiffusionModel`): a family implements
//! [`ImageModel`] (its text encoders, latent layout, how the denoiser calls its network, its schedule and VAE);
//! [`ImagePipeline`] owns everything generic: request defaults, the text-conditioning cache, classifier-free
//! guidance, seeds and batches, img2img, the sampler loop with progress and previews, and the PNG parameters.
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::transfers::Transfers;
use crate::samplers::buffer::Buffer;
use crate::samplers::{model::Denoiser, noise, registry, stepper};
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Instant;

/// One image request. `None` fields take the bundle's defaults.
#[derive(Clone, Debug, Default)]
pub struct ImageRequest {
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub steps: Option<usize>,
    pub sampler: Option<String>,
    pub scheduler: Option<String>,
    pub seed: u64,
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Distilled guidance (a network input, e.g. FLUX.1-dev's).
    pub guidance: Option<f32>,
    /// Classifier-free guidance with the negative prompt (1 = off; doubles the network calls; 0 = the bundle's
    /// default).
    pub cfg: f32,
    pub batch: usize,
    pub init_image: Option<PathBuf>,
    /// img2img: fraction of the schedule re-run from the noised init image (1 = ignore the image).
    pub strength: f32,
    /// Inpainting: a mask (white = repaint, black = keep the init image); needs `init_image`. Outside the mask the
    /// latent is reset after every step to the init image's latent at that noise level, unless the model takes
    /// the mask itself (9-channel inpainting UNets, FLUX.1 Fill).
    pub mask: Option<PathBuf>,
    /// Stop after this fraction of the steps (a base model handing over to a refiner; the latents stay noisy).
    pub denoise_end: Option<f32>,
    /// Start at this fraction of the steps from `start_latents` (a refiner taking over).
    pub denoise_start: Option<f32>,
    /// Sampler-space latents of the whole batch at the start step (with `denoise_start`).
    pub start_latents: Option<Vec<f32>>,
    /// Sampler-space initial noise of the whole batch instead of Philox noise (reproducing other tools).
    pub initial_noise: Option<Vec<f32>>,
    /// Skip the VAE (tests of the latents, calibration).
    pub latents_only: bool,
    /// Write a preview PNG of the current x0 estimate here after each step (needs a preview decoder).
    pub preview: Option<PathBuf>,
    /// ControlNet conditions (the bundle's ControlNet, each image with its strength and step window).
    pub controls: Vec<ControlImage>,
    /// Skip-layer guidance (SD3.5), with classifier-free guidance only.
    pub skip_layer_guidance: Option<SkipLayerGuidance>,
}

/// Skip-layer guidance as diffusers' StableDiffusion3Pipeline runs it: at steps i with `start * n < i < end * n`
/// the guided prediction gains `scale * (cond - cond_without_layers)`, the second term the network with `layers`
/// skipped. Parsed from `LAYERS[:SCALE[:START:END]]` (`7,8,9:2.8:0.01:0.2`; unset parts take diffusers'
/// defaults 2.8, 0.01, 0.2).
#[derive(Clone, Debug, PartialEq)]
pub struct SkipLayerGuidance {
    pub layers: Vec<usize>,
    pub scale: f32,
    pub start: f32,
    pub end: f32,
}

impl std::str::FromStr for SkipLayerGuidance {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = |what: &str| {
            format!(
                "'{s}': {what}; write LAYERS[:SCALE[:START:END]], e.g. 7,8,9 or 7,8,9:2.8:0.01:0.2 (SD3.5 medium's \
                 recommendation)"
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() > 4 || parts.len() == 3 {
            return Err(bad(
                "give the layers, then a scale, then both start and end",
            ));
        }
        let layers = parts[0]
            .split(',')
            .map(|l| l.trim().parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| bad("the layers are block indices separated by commas"))?;
        let num = |i: usize, default: f32| -> std::result::Result<f32, String> {
            parts.get(i).map_or(Ok(default), |v| {
                v.trim()
                    .parse::<f32>()
                    .map_err(|_| bad(&format!("'{v}' is not a number")))
            })
        };
        let slg = SkipLayerGuidance {
            layers,
            scale: num(1, 2.8)?,
            start: num(2, 0.01)?,
            end: num(3, 0.2)?,
        };
        if !(0.0..=1.0).contains(&slg.start)
            || !(0.0..=1.0).contains(&slg.end)
            || slg.start >= slg.end
        {
            return Err(bad(
                "start and end are fractions of the steps with start < end",
            ));
        }
        Ok(slg)
    }
}

/// One ControlNet condition of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct ControlImage {
    pub image: PathBuf,
    /// The ControlNet's conditioning scale.
    pub strength: f32,
    /// Fraction of the steps where the control starts and ends (diffusers' control_guidance_start/end).
    pub start: f32,
    pub end: f32,
    /// Preprocessing of the image before it is encoded (`canny`), or none.
    pub preprocess: Option<super::image_io::Preprocess>,
    /// ControlNet-Union: the control type of this image; None for plain ControlNets.
    pub mode: Option<ControlMode>,
}

/// A ControlNet-Union control type (`--control-mode`): an index, or a name of the checkpoint family's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlMode {
    Index(usize),
    Name(String),
}

impl std::str::FromStr for ControlMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("a mode index (0, 1, ...) or name (canny, depth, ...) was expected".into());
        }
        Ok(match s.parse::<usize>() {
            Ok(i) => ControlMode::Index(i),
            Err(_) => ControlMode::Name(s.to_ascii_lowercase()),
        })
    }
}

impl std::fmt::Display for ControlMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlMode::Index(i) => write!(f, "{i}"),
            ControlMode::Name(n) => f.write_str(n),
        }
    }
}

impl ControlMode {
    /// The mode's index for a union ControlNet of `modes` modes whose names are `table` (name, index).
    pub fn resolve(&self, table: &[(&str, usize)], modes: usize) -> Result<usize> {
        let names = || {
            table
                .iter()
                .filter(|(_, i)| *i < modes)
                .map(|(n, i)| format!("{n}={i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let i = match self {
            ControlMode::Index(i) => *i,
            ControlMode::Name(n) => match table.iter().find(|(name, _)| name == n) {
                Some((_, i)) => *i,
                None => bail!(
                    "--control-mode '{n}' is not a mode name of this ControlNet-Union; known: {}",
                    names()
                ),
            },
        };
        if i >= modes {
            bail!(
                "--control-mode {self} is out of range: this ControlNet-Union has {modes} modes (num_mode {modes}): \
                 give 0..{} or a name ({})",
                modes.saturating_sub(1),
                names()
            );
        }
        Ok(i)
    }
}

/// What `generate` uses for unset request fields; each family records its own in the bundle.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageDefaults {
    pub steps: usize,
    pub sampler: String,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
    pub guidance: f32,
    /// The network takes distilled guidance as an input (otherwise `--guidance` has no effect).
    pub guidance_input: bool,
    /// Classifier-free guidance scale when the request leaves it at 0 (1 = off). Families whose default is
    /// above 1 (SD, SDXL) guide against the empty prompt when no negative prompt is given.
    pub cfg: f32,
}

/// How a network's output relates to the denoised estimate `D` the samplers step with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prediction {
    /// Rectified flow: the network predicts the velocity v, `D = x - sigma v`; `x_sigma = (1 - sigma) x0 + sigma
    /// noise`, so the initial noise is unscaled.
    Flow,
    /// Variance-exploding k-diffusion view of a DDPM model predicting the noise: `D = x - sigma eps`, `x_sigma =
    /// x0 + sigma noise` (the family scales the network input by `1 / sqrt(sigma^2 + 1)`).
    Eps,
    /// v-prediction in the same view: `D = x / (sigma^2 + 1) - v sigma / sqrt(sigma^2 + 1)`.
    V,
}

/// The latent geometry of one request: the sampler steps `batch * per_image` values; `channels x height x width`
/// is one image's unpacked VAE latent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Latents {
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub per_image: usize,
}

impl Latents {
    pub fn len(&self) -> usize {
        self.batch * self.per_image
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The sampler's latents: in host memory when the family's engines run on the CPU, in GPU memory when they run on
/// a GPU, so that the whole loop (network calls, guidance, sampler updates, noise) stays on the device.
pub enum Latent {
    Host(Vec<f32>),
    Device(DeviceBuffer),
}

impl Latent {
    /// Waits for queued device work on the latent (step timings measure finished work).
    pub fn sync(&self) -> Result<()> {
        match self {
            Latent::Host(_) => Ok(()),
            Latent::Device(d) => d.dev.synchronize(),
        }
    }

    /// The values on the host (one copy for a device latent).
    pub fn to_host(&self) -> Result<Vec<f32>> {
        match self {
            Latent::Host(v) => Ok(v.clone()),
            Latent::Device(d) => d.to_host(),
        }
    }
}

fn mixed() -> anyhow::Error {
    anyhow::anyhow!("host and device latents mixed in one operation (a pipeline bug)")
}

impl Buffer for Latent {
    fn len(&self) -> usize {
        match self {
            Latent::Host(v) => v.len(),
            Latent::Device(d) => d.len(),
        }
    }
    fn alloc_like(&self) -> Result<Self> {
        Ok(match self {
            Latent::Host(v) => Latent::Host(v.alloc_like()?),
            Latent::Device(d) => Latent::Device(d.alloc_like()?),
        })
    }
    fn lincomb_raw(&mut self, beta: f64, terms: &[(f64, &Self)]) -> Result<()> {
        match self {
            Latent::Host(out) => {
                let t: Vec<(f64, &Vec<f32>)> = terms
                    .iter()
                    .map(|(c, x)| match x {
                        Latent::Host(v) => Ok((*c, v)),
                        Latent::Device(_) => Err(mixed()),
                    })
                    .collect::<Result<_>>()?;
                out.lincomb_raw(beta, &t)
            }
            Latent::Device(out) => {
                let t: Vec<(f64, &DeviceBuffer)> = terms
                    .iter()
                    .map(|(c, x)| match x {
                        Latent::Device(v) => Ok((*c, v)),
                        Latent::Host(_) => Err(mixed()),
                    })
                    .collect::<Result<_>>()?;
                out.lincomb_raw(beta, &t)
            }
        }
    }
    fn fill_normal(&mut self, seed: u64, stream: u64) -> Result<()> {
        match self {
            Latent::Host(v) => v.fill_normal(seed, stream),
            Latent::Device(d) => d.fill_normal(seed, stream),
        }
    }
    fn to_host_f64(&self) -> Result<Vec<f64>> {
        match self {
            Latent::Host(v) => v.to_host_f64(),
            Latent::Device(d) => d.to_host_f64(),
        }
    }
    fn set_from_f64(&mut self, v: &[f64]) -> Result<()> {
        match self {
            Latent::Host(h) => h.set_from_f64(v),
            Latent::Device(d) => d.set_from_f64(v),
        }
    }
}

/// What a model family supplies. Latents are in the sampler's space (packed, scaled); images are RGB8.
pub trait ImageModel {
    /// One prompt's text conditioning, cached by the pipeline per prompt.
    type Cond;
    /// Sets the ControlNet conditions of the next run (`sigmas`: the run's schedule, whose step index picks each
    /// control's window); empty clears them.
    fn set_controls(
        &mut self,
        controls: &[ControlImage],
        lat: &Latents,
        sigmas: &[f64],
    ) -> Result<()> {
        let _ = (lat, sigmas);
        if controls.is_empty() {
            return Ok(());
        }
        bail!("the {} pipeline has no ControlNet", self.arch())
    }
    /// Sets skip-layer guidance for the next run (`sigmas`: its schedule, whose step index picks the window;
    /// `cfg`: its classifier-free guidance scale, 1 when off); None clears it.
    fn set_skip_layer_guidance(
        &mut self,
        slg: Option<&SkipLayerGuidance>,
        sigmas: &[f64],
        cfg: f32,
    ) -> Result<()> {
        let _ = (sigmas, cfg);
        match slg {
            None => Ok(()),
            Some(_) => bail!(
                "the {} pipeline has no skip-layer guidance (SD3.5 bundles have)",
                self.arch()
            ),
        }
    }
    /// Sets the inpainting condition of the next run (`image` repainted where `mask` is white; None clears it),
    /// for models that take it as an input (FLUX.1 Fill); the others inpaint through `mask_latent`'s blend.
    fn set_inpaint(
        &mut self,
        inpaint: Option<(&std::path::Path, &std::path::Path)>,
        lat: &Latents,
    ) -> Result<()> {
        let _ = (inpaint, lat);
        Ok(())
    }
    /// Applies `loras` (files at strengths) to the opened engines, replacing the set applied before (an empty
    /// list restores the built weights).
    fn set_loras(&mut self, loras: &[(crate::weights::lora::LoraFile, f32)]) -> Result<()> {
        if loras.is_empty() {
            return Ok(());
        }
        bail!(
            "the {} pipeline does not take LoRAs at run time yet; merge them with `build --lora`",
            self.arch()
        )
    }
    fn arch(&self) -> &str;
    fn defaults(&self) -> ImageDefaults;
    fn prediction(&self) -> Prediction;
    /// Checks the image size and gives the latent geometry.
    fn latents(&self, width: usize, height: usize, batch: usize) -> Result<Latents>;
    /// `steps + 1` sigmas ending in 0 for a scheduler name (the family's own names and the catalogue's).
    fn sigmas(&self, scheduler: &str, steps: usize, lat: &Latents) -> Result<Vec<f64>>;
    fn encode_prompt(&mut self, prompt: &str) -> Result<Self::Cond>;
    /// A negative prompt's conditioning (the SDXL refiner conditions it on another aesthetic score).
    fn encode_negative(&mut self, prompt: &str) -> Result<Self::Cond> {
        self.encode_prompt(prompt)
    }
    /// The network's raw output for the whole batch at `sigma`, written into `out` (where `x` lives).
    fn predict(
        &mut self,
        x: &Latent,
        sigma: f64,
        cond: &Self::Cond,
        lat: &Latents,
        guidance: f32,
        out: &mut Latent,
    ) -> Result<()>;
    /// The conditional and unconditional outputs of classifier-free guidance; families whose network takes
    /// both in one batched call (one engine run instead of two) override it.
    fn predict_pair(
        &mut self,
        x: &Latent,
        sigma: f64,
        (cond, uncond): (&Self::Cond, &Self::Cond),
        lat: &Latents,
        guidance: f32,
        (out, out_uncond): (&mut Latent, &mut Latent),
    ) -> Result<()> {
        self.predict(x, sigma, cond, lat, guidance, out)?;
        self.predict(x, sigma, uncond, lat, guidance, out_uncond)
    }
    /// The batch's initial latents: per image i, Philox noise of `seed + i` (stream 0) in the sampler's space,
    /// where the engines run.
    fn initial_noise(&mut self, seed: u64, lat: &Latents) -> Result<Latent>;
    /// Host values as a latent where the engines run.
    fn latent(&mut self, v: Vec<f32>) -> Result<Latent>;
    /// One init image `[1, 3, H, W]` in [-1, 1] to its sampler-space latent on the host (img2img).
    fn encode_image(&mut self, rgb: &[f32], lat: &Latents) -> Result<Vec<f32>>;
    /// Sampler-space latents of the batch to RGB8 images.
    fn decode(&mut self, x: &Latent, lat: &Latents) -> Result<Vec<Vec<u8>>>;
    /// Called at the start of every request: per-request state (an inpainting mask) is dropped here.
    fn new_request(&mut self) {}
    /// Inpainting weights of one image in the sampler's latent layout (1 = repaint, blended after every step)
    /// from a mask of the image's pixels (`h * w` values in [0, 1]) and the init image `rgb` ([1, 3, H, W] in
    /// [-1, 1]); models conditioned on the mask themselves (9-channel inpainting UNets) keep it and return ones.
    fn mask_latent(&mut self, mask: &[f32], rgb: &[f32], lat: &Latents) -> Result<Vec<f32>> {
        let _ = (mask, rgb, lat);
        bail!("{} does not support --mask", self.arch())
    }
    /// Whether [`ImageModel::preview`] can draw (a tiny autoencoder in the bundle).
    fn can_preview(&self) -> bool;
    /// The first image of an x0 estimate through the preview decoder: (RGB8, width, height).
    fn preview(&mut self, x0: &Latent, lat: &Latents) -> Result<(Vec<u8>, usize, usize)>;
}

pub struct StepInfo {
    pub step: usize,
    pub steps: usize,
    pub seconds: f64,
    /// Of `seconds`, the time spent outside the network calls (sampler, guidance, noise, bookkeeping).
    pub outside_seconds: f64,
    /// Bytes trt-diff copied between host and device during the step (0 when the loop stays on the GPU).
    pub copied_bytes: u64,
}

pub struct ImageOutput {
    pub width: usize,
    pub height: usize,
    /// RGB8 per image (empty with `latents_only`).
    pub images: Vec<Vec<u8>>,
    /// Final sampler-space latents of the batch.
    pub latents: Vec<f32>,
    pub step_seconds: Vec<f64>,
    /// Per step, the time outside the network calls.
    pub outside_seconds: Vec<f64>,
    /// Per step, bytes copied between host and device.
    pub copied_bytes: Vec<u64>,
    /// "prompt, steps, sampler, ..." as written into the PNG.
    pub parameters: String,
}

/// Any family's pipeline behind one object, for callers that serve whatever bundle they are given (the server).
pub trait ImageGenerator {
    fn generate(
        &mut self,
        req: &ImageRequest,
        on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
    ) -> Result<ImageOutput>;
    /// What unset request fields become.
    fn defaults(&self) -> ImageDefaults;
    /// The arch the bundle records ("flux-dev", ...).
    fn arch(&self) -> &str;
    /// Applies LoRAs at run time (families without LoRA support refuse).
    fn set_loras(&mut self, loras: &[(crate::weights::lora::LoraFile, f32)]) -> Result<()>;
}

impl<M: ImageModel> ImageGenerator for ImagePipeline<M> {
    fn generate(
        &mut self,
        req: &ImageRequest,
        on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
    ) -> Result<ImageOutput> {
        ImagePipeline::generate(self, req, on_step)
    }
    fn defaults(&self) -> ImageDefaults {
        self.model.defaults()
    }
    fn arch(&self) -> &str {
        self.model.arch()
    }
    fn set_loras(&mut self, loras: &[(crate::weights::lora::LoraFile, f32)]) -> Result<()> {
        ImagePipeline::set_loras(self, loras)
    }
}

/// Prompts whose conditioning is kept (a server alternating a few prompts re-encodes none of them).
const COND_CACHE: usize = 16;

/// A model family behind the generic request handling.
pub struct ImagePipeline<M: ImageModel> {
    pub model: M,
    cache: HashMap<String, Rc<M::Cond>>,
}

impl<M: ImageModel> ImagePipeline<M> {
    pub fn new(model: M) -> Self {
        Self {
            model,
            cache: HashMap::new(),
        }
    }

    /// Runs the calibration prompts through the sampler loop (latents only), one seed each, so that a model in
    /// calibration mode records its activation ranges; `side` is the image size, `cfg` as in [`ImageRequest`].
    pub fn calibrate(
        &mut self,
        prompts: &[String],
        steps: usize,
        side: usize,
        cfg: f32,
    ) -> Result<()> {
        for (i, prompt) in prompts.iter().enumerate() {
            tracing::info!("calibrating on prompt {}/{}", i + 1, prompts.len());
            let req = ImageRequest {
                prompt: prompt.clone(),
                steps: Some(steps),
                seed: i as u64,
                width: Some(side),
                height: Some(side),
                batch: 1,
                cfg,
                strength: 1.0,
                latents_only: true,
                ..Default::default()
            };
            self.generate(&req, &mut |_| Ok(()))?;
        }
        Ok(())
    }

    /// Applies LoRAs at run time ([`ImageModel::set_loras`]); cached text conditioning is dropped, since the text
    /// encoders may have changed.
    pub fn set_loras(&mut self, loras: &[(crate::weights::lora::LoraFile, f32)]) -> Result<()> {
        self.cache.clear();
        self.model.set_loras(loras)
    }

    fn condition(&mut self, prompt: &str, negative: bool) -> Result<Rc<M::Cond>> {
        // Negative and positive conditionings of one text may differ: separate keys.
        let key = format!("{}{prompt}", if negative { "-" } else { "+" });
        if let Some(c) = self.cache.get(&key) {
            return Ok(c.clone());
        }
        tracing::debug!("encoding the prompt");
        let c = Rc::new(if negative {
            self.model.encode_negative(prompt)?
        } else {
            self.model.encode_prompt(prompt)?
        });
        if self.cache.len() >= COND_CACHE {
            self.cache.clear();
        }
        self.cache.insert(key, c.clone());
        Ok(c)
    }

    /// Runs a request; `on_step` sees each finished step (progress bars).
    pub fn generate(
        &mut self,
        req: &ImageRequest,
        on_step: &mut dyn FnMut(&StepInfo) -> Result<()>,
    ) -> Result<ImageOutput> {
        self.model.new_request();
        let d = self.model.defaults();
        let (w, h) = (req.width.unwrap_or(d.width), req.height.unwrap_or(d.height));
        let lat = self.model.latents(w, h, req.batch.max(1))?;
        let steps = req.steps.unwrap_or(d.steps);
        let sampler_name = req.sampler.clone().unwrap_or(d.sampler.clone());
        let scheduler = req.scheduler.clone().unwrap_or(d.scheduler.clone());
        let guidance = req.guidance.unwrap_or(d.guidance);
        let cfg_scale = if req.cfg == 0.0 { d.cfg } else { req.cfg };
        if req.guidance.is_some() && !d.guidance_input {
            tracing::warn!(
                "{} has no guidance input: --guidance is ignored (use --cfg with --negative-prompt)",
                self.model.arch()
            );
        }
        let mut sigmas = self.model.sigmas(&scheduler, steps, &lat)?;
        let true_cfg = cfg_scale > 1.0;
        // Families that guide by default guide against the empty prompt (as diffusers, A1111 and ComfyUI do).
        let negative = match (&req.negative_prompt, d.cfg > 1.0) {
            (Some(n), _) => Some(n.clone()),
            (None, true) => Some(String::new()),
            (None, false) => None,
        };
        if true_cfg && negative.is_none() {
            bail!(
                "--cfg {cfg_scale} needs --negative-prompt (classifier-free guidance compares the two predictions)"
            );
        }
        if req.preview.is_some() && !self.model.can_preview() {
            bail!(
                "--preview needs a tiny autoencoder in the bundle; rebuild it with --tae-decoder FILE (madebyollin's \
                 TAESD family)"
            );
        }
        let mut sampler = registry::build::<Latent>(&sampler_name, &Default::default())?;
        let cond = self.condition(&req.prompt, false)?;
        let uncond = match (&negative, true_cfg) {
            (Some(neg), true) => Some(self.condition(neg, true)?),
            _ => None,
        };
        // Initial latents: given, or Philox noise per image (seed + i, so image i is reproducible alone).
        let mut x = match &req.initial_noise {
            Some(v) if v.len() == lat.len() => self.model.latent(v.clone())?,
            Some(v) => bail!(
                "initial noise has {} values, {} expected",
                v.len(),
                lat.len()
            ),
            None => self.model.initial_noise(req.seed, &lat)?,
        };
        let prediction = self.model.prediction();
        let steps_total = sigmas.len() - 1;
        let at = |f: f32| ((steps_total as f64) * f as f64).round() as usize;
        if let Some(end) = req.denoise_end {
            if !(end > 0.0 && end <= 1.0) {
                bail!("the denoising end {end} must be in (0, 1]");
            }
            sigmas.truncate(at(end).max(1) + 1);
        }
        if let Some(start) = req.denoise_start {
            if !(0.0..1.0).contains(&start) {
                bail!("the denoising start {start} must be in [0, 1)");
            }
            if req.init_image.is_some() {
                bail!("a refiner pass starts from the base model's latents, not from --init-image");
            }
            let k = at(start);
            if k + 1 >= sigmas.len() {
                bail!(
                    "starting at {start} of {steps} steps leaves no step to run: lower the start or add steps"
                );
            }
            sigmas = sigmas[k..].to_vec();
            match &req.start_latents {
                Some(v) if v.len() == lat.len() => x = self.model.latent(v.clone())?,
                Some(v) => bail!(
                    "the starting latents have {} values, {} expected (base and refiner must share the latent \
                     size)",
                    v.len(),
                    lat.len()
                ),
                None => bail!("a denoising start needs the latents to start from (a pipeline bug)"),
            }
        }
        if req.mask.is_some() && req.init_image.is_none() {
            bail!("--mask needs --init-image (the image whose unmasked part is kept)");
        }
        // Inpainting: the unit noise, the init latent and the mask, for the blend after every step.
        let mut inpaint: Option<(Vec<f64>, Vec<f64>, Vec<f64>)> = None;
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
            let rgb = super::image_io::load_init_image(path, w, h)?;
            let x0 = self.model.encode_image(&rgb, &lat)?.repeat(lat.batch);
            if let Some(mask_path) = &req.mask {
                let m = super::image_io::load_mask(mask_path, w, h)?;
                let m = self.model.mask_latent(&m, &rgb, &lat)?;
                if m.len() != lat.per_image {
                    bail!(
                        "the model's latent mask has {} values, {} expected",
                        m.len(),
                        lat.per_image
                    );
                }
                let m: Vec<f64> = m
                    .iter()
                    .map(|&v| v as f64)
                    .collect::<Vec<_>>()
                    .repeat(lat.batch);
                let x0f: Vec<f64> = x0.iter().map(|&v| v as f64).collect();
                inpaint = Some((x.to_host_f64()?, x0f, m));
            }
            let x0 = self.model.latent(x0)?;
            let s0 = sigmas[0] as f32 as f64;
            match prediction {
                Prediction::Flow => x.lincomb(s0, &[(1.0 - s0, &x0)])?,
                Prediction::Eps | Prediction::V => x.lincomb(s0, &[(1.0, &x0)])?,
            }
        } else if prediction != Prediction::Flow && req.denoise_start.is_none() {
            // k-diffusion: the first latent is noise at the first sigma.
            x.lincomb(sigmas[0] as f32 as f64, &[])?;
        }
        for c in &req.controls {
            if !(0.0..=1.0).contains(&c.start) || !(0.0..=1.0).contains(&c.end) || c.start >= c.end
            {
                bail!(
                    "--control-start {} and --control-end {} must satisfy 0 <= start < end <= 1",
                    c.start,
                    c.end
                );
            }
        }
        self.model.set_controls(&req.controls, &lat, &sigmas)?;
        let slg_cfg = if true_cfg { cfg_scale } else { 1.0 };
        self.model
            .set_skip_layer_guidance(req.skip_layer_guidance.as_ref(), &sigmas, slg_cfg)?;
        let inpaint_input = match (&req.mask, &req.init_image) {
            (Some(m), Some(i)) => Some((i.as_path(), m.as_path())),
            _ => None,
        };
        self.model.set_inpaint(inpaint_input, &lat)?;
        let run_steps = sigmas.len() - 1;
        let mut last_x0 = x.alloc_like()?;
        let mut denoiser = GuidedDenoiser {
            model: &mut self.model,
            cond: &cond,
            uncond: uncond.as_deref(),
            cfg: cfg_scale,
            guidance,
            lat: &lat,
            prediction,
            last_x0: &mut last_x0,
            raw: None,
            network_seconds: 0.0,
        };
        let mut noise_src = noise::PhiloxNoise::new(req.seed);
        let mut times = Vec::with_capacity(run_steps);
        let mut outside = Vec::with_capacity(run_steps);
        let mut copied = Vec::with_capacity(run_steps);
        stepper::check_sigmas(&sigmas)?;
        for i in 0..run_steps {
            let t_step = Instant::now();
            let transfers = Transfers::now();
            tracing::debug!("step {} of {run_steps}", i + 1);
            denoiser.network_seconds = 0.0;
            let mut cx = stepper::Ctx {
                model: &mut denoiser as &mut dyn Denoiser<Latent>,
                noise: &mut noise_src,
                sigmas: &sigmas,
            };
            sampler.step(&mut cx, &mut x, i)?;
            if let Some((noise, x0, m)) = &inpaint {
                // Keep the init image outside the mask: its latent noised to this step's sigma.
                let s = sigmas[i + 1];
                let cur = x.to_host_f64()?;
                let blended: Vec<f64> = (0..cur.len())
                    .map(|j| {
                        let kept = match prediction {
                            Prediction::Flow => (1.0 - s) * x0[j] + s * noise[j],
                            Prediction::Eps | Prediction::V => x0[j] + s * noise[j],
                        };
                        m[j] * cur[j] + (1.0 - m[j]) * kept
                    })
                    .collect();
                x.set_from_f64(&blended)?;
            }
            x.sync()?;
            let seconds = t_step.elapsed().as_secs_f64();
            let outside_seconds = seconds - denoiser.network_seconds;
            let copied_bytes = Transfers::since(transfers).total();
            times.push(seconds);
            outside.push(outside_seconds);
            copied.push(copied_bytes);
            on_step(&StepInfo {
                step: i + 1,
                steps: run_steps,
                seconds,
                outside_seconds,
                copied_bytes,
            })?;
            if let Some(path) = &req.preview {
                let (rgb, pw, ph) = denoiser.model.preview(denoiser.last_x0, &lat)?;
                super::image_io::write_png(path, &rgb, pw, ph, &[])?;
            }
        }
        let parameters = format!(
            "{}\nNegative prompt: {}\nSteps: {steps}, Sampler: {sampler_name}, Schedule: {scheduler}, Guidance: \
             {guidance}, CFG: {}, Seed: {}, Size: {w}x{h}, Batch: {}, Model: {}{}",
            req.prompt,
            negative.clone().unwrap_or_default(),
            cfg_scale.max(1.0),
            req.seed,
            lat.batch,
            self.model.arch(),
            req.init_image
                .as_ref()
                .map(|p| format!(", Init image: {}, Strength: {}", p.display(), req.strength))
                .unwrap_or_default()
                + &req
                    .mask
                    .as_ref()
                    .map(|p| format!(", Mask: {}", p.display()))
                    .unwrap_or_default()
        );
        // A base model handing over keeps its noisy latents: nothing to decode.
        let images = if req.latents_only || sigmas.last().is_some_and(|s| *s != 0.0) {
            Vec::new()
        } else {
            tracing::debug!("decoding the latents");
            self.model.decode(&x, &lat)?
        };
        Ok(ImageOutput {
            width: w,
            height: h,
            images,
            latents: x.to_host()?,
            step_seconds: times,
            outside_seconds: outside,
            copied_bytes: copied,
            parameters,
        })
    }
}

/// The samplers' denoiser `D(x, sigma)`: the family's network with classifier-free guidance on its raw output,
/// then the family's parameterization turned into the denoised estimate, all through `Buffer::lincomb` (so on the
/// device for device latents).
struct GuidedDenoiser<'a, M: ImageModel> {
    model: &'a mut M,
    cond: &'a M::Cond,
    uncond: Option<&'a M::Cond>,
    cfg: f32,
    guidance: f32,
    lat: &'a Latents,
    prediction: Prediction,
    last_x0: &'a mut Latent,
    /// The network's outputs (conditional, unconditional), allocated at the first call.
    raw: Option<(Latent, Latent)>,
    /// Time inside the network calls since the last reset.
    network_seconds: f64,
}

impl<M: ImageModel> GuidedDenoiser<'_, M> {
    /// `out = D` from the raw prediction `raw` at `x`.
    fn to_denoised(&self, x: &Latent, sigma: f64, raw: &Latent, out: &mut Latent) -> Result<()> {
        match self.prediction {
            Prediction::Flow => out.lincomb(0.0, &[(1.0, x), (-(sigma as f32) as f64, raw)]),
            Prediction::Eps => out.lincomb(0.0, &[(1.0, x), (-sigma, raw)]),
            Prediction::V => {
                let s2 = sigma * sigma + 1.0;
                out.lincomb(0.0, &[(1.0 / s2, x), (-sigma / s2.sqrt(), raw)])
            }
        }
    }
}

impl<M: ImageModel> Denoiser<Latent> for GuidedDenoiser<'_, M> {
    fn denoise(&mut self, x: &Latent, sigma: f64, out: &mut Latent) -> Result<()> {
        self.denoise_with_uncond(x, sigma, out, &mut Latent::Host(Vec::new()))
    }

    fn denoise_with_uncond(
        &mut self,
        x: &Latent,
        sigma: f64,
        out: &mut Latent,
        uncond_out: &mut Latent,
    ) -> Result<()> {
        if self.raw.is_none() {
            self.raw = Some((x.alloc_like()?, x.alloc_like()?));
        }
        let (mut v, mut vu) = self.raw.take().expect("allocated above");
        let r = (|| {
            let t = Instant::now();
            match self.uncond {
                Some(u) => self.model.predict_pair(
                    x,
                    sigma,
                    (self.cond, u),
                    self.lat,
                    self.guidance,
                    (&mut v, &mut vu),
                )?,
                None => self
                    .model
                    .predict(x, sigma, self.cond, self.lat, self.guidance, &mut v)?,
            }
            self.network_seconds += t.elapsed().as_secs_f64();
            if self.uncond.is_some() {
                // v = vu + cfg (v - vu)
                let c = self.cfg as f64;
                v.lincomb(c, &[(1.0 - c, &vu)])?;
                if uncond_out.len() == x.len() {
                    self.to_denoised(x, sigma, &vu, uncond_out)?;
                }
            }
            self.to_denoised(x, sigma, &v, out)?;
            if self.uncond.is_none() && uncond_out.len() == x.len() {
                uncond_out.copy_from(out)?;
            }
            self.last_x0.copy_from(out)
        })();
        self.raw = Some((v, vu));
        r
    }
}
