//! LoRA on Flux against diffusers + peft (tests/golden/flux/lora, scripts/golden/flux_lora.py): LoRA files of each
//! format (PEFT, kohya with BFL names and alpha, ComfyUI `diffusion_model.*`, kohya with diffusers names, LyCORIS
//! LoHa and LoKr) on the tiny FLUX.1-dev transformer, merged into its diffusers-layout and BFL-layout checkpoints
//! (build time) and into an exported graph's weights (run time, switching between sets in one engine); the whole
//! tiny pipeline with a transformer + CLIP LoRA, merged and at run time; and the errors.
use crate::common;
use common::{golden_tensors, max_rel_err};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::backend::{Engine, HostTensor};
use trt_diff::models::flux::{self, ExportOptions, FluxConfig};
use trt_diff::onnx::DataType;
use trt_diff::pipelines::lora::{
    RuntimeLora, checkpoint_shapes, flux_book, merge_into_checkpoint, resolve_for,
};
use trt_diff::weights::lora::{LoraFile, Part, merged_tensors};
use trt_diff::weights::safetensors_file::Checkpoint;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(name)
}

fn lora(name: &str) -> LoraFile {
    LoraFile::open(&golden(&format!("lora/{name}.safetensors"))).unwrap()
}

fn axes() -> Vec<usize> {
    FluxConfig::axes_from_diffusers_config(
        &std::fs::read_to_string(golden("flux_dev_config.json")).unwrap(),
    )
    .unwrap()
}

/// The tiny transformer's checkpoint (one layout) with `loras` merged in (stored as `store`, None: f32), exported
/// to `dir`.
fn export_merged_as(
    file: &str,
    loras: &[(LoraFile, f32)],
    dir: &Path,
    tag: &str,
    store: Option<DataType>,
) -> PathBuf {
    let mut ck = Checkpoint::open(&golden(file)).unwrap();
    let shapes = checkpoint_shapes(&ck);
    let resolved = resolve_for(loras, &[(Part::Denoiser, &shapes)], flux_book).unwrap();
    match store {
        None => {
            merge_into_checkpoint(&mut ck, Part::Denoiser, &resolved).unwrap();
        }
        Some(dt) => {
            if let Some(u) = resolved.part(Part::Denoiser) {
                for t in merged_tensors(u, &|n| ck.get(n), Some(dt)).unwrap() {
                    ck.set_override(t).unwrap();
                }
            }
        }
    }
    let (cfg, _, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes())).unwrap();
    let out = dir.join(format!("{tag}.onnx"));
    flux::export(&cfg, &ck, &ExportOptions::default(), &out).unwrap();
    out
}

fn export_merged(file: &str, loras: &[(LoraFile, f32)], dir: &Path, tag: &str) -> PathBuf {
    export_merged_as(file, loras, dir, tag, None)
}

fn run(e: &mut OrtEngine, inputs: &HashMap<String, HostTensor>) -> HostTensor {
    let given: Vec<(String, HostTensor)> = e
        .inputs()
        .iter()
        .map(|d| (d.name.clone(), inputs[&d.name].clone()))
        .collect();
    e.run(&given).unwrap().remove(0).1
}

const CASES: &[(&str, &[(&str, f32)])] = &[
    ("peft", &[("peft", 0.7)]),
    ("kohya", &[("kohya", 0.7)]),
    ("comfyui", &[("comfyui", 0.7)]),
    ("kohya_diffusers_names", &[("kohya_diffusers_names", 0.7)]),
    ("loha", &[("loha", 0.7)]),
    ("lokr", &[("lokr", 0.7)]),
    ("stacked_peft0.7_kohya0.5", &[("peft", 0.7), ("kohya", 0.5)]),
    ("peft_metadata", &[("peft_metadata", 0.7)]),
];

#[test]
fn merged_loras_of_every_format_match_diffusers_in_both_layouts() {
    let d = tempfile::tempdir().unwrap();
    let inputs = golden_tensors(&golden("flux_dev_io.safetensors"));
    let want = golden_tensors(&golden("lora/lora_io.safetensors"));
    for (case, files) in CASES {
        let loras: Vec<(LoraFile, f32)> = files.iter().map(|(f, s)| (lora(f), *s)).collect();
        let base = &want["sample.base"];
        let want = &want[&format!("sample.{case}")];
        let base_gap = max_rel_err(base, want);
        for file in ["flux_dev.safetensors", "flux_dev_bfl.safetensors"] {
            let onnx = export_merged(file, &loras, d.path(), &format!("{case}-{file}"));
            let mut e = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
            let err = max_rel_err(&run(&mut e, &inputs), want);
            println!(
                "{case} into {file}: max rel err {err:.2e} (the LoRA moves the output by {base_gap:.2e})"
            );
            assert!(err < 1e-4, "{case} {file}: {err}");
        }
    }
}

#[test]
fn run_time_loras_switch_in_one_engine() {
    // One engine of the built (LoRA-free) graph; LoRA sets replace each other through `set_weights`. Its weights
    // are bf16 (the checkpoint's), so the merged weights are rounded to bf16 as a refit of a 16-bit engine would.
    let d = tempfile::tempdir().unwrap();
    let inputs = golden_tensors(&golden("flux_dev_io.safetensors"));
    let want = golden_tensors(&golden("lora/lora_io.safetensors"));
    for file in ["flux_dev.safetensors", "flux_dev_bfl.safetensors"] {
        let onnx = export_merged(file, &[], d.path(), file);
        let mut engine = OrtEngine::open(&onnx, &OrtOptions::default()).unwrap();
        let mut rt = RuntimeLora::new(BTreeMap::from([(Part::Denoiser, onnx.clone())]), flux_book);
        for (case, files) in [
            CASES[0],
            CASES[1],
            CASES[6],
            CASES[4],
            ("base", &[][..]),
            CASES[5],
        ] {
            let loras: Vec<(LoraFile, f32)> = files.iter().map(|(f, s)| (lora(f), *s)).collect();
            let t = std::time::Instant::now();
            let pending = rt.weights_for(&loras).unwrap();
            for ws in pending.by_part.values() {
                engine.set_weights(ws).unwrap();
            }
            rt.commit(pending);
            let switch = t.elapsed().as_secs_f64();
            let got = run(&mut engine, &inputs);
            let err = max_rel_err(&got, &want[&format!("sample.{case}")]);
            // As if built with the LoRA: a merged build storing the merged weights in the checkpoint's bf16.
            let built = export_merged_as(
                file,
                &loras,
                d.path(),
                &format!("{case}-bf16"),
                Some(DataType::BFLOAT16),
            );
            let mut b = OrtEngine::open(&built, &OrtOptions::default()).unwrap();
            let vs_built = max_rel_err(&got, &run(&mut b, &inputs));
            println!(
                "{file}: switched to {case} in {switch:.3} s; max rel err {vs_built:.2e} against a bf16 merged \
                 build, {err:.2e} against diffusers (f32 weights)"
            );
            assert!(vs_built < 1e-5, "{file} {case}: {vs_built}");
            // bf16 storage of the merged weights: ~2^-9 relative per weight.
            assert!(err < 5e-3, "{file} {case}: {err}");
        }
    }
}

#[test]
fn modules_matching_no_layer_are_named() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("sd15.safetensors");
    let mut t = std::collections::HashMap::new();
    let down = vec![0u8; 4 * 2 * 8];
    let up = vec![0u8; 4 * 8 * 2];
    t.insert(
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 8], &down).unwrap(),
    );
    t.insert(
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight".to_string(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![8, 2], &up).unwrap(),
    );
    safetensors::serialize_to_file(&t, None, &bad).unwrap();
    let ck = Checkpoint::open(&golden("flux_dev.safetensors")).unwrap();
    let shapes = checkpoint_shapes(&ck);
    let e = resolve_for(
        &[(LoraFile::open(&bad).unwrap(), 1.0)],
        &[(Part::Denoiser, &shapes)],
        flux_book,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("sd15.safetensors")
            && e.contains("lora_unet_down_blocks_0_attentions_0_proj_in")
            && e.contains("match no layer"),
        "{e}"
    );
    // A text-encoder LoRA for a model without that part.
    let e = resolve_for(&[(lora("kohya"), 1.0)], &[], flux_book)
        .unwrap_err()
        .to_string();
    assert!(e.contains("denoiser not in this model"), "{e}");
}

mod pipeline {
    use super::*;
    use trt_diff::backend::BackendChoice;
    use trt_diff::manifest::EngineFile;
    use trt_diff::pipelines::engines::{OpenOptions, open_file};
    use trt_diff::pipelines::flux::{FluxEngines, FluxModel, FluxPipeline, load_clip_tokenizer};
    use trt_diff::pipelines::flux_build::{
        ModelFiles, OnnxPaths, Plan, export_aux, export_transformer, plan,
    };
    use trt_diff::pipelines::image::{ImagePipeline, ImageRequest};

    const PROMPT: &str = "a watercolor painting of a fox in the snow, 4k";

    pub(super) fn shared(rel: &str) -> PathBuf {
        std::env::var_os("TRT_DIFF_SHARED_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data"))
            })
            .join(rel)
    }

    /// flux_pipeline.rs's tiny diffusers-layout model folder (links to the committed components).
    pub(super) fn tiny_model(root: &Path) -> PathBuf {
        let m = root.join("tiny-flux-dev");
        std::fs::create_dir_all(&m).unwrap();
        for (name, src) in [
            ("transformer", golden("pipeline/transformer")),
            ("vae", golden("pipeline/vae")),
            ("text_encoder", golden("text_encoder")),
            ("text_encoder_2", golden("text_encoder_2")),
        ] {
            std::os::unix::fs::symlink(&src, m.join(name)).unwrap();
        }
        m
    }

    fn tiny_plan(root: &Path) -> Plan {
        let files = ModelFiles::find(
            &tiny_model(root),
            Some(&shared("tokenizers/bpe_simple_vocab_16e6.txt.gz")),
            Some(&shared("tokenizers/t5_tokenizer.json")),
        )
        .unwrap();
        plan(files, "flux-dev", None).unwrap()
    }

    fn pipeline(p: &Plan, paths: &OnnxPaths) -> FluxPipeline {
        let open = |path: &Path| {
            open_file(
                &EngineFile::open(path).unwrap(),
                BackendChoice::Cpu,
                &OpenOptions::default(),
            )
            .unwrap()
        };
        ImagePipeline::new(FluxModel::new(
            p.config.clone(),
            load_clip_tokenizer(&p.files.clip_tokenizer, p.config.clip_pad).unwrap(),
            trt_diff::tokenizer::t5::T5Tokenizer::load(&p.files.t5_tokenizer).unwrap(),
            FluxEngines {
                clip: open(&paths.clip),
                t5: open(&paths.t5),
                transformer: open(&paths.transformer),
                vae_decoder: open(&paths.vae_decoder),
                vae_encoder: None,
                tae_decoder: None,
                controlnet: None,
            },
        ))
    }

    fn final_latents(pipe: &mut FluxPipeline) -> HostTensor {
        let io = Checkpoint::open(&golden("pipeline_io.safetensors")).unwrap();
        let req = ImageRequest {
            prompt: PROMPT.into(),
            steps: Some(4),
            width: Some(32),
            height: Some(32),
            guidance: Some(3.5),
            cfg: 1.0,
            batch: 1,
            strength: 1.0,
            latents_only: true,
            initial_noise: Some(io.get("initial_latents").unwrap().to_f32().unwrap()),
            ..Default::default()
        };
        let out = pipe.generate(&req, &mut |_| Ok(())).unwrap();
        HostTensor::from_f32(&[1, 64, 64], &out.latents)
    }

    fn want(name: &str) -> HostTensor {
        let ck = Checkpoint::open(&golden(name.split(':').next().unwrap())).unwrap();
        let t = ck.get(name.split(':').nth(1).unwrap()).unwrap();
        HostTensor::from_f32(&t.shape, &t.to_f32().unwrap())
    }

    #[test]
    fn transformer_and_clip_lora_match_diffusers_merged_and_at_run_time() {
        let d = tempfile::tempdir().unwrap();
        let with_lora = want("lora/lora_io.safetensors:final_latents.pipeline_peft0.7");
        let base = want("pipeline_io.safetensors:final_latents");
        let loras = vec![(lora("pipeline_peft"), 0.7)];
        // Merged at build time.
        let p = tiny_plan(d.path()).with_loras(&loras).unwrap();
        let merged_dir = d.path().join("merged");
        std::fs::create_dir_all(&merged_dir).unwrap();
        let paths = OnnxPaths::new(&merged_dir, None);
        let f32t = DataType::FLOAT;
        export_aux(&p, &paths, f32t, f32t).unwrap();
        export_transformer(&p, &Default::default(), &paths.transformer).unwrap();
        let err = max_rel_err(&final_latents(&mut pipeline(&p, &paths)), &with_lora);
        let moved = max_rel_err(&base, &with_lora);
        println!(
            "merged: final latents max rel err {err:.2e} (the LoRA moves them by {moved:.2e})"
        );
        assert!(err < 1e-3, "{err}");
        // At run time on the LoRA-free export, switched on, off and on again in one pipeline.
        let p = p.with_loras(&[]).unwrap();
        let paths = OnnxPaths::new(d.path(), None);
        export_aux(&p, &paths, f32t, f32t).unwrap();
        export_transformer(&p, &Default::default(), &paths.transformer).unwrap();
        let mut pipe = pipeline(&p, &paths);
        pipe.model.enable_lora(BTreeMap::from([
            (Part::Denoiser, paths.transformer.clone()),
            (Part::TextEncoder(0), paths.clip.clone()),
            (Part::TextEncoder(1), paths.t5.clone()),
        ]));
        for (on, want) in [(true, &with_lora), (false, &base), (true, &with_lora)] {
            pipe.set_loras(if on { &loras[..] } else { &[] }).unwrap();
            let err = max_rel_err(&final_latents(&mut pipe), want);
            println!(
                "run time, LoRA {}: final latents max rel err {err:.2e}",
                if on { "on" } else { "off" }
            );
            // The transformer's weights are bf16: its merged weights are rounded to bf16 as a refit's would be.
            assert!(err < 2e-3, "{on}: {err}");
        }
    }
}

#[test]
fn nvfp4_side_path_takes_loras_without_requantizing() {
    // NVFP4 graph with a rank-8 side path beside each quantized layer: zero as built (the plain NVFP4 output),
    // LoRAs switched through its A/B weights; compared with diffusers' f32 LoRA results within NVFP4's own error.
    // diffusers layout: a BFL model's fused qkv would need the ranks of to_q, to_k and to_v together.
    let d = tempfile::tempdir().unwrap();
    let inputs = golden_tensors(&golden("flux_dev_io.safetensors"));
    let want = golden_tensors(&golden("lora/lora_io.safetensors"));
    let ck = Checkpoint::open(&golden("flux_dev.safetensors")).unwrap();
    let (cfg, _, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes())).unwrap();
    let export = |rank: usize, tag: &str| {
        let opts = ExportOptions {
            precision: flux::FluxPrecision::Nvfp4,
            lora_rank: rank,
            ..Default::default()
        };
        let out = d.path().join(format!("{tag}.onnx"));
        flux::export(&cfg, &ck, &opts, &out).unwrap();
        out
    };
    let plain = export(0, "plain");
    let side = export(8, "side");
    let plain_out = run(
        &mut OrtEngine::open(&plain, &OrtOptions::default()).unwrap(),
        &inputs,
    );
    let mut engine = OrtEngine::open(&side, &OrtOptions::default()).unwrap();
    assert_eq!(max_rel_err(&run(&mut engine, &inputs), &plain_out), 0.0);
    let quant_err = max_rel_err(&plain_out, &want["sample.base"]);
    let mut rt = RuntimeLora::new(BTreeMap::from([(Part::Denoiser, side.clone())]), flux_book);
    let mut apply = |engine: &mut OrtEngine, loras: &[(LoraFile, f32)]| -> anyhow::Result<f64> {
        let t = std::time::Instant::now();
        let pending = rt.weights_for(loras)?;
        for ws in pending.by_part.values() {
            engine.set_weights(ws)?;
        }
        rt.commit(pending);
        Ok(t.elapsed().as_secs_f64())
    };
    for (case, files) in [CASES[0], CASES[1], CASES[6]] {
        let loras: Vec<(LoraFile, f32)> = files.iter().map(|(f, s)| (lora(f), *s)).collect();
        let secs = apply(&mut engine, &loras).unwrap();
        let want = &want[&format!("sample.{case}")];
        let err = max_rel_err(&run(&mut engine, &inputs), want);
        let moved = max_rel_err(&want_base(), want);
        println!(
            "NVFP4 + side path, {case}: switched in {secs:.3} s; max rel err {err:.2e} against diffusers' f32 \
             (NVFP4 alone: {quant_err:.2e}; the LoRA moves the output by {moved:.2e})"
        );
        assert!(err < 2.0 * quant_err + 0.01, "{case}: {err}");
    }
    apply(&mut engine, &[]).unwrap();
    assert_eq!(max_rel_err(&run(&mut engine, &inputs), &plain_out), 0.0);
    // LoHa is no `up @ down`: the side path refuses it, naming the module and the way out.
    let e = apply(&mut engine, &[(lora("loha"), 1.0)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not a plain low-rank delta") && e.contains("build --lora"),
        "{e}"
    );
    // Three rank-4 LoRAs on one layer need rank 12 > 8.
    let e = apply(
        &mut engine,
        &[
            (lora("peft"), 1.0),
            (lora("kohya"), 1.0),
            (lora("comfyui"), 1.0),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("side path has rank 8") && e.contains("--lora-rank"),
        "{e}"
    );
}

fn want_base() -> HostTensor {
    golden_tensors(&golden("lora/lora_io.safetensors"))["sample.base"].clone()
}

#[test]
fn side_path_graphs_build_with_tensorrt_rtx_in_fp8_and_nvfp4() {
    let d = tempfile::tempdir().unwrap();
    let inputs = golden_tensors(&golden("flux_dev_io.safetensors"));
    let ck = Checkpoint::open(&golden("flux_dev.safetensors")).unwrap();
    let (cfg, _, _) = FluxConfig::from_checkpoint_with_axes(&ck, Some(axes())).unwrap();
    // FP8 needs calibrated activation ranges: one calibration run on the golden inputs.
    let calib = d.path().join("calib.onnx");
    let opts = ExportOptions {
        calibration: true,
        ..Default::default()
    };
    flux::export(&cfg, &ck, &opts, &calib).unwrap();
    let mut e = OrtEngine::open(&calib, &OrtOptions::default()).unwrap();
    let given: Vec<(String, HostTensor)> = e
        .inputs()
        .iter()
        .map(|t| (t.name.clone(), inputs[&t.name].clone()))
        .collect();
    let mut amax = HashMap::new();
    flux::merge_amax(&mut amax, &e.run(&given).unwrap()[1..]);
    for precision in [flux::FluxPrecision::Fp8, flux::FluxPrecision::Nvfp4] {
        let onnx = d.path().join(format!("{precision:?}.onnx"));
        let opts = ExportOptions {
            precision,
            amax: amax.clone(),
            lora_rank: 4,
            ..Default::default()
        };
        let r = flux::export(&cfg, &ck, &opts, &onnx).unwrap();
        let model = trt_diff::onnx::OnnxFile::load(&onnx).unwrap().model;
        let sides = model
            .graph
            .iter()
            .flat_map(|g| &g.initializer)
            .filter(|t| t.name.ends_with(".lora_down"))
            .count();
        let quantized: usize = r
            .layers
            .iter()
            .filter(|(k, _)| *k != "kept")
            .map(|(_, v)| v)
            .sum();
        assert_eq!(sides, quantized, "one side path per quantized layer");
        let out = d.path().join(format!("{precision:?}.plan"));
        trt_diff::trt::build_engine(&trt_diff::trt::BuildOptions {
            onnx: onnx.clone(),
            out: out.clone(),
            trt: trt_diff::trt::TrtChoice::Rtx,
            shapes: flux::profile(&cfg, [1, 1, 2], [16, 32, 64], 7).unwrap(),
            ..Default::default()
        })
        .unwrap();
        println!(
            "{precision:?} + rank-4 side path on {sides} layers: {} byte plan",
            std::fs::metadata(&out).unwrap().len()
        );
    }
}

/// `build --lora` and `generate --lora` through the command line: a bundle built with the LoRA and one built
/// without it, given the LoRA at run time, write the same image; a LoRA for another model is refused by name.
#[test]
fn build_and_generate_with_lora_on_the_command_line() {
    use common::{run, s};
    let d = tempfile::tempdir().unwrap();
    let model = pipeline::tiny_model(d.path());
    let (ct, tt) = (
        pipeline::shared("tokenizers/bpe_simple_vocab_16e6.txt.gz"),
        pipeline::shared("tokenizers/t5_tokenizer.json"),
    );
    let lora_arg = format!("{}:0.7", golden("lora/pipeline_peft.safetensors").display());
    let build = |plan: &Path, extra: &[&str]| {
        let mut args = vec![
            "build",
            s(&model),
            "--arch",
            "flux-dev",
            "--precision",
            "fp32",
            "--out",
            s(plan),
            "--clip-tokenizer",
            s(&ct),
            "--t5-tokenizer",
            s(&tt),
            "--image-px",
            "32,32,32",
            "--no-progress",
        ];
        args.extend_from_slice(extra);
        run(&args, true);
    };
    let (base, merged) = (d.path().join("base.plan"), d.path().join("merged.plan"));
    build(&base, &[]);
    build(&merged, &["--lora", &lora_arg]);
    let generate = |plan: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--engine",
            s(plan),
            "--prompt",
            "a fox",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "3",
            "--seed",
            "5",
            "--no-progress",
            "--backend",
            "cpu",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        run(&args, true)
    };
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let (a, b, c) = (
        d.path().join("a.png"),
        d.path().join("b.png"),
        d.path().join("c.png"),
    );
    generate(&merged, &a, &[]);
    let r = generate(&base, &b, &["--lora", &lora_arg]);
    assert!(r.stderr.contains("applied 1 LoRA"), "{}", r.stderr);
    generate(&base, &c, &[]);
    let (a, b, c) = (pixels(&a), pixels(&b), pixels(&c));
    let max_diff = |x: &[u8], y: &[u8]| x.iter().zip(y).map(|(p, q)| p.abs_diff(*q)).max().unwrap();
    // Run time rounds the transformer's merged weights to its bf16: a level or two of 255 at most.
    println!(
        "merged build vs run-time LoRA: max pixel diff {}; vs no LoRA: {}",
        max_diff(&a, &b),
        max_diff(&a, &c)
    );
    assert!(max_diff(&a, &b) <= 2);
    assert!(max_diff(&a, &c) > 10);
    // Not a LoRA at all; a LoRA of the other tiny Flux (two single blocks, this one has one).
    let r = run(
        &[
            "build",
            s(&model),
            "--arch",
            "flux-dev",
            "--out",
            s(&d.path().join("x.plan")),
            "--clip-tokenizer",
            s(&ct),
            "--t5-tokenizer",
            s(&tt),
            "--lora",
            s(&golden("flux_dev_io.safetensors")),
            "--no-progress",
        ],
        false,
    );
    assert!(r.stderr.contains("in no LoRA format"), "{}", r.stderr);
    let other = golden("lora/lokr.safetensors");
    let r = run(
        &[
            "generate",
            "--engine",
            s(&base),
            "--prompt",
            "a fox",
            "--backend",
            "cpu",
            "--out",
            s(&d.path().join("d.png")),
            "--lora",
            s(&other),
        ],
        false,
    );
    assert!(
        r.stderr.contains("lokr.safetensors")
            && r.stderr.contains("match no layer")
            && r.stderr.contains("lora_unet_single_blocks_1_linear1"),
        "{}",
        r.stderr
    );
}

/// Text-encoder LoRAs by their kohya and ComfyUI names land on the tiny CLIP-L and T5 weights (transformers 5
/// leaves `text_model.` out of CLIP's file; LoRAs keep it): merged weight = base + strength * alpha / rank * up @
/// down, computed here by hand.
#[test]
fn text_encoder_loras_land_on_clip_and_t5() {
    let d = tempfile::tempdir().unwrap();
    let clip = Checkpoint::open(&golden("text_encoder/model.safetensors")).unwrap();
    let t5 = Checkpoint::open(&golden("text_encoder_2/model.safetensors")).unwrap();
    let targets = [
        (
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "encoder.layers.0.self_attn.q_proj.weight",
            Part::TextEncoder(0),
        ),
        (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1",
            "encoder.layers.0.mlp.fc1.weight",
            Part::TextEncoder(0),
        ),
        (
            "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
            "encoder.block.0.layer.0.SelfAttention.q.weight",
            Part::TextEncoder(1),
        ),
        (
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wi_0",
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
            Part::TextEncoder(1),
        ),
    ];
    let mut data: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (k, (module, tensor, part)) in targets.iter().enumerate() {
        let ck = if *part == Part::TextEncoder(0) {
            &clip
        } else {
            &t5
        };
        let s = ck.shape(tensor).unwrap().to_vec();
        let f = |i: usize| ((i * 7 + k * 13) % 11) as f32 / 11.0 - 0.5;
        data.push((
            format!("{module}.lora_down.weight"),
            vec![2, s[1]],
            (0..2 * s[1]).map(f).collect(),
        ));
        data.push((
            format!("{module}.lora_up.weight"),
            vec![s[0], 2],
            (0..2 * s[0]).map(|i| f(i + 3)).collect(),
        ));
        data.push((format!("{module}.alpha"), vec![], vec![1.0]));
    }
    let bytes: Vec<Vec<u8>> = data
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    let file = d.path().join("te.safetensors");
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let loras = vec![(LoraFile::open(&file).unwrap(), 0.5)];
    let (cs, ts) = (checkpoint_shapes(&clip), checkpoint_shapes(&t5));
    let r = resolve_for(
        &loras,
        &[(Part::TextEncoder(0), &cs), (Part::TextEncoder(1), &ts)],
        flux_book,
    )
    .unwrap();
    let mut merged = [
        Checkpoint::open(&golden("text_encoder/model.safetensors")).unwrap(),
        Checkpoint::open(&golden("text_encoder_2/model.safetensors")).unwrap(),
    ];
    assert_eq!(
        merge_into_checkpoint(&mut merged[0], Part::TextEncoder(0), &r).unwrap(),
        2
    );
    assert_eq!(
        merge_into_checkpoint(&mut merged[1], Part::TextEncoder(1), &r).unwrap(),
        2
    );
    for (k, (_, tensor, part)) in targets.iter().enumerate() {
        let i = if *part == Part::TextEncoder(0) { 0 } else { 1 };
        let base = [&clip, &t5][i].get(tensor).unwrap().to_f32().unwrap();
        let got = merged[i].get(tensor).unwrap().to_f32().unwrap();
        let (down, up) = (&data[3 * k].2, &data[3 * k + 1].2);
        let (rows, cols) = (up.len() / 2, down.len() / 2);
        for r in 0..rows {
            for c in 0..cols {
                let delta = 0.5 * 0.5 * (up[r * 2] * down[c] + up[r * 2 + 1] * down[cols + c]);
                let want = base[r * cols + c] + delta;
                assert!(
                    (got[r * cols + c] - want).abs() < 1e-5,
                    "{tensor} [{r},{c}]"
                );
            }
        }
    }
}

/// An NVFP4 bundle built with `--lora-rank`: `generate --lora` switches the LoRA through the side path (the
/// transformer's quantized layers) and merges the CLIP part, and moves the image; `--lora-rank` on a 32-bit
/// build is refused with the way out.
#[test]
fn nvfp4_bundle_takes_run_time_loras_through_the_side_path() {
    use common::{run, s};
    let d = tempfile::tempdir().unwrap();
    let model = pipeline::tiny_model(d.path());
    let (ct, tt) = (
        pipeline::shared("tokenizers/bpe_simple_vocab_16e6.txt.gz"),
        pipeline::shared("tokenizers/t5_tokenizer.json"),
    );
    let plan = d.path().join("q.plan");
    let build = |precision: &str, ok: bool| {
        run(
            &[
                "build",
                s(&model),
                "--arch",
                "flux-dev",
                "--precision",
                precision,
                "--lora-rank",
                "8",
                "--out",
                s(&plan),
                "--clip-tokenizer",
                s(&ct),
                "--t5-tokenizer",
                s(&tt),
                "--image-px",
                "32,32,32",
                "--no-progress",
            ],
            ok,
        )
    };
    let r = build("fp32", false);
    assert!(r.stderr.contains("drop --lora-rank"), "{}", r.stderr);
    build("nvfp4", true);
    let lora_arg = format!("{}:0.7", golden("lora/pipeline_peft.safetensors").display());
    let generate = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--engine",
            s(&plan),
            "--prompt",
            "a fox",
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "3",
            "--seed",
            "5",
            "--no-progress",
            "--backend",
            "cpu",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        run(&args, true)
    };
    let (a, b) = (d.path().join("a.png"), d.path().join("b.png"));
    generate(&a, &[]);
    let r = generate(&b, &["--lora", &lora_arg]);
    assert!(r.stderr.contains("applied 1 LoRA"), "{}", r.stderr);
    let px = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    let diff = px(&a)
        .iter()
        .zip(px(&b))
        .map(|(p, q)| p.abs_diff(q))
        .max()
        .unwrap();
    println!("NVFP4 bundle: the run-time LoRA moves pixels by up to {diff}");
    assert!(diff > 5);
}
