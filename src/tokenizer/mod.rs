//! Tokenizers.
pub mod llama2c;
