//! A small typed graph builder. Models call it to emit ONNX: every value carries its dtype and (symbolic) shape,
//! names are stable and unique (refit maps weights by name), and initializers hold `Bytes` so weights taken from a
//! memory-mapped checkpoint are never copied before they are written.
use super::dtype::DataType;
use super::proto::*;
use anyhow::{Result, bail};
use bytes::Bytes;
use std::collections::{BTreeMap, HashSet};

/// One dimension: a fixed size or a named symbolic size (a dynamic axis).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    Sym(String),
}

impl From<i64> for Dim {
    fn from(v: i64) -> Self {
        Dim::Fixed(v)
    }
}
impl From<&str> for Dim {
    fn from(v: &str) -> Self {
        Dim::Sym(v.to_string())
    }
}

/// Builds a `Vec<Dim>` from a mix of sizes and names: `shape![ "batch", 64 ]`.
#[macro_export]
macro_rules! shape {
    ($($d:expr),* $(,)?) => { vec![$($crate::onnx::Dim::from($d)),*] };
}

/// A value in the graph under construction.
#[derive(Clone, Debug)]
pub struct Value {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<Dim>,
}

impl Value {
    /// An optional input left out (ONNX names it "").
    pub fn absent() -> Value {
        Value {
            name: String::new(),
            dtype: DataType::UNDEFINED,
            shape: vec![],
        }
    }
}

pub enum Attr {
    Int(i64),
    Float(f32),
    Str(String),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
}

pub struct GraphBuilder {
    name: String,
    opsets: BTreeMap<String, i64>,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
    names: HashSet<String>,
    node_names: HashSet<String>,
    producer: String,
    sink: Option<ExternalSink>,
}

/// Streams large initializers to an external data file as they are added, so an exporter never holds a whole
/// model's weights in memory (see [`GraphBuilder::stream_external_data`]). A writer thread does the writing, so
/// writing one tensor overlaps computing (e.g. quantizing) the next; at most [`ExternalSink::QUEUE`] tensors wait.
pub struct ExternalSink {
    data_name: String,
    offset: u64,
    threshold: usize,
    /// (zero padding, bytes) to the writer thread.
    tx: Option<std::sync::mpsc::SyncSender<(u64, Bytes)>>,
    writer: Option<std::thread::JoinHandle<Result<crate::fsutil::AtomicFile>>>,
}

impl ExternalSink {
    /// Tensors queued for the writer at most (bounds the memory of quantized tensors waiting to be written).
    pub const QUEUE: usize = 2;

    fn new(file: crate::fsutil::AtomicFile, data_name: String, threshold: usize) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u64, Bytes)>(Self::QUEUE);
        let name = data_name.clone();
        let writer = std::thread::spawn(move || -> Result<crate::fsutil::AtomicFile> {
            use std::io::Write;
            let mut file = file;
            let mut behind = crate::fsutil::WriteBehind::default();
            for (pad, data) in rx {
                file.write_all(&vec![0u8; pad as usize])
                    .and_then(|_| file.write_all(&data))
                    .and_then(|_| behind.advance(pad + data.len() as u64, || file.flushed_file()))
                    .map_err(|e| anyhow::anyhow!("writing external data '{name}' failed: {e}"))?;
            }
            Ok(file)
        });
        ExternalSink {
            data_name,
            offset: 0,
            threshold,
            tx: Some(tx),
            writer: Some(writer),
        }
    }

    /// The writer's error once it has stopped (it only stops early on an error).
    fn writer_error(&mut self) -> anyhow::Error {
        self.tx = None;
        match self.writer.take().map(|w| w.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => anyhow::anyhow!("the writer of '{}' panicked", self.data_name),
            _ => anyhow::anyhow!("writing external data '{}' stopped", self.data_name),
        }
    }

    fn put(&mut self, t: &mut TensorProto) -> Result<()> {
        // Page alignment lets readers mmap big tensors directly; small ones only need 64-byte alignment.
        let align: u64 = if t.raw_data.len() >= (1 << 20) {
            4096
        } else {
            64
        };
        let pad = self.offset.next_multiple_of(align) - self.offset;
        self.offset += pad;
        let data = std::mem::take(&mut t.raw_data);
        let len = data.len() as u64;
        let sent = self.tx.as_ref().map(|tx| tx.send((pad, data)).is_ok());
        if sent != Some(true) {
            return Err(self.writer_error());
        }
        t.data_location = DATA_LOCATION_EXTERNAL;
        let entry = |k: &str, v: String| StringStringEntryProto {
            key: k.to_string(),
            value: v,
        };
        t.external_data = vec![
            entry("location", self.data_name.clone()),
            entry("offset", self.offset.to_string()),
            entry("length", len.to_string()),
        ];
        self.offset += len;
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// Waits for the writer, then renames the data file into place; call before saving the model that refers to
    /// it.
    pub fn commit(mut self) -> Result<u64> {
        self.tx = None;
        let file = match self.writer.take().map(|w| w.join()) {
            Some(Ok(r)) => r?,
            _ => bail!("the writer of '{}' panicked", self.data_name),
        };
        file.commit()?;
        Ok(self.offset)
    }
}

impl Drop for ExternalSink {
    /// Without a commit the writer finishes and its temporary file is removed before this returns.
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

fn unique_in(set: &mut HashSet<String>, base: &str) -> String {
    let mut candidate = base.to_string();
    let mut i = 0;
    while set.contains(&candidate) {
        i += 1;
        candidate = format!("{base}_{i}");
    }
    set.insert(candidate.clone());
    candidate
}

pub fn value_info(name: &str, dtype: DataType, shape: &[Dim]) -> ValueInfoProto {
    let dim = shape
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => DimensionValue::DimValue(*v),
                Dim::Sym(s) => DimensionValue::DimParam(s.clone()),
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: dtype.0,
                shape: Some(TensorShapeProto { dim }),
            }),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

impl GraphBuilder {
    /// A graph importing the default ONNX domain at `opset`.
    pub fn new(name: &str, opset: i64) -> Self {
        let mut opsets = BTreeMap::new();
        opsets.insert(String::new(), opset);
        Self {
            name: name.to_string(),
            opsets,
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializers: Vec::new(),
            names: HashSet::new(),
            node_names: HashSet::new(),
            producer: "trt-diff".to_string(),
            sink: None,
        }
    }

    /// From now on, initializers of at least `threshold` bytes are written at once to `<onnx file name>.data`
    /// beside `onnx_path` (a temporary name until [`ExternalSink::commit`]) and kept in the graph as external
    /// references. Finish with [`GraphBuilder::finish_streamed`], commit the sink, then save the model with
    /// `external_threshold: None`.
    pub fn stream_external_data(
        &mut self,
        onnx_path: &std::path::Path,
        threshold: usize,
    ) -> Result<()> {
        let Some(file_name) = onnx_path.file_name() else {
            bail!("'{}' is not a file path", onnx_path.display());
        };
        let data_name = format!("{}.data", file_name.to_string_lossy());
        let file = crate::fsutil::AtomicFile::create(&onnx_path.with_file_name(&data_name))?;
        self.sink = Some(ExternalSink::new(file, data_name, threshold));
        Ok(())
    }

    /// Bytes streamed to external data so far (0 without a sink).
    pub fn streamed_bytes(&self) -> u64 {
        self.sink.as_ref().map_or(0, |s| s.offset)
    }

    /// Imports another operator domain (e.g. "trt" for TensorRT's own ops).
    pub fn use_domain(&mut self, domain: &str, version: i64) {
        self.opsets.insert(domain.to_string(), version);
    }

    fn claim(&mut self, name: &str) -> Result<String> {
        if name.is_empty() || !self.names.insert(name.to_string()) {
            bail!(
                "ONNX value name '{name}' is empty or already used in graph '{}'",
                self.name
            );
        }
        Ok(name.to_string())
    }

    /// A value name not yet used, derived from `base` (`base`, `base_1`, `base_2`, ...), reserved.
    pub fn unique(&mut self, base: &str) -> String {
        unique_in(&mut self.names, base)
    }

    /// Like [`GraphBuilder::unique`] but not reserved: for handing to `input`/`initializer`, which reserve it.
    pub fn fresh(&self, base: &str) -> String {
        let mut candidate = base.to_string();
        let mut i = 0;
        while self.names.contains(&candidate) {
            i += 1;
            candidate = format!("{base}_{i}");
        }
        candidate
    }

    pub fn input(&mut self, name: &str, dtype: DataType, shape: Vec<Dim>) -> Result<Value> {
        let name = self.claim(name)?;
        self.inputs.push(value_info(&name, dtype, &shape));
        Ok(Value { name, dtype, shape })
    }

    /// Marks a value as a graph output.
    pub fn output(&mut self, v: &Value) {
        self.outputs.push(value_info(&v.name, v.dtype, &v.shape));
    }

    /// A constant tensor from raw little-endian bytes (packed for sub-byte types, element 0 in the low nibble).
    pub fn initializer(
        &mut self,
        name: &str,
        dtype: DataType,
        dims: &[i64],
        data: Bytes,
    ) -> Result<Value> {
        let count: i64 = dims.iter().product();
        let Some(expected) = dtype.storage_bytes(count.max(0) as u64) else {
            bail!("initializer '{name}': dtype {dtype} cannot be stored as raw data");
        };
        if data.len() as u64 != expected {
            bail!(
                "initializer '{name}': {} bytes given, {expected} expected for {dtype} {dims:?}",
                data.len()
            );
        }
        let name = self.claim(name)?;
        let mut t = TensorProto {
            dims: dims.to_vec(),
            data_type: dtype.0,
            name: name.clone(),
            raw_data: data,
            ..Default::default()
        };
        if let Some(sink) = self.sink.as_mut()
            && t.raw_data.len() >= sink.threshold
        {
            sink.put(&mut t)?;
        }
        self.initializers.push(t);
        Ok(Value {
            name,
            dtype,
            shape: dims.iter().map(|&d| Dim::Fixed(d)).collect(),
        })
    }

    /// A constant tensor whose bytes stay in another file: `length` bytes at `offset` of `location` (relative to
    /// the model's folder), e.g. a tensor of a GGUF file read in place.
    pub fn external_initializer(
        &mut self,
        name: &str,
        dtype: DataType,
        dims: &[i64],
        location: &str,
        offset: u64,
        length: u64,
    ) -> Result<Value> {
        let count: i64 = dims.iter().product();
        if dtype.storage_bytes(count.max(0) as u64) != Some(length) {
            bail!("initializer '{name}': {length} bytes do not hold {dtype} {dims:?}");
        }
        let name = self.claim(name)?;
        let entry = |k: &str, v: String| super::proto::StringStringEntryProto {
            key: k.into(),
            value: v,
        };
        self.initializers.push(TensorProto {
            dims: dims.to_vec(),
            data_type: dtype.0,
            name: name.clone(),
            data_location: super::proto::DATA_LOCATION_EXTERNAL,
            external_data: vec![
                entry("location", location.into()),
                entry("offset", offset.to_string()),
                entry("length", length.to_string()),
            ],
            ..Default::default()
        });
        Ok(Value {
            name,
            dtype,
            shape: dims.iter().map(|&d| Dim::Fixed(d)).collect(),
        })
    }

    pub fn const_f32(&mut self, name: &str, dims: &[i64], values: &[f32]) -> Result<Value> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, DataType::FLOAT, dims, Bytes::from(bytes))
    }

    /// `x` as `to` (itself when it already is).
    pub fn cast(&mut self, name: &str, x: &Value, to: DataType) -> Result<Value> {
        if x.dtype == to {
            return Ok(x.clone());
        }
        self.op(
            "Cast",
            name,
            &[x],
            vec![("to", Attr::Int(to.0 as i64))],
            to,
            x.shape.clone(),
        )
    }

    pub fn const_i64(&mut self, name: &str, dims: &[i64], values: &[i64]) -> Result<Value> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.initializer(name, DataType::INT64, dims, Bytes::from(bytes))
    }

    /// Adds a node of the default domain; see [`GraphBuilder::node_in`].
    pub fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        outputs: Vec<(DataType, Vec<Dim>)>,
    ) -> Result<Vec<Value>> {
        self.node_in("", op, name, inputs, attrs, outputs)
    }

    /// Adds a node; a single output is named like the node (or `<node>:out` when that value name is taken),
    /// several outputs `<node>:out<i>`. Outputs of type `DataType::UNDEFINED` are optional outputs left out.
    pub fn node_in(
        &mut self,
        domain: &str,
        op: &str,
        name: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        outputs: Vec<(DataType, Vec<Dim>)>,
    ) -> Result<Vec<Value>> {
        self.node_named(
            domain,
            op,
            name,
            inputs,
            attrs,
            outputs.into_iter().map(|(t, s)| (None, t, s)).collect(),
        )
    }

    /// As [`GraphBuilder::node_in`], with outputs given a name (`Some`) where it matters (graph outputs).
    pub fn node_named(
        &mut self,
        domain: &str,
        op: &str,
        name: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        outputs: Vec<(Option<String>, DataType, Vec<Dim>)>,
    ) -> Result<Vec<Value>> {
        if !domain.is_empty() && !self.opsets.contains_key(domain) {
            bail!(
                "node '{name}' uses domain '{domain}', which the graph does not import (use_domain)"
            );
        }
        let node_name = unique_in(&mut self.node_names, name);
        let single = outputs.len() == 1;
        let mut values = Vec::with_capacity(outputs.len());
        for (i, (given, dtype, shape)) in outputs.into_iter().enumerate() {
            if dtype == DataType::UNDEFINED {
                values.push(Value::absent());
                continue;
            }
            let out = if let Some(n) = given {
                n
            } else if single && !self.names.contains(&node_name) {
                node_name.clone()
            } else if single {
                format!("{node_name}:out")
            } else {
                format!("{node_name}:out{i}")
            };
            let out = self.claim(&out)?;
            values.push(Value {
                name: out,
                dtype,
                shape,
            });
        }
        let attribute = attrs
            .into_iter()
            .map(|(n, a)| {
                let mut p = AttributeProto {
                    name: n.to_string(),
                    ..Default::default()
                };
                match a {
                    Attr::Int(v) => (p.r#type, p.i) = (attr_type::INT, v),
                    Attr::Float(v) => (p.r#type, p.f) = (attr_type::FLOAT, v),
                    Attr::Str(v) => (p.r#type, p.s) = (attr_type::STRING, v.into_bytes()),
                    Attr::Ints(v) => (p.r#type, p.ints) = (attr_type::INTS, v),
                    Attr::Floats(v) => (p.r#type, p.floats) = (attr_type::FLOATS, v),
                }
                p
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|v| v.name.clone()).collect(),
            output: values.iter().map(|v| v.name.clone()).collect(),
            name: node_name,
            op_type: op.to_string(),
            domain: domain.to_string(),
            attribute,
            doc_string: String::new(),
        });
        Ok(values)
    }

    /// Single-output convenience form of [`GraphBuilder::node`].
    pub fn op(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        dtype: DataType,
        shape: Vec<Dim>,
    ) -> Result<Value> {
        Ok(self
            .node(op, name, inputs, attrs, vec![(dtype, shape)])?
            .remove(0))
    }

    /// [`GraphBuilder::finish`] for a streaming builder: the model and the external data still to commit.
    pub fn finish_streamed(mut self) -> (ModelProto, Option<ExternalSink>) {
        let sink = self.sink.take();
        (self.finish(), sink)
    }

    pub fn finish(self) -> ModelProto {
        let default_opset = self.opsets.get("").copied().unwrap_or(0);
        // IR 11 is the first to allow opset 23 (float4e2m1); older opsets keep IR 10 for wider compatibility.
        let ir_version = if default_opset >= 23 { 11 } else { 10 };
        ModelProto {
            ir_version,
            opset_import: self
                .opsets
                .into_iter()
                .map(|(domain, version)| OperatorSetIdProto { domain, version })
                .collect(),
            producer_name: self.producer,
            producer_version: env!("CARGO_PKG_VERSION").to_string(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: self.name,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}
