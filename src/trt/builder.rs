//! `trt-diff build FILE.onnx`: parse with TensorRT's ONNX parser, build a strongly typed engine, stream the plan
//! to disk and write its manifest. Outputs appear only when everything succeeded.
use super::discovery::{Flavor, Loaded, TrtChoice, select};
use super::ffi::bridge;
use super::observer::BuildObserver;
use super::shapes::{ShapeRange, resolve_profiles};
use crate::fsutil::{AtomicFile, sha256_file, xxh3_file};
use crate::manifest::{
    BuilderInfo, ExternalFile, IoTensor, Manifest, PlanInfo, SourceInfo, TensorRtInfo,
};
use crate::onnx::OnnxFile;
use crate::onnx::model::external_ref;
use crate::onnx::summary::dims_of;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// TensorRT-RTX compute-capability targets accepted by `--targets`.
pub const RTX_TARGETS: &[&str] = &["sm75", "sm80", "sm86", "sm89", "sm120", "sm121"];

#[derive(Clone, Debug, Default)]
pub struct BuildOptions {
    pub onnx: PathBuf,
    pub out: PathBuf,
    pub trt: TrtChoice,
    pub trt_lib_dir: Option<PathBuf>,
    pub shapes: Vec<ShapeRange>,
    pub opt_level: Option<i32>,
    pub workspace_bytes: Option<u64>,
    pub timing_cache: Option<PathBuf>,
    pub targets: Vec<String>,
    pub refit: bool,
    pub weight_streaming: bool,
    pub progress: bool,
    /// Recorded in the manifest for pipeline engines.
    pub pipeline: Option<crate::manifest::Pipeline>,
    /// Let the ONNX file's external data live outside its folder (`--allow-external-paths`); off by default.
    pub allow_external_paths: bool,
    /// Most ONNX graph nodes accepted (None: [`crate::onnx::model::default_max_nodes`]; Some(0): no limit).
    pub max_onnx_nodes: Option<usize>,
    /// Write the manifest of an ONNX-only bundle (no TensorRT plan, no TensorRT library needed).
    pub onnx_only: bool,
    /// Quantized GGUF builds keep the TensorRT graph beside the plan (otherwise it is removed once the plan is
    /// built: the GGUF itself is the bundle's source).
    pub keep_onnx: bool,
}

/// Wall-clock split of one build, for the overhead benchmark.
#[derive(Clone, Debug, Default)]
pub struct BuildTimings {
    pub total: f64,
    /// Loading the TensorRT libraries (dlopen), which any TensorRT program pays.
    pub library_load: f64,
    /// Inside TensorRT: builder creation, ONNX parse, engine build and plan streaming, without our hashing.
    pub trt_total: f64,
    pub trt_parse: f64,
    pub trt_build: f64,
    /// Hashing the sources, on a thread running beside TensorRT.
    pub source_hash: f64,
}

pub struct BuildOutcome {
    pub manifest: Manifest,
    /// What `--engine` takes: the plan, or the manifest of an ONNX-only bundle.
    pub engine: PathBuf,
    pub manifest_path: PathBuf,
    pub timings: BuildTimings,
}

fn check_options(o: &BuildOptions) -> Result<()> {
    if let Some(l) = o.opt_level
        && !(0..=5).contains(&l)
    {
        bail!("--opt-level {l}: TensorRT's builder optimization level is 0..=5");
    }
    if o.out.extension().is_some_and(|e| e == "onnx") {
        bail!(
            "--out '{}' ends in .onnx: give the engine a .plan name",
            o.out.display()
        );
    }
    if same_file(&o.onnx, &o.out) {
        bail!(
            "--out '{}' is the input file: choose another output name",
            o.out.display()
        );
    }
    if !o.targets.is_empty() && o.trt == TrtChoice::Trt11 {
        bail!(
            "--targets selects TensorRT-RTX compute capabilities and cannot be combined with --trt trt11"
        );
    }
    for t in &o.targets {
        if !RTX_TARGETS.contains(&t.as_str()) {
            bail!(
                "--targets '{t}' is not a TensorRT-RTX target; choose from {}",
                RTX_TARGETS.join(", ")
            );
        }
    }
    if o.workspace_bytes == Some(0) {
        bail!(
            "--workspace 0 leaves TensorRT no scratch memory; give a size in MiB or leave it out"
        );
    }
    Ok(())
}

/// FP8 compute needs sm89+, FP4 needs Blackwell (sm120+): catch impossible `--targets` before TensorRT does.
fn check_targets_support(onnx: &OnnxFile, targets: &[String]) -> Result<()> {
    if targets.is_empty() {
        return Ok(());
    }
    let summary = crate::onnx::summary::OnnxSummary::of(onnx);
    let uses = |fmt: &str| summary.qdq.iter().any(|q| q.format.starts_with(fmt));
    let sm = |t: &str| t.trim_start_matches("sm").parse::<u32>().unwrap_or(0);
    for (fmt, min, what) in [
        ("float4e2m1", 120, "FP4 (NVFP4)"),
        ("float8e4m3fn", 89, "FP8"),
    ] {
        let too_old: Vec<&str> = targets
            .iter()
            .map(|t| t.as_str())
            .filter(|t| sm(t) < min)
            .collect();
        if uses(fmt) && !too_old.is_empty() {
            bail!(
                "'{}' computes in {what}, which target(s) {} cannot run (needs sm{min} or newer); drop them from \
                 --targets or export the model in a higher precision",
                onnx.path.display(),
                too_old.join(", ")
            );
        }
    }
    Ok(())
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Non-initializer graph inputs with their dimensions.
fn graph_inputs(onnx: &OnnxFile) -> Vec<(String, Vec<crate::onnx::Dim>)> {
    let Some(g) = &onnx.model.graph else {
        return vec![];
    };
    let inits: std::collections::HashSet<&str> =
        g.initializer.iter().map(|t| t.name.as_str()).collect();
    g.input
        .iter()
        .filter(|v| !inits.contains(v.name.as_str()))
        .map(|v| (v.name.clone(), dims_of(v).unwrap_or_default()))
        .collect()
}

fn check_versions(lib: &Loaded) -> Result<i32> {
    let compiled: Vec<String> = bridge::compiled_flavors();
    if !compiled.iter().any(|f| f == lib.flavor.key()) {
        bail!(
            "this trt-diff was compiled without {} headers, so it cannot drive '{}'; run scripts/setup.sh (or set \
             TENSORRT_INCLUDE_DIR) and rebuild trt-diff",
            lib.flavor.display(),
            lib.core.display()
        );
    }
    let header = bridge::header_version(lib.flavor.key());
    if header / 10000 != lib.version / 10000 {
        bail!(
            "'{}' is {} {} but trt-diff was compiled against {} headers: install a {}.x library or rebuild trt-diff \
             with matching headers (TENSORRT_INCLUDE_DIR)",
            lib.core.display(),
            lib.flavor.display(),
            Flavor::version_string(lib.version),
            Flavor::version_string(header),
            header / 10000
        );
    }
    Ok(header)
}

fn parse_failure(onnx: &Path, report: &bridge::BuildReport, lib: &Loaded) -> anyhow::Error {
    let mut msg = format!(
        "'{}': the {} {} ONNX parser rejected the model:",
        onnx.display(),
        lib.flavor.display(),
        Flavor::version_string(lib.version)
    );
    for i in &report.parse_issues {
        if i.node >= 0 {
            msg.push_str(&format!(
                "\n  node {} '{}' (op {}): {}",
                i.node, i.node_name, i.op, i.desc
            ));
        } else {
            msg.push_str(&format!("\n  {}", i.desc));
        }
    }
    msg.push_str(
        "\nFix: replace or decompose the named node (unsupported op, attribute or type for this TensorRT), or \
         re-export the model if the file is damaged.",
    );
    anyhow::anyhow!(msg)
}

fn hash_sources(onnx: &OnnxFile) -> Result<(String, Vec<ExternalFile>)> {
    let sha = sha256_file(&onnx.path)?;
    let mut files: Vec<String> = Vec::new();
    if let Some(g) = &onnx.model.graph {
        for t in &g.initializer {
            if let Some(r) = external_ref(t)
                && !files.contains(&r.location)
            {
                files.push(r.location);
            }
        }
    }
    let mut ext = Vec::new();
    for f in files {
        let p = onnx.external_path(&f)?;
        ext.push(ExternalFile {
            bytes: std::fs::metadata(&p)?.len(),
            xxh3_128: xxh3_file(&p)?,
            file: f,
        });
    }
    Ok((sha, ext))
}

/// While TensorRT builds, gives the resident pages of the mapped weights back to the kernel every few
/// milliseconds. TensorRT copies every weight into its own memory; pages it has read need not stay resident in
/// this process too (peak RSS would hold the weights twice). The mappings stay valid: a page read again refaults
/// from the page cache (a minor fault, no I/O).
fn release_mapped_pages(regions: &[(usize, usize)], building: &AtomicBool) {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    while building.load(Ordering::Relaxed) {
        for &(ptr, len) in regions {
            let begin = ptr.next_multiple_of(page);
            let end = (ptr + len) / page * page;
            if end > begin {
                // SAFETY: whole pages inside a live read-only file mapping (owned by `weights`, which outlives the
                // build); MADV_DONTNEED on such pages only drops them from this process's page tables.
                unsafe {
                    libc::madvise(begin as *mut libc::c_void, end - begin, libc::MADV_DONTNEED)
                };
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

pub fn build_engine(o: &BuildOptions) -> Result<BuildOutcome> {
    let start = Instant::now();
    check_options(o)?;
    let onnx = OnnxFile::load_with(
        &o.onnx,
        &crate::onnx::model::LoadOptions {
            allow_external: o.allow_external_paths,
            max_nodes: Some(
                o.max_onnx_nodes
                    .unwrap_or_else(crate::onnx::model::default_max_nodes),
            ),
        },
    )?;
    for t in onnx.model.graph.iter().flat_map(|g| &g.initializer) {
        if let Some(r) = external_ref(t)
            && same_file(&onnx.external_path(&r.location)?, &o.out)
        {
            bail!(
                "--out '{}' is the model's external data file: choose another output name",
                o.out.display()
            );
        }
    }
    tracing::debug!("model read in {:.3}s", start.elapsed().as_secs_f64());
    let profiles = resolve_profiles(&graph_inputs(&onnx), &o.shapes)?;
    if o.onnx_only {
        return write_onnx_bundle(o, &onnx, &profiles, start);
    }
    let gpu_cc = crate::cuda::query()
        .ok()
        .and_then(|r| r.gpus.first().map(|g| g.compute_capability));
    let load_start = Instant::now();
    let lib = select(o.trt, o.trt_lib_dir.as_deref(), gpu_cc)?;
    let library_load = load_start.elapsed().as_secs_f64();
    if !o.targets.is_empty() && lib.flavor != Flavor::Rtx {
        bail!(
            "--targets applies to TensorRT-RTX, but {} was selected; drop --targets or use --trt rtx",
            lib.flavor.display()
        );
    }
    tracing::debug!("TensorRT loaded at {:.3}s", start.elapsed().as_secs_f64());
    let header = check_versions(&lib)?;
    check_targets_support(&onnx, &o.targets)?;

    let timing_in = match &o.timing_cache {
        Some(p) if p.exists() => std::fs::read(p)
            .with_context(|| format!("cannot read timing cache '{}'", p.display()))?,
        _ => Vec::new(),
    };
    // Mapped external weights, handed to the parser by address; they outlive the build below.
    let weights = onnx.external_weights()?;
    // The sources are hashed on another thread while TensorRT parses and builds.
    let building = AtomicBool::new(true);
    let regions: Vec<(usize, usize)> = weights
        .iter()
        .map(|(_, b)| (b.as_ptr() as usize, b.len()))
        .collect();
    let hasher = std::thread::scope(|scope| -> Result<_> {
        let hashing = scope.spawn(|| {
            let t = Instant::now();
            hash_sources(&onnx).map(|h| (h, t.elapsed().as_secs_f64()))
        });
        scope.spawn(|| release_mapped_pages(&regions, &building));
        // Stops the page releaser on every way out of this closure, so the scope can end.
        let _stop = StopOnDrop(&building);
        let plan_file = AtomicFile::create(&o.out)?;
        let spec = bridge::BuildSpec {
            flavor: lib.flavor.key().into(),
            create_builder: lib.create_builder,
            create_parser: lib.create_parser,
            onnx_path: absolute(&o.onnx).to_string_lossy().into_owned(),
            model_ptr: onnx.raw.as_ptr() as usize,
            model_len: onnx.raw.len(),
            weights: weights
                .iter()
                .map(|(name, b)| bridge::WeightRef {
                    name: name.clone(),
                    ptr: b.as_ptr() as usize,
                    len: b.len(),
                })
                .collect(),
            plan_path: plan_file.temp_path().to_string_lossy().into_owned(),
            profiles: profiles
                .iter()
                .map(|p| bridge::ProfileSpec {
                    name: p.name.clone(),
                    min: p.min.clone(),
                    opt: p.opt.clone(),
                    max: p.max.clone(),
                })
                .collect(),
            opt_level: o.opt_level.unwrap_or(-1),
            workspace_bytes: o.workspace_bytes.unwrap_or(0),
            refit: o.refit,
            weight_streaming: o.weight_streaming,
            targets: o.targets.clone(),
            use_timing_cache: o.timing_cache.is_some(),
            timing_cache_in: timing_in,
        };
        let observer = BuildObserver::new(o.progress, gpu_cc.is_some());
        let report = bridge::build_engine(&spec, &observer);
        tracing::debug!("TensorRT done at {:.3}s", start.elapsed().as_secs_f64());
        let hashes = hashing
            .join()
            .map_err(|_| anyhow::anyhow!("hashing thread failed"))?;
        Ok((plan_file, report, observer, hashes))
    });
    let (plan_file, report, observer, hashes) = hasher?;
    if !report.ok {
        if !report.parse_issues.is_empty() {
            return Err(parse_failure(&o.onnx, &report, &lib));
        }
        let mut msg = format!(
            "building '{}' with {} failed: {}",
            o.onnx.display(),
            lib.flavor.display(),
            report.error
        );
        let errors = observer.errors();
        for e in &errors {
            msg.push_str(&format!("\n  TensorRT: {e}"));
        }
        if gpu_cc.is_none()
            && errors
                .iter()
                .any(|e| super::observer::is_no_cuda_message(e))
        {
            msg.push_str(
                "\nFix: this build needs a CUDA GPU and driver, and this machine has none. TensorRT-RTX builds \
                 refittable engines (--refit) only with a GPU; build on a machine with an NVIDIA GPU or drop --refit.",
            );
        }
        bail!(msg);
    }
    let ((source_sha, external), source_hash) = hashes?;
    if let Some(p) = &o.timing_cache
        && observer
            .warnings()
            .iter()
            .any(|w| w.contains("deserialize timing cache"))
    {
        tracing::warn!(
            "timing cache '{}' could not be read (damaged, or from another TensorRT version): the build started \
             from an empty cache and the file is replaced",
            p.display()
        );
    }
    let mut timing_written = None;
    if let Some(p) = &o.timing_cache {
        let mut f = AtomicFile::create(p)?;
        std::io::Write::write_all(&mut f, &report.timing_cache)?;
        f.commit()?;
        timing_written = Some(p.display().to_string());
    }

    let profile_of = |name: &str| profiles.iter().find(|p| p.name == name).cloned();
    let manifest = Manifest {
        format: crate::manifest::FORMAT.into(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        created_by: format!("trt-diff {}", env!("CARGO_PKG_VERSION")),
        plan: Some(PlanInfo {
            file: o
                .out
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: report.plan_bytes,
            xxh3_128: observer.plan_xxh3(),
        }),
        tensorrt: Some(TensorRtInfo {
            flavor: lib.flavor,
            version: Flavor::version_string(lib.version),
            header_version: Flavor::version_string(header),
            library: lib.core.display().to_string(),
            targets: o.targets.clone(),
        }),
        io: report
            .io
            .iter()
            .map(|t| IoTensor {
                name: t.name.clone(),
                mode: if t.is_input { "input" } else { "output" }.into(),
                dtype: t.dtype.clone(),
                shape: t.dims.clone(),
                profile: if t.is_input {
                    profile_of(&t.name)
                } else {
                    None
                },
            })
            .collect(),
        builder: Some(BuilderInfo {
            strongly_typed: true,
            optimization_level: o.opt_level,
            workspace_bytes: o.workspace_bytes,
            refittable: o.refit,
            weight_streaming: o.weight_streaming,
            timing_cache: timing_written,
            layers: report.num_layers,
            parse_seconds: report.parse_seconds,
            build_seconds: report.build_seconds,
        }),
        source: SourceInfo {
            onnx: crate::fsutil::relative_name(&o.onnx, o.out.parent().unwrap_or(Path::new(".")))
                .unwrap_or_else(|| o.onnx.display().to_string()),
            bytes: onnx.file_bytes,
            sha256: source_sha,
            external_data: external,
        },
        pipeline: o.pipeline.clone(),
    };
    tracing::debug!("sources hashed at {:.3}s", start.elapsed().as_secs_f64());
    let pending = manifest.write_pending(&o.out)?;
    plan_file.commit()?;
    pending.commit()?;
    tracing::debug!("outputs committed at {:.3}s", start.elapsed().as_secs_f64());
    Ok(BuildOutcome {
        manifest_path: crate::manifest::sidecar_path(&o.out),
        engine: o.out.clone(),
        manifest,
        timings: BuildTimings {
            total: start.elapsed().as_secs_f64(),
            library_load,
            trt_total: report.total_seconds - observer.plan_hash_seconds(),
            trt_parse: report.parse_seconds,
            trt_build: report.build_seconds,
            source_hash,
        },
    })
}

/// `build --onnx-only`: the manifest of the graph as it is (its inputs and outputs, the profiles as the
/// pipelines' shape checks use them, the source's checksums), written as `OUT.json` with no plan beside it.
fn write_onnx_bundle(
    o: &BuildOptions,
    onnx: &OnnxFile,
    profiles: &[ShapeRange],
    start: Instant,
) -> Result<BuildOutcome> {
    let dir = o.out.parent().unwrap_or(Path::new("."));
    let source = crate::fsutil::relative_name(&o.onnx, dir)
        .filter(|n| !n.starts_with("..") && !Path::new(n).is_absolute());
    let Some(source) = source else {
        bail!(
            "--onnx-only: the bundle's manifest must sit in the folder of '{}' (engines read only files beside \
             them), and --out '{}' is elsewhere; give --out a name in that folder",
            o.onnx.display(),
            o.out.display()
        );
    };
    let hash_start = Instant::now();
    let (source_sha, external) = hash_sources(onnx)?;
    let source_hash = hash_start.elapsed().as_secs_f64();
    let mut io = Vec::new();
    if let Some(g) = &onnx.model.graph {
        let inits: std::collections::HashSet<&str> =
            g.initializer.iter().map(|t| t.name.as_str()).collect();
        let inputs = g.input.iter().filter(|v| !inits.contains(v.name.as_str()));
        for (v, mode) in inputs
            .map(|v| (v, "input"))
            .chain(g.output.iter().map(|v| (v, "output")))
        {
            let shape = dims_of(v)
                .unwrap_or_default()
                .iter()
                .map(|d| match d {
                    crate::onnx::Dim::Fixed(n) => *n,
                    _ => -1,
                })
                .collect();
            io.push(IoTensor {
                name: v.name.clone(),
                mode: mode.into(),
                dtype: crate::onnx::summary::elem_type(v).name(),
                shape,
                profile: profiles.iter().find(|p| p.name == v.name).cloned(),
            });
        }
    }
    let manifest = Manifest {
        format: crate::manifest::FORMAT.into(),
        created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        created_by: format!("trt-diff {}", env!("CARGO_PKG_VERSION")),
        plan: None,
        tensorrt: None,
        io,
        builder: None,
        source: SourceInfo {
            onnx: source,
            bytes: onnx.file_bytes,
            sha256: source_sha,
            external_data: external,
        },
        pipeline: o.pipeline.clone(),
    };
    manifest.write_pending(&o.out)?.commit()?;
    let manifest_path = crate::manifest::sidecar_path(&o.out);
    Ok(BuildOutcome {
        engine: manifest_path.clone(),
        manifest_path,
        manifest,
        timings: BuildTimings {
            total: start.elapsed().as_secs_f64(),
            source_hash,
            ..Default::default()
        },
    })
}

/// Flavours compiled into this binary, with the TensorRT version of their headers and the header folder.
pub fn compiled_flavors() -> Vec<(Flavor, String, &'static str)> {
    bridge::compiled_flavors()
        .iter()
        .filter_map(|k| {
            let f = Flavor::ALL.into_iter().find(|f| f.key() == k)?;
            let dir = match f {
                Flavor::Rtx => env!("TRTD_HEADERS_RTX"),
                Flavor::Trt11 => env!("TRTD_HEADERS_TRT11"),
            };
            Some((f, Flavor::version_string(bridge::header_version(k)), dir))
        })
        .collect()
}
