//! Per-tensor FP8 weights as ModelOpt's checkpoint export writes them: `scale = amax / 448` (f32),
//! `code = E4M3FN(x / scale)` where the quotient is first rounded to the weight's own dtype (torch divides a
//! bf16 tensor by a 0-dim f32 tensor in bf16); and MXFP8 as the OCP Microscaling spec v1.0 defines it: blocks of 32 along the
//! last axis, a shared E8M0 scale `2^(floor(log2(block_amax)) - 8)` (8 = emax of E4M3), elements `x / scale`
//! rounded to E4M3 with saturation to ±448.
//!
//! Deliberate differences: an all-zero tensor gets scale 1 (ModelOpt divides by 0). ModelOpt's own MXFP8 picks
//! `ceil(log2(amax / 448))` instead of the spec's exponent, so its codes can differ by one binade.
use super::elem::{Elem, amax, par_unit};
use super::minifloat::{E4M3FN, e4m3fn};
use rayon::prelude::*;

pub const MX_BLOCK: usize = 32;

pub fn fp8_scale(amax: f32) -> f32 {
    if amax > 0.0 { amax / 448.0 } else { 1.0 }
}

pub fn quantize_fp8_scalar<T: Elem>(v: &[T]) -> (Vec<u8>, f32) {
    let s = fp8_scale(v.iter().fold(0f32, |m, x| m.max(x.f32().abs())));
    (
        v.iter()
            .map(|x| E4M3FN.encode(T::narrow(x.f32() / s), false))
            .collect(),
        s,
    )
}

pub fn quantize_fp8<T: Elem>(v: &[T]) -> (Vec<u8>, f32) {
    let s = fp8_scale(amax(v));
    let mut out = vec![0u8; v.len()];
    out.par_chunks_mut(1 << 16)
        .zip(v.par_chunks(1 << 16))
        .for_each(|(o, c)| {
            for (d, x) in o.iter_mut().zip(c) {
                *d = e4m3fn(T::narrow(x.f32() / s), false);
            }
        });
    (out, s)
}

/// E8M0 code (biased exponent, 0xFF = NaN) of a block with absolute maximum `amax`.
#[inline(always)]
pub fn mx_scale_code(amax: f32) -> u8 {
    if !amax.is_finite() {
        return 0xFF;
    }
    // floor(log2(amax)) from the exponent field; subnormals and zero land below -127 and are clamped there.
    let e = ((amax.to_bits() >> 23) as i32 - 127).max(-127) - 8;
    (e.clamp(-127, 127) + 127) as u8
}

/// 2^(code - 127) as f32 (code 0 is 2^-127, an f32 subnormal).
pub fn e8m0_decode(code: u8) -> f32 {
    if code == 0xFF {
        f32::NAN
    } else {
        2f32.powi(code as i32 - 127)
    }
}

pub fn quantize_mxfp8_scalar<T: Elem>(v: &[T]) -> (Vec<u8>, Vec<u8>) {
    assert!(v.len().is_multiple_of(MX_BLOCK));
    let mut codes = Vec::with_capacity(v.len());
    let mut scales = Vec::with_capacity(v.len() / MX_BLOCK);
    for b in v.chunks(MX_BLOCK) {
        let s = mx_scale_code(b.iter().fold(0f32, |m, x| m.max(x.f32().abs())));
        scales.push(s);
        let x = e8m0_decode(s);
        codes.extend(b.iter().map(|e| E4M3FN.encode(e.f32() / x, true)));
    }
    (codes, scales)
}

pub fn quantize_mxfp8<T: Elem>(v: &[T]) -> (Vec<u8>, Vec<u8>) {
    assert!(v.len().is_multiple_of(MX_BLOCK));
    let mut codes = vec![0u8; v.len()];
    let mut scales = vec![0u8; v.len() / MX_BLOCK];
    let unit = par_unit(MX_BLOCK);
    codes
        .par_chunks_mut(unit)
        .zip(scales.par_chunks_mut(unit / MX_BLOCK))
        .zip(v.par_chunks(unit))
        .for_each(|((c, s), v)| {
            for ((cb, sb), vb) in c
                .chunks_exact_mut(MX_BLOCK)
                .zip(s.iter_mut())
                .zip(v.chunks_exact(MX_BLOCK))
            {
                let mut x = [0f32; MX_BLOCK];
                for (d, e) in x.iter_mut().zip(vb) {
                    *d = e.f32();
                }
                *sb = mx_scale_code(x.iter().fold(0f32, |m, v| m.max(v.abs())));
                // Multiplying by 2^-e equals dividing by 2^e (both exact), and 2^-e stays a normal f32.
                let inv = if *sb == 0xFF {
                    f32::NAN
                } else {
                    f32::from_bits((254 - *sb as u32) << 23)
                };
                for (d, e) in cb.iter_mut().zip(x) {
                    *d = e4m3fn(e * inv, true);
                }
            }
        });
    (codes, scales)
}
