//! Models: plain config structs and one function each that emits the ONNX graph.
pub mod clip;
pub mod flux;
pub mod flux2;
pub mod llama;
pub mod llama_cpu;
pub mod mlp;
pub mod ops;
pub mod qdq;
pub mod sd3;
pub mod t5;
pub mod taesd;
pub mod unet;
pub mod unet_lora;
pub mod vae;
pub mod z_image;
