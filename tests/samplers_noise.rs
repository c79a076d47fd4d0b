//! RES4LYF's SDE noise modes against RES4LYF's own get_sde_step (golden file from
//! scripts/golden/samplers_res4lyf.py).
use crate::common;
use common::samplers::golden;
use serde_json::Value;
use trt_diff::samplers::noise_mode::{NoiseMode, sde_step};

#[test]
fn noise_modes_match_res4lyf() {
    let g = golden("res4lyf.json");
    let cases = g["noise_modes"].as_array().unwrap();
    assert!(cases.len() >= 300);
    let mut modes = std::collections::BTreeSet::new();
    for c in cases {
        let f = |k: &str| c[k].as_f64().unwrap();
        let name = c["mode"].as_str().unwrap();
        modes.insert(name);
        let st = sde_step(
            NoiseMode::parse(name).unwrap(),
            f("sigma"),
            f("sigma_next"),
            f("eta"),
            c["vp"].as_bool().unwrap(),
            f("sigma_max"),
            c["down"].as_bool().unwrap(),
        );
        for (ours, key) in [
            (st.sigma_up, "sigma_up"),
            (st.sigma_down, "sigma_down"),
            (st.alpha_ratio, "alpha_ratio"),
        ] {
            let want = f(key);
            assert!(
                (ours - want).abs() <= 1e-12 * (1.0 + want.abs()),
                "{c}: {key} ours {ours}, RES4LYF {want}"
            );
        }
    }
    assert_eq!(modes.len(), 11);
}

/// The SDE wiring of the exponential samplers: land on the mode's sigma_down, then `alpha_ratio x +
/// s_noise sigma_up z`; eta = 0 in hard mode is the ODE step.
#[test]
fn exponential_sde_step_uses_the_mode_split() {
    use anyhow::Result;
    use trt_diff::samplers::model::{Denoiser, GaussianData};
    use trt_diff::samplers::noise::NoiseSource;
    use trt_diff::samplers::registry::{self, SamplerOptions};
    use trt_diff::samplers::stepper::Ctx;
    struct Fixed(Vec<f64>);
    impl NoiseSource<Vec<f64>> for Fixed {
        fn sample(&mut self, out: &mut Vec<f64>, _: f64, _: f64) -> Result<()> {
            out.copy_from_slice(&self.0);
            Ok(())
        }
    }
    let n = 6;
    let data = GaussianData::standard(n, false);
    let z: Vec<f64> = (0..n).map(|i| (i as f64 * 0.7).sin()).collect();
    let x0: Vec<f64> = (0..n).map(|i| 1.0 + i as f64 * 0.4).collect();
    let sigmas = [3.0, 2.0];
    let run = |mode: &str, eta: f64| -> Vec<f64> {
        let opts = SamplerOptions {
            noise_mode: NoiseMode::parse(mode).unwrap(),
            eta,
            s_noise: 0.9,
            ..Default::default()
        };
        let mut s = registry::build::<Vec<f64>>("ddim", &opts).unwrap();
        let mut model = data.clone();
        let mut noise = Fixed(z.clone());
        let mut cx = Ctx {
            model: &mut model as &mut dyn Denoiser<Vec<f64>>,
            noise: &mut noise,
            sigmas: &sigmas,
        };
        let mut x = x0.clone();
        s.step(&mut cx, &mut x, 0).unwrap();
        x
    };
    let d = data.denoise_f64(&x0, 3.0);
    for (mode, eta) in [
        ("hard", 0.5),
        ("exp", 0.7),
        ("sinusoidal", 0.5),
        ("hard", 0.0),
    ] {
        let smax = SamplerOptions::default().noise_sigma_max;
        let st = sde_step(
            NoiseMode::parse(mode).unwrap(),
            3.0,
            2.0,
            eta,
            false,
            smax,
            false,
        );
        let r = st.sigma_down / 3.0;
        let got = run(mode, eta);
        for i in 0..n {
            // DDIM (= exponential Euler) to sigma_down, then the noise.
            let want = st.alpha_ratio * (r * x0[i] + (1.0 - r) * d[i]) + 0.9 * st.sigma_up * z[i];
            assert!((got[i] - want).abs() < 1e-12, "{mode} eta {eta}");
        }
    }
}

mod noise_types {
    use trt_diff::samplers::noise::fill_normal_host;
    use trt_diff::samplers::noise_types::{NOISE_TYPE_NAMES, NoiseType, generate};

    fn moments(v: &[f64]) -> (f64, f64, f64) {
        let n = v.len() as f64;
        let m = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
        let k = v.iter().map(|x| (x - m).powi(4)).sum::<f64>() / n / (var * var) - 3.0;
        (m, var.sqrt(), k)
    }

    #[test]
    fn every_type_is_seeded_and_normalized() {
        for name in NOISE_TYPE_NAMES {
            let t = NoiseType::parse(name).unwrap();
            let a = generate(t, [2, 16, 16], 7, 1).unwrap();
            assert_eq!(a, generate(t, [2, 16, 16], 7, 1).unwrap(), "{name}");
            assert_ne!(a, generate(t, [2, 16, 16], 7, 2).unwrap(), "{name}");
            assert_ne!(a, generate(t, [2, 16, 16], 8, 1).unwrap(), "{name}");
            let (m, s, _) = moments(&a);
            assert!(
                m.abs() < 0.2 && (s - 1.0).abs() < 0.1,
                "{name}: mean {m} std {s}"
            );
        }
        assert!(NoiseType::parse("plaid").is_err());
    }

    #[test]
    fn distributions_have_their_shapes() {
        let shape = [4, 128, 128];
        let g = generate(NoiseType::Gaussian, shape, 1, 1).unwrap();
        let (_, s, k) = moments(&g);
        assert!(
            (s - 1.0).abs() < 0.01 && k.abs() < 0.05,
            "gaussian std {s} kurtosis {k}"
        );
        // Uniform on +-1.73: variance 1.73^2 / 3, excess kurtosis -1.2.
        let u = generate(NoiseType::Uniform, shape, 1, 1).unwrap();
        assert!(u.iter().all(|x| x.abs() <= 1.73));
        let (_, s, k) = moments(&u);
        assert!(
            (s - 1.73 / 3f64.sqrt()).abs() < 0.01 && (k + 1.2).abs() < 0.02,
            "uniform {s} {k}"
        );
        // normal/4 + Laplace(1): variance 1/16 + 2, excess kurtosis 3 * 2^2 / (2 + 1/16)^2 = 2.82.
        let l = generate(NoiseType::Laplacian, shape, 1, 1).unwrap();
        let (_, _, k) = moments(&l);
        assert!(
            (k - 12.0 / 2.0625f64.powi(2)).abs() < 0.25,
            "laplacian kurtosis {k}"
        );
        // Student t clamped at the 75th percentile of |x|: a quarter of the values sit on the clamp.
        let t = generate(NoiseType::StudentT { df: 1 }, shape, 1, 1).unwrap();
        // (The mean is subtracted after clamping, so the two clamps sit at the max and the min.)
        let (lo, hi) = t
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let at_clamp = t
            .iter()
            .filter(|&&x| x > hi - 1e-9 || x < lo + 1e-9)
            .count() as f64
            / t.len() as f64;
        assert!(
            (at_clamp - 0.25).abs() < 0.01,
            "studentt clamped fraction {at_clamp}"
        );
    }

    /// Fractal noise: the radially averaged power spectrum falls as |f|^(-2 * 0.1 alpha).
    #[test]
    fn colored_noise_has_its_spectrum_slope() {
        let (c, h, w) = (6, 32, 32);
        for (name, alpha) in [
            ("white", 0.0),
            ("pink", 1.0),
            ("brown", 2.0),
            ("blue", -1.0),
            ("violet", -2.0),
            ("ultraviolet_C", -5.0),
        ] {
            let v = generate(NoiseType::parse(name).unwrap(), [c, h, w], 3, 1).unwrap();
            // Periodogram by direct DFT of each channel, binned by integer radius.
            let mut bins = vec![(0.0f64, 0usize); 17];
            for ch in 0..c {
                let f = &v[ch * h * w..(ch + 1) * h * w];
                for ky in 0..h {
                    for kx in 0..w {
                        let fy = if ky < h / 2 {
                            ky as f64
                        } else {
                            ky as f64 - h as f64
                        };
                        let fx = if kx < w / 2 {
                            kx as f64
                        } else {
                            kx as f64 - w as f64
                        };
                        let r = (fy * fy + fx * fx).sqrt();
                        let rb = r.round() as usize;
                        if !(2..=14).contains(&rb) {
                            continue;
                        }
                        let (mut re, mut im) = (0.0, 0.0);
                        for y in 0..h {
                            for x in 0..w {
                                let ang = -std::f64::consts::TAU
                                    * ((ky * y) as f64 / h as f64 + (kx * x) as f64 / w as f64);
                                re += f[y * w + x] * ang.cos();
                                im += f[y * w + x] * ang.sin();
                            }
                        }
                        bins[rb].0 += re * re + im * im;
                        bins[rb].1 += 1;
                    }
                }
            }
            let pts: Vec<(f64, f64)> = bins
                .iter()
                .enumerate()
                .filter(|(_, b)| b.1 > 0)
                .map(|(r, b)| ((r as f64).ln(), (b.0 / b.1 as f64).ln()))
                .collect();
            let n = pts.len() as f64;
            let (mx, my) = (
                pts.iter().map(|p| p.0).sum::<f64>() / n,
                pts.iter().map(|p| p.1).sum::<f64>() / n,
            );
            let slope = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>()
                / pts.iter().map(|p| (p.0 - mx).powi(2)).sum::<f64>();
            let want = -0.2 * alpha;
            assert!(
                (slope - want).abs() < 0.06,
                "{name}: slope {slope}, want {want}"
            );
        }
    }

    /// Cascade-B: nearest-upsampled low-resolution offsets make pixels inside the same coarse block
    /// correlated by (sum of the block levels' m^2) / (1 + sum of all m^2); across a boundary of every block,
    /// only the coarser levels contribute.
    #[test]
    fn cascade_b_has_its_block_correlation() {
        let (c, h, w) = (256, 32, 32);
        let v = generate(
            NoiseType::parse("pyramid-cascade_B").unwrap(),
            [c, h, w],
            5,
            1,
        )
        .unwrap();
        // Levels with side 16, 8, 4, 2, 1 (i = 1..5), m = 0.75^i.
        let m2: Vec<f64> = (1..=5).map(|i| 0.75f64.powi(2 * i)).collect();
        let total = 1.0 + m2.iter().sum::<f64>();
        let corr = |pairs: &dyn Fn(usize) -> bool| {
            let (mut s, mut k) = (0.0, 0usize);
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w - 1 {
                        if pairs(x) {
                            s += v[(ch * h + y) * w + x] * v[(ch * h + y) * w + x + 1];
                            k += 1;
                        }
                    }
                }
            }
            s / k as f64
        };
        // x even: x and x + 1 share the block at every level (the finest blocks are 2 wide).
        let inside = corr(&|x| x % 2 == 0);
        let want = m2.iter().sum::<f64>() / total;
        assert!((inside - want).abs() < 0.02, "inside {inside}, want {want}");
        // x = 15 -> 16: a boundary of every level but the 1x1 one.
        let across = corr(&|x| x == 15);
        assert!((across - m2[4] / total).abs() < 0.05, "across {across}");
    }

    /// Perlin: out = (z / 2 + P1 + P2) / S with z the stream's normals; each Perlin layer at cell centres is
    /// the mean of four corner dot products with offsets of length sqrt(1/2), so |P| <= sqrt(1/2) per layer
    /// and Var(P1 + P2) = 2 * 4 * (1/4)^2 * (1/2)(1/2) = 1/8.
    #[test]
    fn perlin_layers_have_their_bound_and_variance() {
        let (c, h, w) = (4, 64, 64);
        let n = c * h * w;
        let out = generate(NoiseType::parse("perlin").unwrap(), [c, h, w], 4, 1).unwrap();
        let mut z = vec![0.0f64; n];
        fill_normal_host(&mut z, 4, 1);
        // Regress out on z / 2: slope 1 / S.
        let zz: f64 = z.iter().map(|v| v * v / 4.0).sum();
        let oz: f64 = out.iter().zip(&z).map(|(o, v)| o * v / 2.0).sum();
        let s = zz / oz;
        let p: Vec<f64> = out.iter().zip(&z).map(|(o, v)| s * o - v / 2.0).collect();
        let var = p.iter().map(|v| v * v).sum::<f64>() / n as f64;
        assert!((var - 0.125).abs() < 0.01, "Perlin variance {var}");
        let mx = p.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(mx <= 2f64.sqrt() + 0.05, "Perlin bound {mx}");
    }

    /// RES4LYF's wavelet noise is a perfect-reconstruction round trip: the z-scored Gaussian draw.
    #[test]
    fn wavelet_is_the_z_scored_gaussian() {
        let g = generate(NoiseType::Gaussian, [2, 8, 8], 3, 1).unwrap();
        let wv = generate(NoiseType::parse("wavelet").unwrap(), [2, 8, 8], 3, 1).unwrap();
        let (m, _, _) = moments(&g);
        let sd = (g.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (g.len() as f64 - 1.0)).sqrt();
        for (a, b) in wv.iter().zip(&g) {
            assert!((a - (b - m) / sd).abs() < 1e-12);
        }
    }

    /// The pyramid octaves are drawn at 2^(i+1) times the resolution; we evaluate only the taps the
    /// downsampling reads. Check against generating every octave in full and downsampling it (torch's
    /// 'nearest': source index dst * r).
    #[test]
    fn pyramid_nearest_matches_full_resolution_octaves() {
        let (c, h, w) = (2, 4, 6);
        let n = c * h * w;
        let total: usize = (1..=5).map(|k| n << (2 * k)).sum();
        let mut all = vec![0.0f64; total];
        fill_normal_host(&mut all, 9, 1);
        let mut want = vec![0.0; n];
        let mut base = 0;
        for i in 0..5usize {
            let r = 1 << (i + 1);
            let (hh, ww) = (h * r, w * r);
            for ch in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        want[(ch * h + y) * w + x] += all[base + (ch * hh + y * r) * ww + x * r]
                            * 0.5f64.powi(i as i32)
                            * 0.8f64.powi(i as i32);
                    }
                }
            }
            base += n << (2 * (i + 1));
        }
        let m = want.iter().sum::<f64>() / n as f64;
        let s = (want.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n as f64 - 1.0)).sqrt();
        let got = generate(
            NoiseType::parse("pyramid-nearest").unwrap(),
            [c, h, w],
            9,
            1,
        )
        .unwrap();
        for k in 0..n {
            assert!((got[k] - want[k] / s).abs() < 1e-12, "[{k}]");
        }
    }
}

/// RES4LYF's per-channel z-score of SDE noise equals its own `normalize_zscore(channelwise=True)`
/// (scripts/golden/samplers_res4lyf_noise.py), and the wrapper applies it to every draw.
#[test]
fn zscore_planes_match_res4lyf() {
    use trt_diff::samplers::noise::{NoiseSource, PhiloxNoise, ZScorePlanes, zscore_planes};
    let g = golden("res4lyf_noise.json");
    let f = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let cases = g["zscore"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        let shape: Vec<usize> = f(&c["shape"]).iter().map(|&v| v as usize).collect();
        let plane = shape[shape.len() - 2] * shape[shape.len() - 1];
        let mut x = f(&c["x"]);
        zscore_planes(&mut x, plane).unwrap();
        for (i, (a, b)) in x.iter().zip(f(&c["out"])).enumerate() {
            assert!(
                (a - b).abs() < 1e-13,
                "{shape:?}[{i}]: ours {a}, RES4LYF {b}"
            );
        }
    }
    // The wrapper: each 64-element plane of a Philox draw comes out with mean 0 and unbiased std 1.
    let mut src = ZScorePlanes {
        inner: PhiloxNoise::new(7),
        plane: 64,
    };
    let mut z = vec![0.0f32; 4 * 64];
    src.sample(&mut z, 2.0, 1.0).unwrap();
    for p in z.chunks(64) {
        let m = p.iter().map(|&v| v as f64).sum::<f64>() / 64.0;
        let v = p.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / 63.0;
        assert!(m.abs() < 1e-6 && (v - 1.0).abs() < 1e-5, "mean {m} var {v}");
    }
    let mut bad = vec![0.0f32; 10];
    let err = src.sample(&mut bad, 2.0, 1.0).unwrap_err().to_string();
    assert!(err.contains("divide the buffer length 10"), "{err}");
}

/// The Philox normals (f32 Box-Muller with our own log/sin/cos) are standard normal: moments, a
/// Kolmogorov-Smirnov test, tail frequencies, pair independence and a uniform Box-Muller angle, on 2^21 values.
/// Thresholds are 5 standard errors (KS: the 1% critical value).
mod gaussian_quality {
    use trt_diff::samplers::noise::fill_normal_host;

    /// erfc with fractional error < 1.2e-7 (Chebyshev fit, Numerical Recipes' erfcc).
    fn erfc(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let c = [
            -1.26551223,
            1.00002368,
            0.37409196,
            0.09678418,
            -0.18628806,
            0.27886807,
            -1.13520398,
            1.48851587,
            -0.82215223,
            0.17087277,
        ];
        let poly = c.iter().rev().fold(0.0, |acc, &k| acc * t + k);
        let r = t * (-z * z + poly).exp();
        if x >= 0.0 { r } else { 2.0 - r }
    }

    fn phi(x: f64) -> f64 {
        0.5 * erfc(-x / std::f64::consts::SQRT_2)
    }

    #[test]
    fn philox_normals_pass_moments_ks_and_tails() {
        let n = 1usize << 21;
        let mut v32 = vec![0f32; n];
        fill_normal_host(&mut v32, 2026, 5);
        let v: Vec<f64> = v32.iter().map(|&x| x as f64).collect();
        let nf = n as f64;
        let m = v.iter().sum::<f64>() / nf;
        let c = |k: i32| v.iter().map(|x| (x - m).powi(k)).sum::<f64>() / nf;
        let (var, skew, kurt) = (c(2), c(3) / c(2).powf(1.5), c(4) / (c(2) * c(2)) - 3.0);
        let se = |k: f64| 5.0 * (k / nf).sqrt();
        assert!(m.abs() < se(1.0), "mean {m}");
        assert!((var - 1.0).abs() < se(2.0), "variance {var}");
        assert!(skew.abs() < se(6.0), "skewness {skew}");
        assert!(kurt.abs() < se(24.0), "excess kurtosis {kurt}");

        let mut s = v.clone();
        s.sort_by(f64::total_cmp);
        let d = s
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = phi(x);
                (f - i as f64 / nf)
                    .abs()
                    .max(((i + 1) as f64 / nf - f).abs())
            })
            .fold(0.0, f64::max);
        println!(
            "mean {m:.2e} var {var:.6} skew {skew:.2e} excess kurtosis {kurt:.2e} KS D {d:.2e} (1% critical {:.2e})",
            1.63 / nf.sqrt()
        );
        assert!(d < 1.63 / nf.sqrt(), "KS distance {d}");

        for t in [1.0, 2.0, 3.0, 4.0, 4.5] {
            let p = erfc(t / std::f64::consts::SQRT_2);
            let count = v.iter().filter(|x| x.abs() > t).count() as f64;
            let sd = (nf * p * (1.0 - p)).sqrt();
            println!("P(|z| > {t}): {count} vs {:.1} expected", nf * p);
            assert!(
                (count - nf * p).abs() < 5.0 * sd + 1.0,
                "P(|z| > {t}): {count} of {n}, expected {}",
                nf * p
            );
        }
        // 32-bit radius input: |z| <= sqrt(2 * 32 ln 2) = 6.66.
        assert!(s[0] > -6.67 && s[n - 1] < 6.67);

        // The two values of a pair (r cos, r sin) are uncorrelated, and their angle is uniform (64 bins,
        // chi-square with 63 degrees of freedom: mean 63, sd 11.2).
        let pairs: Vec<(f64, f64)> = v.chunks(2).map(|p| (p[0], p[1])).collect();
        let np = pairs.len() as f64;
        let corr = pairs.iter().map(|(a, b)| a * b).sum::<f64>() / np;
        assert!(corr.abs() < 5.0 / np.sqrt(), "pair correlation {corr}");
        let mut bins = [0f64; 64];
        for (a, b) in &pairs {
            let t = (b.atan2(*a) / std::f64::consts::TAU + 1.0).fract();
            bins[((t * 64.0) as usize).min(63)] += 1.0;
        }
        let e = np / 64.0;
        let chi2: f64 = bins.iter().map(|o| (o - e) * (o - e) / e).sum();
        println!("pair correlation {corr:.2e}, angle chi-square {chi2:.1} (63 dof)");
        assert!(chi2 < 63.0 + 5.0 * 11.2, "angle chi-square {chi2}");
        // Neighbouring pairs (different words) are uncorrelated too.
        let lag = v.windows(3).step_by(4).map(|w| w[0] * w[2]).sum::<f64>() / (nf / 4.0);
        assert!(
            lag.abs() < 5.0 / (nf / 4.0).sqrt(),
            "lag-2 correlation {lag}"
        );
    }
}

/// Noise type "simplex" equals RES4LYF's `SimplexNoiseGenerator` over the real `opensimplex` package, call by
/// call, and our OpenSimplex equals the package's `noise3` at random points (golden file from
/// scripts/golden/samplers_simplex.py).
#[test]
fn simplex_matches_res4lyf_and_opensimplex() {
    use trt_diff::samplers::noise::NoiseSource;
    use trt_diff::samplers::noise_types::{NoiseType, TypedNoise};
    use trt_diff::samplers::simplex::OpenSimplex;
    let g = golden("simplex.json");
    let points = g["points"].as_array().unwrap();
    assert_eq!(points.len(), 900);
    let mut worst = 0f64;
    for p in points {
        let xyz: Vec<f64> = p["p"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let os = OpenSimplex::new(p["seed"].as_i64().unwrap());
        let ours = os.noise3(xyz[0], xyz[1], xyz[2]);
        worst = worst.max((ours - p["v"].as_f64().unwrap()).abs());
    }
    println!("noise3: max abs difference {worst:e}");
    assert!(worst <= 1e-15, "noise3: max abs difference {worst}");
    let fields = g["fields"].as_array().unwrap();
    assert_eq!(fields.len(), 4);
    let mut worst = 0f64;
    for f in fields {
        let seed = f["seed"].as_u64().unwrap();
        let s: Vec<usize> = f["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let shape = [s[0], s[1], s[2]];
        let mut src = TypedNoise::new(NoiseType::parse("simplex").unwrap(), shape, seed);
        for call in f["calls"].as_array().unwrap() {
            let mut ours = vec![0f64; s.iter().product()];
            NoiseSource::<Vec<f64>>::sample(&mut src, &mut ours, 1.0, 0.5).unwrap();
            for (a, b) in ours.iter().zip(call.as_array().unwrap()) {
                worst = worst.max((a - b.as_f64().unwrap()).abs());
            }
        }
    }
    println!("simplex fields: max abs difference {worst:e}");
    assert!(worst <= 1e-13, "simplex fields: max abs difference {worst}");
}
