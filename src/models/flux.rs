//! The Flux.1 transformer (dev with the guidance embedding, schnell without) as one ONNX graph, with weights taken
//! zero-copy from a safetensors checkpoint in either layout: Black Forest Labs' original (`double_blocks.*`,
//! `single_blocks.*`, `img_in`, `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`; optionally under a
//! prefix such as ComfyUI's `model.diffusion_model.`) or diffusers' `FluxTransformer2DModel` (`transformer_blocks.*`,
//! `single_transformer_blocks.*`, ...). Fused BFL projections (`qkv`, single-block `linear1`) stay fused: one GEMM
//! and a Split.
//!
//! ## Graph contract (inputs named as diffusers' `FluxTransformer2DModel.forward`, all float32)
//! - `hidden_states` [batch, img_seq, in_channels]: packed latents (2x2 patches of the 16-channel VAE latent, so
//!   in_channels = 64 and img_seq = (H/16)*(W/16) for an H x W image: any multiple of 16 through the dynamic axes);
//! - `encoder_hidden_states` [batch, txt_seq, 4096]: T5 output; `pooled_projections` [batch, 768]: CLIP pooled;
//! - `timestep` [batch]: **the flow-matching sigma in [0, 1]**, exactly what diffusers' pipeline passes
//!   (`timestep / 1000`); the graph multiplies by 1000 itself, as diffusers' forward does;
//! - `img_ids` [img_seq, 3], `txt_ids` [txt_seq, 3]: RoPE positions (2-D, diffusers' current form; txt_ids are zeros
//!   for Flux.1, img_ids are (0, row, col));
//! - `guidance` [batch] (dev only): the distilled guidance scale itself (e.g. 3.5); the graph multiplies by 1000.
//!
//! Output `sample` [batch, img_seq, out_channels] float32: the velocity prediction. Inside, the graph runs in the
//! chosen compute dtype (f32, f16 or bf16; quantized graphs keep f32 between their FP8/NVFP4 GEMMs); RMSNorm and
//! RoPE always run in f32.
//!
//! ## Precisions and names
//! Per-layer precision comes from a [`Policy`] ([`default_policy`]: ModelOpt-like, embedders, AdaLN modulation,
//! the final layer and norms stay high precision). Policy decisions and activation amax keys use **diffusers'
//! layer names for both layouts** (e.g. `transformer_blocks.3.attn.to_q`), so a calibration made on one layout
//! serves the other. A BFL fused projection is looked up under the name of its first diffusers part (`qkv` ->
//! `attn.to_q`, txt `qkv` -> `attn.add_q_proj`, `linear1` -> `single_transformer_blocks.N.attn.to_q`); projections
//! reading the same activation share one amax key ([`amax_key`]). With `calibration`, the graph gets one extra
//! float32 output `amax.<key>` per activation: the pipeline runs it on calibration prompts, takes maxima
//! ([`merge_amax`]) and passes the map to the FP8 export (static per-tensor scales amax/448) or NVFP4 export
//! (global activation scale amax/2688; block scales are dynamic).
use super::ops::Ops;
use crate::onnx::{Attr, DataType, Dim, SaveOptions, Value, proto::ModelProto, save};
use crate::quant::policy::{LayerKind, Policy};
use crate::quant::qdq::{LinearPrecision, LinearWeights, attention, linear, linear_nvfp4};
use crate::trt::shapes::ShapeRange;
use crate::weights::safetensors_file::{Checkpoint, Tensor};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Checkpoint naming scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Layout {
    /// Black Forest Labs' original names (`flux1-dev.safetensors`).
    Bfl,
    /// diffusers' `FluxTransformer2DModel`.
    Diffusers,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FluxConfig {
    /// Packed latent channels in (64 = 16 latent channels x 2x2 patch).
    pub in_channels: usize,
    pub out_channels: usize,
    pub hidden_size: usize,
    pub num_heads: usize,
    /// Double-stream blocks (19 for Flux.1).
    pub depth: usize,
    /// Single-stream blocks (38 for Flux.1).
    pub depth_single: usize,
    /// T5 hidden size (4096).
    pub context_dim: usize,
    /// CLIP pooled size (768).
    pub vec_dim: usize,
    /// MLP hidden size (4 x hidden_size).
    pub mlp_hidden: usize,
    /// RoPE dimensions per position axis; they sum to the head dimension.
    pub axes_dim: Vec<usize>,
    pub theta: f32,
    /// Flux.1-dev's distilled guidance embedding (`guidance` input); false for schnell.
    pub guidance_embed: bool,
}

impl FluxConfig {
    pub fn dev() -> Self {
        FluxConfig {
            in_channels: 64,
            out_channels: 64,
            hidden_size: 3072,
            num_heads: 24,
            depth: 19,
            depth_single: 38,
            context_dim: 4096,
            vec_dim: 768,
            mlp_hidden: 12288,
            axes_dim: vec![16, 56, 56],
            theta: 10000.0,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        FluxConfig {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Parameters of the full model (weights and biases).
    pub fn param_count(&self) -> u64 {
        let d = self.hidden_size as u64;
        let m = self.mlp_hidden as u64;
        let hd = self.head_dim() as u64;
        let lin = |i: u64, o: u64| i * o + o;
        let mlp_emb = |i: u64| lin(i, d) + lin(d, d);
        let double =
            2 * (lin(d, 6 * d) + lin(d, 3 * d) + 2 * hd + lin(d, d) + lin(d, m) + lin(m, d));
        let single = lin(d, 3 * d + m) + lin(d + m, d) + 2 * hd + lin(d, 3 * d);
        lin(self.in_channels as u64, d)
            + lin(self.context_dim as u64, d)
            + mlp_emb(256)
            + mlp_emb(self.vec_dim as u64)
            + if self.guidance_embed { mlp_emb(256) } else { 0 }
            + self.depth as u64 * double
            + self.depth_single as u64 * single
            + lin(d, 2 * d)
            + lin(d, self.out_channels as u64)
    }

    /// Reads the architecture off the tensor shapes of a checkpoint in either layout (block counts, widths,
    /// guidance). RoPE axes are not in the weights: a diffusers `config.json` beside the checkpoint
    /// (`axes_dims_rope`) is read when present, else Flux.1's [16, 56, 56] is used when the head dimension is 128.
    pub fn from_checkpoint(ck: &Checkpoint) -> Result<(Self, Layout, String)> {
        Self::from_checkpoint_with_axes(ck, None)
    }

    /// [`FluxConfig::from_checkpoint`] with the RoPE axes given (for checkpoints of other head dimensions).
    pub fn from_checkpoint_with_axes(
        ck: &Checkpoint,
        axes: Option<Vec<usize>>,
    ) -> Result<(Self, Layout, String)> {
        let (layout, prefix) = detect_layout(ck)?;
        let n = Names {
            layout,
            prefix: prefix.clone(),
        };
        let shape = |name: &str| -> Result<Vec<usize>> {
            ck.shape(&n.p(name)).map(|s| s.to_vec()).with_context(|| {
                format!(
                    "checkpoint '{}' has no tensor '{}'",
                    ck.path.display(),
                    n.p(name)
                )
            })
        };
        let count = |pre: &str| {
            let pre = format!("{prefix}{pre}.");
            let mut max = None;
            for k in ck.names() {
                if let Some(rest) = k.strip_prefix(&pre)
                    && let Some(i) = rest.split('.').next().and_then(|s| s.parse::<usize>().ok())
                {
                    max = Some(max.map_or(i, |m: usize| m.max(i)));
                }
            }
            max.map_or(0, |m| m + 1)
        };
        let (img_in, txt_in, vec_in, mlp0, qn, final_lin, guid) = match layout {
            Layout::Bfl => (
                "img_in.weight",
                "txt_in.weight",
                "vector_in.in_layer.weight",
                "double_blocks.0.img_mlp.0.weight",
                "double_blocks.0.img_attn.norm.query_norm.scale",
                "final_layer.linear.weight",
                "guidance_in.in_layer.weight",
            ),
            Layout::Diffusers => (
                "x_embedder.weight",
                "context_embedder.weight",
                "time_text_embed.text_embedder.linear_1.weight",
                "transformer_blocks.0.ff.net.0.proj.weight",
                "transformer_blocks.0.attn.norm_q.weight",
                "proj_out.weight",
                "time_text_embed.guidance_embedder.linear_1.weight",
            ),
        };
        let (blocks, singles) = match layout {
            Layout::Bfl => ("double_blocks", "single_blocks"),
            Layout::Diffusers => ("transformer_blocks", "single_transformer_blocks"),
        };
        let img = shape(img_in)?;
        let hd = shape(qn)?[0];
        let hidden = img[0];
        if hd == 0 || hidden % hd != 0 {
            bail!(
                "checkpoint '{}': hidden size {hidden} is not a multiple of the head dimension {hd}",
                ck.path.display()
            );
        }
        let axes_dim = match axes
            .map(Ok)
            .or_else(|| read_axes(&ck.path).transpose())
            .transpose()?
        {
            Some(a) => a,
            None if hd == 128 => vec![16, 56, 56],
            None => bail!(
                "checkpoint '{}': head dimension {hd} is not Flux.1's 128 and no config.json with axes_dims_rope \
                 is beside it; add the diffusers config.json or set FluxConfig::axes_dim",
                ck.path.display()
            ),
        };
        let cfg = FluxConfig {
            in_channels: img[1],
            out_channels: shape(final_lin)?[0],
            hidden_size: hidden,
            num_heads: hidden / hd,
            depth: count(blocks),
            depth_single: count(singles),
            context_dim: shape(txt_in)?[1],
            vec_dim: shape(vec_in)?[1],
            mlp_hidden: shape(mlp0)?[0],
            axes_dim,
            theta: 10000.0,
            guidance_embed: ck.contains(&n.p(guid)),
        };
        cfg.check()?;
        Ok((cfg, layout, prefix))
    }

    fn check(&self) -> Result<()> {
        let hd = self.head_dim();
        if self.axes_dim.iter().sum::<usize>() != hd || self.axes_dim.iter().any(|d| d % 2 != 0) {
            bail!(
                "RoPE axes {:?} must be even and sum to the head dimension {hd}",
                self.axes_dim
            );
        }
        if self.depth == 0 && self.depth_single == 0 {
            bail!("the checkpoint has no transformer blocks");
        }
        Ok(())
    }

    /// Reads `axes_dims_rope` and `guidance_embeds` etc. from a diffusers `config.json` text.
    pub fn axes_from_diffusers_config(json: &str) -> Result<Vec<usize>> {
        let v: serde_json::Value = serde_json::from_str(json).context("config.json is not JSON")?;
        let a = v
            .get("axes_dims_rope")
            .and_then(|a| a.as_array())
            .context("config.json has no axes_dims_rope list")?;
        a.iter()
            .map(|x| {
                x.as_u64()
                    .map(|x| x as usize)
                    .context("axes_dims_rope holds a non-integer")
            })
            .collect()
    }
}

fn read_axes(path: &Path) -> Result<Option<Vec<usize>>> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let cfg = dir.join("config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&cfg)
        .with_context(|| format!("cannot read '{}'", cfg.display()))?;
    if !text.contains("axes_dims_rope") {
        return Ok(None);
    }
    FluxConfig::axes_from_diffusers_config(&text)
        .map(Some)
        .with_context(|| format!("'{}'", cfg.display()))
}

fn detect_layout(ck: &Checkpoint) -> Result<(Layout, String)> {
    for (suffix, layout) in [
        ("double_blocks.0.img_attn.qkv.weight", Layout::Bfl),
        ("img_in.weight", Layout::Bfl),
        ("x_embedder.weight", Layout::Diffusers),
    ] {
        if let Some(k) = ck.names().find(|k| k.ends_with(suffix)) {
            let prefix = &k[..k.len() - suffix.len()];
            if prefix.is_empty() || prefix.ends_with('.') {
                return Ok((layout, prefix.to_string()));
            }
        }
    }
    bail!(
        "'{}' is not a Flux transformer checkpoint: it has neither BFL names (img_in, double_blocks.*) nor diffusers \
         names (x_embedder, transformer_blocks.*); for diffusers folders point at transformer/",
        ck.path.display()
    )
}

struct Names {
    layout: Layout,
    prefix: String,
}
impl Names {
    fn p(&self, s: &str) -> String {
        format!("{}{s}", self.prefix)
    }
}

/// Every tensor of a checkpoint of `cfg` in the BFL layout, with its shape, in file order (for synthetic
/// checkpoints in tests and benchmarks).
pub fn bfl_tensor_shapes(cfg: &FluxConfig) -> Vec<(String, Vec<usize>)> {
    let (d, m, hd) = (cfg.hidden_size, cfg.mlp_hidden, cfg.head_dim());
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut lin = |name: String, i: usize, o: usize| {
        v.push((format!("{name}.weight"), vec![o, i]));
        v.push((format!("{name}.bias"), vec![o]));
    };
    lin("img_in".into(), cfg.in_channels, d);
    lin("txt_in".into(), cfg.context_dim, d);
    for (e, i) in [
        ("time_in", 256),
        ("vector_in", cfg.vec_dim),
        ("guidance_in", 256),
    ] {
        if e == "guidance_in" && !cfg.guidance_embed {
            continue;
        }
        lin(format!("{e}.in_layer"), i, d);
        lin(format!("{e}.out_layer"), d, d);
    }
    for b in 0..cfg.depth {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{b}.{s}");
            lin(format!("{p}_mod.lin"), d, 6 * d);
            lin(format!("{p}_attn.qkv"), d, 3 * d);
            lin(format!("{p}_attn.proj"), d, d);
            lin(format!("{p}_mlp.0"), d, m);
            lin(format!("{p}_mlp.2"), m, d);
        }
    }
    for b in 0..cfg.depth_single {
        let p = format!("single_blocks.{b}");
        lin(format!("{p}.linear1"), d, 3 * d + m);
        lin(format!("{p}.linear2"), d + m, d);
        lin(format!("{p}.modulation.lin"), d, 3 * d);
    }
    lin("final_layer.adaLN_modulation.1".into(), d, 2 * d);
    lin("final_layer.linear".into(), d, cfg.out_channels);
    for b in 0..cfg.depth {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                v.push((
                    format!("double_blocks.{b}.{s}_attn.norm.{n}.scale"),
                    vec![hd],
                ));
            }
        }
    }
    for b in 0..cfg.depth_single {
        for n in ["query_norm", "key_norm"] {
            v.push((format!("single_blocks.{b}.norm.{n}.scale"), vec![hd]));
        }
    }
    v
}

/// What the graph computes in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FluxPrecision {
    F32,
    F16,
    Bf16,
    /// FP8 E4M3 GEMMs with static per-tensor activation scales (needs an amax map).
    Fp8,
    /// NVFP4 GEMMs: FP4 weights, dynamically quantized FP4 activations.
    Nvfp4,
}

impl FluxPrecision {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "fp32" | "f32" => Self::F32,
            "fp16" | "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "fp8" => Self::Fp8,
            "nvfp4" => Self::Nvfp4,
            other => bail!("unknown Flux precision '{other}': use fp32, fp16, bf16, fp8 or nvfp4"),
        })
    }

    fn compute(self) -> DataType {
        match self {
            Self::F16 => DataType::FLOAT16,
            Self::Bf16 => DataType::BFLOAT16,
            _ => DataType::FLOAT,
        }
    }

    fn target(self) -> Option<LinearPrecision> {
        match self {
            Self::Fp8 => Some(LinearPrecision::Fp8),
            Self::Nvfp4 => Some(LinearPrecision::Nvfp4),
            _ => None,
        }
    }
}

/// ModelOpt/NVIDIA-demo-like defaults for Flux: [`Policy::defaults`] (embedders, norms incl. the AdaLN
/// modulation `norm*.linear`, `norm_out`, the final `proj_out` stay high precision), except that the single
/// blocks' own output projection (`single_transformer_blocks.N.proj_out`, BFL `linear2`) is quantized.
pub fn default_policy(target: LinearPrecision) -> Policy {
    Policy::defaults(target)
        .with_overrides(&["single_transformer_blocks.*.proj_out".into()], &[])
        .expect("valid globs")
}

pub struct ExportOptions {
    pub precision: FluxPrecision,
    /// None: [`default_policy`] for quantized precisions.
    pub policy: Option<Policy>,
    /// Calibrated activation absolute maxima by [`amax_key`] (required for FP8; optional for NVFP4).
    pub amax: HashMap<String, f32>,
    /// NVFP4 activation amax for layers missing from `amax` (sets the global scale; block scales stay dynamic).
    pub nvfp4_default_amax: f32,
    /// Compute dtype of FP8/NVFP4 graphs outside their quantized GEMMs: FLOAT (default), FLOAT16 or BFLOAT16
    /// (as NVIDIA's demos run them; each quantized GEMM then reads and writes through a Cast to/from f32).
    pub quantized_compute: DataType,
    /// Adds an `amax.<key>` output per linear-layer input activation (use with F32 for calibration runs).
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

/// The amax key (a diffusers layer name) under which a layer's input activation is calibrated: projections that
/// read the same activation share the first one's name.
pub fn amax_key(layer: &str) -> String {
    for (from, to) in [
        ("attn.to_k", "attn.to_q"),
        ("attn.to_v", "attn.to_q"),
        ("attn.add_k_proj", "attn.add_q_proj"),
        ("attn.add_v_proj", "attn.add_q_proj"),
    ] {
        if let Some(base) = layer.strip_suffix(from) {
            return format!("{base}{to}");
        }
    }
    if let Some(base) = layer.strip_suffix("proj_mlp")
        && base.starts_with("single_transformer_blocks.")
    {
        return format!("{base}attn.to_q");
    }
    layer.to_string()
}

/// Folds a calibration run's outputs (`amax.<key>` scalars) into `map`, keeping the maximum per key.
pub fn merge_amax(
    map: &mut HashMap<String, f32>,
    outputs: &[(String, crate::backend::HostTensor)],
) {
    for (name, t) in outputs {
        if let Some(key) = name.strip_prefix("amax.")
            && let Some(v) = t.to_f64()
        {
            let m = v.iter().fold(0f64, |a, b| a.max(b.abs())) as f32;
            let e = map.entry(key.to_string()).or_insert(0.0);
            *e = e.max(m);
        }
    }
}

/// What an export wrote.
#[derive(Clone, Debug)]
pub struct ExportReport {
    pub onnx: PathBuf,
    /// Bytes of the .onnx file plus its external data.
    pub bytes: u64,
    pub layout: Layout,
    pub config: FluxConfig,
    /// Linear layers by precision name ("nvfp4", "fp8", "kept").
    pub layers: HashMap<String, usize>,
}

struct Emitter<'a> {
    o: Ops,
    cfg: &'a FluxConfig,
    ck: &'a Checkpoint,
    n: Names,
    opts: &'a ExportOptions,
    policy: Option<Policy>,
    layers: HashMap<String, usize>,
    /// Calibration outputs already added, by key.
    calibrated: std::collections::HashSet<String>,
    /// Release checkpoint pages after use (streaming exports).
    release: bool,
}

const EPS: f32 = 1e-6;

impl Emitter<'_> {
    fn t(&self, name: &str) -> Result<Tensor> {
        self.ck.get(&self.n.p(name))
    }

    fn done(&self, name: &str) {
        if self.release {
            self.ck.release(&self.n.p(name));
        }
    }

    /// A linear layer stored under checkpoint base name `base`, decided and calibrated as diffusers layer `canon`.
    fn linear(&mut self, x: &Value, base: &str, canon: &str) -> Result<Value> {
        let w = self.t(&format!("{base}.weight"))?;
        let bname = format!("{base}.bias");
        let b = if self.ck.contains(&self.n.p(&bname)) {
            Some(self.t(&bname)?)
        } else {
            None
        };
        let key = amax_key(canon);
        if self.opts.calibration && self.calibrated.insert(key.clone()) {
            let xf = self
                .o
                .cast(&format!("amax/{key}/f32"), x, DataType::FLOAT)?;
            let a = self
                .o
                .same("Abs", &format!("amax/{key}/abs"), &[&xf], vec![])?;
            let mut m = self.o.g.op(
                "ReduceMax",
                &format!("amax.{key}"),
                &[&a],
                vec![("keepdims", Attr::Int(0))],
                DataType::FLOAT,
                vec![],
            )?;
            m.shape = vec![];
            self.o.g.output(&m);
        }
        let decision = self
            .policy
            .as_ref()
            .and_then(|p| p.decide(canon, LayerKind::Linear));
        let name = self.n.p(base);
        let (n, k) = (w.shape[0], w.shape.get(1).copied().unwrap_or(0));
        let y = match decision {
            Some(p)
                if p != LinearPrecision::F32 && (p != LinearPrecision::Nvfp4 || k % 16 == 0) =>
            {
                let amax = match (self.opts.amax.get(&key), p) {
                    (Some(a), _) => *a,
                    (None, LinearPrecision::Nvfp4) => self.opts.nvfp4_default_amax,
                    (None, _) => bail!(
                        "no calibrated activation amax for layer '{key}' ({} export needs static scales): run the \
                         calibration graph (ExportOptions::calibration) over calibration prompts and pass its \
                         merged amax map",
                        p.name()
                    ),
                };
                let bf = b.as_ref().map(|b| b.to_f32()).transpose()?;
                *self.layers.entry(p.name()).or_default() += 1;
                // The Q/DQ patterns take f32 activations; other compute types cast around them.
                let dt = self.o.dtype;
                let xq = self.o.cast(&format!("{name}/in_f32"), x, DataType::FLOAT)?;
                let x = &xq;
                let y = if p == LinearPrecision::Nvfp4 {
                    // Quantized straight from the mapped checkpoint in its own element type: no f32 copy.
                    let g = &mut self.o.g;
                    let d = &w.data[..];
                    let aligned = |align: usize| (d.as_ptr() as usize).is_multiple_of(align);
                    match w.dtype {
                        DataType::BFLOAT16 if aligned(2) => {
                            let v: &[half::bf16] = bytemuck::cast_slice(d);
                            linear_nvfp4(g, &name, x, v, bf.as_deref(), n, k, amax)?
                        }
                        DataType::FLOAT16 if aligned(2) => {
                            let v: &[half::f16] = bytemuck::cast_slice(d);
                            linear_nvfp4(g, &name, x, v, bf.as_deref(), n, k, amax)?
                        }
                        _ => {
                            let wf = w.to_f32()?;
                            linear_nvfp4(g, &name, x, &wf, bf.as_deref(), n, k, amax)?
                        }
                    }
                } else {
                    let wf = w.to_f32()?;
                    let lw = LinearWeights {
                        weight: &wf,
                        bias: bf.as_deref(),
                        out_features: n,
                        in_features: k,
                    };
                    linear(&mut self.o.g, &name, x, &lw, p, amax)?
                };
                self.o.cast(&format!("{name}/out"), &y, dt)?
            }
            _ => {
                *self.layers.entry("kept".into()).or_default() += 1;
                self.o.linear(&name, x, &w, b.as_ref())?
            }
        };
        self.done(&format!("{base}.weight"));
        self.done(&bname);
        Ok(y)
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
        let half = 128usize;
        let freqs: Vec<f32> = (0..half)
            .map(|j| ((-(10000f32.ln())) * j as f32 / half as f32).exp())
            .collect();
        let k = self
            .o
            .constant_f32(&format!("{name}.x1000"), &[], &[1000.0])?;
        let t = self
            .o
            .same("Mul", &format!("{name}/x1000"), &[t, &k], vec![])?;
        let ax = self.o.i64s(&format!("{name}.ax"), &[1])?;
        let t = self
            .o
            .same("Unsqueeze", &format!("{name}/col"), &[&t, &ax], vec![])?;
        let f = self
            .o
            .constant_f32(&format!("{name}.freqs"), &[1, half as i64], &freqs)?;
        let a = self
            .o
            .same("Mul", &format!("{name}/args"), &[&t, &f], vec![])?;
        let c = self.o.same("Cos", &format!("{name}/cos"), &[&a], vec![])?;
        let s = self.o.same("Sin", &format!("{name}/sin"), &[&a], vec![])?;
        let mut e = self.o.same(
            "Concat",
            &format!("{name}/emb"),
            &[&c, &s],
            vec![("axis", Attr::Int(-1))],
        )?;
        e.shape = vec![batch(), Dim::Fixed(256)];
        let dt = self.o.dtype;
        self.o.cast(&format!("{name}/cast"), &e, dt)
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
        let xf = self.o.cast(&format!("{name}/f32"), x, DataType::FLOAT)?;
        let s = self
            .o
            .i64s(&format!("{name}.pairs"), &[0, 0, 0, hd / 2, 2])?;
        let xp = self
            .o
            .same("Reshape", &format!("{name}/pairs"), &[&xf, &s], vec![])?;
        let parts = {
            let mut sh = x.shape.clone();
            sh[3] = Dim::Fixed(hd / 2);
            sh.push(Dim::Fixed(1));
            let sz = self.o.i64s(&format!("{name}.split"), &[1, 1])?;
            self.o.g.node(
                "Split",
                &format!("{name}/split"),
                &[&xp, &sz],
                vec![("axis", Attr::Int(-1))],
                vec![(DataType::FLOAT, sh.clone()), (DataType::FLOAT, sh)],
            )?
        };
        let (x0, x1) = (&parts[0], &parts[1]);
        let (c, sn) = (&pe.0, &pe.1);
        let a = self
            .o
            .same("Mul", &format!("{name}/x0c"), &[x0, c], vec![])?;
        let b = self
            .o
            .same("Mul", &format!("{name}/x1s"), &[x1, sn], vec![])?;
        let r0 = self
            .o
            .same("Sub", &format!("{name}/r0"), &[&a, &b], vec![])?;
        let a = self
            .o
            .same("Mul", &format!("{name}/x1c"), &[x1, c], vec![])?;
        let b = self
            .o
            .same("Mul", &format!("{name}/x0s"), &[x0, sn], vec![])?;
        let r1 = self
            .o
            .same("Add", &format!("{name}/r1"), &[&a, &b], vec![])?;
        let cat = self.o.same(
            "Concat",
            &format!("{name}/cat"),
            &[&r0, &r1],
            vec![("axis", Attr::Int(-1))],
        )?;
        let s = self.o.i64s(&format!("{name}.unpairs"), &[0, 0, 0, hd])?;
        let mut y = self
            .o
            .same("Reshape", &format!("{name}/unpairs"), &[&cat, &s], vec![])?;
        y.shape = x.shape.clone();
        let dt = x.dtype;
        self.o.cast(&format!("{name}/back"), &y, dt)
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

/// RoPE frequency matrix [3, hd/2]: column j of axis a holds theta^(-2j'/d_a) in row a, zero elsewhere, so that
/// `ids @ F` gives every angle in one exact product (sums of zeros add nothing).
fn rope_freqs(cfg: &FluxConfig) -> Vec<f32> {
    let half = cfg.head_dim() / 2;
    let mut f = vec![0f32; cfg.axes_dim.len() * half];
    let mut col = 0;
    for (a, &d) in cfg.axes_dim.iter().enumerate() {
        for j in 0..d / 2 {
            f[a * half + col] = (1.0 / (cfg.theta as f64).powf((2 * j) as f64 / d as f64)) as f32;
            col += 1;
        }
    }
    f
}

/// Builds the transformer graph. With `stream_to` (the .onnx path), weights go to its external data file as they
/// are emitted and the checkpoint's pages are released after use; commit the returned sink before saving.
fn emit(
    ck: &Checkpoint,
    cfg: &FluxConfig,
    layout: Layout,
    prefix: &str,
    opts: &ExportOptions,
    stream_to: Option<&Path>,
) -> Result<(
    ModelProto,
    Option<crate::onnx::builder::ExternalSink>,
    HashMap<String, usize>,
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
        opts,
        policy,
        layers: HashMap::new(),
        calibrated: Default::default(),
        release: stream_to.is_some(),
    };
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
    let hs = e.o.cast("hidden_states/cast", &hs, dt)?;
    let ehs = e.o.cast("encoder_hidden_states/cast", &ehs, dt)?;
    let pooled = e.o.cast("pooled_projections/cast", &pooled, dt)?;

    let bl = layout == Layout::Bfl;
    let mut img = e.linear(&hs, if bl { "img_in" } else { "x_embedder" }, "x_embedder")?;
    let mut txt = e.linear(
        &ehs,
        if bl { "txt_in" } else { "context_embedder" },
        "context_embedder",
    )?;

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
    let half = cfg.head_dim() / 2;
    let fm = e.o.constant_f32(
        "rope.freqs",
        &[cfg.axes_dim.len() as i64, half as i64],
        &rope_freqs(cfg),
    )?;
    if cfg.axes_dim.len() != 3 {
        bail!(
            "Flux positions have 3 axes; the config lists {}",
            cfg.axes_dim.len()
        );
    }
    let ang = e.o.g.op(
        "MatMul",
        "rope/angles",
        &[&ids, &fm],
        vec![],
        f32t,
        vec![seq(), Dim::Fixed(half as i64)],
    )?;
    let ax = e.o.i64s("rope.last", &[-1])?;
    let cos =
        e.o.g
            .op("Cos", "rope/cos", &[&ang], vec![], f32t, ang.shape.clone())?;
    let sin =
        e.o.g
            .op("Sin", "rope/sin", &[&ang], vec![], f32t, ang.shape.clone())?;
    let cos = e.o.g.op(
        "Unsqueeze",
        "rope/cos_pair",
        &[&cos, &ax],
        vec![],
        f32t,
        vec![],
    )?;
    let sin = e.o.g.op(
        "Unsqueeze",
        "rope/sin_pair",
        &[&sin, &ax],
        vec![],
        f32t,
        vec![],
    )?;
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
    let prefetch = |name: String| {
        if stream_to.is_some() {
            ck.prefetch_prefix(&format!("{prefix}{name}"));
        }
    };
    prefetch(format!("{dpre}.0."));
    for i in 0..cfg.depth {
        prefetch(if i + 1 < cfg.depth {
            format!("{dpre}.{}.", i + 1)
        } else {
            format!("{spre}.0.")
        });
        (img, txt) = e.double_block(i, &img, &txt, &vec_silu, &pe, &txt_len)?;
    }
    let mut x = e.o.same(
        "Concat",
        "single/joint",
        &[&txt, &img],
        vec![("axis", Attr::Int(1))],
    )?;
    x.shape = vec![batch(), seq(), Dim::Fixed(d as i64)];
    for i in 0..cfg.depth_single {
        if i + 1 < cfg.depth_single {
            prefetch(format!("{spre}.{}.", i + 1));
        } else {
            prefetch(
                if layout == Layout::Bfl {
                    "final_layer."
                } else {
                    "norm_out."
                }
                .into(),
            );
            prefetch(
                if layout == Layout::Bfl {
                    "final_layer."
                } else {
                    "proj_out."
                }
                .into(),
            );
        }
        x = e.single_block(i, &x, &vec_silu, &pe)?;
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
    let layers = e.layers;
    let (model, sink) = e.o.g.finish_streamed();
    Ok((model, sink, layers))
}

/// The transformer graph in memory (weights inline): for tests and small models.
pub fn graph(ck: &Checkpoint, cfg: &FluxConfig, opts: &ExportOptions) -> Result<ModelProto> {
    let (layout, prefix) = detect_layout(ck)?;
    Ok(emit(ck, cfg, layout, &prefix, opts, None)?.0)
}

/// Exports the transformer of checkpoint `ck` (either layout) with `cfg` to `out` (an .onnx path; weights stream
/// to `<out>.data` beside it, both written under temporary names and renamed when complete). Peak memory stays
/// around the largest single tensor (in f32, when it is quantized), whatever the model size.
pub fn export_with(
    ck: &Checkpoint,
    cfg: &FluxConfig,
    opts: &ExportOptions,
    out: &Path,
) -> Result<ExportReport> {
    let (layout, prefix) = detect_layout(ck)?;
    let (model, sink, layers) = emit(ck, cfg, layout, &prefix, opts, Some(out))?;
    let data_bytes = match sink {
        Some(s) => s.commit()?,
        None => 0,
    };
    let bytes = match save(
        model,
        out,
        &SaveOptions {
            external_threshold: None,
        },
    ) {
        Ok(b) => b,
        Err(err) => {
            let _ = std::fs::remove_file(out.with_file_name(format!(
                "{}.data",
                out.file_name().unwrap_or_default().to_string_lossy()
            )));
            return Err(err);
        }
    };
    Ok(ExportReport {
        onnx: out.to_path_buf(),
        bytes: bytes + data_bytes,
        layout,
        config: cfg.clone(),
        layers,
    })
}

/// Opens `checkpoint` (a file or a folder of shards), reads its config off the weights
/// ([`FluxConfig::from_checkpoint`]) and exports to `out_dir/transformer.onnx`. Returns the .onnx path.
pub fn export(checkpoint: &Path, opts: &ExportOptions, out_dir: &Path) -> Result<PathBuf> {
    let ck = Checkpoint::open(checkpoint)?;
    let (cfg, _, _) = FluxConfig::from_checkpoint(&ck)?;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create '{}'", out_dir.display()))?;
    let out = out_dir.join("transformer.onnx");
    export_with(&ck, &cfg, opts, &out)?;
    Ok(out)
}

/// TensorRT optimization-profile ranges for the transformer inputs: batch min/opt/max, image sizes in pixels
/// (min, opt, max; each side a multiple of 16, square here: width = height) and the T5 sequence length.
pub fn profile(
    cfg: &FluxConfig,
    batch: [i64; 3],
    image_px: [i64; 3],
    txt_len: i64,
) -> Result<Vec<ShapeRange>> {
    if image_px.iter().any(|p| *p <= 0 || p % 16 != 0) {
        bail!("image sizes {image_px:?} must be positive multiples of 16");
    }
    let tokens = image_px.map(|p| (p / 16) * (p / 16));
    let r = |name: &str, f: &dyn Fn(usize) -> Vec<i64>| ShapeRange {
        name: name.into(),
        min: f(0),
        opt: f(1),
        max: f(2),
    };
    let (ic, cd, vd) = (
        cfg.in_channels as i64,
        cfg.context_dim as i64,
        cfg.vec_dim as i64,
    );
    let mut v = vec![
        r("hidden_states", &|i| vec![batch[i], tokens[i], ic]),
        r("encoder_hidden_states", &|i| vec![batch[i], txt_len, cd]),
        r("pooled_projections", &|i| vec![batch[i], vd]),
        r("timestep", &|i| vec![batch[i]]),
        r("img_ids", &|i| vec![tokens[i], 3]),
        r("txt_ids", &|_| vec![txt_len, 3]),
    ];
    if cfg.guidance_embed {
        v.push(r("guidance", &|i| vec![batch[i]]));
    }
    Ok(v)
}

/// The graph's input names, in order.
pub fn input_names(cfg: &FluxConfig) -> Vec<&'static str> {
    let mut v = vec![
        "hidden_states",
        "encoder_hidden_states",
        "pooled_projections",
        "timestep",
        "img_ids",
        "txt_ids",
    ];
    if cfg.guidance_embed {
        v.push("guidance");
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_size_counts_match_flux1() {
        // 11.9B parameters for dev (guidance embedding included), as published.
        let n = FluxConfig::dev().param_count();
        assert!((11_850_000_000..11_950_000_000).contains(&n), "{n}");
        assert!(FluxConfig::schnell().param_count() < n);
    }

    #[test]
    fn bfl_shapes_cover_every_parameter() {
        for cfg in [FluxConfig::dev(), FluxConfig::schnell()] {
            let n: u64 = bfl_tensor_shapes(&cfg)
                .iter()
                .map(|(_, s)| s.iter().product::<usize>() as u64)
                .sum();
            assert_eq!(n, cfg.param_count());
        }
    }

    #[test]
    fn amax_keys_share_inputs() {
        assert_eq!(
            amax_key("transformer_blocks.0.attn.to_v"),
            "transformer_blocks.0.attn.to_q"
        );
        assert_eq!(
            amax_key("transformer_blocks.0.attn.add_k_proj"),
            "transformer_blocks.0.attn.add_q_proj"
        );
        assert_eq!(
            amax_key("single_transformer_blocks.3.proj_mlp"),
            "single_transformer_blocks.3.attn.to_q"
        );
        assert_eq!(
            amax_key("single_transformer_blocks.3.proj_out"),
            "single_transformer_blocks.3.proj_out"
        );
    }

    #[test]
    fn default_policy_keeps_embedders_modulation_and_final_layer() {
        let p = default_policy(LinearPrecision::Nvfp4);
        let q = |n: &str| p.decide(n, LayerKind::Linear);
        assert_eq!(
            q("transformer_blocks.0.attn.to_q"),
            Some(LinearPrecision::Nvfp4)
        );
        assert_eq!(
            q("single_transformer_blocks.5.proj_out"),
            Some(LinearPrecision::Nvfp4)
        );
        for keep in [
            "x_embedder",
            "context_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "transformer_blocks.0.norm1.linear",
            "single_transformer_blocks.0.norm.linear",
            "norm_out.linear",
            "proj_out",
        ] {
            assert_eq!(q(keep), None, "{keep}");
        }
    }
}
