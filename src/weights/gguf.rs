//! GGUF v2/v3 files (ggml's container): a header (magic `GGUF`, version, tensor count, metadata count), typed
//! metadata key/values (scalars, strings, nested arrays), tensor infos (name, dims innermost first, ggml type,
//! offset), then tensor data from the first multiple of `general.alignment` (default 32) after the infos. The file
//! is memory-mapped; [`GgufFile::tensor_bytes`] hands out zero-copy slices and [`GgufFile::tensor_f32`]
//! dequantizes the block formats (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) as ggml does.
use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 4] = b"GGUF";
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
const MAX_DIMS: u32 = 4;
/// Most elements of one metadata array (real vocabularies and merge lists have up to a few hundred thousand).
const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Arrays nest at most this deep (real files use one level).
const MAX_DEPTH: usize = 8;

/// A metadata value. Strings are kept as read when they are valid UTF-8 and lossily converted otherwise.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// Element type id (0..=12) and the elements.
    Array(u32, Vec<Value>),
    U64(u64),
    I64(i64),
    F64(f64),
}

pub fn value_type_name(id: u32) -> &'static str {
    match id {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "?",
    }
}

impl Value {
    /// Any integer value that fits in i64 (bools and floats are not integers).
    pub fn as_i64(&self) -> Option<i64> {
        Some(match *self {
            Value::U8(v) => v as i64,
            Value::I8(v) => v as i64,
            Value::U16(v) => v as i64,
            Value::I16(v) => v as i64,
            Value::U32(v) => v as i64,
            Value::I32(v) => v as i64,
            Value::U64(v) => i64::try_from(v).ok()?,
            Value::I64(v) => v,
            _ => return None,
        })
    }
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i64().and_then(|v| u64::try_from(v).ok())
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }
    pub fn type_name(&self) -> String {
        match self {
            Value::Array(t, v) => format!("[{}; {}]", value_type_name(*t), v.len()),
            Value::U8(_) => "u8".into(),
            Value::I8(_) => "i8".into(),
            Value::U16(_) => "u16".into(),
            Value::I16(_) => "i16".into(),
            Value::U32(_) => "u32".into(),
            Value::I32(_) => "i32".into(),
            Value::F32(_) => "f32".into(),
            Value::Bool(_) => "bool".into(),
            Value::String(_) => "string".into(),
            Value::U64(_) => "u64".into(),
            Value::I64(_) => "i64".into(),
            Value::F64(_) => "f64".into(),
        }
    }
    /// A one-line rendering; arrays show their first `max_items` elements.
    pub fn display_short(&self, max_items: usize) -> String {
        match self {
            Value::String(s) => {
                let mut t: String = s.chars().take(120).collect();
                if t.len() < s.len() {
                    t.push('…');
                }
                format!("{t:?}")
            }
            Value::Array(_, v) => {
                let mut parts: Vec<String> = v
                    .iter()
                    .take(max_items)
                    .map(|x| x.display_short(max_items))
                    .collect();
                if v.len() > max_items {
                    parts.push(format!("… ({} more)", v.len() - max_items));
                }
                format!("[{}]", parts.join(", "))
            }
            other => format!("{other}"),
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::U8(v) => write!(f, "{v}"),
            Value::I8(v) => write!(f, "{v}"),
            Value::U16(v) => write!(f, "{v}"),
            Value::I16(v) => write!(f, "{v}"),
            Value::U32(v) => write!(f, "{v}"),
            Value::I32(v) => write!(f, "{v}"),
            Value::F32(v) => write!(f, "{v}"),
            Value::Bool(v) => write!(f, "{v}"),
            Value::String(s) => write!(f, "{s}"),
            Value::U64(v) => write!(f, "{v}"),
            Value::I64(v) => write!(f, "{v}"),
            Value::F64(v) => write!(f, "{v}"),
            Value::Array(..) => write!(f, "{}", self.display_short(usize::MAX)),
        }
    }
}

/// ggml tensor types: id, name, elements per block, bytes per block (the table of ggml / gguf-py).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

const TYPES: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const BF16: Self = Self(30);

    fn entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        TYPES.iter().find(|t| t.0 == self.0)
    }
    pub fn from_name(name: &str) -> Option<Self> {
        TYPES
            .iter()
            .find(|t| t.1.eq_ignore_ascii_case(name))
            .map(|t| Self(t.0))
    }
    pub fn name(self) -> &'static str {
        self.entry().map_or("unknown", |t| t.1)
    }
    /// (elements per block, bytes per block), None for a type id this table does not know.
    pub fn block(self) -> Option<(u64, u64)> {
        self.entry().map(|t| (t.2, t.3))
    }
    /// Whether [`dequantize`] handles this type.
    pub fn can_dequantize(self) -> bool {
        matches!(self.0, 0 | 1 | 2 | 3 | 6 | 7 | 8 | 12 | 13 | 14 | 30)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.entry() {
            Some(t) => f.write_str(t.1),
            None => write!(f, "type#{}", self.0),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// ggml order: innermost (contiguous) dimension first.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Offset from the start of the data section.
    pub offset: u64,
    pub n_elements: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    /// Dimensions in row-major (numpy / PyTorch) order: outermost first.
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

pub struct GgufFile {
    path: PathBuf,
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    index: HashMap<String, usize>,
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    pub alignment: u64,
    pub data_offset: u64,
    map: Option<Mmap>,
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "'{}' is truncated or corrupt: {what} at byte {} runs past the end of the file ({} bytes)",
            self.path.display(),
            self.pos,
            self.data.len()
        )
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| self.truncated(what))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > self.remaining() as u64 {
            bail!(
                "'{}': bad string length {len} for {what} at byte {at} ({} bytes left in the file); the file is corrupt",
                self.path.display(),
                self.remaining()
            );
        }
        let b = self.take(len as usize, what)?;
        Ok(match std::str::from_utf8(b) {
            Ok(s) => s.to_string(),
            Err(_) => String::from_utf8_lossy(b).into_owned(),
        })
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>(what)?[0]),
            1 => Value::I8(self.arr::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => {
                let at = self.pos;
                match self.arr::<1>(what)?[0] {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => bail!(
                        "'{}': bad bool value {b} for {what} at byte {at}",
                        self.path.display()
                    ),
                }
            }
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    bail!(
                        "'{}': arrays nested deeper than {MAX_DEPTH} in {what}",
                        self.path.display()
                    );
                }
                let ety = self.u32(what)?;
                let at = self.pos;
                let n = self.u64(what)?;
                // Every element takes at least its fixed size (a string its 8-byte length, an array 12 bytes): a
                // count whose elements cannot fit in the bytes left is corrupt.
                let min_size: u64 = match ety {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    _ => 1,
                };
                if n.checked_mul(min_size)
                    .is_none_or(|b| b > self.remaining() as u64)
                {
                    bail!(
                        "'{}': bad array length {n} for {what} at byte {at} ({} bytes left in the file): the file \
                         is truncated or corrupt",
                        self.path.display(),
                        self.remaining()
                    );
                }
                if n > MAX_ARRAY_LEN {
                    bail!(
                        "'{}': array of {n} elements for {what} at byte {at}, more than the {MAX_ARRAY_LEN} this \
                         reader accepts: the file is corrupt",
                        self.path.display()
                    );
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(ety, what, depth + 1)?);
                }
                Value::Array(ety, items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.arr(what)?)),
            t => bail!(
                "'{}': unknown metadata value type {t} for {what} at byte {}; the file is corrupt or newer than this reader",
                self.path.display(),
                self.pos
            ),
        })
    }
}

impl GgufFile {
    /// Open and memory-map a GGUF file; header, metadata and tensor infos are parsed and checked up front.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| {
            format!("cannot open GGUF file '{}': check the path", path.display())
        })?;
        let len = file
            .metadata()
            .with_context(|| format!("cannot stat '{}'", path.display()))?
            .len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only; like every mmap reader we rely on the file not being truncated
            // by another process while it is mapped.
            Some(
                unsafe { Mmap::map(&file) }
                    .with_context(|| format!("cannot memory-map '{}'", path.display()))?,
            )
        };
        let mut g = Self::parse(path, map.as_deref().unwrap_or(&[]))?;
        g.map = map;
        Ok(g)
    }

    /// Parse GGUF from bytes already in memory (tensor data is then not reachable; used for tests and headers).
    fn parse(path: &Path, data: &[u8]) -> Result<Self> {
        let mut r = Reader { data, pos: 0, path };
        let magic = r.take(4, "the magic").map_err(|_| {
            anyhow::anyhow!(
                "'{}' is not a GGUF file: shorter than the 4-byte magic",
                path.display()
            )
        })?;
        if magic != MAGIC {
            bail!(
                "'{}' is not a GGUF file: magic {:?} instead of \"GGUF\"",
                path.display(),
                String::from_utf8_lossy(magic)
            );
        }
        let version = r.u32("the version")?;
        if !(2..=3).contains(&version) {
            let hint = if version.swap_bytes() <= 3 {
                " (it looks big-endian; only little-endian files are read)"
            } else if version == 1 {
                " (GGUF v1 is obsolete: convert it again with a current llama.cpp)"
            } else {
                ""
            };
            bail!(
                "'{}': unsupported GGUF version {version}; versions 2 and 3 are read{hint}",
                path.display()
            );
        }
        let n_tensors = r.u64("the tensor count")?;
        let n_kv = r.u64("the metadata count")?;
        // A key/value takes at least 13 bytes, a tensor info at least 28: larger counts are corrupt.
        if n_kv > r.remaining() as u64 / 13 || n_tensors > r.remaining() as u64 / 28 {
            bail!(
                "'{}': header claims {n_tensors} tensors and {n_kv} metadata entries, more than the file ({} bytes) can hold",
                path.display(),
                data.len()
            );
        }
        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::new();
        for i in 0..n_kv {
            let key = r.string(&format!("metadata key #{i}"))?;
            let ty = r.u32(&format!("the type of '{key}'"))?;
            let v = r.value(ty, &format!("metadata '{key}'"), 0)?;
            index.insert(key.clone(), metadata.len());
            metadata.push((key, v));
        }
        let alignment = match index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => bail!(
                    "'{}': general.alignment = {v} is not a positive power of two",
                    path.display()
                ),
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::new();
        for i in 0..n_tensors {
            let name = r.string(&format!("the name of tensor #{i}"))?;
            let nd = r.u32(&format!("the rank of tensor '{name}'"))?;
            if nd > MAX_DIMS {
                bail!(
                    "'{}': tensor '{name}' has {nd} dimensions; ggml allows at most {MAX_DIMS}",
                    path.display()
                );
            }
            let mut dims = Vec::with_capacity(nd as usize);
            for _ in 0..nd {
                dims.push(r.u64(&format!("the shape of tensor '{name}'"))?);
            }
            let ty = GgmlType(r.u32(&format!("the type of tensor '{name}'"))?);
            let offset = r.u64(&format!("the offset of tensor '{name}'"))?;
            let Some((bs, ts)) = ty.block() else {
                bail!(
                    "'{}': tensor '{name}' has unknown ggml type id {}",
                    path.display(),
                    ty.0
                );
            };
            let n_elements = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .filter(|&n| n <= 1 << 48)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "'{}': tensor '{name}' has an absurd shape {dims:?}",
                        path.display()
                    )
                })?;
            if dims.first().is_some_and(|&d0| d0 % bs != 0) {
                bail!(
                    "'{}': tensor '{name}' ({ty}) has a first dimension {} that is not a multiple of the block size {bs}",
                    path.display(),
                    dims[0]
                );
            }
            if offset % alignment != 0 {
                bail!(
                    "'{}': tensor '{name}' starts at data offset {offset}, not a multiple of the alignment {alignment}",
                    path.display()
                );
            }
            let n_bytes = n_elements / bs * ts;
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                bail!("'{}': tensor '{name}' appears twice", path.display());
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                n_elements,
                n_bytes,
            });
        }
        let data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes));
            if end.is_none_or(|e| e > data.len() as u64) {
                bail!(
                    "'{}' is truncated: tensor '{}' ({}, {} bytes at file offset {}) runs past the end of the file ({} bytes)",
                    path.display(),
                    t.name,
                    t.ty,
                    t.n_bytes,
                    data_offset.saturating_add(t.offset),
                    data.len()
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            map: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key).and_then(Value::as_bool)
    }
    /// A metadata key that must be present, with an error naming the file and key otherwise.
    pub fn require(&self, key: &str) -> Result<&Value> {
        self.get(key).ok_or_else(|| {
            anyhow::anyhow!("'{}': metadata key '{key}' is missing", self.path.display())
        })
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor, borrowed from the memory map.
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        // Bounds were checked when the file was opened.
        self.map
            .as_deref()
            .and_then(|m| m.get(start..start + t.n_bytes as usize))
            .unwrap_or(&[])
    }

    /// A tensor by name, dequantized to f32 in ggml element order (row-major over [`TensorInfo::shape`]).
    pub fn tensor_f32(&self, name: &str) -> Result<Vec<f32>> {
        let t = self.tensor(name).ok_or_else(|| {
            anyhow::anyhow!("'{}': no tensor named '{name}'", self.path.display())
        })?;
        dequantize(t.ty, self.tensor_bytes(t), t.n_elements as usize)
            .with_context(|| format!("'{}': tensor '{name}'", self.path.display()))
    }
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The block size and per-block scales of formats whose values are a scale times a small signed integer (Q8_0:
/// `d` per 32; Q4_0: `d` per 32, codes the nibbles minus 8; Q6_K: `d * sc` per 16, codes minus 32), as
/// [`dequantize`] computes them; None for other types. `bytes` holds whole blocks.
pub fn block_scales(ty: GgmlType, bytes: &[u8]) -> Option<(usize, Vec<f32>)> {
    let (_, size) = ty.block()?;
    let blocks = bytes.chunks_exact(size as usize);
    match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 => Some((32, blocks.map(|b| f16_at(b, 0)).collect())),
        GgmlType::Q6_K => Some((
            16,
            blocks
                .flat_map(|b| {
                    let d = f16_at(b, 208);
                    b[192..208].iter().map(move |&sc| d * (sc as i8) as f32)
                })
                .collect(),
        )),
        _ => None,
    }
}

/// The super-block scale `d` of K-quants whose sub-block scales are `d` times a small integer (Q6_K: 16 blocks of
/// 16 under one `d`; Q4_K: 8 blocks of 32), with the blocks per super-block; None for other types. `bytes` holds
/// whole blocks.
pub fn superblock_steps(ty: GgmlType, bytes: &[u8]) -> Option<(usize, Vec<f32>)> {
    let (_, size) = ty.block()?;
    let (group, at) = match ty {
        GgmlType::Q6_K => (16, 208),
        GgmlType::Q4_K => (8, 0),
        _ => return None,
    };
    let steps = bytes.chunks_exact(size as usize).map(|b| f16_at(b, at));
    Some((group, steps.collect()))
}

/// The per-32-value scale and offset of formats whose values are `scale * q + low` with unsigned codes q in 0..16
/// (Q4_1: `d`, `m`; Q4_K: each sub-block's `d * sc` and `-dmin * m`), as [`dequantize`] computes them; None for
/// other types. `bytes` holds whole blocks.
pub fn block_affine(ty: GgmlType, bytes: &[u8]) -> Option<(Vec<f32>, Vec<f32>)> {
    let (_, size) = ty.block()?;
    let blocks = bytes.chunks_exact(size as usize);
    let (mut scales, mut lows) = (Vec::new(), Vec::new());
    match ty {
        GgmlType::Q4_1 => blocks.for_each(|b| {
            scales.push(f16_at(b, 0));
            lows.push(f16_at(b, 2));
        }),
        GgmlType::Q4_K => blocks.for_each(|b| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            for j in 0..8 {
                let (sc, m) = scale_min_k4(j, &b[4..16]);
                scales.push(d * sc as f32);
                lows.push(-(dmin * m as f32));
            }
        }),
        _ => return None,
    }
    Some((scales, lows))
}

/// Dequantize `n` elements of type `ty` from `bytes` (exactly `n / block * type_size` bytes).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let Some((bs, ts)) = ty.block() else {
        bail!("unknown ggml type id {}", ty.0);
    };
    let (bs, ts) = (bs as usize, ts as usize);
    if !n.is_multiple_of(bs) || bytes.len() != n / bs * ts {
        bail!(
            "{ty}: {} bytes do not hold {n} elements ({ts} bytes per {bs})",
            bytes.len()
        );
    }
    let mut out = vec![0f32; n];
    let blocks = bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            for (j, v) in y.iter_mut().enumerate() {
                *v = (b[2 + j] as i8) as f32 * d;
            }
        }),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let qs = &b[2..18];
            for j in 0..16 {
                y[j] = ((qs[j] & 0xF) as i32 - 8) as f32 * d;
                y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
            }
        }),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qs = &b[4..20];
            for j in 0..16 {
                y[j] = (qs[j] & 0xF) as f32 * d + m;
                y[j + 16] = (qs[j] >> 4) as f32 * d + m;
            }
        }),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 0);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let qs = &b[6..22];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = (((qs[j] & 0xF) as u32 | h0) as i32 - 16) as f32 * d;
                y[j + 16] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
            }
        }),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| {
            let (d, m) = (f16_at(b, 0), f16_at(b, 2));
            let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            let qs = &b[8..24];
            for j in 0..16 {
                let h0 = ((qh >> j) & 1) << 4;
                let h1 = ((qh >> (j + 16)) & 1) << 4;
                y[j] = ((qs[j] & 0xF) as u32 | h0) as f32 * d + m;
                y[j + 16] = ((qs[j] >> 4) as u32 | h1) as f32 * d + m;
            }
        }),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qs = &b[16..144];
            for j in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * j, scales);
                let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                let q = &qs[32 * j..32 * j + 32];
                let y = &mut y[64 * j..64 * j + 64];
                for l in 0..32 {
                    y[l] = d1 * (q[l] & 0xF) as f32 - mm1;
                    y[l + 32] = d2 * (q[l] >> 4) as f32 - mm2;
                }
            }
        }),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let qh = &b[16..48];
            let qs = &b[48..176];
            for j in 0..4 {
                let (sc1, m1) = scale_min_k4(2 * j, scales);
                let (sc2, m2) = scale_min_k4(2 * j + 1, scales);
                let (d1, mm1) = (d * sc1 as f32, dmin * m1 as f32);
                let (d2, mm2) = (d * sc2 as f32, dmin * m2 as f32);
                let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                let q = &qs[32 * j..32 * j + 32];
                let y = &mut y[64 * j..64 * j + 64];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    y[l] = d1 * ((q[l] & 0xF) + h1) as f32 - mm1;
                    y[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - mm2;
                }
            }
        }),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| {
            let d = f16_at(b, 208);
            for half in 0..2 {
                let ql = &b[64 * half..64 * half + 64];
                let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                let y = &mut y[128 * half..128 * half + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
            }
        }),
        other => bail!(
            "dequantization of {other} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
        ),
    }
    Ok(out)
}

/// The 6-bit scale and min of sub-block `j` (0..8) packed in the 12 scale bytes of Q4_K / Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// A `.gguf` name, or a file that starts with the GGUF magic.
pub fn looks_like_gguf(path: &Path) -> bool {
    use std::io::Read;
    if path.extension().is_some_and(|e| e == "gguf") {
        return true;
    }
    let mut head = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head == MAGIC
}

/// `trt-diff inspect FILE.gguf`: metadata and tensors.
pub fn inspect(path: &Path, json: bool) -> Result<()> {
    let g = GgufFile::open(path)?;
    if json {
        let meta: serde_json::Map<String, serde_json::Value> = g
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), value_json(v, 64)))
            .collect();
        let tensors: Vec<serde_json::Value> = g
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name, "type": t.ty.to_string(), "shape": t.shape(),
                    "offset": g.data_offset + t.offset, "bytes": t.n_bytes,
                })
            })
            .collect();
        let doc = serde_json::json!({
            "path": path.display().to_string(), "version": g.version, "alignment": g.alignment,
            "data_offset": g.data_offset, "metadata": meta, "tensors": tensors,
        });
        crate::outln!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let total: u64 = g.tensors.iter().map(|t| t.n_bytes).sum();
    crate::outln!(
        "{}: GGUF v{}, {} metadata entries, {} tensors ({}), alignment {}, data at byte {}",
        path.display(),
        g.version,
        g.metadata.len(),
        g.tensors.len(),
        crate::fsutil::human_bytes(total),
        g.alignment,
        g.data_offset
    );
    crate::outln!("metadata:");
    for (k, v) in &g.metadata {
        crate::outln!("  {k:<40} {:<16} {}", v.type_name(), v.display_short(8));
    }
    if !g.tensors.is_empty() {
        let mut by_type: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
        for t in &g.tensors {
            let e = by_type.entry(t.ty.to_string()).or_default();
            e.0 += 1;
            e.1 += t.n_elements;
        }
        let summary: Vec<String> = by_type
            .iter()
            .map(|(k, (n, e))| format!("{k}: {n} tensors, {e} elements"))
            .collect();
        crate::outln!("tensors ({}):", summary.join("; "));
        for t in &g.tensors {
            crate::outln!(
                "  {:<48} {:<7} {:<22} {}",
                t.name,
                t.ty.to_string(),
                format!("{:?}", t.shape()),
                crate::fsutil::human_bytes(t.n_bytes)
            );
        }
    }
    Ok(())
}

fn value_json(v: &Value, max_items: usize) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::String(s) => J::String(s.clone()),
        Value::Bool(b) => J::Bool(*b),
        Value::F32(f) => serde_json::Number::from_f64(*f as f64).map_or(J::Null, J::Number),
        Value::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Value::U64(u) => J::from(*u),
        Value::Array(t, items) if items.len() > max_items => serde_json::json!({
            "type": value_type_name(*t), "len": items.len(),
            "head": items.iter().take(max_items).map(|x| value_json(x, max_items)).collect::<Vec<_>>(),
        }),
        Value::Array(_, items) => {
            J::Array(items.iter().map(|x| value_json(x, max_items)).collect())
        }
        other => other.as_i64().map_or(J::Null, J::from),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend(version.to_le_bytes());
        b.extend(n_tensors.to_le_bytes());
        b.extend(n_kv.to_le_bytes());
        b
    }
    fn push_str(b: &mut Vec<u8>, s: &str) {
        b.extend((s.len() as u64).to_le_bytes());
        b.extend(s.as_bytes());
    }

    #[test]
    fn rejects_bad_magic_version_and_lengths() {
        let p = Path::new("x.gguf");
        let e = GgufFile::parse(p, b"GGML\x03\0\0\0")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("x.gguf") && e.contains("not a GGUF"), "{e}");
        let e = GgufFile::parse(p, &header(1, 0, 0))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("unsupported GGUF version 1"), "{e}");
        let e = GgufFile::parse(p, &header(3 << 24, 0, 0))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("big-endian"), "{e}");
        let mut b = header(3, 0, 1);
        b.extend(1_000_000u64.to_le_bytes());
        b.extend([b'a'; 40]);
        let e = GgufFile::parse(p, &b).err().unwrap().to_string();
        assert!(e.contains("bad string length 1000000"), "{e}");
    }

    #[test]
    fn parses_metadata_and_detects_truncated_tensor_data() {
        let mut b = header(3, 1, 3);
        push_str(&mut b, "a.u32");
        b.extend(4u32.to_le_bytes());
        b.extend(7u32.to_le_bytes());
        push_str(&mut b, "a.arr");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        push_str(&mut b, "x");
        push_str(&mut b, "yz");
        push_str(&mut b, "general.alignment");
        b.extend(4u32.to_le_bytes());
        b.extend(64u32.to_le_bytes());
        push_str(&mut b, "w");
        b.extend(2u32.to_le_bytes());
        b.extend(4u64.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        let data_offset = b.len().div_ceil(64) * 64;
        b.resize(data_offset + 31, 0);
        let p = Path::new("t.gguf");
        let e = GgufFile::parse(p, &b).err().unwrap().to_string();
        assert!(e.contains("truncated") && e.contains("'w'"), "{e}");
        b.resize(data_offset + 32, 0);
        let g = GgufFile::parse(p, &b).unwrap();
        assert_eq!(g.get_u64("a.u32"), Some(7));
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_offset as usize, data_offset);
        let arr = g.get("a.arr").unwrap().as_array().unwrap();
        assert_eq!(arr[1].as_str(), Some("yz"));
        assert_eq!(g.tensor("w").unwrap().shape(), vec![2, 4]);
        assert_eq!(g.tensor("w").unwrap().n_bytes, 32);
    }

    #[test]
    fn q4_0_block_by_hand() {
        // d = 0.5; nibbles 0..15 low, 15..0 high.
        let mut b = f16::from_f32(0.5).to_le_bytes().to_vec();
        for j in 0..16u8 {
            b.push(j | ((15 - j) << 4));
        }
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -4.0);
        assert_eq!(y[15], 3.5);
        assert_eq!(y[16], 3.5);
        assert_eq!(y[31], -4.0);
        assert!(dequantize(GgmlType::Q4_0, &b[..17], 32).is_err());
    }
}
