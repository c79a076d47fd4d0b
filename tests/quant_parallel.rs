//! The multithreaded quantizers against their scalar references on tensors large enough to be split into
//! many parallel units (the golden tensors fit in one), in every input dtype.
use half::{bf16, f16};
use trt_diff::quant::bnb::{self, Kind};
use trt_diff::quant::int::{self, Bits, Granularity};
use trt_diff::quant::{elem::Elem, fp8, nvfp4};

/// Deterministic heavy-tailed values with zero runs, exact ties of the formats and varying row scales.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64;
            let scale = 10f64.powi((i / 4096 % 7) as i32 - 3);
            match s % 97 {
                0 => 0.0,
                1 => 0.75 * scale as f32,
                2 => -2.5 * scale as f32,
                _ => ((u - 0.5).powi(3) * 8.0 * scale) as f32,
            }
        })
        .collect()
}

fn check<T: Elem>(v: &[T], cols: usize) {
    let a = nvfp4::quantize(v);
    let b = nvfp4::quantize_scalar(v);
    assert_eq!(
        (a.packed, a.block_scales),
        (b.packed, b.block_scales),
        "nvfp4 {}",
        T::DTYPE
    );
    assert_eq!(a.global_scale.to_bits(), b.global_scale.to_bits());
    let (fa, fs) = (fp8::quantize_fp8(v), fp8::quantize_fp8_scalar(v));
    let first = (0..fa.0.len()).find(|&i| fa.0[i] != fs.0[i]);
    assert!(
        first.is_none() && fa.1.to_bits() == fs.1.to_bits(),
        "fp8 {}: scales {} {}, first differing code {first:?} of value {:?}",
        T::DTYPE,
        fa.1,
        fs.1,
        first.map(|i| (v[i].f32(), fa.0[i], fs.0[i]))
    );
    assert_eq!(
        fp8::quantize_mxfp8(v),
        fp8::quantize_mxfp8_scalar(v),
        "mxfp8 {}",
        T::DTYPE
    );
    for kind in [Kind::Nf4, Kind::Fp4] {
        for bs in [64, 256, 4096] {
            // The full tensor, and an odd length with a partial last block.
            for w in [v, &v[..v.len() - 77]] {
                assert_eq!(
                    bnb::quantize_fast(w, kind, bs),
                    bnb::quantize_scalar(w, kind, bs),
                    "{kind:?} {bs} {} n={}",
                    T::DTYPE,
                    w.len()
                );
            }
        }
    }
    for (g, bits) in [
        (Granularity::Tensor, Bits::Int8),
        (Granularity::Channel, Bits::Int8),
        (Granularity::Block(64), Bits::Int8),
        (Granularity::Block(32), Bits::Int4),
    ] {
        assert_eq!(
            int::quantize(v, cols, g, bits),
            int::quantize_scalar(v, cols, g, bits),
            "{g:?} {}",
            T::DTYPE
        );
    }
}

#[test]
fn parallel_paths_equal_scalar_references() {
    let (rows, cols) = (300, 1024);
    let f = values(rows * cols, 42);
    check(&f, cols);
    check(
        &f.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
        cols,
    );
    check(
        &f.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
        cols,
    );
}

/// Every bf16 bit pattern (NaN, infinities, zeros and subnormals included) through NVFP4's vector kernel, which
/// computes ModelOpt's bucket rule as a rounding of the f32 bits, against the scalar reference: in a tensor of
/// ordinary values (so each sits in blocks of various maxima), in a tensor whose global scale an infinity
/// sets, and as f16 and f32 inputs.
#[test]
fn nvfp4_vector_kernel_equals_the_scalar_rule_on_every_bf16_value() {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let mut all: Vec<u16> = (0..=u16::MAX).collect();
    // A fixed shuffle, so blocks mix magnitudes.
    for i in (1..all.len()).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        all.swap(i, (s % (i as u64 + 1)) as usize);
    }
    let finite_moderate: Vec<bf16> = all
        .iter()
        .map(|&b| bf16::from_bits(b))
        .filter(|x| x.is_finite() && x.to_f32().abs() < 1e4)
        .collect();
    let n = finite_moderate.len() / 16 * 16;
    let same = |v: &[bf16]| {
        let (a, b) = (nvfp4::quantize(v), nvfp4::quantize_scalar(v));
        let first = (0..a.packed.len()).find(|&i| a.packed[i] != b.packed[i]);
        assert!(
            first.is_none(),
            "first differing byte {first:?}: values {:?}",
            first.map(|i| (v[2 * i].to_f32(), v[2 * i + 1].to_f32()))
        );
        assert_eq!(a.block_scales, b.block_scales);
        assert_eq!(a.global_scale.to_bits(), b.global_scale.to_bits());
    };
    same(&finite_moderate[..n]);
    let every: Vec<bf16> = all.iter().map(|&b| bf16::from_bits(b)).collect();
    same(&every);
    // Values whose quotient lands exactly on ModelOpt's boundaries (0.25 ... 5.0) and E2M1 values.
    let ties: Vec<bf16> = [
        0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
    ]
    .iter()
    .flat_map(|&t| [t, -t])
    .chain([6.0; 4])
    .map(bf16::from_f32)
    .collect();
    same(&ties.repeat(8));
    let f16s: Vec<f16> = finite_moderate[..n]
        .iter()
        .map(|x| f16::from_f32(x.to_f32()))
        .collect();
    let (a, b) = (nvfp4::quantize(&f16s), nvfp4::quantize_scalar(&f16s));
    assert_eq!((a.packed, a.block_scales), (b.packed, b.block_scales));
    let f32s: Vec<f32> = every.iter().map(|x| x.to_f32()).collect();
    let (a, b) = (nvfp4::quantize(&f32s), nvfp4::quantize_scalar(&f32s));
    assert_eq!((a.packed, a.block_scales), (b.packed, b.block_scales));
}
