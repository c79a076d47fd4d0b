//! A tiny random Qwen3 (per-head q/k RMSNorms, head_dim 12 where hidden_size / heads is 8, no q/k/v biases, tied
//! embeddings) from a Hugging Face folder and from GGUF matches transformers' Qwen3ForCausalLM logits (golden from
//! scripts/golden/llm_qwen3.py) through prefill and KV-cache decode, on both decoder graphs (the TensorRT graph and
//! the CPU graph, whose heads of 12 are padded to 16) on ONNX Runtime; `build --onnx-only` + `generate` run it.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::models::llama::{LlamaConfig, decoder_graph};
use trt_diff::onnx::DataType;
use trt_diff::onnx::proto::ModelProto;
use trt_diff::pipelines::kv_cache::Decoder;
use trt_diff::quant::LinearPrecision;
use trt_diff::quant::policy::Policy;

/// Largest logit difference allowed, relative to the largest golden logit.
const RELATIVE_TOLERANCE: f64 = 1e-4;

fn golden_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/llm/tiny_qwen3"
    ))
}

/// The prompt's token ids and transformers' logits rows for them.
fn golden() -> (Vec<i64>, Vec<Vec<f64>>) {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("logits.json")).unwrap())
            .unwrap();
    let ids = j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let rows = j["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        })
        .collect();
    (ids, rows)
}

/// Logits rows of `graph` for `all` on ONNX Runtime's CPU, fed as a prefill of `split` tokens, then alternately one
/// token and runs of three with the KV cache.
fn run_graph(
    dir: &Path,
    name: &str,
    graph: ModelProto,
    c: &LlamaConfig,
    all: &[i64],
    split: usize,
) -> Vec<Vec<f64>> {
    let onnx = dir.join(format!("{name}.onnx"));
    trt_diff::onnx::save(graph, &onnx, &Default::default()).unwrap();
    let mut e = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
    let mut dec = Decoder::new(&mut e, all.len()).unwrap();
    let mut rows = Vec::new();
    let (mut at, mut n) = (0, split);
    while at < all.len() {
        let chunk = &all[at..(at + n).min(all.len())];
        let logits = dec.forward(chunk).unwrap().to_f64().unwrap();
        rows.extend(logits.chunks(c.vocab_size).map(|r| r.to_vec()));
        at += chunk.len();
        n = if n == 1 { 3 } else { 1 };
    }
    rows
}

/// Largest absolute difference over the largest absolute golden logit.
fn relative_diff(got: &[Vec<f64>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len(), "one logits row per token");
    let scale = want.iter().flatten().fold(0.0, |m: f64, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "vocabulary size");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f64::max);
    diff / scale
}

fn check(what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
    let rel = relative_diff(got, want);
    eprintln!("{what}: max logit difference {rel:.2e} of the largest logit");
    assert!(
        rel <= RELATIVE_TOLERANCE,
        "{what}: max logit difference {rel:.2e} of the largest logit"
    );
}

fn tensorrt_graph(c: &LlamaConfig, w: &HashMap<String, Vec<f32>>) -> ModelProto {
    decoder_graph(c, w, &Policy::uniform(LinearPrecision::F32)).unwrap()
}

#[test]
fn hf_qwen3_matches_transformers_on_both_graphs() {
    let (all, want) = golden();
    let d = tempfile::tempdir().unwrap();
    let hf = trt_diff::weights::hf::load(&golden_dir(), None).unwrap();
    let c = &hf.config;
    assert_eq!(hf.arch, "qwen3");
    assert!(c.qk_norm && !c.attn_bias && c.tied_embeddings && !c.rope_interleaved);
    assert_eq!((c.head_dim(), c.q_dim(), c.kv_dim()), (12, 48, 24));
    assert_eq!((c.rope_theta, c.n_kv_heads, c.max_seq_len), (1e6, 2, 64));
    let got = run_graph(
        d.path(),
        "trt_f32",
        tensorrt_graph(c, &hf.tensors),
        c,
        &all,
        6,
    );
    check("HF, TensorRT graph", &got, &want);
    // The checkpoint is bf16: the CPU graph keeps bf16 or f16 weights exactly (the values are exact in f16 too).
    for wtype in [DataType::BFLOAT16, DataType::FLOAT16, DataType::FLOAT] {
        let g =
            trt_diff::models::llama_cpu::decoder_graph_cpu(c, &hf.tensors, wtype, false).unwrap();
        let got = run_graph(d.path(), &format!("cpu_{wtype}"), g, c, &all, 4);
        check(&format!("HF, CPU graph, {wtype} weights"), &got, &want);
    }
    // The CUDA provider's form (standard operators; per-head q/k norms in the activations' type), f32 here.
    let g = trt_diff::models::llama_cpu::decoder_graph_cuda(c, &hf.tensors, DataType::FLOAT, false)
        .unwrap();
    let got = run_graph(d.path(), "cuda_form", g, c, &all, 4);
    check("HF, CUDA-form graph", &got, &want);
}

#[test]
fn gguf_qwen3_matches_transformers_on_both_graphs() {
    let (all, want) = golden();
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("model.gguf");
    std::fs::copy(golden_dir().join("tiny_qwen3.gguf"), &gguf).unwrap();
    let g = trt_diff::weights::gguf::GgufFile::open(&gguf).unwrap();
    let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
    assert_eq!(m.arch, "qwen3");
    let hf = trt_diff::weights::hf::load(&golden_dir(), None).unwrap();
    assert_eq!(
        m.config, hf.config,
        "GGUF and config.json describe the same model"
    );
    let c = &m.config;
    let got = run_graph(
        d.path(),
        "trt_f32",
        tensorrt_graph(c, &m.tensors),
        c,
        &all,
        3,
    );
    check("GGUF, TensorRT graph", &got, &want);
    // The CPU graph reading the file's F16 matrices in place (heads padded after the projections).
    let gw = trt_diff::backend::ggml_ops::block_weights(&g, c, "model.gguf")
        .unwrap()
        .expect("F16 matrices are read in place");
    assert!(
        gw.tensors
            .contains_key("model.layers.1.self_attn.q_proj.weight")
    );
    let graph =
        trt_diff::models::llama_cpu::decoder_graph_cpu_gguf(c, &m.tensors, &gw, false).unwrap();
    let got = run_graph(d.path(), "model.cpu", graph, c, &all, 5);
    check("GGUF, CPU graph on in-place F16 matrices", &got, &want);
}

#[test]
fn qwen3_files_missing_their_head_norms_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let src = golden_dir();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    // Without head_dim, the heads are hidden_size / heads = 8 values and the projections do not fit.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("head_dim");
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = format!(
        "{:#}",
        trt_diff::weights::hf::load(d.path(), None).err().unwrap()
    );
    assert!(
        e.contains("q_proj.weight") && e.contains("config implies"),
        "{e}"
    );
    // A head_dim that is not a number is named.
    cfg["head_dim"] = "twelve".into();
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = format!(
        "{:#}",
        trt_diff::weights::hf::load(d.path(), None).err().unwrap()
    );
    assert!(e.contains("head_dim") && e.contains("config.json"), "{e}");
    // A Qwen3 checkpoint without its q_norm weights is refused by name.
    let mut m = trt_diff::weights::hf::load(&src, None).unwrap();
    m.tensors.remove("model.layers.1.self_attn.k_norm.weight");
    let e = trt_diff::weights::limits::check_tensors("tiny", &m.config, &m.tensors)
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.layers.1.self_attn.k_norm.weight"), "{e}");
}

#[test]
fn cli_builds_onnx_only_and_generates_from_a_qwen3_folder() {
    // The tiny model has 128 token ids; the 125-token BERT golden vocabulary serves as its tokenizer.
    let bin = env!("CARGO_BIN_EXE_trt-diff");
    let d = tempfile::tempdir().unwrap();
    let plan = d.path().join("q.plan");
    let vocab = golden_dir().join("../wpm/wpm.gguf");
    let out = std::process::Command::new(bin)
        .args(["build", golden_dir().to_str().unwrap()])
        .args(["--tokenizer", vocab.to_str().unwrap()])
        .args(["--onnx-only", "--no-progress", "--out"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!plan.exists(), "--onnx-only writes no plan");
    let m = trt_diff::manifest::Manifest::read(&trt_diff::manifest::sidecar_path(&plan)).unwrap();
    let Some(trt_diff::manifest::Pipeline::Llm(llm)) = m.pipeline else {
        panic!("no LLM pipeline in the manifest");
    };
    assert_eq!(llm.arch, "qwen3");
    let out = std::process::Command::new(bin)
        .args(["generate", "--engine"])
        .arg(&plan)
        .args(["--prompt", "hello world", "--max-tokens", "8"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("generated:"), "{err}");
}

#[test]
fn qwen3_decoder_builds_with_tensorrt_rtx_in_fp16_fp8_nvfp4() {
    use trt_diff::pipelines::llm_build::{decoder_profiles, linear_precision};
    use trt_diff::trt::{BuildOptions, build_engine};
    let d = tempfile::tempdir().unwrap();
    let m = trt_diff::weights::hf::load(&golden_dir(), None).unwrap();
    for p in ["fp16", "fp8", "nvfp4"] {
        let prec = linear_precision(trt_diff::quant::Precision::parse(p).unwrap()).unwrap();
        let onnx = d.path().join(format!("qwen3_{p}.onnx"));
        let graph = decoder_graph(&m.config, &m.tensors, &Policy::defaults(prec)).unwrap();
        trt_diff::onnx::save(graph, &onnx, &Default::default()).unwrap();
        let o = build_engine(&BuildOptions {
            onnx,
            out: d.path().join(format!("qwen3_{p}.plan")),
            shapes: decoder_profiles(&m.config),
            progress: false,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("qwen3 {p}: {e:#}"));
        assert!(o.manifest.builder.as_ref().unwrap().layers > 0, "{p}");
        assert!(o.engine.exists(), "{p}");
    }
}

#[test]
fn cli_builds_and_generates_from_a_quantized_qwen3_gguf() {
    // The golden GGUF with Q8_0 matrices where rows split into blocks of 32 (o_proj's 48 columns stay F16, a mixed
    // file: the CPU graph reads the blocks in place) and the BERT golden vocabulary's tokenizer keys.
    use trt_diff::weights::gguf::GgufFile;
    let bin = env!("CARGO_BIN_EXE_trt-diff");
    let d = tempfile::tempdir().unwrap();
    let model = GgufFile::open(&golden_dir().join("tiny_qwen3.gguf")).unwrap();
    let vocab = GgufFile::open(&golden_dir().join("../wpm/wpm.gguf")).unwrap();
    let mut w = trt_diff::weights::gguf_write::GgufWriter::default();
    for (k, v) in &model.metadata {
        w.set(k, v.clone());
    }
    for (k, v) in vocab
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        w.set(k, v.clone());
    }
    let mut quantized = 0;
    for t in &model.tensors {
        let data = model.tensor_f32(&t.name).unwrap();
        match t.dims[..] {
            [cols, rows] if cols % 32 == 0 => {
                w.add_q8_0(&t.name, &[rows, cols], &data).unwrap();
                quantized += 1;
            }
            [cols, rows] => w.add_f16(&t.name, &[rows, cols], &data),
            _ => w.add_f32(&t.name, &t.dims, &data),
        }
    }
    assert!(quantized > 0);
    let gguf = d.path().join("tiny_qwen3_q8.gguf");
    w.write(&gguf).unwrap();
    let plan = d.path().join("g.plan");
    let out = std::process::Command::new(bin)
        .arg("build")
        .arg(&gguf)
        .args(["--onnx-only", "--no-progress", "--out"])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = trt_diff::manifest::Manifest::read(&trt_diff::manifest::sidecar_path(&plan)).unwrap();
    let Some(trt_diff::manifest::Pipeline::Llm(llm)) = m.pipeline else {
        panic!("no LLM pipeline in the manifest");
    };
    assert_eq!(llm.arch, "qwen3");
    assert_eq!(llm.cpu_onnx.as_deref(), Some("g.cpu.onnx"));
    let cpu = trt_diff::onnx::OnnxFile::load(&d.path().join("g.cpu.onnx")).unwrap();
    let ops = trt_diff::onnx::summary::OnnxSummary::of(&cpu).op_histogram;
    assert!(
        ops.keys().any(|k| k.contains("MatMulGgml")),
        "the CPU graph reads the GGUF's blocks: {ops:?}"
    );
    let out = std::process::Command::new(bin)
        .args(["generate", "--engine"])
        .arg(&plan)
        .args(["--prompt", "hello world", "--max-tokens", "8"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("generated:"), "{err}");
}

#[test]
fn qwen3_ggufs_with_unequal_head_sizes_or_missing_norms_are_refused() {
    use trt_diff::weights::gguf::{GgufFile, Value};
    let d = tempfile::tempdir().unwrap();
    let model = GgufFile::open(&golden_dir().join("tiny_qwen3.gguf")).unwrap();
    // Copies the golden file with metadata `set` and the tensors `keep` accepts.
    let variant = |name: &str, set: &[(&str, Value)], keep: &dyn Fn(&str) -> bool| {
        let mut w = trt_diff::weights::gguf_write::GgufWriter::default();
        for (k, v) in &model.metadata {
            w.set(k, v.clone());
        }
        for (k, v) in set {
            w.set(k, v.clone());
        }
        for t in model.tensors.iter().filter(|t| keep(&t.name)) {
            let data = model.tensor_f32(&t.name).unwrap();
            let shape: Vec<u64> = t.dims.iter().rev().copied().collect();
            w.add_f32(&t.name, &shape, &data);
        }
        let path = d.path().join(name);
        w.write(&path).unwrap();
        let g = GgufFile::open(&path).unwrap();
        format!(
            "{:#}",
            trt_diff::weights::gguf_model::load(&g, None).err().unwrap()
        )
    };
    let e = variant(
        "unequal.gguf",
        &[("qwen3.attention.value_length", Value::U32(16))],
        &|_| true,
    );
    assert!(
        e.contains("key_length 12") && e.contains("value_length 16"),
        "{e}"
    );
    let e = variant("no_norms.gguf", &[], &|n| !n.contains("attn_k_norm"));
    assert!(
        e.contains("no_norms.gguf") && e.contains("model.layers.0.self_attn.k_norm.weight"),
        "{e}"
    );
}
