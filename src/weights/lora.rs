//! LoRA files as people have them, parsed into weight deltas, and the tables that put each delta on a model's
//! weight tensors.
//!
//! ## Formats (recognised by key, any mix in one file)
//! - kohya sd-scripts: `lora_unet_<module with '_'>.lora_down.weight` / `.lora_up.weight` / `.alpha`, text encoders
//!   `lora_te1_*` / `lora_te2_*` (`lora_te_*` for a single one); kohya keys with diffusers names
//!   (`lora_transformer_*`);
//! - diffusers / PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, `unet.*`, `text_encoder.*`,
//!   `text_encoder_2.*`, or bare module names (a PEFT adapter file of one model);
//! - BFL / ComfyUI / ai-toolkit: `diffusion_model.<module>.lora_down|lora_A...`, ComfyUI text encoders
//!   `text_encoders.clip_l.transformer.*` / `text_encoders.t5xxl.transformer.*`;
//! - LyCORIS LoHa (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`, `hada_w2_b`) and LoKr (`lokr_w1` or `lokr_w1_a/b`,
//!   `lokr_w2` or `lokr_w2_a/b`), whose merged delta is a plain matrix; full deltas (`.diff`, `.diff_b`).
//!
//! DoRA (`dora_scale`) and Tucker-decomposed convolutions (`lora_mid`, `hada_t1`, `lokr_t2`) are not plain
//! deltas: they are refused with the key named.
//!
//! ## Scale
//! `delta = strength * alpha / rank * up @ down` (alpha defaults to the rank: scale 1, as PEFT without metadata);
//! LoHa `strength * alpha / rank * (w1a @ w1b) ⊙ (w2a @ w2b)`; LoKr `strength * s * kron(w1, w2)` with
//! `s = alpha / rank` of its low-rank factor (w2's if both are), 1 when both are full (LyCORIS, ComfyUI).
//!
//! ## Where deltas go
//! A file's modules are named in some family's naming; a model's weights in another (Flux: BFL names with fused
//! q/k/v, or diffusers names). Each family builds an [`AddressBook`] for its model: for every module name a LoRA
//! may use (compared with '.' and '_' equal, as kohya writes them), the weight tensors and rows it lands on
//! ([`Piece`]). A fused weight (BFL `qkv`) is several pieces of one tensor; a diffusers `to_q` delta in a BFL model
//! lands on the first third of `qkv`'s rows, and a BFL `qkv` delta in a diffusers model is split over `to_q`,
//! `to_k`, `to_v`. Text encoders use the book of their own tensor names ([`AddressBook::from_names`]).
use super::safetensors_file::{Checkpoint, Tensor};
use crate::onnx::DataType;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The model part a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// The denoiser: Flux transformer, SD UNet.
    Denoiser,
    /// Text encoder by index: 0 is CLIP-L (`lora_te1_`, `text_encoder.`), 1 the second one (Flux's T5, SDXL's
    /// OpenCLIP bigG: `lora_te2_`, `text_encoder_2.`).
    TextEncoder(usize),
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Part::Denoiser => write!(f, "denoiser"),
            Part::TextEncoder(i) => write!(f, "text encoder {}", i + 1),
        }
    }
}

/// Key prefixes of the formats and the part each addresses, longest first where one starts another.
pub const PREFIXES: &[(&str, Part)] = &[
    ("lora_unet_", Part::Denoiser),
    ("lora_transformer_", Part::Denoiser),
    ("model.diffusion_model.", Part::Denoiser),
    ("diffusion_model.", Part::Denoiser),
    ("base_model.model.", Part::Denoiser),
    ("transformer.", Part::Denoiser),
    ("unet.", Part::Denoiser),
    ("lora_te1_", Part::TextEncoder(0)),
    ("lora_te2_", Part::TextEncoder(1)),
    ("lora_te_", Part::TextEncoder(0)),
    ("text_encoders.clip_l.transformer.", Part::TextEncoder(0)),
    ("text_encoders.t5xxl.transformer.", Part::TextEncoder(1)),
    ("text_encoder_2.", Part::TextEncoder(1)),
    ("text_encoder.", Part::TextEncoder(0)),
];

/// What one key of a module holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Factor {
    Down,
    Up,
    Alpha,
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    Diff,
    DiffBias,
    /// Keys trt-diff recognises and cannot merge as a plain delta.
    Unsupported(&'static str),
}

/// Key suffixes and what they hold (longest first where one ends another).
const SUFFIXES: &[(&str, Factor)] = &[
    (".lora_down.weight", Factor::Down),
    (".lora_up.weight", Factor::Up),
    (".lora_A.default.weight", Factor::Down),
    (".lora_B.default.weight", Factor::Up),
    (".lora_A.weight", Factor::Down),
    (".lora_B.weight", Factor::Up),
    (".lora.down.weight", Factor::Down),
    (".lora.up.weight", Factor::Up),
    (".alpha", Factor::Alpha),
    (".hada_w1_a", Factor::HadaW1A),
    (".hada_w1_b", Factor::HadaW1B),
    (".hada_w2_a", Factor::HadaW2A),
    (".hada_w2_b", Factor::HadaW2B),
    (".lokr_w1_a", Factor::LokrW1A),
    (".lokr_w1_b", Factor::LokrW1B),
    (".lokr_w2_a", Factor::LokrW2A),
    (".lokr_w2_b", Factor::LokrW2B),
    (".lokr_w1", Factor::LokrW1),
    (".lokr_w2", Factor::LokrW2),
    (".diff_b", Factor::DiffBias),
    (".diff", Factor::Diff),
    (
        ".dora_scale",
        Factor::Unsupported("DoRA (weight-decomposed) scales"),
    ),
    (
        ".lora_magnitude_vector",
        Factor::Unsupported("DoRA (weight-decomposed) magnitudes"),
    ),
    (
        ".lora_mid.weight",
        Factor::Unsupported("LoCon Tucker cores (lora_mid)"),
    ),
    (
        ".hada_t1",
        Factor::Unsupported("LoHa Tucker cores (hada_t1)"),
    ),
    (
        ".hada_t2",
        Factor::Unsupported("LoHa Tucker cores (hada_t2)"),
    ),
    (
        ".lokr_t2",
        Factor::Unsupported("LoKr Tucker cores (lokr_t2)"),
    ),
];

/// A row-major f32 matrix.
#[derive(Clone, Debug)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// A checkpoint tensor as a matrix: [out, in], or a convolution [out, in, kh, kw] as [out, in * kh * kw]
    /// (LoCon's down factor of a 3x3 convolution; a 1x1 one's up factor is [out, rank, 1, 1]).
    fn from_tensor(t: &Tensor, file: &Path) -> Result<Self> {
        let (rows, cols) = match t.shape[..] {
            [r, c] => (r, c),
            [r, c, kh, kw] => (r, c * kh * kw),
            [r] => (r, 1),
            _ => bail!(
                "LoRA '{}': tensor '{}' has shape {:?}; trt-diff merges linear and convolution deltas only",
                file.display(),
                t.name,
                t.shape
            ),
        };
        let data = t
            .to_f32()
            .with_context(|| format!("LoRA '{}'", file.display()))?;
        Ok(Matrix { rows, cols, data })
    }

    /// `self @ other`.
    fn matmul(&self, other: &Matrix) -> Matrix {
        let mut out = vec![0f32; self.rows * other.cols];
        gemm(
            &self.data,
            &other.data,
            &mut out,
            self.rows,
            self.cols,
            other.cols,
            1.0,
        );
        Matrix {
            rows: self.rows,
            cols: other.cols,
            data: out,
        }
    }

    fn row_slice(&self, rows: Range<usize>) -> &[f32] {
        &self.data[rows.start * self.cols..rows.end * self.cols]
    }
}

/// `out += alpha * a[m, k] @ b[k, n]` (row-major).
fn gemm(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, alpha: f32) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // SAFETY: the slices hold m*k, k*n and m*n elements with the row strides given.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            1.0,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// One module's weight delta, before strength.
#[derive(Clone, Debug)]
pub enum Delta {
    /// `scale * up @ down`.
    LowRank {
        up: Matrix,
        down: Matrix,
        scale: f32,
    },
    /// LyCORIS LoHa: `scale * (w1a @ w1b) ⊙ (w2a @ w2b)`.
    Hadamard {
        w1a: Matrix,
        w1b: Matrix,
        w2a: Matrix,
        w2b: Matrix,
        scale: f32,
    },
    /// LyCORIS LoKr: `scale * kron(w1, w2)`.
    Kronecker { w1: Matrix, w2: Matrix, scale: f32 },
    /// A full delta (`.diff`).
    Full(Matrix),
}

impl Delta {
    /// [out, in] of the delta.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Delta::LowRank { up, down, .. } => (up.rows, down.cols),
            Delta::Hadamard { w1a, w1b, .. } => (w1a.rows, w1b.cols),
            Delta::Kronecker { w1, w2, .. } => (w1.rows * w2.rows, w1.cols * w2.cols),
            Delta::Full(m) => (m.rows, m.cols),
        }
    }

    /// Rank of the low-rank factors (the side path's cost), or None for deltas that are not `up @ down`.
    pub fn rank(&self) -> Option<usize> {
        match self {
            Delta::LowRank { down, .. } => Some(down.rows),
            _ => None,
        }
    }

    /// `out[rows.len(), in] += strength * delta[rows]`.
    pub fn add_rows(&self, rows: Range<usize>, strength: f32, out: &mut [f32]) {
        let (_, cols) = self.shape();
        let n = rows.len();
        match self {
            Delta::LowRank { up, down, scale } => {
                gemm(
                    up.row_slice(rows),
                    &down.data,
                    out,
                    n,
                    up.cols,
                    cols,
                    strength * scale,
                );
            }
            Delta::Hadamard {
                w1a,
                w1b,
                w2a,
                w2b,
                scale,
            } => {
                let mut a = vec![0f32; n * cols];
                let mut b = vec![0f32; n * cols];
                gemm(
                    w1a.row_slice(rows.clone()),
                    &w1b.data,
                    &mut a,
                    n,
                    w1a.cols,
                    cols,
                    1.0,
                );
                gemm(
                    w2a.row_slice(rows),
                    &w2b.data,
                    &mut b,
                    n,
                    w2a.cols,
                    cols,
                    1.0,
                );
                let s = strength * scale;
                for ((o, x), y) in out.iter_mut().zip(&a).zip(&b) {
                    *o += s * x * y;
                }
            }
            Delta::Kronecker { w1, w2, scale } => {
                let s = strength * scale;
                for (ri, r) in rows.enumerate() {
                    let (r1, r2) = (r / w2.rows, r % w2.rows);
                    let orow = &mut out[ri * cols..(ri + 1) * cols];
                    for c1 in 0..w1.cols {
                        let a = s * w1.data[r1 * w1.cols + c1];
                        let w2row = &w2.data[r2 * w2.cols..(r2 + 1) * w2.cols];
                        for (o, b) in orow[c1 * w2.cols..(c1 + 1) * w2.cols].iter_mut().zip(w2row) {
                            *o += a * b;
                        }
                    }
                }
            }
            Delta::Full(m) => {
                for (o, d) in out.iter_mut().zip(m.row_slice(rows)) {
                    *o += strength * d;
                }
            }
        }
    }
}

/// One module of a LoRA file.
#[derive(Clone, Debug)]
pub struct Module {
    /// The key's module as written, prefix included (for messages).
    pub key: String,
    pub part: Part,
    /// The module name without the format's prefix (kohya's '_' separators kept).
    pub name: String,
    pub delta: Option<Arc<Delta>>,
    /// A bias delta (`.diff_b`).
    pub bias: Option<Arc<Vec<f32>>>,
}

/// A parsed LoRA file.
#[derive(Clone, Debug)]
pub struct LoraFile {
    pub path: PathBuf,
    pub modules: Vec<Module>,
}

impl LoraFile {
    pub fn open(path: &Path) -> Result<Self> {
        let ck = Checkpoint::open(path)
            .with_context(|| format!("cannot read the LoRA file '{}'", path.display()))?;
        Self::from_checkpoint(&ck)
    }

    pub fn from_checkpoint(ck: &Checkpoint) -> Result<Self> {
        let path = ck.path.clone();
        let mut groups: BTreeMap<String, BTreeMap<Factor, String>> = BTreeMap::new();
        let mut unknown = Vec::new();
        for key in ck.names() {
            match SUFFIXES.iter().find(|(s, _)| key.ends_with(s)) {
                Some((s, f)) => {
                    let module = &key[..key.len() - s.len()];
                    groups
                        .entry(module.to_string())
                        .or_default()
                        .insert(*f, key.to_string());
                }
                None => unknown.push(key.to_string()),
            }
        }
        if !unknown.is_empty() {
            bail!(
                "LoRA '{}': {} keys are in no LoRA format trt-diff reads (e.g. {}); it reads lora_down/lora_up \
                 (kohya, ComfyUI), lora_A/lora_B (diffusers, PEFT), .alpha, LyCORIS hada_*/lokr_* and .diff/.diff_b",
                path.display(),
                unknown.len(),
                unknown
                    .iter()
                    .take(4)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if groups.is_empty() {
            bail!("LoRA '{}' holds no tensors", path.display());
        }
        let peft = peft_configs(ck)?;
        let mut modules = Vec::with_capacity(groups.len());
        for (key, factors) in groups {
            let (part, name) = split_prefix(&key);
            let name = name.to_string();
            let get = |f: Factor| -> Result<Option<Matrix>> {
                factors
                    .get(&f)
                    .map(|k| Matrix::from_tensor(&ck.get(k)?, &path))
                    .transpose()
            };
            if let Some((f, k)) = factors.iter().find_map(|(f, k)| match f {
                Factor::Unsupported(what) => Some((what, k)),
                _ => None,
            }) {
                bail!(
                    "LoRA '{}': '{k}' holds {f}, which are not a plain weight delta trt-diff can merge; convert the \
                     LoRA to a plain one (e.g. kohya's networks/merge_lora or LyCORIS' extract) first",
                    path.display()
                );
            }
            let alpha = match factors.get(&Factor::Alpha) {
                Some(k) => {
                    let v = ck
                        .get(k)?
                        .to_f32()
                        .with_context(|| format!("LoRA '{}'", path.display()))?;
                    match v[..] {
                        [a] => Some(a),
                        _ => bail!(
                            "LoRA '{}': '{k}' has {} values; an alpha is one number",
                            path.display(),
                            v.len()
                        ),
                    }
                }
                None => None,
            };
            // Without an `.alpha` key, diffusers' saved PEFT settings give it (lora_alpha, alpha_pattern, rsLoRA).
            let (alpha, rslora) = match (alpha, peft.get(&part)) {
                (None, Some(cfg)) => (Some(cfg.alpha_for(&name)), cfg.use_rslora),
                (a, _) => (a, false),
            };
            let delta = build_delta(&key, &factors, alpha, rslora, &get, &path)?;
            let bias = get(Factor::DiffBias)?.map(|m| Arc::new(m.data));
            if delta.is_none() && bias.is_none() {
                bail!(
                    "LoRA '{}': module '{key}' has only {:?}; a LoRA module needs its down and up (A and B) \
                     weights: the file is incomplete",
                    path.display(),
                    factors.values().collect::<Vec<_>>()
                );
            }
            modules.push(Module {
                key,
                part,
                name,
                delta: delta.map(Arc::new),
                bias,
            });
        }
        Ok(LoraFile { path, modules })
    }
}

/// diffusers' PEFT settings of one part, from the file's `lora_adapter_metadata`.
struct PeftConfig {
    lora_alpha: f32,
    /// PEFT's `alpha_pattern`: a module whose name ends with the pattern (at a '.') takes its alpha.
    alpha_pattern: Vec<(regex::Regex, f32)>,
    use_rslora: bool,
}

impl PeftConfig {
    fn alpha_for(&self, module: &str) -> f32 {
        self.alpha_pattern
            .iter()
            .find(|(re, _)| re.is_match(module))
            .map_or(self.lora_alpha, |(_, a)| *a)
    }
}

/// The per-part PEFT settings diffusers' `save_lora_weights` stores as JSON under `lora_adapter_metadata`
/// (`transformer.lora_alpha`, `transformer.alpha_pattern`, `text_encoder.use_rslora`, ...).
fn peft_configs(ck: &Checkpoint) -> Result<HashMap<Part, PeftConfig>> {
    let Some(text) = ck.metadata().get("lora_adapter_metadata") else {
        return Ok(HashMap::new());
    };
    let bad = |why: &str| {
        anyhow::anyhow!(
            "LoRA '{}': its lora_adapter_metadata {why}; re-save the LoRA with diffusers",
            ck.path.display()
        )
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad("is not JSON"))?;
    let map = v.as_object().ok_or_else(|| bad("is not a JSON object"))?;
    let mut out = HashMap::new();
    for (key, value) in map {
        let Some(component) = key.strip_suffix(".lora_alpha") else {
            continue;
        };
        let prefixed = format!("{component}.");
        let (part, rest) = split_prefix(&prefixed);
        if !rest.is_empty() {
            continue;
        }
        let lora_alpha = value
            .as_f64()
            .ok_or_else(|| bad(&format!("has a non-numeric {key}")))?
            as f32;
        let mut alpha_pattern = Vec::new();
        if let Some(p) = map
            .get(&format!("{component}.alpha_pattern"))
            .and_then(|p| p.as_object())
        {
            for (pattern, a) in p {
                let a = a
                    .as_f64()
                    .ok_or_else(|| bad(&format!("has a non-numeric alpha for '{pattern}'")))?;
                let re = regex::Regex::new(&format!(r"^(.*\.)?(?:{pattern})$")).map_err(|_| {
                    bad(&format!(
                        "has an alpha pattern '{pattern}' that is no regex"
                    ))
                })?;
                alpha_pattern.push((re, a as f32));
            }
        }
        let use_rslora = map
            .get(&format!("{component}.use_rslora"))
            .and_then(|b| b.as_bool())
            .unwrap_or(false);
        out.insert(
            part,
            PeftConfig {
                lora_alpha,
                alpha_pattern,
                use_rslora,
            },
        );
    }
    Ok(out)
}

fn split_prefix(key: &str) -> (Part, &str) {
    PREFIXES
        .iter()
        .find_map(|(p, part)| key.strip_prefix(p).map(|rest| (*part, rest)))
        .unwrap_or((Part::Denoiser, key))
}

fn build_delta(
    key: &str,
    factors: &BTreeMap<Factor, String>,
    alpha: Option<f32>,
    rslora: bool,
    get: &dyn Fn(Factor) -> Result<Option<Matrix>>,
    path: &Path,
) -> Result<Option<Delta>> {
    let has = |f: Factor| factors.contains_key(&f);
    let mismatch = |what: &str| {
        anyhow::anyhow!(
            "LoRA '{}': module '{key}': {what}; the file is damaged or not a LoRA",
            path.display()
        )
    };
    if has(Factor::Down) || has(Factor::Up) {
        let (Some(down), Some(up)) = (get(Factor::Down)?, get(Factor::Up)?) else {
            return Err(mismatch(
                "it has only one of the down (A) and up (B) weights",
            ));
        };
        if up.cols != down.rows {
            return Err(mismatch(&format!(
                "up is [{}, {}] and down [{}, {}]: their ranks differ",
                up.rows, up.cols, down.rows, down.cols
            )));
        }
        let rank = down.rows as f32;
        let per = if rslora { rank.sqrt() } else { rank };
        return Ok(Some(Delta::LowRank {
            up,
            down,
            scale: alpha.map_or(1.0, |a| a / per),
        }));
    }
    if has(Factor::HadaW1A) {
        let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
            get(Factor::HadaW1A)?,
            get(Factor::HadaW1B)?,
            get(Factor::HadaW2A)?,
            get(Factor::HadaW2B)?,
        ) else {
            return Err(mismatch(
                "LoHa needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b",
            ));
        };
        if w1a.cols != w1b.rows
            || w2a.cols != w2b.rows
            || w1a.rows != w2a.rows
            || w1b.cols != w2b.cols
        {
            return Err(mismatch("its LoHa factors' shapes do not fit together"));
        }
        let rank = w1b.rows as f32;
        return Ok(Some(Delta::Hadamard {
            scale: alpha.map_or(1.0, |a| a / rank),
            w1a,
            w1b,
            w2a,
            w2b,
        }));
    }
    if has(Factor::LokrW1) || has(Factor::LokrW1A) {
        // ComfyUI's and LyCORIS' rule: alpha divides by the rank of a low-rank factor (w2's when both are).
        let mut rank = None;
        let mut factor = |full: Factor, a: Factor, b: Factor| -> Result<Matrix> {
            if let Some(m) = get(full)? {
                return Ok(m);
            }
            match (get(a)?, get(b)?) {
                (Some(x), Some(y)) if x.cols == y.rows => {
                    rank = Some(y.rows);
                    Ok(x.matmul(&y))
                }
                _ => Err(mismatch(
                    "LoKr needs lokr_w1 (or lokr_w1_a and lokr_w1_b) and lokr_w2 (or lokr_w2_a and lokr_w2_b)",
                )),
            }
        };
        let w1 = factor(Factor::LokrW1, Factor::LokrW1A, Factor::LokrW1B)?;
        let w2 = factor(Factor::LokrW2, Factor::LokrW2A, Factor::LokrW2B)?;
        let scale = match (alpha, rank) {
            (Some(a), Some(r)) => a / r as f32,
            _ => 1.0,
        };
        return Ok(Some(Delta::Kronecker { w1, w2, scale }));
    }
    Ok(get(Factor::Diff)?.map(Delta::Full))
}

/// Where (part of) a module's delta lands: `src_rows` of the delta are added to `tensor` from row `dst_row`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// The weight tensor's name in the model (its bias, if any, is the same name with `.bias`).
    pub tensor: String,
    pub dst_row: usize,
    pub src_rows: Range<usize>,
}

/// The module names a LoRA may use for one model part, and where each lands.
#[derive(Clone, Debug, Default)]
pub struct AddressBook {
    modules: HashMap<String, Vec<Piece>>,
}

/// Module names compare with '.' and '_' alike: kohya writes `double_blocks_0_img_attn_qkv`.
fn normalize(module: &str) -> String {
    module.replace('.', "_")
}

impl AddressBook {
    /// `module` (in any naming a LoRA uses) lands on `pieces`; pieces given for one module add up.
    pub fn add(&mut self, module: &str, pieces: Vec<Piece>) {
        self.modules
            .entry(normalize(module))
            .or_default()
            .extend(pieces);
    }

    /// One module per 2-D `X.weight` tensor, named `X` and `root + X` for each root (e.g. CLIP's `text_model.`,
    /// which transformers 5 leaves out of its files and LoRAs keep), landing on the whole tensor.
    pub fn from_names<'a>(
        names: impl Iterator<Item = (&'a str, &'a [usize])>,
        roots: &[&str],
    ) -> Self {
        let mut book = AddressBook::default();
        for (name, shape) in names {
            let (Some(module), [rows, _]) = (name.strip_suffix(".weight"), shape) else {
                continue;
            };
            let piece = Piece {
                tensor: name.to_string(),
                dst_row: 0,
                src_rows: 0..*rows,
            };
            let mut aliases = vec![module.to_string()];
            for root in roots {
                match module.strip_prefix(root) {
                    Some(bare) => aliases.push(bare.to_string()),
                    None => aliases.push(format!("{root}{module}")),
                }
            }
            for a in aliases {
                book.modules.insert(normalize(&a), vec![piece.clone()]);
            }
        }
        book
    }

    pub fn lookup(&self, module: &str) -> Option<&[Piece]> {
        self.modules.get(&normalize(module)).map(|v| v.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
}

/// A LoRA file at a strength, as given on the command line (`FILE:STRENGTH`).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub strength: f32,
}

impl std::str::FromStr for LoraSpec {
    type Err = String;

    /// `FILE` (strength 1) or `FILE:STRENGTH`; a path holding ':' works when the part after the last ':' is not
    /// a number.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if let Some((file, strength)) = s.rsplit_once(':')
            && let Ok(v) = strength.trim().parse::<f32>()
        {
            if !v.is_finite() {
                return Err(format!("--lora {s}: the strength must be a finite number"));
            }
            if file.is_empty() {
                return Err(format!("--lora {s}: give the LoRA file before ':'"));
            }
            return Ok(LoraSpec {
                path: file.into(),
                strength: v,
            });
        }
        Ok(LoraSpec {
            path: s.into(),
            strength: 1.0,
        })
    }
}

/// One delta resolved onto one tensor.
#[derive(Clone, Debug)]
pub struct Update {
    pub tensor: String,
    pub dst_row: usize,
    pub src_rows: Range<usize>,
    pub delta: Option<Arc<Delta>>,
    pub bias: Option<Arc<Vec<f32>>>,
    pub strength: f32,
    /// The LoRA module's key (messages, the side path's names).
    pub key: String,
}

/// The deltas of several LoRAs at their strengths, by tensor.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    pub by_part: BTreeMap<Part, BTreeMap<String, Vec<Update>>>,
}

impl Resolved {
    pub fn is_empty(&self) -> bool {
        self.by_part.values().all(|m| m.is_empty())
    }

    pub fn part(&self, part: Part) -> Option<&BTreeMap<String, Vec<Update>>> {
        self.by_part.get(&part).filter(|m| !m.is_empty())
    }
}

/// Puts every module of `loras` on the tensors `books` name. Modules of a part the model lacks, or that match no
/// module of the part's book, are an error naming them (a LoRA for another model, or a naming trt-diff lacks).
pub fn resolve(loras: &[(LoraFile, f32)], books: &[(Part, &AddressBook)]) -> Result<Resolved> {
    let mut out = Resolved::default();
    for (file, strength) in loras {
        let mut unmatched = Vec::new();
        let mut mismatched = Vec::new();
        for m in &file.modules {
            let Some((_, book)) = books.iter().find(|(p, _)| *p == m.part) else {
                unmatched.push(format!("{} ({} not in this model)", m.key, m.part));
                continue;
            };
            let Some(pieces) = book.lookup(&m.name) else {
                unmatched.push(m.key.clone());
                continue;
            };
            let (out_rows, _) = m.delta.as_ref().map_or((0, 0), |d| d.shape());
            for p in pieces {
                let rows = match &m.delta {
                    Some(_) => out_rows,
                    None => m.bias.as_ref().map_or(0, |b| b.len()),
                };
                if p.src_rows.end > rows {
                    mismatched.push(format!(
                        "module '{}' has {rows} output rows, the model's '{}' needs {}",
                        m.key, p.tensor, p.src_rows.end
                    ));
                    continue;
                }
                out.by_part
                    .entry(m.part)
                    .or_default()
                    .entry(p.tensor.clone())
                    .or_default()
                    .push(Update {
                        tensor: p.tensor.clone(),
                        dst_row: p.dst_row,
                        src_rows: p.src_rows.clone(),
                        delta: m.delta.clone(),
                        bias: m.bias.clone(),
                        strength: *strength,
                        key: m.key.clone(),
                    });
            }
        }
        if !unmatched.is_empty() {
            bail!(
                "LoRA '{}': {} of its {} modules match no layer of this model: {}{}. Is it a LoRA for another model \
                 family? trt-diff maps kohya, diffusers/PEFT, BFL/ComfyUI and LyCORIS names",
                file.path.display(),
                unmatched.len(),
                file.modules.len(),
                unmatched
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if unmatched.len() > 8 { ", ..." } else { "" }
            );
        }
        if let Some(first) = mismatched.first() {
            bail!(
                "LoRA '{}' was made for a model of another size: {first} ({} such modules)",
                file.path.display(),
                mismatched.len()
            );
        }
    }
    Ok(out)
}

/// Opens each spec's file.
pub fn open_all(specs: &[LoraSpec]) -> Result<Vec<(LoraFile, f32)>> {
    specs
        .iter()
        .map(|s| Ok((LoraFile::open(&s.path)?, s.strength)))
        .collect()
}

/// `base` (a weight [rows, cols], or a convolution [rows, in, kh, kw] as [rows, in * kh * kw], in f32) with
/// `updates` added.
pub fn merge_weight(base: &mut [f32], shape: &[usize], updates: &[Update]) -> Result<()> {
    let (rows, cols) = match shape[..] {
        [rows, cols] => (rows, cols),
        [rows, c, kh, kw] => (rows, c * kh * kw),
        _ => bail!(
            "a LoRA targets '{}', which is neither a linear nor a convolution weight ({shape:?})",
            updates.first().map_or("", |u| &u.tensor)
        ),
    };
    for u in updates {
        let Some(d) = &u.delta else { continue };
        let (_, dcols) = d.shape();
        let n = u.src_rows.len();
        if dcols != cols || u.dst_row + n > rows {
            bail!(
                "LoRA module '{}' is [{}, {dcols}]; the model's '{}' is [{rows}, {cols}]: the LoRA was made for a \
                 model of another size",
                u.key,
                d.shape().0,
                u.tensor
            );
        }
        let out = &mut base[u.dst_row * cols..(u.dst_row + n) * cols];
        d.add_rows(u.src_rows.clone(), u.strength, out);
    }
    Ok(())
}

/// `base` (a bias [rows]) with the updates' bias deltas added.
pub fn merge_bias(base: &mut [f32], updates: &[Update]) -> Result<()> {
    for u in updates {
        let Some(b) = &u.bias else { continue };
        let n = u.src_rows.len();
        if u.dst_row + n > base.len() || u.src_rows.end > b.len() {
            bail!(
                "LoRA module '{}' has a bias delta of {} values; the model's bias of '{}' has {}",
                u.key,
                b.len(),
                u.tensor,
                base.len()
            );
        }
        for (o, d) in base[u.dst_row..u.dst_row + n]
            .iter_mut()
            .zip(&b[u.src_rows.clone()])
        {
            *o += u.strength * d;
        }
    }
    Ok(())
}

/// The merged tensors of one part: each updated weight (and bias, where a delta has one) read with `read`, the
/// deltas added in f32, stored as `dtype` (None: f32). Tensors merge in parallel (a FLUX.1 LoRA touches hundreds
/// of 3072-wide weights).
pub fn merged_tensors(
    updates: &BTreeMap<String, Vec<Update>>,
    read: &(dyn Fn(&str) -> Result<Tensor> + Sync),
    dtype: Option<DataType>,
) -> Result<Vec<Tensor>> {
    use rayon::prelude::*;
    let dt = dtype.unwrap_or(DataType::FLOAT);
    let entries: Vec<(&String, &Vec<Update>)> = updates.iter().collect();
    let merged: Vec<Vec<Tensor>> = entries
        .par_iter()
        .map(|(name, ups)| -> Result<Vec<Tensor>> {
            let t = read(name)?;
            let mut w = t.to_f32()?;
            merge_weight(&mut w, &t.shape, ups)?;
            let mut out = vec![tensor_of(name, &t.shape, &w, dt)];
            if ups.iter().any(|u| u.bias.is_some()) {
                let bname = format!("{}.bias", name.strip_suffix(".weight").unwrap_or(name));
                let b = read(&bname).with_context(|| {
                    format!("a LoRA bias delta targets '{bname}', which the model lacks")
                })?;
                let mut bv = b.to_f32()?;
                merge_bias(&mut bv, ups)?;
                out.push(tensor_of(&bname, &b.shape, &bv, dt));
            }
            Ok(out)
        })
        .collect::<Result<_>>()?;
    Ok(merged.into_iter().flatten().collect())
}

/// f32 values as a tensor of `dtype` (F32, F16 or BF16).
pub fn tensor_of(name: &str, shape: &[usize], v: &[f32], dtype: DataType) -> Tensor {
    let bytes: Vec<u8> = match dtype {
        DataType::FLOAT16 => v
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
        DataType::BFLOAT16 => v
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect(),
        _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    Tensor {
        name: name.to_string(),
        dtype: if matches!(dtype, DataType::FLOAT16 | DataType::BFLOAT16) {
            dtype
        } else {
            DataType::FLOAT
        },
        shape: shape.to_vec(),
        data: bytes.into(),
        quant: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Matrix {
        Matrix {
            rows,
            cols,
            data: (0..rows * cols).map(|i| f(i / cols, i % cols)).collect(),
        }
    }

    fn dense(d: &Delta) -> Vec<f32> {
        let (r, c) = d.shape();
        let mut out = vec![0f32; r * c];
        d.add_rows(0..r, 1.0, &mut out);
        out
    }

    #[test]
    fn prefixes_pick_the_part_and_longest_prefix() {
        assert_eq!(
            split_prefix("text_encoder_2.encoder.block.0"),
            (Part::TextEncoder(1), "encoder.block.0")
        );
        assert_eq!(
            split_prefix("text_encoder.text_model.x"),
            (Part::TextEncoder(0), "text_model.x")
        );
        assert_eq!(
            split_prefix("model.diffusion_model.img_in"),
            (Part::Denoiser, "img_in")
        );
        assert_eq!(split_prefix("img_in"), (Part::Denoiser, "img_in"));
    }

    #[test]
    fn kronecker_rows_match_the_dense_product() {
        let w1 = m(2, 3, |r, c| (r * 3 + c) as f32 + 1.0);
        let w2 = m(2, 2, |r, c| if r == c { 1.0 } else { 0.5 });
        let d = Delta::Kronecker {
            w1: w1.clone(),
            w2: w2.clone(),
            scale: 2.0,
        };
        let full = dense(&d);
        assert_eq!(d.shape(), (4, 6));
        for r in 0..4 {
            for c in 0..6 {
                let want = 2.0 * w1.data[(r / 2) * 3 + c / 2] * w2.data[(r % 2) * 2 + c % 2];
                assert_eq!(full[r * 6 + c], want, "{r},{c}");
            }
        }
        let mut rows = vec![0f32; 2 * 6];
        d.add_rows(1..3, 1.0, &mut rows);
        assert_eq!(&rows[..], &full[6..18]);
    }

    #[test]
    fn hadamard_is_the_elementwise_product_of_two_low_rank_products() {
        let d = Delta::Hadamard {
            w1a: m(2, 1, |r, _| r as f32 + 1.0),
            w1b: m(1, 2, |_, c| c as f32 + 1.0),
            w2a: m(2, 1, |_, _| 2.0),
            w2b: m(1, 2, |_, _| 0.5),
            scale: 3.0,
        };
        // (w1a@w1b) = [[1,2],[2,4]], (w2a@w2b) = all 1: times 3.
        assert_eq!(dense(&d), vec![3.0, 6.0, 6.0, 12.0]);
    }

    #[test]
    fn specs_parse_strength_after_the_last_colon() {
        let s: LoraSpec = "a/b.safetensors:0.7".parse().unwrap();
        assert_eq!(
            (s.path, s.strength),
            (PathBuf::from("a/b.safetensors"), 0.7)
        );
        let s: LoraSpec = "c:/x.safetensors".parse().unwrap();
        assert_eq!(
            (s.path, s.strength),
            (PathBuf::from("c:/x.safetensors"), 1.0)
        );
        assert!(":0.5".parse::<LoraSpec>().is_err());
        assert!("a:inf".parse::<LoraSpec>().is_err());
    }

    #[test]
    fn books_match_kohya_underscores_and_roots() {
        let shapes = [
            ("encoder.layers.0.self_attn.q_proj.weight", vec![4, 4]),
            ("encoder.layers.0.layer_norm1.weight", vec![4]),
        ];
        let book = AddressBook::from_names(
            shapes.iter().map(|(n, s)| (*n, s.as_slice())),
            &["text_model."],
        );
        let want = Piece {
            tensor: "encoder.layers.0.self_attn.q_proj.weight".into(),
            dst_row: 0,
            src_rows: 0..4,
        };
        for alias in [
            "text_model_encoder_layers_0_self_attn_q_proj",
            "text_model.encoder.layers.0.self_attn.q_proj",
            "encoder.layers.0.self_attn.q_proj",
        ] {
            assert_eq!(book.lookup(alias), Some(&[want.clone()][..]), "{alias}");
        }
        assert_eq!(book.lookup("encoder.layers.0.layer_norm1"), None);
    }
}
