//! Input element types of the quantizers (f32, f16, bf16) and a borrowed tensor of any of them.
//! Every quantizer is generic over `Elem`, so bf16/f16 weights are widened one value at a time and never copied
//! into an f32 buffer.
use half::{bf16, f16};
use std::borrow::Cow;

pub trait Elem: Copy + Send + Sync + bytemuck::Pod + 'static {
    /// The safetensors dtype name.
    const DTYPE: &'static str;
    /// The torch dtype name as bitsandbytes records it (`str(torch.bfloat16)` less "torch.").
    const TORCH: &'static str;
    fn f32(self) -> f32;
    /// Rounds an f32 result to this type and back (torch computes a bf16/f16 op in f32 and rounds once).
    fn narrow(x: f32) -> f32;
    /// `dst[i] = src[i].f32()` (f16: F16C eight at a time where the CPU has it).
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.f32();
        }
    }
    /// The largest |value|, NaNs ignored (as `f32::max` folds them), 0 for none.
    fn abs_max(v: &[Self]) -> f32 {
        v.iter().fold(0f32, |m, x| m.max(x.f32().abs()))
    }
}

/// `abs_max` of 16-bit floats on their bits: magnitudes order as their bit patterns, and the patterns above the
/// infinity's are NaNs.
fn abs_max_bits(v: &[u16], inf: u16) -> f32 {
    v.iter()
        .map(|b| b & 0x7FFF)
        .filter(|&b| b <= inf)
        .max()
        .unwrap_or(0) as f32
}

impl Elem for f32 {
    const DTYPE: &'static str = "F32";
    const TORCH: &'static str = "float32";
    #[inline(always)]
    fn f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn narrow(x: f32) -> f32 {
        x
    }
}

impl Elem for bf16 {
    const DTYPE: &'static str = "BF16";
    const TORCH: &'static str = "bfloat16";
    #[inline(always)]
    fn f32(self) -> f32 {
        // bf16 is the top half of an f32: widening is a shift.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn narrow(x: f32) -> f32 {
        bf16::from_f32(x).f32()
    }
    fn abs_max(v: &[Self]) -> f32 {
        let bits = abs_max_bits(bytemuck::cast_slice(v), 0x7F80) as u16;
        bf16::from_bits(bits).f32()
    }
}

impl Elem for f16 {
    const DTYPE: &'static str = "F16";
    const TORCH: &'static str = "float16";
    #[inline(always)]
    fn f32(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn narrow(x: f32) -> f32 {
        f16::from_f32(x).to_f32()
    }
    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(&mut dst[..src.len()]);
    }
    fn abs_max(v: &[Self]) -> f32 {
        let bits = abs_max_bits(bytemuck::cast_slice(v), 0x7C00) as u16;
        f16::from_bits(bits).to_f32()
    }
}

/// A tensor's values in their stored type; borrowed from a mapping when aligned, copied otherwise.
pub enum Values<'a> {
    F32(Cow<'a, [f32]>),
    F16(Cow<'a, [f16]>),
    Bf16(Cow<'a, [bf16]>),
}

fn cast<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
    match bytemuck::try_cast_slice(bytes) {
        Ok(s) => Cow::Borrowed(s),
        // Unaligned data (a header length that is not a multiple of the element size): copy once.
        Err(_) => {
            let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            Cow::Owned(v)
        }
    }
}

impl<'a> Values<'a> {
    /// Interprets little-endian bytes of a safetensors dtype; None for dtypes the quantizers do not read.
    pub fn from_bytes(dtype: &str, bytes: &'a [u8]) -> Option<Self> {
        Some(match dtype {
            "F32" => Values::F32(cast(bytes)),
            "F16" => Values::F16(cast(bytes)),
            "BF16" => Values::Bf16(cast(bytes)),
            _ => return None,
        })
    }

    pub fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(v) => v.len(),
            Values::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Values::F32(v) => v.to_vec(),
            Values::F16(v) => v.iter().map(|x| x.f32()).collect(),
            Values::Bf16(v) => v.iter().map(|x| x.f32()).collect(),
        }
    }
}

/// Calls a generic function with the concrete slice inside a `Values`.
#[macro_export]
macro_rules! with_values {
    ($values:expr, |$v:ident| $body:expr) => {
        match $values {
            $crate::quant::elem::Values::F32(c) => {
                let $v: &[f32] = c;
                $body
            }
            $crate::quant::elem::Values::F16(c) => {
                let $v: &[half::f16] = c;
                $body
            }
            $crate::quant::elem::Values::Bf16(c) => {
                let $v: &[half::bf16] = c;
                $body
            }
        }
    };
}

/// Largest absolute value (NaN wins, as in torch), in parallel.
pub fn amax<T: Elem>(v: &[T]) -> f32 {
    use rayon::prelude::*;
    let bits = v
        .par_chunks(1 << 16)
        .map(|c| {
            c.iter()
                .fold(0u32, |m, x| m.max(x.f32().to_bits() & 0x7FFF_FFFF))
        })
        .reduce(|| 0u32, u32::max);
    f32::from_bits(bits)
}

/// Rows of `len` elements handed to rayon in chunks of about 64K elements (whole rows/blocks only), so
/// every parallel worker writes to its own disjoint output slices.
pub fn par_unit(block: usize) -> usize {
    ((1 << 16) / block).max(1) * block
}

/// Largest |x| of a block, NaN winning (as torch's max does): a max over the magnitude bits, which vectorizes.
#[inline(always)]
pub fn block_amax(x: &[f32]) -> f32 {
    let mut m = 0u32;
    for v in x {
        m = m.max(v.to_bits() & 0x7FFF_FFFF);
    }
    f32::from_bits(m)
}

/// Runs `$body` compiled for AVX2 when the CPU has it (the block kernels then vectorize 8 wide), else as built.
/// The arithmetic is the same IEEE operations either way; Rust never fuses or reorders them.
#[macro_export]
macro_rules! simd_dispatch {
    (fn $name:ident<$t:ident: Elem>($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name<$t: Elem>($($arg: $ty),*) {
            #[inline(always)]
            fn body<$t: Elem>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2<$t: Elem>($($arg: $ty),*) {
                    body::<$t>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2, checked just above.
                    return unsafe { avx2::<$t>($($arg),*) };
                }
            }
            body::<$t>($($arg),*)
        }
    };
}
