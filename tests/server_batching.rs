//! Continuous batching (`serve --parallel N`) on real servers: `tests/py/batching.py` with the official `openai`
//! client compares every request's output alone (`--parallel 1`) and batched (`--parallel 4`, more requests than
//! slots), greedy and seeded, streamed and not, with stop strings and lengths that differ, and checks prefix reuse on
//! a chat history (same reply, fewer prompt tokens run); here, a client that leaves frees its slot for the next
//! request. Models: stories260K (llama2.c) and a tiny random Qwen2 GGUF given a small character vocabulary.
use crate::common;
use common::http::{http, start_with};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;
use trt_diff::weights::gguf::{GgufFile, Value};
use trt_diff::weights::gguf_write::{GgufWriter, TensorData};

fn metric(addr: &str, name: &str) -> f64 {
    let (_, body) = http(addr, "GET", "/metrics", "");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
}

fn batching_script(alone: &str, batched: &str, kind: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/batching.py");
    let out = std::process::Command::new(python())
        .args([
            script,
            &format!("http://{alone}"),
            &format!("http://{batched}"),
            kind,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "{stdout}\n{stderr}"
    );
}

/// The tiny Qwen2 GGUF (random weights, 128 tokens, 64 positions) with a SentencePiece-style vocabulary of single
/// characters, so that it serves text.
fn qwen_with_vocab(dir: &Path) -> PathBuf {
    let src = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/llm/tiny_qwen2/tiny_qwen2.gguf"
    );
    let g = GgufFile::open(Path::new(src)).unwrap();
    let mut w = GgufWriter {
        metadata: g.metadata.clone(),
        ..Default::default()
    };
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "\u{2581}"]
        .map(String::from)
        .to_vec();
    let chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()";
    tokens.extend(chars.chars().map(String::from));
    let mut n = 0;
    while tokens.len() < 128 {
        tokens.push(format!("<extra_{n}>"));
        n += 1;
    }
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| {
            Value::I32(match i {
                0 => 2,
                1 | 2 => 3,
                i if i >= 4 + chars.len() => 4,
                _ => 1,
            })
        })
        .collect();
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(8, tokens.into_iter().map(Value::String).collect()),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(6, (0..128).map(|_| Value::F32(0.0)).collect()),
    );
    w.set("tokenizer.ggml.token_type", Value::Array(5, types));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    for t in &g.tensors {
        w.tensors.push(TensorData {
            name: t.name.clone(),
            shape: t.shape(),
            ty: t.ty,
            bytes: g.tensor_bytes(t).to_vec(),
        });
    }
    let out = dir.join("qwen.gguf");
    w.write(&out).unwrap();
    out
}

#[test]
fn stories_batched_equals_alone_and_reuses_prefixes() {
    let d = tempfile::tempdir().unwrap();
    let plan = build_stories(d.path());
    let alone = start_with(&plan, &["--parallel", "1"]);
    let batched = start_with(&plan, &["--parallel", "4"]);
    batching_script(&alone.addr, &batched.addr, "stories");

    // A streaming client that leaves frees its slot at once: with two slots, one long stream running and one
    // left, a short request is served beside the long one and gives the text it gives alone.
    let two = start_with(&plan, &["--parallel", "2"]);
    let a = two.addr.as_str();
    let short = r#"{"prompt": "Once upon a time", "max_tokens": 8}"#;
    let (code, want) = http(&alone.addr, "POST", "/v1/generate", short);
    assert_eq!(code, 200, "{want}");
    let stream = |body: &str| {
        let mut s = TcpStream::connect(a).unwrap();
        write!(
            s,
            "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).unwrap();
        s
    };
    let long =
        r#"{"prompt": "The little dog", "max_tokens": 480, "ignore_eos": true, "stream": true}"#;
    let before = metric(a, "trt_diff_generated_tokens_total");
    let kept = stream(long);
    drop(stream(long));
    let (code, got) = http(a, "POST", "/v1/generate", short);
    assert_eq!(code, 200, "{got}");
    let text = |b: &str| serde_json::from_str::<serde_json::Value>(b).unwrap()["text"].clone();
    assert_eq!(text(&got), text(&want));
    let mut rest = String::new();
    let mut kept = kept;
    kept.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buf = [0u8; 4096];
    while !rest.contains("\"done\":true") {
        let n = kept.read(&mut buf).unwrap();
        assert!(n > 0, "the long stream ended early: {rest}");
        rest.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    std::thread::sleep(Duration::from_millis(300));
    // The kept stream's 480 tokens and the short request's 8; the stream that left stopped early.
    let generated = metric(a, "trt_diff_generated_tokens_total") - before;
    assert!(
        generated < 480.0 + 8.0 + 400.0,
        "generation went on after the client left ({generated} tokens)"
    );
    assert_eq!(metric(a, "trt_diff_requests_in_flight"), 0.0);
    assert_eq!(metric(a, "llamacpp:requests_processing"), 0.0);
    assert_eq!(metric(a, "llamacpp:kv_cache_tokens"), 0.0);
}

#[test]
fn qwen2_gguf_batched_equals_alone() {
    let d = tempfile::tempdir().unwrap();
    let gguf = qwen_with_vocab(d.path());
    let plan = d.path().join("qwen.plan");
    run(
        &["build", s(&gguf), "--out", s(&plan), "--no-progress"],
        true,
    );
    let alone = start_with(&plan, &["--parallel", "1"]);
    let batched = start_with(&plan, &["--parallel", "4"]);
    batching_script(&alone.addr, &batched.addr, "qwen");
}

#[test]
fn parallel_out_of_range_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let r = run(
        &[
            "serve",
            "--engine",
            s(&d.path().join("none.plan")),
            "--parallel",
            "0",
        ],
        false,
    );
    assert!(
        r.stderr.contains("--parallel must be between 1 and 32"),
        "{}",
        r.stderr
    );
}
