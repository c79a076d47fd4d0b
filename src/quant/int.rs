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
    /// The scales as small multiples of a step per group of blocks (a K-quant's super-blocks), when they are.
    pub steps: Option<ScaleSteps>,
}

/// Block scales as `multiple * step` exactly (in f32): one step per `group` consecutive blocks of a row (a GGUF
/// K-quant's super-block `d`, an f16 value) and an INT8 multiple per block (its sub-block scale), which an engine
/// stores in 8 bits a block instead of a 16-bit scale.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleSteps {
    pub group: usize,
    /// [rows, cols / block / group], positive.
    pub steps: Vec<f32>,
    /// [rows, cols / block], in 1..=127.
    pub multiples: Vec<i8>,
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
            steps: None,
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
            steps: None,
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
            steps: None,
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
            offsets: self.offsets.as_ref().map(|o| o[blocks.clone()].to_vec()),
            steps: self.steps.as_ref().map(|st| ScaleSteps {
                group: st.group,
                steps: st.steps[blocks.start / st.group..blocks.end / st.group].to_vec(),
                multiples: st.multiples[blocks].to_vec(),
            }),
        }
    }

    /// The blocks with their scales factored over `steps` (one per `group` blocks, the file's super-block `d`) as
    /// [`ScaleSteps`], exactly, or as they are where some block's scale is no such multiple. A multiple of 128 (the
    /// largest sub-block of a Q6_K super-block: llama.cpp scales its scales to -128) becomes 64 with the block's
    /// codes doubled where they fit; a block of one repeated code (an all-zero block's scale of 1) takes the step
    /// itself, its offset keeping its value.
    pub fn with_steps(mut self, group: usize, steps: &[f32]) -> Self {
        let blocks = self.scales.len();
        if group == 0
            || !(self.cols / self.block).is_multiple_of(group)
            || steps.len() * group != blocks
        {
            return self;
        }
        let (lo, hi) = self.bits.range();
        let mut multiples = Vec::with_capacity(blocks);
        let mut kept_steps = Vec::with_capacity(steps.len());
        for (g, &d) in steps.iter().enumerate() {
            let step = match d.abs() {
                s if s > 0.0 && s.is_finite() => s,
                _ => 1.0,
            };
            kept_steps.push(step);
            for b in g * group..(g + 1) * group {
                let s = self.scales[b];
                let k = s / step;
                let codes = &mut self.codes[b * self.block..(b + 1) * self.block];
                if k.fract() == 0.0 && (1.0..=127.0).contains(&k) && k * step == s {
                    multiples.push(k as i8);
                } else if k == 128.0 && codes.iter().all(|&c| (lo..=hi).contains(&(2.0 * c as f32)))
                {
                    codes.iter_mut().for_each(|c| *c *= 2);
                    self.scales[b] = 64.0 * step;
                    multiples.push(64);
                } else if codes.iter().all(|&c| c == codes[0]) {
                    let c = codes[0] as f32;
                    match self.offsets.as_mut() {
                        Some(o) => o[b] += c * (s - step),
                        None if c == 0.0 => {}
                        None => return self,
                    }
                    self.scales[b] = step;
                    multiples.push(1);
                } else {
                    return self;
                }
            }
        }
        self.steps = Some(ScaleSteps {
            group,
            steps: kept_steps,
            multiples,
        });
        self
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

    /// Two Q6_K-like super-blocks of 4 blocks of 8 (`d * sc`, llama.cpp's largest sub-block scale at -128, a
    /// negative `d`, an all-zero block) and Q4_K-like affine blocks (a scale of 0): the scales factor exactly
    /// into multiples of the steps, the values unchanged; rows slice them; a scale off the grid keeps the values.
    #[test]
    fn k_quant_scales_factor_into_multiples_of_their_super_block_step() {
        let (block, group) = (8, 4);
        let steps = [-0.0625f32, 0.5];
        let subs: [i32; 8] = [-128, 3, 0, 127, 5, -128, 1, -7];
        let mut values = Vec::new();
        let mut scales = Vec::new();
        for (b, &sc) in subs.iter().enumerate() {
            let s = steps[b / group] * sc as f32;
            scales.push(s);
            values.extend((0..block).map(|i| s * ((i as i32 * 7 + b as i32) % 64 - 32) as f32));
        }
        let w = IntBlocks::with_scales(&values, 2, 32, block, Bits::Int8, scales);
        let f = w.clone().with_steps(group, &steps);
        let st = f.steps.as_ref().expect("factored");
        assert_eq!(st.steps, [0.0625, 0.5]);
        for (b, &m) in st.multiples.iter().enumerate() {
            assert!((1..=127).contains(&m), "{b}: {m}");
            assert_eq!(m as f32 * st.steps[b / group], f.scales[b], "{b}");
        }
        assert_eq!(st.multiples[0], 64, "128 becomes 64 with the codes doubled");
        assert_eq!(f.dequantize(), values);
        assert_eq!(f.dequantize(), w.dequantize());
        let second = f.rows(1..2);
        let st2 = second.steps.as_ref().unwrap();
        assert_eq!(
            (st2.steps.as_slice(), &st2.multiples[..]),
            (&[0.5][..], &st.multiples[4..])
        );
        assert_eq!(second.dequantize(), values[32..]);
        // Affine blocks (scale * q + low, q in 0..16) with one sub-block scale of 0: a constant block.
        // (An all-zero block's stand-in scale 1 is no multiple of this step.)
        let (d, sc, lows) = (0.375f32, [3, 0, 9, 1], [-1.0f32, 0.75, -2.0, 0.5]);
        let mut values = Vec::new();
        for b in 0..4 {
            values
                .extend((0..block).map(|i| d * sc[b] as f32 * ((i * 5 + b) % 16) as f32 + lows[b]));
        }
        let scales: Vec<f32> = sc.iter().map(|&k| d * k as f32).collect();
        let a = IntBlocks::with_affine(&values, 1, 32, block, scales, &lows).with_steps(4, &[d]);
        let st = a.steps.as_ref().expect("factored");
        assert_eq!(st.multiples, [3, 1, 9, 1]);
        assert_eq!(a.dequantize(), values);
        // A scale that is no multiple of its step: left as it was.
        let w = IntBlocks::with_scales(&[0.3; 8], 1, 8, 8, Bits::Int8, vec![0.1]);
        assert!(w.with_steps(1, &[0.25]).steps.is_none());
    }
}
