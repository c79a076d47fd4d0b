//! Linear layers in the precisions TensorRT builds: plain f32/f16 MatMul, FP8 (per-tensor activation Q/DQ and an
//! FP8 weight with DQ) and NVFP4 (FP4 weights with two DQs, activations through `trt::TRT_FP4DynamicQuantize`).
//! Weights arrive in PyTorch's Linear layout [out, in].
use super::minifloat::E4M3FN;
use super::nvfp4;
use crate::onnx::{Attr, DataType, Dim, GraphBuilder, Value};
use anyhow::{Result, bail};
use bytes::Bytes;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearPrecision {
    F32,
    F16,
    Fp8,
    Nvfp4,
}

impl LinearPrecision {
    /// The default-domain opset the pattern needs (FP8 Q/DQ: 19; blocked FP4 DQ: 23).
    pub fn min_opset(self) -> i64 {
        match self {
            LinearPrecision::F32 | LinearPrecision::F16 => 17,
            LinearPrecision::Fp8 => 19,
            LinearPrecision::Nvfp4 => 23,
        }
    }
}

pub struct LinearWeights<'a> {
    /// [out, in], row-major.
    pub weight: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub out_features: usize,
    pub in_features: usize,
}

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

fn f32_bytes(v: &[f32]) -> Bytes {
    Bytes::from(v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
}

fn f16_bytes(v: &[f32]) -> Bytes {
    Bytes::from(
        v.iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect::<Vec<u8>>(),
    )
}

fn with_last(shape: &[Dim], last: usize) -> Vec<Dim> {
    let mut s = shape.to_vec();
    if let Some(l) = s.last_mut() {
        *l = Dim::Fixed(last as i64);
    }
    s
}

fn scalar(g: &mut GraphBuilder, name: &str, dtype: DataType, v: f32) -> Result<Value> {
    let data = match dtype {
        DataType::FLOAT16 => f16_bytes(&[v]),
        _ => f32_bytes(&[v]),
    };
    g.initializer(name, dtype, &[], data)
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
    if w.weight.len() != n * k {
        bail!(
            "{name}: weight has {} values, [{n}, {k}] needs {}",
            w.weight.len(),
            n * k
        );
    }
    let float = if precision == LinearPrecision::F16 {
        DataType::FLOAT16
    } else {
        DataType::FLOAT
    };
    if x.dtype != float {
        bail!(
            "{name}: input is {}, {precision:?} expects {float}",
            x.dtype
        );
    }
    let out_shape = with_last(&x.shape, n);
    let wt = transpose(w.weight, n, k);
    let y = match precision {
        LinearPrecision::F32 | LinearPrecision::F16 => {
            let data = if float == DataType::FLOAT16 {
                f16_bytes(&wt)
            } else {
                f32_bytes(&wt)
            };
            let wv = g.initializer(
                &format!("{name}.weight"),
                float,
                &[k as i64, n as i64],
                data,
            )?;
            g.op(
                "MatMul",
                &format!("{name}/MatMul"),
                &[x, &wv],
                vec![],
                float,
                out_shape.clone(),
            )?
        }
        LinearPrecision::Fp8 => {
            let sx = scalar(
                g,
                &format!("{name}.input_scale"),
                float,
                act_amax.max(1e-12) / 448.0,
            )?;
            let zp = g.initializer(
                &format!("{name}.input_zero_point"),
                DataType::FLOAT8E4M3FN,
                &[],
                Bytes::from(vec![0u8]),
            )?;
            let q = g.op(
                "QuantizeLinear",
                &format!("{name}/input_q"),
                &[x, &sx, &zp],
                vec![],
                DataType::FLOAT8E4M3FN,
                x.shape.clone(),
            )?;
            let xd = g.op(
                "DequantizeLinear",
                &format!("{name}/input_dq"),
                &[&q, &sx],
                vec![],
                float,
                x.shape.clone(),
            )?;
            let wamax = wt.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
            let sw_v = wamax / 448.0;
            let codes: Vec<u8> = wt.iter().map(|v| E4M3FN.encode(v / sw_v, true)).collect();
            let wq = g.initializer(
                &format!("{name}.weight"),
                DataType::FLOAT8E4M3FN,
                &[k as i64, n as i64],
                Bytes::from(codes),
            )?;
            let sw = scalar(g, &format!("{name}.weight_scale"), float, sw_v)?;
            let wd = g.op(
                "DequantizeLinear",
                &format!("{name}/weight_dq"),
                &[&wq, &sw],
                vec![],
                float,
                shape_of(&[k, n]),
            )?;
            g.op(
                "MatMul",
                &format!("{name}/MatMul"),
                &[&xd, &wd],
                vec![],
                float,
                out_shape.clone(),
            )?
        }
        LinearPrecision::Nvfp4 => {
            if !k.is_multiple_of(nvfp4::BLOCK) {
                bail!(
                    "{name}: NVFP4 needs in_features divisible by {}, got {k}",
                    nvfp4::BLOCK
                );
            }
            let q = nvfp4::quantize(w.weight);
            let wq = g.initializer(
                &format!("{name}.weight"),
                DataType::FLOAT4E2M1,
                &[n as i64, k as i64],
                Bytes::from(q.packed),
            )?;
            let bs = g.initializer(
                &format!("{name}.weight_scale"),
                DataType::FLOAT8E4M3FN,
                &[n as i64, (k / nvfp4::BLOCK) as i64],
                Bytes::from(q.block_scales),
            )?;
            let sw = scalar(g, &format!("{name}.weight_scale_2"), float, q.global_scale)?;
            let bsd = g.op(
                "DequantizeLinear",
                &format!("{name}/weight_scale_dq"),
                &[&bs, &sw],
                vec![],
                float,
                shape_of(&[n, k / nvfp4::BLOCK]),
            )?;
            let blocked = || {
                vec![
                    ("axis", Attr::Int(-1)),
                    ("block_size", Attr::Int(nvfp4::BLOCK as i64)),
                ]
            };
            let wd = g.op(
                "DequantizeLinear",
                &format!("{name}/weight_dq"),
                &[&wq, &bsd],
                blocked(),
                float,
                shape_of(&[n, k]),
            )?;
            let wt_v = g.op(
                "Transpose",
                &format!("{name}/weight_t"),
                &[&wd],
                vec![("perm", Attr::Ints(vec![1, 0]))],
                float,
                shape_of(&[k, n]),
            )?;
            let sx = scalar(
                g,
                &format!("{name}.input_scale"),
                float,
                nvfp4::global_scale(act_amax),
            )?;
            let mut scale_shape = x.shape.clone();
            if let Some(l) = scale_shape.last_mut() {
                *l = Dim::Fixed((k / nvfp4::BLOCK) as i64);
            }
            let outs = g.node_in(
                "trt",
                "TRT_FP4DynamicQuantize",
                &format!("{name}/input_fp4"),
                &[x, &sx],
                vec![
                    ("axis", Attr::Int(-1)),
                    ("block_size", Attr::Int(nvfp4::BLOCK as i64)),
                    ("scale_type", Attr::Int(17)),
                ],
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
                float,
                scale_shape,
            )?;
            let xd = g.op(
                "DequantizeLinear",
                &format!("{name}/input_dq"),
                &[&outs[0], &xs],
                blocked(),
                float,
                x.shape.clone(),
            )?;
            g.op(
                "MatMul",
                &format!("{name}/MatMul"),
                &[&xd, &wt_v],
                vec![],
                float,
                out_shape.clone(),
            )?
        }
    };
    match w.bias {
        None => Ok(y),
        Some(b) => {
            if b.len() != n {
                bail!("{name}: bias has {} values, expected {n}", b.len());
            }
            let data = if float == DataType::FLOAT16 {
                f16_bytes(b)
            } else {
                f32_bytes(b)
            };
            let bv = g.initializer(&format!("{name}.bias"), float, &[n as i64], data)?;
            g.op(
                "Add",
                &format!("{name}/bias"),
                &[&y, &bv],
                vec![],
                float,
                out_shape,
            )
        }
    }
}

fn shape_of(d: &[usize]) -> Vec<Dim> {
    d.iter().map(|&v| Dim::Fixed(v as i64)).collect()
}
