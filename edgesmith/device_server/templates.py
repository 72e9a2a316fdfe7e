"""Chat templates from GGUF metadata, rendered in a Jinja2 sandbox.

A chat template ships inside the model file, so it is untrusted input: it is compiled in an
``ImmutableSandboxedEnvironment``, where reaching Python internals (``__class__``,
``__subclasses__``, ``mro``...) or mutating objects raises ``SecurityError`` instead of
running code. Rendering errors become ``TemplateRenderError``; the template's own
``raise_exception(...)`` (used to reject, say, non-alternating roles) is the caller's fault
and becomes ``TemplateInputError``.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from edgesmith.errors import EdgesmithError, ModelError

# Used when a GGUF has no tokenizer.chat_template: ChatML, the most common format.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_RENDERED_CHARS = 4_000_000


class TemplateInputError(EdgesmithError):
    """The messages were rejected by the template itself (raise_exception)."""


class TemplateRenderError(EdgesmithError):
    """The template failed: a sandbox violation or a bug in the template."""


def _raise_exception(message: str) -> None:
    raise TemplateInputError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    # as transformers does: plain JSON, not HTML-escaped (a prompt is not a web page)
    return json.dumps(value, ensure_ascii=False, indent=indent)


class _SandboxEnv(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing on any unsafe attribute, plus a size limit on ``*`` and
    ``**``: ``'x' * 10**9`` would fill the memory within one expression, before any output."""

    intercepted_binops = frozenset({"*", "**"})
    MAX_ITEMS = 1_000_000

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja's sandbox returns an Undefined that renders as "" when printed; fail instead,
        # so a template probing for Python internals is reported, not silently emptied
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} "
                            "object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64 \
                and not (isinstance(left, int) and abs(left) <= 1):
            raise SecurityError("the exponent is too large")
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) \
                        and len(seq) * n > self.MAX_ITEMS:
                    raise SecurityError("the repeated sequence is too long")
        return super().call_binop(context, operator, left, right)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        # Undefined (not StrictUndefined), as transformers renders them: real templates test
        # optional variables with `{% if tools %}`.
        env = _SandboxEnv(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                          extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as exc:
            raise ModelError(f"the model's chat template does not compile: {exc}",
                             "fix tokenizer.chat_template in the GGUF metadata") from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        parts: list[str] = []
        size = 0
        try:
            # generated piece by piece, so a template that loops without end is stopped at
            # MAX_RENDERED_CHARS instead of filling the memory first
            for part in self._template.generate(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token,
            ):
                size += len(part)
                if size > MAX_RENDERED_CHARS:
                    raise TemplateRenderError(
                        f"the model's chat template produced over {MAX_RENDERED_CHARS} "
                        "characters", "fix tokenizer.chat_template in the GGUF metadata")
                parts.append(part)
        except (TemplateInputError, TemplateRenderError):
            raise
        except (jinja2.TemplateError, TypeError, ValueError, AttributeError, KeyError,
                IndexError, OverflowError, RecursionError) as exc:
            # SecurityError is a TemplateError: the sandbox stopped an unsafe access.
            raise TemplateRenderError(
                f"the model's chat template failed: {type(exc).__name__}: {exc}",
                "fix tokenizer.chat_template in the GGUF metadata",
            ) from exc
        return "".join(parts)


def from_metadata(metadata: dict[str, str], token_text: dict[int, str]) -> ChatTemplate:
    """The GGUF's ``tokenizer.chat_template`` (ChatML when it has none).

    ``token_text`` maps the BOS/EOS ids to their text, for templates using bos_token.
    """
    source = metadata.get("tokenizer.chat_template") or CHATML

    def special(key: str) -> str:
        raw = metadata.get(key)
        return token_text.get(int(raw), "") if raw is not None and raw.isdigit() else ""

    return ChatTemplate(source, special("tokenizer.ggml.bos_token_id"),
                        special("tokenizer.ggml.eos_token_id"))
