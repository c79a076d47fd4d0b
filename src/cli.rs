//! Command-line definitions and their mapping onto library calls; no logic of its own.
use crate::fsutil::human_bytes;
use crate::trt::shapes::{join, parse_shapes};
use crate::trt::{BuildOptions, TrtChoice};
use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "trt-diff",
    version,
    about = "Build TensorRT engines from diffusion models and small LLMs"
)]
pub struct Cli {
    /// More log output (-v debug, -vv trace, TensorRT's own log included).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Report GPUs, driver, TensorRT flavours and ONNX Runtime found on this machine.
    Doctor {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        trt: TrtArgs,
    },
    /// Build a TensorRT engine (NAME.plan + NAME.plan.json manifest) from an ONNX file.
    Build(BuildArgs),
    /// Run an engine (.plan, or .onnx on the CPU) on .npy inputs; write .npy outputs, print latency statistics.
    Run(RunArgs),
    /// Generate text with an LLM engine, or images with a Flux bundle, built by `trt-diff build --arch ...`.
    Generate(GenerateArgs),
    /// Export a model folder to ONNX, one graph per component (Flux: transformer, clip, t5, vae_decoder, vae_encoder).
    Export(ExportArgs),
    /// Serve an LLM engine over HTTP: /v1/generate (SSE streaming), /v1/completions, /health, /metrics.
    Serve {
        #[arg(long)]
        engine: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// 0 picks a free port (printed as `listening on ...`).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        #[arg(long, value_enum, default_value_t = crate::runner::BackendChoice::Auto)]
        backend: crate::runner::BackendChoice,
    },
    /// Show what is inside a .onnx or .plan file.
    Inspect {
        file: PathBuf,
        #[arg(long)]
        json: bool,
        /// For a quantized .safetensors: the original checkpoint; prints each quantized tensor's error
        /// (RMSE, max abs, SQNR) after dequantization.
        #[arg(long, value_name = "ORIGINAL")]
        against: Option<PathBuf>,
    },
    /// Quantize the weights of a safetensors checkpoint (bitsandbytes / ModelOpt layouts).
    Quantize(QuantizeArgs),
    /// Token ids of text with the tokenizer in a GGUF file (no BOS), or with --decode the text of ids.
    Tokenize {
        /// A GGUF file with tokenizer metadata (vocab-only files work).
        #[arg(long)]
        vocab: PathBuf,
        /// Text to tokenize, or with --decode ids separated by spaces or commas.
        text: String,
        #[arg(long)]
        decode: bool,
        /// Let special tokens written in the text (e.g. <|im_start|>) become those tokens.
        #[arg(long)]
        parse_special: bool,
    },
    /// Convert a checkpoint to GGUF: `convert llama2c MODEL.bin --tokenizer TOK.bin --out MODEL.gguf`.
    Convert {
        /// Source format: llama2c.
        format: String,
        input: PathBuf,
        #[arg(long)]
        tokenizer: PathBuf,
        #[arg(long, short)]
        out: PathBuf,
    },
    /// Samplers and schedules: list them, print a schedule, or check a sampler on an exact problem.
    Samplers {
        #[command(subcommand)]
        cmd: SamplersCmd,
    },
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// The input .safetensors checkpoint.
    pub input: PathBuf,
    #[arg(long, value_enum)]
    pub format: crate::quant::checkpoint::Format,
    /// Output .safetensors file (written to a temporary name, renamed when complete).
    #[arg(long, short)]
    pub out: PathBuf,
    /// Elements per scale block (nf4/fp4: 32..4096, default 64; int4: default 128; int8: per channel
    /// without it; nvfp4 16 and mxfp8 32 are fixed).
    #[arg(long, value_name = "N")]
    pub block_size: Option<usize>,
    /// nf4/fp4: quantize the block absmax again (bitsandbytes' compress_statistics).
    #[arg(long)]
    pub double_quant: bool,
    /// Quantize only tensors whose names match (repeatable; default: every float `*.weight` of rank >= 2).
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Keep tensors whose names match unquantized (repeatable).
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// The engine: a .plan built by `trt-diff build`, or an .onnx file (CPU backend).
    #[arg(long)]
    pub engine: PathBuf,
    /// An input as NAME=FILE.npy (repeat for each input).
    #[arg(long, value_name = "NAME=FILE")]
    pub input: Vec<String>,
    /// Folder for the outputs, one NAME.npy each.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = crate::runner::BackendChoice::Auto)]
    pub backend: crate::runner::BackendChoice,
    /// Timed runs (after one warm-up run when more than one).
    #[arg(long, default_value_t = 1)]
    pub iterations: usize,
    /// Also run on this backend and print the max abs / relative difference of every output.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub compare_with: Option<crate::runner::BackendChoice>,
    /// ONNX Runtime intra-op threads (0: its default).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// TensorRT: replay executions as a CUDA graph while shapes stay the same.
    #[arg(long)]
    pub cuda_graph: bool,
    /// TensorRT: device memory for weights in MiB; the rest streams from host memory (plans built with
    /// --weight-streaming).
    #[arg(long, value_name = "MIB")]
    pub weight_budget: Option<i64>,
    /// TensorRT: refit the plan (built with --refit) with the same-named tensors of this safetensors file first.
    #[arg(long, value_name = "FILE.safetensors")]
    pub refit: Option<PathBuf>,
}

#[derive(Args)]
pub struct GenerateArgs {
    /// The engine written by `trt-diff build --arch ...` (its manifest names the pipeline).
    #[arg(long)]
    pub engine: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities reach p (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Drop tokens less likely than min-p times the most likely one (0: off).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Penalize tokens already in the context (1: off; llama.cpp's repeat penalty).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Stop before this text (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    #[arg(long, value_enum, default_value_t = crate::runner::BackendChoice::Auto)]
    pub backend: crate::runner::BackendChoice,
    #[command(flatten)]
    pub image: ImageArgs,
}

/// Options of image pipelines (Flux bundles); unset ones take the bundle's recipe defaults.
#[derive(Args)]
pub struct ImageArgs {
    /// Output PNG (a batch writes NAME-0.png, NAME-1.png, ...).
    #[arg(long, value_name = "FILE.png")]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub steps: Option<usize>,
    /// Any name of `trt-diff samplers list` (default: the recipe's, euler).
    #[arg(long)]
    pub sampler: Option<String>,
    /// "flux" (diffusers' FluxPipeline schedule, default) or any `trt-diff samplers sigmas` scheduler.
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Image width in pixels (a multiple of 16).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (a multiple of 16).
    #[arg(long)]
    pub height: Option<usize>,
    /// Distilled guidance of FLUX.1-dev (its transformer's guidance input).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// True classifier-free guidance scale with --negative-prompt (1: off; doubles the transformer runs).
    #[arg(long, default_value_t = 1.0)]
    pub cfg: f32,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// img2img: start from this image (PNG/JPEG), resized to the output size.
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// img2img: how much of the schedule to re-run (0 < s <= 1).
    #[arg(long, default_value_t = 0.8)]
    pub strength: f32,
    /// Images generated together (image i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Write a live preview PNG here after every step (needs a bundle built with --tae-decoder).
    #[arg(long, value_name = "FILE.png")]
    pub preview: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Model folder in diffusers' layout (transformer/, text_encoder/, text_encoder_2/, vae/, tokenizer*/).
    pub model: PathBuf,
    /// flux-dev or flux-schnell.
    #[arg(long)]
    pub arch: String,
    /// fp32, bf16, fp16 or nvfp4 (fp8 needs calibration: use `build`).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// Output folder.
    #[arg(long, short)]
    pub out: PathBuf,
    #[arg(long, value_name = "FILE")]
    pub clip_tokenizer: Option<PathBuf>,
    #[arg(long, value_name = "FILE")]
    pub t5_tokenizer: Option<PathBuf>,
}

#[derive(Args)]
pub struct TrtArgs {
    /// Folder with the TensorRT libraries (searched before TRT_LIB_DIR, LD_LIBRARY_PATH and standard places).
    #[arg(long, value_name = "DIR")]
    pub trt_lib_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct BuildArgs {
    /// The ONNX model (external data files beside it are read too), or with --arch a model checkpoint.
    pub input: PathBuf,
    /// Build a whole pipeline from a checkpoint: `llama2c` (llama2.c .bin + --tokenizer). GGUF files (llama,
    /// qwen2) and Hugging Face folders (config.json + safetensors, + --tokenizer FILE.gguf) need no --arch.
    #[arg(long, value_name = "ARCH")]
    pub arch: Option<String>,
    /// LLM builds: cap the context length (the engine's profile and RoPE table follow it).
    #[arg(long, value_name = "TOKENS")]
    pub max_context: Option<usize>,
    /// Tokenizer file: llama2.c tokenizer .bin for --arch llama2c, a GGUF file for Hugging Face folders.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Flux: CLIP merges (merges.txt or bpe_simple_vocab_16e6.txt.gz) when the model folder has no tokenizer/.
    #[arg(long, value_name = "FILE")]
    pub clip_tokenizer: Option<PathBuf>,
    /// Flux: T5 tokenizer.json when the model folder has no tokenizer_2/.
    #[arg(long, value_name = "FILE")]
    pub t5_tokenizer: Option<PathBuf>,
    /// Flux: a madebyollin TAE decoder (taef1 .safetensors) for `generate --preview`.
    #[arg(long, value_name = "FILE")]
    pub tae_decoder: Option<PathBuf>,
    /// Flux: T5 sequence length (default: the recipe's, 512 dev / 256 schnell).
    #[arg(long)]
    pub t5_max_len: Option<usize>,
    /// Flux: image side range of the engines' profiles, MIN,OPT,MAX pixels (default: the recipe's).
    #[arg(long, value_delimiter = ',', value_name = "MIN,OPT,MAX")]
    pub image_px: Option<Vec<i64>>,
    /// Flux FP8: calibration prompt (repeatable; default: the recipe's eight).
    #[arg(long, value_name = "TEXT")]
    pub calibration_prompt: Vec<String>,
    /// Flux FP8: sampler steps per calibration prompt (default: the recipe's).
    #[arg(long)]
    pub calibration_steps: Option<usize>,
    /// Weight precision for --arch builds: fp32, fp8, nvfp4, int4 (ModelOpt-like defaults keep embeddings,
    /// norms and the LM head in fp32).
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// Output plan; the manifest is written beside it as <out>.json.
    #[arg(long, short)]
    pub out: PathBuf,
    /// TensorRT flavour.
    #[arg(long, value_enum, default_value_t = TrtChoice::Auto)]
    pub trt: TrtChoice,
    #[command(flatten)]
    pub lib: TrtArgs,
    /// Optimization profile of dynamic inputs: NAME=MIN:OPT:MAX, dimensions joined by x
    /// (e.g. tokens=1x10x32:2x10x32:8x10x32). Repeat or join with commas.
    #[arg(long, value_name = "SPEC")]
    pub shapes: Vec<String>,
    /// Builder optimization level 0-5 (higher: slower build, maybe faster engine).
    #[arg(long, value_name = "N")]
    pub opt_level: Option<i32>,
    /// Workspace memory-pool limit in MiB.
    #[arg(long, value_name = "MIB")]
    pub workspace: Option<u64>,
    /// Timing cache file: loaded when present, saved after the build.
    #[arg(long, value_name = "FILE")]
    pub timing_cache: Option<PathBuf>,
    /// TensorRT-RTX target GPUs, e.g. sm86,sm89,sm120 (default: TensorRT-RTX's own set).
    #[arg(long, value_delimiter = ',')]
    pub targets: Vec<String>,
    /// Make the engine refittable (weights can be replaced without a rebuild).
    #[arg(long)]
    pub refit: bool,
    /// Allow weight streaming (weights stay in host memory, streamed to the GPU at run time).
    #[arg(long)]
    pub weight_streaming: bool,
    /// Hide the progress bars.
    #[arg(long)]
    pub no_progress: bool,
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info,tensorrt=warn",
        1 => "debug",
        _ => "trace",
    };
    let filter =
        EnvFilter::try_from_env("TRT_DIFF_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(verbose > 0)
        .without_time()
        .try_init();
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    crate::out::quiet_on_broken_pipe();
    if !matches!(cli.command, Command::Serve { .. }) {
        crate::fsutil::cleanup_on_signals();
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Doctor { json, trt } => {
            let r = crate::doctor::report(trt.trt_lib_dir.as_deref());
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{r}");
            }
            Ok(())
        }
        Command::Build(a) => build(a),
        Command::Inspect {
            file,
            json,
            against,
        } => crate::inspect::inspect(&file, json, against.as_deref()),
        Command::Generate(a) => generate(a),
        Command::Export(a) => export(a),
        Command::Serve {
            engine,
            host,
            port,
            backend,
        } => crate::server::serve(&engine, backend, &host, port),
        Command::Run(a) => run_engine(a),
        Command::Quantize(a) => quantize(a),
        Command::Samplers { cmd } => samplers(cmd),
        Command::Tokenize {
            vocab,
            text,
            decode,
            parse_special,
        } => {
            let out =
                crate::tokenizer::llm_cli::tokenize_command(&vocab, &text, decode, parse_special)?;
            println!("{out}");
            Ok(())
        }
        Command::Convert {
            format,
            input,
            tokenizer,
            out,
        } => {
            if format != "llama2c" {
                bail!("convert {format}: unknown source format; supported: llama2c");
            }
            let n = crate::weights::gguf_convert::llama2c_to_gguf(&input, &tokenizer, &out)?;
            println!("wrote {} ({n} tensors)", out.display());
            Ok(())
        }
    }
}

fn run_engine(a: RunArgs) -> Result<()> {
    use crate::runner::{compare, load_inputs, open_engine, timed_runs};
    let ort = crate::backend::ort_backend::OrtOptions {
        threads: a.threads,
        ..Default::default()
    };
    let inputs = load_inputs(&a.input)?;
    let trt = crate::runner::TrtSetup {
        run: crate::trt::runtime::TrtRunOptions {
            weight_budget: a.weight_budget.map(|m| m << 20),
            cuda_graph: a.cuda_graph,
        },
        refit: a.refit.clone(),
    };
    let mut engine = crate::runner::open_engine_with(&a.engine, a.backend, &ort, &trt)?;
    let (outputs, lat) = timed_runs(engine.as_mut(), &inputs, a.iterations)?;
    println!("{} on {}", a.engine.display(), engine.backend());
    println!(
        "latency over {} run(s): min {:.3} ms, median {:.3} ms, p99 {:.3} ms",
        lat.runs, lat.min_ms, lat.median_ms, lat.p99_ms
    );
    for (name, t) in &outputs {
        println!("  output {name} {} {:?}", t.dtype, t.shape);
    }
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create output folder '{}': {e}", dir.display()))?;
        for (name, t) in &outputs {
            let file: String = name
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() || "-_.".contains(c) {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            crate::npy::write(&dir.join(format!("{file}.npy")), t)?;
        }
        println!("wrote {} output(s) to {}", outputs.len(), dir.display());
    }
    if let Some(other) = a.compare_with {
        let mut second = open_engine(&a.engine, other, &ort)?;
        let (theirs, lat2) = timed_runs(second.as_mut(), &inputs, a.iterations)?;
        println!(
            "compared with {} (median {:.3} ms):",
            second.backend(),
            lat2.median_ms
        );
        for d in compare(&outputs, &theirs)? {
            println!(
                "  {:<24} max abs {:.3e}  max rel {:.3e}",
                d.name, d.max_abs, d.max_rel
            );
        }
    }
    Ok(())
}

fn generate(a: GenerateArgs) -> Result<()> {
    use std::io::Write;
    if crate::manifest::sidecar_path(&a.engine).exists()
        && let Some(bundle) = crate::pipelines::flux_build::read_bundle(&a.engine)?
    {
        return generate_image(&a, &bundle);
    }
    let params = crate::pipelines::llm::SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        seed: a.seed,
        max_tokens: a.max_tokens,
        min_p: a.min_p,
        repetition_penalty: a.repeat_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        stop: a.stop.clone(),
    };
    let mut out = std::io::stdout();
    let stats = crate::pipelines::llm::generate_with_engine(
        &a.engine,
        a.backend,
        &a.prompt,
        &params,
        |t| {
            out.write_all(t.as_bytes())?;
            out.flush()?;
            Ok(())
        },
    )?;
    println!();
    eprintln!(
        "prompt: {} tokens in {:.3}s ({:.1} tok/s); generated: {} tokens in {:.3}s ({:.1} tok/s){}",
        stats.prompt_tokens,
        stats.prompt_seconds,
        stats.prompt_tokens as f64 / stats.prompt_seconds.max(1e-9),
        stats.generated_tokens,
        stats.generation_seconds,
        stats.generated_tokens as f64 / stats.generation_seconds.max(1e-9),
        if stats.stopped_by_eos {
            ", stopped at end of text"
        } else if stats.stopped_by_stop_string {
            ", stopped at a stop string"
        } else {
            ""
        }
    );
    Ok(())
}

fn generate_image(
    a: &GenerateArgs,
    bundle: &crate::pipelines::flux_build::FluxBundle,
) -> Result<()> {
    let i = &a.image;
    let Some(out) = &i.out else {
        bail!(
            "--out FILE.png is needed: '{}' is an image pipeline",
            a.engine.display()
        );
    };
    let req = crate::pipelines::flux::FluxRequest {
        prompt: a.prompt.clone(),
        negative_prompt: i.negative_prompt.clone(),
        steps: i.steps,
        sampler: i.sampler.clone(),
        scheduler: i.scheduler.clone(),
        seed: a.seed,
        width: i.width,
        height: i.height,
        guidance: i.guidance,
        cfg: i.cfg,
        batch: i.batch,
        init_image: i.init_image.clone(),
        strength: i.strength,
        preview: i.preview.clone(),
        ..Default::default()
    };
    let r = crate::pipelines::flux_run::generate_images(
        &a.engine,
        bundle,
        a.backend,
        &req,
        out,
        !i.no_progress,
    )?;
    let mean = r.step_seconds.iter().sum::<f64>() / r.step_seconds.len().max(1) as f64;
    for f in &r.files {
        println!("wrote {}", f.display());
    }
    eprintln!(
        "{} steps, {:.3} s/step mean, {:.2} s total on {}",
        r.step_seconds.len(),
        mean,
        r.seconds,
        r.backend
    );
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    if !a.arch.starts_with("flux") {
        bail!(
            "--arch {} is not exportable; supported: flux-dev, flux-schnell",
            a.arch
        );
    }
    let p = crate::pipelines::flux_build::export_flux(
        &a.model,
        &a.arch,
        &a.precision,
        &a.out,
        a.clip_tokenizer.as_deref(),
        a.t5_tokenizer.as_deref(),
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

fn build_flux(a: &BuildArgs, arch: &str) -> Result<()> {
    if a.image_px.as_ref().is_some_and(|v| v.len() != 3) {
        bail!("--image-px takes three sizes: MIN,OPT,MAX (pixels, multiples of 16)");
    }
    let o = crate::pipelines::flux_build::build_flux(
        &crate::pipelines::flux_build::FluxBuildOptions {
            model: a.input.clone(),
            arch: arch.to_string(),
            precision: a.precision.clone(),
            clip_tokenizer: a.clip_tokenizer.clone(),
            t5_tokenizer: a.t5_tokenizer.clone(),
            tae_decoder: a.tae_decoder.clone(),
            t5_max_len: a.t5_max_len,
            image_px: a.image_px.as_ref().map(|v| [v[0], v[1], v[2]]),
            calibration_prompts: Some(a.calibration_prompt.clone()),
            calibration_steps: a.calibration_steps,
            calibration_backend: crate::runner::BackendChoice::Auto,
            base: BuildOptions {
                out: a.out.clone(),
                trt: a.trt,
                trt_lib_dir: a.lib.trt_lib_dir.clone(),
                opt_level: a.opt_level,
                workspace_bytes: a.workspace.map(|m| m << 20),
                timing_cache: a.timing_cache.clone(),
                targets: a.targets.clone(),
                refit: a.refit,
                weight_streaming: a.weight_streaming,
                progress: !a.no_progress,
                ..Default::default()
            },
        },
    )?;
    println!(
        "built the {arch} bundle {} ({} precision) with {} {}; manifest {}",
        o.plan.display(),
        a.precision,
        o.manifest.tensorrt.flavor_display(),
        o.manifest.tensorrt.version,
        o.manifest_path.display()
    );
    Ok(())
}

fn build(a: BuildArgs) -> Result<()> {
    if !a.input.exists() {
        bail!(
            "cannot open '{}': no such file; check the path",
            a.input.display()
        );
    }
    if let Some(arch) = a.arch.as_deref().filter(|a| a.starts_with("flux")) {
        return build_flux(&a, arch);
    }
    let is_llm = a.arch.is_some()
        || crate::weights::gguf::looks_like_gguf(&a.input)
        || a.input.join("config.json").exists();
    if is_llm {
        let source = crate::pipelines::llm_build::detect_source(
            &a.input,
            a.arch.as_deref(),
            a.tokenizer.as_deref(),
        )?;
        let opts = BuildOptions {
            out: a.out.clone(),
            trt: a.trt,
            trt_lib_dir: a.lib.trt_lib_dir.clone(),
            shapes: parse_shapes(&a.shapes)?,
            opt_level: a.opt_level,
            workspace_bytes: a.workspace.map(|m| m << 20),
            timing_cache: a.timing_cache.clone(),
            targets: a.targets.clone(),
            refit: a.refit,
            weight_streaming: a.weight_streaming,
            progress: !a.no_progress,
            ..Default::default()
        };
        let o = crate::pipelines::llm_build::build_llm(
            &a.input,
            source,
            &a.precision,
            a.max_context,
            &opts,
        )?;
        println!(
            "built {} ({}, {} precision) with {} {}; source {}, manifest {}",
            o.plan.display(),
            human_bytes(o.manifest.plan.bytes),
            a.precision,
            o.manifest.tensorrt.flavor_display(),
            o.manifest.tensorrt.version,
            o.manifest.source.onnx,
            o.manifest_path.display()
        );
        return Ok(());
    }
    if a.input.extension().is_none_or(|e| e != "onnx") {
        bail!(
            "'{}' is not an .onnx file: `trt-diff build` takes an ONNX model (rename it if it is one)",
            a.input.display()
        );
    }
    let opts = BuildOptions {
        onnx: a.input,
        out: a.out,
        trt: a.trt,
        trt_lib_dir: a.lib.trt_lib_dir,
        shapes: parse_shapes(&a.shapes)?,
        opt_level: a.opt_level,
        workspace_bytes: a.workspace.map(|m| m << 20),
        timing_cache: a.timing_cache,
        targets: a.targets,
        refit: a.refit,
        weight_streaming: a.weight_streaming,
        progress: !a.no_progress,
        pipeline: None,
        ..Default::default()
    };
    let o = crate::trt::build_engine(&opts)?;
    let m = &o.manifest;
    println!(
        "built {} ({}) with {} {} in {:.2}s (TensorRT parse {:.2}s, build {:.2}s)",
        o.plan.display(),
        human_bytes(m.plan.bytes),
        m.tensorrt.flavor_display(),
        m.tensorrt.version,
        o.timings.total,
        o.timings.trt_parse,
        o.timings.trt_build
    );
    for t in &m.io {
        let profile = t
            .profile
            .as_ref()
            .map(|p| {
                format!(
                    "  profile {}:{}:{}",
                    join(&p.min),
                    join(&p.opt),
                    join(&p.max)
                )
            })
            .unwrap_or_default();
        println!(
            "  {:<6} {:<24} {:<12} {:?}{profile}",
            t.mode, t.name, t.dtype, t.shape
        );
    }
    println!("manifest {}", o.manifest_path.display());
    Ok(())
}

fn quantize(a: QuantizeArgs) -> Result<()> {
    let r = crate::quant::checkpoint::quantize_file(&crate::quant::checkpoint::QuantizeOptions {
        input: a.input,
        output: a.out.clone(),
        format: a.format,
        block_size: a.block_size,
        double_quant: a.double_quant,
        include: a.include,
        exclude: a.exclude,
        progress: !a.no_progress,
    })?;
    println!(
        "wrote {} ({}): {} tensors quantized, {} passed through, from {} in {:.2}s",
        a.out.display(),
        human_bytes(r.output_bytes),
        r.quantized,
        r.passed_through,
        human_bytes(r.input_bytes),
        r.seconds
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum SamplersCmd {
    /// Every registered sampler: family, order, stages, model calls per step, stochastic or not.
    List,
    /// Print a schedule, one sigma per line (highest first).
    Sigmas {
        /// simple, sgm_uniform, karras, exponential, ddim_uniform, beta, normal, linear_quadratic,
        /// kl_optimal, beta57, bong_tangent, polyexponential, laplace, vp, flow_shift.
        #[arg(long, default_value = "karras")]
        scheduler: String,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        /// The model whose sigmas the discrete schedulers use, and the default range: sd15, sdxl, sd3, flux.
        #[arg(long, default_value = "sdxl")]
        model: String,
        #[arg(long)]
        sigma_min: Option<f64>,
        #[arg(long)]
        sigma_max: Option<f64>,
        /// img2img strength in (0, 1]: the last `steps` sigmas of a `steps/denoise`-step schedule.
        #[arg(long, default_value_t = 1.0)]
        denoise: f64,
    },
    /// Run a sampler on the analytic Gaussian-data problem and print its error against the exact solution.
    ///
    /// The data: n independent elements x0_i ~ N(mu_i, s_i^2), mu_i = 0.8 sin(1.7 i),
    /// s_i = 0.3 + 0.25 (1 + cos(0.9 i)). In k-diffusion's VE convention x = x0 + sigma eps the exact
    /// denoiser is D(x, sigma) = mu + s^2/(s^2 + sigma^2) (x - mu), and the probability-flow ODE
    /// dx/dsigma = (x - D)/sigma has the closed-form solution
    /// x(sigma) = mu + (x(sigma0) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma0^2).
    /// With --flow (x_t = (1-t) x0 + t eps, sigma = t): D = mu + (1-t) s^2/V (x - (1-t) mu),
    /// V = (1-t)^2 s^2 + t^2, and x(t) = (1-t) mu + (x(t0) - (1-t0) mu) sqrt(V(t)/V(t0)).
    /// The start is a draw from the marginal at sigma_max (Philox, --seed) unless --init is given. With
    /// several step counts (--steps 8,16,32) it prints the empirical order log(e_a/e_b)/log(n_b/n_a).
    Check {
        #[arg(long)]
        sampler: String,
        /// Step counts, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "10,20,40")]
        steps: Vec<usize>,
        #[arg(long, default_value = "exponential")]
        scheduler: String,
        #[arg(long, default_value_t = 0.05)]
        sigma_min: f64,
        #[arg(long, default_value_t = 10.0)]
        sigma_max: f64,
        /// Keep the schedule's final 0 (the last step is then the sampler's denoise step).
        #[arg(long)]
        to_zero: bool,
        /// Rectified-flow convention (use a sigma range inside (0, 1]).
        #[arg(long)]
        flow: bool,
        #[arg(long, default_value_t = 64)]
        elements: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Noise amount of stochastic samplers (0 makes them deterministic).
        #[arg(long, default_value_t = 1.0)]
        eta: f64,
        /// RES4LYF SDE noise mode of the single-step exponential samplers (hard, exp, soft, soft-linear,
        /// softer, eps, sinusoidal, lorentzian, vpsde, er4, hard_var; default none).
        #[arg(long)]
        noise_mode: Option<String>,
        /// RES4LYF's noise_anchor for the tableaux (0 plain RK; RES4LYF's nodes use 1; implicit tableaux are
        /// stepped as RES4LYF does at any anchor but 0).
        #[arg(long, default_value_t = 0.0)]
        noise_anchor: f64,
        /// RES4LYF's implicit refinement: extra model calls that redo each step (and each stage).
        #[arg(long, default_value_t = 0)]
        implicit_steps: usize,
        #[arg(long, default_value_t = 0)]
        implicit_substeps: usize,
        /// RES4LYF's bongmath (its default, off here): re-derives the step start from each stage, see README.
        #[arg(long)]
        bongmath: bool,
        /// Step implicit tableaux as RES4LYF does also at --noise-anchor 0 (other anchors imply it).
        #[arg(long)]
        res4lyf_implicit: bool,
        /// RES4LYF's implicit type of the implicit steps / substeps (predictor-corrector, rebound; retro-eta
        /// and bongmath differ from predictor-corrector only with --eta-substep).
        #[arg(long, default_value = "predictor-corrector")]
        implicit_type: String,
        #[arg(long, default_value = "predictor-corrector")]
        implicit_type_substeps: String,
        /// RES4LYF's per-substep SDE noise of the explicit exponential samplers and tableaux (0: off; noise
        /// after each stage's update, see README), its noise mode (default hard) and s_noise.
        #[arg(long, default_value_t = 0.0)]
        eta_substep: f64,
        #[arg(long, default_value = "hard", value_parser = crate::samplers::noise_mode::NoiseMode::parse)]
        noise_mode_substep: crate::samplers::noise_mode::NoiseMode,
        #[arg(long, default_value_t = 1.0)]
        s_noise_substep: f64,
        /// Step noise (--noise-mode, --eta) in RES4LYF's default form: step to sigma_next, then swap to
        /// sigma_down along the step line (its overshoot 0); also for the explicit tableaux.
        #[arg(long)]
        noise_swap: bool,
        /// Run on f32 buffers (default f64, so round-off does not hide the order).
        #[arg(long)]
        f32: bool,
        /// Start from this .npy (float32/float64, `elements` values).
        #[arg(long)]
        init: Option<PathBuf>,
        /// Write the final sample of the last run as a float64 .npy.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
}

fn samplers(cmd: SamplersCmd) -> Result<()> {
    use crate::samplers::{check::CheckSpec, registry::SamplerOptions, report};
    match cmd {
        SamplersCmd::List => print!("{}", report::list_table()),
        SamplersCmd::Sigmas {
            scheduler,
            steps,
            model,
            sigma_min,
            sigma_max,
            denoise,
        } => {
            let s = report::sigmas(&scheduler, steps, &model, (sigma_min, sigma_max), denoise)?;
            for v in s {
                println!("{v}");
            }
        }
        SamplersCmd::Check {
            sampler,
            steps,
            scheduler,
            sigma_min,
            sigma_max,
            to_zero,
            flow,
            elements,
            seed,
            eta,
            noise_mode,
            noise_anchor,
            implicit_steps,
            implicit_substeps,
            bongmath,
            res4lyf_implicit,
            implicit_type,
            implicit_type_substeps,
            eta_substep,
            noise_mode_substep,
            s_noise_substep,
            noise_swap,
            f32,
            init,
            dump,
        } => {
            let spec = CheckSpec {
                sampler,
                scheduler,
                sigma_min,
                sigma_max,
                to_zero,
                flow,
                elements,
                seed,
                f32,
                opts: SamplerOptions {
                    eta,
                    noise_mode: crate::samplers::noise_mode::NoiseMode::parse(
                        noise_mode.as_deref().unwrap_or("none"),
                    )?,
                    noise_anchor,
                    implicit_steps,
                    implicit_substeps,
                    bongmath,
                    res4lyf_implicit,
                    implicit_type: crate::samplers::refine::ImplicitType::parse(&implicit_type)?,
                    implicit_type_substeps: crate::samplers::refine::ImplicitType::parse(
                        &implicit_type_substeps,
                    )?,
                    eta_substep,
                    noise_mode_substep,
                    s_noise_substep,
                    noise_swap,
                    ..Default::default()
                },
            };
            print!(
                "{}",
                report::check(&spec, &steps, init.as_deref(), dump.as_deref())?
            );
        }
    }
    Ok(())
}
