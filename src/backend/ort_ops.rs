//! trt-diff's own ONNX Runtime operators (domain `trtdiff`), registered on every CPU session:
//! `MatMulF16(X f32 [..., K], W f16 [N, K]) -> Y f32 [..., N]` and `MatMulBF16` (W bf16): a Linear layer whose
//! weights stay 16-bit in memory (see `half_matmul`). Only graphs made for the CPU use them
//! (`models::llama::decoder_graph_cpu`); TensorRT graphs keep standard ops. Output rows are split over
//! `spin_pool`.
use super::half_matmul::{HalfWeight, dot_rows, gemm_rows, task_rows};
use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput,
    OperatorOutput,
};
use ort::value::TensorElementType;
use std::marker::PhantomData;

pub const DOMAIN: &str = "trtdiff";

struct MatMulHalf<W>(PhantomData<W>);

trait OpInfo {
    const NAME: &'static str;
    const TYPE: TensorElementType;
}
impl OpInfo for half::f16 {
    const NAME: &'static str = "MatMulF16";
    const TYPE: TensorElementType = TensorElementType::Float16;
}
impl OpInfo for half::bf16 {
    const NAME: &'static str = "MatMulBF16";
    const TYPE: TensorElementType = TensorElementType::Bfloat16;
}

/// A raw output pointer shared by the parallel tasks, which write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn err(msg: String) -> ort::Error {
    ort::Error::new(msg)
}

fn compute<W>(ctx: &ComputeContext) -> ort::Result<()>
where
    W: HalfWeight + OpInfo + ort::value::PrimitiveTensorElementType,
{
    let x = ctx
        .input(0)?
        .ok_or_else(|| err("MatMulF16: X missing".into()))?;
    let w = ctx
        .input(1)?
        .ok_or_else(|| err("MatMulF16: W missing".into()))?;
    let (xs, xd) = x.try_extract_tensor::<f32>()?;
    let (ws, wd) = w.try_extract_tensor::<W>()?;
    if ws.len() != 2 || xs.is_empty() || xs[xs.len() - 1] != ws[1] {
        return Err(err(format!(
            "{}: X {:?} and W {:?} do not fit (X [..., K], W [N, K])",
            W::NAME,
            &xs[..],
            &ws[..]
        )));
    }
    let (n, k) = (ws[0] as usize, ws[1] as usize);
    let m = xd.len() / k.max(1);
    let mut shape: Vec<i64> = xs[..xs.len() - 1].to_vec();
    shape.push(n as i64);
    let mut y = ctx
        .output(0, shape)?
        .ok_or_else(|| err(format!("{}: no output", W::NAME)))?;
    let (_, yd) = y.try_extract_tensor_mut::<f32>()?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        yd.fill(0.0);
        return Ok(());
    }
    let out = OutPtr(yd.as_mut_ptr());
    let step = task_rows(m, n);
    let tasks = n.div_ceil(step);
    let body = move |t: usize| {
        let out = out;
        let rows = t * step..((t + 1) * step).min(n);
        if m == 1 {
            // SAFETY: task t alone writes y[rows]; y holds n values.
            let y = unsafe { std::slice::from_raw_parts_mut(out.0.add(rows.start), rows.len()) };
            dot_rows(xd, wd, k, rows, y);
        } else {
            thread_local! {
                static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            SCRATCH.with(|s| {
                // SAFETY: task t alone writes columns `rows` of the [m, n] output.
                unsafe { gemm_rows(xd, m, wd, k, n, rows, out.0, &mut s.borrow_mut()) }
            });
        }
    };
    // Our own pool rather than ONNX Runtime's (`ctx.par_for`) or rayon: see `spin_pool`. Sessions running these
    // operators do not spin (see `ort_backend`). Small products stay on the calling thread.
    if m * n * k < 1 << 16 {
        (0..tasks).for_each(body);
    } else {
        super::spin_pool::SpinPool::global().run(tasks, &body);
    }
    Ok(())
}

impl<W> Operator for MatMulHalf<W>
where
    W: HalfWeight + OpInfo + ort::value::PrimitiveTensorElementType,
{
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        W::NAME
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(W::TYPE),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(|ctx: &ComputeContext| compute::<W>(ctx)))
    }
}

/// The `trtdiff` operator domain, for a session builder's `with_operators`.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(MatMulHalf::<half::f16>(PhantomData))?
        .add(MatMulHalf::<half::bf16>(PhantomData))
}

#[cfg(test)]
mod tests {
    use crate::backend::Engine;
    use crate::backend::HostTensor;
    use crate::backend::ort_backend::{OrtEngine, OrtOptions};
    use crate::onnx::{DataType, Dim, GraphBuilder};

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }

    /// The operator against ONNX Runtime's own f32 MatMul on the same (16-bit-rounded) weights, in one graph.
    fn compare(half: DataType, m: usize, k: usize, n: usize, threads: usize) -> f32 {
        let w = data(n * k, 7);
        let (bytes, rounded): (Vec<u8>, Vec<f32>) = if half == DataType::FLOAT16 {
            let h: Vec<half::f16> = w.iter().map(|v| half::f16::from_f32(*v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        } else {
            let h: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
            (
                h.iter().flat_map(|v| v.to_le_bytes()).collect(),
                h.iter().map(|v| v.to_f32()).collect(),
            )
        };
        let mut wt = vec![0f32; k * n];
        for j in 0..n {
            for i in 0..k {
                wt[i * n + j] = rounded[j * k + i];
            }
        }
        let mut g = GraphBuilder::new("half_matmul", 18);
        g.use_domain(super::DOMAIN, 1);
        let x = g
            .input(
                "x",
                DataType::FLOAT,
                vec![Dim::Fixed(1), Dim::Sym("m".into()), Dim::Fixed(k as i64)],
            )
            .unwrap();
        let wh = g
            .initializer("w_half", half, &[n as i64, k as i64], bytes.into())
            .unwrap();
        let wf = g.const_f32("w_f32", &[k as i64, n as i64], &wt).unwrap();
        let op = if half == DataType::FLOAT16 {
            "MatMulF16"
        } else {
            "MatMulBF16"
        };
        let out_shape = vec![Dim::Fixed(1), Dim::Sym("m".into()), Dim::Fixed(n as i64)];
        let ours = g
            .node_in(
                super::DOMAIN,
                op,
                "ours",
                &[&x, &wh],
                vec![],
                vec![(DataType::FLOAT, out_shape.clone())],
            )
            .unwrap()
            .remove(0);
        let theirs = g
            .op(
                "MatMul",
                "theirs",
                &[&x, &wf],
                vec![],
                DataType::FLOAT,
                out_shape,
            )
            .unwrap();
        g.output(&ours);
        g.output(&theirs);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.onnx");
        crate::onnx::save(g.finish(), &path, &Default::default()).unwrap();
        let mut e = OrtEngine::open(
            &path,
            &OrtOptions {
                threads,
                ..Default::default()
            },
        )
        .unwrap();
        let xin = HostTensor::from_f32(&[1, m, k], &data(m * k, 3));
        let out = e.run(&[("x".into(), xin)]).unwrap();
        let (a, b) = (out[0].1.to_f64().unwrap(), out[1].1.to_f64().unwrap());
        assert_eq!(out[0].1.shape, vec![1, m, n]);
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(&b)
            .map(|(p, q)| (p - q).abs() as f32)
            .fold(0.0, f32::max)
    }

    #[test]
    fn half_matmul_equals_ort_matmul() {
        // Odd K and N (vector tails, partial row groups and tiles), decode (M=1) and prefill (M>1), one and two
        // threads. Sums of K products of magnitude <= 1 in f32: a few ulps of sqrt(K)-sized values differ.
        for half in [DataType::FLOAT16, DataType::BFLOAT16] {
            for &(m, k, n) in &[
                (1, 37, 131),
                (1, 200, 131),
                (1, 896, 300),
                (5, 37, 131),
                (9, 896, 300),
                (1, 3, 1),
            ] {
                for threads in [1, 2] {
                    let d = compare(half, m, k, n, threads);
                    eprintln!(
                        "{half} m={m} k={k} n={n} threads={threads}: max |ours - MatMul| {d:.2e}"
                    );
                    assert!(
                        d <= 2e-5 * (k as f32).sqrt(),
                        "{half} m={m} k={k} n={n}: max diff {d}"
                    );
                }
            }
        }
    }
}
