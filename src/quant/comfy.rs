//! ComfyUI's quantized checkpoint layout, as its mixed-precision loader (`comfy/ops.py`, layouts from comfy-kitchen,
//! `comfy/quant_ops.py`'s `QUANT_ALGOS`) reads it. Per quantized linear `L` (weight `L.weight`):
//!
//! - `L.comfy_quant`: a U8 tensor holding the UTF-8 JSON `{"format": F}`, F one of `QUANT_ALGOS`' keys; the same
//!   map may instead (or also) be in the header's `__metadata__["_quantization_metadata"]` as
//!   `{"format_version": "1.0", "layers": {L: {"format": F}}}`, which ComfyUI turns into the markers on load;
//! - `nvfp4`: `L.weight` U8 `[rows, cols / 2]` with element 0 in the **high** nibble (comfy-kitchen's `hi_first`;
//!   ModelOpt and ONNX put it in the low nibble), `L.weight_scale` F8_E4M3 block scales (one per 16 elements along
//!   a row) in cuBLAS's block-scaling-factor layout (see [`swizzle`]), `L.weight_scale_2` the F32 global scale;
//!   value = E2M1 * E4M3(block scale) * global scale. comfy-kitchen pads rows and columns to 16 with zeros when
//!   they are not multiples of 16; trt-diff writes only unpadded tensors and reads the stored size as the size;
//! - `float8_e4m3fn`: `L.weight` F8_E4M3, `L.weight_scale` F32 scalar; value = E4M3 * scale;
//! - both may carry `L.input_scale` (F32 scalar, the activation scale: amax / 448 for FP8, amax / (6 * 448) for
//!   NVFP4).
use anyhow::{Result, bail};
use std::collections::BTreeMap;

/// Suffix of the per-layer marker tensor (on the layer name, the weight's name without `.weight`).
pub const MARKER: &str = ".comfy_quant";
/// The header entry ComfyUI also reads the per-layer formats from.
pub const METADATA_KEY: &str = "_quantization_metadata";
/// Largest marker trt-diff reads: real ones are a few dozen bytes.
pub const MAX_MARKER_BYTES: usize = 1 << 16;

/// The `QUANT_ALGOS` formats whose values map exactly onto a TensorRT format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ComfyFormat {
    Nvfp4,
    Fp8E4m3,
}

impl ComfyFormat {
    pub fn name(self) -> &'static str {
        match self {
            ComfyFormat::Nvfp4 => "nvfp4",
            ComfyFormat::Fp8E4m3 => "float8_e4m3fn",
        }
    }

    /// The format a marker names; the error says which formats exist.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s {
            "nvfp4" => Ok(ComfyFormat::Nvfp4),
            "float8_e4m3fn" => Ok(ComfyFormat::Fp8E4m3),
            other => Err(format!(
                "format '{other}' is not one trt-diff reads (nvfp4, float8_e4m3fn)"
            )),
        }
    }
}

/// The marker's bytes for `format` (what `L.comfy_quant` holds).
pub fn marker_json(format: ComfyFormat) -> String {
    serde_json::json!({ "format": format.name() }).to_string()
}

/// The format a marker's bytes name.
pub fn parse_marker(bytes: &[u8]) -> std::result::Result<ComfyFormat, String> {
    if bytes.len() > MAX_MARKER_BYTES {
        return Err(format!(
            "the marker holds {} bytes, more than the {MAX_MARKER_BYTES} a format name needs",
            bytes.len()
        ));
    }
    // Writers that pad the tensor leave NUL bytes after the JSON.
    let end = bytes
        .iter()
        .rposition(|&b| b != 0)
        .map(|i| i + 1)
        .unwrap_or(0);
    let v: serde_json::Value = serde_json::from_slice(&bytes[..end])
        .map_err(|e| format!("the marker is not JSON ({e})"))?;
    match v.get("format").and_then(|f| f.as_str()) {
        Some(f) => ComfyFormat::parse(f),
        None => Err(format!("the marker {v} names no \"format\"")),
    }
}

/// `_quantization_metadata` for the layers given (layer name -> format).
pub fn metadata_json(layers: &BTreeMap<String, ComfyFormat>) -> String {
    let layers: serde_json::Map<String, serde_json::Value> = layers
        .iter()
        .map(|(l, f)| (l.clone(), serde_json::json!({ "format": f.name() })))
        .collect();
    serde_json::json!({ "format_version": "1.0", "layers": layers }).to_string()
}

/// The per-layer format names of a `_quantization_metadata` value (formats unparsed: the caller reports unknown
/// ones with the tensor they belong to).
pub fn parse_metadata(s: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    let v: serde_json::Value = serde_json::from_str(s).map_err(|e| format!("not JSON ({e})"))?;
    let layers = v
        .get("layers")
        .and_then(|l| l.as_object())
        .ok_or_else(|| "no \"layers\" object".to_string())?;
    layers
        .iter()
        .map(|(l, c)| match c.get("format").and_then(|f| f.as_str()) {
            Some(f) => Ok((l.clone(), f.to_string())),
            None => Err(format!("layer '{l}' names no \"format\"")),
        })
        .collect()
}

/// Shape of the swizzled block-scale tensor of a `[rows, cols]` scale matrix: rows padded to 128, columns to 4.
pub fn swizzled_shape(rows: usize, cols: usize) -> (usize, usize) {
    (rows.next_multiple_of(128), cols.next_multiple_of(4))
}

/// Position in the swizzled buffer of scale (r, c) of a matrix with `cols` columns: cuBLAS's 1-D block scaling
/// factor layout (tiles of 128 rows x 4 columns, tile-major, row tiles outer; inside a tile, row `32 i + j` column
/// `c` goes to `16 j + 4 i + c`).
#[inline]
fn swizzled_index(r: usize, c: usize, cols: usize) -> usize {
    let col_tiles = cols.div_ceil(4);
    let tile = (r / 128) * col_tiles + c / 4;
    let rr = r % 128;
    tile * 512 + (rr % 32) * 16 + (rr / 32) * 4 + c % 4
}

/// Row-major `[rows, cols]` scales into the swizzled layout (padding zero).
pub fn swizzle(scales: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (pr, pc) = swizzled_shape(rows, cols);
    let mut out = vec![0u8; pr * pc];
    for r in 0..rows {
        for c in 0..cols {
            out[swizzled_index(r, c, cols)] = scales[r * cols + c];
        }
    }
    out
}

/// The row-major `[rows, cols]` scales of a swizzled buffer; its length must be the padded size.
pub fn unswizzle(blocked: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    let (pr, pc) = swizzled_shape(rows, cols);
    if blocked.len() != pr * pc {
        bail!(
            "{} swizzled block scales for a [{rows}, {cols}] scale matrix, which needs {pr} x {pc} = {}",
            blocked.len(),
            pr * pc
        );
    }
    let mut out = vec![0u8; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            out[r * cols + c] = blocked[swizzled_index(r, c, cols)];
        }
    }
    Ok(out)
}

/// Swaps the two nibbles of every byte: converts between comfy-kitchen's high-first and ModelOpt's low-first FP4
/// packing (its own inverse).
pub fn swap_nibbles(packed: &[u8]) -> Vec<u8> {
    packed.iter().map(|b| b.rotate_left(4)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swizzle_round_trips_and_pads() {
        for (rows, cols) in [(1, 1), (48, 5), (128, 4), (130, 9), (256, 8)] {
            let s: Vec<u8> = (0..rows * cols).map(|i| (i % 251) as u8 + 1).collect();
            let z = swizzle(&s, rows, cols);
            let (pr, pc) = swizzled_shape(rows, cols);
            assert_eq!(z.len(), pr * pc);
            // Every value lands once; the padding stays zero.
            assert_eq!(z.iter().filter(|&&b| b != 0).count(), rows * cols);
            assert_eq!(unswizzle(&z, rows, cols).unwrap(), s);
        }
        // Row 32 of the first tile goes next to row 0 (column group 4..8 of the 16 per line).
        assert_eq!(swizzled_index(32, 0, 4), 4);
        assert_eq!(swizzled_index(1, 0, 4), 16);
        assert_eq!(swizzled_index(0, 4, 8), 512);
        assert!(unswizzle(&[0; 10], 4, 4).is_err());
    }

    #[test]
    fn markers_parse_and_refuse() {
        assert_eq!(
            parse_marker(marker_json(ComfyFormat::Nvfp4).as_bytes()),
            Ok(ComfyFormat::Nvfp4)
        );
        assert_eq!(
            parse_marker(b"{\"format\":\"float8_e4m3fn\"}\0\0"),
            Ok(ComfyFormat::Fp8E4m3)
        );
        assert!(
            parse_marker(b"{\"format\":\"int8_tensorwise\"}")
                .unwrap_err()
                .contains("int8_tensorwise")
        );
        assert!(parse_marker(b"\xff\xfe").is_err());
        assert!(parse_marker(b"{}").is_err());
        let mut m = BTreeMap::new();
        m.insert("a.b".to_string(), ComfyFormat::Fp8E4m3);
        let p = parse_metadata(&metadata_json(&m)).unwrap();
        assert_eq!(p["a.b"], "float8_e4m3fn");
        assert!(parse_metadata("{\"layers\": 3}").is_err());
    }

    #[test]
    fn nibble_swap_is_an_involution() {
        assert_eq!(swap_nibbles(&[0x12, 0xF0]), vec![0x21, 0x0F]);
        assert_eq!(swap_nibbles(&swap_nibbles(&[0xAB, 0x3C])), vec![0xAB, 0x3C]);
    }
}
