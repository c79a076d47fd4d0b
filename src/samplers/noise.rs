//! Noise: Philox4x32-10 Gaussian noise (counter based, so host and device produce the same numbers) and a
//! Brownian tree for SDE samplers.
//!
//! # Exact layout (the contract a device kernel must reproduce)
//! For a buffer of `n` elements filled with `(seed, stream)`:
//! - key = `[seed as u32, (seed >> 32) as u32]`
//! - element `e` belongs to block `q = e / 4`; counter = `[q as u32, (q >> 32) as u32, stream as u32,
//!   (stream >> 32) as u32]`; Philox4x32-10 of (counter, key) gives words `w0..w3`.
//! - Box-Muller on word pairs in f32 ([`super::gauss`], which states the exact operation sequence): the pair
//!   `(a, b)` = `(w0, w1)` gives elements `4q`, `4q+1` and `(w2, w3)` gives `4q+2`, `4q+3`:
//!   `u1 = (a + 1) * 2^-32` in (0, 1], the angle `2 pi b * 2^-32`, first = `r cos`, second = `r sin` with
//!   `r = sqrt(-2 ln u1)`; log, sin and cos are our own polynomials, so the device kernel gives the same bits.
//!   The f32 value is converted to the buffer's type.
//! - A sampler's k-th noise draw uses `stream = k` (see [`PhiloxNoise`]).
use super::buffer::Buffer;
use anyhow::{Result, bail};

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Philox4x32 with 10 rounds (Salmon et al. 2011, Random123).
pub fn philox4x32_10(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = ctr;
    let mut k = key;
    for r in 0..10 {
        if r > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let p0 = (M0 as u64) * (c[0] as u64);
        let p1 = (M1 as u64) * (c[2] as u64);
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Box-Muller of one word pair (see the module docs and [`super::gauss`]).
pub use super::gauss::box_muller;

pub use super::gauss::fill_normal_host;

/// Where stochastic samplers get their noise: `sample(out, sigma, sigma_next)` gives unit-variance Gaussian
/// noise for the step from `sigma` to `sigma_next` (k-diffusion's `noise_sampler(sigma, sigma_next)`).
pub trait NoiseSource<B> {
    fn sample(&mut self, out: &mut B, sigma: f64, sigma_next: f64) -> Result<()>;
}

/// Independent Philox noise for every call: call k uses stream `first_stream + k`.
pub struct PhiloxNoise {
    pub seed: u64,
    pub next_stream: u64,
}
impl PhiloxNoise {
    /// Stream 0 is left for the initial latent noise, so sampler noise starts at stream 1.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            next_stream: 1,
        }
    }
}
impl<B: Buffer> NoiseSource<B> for PhiloxNoise {
    fn sample(&mut self, out: &mut B, _sigma: f64, _sigma_next: f64) -> Result<()> {
        out.fill_normal(self.seed, self.next_stream)?;
        self.next_stream += 1;
        Ok(())
    }
}

/// RES4LYF's per-channel renormalization of SDE noise (`normalize_zscore(noise, channelwise=True)`, which its
/// `add_noise` applies to every draw): each plane of `plane` contiguous elements (the H x W of one channel of
/// one latent) is shifted to mean 0 and divided by its unbiased standard deviation (torch's `std`). Wrap a
/// sampler's noise source with it to get RES4LYF's noise; device buffers make a host round trip.
pub struct ZScorePlanes<N> {
    pub inner: N,
    pub plane: usize,
}
impl<B: Buffer, N: NoiseSource<B>> NoiseSource<B> for ZScorePlanes<N> {
    fn sample(&mut self, out: &mut B, sigma: f64, sigma_next: f64) -> Result<()> {
        self.inner.sample(out, sigma, sigma_next)?;
        let mut v = out.to_host_f64()?;
        zscore_planes(&mut v, self.plane)?;
        out.set_from_f64(&v)
    }
}

/// In place: every block of `plane` elements to mean 0, unbiased std 1 (see [`ZScorePlanes`]).
pub fn zscore_planes(v: &mut [f64], plane: usize) -> Result<()> {
    if plane < 2 || !v.len().is_multiple_of(plane) {
        bail!(
            "per-channel noise renormalization: plane size {plane} must be >= 2 and divide the buffer length {} \
             (pass H*W of the latent)",
            v.len()
        );
    }
    for p in v.chunks_mut(plane) {
        let n = p.len() as f64;
        let mean = p.iter().sum::<f64>() / n;
        let var = p.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
        let sd = var.sqrt();
        for x in p.iter_mut() {
            *x = (*x - mean) / sd;
        }
    }
    Ok(())
}

/// A noise source for deterministic samplers: any request is an error, so a sampler that claims to be
/// deterministic but draws noise is caught.
pub struct NoNoise;
impl<B> NoiseSource<B> for NoNoise {
    fn sample(&mut self, _out: &mut B, sigma: f64, sigma_next: f64) -> Result<()> {
        bail!("noise requested ({sigma} -> {sigma_next}) by a sampler run without a noise source")
    }
}

/// A Brownian motion W(t) on `[t0, t1]`, a deterministic function of `(seed, t)`: W(t0) = 0, W(t1) is drawn,
/// and W at any other t comes from a Brownian bridge bisection whose midpoint draws are keyed by the node's
/// path (Philox stream), so the same path comes back whatever the order or number of queries (hence the same
/// noise whatever the step count). Below a node width of `tol` it interpolates linearly.
pub struct BrownianTree {
    pub t0: f64,
    pub t1: f64,
    pub seed: u64,
    pub len: usize,
    pub tol: f64,
    w1: Vec<f64>,
}

impl BrownianTree {
    pub fn new(t0: f64, t1: f64, seed: u64, len: usize) -> Result<Self> {
        if t1 <= t0 || !t0.is_finite() || !t1.is_finite() {
            bail!("Brownian tree needs a finite interval t0 < t1, got [{t0}, {t1}]");
        }
        let mut w1 = vec![0.0f64; len];
        fill_normal_host(&mut w1, seed, 1);
        let s = (t1 - t0).sqrt();
        w1.iter_mut().for_each(|v| *v *= s);
        Ok(Self {
            t0,
            t1,
            seed,
            len,
            tol: (t1 - t0) * 1e-7,
            w1,
        })
    }

    /// W(t) for t in [t0, t1] (clamped).
    pub fn w(&self, t: f64) -> Vec<f64> {
        let t = t.clamp(self.t0, self.t1);
        let mut wa = vec![0.0; self.len];
        let mut wb = self.w1.clone();
        let (mut a, mut b) = (self.t0, self.t1);
        // Node ids as in a binary heap (root 1), offset so they never collide with stream 0/1 used above.
        let mut node: u64 = 1;
        let mut z = vec![0.0f64; self.len];
        loop {
            if t == a {
                return wa;
            }
            if t == b {
                return wb;
            }
            if b - a <= self.tol || node >= (1u64 << 62) {
                let f = (t - a) / (b - a);
                return wa.iter().zip(&wb).map(|(x, y)| x + f * (y - x)).collect();
            }
            let m = 0.5 * (a + b);
            fill_normal_host(&mut z, self.seed, 2 + node);
            let sd = 0.5 * (b - a).sqrt();
            let wm: Vec<f64> = wa
                .iter()
                .zip(&wb)
                .zip(&z)
                .map(|((x, y), n)| 0.5 * (x + y) + sd * n)
                .collect();
            if t < m {
                b = m;
                wb = wm;
                node *= 2;
            } else {
                a = m;
                wa = wm;
                node = node * 2 + 1;
            }
        }
    }
}

/// k-diffusion's BrownianTreeNoiseSampler semantics on our own tree: noise for sigma -> sigma_next is
/// `(W(t(sigma_next)) - W(t(sigma))) / sqrt(|t_next - t|)` with `t = sigma` (so it is unit variance).
pub struct BrownianNoise {
    pub tree: BrownianTree,
}
impl BrownianNoise {
    pub fn new(sigma_min: f64, sigma_max: f64, seed: u64, len: usize) -> Result<Self> {
        Ok(Self {
            tree: BrownianTree::new(sigma_min, sigma_max, seed, len)?,
        })
    }
}
impl<B: Buffer> NoiseSource<B> for BrownianNoise {
    fn sample(&mut self, out: &mut B, sigma: f64, sigma_next: f64) -> Result<()> {
        if out.len() != self.tree.len {
            bail!(
                "Brownian noise made for {} elements, asked for {}",
                self.tree.len,
                out.len()
            );
        }
        let (lo, hi) = (sigma.min(sigma_next), sigma.max(sigma_next));
        let wl = self.tree.w(lo);
        let wh = self.tree.w(hi);
        let d = (hi.clamp(self.tree.t0, self.tree.t1) - lo.clamp(self.tree.t0, self.tree.t1)).abs();
        if d <= 0.0 {
            bail!("Brownian noise for an empty interval {sigma} -> {sigma_next}");
        }
        let s = 1.0 / d.sqrt();
        let v: Vec<f64> = wl.iter().zip(&wh).map(|(a, b)| (b - a) * s).collect();
        out.set_from_f64(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random123 known-answer vectors (tests/kat_vectors, philox4x32 10).
    #[test]
    fn philox_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn normals_have_unit_moments_and_layout_is_prefix_stable() {
        let mut v = vec![0.0f64; 400_000];
        fill_normal_host(&mut v, 42, 3);
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n;
        let k4 = v.iter().map(|x| x.powi(4)).sum::<f64>() / n;
        assert!(m.abs() < 0.01, "mean {m}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert!((k4 - 3.0).abs() < 0.05, "4th moment {k4}");
        // Element e depends only on (seed, stream, e): a shorter buffer is a prefix.
        let mut w = vec![0.0f64; 7];
        fill_normal_host(&mut w, 42, 3);
        assert_eq!(&w[..], &v[..7]);
        // The f32 fill is the f64 fill rounded.
        let mut f = vec![0.0f32; 7];
        fill_normal_host(&mut f, 42, 3);
        for i in 0..7 {
            assert_eq!(f[i], v[i] as f32);
        }
        let mut o = vec![0.0f64; 7];
        fill_normal_host(&mut o, 42, 4);
        assert_ne!(o, w);
    }

    #[test]
    fn threaded_fill_equals_serial() {
        let mut a = vec![0.0f32; 300_001];
        fill_normal_host(&mut a, 9, 2);
        let mut b = vec![0.0f32; 300_001];
        super::super::gauss::fill_normal_range(&mut b, 9, 2, 0);
        assert_eq!(a, b);
    }

    #[test]
    fn brownian_tree_is_consistent_and_has_brownian_increments() {
        let len = 20_000;
        let tree = BrownianTree::new(0.03, 14.6, 7, len).unwrap();
        // Same W(t) whatever was queried before, and increments add up across refinements.
        let a = tree.w(1.234);
        let _ = tree.w(9.0);
        assert_eq!(a, tree.w(1.234));
        let (s, t, u) = (0.5, 2.0, 7.5);
        let (ws, wt, wu) = (tree.w(s), tree.w(t), tree.w(u));
        for i in 0..len {
            assert!(((wu[i] - ws[i]) - ((wt[i] - ws[i]) + (wu[i] - wt[i]))).abs() < 1e-12);
        }
        // Variance of increments matches the interval length, and disjoint increments are uncorrelated.
        let var = |x: &[f64], y: &[f64]| {
            x.iter().zip(y).map(|(a, b)| (b - a) * (b - a)).sum::<f64>() / len as f64
        };
        let cov = (0..len)
            .map(|i| (wt[i] - ws[i]) * (wu[i] - wt[i]))
            .sum::<f64>()
            / len as f64;
        assert!((var(&ws, &wt) / (t - s) - 1.0).abs() < 0.05);
        assert!((var(&wt, &wu) / (u - t) - 1.0).abs() < 0.05);
        assert!(cov.abs() / ((t - s) * (u - t)).sqrt() < 0.05);
        // W(t0) = 0.
        assert!(tree.w(0.03).iter().all(|&v| v == 0.0));
    }
}
