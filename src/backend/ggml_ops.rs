//! ONNX Runtime operators (domain `trtdiff`) on GGUF weights kept in their ggml block formats (`ggml_blocks`):
//! - `MatMulGgml(X f32 [..., K], W0 uint8 [N0, row bytes], W1?, W2?, B f32 [N0+N1+N2]?) -> Y f32 [..., N0+N1+N2]`
//!   with attribute `types` (the ggml type id of each W): the projections of one input (q, k and v) in one call,
//!   each weight in its own format, outputs side by side;
//! - `GateUpGgml(X, W_gate, W_up) -> act(X W_gate^T) * (X W_up^T)` with `types` likewise and `activation` as
//!   `ort_ops`' GateUp;
//! - `GatherGgml(W uint8 [V, row bytes], ids int64 [...]) -> f32 [..., K]` with `type` and `k`: embedding rows,
//!   dequantized.
//!
//! The weights are the GGUF file's bytes: graphs keep them as initializers whose external data points into the GGUF
//! (`models::llama_cpu`). Q8_0, Q5_0 and Q4_0 weights are repacked eight rows at a time on a kernel's first call
//! (`ggml_repack`, `TRT_DIFF_NO_REPACK=1` turns it off) and the file's pages handed back to the kernel. Output rows
//! are split over `spin_pool` as in `ort_ops`.
use super::ggml_blocks::{self, Act, DOT_MAX_ROWS, QActs, Quant};
use super::ggml_repack::Packed;
use crate::weights::gguf::GgmlType;
use crate::weights::llm_config::MlpAct;
use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

pub const MATMUL: &str = "MatMulGgml";
pub const GATE_UP: &str = "GateUpGgml";
pub const GATHER: &str = "GatherGgml";

fn err(msg: String) -> ort::Error {
    ort::Error::new(msg)
}

/// A weight's storage: ggml blocks, or plain floats (GGUF files keep some matrices in F16/F32 among quantized ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WKind {
    Q(Quant),
    F32,
    F16,
    BF16,
}

impl WKind {
    pub fn from_ggml(t: GgmlType) -> Option<Self> {
        Some(match t {
            GgmlType::F32 => WKind::F32,
            GgmlType::F16 => WKind::F16,
            GgmlType::BF16 => WKind::BF16,
            t => WKind::Q(Quant::from_ggml(t)?),
        })
    }
    pub fn ggml(self) -> GgmlType {
        match self {
            WKind::Q(q) => q.ggml(),
            WKind::F32 => GgmlType::F32,
            WKind::F16 => GgmlType::F16,
            WKind::BF16 => GgmlType::BF16,
        }
    }
    /// Bytes of a row of `k` elements; None when `k` is not whole blocks.
    pub fn row_bytes(self, k: usize) -> Option<usize> {
        match self {
            WKind::Q(q) => q.row_bytes(k),
            WKind::F32 => Some(4 * k),
            WKind::F16 | WKind::BF16 => Some(2 * k),
        }
    }
}

fn quant_of(op: &str, t: i64) -> ort::Result<WKind> {
    u32::try_from(t)
        .ok()
        .and_then(|t| WKind::from_ggml(GgmlType(t)))
        .ok_or_else(|| {
            err(format!(
                "{op}: ggml type {t} is not one of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K"
            ))
        })
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

pub struct MatMulGgml<const GATED: bool>;

/// One weight of a call: its format, bytes, rows and first output column, and its rows repacked for decode.
struct Part<'a> {
    q: WKind,
    w: &'a [u8],
    n: usize,
    col: usize,
    packed: Option<&'a Packed>,
}

/// A kernel's weights repacked on its first call ([`Packed`]), with the addresses they were packed from: ONNX
/// Runtime hands a node the same initializer buffers on every call of a session; a call with other buffers (a
/// weight fed as an input) is served from the file layout.
#[derive(Default)]
struct PackCache(std::sync::Mutex<Option<std::sync::Arc<PackSet>>>);

struct PackSet {
    from: Vec<(usize, usize)>,
    packed: Vec<Option<Packed>>,
}

impl PackCache {
    /// Packs the node's weights when the session creates the kernel, where they are initializers (constant inputs
    /// 1..): the model's load pays for the packing, as llama.cpp's does, not its first prompt. Anything else waits
    /// for the first call.
    fn pack_constants(&self, ctx: &KernelContext, types: &[i64], name: &str) {
        let mut from = Vec::new();
        let mut packed = Vec::new();
        for (i, &t) in types.iter().enumerate() {
            let Ok(w) = ctx.constant_input::<ort::value::DynTensorValueType>(i + 1) else {
                return;
            };
            let Ok((shape, data)) = w.try_extract_tensor::<u8>() else {
                return;
            };
            let (Ok(q), &[n, rb]) = (quant_of(name, t), &shape[..]) else {
                return;
            };
            let (n, rb) = (n.max(0) as usize, rb.max(0) as usize);
            from.push((data.as_ptr() as usize, data.len()));
            packed.push(match q {
                WKind::Q(q) if rb.is_multiple_of(q.block_bytes()) && data.len() >= n * rb => {
                    let k = rb / q.block_bytes() * q.block_elems();
                    let p = Packed::new(q, data, k, n);
                    if p.is_some() {
                        super::ggml_repack::release(data);
                    }
                    p
                }
                _ => None,
            });
        }
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(std::sync::Arc::new(PackSet { from, packed }));
    }

    fn get(&self, parts: &[Part], k: usize) -> std::sync::Arc<PackSet> {
        let from: Vec<(usize, usize)> = parts
            .iter()
            .map(|p| (p.w.as_ptr() as usize, p.w.len()))
            .collect();
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match &*slot {
            Some(set) if set.from == from => set.clone(),
            Some(_) => {
                tracing::debug!(
                    "weights at other addresses than packed: the file's layout serves this call"
                );
                std::sync::Arc::new(PackSet {
                    from,
                    packed: parts.iter().map(|_| None).collect(),
                })
            }
            None => {
                let packed = parts
                    .iter()
                    .map(|p| {
                        let WKind::Q(q) = p.q else { return None };
                        let packed = Packed::new(q, p.w, k, p.n)?;
                        super::ggml_repack::release(p.w);
                        Some(packed)
                    })
                    .collect();
                let set = std::sync::Arc::new(PackSet { from, packed });
                *slot = Some(set.clone());
                set
            }
        }
    }
}

fn act_index(a: Act) -> usize {
    match a {
        Act::Q8_0 => 0,
        Act::Q8_1 => 1,
        Act::Q8K => 2,
    }
}

thread_local! {
    static ACTS: std::cell::RefCell<[QActs; 3]> = Default::default();
    static FULL: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `y = x [W0; W1; ...]^T` ([m, total n]); with a `gate` activation (two parts, m = 1) `y` is [n] and holds the
/// gated product.
fn product(parts: &[Part], x: &[f32], m: usize, k: usize, gate: Option<MlpAct>, y: &mut [f32]) {
    let gated = gate.is_some();
    let act = gate.unwrap_or_default();
    let total: usize = parts.iter().map(|p| p.n).sum();
    ACTS.with(|acts| {
        let mut acts = acts.borrow_mut();
        let use_dots = m <= DOT_MAX_ROWS;
        let mut done = [false; 3];
        for p in parts {
            let WKind::Q(q) = p.q else { continue };
            let i = act_index(q.act());
            if (use_dots || p.packed.is_some()) && !done[i] {
                acts[i].quantize(q, x, k);
                done[i] = true;
            }
        }
        let acts = &*acts;
        let step = if use_dots {
            256
        } else {
            let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
            // Whole groups of eight rows for the repacked weights.
            total.div_ceil(threads).clamp(128, 4096).next_multiple_of(8)
        };
        // Tasks: (part, rows) of at most `step` rows; gated calls split the gate's rows.
        let mut tasks = Vec::new();
        let split_parts = if gated && m == 1 { &parts[..1] } else { parts };
        for (i, p) in split_parts.iter().enumerate() {
            for s in (0..p.n).step_by(step) {
                tasks.push((i, s..(s + step).min(p.n)));
            }
        }
        let out = OutPtr(y.as_mut_ptr());
        let n_tasks = tasks.len();
        let body = move |t: usize| {
            let out = out;
            let (i, rows) = tasks[t].clone();
            let p = &parts[i];
            if gated && m == 1 {
                // SAFETY: task t alone writes y[rows]; y holds n values.
                let yg =
                    unsafe { std::slice::from_raw_parts_mut(out.0.add(rows.start), rows.len()) };
                let up = &parts[1];
                let mut u = [0f32; 256];
                dots(p, acts, x, k, rows.clone(), yg);
                dots(up, acts, x, k, rows.clone(), &mut u[..rows.len()]);
                for (o, &u) in yg.iter_mut().zip(&u) {
                    *o = act.apply(*o) * u;
                }
                return;
            }
            SCRATCH.with(|s| {
                // SAFETY: task t alone writes columns p.col + rows of the [m, total] output.
                unsafe {
                    product_part(
                        p,
                        acts,
                        use_dots,
                        x,
                        m,
                        k,
                        total,
                        rows,
                        out.0.add(p.col),
                        &mut s.borrow_mut(),
                    )
                }
            });
        };
        if m * total * k < 1 << 16 {
            (0..n_tasks).for_each(body);
        } else {
            super::spin_pool::SpinPool::global().run(n_tasks, &body);
        }
    });
}

/// 16-bit or f32 weights as elements (GGUF data is aligned to at least 32 bytes; a misaligned buffer is copied).
fn floats<T: bytemuck::Pod>(w: &[u8]) -> std::borrow::Cow<'_, [T]> {
    match bytemuck::try_cast_slice(w) {
        Ok(v) => std::borrow::Cow::Borrowed(v),
        Err(_) => {
            let size = std::mem::size_of::<T>();
            let mut v = vec![T::zeroed(); w.len() / size];
            let len = v.len() * size;
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(&w[..len]);
            std::borrow::Cow::Owned(v)
        }
    }
}

/// Decode dots of one part's rows with activation row 0.
fn dots(
    p: &Part,
    acts: &[QActs; 3],
    x: &[f32],
    k: usize,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
) {
    use super::half_matmul::dot_rows as hdot;
    match (p.q, p.packed) {
        (WKind::Q(q), Some(packed)) => packed.dot_rows(&acts[act_index(q.act())], 0, rows, y),
        (WKind::Q(q), None) => ggml_blocks::dot_rows(q, p.w, &acts[act_index(q.act())], 0, rows, y),
        (WKind::F32, _) => hdot(&x[..k], &floats::<f32>(p.w), k, rows, y),
        (WKind::F16, _) => hdot(&x[..k], &floats::<half::f16>(p.w), k, rows, y),
        (WKind::BF16, _) => hdot(&x[..k], &floats::<half::bf16>(p.w), k, rows, y),
    }
}

/// Columns `rows` of one part for all `m` activation rows; `y` points at the part's first column, row stride `n`.
///
/// # Safety
/// As [`ggml_blocks::product_rows`].
#[allow(clippy::too_many_arguments)]
unsafe fn product_part(
    p: &Part,
    acts: &[QActs; 3],
    use_dots: bool,
    x: &[f32],
    m: usize,
    k: usize,
    n: usize,
    rows: std::ops::Range<usize>,
    y: *mut f32,
    scratch: &mut Vec<f32>,
) {
    use super::half_matmul as hm;
    fn half<W: hm::WeightType>(
        w: &[W],
        x: &[f32],
        m: usize,
        k: usize,
        n: usize,
        rows: std::ops::Range<usize>,
        y: *mut f32,
        scratch: &mut Vec<f32>,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if m == 1 {
                let yr = std::slice::from_raw_parts_mut(y.add(rows.start), rows.len());
                hm::dot_rows(x, w, k, rows, yr);
            } else if m <= hm::DOT_MAX_ROWS {
                hm::dot_rows_batch(x, m, w, k, n, rows, y);
            } else {
                hm::gemm_rows(x, m, w, k, n, rows, y, scratch);
            }
        }
    }
    match p.q {
        WKind::Q(q) => match p.packed {
            Some(packed) => unsafe { packed.product(&acts[act_index(q.act())], m, n, rows, y) },
            None => {
                let a = use_dots.then(|| &acts[act_index(q.act())]);
                unsafe { ggml_blocks::product_rows(q, p.w, x, a, m, k, n, rows, y, scratch) }
            }
        },
        WKind::F32 => half(&floats::<f32>(p.w), x, m, k, n, rows, y, scratch),
        WKind::F16 => half(&floats::<half::f16>(p.w), x, m, k, n, rows, y, scratch),
        WKind::BF16 => half(&floats::<half::bf16>(p.w), x, m, k, n, rows, y, scratch),
    }
}

fn compute<const GATED: bool>(
    ctx: &ComputeContext,
    types: &[i64],
    act: MlpAct,
    cache: &PackCache,
) -> ort::Result<()> {
    let name = if GATED { GATE_UP } else { MATMUL };
    let x = ctx
        .input(0)?
        .ok_or_else(|| err(format!("{name}: X missing")))?;
    let (xs, xd) = x.try_extract_tensor::<f32>()?;
    let k = *xs
        .last()
        .ok_or_else(|| err(format!("{name}: X is a scalar")))? as usize;
    let n_inputs = ctx.num_inputs()?;
    let mut ws = Vec::new();
    for i in 1..=3.min(n_inputs.saturating_sub(1)) {
        if let Some(w) = ctx.input(i)? {
            ws.push(w);
        }
    }
    if ws.len() != types.len() || (GATED && ws.len() != 2) || ws.is_empty() {
        return Err(err(format!(
            "{name}: {} weights for {} types{}",
            ws.len(),
            types.len(),
            if GATED { " (gate and up expected)" } else { "" }
        )));
    }
    let mut parts = Vec::new();
    let mut col = 0;
    for (w, &t) in ws.iter().zip(types) {
        let q = quant_of(name, t)?;
        let (s, d) = w.try_extract_tensor::<u8>()?;
        let rb = q.row_bytes(k);
        if s.len() != 2 || Some(s[1] as usize) != rb {
            return Err(err(format!(
                "{name}: weight {:?} of {q:?} does not fit K = {k} (rows of {rb:?} bytes)",
                &s[..]
            )));
        }
        let n = s[0] as usize;
        parts.push(Part {
            q,
            w: d,
            n,
            col,
            packed: None,
        });
        col += n;
    }
    if GATED && parts[0].n != parts[1].n {
        return Err(err(format!(
            "{name}: gate has {} rows, up {}",
            parts[0].n, parts[1].n
        )));
    }
    let total = col;
    let packs = cache.get(&parts, k);
    for (p, packed) in parts.iter_mut().zip(&packs.packed) {
        p.packed = packed.as_ref();
    }
    let m = xd.len() / k.max(1);
    let n_out = if GATED { parts[0].n } else { total };
    let mut shape: Vec<i64> = xs[..xs.len() - 1].to_vec();
    shape.push(n_out as i64);
    let bias = if GATED || n_inputs < 5 {
        None
    } else {
        ctx.input(4)?
    };
    let mut y = ctx
        .output(0, shape)?
        .ok_or_else(|| err(format!("{name}: no output")))?;
    let (_, yd) = y.try_extract_tensor_mut::<f32>()?;
    if m == 0 || n_out == 0 {
        return Ok(());
    }
    if GATED && m > 1 {
        FULL.with(|f| {
            let mut full = f.borrow_mut();
            full.resize(m * total, 0.0);
            product(&parts, xd, m, k, None, &mut full[..m * total]);
            for (yr, fr) in yd.chunks_exact_mut(n_out).zip(full.chunks_exact(total)) {
                let (g, u) = fr.split_at(n_out);
                for ((o, &g), &u) in yr.iter_mut().zip(g).zip(u) {
                    *o = act.apply(g) * u;
                }
            }
        });
        return Ok(());
    }
    product(&parts, xd, m, k, GATED.then_some(act), yd);
    if let Some(b) = bias {
        let (bs, bd) = b.try_extract_tensor::<f32>()?;
        if bd.len() != total {
            return Err(err(format!(
                "{name}: bias {:?} does not fit {total} outputs",
                &bs[..]
            )));
        }
        for row in yd.chunks_exact_mut(total) {
            for (o, &bv) in row.iter_mut().zip(bd) {
                *o += bv;
            }
        }
    }
    Ok(())
}

impl<const GATED: bool> Operator for MatMulGgml<GATED> {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        if GATED { GATE_UP } else { MATMUL }
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let mut v = vec![
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Uint8),
        ];
        if GATED {
            v.push(OperatorInput::required(TensorElementType::Uint8));
        } else {
            v.push(OperatorInput::optional(TensorElementType::Uint8));
            v.push(OperatorInput::optional(TensorElementType::Uint8));
            v.push(OperatorInput::optional(TensorElementType::Float32));
        }
        v
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let name = self.name().to_string();
        let types: Vec<i64> = ctx
            .get::<Vec<i64>>("types")
            .ok_or_else(|| err(format!("{name}: attribute 'types' missing")))?;
        for &t in &types {
            quant_of(&name, t)?;
        }
        let act = MlpAct::from_attr(ctx.get::<i64>("activation"))
            .ok_or_else(|| err(format!("{name}: unknown activation")))?;
        let cache = PackCache::default();
        cache.pack_constants(ctx, &types, &name);
        Ok(Box::new(move |c: &ComputeContext| {
            compute::<GATED>(c, &types, act, &cache)
        }))
    }
}

pub struct GatherGgml;

fn gather(ctx: &ComputeContext, q: WKind, k: usize) -> ort::Result<()> {
    let w = ctx
        .input(0)?
        .ok_or_else(|| err(format!("{GATHER}: W missing")))?;
    let ids = ctx
        .input(1)?
        .ok_or_else(|| err(format!("{GATHER}: ids missing")))?;
    let (ws, wd) = w.try_extract_tensor::<u8>()?;
    let (is, id) = ids.try_extract_tensor::<i64>()?;
    let rb = q.row_bytes(k).unwrap_or(0);
    if ws.len() != 2 || ws[1] as usize != rb {
        return Err(err(format!(
            "{GATHER}: table {:?} of {q:?} does not have rows of {k} elements ({rb} bytes)",
            &ws[..]
        )));
    }
    let v = ws[0] as usize;
    let mut shape: Vec<i64> = is.to_vec();
    shape.push(k as i64);
    let mut y = ctx
        .output(0, shape)?
        .ok_or_else(|| err(format!("{GATHER}: no output")))?;
    let (_, yd) = y.try_extract_tensor_mut::<f32>()?;
    let mut row = Vec::new();
    for (&t, out) in id.iter().zip(yd.chunks_exact_mut(k.max(1))) {
        let t = usize::try_from(t)
            .ok()
            .filter(|&t| t < v)
            .ok_or_else(|| err(format!("{GATHER}: token id {t} outside the table of {v}")))?;
        row.clear();
        if let Ok(v) = crate::weights::gguf::dequantize(q.ggml(), &wd[t * rb..(t + 1) * rb], k) {
            row = v;
        }
        if row.len() != k {
            return Err(err(format!("{GATHER}: row {t} cannot be dequantized")));
        }
        out.copy_from_slice(&row);
    }
    Ok(())
}

impl Operator for GatherGgml {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        GATHER
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::required(TensorElementType::Int64),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, ctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let t = ctx
            .get::<i64>("type")
            .ok_or_else(|| err(format!("{GATHER}: attribute 'type' missing")))?;
        let q = quant_of(GATHER, t)?;
        let k = ctx
            .get::<i64>("k")
            .filter(|&k| k > 0 && q.row_bytes(k as usize).is_some())
            .ok_or_else(|| {
                err(format!(
                    "{GATHER}: attribute 'k' missing or not whole blocks"
                ))
            })? as usize;
        // The table is often also a tied LM head, which repacks it: its pages must stay for the lookups.
        if let Ok(w) = ctx.constant_input::<ort::value::DynTensorValueType>(0)
            && let Ok((_, data)) = w.try_extract_tensor::<u8>()
        {
            super::ggml_repack::keep_resident(data);
        }
        Ok(Box::new(move |c: &ComputeContext| gather(c, q, k)))
    }
}

/// A GGUF tensor that a CPU graph reads in place: a [rows, k] matrix of `kind` at byte `offset` of the file.
#[derive(Clone, Debug)]
pub struct GgmlWeight {
    pub kind: WKind,
    pub rows: usize,
    pub k: usize,
    pub offset: u64,
    pub bytes: u64,
}

/// The matrices of a GGUF file under Hugging Face names, and where the graph finds the file (`location`, relative
/// to the graph's folder).
#[derive(Clone, Debug, Default)]
pub struct GgmlWeights {
    pub location: String,
    pub tensors: std::collections::HashMap<String, GgmlWeight>,
}

/// The matrices of `g` as the CPU graph reads them in place (these operators), under Hugging Face names
/// (`lm_head.weight` is `token_embd.weight` for tied embeddings); None when a matrix has a type those operators do
/// not read (then the graph takes dequantized weights).
pub fn block_weights(
    g: &crate::weights::gguf::GgufFile,
    config: &crate::weights::llm_config::LlamaConfig,
    location: &str,
) -> anyhow::Result<Option<GgmlWeights>> {
    let path = g.path().display().to_string();
    let mut tensors = std::collections::HashMap::new();
    let mut add = |hf: String, gg: &str| -> anyhow::Result<bool> {
        let Some(t) = g.tensor(gg) else {
            return Ok(true);
        };
        if t.dims.len() != 2 {
            return Ok(true);
        }
        let Some(kind) = WKind::from_ggml(t.ty) else {
            return Ok(false);
        };
        let (k, rows) = (t.dims[0] as usize, t.dims[1] as usize);
        if kind.row_bytes(k).and_then(|b| b.checked_mul(rows)) != Some(t.n_bytes as usize) {
            anyhow::bail!(
                "'{path}': tensor '{gg}' ({}, {rows} x {k}) has {} bytes, which do not fit its type; the file is corrupt",
                t.ty,
                t.n_bytes
            );
        }
        tensors.insert(
            hf,
            GgmlWeight {
                kind,
                rows,
                k,
                offset: g.data_offset + t.offset,
                bytes: t.n_bytes,
            },
        );
        Ok(true)
    };
    for (hf, gg) in crate::weights::llm_config::hf_to_gguf(config) {
        let layers: Vec<Option<usize>> = if hf.contains("{i}") {
            (0..config.n_layers).map(Some).collect()
        } else {
            vec![None]
        };
        for i in layers {
            let sub = |s: &str| i.map_or(s.to_string(), |i| s.replace("{i}", &i.to_string()));
            if !add(sub(hf), &sub(gg))? {
                return Ok(None);
            }
        }
    }
    // Fused matrices (Phi-3's attn_qkv, its [gate | up] ffn_up) as row ranges: rows are independent in every block
    // format, so each part is a view of the file.
    for i in 0..config.n_layers {
        for (fused, parts) in crate::weights::gguf_model::fused_parts(config) {
            let gg = format!("blk.{i}.{fused}");
            let Some(t) = g.tensor(&gg) else { continue };
            let rows: usize = parts.iter().map(|(_, r)| r).sum();
            if t.dims.len() != 2 || t.dims[1] as usize != rows {
                continue;
            }
            let k = t.dims[0] as usize;
            let Some(kind) = WKind::from_ggml(t.ty) else {
                return Ok(None);
            };
            let row_bytes = kind.row_bytes(k).unwrap_or(0) as u64;
            if row_bytes * rows as u64 != t.n_bytes {
                anyhow::bail!(
                    "'{path}': tensor '{gg}' ({}, {rows} x {k}) has {} bytes, which do not fit its type; the file is \
                     corrupt",
                    t.ty,
                    t.n_bytes
                );
            }
            let mut at = 0u64;
            for (hf, r) in parts {
                tensors.insert(
                    format!("model.layers.{i}.{hf}"),
                    GgmlWeight {
                        kind,
                        rows: r,
                        k,
                        offset: g.data_offset + t.offset + at,
                        bytes: row_bytes * r as u64,
                    },
                );
                at += row_bytes * r as u64;
            }
        }
    }
    if config.tied_embeddings
        && let Some(e) = tensors.get("model.embed_tokens.weight").cloned()
    {
        tensors.insert("lm_head.weight".into(), e);
    }
    Ok(Some(GgmlWeights {
        location: location.to_string(),
        tensors,
    }))
}
