//! Pipelines: engines, tokenizers and samplers put together. `image` is the seam every image family plugs into
//! (one file per family: `flux`, `flux2`, `sd`, `sd3`, `z_image`), `llm` generates text; `engines` opens engines on the backend chosen once per
//! engine file; `bundle` and `recipe` build and configure multi-engine bundles.
pub mod auto_precision;
pub mod bundle;
pub mod chat;
pub mod device_io;
pub mod engines;
pub mod flux;
pub mod flux2;
pub mod flux2_build;
pub mod flux_build;
pub mod image;
pub mod image_io;
pub mod kv_cache;
pub mod llm;
pub mod llm_build;
pub mod llm_convert;
pub mod lora;
pub mod model_cache;
pub mod recipe;
pub mod sd;
pub mod sd3;
pub mod sd3_build;
pub mod sd_build;
pub mod z_image;
pub mod z_image_build;

/// `--arch`: what `build` and `export` make of a checkpoint whose kind the files do not tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// A llama2.c checkpoint (.bin) with `--tokenizer TOK.bin`.
    Llama2c,
    /// FLUX.1-dev (guidance-distilled) from a diffusers folder or BFL single files.
    FluxDev,
    /// FLUX.1-schnell.
    FluxSchnell,
    /// Stable Diffusion 1.x (eps, CLIP-L).
    Sd15,
    /// Stable Diffusion 2.x 768-v (v-prediction, OpenCLIP-H).
    Sd21,
    /// SDXL base (CLIP-L + OpenCLIP-bigG, added time ids).
    Sdxl,
    /// SDXL refiner (OpenCLIP-bigG, aesthetic-score time ids).
    SdxlRefiner,
    /// SDXL-Turbo (1-4 steps, no CFG).
    SdxlTurbo,
    /// SD-Turbo (SD2.1-based, 1-4 steps, no CFG).
    SdTurbo,
    /// Stable Diffusion 3.5 medium (MMDiT-X, CLIP-L + CLIP-G + T5-XXL, 16-channel VAE) from a diffusers folder.
    Sd35Medium,
    /// Stable Diffusion 3.5 large (MMDiT with qk-norm).
    Sd35Large,
    /// Stable Diffusion 3.5 large-turbo (4 steps, no CFG).
    Sd35LargeTurbo,
    /// Z-Image-Turbo (S3-DiT, Qwen3 text encoder, 8 steps, no CFG) from a diffusers folder.
    ZImageTurbo,
    /// FLUX.2 [klein] 4B (Qwen3-4B text encoder; distilled 4 steps, or base with CFG) from a diffusers folder.
    #[value(name = "flux2-klein-4b")]
    Flux2Klein4b,
    /// FLUX.2 [klein] 9B (Qwen3-8B text encoder).
    #[value(name = "flux2-klein-9b")]
    Flux2Klein9b,
}

/// Which pipeline runs an arch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llm,
    Flux,
    Sd,
    Sd3,
    ZImage,
    Flux2,
}

impl Arch {
    /// The name as `--arch` takes it and manifests record it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama2c => "llama2c",
            Arch::FluxDev => "flux-dev",
            Arch::FluxSchnell => "flux-schnell",
            Arch::Sd15 => "sd15",
            Arch::Sd21 => "sd21",
            Arch::Sdxl => "sdxl",
            Arch::SdxlRefiner => "sdxl-refiner",
            Arch::SdxlTurbo => "sdxl-turbo",
            Arch::SdTurbo => "sd-turbo",
            Arch::Sd35Medium => "sd35-medium",
            Arch::Sd35Large => "sd35-large",
            Arch::Sd35LargeTurbo => "sd35-large-turbo",
            Arch::ZImageTurbo => "z-image-turbo",
            Arch::Flux2Klein4b => "flux2-klein-4b",
            Arch::Flux2Klein9b => "flux2-klein-9b",
        }
    }

    pub fn family(self) -> Family {
        match self {
            Arch::Llama2c => Family::Llm,
            Arch::FluxDev | Arch::FluxSchnell => Family::Flux,
            Arch::Sd15
            | Arch::Sd21
            | Arch::Sdxl
            | Arch::SdxlRefiner
            | Arch::SdxlTurbo
            | Arch::SdTurbo => Family::Sd,
            Arch::Sd35Medium | Arch::Sd35Large | Arch::Sd35LargeTurbo => Family::Sd3,
            Arch::ZImageTurbo => Family::ZImage,
            Arch::Flux2Klein4b | Arch::Flux2Klein9b => Family::Flux2,
        }
    }

    /// Parses a recorded arch name (manifests).
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        <Self as clap::ValueEnum>::from_str(name, false).map_err(|_| {
            anyhow::anyhow!(
                "unknown arch '{name}'; this trt-diff knows llama2c, flux-dev, flux-schnell, sd15, sd21, sdxl, \
                 sdxl-refiner, sdxl-turbo, sd-turbo, sd35-medium, sd35-large, sd35-large-turbo, z-image-turbo, \
                 flux2-klein-4b, flux2-klein-9b"
            )
        })
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Opens an image bundle's pipeline, whichever family built it, on `backend` (`engines::resolve`).
pub fn open_image_pipeline(
    engine: &crate::manifest::EngineFile,
    backend: engines::Backend,
) -> anyhow::Result<Box<dyn image::ImageGenerator>> {
    let Some(crate::manifest::Pipeline::Image(bundle)) = engine.pipeline() else {
        anyhow::bail!(
            "'{}' is not an image bundle; build one with `trt-diff build MODEL_DIR --arch ...`",
            engine.path.display()
        );
    };
    Ok(match Arch::parse(&bundle.arch)?.family() {
        Family::Flux => Box::new(image::ImagePipeline::new(flux::FluxModel::open(
            engine, bundle, backend,
        )?)),
        Family::Sd => Box::new(image::ImagePipeline::new(sd::SdModel::open(
            engine, bundle, backend,
        )?)),
        Family::Sd3 => Box::new(image::ImagePipeline::new(sd3::Sd3Model::open(
            engine, bundle, backend,
        )?)),
        Family::ZImage => Box::new(image::ImagePipeline::new(z_image::ZImageModel::open(
            engine, bundle, backend,
        )?)),
        Family::Flux2 => Box::new(image::ImagePipeline::new(flux2::Flux2Model::open(
            engine, bundle, backend,
        )?)),
        Family::Llm => anyhow::bail!(
            "'{}' records the LLM arch {} in an image bundle; rebuild it",
            engine.path.display(),
            bundle.arch
        ),
    })
}
