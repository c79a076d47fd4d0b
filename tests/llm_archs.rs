//! Tiny random Mistral and Phi-3 decoders (scripts/golden/llm_archs.py) from Hugging Face folders and from GGUF
//! match transformers' MistralForCausalLM / Phi3ForCausalLM logits through prefill and KV-cache decode, on both
//! decoder graphs (the TensorRT graph and the CPU graph) on ONNX Runtime. Both have a sliding attention window
//! (4 and 5 keys) shorter than the 12-token prompt, which changes the logits from the 5th (6th) token on; Phi-3's
//! fused qkv_proj / gate_up_proj (attn_qkv / ffn_up in GGUF) are split, in place for the CPU graph's GGUF blocks.
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::models::llama::{LlamaConfig, decoder_graph};
use trt_diff::onnx::proto::ModelProto;
use trt_diff::pipelines::kv_cache::Decoder;
use trt_diff::quant::LinearPrecision;
use trt_diff::quant::policy::Policy;

/// Largest logit difference allowed, relative to the largest golden logit.
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

pub fn golden_dir(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/llm/tiny_{arch}"))
}

/// The prompt's token ids and transformers' logits rows for them.
pub fn golden(arch: &str) -> (Vec<i64>, Vec<Vec<f64>>) {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir(arch).join("logits.json")).unwrap(),
    )
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

/// Logits rows of `graph` for `all` on ONNX Runtime's CPU: a prefill of `split` tokens, then alternately one token
/// and runs of three with the KV cache (so windowed keys leave the window both inside a call and across calls).
pub fn run_graph(
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

pub fn check(what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{what}: one logits row per token");
    let scale = want.iter().flatten().fold(0.0, |m: f64, x| m.max(x.abs()));
    let diff = got
        .iter()
        .zip(want)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f64::max);
    let rel = diff / scale;
    eprintln!("{what}: max logit difference {rel:.2e} of the largest logit");
    assert!(
        rel <= RELATIVE_TOLERANCE,
        "{what}: max logit difference {rel:.2e} of the largest logit"
    );
}

#[test]
fn hf_and_gguf_mistral_and_phi3_match_transformers_on_both_graphs() {
    for (arch, gguf_arch, window) in [("mistral", "llama", 4), ("phi3", "phi3", 5)] {
        let (all, want) = golden(arch);
        let d = tempfile::tempdir().unwrap();
        let hf = trt_diff::weights::hf::load(&golden_dir(arch), None).unwrap();
        let c = &hf.config;
        assert_eq!(hf.arch, arch);
        assert_eq!(c.sliding_window, Some(window), "{arch}");
        assert!(!c.tied_embeddings && !c.attn_bias, "{arch}");
        let trt = |c: &LlamaConfig, w| {
            decoder_graph(c, w, &Policy::uniform(LinearPrecision::F32)).unwrap()
        };
        check(
            &format!("{arch} HF, TensorRT graph"),
            &run_graph(d.path(), "hf_trt", trt(c, &hf.tensors), c, &all, 6),
            &want,
        );
        let cpu = trt_diff::models::llama_cpu::decoder_graph_cpu(
            c,
            &hf.tensors,
            trt_diff::onnx::DataType::FLOAT,
            false,
        )
        .unwrap();
        check(
            &format!("{arch} HF, CPU graph"),
            &run_graph(d.path(), "hf_cpu", cpu, c, &all, 4),
            &want,
        );

        let gguf = d.path().join("model.gguf");
        std::fs::copy(golden_dir(arch).join(format!("tiny_{arch}.gguf")), &gguf).unwrap();
        let g = trt_diff::weights::gguf::GgufFile::open(&gguf).unwrap();
        let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
        assert_eq!(m.arch, gguf_arch);
        let mut want_cfg = hf.config.clone();
        want_cfg.rope_interleaved = gguf_arch == "llama";
        assert_eq!(
            m.config, want_cfg,
            "{arch}: GGUF and config.json describe the same model"
        );
        let c = &m.config;
        check(
            &format!("{arch} GGUF, TensorRT graph"),
            &run_graph(d.path(), "gguf_trt", trt(c, &m.tensors), c, &all, 3),
            &want,
        );
        let gw = trt_diff::backend::ggml_ops::block_weights(&g, c, "model.gguf")
            .unwrap()
            .expect("F16 matrices are read in place");
        for name in [
            "self_attn.v_proj.weight",
            "mlp.gate_proj.weight",
            "mlp.up_proj.weight",
        ] {
            let t = &gw.tensors[&format!("model.layers.1.{name}")];
            let rows = if name.starts_with("mlp") {
                c.hidden_dim
            } else {
                c.kv_dim()
            };
            assert_eq!((t.rows, t.k), (rows, c.dim), "{arch} {name}");
        }
        let graph =
            trt_diff::models::llama_cpu::decoder_graph_cpu_gguf(c, &m.tensors, &gw, false).unwrap();
        check(
            &format!("{arch} GGUF, CPU graph on in-place F16 matrices"),
            &run_graph(d.path(), "model.cpu", graph, c, &all, 5),
            &want,
        );
    }
}

#[test]
fn unsupported_phi3_variants_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let src = golden_dir("phi3");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), d.path().join(f)).unwrap();
    }
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let refused = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut cfg = base.clone();
        edit(&mut cfg);
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        format!(
            "{:#}",
            trt_diff::weights::hf::load(d.path(), None).err().unwrap()
        )
    };
    // The 128k variants' longrope scaling.
    let e = refused(&|c| {
        c["rope_parameters"]["rope_type"] = "longrope".into();
    });
    assert!(e.contains("longrope") && e.contains("4k"), "{e}");
    // Phi-4-mini's partial rotary embedding.
    let e = refused(&|c| {
        c["rope_parameters"]["partial_rotary_factor"] = 0.75.into();
    });
    assert!(e.contains("partial_rotary_factor 0.75"), "{e}");
    // A window that is not a count.
    let e = refused(&|c| {
        c["sliding_window"] = "wide".into();
    });
    assert!(e.contains("sliding_window") && e.contains("corrupt"), "{e}");
}

#[test]
fn cli_builds_and_generates_from_a_quantized_phi3_gguf() {
    // The golden Phi-3 GGUF with its matrices in Q8_0 (fused attn_qkv and ffn_up included: the CPU graph reads
    // their row ranges in place) and the BERT golden vocabulary's tokenizer keys.
    use trt_diff::weights::gguf::GgufFile;
    let bin = env!("CARGO_BIN_EXE_trt-diff");
    let d = tempfile::tempdir().unwrap();
    let model = GgufFile::open(&golden_dir("phi3").join("tiny_phi3.gguf")).unwrap();
    let vocab = GgufFile::open(&golden_dir("qwen3").join("../wpm/wpm.gguf")).unwrap();
    let mut w = trt_diff::weights::gguf_write::GgufWriter::default();
    for (k, v) in model.metadata.iter().chain(
        vocab
            .metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.")),
    ) {
        w.set(k, v.clone());
    }
    for t in &model.tensors {
        let data = model.tensor_f32(&t.name).unwrap();
        match t.dims[..] {
            [cols, rows] => w.add_q8_0(&t.name, &[rows, cols], &data).unwrap(),
            _ => w.add_f32(&t.name, &t.dims, &data),
        }
    }
    let gguf = d.path().join("tiny_phi3_q8.gguf");
    w.write(&gguf).unwrap();
    let plan = d.path().join("p.plan");
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
    let cpu = trt_diff::onnx::OnnxFile::load(&d.path().join("p.cpu.onnx")).unwrap();
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
