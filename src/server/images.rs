//! `trt-diff serve` on an image bundle: OpenAI's `POST /v1/images/generations` (what the official client's
//! `images.generate` sends; PNGs as `b64_json`) and the AUTOMATIC1111 API that image front ends speak:
//! `POST /sdapi/v1/txt2img`, `POST /sdapi/v1/img2img`, `GET /sdapi/v1/samplers`, `/schedulers`, `/sd-models`,
//! `/options`, `/progress`, `/loras`. One worker thread owns the pipeline and serves requests in arrival order.
//! With `serve --lora-dir DIR`, prompts may switch LoRAs as A1111's do: `<lora:NAME:STRENGTH>` applies
//! `DIR/NAME.safetensors` (run-time LoRA, kept until a request asks for another set).
use super::{AppShared, Metrics, bad_request, error, now_secs};
use crate::backend::BackendChoice;
use crate::manifest::EngineFile;
use crate::pipelines::image::{ImageDefaults, ImageGenerator, ImageRequest};
use crate::weights::lora::LoraSpec;
use anyhow::{Context, Result};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Images in one request at most (batch x iterations), and the largest side.
const MAX_IMAGES: usize = 8;
const MAX_SIDE: usize = 2048;
const MAX_STEPS: usize = 200;
/// Init images arrive base64-encoded in the JSON body.
pub const MAX_BODY_BYTES: usize = 32 << 20;

/// A1111 sampler labels -> (sampler, scheduler) of the catalogue; the catalogue's own names are taken as they are.
const A1111_SAMPLERS: &[(&str, &str, Option<&str>)] = &[
    ("Euler", "euler", None),
    ("Euler a", "euler_ancestral", None),
    ("Heun", "heun", None),
    ("DPM2", "dpm_2", None),
    ("DPM2 a", "dpm_2_ancestral", None),
    ("DPM++ 2M", "dpmpp_2m", None),
    ("DPM++ 2M Karras", "dpmpp_2m", Some("karras")),
    ("DPM++ SDE", "dpmpp_sde", None),
    ("DPM++ SDE Karras", "dpmpp_sde", Some("karras")),
    ("DPM++ 2S a", "dpmpp_2s_ancestral", None),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", None),
    ("DPM++ 3M SDE", "dpmpp_3m_sde", None),
    ("LMS", "lms", None),
    ("DDIM", "ddim", None),
    ("UniPC", "uni_pc", None),
    ("LCM", "lcm", None),
];

/// Sampling progress for `/sdapi/v1/progress`.
#[derive(Default)]
struct Progress {
    step: AtomicUsize,
    steps: AtomicUsize,
    queued: AtomicUsize,
}

struct Job {
    req: ImageRequest,
    /// img2img: the init image's file bytes and extension (png/jpg), written to a temporary file for the pipeline.
    init_image: Option<(Vec<u8>, &'static str)>,
    /// The LoRA set the prompt's tags ask for (empty: none).
    loras: Vec<LoraSpec>,
    reply: oneshot::Sender<Result<Generated, String>>,
}

struct Generated {
    /// PNG files, the generation parameters in their text chunk.
    pngs: Vec<Vec<u8>>,
    parameters: String,
    width: usize,
    height: usize,
}

struct ImageState {
    shared: AppShared,
    jobs: mpsc::Sender<Job>,
    defaults: ImageDefaults,
    arch: String,
    progress: Arc<Progress>,
    /// `--lora-dir`: where `<lora:NAME>` tags find their files.
    lora_dir: Option<PathBuf>,
}

/// Opens the pipeline on its own thread and returns the image routes.
pub fn router(
    engine: &EngineFile,
    backend: BackendChoice,
    shared: AppShared,
    lora_dir: Option<&Path>,
) -> Result<Router> {
    let lora_dir = match lora_dir {
        Some(d) => Some(d.canonicalize().with_context(|| {
            format!(
                "--lora-dir '{}' is not a folder that can be read",
                d.display()
            )
        })?),
        None => None,
    };
    let (tx, rx) = mpsc::channel::<Job>(64);
    let progress = Arc::new(Progress::default());
    let (ready_tx, ready_rx) =
        std::sync::mpsc::sync_channel::<Result<(ImageDefaults, String), String>>(1);
    let file = engine.clone();
    let worker_progress = progress.clone();
    let metrics = shared.metrics.clone();
    std::thread::Builder::new()
        .name("images".into())
        .spawn(move || {
            // The pipeline is opened on the thread that uses it (engines need not be Send).
            let opened = crate::pipelines::engines::resolve(backend, &file)
                .and_then(|b| crate::pipelines::open_image_pipeline(&file, b));
            match opened {
                Ok(pipe) => {
                    let _ = ready_tx.send(Ok((pipe.defaults(), pipe.arch().to_string())));
                    worker(pipe, rx, &worker_progress, &metrics);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                }
            }
        })
        .context("cannot start the image thread")?;
    let (defaults, arch) = ready_rx
        .recv()
        .context("the image thread stopped before opening the bundle")?
        .map_err(|e| anyhow::anyhow!(e))?;
    let state = Arc::new(ImageState {
        shared,
        jobs: tx,
        defaults,
        arch,
        progress,
        lora_dir,
    });
    Ok(Router::new()
        .route("/v1/images/generations", post(openai_generations))
        .route("/images/generations", post(openai_generations))
        .route("/sdapi/v1/txt2img", post(txt2img))
        .route("/sdapi/v1/img2img", post(img2img))
        .route("/sdapi/v1/samplers", get(samplers))
        .route("/sdapi/v1/schedulers", get(schedulers))
        .route("/sdapi/v1/sd-models", get(sd_models))
        .route("/sdapi/v1/options", get(options))
        .route("/sdapi/v1/progress", get(progress_route))
        .route("/sdapi/v1/loras", get(loras_route))
        .route(
            "/sdapi/v1/refresh-loras",
            post(|| async { Json(json!(null)) }),
        )
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .with_state(state))
}

fn worker(
    mut pipe: Box<dyn ImageGenerator>,
    mut rx: mpsc::Receiver<Job>,
    progress: &Progress,
    metrics: &Metrics,
) {
    // The LoRA set on the engines now; None when unknown (a switch failed half-way).
    let mut applied: Option<Vec<(PathBuf, f32)>> = Some(Vec::new());
    while let Some(job) = rx.blocking_recv() {
        progress.queued.fetch_sub(1, Ordering::Relaxed);
        if metrics.stopping.load(Ordering::Relaxed) {
            let _ = job.reply.send(Err("the server is shutting down".into()));
            continue;
        }
        metrics.processing.fetch_add(1, Ordering::Relaxed);
        let wanted: Vec<(PathBuf, f32)> = job
            .loras
            .iter()
            .map(|l| (l.path.clone(), l.strength))
            .collect();
        let switched = if applied.as_ref() == Some(&wanted) {
            Ok(())
        } else {
            applied = None;
            crate::weights::lora::open_all(&job.loras)
                .and_then(|files| pipe.set_loras(&files))
                .map(|()| {
                    tracing::info!("LoRAs now applied: {}", job.loras.len());
                    applied = Some(wanted);
                })
        };
        let result =
            switched.and_then(|()| run_job(pipe.as_mut(), job.req, job.init_image, progress));
        metrics.processing.fetch_sub(1, Ordering::Relaxed);
        if result.is_err() {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        let _ = job.reply.send(result.map_err(|e| format!("{e:#}")));
    }
}

fn run_job(
    pipe: &mut dyn ImageGenerator,
    mut req: ImageRequest,
    init_image: Option<(Vec<u8>, &'static str)>,
    progress: &Progress,
) -> Result<Generated> {
    // Kept until the request is done: the pipeline reads the init image by path.
    let init_file = match init_image {
        Some((bytes, ext)) => {
            let f = tempfile::Builder::new()
                .prefix("trt-diff-init-")
                .suffix(&format!(".{ext}"))
                .tempfile()
                .context("cannot store the init image")?;
            std::fs::write(f.path(), bytes).context("cannot store the init image")?;
            req.init_image = Some(f.path().to_path_buf());
            Some(f)
        }
        None => None,
    };
    progress.step.store(0, Ordering::Relaxed);
    let out = pipe.generate(&req, &mut |s| {
        progress.steps.store(s.steps, Ordering::Relaxed);
        progress.step.store(s.step, Ordering::Relaxed);
        Ok(())
    });
    progress.steps.store(0, Ordering::Relaxed);
    drop(init_file);
    let out = out?;
    let pngs = out
        .images
        .iter()
        .enumerate()
        .map(|(i, rgb)| {
            crate::pipelines::image_io::png_bytes(
                rgb,
                out.width,
                out.height,
                &[("parameters", format!("{}, Image: {i}", out.parameters))],
            )
        })
        .collect::<Result<_>>()?;
    Ok(Generated {
        pngs,
        parameters: out.parameters,
        width: out.width,
        height: out.height,
    })
}

/// Queues a request and waits for its images.
async fn submit(
    state: &ImageState,
    mut req: ImageRequest,
    init_image: Option<(Vec<u8>, &'static str)>,
) -> Result<Generated, Response> {
    let loras = match lora_tags(&req.prompt)
        .and_then(|(prompt, tags)| Ok((prompt, lora_files(state.lora_dir.as_deref(), &tags)?)))
    {
        Ok((prompt, loras)) => {
            req.prompt = prompt;
            loras
        }
        Err(e) => {
            state.shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Err(bad_request(e));
        }
    };
    if state.shared.metrics.stopping.load(Ordering::Relaxed) {
        return Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the server is shutting down",
        ));
    }
    let (reply, answer) = oneshot::channel();
    state.progress.queued.fetch_add(1, Ordering::Relaxed);
    state
        .shared
        .metrics
        .in_flight
        .fetch_add(1, Ordering::Relaxed);
    let sent = state
        .jobs
        .send(Job {
            req,
            init_image,
            loras,
            reply,
        })
        .await;
    let result = match sent {
        Err(_) => {
            state.progress.queued.fetch_sub(1, Ordering::Relaxed);
            Err("the image worker stopped".to_string())
        }
        Ok(()) => answer
            .await
            .unwrap_or_else(|_| Err("the image worker stopped".into())),
    };
    state
        .shared
        .metrics
        .in_flight
        .fetch_sub(1, Ordering::Relaxed);
    result.map_err(|e| error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", e))
}

/// LoRAs one prompt may name at most.
const MAX_PROMPT_LORAS: usize = 8;

/// A1111's extra-network tags taken out of a prompt: `<lora:NAME>`, `<lora:NAME:STRENGTH>` (A1111's optional
/// second multiplier, for the text encoder, is refused: one strength applies to every part here). Returns the
/// prompt without the tags and the (name, strength) pairs.
pub(super) fn lora_tags(prompt: &str) -> Result<(String, Vec<(String, f32)>), String> {
    let mut rest = prompt;
    let mut text = String::with_capacity(prompt.len());
    let mut tags = Vec::new();
    while let Some(at) = rest.find("<lora:") {
        text.push_str(&rest[..at]);
        let after = &rest[at + "<lora:".len()..];
        let Some(end) = after.find('>') else {
            return Err("a '<lora:' tag in the prompt is not closed with '>'".into());
        };
        let tag = &after[..end];
        let (name, strength) = match tag.split_once(':') {
            None => (tag, 1.0),
            Some((name, s)) => {
                let v: f32 = s.trim().parse().map_err(|_| {
                    format!(
                        "<lora:{tag}>: '{s}' is not a strength (one number, e.g. <lora:{name}:0.8>)"
                    )
                })?;
                if !v.is_finite() {
                    return Err(format!(
                        "<lora:{tag}>: the strength must be a finite number"
                    ));
                }
                (name, v)
            }
        };
        let name = name.trim();
        let plain = !name.is_empty()
            && name.len() <= 200
            && !name.starts_with('.')
            && !name.contains(['/', '\\', '\0']);
        if !plain {
            return Err(format!(
                "<lora:{tag}>: name a file of the server's --lora-dir by its stem (no path, not starting with '.')"
            ));
        }
        tags.push((name.to_string(), strength));
        if tags.len() > MAX_PROMPT_LORAS {
            return Err(format!(
                "a prompt may name at most {MAX_PROMPT_LORAS} LoRAs"
            ));
        }
        rest = &after[end + 1..];
    }
    text.push_str(rest);
    // A tag between words leaves two spaces; prompts are tokenized, so collapse them.
    let text = text
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Ok((text, tags))
}

/// The files of a prompt's LoRA tags: `DIR/NAME.safetensors`, inside `--lora-dir` (no symlink out of it).
fn lora_files(dir: Option<&Path>, tags: &[(String, f32)]) -> Result<Vec<LoraSpec>, String> {
    if tags.is_empty() {
        return Ok(Vec::new());
    }
    let Some(dir) = dir else {
        return Err(
            "the prompt names a LoRA (<lora:...>) and this server has none: start it with --lora-dir DIR".into(),
        );
    };
    tags.iter()
        .map(|(name, strength)| {
            let file = dir.join(format!("{name}.safetensors"));
            let real = file.canonicalize().map_err(|_| {
                format!(
                    "<lora:{name}>: no '{name}.safetensors' in the server's LoRA folder (GET /sdapi/v1/loras lists                      them)"
                )
            })?;
            if !real.starts_with(dir) || !real.is_file() {
                return Err(format!(
                    "<lora:{name}>: '{name}.safetensors' leads outside the server's LoRA folder"
                ));
            }
            Ok(LoraSpec {
                path: real,
                strength: *strength,
            })
        })
        .collect()
}

/// A1111's `GET /sdapi/v1/loras`: the `.safetensors` files of `--lora-dir`.
async fn loras_route(State(state): State<Arc<ImageState>>) -> Response {
    let mut list = Vec::new();
    if let Some(dir) = &state.lora_dir
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "safetensors")
                && let Some(stem) = path.file_stem().map(|s| s.to_string_lossy().into_owned())
            {
                list.push(json!({"name": stem, "alias": stem, "path": path.display().to_string(), "metadata": {}}));
            }
        }
    }
    list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    Json(list).into_response()
}

/// Checks the size, count and steps of a request before it is queued.
fn check(req: &ImageRequest, iterations: usize) -> Result<(), String> {
    for (name, v) in [("width", req.width), ("height", req.height)] {
        if let Some(v) = v
            && (v == 0 || v % 16 != 0 || v > MAX_SIDE)
        {
            return Err(format!(
                "{name} {v}: give a multiple of 16 between 16 and {MAX_SIDE}"
            ));
        }
    }
    if req.batch == 0 || req.batch * iterations > MAX_IMAGES {
        return Err(format!(
            "{} images asked for: give between 1 and {MAX_IMAGES} per request",
            req.batch * iterations
        ));
    }
    if req.steps.is_some_and(|s| s == 0 || s > MAX_STEPS) {
        return Err(format!("steps: give 1 to {MAX_STEPS}"));
    }
    if !(req.cfg.is_finite() && (0.0..=100.0).contains(&req.cfg)) {
        return Err("cfg_scale: give a number from 0 (the model's default) to 100".into());
    }
    Ok(())
}

/// A sampler as a request names it: the catalogue's names, or A1111's labels (which may imply a scheduler).
fn sampler_of(name: &str) -> Result<(String, Option<String>), String> {
    if let Some((_, s, sched)) = A1111_SAMPLERS.iter().find(|(label, _, _)| *label == name) {
        return Ok((s.to_string(), sched.map(String::from)));
    }
    if crate::samplers::registry::list()
        .iter()
        .any(|s| s.name == name)
    {
        return Ok((name.to_string(), None));
    }
    Err(format!(
        "unknown sampler '{name}'; GET /sdapi/v1/samplers lists them"
    ))
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // splitmix64 of the clock, kept to 32 bits as A1111 shows seeds.
    let mut z = t.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) & 0xFFFF_FFFF
}

/// OpenAI's image request: its fields, plus trt-diff's (seed, steps, negative_prompt, guidance, cfg_scale,
/// sampler, scheduler). Fields OpenAI defines for other models are accepted and have no effect; unknown ones are
/// refused by name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiImageRequest {
    prompt: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    output_format: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default, rename = "quality")]
    _quality: Option<String>,
    #[serde(default, rename = "style")]
    _style: Option<String>,
    #[serde(default, rename = "user")]
    _user: Option<String>,
    #[serde(default, rename = "background")]
    _background: Option<String>,
    #[serde(default, rename = "moderation")]
    _moderation: Option<String>,
    #[serde(default, rename = "output_compression")]
    _output_compression: Option<u32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    guidance: Option<f32>,
    #[serde(default)]
    cfg_scale: Option<f32>,
    #[serde(default)]
    sampler: Option<String>,
    #[serde(default)]
    scheduler: Option<String>,
}

fn parse_size(size: &str) -> Result<Option<(usize, usize)>, String> {
    if size == "auto" {
        return Ok(None);
    }
    let parsed = size
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)));
    parsed
        .map(Some)
        .ok_or_else(|| format!("size '{size}': give WIDTHxHEIGHT (e.g. 1024x1024) or auto"))
}

/// An OpenAI image request as the worker runs it, or the message of its 400 answer.
pub(super) fn openai_request(body: &[u8]) -> Result<ImageRequest, String> {
    let r: OpenAiImageRequest =
        serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    if r.response_format
        .as_deref()
        .is_some_and(|f| f != "b64_json")
    {
        return Err(
            "response_format 'url' needs a file host, which this server is not; ask for b64_json"
                .into(),
        );
    }
    if r.output_format.as_deref().is_some_and(|f| f != "png") {
        return Err("output_format: this server writes png".into());
    }
    if r.stream == Some(true) {
        return Err(
            "stream: image streaming (partial images) is not supported; drop stream".into(),
        );
    }
    if let Some(m) = r.model.as_deref() {
        tracing::debug!("request names model '{m}'; this server has one");
    }
    let size = r.size.as_deref().map(parse_size).transpose()?.flatten();
    let (sampler, implied) = r
        .sampler
        .as_deref()
        .map(sampler_of)
        .transpose()?
        .map_or((None, None), |(s, sch)| (Some(s), sch));
    let req = ImageRequest {
        prompt: r.prompt,
        negative_prompt: r.negative_prompt,
        steps: r.steps,
        sampler,
        scheduler: r.scheduler.or(implied),
        seed: r.seed.unwrap_or_else(random_seed),
        width: size.map(|s| s.0),
        height: size.map(|s| s.1),
        guidance: r.guidance,
        cfg: r.cfg_scale.unwrap_or(0.0),
        batch: r.n.unwrap_or(1),
        strength: 1.0,
        ..Default::default()
    };
    check(&req, 1)?;
    Ok(req)
}

async fn openai_generations(
    State(state): State<Arc<ImageState>>,
    body: axum::body::Bytes,
) -> Response {
    state
        .shared
        .metrics
        .requests
        .fetch_add(1, Ordering::Relaxed);
    let req = match openai_request(&body) {
        Ok(r) => r,
        Err(e) => {
            state.shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return bad_request(e);
        }
    };
    let g = match submit(&state, req, None).await {
        Ok(g) => g,
        Err(e) => return e,
    };
    Json(json!({
        "created": now_secs(),
        "data": g.pngs.iter().map(|p| json!({"b64_json": B64.encode(p)})).collect::<Vec<_>>(),
        "output_format": "png",
        "size": format!("{}x{}", g.width, g.height),
    }))
    .into_response()
}

/// AUTOMATIC1111's txt2img/img2img body: the fields that mean something here; others (hires fix, scripts,
/// face restoration, ...) are ignored, as A1111 ignores fields it does not know.
#[derive(Deserialize, serde::Serialize)]
struct A1111Request {
    #[serde(default)]
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    steps: Option<usize>,
    #[serde(default)]
    cfg_scale: Option<f32>,
    /// Forge's name for FLUX.1-dev's distilled guidance.
    #[serde(default)]
    distilled_cfg_scale: Option<f32>,
    #[serde(default)]
    width: Option<usize>,
    #[serde(default)]
    height: Option<usize>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    sampler_name: Option<String>,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    n_iter: Option<usize>,
    #[serde(default)]
    denoising_strength: Option<f32>,
    #[serde(default, skip_serializing)]
    init_images: Vec<String>,
}

async fn txt2img(State(state): State<Arc<ImageState>>, body: axum::body::Bytes) -> Response {
    a1111(&state, &body, false).await
}

async fn img2img(State(state): State<Arc<ImageState>>, body: axum::body::Bytes) -> Response {
    a1111(&state, &body, true).await
}

/// An AUTOMATIC1111 request checked and turned into the worker's: the request as given (echoed back), the base
/// request, its iterations and the init image; or the message of its 400 answer.
pub(super) struct A1111Parsed {
    given: A1111Request,
    base: ImageRequest,
    iterations: usize,
    init: Option<(Vec<u8>, &'static str)>,
}

pub(super) fn a1111_request(body: &[u8], with_init: bool) -> Result<A1111Parsed, String> {
    let r: A1111Request =
        serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    let init = if with_init {
        let first = r
            .init_images
            .first()
            .ok_or("img2img needs init_images: one base64-encoded image")?;
        // Data URLs (`data:image/png;base64,...`) as browsers make them, or bare base64.
        let b64 = first.split_once(',').map_or(first.as_str(), |(_, b)| b);
        let bytes = B64
            .decode(b64.trim())
            .map_err(|e| format!("init_images[0] is not base64: {e}"))?;
        let ext = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            "png"
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            "jpg"
        } else {
            return Err("init_images[0] is neither a PNG nor a JPEG file".into());
        };
        Some((bytes, ext))
    } else {
        None
    };
    let (sampler, implied) = r
        .sampler_name
        .as_deref()
        .map(sampler_of)
        .transpose()?
        .map_or((None, None), |(s, sch)| (Some(s), sch));
    let scheduler = match r.scheduler.as_deref() {
        // A1111 1.9+ sends "Automatic" for the sampler's own choice.
        None | Some("Automatic") | Some("automatic") => implied,
        Some(s) => Some(s.to_lowercase().replace(' ', "_")),
    };
    let seed = match r.seed {
        None | Some(-1) => random_seed(),
        Some(s) if s >= 0 => s as u64,
        Some(s) => return Err(format!("seed {s}: give -1 (random) or a seed >= 0")),
    };
    let iterations = r.n_iter.unwrap_or(1).max(1);
    let base = ImageRequest {
        prompt: r.prompt.clone(),
        negative_prompt: r.negative_prompt.clone().filter(|n| !n.is_empty()),
        steps: r.steps,
        sampler,
        scheduler,
        seed,
        width: r.width,
        height: r.height,
        guidance: r.distilled_cfg_scale,
        cfg: r.cfg_scale.unwrap_or(0.0),
        batch: r.batch_size.unwrap_or(1),
        strength: if with_init {
            r.denoising_strength.unwrap_or(0.75)
        } else {
            1.0
        },
        ..Default::default()
    };
    check(&base, iterations)?;
    Ok(A1111Parsed {
        given: r,
        base,
        iterations,
        init,
    })
}

async fn a1111(state: &ImageState, body: &[u8], with_init: bool) -> Response {
    state
        .shared
        .metrics
        .requests
        .fetch_add(1, Ordering::Relaxed);
    let A1111Parsed {
        given: r,
        base,
        iterations,
        init,
    } = match a1111_request(body, with_init) {
        Ok(p) => p,
        Err(e) => {
            state.shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return bad_request(e);
        }
    };
    let seed = base.seed;
    let mut images = Vec::new();
    let mut infotexts = Vec::new();
    let mut seeds = Vec::new();
    let (mut width, mut height) = (0, 0);
    for it in 0..iterations {
        // As A1111: iteration i starts at seed + i * batch_size (image j of a batch uses seed + j).
        let mut req = base.clone();
        req.seed = seed + (it * base.batch) as u64;
        let g = match submit(state, req.clone(), init.clone()).await {
            Ok(g) => g,
            Err(e) => return e,
        };
        for (j, png) in g.pngs.iter().enumerate() {
            images.push(B64.encode(png));
            seeds.push(req.seed + j as u64);
            infotexts.push(format!("{}, Image: {j}", g.parameters));
        }
        (width, height) = (g.width, g.height);
    }
    let d = &state.defaults;
    let info = json!({
        "prompt": r.prompt,
        "negative_prompt": r.negative_prompt.clone().unwrap_or_default(),
        "seed": seeds.first(),
        "all_seeds": seeds,
        "width": width,
        "height": height,
        "steps": r.steps.unwrap_or(d.steps),
        "sampler_name": r.sampler_name.clone().unwrap_or_else(|| d.sampler.clone()),
        "cfg_scale": if base.cfg == 0.0 { d.cfg } else { base.cfg },
        "batch_size": base.batch,
        "sd_model_name": state.shared.model,
        "infotexts": infotexts,
    });
    Json(json!({
        "images": images,
        "parameters": serde_json::to_value(&r).unwrap_or_default(),
        "info": info.to_string(),
    }))
    .into_response()
}

async fn samplers() -> Response {
    let list: Vec<_> = crate::samplers::registry::list()
        .iter()
        .map(|s| {
            let aliases: Vec<&str> = A1111_SAMPLERS
                .iter()
                .filter(|(_, name, sched)| *name == s.name && sched.is_none())
                .map(|(label, _, _)| *label)
                .collect();
            json!({"name": s.name, "aliases": aliases, "options": {}})
        })
        .collect();
    Json(list).into_response()
}

async fn schedulers() -> Response {
    let list: Vec<_> = crate::samplers::schedule::SCHEDULERS
        .iter()
        .map(|s| json!({"name": s, "label": s, "aliases": null, "default_rho": null, "need_inner_model": false}))
        .collect();
    Json(list).into_response()
}

async fn sd_models(State(state): State<Arc<ImageState>>) -> Response {
    Json(json!([{
        "title": state.shared.model,
        "model_name": state.shared.model,
        "hash": null,
        "sha256": null,
        "filename": state.shared.engine_path,
        "config": null,
    }]))
    .into_response()
}

async fn options(State(state): State<Arc<ImageState>>) -> Response {
    Json(json!({"sd_model_checkpoint": state.shared.model})).into_response()
}

async fn progress_route(State(state): State<Arc<ImageState>>) -> Response {
    let p = &state.progress;
    let (step, steps) = (
        p.step.load(Ordering::Relaxed),
        p.steps.load(Ordering::Relaxed),
    );
    let fraction = if steps == 0 {
        0.0
    } else {
        step as f64 / steps as f64
    };
    Json(json!({
        "progress": fraction,
        "eta_relative": 0.0,
        "state": {
            "job_count": p.queued.load(Ordering::Relaxed) + usize::from(steps > 0),
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": null,
        "textinfo": null,
    }))
    .into_response()
}

async fn models(State(state): State<Arc<ImageState>>) -> Response {
    Json(json!({
        "object": "list",
        "data": [{
            "id": state.shared.model,
            "object": "model",
            "created": state.shared.created,
            "owned_by": "trt-diff",
            "arch": state.arch,
        }],
    }))
    .into_response()
}
