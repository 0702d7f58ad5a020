"""Chat templates: the model's own Jinja template rendered the way Hugging Face renders it.

Templates are untrusted text from a model file, so they run in Jinja's immutable sandbox. They may call
`raise_exception(msg)` (for example on a bad role order) and `strftime_now(fmt)` (Llama 3 dates its system
prompt), and use `tojson` without escaping non-ASCII. A template's own error becomes InvalidRequest.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from cumulo.errors import InvalidRequest

# Gemma 3 files without a template (the 270M base GGUF) still chat in Gemma's turn format.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{% if role == 'system' %}{% set role = 'user' %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

DEFAULT_TEMPLATES = {"gemma3": GEMMA_TEMPLATE}


class TemplateError(InvalidRequest):
    """Raised by a template's `raise_exception`; an InvalidRequest so the caller sees the template's words."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@lru_cache(maxsize=16)
def _compile(template: str):  # -> jinja2.Template
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as exc:
        raise InvalidRequest(f"the model's chat template does not parse: {exc}") from exc


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render `messages` ([{"role": ..., "content": ...}]) with `template`; extra names reach the template."""
    if not template:
        raise InvalidRequest("this model has no chat template; send a plain completion prompt instead")
    from jinja2 import TemplateError as JinjaError

    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
    except InvalidRequest:
        raise
    except (JinjaError, TypeError, KeyError, ValueError, AttributeError) as exc:
        # Messages the template cannot take (content parts where it expects text, an unknown role ...).
        raise InvalidRequest(f"the model's chat template failed: {exc}") from exc
