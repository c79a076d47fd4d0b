//! `build --precision auto --quality Q`: the measuring half (`quant::auto` is the choosing half). Each quantizable
//! layer goes alone to each format the targets run; its sensitivity is the error of the final images of the
//! calibration prompts through the real sampler loop (image families: [`ImageProbe`]) or the KL divergence of
//! next-token distributions (LLMs: [`LlmProbe`]), against the unquantized model on the CPU backend. Emulation is
//! the real thing: the family re-exports its graph with that one layer's Q/DQ (the same pattern the engine gets)
//! and ONNX Runtime runs it; docs/precision.md has the measured split of that cost. The chosen policy is then
//! checked on held-out prompts.
use crate::backend::{Engine, HostTensor};
use crate::onnx::DataType;
use crate::quant::auto::{Format, LinearShape, Measured, Metric, PolicyFile, Target, search};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::time::Instant;

/// Replaces an image model's denoiser by one with the given layers quantized.
pub type SwapFn<'a, M> = Box<dyn FnMut(&mut M, &BTreeMap<String, Format>) -> Result<()> + 'a>;
/// Opens a decoder graph with the given layers quantized.
pub type OpenFn<'a> = Box<dyn FnMut(&BTreeMap<String, Format>) -> Result<Box<dyn Engine>> + 'a>;

/// `--precision auto` and `--policy` as a build receives them.
#[derive(Clone, Debug, Default)]
pub struct AutoOptions {
    /// `--quality`: PSNR in dB (images) or mean KL in nats (LLMs).
    pub quality: Option<f64>,
    /// `--policy FILE`: per-layer formats chosen before, instead of a search.
    pub policy: Option<std::path::PathBuf>,
    /// `--heldout-prompt`: prompts the choice is verified on (default: the recipe's).
    pub heldout_prompts: Vec<String>,
    /// `--calibration-prompt` for LLM builds (image families take theirs with their other calibration options).
    pub calibration_prompts: Vec<String>,
    /// Layer-name globs: only matching layers are measured and chosen, the others kept (a sample of a large
    /// model's layers; empty: every layer): `--auto-layers`; the image families take it.
    pub layers: Vec<String>,
}

impl AutoOptions {
    /// Whether the build chooses formats per layer (`--precision auto` or `--policy FILE`); `--policy` with another
    /// fixed precision than fp32 (the default) contradicts itself and is refused.
    pub fn per_layer(&self, precision: crate::quant::Precision) -> Result<bool> {
        use crate::quant::Precision;
        if self.policy.is_some() && !matches!(precision, Precision::Auto | Precision::Fp32) {
            bail!(
                "--policy sets every layer's format; drop --precision {precision} (or give --precision auto)"
            );
        }
        Ok(precision == Precision::Auto || self.policy.is_some())
    }

    /// The layers of `shapes` the search covers: those `keep` leaves quantizable (None: all), then those matching
    /// [`AutoOptions::layers`].
    pub fn candidates(
        &self,
        shapes: &[LinearShape],
        keep: Option<&crate::quant::policy::Policy>,
    ) -> Result<Vec<LinearShape>> {
        use crate::quant::policy::LayerKind;
        let globs = self
            .layers
            .iter()
            .map(|g| {
                glob::Pattern::new(g)
                    .map_err(|e| anyhow::anyhow!("layer pattern '{g}' is not a valid glob: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let out: Vec<LinearShape> = shapes
            .iter()
            .filter(|s| keep.is_none_or(|p| p.decide(&s.layer, LayerKind::Linear).is_some()))
            .filter(|s| globs.is_empty() || globs.iter().any(|g| g.matches(&s.layer)))
            .cloned()
            .collect();
        if out.is_empty() {
            bail!(
                "no linear layer matches the layer patterns {:?}; the model's layers are e.g. {}",
                self.layers,
                shapes
                    .iter()
                    .take(5)
                    .map(|s| s.layer.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(out)
    }
}

/// Where a family's measurements come from.
pub trait Probe {
    /// The error (the metric's additive unit) of the model with `layers` in their formats and every other layer
    /// kept: the calibration prompts' mean, or on `heldout` the held-out prompts' (PSNR: worst; KL: mean).
    fn error(&mut self, layers: &BTreeMap<String, Format>, heldout: bool) -> Result<f64>;
}

/// What the search is for.
pub struct SearchSpec<'a> {
    pub arch: String,
    pub metric: Metric,
    pub quality: f64,
    pub target: Target,
    pub shapes: &'a [LinearShape],
    /// Rows per GEMM call in the time model (the profile's optimum).
    pub tokens: usize,
    /// Bytes per element of kept layers in the engine's graph.
    pub base_bytes: usize,
    pub calibration_prompts: Vec<String>,
    pub heldout_prompts: Vec<String>,
}

/// Checks that the held-out prompts exist and differ from the calibration ones.
pub fn check_prompts(calibration: &[String], heldout: &[String]) -> Result<()> {
    if heldout.is_empty() || calibration.is_empty() {
        bail!(
            "--precision auto needs calibration prompts and held-out prompts (--calibration-prompt, \
             --heldout-prompt; the recipe has defaults)"
        );
    }
    if let Some(p) = heldout.iter().find(|p| calibration.contains(p)) {
        bail!(
            "held-out prompt '{p}' is also a calibration prompt: the check must use prompts the search did not \
             see; give different --heldout-prompt values"
        );
    }
    Ok(())
}

/// Measures every layer in every format the targets run (unless `table` holds an earlier search's measurements,
/// as `--policy FILE --quality Q` re-chooses from them), chooses under the budget, verifies on the held-out
/// prompts, and returns the policy file's contents.
pub fn run_search(
    spec: &SearchSpec,
    probe: &mut dyn Probe,
    table: Option<Vec<Measured>>,
) -> Result<PolicyFile> {
    check_prompts(&spec.calibration_prompts, &spec.heldout_prompts)?;
    if !spec.quality.is_finite() || (spec.metric == Metric::Kl && spec.quality < 0.0) {
        bail!(
            "--quality {} is not a {} budget",
            spec.quality,
            spec.metric.unit()
        );
    }
    let start = Instant::now();
    let t = &spec.target;
    let reuse = table.is_some();
    let mut measured = table.unwrap_or_default();
    let n = spec.shapes.len();
    for (i, s) in spec.shapes.iter().enumerate().filter(|_| !reuse) {
        let row = |f: Format, sensitivity: f64| Measured {
            layer: s.layer.clone(),
            format: f,
            sensitivity,
            bytes: f.weight_bytes(s, spec.base_bytes),
            gemm_us: t.gemm_seconds(s, f, spec.tokens, spec.base_bytes) * 1e6,
        };
        measured.push(row(Format::Keep, 0.0));
        for f in t.formats.iter().copied().filter(|f| f.fits(s)) {
            let e = probe.error(&BTreeMap::from([(s.layer.clone(), f)]), false)?;
            tracing::info!(
                "layer {}/{n} {} in {}: error {e:.3e}",
                i + 1,
                s.layer,
                f.name()
            );
            measured.push(row(f, e));
        }
    }
    let budget = spec.metric.error_of(spec.quality);
    let outcome = search(spec.shapes, &measured, &t.formats, budget, &mut |l| {
        probe.error(l, true)
    })?;
    Ok(PolicyFile {
        arch: spec.arch.clone(),
        metric: spec.metric,
        quality: spec.quality,
        measured_quality: spec.metric.quality_of(outcome.measured_error),
        targets: t.targets.clone(),
        search_seconds: start.elapsed().as_secs_f64(),
        calibration_prompts: spec.calibration_prompts.clone(),
        heldout_prompts: spec.heldout_prompts.clone(),
        layers: outcome.layers,
        measured,
    })
}

/// Reads `--policy FILE` and checks it against the model's layers and the targets; with a `metric`, also that its
/// measured table is in that metric and covers the layers (for re-choosing under a new `--quality`).
pub fn read_policy(
    path: &std::path::Path,
    shapes: &[LinearShape],
    target: &Target,
    metric: Option<Metric>,
) -> Result<PolicyFile> {
    let pf = PolicyFile::read(path)?;
    pf.check(path, shapes, target)?;
    if let Some(m) = metric {
        if pf.metric != m {
            bail!(
                "policy file '{}' was measured in {:?}, this model's quality is {:?}; measure this model with \
                 --precision auto",
                path.display(),
                pf.metric,
                m
            );
        }
        if let Some(s) = shapes
            .iter()
            .find(|s| !pf.measured.iter().any(|r| r.layer == s.layer))
        {
            bail!(
                "policy file '{}' has no measurements of layer '{}', so --quality cannot re-choose from it; drop \
                 --quality to build its formats as they are, or search again with --precision auto",
                path.display(),
                s.layer
            );
        }
    }
    Ok(pf)
}

/// An image family's `--precision auto` / `--policy` request: the recipe's prompts and sizes, the build's options.
pub struct ImageSearch<'a> {
    pub arch: &'a str,
    pub auto: &'a AutoOptions,
    /// `--targets`: the GPU generations whose formats are chosen from.
    pub targets: &'a [String],
    pub calibration_prompts: &'a [String],
    /// The recipe's held-out prompts (`--heldout-prompt` replaces them).
    pub heldout_prompts: &'a [String],
    pub steps: usize,
    /// Image side (pixels) the prompts render at.
    pub side: usize,
    /// Rows per GEMM call in the time model: the denoiser's tokens at the profile's optimum.
    pub tokens: usize,
    /// Bytes per element of kept layers in the engine's graph.
    pub base_bytes: usize,
    /// Where the chosen policy is written (`NAME.policy.toml`).
    pub policy_out: &'a std::path::Path,
}

/// Per-layer formats for an image family: read from `--policy FILE` as they are, or searched (re-chosen from the
/// file's measurements when `--quality` comes with it) through `pipe`, whose denoiser is the unquantized reference
/// and which `swap` re-exports per measurement. `shapes` are the layers searched (see [`AutoOptions::candidates`]);
/// the policy is written to `policy_out`.
pub fn choose_image_layers<M: super::image::ImageModel>(
    s: &ImageSearch,
    pipe: &mut super::image::ImagePipeline<M>,
    shapes: &[LinearShape],
    swap: SwapFn<'_, M>,
) -> Result<BTreeMap<String, Format>> {
    let target = Target::from_targets(s.targets)?;
    let metric = s.auto.quality.map(|_| Metric::Psnr);
    let mut table = None;
    if let Some(path) = &s.auto.policy {
        let pf = read_policy(path, shapes, &target, metric)?;
        if s.auto.quality.is_none() {
            if std::path::absolute(path).ok() != std::path::absolute(s.policy_out).ok() {
                pf.write(s.policy_out)?;
            }
            return Ok(pf.layers);
        }
        table = Some(pf.measured);
    }
    let quality = s.auto.quality.context(
        "--precision auto needs --quality DB: the PSNR (dB) the final images must keep against the unquantized \
         model on held-out prompts (e.g. 30), or --policy FILE from an earlier search",
    )?;
    let heldout = if s.auto.heldout_prompts.is_empty() {
        s.heldout_prompts.to_vec()
    } else {
        s.auto.heldout_prompts.clone()
    };
    check_prompts(s.calibration_prompts, &heldout)?;
    let mut probe = ImageProbe::new(pipe, swap, s.calibration_prompts, &heldout, s.steps, s.side)?;
    let spec = SearchSpec {
        arch: s.arch.to_string(),
        metric: Metric::Psnr,
        quality,
        target,
        shapes,
        tokens: s.tokens,
        base_bytes: s.base_bytes,
        calibration_prompts: s.calibration_prompts.to_vec(),
        heldout_prompts: heldout,
    };
    let pf = run_search(&spec, &mut probe, table)?;
    tracing::info!("{}", probe.timings.describe());
    pf.write(s.policy_out)?;
    Ok(pf.layers)
}

/// The DiT families' per-layer formats ([`choose_image_layers`] over the layers `keep` leaves quantizable), as
/// their export settings ([`layered_policy`]); `swap` re-exports and opens the transformer with such settings.
pub fn choose_dit_layers<'a, M: super::image::ImageModel>(
    s: &ImageSearch,
    pipe: &mut super::image::ImagePipeline<M>,
    shapes: &[LinearShape],
    keep: &crate::quant::policy::Policy,
    mut swap: impl FnMut(
        &mut M,
        crate::models::flux::FluxPrecision,
        Option<crate::quant::policy::Policy>,
    ) -> Result<()>
    + 'a,
) -> Result<(
    crate::models::flux::FluxPrecision,
    Option<crate::quant::policy::Policy>,
)> {
    let shapes = s.auto.candidates(shapes, Some(keep))?;
    let swap: SwapFn<'a, M> = Box::new(move |m: &mut M, layers: &BTreeMap<String, Format>| {
        let (precision, policy) = layered_policy(layers)?;
        swap(m, precision, policy)
    });
    let layers = choose_image_layers(s, pipe, &shapes, swap)?;
    layered_policy(&layers)
}

/// The DiT families' export settings for per-layer formats: the graph precision (its opset and domains; the policy
/// decides every layer) and the policy (None when every layer is kept).
pub fn layered_policy(
    layers: &BTreeMap<String, Format>,
) -> Result<(
    crate::models::flux::FluxPrecision,
    Option<crate::quant::policy::Policy>,
)> {
    use crate::models::flux::FluxPrecision;
    use crate::quant::LinearPrecision;
    let policy = crate::quant::auto::policy_of(layers)?;
    let precision = match policy.target {
        LinearPrecision::Nvfp4 => FluxPrecision::Nvfp4,
        LinearPrecision::F32 => FluxPrecision::F32,
        _ => FluxPrecision::Fp8,
    };
    Ok((
        precision,
        (precision != FluxPrecision::F32).then_some(policy),
    ))
}

/// Time spent per call: replacing the network (export + session) and running the prompts.
#[derive(Clone, Debug, Default)]
pub struct ProbeTimings {
    pub calls: usize,
    pub swap_seconds: f64,
    pub run_seconds: f64,
}

impl ProbeTimings {
    pub fn describe(&self) -> String {
        format!(
            "{} measurements: {:.2}s exporting and opening graphs, {:.2}s running them",
            self.calls, self.swap_seconds, self.run_seconds
        )
    }
}

/// The image families' probe: fixed requests (one seed per prompt) through the sampler loop and the VAE; the
/// error is the MSE of the 8-bit images in [0, 1] units against the unquantized model's.
pub struct ImageProbe<'a, M: super::image::ImageModel> {
    pub pipe: &'a mut super::image::ImagePipeline<M>,
    /// Replaces the model's denoiser by one with `layers` quantized (the family's export).
    pub swap: SwapFn<'a, M>,
    requests: [Vec<super::image::ImageRequest>; 2],
    reference: [Vec<Vec<u8>>; 2],
    pub timings: ProbeTimings,
}

impl<'a, M: super::image::ImageModel> ImageProbe<'a, M> {
    /// Renders the references with the pipeline's current (unquantized) denoiser.
    pub fn new(
        pipe: &'a mut super::image::ImagePipeline<M>,
        swap: SwapFn<'a, M>,
        calibration: &[String],
        heldout: &[String],
        steps: usize,
        side: usize,
    ) -> Result<Self> {
        let req = |prompt: &String, seed: u64| super::image::ImageRequest {
            prompt: prompt.clone(),
            steps: Some(steps),
            seed,
            width: Some(side),
            height: Some(side),
            batch: 1,
            cfg: 1.0,
            strength: 1.0,
            ..Default::default()
        };
        let requests = [
            calibration
                .iter()
                .enumerate()
                .map(|(i, p)| req(p, i as u64))
                .collect::<Vec<_>>(),
            heldout
                .iter()
                .enumerate()
                .map(|(i, p)| req(p, 1000 + i as u64))
                .collect(),
        ];
        let mut probe = Self {
            pipe,
            swap,
            requests,
            reference: [Vec::new(), Vec::new()],
            timings: ProbeTimings::default(),
        };
        probe.reference = [probe.render(false)?, probe.render(true)?];
        Ok(probe)
    }

    fn render(&mut self, heldout: bool) -> Result<Vec<Vec<u8>>> {
        let mut out = Vec::new();
        for r in &self.requests[heldout as usize] {
            let img = self.pipe.generate(r, &mut |_| Ok(()))?;
            out.push(img.images.into_iter().next().context("no image")?);
        }
        Ok(out)
    }
}

/// Mean squared difference of two 8-bit images in [0, 1] units.
pub fn image_mse(a: &[u8], b: &[u8]) -> f64 {
    let n = a.len().max(1) as f64;
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x as f64 - *y as f64) / 255.0;
            d * d
        })
        .sum::<f64>()
        / n
}

impl<M: super::image::ImageModel> Probe for ImageProbe<'_, M> {
    fn error(&mut self, layers: &BTreeMap<String, Format>, heldout: bool) -> Result<f64> {
        let t = Instant::now();
        (self.swap)(&mut self.pipe.model, layers)?;
        let t1 = Instant::now();
        let images = self.render(heldout)?;
        self.timings.calls += 1;
        self.timings.swap_seconds += (t1 - t).as_secs_f64();
        self.timings.run_seconds += t1.elapsed().as_secs_f64();
        let errs: Vec<f64> = images
            .iter()
            .zip(&self.reference[heldout as usize])
            .map(|(a, b)| image_mse(a, b))
            .collect();
        Ok(if heldout {
            errs.iter().fold(0.0, |m, e| m.max(*e))
        } else {
            errs.iter().sum::<f64>() / errs.len().max(1) as f64
        })
    }
}

/// Inputs of one prefill of `ids` from an empty cache on a decoder graph (`models::llama`, KV cache passed in).
fn prefill_inputs(engine: &dyn Engine, ids: &[i64]) -> Result<Vec<(String, HostTensor)>> {
    let t = |v: &[i64]| HostTensor {
        dtype: DataType::INT64,
        shape: vec![1, v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let pos: Vec<i64> = (0..ids.len() as i64).collect();
    let mut inputs = vec![
        ("input_ids".to_string(), t(ids)),
        ("position_ids".to_string(), t(&pos)),
    ];
    for d in engine.inputs() {
        if d.name.starts_with("past_") {
            let shape = match d.shape[..] {
                [_, kv, _, hd] if kv > 0 && hd > 0 => vec![1, kv as usize, 0, hd as usize],
                _ => {
                    bail!("decoder input {d} is not a KV cache [1, kv heads, positions, head size]")
                }
            };
            inputs.push((
                d.name.clone(),
                HostTensor {
                    dtype: DataType::FLOAT,
                    shape,
                    data: Vec::new(),
                },
            ));
        }
    }
    Ok(inputs)
}

/// Runs a decoder graph over `ids` from an empty cache; every output.
pub fn prefill(engine: &mut dyn Engine, ids: &[i64]) -> Result<Vec<(String, HostTensor)>> {
    let inputs = prefill_inputs(engine, ids)?;
    engine.run(&inputs)
}

fn logits_of(outputs: &[(String, HostTensor)]) -> Result<Vec<f64>> {
    outputs
        .iter()
        .find(|(n, _)| n == "logits")
        .and_then(|(_, t)| t.to_f64())
        .context("the decoder has no f32 'logits' output")
}

/// Log-softmax of each row of `vocab` logits.
fn log_softmax(logits: &[f64], vocab: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks(vocab) {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        out.extend(row.iter().map(|v| v - lse));
    }
    out
}

/// Mean over positions of KL(p || q), both given as log-probabilities of rows of `vocab`.
pub fn mean_kl(logp: &[f64], logq: &[f64], vocab: usize) -> f64 {
    let rows = (logp.len() / vocab.max(1)).max(1);
    let total: f64 = logp
        .chunks(vocab)
        .zip(logq.chunks(vocab))
        .map(|(p, q)| {
            p.iter()
                .zip(q)
                .map(|(lp, lq)| lp.exp() * (lp - lq))
                .sum::<f64>()
        })
        .sum();
    (total / rows as f64).max(0.0)
}

/// The LLM probe: each sequence prefilled once through the full-logits decoder graph on the CPU backend; the
/// error is the mean next-token KL from the unquantized model's distributions.
pub struct LlmProbe<'a> {
    /// Writes the decoder graph with `layers` quantized (every position's logits) and opens it.
    pub open: OpenFn<'a>,
    sequences: [Vec<Vec<i64>>; 2],
    reference: [Vec<Vec<f64>>; 2],
    vocab: usize,
    pub timings: ProbeTimings,
}

impl<'a> LlmProbe<'a> {
    pub fn new(
        mut open: OpenFn<'a>,
        calibration: Vec<Vec<i64>>,
        heldout: Vec<Vec<i64>>,
        vocab: usize,
    ) -> Result<Self> {
        let mut engine = open(&BTreeMap::new())?;
        let mut reference = [Vec::new(), Vec::new()];
        for (set, seqs) in [&calibration, &heldout].into_iter().enumerate() {
            for ids in seqs {
                let l = logits_of(&prefill(engine.as_mut(), ids)?)?;
                reference[set].push(log_softmax(&l, vocab));
            }
        }
        Ok(Self {
            open,
            sequences: [calibration, heldout],
            reference,
            vocab,
            timings: ProbeTimings::default(),
        })
    }
}

impl Probe for LlmProbe<'_> {
    fn error(&mut self, layers: &BTreeMap<String, Format>, heldout: bool) -> Result<f64> {
        let t = Instant::now();
        let mut engine = (self.open)(layers)?;
        let t1 = Instant::now();
        let set = heldout as usize;
        let mut total = 0.0;
        for (ids, want) in self.sequences[set].iter().zip(&self.reference[set]) {
            let got = log_softmax(&logits_of(&prefill(engine.as_mut(), ids)?)?, self.vocab);
            total += mean_kl(want, &got, self.vocab);
        }
        self.timings.calls += 1;
        self.timings.swap_seconds += (t1 - t).as_secs_f64();
        self.timings.run_seconds += t1.elapsed().as_secs_f64();
        Ok(total / self.sequences[set].len().max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_and_mse_are_zero_on_equal_inputs_and_positive_otherwise() {
        let a = log_softmax(&[1.0, 2.0, 3.0, 0.0, 0.0, 0.0], 3);
        let b = log_softmax(&[1.0, 2.5, 3.0, 0.0, 0.1, 0.0], 3);
        assert!(mean_kl(&a, &a, 3).abs() < 1e-12);
        assert!(mean_kl(&a, &b, 3) > 1e-4);
        assert_eq!(image_mse(&[10, 20], &[10, 20]), 0.0);
        assert!((image_mse(&[0, 0], &[255, 0]) - 0.5).abs() < 1e-12);
        let e = check_prompts(&["a".into()], &["a".into()]).unwrap_err();
        assert!(e.to_string().contains("--heldout-prompt"), "{e}");
    }
}
