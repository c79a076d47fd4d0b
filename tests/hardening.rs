//! Hardening (issue 21): hostile or damaged inputs give clear errors (file, cause, fix) and never a panic, a
//! read outside the model's folder or an allocation sized by an unchecked header; interrupted runs leave no
//! temporaries and no half bundle. Every file here is made in a scratch folder; the tests are fast.
use crate::common;
use common::{bin, run, run_env, s};
use prost::Message;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use trt_diff::onnx::OnnxFile;
use trt_diff::onnx::model::LoadOptions;
use trt_diff::onnx::proto::*;
use trt_diff::weights::gguf::{GgufFile, Value};
use trt_diff::weights::gguf_write::GgufWriter;

fn shared_data(rel: &str) -> PathBuf {
    let base = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    base.join(rel)
}

fn entry(k: &str, v: &str) -> StringStringEntryProto {
    StringStringEntryProto {
        key: k.into(),
        value: v.into(),
    }
}

fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: 1,
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension {
                            value: Some(DimensionValue::DimValue(d)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Y = X @ W with W (2x2 f32) in external data at `location` (`offset`/`length` as given).
fn external_model(location: &str, offset: Option<&str>, length: Option<&str>) -> Vec<u8> {
    let mut ext = vec![entry("location", location)];
    if let Some(o) = offset {
        ext.push(entry("offset", o));
    }
    if let Some(l) = length {
        ext.push(entry("length", l));
    }
    let w = TensorProto {
        dims: vec![2, 2],
        data_type: 1,
        name: "W".into(),
        external_data: ext,
        data_location: DATA_LOCATION_EXTERNAL,
        ..Default::default()
    };
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node: vec![NodeProto {
                input: vec!["X".into(), "W".into()],
                output: vec!["Y".into()],
                name: "mm".into(),
                op_type: "MatMul".into(),
                ..Default::default()
            }],
            name: "g".into(),
            initializer: vec![w],
            input: vec![value_info("X", &[1, 2])],
            output: vec![value_info("Y", &[1, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn load_err(path: &Path) -> String {
    match OnnxFile::load(path) {
        Ok(_) => panic!("'{}' loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// The case: a tiny ONNX whose external data is /etc/passwd is refused by build and inspect, with the
/// file, the cause and the fix in the message; nothing is built.
#[test]
fn onnx_external_data_outside_the_folder_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let model = write(
        &d.path().join("evil.onnx"),
        &external_model("/etc/passwd", None, Some("16")),
    );
    assert!(std::fs::metadata(&model).unwrap().len() < 200);
    let plan = d.path().join("evil.plan");
    for args in [
        vec!["build", s(&model), "--out", s(&plan), "--no-progress"],
        vec!["inspect", s(&model)],
    ] {
        let r = run(&args, false);
        for needle in [
            "evil.onnx",
            "/etc/passwd",
            "absolute path",
            "--allow-external-paths",
        ] {
            assert!(
                r.stderr.contains(needle),
                "{args:?}: no '{needle}' in {}",
                r.stderr
            );
        }
        assert!(!r.stdout.contains("root:"), "{}", r.stdout);
    }
    assert!(!plan.exists());
    assert!(common::outputs_in(d.path()).is_empty());

    // `..`, and a symlink inside the folder that leads out.
    let outside = tempfile::tempdir().unwrap();
    let secret = write(&outside.path().join("secret.bin"), &[7u8; 16]);
    let sub = d.path().join("m");
    std::fs::create_dir(&sub).unwrap();
    let up = write(
        &sub.join("up.onnx"),
        &external_model("../evil.onnx", None, Some("16")),
    );
    assert!(load_err(&up).contains("`..`"), "{}", load_err(&up));
    std::os::unix::fs::symlink(&secret, sub.join("w.bin")).unwrap();
    let link = write(
        &sub.join("link.onnx"),
        &external_model("w.bin", None, Some("16")),
    );
    let e = load_err(&link);
    assert!(e.contains("symlink") && e.contains("secret.bin"), "{e}");

    // The escape hatch: allow_external reads it.
    let f = OnnxFile::load_with(
        &link,
        &LoadOptions {
            allow_external: true,
            ..Default::default()
        },
    )
    .unwrap();
    let w = f.external_weights().unwrap();
    assert_eq!(w[0].1.len(), 16);
    // A data file inside the folder (or a symlink that stays inside) is fine.
    write(&sub.join("real.bin"), &[1u8; 16]);
    std::os::unix::fs::symlink("real.bin", sub.join("inner.bin")).unwrap();
    for loc in ["real.bin", "./real.bin", "inner.bin"] {
        let p = write(
            &sub.join("ok.onnx"),
            &external_model(loc, Some("0"), Some("16")),
        );
        OnnxFile::load(&p).unwrap().external_weights().unwrap();
    }
}

/// Offsets and lengths at the edge of u64 give errors, not the slice panic of `offset = 2^64-1`.
#[test]
fn onnx_external_offsets_are_checked_without_overflow() {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("w.bin"), &[0u8; 16]);
    let max = u64::MAX.to_string();
    for (offset, length, needle) in [
        (Some(max.as_str()), None, "offset 18446744073709551615"),
        (
            Some(max.as_str()),
            Some("16"),
            "offset 18446744073709551615",
        ),
        (Some("8"), Some(max.as_str()), "has only 16"),
        (Some("1"), Some("16"), "has only 16"),
        (Some("-1"), None, "not a byte count"),
        (Some("0"), Some("x"), "not a byte count"),
    ] {
        let p = write(
            &d.path().join("m.onnx"),
            &external_model("w.bin", offset, length),
        );
        let e = load_err(&p);
        assert!(
            e.contains(needle) && e.contains("m.onnx"),
            "{offset:?}/{length:?}: {e}"
        );
        let plan = d.path().join("m.plan");
        let r = run(&["build", s(&p), "--out", s(&plan), "--no-progress"], false);
        assert!(r.stderr.contains(needle), "{}", r.stderr);
    }
}

/// A graph of `n` Identity nodes in a chain.
fn chain_model(n: usize) -> Vec<u8> {
    let node = (0..n)
        .map(|i| NodeProto {
            input: vec![if i == 0 {
                "X".into()
            } else {
                format!("t{}", i - 1)
            }],
            output: vec![if i + 1 == n {
                "Y".into()
            } else {
                format!("t{i}")
            }],
            op_type: "Identity".into(),
            ..Default::default()
        })
        .collect();
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 17,
        }],
        graph: Some(GraphProto {
            node,
            name: "chain".into(),
            input: vec![value_info("X", &[1, 2])],
            output: vec![value_info("Y", &[1, 2])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// The 200,000-node ONNX: `build` refuses it at once with the limit and how to raise it; `inspect`
/// reads it.
#[test]
fn onnx_with_200000_nodes_is_refused_by_build_with_a_clear_limit() {
    let d = tempfile::tempdir().unwrap();
    let p = write(&d.path().join("big.onnx"), &chain_model(200_000));
    let plan = d.path().join("big.plan");
    let t = Instant::now();
    let r = run(&["build", s(&p), "--out", s(&plan), "--no-progress"], false);
    assert!(t.elapsed() < Duration::from_secs(20));
    for needle in [
        "big.onnx",
        "200000 graph nodes",
        "100000",
        "TRT_DIFF_MAX_ONNX_NODES",
    ] {
        assert!(r.stderr.contains(needle), "no '{needle}' in {}", r.stderr);
    }
    assert!(!plan.exists());
    OnnxFile::load(&p).unwrap();
    // The library option and the environment variable move the limit.
    let small = write(&d.path().join("small.onnx"), &chain_model(20));
    let e = OnnxFile::load_with(
        &small,
        &LoadOptions {
            max_nodes: Some(10),
            ..Default::default()
        },
    )
    .err()
    .unwrap();
    assert!(format!("{e}").contains("20 graph nodes"), "{e}");
    let r = run_env(
        &[
            "build",
            s(&small),
            "--out",
            s(&plan),
            "--no-progress",
            "--trt",
            "trt11",
        ],
        &[("TRT_DIFF_MAX_ONNX_NODES", "10")],
        false,
    );
    assert!(
        r.stderr.contains("more than the limit of 10"),
        "{}",
        r.stderr
    );
}

// ---------------------------------------------------------------- GGUF

fn arr_str(v: &[&str]) -> Value {
    Value::Array(8, v.iter().map(|s| Value::String(s.to_string())).collect())
}

/// A llama GGUF with `dim` 8, 2 heads, 1 layer, 4 tokens, feed-forward 16, with the keys in `over` replaced.
fn tiny_llama(path: &Path, over: &[(&str, Value)], embd_dims: &[u64]) {
    let mut w = GgufWriter::default();
    w.set("general.architecture", Value::String("llama".into()));
    for (k, v) in [
        ("llama.embedding_length", 8u32),
        ("llama.attention.head_count", 2),
        ("llama.block_count", 1),
        ("llama.feed_forward_length", 16),
        ("llama.context_length", 32),
    ] {
        w.set(k, Value::U32(v));
    }
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        arr_str(&["<unk>", "<s>", "</s>", "a"]),
    );
    for (k, v) in over {
        w.set(k, v.clone());
    }
    let n: u64 = embd_dims.iter().product();
    w.add_f32("token_embd.weight", embd_dims, &vec![0.5; n as usize]);
    let (d, h) = (8u64, 16u64);
    w.add_f32("output_norm.weight", &[d], &[1.0; 8]);
    for (name, shape) in [
        ("attn_norm", vec![d]),
        ("ffn_norm", vec![d]),
        ("attn_q", vec![d, d]),
        ("attn_k", vec![d, d]),
        ("attn_v", vec![d, d]),
        ("attn_output", vec![d, d]),
        ("ffn_gate", vec![h, d]),
        ("ffn_up", vec![h, d]),
        ("ffn_down", vec![d, h]),
    ] {
        let n: u64 = shape.iter().product();
        w.add_f32(
            &format!("blk.0.{name}.weight"),
            &shape,
            &vec![0.1; n as usize],
        );
    }
    w.write(path).unwrap();
}

fn gguf_load_err(path: &Path) -> String {
    let g = match GgufFile::open(path) {
        Ok(g) => g,
        Err(e) => return format!("{e:#}"),
    };
    match trt_diff::weights::gguf_model::load(&g, None) {
        Ok(_) => panic!("'{}' loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// head_count 0 (a division by zero before), absurd hyper-parameters (an allocation of 32 GiB to 2 TiB before)
/// and a vocabulary the embedding does not hold are refused before anything is allocated from them.
#[test]
fn gguf_absurd_hyper_parameters_are_refused_before_allocating() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.gguf");
    tiny_llama(&p, &[], &[4, 8]);
    let g = GgufFile::open(&p).unwrap();
    trt_diff::weights::gguf_model::load(&g, None).unwrap();
    for (key, v, needle) in [
        (
            "llama.attention.head_count",
            Value::U32(0),
            "attention head count 0",
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(0),
            "KV head count 0",
        ),
        ("llama.attention.head_count", Value::U32(3), "do not split"),
        (
            "llama.block_count",
            Value::U32(1 << 31),
            "layer count 2147483648",
        ),
        ("llama.block_count", Value::U32(2), "is missing"),
        (
            "llama.feed_forward_length",
            Value::U32(u32::MAX),
            "feed-forward length 4294967295",
        ),
        (
            "llama.feed_forward_length",
            Value::U32(32),
            "values, the config implies",
        ),
        (
            "llama.embedding_length",
            Value::U64(u64::MAX),
            "not a count",
        ),
        (
            "llama.embedding_length",
            Value::U64(1 << 40),
            "embedding length (dim)",
        ),
        ("llama.context_length", Value::U64(1 << 40), "--max-context"),
        ("llama.context_length", Value::U32(0), "context length 0"),
    ] {
        tiny_llama(&p, &[(key, v)], &[4, 8]);
        let e = gguf_load_err(&p);
        assert!(e.contains(needle) && e.contains("m.gguf"), "{key}: {e}");
    }
    // A huge vocabulary with a zero-width embedding (0 bytes of data), and a rank-0 embedding.
    tiny_llama(&p, &[], &[1 << 40, 0]);
    let e = gguf_load_err(&p);
    assert!(e.contains("vocabulary size"), "{e}");
    tiny_llama(&p, &[], &[]);
    let e = gguf_load_err(&p);
    assert!(e.contains("vocabulary size 0"), "{e}");
}

fn gguf_header(n_tensors: u64, n_kv: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(n_kv.to_le_bytes());
    b
}

fn push_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// Lengths and counts in the GGUF header are checked against the bytes the file has.
#[test]
fn gguf_header_sizes_are_checked_against_the_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("h.gguf");
    let check = |bytes: Vec<u8>, needle: &str| {
        std::fs::write(&p, &bytes).unwrap();
        let e = format!("{:#}", GgufFile::open(&p).err().expect("refused"));
        assert!(e.contains(needle) && e.contains("h.gguf"), "{needle}: {e}");
    };
    check(gguf_header(u64::MAX, u64::MAX), "more than the file");
    // An array of 2^60 u32.
    let mut b = gguf_header(0, 1);
    push_str(&mut b, "k");
    b.extend(9u32.to_le_bytes());
    b.extend(4u32.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    check(b, "bad array length");
    // A string of 2^63 bytes.
    let mut b = gguf_header(0, 1);
    push_str(&mut b, "k");
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 63).to_le_bytes());
    check(b, "bad string length");
    // Tensor dims whose product overflows u64, and a tensor past the end.
    for (dims, needle) in [
        (vec![1u64 << 32, 1 << 32, 1 << 32], "absurd shape"),
        (vec![1 << 20, 1 << 20], "runs past the end"),
    ] {
        let mut b = gguf_header(1, 0);
        push_str(&mut b, "t");
        b.extend((dims.len() as u32).to_le_bytes());
        for x in &dims {
            b.extend(x.to_le_bytes());
        }
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        check(b, needle);
    }
}

/// llama.c headers with absurd sizes are refused before the weights are sliced.
#[test]
fn llama2c_absurd_header_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("m.bin");
    for h in [
        [8, i32::MAX, 1, 2, 2, 4, 16],
        [8, 16, 1, 2, 2, i32::MIN + 1, 16],
        [8, 16, 1, 2, 2, 4, i32::MAX],
        [8, 16, 1, 0, 0, 4, 16],
    ] {
        let mut b: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
        b.extend([0u8; 64]);
        std::fs::write(&p, &b).unwrap();
        let e = format!(
            "{:#}",
            trt_diff::weights::llama2c::Llama2c::load(&p)
                .err()
                .expect("refused")
        );
        assert!(e.contains("m.bin"), "{e}");
    }
}

// ---------------------------------------------------------------- safetensors / quantized checkpoints

/// A safetensors file of (name, dtype, shape, bytes).
fn safetensors(path: &Path, tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, dt, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend(bytes);
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Companion tensors and quant_state JSON that disagree with the data give errors, not panics (index out of
/// range, division by zero) or allocations the data cannot fill.
#[test]
fn quantized_checkpoint_reader_checks_companion_sizes() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("q.safetensors");
    let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let qs = |bs: u64, shape: &[u64]| {
        serde_json::to_vec(
            &serde_json::json!({"blocksize": bs, "shape": shape, "nested_offset": 0.0}),
        )
        .unwrap()
    };
    type Tensors<'a> = Vec<(&'a str, &'a str, Vec<usize>, Vec<u8>)>;
    let cases: Vec<(Tensors, &str)> = vec![
        // NVFP4 with an empty second-level scale, and too few block scales.
        (
            vec![
                ("w", "U8", vec![16], vec![0x11; 16]),
                ("w_scale", "U8", vec![2], vec![0x38; 2]),
                ("w_scale_2", "F32", vec![0], vec![]),
            ],
            "holds no f32 value",
        ),
        (
            vec![
                ("w", "U8", vec![16], vec![0x11; 16]),
                ("w_scale", "U8", vec![1], vec![0x38]),
                ("w_scale_2", "F32", vec![1], f32b(&[1.0])),
            ],
            "block scales",
        ),
        // MXFP8 / INT8 with more scales than values, and an empty scale.
        (
            vec![
                ("w", "F8_E4M3", vec![2], vec![1, 2]),
                ("w_scale", "U8", vec![4], vec![127; 4]),
            ],
            "scales",
        ),
        (
            vec![
                ("w", "I8", vec![2], vec![1, 2]),
                ("w_scale", "F32", vec![0], vec![]),
            ],
            "0 scales",
        ),
        (
            vec![
                ("w", "F8_E4M3", vec![2], vec![1, 2]),
                ("w_scale", "F32", vec![0], vec![]),
            ],
            "holds no f32 value",
        ),
        // bitsandbytes NF4: block size 0, a shape far larger than the packed data, and too few absmax.
        (
            vec![
                ("w", "U8", vec![4], vec![0x12; 4]),
                ("w.absmax", "F32", vec![1], f32b(&[1.0])),
                (
                    "w.quant_state.bitsandbytes__nf4",
                    "U8",
                    vec![qs(0, &[8]).len()],
                    qs(0, &[8]),
                ),
            ],
            "blocksize 0",
        ),
        (
            vec![
                ("w", "U8", vec![4], vec![0x12; 4]),
                ("w.absmax", "F32", vec![1], f32b(&[1.0])),
                (
                    "w.quant_state.bitsandbytes__nf4",
                    "U8",
                    vec![qs(64, &[1 << 20, 1 << 20]).len()],
                    qs(64, &[1 << 20, 1 << 20]),
                ),
            ],
            "packed data only 8",
        ),
        (
            vec![
                ("w", "U8", vec![4], vec![0x12; 4]),
                ("w.absmax", "F32", vec![1], f32b(&[1.0])),
                (
                    "w.quant_state.bitsandbytes__nf4",
                    "U8",
                    vec![qs(64, &[1 << 40, 1 << 40]).len()],
                    qs(64, &[1 << 40, 1 << 40]),
                ),
            ],
            "is not a shape",
        ),
        (
            vec![
                ("w", "U8", vec![64], vec![0x12; 64]),
                ("w.absmax", "F32", vec![1], f32b(&[1.0])),
                (
                    "w.quant_state.bitsandbytes__nf4",
                    "U8",
                    vec![qs(32, &[128]).len()],
                    qs(32, &[128]),
                ),
            ],
            "1 absmax values for 4 blocks",
        ),
    ];
    for (tensors, needle) in cases {
        safetensors(&p, &tensors);
        let e = format!(
            "{:#}",
            trt_diff::quant::checkpoint::dequantize_named(&p, "w").expect_err("refused")
        );
        assert!(
            e.contains(needle) && e.contains("q.safetensors"),
            "{needle}: {e}"
        );
        // `inspect` reads the same file without panicking.
        let r = bin().args(["inspect", s(&p)]).output().unwrap();
        assert!(!String::from_utf8_lossy(&r.stderr).contains("panicked"));
    }
}

// ---------------------------------------------------------------- closed stdout

/// `inspect X | head -1`: the reader closes the pipe after one line; trt-diff exits quietly (status 0, no
/// panic message), every time.
#[test]
fn inspect_into_a_closed_pipe_exits_quietly() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("many.gguf");
    let mut w = GgufWriter::default();
    for i in 0..5000 {
        w.set(&format!("key.number.{i:05}"), Value::String("x".repeat(40)));
    }
    w.write(&p).unwrap();
    for _ in 0..3 {
        let mut child = bin()
            .args(["inspect", s(&p)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        // The reader is dropped here: the pipe is closed with most of the output unwritten.
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(!first.is_empty());
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{err}"
        );
        assert_eq!(status.code(), Some(0), "{err}");
    }
    assert!(trt_diff::out::is_broken_pipe_panic(
        "failed printing to stdout: Broken pipe (os error 32)"
    ));
}

/// `generate ... 2>&1 | head -1`: stdout and stderr both close while tokens are still coming; the process ends
/// quietly with status 0 instead of aborting in the error report.
#[test]
fn generate_into_a_closed_pipe_exits_quietly() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("stories.plan");
    run(
        &[
            "build",
            s(&shared_data("llm/stories260K.bin")),
            "--arch",
            "llama2c",
            "--tokenizer",
            s(&shared_data("llm/tok512.bin")),
            "--out",
            s(&out),
            "--onnx-only",
            "--no-progress",
        ],
        true,
    );
    let mut child = bin()
        .args([
            "generate",
            "--engine",
            s(&d.path().join("stories.plan.json")),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "400",
            "--ignore-eos",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stdout.take());
    drop(child.stderr.take());
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

// ---------------------------------------------------------------- interrupted runs

/// A process id that runs no process now.
fn dead_pid() -> u32 {
    let mut c = bin()
        .arg("--version")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn partials(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect()
}

/// Waits until a `.partial-` temporary appears in `dir` (the run is writing) or the child exits.
fn wait_for_partial(child: &mut std::process::Child, dir: &Path) -> bool {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if !partials(dir).is_empty() {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: kill with a child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// `quantize` killed with SIGTERM (and SIGINT) while writing removes its temporary and exits 143 (130); a
/// later run sweeps the temporaries of dead processes (what SIGKILL leaves).
#[test]
fn interrupted_quantize_leaves_no_temporaries() {
    let d = tempfile::tempdir().unwrap();
    let input = d.path().join("in.safetensors");
    let n = 4096 * 1024;
    let vals: Vec<u8> = (0..n)
        .flat_map(|i| ((i % 251) as f32 * 0.01).to_le_bytes())
        .collect();
    let names: Vec<String> = (0..8).map(|i| format!("l{i}.weight")).collect();
    let tensors: Vec<(&str, &str, Vec<usize>, Vec<u8>)> = names
        .iter()
        .map(|n| {
            (
                n.as_str(),
                "F32",
                vec![1024, 512],
                vals[..1024 * 512 * 4].to_vec(),
            )
        })
        .collect();
    safetensors(&input, &tensors);
    let out = d.path().join("out.safetensors");
    let mut interrupted = 0;
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let mut child = bin()
            .args(["quantize", s(&input), "--format", "int8", "--out", s(&out)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if !wait_for_partial(&mut child, d.path()) {
            // Finished before a temporary was seen (a very fast machine): nothing to interrupt.
            child.wait().unwrap();
            std::fs::remove_file(&out).ok();
            continue;
        }
        signal(&child, sig);
        let status = child.wait().unwrap();
        if status.code() == Some(0) {
            // The signal came after the commit.
            std::fs::remove_file(&out).ok();
            continue;
        }
        interrupted += 1;
        assert_eq!(status.code(), Some(code), "signal {sig}");
        assert!(partials(d.path()).is_empty(), "{:?}", partials(d.path()));
        assert!(!out.exists());
    }
    assert!(interrupted > 0, "no run was caught while writing");

    // Stale temporaries of dead processes go at the next run; a live process's stays.
    let stale = d
        .path()
        .join(format!(".out.safetensors.partial-{}", dead_pid()));
    std::fs::write(&stale, b"left by SIGKILL").unwrap();
    let mine = d.path().join(format!(".x.partial-{}", std::process::id()));
    std::fs::write(&mine, b"live").unwrap();
    run(
        &["quantize", s(&input), "--format", "int8", "--out", s(&out)],
        true,
    );
    assert!(!stale.exists());
    assert!(mine.exists());
    assert!(out.exists());
}

fn mlp_model(dir: &Path) -> PathBuf {
    use trt_diff::models::mlp::MlpConfig;
    common::write_model(dir, "mlp.onnx", &MlpConfig::default())
}

/// `build` interrupted while TensorRT writes the plan removes the temporary plan and exits 130/143.
#[test]
fn interrupted_build_leaves_no_temporaries() {
    let d = tempfile::tempdir().unwrap();
    let model = mlp_model(d.path());
    let plan = d.path().join("m.plan");
    let mut interrupted = 0;
    for (sig, code) in [(libc::SIGINT, 130), (libc::SIGTERM, 143)] {
        let mut child = bin()
            .args(["build", s(&model), "--out", s(&plan), "--no-progress"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if !wait_for_partial(&mut child, d.path()) {
            let o = child.wait_with_output().unwrap();
            assert!(
                !String::from_utf8_lossy(&o.stderr).contains("panicked"),
                "{}",
                String::from_utf8_lossy(&o.stderr)
            );
            continue;
        }
        signal(&child, sig);
        let status = child.wait().unwrap();
        if status.code() == Some(0) {
            continue;
        }
        interrupted += 1;
        assert_eq!(status.code(), Some(code));
        assert!(partials(d.path()).is_empty(), "{:?}", partials(d.path()));
        assert!(!plan.exists() && !d.path().join("m.plan.json").exists());
    }
    eprintln!("build interrupted while writing: {interrupted} of 2 runs");
}

/// A failed LLM build (here: the TensorRT flavour asked for is not installed, after the graphs are written)
/// leaves none of the bundle's files.
#[test]
fn failed_llm_build_leaves_no_bundle_files() {
    let ckpt = shared_data("llm/stories260K.bin");
    let tok = shared_data("llm/tok512.bin");
    if !ckpt.exists() {
        eprintln!("skipped: {} missing", ckpt.display());
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("s.gguf");
    run(
        &[
            "convert",
            "llama2c",
            s(&ckpt),
            "--tokenizer",
            s(&tok),
            "--out",
            s(&gguf),
        ],
        true,
    );
    let plan = d.path().join("x.plan");
    let lib = d.path().join("nolib");
    std::fs::create_dir(&lib).unwrap();
    for args in [
        vec![
            "build",
            s(&gguf),
            "--out",
            s(&plan),
            "--trt",
            "trt11",
            "--no-progress",
        ],
        vec![
            "build",
            s(&ckpt),
            "--arch",
            "llama2c",
            "--tokenizer",
            s(&tok),
            "--out",
            s(&plan),
            "--trt",
            "trt11",
            "--no-progress",
        ],
    ] {
        let r = run_env(&args, &[("TRT_LIB_DIR", s(&lib))], false);
        let left: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('x') || n.starts_with(".x"))
            .collect();
        assert!(
            left.is_empty(),
            "{args:?} left {left:?}; stderr {}",
            r.stderr
        );
    }
}

#[test]
fn bundle_guard_removes_files_unless_disarmed() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    {
        let mut g = trt_diff::fsutil::BundleGuard::new();
        g.add(&a);
        std::fs::write(&a, b"x").unwrap();
    }
    assert!(!a.exists());
    let mut g = trt_diff::fsutil::BundleGuard::new();
    g.add(&a);
    std::fs::File::create(&a).unwrap().write_all(b"x").unwrap();
    g.disarm();
    assert!(a.exists());
    assert_eq!(
        trt_diff::fsutil::partial_pid(".a.plan.partial-123"),
        Some(123)
    );
    assert_eq!(trt_diff::fsutil::partial_pid("a.plan.partial-123"), None);
    assert_eq!(trt_diff::fsutil::partial_pid(".a.partial-12x"), None);
}

// ---------------------------------------------------------------- fuzz corpora as regression tests

#[path = "../fuzz/src/targets.rs"]
mod targets;

/// Every committed seed and crash reproducer of the fuzzer (`fuzz/corpus/TARGET/`, `fuzz/regressions/TARGET/`)
/// goes through its target again: none may panic.
#[test]
fn fuzz_seeds_and_reproducers_do_not_panic() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let scratch = targets::Scratch::new();
    let mut n = 0;
    for kind in ["corpus", "regressions"] {
        for target in targets::TARGETS {
            let dir = root.join(kind).join(target);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
            files.sort();
            for f in files {
                let data = std::fs::read(&f).unwrap();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    targets::run(target, &scratch, &data)
                }));
                assert!(r.is_ok(), "{} panicked in target {target}", f.display());
                n += 1;
            }
        }
    }
    assert!(n >= 100, "only {n} corpus files found");
}
