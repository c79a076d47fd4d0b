//! The llama2.c tokenizer file (tok512.bin, tokenizer.bin): int32 max_token_len, then per token an f32 score, an
//! int32 byte length and the bytes. Encoding is SentencePiece-style BPE as llama2.c's `encode`: a dummy-prefix
//! space, code points looked up whole (bytes `<0xNN>` = id + 3 when missing), then repeatedly the adjacent pair
//! whose merge has the best score is merged.
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::Path;

pub const BOS: u32 = 1;
pub const EOS: u32 = 2;

pub struct Llama2cTokenizer {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    lookup: HashMap<Vec<u8>, u32>,
}

impl Llama2cTokenizer {
    pub fn load(path: &Path, vocab_size: usize) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read tokenizer '{}'", path.display()))?;
        let bad = || {
            anyhow::anyhow!(
                "'{}' is truncated or not a llama2.c tokenizer for {vocab_size} tokens",
                path.display()
            )
        };
        let mut off = 4usize;
        let mut pieces = Vec::with_capacity(vocab_size);
        let mut scores = Vec::with_capacity(vocab_size);
        for _ in 0..vocab_size {
            let score =
                f32::from_le_bytes(bytes.get(off..off + 4).ok_or_else(bad)?.try_into().unwrap());
            let len = i32::from_le_bytes(
                bytes
                    .get(off + 4..off + 8)
                    .ok_or_else(bad)?
                    .try_into()
                    .unwrap(),
            );
            if !(0..=1024).contains(&len) {
                return Err(bad());
            }
            let piece = bytes
                .get(off + 8..off + 8 + len as usize)
                .ok_or_else(bad)?
                .to_vec();
            off += 8 + len as usize;
            pieces.push(piece);
            scores.push(score);
        }
        if pieces.len() < 259 {
            bail!(
                "'{}': a llama2.c vocabulary needs the 256 byte tokens at ids 3..258",
                path.display()
            );
        }
        let lookup = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| (p.clone(), i as u32))
            .collect();
        Ok(Self {
            pieces,
            scores,
            lookup,
        })
    }

    /// The stored piece and score of `id` (for conversion to other formats).
    pub fn raw(&self, id: u32) -> (&[u8], f32) {
        let i = id as usize;
        (
            self.pieces.get(i).map_or(&[][..], |p| &p[..]),
            self.scores.get(i).copied().unwrap_or(0.0),
        )
    }

    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// Token ids for `text` (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids: Vec<u32> = Vec::new();
        if !text.is_empty()
            && let Some(&sp) = self.lookup.get(b" ".as_slice())
        {
            ids.push(sp);
        }
        for ch in text.chars() {
            let mut buf = [0u8; 4];
            let s = ch.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(s) {
                Some(&id) => ids.push(id),
                None => ids.extend(s.iter().map(|&b| b as u32 + 3)),
            }
        }
        loop {
            let mut best: Option<(f32, usize, u32)> = None;
            for i in 0..ids.len().saturating_sub(1) {
                let mut merged = self.pieces[ids[i] as usize].clone();
                merged.extend_from_slice(&self.pieces[ids[i + 1] as usize]);
                if let Some(&id) = self.lookup.get(&merged) {
                    let score = self.scores[id as usize];
                    if best.is_none_or(|(s, _, _)| score > s) {
                        best = Some((score, i, id));
                    }
                }
            }
            let Some((_, i, id)) = best else { break };
            ids[i] = id;
            ids.remove(i + 1);
        }
        ids
    }

    /// The bytes of one token as it continues after `prev` (the first piece after BOS loses its leading space;
    /// `<0xNN>` pieces are raw bytes).
    pub fn piece_bytes(&self, prev: Option<u32>, id: u32) -> Vec<u8> {
        let Some(p) = self.pieces.get(id as usize) else {
            return Vec::new();
        };
        let p = if prev == Some(BOS) && p.first() == Some(&b' ') {
            &p[1..]
        } else {
            &p[..]
        };
        if p.len() == 6
            && p.starts_with(b"<0x")
            && p.ends_with(b">")
            && let Ok(b) = u8::from_str_radix(std::str::from_utf8(&p[3..5]).unwrap_or(""), 16)
        {
            return vec![b];
        }
        p.to_vec()
    }
}
