//! Pipelines: orchestration of engines, tokenizers and samplers.
pub mod llm;
pub mod llm_build;
