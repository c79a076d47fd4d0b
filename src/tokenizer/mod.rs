//! Tokenizers.
pub mod clip;
pub mod llama2c;
pub mod t5;
