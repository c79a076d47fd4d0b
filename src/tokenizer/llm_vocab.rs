//! LLM vocabularies from GGUF metadata (`tokenizer.ggml.*`), tokenized as llama.cpp does: special tokens are cut
//! out of the text first (user-defined always, control/unknown only when `parse_special`), then each raw-text
//! fragment goes to the model's algorithm: SPM (`llama`: score-ordered merges, dummy-prefix space, `▁` for spaces,
//! `<0xNN>` byte fallback), BPE (`gpt2`: pre-tokenizer regex, byte-to-unicode mapping, ranked merges) or WPM
//! (`bert`: greedy longest match with a `▁` word prefix). `token_to_piece` gives a token's bytes; the
//! the generator's `Utf8Stream` turns pieces into text without ever splitting a character.
use crate::weights::gguf::{GgufFile, Value};
use anyhow::{Context, Result, bail};
use std::collections::{HashMap, HashSet};

/// llama.cpp's token attributes (llama.h `llama_token_attr`).
pub mod attr {
    pub const UNKNOWN: u32 = 1 << 0;
    pub const UNUSED: u32 = 1 << 1;
    pub const NORMAL: u32 = 1 << 2;
    pub const CONTROL: u32 = 1 << 3;
    pub const USER_DEFINED: u32 = 1 << 4;
    pub const BYTE: u32 = 1 << 5;
}

/// GGUF `tokenizer.ggml.token_type` values to attributes.
fn attr_of_type(t: i64) -> u32 {
    match t {
        1 => attr::NORMAL,
        2 => attr::UNKNOWN,
        3 => attr::CONTROL,
        4 => attr::USER_DEFINED,
        5 => attr::UNUSED,
        6 => attr::BYTE,
        _ => 0,
    }
}

/// When the SPM dummy-prefix space goes before a text fragment (with `add_space_prefix`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpacePrefix {
    /// llama.cpp: at the start of the text and after every special token.
    AfterSpecial,
    /// Hugging Face Metaspace `prepend_scheme: first`: only at the start of the text, unless it starts with a space.
    First,
    /// Metaspace `always`: every fragment that does not start with a space.
    Always,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VocabKind {
    Spm,
    Bpe,
    Wpm,
}

/// Texts llama.cpp treats as end-of-generation whatever their declared type.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

pub struct Vocab {
    pub kind: VocabKind,
    /// `tokenizer.ggml.pre` (BPE pre-tokenizer name).
    pub pre: String,
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub attrs: Vec<u32>,
    pub(crate) token_to_id: HashMap<String, u32>,
    pub(crate) bpe_ranks: HashMap<(String, String), u32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub unk: Option<u32>,
    pub sep: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    pub space_prefix: SpacePrefix,
    pub ignore_merges: bool,
    pub eog: HashSet<u32>,
    /// BERT normalizer: lowercase (llama.cpp's default when the file does not say).
    pub lowercase: bool,
    /// BERT normalizer: NFD and combining marks dropped (by default as `lowercase`).
    pub strip_accents: bool,
    pub max_token_len: usize,
    /// Control/user-defined/unknown tokens, longest text first (the order they are cut out of text).
    pub(crate) special_cache: Vec<u32>,
    pub chat_template: Option<String>,
    pub(crate) bpe: Option<super::llm_pretok::PreTokenizer>,
}

fn str_array<'a>(g: &'a GgufFile, key: &str) -> Result<Option<Vec<&'a str>>> {
    let Some(v) = g.get(key) else {
        return Ok(None);
    };
    let items = v.as_array().with_context(|| {
        format!(
            "'{}': {key} is {}, expected an array of strings",
            g.path().display(),
            v.type_name()
        )
    })?;
    items
        .iter()
        .map(|x| {
            x.as_str()
                .with_context(|| format!("'{}': {key} holds a non-string", g.path().display()))
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn num_array(g: &GgufFile, key: &str) -> Option<Vec<f64>> {
    g.get(key)?
        .as_array()?
        .iter()
        .map(Value::as_f64)
        .collect::<Option<Vec<_>>>()
}

impl Vocab {
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path().display().to_string();
        let model = g.get_str("tokenizer.ggml.model").with_context(|| {
            format!("'{path}' has no tokenizer (metadata tokenizer.ggml.model is missing)")
        })?;
        let (kind, mut bos, mut eos, mut unk, mut sep) = match model {
            "llama" => (VocabKind::Spm, Some(1), Some(2), Some(0), None),
            "gpt2" => (VocabKind::Bpe, Some(11), Some(11), None, None),
            "bert" => (VocabKind::Wpm, Some(101), None, Some(100), Some(102)),
            other => bail!(
                "'{path}': tokenizer model '{other}' is not supported (supported: llama (SPM), gpt2 (BPE), bert (WPM))"
            ),
        };
        let tokens: Vec<String> = str_array(g, "tokenizer.ggml.tokens")?
            .with_context(|| format!("'{path}': tokenizer.ggml.tokens is missing"))?
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if t.is_empty() {
                    format!("[EMPTY_{i}]")
                } else {
                    t.to_string()
                }
            })
            .collect();
        let n = tokens.len();
        let scores = match num_array(g, "tokenizer.ggml.scores") {
            Some(s) if s.len() >= n => s.iter().map(|&v| v as f32).collect(),
            Some(s) => bail!(
                "'{path}': tokenizer.ggml.scores has {} entries for {n} tokens",
                s.len()
            ),
            None => vec![0.0; n],
        };
        let mut attrs = match num_array(g, "tokenizer.ggml.token_type") {
            Some(t) if t.len() >= n => t.iter().map(|&v| attr_of_type(v as i64)).collect(),
            Some(t) => bail!(
                "'{path}': tokenizer.ggml.token_type has {} entries for {n} tokens",
                t.len()
            ),
            None => vec![attr::NORMAL; n],
        };
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            if let Some(prev) = token_to_id.insert(t.clone(), i as u32) {
                bail!("'{path}': duplicate token {t:?} (ids {prev} and {i})");
            }
        }
        let mut bpe_ranks = HashMap::new();
        if kind == VocabKind::Bpe {
            let merges = str_array(g, "tokenizer.ggml.merges")?.with_context(|| {
                format!("'{path}': a gpt2 tokenizer needs tokenizer.ggml.merges")
            })?;
            for (i, m) in merges.iter().enumerate() {
                // The separator is the first space after the first character (a merge may start with a space).
                let first_len = m.chars().next().map_or(0, char::len_utf8);
                if let Some(p) = m[first_len..].find(' ') {
                    let p = p + first_len;
                    bpe_ranks
                        .entry((m[..p].to_string(), m[p + 1..].to_string()))
                        .or_insert(i as u32);
                }
            }
        }
        let pre = g
            .get_str("tokenizer.ggml.pre")
            .unwrap_or("default")
            .to_string();
        let (mut add_bos, mut add_eos) = (false, false);
        let mut add_space_prefix = false;
        let mut ignore_merges = false;
        match kind {
            VocabKind::Spm => {
                add_space_prefix = true;
                add_bos = true;
            }
            VocabKind::Wpm => add_bos = true,
            VocabKind::Bpe => {
                if matches!(
                    pre.as_str(),
                    "llama3" | "llama-v3" | "llama-bpe" | "falcon3"
                ) {
                    ignore_merges = true;
                    add_bos = true;
                }
            }
        }
        let bpe = if kind == VocabKind::Bpe {
            Some(
                super::llm_pretok::PreTokenizer::for_name(&pre)
                    .with_context(|| format!("'{path}'"))?,
            )
        } else {
            None
        };
        if let Some(b) = g.get_bool("tokenizer.ggml.add_space_prefix") {
            add_space_prefix = b;
        }
        let space_prefix = match g.get_str(super::hf_vocab::METASPACE_SCHEME_KEY) {
            None => SpacePrefix::AfterSpecial,
            Some("first") => SpacePrefix::First,
            Some("always") => SpacePrefix::Always,
            Some(other) => bail!(
                "'{path}': {} is {other:?}, expected first or always",
                super::hf_vocab::METASPACE_SCHEME_KEY
            ),
        };
        let id_key = |key: &str, slot: &mut Option<u32>| {
            if let Some(v) = g.get_u64(key) {
                if (v as usize) < n {
                    *slot = Some(v as u32);
                }
            } else if slot.is_some_and(|v| v as usize >= n) {
                *slot = None;
            }
        };
        id_key("tokenizer.ggml.bos_token_id", &mut bos);
        id_key("tokenizer.ggml.eos_token_id", &mut eos);
        id_key("tokenizer.ggml.unknown_token_id", &mut unk);
        id_key("tokenizer.ggml.seperator_token_id", &mut sep);
        let mut eot = None;
        id_key("tokenizer.ggml.eot_token_id", &mut eot);
        if let Some(b) = g.get_bool("tokenizer.ggml.add_bos_token") {
            add_bos = b;
        }
        if let Some(b) = g.get_bool("tokenizer.ggml.add_eos_token") {
            add_eos = b;
        }
        // llama.cpp's BertNormalizer options: lowercase unless the file says otherwise (BERT vocabularies converted
        // from uncased models carry no key), accents stripped as lowercase unless said; the "whitespace"
        // pre-tokenizer never lowercases.
        let lowercase = g
            .get_bool("tokenizer.ggml.normalizer.lowercase")
            .unwrap_or(g.get_str("tokenizer.ggml.pre") != Some("whitespace"));
        let strip_accents = g
            .get_bool("tokenizer.ggml.normalizer.strip_accents")
            .unwrap_or(lowercase);
        let mut eog: HashSet<u32> = eos.into_iter().chain(eot).collect();
        for t in EOG_TEXTS {
            if let Some(&id) = token_to_id.get(*t) {
                eog.insert(id);
                attrs[id as usize] |= attr::CONTROL;
            }
        }
        let mut special_cache: Vec<u32> = (0..n as u32)
            .filter(|&i| {
                attrs[i as usize] & (attr::CONTROL | attr::USER_DEFINED | attr::UNKNOWN) != 0
            })
            .collect();
        // Stable sort: equal lengths keep id order, as std::sort happens to in llama.cpp for these vocabularies.
        special_cache.sort_by_key(|&i| std::cmp::Reverse(tokens[i as usize].len()));
        let max_token_len = tokens.iter().map(String::len).max().unwrap_or(0);
        Ok(Vocab {
            kind,
            pre,
            tokens,
            scores,
            attrs,
            token_to_id,
            bpe_ranks,
            bos,
            eos,
            unk,
            sep,
            add_bos,
            add_eos,
            add_space_prefix,
            space_prefix,
            ignore_merges,
            eog,
            lowercase,
            strip_accents,
            max_token_len,
            special_cache,
            chat_template: g.get_str("tokenizer.chat_template").map(str::to_string),
            bpe,
        })
    }

    /// Reads only the metadata of a GGUF file (vocab-only files have no tensors).
    pub fn open(path: &std::path::Path) -> Result<Self> {
        Self::from_gguf(&GgufFile::open(path)?)
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    pub fn text_to_token(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }
}
