//! Writes the MLP model in one precision as ONNX: `cargo run --example write_mlp -- OUT.onnx [f32|f16|fp8|fp8-per-channel|int4|nvfp4]
//! [--dynamic] [--hidden N --layers N]`. Used by scripts/main-job.sh and the build benchmark.
use anyhow::{Context, Result, bail};
use trt_diff::models::mlp::MlpConfig;
use trt_diff::onnx::{Dim, SaveOptions, save};
use trt_diff::quant::LinearPrecision;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out = args.first().context(
        "usage: write_mlp OUT.onnx [f32|f16|fp8|fp8-per-channel|int4|nvfp4] [--dynamic] [--hidden N] [--layers N]",
    )?;
    let mut cfg = MlpConfig::default();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "f32" => cfg.precision = LinearPrecision::F32,
            "f16" => cfg.precision = LinearPrecision::F16,
            "fp8" => cfg.precision = LinearPrecision::Fp8,
            "nvfp4" => cfg.precision = LinearPrecision::Nvfp4,
            "fp8-per-channel" => cfg.precision = LinearPrecision::Fp8PerChannel,
            "int4" => cfg.precision = LinearPrecision::Int4 { block: 32 },
            "--dynamic" => cfg.batch = Dim::Sym("batch".into()),
            "--hidden" | "--layers" => {
                let v: usize = args.get(i + 1).context("missing value")?.parse()?;
                if args[i] == "--hidden" {
                    cfg.hidden = v
                } else {
                    cfg.layers = v
                }
                i += 1;
            }
            other => bail!("unknown argument '{other}'"),
        }
        i += 1;
    }
    let bytes = save(cfg.graph()?, out.as_ref(), &SaveOptions::default())?;
    println!(
        "wrote {out} ({bytes} bytes, {:?}, weights {} bytes as f32)",
        cfg.precision,
        cfg.weight_bytes()
    );
    Ok(())
}
