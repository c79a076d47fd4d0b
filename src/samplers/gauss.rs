//! Standard normals from Philox words: Box-Muller in f32 with our own logarithm and sine/cosine, written as a
//! fixed sequence of IEEE-754 f32 operations (+, *, fused multiply-add, sqrt, integer bit manipulation and
//! round-to-nearest int-to-float conversions), so that the host (this file) and the CUDA kernel
//! (`box_muller` in src/cuda/kernels.cu, the same sequence with `__fmaf_rn`/`__fmul_rn`/`__fadd_rn`) give the
//! same bits, and so that the host is fast (libm's f64 `log` and `sincos` were ~90% of a stochastic step).
//!
//! # The transform of a word pair `(a, b)` (the contract the device kernel reproduces)
//! - radius: `u1 = fma(f32(a), 2^-32, 2^-32)` in (0, 1]; `r = sqrt(-2 * ln_unit(u1))`.
//! - angle: `b` counts 2^-32 turns; `b' = b + 2^29` (wrapping), quadrant `q = b' >> 30`, and
//!   `x = f32(i32(b' & (2^30 - 1)) - 2^29) * 2^-32` turns in [-1/8, 1/8); `(s, c) = (sin 2 pi x, cos 2 pi x)`
//!   by minimax polynomials, then rotated by `q` quarter turns (exact swaps and sign flips).
//! - outputs `r * cos`, `r * sin` (each one rounding).
//!
//! Every polynomial coefficient is given by its bit pattern (the kernel uses the same patterns); they come from
//! `scripts/noise_minimax.py` (relative minimax fits, rounded to f32). Accuracy against libm in f64, exhaustive
//! over every input that occurs (`cargo test --release --lib samplers::gauss -- --ignored`): `ln_unit` 0.85 ulp
//! and monotone, sin 0.76 ulp, cos 1.01 ulp. The radius input keeps all 32 bits where it matters (u1 < 2^-8 is
//! exact), so |z| reaches sqrt(64 ln 2) = 6.66 as before; the angle keeps at least 24 bits.
//!
//! The host runs a runtime-dispatched AVX2+FMA path (the batch loops below vectorize) or a portable path; both
//! execute the same operations (`f32::mul_add` is a single-rounding fma on every target: an instruction with the
//! `fma` feature, glibc's exact `fmaf` without it), so they agree bit for bit (tested).

/// 2^-32.
const TWO_M32: f32 = f32::from_bits(0x2f80_0000);
/// Bits of 0.70710677 (~sqrt(1/2)): the mantissa is reduced to [sqrt(1/2), sqrt(2)).
const SQRT_HALF_BITS: u32 = 0x3f35_04f3;
/// ln 2 = LN2_HI + LN2_LO; LN2_HI = 0.693359375 has 10 significant bits, so k * LN2_HI is exact for |k| <= 32.
const LN2_HI: f32 = f32::from_bits(0x3f31_8000);
/// -2.12194442e-4
const LN2_LO: f32 = f32::from_bits(0xb95e_8083);
/// ln(1 + f) = f - f^2/2 + f^3 P(f), f in [sqrt(1/2) - 1, sqrt(2) - 1]; P's coefficients, constant first.
const LOG_P: [f32; 8] = [
    f32::from_bits(0x3eaa_aaaa), // 0.33333331
    f32::from_bits(0xbe80_0113), // -0.2500082
    f32::from_bits(0x3e4c_d004), // 0.20001227
    f32::from_bits(0xbe2a_3925), // -0.16623361
    f32::from_bits(0x3e11_6d1a), // 0.14201775
    f32::from_bits(0xbe06_c291), // -0.13160159
    f32::from_bits(0x3e02_ad5e), // 0.12761447
    f32::from_bits(0xbd9c_5a3b), // -0.076343976
];
/// sin(2 pi x) = x (S1_HI + S1_LO + x^2 (S[0] + x^2 (S[1] + x^2 S[2]))), |x| <= 1/8; S1_HI + S1_LO = 2 pi.
const S1_HI: f32 = f32::from_bits(0x40c9_0fdb); // 6.2831855
const S1_LO: f32 = f32::from_bits(0xb43b_bd2e); // -1.7484555e-7
const SIN_P: [f32; 3] = [
    f32::from_bits(0xc225_5ddf), // -41.34167
    f32::from_bits(0x42a3_3003), // 81.59377
    f32::from_bits(0xc296_e43c), // -75.44577
];
/// cos(2 pi x) = 1 + x^2 (C[0] + x^2 (C[1] + x^2 (C[2] + x^2 C[3]))), |x| <= 1/8.
const COS_P: [f32; 4] = [
    f32::from_bits(0xc19d_e9e6), // -19.739208
    f32::from_bits(0x4281_e0ef), // 64.93932
    f32::from_bits(0xc2aa_e2f0), // -85.44324
    f32::from_bits(0x426c_ead1), // 59.229313
];

/// Natural logarithm of `u` in [2^-32, 1] (any positive normal f32 in fact).
#[inline(always)]
pub fn ln_unit(u: f32) -> f32 {
    let ix = u.to_bits().wrapping_sub(SQRT_HALF_BITS);
    let k = (ix as i32) >> 23;
    let m = f32::from_bits((ix & 0x007f_ffff).wrapping_add(SQRT_HALF_BITS));
    // Exact (Sterbenz): m in [sqrt(1/2), sqrt(2)).
    let f = m - 1.0;
    let kf = k as f32;
    let z = f * f;
    let mut p = LOG_P[7];
    for c in LOG_P[..7].iter().rev() {
        p = p.mul_add(f, *c);
    }
    let y = (z * f).mul_add(p, kf * LN2_LO);
    let y = (-0.5f32).mul_add(z, y);
    kf.mul_add(LN2_HI, f + y)
}

/// `(sin, cos)` of `2 pi b / 2^32` (b in 2^-32 turns).
#[inline(always)]
pub fn sincos_turns(b: u32) -> (f32, f32) {
    let b1 = b.wrapping_add(1 << 29);
    let q = b1 >> 30;
    let j = (b1 & 0x3fff_ffff) as i32 - (1 << 29);
    let x = j as f32 * TWO_M32;
    let x2 = x * x;
    let p = SIN_P[2].mul_add(x2, SIN_P[1]).mul_add(x2, SIN_P[0]);
    let s = x.mul_add(S1_HI, x * x2.mul_add(p, S1_LO));
    let cp = COS_P[3]
        .mul_add(x2, COS_P[2])
        .mul_add(x2, COS_P[1])
        .mul_add(x2, COS_P[0]);
    let c = x2.mul_add(cp, 1.0);
    // Rotate by q quarter turns: odd q swaps sin and cos; sin is negated for q = 2, 3, cos for q = 1, 2.
    let swap = q & 1 == 1;
    let (s, c) = if swap { (c, s) } else { (s, c) };
    let s_sign = (q >> 1) << 31;
    let c_sign = ((q ^ (q >> 1)) & 1) << 31;
    (
        f32::from_bits(s.to_bits() ^ s_sign),
        f32::from_bits(c.to_bits() ^ c_sign),
    )
}

/// Box-Muller of one word pair: `(r cos, r sin)` (see the module docs).
#[inline(always)]
fn box_muller_inline(a: u32, b: u32) -> (f32, f32) {
    let u1 = (a as f32).mul_add(TWO_M32, TWO_M32);
    let r = (-2.0 * ln_unit(u1)).sqrt();
    let (s, c) = sincos_turns(b);
    (r * c, r * s)
}

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    // std caches the CPUID answers.
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn box_muller_fma(a: u32, b: u32) -> (f32, f32) {
    box_muller_inline(a, b)
}

/// Box-Muller of one word pair (the same bits as the batch fill and the device kernel).
pub fn box_muller(a: u32, b: u32) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { box_muller_fma(a, b) };
    }
    box_muller_inline(a, b)
}

/// Philox blocks per batch (4 words each, so 2 * LANES Box-Muller pairs: 8 AVX2 vectors; 32 measured ~15%
/// faster than 16).
const LANES: usize = 32;
const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

/// Normals of Philox blocks `first, first + 1, ...` (the layout of `super::noise`): element `4 l + t` of `out`
/// is word pair `t / 2` of block `first + l`, cos for even t, sin for odd t.
#[inline(always)]
fn batch(key: [u32; 2], stream: u64, first: u64, out: &mut [f32; 4 * LANES]) {
    let mut c0 = [0u32; LANES];
    let mut c1 = [0u32; LANES];
    let mut c2 = [stream as u32; LANES];
    let mut c3 = [(stream >> 32) as u32; LANES];
    for l in 0..LANES {
        let q = first.wrapping_add(l as u64);
        c0[l] = q as u32;
        c1[l] = (q >> 32) as u32;
    }
    let [mut k0, mut k1] = key;
    for r in 0..10 {
        if r > 0 {
            k0 = k0.wrapping_add(W0);
            k1 = k1.wrapping_add(W1);
        }
        for l in 0..LANES {
            // The low halves as 32-bit products: LLVM vectorizes these better than truncating the u64 product.
            let hi0 = ((M0 as u64 * c0[l] as u64) >> 32) as u32;
            let hi1 = ((M1 as u64 * c2[l] as u64) >> 32) as u32;
            let lo0 = c0[l].wrapping_mul(M0);
            let lo1 = c2[l].wrapping_mul(M1);
            c0[l] = hi1 ^ c1[l] ^ k0;
            c1[l] = lo1;
            c2[l] = hi0 ^ c3[l] ^ k1;
            c3[l] = lo0;
        }
    }
    // Pairs (w0, w1) of every block, then (w2, w3).
    let mut a = [0u32; 2 * LANES];
    let mut b = [0u32; 2 * LANES];
    a[..LANES].copy_from_slice(&c0);
    a[LANES..].copy_from_slice(&c2);
    b[..LANES].copy_from_slice(&c1);
    b[LANES..].copy_from_slice(&c3);
    let mut zc = [0f32; 2 * LANES];
    let mut zs = [0f32; 2 * LANES];
    for i in 0..2 * LANES {
        let (c, s) = box_muller_inline(a[i], b[i]);
        zc[i] = c;
        zs[i] = s;
    }
    for l in 0..LANES {
        out[4 * l] = zc[l];
        out[4 * l + 1] = zs[l];
        out[4 * l + 2] = zc[LANES + l];
        out[4 * l + 3] = zs[LANES + l];
    }
}

#[inline(always)]
fn fill_inline<T: Copy, F: Fn(f32) -> T + Copy>(
    out: &mut [T],
    key: [u32; 2],
    stream: u64,
    first: u64,
    cast: F,
) {
    let mut buf = [0f32; 4 * LANES];
    for (i, chunk) in out.chunks_mut(4 * LANES).enumerate() {
        batch(
            key,
            stream,
            first.wrapping_add((i * LANES) as u64),
            &mut buf,
        );
        for (o, &z) in chunk.iter_mut().zip(&buf) {
            *o = cast(z);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn fill_fma<T: Copy, F: Fn(f32) -> T + Copy>(
    out: &mut [T],
    key: [u32; 2],
    stream: u64,
    first: u64,
    cast: F,
) {
    fill_inline(out, key, stream, first, cast)
}

/// Standard normals of Philox `(key, stream)` starting at block `first` (element `4 * first` of the stream),
/// each converted by `cast`; the AVX2+FMA path when the CPU has it.
pub fn fill<T: Copy, F: Fn(f32) -> T + Copy>(
    out: &mut [T],
    key: [u32; 2],
    stream: u64,
    first: u64,
    cast: F,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { fill_fma(out, key, stream, first, cast) };
    }
    fill_inline(out, key, stream, first, cast)
}

/// [`fill`] without the AVX2 path (tests compare the two).
pub fn fill_portable<T: Copy, F: Fn(f32) -> T + Copy>(
    out: &mut [T],
    key: [u32; 2],
    stream: u64,
    first: u64,
    cast: F,
) {
    fill_inline(out, key, stream, first, cast)
}

/// Standard normals for elements `[0, out.len())` of stream `stream` of `seed`. Large buffers are filled by
/// several threads; element values do not depend on the split (counter-based generator).
pub fn fill_normal_host<T: Copy + Send + From<f32>>(out: &mut [T], seed: u64, stream: u64) {
    let threads = if out.len() >= 1 << 16 {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(16))
    } else {
        1
    };
    // Chunks are whole Philox blocks (multiples of 4 elements).
    let chunk = out.len().div_ceil(threads).div_ceil(4) * 4;
    if threads <= 1 || chunk == 0 {
        fill_normal_range(out, seed, stream, 0);
        return;
    }
    std::thread::scope(|sc| {
        for (k, part) in out.chunks_mut(chunk).enumerate() {
            sc.spawn(move || fill_normal_range(part, seed, stream, (k * chunk / 4) as u64));
        }
    });
}

pub(crate) fn fill_normal_range<T: Copy + Send + From<f32>>(
    out: &mut [T],
    seed: u64,
    stream: u64,
    first_block: u64,
) {
    let key = [seed as u32, (seed >> 32) as u32];
    fill(out, key, stream, first_block, T::from);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samplers::noise::philox4x32_10;

    /// Distance in f32 ulps of the reference's binade (subnormal-free here).
    fn ulps(ours: f32, reference: f64) -> f64 {
        if reference == 0.0 {
            return if ours == 0.0 { 0.0 } else { f64::INFINITY };
        }
        let e = reference.abs().log2().floor();
        (ours as f64 - reference).abs() / 2f64.powf(e - 23.0)
    }

    /// Max ulp error of `ln_unit` over every `step`-th f32 in [2^-32, 1], and whether it is monotone there.
    fn ln_sweep(step: usize) -> (f64, bool) {
        let (lo, hi) = (TWO_M32.to_bits(), 1f32.to_bits());
        let mut worst = 0f64;
        let mut prev = f32::NEG_INFINITY;
        let mut monotone = true;
        for bits in (lo..=hi).step_by(step).chain([hi]) {
            let u = f32::from_bits(bits);
            let ours = ln_unit(u);
            worst = worst.max(ulps(ours, (u as f64).ln()));
            monotone &= ours >= prev;
            prev = ours;
        }
        (worst, monotone)
    }

    /// Max ulp errors of sin and cos over the first quadrant's inputs `x = f32(j) 2^-32`, |j| <= 2^29, for
    /// every `step`-th f32 value of |j| (each with both signs).
    fn sincos_sweep(step: usize) -> (f64, f64) {
        let (mut ws, mut wc) = (0f64, 0f64);
        let top = ((1u32 << 29) as f32).to_bits();
        for bits in (1f32.to_bits()..=top).step_by(step).chain([0, top]) {
            let m = f32::from_bits(bits) as i64;
            for j in [m, -m] {
                if j == 1 << 29 {
                    continue;
                }
                let (s, c) = sincos_turns(j as i32 as u32);
                let a = std::f64::consts::TAU * j as f64 * 2f64.powi(-32);
                ws = ws.max(ulps(s, a.sin()));
                wc = wc.max(ulps(c, a.cos()));
            }
        }
        (ws, wc)
    }

    #[test]
    fn log_and_sincos_are_accurate_sampled() {
        let (l, mono) = ln_sweep(1009);
        assert!(l <= 0.9 && mono, "ln: {l} ulp, monotone {mono}");
        let (s, c) = sincos_sweep(97);
        assert!(s <= 0.8 && c <= 1.05, "sin {s} ulp, cos {c} ulp");
    }

    /// Every input: `cargo test --release --lib samplers::gauss -- --ignored --nocapture` (about 40 s).
    /// Measured: ln_unit 0.848 ulp (monotone), sin 0.762 ulp, cos 1.009 ulp.
    #[test]
    #[ignore]
    fn log_and_sincos_are_accurate_exhaustive() {
        let (l, mono) = ln_sweep(1);
        let (s, c) = sincos_sweep(1);
        println!(
            "ln_unit max {l:.3} ulp (monotone {mono}); sin max {s:.3} ulp, cos max {c:.3} ulp"
        );
        assert!(l <= 0.9 && mono && s <= 0.8 && c <= 1.05);
    }

    struct XorShift(u64);
    impl XorShift {
        fn next(&mut self) -> u32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 32) as u32
        }
    }

    /// The whole transform against an f64 libm Box-Muller of the same radius input (u1 rounded to f32 as the
    /// contract says) and the exact angle 2 pi b / 2^32: every quadrant, signs included.
    #[test]
    fn box_muller_matches_libm_f64() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut worst = 0f64;
        let words = (0..200_000).map(|_| (rng.next(), rng.next())).chain([
            (0, 0),
            (u32::MAX, u32::MAX),
            (0, 1 << 30),
            (7, 3 << 30),
        ]);
        for (a, b) in words {
            let (zc, zs) = box_muller(a, b);
            let u1 = ((a as f32) as f64 + 1.0) as f32 as f64 * 2f64.powi(-32);
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * b as f64 * 2f64.powi(-32);
            // Error in units of r's ulp, less the angle's input rounding (|j| to 24 bits: <= 2^-29 rad).
            let ulp_r = 2f64.powf(r.log2().floor() - 23.0);
            for (z, want) in [(zc, r * t.cos()), (zs, r * t.sin())] {
                let e = ((z as f64 - want).abs() - r * 2f64.powi(-29)).max(0.0) / ulp_r;
                worst = worst.max(e);
            }
        }
        assert!(worst <= 2.0, "max error {worst} ulp of r");
    }

    #[test]
    fn batch_equals_scalar_philox_and_box_muller() {
        for (seed, stream, first) in [
            (0u64, 0u64, 0u64),
            (42, 7, 3),
            (0xDEAD_BEEF_1234, 1 << 33, (1 << 32) - 5),
        ] {
            let key = [seed as u32, (seed >> 32) as u32];
            let n = 4 * LANES * 3 + 6;
            let mut got = vec![0f32; n];
            fill(&mut got, key, stream, first, |z| z);
            for (e, &g) in got.iter().enumerate() {
                let q = first + e as u64 / 4;
                let w = philox4x32_10(
                    [
                        q as u32,
                        (q >> 32) as u32,
                        stream as u32,
                        (stream >> 32) as u32,
                    ],
                    key,
                );
                let t = e % 4;
                let (c, s) = box_muller(w[t & 2], w[(t & 2) + 1]);
                let want = if t % 2 == 0 { c } else { s };
                assert_eq!(g.to_bits(), want.to_bits(), "element {e}");
            }
        }
    }

    #[test]
    fn portable_path_equals_dispatched_path() {
        let key = [0x1234_5678, 0x9abc_def0];
        let n = 1 << 18;
        let mut a = vec![0f32; n];
        let mut b = vec![0f32; n];
        fill(&mut a, key, 5, 11, |z| z);
        fill_portable(&mut b, key, 5, 11, |z| z);
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let mut rng = XorShift(77);
        for _ in 0..100_000 {
            let (x, y) = (rng.next(), rng.next());
            let (p, q) = box_muller_inline(x, y);
            let (r, s) = box_muller(x, y);
            assert_eq!((p.to_bits(), q.to_bits()), (r.to_bits(), s.to_bits()));
        }
    }
}
