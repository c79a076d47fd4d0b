//! WordPiece (BERT) as llama.cpp's `llm_tokenizer_wpm`: optional lowercasing and accent stripping (NFD, marks
//! dropped), whitespace splits words, punctuation, ASCII symbols and CJK ideographs become one-character words,
//! control characters vanish; each word, prefixed with `▁`, is covered greedily by the longest tokens, and a word
//! that cannot be covered becomes the unknown token.
use crate::tokenizer::llm_vocab::Vocab;
use fancy_regex::Regex;
use std::sync::OnceLock;
use unicode_normalization::UnicodeNormalization;

fn class(re: &'static OnceLock<Regex>, pat: &str, c: char) -> bool {
    let r = re.get_or_init(|| Regex::new(pat).expect("static character class"));
    let mut buf = [0u8; 4];
    r.is_match(c.encode_utf8(&mut buf)).unwrap_or(false)
}

fn is_punct(c: char) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    class(&R, r"^\p{P}$", c)
}
fn is_symbol(c: char) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    class(&R, r"^\p{S}$", c)
}
fn is_mark(c: char) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    class(&R, r"^\p{M}$", c)
}
fn is_control(c: char) -> bool {
    static R: OnceLock<Regex> = OnceLock::new();
    class(&R, r"^[\p{Cc}\p{Cf}]$", c)
}

fn is_chinese(c: u32) -> bool {
    (0x4E00..=0x9FFF).contains(&c)
        || (0x3400..=0x4DBF).contains(&c)
        || (0x20000..=0x2A6DF).contains(&c)
        || (0x2A700..=0x2B73F).contains(&c)
        || (0x2B740..=0x2B81F).contains(&c)
        || (0x2B920..=0x2CEAF).contains(&c)
        || (0xF900..=0xFAFF).contains(&c)
        || (0x2F800..=0x2FA1F).contains(&c)
}

fn words(text: &str, lowercase: bool, strip_accents: bool) -> Vec<String> {
    let chars: Vec<char> = if strip_accents {
        text.nfd().collect()
    } else {
        text.chars().collect()
    };
    let mut words = vec![String::new()];
    for c in chars {
        if c.is_whitespace() {
            if !words.last().is_some_and(String::is_empty) {
                words.push(String::new());
            }
            continue;
        }
        if c == '\0' || c == '\u{FFFD}' || is_control(c) || (strip_accents && is_mark(c)) {
            continue;
        }
        let s: String = if lowercase {
            c.to_lowercase().collect()
        } else {
            c.to_string()
        };
        if is_punct(c) || ((c as u32) < 0x7F && is_symbol(c)) || is_chinese(c as u32) {
            if !words.last().is_some_and(String::is_empty) {
                words.push(String::new());
            }
            *words.last_mut().expect("non-empty") = s;
            words.push(String::new());
        } else {
            words.last_mut().expect("non-empty").push_str(&s);
        }
    }
    words.retain(|w| !w.is_empty());
    words
}

/// Appends the tokens of one raw-text fragment.
pub fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    for word in words(text, vocab.lowercase, vocab.strip_accents) {
        let w = format!("\u{2581}{word}");
        let bounds: Vec<usize> = w
            .char_indices()
            .map(|(i, _)| i)
            .chain(std::iter::once(w.len()))
            .collect();
        let before = out.len();
        let mut i = 0;
        while i + 1 < bounds.len() {
            let found = (i + 1..bounds.len())
                .rev()
                .filter(|&j| bounds[j] - bounds[i] <= vocab.max_token_len)
                .find_map(|j| {
                    vocab
                        .text_to_token(&w[bounds[i]..bounds[j]])
                        .map(|id| (j, id))
                });
            match found {
                Some((j, id)) => {
                    out.push(id);
                    i = j;
                }
                None => {
                    out.truncate(before);
                    break;
                }
            }
        }
        if out.len() == before {
            out.extend(vocab.unk);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bert_pre_splitting() {
        assert_eq!(
            super::words("Héllo, World!  日本 a\u{0007}b", true, true),
            ["hello", ",", "world", "!", "日", "本", "ab"]
        );
        assert_eq!(super::words("A-b", false, false), ["A", "-", "b"]);
        assert_eq!(super::words("Héllo", false, true), ["Hello"]);
        assert_eq!(super::words("Héllo", true, false), ["héllo"]);
    }
}
