//! T5 (v1.1 / XXL) SentencePiece Unigram tokenizer from a Hugging Face `tokenizer.json`. Hugging Face's own
//! `tokenizers` crate (pure Rust) runs it: the file's Precompiled normalizer (SentencePiece's NFKC-like char map,
//! a double-array trie) and Metaspace pre-tokenizer are exactly reproduced only there, and the Viterbi search over
//! the 32,100 pieces is the same code as the Python package that made the reference ids.
use anyhow::{Result, anyhow, bail};
use std::path::Path;

pub const PAD: u32 = 0;
pub const EOS: u32 = 1;
/// Longest sequence the Flux pipelines feed T5 (diffusers' `max_sequence_length` limit).
pub const MAX_LEN: usize = 512;

pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl T5Tokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            anyhow!(
                "cannot read the T5 tokenizer '{}': {e} (expected a Hugging Face tokenizer.json with a Unigram \
                 model, e.g. t5_tokenizer.json)",
                path.display()
            )
        })?;
        if inner.token_to_id("</s>") != Some(EOS) {
            bail!(
                "'{}' is not a T5 tokenizer: '</s>' is not id {EOS}",
                path.display()
            );
        }
        Ok(Self { inner })
    }

    /// Ids of `text` followed by `</s>`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("T5 tokenizer failed on the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `encode` truncated to `max_len` (keeping `</s>` last) and padded with `<pad>`; also the number of content
    /// tokens that truncation dropped.
    pub fn encode_padded(&self, text: &str, max_len: usize) -> Result<(Vec<u32>, usize)> {
        let mut ids = self.encode(text)?;
        ids.pop(); // </s>
        let keep = ids.len().min(max_len.saturating_sub(1));
        let dropped = ids.len() - keep;
        ids.truncate(keep);
        ids.push(EOS);
        ids.resize(max_len, PAD);
        Ok((ids, dropped))
    }
}
