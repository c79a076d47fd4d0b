//! RES4LYF's noise types (beta/noise_classes.py) on our counter-based Philox stream: the same transforms of
//! uniform/normal draws (uniform, laplacian, studentt, fractal "colored" noise white/pink/brown/blue/violet/
//! ultraviolet_A-C, pyramid nearest/bilinear/bicubic), each returning a `[C, H, W]` field normalized as RES4LYF
//! normalizes it. Bit-exactness with torch's generator is not a goal (different RNG); the defining statistics
//! are (tests/samplers_noise.rs): spectrum slope, tails, clamping, and the pyramid's downsampling. `simplex` draws
//! no random numbers (OpenSimplex from a seed, [`super::simplex`]) and equals RES4LYF's values.
//! [`TypedNoise`] is a [`NoiseSource`], so any sampler can use any type.
use super::buffer::Buffer;
use super::noise::{NoiseSource, box_muller, philox4x32_10};
use super::simplex::OpenSimplex;
use anyhow::{Result, bail};

/// torch `interpolate` modes (align_corners = False, no antialias).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Resize {
    Nearest,
    NearestExact,
    Bilinear,
    Bicubic,
}

/// Source indices and weights of output index `dst` when resizing `n_in` samples to `n_out`.
fn resize_taps(mode: Resize, dst: usize, n_out: usize, n_in: usize) -> Vec<(usize, f64)> {
    let scale = n_in as f64 / n_out as f64;
    let last = n_in as isize - 1;
    match mode {
        Resize::Nearest => vec![(((dst as f64 * scale).floor() as usize).min(n_in - 1), 1.0)],
        Resize::NearestExact => vec![(nearest_exact(dst, n_out, n_in), 1.0)],
        Resize::Bilinear => {
            let src = ((dst as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as isize).min(last);
            let i1 = (i0 + 1).min(last);
            let t = src - i0 as f64;
            vec![(i0 as usize, 1.0 - t), (i1 as usize, t)]
        }
        Resize::Bicubic => {
            // Keys cubic, A = -0.75; torch does not clamp the source coordinate for cubic, only the taps.
            let src = (dst as f64 + 0.5) * scale - 0.5;
            let i0 = src.floor();
            let t = src - i0;
            let a = -0.75;
            let near = |x: f64| ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0;
            let far = |x: f64| ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a;
            let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            (0..4)
                .map(|k| {
                    (
                        ((i0 as isize) - 1 + k as isize).clamp(0, last) as usize,
                        w[k],
                    )
                })
                .collect()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum NoiseType {
    Gaussian,
    Uniform,
    Laplacian,
    /// Student's t with integer `df` (RES4LYF: df 1, scale 0.2), clamped at the 75th percentile of |x|, then
    /// a signed square root.
    StudentT {
        df: u32,
    },
    /// Fractal noise: white noise filtered by `|f|^-(alpha * 0.1)` (RES4LYF's scale 0.1), DC removed.
    Colored {
        alpha: f64,
    },
    /// Sum over 5 octaves of normal noise drawn at 2^(i+1) times the resolution (std 0.5^i, weight 0.8^i),
    /// downsampled to the latent size.
    Pyramid(Resize),
    /// "pyramid-interpolated" (resized nearest-exact) and "hires-pyramid-nearest/bilinear/bicubic": uniform
    /// noise plus 4 octaves of normal noise (weight 0.7^i) at sizes compounding by random factors r in [2, 4)
    /// (capped at 15x the latent), resized to the latent as torch's interpolate does, over the std.
    Interpolated(Resize),
    /// "pyramid-cascade_B" (Stable Cascade): normal noise plus nearest-upsampled normal offsets at 1/2^i of
    /// the height (RES4LYF uses the height for both sides), weight 0.75^i, for levels of size 1..16.
    CascadeB,
    /// RES4LYF's "wavelet": a haar `wavedecn`/`waverecn` round trip with periodization of Gaussian noise,
    /// which is the identity, so the Gaussian draw z-scored.
    Wavelet,
    /// RES4LYF's "perlin": normal/2 plus two Perlin layers on an (h+1) x (w+1) grid of random unit gradients,
    /// sampled at cell centres (one cell per pixel: the mean of the four corner dot products), over the std.
    Perlin,
    /// RES4LYF's "simplex": OpenSimplex 3-D noise at the integer points (x, y, channel), over its std (not
    /// centred). Its generator is seeded with `seed` and adds 1 after every call, so stream `k` (call `k - 1`
    /// of [`TypedNoise`]) uses OpenSimplex seed `seed + k - 1`; it draws nothing from Philox.
    Simplex,
}

pub const NOISE_TYPE_NAMES: &[&str] = &[
    "gaussian",
    "uniform",
    "laplacian",
    "studentt",
    "white",
    "pink",
    "brown",
    "blue",
    "violet",
    "ultraviolet_A",
    "ultraviolet_B",
    "ultraviolet_C",
    "pyramid-nearest",
    "pyramid-bilinear",
    "pyramid-bicubic",
    "pyramid-interpolated",
    "hires-pyramid-nearest",
    "hires-pyramid-bilinear",
    "hires-pyramid-bicubic",
    "pyramid-cascade_B",
    "wavelet",
    "perlin",
    "simplex",
];

impl NoiseType {
    pub fn parse(s: &str) -> Result<Self> {
        let colored = |alpha| Self::Colored { alpha };
        Ok(match s {
            "gaussian" => Self::Gaussian,
            "uniform" => Self::Uniform,
            "laplacian" => Self::Laplacian,
            "studentt" => Self::StudentT { df: 1 },
            "white" => colored(0.0),
            "pink" => colored(1.0),
            "brown" => colored(2.0),
            "blue" => colored(-1.0),
            "violet" => colored(-2.0),
            "ultraviolet_A" => colored(-3.0),
            "ultraviolet_B" => colored(-4.0),
            "ultraviolet_C" => colored(-5.0),
            "pyramid-nearest" => Self::Pyramid(Resize::Nearest),
            "pyramid-bilinear" => Self::Pyramid(Resize::Bilinear),
            "pyramid-bicubic" => Self::Pyramid(Resize::Bicubic),
            "pyramid-interpolated" => Self::Interpolated(Resize::NearestExact),
            "hires-pyramid-nearest" => Self::Interpolated(Resize::Nearest),
            "hires-pyramid-bilinear" => Self::Interpolated(Resize::Bilinear),
            "hires-pyramid-bicubic" => Self::Interpolated(Resize::Bicubic),
            "pyramid-cascade_B" => Self::CascadeB,
            "wavelet" => Self::Wavelet,
            "perlin" => Self::Perlin,
            "simplex" => Self::Simplex,
            _ => bail!(
                "unknown noise type '{s}'; valid: {}",
                NOISE_TYPE_NAMES.join(", ")
            ),
        })
    }
}

/// Random access into Philox stream `stream` of `seed`: element `i` as a uniform in [0, 1) (one 32-bit word)
/// or as a standard normal (Box-Muller of the word pair, as [`super::noise::fill_normal_host`]).
struct Draw {
    key: [u32; 2],
    stream: u64,
}
impl Draw {
    fn new(seed: u64, stream: u64) -> Self {
        Self {
            key: [seed as u32, (seed >> 32) as u32],
            stream,
        }
    }
    fn words(&self, i: u64) -> [u32; 4] {
        let q = i / 4;
        philox4x32_10(
            [
                q as u32,
                (q >> 32) as u32,
                self.stream as u32,
                (self.stream >> 32) as u32,
            ],
            self.key,
        )
    }
    fn uniform(&self, i: u64) -> f64 {
        self.words(i)[(i % 4) as usize] as f64 / 4294967296.0
    }
    fn normal(&self, i: u64) -> f64 {
        let w = self.words(i);
        let lane = (i % 4) as usize;
        let (a, b) = box_muller(w[lane & 2], w[(lane & 2) + 1]);
        if lane.is_multiple_of(2) {
            a as f64
        } else {
            b as f64
        }
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    // torch.std: unbiased.
    let var = v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var.sqrt())
}

/// A `[c, h, w]` field of the given type from stream `stream` of `seed`.
pub fn generate(kind: NoiseType, shape: [usize; 3], seed: u64, stream: u64) -> Result<Vec<f64>> {
    let [c, h, w] = shape;
    let n = c * h * w;
    if n == 0 {
        bail!("noise shape {shape:?} is empty");
    }
    let d = Draw::new(seed, stream);
    Ok(match kind {
        NoiseType::Gaussian => (0..n as u64).map(|i| d.normal(i)).collect(),
        NoiseType::Uniform => (0..n as u64)
            .map(|i| 1.73 * 2.0 * (d.uniform(i) - 0.5))
            .collect(),
        NoiseType::Laplacian => {
            // normal/4 + Laplace(0, 1) by inverse CDF (second half of the stream), then / std.
            let v: Vec<f64> = (0..n as u64)
                .map(|i| {
                    let u = d.uniform(n as u64 * 2 + i) - 0.5;
                    let lap = -u.signum() * (1.0 - 2.0 * u.abs()).max(f64::MIN_POSITIVE).ln();
                    d.normal(i) / 4.0 + lap
                })
                .collect();
            let (_, s) = mean_std(&v);
            v.into_iter().map(|x| x / s).collect()
        }
        NoiseType::StudentT { df } => {
            let df = df.max(1) as u64;
            let t: Vec<f64> = (0..n as u64)
                .map(|i| {
                    let z = d.normal(i);
                    let chi2: f64 = (0..df)
                        .map(|k| d.normal(n as u64 * (k + 1) + i).powi(2))
                        .sum();
                    0.2 * z / (chi2 / df as f64).sqrt()
                })
                .collect();
            let mut abs: Vec<f64> = t.iter().map(|x| x.abs()).collect();
            abs.sort_by(f64::total_cmp);
            // torch.quantile's linear interpolation at q = 0.75.
            let pos = 0.75 * (n - 1) as f64;
            let (lo, frac) = (pos.floor() as usize, pos - pos.floor());
            let s = abs[lo] + frac * (abs[(lo + 1).min(n - 1)] - abs[lo]);
            let v: Vec<f64> = t
                .iter()
                .map(|x| {
                    let y = x.clamp(-s, s);
                    y.signum() * y.abs().sqrt()
                })
                .collect();
            let (m, sd) = mean_std(&v);
            v.into_iter().map(|x| (x - m) / sd).collect()
        }
        NoiseType::Colored { alpha } => {
            let mut out = Vec::with_capacity(n);
            for ch in 0..c {
                let field: Vec<(f64, f64)> = (0..h * w)
                    .map(|k| (d.normal((ch * h * w + k) as u64), 0.0))
                    .collect();
                let mut f = fft2(field, h, w, false);
                let fy = fftfreq(h);
                let fx = fftfreq(w);
                for y in 0..h {
                    for x in 0..w {
                        let fr = (fy[y] * fy[y] + fx[x] * fx[x]).sqrt().max(1e-10);
                        let dens = if y == 0 && x == 0 {
                            0.0
                        } else {
                            1.0 / fr.powf(alpha * 0.1)
                        };
                        let v = &mut f[y * w + x];
                        v.0 *= dens;
                        v.1 *= dens;
                    }
                }
                out.extend(fft2(f, h, w, true).into_iter().map(|z| z.0));
            }
            let (_, s) = mean_std(&out);
            out.into_iter().map(|x| x / s).collect()
        }
        NoiseType::Pyramid(mode) => {
            let mut out = vec![0.0; n];
            for i in 0..5u32 {
                let r = 1usize << (i + 1);
                let (hh, ww) = (h * r, w * r);
                let std = 0.5f64.powi(i as i32);
                let wgt = 0.8f64.powi(i as i32);
                // Octave i is its own stream region: elements offset by the octaves before it.
                let base: u64 = (0..i).map(|k| (n << (2 * (k + 1))) as u64).sum();
                let at = |ch: usize, y: usize, x: usize| -> f64 {
                    d.normal(base + ((ch * hh + y) * ww + x) as u64) * std
                };
                // Only the taps the (integer-factor) downsampling reads are drawn.
                let ty: Vec<_> = (0..h).map(|y| resize_taps(mode, y, h, hh)).collect();
                let tx: Vec<_> = (0..w).map(|x| resize_taps(mode, x, w, ww)).collect();
                for ch in 0..c {
                    for (y, ty) in ty.iter().enumerate() {
                        for (x, tx) in tx.iter().enumerate() {
                            let mut v = 0.0;
                            for &(sy, wy) in ty {
                                for &(sx, wx) in tx {
                                    v += wy * wx * at(ch, sy, sx);
                                }
                            }
                            out[(ch * h + y) * w + x] += v * wgt;
                        }
                    }
                }
            }
            let (_, s) = mean_std(&out);
            out.into_iter().map(|x| x / s).collect()
        }
        NoiseType::Interpolated(resize) => {
            // Region 0: the uniform base; region k + 1: octave k's normals; the r factors come last.
            let mut out: Vec<f64> = (0..n as u64)
                .map(|i| (d.uniform(i) - 0.5) * 2.0 * 1.73)
                .collect();
            let discount: f64 = 0.7;
            let (mut hh, mut ww) = (h, w);
            let region = (n * 15 * 15) as u64;
            for i in 0..4i32 {
                let r = d.uniform(region * 5 + i as u64) * 2.0 + 2.0;
                hh = (h * 15).min((hh as f64 * r.powi(i)) as usize).max(1);
                ww = (w * 15).min((ww as f64 * r.powi(i)) as usize).max(1);
                let base = region * (i as u64 + 1);
                let wgt = discount.powi(i);
                let tys: Vec<_> = (0..h).map(|y| resize_taps(resize, y, h, hh)).collect();
                let txs: Vec<_> = (0..w).map(|x| resize_taps(resize, x, w, ww)).collect();
                for ch in 0..c {
                    for (y, ty) in tys.iter().enumerate() {
                        for (x, tx) in txs.iter().enumerate() {
                            let mut v = 0.0;
                            for &(sy, wy) in ty {
                                for &(sx, wx) in tx {
                                    v += wy
                                        * wx
                                        * d.normal(base + ((ch * hh + sy) * ww + sx) as u64);
                                }
                            }
                            out[(ch * h + y) * w + x] += v * wgt;
                        }
                    }
                }
                if hh >= h * 15 || ww >= w * 15 {
                    break;
                }
            }
            // (pyramid-interpolated also divides by sqrt(sum of weights^2), which the std normalization cancels.)
            let (_, s) = mean_std(&out);
            out.into_iter().map(|x| x / s).collect()
        }
        NoiseType::Wavelet => {
            let v: Vec<f64> = (0..n as u64).map(|i| d.normal(i)).collect();
            let (m, sd) = mean_std(&v);
            v.into_iter().map(|x| (x - m) / sd).collect()
        }
        NoiseType::Perlin => {
            let mut out: Vec<f64> = (0..n as u64).map(|i| d.normal(i) / 2.0).collect();
            let grid = (h + 1) * (w + 1);
            for layer in 0..2u64 {
                // Gradient angles uniform in [0, 2 pi), one per grid point and channel.
                let base = n as u64 + layer * (c * grid) as u64;
                let g = |ch: usize, gy: usize, gx: usize| {
                    let a = d.uniform(base + (ch * grid + gy * (w + 1) + gx) as u64)
                        * std::f64::consts::TAU;
                    (a.cos(), a.sin())
                };
                for ch in 0..c {
                    for y in 0..h {
                        for x in 0..w {
                            // Offsets (dx, dy) of the cell centre from the four corners: TL, TR, BL, BR;
                            // with the smooth step at 0.5 the bilinear blend is the plain mean.
                            let corners = [
                                (g(ch, y, x), (0.5, 0.5)),
                                (g(ch, y, x + 1), (-0.5, 0.5)),
                                (g(ch, y + 1, x), (0.5, -0.5)),
                                (g(ch, y + 1, x + 1), (-0.5, -0.5)),
                            ];
                            let p: f64 = corners
                                .iter()
                                .map(|((gx, gy), (dx, dy))| gx * dx + gy * dy)
                                .sum::<f64>()
                                / 4.0;
                            out[(ch * h + y) * w + x] += p;
                        }
                    }
                }
            }
            let (_, sd) = mean_std(&out);
            out.into_iter().map(|x| x / sd).collect()
        }
        NoiseType::Simplex => {
            let os = OpenSimplex::new((seed as i64).wrapping_add(stream as i64).wrapping_sub(1));
            let v = os.field(shape);
            let (_, sd) = mean_std(&v);
            v.into_iter().map(|x| x / sd).collect()
        }
        NoiseType::CascadeB => {
            let mut out: Vec<f64> = (0..n as u64).map(|i| d.normal(i)).collect();
            let mut mult2 = 1.0;
            let mut base = n as u64;
            for i in 1..10u32 {
                let m = 0.75f64.powi(i as i32);
                // RES4LYF takes both sides from the height.
                let lh = h >> i;
                let lw = h >> i;
                if (1..=16).contains(&lh) || (1..=16).contains(&lw) {
                    for ch in 0..c {
                        for y in 0..h {
                            let sy = y * lh / h; // torch 'nearest': floor(dst * in / out)
                            for x in 0..w {
                                let sx = x * lw / w;
                                out[(ch * h + y) * w + x] +=
                                    d.normal(base + ((ch * lh + sy) * lw + sx) as u64) * m;
                            }
                        }
                    }
                    base += (c * lh * lw) as u64;
                    mult2 += m * m;
                }
                if lh <= 1 || lw <= 1 {
                    break;
                }
            }
            out.into_iter().map(|x| x / mult2.sqrt()).collect()
        }
    })
}

/// torch 'nearest-exact' source index when resizing `n_in` to `n_out`: floor((dst + 0.5) n_in / n_out).
fn nearest_exact(dst: usize, n_out: usize, n_in: usize) -> usize {
    (((dst as f64 + 0.5) * n_in as f64 / n_out as f64).floor() as usize).min(n_in - 1)
}

/// torch.fft.fftfreq(n, 1/n): 0, 1, ..., -n/2, ..., -1.
fn fftfreq(n: usize) -> Vec<f64> {
    (0..n)
        .map(|k| {
            if k < n.div_ceil(2) {
                k as f64
            } else {
                k as f64 - n as f64
            }
        })
        .collect()
}

/// 1-D DFT (radix-2 FFT for powers of two, direct sum otherwise); `inverse` includes the 1/n.
fn dft(v: &[(f64, f64)], inverse: bool) -> Vec<(f64, f64)> {
    let n = v.len();
    let sign = if inverse { 1.0 } else { -1.0 };
    let mut out = if n.is_power_of_two() {
        let mut a = v.to_vec();
        let bits = n.trailing_zeros();
        for i in 0..n {
            let j = i.reverse_bits() >> (usize::BITS - bits.max(1));
            if bits > 0 && j > i {
                a.swap(i, j);
            }
        }
        let mut len = 2;
        while len <= n {
            let ang = sign * std::f64::consts::TAU / len as f64;
            for s in (0..n).step_by(len) {
                for k in 0..len / 2 {
                    let (wr, wi) = ((ang * k as f64).cos(), (ang * k as f64).sin());
                    let (ar, ai) = a[s + k];
                    let (br, bi) = a[s + k + len / 2];
                    let (tr, ti) = (br * wr - bi * wi, br * wi + bi * wr);
                    a[s + k] = (ar + tr, ai + ti);
                    a[s + k + len / 2] = (ar - tr, ai - ti);
                }
            }
            len <<= 1;
        }
        a
    } else {
        (0..n)
            .map(|k| {
                v.iter()
                    .enumerate()
                    .fold((0.0, 0.0), |acc, (j, &(re, im))| {
                        let ang = sign * std::f64::consts::TAU * ((j * k) % n) as f64 / n as f64;
                        let (c, s) = (ang.cos(), ang.sin());
                        (acc.0 + re * c - im * s, acc.1 + re * s + im * c)
                    })
            })
            .collect()
    };
    if inverse {
        for z in &mut out {
            z.0 /= n as f64;
            z.1 /= n as f64;
        }
    }
    out
}

fn fft2(mut a: Vec<(f64, f64)>, h: usize, w: usize, inverse: bool) -> Vec<(f64, f64)> {
    for y in 0..h {
        let row = dft(&a[y * w..(y + 1) * w], inverse);
        a[y * w..(y + 1) * w].copy_from_slice(&row);
    }
    for x in 0..w {
        let col: Vec<(f64, f64)> = (0..h).map(|y| a[y * w + x]).collect();
        for (y, z) in dft(&col, inverse).into_iter().enumerate() {
            a[y * w + x] = z;
        }
    }
    a
}

/// A [`NoiseSource`] of one RES4LYF noise type for latents of shape `[c, h, w]`: call k uses Philox stream
/// `first_stream + k` (stream 0 is left for the initial latent, as [`super::noise::PhiloxNoise`]).
pub struct TypedNoise {
    pub kind: NoiseType,
    pub shape: [usize; 3],
    pub seed: u64,
    pub next_stream: u64,
}
impl TypedNoise {
    pub fn new(kind: NoiseType, shape: [usize; 3], seed: u64) -> Self {
        Self {
            kind,
            shape,
            seed,
            next_stream: 1,
        }
    }
}
impl<B: Buffer> NoiseSource<B> for TypedNoise {
    fn sample(&mut self, out: &mut B, _sigma: f64, _sigma_next: f64) -> Result<()> {
        let [c, h, w] = self.shape;
        if out.len() != c * h * w {
            bail!(
                "noise of shape {:?} ({} values) for a buffer of {} values",
                self.shape,
                c * h * w,
                out.len()
            );
        }
        let v = generate(self.kind, self.shape, self.seed, self.next_stream)?;
        self.next_stream += 1;
        out.set_from_f64(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn fft_matches_the_direct_sum_and_inverts() {
        for n in [1usize, 6, 8, 12, 16] {
            let v: Vec<(f64, f64)> = (0..n)
                .map(|k| ((k as f64 * 0.7).sin(), (k as f64 * 0.3).cos()))
                .collect();
            let f = dft(&v, false);
            for (k, z) in f.iter().enumerate() {
                let (mut re, mut im) = (0.0, 0.0);
                for (j, &(a, b)) in v.iter().enumerate() {
                    let ang = -std::f64::consts::TAU * (j * k) as f64 / n as f64;
                    re += a * ang.cos() - b * ang.sin();
                    im += a * ang.sin() + b * ang.cos();
                }
                assert!(
                    (z.0 - re).abs() < 1e-12 && (z.1 - im).abs() < 1e-12,
                    "n={n} k={k}"
                );
            }
            let back = dft(&f, true);
            for (a, b) in back.iter().zip(&v) {
                assert!((a.0 - b.0).abs() < 1e-12 && (a.1 - b.1).abs() < 1e-12);
            }
        }
    }
    #[test]
    fn typed_noise_checks_the_shape() {
        let mut t = TypedNoise::new(NoiseType::Gaussian, [2, 3, 4], 1);
        let mut ok = vec![0.0f32; 24];
        NoiseSource::<Vec<f32>>::sample(&mut t, &mut ok, 1.0, 0.5).unwrap();
        let mut bad = vec![0.0f32; 23];
        assert!(NoiseSource::<Vec<f32>>::sample(&mut t, &mut bad, 1.0, 0.5).is_err());
    }
}

#[cfg(test)]
mod resize_tests {
    use super::*;
    /// The taps reproduce torch.nn.functional.interpolate (golden file from scripts/golden/samplers_resize.py).
    #[test]
    fn resize_taps_match_torch_interpolate() {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/samplers/resize.json"
        );
        let g: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
        let vf = |v: &serde_json::Value| -> Vec<f64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        };
        let mut n = 0;
        for c in g.as_array().unwrap() {
            let mode = match c["mode"].as_str().unwrap() {
                "nearest" => Resize::Nearest,
                "nearest-exact" => Resize::NearestExact,
                "bilinear" => Resize::Bilinear,
                "bicubic" => Resize::Bicubic,
                m => panic!("{m}"),
            };
            let (hi, wi) = (
                c["in"][0].as_u64().unwrap() as usize,
                c["in"][1].as_u64().unwrap() as usize,
            );
            let (ho, wo) = (
                c["out"][0].as_u64().unwrap() as usize,
                c["out"][1].as_u64().unwrap() as usize,
            );
            let want = vf(&c["dst"]);
            let src: Vec<f64> = (0..hi * wi)
                .map(|k| {
                    let (y, x) = (k / wi, k % wi);
                    ((y * 7 + x * 13) % 17) as f64 / 17.0 - 0.3 * y as f64 / hi as f64
                })
                .collect();
            for y in 0..ho {
                for x in 0..wo {
                    let mut v = 0.0;
                    for (sy, wy) in resize_taps(mode, y, ho, hi) {
                        for (sx, wx) in resize_taps(mode, x, wo, wi) {
                            v += wy * wx * src[sy * wi + sx];
                        }
                    }
                    let w = want[y * wo + x];
                    assert!(
                        (v - w).abs() < 1e-12,
                        "{mode:?} {hi}x{wi}->{ho}x{wo} [{y},{x}]: {v} vs {w}"
                    );
                }
            }
            n += 1;
        }
        assert_eq!(n, 16);
    }
}
