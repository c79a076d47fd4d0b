//! Element formats against golden files from ml_dtypes and onnx.reference (scripts/golden/quant_formats.py).
use half::{bf16, f16};
use std::path::PathBuf;
use trt_diff::quant::fp8::{quantize_mxfp8, quantize_mxfp8_scalar};
use trt_diff::quant::int::{self, Bits, Granularity};
use trt_diff::quant::minifloat::{E2M1, E4M3FN, E5M2, Minifloat, e4m3fn, e5m2};

fn golden(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/quant")
        .join(name);
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/golden/quant_formats.py", p.display()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn all_f16() -> Vec<f32> {
    (0..=u16::MAX).map(|b| f16::from_bits(b).to_f32()).collect()
}

/// Compares our codes with a golden file; reports the first few mismatches with their inputs. ml_dtypes (and
/// onnx.reference, which casts through it) keeps the top bits of a NaN's payload, so E5M2 NaN inputs give 0x7E
/// where we write the canonical 0x7F (E5M2 has three NaN codes); a NaN input only has to give a NaN code of
/// the same sign. FP4 has no NaN code: ml_dtypes (and so onnx.reference) turns NaN into a zero of the opposite
/// sign, an artefact of its bit arithmetic; we write ±6 (saturation). FP4 NaN inputs are not compared.
fn check(label: &str, xs: &[f32], ours: impl Fn(f32) -> u8, file: &str) {
    let want = golden(file);
    assert_eq!(want.len(), xs.len(), "{file}");
    let f = formats().into_iter().find(|(n, _)| *n == label).unwrap().1;
    let fp4_nan = f.nan.is_none();
    let same = |x: f32, o: u8, w: u8| {
        o == w
            || (fp4_nan && x.is_nan())
            || (x.is_nan()
                && f.decode(o).is_nan()
                && f.decode(w).is_nan()
                && (o & f.sign_bit) == (w & f.sign_bit))
    };
    let bad: Vec<String> = xs
        .iter()
        .zip(&want)
        .filter(|&(&x, &w)| !same(x, ours(x), w))
        .take(8)
        .map(|(&x, &w)| {
            format!(
                "x={x:e} ({:#010x}) ours={:#04x} ref={w:#04x}",
                x.to_bits(),
                ours(x)
            )
        })
        .collect();
    assert!(bad.is_empty(), "{label} vs {file}:\n{}", bad.join("\n"));
}

fn formats() -> [(&'static str, Minifloat); 3] {
    [("e4m3fn", E4M3FN), ("e5m2", E5M2), ("e2m1", E2M1)]
}

#[test]
fn all_f16_values_match_ml_dtypes_and_onnx() {
    let xs = all_f16();
    for (name, f) in formats() {
        // ml_dtypes never saturates, except FP4 which has neither infinity nor NaN.
        check(
            name,
            &xs,
            |x| f.encode(x, f.inf.is_none() && f.nan.is_none()),
            &format!("f16_all.{name}.ml.bin"),
        );
        check(
            name,
            &xs,
            |x| f.encode(x, true),
            &format!("f16_all.{name}.sat.bin"),
        );
        if f.nan.is_some() {
            check(
                name,
                &xs,
                |x| f.encode(x, false),
                &format!("f16_all.{name}.nosat.bin"),
            );
        }
    }
}

#[test]
fn random_and_edge_f32_match_ml_dtypes_and_onnx() {
    let xs = f32s(&golden("f32_edge.in.bin"));
    assert!(xs.len() > 20_000);
    for (name, f) in formats() {
        check(
            name,
            &xs,
            |x| f.encode(x, f.inf.is_none() && f.nan.is_none()),
            &format!("f32_edge.{name}.ml.bin"),
        );
        check(
            name,
            &xs,
            |x| f.encode(x, true),
            &format!("f32_edge.{name}.sat.bin"),
        );
        if f.nan.is_some() {
            check(
                name,
                &xs,
                |x| f.encode(x, false),
                &format!("f32_edge.{name}.nosat.bin"),
            );
        }
    }
}

#[test]
fn fast_fp8_encoders_equal_the_table_driven_ones() {
    let mut xs = all_f16();
    xs.extend(f32s(&golden("f32_edge.in.bin")));
    // Every 4099th f32 bit pattern (a prime stride covers all exponents and mantissa phases).
    xs.extend((0..=u32::MAX / 4099).map(|i| f32::from_bits(i * 4099)));
    for sat in [false, true] {
        for &x in &xs {
            assert_eq!(
                e4m3fn(x, sat),
                E4M3FN.encode(x, sat),
                "e4m3fn {x:e} sat={sat}"
            );
            assert_eq!(e5m2(x, sat), E5M2.encode(x, sat), "e5m2 {x:e} sat={sat}");
        }
    }
}

#[test]
fn mxfp8_matches_the_ocp_rule_and_scalar_path() {
    let x = f32s(&golden("mxfp8.in.bin"));
    let (codes, scales) = quantize_mxfp8(&x);
    assert_eq!(scales, golden("mxfp8.scales.bin"));
    assert_eq!(codes, golden("mxfp8.codes.bin"));
    assert_eq!((codes.clone(), scales.clone()), quantize_mxfp8_scalar(&x));
    // bf16 and f16 inputs take the same path after widening.
    let b: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let wide: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
    assert_eq!(quantize_mxfp8(&b), quantize_mxfp8(&wide));
    assert_eq!(quantize_mxfp8_scalar(&b), quantize_mxfp8(&wide));
}

#[test]
fn int8_and_int4_match_onnx_quantize_linear() {
    let x = f32s(&golden("int.in.bin"));
    let cols = 128;
    for (file, g, bits) in [
        ("int8_tensor", Granularity::Tensor, Bits::Int8),
        ("int8_channel", Granularity::Channel, Bits::Int8),
        ("int8_block32", Granularity::Block(32), Bits::Int8),
        ("int4_block32", Granularity::Block(32), Bits::Int4),
    ] {
        let (q, s) = int::quantize(&x, cols, g, bits);
        let want_q: Vec<i8> = golden(&format!("{file}.q.bin"))
            .iter()
            .map(|&b| b as i8)
            .collect();
        assert_eq!(f32s(&golden(&format!("{file}.s.bin"))), s, "{file} scales");
        assert_eq!(want_q, q, "{file} values");
        assert_eq!(
            int::quantize_scalar(&x, cols, g, bits),
            (q.clone(), s),
            "{file} scalar path"
        );
        if bits == Bits::Int4 {
            assert_eq!(int::unpack_int4(&int::pack_int4(&q), q.len()), q);
        }
    }
}
