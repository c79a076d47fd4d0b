//! `--precision gguf`: the TensorRT graph of a quantized GGUF keeps the file's blocks as INT4 weight-only DQs
//! (8-bit codes in two INT4 halves; Q8_0, Q4_0, Q6_K, Q4_K exactly, codes and block scales as stored), the embedding
//! table once for the lookup and the tied LM head. Run here through ONNX Runtime: the products compute in f16
//! (W4A16; f32 for Gemma) and give the same blocks dequantized into an f32 graph to f16 rounding; llama.cpp's
//! Q4_K_M file stays as close to llama.cpp's logits as that graph does.
use super::llm_gguf::{cpu_graph_logits, data, golden, stories_rewritten};
use crate::common::{run, s};
use std::collections::HashMap;
use trt_diff::models::llama::{DecoderOptions, LlamaConfig, decoder_graph_opts};
use trt_diff::onnx::DataType;
use trt_diff::quant::LinearPrecision;
use trt_diff::quant::int::{Bits, IntBlocks};
use trt_diff::quant::policy::Policy;
use trt_diff::weights::gguf::GgufFile;

/// The f32 TensorRT graph, its matrices from `blocks` where given (INT4 DQs only: the form ONNX Runtime's CUDA
/// provider runs), saved as `name`.
fn trt_graph(
    dir: &std::path::Path,
    name: &str,
    c: &LlamaConfig,
    w: &HashMap<String, Vec<f32>>,
    blocks: Option<&HashMap<String, IntBlocks>>,
) -> std::path::PathBuf {
    trt_graph_with(dir, name, c, w, blocks, true)
}

fn trt_graph_with(
    dir: &std::path::Path,
    name: &str,
    c: &LlamaConfig,
    w: &HashMap<String, Vec<f32>>,
    blocks: Option<&HashMap<String, IntBlocks>>,
    int4_only: bool,
) -> std::path::PathBuf {
    let amax = HashMap::new();
    let policy = Policy::uniform(LinearPrecision::F32);
    let (graph, _) = decoder_graph_opts(
        c,
        w,
        &DecoderOptions {
            policy: &policy,
            last_logits_only: true,
            amax: &amax,
            calibration: false,
            blocks,
            int4_only,
        },
    )
    .unwrap();
    let path = dir.join(name);
    trt_diff::onnx::save(graph, &path, &Default::default()).unwrap();
    path
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Initializer types of an ONNX file, with their bytes.
fn initializer_bytes(onnx: &std::path::Path) -> HashMap<i32, u64> {
    let f = trt_diff::onnx::OnnxFile::load(onnx).unwrap();
    let mut by_type = HashMap::new();
    for t in f.model.graph.iter().flat_map(|g| &g.initializer) {
        let n: i64 = t.dims.iter().product();
        let bits = match DataType(t.data_type) {
            DataType::INT4 => 4,
            DataType::INT8 => 8,
            DataType::FLOAT16 => 16,
            DataType::INT64 => 64,
            _ => 32,
        };
        *by_type.entry(t.data_type).or_default() += (n as u64 * bits).div_ceil(8);
    }
    by_type
}

#[test]
fn q8_0_and_q4_0_blocks_go_into_the_tensorrt_graph_as_stored() {
    let d = tempfile::tempdir().unwrap();
    let ids = [1, 403, 407, 261, 378, 411, 422, 325, 290];
    for (name, bits) in [("q8", Bits::Int8), ("q4", Bits::Int4)] {
        let gguf = stories_rewritten(d.path(), &format!("{name}.gguf"), |w, name, shape, v| {
            if shape.len() == 2 && shape[1] % 32 == 0 {
                match bits {
                    Bits::Int4 => w.add_q4_0(name, shape, v).unwrap(),
                    Bits::Int8 => w.add_q8_0(name, shape, v).unwrap(),
                }
            } else if shape.len() == 2 {
                w.add_f16(name, shape, v);
            } else {
                w.add_f32(name, shape, v);
            }
        });
        let g = GgufFile::open(&gguf).unwrap();
        let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
        let blocks = trt_diff::weights::gguf_model::int_blocks(&g, &m.config).unwrap();
        // Every matrix with 32-wide blocks (all but the 172-wide FFN rows, which the file keeps in F16), the tied
        // LM head through the embedding table.
        assert!(m.config.tied_embeddings);
        let mut names: Vec<&str> = blocks.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names.len(), 1 + 5 * 6, "{names:?}");
        assert!(names.contains(&"model.embed_tokens.weight"));
        for (k, b) in &blocks {
            assert_eq!(b.bits, bits, "{k}");
            // Q4_0 blocks of negative `d` are flipped, with an offset where -(-8) does not fit.
            assert_eq!(b.offsets.is_some(), bits == Bits::Int4, "{k}");
            // Codes times the file's own block scales (plus, for a flipped Q4_0 block, its offset) are the
            // file's values.
            assert!(
                b.scales.iter().all(|&s| s > 0.0),
                "TensorRT takes positive scales only"
            );
            let err = b
                .dequantize()
                .iter()
                .zip(&m.tensors[k])
                .map(|(a, w)| (a - w).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-6, "{name}: {k}: {err}");
        }
        let with = trt_graph(
            d.path(),
            &format!("{name}.blocks.onnx"),
            &m.config,
            &m.tensors,
            Some(&blocks),
        );
        let plain = trt_graph(
            d.path(),
            &format!("{name}.f32.onnx"),
            &m.config,
            &m.tensors,
            None,
        );
        let (ours, want) = (
            cpu_graph_logits(&with, &ids),
            cpu_graph_logits(&plain, &ids),
        );
        let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let diff = max_diff(&ours, &want);
        eprintln!(
            "{name}: blocked DQ graph against the f32 graph {diff:.2e} (logits up to {scale:.1})"
        );
        // The blocks' products compute in f16 (W4A16), as an fp16 engine rounds its activations.
        assert!(diff > 0.0 && diff <= 1.5e-3 * scale, "{name}: {diff}");
        // Every matrix is INT4 codes (8-bit ones as two halves) under f16 scales; nothing else is INT8 or f32
        // beyond norms and RoPE tables.
        let by_type = initializer_bytes(&with);
        assert!(
            by_type.get(&DataType::INT4.0).copied().unwrap_or(0) > 0,
            "{by_type:?}"
        );
        assert!(!by_type.contains_key(&DataType::INT8.0), "{by_type:?}");
        // The plan's form keeps an 8-bit table as one INT8 DQ (TensorRT stores it compactly): the same logits.
        let plan_form = trt_graph_with(
            d.path(),
            &format!("{name}.plan_form.onnx"),
            &m.config,
            &m.tensors,
            Some(&blocks),
            false,
        );
        let plan_diff = max_diff(&cpu_graph_logits(&plan_form, &ids), &ours);
        assert!(plan_diff <= 1e-3 * scale, "{name}: {plan_diff}");
        assert_eq!(
            initializer_bytes(&plan_form).contains_key(&DataType::INT8.0),
            bits == Bits::Int8
        );
        let plain_bytes: u64 = initializer_bytes(&plain).values().sum();
        let blocked_bytes: u64 = by_type.values().sum();
        eprintln!("{name}: initializers {blocked_bytes} bytes against {plain_bytes} in f32");
        assert!(
            (blocked_bytes as f64)
                < plain_bytes as f64 * if bits == Bits::Int4 { 0.4 } else { 0.5 },
            "{name}: {blocked_bytes} of {plain_bytes}"
        );
    }
}

/// Logits of every position of `ids`, one token per call (as llama.cpp evaluated them for the golden file).
fn logits_token_by_token(onnx: &std::path::Path, ids: &[i64]) -> Vec<f64> {
    use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    let mut dec = trt_diff::pipelines::kv_cache::Decoder::new(&mut e, ids.len()).unwrap();
    ids.iter()
        .flat_map(|id| dec.forward(&[*id]).unwrap().to_f64().unwrap())
        .collect()
}

#[test]
fn llama_cpp_q4_k_m_file_keeps_its_quantization_error_in_the_tensorrt_graph() {
    // llama.cpp's Q4_K_M quantization of a tiny random Llama (Q4_K, Q6_K and the quantizer's fallbacks; golden from
    // scripts/golden/llm_gguf_llamacpp.py) and llama.cpp's logits on it and on the F16 file it came from. Q4_K
    // becomes INT4 blocks with offsets, Q6_K's 8-bit codes (blocks of 16) two INT4 halves: the graph is the file's
    // own model (to f16 rounding), about as close to llama.cpp's logits as the dequantized f32 graph, and picks
    // llama.cpp's greedy token everywhere.
    let dir = golden("tiny_q4km");
    let (vocab, ids, theirs, f16) = super::llm_gguf::tiny_q4km_logits();
    let d = tempfile::tempdir().unwrap();
    let g = GgufFile::open(&dir.join("model.gguf")).unwrap();
    let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
    let blocks = trt_diff::weights::gguf_model::int_blocks(&g, &m.config).unwrap();
    // Every format of the file goes in exactly: Q4_K (codes, sub-block scales and minimums) and Q6_K (codes and
    // scales of 16); the embedding table too.
    let gguf_name = |hf: &str| {
        trt_diff::weights::llm_config::hf_to_gguf(&m.config)
            .into_iter()
            .find(|(h, _)| h.replace("{i}", "0") == hf)
            .map(|(_, g)| g.replace("{i}", "0"))
            .unwrap()
    };
    let mut kinds = std::collections::BTreeSet::new();
    for (name, b) in &blocks {
        let kind = g.tensor(&gguf_name(name)).unwrap().ty.name();
        kinds.insert(kind);
        let want = &m.tensors[name];
        let err = b
            .dequantize()
            .iter()
            .zip(want)
            .map(|(a, w)| (a - w).abs())
            .fold(0f32, f32::max);
        let amax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(err <= 1e-6 * amax, "{name} ({kind}): {err} of {amax}");
    }
    assert_eq!(kinds, ["Q4_K", "Q6_K"].into());
    let graph = trt_graph(d.path(), "q4km.onnx", &m.config, &m.tensors, Some(&blocks));
    // For ONNX Runtime's CUDA provider the CPU pass keeps the INT4 DQs that are MatMul weights (fused there into
    // MatMulNBits, which reads the 4-bit codes: docs/gpu run 13) and folds the embedding table's, which a lookup
    // reads; for its CPU provider it folds them all.
    let file = trt_diff::onnx::OnnxFile::load(&graph).unwrap();
    let dq_count = |m: &trt_diff::onnx::proto::ModelProto| {
        let g = m.graph.as_ref().unwrap();
        let dqs: Vec<_> = g
            .node
            .iter()
            .filter(|n| n.op_type == "DequantizeLinear")
            .collect();
        for dq in &dqs {
            let out = &dq.output[0];
            assert!(
                g.node
                    .iter()
                    .filter(|n| n.input.contains(out))
                    .all(|n| n.op_type == "MatMul" && &n.input[1] == out),
                "{} is kept but feeds more than MatMul weights",
                dq.name
            );
        }
        dqs.len()
    };
    let before = file
        .model
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .filter(|n| n.op_type == "DequantizeLinear")
        .count();
    let keep = trt_diff::onnx::cpu_pass::CpuPassOptions {
        keep_int4: true,
        ..Default::default()
    };
    let (cuda_form, report) = trt_diff::onnx::cpu_pass::apply(&file, keep).unwrap();
    let kept = dq_count(&cuda_form);
    assert!(
        kept >= 7 && report.folded == before - kept && report.folded >= 1,
        "{kept} kept, {report:?}"
    );
    let (cpu_form, _) = trt_diff::onnx::cpu_pass::apply(&file, Default::default()).unwrap();
    assert_eq!(dq_count(&cpu_form), 0);
    let ours = logits_token_by_token(&graph, &ids);
    let deq = logits_token_by_token(
        &trt_graph(d.path(), "deq.onnx", &m.config, &m.tensors, None),
        &ids,
    );
    let (diff, quant) = (max_diff(&ours, &theirs), max_diff(&f16, &theirs));
    eprintln!(
        "Q4_K_M in INT4/INT8 blocks: against llama.cpp {diff:.3e}, the dequantized f32 graph against llama.cpp \
         {:.3e}; llama.cpp's Q4_K_M against its F16 {quant:.3e}",
        max_diff(&deq, &theirs)
    );
    let from_deq = max_diff(&ours, &deq);
    let scale = deq.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    eprintln!(
        "against the same file dequantized into the f32 graph: {from_deq:.3e} (logits up to {scale:.1}; the \
         products compute in f16)"
    );
    assert!(
        diff < 0.15 * quant,
        "{diff} against a quantization error of {quant}"
    );
    assert!(
        from_deq < 1.5e-3 * scale,
        "{from_deq} of logits up to {scale}"
    );
    super::llm_gguf::same_greedy_tokens(&ours, &theirs, vocab);
    // K-quant scales are the super-block's `d` times a sub-block integer: every matrix factors so, and the plan's
    // form stores them as INT8 multiples under one step a super-block (an INT8 DQ of the scales), 8 bits a block
    // instead of 16, with the same logits.
    assert!(blocks.values().all(|b| b.steps.is_some()));
    let plan_form = trt_graph_with(
        d.path(),
        "plan.onnx",
        &m.config,
        &m.tensors,
        Some(&blocks),
        false,
    );
    let plan = logits_token_by_token(&plan_form, &ids);
    let plan_diff = max_diff(&plan, &ours);
    eprintln!(
        "the plan's form (scales as INT8 multiples) against the INT4-only graph: {plan_diff:.3e}"
    );
    assert!(plan_diff <= 1e-3 * scale, "{plan_diff}");
    // The multiples' DQ gives each scale's f16 value exactly: the same graph with f16 scales, the same logits.
    let unfactored: HashMap<String, IntBlocks> = blocks
        .iter()
        .map(|(k, b)| {
            (
                k.clone(),
                IntBlocks {
                    steps: None,
                    ..b.clone()
                },
            )
        })
        .collect();
    let f16_scales = trt_graph_with(
        d.path(),
        "f16s.onnx",
        &m.config,
        &m.tensors,
        Some(&unfactored),
        false,
    );
    // ONNX Runtime's CPU provider widens 16-bit graphs to f32, where the multiples give the scales unrounded:
    // about as close as the f16 rounding of a scale (2^-11).
    let f16_diff = max_diff(&logits_token_by_token(&f16_scales, &ids), &plan);
    eprintln!("INT8 scale multiples against f16 scales: {f16_diff:.3e}");
    assert!(f16_diff <= 1e-3 * scale, "{f16_diff}");
    let (int4_only, plan_bytes) = (initializer_bytes(&graph), initializer_bytes(&plan_form));
    let f16 = |b: &HashMap<i32, u64>| b.get(&DataType::FLOAT16.0).copied().unwrap_or(0);
    eprintln!(
        "f16 initializers: {} bytes, {} with INT8 scale multiples",
        f16(&int4_only),
        f16(&plan_bytes)
    );
    assert!(f16(&plan_bytes) * 10 < f16(&int4_only) * 7);
}

#[test]
fn quantized_gguf_builds_with_its_own_formats_by_default() {
    let d = tempfile::tempdir().unwrap();
    let gguf = d.path().join("model.gguf");
    std::fs::copy(golden("tiny_q4km").join("model.gguf"), &gguf).unwrap();
    let generates = |engine: &std::path::Path| {
        let r = run(
            &[
                "generate",
                "--engine",
                s(engine),
                "--prompt",
                "the",
                "--max-tokens",
                "4",
            ],
            true,
        );
        assert!(!r.stdout.trim().is_empty(), "{}", r.stdout);
    };
    // By default the bundle is the plan and the CPU graph; the graph and the tokenizer read the GGUF itself.
    let lean = d.path().join("lean.plan");
    let r = run(
        &["build", s(&gguf), "--out", s(&lean), "--no-progress"],
        true,
    );
    assert!(r.stdout.contains("gguf precision"), "{}", r.stdout);
    assert!(
        r.stdout.contains("lean.onnx (not kept: --keep-onnx)"),
        "{}",
        r.stdout
    );
    let mut files: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("lean"))
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "lean.cpu.onnx",
            "lean.cpu.onnx.data",
            "lean.plan",
            "lean.plan.json",
        ]
    );
    let m = trt_diff::manifest::Manifest::read(&trt_diff::manifest::sidecar_path(&lean)).unwrap();
    let Some(trt_diff::manifest::Pipeline::Llm(llm)) = m.pipeline else {
        panic!("no LLM pipeline in the manifest");
    };
    assert_eq!(
        Some(llm.tokenizer.as_str()),
        gguf.file_name().and_then(|n| n.to_str())
    );
    generates(&lean);
    let r = run(&["inspect", s(&lean)], true);
    assert!(r.stdout.contains("not kept)"), "{}", r.stdout);
    // Where TensorRT cannot run the plan, ONNX Runtime's CUDA provider has nothing to run: the CPU graph runs.
    let lean_file = trt_diff::manifest::EngineFile::open(&lean).unwrap();
    let why = trt_diff::pipelines::engines::no_cuda_graph(&lean_file).unwrap();
    assert!(why.contains("--keep-onnx"), "{why}");
    // --keep-onnx keeps the TensorRT graph for ONNX Runtime's CUDA provider.
    let plan = d.path().join("m.plan");
    run(
        &[
            "build",
            s(&gguf),
            "--keep-onnx",
            "--out",
            s(&plan),
            "--no-progress",
        ],
        true,
    );
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("m.plan.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["pipeline"]["precision"], "gguf", "{manifest}");
    let kept = trt_diff::manifest::EngineFile::open(&plan).unwrap();
    assert_eq!(trt_diff::pipelines::engines::no_cuda_graph(&kept), None);
    // The TensorRT graph's matrices are INT4 codes (Q4_K; Q6_K, the embedding table here, as two halves); with
    // their f16 scales and offsets Q4_K takes 5 bits a weight as the file's 4.5, Q6_K (blocks of 16) 11 as its 6.6,
    // in this file of a third Q6_K.
    let onnx = d.path().join("m.onnx");
    let by_type = initializer_bytes(&onnx);
    assert!(by_type.contains_key(&DataType::INT4.0) && !by_type.contains_key(&DataType::INT8.0));
    let gguf_bytes = std::fs::metadata(&gguf).unwrap().len();
    let onnx_bytes: u64 = by_type.values().sum();
    eprintln!(
        "GGUF {gguf_bytes} bytes; TensorRT graph initializers {onnx_bytes}; plan {}",
        std::fs::metadata(&plan).map_or(0, |m| m.len())
    );
    assert!(
        (onnx_bytes as f64) < 1.5 * gguf_bytes as f64,
        "{onnx_bytes} against {gguf_bytes}"
    );
    // The CPU backend runs the GGUF's blocks in place.
    generates(&plan);
    // Only a GGUF has block formats to keep.
    let r = run(
        &[
            "build",
            s(&data("llm/stories260K.bin")),
            "--arch",
            "llama2c",
            "--tokenizer",
            s(&data("llm/tok512.bin")),
            "--precision",
            "gguf",
            "--out",
            s(&d.path().join("hf.plan")),
        ],
        false,
    );
    assert!(
        r.stderr
            .contains("--precision gguf keeps a GGUF file's block formats"),
        "{}",
        r.stderr
    );
}

#[test]
fn gemma_blocks_compute_in_f32() {
    // Gemma's activations outgrow f16 (its scaled embeddings): its block products stay in f32, and llama.cpp's Q8_0
    // file then gives the dequantized f32 graph's logits to float rounding.
    let dir = super::llm_archs::golden_dir("gemma2");
    let d = tempfile::tempdir().unwrap();
    let g = GgufFile::open(&dir.join("tiny_gemma2_q8_0.gguf")).unwrap();
    let m = trt_diff::weights::gguf_model::load(&g, None).unwrap();
    let blocks = trt_diff::weights::gguf_model::int_blocks(&g, &m.config).unwrap();
    assert!(blocks.values().any(|b| b.bits == Bits::Int8));
    let ids = [2, 40, 41, 42, 43, 44, 45, 46];
    let ours = cpu_graph_logits(
        &trt_graph(
            d.path(),
            "blocks.onnx",
            &m.config,
            &m.tensors,
            Some(&blocks),
        ),
        &ids,
    );
    let want = cpu_graph_logits(
        &trt_graph(d.path(), "f32.onnx", &m.config, &m.tensors, None),
        &ids,
    );
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let diff = max_diff(&ours, &want);
    eprintln!("gemma2 Q8_0 blocks in f32: {diff:.2e} of logits up to {scale:.1}");
    assert!(diff <= 1e-5 * scale, "{diff}");
    let f = trt_diff::onnx::OnnxFile::load(&d.path().join("blocks.onnx")).unwrap();
    assert!(
        f.model
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .filter(|t| t.name.ends_with("weight_scale"))
            .all(|t| t.data_type == DataType::FLOAT.0)
    );
}

#[test]
fn every_block_format_goes_in_exactly_or_within_half_a_step() {
    // gguf-py's quantization of one random matrix in every format (scripts/golden/llm_gguf.py), with its own
    // dequantized values beside each: what `--precision gguf` keeps of each.
    let g = GgufFile::open(&golden("dequant.gguf")).unwrap();
    for (name, bits, exact) in [
        ("q8_0", Bits::Int8, true),
        ("q4_0", Bits::Int4, true),
        ("q4_1", Bits::Int4, true),
        ("q4_k", Bits::Int4, true),
        ("q6_k", Bits::Int8, true),
        ("q5_0", Bits::Int4, false),
        ("q5_1", Bits::Int4, false),
        ("q5_k", Bits::Int4, false),
    ] {
        let b = trt_diff::weights::gguf_model::tensor_blocks(&g, name)
            .unwrap()
            .unwrap();
        assert_eq!(b.bits, bits, "{name}");
        assert!(b.scales.iter().all(|&s| s > 0.0), "{name}");
        let want = g.tensor_f32(&format!("{name}.expected")).unwrap();
        let got = b.dequantize();
        for (i, (blk_got, blk_want)) in got.chunks(32).zip(want.chunks(32)).enumerate() {
            let (lo, hi) = blk_want
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let err = blk_got
                .iter()
                .zip(blk_want)
                .fold(0f32, |m, (a, w)| m.max((a - w).abs()));
            // Exact formats to float rounding; 5-bit ones re-quantized to 16 levels over the block's range.
            let bound = if exact {
                1e-6 * lo.abs().max(hi.abs())
            } else {
                (hi - lo) / 30.0 * 1.0001
            };
            assert!(err <= bound, "{name} block {i}: {err} > {bound}");
        }
    }
    assert!(
        trt_diff::weights::gguf_model::tensor_blocks(&g, "f16")
            .unwrap()
            .is_none()
    );
}
