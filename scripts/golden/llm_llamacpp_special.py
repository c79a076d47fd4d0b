"""Golden token ids from llama.cpp itself (llama-cpp-python, vocab-only) with add_special and parse_special on and off:
special-token partitioning, BOS handling and the SPM space prefix after special tokens, beyond test-tokenizer-0
(which runs with both off).

usage: python scripts/golden/llm_llamacpp_special.py ../shared/data/tokenizers tests/golden/llm/llamacpp_special.json
Needs llama-cpp-python (a venv outside the repository)."""
import json
import os
import sys

from llama_cpp import Llama

TEXTS = {
    "ggml-vocab-qwen2.gguf": [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite a haiku<|im_end|>\n"
        "<|im_start|>assistant\n",
        "a<|endoftext|>b <|im_end|> c<|im_start|>",
        "Hello world",
    ],
    "ggml-vocab-llama-spm.gguf": [
        "<s>[INST] Write a haiku [/INST]",
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] again [/INST]",
        "text</s>more <unk> end",
        "Hello world",
    ],
    "ggml-vocab-gpt-2.gguf": ["a<|endoftext|>b", "Hello world"],
}


def main(data, out):
    cases = []
    for name, texts in TEXTS.items():
        llm = Llama(model_path=os.path.join(data, name), vocab_only=True, verbose=False)
        for text in texts:
            for add_special in (False, True):
                for parse_special in (False, True):
                    ids = llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special)
                    cases.append({"vocab": name, "text": text, "add_special": add_special,
                                  "parse_special": parse_special, "ids": ids})
    json.dump(cases, open(out, "w"), ensure_ascii=False, indent=0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
