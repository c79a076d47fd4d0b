"""Golden renderings of chat templates, made with jinja2 configured as transformers' apply_chat_template configures
it (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, raise_exception, tojson).

usage: python scripts/golden/llm_chat_templates.py tests/golden/llm/chat_templates.json \
           ../shared/data/tokenizers/ggml-vocab-qwen2.gguf
Needs jinja2 (the reference venv). The templates are written here in the style of the common families (ChatML as
Qwen2 ships it, Llama 2 [INST] with <<SYS>>, Llama 3 headers); the test renders them with our minijinja set-up."""
import json
import os
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

QWEN2 = (
    "{%- if messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Gemma 2/3 style: no system role (a system message opens the first user turn), "model" for the assistant, turns
# trimmed, strict alternation, and Gemma 3's test of whether content is a string or a list of typed parts (the
# server flattens text parts to a string before rendering, as llama.cpp's does).
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] | trim }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TOJSON = "{% for m in messages %}{{ m | tojson }}{% if not loop.last %},{% endif %}{% endfor %}"

CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "  Hi there!  "},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Ünïcödé \"quotes\" ok?"}],
]


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def render(template, messages, gen):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, bos_token="<s>", eos_token="</s>",
                                            add_generation_prompt=gen)


def main(out, vocab=None):
    cases = []
    templates = [("qwen2", QWEN2), ("llama2", LLAMA2), ("llama3", LLAMA3), ("gemma", GEMMA), ("tojson", TOJSON)]
    if vocab:
        # The real template stored in llama.cpp's qwen2 vocab file (read back from the file by the test).
        import gguf
        r = gguf.GGUFReader(vocab)
        templates.append(("gguf:" + os.path.basename(vocab), r.fields["tokenizer.chat_template"].contents()))
    for name, t in templates:
        for conv in CONVERSATIONS:
            for gen in (True, False):
                cases.append({"name": name, "template": t, "messages": conv, "add_generation_prompt": gen,
                              "expected": render(t, conv, gen)})
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    try:
        render(LLAMA2, bad, True)
        raise SystemExit("expected an exception")
    except jinja2.exceptions.TemplateError as e:
        error = {"template": LLAMA2, "messages": bad, "message": str(e)}
    json.dump({"cases": cases, "error": error}, open(out, "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main(*sys.argv[1:3])
