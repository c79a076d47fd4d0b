//! Recipes: each arch's defaults, engine shapes and precision policy, as TOML files in `engines/` compiled into
//! the binary. A family reads its own recipe struct from the table below; adding an arch is one row and one file.
use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;

/// arch -> recipe text.
const RECIPES: &[(&str, &str)] = &[
    ("flux-dev", include_str!("../../engines/flux-dev.toml")),
    (
        "flux-schnell",
        include_str!("../../engines/flux-schnell.toml"),
    ),
    ("sd15", include_str!("../../engines/sd15.toml")),
    ("sd21", include_str!("../../engines/sd21.toml")),
    ("sd-turbo", include_str!("../../engines/sd-turbo.toml")),
    ("sdxl", include_str!("../../engines/sdxl.toml")),
    (
        "sdxl-refiner",
        include_str!("../../engines/sdxl-refiner.toml"),
    ),
    ("sdxl-turbo", include_str!("../../engines/sdxl-turbo.toml")),
    (
        "sd35-medium",
        include_str!("../../engines/sd35-medium.toml"),
    ),
    ("sd35-large", include_str!("../../engines/sd35-large.toml")),
    (
        "sd35-large-turbo",
        include_str!("../../engines/sd35-large-turbo.toml"),
    ),
    ("llm", include_str!("../../engines/llm.toml")),
    (
        "flux2-klein-4b",
        include_str!("../../engines/flux2-klein.toml"),
    ),
    (
        "flux2-klein-9b",
        include_str!("../../engines/flux2-klein.toml"),
    ),
    (
        "z-image-turbo",
        include_str!("../../engines/z-image-turbo.toml"),
    ),
];

/// Every arch with a recipe.
pub fn archs() -> impl Iterator<Item = &'static str> {
    RECIPES.iter().map(|(a, _)| *a)
}

/// The compiled-in recipe of `arch`, read into the family's recipe type.
pub fn load<T: DeserializeOwned>(arch: &str) -> Result<T> {
    let Some((_, text)) = RECIPES.iter().find(|(a, _)| *a == arch) else {
        bail!(
            "no recipe for arch '{arch}'; recipes exist for: {}",
            archs().collect::<Vec<_>>().join(", ")
        );
    };
    toml::from_str(text).with_context(|| format!("engines/{arch}.toml is malformed"))
}
