//! `trt-diff generate --engine E --prompt ...`: text from an LLM engine (streamed to stdout), or images from an
//! image bundle, dispatched on the arch its manifest records (one line per family). Images are written one PNG
//! each (`out.png`, or `out-0.png`, `out-1.png`, ... for a batch) with the parameters in a `parameters` tEXt chunk.
use crate::cli::GenerateArgs;
use crate::manifest::{EngineFile, ImageBundle, Pipeline};
use crate::pipelines::engines::{Backend, resolve};
use crate::pipelines::image::{ImageGenerator, ImageModel, ImagePipeline, ImageRequest};
use crate::pipelines::image_io::write_png;
use crate::pipelines::sd::SdModel;
use crate::pipelines::{Arch, Family};
use anyhow::{Result, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub fn run(a: GenerateArgs) -> Result<()> {
    let engine = super::open_engine_file(&a.engine)?;
    if let Some(Pipeline::Image(bundle)) = engine.pipeline() {
        return generate_images(&a, &engine, bundle);
    }
    let mut out = std::io::stdout();
    let stats = crate::pipelines::llm::generate_with_engine(
        &engine,
        a.engine.backend,
        &a.prompt,
        &a.sampling,
        |t| {
            out.write_all(t.as_bytes())?;
            out.flush()?;
            Ok(())
        },
    )?;
    println!();
    let per_call = |v: f64| v / stats.decode_calls.max(1) as f64;
    let decode = if stats.decode_calls == 0 {
        String::new()
    } else {
        format!(
            "; per decode step: {:.3} ms in the engine, {:.3} ms outside it, {} bytes copied between host and GPU",
            per_call(stats.decode_engine_seconds) * 1e3,
            per_call(stats.generation_seconds - stats.decode_engine_seconds) * 1e3,
            stats.decode_copied_bytes / stats.decode_calls as u64
        )
    };
    eprintln!(
        "prompt: {} tokens in {:.3}s ({:.1} tok/s); generated: {} tokens in {:.3}s ({:.1} tok/s){}{decode}",
        stats.prompt_tokens,
        stats.prompt_seconds,
        stats.prompt_tokens as f64 / stats.prompt_seconds.max(1e-9),
        stats.generated_tokens,
        stats.generation_seconds,
        stats.generated_tokens as f64 / stats.generation_seconds.max(1e-9),
        if stats.stopped_by_eos {
            ", stopped at end of text"
        } else if stats.stopped_by_stop_string {
            ", stopped at a stop string"
        } else {
            ""
        }
    );
    Ok(())
}

fn generate_images(a: &GenerateArgs, engine: &EngineFile, bundle: &ImageBundle) -> Result<()> {
    let i = &a.image;
    let Some(out) = &i.out else {
        bail!(
            "--out FILE.png is needed: '{}' is an image pipeline",
            engine.path.display()
        );
    };
    if out
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!("--out '{}' must name a .png file", out.display());
    }
    let req = ImageRequest {
        prompt: a.prompt.clone(),
        negative_prompt: i.negative_prompt.clone(),
        steps: i.steps,
        sampler: i.sampler.clone(),
        scheduler: i.scheduler.clone(),
        seed: a.sampling.seed,
        width: i.width,
        height: i.height,
        guidance: i.guidance,
        cfg: i.cfg.unwrap_or(0.0),
        batch: i.batch,
        init_image: i.init_image.clone(),
        strength: i.strength,
        mask: i.mask.clone(),
        preview: i.preview.clone(),
        controls: controls(i)?,
        skip_layer_guidance: i.slg_layers.clone(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let backend = resolve(a.engine.backend, engine)?;
    let arch = Arch::parse(&bundle.arch)?;
    if i.refiner.is_some() && arch.family() != Family::Sd {
        bail!(
            "--refiner hands SDXL latents to a refiner bundle; '{}' is {arch}",
            engine.path.display()
        );
    }
    let r = match &i.refiner {
        Some(_) if !i.lora.is_empty() => {
            bail!(
                "--lora with --refiner is not supported: the LoRA would apply to one of the two models"
            )
        }
        Some(refiner) => {
            let base = ImagePipeline::new(SdModel::open(engine, bundle, backend)?);
            refine(a, base, refiner, req, out)?
        }
        None => {
            let mut pipe = crate::pipelines::open_image_pipeline(engine, backend)?;
            if !i.lora.is_empty() {
                let t = Instant::now();
                pipe.set_loras(&crate::weights::lora::open_all(&i.lora)?)?;
                eprintln!(
                    "applied {} LoRA(s) in {:.3} s",
                    i.lora.len(),
                    t.elapsed().as_secs_f64()
                );
            }
            write_images(pipe.as_mut(), &req, out, !i.no_progress)?
        }
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for f in &r.files {
        println!("wrote {}", f.display());
    }
    let copied = if backend == Backend::Cpu {
        String::new()
    } else {
        let per_step = r.copied_bytes.iter().sum::<u64>() / r.copied_bytes.len().max(1) as u64;
        format!(", {per_step} bytes/step copied between host and GPU")
    };
    eprintln!(
        "{} steps, {:.3} s/step mean ({:.3} ms/step outside the network{copied}), {:.2} s total on {backend:?}",
        r.step_seconds.len(),
        mean(&r.step_seconds),
        mean(&r.outside_seconds) * 1e3,
        t0.elapsed().as_secs_f64(),
    );
    Ok(())
}

/// `--control IMAGE ...` with per-image (or shared) strength, start and end.
fn controls(i: &crate::cli::ImageArgs) -> Result<Vec<crate::pipelines::image::ControlImage>> {
    let n = i.control.len();
    if n == 0 && !i.control_mode.control_mode.is_empty() {
        bail!("--control-mode gives the control type of --control images; add --control IMAGE");
    }
    let pick = |v: &[f32], what: &str, k: usize| -> Result<f32> {
        match v.len() {
            1 => Ok(v[0]),
            m if m == n => Ok(v[k]),
            m => bail!("{what} takes one value or one per --control ({n}); {m} were given"),
        }
    };
    i.control
        .iter()
        .enumerate()
        .map(|(k, image)| {
            Ok(crate::pipelines::image::ControlImage {
                image: image.clone(),
                strength: pick(&i.control_strength, "--control-strength", k)?,
                start: pick(&i.control_start, "--control-start", k)?,
                end: pick(&i.control_end, "--control-end", k)?,
                preprocess: i.control_preprocess,
                mode: match i.control_mode.control_mode.len() {
                    0 => None,
                    1 => Some(i.control_mode.control_mode[0].clone()),
                    m if m == n => Some(i.control_mode.control_mode[k].clone()),
                    m => bail!(
                        "--control-mode takes one value or one per --control ({n}); {m} were given"
                    ),
                },
            })
        })
        .collect()
}

/// Base model for the first `--refiner-start` of the steps, then the refiner bundle from its latents.
fn refine(
    a: &GenerateArgs,
    mut base: ImagePipeline<SdModel>,
    refiner: &Path,
    req: ImageRequest,
    out: &Path,
) -> Result<Written> {
    let i = &a.image;
    if !(i.refiner_start > 0.0 && i.refiner_start < 1.0) {
        bail!(
            "--refiner-start {} must be in (0, 1): the base model's share of the steps",
            i.refiner_start
        );
    }
    if req.init_image.is_some() {
        bail!(
            "--refiner with --init-image is not supported: refine the generated image in a second run instead"
        );
    }
    let args = crate::cli::EngineArgs {
        engine: refiner.to_path_buf(),
        backend: a.engine.backend,
        allow_external_paths: a.engine.allow_external_paths,
    };
    let refiner_file = super::open_engine_file(&args)?;
    let Some(Pipeline::Image(refiner_bundle)) = refiner_file.pipeline() else {
        bail!("--refiner '{}' is not an image bundle", refiner.display());
    };
    let refiner_arch = Arch::parse(&refiner_bundle.arch)?;
    if refiner_arch.family() != Family::Sd {
        bail!(
            "--refiner '{}' is a {refiner_arch} bundle: the refiner must be a Stable Diffusion bundle (sdxl-refiner) \
             sharing the base model's latent space",
            refiner.display()
        );
    }
    let refiner_backend = resolve(a.engine.backend, &refiner_file)?;
    let mut refiner_pipe = ImagePipeline::new(SdModel::open(
        &refiner_file,
        refiner_bundle,
        refiner_backend,
    )?);
    if refiner_pipe.model.config.latent_channels != base.model.config.latent_channels {
        bail!(
            "--refiner '{}' works on {}-channel latents, the base model on {}: not a refiner for this model",
            refiner.display(),
            refiner_pipe.model.config.latent_channels,
            base.model.config.latent_channels
        );
    }
    // Both passes must walk one schedule: the base's step count, sampler and scheduler.
    let d = base.model.defaults();
    let shared = ImageRequest {
        steps: Some(req.steps.unwrap_or(d.steps)),
        sampler: Some(req.sampler.clone().unwrap_or(d.sampler)),
        scheduler: Some(req.scheduler.clone().unwrap_or(d.scheduler)),
        width: Some(req.width.unwrap_or(d.width)),
        height: Some(req.height.unwrap_or(d.height)),
        ..req
    };
    let first = ImageRequest {
        denoise_end: Some(i.refiner_start),
        latents_only: true,
        ..shared.clone()
    };
    let r = base.generate(&first, &mut |_| Ok(()))?;
    let second = ImageRequest {
        denoise_start: Some(i.refiner_start),
        start_latents: Some(r.latents),
        ..shared
    };
    let mut w = write_images(&mut refiner_pipe, &second, out, !i.no_progress)?;
    let mut steps = r.step_seconds;
    steps.append(&mut w.step_seconds);
    let mut outside = r.outside_seconds;
    outside.append(&mut w.outside_seconds);
    let mut copied = r.copied_bytes;
    copied.append(&mut w.copied_bytes);
    w.step_seconds = steps;
    w.outside_seconds = outside;
    w.copied_bytes = copied;
    Ok(w)
}

struct Written {
    files: Vec<PathBuf>,
    step_seconds: Vec<f64>,
    outside_seconds: Vec<f64>,
    copied_bytes: Vec<u64>,
}

/// Output file of image `i` of `n`.
pub fn image_path(out: &Path, i: usize, n: usize) -> PathBuf {
    if n == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    out.with_file_name(format!("{stem}-{i}.png"))
}

/// Runs the request with a progress bar (per-step time) and writes the PNGs.
fn write_images(
    pipe: &mut dyn ImageGenerator,
    req: &ImageRequest,
    out: &Path,
    progress: bool,
) -> Result<Written> {
    let bar = if progress {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix("denoising");
    let result = pipe.generate(req, &mut |s| {
        bar.set_length(s.steps as u64);
        bar.set_position(s.step as u64);
        bar.set_message(format!("{:.3} s/step", s.seconds));
        Ok(())
    });
    bar.finish_and_clear();
    let r = result?;
    let n = r.images.len();
    let mut files = Vec::with_capacity(n);
    for (i, img) in r.images.iter().enumerate() {
        let path = image_path(out, i, n);
        let params = format!("{}, Image: {i}", r.parameters);
        write_png(&path, img, r.width, r.height, &[("parameters", params)])?;
        files.push(path);
    }
    Ok(Written {
        files,
        step_seconds: r.step_seconds,
        outside_seconds: r.outside_seconds,
        copied_bytes: r.copied_bytes,
    })
}
