//! Writes GGUF v3 files: header, metadata, tensor infos, then tensor data aligned to `general.alignment` (32).
//! Used by `trt-diff convert` and to store a model's tokenizer beside its engine (a vocab-only GGUF).
use crate::fsutil::AtomicFile;
use crate::weights::gguf::{DEFAULT_ALIGNMENT, GgmlType, MAGIC, Value};
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;

pub struct TensorData {
    pub name: String,
    /// Row-major (outermost first) shape; written innermost first as ggml expects.
    pub shape: Vec<u64>,
    pub ty: GgmlType,
    pub bytes: Vec<u8>,
}

#[derive(Default)]
pub struct GgufWriter {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorData>,
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(..) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.extend(x.to_le_bytes()),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::Array(t, items) => {
            b.extend(t.to_le_bytes());
            b.extend((items.len() as u64).to_le_bytes());
            for it in items {
                put_value(b, it);
            }
        }
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
    }
}

impl GgufWriter {
    pub fn set(&mut self, key: &str, v: Value) {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), v));
    }

    pub fn add_f32(&mut self, name: &str, shape: &[u64], data: &[f32]) {
        self.tensors.push(TensorData {
            name: name.to_string(),
            shape: shape.to_vec(),
            ty: GgmlType::F32,
            bytes: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        });
    }

    pub fn add_f16(&mut self, name: &str, shape: &[u64], data: &[f32]) {
        self.tensors.push(TensorData {
            name: name.to_string(),
            shape: shape.to_vec(),
            ty: GgmlType::F16,
            bytes: data
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
        });
    }

    /// A Q8_0 tensor (blocks of 32 along the innermost dimension: an f16 scale `max|x| / 127` and 32 int8, as
    /// llama.cpp quantizes); the innermost dimension must be a multiple of 32.
    pub fn add_q8_0(&mut self, name: &str, shape: &[u64], data: &[f32]) -> Result<()> {
        let inner = shape.last().copied().unwrap_or(0) as usize;
        if inner == 0 || !inner.is_multiple_of(32) || !data.len().is_multiple_of(32) {
            bail!(
                "{name}: Q8_0 needs an innermost dimension that is a multiple of 32, not {shape:?}"
            );
        }
        let mut bytes = Vec::with_capacity(data.len() / 32 * 34);
        for block in data.chunks_exact(32) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            bytes.extend(half::f16::from_f32(d).to_le_bytes());
            bytes.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
        }
        self.tensors.push(TensorData {
            name: name.to_string(),
            shape: shape.to_vec(),
            ty: GgmlType::Q8_0,
            bytes,
        });
        Ok(())
    }

    /// A Q4_0 tensor (blocks of 32: an f16 scale `d = max / -8` of the value of largest magnitude and 32 4-bit
    /// values `x / d + 8`, as llama.cpp's reference quantizer writes them).
    pub fn add_q4_0(&mut self, name: &str, shape: &[u64], data: &[f32]) -> Result<()> {
        let inner = shape.last().copied().unwrap_or(0) as usize;
        if inner == 0 || !inner.is_multiple_of(32) || !data.len().is_multiple_of(32) {
            bail!(
                "{name}: Q4_0 needs an innermost dimension that is a multiple of 32, not {shape:?}"
            );
        }
        let mut bytes = Vec::with_capacity(data.len() / 32 * 18);
        for block in data.chunks_exact(32) {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in block {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            bytes.extend(half::f16::from_f32(d).to_le_bytes());
            let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
            for j in 0..16 {
                bytes.push(q(block[j]) | (q(block[j + 16]) << 4));
            }
        }
        self.tensors.push(TensorData {
            name: name.to_string(),
            shape: shape.to_vec(),
            ty: GgmlType::Q4_0,
            bytes,
        });
        Ok(())
    }

    /// Writes the file under a temporary name and renames it into place.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut head = MAGIC.to_vec();
        head.extend(3u32.to_le_bytes());
        head.extend((self.tensors.len() as u64).to_le_bytes());
        head.extend((self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut head, k);
            head.extend(type_id(v).to_le_bytes());
            put_value(&mut head, v);
        }
        let align = DEFAULT_ALIGNMENT;
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let Some((bs, ts)) = t.ty.block() else {
                bail!("tensor '{}': unknown ggml type", t.name);
            };
            let n: u64 = t.shape.iter().product();
            if t.shape.last().is_some_and(|&d| d % bs != 0) || n / bs * ts != t.bytes.len() as u64 {
                bail!(
                    "tensor '{}': {} bytes do not match {} of shape {:?}",
                    t.name,
                    t.bytes.len(),
                    t.ty,
                    t.shape
                );
            }
            put_str(&mut head, &t.name);
            head.extend((t.shape.len() as u32).to_le_bytes());
            for d in t.shape.iter().rev() {
                head.extend(d.to_le_bytes());
            }
            head.extend(t.ty.0.to_le_bytes());
            head.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.bytes.len() as u64).div_ceil(align) * align;
        }
        let pad = |len: u64| vec![0u8; (len.div_ceil(align) * align - len) as usize];
        let mut f = AtomicFile::create(path)?;
        let ctx = || format!("cannot write '{}'", path.display());
        f.write_all(&head).with_context(ctx)?;
        f.write_all(&pad(head.len() as u64)).with_context(ctx)?;
        for t in &self.tensors {
            f.write_all(&t.bytes).with_context(ctx)?;
            f.write_all(&pad(t.bytes.len() as u64)).with_context(ctx)?;
        }
        f.commit()
    }
}
