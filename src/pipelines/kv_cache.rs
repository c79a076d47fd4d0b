//! One sequence's KV cache between decoder calls, in either layout the decoder graphs use:
//! - passed: `past_*` inputs [1, kv, past, hd] in, `present_*` [1, kv, past + new, hd] out, handed to the next call
//!   (`models::llama::decoder_graph`, what TensorRT builds); engines that can ([`Engine::chain`]) keep them in
//!   their own memory, so on a GPU the cache never crosses to the host;
//! - in place: the engine holds one buffer per layer and kind of `capacity` positions, bound as both `past_*` and
//!   `present_*`, which the graph extends where the new tokens go; the calls carry `seqlens_k` and
//!   `total_sequence_length` (`models::llama_cpu`, ONNX Runtime's GroupQueryAttention).
//!
//! [`Slots`] holds several sequences' caches in place, one row of a batch each (the server's `--parallel N`).
use crate::backend::{Engine, HostTensor};
use crate::models::llama_cpu::{SEQLENS_INPUT, TOTAL_INPUT};
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};

pub struct Decoder<'a> {
    engine: &'a mut dyn Engine,
    /// Passed layout: the `past_*` and `present_*` names, layer by layer (key, value).
    past_names: Vec<String>,
    present_names: Vec<String>,
    /// Passed layout: the cache from the last call (moved into the next call's inputs, not copied); empty when the
    /// engine chains it itself.
    past: Vec<HostTensor>,
    chained: bool,
    /// In-place layout: the buffers' length in positions.
    capacity: Option<usize>,
    /// Positions in the cache.
    len: usize,
}

fn names(n_layers: usize, io: &str) -> impl Iterator<Item = String> + '_ {
    (0..n_layers).flat_map(move |i| ["key", "value"].map(|kind| format!("{io}_{kind}_{i}")))
}

fn int_tensor<T: Copy>(
    shape: Vec<usize>,
    values: &[T],
    dtype: DataType,
    bytes: fn(T) -> Vec<u8>,
) -> HostTensor {
    HostTensor {
        dtype,
        shape,
        data: values.iter().flat_map(|v| bytes(*v)).collect(),
    }
}

fn empty() -> HostTensor {
    HostTensor {
        dtype: DataType::FLOAT,
        shape: vec![],
        data: vec![],
    }
}

impl<'a> Decoder<'a> {
    /// A fresh sequence of at most `capacity` positions on `engine`; its inputs tell the layout, the layer count
    /// and the cache's shape (`past_key_0` [1, kv heads, positions, head size]).
    pub fn new(engine: &'a mut dyn Engine, capacity: usize) -> Result<Self> {
        let in_place = engine.inputs().iter().any(|d| d.name == SEQLENS_INPUT);
        let n_layers = (0..)
            .take_while(|i| {
                engine
                    .inputs()
                    .iter()
                    .any(|d| d.name == format!("past_key_{i}"))
            })
            .count();
        let d = engine
            .inputs()
            .iter()
            .find(|d| d.name == "past_key_0")
            .context("the engine has no input 'past_key_0': it is not a decoder with a KV cache")?;
        let (kv, hd) = match d.shape[..] {
            [_, kv, _, hd] if kv > 0 && hd > 0 => (kv as usize, hd as usize),
            _ => bail!("input {d} is not a KV cache [1, kv heads, positions, head size]"),
        };
        let mut past = Vec::new();
        let pairs: Vec<(String, String)> = names(n_layers, "past")
            .zip(names(n_layers, "present"))
            .collect();
        let mut chained = false;
        if in_place {
            engine.hold_in_place(&pairs, &[1, kv, capacity, hd])?;
        } else if engine.chain(&pairs, &[1, kv, 0, hd])? {
            chained = true;
        } else {
            past = (0..2 * n_layers)
                .map(|_| HostTensor {
                    dtype: DataType::FLOAT,
                    shape: vec![1, kv, 0, hd],
                    data: vec![],
                })
                .collect();
        }
        Ok(Self {
            engine,
            past_names: names(n_layers, "past").collect(),
            present_names: names(n_layers, "present").collect(),
            past,
            chained,
            capacity: in_place.then_some(capacity),
            len: 0,
        })
    }

    /// Runs `ids` after the cached positions; returns the `logits` output ([1, ids or 1, vocab]).
    pub fn forward(&mut self, ids: &[i64]) -> Result<HostTensor> {
        if ids.is_empty() {
            bail!("no tokens to run");
        }
        let total = self.len + ids.len();
        let mut inputs = vec![(
            "input_ids".to_string(),
            int_tensor(vec![1, ids.len()], ids, DataType::INT64, |v: i64| {
                v.to_le_bytes().to_vec()
            }),
        )];
        if let Some(cap) = self.capacity {
            if total > cap {
                bail!("{total} positions do not fit this sequence's KV cache of {cap}");
            }
            let t = total as i32;
            inputs.push((
                SEQLENS_INPUT.into(),
                int_tensor(vec![1], &[t - 1], DataType::INT32, |v: i32| {
                    v.to_le_bytes().to_vec()
                }),
            ));
            // Replayed decode steps see the host-read total captured with the graph: give the capacity, which
            // holds for every step (`Engine::replays_graphs`).
            let host_total = if ids.len() == 1 && self.engine.replays_graphs() {
                cap as i32
            } else {
                t
            };
            inputs.push((
                TOTAL_INPUT.into(),
                int_tensor(vec![], &[host_total], DataType::INT32, |v: i32| {
                    v.to_le_bytes().to_vec()
                }),
            ));
        } else {
            let positions: Vec<i64> = (self.len as i64..total as i64).collect();
            inputs.push((
                "position_ids".into(),
                int_tensor(vec![1, ids.len()], &positions, DataType::INT64, |v: i64| {
                    v.to_le_bytes().to_vec()
                }),
            ));
            for (name, t) in self.past_names.iter().zip(&mut self.past) {
                inputs.push((name.clone(), std::mem::replace(t, empty())));
            }
        }
        let mut outputs = self.engine.run(&inputs)?;
        if self.capacity.is_none() && !self.chained {
            for (name, slot) in self.present_names.iter().zip(&mut self.past) {
                let out = outputs
                    .iter_mut()
                    .find(|(n, _)| n == name)
                    .with_context(|| format!("engine has no '{name}' output"))?;
                *slot = std::mem::replace(&mut out.1, empty());
            }
        }
        self.len = total;
        let i = outputs
            .iter()
            .position(|(n, _)| n == "logits")
            .context("engine has no 'logits' output")?;
        Ok(outputs.swap_remove(i).1)
    }
}

/// The KV caches of `n` sequences in place, one row (slot) of [n, kv heads, capacity, head size] buffers each
/// (`models::llama_cpu` graphs take a batch of rows with per-row lengths in `seqlens_k`). A call runs a contiguous
/// range of rows (`Engine::hold_rows`): `extend` one slot's new tokens (prefill, a chunk at a time), `step` one token
/// for each of several slots. Each slot remembers the tokens it holds, so a new sequence whose prompt starts with
/// them skips running that prefix (`truncate` to the shared part, then `extend`).
pub struct Slots<'a> {
    engine: &'a mut dyn Engine,
    pairs: Vec<(String, String)>,
    kv: usize,
    hd: usize,
    capacity: usize,
    /// Per slot, the tokens whose keys and values it holds, in order.
    cached: Vec<Vec<u32>>,
}

/// The in-place cache layout of a decoder engine: (layer count, kv heads, head size), or None for other engines.
fn in_place_layout(engine: &dyn Engine) -> Option<(usize, usize, usize)> {
    if !engine.inputs().iter().any(|d| d.name == SEQLENS_INPUT) {
        return None;
    }
    let n_layers = (0..)
        .take_while(|i| {
            engine
                .inputs()
                .iter()
                .any(|d| d.name == format!("past_key_{i}"))
        })
        .count();
    let d = engine.inputs().iter().find(|d| d.name == "past_key_0")?;
    match d.shape[..] {
        [_, kv, _, hd] if kv > 0 && hd > 0 => Some((n_layers, kv as usize, hd as usize)),
        _ => None,
    }
}

/// The logits of each row's last position in `logits` [rows, positions, vocab].
fn last_rows(logits: &HostTensor, rows: usize) -> Result<Vec<Vec<f32>>> {
    let (vocab, per_row) = match logits.shape[..] {
        [r, p, v] if r == rows && p > 0 => (v, p * v),
        _ => bail!(
            "logits {:?} are not [{rows}, positions, vocab]",
            logits.shape
        ),
    };
    if logits.dtype != DataType::FLOAT || logits.data.len() != 4 * rows * per_row {
        bail!("logits are not {rows} x {per_row} f32 values");
    }
    Ok((0..rows)
        .map(|r| {
            let end = 4 * (r + 1) * per_row;
            logits.data[end - 4 * vocab..end]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
        .collect())
}

impl<'a> Slots<'a> {
    /// Whether `engine` can hold several sequences: an in-place cache and a batch dimension on `input_ids`.
    pub fn supported(engine: &dyn Engine) -> bool {
        in_place_layout(engine).is_some()
            && engine
                .inputs()
                .iter()
                .any(|d| d.name == "input_ids" && d.shape.first().is_some_and(|&b| b < 0))
    }

    /// `n` empty slots of `capacity` positions each on `engine` (see `supported`).
    pub fn new(engine: &'a mut dyn Engine, n: usize, capacity: usize) -> Result<Self> {
        if !Self::supported(engine) {
            bail!(
                "this decoder engine runs one sequence at a time (it has no batched in-place KV cache); serve it \
                 with --parallel 1, or rebuild it with this trt-diff for the CPU backend"
            );
        }
        let (n_layers, kv, hd) = in_place_layout(engine).context("no in-place KV cache")?;
        let pairs: Vec<(String, String)> = names(n_layers, "past")
            .zip(names(n_layers, "present"))
            .collect();
        let mut slots = Slots {
            engine,
            pairs,
            kv,
            hd,
            capacity: 0,
            cached: vec![Vec::new(); n.max(1)],
        };
        slots.grow(capacity)?;
        Ok(slots)
    }

    pub fn count(&self) -> usize {
        self.cached.len()
    }

    /// Positions per slot.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The tokens slot `slot` holds.
    pub fn cached(&self, slot: usize) -> &[u32] {
        &self.cached[slot]
    }

    /// Keeps the first `len` cached tokens of `slot` (the rest is overwritten by the next tokens).
    pub fn truncate(&mut self, slot: usize, len: usize) {
        self.cached[slot].truncate(len);
    }

    /// Makes every slot at least `capacity` positions long; growing drops every slot's cached tokens, so call it
    /// when no sequence is running.
    pub fn grow(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.capacity {
            return Ok(());
        }
        let shape = [self.cached.len(), self.kv, capacity, self.hd];
        self.engine.hold_in_place(&self.pairs, &shape)?;
        self.capacity = capacity;
        self.cached.iter_mut().for_each(Vec::clear);
        Ok(())
    }

    fn run(
        &mut self,
        rows: std::ops::Range<usize>,
        ids: &[i64],
        s: usize,
        totals: &[i32],
    ) -> Result<Vec<Vec<f32>>> {
        let b = rows.len();
        self.engine.hold_rows(rows)?;
        let seqlens: Vec<i32> = totals.iter().map(|t| t - 1).collect();
        let mut max = totals.iter().copied().max().unwrap_or(1);
        // As `Decoder::forward`: replayed decode steps keep the host-read total they were captured with.
        if s == 1 && self.engine.replays_graphs() {
            max = self.capacity as i32;
        }
        let inputs = vec![
            (
                "input_ids".to_string(),
                int_tensor(vec![b, s], ids, DataType::INT64, |v: i64| {
                    v.to_le_bytes().to_vec()
                }),
            ),
            (
                SEQLENS_INPUT.into(),
                int_tensor(vec![b], &seqlens, DataType::INT32, |v: i32| {
                    v.to_le_bytes().to_vec()
                }),
            ),
            (
                TOTAL_INPUT.into(),
                int_tensor(vec![], &[max], DataType::INT32, |v: i32| {
                    v.to_le_bytes().to_vec()
                }),
            ),
        ];
        let outputs = self.engine.run(&inputs)?;
        let logits = outputs
            .iter()
            .find(|(n, _)| n == "logits")
            .context("engine has no 'logits' output")?;
        last_rows(&logits.1, b)
    }

    /// Runs `ids` after the tokens `slot` holds; returns the logits that follow the last of them.
    pub fn extend(&mut self, slot: usize, ids: &[u32]) -> Result<Vec<f32>> {
        let total = self.cached[slot].len() + ids.len();
        if ids.is_empty() || total > self.capacity {
            bail!(
                "{} new tokens after {} do not fit a slot of {} positions",
                ids.len(),
                self.cached[slot].len(),
                self.capacity
            );
        }
        let wide: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
        let mut out = self.run(slot..slot + 1, &wide, ids.len(), &[total as i32])?;
        self.cached[slot].extend_from_slice(ids);
        out.pop().context("no logits")
    }

    /// Runs one token for each `(slot, token)` of `rows` (distinct slots) in one call; returns each one's logits in
    /// the order given. Slots between them that are not listed run a placeholder token where their cache ends,
    /// which their cached tokens never see.
    pub fn step(&mut self, rows: &[(usize, u32)]) -> Result<Vec<Vec<f32>>> {
        let (Some(lo), Some(hi)) = (
            rows.iter().map(|r| r.0).min(),
            rows.iter().map(|r| r.0).max(),
        ) else {
            return Ok(Vec::new());
        };
        let mut ids = Vec::with_capacity(hi + 1 - lo);
        let mut totals = Vec::with_capacity(hi + 1 - lo);
        for slot in lo..=hi {
            let token = rows.iter().find(|r| r.0 == slot).map(|r| r.1);
            if token.is_some() && self.cached[slot].len() >= self.capacity {
                bail!("slot {slot} is full ({} positions)", self.capacity);
            }
            if token.is_none() && self.cached[slot].len() >= self.capacity {
                // The placeholder must land inside the buffer: give up the last cached token.
                self.cached[slot].pop();
            }
            ids.push(token.unwrap_or(0) as i64);
            totals.push(self.cached[slot].len() as i32 + 1);
        }
        let out = self.run(lo..hi + 1, &ids, 1, &totals)?;
        let mut result = Vec::with_capacity(rows.len());
        for &(slot, token) in rows {
            self.cached[slot].push(token);
            result.push(out[slot - lo].clone());
        }
        Ok(result)
    }
}
