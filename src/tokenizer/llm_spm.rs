//! SentencePiece BPE as llama.cpp's `llm_tokenizer_spm`: start from code points, repeatedly merge the adjacent
//! pair whose joined text is the vocabulary token with the highest score (ties: leftmost), then emit each symbol
//! as its token or, when it is not one, resegment it along the merges that built it, down to `<0xNN>` bytes.
use crate::tokenizer::llm_vocab::Vocab;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

struct Sym {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

struct Session<'a> {
    vocab: &'a Vocab,
    text: &'a str,
    syms: Vec<Sym>,
    queue: BinaryHeap<Bigram>,
    rev_merge: HashMap<&'a str, (usize, usize)>,
}

impl<'a> Session<'a> {
    fn try_add(&mut self, left: Option<usize>, right: Option<usize>) {
        let (Some(l), Some(r)) = (left, right) else {
            return;
        };
        let start = self.syms[l].start;
        let size = self.syms[l].len + self.syms[r].len;
        let piece = &self.text[start..start + size];
        let Some(id) = self.vocab.text_to_token(piece) else {
            return;
        };
        self.queue.push(Bigram {
            left: l,
            right: r,
            score: self.vocab.scores[id as usize],
            size,
        });
        self.rev_merge.insert(piece, (l, r));
    }

    fn resegment(&self, i: usize, out: &mut Vec<u32>) {
        let s = &self.syms[i];
        let piece = &self.text[s.start..s.start + s.len];
        if let Some(id) = self.vocab.text_to_token(piece) {
            out.push(id);
            return;
        }
        match self.rev_merge.get(piece) {
            Some(&(l, r)) => {
                self.resegment(l, out);
                self.resegment(r, out);
            }
            None => {
                for b in piece.bytes() {
                    let hex = format!("<0x{b:02X}>");
                    let id = self
                        .vocab
                        .text_to_token(&hex)
                        .or_else(|| {
                            std::str::from_utf8(&[b])
                                .ok()
                                .and_then(|c| self.vocab.text_to_token(c))
                        })
                        .or(self.vocab.unk);
                    out.extend(id);
                }
            }
        }
    }
}

/// Appends the tokens of `text` (spaces already escaped as `▁`).
pub fn tokenize(vocab: &Vocab, text: &str, out: &mut Vec<u32>) {
    if text.is_empty() {
        return;
    }
    let mut syms: Vec<Sym> = Vec::new();
    for (i, (start, ch)) in text.char_indices().enumerate() {
        syms.push(Sym {
            start,
            len: ch.len_utf8(),
            prev: i.checked_sub(1),
            next: Some(i + 1),
        });
    }
    if let Some(last) = syms.last_mut() {
        last.next = None;
    }
    let mut s = Session {
        vocab,
        text,
        syms,
        queue: BinaryHeap::new(),
        rev_merge: HashMap::new(),
    };
    for i in 1..s.syms.len() {
        s.try_add(Some(i - 1), Some(i));
    }
    while let Some(b) = s.queue.pop() {
        let (l, r) = (b.left, b.right);
        if s.syms[l].len == 0 || s.syms[r].len == 0 || s.syms[l].len + s.syms[r].len != b.size {
            continue;
        }
        s.syms[l].len += s.syms[r].len;
        s.syms[r].len = 0;
        let rn = s.syms[r].next;
        s.syms[l].next = rn;
        if let Some(n) = rn {
            s.syms[n].prev = Some(l);
        }
        let lp = s.syms[l].prev;
        s.try_add(lp, Some(l));
        s.try_add(Some(l), rn);
    }
    let mut i = Some(0);
    while let Some(k) = i {
        s.resegment(k, out);
        i = s.syms[k].next;
    }
}
