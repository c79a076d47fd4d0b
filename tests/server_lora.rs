//! `serve --lora-dir` on an image bundle: A1111's `<lora:NAME:STRENGTH>` prompt tags switch run-time LoRAs
//! between requests; the images equal `generate --lora FILE:STRENGTH` with the tag-free prompt.
use crate::common;
use common::http::{http, start_with};
use common::*;

fn pixels(png_bytes: &[u8]) -> Vec<u8> {
    let mut r = png::Decoder::new(std::io::Cursor::new(png_bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    buf
}

fn b64(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn prompt_lora_tags_switch_loras_between_requests() {
    let d = tempfile::tempdir().unwrap();
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/flux");
    let model = d.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for (c, dir) in [
        ("transformer", "pipeline/transformer"),
        ("vae", "pipeline/vae"),
        ("text_encoder", "text_encoder"),
        ("text_encoder_2", "text_encoder_2"),
    ] {
        std::os::unix::fs::symlink(format!("{golden}/{dir}"), model.join(c)).unwrap();
    }
    let loras = d.path().join("loras");
    std::fs::create_dir(&loras).unwrap();
    let lora_file = format!("{golden}/lora/pipeline_peft.safetensors");
    std::fs::copy(&lora_file, loras.join("fox style.safetensors")).unwrap();
    // A link out of the folder must not be followed.
    std::os::unix::fs::symlink(
        format!("{golden}/flux_dev_io.safetensors"),
        loras.join("out.safetensors"),
    )
    .unwrap();
    let plan = d.path().join("flux.plan");
    run(
        &[
            "build",
            s(&model),
            "--arch",
            "flux-dev",
            "--precision",
            "fp32",
            "--onnx-only",
            "--image-px",
            "32,32,64",
            "--clip-tokenizer",
            s(&shared_data("tokenizers/bpe_simple_vocab_16e6.txt.gz")),
            "--t5-tokenizer",
            s(&shared_data("tokenizers/t5_tokenizer.json")),
            "--out",
            s(&plan),
            "--no-progress",
        ],
        true,
    );
    let bundle = d.path().join("flux.plan.json");
    let prompt = "a watercolor painting of a fox";
    let generate = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--engine",
            s(&bundle),
            "--prompt",
            prompt,
            "--width",
            "32",
            "--height",
            "32",
            "--steps",
            "3",
            "--seed",
            "1",
            "--no-progress",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        run(&args, true);
        pixels(&std::fs::read(out).unwrap())
    };
    let plain = generate(&d.path().join("plain.png"), &[]);
    let lora_arg = format!("{lora_file}:0.7");
    let styled = generate(&d.path().join("styled.png"), &["--lora", &lora_arg]);
    assert!(plain != styled, "the LoRA must change the image");

    let server = start_with(&bundle, &["--lora-dir", s(&loras)]);
    let a = server.addr.as_str();
    let txt2img = |p: &str| {
        let body =
            serde_json::json!({"prompt": p, "steps": 3, "width": 32, "height": 32, "seed": 1,
            "sampler_name": "Euler"})
            .to_string();
        http(a, "POST", "/sdapi/v1/txt2img", &body)
    };
    let image = |(code, body): (u16, String)| {
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        pixels(&b64(v["images"][0].as_str().unwrap()))
    };
    // With the tag (anywhere in the prompt), then without it (the LoRA is removed), then with it again.
    assert!(
        image(txt2img(
            "a watercolor <lora:fox style:0.7> painting of a fox"
        )) == styled
    );
    assert!(image(txt2img(prompt)) == plain);
    assert!(image(txt2img(&format!("{prompt} <lora:fox style:0.7>"))) == styled);
    // The OpenAI route reads the same tags.
    let body = serde_json::json!({"prompt": format!("{prompt}<lora:fox style:0.7>"), "size": "32x32", "steps": 3,
        "seed": 1, "response_format": "b64_json"})
    .to_string();
    let (code, body) = http(a, "POST", "/v1/images/generations", &body);
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(pixels(&b64(v["data"][0]["b64_json"].as_str().unwrap())) == styled);
    // The listing, and clear refusals.
    let (code, body) = http(a, "GET", "/sdapi/v1/loras", "");
    assert_eq!(code, 200);
    assert!(body.contains("\"fox style\""), "{body}");
    for (p, says) in [
        ("x <lora:nope:1>", "no 'nope.safetensors'"),
        ("x <lora:../loras/fox style:1>", "no path"),
        ("x <lora:out:1>", "outside the server's LoRA folder"),
        ("x <lora:fox style:lots>", "not a strength"),
        ("x <lora:fox style:1", "not closed"),
    ] {
        let (code, body) = txt2img(p);
        assert_eq!(code, 400, "{p}: {body}");
        assert!(body.contains(says), "{p}: {body}");
    }
    drop(server);
    // Without --lora-dir a tag is refused, naming the option.
    let server = start_with(&bundle, &[]);
    let body = serde_json::json!({"prompt": "x <lora:fox style:1>", "steps": 2, "width": 32, "height": 32}).to_string();
    let (code, body) = http(server.addr.as_str(), "POST", "/sdapi/v1/txt2img", &body);
    assert_eq!(code, 400);
    assert!(body.contains("--lora-dir"), "{body}");
}
