//! The transformer graph: embedders, double- and single-stream blocks, final layer, with weights from the
//! checkpoint in either layout (see the module documentation of `flux`).
use super::config::{FluxConfig, Layout, Names};
use super::{ControlNetGraph, ExportOptions, amax_key, default_policy};
use crate::models::ops::Ops;
use crate::models::qdq::{Linears, Weight, attention};
use crate::onnx::{Attr, DataType, Dim, Value, proto::ModelProto};
use crate::quant::LinearPrecision;
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Result, bail};
use std::path::Path;

struct Emitter<'a> {
    o: Ops,
    cfg: &'a FluxConfig,
    ck: &'a Checkpoint,
    n: Names,
    linears: Linears<'a>,
}

const EPS: f32 = 1e-6;

/// How many transformer blocks a streaming export reads ahead of the one it emits. Two keep the disk busy while a
/// block is quantized and written; the pages behind leave the cache (`Checkpoint`'s eviction), so memory does not
/// grow with the distance.
const PREFETCH_BLOCKS: usize = 2;

impl Emitter<'_> {
    fn t(&self, name: &str) -> Result<Tensor> {
        self.ck.get(&self.n.p(name))
    }

    /// A linear layer stored under checkpoint base name `base`, decided and calibrated as diffusers layer `canon`.
    fn linear(&mut self, x: &Value, base: &str, canon: &str) -> Result<Value> {
        let weight = self.t(&format!("{base}.weight"))?;
        let bname = format!("{base}.bias");
        let bias = if self.ck.contains(&self.n.p(&bname)) {
            Some(self.t(&bname)?)
        } else {
            None
        };
        let name = self.n.p(base);
        self.linears.linear(
            &mut self.o,
            &name,
            canon,
            &amax_key(canon),
            x,
            Weight::Tensor {
                weight: &weight,
                bias: bias.as_ref(),
            },
        )
    }

    /// `in_layer -> SiLU -> out_layer` (BFL MLPEmbedder / diffusers TimestepEmbedding, text projection).
    fn mlp_embedder(&mut self, x: &Value, bfl: &str, diff: &str) -> Result<Value> {
        let (a, b) = match self.n.layout {
            Layout::Bfl => (format!("{bfl}.in_layer"), format!("{bfl}.out_layer")),
            Layout::Diffusers => (format!("{diff}.linear_1"), format!("{diff}.linear_2")),
        };
        let h = self.linear(x, &a, &format!("{diff}.linear_1"))?;
        let h = self.o.silu(&format!("{a}/act"), &h)?;
        self.linear(&h, &b, &format!("{diff}.linear_2"))
    }

    /// Sinusoidal embedding of `t * 1000` (256 channels, cos first), in f32 then cast to the compute dtype.
    fn time_embedding(&mut self, name: &str, t: &Value) -> Result<Value> {
        crate::models::ops::timestep_embedding(&mut self.o, name, t, 1000.0)
    }

    /// Splits `x` along `axis` into pieces of the given sizes.
    fn split(&mut self, name: &str, x: &Value, sizes: &[usize], axis: i64) -> Result<Vec<Value>> {
        let s = self.o.i64s(
            &format!("{name}.sizes"),
            &sizes.iter().map(|&v| v as i64).collect::<Vec<_>>(),
        )?;
        let outs = sizes
            .iter()
            .map(|&sz| {
                let mut sh = x.shape.clone();
                let ax = if axis < 0 {
                    sh.len() as i64 + axis
                } else {
                    axis
                } as usize;
                sh[ax] = Dim::Fixed(sz as i64);
                (x.dtype, sh)
            })
            .collect();
        self.o.g.node(
            "Split",
            name,
            &[x, &s],
            vec![("axis", Attr::Int(axis))],
            outs,
        )
    }

    /// Modulation vectors: `lin(silu(vec))` split into `parts` chunks of [batch, 1, D].
    fn modulation(
        &mut self,
        vec_silu: &Value,
        base: &str,
        canon: &str,
        parts: usize,
    ) -> Result<Vec<Value>> {
        let d = self.cfg.hidden_size;
        let m = self.linear(vec_silu, base, canon)?;
        let ax = self.o.i64s(&format!("{base}.ax"), &[1])?;
        let m = self
            .o
            .same("Unsqueeze", &format!("{base}/seq_axis"), &[&m, &ax], vec![])?;
        let mut m = m;
        m.shape = vec![batch(), Dim::Fixed(1), Dim::Fixed((parts * d) as i64)];
        self.split(&format!("{base}/chunks"), &m, &vec![d; parts], -1)
    }

    /// `LayerNorm(x) * (1 + scale) + shift`.
    fn modulate(&mut self, name: &str, x: &Value, shift: &Value, scale: &Value) -> Result<Value> {
        let d = self.cfg.hidden_size;
        let n = self.o.layer_norm_plain(&format!("{name}/ln"), x, d, EPS)?;
        let one = self.o.constant(&format!("{name}.one"), &[], &[1.0])?;
        let s1 = self.o.same(
            "Add",
            &format!("{name}/one_plus_scale"),
            &[scale, &one],
            vec![],
        )?;
        let y = self
            .o
            .same("Mul", &format!("{name}/scaled"), &[&n, &s1], vec![])?;
        let mut y = self
            .o
            .same("Add", &format!("{name}/shifted"), &[&y, shift], vec![])?;
        y.shape = x.shape.clone();
        Ok(y)
    }

    /// `x + gate * y`.
    fn gated(&mut self, name: &str, x: &Value, gate: &Value, y: &Value) -> Result<Value> {
        let gy = self
            .o
            .same("Mul", &format!("{name}/gate"), &[y, gate], vec![])?;
        let mut r = self
            .o
            .same("Add", &format!("{name}/residual"), &[x, &gy], vec![])?;
        r.shape = x.shape.clone();
        if self.o.dtype == DataType::FLOAT16 {
            // As diffusers does for fp16: keep the residual stream finite.
            let lo = self.o.constant(&format!("{name}.lo"), &[], &[-65504.0])?;
            let hi = self.o.constant(&format!("{name}.hi"), &[], &[65504.0])?;
            r = self
                .o
                .same("Clip", &format!("{name}/clip"), &[&r, &lo, &hi], vec![])?;
        }
        Ok(r)
    }

    /// [B, S, D] -> [B, H, S, hd].
    fn heads(&mut self, name: &str, x: &Value, seq: Dim) -> Result<Value> {
        let (h, hd) = (self.cfg.num_heads as i64, self.cfg.head_dim() as i64);
        let s = self.o.i64s(&format!("{name}.shape"), &[0, 0, h, hd])?;
        let r = self
            .o
            .same("Reshape", &format!("{name}/heads"), &[x, &s], vec![])?;
        let mut t = self.o.same(
            "Transpose",
            &format!("{name}/bhsd"),
            &[&r],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?;
        t.shape = vec![batch(), Dim::Fixed(h), seq, Dim::Fixed(hd)];
        Ok(t)
    }

    /// Interleaved-pair rotation of [B, H, S, hd] by cos/sin [S, hd/2] (f32), result in x's dtype.
    fn rope(&mut self, name: &str, x: &Value, pe: &(Value, Value)) -> Result<Value> {
        let hd = self.cfg.head_dim() as i64;
        crate::models::ops::rope_pairs(&mut self.o, name, x, hd, pe)
    }

    /// q, k normalised (RMSNorm per head) and rotated; v as is. All [B, H, S, hd].
    fn qk_norm_rope(
        &mut self,
        name: &str,
        qkv: [Value; 3],
        norms: (&str, &str),
        seq: Dim,
        pe: Option<&(Value, Value)>,
    ) -> Result<[Value; 3]> {
        let [q, k, v] = qkv;
        let q = self.heads(&format!("{name}.q"), &q, seq.clone())?;
        let k = self.heads(&format!("{name}.k"), &k, seq.clone())?;
        let v = self.heads(&format!("{name}.v"), &v, seq)?;
        let qn = self.t(norms.0)?;
        let kn = self.t(norms.1)?;
        let q = self.o.rms_norm(
            &self.n.p(norms
                .0
                .trim_end_matches(".weight")
                .trim_end_matches(".scale")),
            &q,
            &qn,
            EPS,
        )?;
        let k = self.o.rms_norm(
            &self.n.p(norms
                .1
                .trim_end_matches(".weight")
                .trim_end_matches(".scale")),
            &k,
            &kn,
            EPS,
        )?;
        let (q, k) = match pe {
            Some(pe) => (
                self.rope(&format!("{name}/rope_q"), &q, pe)?,
                self.rope(&format!("{name}/rope_k"), &k, pe)?,
            ),
            None => (q, k),
        };
        Ok([q, k, v])
    }

    /// Attention output [B, H, S, hd] back to [B, S, D].
    fn merge_heads(&mut self, name: &str, x: &Value, seq: Dim) -> Result<Value> {
        let t = self.o.same(
            "Transpose",
            &format!("{name}/bshd"),
            &[x],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?;
        let s = self.o.i64s(
            &format!("{name}.merged"),
            &[0, 0, self.cfg.hidden_size as i64],
        )?;
        let mut y = self
            .o
            .same("Reshape", &format!("{name}/merged"), &[&t, &s], vec![])?;
        y.shape = vec![batch(), seq, Dim::Fixed(self.cfg.hidden_size as i64)];
        Ok(y)
    }

    /// Projections q, k, v of one stream: a fused BFL `qkv` or three diffusers linears.
    fn qkv(&mut self, x: &Value, bfl: &str, diff: [&str; 3]) -> Result<[Value; 3]> {
        let d = self.cfg.hidden_size;
        match self.n.layout {
            Layout::Bfl => {
                let y = self.linear(x, bfl, diff[0])?;
                let mut p = self.split(&format!("{bfl}/split"), &y, &[d, d, d], -1)?;
                let v = p.pop().expect("3");
                let k = p.pop().expect("3");
                let q = p.pop().expect("3");
                Ok([q, k, v])
            }
            Layout::Diffusers => Ok([
                self.linear(x, diff[0], diff[0])?,
                self.linear(x, diff[1], diff[1])?,
                self.linear(x, diff[2], diff[2])?,
            ]),
        }
    }

    fn mlp(&mut self, x: &Value, bfl: &str, diff: &str) -> Result<Value> {
        let (a, b) = match self.n.layout {
            Layout::Bfl => (format!("{bfl}.0"), format!("{bfl}.2")),
            Layout::Diffusers => (format!("{diff}.net.0.proj"), format!("{diff}.net.2")),
        };
        let h = self.linear(x, &a, &format!("{diff}.net.0.proj"))?;
        let h = self.o.gelu_tanh(&format!("{a}/gelu"), &h)?;
        self.linear(&h, &b, &format!("{diff}.net.2"))
    }

    #[allow(clippy::too_many_arguments)]
    fn double_block(
        &mut self,
        i: usize,
        img: &Value,
        txt: &Value,
        vec_silu: &Value,
        pe: &(Value, Value),
        txt_len: &Value,
    ) -> Result<(Value, Value)> {
        let bfl = format!("double_blocks.{i}");
        let df = format!("transformer_blocks.{i}");
        let bl = self.n.layout == Layout::Bfl;
        let pick = |b: &str, d: &str| {
            if bl {
                format!("{bfl}.{b}")
            } else {
                format!("{df}.{d}")
            }
        };
        let im = self.modulation(
            vec_silu,
            &pick("img_mod.lin", "norm1.linear"),
            &format!("{df}.norm1.linear"),
            6,
        )?;
        let tm = self.modulation(
            vec_silu,
            &pick("txt_mod.lin", "norm1_context.linear"),
            &format!("{df}.norm1_context.linear"),
            6,
        )?;
        let img_n = self.modulate(&format!("{bfl}/img_norm1"), img, &im[0], &im[1])?;
        let txt_n = self.modulate(&format!("{bfl}/txt_norm1"), txt, &tm[0], &tm[1])?;
        let iq = self.qkv(
            &img_n,
            &format!("{bfl}.img_attn.qkv"),
            [
                &format!("{df}.attn.to_q"),
                &format!("{df}.attn.to_k"),
                &format!("{df}.attn.to_v"),
            ],
        )?;
        let tq = self.qkv(
            &txt_n,
            &format!("{bfl}.txt_attn.qkv"),
            [
                &format!("{df}.attn.add_q_proj"),
                &format!("{df}.attn.add_k_proj"),
                &format!("{df}.attn.add_v_proj"),
            ],
        )?;
        let (inq, ink, tnq, tnk) = if bl {
            (
                format!("{bfl}.img_attn.norm.query_norm.scale"),
                format!("{bfl}.img_attn.norm.key_norm.scale"),
                format!("{bfl}.txt_attn.norm.query_norm.scale"),
                format!("{bfl}.txt_attn.norm.key_norm.scale"),
            )
        } else {
            (
                format!("{df}.attn.norm_q.weight"),
                format!("{df}.attn.norm_k.weight"),
                format!("{df}.attn.norm_added_q.weight"),
                format!("{df}.attn.norm_added_k.weight"),
            )
        };
        // Norms per stream, then RoPE on the joint (txt, img) sequence.
        let [iq, ik, iv] =
            self.qk_norm_rope(&format!("{bfl}.img"), iq, (&inq, &ink), img_seq(), None)?;
        let [tq, tk, tv] =
            self.qk_norm_rope(&format!("{bfl}.txt"), tq, (&tnq, &tnk), txt_seq(), None)?;
        let cat = |s: &mut Self, n: &str, a: &Value, b: &Value| -> Result<Value> {
            let mut v = s.o.same(
                "Concat",
                &format!("{bfl}/{n}"),
                &[a, b],
                vec![("axis", Attr::Int(2))],
            )?;
            v.shape[2] = seq();
            Ok(v)
        };
        let q = cat(self, "q_joint", &tq, &iq)?;
        let k = cat(self, "k_joint", &tk, &ik)?;
        let v = cat(self, "v_joint", &tv, &iv)?;
        let q = self.rope(&format!("{bfl}/rope_q"), &q, pe)?;
        let k = self.rope(&format!("{bfl}/rope_k"), &k, pe)?;
        let a = attention(&mut self.o.g, &format!("{bfl}.attn"), &q, &k, &v, None)?;
        let a = self.merge_heads(&format!("{bfl}.attn"), &a, seq())?;
        let (ta, ia) = self.split_seq(&format!("{bfl}/attn_split"), &a, txt_len)?;
        let ip = self.linear(
            &ia,
            &pick("img_attn.proj", "attn.to_out.0"),
            &format!("{df}.attn.to_out.0"),
        )?;
        let tp = self.linear(
            &ta,
            &pick("txt_attn.proj", "attn.to_add_out"),
            &format!("{df}.attn.to_add_out"),
        )?;
        let img = self.gated(&format!("{bfl}/img_attn"), img, &im[2], &ip)?;
        let txt = self.gated(&format!("{bfl}/txt_attn"), txt, &tm[2], &tp)?;
        let img_n = self.modulate(&format!("{bfl}/img_norm2"), &img, &im[3], &im[4])?;
        let txt_n = self.modulate(&format!("{bfl}/txt_norm2"), &txt, &tm[3], &tm[4])?;
        let imlp = self.mlp(&img_n, &format!("{bfl}.img_mlp"), &format!("{df}.ff"))?;
        let tmlp = self.mlp(
            &txt_n,
            &format!("{bfl}.txt_mlp"),
            &format!("{df}.ff_context"),
        )?;
        let img = self.gated(&format!("{bfl}/img_mlp"), &img, &im[5], &imlp)?;
        let txt = self.gated(&format!("{bfl}/txt_mlp"), &txt, &tm[5], &tmlp)?;
        Ok((img, txt))
    }

    /// `x + samples[index]` (samples stacked [n, B, img, D]).
    fn residual(&mut self, name: &str, x: &Value, samples: &Value, index: usize) -> Result<Value> {
        let i = self.o.i64s(&format!("{name}.index"), &[index as i64])?;
        let mut r = self.o.same(
            "Gather",
            &format!("{name}/gather"),
            &[samples, &i],
            vec![("axis", Attr::Int(0))],
        )?;
        r.shape = std::iter::once(Dim::Fixed(1))
            .chain(x.shape.iter().cloned())
            .collect();
        let ax = self.o.i64s(&format!("{name}.ax"), &[0])?;
        let mut r = self
            .o
            .same("Squeeze", &format!("{name}/squeeze"), &[&r, &ax], vec![])?;
        r.shape = x.shape.clone();
        let mut y = self
            .o
            .same("Add", &format!("{name}/add"), &[x, &r], vec![])?;
        y.shape = x.shape.clone();
        Ok(y)
    }

    /// [B, S, D] -> ([B, txt, D], [B, img, D]) at the text length.
    fn split_seq(&mut self, name: &str, x: &Value, txt_len: &Value) -> Result<(Value, Value)> {
        let zero = self.o.i64s(&format!("{name}.zero"), &[0])?;
        let big = self.o.i64s(&format!("{name}.end"), &[i64::MAX])?;
        let ax = self.o.i64s(&format!("{name}.axis"), &[1])?;
        let mut t = self.o.same(
            "Slice",
            &format!("{name}/txt"),
            &[x, &zero, txt_len, &ax],
            vec![],
        )?;
        let mut i = self.o.same(
            "Slice",
            &format!("{name}/img"),
            &[x, txt_len, &big, &ax],
            vec![],
        )?;
        t.shape[1] = txt_seq();
        i.shape[1] = img_seq();
        Ok((t, i))
    }

    fn single_block(
        &mut self,
        i: usize,
        x: &Value,
        vec_silu: &Value,
        pe: &(Value, Value),
    ) -> Result<Value> {
        let bfl = format!("single_blocks.{i}");
        let df = format!("single_transformer_blocks.{i}");
        let (d, m) = (self.cfg.hidden_size, self.cfg.mlp_hidden);
        let bl = self.n.layout == Layout::Bfl;
        let pick = |b: &str, dd: &str| {
            if bl {
                format!("{bfl}.{b}")
            } else {
                format!("{df}.{dd}")
            }
        };
        let md = self.modulation(
            vec_silu,
            &pick("modulation.lin", "norm.linear"),
            &format!("{df}.norm.linear"),
            3,
        )?;
        let xn = self.modulate(&format!("{bfl}/norm"), x, &md[0], &md[1])?;
        let (qkv, mlp) = if bl {
            let y = self.linear(&xn, &format!("{bfl}.linear1"), &format!("{df}.attn.to_q"))?;
            let mut p = self.split(&format!("{bfl}/split"), &y, &[d, d, d, m], -1)?;
            let mlp = p.pop().expect("4");
            let v = p.pop().expect("4");
            let k = p.pop().expect("4");
            let q = p.pop().expect("4");
            ([q, k, v], mlp)
        } else {
            let q = self.linear(&xn, &format!("{df}.attn.to_q"), &format!("{df}.attn.to_q"))?;
            let k = self.linear(&xn, &format!("{df}.attn.to_k"), &format!("{df}.attn.to_k"))?;
            let v = self.linear(&xn, &format!("{df}.attn.to_v"), &format!("{df}.attn.to_v"))?;
            let mlp = self.linear(&xn, &format!("{df}.proj_mlp"), &format!("{df}.proj_mlp"))?;
            ([q, k, v], mlp)
        };
        let norms = if bl {
            (
                format!("{bfl}.norm.query_norm.scale"),
                format!("{bfl}.norm.key_norm.scale"),
            )
        } else {
            (
                format!("{df}.attn.norm_q.weight"),
                format!("{df}.attn.norm_k.weight"),
            )
        };
        let [q, k, v] = self.qk_norm_rope(&bfl, qkv, (&norms.0, &norms.1), seq(), Some(pe))?;
        let a = attention(&mut self.o.g, &format!("{bfl}.attn"), &q, &k, &v, None)?;
        let a = self.merge_heads(&format!("{bfl}.attn"), &a, seq())?;
        let mlp = self.o.gelu_tanh(&format!("{bfl}/mlp_act"), &mlp)?;
        let mut cat = self.o.same(
            "Concat",
            &format!("{bfl}/attn_mlp"),
            &[&a, &mlp],
            vec![("axis", Attr::Int(-1))],
        )?;
        cat.shape = vec![batch(), seq(), Dim::Fixed((d + m) as i64)];
        let out = self.linear(
            &cat,
            &pick("linear2", "proj_out"),
            &format!("{df}.proj_out"),
        )?;
        self.gated(&format!("{bfl}/out"), x, &md[2], &out)
    }
}

fn batch() -> Dim {
    Dim::Sym("batch".into())
}
fn img_seq() -> Dim {
    Dim::Sym("img_seq".into())
}
fn txt_seq() -> Dim {
    Dim::Sym("txt_seq".into())
}
fn seq() -> Dim {
    Dim::Sym("seq".into())
}

/// Builds the transformer graph. With `stream_to` (the .onnx path), weights go to its external data file as they
/// are emitted and the checkpoint's pages are released once written (see `Checkpoint::get`); commit the returned sink before saving.
pub(super) fn emit(
    ck: &Checkpoint,
    cfg: &FluxConfig,
    layout: Layout,
    prefix: &str,
    opts: &ExportOptions,
    stream_to: Option<&Path>,
) -> Result<(
    ModelProto,
    Option<crate::onnx::builder::ExternalSink>,
    super::LinearsReport,
)> {
    cfg.check()?;
    let target = opts.precision.target();
    let policy = match (&opts.policy, target) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(t)) => Some(default_policy(t)),
        (None, None) => None,
    };
    let opset = target.map_or(18, |t| t.min_opset()).max(18);
    let compute = match target {
        Some(_) => opts.quantized_compute,
        None => opts.precision.compute(),
    };
    if !matches!(
        compute,
        DataType::FLOAT | DataType::FLOAT16 | DataType::BFLOAT16
    ) {
        bail!("quantized_compute must be FLOAT, FLOAT16 or BFLOAT16, not {compute}");
    }
    let mut o = Ops::new("flux_transformer", opset, compute);
    if target == Some(LinearPrecision::Nvfp4) {
        o.g.use_domain("trt", 1);
    }
    if let Some(p) = stream_to {
        o.g.stream_external_data(p, 1024)?;
    }
    let mut e = Emitter {
        o,
        cfg,
        ck,
        n: Names {
            layout,
            prefix: prefix.to_string(),
        },
        linears: Linears::new(
            policy.as_ref(),
            &opts.amax,
            None,
            opts.nvfp4_default_amax,
            opts.calibration,
        ),
    };
    e.linears.lora_rank = opts.lora_rank;
    let f32t = DataType::FLOAT;
    let dt = e.o.dtype;
    let d = cfg.hidden_size;
    let hs = e.o.g.input(
        "hidden_states",
        f32t,
        vec![batch(), img_seq(), Dim::Fixed(cfg.in_channels as i64)],
    )?;
    let ehs = e.o.g.input(
        "encoder_hidden_states",
        f32t,
        vec![batch(), txt_seq(), Dim::Fixed(cfg.context_dim as i64)],
    )?;
    let pooled = e.o.g.input(
        "pooled_projections",
        f32t,
        vec![batch(), Dim::Fixed(cfg.vec_dim as i64)],
    )?;
    let timestep = e.o.g.input("timestep", f32t, vec![batch()])?;
    let img_ids =
        e.o.g
            .input("img_ids", f32t, vec![img_seq(), Dim::Fixed(3)])?;
    let txt_ids =
        e.o.g
            .input("txt_ids", f32t, vec![txt_seq(), Dim::Fixed(3)])?;
    let guidance = if cfg.guidance_embed {
        Some(e.o.g.input("guidance", f32t, vec![batch()])?)
    } else {
        None
    };
    let cn = opts.controlnet;
    if cn == ControlNetGraph::Model && layout != Layout::Diffusers {
        bail!(
            "ControlNet checkpoints come in diffusers' layout (controlnet_blocks.*); this one has BFL names"
        );
    }
    let (cond, cond_scale) = if cn == ControlNetGraph::Model {
        (
            Some(e.o.g.input(
                "controlnet_cond",
                f32t,
                vec![batch(), img_seq(), Dim::Fixed(cfg.in_channels as i64)],
            )?),
            Some(
                e.o.g
                    .input("conditioning_scale", f32t, vec![Dim::Fixed(1)])?,
            ),
        )
    } else {
        (None, None)
    };
    // ControlNet-Union (`controlnet_mode_embedder`): one control mode per batch row.
    let union =
        cn == ControlNetGraph::Model && ck.contains(&e.n.p("controlnet_mode_embedder.weight"));
    let mode = if union {
        Some(
            e.o.g
                .input("controlnet_mode", DataType::INT64, vec![batch()])?,
        )
    } else {
        None
    };
    let residual_input = |e: &mut Emitter, name: &str, n: usize| -> Result<Option<Value>> {
        if n == 0 {
            return Ok(None);
        }
        let v = e.o.g.input(
            name,
            f32t,
            vec![
                Dim::Fixed(n as i64),
                batch(),
                img_seq(),
                Dim::Fixed(d as i64),
            ],
        )?;
        Ok(Some(e.o.cast(&format!("{name}/cast"), &v, e.o.dtype)?))
    };
    let (res_double, res_single) = match cn {
        ControlNetGraph::Residuals { double, single } => (
            residual_input(&mut e, "controlnet_block_samples", double)?.map(|v| (v, double)),
            residual_input(&mut e, "controlnet_single_block_samples", single)?.map(|v| (v, single)),
        ),
        _ => (None, None),
    };
    let hs = e.o.cast("hidden_states/cast", &hs, dt)?;
    let ehs = e.o.cast("encoder_hidden_states/cast", &ehs, dt)?;
    let pooled = e.o.cast("pooled_projections/cast", &pooled, dt)?;

    let bl = layout == Layout::Bfl;
    let mut img = e.linear(&hs, if bl { "img_in" } else { "x_embedder" }, "x_embedder")?;
    if let Some(c) = &cond {
        let c = e.o.cast("controlnet_cond/cast", c, dt)?;
        let h = e.linear(&c, "controlnet_x_embedder", "controlnet_x_embedder")?;
        img =
            e.o.same("Add", "controlnet_x_embedder/add", &[&img, &h], vec![])?;
    }
    let mut txt = e.linear(
        &ehs,
        if bl { "txt_in" } else { "context_embedder" },
        "context_embedder",
    )?;
    // diffusers: the mode's embedding goes before the embedded text, and txt_ids gain a copy of their first row.
    let txt_ids = match &mode {
        Some(m) => {
            let table = e.t("controlnet_mode_embedder.weight")?;
            let table =
                e.o.weight(&e.n.p("controlnet_mode_embedder.weight"), &table, dt)?;
            let axes = e.o.i64s("controlnet_mode/axes", &[1])?;
            let m = e.o.g.op(
                "Unsqueeze",
                "controlnet_mode/unsqueeze",
                &[m, &axes],
                vec![],
                DataType::INT64,
                vec![batch(), Dim::Fixed(1)],
            )?;
            let emb = e.o.g.op(
                "Gather",
                "controlnet_mode_embedder",
                &[&table, &m],
                vec![("axis", Attr::Int(0))],
                dt,
                vec![batch(), Dim::Fixed(1), Dim::Fixed(d as i64)],
            )?;
            let shape = txt.shape.clone();
            txt = e.o.same(
                "Concat",
                "controlnet_mode/txt",
                &[&emb, &txt],
                vec![("axis", Attr::Int(1))],
            )?;
            txt.shape = vec![batch(), Dim::Sym("union_txt_seq".into()), shape[2].clone()];
            let (start, end, axis) = (
                e.o.i64s("controlnet_mode/ids_start", &[0])?,
                e.o.i64s("controlnet_mode/ids_end", &[1])?,
                e.o.i64s("controlnet_mode/ids_axis", &[0])?,
            );
            let first = e.o.g.op(
                "Slice",
                "controlnet_mode/first_id",
                &[&txt_ids, &start, &end, &axis],
                vec![],
                f32t,
                vec![Dim::Fixed(1), Dim::Fixed(3)],
            )?;
            e.o.g.op(
                "Concat",
                "controlnet_mode/txt_ids",
                &[&first, &txt_ids],
                vec![("axis", Attr::Int(0))],
                f32t,
                vec![Dim::Sym("union_txt_seq".into()), Dim::Fixed(3)],
            )?
        }
        None => txt_ids,
    };

    let temb = e.time_embedding("time_proj", &timestep)?;
    let mut vec = e.mlp_embedder(&temb, "time_in", "time_text_embed.timestep_embedder")?;
    if let Some(g) = &guidance {
        let gemb = e.time_embedding("guidance_proj", g)?;
        let gv = e.mlp_embedder(&gemb, "guidance_in", "time_text_embed.guidance_embedder")?;
        vec = e.o.same("Add", "vec/guidance", &[&vec, &gv], vec![])?;
    }
    let pv = e.mlp_embedder(&pooled, "vector_in", "time_text_embed.text_embedder")?;
    let mut vec = e.o.same("Add", "vec/pooled", &[&vec, &pv], vec![])?;
    vec.shape = vec![batch(), Dim::Fixed(d as i64)];
    let vec_silu = e.o.silu("vec", &vec)?;

    // RoPE angles for the joint sequence (txt first, as both references order it).
    let ids = e.o.g.op(
        "Concat",
        "rope/ids",
        &[&txt_ids, &img_ids],
        vec![("axis", Attr::Int(0))],
        f32t,
        vec![seq(), Dim::Fixed(3)],
    )?;
    if cfg.axes_dim.len() != 3 {
        bail!(
            "Flux positions have 3 axes; the config lists {}",
            cfg.axes_dim.len()
        );
    }
    let (cos, sin) =
        crate::models::ops::rope_tables(&mut e.o, "rope", &ids, &cfg.axes_dim, cfg.theta)?;
    let pe = (cos, sin);
    let txt_len = e.o.g.op(
        "Shape",
        "txt_len",
        &[&txt_ids],
        vec![("start", Attr::Int(0)), ("end", Attr::Int(1))],
        DataType::INT64,
        vec![Dim::Fixed(1)],
    )?;

    // Disk reads of the next block overlap with this block's work (streaming exports).
    let (dpre, spre) = match layout {
        Layout::Bfl => ("double_blocks", "single_blocks"),
        Layout::Diffusers => ("transformer_blocks", "single_transformer_blocks"),
    };
    // The checkpoint's blocks in the order they are emitted; reads run PREFETCH_BLOCKS blocks ahead.
    let final_prefixes: &[&str] = match layout {
        Layout::Bfl => &["final_layer."],
        Layout::Diffusers => &["norm_out.", "proj_out."],
    };
    let mut order: Vec<Vec<String>> = (0..cfg.depth)
        .map(|i| vec![format!("{dpre}.{i}.")])
        .chain((0..cfg.depth_single).map(|i| vec![format!("{spre}.{i}.")]))
        .collect();
    order.push(final_prefixes.iter().map(|s| s.to_string()).collect());
    let prefetch = |step: usize| {
        if let (Some(group), Some(_)) = (order.get(step), stream_to) {
            for p in group {
                ck.prefetch_prefix(&format!("{prefix}{p}"));
            }
        }
    };
    for step in 0..PREFETCH_BLOCKS {
        prefetch(step);
    }
    // ControlNet samples (a ControlNet graph) and residuals (a transformer taking them).
    let mut samples = Vec::new();
    let mut single_samples = Vec::new();
    for i in 0..cfg.depth {
        prefetch(i + PREFETCH_BLOCKS);
        (img, txt) = e.double_block(i, &img, &txt, &vec_silu, &pe, &txt_len)?;
        if cn == ControlNetGraph::Model {
            samples.push(e.linear(
                &img,
                &format!("controlnet_blocks.{i}"),
                &format!("controlnet_blocks.{i}"),
            )?);
        }
        if let Some((r, n)) = &res_double {
            img = e.residual(
                &format!("controlnet_residual.{i}"),
                &img,
                r,
                i / cfg.depth.div_ceil(*n),
            )?;
        }
    }
    let mut x = e.o.same(
        "Concat",
        "single/joint",
        &[&txt, &img],
        vec![("axis", Attr::Int(1))],
    )?;
    x.shape = vec![batch(), seq(), Dim::Fixed(d as i64)];
    for i in 0..cfg.depth_single {
        prefetch(cfg.depth + i + PREFETCH_BLOCKS);
        x = e.single_block(i, &x, &vec_silu, &pe)?;
        if cn == ControlNetGraph::Model {
            let (_, im) = e.split_seq(&format!("controlnet_single.{i}/split"), &x, &txt_len)?;
            single_samples.push(e.linear(
                &im,
                &format!("controlnet_single_blocks.{i}"),
                &format!("controlnet_single_blocks.{i}"),
            )?);
        }
        if let Some((r, n)) = &res_single {
            let name = format!("controlnet_single_residual.{i}");
            let (tx, im) = e.split_seq(&format!("{name}/split"), &x, &txt_len)?;
            let im = e.residual(&name, &im, r, i / cfg.depth_single.div_ceil(*n))?;
            x = e.o.same(
                "Concat",
                &format!("{name}/joint"),
                &[&tx, &im],
                vec![("axis", Attr::Int(1))],
            )?;
            x.shape = vec![batch(), seq(), Dim::Fixed(d as i64)];
        }
    }
    if cn == ControlNetGraph::Model {
        let Some(scale) = cond_scale else {
            bail!("internal: a ControlNet graph without its conditioning_scale input");
        };
        for (name, v) in [
            ("controlnet_block_samples", samples),
            ("controlnet_single_block_samples", single_samples),
        ] {
            if v.is_empty() {
                continue;
            }
            let ax = e.o.i64s(&format!("{name}.ax"), &[0])?;
            let mut parts = Vec::new();
            for (i, s) in v.iter().enumerate() {
                let s = e.o.cast(&format!("{name}.{i}/f32"), s, f32t)?;
                parts.push(e.o.g.op(
                    "Unsqueeze",
                    &format!("{name}.{i}/stack"),
                    &[&s, &ax],
                    vec![],
                    f32t,
                    vec![Dim::Fixed(1), batch(), img_seq(), Dim::Fixed(d as i64)],
                )?);
            }
            let refs: Vec<&Value> = parts.iter().collect();
            let stacked = e.o.g.op(
                "Concat",
                &format!("{name}/concat"),
                &refs,
                vec![("axis", Attr::Int(0))],
                f32t,
                vec![
                    Dim::Fixed(v.len() as i64),
                    batch(),
                    img_seq(),
                    Dim::Fixed(d as i64),
                ],
            )?;
            let out = e.o.g.op(
                "Mul",
                name,
                &[&stacked, &scale],
                vec![],
                f32t,
                vec![
                    Dim::Fixed(v.len() as i64),
                    batch(),
                    img_seq(),
                    Dim::Fixed(d as i64),
                ],
            )?;
            e.o.g.output(&out);
        }
        let layers = super::LinearsReport {
            counts: e.linears.counts,
            shapes: e.linears.shapes,
        };
        let (model, sink) = e.o.g.finish_streamed();
        return Ok((model, sink, layers));
    }
    let (_, img) = e.split_seq("single/split", &x, &txt_len)?;
    // Final AdaLN: BFL stores (shift, scale), diffusers (scale, shift).
    let (mb, fb) = if bl {
        ("final_layer.adaLN_modulation.1", "final_layer.linear")
    } else {
        ("norm_out.linear", "proj_out")
    };
    let m = e.modulation(&vec_silu, mb, "norm_out.linear", 2)?;
    let (shift, scale) = if bl { (&m[0], &m[1]) } else { (&m[1], &m[0]) };
    let y = e.modulate("final/norm", &img, shift, scale)?;
    let y = e.linear(&y, fb, "proj_out")?;
    let mut y = e.o.cast("sample/f32", &y, f32t)?;
    y = e.o.g.op(
        "Identity",
        "sample",
        &[&y],
        vec![],
        f32t,
        vec![batch(), img_seq(), Dim::Fixed(cfg.out_channels as i64)],
    )?;
    e.o.g.output(&y);
    let layers = super::LinearsReport {
        counts: e.linears.counts,
        shapes: e.linears.shapes,
    };
    let (model, sink) = e.o.g.finish_streamed();
    Ok((model, sink, layers))
}
