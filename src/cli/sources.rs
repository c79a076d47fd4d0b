//! Where the parts an image model's folder or file lacks come from (`build`, `export`).
use clap::Args;
use std::path::PathBuf;

/// Where the parts a model folder or file lacks come from (image models).
#[derive(Args, Debug, Clone, Default)]
pub struct SourceArgs {
    /// CLIP merges (merges.txt or bpe_simple_vocab_16e6.txt.gz) when the model has no tokenizer/ (single files).
    #[arg(long, value_name = "FILE")]
    pub clip_tokenizer: Option<PathBuf>,
    /// T5 tokenizer.json when the model has no T5 tokenizer folder (single files).
    #[arg(long, value_name = "FILE")]
    pub t5_tokenizer: Option<PathBuf>,
    /// SD3.5 single files: a diffusers folder whose component configs describe the file's parts (diffusers'
    /// from_single_file(config=...)); without it they are read off the weights.
    #[arg(long, value_name = "DIR")]
    pub config: Option<PathBuf>,
}
