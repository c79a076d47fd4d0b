//! `cargo bench --bench llm_tokens`: CPU tokens/s of trt-diff's decoder (ONNX Runtime) beside llama.cpp
//! (llama-cpp-python) on the same GGUF files and the same prompt ids, greedy, in one run:
//! - stories260K, converted to GGUF by `convert llama2c` (F32): 256-token prompt, 128 generated tokens;
//! - a random-weight GGUF with Qwen2.5-0.5B's shapes (F16, made by scripts/bench/make_random_gguf.py): 512-token
//!   prompt (time to first token), 128 generated tokens;
//! - the same file quantized to Q8_0 and Q4_K_M by llama.cpp's own quantizer (scripts/bench/quantize_gguf.py);
//! - a random-weight file with Llama 3.2 1B's shapes quantized to Q4_K_M likewise.
//!
//! `LLM_BENCH_ROUNDS` (default 2) repeats every row, alternating which engine goes first (this machine's memory
//! bandwidth moves by a third between minutes); a summary gives each file's generation ratio per round.
//!
//! Graphs: fp16 and fp32 are the TensorRT graphs run on ONNX Runtime; fp32-cpu and fp16-cpu are what `generate`
//! runs on the CPU (`models::llama_cpu`: weights in the file's type through trt-diff's operators, the KV cache in
//! place); ggml-cpu is the CPU graph of a quantized GGUF, which reads the file's blocks in place
//! (`backend::ggml_ops`).
//!
//! Bytes on disk: each quantized file built as `build` does by default (`--precision gguf`: the TensorRT graph and
//! plan keep the file's blocks as INT4/INT8 weights, the CPU graph reads the file in place), every file the build
//! wrote against the GGUF (`LLM_BENCH_BYTES=0` skips it; the plan needs the TensorRT-RTX builder). With
//! `LLM_BENCH_ONLY` set, a file's build runs when "MODEL bytes" contains one of its substrings (`bytes`: all).
//!
//! `LLM_BENCH_PYTHON` names a Python with numpy, gguf and llama-cpp-python (a venv outside the repository); without
//! it only trt-diff's side runs (the generated files must then already exist in target/tmp/llm_tokens).
//! `LLM_BENCH_THREADS` (default 2) sets both engines' threads; stories260K also runs on one thread (what
//! `generate` picks for models this small).
use std::path::{Path, PathBuf};
use std::process::Command;
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::pipelines::llm::{Generator, SamplingParams, TextTokenizer};
use trt_diff::quant::policy::Policy;

/// Generation that never stops early: random weights may well emit EOS.
struct NoEnd<'a>(&'a dyn TextTokenizer);
impl TextTokenizer for NoEnd<'_> {
    fn encode(&self, t: &str) -> Vec<u32> {
        self.0.encode(t)
    }
    fn piece_bytes(&self, prev: Option<u32>, id: u32) -> Vec<u8> {
        self.0.piece_bytes(prev, id)
    }
    fn bos(&self) -> Option<u32> {
        None
    }
    fn eos(&self) -> Option<u32> {
        None
    }
    fn is_end(&self, _: u32) -> bool {
        false
    }
}

struct Numbers {
    /// llama.cpp without weight repacking (see `peer`).
    plain: bool,
    prompt_tokens: usize,
    prompt_s: f64,
    generated: usize,
    gen_s: f64,
}

fn ids(n: usize, lo: u32, hi: u32) -> Vec<u32> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            lo + (x % (hi - lo) as u64) as u32
        })
        .collect()
}

fn ours(
    dir: &Path,
    gguf: &Path,
    precision: &str,
    prompt: &[u32],
    n_gen: usize,
    threads: usize,
) -> anyhow::Result<Numbers> {
    let g = trt_diff::weights::gguf::GgufFile::open(gguf)?;
    let vocab = trt_diff::tokenizer::llm_vocab::Vocab::from_gguf(&g)?;
    let m = trt_diff::weights::gguf_model::load(&g, Some(1024))?;
    let matrices = trt_diff::pipelines::llm_build::gguf_matrix_type(&g);
    drop(g);
    let p = trt_diff::pipelines::llm_build::linear_precision(trt_diff::quant::Precision::parse(
        &precision.trim_end_matches("-cpu").replace("ggml", "fp32"),
    )?)?;
    let onnx = dir.join(format!(
        "{}_{precision}.onnx",
        gguf.file_stem().unwrap().to_string_lossy()
    ));
    // "fp16-cpu", "fp32-cpu": the CPU graph `generate` runs (weights in the file's type through trt-diff's own
    // operators, the KV cache in place).
    let mut onnx = onnx;
    let graph = if precision == "ggml-cpu" {
        // Beside the GGUF, which its initializers point into.
        onnx = gguf.with_extension("ggml.cpu.onnx");
        let location = gguf.file_name().unwrap().to_string_lossy().into_owned();
        let gw = trt_diff::backend::ggml_ops::block_weights(&g2(gguf)?, &m.config, &location)?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: a matrix type the CPU operators do not read",
                    gguf.display()
                )
            })?;
        trt_diff::models::llama_cpu::decoder_graph_cpu_gguf(&m.config, &m.tensors, &gw, true)?
    } else if precision.ends_with("-cpu") {
        trt_diff::models::llama_cpu::decoder_graph_cpu(
            &m.config,
            &m.tensors,
            matrices.ok_or_else(|| {
                anyhow::anyhow!("{}: mixed or quantized matrices", gguf.display())
            })?,
            true,
        )?
    } else {
        trt_diff::models::llama::decoder_graph_with(
            &m.config,
            &m.tensors,
            &Policy::uniform(p),
            true,
        )?
    };
    drop(m.tensors);
    trt_diff::onnx::save(graph, &onnx, &Default::default())?;
    let mut engine = OrtEngine::open(
        &onnx,
        &OrtOptions {
            threads,
            ..Default::default()
        },
    )?;
    let c = &m.config;
    let mut g = Generator {
        engine: &mut engine,
        max_seq_len: c.max_seq_len,
    };
    let tok = NoEnd(&vocab);
    let params = |n| SamplingParams {
        max_tokens: n,
        ..Default::default()
    };
    // Warm-up: ORT's first runs allocate and pick kernels.
    g.generate_tokens(&tok, prompt[..8].to_vec(), &params(4), |_| Ok(()))?;
    let s = g.generate_tokens(&tok, prompt.to_vec(), &params(n_gen), |_| Ok(()))?;
    drop(engine);
    Ok(Numbers {
        plain: false,
        prompt_tokens: s.prompt_tokens,
        prompt_s: s.prompt_seconds,
        generated: s.generated_tokens,
        gen_s: s.generation_seconds,
    })
}

fn g2(gguf: &Path) -> anyhow::Result<trt_diff::weights::gguf::GgufFile> {
    trt_diff::weights::gguf::GgufFile::open(gguf)
}

fn peer(
    python: &Path,
    gguf: &Path,
    prompt: &[u32],
    n_gen: usize,
    threads: usize,
) -> anyhow::Result<Numbers> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/bench/llm_peer.py");
    let list: Vec<String> = prompt.iter().map(u32::to_string).collect();
    let run = |plain: bool| {
        let mut c = Command::new(python);
        c.args([
            script,
            gguf.to_str().unwrap(),
            &list.join(","),
            &n_gen.to_string(),
            &threads.to_string(),
        ]);
        if plain {
            c.env("LLM_PEER_NO_EXTRA_BUFTS", "1");
        }
        c.output()
    };
    let mut out = run(false)?;
    let mut plain = false;
    if out.status.code().is_none() {
        // Killed by a signal: llama.cpp's weight repacking crashes on some CPUs (Q8_0 on an AMX VM); its plain
        // kernels then.
        out = run(true)?;
        plain = true;
    }
    anyhow::ensure!(
        out.status.success(),
        "llm_peer.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let j: serde_json::Value = serde_json::from_str(line.lines().last().unwrap_or(""))?;
    // llama.cpp generates n_gen tokens after the prefill's first one; count like ours (first token in the prefill).
    Ok(Numbers {
        plain,
        prompt_tokens: j["prompt_tokens"].as_u64().unwrap_or(0) as usize,
        prompt_s: j["prompt_seconds"].as_f64().unwrap_or(f64::NAN),
        generated: j["generated"].as_u64().unwrap_or(0) as usize,
        gen_s: j["generation_seconds"].as_f64().unwrap_or(f64::NAN),
    })
}

fn row(model: &str, engine: &str, threads: usize, n: &Numbers) {
    println!(
        "| {model} | {engine} | {threads} | {} | {:.1} | {:.3} | {:.1} |",
        n.prompt_tokens,
        n.prompt_tokens as f64 / n.prompt_s,
        n.prompt_s,
        n.generated as f64 / n.gen_s
    );
}

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("llm_tokens");
    std::fs::create_dir_all(&dir)?;
    let data = std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data")));
    let threads: usize = std::env::var("LLM_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let python = std::env::var_os("LLM_BENCH_PYTHON").map(PathBuf::from);
    let stories = dir.join("stories260K.gguf");
    trt_diff::pipelines::llm_convert::llama2c_to_gguf(
        &data.join("llm/stories260K.bin"),
        &data.join("llm/tok512.bin"),
        &stories,
    )?;
    // Random-weight files with real models' shapes, F16, then quantized by llama.cpp itself: `script` with `args`
    // writes `out` unless it exists.
    let script = |name: &str, out: &Path, args: &[&str]| -> anyhow::Result<()> {
        if out.exists() {
            return Ok(());
        }
        let py = python.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{} is missing: set LLM_BENCH_PYTHON to a Python with numpy, gguf and llama-cpp-python",
                out.display()
            )
        })?;
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("scripts/bench")
            .join(name);
        let st = Command::new(py).arg(path).args(args).status()?;
        anyhow::ensure!(st.success(), "{name} {args:?} failed");
        Ok(())
    };
    let make = |shape: &str, out: &Path, vocab: &str| {
        let vocab = data.join("tokenizers").join(vocab);
        script(
            "make_random_gguf.py",
            out,
            &[shape, out.to_str().unwrap(), vocab.to_str().unwrap()],
        )
    };
    let quantize = |f16: &Path, out: &Path, kind: &str| {
        let t = threads.to_string();
        script(
            "quantize_gguf.py",
            out,
            &[f16.to_str().unwrap(), out.to_str().unwrap(), kind, &t],
        )
    };
    let qwen = dir.join("qwen05b_f16.gguf");
    make("qwen2.5-0.5b", &qwen, "ggml-vocab-qwen2.gguf")?;
    let mut quantized = Vec::new();
    for kind in ["Q8_0", "Q4_K_M"] {
        let out = dir.join(format!("qwen05b_{}.gguf", kind.to_lowercase()));
        quantize(&qwen, &out, kind)?;
        quantized.push((format!("Qwen2.5-0.5B-shaped ({kind})"), out));
    }
    // Llama 3.2 1B's shapes: 2048-wide rows, so Q4_K_M is Q4_K and Q6_K throughout (no Q5_0 fallback). Only the
    // quantized file is kept (the F16 one is 2.5 GB).
    let llama = dir.join("llama32_1b_q4_k_m.gguf");
    if !llama.exists() {
        let f16 = dir.join("llama32_1b_f16.gguf");
        make("llama-3.2-1b", &f16, "ggml-vocab-gpt-2.gguf")?;
        quantize(&f16, &llama, "Q4_K_M")?;
        std::fs::remove_file(&f16)?;
    }
    quantized.push(("Llama-3.2-1B-shaped (Q4_K_M)".into(), llama));
    // (name, file, graph precisions, prompt ids, tokens to generate, thread counts)
    type Case<'a> = (
        &'a str,
        &'a Path,
        &'a [&'a str],
        Vec<u32>,
        usize,
        Vec<usize>,
    );
    let mut story_threads = vec![1, threads];
    story_threads.dedup();
    let cases: [Case; 5] = [
        (
            "stories260K (F32)",
            &stories,
            &["fp32", "fp32-cpu"],
            ids(256, 3, 512),
            128,
            story_threads,
        ),
        (
            "Qwen2.5-0.5B-shaped (F16)",
            &qwen,
            &["fp16", "fp32", "fp16-cpu"],
            ids(512, 1000, 100_000),
            128,
            vec![threads],
        ),
        (
            &quantized[0].0,
            &quantized[0].1,
            &["ggml-cpu"],
            ids(512, 1000, 100_000),
            128,
            vec![threads],
        ),
        (
            &quantized[1].0,
            &quantized[1].1,
            &["ggml-cpu"],
            ids(512, 1000, 100_000),
            128,
            vec![threads],
        ),
        (
            &quantized[2].0,
            &quantized[2].1,
            &["ggml-cpu"],
            ids(512, 1000, 100_000),
            128,
            vec![threads],
        ),
    ];
    let rounds: usize = std::env::var("LLM_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
        .max(1);
    println!(
        "time to first token = processing the whole prompt and producing the first token's logits\n"
    );
    println!(
        "| model | engine | threads | prompt tokens | prompt tok/s | time to first token (s) | generation tok/s |"
    );
    println!("|---|---|---|---|---|---|---|");
    // LLM_BENCH_ONLY=SUBSTRING[|SUBSTRING...]: only rows whose "model precision" contains one (peers run with any
    // selected row).
    let only = std::env::var("LLM_BENCH_ONLY").unwrap_or_default();
    // (file, engine, threads) -> generation tok/s and prompt tok/s per round.
    // (generation tok/s, prompt tok/s) per round.
    type Rounds = Vec<(f64, f64)>;
    type Pair = ((f64, f64), (f64, f64));
    let mut summary: Vec<(String, String, Rounds)> = Vec::new();
    let mut record = |model: &str, engine: &str, n: &Numbers| {
        let key = (model.to_string(), engine.to_string());
        let v = (
            n.generated as f64 / n.gen_s,
            n.prompt_tokens as f64 / n.prompt_s,
        );
        match summary
            .iter_mut()
            .find(|e| (&e.0, &e.1) == (&key.0, &key.1))
        {
            Some(e) => e.2.push(v),
            None => summary.push((key.0, key.1, vec![v])),
        }
    };
    for round in 0..rounds {
        for (name, file, precisions, prompt, n_gen, thread_counts) in &cases {
            for &t in thread_counts {
                let picked: Vec<&&str> = precisions
                    .iter()
                    .filter(|p| only.split('|').any(|o| format!("{name} {p}").contains(o)))
                    .collect();
                if picked.is_empty() {
                    continue;
                }
                let run_peer = |record: &mut dyn FnMut(&str, &str, &Numbers)| {
                    if let Some(py) = &python {
                        match peer(py, file, prompt, *n_gen, t) {
                            Ok(n) => {
                                let label = if n.plain {
                                    "llama.cpp (llama-cpp-python, no weight repacking: it crashes here)"
                                } else {
                                    "llama.cpp (llama-cpp-python)"
                                };
                                row(name, label, t, &n);
                                record(name, &format!("llama.cpp t{t}"), &n);
                            }
                            Err(e) => println!("| {name} | llama.cpp | {t} | failed: {e} | | | |"),
                        }
                    }
                };
                // Alternate which engine runs first.
                if round % 2 == 1 {
                    run_peer(&mut record);
                }
                for p in &picked {
                    let n = ours(&dir, file, p, prompt, *n_gen, t)?;
                    row(
                        name,
                        &format!("trt-diff (ONNX Runtime CPU, {p} graph)"),
                        t,
                        &n,
                    );
                    record(name, &format!("{p} t{t}"), &n);
                }
                if round % 2 == 0 {
                    run_peer(&mut record);
                }
            }
        }
    }
    if python.is_some() {
        println!(
            "\nGeneration and prompt speed against llama.cpp on the same file, per round (ours / llama.cpp):\n"
        );
        println!(
            "| model | graph | generation tok/s (ours; llama.cpp) | generation ratio | prompt ratio |"
        );
        println!("|---|---|---|---|---|");
        for (model, engine, v) in summary.iter().filter(|e| !e.1.starts_with("llama.cpp")) {
            let t = engine.rsplit(' ').next().unwrap_or("");
            let Some(peer) = summary
                .iter()
                .find(|e| &e.0 == model && e.1 == format!("llama.cpp {t}"))
            else {
                continue;
            };
            let pairs: Vec<Pair> = v.iter().copied().zip(peer.2.iter().copied()).collect();
            let list =
                |f: &dyn Fn(&Pair) -> String| pairs.iter().map(f).collect::<Vec<_>>().join(", ");
            println!(
                "| {model} | {engine} | {} | {} | {} |",
                list(&|p| format!("{:.1}; {:.1}", p.0.0, p.1.0)),
                list(&|p| format!("{:.2}x", p.0.0 / p.1.0)),
                list(&|p| format!("{:.2}x", p.0.1 / p.1.1)),
            );
        }
    }
    if std::env::var("LLM_BENCH_BYTES").is_ok_and(|v| v == "0") {
        return Ok(());
    }
    println!("\nBytes on disk of a default build (`--precision gguf`), against the GGUF:\n");
    println!(
        "| model | GGUF (MB) | TensorRT plan | TensorRT graph (ONNX, not kept) | CPU graph | tokenizer, manifest | all written |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (name, file) in &quantized {
        let selected = only.split('|').any(|o| format!("{name} bytes").contains(o));
        if !only.is_empty() && !selected {
            continue;
        }
        let out_dir = dir.join(format!(
            "bytes_{}",
            file.file_stem().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir_all(&out_dir)?;
        let opts = trt_diff::trt::BuildOptions {
            out: out_dir.join("m.plan"),
            progress: false,
            ..Default::default()
        };
        trt_diff::pipelines::llm_build::build_llm(
            file,
            trt_diff::pipelines::llm_build::LlmSource::Gguf,
            trt_diff::quant::Precision::Gguf,
            None,
            &Default::default(),
            &opts,
        )?;
        let gguf = std::fs::metadata(file)?;
        let mb = |b: u64| format!("{:.1}", b as f64 / 1e6);
        let (mut plan, mut trt_graph, mut cpu, mut other) = (0u64, 0u64, 0u64, 0u64);
        for e in std::fs::read_dir(&out_dir)?.flatten() {
            let meta = e.metadata()?;
            // The CPU graph's hard link to the GGUF itself costs nothing.
            if std::os::unix::fs::MetadataExt::ino(&meta)
                == std::os::unix::fs::MetadataExt::ino(&gguf)
            {
                continue;
            }
            let n = e.file_name().to_string_lossy().into_owned();
            let slot = if n == "m.plan" {
                &mut plan
            } else if n.starts_with("m.cpu.onnx") {
                &mut cpu
            } else if n.starts_with("m.onnx") {
                &mut trt_graph
            } else {
                &mut other
            };
            *slot += meta.len();
        }
        let all = plan + trt_graph + cpu + other;
        let ratio = |b: u64| format!("{:.2}x", b as f64 / gguf.len() as f64);
        println!(
            "| {name} | {} | {} ({}) | {} | {} | {} | {} ({}) |",
            mb(gguf.len()),
            mb(plan),
            ratio(plan),
            mb(trt_graph),
            mb(cpu),
            mb(other),
            mb(all),
            ratio(all),
        );
    }
    Ok(())
}
