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
use super::ggml_blocks::{Isa, QActs, Quant, detected_isa, dot_rows as file_dot_rows};
use super::ggml_repack_k::{self as k_quants, ActRow};
use std::ops::Range;

/// Rows interleaved in a group.
const ROWS: usize = 8;

/// A weight [n, k] repacked for [`Packed::product`] and [`Packed::dot_rows`].
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

/// The K-quants, packed by [`k_quants`].
fn k_quant(q: Quant) -> bool {
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
        let supported = matches!(q, Quant::Q8_0 | Quant::Q5_0 | Quant::Q4_0) || k_quant(q);
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
                if k_quant(q) {
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

    /// `y[r * n + j]` for activation rows `r < m` of `a` (quantized for this format) and weight rows `j` in `rows`,
    /// four activation rows per pass over a tile of weight rows that stays in cache.
    ///
    /// # Safety
    /// `y` must be valid for writes of `m * n` f32 and no other thread may write columns `rows` meanwhile.
    pub unsafe fn product(&self, a: &QActs, m: usize, n: usize, rows: Range<usize>, y: *mut f32) {
        self.check(a, m, &rows);
        assert!(rows.end <= n);
        let tile = ((128 << 10) / self.q.row_bytes(self.k).unwrap_or(1)).max(ROWS) / ROWS * ROWS;
        for start in rows.clone().step_by(tile) {
            let t = start..(start + tile).min(rows.end);
            let mut r = 0;
            while r < m {
                let take = (m - r).min(4);
                // SAFETY: forwarded from the caller; `check` covered the rows' blocks.
                unsafe {
                    let y = y.add(r * n + t.start);
                    match take {
                        4 => self.rows_of::<4>(a, r, t.clone(), y, n),
                        3 => self.rows_of::<3>(a, r, t.clone(), y, n),
                        2 => self.rows_of::<2>(a, r, t.clone(), y, n),
                        _ => self.rows_of::<1>(a, r, t.clone(), y, n),
                    }
                }
                r += take;
            }
        }
    }

    /// Dots of rows `rows` with activation row `r` of `a` (quantized for this format): `y[j - rows.start]`.
    pub fn dot_rows(&self, a: &QActs, r: usize, rows: Range<usize>, y: &mut [f32]) {
        self.check(a, r + 1, &rows);
        assert!(y.len() >= rows.len());
        // SAFETY: y holds the rows' values; with one activation row the stride is never used.
        unsafe { self.rows_of::<1>(a, r, rows, y.as_mut_ptr(), 0) }
    }

    /// The activation rows `..m` and weight rows `rows` are there to read.
    fn check(&self, a: &QActs, m: usize, rows: &Range<usize>) {
        let nb = self.k / self.q.block_elems();
        let sums = if k_quant(self.q) {
            (a.bsums.len() / 16).min(a.bsums32.len() / 8)
        } else {
            a.sums.len()
        };
        assert!(
            a.k == self.k
                && rows.end <= self.n
                && a.qs.len() >= m * self.k
                && a.d.len() >= m * nb
                && (self.q == Quant::Q8_0 || sums >= m * nb),
            "activations of {} rows do not fit {:?} rows of {} elements",
            m,
            self.q,
            self.k
        );
    }

    /// Dots of weight rows `rows` with activation rows `r0..r0 + N`: `y[c * n + j - rows.start]`.
    ///
    /// # Safety
    /// `y` must be valid for writes of `N` rows (stride `n`) of `rows.len()` f32, no other thread may write them, and
    /// [`Packed::check`] must hold for rows `..r0 + N`.
    unsafe fn rows_of<const N: usize>(
        &self,
        a: &QActs,
        r0: usize,
        rows: Range<usize>,
        y: *mut f32,
        n: usize,
    ) {
        let q = self.q;
        let nb = self.k / q.block_elems();
        let gb = group_block_bytes(q);
        let grouped = self.n / ROWS * ROWS;
        let acts = act_rows::<N>(a, r0, q);
        let mut j = rows.start;
        while j < rows.end.min(grouped) {
            let g = j / ROWS;
            let p = &self.data[g * nb * gb..(g + 1) * nb * gb];
            let mut out = [[0f32; ROWS]; N];
            // SAFETY: `Packed` exists only where `detected_isa` found AVX2, FMA and F16C; `p` holds the group's nb
            // blocks and each activation row nb blocks (`check`).
            unsafe {
                match q {
                    Quant::Q8_0 => x86::group_q8_0::<N>(p, &acts, &mut out),
                    Quant::Q5_0 => x86::group_q4::<N, true>(p, &acts, &mut out),
                    Quant::Q4_0 => x86::group_q4::<N, false>(p, &acts, &mut out),
                    Quant::Q4K => k_quants::x86::group_q4_k::<N>(p, &acts, &mut out),
                    _ => k_quants::x86::group_q6_k::<N>(p, &acts, &mut out),
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
}

/// Activation rows `r0..r0 + N` of `a`, quantized for weights of format `q`.
fn act_rows<const N: usize>(a: &QActs, r0: usize, q: Quant) -> [ActRow<'_>; N] {
    let (k, nb) = (a.k, a.k / q.block_elems());
    std::array::from_fn(|c| {
        let r = r0 + c;
        let blocks = r * nb..(r + 1) * nb;
        ActRow {
            qs: &a.qs[r * k..(r + 1) * k],
            d: &a.d[blocks.clone()],
            sums: a.sums.get(blocks.clone()).unwrap_or(&[]),
            bsums: a
                .bsums
                .get(blocks.start * 16..blocks.end * 16)
                .unwrap_or(&[]),
            bsums32: a
                .bsums32
                .get(blocks.start * 8..blocks.end * 8)
                .unwrap_or(&[]),
        }
    })
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
/// anonymous memory); a kernel without `MADV_PAGEOUT` (before Linux 5.4) ignores the hint. Tables that an
/// embedding lookup also reads ([`keep_resident`]) stay: each new token's row would otherwise come back from disk
/// (1.1 ms a decode step on the Llama-3.2-1B-shaped file's tied table).
pub fn release(w: &[u8]) {
    let (start, end) = (w.as_ptr() as usize, w.as_ptr() as usize + w.len());
    let kept = RESIDENT.lock().unwrap_or_else(|e| e.into_inner());
    if kept.iter().any(|&(s, e)| s < end && start < e) {
        return;
    }
    drop(kept);
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

static RESIDENT: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

/// Marks `w` as read in the file's layout for as long as the process runs (an embedding table): [`release`] leaves
/// its pages alone.
pub fn keep_resident(w: &[u8]) {
    let range = (w.as_ptr() as usize, w.as_ptr() as usize + w.len());
    let mut kept = RESIDENT.lock().unwrap_or_else(|e| e.into_inner());
    if !kept.contains(&range) {
        kept.push(range);
    }
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
    use super::ActRow;
    use crate::backend::ggml_repack_k::x86::{chunk_of, prefetch_ahead};
    use std::arch::x86_64::*;

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

    /// `out[c][r]`: dot of row `r` of a Q8_0 group with activation row `c`.
    ///
    /// # Safety
    /// AVX2, FMA and F16C; `p` holds `a[c].d.len()` packed blocks and every `a[c]` 32 values per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q8_0<const N: usize>(p: &[u8], a: &[ActRow; N], out: &mut [[f32; 8]; N]) {
        unsafe {
            let ones = _mm256_set1_epi16(1);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..a[0].d.len() {
                let blk = p.as_ptr().add(b * 272);
                prefetch_ahead(blk, 272);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
                let mut sum = [_mm256_setzero_si256(); N];
                for c in 0..8 {
                    let x = _mm256_loadu_si256(blk.add(16 + 32 * c).cast());
                    let ax = _mm256_sign_epi8(x, x);
                    for r in 0..N {
                        let y = a[r].qs.as_ptr().add(b * 32);
                        let yc = _mm256_sign_epi8(chunk_of(y, c), x);
                        let p = _mm256_maddubs_epi16(ax, yc);
                        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(p, ones));
                    }
                }
                for r in 0..N {
                    let ds = _mm256_mul_ps(dw, _mm256_set1_ps(*a[r].d.get_unchecked(b)));
                    acc[r] = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(sum[r]), acc[r]);
                }
            }
            for r in 0..N {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    }

    /// `out[c][r]`: dot of row `r` of a Q4_0 group, or Q5_0 with `HIGH`, with activation row `c`.
    ///
    /// # Safety
    /// As [`group_q8_0`]; every `a[c].sums` holds its blocks' sums of values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group_q4<const N: usize, const HIGH: bool>(
        p: &[u8],
        a: &[ActRow; N],
        out: &mut [[f32; 8]; N],
    ) {
        unsafe {
            let (bytes, offset) = if HIGH { (176, 16) } else { (144, 8) };
            let ones = _mm256_set1_epi16(1);
            let m4 = _mm256_set1_epi8(0xF);
            let mut acc = [_mm256_setzero_ps(); N];
            for b in 0..a[0].d.len() {
                let blk = p.as_ptr().add(b * bytes);
                prefetch_ahead(blk, bytes);
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
                let h = if HIGH {
                    _mm256_loadu_si256(blk.add(144).cast())
                } else {
                    _mm256_setzero_si256()
                };
                // Four products of at most 2 * 31 * 127 per 16-bit lane fit in i16.
                let mut lo = [_mm256_setzero_si256(); N];
                let mut hi = [_mm256_setzero_si256(); N];
                for j in 0..4 {
                    let v = _mm256_loadu_si256(blk.add(16 + 32 * j).cast());
                    let mut u0 = _mm256_and_si256(v, m4);
                    let mut u1 = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                    if HIGH {
                        u0 = _mm256_or_si256(u0, high_bit(h, j));
                        u1 = _mm256_or_si256(u1, high_bit(h, j + 4));
                    }
                    for r in 0..N {
                        let y = a[r].qs.as_ptr().add(b * 32);
                        lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(u0, chunk_of(y, j)));
                        hi[r] =
                            _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(u1, chunk_of(y, j + 4)));
                    }
                }
                for r in 0..N {
                    let sum = _mm256_add_epi32(
                        _mm256_madd_epi16(lo[r], ones),
                        _mm256_madd_epi16(hi[r], ones),
                    );
                    let sum = _mm256_sub_epi32(
                        sum,
                        _mm256_set1_epi32(offset * *a[r].sums.get_unchecked(b)),
                    );
                    let ds = _mm256_mul_ps(dw, _mm256_set1_ps(*a[r].d.get_unchecked(b)));
                    acc[r] = _mm256_fmadd_ps(ds, _mm256_cvtepi32_ps(sum), acc[r]);
                }
            }
            for r in 0..N {
                _mm256_storeu_ps(out[r].as_mut_ptr(), acc[r]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ggml_blocks::tests::random_blocks;
    use crate::backend::half_matmul::test_data as data;

    #[test]
    fn packed_products_equal_the_file_layout_kernels() {
        if !enabled() {
            return;
        }
        // 21 rows: two groups and five rows in the file's layout; seven activation rows: passes of four and three;
        // ranges that start and end inside groups and in the tail.
        let (k, n, m) = (512, 21, 7);
        for q in [
            Quant::Q8_0,
            Quant::Q5_0,
            Quant::Q4_0,
            Quant::Q4K,
            Quant::Q6K,
        ] {
            let w = random_blocks(q, n, k, 5);
            let p = Packed::new(q, &w, k, n).unwrap();
            let groups_bytes = n / 8 * (k / q.block_elems()) * group_block_bytes(q);
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
                    // SAFETY: y holds m * n values and this thread alone writes them.
                    unsafe { p.product(&a, m, n, rows.clone(), y.as_mut_ptr()) };
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
}
