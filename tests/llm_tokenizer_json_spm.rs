//! Hugging Face folders whose tokenizer.json is SentencePiece-style BPE (Llama 2, TinyLlama, Mistral 7B, Gemma):
//! converted to llama.cpp's `llama` (SPM) vocabulary metadata, they tokenize as Hugging Face tokenizers does
//! (golden from scripts/golden/llm_spm_tokenizer_json.py) and as llama.cpp does on its own Llama vocabulary.
use crate::common;
use common::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use trt_diff::tokenizer::hf_vocab::vocab_gguf_from_hf;
use trt_diff::tokenizer::llm_vocab::{Vocab, VocabKind, attr};

fn golden(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/llm/spm_tokenizer_json"
    ))
    .join(name)
}

fn read(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `dir` as a Hugging Face folder: tokenizer.json and tokenizer_config.json.
fn write_folder(dir: &Path, tokenizer: &Value, config: &Value) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// The golden base tokenizer.json with a variant's top-level keys and vocabulary entries, as the script builds it.
fn variant_tokenizer(variant: &Value) -> Value {
    let mut t = read(&golden("tokenizer.json"));
    for (k, v) in variant["tokenizer"].as_object().unwrap() {
        t[k] = v.clone();
    }
    for (k, v) in variant["vocab"].as_object().unwrap() {
        t["model"]["vocab"][k] = v.clone();
    }
    t
}

/// The vocabulary `build` makes of the folder `dir`.
fn convert(dir: &Path) -> Vocab {
    let out = dir.join("vocab.gguf");
    vocab_gguf_from_hf(dir).unwrap().write(&out).unwrap();
    Vocab::open(&out).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn every_form_tokenizes_as_hf_tokenizers() {
    let variants = read(&golden("variants.json"));
    let cases = read(&golden("cases.json"));
    let d = tempfile::tempdir().unwrap();
    let mut checked = 0;
    for (name, variant) in variants.as_object().unwrap() {
        let dir = d.path().join(name);
        let tokenizer = variant_tokenizer(variant);
        write_folder(&dir, &tokenizer, &variant["config"]);
        let v = convert(&dir);
        assert_eq!(v.kind, VocabKind::Spm, "{name}");
        let prefix = !matches!(name.as_str(), "gemma" | "gemma_split" | "metaspace_never");
        assert_eq!(v.add_space_prefix, prefix, "{name}");
        assert_eq!(
            (v.bos, v.unk, v.add_bos),
            (Some(1), Some(0), true),
            "{name}"
        );
        assert!(v.chat_template.is_some(), "{name}");
        // The Rust tokenizers crate reads the same file as the Python library that wrote the golden.
        let hf = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        for c in cases
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["variant"] == name.as_str())
        {
            let text = c["text"].as_str().unwrap();
            let add = c["add_special"].as_bool().unwrap();
            let want = ids(&c["ids"]);
            assert_eq!(
                hf.encode(text, add).unwrap().get_ids(),
                want,
                "tokenizers crate, {name} {text:?}"
            );
            assert_eq!(
                v.tokenize(text, add, true),
                want,
                "{name} {text:?} add_special={add}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 240);
}

#[test]
fn tokens_types_and_specials_follow_llama_cpp() {
    let variants = read(&golden("variants.json"));
    let d = tempfile::tempdir().unwrap();
    // Gemma's form: BOS/EOS/padding from tokenizer_config.json, added chat markers are control tokens, the "\t"
    // alias of <0x09> leaves the byte token in place.
    let gemma = &variants["gemma"];
    write_folder(d.path(), &variant_tokenizer(gemma), &gemma["config"]);
    let v = convert(d.path());
    assert_eq!((v.eos, v.n_tokens()), (Some(32001), 32002));
    assert_eq!(v.tokens[12], "<0x09>");
    assert_eq!(v.attrs[12], attr::BYTE);
    assert_eq!(v.attrs[32000], attr::CONTROL);
    assert_eq!(v.attrs[0], attr::UNKNOWN);
    assert!(v.is_eog(32001));
    assert_eq!(
        String::from_utf8(v.detokenize(&v.tokenize(" Hello\tworld", false, false), false)).unwrap(),
        " Hello\tworld"
    );
    // The old form against llama.cpp's own vocabulary: same text for every id the cut file keeps, same types.
    let g = trt_diff::weights::gguf::GgufFile::open(&shared_data(
        "tokenizers/ggml-vocab-llama-spm.gguf",
    ))
    .unwrap();
    let full = Vocab::from_gguf(&g).unwrap();
    let base = &variants["prepend"];
    write_folder(d.path(), &variant_tokenizer(base), &base["config"]);
    let v = convert(d.path());
    let kept = read(&golden("tokenizer.json"))["model"]["vocab"]
        .as_object()
        .unwrap()
        .values()
        .map(|i| i.as_u64().unwrap() as usize)
        .collect::<Vec<_>>();
    assert!(kept.len() > 800);
    for i in kept {
        assert_eq!(v.tokens[i], full.tokens[i], "id {i}");
        assert_eq!(v.attrs[i], full.attrs[i], "id {i} ({})", v.tokens[i]);
    }
    assert_eq!(
        String::from_utf8(v.detokenize(&v.tokenize("Hello world", false, false), false)).unwrap(),
        "Hello world"
    );
}

/// llama.cpp's test vectors for its Llama vocabulary (`ggml-vocab-llama-spm.gguf.inp/.out`, no BOS, specials as
/// text) through a tokenizer.json made from that vocabulary: the ids are llama.cpp's.
#[test]
fn llama_cpp_vectors_through_the_hf_folder() {
    let variants = read(&golden("variants.json"));
    let d = tempfile::tempdir().unwrap();
    let base = &variants["prepend"];
    write_folder(d.path(), &variant_tokenizer(base), &base["config"]);
    let v = convert(d.path());
    let inp =
        std::fs::read_to_string(shared_data("tokenizers/ggml-vocab-llama-spm.gguf.inp")).unwrap();
    let out =
        std::fs::read_to_string(shared_data("tokenizers/ggml-vocab-llama-spm.gguf.out")).unwrap();
    let texts: Vec<&str> = inp
        .strip_suffix("\n__ggml_vocab_test__\n")
        .unwrap_or(&inp)
        .split("\n__ggml_vocab_test__\n")
        .collect();
    let want: Vec<Vec<u32>> = out
        .lines()
        .map(|l| l.split_whitespace().map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!((texts.len(), want.len()), (46, 46));
    for (text, want) in texts.iter().zip(&want) {
        assert_eq!(&v.tokenize(text, false, false), want, "{text:?}");
    }
}

fn conversion_error(tokenizer: &Value) -> String {
    let d = tempfile::tempdir().unwrap();
    write_folder(d.path(), tokenizer, &json!({}));
    let e = format!("{:#}", vocab_gguf_from_hf(d.path()).err().unwrap());
    let file = d.path().join("tokenizer.json");
    assert!(e.contains(file.to_str().unwrap()), "{e}");
    e
}

/// The error of a tokenizer kind that is not read: it names the way out too.
fn kind_error(tokenizer: &Value) -> String {
    let e = conversion_error(tokenizer);
    assert!(e.contains("--tokenizer"), "{e}");
    e
}

#[test]
fn unsupported_kinds_name_the_file_and_the_cause() {
    let spm = |normalizer: Value, pre: Value| {
        json!({"normalizer": normalizer, "pre_tokenizer": pre,
               "model": {"type": "BPE", "byte_fallback": true, "vocab": {"a": 0}, "merges": []}})
    };
    let e = kind_error(&json!({"model": {"type": "Unigram", "vocab": []}}));
    assert!(
        e.contains("Unigram") && e.contains("SentencePiece-style"),
        "{e}"
    );
    let e = kind_error(&json!({"model": {"type": "WordPiece", "vocab": {}}}));
    assert!(e.contains("WordPiece") && e.contains("supported"), "{e}");
    // BPE that is neither byte-level nor SentencePiece-style.
    let e = kind_error(&json!({"pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}));
    assert!(
        e.contains("neither byte-level") && e.contains("byte_fallback"),
        "{e}"
    );
    let e = kind_error(&spm(
        json!({"type": "Sequence", "normalizers": [{"type": "NFKC"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}),
        Value::Null,
    ));
    assert!(e.contains("NFKC"), "{e}");
    let e = kind_error(&spm(
        Value::Null,
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": true}),
    ));
    assert!(e.contains("split"), "{e}");
    let e = kind_error(&spm(
        Value::Null,
        json!({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "sometimes", "split": false}),
    ));
    assert!(e.contains("sometimes"), "{e}");
    let e = kind_error(&spm(Value::Null, Value::Null));
    assert!(e.contains("spaces as spaces"), "{e}");
    let e = kind_error(&spm(Value::Null, json!({"type": "Whitespace"})));
    assert!(e.contains("Whitespace"), "{e}");
    // A hostile id is refused before anything is sized by it.
    let mut t = spm(
        json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"}),
        Value::Null,
    );
    t["model"]["vocab"]["<0x41>"] = json!(99999999999u64);
    let e = conversion_error(&t);
    assert!(e.contains("99999999999"), "{e}");
}

#[test]
fn cli_tokenizes_with_an_hf_folder() {
    let variants = read(&golden("variants.json"));
    let d = tempfile::tempdir().unwrap();
    let first = &variants["metaspace_first"];
    write_folder(d.path(), &variant_tokenizer(first), &first["config"]);
    let cases = read(&golden("cases.json"));
    let case = cases
        .as_array()
        .unwrap()
        .iter()
        .find(|c| {
            c["variant"] == "metaspace_first" && c["text"] == " Hello" && c["add_special"] == false
        })
        .unwrap();
    let want: Vec<String> = ids(&case["ids"]).iter().map(u32::to_string).collect();
    let r = run(&["tokenize", "--vocab", s(d.path()), " Hello"], true);
    assert_eq!(r.stdout.trim(), want.join(" "));
    let r = run(
        &["tokenize", "--vocab", s(d.path()), "--decode", "15043 3186"],
        true,
    );
    assert_eq!(r.stdout.trim_end_matches('\n'), "Hello world");
    // A folder without tokenizer.json, and one whose tokenizer is not read, are named.
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let r = run(&["tokenize", "--vocab", s(&empty), "x"], false);
    assert!(r.stderr.contains("without tokenizer.json"), "{}", r.stderr);
    std::fs::write(
        d.path().join("tokenizer.json"),
        r#"{"model": {"type": "Unigram", "vocab": []}}"#,
    )
    .unwrap();
    let r = run(&["tokenize", "--vocab", s(d.path()), "x"], false);
    assert!(r.stderr.contains("Unigram"), "{}", r.stderr);
}

fn added(id: u32, content: &str) -> Value {
    json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
           "normalized": false, "special": true})
}

/// A tiny Mistral (the golden HF folder of tests/llm_archs.rs, 128-token vocabulary) with a SentencePiece-style
/// tokenizer.json: `generate --engine FOLDER` converts it as `build` does and runs.
#[test]
fn hf_folder_with_an_spm_tokenizer_json_generates() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("tiny-mistral");
    std::fs::create_dir_all(&model).unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/llm/tiny_mistral");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), model.join(f)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    for (i, t) in [
        "<unk>", "<s>", "</s>", "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "▁he",
        "llo",
    ]
    .iter()
    .enumerate()
    {
        vocab.insert(t.to_string(), json!(i));
    }
    let tokenizer = json!({
        "added_tokens": [
            added(0, "<unk>"),
            added(1, "<s>"),
            added(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "model": {"type": "BPE", "byte_fallback": true, "unk_token": "<unk>", "vocab": vocab,
            "merges": [["▁", "h"], ["h", "e"], ["l", "l"], ["▁h", "e"], ["ll", "o"]]}
    });
    // No tokenizer_config.json: BOS comes from the post-processor's template.
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let hf = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let v = convert(&model);
    for text in ["hello world", " hello", "hello<s>hello", "xyz"] {
        assert_eq!(
            v.tokenize(text, true, true),
            hf.encode(text, true).unwrap().get_ids(),
            "{text:?}"
        );
    }
    std::fs::remove_file(model.join("vocab.gguf")).unwrap();
    let cache = d.path().join("cache");
    let r = run_env(
        &[
            "generate",
            "--engine",
            s(&model),
            "--prompt",
            "hello world",
            "--max-tokens",
            "4",
            "--ignore-eos",
            "--backend",
            "cpu",
        ],
        &[("TRT_DIFF_MODEL_CACHE", s(&cache))],
        true,
    );
    assert!(r.stderr.contains("generated: 4 tokens"), "{}", r.stderr);
}
