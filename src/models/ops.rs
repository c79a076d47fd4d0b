//! Graph-emitting helpers shared by the image models (Flux transformer, VAE, TAESD): a builder that knows the
//! compute dtype, and layers whose weights come zero-copy from a checkpoint (stored in the checkpoint's dtype, with a
//! Cast node that TensorRT and ONNX Runtime fold at build/load time when the compute dtype differs).
use crate::onnx::{Attr, DataType, Dim, GraphBuilder, Value};
use crate::weights::safetensors_file::Tensor;
use anyhow::{Result, bail};
use bytes::Bytes;

pub struct Ops {
    pub g: GraphBuilder,
    /// The float type activations flow in.
    pub dtype: DataType,
}

/// Little-endian bytes of `v` in a float type (f32, f16, bf16).
pub fn float_bytes(v: &[f32], dtype: DataType) -> Result<Bytes> {
    Ok(Bytes::from(match dtype {
        DataType::FLOAT => v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        DataType::FLOAT16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DataType::BFLOAT16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        other => bail!("cannot write constants of type {other}"),
    }))
}

pub fn fixed(d: &[usize]) -> Vec<Dim> {
    d.iter().map(|&v| Dim::Fixed(v as i64)).collect()
}

impl Ops {
    pub fn new(name: &str, opset: i64, dtype: DataType) -> Self {
        Ops {
            g: GraphBuilder::new(name, opset),
            dtype,
        }
    }

    /// A node with one output of the compute dtype and the given shape.
    pub fn op(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
        shape: Vec<Dim>,
    ) -> Result<Value> {
        let dtype = self.dtype;
        self.g.op(op, name, inputs, attrs, dtype, shape)
    }

    /// A node whose output keeps the input's dtype and shape (elementwise ops).
    pub fn same(
        &mut self,
        op: &str,
        name: &str,
        inputs: &[&Value],
        attrs: Vec<(&str, Attr)>,
    ) -> Result<Value> {
        let (dtype, shape) = (inputs[0].dtype, inputs[0].shape.clone());
        self.g.op(op, name, inputs, attrs, dtype, shape)
    }

    /// A scalar (or small vector) constant of the compute dtype.
    pub fn constant(&mut self, name: &str, dims: &[i64], v: &[f32]) -> Result<Value> {
        let name = self.g.fresh(name);
        let b = float_bytes(v, self.dtype)?;
        self.g.initializer(&name, self.dtype, dims, b)
    }

    pub fn constant_f32(&mut self, name: &str, dims: &[i64], v: &[f32]) -> Result<Value> {
        let name = self.g.fresh(name);
        self.g.const_f32(&name, dims, v)
    }

    pub fn i64s(&mut self, name: &str, v: &[i64]) -> Result<Value> {
        let name = self.g.fresh(name);
        self.g.const_i64(&name, &[v.len() as i64], v)
    }

    pub fn cast(&mut self, name: &str, x: &Value, to: DataType) -> Result<Value> {
        self.g.cast(name, x, to)
    }

    /// A checkpoint tensor as an initializer named `name`, in its own dtype (no copy), cast to `to` if needed.
    pub fn weight(&mut self, name: &str, t: &Tensor, to: DataType) -> Result<Value> {
        let dims: Vec<i64> = t.shape.iter().map(|&d| d as i64).collect();
        let w = self.g.initializer(name, t.dtype, &dims, t.data.clone())?;
        if !matches!(
            t.dtype,
            DataType::FLOAT | DataType::FLOAT16 | DataType::BFLOAT16
        ) {
            bail!(
                "tensor '{}' is {}: expected F32, F16 or BF16 weights",
                t.name,
                t.dtype
            );
        }
        self.cast(&format!("{name}/cast"), &w, to)
    }

    /// `y = x W^T + b` with W [out, in] taken as stored (MatMul against its transpose, folded by the runtimes).
    pub fn linear(
        &mut self,
        name: &str,
        x: &Value,
        w: &Tensor,
        b: Option<&Tensor>,
    ) -> Result<Value> {
        let [n, k] = w.shape[..] else {
            bail!("'{}' is not a 2-D linear weight: {:?}", w.name, w.shape);
        };
        if x.shape.last() != Some(&Dim::Fixed(k as i64)) {
            bail!(
                "{name}: input features {:?} do not match weight '{}' {:?}",
                x.shape.last(),
                w.name,
                w.shape
            );
        }
        let dtype = self.dtype;
        let wv = self.weight(&format!("{name}.weight"), w, dtype)?;
        let wt = self.g.op(
            "Transpose",
            &format!("{name}/weight_t"),
            &[&wv],
            vec![("perm", Attr::Ints(vec![1, 0]))],
            dtype,
            fixed(&[k, n]),
        )?;
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("rank >= 1") = Dim::Fixed(n as i64);
        let y = self.op(
            "MatMul",
            &format!("{name}/MatMul"),
            &[x, &wt],
            vec![],
            shape,
        )?;
        match b {
            None => Ok(y),
            Some(b) => {
                let bv = self.weight(&format!("{name}.bias"), b, dtype)?;
                self.same("Add", &format!("{name}/bias"), &[&y, &bv], vec![])
            }
        }
    }

    pub fn silu(&mut self, name: &str, x: &Value) -> Result<Value> {
        let s = self.same("Sigmoid", &format!("{name}/sigmoid"), &[x], vec![])?;
        self.same("Mul", &format!("{name}/silu"), &[x, &s], vec![])
    }

    /// GELU with the tanh approximation (PyTorch `approximate="tanh"`), from primitive ops (any opset).
    pub fn gelu_tanh(&mut self, name: &str, x: &Value) -> Result<Value> {
        let c = self.constant(&format!("{name}.c"), &[], &[0.044715])?;
        let k = self.constant(
            &format!("{name}.k"),
            &[],
            &[(2.0f64 / std::f64::consts::PI).sqrt() as f32],
        )?;
        let half = self.constant(&format!("{name}.half"), &[], &[0.5])?;
        let one = self.constant(&format!("{name}.one"), &[], &[1.0])?;
        let x2 = self.same("Mul", &format!("{name}/x2"), &[x, x], vec![])?;
        let x3 = self.same("Mul", &format!("{name}/x3"), &[&x2, x], vec![])?;
        let cx3 = self.same("Mul", &format!("{name}/cx3"), &[&x3, &c], vec![])?;
        let inner = self.same("Add", &format!("{name}/inner"), &[x, &cx3], vec![])?;
        let inner = self.same("Mul", &format!("{name}/scaled"), &[&inner, &k], vec![])?;
        let t = self.same("Tanh", &format!("{name}/tanh"), &[&inner], vec![])?;
        let t1 = self.same("Add", &format!("{name}/one_plus"), &[&t, &one], vec![])?;
        let hx = self.same("Mul", &format!("{name}/half_x"), &[x, &half], vec![])?;
        self.same("Mul", &format!("{name}/gelu"), &[&hx, &t1], vec![])
    }

    /// LayerNorm over the last axis of size `dim` with no affine parameters.
    pub fn layer_norm_plain(
        &mut self,
        name: &str,
        x: &Value,
        dim: usize,
        eps: f32,
    ) -> Result<Value> {
        let ones = self.constant(&format!("{name}.ones"), &[dim as i64], &vec![1.0; dim])?;
        self.same(
            "LayerNormalization",
            name,
            &[x, &ones],
            vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
        )
    }

    /// RMSNorm over the last axis, computed in f32 (as diffusers and BFL do), scaled by `w`, back in x's dtype.
    pub fn rms_norm(&mut self, name: &str, x: &Value, w: &Tensor, eps: f32) -> Result<Value> {
        let xf = self.cast(&format!("{name}/to_f32"), x, DataType::FLOAT)?;
        let sq = self.same("Mul", &format!("{name}/sq"), &[&xf, &xf], vec![])?;
        let axes = self.i64s(&format!("{name}.axes"), &[-1])?;
        let ms = self.same(
            "ReduceMean",
            &format!("{name}/mean"),
            &[&sq, &axes],
            vec![("keepdims", Attr::Int(1))],
        )?;
        let e = self.constant_f32(&format!("{name}.eps"), &[], &[eps])?;
        let ms = self.same("Add", &format!("{name}/eps_add"), &[&ms, &e], vec![])?;
        let r = self.same("Sqrt", &format!("{name}/sqrt"), &[&ms], vec![])?;
        let y = self.same("Div", &format!("{name}/div"), &[&xf, &r], vec![])?;
        let mut y = y;
        y.shape = x.shape.clone();
        let wv = self.weight(&format!("{name}.weight"), w, DataType::FLOAT)?;
        let y = self.same("Mul", &format!("{name}/scale"), &[&y, &wv], vec![])?;
        self.cast(&format!("{name}/back"), &y, x.dtype)
    }

    /// 2-D convolution NCHW with weight [out, in, kh, kw] (square kernel), optional bias, stride, symmetric pad.
    pub fn conv2d(
        &mut self,
        name: &str,
        x: &Value,
        w: &Tensor,
        b: Option<&Tensor>,
        stride: usize,
        pads: [usize; 4],
    ) -> Result<Value> {
        if w.shape.len() != 4 {
            bail!("'{}' is not a 4-D conv weight: {:?}", w.name, w.shape);
        }
        let dtype = self.dtype;
        let wv = self.weight(&format!("{name}.weight"), w, dtype)?;
        let mut inputs = vec![x.clone(), wv];
        if let Some(b) = b {
            inputs.push(self.weight(&format!("{name}.bias"), b, dtype)?);
        }
        let refs: Vec<&Value> = inputs.iter().collect();
        let shape = vec![
            x.shape.first().cloned().unwrap_or(Dim::Fixed(1)),
            Dim::Fixed(w.shape[0] as i64),
            Dim::Sym(format!("{name}_h")),
            Dim::Sym(format!("{name}_w")),
        ];
        let k = w.shape[2] as i64;
        self.op(
            "Conv",
            name,
            &refs,
            vec![
                ("kernel_shape", Attr::Ints(vec![k, w.shape[3] as i64])),
                ("strides", Attr::Ints(vec![stride as i64, stride as i64])),
                ("pads", Attr::Ints(pads.iter().map(|&p| p as i64).collect())),
            ],
            shape,
        )
    }

    /// GroupNorm over NCHW with per-channel affine parameters (computed in f32).
    pub fn group_norm(
        &mut self,
        name: &str,
        x: &Value,
        groups: usize,
        w: &Tensor,
        b: &Tensor,
        eps: f32,
    ) -> Result<Value> {
        let c = w.numel();
        if !c.is_multiple_of(groups) {
            bail!(
                "{name}: {c} channels do not split into {groups} groups: wrong norm_num_groups for this \
                 checkpoint (set it in the config, or put the diffusers config.json beside the weights)"
            );
        }
        let xf = self.cast(&format!("{name}/to_f32"), x, DataType::FLOAT)?;
        // Reshape to [N, G, C/G * H * W], normalise the last axis, reshape back, then the affine per channel.
        let s = self.i64s(&format!("{name}.grouped"), &[0, groups as i64, -1])?;
        let xg = self.same("Reshape", &format!("{name}/grouped"), &[&xf, &s], vec![])?;
        let axes = self.i64s(&format!("{name}.axes"), &[-1])?;
        let mean = self.same(
            "ReduceMean",
            &format!("{name}/mean"),
            &[&xg, &axes],
            vec![("keepdims", Attr::Int(1))],
        )?;
        let d = self.same("Sub", &format!("{name}/centered"), &[&xg, &mean], vec![])?;
        let d2 = self.same("Mul", &format!("{name}/sq"), &[&d, &d], vec![])?;
        let var = self.same(
            "ReduceMean",
            &format!("{name}/var"),
            &[&d2, &axes],
            vec![("keepdims", Attr::Int(1))],
        )?;
        let e = self.constant_f32(&format!("{name}.eps"), &[], &[eps])?;
        let var = self.same("Add", &format!("{name}/var_eps"), &[&var, &e], vec![])?;
        let sd = self.same("Sqrt", &format!("{name}/std"), &[&var], vec![])?;
        let n = self.same("Div", &format!("{name}/norm"), &[&d, &sd], vec![])?;
        let shp = self.g.op(
            "Shape",
            &format!("{name}/shape"),
            &[&xf],
            vec![],
            DataType::INT64,
            vec![Dim::Fixed(4)],
        )?;
        let n = self.same("Reshape", &format!("{name}/ungrouped"), &[&n, &shp], vec![])?;
        let wv = self.weight(&format!("{name}.weight"), w, DataType::FLOAT)?;
        let bv = self.weight(&format!("{name}.bias"), b, DataType::FLOAT)?;
        let ax = self.i64s(&format!("{name}.chw"), &[1, 2])?;
        let wv = self.same("Unsqueeze", &format!("{name}/w_chw"), &[&wv, &ax], vec![])?;
        let bv = self.same("Unsqueeze", &format!("{name}/b_chw"), &[&bv, &ax], vec![])?;
        let y = self.same("Mul", &format!("{name}/scale"), &[&n, &wv], vec![])?;
        let mut y = self.same("Add", &format!("{name}/shift"), &[&y, &bv], vec![])?;
        y.shape = x.shape.clone();
        self.cast(&format!("{name}/back"), &y, x.dtype)
    }
}

/// LayerNorm over the last axis with weight and bias from the checkpoint, computed in f32.
pub fn layer_norm(
    o: &mut Ops,
    name: &str,
    x: &Value,
    w: &Tensor,
    b: &Tensor,
    eps: f32,
) -> Result<Value> {
    let xf = o.cast(&format!("{name}/to_f32"), x, DataType::FLOAT)?;
    let wv = o.weight(&format!("{name}.weight"), w, DataType::FLOAT)?;
    let bv = o.weight(&format!("{name}.bias"), b, DataType::FLOAT)?;
    let y = o.same(
        "LayerNormalization",
        name,
        &[&xf, &wv, &bv],
        vec![("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
    )?;
    o.cast(&format!("{name}/back"), &y, x.dtype)
}

/// Multi-head attention core on projected q/k/v [batch, seq, heads*hd]: per-head scores times `scale`, plus
/// `bias` (broadcast to [batch, heads, seq, seq]) when given, softmax in f32, weighted sum, heads merged back.
pub fn attention(
    o: &mut Ops,
    name: &str,
    (q, k, v): (&Value, &Value, &Value),
    heads: usize,
    scale: Option<f32>,
    bias: Option<&Value>,
) -> Result<Value> {
    let Some(Dim::Fixed(d)) = q.shape.last().cloned() else {
        bail!("{name}: attention input needs a fixed last dimension");
    };
    let hd = d / heads as i64;
    let split = o.i64s(&format!("{name}.split"), &[0, 0, heads as i64, hd])?;
    let perm = |p: Vec<i64>| vec![("perm", Attr::Ints(p))];
    let mut hv = Vec::new();
    for (t, x) in [("q", q), ("k", k), ("v", v)] {
        let r = o.same(
            "Reshape",
            &format!("{name}/{t}_heads"),
            &[x, &split],
            vec![],
        )?;
        let p = if t == "k" {
            vec![0, 2, 3, 1]
        } else {
            vec![0, 2, 1, 3]
        };
        hv.push(o.same("Transpose", &format!("{name}/{t}_t"), &[&r], perm(p))?);
    }
    let mut s = o.same("MatMul", &format!("{name}/qk"), &[&hv[0], &hv[1]], vec![])?;
    if let Some(scale) = scale {
        let c = o.constant(&format!("{name}.scale"), &[], &[scale])?;
        s = o.same("Mul", &format!("{name}/scaled"), &[&s, &c], vec![])?;
    }
    let mut s = o.cast(&format!("{name}/scores_f32"), &s, DataType::FLOAT)?;
    if let Some(b) = bias {
        s = o.same("Add", &format!("{name}/biased"), &[&s, b], vec![])?;
    }
    let p = o.same(
        "Softmax",
        &format!("{name}/softmax"),
        &[&s],
        vec![("axis", Attr::Int(-1))],
    )?;
    let p = o.cast(&format!("{name}/probs"), &p, q.dtype)?;
    let ctx = o.same("MatMul", &format!("{name}/pv"), &[&p, &hv[2]], vec![])?;
    let ctx = o.same(
        "Transpose",
        &format!("{name}/ctx_t"),
        &[&ctx],
        perm(vec![0, 2, 1, 3]),
    )?;
    let merge = o.i64s(&format!("{name}.merge"), &[0, 0, d])?;
    let mut out = o.same("Reshape", &format!("{name}/ctx"), &[&ctx, &merge], vec![])?;
    out.shape = q.shape.clone();
    Ok(out)
}

/// The text encoders' MLP activations by their transformers name: quick_gelu `x * sigmoid(1.702 x)`, exact gelu (erf).
pub fn activation(o: &mut Ops, name: &str, x: &Value, act: &str) -> Result<Value> {
    match act {
        "quick_gelu" => {
            let c = o.constant(&format!("{name}.k"), &[], &[1.702])?;
            let t = o.same("Mul", &format!("{name}/scaled"), &[x, &c], vec![])?;
            let sg = o.same("Sigmoid", &format!("{name}/sigmoid"), &[&t], vec![])?;
            o.same("Mul", &format!("{name}/quick_gelu"), &[x, &sg], vec![])
        }
        "gelu" => {
            let c = o.constant(
                &format!("{name}.rsqrt2"),
                &[],
                &[std::f32::consts::FRAC_1_SQRT_2],
            )?;
            let half = o.constant(&format!("{name}.half"), &[], &[0.5])?;
            let one = o.constant(&format!("{name}.one"), &[], &[1.0])?;
            let t = o.same("Mul", &format!("{name}/scaled"), &[x, &c], vec![])?;
            let e = o.same("Erf", &format!("{name}/erf"), &[&t], vec![])?;
            let e = o.same("Add", &format!("{name}/one_plus"), &[&e, &one], vec![])?;
            let hx = o.same("Mul", &format!("{name}/half_x"), &[x, &half], vec![])?;
            o.same("Mul", &format!("{name}/gelu"), &[&hx, &e], vec![])
        }
        "gelu_new" | "gelu_pytorch_tanh" => o.gelu_tanh(name, x),
        other => bail!("activation '{other}' is not supported (quick_gelu, gelu, gelu_new)"),
    }
}

/// Multi-axis RoPE frequency matrix [axes, hd/2] (Flux, Z-Image): column j of axis a holds theta^(-2j'/d_a) in
/// row a and zero elsewhere, so that `ids @ F` gives every angle in one exact product (sums of zeros add nothing).
pub fn rope_freq_matrix(axes_dim: &[usize], theta: f32) -> Vec<f32> {
    let half: usize = axes_dim.iter().sum::<usize>() / 2;
    let mut f = vec![0f32; axes_dim.len() * half];
    let mut col = 0;
    for (a, &d) in axes_dim.iter().enumerate() {
        for j in 0..d / 2 {
            f[a * half + col] = (1.0 / (theta as f64).powf((2 * j) as f64 / d as f64)) as f32;
            col += 1;
        }
    }
    f
}

/// RoPE cos/sin [seq, hd/2, 1] (f32) of position ids [seq, axes] (f32) for the given axis sizes.
pub fn rope_tables(
    o: &mut Ops,
    name: &str,
    ids: &Value,
    axes_dim: &[usize],
    theta: f32,
) -> Result<(Value, Value)> {
    let f32t = DataType::FLOAT;
    let half = axes_dim.iter().sum::<usize>() / 2;
    let seq = ids.shape.first().cloned().unwrap_or(Dim::Sym("seq".into()));
    let fm = o.constant_f32(
        &format!("{name}.freqs"),
        &[axes_dim.len() as i64, half as i64],
        &rope_freq_matrix(axes_dim, theta),
    )?;
    let shape = vec![seq.clone(), Dim::Fixed(half as i64)];
    let ang = o.g.op(
        "MatMul",
        &format!("{name}/angles"),
        &[ids, &fm],
        vec![],
        f32t,
        shape.clone(),
    )?;
    let ax = o.i64s(&format!("{name}.last"), &[-1])?;
    let pair = vec![seq, Dim::Fixed(half as i64), Dim::Fixed(1)];
    let mut out = Vec::new();
    for f in ["cos", "sin"] {
        let c = o.g.op(
            if f == "cos" { "Cos" } else { "Sin" },
            &format!("{name}/{f}"),
            &[&ang],
            vec![],
            f32t,
            shape.clone(),
        )?;
        out.push(o.g.op(
            "Unsqueeze",
            &format!("{name}/{f}_pair"),
            &[&c, &ax],
            vec![],
            f32t,
            pair.clone(),
        )?);
    }
    let sin = out.pop().expect("two tables");
    let cos = out.pop().expect("two tables");
    Ok((cos, sin))
}

/// Interleaved-pair rotation (complex multiplication of adjacent pairs) of [B, H, S, hd] by cos/sin from
/// [`rope_tables`], in f32; the result in x's dtype.
pub fn rope_pairs(
    o: &mut Ops,
    name: &str,
    x: &Value,
    hd: i64,
    pe: &(Value, Value),
) -> Result<Value> {
    let xf = o.cast(&format!("{name}/f32"), x, DataType::FLOAT)?;
    let s = o.i64s(&format!("{name}.pairs"), &[0, 0, 0, hd / 2, 2])?;
    let xp = o.same("Reshape", &format!("{name}/pairs"), &[&xf, &s], vec![])?;
    let parts = {
        let mut sh = x.shape.clone();
        if sh.len() == 4 {
            sh[3] = Dim::Fixed(hd / 2);
        }
        sh.push(Dim::Fixed(1));
        let sz = o.i64s(&format!("{name}.split"), &[1, 1])?;
        o.g.node(
            "Split",
            &format!("{name}/split"),
            &[&xp, &sz],
            vec![("axis", Attr::Int(-1))],
            vec![(DataType::FLOAT, sh.clone()), (DataType::FLOAT, sh)],
        )?
    };
    let (x0, x1) = (&parts[0], &parts[1]);
    let (c, sn) = (&pe.0, &pe.1);
    let a = o.same("Mul", &format!("{name}/x0c"), &[x0, c], vec![])?;
    let b = o.same("Mul", &format!("{name}/x1s"), &[x1, sn], vec![])?;
    let r0 = o.same("Sub", &format!("{name}/r0"), &[&a, &b], vec![])?;
    let a = o.same("Mul", &format!("{name}/x1c"), &[x1, c], vec![])?;
    let b = o.same("Mul", &format!("{name}/x0s"), &[x0, sn], vec![])?;
    let r1 = o.same("Add", &format!("{name}/r1"), &[&a, &b], vec![])?;
    let cat = o.same(
        "Concat",
        &format!("{name}/cat"),
        &[&r0, &r1],
        vec![("axis", Attr::Int(-1))],
    )?;
    let s = o.i64s(&format!("{name}.unpairs"), &[0, 0, 0, hd])?;
    let mut y = o.same("Reshape", &format!("{name}/unpairs"), &[&cat, &s], vec![])?;
    y.shape = x.shape.clone();
    let dt = x.dtype;
    o.cast(&format!("{name}/back"), &y, dt)
}

/// Sinusoidal timestep embedding of `t * scale` [batch] -> [batch, 256] (cos first, max period 10000; diffusers'
/// `get_timestep_embedding(flip_sin_to_cos=True)` and Z-Image's `TimestepEmbedder`), in f32 then the compute dtype.
pub fn timestep_embedding(o: &mut Ops, name: &str, t: &Value, scale: f32) -> Result<Value> {
    let half = 128usize;
    let freqs: Vec<f32> = (0..half)
        .map(|j| ((-(10000f32.ln())) * j as f32 / half as f32).exp())
        .collect();
    let k = o.constant_f32(&format!("{name}.scale"), &[], &[scale])?;
    let t = o.same("Mul", &format!("{name}/scaled"), &[t, &k], vec![])?;
    let ax = o.i64s(&format!("{name}.ax"), &[1])?;
    let t = o.same("Unsqueeze", &format!("{name}/col"), &[&t, &ax], vec![])?;
    let f = o.constant_f32(&format!("{name}.freqs"), &[1, half as i64], &freqs)?;
    let a = o.same("Mul", &format!("{name}/args"), &[&t, &f], vec![])?;
    let c = o.same("Cos", &format!("{name}/cos"), &[&a], vec![])?;
    let s = o.same("Sin", &format!("{name}/sin"), &[&a], vec![])?;
    let mut e = o.same(
        "Concat",
        &format!("{name}/emb"),
        &[&c, &s],
        vec![("axis", Attr::Int(-1))],
    )?;
    e.shape = vec![
        t.shape.first().cloned().unwrap_or(Dim::Sym("batch".into())),
        Dim::Fixed(256),
    ];
    let dt = o.dtype;
    o.cast(&format!("{name}/cast"), &e, dt)
}
