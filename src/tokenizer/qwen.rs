//! Qwen2/Qwen3 byte-level BPE tokenizer from a Hugging Face `tokenizer.json` (Z-Image's text encoder), run by Hugging
//! Face's own `tokenizers` crate: its NFC normalizer, Qwen2's split regex and the byte-level BPE merges are the same
//! code as the Python package behind transformers' Qwen2 tokenizers, and the chat markers (`<|im_start|>`, ...)
//! are its added tokens.
use anyhow::{Result, anyhow, bail};
use std::path::Path;

pub struct QwenTokenizer {
    inner: tokenizers::Tokenizer,
}

impl QwenTokenizer {
    pub fn load(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| {
            anyhow!(
                "cannot read the Qwen tokenizer '{}': {e} (expected the tokenizer.json of the model's tokenizer/ \
                 folder)",
                path.display()
            )
        })?;
        for marker in ["<|im_start|>", "<|im_end|>"] {
            if inner.token_to_id(marker).is_none() {
                bail!(
                    "'{}' is not a Qwen chat tokenizer: it has no '{marker}' token",
                    path.display()
                );
            }
        }
        Ok(Self { inner })
    }

    /// Ids of `text` (special-token strings in it become those tokens; Qwen adds no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow!("the Qwen tokenizer failed on the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id of a token given by its text (e.g. the padding token `<|endoftext|>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
