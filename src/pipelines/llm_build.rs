//! `trt-diff build CHECKPOINT --arch llama2c --tokenizer TOK --out NAME.plan`: the decoder graph goes to
//! `NAME.onnx` (+ external data) beside the plan, the tokenizer to `NAME.tokenizer.bin`, the engine to `NAME.plan`
//! with a manifest that says how `generate` runs it. Without a usable GPU, `generate` runs `NAME.onnx` on the CPU.
use super::auto_precision::{self, AutoOptions};
use super::bundle::{file_name, sibling};
use crate::manifest::ShapeRange;
use crate::manifest::{LlmPipeline, Pipeline};
use crate::models::llama::{DecoderOptions, LlamaConfig, decoder_graph_opts};
use crate::onnx::{DataType, SaveOptions, save};
use crate::quant::LinearPrecision;
use crate::quant::Precision;
use crate::quant::auto::{Metric, Target, policy_of};
use crate::quant::policy::Policy;
use crate::trt::{BuildOptions, BuildOutcome, build_engine};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Optimization profiles: 1..max new tokens, 0..max-1 cached positions (prefill and decode in one engine).
pub fn decoder_profiles(c: &LlamaConfig) -> Vec<ShapeRange> {
    let max = c.max_seq_len as i64;
    let ids = |name: &str| ShapeRange {
        name: name.into(),
        min: vec![1, 1],
        opt: vec![1, 1],
        max: vec![1, max],
    };
    let mut v = vec![ids("input_ids"), ids("position_ids")];
    let (kv, hd) = (c.n_kv_heads as i64, c.head_dim() as i64);
    for i in 0..c.n_layers {
        for kind in ["key", "value"] {
            v.push(ShapeRange {
                name: format!("past_{kind}_{i}"),
                min: vec![1, kv, 0, hd],
                opt: vec![1, kv, max / 2, hd],
                max: vec![1, kv, max - 1, hd],
            });
        }
    }
    v
}

/// The decoder's linear layers for `--precision`.
pub fn linear_precision(p: Precision) -> Result<LinearPrecision> {
    Ok(match p {
        Precision::Fp32 => LinearPrecision::F32,
        Precision::Fp16 => LinearPrecision::F16,
        Precision::Fp8 => LinearPrecision::Fp8,
        Precision::Nvfp4 => LinearPrecision::Nvfp4,
        Precision::Int4 => LinearPrecision::Int4 { block: 32 },
        // The GGUF's block formats where it has them (`gguf_model::int_blocks`), f16 elsewhere.
        Precision::Gguf => LinearPrecision::F16,
        other => bail!(
            "--precision {other} is not available for LLM decoders; choose fp32, fp16, fp8, nvfp4 or int4"
        ),
    })
}

/// The one precision of every layer, or None for per-layer formats (`--precision auto`, `--policy FILE`).
fn fixed_precision(p: Precision, auto: &AutoOptions) -> Result<Option<LinearPrecision>> {
    if auto.per_layer(p)? {
        return Ok(None);
    }
    linear_precision(p).map(Some)
}

#[derive(serde::Deserialize)]
struct LlmRecipe {
    precision: LlmRecipePrecision,
}
#[derive(serde::Deserialize)]
struct LlmRecipePrecision {
    calibration_prompts: Vec<String>,
    heldout_prompts: Vec<String>,
}

/// The decoder's policy and activation ranges: the ModelOpt-like defaults of a fixed precision (static ranges), or
/// per-layer formats from a search (`--precision auto --quality KL`) or a policy file (`--policy`), calibrated on
/// the calibration prompts; the chosen formats are written to `NAME.policy.toml`.
fn decoder_policy(
    arch: &str,
    config: &LlamaConfig,
    tensors: &HashMap<String, Vec<f32>>,
    tokenizer: &Path,
    p: Option<LinearPrecision>,
    auto: &AutoOptions,
    base: &BuildOptions,
) -> Result<(Policy, HashMap<String, f32>)> {
    if let Some(p) = p {
        return Ok((Policy::defaults(p), HashMap::new()));
    }
    let recipe: LlmRecipe = super::recipe::load("llm")?;
    let pick = |given: &[String], default: Vec<String>| {
        if given.is_empty() {
            default
        } else {
            given.to_vec()
        }
    };
    let calibration = pick(
        &auto.calibration_prompts,
        recipe.precision.calibration_prompts,
    );
    let heldout = pick(&auto.heldout_prompts, recipe.precision.heldout_prompts);
    auto_precision::check_prompts(&calibration, &heldout)?;
    let tok = crate::tokenizer::text::load_tokenizer(tokenizer, config.vocab_size)?;
    let ids = |prompts: &[String]| -> Vec<Vec<i64>> {
        prompts
            .iter()
            .map(|t| {
                let mut v: Vec<i64> = tok.bos().map(|b| b as i64).into_iter().collect();
                v.extend(tok.encode(t).iter().map(|&x| x as i64));
                v.truncate(config.max_seq_len);
                v
            })
            .collect()
    };
    let (cal_ids, held_ids) = (ids(&calibration), ids(&heldout));
    let tmp = tempfile::tempdir_in(
        base.out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )
    .context("cannot create a calibration folder")?;
    let cand = tmp.path().join("candidate.onnx");
    let open_graph = |policy: &Policy, amax: &HashMap<String, f32>, calibration: bool| {
        let (graph, shapes) = decoder_graph_opts(
            config,
            tensors,
            &DecoderOptions {
                policy,
                last_logits_only: false,
                amax,
                calibration,
                blocks: None,
                int4_only: false,
            },
        )?;
        save(graph, &cand, &SaveOptions::default())?;
        let engine = super::engines::open_file(
            &crate::manifest::EngineFile::open(&cand)?,
            crate::backend::BackendChoice::Cpu,
            &Default::default(),
        )?;
        Ok::<_, anyhow::Error>((engine, shapes))
    };
    // Activation ranges of every linear layer's input over the calibration prompts (FP8/INT8 static scales).
    let none = HashMap::new();
    let (mut engine, shapes) = open_graph(&Policy::uniform(LinearPrecision::F32), &none, true)?;
    let mut amax = HashMap::new();
    for s in &cal_ids {
        let out = auto_precision::prefill(engine.as_mut(), s)?;
        crate::models::qdq::merge_amax(&mut amax, &out);
    }
    drop(engine);
    let target = Target::from_targets(&base.targets)?;
    let policy_out = sibling(&base.out, ".policy.toml");
    let mut table = None;
    if let Some(path) = &auto.policy {
        let pf =
            auto_precision::read_policy(path, &shapes, &target, auto.quality.map(|_| Metric::Kl))?;
        if auto.quality.is_none() {
            if std::path::absolute(path).ok() != std::path::absolute(&policy_out).ok() {
                pf.write(&policy_out)?;
            }
            return Ok((pf.to_policy()?, amax));
        }
        table = Some(pf.measured);
    }
    let quality = auto.quality.context(
        "--precision auto needs --quality KL: the mean next-token KL divergence (nats) allowed against the \
         unquantized model on held-out prompts (e.g. 0.02), or --policy FILE from an earlier search",
    )?;
    let am = &amax;
    let mut probe = auto_precision::LlmProbe::new(
        Box::new(|layers| Ok(open_graph(&policy_of(layers)?, am, false)?.0)),
        cal_ids,
        held_ids,
        config.vocab_size,
    )?;
    let spec = auto_precision::SearchSpec {
        arch: arch.to_string(),
        metric: Metric::Kl,
        quality,
        target,
        shapes: &shapes,
        // Decode steps: one token per GEMM.
        tokens: 1,
        base_bytes: 4,
        calibration_prompts: calibration,
        heldout_prompts: heldout,
    };
    let pf = auto_precision::run_search(&spec, &mut probe, table)?;
    tracing::info!("{}", probe.timings.describe());
    drop(probe);
    pf.write(&policy_out)?;
    Ok((pf.to_policy()?, amax))
}

/// The ONNX Runtime graphs' files beside a plan (`write_cpu_graph`).
const ORT_GRAPH_FILES: &[&str] = &[
    ".cpu.onnx",
    ".cpu.onnx.data",
    ".cuda.onnx",
    ".cuda.onnx.data",
];

/// Lists the files an LLM build is about to write beside the plan (`suffixes` of its name) in `guard`, so that a
/// failed or interrupted build removes them: a bundle's files appear all together or not at all.
fn guard_siblings(guard: &mut crate::fsutil::BundleGuard, out: &Path, suffixes: &[&str]) {
    for suffix in suffixes {
        guard.add(sibling(out, suffix));
    }
}

/// Where a decoder's weights come from.
pub enum LlmSource<'a> {
    /// A llama2.c checkpoint and its tokenizer file.
    Llama2c { tokenizer: &'a Path },
    /// A GGUF model (llama, qwen2 or qwen3) with its tokenizer in the metadata.
    Gguf,
    /// A Hugging Face folder (config.json + safetensors) and a GGUF file holding the tokenizer, or (None) the
    /// folder's own tokenizer.json.
    Hf { tokenizer: Option<&'a Path> },
}

/// Picks the source from the input: `--arch llama2c`, a `.gguf` file, or a folder with `config.json`.
pub fn detect_source<'a>(
    input: &Path,
    arch: Option<&str>,
    tokenizer: Option<&'a Path>,
) -> Result<LlmSource<'a>> {
    match arch {
        Some("llama2c") => Ok(LlmSource::Llama2c {
            tokenizer: tokenizer.context(
                "--arch llama2c needs --tokenizer TOKENIZER.bin (llama2.c's tokenizer file)",
            )?,
        }),
        Some("gguf") | None if crate::weights::gguf::looks_like_gguf(input) => Ok(LlmSource::Gguf),
        Some("hf") | None if input.join("config.json").exists() => {
            if tokenizer.is_none() && !crate::tokenizer::hf_vocab::has_tokenizer_json(input) {
                bail!(
                    "'{}' is a Hugging Face checkpoint without tokenizer.json: give its tokenizer as a GGUF file with \
                     --tokenizer FILE.gguf",
                    input.display()
                );
            }
            Ok(LlmSource::Hf { tokenizer })
        }
        Some(other) => bail!(
            "--arch {other} does not match '{}' (supported: llama2c, flux-dev, flux-schnell; GGUF files and Hugging Face folders are detected)",
            input.display()
        ),
        None => bail!(
            "'{}' is neither a GGUF file nor a Hugging Face folder with config.json; give --arch llama2c for llama2.c checkpoints",
            input.display()
        ),
    }
}

/// Writes the tokenizer metadata (`tokenizer.*`) of `src` as a vocab-only GGUF.
fn write_vocab_gguf(src: &crate::weights::gguf::GgufFile, out: &Path) -> Result<()> {
    let mut w = crate::weights::gguf_write::GgufWriter::default();
    for (k, v) in &src.metadata {
        if k.starts_with("tokenizer.") || k == "general.architecture" {
            w.set(k, v.clone());
        }
    }
    w.write(out)
}

/// Whether `path` is a GGUF file with quantized matrices: `build`'s default precision for it is `gguf`.
pub fn is_quantized_gguf(path: &Path) -> bool {
    crate::weights::gguf::looks_like_gguf(path)
        && crate::weights::gguf::GgufFile::open(path).is_ok_and(|g| {
            g.tensors.iter().any(|t| {
                t.dims.len() == 2 && crate::weights::gguf_model::engine_bits(t.ty).is_some()
            })
        })
}

/// The float type every matrix of a GGUF file shares (F32, F16 or BF16), which its CPU graph keeps; None for
/// quantized or mixed files.
pub fn gguf_matrix_type(g: &crate::weights::gguf::GgufFile) -> Option<DataType> {
    use crate::weights::gguf::GgmlType;
    let mut types = g.tensors.iter().filter(|t| t.dims.len() == 2).map(|t| t.ty);
    let first = types.next()?;
    if types.any(|t| t != first) {
        return None;
    }
    match first {
        GgmlType::F32 => Some(DataType::FLOAT),
        GgmlType::F16 => Some(DataType::FLOAT16),
        GgmlType::BF16 => Some(DataType::BFLOAT16),
        _ => None,
    }
}

/// As [`gguf_matrix_type`] for a Hugging Face folder, from the safetensors headers alone.
pub fn hf_matrix_type(dir: &Path) -> Result<Option<DataType>> {
    use std::io::Read;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.exists() {
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&index)?)
            .with_context(|| format!("'{}' is not JSON", index.display()))?;
        let mut f: Vec<String> = j["weight_map"]
            .as_object()
            .map(|m| {
                m.values()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        f.sort();
        f.dedup();
        f.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut seen: Option<String> = None;
    for file in files {
        let mut fh = std::fs::File::open(&file)
            .with_context(|| format!("cannot open '{}'", file.display()))?;
        let file_len = fh.metadata().map(|m| m.len()).unwrap_or(0);
        let mut n = [0u8; 8];
        fh.read_exact(&mut n)
            .with_context(|| format!("'{}' is too short for a safetensors file", file.display()))?;
        let len = u64::from_le_bytes(n);
        if len > 100 << 20 || len > file_len.saturating_sub(8) {
            bail!(
                "'{}': safetensors header of {len} bytes; not a safetensors file",
                file.display()
            );
        }
        let mut header = vec![0u8; len as usize];
        fh.read_exact(&mut header)?;
        let h: serde_json::Value = serde_json::from_slice(&header)
            .with_context(|| format!("'{}': unreadable safetensors header", file.display()))?;
        for (name, t) in h.as_object().into_iter().flatten() {
            if name == "__metadata__" || t["shape"].as_array().is_none_or(|s| s.len() != 2) {
                continue;
            }
            let dt = t["dtype"].as_str().unwrap_or("").to_string();
            match &seen {
                Some(s) if *s != dt => return Ok(None),
                _ => seen = Some(dt),
            }
        }
    }
    Ok(match seen.as_deref() {
        Some("F32") => Some(DataType::FLOAT),
        Some("F16") => Some(DataType::FLOAT16),
        Some("BF16") => Some(DataType::BFLOAT16),
        _ => None,
    })
}

/// Writes `<out>.cpu.onnx`, the decoder ONNX Runtime runs on the CPU (`models::llama_cpu`), for builds that keep
/// weights unquantized (fp32, fp16). Its weights keep the checkpoint's type when every matrix shares one (F32, F16
/// or BF16: 16-bit ones stream half the bytes per token of an f32 graph); quantized or mixed checkpoints, whose
/// matrices are dequantized, get the engine's own type (f16 for fp16 builds, the rounding the engine makes too).
/// With fp16 builds it also writes `<out>.cuda.onnx` (`write_cuda_graph`). Returns the file names for the manifest.
fn write_cpu_graph(
    out: &Path,
    weights: Option<DataType>,
    p: Option<LinearPrecision>,
    config: &LlamaConfig,
    tensors: &std::collections::HashMap<String, Vec<f32>>,
) -> Result<OrtGraphs> {
    let path = sibling(out, ".cpu.onnx");
    let weights = match (weights, p) {
        (Some(t), Some(LinearPrecision::F32 | LinearPrecision::F16)) => t,
        (None, Some(LinearPrecision::F32)) => DataType::FLOAT,
        (None, Some(LinearPrecision::F16)) => DataType::FLOAT16,
        _ => return Ok(OrtGraphs::default()),
    };
    let graph = crate::models::llama_cpu::decoder_graph_cpu(config, tensors, weights, true)?;
    save(graph, &path, &SaveOptions::default())?;
    // The CUDA provider's attention takes 16-bit types only: fp32 builds run the TensorRT graph there.
    let cuda = match (weights, p) {
        (DataType::FLOAT16 | DataType::BFLOAT16, _) => Some(weights),
        (_, Some(LinearPrecision::F16)) => Some(DataType::FLOAT16),
        _ => None,
    };
    // Gemma's activations outgrow float16 (its scaled embeddings and unnormed residual stream; transformers runs
    // it in bfloat16): its CUDA graph computes in bfloat16 whatever the checkpoint stores.
    let cuda = cuda.map(|t| match t {
        DataType::FLOAT16 if config.embed_scale.is_some() => DataType::BFLOAT16,
        t => t,
    });
    let cuda = match cuda {
        Some(t) => Some(write_cuda_graph(out, &path, t, config, tensors)?),
        None => None,
    };
    Ok(OrtGraphs {
        cpu: Some(file_name(&path)),
        cuda,
    })
}

/// The ONNX Runtime decoder graphs of a build, by file name.
#[derive(Default)]
struct OrtGraphs {
    cpu: Option<String>,
    cuda: Option<String>,
}

/// Writes `<out>.cuda.onnx`, the decoder for ONNX Runtime's CUDA provider (`llama_cpu::Target::Cuda`: flash
/// attention and the KV cache in place on the GPU). Matrices that the CPU graph `cpu` already stores with the same
/// name, type and shape are read from its data file rather than written twice; the rest (norms and biases in the
/// activations' type, or every matrix when the CPU graph keeps f32 ones) go to the graph's own data file.
fn write_cuda_graph(
    out: &Path,
    cpu: &Path,
    wtype: DataType,
    config: &LlamaConfig,
    tensors: &std::collections::HashMap<String, Vec<f32>>,
) -> Result<String> {
    let path = sibling(out, ".cuda.onnx");
    let mut graph = crate::models::llama_cpu::decoder_graph_cuda(config, tensors, wtype, true)?;
    let stored = crate::onnx::OnnxFile::load(cpu)?;
    let shared: HashMap<&str, &crate::onnx::proto::TensorProto> = stored
        .model
        .graph
        .iter()
        .flat_map(|g| &g.initializer)
        .filter(|t| crate::onnx::model::external_ref(t).is_some())
        .map(|t| (t.name.as_str(), t))
        .collect();
    let mut reused = 0u64;
    for t in graph
        .graph
        .iter_mut()
        .flat_map(|g| g.initializer.iter_mut())
    {
        if let Some(c) = shared.get(t.name.as_str())
            && c.data_type == t.data_type
            && c.dims == t.dims
        {
            reused += t.raw_data.len() as u64;
            t.raw_data = Default::default();
            t.data_location = c.data_location;
            t.external_data = c.external_data.clone();
        }
    }
    tracing::debug!(
        "'{}': {reused} bytes of matrices read from '{}'",
        path.display(),
        cpu.display()
    );
    save(graph, &path, &SaveOptions::default())?;
    Ok(file_name(&path))
}

/// Where a graph written to `out` finds `gguf` (a path relative to the graph's folder, as ONNX external data wants):
/// the file's name when both share a folder, otherwise `NAME.weights.gguf` beside the graph: a hard link to the file
/// (no bytes copied), or a copy where the two folders are on different file systems. Not a symbolic link: ONNX
/// Runtime (and trt-diff's own loader) refuse external data that leads out of the graph's folder.
fn gguf_location(out: &Path, gguf: &Path) -> Result<String> {
    let canon = |p: &Path| {
        std::fs::canonicalize(p).with_context(|| format!("cannot resolve '{}'", p.display()))
    };
    let target = canon(gguf)?;
    let out_dir = match out.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(d) => canon(d)?,
        None => canon(Path::new("."))?,
    };
    if target.parent() == Some(out_dir.as_path())
        && let Some(name) = target.file_name()
    {
        return Ok(name.to_string_lossy().into_owned());
    }
    let link = sibling(out, ".weights.gguf");
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(&link)
            .with_context(|| format!("cannot replace '{}'", link.display()))?;
    }
    if let Err(e) = std::fs::hard_link(&target, &link) {
        let bytes = std::fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
        tracing::warn!(
            "cannot hard-link '{}' beside the CPU graph ({e}); copying its {:.1} GB instead. To avoid the copy, \
             build into a folder on the same file system as the GGUF (for direct runs, set TRT_DIFF_MODEL_CACHE)",
            target.display(),
            bytes as f64 / 1e9
        );
        crate::fsutil::copy_atomic(&target, &link)?;
    }
    Ok(link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default())
}

/// Writes `<out>.cpu.onnx` for a GGUF file whose matrices the graph reads in place, in their own block formats.
fn write_cpu_graph_gguf(
    out: &Path,
    config: &LlamaConfig,
    tensors: &std::collections::HashMap<String, Vec<f32>>,
    ggml: &crate::backend::ggml_ops::GgmlWeights,
) -> Result<Option<String>> {
    let path = sibling(out, ".cpu.onnx");
    let graph = crate::models::llama_cpu::decoder_graph_cpu_gguf(config, tensors, ggml, true)?;
    save(graph, &path, &SaveOptions::default())?;
    Ok(path.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Exports and builds a decoder from any supported source; `max_context` caps the context length.
pub fn build_llm(
    input: &Path,
    source: LlmSource,
    precision: Precision,
    max_context: Option<usize>,
    auto: &AutoOptions,
    base: &BuildOptions,
) -> Result<BuildOutcome> {
    let p = fixed_precision(precision, auto)?;
    if precision == Precision::Gguf && !matches!(source, LlmSource::Gguf) {
        bail!(
            "--precision gguf keeps a GGUF file's block formats, and '{}' is not a GGUF file: choose fp16, fp8, \
             nvfp4 or int4",
            input.display()
        );
    }
    let mut in_place = None;
    let mut blocks = None;
    let mut guard = crate::fsutil::BundleGuard::new();
    let (arch, config, tensors, tok_out, matrices) = match source {
        LlmSource::Llama2c { tokenizer } => {
            guard.disarm();
            return build_llama2c(input, tokenizer, precision, auto, base);
        }
        LlmSource::Gguf => {
            let g = crate::weights::gguf::GgufFile::open(input)?;
            crate::tokenizer::llm_vocab::Vocab::from_gguf(&g)?;
            let m = crate::weights::gguf_model::load(&g, max_context)?;
            let matrices = gguf_matrix_type(&g);
            // Quantized or mixed files: the CPU graph reads the file's blocks in place, and the tokenizer reads the
            // same file rather than a copy of its vocabulary.
            let mut tok_out = None;
            if matrices.is_none() && matches!(p, Some(LinearPrecision::F32 | LinearPrecision::F16))
            {
                let location = gguf_location(&base.out, input)?;
                in_place = crate::backend::ggml_ops::block_weights(&g, &m.config, &location)?;
                if in_place.is_some() {
                    tok_out = Some(base.out.with_file_name(&location));
                }
            }
            let tok_out = match tok_out {
                Some(t) => t,
                None => {
                    let t = sibling(&base.out, ".tokenizer.gguf");
                    guard_siblings(&mut guard, &base.out, &[".tokenizer.gguf"]);
                    write_vocab_gguf(&g, &t)?;
                    t
                }
            };
            if precision == Precision::Gguf {
                blocks = Some(crate::weights::gguf_model::int_blocks(&g, &m.config)?);
            }
            (m.arch, m.config, m.tensors, tok_out, matrices)
        }
        LlmSource::Hf { tokenizer } => {
            let tok_out = sibling(&base.out, ".tokenizer.gguf");
            guard_siblings(&mut guard, &base.out, &[".tokenizer.gguf"]);
            let from = match tokenizer {
                Some(t) => {
                    write_vocab_gguf(&crate::weights::gguf::GgufFile::open(t)?, &tok_out)?;
                    t.to_path_buf()
                }
                None => {
                    crate::tokenizer::hf_vocab::vocab_gguf_from_hf(input)?.write(&tok_out)?;
                    input.join("tokenizer.json")
                }
            };
            let v = crate::tokenizer::llm_vocab::Vocab::open(&tok_out)
                .with_context(|| format!("the tokenizer of '{}'", from.display()))?;
            let m = crate::weights::hf::load(input, max_context)?;
            if v.n_tokens() > m.config.vocab_size {
                bail!(
                    "tokenizer '{}' has {} tokens, more than the model's vocabulary of {}",
                    from.display(),
                    v.n_tokens(),
                    m.config.vocab_size
                );
            }
            (m.arch, m.config, m.tensors, tok_out, hf_matrix_type(input)?)
        }
    };
    guard_siblings(&mut guard, &base.out, ORT_GRAPH_FILES);
    let graphs = match &in_place {
        Some(gw) => OrtGraphs {
            cpu: write_cpu_graph_gguf(&base.out, &config, &tensors, gw)?,
            cuda: None,
        },
        None => write_cpu_graph(&base.out, matrices, p, &config, &tensors)?,
    };
    let policy = decoder_policy(&arch, &config, &tensors, &tok_out, p, auto, base)?;
    let graph = decoder_graph_opts(
        &config,
        &tensors,
        &DecoderOptions {
            policy: &policy.0,
            last_logits_only: true,
            amax: &policy.1,
            calibration: false,
            blocks: blocks.as_ref(),
            int4_only: base.onnx_only || base.keep_onnx,
        },
    )?
    .0;
    drop(tensors);
    drop(blocks);
    let onnx = sibling(&base.out, ".onnx");
    guard_siblings(&mut guard, &base.out, &[".onnx", ".onnx.data"]);
    save(graph, &onnx, &SaveOptions::default())?;
    let mut opts = base.clone();
    opts.onnx = onnx;
    if opts.shapes.is_empty() {
        opts.shapes = decoder_profiles(&config);
    }
    opts.pipeline = Some(Pipeline::Llm(LlmPipeline {
        arch,
        config: serde_json::to_value(&config)?,
        tokenizer: file_name(&tok_out),
        precision: p.map_or("auto", |_| precision.name()).into(),
        cpu_onnx: graphs.cpu,
        cuda_onnx: graphs.cuda,
    }));
    let outcome = build_engine(&opts)?;
    // The plan holds the weights and the CPU graph reads the GGUF: a second copy in the TensorRT graph would double
    // the bundle, and the GGUF rebuilds it.
    if in_place.is_some() && !base.onnx_only && !base.keep_onnx {
        for f in [
            sibling(&base.out, ".onnx"),
            sibling(&base.out, ".onnx.data"),
        ] {
            if let Err(e) = std::fs::remove_file(&f)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!("cannot remove '{}': {e}", f.display());
            }
        }
        tracing::info!(
            "the TensorRT graph '{}' is not kept (the plan holds the weights, the CPU graph reads the GGUF; \
             --keep-onnx keeps it for ONNX Runtime's CUDA provider)",
            file_name(&opts.onnx)
        );
    }
    guard.disarm();
    Ok(outcome)
}

/// Exports and builds a llama2.c checkpoint; `base` carries the TensorRT options.
pub fn build_llama2c(
    checkpoint: &Path,
    tokenizer: &Path,
    precision: Precision,
    auto: &AutoOptions,
    base: &BuildOptions,
) -> Result<BuildOutcome> {
    let model = crate::weights::llama2c::Llama2c::load(checkpoint)?;
    // Loading validates the tokenizer against the model's vocabulary before anything is written.
    crate::tokenizer::llama2c::Llama2cTokenizer::load(tokenizer, model.config.vocab_size)?;
    let p = fixed_precision(precision, auto)?;
    let mut guard = crate::fsutil::BundleGuard::new();
    guard_siblings(&mut guard, &base.out, ORT_GRAPH_FILES);
    // llama2.c checkpoints are f32.
    let graphs = write_cpu_graph(
        &base.out,
        Some(DataType::FLOAT),
        p,
        &model.config,
        &model.tensors,
    )?;
    let policy = decoder_policy(
        "llama2c",
        &model.config,
        &model.tensors,
        tokenizer,
        p,
        auto,
        base,
    )?;
    let graph = decoder_graph_opts(
        &model.config,
        &model.tensors,
        &DecoderOptions {
            policy: &policy.0,
            last_logits_only: true,
            amax: &policy.1,
            calibration: false,
            blocks: None,
            int4_only: false,
        },
    )?
    .0;
    let onnx = sibling(&base.out, ".onnx");
    guard_siblings(&mut guard, &base.out, &[".onnx", ".onnx.data"]);
    save(graph, &onnx, &SaveOptions::default())?;
    let tok_out = sibling(&base.out, ".tokenizer.bin");
    guard_siblings(&mut guard, &base.out, &[".tokenizer.bin"]);
    crate::fsutil::copy_atomic(tokenizer, &tok_out)
        .with_context(|| format!("cannot copy the tokenizer to '{}'", tok_out.display()))?;
    let mut opts = base.clone();
    opts.onnx = onnx;
    if opts.shapes.is_empty() {
        opts.shapes = decoder_profiles(&model.config);
    }
    opts.pipeline = Some(Pipeline::Llm(LlmPipeline {
        arch: "llama2c".into(),
        config: serde_json::to_value(&model.config)?,
        tokenizer: file_name(&tok_out),
        precision: p.map_or("auto", |_| precision.name()).into(),
        cpu_onnx: graphs.cpu,
        cuda_onnx: graphs.cuda,
    }));
    let outcome = build_engine(&opts)?;
    guard.disarm();
    Ok(outcome)
}
