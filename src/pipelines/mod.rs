//! Pipelines: orchestration of engines, tokenizers and samplers.
pub mod llm;
pub mod llm_build;
pub mod flux;
pub mod flux_image;
