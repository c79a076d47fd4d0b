//! `trt-diff generate --engine flux.plan ...`: opens the bundle, runs the request with a progress bar (per-step
//! time), and writes one PNG per image (`out.png`, or `out-0.png`, `out-1.png`, ... for a batch) carrying the
//! generation parameters in a `parameters` tEXt chunk.
use crate::pipelines::flux::FluxRequest;
use crate::pipelines::flux_build::{FluxBundle, open_bundle};
use crate::pipelines::flux_image::write_png;
use crate::runner::BackendChoice;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct RunSummary {
    pub files: Vec<PathBuf>,
    pub seconds: f64,
    pub step_seconds: Vec<f64>,
    pub backend: String,
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

pub fn generate_images(
    engine: &Path,
    bundle: &FluxBundle,
    backend: BackendChoice,
    req: &FluxRequest,
    out: &Path,
    progress: bool,
) -> Result<RunSummary> {
    if out
        .extension()
        .is_none_or(|e| !e.eq_ignore_ascii_case("png"))
    {
        bail!("--out '{}' must name a .png file", out.display());
    }
    let t0 = Instant::now();
    let mut pipe = open_bundle(engine, bundle, backend)?;
    let backend_name = pipe.engines.transformer.backend();
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
    Ok(RunSummary {
        files,
        seconds: t0.elapsed().as_secs_f64(),
        step_seconds: r.step_seconds,
        backend: backend_name,
    })
}
