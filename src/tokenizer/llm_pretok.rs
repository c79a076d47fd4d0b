//! BPE pre-tokenizers: the regular expressions that split text into words before merging, chosen by the GGUF
//! key `tokenizer.ggml.pre` (llama.cpp's `llm_tokenizer_bpe` session setup).
use anyhow::{Result, bail};
use fancy_regex::Regex;

const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen3.5: letters with their combining marks (`\p{M}`) stay in one word.
const QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The letters DeepSeek LLM's pre-tokenizer groups (llama.cpp's list, escaped: several are canonically equivalent
/// to other characters and would not survive Unicode normalization as literals).
const DEEPSEEK_LLM_LETTERS: &str = "\\s?[A-Za-z\\u{B5}\\u{C0}-\\u{D6}\\u{D8}-\\u{F6}\\u{F8}-\\u{1BA}\\u{1BC}-\\u{1BF}\\u{1C4}-\\u{293}\\u{295}-\\u{2AF}\\u{370}-\\u{373}\\u{376}\\u{377}\\u{37B}-\\u{37D}\\u{37F}\\u{386}\\u{388}-\\u{38A}\\u{38C}\\u{38E}-\\u{3A1}\\u{3A3}-\\u{3F5}\\u{3F7}-\\u{481}\\u{48A}-\\u{52F}\\u{531}-\\u{556}\\u{10A0}-\\u{10C5}\\u{13A0}-\\u{13F5}\\u{13F8}-\\u{13FD}\\u{1C90}-\\u{1CBA}\\u{1CBD}-\\u{1CBF}\\u{1D00}-\\u{1D2B}\\u{1D6B}-\\u{1D77}\\u{1D79}-\\u{1D9A}\\u{1E00}-\\u{1F15}\\u{1F18}-\\u{1F1D}\\u{1F20}-\\u{1F45}\\u{1F48}-\\u{1F4D}\\u{1F50}-\\u{1F57}\\u{1F59}\\u{1F5B}\\u{1F5D}\\u{1F5F}-\\u{1F7D}\\u{1F80}-\\u{1FB4}\\u{1FB6}-\\u{1FBC}\\u{1FBE}\\u{1FC2}-\\u{1FC4}\\u{1FC6}-\\u{1FCC}\\u{1FD0}-\\u{1FD3}\\u{1FD6}-\\u{1FDB}\\u{1FE0}-\\u{1FEC}\\u{1FF2}-\\u{1FF4}\\u{1FF6}-\\u{1FFC}\\u{2102}\\u{2107}\\u{210A}-\\u{2113}\\u{2115}\\u{2119}-\\u{211D}\\u{2124}\\u{2126}\\u{2128}\\u{212A}-\\u{212D}\\u{212F}-\\u{2134}\\u{2139}\\u{213C}-\\u{213F}\\u{2145}-\\u{2149}\\u{214E}\\u{2183}\\u{2184}\\u{2C00}-\\u{2C7B}\\u{2C7E}-\\u{2CE4}\\u{2CEB}-\\u{2CEE}\\u{2CF2}\\u{2CF3}\\u{A640}-\\u{A66D}\\u{A680}-\\u{A69B}\\u{A722}-\\u{A76F}\\u{A771}-\\u{A787}\\u{A78B}-\\u{A78E}\\u{AB70}-\\u{ABBF}\\u{FB00}-\\u{FB06}\\u{FB13}-\\u{FB17}\\u{FF21}-\\u{FF3A}\\u{FF41}-\\u{FF5A}\\u{10400}-\\u{1044F}\\u{104B0}-\\u{104D3}\\u{104D8}-\\u{104FB}\\u{10C80}-\\u{10CB2}\\u{10CC0}-\\u{10CF2}\\u{118A0}-\\u{118DF}\\u{1E900}-\\u{1E943}]+";
/// CJK ideographs and Hangul, kept apart by DeepSeek's pre-tokenizers.
const CJK: &str = "[一-龥ࠀ-一가-퟿]+";

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
    (
        &["qwen2", "deepseek-r1-qwen", "stablelm2", "kormo", "f2llmv2"],
        &[QWEN2],
    ),
    (&["qwen35"], &[QWEN35]),
    (
        &["deepseek-llm"],
        &[
            "[\r\n]",
            DEEPSEEK_LLM_LETTERS,
            "\\s?[!-/:-~！-／：-～‘-‟　-。]+",
            "\\s+$",
            CJK,
            "\\p{N}+",
        ],
    ),
    (
        &["deepseek-coder"],
        &["[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", CJK, r"\p{N}"],
    ),
    (
        &["falcon"],
        &[
            r"[\p{P}\$\+<=>\^~\|`]+",
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
            r"[0-9][0-9][0-9]",
        ],
    ),
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

/// The pre-tokenizer whose one expression is `re`, a Hugging Face `tokenizer.json` split pattern (its
/// case-insensitive contractions written as llama.cpp writes them); None when no entry has it.
pub fn name_for_expression(re: &str) -> Option<&'static str> {
    let re = re.replace(
        "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
        "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
    );
    PRE_TOKENIZERS
        .iter()
        .find(|(_, exprs)| exprs.len() == 1 && exprs[0] == re)
        .map(|(names, _)| names[0])
}

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
