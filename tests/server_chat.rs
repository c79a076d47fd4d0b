//! `POST /v1/chat/completions` on a real server: the chat template comes from the GGUF metadata (a stories260K
//! GGUF given a template that passes the user's text through, so greedy output is llama2.c's reference), streaming
//! and non-streaming, and JSON 4xx errors.
use crate::common;
use common::http::{http, sse_events, start};
use common::*;
use std::path::PathBuf;
use trt_diff::weights::gguf::{GgufFile, Value};
use trt_diff::weights::gguf_write::{GgufWriter, TensorData};

fn data(rel: &str) -> PathBuf {
    let base = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    base.join(rel)
}

/// stories260K as GGUF with `tokenizer.chat_template` set.
fn stories_with_template(dir: &std::path::Path, template: &str) -> PathBuf {
    let plain = dir.join("plain.gguf");
    run(
        &[
            "convert",
            "llama2c",
            s(&data("llm/stories260K.bin")),
            "--tokenizer",
            s(&data("llm/tok512.bin")),
            "--out",
            s(&plain),
        ],
        true,
    );
    let g = GgufFile::open(&plain).unwrap();
    let mut w = GgufWriter {
        metadata: g.metadata.clone(),
        ..Default::default()
    };
    w.set("tokenizer.chat_template", Value::String(template.into()));
    for t in &g.tensors {
        w.tensors.push(TensorData {
            name: t.name.clone(),
            shape: t.shape(),
            ty: t.ty,
            bytes: g.tensor_bytes(t).to_vec(),
        });
    }
    let out = dir.join("chat.gguf");
    w.write(&out).unwrap();
    out
}

#[test]
fn chat_completions_use_the_gguf_template() {
    let d = tempfile::tempdir().unwrap();
    let gguf = stories_with_template(
        d.path(),
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] | trim }}{% endif %}{% endfor %}",
    );
    let plan = d.path().join("chat.plan");
    run(
        &["build", s(&gguf), "--out", s(&plan), "--no-progress"],
        true,
    );
    let server = start(&plan);
    let a = server.addr.as_str();
    let body = r#"{"model": "stories", "messages": [{"role": "system", "content": "ignored"}, {"role": "user", "content": " Once upon a time "}], "max_tokens": 30}"#;
    let (code, resp) = http(a, "POST", "/v1/chat/completions", body);
    assert_eq!(code, 200, "{resp}");
    let v: serde_json::Value = serde_json::from_str(&resp).unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with(
            ", there was a little girl named Lily. She loved to play outside in the park."
        ),
        "{text:?}"
    );
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    // Streaming: role in the first chunk, content deltas that join to the same text, a final chunk, [DONE].
    let stream_body = body.replace(r#""max_tokens": 30"#, r#""max_tokens": 30, "stream": true"#);
    let (code, resp) = http(a, "POST", "/v1/chat/completions", &stream_body);
    assert_eq!(code, 200);
    assert!(resp.trim_end().ends_with("data: [DONE]"), "{resp}");
    let events = sse_events(&resp);
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text);
    let last = events.last().unwrap();
    assert_eq!(last["object"], "chat.completion.chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    // Errors are JSON with 4xx codes.
    for (bad, needle) in [
        (r#"{"messages": []}"#, "at least one message"),
        (r#"{"max_tokens": 5}"#, "messages"),
        (r#"{"messages": "hi"}"#, "messages"),
        (r#"{"messages": [{"role": "user"}]}"#, "content"),
        (
            r#"{"messages": [{"role": "user", "content": "a"}], "max_tokns": 2}"#,
            "unknown field",
        ),
        (
            r#"{"prompt": "a", "messages": [{"role": "user", "content": "a"}]}"#,
            "not `prompt`",
        ),
        (
            r#"{"messages": [{"role": "user", "content": "a"}], "temperature": -1}"#,
            "temperature",
        ),
        (r#"{"messages": "#, "JSON"),
    ] {
        let (code, resp) = http(a, "POST", "/v1/chat/completions", bad);
        assert_eq!(code, 400, "{bad}: {resp}");
        let v: serde_json::Value = serde_json::from_str(&resp).unwrap_or_else(|_| panic!("{resp}"));
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(needle), "{bad}: {m}");
    }
}

#[test]
fn chat_template_errors_are_4xx() {
    let d = tempfile::tempdir().unwrap();
    let gguf = stories_with_template(
        d.path(),
        "{% if messages|length > 1 %}{{ raise_exception('only one message, please') }}{% endif %}{{ messages[0]['content'] }}",
    );
    let plan = d.path().join("chat.plan");
    run(
        &["build", s(&gguf), "--out", s(&plan), "--no-progress"],
        true,
    );
    let server = start(&plan);
    let body = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "max_tokens": 3}"#;
    let (code, resp) = http(&server.addr, "POST", "/v1/chat/completions", body);
    assert_eq!(code, 400, "{resp}");
    assert!(resp.contains("only one message, please"), "{resp}");
    let ok = r#"{"messages": [{"role": "user", "content": "Once"}], "max_tokens": 3}"#;
    let (code, resp) = http(&server.addr, "POST", "/v1/chat/completions", ok);
    assert_eq!(code, 200, "{resp}");
}
