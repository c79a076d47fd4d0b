//! OpenAI compatibility of a real `trt-diff serve` (stories260K) checked with the official `openai` Python client
//! (`tests/py/openai_e2e.py`, from the set-up venv), plus what is easier to see on raw HTTP: the API key
//! (401, /health public), CORS (off unless the origin is allowed), llama-server routes and metric names, a
//! too-long streamed prompt answered 400 before any byte of a stream.
mod common;
use common::http::{http, start_with};
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A request with extra headers; returns (status, head, body) with the body as sent (chunked framing kept).
fn raw(addr: &str, method: &str, path: &str, headers: &str, body: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), body.to_string())
}

#[test]
fn openai_client_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let plan = build_stories(d.path());
    let key = "sk-test-123";
    let server = start_with(&plan, &["--api-key", key, "--cors", "http://app.example"]);
    let a = server.addr.as_str();
    let auth = format!("Authorization: Bearer {key}\r\n");

    // The key: /health stays public; everything else wants it, with an OpenAI-style 401.
    assert_eq!(http(a, "GET", "/health", "").0, 200);
    let (code, head, body) = raw(a, "GET", "/v1/models", "", "");
    assert_eq!(code, 401, "{body}");
    assert!(head.contains("www-authenticate: bearer"), "{head}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--api-key")
    );
    assert_eq!(
        raw(a, "GET", "/metrics", "Authorization: Bearer nope\r\n", "").0,
        401
    );
    assert_eq!(raw(a, "GET", "/v1/models", &auth, "").0, 200);

    // CORS: the allowed origin gets the headers (preflight too), another origin none.
    let (code, head, _) = raw(
        a,
        "OPTIONS",
        "/v1/chat/completions",
        "Origin: http://app.example\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\n",
        "",
    );
    assert_eq!(code, 204);
    assert!(
        head.contains("access-control-allow-origin: http://app.example"),
        "{head}"
    );
    assert!(head.contains("access-control-allow-headers: authorization, content-type"));
    let (_, head, _) = raw(a, "GET", "/health", "Origin: http://evil.example\r\n", "");
    assert!(!head.contains("access-control"), "{head}");
    let (_, head, _) = raw(
        a,
        "GET",
        "/v1/models",
        &format!("{auth}Origin: http://app.example\r\n"),
        "",
    );
    assert!(head.contains("access-control-allow-origin: http://app.example"));

    // A prompt longer than the context with stream: true is a 400 JSON answer, not a 200 event stream.
    let long = format!(
        r#"{{"prompt": "{}", "max_tokens": 10, "stream": true}}"#,
        "story ".repeat(600)
    );
    let (code, head, body) = raw(a, "POST", "/v1/completions", &auth, &long);
    assert_eq!(code, 400, "{body}");
    assert!(head.contains("application/json"), "{head}");
    assert!(body.contains("context"), "{body}");

    // llama-server routes.
    let (code, _, body) = raw(
        a,
        "POST",
        "/tokenize",
        &auth,
        r#"{"content": "Once upon a time", "with_pieces": true}"#,
    );
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pieces: String = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["piece"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(pieces.trim(), "Once upon a time");
    let (code, _, body) = raw(a, "POST", "/detokenize", &auth, r#"{"tokens": [99999]}"#);
    assert_eq!(code, 400, "{body}");
    let (code, _, body) = raw(a, "GET", "/props", &auth, "");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["default_generation_settings"]["n_ctx"], 512);
    assert_eq!(v["total_slots"], 1);

    // The openai client.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/openai_e2e.py");
    let out = std::process::Command::new(python())
        .args([script, &format!("http://{a}"), key])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'openai'"),
        "the openai client is missing from the venv: run scripts/setup.sh"
    );
    assert!(
        out.status.success() && stdout.contains("all ok"),
        "{stdout}\n{stderr}"
    );

    // Metrics with llama.cpp's names, after all that traffic.
    let (_, _, body) = raw(a, "GET", "/metrics", &auth, "");
    for name in [
        "llamacpp:prompt_tokens_total",
        "llamacpp:tokens_predicted_total",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        "llamacpp:kv_cache_usage_ratio",
        "llamacpp:n_decode_total",
        "trt_diff_connections_open",
    ] {
        assert!(
            body.contains(&format!("\n{name} ")),
            "{name} missing:\n{body}"
        );
    }
    let predicted: f64 = body
        .lines()
        .find_map(|l| l.strip_prefix("llamacpp:tokens_predicted_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(predicted > 100.0, "{body}");
}

#[test]
fn cors_is_off_by_default() {
    let d = tempfile::tempdir().unwrap();
    let plan = build_stories(d.path());
    let server = start_with(&plan, &[]);
    let (_, head, _) = raw(
        &server.addr,
        "GET",
        "/v1/models",
        "Origin: http://app.example\r\n",
        "",
    );
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("access-control"), "{head}");
}
