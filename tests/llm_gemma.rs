//! Tiny random Gemma 2 and Gemma 3 decoders (scripts/golden/llm_gemma.py) from Hugging Face folders and from GGUF
//! match transformers' Gemma2ForCausalLM / Gemma3ForCausalLM logits through prefill and KV-cache decode, on the
//! TensorRT graph, the CPU graph and the CUDA-provider graph form (run here by ONNX Runtime's CPU provider). What they
//! exercise: windowed layers (4 keys, shorter than the 12-token prompt) interleaved with global ones (every other
//! layer; five in six), GeGLU, the norms on the attention's and MLP's outputs, norm weights stored as offsets from
//! 1, scaled embeddings, Gemma 2's attention and final soft-capping (set low enough to change the logits), Gemma 3's
//! q/k norms, local RoPE base and linearly scaled global RoPE. The GGUF files are also run by llama.cpp
//! (scripts/golden/llm_gemma_llamacpp.py): its Q8_0 quantization of them is read in place and compared with
//! llama.cpp's logits on the same file.
use super::llm_archs::{check, golden, golden_dir, run_graph};
use crate::common::s;
use trt_diff::models::llama::{LlamaConfig, MlpAct, RopeScaling, decoder_graph};
use trt_diff::onnx::DataType;
use trt_diff::quant::LinearPrecision;
use trt_diff::quant::policy::Policy;
use trt_diff::weights::gguf::GgufFile;

fn trt(
    c: &LlamaConfig,
    w: &std::collections::HashMap<String, Vec<f32>>,
) -> trt_diff::onnx::proto::ModelProto {
    decoder_graph(c, w, &Policy::uniform(LinearPrecision::F32)).unwrap()
}

#[test]
fn hf_and_gguf_gemma2_and_gemma3_match_transformers_on_every_graph() {
    for arch in ["gemma2", "gemma3"] {
        let (all, want) = golden(arch);
        let d = tempfile::tempdir().unwrap();
        let hf = trt_diff::weights::hf::load(&golden_dir(arch), None).unwrap();
        let c = &hf.config;
        assert_eq!(
            hf.arch,
            if arch == "gemma3" {
                "gemma3_text"
            } else {
                arch
            }
        );
        assert!(c.sandwich_norms && c.tied_embeddings, "{arch}");
        assert_eq!(c.mlp_act, MlpAct::GeluTanh);
        assert_eq!(c.embed_scale, Some(32f32.sqrt()));
        assert_eq!(c.sliding_window, Some(4));
        let global: Vec<usize> = (0..c.n_layers)
            .filter(|&i| c.layer_window(i).is_none())
            .collect();
        if arch == "gemma2" {
            assert_eq!(global, [1], "every other layer is global");
            assert_eq!((c.attn_softcap, c.final_softcap), (Some(1.5), Some(3.0)));
            assert_eq!(c.local_rope_theta, None);
        } else {
            assert_eq!(global, [5], "one layer in six is global");
            assert!(c.qk_norm);
            assert_eq!(c.local_rope_theta, Some(10_000.0));
            assert_eq!(c.rope_theta, 1e6);
            assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 8.0 }));
        }
        // transformers stores Gemma's norms as offsets from 1; they are read as the factors.
        let st = trt_diff::weights::safetensors_file::Checkpoint::open(
            &golden_dir(arch).join("model.safetensors"),
        )
        .unwrap();
        let stored = st.get("model.norm.weight").unwrap().to_f32().unwrap();
        assert_eq!(hf.tensors["model.norm.weight"][0], stored[0] + 1.0);

        check(
            &format!("{arch} HF, TensorRT graph"),
            &run_graph(d.path(), "hf_trt", trt(c, &hf.tensors), c, &all, 6),
            &want,
        );
        let cpu =
            trt_diff::models::llama_cpu::decoder_graph_cpu(c, &hf.tensors, DataType::FLOAT, false)
                .unwrap();
        check(
            &format!("{arch} HF, CPU graph"),
            &run_graph(d.path(), "hf_cpu", cpu, c, &all, 4),
            &want,
        );
        let cuda =
            trt_diff::models::llama_cpu::decoder_graph_cuda(c, &hf.tensors, DataType::FLOAT, false)
                .unwrap();
        check(
            &format!("{arch} HF, CUDA graph form"),
            &run_graph(d.path(), "hf_cuda", cuda, c, &all, 5),
            &want,
        );

        let gguf = d.path().join("model.gguf");
        std::fs::copy(golden_dir(arch).join(format!("tiny_{arch}.gguf")), &gguf).unwrap();
        let g = GgufFile::open(&gguf).unwrap();
        let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
        assert_eq!(m.arch, arch);
        assert_eq!(
            m.config, hf.config,
            "{arch}: GGUF and config.json describe the same model"
        );
        let c = &m.config;
        check(
            &format!("{arch} GGUF, TensorRT graph"),
            &run_graph(d.path(), "gguf_trt", trt(c, &m.tensors), c, &all, 3),
            &want,
        );
        let gw = trt_diff::backend::ggml_ops::block_weights(&g, c, "model.gguf")
            .unwrap()
            .expect("F16 matrices are read in place");
        let graph =
            trt_diff::models::llama_cpu::decoder_graph_cpu_gguf(c, &m.tensors, &gw, false).unwrap();
        check(
            &format!("{arch} GGUF, CPU graph on in-place F16 matrices"),
            &run_graph(d.path(), "model.cpu", graph, c, &all, 5),
            &want,
        );
    }
}

/// llama.cpp's logits rows of `kind` ("f16" or "q8_0") on the golden GGUF of `arch`.
fn llama_cpp_logits(arch: &str, kind: &str) -> Vec<Vec<f64>> {
    let j: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir(arch).join("llamacpp.json")).unwrap(),
    )
    .unwrap();
    serde_json::from_value(j[kind].clone()).unwrap()
}

fn max_diff(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn llama_cpp_q8_0_gemma_files_run_in_place_as_llama_cpp_runs_them() {
    for arch in ["gemma2", "gemma3"] {
        let (all, want) = golden(arch);
        let (cpp_f16, cpp_q8) = (
            llama_cpp_logits(arch, "f16"),
            llama_cpp_logits(arch, "q8_0"),
        );
        // llama.cpp itself, on the F16 file, is transformers' model (its activations round to 16 bits on the way).
        let scale = want.iter().flatten().fold(0.0f64, |m, x| m.max(x.abs()));
        let cpp_f16_err = max_diff(&cpp_f16, &want) / scale;
        assert!(
            cpp_f16_err < 5e-3,
            "{arch}: llama.cpp F16 is {cpp_f16_err:.2e} from transformers"
        );

        let d = tempfile::tempdir().unwrap();
        let gguf = d.path().join("q8.gguf");
        std::fs::copy(
            golden_dir(arch).join(format!("tiny_{arch}_q8_0.gguf")),
            &gguf,
        )
        .unwrap();
        let g = GgufFile::open(&gguf).unwrap();
        let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
        let c = &m.config;
        let gw = trt_diff::backend::ggml_ops::block_weights(&g, c, "q8.gguf")
            .unwrap()
            .expect("Q8_0 matrices are read in place");
        assert!(
            gw.tensors.values().any(|t| t.kind.ggml().0 == 8),
            "llama.cpp's quantizer made Q8_0 matrices"
        );
        let graph =
            trt_diff::models::llama_cpu::decoder_graph_cpu_gguf(c, &m.tensors, &gw, false).unwrap();
        let ours = run_graph(d.path(), "q8.cpu", graph, c, &all, 1);
        // The same blocks dequantized into the f32 TensorRT graph: no activation quantization.
        let deq = run_graph(d.path(), "deq", trt(c, &m.tensors), c, &all, 1);
        let rel = |a: &[Vec<f64>], b: &[Vec<f64>]| max_diff(a, b) / scale;
        let (ours_tf, cpp_tf) = (rel(&ours, &want), rel(&cpp_q8, &want));
        let (ours_deq, cpp_deq) = (rel(&ours, &deq), rel(&cpp_q8, &deq));
        eprintln!(
            "{arch} Q8_0 in place, of the largest logit: from transformers' f32 model ours {ours_tf:.2e}, llama.cpp \
             {cpp_tf:.2e}; from the dequantized f32 graph ours {ours_deq:.2e}, llama.cpp {cpp_deq:.2e}; ours from \
             llama.cpp {:.2e}",
            rel(&ours, &cpp_q8)
        );
        // Both quantize activations per 32-value block to 8 bits, which in a model this narrow moves logits about
        // as much as the weights' quantization does: ours must err no more than llama.cpp does on the same file.
        assert!(
            ours_tf < 1.5 * cpp_tf,
            "{arch}: {ours_tf:.2e} vs {cpp_tf:.2e}"
        );
        assert!(
            ours_deq < 1.5 * cpp_deq,
            "{arch}: {ours_deq:.2e} vs {cpp_deq:.2e}"
        );
    }
}

#[test]
fn gemma3_multimodal_checkpoints_run_their_text_model() {
    // Gemma 3 4B/12B/27B ship as Gemma3ForConditionalGeneration: the text config under `text_config` (most keys
    // left at transformers' defaults), the decoder under `language_model.model.*`, a vision tower beside it.
    let d = tempfile::tempdir().unwrap();
    let src = golden_dir("gemma3");
    let text: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let cfg = serde_json::json!({
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8},
    });
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let vision = [1u8; 8];
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n.replacen("model.", "language_model.model.", 1), t))
        .collect();
    views.push((
        "vision_tower.vision_model.embeddings.patch_embedding.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![4], &vision).unwrap(),
    ));
    safetensors::serialize_to_file(views, None, &d.path().join("model.safetensors")).unwrap();
    let mm = trt_diff::weights::hf::load(d.path(), None).unwrap();
    let plain = trt_diff::weights::hf::load(&src, None).unwrap();
    assert_eq!(mm.config, plain.config);
    assert_eq!(mm.tensors, plain.tensors);
}

#[test]
fn gemma_configs_the_decoders_cannot_run_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let src = golden_dir("gemma2");
    std::fs::copy(
        src.join("model.safetensors"),
        d.path().join("model.safetensors"),
    )
    .unwrap();
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let load = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut cfg = base.clone();
        edit(&mut cfg);
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        trt_diff::weights::hf::load(d.path(), None)
    };
    let refused =
        |edit: &dyn Fn(&mut serde_json::Value)| format!("{:#}", load(edit).err().unwrap());
    let e = refused(&|c| {
        c["layer_types"] =
            serde_json::json!(["full_attention", "sliding_attention", "sliding_attention"]);
    });
    assert!(
        e.contains("layer_types") && e.contains("i % n < n - 1"),
        "{e}"
    );
    let e = refused(&|c| c["layer_types"] = serde_json::json!(["sliding_attention"]));
    assert!(e.contains("lists 1 layers") && e.contains("corrupt"), "{e}");
    let e = refused(&|c| c["hidden_activation"] = "relu2".into());
    assert!(
        e.contains("'relu2'") && e.contains("gelu_pytorch_tanh"),
        "{e}"
    );
    // A query_pre_attn_scalar other than the head size (Gemma 2 27B's) sets the attention scale.
    let m = load(&|c| c["query_pre_attn_scalar"] = 8.into()).unwrap();
    assert_eq!(m.config.attention_scale(), 1.0 / 8f32.sqrt());
    // Every layer windowed, or none: no pattern.
    let m = load(&|c| {
        c["layer_types"] = serde_json::json!(["full_attention", "full_attention", "full_attention"])
    })
    .unwrap();
    assert_eq!(
        (m.config.sliding_window, m.config.swa_pattern),
        (None, None)
    );
}

#[test]
fn quantized_gemma_gguf_runs_from_any_folder_directly_and_after_build() {
    // The in-place CPU graph reads the GGUF's blocks through a hard link beside it (ONNX Runtime refuses external
    // data that leads out of the graph's folder, so a symbolic link would not load).
    use std::os::unix::fs::MetadataExt;
    let d = tempfile::tempdir().unwrap();
    let (models, out) = (d.path().join("models"), d.path().join("out"));
    std::fs::create_dir_all(&models).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let gguf = models.join("gemma3-q8_0.gguf");
    std::fs::copy(golden_dir("gemma3").join("tiny_gemma3_q8_0.gguf"), &gguf).unwrap();
    let cache = d.path().join("cache");
    let cache = cache.to_str().unwrap();
    let generate = |engine: &std::path::Path| {
        let r = crate::common::run_env(
            &[
                "generate",
                "--engine",
                s(engine),
                "--prompt",
                "t1 t2",
                "--max-tokens",
                "4",
            ],
            &[("TRT_DIFF_MODEL_CACHE", cache)],
            true,
        );
        assert!(r.stderr.contains("generated: 4 tokens"), "{}", r.stderr);
    };
    generate(&gguf);
    let plan = out.join("g.plan");
    crate::common::run(
        &[
            "build",
            s(&gguf),
            "--onnx-only",
            "--no-progress",
            "--out",
            s(&plan),
        ],
        true,
    );
    // The cache holds the GPU graph `build` writes by default (the file's blocks as INT4 weights), not an f16 copy.
    let graph_bytes = |dir: &std::path::Path| -> u64 {
        let mut files = vec![dir.to_path_buf()];
        let mut total = 0;
        while let Some(f) = files.pop() {
            if f.is_dir() {
                files.extend(std::fs::read_dir(&f).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".onnx.data") && !name.contains(".cpu.onnx") {
                total += f.metadata().unwrap().len();
            }
        }
        total
    };
    let (cached, by_hand) = (graph_bytes(std::path::Path::new(cache)), graph_bytes(&out));
    // (Weights only: an f16 graph's are 188 KB here, the blocks' 74 KB.)
    assert!(
        by_hand > 0 && cached.abs_diff(by_hand) * 100 <= by_hand,
        "cache's GPU graph weights {cached} bytes, build's {by_hand}"
    );
    let weights = out.join("g.weights.gguf");
    let meta = std::fs::symlink_metadata(&weights).unwrap();
    assert!(
        meta.file_type().is_file() && meta.nlink() == 3,
        "a hard link to the GGUF (as the model cache made one)"
    );
    generate(&plan);
}

#[test]
fn gemma3_with_a_context_inside_the_window_keeps_its_local_rope() {
    // `--max-context 4` with a window of 4: the window no longer hides any key, but Gemma 3's local layers still
    // rotate with their own RoPE base, so the first 4 positions keep transformers' logits.
    let (all, want) = golden("gemma3");
    let hf = trt_diff::weights::hf::load(&golden_dir("gemma3"), Some(4)).unwrap();
    let c = &hf.config;
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.local_rope_theta, Some(10_000.0));
    assert!(c.local_rope(0) && !c.local_rope(5));
    let d = tempfile::tempdir().unwrap();
    let (ids, want) = (&all[..4], &want[..4]);
    check(
        "gemma3 at a 4-token context, TensorRT graph",
        &run_graph(d.path(), "trt", trt(c, &hf.tensors), c, ids, 2),
        want,
    );
    let cpu =
        trt_diff::models::llama_cpu::decoder_graph_cpu(c, &hf.tensors, DataType::FLOAT, false)
            .unwrap();
    check(
        "gemma3 at a 4-token context, CPU graph",
        &run_graph(d.path(), "cpu", cpu, c, ids, 3),
        want,
    );
}

#[test]
fn gemma_cuda_graph_computes_in_bfloat16_even_from_float16_weights() {
    // The golden Gemma 2 stored as float16: its CPU graph keeps float16 matrices, its CUDA graph takes bfloat16
    // (Gemma's activations overflow float16).
    let d = tempfile::tempdir().unwrap();
    let src = golden_dir("gemma2");
    let m = d.path().join("gemma2-f16");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(src.join("config.json"), m.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<u8> = t
                .data()
                .chunks_exact(2)
                .flat_map(|b| {
                    let x = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                    half::f16::from_f32(x).to_le_bytes()
                })
                .collect();
            (n, t.shape().to_vec(), v)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, v)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F16, s.clone(), v)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &m.join("model.safetensors")).unwrap();
    let plan = d.path().join("g.plan");
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_trt-diff"))
        .arg("build")
        .arg(&m)
        .arg("--tokenizer")
        .arg(src.join("tiny_gemma2_q8_0.gguf"))
        .args([
            "--precision",
            "fp16",
            "--onnx-only",
            "--no-progress",
            "--out",
        ])
        .arg(&plan)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let types = |f: &str| -> std::collections::BTreeSet<i32> {
        let o = trt_diff::onnx::OnnxFile::load(&d.path().join(f)).unwrap();
        o.model
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .filter(|t| t.name.contains("mlp.down_proj"))
            .map(|t| t.data_type)
            .collect()
    };
    assert_eq!(types("g.cpu.onnx"), [DataType::FLOAT16.0].into());
    assert_eq!(types("g.cuda.onnx"), [DataType::BFLOAT16.0].into());
}
