//! `trt-diff convert llama2c MODEL.bin --tokenizer TOK.bin --out MODEL.gguf`.
use crate::cli::ConvertFormat;
use anyhow::Result;
use std::path::Path;

pub fn run(format: ConvertFormat, input: &Path, tokenizer: &Path, out: &Path) -> Result<()> {
    match format {
        ConvertFormat::Llama2c => {
            let n = crate::pipelines::llm_convert::llama2c_to_gguf(input, tokenizer, out)?;
            println!("wrote {} ({n} tensors)", out.display());
        }
    }
    Ok(())
}
