//! Chat templates render as transformers' apply_chat_template renders them (golden from
//! scripts/golden/llm_chat_templates.py, jinja2 set up as transformers sets it up).
use trt_diff::pipelines::chat::{ChatMessage, render};

#[test]
fn templates_match_jinja2() {
    let g: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/llm/chat_templates.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 24);
    let data = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data"))
        });
    let qwen2 =
        trt_diff::tokenizer::llm_vocab::Vocab::open(&data.join("tokenizers/ggml-vocab-qwen2.gguf"))
            .unwrap();
    for c in cases {
        if c["name"].as_str().unwrap().starts_with("gguf:") {
            // The real template, as our GGUF reader finds it in llama.cpp's qwen2 vocab file.
            assert_eq!(qwen2.chat_template.as_deref(), c["template"].as_str());
        }
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let got = render(
            c["template"].as_str().unwrap(),
            &messages,
            "<s>",
            "</s>",
            c["add_generation_prompt"].as_bool().unwrap(),
        )
        .unwrap();
        assert_eq!(got, c["expected"].as_str().unwrap(), "{}", c["name"]);
    }
    let e = &g["error"];
    let messages: Vec<ChatMessage> = serde_json::from_value(e["messages"].clone()).unwrap();
    let err = render(
        e["template"].as_str().unwrap(),
        &messages,
        "<s>",
        "</s>",
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(e["message"].as_str().unwrap()), "{err}");
    let err = render("{% for %}", &messages, "", "", true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not parse"), "{err}");
}
