//! GGUF weights repacked in memory, eight rows interleaved, as llama.cpp's CPU "extra buffer types" repack Q4_0 and
//! Q4_K: one activation load serves eight rows, the eight rows' scales are one vector, and 4- and 5-bit values
//! unpack to unsigned bytes with a mask and two shifts instead of ggml's per-row shuffles and sign tricks. Decode on
//! these two cores is bound by instructions more than by memory (two threads run 1.75x one), so fewer instructions
//! per weight byte is speed. Q8_0, Q5_0 and Q4_0 are packed here; Q4_K and Q6_K in [`super::ggml_repack_k`], whose
//! kernels also take four activation rows at once (prefill). Operators pack their weights when the session creates
//! them (`ggml_ops`), so a model's load pays for it, as llama.cpp's does.
//!
//! Layout of a group of eight rows, block `b` (32 elements of each row), at `b * group_block_bytes`:
//! - 8 f16 scales, row `r`'s at bytes `2r`;
//! - the values in eight chunks of four elements per row: chunk `c`'s byte `i` is row `i / 4`, element
//!   `4c + i % 4`. Q8_0: each chunk is 32 bytes, the values as stored. Q4_0/Q5_0: unsigned values (`q + 8`,
//!   `q + 16`), four 32-byte vectors of nibbles, vector `j` holding chunk `j` in its low and chunk `j + 4` in its
//!   high nibbles; Q5_0 then 32 bytes whose byte `i` holds bit 4 of chunk `c`'s byte `i` in bit `c`.
//!
//! Rows past the last whole group keep the file's layout. Sums are the same integers as ggml's (`sum(q * y)` per
//! block; the unsigned offset comes off as `8 * sum(y)` or `16 * sum(y)`), scaled and added in a different order.
use super::ggml_blocks::{
    DOT_MAX_ROWS, Isa, QActs, Quant, detected_isa, dot_rows as file_dot_rows, product_rows,
};
use super::ggml_repack_k as k_quants;
use std::ops::Range;

/// Rows interleaved in a group.
const ROWS: usize = 8;

/// A weight [n, k] repacked for [`Packed::dot_rows`].
pub struct Packed {
    q: Quant,
    k: usize,
    n: usize,
    data: Vec<u8>,
}

/// Bytes of one block of a group of eight rows.
fn group_block_bytes(q: Quant) -> usize {
    match q {
        Quant::Q8_0 => 16 + 256,
        Quant::Q5_0 => 16 + 128 + 32,
        Quant::Q4K | Quant::Q6K => k_quants::group_block_bytes(q),
        _ => 16 + 128,
    }
}

/// Formats with packed kernels over several activation rows at once (the K-quants), where prefill takes quantized
/// products instead of a dequantized tile and sgemm.
fn multi_row(q: Quant) -> bool {
    matches!(q, Quant::Q4K | Quant::Q6K)
}

/// Element `e` (0..32) of a Q4_0 or Q5_0 block as the packed layout stores it: unsigned.
fn element(q: Quant, blk: &[u8], e: usize) -> u8 {
    let nib = |e: usize| {
        let v = blk[q.block_bytes() - 16 + e % 16];
        if e < 16 { v & 0xF } else { v >> 4 }
    };
    match q {
        Quant::Q4_0 => nib(e),
        _ => {
            let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
            nib(e) | (((qh >> e) & 1) as u8) << 4
        }
    }
}

impl Packed {
    /// Repacks `w` ([n rows of k elements] in format `q`), or None where the packed kernels do not apply (another
    /// format, fewer than eight rows, a CPU without AVX2, or `TRT_DIFF_NO_REPACK` set).
    pub fn new(q: Quant, w: &[u8], k: usize, n: usize) -> Option<Packed> {
        let rb = q.row_bytes(k)?;
        let supported = matches!(q, Quant::Q8_0 | Quant::Q5_0 | Quant::Q4_0) || multi_row(q);
        if !supported || n < ROWS || w.len() < n * rb || !enabled() {
            return None;
        }
        let nb = k / q.block_elems();
        let gb = group_block_bytes(q);
        let groups = n / ROWS;
        let mut data = vec![0u8; groups * nb * gb];
        // Groups in tasks of 64 (512 rows) over the decode pool: a model's weights pack in a fraction of a second.
        let per_task = 64;
        let out = SendPtr(data.as_mut_ptr());
        let pack = move |t: usize| {
            let out = out;
            let task = t * per_task..((t + 1) * per_task).min(groups);
            populate(&w[task.start * ROWS * rb..task.end * ROWS * rb]);
            for g in task {
                // SAFETY: task t alone writes groups t * per_task.., each `nb * gb` bytes of `data`.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(g * nb * gb), nb * gb) };
                let rows = &w[g * ROWS * rb..(g + 1) * ROWS * rb];
                if multi_row(q) {
                    k_quants::pack_group(q, rows, nb, dst);
                } else {
                    pack_group(q, rows, nb, dst);
                }
            }
        };
        super::spin_pool::SpinPool::global().run(groups.div_ceil(per_task), &pack);
        data.extend_from_slice(&w[groups * ROWS * rb..n * rb]);
        Some(Packed { q, k, n, data })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Whether [`Packed::product`] of `m` activation rows reads them quantized (as `QActs` for this format) rather
    /// than as f32.
    pub fn quantized(&self, m: usize) -> bool {
        multi_row(self.q) || m <= DOT_MAX_ROWS
    }

    /// `y[r * n + j]` for activation rows `r < m` and weight rows `j` in `rows`: `x` ([m, k]) quantized in `a` where
    /// [`Packed::quantized`] says so. Tiles of weight rows stay in cache across the activation rows.
    ///
    /// # Safety
    /// `y` must be valid for writes of `m * n` f32 and no other thread may write columns `rows` meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn product(
        &self,
        x: &[f32],
        a: &QActs,
        m: usize,
        n: usize,
        rows: Range<usize>,
        y: *mut f32,
        scratch: &mut Vec<f32>,
    ) {
        let q = self.q;
        assert!(rows.end <= self.n && rows.end <= n && x.len() == m * self.k);
        if !self.quantized(m) {
            let w = self.file_rows(rows.clone());
            // SAFETY: forwarded from the caller; `w` holds the rows `rows` from 0.
            return unsafe {
                product_rows(
                    q,
                    &w,
                    x,
                    None,
                    m,
                    self.k,
                    n,
                    0..rows.len(),
                    y.add(rows.start),
                    scratch,
                )
            };
        }
        assert!(a.k == self.k && a.qs.len() >= m * self.k);
        let tile = ((128 << 10) / q.row_bytes(self.k).unwrap_or(1)).max(ROWS) / ROWS * ROWS;
        for start in rows.clone().step_by(tile) {
            let t = start..(start + tile).min(rows.end);
            if !multi_row(q) {
                for r in 0..m {
                    // SAFETY: row r's columns `t` lie within y's m * n values; the caller owns them.
                    let yr =
                        unsafe { std::slice::from_raw_parts_mut(y.add(r * n + t.start), t.len()) };
                    self.dot_rows(a, r, t.clone(), yr);
                }
                continue;
            }
            let mut r = 0;
            while r < m {
                let take = (m - r).min(4);
                // SAFETY: forwarded from the caller.
                unsafe {
                    match take {
                        4 => self.k_rows::<4>(a, r, t.clone(), y.add(r * n + t.start), n),
                        3 => self.k_rows::<3>(a, r, t.clone(), y.add(r * n + t.start), n),
                        2 => self.k_rows::<2>(a, r, t.clone(), y.add(r * n + t.start), n),
                        _ => self.k_rows::<1>(a, r, t.clone(), y.add(r * n + t.start), n),
                    }
                }
                r += take;
            }
        }
    }

    /// K-quant dots of rows `rows` with activation rows `r0..r0 + N`: `y[c * n + j - rows.start]`.
    ///
    /// # Safety
    /// `y` must be valid for writes of `N` rows (stride `n`) of `rows.len()` f32, and no other thread may write them.
    unsafe fn k_rows<const N: usize>(
        &self,
        a: &QActs,
        r0: usize,
        rows: Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        let q = self.q;
        let nb = self.k / 256;
        let gb = group_block_bytes(q);
        let grouped = self.n / ROWS * ROWS;
        let acts = k_quants::rows::<N>(a, r0);
        let mut j = rows.start;
        while j < rows.end.min(grouped) {
            let g = j / ROWS;
            let p = &self.data[g * nb * gb..(g + 1) * nb * gb];
            let mut out = [[0f32; ROWS]; N];
            // SAFETY: `Packed` exists only where `detected_isa` found AVX2, FMA and F16C; `p` holds the group's nb
            // blocks and each activation row nb Q8_K blocks (`rows` checked k).
            unsafe {
                if q == Quant::Q4K {
                    k_quants::x86::group_q4_k::<N>(p, &acts, &mut out)
                } else {
                    k_quants::x86::group_q6_k::<N>(p, &acts, &mut out)
                }
            }
            let end = ((g + 1) * ROWS).min(rows.end);
            for (c, o) in out.iter().enumerate() {
                for jj in j..end {
                    // SAFETY: column jj of row c is in `rows`; the caller owns it.
                    unsafe { *y.add(c * n + jj - rows.start) = o[jj - g * ROWS] };
                }
            }
            j = end;
        }
        if j < rows.end {
            let tail = &self.data[grouped / ROWS * nb * gb..];
            let mut out = vec![0f32; rows.end - j];
            for c in 0..N {
                file_dot_rows(
                    q,
                    tail,
                    a,
                    r0 + c,
                    j - grouped..rows.end - grouped,
                    &mut out,
                );
                for (i, &v) in out.iter().enumerate() {
                    // SAFETY: as above.
                    unsafe { *y.add(c * n + j - rows.start + i) = v };
                }
            }
        }
    }

    /// Dots of rows `rows` with activation row `r` of `a` (quantized for this format): `y[j - rows.start]`.
    pub fn dot_rows(&self, a: &QActs, r: usize, rows: Range<usize>, y: &mut [f32]) {
        let (q, k) = (self.q, self.k);
        if multi_row(q) {
            assert!(
                a.k == k
                    && rows.end <= self.n
                    && y.len() >= rows.len()
                    && a.qs.len() >= (r + 1) * k
            );
            // SAFETY: y holds the rows' values; with one activation row the stride is never used.
            return unsafe { self.k_rows::<1>(a, r, rows.clone(), y.as_mut_ptr(), 0) };
        }
        let nb = k / 32;
        assert!(a.k == k && rows.end <= self.n && y.len() >= rows.len());
        let d = &a.d[r * nb..(r + 1) * nb];
        let qs = &a.qs[r * k..(r + 1) * k];
        let sums: Vec<i32> = if q == Quant::Q8_0 {
            Vec::new()
        } else {
            qs.chunks_exact(32)
                .map(|c| c.iter().map(|&v| v as i32).sum())
                .collect()
        };
        let gb = group_block_bytes(q);
        let grouped = self.n / ROWS * ROWS;
        let mut j = rows.start;
        while j < rows.end.min(grouped) {
            let g = j / ROWS;
            let p = &self.data[g * nb * gb..(g + 1) * nb * gb];
            let mut out = [0f32; ROWS];
            // SAFETY: `Packed` exists only where `detected_isa` found AVX2, FMA and F16C; `p` holds the group's nb
            // blocks, `d`, `qs` and `sums` the activation row's.
            unsafe {
                match q {
                    Quant::Q8_0 => x86::group_q8_0(p, d, qs, &mut out),
                    Quant::Q5_0 => x86::group_q4::<true>(p, d, qs, &sums, &mut out),
                    _ => x86::group_q4::<false>(p, d, qs, &sums, &mut out),
                }
            }
            let end = ((g + 1) * ROWS).min(rows.end);
            y[j - rows.start..end - rows.start].copy_from_slice(&out[j - g * ROWS..end - g * ROWS]);
            j = end;
        }
        if j < rows.end {
            let tail = &self.data[grouped / ROWS * nb * gb..];
            file_dot_rows(
                q,
                tail,
                a,
                r,
                j - grouped..rows.end - grouped,
                &mut y[j - rows.start..rows.len()],
            );
        }
    }

    /// Rows `rows` of a 32-element format in the file's layout again (prefill dequantizes tiles of them for sgemm,
    /// so the file's bytes are not read after packing).
    fn file_rows(&self, rows: Range<usize>) -> Vec<u8> {
        let q = self.q;
        let (rb, bb, nb) = (
            q.row_bytes(self.k).unwrap_or(0),
            q.block_bytes(),
            self.k / 32,
        );
        let gb = group_block_bytes(q);
        let grouped = self.n / ROWS * ROWS;
        let mut out = vec![0u8; rows.len() * rb];
        for (j, row) in rows.clone().zip(out.chunks_exact_mut(rb)) {
            if j >= grouped {
                let tail = &self.data[grouped / ROWS * nb * gb..];
                row.copy_from_slice(&tail[(j - grouped) * rb..][..rb]);
                continue;
            }
            let (g, r) = (j / ROWS, j % ROWS);
            for (b, blk) in row.chunks_exact_mut(bb).enumerate() {
                let src = &self.data[(g * nb + b) * gb..][..gb];
                blk[..2].copy_from_slice(&src[2 * r..2 * r + 2]);
                for e in 0..32 {
                    // Element e of row r: chunk e / 4, byte 4r + e % 4.
                    let (c, i) = (e / 4, 4 * r + e % 4);
                    let u = match q {
                        Quant::Q8_0 => src[16 + 32 * c + i],
                        _ => {
                            let v = src[16 + 32 * (c % 4) + i];
                            let nib = if c < 4 { v & 0xF } else { v >> 4 };
                            let high = if q == Quant::Q5_0 {
                                (src[144 + i] >> c) & 1
                            } else {
                                0
                            };
                            nib | high << 4
                        }
                    };
                    match q {
                        Quant::Q8_0 => blk[2 + e] = u,
                        _ => {
                            let at = bb - 16 + e % 16;
                            blk[at] |= if e < 16 { u & 0xF } else { (u & 0xF) << 4 };
                            if q == Quant::Q5_0 {
                                blk[2 + e / 8] |= (u >> 4) << (e % 8);
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// Packs eight rows (`w`, in the file's layout) into `out` (`nb` group blocks).
fn pack_group(q: Quant, w: &[u8], nb: usize, out: &mut [u8]) {
    let (rb, bb, gb) = (w.len() / ROWS, q.block_bytes(), group_block_bytes(q));
    let mut vals = [[0u8; 32]; ROWS];
    for (b, out) in out.chunks_exact_mut(gb).take(nb).enumerate() {
        for (r, v) in vals.iter_mut().enumerate() {
            let blk = &w[r * rb + b * bb..][..bb];
            out[2 * r..2 * r + 2].copy_from_slice(&blk[..2]);
            if q == Quant::Q8_0 {
                // Chunk c's bytes 4r..4r + 4 are the row's elements 4c..4c + 4, as stored.
                for c in 0..8 {
                    out[16 + 32 * c + 4 * r..][..4].copy_from_slice(&blk[2 + 4 * c..][..4]);
                }
                continue;
            }
            for (e, o) in v.iter_mut().enumerate() {
                *o = element(q, blk, e);
            }
        }
        if q == Quant::Q8_0 {
            continue;
        }
        // Chunk c's byte i: row i / 4, element 4c + i % 4.
        let chunk = |c: usize, i: usize| vals[i / 4][4 * c + i % 4];
        for i in 0..32 {
            for j in 0..4 {
                out[16 + 32 * j + i] = (chunk(j, i) & 0xF) | (chunk(j + 4, i) & 0xF) << 4;
            }
            if q == Quant::Q5_0 {
                out[144 + i] = (0..8).fold(0, |h, c| h | ((chunk(c, i) >> 4) & 1) << c);
            }
        }
    }
}

/// Asks the kernel to reclaim the pages of `w` (whole pages inside it) once it is packed: ONNX Runtime maps
/// initializers from the GGUF file, so the pages come back from the file if anything reads them again, and the
/// packed copy does not double the memory a model holds. Contents never change (unlike `MADV_DONTNEED` on
/// anonymous memory); a kernel without `MADV_PAGEOUT` (before Linux 5.4) ignores the hint.
pub fn release(w: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: sysconf has no preconditions; madvise with MADV_PAGEOUT only hints at whole pages inside `w`.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let start = (w.as_ptr() as usize).next_multiple_of(page);
        let end = (w.as_ptr() as usize + w.len()) / page * page;
        if end > start {
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_PAGEOUT) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = w;
}

/// Asks the kernel to fault in the pages of `w` in one call (`MADV_POPULATE_READ`, Linux 5.14): packing reads
/// each mapped page once, and one page fault at a time costs more than the packing itself.
fn populate(w: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as in `release`; the hint only reads whole pages inside `w`.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let start = w.as_ptr() as usize / page * page;
        let end = (w.as_ptr() as usize + w.len()).next_multiple_of(page);
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                end - start,
                libc::MADV_POPULATE_READ,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = w;
}

/// Repacking is on unless `TRT_DIFF_NO_REPACK` is set (for comparisons, as llama.cpp's `--no-repack`), and needs
/// AVX2.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        detected_isa() != Isa::Portable && std::env::var_os("TRT_DIFF_NO_REPACK").is_none()
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The eight rows' dots of a Q8_0 group.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `p` holds `d.len()` packed blocks and `qs` 32 values per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q8_0(p: &[u8], d: &[f32], qs: &[i8], out: &mut [f32; 8]) {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = _mm256_setzero_ps();
            for (b, &dy) in d.iter().enumerate() {
                let blk = p.as_ptr().add(b * 272);
                let ds = _mm256_mul_ps(
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
                    _mm256_set1_ps(dy),
                );
                let y = qs.as_ptr().add(b * 32);
                let mut sum = _mm256_setzero_si256();
                for c in 0..8 {
                    let x = _mm256_loadu_si256(blk.add(16 + 32 * c).cast());
                    let yc = _mm256_sign_epi8(chunk_of(y, c), x);
                    let p = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), yc);
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
                }
                acc = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(sum), acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
        }
    }

    /// Activation values 4c..4c+4 repeated over the register, against chunk `c` of eight rows.
    #[inline(always)]
    unsafe fn chunk_of(y: *const i8, c: usize) -> __m256i {
        unsafe { _mm256_set1_epi32(std::ptr::read_unaligned(y.add(4 * c).cast::<i32>())) }
    }

    /// Bit `c` of every byte of `h` moved to bit 4 (other bits cleared). Shifts run on 16-bit lanes; the bit kept
    /// never crosses into the other byte for c in 0..8.
    #[inline(always)]
    unsafe fn high_bit(h: __m256i, c: usize) -> __m256i {
        unsafe {
            let s = match c {
                0 => _mm256_slli_epi16::<4>(h),
                1 => _mm256_slli_epi16::<3>(h),
                2 => _mm256_slli_epi16::<2>(h),
                3 => _mm256_slli_epi16::<1>(h),
                4 => h,
                5 => _mm256_srli_epi16::<1>(h),
                6 => _mm256_srli_epi16::<2>(h),
                _ => _mm256_srli_epi16::<3>(h),
            };
            _mm256_and_si256(s, _mm256_set1_epi8(0x10))
        }
    }

    /// The eight rows' dots of a Q4_0 group, or Q5_0 with `HIGH`.
    ///
    /// # Safety
    /// As [`group_q8_0`]; `sums` holds each block's sum of activation values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q4<const HIGH: bool>(
        p: &[u8],
        d: &[f32],
        qs: &[i8],
        sums: &[i32],
        out: &mut [f32; 8],
    ) {
        unsafe {
            let (bytes, offset) = if HIGH { (176, 16) } else { (144, 8) };
            let ones = _mm256_set1_epi16(1);
            let m4 = _mm256_set1_epi8(0xF);
            let mut acc = _mm256_setzero_ps();
            for (b, &dy) in d.iter().enumerate() {
                let blk = p.as_ptr().add(b * bytes);
                let ds = _mm256_mul_ps(
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.cast())),
                    _mm256_set1_ps(dy),
                );
                let y = qs.as_ptr().add(b * 32);
                let h = if HIGH {
                    _mm256_loadu_si256(blk.add(144).cast())
                } else {
                    _mm256_setzero_si256()
                };
                // Four products of at most 2 * 31 * 127 per 16-bit lane fit in i16.
                let mut lo = _mm256_setzero_si256();
                let mut hi = _mm256_setzero_si256();
                for j in 0..4 {
                    let v = _mm256_loadu_si256(blk.add(16 + 32 * j).cast());
                    let mut u0 = _mm256_and_si256(v, m4);
                    let mut u1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                    if HIGH {
                        u0 = _mm256_or_si256(u0, high_bit(h, j));
                        u1 = _mm256_or_si256(u1, high_bit(h, j + 4));
                    }
                    lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(u0, chunk_of(y, j)));
                    hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(u1, chunk_of(y, j + 4)));
                }
                let sum =
                    _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
                let sum = _mm256_sub_epi32(sum, _mm256_set1_epi32(offset * sums[b]));
                acc = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(sum), acc);
            }
            _mm256_storeu_ps(out.as_mut_ptr(), acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ggml_blocks::tests::random_blocks;
    use crate::backend::half_matmul::test_data as data;

    #[test]
    fn k_quant_products_equal_the_file_layout_kernels() {
        if !enabled() {
            return;
        }
        // 21 rows: two groups and five rows in the file's layout; seven activation rows: passes of four and three.
        let (k, n, m) = (512, 21, 7);
        for q in [Quant::Q4K, Quant::Q6K] {
            let w = random_blocks(q, n, k, 5);
            let p = Packed::new(q, &w, k, n).unwrap();
            let groups_bytes = n / 8 * (k / 256) * group_block_bytes(q);
            assert_eq!(p.bytes(), groups_bytes + n % 8 * q.row_bytes(k).unwrap());
            let x = data(m * k, 13);
            let mut a = QActs::default();
            a.quantize(q, &x, k);
            let want = |r: usize, j: usize| {
                let mut v = [0f32];
                file_dot_rows(q, &w, &a, r, j..j + 1, &mut v);
                v[0]
            };
            let close = |g: f32, w: f32| (g - w).abs() <= 1e-5 * w.abs().max(1.0);
            for rows in [0..n, 3..19, 8..16, 17..21] {
                for r in 0..m {
                    let mut got = vec![0f32; rows.len()];
                    p.dot_rows(&a, r, rows.clone(), &mut got);
                    for (j, &g) in rows.clone().zip(&got) {
                        assert!(
                            close(g, want(r, j)),
                            "{q:?} dot_rows r={r} j={j}: {g} vs {}",
                            want(r, j)
                        );
                    }
                }
                for m in [1, 2, 3, 4, 7] {
                    let mut y = vec![f32::NAN; m * n];
                    let mut scratch = Vec::new();
                    // SAFETY: y holds m * n values and this thread alone writes them.
                    unsafe {
                        p.product(
                            &x[..m * k],
                            &a,
                            m,
                            n,
                            rows.clone(),
                            y.as_mut_ptr(),
                            &mut scratch,
                        )
                    };
                    for r in 0..m {
                        for j in 0..n {
                            let g = y[r * n + j];
                            if rows.contains(&j) {
                                assert!(
                                    close(g, want(r, j)),
                                    "{q:?} m={m} r={r} j={j}: {g} vs {}",
                                    want(r, j)
                                );
                            } else {
                                assert!(
                                    g.is_nan(),
                                    "{q:?} m={m}: column {j} outside {rows:?} written"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packed_dots_equal_the_file_layout_kernels() {
        if !enabled() {
            return;
        }
        // 21 rows: two groups and five rows in the file's layout; ranges that start and end inside groups.
        let (k, n) = (96, 21);
        for q in [Quant::Q8_0, Quant::Q5_0, Quant::Q4_0] {
            let w = random_blocks(q, n, k, 3);
            let p = Packed::new(q, &w, k, n).unwrap();
            assert_eq!(p.bytes(), w.len(), "{q:?}: the same bytes, rearranged");
            let rb = q.row_bytes(k).unwrap();
            for rows in [0..n, 5..17, 16..21] {
                assert!(
                    p.file_rows(rows.clone()) == w[rows.start * rb..rows.end * rb],
                    "{q:?}: rows {rows:?} do not unpack to the file's bytes"
                );
            }
            let x = data(2 * k, 11);
            let mut a = QActs::default();
            a.quantize(q, &x, k);
            for r in 0..2 {
                for rows in [0..n, 3..19, 8..16, 17..21] {
                    let mut want = vec![0f32; rows.len()];
                    file_dot_rows(q, &w, &a, r, rows.clone(), &mut want);
                    let mut got = vec![0f32; rows.len()];
                    p.dot_rows(&a, r, rows.clone(), &mut got);
                    for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                            "{q:?} r={r} rows={rows:?} j={j}: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}
