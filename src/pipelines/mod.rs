//! Pipelines: orchestration of engines, tokenizers and samplers.
pub mod chat;
pub mod llm;
pub mod llm_build;
