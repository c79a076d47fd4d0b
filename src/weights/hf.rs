//! Hugging Face checkpoints of Llama, Mistral, Qwen2, Qwen3 and Phi-3: `config.json` plus `model.safetensors` or
//! shards listed in `model.safetensors.index.json`. Tensors keep their names (the decoder graph uses HF names; Phi-3's
//! fused `qkv_proj` and `gate_up_proj` are split into Llama's); F32/F16/BF16 are read as f32. HF checkpoints hold
//! q/k in the halves RoPE layout.
use crate::onnx::DataType;
use crate::weights::llm_config::{LlamaConfig, MlpAct, RopeScaling, swa_pattern_of};
use anyhow::{Context, Result, bail};
use serde_json::Value as J;
use std::collections::HashMap;
use std::path::Path;

pub struct HfModel {
    pub arch: String,
    pub config: LlamaConfig,
    pub tensors: HashMap<String, Vec<f32>>,
}

fn read_json(path: &Path) -> Result<J> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read '{}'", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("'{}' is not valid JSON", path.display()))
}

/// The `model_type`s read, with what sets each apart from Llama: q/k/v biases always (Qwen2), per-head q/k RMSNorms
/// (Qwen3), Gemma's traits (`gemma`), and the defaults transformers fills in for keys a config.json leaves out.
const HF_ARCHS: &[(&str, HfArchTraits)] = &[
    ("llama", HfArchTraits::LLAMA),
    (
        "qwen2",
        HfArchTraits {
            attn_bias: true,
            ..HfArchTraits::LLAMA
        },
    ),
    (
        "qwen3",
        HfArchTraits {
            qk_norm: true,
            ..HfArchTraits::LLAMA
        },
    ),
    ("mistral", HfArchTraits::LLAMA),
    ("phi3", HfArchTraits::LLAMA),
    (
        "gemma2",
        HfArchTraits {
            gemma: true,
            defaults: GEMMA2_DEFAULTS,
            ..HfArchTraits::LLAMA
        },
    ),
    (
        "gemma3_text",
        HfArchTraits {
            qk_norm: true,
            gemma: true,
            defaults: GEMMA3_DEFAULTS,
            ..HfArchTraits::LLAMA
        },
    ),
];

#[derive(Clone, Copy)]
struct HfArchTraits {
    /// Biases on q/k/v whatever `attention_bias` says.
    attn_bias: bool,
    qk_norm: bool,
    /// Gemma 2/3: embeddings scaled by sqrt(dim), RMSNorms on the attention's and MLP's outputs too, norm weights
    /// stored as offsets from 1, tied embeddings unless the config says otherwise.
    gemma: bool,
    /// transformers' config defaults (JSON) for keys absent from config.json.
    defaults: &'static str,
}

impl HfArchTraits {
    const LLAMA: HfArchTraits = HfArchTraits {
        attn_bias: false,
        qk_norm: false,
        gemma: false,
        defaults: "{}",
    };
}

/// Gemma2Config's defaults (its layer_types, when absent, window every other layer: the pattern 2).
const GEMMA2_DEFAULTS: &str = r#"{"sliding_window_pattern": 2, "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "query_pre_attn_scalar": 256,
    "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
    "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true}"#;

/// Gemma3TextConfig's defaults (Gemma 3's multimodal checkpoints leave most of these out of `text_config`).
const GEMMA3_DEFAULTS: &str = r#"{"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "sliding_window_pattern": 6, "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true}"#;

/// The text model's config: config.json itself, or its `text_config` for Gemma 3's multimodal checkpoints
/// (`Gemma3ForConditionalGeneration`, whose text weights run here and whose vision tower is left out).
fn text_config(c: J) -> J {
    match c["model_type"].as_str() {
        Some("gemma3") if c["text_config"].is_object() => {
            let mut t = c["text_config"].clone();
            t["model_type"] = J::from("gemma3_text");
            t
        }
        _ => c,
    }
}

/// The model config from `config.json` (a model_type of `HF_ARCHS`).
pub fn config(dir: &Path, max_context: Option<usize>) -> Result<(String, LlamaConfig)> {
    let path = dir.join("config.json");
    let mut c = text_config(read_json(&path)?);
    let p = path.display();
    let arch = c["model_type"].as_str().unwrap_or("").to_string();
    let Some(traits) = HF_ARCHS.iter().find(|(a, _)| *a == arch).map(|(_, t)| *t) else {
        let names: Vec<&str> = HF_ARCHS.iter().map(|(a, _)| *a).collect();
        bail!(
            "'{p}': model_type '{arch}' is not supported (supported: {}, and gemma3's text model)",
            names.join(", ")
        );
    };
    if let (J::Object(defaults), Some(obj)) = (
        serde_json::from_str::<J>(traits.defaults)?,
        c.as_object_mut(),
    ) {
        for (k, v) in defaults {
            obj.entry(k).or_insert(v);
        }
    }
    let int = |k: &str| -> Result<usize> {
        c[k].as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("'{p}': '{k}' is missing or not an integer"))
    };
    let dim = int("hidden_size")?;
    let n_heads = int("num_attention_heads")?;
    // transformers 5 writes `rope_parameters` (theta and scaling together; Gemma 3: one set per layer type); older
    // configs `rope_theta`, `rope_scaling` (and Gemma 3's `rope_local_base_freq`).
    let (rp, rp_local) = match &c["rope_parameters"] {
        r if r.get("full_attention").is_some() => {
            (r["full_attention"].clone(), r["sliding_attention"].clone())
        }
        r => (r.clone(), J::Null),
    };
    let rp = &rp;
    let rope_theta = rp["rope_theta"]
        .as_f64()
        .or(c["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    if let Some(t) = rp_local["rope_type"].as_str()
        && t != "default"
    {
        bail!("'{p}': RoPE scaling '{t}' on the sliding-window layers is not supported");
    }
    let local_rope_theta = rp_local["rope_theta"]
        .as_f64()
        .or(c["rope_local_base_freq"].as_f64())
        .map(|t| t as f32);
    let scaling = if c["rope_scaling"].is_null() && rp.is_object() {
        rp
    } else {
        &c["rope_scaling"]
    };
    let rope_scaling = match scaling {
        J::Null => None,
        s => {
            let kind = s["rope_type"].as_str().or(s["type"].as_str()).unwrap_or("");
            let f = |k: &str| s[k].as_f64().map(|v| v as f32);
            match kind {
                "linear" => Some(RopeScaling::Linear {
                    factor: f("factor")
                        .with_context(|| format!("'{p}': rope_scaling.factor missing"))?,
                }),
                "llama3" => Some(RopeScaling::Llama3 {
                    factor: f("factor").unwrap_or(8.0),
                    low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
                    high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
                    original_context: s["original_max_position_embeddings"]
                        .as_u64()
                        .unwrap_or(8192) as usize,
                }),
                "default" | "" => None,
                other => {
                    bail!(
                        "'{p}': rope_scaling type '{other}' is not supported (linear, llama3); Phi-3's 128k \
                         variants (longrope) are not either: use a 4k one"
                    )
                }
            }
        }
    };
    let mut ctx = int("max_position_embeddings")?;
    if let Some(m) = max_context {
        ctx = ctx.min(m);
    }
    if let Some(f) = c["partial_rotary_factor"]
        .as_f64()
        .or(rp["partial_rotary_factor"].as_f64())
        && f != 1.0
    {
        bail!("'{p}': partial_rotary_factor {f} (RoPE on part of each head) is not supported");
    }
    // Qwen2 configs carry a window with `use_sliding_window: false`; a window as long as the context changes nothing.
    let sliding_window = match (&c["sliding_window"], c["use_sliding_window"].as_bool()) {
        (_, Some(false)) | (J::Null, _) => None,
        (w, _) => Some(w.as_u64().filter(|&w| w > 0).with_context(|| {
            format!("'{p}': sliding_window is {w}, not a positive integer: the config is corrupt")
        })? as usize),
    }
    .filter(|&w| w < ctx);
    let n_layers = int("num_hidden_layers")?;
    let swa_pattern = match (&c["layer_types"], c["sliding_window_pattern"].as_u64()) {
        (J::Array(types), _) => {
            let windowed = types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => bail!(
                        "'{p}': layer type {t} is neither sliding_attention nor full_attention"
                    ),
                })
                .collect::<Result<Vec<bool>>>()?;
            if windowed.len() != n_layers {
                bail!(
                    "'{p}': layer_types lists {} layers, num_hidden_layers is {n_layers}: the config is corrupt",
                    windowed.len()
                );
            }
            swa_pattern_of(&windowed).with_context(|| {
                format!(
                    "'{p}': layer_types windows layers in an order trt-diff's decoders do not run (a period n: layer \
                     i windowed when i % n < n - 1)"
                )
            })?
        }
        (_, Some(n)) => Some(n as usize),
        _ => None,
    };
    let act = c["hidden_activation"]
        .as_str()
        .or(c["hidden_act"].as_str())
        .unwrap_or("silu");
    let mlp_act = match act {
        "silu" | "swish" => MlpAct::Silu,
        "gelu_pytorch_tanh" | "gelu_tanh" => MlpAct::GeluTanh,
        other => {
            bail!("'{p}': hidden activation '{other}' is not supported (silu, gelu_pytorch_tanh)")
        }
    };
    let softcap = |k: &str| c[k].as_f64().filter(|&v| v > 0.0).map(|v| v as f32);
    let mut cfg = LlamaConfig {
        dim,
        hidden_dim: int("intermediate_size")?,
        n_layers,
        n_heads,
        n_kv_heads: c["num_key_value_heads"]
            .as_u64()
            .map_or(n_heads, |v| v as usize),
        vocab_size: int("vocab_size")?,
        max_seq_len: ctx,
        rope_theta: rope_theta as f32,
        norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32,
        rope_interleaved: false,
        tied_embeddings: c["tie_word_embeddings"]
            .as_bool()
            .unwrap_or(arch == "qwen2" || traits.gemma),
        attn_bias: traits.attn_bias || c["attention_bias"].as_bool().unwrap_or(false),
        rope_scaling,
        explicit_head_dim: match &c["head_dim"] {
            J::Null => None,
            h => {
                let h = h.as_u64().with_context(|| {
                    format!("'{p}': head_dim is {h}, not a positive integer: the config is corrupt")
                })? as usize;
                (n_heads == 0 || h != dim / n_heads).then_some(h)
            }
        },
        qk_norm: traits.qk_norm,
        sliding_window,
        swa_pattern,
        local_rope_theta,
        attn_scale: c["query_pre_attn_scalar"]
            .as_f64()
            .map(|s| 1.0 / (s as f32).sqrt()),
        attn_softcap: softcap("attn_logit_softcapping"),
        final_softcap: softcap("final_logit_softcapping"),
        embed_scale: traits.gemma.then(|| (dim as f32).sqrt()),
        sandwich_norms: traits.gemma,
        mlp_act,
    };
    cfg.normalize_window();
    crate::weights::limits::check_config(&p.to_string(), &cfg)?;
    Ok((arch, cfg))
}

/// Loads config and every tensor of the checkpoint folder.
pub fn load(dir: &Path, max_context: Option<usize>) -> Result<HfModel> {
    let (arch, config) = config(dir, max_context)?;
    let gemma = config.sandwich_norms;
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<std::path::PathBuf> = if index.exists() {
        let j = read_json(&index)?;
        let map = j["weight_map"]
            .as_object()
            .with_context(|| format!("'{}' has no weight_map", index.display()))?;
        let mut f: Vec<String> = map
            .values()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        f.sort();
        f.dedup();
        f.into_iter()
            .map(|n| {
                crate::fsutil::confined_path(dir, &n).map_err(|why| {
                    anyhow::anyhow!(
                        "'{}': shard '{n}' {why}, outside the checkpoint folder; refused. Fix: keep the shards in \
                         the folder and list them by file name",
                        index.display()
                    )
                })
            })
            .collect::<Result<_>>()?
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut tensors = HashMap::new();
    for file in &files {
        // Mapped, each tensor widened on its own: the file's bytes are never all in memory beside their f32 copy.
        let ck = crate::weights::safetensors_file::Checkpoint::open(file)?;
        if ck.prequantized() > 0 {
            bail!(
                "'{}' holds pre-quantized weights ({} layout), which LLM builds do not read: use the model's \
                 bf16/fp16 release",
                file.display(),
                ck.source_layout().name()
            );
        }
        for name in ck.names() {
            let Some(text_name) = text_model_name(name) else {
                continue;
            };
            let t = ck.get(name)?;
            if !matches!(
                t.dtype,
                DataType::FLOAT | DataType::FLOAT16 | DataType::BFLOAT16
            ) {
                bail!(
                    "'{}': tensor '{name}' is {}; only F32, F16 and BF16 checkpoints are read",
                    file.display(),
                    t.dtype
                );
            }
            let mut v = t.to_f32()?;
            // Gemma's RMSNorms multiply by (1 + weight); llama.cpp's converter stores the sums, and so do we.
            if gemma && name.ends_with("norm.weight") {
                v.iter_mut().for_each(|w| *w += 1.0);
            }
            tensors.insert(text_name, v);
        }
    }
    // A bare base model (transformers' `Qwen3Model`, as some pipelines save their text encoders) names its tensors
    // without the `model.` prefix of the *ForCausalLM checkpoints.
    if !tensors.contains_key("model.embed_tokens.weight")
        && tensors.contains_key("embed_tokens.weight")
    {
        tensors = tensors
            .into_iter()
            .map(|(k, v)| (format!("model.{k}"), v))
            .collect();
    }
    split_fused(&dir.display().to_string(), &config, &mut tensors)?;
    if !tensors.contains_key("lm_head.weight") {
        let e = tensors
            .get("model.embed_tokens.weight")
            .with_context(|| format!("'{}': no model.embed_tokens.weight", dir.display()))?
            .clone();
        tensors.insert("lm_head.weight".into(), e);
    }
    crate::weights::limits::check_tensors(&dir.display().to_string(), &config, &tensors)?;
    Ok(HfModel {
        arch,
        config,
        tensors,
    })
}

/// A tensor's name in the text model, None for the parts of a multimodal checkpoint that are not (Gemma 3's
/// `vision_tower.*`, `multi_modal_projector.*`); its language model's tensors lose their prefix
/// (`language_model.model.*`, transformers 5's `model.language_model.*`).
fn text_model_name(name: &str) -> Option<String> {
    for (prefix, to) in [
        ("language_model.model.", "model."),
        ("model.language_model.", "model."),
        ("language_model.lm_head.", "lm_head."),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some(format!("{to}{rest}"));
        }
    }
    let vision = [
        "vision_tower.",
        "multi_modal_projector.",
        "model.vision_tower.",
        "model.multi_modal_projector.",
    ];
    (!vision.iter().any(|v| name.starts_with(v))).then(|| name.to_string())
}

/// Phi-3's fused matrices as Llama's: `qkv_proj` rows [q | k | v] and `gate_up_proj` rows [gate | up] (the order
/// transformers' Phi3Attention and Phi3MLP split them in).
fn split_fused(file: &str, c: &LlamaConfig, tensors: &mut HashMap<String, Vec<f32>>) -> Result<()> {
    for i in 0..c.n_layers {
        let p = format!("model.layers.{i}.");
        let parts = [
            (
                "self_attn.qkv_proj.weight",
                vec![
                    ("self_attn.q_proj.weight", c.q_dim()),
                    ("self_attn.k_proj.weight", c.kv_dim()),
                    ("self_attn.v_proj.weight", c.kv_dim()),
                ],
            ),
            (
                "mlp.gate_up_proj.weight",
                vec![
                    ("mlp.gate_proj.weight", c.hidden_dim),
                    ("mlp.up_proj.weight", c.hidden_dim),
                ],
            ),
        ];
        for (fused, split) in parts {
            let Some(w) = tensors.remove(&format!("{p}{fused}")) else {
                continue;
            };
            let rows: usize = split.iter().map(|(_, r)| r).sum();
            if w.len() != rows * c.dim {
                bail!(
                    "'{file}': tensor '{p}{fused}' has {} values; the config implies {rows} x {}",
                    w.len(),
                    c.dim
                );
            }
            let mut at = 0;
            for (name, r) in split {
                tensors.insert(format!("{p}{name}"), w[at..at + r * c.dim].to_vec());
                at += r * c.dim;
            }
        }
    }
    Ok(())
}
