//! Pipelines: engines, tokenizers and samplers put together. `image` is the seam every image family plugs into
//! (one file per family: `flux`), `llm` generates text; `engines` opens engines on the backend chosen once per
//! engine file; `bundle` and `recipe` build and configure multi-engine bundles.
pub mod bundle;
pub mod chat;
pub mod engines;
pub mod flux;
pub mod flux_build;
pub mod image;
pub mod image_io;
pub mod kv_cache;
pub mod llm;
pub mod llm_build;
pub mod llm_convert;
pub mod lora;
pub mod recipe;

/// `--arch`: what `build` and `export` make of a checkpoint whose kind the files do not tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Arch {
    /// A llama2.c checkpoint (.bin) with `--tokenizer TOK.bin`.
    Llama2c,
    /// FLUX.1-dev (guidance-distilled) from a diffusers folder or BFL single files.
    FluxDev,
    /// FLUX.1-schnell.
    FluxSchnell,
}

/// Which pipeline runs an arch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Llm,
    Flux,
}

impl Arch {
    /// The name as `--arch` takes it and manifests record it.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama2c => "llama2c",
            Arch::FluxDev => "flux-dev",
            Arch::FluxSchnell => "flux-schnell",
        }
    }

    pub fn family(self) -> Family {
        match self {
            Arch::Llama2c => Family::Llm,
            Arch::FluxDev | Arch::FluxSchnell => Family::Flux,
        }
    }

    /// Parses a recorded arch name (manifests).
    pub fn parse(name: &str) -> anyhow::Result<Self> {
        <Self as clap::ValueEnum>::from_str(name, false).map_err(|_| {
            anyhow::anyhow!(
                "unknown arch '{name}'; this trt-diff knows llama2c, flux-dev, flux-schnell"
            )
        })
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Opens an image bundle's pipeline, whichever family built it, on the backend `choice` resolves to.
pub fn open_image_pipeline(
    engine: &crate::manifest::EngineFile,
    choice: crate::backend::BackendChoice,
) -> anyhow::Result<Box<dyn image::ImageGenerator>> {
    let Some(crate::manifest::Pipeline::Image(bundle)) = engine.pipeline() else {
        anyhow::bail!(
            "'{}' is not an image bundle; build one with `trt-diff build MODEL_DIR --arch ...`",
            engine.path.display()
        );
    };
    let backend = engines::resolve(choice, engine)?;
    Ok(match Arch::parse(&bundle.arch)?.family() {
        Family::Flux => Box::new(image::ImagePipeline::new(flux::FluxModel::open(
            engine, bundle, backend,
        )?)),
        Family::Llm => anyhow::bail!(
            "'{}' records the LLM arch {} in an image bundle; rebuild it",
            engine.path.display(),
            bundle.arch
        ),
    })
}
