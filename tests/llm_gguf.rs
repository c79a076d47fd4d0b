//! GGUF: dequantization equals gguf-py's bit for bit, `convert llama2c` writes what gguf-py reads (golden from
//! scripts/golden/llm_gguf.py), and the converted stories260K builds and generates llama2.c's reference text.
use crate::common;
use common::*;
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use trt_diff::weights::gguf::{GgufFile, Value};

pub(crate) fn data(rel: &str) -> PathBuf {
    let base = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    base.join(rel)
}

pub(crate) fn golden(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/llm")).join(name)
}

#[test]
fn dequantization_matches_gguf_py_bit_for_bit() {
    let g = GgufFile::open(&golden("dequant.gguf")).unwrap();
    let mut types = Vec::new();
    for t in g.tensors.iter().filter(|t| !t.name.ends_with(".expected")) {
        let ours = g.tensor_f32(&t.name).unwrap();
        let want = g.tensor_f32(&format!("{}.expected", t.name)).unwrap();
        assert_eq!(ours.len(), want.len(), "{}", t.name);
        let differ = ours
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0, "{} ({}): {differ} values differ", t.name, t.ty);
        types.push(t.ty.to_string());
    }
    types.sort();
    assert_eq!(
        types,
        [
            "BF16", "F16", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"
        ]
    );
}

fn json_of(v: &Value) -> serde_json::Value {
    match v {
        Value::String(s) => s.clone().into(),
        Value::Bool(b) => (*b).into(),
        Value::F32(f) => (*f as f64).into(),
        Value::F64(f) => (*f).into(),
        Value::Array(_, items) => items.iter().map(json_of).collect::<Vec<_>>().into(),
        other => other.as_i64().unwrap().into(),
    }
}

/// `generate --engine PLAN` from "Once upon a time" prints llama2.c's reference continuation of stories260K.
fn assert_generates_reference(plan: &std::path::Path) {
    let r = run(
        &[
            "generate",
            "--engine",
            s(plan),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "30",
        ],
        true,
    );
    assert!(
        r.stdout.starts_with(
            ", there was a little girl named Lily. She loved to play outside in the park."
        ),
        "{}",
        r.stdout
    );
}

#[test]
fn convert_llama2c_writes_what_gguf_py_reads() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("stories260K.gguf");
    run(
        &[
            "convert",
            "llama2c",
            s(&data("llm/stories260K.bin")),
            "--tokenizer",
            s(&data("llm/tok512.bin")),
            "--out",
            s(&out),
        ],
        true,
    );
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("stories260K_gguf.json")).unwrap())
            .unwrap();
    let g = GgufFile::open(&out).unwrap();
    let meta = want["metadata"].as_object().unwrap();
    assert_eq!(g.metadata.len(), meta.len());
    for (k, v) in &g.metadata {
        assert_eq!(&json_of(v), &meta[k], "metadata {k}");
    }
    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(g.tensors.len(), tensors.len());
    for (t, w) in g.tensors.iter().zip(tensors) {
        assert_eq!(t.name, w["name"].as_str().unwrap());
        let shape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape(), shape, "{}", t.name);
        assert_eq!(t.ty.to_string(), w["type"].as_str().unwrap());
        let sha = trt_diff::fsutil::hex(&Sha256::digest(g.tensor_bytes(t)));
        assert_eq!(sha, w["sha256"].as_str().unwrap(), "{}", t.name);
    }
    // inspect reads it; the tokenizer in it tokenizes as the llama2.c tokenizer does.
    let r = run(&["inspect", s(&out)], true);
    assert!(
        r.stdout.contains("GGUF v3") && r.stdout.contains("blk.4.ffn_down.weight"),
        "{}",
        r.stdout
    );
    let vocab = trt_diff::tokenizer::llm_vocab::Vocab::open(&out).unwrap();
    let l2c =
        trt_diff::tokenizer::llama2c::Llama2cTokenizer::load(&data("llm/tok512.bin"), 512).unwrap();
    for text in [
        "Once upon a time",
        "Lily saw a big dog. Ünïcödé ✓",
        "  two  spaces",
    ] {
        assert_eq!(
            vocab.tokenize(text, false, false),
            l2c.encode(text),
            "{text:?}"
        );
    }
}

#[test]
fn gguf_builds_and_generates_the_reference_text() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("stories260K.gguf");
    run(
        &[
            "convert",
            "llama2c",
            s(&data("llm/stories260K.bin")),
            "--tokenizer",
            s(&data("llm/tok512.bin")),
            "--out",
            s(&gguf),
        ],
        true,
    );
    let plan = d.path().join("s.plan");
    let r = run(
        &["build", s(&gguf), "--out", s(&plan), "--no-progress"],
        true,
    );
    assert!(r.stdout.contains("built"), "{}", r.stdout);
    assert!(d.path().join("s.tokenizer.gguf").exists());
    assert_generates_reference(&plan);
    // A truncated GGUF is a clear error naming the file.
    let bytes = std::fs::read(&gguf).unwrap();
    let bad = d.path().join("cut.gguf");
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let r = run(
        &["build", s(&bad), "--out", s(&d.path().join("b.plan"))],
        false,
    );
    assert!(
        r.stderr.contains("cut.gguf") && r.stderr.contains("truncated"),
        "{}",
        r.stderr
    );
    assert!(!d.path().join("b.plan").exists());
}

/// stories260K converted to an F32 GGUF, then written to `dir/name` with every tensor stored by `put`.
pub(crate) fn stories_rewritten(
    dir: &std::path::Path,
    name: &str,
    put: impl Fn(&mut trt_diff::weights::gguf_write::GgufWriter, &str, &[u64], &[f32]),
) -> PathBuf {
    let f32_file = dir.join(format!("{name}.f32.gguf"));
    trt_diff::pipelines::llm_convert::llama2c_to_gguf(
        &data("llm/stories260K.bin"),
        &data("llm/tok512.bin"),
        &f32_file,
    )
    .unwrap();
    let src = GgufFile::open(&f32_file).unwrap();
    assert_eq!(
        trt_diff::pipelines::llm_build::gguf_matrix_type(&src),
        Some(trt_diff::onnx::DataType::FLOAT)
    );
    let mut w = trt_diff::weights::gguf_write::GgufWriter::default();
    for (k, v) in &src.metadata {
        w.set(k, v.clone());
    }
    for t in &src.tensors {
        put(
            &mut w,
            &t.name,
            &t.shape(),
            &src.tensor_f32(&t.name).unwrap(),
        );
    }
    let out = dir.join(name);
    w.write(&out).unwrap();
    out
}

#[test]
fn f16_gguf_runs_a_16_bit_cpu_graph() {
    // stories260K with every matrix stored as F16 (norms F32, as llama.cpp's converter writes F16 files).
    let d = tempfile::tempdir().unwrap();
    let gguf = stories_rewritten(d.path(), "s16.gguf", |w, name, shape, v| {
        if shape.len() == 2 {
            w.add_f16(name, shape, v);
        } else {
            w.add_f32(name, shape, v);
        }
    });
    assert_eq!(
        trt_diff::pipelines::llm_build::gguf_matrix_type(&GgufFile::open(&gguf).unwrap()),
        Some(trt_diff::onnx::DataType::FLOAT16)
    );
    let plan = d.path().join("s16.plan");
    run(
        &["build", s(&gguf), "--out", s(&plan), "--no-progress"],
        true,
    );
    let m = trt_diff::manifest::Manifest::read(&trt_diff::manifest::sidecar_path(&plan)).unwrap();
    let Some(trt_diff::manifest::Pipeline::Llm(trt_diff::manifest::LlmPipeline {
        cpu_onnx, ..
    })) = m.pipeline
    else {
        panic!("no LLM pipeline in the manifest");
    };
    assert_eq!(cpu_onnx.as_deref(), Some("s16.cpu.onnx"));
    let cpu = trt_diff::onnx::OnnxFile::load(&d.path().join("s16.cpu.onnx")).unwrap();
    let ops = trt_diff::onnx::summary::OnnxSummary::of(&cpu).op_histogram;
    // 5 layers x (q/k/v stacked, o, down) + the LM head; gate/up in one operator per layer; one attention node
    // and two norms per layer.
    assert_eq!(ops.get("trtdiff::MatMulF16"), Some(&16), "{ops:?}");
    assert_eq!(ops.get("trtdiff::GateUpF16"), Some(&5), "{ops:?}");
    assert_eq!(ops.get("trtdiff::CausalAttention"), Some(&5), "{ops:?}");
    assert_eq!(
        ops.get("com.microsoft::SkipSimplifiedLayerNormalization"),
        Some(&10),
        "{ops:?}"
    );
    // The CPU backend runs it (f16 weights, f32 activations): llama2.c's greedy text is unchanged.
    assert_generates_reference(&plan);
}

/// Logits of every position of `ids` through a CPU graph (prefill, then one token at a time).
pub(crate) fn cpu_graph_logits(onnx: &std::path::Path, ids: &[i64]) -> Vec<f64> {
    use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    let mut dec = trt_diff::pipelines::kv_cache::Decoder::new(&mut e, ids.len()).unwrap();
    let mut out = dec.forward(&ids[..4]).unwrap().to_f64().unwrap();
    for id in &ids[4..] {
        out.extend(dec.forward(&[*id]).unwrap().to_f64().unwrap());
    }
    out
}

/// The CPU graph's logits against the same file's weights dequantized into an f32 CPU graph: (max difference,
/// largest logit).
fn against_dequantized(gguf: &std::path::Path, cpu: &std::path::Path, ids: &[i64]) -> (f64, f64) {
    let g = GgufFile::open(gguf).unwrap();
    let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
    let graph = trt_diff::models::llama_cpu::decoder_graph_cpu(
        &m.config,
        &m.tensors,
        trt_diff::onnx::DataType::FLOAT,
        false,
    )
    .unwrap();
    let f32_cpu = cpu.with_file_name("dequantized.cpu.onnx");
    trt_diff::onnx::save(graph, &f32_cpu, &Default::default()).unwrap();
    let ours = cpu_graph_logits(cpu, ids);
    let want = cpu_graph_logits(&f32_cpu, ids);
    // The in-place graph gives the last position's logits per call; the f32 one every position's at prefill.
    let vocab = m.config.vocab_size;
    let prefill_last = &want[3 * vocab..4 * vocab];
    let mut want_last: Vec<f64> = prefill_last.to_vec();
    want_last.extend_from_slice(&want[4 * vocab..]);
    assert_eq!(ours.len(), want_last.len());
    let diff = ours
        .iter()
        .zip(&want_last)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = want_last.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    (diff, scale)
}

#[test]
fn quantized_gguf_cpu_graph_reads_the_blocks_in_place() {
    // stories260K with Q8_0 or Q4_0 matrices where rows allow (32-blocks; the 172-wide FFN rows stay F16, as
    // llama.cpp's quantizer falls back): the CPU graph reads the GGUF's bytes where they are (external data into the
    // file), so it is a few KB, and still tells llama2.c's story.
    let d = tempfile::tempdir().unwrap();
    let ids = [1, 403, 407, 261, 378, 411, 422, 325, 290];
    for (name, q4) in [("q8", false), ("q4", true)] {
        let gguf = stories_rewritten(d.path(), &format!("{name}.gguf"), |w, name, shape, v| {
            if shape.len() == 2 && shape[1] % 32 == 0 {
                if q4 {
                    w.add_q4_0(name, shape, v).unwrap();
                } else {
                    w.add_q8_0(name, shape, v).unwrap();
                }
            } else if shape.len() == 2 {
                w.add_f16(name, shape, v);
            } else {
                w.add_f32(name, shape, v);
            }
        });
        let q = GgufFile::open(&gguf).unwrap();
        assert_eq!(trt_diff::pipelines::llm_build::gguf_matrix_type(&q), None);
        let plan = d.path().join(format!("{name}.plan"));
        run(
            &["build", s(&gguf), "--out", s(&plan), "--no-progress"],
            true,
        );
        let cpu = d.path().join(format!("{name}.cpu.onnx"));
        let onnx = trt_diff::onnx::OnnxFile::load(&cpu).unwrap();
        let summary = trt_diff::onnx::summary::OnnxSummary::of(&onnx);
        let ops = &summary.op_histogram;
        // 5 layers x (q/k/v in one node, o, down) + the LM head; gate/up in one node per layer.
        assert_eq!(ops.get("trtdiff::MatMulGgml"), Some(&16), "{ops:?}");
        assert_eq!(ops.get("trtdiff::GateUpGgml"), Some(&5), "{ops:?}");
        assert_eq!(ops.get("trtdiff::GatherGgml"), Some(&1), "{ops:?}");
        // The graph and its own external data (norms, RoPE tables).
        let on_disk: u64 = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}.cpu.onnx"))
            })
            .map(|e| e.metadata().unwrap().len())
            .sum();
        let gguf_bytes = std::fs::metadata(&gguf).unwrap().len();
        assert!(
            on_disk < gguf_bytes / 4,
            "{name}: CPU graph of {on_disk} bytes for a GGUF of {gguf_bytes}"
        );
        for t in onnx.model.graph.iter().flat_map(|g| &g.initializer) {
            if t.data_type == trt_diff::onnx::DataType::UINT8.0 {
                let r = trt_diff::onnx::model::external_ref(t).expect("matrices stay in the GGUF");
                assert_eq!(r.location, format!("{name}.gguf"));
            }
        }
        let (diff, scale) = against_dequantized(&gguf, &cpu, &ids);
        eprintln!(
            "{name}: in-place blocks against the dequantized f32 graph, max logit difference {diff:.2e} (logits up to {scale:.1})"
        );
        // Activations quantized to 8 bits per block, as llama.cpp does.
        assert!(
            diff > 0.0 && diff < 0.02 * scale,
            "{name}: {diff} (scale {scale})"
        );
        let r = run(
            &[
                "generate",
                "--engine",
                s(&plan),
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "30",
            ],
            true,
        );
        eprintln!("{name}: {}", r.stdout);
        assert!(
            r.stdout
                .starts_with(", there was a little girl named Lily."),
            "{name}: {}",
            r.stdout
        );
    }
}

/// Asserts the arg-max of every row of `vocab` logits agrees: the same greedy choice at every position.
pub(crate) fn same_greedy_tokens(ours: &[f64], theirs: &[f64], vocab: usize) {
    let arg = |row: &[f64]| {
        (0..row.len())
            .max_by(|&i, &j| row[i].total_cmp(&row[j]))
            .unwrap_or(0)
    };
    assert_eq!(ours.len(), theirs.len());
    for (p, (a, b)) in ours.chunks(vocab).zip(theirs.chunks(vocab)).enumerate() {
        assert_eq!(arg(a), arg(b), "position {p}");
    }
}

/// tests/golden/llm/tiny_q4km/logits.bin: (vocab, ids, llama.cpp's logits of every position on the Q4_K_M file,
/// the same on the F16 file it was quantized from), one token per evaluation.
pub(crate) fn tiny_q4km_logits() -> (usize, Vec<i64>, Vec<f64>, Vec<f64>) {
    let b = std::fs::read(golden("tiny_q4km").join("logits.bin")).unwrap();
    let u = |i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as usize;
    let (vocab, n) = (u(0), u(1));
    let ids: Vec<i64> = (0..n).map(|i| u(2 + i) as i64).collect();
    let f = |i: usize| f32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap()) as f64;
    let base = 2 + n;
    let theirs: Vec<f64> = (0..n * vocab).map(|i| f(base + i)).collect();
    let f16: Vec<f64> = (0..n * vocab).map(|i| f(base + n * vocab + i)).collect();
    (vocab, ids, theirs, f16)
}

#[test]
fn q4_k_m_cpu_graph_matches_llama_cpp_logits() {
    // A tiny random Llama quantized to Q4_K_M by llama.cpp (Q4_K, Q6_K blocks) and llama.cpp's logits on it, one
    // token per evaluation (golden from scripts/golden/llm_gguf_llamacpp.py), with its logits on the F16 file the
    // quantizer started from. Ours reads the same blocks in place: its logits must be far closer to llama.cpp's
    // than the quantization moved them.
    let dir = golden("tiny_q4km");
    let (vocab, ids, theirs, f16) = tiny_q4km_logits();
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("model.gguf");
    std::fs::copy(dir.join("model.gguf"), &gguf).unwrap();
    let g = GgufFile::open(&gguf).unwrap();
    let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
    let gw = trt_diff::backend::ggml_ops::block_weights(&g, &m.config, "model.gguf")
        .unwrap()
        .unwrap();
    let kinds: std::collections::BTreeSet<String> = gw
        .tensors
        .values()
        .map(|t| t.kind.ggml().to_string())
        .collect();
    assert!(
        kinds.contains("Q4_K") && kinds.contains("Q6_K"),
        "{kinds:?}"
    );
    let graph =
        trt_diff::models::llama_cpu::decoder_graph_cpu_gguf(&m.config, &m.tensors, &gw, true)
            .unwrap();
    let cpu = d.path().join("model.cpu.onnx");
    trt_diff::onnx::save(graph, &cpu, &Default::default()).unwrap();
    use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
    let mut e = OrtEngine::open(&cpu, &OrtOptions::default()).unwrap();
    let mut dec = trt_diff::pipelines::kv_cache::Decoder::new(&mut e, ids.len()).unwrap();
    let mut ours = Vec::new();
    for id in &ids {
        ours.extend(dec.forward(&[*id]).unwrap().to_f64().unwrap());
    }
    let max_diff = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f64::max)
    };
    let (diff, quant) = (max_diff(&ours, &theirs), max_diff(&f16, &theirs));
    {
        let graph = trt_diff::models::llama_cpu::decoder_graph_cpu(
            &m.config,
            &m.tensors,
            trt_diff::onnx::DataType::FLOAT,
            true,
        )
        .unwrap();
        let f = d.path().join("f32.cpu.onnx");
        trt_diff::onnx::save(graph, &f, &Default::default()).unwrap();
        let mut e = OrtEngine::open(&f, &OrtOptions::default()).unwrap();
        let mut dec = trt_diff::pipelines::kv_cache::Decoder::new(&mut e, ids.len()).unwrap();
        let mut deq = Vec::new();
        for id in &ids {
            deq.extend(dec.forward(&[*id]).unwrap().to_f64().unwrap());
        }
        // Against the same blocks dequantized into an f32 graph (no activation quantization): ours is no farther
        // from it than llama.cpp is (both quantize activations per block).
        let (o, t) = (max_diff(&ours, &deq), max_diff(&theirs, &deq));
        eprintln!("against the dequantized f32 graph: ours {o:.3e}, llama.cpp {t:.3e}");
        assert!(o < 1.5 * t, "ours {o} against llama.cpp's {t}");
    }
    eprintln!(
        "Q4_K_M: ours against llama.cpp max logit difference {diff:.3e}; llama.cpp's Q4_K_M against its F16 {quant:.3e}"
    );
    assert!(
        diff < 0.1 * quant,
        "{diff} against a quantization error of {quant}"
    );
    same_greedy_tokens(&ours, &theirs, vocab);
}
