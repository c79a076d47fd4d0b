//! Building an image bundle: one TensorRT engine per component beside the bundle's plan (the denoiser's),
//! each from its own ONNX graph, then the manifest that records every file. Families export their graphs and
//! hand the list here.
use crate::manifest::{BundleComponent, ImageBundle, Pipeline, ShapeRange};
use crate::trt::{BuildOptions, BuildOutcome, build_engine};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// `out` with its extension replaced by `suffix`: `flux.plan` + `.clip.plan` -> `flux.clip.plan`.
pub fn sibling(out: &Path, suffix: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    out.with_file_name(format!("{stem}{suffix}"))
}

pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// One component's graphs: what the CPU backend runs (f32) and what TensorRT builds (the bundle's precision).
pub struct ComponentGraphs {
    pub name: String,
    pub cpu_onnx: PathBuf,
    pub trt_onnx: PathBuf,
    pub shapes: Vec<ShapeRange>,
}

/// The text of a diffusers transformer folder's `config.json` at `path`, with an error naming the file.
pub fn read_transformer_config(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read '{}': the transformer folder needs the config.json diffusers saves",
            path.display()
        )
    })
}

/// Builds `NAME.<component>.plan` for every component, then the denoiser's engine as `base.out` with the
/// bundle's manifest (components and tokenizers filled in here from the files). With `base.onnx_only` no plan is
/// built: the manifest names the graphs, which ONNX Runtime runs.
pub fn build_bundle(
    base: &BuildOptions,
    components: &[ComponentGraphs],
    denoiser: ComponentGraphs,
    mut bundle: ImageBundle,
) -> Result<BuildOutcome> {
    for c in components {
        if base.onnx_only {
            bundle.components.insert(
                c.name.clone(),
                BundleComponent {
                    onnx: file_name(&c.cpu_onnx),
                    plan: None,
                },
            );
            continue;
        }
        let plan = sibling(&base.out, &format!(".{}.plan", c.name));
        tracing::info!("building the {} engine", c.name);
        let mut opts = base.clone();
        opts.onnx = c.trt_onnx.clone();
        opts.out = plan.clone();
        opts.shapes = c.shapes.clone();
        opts.pipeline = None;
        build_engine(&opts).with_context(|| format!("building the {} engine", c.name))?;
        bundle.components.insert(
            c.name.clone(),
            BundleComponent {
                onnx: file_name(&c.cpu_onnx),
                plan: Some(file_name(&plan)),
            },
        );
    }
    bundle.components.insert(
        denoiser.name.clone(),
        BundleComponent {
            onnx: file_name(&denoiser.cpu_onnx),
            plan: (!base.onnx_only).then(|| file_name(&base.out)),
        },
    );
    let mut opts = base.clone();
    opts.onnx = denoiser.trt_onnx;
    opts.shapes = denoiser.shapes;
    opts.pipeline = Some(Pipeline::Image(bundle));
    tracing::info!("building the {} engine", denoiser.name);
    build_engine(&opts).with_context(|| format!("building the {} engine", denoiser.name))
}
