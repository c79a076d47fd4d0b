//! Byte-level BPE (GPT-2 family) as llama.cpp's `llm_tokenizer_bpe`: the text is split by the pre-tokenizer's
//! regular expressions (chosen by `tokenizer.ggml.pre`), each word's bytes are mapped to GPT-2's printable code
//! points, and adjacent symbols are merged by merge rank (lowest first, ties leftmost). Symbols that are not tokens
//! fall back to their single-byte tokens.
use crate::tokenizer::llm_vocab::Vocab;
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::OnceLock;

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
