//! llama.cpp's tokenizer test vectors (test-tokenizer-0: `.inp` strings, `.out` expected ids without BOS,
//! add_special = parse_special = false) on the real vocab-only GGUF files of Llama (SPM), GPT-2 and Qwen2 (BPE).
use crate::common;
use common::*;
use std::path::PathBuf;
use trt_diff::tokenizer::llm_vocab::Vocab;

/// llama.cpp's test vocabularies whose vectors all pass (see `llama_cpp_vocab_vectors_where_available`).
const LLAMA_CPP_PASSING: &[&str] = &[
    "ggml-vocab-bert-bge.gguf",
    "ggml-vocab-command-r.gguf",
    "ggml-vocab-deepseek-coder.gguf",
    "ggml-vocab-deepseek-llm.gguf",
    "ggml-vocab-falcon.gguf",
    "ggml-vocab-gpt-2.gguf",
    "ggml-vocab-llama-bpe.gguf",
    "ggml-vocab-llama-spm.gguf",
    "ggml-vocab-mpt.gguf",
    "ggml-vocab-phi-3.gguf",
    "ggml-vocab-qwen2.gguf",
    "ggml-vocab-qwen35.gguf",
    "ggml-vocab-refact.gguf",
    "ggml-vocab-starcoder.gguf",
];

fn data(rel: &str) -> PathBuf {
    let base = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    base.join(rel)
}

/// The vectors as llama.cpp's `read_tests` splits them.
fn vectors(name: &str) -> Vec<(String, Vec<u32>)> {
    vectors_in(&data("tokenizers"), name)
}

fn vectors_in(dir: &std::path::Path, name: &str) -> Vec<(String, Vec<u32>)> {
    let inp = std::fs::read_to_string(dir.join(format!("{name}.inp"))).unwrap();
    let out = std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap();
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
    check_vocab(&vocab, name, &vectors(name), None)
}

/// The vectors' failures on `vocab`, whose ids `original` maps back to the full vocabulary's (cut vocabularies).
fn failures(vocab: &Vocab, cases: &[(String, Vec<u32>)], original: Option<&[u32]>) -> Vec<String> {
    let mut failures = Vec::new();
    for (text, want) in cases {
        let mut got = vocab.tokenize(text, false, false);
        if let Some(map) = original {
            got = got.iter().map(|&i| map[i as usize]).collect();
        }
        if &got != want {
            failures.push(format!("{text:?}\n  want {want:?}\n  got  {got:?}"));
        }
    }
    failures
}

fn check_vocab(
    vocab: &Vocab,
    name: &str,
    cases: &[(String, Vec<u32>)],
    original: Option<&[u32]>,
) -> usize {
    let failures = failures(vocab, cases, original);
    assert!(
        failures.is_empty(),
        "{name}: {} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    cases.len()
}

/// A WordPiece vocabulary of llama.cpp's tests cut to the pieces its vectors use
/// (scripts/golden/llm_vocab_trim.py), and the map from its ids to the full vocabulary's.
fn cut_vocab(name: &str) -> (Vocab, Vec<u32>) {
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/llm/vocab"
    ))
    .join(format!("{name}.mini.gguf"));
    let g = trt_diff::weights::gguf::GgufFile::open(&path).unwrap();
    let map: Vec<u32> = g
        .get("trt_diff.test.original_ids")
        .and_then(|v| v.as_array())
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    (Vocab::from_gguf(&g).unwrap(), map)
}

#[test]
fn bert_bge_wpm_vectors_lowercase_and_strip_accents() {
    // An uncased BERT vocabulary without normalizer keys: llama.cpp lowercases and strips accents by default.
    let name = "ggml-vocab-bert-bge.gguf";
    let (v, map) = cut_vocab(name);
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/llm/vocab"
    ));
    assert_eq!(
        check_vocab(&v, name, &vectors_in(&dir, name), Some(&map)),
        46
    );
    let ids: Vec<u32> = v
        .tokenize("Hello world", false, false)
        .iter()
        .map(|&i| map[i as usize])
        .collect();
    assert_eq!(ids, [7592, 2088]);
}

/// Every llama.cpp vocabulary with test vectors in `TRT_DIFF_LLAMA_VOCABS` (llama.cpp's `models/` folder, e.g. from
/// the llama-cpp-python sdist; the files are too big to keep here): prints which pass; fails when one that passed
/// before (the list below) differs. Skipped without the variable.
#[test]
fn llama_cpp_vocab_vectors_where_available() {
    let Some(dir) = std::env::var_os("TRT_DIFF_LLAMA_VOCABS").map(PathBuf::from) else {
        eprintln!("TRT_DIFF_LLAMA_VOCABS is not set: skipped");
        return;
    };
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf") && dir.join(format!("{n}.out")).exists())
        .collect();
    names.sort();
    let mut broken = Vec::new();
    for name in &names {
        let cases = vectors_in(&dir, name);
        let f = match Vocab::open(&dir.join(name)) {
            Ok(v) => failures(&v, &cases, None),
            Err(e) => {
                eprintln!("{name}: cannot load: {e:#}");
                broken.extend(
                    LLAMA_CPP_PASSING
                        .contains(&name.as_str())
                        .then(|| format!("{name}: {e:#}")),
                );
                continue;
            }
        };
        eprintln!(
            "{name}: {} of {} vectors pass",
            cases.len() - f.len().min(cases.len()),
            cases.len()
        );
        if let Some(first) = f.first() {
            eprintln!("  first difference: {first}");
        }
        if !f.is_empty() && LLAMA_CPP_PASSING.contains(&name.as_str()) {
            broken.push(format!("{name}:\n{}", f.join("\n")));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
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

#[test]
fn hf_tokenizer_json_becomes_a_gguf_vocab_that_tokenizes_as_hf_tokenizers() {
    // The tiny Qwen tokenizer of the Z-Image golden folder (byte-level BPE, Qwen2's split, chat markers as added
    // special tokens) converted to llama.cpp's vocab metadata: our tokenizer on it gives Hugging Face tokenizers'
    // own ids (the `tokenizers` crate, the same code as transformers' fast tokenizers) for every string.
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/z_image/tokenizer"
    ));
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("vocab.gguf");
    trt_diff::tokenizer::hf_vocab::vocab_gguf_from_hf(&dir)
        .unwrap()
        .write(&out)
        .unwrap();
    let v = Vocab::open(&out).unwrap();
    assert_eq!(v.pre, "qwen2");
    let hf = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    assert_eq!(v.n_tokens(), hf.get_vocab_size(true));
    assert_eq!(v.eos, hf.token_to_id("<|im_end|>"));
    assert!(v.chat_template.as_deref().unwrap().contains("<|im_start|>"));
    let texts = [
        "hello world",
        "The quick brown fox jumps over the lazy dog.",
        "  leading spaces and trailing  ",
        "numbers 1234567 and 3.14159",
        "it's we're they've I'm you'll he'd",
        "line one\nline two\r\n\n\ttab",
        "unicode: café, naïve, 東京, Ελληνικά, 😀",
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
        "",
    ];
    for text in texts {
        let want: Vec<u32> = hf.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(v.tokenize(text, false, true), want, "{text:?}");
    }
    // What it cannot convert is named, with the way out.
    std::fs::write(
        d.path().join("tokenizer.json"),
        r#"{"model": {"type": "Unigram", "vocab": []}}"#,
    )
    .unwrap();
    let e = format!(
        "{:#}",
        trt_diff::tokenizer::hf_vocab::vocab_gguf_from_hf(d.path())
            .err()
            .unwrap()
    );
    assert!(e.contains("Unigram") && e.contains("--tokenizer"), "{e}");
    // A hostile id is refused before anything is sized by it.
    std::fs::write(
        d.path().join("tokenizer.json"),
        r#"{"model": {"type": "BPE", "vocab": {"a": 99999999999}, "merges": []},
            "pre_tokenizer": {"type": "ByteLevel", "use_regex": true}}"#,
    )
    .unwrap();
    let e = format!(
        "{:#}",
        trt_diff::tokenizer::hf_vocab::vocab_gguf_from_hf(d.path())
            .err()
            .unwrap()
    );
    assert!(e.contains("99999999999"), "{e}");
}
