//! A Hugging Face model folder's byte-level BPE tokenizer (`tokenizer.json` + `tokenizer_config.json`: GPT-2,
//! Llama 3, Qwen2/2.5/3/3.5) as the vocab-only GGUF metadata llama.cpp's converter writes (`tokenizer.ggml.*`), so
//! that a Hugging Face folder builds and runs without a separate GGUF vocabulary. Tokens are the model's vocabulary
//! and the added tokens by id (holes named `[PAD{id}]`, as the converter does), added special tokens are control
//! tokens, other added tokens user-defined; the pre-tokenizer is named by its split expression (the table of
//! `llm_pretok`); BOS/EOS/padding and the chat template come from `tokenizer_config.json`.
use crate::weights::gguf::Value;
use crate::weights::gguf_write::GgufWriter;
use anyhow::{Context, Result, bail};
use serde_json::Value as Json;
use std::path::Path;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
/// GGUF's element type ids.
const GGUF_I32: u32 = 5;
const GGUF_STRING: u32 = 8;
/// The largest vocabulary a model may have (`weights::limits`): a larger id is a broken file, not an allocation to
/// make.
const MAX_TOKENS: u64 = crate::weights::limits::MAX_VOCAB as u64;
/// Published tokenizer.json files are tens of megabytes at most.
const MAX_JSON_BYTES: u64 = 256 << 20;

fn read_json(path: &Path) -> Result<Json> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("cannot read '{}'", path.display()))?
        .len();
    if size > MAX_JSON_BYTES {
        bail!(
            "'{}' is {size} bytes, more than a tokenizer file has (at most {MAX_JSON_BYTES}): a wrong or corrupt \
             file",
            path.display()
        );
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read '{}'", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("'{}' is not valid JSON", path.display()))
}

/// A token setting of tokenizer_config.json: a string or `{"content": ...}`.
fn token_text(v: Option<&Json>) -> Option<&str> {
    match v? {
        Json::String(s) => Some(s),
        Json::Object(o) => o.get("content")?.as_str(),
        _ => None,
    }
}

/// Whether `dir` holds a tokenizer this module converts.
pub fn has_tokenizer_json(dir: &Path) -> bool {
    dir.join("tokenizer.json").is_file()
}

/// The vocab-only GGUF metadata of the tokenizer in `dir`.
pub fn vocab_gguf_from_hf(dir: &Path) -> Result<GgufWriter> {
    let path = dir.join("tokenizer.json");
    let t = read_json(&path)?;
    let fix = "give the tokenizer as a GGUF file with --tokenizer FILE.gguf (llama.cpp's vocab files, or any GGUF of \
               the model)";
    let model = &t["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "'{}': a {} tokenizer; only byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) are read from tokenizer.json: \
             {fix}",
            path.display(),
            model["type"].as_str().unwrap_or("unknown")
        );
    }
    let pre = pre_tokenizer_name(&t).with_context(|| format!("'{}': {fix}", path.display()))?;
    let vocab = model["vocab"]
        .as_object()
        .with_context(|| format!("'{}': model.vocab is not a token -> id map", path.display()))?;
    let mut entries: Vec<(u64, String, i32)> = Vec::with_capacity(vocab.len());
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .filter(|&i| i < MAX_TOKENS)
            .with_context(|| format!("'{}': token {tok:?} has id {id}", path.display()))?;
        entries.push((id, tok.clone(), NORMAL));
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
            bail!(
                "'{}': an added token without id or content: {a}",
                path.display()
            );
        };
        if id >= MAX_TOKENS {
            bail!("'{}': added token {content:?} has id {id}", path.display());
        }
        let ty = if a["special"].as_bool() == Some(true) {
            CONTROL
        } else {
            USER_DEFINED
        };
        entries.retain(|e| e.0 != id);
        entries.push((id, content.to_string(), ty));
    }
    let n = entries.iter().map(|e| e.0 + 1).max().unwrap_or(0) as usize;
    let mut tokens: Vec<String> = (0..n).map(|i| format!("[PAD{i}]")).collect();
    let mut types = vec![UNUSED; n];
    for (id, tok, ty) in entries {
        tokens[id as usize] = tok;
        types[id as usize] = ty;
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .with_context(|| format!("'{}': a BPE model without merges", path.display()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) if pair.len() == 2 => Ok(format!(
                "{} {}",
                pair[0].as_str().unwrap_or_default(),
                pair[1].as_str().unwrap_or_default()
            )),
            other => bail!(
                "'{}': merge {other} is not \"a b\" or [a, b]",
                path.display()
            ),
        })
        .collect::<Result<_>>()?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        Json::Null
    };
    let id_of = |text: &str| tokens.iter().position(|t| t == text).map(|i| i as u32);
    let mut w = GgufWriter::default();
    let strings =
        |v: Vec<String>| Value::Array(GGUF_STRING, v.into_iter().map(Value::String).collect());
    w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
    w.set("tokenizer.ggml.pre", Value::String(pre.into()));
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(GGUF_I32, types.iter().map(|&t| Value::I32(t)).collect()),
    );
    w.set("tokenizer.ggml.tokens", strings(tokens.clone()));
    w.set("tokenizer.ggml.merges", strings(merges));
    for (key, setting) in [
        ("bos_token_id", "bos_token"),
        ("eos_token_id", "eos_token"),
        ("padding_token_id", "pad_token"),
    ] {
        if let Some(id) = token_text(config.get(setting)).and_then(id_of) {
            w.set(&format!("tokenizer.ggml.{key}"), Value::U32(id));
        }
    }
    if let Some(b) = config.get("add_bos_token").and_then(Json::as_bool) {
        w.set("tokenizer.ggml.add_bos_token", Value::Bool(b));
    }
    let template = match config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        // A list of named templates: the default one.
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    };
    if let Some(t) = template {
        w.set("tokenizer.chat_template", Value::String(t));
    }
    Ok(w)
}

/// llama.cpp's pre-tokenizer name for the tokenizer's split: byte-level without a split expression is GPT-2's;
/// otherwise the expression must be one `llm_pretok` knows.
fn pre_tokenizer_name(t: &Json) -> Result<&'static str> {
    let pre = &t["pre_tokenizer"];
    let steps: Vec<&Json> = match pre["type"].as_str() {
        Some("Sequence") => pre["pretokenizers"]
            .as_array()
            .into_iter()
            .flatten()
            .collect(),
        Some(_) => vec![pre],
        None => vec![],
    };
    let byte_level = steps.iter().any(|s| s["type"] == "ByteLevel")
        || t["decoder"]["type"].as_str() == Some("ByteLevel");
    if !byte_level {
        bail!("the tokenizer is not byte-level BPE (no ByteLevel pre-tokenizer or decoder)");
    }
    let splits: Vec<&str> = steps
        .iter()
        .filter(|s| s["type"] == "Split")
        .filter_map(|s| s["pattern"]["Regex"].as_str())
        .collect();
    match splits[..] {
        [] if steps.iter().any(|s| s["type"] == "ByteLevel" && s["use_regex"] != false) => Ok("gpt-2"),
        [re] => super::llm_pretok::name_for_expression(re).with_context(|| {
            format!("its split expression {re:?} is not one of llama.cpp's pre-tokenizers that trt-diff knows")
        }),
        _ => bail!("its pre-tokenizer ({pre}) is not one trt-diff knows"),
    }
}
