//! NVFP4 weights as TensorRT consumes them: E2M1 elements in 16-element blocks along the last axis, an E4M3 scale
//! per block and one fp32 global scale, computed exactly as NVIDIA ModelOpt's `NVFP4QTensor.quantize` does:
//!
//! - global `sw = amax / (6 * 448)` (f32);
//! - block scale `s = block_amax / (6 * sw)`, 0 replaced by 1, clamped to [2^-9, 448], rounded to E4M3;
//! - element `q = x / (E4M3(s) * sw)` cast to E2M1 by ModelOpt's bucket rule (ties to even, `-0.0` and values
//!   that are negative only in sign keep the sign only when `x < 0`).
//!
//! The one deliberate difference: an all-zero tensor gets `sw = 1` where ModelOpt divides 0 by 0 and writes NaN
//! block scales; here it dequantizes to zeros.
use super::elem::{Elem, amax, block_amax, par_unit};
use super::minifloat::{E4M3FN, e4m3fn, e4m3fn_value};
use rayon::prelude::*;

pub const BLOCK: usize = 16;

/// ModelOpt's E2M1 bucket boundaries; a magnitude equal to an odd-indexed one rounds up (to the even code).
const BOUNDS: [f32; 7] = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0];

pub struct Nvfp4 {
    /// Packed E2M1 codes, element 0 in the low nibble.
    pub packed: Vec<u8>,
    /// E4M3 block scales, one per 16 elements.
    pub block_scales: Vec<u8>,
    pub global_scale: f32,
}

/// The fp32 global scale for a tensor of absolute maximum `amax` (1 for an all-zero tensor).
pub fn global_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / (6.0 * 448.0)
    } else {
        1.0
    }
}

/// The E4M3 code of one block's scale.
#[inline(always)]
fn block_scale(bmax: f32, sw: f32) -> u8 {
    let mut s = bmax / (6.0 * sw);
    if s == 0.0 {
        s = 1.0;
    }
    // f32::clamp keeps NaN, as torch.clamp does.
    e4m3fn(s.clamp(1.0 / 512.0, 448.0), true)
}

/// ModelOpt's `_cast_fp4`: count of boundaries below |q|, plus one at the odd boundaries; sign only if q < 0.
#[inline(always)]
fn cast_fp4(q: f32) -> u8 {
    let a = q.abs();
    let mut ord = 0u8;
    for b in BOUNDS {
        ord += (b < a) as u8;
    }
    ord += (a == 0.75 || a == 1.75 || a == 3.5) as u8;
    ord | (((q < 0.0) as u8) << 3)
}

/// Straightforward one-block-at-a-time version; the reference the fast path is tested against.
pub fn quantize_scalar<T: Elem>(values: &[T]) -> Nvfp4 {
    assert!(
        values.len().is_multiple_of(BLOCK),
        "NVFP4 needs a multiple of {BLOCK} elements"
    );
    let all: Vec<f32> = values.iter().map(|v| v.f32()).collect();
    let sw = global_scale(block_amax(&all));
    let mut codes = Vec::with_capacity(values.len());
    let mut block_scales = Vec::with_capacity(values.len() / BLOCK);
    for block in values.chunks(BLOCK) {
        let x: Vec<f32> = block.iter().map(|v| v.f32()).collect();
        let mut s = block_amax(&x) / (6.0 * sw);
        if s == 0.0 {
            s = 1.0;
        }
        let code = E4M3FN.encode(s.clamp(1.0 / 512.0, 448.0), true);
        block_scales.push(code);
        let scale = E4M3FN.decode(code) * sw;
        codes.extend(block.iter().map(|v| cast_fp4(v.f32() / scale)));
    }
    Nvfp4 {
        packed: super::minifloat::pack_nibbles(&codes),
        block_scales,
        global_scale: sw,
    }
}

/// Quantizes a row-major tensor whose last dimension is a multiple of 16 (the caller checks), in parallel.
pub fn quantize<T: Elem>(values: &[T]) -> Nvfp4 {
    assert!(
        values.len().is_multiple_of(BLOCK),
        "NVFP4 needs a multiple of {BLOCK} elements"
    );
    let sw = global_scale(amax(values));
    let mut packed = vec![0u8; values.len() / 2];
    let mut block_scales = vec![0u8; values.len() / BLOCK];
    let unit = par_unit(BLOCK);
    values
        .par_chunks(unit)
        .zip(packed.par_chunks_mut(unit / 2))
        .zip(block_scales.par_chunks_mut(unit / BLOCK))
        .for_each(|((v, p), s)| {
            let done = blocks_simd(v, sw, p, s);
            quantize_blocks(&v[done..], sw, &mut p[done / 2..], &mut s[done / BLOCK..]);
        });
    Nvfp4 {
        packed,
        block_scales,
        global_scale: sw,
    }
}

/// The leading whole groups of eight blocks through the AVX2 kernel when the CPU has it; returns the elements
/// done.
fn blocks_simd<T: Elem>(v: &[T], sw: f32, packed: &mut [u8], scales: &mut [u8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use super::nvfp4_avx2 as k;
        let kind = match T::DTYPE {
            "F32" => k::F32,
            "BF16" => k::BF16,
            _ => k::F16,
        };
        if k::available(kind) {
            let p = v.as_ptr() as *const u8;
            // SAFETY: the features were checked; `p` holds `v.len()` elements of the kind's type, and the output
            // slices are the caller's units of `v.len() / 2` and `v.len() / 16` bytes.
            return unsafe {
                match kind {
                    k::F32 => k::blocks::<{ k::F32 }>(p, v.len(), sw, packed, scales),
                    k::BF16 => k::blocks::<{ k::BF16 }>(p, v.len(), sw, packed, scales),
                    _ => k::blocks::<{ k::F16 }>(p, v.len(), sw, packed, scales),
                }
            };
        }
    }
    let _ = (v, sw, packed, scales);
    0
}

crate::simd_dispatch! {
    fn quantize_blocks<T: Elem>(v: &[T], sw: f32, packed: &mut [u8], scales: &mut [u8]) {
        let e4m3 = std::array::from_fn::<f32, 256, _>(|c| e4m3fn_value(c as u8));
        for ((block, p), s) in v
            .chunks_exact(BLOCK)
            .zip(packed.chunks_exact_mut(BLOCK / 2))
            .zip(scales.iter_mut())
        {
            let mut x = [0f32; BLOCK];
            for (d, e) in x.iter_mut().zip(block) {
                *d = e.f32();
            }
            *s = block_scale(block_amax(&x), sw);
            let scale = e4m3[*s as usize] * sw;
            let mut c = [0u8; BLOCK];
            for (c, x) in c.iter_mut().zip(x) {
                *c = cast_fp4(x / scale);
            }
            for (out, pair) in p.iter_mut().zip(c.chunks_exact(2)) {
                *out = pair[0] | (pair[1] << 4);
            }
        }
    }
}

/// ModelOpt's decode table: E2M1 values with code 8 as +0.
const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// comfy-kitchen's decode table: code 8 is -0.
const E2M1_SIGNED: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// Values of the packed tensor: E2M1 code * E4M3 block scale * global scale (f32), as ModelOpt dequantizes.
pub fn dequantize(packed: &[u8], block_scales: &[u8], global_scale: f32) -> Vec<f32> {
    dequantize_table(packed, block_scales, global_scale, &E2M1_VALUES)
}

/// [`dequantize`] as comfy-kitchen does it, where code 8 gives -0 (the same numbers; other bits).
pub fn dequantize_signed_zero(packed: &[u8], block_scales: &[u8], global_scale: f32) -> Vec<f32> {
    dequantize_table(packed, block_scales, global_scale, &E2M1_SIGNED)
}

fn dequantize_table(
    packed: &[u8],
    block_scales: &[u8],
    global_scale: f32,
    table: &[f32; 16],
) -> Vec<f32> {
    let mut out = Vec::with_capacity(packed.len() * 2);
    for (i, b) in packed.iter().enumerate() {
        let scale = E4M3FN.decode(block_scales[i * 2 / BLOCK]) * global_scale;
        out.push(table[(b & 0xF) as usize] * scale);
        out.push(table[(b >> 4) as usize] * scale);
    }
    out
}
