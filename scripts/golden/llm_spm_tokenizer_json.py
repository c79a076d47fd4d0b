"""Golden ids of Hugging Face `tokenizers` for SentencePiece-style BPE `tokenizer.json` files (Llama 2, TinyLlama,
Mistral 7B, Gemma), for tests/llm_tokenizer_json_spm.rs.

usage: python scripts/golden/llm_spm_tokenizer_json.py [SHARED_DATA]   (default ../shared/data beside the checkout)
Needs `transformers` and `tokenizers` (the reference venv).

llama.cpp's Llama vocabulary (SHARED_DATA/tokenizers/ggml-vocab-llama-spm.gguf) is turned into a tokenizer.json by
transformers' GGUF conversion (merges rebuilt from the SentencePiece scores), then cut to the tokens that are
substrings of the test texts and llama.cpp's own test texts (`.inp`), plus the control and all 256 `<0xNN>` byte
tokens, keeping the original ids (BPE only ever builds substrings of its text, so the cut vocabulary tokenizes these
texts as the full one; the script checks that the cut file gives llama.cpp's `.out` ids). The base file is the old
Llama 2 form (normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer); `variants.json` holds the other
forms as replacements of top-level keys (Metaspace first/always/never pre-tokenizers, Gemma's Replace-only
normalizer with two added chat tokens and the `"\\t"` alias of `<0x09>` that transformers writes for Gemma, with
and without transformers 5's no-op `Split(" ")` pre-tokenizer), each
with its tokenizer_config.json. `cases.json` holds, for each variant, text and add_special_tokens, the ids of
`Tokenizer.encode`."""
import json
import os
import sys

from tokenizers import Tokenizer
from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "../../tests/golden/llm/spm_tokenizer_json")
SP = "\u2581"
SEP = "\n__ggml_vocab_test__\n"

TEXTS = [
    "Hello world",
    " Hello",
    "  two leading spaces",
    "multiple   spaces  inside",
    "trailing  ",
    " ",
    "   ",
    "line one\nline two\n\nend",
    "\n",
    "\ttab\tseparated\t",
    "emoji 😀🦙 and CJK 我想在apple工作",
    "accented: café naïve Führer Ελληνικά",
    "digits 1234567890 and 3.14159",
    "<s>special</s> in text",
    "hello<s>world",
    "x<s> y",
    "</s>",
    "<unk>",
    "<start_of_turn>user\nhi there<end_of_turn>\n<start_of_turn>model\n",
    "",
]

PREPEND = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": SP},
    {"type": "Replace", "pattern": {"String": " "}, "content": SP}]}
DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": SP}, "content": " "},
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
BOS_TEMPLATE = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}
CONFIG = {"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
          "unk_token": "<unk>", "pad_token": None, "legacy": True,
          "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}


def metaspace(scheme):
    return {"type": "Metaspace", "replacement": SP, "prepend_scheme": scheme, "split": False}


def added(i, content):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


VARIANTS = {
    "prepend": {},
    "metaspace_first": {"tokenizer": {"normalizer": None, "pre_tokenizer": metaspace("first")},
                        "config": dict(CONFIG, legacy=False)},
    "metaspace_always": {"tokenizer": {"normalizer": None, "pre_tokenizer": metaspace("always")}},
    "metaspace_never": {"tokenizer": {"normalizer": None, "pre_tokenizer": metaspace("never")}},
    "gemma": {
        "tokenizer": {
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": SP},
            "pre_tokenizer": None,
            "decoder": {"type": "Sequence", "decoders": DECODER["decoders"][:3]},
            "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"),
                             added(32000, "<start_of_turn>"), added(32001, "<end_of_turn>")],
        },
        "vocab": {"\t": 12, "<start_of_turn>": 32000, "<end_of_turn>": 32001},
        "config": dict(CONFIG, eos_token="<end_of_turn>", pad_token="</s>",
                       chat_template="{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
                                     "{{ m['content'] }}<end_of_turn>\n{% endfor %}"),
    },
}
# transformers 5 writes Gemma's tokenizer with a no-op Split on " " (the normalizer has already replaced spaces).
VARIANTS["gemma_split"] = dict(VARIANTS["gemma"], tokenizer=dict(
    VARIANTS["gemma"]["tokenizer"],
    pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}))


def build(base, variant):
    t = dict(base)
    t.update(variant.get("tokenizer", {}))
    t["model"] = dict(base["model"], vocab=dict(base["model"]["vocab"], **variant.get("vocab", {})))
    return t


def normalized_pieces(text):
    """What the Llama forms may hand to BPE: each special-free segment with spaces as ▁ and a leading ▁."""
    out = ["▁" + text.replace(" ", SP)]
    seg = text
    for s in ["<s>", "</s>", "<unk>", "<start_of_turn>", "<end_of_turn>"]:
        seg = seg.replace(s, "\0")
    out += [SP + p.replace(" ", SP) for p in seg.split("\0")]
    return out


def main(shared):
    gguf_path = os.path.join(shared, "tokenizers/ggml-vocab-llama-spm.gguf")
    arch, tok_dict, _ = get_gguf_tokenizer(gguf_path)
    fast, _ = convert_gguf_tokenizer(arch, tok_dict)
    full = json.loads(fast.to_str())
    inp = open(gguf_path + ".inp", encoding="utf-8").read().split(SEP)
    if inp and inp[-1] == "":
        inp.pop()
    out_ids = [[int(x) for x in line.split()] for line in open(gguf_path + ".out").read().split("\n")]

    vocab = full["model"]["vocab"]
    keep = {tok: i for tok, i in vocab.items() if i < 259}  # <unk> <s> </s> and the 256 byte tokens
    for text in TEXTS + inp:
        for s in normalized_pieces(text):
            for i in range(len(s)):
                for j in range(i + 1, min(len(s), i + 48) + 1):
                    if s[i:j] in vocab:
                        keep[s[i:j]] = vocab[s[i:j]]
    merges = [m for m in full["model"]["merges"] if m[0] in keep and m[1] in keep and m[0] + m[1] in keep]
    base = dict(full)
    base["model"] = dict(full["model"], unk_token="<unk>", vocab=dict(sorted(keep.items(), key=lambda kv: kv[1])),
                         merges=merges)
    base.update(normalizer=PREPEND, pre_tokenizer=None, decoder=DECODER, post_processor=BOS_TEMPLATE)

    # The cut vocabulary in the old form must give llama.cpp's ids for llama.cpp's texts.
    tok = Tokenizer.from_str(json.dumps(base, ensure_ascii=False))
    for text, want in zip(inp, out_ids):
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == want, (text, want, got)

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(base, f, ensure_ascii=False, separators=(",", ":"))
    variants, cases = {}, []
    for name, v in VARIANTS.items():
        variants[name] = {"tokenizer": v.get("tokenizer", {}), "vocab": v.get("vocab", {}),
                          "config": v.get("config", CONFIG)}
        tok = Tokenizer.from_str(json.dumps(build(base, v), ensure_ascii=False))
        for text in TEXTS:
            for add in (False, True):
                cases.append({"variant": name, "text": text, "add_special": add,
                              "ids": tok.encode(text, add_special_tokens=add).ids})
    with open(os.path.join(OUT, "variants.json"), "w", encoding="utf-8") as f:
        json.dump(variants, f, ensure_ascii=False, indent=1)
    with open(os.path.join(OUT, "cases.json"), "w", encoding="utf-8") as f:
        json.dump(cases, f, ensure_ascii=False, indent=0)
    print(f"{len(keep)} tokens, {len(merges)} merges, {len(cases)} cases, {len(inp)} llama.cpp vectors match")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "../../../shared/data"))
