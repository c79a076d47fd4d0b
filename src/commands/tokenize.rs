//! `trt-diff tokenize --vocab FILE.gguf|HF_FOLDER TEXT [--decode]`: token ids of text, or text of ids.
use crate::tokenizer::llm_vocab::Vocab;
use anyhow::{Context, Result, bail};
use std::path::Path;

pub fn run(vocab: &Path, text: &str, decode: bool, parse_special: bool) -> Result<()> {
    println!("{}", tokenize(vocab, text, decode, parse_special)?);
    Ok(())
}

/// Ids joined by spaces (no BOS), or with `decode` the text of the ids given as `text`.
fn tokenize(vocab: &Path, text: &str, decode: bool, parse_special: bool) -> Result<String> {
    let v = open_vocab(vocab)?;
    if !decode {
        let ids = v.tokenize(text, false, parse_special);
        return Ok(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
    }
    let mut ids = Vec::new();
    for t in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
    {
        match t.parse::<u32>() {
            Ok(id) if (id as usize) < v.n_tokens() => ids.push(id),
            _ => bail!(
                "--decode: '{t}' is not a token id of '{}' (0..{})",
                vocab.display(),
                v.n_tokens()
            ),
        }
    }
    let bytes = v.detokenize(&ids, parse_special);
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// A GGUF vocabulary, or a Hugging Face folder's tokenizer.json converted as `build` converts it.
fn open_vocab(path: &Path) -> Result<Vocab> {
    if !path.is_dir() {
        return Vocab::open(path);
    }
    if !crate::tokenizer::hf_vocab::has_tokenizer_json(path) {
        bail!(
            "'{}' is a folder without tokenizer.json: give a GGUF file or a Hugging Face folder",
            path.display()
        );
    }
    let tmp = tempfile::tempdir().context("cannot create a temporary folder")?;
    let gguf = tmp.path().join("vocab.gguf");
    crate::tokenizer::hf_vocab::vocab_gguf_from_hf(path)?.write(&gguf)?;
    Vocab::open(&gguf).with_context(|| format!("the tokenizer of '{}'", path.display()))
}
