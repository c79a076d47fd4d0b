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
