"""Golden WordPiece (BERT) tokenization from Hugging Face `tokenizers` for our WPM tokenizer.

usage: python scripts/golden/llm_wpm.py tests/golden/llm/wpm
Needs `tokenizers` and `gguf` (the reference venv). A small BERT-style vocabulary is tokenized by tokenizers'
WordPiece with BertNormalizer (lowercase, accents stripped, Chinese characters split) and BertPreTokenizer; the same
vocabulary is written as a vocab-only GGUF the way llama.cpp's convert_hf_to_gguf.py writes BERT vocabularies
(`##x` -> `x`, other pieces get the `▁` word prefix, `[..]` pieces are control tokens)."""
import json
import os
import string
import sys

import gguf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["hello", "world", "play", "##ing", "##ed", "un", "##believ", "##able", "the", "cafe", "我", "想",
         "##llo", "he", "wor", "##ld"]
TEXTS = ["Hello, World!", "unbelievable playing", "Café played 我想", "xyzzy", "a\tb  c", "", "price: 5€!",
         "HELLO   hello\nworld", "the-the", "Ünïcödé"]


def main(out):
    os.makedirs(out, exist_ok=True)
    vocab = list(SPECIAL)
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        vocab.append(c)
        if c.isalnum():
            vocab.append("##" + c)
    vocab += WORDS
    ids = {t: i for i, t in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in TEXTS]
    w = gguf.GGUFWriter(os.path.join(out, "wpm.gguf"), arch="bert")

    def phantom(t):
        if t.startswith("[") and t.endswith("]"):
            return t
        return t[2:] if t.startswith("##") else "\u2581" + t
    w.add_tokenizer_model("bert")
    w.add_token_list([phantom(t) for t in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL else gguf.TokenType.NORMAL for t in vocab])
    w.add_unk_token_id(ids["[UNK]"])
    w.add_cls_token_id(ids["[CLS]"]) if hasattr(w, "add_cls_token_id") else w.add_bos_token_id(ids["[CLS]"])
    w.add_sep_token_id(ids["[SEP]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_bool("tokenizer.ggml.normalizer.lowercase", True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    json.dump(cases, open(os.path.join(out, "cases.json"), "w"), ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
