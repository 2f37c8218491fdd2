"""Chat templates: the named ones a config can pick, and the hash that follows a template from data-prep to
evaluation and export."""

from __future__ import annotations

import hashlib

from tuneforge.errors import TemplateError

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
NAMED = {"chatml": CHATML, "llama3": LLAMA3, "gemma": GEMMA}


def resolve(choice: str | None, tokenizer) -> str:
    """The Jinja template to render with: the config's choice, else the tokenizer's own."""
    if choice is None:
        if not tokenizer.chat_template:
            raise TemplateError(
                "the base model's tokenizer has no chat template; set data.chat_template to one of "
                f"{', '.join(NAMED)} or to a Jinja template"
            )
        return tokenizer.chat_template
    if choice in NAMED:
        return NAMED[choice]
    if "{%" in choice or "{{" in choice:
        return choice
    raise TemplateError(
        f"data.chat_template: {choice!r} is neither a named template ({', '.join(NAMED)}) nor a Jinja template"
    )


def template_hash(template: str) -> str:
    return hashlib.sha256(template.encode()).hexdigest()
