"""Chat templates are untrusted input: rendered in a sandbox, failing with a clear error."""

from __future__ import annotations

import time

import pytest

from edgesmith.device_server import templates
from edgesmith.device_server.templates import (
    ChatTemplate,
    TemplateInputError,
    TemplateRenderError,
)
from edgesmith.errors import EdgesmithError, ModelError

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <b>"}]


def test_chatml_fallback_renders_messages_and_generation_prompt() -> None:
    t = templates.from_metadata({}, {})
    assert t.render(MSGS) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                              "<|im_start|>user\nHi <b><|im_end|>\n<|im_start|>assistant\n")
    assert not t.render(MSGS, add_generation_prompt=False).endswith("assistant\n")


def test_metadata_template_and_special_tokens() -> None:
    meta = {"tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}"
                                       "[{{ m.role }}]{{ m.content | tojson }}{% endfor %}"
                                       "{% if tools %}T{% endif %}{{ eos_token }}",
            "tokenizer.ggml.bos_token_id": "1", "tokenizer.ggml.eos_token_id": "2"}
    t = templates.from_metadata(meta, {1: "<s>", 2: "</s>"})
    # undefined optional variables (tools) are falsy, as in transformers; JSON is not escaped
    assert t.render(MSGS) == '<s>[system]"Be brief."[user]"Hi <b>"</s>'


@pytest.mark.parametrize("source", [
    # the classic server-side template injections: reach a Python object, then os
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('id') }}",
    "{{ messages.__class__ }}",
    "{{ (messages|first).__class__.__base__ }}",
    "{{ lipsum.__globals__ }}",
    "{% for c in ''.__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ ''.mro() }}",
    "{{ request }}{{ config.items() }}",
    # mutation of the caller's objects (ImmutableSandboxedEnvironment)
    "{% set _ = messages.append({'role': 'x'}) %}{{ messages|length }}",
    "{% set _ = messages[0].update({'content': 'pwned'}) %}",
    "{% set _ = messages.pop() %}",
    # resource exhaustion
    "{{ 'x' * 100000000 }}",
    "{{ [0] * 10 * 10000000 }}",
    "{{ 9 ** 99999999 }}",
    "{% for i in range(100000000) %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'xxxxxxxxxx' }}{% endfor %}"
    "{% endfor %}",
])
def test_unsafe_templates_fail_safely(source: str) -> None:
    t = ChatTemplate(source)
    messages = [dict(m) for m in MSGS]
    t0 = time.perf_counter()
    with pytest.raises(TemplateRenderError) as info:
        t.render(messages)
    assert time.perf_counter() - t0 < 10
    assert messages == MSGS  # nothing was mutated
    # a one-line error naming the template as the problem, and what to fix
    assert isinstance(info.value, EdgesmithError)
    assert "chat template" in info.value.message and "\n" not in info.value.one_line()
    assert "tokenizer.chat_template" in info.value.hint


def test_sandbox_error_says_what_was_blocked() -> None:
    with pytest.raises(TemplateRenderError, match="SecurityError.*unsafe"):
        ChatTemplate("{{ ''.__class__ }}").render(MSGS)


def test_raise_exception_is_the_callers_fault() -> None:
    t = ChatTemplate("{% if messages[0]['role'] != 'user' %}"
                     "{{ raise_exception('Conversations must start with a user message') }}"
                     "{% endif %}ok")
    with pytest.raises(TemplateInputError, match="must start with a user"):
        t.render(MSGS)
    assert t.render(MSGS[1:]) == "ok"


def test_template_that_does_not_compile_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_safe_builtins_still_work() -> None:
    t = ChatTemplate("{% for m in messages %}{% if loop.first %}{{ m.content|upper }}"
                     "{% else %}{% break %}{% endif %}{% endfor %}|{{ range(3)|list|length }}"
                     "|{{ strftime_now('%Y')|length }}|{{ 2 ** 10 }}|{{ '-' * 3 }}")
    assert t.render(MSGS) == "BE BRIEF.|3|4|1024|---"


def test_the_server_passes_its_limits_through_from_metadata() -> None:
    from edgesmith.device_server.templates import TemplateLimitError, TemplateLimits

    meta = {"tokenizer.chat_template": "{% for i in range(100000) %}{% for j in range(100000) %}"
                                       "{% endfor %}{% endfor %}"}
    t = templates.from_metadata(meta, {}, TemplateLimits(deadline_s=0.2))
    assert t.limits.deadline_s == 0.2
    assert templates.from_metadata({}, {}).limits == TemplateLimits()  # 1 s by default
    t0 = time.perf_counter()
    with pytest.raises(TemplateLimitError, match=r"took over 0\.2 s to render"):
        t.render(MSGS)
    assert time.perf_counter() - t0 < 10
