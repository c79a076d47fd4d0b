//! A Hugging Face model folder's BPE tokenizer (`tokenizer.json` + `tokenizer_config.json`) as the vocab-only GGUF
//! metadata llama.cpp's converter writes (`tokenizer.ggml.*`), so that a Hugging Face folder builds and runs
//! without a separate GGUF vocabulary. Two kinds are read:
//! - byte-level BPE (GPT-2, Llama 3, Qwen2/2.5/3/3.5): model `gpt2`, the merges, the pre-tokenizer named by its split
//!   expression (the table of `llm_pretok`);
//! - SentencePiece-style BPE (Llama 2, TinyLlama, Mistral 7B, Gemma: `byte_fallback`, `▁` for spaces, `<0xNN>` byte
//!   tokens): model `llama` (llama.cpp's SPM tokenizer), with scores from the merge ranks (a token scores minus the
//!   rank of the first merge that builds it, so SPM's best-score-first merging follows the merge list), `<0xNN>`
//!   tokens typed BYTE, and the dummy-prefix space from the normalizer (`Prepend("▁")`) or the `Metaspace`
//!   pre-tokenizer (`add_space_prefix`; Gemma's `Replace(" ", "▁")` alone has none). Metaspace's own rules (no
//!   prefix on text that already starts with a space; with `prepend_scheme: first` only at the start of the text)
//!   go in `trt_diff.tokenizer.metaspace_prepend_scheme`, which llama.cpp ignores.
//!
//! Tokens are the model's vocabulary and the added tokens by id (holes named `[PAD{id}]`, as the converter does);
//! added special tokens are control tokens, other added tokens user-defined; BOS/EOS/padding and the chat template
//! come from `tokenizer_config.json`, BOS/EOS addition from it or else from the post-processor's template.
use crate::weights::gguf::Value;
use crate::weights::gguf_write::GgufWriter;
use anyhow::{Context, Result, bail};
use serde_json::Value as Json;
use std::collections::HashMap;
use std::path::Path;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;
/// GGUF's element type ids.
const GGUF_I32: u32 = 5;
const GGUF_F32: u32 = 6;
const GGUF_STRING: u32 = 8;
/// The largest vocabulary a model may have (`weights::limits`): a larger id is a broken file, not an allocation to
/// make.
const MAX_TOKENS: u64 = crate::weights::limits::MAX_VOCAB as u64;
/// Published tokenizer.json files are tens of megabytes at most.
const MAX_JSON_BYTES: u64 = 256 << 20;
/// SentencePiece's word-boundary mark, which stands for a space in SPM vocabularies.
const SPACE_MARK: &str = "\u{2581}";
/// The metadata key of the Metaspace prepend scheme (`first` or `always`), read by `llm_vocab`.
pub const METASPACE_SCHEME_KEY: &str = "trt_diff.tokenizer.metaspace_prepend_scheme";
const SUPPORTED: &str = "supported: byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece-style BPE with \
                         byte_fallback (Llama 2, TinyLlama, Mistral 7B, Gemma)";

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

/// The tokenizer kinds read from tokenizer.json.
enum Kind {
    /// Byte-level BPE with llama.cpp's pre-tokenizer name.
    ByteLevel(&'static str),
    /// SentencePiece-style BPE.
    Spm(SpaceRule),
}

/// How an SPM-style tokenizer.json writes the dummy-prefix space.
struct SpaceRule {
    add_space_prefix: bool,
    /// Metaspace's `prepend_scheme` (`first`/`always`) when the prefix comes from a Metaspace pre-tokenizer.
    metaspace: Option<&'static str>,
}

/// `<0xNN>`: a SentencePiece byte token.
fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6
        && t.starts_with("<0x")
        && b[5] == b'>'
        && b[3..5].iter().all(u8::is_ascii_hexdigit)
}

/// A merge of tokenizer.json: `"a b"` or `["a", "b"]`.
fn merge_pair(m: &Json) -> Option<(&str, &str)> {
    match m {
        // The separator is the first space after the first character (a merge may start with a space).
        Json::String(s) => {
            let first = s.chars().next()?.len_utf8();
            let p = s[first..].find(' ')? + first;
            Some((&s[..p], &s[p + 1..]))
        }
        Json::Array(pair) if pair.len() == 2 => Some((pair[0].as_str()?, pair[1].as_str()?)),
        _ => None,
    }
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
            "'{}': a {} tokenizer, which trt-diff does not read from tokenizer.json ({SUPPORTED}): {fix}",
            path.display(),
            model["type"].as_str().unwrap_or("unknown")
        );
    }
    let kind = tokenizer_kind(&t).with_context(|| format!("'{}': {fix}", path.display()))?;
    let vocab = model["vocab"]
        .as_object()
        .with_context(|| format!("'{}': model.vocab is not a token -> id map", path.display()))?;
    let spm = matches!(kind, Kind::Spm(_));
    let mut entries: Vec<(u64, String, i32)> = Vec::with_capacity(vocab.len());
    for (tok, id) in vocab {
        let id = id
            .as_u64()
            .filter(|&i| i < MAX_TOKENS)
            .with_context(|| format!("'{}': token {tok:?} has id {id}", path.display()))?;
        let ty = if spm && is_byte_token(tok) {
            BYTE
        } else {
            NORMAL
        };
        entries.push((id, tok.clone(), ty));
    }
    let unk = model["unk_token"].as_str();
    let mut added = Vec::new();
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
        let ty = match (a["special"].as_bool() == Some(true), spm) {
            (true, true) if Some(content) == unk => UNKNOWN,
            (true, _) => CONTROL,
            (false, _) => USER_DEFINED,
        };
        // llama.cpp cuts user-defined tokens out of the raw text, where a space is still a space.
        let content = if spm && ty == USER_DEFINED {
            content.replace(SPACE_MARK, " ")
        } else {
            content.to_string()
        };
        added.push((id, content, ty));
    }
    let n = entries
        .iter()
        .chain(&added)
        .map(|e| e.0 + 1)
        .max()
        .unwrap_or(0) as usize;
    let mut slots: Vec<Option<(String, i32)>> = vec![None; n];
    for (id, tok, ty) in entries {
        // Two names of one id (Gemma's "\t" beside "<0x09>"): the byte token keeps byte fallback whole.
        let slot = &mut slots[id as usize];
        if slot.as_ref().is_none_or(|s| s.1 != BYTE) {
            *slot = Some((tok, ty));
        }
    }
    for (id, tok, ty) in added {
        slots[id as usize] = Some((tok, ty));
    }
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for (i, s) in slots.into_iter().enumerate() {
        let (tok, ty) = s.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED));
        tokens.push(tok);
        types.push(ty);
    }
    let merges_json = model["merges"]
        .as_array()
        .with_context(|| format!("'{}': a BPE model without merges", path.display()))?;
    let mut merges = Vec::with_capacity(merges_json.len());
    for m in merges_json {
        merges.push(merge_pair(m).with_context(|| {
            format!("'{}': merge {m} is not \"a b\" or [a, b]", path.display())
        })?);
    }
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.is_file() {
        read_json(&config_path)?
    } else {
        Json::Null
    };
    let index: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i as u32))
        .collect();
    let id_of = |text: &str| index.get(text).copied();
    let mut w = GgufWriter::default();
    let strings =
        |v: Vec<String>| Value::Array(GGUF_STRING, v.into_iter().map(Value::String).collect());
    match &kind {
        Kind::ByteLevel(pre) => {
            w.set("tokenizer.ggml.model", Value::String("gpt2".into()));
            w.set("tokenizer.ggml.pre", Value::String((*pre).into()));
        }
        Kind::Spm(rule) => {
            w.set("tokenizer.ggml.model", Value::String("llama".into()));
            w.set("tokenizer.ggml.pre", Value::String("default".into()));
            w.set(
                "tokenizer.ggml.scores",
                Value::Array(
                    GGUF_F32,
                    spm_scores(&merges, &id_of, n)
                        .into_iter()
                        .map(Value::F32)
                        .collect(),
                ),
            );
            w.set(
                "tokenizer.ggml.add_space_prefix",
                Value::Bool(rule.add_space_prefix),
            );
            if let Some(scheme) = rule.metaspace {
                w.set(METASPACE_SCHEME_KEY, Value::String(scheme.into()));
            }
            if let Some(id) = unk.and_then(id_of) {
                w.set("tokenizer.ggml.unknown_token_id", Value::U32(id));
            }
        }
    }
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(GGUF_I32, types.iter().map(|&t| Value::I32(t)).collect()),
    );
    if let Kind::ByteLevel(_) = kind {
        let merges = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        w.set("tokenizer.ggml.merges", strings(merges));
    }
    let template = bos_eos_template(&t["post_processor"]);
    for (key, setting, from_template) in [
        ("bos_token_id", "bos_token", template.bos.as_deref()),
        ("eos_token_id", "eos_token", template.eos.as_deref()),
        ("padding_token_id", "pad_token", None),
    ] {
        let text = token_text(config.get(setting)).or(from_template);
        if let Some(id) = text.and_then(id_of) {
            w.set(&format!("tokenizer.ggml.{key}"), Value::U32(id));
        }
    }
    for (key, setting, from_template) in [
        ("add_bos_token", "add_bos_token", template.bos.is_some()),
        ("add_eos_token", "add_eos_token", template.eos.is_some()),
    ] {
        let add = config.get(setting).and_then(Json::as_bool);
        if let Some(b) = add.or(template.found.then_some(from_template)) {
            w.set(&format!("tokenizer.ggml.{key}"), Value::Bool(b));
        }
    }
    w.set("tokenizer.ggml.tokens", strings(tokens));
    let chat = match config.get("chat_template") {
        Some(Json::String(s)) => Some(s.clone()),
        // A list of named templates: the default one.
        Some(Json::Array(named)) => named
            .iter()
            .find(|t| t["name"].as_str() == Some("default"))
            .and_then(|t| t["template"].as_str())
            .map(str::to_string),
        _ => None,
    };
    if let Some(t) = chat {
        w.set("tokenizer.chat_template", Value::String(t));
    }
    Ok(w)
}

/// SPM scores from BPE merge ranks: a token built by merges scores minus the rank of the first one that builds it;
/// every other token scores below all of those (their score is never a merge's).
fn spm_scores(merges: &[(&str, &str)], id_of: &dyn Fn(&str) -> Option<u32>, n: usize) -> Vec<f32> {
    let floor = merges.len() as f32;
    let mut scores: Vec<f32> = (0..n).map(|i| -(floor + i as f32)).collect();
    let mut seen = vec![false; n];
    let mut joined = String::new();
    for (rank, (a, b)) in merges.iter().enumerate() {
        joined.clear();
        joined.push_str(a);
        joined.push_str(b);
        if let Some(id) = id_of(&joined)
            && !std::mem::replace(&mut seen[id as usize], true)
        {
            scores[id as usize] = -(rank as f32);
        }
    }
    scores
}

/// BOS/EOS as the post-processor's TemplateProcessing adds them around a single sequence.
#[derive(Default)]
struct Template {
    found: bool,
    bos: Option<String>,
    eos: Option<String>,
}

fn bos_eos_template(post: &Json) -> Template {
    let tp = match post["type"].as_str() {
        Some("TemplateProcessing") => post,
        Some("Sequence") => match post["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["type"] == "TemplateProcessing")
        {
            Some(p) => p,
            None => return Template::default(),
        },
        _ => return Template::default(),
    };
    let Some(single) = tp["single"].as_array() else {
        return Template::default();
    };
    let special = |item: Option<&Json>| -> Option<String> {
        let id = item?["SpecialToken"]["id"].as_str()?;
        // The token's text: its first token in `special_tokens`, else the id itself.
        let entry = &tp["special_tokens"][id];
        Some(
            entry["tokens"]
                .as_array()
                .and_then(|t| t.first())
                .and_then(Json::as_str)
                .unwrap_or(id)
                .to_string(),
        )
    };
    Template {
        found: true,
        bos: special(single.first()),
        eos: if single.len() > 1 {
            special(single.last())
        } else {
            None
        },
    }
}

/// Which BPE tokenizer this is: byte-level (a ByteLevel pre-tokenizer or decoder) or SentencePiece-style
/// (byte_fallback, a Metaspace pre-tokenizer, or a normalizer writing spaces as `▁`).
fn tokenizer_kind(t: &Json) -> Result<Kind> {
    let pre = &t["pre_tokenizer"];
    let steps = |v: &'_ Json, list: &str| -> Vec<Json> {
        match v["type"].as_str() {
            Some("Sequence") => v[list].as_array().cloned().unwrap_or_default(),
            Some(_) => vec![v.clone()],
            None => vec![],
        }
    };
    let pre_steps = steps(pre, "pretokenizers");
    let norm_steps = steps(&t["normalizer"], "normalizers");
    let byte_level = pre_steps.iter().any(|s| s["type"] == "ByteLevel")
        || t["decoder"]["type"].as_str() == Some("ByteLevel");
    if byte_level {
        return pre_tokenizer_name(&pre_steps, pre).map(Kind::ByteLevel);
    }
    let metaspace = pre_steps.iter().any(|s| s["type"] == "Metaspace");
    let marks_spaces = norm_steps
        .iter()
        .any(|s| matches!(s["type"].as_str(), Some("Prepend" | "Replace")));
    if t["model"]["byte_fallback"].as_bool() == Some(true) || metaspace || marks_spaces {
        return spm_space_rule(&norm_steps, &pre_steps).map(Kind::Spm);
    }
    bail!(
        "the tokenizer is neither byte-level BPE (no ByteLevel pre-tokenizer or decoder) nor SentencePiece-style \
         BPE (no byte_fallback, Metaspace pre-tokenizer or normalizer writing spaces as \"▁\"); {SUPPORTED}"
    )
}

/// The dummy-prefix rule of a SentencePiece-style tokenizer: the old form (normalizer `Prepend("▁")` +
/// `Replace(" ", "▁")`, no pre-tokenizer), Gemma's (`Replace` alone, no pre-tokenizer or a `Split` on `" "`) or the
/// new form (no normalizer, pre-tokenizer `Metaspace` with `split: false`).
fn spm_space_rule(norm: &[Json], pre: &[Json]) -> Result<SpaceRule> {
    let (mut prepend, mut replace) = (false, false);
    for s in norm {
        match s["type"].as_str() {
            Some("Prepend") if s["prepend"] == SPACE_MARK => prepend = true,
            Some("Replace") if s["pattern"]["String"] == " " && s["content"] == SPACE_MARK => {
                replace = true
            }
            _ => bail!(
                "its normalizer step {s} is not one of a SentencePiece-style tokenizer that trt-diff knows"
            ),
        }
    }
    // transformers 5 gives Gemma a Split on " " after the normalizer has replaced every space: a no-op.
    let noop_split =
        |s: &Json| s["type"] == "Split" && s["pattern"]["String"] == " " && s["invert"] != true;
    match pre {
        [] if replace => Ok(SpaceRule {
            add_space_prefix: prepend,
            metaspace: None,
        }),
        [s] if replace && noop_split(s) => Ok(SpaceRule {
            add_space_prefix: prepend,
            metaspace: None,
        }),
        [] => bail!(
            "it writes spaces as spaces (no Metaspace pre-tokenizer or Replace(\" \", \"▁\") normalizer)"
        ),
        [m] if m["type"] == "Metaspace" && norm.is_empty() => {
            if m["replacement"] != SPACE_MARK {
                bail!(
                    "its Metaspace replacement is {}, not \"▁\"",
                    m["replacement"]
                );
            }
            if m["split"] != false {
                bail!(
                    "its Metaspace pre-tokenizer splits words (split is not false), which SentencePiece does not"
                );
            }
            let scheme = match m["prepend_scheme"].as_str() {
                Some("first") => Some("first"),
                Some("always") => Some("always"),
                Some("never") => None,
                other => {
                    bail!("its Metaspace prepend_scheme {other:?} is not first, always or never")
                }
            };
            Ok(SpaceRule {
                add_space_prefix: scheme.is_some(),
                metaspace: scheme,
            })
        }
        _ => bail!(
            "its pre-tokenizer {} is not one of a SentencePiece-style tokenizer that trt-diff knows (none, or \
             Metaspace without a normalizer)",
            Json::Array(pre.to_vec())
        ),
    }
}

/// llama.cpp's pre-tokenizer name for a byte-level tokenizer's split: byte-level without a split expression is
/// GPT-2's; otherwise the expression must be one `llm_pretok` knows.
fn pre_tokenizer_name(steps: &[Json], pre: &Json) -> Result<&'static str> {
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
