//! `build`'s per-layer precision flags (`--precision auto`, `--policy`).
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct AutoArgs {
    /// --precision auto's budget on held-out prompts: images, the PSNR (dB) of the final image against the
    /// unquantized model's (e.g. 30); LLMs, the mean next-token KL divergence in nats (e.g. 0.02).
    #[arg(long, value_name = "Q")]
    pub quality: Option<f64>,
    /// Per-layer formats from an earlier --precision auto (its NAME.policy.toml), instead of a new search.
    #[arg(long, value_name = "FILE")]
    pub policy: Option<PathBuf>,
    /// --precision auto: a prompt its choice is verified on (repeatable; default: the recipe's held-out ones).
    #[arg(long, value_name = "TEXT")]
    pub heldout_prompt: Vec<String>,
    /// --precision auto on image models: measure and choose only the layers matching this glob (repeatable, e.g.
    /// 'transformer_blocks.1*'), the others kept: a sample of a large model's layers, for a shorter search.
    #[arg(long, value_name = "GLOB")]
    pub auto_layers: Vec<String>,
}
