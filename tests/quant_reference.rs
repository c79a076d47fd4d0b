//! NVFP4 against ModelOpt's NVFP4QTensor and NF4/FP4 against bitsandbytes' quantize_4bit, from golden files
//! that scripts/golden/quant_torch.py wrote with the real libraries (CPU).
use half::{bf16, f16};
use std::path::PathBuf;
use trt_diff::quant::bnb::{self, Absmax, Kind};
use trt_diff::quant::nvfp4;

fn golden(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/quant")
        .join(name);
    std::fs::read(&p)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/golden/quant_torch.py", p.display()))
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn u16s(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2)
        .map(|c| u16::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Runs `f` on the golden input `file` read as dtype `dt` (f32 / f16 / bf16).
macro_rules! with_input {
    ($dt:expr, $file:expr, |$v:ident| $body:expr) => {{
        let raw = golden($file);
        match $dt {
            "f32" => {
                let $v: Vec<f32> = f32s(&raw);
                $body
            }
            "f16" => {
                let $v: Vec<f16> = u16s(&raw).into_iter().map(f16::from_bits).collect();
                $body
            }
            _ => {
                let $v: Vec<bf16> = u16s(&raw).into_iter().map(bf16::from_bits).collect();
                $body
            }
        }
    }};
}

#[test]
fn nvfp4_matches_modelopt() {
    for dt in ["f32", "f16", "bf16"] {
        let (fast, scalar) = with_input!(dt, &format!("nvfp4.in.{dt}.bin"), |v| (
            nvfp4::quantize(&v),
            nvfp4::quantize_scalar(&v)
        ));
        let want_sw = f32s(&golden(&format!("nvfp4.{dt}.global.bin")))[0];
        assert_eq!(
            fast.global_scale.to_bits(),
            want_sw.to_bits(),
            "{dt} global scale"
        );
        assert_eq!(
            fast.block_scales,
            golden(&format!("nvfp4.{dt}.scales.bin")),
            "{dt} block scales"
        );
        let want = golden(&format!("nvfp4.{dt}.packed.bin"));
        let bad: Vec<usize> = (0..want.len())
            .filter(|&i| fast.packed[i] != want[i])
            .take(5)
            .collect();
        assert!(bad.is_empty(), "{dt} packed differs at bytes {bad:?}");
        assert_eq!(scalar.packed, fast.packed, "{dt} scalar path");
        assert_eq!(scalar.block_scales, fast.block_scales);
        assert_eq!(scalar.global_scale.to_bits(), fast.global_scale.to_bits());
    }
}

#[test]
fn bnb_code_tables_match() {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    assert_eq!(
        bits(&f32s(&golden("bnb.nf4.map.bin"))),
        bits(&Kind::Nf4.code())
    );
    assert_eq!(
        bits(&f32s(&golden("bnb.fp4.map.bin"))),
        bits(&Kind::Fp4.code())
    );
    let dynamic = f32s(&golden("bnb.dynamic.map.bin"));
    let ours = bnb::dynamic_map();
    let diff: Vec<(usize, f32, f32)> = (0..256)
        .filter(|&i| dynamic[i].to_bits() != ours[i].to_bits())
        .map(|i| (i, dynamic[i], ours[i]))
        .collect();
    assert!(diff.is_empty(), "dynamic map differs: {diff:?}");
}

/// bitsandbytes dequantizes into the input dtype; the golden holds those values widened to f32.
fn as_dtype(v: Vec<f32>, dt: &str) -> Vec<f32> {
    match dt {
        "f16" => v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect(),
        "bf16" => v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect(),
        _ => v,
    }
}

fn cases() -> Vec<String> {
    serde_json::from_slice(&golden("bnb.cases.json")).expect("bnb.cases.json")
}

/// "bnb.nf4.bf16.64.1" -> (kind, dtype, blocksize, double quant)
fn parse(case: &str) -> (Kind, String, usize, bool) {
    let p: Vec<&str> = case.split('.').collect();
    let kind = if p[1] == "nf4" { Kind::Nf4 } else { Kind::Fp4 };
    (kind, p[2].to_string(), p[3].parse().unwrap(), p[4] == "1")
}

fn bnb_case(case: &str) -> (Vec<u8>, Vec<f32>) {
    let (kind, dt, bs, _) = parse(case);
    if dt == "odd" {
        let v = f32s(&golden("bnb.odd.in.bin"));
        let (fast, scalar) = (
            bnb::quantize_fast(&v, kind, bs),
            bnb::quantize_scalar(&v, kind, bs),
        );
        assert_eq!(fast, scalar, "{case}: scalar and parallel paths differ");
        return fast;
    }
    with_input!(dt.as_str(), &format!("bnb.in.{dt}.bin"), |v| {
        let (fast, scalar) = (
            bnb::quantize_fast(&v, kind, bs),
            bnb::quantize_scalar(&v, kind, bs),
        );
        assert_eq!(fast, scalar, "{case}: scalar and parallel paths differ");
        fast
    })
}

#[test]
fn nf4_fp4_match_bitsandbytes() {
    let cases = cases();
    assert!(cases.len() >= 20);
    for case in &cases {
        let (kind, dt, bs, dq) = parse(case);
        let (packed, absmax) = bnb_case(case);
        let want = golden(&format!("{case}.packed.bin"));
        let bad: Vec<usize> = (0..want.len())
            .filter(|&i| packed[i] != want[i])
            .take(5)
            .collect();
        assert!(
            bad.is_empty(),
            "{case}: packed differs at {bad:?} ({} bytes)",
            want.len()
        );
        if !dq {
            assert_eq!(
                absmax,
                f32s(&golden(&format!("{case}.absmax.bin"))),
                "{case} absmax"
            );
            continue;
        }
        // Double quantization with bitsandbytes' own offset is bit-exact; our offset is the correctly
        // rounded mean, torch's sum order differs by CPU and thread count, so only its closeness is checked.
        let want_off = f32s(&golden(&format!("{case}.offset.bin")))[0];
        let ulps = (bnb::mean(&absmax).to_bits() as i64 - want_off.to_bits() as i64).abs();
        assert!(
            ulps <= 4,
            "{case}: offset {} vs bitsandbytes {want_off} ({ulps} ulp)",
            bnb::mean(&absmax)
        );
        let nested = bnb::nest(&absmax, Some(want_off));
        assert_eq!(
            nested.codes,
            golden(&format!("{case}.qabsmax.bin")),
            "{case} nested codes"
        );
        assert_eq!(
            nested.absmax,
            f32s(&golden(&format!("{case}.absmax2.bin"))),
            "{case} nested absmax"
        );
        let deq_file = format!("{case}.deq.bin");
        let deq_path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/quant")
            .join(&deq_file);
        if deq_path.exists() {
            let q = bnb::Quant4 {
                kind,
                blocksize: bs,
                packed,
                absmax: Absmax::Nested(nested),
            };
            let want = f32s(&golden(&deq_file));
            assert_eq!(
                as_dtype(q.dequantize(want.len()), &dt),
                want,
                "{case} dequantized"
            );
        }
    }
}

#[test]
fn plain_absmax_dequantizes_like_bitsandbytes() {
    for case in cases().iter().filter(|c| c.ends_with(".0")) {
        let deq_file = format!("{case}.deq.bin");
        if !PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden/quant")
            .join(&deq_file)
            .exists()
        {
            continue;
        }
        let (kind, dt, bs, _) = parse(case);
        let (packed, absmax) = bnb_case(case);
        let want = f32s(&golden(&deq_file));
        let q = bnb::Quant4 {
            kind,
            blocksize: bs,
            packed,
            absmax: Absmax::Plain(absmax),
        };
        assert_eq!(as_dtype(q.dequantize(want.len()), &dt), want, "{case}");
    }
}
