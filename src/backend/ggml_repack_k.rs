//! Q4_K and Q6_K repacked eight rows interleaved ([`super::ggml_repack`]), with kernels that take up to four
//! activation rows at once: the integer GEMM that prefill needs (as llama.cpp's `q4_K_8x8` repacked GEMM) and the
//! decode GEMV. Unpacking a weight register's nibbles, its scales and its high bits is paid once for the four
//! activation rows, and each 4-byte activation chunk, broadcast, multiplies eight rows in one `maddubs`.
//!
//! A group block (256 elements of each of eight rows) holds, for Q4_K (1184 bytes, the file's 1152 plus the
//! widened scale bytes):
//! - bytes 0..16 the eight rows' `d` (f16), 16..32 their `dmin`;
//! - 32..96 the 6-bit scales and 96..160 the 6-bit mins as bytes, sub-block `s` (32 elements) at `8s`, row `r` at
//!   `+ r`;
//! - from 160, per sub-block 128 bytes: four vectors of nibbles, vector `j` holding chunk `j` in its low and chunk
//!   `j + 4` in its high nibbles, where chunk `c`'s byte `i` is row `i / 4`, element `32s + 4c + i % 4`.
//!
//! and for Q6_K (1680 bytes, as the file's eight blocks):
//! - bytes 0..16 the rows' `d` (f16); 16..144 the i8 scales, sub-block `s` (16 elements) at `8s`, row `r` at
//!   `+ r`;
//! - from 144, per sub-block 96 bytes: two vectors of low nibbles (chunks 0 and 1, then 2 and 3, low nibble first)
//!   and one vector whose byte `i` holds the two high bits of chunk `c`'s byte `i` at bits `2c`; chunk `c`'s byte
//!   `i` is row `i / 4`, element `16s + 4c + i % 4`.
//!
//! Values are the file's unsigned ones (Q4_K 0..15, Q6_K 0..63); Q4_K's mins and Q6_K's offset of 32 come off
//! through the activation's 16-value sums, as in ggml. The integers are ggml's; the sums are scaled and added in a
//! different order.
use super::ggml_blocks::Quant;

/// Bytes of a group block.
pub fn group_block_bytes(q: Quant) -> usize {
    match q {
        Quant::Q4K => 1184,
        _ => 1680,
    }
}

/// Sub-block `s`'s 6-bit scale and min in a Q4_K block (ggml's `get_scale_min_k4`).
fn q4_k_scale_min(blk: &[u8], s: usize) -> (u8, u8) {
    let q = &blk[4..16];
    if s < 4 {
        (q[s] & 63, q[s + 4] & 63)
    } else {
        (
            (q[s + 4] & 0xF) | ((q[s - 4] >> 6) << 4),
            (q[s + 4] >> 4) | ((q[s] >> 6) << 4),
        )
    }
}

fn word(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

const LOW: u32 = 0x0F0F_0F0F;

/// Packs eight rows (`w`, rows of `rb` bytes in the file's layout) into `out` (`nb` group blocks). Four elements of
/// a row are one 32-bit word of the layout, so rows are rearranged a word at a time.
pub fn pack_group(q: Quant, w: &[u8], nb: usize, out: &mut [u8]) {
    let (rb, bb, gb) = (w.len() / 8, q.block_bytes(), group_block_bytes(q));
    for (b, out) in out.chunks_exact_mut(gb).take(nb).enumerate() {
        let mut put = |at: usize, r: usize, v: u32| {
            out[at + 4 * r..at + 4 * r + 4].copy_from_slice(&v.to_le_bytes())
        };
        for r in 0..8 {
            let blk = &w[r * rb + b * bb..][..bb];
            if q == Quant::Q4K {
                // Sub-block s (elements 32s..32s + 32) is nibble s % 2 of bytes 16 + 32 * (s / 2)...
                for s in 0..8 {
                    let nibbles = |c: usize| {
                        let v = word(blk, 16 + 32 * (s / 2) + 4 * c);
                        if s % 2 == 0 { v & LOW } else { (v >> 4) & LOW }
                    };
                    for j in 0..4 {
                        put(160 + 128 * s + 32 * j, r, nibbles(j) | nibbles(j + 4) << 4);
                    }
                }
            } else {
                // Element e: low nibble bits of byte 64h + 32 (quarter & 1) + e % 32 (high nibble from quarter 2),
                // two high bits at 2 * quarter of byte 128 + 32h + e % 32; h = e / 128, quarter = e % 128 / 32.
                for s in 0..16 {
                    let (h, quarter, l0) = (s / 8, s % 8 / 2, 16 * (s % 2));
                    let nibbles = |c: usize| {
                        let v = word(blk, 64 * h + 32 * (quarter & 1) + l0 + 4 * c);
                        if quarter < 2 { v & LOW } else { (v >> 4) & LOW }
                    };
                    let high = |c: usize| {
                        (word(blk, 128 + 32 * h + l0 + 4 * c) >> (2 * quarter)) & 0x0303_0303
                    };
                    let at = 144 + 96 * s;
                    put(at, r, nibbles(0) | nibbles(1) << 4);
                    put(at + 32, r, nibbles(2) | nibbles(3) << 4);
                    put(
                        at + 64,
                        r,
                        high(0) | high(1) << 2 | high(2) << 4 | high(3) << 6,
                    );
                }
            }
        }
        for r in 0..8 {
            let blk = &w[r * rb + b * bb..][..bb];
            if q == Quant::Q4K {
                out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
                out[16 + 2 * r..16 + 2 * r + 2].copy_from_slice(&blk[2..4]);
                for s in 0..8 {
                    let (sc, m) = q4_k_scale_min(blk, s);
                    out[32 + 8 * s + r] = sc;
                    out[96 + 8 * s + r] = m;
                }
            } else {
                out[2 * r..2 * r + 2].copy_from_slice(&blk[208..210]);
                for s in 0..16 {
                    out[16 + 8 * s + r] = blk[192 + s];
                }
            }
        }
    }
}

/// One quantized activation row as the packed kernels read it: values, block scales, and the block sums that
/// take off the unsigned offsets (per 32 values for Q8_0 blocks, per 16 for Q8_K).
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub sums: &'a [i32],
    pub bsums: &'a [i16],
    pub bsums32: &'a [i16],
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::ActRow;
    use std::arch::x86_64::*;

    /// Activation values `4c..4c + 4` from `y` repeated over the register, against a chunk of eight rows.
    #[inline(always)]
    pub(in crate::backend) unsafe fn chunk_of(y: *const i8, c: usize) -> __m256i {
        unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(y.add(4 * c).cast::<i32>())) }
    }

    /// Eight bytes at `p` (one per row) widened to 16 bits, each twice: the pairs `madd` multiplies.
    #[inline(always)]
    unsafe fn row_pairs<const SIGNED: bool>(p: *const u8) -> __m256i {
        unsafe {
            let dup = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
            let v = _mm_shuffle_epi8(_mm_loadl_epi64(p.cast()), dup);
            if SIGNED {
                _mm256_cvtepi8_epi16(v)
            } else {
                _mm256_cvtepu8_epi16(v)
            }
        }
    }

    /// Two sub-blocks' bytes (at `p` and `p + 8`, one per row) widened to 16 bits and interleaved per row.
    #[inline(always)]
    unsafe fn row_pairs_of_two<const SIGNED: bool>(p: *const u8) -> __m256i {
        unsafe {
            let v = _mm_unpacklo_epi8(_mm_loadl_epi64(p.cast()), _mm_loadl_epi64(p.add(8).cast()));
            if SIGNED {
                _mm256_cvtepi8_epi16(v)
            } else {
                _mm256_cvtepu8_epi16(v)
            }
        }
    }

    /// Asks for the cache lines `PREFETCH_BYTES` past the `len` bytes at `p`: the weights stream from memory once per
    /// token, and the hardware prefetcher alone leaves the loads waiting (perf: most samples on them).
    #[inline(always)]
    pub(in crate::backend) unsafe fn prefetch_ahead(p: *const u8, len: usize) {
        let ahead = p.wrapping_add(PREFETCH_BYTES);
        let mut o = 0;
        while o < len {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(o).cast()) };
            o += 64;
        }
    }

    /// How far ahead of the weights being read [`prefetch_ahead`] asks: 8 KB gave 28 tok/s on the Llama-3.2-1B-shaped
    /// Q4_K_M file against 22-25 with no prefetch and 25-27 at 1-4 KB (2 threads, AMD EPYC).
    const PREFETCH_BYTES: usize = 8192;

    /// Two consecutive sums of an activation block (i16) as one 32-bit lane, repeated.
    #[inline(always)]
    unsafe fn sums_of(bsums: *const i16) -> __m256i {
        unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(bsums.cast::<i32>())) }
    }

    /// Per activation row `c`, per weight row: the sum over `2 * pairs` sub-blocks of the row's byte (at `p`, eight
    /// per sub-block) times the sub-block's activation sum (`sums[c]`, i16, one per sub-block).
    #[inline(always)]
    unsafe fn sub_block_sums<const N: usize, const SIGNED: bool>(
        p: *const u8,
        pairs: usize,
        sums: [*const i16; N],
    ) -> [__m256i; N] {
        unsafe {
            let mut acc = [_mm256_setzero_si256(); N];
            for t in 0..pairs {
                let bytes = row_pairs_of_two::<SIGNED>(p.add(16 * t));
                for c in 0..N {
                    let s = sums_of(sums[c].add(2 * t));
                    acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(bytes, s));
                }
            }
            acc
        }
    }

    /// `out[c][r]`: dot of row `r` of a Q4_K group with activation row `c`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `p` holds `a[c].d.len()` group blocks, and every `a[c]` the same number of Q8_K blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q4_k<const N: usize>(p: &[u8], a: &[ActRow; N], out: &mut [[f32; 8]; N]) {
        unsafe {
            let m4 = _mm256_set1_epi8(0xF);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..a[0].d.len() {
                let blk = p.as_ptr().add(b * 1184);
                let mut isum = [_mm256_setzero_si256(); N];
                for s in 0..8 {
                    let sc = row_pairs::<false>(blk.add(32 + 8 * s));
                    let v = blk.add(160 + 128 * s);
                    prefetch_ahead(v, 128);
                    let mut u = [_mm256_setzero_si256(); 8];
                    for j in 0..4 {
                        let x = _mm256_loadu_si256(v.add(32 * j).cast());
                        u[j] = _mm256_and_si256(x, m4);
                        u[j + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(x), m4);
                    }
                    for c in 0..N {
                        let y = a[c].qs.as_ptr().add(b * 256 + 32 * s);
                        // Eight products of at most 2 * 15 * 127 per 16-bit lane fit in i16.
                        let mut p16 = _mm256_maddubs_epi16(u[0], chunk_of(y, 0));
                        for (j, &u) in u.iter().enumerate().skip(1) {
                            p16 = _mm256_add_epi16(p16, _mm256_maddubs_epi16(u, chunk_of(y, j)));
                        }
                        isum[c] = _mm256_add_epi32(isum[c], _mm256_madd_epi16(p16, sc));
                    }
                }
                // The mins: sum over sub-blocks of min * (sum of the sub-block's 32 activations).
                let msum = sub_block_sums::<N, false>(
                    blk.add(96),
                    4,
                    std::array::from_fn(|c| a[c].bsums32.as_ptr().add(8 * b)),
                );
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
                let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16).cast()));
                for c in 0..N {
                    let dy = _mm256_set1_ps(*a[c].d.get_unchecked(b));
                    acc[c] =
                        _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(isum[c]), acc[c]);
                    acc[c] = _mm256_fnmadd_ps(
                        _mm256_mul_ps(dmin, dy),
                        _mm256_cvtepi32_ps(msum[c]),
                        acc[c],
                    );
                }
            }
            for c in 0..N {
                _mm256_storeu_ps(out[c].as_mut_ptr(), acc[c]);
            }
        }
    }

    /// `out[c][r]`: dot of row `r` of a Q6_K group with activation row `c`.
    ///
    /// # Safety
    /// As [`group_q4_k`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q6_k<const N: usize>(p: &[u8], a: &[ActRow; N], out: &mut [[f32; 8]; N]) {
        unsafe {
            let m4 = _mm256_set1_epi8(0xF);
            let m30 = _mm256_set1_epi8(0x30);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..a[0].d.len() {
                let blk = p.as_ptr().add(b * 1680);
                let mut isum = [_mm256_setzero_si256(); N];
                for s in 0..16 {
                    let sc = row_pairs::<true>(blk.add(16 + 8 * s));
                    let v = blk.add(144 + 96 * s);
                    prefetch_ahead(v, 96);
                    let l0 = _mm256_loadu_si256(v.cast());
                    let l1 = _mm256_loadu_si256(v.add(32).cast());
                    let h = _mm256_loadu_si256(v.add(64).cast());
                    // Shifts run on 16-bit lanes; the two bits kept never cross into the other byte.
                    let u = [
                        _mm256_or_si256(
                            _mm256_and_si256(l0, m4),
                            _mm256_and_si256(_mm256_slli_epi16::<4>(h), m30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(l0), m4),
                            _mm256_and_si256(_mm256_slli_epi16::<2>(h), m30),
                        ),
                        _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(h, m30)),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(l1), m4),
                            _mm256_and_si256(_mm256_srli_epi16::<2>(h), m30),
                        ),
                    ];
                    for c in 0..N {
                        let y = a[c].qs.as_ptr().add(b * 256 + 16 * s);
                        // Two products of at most 2 * 63 * 127 per 16-bit lane fit in i16, not four.
                        let p01 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(u[0], chunk_of(y, 0)),
                            _mm256_maddubs_epi16(u[1], chunk_of(y, 1)),
                        );
                        let p23 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(u[2], chunk_of(y, 2)),
                            _mm256_maddubs_epi16(u[3], chunk_of(y, 3)),
                        );
                        isum[c] = _mm256_add_epi32(
                            isum[c],
                            _mm256_add_epi32(
                                _mm256_madd_epi16(p01, sc),
                                _mm256_madd_epi16(p23, sc),
                            ),
                        );
                    }
                }
                // The offset: 32 * sum over sub-blocks of scale * (sum of the sub-block's 16 activations).
                let osum = sub_block_sums::<N, true>(
                    blk.add(16),
                    8,
                    std::array::from_fn(|c| a[c].bsums.as_ptr().add(16 * b)),
                );
                let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
                for c in 0..N {
                    let dy = _mm256_set1_ps(*a[c].d.get_unchecked(b));
                    let sum = _mm256_sub_epi32(isum[c], _mm256_slli_epi32::<5>(osum[c]));
                    acc[c] = _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(sum), acc[c]);
                }
            }
            for c in 0..N {
                _mm256_storeu_ps(out[c].as_mut_ptr(), acc[c]);
            }
        }
    }
}
