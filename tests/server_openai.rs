//! OpenAI compatibility of a real `trt-diff serve` (stories260K) checked with the official `openai` Python client
//! (`tests/py/openai_e2e.py`, from the set-up venv), plus what is easier to see on raw HTTP: the API key
//! (401, /health public), CORS (off unless the origin is allowed), llama-server routes and metric names, a
//! too-long streamed prompt answered 400 before any byte of a stream. An image bundle served the same way: the
//! client's `images.generate` and AUTOMATIC1111's txt2img/img2img give the pixels `trt-diff generate` writes.
use crate::common;
use common::http::{http, start, start_with};
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

/// Pixels of a PNG file's bytes.
fn pixels(png_bytes: &[u8]) -> Vec<u8> {
    let mut r = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn images_through_openai_client_and_a1111_api() {
    let d = tempfile::tempdir().unwrap();
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/flux");
    let model = d.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for (c, dir) in [
        ("transformer", "pipeline/transformer"),
        ("vae", "pipeline/vae"),
        ("text_encoder", "text_encoder"),
        ("text_encoder_2", "text_encoder_2"),
    ] {
        std::os::unix::fs::symlink(format!("{golden}/{dir}"), model.join(c)).unwrap();
    }
    let out = d.path().join("flux.plan");
    run(
        &[
            "build",
            s(&model),
            "--arch",
            "flux-dev",
            "--precision",
            "fp32",
            "--onnx-only",
            "--image-px",
            "32,64,128",
            "--clip-tokenizer",
            s(&shared_data("tokenizers/bpe_simple_vocab_16e6.txt.gz")),
            "--t5-tokenizer",
            s(&shared_data("tokenizers/t5_tokenizer.json")),
            "--out",
            s(&out),
            "--no-progress",
        ],
        true,
    );
    let bundle = d.path().join("flux.plan.json");
    let prompt = "a watercolor painting of a fox in the snow";
    let cli_png = d.path().join("cli.png");
    run(
        &[
            "generate",
            "--engine",
            s(&bundle),
            "--prompt",
            prompt,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "4",
            "--seed",
            "1",
            "--no-progress",
            "--out",
            s(&cli_png),
        ],
        true,
    );
    let want = pixels(&std::fs::read(&cli_png).unwrap());
    let server = start(&bundle);
    let a = server.addr.as_str();

    // The official client: the same pixels as `generate`, and `url` refused.
    let got_png = d.path().join("openai.png");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/openai_images.py");
    let o = std::process::Command::new(python())
        .args([script, &format!("http://{a}"), s(&got_png)])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        o.status.success() && stdout.contains("all ok"),
        "{stdout}\n{stderr}"
    );
    assert!(
        pixels(&std::fs::read(&got_png).unwrap()) == want,
        "openai route pixels differ"
    );

    // A1111: txt2img, two iterations (seeds 1 and 2), the first equal to `generate`'s image.
    let body = format!(
        r#"{{"prompt": "{prompt}", "steps": 4, "width": 64, "height": 64, "seed": 1, "n_iter": 2, "sampler_name": "Euler", "enable_hr": false}}"#
    );
    let (code, body) = http(a, "POST", "/sdapi/v1/txt2img", &body);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let images = v["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let first = pixels(&b64(images[0].as_str().unwrap()));
    assert!(first == want, "txt2img pixels differ from generate's");
    assert!(pixels(&b64(images[1].as_str().unwrap())) != want);
    let info: serde_json::Value = serde_json::from_str(v["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], serde_json::json!([1, 2]));

    // img2img from the first image at strength 0.5: an image of the same size, not the same pixels.
    let init = images[0].as_str().unwrap();
    let body = format!(
        r#"{{"prompt": "a red cube", "steps": 4, "width": 64, "height": 64, "seed": 3, "denoising_strength": 0.5, "init_images": ["data:image/png;base64,{init}"]}}"#
    );
    let (code, body) = http(a, "POST", "/sdapi/v1/img2img", &body);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let edited = pixels(&b64(v["images"][0].as_str().unwrap()));
    assert_eq!(edited.len(), want.len());
    assert!(edited != want);

    // Listings and clear refusals.
    let (code, body) = http(a, "GET", "/sdapi/v1/samplers", "");
    assert_eq!(code, 200);
    let samplers: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(samplers.as_array().unwrap().iter().any(|s| {
        s["name"] == "euler"
            && s["aliases"]
                .as_array()
                .unwrap()
                .contains(&serde_json::json!("Euler"))
    }));
    assert_eq!(http(a, "GET", "/sdapi/v1/schedulers", "").0, 200);
    assert_eq!(http(a, "GET", "/sdapi/v1/progress", "").0, 200);
    for (path, body, says) in [
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "width": 65}"#,
            "multiple of 16",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "sampler_name": "Nope"}"#,
            "unknown sampler",
        ),
        (
            "/sdapi/v1/txt2img",
            r#"{"prompt": "x", "batch_size": 9}"#,
            "between 1 and 8",
        ),
        ("/sdapi/v1/img2img", r#"{"prompt": "x"}"#, "init_images"),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "colour": 1}"#,
            "unknown field `colour`",
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "x", "size": "big"}"#,
            "WIDTHxHEIGHT",
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": []}"#,
            "image bundle",
        ),
    ] {
        let (code, got) = http(a, "POST", path, body);
        assert!(
            (code == 400 || code == 404) && got.contains(says),
            "{path} {body}: {code} {got}"
        );
    }
}
