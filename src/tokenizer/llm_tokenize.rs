//! Text to token ids and back with a GGUF vocabulary ([`Vocab`]): special tokens cut out first (llama.cpp's
//! `tokenizer_st_partition`), then each text fragment through the vocabulary's algorithm (SPM, BPE, WPM).
use super::llm_vocab::{SpacePrefix, Vocab, VocabKind, attr};

impl Vocab {
    /// Token ids for `text`; `add_special` adds BOS/EOS/SEP as the vocabulary asks, `parse_special` lets control
    /// tokens written in the text (e.g. `<|im_start|>`) become those tokens.
    pub fn tokenize(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<u32> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::new();
        match self.kind {
            VocabKind::Spm => {
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                let mut prev_special = true;
                for (i, f) in fragments.into_iter().enumerate() {
                    match f {
                        Fragment::Text(t) => {
                            let starts_with_space = t.starts_with([' ', '\u{2581}']);
                            let prefix = self.add_space_prefix
                                && match self.space_prefix {
                                    SpacePrefix::AfterSpecial => prev_special,
                                    SpacePrefix::First => i == 0 && !starts_with_space,
                                    SpacePrefix::Always => !starts_with_space,
                                };
                            let mut s = String::new();
                            if prefix {
                                s.push(' ');
                            }
                            s.push_str(t);
                            crate::tokenizer::llm_spm::tokenize(
                                self,
                                &s.replace(' ', "\u{2581}"),
                                &mut out,
                            );
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
            VocabKind::Bpe => {
                if add_special && self.add_bos {
                    out.extend(self.bos);
                }
                for f in fragments {
                    match f {
                        Fragment::Text(t) => crate::tokenizer::llm_bpe::tokenize(self, t, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
                if add_special && self.add_eos {
                    out.extend(self.eos);
                }
            }
            VocabKind::Wpm => {
                if add_special {
                    out.extend(self.bos);
                }
                for f in fragments {
                    match f {
                        Fragment::Text(t) => crate::tokenizer::llm_wpm::tokenize(self, t, &mut out),
                        Fragment::Token(id) => out.push(id),
                    }
                }
                if add_special {
                    out.extend(self.sep);
                }
            }
        }
        out
    }

    /// Cuts special tokens out of the text, longest first (llama.cpp `tokenizer_st_partition`).
    fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        let mut frags = if text.is_empty() {
            vec![]
        } else {
            vec![Fragment::Text(text)]
        };
        for &id in &self.special_cache {
            let a = self.attrs[id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let tok = self.tokens[id as usize].as_str();
            let mut next = Vec::with_capacity(frags.len());
            for f in frags {
                let Fragment::Text(mut rest) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(i) = rest.find(tok) {
                    if i > 0 {
                        next.push(Fragment::Text(&rest[..i]));
                    }
                    next.push(Fragment::Token(id));
                    rest = &rest[i + tok.len()..];
                }
                if !rest.is_empty() {
                    next.push(Fragment::Text(rest));
                }
            }
            frags = next;
        }
        frags
    }

    /// The bytes a token stands for; control/unknown tokens give nothing unless `special`.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Vec<u8> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        let a = self.attrs[id as usize];
        if a & (attr::CONTROL | attr::UNKNOWN) != 0 {
            return if special {
                text.as_bytes().to_vec()
            } else {
                Vec::new()
            };
        }
        if a & attr::USER_DEFINED != 0 {
            return text.as_bytes().to_vec();
        }
        if a & attr::BYTE != 0
            && text.len() == 6
            && let Ok(b) = u8::from_str_radix(&text[3..5], 16)
        {
            return vec![b];
        }
        if a & attr::NORMAL == 0 {
            return Vec::new();
        }
        match self.kind {
            VocabKind::Spm | VocabKind::Wpm => text.replace('\u{2581}', " ").into_bytes(),
            VocabKind::Bpe => crate::tokenizer::llm_bpe::decode_text(text),
        }
    }

    /// Bytes of `ids` joined; the SPM dummy-prefix space of the first piece is removed.
    pub fn detokenize(&self, ids: &[u32], special: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut remove_space = self.add_space_prefix;
        for &id in ids {
            let p = self.token_to_piece(id, special);
            let p = if remove_space && p.first() == Some(&b' ') {
                &p[1..]
            } else {
                &p[..]
            };
            remove_space = false;
            out.extend_from_slice(p);
        }
        out
    }
}

enum Fragment<'a> {
    Text(&'a str),
    Token(u32),
}

impl super::text::TextTokenizer for Vocab {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenize(text, false, false)
    }
    fn piece_bytes(&self, prev: Option<u32>, id: u32) -> Vec<u8> {
        let p = self.token_to_piece(id, false);
        // The first piece after BOS carries the SPM dummy prefix, which is not part of the text.
        if self.add_space_prefix && prev.is_some() && prev == self.bos && p.first() == Some(&b' ') {
            return p[1..].to_vec();
        }
        p
    }
    fn bos(&self) -> Option<u32> {
        if self.add_bos { self.bos } else { None }
    }
    fn eos(&self) -> Option<u32> {
        self.eos
    }
    fn is_end(&self, id: u32) -> bool {
        self.is_eog(id)
    }
    fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
    fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }
    fn encode_chat(&self, text: &str) -> Vec<u32> {
        let mut t = self.tokenize(text, true, true);
        // Templates that write BOS themselves would otherwise start with two.
        if self.add_bos && t.len() >= 2 && t[0] == t[1] && Some(t[0]) == self.bos {
            t.remove(0);
        }
        t
    }
}
