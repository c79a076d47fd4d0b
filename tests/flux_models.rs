//! Flux image models against diffusers: tiny random FluxTransformer2DModel (dev and schnell, in the diffusers and
//! the BFL layout) and a tiny 16-channel AutoencoderKL, exported by our emitters and run on ONNX Runtime, compared
//! with the golden outputs of scripts/golden/flux_models.py.
use crate::common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::flux::{self, ExportOptions, FluxConfig, FluxPrecision, Layout};
use trt_diff::onnx::DataType;
use trt_diff::weights::safetensors_file::Checkpoint;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(name)
}

/// Golden inputs/outputs as host tensors, by name.
fn io(name: &str) -> HashMap<String, HostTensor> {
    golden_tensors(&golden(name))
}

fn axes(model: &str) -> Vec<usize> {
    let text = std::fs::read_to_string(golden(&format!("{model}_config.json"))).unwrap();
    FluxConfig::axes_from_diffusers_config(&text).unwrap()
}

/// mean |a - b| / mean |b|.
fn mean_rel_err(a: &HostTensor, b: &HostTensor) -> f64 {
    let (a, b) = (a.to_f64().unwrap(), b.to_f64().unwrap());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum();
    num / b.iter().map(|v| v.abs()).sum::<f64>()
}

fn run(onnx: &Path, inputs: &HashMap<String, HostTensor>) -> Vec<(String, HostTensor)> {
    let mut e = OrtEngine::open(onnx, &OrtOptions::default()).unwrap();
    let given: Vec<(String, HostTensor)> = e
        .inputs()
        .iter()
        .map(|d| (d.name.clone(), inputs[&d.name].clone()))
        .collect();
    e.run(&given).unwrap()
}

fn export(
    ck_file: &str,
    model: &str,
    opts: &ExportOptions,
    dir: &Path,
) -> (PathBuf, FluxConfig, Layout) {
    let ck = Checkpoint::open(&golden(ck_file)).unwrap();
    let (cfg, layout, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes(model))).unwrap();
    let out = dir.join(format!("{}.onnx", ck_file.trim_end_matches(".safetensors")));
    let r = flux::export(&cfg, &ck, opts, &out).unwrap();
    assert_eq!(r.onnx, out);
    (out, cfg, layout)
}

#[test]
fn transformer_matches_diffusers_in_both_layouts() {
    let d = tempfile::tempdir().unwrap();
    for (model, guidance) in [("flux_dev", true), ("flux_schnell", false)] {
        // Two shapes through one graph: batch 2 with 4x6 image tokens and 7 text tokens, batch 1 with 3x5 and 4.
        let ios = [
            io(&format!("{model}_io.safetensors")),
            io(&format!("{model}_io_small.safetensors")),
        ];
        for (file, want_layout) in [
            (format!("{model}.safetensors"), Layout::Diffusers),
            (format!("{model}_bfl.safetensors"), Layout::Bfl),
        ] {
            let (onnx, cfg, layout) = export(&file, model, &ExportOptions::default(), d.path());
            assert_eq!(layout, want_layout);
            assert_eq!(cfg.guidance_embed, guidance);
            assert_eq!((cfg.depth, cfg.depth_single, cfg.num_heads), (1, 2, 2));
            for io in &ios {
                let out = run(&onnx, io);
                assert_eq!(out[0].0, "sample");
                let err = max_rel_err(&out[0].1, &io["sample"]);
                println!("{file} {:?}: max rel err {err:.2e}", io["sample"].shape);
                assert!(err < 1e-4, "{file}: {err}");
            }
        }
    }
}

#[test]
fn half_precision_graphs_stay_close() {
    // bf16/fp16 graphs are for TensorRT; ONNX Runtime's CPU kernels cover f16 (bf16 MatMul is missing on CPU).
    let d = tempfile::tempdir().unwrap();
    let io = io("flux_dev_io.safetensors");
    let opts = ExportOptions {
        precision: FluxPrecision::F16,
        ..Default::default()
    };
    let (onnx, _, _) = export("flux_dev_bfl.safetensors", "flux_dev", &opts, d.path());
    let out = run(&onnx, &io);
    let err = max_rel_err(&out[0].1, &io["sample"]);
    println!("fp16: max rel err {err:.2e}");
    assert!(err < 2e-2, "{err}");
}

#[test]
fn bad_checkpoints_are_named() {
    let d = tempfile::tempdir().unwrap();
    // The VAE is not a transformer.
    let ck = Checkpoint::open(&golden("vae.safetensors")).unwrap();
    let e = FluxConfig::from_checkpoint(&ck).unwrap_err().to_string();
    assert!(e.contains("not a Flux transformer checkpoint"), "{e}");
    // Head dimension 16 without a config.json: the axes must be given.
    let ck = Checkpoint::open(&golden("flux_dev.safetensors")).unwrap();
    let e = FluxConfig::from_checkpoint(&ck).unwrap_err().to_string();
    assert!(e.contains("axes_dims_rope"), "{e}");
    // FP8 without calibration names the missing layer and the fix.
    let (cfg, _, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes("flux_dev"))).unwrap();
    let opts = ExportOptions {
        precision: FluxPrecision::Fp8,
        ..Default::default()
    };
    let out = d.path().join("fp8.onnx");
    let e = flux::export(&cfg, &ck, &opts, &out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no calibrated activation amax") && e.contains("calibration"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert!(left.is_empty(), "partial files left: {left:?}");
}

/// Calibrates on the golden inputs (amax per activation from the calibration graph), as the pipeline does over its
/// calibration prompts.
fn calibrate(dir: &Path, io: &HashMap<String, HostTensor>) -> HashMap<String, f32> {
    let opts = ExportOptions {
        calibration: true,
        ..Default::default()
    };
    let (onnx, _, _) = export("flux_dev.safetensors", "flux_dev", &opts, dir);
    let out = run(&onnx, io);
    assert!(out.len() > 10, "calibration outputs: {}", out.len());
    let mut amax = HashMap::new();
    flux::merge_amax(&mut amax, &out[1..]);
    assert!(amax.contains_key("transformer_blocks.0.attn.to_q"));
    assert!(amax.contains_key("single_transformer_blocks.1.proj_out"));
    amax
}

#[test]
fn fp8_and_nvfp4_stay_within_quantization_error_and_build_with_tensorrt() {
    use trt_diff::trt::{BuildOptions, TrtChoice, build_engine};
    let d = tempfile::tempdir().unwrap();
    let io = io("flux_dev_io.safetensors");
    let amax = calibrate(d.path(), &io);
    // (precision, file, bound on max |err| / max |ref|): FP8 E4M3 keeps 3 mantissa bits, NVFP4 (E2M1) 1.
    let (f32t, f16t) = (DataType::FLOAT, DataType::FLOAT16);
    for (precision, compute, file, bound) in [
        (FluxPrecision::Fp8, f32t, "flux_dev_bfl.safetensors", 0.05),
        (FluxPrecision::Nvfp4, f32t, "flux_dev_bfl.safetensors", 0.10),
        (FluxPrecision::Nvfp4, f32t, "flux_dev.safetensors", 0.10),
        // NVIDIA-demo style: f16 outside the quantized GEMMs.
        (FluxPrecision::Nvfp4, f16t, "flux_dev_bfl.safetensors", 0.10),
    ] {
        let sub = d.path().join(format!("{precision:?}_{}_{file}", compute.0));
        std::fs::create_dir_all(&sub).unwrap();
        let opts = ExportOptions {
            precision,
            amax: amax.clone(),
            quantized_compute: compute,
            ..Default::default()
        };
        let (onnx, cfg, _) = export(file, "flux_dev", &opts, &sub);
        let out = run(&onnx, &io);
        let err = max_rel_err(&out[0].1, &io["sample"]);
        println!(
            "{precision:?} (compute {compute}) {file}: max rel err vs fp32 diffusers {err:.3e}, mean rel err {:.3e}",
            mean_rel_err(&out[0].1, &io["sample"])
        );
        assert!(err < bound, "{precision:?} {file}: {err}");
        assert!(err > 1e-5, "{precision:?}: no quantization happened? {err}");
        if file.ends_with("_bfl.safetensors") {
            let plan = sub.join("transformer.plan");
            let o = build_engine(&BuildOptions {
                onnx: onnx.clone(),
                out: plan.clone(),
                trt: TrtChoice::Rtx,
                shapes: flux::profile(&cfg, [1, 2, 2], [64, 64, 128], 7).unwrap(),
                ..Default::default()
            })
            .unwrap();
            assert!(o.manifest.builder.as_ref().unwrap().layers > 0);
            println!(
                "{precision:?} (compute {compute}): TensorRT-RTX built {} bytes, {} layers",
                std::fs::metadata(&plan).unwrap().len(),
                o.manifest.builder.as_ref().unwrap().layers
            );
        }
    }
}

#[test]
fn taef2_matches_its_test_vectors() {
    use trt_diff::models::taesd::{self, TaeKind, TaeLayer, TaesdConfig};
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/taef2");
    let npy = |n: &str| trt_diff::backend::npy::read(&data.join(n)).unwrap();
    let image = npy("testvec_input_1x3x128x128.npy");
    let latent = npy("testvec_latent_1x32x16x16.npy");
    let decoded = npy("testvec_decoded_1x3x128x128.npy");
    let d = tempfile::tempdir().unwrap();
    for (kind, file, input, want) in [
        (
            TaeKind::Encoder,
            "taef2_encoder.safetensors",
            &image,
            &latent,
        ),
        (
            TaeKind::Decoder,
            "taef2_decoder.safetensors",
            &latent,
            &decoded,
        ),
    ] {
        let ck = Checkpoint::open(&data.join(file)).unwrap();
        let cfg = TaesdConfig::from_checkpoint(&ck, kind).unwrap();
        assert_eq!(cfg.latent_channels, 32);
        let pools = cfg
            .layers
            .iter()
            .filter(|l| matches!(l, TaeLayer::Block { pool: true, .. }))
            .count();
        assert_eq!(pools, 3, "taef2 has three GroupNorm mid-blocks");
        let onnx = taesd::export_file(&data.join(file), kind, d.path()).unwrap();
        let mut e = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
        let name = e.inputs()[0].name.clone();
        let out = e.run(&[(name, input.clone())]).unwrap();
        let err = max_rel_err(&out[0].1, want);
        println!("taef2 {kind:?}: max rel err {err:.2e}");
        assert!(err < 1e-4, "{kind:?}: {err}");
    }
}

#[test]
fn vae_matches_diffusers_autoencoderkl_in_both_layouts() {
    use trt_diff::models::vae::{self, VaeConfig, VaeLayout};
    let io = io("vae_io.safetensors");
    for (file, layout) in [
        ("vae.safetensors", VaeLayout::Diffusers),
        ("vae_original.safetensors", VaeLayout::Original),
    ] {
        let d = tempfile::tempdir().unwrap();
        let ck = Checkpoint::open(&golden(file)).unwrap();
        let mut cfg = VaeConfig::from_checkpoint(&ck).unwrap();
        assert_eq!(cfg.layout, layout);
        assert_eq!(
            (
                cfg.latent_channels,
                cfg.block_out_channels.clone(),
                cfg.layers_per_block
            ),
            (16, vec![16, 32], 1)
        );
        cfg.norm_num_groups = 4; // the golden config's (not recorded in weights)
        let (dec, enc) = vae::export(&cfg, &ck, trt_diff::onnx::DataType::FLOAT, d.path()).unwrap();
        let mut e = OrtEngine::open(&dec, &OrtOptions::default()).unwrap();
        let out = e.run(&[("latent".into(), io["latent"].clone())]).unwrap();
        let err = max_rel_err(&out[0].1, &io["decoded"]);
        println!("{file} decoder: max rel err {err:.2e}");
        assert!(err < 1e-4, "decoder {err}");
        let mut e = OrtEngine::open(&enc, &OrtOptions::default()).unwrap();
        let out = e.run(&[("image".into(), io["image"].clone())]).unwrap();
        for (i, name) in ["mean", "logvar"].iter().enumerate() {
            assert_eq!(out[i].0, *name);
            let err = max_rel_err(&out[i].1, &io[*name]);
            println!("{file} encoder {name}: max rel err {err:.2e}");
            assert!(err < 1e-4, "{name} {err}");
        }
    }
}

#[test]
fn diffusers_folder_with_config_and_shards() {
    // A diffusers `transformer/` folder: config.json (RoPE axes) beside the weights, split into two shards.
    let d = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(&golden("flux_schnell.safetensors")).unwrap();
    let names: Vec<String> = src.names().map(String::from).collect();
    let (a, b) = names.split_at(names.len() / 2);
    for (i, part) in [a, b].iter().enumerate() {
        let tensors: Vec<_> = part.iter().map(|n| src.get(n).unwrap()).collect();
        let views: Vec<_> = tensors
            .iter()
            .map(|t| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::BF16,
                    t.shape.clone(),
                    &t.data[..],
                )
                .unwrap();
                (t.name.clone(), view)
            })
            .collect();
        let p = d.path().join(format!(
            "diffusion_pytorch_model-0000{}-of-00002.safetensors",
            i + 1
        ));
        safetensors::serialize_to_file(views, None, &p).unwrap();
    }
    std::fs::copy(
        golden("flux_schnell_config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    let ck = Checkpoint::open(d.path()).unwrap();
    let (cfg, layout, prefix) = FluxConfig::from_checkpoint(&ck).unwrap();
    assert_eq!((layout, prefix.as_str()), (Layout::Diffusers, ""));
    assert_eq!(cfg.axes_dim, vec![4, 6, 6]);
    assert!(!cfg.guidance_embed);
    let out_dir = d.path().join("onnx");
    let onnx = flux::export_file(d.path(), &ExportOptions::default(), &out_dir).unwrap();
    let io = io("flux_schnell_io_small.safetensors");
    let out = run(&onnx, &io);
    let err = max_rel_err(&out[0].1, &io["sample"]);
    assert!(err < 1e-4, "{err}");
    // Profiles need image sides that are multiples of 16.
    assert!(flux::profile(&cfg, [1, 1, 2], [64, 100, 128], 8).is_err());
    let p = flux::profile(&cfg, [1, 1, 2], [256, 512, 1024], 512).unwrap();
    let hs = p.iter().find(|r| r.name == "hidden_states").unwrap();
    assert_eq!((hs.min[1], hs.opt[1], hs.max[1]), (256, 1024, 4096));
    assert!(p.iter().all(|r| r.name != "guidance"));
}

#[test]
fn half_precision_and_image_graphs_build_with_tensorrt() {
    use trt_diff::models::{taesd, vae};
    use trt_diff::trt::shapes::ShapeRange;
    use trt_diff::trt::{BuildOptions, TrtChoice, build_engine};
    let d = tempfile::tempdir().unwrap();
    let build = |onnx: &Path, shapes: Vec<ShapeRange>| {
        let plan = onnx.with_extension("plan");
        let o = build_engine(&BuildOptions {
            onnx: onnx.to_path_buf(),
            out: plan,
            trt: TrtChoice::Rtx,
            shapes,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("{}: {e:#}", onnx.display()));
        assert!(o.manifest.builder.as_ref().unwrap().layers > 0);
    };
    for precision in [FluxPrecision::Bf16, FluxPrecision::F16] {
        let sub = d.path().join(format!("{precision:?}"));
        std::fs::create_dir_all(&sub).unwrap();
        let opts = ExportOptions {
            precision,
            ..Default::default()
        };
        let (onnx, cfg, _) = export("flux_dev_bfl.safetensors", "flux_dev", &opts, &sub);
        build(
            &onnx,
            flux::profile(&cfg, [1, 1, 2], [64, 64, 128], 7).unwrap(),
        );
    }
    let range = |name: &str, c: i64, s: [i64; 3]| ShapeRange {
        name: name.into(),
        min: vec![1, c, s[0], s[0]],
        opt: vec![1, c, s[1], s[1]],
        max: vec![1, c, s[2], s[2]],
    };
    let ck = Checkpoint::open(&golden("vae_original.safetensors")).unwrap();
    let mut cfg = vae::VaeConfig::from_checkpoint(&ck).unwrap();
    cfg.norm_num_groups = 4;
    let bf16 = trt_diff::onnx::DataType::BFLOAT16;
    let (dec, enc) = vae::export(&cfg, &ck, bf16, &d.path().join("vae")).unwrap();
    build(&dec, vec![range("latent", 16, [8, 16, 32])]);
    build(&enc, vec![range("image", 3, [16, 32, 64])]);
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/taef2");
    let tae = taesd::export_file(
        &data.join("taef2_decoder.safetensors"),
        taesd::TaeKind::Decoder,
        &d.path().join("tae"),
    )
    .unwrap();
    build(&tae, vec![range("latent", 32, [8, 16, 32])]);
}

/// The CUDA path's attention fusion (`onnx::attention_fusion`) keeps the exported graphs' results: the fused
/// graphs run on ONNX Runtime's CPU MultiHeadAttention here, against diffusers' outputs with the unfused
/// graphs' tolerance. Patterns it must leave alone (an additive mask, FP8 Q/DQ) stay unfused.
#[test]
fn fused_attention_keeps_the_results() {
    // With the GELU and RMSNorm fusions the CUDA path makes too (FastGelu, SimplifiedLayerNormalization).
    use trt_diff::onnx::attention_fusion::fuse_attention;
    use trt_diff::onnx::elementwise_fusion::{fuse_gelu, fuse_rms_norm};
    use trt_diff::onnx::{OnnxFile, SaveOptions, save};
    let d = tempfile::tempdir().unwrap();
    let fused_copy = |onnx: &Path, want: [usize; 3]| -> PathBuf {
        let mut model = OnnxFile::load(onnx).unwrap().model;
        let got = [
            fuse_attention(&mut model).unwrap(),
            fuse_gelu(&mut model),
            fuse_rms_norm(&mut model),
        ];
        assert_eq!(
            got,
            want,
            "attentions, GELUs, RMSNorms of {}",
            onnx.display()
        );
        // Beside the original, so the external weights resolve as they do for the real CUDA path.
        let out = onnx.with_file_name(format!(
            "fused_{}",
            onnx.file_name().unwrap().to_string_lossy()
        ));
        save(model, &out, &SaveOptions::default()).unwrap();
        let ops =
            trt_diff::onnx::summary::OnnxSummary::of(&OnnxFile::load(&out).unwrap()).op_histogram;
        // The VAE's GroupNorms (ReduceMean too) are not RMSNorms.
        for (gone, n) in ["Softmax", "Tanh", "ReduceMean"].into_iter().zip(want) {
            assert!(n == 0 || !ops.contains_key(gone), "{ops:?}");
        }
        out
    };
    let io_t = io("flux_dev_io.safetensors");
    // One double-stream and two single-stream blocks: three attentions, four MLPs, eight q/k norms.
    let (onnx, _, _) = export(
        "flux_dev.safetensors",
        "flux_dev",
        &ExportOptions::default(),
        d.path(),
    );
    let out = run(&fused_copy(&onnx, [3, 4, 8]), &io_t);
    let err = max_rel_err(&out[0].1, &io_t["sample"]);
    println!("fused transformer: max rel err {err:.2e}");
    assert!(err < 1e-4, "{err}");

    use trt_diff::models::vae::{self, VaeConfig};
    let io_v = io("vae_io.safetensors");
    let ck = Checkpoint::open(&golden("vae.safetensors")).unwrap();
    let mut cfg = VaeConfig::from_checkpoint(&ck).unwrap();
    cfg.norm_num_groups = 4;
    let vd = d.path().join("vae");
    std::fs::create_dir_all(&vd).unwrap();
    let (dec, _) = vae::export(&cfg, &ck, DataType::FLOAT, &vd).unwrap();
    let mut e = OrtEngine::open(&fused_copy(&dec, [1, 0, 0]), &OrtOptions::default()).unwrap();
    let out = e.run(&[("latent".into(), io_v["latent"].clone())]).unwrap();
    let err = max_rel_err(&out[0].1, &io_v["decoded"]);
    println!("fused VAE decoder (single head, [batch, seq, channels]): max rel err {err:.2e}");
    assert!(err < 1e-4, "{err}");

    // Left alone: scores with an additive mask, and FP8 attention's Q/DQ.
    use trt_diff::models::qdq::{AttentionAmax, attention};
    use trt_diff::onnx::{Dim, GraphBuilder};
    for fp8 in [false, true] {
        let mut g = GraphBuilder::new("a", 19);
        let shape = vec![Dim::Fixed(1), Dim::Fixed(2), Dim::Fixed(5), Dim::Fixed(8)];
        let [q, k, v] =
            ["q", "k", "v"].map(|n| g.input(n, DataType::FLOAT, shape.clone()).unwrap());
        let amax = AttentionAmax {
            q: 1.0,
            k: 1.0,
            v: 1.0,
        };
        let o = attention(&mut g, "attn", &q, &k, &v, fp8.then_some(amax)).unwrap();
        g.output(&o);
        let mut model = g.finish();
        assert_eq!(
            fuse_attention(&mut model).unwrap(),
            usize::from(!fp8),
            "fp8 {fp8}"
        );
    }
    let mut o = trt_diff::models::ops::Ops::new("masked", 19, DataType::FLOAT);
    let shape = vec![Dim::Fixed(1), Dim::Fixed(5), Dim::Fixed(16)];
    let [q, k, v] = ["q", "k", "v"].map(|n| o.g.input(n, DataType::FLOAT, shape.clone()).unwrap());
    let mask = o.constant_f32("mask", &[5, 5], &[0.0; 25]).unwrap();
    let y =
        trt_diff::models::ops::attention(&mut o, "attn", (&q, &k, &v), 2, Some(0.5), Some(&mask))
            .unwrap();
    o.g.output(&y);
    let mut model = o.g.finish();
    assert_eq!(fuse_attention(&mut model).unwrap(), 0);
}
