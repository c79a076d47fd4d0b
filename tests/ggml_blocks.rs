//! The GGUF block kernels against ggml's own: weights quantized by `ggml_quantize_chunk`, activations by the CPU
//! backend's `from_float` and dot products by its `vec_dot` (golden from scripts/golden/ggml_blocks.py, every
//! format of `ggml_blocks::ALL`). Our activation quantization must give ggml's bytes, and every kernel set
//! (portable, AVX2, AVX2 + VNNI where the CPU has them) ggml's dot products up to float summation order.
use trt_diff::backend::ggml_blocks::{self, ALL, Isa, QActs, Quant, dot_with};
use trt_diff::backend::ggml_repack::Packed;
use trt_diff::weights::gguf::GgmlType;

fn u32_at(b: &[u8], at: &mut usize) -> u32 {
    let v = u32::from_le_bytes(b[*at..*at + 4].try_into().unwrap());
    *at += 4;
    v
}

fn take<'a>(b: &'a [u8], at: &mut usize, n: usize) -> &'a [u8] {
    let s = &b[*at..*at + n];
    *at += n;
    s
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn block_dot_products_equal_ggml() {
    let b = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/golden/ggml/blocks.bin"
    ))
    .unwrap();
    assert_eq!(&b[..8], b"GGMLDOT1");
    let mut at = 8;
    let cases = u32_at(&b, &mut at);
    let mut seen = Vec::new();
    let mut packed = Vec::new();
    for _ in 0..cases {
        let t = GgmlType(u32_at(&b, &mut at));
        let rows = u32_at(&b, &mut at) as usize;
        let k = u32_at(&b, &mut at) as usize;
        let act = GgmlType(u32_at(&b, &mut at));
        let q = Quant::from_ggml(t).unwrap();
        let rb = q.row_bytes(k).unwrap();
        let w = take(&b, &mut at, rows * rb);
        let x = f32s(take(&b, &mut at, 4 * k));
        // ggml's block_q8_0, block_q8_1 (two f16, not gguf-py's two f32) and block_q8_K.
        let (abs, aes) = match act.0 {
            8 => (32, 34),
            9 => (32, 36),
            15 => (256, 292),
            other => panic!("activation type {other}"),
        };
        let xq = take(&b, &mut at, k / abs * aes);
        let want = f32s(take(&b, &mut at, 4 * rows));
        let mut a = QActs::default();
        a.quantize(q, &x, k);
        assert_eq!(
            a.ggml_bytes(0),
            xq,
            "{t} k={k}: activation blocks ({act}) differ from ggml's"
        );
        for r in 0..rows {
            for isa in [Isa::Portable, Isa::Avx2, Isa::Avx2Vnni] {
                let got = dot_with(isa, q, &w[r * rb..(r + 1) * rb], &a, 0);
                let tol = 2e-6 * (k as f32).sqrt() * want[r].abs().max(1.0);
                assert!(
                    (got - want[r]).abs() <= tol,
                    "{t} k={k} row {r} {isa:?}: {got} vs ggml {}",
                    want[r]
                );
            }
        }
        // The same rows repacked eight at a time (`ggml_repack`), where the golden case has a whole group.
        if let Some(p) = Packed::new(q, w, k, rows) {
            let mut got = vec![0f32; rows];
            p.dot_rows(&a, 0, 0..rows, &mut got);
            for r in 0..rows {
                let tol = 2e-6 * (k as f32).sqrt() * want[r].abs().max(1.0);
                assert!(
                    (got[r] - want[r]).abs() <= tol,
                    "{t} k={k} row {r} repacked: {} vs ggml {}",
                    got[r],
                    want[r]
                );
            }
            packed.push(q);
        }
        seen.push(q);
    }
    if std::env::var_os("TRT_DIFF_NO_REPACK").is_none()
        && ggml_blocks::detected_isa() != Isa::Portable
    {
        for q in [
            Quant::Q8_0,
            Quant::Q4_0,
            Quant::Q5_0,
            Quant::Q4K,
            Quant::Q6K,
        ] {
            assert!(packed.contains(&q), "{q:?} was not repacked");
        }
    }
    for q in ALL {
        assert!(seen.contains(&q), "{q:?} has no golden case");
    }
    assert_eq!(at, b.len());
}
