//! Checkpoint readers. Each maps its format's tensors onto the names the model files use.
pub mod gguf;
pub mod gguf_model;
pub mod gguf_write;
pub mod hf;
pub mod limits;
pub mod llama2c;
pub mod llm_config;
pub mod lora;
pub mod prequant;
pub mod safetensors_file;
