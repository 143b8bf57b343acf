#!/usr/bin/env python3
"""Writes tests/fixtures/chat/templates.json: chat templates rendered by Jinja2 the way Hugging Face
transformers renders them (sandboxed, trim_blocks, lstrip_blocks, raise_exception), for the Lua
spec tests/lua/chat_spec.lua, which checks that moonshard recognizes each template and renders
the same text in Lua.

Templates:
  smollm2   SmolLM2-135M-Instruct's, read from the GGUF (tokenizer.chat_template) when the model
            is in .cache/smollm2, else the copy below (identical)
  qwen2     Qwen2-Instruct's ChatML with its default system prompt
  llama3    Meta-Llama-3-Instruct's
  llama31   the tool-free core of Llama-3.1-Instruct's (system header with the knowledge cutoff
            and date_string, default "26 Jul 2024")
  llama2    Llama-2-chat's ([INST] with <<SYS>>)
  mistral   Mistral-Instruct's (v0.2 form: one BOS, no system block)
  zephyr    TinyLlama-1.1B-Chat's (Zephyr form)
The non-SmolLM2 strings are written here as those models publish them in tokenizer_config.json
(without tool-calling branches).

Usage: python3 tools/make_chat_fixtures.py   (needs pip install jinja2; gguf to read the model)
"""
import json
import os

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat", "templates.json")
SMOL = os.path.join(ROOT, ".cache", "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
           "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
           "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
           "{% endif %}")

QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
          "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
          "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
          "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
          "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}"
          "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
          "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
          "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

MISTRAL = ("{{ bos_token }}{% for message in messages %}"
           "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
           "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
           "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

ZEPHYR = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>
' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>
'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""

TEMPLATES = [  # name, format moonshard should recognize, template, bos, eos, supports a system message
    ("smollm2", "chatml", SMOLLM2, "<|im_start|>", "<|im_end|>", True),
    ("qwen2", "chatml", QWEN2, "<|endoftext|>", "<|im_end|>", True),
    ("llama3", "llama3", LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    ("llama31", "llama3", LLAMA31, "<|begin_of_text|>", "<|eot_id|>", True),
    ("llama2", "llama2", LLAMA2, "<s>", "</s>", True),
    ("mistral", "mistral", MISTRAL, "<s>", "</s>", False),
    ("zephyr", "zephyr", ZEPHYR, "<s>", "</s>", True),
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}],
    [{"role": "user", "content": "  Hello  "}, {"role": "assistant", "content": " Hi there! "},
     {"role": "user", "content": "Tell me a joke.\nA short one."}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Thanks"},
     {"role": "assistant", "content": "De rien."}, {"role": "user", "content": "Bye \U0001F44B"}],
]


def raise_exception(msg):
    raise TemplateError(msg)


def main():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    smol = SMOLLM2
    if os.path.exists(SMOL):
        import gguf
        smol = gguf.GGUFReader(SMOL).fields["tokenizer.chat_template"].contents()
        assert smol == SMOLLM2, "the GGUF's template differs from the copy here"
    out = []
    for name, fmt, tmpl, bos, eos, system in TEMPLATES:
        t = env.from_string(smol if name == "smollm2" else tmpl)
        renders = []
        for conv in CONVERSATIONS:
            if conv[0]["role"] == "system" and not system:
                continue
            for gen in (True, False):
                text = t.render(messages=conv, add_generation_prompt=gen, bos_token=bos, eos_token=eos)
                renders.append({"messages": conv, "add_generation_prompt": gen, "text": text})
        out.append({"name": name, "format": fmt, "bos": bos, "eos": eos, "template": tmpl, "renders": renders})
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"templates": out}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{OUT}: {len(out)} templates, {sum(len(t['renders']) for t in out)} renders")


if __name__ == "__main__":
    main()
