//! `trt-diff quantize` end to end: outputs identical (sha256) to the files that scripts/golden/quant_checkpoint.py
//! loaded back into bitsandbytes / ModelOpt / safetensors, dequantizing to the values those tools computed;
//! clear errors for bad input.
use crate::common;
use half::{bf16, f16};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use trt_diff::quant::checkpoint::dequantize_named;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/quant")
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn sha256(p: &Path) -> String {
    trt_diff::fsutil::hex(&Sha256::digest(std::fs::read(p).unwrap()))
}

/// The dtype of a tensor in the input checkpoint (bitsandbytes dequantizes into it).
fn input_dtype(name: &str) -> String {
    let bytes = std::fs::read(golden_dir().join("ckpt.in.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    format!("{:?}", st.tensor(name).unwrap().dtype())
}

#[test]
fn quantized_files_match_what_python_loaded() {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("ckpt.json")).unwrap()).unwrap();
    let cfgs = record.as_object().unwrap();
    assert!(cfgs.len() >= 9);
    let dir = tempfile::tempdir().unwrap();
    let input = golden_dir().join("ckpt.in.safetensors");
    for (cfg, r) in cfgs {
        let out = dir.path().join(format!("{cfg}.safetensors"));
        let mut args = vec![
            "quantize".to_string(),
            input.display().to_string(),
            "--out".into(),
        ];
        args.push(out.display().to_string());
        args.push("--no-progress".into());
        args.extend(
            r["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string()),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = common::run(&args, true);
        assert!(run.stdout.contains("tensors quantized"), "{}", run.stdout);
        assert_eq!(
            sha256(&out),
            r["sha256"].as_str().unwrap(),
            "{cfg}: output differs from the golden file"
        );
        let bnb = cfg.starts_with("nf4") || cfg.starts_with("fp4");
        for name in r["quantized"].as_array().unwrap() {
            let name = name.as_str().unwrap();
            let want = f32s(
                &std::fs::read(golden_dir().join(format!("ckpt.{cfg}.{name}.deq.bin"))).unwrap(),
            );
            let mut got = dequantize_named(&out, name).unwrap();
            if bnb {
                // bitsandbytes returns values in the weight's dtype.
                let dt = input_dtype(name);
                for v in got.iter_mut() {
                    *v = match dt.as_str() {
                        "BF16" => bf16::from_f32(*v).to_f32(),
                        "F16" => f16::from_f32(*v).to_f32(),
                        _ => *v,
                    };
                }
            }
            assert_eq!(got.len(), want.len(), "{cfg} {name}");
            let bad: Vec<(usize, f32, f32)> = (0..got.len())
                .filter(|&i| got[i].to_bits() != want[i].to_bits())
                .map(|i| (i, got[i], want[i]))
                .collect();
            assert!(
                bad.is_empty(),
                "{cfg} {name}: {} values differ from the Python dequantization, first {:?}",
                bad.len(),
                &bad[..bad.len().min(4)]
            );
        }
        // inspect --against: formats, companions and per-tensor error, the error recomputed here from the
        // values the Python references dequantized.
        let run = common::run(
            &[
                "inspect",
                out.to_str().unwrap(),
                "--json",
                "--against",
                input.to_str().unwrap(),
            ],
            true,
        );
        let rep: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        let base = r["args"][1].as_str().unwrap();
        let orig_bytes = std::fs::read(&input).unwrap();
        let orig = safetensors::SafeTensors::deserialize(&orig_bytes).unwrap();
        let quantized: Vec<&str> = r["quantized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        for row in rep["tensors"].as_array().unwrap() {
            let name = row["name"].as_str().unwrap();
            if !quantized.contains(&name) {
                assert!(row["format"].is_null(), "{cfg} {name}: {row}");
                continue;
            }
            assert_eq!(row["format"], base, "{cfg} {name}");
            assert!(!row["companions"].as_array().unwrap().is_empty());
            let t = orig.tensor(name).unwrap();
            let reference =
                trt_diff::quant::elem::Values::from_bytes(&format!("{:?}", t.dtype()), t.data())
                    .unwrap()
                    .to_f32();
            let mut deq = f32s(
                &std::fs::read(golden_dir().join(format!("ckpt.{cfg}.{name}.deq.bin"))).unwrap(),
            );
            if bnb {
                // Our error is against the f32 dequantization, before bitsandbytes' cast to the weight dtype.
                deq = dequantize_named(&out, name).unwrap();
            }
            let want = trt_diff::quant::inspect::error_stats(&reference, &deq);
            let got = &row["error"];
            let (se, ss): (f64, f64) = reference
                .iter()
                .zip(&deq)
                .map(|(&a, &b)| ((a as f64 - b as f64).powi(2), (a as f64).powi(2)))
                .fold((0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1));
            let sqnr = 10.0 * (ss / se).log10();
            for (k, v) in [
                ("rmse", want.rmse),
                ("max_abs", want.max_abs),
                ("sqnr_db", sqnr),
            ] {
                let g = got[k].as_f64().unwrap();
                assert!(
                    (g - v).abs() <= 1e-9 * v.abs().max(1e-12),
                    "{cfg} {name} {k}: {g} vs {v}"
                );
            }
            assert!(sqnr > 8.0, "{cfg} {name}: implausible SQNR {sqnr}");
        }
        // Options are recorded; the input's own metadata survives.
        let bytes = std::fs::read(&out).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let m = meta.metadata().clone().unwrap();
        assert_eq!(m.get("format").map(String::as_str), Some("pt"));
        let rec: serde_json::Value = serde_json::from_str(&m["trt_diff.quantize"]).unwrap();
        assert_eq!(rec["format"], r["args"][1]);
    }
}

fn write_st(path: &Path, tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn fails(args: &[&str], needles: &[&str]) {
    let r = common::run(args, false);
    assert!(!r.stderr.contains("panicked"), "panic: {}", r.stderr);
    for n in needles {
        assert!(r.stderr.contains(n), "stderr lacks '{n}':\n{}", r.stderr);
    }
}

#[test]
fn bad_input_gives_clear_errors_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).display().to_string();
    let out = d("out.safetensors");
    fails(
        &[
            "quantize",
            &d("missing.safetensors"),
            "--format",
            "nf4",
            "--out",
            &out,
        ],
        &["missing.safetensors", "check the path"],
    );

    let good = d("good.safetensors");
    let w: Vec<u8> = (0..24 * 40)
        .flat_map(|i| bf16::from_f32(i as f32 * 0.01).to_le_bytes())
        .collect();
    let ids: Vec<u8> = (0..8i32).flat_map(|i| i.to_le_bytes()).collect();
    write_st(
        Path::new(&good),
        vec![
            ("a.weight", safetensors::Dtype::BF16, vec![24, 40], w),
            ("ids", safetensors::Dtype::I32, vec![8], ids),
        ],
    );
    // Truncated file and garbage header.
    let full = std::fs::read(&good).unwrap();
    std::fs::write(d("trunc.safetensors"), &full[..full.len() - 100]).unwrap();
    fails(
        &[
            "quantize",
            &d("trunc.safetensors"),
            "--format",
            "fp8",
            "--out",
            &out,
        ],
        &["trunc.safetensors", "truncated", "re-download"],
    );
    let mut bad = full.clone();
    bad[8] = b'#';
    std::fs::write(d("corrupt.safetensors"), &bad).unwrap();
    fails(
        &[
            "quantize",
            &d("corrupt.safetensors"),
            "--format",
            "fp8",
            "--out",
            &out,
        ],
        &["corrupt.safetensors", "not a readable safetensors"],
    );
    std::fs::write(d("tiny.safetensors"), b"abc").unwrap();
    fails(
        &[
            "quantize",
            &d("tiny.safetensors"),
            "--format",
            "fp8",
            "--out",
            &out,
        ],
        &["tiny.safetensors"],
    );
    // Unsupported dtype, explicitly included.
    fails(
        &[
            "quantize",
            &good,
            "--format",
            "int8",
            "--include",
            "ids",
            "--out",
            &out,
        ],
        &["'ids'", "I32", "--exclude"],
    );
    // 40 columns: not a multiple of 16 (nvfp4) or 32 (mxfp8); int4 block 16 does not divide 40 either.
    fails(
        &["quantize", &good, "--format", "nvfp4", "--out", &out],
        &["a.weight", "40", "multiple of", "--exclude"],
    );
    fails(
        &[
            "quantize",
            &good,
            "--format",
            "int4",
            "--block-size",
            "16",
            "--out",
            &out,
        ],
        &["a.weight", "--block-size"],
    );
    fails(
        &[
            "quantize",
            &good,
            "--format",
            "nf4",
            "--block-size",
            "48",
            "--out",
            &out,
        ],
        &["--block-size 48", "bitsandbytes"],
    );
    fails(
        &[
            "quantize",
            &good,
            "--format",
            "fp8",
            "--double-quant",
            "--out",
            &out,
        ],
        &["--double-quant"],
    );
    fails(
        &[
            "quantize",
            &good,
            "--format",
            "fp8",
            "--include",
            "[",
            "--out",
            &out,
        ],
        &["--include", "glob"],
    );
    assert!(
        !Path::new(&out).exists(),
        "a failed run left an output file"
    );
    assert_eq!(
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("partial"))
            .count(),
        0
    );
    // The same file works where the shapes fit: nf4 handles a partial block; ids pass through unchanged.
    common::run(
        &[
            "quantize",
            &good,
            "--format",
            "nf4",
            "--out",
            &out,
            "--no-progress",
        ],
        true,
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("ids").unwrap().data(),
        &full_tensor(&full, "ids")[..]
    );
    assert!(st.tensor("a.weight.quant_state.bitsandbytes__nf4").is_ok());
}

fn full_tensor(file: &[u8], name: &str) -> Vec<u8> {
    safetensors::SafeTensors::deserialize(file)
        .unwrap()
        .tensor(name)
        .unwrap()
        .data()
        .to_vec()
}
