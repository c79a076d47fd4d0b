//! `trt-diff quantize IN.safetensors --format F --out OUT.safetensors`: checkpoint quantization in bitsandbytes /
//! ModelOpt / ComfyUI layouts.
use crate::cli::QuantizeArgs;
use crate::fsutil::human_bytes;
use anyhow::Result;

pub fn run(a: QuantizeArgs) -> Result<()> {
    let r = crate::quant::checkpoint::quantize_file(&crate::quant::checkpoint::QuantizeOptions {
        input: a.input,
        output: a.out.clone(),
        format: a.format,
        layout: a.layout,
        block_size: a.block_size,
        double_quant: a.double_quant,
        include: a.include,
        exclude: a.exclude,
        progress: !a.no_progress,
    })?;
    println!(
        "wrote {} ({}): {} tensors quantized, {} passed through, from {} in {:.2}s",
        a.out.display(),
        human_bytes(r.output_bytes),
        r.quantized,
        r.passed_through,
        human_bytes(r.input_bytes),
        r.seconds
    );
    Ok(())
}
