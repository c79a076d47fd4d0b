//! A tiny random Qwen2 (q/k/v biases, rope_theta 1e6, separate lm_head) from a Hugging Face folder and from GGUF
//! matches transformers' Qwen2ForCausalLM logits (golden from scripts/golden/llm_qwen2.py), through prefill and
//! KV-cache decode; the Qwen2 and stories260K decoder graphs build with the TensorRT-RTX builder in fp16, FP8 and
//! NVFP4.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::Engine;
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::models::llama::{LlamaConfig, decoder_graph};
use trt_diff::onnx::DataType;
use trt_diff::pipelines::kv_cache::Decoder;
use trt_diff::quant::LinearPrecision;
use trt_diff::quant::policy::Policy;

fn golden_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/llm/tiny_qwen2"
    ))
}

fn golden() -> (Vec<i64>, Vec<Vec<f64>>) {
    golden_in(&golden_dir())
}

fn golden_in(dir: &Path) -> (Vec<i64>, Vec<Vec<f64>>) {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logits.json")).unwrap()).unwrap();
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

/// Logits rows for `all`, fed as a prefill of `split` tokens then one token per call with the KV cache.
fn run_cached(
    dir: &Path,
    c: &LlamaConfig,
    w: &HashMap<String, Vec<f32>>,
    p: LinearPrecision,
    all: &[i64],
    split: usize,
) -> Vec<Vec<f64>> {
    let graph = decoder_graph(c, w, &Policy::uniform(p)).unwrap();
    run_graph(dir, &p.name(), graph, c, all, split)
}

/// As [`run_cached`] for any decoder graph.
fn run_graph(
    dir: &Path,
    name: &str,
    graph: trt_diff::onnx::proto::ModelProto,
    c: &LlamaConfig,
    all: &[i64],
    split: usize,
) -> Vec<Vec<f64>> {
    let onnx = dir.join(format!("m_{name}.onnx"));
    trt_diff::onnx::save(graph, &onnx, &Default::default()).unwrap();
    let mut e = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
    // Either KV-cache layout (passed for the TensorRT graphs, in place for the CPU graphs).
    let in_place = e.inputs().iter().any(|d| d.name == "seqlens_k");
    let mut dec = Decoder::new(&mut e, all.len()).unwrap();
    let mut rows = Vec::new();
    // The prompt, then single tokens and runs of three after the cache (decode and continued prefill).
    let (mut at, mut n) = (0, split);
    while at < all.len() {
        let chunk = &all[at..(at + n).min(all.len())];
        let logits = dec.forward(chunk).unwrap().to_f64().unwrap();
        rows.extend(logits.chunks(c.vocab_size).map(|r| r.to_vec()));
        at += chunk.len();
        n = if n == 1 { 3 } else { 1 };
    }
    // A full in-place cache refuses more tokens with a clear error (the passed layout grows).
    if in_place {
        let err = format!("{:#}", dec.forward(&all[..1]).unwrap_err());
        assert!(err.contains("do not fit"), "{err}");
    }
    rows
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn hf_and_gguf_qwen2_match_transformers() {
    let (all, want) = golden();
    let d = tempfile::tempdir().unwrap();
    let hf = trt_diff::weights::hf::load(&golden_dir(), None).unwrap();
    let c = &hf.config;
    assert_eq!(hf.arch, "qwen2");
    assert!(c.attn_bias && !c.tied_embeddings && !c.rope_interleaved);
    assert_eq!((c.rope_theta, c.n_kv_heads, c.max_seq_len), (1e6, 2, 64));
    let got = run_cached(d.path(), c, &hf.tensors, LinearPrecision::F32, &all, 6);
    let diff = max_diff(&got, &want);
    eprintln!("HF checkpoint: max abs logit difference {diff:.2e}");
    assert!(
        diff <= 1e-4,
        "HF checkpoint: max abs logit difference {diff}"
    );
    let g = trt_diff::weights::gguf::GgufFile::open(&golden_dir().join("tiny_qwen2.gguf")).unwrap();
    let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
    assert_eq!(m.arch, "qwen2");
    assert_eq!(&m.config, c, "GGUF and config.json describe the same model");
    let got = run_cached(
        d.path(),
        &m.config,
        &m.tensors,
        LinearPrecision::F32,
        &all,
        3,
    );
    let diff = max_diff(&got, &want);
    eprintln!("GGUF: max abs logit difference {diff:.2e}");
    assert!(diff <= 1e-4, "GGUF: max abs logit difference {diff}");
    // The fp16 graph (f16 weights and matmuls) runs on ONNX Runtime; its CPU provider computes f16 MatMul in f32
    // (these weights are bf16 values, exact in f16), so this checks the graph, not f16 rounding.
    let got = run_cached(d.path(), c, &hf.tensors, LinearPrecision::F16, &all, 6);
    let diff = max_diff(&got, &want);
    eprintln!("fp16: max abs logit difference {diff:.2e}");
    assert!(diff <= 5e-2, "fp16: max abs logit difference {diff}");
}

#[test]
fn cpu_graphs_with_16_bit_weights_match_transformers() {
    // The CPU graphs keep weights 16-bit through trt-diff's MatMulF16/MatMulBF16 operator; these checkpoints are
    // bf16 (exact in f16 too), so both must match transformers as closely as the f32 graph. Tiny Llama 3 has a
    // tied LM head (it reads the 16-bit embedding table).
    let d = tempfile::tempdir().unwrap();
    for (dir, split) in [(golden_dir(), 6), (golden_dir().join("../tiny_llama3"), 30)] {
        let (all, want) = golden_in(&dir);
        let m = trt_diff::weights::hf::load(&dir, None).unwrap();
        assert_eq!(
            trt_diff::pipelines::llm_build::hf_matrix_type(&dir).unwrap(),
            Some(DataType::BFLOAT16)
        );
        for half in [DataType::BFLOAT16, DataType::FLOAT16, DataType::FLOAT] {
            let g =
                trt_diff::models::llama_cpu::decoder_graph_cpu(&m.config, &m.tensors, half, false)
                    .unwrap();
            let got = run_graph(d.path(), &format!("cpu_{half}"), g, &m.config, &all, split);
            let diff = max_diff(&got, &want);
            eprintln!(
                "{} CPU graph, {half} weights: max abs logit difference {diff:.2e}",
                m.arch
            );
            assert!(
                diff <= 1e-4,
                "{} {half}: max abs logit difference {diff}",
                m.arch
            );
        }
        // The CUDA provider's form of the graph (standard operators, FusedMatMul on the same [n, k] matrices),
        // with f32 activations so that the CPU provider runs it: the GPU builds use it in f16/bf16.
        let g = trt_diff::models::llama_cpu::decoder_graph_cuda(
            &m.config,
            &m.tensors,
            DataType::FLOAT,
            false,
        )
        .unwrap();
        let got = run_graph(d.path(), "cuda_form", g, &m.config, &all, split);
        let diff = max_diff(&got, &want);
        eprintln!(
            "{} CUDA-form graph: max abs logit difference {diff:.2e}",
            m.arch
        );
        assert!(
            diff <= 1e-4,
            "{} CUDA form: max abs logit difference {diff}",
            m.arch
        );
    }
}

#[test]
fn hf_config_errors_are_clear() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("config.json"),
        r#"{"model_type": "gpt_neox"}"#,
    )
    .unwrap();
    let e = trt_diff::weights::hf::load(d.path(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("gpt_neox") && e.contains("config.json"), "{e}");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("config.json")).unwrap())
            .unwrap();
    cfg["vocab_size"] = 128.into();
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = format!(
        "{:#}",
        trt_diff::weights::hf::load(d.path(), None).err().unwrap()
    );
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn decoders_build_with_tensorrt_rtx_in_fp16_fp8_nvfp4() {
    use trt_diff::pipelines::llm_build::decoder_profiles;
    use trt_diff::trt::{BuildOptions, build_engine};
    let d = tempfile::tempdir().unwrap();
    let qwen = trt_diff::weights::hf::load(&golden_dir(), None).unwrap();
    let data = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    let stories =
        trt_diff::weights::llama2c::Llama2c::load(&data.join("llm/stories260K.bin")).unwrap();
    for (name, c, w) in [
        ("qwen2", &qwen.config, &qwen.tensors),
        ("stories", &stories.config, &stories.tensors),
    ] {
        for p in ["fp16", "fp8", "nvfp4"] {
            let prec = trt_diff::pipelines::llm_build::linear_precision(
                trt_diff::quant::Precision::parse(p).unwrap(),
            )
            .unwrap();
            let onnx = d.path().join(format!("{name}_{p}.onnx"));
            trt_diff::onnx::save(
                decoder_graph(c, w, &Policy::defaults(prec)).unwrap(),
                &onnx,
                &Default::default(),
            )
            .unwrap();
            let summary = trt_diff::onnx::summary::OnnxSummary::of(
                &trt_diff::onnx::OnnxFile::load(&onnx).unwrap(),
            );
            match p {
                "fp16" => assert!(summary.op_histogram.contains_key("Cast")),
                "fp8" => assert!(summary.op_histogram.contains_key("QuantizeLinear")),
                _ => assert!(
                    summary
                        .op_histogram
                        .contains_key("trt::TRT_FP4DynamicQuantize")
                ),
            }
            let o = build_engine(&BuildOptions {
                onnx: onnx.clone(),
                out: d.path().join(format!("{name}_{p}.plan")),
                shapes: decoder_profiles(c),
                progress: false,
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{name} {p}: {e:#}"));
            assert!(
                o.manifest.builder.as_ref().unwrap().layers > 0,
                "{name} {p}"
            );
            assert!(o.engine.exists());
        }
    }
}

#[test]
fn cli_builds_and_generates_from_a_hf_folder() {
    // The tiny model has 128 token ids; the 125-token BERT golden vocabulary serves as its tokenizer.
    let bin = env!("CARGO_BIN_EXE_trt-diff");
    let d = tempfile::tempdir().unwrap();
    let plan = d.path().join("q.plan");
    let vocab = golden_dir().join("../wpm/wpm.gguf");
    let out = std::process::Command::new(bin)
        .args([
            "build",
            golden_dir().to_str().unwrap(),
            "--tokenizer",
            vocab.to_str().unwrap(),
        ])
        .args([
            "--precision",
            "fp16",
            "--no-progress",
            "--out",
            plan.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = trt_diff::manifest::Manifest::read(&trt_diff::manifest::sidecar_path(&plan)).unwrap();
    let Some(trt_diff::manifest::Pipeline::Llm(trt_diff::manifest::LlmPipeline {
        arch,
        tokenizer,
        cpu_onnx,
        cuda_onnx,
        ..
    })) = m.pipeline
    else {
        panic!("no LLM pipeline in the manifest");
    };
    assert_eq!(
        (arch.as_str(), tokenizer.as_str()),
        ("qwen2", "q.tokenizer.gguf")
    );
    // bf16 weights: the CPU backend runs a graph that keeps them bf16.
    assert_eq!(cpu_onnx.as_deref(), Some("q.cpu.onnx"));
    assert!(d.path().join("q.cpu.onnx").exists());
    // The CUDA provider's graph reads the same bf16 matrices from the CPU graph's data file: its own data holds
    // only what differs (norms and biases in bf16), and every reference stays inside the bundle's folder.
    assert_eq!(cuda_onnx.as_deref(), Some("q.cuda.onnx"));
    let cuda = trt_diff::onnx::OnnxFile::load(&d.path().join("q.cuda.onnx")).unwrap();
    let mut locations = std::collections::BTreeMap::<String, u64>::new();
    for t in cuda.model.graph.iter().flat_map(|g| &g.initializer) {
        if let Some(r) = trt_diff::onnx::model::external_ref(t) {
            *locations.entry(r.location).or_default() += r.length.unwrap_or(0);
        }
    }
    let cpu_data = std::fs::metadata(d.path().join("q.cpu.onnx.data"))
        .unwrap()
        .len();
    let shared = locations.get("q.cpu.onnx.data").copied().unwrap_or(0);
    let own = locations.get("q.cuda.onnx.data").copied().unwrap_or(0);
    assert!(
        shared * 10 > cpu_data * 9 && own * 10 < shared && locations.len() <= 2,
        "CUDA graph's external data: {locations:?}, CPU data file {cpu_data} bytes"
    );
    let out = std::process::Command::new(bin)
        .args([
            "generate",
            "--engine",
            plan.to_str().unwrap(),
            "--prompt",
            "hello world",
            "--max-tokens",
            "8",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("generated:"), "{err}");
    // Without --tokenizer the error says what to give.
    let out = std::process::Command::new(bin)
        .args([
            "build",
            golden_dir().to_str().unwrap(),
            "--out",
            plan.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--tokenizer FILE.gguf"),
        "{err}"
    );
}

#[test]
fn hf_llama_with_llama3_rope_scaling_and_tied_embeddings_matches_transformers() {
    // Golden from scripts/golden/llm_llama_rope.py: 40 positions over an original context of 16, so every RoPE
    // band (scaled, blended, kept) matters.
    let dir = golden_dir().join("../tiny_llama3");
    let (all, want) = golden_in(&dir);
    let m = trt_diff::weights::hf::load(&dir, None).unwrap();
    assert_eq!(m.arch, "llama");
    assert!(m.config.tied_embeddings && !m.config.attn_bias);
    assert!(matches!(
        m.config.rope_scaling,
        Some(trt_diff::models::llama::RopeScaling::Llama3 {
            original_context: 16,
            ..
        })
    ));
    let d = tempfile::tempdir().unwrap();
    let got = run_cached(
        d.path(),
        &m.config,
        &m.tensors,
        LinearPrecision::F32,
        &all,
        30,
    );
    let diff = max_diff(&got, &want);
    eprintln!("llama3 rope: max abs logit difference {diff:.2e}");
    assert!(diff <= 1e-4, "llama3 rope: max abs logit difference {diff}");
}
