//! trt-diff's own ONNX Runtime operators (domain `trtdiff`), registered on the CPU sessions whose graphs use them:
//! - `MatMulF16(X f32 [..., K], W f16 [N, K], B f32 [N] optional) -> Y f32 [..., N]`, `MatMulBF16` (W bf16) and
//!   `MatMulF32`: a Linear layer whose weights stay 16-bit in memory (see `half_matmul`), or f32 for f32 models;
//! - `GateUpF16(X, W [2N, K]) -> Y [..., N]`, `GateUpBF16` and `GateUpF32`: a gated MLP's input half,
//!   `act(X W[:N]^T) * (X W[N:]^T)`, in one call; `act` is SiLU, or GELU (tanh form) with the attribute
//!   `activation` = 1 (`MlpAct::attr`).
//!
//! Only graphs made for the CPU use them (`models::llama_cpu`); TensorRT graphs keep standard ops. Output rows are
//! split over `spin_pool`.
use super::half_matmul::{
    DOT_MAX_ROWS, WeightType, dot_rows, dot_rows_batch, gemm_rows, task_rows,
};
use crate::weights::llm_config::MlpAct;
use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput,
    OperatorOutput,
};
use ort::value::TensorElementType;
use std::marker::PhantomData;

pub const DOMAIN: &str = "trtdiff";

/// `GATE_UP`: the `GateUp*` form.
struct MatMulHalf<W, const GATE_UP: bool>(PhantomData<W>);

trait OpInfo {
    /// (MatMul name, GateUp name)
    const NAMES: [&'static str; 2];
    const TYPE: TensorElementType;
}
impl OpInfo for half::f16 {
    const NAMES: [&'static str; 2] = ["MatMulF16", "GateUpF16"];
    const TYPE: TensorElementType = TensorElementType::Float16;
}
impl OpInfo for f32 {
    const NAMES: [&'static str; 2] = ["MatMulF32", "GateUpF32"];
    const TYPE: TensorElementType = TensorElementType::Float32;
}
impl OpInfo for half::bf16 {
    const NAMES: [&'static str; 2] = ["MatMulBF16", "GateUpBF16"];
    const TYPE: TensorElementType = TensorElementType::Bfloat16;
}

/// The operator's name in graphs (`MatMulF16`, `GateUpBF16`, ...) for weights of ONNX type `weights`: FLOAT,
/// FLOAT16 or BFLOAT16.
pub fn op_name(weights: crate::onnx::DataType, gate_up: bool) -> &'static str {
    use crate::onnx::DataType;
    let names = match weights {
        DataType::BFLOAT16 => <half::bf16 as OpInfo>::NAMES,
        DataType::FLOAT => <f32 as OpInfo>::NAMES,
        _ => <half::f16 as OpInfo>::NAMES,
    };
    names[gate_up as usize]
}

/// A raw output pointer shared by the parallel tasks, which write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

fn err(msg: String) -> ort::Error {
    ort::Error::new(msg)
}

fn compute<W, const GATE_UP: bool>(ctx: &ComputeContext, act: MlpAct) -> ort::Result<()>
where
    W: WeightType + OpInfo + ort::value::PrimitiveTensorElementType,
{
    let name = W::NAMES[GATE_UP as usize];
    let x = ctx
        .input(0)?
        .ok_or_else(|| err(format!("{name}: X missing")))?;
    let w = ctx
        .input(1)?
        .ok_or_else(|| err(format!("{name}: W missing")))?;
    let (xs, xd) = x.try_extract_tensor::<f32>()?;
    let (ws, wd) = w.try_extract_tensor::<W>()?;
    if ws.len() != 2 || xs.is_empty() || xs[xs.len() - 1] != ws[1] || (GATE_UP && ws[0] % 2 != 0) {
        return Err(err(format!(
            "{name}: X {:?} and W {:?} do not fit (X [..., K], W [N, K]{})",
            &xs[..],
            &ws[..],
            if GATE_UP { " with N even" } else { "" }
        )));
    }
    let bias = if GATE_UP { None } else { ctx.input(2)? };
    let bias = match &bias {
        Some(b) => {
            let (bs, bd) = b.try_extract_tensor::<f32>()?;
            if bd.len() as i64 != ws[0] {
                return Err(err(format!(
                    "{name}: B {:?} does not fit W {:?}",
                    &bs[..],
                    &ws[..]
                )));
            }
            Some(bd)
        }
        None => None,
    };
    let (n, k) = (ws[0] as usize, ws[1] as usize);
    let m = xd.len() / k.max(1);
    let n_out = if GATE_UP { n / 2 } else { n };
    let mut shape: Vec<i64> = xs[..xs.len() - 1].to_vec();
    shape.push(n_out as i64);
    let mut y = ctx
        .output(0, shape)?
        .ok_or_else(|| err(format!("{name}: no output")))?;
    let (_, yd) = y.try_extract_tensor_mut::<f32>()?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if GATE_UP {
        // Decode: each task takes the same rows of both halves. Prefill: the whole [m, 2n] product (in a buffer kept
        // per thread: tens of MB, not worth allocating and faulting in every call), then the gate.
        if m == 1 {
            product(xd, wd, m, k, n, Some(act), yd);
        } else {
            thread_local! {
                static FULL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            FULL.with(|f| {
                let mut full = f.borrow_mut();
                full.resize(m * n, 0.0);
                product(xd, wd, m, k, n, None, &mut full[..m * n]);
                for (yr, fr) in yd.chunks_exact_mut(n_out).zip(full.chunks_exact(n)) {
                    let (g, u) = fr.split_at(n_out);
                    for ((o, &g), &u) in yr.iter_mut().zip(g).zip(u) {
                        *o = act.apply(g) * u;
                    }
                }
            });
        }
        return Ok(());
    }
    product(xd, wd, m, k, n, None, yd);
    if let Some(b) = bias {
        for row in yd.chunks_exact_mut(n) {
            for (o, &bv) in row.iter_mut().zip(b) {
                *o += bv;
            }
        }
    }
    Ok(())
}

/// `y = x W^T` ([m, n]) over `spin_pool`; with a `gate` activation and m = 1, `y` is [n / 2] and holds the gated
/// product.
fn product<W: WeightType>(
    xd: &[f32],
    wd: &[W],
    m: usize,
    k: usize,
    n: usize,
    gate: Option<MlpAct>,
    yd: &mut [f32],
) {
    let gate_up = gate.is_some();
    let act = gate.unwrap_or_default();
    if k == 0 {
        yd.fill(0.0);
        return;
    }
    let out = OutPtr(yd.as_mut_ptr());
    let half = n / 2;
    let rows_total = if gate_up && m == 1 { half } else { n };
    let step = task_rows(m, rows_total);
    let tasks = rows_total.div_ceil(step);
    let body = move |t: usize| {
        let out = out;
        let rows = t * step..((t + 1) * step).min(rows_total);
        if m == 1 && gate_up {
            // Gate rows, then the matching up rows (two sequential streams), combined in place.
            // SAFETY: task t alone writes y[rows]; y holds n / 2 values.
            let y = unsafe { std::slice::from_raw_parts_mut(out.0.add(rows.start), rows.len()) };
            let mut up = [0f32; 256];
            for (yc, start) in y
                .chunks_mut(up.len())
                .zip((rows.start..rows.end).step_by(up.len()))
            {
                let r = start..start + yc.len();
                dot_rows(xd, wd, k, r.clone(), yc);
                dot_rows(xd, wd, k, r.start + half..r.end + half, &mut up[..yc.len()]);
                for (o, &u) in yc.iter_mut().zip(&up) {
                    *o = act.apply(*o) * u;
                }
            }
        } else if m == 1 {
            // SAFETY: task t alone writes y[rows]; y holds n values.
            let y = unsafe { std::slice::from_raw_parts_mut(out.0.add(rows.start), rows.len()) };
            dot_rows(xd, wd, k, rows, y);
        } else if m <= DOT_MAX_ROWS {
            // SAFETY: task t alone writes columns `rows` of the [m, n] output.
            unsafe { dot_rows_batch(xd, m, wd, k, n, rows, out.0) };
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
}

impl<W, const GATE_UP: bool> Operator for MatMulHalf<W, GATE_UP>
where
    W: WeightType + OpInfo + ort::value::PrimitiveTensorElementType,
{
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        W::NAMES[GATE_UP as usize]
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let mut v = vec![
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(W::TYPE),
        ];
        if !GATE_UP {
            v.push(OperatorInput::optional(TensorElementType::Float32));
        }
        v
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let act = MlpAct::from_attr(ctx.get::<i64>("activation"))
            .ok_or_else(|| err(format!("{}: unknown activation", self.name())))?;
        Ok(Box::new(move |ctx: &ComputeContext| {
            compute::<W, GATE_UP>(ctx, act)
        }))
    }
}

/// The `trtdiff` operator domain, for a session builder's `with_operators`.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(MatMulHalf::<half::f16, false>(PhantomData))?
        .add(MatMulHalf::<half::bf16, false>(PhantomData))?
        .add(MatMulHalf::<f32, false>(PhantomData))?
        .add(MatMulHalf::<half::f16, true>(PhantomData))?
        .add(MatMulHalf::<half::bf16, true>(PhantomData))?
        .add(MatMulHalf::<f32, true>(PhantomData))?
        .add(super::ggml_ops::MatMulGgml::<false>)?
        .add(super::ggml_ops::MatMulGgml::<true>)?
        .add(super::ggml_ops::GatherGgml)?
        .add(super::attention_op::CausalAttention)
}

#[cfg(test)]
mod tests {
    use crate::backend::Engine;
    use crate::backend::HostTensor;
    use crate::backend::half_matmul::test_data as data;
    use crate::backend::ort_backend::{OrtEngine, OrtOptions};
    use crate::onnx::{DataType, Dim, GraphBuilder};

    /// The operators against ONNX Runtime's own f32 ops on the same (16-bit-rounded) weights, in one graph:
    /// `MatMul*` with a bias against MatMul + Add, `GateUp*` against MatMul, Split, Sigmoid and two Muls. Returns
    /// the largest difference of each.
    fn compare(half: DataType, m: usize, k: usize, n: usize, threads: usize) -> [f32; 2] {
        let w = data(n * k, 7);
        let (bytes, rounded): (Vec<u8>, Vec<f32>) = if half == DataType::FLOAT {
            (w.iter().flat_map(|v| v.to_le_bytes()).collect(), w.clone())
        } else if half == DataType::FLOAT16 {
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
        let m_dim = || Dim::Sym("m".into());
        let x = g
            .input(
                "x",
                DataType::FLOAT,
                vec![Dim::Fixed(1), m_dim(), Dim::Fixed(k as i64)],
            )
            .unwrap();
        let wh = g
            .initializer("w_half", half, &[n as i64, k as i64], bytes.into())
            .unwrap();
        let wf = g.const_f32("w_f32", &[k as i64, n as i64], &wt).unwrap();
        let b = g.const_f32("b", &[n as i64], &data(n, 11)).unwrap();
        let shape = |c: usize| vec![Dim::Fixed(1), m_dim(), Dim::Fixed(c as i64)];
        let f = DataType::FLOAT;
        let mut ours_op = |gate_up: bool, inputs: &[&crate::onnx::Value], c: usize| {
            let op = super::op_name(half, gate_up);
            g.node_in(super::DOMAIN, op, op, inputs, vec![], vec![(f, shape(c))])
                .unwrap()
                .remove(0)
        };
        let ours = ours_op(false, &[&x, &wh, &b], n);
        let ours_gated = if n.is_multiple_of(2) {
            Some(ours_op(true, &[&x, &wh], n / 2))
        } else {
            None
        };
        let mm = g
            .op("MatMul", "mm", &[&x, &wf], vec![], f, shape(n))
            .unwrap();
        let theirs = g
            .op("Add", "theirs", &[&mm, &b], vec![], f, shape(n))
            .unwrap();
        g.output(&ours);
        g.output(&theirs);
        if let Some(o) = &ours_gated {
            let parts = g
                .node(
                    "Split",
                    "split",
                    &[&mm],
                    vec![
                        ("axis", crate::onnx::Attr::Int(-1)),
                        ("num_outputs", crate::onnx::Attr::Int(2)),
                    ],
                    vec![(f, shape(n / 2)), (f, shape(n / 2))],
                )
                .unwrap();
            let sg = g
                .op("Sigmoid", "sig", &[&parts[0]], vec![], f, shape(n / 2))
                .unwrap();
            let silu = g
                .op("Mul", "silu", &[&parts[0], &sg], vec![], f, shape(n / 2))
                .unwrap();
            let gated = g
                .op("Mul", "gated", &[&silu, &parts[1]], vec![], f, shape(n / 2))
                .unwrap();
            g.output(o);
            g.output(&gated);
        }
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
        assert_eq!(out[0].1.shape, vec![1, m, n]);
        let diff = |i: usize| {
            let (a, b) = (out[i].1.to_f64().unwrap(), out[i + 1].1.to_f64().unwrap());
            assert_eq!(a.len(), b.len());
            a.iter()
                .zip(&b)
                .map(|(p, q)| (p - q).abs() as f32)
                .fold(0.0, f32::max)
        };
        [diff(0), if out.len() > 2 { diff(2) } else { 0.0 }]
    }

    #[test]
    fn half_matmul_equals_ort_matmul() {
        // Odd K and N (vector tails, partial row groups and tiles), decode (M=1) and prefill (M>1), one and two
        // threads. Sums of K products of magnitude <= 1 in f32: a few ulps of sqrt(K)-sized values differ.
        for half in [DataType::FLOAT16, DataType::BFLOAT16, DataType::FLOAT] {
            for &(m, k, n) in &[
                (1, 37, 131),
                (1, 200, 131),
                (1, 896, 300),
                (1, 64, 1100),
                (5, 37, 131),
                (9, 896, 300),
                (4, 64, 1100),
                (40, 896, 300),
                (1, 3, 1),
            ] {
                for threads in [1, 2] {
                    let [d, gated] = compare(half, m, k, n, threads);
                    eprintln!(
                        "{half} m={m} k={k} n={n} threads={threads}: max |ours - ORT| {d:.2e}, gate-up {gated:.2e}"
                    );
                    assert!(
                        d <= 2e-5 * (k as f32).sqrt() && gated <= 2e-5 * (k as f32).sqrt(),
                        "{half} m={m} k={k} n={n}: max diff {d}, gate-up {gated}"
                    );
                }
            }
        }
    }
}
