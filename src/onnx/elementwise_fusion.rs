//! Fuses the exported GELU (tanh approximation) and RMSNorm patterns into one ONNX Runtime operator each, for its
//! CUDA provider: `com.microsoft.FastGelu` and `SimplifiedLayerNormalization`. Written out, a GELU is nine
//! element-wise nodes and an RMSNorm six, each reading and writing the whole activation: at FLUX.1's 4,608 tokens
//! that traffic, not the matrix products, was most of the gap to PyTorch (docs/gpu/README.md, run 5).
//!
//! The patterns are what `models::ops::gelu_tanh` and the RMSNorms of `models::ops` / `models::llama` emit:
//! - `x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x*x*x)))`, the constants in the graph's type (bf16 ones
//!   accepted: FastGelu uses the exact values);
//! - `Mul(x / Sqrt(ReduceMean(x*x, last axis) + eps), w)` with a 1-D f32 weight `w`.
//!
//! Intermediates that feed anything else keep the pattern as it is. Only nodes change: the weights stay where they
//! were (external data included).
use super::attention_fusion::{Context, MS_DOMAIN, Rewrite, attr, float_attr, rewrite};
use super::cpu_pass::{int_attr, node};
use super::dtype::DataType;
use super::proto::ModelProto;

/// Rewrites every GELU (tanh approximation) in `model` into FastGelu; returns how many.
pub fn fuse_gelu(model: &mut ModelProto) -> usize {
    rewrite(model, |cx| {
        (0..cx.nodes.len())
            .filter_map(|i| gelu_at(cx, i))
            .enumerate()
            .map(|(n, (remove, x))| {
                let at = remove[0];
                let out = &cx.nodes[at].output[0];
                let mut fused = node("FastGelu", format!("trt_diff_gelu_{n}"), &[&x], out, vec![]);
                fused.domain = MS_DOMAIN.to_string();
                Rewrite {
                    remove,
                    at,
                    nodes: vec![fused],
                    inits: vec![],
                }
            })
            .collect()
    })
}

/// Rewrites every RMSNorm in `model` into SimplifiedLayerNormalization; returns how many.
pub fn fuse_rms_norm(model: &mut ModelProto) -> usize {
    rewrite(model, |cx| {
        (0..cx.nodes.len())
            .filter_map(|i| rms_norm_at(cx, i))
            .enumerate()
            .map(|(n, m)| {
                let fused = node(
                    "SimplifiedLayerNormalization",
                    format!("trt_diff_rms_norm_{n}"),
                    &[&m.x, &m.weight],
                    &cx.nodes[m.at].output[0],
                    vec![
                        int_attr("axis", -1),
                        float_attr("epsilon", m.eps),
                        int_attr("stash_type", 1),
                    ],
                );
                Rewrite {
                    remove: m.remove,
                    at: m.at,
                    nodes: vec![fused],
                    inits: vec![],
                }
            })
            .collect()
    })
}

/// `v` is within 1% of `want` (constants stored in bf16 round to 3 significant digits).
fn near(v: f32, want: f32) -> bool {
    ((v - want) / want).abs() < 1e-2
}

/// The two inputs of node `i` as (the one that is a scalar near `want`, the other).
fn with_scalar<'a>(cx: &'a Context, i: usize, want: f32) -> Option<&'a str> {
    let n = &cx.nodes[i];
    let [a, b] = [&n.input[0], &n.input[1]];
    match (cx.scalar(a), cx.scalar(b)) {
        (None, Some(c)) if near(c, want) => Some(a),
        (Some(c), None) if near(c, want) => Some(b),
        _ => None,
    }
}

/// The input of the two-input node `i` that is not `x` (None unless exactly one is).
fn other_than<'a>(cx: &'a Context, i: usize, x: &str) -> Option<&'a str> {
    let n = &cx.nodes[i];
    match (n.input[0] == x, n.input[1] == x) {
        (true, false) => Some(&n.input[1]),
        (false, true) => Some(&n.input[0]),
        _ => None,
    }
}

/// A private value made by an `op` node: the node.
fn private_op(cx: &Context, value: &str, op: &str) -> Option<usize> {
    cx.private(value)
        .then(|| cx.produced_by(value, op))
        .flatten()
}

/// The GELU ending in the Mul at `i`: the nodes it replaces (the final Mul first) and its input.
fn gelu_at(cx: &Context, i: usize) -> Option<(Vec<usize>, String)> {
    let n = &cx.nodes[i];
    if n.op_type != "Mul" || !n.domain.is_empty() || n.input.len() != 2 {
        return None;
    }
    // Either order of `x * 0.5` and `1 + tanh(..)`.
    let (half, one_plus) = [(0, 1), (1, 0)].into_iter().find_map(|(a, b)| {
        let h = private_op(cx, &n.input[a], "Mul")?;
        let o = private_op(cx, &n.input[b], "Add")?;
        Some((h, o))
    })?;
    let x = with_scalar(cx, half, 0.5)?;
    let t = private_op(cx, with_scalar(cx, one_plus, 1.0)?, "Tanh")?;
    let scaled = private_op(cx, &cx.nodes[t].input[0], "Mul")?;
    let k = (2.0f64 / std::f64::consts::PI).sqrt() as f32;
    let inner = private_op(cx, with_scalar(cx, scaled, k)?, "Add")?;
    let cx3 = private_op(cx, other_than(cx, inner, x)?, "Mul")?;
    let x3 = private_op(cx, with_scalar(cx, cx3, 0.044715)?, "Mul")?;
    let x2 = private_op(cx, other_than(cx, x3, x)?, "Mul")?;
    if cx.nodes[x2].input.iter().any(|v| v != x) {
        return None;
    }
    Some((
        vec![i, half, one_plus, t, scaled, inner, cx3, x3, x2],
        x.to_string(),
    ))
}

struct RmsNorm {
    remove: Vec<usize>,
    at: usize,
    x: String,
    weight: String,
    eps: f32,
}

/// The RMSNorm ending in the weight Mul at `i`.
fn rms_norm_at(cx: &Context, i: usize) -> Option<RmsNorm> {
    let n = &cx.nodes[i];
    if n.op_type != "Mul" || !n.domain.is_empty() || n.input.len() != 2 {
        return None;
    }
    // `normed * w` with w a 1-D f32 weight, either order.
    let (div, weight) = [(0, 1), (1, 0)].into_iter().find_map(|(a, b)| {
        is_f32_vector(cx, &n.input[b])
            .then(|| Some((private_op(cx, &n.input[a], "Div")?, n.input[b].clone())))
            .flatten()
    })?;
    let x = cx.nodes[div].input[0].clone();
    let sqrt = private_op(cx, &cx.nodes[div].input[1], "Sqrt")?;
    let add = private_op(cx, &cx.nodes[sqrt].input[0], "Add")?;
    let na = &cx.nodes[add];
    let (mean_out, eps) = match (cx.scalar(&na.input[0]), cx.scalar(&na.input[1])) {
        (None, Some(e)) => (&na.input[0], e),
        (Some(e), None) => (&na.input[1], e),
        _ => return None,
    };
    let mean = private_op(cx, mean_out, "ReduceMean")?;
    let nm = &cx.nodes[mean];
    if attr(nm, "keepdims").is_some_and(|a| a.i != 1) || !last_axis_only(cx, nm) {
        return None;
    }
    let sq = private_op(cx, &nm.input[0], "Mul")?;
    if cx.nodes[sq].input.iter().any(|v| *v != x) {
        return None;
    }
    Some(RmsNorm {
        remove: vec![i, div, sqrt, add, mean, sq],
        at: i,
        x,
        weight,
        eps,
    })
}

/// `v` is a 1-D f32 initializer, or one cast to f32 (weights stored in the checkpoint's type).
fn is_f32_vector(cx: &Context, v: &str) -> bool {
    let vector = |name: &str, ty: Option<DataType>| {
        cx.inits
            .get(name)
            .is_some_and(|t| t.dims.len() == 1 && ty.is_none_or(|ty| DataType(t.data_type) == ty))
    };
    if vector(v, Some(DataType::FLOAT)) {
        return true;
    }
    cx.produced_by(v, "Cast").is_some_and(|c| {
        let n = &cx.nodes[c];
        attr(n, "to").is_some_and(|a| a.i == DataType::FLOAT.0 as i64) && vector(&n.input[0], None)
    })
}

/// The ReduceMean reduces the last axis only (axes as an input, opset 18, or as an attribute before).
fn last_axis_only(cx: &Context, n: &super::proto::NodeProto) -> bool {
    if let Some(a) = attr(n, "axes") {
        return a.ints == [-1];
    }
    let Some(t) = n.input.get(1).and_then(|a| cx.inits.get(a.as_str())) else {
        return false;
    };
    DataType(t.data_type) == DataType::INT64 && t.raw_data.as_ref() == (-1i64).to_le_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::proto::{GraphProto, NodeProto};

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn malformed_graphs_match_nothing_and_do_not_panic() {
        // Operators with too few inputs where the patterns index them (a hostile or broken ONNX).
        let nodes = vec![
            node("Tanh", &[], "t"),
            node("Add", &["t"], "one_plus"),
            node("Mul", &["x"], "half"),
            node("Mul", &["half", "one_plus"], "gelu"),
            node("Sqrt", &[], "r"),
            node("Div", &["x"], "y"),
            node("Mul", &["y", "w"], "out"),
        ];
        let mut model = ModelProto {
            graph: Some(GraphProto {
                node: nodes,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(fuse_gelu(&mut model), 0);
        assert_eq!(fuse_rms_norm(&mut model), 0);
    }
}
