//! `trt-diff doctor`: what this machine offers trt-diff (OS, CPU, GPUs and driver, TensorRT flavours found and
//! compiled in, ONNX Runtime).
use crate::trt::discovery::{Loaded, find, search_dirs};
use crate::trt::{Flavor, compiled_flavors};
use serde::Serialize;
use std::path::Path;

#[derive(Serialize)]
pub struct TrtStatus {
    pub flavor: Flavor,
    /// Library version and path, or why it is unusable.
    pub library: Result<(String, String), String>,
    /// Header version compiled into this binary, and the header folder; None when not compiled.
    pub headers: Option<(String, String)>,
}

#[derive(Serialize)]
pub struct Report {
    pub trt_diff: String,
    pub os: String,
    pub cpu: String,
    pub cores: usize,
    pub memory: String,
    pub cuda: Result<crate::cuda::CudaReport, String>,
    pub tensorrt: Vec<TrtStatus>,
    pub onnxruntime: Result<(String, String), String>,
}

fn first_match(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find(|l| l.starts_with(key)).and_then(|l| {
        l.split_once([':', '='])
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
    })
}

pub fn run(json: bool, trt: crate::cli::TrtArgs) -> anyhow::Result<()> {
    let r = report(trt.trt_lib_dir.as_deref());
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{r}");
    }
    Ok(())
}

pub fn report(trt_lib_dir: Option<&Path>) -> Report {
    let dirs = search_dirs(trt_lib_dir);
    let compiled = compiled_flavors();
    let tensorrt = Flavor::ALL
        .into_iter()
        .map(|flavor| {
            let library = match find(flavor, &dirs) {
                None => Err(format!(
                    "not found ({} folders searched; {})",
                    dirs.len(),
                    flavor.install_hint()
                )),
                Some(found) => Loaded::load(&found)
                    .map(|l| {
                        (
                            Flavor::version_string(l.version),
                            l.core.display().to_string(),
                        )
                    })
                    .map_err(|e| format!("{e:#}")),
            };
            let headers = compiled
                .iter()
                .find(|(f, _, _)| *f == flavor)
                .map(|(_, v, d)| (v.clone(), d.to_string()));
            TrtStatus {
                flavor,
                library,
                headers,
            }
        })
        .collect();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let os_name = first_match("/etc/os-release", "PRETTY_NAME")
        .unwrap_or_else(|| std::env::consts::OS.into());
    let mem_kb: u64 = first_match("/proc/meminfo", "MemTotal")
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Report {
        trt_diff: env!("CARGO_PKG_VERSION").into(),
        os: format!(
            "{os_name}, Linux {} ({})",
            kernel.trim(),
            std::env::consts::ARCH
        ),
        cpu: first_match("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into()),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        memory: crate::fsutil::human_bytes(mem_kb * 1024),
        cuda: crate::cuda::query(),
        tensorrt,
        onnxruntime: crate::backend::ort_lib::find()
            .map(|o| (o.version, o.path.display().to_string()))
            .map_err(|e| format!("{e:#}")),
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "trt-diff {}", self.trt_diff)?;
        writeln!(f, "OS          {}", self.os)?;
        writeln!(
            f,
            "CPU         {} ({} threads), {} RAM",
            self.cpu, self.cores, self.memory
        )?;
        match &self.cuda {
            Ok(c) if c.gpus.is_empty() => writeln!(
                f,
                "GPUs        none (driver CUDA {})",
                c.driver_cuda_version
            )?,
            Ok(c) => {
                writeln!(f, "Driver      CUDA {}", c.driver_cuda_version)?;
                for g in &c.gpus {
                    writeln!(
                        f,
                        "GPU {}       {} ({}, {})",
                        g.ordinal,
                        g.name,
                        g.sm(),
                        crate::fsutil::human_bytes(g.memory_bytes)
                    )?;
                }
            }
            Err(e) => writeln!(f, "GPUs        none: {e}")?,
        }
        for t in &self.tensorrt {
            let lib = match &t.library {
                Ok((v, p)) => format!("{v} at {p}"),
                Err(e) => e.clone(),
            };
            writeln!(f, "{:<13}library: {lib}", t.flavor.display())?;
            let hdr = match &t.headers {
                Some((v, d)) => format!("{v} from {d}"),
                None => {
                    "not compiled in (no headers at build time; run scripts/setup.sh and rebuild)"
                        .into()
                }
            };
            writeln!(f, "{:<13}headers: {hdr}", "")?;
        }
        match &self.onnxruntime {
            Ok((v, p)) => writeln!(f, "ONNX Runtime {v} at {p}"),
            Err(e) => writeln!(f, "ONNX Runtime: {e}"),
        }
    }
}
