//! Sampler buffers on the GPU: [`DeviceBuffer`] implements the samplers' [`Buffer`] with the fused
//! linear-combination and Philox kernels, so every stepper runs unchanged on device memory (its host twin is
//! `Vec<f32>`, with bit-identical rounding).
use super::device::Device;
use crate::samplers::buffer::{Buffer, MAX_TERMS};
use anyhow::{Context, Result, bail};
use cudarc::driver::CudaSlice;
use std::sync::Arc;

/// An f32 buffer on the device, with the device whose kernels update it.
pub struct DeviceBuffer {
    pub dev: Arc<Device>,
    pub data: CudaSlice<f32>,
}

impl DeviceBuffer {
    pub fn zeros(dev: &Arc<Device>, n: usize) -> Result<Self> {
        let data = dev.stream.alloc_zeros::<f32>(n.max(1)).with_context(|| {
            format!("allocating {n} f32 on the GPU failed (out of device memory?)")
        })?;
        Ok(DeviceBuffer {
            dev: dev.clone(),
            data,
        })
    }
    pub fn from_host(dev: &Arc<Device>, v: &[f32]) -> Result<Self> {
        super::transfers::host_to_device(std::mem::size_of_val(v));
        let data = dev
            .stream
            .clone_htod(v)
            .context("copying a buffer to the GPU failed")?;
        Ok(DeviceBuffer {
            dev: dev.clone(),
            data,
        })
    }
    /// Overwrites the buffer with host values of the same length.
    pub fn write_host(&mut self, v: &[f32]) -> Result<()> {
        if v.len() != self.data.len() {
            bail!(
                "{} host values for a device buffer of {}",
                v.len(),
                self.data.len()
            );
        }
        super::transfers::host_to_device(std::mem::size_of_val(v));
        self.dev
            .stream
            .memcpy_htod(v, &mut self.data)
            .context("copying a buffer to the GPU failed")
    }
    pub fn to_host(&self) -> Result<Vec<f32>> {
        super::transfers::device_to_host(self.data.len() * 4);
        self.dev
            .stream
            .clone_dtoh(&self.data)
            .context("copying a buffer from the GPU failed")
    }
}

impl Buffer for DeviceBuffer {
    fn len(&self) -> usize {
        self.data.len()
    }
    fn alloc_like(&self) -> Result<Self> {
        DeviceBuffer::zeros(&self.dev, self.data.len())
    }
    fn lincomb_raw(&mut self, beta: f64, terms: &[(f64, &Self)]) -> Result<()> {
        if terms.len() > MAX_TERMS {
            bail!("lincomb_raw: {} terms, at most {MAX_TERMS}", terms.len());
        }
        // Coefficients are rounded to f32 exactly as the host f32 path rounds them.
        let t: Vec<(f32, &CudaSlice<f32>)> =
            terms.iter().map(|(c, x)| (*c as f32, &x.data)).collect();
        self.dev.lincomb(&mut self.data, beta as f32, &t)
    }
    fn fill_normal(&mut self, seed: u64, stream: u64) -> Result<()> {
        self.dev.fill_normal(&mut self.data, seed, stream)
    }
    fn to_host_f64(&self) -> Result<Vec<f64>> {
        Ok(self.to_host()?.into_iter().map(f64::from).collect())
    }
    fn set_from_f64(&mut self, v: &[f64]) -> Result<()> {
        if v.len() != self.data.len() {
            bail!(
                "set_from_f64: {} values for {} elements",
                v.len(),
                self.data.len()
            );
        }
        let h: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        self.write_host(&h)
    }
}
