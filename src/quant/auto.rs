//! `build --precision auto --quality Q`: per-layer formats chosen from measured sensitivities. Pure logic, data in
//! and out: which formats a GPU generation runs and what each costs (engine bytes + a roofline GEMM time), the
//! greedy choice under an error budget with its verification and back-off loop, and the policy file (TOML) that
//! records the choice with the measured table, which `build --policy FILE` reads back. The measuring (sampler loops,
//! next-token KL) is `pipelines::auto_precision`; docs/precision.md describes the whole.
use super::LinearPrecision;
use super::policy::{Action, Policy, Rule};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// One linear layer as the emitters name it (the policy's name) and its weight's shape [out, in].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearShape {
    pub layer: String,
    pub out_features: usize,
    pub in_features: usize,
}

/// A layer's format in a policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The graph's own float type.
    Keep,
    Int8,
    Fp8,
    Nvfp4,
}

impl Format {
    /// The quantized formats, in the order the tables print them.
    pub const LOW: [Format; 3] = [Format::Nvfp4, Format::Fp8, Format::Int8];

    pub fn name(self) -> &'static str {
        match self {
            Format::Keep => "keep",
            Format::Int8 => "int8",
            Format::Fp8 => "fp8",
            Format::Nvfp4 => "nvfp4",
        }
    }

    /// The Q/DQ pattern `models::qdq` emits (None: the graph's float type).
    pub fn linear(self) -> Option<LinearPrecision> {
        match self {
            Format::Keep => None,
            Format::Int8 => Some(LinearPrecision::Int8),
            Format::Fp8 => Some(LinearPrecision::Fp8),
            Format::Nvfp4 => Some(LinearPrecision::Nvfp4),
        }
    }

    /// The oldest compute capability with tensor cores for it (INT8 from Turing, FP8 from Ada, FP4 Blackwell).
    pub fn min_sm(self) -> u32 {
        match self {
            Format::Keep => 0,
            Format::Int8 => 75,
            Format::Fp8 => 89,
            Format::Nvfp4 => 120,
        }
    }

    /// Whether the layer's shape allows the format (NVFP4 blocks of 16 input features).
    pub fn fits(self, s: &LinearShape) -> bool {
        self != Format::Nvfp4 || s.in_features.is_multiple_of(super::nvfp4::BLOCK)
    }

    /// Bytes of the weight and its scales, the kept layers holding `base_bytes` per element.
    pub fn weight_bytes(self, s: &LinearShape, base_bytes: usize) -> u64 {
        let (n, k) = (s.out_features as u64, s.in_features as u64);
        match self {
            Format::Keep => n * k * base_bytes as u64,
            Format::Fp8 => n * k + 4,
            Format::Int8 => n * k + 4 * n,
            Format::Nvfp4 => n * k / 2 + n * k / super::nvfp4::BLOCK as u64 + 4,
        }
    }

    /// Bytes per activation element the GEMM reads.
    fn act_bytes(self, base_bytes: usize) -> f64 {
        match self {
            Format::Keep => base_bytes as f64,
            Format::Fp8 | Format::Int8 => 1.0,
            Format::Nvfp4 => 0.5 + 1.0 / 16.0,
        }
    }
}

/// A GPU generation as the cost model sees it: dense tensor-core throughput per format (TFLOPS or TOPS, from the
/// datasheets of one card of the generation; 0: no such tensor cores) and memory bandwidth (GB/s). Only ratios
/// and the roofline's knee matter to the choice, not the absolute times.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    /// The `--targets` name.
    pub target: &'static str,
    pub card: &'static str,
    pub tf32: f64,
    pub bf16: f64,
    pub int8: f64,
    pub fp8: f64,
    pub fp4: f64,
    pub bandwidth: f64,
}

/// One row per TensorRT-RTX target (`trt::RTX_TARGETS`).
pub const GPUS: &[Gpu] = &[
    Gpu {
        target: "sm75",
        card: "T4",
        tf32: 8.1,
        bf16: 65.0,
        int8: 130.0,
        fp8: 0.0,
        fp4: 0.0,
        bandwidth: 320.0,
    },
    Gpu {
        target: "sm80",
        card: "A100",
        tf32: 156.0,
        bf16: 312.0,
        int8: 624.0,
        fp8: 0.0,
        fp4: 0.0,
        bandwidth: 2039.0,
    },
    Gpu {
        target: "sm86",
        card: "RTX 3090",
        tf32: 35.6,
        bf16: 71.0,
        int8: 284.0,
        fp8: 0.0,
        fp4: 0.0,
        bandwidth: 936.0,
    },
    Gpu {
        target: "sm89",
        card: "RTX 4090",
        tf32: 82.6,
        bf16: 165.2,
        int8: 660.6,
        fp8: 330.3,
        fp4: 0.0,
        bandwidth: 1008.0,
    },
    Gpu {
        target: "sm120",
        card: "RTX 5090",
        tf32: 104.8,
        bf16: 209.5,
        int8: 419.0,
        fp8: 419.0,
        fp4: 838.0,
        bandwidth: 1792.0,
    },
    Gpu {
        target: "sm121",
        card: "DGX Spark GB10",
        tf32: 31.0,
        bf16: 62.0,
        int8: 125.0,
        fp8: 125.0,
        fp4: 500.0,
        bandwidth: 273.0,
    },
];

/// The generation a policy is chosen for: the formats every target runs, and the oldest target's costs.
#[derive(Clone, Debug)]
pub struct Target {
    pub gpu: Gpu,
    pub formats: Vec<Format>,
    pub targets: Vec<String>,
}

impl Target {
    /// From `--targets` (none: Blackwell sm120, where every format runs).
    pub fn from_targets(targets: &[String]) -> Result<Self> {
        let names: Vec<String> = if targets.is_empty() {
            vec!["sm120".into()]
        } else {
            targets.to_vec()
        };
        let mut oldest: Option<Gpu> = None;
        for t in &names {
            let Some(g) = GPUS.iter().find(|g| g.target == t) else {
                bail!(
                    "--targets '{t}' has no cost model for --precision auto; choose from {}",
                    GPUS.iter().map(|g| g.target).collect::<Vec<_>>().join(", ")
                );
            };
            if oldest.is_none_or(|o| sm(o.target) > sm(g.target)) {
                oldest = Some(*g);
            }
        }
        let gpu = oldest.context("no target")?;
        let formats = Format::LOW
            .into_iter()
            .filter(|f| names.iter().all(|t| sm(t) >= f.min_sm()))
            .collect();
        Ok(Self {
            gpu,
            formats,
            targets: names,
        })
    }

    /// Modelled seconds of one GEMM over `tokens` rows: the slower of compute and memory traffic.
    pub fn gemm_seconds(
        &self,
        s: &LinearShape,
        f: Format,
        tokens: usize,
        base_bytes: usize,
    ) -> f64 {
        let g = &self.gpu;
        let tflops = match f {
            Format::Keep if base_bytes >= 4 => g.tf32,
            Format::Keep => g.bf16,
            Format::Int8 => g.int8,
            Format::Fp8 => g.fp8,
            Format::Nvfp4 => g.fp4,
        };
        let (m, n, k) = (tokens as f64, s.out_features as f64, s.in_features as f64);
        let compute = if tflops > 0.0 {
            2.0 * m * n * k / (tflops * 1e12)
        } else {
            f64::INFINITY
        };
        let traffic = f.weight_bytes(s, base_bytes) as f64
            + m * k * f.act_bytes(base_bytes)
            + m * n * base_bytes as f64;
        compute.max(traffic / (g.bandwidth * 1e9))
    }
}

fn sm(t: &str) -> u32 {
    t.trim_start_matches("sm").parse().unwrap_or(0)
}

/// How quality is stated and measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// PSNR (dB) of the final 8-bit image against the unquantized model's; errors are the MSE in [0, 1] units,
    /// which adds up over layers whose noise is independent.
    Psnr,
    /// Mean KL divergence (nats) of next-token distributions from the unquantized model's.
    Kl,
}

impl Metric {
    /// The additive error a quality corresponds to.
    pub fn error_of(self, quality: f64) -> f64 {
        match self {
            Metric::Psnr => 10f64.powf(-quality / 10.0),
            Metric::Kl => quality,
        }
    }

    pub fn quality_of(self, error: f64) -> f64 {
        match self {
            Metric::Psnr => -10.0 * error.max(1e-30).log10(),
            Metric::Kl => error,
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Psnr => "dB PSNR",
            Metric::Kl => "nats mean KL",
        }
    }
}

/// One measurement: `error` when `layer` alone is in `format`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    pub layer: String,
    pub format: Format,
    /// The metric's additive error (image MSE or mean KL) of the calibration prompts.
    pub sensitivity: f64,
    /// Weight bytes in this format.
    pub bytes: u64,
    /// Modelled GEMM time on the target (microseconds per call at the calibration shape).
    pub gemm_us: f64,
}

/// The choice made, with what it was predicted and measured to cost.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub layers: BTreeMap<String, Format>,
    /// Sum of the chosen layers' sensitivities.
    pub predicted_error: f64,
    /// Measured on the held-out prompts.
    pub measured_error: f64,
    pub verifications: usize,
    /// Layers returned to `keep` after a failed verification.
    pub backed_off: Vec<String>,
}

/// The measured table, indexed for the search.
struct Costs<'a> {
    shapes: &'a [LinearShape],
    /// Per layer: (format, error, normalised cost), `keep` first.
    options: Vec<Vec<(Format, f64, f64)>>,
}

impl<'a> Costs<'a> {
    fn new(shapes: &'a [LinearShape], table: &[Measured], allowed: &[Format]) -> Self {
        let keep_bytes: f64 = table
            .iter()
            .filter(|m| m.format == Format::Keep)
            .map(|m| m.bytes as f64)
            .sum::<f64>()
            .max(1.0);
        let keep_time: f64 = table
            .iter()
            .filter(|m| m.format == Format::Keep)
            .map(|m| m.gemm_us)
            .sum::<f64>()
            .max(1e-12);
        // Bytes and time weigh equally, each as a fraction of the unquantized model's.
        let cost = |m: &Measured| m.bytes as f64 / keep_bytes + m.gemm_us / keep_time;
        let options = shapes
            .iter()
            .map(|s| {
                let mut v: Vec<(Format, f64, f64)> = table
                    .iter()
                    .filter(|m| {
                        m.layer == s.layer
                            && (m.format == Format::Keep || allowed.contains(&m.format))
                            && m.format.fits(s)
                            && m.sensitivity.is_finite()
                    })
                    .map(|m| (m.format, m.sensitivity.max(0.0), cost(m)))
                    .collect();
                v.sort_by_key(|o| o.0);
                if v.first().is_none_or(|o| o.0 != Format::Keep) {
                    v.insert(0, (Format::Keep, 0.0, f64::INFINITY));
                }
                v
            })
            .collect();
        Self { shapes, options }
    }

    fn option(&self, i: usize, f: Format) -> (f64, f64) {
        self.options[i]
            .iter()
            .find(|o| o.0 == f)
            .map(|o| (o.1, o.2))
            .unwrap_or((0.0, f64::INFINITY))
    }

    /// Greedy by cost saved per error added, while the predicted (summed) error stays within `budget`.
    fn greedy(&self, budget: f64) -> (Vec<Format>, f64) {
        let mut cur = vec![Format::Keep; self.shapes.len()];
        let mut total = 0.0;
        let eps = budget.abs() * 1e-9 + 1e-30;
        loop {
            let mut best: Option<(f64, usize, Format, f64)> = None;
            for (i, opts) in self.options.iter().enumerate() {
                let (e0, c0) = self.option(i, cur[i]);
                for &(f, e, c) in opts {
                    let next = total - e0 + e;
                    if c >= c0 || next > budget {
                        continue;
                    }
                    let score = (c0 - c) / ((e - e0).max(0.0) + eps);
                    if best.is_none_or(|b| score > b.0) {
                        best = Some((score, i, f, next));
                    }
                }
            }
            let Some((_, i, f, next)) = best else { break };
            cur[i] = f;
            total = next;
        }
        (cur, total)
    }

    fn named(&self, v: &[Format]) -> BTreeMap<String, Format> {
        self.shapes
            .iter()
            .zip(v)
            .map(|(s, f)| (s.layer.clone(), *f))
            .collect()
    }
}

/// Chooses each layer's format among `allowed` from the measured `table` under `budget` (the metric's additive
/// error), then checks the choice with `verify` (held-out prompts; returns the measured error). A failed check
/// first re-runs the greedy with the budget scaled by how far measurement exceeded prediction, then returns the
/// chosen layer of largest sensitivity to `keep`, one at a time, until the check passes (all-`keep` always does).
pub fn search(
    shapes: &[LinearShape],
    table: &[Measured],
    allowed: &[Format],
    budget: f64,
    verify: &mut dyn FnMut(&BTreeMap<String, Format>) -> Result<f64>,
) -> Result<Outcome> {
    let costs = Costs::new(shapes, table, allowed);
    let (mut cur, mut predicted) = costs.greedy(budget);
    let mut verifications = 0;
    let mut backed_off = Vec::new();
    let mut rescaled = false;
    loop {
        if cur.iter().all(|f| *f == Format::Keep) {
            return Ok(Outcome {
                layers: costs.named(&cur),
                predicted_error: 0.0,
                measured_error: 0.0,
                verifications,
                backed_off,
            });
        }
        let measured = verify(&costs.named(&cur))?;
        verifications += 1;
        tracing::info!(
            "verification {verifications}: predicted error {predicted:.3e}, measured {measured:.3e}, budget \
             {budget:.3e}"
        );
        if measured <= budget {
            return Ok(Outcome {
                layers: costs.named(&cur),
                predicted_error: predicted,
                measured_error: measured,
                verifications,
                backed_off,
            });
        }
        if !rescaled && predicted > 0.0 {
            rescaled = true;
            let (next, p) = costs.greedy(budget * predicted / measured);
            if next != cur {
                (cur, predicted) = (next, p);
                continue;
            }
        }
        let worst = (0..cur.len())
            .filter(|&i| cur[i] != Format::Keep)
            .max_by(|&a, &b| {
                let ea = costs.option(a, cur[a]).0;
                let eb = costs.option(b, cur[b]).0;
                ea.total_cmp(&eb).then(b.cmp(&a))
            })
            .context("a non-keep layer")?;
        predicted -= costs.option(worst, cur[worst]).0;
        cur[worst] = Format::Keep;
        backed_off.push(shapes[worst].layer.clone());
    }
}

/// The policy file: what `build --precision auto` chose and measured, read back by `build --policy FILE`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The architecture it was measured on (e.g. flux-dev, llama2c, qwen3).
    pub arch: String,
    pub metric: Metric,
    /// The budget asked for (`--quality`).
    pub quality: f64,
    /// What the chosen policy measured on the held-out prompts.
    pub measured_quality: f64,
    pub targets: Vec<String>,
    pub search_seconds: f64,
    #[serde(default)]
    pub calibration_prompts: Vec<String>,
    #[serde(default)]
    pub heldout_prompts: Vec<String>,
    /// Every linear layer's format.
    pub layers: BTreeMap<String, Format>,
    /// The measured table: each layer alone in each format.
    #[serde(default)]
    pub measured: Vec<Measured>,
}

const FIX: &str = "give the TOML file `build --precision auto` wrote beside its engine (NAME.policy.toml), or \
                   build with --precision auto to make one";

impl PolicyFile {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read policy file '{}'; {FIX}", path.display()))?;
        toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "policy file '{}' is not a valid precision policy: {}; {FIX} (layer formats are keep, int8, fp8, \
                 nvfp4)",
                path.display(),
                e.to_string().trim_end()
            )
        })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let text = format!(
            "# trt-diff precision policy: `trt-diff build --policy {}` builds these per-layer formats again.\n\
             # `measured` is each layer's sensitivity alone in each format ({}).\n{}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            match self.metric {
                Metric::Psnr => "final-image MSE in [0, 1] units",
                Metric::Kl => "mean next-token KL in nats",
            },
            toml::to_string_pretty(self).context("cannot serialise the policy")?
        );
        let mut f = crate::fsutil::AtomicFile::create(path)?;
        std::io::Write::write_all(&mut f, text.as_bytes())
            .with_context(|| format!("cannot write '{}'", path.display()))?;
        f.commit()
    }

    /// Checks the file against the model's layers and the targets: every name must be one of its linear layers,
    /// every format runnable on the targets and fitting the layer's shape. Layers the file omits stay `keep`.
    pub fn check(&self, path: &Path, shapes: &[LinearShape], target: &Target) -> Result<()> {
        let p = path.display();
        for (layer, f) in &self.layers {
            let Some(s) = shapes.iter().find(|s| &s.layer == layer) else {
                let mut names: Vec<&str> = shapes.iter().map(|s| s.layer.as_str()).collect();
                let more = names.len().saturating_sub(6);
                names.truncate(6);
                bail!(
                    "policy file '{p}' names layer '{layer}', which is not a linear layer of this model (its layers: \
                     {}{}); fix the name, or make the policy for this model with --precision auto",
                    names.join(", "),
                    if more > 0 {
                        format!(", and {more} more")
                    } else {
                        String::new()
                    }
                );
            };
            if *f != Format::Keep && !target.formats.contains(f) {
                bail!(
                    "policy file '{p}' puts layer '{layer}' in {}, which target(s) {} cannot run (needs sm{} or \
                     newer); change --targets or the layer's format",
                    f.name(),
                    target.targets.join(", "),
                    f.min_sm()
                );
            }
            if !f.fits(s) {
                bail!(
                    "policy file '{p}' puts layer '{layer}' in {}, but its {} input features are not a multiple of \
                     16; use fp8, int8 or keep for it",
                    f.name(),
                    s.in_features
                );
            }
        }
        Ok(())
    }

    /// The precision policy the emitters read: each listed layer in its format, everything else kept.
    pub fn to_policy(&self) -> Result<Policy> {
        policy_of(&self.layers)
    }

    /// One row per measured layer: the chosen format, each format's sensitivity, the chosen and unquantized
    /// weight bytes.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<48} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "layer", "chosen", "nvfp4", "fp8", "int8", "bytes", "unquant."
        );
        for keep in self.measured.iter().filter(|m| m.format == Format::Keep) {
            let chosen = self
                .layers
                .get(&keep.layer)
                .copied()
                .unwrap_or(Format::Keep);
            let m = |f: Format| {
                self.measured
                    .iter()
                    .find(|m| m.layer == keep.layer && m.format == f)
            };
            let sens =
                |f: Format| m(f).map_or("-".to_string(), |m| format!("{:.2e}", m.sensitivity));
            let _ = writeln!(
                s,
                "{:<48} {:>6} {:>10} {:>10} {:>10} {:>10} {:>10}",
                keep.layer,
                chosen.name(),
                sens(Format::Nvfp4),
                sens(Format::Fp8),
                sens(Format::Int8),
                m(chosen).map_or(0, |m| m.bytes),
                keep.bytes
            );
        }
        s
    }

    /// The chosen policy's weight bytes and the unquantized ones, from the measured table.
    pub fn bytes(&self) -> (u64, u64) {
        let find = |l: &str, f: Format| {
            self.measured
                .iter()
                .find(|m| m.layer == l && m.format == f)
                .map_or(0, |m| m.bytes)
        };
        let mut chosen = 0;
        let mut keep = 0;
        for m in self.measured.iter().filter(|m| m.format == Format::Keep) {
            keep += m.bytes;
            chosen += find(
                &m.layer,
                self.layers.get(&m.layer).copied().unwrap_or(Format::Keep),
            );
        }
        (chosen, keep)
    }
}

/// A policy of exact layer names: each in its format, every other layer kept.
pub fn policy_of(layers: &BTreeMap<String, Format>) -> Result<Policy> {
    let used = |f: Format| layers.values().any(|v| *v == f);
    // The target sets the graph's opset and domains: the newest format in use.
    let target = if used(Format::Nvfp4) {
        LinearPrecision::Nvfp4
    } else if used(Format::Fp8) {
        LinearPrecision::Fp8
    } else if used(Format::Int8) {
        LinearPrecision::Int8
    } else {
        LinearPrecision::F32
    };
    let mut rules = Vec::with_capacity(layers.len() + 1);
    for (name, f) in layers {
        let action = match f.linear() {
            Some(p) => Action::Use(p),
            None => Action::Keep,
        };
        rules.push(Rule::new(&glob::Pattern::escape(name), None, action)?);
    }
    rules.push(Rule::new("*", None, Action::Keep)?);
    Ok(Policy::from_rules(target, rules))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(layer: &str, n: usize, k: usize) -> LinearShape {
        LinearShape {
            layer: layer.into(),
            out_features: n,
            in_features: k,
        }
    }

    fn table(shapes: &[LinearShape], sens: &[[f64; 3]], t: &Target) -> Vec<Measured> {
        let mut v = Vec::new();
        for (s, e) in shapes.iter().zip(sens) {
            for (f, e) in [Format::Keep, Format::Nvfp4, Format::Fp8, Format::Int8]
                .into_iter()
                .zip([0.0, e[0], e[1], e[2]])
            {
                v.push(Measured {
                    layer: s.layer.clone(),
                    format: f,
                    sensitivity: e,
                    bytes: f.weight_bytes(s, 4),
                    gemm_us: t.gemm_seconds(s, f, 256, 4) * 1e6,
                });
            }
        }
        v
    }

    #[test]
    fn targets_decide_the_formats() {
        let f = |t: &[&str]| {
            Target::from_targets(&t.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap()
                .formats
        };
        assert_eq!(f(&[]), vec![Format::Nvfp4, Format::Fp8, Format::Int8]);
        assert_eq!(f(&["sm89"]), vec![Format::Fp8, Format::Int8]);
        assert_eq!(f(&["sm86"]), vec![Format::Int8]);
        assert_eq!(f(&["sm120", "sm86"]), vec![Format::Int8]);
        let e = Target::from_targets(&["sm99".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("sm99") && e.contains("sm120"), "{e}");
        let t = Target::from_targets(&["sm120".into(), "sm89".into()]).unwrap();
        assert_eq!(t.gpu.target, "sm89");
    }

    #[test]
    fn cost_model_orders_formats() {
        let t = Target::from_targets(&[]).unwrap();
        let s = shape("a", 3072, 3072);
        let time = |f| t.gemm_seconds(&s, f, 4096, 2);
        assert!(time(Format::Nvfp4) < time(Format::Fp8));
        assert!(time(Format::Fp8) < time(Format::Keep));
        // One token: memory bound, so time follows bytes.
        let one = |f| t.gemm_seconds(&s, f, 1, 2);
        assert!(one(Format::Nvfp4) < 0.6 * one(Format::Fp8));
        assert_eq!(Format::Nvfp4.weight_bytes(&s, 2), 3072 * 3072 * 9 / 16 + 4);
    }

    #[test]
    fn looser_budgets_quantize_more_and_verification_backs_off() {
        let t = Target::from_targets(&[]).unwrap();
        let shapes: Vec<_> = (0..4).map(|i| shape(&format!("l{i}"), 64, 64)).collect();
        // l3 is very sensitive, l0 hardly at all.
        let sens = [
            [1e-6, 1e-7, 1e-7],
            [1e-4, 1e-5, 2e-5],
            [1e-3, 1e-4, 1e-4],
            [1e-1, 1e-2, 1e-2],
        ];
        let tab = table(&shapes, &sens, &t);
        let low = |o: &Outcome| o.layers.values().filter(|f| **f != Format::Keep).count();
        let predict = |l: &BTreeMap<String, Format>| {
            Ok(shapes
                .iter()
                .zip(&sens)
                .map(|(s, e)| match l[&s.layer] {
                    Format::Keep => 0.0,
                    Format::Nvfp4 => e[0],
                    Format::Fp8 => e[1],
                    Format::Int8 => e[2],
                })
                .sum())
        };
        let tight = search(&shapes, &tab, &t.formats, 2e-6, &mut |l| predict(l)).unwrap();
        let loose = search(&shapes, &tab, &t.formats, 1e-3, &mut |l| predict(l)).unwrap();
        assert!(
            low(&loose) > low(&tight),
            "{:?} vs {:?}",
            loose.layers,
            tight.layers
        );
        assert_eq!(tight.layers["l0"], Format::Nvfp4);
        assert_eq!(loose.layers["l3"], Format::Keep);
        assert!(loose.measured_error <= 1e-3 && tight.measured_error <= 2e-6);
        // Measurement worse than predicted (interactions): layers go back to keep until the budget holds.
        let mut calls = 0;
        let o = search(&shapes, &tab, &t.formats, 1e-3, &mut |l| {
            calls += 1;
            Ok(predict(l)? * 50.0)
        })
        .unwrap();
        assert!(o.measured_error <= 1e-3, "{o:?}");
        assert!(calls >= 2 && low(&o) < low(&loose), "{o:?}");
        // Ampere: only INT8.
        let amp = Target::from_targets(&["sm86".into()]).unwrap();
        let o = search(&shapes, &tab, &amp.formats, 1e-3, &mut |l| predict(l)).unwrap();
        assert!(
            o.layers
                .values()
                .all(|f| matches!(f, Format::Keep | Format::Int8))
        );
    }

    #[test]
    fn policy_file_round_trips_and_checks() {
        let t = Target::from_targets(&[]).unwrap();
        let shapes = vec![shape("a.b", 32, 32), shape("c[0]", 32, 24)];
        let pf = PolicyFile {
            arch: "x".into(),
            metric: Metric::Psnr,
            quality: 30.0,
            measured_quality: 31.5,
            targets: vec!["sm120".into()],
            search_seconds: 1.5,
            calibration_prompts: vec!["p".into()],
            heldout_prompts: vec!["q".into()],
            layers: BTreeMap::from([
                ("a.b".to_string(), Format::Nvfp4),
                ("c[0]".to_string(), Format::Fp8),
            ]),
            measured: table(&shapes, &[[1e-4, 1e-5, 1e-5], [1e-3, 1e-4, 1e-4]], &t),
        };
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("p.toml");
        pf.write(&path).unwrap();
        let back = PolicyFile::read(&path).unwrap();
        assert_eq!(back, pf);
        back.check(&path, &shapes, &t).unwrap();
        let pol = back.to_policy().unwrap();
        use crate::quant::policy::LayerKind::Linear;
        assert_eq!(pol.decide("a.b", Linear), Some(LinearPrecision::Nvfp4));
        assert_eq!(pol.decide("c[0]", Linear), Some(LinearPrecision::Fp8));
        assert_eq!(pol.decide("c0", Linear), None);
        assert!(back.table().contains("c[0]") && back.table().contains("nvfp4"));
        // NVFP4 on 24 input features, FP8 on Ampere, unknown layers: errors naming the file and the fix.
        let mut bad = pf.clone();
        bad.layers.insert("c[0]".into(), Format::Nvfp4);
        let e = bad.check(&path, &shapes, &t).unwrap_err().to_string();
        assert!(e.contains("multiple of 16") && e.contains("p.toml"), "{e}");
        let amp = Target::from_targets(&["sm86".into()]).unwrap();
        let e = pf.check(&path, &shapes, &amp).unwrap_err().to_string();
        assert!(e.contains("sm86") && e.contains("--targets"), "{e}");
        let mut bad = pf.clone();
        bad.layers.insert("zz".into(), Format::Keep);
        let e = bad.check(&path, &shapes, &t).unwrap_err().to_string();
        assert!(e.contains("'zz'") && e.contains("a.b"), "{e}");
    }
}
