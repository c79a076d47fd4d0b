//! BPE pre-tokenizers: the regular expressions that split text into words before merging, chosen by the GGUF
//! key `tokenizer.ggml.pre` (llama.cpp's `llm_tokenizer_bpe` session setup).
use anyhow::{Result, bail};
use fancy_regex::Regex;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokenizer names (`tokenizer.ggml.pre`) and their regular expressions, applied in order.
const PRE_TOKENIZERS: &[(&[&str], &[&str])] = &[
    (
        &["gpt-2", "phi-2", "mpt", "olmo", "jais", "roberta-bpe"],
        &[GPT2],
    ),
    (
        &[
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "dbrx",
            "smaug-bpe",
        ],
        &[LLAMA3],
    ),
    (&["qwen2", "deepseek-r1-qwen", "stablelm2"], &[QWEN2]),
    (
        &["starcoder", "refact", "command-r", "smollm"],
        &[r"\p{N}", GPT2],
    ),
    (
        &["default"],
        &[
            r"[\p{P}\$\+<=>\^~\|]+",
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            r"\p{N}+",
            r"[0-9][0-9][0-9]",
        ],
    ),
];

pub struct PreTokenizer {
    regexes: Vec<Regex>,
}

impl PreTokenizer {
    pub fn for_name(name: &str) -> Result<Self> {
        let Some((_, exprs)) = PRE_TOKENIZERS
            .iter()
            .find(|(names, _)| names.contains(&name))
        else {
            let known: Vec<&str> = PRE_TOKENIZERS
                .iter()
                .flat_map(|(n, _)| n.iter().copied())
                .collect();
            bail!(
                "BPE pre-tokenizer '{name}' is not supported (supported: {})",
                known.join(", ")
            );
        };
        let regexes = exprs
            .iter()
            .map(|e| {
                Regex::new(e).map_err(|err| anyhow::anyhow!("pre-tokenizer regex {e:?}: {err}"))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { regexes })
    }

    /// Splits `text` into words: each regex splits every piece further; text between matches stays a piece.
    pub fn split<'a>(&self, text: &'a str) -> Vec<&'a str> {
        let mut pieces = vec![text];
        for re in &self.regexes {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for p in pieces {
                let mut last = 0;
                let mut pos = 0;
                while pos < p.len() {
                    let m = match re.find_from_pos(p, pos) {
                        Ok(Some(m)) => m,
                        // No match or a backtracking limit: the rest stays one piece.
                        _ => break,
                    };
                    if m.end() == m.start() {
                        pos = m.end() + p[m.end()..].chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    if m.start() > last {
                        next.push(&p[last..m.start()]);
                    }
                    next.push(m.as_str());
                    last = m.end();
                    pos = m.end();
                }
                if last < p.len() {
                    next.push(&p[last..]);
                }
            }
            pieces = next;
        }
        pieces
    }
}
