//! Symmetric integer weights as ONNX `QuantizeLinear` computes them (`q = saturate(round_half_even(x / s))`,
//! zero point 0): INT8 per tensor, per output channel (rows) or per block along the last axis, and INT4
//! blockwise (weight-only), `s = amax / qmax` in f32 (qmax 127 or 7; an all-zero group gets s = 1).
//! INT4 is packed two to a byte, element 0 in the low nibble (ONNX order).
use super::elem::{Elem, par_unit};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    Tensor,
    /// One scale per row of `cols` elements.
    Channel,
    /// One scale per `block` elements along the last axis.
    Block(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bits {
    Int8,
    Int4,
}

impl Bits {
    fn range(self) -> (f32, f32) {
        match self {
            Bits::Int8 => (-128.0, 127.0),
            Bits::Int4 => (-8.0, 7.0),
        }
    }
}

pub fn scale(amax: f32, bits: Bits) -> f32 {
    if amax > 0.0 {
        amax / bits.range().1
    } else {
        1.0
    }
}

#[inline(always)]
fn q(x: f32, s: f32, bits: Bits) -> i8 {
    let (lo, hi) = bits.range();
    // NaN saturates to 0 through the cast, as numpy's int conversion of a clipped NaN is undefined anyway.
    (x / s).round_ties_even().clamp(lo, hi) as i8
}

/// Elements per scale group for a tensor of `cols` columns.
pub fn group(g: Granularity, len: usize, cols: usize) -> usize {
    match g {
        Granularity::Tensor => len.max(1),
        Granularity::Channel => cols.max(1),
        Granularity::Block(b) => b,
    }
}

/// Quantized values (one i8 per element, also for INT4) and one scale per group. `len % group == 0`.
pub fn quantize_scalar<T: Elem>(
    v: &[T],
    cols: usize,
    g: Granularity,
    bits: Bits,
) -> (Vec<i8>, Vec<f32>) {
    let n = group(g, v.len(), cols);
    assert!(v.len().is_multiple_of(n));
    let mut out = Vec::with_capacity(v.len());
    let mut scales = Vec::new();
    for b in v.chunks(n) {
        let s = scale(b.iter().fold(0f32, |m, x| m.max(x.f32().abs())), bits);
        scales.push(s);
        out.extend(b.iter().map(|x| q(x.f32(), s, bits)));
    }
    (out, scales)
}

pub fn quantize<T: Elem>(v: &[T], cols: usize, g: Granularity, bits: Bits) -> (Vec<i8>, Vec<f32>) {
    let n = group(g, v.len(), cols);
    assert!(v.len().is_multiple_of(n));
    if g == Granularity::Tensor {
        let s = scale(super::elem::amax(v), bits);
        let mut out = vec![0i8; v.len()];
        out.par_chunks_mut(1 << 16)
            .zip(v.par_chunks(1 << 16))
            .for_each(|(o, c)| {
                for (d, x) in o.iter_mut().zip(c) {
                    *d = q(x.f32(), s, bits);
                }
            });
        return (out, vec![s]);
    }
    let mut out = vec![0i8; v.len()];
    let mut scales = vec![0f32; v.len() / n];
    let unit = par_unit(n);
    out.par_chunks_mut(unit)
        .zip(scales.par_chunks_mut(unit / n))
        .zip(v.par_chunks(unit))
        .for_each(|((o, s), v)| {
            for ((ob, sb), vb) in o
                .chunks_exact_mut(n)
                .zip(s.iter_mut())
                .zip(v.chunks_exact(n))
            {
                *sb = scale(vb.iter().fold(0f32, |m, x| m.max(x.f32().abs())), bits);
                for (d, x) in ob.iter_mut().zip(vb) {
                    *d = q(x.f32(), *sb, bits);
                }
            }
        });
    (out, scales)
}

/// Two's-complement nibbles, element 0 low (an odd count pads a zero nibble).
pub fn pack_int4(q: &[i8]) -> Vec<u8> {
    q.chunks(2)
        .map(|p| (p[0] as u8 & 0xF) | ((p.get(1).copied().unwrap_or(0) as u8 & 0xF) << 4))
        .collect()
}

pub fn unpack_int4(p: &[u8], n: usize) -> Vec<i8> {
    (0..n)
        .map(|i| {
            let nib = if i % 2 == 0 {
                p[i / 2] & 0xF
            } else {
                p[i / 2] >> 4
            };
            ((nib << 4) as i8) >> 4
        })
        .collect()
}

/// A block `code * scale + offset` with its scale made positive (TensorRT's ONNX parser refuses negative scales;
/// a GGUF's Q4_0 `d` is negative in about half the blocks): the codes negated, then, where one no longer fits the
/// range (-(-8) = 8), all lowered by one with the scale moved into the offset. Returns (scale, offset).
fn positive_scale(codes: &mut [i16], scale: f32, offset: f32, bits: Bits) -> (f32, f32) {
    if scale >= 0.0 {
        return (scale, offset);
    }
    let s = -scale;
    codes.iter_mut().for_each(|c| *c = -*c);
    if codes.iter().any(|&c| c as f32 > bits.range().1) {
        codes.iter_mut().for_each(|c| *c -= 1);
        return (s, offset + s);
    }
    (s, offset)
}

/// Each `block` of `values` coded by `code(values, scale, block index) -> (codes, offset)` under its scale (0 or
/// not finite: 1), then made positive ([`positive_scale`]): (codes, scales, offsets).
fn code_blocks(
    values: &[f32],
    block: usize,
    scales: &[f32],
    bits: Bits,
    code: impl Fn(&[f32], f32, usize) -> (Vec<i16>, f32),
) -> (Vec<i8>, Vec<f32>, Vec<f32>) {
    debug_assert_eq!(scales.len() * block, values.len());
    let mut codes = Vec::with_capacity(values.len());
    let mut kept = Vec::with_capacity(scales.len());
    let mut offsets = Vec::with_capacity(scales.len());
    for (i, (b, &s)) in values.chunks(block).zip(scales).enumerate() {
        let s = if s == 0.0 || !s.is_finite() { 1.0 } else { s };
        let (mut c, o) = code(b, s, i);
        let (s, o) = positive_scale(&mut c, s, o, bits);
        codes.extend(c.iter().map(|&v| v as i8));
        kept.push(s);
        offsets.push(o);
    }
    (codes, kept, offsets)
}

/// A weight matrix [rows, cols] as integer codes with one f32 scale per `block` codes along each row, and for
/// asymmetric formats one f32 offset per block (`w = code * scale + offset`): TensorRT's weight-only INT4/INT8
/// blocked DQ (symmetric only, so an offset is a separate small product: [`crate::models::qdq`]). What a GGUF's
/// block formats become in an engine.
#[derive(Clone, Debug, PartialEq)]
pub struct IntBlocks {
    pub bits: Bits,
    pub block: usize,
    pub rows: usize,
    pub cols: usize,
    /// [rows, cols], one i8 per element (INT4 codes in -8..=7).
    pub codes: Vec<i8>,
    /// [rows, cols / block].
    pub scales: Vec<f32>,
    /// [rows, cols / block], for asymmetric blocks.
    pub offsets: Option<Vec<f32>>,
}

impl IntBlocks {
    /// Codes of `values` [rows, cols] under given block `scales`: exact where the values are multiples of their
    /// scale within the code range (a GGUF Q8_0 / Q4_0 / Q6_K block and its scale). Scales come out positive, as
    /// TensorRT requires ([`positive_scale`]): a block that needs it gets an offset. A scale of 0 (an all-zero
    /// block) becomes 1.
    pub fn with_scales(
        values: &[f32],
        rows: usize,
        cols: usize,
        block: usize,
        bits: Bits,
        scales: Vec<f32>,
    ) -> Self {
        let (lo, hi) = bits.range();
        let (codes, scales, offsets) = code_blocks(values, block, &scales, bits, |b, s, _| {
            let c = b
                .iter()
                .map(|&x| (x / s).round_ties_even().clamp(lo, hi) as i16)
                .collect();
            (c, 0.0)
        });
        IntBlocks {
            bits,
            block,
            rows,
            cols,
            codes,
            scales,
            offsets: offsets.iter().any(|&o| o != 0.0).then_some(offsets),
        }
    }

    /// INT4 codes of `values` [rows, cols] on the grid `scale * q + low` (q in 0..16) of each block: exact for
    /// values on it (a GGUF Q4_1 / Q4_K block), the nearest point otherwise. Codes are `q - 8`, offsets
    /// `low + 8 * scale` (scales made positive as in [`IntBlocks::with_scales`]).
    pub fn with_affine(
        values: &[f32],
        rows: usize,
        cols: usize,
        block: usize,
        scales: Vec<f32>,
        lows: &[f32],
    ) -> Self {
        let (codes, scales, offsets) =
            code_blocks(values, block, &scales, Bits::Int4, |b, s, i| {
                let low = lows[i];
                let c = b
                    .iter()
                    .map(|&x| ((x - low) / s).round().clamp(0.0, 15.0) as i16 - 8)
                    .collect();
                (c, low + 8.0 * s)
            });
        IntBlocks {
            bits: Bits::Int4,
            block,
            rows,
            cols,
            codes,
            scales,
            offsets: Some(offsets),
        }
    }

    /// `values` [rows, cols] quantized symmetrically per block (`s = amax / qmax`).
    pub fn quantized(values: &[f32], rows: usize, cols: usize, block: usize, bits: Bits) -> Self {
        let (codes, scales) = quantize(values, cols, Granularity::Block(block), bits);
        IntBlocks {
            bits,
            block,
            rows,
            cols,
            codes,
            scales,
            offsets: None,
        }
    }

    /// `values` [rows, cols] in INT4 per block over the block's own range: 16 levels from its minimum to its
    /// maximum (what asymmetric formats of more than 4 bits, Q5_0 / Q5_1 / Q5_K, are re-quantized to).
    pub fn quantized_affine(values: &[f32], rows: usize, cols: usize, block: usize) -> Self {
        let (mut scales, mut lows) = (Vec::new(), Vec::new());
        for b in values.chunks(block) {
            let (lo, hi) = b
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &x| {
                    (l.min(x), h.max(x))
                });
            scales.push((hi - lo) / 15.0);
            lows.push(lo);
        }
        Self::with_affine(values, rows, cols, block, scales, &lows)
    }

    /// Rows `range` (the parts of a fused matrix).
    pub fn rows(&self, range: std::ops::Range<usize>) -> Self {
        let per_row = self.cols / self.block;
        let blocks = range.start * per_row..range.end * per_row;
        IntBlocks {
            bits: self.bits,
            block: self.block,
            rows: range.len(),
            cols: self.cols,
            codes: self.codes[range.start * self.cols..range.end * self.cols].to_vec(),
            scales: self.scales[blocks.clone()].to_vec(),
            offsets: self.offsets.as_ref().map(|o| o[blocks].to_vec()),
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let zero = vec![0.0; self.scales.len()];
        let offsets = self.offsets.as_ref().unwrap_or(&zero);
        self.codes
            .chunks(self.block)
            .zip(self.scales.iter().zip(offsets))
            .flat_map(|(b, (&s, &o))| b.iter().map(move |&c| c as f32 * s + o))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_scales_come_out_positive_with_the_same_values() {
        // A Q4_0 block of negative d (its largest value positive: code -8), and one of positive d.
        let d = -0.5f32;
        let values: Vec<f32> = (0..32).map(|i| d * ((i % 16) as f32 - 8.0)).collect();
        let mut both = values.clone();
        both.extend((0..32).map(|i| 0.25 * ((i % 16) as f32 - 8.0)));
        let b = IntBlocks::with_scales(&both, 1, 64, 32, Bits::Int4, vec![d, 0.25]);
        assert!(b.scales.iter().all(|&s| s > 0.0));
        assert!(b.codes.iter().all(|&c| (-8..=7).contains(&c)));
        assert_eq!(
            b.offsets.as_deref(),
            Some(&[0.5, 0.0][..]),
            "-(-8) = 8 moved into the offset"
        );
        assert_eq!(b.dequantize(), both);
        // Affine blocks (Q4_K-like: scale * q + low) with a negative scale too.
        let (s, low) = (-0.125f32, 1.0f32);
        let q4k: Vec<f32> = (0..32).map(|i| s * (i % 16) as f32 + low).collect();
        let b = IntBlocks::with_affine(&q4k, 1, 32, 32, vec![s], &[low]);
        assert!(b.scales[0] > 0.0);
        let err = b
            .dequantize()
            .iter()
            .zip(&q4k)
            .fold(0f32, |m, (a, w)| m.max((a - w).abs()));
        assert!(err < 1e-6, "{err}");
    }
}
