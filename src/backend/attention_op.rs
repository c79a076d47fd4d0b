//! `CausalAttention` (domain `trtdiff`): the attention of the CPU decoder graphs (`models::llama_cpu`), in place of
//! ONNX Runtime's `com.microsoft.GroupQueryAttention` with the same inputs (q/k/v packed in one tensor or apart,
//! `past_key`/`past_value` [batch, kv heads, capacity, head size], `seqlens_k`, `total_sequence_length`, RoPE's
//! cos/sin rows by position), attributes (`num_heads`, `kv_num_heads`, `scale`, `softcap`, `local_window_size`,
//! `do_rotary`, `rotary_interleaved`) and outputs, in f32, the new keys and values written into the cache in place.
//!
//! Its semantics are that operator's on the CPU: a row's new tokens sit at `seqlens_k + 1 - seq` onwards (at 0 on a
//! first prompt, `seq == total_sequence_length`), keys and queries are rotated at their positions, query `j` sees
//! the keys up to its own position, or with a window `w` the last `w` of them (its own included; ONNX Runtime 1.32's
//! rule), scores are `scale * q.k`
//! (`scale` 0: 1/sqrt(head size)), soft-capped as `cap * tanh(s / cap)` when `softcap` > 0.
//!
//! ONNX Runtime's operator makes a GEMM call per head and a score matrix as wide as the cache's capacity; a decode
//! step here reads each key and value of a head once in a tight loop. Prompts of [`GEMM_ROWS`] tokens or more go
//! through `matrixmultiply`'s GEMM per head. Heads are split over `spin_pool`.
use super::spin_pool::SpinPool;
use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

pub const ATTENTION: &str = "CausalAttention";

/// Query rows from which a head's scores and outputs go through GEMMs rather than one row at a time.
const GEMM_ROWS: usize = 16;

/// Queries a prompt's GEMMs take at once: each block computes only the keys its rows see.
const ROW_BLOCK: usize = 64;

pub struct CausalAttention;

#[derive(Clone, Copy, Debug)]
struct Params {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    softcap: f32,
    /// Keys a query sees besides its own, when > 0.
    window: i64,
    rotary: bool,
    interleaved: bool,
}

fn err(msg: String) -> ort::Error {
    ort::Error::new(format!("{ATTENTION}: {msg}"))
}

/// RoPE on one head at a position, from that position's cos/sin rows (the first `2 * cos.len()` values rotate, the
/// rest stay): pairs `(i, i + d/2)`, or `(2i, 2i + 1)` interleaved.
fn rotate(x: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool) {
    let half = cos.len();
    for i in 0..half {
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (xa, xb) = (x[a], x[b]);
        x[a] = xa * cos[i] - xb * sin[i];
        x[b] = xb * cos[i] + xa * sin[i];
    }
}

/// The first key a query at `causal - 1` sees.
fn window_start(causal: usize, window: i64) -> usize {
    match usize::try_from(window) {
        Ok(w) if w > 0 && causal > w => causal - w,
        _ => 0,
    }
}

/// Where each token's heads are: q, k and v packed in one tensor [batch, seq, (heads + 2 kv) * hd] or apart.
struct Qkv<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    q_stride: usize,
    kv_stride: usize,
    k_at: usize,
    v_at: usize,
    hd: usize,
}

impl Qkv<'_> {
    fn q(&self, token: usize, head: usize) -> &[f32] {
        &self.q[token * self.q_stride + head * self.hd..][..self.hd]
    }
    fn k(&self, token: usize, head: usize) -> &[f32] {
        &self.k[token * self.kv_stride + self.k_at + head * self.hd..][..self.hd]
    }
    fn v(&self, token: usize, head: usize) -> &[f32] {
        &self.v[token * self.kv_stride + self.v_at + head * self.hd..][..self.hd]
    }
}

/// The output, shared by the heads' tasks, which write disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One query head of one batch row.
struct Head<'a> {
    p: Params,
    qkv: &'a Qkv<'a>,
    /// This row's first token in `qkv`.
    token0: usize,
    head: usize,
    seq: usize,
    /// Tokens in the cache before this call's.
    past: usize,
    /// The head's cache rows [capacity, hd], this call's keys and values written.
    keys: &'a [f32],
    values: &'a [f32],
    /// RoPE rows [positions, half].
    cos: &'a [f32],
    sin: &'a [f32],
    half: usize,
    out: OutPtr,
    /// Floats between consecutive tokens' rows in `out`.
    out_stride: usize,
}

impl Head<'_> {
    /// Query `j`, rotated at its position.
    fn query(&self, j: usize, q: &mut [f32]) {
        q.copy_from_slice(self.qkv.q(self.token0 + j, self.head));
        if self.p.rotary {
            let at = (self.past + j) * self.half;
            rotate(
                q,
                &self.cos[at..][..self.half],
                &self.sin[at..][..self.half],
                self.p.interleaved,
            );
        }
    }

    fn alpha(&self) -> f32 {
        if self.p.scale == 0.0 {
            1.0 / (self.qkv.hd as f32).sqrt()
        } else {
            self.p.scale
        }
    }

    /// Scores of one query over its keys, soft-capped, into probabilities.
    #[inline(always)]
    fn softmax(&self, scores: &mut [f32]) {
        if self.p.softcap > 0.0 {
            let cap = self.p.softcap;
            scores.iter_mut().for_each(|s| *s = cap * (*s / cap).tanh());
        }
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
        scores.iter_mut().for_each(|s| *s = exp(*s - max));
        let inv = 1.0 / sum(scores);
        scores.iter_mut().for_each(|s| *s *= inv);
    }

    /// Where output row `j` of this head starts (`hd` floats).
    fn out_at(&self, j: usize) -> *mut f32 {
        let at = (self.token0 + j) * self.out_stride + self.head * self.qkv.hd;
        self.out.0.wrapping_add(at)
    }

    /// Decode steps and short prompts: each query against its keys, four keys a pass (independent sums), then the
    /// values' weighted sum a few columns at a time in registers.
    #[inline(always)]
    fn rows_one_by_one(&self) {
        let hd = self.qkv.hd;
        let alpha = self.alpha();
        let mut q = vec![0f32; hd];
        let mut scores = Vec::with_capacity(self.past + self.seq);
        for j in 0..self.seq {
            self.query(j, &mut q);
            let causal = self.past + j + 1;
            let start = window_start(causal, self.p.window);
            let keys = &self.keys[start * hd..causal * hd];
            scores.clear();
            let mut fours = keys.chunks_exact(4 * hd);
            for k4 in &mut fours {
                let (a, rest) = k4.split_at(hd);
                let (b, rest) = rest.split_at(hd);
                let (c, d) = rest.split_at(hd);
                scores.extend(dots4(&q, [a, b, c, d]).map(|s| alpha * s));
            }
            scores.extend(
                fours
                    .remainder()
                    .chunks_exact(hd)
                    .map(|k| alpha * dots4(&q, [k, k, k, k])[0]),
            );
            self.softmax(&mut scores);
            // SAFETY: row j of this head lies inside the output and is this task's alone.
            let out = unsafe { std::slice::from_raw_parts_mut(self.out_at(j), hd) };
            weighted_sum(&scores, &self.values[start * hd..causal * hd], out);
        }
    }

    /// Prompts: blocks of [`ROW_BLOCK`] queries, each block's scores against the keys its rows see (up to its last
    /// row's position, from its first row's window) and its outputs as two GEMMs, the rest of each row zeroed.
    #[inline(always)]
    fn gemm(&self) {
        let (hd, seq) = (self.qkv.hd, self.seq);
        let mut q = vec![0f32; seq * hd];
        for (j, row) in q.chunks_exact_mut(hd).enumerate() {
            self.query(j, row);
        }
        let mut scores = Vec::new();
        for r0 in (0..seq).step_by(ROW_BLOCK) {
            let r1 = (r0 + ROW_BLOCK).min(seq);
            let rows = r1 - r0;
            let first = window_start(self.past + r0 + 1, self.p.window);
            let width = self.past + r1 - first;
            scores.clear();
            scores.resize(rows * width, 0.0);
            // SAFETY: q rows [rows, hd] from r0, keys [width, hd] from `first` read as their transpose (both inside
            // their slices: past + r1 <= capacity), scores [rows, width].
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    hd,
                    width,
                    self.alpha(),
                    q.as_ptr().add(r0 * hd),
                    hd as isize,
                    1,
                    self.keys.as_ptr().add(first * hd),
                    1,
                    hd as isize,
                    0.0,
                    scores.as_mut_ptr(),
                    width as isize,
                    1,
                );
            }
            for (j, row) in scores.chunks_exact_mut(width).enumerate() {
                let causal = self.past + r0 + j + 1;
                let start = window_start(causal, self.p.window);
                let (lo, hi) = (start - first, causal - first);
                self.softmax(&mut row[lo..hi]);
                row[..lo].fill(0.0);
                row[hi..].fill(0.0);
            }
            // SAFETY: scores [rows, width], values [width, hd] from `first`; this head's output rows r0..r1 (hd wide,
            // out_stride apart) are this task's alone.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    width,
                    hd,
                    1.0,
                    scores.as_ptr(),
                    width as isize,
                    1,
                    self.values.as_ptr().add(first * hd),
                    hd as isize,
                    1,
                    0.0,
                    self.out_at(r0),
                    self.out_stride as isize,
                    1,
                );
            }
        }
    }

    #[inline(always)]
    fn run_here(&self) {
        if self.seq >= GEMM_ROWS {
            self.gemm()
        } else {
            self.rows_one_by_one()
        }
    }

    fn run(&self) {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            // SAFETY: the CPU has AVX2 and FMA.
            return unsafe { self.run_avx2() };
        }
        self.run_here()
    }

    /// [`Head::run_here`] compiled for AVX2: its loops (dot products, exp, weighted sums) vectorize 8 wide.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self) {
        self.run_here()
    }
}

/// `q` against four keys at once: four independent sums (one key's would wait on each add), 8 lanes each.
#[inline(always)]
fn dots4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    #[cfg(target_arch = "x86_64")]
    if q.len().is_multiple_of(8) && avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA; the keys are q's length (whole rows of the cache).
        return unsafe { avx2::dots4(q, k) };
    }
    dots4_portable(q, k)
}

#[inline(always)]
fn dots4_portable(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
    let mut acc = [[0f32; 8]; 4];
    let n = q.len() / 8 * 8;
    for c in (0..n).step_by(8) {
        let qc = &q[c..c + 8];
        for (a, kj) in acc.iter_mut().zip(&k) {
            let kc = &kj[c..c + 8];
            for i in 0..8 {
                a[i] += qc[i] * kc[i];
            }
        }
    }
    let mut out = [0f32; 4];
    for ((o, a), kj) in out.iter_mut().zip(&acc).zip(&k) {
        let tail: f32 = q[n..].iter().zip(&kj[n..]).map(|(x, y)| x * y).sum();
        *o = sum(a) + tail;
    }
    out
}

/// `out = sum_t p[t] * v[t]` over rows `v` [p.len(), out.len()], a few columns at a time kept in registers.
#[inline(always)]
fn weighted_sum(p: &[f32], v: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if out.len().is_multiple_of(8) && avx2::available() {
        // SAFETY: the CPU has AVX2 and FMA; `v` holds p.len() rows of out.len().
        return unsafe { avx2::weighted_sum(p, v, out) };
    }
    weighted_sum_portable(p, v, out)
}

#[inline(always)]
fn weighted_sum_portable(p: &[f32], v: &[f32], out: &mut [f32]) {
    let hd = out.len();
    let mut c0 = 0;
    while c0 < hd {
        let w = (hd - c0).min(32);
        let mut acc = [0f32; 32];
        for (&pt, row) in p.iter().zip(v.chunks_exact(hd)) {
            let r = &row[c0..c0 + w];
            if w == 32 {
                for i in 0..32 {
                    acc[i] += pt * r[i];
                }
            } else {
                for i in 0..w {
                    acc[i] += pt * r[i];
                }
            }
        }
        out[c0..c0 + w].copy_from_slice(&acc[..w]);
        c0 += w;
    }
}

/// A sum in eight partial sums (vectorizes; the order differs from a serial sum by rounding only).
#[inline(always)]
fn sum(v: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `e^x` for softmax (x <= 0 there), branch-free so that loops of it vectorize: `2^n * p(r)` with
/// `x = n ln 2 + r`, |r| <= ln 2 / 2, p Taylor's polynomial of degree 7 (relative error under 2e-7); arguments
/// below -87 give e^-87 (~1.6e-38), above 88 e^88.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 rounds to an integer (ties to even) in the float unit.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * r + c;
    }
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// The decode kernels in AVX2 + FMA: the compiler does not keep the portable loops' sums in registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
    }

    /// Safety: AVX2 and FMA; `q.len()` a multiple of 8, every key at least as long.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots4(q: &[f32], k: [&[f32]; 4]) -> [f32; 4] {
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in (0..q.len()).step_by(8) {
            let qv = unsafe { _mm256_loadu_ps(q.as_ptr().add(c)) };
            for (a, kj) in acc.iter_mut().zip(&k) {
                *a = _mm256_fmadd_ps(qv, unsafe { _mm256_loadu_ps(kj.as_ptr().add(c)) }, *a);
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    /// Safety: AVX2 and FMA; `out.len()` a multiple of 8, `v` at least `p.len()` rows of it.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sum(p: &[f32], v: &[f32], out: &mut [f32]) {
        let hd = out.len();
        // Up to 64 columns (8 registers) a pass over the rows.
        for c0 in (0..hd).step_by(64) {
            let lanes = (hd - c0).min(64) / 8;
            let mut acc = [_mm256_setzero_ps(); 8];
            for (t, &pt) in p.iter().enumerate() {
                let w = _mm256_set1_ps(pt);
                let row = unsafe { v.as_ptr().add(t * hd + c0) };
                for (i, a) in acc.iter_mut().enumerate().take(lanes) {
                    *a = _mm256_fmadd_ps(w, unsafe { _mm256_loadu_ps(row.add(8 * i)) }, *a);
                }
            }
            for (i, a) in acc.iter().enumerate().take(lanes) {
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c0 + 8 * i), *a) };
            }
        }
    }
}

/// A tensor input's shape and data, or an error naming it.
fn tensor<'a, T: ort::value::PrimitiveTensorElementType + 'a>(
    v: &'a Option<ort::value::ValueRef<'a>>,
    what: &str,
) -> ort::Result<(Vec<usize>, &'a [T])> {
    let v = v
        .as_ref()
        .ok_or_else(|| err(format!("input '{what}' missing")))?;
    let (shape, data) = v.try_extract_tensor::<T>()?;
    let shape = shape.iter().map(|&d| d.max(0) as usize).collect();
    Ok((shape, data))
}

fn compute(ctx: &ComputeContext, p: Params) -> ort::Result<()> {
    let n_inputs = ctx.num_inputs()?;
    let input =
        |i: usize| -> ort::Result<_> { Ok(if i < n_inputs { ctx.input(i)? } else { None }) };
    let (query, key, value) = (input(0)?, input(1)?, input(2)?);
    let (past_k, past_v) = (input(3)?, input(4)?);
    let (seqlens, total) = (input(5)?, input(6)?);
    let (cos, sin) = (input(7)?, input(8)?);
    let (qs, qd) = tensor::<f32>(&query, "query")?;
    let [batch, seq, width] = qs[..] else {
        return Err(err(format!(
            "query has shape {qs:?}, not [batch, seq, hidden]"
        )));
    };
    let (h, kvh) = (p.heads, p.kv_heads);
    let packed = key.is_none();
    let hd = if packed {
        width / (h + 2 * kvh)
    } else {
        width / h
    };
    let qkv = if packed {
        if hd == 0 || width != hd * (h + 2 * kvh) {
            return Err(err(format!(
                "packed q/k/v of {width} values is not ({h} + 2 x {kvh}) heads"
            )));
        }
        Qkv {
            q: qd,
            k: qd,
            v: qd,
            q_stride: width,
            kv_stride: width,
            k_at: h * hd,
            v_at: (h + kvh) * hd,
            hd,
        }
    } else {
        let (ks, kd) = tensor::<f32>(&key, "key")?;
        let (vs, vd) = tensor::<f32>(&value, "value")?;
        let want = [batch, seq, kvh * hd];
        if hd == 0 || width != h * hd || ks != want || vs != want {
            return Err(err(format!(
                "query {qs:?}, key {ks:?} and value {vs:?} are not {h} and {kvh} heads of one size"
            )));
        }
        Qkv {
            q: qd,
            k: kd,
            v: vd,
            q_stride: width,
            kv_stride: kvh * hd,
            k_at: 0,
            v_at: 0,
            hd,
        }
    };
    let (cache_shape, kd) = tensor::<f32>(&past_k, "past_key")?;
    let (vshape, vd) = tensor::<f32>(&past_v, "past_value")?;
    let [cb, ch, capacity, chd] = cache_shape[..] else {
        return Err(err(format!("past_key has shape {cache_shape:?}")));
    };
    if vshape != cache_shape || cb != batch || ch != kvh || chd != hd {
        return Err(err(format!(
            "past_key {cache_shape:?} / past_value {vshape:?} are not [{batch}, {kvh}, capacity, {hd}]"
        )));
    }
    let (_, lens) = tensor::<i32>(&seqlens, "seqlens_k")?;
    let (_, total) = tensor::<i32>(&total, "total_sequence_length")?;
    let (Some(&total), true) = (total.first(), lens.len() == batch) else {
        return Err(err(format!(
            "seqlens_k has {} values for a batch of {batch}, or total_sequence_length is empty",
            lens.len()
        )));
    };
    let (cos_shape, cos, sin, half) = if p.rotary {
        let (cs, c) = tensor::<f32>(&cos, "cos_cache")?;
        let (ss, s) = tensor::<f32>(&sin, "sin_cache")?;
        match cs[..] {
            [_, half] if cs == ss && half > 0 && 2 * half <= hd => (cs, c, s, half),
            _ => {
                return Err(err(format!(
                    "cos {cs:?} / sin {ss:?} are not [positions, at most {}]",
                    hd / 2
                )));
            }
        }
    } else {
        (vec![0, 0], &[][..], &[][..], 0)
    };
    // Each row's tokens before this call's (a first prompt, seq == total, starts at 0).
    let first = i64::from(total) == seq as i64;
    let mut pasts = Vec::with_capacity(batch);
    for (b, &len) in lens.iter().enumerate() {
        let row_total = usize::try_from(i64::from(len) + 1).unwrap_or(0);
        let past = if first {
            Some(0)
        } else {
            row_total.checked_sub(seq)
        };
        let end = past.map(|p| p + seq);
        match end {
            Some(end)
                if row_total >= 1 && end <= capacity && (!p.rotary || end <= cos_shape[0]) =>
            {
                pasts.push(end - seq)
            }
            _ => {
                return Err(err(format!(
                    "row {b}: seqlens_k {len} with {seq} new tokens does not fit a cache of {capacity} or \
                     RoPE rows for {} positions",
                    cos_shape[0]
                )));
            }
        }
    }
    let (k_ptr, v_ptr) = (kd.as_ptr(), vd.as_ptr());
    let cache_len = kd.len();
    let shape = |s: &[usize]| s.iter().map(|&d| d as i64).collect::<Vec<_>>();
    let mut out = ctx
        .output(0, shape(&[batch, seq, h * hd]))?
        .ok_or_else(|| err("no output".into()))?;
    let mut present_k = ctx
        .output(1, shape(&cache_shape))?
        .ok_or_else(|| err("no present_key".into()))?;
    let mut present_v = ctx
        .output(2, shape(&cache_shape))?
        .ok_or_else(|| err("no present_value".into()))?;
    let (_, keys) = present_k.try_extract_tensor_mut::<f32>()?;
    let (_, values) = present_v.try_extract_tensor_mut::<f32>()?;
    // A cache bound in place is both input and output; otherwise the past is copied over first.
    for (dst, src) in [(&mut *keys, k_ptr), (&mut *values, v_ptr)] {
        if dst.as_ptr() != src {
            // SAFETY: `src` is the past input's data, `cache_len` floats, alive for this call, apart from `dst`.
            dst.copy_from_slice(unsafe { std::slice::from_raw_parts(src, cache_len) });
        }
    }
    let cache = |b: usize, head: usize| (b * kvh + head) * capacity * hd;
    for (b, &past) in pasts.iter().enumerate() {
        for j in 0..seq {
            let pos = past + j;
            for head in 0..kvh {
                let at = cache(b, head) + pos * hd;
                let k = &mut keys[at..at + hd];
                k.copy_from_slice(qkv.k(b * seq + j, head));
                if p.rotary {
                    rotate(
                        k,
                        &cos[pos * half..][..half],
                        &sin[pos * half..][..half],
                        p.interleaved,
                    );
                }
                values[at..at + hd].copy_from_slice(qkv.v(b * seq + j, head));
            }
        }
    }
    let (keys, values): (&[f32], &[f32]) = (keys, values);
    let (_, y) = out.try_extract_tensor_mut::<f32>()?;
    let y = OutPtr(y.as_mut_ptr());
    let group = h / kvh;
    SpinPool::global().run(batch * h, &|task| {
        let (b, head) = (task / h, task % h);
        let at = cache(b, head / group);
        Head {
            p,
            qkv: &qkv,
            token0: b * seq,
            head,
            seq,
            past: pasts[b],
            keys: &keys[at..at + capacity * hd],
            values: &values[at..at + capacity * hd],
            cos,
            sin,
            half,
            out: y,
            out_stride: h * hd,
        }
        .run();
    });
    Ok(())
}

impl Operator for CausalAttention {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        ATTENTION
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        use TensorElementType::{Float32, Int32};
        [
            OperatorInput::required(Float32),
            OperatorInput::optional(Float32),
            OperatorInput::optional(Float32),
            OperatorInput::required(Float32),
            OperatorInput::required(Float32),
            OperatorInput::required(Int32),
            OperatorInput::required(Int32),
            OperatorInput::optional(Float32),
            OperatorInput::optional(Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(TensorElementType::Float32),
            OperatorOutput::required(TensorElementType::Float32),
            OperatorOutput::required(TensorElementType::Float32),
        ]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let count = |name: &str| {
            ctx.get::<i64>(name)
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| err(format!("attribute '{name}' missing or not positive")))
        };
        let p = Params {
            heads: count("num_heads")?,
            kv_heads: count("kv_num_heads")?,
            scale: ctx.get::<f32>("scale").unwrap_or(0.0),
            softcap: ctx.get::<f32>("softcap").unwrap_or(0.0),
            window: ctx.get::<i64>("local_window_size").unwrap_or(-1),
            rotary: ctx.get::<i64>("do_rotary").unwrap_or(0) == 1,
            interleaved: ctx.get::<i64>("rotary_interleaved").unwrap_or(0) == 1,
        };
        if !p.heads.is_multiple_of(p.kv_heads) {
            return Err(err(format!(
                "{} query heads do not group over {} kv heads",
                p.heads, p.kv_heads
            )));
        }
        Ok(Box::new(move |c: &ComputeContext| compute(c, p)))
    }
}

#[cfg(test)]
mod tests {
    use crate::backend::half_matmul::test_data as data;
    use crate::backend::ort_backend::{OrtEngine, OrtOptions};
    use crate::backend::{Engine, HostTensor};
    use crate::onnx::{Attr, DataType, Dim, GraphBuilder};

    struct Case {
        heads: usize,
        kv: usize,
        hd: usize,
        /// RoPE's rotated values per head (2 x the cos/sin width).
        rotary: usize,
        batch: usize,
        seq: usize,
        capacity: usize,
        /// Each row's seqlens_k (total tokens after the call, minus one).
        lens: Vec<i32>,
        packed: bool,
        interleaved: bool,
        window: i64,
        softcap: f32,
        scale: f32,
    }

    fn i32_tensor(shape: &[usize], v: &[i32]) -> HostTensor {
        HostTensor {
            dtype: DataType::INT32,
            shape: shape.to_vec(),
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    /// Our operator and ONNX Runtime's GroupQueryAttention in one graph on the same inputs (a cache filled with
    /// values for the earlier positions): the largest difference of the outputs and of each row's cache up to its
    /// total length.
    fn compare(c: &Case, with_theirs: bool) -> anyhow::Result<(f32, f32)> {
        let (h, kv, hd) = (c.heads, c.kv, c.hd);
        let total = if c.lens.is_empty() {
            0
        } else {
            *c.lens.iter().max().unwrap() + 1
        };
        let rows = c.capacity;
        let f = DataType::FLOAT;
        let mut g = GraphBuilder::new("attention", 18);
        g.use_domain(super::super::ort_ops::DOMAIN, 1);
        g.use_domain("com.microsoft", 1);
        let fixed = |d: &[usize]| d.iter().map(|&x| Dim::Fixed(x as i64)).collect::<Vec<_>>();
        let width = if c.packed { (h + 2 * kv) * hd } else { h * hd };
        let q = g.input("q", f, fixed(&[c.batch, c.seq, width])).unwrap();
        let (k, v) = if c.packed {
            (crate::onnx::Value::absent(), crate::onnx::Value::absent())
        } else {
            (
                g.input("k", f, fixed(&[c.batch, c.seq, kv * hd])).unwrap(),
                g.input("v", f, fixed(&[c.batch, c.seq, kv * hd])).unwrap(),
            )
        };
        let cache = fixed(&[c.batch, kv, c.capacity, hd]);
        let pk = g.input("past_key", f, cache.clone()).unwrap();
        let pv = g.input("past_value", f, cache.clone()).unwrap();
        let lens = g
            .input("seqlens_k", DataType::INT32, fixed(&[c.batch]))
            .unwrap();
        let tot = g.input("total", DataType::INT32, vec![]).unwrap();
        let half = c.rotary / 2;
        let cos_v: Vec<f32> = (0..rows * half)
            .map(|i| ((i / half) as f32 * 0.1 / (1.0 + (i % half) as f32)).cos())
            .collect();
        let sin_v: Vec<f32> = (0..rows * half)
            .map(|i| ((i / half) as f32 * 0.1 / (1.0 + (i % half) as f32)).sin())
            .collect();
        let cos = g
            .const_f32("cos", &[rows as i64, half as i64], &cos_v)
            .unwrap();
        let sin = g
            .const_f32("sin", &[rows as i64, half as i64], &sin_v)
            .unwrap();
        let attrs = || {
            let mut a = vec![
                ("num_heads", Attr::Int(h as i64)),
                ("kv_num_heads", Attr::Int(kv as i64)),
                ("do_rotary", Attr::Int(1)),
                ("rotary_interleaved", Attr::Int(c.interleaved as i64)),
                ("scale", Attr::Float(c.scale)),
                ("local_window_size", Attr::Int(c.window)),
            ];
            if c.softcap > 0.0 {
                a.push(("softcap", Attr::Float(c.softcap)));
            }
            a
        };
        let outs = |g: &mut GraphBuilder, domain: &str, op: &str, tag: &str| {
            g.node_named(
                domain,
                op,
                tag,
                &[&q, &k, &v, &pk, &pv, &lens, &tot, &cos, &sin],
                attrs(),
                vec![
                    (
                        Some(format!("{tag}_out")),
                        f,
                        fixed(&[c.batch, c.seq, h * hd]),
                    ),
                    (Some(format!("{tag}_k")), f, cache.clone()),
                    (Some(format!("{tag}_v")), f, cache.clone()),
                ],
            )
            .unwrap()
        };
        let ours = outs(
            &mut g,
            super::super::ort_ops::DOMAIN,
            super::ATTENTION,
            "ours",
        );
        let theirs = if with_theirs {
            outs(&mut g, "com.microsoft", "GroupQueryAttention", "theirs")
        } else {
            vec![]
        };
        for v in ours.iter().chain(&theirs) {
            g.output(v);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        crate::onnx::save(g.finish(), &path, &Default::default()).unwrap();
        let mut e = OrtEngine::open(&path, &OrtOptions::default()).unwrap();
        let cache_len = c.batch * kv * c.capacity * hd;
        let mut inputs = vec![
            (
                "q".to_string(),
                HostTensor::from_f32(&[c.batch, c.seq, width], &data(c.batch * c.seq * width, 3)),
            ),
            (
                "past_key".into(),
                HostTensor::from_f32(&[c.batch, kv, c.capacity, hd], &data(cache_len, 5)),
            ),
            (
                "past_value".into(),
                HostTensor::from_f32(&[c.batch, kv, c.capacity, hd], &data(cache_len, 9)),
            ),
            ("seqlens_k".into(), i32_tensor(&[c.batch], &c.lens)),
            ("total".into(), i32_tensor(&[], &[total])),
        ];
        if !c.packed {
            let n = c.batch * c.seq * kv * hd;
            inputs.push((
                "k".into(),
                HostTensor::from_f32(&[c.batch, c.seq, kv * hd], &data(n, 13)),
            ));
            inputs.push((
                "v".into(),
                HostTensor::from_f32(&[c.batch, c.seq, kv * hd], &data(n, 17)),
            ));
        }
        let out = e.run(&inputs)?;
        if !with_theirs {
            return Ok((0.0, 0.0));
        }
        let get = |name: &str| {
            let t = &out.iter().find(|(n, _)| n == name).unwrap().1;
            (t.shape.clone(), t.to_f64().unwrap())
        };
        let max_diff = |a: &[f64], b: &[f64]| {
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() as f32)
                .fold(0.0, f32::max)
        };
        let (os, o) = get("ours_out");
        let (ts, t) = get("theirs_out");
        assert_eq!(os, ts);
        // On a first prompt a row shorter than the prompt has padding tokens, whose outputs ONNX Runtime leaves
        // undefined; compare each row's own tokens.
        let first = c.seq as i32 == total;
        let mut out_diff = 0f32;
        for (b, &len) in c.lens.iter().enumerate() {
            let own = if first { len as usize + 1 } else { c.seq };
            let at = b * c.seq * h * hd;
            out_diff = out_diff.max(max_diff(
                &o[at..at + own * h * hd],
                &t[at..at + own * h * hd],
            ));
        }
        let mut cache_diff = 0f32;
        for which in ["k", "v"] {
            let (s1, a) = get(&format!("ours_{which}"));
            let (s2, b) = get(&format!("theirs_{which}"));
            let (cap1, cap2) = (s1[2], s2[2]);
            for (row, &len) in c.lens.iter().enumerate() {
                for head in 0..kv {
                    for pos in 0..=(len as usize) {
                        let x = &a[((row * kv + head) * cap1 + pos) * hd..][..hd];
                        let y = &b[((row * kv + head) * cap2 + pos) * hd..][..hd];
                        cache_diff = cache_diff.max(max_diff(x, y));
                    }
                }
            }
        }
        Ok((out_diff, cache_diff))
    }

    fn case() -> Case {
        Case {
            heads: 4,
            kv: 2,
            hd: 16,
            rotary: 16,
            batch: 1,
            seq: 1,
            capacity: 40,
            lens: vec![0],
            packed: true,
            interleaved: false,
            window: -1,
            softcap: 0.0,
            scale: 0.0,
        }
    }

    #[test]
    fn exp_matches_the_standard_library() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (ours, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max(((ours - want) / want).abs());
        }
        assert!(worst < 2e-7, "{worst}");
        assert_eq!(super::exp(0.0), 1.0);
        assert!(super::exp(-1000.0) < 1e-37 && super::exp(f32::NEG_INFINITY) < 1e-37);
    }

    /// Decode steps, short prompts after a past, first prompts through the GEMM path, rows of different lengths,
    /// q/k/v apart, interleaved and partial RoPE, a sliding window, soft-capping and a given scale: the outputs
    /// and the written cache agree with ONNX Runtime's operator to f32 rounding.
    #[test]
    fn agrees_with_onnx_runtime_group_query_attention() {
        let cases = [
            Case {
                lens: vec![17],
                ..case()
            },
            Case {
                seq: 3,
                lens: vec![21],
                ..case()
            },
            Case {
                seq: 20,
                lens: vec![19],
                ..case()
            },
            Case {
                seq: 20,
                batch: 2,
                lens: vec![19, 12],
                ..case()
            },
            Case {
                batch: 3,
                lens: vec![5, 30, 0],
                ..case()
            },
            Case {
                packed: false,
                seq: 2,
                lens: vec![9],
                heads: 6,
                kv: 3,
                ..case()
            },
            Case {
                interleaved: true,
                hd: 32,
                lens: vec![11],
                ..case()
            },
            Case {
                hd: 32,
                seq: 2,
                lens: vec![11],
                ..case()
            },
            Case {
                window: 4,
                lens: vec![25],
                ..case()
            },
            Case {
                seq: 150,
                capacity: 200,
                lens: vec![169],
                ..case()
            },
            Case {
                window: 40,
                seq: 150,
                capacity: 200,
                lens: vec![149],
                ..case()
            },
            Case {
                window: 4,
                seq: 24,
                lens: vec![23],
                ..case()
            },
            Case {
                softcap: 0.5,
                scale: 0.7,
                seq: 2,
                lens: vec![14],
                ..case()
            },
            Case {
                heads: 8,
                kv: 1,
                hd: 32,
                rotary: 32,
                seq: 18,
                lens: vec![30],
                ..case()
            },
        ];
        for (i, c) in cases.iter().enumerate() {
            let (out, cache) = compare(c, true).unwrap();
            assert!(
                out < 2e-5 && cache < 1e-6,
                "case {i}: output {out}, cache {cache}"
            );
        }
    }

    /// Lengths the cache cannot hold, or fewer tokens in a row than the call brings: an error naming the operator,
    /// not a panic or a read outside the cache.
    #[test]
    fn refuses_lengths_outside_the_cache() {
        for c in [
            Case {
                lens: vec![40],
                ..case()
            },
            Case {
                seq: 3,
                lens: vec![1, 20],
                batch: 2,
                ..case()
            },
            Case {
                lens: vec![-5],
                ..case()
            },
        ] {
            let e = compare(&c, false).unwrap_err();
            assert!(format!("{e:#}").contains("CausalAttention"), "{e:#}");
        }
    }
}
