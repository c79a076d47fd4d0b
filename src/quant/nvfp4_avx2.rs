//! The NVFP4 block quantizer written with AVX2 intrinsics: eight 16-element blocks per iteration, their scales
//! computed side by side in one vector. The generic loop in `nvfp4.rs` spends most of its time in the scalar
//! per-block scale and the 7-boundary bucket chain; here the bucket is ModelOpt's rule computed as the
//! round-to-nearest-even E2M1 code from the f32 bits (the two agree for every input: `tests/quant_parallel.rs`
//! checks every bf16 value against the scalar reference). Same IEEE operations as the reference, so the same
//! bits.
use super::minifloat::e4m3fn_value;
use std::arch::x86_64::*;

/// Element type codes for [`blocks`]: how eight values are loaded and widened to f32.
pub const F32: u8 = 0;
pub const BF16: u8 = 1;
pub const F16: u8 = 2;

/// Whether the CPU can run [`blocks`] for elements of type `kind`.
pub fn available(kind: u8) -> bool {
    is_x86_feature_detected!("avx2") && (kind != F16 || is_x86_feature_detected!("f16c"))
}

#[inline]
#[target_feature(enable = "avx2,f16c")]
fn load8<const K: u8>(p: *const u8) -> __m256 {
    // SAFETY: callers pass a pointer to 8 readable elements of type K.
    unsafe {
        match K {
            F32 => _mm256_loadu_ps(p as *const f32),
            BF16 => {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            _ => _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
        }
    }
}

/// `[max(a0,a1), max(a2,a3), max(b0,b1), max(b2,b3) | same for lanes 4..8]` on magnitude bits (as `hadd`).
#[inline]
#[target_feature(enable = "avx2")]
fn hmax(a: __m256i, b: __m256i) -> __m256i {
    let (fa, fb) = (_mm256_castsi256_ps(a), _mm256_castsi256_ps(b));
    let even = _mm256_castps_si256(_mm256_shuffle_ps::<0b10_00_10_00>(fa, fb));
    let odd = _mm256_castps_si256(_mm256_shuffle_ps::<0b11_01_11_01>(fa, fb));
    _mm256_max_epu32(even, odd)
}

/// E4M3FN codes (saturating) of eight positive-or-NaN block scales, as `minifloat::e4m3fn(s, true)`.
#[inline]
#[target_feature(enable = "avx2")]
fn e4m3_codes(s: __m256) -> __m256i {
    let a = _mm256_castps_si256(s);
    // Subnormal targets (below 2^-6): steps of 2^-9, rounded to even by the 2^23 trick.
    let steps = _mm256_mul_ps(s, _mm256_set1_ps(512.0));
    let sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(steps, _mm256_set1_ps(8_388_608.0))),
        _mm256_set1_epi32(0x4B00_0000),
    );
    // Normal targets: round the mantissa to 3 bits, ties to even, carrying into the exponent.
    let odd = _mm256_and_si256(_mm256_srli_epi32::<20>(a), _mm256_set1_epi32(1));
    let r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32((1 << 19) - 1)), odd);
    let norm = _mm256_sub_epi32(_mm256_srli_epi32::<20>(r), _mm256_set1_epi32(120 << 3));
    let is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(121 << 23), a);
    let code = _mm256_blendv_epi8(norm, sub, is_sub);
    let code = _mm256_min_epu32(code, _mm256_set1_epi32(0x7E));
    let nan = _mm256_cmpgt_epi32(a, _mm256_set1_epi32(0x7F80_0000));
    _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7F), nan)
}

/// E2M1 codes of q = x / scale by ModelOpt's rule: round to nearest even, saturate at 6, NaN to 0, the sign bit
/// only when q < 0.
#[inline]
#[target_feature(enable = "avx2")]
fn e2m1_codes(q: __m256) -> __m256i {
    let abs = _mm256_and_ps(q, _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF)));
    let a = _mm256_castps_si256(abs);
    // Below 1.0 (E2M1's subnormals): steps of 0.5.
    let steps = _mm256_add_ps(abs, abs);
    let sub = _mm256_sub_epi32(
        _mm256_castps_si256(_mm256_add_ps(steps, _mm256_set1_ps(8_388_608.0))),
        _mm256_set1_epi32(0x4B00_0000),
    );
    let odd = _mm256_and_si256(_mm256_srli_epi32::<22>(a), _mm256_set1_epi32(1));
    let r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32((1 << 21) - 1)), odd);
    let norm = _mm256_sub_epi32(_mm256_srli_epi32::<22>(r), _mm256_set1_epi32(126 << 1));
    let is_sub = _mm256_cmpgt_epi32(_mm256_set1_epi32(127 << 23), a);
    let code = _mm256_blendv_epi8(norm, sub, is_sub);
    let code = _mm256_min_epu32(code, _mm256_set1_epi32(7));
    let not_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_ORD_Q>(q, q));
    let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(q, _mm256_setzero_ps()));
    let sign = _mm256_and_si256(neg, _mm256_set1_epi32(8));
    _mm256_and_si256(_mm256_or_si256(code, sign), not_nan)
}

/// Packs 16 codes (0..16 in each i32 lane, elements 0..8 in `lo`) into 8 bytes, element 2j in the low nibble.
#[inline]
#[target_feature(enable = "avx2")]
fn pack_nibbles(lo: __m256i, hi: __m256i, out: *mut u8) {
    // In each 64-bit lane: element 2j | element 2j+1 << 4 in the low byte.
    let lo = _mm256_or_si256(lo, _mm256_srli_epi64::<28>(lo));
    let hi = _mm256_or_si256(hi, _mm256_srli_epi64::<28>(hi));
    let both = _mm256_or_si256(
        _mm256_and_si256(lo, _mm256_set1_epi64x(0xFF)),
        _mm256_slli_epi64::<8>(_mm256_and_si256(hi, _mm256_set1_epi64x(0xFF))),
    );
    // Each 128-bit lane: bytes 0, 8 (lo) and 1, 9 (hi) -> [lo, lo, hi, hi] in its first dword.
    let sel = _mm256_setr_epi8(
        0, 8, 1, 9, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 8, 1, 9, -1, -1, -1, -1, -1,
        -1, -1, -1, -1, -1, -1, -1,
    );
    let g = _mm256_shuffle_epi8(both, sel);
    let bytes = _mm_unpacklo_epi16(_mm256_castsi256_si128(g), _mm256_extracti128_si256::<1>(g));
    // SAFETY: callers pass 8 writable bytes.
    unsafe { _mm_storel_epi64(out as *mut __m128i, bytes) };
}

/// Quantizes the whole groups of eight 16-element blocks of `v` (elements of type `K`, `n` of them, a multiple
/// of 128) with global scale `sw`; returns how many elements it did (the caller finishes the rest).
///
/// # Safety
/// The CPU must support AVX2 (and F16C for `F16`): check [`available`]. `v` must hold `n` elements of type `K`,
/// `packed` `n / 2` bytes and `scales` `n / 16`.
#[target_feature(enable = "avx2,f16c")]
pub unsafe fn blocks<const K: u8>(
    v: *const u8,
    n: usize,
    sw: f32,
    packed: &mut [u8],
    scales: &mut [u8],
) -> usize {
    let size = if K == F32 { 4 } else { 2 };
    let table: [f32; 256] = std::array::from_fn(|c| e4m3fn_value(c as u8));
    let six_sw = _mm256_set1_ps(6.0 * sw);
    let sw_v = _mm256_set1_ps(sw);
    let mag = _mm256_set1_epi32(0x7FFF_FFFF);
    let groups = n / 128;
    for g in 0..groups {
        let base = g * 128;
        let mut x = [_mm256_setzero_ps(); 16];
        let mut m = [_mm256_setzero_si256(); 8];
        for b in 0..8 {
            // SAFETY: base + 16 b + 16 <= n elements.
            let p = unsafe { v.add((base + 16 * b) * size) };
            x[2 * b] = load8::<K>(p);
            x[2 * b + 1] = load8::<K>(unsafe { p.add(8 * size) });
            m[b] = _mm256_max_epu32(
                _mm256_and_si256(_mm256_castps_si256(x[2 * b]), mag),
                _mm256_and_si256(_mm256_castps_si256(x[2 * b + 1]), mag),
            );
        }
        let h0 = hmax(hmax(m[0], m[1]), hmax(m[2], m[3]));
        let h1 = hmax(hmax(m[4], m[5]), hmax(m[6], m[7]));
        let bmax = _mm256_max_epu32(
            _mm256_permute2x128_si256::<0x20>(h0, h1),
            _mm256_permute2x128_si256::<0x31>(h0, h1),
        );
        // s = bmax / (6 sw); 0 -> 1; clamp to [2^-9, 448] keeping NaN (f32::clamp); E4M3; decoded * sw.
        let mut s = _mm256_div_ps(_mm256_castsi256_ps(bmax), six_sw);
        let zero = _mm256_cmp_ps::<_CMP_EQ_OQ>(s, _mm256_setzero_ps());
        s = _mm256_blendv_ps(s, _mm256_set1_ps(1.0), zero);
        let lo = _mm256_set1_ps(1.0 / 512.0);
        s = _mm256_blendv_ps(s, lo, _mm256_cmp_ps::<_CMP_LT_OQ>(s, lo));
        let hi = _mm256_set1_ps(448.0);
        s = _mm256_blendv_ps(s, hi, _mm256_cmp_ps::<_CMP_GT_OQ>(s, hi));
        let codes = e4m3_codes(s);
        // SAFETY: codes are 0..=0x7F, inside the 256-entry table.
        let scale = _mm256_mul_ps(
            unsafe { _mm256_i32gather_ps::<4>(table.as_ptr(), codes) },
            sw_v,
        );
        let mut c = [0u32; 8];
        // SAFETY: 8 u32s.
        unsafe { _mm256_storeu_si256(c.as_mut_ptr() as *mut __m256i, codes) };
        for (d, c) in scales[base / 16..base / 16 + 8].iter_mut().zip(c) {
            *d = c as u8;
        }
        for b in 0..8 {
            let sc = _mm256_permutevar8x32_ps(scale, _mm256_set1_epi32(b as i32));
            let qa = e2m1_codes(_mm256_div_ps(x[2 * b], sc));
            let qb = e2m1_codes(_mm256_div_ps(x[2 * b + 1], sc));
            let out = &mut packed[(base + 16 * b) / 2..(base + 16 * b) / 2 + 8];
            pack_nibbles(qa, qb, out.as_mut_ptr());
        }
    }
    groups * 128
}
