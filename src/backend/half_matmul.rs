//! f32 activations times f16/bf16 weights, for the CPU decoder (ONNX Runtime's CPU provider has no f16 matrix
//! kernels on x86, so its f16 graphs widen weights on the fly and its f32 graphs stream twice the bytes); f32
//! weights (f32 models) take the same kernels, so every CPU decoder graph has one form.
//!
//! Weights keep the PyTorch/GGUF Linear layout [n, k]: decoding (one row of activations) is then one contiguous
//! dot product per output, which streams every weight once; prefill (many rows) widens a tile of weight rows to
//! f32 once per call and multiplies it with a blocked sgemm (`matrixmultiply`).
//! `y[m, j] = sum_i x[m, i] * w[j, i]`, accumulated in f32.
use std::ops::Range;

/// A weight element: f16 or bf16 (widened on the fly), or f32 (models stored in f32 run the same kernels).
pub trait WeightType: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
    /// Widens 8 elements at `p` (x86 with AVX2, FMA and F16C).
    ///
    /// # Safety
    /// `p` must point to 8 readable elements, and the CPU must support AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Widens 16 elements at `p` (AVX-512F and F16C).
    ///
    /// # Safety
    /// `p` must point to 16 readable elements, and the CPU must support AVX-512F and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl WeightType for half::f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

impl WeightType for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl WeightType for half::bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // bf16 is the top half of an f32.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
                16,
            ))
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        unsafe {
            _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                16,
            ))
        }
    }
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("f16c"))
}

/// Output rows `rows` of one activation row: `y[j - rows.start] = dot(x, w[j])`.
pub fn dot_rows<W: WeightType>(x: &[f32], w: &[W], k: usize, rows: Range<usize>, y: &mut [f32]) {
    assert!(x.len() == k && w.len() >= rows.end * k && y.len() >= rows.len());
    #[cfg(target_arch = "x86_64")]
    if avx512_available() {
        // SAFETY: features checked above; bounds asserted.
        unsafe { dot_rows_avx512(x, w, k, rows, y) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        // SAFETY: features checked above; bounds asserted.
        unsafe { dot_rows_avx2(x, w, k, rows, y) };
        return;
    }
    for (o, j) in y.iter_mut().zip(rows) {
        *o = dot_portable(x, &w[j * k..(j + 1) * k]);
    }
}

fn dot_portable<W: WeightType>(x: &[f32], w: &[W]) -> f32 {
    // Eight partial sums, like the vector path, so both round alike and the loop vectorizes.
    let mut acc = [0f32; 8];
    let mut xc = x.chunks_exact(8);
    let mut wc = w.chunks_exact(8);
    for (xa, wa) in (&mut xc).zip(&mut wc) {
        for l in 0..8 {
            acc[l] += xa[l] * wa[l].widen();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (a, b) in xc.remainder().iter().zip(wc.remainder()) {
        s += a * b.widen();
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

// Both vector paths take one weight row at a time: the rows of a task are then one sequential stream, which the
// hardware prefetcher follows at full memory bandwidth. Interleaving several rows (strided streams, tried before)
// was 12-15% slower on Zen 5 with either vector width; decode here is bound by memory, not by F16C conversions.

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2<W: WeightType>(
    x: &[f32],
    w: &[W],
    k: usize,
    rows: Range<usize>,
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (k32, k8) = (k & !31, k & !7);
    let xp = x.as_ptr();
    for (yo, j) in y.iter_mut().zip(rows) {
        unsafe {
            let wr = w.as_ptr().add(j * k);
            // Four independent FMA chains hide the FMA latency.
            let mut a = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i < k32 {
                for (l, al) in a.iter_mut().enumerate() {
                    let o = i + 8 * l;
                    *al = _mm256_fmadd_ps(W::load8(wr.add(o)), _mm256_loadu_ps(xp.add(o)), *al);
                }
                i += 32;
            }
            while i < k8 {
                a[0] = _mm256_fmadd_ps(W::load8(wr.add(i)), _mm256_loadu_ps(xp.add(i)), a[0]);
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            *yo = hsum(s)
                + (k8..k)
                    .map(|i| x[i] * w[j * k + i].widen())
                    .fold(0.0, |p, q| p + q);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,f16c")]
unsafe fn dot_rows_avx512<W: WeightType>(
    x: &[f32],
    w: &[W],
    k: usize,
    rows: Range<usize>,
    y: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (k64, k16) = (k & !63, k & !15);
    let xp = x.as_ptr();
    for (yo, j) in y.iter_mut().zip(rows) {
        unsafe {
            let wr = w.as_ptr().add(j * k);
            let mut a = [_mm512_setzero_ps(); 4];
            let mut i = 0;
            while i < k64 {
                for (l, al) in a.iter_mut().enumerate() {
                    let o = i + 16 * l;
                    *al = _mm512_fmadd_ps(W::load16(wr.add(o)), _mm512_loadu_ps(xp.add(o)), *al);
                }
                i += 64;
            }
            while i < k16 {
                a[0] = _mm512_fmadd_ps(W::load16(wr.add(i)), _mm512_loadu_ps(xp.add(i)), a[0]);
                i += 16;
            }
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *yo = _mm512_reduce_add_ps(s)
                + (k16..k)
                    .map(|i| x[i] * w[j * k + i].widen())
                    .fold(0.0, |p, q| p + q);
        }
    }
}

/// Widens weight rows `rows` into `out` ([rows.len(), k] f32).
pub fn widen_rows<W: WeightType>(w: &[W], k: usize, rows: Range<usize>, out: &mut Vec<f32>) {
    out.clear();
    let src = &w[rows.start * k..rows.end * k];
    #[cfg(target_arch = "x86_64")]
    if simd_available() {
        out.resize(src.len(), 0.0);
        // SAFETY: features checked; `out` has src.len() elements.
        unsafe { widen_avx2(src, out) };
        return;
    }
    out.extend(src.iter().map(|v| v.widen()));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_avx2<W: WeightType>(src: &[W], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let n8 = src.len() & !7;
    let mut i = 0;
    while i < n8 {
        unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(i), W::load8(src.as_ptr().add(i))) };
        i += 8;
    }
    for i in n8..src.len() {
        out[i] = src[i].widen();
    }
}

/// `y[m, j] += ...` for `j` in `rows` with rows widened in `scratch`: `y` is [m, n] f32 (row stride `n`), `x` is
/// [m, k]. Overwrites (beta = 0) the covered columns.
///
/// # Safety
/// `y` must be valid for writes of `m * n` f32 and no other thread may write columns `rows` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_rows<W: WeightType>(
    x: &[f32],
    m: usize,
    w: &[W],
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
    scratch: &mut Vec<f32>,
) {
    assert!(x.len() == m * k && rows.end <= n && w.len() >= n * k);
    widen_rows(w, k, rows.clone(), scratch);
    // C[m, jj] = sum_i A[m, i] B[i, jj] with B[i, jj] = scratch[jj * k + i].
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            rows.len(),
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            scratch.as_ptr(),
            1,
            k as isize,
            0.0,
            y.add(rows.start),
            n as isize,
            1,
        )
    };
}

/// Activation rows up to which products are dot products ([`dot_rows_batch`]) rather than widened tiles and sgemm
/// ([`gemm_rows`]): for short prompts and continued prefill, the tile pass over every weight costs more than the
/// arithmetic it saves. Qwen2.5-0.5B's shapes on two Zen 5 cores: 22 tokens 0.14 s against 0.24 s, 48 tokens 0.23
/// against 0.25 s (the two cross near 50).
pub const DOT_MAX_ROWS: usize = 32;

/// `y[r, j]` for every activation row `r < m` and `j` in `rows`, by dot products: each tile of weight rows is read
/// from memory once and stays in cache while every activation row takes its dots. `y` is [m, n] f32, `x` [m, k].
///
/// # Safety
/// `y` must be valid for writes of `m * n` f32 and no other thread may write columns `rows` meanwhile.
pub unsafe fn dot_rows_batch<W: WeightType>(
    x: &[f32],
    m: usize,
    w: &[W],
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
) {
    assert!(x.len() == m * k && rows.end <= n);
    // ~128 KiB of weights per tile: in L2 while the activation rows pass over it.
    let tile = ((128 << 10) / (k.max(1) * std::mem::size_of::<W>())).max(4);
    for start in rows.clone().step_by(tile) {
        let t = start..(start + tile).min(rows.end);
        for r in 0..m {
            // SAFETY: row r's columns `t` lie within y's m * n values; the caller owns them.
            let yr = unsafe { std::slice::from_raw_parts_mut(y.add(r * n + t.start), t.len()) };
            dot_rows(&x[r * k..(r + 1) * k], w, k, t.clone(), yr);
        }
    }
}

/// Weight rows per parallel task: dot products (decode, [`DOT_MAX_ROWS`]) give each task 256 rows (a long sequential
/// stream, yet enough tasks to balance two threads on a 896-row projection); prefill gives
/// each thread one tile where it can (sgemm packs the activations again for every tile), at most 4096 rows.
pub fn task_rows(m: usize, n: usize) -> usize {
    if m <= DOT_MAX_ROWS {
        256.min(n.max(1))
    } else {
        n.div_ceil(std::thread::available_parallelism().map_or(1, |t| t.get()))
            .clamp(128, 4096)
    }
}

/// The whole product on the calling thread (tests and small cases): `y` is [m, n].
pub fn matmul<W: WeightType>(x: &[f32], m: usize, w: &[W], k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    if m == 1 {
        dot_rows(x, w, k, 0..n, &mut y);
    } else if m <= DOT_MAX_ROWS {
        // SAFETY: y holds m * n values and this thread alone writes it.
        unsafe { dot_rows_batch(x, m, w, k, n, 0..n, y.as_mut_ptr()) };
    } else {
        let mut scratch = Vec::new();
        let step = task_rows(m, n);
        for s in (0..n).step_by(step) {
            // SAFETY: y holds m * n values and this thread alone writes it.
            unsafe {
                gemm_rows(
                    x,
                    m,
                    w,
                    k,
                    n,
                    s..(s + step).min(n),
                    y.as_mut_ptr(),
                    &mut scratch,
                )
            };
        }
    }
    y
}

/// Deterministic values in [-1, 1) for the kernel and operator tests.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::test_data as data;
    use super::*;

    fn reference(x: &[f32], m: usize, w: &[f32], k: usize, n: usize) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = (0..k)
                    .map(|i| x[r * k + i] as f64 * w[j * k + i] as f64)
                    .sum();
            }
        }
        y
    }

    fn check<W: WeightType>(conv: fn(f32) -> W, m: usize, k: usize, n: usize) {
        let x = data(m * k, 1);
        let w: Vec<W> = data(n * k, 2).into_iter().map(conv).collect();
        let wf: Vec<f32> = w.iter().map(|v| v.widen()).collect();
        let want = reference(&x, m, &wf, k, n);
        let got = matmul(&x, m, &w, k, n);
        for (a, b) in got.iter().zip(&want) {
            assert!(
                (*a as f64 - b).abs() <= 1e-5 * (k as f64).sqrt(),
                "m={m} k={k} n={n}: {a} vs {b}"
            );
        }
        // The portable and AVX2 paths agree with the one picked here (AVX-512 where the CPU has it).
        #[cfg(target_arch = "x86_64")]
        let avx2 = simd_available().then(|| {
            let mut y = vec![0f32; n];
            // SAFETY: features checked; shapes as dot_rows asserts.
            unsafe { dot_rows_avx2(&x[..k], &w, k, 0..n, &mut y) };
            y
        });
        #[cfg(not(target_arch = "x86_64"))]
        let avx2: Option<Vec<f32>> = None;
        for j in 0..n {
            let p = dot_portable(&x[..k], &w[j * k..(j + 1) * k]);
            assert!((p - got[j]).abs() <= 1e-5 * (k as f32).sqrt());
            if let Some(a) = &avx2 {
                assert!((a[j] - got[j]).abs() <= 1e-5 * (k as f32).sqrt());
            }
        }
    }

    #[test]
    fn matvec_and_gemm_match_f64() {
        for &(m, k, n) in &[
            (1, 37, 13),
            (1, 64, 9),
            (1, 24, 9),
            (1, 200, 131),
            (1, 896, 130),
            (3, 37, 13),
            (16, 200, 131),
            (17, 200, 131),
            (33, 200, 131),
        ] {
            check(half::f16::from_f32, m, k, n);
            check(half::bf16::from_f32, m, k, n);
            check(|v| v, m, k, n);
        }
    }
}
