//! SDXL ControlNet-Union on the tiny SDXL pipeline (tests/golden/sd/controlnet_union,
//! scripts/golden/sd_controlnet_union.py): final latents against diffusers' StableDiffusionXLControlNetUnionPipeline
//! with one control (a mode by name) and with two controls of different modes and windows in one call; a missing or
//! out-of-range mode is refused.
use crate::sd_controlnet::{golden, max_rel, pipeline, run, tensor};
use trt_diff::pipelines::image::{ControlImage, ControlMode};

fn control(image: &str, strength: f32, start: f32, end: f32, mode: &str) -> ControlImage {
    ControlImage {
        image: golden(image),
        strength,
        start,
        end,
        preprocess: None,
        mode: Some(mode.parse::<ControlMode>().unwrap()),
    }
}

#[test]
fn sdxl_union_controlnet_matches_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let mut pipe = pipeline(d.path(), true, &golden("sd/controlnet_union/model"));
    let io = "sd/controlnet_union/union_io.safetensors";
    let off = tensor(io, "off");
    let cases = [
        (
            "one",
            vec![control(
                "sd/controlnet/control.png",
                0.7,
                0.0,
                0.75,
                "canny",
            )],
        ),
        (
            "two",
            vec![
                control("sd/controlnet/control.png", 0.6, 0.0, 1.0, "1"),
                control("sd/controlnet_union/control2.png", 0.5, 0.25, 1.0, "tile"),
            ],
        ),
    ];
    for (key, controls) in cases {
        let want = tensor(io, key);
        let e = max_rel(&run(&mut pipe, true, controls), &want);
        println!(
            "SDXL ControlNet-Union {key}: max rel err {e:.2e} (the ControlNet moves the latents by {:.2e})",
            max_rel(&want, &off)
        );
        assert!(e < 1e-4, "{key}: {e}");
    }
    let e = max_rel(&run(&mut pipe, true, vec![]), &off);
    assert!(e < 1e-4, "without a control: {e}");
    // A union ControlNet needs a mode in range.
    let mut refused = |c: ControlImage| {
        let req = trt_diff::pipelines::image::ImageRequest {
            prompt: "a fox".into(),
            steps: Some(2),
            width: Some(32),
            height: Some(32),
            controls: vec![c],
            ..Default::default()
        };
        pipe.generate(&req, &mut |_| Ok(()))
            .err()
            .unwrap()
            .to_string()
    };
    let e = refused(ControlImage {
        mode: None,
        ..control("sd/controlnet/control.png", 1.0, 0.0, 1.0, "0")
    });
    assert!(
        e.contains("ControlNet-Union (8 modes): give --control-mode") && e.contains("openpose=0"),
        "{e}"
    );
    let e = refused(control("sd/controlnet/control.png", 1.0, 0.0, 1.0, "8"));
    assert!(
        e.contains("out of range") && e.contains("num_mode 8"),
        "{e}"
    );
}

/// `build --controlnet UNION_DIR` for SDXL (the TensorRT-RTX builder included when its libraries are found) and
/// `generate` with two controls of different modes in one ControlNet call, through the CLI on the CPU backend: the
/// mode changes the image, and a mode out of xinsir's table is refused.
#[test]
fn sdxl_union_controlnet_builds_and_generates_on_the_command_line() {
    use crate::sd_controlnet::{clip_vocab, model_dir};
    let d = tempfile::tempdir().unwrap();
    let m = model_dir(d.path(), true);
    let s = |p: &std::path::Path| p.to_string_lossy().into_owned();
    let run = |args: Vec<String>, ok: bool| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::common::run(&args, ok).stderr
    };
    let plan = d.path().join("xl.plan");
    let args = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    run(
        args(&[
            "build",
            &s(&m),
            "--arch",
            "sdxl",
            "--precision",
            "fp32",
            "--clip-tokenizer",
            &s(&clip_vocab()),
            "--image-px",
            "32,32,64",
            "--controlnet",
            &s(&golden("sd/controlnet_union/model")),
            "--out",
            &s(&plan),
            "--no-progress",
        ]),
        true,
    );
    if plan.exists() {
        assert!(d.path().join("xl.controlnet.plan").exists());
    }
    let (one, two) = (
        s(&golden("sd/controlnet/control.png")),
        s(&golden("sd/controlnet_union/control2.png")),
    );
    let generate = |out: &str, modes: [&str; 2], ok: bool| {
        let out = d.path().join(out);
        let mut a = args(&[
            "generate",
            "--engine",
            &s(&plan),
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
            &s(&out),
        ]);
        a.extend(args(&[
            "--control",
            &one,
            "--control-mode",
            modes[0],
            "--control",
            &two,
            "--control-mode",
            modes[1],
        ]));
        (run(a, ok), out)
    };
    let (_, a) = generate("a.png", ["depth", "tile"], true);
    let (_, b) = generate("b.png", ["1", "6"], true);
    let (_, c) = generate("c.png", ["canny", "tile"], true);
    let read = |p: &std::path::Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(read(&a), read(&b), "mode names and numbers agree");
    assert_ne!(read(&a), read(&c), "the mode changes the image");
    let (e, _) = generate("d.png", ["depth", "9"], false);
    assert!(e.contains("9") && e.contains("openpose=0"), "{e}");
}
