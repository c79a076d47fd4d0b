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

/// INT8 SmoothQuant against ModelOpt (`mtq.quantize` with INT8_SMOOTHQUANT_CFG, alpha 0.5, on one linear layer:
/// scripts/golden/quant_smoothquant.py): the per-channel activation maxima, the smoothing scales, the smoothed
/// weight, its per-output-channel INT8 scales and codes, the per-tensor input range; and the exported W8A8 graph
/// (`models::qdq::Linears` with smoothing, on ONNX Runtime) against ModelOpt's fake-quantized layer output.
#[test]
fn int8_smoothquant_matches_modelopt() {
    use std::collections::HashMap;
    use trt_diff::backend::{Engine, HostTensor};
    use trt_diff::models::ops::Ops;
    use trt_diff::models::qdq::{LinearWeights, Linears, Weight};
    use trt_diff::onnx::{DataType, Dim};
    use trt_diff::quant::LinearPrecision;
    use trt_diff::quant::int::{Bits, Granularity, quantize};
    use trt_diff::quant::policy::Policy;
    use trt_diff::quant::smooth::smoothing;
    use trt_diff::weights::safetensors_file::Checkpoint;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/quant/smoothquant.safetensors");
    let ck = Checkpoint::open(&path).unwrap();
    let t = |n: &str| ck.get(n).unwrap().to_f32().unwrap();
    let (x, w, b) = (t("x"), t("weight"), t("bias"));
    let (n, k) = (b.len(), x.len() / 64);
    let alpha = t("alpha")[0];
    // Per-channel maxima as the calibration graph's `chmax` output reduces them.
    let mut act = vec![0f32; k];
    for row in x.chunks_exact(k) {
        for (m, v) in act.iter_mut().zip(row) {
            *m = m.max(v.abs());
        }
    }
    assert_eq!(act, t("act_amax"));
    let s = smoothing(&act, &w, n, k, alpha).unwrap();
    let want_p = t("pre_quant_scale");
    for (j, (a, e)) in s.pre_quant_scale.iter().zip(&want_p).enumerate() {
        assert_eq!(a.to_bits(), e.to_bits(), "pre_quant_scale[{j}]: {a} vs {e}");
    }
    assert_eq!(s.input_amax.to_bits(), t("input_amax")[0].to_bits());
    let ws = s.smooth_weight(&w);
    assert_eq!(
        ws.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        t("smoothed_weight")
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        "smoothed weight"
    );
    // Per-output-channel INT8: scale amax/127; ModelOpt's fake quantization = code * scale.
    let (codes, scales) = quantize(&ws, k, Granularity::Channel, Bits::Int8);
    for (r, (sc, am)) in scales.iter().zip(t("weight_amax")).enumerate() {
        assert!(
            (sc - am / 127.0).abs() <= 1e-7 * am,
            "row {r}: scale {sc} vs amax {am}"
        );
    }
    let fq = t("weight_fq");
    for (i, (c, e)) in codes.iter().zip(&fq).enumerate() {
        let d = *c as f32 * scales[i / k];
        assert!(
            (d - e).abs() <= 1e-6 * e.abs().max(1e-3),
            "weight {i}: {d} vs {e}"
        );
    }
    // The graph: Mul by the pre-quantization scale, INT8 Q/DQ, INT8 weight DQ, MatMul, bias.
    let mut o = Ops::new("smoothquant", 19, DataType::FLOAT);
    let xin =
        o.g.input(
            "x",
            DataType::FLOAT,
            vec![Dim::Fixed(64), Dim::Fixed(k as i64)],
        )
        .unwrap();
    let policy = Policy::uniform(LinearPrecision::Int8);
    let amax = HashMap::from([("fc".to_string(), 1.0f32)]);
    let channels = HashMap::from([("fc".to_string(), act.clone())]);
    let mut l = Linears::new(Some(&policy), &amax, None, 256.0, false);
    l.smooth = Some((alpha, &channels));
    let lw = LinearWeights {
        weight: &w,
        bias: Some(&b),
        out_features: n,
        in_features: k,
    };
    let y = l
        .linear(&mut o, "fc", "fc", "fc", &xin, Weight::F32(lw))
        .unwrap();
    assert_eq!(l.smoothed, 1);
    o.g.output(&y);
    let dir = tempfile::tempdir().unwrap();
    let onnx = dir.path().join("sq.onnx");
    trt_diff::onnx::save(o.g.finish(), &onnx, &Default::default()).unwrap();
    let mut e =
        trt_diff::backend::ort_backend::OrtEngine::open(&onnx, &Default::default()).unwrap();
    let out = e
        .run(&[("x".into(), HostTensor::from_f32(&[64, k], &x))])
        .unwrap();
    let got = out[0].1.to_f64().unwrap();
    let want = t("y");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let err = got
        .iter()
        .zip(&want)
        .fold(0f64, |m, (a, b)| m.max((a - *b as f64).abs()));
    // Activation rounding differs only where x p / s lands on a half (ModelOpt multiplies by 127/amax).
    assert!(
        err <= 1e-5 * scale,
        "graph output max abs err {err:.3e} (scale {scale:.3})"
    );
}
