//! The command line's definitions (clap) and nothing else: each command's code is one module of `commands/`.
use crate::backend::BackendChoice;
use crate::pipelines::Arch;
use crate::pipelines::llm::SamplingParams;
use crate::quant::Precision;
use crate::trt::TrtChoice;
use clap::{Args, Parser, Subcommand};

mod auto;
mod control;
mod samplers;
mod sources;
pub use auto::AutoArgs;
pub use control::ControlModeArgs;
pub use samplers::{CheckArgs, SamplersCmd};
pub use sources::SourceArgs;
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
    Serve(ServeArgs),
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
    /// Quantize the weights of a safetensors checkpoint (bitsandbytes / ModelOpt / ComfyUI layouts).
    Quantize(QuantizeArgs),
    /// Token ids of text with the tokenizer in a GGUF file or a Hugging Face folder (no BOS), or with --decode the text
    /// of ids.
    Tokenize {
        /// A GGUF file with tokenizer metadata (vocab-only files work), or a Hugging Face folder with tokenizer.json.
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
        #[arg(value_enum)]
        format: ConvertFormat,
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

/// Source formats of `convert`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvertFormat {
    /// A llama2.c checkpoint (.bin) and tokenizer.
    Llama2c,
}

/// How `--engine` is opened: shared by `run`, `generate` and `serve`.
#[derive(Args)]
pub struct EngineArgs {
    /// The engine written by `trt-diff build` (a plan, or an ONNX-only bundle's manifest), an .onnx file for
    /// `run`, or a GGUF model file or Hugging Face folder (built once into the user's cache, see
    /// TRT_DIFF_MODEL_CACHE).
    #[arg(long)]
    pub engine: PathBuf,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Let the manifest name files outside the engine's folder (only for manifests you trust).
    #[arg(long)]
    pub allow_external_paths: bool,
}

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (printed as `listening on ...`).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    #[command(flatten)]
    pub opts: crate::server::ServeOptions,
}

#[derive(Args)]
pub struct QuantizeArgs {
    /// The input .safetensors checkpoint.
    pub input: PathBuf,
    #[arg(long, value_enum)]
    pub format: crate::quant::checkpoint::Format,
    /// Whose loader the file is for (default: bnb for nf4/fp4, modelopt for the others; comfyui for nvfp4/fp8).
    #[arg(long, value_enum)]
    pub layout: Option<crate::quant::checkpoint::Layout>,
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
    #[command(flatten)]
    pub engine: EngineArgs,
    /// An input as NAME=FILE.npy (repeat for each input).
    #[arg(long, value_name = "NAME=FILE")]
    pub input: Vec<String>,
    /// Folder for the outputs, one NAME.npy each.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Timed runs (after one warm-up run when more than one).
    #[arg(long, default_value_t = 1)]
    pub iterations: usize,
    /// Also run on this backend and print the max abs / relative difference of every output.
    #[arg(long, value_enum, value_name = "BACKEND")]
    pub compare_with: Option<BackendChoice>,
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
    #[command(flatten)]
    pub engine: EngineArgs,
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub sampling: SamplingParams,
    #[command(flatten)]
    pub image: ImageArgs,
}

/// Options of image pipelines (Flux and SD bundles); unset ones take the bundle's recipe defaults.
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
    /// Image width in pixels (a multiple of 16 for Flux, 8 for SD).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (a multiple of 16 for Flux, 8 for SD).
    #[arg(long)]
    pub height: Option<usize>,
    /// Distilled guidance of FLUX.1-dev (its transformer's guidance input).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Classifier-free guidance scale (1: off; doubles the network runs). Default: the bundle's (SD guides against "").
    #[arg(long)]
    pub cfg: Option<f32>,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// img2img: start from this image (PNG/JPEG), resized to the output size.
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// img2img: how much of the schedule to re-run (0 < s <= 1).
    #[arg(long, default_value_t = 0.8)]
    pub strength: f32,
    /// Inpainting with --init-image: white = repaint, black = keep (SD: latent blend or a 9-channel inpainting
    /// UNet; FLUX.1 Fill: use --strength 1 as diffusers' default).
    #[arg(long, value_name = "FILE")]
    pub mask: Option<PathBuf>,
    /// SDXL: hand the last part of the steps to this refiner bundle (diffusers' denoising_end/start).
    #[arg(long, value_name = "BUNDLE")]
    pub refiner: Option<PathBuf>,
    /// With --refiner: the fraction of the steps the base model runs.
    #[arg(long, default_value_t = 0.8)]
    pub refiner_start: f32,
    /// Images generated together (image i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Write a live preview PNG here after every step (needs a bundle built with --tae-decoder).
    #[arg(long, value_name = "FILE.png")]
    pub preview: Option<PathBuf>,
    /// Apply a LoRA at run time without rebuilding (repeatable to stack): 16-bit weights are merged and the
    /// engines refitted (ONNX Runtime re-creates its sessions).
    #[arg(long, value_name = "FILE[:STRENGTH]")]
    pub lora: Vec<crate::weights::lora::LoraSpec>,
    /// ControlNet condition image (repeatable; needs --controlnet at build); FLUX.2 [klein]: a reference image.
    #[arg(long, value_name = "IMAGE")]
    pub control: Vec<PathBuf>,
    /// ControlNet strength per --control (one value: all).
    #[arg(long, value_name = "S", default_values_t = [1.0])]
    pub control_strength: Vec<f32>,
    /// Fraction of the steps where each control starts (one value: all).
    #[arg(long, value_name = "A", default_values_t = [0.0])]
    pub control_start: Vec<f32>,
    /// Fraction of the steps where each control ends (one value: all).
    #[arg(long, value_name = "B", default_values_t = [1.0])]
    pub control_end: Vec<f32>,
    /// Preprocess the control images (canny edges); without it they are used as given.
    #[arg(long, value_enum)]
    pub control_preprocess: Option<crate::pipelines::image_io::Preprocess>,
    #[command(flatten)]
    pub control_mode: ControlModeArgs,
    /// SD3.5 skip-layer guidance: LAYERS[:SCALE[:START:END]] (e.g. 7,8,9; diffusers' 2.8, 0.01, 0.2 when unset).
    #[arg(long, value_name = "SPEC")]
    pub slg_layers: Option<crate::pipelines::image::SkipLayerGuidance>,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Model folder in diffusers' layout (transformer/ or unet/, text_encoder*/, vae/, tokenizer*/) or an SD
    /// single-file checkpoint.
    pub model: PathBuf,
    #[arg(long, value_enum)]
    pub arch: Arch,
    /// fp32, bf16, fp16 or nvfp4 (fp8 needs calibration: use `build`).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    pub precision: Precision,
    /// Output folder.
    #[arg(long, short)]
    pub out: PathBuf,
    #[command(flatten)]
    pub sources: SourceArgs,
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
    /// qwen2, qwen3) and Hugging Face folders (config.json + safetensors + tokenizer.json) need no --arch.
    #[arg(long, value_enum, value_name = "ARCH")]
    pub arch: Option<Arch>,
    /// LLM builds: cap the context length (the engine's profile follows it).
    #[arg(long, value_name = "TOKENS")]
    pub max_context: Option<usize>,
    /// Tokenizer file: llama2.c tokenizer .bin for --arch llama2c; for Hugging Face folders a GGUF file, instead of
    /// the folder's tokenizer.json (byte-level or SentencePiece-style BPE).
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub sources: SourceArgs,
    /// Flux/SD/FLUX.2: a madebyollin TAE decoder (taef1/taesd/taesdxl/taef2 .safetensors) for `generate --preview`.
    #[arg(long, value_name = "FILE")]
    pub tae_decoder: Option<PathBuf>,
    /// Flux: T5 sequence length (default: the recipe's, 512 dev / 256 schnell).
    #[arg(long)]
    pub t5_max_len: Option<usize>,
    /// Flux/SD: image side range of the engines' profiles, MIN,OPT,MAX pixels (default: the recipe's).
    #[arg(long, value_delimiter = ',', value_name = "MIN,OPT,MAX")]
    pub image_px: Option<Vec<i64>>,
    /// Flux: merge a LoRA (kohya, diffusers/PEFT, ComfyUI, LyCORIS LoHa/LoKr) at a strength before quantizing;
    /// repeatable to stack.
    #[arg(long, value_name = "FILE[:STRENGTH]")]
    pub lora: Vec<crate::weights::lora::LoraSpec>,
    /// Flux fp8/nvfp4: a LoRA side path of this rank beside each quantized layer, so `generate --lora` switches
    /// LoRAs without requantizing (TensorRT: with --refit).
    #[arg(long, value_name = "RANK", default_value_t = 0)]
    pub lora_rank: usize,
    /// Flux: a diffusers FluxControlNetModel folder (InstantX/Shakker style) added to the bundle.
    #[arg(long, value_name = "DIR")]
    pub controlnet: Option<PathBuf>,
    /// Flux/SD FP8: calibration prompt (repeatable; default: the recipe's eight).
    #[arg(long, value_name = "TEXT")]
    pub calibration_prompt: Vec<String>,
    /// Flux/SD FP8: sampler steps per calibration prompt (default: the recipe's).
    #[arg(long)]
    pub calibration_steps: Option<usize>,
    /// fp32 (default), fp8, nvfp4, int4 (ModelOpt-like defaults keep embeddings, norms, LM head in fp32), gguf (a
    /// quantized GGUF's blocks as INT4 weights; its default), or auto: per-layer formats by measured quality.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    #[command(flatten)]
    pub auto: AutoArgs,
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
    /// Let the ONNX model's external data name files outside its folder (only for models you trust).
    #[arg(long)]
    pub allow_external_paths: bool,
    /// Write the ONNX graphs and the manifest (`OUT.json`) but no TensorRT plan: for GPUs without a TensorRT
    /// build (ONNX Runtime CUDA runs it, `--backend cuda`) or CPU-only use. No TensorRT library is needed.
    #[arg(long)]
    pub onnx_only: bool,
    /// Quantized GGUF builds: keep the TensorRT graph (`.onnx`, about the GGUF's size) beside the plan, for ONNX
    /// Runtime's CUDA provider where TensorRT cannot run the plan.
    #[arg(long)]
    pub keep_onnx: bool,
}
