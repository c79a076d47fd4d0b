"""Golden file for CLIP tokenizers saved by transformers 5, which writes only `tokenizer.json` (no vocab.json /
merges.txt): builds transformers' CLIPTokenizer from openai's merges (../shared/data/tokenizers/
bpe_simple_vocab_16e6.txt.gz, vocab.json made as openai's simple_tokenizer.py makes it), saves it with
save_pretrained, and records everything of the saved tokenizer.json except its 3.6 MB vocabulary and merges (the
test rebuilds those from the same merges file and checks their sha256 against the ones recorded here), plus the
fast tokenizer's ids for a few prompts.

usage: python scripts/golden/clip_tokenizer_json.py ../shared/data/tokenizers/bpe_simple_vocab_16e6.txt.gz \
           tests/golden/tokenizers/clip_tokenizer_json.json
Needs transformers 5 (no torch); not run in CI."""
import gzip
import hashlib
import json
import os
import sys
import tempfile

from transformers import CLIPTokenizer

PROMPTS = [
    "a watercolor painting of a fox in the snow, 4k",
    "  Hello,   WORLD!!  it's 3:45pm — café <|endoftext|> naïve ",
    "a photo of an astronaut riding a horse on mars",
    "Ünïcödé täxt, emoji 🦊 and numbers 12345.678",
]


def main(merges_gz, out):
    lines = gzip.open(merges_gz, "rt", encoding="utf-8").read().split("\n")[1 : 49152 - 256 - 2 + 1]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    vocab = [chr(c) for c in cs]
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in lines]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        json.dump({v: i for i, v in enumerate(vocab)}, open(os.path.join(d, "vocab.json"), "w"))
        open(os.path.join(d, "merges.txt"), "w").write("#version: 0.2\n" + "\n".join(lines) + "\n")
        tok = CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"))
        tok.save_pretrained(os.path.join(d, "saved"))
        saved = sorted(os.listdir(os.path.join(d, "saved")))
        data = json.load(open(os.path.join(d, "saved", "tokenizer.json")))
        fast = CLIPTokenizer.from_pretrained(os.path.join(d, "saved"))
    model = data["model"]
    merges = ["{} {}".format(*m) if isinstance(m, list) else m for m in model["merges"]]
    golden = {
        "saved_files": saved,
        "merges_form": "pairs" if isinstance(model["merges"][0], list) else "strings",
        "merges_sha256": hashlib.sha256("\n".join(merges).encode()).hexdigest(),
        "vocab_sha256": hashlib.sha256(
            "\n".join(f"{t}\t{i}" for t, i in sorted(model["vocab"].items(), key=lambda kv: kv[1])).encode()
        ).hexdigest(),
        "skeleton": {**data, "model": {**model, "vocab": {}, "merges": []}},
        "prompts": PROMPTS,
        "ids": [fast(p)["input_ids"] for p in PROMPTS],
    }
    json.dump(golden, open(out, "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
