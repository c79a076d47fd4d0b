//! Checkpoint readers. Each maps its format's tensors onto the names the model files use.
pub mod gguf;
pub mod llama2c;
pub mod safetensors_file;
