//! Byte-level BPE (GPT-2 family) as llama.cpp's `llm_tokenizer_bpe`: the text is split by the pre-tokenizer's
//! regular expressions (chosen by `tokenizer.ggml.pre`), each word's bytes are mapped to GPT-2's printable code
//! points, and adjacent symbols are merged by merge rank (lowest first, ties leftmost). Symbols that are not tokens
//! fall back to their single-byte tokens.
use crate::tokenizer::llm_vocab::Vocab;
use anyhow::{Result, bail};
use fancy_regex::Regex;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::OnceLock;

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

/// GPT-2's `bytes_to_unicode`: printable bytes map to themselves, the others to U+0100 onwards, in byte order.
fn byte_chars() -> &'static ([char; 256], std::collections::HashMap<char, u8>) {
    static T: OnceLock<([char; 256], std::collections::HashMap<char, u8>)> = OnceLock::new();
    T.get_or_init(|| {
        let mut map = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..256u32 {
            let printable = (0x21..=0x7E).contains(&b)
                || (0xA1..=0xAC).contains(&b)
                || (0xAE..=0xFF).contains(&b);
            map[b as usize] = if printable {
                char::from_u32(b).unwrap_or('\0')
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap_or('\0')
            };
        }
        let inv = map.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        (map, inv)
    })
}

fn byte_encode(word: &str) -> String {
    let map = &byte_chars().0;
    word.bytes().map(|b| map[b as usize]).collect()
}

/// A token's text back to bytes (characters outside the mapping are kept as UTF-8).
pub fn decode_text(text: &str) -> Vec<u8> {
    let inv = &byte_chars().1;
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match inv.get(&c) {
            Some(&b) => out.push(b),
            None => {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            }
        }
    }
    out
}

struct Bigram {
    left: usize,
    right: usize,
    rank: u32,
    text: String,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: lowest rank first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then_with(|| o.left.cmp(&self.left))
    }
}

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

fn add_bigram(
    vocab: &Vocab,
    word: &str,
    syms: &[Sym],
    q: &mut BinaryHeap<Bigram>,
    l: Option<usize>,
    r: Option<usize>,
) {
    let (Some(l), Some(r)) = (l, r) else { return };
    let a = &word[syms[l].start..syms[l].start + syms[l].len];
    let b = &word[syms[r].start..syms[r].start + syms[r].len];
    if let Some(&rank) = vocab.bpe_ranks.get(&(a.to_string(), b.to_string())) {
        q.push(Bigram {
            left: l,
            right: r,
            rank,
            text: format!("{a}{b}"),
        });
    }
}

/// Appends the tokens of one raw-text fragment.
pub fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    let Some(pre) = &vocab.bpe else { return };
    for raw in pre.split(text) {
        let word = byte_encode(raw);
        if vocab.ignore_merges
            && let Some(id) = vocab.text_to_token(&word)
        {
            out.push(id);
            continue;
        }
        let mut syms: Vec<Sym> = word
            .char_indices()
            .enumerate()
            .map(|(i, (start, c))| Sym {
                start,
                len: c.len_utf8(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
            })
            .collect();
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }
        let mut q = BinaryHeap::new();
        for i in 1..syms.len() {
            add_bigram(vocab, &word, &syms, &mut q, Some(i - 1), Some(i));
        }
        while let Some(b) = q.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 {
                continue;
            }
            let cur = &word[syms[l].start..syms[r].start + syms[r].len];
            if syms[l].start + syms[l].len != syms[r].start || cur != b.text {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            let rn = syms[r].next;
            syms[l].next = rn;
            if let Some(n) = rn {
                syms[n].prev = Some(l);
            }
            let lp = syms[l].prev;
            add_bigram(vocab, &word, &syms, &mut q, lp, Some(l));
            add_bigram(vocab, &word, &syms, &mut q, Some(l), rn);
        }
        for s in syms.iter().filter(|s| s.len > 0) {
            let piece = &word[s.start..s.start + s.len];
            match vocab.text_to_token(piece) {
                Some(id) => out.push(id),
                // As llama.cpp: each byte of the symbol as a one-byte token (found only for ASCII).
                None => out.extend(piece.bytes().filter_map(|b| {
                    std::str::from_utf8(&[b])
                        .ok()
                        .and_then(|c| vocab.text_to_token(c))
                })),
            }
        }
    }
}
