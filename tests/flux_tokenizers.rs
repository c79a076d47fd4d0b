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

/// A diffusers folder whose CLIP tokenizer is only `tokenizer/tokenizer.json`, as transformers 5 saves it
/// (tests/golden/tokenizers/clip_tokenizer_json.json, scripts/golden/clip_tokenizer_json.py): the file is rebuilt
/// from openai's merges (its vocabulary and merges checked by sha256 against transformers' file), found by the
/// model-folder lookup, and tokenizes as transformers' fast tokenizer does.
#[test]
fn clip_tokenizer_json_as_transformers_5_saves_it() {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/tokenizers/clip_tokenizer_json.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut text = String::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(data().join("bpe_simple_vocab_16e6.txt.gz")).unwrap(),
    )
    .read_to_string(&mut text)
    .unwrap();
    let merges: Vec<&str> = text.lines().skip(1).take(49152 - 256 - 2).collect();
    // openai's bytes_to_unicode order: printable bytes first, then the others mapped from U+0100.
    let mut order: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<char> = order.iter().map(|&c| char::from_u32(c).unwrap()).collect();
    for b in 0..256u32 {
        if !order.contains(&b) {
            order.push(b);
            chars.push(char::from_u32(256 + chars.len() as u32 - 188).unwrap());
        }
    }
    let mut vocab: Vec<String> = chars.iter().map(|c| c.to_string()).collect();
    vocab.extend(chars.iter().map(|c| format!("{c}</w>")));
    vocab.extend(merges.iter().map(|m| m.replace(' ', "")));
    vocab.extend(["<|startoftext|>".to_string(), "<|endoftext|>".to_string()]);
    let hex = |s: String| format!("{:x}", Sha256::digest(s.as_bytes()));
    assert_eq!(hex(merges.join("\n")), golden["merges_sha256"]);
    let listed: Vec<String> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{t}\t{i}"))
        .collect();
    assert_eq!(hex(listed.join("\n")), golden["vocab_sha256"]);
    let mut file = golden["skeleton"].clone();
    file["model"]["vocab"] = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::json!(i)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    file["model"]["merges"] = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap();
            serde_json::json!([a, b])
        })
        .collect::<Vec<_>>()
        .into();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    for sub in [
        "transformer",
        "text_encoder",
        "text_encoder_2",
        "vae",
        "tokenizer",
        "tokenizer_2",
    ] {
        std::fs::create_dir_all(model.join(sub)).unwrap();
    }
    let json = model.join("tokenizer/tokenizer.json");
    std::fs::write(&json, serde_json::to_vec(&file).unwrap()).unwrap();
    std::fs::write(model.join("tokenizer_2/tokenizer.json"), "{}").unwrap();
    let found = trt_diff::pipelines::flux_build::ModelFiles::find(&model, None, None).unwrap();
    assert_eq!(found.clip_tokenizer, json);
    let tok = clip::ClipTokenizer::load(&json).unwrap();
    for (prompt, want) in golden["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(golden["ids"].as_array().unwrap())
    {
        let mut got = vec![clip::BOS];
        got.extend(tok.encode(prompt.as_str().unwrap()));
        got.push(clip::EOS);
        let want: Vec<u32> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got, want, "{prompt}");
    }
    // A vocabulary that is not CLIP's is refused, naming the file.
    file["model"]["vocab"]["in"] = serde_json::json!(7);
    std::fs::write(&json, serde_json::to_vec(&file).unwrap()).unwrap();
    let e = format!("{:#}", clip::ClipTokenizer::load(&json).err().unwrap());
    assert!(e.contains("tokenizer.json") && e.contains("'in'"), "{e}");
}
