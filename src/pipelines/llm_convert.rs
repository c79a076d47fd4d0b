//! `trt-diff convert llama2c MODEL.bin --tokenizer TOK.bin --out MODEL.gguf`: a llama2.c checkpoint and tokenizer
//! as an ordinary llama-architecture GGUF (llama.cpp's names and keys; F32 tensors). llama2.c keeps Meta's
//! interleaved RoPE layout, which is what GGUF `llama` files hold, so the weights are written unpermuted.
use crate::weights::gguf::Value;
use crate::weights::gguf_write::GgufWriter;
use crate::weights::llm_config::{LlamaConfig, hf_to_gguf};
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// The architecture keys llama.cpp reads for llama/qwen2/qwen3 models.
pub fn arch_metadata(w: &mut GgufWriter, arch: &str, name: &str, c: &LlamaConfig) {
    let u = |v: usize| Value::U32(v as u32);
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.name", Value::String(name.into()));
    w.set("general.alignment", Value::U32(32));
    w.set(&format!("{arch}.context_length"), u(c.max_seq_len));
    w.set(&format!("{arch}.embedding_length"), u(c.dim));
    w.set(&format!("{arch}.block_count"), u(c.n_layers));
    w.set(&format!("{arch}.feed_forward_length"), u(c.hidden_dim));
    w.set(&format!("{arch}.rope.dimension_count"), u(c.head_dim()));
    if c.explicit_head_dim.is_some() {
        w.set(&format!("{arch}.attention.key_length"), u(c.head_dim()));
        w.set(&format!("{arch}.attention.value_length"), u(c.head_dim()));
    }
    w.set(&format!("{arch}.attention.head_count"), u(c.n_heads));
    w.set(&format!("{arch}.attention.head_count_kv"), u(c.n_kv_heads));
    w.set(
        &format!("{arch}.attention.layer_norm_rms_epsilon"),
        Value::F32(c.norm_eps),
    );
    w.set(&format!("{arch}.rope.freq_base"), Value::F32(c.rope_theta));
    w.set(&format!("{arch}.vocab_size"), u(c.vocab_size));
}

/// Adds every tensor of `tensors` (HF names, [out, in] row-major) under its GGUF name; the LM head is left out when
/// tied to the embedding. `f16` stores matrices as F16 (norms and biases stay F32, as llama.cpp's converter does).
pub fn add_tensors(
    w: &mut GgufWriter,
    c: &LlamaConfig,
    tensors: &HashMap<String, Vec<f32>>,
    f16: bool,
) -> Result<()> {
    let names = hf_to_gguf(c);
    for i in 0..c.n_layers {
        for (hf, gg) in names.iter().filter(|(h, _)| h.contains("{i}")) {
            let hf = hf.replace("{i}", &i.to_string());
            if let Some(v) = tensors.get(&hf) {
                let rows = tensor_rows(c, &hf, v.len());
                push(w, &gg.replace("{i}", &i.to_string()), rows, v, f16);
            }
        }
    }
    for (hf, gg) in names.iter().filter(|(h, _)| !h.contains("{i}")) {
        if *hf == "lm_head.weight" && c.tied_embeddings {
            continue;
        }
        let v = tensors
            .get(*hf)
            .with_context(|| format!("the checkpoint has no tensor '{hf}'"))?;
        push(w, gg, tensor_rows(c, hf, v.len()), v, f16);
    }
    Ok(())
}

fn tensor_rows(c: &LlamaConfig, name: &str, n: usize) -> Option<usize> {
    if name.ends_with("norm.weight") || name.ends_with(".bias") {
        None
    } else {
        Some(
            n / if name.contains("down_proj") {
                c.hidden_dim
            } else if name.contains("o_proj") {
                c.q_dim()
            } else {
                c.dim
            },
        )
    }
}

fn push(w: &mut GgufWriter, name: &str, rows: Option<usize>, v: &[f32], f16: bool) {
    match rows {
        Some(r) => {
            let shape = [r as u64, (v.len() / r) as u64];
            if f16 {
                w.add_f16(name, &shape, v)
            } else {
                w.add_f32(name, &shape, v)
            }
        }
        None => w.add_f32(name, &[v.len() as u64], v),
    }
}

/// Tokenizer metadata of a llama2.c (SentencePiece) vocabulary.
fn llama2c_tokenizer(w: &mut GgufWriter, tok: &Path, vocab: usize) -> Result<()> {
    let t = crate::tokenizer::llama2c::Llama2cTokenizer::load(tok, vocab)?;
    let mut tokens = Vec::with_capacity(vocab);
    let mut scores = Vec::with_capacity(vocab);
    let mut types = Vec::with_capacity(vocab);
    for id in 0..vocab as u32 {
        let (piece, score) = t.raw(id);
        // llama2.c's export writes BOS/EOS as "\n<s>\n" / "\n</s>\n"; SentencePiece's pieces are "<s>" / "</s>".
        let text = match id {
            1 => "<s>".to_string(),
            2 => "</s>".to_string(),
            _ => String::from_utf8_lossy(piece).into_owned(),
        };
        let ty = match id {
            0 => 2,     // <unk>
            1 | 2 => 3, // <s>, </s>
            _ if piece.len() == 6 && piece.starts_with(b"<0x") && piece.ends_with(b">") => 6,
            _ => 1,
        };
        // SentencePiece pieces carry U+2581 for spaces; llama2.c's file has plain spaces.
        tokens.push(Value::String(text.replace(' ', "\u{2581}")));
        scores.push(Value::F32(score));
        types.push(Value::I32(ty));
    }
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set("tokenizer.ggml.tokens", Value::Array(8, tokens));
    w.set("tokenizer.ggml.scores", Value::Array(6, scores));
    w.set("tokenizer.ggml.token_type", Value::Array(5, types));
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.set("tokenizer.ggml.unknown_token_id", Value::U32(0));
    w.set("tokenizer.ggml.add_bos_token", Value::Bool(true));
    w.set("tokenizer.ggml.add_eos_token", Value::Bool(false));
    Ok(())
}

/// Converts; returns the number of tensors written.
pub fn llama2c_to_gguf(model: &Path, tok: &Path, out: &Path) -> Result<usize> {
    let m = crate::weights::llama2c::Llama2c::load(model)?;
    let mut w = GgufWriter::default();
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    arch_metadata(&mut w, "llama", &name, &m.config);
    llama2c_tokenizer(&mut w, tok, m.config.vocab_size)?;
    add_tensors(&mut w, &m.config, &m.tensors, false)?;
    w.write(out)?;
    Ok(w.tensors.len())
}
