//! trt-diff: builds NVIDIA TensorRT engines from ONNX graphs (and, as the project grows, from diffusion and LLM
//! checkpoints) and runs their pipelines. The library does the work; the `trt-diff` binary is a thin CLI on it.
pub mod backend;
pub mod cli;
pub mod commands;
pub mod cuda;
pub mod fsutil;
pub mod manifest;
pub mod models;
pub mod onnx;
pub mod out;
pub mod pipelines;
pub mod quant;
pub mod samplers;
pub mod server;
pub mod tokenizer;
pub mod trt;
pub mod weights;
