//! .npy files (format 1.0/2.0/3.0, little-endian numeric types, C order) as raw host tensors.
use crate::backend::HostTensor;
use crate::fsutil::AtomicFile;
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};
use std::io::Write;
use std::path::Path;

/// numpy type strings and ONNX types, one table.
const TYPES: &[(&str, DataType)] = &[
    ("<f4", DataType::FLOAT),
    ("<f2", DataType::FLOAT16),
    ("<f8", DataType(11)),
    ("<i8", DataType::INT64),
    ("<i4", DataType::INT32),
    ("<i2", DataType(5)),
    ("|i1", DataType::INT8),
    ("|u1", DataType::UINT8),
    ("<u2", DataType(4)),
    ("|b1", DataType::BOOL),
];

fn field<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let start = header.find(&format!("'{key}'"))? + key.len() + 2;
    let rest = header[start..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(r) = rest.strip_prefix('(') {
        return Some(&r[..r.find(')')?]);
    }
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    Some(rest[..end].trim().trim_matches('\''))
}

pub fn read(path: &Path) -> Result<HostTensor> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read '{}': check the path", path.display()))?;
    let bad = |why: &str| anyhow::anyhow!("'{}' is not a usable .npy file: {why}", path.display());
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic (save arrays with numpy.save)"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported format version {v}"))),
    };
    let header = std::str::from_utf8(
        bytes
            .get(start..start + hlen)
            .ok_or_else(|| bad("truncated header"))?,
    )
    .map_err(|_| bad("header is not text"))?;
    let descr = field(header, "descr").ok_or_else(|| bad("no 'descr' in header"))?;
    let dtype = TYPES
        .iter()
        .find(|(d, _)| *d == descr || (d.starts_with('<') && descr == format!("={}", &d[1..])))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            bad(&format!(
                "element type '{descr}' is not supported (use float32/16, int64/32/8, uint8, bool)"
            ))
        })?;
    if field(header, "fortran_order") == Some("True") {
        return Err(bad(
            "Fortran order; save a C-contiguous array (numpy.ascontiguousarray)",
        ));
    }
    let shape_txt = field(header, "shape").ok_or_else(|| bad("no 'shape' in header"))?;
    let shape: Vec<usize> = shape_txt
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| bad(&format!("bad shape ({shape_txt})")))
        })
        .collect::<Result<_>>()?;
    let data = bytes[start + hlen..].to_vec();
    let need = shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d as u64))
        .and_then(|n| dtype.storage_bytes(n))
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| bad(&format!("shape {shape:?} is too large")))?;
    if data.len() != need {
        return Err(bad(&format!(
            "shape {shape:?} of {dtype} needs {need} data bytes, the file has {} (truncated?)",
            data.len()
        )));
    }
    Ok(HostTensor { dtype, shape, data })
}

pub fn write(path: &Path, t: &HostTensor) -> Result<()> {
    let Some((descr, _)) = TYPES.iter().find(|(_, d)| *d == t.dtype) else {
        bail!("cannot write {} tensors as .npy", t.dtype);
    };
    let dims: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut f = AtomicFile::create(path)?;
    f.write_all(b"\x93NUMPY\x01\x00")?;
    f.write_all(&(header.len() as u16).to_le_bytes())?;
    f.write_all(header.as_bytes())?;
    f.write_all(&t.data)?;
    f.commit()
}
