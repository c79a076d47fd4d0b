//! Quality of built bundles against an unquantized one on held-out prompts, for scripts/bench/precision_auto_table.sh:
//! `precision_quality image|llm REFERENCE ENGINE... [--tokenizer tok512.bin] [--prompt P ...]`.
//! Images (Flux, SD bundles): the worst PSNR (dB) of the final 8-bit images over the prompts, rendered as
//! `--precision auto` verifies (2 steps, 32 px, seed 1000 + i, no guidance). LLMs (decoder ONNX): the mean KL
//! (nats) of next-token distributions over every prefix of each prompt. One line per engine: `ENGINE VALUE`.
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use trt_diff::backend::BackendChoice;
use trt_diff::manifest::{EngineFile, Pipeline};
use trt_diff::pipelines::image::ImageRequest;

fn render(engine: &Path, prompts: &[String]) -> Result<Vec<Vec<u8>>> {
    let ef = EngineFile::open(engine)?;
    let arch = match ef.pipeline() {
        Some(Pipeline::Image(b)) => b.arch.clone(),
        _ => bail!("{} is not an image bundle", engine.display()),
    };
    let req = |i: usize, p: &String| ImageRequest {
        prompt: p.clone(),
        steps: Some(2),
        seed: 1000 + i as u64,
        width: Some(32),
        height: Some(32),
        batch: 1,
        cfg: 1.0,
        strength: 1.0,
        ..Default::default()
    };
    let mut out = Vec::new();
    if arch.starts_with("flux") {
        let mut pipe = trt_diff::pipelines::flux::open_pipeline(&ef, BackendChoice::Cpu)?;
        for (i, p) in prompts.iter().enumerate() {
            out.push(pipe.generate(&req(i, p), &mut |_| Ok(()))?.images.remove(0));
        }
    } else {
        let mut pipe = trt_diff::pipelines::sd::open_pipeline(&ef, BackendChoice::Cpu)?;
        for (i, p) in prompts.iter().enumerate() {
            out.push(pipe.generate(&req(i, p), &mut |_| Ok(()))?.images.remove(0));
        }
    }
    Ok(out)
}

fn psnr(a: &[Vec<u8>], b: &[Vec<u8>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let mse = trt_diff::pipelines::auto_precision::image_mse(x, y);
            -10.0 * mse.max(1e-30).log10()
        })
        .fold(f64::INFINITY, f64::min)
}

fn log_probs(e: &mut dyn trt_diff::backend::Engine, ids: &[i64]) -> Result<Vec<f64>> {
    let out = trt_diff::pipelines::auto_precision::prefill(e, ids)?;
    let l = out
        .iter()
        .find(|(n, _)| n == "logits")
        .and_then(|(_, t)| t.to_f64())
        .context("no logits output")?;
    let m = l.iter().fold(f64::NEG_INFINITY, |a, b| a.max(*b));
    let lse = m + l.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
    Ok(l.iter().map(|v| v - lse).collect())
}

fn kl(engine: &Path, reference: &Path, tok: &Path, prompts: &[String]) -> Result<f64> {
    let tok = trt_diff::tokenizer::llama2c::Llama2cTokenizer::load(tok, 512)?;
    let open = |p: &Path| {
        trt_diff::pipelines::engines::open_file(
            &EngineFile::open(p)?,
            BackendChoice::Cpu,
            &Default::default(),
        )
    };
    let (mut q, mut r) = (open(engine)?, open(reference)?);
    let mut total = 0.0;
    for p in prompts {
        let mut ids = vec![1i64];
        ids.extend(tok.encode(p).iter().map(|&t| t as i64));
        let mut sum = 0.0;
        for t in 1..=ids.len() {
            let a = log_probs(r.as_mut(), &ids[..t])?;
            let b = log_probs(q.as_mut(), &ids[..t])?;
            sum += a
                .iter()
                .zip(&b)
                .map(|(x, y)| x.exp() * (x - y))
                .sum::<f64>();
        }
        total += sum / ids.len() as f64;
    }
    Ok(total / prompts.len().max(1) as f64)
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let kind = args
        .next()
        .context("usage: precision_quality image|llm REFERENCE ENGINE...")?;
    let reference = PathBuf::from(args.next().context("no reference")?);
    let (mut engines, mut prompts, mut tok) = (Vec::new(), Vec::new(), None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--prompt" => prompts.push(args.next().context("--prompt needs a value")?),
            "--tokenizer" => {
                tok = Some(PathBuf::from(
                    args.next().context("--tokenizer needs a value")?,
                ))
            }
            _ => engines.push(PathBuf::from(a)),
        }
    }
    if prompts.is_empty() {
        bail!("give the held-out prompts with --prompt");
    }
    match kind.as_str() {
        "image" => {
            let want = render(&reference, &prompts)?;
            for e in &engines {
                println!("{} {:.2}", e.display(), psnr(&render(e, &prompts)?, &want));
            }
        }
        "llm" => {
            let tok = tok.context("llm needs --tokenizer")?;
            for e in &engines {
                println!("{} {:.5}", e.display(), kl(e, &reference, &tok, &prompts)?);
            }
        }
        other => bail!("unknown kind '{other}': image or llm"),
    }
    Ok(())
}
