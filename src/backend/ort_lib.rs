//! Finding ONNX Runtime (loaded dynamically): `ORT_DYLIB_PATH`, then the set-up cache (its onnxruntime-gpu build
//! first when a GPU is present), then standard locations.
use anyhow::{Result, bail};
use std::ffi::{CStr, c_char};
use std::path::PathBuf;

pub struct OrtLibrary {
    pub path: PathBuf,
    pub version: String,
}

fn candidates() -> Vec<PathBuf> {
    let mut c = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        c.push(PathBuf::from(p));
    }
    // onnxruntime-gpu (`scripts/setup.sh --gpu`) holds the CPU provider too; preferred where a GPU is present.
    if crate::cuda::query().is_ok_and(|r| !r.gpus.is_empty()) {
        c.push(crate::fsutil::cache_dir().join("lib/gpu/libonnxruntime.so"));
    }
    c.push(crate::fsutil::cache_dir().join("lib/libonnxruntime.so"));
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        c.push(PathBuf::from(d).join("libonnxruntime.so"));
    }
    c
}

#[repr(C)]
struct OrtApiBase {
    get_api: unsafe extern "C" fn(u32) -> *const std::ffi::c_void,
    get_version_string: unsafe extern "C" fn() -> *const c_char,
}

/// Finds and loads ONNX Runtime, reading its version from `OrtGetApiBase()->GetVersionString()`.
pub fn find() -> Result<OrtLibrary> {
    let tried = candidates();
    let Some(path) = tried.iter().find(|p| p.exists()).cloned() else {
        let list: Vec<String> = tried.iter().map(|p| format!("  {}", p.display())).collect();
        bail!(
            "ONNX Runtime not found. Tried:\n{}\nFix: run scripts/setup.sh, or set ORT_DYLIB_PATH to libonnxruntime.so",
            list.join("\n")
        );
    };
    // SAFETY: loading ONNX Runtime runs its initialisers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(&path) }
        .map_err(|e| anyhow::anyhow!("cannot load ONNX Runtime '{}': {e}", path.display()))?;
    // SAFETY: OrtGetApiBase has had this signature since ONNX Runtime 1.0 and returns a static struct.
    let version = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn() -> *const OrtApiBase> = lib
            .get(b"OrtGetApiBase")
            .map_err(|e| anyhow::anyhow!("'{}' is not ONNX Runtime: {e}", path.display()))?;
        let base = get();
        if base.is_null() {
            bail!("'{}': OrtGetApiBase returned null", path.display());
        }
        CStr::from_ptr(((*base).get_version_string)())
            .to_string_lossy()
            .into_owned()
    };
    // Kept loaded: ONNX Runtime's threads may outlive any handle we drop.
    std::mem::forget(lib);
    Ok(OrtLibrary { path, version })
}
