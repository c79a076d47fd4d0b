//! CUDA graphs for ONNX Runtime's CUDA provider (`enable_cuda_graph`): a call whose inputs have the shapes of the
//! call before it (an LLM's decode steps) is captured once and then replayed, so a step launches one graph instead
//! of a few hundred kernels. ONNX Runtime replays a graph with the addresses it was captured with, so each captured
//! shape signature ("slot") owns device buffers for its inputs and outputs: the host's values are copied into them
//! before a run and the outputs copied out after it. Calls with new shapes (a prompt) run without a graph
//! (`gpu_graph_id` -1). Inputs ONNX Runtime reads on the host (GroupQueryAttention's `total_sequence_length`) stay
//! host tensors.
use super::HostTensor;
use crate::cuda::device::Device;
use crate::onnx::DataType;
use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, DevicePtr};
use std::sync::Arc;

/// The run option naming the graph of a run.
pub const GRAPH_ID: &str = "gpu_graph_id";
/// `gpu_graph_id` of a run that is neither captured nor replayed.
pub const NO_GRAPH: i64 = -1;
/// At most this many shape signatures get a graph (a server's batch sizes).
const MAX_GRAPHS: usize = 16;

/// What a call's graph depends on: its inputs' names, types and shapes, the values of the inputs read on the host
/// (a replay cannot see them change), and the rows of held buffers it binds.
#[derive(Clone, Debug, PartialEq)]
pub struct Signature {
    inputs: Vec<(String, DataType, Vec<usize>)>,
    host_values: Vec<Vec<u8>>,
    rows: Option<std::ops::Range<usize>>,
}

/// A device buffer a captured graph reads or writes, at a fixed address.
pub struct Fixed {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<usize>,
    data: CudaSlice<u8>,
}

impl Fixed {
    fn new(dev: &Device, name: &str, dtype: DataType, shape: &[usize]) -> Result<Self> {
        let elem = dtype.bits().unwrap_or(32) as usize / 8;
        let bytes = shape.iter().product::<usize>() * elem;
        let data = dev
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .with_context(|| {
                format!("allocating the CUDA graph's buffer for '{name}' ({bytes} bytes)")
            })?;
        Ok(Fixed {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data,
        })
    }

    pub fn tensor(&self, dev: &Device) -> super::DeviceTensor {
        let (ptr, _sync) = self.data.device_ptr(&dev.stream);
        super::DeviceTensor {
            ptr,
            dtype: self.dtype,
            shape: self.shape.clone(),
        }
    }
}

/// An output's (name, type, shape).
type OutputDesc = (String, DataType, Vec<usize>);

/// One captured signature's buffers: graph id `retired + index + 1`.
pub struct Slot {
    pub inputs: Vec<Fixed>,
    pub outputs: Vec<Fixed>,
}

/// Which calls get a graph, and its id: the bookkeeping, apart from the device buffers.
#[derive(Default)]
pub struct GraphIds {
    /// Inputs ONNX Runtime reads on the host.
    host_inputs: Vec<String>,
    /// The previous call's signature and its outputs' (name, type, shape).
    last: Option<(Signature, Vec<OutputDesc>)>,
    /// The signatures with graphs, by id after `retired`.
    sigs: Vec<Signature>,
    /// Graph ids used before the last `reset` (ONNX Runtime keeps captured graphs; ids are never reused).
    retired: i64,
    /// Set when a capture or replay failed: every later run goes without graphs.
    pub disabled: bool,
}

/// What a call runs with.
#[derive(Debug, PartialEq)]
pub enum Pick {
    /// No graph ([`NO_GRAPH`]).
    None,
    /// The graph of an earlier call with this signature.
    Existing(i64),
    /// A new graph id; its buffers take these outputs (the previous call's, same signature).
    New(i64, Vec<OutputDesc>),
}

impl GraphIds {
    pub fn new(host_inputs: Vec<String>) -> Self {
        GraphIds {
            host_inputs,
            ..Default::default()
        }
    }

    pub fn is_host_input(&self, name: &str) -> bool {
        self.host_inputs.iter().any(|h| h == name)
    }

    pub fn signature(
        &self,
        inputs: &[(String, HostTensor)],
        rows: Option<std::ops::Range<usize>>,
    ) -> Signature {
        Signature {
            inputs: inputs
                .iter()
                .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone()))
                .collect(),
            host_values: inputs
                .iter()
                .filter(|(n, _)| self.is_host_input(n))
                .map(|(_, t)| t.data.clone())
                .collect(),
            rows,
        }
    }

    /// A call with `sig`: its graph, a new one on the second call in a row with it, or none.
    pub fn pick(&mut self, sig: &Signature) -> Pick {
        if self.disabled {
            return Pick::None;
        }
        if let Some(i) = self.sigs.iter().position(|s| s == sig) {
            return Pick::Existing(self.retired + i as i64 + 1);
        }
        match &self.last {
            Some((last, outputs))
                if last == sig && self.retired + (self.sigs.len() as i64) < MAX_GRAPHS as i64 =>
            {
                let outputs = outputs.clone();
                self.sigs.push(sig.clone());
                Pick::New(self.retired + self.sigs.len() as i64, outputs)
            }
            _ => Pick::None,
        }
    }

    /// The index of graph `id` among the current ones.
    pub fn index(&self, id: i64) -> Option<usize> {
        usize::try_from(id - self.retired - 1)
            .ok()
            .filter(|&i| i < self.sigs.len())
    }

    /// Records a call run without a graph, so that the next call with the same signature gets one.
    pub fn ran(&mut self, sig: Signature, outputs: &[(String, HostTensor)]) {
        let outs = outputs
            .iter()
            .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone()))
            .collect();
        self.last = Some((sig, outs));
    }

    /// Forgets every graph (the buffers they were captured with are gone); ids go on from the last.
    pub fn reset(&mut self) {
        self.retired += self.sigs.len() as i64;
        self.sigs.clear();
        self.last = None;
    }
}

pub struct CudaGraphs {
    pub dev: Arc<Device>,
    pub ids: GraphIds,
    slots: Vec<Slot>,
}

impl CudaGraphs {
    pub fn new(dev: Arc<Device>, host_inputs: Vec<String>) -> Self {
        CudaGraphs {
            dev,
            ids: GraphIds::new(host_inputs),
            slots: Vec::new(),
        }
    }

    /// Forgets every graph: the held buffers they were captured with were replaced.
    pub fn reset(&mut self) {
        self.ids.reset();
        self.slots.clear();
    }

    /// The graph id for a call with `sig` (allocating its buffers when it is new), or [`NO_GRAPH`].
    pub fn slot_for(&mut self, sig: &Signature) -> Result<i64> {
        Ok(match self.ids.pick(sig) {
            Pick::None => NO_GRAPH,
            Pick::Existing(id) => id,
            Pick::New(id, outputs) => {
                let inputs = sig
                    .inputs
                    .iter()
                    .filter(|(n, _, _)| !self.ids.is_host_input(n))
                    .map(|(n, t, s)| Fixed::new(&self.dev, n, *t, s))
                    .collect::<Result<_>>()?;
                let outputs = outputs
                    .iter()
                    .map(|(n, t, s)| Fixed::new(&self.dev, n, *t, s))
                    .collect::<Result<_>>()?;
                self.slots.push(Slot { inputs, outputs });
                id
            }
        })
    }

    pub fn slot(&self, id: i64) -> Option<&Slot> {
        self.ids.index(id).and_then(|i| self.slots.get(i))
    }

    /// Copies the call's device-bound inputs into slot `id`'s buffers (complete before ONNX Runtime's stream reads
    /// them).
    pub fn upload(&mut self, id: i64, inputs: &[(String, HostTensor)]) -> Result<()> {
        let i = self.ids.index(id).context("no CUDA graph slot")?;
        let slot = &mut self.slots[i];
        for f in &mut slot.inputs {
            let t = inputs
                .iter()
                .find(|(n, _)| *n == f.name)
                .with_context(|| format!("input '{}' is not given", f.name))?;
            self.dev
                .stream
                .memcpy_htod(&t.1.data, &mut f.data.slice_mut(..t.1.data.len()))
                .with_context(|| format!("copying '{}' to the GPU failed", f.name))?;
        }
        self.dev.synchronize()
    }

    /// Slot `id`'s outputs, copied to the host.
    pub fn download(&self, id: i64) -> Result<Vec<(String, HostTensor)>> {
        let slot = self.slot(id).context("no CUDA graph slot")?;
        slot.outputs
            .iter()
            .map(|f| {
                let mut data = self
                    .dev
                    .stream
                    .clone_dtoh(&f.data)
                    .with_context(|| format!("copying '{}' from the GPU failed", f.name))?;
                // The buffer holds one byte more only when the output is empty (allocations are never 0 bytes).
                let elem = f.dtype.bits().unwrap_or(32) as usize / 8;
                data.truncate(f.shape.iter().product::<usize>() * elem);
                Ok((
                    f.name.clone(),
                    HostTensor {
                        dtype: f.dtype,
                        shape: f.shape.clone(),
                        data,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(ids: &[i64], total: i32) -> Vec<(String, HostTensor)> {
        vec![
            (
                "input_ids".into(),
                HostTensor {
                    dtype: DataType::INT64,
                    shape: vec![1, ids.len()],
                    data: ids.iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ),
            (
                "total_sequence_length".into(),
                HostTensor {
                    dtype: DataType::INT32,
                    shape: vec![],
                    data: total.to_le_bytes().to_vec(),
                },
            ),
        ]
    }

    fn logits() -> Vec<(String, HostTensor)> {
        vec![(
            "logits".into(),
            HostTensor {
                dtype: DataType::FLOAT,
                shape: vec![1, 1, 8],
                data: vec![0; 32],
            },
        )]
    }

    /// Runs a call through `ids` as the engine does: the pick, and a record when it ran without a graph.
    fn run(ids: &mut GraphIds, inputs: &[(String, HostTensor)]) -> Pick {
        let sig = ids.signature(inputs, None);
        let pick = ids.pick(&sig);
        if pick == Pick::None {
            ids.ran(sig, &logits());
        }
        pick
    }

    #[test]
    fn repeated_shapes_get_a_graph_and_new_ones_do_not() {
        let mut g = GraphIds::new(vec!["total_sequence_length".into()]);
        // The prompt, then decode steps: the second step in a row with one shape gets a new graph, later ones
        // replay it, whatever the device-bound token is.
        assert_eq!(run(&mut g, &call(&[1, 2, 3], 64)), Pick::None);
        assert_eq!(run(&mut g, &call(&[4], 64)), Pick::None);
        let outputs = vec![("logits".to_string(), DataType::FLOAT, vec![1, 1, 8])];
        assert_eq!(run(&mut g, &call(&[5], 64)), Pick::New(1, outputs));
        assert_eq!(run(&mut g, &call(&[6], 64)), Pick::Existing(1));
        // A host-read value is part of the signature: a replay could not see it change.
        assert_eq!(run(&mut g, &call(&[7], 128)), Pick::None);
        assert!(matches!(run(&mut g, &call(&[8], 128)), Pick::New(2, _)));
        assert_eq!(run(&mut g, &call(&[9], 64)), Pick::Existing(1));
        // New held buffers: every graph is forgotten and ids are never reused.
        g.reset();
        assert_eq!(g.index(1), None);
        assert_eq!(run(&mut g, &call(&[1], 64)), Pick::None);
        assert!(matches!(run(&mut g, &call(&[2], 64)), Pick::New(3, _)));
        assert_eq!(g.index(3), Some(0));
        g.disabled = true;
        assert_eq!(run(&mut g, &call(&[3], 64)), Pick::None);
    }

    #[test]
    fn graphs_are_capped() {
        let mut g = GraphIds::new(vec![]);
        let mut made = 0;
        for len in 1..=2 * MAX_GRAPHS {
            let tokens = vec![0i64; len];
            run(&mut g, &call(&tokens, 1));
            if matches!(run(&mut g, &call(&tokens, 1)), Pick::New(..)) {
                made += 1;
            }
        }
        assert_eq!(made, MAX_GRAPHS);
    }
}
