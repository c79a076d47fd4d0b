//! Text the `samplers` CLI prints (kept here so the CLI only maps arguments to calls).
use super::check::{self, CheckSpec};
use super::registry;
use super::schedule::{self, ModelSampling};
use anyhow::{Result, bail};
use std::fmt::Write;
use std::path::Path;

/// `samplers list`: one row per registered sampler.
pub fn list_table() -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<34} {:<18} {:>5} {:>6} {:>6}  stochastic",
        "name", "family", "order", "stages", "calls"
    );
    for i in registry::list() {
        let _ = writeln!(
            s,
            "{:<34} {:<18} {:>5} {:>6} {:>6}  {}",
            i.name,
            i.family.as_str(),
            i.order,
            i.stages,
            i.calls,
            if i.stochastic { "yes" } else { "no" }
        );
    }
    s
}

/// `samplers sigmas`: the schedule for a model (or an explicit sigma range).
pub fn sigmas(
    scheduler: &str,
    steps: usize,
    model: &str,
    range: (Option<f64>, Option<f64>),
    denoise: f64,
) -> Result<Vec<f64>> {
    let ms = ModelSampling::for_model(model)?;
    let range = match range {
        (Some(lo), Some(hi)) => Some((lo, hi)),
        (None, None) => None,
        _ => bail!("give both --sigma-min and --sigma-max, or neither"),
    };
    schedule::partial(
        |n| schedule::by_name(scheduler, n, &ms, range),
        steps,
        denoise,
    )
}

/// `samplers check`: error against the exact solution for each step count, and the empirical orders.
pub fn check(
    spec: &CheckSpec,
    steps: &[usize],
    init: Option<&Path>,
    dump: Option<&Path>,
) -> Result<String> {
    if steps.is_empty() {
        bail!("--steps needs at least one step count");
    }
    let init = init.map(check::read_npy).transpose()?;
    let info = registry::info(&spec.sampler);
    if info.is_none() {
        // Let build() produce the error with the list of valid names.
        registry::build::<Vec<f64>>(&spec.sampler, &spec.opts)?;
    }
    let mut runs = Vec::new();
    for &n in steps {
        runs.push(check::run(spec, n, init.as_deref())?);
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} on Gaussian data ({} elements, {}), {} schedule {} -> {}{}",
        spec.sampler,
        spec.elements,
        if spec.flow { "flow" } else { "VE" },
        spec.scheduler,
        spec.sigma_max,
        if spec.to_zero { 0.0 } else { spec.sigma_min },
        if spec.f32 { ", f32 buffers" } else { "" }
    );
    let _ = writeln!(
        s,
        "{:>6} {:>7} {:>12} {:>12} {:>8}",
        "steps", "calls", "max error", "rms error", "order"
    );
    let ords = check::orders(&runs);
    for (k, r) in runs.iter().enumerate() {
        let o = if k == 0 {
            String::from("-")
        } else {
            format!("{:.2}", ords[k - 1])
        };
        let _ = writeln!(
            s,
            "{:>6} {:>7} {:>12.4e} {:>12.4e} {:>8}",
            r.steps, r.calls, r.max_err, r.rms_err, o
        );
    }
    if let Some(i) = &info {
        if i.stochastic && spec.opts.eta != 0.0 {
            let _ = writeln!(
                s,
                "note: {} is stochastic (eta {}); it does not converge to the ODE solution. Use --eta 0.",
                i.name, spec.opts.eta
            );
        } else {
            let _ = writeln!(s, "claimed order: {}", i.order);
        }
    }
    if let Some(p) = dump {
        check::write_npy(p, &runs.last().expect("non-empty").x)?;
        let _ = writeln!(s, "wrote {}", p.display());
    }
    Ok(s)
}
