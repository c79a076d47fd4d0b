//! `trt-diff serve`: an HTTP server (axum) for LLM engines.
//! - `POST /v1/generate` `{"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stream"}`: with
//!   `"stream": true` server-sent events, one `data:` event per text piece and a final one with usage and timings;
//!   otherwise one JSON body.
//! - `POST /v1/completions`: the OpenAI completions API (streaming too, ending with `data: [DONE]`).
//! - `POST /v1/chat/completions`: the OpenAI chat API (streaming too); the prompt is the model's chat template
//!   (GGUF `tokenizer.chat_template`, ChatML without one) rendered for the messages.
//! - `GET /health`, `GET /metrics` (Prometheus text).
//!
//! One worker thread owns the engine and serves requests in arrival order (a queue); a streaming client that goes
//! away stops its generation at the next token. Errors are JSON `{"error": {"message", "type"}}` with 4xx codes.
use crate::pipelines::llm::{GenerationStats, Generator, SamplingParams, TextTokenizer};
use anyhow::{Context, Result};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::mpsc;

mod limits;

const MAX_BODY_BYTES: usize = 64 * 1024;

/// `trt-diff serve` options beyond the engine and address: access, CORS and the limits that keep the server bounded.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeOptions {
    /// Require `Authorization: Bearer KEY` on every route but /health (also read from TRT_DIFF_API_KEY).
    #[arg(long, env = "TRT_DIFF_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Allow browsers on ORIGIN (e.g. http://localhost:3000, or * for any) to call the API; repeat for several.
    /// CORS is off without it.
    #[arg(long, value_name = "ORIGIN")]
    pub cors: Vec<String>,
    /// Seconds a client has to send a request's headers; an idle keep-alive connection is closed after it too.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub header_timeout: f64,
    /// Seconds a client has to send a request's body once its headers arrived (408 after).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Seconds a response may wait on a client that stopped reading before the connection is dropped.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub write_timeout: f64,
    /// Open connections at most; more are answered with 503 and closed.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections: usize,
    /// After SIGINT/SIGTERM, seconds given to requests in progress before the server stops anyway.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    pub shutdown_grace: f64,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            api_key: None,
            cors: Vec::new(),
            header_timeout: 10.0,
            body_timeout: 30.0,
            write_timeout: 30.0,
            max_connections: 256,
            shutdown_grace: 10.0,
        }
    }
}

impl ServeOptions {
    fn limits(&self) -> Result<limits::Limits> {
        let secs = |name: &str, v: f64| -> Result<std::time::Duration> {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                anyhow::bail!("--{name} must be a number of seconds in (0, 86400], got {v}");
            }
            Ok(std::time::Duration::from_secs_f64(v))
        };
        if self.max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        Ok(limits::Limits {
            header_timeout: secs("header-timeout", self.header_timeout)?,
            body_timeout: secs("body-timeout", self.body_timeout)?,
            write_timeout: secs("write-timeout", self.write_timeout)?,
            max_connections: self.max_connections,
            shutdown_grace: secs("shutdown-grace", self.shutdown_grace)?,
            max_body_bytes: MAX_BODY_BYTES,
        })
    }
}

/// Request fields shared by both APIs; unknown fields are rejected so typos do not pass silently.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    pub prompt: String,
    #[serde(default = "default_max_tokens")]
    pub max_tokens: usize,
    #[serde(default)]
    pub temperature: f32,
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub min_p: f32,
    #[serde(default = "one", alias = "repeat_penalty")]
    pub repetition_penalty: f32,
    #[serde(default)]
    pub presence_penalty: f32,
    #[serde(default)]
    pub frequency_penalty: f32,
    /// A string or a list of strings (as OpenAI's API takes it).
    #[serde(default)]
    pub stop: Option<StopField>,
    /// OpenAI clients send the model name; accepted and echoed.
    #[serde(default)]
    pub model: Option<String>,
    /// Chat requests (`/v1/chat/completions`): the conversation, rendered with the model's chat template.
    #[serde(skip)]
    pub messages: Option<Vec<crate::pipelines::chat::ChatMessage>>,
}

#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

fn default_max_tokens() -> usize {
    64
}
fn one() -> f32 {
    1.0
}

enum Piece {
    Text(String),
    Done(Result<GenerationStats, String>),
}

struct Job {
    req: GenerateRequest,
    out: mpsc::Sender<Piece>,
}

#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    in_flight: AtomicU64,
}

struct AppState {
    counters: Arc<limits::ConnCounters>,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    model: String,
    max_seq_len: usize,
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind}})),
    )
        .into_response()
}

/// Checks a request's values; the error is the message for a 400 answer.
fn validate(req: &GenerateRequest, max_seq_len: usize) -> Result<(), String> {
    let bad = |m: String| Err(m);
    if req.max_tokens == 0 || req.max_tokens >= max_seq_len {
        return bad(format!(
            "max_tokens must be between 1 and {}",
            max_seq_len - 1
        ));
    }
    if !(0.0..=10.0).contains(&req.temperature) {
        return bad("temperature must be between 0 and 10".into());
    }
    if !(0.0..=1.0).contains(&req.top_p) || req.top_p == 0.0 {
        return bad("top_p must be in (0, 1]".into());
    }
    if !(0.0..=1.0).contains(&req.min_p) {
        return bad("min_p must be in [0, 1]".into());
    }
    if !(req.repetition_penalty > 0.0 && req.repetition_penalty <= 10.0) {
        return bad("repetition_penalty must be in (0, 10]".into());
    }
    if req.messages.as_ref().is_some_and(|m| m.is_empty()) {
        return bad("messages must hold at least one message".into());
    }
    let prompt_bytes = req.prompt.len()
        + req
            .messages
            .iter()
            .flatten()
            .map(|m| m.content.len())
            .sum::<usize>();
    // Bytes bound tokens from above (byte fallback), so this rejects hopeless prompts before queueing.
    if prompt_bytes > 16 * max_seq_len {
        return bad(format!(
            "prompt is too long for a context of {max_seq_len} tokens"
        ));
    }
    Ok(())
}

/// Runs jobs one after another on the engine (its own thread: engines are not shared across threads).
/// Metrics are kept here, where every outcome is known, including clients that left mid-stream.
fn worker(
    mut engine: Box<dyn crate::backend::Engine>,
    tok: Box<dyn TextTokenizer + Send>,
    cfg: crate::models::llama::LlamaConfig,
    metrics: Arc<Metrics>,
    mut jobs: mpsc::Receiver<Job>,
) {
    while let Some(job) = jobs.blocking_recv() {
        let params = SamplingParams {
            temperature: job.req.temperature,
            top_k: job.req.top_k,
            top_p: job.req.top_p,
            seed: job.req.seed,
            max_tokens: job.req.max_tokens,
            min_p: job.req.min_p,
            repetition_penalty: job.req.repetition_penalty,
            presence_penalty: job.req.presence_penalty,
            frequency_penalty: job.req.frequency_penalty,
            stop: match &job.req.stop {
                None => Vec::new(),
                Some(StopField::One(s)) => vec![s.clone()],
                Some(StopField::Many(v)) => v.clone(),
            },
        };
        let mut g = Generator {
            engine: engine.as_mut(),
            max_seq_len: cfg.max_seq_len,
        };
        let out = job.out.clone();
        let m = metrics.clone();
        let on_text = |t: &str| {
            m.generated_tokens.fetch_add(1, Ordering::Relaxed);
            // A closed channel means the client left: stop generating.
            out.blocking_send(Piece::Text(t.to_string()))
                .map_err(|_| anyhow::anyhow!("client disconnected"))
        };
        let result = match &job.req.messages {
            None => g.generate(tok.as_ref(), &job.req.prompt, &params, on_text),
            Some(messages) => chat_tokens(tok.as_ref(), messages)
                .and_then(|ids| g.generate_tokens(tok.as_ref(), ids, &params, on_text)),
        };
        metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        match &result {
            Ok(s) => {
                metrics
                    .prompt_tokens
                    .fetch_add(s.prompt_tokens as u64, Ordering::Relaxed);
            }
            Err(_) => {
                metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = job
            .out
            .blocking_send(Piece::Done(result.map_err(|e| format!("{e:#}"))));
    }
}

/// The conversation rendered with the model's template (ChatML without one) and tokenized with special tokens.
fn chat_tokens(
    tok: &dyn TextTokenizer,
    messages: &[crate::pipelines::chat::ChatMessage],
) -> Result<Vec<u32>> {
    use crate::pipelines::chat::{CHATML, render};
    let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
    let template = tok.chat_template().unwrap_or(CHATML);
    let prompt = render(
        template,
        messages,
        &text_of(tok.bos()),
        &text_of(tok.eos()),
        true,
    )?;
    Ok(tok.encode_chat(&prompt))
}

fn finish_reason(stats: &GenerationStats) -> &'static str {
    if stats.stopped_by_eos || stats.stopped_by_stop_string {
        "stop"
    } else {
        "length"
    }
}

fn usage(stats: &GenerationStats) -> serde_json::Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.generated_tokens,
        "total_tokens": stats.prompt_tokens + stats.generated_tokens,
    })
}

fn timings(stats: &GenerationStats) -> serde_json::Value {
    json!({
        "prompt_ms": stats.prompt_seconds * 1e3,
        "generation_ms": stats.generation_seconds * 1e3,
        "generation_tokens_per_second": stats.generated_tokens as f64 / stats.generation_seconds.max(1e-9),
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Native,
    OpenAi,
    Chat,
}

/// `/v1/chat/completions`: the body is checked like a completions request, with `messages` in place of `prompt`.
async fn submit_chat(
    state: Arc<AppState>,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Response {
    let reject = |state: &AppState, status: StatusCode, m: String| {
        state.metrics.requests.fetch_add(1, Ordering::Relaxed);
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        error(status, "invalid_request_error", m)
    };
    let mut v = match body {
        Ok(Json(v)) => v,
        Err(e) => {
            let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                e.status()
            } else {
                StatusCode::BAD_REQUEST
            };
            return reject(&state, status, e.body_text());
        }
    };
    let Some(obj) = v.as_object_mut() else {
        return reject(
            &state,
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object".into(),
        );
    };
    if obj.contains_key("prompt") {
        return reject(
            &state,
            StatusCode::BAD_REQUEST,
            "chat requests take `messages`, not `prompt` (use /v1/completions for a raw prompt)"
                .into(),
        );
    }
    let Some(messages) = obj.remove("messages") else {
        return reject(
            &state,
            StatusCode::BAD_REQUEST,
            "missing field `messages`".into(),
        );
    };
    let messages: Vec<crate::pipelines::chat::ChatMessage> = match serde_json::from_value(messages)
    {
        Ok(m) => m,
        Err(e) => {
            return reject(
                &state,
                StatusCode::BAD_REQUEST,
                format!("messages: {e} (each message is {{\"role\": ..., \"content\": \"text\"}})"),
            );
        }
    };
    obj.insert("prompt".into(), serde_json::Value::String(String::new()));
    match serde_json::from_value::<GenerateRequest>(v) {
        Ok(mut req) => {
            req.messages = Some(messages);
            submit(state, Ok(Json(req)), Api::Chat).await
        }
        Err(e) => reject(&state, StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn submit(
    state: Arc<AppState>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
    api: Api,
) -> Response {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            state.metrics.errors.fetch_add(1, Ordering::Relaxed);
            let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                e.status()
            } else {
                StatusCode::BAD_REQUEST
            };
            return error(status, "invalid_request_error", e.body_text());
        }
    };
    if let Err(m) = validate(&req, state.max_seq_len) {
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        return error(StatusCode::BAD_REQUEST, "invalid_request_error", m);
    }
    let stream = req.stream;
    let model = req.model.clone().unwrap_or_else(|| state.model.clone());
    let (tx, mut rx) = mpsc::channel(64);
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    if state.jobs.send(Job { req, out: tx }).await.is_err() {
        state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the generation worker has stopped",
        );
    }
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let id = format!(
        "{}-{created}-{}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" },
        state.metrics.requests.load(Ordering::Relaxed)
    );
    if !stream {
        let mut text = String::new();
        while let Some(p) = rx.recv().await {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::Done(r) => {
                    return match r {
                        Ok(s) if api == Api::Native => Json(json!({
                            "text": text, "finish_reason": finish_reason(&s), "usage": usage(&s), "timings": timings(&s),
                        }))
                        .into_response(),
                        Ok(s) if api == Api::Chat => Json(json!({
                            "id": id, "object": "chat.completion", "created": created, "model": model,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish_reason(&s)}],
                            "usage": usage(&s),
                        }))
                        .into_response(),
                        Ok(s) => Json(json!({
                            "id": id, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": 0, "text": text, "finish_reason": finish_reason(&s), "logprobs": null}],
                            "usage": usage(&s),
                        }))
                        .into_response(),
                        Err(e) => error(StatusCode::BAD_REQUEST, "invalid_request_error", e),
                    };
                }
            }
        }
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "generation ended without a result",
        );
    }
    let events = futures_util::stream::unfold((rx, false, true), move |(mut rx, done, first)| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            if done {
                return None;
            }
            let event = match rx.recv().await? {
                Piece::Text(t) => match api {
                    Api::Native => json!({"text": t}),
                    Api::OpenAi => {
                        json!({"id": id, "object": "text_completion", "created": created, "model": model,
                        "choices": [{"index": 0, "text": t, "finish_reason": null}]})
                    }
                    Api::Chat => {
                        // The first chunk names the role, as OpenAI's stream does.
                        let delta = if first {
                            json!({"role": "assistant", "content": t})
                        } else {
                            json!({"content": t})
                        };
                        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": null}]})
                    }
                },
                Piece::Done(r) => {
                    let last = match (&r, api) {
                        (Ok(s), Api::Native) => {
                            json!({"done": true, "finish_reason": finish_reason(s), "usage": usage(s), "timings": timings(s)})
                        }
                        (Ok(s), Api::OpenAi) => {
                            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                            "choices": [{"index": 0, "text": "", "finish_reason": finish_reason(s)}], "usage": usage(s)})
                        }
                        (Ok(s), Api::Chat) => {
                            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason(s)}], "usage": usage(s)})
                        }
                        (Err(e), _) => json!({"error": {"message": e, "type": "server_error"}}),
                    };
                    let mut events = vec![Ok::<Event, std::convert::Infallible>(
                        Event::default().data(last.to_string()),
                    )];
                    if api != Api::Native {
                        events.push(Ok(Event::default().data("[DONE]")));
                    }
                    return Some((futures_util::stream::iter(events), (rx, true, false)));
                }
            };
            Some((
                futures_util::stream::iter(vec![Ok(Event::default().data(event.to_string()))]),
                (rx, false, false),
            ))
        }
    });
    use futures_util::StreamExt;
    Sse::new(events.flatten())
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let body = format!(
        "# HELP trt_diff_requests_total Generation requests received.\n# TYPE trt_diff_requests_total counter\n\
         trt_diff_requests_total {}\n# HELP trt_diff_request_errors_total Requests answered with an error.\n\
         # TYPE trt_diff_request_errors_total counter\ntrt_diff_request_errors_total {}\n\
         # HELP trt_diff_prompt_tokens_total Prompt tokens processed.\n# TYPE trt_diff_prompt_tokens_total counter\n\
         trt_diff_prompt_tokens_total {}\n# HELP trt_diff_generated_tokens_total Tokens generated.\n\
         # TYPE trt_diff_generated_tokens_total counter\ntrt_diff_generated_tokens_total {}\n\
         # HELP trt_diff_requests_in_flight Requests queued or generating.\n# TYPE trt_diff_requests_in_flight gauge\n\
         trt_diff_requests_in_flight {}\n",
        m.requests.load(Ordering::Relaxed) + state.counters.bad_bodies.load(Ordering::Relaxed),
        m.errors.load(Ordering::Relaxed) + state.counters.bad_bodies.load(Ordering::Relaxed),
        m.prompt_tokens.load(Ordering::Relaxed),
        m.generated_tokens.load(Ordering::Relaxed),
        m.in_flight.load(Ordering::Relaxed),
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
    tracing::info!("shutting down: finishing requests in progress");
}

/// Serves an LLM engine until SIGINT/SIGTERM. Prints `listening on ADDR` once bound (port 0 picks a free port).
pub fn serve(
    engine_path: &std::path::Path,
    backend: crate::runner::BackendChoice,
    host: &str,
    port: u16,
    opts: &ServeOptions,
) -> Result<()> {
    let limits = Arc::new(opts.limits()?);
    use crate::manifest::{Manifest, Pipeline, sidecar_path};
    if !engine_path.exists() {
        anyhow::bail!(
            "cannot open engine '{}': no such file; check the path",
            engine_path.display()
        );
    }
    let manifest = Manifest::read(&sidecar_path(engine_path))?;
    let Some(Pipeline::Llm {
        config, tokenizer, ..
    }) = manifest.pipeline.clone()
    else {
        anyhow::bail!(
            "'{}' is not an LLM engine; serve takes engines built with `trt-diff build --arch ...`",
            engine_path.display()
        );
    };
    let dir = engine_path.parent().unwrap_or(std::path::Path::new("."));
    let tok = crate::pipelines::llm::load_tokenizer(&dir.join(&tokenizer), config.vocab_size)?;
    let (tx, rx) = mpsc::channel::<Job>(256);
    let cfg = config.clone();
    let metrics = Arc::new(Metrics::default());
    let worker_metrics = metrics.clone();
    // The engine is opened on the thread that uses it (engines need not be Send); open errors come back here.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<(), String>>(1);
    let path = engine_path.to_path_buf();
    std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || {
            match crate::runner::open_engine(
                &path,
                backend,
                &crate::pipelines::llm::cpu_options(&cfg),
            ) {
                Ok(engine) => {
                    let _ = ready_tx.send(Ok(()));
                    worker(engine, tok, cfg, worker_metrics, rx)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                }
            }
        })
        .context("cannot start the generation thread")?;
    ready_rx
        .recv()
        .context("the generation thread stopped before opening the engine")?
        .map_err(|e| anyhow::anyhow!(e))?;
    let counters = Arc::new(limits::ConnCounters::default());
    let state = Arc::new(AppState {
        counters: counters.clone(),
        jobs: tx,
        metrics,
        model: engine_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        max_seq_len: config.max_seq_len,
    });
    let app = Router::new()
        .route(
            "/v1/generate",
            post(|State(s): State<Arc<AppState>>, b| submit(s, b, Api::Native)),
        )
        .route(
            "/v1/completions",
            post(|State(s): State<Arc<AppState>>, b| submit(s, b, Api::OpenAi)),
        )
        .route(
            "/v1/chat/completions",
            post(|State(s): State<Arc<AppState>>, b| submit_chat(s, b)),
        )
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see /v1/generate, /v1/completions, /v1/chat/completions, /health, /metrics",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(limits::BodyGuard {
                limits: limits.clone(),
                counters: counters.clone(),
            }),
            limits::read_body,
        ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| {
                format!("cannot listen on {host}:{port} (in use? choose another --port)")
            })?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write;
        std::io::stdout().flush()?;
        limits::serve(listener, app, limits, counters, shutdown_signal()).await?;
        Ok::<(), anyhow::Error>(())
    })?;
    // Connections dropped at the end of the grace period may leave tasks behind: do not wait for them.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}
