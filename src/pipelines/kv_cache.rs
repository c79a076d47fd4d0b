//! One sequence's KV cache between decoder calls, in either layout the decoder graphs use:
//! - passed: `past_*` inputs [1, kv, past, hd] in, `present_*` [1, kv, past + new, hd] out, handed to the next call
//!   (`models::llama::decoder_graph`, what TensorRT builds); engines that can ([`Engine::chain`]) keep them in
//!   their own memory, so on a GPU the cache never crosses to the host;
//! - in place: the engine holds one buffer per layer and kind of `capacity` positions, bound as both `past_*` and
//!   `present_*`, which the graph extends where the new tokens go; the calls carry `seqlens_k` and
//!   `total_sequence_length` (`models::llama_cpu`, ONNX Runtime's GroupQueryAttention).
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
            inputs.push((
                TOTAL_INPUT.into(),
                int_tensor(vec![], &[t], DataType::INT32, |v: i32| {
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
