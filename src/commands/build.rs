//! `trt-diff build`: an ONNX file into a plan, or a checkpoint into a whole pipeline's engines (LLM decoders,
//! image bundles).
use crate::cli::BuildArgs;
use crate::pipelines::{Arch, Family};
use crate::quant::Precision;
use crate::trt::BuildOptions;
use crate::trt::shapes::parse_shapes;
use anyhow::{Context, Result, bail};

impl From<&BuildArgs> for BuildOptions {
    fn from(a: &BuildArgs) -> Self {
        BuildOptions {
            onnx: a.input.clone(),
            out: a.out.clone(),
            trt: a.trt,
            trt_lib_dir: a.lib.trt_lib_dir.clone(),
            shapes: Vec::new(),
            opt_level: a.opt_level,
            workspace_bytes: a.workspace.map(|m| m << 20),
            timing_cache: a.timing_cache.clone(),
            targets: a.targets.clone(),
            refit: a.refit,
            weight_streaming: a.weight_streaming,
            progress: !a.no_progress,
            pipeline: None,
            allow_external_paths: a.allow_external_paths,
            onnx_only: a.onnx_only,
            keep_onnx: a.keep_onnx,
            ..Default::default()
        }
    }
}

pub fn run(a: BuildArgs) -> Result<()> {
    if !a.input.exists() {
        bail!(
            "cannot open '{}': no such file; check the path",
            a.input.display()
        );
    }
    if let Some(dir) = a.out.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder '{}'", dir.display()))?;
    }
    if let Some(arch) = a.arch
        && arch.family() == Family::Flux
    {
        return build_flux(&a, arch);
    }
    let lora_or_control = !a.lora.is_empty() || a.lora_rank > 0 || a.controlnet.is_some();
    if a.arch.is_some_and(|arch| arch.family() == Family::Sd3)
        || (a.arch.is_none() && crate::pipelines::sd3_build::looks_like_sd3(&a.input))
    {
        if lora_or_control {
            bail!(
                "--lora, --lora-rank and --controlnet are built into Flux bundles so far, not SD3.5 ones; drop \
                 them for '{}'",
                a.input.display()
            );
        }
        return build_sd3(&a);
    }
    if a.arch.is_some_and(|arch| arch.family() == Family::ZImage)
        || (a.arch.is_none() && crate::pipelines::z_image_build::looks_like_z_image(&a.input))
    {
        if lora_or_control {
            bail!(
                "--lora, --lora-rank and --controlnet are built into Flux bundles so far, not Z-Image ones; drop \
                 them for '{}'",
                a.input.display()
            );
        }
        return build_z_image(&a);
    }
    if a.arch.is_some_and(|arch| arch.family() == Family::Flux2)
        || (a.arch.is_none() && crate::pipelines::flux2_build::looks_like_flux2(&a.input))
    {
        if lora_or_control {
            bail!(
                "--lora, --lora-rank and --controlnet are built into Flux.1 bundles so far, not FLUX.2 ones; drop \
                 them for '{}'",
                a.input.display()
            );
        }
        return build_flux2(&a);
    }
    if a.arch.is_some_and(|arch| arch.family() == Family::Sd)
        || (a.arch.is_none() && crate::pipelines::sd_build::looks_like_sd(&a.input))
    {
        return build_sd(&a);
    }
    if lora_or_control {
        bail!(
            "--lora, --lora-rank and --controlnet apply to image models (Flux, SD1.x/SD2.x/SDXL); '{}' is not one",
            a.input.display()
        );
    }
    let is_llm = a.arch.is_some()
        || crate::weights::gguf::looks_like_gguf(&a.input)
        || a.input.join("config.json").exists();
    if is_llm {
        return build_llm(&a);
    }
    if a.input.extension().is_none_or(|e| e != "onnx") {
        bail!(
            "'{}' is not an .onnx file: `trt-diff build` takes an ONNX model (rename it if it is one)",
            a.input.display()
        );
    }
    let opts = BuildOptions {
        shapes: parse_shapes(&a.shapes)?,
        ..BuildOptions::from(&a)
    };
    let o = crate::trt::build_engine(&opts)?;
    let m = &o.manifest;
    println!(
        "built {} ({}) in {:.2}s (TensorRT parse {:.2}s, build {:.2}s)",
        o.engine.display(),
        m.engine_summary(),
        o.timings.total,
        o.timings.trt_parse,
        o.timings.trt_build
    );
    for t in &m.io {
        println!("{}", t.describe());
    }
    println!("manifest {}", o.manifest_path.display());
    Ok(())
}

fn build_llm(a: &BuildArgs) -> Result<()> {
    let source = crate::pipelines::llm_build::detect_source(
        &a.input,
        a.arch.map(Arch::name),
        a.tokenizer.as_deref(),
    )?;
    let opts = BuildOptions {
        shapes: parse_shapes(&a.shapes)?,
        ..BuildOptions::from(a)
    };
    let o = crate::pipelines::llm_build::build_llm(
        &a.input,
        source,
        precision(a),
        a.max_context,
        &auto_options(a),
        &opts,
    )?;
    let dir = a.out.parent().unwrap_or(std::path::Path::new(""));
    let source = if dir.join(&o.manifest.source.onnx).exists() {
        o.manifest.source.onnx.clone()
    } else {
        format!("{} (not kept: --keep-onnx)", o.manifest.source.onnx)
    };
    println!(
        "built {} ({} precision, {}); source {source}, manifest {}",
        o.engine.display(),
        shown_precision(a),
        o.manifest.engine_summary(),
        o.manifest_path.display()
    );
    print_policy(a)
}

fn build_flux(a: &BuildArgs, arch: Arch) -> Result<()> {
    if a.image_px.as_ref().is_some_and(|v| v.len() != 3) {
        bail!("--image-px takes three sizes: MIN,OPT,MAX (pixels, multiples of 16)");
    }
    let o = crate::pipelines::flux_build::build_flux(
        &crate::pipelines::flux_build::FluxBuildOptions {
            model: a.input.clone(),
            arch: arch.name().to_string(),
            precision: precision(a),
            clip_tokenizer: a.sources.clip_tokenizer.clone(),
            t5_tokenizer: a.sources.t5_tokenizer.clone(),
            tae_decoder: a.tae_decoder.clone(),
            t5_max_len: a.t5_max_len,
            image_px: a.image_px.as_ref().map(|v| [v[0], v[1], v[2]]),
            calibration_prompts: Some(a.calibration_prompt.clone()),
            calibration_steps: a.calibration_steps,
            calibration_backend: crate::backend::BackendChoice::Auto,
            loras: a.lora.clone(),
            lora_rank: a.lora_rank,
            controlnet: a.controlnet.clone(),
            auto: auto_options(a),
            base: BuildOptions::from(a),
        },
    )?;
    println!(
        "built the {arch} bundle {} ({} precision, {}); manifest {}",
        o.engine.display(),
        shown_precision(a),
        o.manifest.engine_summary(),
        o.manifest_path.display()
    );
    print_policy(a)
}

/// `--precision`, or its default for the input: a quantized GGUF keeps its block formats (gguf), anything else
/// builds in fp32.
fn precision(a: &BuildArgs) -> Precision {
    a.precision.unwrap_or_else(|| {
        if crate::pipelines::llm_build::is_quantized_gguf(&a.input) {
            Precision::Gguf
        } else {
            Precision::Fp32
        }
    })
}

/// The precision a build reports: `--policy` is a per-layer (auto) build whatever `--precision` defaulted to.
fn shown_precision(a: &BuildArgs) -> Precision {
    if a.auto.policy.is_some() {
        Precision::Auto
    } else {
        precision(a)
    }
}

fn auto_options(a: &BuildArgs) -> crate::pipelines::auto_precision::AutoOptions {
    crate::pipelines::auto_precision::AutoOptions {
        quality: a.auto.quality,
        policy: a.auto.policy.clone(),
        heldout_prompts: a.auto.heldout_prompt.clone(),
        calibration_prompts: a.calibration_prompt.clone(),
        layers: a.auto.auto_layers.clone(),
    }
}

/// After a per-layer build: the policy written beside the engine, as a table with its search time.
fn print_policy(a: &BuildArgs) -> Result<()> {
    if precision(a) != Precision::Auto && a.auto.policy.is_none() {
        return Ok(());
    }
    let path = crate::pipelines::bundle::sibling(&a.out, ".policy.toml");
    let pf = crate::quant::auto::PolicyFile::read(&path)?;
    print!("{}", pf.table());
    let (chosen, keep) = pf.bytes();
    let count = |f: crate::quant::auto::Format| pf.layers.values().filter(|v| **v == f).count();
    println!(
        "policy {}: {} nvfp4, {} fp8, {} int8, {} kept; weights {} of {} unquantized; {:.2} {} on held-out prompts \
         (asked {}); search {:.1}s",
        path.display(),
        count(crate::quant::auto::Format::Nvfp4),
        count(crate::quant::auto::Format::Fp8),
        count(crate::quant::auto::Format::Int8),
        count(crate::quant::auto::Format::Keep),
        crate::fsutil::human_bytes(chosen),
        crate::fsutil::human_bytes(keep),
        pf.measured_quality,
        pf.metric.unit(),
        pf.quality,
        pf.search_seconds
    );
    Ok(())
}

fn build_z_image(a: &BuildArgs) -> Result<()> {
    if a.image_px.as_ref().is_some_and(|v| v.len() != 3) {
        bail!("--image-px takes three sizes: MIN,OPT,MAX (pixels, multiples of 16)");
    }
    let arch = Arch::ZImageTurbo;
    let o = crate::pipelines::z_image_build::build_z_image(
        &crate::pipelines::z_image_build::ZImageBuildOptions {
            model: a.input.clone(),
            arch: arch.name().to_string(),
            precision: precision(a),
            image_px: a.image_px.as_ref().map(|v| [v[0], v[1], v[2]]),
            calibration_prompts: Some(a.calibration_prompt.clone()),
            calibration_steps: a.calibration_steps,
            calibration_backend: crate::backend::BackendChoice::Auto,
            auto: auto_options(a),
            base: BuildOptions::from(a),
        },
    )?;
    println!(
        "built the {arch} bundle {} ({} precision, {}); manifest {}",
        o.engine.display(),
        shown_precision(a),
        o.manifest.engine_summary(),
        o.manifest_path.display()
    );
    print_policy(a)
}

fn build_flux2(a: &BuildArgs) -> Result<()> {
    if a.image_px.as_ref().is_some_and(|v| v.len() != 3) {
        bail!("--image-px takes three sizes: MIN,OPT,MAX (pixels, multiples of 16)");
    }
    let o = crate::pipelines::flux2_build::build_flux2(
        &crate::pipelines::flux2_build::Flux2BuildOptions {
            model: a.input.clone(),
            arch: a.arch.map(|x| x.name().to_string()),
            precision: precision(a),
            tae_decoder: a.tae_decoder.clone(),
            image_px: a.image_px.as_ref().map(|v| [v[0], v[1], v[2]]),
            calibration_prompts: Some(a.calibration_prompt.clone()),
            calibration_steps: a.calibration_steps,
            calibration_backend: crate::backend::BackendChoice::Auto,
            auto: auto_options(a),
            base: BuildOptions::from(a),
        },
    )?;
    let arch = o
        .manifest
        .pipeline
        .as_ref()
        .and_then(|p| match p {
            crate::manifest::Pipeline::Image(b) => Some(b.arch.clone()),
            _ => None,
        })
        .unwrap_or_default();
    println!(
        "built the {arch} bundle {} ({} precision, {}); manifest {}",
        o.engine.display(),
        shown_precision(a),
        o.manifest.engine_summary(),
        o.manifest_path.display()
    );
    print_policy(a)
}

fn build_sd3(a: &BuildArgs) -> Result<()> {
    if a.image_px.as_ref().is_some_and(|v| v.len() != 3) {
        bail!("--image-px takes three sizes: MIN,OPT,MAX (pixels, multiples of 16)");
    }
    let o =
        crate::pipelines::sd3_build::build_sd3(&crate::pipelines::sd3_build::Sd3BuildOptions {
            model: a.input.clone(),
            arch: a.arch.map(|x| x.name().to_string()),
            precision: precision(a),
            clip_tokenizer: a.sources.clip_tokenizer.clone(),
            t5_tokenizer: a.sources.t5_tokenizer.clone(),
            config: a.sources.config.clone(),
            image_px: a.image_px.as_ref().map(|v| [v[0], v[1], v[2]]),
            calibration_prompts: Some(a.calibration_prompt.clone()),
            calibration_steps: a.calibration_steps,
            calibration_backend: crate::backend::BackendChoice::Auto,
            auto: auto_options(a),
            base: BuildOptions::from(a),
        })?;
    let arch = o
        .manifest
        .pipeline
        .as_ref()
        .and_then(|p| match p {
            crate::manifest::Pipeline::Image(b) => Some(b.arch.clone()),
            _ => None,
        })
        .unwrap_or_default();
    println!(
        "built the {arch} bundle {} ({} precision, {}); manifest {}",
        o.engine.display(),
        shown_precision(a),
        o.manifest.engine_summary(),
        o.manifest_path.display()
    );
    print_policy(a)
}

fn build_sd(a: &BuildArgs) -> Result<()> {
    if a.image_px.as_ref().is_some_and(|v| v.len() != 3) {
        bail!("--image-px takes three sizes: MIN,OPT,MAX (pixels, multiples of 8)");
    }
    let o = crate::pipelines::sd_build::build_sd(&crate::pipelines::sd_build::SdBuildOptions {
        model: a.input.clone(),
        arch: a.arch.map(|x| x.name().to_string()),
        precision: precision(a),
        clip_tokenizer: a.sources.clip_tokenizer.clone(),
        tae_decoder: a.tae_decoder.clone(),
        image_px: a.image_px.as_ref().map(|v| [v[0], v[1], v[2]]),
        calibration_prompts: Some(a.calibration_prompt.clone()),
        calibration_steps: a.calibration_steps,
        calibration_backend: crate::backend::BackendChoice::Auto,
        loras: a.lora.clone(),
        lora_rank: a.lora_rank,
        controlnet: a.controlnet.clone(),
        smoothquant_alpha: None,
        auto: auto_options(a),
        base: BuildOptions::from(a),
    })?;
    let arch = o
        .manifest
        .pipeline
        .as_ref()
        .and_then(|p| match p {
            crate::manifest::Pipeline::Image(b) => Some(b.arch.clone()),
            _ => None,
        })
        .unwrap_or_default();
    println!(
        "built the {arch} bundle {} ({} precision, {}); manifest {}",
        o.engine.display(),
        shown_precision(a),
        o.manifest.engine_summary(),
        o.manifest_path.display()
    );
    print_policy(a)
}
