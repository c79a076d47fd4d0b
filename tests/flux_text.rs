//! CLIP-L and T5 v1.1 encoder graphs on ONNX Runtime against transformers' CLIPTextModel / T5EncoderModel on the
//! same tiny random weights (tests/golden/flux, made by scripts/golden/flux_text.py), within 1e-4 relative in f32.
use std::path::{Path, PathBuf};
use trt_diff::backend::Engine;
use trt_diff::backend::HostTensor;
use trt_diff::backend::ort_backend::{OrtEngine, OrtOptions};
use trt_diff::models::clip::{self, ClipTextConfig};
use trt_diff::models::t5::{self, T5Config, relative_buckets};
use trt_diff::onnx::{DataType, SaveOptions, save};
use trt_diff::weights::safetensors_file::Checkpoint;

fn golden(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/flux")
        .join(rel)
}

fn ids_tensor(ck: &Checkpoint, name: &str) -> HostTensor {
    let t = ck.get(name).unwrap();
    assert_eq!(t.dtype, DataType::INT64);
    HostTensor {
        dtype: DataType::INT64,
        shape: t.shape.clone(),
        data: t.data.to_vec(),
    }
}

fn run(model: trt_diff::onnx::proto::ModelProto, dir: &Path, ids: HostTensor) -> Vec<Vec<f64>> {
    let path = dir.join("m.onnx");
    save(model, &path, &SaveOptions::default()).unwrap();
    let mut e = OrtEngine::open(&path, &OrtOptions::default()).unwrap();
    let out = e.run(&[("input_ids".to_string(), ids)]).unwrap();
    out.into_iter().map(|(_, t)| t.to_f64().unwrap()).collect()
}

/// Largest |a-b| relative to the reference's largest magnitude.
fn rel_err(got: &[f64], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - *b as f64).abs()))
        / scale
}

#[test]
fn clip_text_matches_transformers() {
    let io = Checkpoint::open(&golden("text_io.safetensors")).unwrap();
    let cfg = ClipTextConfig::from_json(
        &std::fs::read_to_string(golden("text_encoder/config.json")).unwrap(),
    )
    .unwrap();
    let ck = Checkpoint::open(&golden("text_encoder/model.safetensors")).unwrap();
    let g = clip::graph(&cfg, &ck, DataType::FLOAT).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = run(g, dir.path(), ids_tensor(&io, "clip_input_ids"));
    let h = io.get("clip_last_hidden_state").unwrap().to_f32().unwrap();
    let p = io.get("clip_pooled").unwrap().to_f32().unwrap();
    let (eh, ep) = (rel_err(&out[0], &h), rel_err(&out[1], &p));
    eprintln!("CLIP: last_hidden_state rel err {eh:.2e}, pooled {ep:.2e}");
    assert!(eh < 1e-4 && ep < 1e-4, "{eh} {ep}");
}

#[test]
fn t5_encoder_matches_transformers() {
    let io = Checkpoint::open(&golden("text_io.safetensors")).unwrap();
    let cfg = T5Config::from_json(
        &std::fs::read_to_string(golden("text_encoder_2/config.json")).unwrap(),
        512,
    )
    .unwrap();
    let ck = Checkpoint::open(&golden("text_encoder_2")).unwrap();
    let want = io.get("t5_last_hidden_state").unwrap().to_f32().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let g = t5::graph(&cfg, &ck, DataType::FLOAT).unwrap();
    let out = run(g, dir.path(), ids_tensor(&io, "t5_input_ids"));
    let e = rel_err(&out[0], &want);
    eprintln!("T5 f32: rel err {e:.2e}");
    assert!(e < 1e-4, "{e}");
    // bf16 is for TensorRT (ONNX Runtime's CPU provider has no bf16 MatMul); f16 is refused.
    let err = t5::graph(&cfg, &ck, DataType::FLOAT16).unwrap_err();
    assert!(err.to_string().contains("overflow f16"), "{err}");
}

#[test]
fn t5_buckets_follow_transformers() {
    // transformers' _relative_position_bucket(bidirectional, 32 buckets, max_distance 128) at a few offsets.
    let b = relative_buckets(32, 128, 512);
    let at = |rel: i64| b[(rel + 511) as usize];
    let expect = [
        (0, 0),
        (1, 17),
        (-1, 1),
        (7, 23),
        (8, 24),
        (-8, 8),
        (12, 25),
        (-20, 10),
        (127, 31),
        (-511, 15),
    ];
    for (rel, bucket) in expect {
        assert_eq!(at(rel), bucket, "rel {rel}");
    }
}

#[test]
fn wrong_checkpoint_is_a_clear_error() {
    let ck = Checkpoint::open(&golden("text_encoder_2")).unwrap();
    let e = clip::graph(&ClipTextConfig::clip_l(), &ck, DataType::FLOAT).unwrap_err();
    assert!(e.to_string().contains("not a CLIP text encoder"), "{e}");
}
