//! Fuzz targets: each takes arbitrary bytes and drives one reader of trt-diff the way the CLI does. A target
//! returns a short signature of what happened (Ok, or the error's first words without numbers), which the
//! harness uses as a cheap novelty signal; a panic or an abort is a finding.
//!
//! This file is compiled twice: by the fuzzer (`fuzz/`) and by `tests/hardening.rs`, which replays the committed
//! seeds and crash reproducers (`fuzz/corpus/`, `fuzz/regressions/`) through the same code.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const TARGETS: &[&str] = &[
    "onnx",
    "gguf",
    "safetensors",
    "quant_checkpoint",
    "manifest",
    "llama2c",
    "npy",
    "tok_spm",
    "tok_bpe",
    "tok_wpm",
    "tok_clip",
    "tok_t5",
    "tok_llama2c",
    "chat_template",
    "server_request",
    "hf_tokenizer",
];

/// A scratch folder (on tmpfs where there is one) that holds the current input as a file, since the readers
/// take paths.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        let base = Path::new("/dev/shm");
        let dir = if base.is_dir() {
            tempfile::tempdir_in(base)
        } else {
            tempfile::tempdir()
        }
        .expect("a scratch folder");
        // Fixtures the ONNX target's external data may name: a file inside the folder, and a symlink out.
        std::fs::write(dir.path().join("w.bin"), [0x3fu8; 256]).ok();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link.bin")).ok();
        Scratch { dir }
    }

    pub fn put(&self, name: &str, data: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, data).expect("scratch write");
        p
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Self::new()
    }
}

/// Digits and hex runs dropped, first 60 characters: errors that differ only in numbers count as one. A target that
/// always succeeds (the tokenizers) returns a coarse shape of its output instead, so that inputs taking other paths
/// still count as new.
pub fn signature<T: Outcome>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(v) => v.shape(),
        Err(e) => {
            let s = format!("{e}");
            let s = match s.find("': ") {
                Some(i) => &s[i + 3..],
                None => &s,
            };
            s.chars().filter(|c| !c.is_ascii_digit()).take(60).collect()
        }
    }
}

/// What a successful run says about the path it took.
pub trait Outcome {
    fn shape(&self) -> String;
}

impl Outcome for () {
    fn shape(&self) -> String {
        "ok".into()
    }
}

/// A tokenization: how many tokens and how large the ids (powers of two), and whether decoding gave the text back.
pub struct Tokens {
    pub ids: Vec<u32>,
    pub round_trip: bool,
}

impl Outcome for Tokens {
    fn shape(&self) -> String {
        let log2 = |v: usize| usize::BITS - v.leading_zeros();
        let max = self.ids.iter().copied().max().unwrap_or(0) as usize;
        format!(
            "ok n{} id{} rt{}",
            log2(self.ids.len()),
            log2(max),
            self.round_trip as u8
        )
    }
}

fn shared_data() -> PathBuf {
    std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data"))
}

fn repo() -> PathBuf {
    // CARGO_MANIFEST_DIR is the repository root for tests and fuzz/ for the fuzzer.
    let m = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if m.join("src/lib.rs").exists() && m.join("fuzz").is_dir() {
        m
    } else {
        m.join("..")
    }
}

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Runs target `name` on `data`; None for an unknown target.
pub fn run(name: &str, s: &Scratch, data: &[u8]) -> Option<String> {
    Some(match name {
        "onnx" => signature(onnx(s, data)),
        "gguf" => signature(gguf(s, data)),
        "safetensors" => signature(safetensors(s, data)),
        "quant_checkpoint" => signature(quant_checkpoint(s, data)),
        "manifest" => signature(manifest(s, data)),
        "llama2c" => signature(llama2c(s, data)),
        "npy" => signature(npy(s, data)),
        "tok_spm" => signature(vocab_text("ggml-vocab-llama-spm.gguf", data)),
        "tok_bpe" => signature(vocab_text("ggml-vocab-qwen2.gguf", data)),
        "tok_wpm" => signature(wpm_text(data)),
        "tok_clip" => signature(clip_text(data)),
        "tok_t5" => signature(t5_text(data)),
        "tok_llama2c" => signature(llama2c_tokenizer(s, data)),
        "chat_template" => signature(chat_template(data)),
        "server_request" => signature(server_request(data)),
        "hf_tokenizer" => signature(hf_tokenizer(s, data)),
        _ => return None,
    })
}

fn onnx(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    use trt_diff::onnx::OnnxFile;
    let p = s.put("model.onnx", data);
    let f = OnnxFile::load(&p)?;
    let _ = trt_diff::onnx::summary::OnnxSummary::of(&f);
    f.external_weights()?;
    // What `build` does before TensorRT: the node limit and the input shapes.
    let _ = OnnxFile::load_with(
        &p,
        &trt_diff::onnx::model::LoadOptions {
            allow_external: false,
            max_nodes: Some(trt_diff::onnx::model::DEFAULT_MAX_NODES),
        },
    )?;
    Ok(())
}

fn gguf(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    use trt_diff::weights::gguf::GgufFile;
    let p = s.put("model.gguf", data);
    let g = GgufFile::open(&p)?;
    for t in &g.tensors {
        if t.n_elements <= 1 << 20 {
            let _ = g.tensor_f32(&t.name);
        }
    }
    for (_, v) in &g.metadata {
        let _ = v.display_short(8);
    }
    if let Ok(v) = trt_diff::tokenizer::llm_vocab::Vocab::from_gguf(&g) {
        let ids = v.tokenize("Hello world <s> 123", true, true);
        let _ = v.detokenize(&ids, true);
        for id in [0u32, 1, 2, u32::MAX] {
            let _ = v.token_to_piece(id, true);
        }
    }
    trt_diff::weights::gguf_model::load(&g, Some(64))?;
    Ok(())
}

fn safetensors(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    let p = s.put("model.safetensors", data);
    let ck = trt_diff::weights::safetensors_file::Checkpoint::open(&p)?;
    let names: Vec<String> = ck.names().map(String::from).collect();
    for n in names {
        let t = ck.get(&n)?;
        if t.numel() <= 1 << 20 {
            let _ = t.to_f32();
        }
    }
    // The single-file layouts read through renamed views, and their configs read off the weights.
    use trt_diff::models::{flux2, sd3};
    if let Some(prefix) = sd3::original_prefix(&ck) {
        let view = sd3::diffusers_view(&ck, &prefix)?;
        sd3::Sd3Config::from_checkpoint(&view)?;
    }
    if let Some(prefix) = flux2::bfl_prefix(&ck) {
        let view = flux2::diffusers_view(&ck, &prefix)?;
        flux2::Flux2Config::from_checkpoint(&view)?;
    }
    Ok(())
}

fn quant_checkpoint(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    let p = s.put("q.safetensors", data);
    let st = safetensors::SafeTensors::deserialize(data)
        .map_err(|e| anyhow::anyhow!("not safetensors: {e:?}"))?;
    for n in st.names() {
        let _ = trt_diff::quant::checkpoint::dequantize_tensor(&st, &p, n);
    }
    trt_diff::quant::inspect::inspect_checkpoint(&p, None)?;
    Ok(())
}

fn manifest(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    let _ = trt_diff::manifest::looks_like_plan(data);
    let _ = trt_diff::manifest::recorded_plan_size(data);
    let p = s.put("e.plan.json", data);
    let m = trt_diff::manifest::Manifest::read(&p)?;
    let _ = m.to_json();
    Ok(())
}

/// A Hugging Face folder's tokenizer.json, converted to a GGUF vocabulary (as `build HF_DIR` does) and used.
fn hf_tokenizer(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    let dir = s.dir.path().join("hf");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tokenizer.json"), data)?;
    let out = s.dir.path().join("hf.gguf");
    trt_diff::tokenizer::hf_vocab::vocab_gguf_from_hf(&dir)?.write(&out)?;
    let v = trt_diff::tokenizer::llm_vocab::Vocab::open(&out)?;
    let ids = v.tokenize("Hello <|im_start|> world 123 ünïcödé", true, true);
    let _ = v.detokenize(&ids, false);
    Ok(())
}

fn llama2c(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    let p = s.put("m.bin", data);
    trt_diff::weights::llama2c::Llama2c::load(&p)?;
    Ok(())
}

fn npy(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    let p = s.put("x.npy", data);
    let t = trt_diff::backend::npy::read(&p)?;
    trt_diff::backend::npy::write(&s.dir.path().join("y.npy"), &t)?;
    Ok(())
}

fn vocab(name: &str) -> Option<&'static trt_diff::tokenizer::llm_vocab::Vocab> {
    static CACHE: OnceLock<
        std::sync::Mutex<Vec<(String, &'static trt_diff::tokenizer::llm_vocab::Vocab)>>,
    > = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut c = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, v)) = c.iter().find(|(n, _)| n == name) {
        return Some(v);
    }
    let path = if name == "wpm.gguf" {
        repo().join("tests/golden/llm/wpm/wpm.gguf")
    } else {
        shared_data().join("tokenizers").join(name)
    };
    let v = trt_diff::tokenizer::llm_vocab::Vocab::open(&path).ok()?;
    let v: &'static _ = Box::leak(Box::new(v));
    c.push((name.to_string(), v));
    Some(v)
}

fn tokenize_all(v: &trt_diff::tokenizer::llm_vocab::Vocab, data: &[u8]) -> anyhow::Result<Tokens> {
    let t = text(data);
    let mut out = Tokens {
        ids: Vec::new(),
        round_trip: false,
    };
    for (add, parse) in [(true, true), (false, false)] {
        let ids = v.tokenize(&t, add, parse);
        let back = v.detokenize(&ids, parse);
        out = Tokens {
            round_trip: back == t.as_bytes(),
            ids,
        };
    }
    // Ids straight from the input, as a client of `tokenize --decode` may send them.
    let ids: Vec<u32> = data
        .chunks(4)
        .map(|c| c.iter().fold(0u32, |a, &b| (a << 8) | b as u32))
        .collect();
    let _ = v.detokenize(&ids, true);
    let _ = v.detokenize(&ids, false);
    Ok(out)
}

fn vocab_text(name: &str, data: &[u8]) -> anyhow::Result<Tokens> {
    let v = vocab(name).ok_or_else(|| anyhow::anyhow!("vocabulary {name} missing"))?;
    tokenize_all(v, data)
}

fn wpm_text(data: &[u8]) -> anyhow::Result<Tokens> {
    vocab_text("wpm.gguf", data)
}

fn clip_text(data: &[u8]) -> anyhow::Result<Tokens> {
    static TOK: OnceLock<Option<trt_diff::tokenizer::clip::ClipTokenizer>> = OnceLock::new();
    let tok = TOK
        .get_or_init(|| {
            trt_diff::tokenizer::clip::ClipTokenizer::load(
                &shared_data().join("tokenizers/bpe_simple_vocab_16e6.txt.gz"),
            )
            .ok()
        })
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("CLIP vocabulary missing"))?;
    let t = text(data);
    let _ = tok.encode_padded(&t, 77);
    let _ = tok.encode_padded(&t, 0);
    Ok(Tokens {
        ids: tok.encode(&t),
        round_trip: false,
    })
}

fn t5_text(data: &[u8]) -> anyhow::Result<Tokens> {
    static TOK: OnceLock<Option<trt_diff::tokenizer::t5::T5Tokenizer>> = OnceLock::new();
    let tok = TOK
        .get_or_init(|| {
            trt_diff::tokenizer::t5::T5Tokenizer::load(
                &shared_data().join("tokenizers/t5_tokenizer.json"),
            )
            .ok()
        })
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("T5 vocabulary missing"))?;
    let t = text(data);
    tok.encode_padded(&t, 512)?;
    tok.encode_padded(&t, 0)?;
    Ok(Tokens {
        ids: tok.encode(&t)?,
        round_trip: false,
    })
}

fn llama2c_tokenizer(s: &Scratch, data: &[u8]) -> anyhow::Result<()> {
    // The first two bytes pick the vocabulary size the model would declare.
    let (n, rest) = match data {
        [a, b, rest @ ..] => (u16::from_le_bytes([*a, *b]) as usize, rest),
        _ => (0, data),
    };
    let p = s.put("tok.bin", rest);
    let t = trt_diff::tokenizer::llama2c::Llama2cTokenizer::load(&p, n)?;
    let ids = t.encode("Once upon a time \u{1F600} <0x0A>");
    let mut prev = None;
    for id in ids.iter().copied().chain([0, 1, 2, 3, u32::MAX]) {
        let _ = t.piece_bytes(prev, id);
        prev = Some(id);
    }
    Ok(())
}

/// Input: a template, then (after a NUL byte, when there is one) the content of the user's message.
fn chat_template(data: &[u8]) -> anyhow::Result<()> {
    use trt_diff::pipelines::chat::{ChatMessage, render};
    let (template, content) = match data.iter().position(|&b| b == 0) {
        Some(i) => (text(&data[..i]), text(&data[i + 1..])),
        None => (text(data), "Hi {{ there }} {% raw %}".to_string()),
    };
    let messages = vec![
        ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
            name: None,
        },
        ChatMessage {
            role: "user".into(),
            content,
            name: Some("u".into()),
        },
        ChatMessage {
            role: "assistant".into(),
            content: "Hello.".into(),
            name: None,
        },
    ];
    let out = render(&template, &messages, "<s>", "</s>", true)?;
    if out.len() > 64 << 20 {
        anyhow::bail!("rendered {} bytes", out.len());
    }
    Ok(())
}

/// An HTTP request body for one of the server's JSON routes: the first byte picks the route, the rest is the body.
fn server_request(data: &[u8]) -> anyhow::Result<()> {
    let Some((&pick, body)) = data.split_first() else {
        return Ok(());
    };
    let routes = trt_diff::server::BODY_ROUTES;
    let route = routes[pick as usize % routes.len()];
    trt_diff::server::parse_body(route, body).map_err(|e| anyhow::anyhow!("{route}: {e}"))
}
