//! Finding and loading TensorRT at run time (dlopen), so the binary builds and runs without TensorRT installed.
//! Search order: `--trt-lib-dir`, `TRT_LIB_DIR`, `LD_LIBRARY_PATH`, `TENSORRT_ROOT/lib`, standard locations, and
//! the project cache that scripts/setup.sh fills.
use anyhow::{Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub use crate::manifest::Flavor;

impl Flavor {
    pub const ALL: [Flavor; 2] = [Flavor::Rtx, Flavor::Trt11];

    pub fn key(self) -> &'static str {
        match self {
            Flavor::Rtx => "rtx",
            Flavor::Trt11 => "trt11",
        }
    }

    pub fn display(self) -> &'static str {
        match self {
            Flavor::Rtx => "TensorRT-RTX",
            Flavor::Trt11 => "TensorRT 11",
        }
    }

    /// (core library, ONNX parser library) sonames.
    pub fn libraries(self) -> (&'static str, &'static str) {
        match self {
            Flavor::Rtx => ("libtensorrt_rtx.so.1", "libtensorrt_onnxparser_rtx.so.1"),
            Flavor::Trt11 => ("libnvinfer.so.11", "libnvonnxparser.so.11"),
        }
    }

    pub fn install_hint(self) -> &'static str {
        match self {
            Flavor::Rtx => {
                "run scripts/setup.sh (installs PyPI tensorrt-rtx-cu13-libs into .cache/), or point --trt-lib-dir / \
                 TRT_LIB_DIR at a TensorRT-RTX SDK's lib folder"
            }
            Flavor::Trt11 => {
                "install TensorRT 11 (NVIDIA's tarball or `nix develop .#cuda`) and point --trt-lib-dir / TRT_LIB_DIR \
                 at its lib folder"
            }
        }
    }

    /// Formats a TensorRT version integer (major*10000 + minor*100 + patch).
    pub fn version_string(v: i32) -> String {
        format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100)
    }
}

/// `--trt`: which flavour to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TrtChoice {
    /// Pick by the libraries found and the GPU present.
    #[default]
    Auto,
    Rtx,
    Trt11,
}

#[derive(Clone, Debug)]
pub struct SearchDir {
    pub path: PathBuf,
    pub origin: &'static str,
}

const STANDARD_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/usr/local/tensorrt/lib",
    "/opt/tensorrt/lib",
    "/usr/local/cuda/lib64",
];

pub fn search_dirs(cli_dir: Option<&Path>) -> Vec<SearchDir> {
    let mut dirs = Vec::new();
    if let Some(d) = cli_dir {
        dirs.push(SearchDir {
            path: d.to_path_buf(),
            origin: "--trt-lib-dir",
        });
    }
    if let Some(d) = std::env::var_os("TRT_LIB_DIR") {
        dirs.push(SearchDir {
            path: d.into(),
            origin: "TRT_LIB_DIR",
        });
    }
    if let Some(p) = std::env::var_os("LD_LIBRARY_PATH") {
        for d in std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()) {
            dirs.push(SearchDir {
                path: d,
                origin: "LD_LIBRARY_PATH",
            });
        }
    }
    if let Some(r) = std::env::var_os("TENSORRT_ROOT") {
        dirs.push(SearchDir {
            path: PathBuf::from(r).join("lib"),
            origin: "TENSORRT_ROOT",
        });
    }
    for d in STANDARD_DIRS {
        dirs.push(SearchDir {
            path: d.into(),
            origin: "standard location",
        });
    }
    dirs.push(SearchDir {
        path: crate::fsutil::cache_dir().join("lib"),
        origin: "set-up cache",
    });
    dirs
}

/// Library files of one flavour, found on disk.
#[derive(Clone, Debug)]
pub struct Found {
    pub flavor: Flavor,
    pub core: PathBuf,
    pub parser: Option<PathBuf>,
}

pub fn find(flavor: Flavor, dirs: &[SearchDir]) -> Option<Found> {
    let (core, parser) = flavor.libraries();
    let dir = dirs.iter().find(|d| d.path.join(core).exists())?;
    let parser = dirs
        .iter()
        .map(|d| d.path.join(parser))
        .find(|p| p.exists());
    Some(Found {
        flavor,
        core: dir.path.join(core),
        parser,
    })
}

/// A flavour's libraries, loaded for the rest of the process (TensorRT keeps threads; unloading is unsafe).
pub struct Loaded {
    pub flavor: Flavor,
    pub core: PathBuf,
    pub parser: PathBuf,
    /// The library's own version (getInferLibVersion), major*10000 + minor*100 + patch.
    pub version: i32,
    pub(crate) create_builder: usize,
    pub(crate) create_parser: usize,
    pub(crate) create_runtime: usize,
    pub(crate) create_refitter: usize,
}

fn symbol(lib: &'static libloading::Library, path: &Path, name: &str) -> Result<usize> {
    // SAFETY: we only take the address; it is called from C++ with the signature the headers declare.
    match unsafe { lib.get::<*const ()>(name.as_bytes()) } {
        Ok(s) => Ok(*s as usize),
        Err(e) => bail!(
            "'{}' has no symbol {name} ({e}): it is not a TensorRT library of the expected flavour",
            path.display()
        ),
    }
}

fn open(path: &Path) -> Result<&'static libloading::Library> {
    // SAFETY: loading TensorRT runs its initialisers, which have no preconditions.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => Ok(Box::leak(Box::new(lib))),
        Err(e) => bail!(
            "cannot load '{}': {e} (missing dependency or wrong architecture? check with `ldd`)",
            path.display()
        ),
    }
}

impl Loaded {
    pub fn load(found: &Found) -> Result<Arc<Loaded>> {
        static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<Loaded>>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(l) = cache.lock().unwrap().get(&found.core) {
            return Ok(l.clone());
        }
        let Some(parser_path) = &found.parser else {
            bail!(
                "found {} at '{}' but not its ONNX parser {}; {}",
                found.flavor.display(),
                found.core.display(),
                found.flavor.libraries().1,
                found.flavor.install_hint()
            );
        };
        // The core library first: the parser's dependency on it then resolves to this copy by soname.
        let core = open(&found.core)?;
        let parser = open(parser_path)?;
        let version_fn = symbol(core, &found.core, "getInferLibVersion")?;
        // SAFETY: getInferLibVersion is `int32_t() noexcept` in every TensorRT release.
        let version = unsafe { std::mem::transmute::<usize, extern "C" fn() -> i32>(version_fn)() };
        let loaded = Arc::new(Loaded {
            flavor: found.flavor,
            core: found.core.clone(),
            parser: parser_path.clone(),
            version,
            create_builder: symbol(core, &found.core, "createInferBuilder_INTERNAL")?,
            create_runtime: symbol(core, &found.core, "createInferRuntime_INTERNAL")?,
            create_refitter: symbol(core, &found.core, "createInferRefitter_INTERNAL")?,
            create_parser: symbol(parser, parser_path, "createNvOnnxParser_INTERNAL")?,
        });
        cache
            .lock()
            .unwrap()
            .insert(found.core.clone(), loaded.clone());
        Ok(loaded)
    }
}

fn not_found(flavors: &[Flavor], dirs: &[SearchDir]) -> anyhow::Error {
    let mut msg = String::new();
    for f in flavors {
        let (core, parser) = f.libraries();
        msg.push_str(&format!(
            "no {} library ({core} + {parser}) found.\n",
            f.display()
        ));
    }
    msg.push_str("Searched:\n");
    for d in dirs {
        msg.push_str(&format!("  {} ({})\n", d.path.display(), d.origin));
    }
    msg.push_str("To fix:\n");
    for f in flavors {
        msg.push_str(&format!("  {}: {}\n", f.display(), f.install_hint()));
    }
    anyhow::anyhow!(msg.trim_end().to_string())
}

/// Loads one flavour (for running a plan built by it).
pub fn load_flavor(flavor: Flavor, cli_dir: Option<&Path>) -> Result<Arc<Loaded>> {
    let dirs = search_dirs(cli_dir);
    match find(flavor, &dirs) {
        Some(found) => Loaded::load(&found),
        None => Err(not_found(&[flavor], &dirs)),
    }
}

/// Chooses and loads a flavour. With `auto`: the only one found, else TensorRT 11 on data-center GPUs
/// (compute capability 9.x/10.x, which TensorRT-RTX refuses) and TensorRT-RTX otherwise (including no GPU: its
/// builder runs on the CPU).
pub fn select(
    choice: TrtChoice,
    cli_dir: Option<&Path>,
    gpu_cc: Option<(i32, i32)>,
) -> Result<Arc<Loaded>> {
    let dirs = search_dirs(cli_dir);
    let wanted: Vec<Flavor> = match choice {
        TrtChoice::Rtx => vec![Flavor::Rtx],
        TrtChoice::Trt11 => vec![Flavor::Trt11],
        TrtChoice::Auto => match gpu_cc {
            Some((9 | 10, _)) => vec![Flavor::Trt11, Flavor::Rtx],
            _ => vec![Flavor::Rtx, Flavor::Trt11],
        },
    };
    for f in &wanted {
        if let Some(found) = find(*f, &dirs) {
            if choice == TrtChoice::Auto {
                tracing::info!(
                    "using {} from {} (--trt auto; GPU compute capability {})",
                    f.display(),
                    found.core.display(),
                    gpu_cc
                        .map(|(a, b)| format!("{a}.{b}"))
                        .unwrap_or_else(|| "none".into())
                );
            }
            return Loaded::load(&found);
        }
    }
    Err(not_found(&wanted, &dirs))
}
