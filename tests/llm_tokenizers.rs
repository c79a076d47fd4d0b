//! llama.cpp's tokenizer test vectors (test-tokenizer-0: `.inp` strings, `.out` expected ids without BOS,
//! add_special = parse_special = false) on the real vocab-only GGUF files of Llama (SPM), GPT-2 and Qwen2 (BPE).
mod common;
use common::*;
use std::path::PathBuf;
use trt_diff::tokenizer::llm_vocab::Vocab;

fn data(rel: &str) -> PathBuf {
    let base = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    base.join(rel)
}

/// The vectors as llama.cpp's `read_tests` splits them.
fn vectors(name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(data(&format!("tokenizers/{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(data(&format!("tokenizers/{name}.out"))).unwrap();
    let sep = "\n__ggml_vocab_test__\n";
    let mut texts = Vec::new();
    let mut pos = 0;
    while pos < inp.len() {
        match inp[pos..].find(sep) {
            Some(i) => {
                texts.push(inp[pos..pos + i].to_string());
                pos += i + sep.len();
            }
            None => {
                texts.push(inp[pos..].to_string());
                break;
            }
        }
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(texts.len(), ids.len(), "{name}: inputs vs outputs");
    texts.into_iter().zip(ids).collect()
}

fn check(name: &str) -> usize {
    let vocab = Vocab::open(&data(&format!("tokenizers/{name}"))).unwrap();
    let mut failures = Vec::new();
    let cases = vectors(name);
    for (text, want) in &cases {
        let got = vocab.tokenize(text, false, false);
        if &got != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name}: {} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

#[test]
fn llama_spm_vectors() {
    assert_eq!(check("ggml-vocab-llama-spm.gguf"), 46);
}

#[test]
fn gpt2_bpe_vectors() {
    assert_eq!(check("ggml-vocab-gpt-2.gguf"), 46);
}

#[test]
fn qwen2_bpe_vectors() {
    assert_eq!(check("ggml-vocab-qwen2.gguf"), 46);
}

#[test]
fn round_trip_special_tokens_and_streaming() {
    use trt_diff::pipelines::llm::Utf8Stream;
    let text = "Hello, y'all! 😁 我想在apple工作 — Führer\n\tend";
    for name in [
        "ggml-vocab-llama-spm.gguf",
        "ggml-vocab-gpt-2.gguf",
        "ggml-vocab-qwen2.gguf",
    ] {
        let v = Vocab::open(&data(&format!("tokenizers/{name}"))).unwrap();
        let ids = v.tokenize(text, false, false);
        assert_eq!(
            String::from_utf8(v.detokenize(&ids, false)).unwrap(),
            text,
            "{name}"
        );
        // Piece by piece through the streaming detokenizer: never broken UTF-8, same text at the end.
        let mut s = Utf8Stream::default();
        let mut out = String::new();
        for (i, &id) in ids.iter().enumerate() {
            let mut p = v.token_to_piece(id, false);
            if i == 0 && v.add_space_prefix && p.first() == Some(&b' ') {
                p.remove(0);
            }
            let chunk = s.push(&p);
            assert!(
                !chunk.contains('\u{FFFD}'),
                "{name}: broken UTF-8 in {chunk:?}"
            );
            out.push_str(&chunk);
        }
        assert_eq!(out, text, "{name}");
    }
    // Control tokens are text unless parse_special; then they are one token.
    let q = Vocab::open(&data("tokenizers/ggml-vocab-qwen2.gguf")).unwrap();
    let im_start = q.text_to_token("<|im_start|>").unwrap();
    assert_eq!(q.tokenize("<|im_start|>user", false, true)[0], im_start);
    assert!(
        !q.tokenize("<|im_start|>user", false, false)
            .contains(&im_start)
    );
    assert!(q.is_eog(q.text_to_token("<|im_end|>").unwrap()));
    assert!(q.chat_template.is_none() || q.chat_template.as_ref().unwrap().contains("im_start"));
    // SPM adds BOS with add_special.
    let l = Vocab::open(&data("tokenizers/ggml-vocab-llama-spm.gguf")).unwrap();
    assert_eq!(l.tokenize("Hello", true, false)[0], 1);
}

#[test]
fn cli_tokenize_and_decode() {
    let vocab = data("tokenizers/ggml-vocab-qwen2.gguf");
    let r = run(&["tokenize", "--vocab", s(&vocab), "Hello world"], true);
    assert_eq!(r.stdout.trim(), "9707 1879");
    let r = run(
        &["tokenize", "--vocab", s(&vocab), "--decode", "9707 1879"],
        true,
    );
    assert_eq!(r.stdout.trim_end_matches('\n'), "Hello world");
    let r = run(
        &[
            "tokenize",
            "--vocab",
            s(&vocab),
            "--decode",
            "9707 99999999",
        ],
        false,
    );
    assert!(r.stderr.contains("99999999"), "{}", r.stderr);
    let r = run(&["tokenize", "--vocab", "/nonexistent.gguf", "x"], false);
    assert!(r.stderr.contains("/nonexistent.gguf"), "{}", r.stderr);
}

#[test]
fn bert_wpm_matches_hf_tokenizers() {
    // Golden from scripts/golden/llm_wpm.py: HF tokenizers' WordPiece + BertNormalizer + BertPreTokenizer, and the
    // same vocabulary as llama.cpp's converter writes it.
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/llm/wpm"));
    let v = Vocab::open(&dir.join("wpm.gguf")).unwrap();
    assert_eq!(v.kind, trt_diff::tokenizer::llm_vocab::VocabKind::Wpm);
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 10);
    for c in &cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(v.tokenize(text, false, false), want, "{text:?}");
    }
    // add_special wraps in [CLS] ... [SEP].
    let ids = v.tokenize("hello", true, false);
    assert_eq!((ids[0], *ids.last().unwrap()), (2, 3));
}

#[test]
fn special_tokens_and_bos_match_llama_cpp() {
    // Golden from scripts/golden/llm_llamacpp_special.py: llama.cpp's own tokenizer (llama-cpp-python, vocab-only)
    // with add_special and parse_special on and off, on chat-style prompts.
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/llm/llamacpp_special.json"
        ))
        .unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 36);
    let mut vocabs = std::collections::HashMap::new();
    for c in &cases {
        let name = c["vocab"].as_str().unwrap();
        let v = vocabs
            .entry(name.to_string())
            .or_insert_with(|| Vocab::open(&data(&format!("tokenizers/{name}"))).unwrap());
        let text = c["text"].as_str().unwrap();
        let (add, parse) = (
            c["add_special"].as_bool().unwrap(),
            c["parse_special"].as_bool().unwrap(),
        );
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            v.tokenize(text, add, parse),
            want,
            "{name} {text:?} add_special={add} parse_special={parse}"
        );
    }
}
