//! NF4 and FP4 exactly as bitsandbytes 0.50 quantizes on the CPU (`quantize_4bit`), with its double
//! quantization of the block absmax (`compress_statistics`: mean offset, then 8-bit blockwise quantization with
//! the dynamic map in blocks of 256, done by bitsandbytes' native CPU lookup-table kernel).
//!
//! 4-bit: per block, `absmax = max|x|` (clamped to 1e-38), `q = bucketize(clamp(x * (1/absmax), -1, 1),
//! midpoints)`; a trailing partial block divides by its absmax instead of multiplying by the reciprocal.
//! Codes are packed two to a byte, element 0 in the HIGH nibble (the opposite of ONNX/NVFP4).
use super::elem::{Elem, par_unit};
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nf4,
    Fp4,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Nf4 => "nf4",
            Kind::Fp4 => "fp4",
        }
    }

    /// bitsandbytes' `get_4bit_type`, indexed by code.
    pub fn code(self) -> [f32; 16] {
        match self {
            Kind::Nf4 => NF4,
            Kind::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }

    /// Codes in ascending order of value (bitsandbytes' `argsort(code)`; its sort puts +0 (code 0) before
    /// -0 (code 8), which the golden tests confirm).
    fn order(self) -> [u8; 16] {
        match self {
            Kind::Nf4 => std::array::from_fn(|i| i as u8),
            Kind::Fp4 => [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3],
        }
    }

    /// The code of 0.0 (what the padding element of an odd count becomes).
    fn zero_code(self) -> u8 {
        self.order()[bucket(0.0, &self.bounds()) as usize]
    }

    /// Midpoints between consecutive sorted code values, computed in f32 as torch does.
    fn bounds(self) -> [f32; 15] {
        let code = self.code();
        let order = self.order();
        std::array::from_fn(|i| (code[order[i] as usize] + code[order[i + 1] as usize]) / 2.0)
    }
}

/// The NF4 levels (normal-distribution quantiles, bitsandbytes' table).
const NF4: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 (E2M1 with its own exponent bias) before normalisation by the maximum, 12. Code 8 is
/// +0.0: bitsandbytes writes the Python int `-0`, which is 0.
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];
/// Block size of the nested (double) quantization of absmax.
pub const NESTED_BLOCK: usize = 256;

/// A quantized tensor in bitsandbytes' `QuantState` terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Quant4 {
    pub kind: Kind,
    pub blocksize: usize,
    /// Packed codes, `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    Plain(Vec<f32>),
    Nested(Nested),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Nested {
    /// 8-bit codes of `absmax - offset` in the dynamic map.
    pub codes: Vec<u8>,
    /// Per 256-block absmax of `absmax - offset`.
    pub absmax: Vec<f32>,
    pub offset: f32,
}

#[inline(always)]
fn bucket(x: f32, bounds: &[f32; 15]) -> u8 {
    // torch.bucketize(right=False): the number of boundaries strictly below x.
    let mut n = 0u8;
    for b in bounds {
        n += (*b < x) as u8;
    }
    n
}

#[inline(always)]
fn block_absmax<T: Elem>(b: &[T]) -> f32 {
    // A max over magnitude bits: vectorizes, and NaN wins as in torch.
    let mut m = 0u32;
    for v in b {
        m = m.max(v.f32().to_bits() & 0x7FFF_FFFF);
    }
    f32::from_bits(m)
}

/// The absmax values `quantize_4bit` stores, without quantizing (the clamp applies to a partial last block).
pub fn block_absmax_all<T: Elem>(values: &[T], blocksize: usize) -> Vec<f32> {
    let full = values.len() - values.len() % blocksize;
    let mut v: Vec<f32> = values.par_chunks(blocksize).map(block_absmax).collect();
    if full < values.len()
        && let Some(l) = v.last_mut()
    {
        *l = l.max(1e-38);
    }
    v
}

/// One block's codes (unpacked) and its stored absmax.
#[inline(always)]
fn quantize_block<T: Elem>(b: &[T], full: bool, t: &Tables, out: &mut [u8]) -> f32 {
    let raw = block_absmax(b);
    let am = raw.max(1e-38);
    let inv = 1.0 / am;
    // Full blocks multiply by the reciprocal, a trailing partial block divides (as bitsandbytes does).
    if full {
        for (o, v) in out.iter_mut().zip(b) {
            *o = bucket((v.f32() * inv).clamp(-1.0, 1.0), &t.bounds);
        }
    } else {
        for (o, v) in out.iter_mut().zip(b) {
            *o = bucket((v.f32() / am).clamp(-1.0, 1.0), &t.bounds);
        }
    }
    if t.kind == Kind::Fp4 {
        for o in out.iter_mut() {
            *o = t.order[*o as usize];
        }
    }
    // bitsandbytes stores the clamped absmax only for the trailing partial block.
    if full { raw } else { am }
}

/// A kind's sorted-code tables, computed once per tensor.
struct Tables {
    kind: Kind,
    bounds: [f32; 15],
    order: [u8; 16],
}

impl Tables {
    fn new(kind: Kind) -> Self {
        Tables {
            kind,
            bounds: kind.bounds(),
            order: kind.order(),
        }
    }
}

crate::simd_dispatch! {
    fn quantize_unit<T: Elem>(v: &[T], first: usize, full: usize, bs: usize, kind: Kind, p: &mut [u8], a: &mut [f32]) {
        let t = Tables::new(kind);
        let mut codes = [0u8; 4096];
        for (j, (b, am)) in v.chunks(bs).zip(a.iter_mut()).enumerate() {
            let start = first + j * bs;
            let c = &mut codes[..b.len()];
            *am = quantize_block(b, start < full, &t, c);
            let po = j * bs / 2;
            for (k, pair) in c.chunks(2).enumerate() {
                p[po + k] = (pair[0] << 4) | pair.get(1).copied().unwrap_or(kind.zero_code());
            }
        }
    }
}

/// Scalar reference: whole tensor, one block after another (bitsandbytes' default CPU kernel's arithmetic).
pub fn quantize_scalar<T: Elem>(values: &[T], kind: Kind, blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let n = values.len();
    // An odd count is padded with a quantized 0.0, as bitsandbytes pads the scaled values.
    let mut codes = vec![kind.zero_code(); n + n % 2];
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    let full = n - n % blocksize;
    for (i, b) in values.chunks(blocksize).enumerate() {
        let start = i * blocksize;
        // Written out element by element, independent of the block kernel it checks.
        let raw = b.iter().fold(
            0f32,
            |m, v| if v.f32().abs() > m { v.f32().abs() } else { m },
        );
        let am = raw.max(1e-38);
        let bounds = kind.bounds();
        for (k, v) in b.iter().enumerate() {
            let s = if start < full {
                v.f32() * (1.0 / am)
            } else {
                v.f32() / am
            };
            let s = s.clamp(-1.0, 1.0);
            let idx = bounds.iter().take_while(|&&m| m < s).count();
            codes[start + k] = kind.order()[idx];
        }
        absmax.push(if start < full { raw } else { am });
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// Fast path: blocks in parallel, packed directly. Identical to `quantize_scalar`.
pub fn quantize_fast<T: Elem>(values: &[T], kind: Kind, blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let n = values.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(blocksize)];
    let full = n - n % blocksize;
    // Units hold whole blocks and an even element count (blocks are >= 32), so packing never straddles units.
    let unit = par_unit(blocksize);
    values
        .par_chunks(unit)
        .zip(packed.par_chunks_mut(unit / 2))
        .zip(absmax.par_chunks_mut(unit / blocksize))
        .enumerate()
        .for_each(|(u, ((v, p), a))| quantize_unit(v, u * unit, full, blocksize, kind, p, a));
    (packed, absmax)
}

/// `quantize_4bit(A, blocksize, compress_statistics=double_quant, quant_type)`.
pub fn quantize<T: Elem>(values: &[T], kind: Kind, blocksize: usize, double_quant: bool) -> Quant4 {
    let (packed, absmax) = quantize_fast(values, kind, blocksize);
    let absmax = if double_quant {
        Absmax::Nested(nest(&absmax, None))
    } else {
        Absmax::Plain(absmax)
    };
    Quant4 {
        kind,
        blocksize,
        packed,
        absmax,
    }
}

/// Mean of absmax (the nested offset). torch sums f32 in a CPU- and thread-count-dependent order, so its last
/// bit is not reproducible; this one is the correctly rounded mean of the f32 values.
pub fn mean(v: &[f32]) -> f32 {
    (v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64) as f32
}

/// Double quantization of absmax; `offset` overrides the mean (tests feed bitsandbytes' own value).
pub fn nest(absmax: &[f32], offset: Option<f32>) -> Nested {
    let offset = offset.unwrap_or_else(|| mean(absmax));
    let shifted: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let (codes, absmax2) = quantize_blockwise(&shifted, NESTED_BLOCK);
    Nested {
        codes,
        absmax: absmax2,
        offset,
    }
}

impl Nested {
    /// The absmax values bitsandbytes recovers: `dynamic[code] * absmax2 + offset`.
    pub fn absmax(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.codes
            .iter()
            .enumerate()
            .map(|(i, &c)| map[c as usize] * self.absmax[i / NESTED_BLOCK] + self.offset)
            .collect()
    }
}

impl Quant4 {
    pub fn absmax_values(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested(n) => n.absmax(),
        }
    }

    /// `dequantize_4bit`: code value * absmax of its block, `n` values.
    pub fn dequantize(&self, n: usize) -> Vec<f32> {
        let code = self.kind.code();
        let absmax = self.absmax_values();
        (0..n)
            .map(|i| {
                let b = self.packed[i / 2];
                let c = if i % 2 == 0 { b >> 4 } else { b & 0xF };
                code[c as usize] * absmax[i / self.blocksize]
            })
            .collect()
    }
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: 256 sorted levels, computed in f32 the way torch does
/// (linspace, pairwise means, scaled by a power of ten).
pub fn dynamic_map() -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        let b = linspace(0.1, 1.0, items);
        let scale = 10f64.powi(i - 6) as f32;
        let means: Vec<f32> = b.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        data.extend(means.iter().map(|m| scale * m));
        data.extend(means.iter().map(|m| -scale * m));
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0f32; 256];
    out.copy_from_slice(&data);
    out
}

/// torch.linspace for f32 on the CPU: the first half counts up from `start`, the second half down from `end`,
/// each value one fused multiply-add (torch's kernel is contracted; checked against its output).
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

const LUT_SIZE: usize = 65536;

/// bitsandbytes' CPU kernel maps [-1, 1] onto 65536 bins and looks up the nearest level of each bin.
fn quantize_lut(code: &[f32; 256]) -> Vec<u8> {
    let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = vec![0u8; LUT_SIZE];
    let mut idx = 0usize;
    for (i, l) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
        while idx < 255 && mid[idx] < val {
            idx += 1;
        }
        *l = idx as u8;
    }
    lut
}

/// `quantize_blockwise(A, code=dynamic, blocksize)` as the native CPU kernel computes it. The bin index
/// expression is contracted to one fused multiply-add by the compiler that built bitsandbytes.
pub fn quantize_blockwise(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let lut = quantize_lut(&dynamic_map());
    let mut out = vec![0u8; values.len()];
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for (b, o) in values.chunks(blocksize).zip(out.chunks_mut(blocksize)) {
        let am = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            continue;
        }
        let inv = 1.0 / am;
        for (q, v) in o.iter_mut().zip(b) {
            let t = ((v * inv).clamp(-1.0, 1.0) + 1.0) * 0.5;
            let i = t.mul_add((LUT_SIZE - 1) as f32, 0.5) as u16;
            *q = lut[i as usize];
        }
    }
    (out, absmax)
}

/// The `quant_state.bitsandbytes__<kind>` JSON that `QuantState.as_dict(packed=True)` stores, byte for byte
/// as Python's `json.dumps` writes it.
pub fn quant_state_json(q: &Quant4, torch_dtype: &str, shape: &[usize]) -> String {
    let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut s = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
        q.kind.name(),
        q.blocksize,
        torch_dtype,
        shape.join(", ")
    );
    if let Absmax::Nested(n) = &q.absmax {
        s += &format!(
            ", \"nested_blocksize\": {NESTED_BLOCK}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
            py_float(n.offset as f64)
        );
    }
    s.push('}');
    s
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
pub fn py_float(x: f64) -> String {
    if !x.is_finite() {
        return if x.is_nan() {
            "NaN".into()
        } else if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let e = format!("{x:e}");
    let (mant, exp) = e.split_once('e').unwrap_or((&e, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{x}");
        if s.contains('.') { s } else { s + ".0" }
    } else {
        format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}
