//! The CPU pass: makes a TensorRT-quantized graph runnable by ONNX Runtime with the same numerics.
//! - Constant `DequantizeLinear` chains on FP4/INT4 weights (and optionally FP8/INT8 ones) are folded into plain
//!   weights of the scale's type (ORT has no FLOAT4E2M1 kernels).
//! - `trt::TRT_FP4DynamicQuantize` and the two DequantizeLinear nodes reading its outputs are replaced by
//!   standard ops that compute the same dequantized activation: per 16-element block, amax -> E4M3-rounded
//!   scale (via Cast to float8e4m3fn) -> E2M1 round-to-nearest-even with saturation -> back to float.
use super::dequantize::{dequantize, to_f32};
use super::dtype::DataType;
use super::model::{OnnxFile, external_ref};
use super::proto::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, attr_type,
};
use anyhow::{Context, Result, bail};
use bytes::Bytes;
use std::collections::{HashMap, HashSet};

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuPassOptions {
    /// Also fold FP8/INT8 weight DequantizeLinear (ORT runs those natively; folding trades memory for speed).
    pub fold_fp8: bool,
    /// Leave INT4 DequantizeLinear nodes that only feed MatMuls (as their weight) as they are: ONNX Runtime's CUDA
    /// provider fuses those into MatMulNBits, which reads the 4-bit codes. The rest (an embedding table's lookup)
    /// are folded, or every step would dequantize the whole table.
    pub keep_int4: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuPassReport {
    pub folded: usize,
    pub emulated_fp4_activations: usize,
}

fn attr_i(n: &NodeProto, name: &str, default: i64) -> i64 {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.i)
        .unwrap_or(default)
}

/// Constant tensors of the graph, decoded on demand (external data is read through the file's mappings).
struct Constants {
    tensors: HashMap<String, (DataType, Vec<i64>, Vec<f32>)>,
}

impl Constants {
    fn load(onnx: &OnnxFile, graph: &GraphProto, wanted: &HashSet<String>) -> Result<Self> {
        let external: HashMap<String, Bytes> = onnx.external_weights()?.into_iter().collect();
        let mut tensors = HashMap::new();
        for t in graph
            .initializer
            .iter()
            .filter(|t| wanted.contains(&t.name))
        {
            let dt = DataType(t.data_type);
            let count = t.dims.iter().product::<i64>().max(0) as usize;
            let values = if external_ref(t).is_some() {
                to_f32(dt, &external[&t.name], count)
            } else {
                inline_values(t, dt, count)
            }
            .with_context(|| format!("initializer '{}'", t.name))?;
            tensors.insert(t.name.clone(), (dt, t.dims.clone(), values));
        }
        Ok(Self { tensors })
    }
}

fn inline_values(t: &TensorProto, dt: DataType, count: usize) -> Result<Vec<f32>> {
    if !t.raw_data.is_empty() || count == 0 {
        return to_f32(dt, &t.raw_data, count);
    }
    if dt == DataType::FLOAT {
        return Ok(t.float_data.clone());
    }
    // Small types without raw_data keep one element (bit pattern) per int32; 4-bit types pack two.
    let bytes: Vec<u8> = match dt.bits() {
        Some(16) => t
            .int32_data
            .iter()
            .flat_map(|&v| (v as u16).to_le_bytes())
            .collect(),
        Some(_) => t.int32_data.iter().map(|&v| v as u8).collect(),
        None => bail!("unsupported initializer type {dt}"),
    };
    to_f32(dt, &bytes, count)
}

fn encode(values: &[f32], dtype: DataType) -> Result<Bytes> {
    Ok(Bytes::from(match dtype {
        DataType::FLOAT => values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<u8>>(),
        DataType::FLOAT16 => values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        DataType::BFLOAT16 => values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect(),
        other => bail!("cannot fold into a {other} tensor"),
    }))
}

/// Applies the CPU pass to a loaded model; the result keeps every other node and initializer as it was.
pub fn apply(onnx: &OnnxFile, opts: CpuPassOptions) -> Result<(ModelProto, CpuPassReport)> {
    let mut model = onnx.model.clone();
    let graph = model.graph.as_mut().context("model has no graph")?;
    let init_types: HashMap<String, DataType> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), DataType(t.data_type)))
        .collect();
    let producers: HashMap<String, usize> = graph
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();

    // Which DequantizeLinear nodes to fold: those ORT cannot run, plus the DQs computing their scales.
    let needs_fold = |dt: DataType| {
        matches!(dt, DataType::FLOAT4E2M1 | DataType::FLOAT8E8M0)
            || (opts.fold_fp8
                && matches!(
                    dt,
                    DataType::FLOAT8E4M3FN
                        | DataType::FLOAT8E5M2
                        | DataType::INT8
                        | DataType::UINT8
                ))
    };
    let int4 = |dt: DataType| matches!(dt, DataType::INT4 | DataType(21));
    let mut readers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            readers.entry(i.as_str()).or_default().push(n);
        }
    }
    let weight_of_matmuls_only = |n: &NodeProto| {
        n.output.first().is_some_and(|o| {
            readers.get(o.as_str()).is_some_and(|r| {
                r.iter()
                    .all(|m| m.op_type == "MatMul" && m.input.get(1) == Some(o))
            })
        })
    };
    let mut fold: HashSet<usize> = HashSet::new();
    let mut stack: Vec<usize> = graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "DequantizeLinear")
        .filter(|(_, n)| {
            n.input
                .first()
                .and_then(|x| init_types.get(x))
                .is_some_and(|&dt| {
                    needs_fold(dt) || (int4(dt) && !(opts.keep_int4 && weight_of_matmuls_only(n)))
                })
        })
        .map(|(i, _)| i)
        .collect();
    while let Some(i) = stack.pop() {
        if !fold.insert(i) {
            continue;
        }
        for input in graph.node[i].input.iter().skip(1).filter(|s| !s.is_empty()) {
            match producers.get(input) {
                Some(&p) if graph.node[p].op_type == "DequantizeLinear" => stack.push(p),
                Some(_) => bail!(
                    "'{}': node '{}' dequantizes a constant with a scale computed at run time; cannot fold it",
                    onnx.path.display(),
                    graph.node[i].name
                ),
                None => {}
            }
        }
    }
    let mut wanted: HashSet<String> = HashSet::new();
    for &i in &fold {
        wanted.extend(
            graph.node[i]
                .input
                .iter()
                .filter(|s| init_types.contains_key(*s))
                .cloned(),
        );
    }
    let mut consts = Constants::load(onnx, graph, &wanted)?;

    // Fold in graph order so a scale's DQ is folded before the weight DQ reading it.
    let mut new_inits = Vec::new();
    let mut order: Vec<usize> = fold.iter().copied().collect();
    order.sort_unstable();
    for &i in &order {
        let n = &graph.node[i];
        let get = |k: usize| {
            n.input
                .get(k)
                .filter(|s| !s.is_empty())
                .and_then(|s| consts.tensors.get(s))
        };
        let (Some((_, x_dims, x)), Some((s_dt, s_dims, s))) = (get(0), get(1)) else {
            bail!(
                "'{}': DequantizeLinear '{}' has an input that is not constant",
                onnx.path.display(),
                n.name
            );
        };
        let zp = get(2).map(|(_, _, z)| z.as_slice());
        let y = dequantize(
            x,
            x_dims,
            s,
            s_dims,
            zp,
            attr_i(n, "axis", 1),
            attr_i(n, "block_size", 0),
        )
        .with_context(|| {
            format!(
                "'{}': folding DequantizeLinear '{}'",
                onnx.path.display(),
                n.name
            )
        })?;
        let out_dt = if s_dt.is_low_precision_float() {
            DataType::FLOAT
        } else {
            *s_dt
        };
        // Round-trip through the output type so the folded constant equals what DequantizeLinear would produce.
        let data = encode(&y, out_dt)?;
        let y = to_f32(out_dt, &data, y.len())?;
        let name = n.output[0].clone();
        new_inits.push(TensorProto {
            dims: x_dims.clone(),
            data_type: out_dt.0,
            name: name.clone(),
            raw_data: data,
            ..Default::default()
        });
        consts.tensors.insert(name, (out_dt, x_dims.clone(), y));
    }
    let folded = order.len();
    let mut remove: HashSet<usize> = fold;

    // Replace the dynamic FP4 activation quantization.
    let mut added: Vec<(usize, Vec<NodeProto>, Vec<TensorProto>)> = Vec::new();
    let consumers = |name: &str| -> Vec<usize> {
        graph
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| n.input.iter().any(|i| i == name))
            .map(|(i, _)| i)
            .collect()
    };
    let mut emulated = 0;
    for (i, n) in graph.node.iter().enumerate() {
        if n.op_type != "TRT_FP4DynamicQuantize" {
            continue;
        }
        let fail = |why: &str| {
            anyhow::anyhow!(
                "'{}': node '{}' (TRT_FP4DynamicQuantize): {why}",
                onnx.path.display(),
                n.name
            )
        };
        if attr_i(n, "block_size", 16) != 16 || attr_i(n, "axis", -1) != -1 {
            return Err(fail("only block_size 16 along the last axis is supported"));
        }
        let [xq, sq] = n.output.as_slice() else {
            return Err(fail("expected two outputs"));
        };
        let scale_dq = match consumers(sq).as_slice() {
            [c] if graph.node[*c].op_type == "DequantizeLinear" => *c,
            _ => {
                return Err(fail(
                    "its scale output must feed exactly one DequantizeLinear",
                ));
            }
        };
        let value_dq = match consumers(xq).as_slice() {
            [c] if graph.node[*c].op_type == "DequantizeLinear" => *c,
            _ => {
                return Err(fail(
                    "its value output must feed exactly one DequantizeLinear",
                ));
            }
        };
        let x = n.input[0].clone();
        let sx = n.input[1].clone();
        let out = graph.node[value_dq].output[0].clone();
        let (nodes, inits) = fp4_emulation(&format!("{}/cpu_fp4", n.name), &x, &sx, &out);
        remove.extend([i, scale_dq, value_dq]);
        added.push((i, nodes, inits));
        emulated += 1;
    }

    // Rebuild the node list: replacements go where the TRT node was, so topological order holds.
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut added_map: HashMap<usize, (Vec<NodeProto>, Vec<TensorProto>)> =
        added.into_iter().map(|(i, n, t)| (i, (n, t))).collect();
    for (i, n) in std::mem::take(&mut graph.node).into_iter().enumerate() {
        if let Some((ns, ts)) = added_map.remove(&i) {
            nodes.extend(ns);
            new_inits.extend(ts);
        } else if !remove.contains(&i) {
            nodes.push(n);
        }
    }
    graph.node = nodes;
    graph.initializer.extend(new_inits);
    // Initializers left in the source's external data are taken in (zero-copy, from the mapping) so the result
    // can be saved anywhere: their old relative locations would not resolve next to a new file.
    let external: HashMap<String, Bytes> = onnx.external_weights()?.into_iter().collect();
    for t in graph.initializer.iter_mut() {
        if external_ref(t).is_some()
            && let Some(b) = external.get(&t.name)
        {
            t.raw_data = b.clone();
            t.external_data.clear();
            t.data_location = 0;
        }
    }
    // Drop initializers nothing reads any more (the packed FP4 weights and their scales).
    let used: HashSet<String> = graph
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(graph.output.iter().map(|o| o.name.clone()))
        .collect();
    graph.initializer.retain(|t| used.contains(&t.name));
    if !graph.node.iter().any(|n| n.domain == "trt") {
        model.opset_import.retain(|o| o.domain != "trt");
    }
    if emulated > 0 {
        // ReduceMax with axes as an input (18) and Cast with `saturate` (19).
        for o in model
            .opset_import
            .iter_mut()
            .filter(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        {
            o.version = o.version.max(19);
        }
    }
    Ok((
        model,
        CpuPassReport {
            folded,
            emulated_fp4_activations: emulated,
        },
    ))
}

/// A one-output node of the default domain.
pub(super) fn node(
    op: &str,
    name: String,
    inputs: &[&str],
    output: &str,
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name,
        op_type: op.to_string(),
        attribute: attrs,
        ..Default::default()
    }
}

pub(super) fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INT,
        i: v,
        ..Default::default()
    }
}

fn const_tensor(name: &str, dt: DataType, dims: &[i64], data: Vec<u8>) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: dt.0,
        name: name.into(),
        raw_data: Bytes::from(data),
        ..Default::default()
    }
}

/// Standard-op form of `DQ(TRT_FP4DynamicQuantize(x, sx))` writing its result to `out` (f32 input). Blocks run
/// along the last axis, so in row-major order they are consecutive runs of 16: a [-1, 16] view needs no rank.
fn fp4_emulation(p: &str, x: &str, sx: &str, out: &str) -> (Vec<NodeProto>, Vec<TensorProto>) {
    let f = |v: f32| v.to_le_bytes().to_vec();
    let n = |s: &str| format!("{p}/{s}");
    let inits = vec![
        const_tensor(
            &n("block_shape"),
            DataType::INT64,
            &[2],
            [-1i64, 16].iter().flat_map(|v| v.to_le_bytes()).collect(),
        ),
        const_tensor(
            &n("last_axis"),
            DataType::INT64,
            &[1],
            (-1i64).to_le_bytes().to_vec(),
        ),
        const_tensor(&n("six"), DataType::FLOAT, &[], f(6.0)),
        const_tensor(&n("zero"), DataType::FLOAT, &[], f(0.0)),
        const_tensor(&n("one"), DataType::FLOAT, &[], f(1.0)),
        const_tensor(&n("half"), DataType::FLOAT, &[], f(0.5)),
        const_tensor(&n("two"), DataType::FLOAT, &[], f(2.0)),
        const_tensor(&n("four"), DataType::FLOAT, &[], f(4.0)),
    ];
    let v = |s: &str| n(s);
    let nodes = vec![
        node(
            "Reshape",
            v("reshape"),
            &[x, &v("block_shape")],
            &v("blocks"),
            vec![],
        ),
        node("Abs", v("abs"), &[&v("blocks")], &v("abs_blocks"), vec![]),
        node(
            "ReduceMax",
            v("amax_op"),
            &[&v("abs_blocks"), &v("last_axis")],
            &v("amax"),
            vec![int_attr("keepdims", 1)],
        ),
        node(
            "Mul",
            v("six_sx_op"),
            &[sx, &v("six")],
            &v("six_sx"),
            vec![],
        ),
        node(
            "Div",
            v("scale_op"),
            &[&v("amax"), &v("six_sx")],
            &v("block_scale"),
            vec![],
        ),
        // E4M3 rounding of the block scale, saturating like TensorRT's FP8 conversion.
        node(
            "Cast",
            v("to_fp8"),
            &[&v("block_scale")],
            &v("block_scale_fp8"),
            vec![
                int_attr("to", DataType::FLOAT8E4M3FN.0 as i64),
                int_attr("saturate", 1),
            ],
        ),
        node(
            "Cast",
            v("from_fp8"),
            &[&v("block_scale_fp8")],
            &v("block_scale_q"),
            vec![int_attr("to", DataType::FLOAT.0 as i64)],
        ),
        node(
            "Mul",
            v("dq_scale_op"),
            &[&v("block_scale_q"), sx],
            &v("dq_scale"),
            vec![],
        ),
        node(
            "Equal",
            v("is_zero_op"),
            &[&v("dq_scale"), &v("zero")],
            &v("is_zero"),
            vec![],
        ),
        node(
            "Where",
            v("safe_scale_op"),
            &[&v("is_zero"), &v("one"), &v("dq_scale")],
            &v("safe_scale"),
            vec![],
        ),
        node(
            "Div",
            v("scaled_op"),
            &[&v("blocks"), &v("safe_scale")],
            &v("scaled"),
            vec![],
        ),
        // E2M1 round-to-nearest-even: steps of 0.5 below 2, 1 below 4, 2 above; saturate at 6.
        node("Abs", v("mag_op"), &[&v("scaled")], &v("mag"), vec![]),
        node(
            "Less",
            v("lt2_op"),
            &[&v("mag"), &v("two")],
            &v("lt2"),
            vec![],
        ),
        node(
            "Less",
            v("lt4_op"),
            &[&v("mag"), &v("four")],
            &v("lt4"),
            vec![],
        ),
        node(
            "Where",
            v("step_hi_op"),
            &[&v("lt4"), &v("one"), &v("two")],
            &v("step_hi"),
            vec![],
        ),
        node(
            "Where",
            v("step_op"),
            &[&v("lt2"), &v("half"), &v("step_hi")],
            &v("step"),
            vec![],
        ),
        node(
            "Div",
            v("steps_op"),
            &[&v("mag"), &v("step")],
            &v("steps"),
            vec![],
        ),
        node(
            "Round",
            v("round_op"),
            &[&v("steps")],
            &v("rounded_steps"),
            vec![],
        ),
        node(
            "Mul",
            v("grid_op"),
            &[&v("rounded_steps"), &v("step")],
            &v("grid"),
            vec![],
        ),
        node(
            "Min",
            v("sat_op"),
            &[&v("grid"), &v("six")],
            &v("e2m1_mag"),
            vec![],
        ),
        node("Sign", v("sign_op"), &[&v("scaled")], &v("sign"), vec![]),
        node(
            "Mul",
            v("signed_op"),
            &[&v("e2m1_mag"), &v("sign")],
            &v("e2m1"),
            vec![],
        ),
        node(
            "Mul",
            v("dequant_op"),
            &[&v("e2m1"), &v("dq_scale")],
            &v("dequant_blocks"),
            vec![],
        ),
        node("Shape", v("shape_op"), &[x], &v("x_shape"), vec![]),
        node(
            "Reshape",
            v("unblock"),
            &[&v("dequant_blocks"), &v("x_shape")],
            out,
            vec![],
        ),
    ];
    (nodes, inits)
}

/// bf16 and f16 widened to f32 for ONNX Runtime's CPU provider, which has no bf16 kernels (and f16 ones for few
/// operators): 16-bit initializers and constants become f32 holding the same values, casts to 16 bits become casts
/// to f32, and intermediate types follow. Graph inputs and outputs keep their types (a cast at each), so callers
/// see the same interface. The result computes in f32 on exactly the 16-bit weights: the CPU backend's emulation
/// of a bf16/f16 engine. Returns the number of initializers widened.
pub fn widen_16bit(onnx: &OnnxFile, model: &mut ModelProto) -> Result<usize> {
    let is_16 = |dt: i32| dt == DataType::BFLOAT16.0 || dt == DataType::FLOAT16.0;
    let f32_code = DataType::FLOAT.0;
    let graph = model.graph.as_mut().context("model has no graph")?;
    let external: HashMap<String, Bytes> =
        if graph.initializer.iter().any(|t| external_ref(t).is_some()) {
            onnx.external_weights()?.into_iter().collect()
        } else {
            HashMap::new()
        };
    let widen_tensor = |t: &mut TensorProto| -> Result<()> {
        let dt = DataType(t.data_type);
        let count = t.dims.iter().product::<i64>().max(0) as usize;
        let values = if external_ref(t).is_some() {
            let bytes = external
                .get(&t.name)
                .with_context(|| format!("initializer '{}': external data missing", t.name))?;
            to_f32(dt, bytes, count)
        } else {
            inline_values(t, dt, count)
        }
        .with_context(|| format!("initializer '{}'", t.name))?;
        *t = TensorProto {
            dims: t.dims.clone(),
            data_type: f32_code,
            name: t.name.clone(),
            raw_data: encode(&values, DataType::FLOAT)?,
            ..Default::default()
        };
        Ok(())
    };
    let mut widened = 0;
    for t in &mut graph.initializer {
        if is_16(t.data_type) {
            widen_tensor(t)?;
            widened += 1;
        } else if external_ref(t).is_some() {
            // The result is saved elsewhere: other external tensors are taken in (zero-copy, from the mapping).
            t.raw_data = external
                .get(&t.name)
                .with_context(|| format!("initializer '{}': external data missing", t.name))?
                .clone();
            t.external_data.clear();
            t.data_location = 0;
        }
    }
    for n in &mut graph.node {
        for a in &mut n.attribute {
            match (n.op_type.as_str(), a.name.as_str()) {
                ("Cast", "to") if is_16(a.i as i32) => a.i = f32_code as i64,
                (_, "value") => {
                    if let Some(t) = a.t.as_mut().filter(|t| is_16(t.data_type)) {
                        widen_tensor(t)?;
                    }
                }
                _ => {}
            }
        }
    }
    let retype = |v: &mut ValueInfoProto| {
        if let Some(tt) = v
            .r#type
            .as_mut()
            .and_then(|t| t.tensor_type.as_mut())
            .filter(|tt| is_16(tt.elem_type))
        {
            tt.elem_type = f32_code;
        }
    };
    graph.value_info.iter_mut().for_each(retype);
    // The interface keeps its 16-bit types: a cast from each 16-bit input, a cast to each 16-bit output.
    let elem = |v: &ValueInfoProto| {
        v.r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .map_or(0, |tt| tt.elem_type)
    };
    let cast = |input: &str, output: &str, to: i32| NodeProto {
        input: vec![input.into()],
        output: vec![output.into()],
        name: format!("{output}/widen_cast"),
        op_type: "Cast".into(),
        attribute: vec![AttributeProto {
            name: "to".into(),
            r#type: attr_type::INT,
            i: to as i64,
            ..Default::default()
        }],
        ..Default::default()
    };
    let mut front = Vec::new();
    for v in graph.input.iter().filter(|v| is_16(elem(v))) {
        let wide = format!("{}/f32", v.name);
        for n in &mut graph.node {
            n.input
                .iter_mut()
                .filter(|i| **i == v.name)
                .for_each(|i| *i = wide.clone());
        }
        front.push(cast(&v.name, &wide, f32_code));
    }
    let mut back = Vec::new();
    for v in graph.output.iter().filter(|v| is_16(elem(v))) {
        let wide = format!("{}/f32", v.name);
        for n in &mut graph.node {
            n.output
                .iter_mut()
                .filter(|o| **o == v.name)
                .for_each(|o| *o = wide.clone());
            n.input
                .iter_mut()
                .filter(|i| **i == v.name)
                .for_each(|i| *i = wide.clone());
        }
        back.push(cast(&wide, &v.name, elem(v)));
    }
    front.append(&mut graph.node);
    front.append(&mut back);
    graph.node = front;
    Ok(widened)
}

/// Whether a model computes in bf16 or f16: a 16-bit value (initializer, constant, input or cast result) feeds
/// an operator other than a Cast. 16-bit weights that are only cast to f32 (checkpoint dtypes kept on disk) need
/// no widening, which would double their memory.
pub fn computes_in_16bit(model: &ModelProto) -> bool {
    let is_16 = |dt: i64| dt == DataType::BFLOAT16.0 as i64 || dt == DataType::FLOAT16.0 as i64;
    let Some(g) = model.graph.as_ref() else {
        return false;
    };
    let elem = |v: &ValueInfoProto| {
        v.r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .map_or(0, |tt| tt.elem_type as i64)
    };
    let mut half: HashSet<&str> = g
        .initializer
        .iter()
        .filter(|t| is_16(t.data_type as i64))
        .map(|t| t.name.as_str())
        .chain(
            g.input
                .iter()
                .filter(|v| is_16(elem(v)))
                .map(|v| v.name.as_str()),
        )
        .collect();
    for n in &g.node {
        let makes_16 = match n.op_type.as_str() {
            "Cast" => n.attribute.iter().any(|a| a.name == "to" && is_16(a.i)),
            "Constant" => n
                .attribute
                .iter()
                .any(|a| a.t.as_ref().is_some_and(|t| is_16(t.data_type as i64))),
            _ => false,
        };
        if makes_16 {
            half.extend(n.output.iter().map(String::as_str));
        }
    }
    g.node
        .iter()
        .any(|n| n.op_type != "Cast" && n.input.iter().any(|i| half.contains(i.as_str())))
}
