//! Seed corpora: small valid inputs for each target, made with trt-diff's own writers (and a few files from
//! the test fixtures). `fuzz seeds` writes them to `fuzz/corpus/TARGET/seed-*`; the committed corpus also holds
//! hand-picked files (manifests of real builds).
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use trt_diff::weights::gguf::Value;
use trt_diff::weights::gguf_write::GgufWriter;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn shared(rel: &str) -> PathBuf {
    std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/data"))
        .join(rel)
}

fn f32b(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A safetensors file in memory: (name, dtype, shape, bytes).
pub fn safetensors_bytes(tensors: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, dt, shape, bytes) in tensors {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [data.len(), data.len() + bytes.len()]}),
        );
        data.extend(bytes);
    }
    let h = serde_json::to_vec(&header).expect("json");
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

fn tiny_llama_gguf(tmp: &Path, q8: bool) -> Result<Vec<u8>> {
    let mut w = GgufWriter::default();
    w.set("general.architecture", Value::String("llama".into()));
    for (k, v) in [
        ("llama.embedding_length", 32u32),
        ("llama.attention.head_count", 2),
        ("llama.attention.head_count_kv", 1),
        ("llama.block_count", 1),
        ("llama.feed_forward_length", 32),
        ("llama.context_length", 16),
    ] {
        w.set(k, Value::U32(v));
    }
    let toks = [
        "<unk>",
        "<s>",
        "</s>",
        "\u{2581}a",
        "b",
        "<0x0A>",
        "\u{2581}",
        "ab",
    ];
    w.set("tokenizer.ggml.model", Value::String("llama".into()));
    w.set(
        "tokenizer.ggml.tokens",
        Value::Array(
            8,
            toks.iter().map(|t| Value::String(t.to_string())).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.scores",
        Value::Array(
            6,
            (0..toks.len()).map(|i| Value::F32(-(i as f32))).collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Value::Array(
            5,
            [2, 3, 3, 1, 1, 6, 1, 1]
                .iter()
                .map(|&t| Value::I32(t))
                .collect(),
        ),
    );
    w.set("tokenizer.ggml.bos_token_id", Value::U32(1));
    w.set("tokenizer.ggml.eos_token_id", Value::U32(2));
    w.set(
        "tokenizer.chat_template",
        Value::String("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()),
    );
    let (d, h, kv, v) = (32u64, 32u64, 16u64, toks.len() as u64);
    let vals = |n: u64| {
        (0..n)
            .map(|i| ((i % 7) as f32 - 3.0) * 0.01)
            .collect::<Vec<f32>>()
    };
    w.add_f32("token_embd.weight", &[v, d], &vals(v * d));
    w.add_f32("output_norm.weight", &[d], &vals(d));
    for (name, shape) in [
        ("attn_norm", vec![d]),
        ("ffn_norm", vec![d]),
        ("attn_q", vec![d, d]),
        ("attn_k", vec![kv, d]),
        ("attn_v", vec![kv, d]),
        ("attn_output", vec![d, d]),
        ("ffn_gate", vec![h, d]),
        ("ffn_up", vec![h, d]),
        ("ffn_down", vec![d, h]),
    ] {
        let n: u64 = shape.iter().product();
        let full = format!("blk.0.{name}.weight");
        if q8 && shape.len() == 2 {
            w.add_q8_0(&full, &shape, &vals(n))?;
        } else {
            w.add_f32(&full, &shape, &vals(n));
        }
    }
    let p = tmp.join(if q8 { "q8.gguf" } else { "f32.gguf" });
    w.write(&p)?;
    Ok(std::fs::read(&p)?)
}

fn onnx_seeds(tmp: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    use prost::Message;
    use trt_diff::models::mlp::MlpConfig;
    use trt_diff::onnx::proto::*;
    let mut out = Vec::new();
    let cfg = MlpConfig {
        input: 4,
        hidden: 8,
        output: 2,
        ..Default::default()
    };
    let p = tmp.join("mlp.onnx");
    trt_diff::onnx::save(
        cfg.graph()?,
        &p,
        &trt_diff::onnx::SaveOptions {
            external_threshold: None,
        },
    )?;
    out.push(("mlp".into(), std::fs::read(&p)?));
    // External data in the folder (w.bin, 256 bytes in the scratch folder) and through the symlink out of it.
    for (name, loc, off, len) in [
        ("external", "w.bin", "0", "32"),
        ("external_offset", "./w.bin", "64", "32"),
        ("external_link", "link.bin", "0", "4"),
    ] {
        let mut m = trt_diff::onnx::OnnxFile::load(&p)?.model;
        if let Some(g) = m.graph.as_mut()
            && let Some(t) = g.initializer.first_mut()
        {
            t.raw_data = Default::default();
            t.dims = vec![8];
            t.data_location = DATA_LOCATION_EXTERNAL;
            t.external_data = vec![
                StringStringEntryProto {
                    key: "location".into(),
                    value: loc.into(),
                },
                StringStringEntryProto {
                    key: "offset".into(),
                    value: off.into(),
                },
                StringStringEntryProto {
                    key: "length".into(),
                    value: len.into(),
                },
            ];
        }
        out.push((name.into(), m.encode_to_vec()));
    }
    Ok(out)
}

fn quant_seeds(tmp: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    use trt_diff::quant::checkpoint::{Format, QuantizeOptions, quantize_file};
    let input = tmp.join("in.safetensors");
    let w: Vec<f32> = (0..32 * 128)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.02)
        .collect();
    std::fs::write(
        &input,
        safetensors_bytes(&[
            ("a.weight", "F32", vec![32, 128], f32b(&w)),
            ("b.bias", "F32", vec![4], f32b(&[1.0, 2.0, 3.0, 4.0])),
        ]),
    )?;
    let mut out = vec![("plain".to_string(), std::fs::read(&input)?)];
    for (name, format, double) in [
        ("nvfp4", Format::Nvfp4, false),
        ("fp8", Format::Fp8, false),
        ("mxfp8", Format::Mxfp8, false),
        ("nf4", Format::Nf4, false),
        ("nf4_double", Format::Nf4, true),
        ("fp4", Format::Fp4, false),
        ("int8", Format::Int8, false),
        ("int4", Format::Int4, false),
    ] {
        let o = tmp.join(format!("{name}.safetensors"));
        quantize_file(&QuantizeOptions {
            input: input.clone(),
            output: o.clone(),
            format,
            layout: None,
            block_size: None,
            double_quant: double,
            include: vec![],
            exclude: vec![],
            progress: false,
        })
        .with_context(|| format!("quantizing the {name} seed"))?;
        out.push((name.into(), std::fs::read(&o)?));
    }
    Ok(out)
}

fn llama2c_seed() -> Vec<u8> {
    // dim 8, hidden 16, 1 layer, 2 heads, 2 KV heads, vocab 4 (shared classifier), seq 4.
    let h = [8i32, 16, 1, 2, 2, 4, 4];
    let mut b: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = 4 * 8 + 8 + 4 * 64 + 8 + 3 * 16 * 8 + 8 + 2 * 4 * 2;
    b.extend(f32b(
        &(0..n).map(|i| (i % 5) as f32 * 0.1).collect::<Vec<_>>(),
    ));
    b
}

fn texts() -> Vec<String> {
    let mut v: Vec<String> = vec![
        "Hello world".into(),
        " leading and  double  spaces\n\ttabs".into(),
        "Once upon a time, there was a little girl named Lily.".into(),
        "ünïcödé 日本語 🦙 \u{200b}\u{feff}".into(),
        "<s> </s> <|im_start|>user<|im_end|> [CLS] [SEP] <unk>".into(),
        "1234567890 3.14159 -0x7f".into(),
        "a".repeat(300),
    ];
    if let Ok(inp) = std::fs::read_to_string(shared("tokenizers/ggml-vocab-llama-spm.gguf.inp")) {
        v.extend(
            inp.split("\n__ggml_vocab_test__\n")
                .take(12)
                .map(String::from),
        );
    }
    v
}

fn chat_seeds() -> Result<Vec<(String, Vec<u8>)>> {
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("tests/golden/llm/chat_templates.json"),
    )?)?;
    let mut out = vec![(
        "chatml".to_string(),
        format!("{}\0Hello there", trt_diff::pipelines::chat::CHATML).into_bytes(),
    )];
    for (i, c) in golden["cases"].as_array().into_iter().flatten().enumerate() {
        if let Some(t) = c["template"].as_str() {
            out.push((
                format!("golden{i:02}"),
                format!("{t}\0What is 2+2?").into_bytes(),
            ));
        }
    }
    Ok(out)
}

/// Writes every seed under `corpus/TARGET/seed-NAME`; returns how many.
pub fn write_all(corpus: &Path) -> Result<usize> {
    let tmp = tempfile::tempdir()?;
    let mut seeds: Vec<(&str, String, Vec<u8>)> = Vec::new();
    for (n, b) in onnx_seeds(tmp.path())? {
        seeds.push(("onnx", n, b));
    }
    seeds.push((
        "gguf",
        "llama_f32".into(),
        tiny_llama_gguf(tmp.path(), false)?,
    ));
    seeds.push((
        "gguf",
        "llama_q8".into(),
        tiny_llama_gguf(tmp.path(), true)?,
    ));
    seeds.push((
        "gguf",
        "dequant".into(),
        std::fs::read(repo().join("tests/golden/llm/dequant.gguf"))?,
    ));
    seeds.push((
        "gguf",
        "wpm".into(),
        std::fs::read(repo().join("tests/golden/llm/wpm/wpm.gguf"))?,
    ));
    for (n, b) in quant_seeds(tmp.path())? {
        if n == "plain" {
            seeds.push(("safetensors", n.clone(), b.clone()));
        }
        seeds.push(("quant_checkpoint", n, b));
    }
    seeds.push((
        "safetensors",
        "mixed".into(),
        safetensors_bytes(&[
            ("x", "F16", vec![2, 2], vec![0, 60, 0, 188, 0, 0, 0, 124]),
            ("y", "BF16", vec![3], vec![128, 63, 0, 0, 128, 191]),
            ("z", "F32", vec![], f32b(&[1.5])),
        ]),
    ));
    seeds.push(("llama2c", "tiny".into(), llama2c_seed()));
    {
        use trt_diff::backend::HostTensor;
        use trt_diff::onnx::DataType;
        for (name, dtype, shape, data) in [
            (
                "f32",
                DataType::FLOAT,
                vec![2, 3],
                f32b(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
            ),
            ("u8", DataType::UINT8, vec![2, 2, 2], (0..8).collect()),
            ("f16_scalar", DataType::FLOAT16, vec![], vec![0, 0x3c]),
        ] {
            let p = tmp.path().join("s.npy");
            trt_diff::backend::npy::write(&p, &HostTensor { dtype, shape, data })?;
            seeds.push(("npy", name.into(), std::fs::read(&p)?));
        }
    }
    for (i, t) in texts().into_iter().enumerate() {
        for target in ["tok_spm", "tok_bpe", "tok_wpm", "tok_clip", "tok_t5"] {
            seeds.push((target, format!("text{i:02}"), t.clone().into_bytes()));
        }
    }
    if let Ok(tok) = std::fs::read(shared("llm/tok512.bin")) {
        let mut b = 512u16.to_le_bytes().to_vec();
        b.extend(tok);
        seeds.push(("tok_llama2c", "tok512".into(), b));
    }
    for (n, b) in chat_seeds()? {
        seeds.push(("chat_template", n, b));
    }
    for (n, b) in server_seeds() {
        seeds.push(("server_request", n, b));
    }
    // The tiny Qwen tokenizer of the Z-Image golden folder (byte-level BPE, added special tokens).
    let qwen = repo().join("tests/golden/z_image/tokenizer/tokenizer.json");
    seeds.push(("hf_tokenizer", "qwen-tiny".into(), std::fs::read(&qwen)?));
    // A SentencePiece-style one (Llama's vocabulary cut to its test texts, byte fallback, Prepend normalizer).
    let spm = repo().join("tests/golden/llm/spm_tokenizer_json/tokenizer.json");
    seeds.push(("hf_tokenizer", "llama-spm-cut".into(), std::fs::read(&spm)?));
    for (target, name, bytes) in &seeds {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(seeds.len())
}

/// Valid bodies of each JSON route (the first byte picks the route, as `targets::server_request` reads it).
fn server_seeds() -> Vec<(String, Vec<u8>)> {
    let png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC";
    let bodies: Vec<(&str, String)> = vec![
        ("/v1/completions", r#"{"prompt": "Once upon a time", "max_tokens": 8, "stream": true, "stop": ["."], "logprobs": 2}"#.into()),
        ("/v1/completions", r#"{"prompt": [[1, 2, 3], "text"], "n": 2, "temperature": 0.5, "seed": 3}"#.into()),
        ("/v1/chat/completions", r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}], "max_completion_tokens": 4, "stream_options": {"include_usage": true}, "stream": true}"#.into()),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "json"}], "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}}"#.into()),
        ("/v1/generate", r#"{"prompt": "hi", "max_tokens": 4, "top_k": 5, "repeat_penalty": 1.1}"#.into()),
        ("/v1/images/generations", r#"{"prompt": "a fox", "n": 2, "size": "512x512", "response_format": "b64_json", "seed": 1, "steps": 4, "sampler": "DPM++ 2M Karras"}"#.into()),
        ("/sdapi/v1/txt2img", r#"{"prompt": "a fox", "negative_prompt": "blur", "steps": 20, "cfg_scale": 7, "width": 512, "height": 768, "seed": -1, "sampler_name": "Euler a", "scheduler": "Automatic", "batch_size": 2, "n_iter": 2}"#.into()),
        ("/sdapi/v1/img2img", format!(r#"{{"prompt": "a fox", "denoising_strength": 0.5, "init_images": ["data:image/png;base64,{png}"]}}"#)),
    ];
    let routes = trt_diff::server::BODY_ROUTES;
    bodies
        .into_iter()
        .enumerate()
        .map(|(i, (route, body))| {
            let pick = routes
                .iter()
                .position(|r| *r == route)
                .expect("a JSON route") as u8;
            let mut b = vec![pick];
            b.extend(body.into_bytes());
            (format!("{i:02}"), b)
        })
        .collect()
}
