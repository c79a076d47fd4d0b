//! What the image families share on the GPU path: the device their sampler runs on, the batch's initial noise
//! there, device copies of constant engine inputs uploaded once per prompt or size, scratch buffers reused across
//! steps, and one engine call on device buffers bound by address.
use super::engines::Backend;
use super::image::Latent;
use crate::backend::{DeviceTensor, Engine, HostTensor};
use crate::cuda::buffer::DeviceBuffer;
use crate::cuda::device::Device;
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};
use cudarc::driver::DevicePtr;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The GPU a family's sampler state lives on: the engines' GPU for TensorRT and ONNX Runtime CUDA, none on the
/// CPU backend.
pub fn open_device(backend: Backend) -> Result<Option<Arc<Device>>> {
    Ok(match backend {
        Backend::Cuda(id) => Some(Device::open(id as usize)?),
        Backend::Trt => Some(Device::open(0)?),
        Backend::Cpu => None,
    })
}

/// Per image i of the batch, Philox noise of `seed + i` (stream 0), `per` values each, in host memory or on
/// `device` (bit-identical either way).
pub fn batch_noise(
    device: Option<&Arc<Device>>,
    seed: u64,
    batch: usize,
    per: usize,
) -> Result<Latent> {
    let Some(dev) = device else {
        let mut all = Vec::with_capacity(batch * per);
        let mut z = vec![0f32; per];
        for i in 0..batch {
            crate::samplers::noise::fill_normal_host(&mut z, seed + i as u64, 0);
            all.extend_from_slice(&z);
        }
        return Ok(Latent::Host(all));
    };
    let mut all = DeviceBuffer::zeros(dev, per * batch)?;
    let mut one = DeviceBuffer::zeros(dev, per)?;
    for i in 0..batch {
        crate::samplers::buffer::Buffer::fill_normal(&mut one, seed + i as u64, 0)?;
        copy_into(dev, &one, 0, &mut all, i * per, per)?;
    }
    Ok(Latent::Device(all))
}

/// Host values as a latent where the sampler runs.
pub fn to_latent(device: Option<&Arc<Device>>, v: Vec<f32>) -> Result<Latent> {
    Ok(match device {
        Some(dev) => Latent::Device(DeviceBuffer::from_host(dev, &v)?),
        None => Latent::Host(v),
    })
}

/// `n` values from `src[from..]` to `dst[to..]`, on the GPU.
pub fn copy_into(
    dev: &Device,
    src: &DeviceBuffer,
    from: usize,
    dst: &mut DeviceBuffer,
    to: usize,
    n: usize,
) -> Result<()> {
    if from + n > src.data.len() || to + n > dst.data.len() {
        bail!(
            "device copy of {n} values from {from} (of {}) to {to} (of {}) is out of range (a pipeline bug)",
            src.data.len(),
            dst.data.len()
        );
    }
    dev.stream
        .memcpy_dtod(
            &src.data.slice(from..from + n),
            &mut dst.data.slice_mut(to..to + n),
        )
        .context("copying on the GPU failed")
}

/// A process-unique id for a prompt's conditioning, so that device copies made from it are found again without
/// comparing the values (and never confused with a later conditioning at the same address).
pub fn next_cond_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A cache key from the things an upload depends on (conditioning ids, batch, latent size).
pub fn key(parts: &[u64]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// Named device buffers of one pipeline: constant inputs, each name holding the uploads of its last two keys (a
/// prompt and its negative alternate under CFG), and scratch space (reallocated only when its length changes).
#[derive(Default)]
pub struct DeviceSlots {
    uploads: HashMap<&'static str, Vec<(u64, DeviceBuffer)>>,
    scratch: HashMap<&'static str, DeviceBuffer>,
}

impl DeviceSlots {
    /// Uploads `make()`'s values as `name` for `key` unless they are there already.
    pub fn upload(
        &mut self,
        dev: &Arc<Device>,
        name: &'static str,
        key: u64,
        make: impl FnOnce() -> Result<Vec<f32>>,
    ) -> Result<()> {
        let held = self.uploads.entry(name).or_default();
        if held.iter().any(|(k, _)| *k == key) {
            return Ok(());
        }
        let v = make()?;
        tracing::debug!("uploading {name} ({} values) to the GPU", v.len());
        if held.len() == 2 {
            held.remove(0);
        }
        held.push((key, DeviceBuffer::from_host(dev, &v)?));
        Ok(())
    }

    /// The upload of `name` for `key`.
    pub fn get(&self, name: &str, key: u64) -> Result<&DeviceBuffer> {
        self.uploads
            .get(name)
            .and_then(|h| h.iter().find(|(k, _)| *k == key))
            .map(|(_, b)| b)
            .with_context(|| format!("no device copy of '{name}' (a pipeline bug)"))
    }

    /// Drops the uploads of `name` (per-request inputs such as an inpainting mask).
    pub fn remove(&mut self, name: &str) {
        self.uploads.remove(name);
    }

    /// Scratch space `name` of `len` values (contents unspecified), taken out so that it can be written while
    /// other slots are read; [`DeviceSlots::put`] returns it for the next step.
    pub fn take_scratch(
        &mut self,
        dev: &Arc<Device>,
        name: &'static str,
        len: usize,
    ) -> Result<DeviceBuffer> {
        match self.scratch.remove(name) {
            Some(b) if b.data.len() == len.max(1) => Ok(b),
            _ => DeviceBuffer::zeros(dev, len),
        }
    }

    pub fn put(&mut self, name: &'static str, buf: DeviceBuffer) {
        self.scratch.insert(name, buf);
    }

    pub fn scratch(&self, name: &str) -> Result<&DeviceBuffer> {
        self.scratch
            .get(name)
            .with_context(|| format!("no device buffer '{name}' (a pipeline bug)"))
    }
}

/// A device buffer bound to an engine input or output of `shape` (f32).
fn tensor(dev: &Device, buf: &DeviceBuffer, shape: &[usize]) -> Result<DeviceTensor> {
    let n: usize = shape.iter().product();
    if n > buf.data.len() {
        bail!(
            "a device buffer of {} values bound as {shape:?} (a pipeline bug)",
            buf.data.len()
        );
    }
    let (ptr, _sync) = buf.data.device_ptr(&dev.stream);
    Ok(DeviceTensor {
        ptr,
        dtype: DataType::FLOAT,
        shape: shape.to_vec(),
    })
}

/// One engine call on device buffers: `inputs` and `outputs` bound by address (f32, as the families export their
/// float inputs), `host` inputs (timesteps and other scalars) copied in. The sampler's kernels wrote the inputs on
/// our stream and the engine reads them on its own, so the stream is synchronized first.
pub fn run_on_device(
    engine: &mut dyn Engine,
    dev: &Device,
    what: &str,
    inputs: &[(&str, &DeviceBuffer, Vec<usize>)],
    host: &[(String, HostTensor)],
    outputs: &[(&str, &DeviceBuffer, Vec<usize>)],
) -> Result<()> {
    for (name, _, _) in inputs {
        match engine.inputs().iter().find(|d| d.name == *name) {
            Some(d) if d.dtype == DataType::FLOAT => {}
            Some(d) => bail!(
                "the {what}'s input {d} is not f32, which the GPU path binds; rebuild the bundle with this trt-diff"
            ),
            None => {
                bail!("the {what} has no input '{name}'; rebuild the bundle with this trt-diff")
            }
        }
    }
    let bind = |list: &[(&str, &DeviceBuffer, Vec<usize>)]| -> Result<Vec<(String, DeviceTensor)>> {
        list.iter()
            .map(|(n, b, s)| Ok((n.to_string(), tensor(dev, b, s)?)))
            .collect()
    };
    let (ins, outs) = (bind(inputs)?, bind(outputs)?);
    let ins: Vec<(&str, DeviceTensor)> = ins.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let outs: Vec<(&str, DeviceTensor)> =
        outs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    dev.synchronize()?;
    engine
        .run_device(&ins, host, &outs)
        .with_context(|| what.to_string())
}
