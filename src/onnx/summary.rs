//! What `trt-diff inspect` reports about an ONNX file.
use super::builder::Dim;
use super::dtype::DataType;
use super::model::{OnnxFile, external_ref};
use super::proto::{AttributeProto, DimensionValue, NodeProto, ValueInfoProto};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Serialize)]
pub struct TensorDesc {
    pub name: String,
    pub dtype: String,
    /// Sizes, with symbolic dimensions as their names and unknown ones as "?".
    pub shape: Vec<String>,
}

#[derive(Serialize, Default)]
pub struct BytesByType {
    pub count: usize,
    pub inline_bytes: u64,
    pub external_bytes: u64,
}

/// One quantize/dequantize step: which node, which format, at what granularity.
#[derive(Serialize)]
pub struct QdqDesc {
    pub node: String,
    pub op: String,
    pub format: String,
    pub granularity: String,
}

#[derive(Serialize)]
pub struct OnnxSummary {
    pub path: String,
    pub file_bytes: u64,
    pub ir_version: i64,
    pub producer: String,
    pub opsets: BTreeMap<String, i64>,
    pub inputs: Vec<TensorDesc>,
    pub outputs: Vec<TensorDesc>,
    pub nodes: usize,
    pub op_histogram: BTreeMap<String, usize>,
    pub initializers: BTreeMap<String, BytesByType>,
    pub external_files: Vec<String>,
    pub qdq: Vec<QdqDesc>,
}

pub fn dims_of(v: &ValueInfoProto) -> Option<Vec<Dim>> {
    let shape = v.r#type.as_ref()?.tensor_type.as_ref()?.shape.as_ref()?;
    Some(
        shape
            .dim
            .iter()
            .map(|d| match &d.value {
                Some(DimensionValue::DimValue(v)) => Dim::Fixed(*v),
                Some(DimensionValue::DimParam(p)) => Dim::Sym(p.clone()),
                None => Dim::Sym(String::new()),
            })
            .collect(),
    )
}

pub fn elem_type(v: &ValueInfoProto) -> DataType {
    DataType(
        v.r#type
            .as_ref()
            .and_then(|t| t.tensor_type.as_ref())
            .map(|t| t.elem_type)
            .unwrap_or(0),
    )
}

fn describe(v: &ValueInfoProto) -> TensorDesc {
    let shape = dims_of(v)
        .map(|d| {
            d.into_iter()
                .map(|d| match d {
                    Dim::Fixed(v) => v.to_string(),
                    Dim::Sym(s) if s.is_empty() => "?".into(),
                    Dim::Sym(s) => s,
                })
                .collect()
        })
        .unwrap_or_default();
    TensorDesc {
        name: v.name.clone(),
        dtype: elem_type(v).name(),
        shape,
    }
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

impl OnnxSummary {
    pub fn of(f: &OnnxFile) -> Self {
        let model = &f.model;
        let graph = model.graph.clone().unwrap_or_default();
        let initializer_names: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut op_histogram = BTreeMap::new();
        for n in &graph.node {
            let key = if n.domain.is_empty() || n.domain == "ai.onnx" {
                n.op_type.clone()
            } else {
                format!("{}::{}", n.domain, n.op_type)
            };
            *op_histogram.entry(key).or_insert(0) += 1;
        }
        let mut initializers: BTreeMap<String, BytesByType> = BTreeMap::new();
        let mut external_files = Vec::new();
        let mut types: HashMap<&str, DataType> = HashMap::new();
        let mut shapes: HashMap<&str, &[i64]> = HashMap::new();
        for t in &graph.initializer {
            let dt = DataType(t.data_type);
            types.insert(&t.name, dt);
            shapes.insert(&t.name, &t.dims);
            let e = initializers.entry(dt.name()).or_default();
            e.count += 1;
            let count: i64 = t.dims.iter().product();
            let bytes = dt.storage_bytes(count.max(0) as u64).unwrap_or(0);
            match external_ref(t) {
                Some(r) => {
                    e.external_bytes += r.length.unwrap_or(bytes);
                    if !external_files.contains(&r.location) {
                        external_files.push(r.location);
                    }
                }
                None => e.inline_bytes += bytes,
            }
        }
        for v in graph
            .input
            .iter()
            .chain(&graph.value_info)
            .chain(&graph.output)
        {
            types.entry(&v.name).or_insert(elem_type(v));
        }
        let mut qdq = Vec::new();
        for n in &graph.node {
            let block = attr(n, "block_size").map(|a| a.i).unwrap_or(0);
            let axis = attr(n, "axis").map(|a| a.i).unwrap_or(1);
            let scale_rank = n
                .input
                .get(1)
                .and_then(|s| shapes.get(s.as_str()))
                .map(|d| d.len());
            let granularity = if block > 0 {
                format!("blocked (block {block}, axis {axis})")
            } else {
                match scale_rank {
                    Some(0) => "per-tensor".into(),
                    Some(_) => format!("per-channel (axis {axis})"),
                    None => "computed scale".into(),
                }
            };
            let format = match n.op_type.as_str() {
                "QuantizeLinear" => {
                    let dt = attr(n, "output_dtype")
                        .map(|a| DataType(a.i as i32))
                        .filter(|d| d.0 != 0)
                        .or_else(|| n.input.get(2).and_then(|z| types.get(z.as_str()).copied()))
                        .unwrap_or(DataType::UINT8);
                    if let Some(o) = n.output.first() {
                        types.insert(o, dt);
                    }
                    dt.name()
                }
                "DequantizeLinear" => n
                    .input
                    .first()
                    .and_then(|x| types.get(x.as_str()))
                    .map(|d| d.name())
                    .unwrap_or_else(|| "?".into()),
                "TRT_FP4DynamicQuantize" => {
                    if let [x, s, ..] = n.output.as_slice() {
                        types.insert(x, DataType::FLOAT4E2M1);
                        types.insert(s, DataType::FLOAT8E4M3FN);
                    }
                    "float4e2m1 (dynamic, E4M3 block scales)".into()
                }
                _ => continue,
            };
            let is_weight = n
                .input
                .first()
                .is_some_and(|x| initializer_names.contains(x.as_str()));
            qdq.push(QdqDesc {
                node: n.name.clone(),
                op: n.op_type.clone(),
                format,
                granularity: if is_weight {
                    format!("{granularity}, weight")
                } else {
                    granularity
                },
            });
        }
        OnnxSummary {
            path: f.path.display().to_string(),
            file_bytes: f.file_bytes,
            ir_version: model.ir_version,
            producer: format!("{} {}", model.producer_name, model.producer_version)
                .trim()
                .to_string(),
            opsets: model
                .opset_import
                .iter()
                .map(|o| {
                    let d = if o.domain.is_empty() {
                        "ai.onnx".to_string()
                    } else {
                        o.domain.clone()
                    };
                    (d, o.version)
                })
                .collect(),
            inputs: graph
                .input
                .iter()
                .filter(|v| !initializer_names.contains(v.name.as_str()))
                .map(describe)
                .collect(),
            outputs: graph.output.iter().map(describe).collect(),
            nodes: graph.node.len(),
            op_histogram,
            initializers,
            external_files,
            qdq,
        }
    }
}
