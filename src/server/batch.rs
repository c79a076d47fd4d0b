//! Continuous batching (`serve --parallel N`): the worker as a scheduler over N KV-cache slots
//! (`pipelines::kv_cache::Slots`). Each step it admits queued requests into free slots in arrival order, runs one
//! prefill chunk of the oldest sequence still reading its prompt (so newcomers never stall the others for long), then
//! one decode call with a token for every sequence that is generating, and samples each row with its request's own
//! parameters, RNG, stop strings, log-probabilities and JSON-schema constraint (`pipelines::llm::Sequence`). A
//! finished, failed or disconnected sequence frees its slot at once. A slot keeps the tokens it holds after its
//! sequence ends; a new prompt that starts with them (a chat history) runs only the rest.
//!
//! Rows of one call never mix: the attention reads each row's own cache and our matrix products compute each row
//! alone up to `DOT_MAX_ROWS` rows, so a request's output (tokens and log-probabilities) is the same alone or batched.
//! The attention of a prefill chunk rounds differently from that of a chunk of another length, so a reused prefix
//! must have been computed as a fresh prompt would compute it: prompts run in chunks aligned to multiples of
//! `PREFILL_CHUNK` positions, and only whole aligned chunks of a slot's earlier prompts are reused (not the tokens
//! its earlier sequence generated one at a time). Reuse then changes no bit of the output.
use super::{Job, Metrics, Piece, grammar, prepare};
use crate::backend::Engine;
use crate::backend::half_matmul::DOT_MAX_ROWS;
use crate::pipelines::kv_cache::Slots;
use crate::pipelines::llm::{Constraint, Sequence, Step, TextTokenizer, TokenLogprob};
use axum::http::StatusCode;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use tokio::sync::mpsc;

/// Prompt tokens per prefill call: at most `DOT_MAX_ROWS`, where products switch to a blocked GEMM that rounds
/// differently (see the module's note on identical outputs).
const PREFILL_CHUNK: usize = DOT_MAX_ROWS;

/// Positions per slot before any request asked for more (slots grow up to the model's context when idle).
const FIRST_CAPACITY: usize = 512;

/// A request admitted to the scheduler; its metrics are released when its last sequence is dropped.
struct JobCtx {
    job: Job,
    metrics: Arc<Metrics>,
}

impl Drop for JobCtx {
    fn drop(&mut self) {
        self.metrics.processing.fetch_sub(1, Ordering::Relaxed);
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One choice of one prompt of a request.
struct Seq {
    job: Rc<JobCtx>,
    choice: usize,
    prompt: Vec<u32>,
    /// Positions the sequence needs: prompt plus max_tokens.
    need: usize,
    state: Sequence,
    constraint: Option<grammar::JsonConstraint>,
    /// With log-probabilities, a step is held until the next one so that text still held back at the end joins the
    /// last token's entry.
    held: Option<(String, Option<TokenLogprob>)>,
    /// Where it runs, once placed.
    slot: usize,
    /// Prompt tokens already in the slot's cache.
    done: usize,
    /// The token to run next (decoding).
    next: Option<u32>,
    placed: Instant,
    first_token: Option<Instant>,
}

enum Outcome {
    Running,
    Finished,
    /// The client left or the request failed: drop every sequence of the job.
    Gone,
}

impl Seq {
    fn send(&self, text: String, logprob: Option<TokenLogprob>) -> anyhow::Result<()> {
        self.job
            .job
            .out
            .send(Piece::Step {
                choice: self.choice,
                text,
                logprob,
            })
            .map_err(|_| anyhow::anyhow!("client disconnected"))
    }

    /// Sends a step's text, or holds it when log-probabilities are wanted (see `held`).
    fn emit(&mut self, step: Step<'_>) -> anyhow::Result<()> {
        if self.job.job.req.logprobs.is_none() {
            return if step.text.is_empty() {
                Ok(())
            } else {
                self.send(step.text.to_string(), None)
            };
        }
        match (step.token, self.held.take()) {
            (None, Some((text, lp))) => {
                self.held = Some((text + step.text, lp));
                Ok(())
            }
            (_, prev) => {
                self.held = Some((step.text.to_string(), step.logprob.cloned()));
                match prev {
                    Some((text, lp)) => self.send(text, lp),
                    None => Ok(()),
                }
            }
        }
    }

    /// Samples from the logits after the last token run; ends the sequence when it is complete.
    fn advance(&mut self, row: Vec<f32>, tok: &dyn TextTokenizer, metrics: &Metrics) -> Outcome {
        let first = self.first_token.is_none();
        if first {
            self.first_token = Some(Instant::now());
        }
        let mut steps: Vec<(String, Option<u32>, Option<TokenLogprob>)> = Vec::new();
        let mut collect = |s: Step<'_>| {
            steps.push((s.text.to_string(), s.token, s.logprob.cloned()));
            Ok(())
        };
        let result = self.state.advance(
            row,
            tok,
            self.constraint.as_mut().map(|c| c as &mut dyn Constraint),
            &mut collect,
        );
        let next = match result {
            Ok(next) => next,
            Err(e) => return self.fail(format!("{e:#}")),
        };
        if !first {
            self.state.stats.decode_calls += 1;
        }
        for (text, token, logprob) in steps {
            if token.is_some() {
                metrics.generated_tokens.fetch_add(1, Ordering::Relaxed);
            }
            let step = Step {
                text: &text,
                token,
                logprob: logprob.as_ref(),
            };
            if self.emit(step).is_err() {
                return Outcome::Gone;
            }
        }
        self.next = next;
        if next.is_some() {
            Outcome::Running
        } else {
            self.finish(metrics)
        }
    }

    fn finish(&mut self, metrics: &Metrics) -> Outcome {
        let mut rest = Vec::new();
        let _ = self.state.finish(&mut |s: Step<'_>| {
            rest.push(s.text.to_string());
            Ok(())
        });
        for text in rest {
            let step = Step {
                text: &text,
                token: None,
                logprob: None,
            };
            if self.emit(step).is_err() {
                return Outcome::Gone;
            }
        }
        if let Some((text, lp)) = self.held.take()
            && self.send(text, lp).is_err()
        {
            return Outcome::Gone;
        }
        let mut stats = self.state.stats.clone();
        let first = self.first_token.unwrap_or(self.placed);
        stats.prompt_seconds = (first - self.placed).as_secs_f64();
        stats.generation_seconds = first.elapsed().as_secs_f64();
        metrics
            .prompt_micros
            .fetch_add((stats.prompt_seconds * 1e6) as u64, Ordering::Relaxed);
        metrics
            .generation_micros
            .fetch_add((stats.generation_seconds * 1e6) as u64, Ordering::Relaxed);
        let choice = self.choice;
        if self
            .job
            .job
            .out
            .send(Piece::ChoiceDone { choice, stats })
            .is_err()
        {
            return Outcome::Gone;
        }
        Outcome::Finished
    }

    fn fail(&self, message: String) -> Outcome {
        if !self.job.job.out.is_closed() {
            self.job.metrics.errors.fetch_add(1, Ordering::Relaxed);
            let _ = self
                .job
                .job
                .out
                .send(Piece::Failed(StatusCode::INTERNAL_SERVER_ERROR, message));
        }
        Outcome::Gone
    }
}

/// The length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

pub(super) struct Scheduler<'a> {
    slots: Slots<'a>,
    tok: Box<dyn TextTokenizer + Send>,
    cfg: crate::models::llama::LlamaConfig,
    metrics: Arc<Metrics>,
    grammars: Option<grammar::Grammars>,
    /// Sequences of admitted requests waiting for a slot, in arrival order.
    waiting: VecDeque<Seq>,
    /// Sequences in slots, in the order they were placed.
    active: Vec<Seq>,
    /// Per slot, how many of its cached tokens were computed in whole aligned prefill chunks (reusable exactly).
    exact: Vec<usize>,
}

impl<'a> Scheduler<'a> {
    pub(super) fn new(
        engine: &'a mut dyn Engine,
        parallel: usize,
        tok: Box<dyn TextTokenizer + Send>,
        cfg: crate::models::llama::LlamaConfig,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let capacity = FIRST_CAPACITY.min(cfg.max_seq_len);
        Ok(Scheduler {
            slots: Slots::new(engine, parallel, capacity)?,
            tok,
            cfg,
            metrics,
            grammars: None,
            waiting: VecDeque::new(),
            active: Vec::new(),
            exact: vec![0; parallel.max(1)],
        })
    }

    /// Serves until the queue closes.
    pub(super) fn run(mut self, mut jobs: mpsc::Receiver<Job>) {
        loop {
            // Take requests only while slots are free, so the rest wait in the queue (counted as deferred).
            while self.waiting.is_empty() && self.active.len() < self.slots.count() {
                let job = if self.active.is_empty() {
                    match jobs.blocking_recv() {
                        Some(j) => j,
                        None => return,
                    }
                } else {
                    match jobs.try_recv() {
                        Ok(j) => j,
                        Err(_) => break,
                    }
                };
                self.admit(job);
            }
            self.drop_gone();
            self.place();
            self.prefill();
            self.decode();
            let kv: usize = self
                .active
                .iter()
                .map(|s| self.slots.cached(s.slot).len())
                .sum();
            self.metrics.kv_tokens.store(kv as u64, Ordering::Relaxed);
        }
    }

    /// Checks a request and queues its sequences (or answers it with its error).
    fn admit(&mut self, job: Job) {
        let metrics = self.metrics.clone();
        let fail = |job: Job, status, m: String| {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
            let _ = job.out.send(Piece::Failed(status, m));
            metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        };
        if self.metrics.stopping.load(Ordering::Relaxed) {
            return fail(
                job,
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down; retry on another instance".into(),
            );
        }
        let (max_seq_len, vocab) = (self.cfg.max_seq_len, self.cfg.vocab_size);
        let prompts = match prepare(self.tok.as_ref(), &job.req, max_seq_len, vocab) {
            Ok(p) => p,
            Err(m) => return fail(job, StatusCode::BAD_REQUEST, m),
        };
        // A response_format's schema is checked before anything is sent, so that a bad one is a 400.
        let n = job.req.n;
        let mut constraints = Vec::new();
        if let Some(schema) = &job.req.json_schema {
            if self.grammars.is_none() {
                match grammar::Grammars::new(self.tok.as_ref(), vocab) {
                    Ok(g) => self.grammars = Some(g),
                    Err(e) => return fail(job, StatusCode::BAD_REQUEST, format!("{e:#}")),
                }
            }
            for _ in 0..prompts.len() * n {
                match self.grammars.as_ref().map(|g| g.json(schema.clone())) {
                    Some(Ok(c)) => constraints.push(Some(c)),
                    Some(Err(m)) => return fail(job, StatusCode::BAD_REQUEST, m),
                    None => return fail(job, StatusCode::INTERNAL_SERVER_ERROR, String::new()),
                }
            }
        } else {
            constraints.resize_with(prompts.len() * n, || None);
        }
        if job
            .out
            .send(Piece::Started(prompts.iter().map(|p| p.len()).collect()))
            .is_err()
        {
            self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        self.metrics.processing.fetch_add(1, Ordering::Relaxed);
        let ctx = Rc::new(JobCtx {
            job,
            metrics: self.metrics.clone(),
        });
        let mut constraints = constraints.into_iter();
        for (i, ids) in prompts.into_iter().enumerate() {
            for j in 0..n {
                let req = &ctx.job.req;
                let mut params = req.params.clone();
                params.seed = params.seed.wrapping_add(j as u64);
                params.max_tokens = req
                    .max_tokens
                    .unwrap_or(max_seq_len.saturating_sub(ids.len()));
                self.waiting.push_back(Seq {
                    job: ctx.clone(),
                    choice: i * n + j,
                    need: ids.len() + params.max_tokens,
                    state: Sequence::new(&ids, &params, req.logprobs),
                    prompt: ids.clone(),
                    constraint: constraints.next().flatten(),
                    held: None,
                    slot: 0,
                    done: 0,
                    next: None,
                    placed: Instant::now(),
                    first_token: None,
                });
            }
        }
    }

    /// Drops the sequences of clients that left and of failed requests.
    fn drop_gone(&mut self) {
        self.active.retain(|s| !s.job.job.out.is_closed());
        self.waiting.retain(|s| !s.job.job.out.is_closed());
    }

    /// Drops every sequence of the job `seq` belongs to (it failed or its client left).
    fn drop_job(&mut self, job: &Rc<JobCtx>) {
        self.active.retain(|s| !Rc::ptr_eq(&s.job, job));
        self.waiting.retain(|s| !Rc::ptr_eq(&s.job, job));
    }

    /// Moves waiting sequences into free slots, in arrival order; each takes the free slot whose cached tokens share
    /// the longest prefix with its prompt.
    fn place(&mut self) {
        while let Some(seq) = self.waiting.front() {
            let used: Vec<usize> = self.active.iter().map(|s| s.slot).collect();
            let free: Vec<usize> = (0..self.slots.count())
                .filter(|i| !used.contains(i))
                .collect();
            if free.is_empty() {
                return;
            }
            if seq.need > self.slots.capacity() {
                // Slots grow only when idle (growing drops every cache); until then later requests wait too.
                if !self.active.is_empty() {
                    return;
                }
                let want = seq
                    .need
                    .max(2 * self.slots.capacity())
                    .min(self.cfg.max_seq_len);
                self.exact.iter_mut().for_each(|e| *e = 0);
                if let Err(e) = self.slots.grow(want) {
                    let seq = self.waiting.pop_front();
                    if let Some(seq) = seq {
                        seq.fail(format!("{e:#}"));
                        let job = seq.job.clone();
                        drop(seq);
                        self.drop_job(&job);
                    }
                    continue;
                }
            }
            // Whole aligned chunks (see the module's note); at least one prompt token must run to give the logits
            // of the next one.
            let best = free
                .iter()
                .map(|&i| {
                    let cached = self.slots.cached(i);
                    let shared = common_prefix(cached, &seq.prompt)
                        .min(self.exact[i])
                        .min(cached.len())
                        .min(seq.prompt.len() - 1);
                    (shared - shared % PREFILL_CHUNK, i)
                })
                .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let Some((shared, slot)) = best else { return };
            let Some(mut seq) = self.waiting.pop_front() else {
                return;
            };
            self.slots.truncate(slot, shared);
            self.exact[slot] = shared;
            seq.slot = slot;
            seq.done = shared;
            seq.state.stats.cached_tokens = shared;
            self.metrics
                .cached_prompt_tokens
                .fetch_add(shared as u64, Ordering::Relaxed);
            seq.placed = Instant::now();
            self.active.push(seq);
        }
    }

    /// Runs the next prompt chunk of the earliest placed sequence still reading its prompt.
    fn prefill(&mut self) {
        let Some(i) = self.active.iter().position(|s| s.next.is_none()) else {
            return;
        };
        let seq = &mut self.active[i];
        let end = (seq.done + PREFILL_CHUNK).min(seq.prompt.len());
        let chunk = seq.prompt[seq.done..end].to_vec();
        let result = self.slots.extend(seq.slot, &chunk);
        if result.is_ok() && chunk.len() == PREFILL_CHUNK && self.exact[seq.slot] == seq.done {
            self.exact[seq.slot] = end;
        }
        self.metrics.decode_calls.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .prompt_tokens
            .fetch_add(chunk.len() as u64, Ordering::Relaxed);
        let outcome = match result {
            Err(e) => seq.fail(format!("{e:#}")),
            Ok(_) if end < seq.prompt.len() => {
                seq.done = end;
                Outcome::Running
            }
            Ok(row) => {
                seq.done = end;
                seq.advance(row, self.tok.as_ref(), &self.metrics)
            }
        };
        self.settle(vec![(i, outcome)]);
    }

    /// One token for every generating sequence, in one call.
    fn decode(&mut self) {
        let rows: Vec<(usize, (usize, u32))> = self
            .active
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.next.map(|t| (i, (s.slot, t))))
            .collect();
        if rows.is_empty() {
            return;
        }
        let call: Vec<(usize, u32)> = rows.iter().map(|r| r.1).collect();
        self.metrics.decode_calls.fetch_add(1, Ordering::Relaxed);
        let outcomes = match self.slots.step(&call) {
            Ok(logits) => rows
                .iter()
                .zip(logits)
                .map(|(&(i, _), row)| {
                    (
                        i,
                        self.active[i].advance(row, self.tok.as_ref(), &self.metrics),
                    )
                })
                .collect(),
            Err(e) => rows
                .iter()
                .map(|&(i, _)| (i, self.active[i].fail(format!("{e:#}"))))
                .collect(),
        };
        self.settle(outcomes);
    }

    /// Removes finished sequences and every sequence of gone jobs.
    fn settle(&mut self, outcomes: Vec<(usize, Outcome)>) {
        let mut gone = Vec::new();
        let mut finished = Vec::new();
        for (i, o) in outcomes {
            match o {
                Outcome::Running => {}
                Outcome::Finished => finished.push(i),
                Outcome::Gone => gone.push(self.active[i].job.clone()),
            }
        }
        let mut index = 0;
        self.active.retain(|_| {
            index += 1;
            !finished.contains(&(index - 1))
        });
        for job in gone {
            self.drop_job(&job);
        }
    }
}
