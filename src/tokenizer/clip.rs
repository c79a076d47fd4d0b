//! CLIP's byte-level BPE (openai/CLIP `simple_tokenizer.py`, the tokenizer of CLIP-L/G in SD, SDXL, SD3, Flux)
//! from `bpe_simple_vocab_16e6.txt.gz`. Text is normalized like Hugging Face's fast CLIPTokenizer (NFC, runs of
//! whitespace to one space, trimmed, lowercased; no ftfy/HTML unescaping), split by CLIP's regex, each word's bytes
//! mapped to printable code points, the last symbol marked `</w>`, and adjacent pairs merged by rank.
use anyhow::{Context, Result, bail};
use regex::Regex;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use unicode_normalization::UnicodeNormalization;

pub const BOS: u32 = 49406;
pub const EOS: u32 = 49407;
/// Sequence length of every CLIP text encoder.
pub const MAX_LEN: usize = 77;
/// Merges used by CLIP: the file holds more, the vocabulary is 256 bytes x2 + these + 2 specials = 49408.
const N_MERGES: usize = 49152 - 256 - 2;

pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    byte_char: [char; 256],
    pattern: Regex,
    /// Id padding the sequence to 77: `<|endoftext|>` for CLIP-L as Flux and SD1 use it, `!` (0) for SDXL's CLIP-G.
    pub pad: u32,
}

/// GPT-2's reversible byte -> printable code point table.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    table
}

impl ClipTokenizer {
    /// Reads openai's gzip'd merges file (`bpe_simple_vocab_16e6.txt.gz`), Hugging Face's plain `merges.txt` (the
    /// same lines) or a fast tokenizer's `tokenizer.json` (all transformers 5 saves).
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot open the CLIP vocabulary '{}'", path.display()))?;
        let mut text = String::new();
        let bad = || {
            format!(
                "'{}' is not a CLIP merges file (bpe_simple_vocab_16e6.txt.gz or merges.txt)",
                path.display()
            )
        };
        if bytes.trim_ascii_start().starts_with(b"{") {
            return Self::from_tokenizer_json(&bytes).with_context(|| {
                format!(
                    "'{}' is not a CLIP tokenizer.json (a BPE model with CLIP's merges)",
                    path.display()
                )
            });
        }
        if bytes.starts_with(&[0x1f, 0x8b]) {
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .with_context(bad)?;
        } else {
            text = String::from_utf8(bytes).ok().with_context(bad)?;
        }
        Self::from_merges(&text).with_context(|| format!("in '{}'", path.display()))
    }

    /// A Hugging Face `tokenizer.json`: its BPE merges (as "a b" strings or [a, b] pairs) define the tokenizer;
    /// its vocabulary must give every token the id CLIP's construction gives it.
    pub fn from_tokenizer_json(bytes: &[u8]) -> Result<Self> {
        #[derive(serde::Deserialize)]
        struct File {
            model: Model,
        }
        #[derive(serde::Deserialize)]
        struct Model {
            #[serde(rename = "type")]
            kind: Option<String>,
            vocab: HashMap<String, u32>,
            merges: Vec<Merge>,
        }
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Merge {
            Line(String),
            Pair(String, String),
        }
        let f: File = serde_json::from_slice(bytes)?;
        if f.model.kind.as_deref().is_some_and(|k| k != "BPE") {
            bail!("its model is {:?}, not BPE", f.model.kind);
        }
        let mut text = String::from("#version: tokenizer.json\n");
        for m in &f.model.merges {
            match m {
                Merge::Line(l) => text.push_str(l),
                Merge::Pair(a, b) => {
                    text.push_str(a);
                    text.push(' ');
                    text.push_str(b);
                }
            }
            text.push('\n');
        }
        let tok = Self::from_merges(&text)?;
        if let Some((t, id)) = f
            .model
            .vocab
            .iter()
            .find(|(t, id)| tok.encoder.get(*t) != Some(*id))
        {
            bail!(
                "its vocabulary gives '{t}' id {id}, CLIP's merges give {:?}: not CLIP's vocabulary",
                tok.encoder.get(t)
            );
        }
        Ok(tok)
    }

    pub fn from_merges(text: &str) -> Result<Self> {
        let lines: Vec<&str> = text.lines().skip(1).take(N_MERGES).collect();
        if lines.len() != N_MERGES {
            bail!(
                "{} merges found, CLIP needs {N_MERGES}: the file is truncated",
                lines.len()
            );
        }
        let byte_char = bytes_to_unicode();
        // The reference lists the printable bytes first, then the remapped ones (the table's insertion order).
        let mut order: Vec<char> = byte_char.to_vec();
        order.sort_by_key(|&c| c as u32);
        let mut vocab: Vec<String> = order.iter().map(|c| c.to_string()).collect();
        vocab.extend(order.iter().map(|c| format!("{c}</w>")));
        let mut ranks = HashMap::with_capacity(N_MERGES);
        for (i, line) in lines.iter().enumerate() {
            let Some((a, b)) = line.split_once(' ') else {
                bail!("merge line {} '{line}' is not two symbols", i + 2);
            };
            vocab.push(format!("{a}{b}"));
            ranks.insert((a.to_string(), b.to_string()), i);
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let encoder = vocab
            .into_iter()
            .enumerate()
            .map(|(i, s)| (s, i as u32))
            .collect();
        let pattern = Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )?;
        Ok(Self {
            encoder,
            ranks,
            byte_char,
            pattern,
            pad: EOS,
        })
    }

    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<String> = word
            .bytes()
            .map(|b| self.byte_char[b as usize].to_string())
            .collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str("</w>");
        }
        loop {
            // The lowest-ranked adjacent pair; all its occurrences merge at once, as the reference does.
            let best = symbols
                .windows(2)
                .filter_map(|w| self.ranks.get(&(w[0].clone(), w[1].clone())))
                .min();
            let Some(&rank) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len()
                    && self
                        .ranks
                        .get(&(symbols[i].clone(), symbols[i + 1].clone()))
                        == Some(&rank)
                {
                    merged.push(format!("{}{}", symbols[i], symbols[i + 1]));
                    i += 2;
                } else {
                    merged.push(symbols[i].clone());
                    i += 1;
                }
            }
            symbols = merged;
        }
        // Every symbol is in the vocabulary: single bytes, byte + </w>, and merge results.
        out.extend(symbols.iter().filter_map(|s| self.encoder.get(s).copied()));
    }

    /// Ids of `text` without BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let norm: String = text.nfc().collect();
        let norm = norm.split_whitespace().collect::<Vec<_>>().join(" ");
        let norm = norm.to_lowercase();
        let mut ids = Vec::new();
        for m in self.pattern.find_iter(&norm) {
            match m.as_str() {
                "<|startoftext|>" => ids.push(BOS),
                "<|endoftext|>" => ids.push(EOS),
                w => self.bpe(w, &mut ids),
            }
        }
        ids
    }

    /// BOS + ids + EOS, truncated to `max_len` (EOS kept last) and padded with `self.pad`. Also returns how many
    /// content tokens were dropped by truncation.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> (Vec<u32>, usize) {
        let ids = self.encode(text);
        let keep = ids.len().min(max_len.saturating_sub(2));
        let mut out = Vec::with_capacity(max_len);
        out.push(BOS);
        out.extend_from_slice(&ids[..keep]);
        out.push(EOS);
        out.resize(max_len, self.pad);
        (out, ids.len() - keep)
    }
}
