//! `--engine MODEL.gguf` (or a Hugging Face folder with its tokenizer.json) without a separate `build`, as
//! `llama-server -m` takes a model file: the ONNX-only bundle ONNX Runtime runs (CUDA or CPU) is built once into the
//! user's cache and reused. The cache entry is keyed by the files (real paths, sizes and modification times; a
//! folder's config.json, tokenizer files and safetensors), so a replaced or edited model is built again, and by
//! the form of the bundle trt-diff builds ([`BUNDLE_FORM`]).
use super::llm_build::{LlmSource, build_llm, is_quantized_gguf};
use crate::quant::Precision;
use crate::trt::BuildOptions;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Where built bundles of model files are kept: `TRT_DIFF_MODEL_CACHE`, else `$XDG_CACHE_HOME/trt-diff/models`,
/// else `~/.cache/trt-diff/models`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("TRT_DIFF_MODEL_CACHE") {
        return Ok(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .context(
            "no cache folder for the model's bundle: set TRT_DIFF_MODEL_CACHE (or HOME), or build it yourself \
             with `trt-diff build MODEL.gguf --onnx-only --out NAME.plan`",
        )?;
    Ok(base.join("trt-diff").join("models"))
}

/// Whether `path` is a Hugging Face model folder this cache builds (config.json beside its weights).
pub fn is_hf_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// The files whose identity keys a model's entry: the file itself, or a folder's configuration, tokenizer and
/// weights.
fn identity_files(real: &Path) -> Result<Vec<PathBuf>> {
    if !real.is_dir() {
        return Ok(vec![real.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(real)
        .with_context(|| format!("cannot list '{}'", real.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.ends_with(".safetensors") || name.ends_with(".json")
        })
        .collect();
    files.sort();
    Ok(files)
}

/// The form of the bundles this build of trt-diff makes, part of every entry's key: raise it when the graphs
/// change what they hold or which operators they use (2: the CPU graph's own `CausalAttention`), so entries built
/// by an earlier trt-diff are not reused.
const BUNDLE_FORM: u32 = 2;

/// The cache entry's name: the model's stem and a hash of its identity (trt-diff's version and bundle form too).
fn key(model: &Path) -> Result<(String, String)> {
    let real = model
        .canonicalize()
        .with_context(|| format!("cannot open '{}'", model.display()))?;
    let mut identity = format!("{}\0{BUNDLE_FORM}", env!("CARGO_PKG_VERSION"));
    for f in identity_files(&real)? {
        let meta =
            std::fs::metadata(&f).with_context(|| format!("cannot open '{}'", f.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        identity.push_str(&format!("\0{}\0{}\0{mtime}", f.display(), meta.len()));
    }
    let hash = xxhash_rust::xxh3::xxh3_128(identity.as_bytes());
    // A folder's name may hold dots ("Qwen2.5-0.5B-Instruct"): only a file's extension is dropped.
    let stem = if real.is_dir() {
        real.file_name()
    } else {
        real.file_stem()
    };
    let stem = stem
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok((stem, format!("{hash:032x}")))
}

/// The manifest of `model`'s bundle in the cache, built first when the cache has none for this file.
pub fn bundle_for(model: &Path) -> Result<PathBuf> {
    let (stem, hash) = key(model)?;
    let root = cache_root()?;
    let entry = root.join(&hash);
    let manifest = entry.join(format!("{stem}.plan.json"));
    if manifest.exists() {
        tracing::info!(
            "'{}': using its bundle built before in '{}'",
            model.display(),
            entry.display()
        );
        return Ok(manifest);
    }
    std::fs::create_dir_all(&root)
        .with_context(|| format!("cannot create the model cache '{}'", root.display()))?;
    // Built in a folder of its own and renamed into place, so a concurrent or interrupted run never sees half.
    let building = tempfile::Builder::new()
        .prefix(&format!(".{hash}.partial-"))
        .tempdir_in(&root)
        .with_context(|| format!("cannot write in the model cache '{}'", root.display()))?;
    tracing::info!(
        "'{}': building the ONNX Runtime bundle once into '{}' (for TensorRT, build a plan with `trt-diff build`)",
        model.display(),
        entry.display()
    );
    let started = std::time::Instant::now();
    let opts = BuildOptions {
        out: building.path().join(format!("{stem}.plan")),
        onnx_only: true,
        progress: false,
        ..Default::default()
    };
    let source = if is_hf_folder(model) {
        LlmSource::Hf { tokenizer: None }
    } else {
        LlmSource::Gguf
    };
    // A quantized GGUF keeps its blocks in the GPU graph too (INT4 weight-only, about the file's size, as `build`'s
    // default), not an f16 copy 2.5-5x the file.
    let precision = if is_quantized_gguf(model) {
        Precision::Gguf
    } else {
        Precision::Fp16
    };
    build_llm(model, source, precision, None, &Default::default(), &opts)
        .with_context(|| format!("building a bundle for '{}'", model.display()))?;
    match std::fs::rename(building.path(), &entry) {
        Ok(()) => {}
        // Another run finished the same entry first: use it.
        Err(_) if manifest.exists() => {}
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot move the bundle to '{}'", entry.display()));
        }
    }
    tracing::info!(
        "built in {:.1}s; later runs of this file reuse it",
        started.elapsed().as_secs_f64()
    );
    Ok(manifest)
}
