//! Tokenizers.
pub mod clip;
pub mod hf_vocab;
pub mod llama2c;
pub mod llm_bpe;
pub mod llm_pretok;
pub mod llm_spm;
pub mod llm_tokenize;
pub mod llm_vocab;
pub mod llm_wpm;
pub mod qwen;
pub mod t5;
pub mod text;
