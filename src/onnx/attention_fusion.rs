//! Fuses the exported attention pattern into ONNX Runtime's `com.microsoft.MultiHeadAttention` for its CUDA
//! provider, which runs it with flash / memory-efficient kernels instead of writing the [seq, seq] score matrix
//! to memory three times (MatMul, scale, Softmax, MatMul: over a gigabyte per block at FLUX.1's 4,608 tokens).
//!
//! The pattern is what `models::qdq::attention`, `models::ops::attention` and the VAE's mid-block attention emit:
//! `MatMul(q, Transpose(k)) -> [Mul(scalar)] -> [Cast] -> Softmax(last axis) -> [Cast] -> MatMul(., v)`, over
//! [batch, heads, seq, head_dim] (or [batch, seq, channels] with one head). Every head becomes a batch entry
//! (`[batch*heads, seq, head_dim]` is a free reshape of the heads-major layout), so the fused node needs
//! `num_heads = 1` and no head count from the graph. Patterns with an additive bias or mask, with Q/DQ inside
//! (FP8 attention) or whose intermediates feed anything else are left as they are. The weights are untouched:
//! only nodes change, so the rewritten graph still reads its external data where it was.
use super::cpu_pass::{int_attr, node};
use super::dequantize::to_f32;
use super::dtype::DataType;
use super::model::external_ref;
use super::proto::{
    AttributeProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto, attr_type,
};
use anyhow::Result;
use bytes::Bytes;
use std::collections::HashMap;

/// The operator domain of ONNX Runtime's contrib operators.
pub(crate) const MS_DOMAIN: &str = "com.microsoft";

/// One matched attention: the nodes it replaces and what the fused node needs.
struct Match {
    remove: Vec<usize>,
    q: String,
    /// The key's source and the permutation that makes it [batch, heads, seq, head_dim] (None: as it is).
    k: (String, Option<Vec<i64>>),
    v: String,
    scale: f32,
    out: String,
    rank: usize,
    /// Where the fused nodes go: the final MatMul's position (every input is produced before it).
    at: usize,
}

/// Rewrites every matching attention in `model` into MultiHeadAttention; returns how many.
pub fn fuse_attention(model: &mut ModelProto) -> Result<usize> {
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(0, |o| o.version);
    // `Shape(start=..)` needs opset 15.
    if opset < 15 {
        return Ok(0);
    }
    let fused = rewrite(model, |cx| {
        (0..cx.nodes.len())
            .filter_map(|i| cx.match_at(i))
            .enumerate()
            .map(|(n, m)| {
                let (nodes, inits) = fused_nodes(&m, n);
                Rewrite {
                    remove: m.remove,
                    at: m.at,
                    nodes,
                    inits,
                }
            })
            .collect()
    });
    Ok(fused)
}

/// One replacement: nodes `remove` go, `nodes` (and their constants `inits`) go where node `at` was.
pub(crate) struct Rewrite {
    pub remove: Vec<usize>,
    pub at: usize,
    pub nodes: Vec<NodeProto>,
    pub inits: Vec<TensorProto>,
}

/// Applies the rewrites `find` makes from the graph's [`Context`] (non-overlapping, each node removed once) and
/// declares ONNX Runtime's contrib domain when any was made; returns how many.
pub(crate) fn rewrite(
    model: &mut ModelProto,
    find: impl FnOnce(&Context) -> Vec<Rewrite>,
) -> usize {
    let Some(graph) = model.graph.as_mut() else {
        return 0;
    };
    let rewrites = {
        let producer: HashMap<&str, usize> = graph
            .node
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.output.iter().map(move |o| (o.as_str(), i)))
            .collect();
        let mut consumers: HashMap<&str, usize> = HashMap::new();
        for n in &graph.node {
            for i in n.input.iter().filter(|i| !i.is_empty()) {
                *consumers.entry(i.as_str()).or_default() += 1;
            }
        }
        for o in &graph.output {
            *consumers.entry(o.name.as_str()).or_default() += 2;
        }
        let inits: HashMap<&str, &TensorProto> = graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        find(&Context {
            nodes: &graph.node,
            producer,
            consumers,
            inits,
        })
    };
    if rewrites.is_empty() {
        return 0;
    }
    let mut removed = vec![false; graph.node.len()];
    let mut inserted: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut initializers = Vec::new();
    let n = rewrites.len();
    for r in rewrites {
        r.remove.iter().for_each(|&i| removed[i] = true);
        inserted.entry(r.at).or_default().extend(r.nodes);
        initializers.extend(r.inits);
    }
    let old = std::mem::take(&mut graph.node);
    for (i, node) in old.into_iter().enumerate() {
        if let Some(new) = inserted.remove(&i) {
            graph.node.extend(new);
        }
        if !removed[i] {
            graph.node.push(node);
        }
    }
    graph.initializer.extend(initializers);
    if !model.opset_import.iter().any(|o| o.domain == MS_DOMAIN) {
        model.opset_import.push(OperatorSetIdProto {
            domain: MS_DOMAIN.to_string(),
            version: 1,
        });
    }
    n
}

/// A graph's nodes with who makes and who reads each value, for pattern matching.
pub(crate) struct Context<'a> {
    pub nodes: &'a [NodeProto],
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, usize>,
    pub inits: HashMap<&'a str, &'a TensorProto>,
}

impl Context<'_> {
    /// The node of type `op` (default domain, one output, as many inputs as the operator takes: a malformed graph
    /// matches nothing rather than panic) that makes `value`.
    pub fn produced_by(&self, value: &str, op: &str) -> Option<usize> {
        let &i = self.producer.get(value)?;
        let n = &self.nodes[i];
        let arity_ok = match op {
            "Mul" | "Add" | "Sub" | "Div" | "MatMul" => n.input.len() == 2,
            "ReduceMean" => (1..=2).contains(&n.input.len()),
            _ => n.input.len() == 1,
        };
        (n.op_type == op && n.domain.is_empty() && n.output.len() == 1 && arity_ok).then_some(i)
    }

    /// Used by exactly one node input and not a graph output.
    pub fn private(&self, value: &str) -> bool {
        self.consumers.get(value) == Some(&1)
    }

    /// A scalar constant initializer's value (inline data only: a scale is never external).
    pub fn scalar(&self, name: &str) -> Option<f32> {
        let t = self.inits.get(name)?;
        if external_ref(t).is_some() || t.dims.iter().product::<i64>() != 1 {
            return None;
        }
        let dt = DataType(t.data_type);
        let values = if !t.raw_data.is_empty() {
            to_f32(dt, &t.raw_data, 1).ok()?
        } else if dt == DataType::FLOAT {
            t.float_data.clone()
        } else {
            return None;
        };
        values
            .first()
            .copied()
            .filter(|v| v.is_finite() && *v > 0.0)
    }

    /// The attention ending in the MatMul at `pv`, if it is one.
    fn match_at(&self, pv: usize) -> Option<Match> {
        let n = &self.nodes[pv];
        if n.op_type != "MatMul" || !n.domain.is_empty() || n.input.len() != 2 {
            return None;
        }
        let mut remove = vec![pv];
        // Probabilities: Softmax over the last axis, optionally cast back to the model's type.
        let mut p = n.input[0].as_str();
        if let Some(c) = self.produced_by(p, "Cast") {
            if !self.private(p) {
                return None;
            }
            remove.push(c);
            p = self.nodes[c].input[0].as_str();
        }
        let sm = self.produced_by(p, "Softmax")?;
        if !self.private(p) {
            return None;
        }
        remove.push(sm);
        let axis = attr(&self.nodes[sm], "axis").map_or(-1, |a| a.i);
        // Scores: an optional Cast and an optional scalar Mul, in either order, then MatMul(q, k^T).
        let mut s = self.nodes[sm].input[0].as_str();
        let mut scale = None;
        loop {
            if !self.private(s) {
                return None;
            }
            if let Some(c) = self.produced_by(s, "Cast") {
                remove.push(c);
                s = self.nodes[c].input[0].as_str();
            } else if let Some(m) = self.produced_by(s, "Mul") {
                if scale.is_some() {
                    return None;
                }
                let [a, b] = [&self.nodes[m].input[0], &self.nodes[m].input[1]];
                let (x, c) = match (self.scalar(a), self.scalar(b)) {
                    (None, Some(c)) => (a, c),
                    (Some(c), None) => (b, c),
                    _ => return None,
                };
                scale = Some(c);
                remove.push(m);
                s = x.as_str();
            } else {
                break;
            }
        }
        let qk = self.produced_by(s, "MatMul")?;
        remove.push(qk);
        let q = self.nodes[qk].input[0].clone();
        let kt = self.nodes[qk].input[1].as_str();
        let t = self.produced_by(kt, "Transpose")?;
        let perm: Vec<i64> = attr(&self.nodes[t], "perm")?.ints.clone();
        let rank = perm.len();
        if !(rank == 3 || rank == 4) || !(axis == -1 || axis == rank as i64 - 1) {
            return None;
        }
        if self.private(kt) {
            remove.push(t);
        }
        // k^T = Transpose(x, perm), so k = Transpose(x, perm with its last two entries swapped).
        let mut kperm = perm.clone();
        kperm.swap(rank - 2, rank - 1);
        let identity = kperm.iter().enumerate().all(|(i, &p)| p == i as i64);
        let k = (self.nodes[t].input[0].clone(), (!identity).then_some(kperm));
        Some(Match {
            remove,
            q,
            k,
            v: n.input[1].clone(),
            scale: scale.unwrap_or(1.0),
            out: n.output[0].clone(),
            rank,
            at: pv,
        })
    }
}

pub(crate) fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn ints_attr(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::INTS,
        ints,
        ..Default::default()
    }
}

pub(crate) fn float_attr(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attr_type::FLOAT,
        f,
        ..Default::default()
    }
}

/// The fused nodes for match number `n`, writing the original output name, and their constants.
fn fused_nodes(m: &Match, n: usize) -> (Vec<NodeProto>, Vec<TensorProto>) {
    let p = format!("trt_diff_mha_{n}");
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let k = match &m.k.1 {
        None => m.k.0.clone(),
        Some(perm) => {
            let k = format!("{p}/k");
            nodes.push(node(
                "Transpose",
                k.clone(),
                &[&m.k.0],
                &k,
                vec![ints_attr("perm", perm.clone())],
            ));
            k
        }
    };
    let mha = |q: &str, k: &str, v: &str, out: &str| {
        let mut n = node(
            "MultiHeadAttention",
            format!("{p}/mha"),
            &[q, k, v],
            out,
            vec![int_attr("num_heads", 1), float_attr("scale", m.scale)],
        );
        n.domain = MS_DOMAIN.to_string();
        n
    };
    if m.rank == 3 {
        nodes.push(mha(&m.q, &k, &m.v, &m.out));
        return (nodes, inits);
    }
    // [batch, heads, seq, head_dim] -> [batch*heads, seq, head_dim] and back.
    let minus_one = format!("{p}.minus_one");
    inits.push(TensorProto {
        dims: vec![1],
        data_type: DataType::INT64.0,
        name: minus_one.clone(),
        raw_data: Bytes::from((-1i64).to_le_bytes().to_vec()),
        ..Default::default()
    });
    let mut flat = |x: &str, tag: &str| {
        let tail = format!("{p}/{tag}_tail");
        let shape = format!("{p}/{tag}_flat_shape");
        let out = format!("{p}/{tag}_flat");
        nodes.push(node(
            "Shape",
            tail.clone(),
            &[x],
            &tail,
            vec![int_attr("start", 2)],
        ));
        nodes.push(node(
            "Concat",
            shape.clone(),
            &[&minus_one, &tail],
            &shape,
            vec![int_attr("axis", 0)],
        ));
        nodes.push(node("Reshape", out.clone(), &[x, &shape], &out, vec![]));
        out
    };
    let q3 = flat(&m.q, "q");
    let k3 = flat(&k, "k");
    let v3 = flat(&m.v, "v");
    let o3 = format!("{p}/out_flat");
    nodes.push(mha(&q3, &k3, &v3, &o3));
    // Back to [batch, heads, seq_q, head_dim_v]: q's first three dimensions, v's last.
    let (qs, vs, shape) = (
        format!("{p}/q_lead"),
        format!("{p}/v_last"),
        format!("{p}/out_shape"),
    );
    nodes.push(node(
        "Shape",
        qs.clone(),
        &[&m.q],
        &qs,
        vec![int_attr("end", 3)],
    ));
    nodes.push(node(
        "Shape",
        vs.clone(),
        &[&m.v],
        &vs,
        vec![int_attr("start", 3)],
    ));
    nodes.push(node(
        "Concat",
        shape.clone(),
        &[&qs, &vs],
        &shape,
        vec![int_attr("axis", 0)],
    ));
    nodes.push(node(
        "Reshape",
        format!("{p}/out"),
        &[&o3, &shape],
        &m.out,
        vec![],
    ));
    (nodes, inits)
}
