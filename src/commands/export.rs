//! `trt-diff export MODEL --arch A --out DIR`: one ONNX graph per component.
use crate::cli::ExportArgs;
use crate::pipelines::Family;
use anyhow::{Result, bail};

pub fn run(a: ExportArgs) -> Result<()> {
    if a.arch.family() == Family::Sd {
        let files = crate::pipelines::sd_build::export_sd(
            &a.model,
            a.arch.name(),
            a.precision,
            &a.out,
            a.sources.clip_tokenizer.as_deref(),
        )?;
        for f in files {
            println!("wrote {}", f.display());
        }
        return Ok(());
    }
    if a.arch.family() == Family::Sd3 {
        let files = crate::pipelines::sd3_build::export_sd3(
            &a.model,
            a.arch.name(),
            a.precision,
            &a.out,
            a.sources.clip_tokenizer.as_deref(),
            a.sources.t5_tokenizer.as_deref(),
            a.sources.config.as_deref(),
        )?;
        for f in files {
            println!("wrote {}", f.display());
        }
        return Ok(());
    }
    if a.arch.family() == Family::ZImage {
        let p = crate::pipelines::z_image_build::export_z_image(
            &a.model,
            a.arch.name(),
            a.precision,
            &a.out,
        )?;
        for f in [
            &p.transformer,
            &p.text_encoder,
            &p.vae_decoder,
            &p.vae_encoder,
        ] {
            println!("wrote {}", f.display());
        }
        return Ok(());
    }
    if a.arch.family() == Family::Flux2 {
        let p = crate::pipelines::flux2_build::export_flux2(
            &a.model,
            a.arch.name(),
            a.precision,
            &a.out,
        )?;
        for f in [
            &p.transformer,
            &p.text_encoder,
            &p.vae_decoder,
            &p.vae_encoder,
        ] {
            println!("wrote {}", f.display());
        }
        return Ok(());
    }
    if a.arch.family() != Family::Flux {
        bail!(
            "--arch {} is not exportable; supported: flux-dev, flux-schnell, sd15, sd21, sdxl, sdxl-refiner, \
             sdxl-turbo, sd-turbo, sd35-medium, sd35-large, sd35-large-turbo, z-image-turbo, \
             flux2-klein-4b, flux2-klein-9b",
            a.arch
        );
    }
    let p = crate::pipelines::flux_build::export_flux(
        &a.model,
        a.arch.name(),
        a.precision,
        &a.out,
        a.sources.clip_tokenizer.as_deref(),
        a.sources.t5_tokenizer.as_deref(),
    )?;
    for f in [
        &p.transformer,
        &p.clip,
        &p.t5,
        &p.vae_decoder,
        &p.vae_encoder,
    ] {
        println!("wrote {}", f.display());
    }
    Ok(())
}
