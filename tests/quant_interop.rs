//! Pre-quantized checkpoints both ways: `quantize --layout comfyui` files against ComfyUI's own code (comfy-kitchen,
//! scripts/golden/quant_comfyui.py), ComfyUI / ModelOpt / bitsandbytes files as build sources (their weights read
//! back as those libraries dequantize them), the tiny Flux built from a ComfyUI file with the same Q/DQ bytes as
//! from the original, and hostile files refused with clear errors.
use crate::common;

use half::{bf16, f16};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::models::flux::{self as fluxm, ExportOptions, FluxConfig, FluxPrecision};
use trt_diff::onnx::DataType;
use trt_diff::quant::checkpoint::dequantize_named;
use trt_diff::weights::prequant::{QuantWeight, SourceLayout};
use trt_diff::weights::safetensors_file::Checkpoint;

fn quant_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/quant")
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn sha256(p: &Path) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

fn same_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}");
    let bad: Vec<(usize, f32, f32)> = (0..got.len())
        .filter(|&i| got[i].to_bits() != want[i].to_bits())
        .map(|i| (i, got[i], want[i]))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} values differ, first {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(4)]
    );
}

fn quantize(input: &Path, out: &Path, args: &[&str]) {
    let mut a = vec![
        "quantize",
        common::s(input),
        "--out",
        common::s(out),
        "--no-progress",
    ];
    a.extend_from_slice(args);
    let run = common::run(&a, true);
    assert!(run.stdout.contains("tensors quantized"), "{}", run.stdout);
}

#[test]
fn comfyui_files_match_comfy_kitchen_both_ways() {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(quant_dir().join("comfy.json")).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = quant_dir().join("comfy.in.safetensors");
    for cfg in ["nvfp4", "fp8"] {
        let r = &record[cfg];
        let out = dir.path().join(format!("{cfg}.safetensors"));
        quantize(&input, &out, &["--format", cfg, "--layout", "comfyui"]);
        assert_eq!(
            sha256(&out),
            r["sha256"].as_str().unwrap(),
            "{cfg}: output differs from the file comfy-kitchen read"
        );
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(ck.source_layout(), SourceLayout::Comfyui);
        assert!(
            !ck.names()
                .any(|n| n.ends_with(".comfy_quant") || n.ends_with("_scale"))
        );
        let names: Vec<&str> = r["quantized"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 2);
        for name in names {
            let want = f32s(
                &std::fs::read(quant_dir().join(format!("comfy.ours.{cfg}.{name}.deq.bin")))
                    .unwrap(),
            );
            // The standalone reader and the build's checkpoint reader both give ComfyUI's values.
            same_bits(
                &format!("{cfg} {name} (dequantize_named)"),
                &dequantize_named(&out, name).unwrap(),
                &want,
            );
            let t = ck.get(name).unwrap();
            same_bits(
                &format!("{cfg} {name} (Checkpoint)"),
                &t.to_f32().unwrap(),
                &want,
            );
            assert_eq!(t.shape, ck.shape(name).unwrap());
            assert!(t.quant.is_some(), "{cfg} {name}: stored form lost");
        }
        // comfy-kitchen's own quantization in ComfyUI's checkpoint form, read as ComfyUI dequantizes it.
        let theirs = quant_dir().join(format!("comfy.theirs.{cfg}.safetensors"));
        let tck = Checkpoint::open(&theirs).unwrap();
        assert_eq!(tck.source_layout(), SourceLayout::Comfyui);
        for name in ["blocks.0.attn.qkv.weight", "blocks.0.mlp.0.weight"] {
            let want = f32s(
                &std::fs::read(quant_dir().join(format!("comfy.theirs.{cfg}.{name}.deq.bin")))
                    .unwrap(),
            );
            same_bits(
                &format!("{cfg} {name} (comfy-kitchen's file)"),
                &tck.get(name).unwrap().to_f32().unwrap(),
                &want,
            );
        }
        let run = common::run(&["inspect", common::s(&out), "--json"], true);
        let rep: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(rep["layout"], "comfyui");
        let run = common::run(&["inspect", common::s(&theirs)], true);
        assert!(run.stdout.contains("layout comfyui"), "{}", run.stdout);
    }
}

#[test]
fn modelopt_and_bitsandbytes_files_read_as_those_libraries_dequantize() {
    // tests/golden/quant/ckpt.json: trt-diff's ModelOpt- and bitsandbytes-layout files, dequantized by ModelOpt and
    // bitsandbytes themselves (scripts/golden/quant_checkpoint.py).
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(quant_dir().join("ckpt.json")).unwrap()).unwrap();
    let input = quant_dir().join("ckpt.in.safetensors");
    let orig = Checkpoint::open(&input).unwrap();
    assert_eq!(orig.source_layout(), SourceLayout::Plain);
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for (cfg, r) in record.as_object().unwrap() {
        let out = dir.path().join(format!("{cfg}.safetensors"));
        let args: Vec<&str> = r["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        quantize(&input, &out, &args);
        let ck = Checkpoint::open(&out).unwrap();
        let bnb = cfg.starts_with("nf4") || cfg.starts_with("fp4");
        let want_layout = if bnb {
            SourceLayout::Bitsandbytes
        } else {
            SourceLayout::Modelopt
        };
        assert_eq!(ck.source_layout(), want_layout, "{cfg}");
        for name in r["quantized"].as_array().unwrap() {
            let name = name.as_str().unwrap();
            let want = f32s(
                &std::fs::read(quant_dir().join(format!("ckpt.{cfg}.{name}.deq.bin"))).unwrap(),
            );
            let t = ck.get(name).unwrap();
            assert_eq!(t.shape, orig.shape(name).unwrap(), "{cfg} {name}");
            let mut got = t.to_f32().unwrap();
            if bnb {
                // bitsandbytes returns values in the weight's dtype.
                let dt = orig.dtype(name).unwrap();
                for v in got.iter_mut() {
                    *v = match dt {
                        DataType::BFLOAT16 => bf16::from_f32(*v).to_f32(),
                        DataType::FLOAT16 => f16::from_f32(*v).to_f32(),
                        _ => *v,
                    };
                }
            }
            same_bits(&format!("{cfg} {name}"), &got, &want);
            // Only NVFP4 and per-tensor FP8 keep their stored form for the Q/DQ graph.
            assert_eq!(
                t.quant.is_some(),
                cfg == "nvfp4" || cfg == "fp8",
                "{cfg} {name}"
            );
            seen += 1;
        }
    }
    assert!(seen >= 20, "{seen}");
}

fn flux_graph(
    ck: &Checkpoint,
    precision: FluxPrecision,
    amax: &HashMap<String, f32>,
) -> trt_diff::onnx::proto::ModelProto {
    let cfg = flux_config(ck);
    let opts = ExportOptions {
        precision,
        amax: amax.clone(),
        ..Default::default()
    };
    fluxm::graph(&cfg, ck, &opts).unwrap()
}

/// The quantized weights' initializers (weight codes and their scales) by name.
fn qdq_weights(m: &trt_diff::onnx::proto::ModelProto) -> HashMap<String, (i32, Vec<i64>, Vec<u8>)> {
    let g = m.graph.as_ref().unwrap();
    let quantized: Vec<String> = g
        .initializer
        .iter()
        .filter(|t| {
            t.name.ends_with(".weight")
                && [DataType::FLOAT4E2M1.0, DataType::FLOAT8E4M3FN.0].contains(&t.data_type)
        })
        .map(|t| t.name.trim_end_matches(".weight").to_string())
        .collect();
    g.initializer
        .iter()
        .filter(|t| {
            quantized.iter().any(|q| {
                [".weight", ".weight_scale", ".weight_scale_2"]
                    .iter()
                    .any(|s| t.name == format!("{q}{s}"))
            })
        })
        .map(|t| {
            (
                t.name.clone(),
                (t.data_type, t.dims.clone(), t.raw_data.to_vec()),
            )
        })
        .collect()
}

fn flux_config(ck: &Checkpoint) -> FluxConfig {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/flux");
    let text = std::fs::read_to_string(dir.join("flux_dev_config.json")).unwrap();
    let axes = FluxConfig::axes_from_diffusers_config(&text).unwrap();
    FluxConfig::from_checkpoint_with_axes(ck, Some(axes))
        .unwrap()
        .0
}

#[test]
fn flux_built_from_a_comfyui_file_has_the_original_builds_qdq_weights() {
    let src =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/flux/flux_dev_bfl.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let orig = Checkpoint::open(&src).unwrap();
    // FP8 needs activation ranges: the calibration graph names every key; any value serves a weight comparison.
    let calib = fluxm::graph(
        &flux_config(&orig),
        &orig,
        &ExportOptions {
            calibration: true,
            ..Default::default()
        },
    )
    .unwrap();
    let amax: HashMap<String, f32> = calib
        .graph
        .as_ref()
        .unwrap()
        .output
        .iter()
        .filter_map(|o| o.name.strip_prefix("amax.").map(|k| (k.to_string(), 2.0)))
        .collect();
    assert!(!amax.is_empty());
    for (fmt, precision) in [("nvfp4", FluxPrecision::Nvfp4), ("fp8", FluxPrecision::Fp8)] {
        let q = dir.path().join(format!("flux.{fmt}.safetensors"));
        quantize(&src, &q, &["--format", fmt, "--layout", "comfyui"]);
        let ck = Checkpoint::open(&q).unwrap();
        assert_eq!(ck.source_layout(), SourceLayout::Comfyui);
        assert!(ck.prequantized() > 20, "{}", ck.prequantized());
        let want = qdq_weights(&flux_graph(&orig, precision, &amax));
        let got = qdq_weights(&flux_graph(&ck, precision, &amax));
        assert!(
            want.len() >= 20,
            "{fmt}: only {} Q/DQ weight initializers",
            want.len()
        );
        let mut names: Vec<&String> = want.keys().collect();
        names.sort();
        assert_eq!(got.len(), want.len(), "{fmt}");
        let (mut differ, mut total) = (0usize, 0usize);
        for n in names {
            let (g, w) = (&got[n], &want[n]);
            if fmt == "fp8" && n.ends_with(".weight") {
                // `quantize` rounds x / scale to the weight's dtype (bf16 here) before E4M3, as ModelOpt does;
                // the build's own FP8 rounds the f32 quotient once: a tie may land one code apart.
                assert_eq!((g.0, &g.1), (w.0, &w.1), "{fmt}: '{n}'");
                for (a, b) in g.2.iter().zip(&w.2) {
                    assert!(a.abs_diff(*b) <= 1, "{fmt}: '{n}' codes {a} and {b}");
                    differ += (a != b) as usize;
                }
                total += g.2.len();
            } else {
                assert_eq!(
                    g, w,
                    "{fmt}: initializer '{n}' differs from the original build's"
                );
            }
        }
        assert!(
            differ * 20 <= total.max(1),
            "{fmt}: {differ} of {total} codes differ"
        );
        // And they are the file's own codes: the stored weights went in as they are (FP8 transposed to [in, out]).
        let t = ck.get("double_blocks.0.img_attn.qkv.weight").unwrap();
        let (rows, cols) = (t.shape[0], t.shape[1]);
        let codes = match &t.quant.as_ref().unwrap().weight {
            QuantWeight::Nvfp4 { packed, .. } => packed.clone(),
            QuantWeight::Fp8 { codes, .. } => {
                let mut tr = vec![0u8; codes.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        tr[c * rows + r] = codes[r * cols + c];
                    }
                }
                tr
            }
        };
        assert!(
            got.values().any(|(_, _, b)| *b == codes),
            "{fmt}: the stored qkv codes are not in the graph"
        );
    }
}

fn write_st(
    path: &Path,
    tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    meta: Option<HashMap<String, String>>,
) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize_to_file(views, meta, path).unwrap();
}

/// A hostile file: its name, tensors, header metadata and what the error must say.
type Case<'a> = (
    &'a str,
    Vec<(&'a str, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    Option<HashMap<String, String>>,
    &'a [&'a str],
);

#[test]
fn hostile_prequantized_files_give_clear_errors() {
    use safetensors::Dtype::{F8_E4M3, F32, U8};
    let dir = tempfile::tempdir().unwrap();
    let mk = |name: &'static str, f: &str| {
        let b = format!("{{\"format\":\"{f}\"}}").into_bytes();
        (name, U8, vec![b.len()], b)
    };
    let one = 0.5f32.to_le_bytes().to_vec();
    let cases: Vec<Case> = vec![
        (
            "unknown_format",
            vec![
                ("l.weight", U8, vec![16, 8], vec![0; 128]),
                mk("l.comfy_quant", "int8_tensorwise"),
            ],
            None,
            &[
                "layer 'l'",
                "int8_tensorwise",
                "nvfp4, float8_e4m3fn",
                "trt-diff quantize --layout comfyui",
            ],
        ),
        (
            "scale_shape",
            vec![
                ("l.weight", U8, vec![16, 8], vec![0; 128]),
                ("l.weight_scale", F8_E4M3, vec![16, 1], vec![0; 16]),
                ("l.weight_scale_2", F32, vec![], one.clone()),
                mk("l.comfy_quant", "nvfp4"),
            ],
            None,
            &["'l.weight_scale'", "[128, 4]", "cuBLAS"],
        ),
        (
            "missing_scale_2",
            vec![
                ("l.weight", U8, vec![16, 8], vec![0; 128]),
                ("l.weight_scale", F8_E4M3, vec![128, 4], vec![0; 512]),
                mk("l.comfy_quant", "nvfp4"),
            ],
            None,
            &["'l.weight_scale_2'", "missing"],
        ),
        (
            "marker_without_weight",
            vec![mk("x.comfy_quant", "nvfp4")],
            None,
            &["no 'x.weight'"],
        ),
        (
            "bad_metadata",
            vec![("l.weight", F8_E4M3, vec![4, 4], vec![0; 16])],
            Some(HashMap::from([(
                "_quantization_metadata".to_string(),
                "{\"layers\": 7}".to_string(),
            )])),
            &["_quantization_metadata", "layers"],
        ),
        (
            "contradiction",
            vec![
                ("l.weight", F8_E4M3, vec![4, 4], vec![0; 16]),
                ("l.weight_scale", F32, vec![], one.clone()),
                mk("l.comfy_quant", "float8_e4m3fn"),
            ],
            Some(HashMap::from([(
                "_quantization_metadata".to_string(),
                "{\"format_version\":\"1.0\",\"layers\":{\"l\":{\"format\":\"nvfp4\"}}}"
                    .to_string(),
            )])),
            &["contradicts itself"],
        ),
        (
            "modelopt_nvfp4_scales",
            vec![
                ("l.weight", U8, vec![4, 8], vec![0; 32]),
                ("l.weight_scale", F8_E4M3, vec![4, 2], vec![0; 8]),
                ("l.weight_scale_2", F32, vec![], one.clone()),
            ],
            None,
            &["'l.weight_scale'", "one E4M3 scale per 16"],
        ),
        (
            "bnb_shape_too_big",
            vec![
                ("l.weight", U8, vec![8, 1], vec![0; 8]),
                ("l.weight.absmax", F32, vec![1], one.clone()),
                (
                    "l.weight.quant_state.bitsandbytes__nf4",
                    U8,
                    vec![60],
                    format!("{:<60}", "{\"shape\":[4096,4096],\"blocksize\":64}").into_bytes(),
                ),
            ],
            None,
            &["declares shape [4096, 4096]", "holds only 16 values"],
        ),
    ];
    for (name, tensors, meta, needles) in cases {
        let p = dir.path().join(format!("{name}.safetensors"));
        write_st(&p, tensors, meta);
        let err = match Checkpoint::open(&p) {
            Ok(_) => panic!("{name}: opened"),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(&*p.display().to_string()), "{name}: {err}");
        for n in needles {
            assert!(err.contains(n), "{name}: '{n}' not in: {err}");
        }
        // inspect refuses the same file with the same message, exit 1.
        let run = common::run(&["inspect", common::s(&p)], false);
        assert!(run.stderr.contains(needles[0]), "{name}: {}", run.stderr);
    }
    // quantize: ComfyUI holds nvfp4 and fp8 only, and unpadded NVFP4 needs whole 16-row groups.
    let input = dir.path().join("in.safetensors");
    write_st(
        &input,
        vec![(
            "embed.weight",
            safetensors::Dtype::F32,
            vec![8, 32],
            vec![0; 8 * 32 * 4],
        )],
        None,
    );
    let out = dir.path().join("o.safetensors");
    let run = common::run(
        &[
            "quantize",
            common::s(&input),
            "--format",
            "nf4",
            "--layout",
            "comfyui",
            "--out",
            common::s(&out),
        ],
        false,
    );
    assert!(
        run.stderr.contains("comfyui takes nvfp4 and fp8"),
        "{}",
        run.stderr
    );
    let run = common::run(
        &[
            "quantize",
            common::s(&input),
            "--format",
            "nvfp4",
            "--layout",
            "comfyui",
            "--out",
            common::s(&out),
            "--exclude",
            "layer.*",
        ],
        false,
    );
    assert!(
        run.stderr.contains("'embed.weight'") && run.stderr.contains("multiple of 16 rows"),
        "{}",
        run.stderr
    );
    assert!(!out.exists());
}
