//! The LLM path on the real stories260K model: greedy generation reproduces llama2.c's reference output, the
//! decoder graphs build with the TensorRT-RTX builder in every precision, and bad requests are clear errors.
use crate::common;
use common::*;
use std::path::PathBuf;
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::models::llama::decoder_graph;
use trt_diff::pipelines::llm::{Generator, SamplingParams, Utf8Stream};
use trt_diff::quant::LinearPrecision;
use trt_diff::quant::policy::Policy;
use trt_diff::tokenizer::llama2c::Llama2cTokenizer;
use trt_diff::weights::llama2c::Llama2c;

fn data(rel: &str) -> PathBuf {
    let base = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    let p = base.join(rel);
    assert!(
        p.exists(),
        "{} missing (../shared/data beside the checkout, or TRT_DIFF_SHARED_DATA)",
        p.display()
    );
    p
}

/// llama2.c `run.c -t 0` on stories260K from "Once upon a time" (published with the model).
const REFERENCE: &str =
    ", there was a little girl named Lily. She loved to play outside in the park.";

#[test]
fn greedy_generation_matches_llama2c() {
    let model = Llama2c::load(&data("llm/stories260K.bin")).unwrap();
    let c = &model.config;
    assert_eq!(
        (
            c.dim,
            c.hidden_dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size
        ),
        (64, 172, 5, 8, 4, 512)
    );
    let tok = Llama2cTokenizer::load(&data("llm/tok512.bin"), c.vocab_size).unwrap();
    let d = tempfile::tempdir().unwrap();
    // The TensorRT graph (KV cache passed in and out) and the CPU graph (cache held in place by the engine and
    // reused by later generations, which must not see what earlier ones left in it).
    let graphs = [
        decoder_graph(c, &model.tensors, &Policy::uniform(LinearPrecision::F32)).unwrap(),
        trt_diff::models::llama_cpu::decoder_graph_cpu(
            c,
            &model.tensors,
            trt_diff::onnx::DataType::FLOAT,
            false,
        )
        .unwrap(),
    ];
    for (i, graph) in graphs.into_iter().enumerate() {
        let onnx = d.path().join(format!("stories_{i}.onnx"));
        trt_diff::onnx::save(graph, &onnx, &Default::default()).unwrap();
        let mut engine = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
        generations_match_llama2c(&mut engine, &tok, c.max_seq_len);
    }
}

fn generations_match_llama2c(engine: &mut OrtEngine, tok: &Llama2cTokenizer, max_seq_len: usize) {
    let greedy = |engine: &mut OrtEngine| {
        let mut generator = Generator {
            engine,
            max_seq_len,
        };
        let mut text = String::new();
        let params = SamplingParams {
            max_tokens: 40,
            ..Default::default()
        };
        let stats = generator
            .generate(tok, "Once upon a time", &params, |t| {
                text.push_str(t);
                Ok(())
            })
            .unwrap();
        assert!(text.starts_with(REFERENCE), "got {text:?}");
        assert_eq!(
            stats.prompt_tokens,
            1 + tok.encode("Once upon a time").len()
        );
    };
    greedy(engine);
    // Sampling with a seed is reproducible and differs from greedy.
    let mut sample = |seed| {
        let mut g = Generator {
            engine: &mut *engine,
            max_seq_len: 512,
        };
        let mut t = String::new();
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed,
            max_tokens: 30,
            ..Default::default()
        };
        g.generate(tok, "Once upon a time", &p, |s| {
            t.push_str(s);
            Ok(())
        })
        .unwrap();
        t
    };
    assert_eq!(sample(7), sample(7));
    assert_ne!(sample(7), sample(8));
    greedy(engine);
    // Greedy stories end with the end-of-text token well before 400 tokens, unless it is ignored.
    let mut until_end = |ignore_eos| {
        let mut g = Generator {
            engine: &mut *engine,
            max_seq_len,
        };
        let p = SamplingParams {
            max_tokens: 400,
            ignore_eos,
            ..Default::default()
        };
        g.generate(tok, "Once upon a time", &p, |_| Ok(())).unwrap()
    };
    let ended = until_end(false);
    assert!(ended.stopped_by_eos && ended.generated_tokens < 400);
    let ignored = until_end(true);
    assert!(!ignored.stopped_by_eos && ignored.generated_tokens == 400);
    assert_eq!(ignored.decode_calls, 399);
}

#[test]
fn tokenizer_round_trips_and_streams_utf8() {
    let tok = Llama2cTokenizer::load(&data("llm/tok512.bin"), 512).unwrap();
    let text = "Lily saw a big dog. Ünïcödé ✓";
    let ids = tok.encode(text);
    let mut prev = Some(trt_diff::tokenizer::llama2c::BOS);
    let mut stream = Utf8Stream::default();
    let mut out = String::new();
    for id in ids {
        out.push_str(&stream.push(&tok.piece_bytes(prev, id)));
        prev = Some(id);
    }
    assert_eq!(out, text, "byte fallback and the dummy prefix round trip");
    // A split multi-byte character is held back until complete.
    let mut s = Utf8Stream::default();
    assert_eq!(s.push(&[0xE2, 0x9C]), "");
    assert_eq!(s.push(&[0x93]), "✓");
}

#[test]
fn cli_build_and_generate_in_every_precision() {
    let d = tempfile::tempdir().unwrap();
    for precision in ["fp32", "fp8", "nvfp4"] {
        let plan = d.path().join(format!("stories_{precision}.plan"));
        let r = run(
            &[
                "build",
                s(&data("llm/stories260K.bin")),
                "--arch",
                "llama2c",
                "--tokenizer",
                s(&data("llm/tok512.bin")),
                "--precision",
                precision,
                "--out",
                s(&plan),
                "--no-progress",
            ],
            true,
        );
        assert!(r.stdout.contains("built"), "{}", r.stdout);
        let m =
            trt_diff::manifest::Manifest::read(&trt_diff::manifest::sidecar_path(&plan)).unwrap();
        assert!(matches!(
            m.pipeline,
            Some(trt_diff::manifest::Pipeline::Llm(_))
        ));
        let onnx =
            trt_diff::onnx::OnnxFile::load(&d.path().join(format!("stories_{precision}.onnx")))
                .unwrap();
        let summary = trt_diff::onnx::summary::OnnxSummary::of(&onnx);
        match precision {
            "fp8" => assert!(summary.op_histogram.contains_key("QuantizeLinear")),
            "nvfp4" => assert!(
                summary
                    .op_histogram
                    .contains_key("trt::TRT_FP4DynamicQuantize")
            ),
            _ => assert!(summary.qdq.is_empty()),
        }
        let r = run(
            &[
                "generate",
                "--engine",
                s(&plan),
                "--prompt",
                "Once upon a time",
                "--max-tokens",
                "20",
            ],
            true,
        );
        if precision == "fp32" {
            assert!(
                r.stdout
                    .starts_with(", there was a little girl named Lily."),
                "{}",
                r.stdout
            );
        } else {
            assert!(
                r.stdout.split_whitespace().count() >= 5,
                "{precision}: {}",
                r.stdout
            );
        }
        assert!(r.stderr.contains("tok/s"), "{}", r.stderr);
    }
    let plan = d.path().join("stories_fp32.plan");
    let r = run(
        &[
            "generate",
            "--engine",
            s(&plan),
            "--prompt",
            "Once",
            "--max-tokens",
            "600",
        ],
        false,
    );
    assert!(
        r.stderr.contains("exceeds the model's context of 512"),
        "{}",
        r.stderr
    );
    let other = d.path().join("mlp.onnx");
    write_model(
        d.path(),
        "mlp.onnx",
        &trt_diff::models::mlp::MlpConfig::default(),
    );
    let mlp_plan = d.path().join("mlp.plan");
    run(
        &["build", s(&other), "--out", s(&mlp_plan), "--no-progress"],
        true,
    );
    let r = run(
        &["generate", "--engine", s(&mlp_plan), "--prompt", "x"],
        false,
    );
    assert!(r.stderr.contains("not an LLM engine"), "{}", r.stderr);
    let r = run(
        &[
            "build",
            s(&data("llm/stories260K.bin")),
            "--arch",
            "llama2c",
            "--out",
            s(&plan),
        ],
        false,
    );
    assert!(r.stderr.contains("needs --tokenizer"), "{}", r.stderr);
    let bad = d.path().join("bad.bin");
    std::fs::write(&bad, vec![0u8; 100]).unwrap();
    let r = run(
        &[
            "build",
            s(&bad),
            "--arch",
            "llama2c",
            "--tokenizer",
            s(&data("llm/tok512.bin")),
            "--out",
            s(&d.path().join("b.plan")),
        ],
        false,
    );
    assert!(
        r.stderr.contains("bad.bin") && r.stderr.contains("llama2.c header"),
        "{}",
        r.stderr
    );
}

#[test]
fn logits_match_transformers() {
    // Golden file from scripts/golden/llm_logits.py (transformers' LlamaForCausalLM on the same weights).
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/llm/stories260K_logits.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let ids: Vec<i64> = golden["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let tok = Llama2cTokenizer::load(&data("llm/tok512.bin"), 512).unwrap();
    let mut ours: Vec<i64> = vec![1];
    ours.extend(tok.encode("Once upon a time").iter().map(|&t| t as i64));
    assert_eq!(ours, ids, "tokenizer ids");
    let model = Llama2c::load(&data("llm/stories260K.bin")).unwrap();
    let d = tempfile::tempdir().unwrap();
    let onnx = d.path().join("s.onnx");
    trt_diff::onnx::save(
        decoder_graph(
            &model.config,
            &model.tensors,
            &Policy::uniform(LinearPrecision::F32),
        )
        .unwrap(),
        &onnx,
        &Default::default(),
    )
    .unwrap();
    let mut engine = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
    use trt_diff::backend::{Engine, HostTensor};
    let t = |v: &[i64]| HostTensor {
        dtype: trt_diff::onnx::DataType::INT64,
        shape: vec![1, v.len()],
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let pos: Vec<i64> = (0..ids.len() as i64).collect();
    let mut inputs = vec![
        ("input_ids".to_string(), t(&ids)),
        ("position_ids".to_string(), t(&pos)),
    ];
    for i in 0..5 {
        for kind in ["key", "value"] {
            inputs.push((
                format!("past_{kind}_{i}"),
                HostTensor {
                    dtype: trt_diff::onnx::DataType::FLOAT,
                    shape: vec![1, 4, 0, 8],
                    data: vec![],
                },
            ));
        }
    }
    let out = engine.run(&inputs).unwrap();
    let logits = out
        .iter()
        .find(|(n, _)| n == "logits")
        .unwrap()
        .1
        .to_f64()
        .unwrap();
    let want: Vec<f64> = golden["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()))
        .collect();
    assert_eq!(logits.len(), want.len());
    let max = logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(max <= 1e-4, "max abs logit difference {max}");
}
