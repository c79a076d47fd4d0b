//! Text generation around a decoder engine (see `models::llama`): prefill the prompt, then one token per call,
//! the KV cache passed from each call's `present_*` outputs to the next call's `past_*` inputs.
use crate::backend::{Engine, HostTensor};
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: usize,
    /// 1 = off.
    pub top_p: f32,
    pub seed: u64,
    pub max_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            max_tokens: 64,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_seconds: f64,
    pub generation_seconds: f64,
    pub stopped_by_eos: bool,
}

/// What the generator needs of a tokenizer.
pub trait TextTokenizer {
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Bytes of `id` as it follows `prev`.
    fn piece_bytes(&self, prev: Option<u32>, id: u32) -> Vec<u8>;
    fn bos(&self) -> Option<u32>;
    fn eos(&self) -> Option<u32>;
}

impl TextTokenizer for crate::tokenizer::llama2c::Llama2cTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.encode(text)
    }
    fn piece_bytes(&self, prev: Option<u32>, id: u32) -> Vec<u8> {
        self.piece_bytes(prev, id)
    }
    fn bos(&self) -> Option<u32> {
        Some(crate::tokenizer::llama2c::BOS)
    }
    fn eos(&self) -> Option<u32> {
        Some(crate::tokenizer::llama2c::EOS)
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

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl FnMut() -> f32) -> u32 {
    if p.temperature <= 0.0 {
        return logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 { (i, v) } else { b }
            })
            .0 as u32;
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

fn ids_tensor(ids: &[i64]) -> HostTensor {
    HostTensor {
        dtype: DataType::INT64,
        shape: vec![1, ids.len()],
        data: ids.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

pub struct Generator<'a> {
    pub engine: &'a mut dyn Engine,
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub max_seq_len: usize,
}

impl Generator<'_> {
    /// Generates after `prompt`, calling `on_text` with each complete piece of text.
    pub fn generate(
        &mut self,
        tok: &dyn TextTokenizer,
        prompt: &str,
        params: &SamplingParams,
        mut on_text: impl FnMut(&str) -> Result<()>,
    ) -> Result<GenerationStats> {
        let mut tokens: Vec<u32> = tok.bos().into_iter().collect();
        tokens.extend(tok.encode(prompt));
        if tokens.len() + params.max_tokens > self.max_seq_len {
            bail!(
                "the prompt ({} tokens) plus max_tokens ({}) exceeds the model's context of {} tokens",
                tokens.len(),
                params.max_tokens,
                self.max_seq_len
            );
        }
        let mut past: Vec<HostTensor> = (0..2 * self.n_layers)
            .map(|_| HostTensor {
                dtype: DataType::FLOAT,
                shape: vec![1, self.n_kv_heads, 0, self.head_dim],
                data: vec![],
            })
            .collect();
        let mut stats = GenerationStats {
            prompt_tokens: tokens.len(),
            ..Default::default()
        };
        let mut rng = Rng(params.seed);
        let mut next_rand = || rng.next_f32();
        let mut stream = Utf8Stream::default();
        let mut new_ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let mut pos0 = 0usize;
        let mut prev = tokens.last().copied();
        let t0 = Instant::now();
        for step in 0..params.max_tokens {
            let positions: Vec<i64> = (pos0..pos0 + new_ids.len()).map(|p| p as i64).collect();
            let mut inputs = vec![
                ("input_ids".to_string(), ids_tensor(&new_ids)),
                ("position_ids".to_string(), ids_tensor(&positions)),
            ];
            for (i, t) in past.iter().enumerate() {
                let name = if i % 2 == 0 {
                    format!("past_key_{}", i / 2)
                } else {
                    format!("past_value_{}", i / 2)
                };
                inputs.push((name, t.clone()));
            }
            let outputs = self.engine.run(&inputs)?;
            let logits = &outputs
                .iter()
                .find(|(n, _)| n == "logits")
                .context("engine has no 'logits' output")?
                .1;
            let vocab = *logits.shape.last().unwrap_or(&0);
            let all = logits.to_f64().context("logits are not numeric")?;
            let row: Vec<f32> = all[all.len() - vocab..].iter().map(|&v| v as f32).collect();
            for i in 0..self.n_layers {
                for (slot, kind) in [(2 * i, "key"), (2 * i + 1, "value")] {
                    let name = format!("present_{kind}_{i}");
                    past[slot] = outputs
                        .iter()
                        .find(|(n, _)| *n == name)
                        .with_context(|| format!("engine has no '{name}' output"))?
                        .1
                        .clone();
                }
            }
            if step == 0 {
                stats.prompt_seconds = t0.elapsed().as_secs_f64();
            }
            pos0 += new_ids.len();
            let next = sample(&row, params, &mut next_rand);
            if Some(next) == tok.eos() {
                stats.stopped_by_eos = true;
                break;
            }
            stats.generated_tokens += 1;
            let text = stream.push(&tok.piece_bytes(prev, next));
            if !text.is_empty() {
                on_text(&text)?;
            }
            prev = Some(next);
            new_ids = vec![next as i64];
        }
        stats.generation_seconds = t0.elapsed().as_secs_f64() - stats.prompt_seconds;
        Ok(stats)
    }
}

/// Opens an LLM engine built by `trt-diff build --arch ...` and generates from `prompt`.
pub fn generate_with_engine(
    engine_path: &std::path::Path,
    backend: crate::runner::BackendChoice,
    prompt: &str,
    params: &SamplingParams,
    on_text: impl FnMut(&str) -> Result<()>,
) -> Result<GenerationStats> {
    use crate::manifest::{Manifest, Pipeline, sidecar_path};
    if !engine_path.exists() {
        bail!(
            "cannot open engine '{}': no such file; check the path",
            engine_path.display()
        );
    }
    let manifest = Manifest::read(&sidecar_path(engine_path)).with_context(|| {
        format!(
            "'{}' needs its manifest to generate; build it with `trt-diff build --arch ...`",
            engine_path.display()
        )
    })?;
    let Some(Pipeline::Llm {
        config, tokenizer, ..
    }) = &manifest.pipeline
    else {
        bail!(
            "'{}' is not an LLM engine (its manifest names no LLM pipeline)",
            engine_path.display()
        );
    };
    let dir = engine_path.parent().unwrap_or(std::path::Path::new("."));
    let tok =
        crate::tokenizer::llama2c::Llama2cTokenizer::load(&dir.join(tokenizer), config.vocab_size)?;
    let mut engine = crate::runner::open_engine(engine_path, backend, &Default::default())?;
    let mut generator = Generator {
        engine: engine.as_mut(),
        n_layers: config.n_layers,
        n_kv_heads: config.n_kv_heads,
        head_dim: config.head_dim(),
        max_seq_len: config.max_seq_len,
    };
    generator.generate(&tok, prompt, params, on_text)
}
