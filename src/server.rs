//! `trt-diff serve`: an HTTP server (axum on hyper) for LLM engines.
//! - `POST /v1/generate` `{"prompt", "max_tokens", "temperature", "top_k", "top_p", "seed", "stream"}`: with
//!   `"stream": true` server-sent events, one `data:` event per text piece and a final one with usage and timings;
//!   otherwise one JSON body.
//! - `POST /v1/completions`, `POST /v1/chat/completions`: the OpenAI APIs (`openai.rs` says which fields), streaming
//!   too (ending with `data: [DONE]`); the chat prompt is the model's chat template (GGUF
//!   `tokenizer.chat_template`, ChatML without one) rendered for the messages. `GET /v1/models`, `/v1/models/{id}`.
//! - llama-server's `POST /tokenize`, `POST /detokenize`, `GET /props`.
//! - `GET /health` (public even with `--api-key`), `GET /metrics` (Prometheus, llama.cpp's names and ours).
//!
//! One worker thread owns the engine and serves requests in arrival order (a queue); a request's errors that can be
//! known before generation starts (prompt too long, template errors, bad token ids) are 4xx answers even for
//! streams; a streaming client that goes away stops its generation at the next token. Errors are JSON
//! `{"error": {"message", "type"}}`. `limits.rs` bounds what clients can hold (timeouts, connections, shutdown).
use crate::backend::BackendChoice;
use crate::manifest::EngineFile;
use crate::pipelines::llm::{
    GenerationStats, Generator, LlmModel, SamplingParams, TextTokenizer, TokenLogprob,
};
use anyhow::{Context, Result};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use openai::{Parsed, PromptInput};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::mpsc;

mod access;
mod batch;
mod grammar;
mod images;
mod limits;
mod openai;

const MAX_BODY_BYTES: usize = 64 * 1024;

/// Most sequences a step decodes: beyond `DOT_MAX_ROWS` rows the matrix products change method and rounding, and a
/// request's output would depend on how many others run beside it.
const MAX_PARALLEL: usize = crate::backend::half_matmul::DOT_MAX_ROWS;

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
    /// Image bundles: the folder of LoRA files that prompts may apply with `<lora:NAME:STRENGTH>` (A1111's
    /// syntax; NAME.safetensors in DIR).
    #[arg(long, value_name = "DIR")]
    pub lora_dir: Option<std::path::PathBuf>,
    /// Sequences generated together (continuous batching: one KV-cache slot each, one decoder call per step for
    /// all of them); 1 serves one at a time. CPU decoder engines batch; others run one sequence at a time.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub parallel: usize,
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
            lora_dir: None,
            parallel: 1,
        }
    }
}

impl ServeOptions {
    /// Checks the values (before anything is opened).
    pub fn check(&self) -> Result<()> {
        self.limits(MAX_BODY_BYTES).map(|_| ())
    }

    fn limits(&self, max_body_bytes: usize) -> Result<limits::Limits> {
        let secs = |name: &str, v: f64| -> Result<std::time::Duration> {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                anyhow::bail!("--{name} must be a number of seconds in (0, 86400], got {v}");
            }
            Ok(std::time::Duration::from_secs_f64(v))
        };
        if self.max_connections == 0 {
            anyhow::bail!("--max-connections must be at least 1");
        }
        if !(1..=MAX_PARALLEL).contains(&self.parallel) {
            anyhow::bail!(
                "--parallel must be between 1 and {MAX_PARALLEL} (sequences decoded together), got {}",
                self.parallel
            );
        }
        Ok(limits::Limits {
            header_timeout: secs("header-timeout", self.header_timeout)?,
            body_timeout: secs("body-timeout", self.body_timeout)?,
            write_timeout: secs("write-timeout", self.write_timeout)?,
            max_connections: self.max_connections,
            shutdown_grace: secs("shutdown-grace", self.shutdown_grace)?,
            max_body_bytes,
        })
    }
}

/// `/v1/generate`'s body: the prompt, `stream`, `model` (accepted and echoed), and the sampling fields exactly as
/// `generate` takes them (`SamplingParams`: same names, same defaults). Unknown fields are rejected so typos do not
/// pass silently.
#[derive(Deserialize, Debug)]
pub struct GenerateRequest {
    pub prompt: String,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(flatten)]
    pub params: SamplingParams,
    /// Whatever else the body holds (refused).
    #[serde(flatten)]
    unknown: std::collections::BTreeMap<String, serde_json::Value>,
}

impl GenerateRequest {
    fn into_parsed(self) -> Result<Parsed, String> {
        if let Some(k) = self.unknown.keys().next() {
            return Err(format!(
                "unknown field `{k}`; /v1/generate takes prompt, stream, model, max_tokens, temperature, top_k, \
                 top_p, seed, min_p, repetition_penalty (repeat_penalty), presence_penalty, frequency_penalty, stop"
            ));
        }
        Ok(Parsed {
            prompts: vec![PromptInput::Text(self.prompt)],
            n: 1,
            max_tokens: Some(self.params.max_tokens),
            params: self.params,
            logprobs: None,
            stream: self.stream,
            include_usage: false,
            model: self.model,
            json_schema: None,
        })
    }
}

/// The routes whose JSON bodies [`parse_body`] reads.
pub const BODY_ROUTES: &[&str] = &[
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/generate",
    "/v1/images/generations",
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
];

/// A request body parsed and checked as `route` does before anything runs: Ok, or the message of its 400 answer
/// (the fuzzer's entry to the request parsers).
pub fn parse_body(route: &str, body: &[u8]) -> Result<(), String> {
    match route {
        "/v1/images/generations" => images::openai_request(body).map(|_| ()),
        "/sdapi/v1/txt2img" => images::a1111_request(body, false).map(|_| ()),
        "/sdapi/v1/img2img" => images::a1111_request(body, true).map(|_| ()),
        _ => {
            let v: serde_json::Value = serde_json::from_slice(body)
                .map_err(|e| format!("the body is not valid JSON: {e}"))?;
            match route {
                "/v1/completions" => openai::completion(v).map(|_| ()),
                "/v1/chat/completions" => openai::chat(v).map(|_| ()),
                "/v1/generate" => serde_json::from_value::<GenerateRequest>(v)
                    .map_err(|e| e.to_string())?
                    .into_parsed()
                    .map(|_| ()),
                other => Err(format!("no JSON route {other}")),
            }
        }
    }
}

/// What the worker sends back for a job.
enum Piece {
    /// The prompts were accepted (their token counts); generation follows.
    Started(Vec<usize>),
    /// Text of choice `choice` (and the token's log-probabilities when asked for).
    Step {
        choice: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    ChoiceDone {
        choice: usize,
        stats: GenerationStats,
    },
    /// Before `Started`: the request's answer. After: the generation failed.
    Failed(StatusCode, String),
}

struct Job {
    req: Parsed,
    /// Unbounded, so the worker never waits on a client that reads slowly (a request's pieces are bounded by
    /// its max_tokens and n).
    out: mpsc::UnboundedSender<Piece>,
}

#[derive(Default)]
struct Metrics {
    requests: AtomicU64,
    errors: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    /// Queued or generating.
    in_flight: AtomicU64,
    processing: AtomicU64,
    kv_tokens: AtomicU64,
    prompt_micros: AtomicU64,
    generation_micros: AtomicU64,
    decode_calls: AtomicU64,
    /// Set on SIGINT/SIGTERM: queued requests are answered 503.
    stopping: AtomicBool,
}

/// What every route family shares: the counters behind /metrics and shutdown, and the served model's name.
#[derive(Clone)]
struct AppShared {
    metrics: Arc<Metrics>,
    model: String,
    engine_path: String,
    created: u64,
}

struct AppState {
    counters: Arc<limits::ConnCounters>,
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    model: String,
    max_seq_len: usize,
    vocab_size: usize,
    /// KV-cache slots: sequences generated together.
    slots: usize,
    /// For /tokenize, /detokenize and /props (the worker has its own).
    tok: std::sync::Mutex<Box<dyn TextTokenizer + Send>>,
    created: u64,
}

fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Response {
    (
        status,
        Json(json!({"error": {"message": message.into(), "type": kind, "code": status.as_u16()}})),
    )
        .into_response()
}

fn bad_request(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks a request's values; the error is the message for a 400 answer.
fn validate(req: &Parsed, max_seq_len: usize) -> Result<(), String> {
    let p = &req.params;
    if let Some(m) = req.max_tokens
        && (m == 0 || m >= max_seq_len)
    {
        return Err(format!(
            "max_tokens must be between 1 and {}",
            max_seq_len - 1
        ));
    }
    if !(0.0..=10.0).contains(&p.temperature) {
        return Err("temperature must be between 0 and 10".into());
    }
    if !(0.0..=1.0).contains(&p.top_p) || p.top_p == 0.0 {
        return Err("top_p must be in (0, 1]".into());
    }
    if !(0.0..=1.0).contains(&p.min_p) {
        return Err("min_p must be in [0, 1]".into());
    }
    if !(p.repetition_penalty > 0.0 && p.repetition_penalty <= 10.0) {
        return Err("repetition_penalty must be in (0, 10]".into());
    }
    if !(-2.0..=2.0).contains(&p.presence_penalty) || !(-2.0..=2.0).contains(&p.frequency_penalty) {
        return Err("presence_penalty and frequency_penalty must be between -2 and 2".into());
    }
    for prompt in &req.prompts {
        // Bytes bound tokens from above (byte fallback), so this rejects hopeless prompts before queueing.
        let len = match prompt {
            PromptInput::Text(t) => t.len() / 16,
            PromptInput::Ids(ids) => ids.len(),
            PromptInput::Chat(m) => m.iter().map(|m| m.content.len()).sum::<usize>() / 16,
        };
        if len > max_seq_len {
            return Err(format!(
                "prompt is too long for a context of {max_seq_len} tokens"
            ));
        }
    }
    Ok(())
}

/// A job's prompts as token ids, each checked against the context; the error is a 400 answer's message.
fn prepare(
    tok: &dyn TextTokenizer,
    req: &Parsed,
    max_seq_len: usize,
    vocab_size: usize,
) -> Result<Vec<Vec<u32>>, String> {
    let mut out = Vec::new();
    for (i, prompt) in req.prompts.iter().enumerate() {
        let at = |m: String| {
            if req.prompts.len() > 1 {
                format!("prompt {i}: {m}")
            } else {
                m
            }
        };
        let ids = match prompt {
            PromptInput::Text(t) => {
                let mut ids: Vec<u32> = tok.bos().into_iter().collect();
                ids.extend(tok.encode(t));
                ids
            }
            PromptInput::Ids(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab_size) {
                    return Err(at(format!(
                        "token id {bad} is out of the vocabulary (0..{vocab_size})"
                    )));
                }
                ids.clone()
            }
            PromptInput::Chat(m) => chat_tokens(tok, m).map_err(|e| at(format!("{e:#}")))?,
        };
        if ids.is_empty() {
            return Err(at(
                "the prompt is empty and the model has no BOS token to start from".into(),
            ));
        }
        let room = max_seq_len.saturating_sub(ids.len());
        match req.max_tokens {
            Some(m) if ids.len() + m > max_seq_len => {
                return Err(at(format!(
                    "the prompt ({} tokens) plus max_tokens ({m}) exceeds the model's context of {max_seq_len} tokens; shorten the prompt or lower max_tokens",
                    ids.len()
                )));
            }
            None if room == 0 => {
                return Err(at(format!(
                    "the prompt ({} tokens) fills the model's context of {max_seq_len} tokens; shorten it",
                    ids.len()
                )));
            }
            _ => {}
        }
        out.push(ids);
    }
    Ok(out)
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
    let mut grammars: Option<grammar::Grammars> = None;
    while let Some(job) = jobs.blocking_recv() {
        let fail = |status, m: String| {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
            let _ = job.out.send(Piece::Failed(status, m));
        };
        if metrics.stopping.load(Ordering::Relaxed) {
            fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down; retry on another instance".into(),
            );
            metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        let prompts = match prepare(tok.as_ref(), &job.req, cfg.max_seq_len, cfg.vocab_size) {
            Ok(p) => p,
            Err(m) => {
                fail(StatusCode::BAD_REQUEST, m);
                metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
        };
        // A response_format's schema is checked before anything is sent, so that a bad one is a 400.
        let constraint = |grammars: &mut Option<grammar::Grammars>| -> Result<Option<grammar::JsonConstraint>, (StatusCode, String)> {
            let Some(schema) = &job.req.json_schema else {
                return Ok(None);
            };
            if grammars.is_none() {
                *grammars = Some(
                    grammar::Grammars::new(tok.as_ref(), cfg.vocab_size)
                        .map_err(|e| (StatusCode::BAD_REQUEST, format!("{e:#}")))?,
                );
            }
            let g = grammars.as_ref().ok_or((StatusCode::INTERNAL_SERVER_ERROR, String::new()))?;
            g.json(schema.clone())
                .map(Some)
                .map_err(|m| (StatusCode::BAD_REQUEST, m))
        };
        if let Err((status, m)) = constraint(&mut grammars) {
            fail(status, m);
            metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            continue;
        }
        metrics.processing.store(1, Ordering::Relaxed);
        let started = job
            .out
            .send(Piece::Started(prompts.iter().map(|p| p.len()).collect()));
        let n = job.req.n;
        'outer: for (i, ids) in prompts.into_iter().enumerate() {
            if started.is_err() {
                break;
            }
            for j in 0..n {
                let choice = i * n + j;
                let mut params = job.req.params.clone();
                params.seed = params.seed.wrapping_add(j as u64);
                params.max_tokens = job
                    .req
                    .max_tokens
                    .unwrap_or(cfg.max_seq_len.saturating_sub(ids.len()));
                let prompt_len = ids.len();
                let mut g = Generator {
                    engine: engine.as_mut(),
                    max_seq_len: cfg.max_seq_len,
                };
                let out = &job.out;
                let m = &metrics;
                m.kv_tokens.store(prompt_len as u64, Ordering::Relaxed);
                let mut generated = 0u64;
                // With log-probabilities, a step is held until the next one so that text still held back at
                // the end joins the last token's entry.
                let mut held: Option<(String, Option<TokenLogprob>)> = None;
                let send = |text: String, logprob: Option<TokenLogprob>| {
                    out.send(Piece::Step {
                        choice,
                        text,
                        logprob,
                    })
                    .map_err(|_| anyhow::anyhow!("client disconnected"))
                };
                let with_lp = job.req.logprobs.is_some();
                let mut c = match constraint(&mut grammars) {
                    Ok(c) => c,
                    Err((_, m)) => {
                        fail(StatusCode::INTERNAL_SERVER_ERROR, m);
                        break 'outer;
                    }
                };
                let result = g.generate_steps(
                    tok.as_ref(),
                    ids.clone(),
                    &params,
                    job.req.logprobs,
                    c.as_mut()
                        .map(|c| c as &mut dyn crate::pipelines::llm::Constraint),
                    |step| {
                        if step.token.is_some() {
                            generated += 1;
                            m.generated_tokens.fetch_add(1, Ordering::Relaxed);
                            m.decode_calls.fetch_add(1, Ordering::Relaxed);
                            m.kv_tokens
                                .store(prompt_len as u64 + generated, Ordering::Relaxed);
                        }
                        if !with_lp {
                            return if step.text.is_empty() {
                                Ok(())
                            } else {
                                send(step.text.to_string(), None)
                            };
                        }
                        match (step.token, held.take()) {
                            (None, Some((text, lp))) => {
                                held = Some((text + step.text, lp));
                                Ok(())
                            }
                            (_, prev) => {
                                held = Some((step.text.to_string(), step.logprob.cloned()));
                                match prev {
                                    Some((text, lp)) => send(text, lp),
                                    None => Ok(()),
                                }
                            }
                        }
                    },
                );
                let result = result.and_then(|s| match held.take() {
                    Some((text, lp)) => send(text, lp).map(|_| s),
                    None => Ok(s),
                });
                match result {
                    Ok(stats) => {
                        m.prompt_tokens
                            .fetch_add(stats.prompt_tokens as u64, Ordering::Relaxed);
                        m.prompt_micros
                            .fetch_add((stats.prompt_seconds * 1e6) as u64, Ordering::Relaxed);
                        m.generation_micros
                            .fetch_add((stats.generation_seconds * 1e6) as u64, Ordering::Relaxed);
                        if job.out.send(Piece::ChoiceDone { choice, stats }).is_err() {
                            break 'outer;
                        }
                    }
                    Err(e) => {
                        if !job.out.is_closed() {
                            fail(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"));
                        }
                        break 'outer;
                    }
                }
            }
        }
        metrics.kv_tokens.store(0, Ordering::Relaxed);
        metrics.processing.store(0, Ordering::Relaxed);
        metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
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

/// OpenAI's usage object; `cached` prompt tokens came from a slot's cache (prefix reuse) instead of running.
fn usage(prompt_tokens: usize, completion_tokens: usize, cached: usize) -> serde_json::Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
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

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Chat `logprobs.content` entries. `token` is the text the step emitted (so the tokens join to the content),
/// `bytes` the token's own bytes.
fn chat_logprobs(steps: &[(String, TokenLogprob)]) -> serde_json::Value {
    let content: Vec<_> = steps
        .iter()
        .map(|(text, lp)| {
            json!({"token": text, "logprob": lp.logprob, "bytes": lp.bytes,
                "top_logprobs": lp.top.iter().map(|(_, l, b)| json!({"token": lossy(b), "logprob": l, "bytes": b})).collect::<Vec<_>>()})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions (legacy) `logprobs`: tokens, token_logprobs, top_logprobs, text_offset.
fn completion_logprobs(steps: &[(String, TokenLogprob)], offset: usize) -> serde_json::Value {
    let mut off = offset;
    let mut offsets = Vec::new();
    for (t, _) in steps {
        offsets.push(off);
        off += t.len();
    }
    json!({
        "tokens": steps.iter().map(|(t, _)| t.clone()).collect::<Vec<_>>(),
        "token_logprobs": steps.iter().map(|(_, lp)| lp.logprob).collect::<Vec<_>>(),
        "top_logprobs": steps.iter().map(|(_, lp)| {
            let mut m = serde_json::Map::new();
            for (_, l, b) in &lp.top {
                m.entry(lossy(b)).or_insert(json!(l));
            }
            serde_json::Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// A JSON body (the content type is not required, as llama-server does not require it).
async fn json_body(
    state: &AppState,
    body: axum::body::Bytes,
) -> Result<serde_json::Value, Response> {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    serde_json::from_slice(&body).map_err(|e| {
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        bad_request(format!("the body is not valid JSON: {e}"))
    })
}

async fn completions(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let v = match json_body(&state, body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match openai::completion(v) {
        Ok(p) => submit(state, p, Api::OpenAi).await,
        Err(m) => {
            state.metrics.errors.fetch_add(1, Ordering::Relaxed);
            bad_request(m)
        }
    }
}

async fn chat_completions(State(state): State<Arc<AppState>>, body: axum::body::Bytes) -> Response {
    let v = match json_body(&state, body).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    match openai::chat(v) {
        Ok(p) => submit(state, p, Api::Chat).await,
        Err(m) => {
            state.metrics.errors.fetch_add(1, Ordering::Relaxed);
            bad_request(m)
        }
    }
}

async fn generate(
    State(state): State<Arc<AppState>>,
    body: Result<Json<GenerateRequest>, JsonRejection>,
) -> Response {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    match body {
        Ok(Json(r)) => match r.into_parsed() {
            Ok(p) => submit(state, p, Api::Native).await,
            Err(m) => {
                state.metrics.errors.fetch_add(1, Ordering::Relaxed);
                error(StatusCode::BAD_REQUEST, "invalid_request_error", m)
            }
        },
        Err(e) => {
            state.metrics.errors.fetch_add(1, Ordering::Relaxed);
            let status = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                e.status()
            } else {
                StatusCode::BAD_REQUEST
            };
            error(status, "invalid_request_error", e.body_text())
        }
    }
}

#[derive(Default, Clone)]
struct ChoiceAcc {
    text: String,
    steps: Vec<(String, TokenLogprob)>,
    stats: Option<GenerationStats>,
}

/// Queues the request and waits until the worker accepted or refused it, so that every error knowable before
/// generation is a 4xx answer, streams included; then answers in the API's format.
async fn submit(state: Arc<AppState>, req: Parsed, api: Api) -> Response {
    if let Err(m) = validate(&req, state.max_seq_len) {
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        return bad_request(m);
    }
    let stream = req.stream;
    let include_usage = req.include_usage;
    let with_lp = req.logprobs.is_some();
    let n_choices = req.n * req.prompts.len();
    let n = req.n.max(1);
    let model = req.model.clone().unwrap_or_else(|| state.model.clone());
    let (tx, mut rx) = mpsc::unbounded_channel();
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = state.jobs.try_send(Job { req, out: tx }) {
        state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        let message = match e {
            mpsc::error::TrySendError::Full(_) => format!(
                "the queue is full ({} requests waiting); retry later",
                state.jobs.max_capacity()
            ),
            mpsc::error::TrySendError::Closed(_) => "the generation worker has stopped".into(),
        };
        return error(StatusCode::SERVICE_UNAVAILABLE, "server_error", message);
    }
    let prompt_tokens = match rx.recv().await {
        Some(Piece::Started(p)) => p,
        Some(Piece::Failed(status, m)) => {
            let kind = if status.is_client_error() {
                "invalid_request_error"
            } else {
                "server_error"
            };
            return error(status, kind, m);
        }
        _ => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the generation worker stopped without an answer",
            );
        }
    };
    let prompt_total: usize = prompt_tokens.iter().sum();
    let created = now_secs();
    let id = format!(
        "{}-{created}-{}",
        if api == Api::Chat { "chatcmpl" } else { "cmpl" },
        state.metrics.requests.load(Ordering::Relaxed)
    );
    if !stream {
        let mut choices = vec![ChoiceAcc::default(); n_choices];
        while let Some(p) = rx.recv().await {
            match p {
                Piece::Step {
                    choice,
                    text,
                    logprob,
                } => {
                    let c = &mut choices[choice];
                    c.text.push_str(&text);
                    if let Some(lp) = logprob {
                        c.steps.push((text, lp));
                    }
                }
                Piece::ChoiceDone { choice, stats } => choices[choice].stats = Some(stats),
                Piece::Failed(_, m) => {
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", m);
                }
                Piece::Started(_) => {}
            }
        }
        if choices.iter().any(|c| c.stats.is_none()) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "generation ended without a result",
            );
        }
        let completion_total: usize = choices
            .iter()
            .filter_map(|c| c.stats.as_ref())
            .map(|s| s.generated_tokens)
            .sum();
        // A prompt's cached tokens once, as its tokens are counted once: those of its first choice.
        let cached_total: usize = choices
            .iter()
            .step_by(n)
            .filter_map(|c| c.stats.as_ref())
            .map(|s| s.cached_tokens)
            .sum();
        return match api {
            Api::Native => {
                let c = &choices[0];
                let s = c.stats.as_ref().unwrap_or_else(|| unreachable!());
                Json(json!({
                    "text": c.text, "finish_reason": finish_reason(s),
                    "usage": usage(prompt_total, completion_total, cached_total), "timings": timings(s),
                }))
                .into_response()
            }
            Api::Chat => {
                let list: Vec<_> = choices.iter().enumerate().map(|(i, c)| {
                    let s = c.stats.as_ref().unwrap_or_else(|| unreachable!());
                    json!({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": null},
                        "logprobs": if with_lp { chat_logprobs(&c.steps) } else { serde_json::Value::Null },
                        "finish_reason": finish_reason(s)})
                }).collect();
                Json(json!({
                    "id": id, "object": "chat.completion", "created": created, "model": model,
                    "choices": list, "usage": usage(prompt_total, completion_total, cached_total),
                    "system_fingerprint": null,
                }))
                .into_response()
            }
            Api::OpenAi => {
                let list: Vec<_> = choices.iter().enumerate().map(|(i, c)| {
                    let s = c.stats.as_ref().unwrap_or_else(|| unreachable!());
                    json!({"index": i, "text": c.text,
                        "logprobs": if with_lp { completion_logprobs(&c.steps, 0) } else { serde_json::Value::Null },
                        "finish_reason": finish_reason(s)})
                }).collect();
                Json(json!({
                    "id": id, "object": "text_completion", "created": created, "model": model,
                    "choices": list, "usage": usage(prompt_total, completion_total, cached_total),
                }))
                .into_response()
            }
        };
    }
    // Streaming: one event per piece; for chat, each choice starts with a role delta (even an empty reply).
    struct St {
        rx: mpsc::UnboundedReceiver<Piece>,
        done: bool,
        started: Vec<bool>,
        offsets: Vec<usize>,
        completion_total: usize,
        cached_total: usize,
        finished: usize,
    }
    let st = St {
        rx,
        done: false,
        started: vec![false; n_choices],
        offsets: vec![0; n_choices],
        completion_total: 0,
        cached_total: 0,
        finished: 0,
    };
    let events = futures_util::stream::unfold(st, move |mut st| {
        let (id, model) = (id.clone(), model.clone());
        async move {
            if st.done {
                return None;
            }
            let chunk = |choice: serde_json::Value| {
                let object = if api == Api::Chat {
                    "chat.completion.chunk"
                } else {
                    "text_completion"
                };
                json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
            };
            let mut out: Vec<serde_json::Value> = Vec::new();
            let role = |st: &mut St, choice: usize, out: &mut Vec<serde_json::Value>| {
                if api == Api::Chat && !st.started[choice] {
                    out.push(chunk(
                        json!({"index": choice, "delta": {"role": "assistant", "content": ""},
                        "logprobs": null, "finish_reason": null}),
                    ));
                }
                st.started[choice] = true;
            };
            let mut last = false;
            match st.rx.recv().await {
                Some(Piece::Step {
                    choice,
                    text,
                    logprob,
                }) => {
                    role(&mut st, choice, &mut out);
                    let steps: Vec<(String, TokenLogprob)> =
                        logprob.map(|lp| (text.clone(), lp)).into_iter().collect();
                    out.push(match api {
                        Api::Native => json!({"text": text}),
                        Api::OpenAi => {
                            let lp = if steps.is_empty() {
                                serde_json::Value::Null
                            } else {
                                completion_logprobs(&steps, st.offsets[choice])
                            };
                            chunk(json!({"index": choice, "text": text, "logprobs": lp, "finish_reason": null}))
                        }
                        Api::Chat => {
                            let lp = if steps.is_empty() {
                                serde_json::Value::Null
                            } else {
                                chat_logprobs(&steps)
                            };
                            chunk(json!({"index": choice, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}))
                        }
                    });
                    st.offsets[choice] += text.len();
                }
                Some(Piece::ChoiceDone { choice, stats: s }) => {
                    role(&mut st, choice, &mut out);
                    st.completion_total += s.generated_tokens;
                    if choice % n == 0 {
                        st.cached_total += s.cached_tokens;
                    }
                    st.finished += 1;
                    let all = st.finished == n_choices;
                    // Without stream_options.include_usage the totals ride on the last choice's final chunk.
                    let u = if all && !include_usage {
                        usage(prompt_total, st.completion_total, st.cached_total)
                    } else {
                        serde_json::Value::Null
                    };
                    out.push(match api {
                        Api::Native => {
                            json!({"done": true, "finish_reason": finish_reason(&s), "usage": usage(prompt_total, s.generated_tokens, s.cached_tokens), "timings": timings(&s)})
                        }
                        Api::OpenAi => {
                            let mut c = chunk(json!({"index": choice, "text": "", "logprobs": null, "finish_reason": finish_reason(&s)}));
                            if !u.is_null() { c["usage"] = u; }
                            c
                        }
                        Api::Chat => {
                            let mut c = chunk(json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": finish_reason(&s)}));
                            if !u.is_null() { c["usage"] = u; }
                            c
                        }
                    });
                    if all {
                        if include_usage {
                            let mut c = chunk(json!(null));
                            c["choices"] = json!([]);
                            c["usage"] = usage(prompt_total, st.completion_total, st.cached_total);
                            out.push(c);
                        }
                        last = true;
                    }
                }
                Some(Piece::Failed(_, m)) => {
                    out.push(json!({"error": {"message": m, "type": "server_error"}}));
                    last = true;
                }
                Some(Piece::Started(_)) => {}
                None => {
                    out.push(json!({"error": {"message": "generation ended without a result", "type": "server_error"}}));
                    last = true;
                }
            }
            let mut events: Vec<Result<Event, std::convert::Infallible>> = out
                .into_iter()
                .map(|v| Ok(Event::default().data(v.to_string())))
                .collect();
            if last {
                st.done = true;
                if api != Api::Native {
                    events.push(Ok(Event::default().data("[DONE]")));
                }
            }
            Some((futures_util::stream::iter(events), st))
        }
    });
    use futures_util::StreamExt;
    Sse::new(events.flatten())
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn model_object(state: &AppState) -> serde_json::Value {
    json!({"id": state.model, "object": "model", "created": state.created, "owned_by": "trt-diff",
        "meta": {"n_ctx_train": state.max_seq_len, "n_vocab": state.vocab_size}})
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [model_object(&state)]})).into_response()
}

async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == state.model {
        return Json(model_object(&state)).into_response();
    }
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"message": format!("the model `{id}` does not exist; this server serves `{}` (GET /v1/models)", state.model),
            "type": "invalid_request_error", "param": "model", "code": "model_not_found"}})),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

async fn tokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Response {
    let r = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_request(e.body_text()),
    };
    let Ok(tok) = state.tok.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "tokenizer unavailable",
        );
    };
    let mut ids: Vec<u32> = if r.add_special {
        tok.bos().into_iter().collect()
    } else {
        Vec::new()
    };
    ids.extend(tok.encode(&r.content));
    if !r.with_pieces {
        return Json(json!({"tokens": ids})).into_response();
    }
    let mut prev = None;
    let pieces: Vec<_> = ids
        .iter()
        .map(|&id| {
            let b = tok.piece_bytes(prev, id);
            prev = Some(id);
            match String::from_utf8(b) {
                Ok(s) => json!({"id": id, "piece": s}),
                Err(e) => json!({"id": id, "piece": e.into_bytes()}),
            }
        })
        .collect();
    Json(json!({"tokens": pieces})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    tokens: Vec<u32>,
}

async fn detokenize(
    State(state): State<Arc<AppState>>,
    body: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Response {
    let r = match body {
        Ok(Json(r)) => r,
        Err(e) => return bad_request(e.body_text()),
    };
    if let Some(bad) = r.tokens.iter().find(|&&t| t as usize >= state.vocab_size) {
        return bad_request(format!(
            "token id {bad} is out of the vocabulary (0..{})",
            state.vocab_size
        ));
    }
    let Ok(tok) = state.tok.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "tokenizer unavailable",
        );
    };
    let mut bytes = Vec::new();
    let mut prev = None;
    for &id in &r.tokens {
        bytes.extend(tok.piece_bytes(prev, id));
        prev = Some(id);
    }
    Json(json!({"content": lossy(&bytes)})).into_response()
}

async fn props(State(state): State<Arc<AppState>>) -> Response {
    let Ok(tok) = state.tok.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "tokenizer unavailable",
        );
    };
    let text_of = |id: Option<u32>| id.and_then(|i| tok.token_text(i)).unwrap_or("").to_string();
    let d = SamplingParams::default();
    Json(json!({
        "default_generation_settings": {
            "n_ctx": state.max_seq_len,
            "params": {"temperature": d.temperature, "top_k": d.top_k, "top_p": d.top_p, "min_p": d.min_p,
                "repeat_penalty": d.repetition_penalty, "presence_penalty": d.presence_penalty,
                "frequency_penalty": d.frequency_penalty, "seed": d.seed, "n_predict": -1},
        },
        "total_slots": state.slots,
        "model_alias": state.model,
        "chat_template": tok.chat_template().unwrap_or(crate::pipelines::chat::CHATML),
        "bos_token": text_of(tok.bos()),
        "eos_token": text_of(tok.eos()),
        "n_vocab": state.vocab_size,
        "modalities": {"vision": false, "audio": false},
        "build_info": format!("trt-diff {}", env!("CARGO_PKG_VERSION")),
    }))
    .into_response()
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let c = &state.counters;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let bad = get(&c.bad_bodies);
    let processing = get(&m.processing);
    let prompt_s = get(&m.prompt_micros) as f64 / 1e6;
    let gen_s = get(&m.generation_micros) as f64 / 1e6;
    let prompt_tokens = get(&m.prompt_tokens);
    let generated = get(&m.generated_tokens);
    let kv = get(&m.kv_tokens);
    let mut body = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: String| {
        body.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    put(
        "trt_diff_requests_total",
        "counter",
        "Generation requests received.",
        (get(&m.requests) + bad).to_string(),
    );
    put(
        "trt_diff_request_errors_total",
        "counter",
        "Requests answered with an error.",
        (get(&m.errors) + bad).to_string(),
    );
    put(
        "trt_diff_prompt_tokens_total",
        "counter",
        "Prompt tokens run through the decoder (cached prefixes not included).",
        prompt_tokens.to_string(),
    );
    put(
        "trt_diff_prompt_tokens_cached_total",
        "counter",
        "Prompt tokens taken from a slot's KV cache (a shared prefix) instead of running.",
        get(&m.cached_prompt_tokens).to_string(),
    );
    put(
        "trt_diff_generated_tokens_total",
        "counter",
        "Tokens generated.",
        generated.to_string(),
    );
    put(
        "trt_diff_requests_in_flight",
        "gauge",
        "Requests queued or generating.",
        get(&m.in_flight).to_string(),
    );
    put(
        "trt_diff_connections_open",
        "gauge",
        "Open HTTP connections.",
        get(&c.open).to_string(),
    );
    put(
        "trt_diff_connections_total",
        "counter",
        "HTTP connections accepted.",
        get(&c.accepted).to_string(),
    );
    put(
        "trt_diff_connections_refused_total",
        "counter",
        "Connections over --max-connections (answered 503).",
        get(&c.refused).to_string(),
    );
    put(
        "trt_diff_connections_timed_out_total",
        "counter",
        "Connections closed by the header read timeout.",
        get(&c.timed_out).to_string(),
    );
    // llama-server's names, so its dashboards work.
    put(
        "llamacpp:prompt_tokens_total",
        "counter",
        "Number of prompt tokens processed.",
        prompt_tokens.to_string(),
    );
    put(
        "llamacpp:prompt_seconds_total",
        "counter",
        "Prompt process time",
        prompt_s.to_string(),
    );
    put(
        "llamacpp:tokens_predicted_total",
        "counter",
        "Number of generation tokens processed.",
        generated.to_string(),
    );
    put(
        "llamacpp:tokens_predicted_seconds_total",
        "counter",
        "Predict process time",
        gen_s.to_string(),
    );
    put(
        "llamacpp:n_decode_total",
        "counter",
        "Total number of llama_decode() calls",
        get(&m.decode_calls).to_string(),
    );
    put(
        "llamacpp:prompt_tokens_seconds",
        "gauge",
        "Average prompt throughput in tokens/s.",
        (if prompt_s > 0.0 {
            prompt_tokens as f64 / prompt_s
        } else {
            0.0
        })
        .to_string(),
    );
    put(
        "llamacpp:predicted_tokens_seconds",
        "gauge",
        "Average generation throughput in tokens/s.",
        (if gen_s > 0.0 {
            generated as f64 / gen_s
        } else {
            0.0
        })
        .to_string(),
    );
    put(
        "llamacpp:kv_cache_usage_ratio",
        "gauge",
        "KV-cache usage. 1 means 100 percent usage.",
        (kv as f64 / (state.max_seq_len * state.slots).max(1) as f64).to_string(),
    );
    put(
        "llamacpp:kv_cache_tokens",
        "gauge",
        "KV-cache tokens.",
        kv.to_string(),
    );
    put(
        "llamacpp:requests_processing",
        "gauge",
        "Number of requests processing.",
        processing.to_string(),
    );
    put(
        "llamacpp:requests_deferred",
        "gauge",
        "Number of requests deferred.",
        get(&m.in_flight).saturating_sub(processing).to_string(),
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

/// Resolves on SIGINT/SIGTERM. The SIGTERM handler is installed here, when the server starts, not on the future's
/// first poll: a SIGTERM that comes as soon as the server answers must not find the default action (death).
fn shutdown_signal(metrics: Arc<Metrics>) -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        let ctrl_c = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        #[cfg(unix)]
        let term = async move {
            match term {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! { _ = ctrl_c => {}, _ = term => {} }
        // Queued requests are answered 503 at once; the one generating may finish within the grace period.
        metrics.stopping.store(true, Ordering::Relaxed);
        tracing::info!("shutting down: finishing requests in progress");
    }
}

/// Serves an LLM engine until SIGINT/SIGTERM. Prints `listening on ADDR` once bound (port 0 picks a free port).
pub fn serve(
    engine: &EngineFile,
    backend: BackendChoice,
    host: &str,
    port: u16,
    opts: &ServeOptions,
) -> Result<()> {
    let stem = engine
        .path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let shared = AppShared {
        metrics: Arc::new(Metrics::default()),
        // `flux.plan` and an ONNX-only bundle's `flux.plan.json` both serve as "flux".
        model: stem.strip_suffix(".plan").unwrap_or(&stem).to_string(),
        engine_path: engine.path.display().to_string(),
        created: now_secs(),
    };
    if let Some(crate::manifest::Pipeline::Image(_)) = engine.pipeline() {
        let limits = Arc::new(opts.limits(images::MAX_BODY_BYTES)?);
        let app = images::router(engine, backend, shared.clone(), opts.lora_dir.as_deref())?
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .fallback(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route; this server has an image bundle: see /v1/images/generations, /sdapi/v1/txt2img, \
                     /sdapi/v1/img2img, /sdapi/v1/samplers, /sdapi/v1/schedulers, /sdapi/v1/progress, /health",
                )
            })
            .layer(DefaultBodyLimit::max(images::MAX_BODY_BYTES));
        let counters = Arc::new(limits::ConnCounters::default());
        return run_app(app, host, port, opts, limits, counters, shared.metrics);
    }
    if opts.lora_dir.is_some() {
        anyhow::bail!(
            "--lora-dir applies to image bundles, and '{}' is a language model; drop it",
            engine.path.display()
        );
    }
    let limits = Arc::new(opts.limits(MAX_BODY_BYTES)?);
    let LlmModel { config, tokenizer } = LlmModel::read(engine)?;
    let (tx, rx) = mpsc::channel::<Job>(256);
    let cfg = config.clone();
    let metrics = shared.metrics.clone();
    let worker_metrics = metrics.clone();
    // The engine is opened on the thread that uses it (engines need not be Send); open errors come back here.
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<usize, String>>(1);
    let file = engine.clone();
    let parallel = opts.parallel;
    std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || {
            let spec = LlmModel {
                config: cfg,
                tokenizer,
            };
            match spec.open_engine(&file, backend) {
                Ok(mut decoder) => {
                    if crate::pipelines::kv_cache::Slots::supported(decoder.as_ref()) {
                        match batch::Scheduler::new(
                            decoder.as_mut(),
                            parallel,
                            spec.tokenizer,
                            spec.config,
                            worker_metrics,
                        ) {
                            Ok(s) => {
                                let _ = ready_tx.send(Ok(parallel));
                                s.run(rx)
                            }
                            Err(e) => {
                                let _ = ready_tx.send(Err(format!("{e:#}")));
                            }
                        }
                        return;
                    }
                    if parallel > 1 {
                        tracing::warn!(
                            "--parallel {parallel}: this decoder engine keeps one sequence's KV cache (TensorRT or \
                             CUDA graphs, or a CPU graph from an older trt-diff), so requests run one at a time"
                        );
                    }
                    let _ = ready_tx.send(Ok(1));
                    worker(decoder, spec.tokenizer, spec.config, worker_metrics, rx)
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                }
            }
        })
        .context("cannot start the generation thread")?;
    let slots = ready_rx
        .recv()
        .context("the generation thread stopped before opening the engine")?
        .map_err(|e| anyhow::anyhow!(e))?;
    // The request handlers tokenize too (prompt lengths, /tokenize): their own copy of the tokenizer.
    let handler_tok = LlmModel::read(engine)?.tokenizer;
    let counters = Arc::new(limits::ConnCounters::default());
    let state = Arc::new(AppState {
        counters: counters.clone(),
        jobs: tx,
        metrics: metrics.clone(),
        model: shared.model.clone(),
        max_seq_len: config.max_seq_len,
        vocab_size: config.vocab_size,
        slots,
        tok: std::sync::Mutex::new(handler_tok),
        created: shared.created,
    });
    let app = Router::new()
        .route("/v1/generate", post(generate))
        .route("/v1/completions", post(completions))
        .route("/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/props", get(props))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/metrics", get(metrics_text))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such route; see /v1/completions, /v1/chat/completions, /v1/models, /v1/generate, /tokenize, /detokenize, /props, /health, /metrics",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state);
    run_app(app, host, port, opts, limits, counters, metrics)
}

/// Puts the layers every route shares around `app` (CORS, the API key, the bounded body read) and serves it until
/// SIGINT/SIGTERM.
fn run_app(
    app: Router,
    host: &str,
    port: u16,
    opts: &ServeOptions,
    limits: Arc<limits::Limits>,
    counters: Arc<limits::ConnCounters>,
    metrics: Arc<Metrics>,
) -> Result<()> {
    let access = Arc::new(access::Access {
        api_key: opts.api_key.clone().filter(|k| !k.is_empty()),
        cors: opts.cors.clone(),
    });
    let app = app
        // Outermost last: CORS, then the key, then the body read (bodies of refused requests are not read).
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(limits::BodyGuard {
                limits: limits.clone(),
                counters: counters.clone(),
            }),
            limits::read_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            access.clone(),
            access::auth,
        ))
        .layer(axum::middleware::from_fn_with_state(access, access::cors));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stop = shutdown_signal(metrics);
        let listener = tokio::net::TcpListener::bind((host, port))
            .await
            .with_context(|| {
                format!("cannot listen on {host}:{port} (in use? choose another --port)")
            })?;
        let addr = listener.local_addr()?;
        println!("listening on http://{addr}");
        use std::io::Write;
        std::io::stdout().flush()?;
        limits::serve(listener, app, limits, counters, stop).await?;
        Ok::<(), anyhow::Error>(())
    })?;
    // Connections dropped at the end of the grace period may leave tasks behind: do not wait for them.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    Ok(())
}
