//! Products with GGUF weights kept in their ggml block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K), for
//! the CPU decoder of quantized GGUF files: the weights are never widened in memory.
//!
//! Decode follows llama.cpp: each activation row is quantized per block (Q8_0 for Q8_0/Q4_0/Q5_0 weights, Q8_1 for
//! Q4_1/Q5_1, Q8_K for the K-quants, with the rounding of ggml's x86 quantizers), and every output is a sum of
//! integer block dot products times the blocks' scales, as ggml's `vec_dot` computes it. Kernels: AVX2 (with
//! AVX-512 VNNI for the 32-element formats where present), chosen at run time, and a portable fallback of the
//! same integer arithmetic. Prefill with more than [`DOT_MAX_ROWS`] activation rows dequantizes a tile of weight rows
//! to f32 per task and multiplies it with sgemm (more precise than llama.cpp's quantized activations), except for
//! the K-quants repacked by `ggml_repack`, whose kernels take quantized products over four activation rows at once.
//!
//! Weights are the raw bytes of a GGUF tensor, [n rows, row bytes], row `j` the blocks of output `j`.
use crate::weights::gguf::GgmlType;
use half::f16;
use std::ops::Range;

/// A weight block format this module multiplies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

/// An activation block format (ggml's `vec_dot_type` of a weight format).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// 32 int8 and an f16 scale.
    Q8_0,
    /// As Q8_0 plus `d * sum(q)` in f16.
    Q8_1,
    /// 256 int8, an f32 scale and 16 sums of 16.
    Q8K,
}

pub const ALL: [Quant; 8] = [
    Quant::Q8_0,
    Quant::Q4_0,
    Quant::Q4_1,
    Quant::Q5_0,
    Quant::Q5_1,
    Quant::Q4K,
    Quant::Q5K,
    Quant::Q6K,
];

impl Quant {
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        Some(match t {
            GgmlType::Q8_0 => Quant::Q8_0,
            GgmlType::Q4_0 => Quant::Q4_0,
            GgmlType::Q4_1 => Quant::Q4_1,
            GgmlType::Q5_0 => Quant::Q5_0,
            GgmlType::Q5_1 => Quant::Q5_1,
            GgmlType::Q4_K => Quant::Q4K,
            GgmlType::Q5_K => Quant::Q5K,
            GgmlType::Q6_K => Quant::Q6K,
            _ => return None,
        })
    }
    pub fn ggml(self) -> GgmlType {
        match self {
            Quant::Q8_0 => GgmlType::Q8_0,
            Quant::Q4_0 => GgmlType::Q4_0,
            Quant::Q4_1 => GgmlType::Q4_1,
            Quant::Q5_0 => GgmlType::Q5_0,
            Quant::Q5_1 => GgmlType::Q5_1,
            Quant::Q4K => GgmlType::Q4_K,
            Quant::Q5K => GgmlType::Q5_K,
            Quant::Q6K => GgmlType::Q6_K,
        }
    }
    /// Elements per block.
    pub fn block_elems(self) -> usize {
        match self {
            Quant::Q4K | Quant::Q5K | Quant::Q6K => 256,
            _ => 32,
        }
    }
    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Quant::Q8_0 => 34,
            Quant::Q4_0 => 18,
            Quant::Q4_1 => 20,
            Quant::Q5_0 => 22,
            Quant::Q5_1 => 24,
            Quant::Q4K => 144,
            Quant::Q5K => 176,
            Quant::Q6K => 210,
        }
    }
    pub fn act(self) -> Act {
        match self {
            Quant::Q8_0 | Quant::Q4_0 | Quant::Q5_0 => Act::Q8_0,
            Quant::Q4_1 | Quant::Q5_1 => Act::Q8_1,
            _ => Act::Q8K,
        }
    }
    /// Bytes of one row of `k` elements; None when `k` is not a whole number of blocks.
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        (k > 0 && k.is_multiple_of(self.block_elems()))
            .then(|| k / self.block_elems() * self.block_bytes())
    }
}

/// One or more activation rows quantized per block, in a layout for the kernels (scales apart from the values).
#[derive(Clone, Debug, Default)]
pub struct QActs {
    pub act: Option<Act>,
    /// Elements per row.
    pub k: usize,
    /// Scale per block (f16-rounded for Q8_0/Q8_1, f32 for Q8_K).
    pub d: Vec<f32>,
    /// Q8_1: `d * sum(q)` per block, f16-rounded.
    pub s: Vec<f32>,
    /// Q8_0 and Q8_1: `sum(q)` per block (the repacked kernels take unsigned weights' offsets off with it).
    pub sums: Vec<i32>,
    pub qs: Vec<i8>,
    /// Q8_K: sums of 16 values, 16 per block.
    pub bsums: Vec<i16>,
    /// Q8_K: sums of 32 values, 8 per block (Q4_K's sub-blocks, for its mins).
    pub bsums32: Vec<i16>,
}

fn f16_round(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

impl QActs {
    /// Quantizes `m` rows of `k` (`x` is [m, k]) for weights of format `q`; `k` must be a multiple of its block.
    pub fn quantize(&mut self, q: Quant, x: &[f32], k: usize) {
        #[cfg(target_arch = "x86_64")]
        if detected_isa() != Isa::Portable {
            // SAFETY: the CPU has AVX2, FMA and F16C (`detected_isa`).
            return unsafe { self.quantize_avx2(q, x, k) };
        }
        self.quantize_any(q, x, k)
    }

    /// [`QActs::quantize`] compiled for AVX2: the rounding becomes `vroundps` instead of a call to libm's `rintf`
    /// per value, and the loops vectorize (the same results: both round half to even).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn quantize_avx2(&mut self, q: Quant, x: &[f32], k: usize) {
        self.quantize_any(q, x, k)
    }

    #[inline(always)]
    fn quantize_any(&mut self, q: Quant, x: &[f32], k: usize) {
        let act = q.act();
        let bs = if act == Act::Q8K { 256 } else { 32 };
        assert!(k.is_multiple_of(bs) && x.len().is_multiple_of(k.max(1)));
        let nb = x.len() / bs;
        self.act = Some(act);
        self.k = k;
        self.d.clear();
        self.s.clear();
        self.sums.clear();
        self.bsums.clear();
        self.bsums32.clear();
        self.qs.clear();
        self.qs.resize(x.len(), 0);
        for (b, (xb, qb)) in x
            .chunks_exact(bs)
            .zip(self.qs.chunks_exact_mut(bs))
            .enumerate()
        {
            debug_assert!(b < nb);
            match act {
                Act::Q8_0 | Act::Q8_1 => {
                    // ggml's x86 quantize_row_q8_0/q8_1: id = 127 / amax, round half to even.
                    let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
                    let mut sum = 0i32;
                    for (o, &v) in qb.iter_mut().zip(xb) {
                        *o = (v * id).round_ties_even() as i8;
                        sum += *o as i32;
                    }
                    self.d.push(f16_round(d));
                    self.sums.push(sum);
                    if act == Act::Q8_1 {
                        self.s.push(f16_round(sum as f32 * d));
                    }
                }
                Act::Q8K => {
                    // ggml's quantize_row_q8_K_ref: the value of largest magnitude maps to -127.
                    let (mut amax, mut max) = (0f32, 0f32);
                    for &v in xb {
                        if v.abs() > amax {
                            amax = v.abs();
                            max = v;
                        }
                    }
                    if amax == 0.0 {
                        self.d.push(0.0);
                        qb.fill(0);
                        self.bsums.extend([0i16; 16]);
                        self.bsums32.extend([0i16; 8]);
                        continue;
                    }
                    let iscale = -127.0 / max;
                    for (o, &v) in qb.iter_mut().zip(xb) {
                        *o = ((iscale * v).round_ties_even() as i32).min(127) as i8;
                    }
                    for c in qb.chunks_exact(16) {
                        self.bsums.push(c.iter().map(|&v| v as i16).sum());
                    }
                    let at = self.bsums.len() - 16;
                    for i in 0..8 {
                        self.bsums32
                            .push(self.bsums[at + 2 * i] + self.bsums[at + 2 * i + 1]);
                    }
                    self.d.push(1.0 / iscale);
                }
            }
        }
    }

    /// Blocks per row.
    fn blocks_per_row(&self) -> usize {
        let bs = if self.act == Some(Act::Q8K) { 256 } else { 32 };
        self.k / bs
    }

    /// Row `r` as ggml's block bytes (block_q8_0 / block_q8_1 / block_q8_K), for comparisons with ggml.
    pub fn ggml_bytes(&self, r: usize) -> Vec<u8> {
        let nb = self.blocks_per_row();
        let mut out = Vec::new();
        for b in r * nb..(r + 1) * nb {
            match self.act {
                Some(Act::Q8K) => {
                    out.extend(self.d[b].to_le_bytes());
                    out.extend(self.qs[b * 256..(b + 1) * 256].iter().map(|&v| v as u8));
                    for s in &self.bsums[b * 16..(b + 1) * 16] {
                        out.extend(s.to_le_bytes());
                    }
                }
                act => {
                    out.extend(f16::from_f32(self.d[b]).to_le_bytes());
                    if act == Some(Act::Q8_1) {
                        out.extend(f16::from_f32(self.s[b]).to_le_bytes());
                    }
                    out.extend(self.qs[b * 32..(b + 1) * 32].iter().map(|&v| v as u8));
                }
            }
        }
        out
    }

    /// A view of row `r`.
    fn row(&self, r: usize) -> ActRow<'_> {
        let nb = self.blocks_per_row();
        let b = r * nb..(r + 1) * nb;
        ActRow {
            d: &self.d[b.clone()],
            s: if self.s.is_empty() {
                &[]
            } else {
                &self.s[b.clone()]
            },
            qs: &self.qs[r * self.k..(r + 1) * self.k],
            bsums: if self.bsums.is_empty() {
                &[]
            } else {
                &self.bsums[b.start * 16..b.end * 16]
            },
        }
    }
}

/// One quantized activation row.
#[derive(Clone, Copy)]
struct ActRow<'a> {
    d: &'a [f32],
    s: &'a [f32],
    qs: &'a [i8],
    bsums: &'a [i16],
}

#[inline(always)]
fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` (0..8) of Q4_K / Q5_K.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (i32, i32) {
    if j < 4 {
        ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
    } else {
        (
            ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as i32,
            ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32,
        )
    }
}

/// The dot product of one weight row (`w`, the row's blocks) with one quantized activation row: ggml's scalar
/// `vec_dot` arithmetic (integer sums per block, then scales).
fn dot_portable(q: Quant, w: &[u8], a: ActRow) -> f32 {
    let bb = q.block_bytes();
    let mut sum = 0f32;
    for (b, wb) in w.chunks_exact(bb).enumerate() {
        match q {
            Quant::Q8_0 | Quant::Q4_0 | Quant::Q5_0 | Quant::Q4_1 | Quant::Q5_1 => {
                let y = &a.qs[b * 32..b * 32 + 32];
                let mut vals = [0i32; 32];
                match q {
                    Quant::Q8_0 => {
                        for (v, &x) in vals.iter_mut().zip(&wb[2..34]) {
                            *v = x as i8 as i32;
                        }
                    }
                    Quant::Q4_0 | Quant::Q4_1 => {
                        let (qs, off) = if q == Quant::Q4_0 {
                            (&wb[2..18], 8)
                        } else {
                            (&wb[4..20], 0)
                        };
                        for j in 0..16 {
                            vals[j] = (qs[j] & 0xF) as i32 - off;
                            vals[j + 16] = (qs[j] >> 4) as i32 - off;
                        }
                    }
                    _ => {
                        let (o, off) = if q == Quant::Q5_0 { (2, 16) } else { (4, 0) };
                        let qh = u32::from_le_bytes([wb[o], wb[o + 1], wb[o + 2], wb[o + 3]]);
                        let qs = &wb[o + 4..o + 20];
                        for j in 0..16 {
                            let h0 = (((qh >> j) & 1) << 4) as i32;
                            let h1 = (((qh >> (j + 16)) & 1) << 4) as i32;
                            vals[j] = ((qs[j] & 0xF) as i32 | h0) - off;
                            vals[j + 16] = ((qs[j] >> 4) as i32 | h1) - off;
                        }
                    }
                }
                let sumi: i32 = vals.iter().zip(y).map(|(&v, &y)| v * y as i32).sum();
                match q {
                    Quant::Q4_1 | Quant::Q5_1 => {
                        sum += h(wb, 0) * a.d[b] * sumi as f32 + h(wb, 2) * a.s[b];
                    }
                    _ => sum += sumi as f32 * (h(wb, 0) * a.d[b]),
                }
            }
            Quant::Q4K | Quant::Q5K => {
                let y = &a.qs[b * 256..b * 256 + 256];
                let bsums = &a.bsums[b * 16..b * 16 + 16];
                let d = a.d[b] * h(wb, 0);
                let dmin = a.d[b] * h(wb, 2);
                let scales = &wb[4..16];
                let (qh, qs) = if q == Quant::Q5K {
                    (&wb[16..48], &wb[48..176])
                } else {
                    (&[][..], &wb[16..144])
                };
                let (mut sumi, mut summs) = (0i32, 0i32);
                for j in 0..4 {
                    for half in 0..2 {
                        let (sc, m) = scale_min_k4(2 * j + half, scales);
                        summs += m
                            * (bsums[2 * (2 * j + half)] as i32
                                + bsums[2 * (2 * j + half) + 1] as i32);
                        let mut s = 0i32;
                        for l in 0..32 {
                            let mut v = if half == 0 {
                                qs[32 * j + l] & 0xF
                            } else {
                                qs[32 * j + l] >> 4
                            } as i32;
                            if q == Quant::Q5K && qh[l] & (1 << (2 * j + half)) != 0 {
                                v += 16;
                            }
                            s += v * y[64 * j + 32 * half + l] as i32;
                        }
                        sumi += sc * s;
                    }
                }
                sum += d * sumi as f32 - dmin * summs as f32;
            }
            Quant::Q6K => {
                let y = &a.qs[b * 256..b * 256 + 256];
                let d = a.d[b] * h(wb, 208);
                let mut sumi = 0i32;
                for half in 0..2 {
                    let ql = &wb[64 * half..64 * half + 64];
                    let qh = &wb[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &wb[192 + 8 * half..192 + 8 * half + 8];
                    let y = &y[128 * half..128 * half + 128];
                    let mut part = [0i32; 8];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        part[is] += q1 * y[l] as i32;
                        part[is + 2] += q2 * y[l + 32] as i32;
                        part[is + 4] += q3 * y[l + 64] as i32;
                        part[is + 6] += q4 * y[l + 96] as i32;
                    }
                    for (p, &s) in part.iter().zip(sc) {
                        sumi += p * (s as i8) as i32;
                    }
                }
                sum += d * sumi as f32;
            }
        }
    }
    sum
}

/// Which vector kernels this CPU runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Isa {
    Portable,
    Avx2,
    /// AVX2 plus AVX-512 VNNI (256-bit `vpdpbusd`) for the 32-element formats.
    Avx2Vnni,
}

pub fn detected_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            if !avx2 {
                Isa::Portable
            } else if is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
            {
                Isa::Avx2Vnni
            } else {
                Isa::Avx2
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    Isa::Portable
}

/// Dots of weight rows `rows` (of `w`, [n, row bytes]) with activation row `r` of `a`: `y[j - rows.start]`.
fn dot_rows_isa(
    isa: Isa,
    q: Quant,
    w: &[u8],
    a: &QActs,
    r: usize,
    rows: Range<usize>,
    y: &mut [f32],
) {
    let rb = q.row_bytes(a.k).unwrap_or(0);
    assert!(w.len() >= rows.end * rb && y.len() >= rows.len());
    let ar = a.row(r);
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Portable {
        for (o, j) in y.iter_mut().zip(rows) {
            let wr = &w[j * rb..(j + 1) * rb];
            // SAFETY: `detected_isa` checked the features; every kernel reads only within `wr` and `ar`, whose
            // lengths match (asserted above and by construction of `QActs`).
            *o = unsafe {
                match (q, isa) {
                    (Quant::Q8_0, Isa::Avx2Vnni) => x86::dot_q8_0::<true>(wr, ar),
                    (Quant::Q8_0, _) => x86::dot_q8_0::<false>(wr, ar),
                    (Quant::Q4_0, Isa::Avx2Vnni) => x86::dot_q4_0::<true>(wr, ar),
                    (Quant::Q4_0, _) => x86::dot_q4_0::<false>(wr, ar),
                    (Quant::Q5_0, Isa::Avx2Vnni) => x86::dot_q5_0::<true>(wr, ar),
                    (Quant::Q5_0, _) => x86::dot_q5_0::<false>(wr, ar),
                    (Quant::Q4K, _) => x86::dot_q4_k(wr, ar),
                    (Quant::Q6K, _) => x86::dot_q6_k(wr, ar),
                    _ => dot_portable(q, wr, ar),
                }
            };
        }
        return;
    }
    let _ = isa;
    for (o, j) in y.iter_mut().zip(rows) {
        *o = dot_portable(q, &w[j * rb..(j + 1) * rb], ar);
    }
}

/// As [`dot_rows_isa`] with this CPU's kernels.
pub fn dot_rows(q: Quant, w: &[u8], a: &QActs, r: usize, rows: Range<usize>, y: &mut [f32]) {
    dot_rows_isa(detected_isa(), q, w, a, r, rows, y)
}

/// One row's dot product with a chosen kernel set (tests compare them).
pub fn dot_with(isa: Isa, q: Quant, w_row: &[u8], a: &QActs, r: usize) -> f32 {
    let isa = if isa == Isa::Portable || detected_isa() == Isa::Portable {
        Isa::Portable
    } else if isa == Isa::Avx2Vnni && detected_isa() != Isa::Avx2Vnni {
        Isa::Avx2
    } else {
        isa
    };
    let mut y = [0f32];
    dot_rows_isa(isa, q, w_row, a, r, 0..1, &mut y);
    y[0]
}

/// Activation rows up to which products quantize activations and take dot products; more rows dequantize tiles of
/// weights to f32 for sgemm.
pub const DOT_MAX_ROWS: usize = 32;

/// Dequantizes weight rows `rows` into `out` ([rows.len(), k] f32).
pub fn dequantize_rows(q: Quant, w: &[u8], k: usize, rows: Range<usize>, out: &mut Vec<f32>) {
    let rb = q.row_bytes(k).unwrap_or(0);
    let bytes = &w[rows.start * rb..rows.end * rb];
    // Sizes were checked by the caller; an error here cannot happen for the formats of `Quant`.
    match crate::weights::gguf::dequantize(q.ggml(), bytes, rows.len() * k) {
        Ok(v) => *out = v,
        Err(_) => {
            out.clear();
            out.resize(rows.len() * k, 0.0);
        }
    }
}

/// `y[r, j]` for activation rows `r < m` and weight rows `j` in `rows`, `y` being [m, n]. With `acts` (m <=
/// [`DOT_MAX_ROWS`]): quantized dot products over tiles of weight rows that stay in cache; otherwise a dequantized
/// tile and sgemm on `x` ([m, k]).
///
/// # Safety
/// `y` must be valid for writes of `m * n` f32 and no other thread may write columns `rows` meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product_rows(
    q: Quant,
    w: &[u8],
    x: &[f32],
    acts: Option<&QActs>,
    m: usize,
    k: usize,
    n: usize,
    rows: Range<usize>,
    y: *mut f32,
    scratch: &mut Vec<f32>,
) {
    assert!(rows.end <= n && x.len() == m * k);
    if let Some(a) = acts {
        let rb = q.row_bytes(k).unwrap_or(1);
        let tile = ((128 << 10) / rb).max(4);
        for start in rows.clone().step_by(tile) {
            let t = start..(start + tile).min(rows.end);
            for r in 0..m {
                // SAFETY: row r's columns `t` lie within y's m * n values; the caller owns them.
                let yr = unsafe { std::slice::from_raw_parts_mut(y.add(r * n + t.start), t.len()) };
                dot_rows(q, w, a, r, t.clone(), yr);
            }
        }
        return;
    }
    dequantize_rows(q, w, k, rows.clone(), scratch);
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

/// The whole product `x W^T` ([m, n]) on the calling thread (tests and small cases).
pub fn matmul(q: Quant, w: &[u8], x: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    let mut acts = QActs::default();
    let use_dots = m <= DOT_MAX_ROWS;
    if use_dots {
        acts.quantize(q, x, k);
    }
    let mut scratch = Vec::new();
    // SAFETY: y holds m * n values and this thread alone writes it.
    unsafe {
        product_rows(
            q,
            w,
            x,
            use_dots.then_some(&acts),
            m,
            k,
            n,
            0..n,
            y.as_mut_ptr(),
            &mut scratch,
        )
    };
    y
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::ActRow;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn f16_at(p: *const u8) -> f32 {
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                std::ptr::read_unaligned(p.cast::<u16>()) as i32,
            )))
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Sums of 4 products of unsigned `ax` and signed `sy` bytes, as 8 i32.
    #[inline(always)]
    unsafe fn dot_us8<const VNNI: bool>(ax: __m256i, sy: __m256i) -> __m256i {
        unsafe {
            if VNNI {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), ax, sy)
            } else {
                _mm256_madd_epi16(_mm256_set1_epi16(1), _mm256_maddubs_epi16(ax, sy))
            }
        }
    }

    /// Sums of 4 products of signed bytes, as 8 f32.
    #[inline(always)]
    unsafe fn dot_i8<const VNNI: bool>(x: __m256i, y: __m256i) -> __m256 {
        unsafe {
            let ax = _mm256_sign_epi8(x, x);
            let sy = _mm256_sign_epi8(y, x);
            _mm256_cvtepi32_ps(dot_us8::<VNNI>(ax, sy))
        }
    }

    /// 32 nibbles (low ones first) of 16 bytes as 32 bytes.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        unsafe {
            let t = _mm_loadu_si128(p.cast());
            let b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
            _mm256_and_si256(b, _mm256_set1_epi8(0xF))
        }
    }

    /// Bit `i` of `x` as byte `i` (0xFF or 0).
    #[inline(always)]
    unsafe fn bytes_from_bits(x: u32) -> __m256i {
        unsafe {
            let shuf = _mm256_set_epi64x(
                0x0303030303030303,
                0x0202020202020202,
                0x0101010101010101,
                0,
            );
            let b = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
            let b = _mm256_or_si256(b, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
            _mm256_cmpeq_epi8(b, _mm256_set1_epi64x(-1))
        }
    }

    macro_rules! block32_kernel {
        ($name:ident, $name_vnni:ident, $bytes:expr, |$wb:ident| $load:expr) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            pub(in super::super) unsafe fn $name(w: &[u8], a: ActRow) -> f32 {
                unsafe { body::<false>(w, a) }
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            pub(in super::super) unsafe fn $name_vnni(w: &[u8], a: ActRow) -> f32 {
                unsafe { body::<true>(w, a) }
            }
            /// `acc` plus block `b`'s dot product.
            #[inline(always)]
            unsafe fn block<const VNNI: bool>(
                wp: *const u8,
                yp: *const i8,
                a: ActRow,
                b: usize,
                acc: __m256,
            ) -> __m256 {
                unsafe {
                    let $wb = wp.add(b * $bytes);
                    let qx: __m256i = $load;
                    let qy = _mm256_loadu_si256(yp.add(b * 32).cast());
                    let d = _mm256_set1_ps(f16_at($wb) * *a.d.get_unchecked(b));
                    _mm256_fmadd_ps(d, dot_i8::<VNNI>(qx, qy), acc)
                }
            }
            #[inline(always)]
            unsafe fn body<const VNNI: bool>(w: &[u8], a: ActRow) -> f32 {
                unsafe {
                    let nb = w.len() / $bytes;
                    let (wp, yp) = (w.as_ptr(), a.qs.as_ptr());
                    // Two accumulators in registers (an array indexed by `b & 1` lives on the stack; a closure
                    // loses the target features).
                    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for b in (0..nb - nb % 2).step_by(2) {
                        acc0 = block::<VNNI>(wp, yp, a, b, acc0);
                        acc1 = block::<VNNI>(wp, yp, a, b + 1, acc1);
                    }
                    if nb % 2 == 1 {
                        acc0 = block::<VNNI>(wp, yp, a, nb - 1, acc0);
                    }
                    hsum(_mm256_add_ps(acc0, acc1))
                }
            }
        };
    }

    pub mod q8_0 {
        use super::*;
        block32_kernel!(avx2, vnni, 34, |wb| _mm256_loadu_si256(wb.add(2).cast()));
    }
    pub mod q4_0 {
        use super::*;
        block32_kernel!(avx2, vnni, 18, |wb| _mm256_sub_epi8(
            nibbles(wb.add(2)),
            _mm256_set1_epi8(8)
        ));
    }
    pub mod q5_0 {
        use super::*;
        block32_kernel!(avx2, vnni, 22, |wb| {
            let qh = std::ptr::read_unaligned(wb.add(2).cast::<u32>());
            let hi = _mm256_andnot_si256(bytes_from_bits(qh), _mm256_set1_epi8(0xF0u8 as i8));
            _mm256_or_si256(nibbles(wb.add(6)), hi)
        });
    }

    /// # Safety
    /// AVX2, FMA and F16C (and AVX-512 VNNI/VL with `VNNI`); `a` must match `w`'s blocks.
    pub unsafe fn dot_q8_0<const VNNI: bool>(w: &[u8], a: ActRow) -> f32 {
        unsafe {
            if VNNI {
                q8_0::vnni(w, a)
            } else {
                q8_0::avx2(w, a)
            }
        }
    }
    /// # Safety
    /// As [`dot_q8_0`].
    pub unsafe fn dot_q4_0<const VNNI: bool>(w: &[u8], a: ActRow) -> f32 {
        unsafe {
            if VNNI {
                q4_0::vnni(w, a)
            } else {
                q4_0::avx2(w, a)
            }
        }
    }
    /// # Safety
    /// As [`dot_q8_0`].
    pub unsafe fn dot_q5_0<const VNNI: bool>(w: &[u8], a: ActRow) -> f32 {
        unsafe {
            if VNNI {
                q5_0::vnni(w, a)
            } else {
                q5_0::avx2(w, a)
            }
        }
    }

    /// The shuffle that repeats 16-bit lane `i` over a register.
    #[inline(always)]
    unsafe fn scale_shuffle_k4(i: usize) -> __m256i {
        unsafe { _mm256_set1_epi16((((2 * i + 1) as i16) << 8) | (2 * i) as i16) }
    }

    /// A Q4_K block's eight 6-bit scales (low 128 bits) and eight mins (high 128 bits) as 16-bit lanes.
    #[inline(always)]
    unsafe fn mins_scales_k4(x: *const u8) -> __m256i {
        unsafe {
            let mut u = [0u32; 4];
            std::ptr::copy_nonoverlapping(x.add(4), u.as_mut_ptr().cast::<u8>(), 12);
            const K1: u32 = 0x3f3f3f3f;
            const K2: u32 = 0x0f0f0f0f;
            const K3: u32 = 0x03030303;
            u[3] = ((u[2] >> 4) & K2) | (((u[1] >> 6) & K3) << 4);
            let uaux = u[1] & K1;
            u[1] = (u[2] & K2) | (((u[0] >> 6) & K3) << 4);
            u[2] = uaux;
            u[0] &= K1;
            _mm256_cvtepu8_epi16(_mm_set_epi32(
                u[3] as i32,
                u[2] as i32,
                u[1] as i32,
                u[0] as i32,
            ))
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `a` must match `w`'s blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q4_k(w: &[u8], a: ActRow) -> f32 {
        unsafe {
            let nb = w.len() / 144;
            let m4 = _mm256_set1_epi8(0xF);
            let mut acc = _mm256_setzero_ps();
            let mut acc_m = _mm_setzero_ps();
            for i in 0..nb {
                let x = w.as_ptr().add(i * 144);
                let yd = *a.d.get_unchecked(i);
                let d = yd * f16_at(x);
                let dmin = -yd * f16_at(x.add(2));
                let mins_scales = mins_scales_k4(x);
                let q8sums = _mm256_loadu_si256(a.bsums.as_ptr().add(i * 16).cast());
                let q8s = _mm_hadd_epi16(
                    _mm256_castsi256_si128(q8sums),
                    _mm256_extracti128_si256(q8sums, 1),
                );
                let prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_scales, 1), q8s);
                acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);
                let sc128 = _mm256_castsi256_si128(mins_scales);
                let scales = _mm256_set_m128i(sc128, sc128);
                let mut sumi = _mm256_setzero_si256();
                let mut q4 = x.add(16);
                let mut q8 = a.qs.as_ptr().add(i * 256);
                for j in 0..4 {
                    let sl = _mm256_shuffle_epi8(scales, scale_shuffle_k4(2 * j));
                    let sh = _mm256_shuffle_epi8(scales, scale_shuffle_k4(2 * j + 1));
                    let bits = _mm256_loadu_si256(q4.cast());
                    q4 = q4.add(32);
                    let ql = _mm256_and_si256(bits, m4);
                    let qh = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
                    let y0 = _mm256_loadu_si256(q8.cast());
                    let y1 = _mm256_loadu_si256(q8.add(32).cast());
                    q8 = q8.add(64);
                    let pl = _mm256_madd_epi16(sl, _mm256_maddubs_epi16(ql, y0));
                    let ph = _mm256_madd_epi16(sh, _mm256_maddubs_epi16(qh, y1));
                    sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(pl, ph));
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
            }
            let m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
            let m = _mm_add_ss(m, _mm_movehdup_ps(m));
            hsum(acc) + _mm_cvtss_f32(m)
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C; `a` must match `w`'s blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6_k(w: &[u8], a: ActRow) -> f32 {
        unsafe {
            let nb = w.len() / 210;
            let m4 = _mm256_set1_epi8(0xF);
            let m2 = _mm256_set1_epi8(3);
            let m32s = _mm256_set1_epi8(32);
            let mut acc = _mm256_setzero_ps();
            for i in 0..nb {
                let x = w.as_ptr().add(i * 210);
                let d = *a.d.get_unchecked(i) * f16_at(x.add(208));
                let mut q4 = x;
                let mut qh = x.add(128);
                let mut q8 = a.qs.as_ptr().add(i * 256);
                let scales = _mm_loadu_si128(x.add(192).cast());
                let mut sumi = _mm256_setzero_si256();
                for j in 0..2 {
                    let is = 4 * j;
                    let sc = |k: usize| {
                        let lo = (2 * (is + k)) as i8;
                        let m = _mm_set_epi8(
                            lo + 1,
                            lo + 1,
                            lo + 1,
                            lo + 1,
                            lo + 1,
                            lo + 1,
                            lo + 1,
                            lo + 1,
                            lo,
                            lo,
                            lo,
                            lo,
                            lo,
                            lo,
                            lo,
                            lo,
                        );
                        _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, m))
                    };
                    let b1 = _mm256_loadu_si256(q4.cast());
                    let b2 = _mm256_loadu_si256(q4.add(32).cast());
                    q4 = q4.add(64);
                    let bh = _mm256_loadu_si256(qh.cast());
                    qh = qh.add(32);
                    let h0 = _mm256_slli_epi16(_mm256_and_si256(bh, m2), 4);
                    let h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 2), m2), 4);
                    let h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 4), m2), 4);
                    let h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(bh, 6), m2), 4);
                    let v = [
                        _mm256_or_si256(_mm256_and_si256(b1, m4), h0),
                        _mm256_or_si256(_mm256_and_si256(b2, m4), h1),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b1, 4), m4), h2),
                        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b2, 4), m4), h3),
                    ];
                    for (k, vk) in v.iter().enumerate() {
                        let y = _mm256_loadu_si256(q8.add(32 * k).cast());
                        let p = _mm256_sub_epi16(
                            _mm256_maddubs_epi16(*vk, y),
                            _mm256_maddubs_epi16(m32s, y),
                        );
                        sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sc(k), p));
                    }
                    q8 = q8.add(128);
                }
                acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
            }
            hsum(acc)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backend::half_matmul::test_data as data;

    /// Random blocks of `q` for `n` rows of `k`: random bytes with sane (small, finite) f16 scales.
    pub(crate) fn random_blocks(q: Quant, n: usize, k: usize, seed: u32) -> Vec<u8> {
        let rb = q.row_bytes(k).unwrap();
        let vals = data(n * rb, seed);
        let mut w: Vec<u8> = vals.iter().map(|v| ((v + 1.0) * 127.9) as u8).collect();
        let scale = |w: &mut [u8], at: usize, v: f32| {
            w[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes())
        };
        for (b, blk) in w.chunks_exact_mut(q.block_bytes()).enumerate() {
            let s = 0.01 + 0.001 * (b % 7) as f32;
            match q {
                Quant::Q6K => scale(blk, 208, s),
                Quant::Q4_1 | Quant::Q5_1 | Quant::Q4K | Quant::Q5K => {
                    scale(blk, 0, s);
                    scale(blk, 2, -0.5 * s);
                }
                _ => scale(blk, 0, s),
            }
        }
        w
    }

    #[test]
    fn kernels_equal_the_portable_ones_and_dequantized_products() {
        let (m, k, n) = (3, 512, 9);
        let x = data(m * k, 5);
        for q in ALL {
            let w = random_blocks(q, n, k, 17);
            let deq = crate::weights::gguf::dequantize(q.ggml(), &w, n * k).unwrap();
            let mut a = QActs::default();
            a.quantize(q, &x, k);
            let rb = q.row_bytes(k).unwrap();
            for r in 0..m {
                for j in 0..n {
                    let row = &w[j * rb..(j + 1) * rb];
                    let p = dot_with(Isa::Portable, q, row, &a, r);
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * deq[j * k + i]).sum();
                    let scale: f32 = (0..k).map(|i| (x[r * k + i] * deq[j * k + i]).abs()).sum();
                    // Activation quantization: about 1/254 of each term.
                    assert!(
                        (p - exact).abs() <= 0.01 * scale + 1e-4,
                        "{q:?} r={r} j={j}: {p} vs {exact}"
                    );
                    for isa in [Isa::Avx2, Isa::Avx2Vnni] {
                        let v = dot_with(isa, q, row, &a, r);
                        assert!(
                            (v - p).abs() <= 1e-5 * scale.max(1.0),
                            "{q:?} {isa:?} r={r} j={j}: {v} vs portable {p}"
                        );
                    }
                }
            }
            // Prefill through sgemm equals the dequantized product.
            let big = 40;
            let xb = data(big * k, 9);
            let y = matmul(q, &w, &xb, big, k, n);
            for r in 0..big {
                for j in 0..n {
                    let exact: f32 = (0..k).map(|i| xb[r * k + i] * deq[j * k + i]).sum();
                    assert!((y[r * n + j] - exact).abs() < 1e-3, "{q:?} prefill");
                }
            }
        }
    }
}
