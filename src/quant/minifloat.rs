//! Small float formats (FP8 E4M3FN / E5M2, FP4 E2M1) as data, with one encoder and one decoder for all of them.
//! Rounding is to nearest, ties to even; out-of-range values follow ONNX's `saturate` rules.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Minifloat {
    pub name: &'static str,
    pub mant_bits: u32,
    pub bias: i32,
    /// The sign bit (0x80 for 8-bit formats, 0x8 for 4-bit).
    pub sign_bit: u8,
    /// Largest finite magnitude's code.
    pub max_code: u8,
    /// Code of NaN (positive), if the format has one.
    pub nan: Option<u8>,
    /// Code of +infinity, if the format has one.
    pub inf: Option<u8>,
}

pub const E4M3FN: Minifloat = Minifloat {
    name: "float8e4m3fn",
    mant_bits: 3,
    bias: 7,
    sign_bit: 0x80,
    max_code: 0x7E,
    nan: Some(0x7F),
    inf: None,
};

pub const E5M2: Minifloat = Minifloat {
    name: "float8e5m2",
    mant_bits: 2,
    bias: 15,
    sign_bit: 0x80,
    max_code: 0x7B,
    nan: Some(0x7F),
    inf: Some(0x7C),
};

pub const E2M1: Minifloat = Minifloat {
    name: "float4e2m1",
    mant_bits: 1,
    bias: 1,
    sign_bit: 0x8,
    max_code: 0x7,
    nan: None,
    inf: None,
};

impl Minifloat {
    fn min_normal_exp(&self) -> i32 {
        1 - self.bias
    }

    pub fn max_value(&self) -> f32 {
        self.decode(self.max_code)
    }

    /// What an unrepresentable magnitude becomes without saturation: infinity, else NaN, else the maximum.
    fn overflow_code(&self, saturate: bool) -> u8 {
        if saturate {
            self.max_code
        } else {
            self.inf.or(self.nan).unwrap_or(self.max_code)
        }
    }

    pub fn encode(&self, x: f32, saturate: bool) -> u8 {
        let sign = if x.is_sign_negative() {
            self.sign_bit
        } else {
            0
        };
        if x.is_nan() {
            return self.nan.unwrap_or(self.max_code) | sign;
        }
        let a = x.abs();
        if a == 0.0 {
            return sign;
        }
        if a.is_infinite() {
            return self.overflow_code(saturate) | sign;
        }
        let bits = a.to_bits();
        let exp = (bits >> 23) as i32 - 127;
        let code = if exp < self.min_normal_exp() {
            // Subnormal in the target: count steps of 2^(min_normal_exp - mant_bits); exact scaling by a power of 2.
            let steps = a * 2f32.powi(self.mant_bits as i32 - self.min_normal_exp());
            steps.round_ties_even() as u32
        } else {
            let shift = 23 - self.mant_bits;
            let rounded = bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1);
            let top = rounded >> shift;
            let exp_field = (top >> self.mant_bits) as i32 - 127 + self.bias;
            ((exp_field as u32) << self.mant_bits) | (top & ((1 << self.mant_bits) - 1))
        };
        if code > self.max_code as u32 {
            return self.overflow_code(saturate) | sign;
        }
        code as u8 | sign
    }

    pub fn decode(&self, code: u8) -> f32 {
        let sign = if code & self.sign_bit != 0 { -1.0 } else { 1.0 };
        let mag = code & (self.sign_bit - 1);
        if Some(mag) == self.nan
            || (self.nan.is_some() && self.inf.is_some() && mag > self.inf.unwrap())
        {
            return f32::NAN;
        }
        if Some(mag) == self.inf {
            return sign * f32::INFINITY;
        }
        let exp_field = (mag >> self.mant_bits) as i32;
        let mant = (mag & ((1 << self.mant_bits) - 1)) as f32 / (1 << self.mant_bits) as f32;
        let v = if exp_field == 0 {
            mant * 2f32.powi(self.min_normal_exp())
        } else {
            (1.0 + mant) * 2f32.powi(exp_field - self.bias)
        };
        sign * v
    }
}

/// FP8 E4M3FN encoding specialised for speed (the quantizers' inner loop). Same results as
/// `E4M3FN.encode(x, saturate)` for every input; the tests check that.
#[inline(always)]
pub fn e4m3fn(x: f32, saturate: bool) -> u8 {
    fp8_fast::<3, 7, 0x7E>(x, if saturate { 0x7E } else { 0x7F }, 0x7F)
}

/// FP8 E5M2 encoding specialised for speed; same results as `E5M2.encode(x, saturate)`.
#[inline(always)]
pub fn e5m2(x: f32, saturate: bool) -> u8 {
    fp8_fast::<2, 15, 0x7B>(x, if saturate { 0x7B } else { 0x7C }, 0x7F)
}

/// Round-to-nearest-even from f32 bits: subnormal targets by exact scaling plus the 2^23 trick (rounds a
/// value below 2^22 to an integer), normal targets by the carry-into-exponent bit rounding.
#[inline(always)]
fn fp8_fast<const M: u32, const BIAS: i32, const MAX: u32>(x: f32, overflow: u8, nan: u8) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let a = bits & 0x7FFF_FFFF;
    if a > 0x7F80_0000 {
        return nan | sign;
    }
    let min_normal = ((127 + 1 - BIAS) as u32) << 23;
    let code = if a < min_normal {
        // Steps of 2^(1 - BIAS - M): scale by the inverse (a power of two, exact) and round.
        let steps = f32::from_bits(a) * f32::from_bits(((127 - 1 + BIAS + M as i32) as u32) << 23);
        (steps + 8_388_608.0).to_bits() - 0x4B00_0000
    } else {
        let shift = 23 - M;
        let r = a + ((1 << (shift - 1)) - 1) + ((a >> shift) & 1);
        (r >> shift) - (((127 - BIAS) as u32) << M)
    };
    if code > MAX {
        overflow | sign
    } else {
        code as u8 | sign
    }
}

/// E4M3FN code -> value, as a table (the block quantizers decode one scale per block).
pub fn e4m3fn_value(code: u8) -> f32 {
    static TABLE: std::sync::LazyLock<[f32; 256]> =
        std::sync::LazyLock::new(|| std::array::from_fn(|c| E4M3FN.decode(c as u8)));
    TABLE[code as usize]
}

/// Packs 4-bit codes two to a byte, element 0 in the low nibble (ONNX and ModelOpt order).
pub fn pack_nibbles(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] & 0xF) | (p.get(1).copied().unwrap_or(0) << 4))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips() {
        for f in [E4M3FN, E5M2] {
            for c in 0..=255u8 {
                let v = f.decode(c);
                if v.is_nan() {
                    continue;
                }
                assert_eq!(f.encode(v, false), c, "{} code {c:#x} value {v}", f.name);
            }
        }
        for c in 0..16u8 {
            assert_eq!(E2M1.encode(E2M1.decode(c), true), c);
        }
    }

    #[test]
    fn known_values_and_rules() {
        assert_eq!(E4M3FN.max_value(), 448.0);
        assert_eq!(E5M2.max_value(), 57344.0);
        assert_eq!(E2M1.max_value(), 6.0);
        // Ties go to even: 1.0625 is halfway between 1.0 and 1.125 in E4M3.
        assert_eq!(E4M3FN.encode(1.0625, true), E4M3FN.encode(1.0, true));
        assert_eq!(E4M3FN.encode(1000.0, true), 0x7E);
        assert_eq!(E4M3FN.encode(1000.0, false), 0x7F);
        assert_eq!(E5M2.encode(f32::INFINITY, false), 0x7C);
        // E2M1 grid: 0, 0.5, 1, 1.5, 2, 3, 4, 6; 2.5 ties to 2 (even mantissa), 5 ties to 4.
        assert_eq!(E2M1.decode(E2M1.encode(2.5, true)), 2.0);
        assert_eq!(E2M1.decode(E2M1.encode(5.0, true)), 4.0);
        assert_eq!(E2M1.decode(E2M1.encode(-0.75, true)), -1.0);
        assert_eq!(pack_nibbles(&[0x1, 0x2, 0x3]), vec![0x21, 0x03]);
    }
}
