//! CLIP BPE and T5 Unigram ids against ../shared/data/tokenizers/tokenizer_testvec.json (open_clip and Hugging Face
//! `tokenizers` made the vectors).
use std::path::PathBuf;
use trt_diff::tokenizer::{clip, t5};

fn data() -> PathBuf {
    std::env::var_os("TRT_DIFF_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"))
        .join("tokenizers")
}

fn cases(kind: &str) -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(data().join("tokenizer_testvec.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = v[kind]["cases"].as_array().unwrap();
    assert!(cases.len() >= 7);
    cases
        .iter()
        .map(|c| {
            let ids = c["ids"].as_array().unwrap();
            (
                c["text"].as_str().unwrap().to_string(),
                ids.iter().map(|i| i.as_u64().unwrap() as u32).collect(),
            )
        })
        .collect()
}

#[test]
fn clip_ids_match_open_clip() {
    let tok = clip::ClipTokenizer::load(&data().join("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    for (text, ids) in cases("clip") {
        assert_eq!(tok.encode(&text), ids, "{text:?}");
    }
}

#[test]
fn clip_pads_truncates_and_keeps_eos() {
    let tok = clip::ClipTokenizer::load(&data().join("bpe_simple_vocab_16e6.txt.gz")).unwrap();
    let (ids, dropped) = tok.encode_padded("A photo of a cat", 77);
    assert_eq!(ids.len(), 77);
    assert_eq!(&ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert!(ids[7..].iter().all(|&i| i == clip::EOS));
    assert_eq!(dropped, 0);
    let long = "cat ".repeat(100);
    let (ids, dropped) = tok.encode_padded(&long, 77);
    assert_eq!((ids.len(), ids[76], dropped), (77, clip::EOS, 25));
}

#[test]
fn t5_ids_match_hf_tokenizers() {
    let tok = t5::T5Tokenizer::load(&data().join("t5_tokenizer.json")).unwrap();
    for (text, ids) in cases("t5") {
        assert_eq!(tok.encode(&text).unwrap(), ids, "{text:?}");
    }
    let (ids, dropped) = tok.encode_padded("Hello world", 8).unwrap();
    assert_eq!((ids, dropped), (vec![8774, 296, 1, 0, 0, 0, 0, 0], 0));
    let (ids, dropped) = tok.encode_padded("Hello world", 2).unwrap();
    assert_eq!((ids, dropped), (vec![8774, 1], 1));
}

#[test]
fn bad_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.json");
    std::fs::write(&p, "{").unwrap();
    let e = t5::T5Tokenizer::load(&p).err().unwrap().to_string();
    assert!(e.contains("x.json"), "{e}");
    let e = clip::ClipTokenizer::load(&p).err().unwrap();
    assert!(format!("{e:#}").contains("x.json"), "{e:#}");
}
