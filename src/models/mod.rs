//! Models: plain config structs and one function each that emits the ONNX graph.
pub mod flux;
pub mod llama;
pub mod mlp;
pub mod ops;
pub mod taesd;
pub mod vae;
