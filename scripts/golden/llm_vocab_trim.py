"""Small copies of llama.cpp's WordPiece (BERT) test vocabularies, for tests/llm_tokenizers.rs.

usage: python scripts/golden/llm_vocab_trim.py LLAMA_CPP/models   (llama.cpp's sources, e.g. from the
llama-cpp-python 0.3.36 sdist: `pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36`)

For each `ggml-vocab-*.gguf` whose tokenizer is `bert` (WPM) and that has `.inp`/`.out` test vectors, writes
tests/golden/llm/vocab/NAME.mini.gguf holding only the tokens the vectors' expected ids use (plus the special
tokens), with `trt_diff.test.original_ids` mapping the new ids back, and copies the `.inp`/`.out` files beside it.
WordPiece takes the longest vocabulary piece at each position, so a vocabulary cut down to the pieces llama.cpp chose
tokenizes these texts the same (a longer piece it did not choose is not in the full vocabulary either; words it
could not cover stay uncoverable). BPE and SPM vocabularies cannot be cut this way (their merges and scores need the
intermediate pieces); their tests read the full files from ../shared/data/tokenizers."""
import os
import shutil
import sys

import gguf

OUT = os.path.join(os.path.dirname(__file__), "../../tests/golden/llm/vocab")
SPECIAL_KEYS = ["tokenizer.ggml.unknown_token_id", "tokenizer.ggml.seperator_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.cls_token_id", "tokenizer.ggml.mask_token_id",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"]


def trim(src, name):
    r = gguf.GGUFReader(src)
    if r.fields["tokenizer.ggml.model"].contents() != "bert":
        return False
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    used = set()
    for line in open(src + ".out"):
        used.update(int(t) for t in line.split())
    specials = {k: int(r.fields[k].contents()) for k in SPECIAL_KEYS if k in r.fields}
    used.update(specials.values())
    keep = sorted(used)
    new = {old: i for i, old in enumerate(keep)}
    w = gguf.GGUFWriter(os.path.join(OUT, name + ".mini.gguf"), arch=r.fields["general.architecture"].contents())
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre(r.fields["tokenizer.ggml.pre"].contents())
    w.add_token_list([tokens[i] for i in keep])
    w.add_token_types([int(types[i]) for i in keep])
    for k, v in specials.items():
        w.add_uint32(k, new[v])
    for k in ["tokenizer.ggml.normalizer.lowercase", "tokenizer.ggml.normalizer.strip_accents"]:
        if k in r.fields:
            w.add_bool(k, bool(r.fields[k].contents()))
    w.add_array("trt_diff.test.original_ids", keep)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    for ext in [".inp", ".out"]:
        shutil.copyfile(src + ext, os.path.join(OUT, name + ext))
    return True


def main(models):
    os.makedirs(OUT, exist_ok=True)
    for f in sorted(os.listdir(models)):
        if f.endswith(".gguf") and os.path.exists(os.path.join(models, f + ".out")):
            if trim(os.path.join(models, f), f):
                print("trimmed", f, file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1])
