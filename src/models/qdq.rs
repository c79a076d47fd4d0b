//! Layers in the precisions TensorRT builds, as the ONNX patterns it recognises: plain f32/f16 MatMul; FP8
//! (per-tensor activation Q/DQ, FP8 weight with a per-tensor or per-channel DQ); NVFP4 (FP4 weight with two DQs,
//! activations through `trt::TRT_FP4DynamicQuantize`); INT4 weight-only (blockwise DQ along the reduction axis);
//! and the FP8 attention pattern (Q/DQ on the inputs of both batched matmuls and on the softmax output).
//! Weights arrive in PyTorch's Linear layout [out, in].
use super::ops::Ops;
use crate::onnx::{Attr, DataType, Dim, GraphBuilder, Value};
use crate::quant::LinearPrecision;
use crate::quant::elem::Elem;
use crate::quant::int::{Bits, IntBlocks};
use crate::quant::minifloat::e4m3fn;
use crate::quant::nvfp4;
use crate::quant::policy::{LayerKind, Policy};
use crate::weights::prequant::QuantWeight;
use crate::weights::safetensors_file::Tensor;
use anyhow::{Result, bail};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};

/// A linear layer's weights [out, in] as the model holds them: a checkpoint tensor in its own dtype (mapped, no
/// copy), or f32 values.
pub enum Weight<'a> {
    Tensor {
        weight: &'a Tensor,
        bias: Option<&'a Tensor>,
    },
    F32(LinearWeights<'a>),
}

/// The one quantization-aware linear every model emitter uses (Flux, the text encoders, LLM decoders): the
/// precision policy decides each layer; calibration graphs get an `amax.<key>` output per input activation; FP8,
/// NVFP4 and INT4 layers get their Q/DQ pattern with the calibrated (or default) activation range, computing in f32
/// between casts from and to the graph's dtype; the others stay in the graph's dtype.
pub struct Linears<'a> {
    pub policy: Option<&'a Policy>,
    /// Calibrated input activation absolute maxima by key.
    pub amax: &'a HashMap<String, f32>,
    /// FP8's static activation scale where none was calibrated (None: FP8 layers need a calibration).
    pub fp8_default_amax: Option<f32>,
    /// NVFP4's global activation scale where none was calibrated (its block scales stay dynamic).
    pub nvfp4_default_amax: f32,
    /// Adds the `amax.<key>` outputs of a calibration graph.
    pub calibration: bool,
    calibrated: HashSet<String>,
    /// Layers emitted by precision name ("nvfp4", "fp8", ..., "kept").
    pub counts: HashMap<String, usize>,
    /// Every linear layer emitted, in graph order: what `build --precision auto` measures.
    pub shapes: Vec<crate::quant::auto::LinearShape>,
    /// Rank of the LoRA side path beside each quantized layer (0: none): see [`lora_side_path`].
    pub lora_rank: usize,
    /// Layers whose stored NVFP4 / FP8 codes and scales (a pre-quantized checkpoint's) went in unchanged.
    pub from_checkpoint: usize,
    /// Calibration graphs also get a `chmax.<key>` output per input activation: its absolute maximum per channel
    /// (last axis), which SmoothQuant needs.
    pub channel_calibration: bool,
    /// SmoothQuant for INT8 layers: the migration strength alpha and the calibrated per-channel activation maxima
    /// by key ([`crate::quant::smooth`]); INT8 layers without maxima are not smoothed.
    pub smooth: Option<(f32, &'a HashMap<String, Vec<f32>>)>,
    /// INT8 layers smoothed.
    pub smoothed: usize,
}

impl<'a> Linears<'a> {
    /// An INT8 layer with SmoothQuant: the input times the pre-quantization scale (an explicit Mul before the
    /// activation Q/DQ, which TensorRT fuses into the producer's epilogue), the weight's columns divided by it,
    /// then the W8A8 pattern with the smoothed input's range.
    #[allow(clippy::too_many_arguments)]
    fn smoothed_int8(
        &mut self,
        o: &mut Ops,
        name: &str,
        x: &Value,
        w: &Weight,
        (n, k): (usize, usize),
        alpha: f32,
        act_amax: &[f32],
    ) -> Result<Value> {
        let (wf, bf) = match w {
            Weight::Tensor { weight, bias } => {
                (weight.to_f32()?, bias.map(|b| b.to_f32()).transpose()?)
            }
            Weight::F32(lw) => (lw.weight.to_vec(), lw.bias.map(|b| b.to_vec())),
        };
        let s = crate::quant::smooth::smoothing(act_amax, &wf, n, k, alpha)
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        let ws = s.smooth_weight(&wf);
        let dt = x.dtype;
        let xq = o.cast(&format!("{name}/in_f32"), x, DataType::FLOAT)?;
        let p = o.g.initializer(
            &format!("{name}.pre_quant_scale"),
            DataType::FLOAT,
            &[k as i64],
            float_bytes(&s.pre_quant_scale, DataType::FLOAT),
        )?;
        let xs = o.g.op(
            "Mul",
            &format!("{name}/smooth"),
            &[&xq, &p],
            vec![],
            DataType::FLOAT,
            xq.shape.clone(),
        )?;
        let lw = LinearWeights {
            weight: &ws,
            bias: bf.as_deref(),
            out_features: n,
            in_features: k,
        };
        let y = linear(
            &mut o.g,
            name,
            &xs,
            &lw,
            LinearPrecision::Int8,
            s.input_amax,
        )?;
        let y = if self.lora_rank > 0 {
            lora_side_path(&mut o.g, name, &xq, &y, n, k, self.lora_rank)?
        } else {
            y
        };
        self.smoothed += 1;
        o.cast(&format!("{name}/out"), &y, dt)
    }

    /// Layers decided by `policy` (None: every layer in the graph's dtype), quantized with the ranges in `amax`,
    /// defaulting to `fp8_default_amax` / `nvfp4_default_amax` where a layer has none; `calibration` adds the
    /// calibration outputs.
    pub fn new(
        policy: Option<&'a Policy>,
        amax: &'a HashMap<String, f32>,
        fp8_default_amax: Option<f32>,
        nvfp4_default_amax: f32,
        calibration: bool,
    ) -> Self {
        Self {
            policy,
            amax,
            fp8_default_amax,
            nvfp4_default_amax,
            calibration,
            calibrated: HashSet::new(),
            counts: HashMap::new(),
            shapes: Vec::new(),
            lora_rank: 0,
            from_checkpoint: 0,
            channel_calibration: false,
            smooth: None,
            smoothed: 0,
        }
    }

    /// A linear layer of checkpoint tensors whose node name is also its policy name and calibration key.
    pub fn tensor(
        &mut self,
        o: &mut Ops,
        name: &str,
        x: &Value,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Value> {
        self.linear(o, name, name, name, x, Weight::Tensor { weight, bias })
    }

    /// `y = x W^T + b`: nodes named after `name`, the precision decided for `layer` (the policy's name of it),
    /// calibrated under `key` (projections reading the same activation share one key).
    pub fn linear(
        &mut self,
        o: &mut Ops,
        name: &str,
        layer: &str,
        key: &str,
        x: &Value,
        w: Weight,
    ) -> Result<Value> {
        let (n, k) = match &w {
            Weight::Tensor { weight, .. } => {
                (weight.shape[0], weight.shape.get(1).copied().unwrap_or(0))
            }
            Weight::F32(lw) => (lw.out_features, lw.in_features),
        };
        if self.calibration && self.calibrated.insert(key.to_string()) {
            let xf = o.cast(&format!("amax/{key}/f32"), x, DataType::FLOAT)?;
            let a = o.same("Abs", &format!("amax/{key}/abs"), &[&xf], vec![])?;
            let mut m = o.g.op(
                "ReduceMax",
                &format!("amax.{key}"),
                &[&a],
                vec![("keepdims", Attr::Int(0))],
                DataType::FLOAT,
                vec![],
            )?;
            m.shape = vec![];
            o.g.output(&m);
            if self.channel_calibration {
                let rows = o.i64s(&format!("chmax.{key}.rows"), &[-1, k as i64])?;
                let flat = o.g.op(
                    "Reshape",
                    &format!("chmax/{key}/rows"),
                    &[&a, &rows],
                    vec![],
                    DataType::FLOAT,
                    vec![Dim::Sym(format!("chmax_{key}_rows")), Dim::Fixed(k as i64)],
                )?;
                let axes = o.i64s(&format!("chmax.{key}.axes"), &[0])?;
                let c = o.g.op(
                    "ReduceMax",
                    &format!("chmax.{key}"),
                    &[&flat, &axes],
                    vec![("keepdims", Attr::Int(0))],
                    DataType::FLOAT,
                    fixed(&[k]),
                )?;
                o.g.output(&c);
            }
        }
        // Block formats need whole blocks along the input features; other layers stay high precision (as ModelOpt
        // leaves them).
        let decision = self
            .policy
            .and_then(|p| p.decide(layer, LayerKind::Linear))
            .filter(|p| match p {
                LinearPrecision::Nvfp4 => k % 16 == 0,
                LinearPrecision::Int4 { block } => k % block == 0,
                _ => true,
            });
        let label = match decision {
            Some(p) if p != LinearPrecision::F32 && p != LinearPrecision::F16 => p.name(),
            _ => "kept".to_string(),
        };
        *self.counts.entry(label).or_default() += 1;
        self.shapes.push(crate::quant::auto::LinearShape {
            layer: layer.to_string(),
            out_features: n,
            in_features: k,
        });
        let smooth = match (decision, self.smooth) {
            (Some(LinearPrecision::Int8), Some((alpha, ch))) => {
                ch.get(key).filter(|a| a.len() == k).map(|a| (alpha, a))
            }
            _ => None,
        };
        if let Some((alpha, act)) = smooth {
            return self.smoothed_int8(o, name, x, &w, (n, k), alpha, act);
        }
        match (decision, w) {
            // Checkpoint tensors compute in the graph's dtype unless quantized.
            (
                None | Some(LinearPrecision::F32 | LinearPrecision::F16),
                Weight::Tensor { weight, bias },
            ) => o.linear(name, x, weight, bias),
            (Some(LinearPrecision::F16), Weight::F32(lw)) => {
                // Weights and the GEMM in f16, activations cast on the way in and out.
                let dt = x.dtype;
                let xh = o.cast(&format!("{name}/to_f16"), x, DataType::FLOAT16)?;
                let y = linear(&mut o.g, name, &xh, &lw, LinearPrecision::F16, 0.0)?;
                o.cast(&format!("{name}/to_f32"), &y, dt)
            }
            (None | Some(LinearPrecision::F32), Weight::F32(lw)) => {
                linear(&mut o.g, name, x, &lw, LinearPrecision::F32, 0.0)
            }
            (Some(p), w) => {
                // A pre-quantized checkpoint's activation scale stands in for a calibration it lacks.
                let stored_amax = match &w {
                    Weight::Tensor { weight, .. } => weight
                        .quant
                        .as_ref()
                        .and_then(|q| q.input_scale)
                        .filter(|s| s.is_finite() && *s > 0.0)
                        .and_then(|s| match p {
                            LinearPrecision::Nvfp4 => Some(s * 6.0 * 448.0),
                            LinearPrecision::Fp8 | LinearPrecision::Fp8PerChannel => {
                                Some(s * 448.0)
                            }
                            _ => None,
                        }),
                    Weight::F32(_) => None,
                };
                let amax = match (self.amax.get(key).copied().or(stored_amax), p) {
                    (Some(a), _) => a,
                    (None, LinearPrecision::Nvfp4) => self.nvfp4_default_amax,
                    (None, _) => self.fp8_default_amax.ok_or_else(|| {
                        anyhow::anyhow!(
                            "no calibrated activation amax for layer '{key}' ({} export needs static scales): run \
                             the calibration graph over calibration prompts and pass its merged amax map",
                            p.name()
                        )
                    })?,
                };
                // The Q/DQ patterns take f32 activations; other compute types cast around them.
                let dt = x.dtype;
                let xq = o.cast(&format!("{name}/in_f32"), x, DataType::FLOAT)?;
                let g = &mut o.g;
                let y = match w {
                    Weight::F32(lw) => linear(g, name, &xq, &lw, p, amax)?,
                    Weight::Tensor { weight, bias }
                        if weight
                            .quant
                            .as_ref()
                            .is_some_and(|q| stored_fits(&q.weight, p)) =>
                    {
                        let bf = bias.map(|b| b.to_f32()).transpose()?;
                        let q = weight.quant.as_ref().map(|q| &q.weight);
                        self.from_checkpoint += 1;
                        tracing::debug!(
                            "{name}: the checkpoint's {} weights go in as stored",
                            p.name()
                        );
                        linear_stored(g, name, &xq, q, bf.as_deref(), n, k, amax)?
                    }
                    Weight::Tensor { weight, bias } => {
                        if weight.quant.is_some() {
                            tracing::debug!(
                                "{name}: the checkpoint's quantized weights are not {}: re-quantized from their \
                                 dequantized values",
                                p.name()
                            );
                        }
                        let bf = bias.map(|b| b.to_f32()).transpose()?;
                        let d = &weight.data[..];
                        let aligned = |align: usize| (d.as_ptr() as usize).is_multiple_of(align);
                        match (p, weight.dtype) {
                            // Quantized straight from the mapped checkpoint in its own element type: no f32 copy.
                            (LinearPrecision::Nvfp4, DataType::BFLOAT16) if aligned(2) => {
                                let v: &[half::bf16] = bytemuck::cast_slice(d);
                                linear_nvfp4(g, name, &xq, v, bf.as_deref(), n, k, amax)?
                            }
                            (LinearPrecision::Nvfp4, DataType::FLOAT16) if aligned(2) => {
                                let v: &[half::f16] = bytemuck::cast_slice(d);
                                linear_nvfp4(g, name, &xq, v, bf.as_deref(), n, k, amax)?
                            }
                            (LinearPrecision::Nvfp4, _) => {
                                let wf = weight.to_f32()?;
                                linear_nvfp4(g, name, &xq, &wf, bf.as_deref(), n, k, amax)?
                            }
                            (
                                LinearPrecision::Fp8 | LinearPrecision::Fp8PerChannel,
                                DataType::BFLOAT16,
                            ) if aligned(2) => {
                                let v: &[half::bf16] = bytemuck::cast_slice(d);
                                linear_fp8(g, name, &xq, v, bf.as_deref(), (n, k), p, amax)?
                            }
                            (
                                LinearPrecision::Fp8 | LinearPrecision::Fp8PerChannel,
                                DataType::FLOAT16,
                            ) if aligned(2) => {
                                let v: &[half::f16] = bytemuck::cast_slice(d);
                                linear_fp8(g, name, &xq, v, bf.as_deref(), (n, k), p, amax)?
                            }
                            _ => {
                                let wf = weight.to_f32()?;
                                let lw = LinearWeights {
                                    weight: &wf,
                                    bias: bf.as_deref(),
                                    out_features: n,
                                    in_features: k,
                                };
                                linear(g, name, &xq, &lw, p, amax)?
                            }
                        }
                    }
                };
                let y = if self.lora_rank > 0 {
                    lora_side_path(&mut o.g, name, &xq, &y, n, k, self.lora_rank)?
                } else {
                    y
                };
                o.cast(&format!("{name}/out"), &y, dt)
            }
        }
    }
}

/// A LoRA beside a quantized layer, as nunchaku keeps it beside its 4-bit weights: `y + (x A^T) B^T` in f32 with
/// `A = {name}.lora_down` [rank, in] and `B = {name}.lora_up` [out, rank], zero as built. LoRAs of total rank up
/// to `rank` switch by replacing A and B (ONNX Runtime initializer overrides, TensorRT refit) while the quantized
/// weights stay as they are; it costs `2 * tokens * rank * (in + out)` FLOPs per layer and step.
pub fn lora_side_path(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    y: &Value,
    out_features: usize,
    in_features: usize,
    rank: usize,
) -> Result<Value> {
    let f32t = DataType::FLOAT;
    let zeros = |n: usize| Bytes::from(vec![0u8; n * 4]);
    let a = g.initializer(
        &format!("{name}.lora_down"),
        f32t,
        &[rank as i64, in_features as i64],
        zeros(rank * in_features),
    )?;
    let b = g.initializer(
        &format!("{name}.lora_up"),
        f32t,
        &[out_features as i64, rank as i64],
        zeros(rank * out_features),
    )?;
    let at = g.op(
        "Transpose",
        &format!("{name}/lora_down_t"),
        &[&a],
        vec![("perm", Attr::Ints(vec![1, 0]))],
        f32t,
        fixed(&[in_features, rank]),
    )?;
    let bt = g.op(
        "Transpose",
        &format!("{name}/lora_up_t"),
        &[&b],
        vec![("perm", Attr::Ints(vec![1, 0]))],
        f32t,
        fixed(&[rank, out_features]),
    )?;
    let h = g.op(
        "MatMul",
        &format!("{name}/lora_down"),
        &[x, &at],
        vec![],
        f32t,
        with_last(&x.shape, rank),
    )?;
    let d = g.op(
        "MatMul",
        &format!("{name}/lora_up"),
        &[&h, &bt],
        vec![],
        f32t,
        y.shape.clone(),
    )?;
    g.op(
        "Add",
        &format!("{name}/lora_add"),
        &[y, &d],
        vec![],
        f32t,
        y.shape.clone(),
    )
}

/// The float type a linear layer's activations flow in.
pub fn float_type(p: LinearPrecision) -> DataType {
    if p == LinearPrecision::F16 {
        DataType::FLOAT16
    } else {
        DataType::FLOAT
    }
}

pub struct LinearWeights<'a> {
    /// [out, in], row-major.
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub out_features: usize,
    pub in_features: usize,
}

/// `w` [rows, cols] -> [cols, rows], in square tiles (a strided write per element thrashes the cache on the large
/// matrices of full-size models) and in parallel over bands of output rows.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE: usize = 32;
    let mut t = vec![0f32; w.len()];
    if rows == 0 || cols == 0 {
        return t;
    }
    t.par_chunks_mut(rows * TILE)
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * TILE;
            let width = out.len() / rows;
            for r0 in (0..rows).step_by(TILE) {
                for r in r0..(r0 + TILE).min(rows) {
                    let src = &w[r * cols + c0..r * cols + c0 + width];
                    for (dc, v) in src.iter().enumerate() {
                        out[dc * rows + r] = *v;
                    }
                }
            }
        });
    t
}

/// `f(r, w[r][c])` for `w` [rows, cols] (f32, f16 or bf16, widened to f32 a tile row at a time), written
/// transposed ([cols, rows]): the conversion (f16 rounding, FP8 encoding) and the transpose in one pass, in 64 x 64
/// tiles (read a tile's rows, write its columns contiguously) and in parallel over bands of output rows; with AVX2
/// where the CPU has it (the FP8 division is the cost).
fn transpose_map<S: Elem, T: Copy + Default + Send + Sync>(
    w: &[S],
    rows: usize,
    cols: usize,
    f: impl Fn(usize, f32) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut t = vec![T::default(); w.len()];
    if rows == 0 || cols == 0 {
        return t;
    }
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::is_x86_feature_detected!("avx2");
    t.par_chunks_mut(rows * TILE)
        .enumerate()
        .for_each(|(band, out)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { transpose_band_avx2(w, rows, cols, band, out, &f) };
            }
            transpose_band(w, rows, cols, band, out, &f)
        });
    t
}

const TILE: usize = 64;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn transpose_band_avx2<S: Elem, T: Copy + Default>(
    w: &[S],
    rows: usize,
    cols: usize,
    band: usize,
    out: &mut [T],
    f: &impl Fn(usize, f32) -> T,
) {
    transpose_band(w, rows, cols, band, out, f)
}

/// Output rows `band * TILE..` (input columns) of [`transpose_map`].
#[inline(always)]
fn transpose_band<S: Elem, T: Copy + Default>(
    w: &[S],
    rows: usize,
    cols: usize,
    band: usize,
    out: &mut [T],
    f: &impl Fn(usize, f32) -> T,
) {
    let c0 = band * TILE;
    let width = out.len() / rows;
    let mut tile = [[T::default(); TILE]; TILE];
    let mut wide = [0f32; TILE];
    let mut row = [T::default(); TILE];
    for r0 in (0..rows).step_by(TILE) {
        let height = TILE.min(rows - r0);
        for dr in 0..height {
            let r = r0 + dr;
            S::widen(&w[r * cols + c0..r * cols + c0 + width], &mut wide);
            for (d, v) in row.iter_mut().zip(&wide[..width]) {
                *d = f(r, *v);
            }
            for (col, v) in tile.iter_mut().zip(&row[..width]) {
                col[dr] = *v;
            }
        }
        for (dc, col) in tile.iter().enumerate().take(width) {
            out[dc * rows + r0..dc * rows + r0 + height].copy_from_slice(&col[..height]);
        }
    }
}

/// `w` [rows, cols] transposed into initializer bytes of `dtype` (FLOAT, FLOAT16 or BFLOAT16).
fn transposed_float_bytes(w: &[f32], rows: usize, cols: usize, dtype: DataType) -> Bytes {
    match dtype {
        DataType::FLOAT16 => {
            let t = transpose_map(w, rows, cols, |_, v| half::f16::from_f32(v));
            Bytes::from(bytemuck::cast_slice::<half::f16, u8>(&t).to_vec())
        }
        DataType::BFLOAT16 => {
            let t = transpose_map(w, rows, cols, |_, v| half::bf16::from_f32(v));
            Bytes::from(bytemuck::cast_slice::<half::bf16, u8>(&t).to_vec())
        }
        _ => {
            let t = transpose_map(w, rows, cols, |_, v| v);
            Bytes::from(bytemuck::cast_slice::<f32, u8>(&t).to_vec())
        }
    }
}

fn float_bytes(v: &[f32], dtype: DataType) -> Bytes {
    Bytes::from(match dtype {
        DataType::FLOAT16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect::<Vec<u8>>(),
        DataType::BFLOAT16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect::<Vec<u8>>(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    })
}

fn with_last(shape: &[Dim], last: usize) -> Vec<Dim> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = Dim::Fixed(last as i64);
    }
    s
}

fn fixed(d: &[usize]) -> Vec<Dim> {
    d.iter().map(|&v| Dim::Fixed(v as i64)).collect()
}

fn amax<T: Elem>(v: &[T]) -> f32 {
    use rayon::prelude::*;
    // max is exact in any order: the parallel fold gives the serial result.
    v.par_chunks(1 << 16)
        .map(T::abs_max)
        .reduce(|| 0f32, f32::max)
}

/// Per-tensor FP8 Q/DQ of an activation with scale amax/448: TensorRT fuses it into the consuming op.
pub fn fp8_qdq(g: &mut GraphBuilder, name: &str, x: &Value, act_amax: f32) -> Result<Value> {
    static_qdq(
        g,
        name,
        x,
        act_amax.max(1e-12) / 448.0,
        DataType::FLOAT8E4M3FN,
    )
}

/// Per-tensor INT8 Q/DQ of an activation with scale amax/127 (symmetric, zero point 0).
pub fn int8_qdq(g: &mut GraphBuilder, name: &str, x: &Value, act_amax: f32) -> Result<Value> {
    static_qdq(
        g,
        name,
        x,
        crate::quant::int::scale(act_amax, crate::quant::int::Bits::Int8),
        DataType::INT8,
    )
}

/// Q/DQ through `code` (FLOAT8E4M3FN or INT8) with one static scale and a zero point of 0.
fn static_qdq(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    scale: f32,
    code: DataType,
) -> Result<Value> {
    let s = g.initializer(
        &format!("{name}.scale"),
        x.dtype,
        &[],
        float_bytes(&[scale], x.dtype),
    )?;
    let zp = g.initializer(
        &format!("{name}.zero_point"),
        code,
        &[],
        Bytes::from(vec![0u8]),
    )?;
    let q = g.op(
        "QuantizeLinear",
        &format!("{name}/q"),
        &[x, &s, &zp],
        vec![],
        code,
        x.shape.clone(),
    )?;
    g.op(
        "DequantizeLinear",
        &format!("{name}/dq"),
        &[&q, &s],
        vec![],
        x.dtype,
        x.shape.clone(),
    )
}

/// INT8 weight [n, k] as [k, n] with one scale per output channel ([`crate::quant::int`]'s rounding).
fn int8_weight(
    g: &mut GraphBuilder,
    name: &str,
    w: &[f32],
    k: usize,
    n: usize,
    float: DataType,
) -> Result<Value> {
    use crate::quant::int::{Bits, Granularity, quantize};
    let (codes, scales) = quantize(w, k, Granularity::Channel, Bits::Int8);
    let mut t = vec![0u8; n * k];
    for (r, row) in codes.chunks(k.max(1)).enumerate() {
        for (c, v) in row.iter().enumerate() {
            t[c * n + r] = *v as u8;
        }
    }
    let wq = g.initializer(
        &format!("{name}.weight"),
        DataType::INT8,
        &[k as i64, n as i64],
        Bytes::from(t),
    )?;
    let sw = g.initializer(
        &format!("{name}.weight_scale"),
        float,
        &[n as i64],
        float_bytes(&scales, float),
    )?;
    g.op(
        "DequantizeLinear",
        &format!("{name}/weight_dq"),
        &[&wq, &sw],
        vec![("axis", Attr::Int(1))],
        float,
        fixed(&[k, n]),
    )
}

/// FP8 weight of `w` [n, k] (torch's [out, in]) stored transposed as [k, n], with a per-tensor or
/// per-output-channel scale (amax / 448 over the tensor or over the output channel's row).
fn fp8_weight<T: Elem>(
    g: &mut GraphBuilder,
    name: &str,
    w: &[T],
    k: usize,
    n: usize,
    per_channel: bool,
    float: DataType,
) -> Result<Value> {
    use rayon::prelude::*;
    let scales: Vec<f32> = if per_channel {
        w.par_chunks(k.max(1))
            .map(|row| T::abs_max(row).max(1e-12) / 448.0)
            .collect()
    } else {
        vec![amax(w).max(1e-12) / 448.0]
    };
    let codes = transpose_map(w, n, k, |row, v| {
        e4m3fn(v / scales[if per_channel { row } else { 0 }], true)
    });
    fp8_initializers(g, name, codes, &scales, per_channel, k, n, float)
}

/// The FP8 weight [k, n] of E4M3 `codes` with per-tensor (one) or per-output-channel (`n`) `scales`, and its DQ.
#[allow(clippy::too_many_arguments)]
fn fp8_initializers(
    g: &mut GraphBuilder,
    name: &str,
    codes: Vec<u8>,
    scales: &[f32],
    per_channel: bool,
    k: usize,
    n: usize,
    float: DataType,
) -> Result<Value> {
    let wq = g.initializer(
        &format!("{name}.weight"),
        DataType::FLOAT8E4M3FN,
        &[k as i64, n as i64],
        Bytes::from(codes),
    )?;
    let scale_dims: &[i64] = if per_channel { &[n as i64] } else { &[] };
    let sw = g.initializer(
        &format!("{name}.weight_scale"),
        float,
        scale_dims,
        float_bytes(scales, float),
    )?;
    let attrs = if per_channel {
        vec![("axis", Attr::Int(1))]
    } else {
        vec![]
    };
    g.op(
        "DequantizeLinear",
        &format!("{name}/weight_dq"),
        &[&wq, &sw],
        attrs,
        float,
        fixed(&[k, n]),
    )
}

/// Symmetric INT4 weight [k, n] in blocks of `block` along k (the reduction axis): scale = block amax / 7.
fn int4_weight(
    g: &mut GraphBuilder,
    name: &str,
    wt: &[f32],
    k: usize,
    n: usize,
    block: usize,
    float: DataType,
) -> Result<Value> {
    if block == 0 || !k.is_multiple_of(block) {
        bail!("{name}: INT4 block size {block} must divide in_features {k}");
    }
    let kb = k / block;
    let mut scales = vec![0f32; kb * n];
    for b in 0..kb {
        for c in 0..n {
            let m = (b * block..(b + 1) * block).fold(0f32, |m, r| m.max(wt[r * n + c].abs()));
            scales[b * n + c] = if m > 0.0 { m / 7.0 } else { 1.0 };
        }
    }
    let codes: Vec<u8> = wt
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = scales[(i / n / block) * n + i % n];
            ((v / s).round_ties_even().clamp(-8.0, 7.0) as i8) as u8 & 0xF
        })
        .collect();
    let wq = g.initializer(
        &format!("{name}.weight"),
        DataType::INT4,
        &[k as i64, n as i64],
        Bytes::from(crate::quant::minifloat::pack_nibbles(&codes)),
    )?;
    let sw = g.initializer(
        &format!("{name}.weight_scale"),
        float,
        &[kb as i64, n as i64],
        float_bytes(&scales, float),
    )?;
    let attrs = vec![
        ("axis", Attr::Int(0)),
        ("block_size", Attr::Int(block as i64)),
    ];
    g.op(
        "DequantizeLinear",
        &format!("{name}/weight_dq"),
        &[&wq, &sw],
        attrs,
        float,
        fixed(&[k, n]),
    )
}

/// An [`IntBlocks`] matrix as INT4 blocked DQs, the one weight-only form both TensorRT and ONNX Runtime's CUDA
/// provider run (TensorRT has no INT8 weight-only GEMM, and its builder keeps a 16-bit copy of an INT8 weight-only
/// matrix beside the codes; ONNX Runtime's CUDA provider has no blocked INT8 DQ): INT4 codes as they are, 8-bit
/// codes as two INT4 halves ([`split_int8`]): a high part under 16 times the scales and a low one.
struct Int4Parts {
    /// (name suffix, codes [rows, cols] in -8..=7, the factor on the matrix's block scales).
    parts: Vec<(&'static str, Vec<i8>, f32)>,
    /// [rows, cols / block]: added to every weight of its block.
    offsets: Option<Vec<f32>>,
}

fn int4_parts(w: &IntBlocks) -> Int4Parts {
    match w.bits {
        Bits::Int4 => Int4Parts {
            parts: vec![("", w.codes.clone(), 1.0)],
            offsets: w.offsets.clone(),
        },
        Bits::Int8 => {
            let split = split_int8(w);
            Int4Parts {
                parts: vec![(".high", split.high, 16.0), (".low", split.low, 1.0)],
                offsets: split.offsets,
            }
        }
    }
}

/// 8-bit codes as two INT4 codes, exactly: `q - c = 16 * high + low`, both in -8..=7, where the shift `c` is 0 when
/// every code lies in -136..=119 (Q6_K's -32..=31 do) and 8 otherwise (Q8_0's -127..=127), which then joins the
/// block offsets as `c * scale`.
struct Int8Split {
    high: Vec<i8>,
    low: Vec<i8>,
    offsets: Option<Vec<f32>>,
}

fn split_int8(w: &IntBlocks) -> Int8Split {
    let shift: i16 = if w.codes.iter().all(|&q| q <= 119) {
        0
    } else {
        8
    };
    let (mut high, mut low) = (
        Vec::with_capacity(w.codes.len()),
        Vec::with_capacity(w.codes.len()),
    );
    for &q in &w.codes {
        let q = q as i16 - shift;
        let lo = (q + 8).rem_euclid(16) - 8;
        high.push(((q - lo) / 16) as i8);
        low.push(lo as i8);
    }
    let offsets = match (shift, &w.offsets) {
        (0, o) => o.clone(),
        (_, o) => {
            let shifts = w.scales.iter().map(|s| shift as f32 * s);
            Some(match o {
                Some(o) => o.iter().zip(shifts).map(|(o, e)| o + e).collect(),
                None => shifts.collect(),
            })
        }
    };
    Int8Split { high, low, offsets }
}

/// An 8-bit [`IntBlocks`] matrix as one INT4 matrix [rows, 2 * cols] under one scale per block, as compact as INT8
/// with its scales (9 bits a weight for Q6_K's blocks of 16, against 10 for two halves with scales of their own):
/// each block of `block` codes becomes `2 * block`, the low halves then the high ones ([`split_int8`]), under
/// 16 times the block's scale; the activations multiplying it are each block divided by 16, then the block itself
/// ([`sixteenths_then_block`]).
fn interleaved_int8(w: &IntBlocks) -> (Vec<i8>, Option<Vec<f32>>) {
    let split = split_int8(w);
    let mut codes = Vec::with_capacity(2 * w.codes.len());
    for (lo, hi) in split
        .low
        .chunks_exact(w.block)
        .zip(split.high.chunks_exact(w.block))
    {
        codes.extend_from_slice(lo);
        codes.extend_from_slice(hi);
    }
    (codes, split.offsets)
}

/// A blocked DQ's scales, laid out as its codes' blocks: the values, or INT8 multiples of one step per `group`
/// blocks under a DQ of their own (blocks with [`crate::quant::int::ScaleSteps`], in graphs for TensorRT): 8 bits
/// a block instead of 16.
enum DqScales {
    Values(Vec<f32>),
    Steps {
        multiples: Vec<i8>,
        steps: Vec<f32>,
        group: usize,
    },
}

impl DqScales {
    /// `w`'s block scales times `times` (exact: a power of two), as steps where `w` has them and `stepped`.
    fn of(w: &IntBlocks, times: f32, stepped: bool) -> Self {
        match (&w.steps, stepped) {
            (Some(st), true) => DqScales::Steps {
                multiples: st.multiples.clone(),
                steps: st.steps.iter().map(|s| times * s).collect(),
                group: st.group,
            },
            _ => DqScales::Values(w.scales.iter().map(|s| times * s).collect()),
        }
    }

    /// From [rows, blocks] to [blocks, rows].
    fn transposed(self, rows: usize, blocks: usize) -> Self {
        match self {
            DqScales::Values(v) => DqScales::Values(transpose(&v, rows, blocks)),
            DqScales::Steps {
                multiples,
                steps,
                group,
            } => DqScales::Steps {
                multiples: transpose_codes(&multiples, rows, blocks),
                steps: transpose(&steps, rows, blocks / group),
                group,
            },
        }
    }
}

/// `x` reshaped to `lead` (its own leading dimensions, kept as they are by Reshape's 0) followed by `last`.
fn reshape_last(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    lead: &[Dim],
    last: &[usize],
) -> Result<Value> {
    let mut target = vec![0i64; lead.len()];
    target.extend(last.iter().map(|&d| d as i64));
    let target = g.const_i64(&format!("{name}.shape"), &[target.len() as i64], &target)?;
    let mut shape = lead.to_vec();
    shape.extend(last.iter().map(|&d| Dim::Fixed(d as i64)));
    g.op("Reshape", name, &[x, &target], vec![], x.dtype, shape)
}

/// `x` [.., k] as [.., k / block, block], with `x`'s leading dimensions and k.
fn split_blocks(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    block: usize,
) -> Result<(Value, Vec<Dim>, usize)> {
    let Some((&Dim::Fixed(k), lead)) = x.shape.split_last() else {
        bail!("{name}: the last axis must be fixed");
    };
    let k = k as usize;
    let blocks = reshape_last(g, &format!("{name}/blocks"), x, lead, &[k / block, block])?;
    Ok((blocks, lead.to_vec(), k))
}

/// `x` [.., k] as [.., 2k], each block of `block` values as `[block / 16, block]`: what [`interleaved_int8`]'s
/// matrix multiplies (dividing by 16 rather than multiplying keeps f16 activations from overflowing).
fn sixteenths_then_block(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    block: usize,
) -> Result<Value> {
    let (blocks, lead, k) = split_blocks(g, &format!("{name}/halves"), x, block)?;
    let sixteenth = g.initializer(
        &format!("{name}.sixteenth"),
        x.dtype,
        &[],
        float_bytes(&[1.0 / 16.0], x.dtype),
    )?;
    let small = g.op(
        "Mul",
        &format!("{name}/sixteenths"),
        &[&blocks, &sixteenth],
        vec![],
        x.dtype,
        blocks.shape.clone(),
    )?;
    let pairs = g.op(
        "Concat",
        &format!("{name}/block_pairs"),
        &[&small, &blocks],
        vec![("axis", Attr::Int(-1))],
        x.dtype,
        with_last(&blocks.shape, 2 * block),
    )?;
    reshape_last(g, &format!("{name}/pairs"), &pairs, &lead, &[2 * k])
}

/// Sums of each `block` values along the last axis of `x` [.., k] -> [.., k / block]: what a block's offset
/// multiplies.
fn block_sums(g: &mut GraphBuilder, name: &str, x: &Value, block: usize) -> Result<Value> {
    let (split, _, k) = split_blocks(g, name, x, block)?;
    let axes = g.const_i64(&format!("{name}.block_axes"), &[1], &[-1])?;
    g.op(
        "ReduceSum",
        &format!("{name}/block_sums"),
        &[&split, &axes],
        vec![("keepdims", Attr::Int(0))],
        x.dtype,
        with_last(&x.shape, k / block),
    )
}

fn add(g: &mut GraphBuilder, name: &str, a: &Value, b: &Value) -> Result<Value> {
    g.op("Add", name, &[a, b], vec![], a.dtype, a.shape.clone())
}

/// The sum of `each(part)` over the parts of a split matrix.
fn sum_parts<T>(
    g: &mut GraphBuilder,
    name: &str,
    parts: &[T],
    each: impl Fn(&mut GraphBuilder, usize, &T) -> Result<Value>,
) -> Result<Value> {
    let mut sum: Option<Value> = None;
    for (i, p) in parts.iter().enumerate() {
        let r = each(g, i, p)?;
        sum = Some(match sum {
            Some(s) => add(g, &format!("{name}/part{i}_sum"), &s, &r)?,
            None => r,
        });
    }
    sum.ok_or_else(|| anyhow::anyhow!("{name}: no blocks"))
}

/// `sum_i input_i @ w_i` over the (input, weight [k_i, n]) pairs plus `blocksum(xc) @ offsets` ([k / block, n])
/// where given, in `xc`'s type.
fn block_products(
    g: &mut GraphBuilder,
    name: &str,
    xc: &Value,
    products: &[(Value, Value)],
    offsets: Option<&Value>,
    block: usize,
    out_shape: Vec<Dim>,
) -> Result<Value> {
    let mut y = sum_parts(g, name, products, |g, i, (input, w)| {
        g.op(
            "MatMul",
            &format!("{name}/part{i}"),
            &[input, w],
            vec![],
            xc.dtype,
            out_shape.clone(),
        )
    })?;
    if let Some(o) = offsets {
        let sums = block_sums(g, name, xc, block)?;
        let shift = g.op(
            "MatMul",
            &format!("{name}/offsets"),
            &[&sums, o],
            vec![],
            xc.dtype,
            out_shape,
        )?;
        y = add(g, &format!("{name}/offset_add"), &y, &shift)?;
    }
    Ok(y)
}

/// `y = x @ W^T (+ b)` for weights held as INT4/INT8 blocks ([`IntBlocks`], a GGUF's formats): TensorRT's
/// weight-only pattern (W4A16) of every [`Int4Parts`] part, codes transposed to [k, n] under a blocked DQ along k,
/// plus `blocksum(x) @ offsets` where blocks have offsets (asymmetric formats, 8-bit codes): a product 1/block the
/// layer's size. Products compute in `compute` (f16; f32 for models whose activations outgrow it), which also
/// stores the scales and offsets; `x` and `y` are f32.
pub fn linear_int_blocks(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    w: &IntBlocks,
    bias: Option<&[f32]>,
    compute: DataType,
    int4_only: bool,
) -> Result<Value> {
    let (n, k, block) = (w.rows, w.cols, w.block);
    let kb = k / block;
    if x.dtype != DataType::FLOAT {
        bail!("{name}: input is {}, INT blocks take f32", x.dtype);
    }
    let out_shape = with_last(&x.shape, n);
    let xc = g.cast(&format!("{name}/in"), x, compute)?;
    // 8-bit codes interleaved into one INT4 matrix over twice the inputs; INT4 codes as they are.
    let (input, codes, times, rows_k, dq_block, offsets) = match w.bits {
        Bits::Int8 => {
            let (codes, offsets) = interleaved_int8(w);
            let input = sixteenths_then_block(g, name, &xc, block)?;
            (input, codes, 16.0, 2 * k, 2 * block, offsets)
        }
        Bits::Int4 => (
            xc.clone(),
            w.codes.clone(),
            1.0,
            k,
            block,
            w.offsets.clone(),
        ),
    };
    let wdq = blocked_dq(
        g,
        name,
        &transpose_codes(&codes, n, rows_k),
        DqScales::of(w, times, !int4_only).transposed(n, kb),
        Bits::Int4,
        [rows_k, n],
        0,
        dq_block,
        compute,
    )?;
    let offsets = match &offsets {
        Some(o) => Some(g.initializer(
            &format!("{name}.weight_offset"),
            compute,
            &[kb as i64, n as i64],
            float_bytes(&transpose(o, n, kb), compute),
        )?),
        None => None,
    };
    let y = block_products(
        g,
        name,
        &xc,
        &[(input, wdq)],
        offsets.as_ref(),
        block,
        out_shape,
    )?;
    let y = g.cast(&format!("{name}/out"), &y, DataType::FLOAT)?;
    match bias {
        Some(b) => {
            let bv = g.initializer(
                &format!("{name}.bias"),
                DataType::FLOAT,
                &[n as i64],
                float_bytes(b, DataType::FLOAT),
            )?;
            add(g, &format!("{name}/bias"), &y, &bv)
        }
        None => Ok(y),
    }
}

/// An embedding table [rows, cols] kept in [`Int4Parts`]: its parts' DQs (in `compute`) and offsets [rows,
/// cols / block], for the lookup ([`BlockTable::lookup`]) and a tied LM head ([`BlockTable::head`]), which share
/// them (TensorRT stores the codes once for both).
pub struct BlockTable {
    parts: Vec<Value>,
    offsets: Option<Value>,
    block: usize,
    cols: usize,
    rows: usize,
}

impl BlockTable {
    /// With `int4_only` (graphs ONNX Runtime's CUDA provider runs, which has no blocked INT8 DQ) 8-bit codes are
    /// split into [`Int4Parts`]; otherwise an 8-bit table stays one INT8 DQ, which TensorRT-RTX's builder stores
    /// compactly for the lookup and the head (the split table it stores about 1.2 bytes a weight larger).
    pub fn new(
        g: &mut GraphBuilder,
        name: &str,
        w: &IntBlocks,
        compute: DataType,
        int4_only: bool,
    ) -> Result<Self> {
        let (rows, cols, kb) = (w.rows, w.cols, w.cols / w.block);
        let split = if w.bits == Bits::Int8 && w.offsets.is_none() && !int4_only {
            Int4Parts {
                parts: vec![("", w.codes.clone(), 1.0)],
                offsets: None,
            }
        } else {
            int4_parts(w)
        };
        let bits = if split.parts.len() == 1 {
            w.bits
        } else {
            Bits::Int4
        };
        let mut parts = Vec::new();
        for (suffix, codes, times) in &split.parts {
            let part = format!("{name}{suffix}");
            parts.push(blocked_dq(
                g,
                &part,
                codes,
                DqScales::of(w, *times, !int4_only),
                bits,
                [rows, cols],
                1,
                w.block,
                compute,
            )?);
        }
        let offsets = match &split.offsets {
            Some(o) => Some(g.initializer(
                &format!("{name}.weight_offset"),
                compute,
                &[rows as i64, kb as i64],
                float_bytes(o, compute),
            )?),
            None => None,
        };
        Ok(BlockTable {
            parts,
            offsets,
            block: w.block,
            cols,
            rows,
        })
    }

    /// Rows `ids` [1, seq] of the table, f32 [1, seq, cols].
    pub fn lookup(&self, g: &mut GraphBuilder, name: &str, ids: &Value) -> Result<Value> {
        let seq = ids.shape.get(1).cloned().unwrap_or(Dim::Sym("seq".into()));
        let compute = self.parts[0].dtype;
        let shape = vec![Dim::Fixed(1), seq.clone(), Dim::Fixed(self.cols as i64)];
        let mut e = sum_parts(g, name, &self.parts, |g, i, p| {
            g.op(
                "Gather",
                &format!("{name}/part{i}"),
                &[p, ids],
                vec![],
                compute,
                shape.clone(),
            )
        })?;
        if let Some(o) = &self.offsets {
            let kb = self.cols / self.block;
            let per_block = g.op(
                "Gather",
                &format!("{name}/offsets"),
                &[o, ids],
                vec![],
                compute,
                vec![Dim::Fixed(1), seq.clone(), Dim::Fixed(kb as i64)],
            )?;
            let last = g.const_i64(&format!("{name}.offset_axis"), &[1], &[-1])?;
            let per_block = g.op(
                "Unsqueeze",
                &format!("{name}/offsets_col"),
                &[&per_block, &last],
                vec![],
                compute,
                vec![
                    Dim::Fixed(1),
                    seq.clone(),
                    Dim::Fixed(kb as i64),
                    Dim::Fixed(1),
                ],
            )?;
            let blocks = g.const_i64(
                &format!("{name}.blocks_shape"),
                &[4],
                &[0, 0, kb as i64, self.block as i64],
            )?;
            let split = g.op(
                "Reshape",
                &format!("{name}/blocks"),
                &[&e, &blocks],
                vec![],
                compute,
                vec![
                    Dim::Fixed(1),
                    seq.clone(),
                    Dim::Fixed(kb as i64),
                    Dim::Fixed(self.block as i64),
                ],
            )?;
            let shifted = add(g, &format!("{name}/offset_add"), &split, &per_block)?;
            let flat = g.const_i64(
                &format!("{name}.flat_shape"),
                &[3],
                &[0, 0, self.cols as i64],
            )?;
            e = g.op(
                "Reshape",
                &format!("{name}/rows"),
                &[&shifted, &flat],
                vec![],
                compute,
                shape,
            )?;
        }
        g.cast(&format!("{name}/f32"), &e, DataType::FLOAT)
    }

    /// `x @ table^T` for `x` f32 [.., cols]: a tied LM head, f32 [.., rows].
    pub fn head(&self, g: &mut GraphBuilder, name: &str, x: &Value) -> Result<Value> {
        let compute = self.parts[0].dtype;
        let out_shape = with_last(&x.shape, self.rows);
        let xc = g.cast(&format!("{name}/in"), x, compute)?;
        let t_shape = vec![Dim::Fixed(self.cols as i64), Dim::Fixed(self.rows as i64)];
        let mut ws = Vec::new();
        for (i, p) in self.parts.iter().enumerate() {
            let t = g.op(
                "Transpose",
                &format!("{name}/part{i}_t"),
                &[p],
                vec![("perm", Attr::Ints(vec![1, 0]))],
                compute,
                t_shape.clone(),
            )?;
            ws.push((xc.clone(), t));
        }
        let offsets = match &self.offsets {
            Some(o) => Some(g.op(
                "Transpose",
                &format!("{name}/offsets_t"),
                &[o],
                vec![("perm", Attr::Ints(vec![1, 0]))],
                compute,
                vec![
                    Dim::Fixed((self.cols / self.block) as i64),
                    Dim::Fixed(self.rows as i64),
                ],
            )?),
            None => None,
        };
        let y = block_products(g, name, &xc, &ws, offsets.as_ref(), self.block, out_shape)?;
        g.cast(&format!("{name}/out"), &y, DataType::FLOAT)
    }
}

/// An INT4 or INT8 blocked DQ of `codes` [rows, cols] (blocks along `axis`) with `scales` in `float`.
#[allow(clippy::too_many_arguments)]
fn blocked_dq(
    g: &mut GraphBuilder,
    name: &str,
    codes: &[i8],
    scales: DqScales,
    bits: Bits,
    [rows, cols]: [usize; 2],
    axis: usize,
    block: usize,
    float: DataType,
) -> Result<Value> {
    let (ty, data) = match bits {
        Bits::Int4 => (DataType::INT4, crate::quant::int::pack_int4(codes)),
        Bits::Int8 => (
            DataType::INT8,
            bytemuck::cast_slice::<i8, u8>(codes).to_vec(),
        ),
    };
    let wq = g.initializer(
        &format!("{name}.weight"),
        ty,
        &[rows as i64, cols as i64],
        Bytes::from(data),
    )?;
    let scale_shape = if axis == 0 {
        [rows / block, cols]
    } else {
        [rows, cols / block]
    };
    let sw = match scales {
        DqScales::Values(v) => g.initializer(
            &format!("{name}.weight_scale"),
            float,
            &scale_shape.map(|d| d as i64),
            float_bytes(&v, float),
        )?,
        DqScales::Steps {
            multiples,
            steps,
            group,
        } => {
            let mut step_shape = scale_shape;
            step_shape[axis] /= group;
            let m = g.initializer(
                &format!("{name}.weight_scale_multiple"),
                DataType::INT8,
                &scale_shape.map(|d| d as i64),
                Bytes::from(bytemuck::cast_slice::<i8, u8>(&multiples).to_vec()),
            )?;
            let st = g.initializer(
                &format!("{name}.weight_scale_step"),
                float,
                &step_shape.map(|d| d as i64),
                float_bytes(&steps, float),
            )?;
            g.op(
                "DequantizeLinear",
                &format!("{name}/weight_scale_dq"),
                &[&m, &st],
                vec![
                    ("axis", Attr::Int(axis as i64)),
                    ("block_size", Attr::Int(group as i64)),
                ],
                float,
                fixed(&scale_shape),
            )?
        }
    };
    g.op(
        "DequantizeLinear",
        &format!("{name}/weight_dq"),
        &[&wq, &sw],
        vec![
            ("axis", Attr::Int(axis as i64)),
            ("block_size", Attr::Int(block as i64)),
        ],
        float,
        fixed(&[rows, cols]),
    )
}

fn transpose_codes(c: &[i8], rows: usize, cols: usize) -> Vec<i8> {
    let mut t = vec![0i8; c.len()];
    for (r, row) in c.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * rows + r] = v;
        }
    }
    t
}

/// NVFP4 weight [n, k] (blocks along k) with two DQs, transposed to [k, n] for MatMul.
fn nvfp4_weight<T: crate::quant::elem::Elem>(
    g: &mut GraphBuilder,
    name: &str,
    w: &[T],
    k: usize,
    n: usize,
    float: DataType,
) -> Result<Value> {
    if !k.is_multiple_of(nvfp4::BLOCK) {
        bail!(
            "{name}: NVFP4 needs in_features divisible by {}, got {k}",
            nvfp4::BLOCK
        );
    }
    let q = nvfp4::quantize(w);
    nvfp4_initializers(
        g,
        name,
        q.packed,
        q.block_scales,
        q.global_scale,
        k,
        n,
        float,
    )
}

/// The NVFP4 weight [n, k] of `packed` E2M1 codes (element 0 in the low nibble), E4M3 `block_scales` [n, k / 16]
/// and `global_scale`, dequantized and transposed to [k, n].
#[allow(clippy::too_many_arguments)]
fn nvfp4_initializers(
    g: &mut GraphBuilder,
    name: &str,
    packed: Vec<u8>,
    block_scales: Vec<u8>,
    global_scale: f32,
    k: usize,
    n: usize,
    float: DataType,
) -> Result<Value> {
    let kb = k / nvfp4::BLOCK;
    if packed.len() * 2 != n * k || block_scales.len() != n * kb {
        bail!(
            "{name}: NVFP4 weight [{n}, {k}] has {} packed bytes and {} block scales",
            packed.len(),
            block_scales.len()
        );
    }
    let wq = g.initializer(
        &format!("{name}.weight"),
        DataType::FLOAT4E2M1,
        &[n as i64, k as i64],
        Bytes::from(packed),
    )?;
    let bs = g.initializer(
        &format!("{name}.weight_scale"),
        DataType::FLOAT8E4M3FN,
        &[n as i64, kb as i64],
        Bytes::from(block_scales),
    )?;
    let sw = g.initializer(
        &format!("{name}.weight_scale_2"),
        float,
        &[],
        float_bytes(&[global_scale], float),
    )?;
    let bsd = g.op(
        "DequantizeLinear",
        &format!("{name}/weight_scale_dq"),
        &[&bs, &sw],
        vec![],
        float,
        fixed(&[n, kb]),
    )?;
    let wd = g.op(
        "DequantizeLinear",
        &format!("{name}/weight_dq"),
        &[&wq, &bsd],
        blocked16(),
        float,
        fixed(&[n, k]),
    )?;
    g.op(
        "Transpose",
        &format!("{name}/weight_t"),
        &[&wd],
        vec![("perm", Attr::Ints(vec![1, 0]))],
        float,
        fixed(&[k, n]),
    )
}

fn blocked16() -> Vec<(&'static str, Attr)> {
    vec![
        ("axis", Attr::Int(-1)),
        ("block_size", Attr::Int(nvfp4::BLOCK as i64)),
    ]
}

/// NVFP4 activation: dynamic E2M1 quantization with E4M3 block scales under a global scale amax/(6*448).
pub fn nvfp4_activation(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    act_amax: f32,
) -> Result<Value> {
    let k = match x.shape.last() {
        Some(Dim::Fixed(k)) if (*k as usize).is_multiple_of(nvfp4::BLOCK) => *k as usize,
        _ => bail!(
            "{name}: NVFP4 activations need a fixed last dimension divisible by {}",
            nvfp4::BLOCK
        ),
    };
    let sx = g.initializer(
        &format!("{name}.input_scale"),
        x.dtype,
        &[],
        float_bytes(&[nvfp4::global_scale(act_amax)], x.dtype),
    )?;
    let scale_shape = with_last(&x.shape, k / nvfp4::BLOCK);
    let mut attrs = blocked16();
    attrs.push(("scale_type", Attr::Int(DataType::FLOAT8E4M3FN.0 as i64)));
    let outs = g.node_in(
        "trt",
        "TRT_FP4DynamicQuantize",
        &format!("{name}/input_fp4"),
        &[x, &sx],
        attrs,
        vec![
            (DataType::FLOAT4E2M1, x.shape.clone()),
            (DataType::FLOAT8E4M3FN, scale_shape.clone()),
        ],
    )?;
    let xs = g.op(
        "DequantizeLinear",
        &format!("{name}/input_scale_dq"),
        &[&outs[1], &sx],
        vec![],
        x.dtype,
        scale_shape,
    )?;
    g.op(
        "DequantizeLinear",
        &format!("{name}/input_dq"),
        &[&outs[0], &xs],
        blocked16(),
        x.dtype,
        x.shape.clone(),
    )
}

/// The NVFP4 form of [`linear`] reading the weight [out, in] in its stored element type (f32, f16 or bf16, e.g.
/// straight from a mapped checkpoint): no f32 copy of the weight is made.
#[allow(clippy::too_many_arguments)]
pub fn linear_nvfp4<T: crate::quant::elem::Elem>(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    weight: &[T],
    bias: Option<&[f32]>,
    out_features: usize,
    in_features: usize,
    act_amax: f32,
) -> Result<Value> {
    let (n, k) = (out_features, in_features);
    check_len(name, weight.len(), n, k)?;
    let float = float_type(LinearPrecision::Nvfp4);
    if x.dtype != float {
        bail!("{name}: input is {}, nvfp4 expects {float}", x.dtype);
    }
    let out_shape = with_last(&x.shape, n);
    let xin = nvfp4_activation(g, name, x, act_amax)?;
    let wv = nvfp4_weight(g, name, weight, k, n, float)?;
    matmul_bias(g, name, &xin, &wv, bias, n, float, out_shape)
}

/// An FP8 (per-tensor or per-channel) linear layer from weights [n, k] in their stored type: no f32 copy of them.
#[allow(clippy::too_many_arguments)]
fn linear_fp8<T: Elem>(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    weight: &[T],
    bias: Option<&[f32]>,
    (n, k): (usize, usize),
    precision: LinearPrecision,
    act_amax: f32,
) -> Result<Value> {
    check_len(name, weight.len(), n, k)?;
    let float = float_type(precision);
    let out_shape = with_last(&x.shape, n);
    let per_channel = precision == LinearPrecision::Fp8PerChannel;
    let xin = fp8_qdq(g, &format!("{name}.input"), x, act_amax)?;
    let wv = fp8_weight(g, name, weight, k, n, per_channel, float)?;
    matmul_bias(g, name, &xin, &wv, bias, n, float, out_shape)
}

fn check_len(name: &str, len: usize, n: usize, k: usize) -> Result<()> {
    if len != n * k {
        bail!(
            "{name}: weight has {len} values, [{n}, {k}] needs {}",
            n * k
        );
    }
    Ok(())
}

/// `xin @ wv (+ bias)`, named after the layer.
#[allow(clippy::too_many_arguments)]
fn matmul_bias(
    g: &mut GraphBuilder,
    name: &str,
    xin: &Value,
    wv: &Value,
    bias: Option<&[f32]>,
    n: usize,
    float: DataType,
    out_shape: Vec<Dim>,
) -> Result<Value> {
    let y = g.op(
        "MatMul",
        &format!("{name}/MatMul"),
        &[xin, wv],
        vec![],
        float,
        out_shape.clone(),
    )?;
    add_bias(g, name, y, bias, n, float, out_shape)
}

/// Whether a stored weight goes into a layer of precision `p` unchanged.
fn stored_fits(q: &QuantWeight, p: LinearPrecision) -> bool {
    matches!(
        (q, p),
        (QuantWeight::Nvfp4 { .. }, LinearPrecision::Nvfp4)
            | (QuantWeight::Fp8 { .. }, LinearPrecision::Fp8)
    )
}

/// [`linear`] over a pre-quantized checkpoint's stored NVFP4 or per-tensor FP8 weight [out, in]: the codes and
/// scales become the Q/DQ initializers as they are (FP8 codes transposed to [in, out], as [`linear`] lays them).
#[allow(clippy::too_many_arguments)]
fn linear_stored(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    q: Option<&QuantWeight>,
    bias: Option<&[f32]>,
    n: usize,
    k: usize,
    act_amax: f32,
) -> Result<Value> {
    let float = DataType::FLOAT;
    if x.dtype != float {
        bail!(
            "{name}: input is {}, a quantized layer expects {float}",
            x.dtype
        );
    }
    let out_shape = with_last(&x.shape, n);
    let (xin, wv) = match q {
        Some(QuantWeight::Nvfp4 {
            packed,
            block_scales,
            global_scale,
        }) => {
            if !k.is_multiple_of(nvfp4::BLOCK) {
                bail!("{name}: NVFP4 needs in_features divisible by 16, got {k}");
            }
            (
                nvfp4_activation(g, name, x, act_amax)?,
                nvfp4_initializers(
                    g,
                    name,
                    packed.clone(),
                    block_scales.clone(),
                    *global_scale,
                    k,
                    n,
                    float,
                )?,
            )
        }
        Some(QuantWeight::Fp8 { codes, scale }) => {
            if codes.len() != n * k {
                bail!("{name}: FP8 weight [{n}, {k}] has {} codes", codes.len());
            }
            let mut t = vec![0u8; codes.len()];
            for r in 0..n {
                for c in 0..k {
                    t[c * n + r] = codes[r * k + c];
                }
            }
            (
                fp8_qdq(g, &format!("{name}.input"), x, act_amax)?,
                fp8_initializers(g, name, t, &[*scale], false, k, n, float)?,
            )
        }
        None => bail!("{name}: no stored weight"),
    };
    matmul_bias(g, name, &xin, &wv, bias, n, float, out_shape)
}

/// `y + b` with the bias stored as `{name}.bias` in `float`, or `y` itself without a bias.
fn add_bias(
    g: &mut GraphBuilder,
    name: &str,
    y: Value,
    bias: Option<&[f32]>,
    n: usize,
    float: DataType,
    out_shape: Vec<Dim>,
) -> Result<Value> {
    let Some(b) = bias else { return Ok(y) };
    if b.len() != n {
        bail!("{name}: bias has {} values, expected {n}", b.len());
    }
    let bv = g.initializer(
        &format!("{name}.bias"),
        float,
        &[n as i64],
        float_bytes(b, float),
    )?;
    g.op(
        "Add",
        &format!("{name}/bias"),
        &[&y, &bv],
        vec![],
        float,
        out_shape,
    )
}

/// Emits `y = x @ W^T (+ b)` named `name`; `act_amax` is the calibrated absolute maximum of `x` (FP8 and NVFP4).
pub fn linear(
    g: &mut GraphBuilder,
    name: &str,
    x: &Value,
    w: &LinearWeights,
    precision: LinearPrecision,
    act_amax: f32,
) -> Result<Value> {
    let (n, k) = (w.out_features, w.in_features);
    check_len(name, w.weight.len(), n, k)?;
    let float = float_type(precision);
    if x.dtype != float {
        bail!(
            "{name}: input is {}, {} expects {float}",
            x.dtype,
            precision.name()
        );
    }
    let out_shape = with_last(&x.shape, n);
    let (xin, wv) = match precision {
        LinearPrecision::F32 | LinearPrecision::F16 => (
            x.clone(),
            g.initializer(
                &format!("{name}.weight"),
                float,
                &[k as i64, n as i64],
                transposed_float_bytes(w.weight, n, k, float),
            )?,
        ),
        LinearPrecision::Fp8 | LinearPrecision::Fp8PerChannel => {
            let per_channel = precision == LinearPrecision::Fp8PerChannel;
            (
                fp8_qdq(g, &format!("{name}.input"), x, act_amax)?,
                fp8_weight(g, name, w.weight, k, n, per_channel, float)?,
            )
        }
        LinearPrecision::Int8 => (
            int8_qdq(g, &format!("{name}.input"), x, act_amax)?,
            int8_weight(g, name, w.weight, k, n, float)?,
        ),
        LinearPrecision::Int4 { block } => {
            let wt = transpose(w.weight, n, k);
            (x.clone(), int4_weight(g, name, &wt, k, n, block, float)?)
        }
        LinearPrecision::Nvfp4 => (
            nvfp4_activation(g, name, x, act_amax)?,
            nvfp4_weight(g, name, w.weight, k, n, float)?,
        ),
    };
    matmul_bias(g, name, &xin, &wv, w.bias, n, float, out_shape)
}

/// Calibrated absolute maxima for the FP8 attention pattern.
#[derive(Clone, Copy, Debug)]
pub struct AttentionAmax {
    pub q: f32,
    pub k: f32,
    pub v: f32,
}

/// Scaled dot-product attention `softmax(q k^T * scale) v` over [batch, heads, seq, head_dim] values; with `fp8`,
/// Q/DQ on q and k (BMM1 inputs), on the softmax output (amax 1) and on v (BMM2 inputs), as TensorRT's fused FP8
/// attention kernels expect.
pub fn attention(
    g: &mut GraphBuilder,
    name: &str,
    q: &Value,
    k: &Value,
    v: &Value,
    fp8: Option<AttentionAmax>,
) -> Result<Value> {
    let [b, h, sq, d] = q.shape.as_slice() else {
        bail!("{name}: q must be [batch, heads, seq, head_dim]")
    };
    let Dim::Fixed(dv) = d else {
        bail!("{name}: head_dim must be fixed")
    };
    let sk = k.shape.get(2).cloned().unwrap_or(Dim::Fixed(0));
    let float = q.dtype;
    let (q, k, v) = match fp8 {
        Some(a) => (
            fp8_qdq(g, &format!("{name}.q"), q, a.q)?,
            fp8_qdq(g, &format!("{name}.k"), k, a.k)?,
            fp8_qdq(g, &format!("{name}.v"), v, a.v)?,
        ),
        None => (q.clone(), k.clone(), v.clone()),
    };
    let kt = g.op(
        "Transpose",
        &format!("{name}/k_t"),
        &[&k],
        vec![("perm", Attr::Ints(vec![0, 1, 3, 2]))],
        float,
        vec![b.clone(), h.clone(), d.clone(), sk.clone()],
    )?;
    let scores_shape = vec![b.clone(), h.clone(), sq.clone(), sk];
    let s = g.op(
        "MatMul",
        &format!("{name}/bmm1"),
        &[&q, &kt],
        vec![],
        float,
        scores_shape.clone(),
    )?;
    let scale = g.initializer(
        &format!("{name}.softmax_scale"),
        float,
        &[],
        float_bytes(&[1.0 / (*dv as f32).sqrt()], float),
    )?;
    let s = g.op(
        "Mul",
        &format!("{name}/scale"),
        &[&s, &scale],
        vec![],
        float,
        scores_shape.clone(),
    )?;
    let p = g.op(
        "Softmax",
        &format!("{name}/softmax"),
        &[&s],
        vec![("axis", Attr::Int(-1))],
        float,
        scores_shape,
    )?;
    let p = if fp8.is_some() {
        fp8_qdq(g, &format!("{name}.softmax"), &p, 1.0)?
    } else {
        p
    };
    g.op(
        "MatMul",
        &format!("{name}/bmm2"),
        &[&p, &v],
        vec![],
        float,
        q.shape.clone(),
    )
}

/// Folds a calibration run's outputs (`amax.<key>` scalars) into `map`, keeping the maximum per key.
/// Folds a calibration run's `chmax.<key>` outputs (per-channel absolute maxima) into `map`.
pub fn merge_channel_amax(
    map: &mut HashMap<String, Vec<f32>>,
    outputs: &[(String, crate::backend::HostTensor)],
) {
    for (name, t) in outputs {
        if let Some(key) = name.strip_prefix("chmax.")
            && let Some(v) = t.to_f64()
        {
            let e = map
                .entry(key.to_string())
                .or_insert_with(|| vec![0.0; v.len()]);
            if e.len() == v.len() {
                for (m, x) in e.iter_mut().zip(&v) {
                    *m = m.max(x.abs() as f32);
                }
            }
        }
    }
}

pub fn merge_amax(
    map: &mut HashMap<String, f32>,
    outputs: &[(String, crate::backend::HostTensor)],
) {
    for (name, t) in outputs {
        if let Some(key) = name.strip_prefix("amax.")
            && let Some(v) = t.to_f64()
        {
            let m = v.iter().fold(0f64, |a, b| a.max(b.abs())) as f32;
            let e = map.entry(key.to_string()).or_insert(0.0);
            *e = e.max(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int8_codes_split_into_two_int4_halves_exactly() {
        let codes: Vec<i8> = (-128..=127).collect();
        let w = IntBlocks {
            bits: Bits::Int8,
            block: 32,
            rows: 1,
            cols: 256,
            codes: codes.clone(),
            scales: (0..8).map(|b| 0.5 + b as f32).collect(),
            offsets: None,
            steps: None,
        };
        let split = int4_parts(&w);
        assert_eq!(split.parts.len(), 2);
        let (hi, lo) = (&split.parts[0], &split.parts[1]);
        let offsets = split.offsets.unwrap();
        for (i, &q) in codes.iter().enumerate() {
            let b = i / 32;
            assert!(
                (-8..=7).contains(&hi.1[i]) && (-8..=7).contains(&lo.1[i]),
                "{q}"
            );
            let (s_hi, s_lo) = (hi.2 * w.scales[b], lo.2 * w.scales[b]);
            let v = hi.1[i] as f32 * s_hi + lo.1[i] as f32 * s_lo + offsets[b];
            assert_eq!(v, q as f32 * w.scales[b], "{q}");
        }
    }

    /// Q6_K's codes need no shift (no offsets); the interleaved matrix times the sixteenths-then-block activations
    /// gives each row's dot product with the 8-bit codes, for Q6_K's range and Q8_0's (shifted by 8 into offsets).
    #[test]
    fn interleaved_int8_rows_give_the_codes_products() {
        for (lo, hi, shifted) in [(-32i16, 31i16, false), (-128, 127, true)] {
            let (rows, cols, block) = (3, 64, 16);
            let codes: Vec<i8> = (0..rows * cols)
                .map(|i| (lo + (i as i16 * 37) % (hi - lo + 1)) as i8)
                .collect();
            let w = IntBlocks {
                bits: Bits::Int8,
                block,
                rows,
                cols,
                codes: codes.clone(),
                scales: (0..rows * cols / block).map(|b| 0.25 + b as f32).collect(),
                offsets: None,
                steps: None,
            };
            let (inter, offsets) = interleaved_int8(&w);
            let scales: Vec<f32> = w.scales.iter().map(|s| 16.0 * s).collect();
            assert_eq!(offsets.is_some(), shifted);
            assert!(inter.iter().all(|c| (-8..=7).contains(c)));
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let x2: Vec<f32> = x
                .chunks_exact(block)
                .flat_map(|b| {
                    b.iter()
                        .map(|v| v / 16.0)
                        .chain(b.iter().copied())
                        .collect::<Vec<_>>()
                })
                .collect();
            for r in 0..rows {
                let kb = cols / block;
                let mut got = 0f64;
                for (j, &c) in inter[r * 2 * cols..(r + 1) * 2 * cols].iter().enumerate() {
                    got += c as f64 * scales[r * kb + j / (2 * block)] as f64 * x2[j] as f64;
                }
                if let Some(o) = &offsets {
                    for (b, xb) in x.chunks_exact(block).enumerate() {
                        got += o[r * kb + b] as f64 * xb.iter().map(|&v| v as f64).sum::<f64>();
                    }
                }
                let want: f64 = (0..cols)
                    .map(|j| {
                        codes[r * cols + j] as f64
                            * w.scales[r * kb + j / block] as f64
                            * x[j] as f64
                    })
                    .sum();
                assert!(
                    (got - want).abs() < 1e-9 * want.abs().max(1.0),
                    "{r}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn tiled_transpose_equals_the_definition() {
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (100, 7), (0, 5)] {
            let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&w, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], w[r * cols + c], "{rows}x{cols} at {r},{c}");
                }
            }
        }
    }

    /// The fused convert-and-transpose gives what converting each element of the transpose gives: f16 rounding,
    /// and E4M3 codes by the reference encoder over per-tensor and per-row scales (sizes off the 64 tile).
    #[test]
    fn fused_transpose_conversions_equal_the_definition() {
        use crate::quant::minifloat::E4M3FN;
        for (rows, cols) in [(1, 1), (3, 70), (65, 33), (130, 129), (0, 5)] {
            let w: Vec<f32> = (0..rows * cols)
                .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.37)
                .collect();
            let t = super::transpose(&w, rows, cols);
            let h = super::transpose_map(&w, rows, cols, |_, v| half::f16::from_f32(v));
            let scale = |r: usize| 1.0 + r as f32 * 0.25;
            let q = super::transpose_map(&w, rows, cols, |r, v| super::e4m3fn(v / scale(r), true));
            for r in 0..rows {
                for c in 0..cols {
                    let i = c * rows + r;
                    assert_eq!(h[i], half::f16::from_f32(t[i]), "{rows}x{cols} at {r},{c}");
                    assert_eq!(
                        q[i],
                        E4M3FN.encode(t[i] / scale(r), true),
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }

    /// FP8 weights quantized from f16/bf16 as stored (scales from their bits, widened a tile row at a time) equal
    /// the weights quantized from their f32 copy, byte for byte, per tensor and per channel; NaNs and infinities
    /// included in the amax as f32's `max` takes them.
    #[test]
    fn fp8_weights_from_16_bit_storage_equal_the_f32_path() {
        use crate::onnx::{DataType, GraphBuilder};
        use crate::quant::elem::Elem;
        fn bytes<T: Elem>(w: &[T], n: usize, k: usize, per_channel: bool) -> Vec<Vec<u8>> {
            let mut g = GraphBuilder::new("t", 18);
            super::fp8_weight(&mut g, "l", w, k, n, per_channel, DataType::FLOAT).unwrap();
            let m = g.finish();
            let graph = m.graph.unwrap();
            graph
                .initializer
                .iter()
                .map(|t| t.raw_data.to_vec())
                .collect()
        }
        let (n, k) = (67, 130);
        let f: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1013) as f32 - 506.0) * 0.0137)
            .collect();
        let mut h: Vec<half::f16> = f.iter().map(|&v| half::f16::from_f32(v)).collect();
        let mut b: Vec<half::bf16> = f.iter().map(|&v| half::bf16::from_f32(v)).collect();
        h[5] = half::f16::NAN;
        b[5] = half::bf16::NAN;
        h[n * k - 3] = half::f16::NEG_INFINITY;
        for per_channel in [false, true] {
            let hf: Vec<f32> = h.iter().map(|v| v.to_f32()).collect();
            let bf: Vec<f32> = b.iter().map(|v| v.to_f32()).collect();
            assert_eq!(bytes(&h, n, k, per_channel), bytes(&hf, n, k, per_channel));
            assert_eq!(bytes(&b, n, k, per_channel), bytes(&bf, n, k, per_channel));
        }
        let want = h.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
        assert_eq!(<half::f16 as Elem>::abs_max(&h), want);
        assert_eq!(want, f32::INFINITY, "the infinity counts, the NaN does not");
        let want = b[..n].iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
        assert_eq!(<half::bf16 as Elem>::abs_max(&b[..n]), want);
    }
}
