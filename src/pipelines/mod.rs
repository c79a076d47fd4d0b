//! Pipelines: orchestration of engines, tokenizers and samplers.
pub mod chat;
pub mod flux;
pub mod flux_build;
pub mod flux_image;
pub mod flux_run;
pub mod kv_cache;
pub mod llm;
pub mod llm_build;
