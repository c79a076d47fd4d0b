//! Compiles the C++ side of the TensorRT bridge. Each flavour's headers are found in this order:
//! `TENSORRT_INCLUDE_DIR`, `TENSORRT_ROOT/include` (a real SDK wins for the flavour it is), then the headers of the
//! `trtx-sys` source package that scripts/setup.sh links into the cache. A flavour without headers is compiled as
//! a clear run-time error, so the crate always builds.
use std::env;
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    Rtx,
    Trt11,
}

fn sdk_flavor(dir: &Path) -> Option<Flavor> {
    let text = fs::read_to_string(dir.join("NvInferVersion.h")).ok()?;
    if text.contains("TRT_MAJOR_RTX") {
        return Some(Flavor::Rtx);
    }
    let major = text
        .lines()
        .find_map(|l| {
            let l = l.trim();
            let rest = l
                .strip_prefix("#define TRT_MAJOR_ENTERPRISE")
                .or_else(|| l.strip_prefix("#define NV_TENSORRT_MAJOR"))?;
            rest.split_whitespace().next()?.parse::<u32>().ok()
        })
        .unwrap_or(0);
    if major >= 11 {
        Some(Flavor::Trt11)
    } else {
        println!(
            "cargo:warning=TensorRT headers in {} are older than 11 and are not used",
            dir.display()
        );
        None
    }
}

fn cache_dir(manifest: &Path) -> PathBuf {
    env::var_os("TRT_DIFF_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join(".cache"))
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    for var in [
        "TENSORRT_INCLUDE_DIR",
        "TENSORRT_ROOT",
        "TRTX_HEADERS_DIR",
        "TRT_DIFF_CACHE",
        "CUDA_PATH",
        "CUDA_HOME",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for path in ["cpp", "include", "src/trt/ffi.rs"] {
        println!("cargo:rerun-if-changed={path}");
    }

    let mut rtx: Option<PathBuf> = None;
    let mut trt11: Option<PathBuf> = None;
    let sdk_dirs = [
        env::var_os("TENSORRT_INCLUDE_DIR").map(PathBuf::from),
        env::var_os("TENSORRT_ROOT").map(|r| PathBuf::from(r).join("include")),
    ];
    for dir in sdk_dirs.into_iter().flatten() {
        match sdk_flavor(&dir) {
            Some(Flavor::Rtx) if rtx.is_none() => rtx = Some(dir),
            Some(Flavor::Trt11) if trt11.is_none() => trt11 = Some(dir),
            _ => {}
        }
    }
    let trtx_headers = env::var_os("TRTX_HEADERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir(&manifest).join("trt-headers"));
    println!("cargo:rerun-if-changed={}", trtx_headers.display());
    if rtx.is_none() && trtx_headers.join("TRT-RTX-1.7/NvInfer.h").exists() {
        rtx = Some(trtx_headers.join("TRT-RTX-1.7"));
    }
    if trt11.is_none() && trtx_headers.join("TRT-Enterprise-11.4/NvInfer.h").exists() {
        trt11 = Some(trtx_headers.join("TRT-Enterprise-11.4"));
    }

    // NvInferRuntime*.h include cuda_runtime_api.h: a real CUDA toolkit wins, else the stub beside trtx-sys headers.
    let cuda_include = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(|v| env::var_os(v).map(|p| PathBuf::from(p).join("include")))
        .chain([PathBuf::from("/usr/local/cuda/include")])
        .chain([trtx_headers.clone()])
        .find(|d| d.join("cuda_runtime_api.h").exists());

    let mut build = cxx_build::bridge("src/trt/ffi.rs");
    build
        .file("cpp/bridge.cc")
        .file("cpp/flavor_rtx.cc")
        .file("cpp/flavor_trt11.cc")
        .std("c++17")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-unused-parameter");
    if let Some(dir) = &cuda_include {
        build.include(dir);
    }
    for (flavor, dir, key) in [(Flavor::Rtx, &rtx, "RTX"), (Flavor::Trt11, &trt11, "TRT11")] {
        let Some(dir) = dir else {
            println!(
                "cargo:warning=no {} headers found: that flavour reports an error at run time (run scripts/setup.sh)",
                if flavor == Flavor::Rtx {
                    "TensorRT-RTX"
                } else {
                    "TensorRT 11"
                }
            );
            println!("cargo:rustc-env=TRTD_HEADERS_{key}=");
            continue;
        };
        if cuda_include.is_none() {
            println!(
                "cargo:warning=cuda_runtime_api.h not found (set CUDA_PATH); the bridge may not compile"
            );
        }
        let quoted = |f: &str| format!("\"{}\"", dir.join(f).display());
        build.define(
            &format!("TRTD_{key}_NVINFER"),
            Some(quoted("NvInfer.h").as_str()),
        );
        build.define(
            &format!("TRTD_{key}_NVONNXPARSER"),
            Some(quoted("NvOnnxParser.h").as_str()),
        );
        println!("cargo:rustc-env=TRTD_HEADERS_{key}={}", dir.display());
    }
    build.compile("trtdiff_bridge");
}
