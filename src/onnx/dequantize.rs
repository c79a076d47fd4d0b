//! Initializer values as f32 and ONNX `DequantizeLinear` on constants (per-tensor, per-axis and blocked), the
//! numerics the CPU pass folds into plain weights. Results match onnx.reference: `(x - zero_point) * scale` in f32.
use super::dtype::DataType;
use crate::quant::minifloat::{E2M1, E4M3FN, E5M2};
use anyhow::{Result, bail};

/// Decodes raw little-endian initializer bytes of `dtype` into f32 (packed 4-bit types: low nibble first).
pub fn to_f32(dtype: DataType, raw: &[u8], count: usize) -> Result<Vec<f32>> {
    let need = dtype.storage_bytes(count as u64).unwrap_or(u64::MAX);
    if raw.len() as u64 != need {
        bail!(
            "{dtype} tensor of {count} elements needs {need} bytes, has {}",
            raw.len()
        );
    }
    let nibble = |i: usize| (raw[i / 2] >> ((i % 2) * 4)) & 0xF;
    Ok(match dtype {
        DataType::FLOAT => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        DataType::FLOAT16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DataType::BFLOAT16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DataType::FLOAT8E4M3FN => raw.iter().map(|&b| E4M3FN.decode(b)).collect(),
        DataType::FLOAT8E5M2 => raw.iter().map(|&b| E5M2.decode(b)).collect(),
        DataType::FLOAT4E2M1 => (0..count).map(|i| E2M1.decode(nibble(i))).collect(),
        DataType::INT8 => raw.iter().map(|&b| b as i8 as f32).collect(),
        DataType::UINT8 => raw.iter().map(|&b| b as f32).collect(),
        DataType::INT4 => (0..count)
            .map(|i| (((nibble(i) << 4) as i8) >> 4) as f32)
            .collect(),
        DataType(21) => (0..count).map(|i| nibble(i) as f32).collect(),
        DataType::INT32 => raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as f32)
            .collect(),
        other => bail!("cannot read {other} initializers as numbers"),
    })
}

/// `DequantizeLinear(x, scale, zero_point; axis, block_size)` on constants. `scale`/`zero_point` are per-tensor
/// (one value), per-axis (1-D of x's size along axis) or blocked (x's rank, axis dimension = ceil(n / block)).
pub fn dequantize(
    x: &[f32],
    x_dims: &[i64],
    scale: &[f32],
    scale_dims: &[i64],
    zero_point: Option<&[f32]>,
    axis: i64,
    block_size: i64,
) -> Result<Vec<f32>> {
    let rank = x_dims.len() as i64;
    let axis = if axis < 0 { axis + rank } else { axis };
    let dims: Vec<usize> = x_dims.iter().map(|&d| d as usize).collect();
    let zp = |i: usize| zero_point.map(|z| z[i]).unwrap_or(0.0);
    if scale.len() == 1 {
        return Ok(x.iter().map(|&v| (v - zp(0)) * scale[0]).collect());
    }
    if !(0..rank).contains(&axis) {
        bail!("DequantizeLinear axis {axis} is out of range for rank {rank}");
    }
    let a = axis as usize;
    let inner: usize = dims[a + 1..].iter().product();
    let n_axis = dims[a];
    if block_size <= 0 {
        if scale.len() != n_axis {
            bail!(
                "per-axis scale has {} values, axis {a} has {n_axis}",
                scale.len()
            );
        }
        return Ok(x
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = (i / inner) % n_axis;
                (v - zp(c)) * scale[c]
            })
            .collect());
    }
    let b = block_size as usize;
    let blocks = n_axis.div_ceil(b);
    let expected: Vec<i64> = dims
        .iter()
        .enumerate()
        .map(|(i, &d)| if i == a { blocks as i64 } else { d as i64 })
        .collect();
    if scale_dims != expected.as_slice() {
        bail!("blocked scale has shape {scale_dims:?}, expected {expected:?} for block size {b}");
    }
    Ok(x.iter()
        .enumerate()
        .map(|(i, &v)| {
            let outer = i / (inner * n_axis);
            let c = (i / inner) % n_axis;
            let s = (outer * blocks + c / b) * inner + i % inner;
            (v - zp(s)) * scale[s]
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granularities() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(
            dequantize(&x, &[2, 3], &[2.0], &[], None, 1, 0).unwrap(),
            vec![2., 4., 6., 8., 10., 12.]
        );
        let per_row = dequantize(&x, &[2, 3], &[1.0, 10.0], &[2], Some(&[1.0, 0.0]), 0, 0).unwrap();
        assert_eq!(per_row, vec![0., 1., 2., 40., 50., 60.]);
        // Blocks of 2 along the last axis: [1,2 | 3], [4,5 | 6].
        let blocked = dequantize(&x, &[2, 3], &[1.0, 2.0, 3.0, 4.0], &[2, 2], None, -1, 2).unwrap();
        assert_eq!(blocked, vec![1., 2., 6., 12., 15., 24.]);
        assert!(dequantize(&x, &[2, 3], &[1.0, 2.0], &[2, 1], None, -1, 2).is_err());
    }

    #[test]
    fn packed_types() {
        // int4: 0x7 = 7, 0x8 = -8 (low nibble first).
        assert_eq!(to_f32(DataType::INT4, &[0x87], 2).unwrap(), vec![7.0, -8.0]);
        assert_eq!(
            to_f32(DataType::FLOAT4E2M1, &[0xF2], 2).unwrap(),
            vec![1.0, -6.0]
        );
        assert!(to_f32(DataType::FLOAT4E2M1, &[0xF2], 3).is_err());
    }
}
