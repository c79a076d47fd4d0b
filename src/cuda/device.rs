//! A GPU with the kernels the pipelines need between engine calls (src/cuda/kernels.cu), compiled by NVRTC once
//! per process and architecture. Without a driver, opening a device is an error value, never a panic.
use anyhow::{Context, Result, bail};
use cudarc::driver::DevicePtr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

const SOURCE: &str = include_str!("kernels.cu");

/// PTX per architecture ("compute_90", ...), compiled on first use.
fn ptx_for(arch: &'static str) -> Result<Ptx> {
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Ptx>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(p) = cache.lock().unwrap().get(arch) {
        return Ok(p.clone());
    }
    let opts = CompileOptions {
        arch: Some(arch),
        // Bit-identical results with the host code need separate multiply and add roundings.
        fmad: Some(false),
        ..Default::default()
    };
    tracing::debug!("compiling the kernels for {arch} with NVRTC");
    let ptx = compile_ptx_with_opts(SOURCE, opts)
        .map_err(|e| anyhow::anyhow!("NVRTC failed to compile the kernels: {e}"))?;
    cache.lock().unwrap().insert(arch, ptx.clone());
    Ok(ptx)
}

fn arch_name(cc: (i32, i32)) -> &'static str {
    // NVRTC wants a 'static str; the known architectures are few.
    match cc {
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (10, 3) => "compute_103",
        (11, 0) => "compute_110",
        (12, 0) => "compute_120",
        (12, 1) => "compute_121",
        _ => "compute_80",
    }
}

struct Funcs {
    lincomb: CudaFunction,
    lincomb4: CudaFunction,
    cfg: CudaFunction,
    normal: CudaFunction,
    f32_to_f16: CudaFunction,
    f16_to_f32: CudaFunction,
    f32_to_bf16: CudaFunction,
    bf16_to_f32: CudaFunction,
    pack: CudaFunction,
    unpack: CudaFunction,
    transpose: CudaFunction,
}

pub struct Device {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub info: super::GpuInfo,
    _module: Arc<CudaModule>,
    f: Funcs,
}

fn launch_cfg(n: usize) -> LaunchConfig {
    // Grid-stride kernels: enough blocks to fill the GPU, not one thread per element.
    let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn same_len(what: &str, a: usize, b: usize) -> Result<()> {
    if a != b {
        bail!("{what}: buffers of {a} and {b} elements");
    }
    Ok(())
}

impl Device {
    pub fn open(ordinal: usize) -> Result<Arc<Device>> {
        let report = super::query().map_err(|e| anyhow::anyhow!("no CUDA device: {e}"))?;
        let info = report.gpus.get(ordinal).cloned().with_context(|| {
            format!(
                "no GPU {ordinal} (the driver reports {})",
                report.gpus.len()
            )
        })?;
        tracing::debug!("opening GPU {ordinal} ({})", info.name);
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("cannot create a CUDA context on GPU {ordinal}: {e}"))?;
        let stream = ctx.default_stream();
        let module = ctx
            .load_module(ptx_for(arch_name(info.compute_capability))?)
            .map_err(|e| anyhow::anyhow!("loading the kernels failed: {e}"))?;
        let load = |name: &str| {
            module
                .load_function(name)
                .map_err(|e| anyhow::anyhow!("kernel {name}: {e}"))
        };
        tracing::debug!("kernels loaded on GPU {ordinal}");
        let f = Funcs {
            lincomb: load("lincomb_f32")?,
            lincomb4: load("lincomb4_f32")?,
            cfg: load("cfg_f32")?,
            normal: load("philox_normal_f32")?,
            f32_to_f16: load("f32_to_f16")?,
            f16_to_f32: load("f16_to_f32")?,
            f32_to_bf16: load("f32_to_bf16")?,
            bf16_to_f32: load("bf16_to_f32")?,
            pack: load("flux_pack_f32")?,
            unpack: load("flux_unpack_f32")?,
            transpose: load("transpose_f32")?,
        };
        Ok(Arc::new(Device {
            ctx,
            stream,
            info,
            _module: module,
            f,
        }))
    }

    /// `out = beta * out + sum c_i * x_i` (at most 8 terms), f32, same rounding as the host path.
    pub fn lincomb(
        &self,
        out: &mut CudaSlice<f32>,
        beta: f32,
        terms: &[(f32, &CudaSlice<f32>)],
    ) -> Result<()> {
        if terms.len() > 8 {
            bail!("lincomb: {} terms, the kernel takes at most 8", terms.len());
        }
        let n = out.len();
        for (_, x) in terms {
            same_len("lincomb", n, x.len())?;
        }
        let k = terms.len() as i32;
        let n64 = n as u64;
        let aligned = {
            let (p, _s) = out.device_ptr(&self.stream);
            p % 16 == 0
        } && terms.iter().all(|(_, x)| {
            let (p, _s) = x.device_ptr(&self.stream);
            p % 16 == 0
        });
        let (func, threads) = if aligned {
            (&self.f.lincomb4, n.div_ceil(4))
        } else {
            (&self.f.lincomb, n)
        };
        let mut b = self.stream.launch_builder(func);
        b.arg(out).arg(&n64).arg(&beta).arg(&k);
        // Unused slots repeat the first input (or pass null) and are never read.
        let pad = terms.first().map(|t| t.1);
        let mut coef = [0f32; 8];
        for (i, slot) in coef.iter_mut().enumerate() {
            match (terms.get(i), pad) {
                (Some((c, x)), _) => {
                    *slot = *c;
                    b.arg(*x);
                }
                (None, Some(x)) => {
                    b.arg(x);
                }
                (None, None) => {
                    b.arg(&0u64);
                }
            }
        }
        for c in &coef {
            b.arg(c);
        }
        // SAFETY: argument types and count match the kernel's signature; all buffers hold n elements (and are
        // 16-byte aligned for lincomb4_f32).
        unsafe { b.launch(launch_cfg(threads)) }
            .map_err(|e| anyhow::anyhow!("lincomb launch failed: {e}"))?;
        Ok(())
    }

    /// Classifier-free guidance `out = uncond + scale * (cond - uncond)`.
    pub fn cfg(
        &self,
        out: &mut CudaSlice<f32>,
        uncond: &CudaSlice<f32>,
        cond: &CudaSlice<f32>,
        scale: f32,
    ) -> Result<()> {
        same_len("cfg", out.len(), uncond.len())?;
        same_len("cfg", out.len(), cond.len())?;
        let n = out.len() as u64;
        let mut b = self.stream.launch_builder(&self.f.cfg);
        b.arg(out).arg(uncond).arg(cond).arg(&scale).arg(&n);
        // SAFETY: matches cfg_f32(float*, const float*, const float*, float, u64).
        unsafe { b.launch(launch_cfg(n as usize)) }
            .map_err(|e| anyhow::anyhow!("cfg launch failed: {e}"))?;
        Ok(())
    }

    /// Standard normal noise, identical to `samplers::noise::fill_normal_host` for the same seed and stream.
    pub fn fill_normal(&self, out: &mut CudaSlice<f32>, seed: u64, stream_id: u64) -> Result<()> {
        let n = out.len() as u64;
        let mut b = self.stream.launch_builder(&self.f.normal);
        b.arg(out).arg(&n).arg(&seed).arg(&stream_id);
        // SAFETY: matches philox_normal_f32(float*, u64, u64, u64).
        unsafe { b.launch(launch_cfg(n.div_ceil(4) as usize)) }
            .map_err(|e| anyhow::anyhow!("noise launch failed: {e}"))?;
        Ok(())
    }

    fn cast<A: cudarc::driver::DeviceRepr, B: cudarc::driver::DeviceRepr>(
        &self,
        f: &CudaFunction,
        out: &mut CudaSlice<A>,
        inp: &CudaSlice<B>,
    ) -> Result<()> {
        same_len("cast", out.len(), inp.len())?;
        let n = out.len() as u64;
        let mut b = self.stream.launch_builder(f);
        b.arg(out).arg(inp).arg(&n);
        // SAFETY: every cast kernel is (out*, const in*, u64) with matching element sizes.
        unsafe { b.launch(launch_cfg(n as usize)) }
            .map_err(|e| anyhow::anyhow!("cast launch failed: {e}"))?;
        Ok(())
    }

    /// f32 -> IEEE half (as raw u16 bits), round to nearest even.
    pub fn f32_to_f16(&self, out: &mut CudaSlice<u16>, inp: &CudaSlice<f32>) -> Result<()> {
        self.cast(&self.f.f32_to_f16, out, inp)
    }
    pub fn f16_to_f32(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<u16>) -> Result<()> {
        self.cast(&self.f.f16_to_f32, out, inp)
    }
    /// f32 -> bfloat16 (raw u16 bits), round to nearest even.
    pub fn f32_to_bf16(&self, out: &mut CudaSlice<u16>, inp: &CudaSlice<f32>) -> Result<()> {
        self.cast(&self.f.f32_to_bf16, out, inp)
    }
    pub fn bf16_to_f32(&self, out: &mut CudaSlice<f32>, inp: &CudaSlice<u16>) -> Result<()> {
        self.cast(&self.f.bf16_to_f32, out, inp)
    }

    fn pack_like(
        &self,
        f: &CudaFunction,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        bchw: [usize; 4],
    ) -> Result<()> {
        let [b_, c, h, w] = bchw;
        if h % 2 != 0 || w % 2 != 0 {
            bail!("Flux latents need even height and width, got {h}x{w}");
        }
        same_len("flux pack", out.len(), b_ * c * h * w)?;
        same_len("flux pack", inp.len(), b_ * c * h * w)?;
        let dims = [b_ as i32, c as i32, h as i32, w as i32];
        let n = out.len();
        let mut b = self.stream.launch_builder(f);
        b.arg(out)
            .arg(inp)
            .arg(&dims[0])
            .arg(&dims[1])
            .arg(&dims[2])
            .arg(&dims[3]);
        // SAFETY: matches flux_(un)pack_f32(float*, const float*, int, int, int, int).
        unsafe { b.launch(launch_cfg(n)) }
            .map_err(|e| anyhow::anyhow!("pack launch failed: {e}"))?;
        Ok(())
    }

    /// [B, C, H, W] -> [B, (H/2)(W/2), 4C].
    pub fn flux_pack(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        bchw: [usize; 4],
    ) -> Result<()> {
        self.pack_like(&self.f.pack, out, inp, bchw)
    }
    /// [B, (H/2)(W/2), 4C] -> [B, C, H, W].
    pub fn flux_unpack(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        bchw: [usize; 4],
    ) -> Result<()> {
        self.pack_like(&self.f.unpack, out, inp, bchw)
    }

    /// Per batch entry b < `batch`: `out[b*out_stride + c*rows + r] = inp[b*in_stride + r*cols + c]`, the
    /// transpose of a `rows x cols` block (strides let the blocks sit inside longer sequences).
    #[allow(clippy::too_many_arguments)]
    pub fn transpose(
        &self,
        out: &mut CudaSlice<f32>,
        inp: &CudaSlice<f32>,
        batch: usize,
        [rows, cols]: [usize; 2],
        in_stride: usize,
        out_stride: usize,
    ) -> Result<()> {
        let block = rows * cols;
        let fits = |len: usize, stride: usize| {
            batch == 0 || (stride >= block && (batch - 1) * stride + block <= len)
        };
        if !fits(inp.len(), in_stride) || !fits(out.len(), out_stride) {
            bail!(
                "transpose of {batch} blocks of {rows}x{cols} (strides {in_stride} -> {out_stride}) does not fit \
                 buffers of {} -> {} values (a pipeline bug)",
                inp.len(),
                out.len()
            );
        }
        let ints = [batch, rows, cols].map(|v| i32::try_from(v).unwrap_or(i32::MAX));
        if ints.contains(&i32::MAX) {
            bail!("transpose dimensions {batch}x{rows}x{cols} are too large");
        }
        let (is, os) = (in_stride as u64, out_stride as u64);
        let mut b = self.stream.launch_builder(&self.f.transpose);
        b.arg(out)
            .arg(inp)
            .arg(&ints[0])
            .arg(&ints[1])
            .arg(&ints[2])
            .arg(&is)
            .arg(&os);
        // SAFETY: matches transpose_f32(float*, const float*, int, int, int, u64, u64); the bounds are checked above.
        unsafe { b.launch(launch_cfg(batch * block)) }
            .map_err(|e| anyhow::anyhow!("transpose launch failed: {e}"))?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow::anyhow!("CUDA stream failed: {e}"))
    }
}
