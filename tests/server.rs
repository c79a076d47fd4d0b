//! The haiku test and friends: a real `trt-diff serve` on 127.0.0.1 with the stories260K engine, spoken to over
//! raw HTTP/1.1.
use crate::common;
use common::http::{http, start};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

fn metric(addr: &str, name: &str) -> u64 {
    let (_, body) = http(addr, "GET", "/metrics", "");
    body.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn haiku_and_friends() {
    let d = tempfile::tempdir().unwrap();
    let server = start(&build_stories(d.path()));
    let a = server.addr.as_str();
    // The haiku test, JSON body.
    let (code, body) = http(
        a,
        "POST",
        "/v1/generate",
        r#"{"prompt": "Write a haiku about", "max_tokens": 20, "temperature": 0.7}"#,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["text"].as_str().unwrap().split_whitespace().count() >= 3,
        "{body}"
    );
    assert_eq!(v["usage"]["completion_tokens"], 20);
    // Streamed: one data event per piece, a final event with usage and timings.
    let (code, body) = http(
        a,
        "POST",
        "/v1/generate",
        r#"{"prompt": "Write a haiku about", "max_tokens": 20, "temperature": 0.7, "stream": true}"#,
    );
    assert_eq!(code, 200);
    let events: Vec<serde_json::Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(events.len() >= 3, "{body}");
    let last = events.last().unwrap();
    assert_eq!(last["done"], true);
    assert!(
        last["timings"]["generation_tokens_per_second"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let streamed: String = events.iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(!streamed.trim().is_empty());
    // Greedy through the server equals the reference.
    let (_, body) = http(
        a,
        "POST",
        "/v1/completions",
        r#"{"model": "stories", "prompt": "Once upon a time", "max_tokens": 12}"#,
    );
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(", there was a little girl named Lily"),
        "{body}"
    );
    assert_eq!(v["object"], "text_completion");
    let (_, body) = http(
        a,
        "POST",
        "/v1/completions",
        r#"{"prompt": "Once", "max_tokens": 3, "stream": true}"#,
    );
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    // Errors: JSON bodies with 4xx codes.
    for (body, needle) in [
        (r#"{"prompt": 1}"#, "invalid type"),
        (r#"{"prompt": "a", "max_tokns": 5}"#, "unknown field"),
        (r#"{"prompt": "a""#, "JSON"),
        (r#"{"max_tokens": 5}"#, "missing field `prompt`"),
        (r#"{"prompt": "a", "max_tokens": 0}"#, "max_tokens"),
        (r#"{"prompt": "a", "max_tokens": 100000}"#, "max_tokens"),
        (r#"{"prompt": "a", "temperature": -1}"#, "temperature"),
    ] {
        let (code, resp) = http(a, "POST", "/v1/generate", body);
        assert_eq!(code, 400, "{body}: {resp}");
        let v: serde_json::Value =
            serde_json::from_str(&resp).unwrap_or_else(|_| panic!("not JSON: {resp}"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {resp}"
        );
    }
    let long_prompt = format!(
        r#"{{"prompt": "{}", "max_tokens": 10}}"#,
        "story ".repeat(2000)
    );
    let (code, _) = http(a, "POST", "/v1/generate", &long_prompt);
    assert_eq!(code, 400, "prompt longer than the context");
    let huge = format!(r#"{{"prompt": "{}"}}"#, "x".repeat(100_000));
    assert_eq!(http(a, "POST", "/v1/generate", &huge).0, 413);
    assert_eq!(http(a, "GET", "/nope", "").0, 404);
    assert_eq!(http(a, "GET", "/health", "").0, 200);
    assert!(metric(a, "trt_diff_request_errors_total") >= 9);
    // A streaming client that leaves stops its generation early.
    let before = metric(a, "trt_diff_generated_tokens_total");
    {
        let mut s = TcpStream::connect(a).unwrap();
        let body = r#"{"prompt": "Once upon a time", "max_tokens": 500, "stream": true}"#;
        write!(s, "POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    let generated = metric(a, "trt_diff_generated_tokens_total") - before;
    assert!(
        generated < 450,
        "generation went on after the client left ({generated} tokens)"
    );
    assert_eq!(metric(a, "trt_diff_requests_in_flight"), 0);
}

#[test]
fn graceful_shutdown_on_sigterm() {
    let d = tempfile::tempdir().unwrap();
    let mut server = start(&build_stories(d.path()));
    assert_eq!(http(&server.addr, "GET", "/health", "").0, 200);
    let pid = server.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn serve_rejects_non_llm_engines() {
    let d = tempfile::tempdir().unwrap();
    let onnx = write_model(
        d.path(),
        "m.onnx",
        &trt_diff::models::mlp::MlpConfig::default(),
    );
    let plan = d.path().join("m.plan");
    run(
        &["build", s(&onnx), "--out", s(&plan), "--no-progress"],
        true,
    );
    let r = run(&["serve", "--engine", s(&plan), "--port", "0"], false);
    assert!(r.stderr.contains("not an LLM engine"), "{}", r.stderr);
}
