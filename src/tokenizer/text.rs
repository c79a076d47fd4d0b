//! What text generation needs of a tokenizer, whichever kind it is (GGUF vocabularies, llama2.c files).
use anyhow::{Result, bail};
use std::path::Path;

/// What the generator needs of a tokenizer.
pub trait TextTokenizer {
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Bytes of `id` as it follows `prev`.
    fn piece_bytes(&self, prev: Option<u32>, id: u32) -> Vec<u8>;
    fn bos(&self) -> Option<u32>;
    fn eos(&self) -> Option<u32>;
    /// Whether `id` ends generation (EOS, and end-of-turn tokens of chat models).
    fn is_end(&self, id: u32) -> bool {
        Some(id) == self.eos()
    }
    /// The Jinja chat template stored with the tokenizer, if any.
    fn chat_template(&self) -> Option<&str> {
        None
    }
    /// Text of a token for templates (BOS/EOS strings).
    fn token_text(&self, _id: u32) -> Option<&str> {
        None
    }
    /// Tokens of a rendered chat prompt: special tokens written in it count as those tokens, and BOS is added
    /// only when the template did not write it.
    fn encode_chat(&self, text: &str) -> Vec<u32> {
        let mut t: Vec<u32> = self.bos().into_iter().collect();
        t.extend(self.encode(text));
        t
    }
}

/// Opens the tokenizer stored beside an engine: a GGUF vocabulary (`.gguf`) or a llama2.c tokenizer file.
pub fn load_tokenizer(path: &Path, vocab_size: usize) -> Result<Box<dyn TextTokenizer + Send>> {
    if crate::weights::gguf::looks_like_gguf(path) {
        let v = super::llm_vocab::Vocab::open(path)?;
        if v.n_tokens() > vocab_size {
            bail!(
                "tokenizer '{}' has {} tokens but the model only {}; rebuild the engine",
                path.display(),
                v.n_tokens(),
                vocab_size
            );
        }
        return Ok(Box::new(v));
    }
    Ok(Box::new(super::llama2c::Llama2cTokenizer::load(
        path, vocab_size,
    )?))
}

impl TextTokenizer for super::llama2c::Llama2cTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode(text)
    }
    fn piece_bytes(&self, prev: Option<u32>, id: u32) -> Vec<u8> {
        self.piece_bytes(prev, id)
    }
    fn bos(&self) -> Option<u32> {
        Some(super::llama2c::BOS)
    }
    fn eos(&self) -> Option<u32> {
        Some(super::llama2c::EOS)
    }
    /// llama2.c's run.c stops at BOS: its models separate stories with BOS and never emit EOS.
    fn is_end(&self, id: u32) -> bool {
        id == super::llama2c::BOS || id == super::llama2c::EOS
    }
}
