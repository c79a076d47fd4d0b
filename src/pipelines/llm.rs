//! Text generation around a decoder engine (see `models::llama` and `models::llama_cpu`): prefill the prompt, then
//! one token per call, the KV cache kept between calls by `kv_cache::Decoder`.
use super::engines::OpenOptions;
use super::kv_cache::Decoder;
use crate::backend::{BackendChoice, Engine, HostTensor};
use crate::cuda::transfers::Transfers;
use crate::manifest::{EngineFile, Pipeline};
use crate::models::llama::LlamaConfig;
use crate::onnx::DataType;
pub use crate::tokenizer::text::{TextTokenizer, load_tokenizer};
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::time::Instant;

/// How tokens are chosen: `generate`'s flags and the server's request fields, with one set of defaults.
#[derive(Clone, Debug, PartialEq, clap::Args, serde::Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Most tokens to generate.
    #[arg(long, default_value_t = SamplingParams::default().max_tokens)]
    pub max_tokens: usize,
    /// 0 is greedy decoding.
    #[arg(long, default_value_t = SamplingParams::default().temperature)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: off).
    #[arg(long, default_value_t = SamplingParams::default().top_k)]
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probabilities reach p (1: off).
    #[arg(long, default_value_t = SamplingParams::default().top_p)]
    pub top_p: f32,
    /// Random seed (sampling; for images, the noise of image 0, image i uses seed + i).
    #[arg(long, default_value_t = SamplingParams::default().seed)]
    pub seed: u64,
    /// Drop tokens less likely than min-p times the most likely one (0: off).
    #[arg(long, default_value_t = SamplingParams::default().min_p)]
    pub min_p: f32,
    /// Penalize tokens already in the context (1: off; llama.cpp's repeat penalty).
    #[arg(long = "repeat-penalty", default_value_t = SamplingParams::default().repetition_penalty)]
    #[serde(alias = "repeat_penalty")]
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated or in the prompt (0: off).
    #[arg(long, default_value_t = SamplingParams::default().presence_penalty)]
    pub presence_penalty: f32,
    /// Subtracted per occurrence (0: off).
    #[arg(long, default_value_t = SamplingParams::default().frequency_penalty)]
    pub frequency_penalty: f32,
    /// Stop before this text (repeatable); it is not part of the output.
    #[arg(long)]
    #[serde(deserialize_with = "one_or_many")]
    pub stop: Vec<String>,
    /// Keep generating past the end-of-text token until --max-tokens (benchmarks; llama.cpp's --ignore-eos).
    #[arg(long)]
    pub ignore_eos: bool,
}

/// A string or a list of strings, as OpenAI's API takes `stop`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    })
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys and values were already cached (the server's prefix reuse), not run again.
    pub cached_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
    pub stopped_by_eos: bool,
    pub stopped_by_stop_string: bool,
    /// Decode calls after the prompt's, the time spent inside them, and the bytes trt-diff copied between host
    /// and GPU over them: what the loop costs per token outside the engine.
    pub decode_calls: usize,
    pub decode_engine_seconds: f64,
    pub decode_copied_bytes: u64,
}

/// Penalties on tokens already in the context (`counts`: token -> occurrences), as llama.cpp applies them.
pub fn apply_penalties(
    row: &mut [f32],
    counts: &std::collections::HashMap<u32, usize>,
    p: &SamplingParams,
) {
    for (&t, &n) in counts {
        let Some(l) = row.get_mut(t as usize) else {
            continue;
        };
        if p.repetition_penalty != 1.0 {
            *l = if *l > 0.0 {
                *l / p.repetition_penalty
            } else {
                *l * p.repetition_penalty
            };
        }
        *l -= n as f32 * p.frequency_penalty + if n > 0 { p.presence_penalty } else { 0.0 };
    }
}

/// Holds back text that might be the start of a stop string; reports the stop when it appears.
#[derive(Default)]
pub struct StopFilter {
    stops: Vec<String>,
    held: String,
}

impl StopFilter {
    pub fn new(stops: &[String]) -> Self {
        StopFilter {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    /// Text safe to emit now, and whether a stop string was reached.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(i) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..i].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|pre| self.held.ends_with(pre))
            .map(|pre| pre.len())
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Whatever is still held when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// ONNX Runtime options for a decoder on the CPU: models under ~20M parameters run each step as hundreds of
/// microsecond-sized ops, where handing work to a second thread costs more than it saves (stories260K decodes
/// about 3x faster on one thread than on two); larger models use ONNX Runtime's default pool.
pub fn cpu_options(c: &LlamaConfig) -> crate::backend::ort_backend::OrtOptions {
    let (q, kv) = (c.q_dim(), c.kv_dim());
    let params = c.n_layers * (2 * c.dim * q + 2 * c.dim * kv + 3 * c.dim * c.hidden_dim)
        + c.vocab_size * c.dim;
    crate::backend::ort_backend::OrtOptions {
        threads: if params < 20_000_000 { 1 } else { 0 },
        ..Default::default()
    }
}

/// Emits only complete UTF-8: bytes of a character split across tokens wait for the rest.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        match std::str::from_utf8(&self.pending) {
            Ok(s) => {
                let out = s.to_string();
                self.pending.clear();
                out
            }
            Err(e) if e.error_len().is_none() => {
                let valid = e.valid_up_to();
                let out = String::from_utf8_lossy(&self.pending[..valid]).into_owned();
                self.pending.drain(..valid);
                out
            }
            Err(_) => {
                // Invalid bytes (not just incomplete): replace them rather than stall.
                let out = String::from_utf8_lossy(&self.pending).into_owned();
                self.pending.clear();
                out
            }
        }
    }
}

/// splitmix64-seeded xorshift for reproducible sampling.
struct Rng(u64);
impl Rng {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 24) as f32
    }
}

/// The index of the first largest value (NaNs never win; 0 for an empty, all-NaN or all -inf row), in two passes
/// that vectorize even for baseline x86-64: sixteen running maxima, then the first sixteen-value chunk holding the
/// maximum. A 152k-token vocabulary takes about 25 us (a single running maximum with its index, a serial chain,
/// about 70), a decode step's budget outside the engine being about 50.
pub fn argmax(v: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = v.chunks_exact(LANES);
    let tail = chunks.remainder();
    for chunk in chunks {
        for l in 0..LANES {
            lanes[l] = if chunk[l] > lanes[l] {
                chunk[l]
            } else {
                lanes[l]
            };
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return 0;
    }
    let mut base = 0;
    for chunk in v.chunks(LANES) {
        if chunk.iter().fold(false, |hit, &x| hit | (x == max)) {
            return base + chunk.iter().position(|&x| x == max).unwrap_or(0);
        }
        base += chunk.len();
    }
    0
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl FnMut() -> f32) -> u32 {
    if p.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx
        .iter()
        .map(|&i| ((logits[i] - max) / p.temperature).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|v| *v /= sum);
    if p.min_p > 0.0 {
        // Sorted descending: keep the prefix within min_p of the best token.
        let floor = probs[0] * p.min_p;
        let keep = probs.iter().take_while(|&&v| v >= floor).count().max(1);
        probs.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= s);
    }
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|&v| {
            acc += v;
            acc >= p.top_p
        });
        let keep = keep.map(|k| k + 1).unwrap_or(probs.len());
        probs.truncate(keep);
        let s: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|v| *v /= s);
    }
    let r = rng();
    let mut acc = 0.0;
    for (k, v) in probs.iter().enumerate() {
        acc += v;
        if r < acc {
            return idx[k] as u32;
        }
    }
    idx[probs.len() - 1] as u32
}

/// The logits of the last position (prefill returns every position's; only the last one is sampled).
fn last_row(logits: &HostTensor) -> Result<Vec<f32>> {
    let vocab = *logits.shape.last().unwrap_or(&0);
    if logits.dtype == DataType::FLOAT && logits.data.len() >= 4 * vocab {
        let tail = &logits.data[logits.data.len() - 4 * vocab..];
        return Ok(tail
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect());
    }
    let all = logits.to_f64().context("logits are not numeric")?;
    Ok(all[all.len().saturating_sub(vocab)..]
        .iter()
        .map(|&v| v as f32)
        .collect())
}

/// One sequence's sampling state between decoder calls: the penalties' token counts, its RNG, stop strings, UTF-8
/// assembly and stats. `Generator::generate_steps` drives one; the server's scheduler drives one per slot, so a
/// request samples the same tokens alone or batched.
pub struct Sequence {
    params: SamplingParams,
    top_logprobs: Option<usize>,
    rng: Rng,
    stream: Utf8Stream,
    stops: StopFilter,
    counts: std::collections::HashMap<u32, usize>,
    prev: Option<u32>,
    pub stats: GenerationStats,
}

impl Sequence {
    /// After the prompt tokens `prompt`; `top_logprobs` as `Generator::generate_steps` takes it.
    pub fn new(prompt: &[u32], params: &SamplingParams, top_logprobs: Option<usize>) -> Self {
        let mut counts = std::collections::HashMap::new();
        for &t in prompt {
            *counts.entry(t).or_default() += 1;
        }
        Sequence {
            params: params.clone(),
            top_logprobs,
            rng: Rng(params.seed),
            stream: Utf8Stream::default(),
            stops: StopFilter::new(&params.stop),
            counts,
            prev: prompt.last().copied(),
            stats: GenerationStats {
                prompt_tokens: prompt.len(),
                ..Default::default()
            },
        }
    }

    /// Takes the logits that follow the last token, picks the next token and reports it (`on_step`). Some(token)
    /// to run next; None when the generation ended (end token, stop string, complete constraint, max_tokens).
    pub fn advance(
        &mut self,
        mut row: Vec<f32>,
        tok: &dyn TextTokenizer,
        constraint: Option<&mut (dyn Constraint + '_)>,
        on_step: &mut dyn FnMut(Step<'_>) -> Result<()>,
    ) -> Result<Option<u32>> {
        let params = &self.params;
        apply_penalties(&mut row, &self.counts, params);
        let mut constraint = constraint;
        if let Some(c) = constraint.as_deref_mut() {
            c.mask(&mut row)?;
        }
        let rng = &mut self.rng;
        let next = sample(&row, params, &mut || rng.next_f32());
        if tok.is_end(next) && !params.ignore_eos {
            self.stats.stopped_by_eos = true;
            return Ok(None);
        }
        let complete = match constraint {
            Some(c) => c.accept(next)?,
            None => false,
        };
        self.stats.generated_tokens += 1;
        *self.counts.entry(next).or_default() += 1;
        let logprob = self
            .top_logprobs
            .map(|k| token_logprob(&row, next, k, tok, self.prev));
        let piece = tok.piece_bytes(self.prev, next);
        let (text, stopped) = self.stops.push(&self.stream.push(&piece));
        on_step(Step {
            text: &text,
            token: Some(next),
            logprob: logprob.as_ref(),
        })?;
        if stopped {
            self.stats.stopped_by_stop_string = true;
            return Ok(None);
        }
        if complete {
            self.stats.stopped_by_eos = true;
            return Ok(None);
        }
        self.prev = Some(next);
        Ok((self.stats.generated_tokens < self.params.max_tokens).then_some(next))
    }

    /// Reports text still held back for a possible stop string when the generation ended otherwise; call once.
    pub fn finish(&mut self, on_step: &mut dyn FnMut(Step<'_>) -> Result<()>) -> Result<()> {
        let rest = self.stops.finish();
        if !rest.is_empty() {
            on_step(Step {
                text: &rest,
                token: None,
                logprob: None,
            })?;
        }
        Ok(())
    }
}

pub struct Generator<'a> {
    pub engine: &'a mut dyn Engine,
    pub max_seq_len: usize,
}

impl Generator<'_> {
    /// Generates after `prompt`, calling `on_text` with each complete piece of text.
    pub fn generate(
        &mut self,
        tok: &dyn TextTokenizer,
        prompt: &str,
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<GenerationStats> {
        let mut tokens: Vec<u32> = tok.bos().into_iter().collect();
        tokens.extend(tok.encode(prompt));
        self.generate_tokens(tok, tokens, params, on_text)
    }

    /// Generates after the prompt tokens `tokens` (BOS included when the model wants one).
    pub fn generate_tokens(
        &mut self,
        tok: &dyn TextTokenizer,
        tokens: Vec<u32>,
        params: &SamplingParams,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<GenerationStats> {
        self.generate_steps(tok, tokens, params, None, None, |step| {
            if step.text.is_empty() {
                Ok(())
            } else {
                on_text(step.text)
            }
        })
    }

    /// `generate_tokens` reporting every generated token (`on_step`), with its log-probability and the
    /// `top_logprobs` most likely alternatives when asked for (`Some(0)`: the chosen token's only). The texts of the
    /// steps join to the generated text.
    pub fn generate_steps(
        &mut self,
        tok: &dyn TextTokenizer,
        tokens: Vec<u32>,
        params: &SamplingParams,
        top_logprobs: Option<usize>,
        mut constraint: Option<&mut dyn Constraint>,
        mut on_step: impl FnMut(Step<'_>) -> Result<()>,
    ) -> Result<GenerationStats> {
        if tokens.is_empty() {
            bail!("the prompt is empty and the model has no BOS token to start from");
        }
        if tokens.len() + params.max_tokens > self.max_seq_len {
            bail!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {} tokens",
                tokens.len(),
                params.max_tokens,
                self.max_seq_len
            );
        }
        let capacity = tokens.len() + params.max_tokens;
        let mut decoder = Decoder::new(&mut *self.engine, capacity)?;
        let mut seq = Sequence::new(&tokens, params, top_logprobs);
        let mut new_ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let t0 = Instant::now();
        let mut decode_start = Transfers::now();
        let mut prompt_seconds = 0.0;
        let (mut decode_calls, mut decode_engine_seconds) = (0, 0.0);
        for step in 0..params.max_tokens {
            let t_forward = Instant::now();
            let row = last_row(&decoder.forward(&new_ids)?)?;
            if step == 0 {
                prompt_seconds = t0.elapsed().as_secs_f64();
                decode_start = Transfers::now();
            } else {
                decode_calls += 1;
                decode_engine_seconds += t_forward.elapsed().as_secs_f64();
            }
            match seq.advance(row, tok, constraint.as_deref_mut(), &mut on_step)? {
                Some(next) => new_ids = vec![next as i64],
                None => break,
            }
        }
        seq.finish(&mut on_step)?;
        let mut stats = seq.stats;
        stats.prompt_seconds = prompt_seconds;
        stats.decode_calls = decode_calls;
        stats.decode_engine_seconds = decode_engine_seconds;
        stats.generation_seconds = t0.elapsed().as_secs_f64() - stats.prompt_seconds;
        stats.decode_copied_bytes = Transfers::since(decode_start).total();
        Ok(stats)
    }
}

/// What an LLM engine's manifest describes, read off an opened engine file: the decoder's hyper-parameters and
/// the tokenizer stored beside it.
pub struct LlmModel {
    pub config: LlamaConfig,
    pub tokenizer: Box<dyn TextTokenizer + Send>,
}

impl LlmModel {
    pub fn read(engine: &EngineFile) -> Result<Self> {
        let Some(Pipeline::Llm(llm)) = engine.pipeline() else {
            bail!(
                "'{}' is not an LLM engine (its manifest names no LLM pipeline); build one with `trt-diff build \
                 MODEL.gguf|HF_FOLDER|--arch llama2c ...`",
                engine.path.display()
            );
        };
        let config: LlamaConfig = serde_json::from_value(llm.config.clone()).with_context(|| {
            format!(
                "the manifest of '{}' has no valid decoder settings; rebuild the engine with this trt-diff",
                engine.path.display()
            )
        })?;
        let tokenizer = load_tokenizer(
            &engine.file(&llm.tokenizer, "the tokenizer")?,
            config.vocab_size,
        )?;
        Ok(Self { config, tokenizer })
    }

    /// Opens the decoder engine on the chosen backend (CPU options sized for the model).
    pub fn open_engine(
        &self,
        engine: &EngineFile,
        backend: BackendChoice,
    ) -> Result<Box<dyn Engine>> {
        let mut ort = cpu_options(&self.config);
        // On the CUDA provider, decode steps (same shapes as the step before) replay as CUDA graphs; GroupQueryAttention
        // reads the total length on the host. `TRT_DIFF_CUDA_GRAPHS=0` runs every step kernel by kernel, to compare.
        if std::env::var("TRT_DIFF_CUDA_GRAPHS").map_or(true, |v| v != "0") {
            ort.cuda_graphs = Some(vec![crate::models::llama_cpu::TOTAL_INPUT.to_string()]);
        }
        let opts = OpenOptions {
            ort,
            ..Default::default()
        };
        super::engines::open_file(engine, backend, &opts)
    }
}

/// A constraint on the generated tokens (a grammar, a JSON schema): which tokens may come next, told each token
/// taken.
pub trait Constraint {
    /// Sets the logits of the tokens not allowed next to -inf (the end token stays when the output may end).
    fn mask(&mut self, row: &mut [f32]) -> Result<()>;
    /// Takes `token`; true when the output is complete and nothing may follow.
    fn accept(&mut self, token: u32) -> Result<bool>;
}

/// One step of `Generator::generate_steps`: the text that became safe to emit with this token (empty while bytes of
/// a character or a possible stop string are held back), the token (`None` for text still held when generation
/// ended) and its log-probabilities when asked for.
pub struct Step<'a> {
    pub text: &'a str,
    pub token: Option<u32>,
    pub logprob: Option<&'a TokenLogprob>,
}

/// A generated token's log-probability under the distribution it was sampled from (log-softmax of the logits,
/// penalties applied, before temperature and truncation), and the most likely tokens there, best first.
#[derive(Clone, Debug)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The token's bytes as it follows the previous token.
    pub bytes: Vec<u8>,
    /// (token, log-probability, bytes) of the most likely tokens.
    pub top: Vec<(u32, f32, Vec<u8>)>,
}

fn token_logprob(
    row: &[f32],
    id: u32,
    k: usize,
    tok: &dyn TextTokenizer,
    prev: Option<u32>,
) -> TokenLogprob {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&v| (v - max).exp()).sum::<f32>().ln();
    // Rounding can put the best token a hair above 0; a log-probability never is.
    let lp = |i: usize| (row[i] - lse).min(0.0);
    let mut top = Vec::new();
    if k > 0 {
        // Tokens a constraint ruled out (-inf) are no alternatives.
        let mut idx: Vec<usize> = (0..row.len()).filter(|&i| row[i].is_finite()).collect();
        if idx.is_empty() {
            idx.push(id as usize);
        }
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
        idx.truncate(k);
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        top = idx
            .into_iter()
            .map(|i| (i as u32, lp(i), tok.piece_bytes(prev, i as u32)))
            .collect();
    }
    TokenLogprob {
        id,
        logprob: lp(id as usize),
        bytes: tok.piece_bytes(prev, id),
        top,
    }
}

/// Opens an LLM engine built by `trt-diff build` and generates from `prompt`.
pub fn generate_with_engine(
    engine: &EngineFile,
    backend: BackendChoice,
    prompt: &str,
    params: &SamplingParams,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<GenerationStats> {
    let model = LlmModel::read(engine)?;
    let mut decoder = model.open_engine(engine, backend)?;
    let mut generator = Generator {
        engine: decoder.as_mut(),
        max_seq_len: model.config.max_seq_len,
    };
    generator.generate(model.tokenizer.as_ref(), prompt, params, on_text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_is_the_first_largest() {
        let first_largest = |v: &[f32]| {
            v.iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| {
                    if x > b.1 { (i, x) } else { b }
                })
                .0
        };
        let mut rng = Rng(7);
        for len in (0..70).chain([151_936]) {
            for levels in [3.0f32, 1000.0] {
                // Few levels: many ties between lanes and chunks.
                let mut v: Vec<f32> = (0..len)
                    .map(|_| (rng.next_f32() * levels).floor())
                    .collect();
                if len > 5 {
                    v[len / 2] = f32::NAN;
                    v[1] = f32::NEG_INFINITY;
                }
                assert_eq!(argmax(&v), first_largest(&v), "len {len}, {levels} levels");
            }
        }
        assert_eq!(argmax(&[f32::NAN; 40]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
    }

    #[test]
    fn stop_filter_holds_back_prefixes() {
        let mut f = StopFilter::new(&["END".into(), "\n\n".into()]);
        assert_eq!(f.push("hello E"), ("hello ".into(), false));
        assert_eq!(f.push("N"), (String::new(), false));
        assert_eq!(f.push("x"), ("ENx".into(), false));
        assert_eq!(f.push(" done\n"), (" done".into(), false));
        assert_eq!(f.push("\nmore"), (String::new(), true));
        let mut g = StopFilter::new(&["END".into()]);
        assert_eq!(g.push("abcEN"), ("abc".into(), false));
        assert_eq!(g.finish(), "EN");
    }

    #[test]
    fn penalties_and_min_p() {
        let mut row = vec![2.0, -2.0, 1.0];
        let counts = std::collections::HashMap::from([(0u32, 2usize), (1, 1)]);
        let p = SamplingParams {
            repetition_penalty: 2.0,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        apply_penalties(&mut row, &counts, &p);
        assert_eq!(row, vec![2.0 / 2.0 - 0.5 - 0.5, -4.0 - 0.25 - 0.5, 1.0]);
        // min_p keeps only tokens within a factor of the best one.
        let p = SamplingParams {
            temperature: 1.0,
            min_p: 0.5,
            ..Default::default()
        };
        let logits = [0.0, 2.0, 1.9, 1.0]; // without min_p, token 3 would take 17% of draws
        let mut r = 0.0f32;
        for _ in 0..50 {
            r = (r + 0.137) % 1.0;
            let t = sample(&logits, &p, &mut || r);
            assert!(t == 1 || t == 2);
        }
    }
}
