//! The Z-Image transformer (diffusers `ZImageTransformer2DModel`, the single-stream S3-DiT of Z-Image-Turbo) as
//! one ONNX graph, weights taken zero-copy from a diffusers-layout safetensors checkpoint (`transformer/`).
//!
//! ## Graph contract (all float32)
//! - `latents` [batch, C, H, W]: the VAE latents themselves (the graph patchifies them into 2x2 patches, features
//!   ordered (row, column, channel) as diffusers' `_patchify_image`); H and W even;
//! - `timestep` `[batch]`: what diffusers' pipeline passes, `(1000 - t) / 1000 = 1 - sigma`; the graph multiplies
//!   by `t_scale` (1000) itself;
//! - `cap_feats` [batch, cap_seq, cap_feat_dim]: the Qwen3 encoder's hidden states of the prompt's tokens (no
//!   padding; every caption of a batch has the same length);
//! - `img_ids` [img_pad, 3], `txt_ids` [cap_pad, 3]: RoPE positions of the image tokens padded to a multiple of 32
//!   (`(cap_pad + 1, row, col)`, then `(0, 0, 0)` for the padding) and of the caption tokens padded likewise
//!   (`(1 + i, 0, 0)`), as `ZImageTransformer2DModel.patchify_and_embed` makes them ([`image_ids`], [`text_ids`]).
//!   Their lengths set how many `x_pad_token` / `cap_pad_token` rows the graph appends.
//!
//! Output `sample` [batch, C, H, W]: diffusers' raw output (the pipeline steps with its negation).
//!
//! Inside: timestep embedding -> MLP (the AdaLN input); patch embedding + padding -> noise refiner blocks
//! (modulated); caption RMSNorm + projection + padding -> context refiner blocks (unmodulated); [image | caption]
//! -> main blocks -> final AdaLN layer on the image tokens -> unpatchify. A batch attends without masks: diffusers
//! masks only between captions of different lengths, and the pad tokens are attended to as diffusers does.
//!
//! ## Precisions
//! As Flux: f32/f16/bf16 compute, or FP8/NVFP4 GEMMs chosen per layer by a [`Policy`] ([`default_policy`]: the
//! embedders, every AdaLN modulation and the final layer stay high precision); RMSNorm, RoPE and softmax run in
//! f32. Policy names and amax keys are diffusers' layer names.
use crate::models::flux::FluxPrecision;
use crate::models::ops::{self, Ops};
use crate::models::qdq::{Linears, Weight, attention};
use crate::onnx::{Attr, DataType, Dim, SaveOptions, Value, proto::ModelProto, save};
use crate::quant::LinearPrecision;
use crate::quant::policy::Policy;
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::Path;

/// Sequences are padded to a multiple of this many tokens (diffusers' `SEQ_MULTI_OF`).
pub const SEQ_MULTI_OF: usize = 32;
/// Width of the AdaLN input (diffusers' `ADALN_EMBED_DIM`, capped by the model width).
const ADALN_EMBED_DIM: usize = 256;

/// `transformer/config.json` of a Z-Image model. The sizes the weights are made of are required; the other keys
/// take `ZImageTransformer2DModel.__init__`'s defaults when absent, as diffusers does.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ZImageConfig {
    pub in_channels: usize,
    pub dim: usize,
    pub n_layers: usize,
    #[serde(default = "defaults::n_refiner_layers")]
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    #[serde(default = "defaults::norm_eps")]
    pub norm_eps: f32,
    #[serde(default = "defaults::yes")]
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    #[serde(default = "defaults::rope_theta")]
    pub rope_theta: f32,
    #[serde(default = "defaults::t_scale")]
    pub t_scale: f32,
    #[serde(default = "defaults::axes_dims")]
    pub axes_dims: Vec<usize>,
    #[serde(default = "defaults::axes_lens")]
    pub axes_lens: Vec<usize>,
    #[serde(default = "defaults::patch")]
    pub all_patch_size: Vec<usize>,
    #[serde(default = "defaults::f_patch")]
    pub all_f_patch_size: Vec<usize>,
}

/// diffusers' defaults of the optional config keys.
mod defaults {
    pub fn n_refiner_layers() -> usize {
        2
    }
    pub fn norm_eps() -> f32 {
        1e-5
    }
    pub fn yes() -> bool {
        true
    }
    pub fn rope_theta() -> f32 {
        256.0
    }
    pub fn t_scale() -> f32 {
        1000.0
    }
    pub fn axes_dims() -> Vec<usize> {
        vec![32, 48, 48]
    }
    pub fn axes_lens() -> Vec<usize> {
        vec![1024, 512, 512]
    }
    pub fn patch() -> Vec<usize> {
        vec![2]
    }
    pub fn f_patch() -> Vec<usize> {
        vec![1]
    }
}

impl ZImageConfig {
    /// Reads `config.json` (`path` names it in errors).
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(text)
            .with_context(|| format!("'{}' is not valid JSON", path.display()))?;
        if let Some(c) = v.get("_class_name").and_then(|c| c.as_str())
            && c != "ZImageTransformer2DModel"
        {
            bail!(
                "'{}' describes a {c}, not a ZImageTransformer2DModel: point --arch z-image-turbo at a Z-Image model \
                 folder",
                path.display()
            );
        }
        if v.get("siglip_feat_dim").is_some_and(|s| !s.is_null()) {
            bail!(
                "'{}' has siglip_feat_dim: Z-Image-Omni (image conditioning) is not supported, only the text-to-image \
                 Z-Image models",
                path.display()
            );
        }
        let c: ZImageConfig = serde_json::from_value(v).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not a ZImageTransformer2DModel config: {e}. Fix: use the config.json diffusers saved with \
                 the transformer weights",
                path.display()
            )
        })?;
        c.check()
            .with_context(|| format!("'{}' has an unsupported config", path.display()))?;
        Ok(c)
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads.max(1)
    }

    /// The AdaLN input width (the timestep embedding's).
    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    /// FeedForward hidden width (`int(dim / 3 * 8)`).
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    fn check(&self) -> Result<()> {
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            bail!(
                "dim {} is not a multiple of n_heads {}",
                self.dim,
                self.n_heads
            );
        }
        if self.axes_dims.len() != 3 || self.axes_dims.iter().sum::<usize>() != self.head_dim() {
            bail!(
                "axes_dims {:?} must be three sizes summing to the head size {}",
                self.axes_dims,
                self.head_dim()
            );
        }
        if self.axes_dims.iter().any(|d| d % 2 != 0) {
            bail!("axes_dims {:?} must be even", self.axes_dims);
        }
        if !self.all_patch_size.contains(&2) || !self.all_f_patch_size.contains(&1) {
            bail!(
                "only 2x2 patches with frame patch 1 are supported (all_patch_size {:?}, all_f_patch_size {:?})",
                self.all_patch_size,
                self.all_f_patch_size
            );
        }
        if !self.qk_norm {
            bail!("qk_norm false is not supported (every Z-Image model normalises q and k)");
        }
        Ok(())
    }

    /// Checks that the checkpoint's tensors have this config's shapes (a config of another model fails here,
    /// not deep inside the export).
    pub fn check_checkpoint(&self, ck: &Checkpoint) -> Result<()> {
        let (d, pc) = (self.dim, 4 * self.in_channels);
        let expect = [
            ("all_x_embedder.2-1.weight", vec![d, pc]),
            ("cap_embedder.1.weight", vec![d, self.cap_feat_dim]),
            ("t_embedder.mlp.2.weight", vec![self.adaln_dim(), 1024]),
            ("all_final_layer.2-1.linear.weight", vec![pc, d]),
            ("x_pad_token", vec![1, d]),
            ("layers.0.feed_forward.w1.weight", vec![self.ffn_dim(), d]),
        ];
        for (name, shape) in expect {
            match ck.shape(name) {
                Some(s) if s == shape.as_slice() => {}
                Some(s) => bail!(
                    "the transformer weights do not fit its config: '{name}' is {s:?}, the config gives {shape:?}"
                ),
                None => bail!(
                    "the transformer checkpoint has no '{name}': it is not a diffusers ZImageTransformer2DModel \
                     (convert the original checkpoint with diffusers, or use the diffusers model folder)"
                ),
            }
        }
        let last = format!("layers.{}.attention.to_q.weight", self.n_layers.max(1) - 1);
        if !ck.contains(&last)
            || ck.contains(&format!("layers.{}.attention.to_q.weight", self.n_layers))
        {
            bail!(
                "the transformer checkpoint does not have the config's {} layers",
                self.n_layers
            );
        }
        Ok(())
    }
}

/// ModelOpt-like defaults for Z-Image: [`Policy::defaults`] (embedders `*embed*`, norms, the final layer stay high
/// precision) plus every AdaLN modulation (the timestep's scales and gates, as Flux keeps its `norm*.linear`).
pub fn default_policy(target: LinearPrecision) -> Policy {
    Policy::defaults(target)
        .with_overrides(&[], &["*adaLN_modulation*".into()])
        .expect("valid globs")
}

/// The amax key of a layer's input: projections reading one activation share the first one's name.
pub fn amax_key(layer: &str) -> String {
    for (from, to) in [
        ("attention.to_k", "attention.to_q"),
        ("attention.to_v", "attention.to_q"),
        ("feed_forward.w3", "feed_forward.w1"),
    ] {
        if let Some(base) = layer.strip_suffix(from) {
            return format!("{base}{to}");
        }
    }
    layer.to_string()
}

#[derive(Clone, Debug)]
pub struct ExportOptions {
    pub precision: FluxPrecision,
    /// None: [`default_policy`] for quantized precisions.
    pub policy: Option<Policy>,
    /// Calibrated activation absolute maxima by [`amax_key`] (required for FP8; optional for NVFP4).
    pub amax: HashMap<String, f32>,
    /// NVFP4 activation amax for layers missing from `amax`.
    pub nvfp4_default_amax: f32,
    /// Compute dtype of FP8/NVFP4 graphs outside their quantized GEMMs (FLOAT, FLOAT16 or BFLOAT16).
    pub quantized_compute: DataType,
    /// Adds an `amax.<key>` output per linear-layer input activation (calibration runs, with F32).
    pub calibration: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            precision: FluxPrecision::F32,
            policy: None,
            amax: HashMap::new(),
            nvfp4_default_amax: 256.0,
            quantized_compute: DataType::FLOAT,
            calibration: false,
        }
    }
}

fn batch() -> Dim {
    Dim::Sym("batch".into())
}

/// RoPE positions of the image tokens of an `h x w` latent after a caption padded to `cap_pad` tokens:
/// `(cap_pad + 1, row, col)` per 2x2 patch, then `(0, 0, 0)` up to a multiple of [`SEQ_MULTI_OF`].
pub fn image_ids(h: usize, w: usize, cap_pad: usize) -> Vec<f32> {
    let n = (h / 2) * (w / 2);
    let mut v = Vec::with_capacity(n.next_multiple_of(SEQ_MULTI_OF) * 3);
    for i in 0..h / 2 {
        for j in 0..w / 2 {
            v.extend_from_slice(&[(cap_pad + 1) as f32, i as f32, j as f32]);
        }
    }
    v.resize(n.next_multiple_of(SEQ_MULTI_OF) * 3, 0.0);
    v
}

/// RoPE positions of a caption of `len` tokens padded to a multiple of [`SEQ_MULTI_OF`]: `(1 + i, 0, 0)` (the
/// padding continues the count).
pub fn text_ids(len: usize) -> Vec<f32> {
    (0..len.next_multiple_of(SEQ_MULTI_OF))
        .flat_map(|i| [(1 + i) as f32, 0.0, 0.0])
        .collect()
}

struct Emitter<'a> {
    o: Ops,
    cfg: &'a ZImageConfig,
    ck: &'a Checkpoint,
    linears: Linears<'a>,
}

impl Emitter<'_> {
    fn t(&self, name: &str) -> Result<Tensor> {
        self.ck.get(name)
    }

    fn linear(&mut self, x: &Value, base: &str) -> Result<Value> {
        let weight = self.t(&format!("{base}.weight"))?;
        let bname = format!("{base}.bias");
        let bias = if self.ck.contains(&bname) {
            Some(self.t(&bname)?)
        } else {
            None
        };
        self.linears.linear(
            &mut self.o,
            base,
            base,
            &amax_key(base),
            x,
            Weight::Tensor {
                weight: &weight,
                bias: bias.as_ref(),
            },
        )
    }

    fn rms(&mut self, x: &Value, weight: &str, eps: f32) -> Result<Value> {
        let w = self.t(weight)?;
        self.o
            .rms_norm(weight.trim_end_matches(".weight"), x, &w, eps)
    }

    fn int_op(&mut self, op: &str, name: &str, inputs: &[&Value]) -> Result<Value> {
        self.o.g.op(
            op,
            name,
            inputs,
            vec![],
            DataType::INT64,
            vec![Dim::Fixed(1)],
        )
    }

    /// Dimensions `start..end` of `x`'s shape as an int64 vector.
    fn dims(&mut self, name: &str, x: &Value, start: i64, end: i64) -> Result<Value> {
        self.o.g.op(
            "Shape",
            name,
            &[x],
            vec![("start", Attr::Int(start)), ("end", Attr::Int(end))],
            DataType::INT64,
            vec![Dim::Fixed(end - start)],
        )
    }

    /// `x` [B, S, dim] followed by `pad` [1, dim] repeated up to the length of `ids` [S_pad, 3].
    fn pad_to(&mut self, name: &str, x: &Value, pad: &str, ids: &Value, seq: Dim) -> Result<Value> {
        let d = self.cfg.dim as i64;
        let b = self.dims(&format!("{name}/batch"), x, 0, 1)?;
        let s = self.dims(&format!("{name}/len"), x, 1, 2)?;
        let sp = self.dims(&format!("{name}/padded_len"), ids, 0, 1)?;
        let n = self.int_op("Sub", &format!("{name}/pad_len"), &[&sp, &s])?;
        let dv = self.o.i64s(&format!("{name}.dim"), &[d])?;
        let shape = self.o.g.op(
            "Concat",
            &format!("{name}/pad_shape"),
            &[&b, &n, &dv],
            vec![("axis", Attr::Int(0))],
            DataType::INT64,
            vec![Dim::Fixed(3)],
        )?;
        let t = self.t(pad)?;
        let dt = self.o.dtype;
        let tok = self.o.weight(pad, &t, dt)?;
        let rows = self.o.op(
            "Expand",
            &format!("{name}/pad_rows"),
            &[&tok, &shape],
            vec![],
            vec![batch(), Dim::Sym(format!("{name}_pad")), Dim::Fixed(d)],
        )?;
        self.o.op(
            "Concat",
            &format!("{name}/padded"),
            &[x, &rows],
            vec![("axis", Attr::Int(1))],
            vec![batch(), seq, Dim::Fixed(d)],
        )
    }

    /// [B, S, dim] -> [B, H, S, hd].
    fn heads(&mut self, name: &str, x: &Value) -> Result<Value> {
        let (h, hd) = (self.cfg.n_heads as i64, self.cfg.head_dim() as i64);
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
        t.shape = vec![batch(), Dim::Fixed(h), x.shape[1].clone(), Dim::Fixed(hd)];
        Ok(t)
    }

    fn attention(&mut self, p: &str, x: &Value, pe: &(Value, Value)) -> Result<Value> {
        let a = format!("{p}.attention");
        let mut qkv = Vec::new();
        for (proj, norm) in [
            ("to_q", Some("norm_q")),
            ("to_k", Some("norm_k")),
            ("to_v", None),
        ] {
            let y = self.linear(x, &format!("{a}.{proj}"))?;
            let y = self.heads(&format!("{a}.{proj}"), &y)?;
            let y = match norm {
                Some(n) => {
                    // diffusers' Attention(qk_norm="rms_norm", eps=1e-5) over each head.
                    let y = self.rms(&y, &format!("{a}.{n}.weight"), 1e-5)?;
                    let hd = self.cfg.head_dim() as i64;
                    ops::rope_pairs(&mut self.o, &format!("{a}/rope_{proj}"), &y, hd, pe)?
                }
                None => y,
            };
            qkv.push(y);
        }
        let ctx = attention(&mut self.o.g, &a, &qkv[0], &qkv[1], &qkv[2], None)?;
        let t = self.o.same(
            "Transpose",
            &format!("{a}/bshd"),
            &[&ctx],
            vec![("perm", Attr::Ints(vec![0, 2, 1, 3]))],
        )?;
        let s = self
            .o
            .i64s(&format!("{a}.merged"), &[0, 0, self.cfg.dim as i64])?;
        let mut y = self
            .o
            .same("Reshape", &format!("{a}/merged"), &[&t, &s], vec![])?;
        y.shape = x.shape.clone();
        self.linear(&y, &format!("{a}.to_out.0"))
    }

    fn feed_forward(&mut self, p: &str, x: &Value) -> Result<Value> {
        let f = format!("{p}.feed_forward");
        let a = self.linear(x, &format!("{f}.w1"))?;
        let a = self.o.silu(&format!("{f}/silu"), &a)?;
        let b = self.linear(x, &format!("{f}.w3"))?;
        let h = self
            .o
            .same("Mul", &format!("{f}/gated"), &[&a, &b], vec![])?;
        self.linear(&h, &format!("{f}.w2"))
    }

    fn add(&mut self, name: &str, a: &Value, b: &Value) -> Result<Value> {
        let mut r = self.o.same("Add", name, &[a, b], vec![])?;
        r.shape = a.shape.clone();
        Ok(r)
    }

    fn mul(&mut self, name: &str, a: &Value, b: &Value) -> Result<Value> {
        let mut r = self.o.same("Mul", name, &[a, b], vec![])?;
        r.shape = a.shape.clone();
        Ok(r)
    }

    /// One `ZImageTransformerBlock` under `p`; `adaln` [B, adaln_dim] for modulated blocks.
    fn block(
        &mut self,
        p: &str,
        x: &Value,
        pe: &(Value, Value),
        adaln: Option<&Value>,
    ) -> Result<Value> {
        let eps = self.cfg.norm_eps;
        let d = self.cfg.dim;
        // (1 + scale_msa, tanh(gate_msa), 1 + scale_mlp, tanh(gate_mlp)), each [B, 1, dim].
        let m = match adaln {
            Some(c) => {
                let m = self.linear(c, &format!("{p}.adaLN_modulation.0"))?;
                let ax = self.o.i64s(&format!("{p}.mod_ax"), &[1])?;
                let mut m =
                    self.o
                        .same("Unsqueeze", &format!("{p}/mod_seq"), &[&m, &ax], vec![])?;
                m.shape = vec![batch(), Dim::Fixed(1), Dim::Fixed(4 * d as i64)];
                let sizes = self.o.i64s(&format!("{p}.mod_sizes"), &[d as i64; 4])?;
                let part = (
                    self.o.dtype,
                    vec![batch(), Dim::Fixed(1), Dim::Fixed(d as i64)],
                );
                let parts = self.o.g.node(
                    "Split",
                    &format!("{p}/mod_chunks"),
                    &[&m, &sizes],
                    vec![("axis", Attr::Int(-1))],
                    vec![part.clone(), part.clone(), part.clone(), part],
                )?;
                let one = self.o.constant(&format!("{p}.one"), &[], &[1.0])?;
                let s_msa =
                    self.o
                        .same("Add", &format!("{p}/scale_msa"), &[&parts[0], &one], vec![])?;
                let g_msa = self
                    .o
                    .same("Tanh", &format!("{p}/gate_msa"), &[&parts[1]], vec![])?;
                let s_mlp =
                    self.o
                        .same("Add", &format!("{p}/scale_mlp"), &[&parts[2], &one], vec![])?;
                let g_mlp = self
                    .o
                    .same("Tanh", &format!("{p}/gate_mlp"), &[&parts[3]], vec![])?;
                Some([s_msa, g_msa, s_mlp, g_mlp])
            }
            None => None,
        };
        let mut h = self.rms(x, &format!("{p}.attention_norm1.weight"), eps)?;
        if let Some(m) = &m {
            h = self.mul(&format!("{p}/attn_in"), &h, &m[0])?;
        }
        let a = self.attention(p, &h, pe)?;
        let mut a = self.rms(&a, &format!("{p}.attention_norm2.weight"), eps)?;
        if let Some(m) = &m {
            a = self.mul(&format!("{p}/attn_gated"), &a, &m[1])?;
        }
        let x = self.add(&format!("{p}/attn_residual"), x, &a)?;
        let mut h = self.rms(&x, &format!("{p}.ffn_norm1.weight"), eps)?;
        if let Some(m) = &m {
            h = self.mul(&format!("{p}/ffn_in"), &h, &m[2])?;
        }
        let f = self.feed_forward(p, &h)?;
        let mut f = self.rms(&f, &format!("{p}.ffn_norm2.weight"), eps)?;
        if let Some(m) = &m {
            f = self.mul(&format!("{p}/ffn_gated"), &f, &m[3])?;
        }
        let mut y = self.add(&format!("{p}/ffn_residual"), &x, &f)?;
        if self.o.dtype == DataType::FLOAT16 {
            // Keep the f16 residual stream finite.
            let lo = self.o.constant(&format!("{p}.lo"), &[], &[-65504.0])?;
            let hi = self.o.constant(&format!("{p}.hi"), &[], &[65504.0])?;
            y = self
                .o
                .same("Clip", &format!("{p}/clip"), &[&y, &lo, &hi], vec![])?;
        }
        Ok(y)
    }
}

/// Builds the transformer graph; with `stream_to` (the .onnx path) weights stream to its external data file.
fn emit(
    cfg: &ZImageConfig,
    ck: &Checkpoint,
    opts: &ExportOptions,
    stream_to: Option<&Path>,
) -> Result<(
    ModelProto,
    Option<crate::onnx::builder::ExternalSink>,
    crate::models::flux::LinearsReport,
)> {
    cfg.check()?;
    cfg.check_checkpoint(ck)?;
    let target = match opts.precision {
        FluxPrecision::Fp8 => Some(LinearPrecision::Fp8),
        FluxPrecision::Nvfp4 => Some(LinearPrecision::Nvfp4),
        _ => None,
    };
    let policy = match (&opts.policy, target) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(t)) => Some(default_policy(t)),
        (None, None) => None,
    };
    let compute = match (target, opts.precision) {
        (Some(_), _) => opts.quantized_compute,
        (None, FluxPrecision::F16) => DataType::FLOAT16,
        (None, FluxPrecision::Bf16) => DataType::BFLOAT16,
        (None, _) => DataType::FLOAT,
    };
    if !matches!(
        compute,
        DataType::FLOAT | DataType::FLOAT16 | DataType::BFLOAT16
    ) {
        bail!("quantized_compute must be FLOAT, FLOAT16 or BFLOAT16, not {compute}");
    }
    let opset = target.map_or(18, |t| t.min_opset()).max(18);
    let mut o = Ops::new("z_image_transformer", opset, compute);
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
        linears: Linears::new(
            policy.as_ref(),
            &opts.amax,
            None,
            opts.nvfp4_default_amax,
            opts.calibration,
        ),
    };
    let f32t = DataType::FLOAT;
    let (c, d) = (cfg.in_channels as i64, cfg.dim as i64);
    let (h, w) = (Dim::Sym("height".into()), Dim::Sym("width".into()));
    let latents = e.o.g.input(
        "latents",
        f32t,
        vec![batch(), Dim::Fixed(c), h.clone(), w.clone()],
    )?;
    let timestep = e.o.g.input("timestep", f32t, vec![batch()])?;
    let cap_feats = e.o.g.input(
        "cap_feats",
        f32t,
        vec![
            batch(),
            Dim::Sym("cap_seq".into()),
            Dim::Fixed(cfg.cap_feat_dim as i64),
        ],
    )?;
    let img_pad = Dim::Sym("img_pad".into());
    let cap_pad = Dim::Sym("cap_pad".into());
    let img_ids =
        e.o.g
            .input("img_ids", f32t, vec![img_pad.clone(), Dim::Fixed(3)])?;
    let txt_ids =
        e.o.g
            .input("txt_ids", f32t, vec![cap_pad.clone(), Dim::Fixed(3)])?;
    let dt = e.o.dtype;

    // AdaLN input: MLP of the sinusoidal embedding of t * t_scale.
    let temb = ops::timestep_embedding(&mut e.o, "t_embedder/freq", &timestep, cfg.t_scale)?;
    let temb = e.linear(&temb, "t_embedder.mlp.0")?;
    let temb = e.o.silu("t_embedder.mlp.1", &temb)?;
    let adaln = e.linear(&temb, "t_embedder.mlp.2")?;

    // Patchify [B, C, H, W] -> [B, (H/2)(W/2), 2*2*C] with features (row, column, channel).
    let lat = e.o.cast("latents/cast", &latents, dt)?;
    let bdim = e.dims("patchify/batch", &latents, 0, 1)?;
    let hw = e.dims("patchify/hw", &latents, 2, 4)?;
    let two = e.o.i64s("patchify.two", &[2])?;
    let half_hw = e.int_op("Div", "patchify/half_hw", &[&hw, &two])?;
    let zero = e.o.i64s("patchify.i0", &[0])?;
    let one = e.o.i64s("patchify.i1", &[1])?;
    let ht = e.o.g.op(
        "Slice",
        "patchify/ht",
        &[&half_hw, &zero, &one],
        vec![],
        DataType::INT64,
        vec![Dim::Fixed(1)],
    )?;
    let tw = e.o.i64s("patchify.i2", &[2])?;
    let wt = e.o.g.op(
        "Slice",
        "patchify/wt",
        &[&half_hw, &one, &tw],
        vec![],
        DataType::INT64,
        vec![Dim::Fixed(1)],
    )?;
    let cv = e.o.i64s("patchify.c", &[c])?;
    let split_shape = e.o.g.op(
        "Concat",
        "patchify/split_shape",
        &[&bdim, &cv, &ht, &two, &wt, &two],
        vec![("axis", Attr::Int(0))],
        DataType::INT64,
        vec![Dim::Fixed(6)],
    )?;
    let x =
        e.o.same("Reshape", "patchify/split", &[&lat, &split_shape], vec![])?;
    let x = e.o.same(
        "Transpose",
        "patchify/tokens",
        &[&x],
        vec![("perm", Attr::Ints(vec![0, 2, 4, 3, 5, 1]))],
    )?;
    let flat = e.o.i64s("patchify.flat", &[0, -1, 4 * c])?;
    let mut x = e.o.same("Reshape", "patchify/flat", &[&x, &flat], vec![])?;
    let img_seq = Dim::Sym("img_seq".into());
    x.shape = vec![batch(), img_seq.clone(), Dim::Fixed(4 * c)];

    let x = e.linear(&x, "all_x_embedder.2-1")?;
    let mut x = e.pad_to("x_pad", &x, "x_pad_token", &img_ids, img_pad.clone())?;
    let pe_x = ops::rope_tables(
        &mut e.o,
        "rope_img",
        &img_ids,
        &cfg.axes_dims,
        cfg.rope_theta,
    )?;
    for i in 0..cfg.n_refiner_layers {
        x = e.block(&format!("noise_refiner.{i}"), &x, &pe_x, Some(&adaln))?;
    }

    let cap = e.o.cast("cap_feats/cast", &cap_feats, dt)?;
    let cap = e.rms(&cap, "cap_embedder.0.weight", cfg.norm_eps)?;
    let cap = e.linear(&cap, "cap_embedder.1")?;
    let mut cap = e.pad_to("cap_pad", &cap, "cap_pad_token", &txt_ids, cap_pad.clone())?;
    let pe_c = ops::rope_tables(
        &mut e.o,
        "rope_txt",
        &txt_ids,
        &cfg.axes_dims,
        cfg.rope_theta,
    )?;
    for i in 0..cfg.n_refiner_layers {
        cap = e.block(&format!("context_refiner.{i}"), &cap, &pe_c, None)?;
    }

    // Main blocks on [image | caption].
    let seq = Dim::Sym("seq".into());
    let mut u = e.o.op(
        "Concat",
        "unified",
        &[&x, &cap],
        vec![("axis", Attr::Int(1))],
        vec![batch(), seq.clone(), Dim::Fixed(d)],
    )?;
    let mut pe_u = Vec::new();
    for (i, (a, b)) in [(&pe_x.0, &pe_c.0), (&pe_x.1, &pe_c.1)]
        .into_iter()
        .enumerate()
    {
        pe_u.push(e.o.g.op(
            "Concat",
            &format!("rope_unified/{i}"),
            &[a, b],
            vec![("axis", Attr::Int(0))],
            f32t,
            vec![
                seq.clone(),
                Dim::Fixed(cfg.head_dim() as i64 / 2),
                Dim::Fixed(1),
            ],
        )?);
    }
    let pe_u = (pe_u[0].clone(), pe_u[1].clone());
    for i in 0..cfg.n_layers {
        u = e.block(&format!("layers.{i}"), &u, &pe_u, Some(&adaln))?;
    }

    // The image tokens (the first H/2 * W/2) through the final layer.
    let n = e.int_op("Mul", "image_tokens", &[&ht, &wt])?;
    let mut img =
        e.o.same("Slice", "unified/image", &[&u, &zero, &n, &one], vec![])?;
    img.shape = vec![batch(), img_seq.clone(), Dim::Fixed(d)];
    let f = "all_final_layer.2-1";
    let y =
        e.o.layer_norm_plain(&format!("{f}/norm_final"), &img, cfg.dim, 1e-6)?;
    let cs = e.o.silu(&format!("{f}.adaLN_modulation.0"), &adaln)?;
    let scale = e.linear(&cs, &format!("{f}.adaLN_modulation.1"))?;
    let ax = e.o.i64s(&format!("{f}.ax"), &[1])?;
    let scale = e.o.same(
        "Unsqueeze",
        &format!("{f}/seq_axis"),
        &[&scale, &ax],
        vec![],
    )?;
    let onef = e.o.constant(&format!("{f}.one"), &[], &[1.0])?;
    let scale =
        e.o.same("Add", &format!("{f}/one_plus"), &[&scale, &onef], vec![])?;
    let y = e.mul(&format!("{f}/scaled"), &y, &scale)?;
    let y = e.linear(&y, &format!("{f}.linear"))?;

    // Unpatchify [B, N, 2*2*C] -> [B, C, H, W].
    let cv2 = e.o.i64s("unpatchify.c", &[c])?;
    let tok_shape = e.o.g.op(
        "Concat",
        "unpatchify/shape",
        &[&bdim, &ht, &wt, &two, &two, &cv2],
        vec![("axis", Attr::Int(0))],
        DataType::INT64,
        vec![Dim::Fixed(6)],
    )?;
    let y =
        e.o.same("Reshape", "unpatchify/split", &[&y, &tok_shape], vec![])?;
    let y = e.o.same(
        "Transpose",
        "unpatchify/channels",
        &[&y],
        vec![("perm", Attr::Ints(vec![0, 5, 1, 3, 2, 4]))],
    )?;
    let full = e.dims("unpatchify/full", &latents, 0, 4)?;
    let y =
        e.o.same("Reshape", "unpatchify/image", &[&y, &full], vec![])?;
    let y = e.o.cast("sample/f32", &y, f32t)?;
    let y = e.o.g.op(
        "Identity",
        "sample",
        &[&y],
        vec![],
        f32t,
        vec![batch(), Dim::Fixed(c), h, w],
    )?;
    e.o.g.output(&y);
    let layers = crate::models::flux::LinearsReport {
        counts: e.linears.counts,
        shapes: e.linears.shapes,
    };
    let (model, sink) = e.o.g.finish_streamed();
    Ok((model, sink, layers))
}

/// The transformer graph in memory (weights inline): for tests and small models.
pub fn graph(cfg: &ZImageConfig, ck: &Checkpoint, opts: &ExportOptions) -> Result<ModelProto> {
    Ok(emit(cfg, ck, opts, None)?.0)
}

/// Exports the transformer to `out` (an .onnx path; weights stream to `<out>.data`). Returns the linear layers
/// by precision name.
pub fn export(
    cfg: &ZImageConfig,
    ck: &Checkpoint,
    opts: &ExportOptions,
    out: &Path,
) -> Result<crate::models::flux::LinearsReport> {
    let (model, sink, layers) = emit(cfg, ck, opts, Some(out))?;
    if let Some(s) = sink {
        s.commit()?;
    }
    save(
        model,
        out,
        &SaveOptions {
            external_threshold: None,
        },
    )?;
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::policy::LayerKind;

    #[test]
    fn positions_follow_diffusers_patchify() {
        // 5 caption tokens pad to 32: (1..=32, 0, 0); a 6x4 latent has 3x2 patches after position 33, then 26
        // padding rows at the origin.
        let t = text_ids(5);
        assert_eq!(t.len(), 32 * 3);
        assert_eq!(&t[93..96], &[32.0, 0.0, 0.0]);
        let i = image_ids(6, 4, 32);
        assert_eq!(i.len(), 32 * 3);
        assert_eq!(&i[0..3], &[33.0, 0.0, 0.0]);
        assert_eq!(&i[15..18], &[33.0, 2.0, 1.0]);
        assert_eq!(&i[18..21], &[0.0, 0.0, 0.0]);
        assert_eq!(image_ids(64, 64, 32).len(), 32 * 32 * 3);
    }

    #[test]
    fn default_policy_keeps_embedders_modulation_and_final_layer() {
        let p = default_policy(LinearPrecision::Nvfp4);
        let q = |n: &str| p.decide(n, LayerKind::Linear);
        for quantized in [
            "layers.3.attention.to_q",
            "layers.3.attention.to_out.0",
            "layers.3.feed_forward.w2",
            "noise_refiner.0.feed_forward.w1",
        ] {
            assert_eq!(q(quantized), Some(LinearPrecision::Nvfp4), "{quantized}");
        }
        for keep in [
            "all_x_embedder.2-1",
            "cap_embedder.1",
            "t_embedder.mlp.0",
            "t_embedder.mlp.2",
            "layers.0.adaLN_modulation.0",
            "all_final_layer.2-1.adaLN_modulation.1",
            "all_final_layer.2-1.linear",
        ] {
            assert_eq!(q(keep), None, "{keep}");
        }
        assert_eq!(
            amax_key("layers.1.attention.to_v"),
            "layers.1.attention.to_q"
        );
        assert_eq!(
            amax_key("layers.1.feed_forward.w3"),
            "layers.1.feed_forward.w1"
        );
    }
}
