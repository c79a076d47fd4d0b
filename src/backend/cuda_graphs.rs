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

/// One captured signature: graph id `retired + index + 1`.
pub struct Slot {
    sig: Signature,
    pub inputs: Vec<Fixed>,
    pub outputs: Vec<Fixed>,
}

pub struct CudaGraphs {
    pub dev: Arc<Device>,
    /// Inputs ONNX Runtime reads on the host.
    host_inputs: Vec<String>,
    /// The previous call's signature and its outputs' (name, type, shape).
    last: Option<(Signature, Vec<OutputDesc>)>,
    slots: Vec<Slot>,
    /// Graph ids used before the last `reset` (ONNX Runtime keeps captured graphs; ids are never reused).
    retired: i64,
    /// Set when a capture or replay failed: every later run goes without graphs.
    pub disabled: bool,
}

impl CudaGraphs {
    pub fn new(dev: Arc<Device>, host_inputs: Vec<String>) -> Self {
        CudaGraphs {
            dev,
            host_inputs,
            last: None,
            slots: Vec::new(),
            retired: 0,
            disabled: false,
        }
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

    /// Forgets every graph: the buffers they were captured with are gone (held buffers replaced).
    pub fn reset(&mut self) {
        self.retired += self.slots.len() as i64;
        self.slots.clear();
        self.last = None;
    }

    pub fn is_host_input(&self, name: &str) -> bool {
        self.host_inputs.iter().any(|h| h == name)
    }

    /// The graph id for a call with `sig` (allocating its slot on the second call in a row with it), or
    /// [`NO_GRAPH`].
    pub fn slot_for(&mut self, sig: &Signature) -> Result<i64> {
        if self.disabled {
            return Ok(NO_GRAPH);
        }
        if let Some(i) = self.slots.iter().position(|s| s.sig == *sig) {
            return Ok(self.retired + i as i64 + 1);
        }
        let Some((last, outputs)) = &self.last else {
            return Ok(NO_GRAPH);
        };
        if last != sig || self.retired + self.slots.len() as i64 >= MAX_GRAPHS as i64 {
            return Ok(NO_GRAPH);
        }
        let inputs = sig
            .inputs
            .iter()
            .filter(|(n, _, _)| !self.is_host_input(n))
            .map(|(n, t, s)| Fixed::new(&self.dev, n, *t, s))
            .collect::<Result<_>>()?;
        let outputs = outputs
            .iter()
            .map(|(n, t, s)| Fixed::new(&self.dev, n, *t, s))
            .collect::<Result<_>>()?;
        self.slots.push(Slot {
            sig: sig.clone(),
            inputs,
            outputs,
        });
        Ok(self.retired + self.slots.len() as i64)
    }

    pub fn slot(&self, id: i64) -> Option<&Slot> {
        usize::try_from(id - self.retired - 1)
            .ok()
            .and_then(|i| self.slots.get(i))
    }

    /// Records a call run without a graph, so that the next call with the same signature gets one.
    pub fn ran(&mut self, sig: Signature, outputs: &[(String, HostTensor)]) {
        let outs = outputs
            .iter()
            .map(|(n, t)| (n.clone(), t.dtype, t.shape.clone()))
            .collect();
        self.last = Some((sig, outs));
    }

    /// Copies the call's device-bound inputs into slot `id`'s buffers (complete before ONNX Runtime's stream reads
    /// them).
    pub fn upload(&mut self, id: i64, inputs: &[(String, HostTensor)]) -> Result<()> {
        let i = usize::try_from(id - self.retired - 1).context("no CUDA graph slot")?;
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
                let data = self
                    .dev
                    .stream
                    .clone_dtoh(&f.data)
                    .with_context(|| format!("copying '{}' from the GPU failed", f.name))?;
                let elem = f.dtype.bits().unwrap_or(32) as usize / 8;
                let n = f.shape.iter().product::<usize>() * elem;
                Ok((
                    f.name.clone(),
                    HostTensor {
                        dtype: f.dtype,
                        shape: f.shape.clone(),
                        data: data[..n].to_vec(),
                    },
                ))
            })
            .collect()
    }
}
