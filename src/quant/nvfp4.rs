//! NVFP4 weights as TensorRT consumes them: E2M1 elements in 16-element blocks along the last axis, an E4M3 scale
//! per block and one fp32 global scale (amax / (6 * 448)), as NVIDIA's ModelOpt exporter writes them.
use super::minifloat::{E2M1, E4M3FN, pack_nibbles};

pub const BLOCK: usize = 16;

pub struct Nvfp4 {
    /// Packed E2M1 codes, element 0 in the low nibble.
    pub packed: Vec<u8>,
    /// E4M3 block scales, one per 16 elements.
    pub block_scales: Vec<u8>,
    pub global_scale: f32,
}

/// The fp32 global scale for a tensor of absolute maximum `amax`.
pub fn global_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / (6.0 * 448.0)
    } else {
        1.0
    }
}

/// Quantizes a row-major tensor whose last dimension is a multiple of 16.
pub fn quantize(values: &[f32]) -> Nvfp4 {
    assert!(
        values.len().is_multiple_of(BLOCK),
        "NVFP4 needs a multiple of {BLOCK} elements"
    );
    let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let sw = global_scale(amax);
    let mut codes = Vec::with_capacity(values.len());
    let mut block_scales = Vec::with_capacity(values.len() / BLOCK);
    for block in values.chunks(BLOCK) {
        let bmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale_code = E4M3FN.encode(bmax / (6.0 * sw), true);
        block_scales.push(scale_code);
        let scale = E4M3FN.decode(scale_code) * sw;
        for &v in block {
            codes.push(if scale > 0.0 {
                E2M1.encode(v / scale, true)
            } else {
                0
            });
        }
    }
    Nvfp4 {
        packed: pack_nibbles(&codes),
        block_scales,
        global_scale: sw,
    }
}
