//! Golden files of the sampler tests (tests/golden/samplers/, made by scripts/golden/samplers_*.py) and the
//! noise source that replays the draws a reference recorded.
use anyhow::{Result, bail};
use serde_json::Value;
use trt_diff::samplers::noise::NoiseSource;

/// `tests/golden/samplers/<name>` parsed.
pub fn golden(name: &str) -> Value {
    let p = format!(
        "{}/tests/golden/samplers/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A JSON array of numbers.
pub fn vecf(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// Replays the noise the reference drew, checking each request's (sigma, sigma_next).
pub struct Replay {
    pub draws: Vec<(f64, f64, Vec<f64>)>,
    pub next: usize,
}

impl NoiseSource<Vec<f64>> for Replay {
    fn sample(&mut self, out: &mut Vec<f64>, sigma: f64, sigma_next: f64) -> Result<()> {
        let Some((s, sn, z)) = self.draws.get(self.next) else {
            bail!("more noise draws than the reference ({})", self.draws.len());
        };
        if (s - sigma).abs() > 1e-9 * s || (sn - sigma_next).abs() > 1e-9 * sn.max(1e-300) {
            bail!(
                "draw {}: asked ({sigma}, {sigma_next}), reference ({s}, {sn})",
                self.next
            );
        }
        out.copy_from_slice(z);
        self.next += 1;
        Ok(())
    }
}
