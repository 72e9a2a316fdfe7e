"""Chat template rendering is bounded in time and memory, and any failure is the template's
clear error (issue 10: items 5, 6, 7).

The hostile templates run in a child process with a 1 GiB address-space limit and a timeout,
so the old, unbounded code fails these tests instead of hanging the suite or filling the
machine's memory. The same limits must not change what real chat templates render: those are
compared with Jinja's plain sandbox.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgesmith.device_server.templates import (
    ChatTemplate,
    TemplateInputError,
    TemplateRenderError,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))

HI = [{"role": "user", "content": "Hi"}]
SECONDS = 10  # a bounded render stops at its 1 s deadline; this is the generous test bound
PEAK_MIB = 100  # the most one hostile render may grow the process (its peak RSS)

# --- the hostile templates: each loops or allocates without end on an unbounded sandbox ------

HANGS = {  # item 5: no output, so the output-size check never fires
    "nested range loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                          "{% endfor %}ok",
    "nested loops over strings": "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}"
                                 "{% endfor %}{% endfor %}",
    "nested loops over lists": "{% set l = range(100000)|list %}{% for a in l %}"
                               "{% for b in l %}{% endfor %}{% endfor %}",
    "nested loops over dict items": "{% set d = {}.fromkeys(range(100000)) %}"
                                    "{% for a in d.items() %}{% for b in d.items() %}"
                                    "{% endfor %}{% endfor %}",
    "exponential macro recursion": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}"
                                   "{% endif %}{% endmacro %}{{ f(60) }}",
    "exponential recursive loop": "{% for x in range(2) recursive %}{% if loop.depth < 60 %}"
                                  "{{ loop(range(2)) }}{% endif %}{% endfor %}",
    "lipsum": "{{ lipsum(n=1000000) }}",
}
BOMBS = {  # item 6: every intermediate value, not only the output
    "string doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(33) %}"
                              "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
    "list doubling with +": "{% set ns = namespace(l=[0]) %}{% for i in range(33) %}"
                            "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
    "* of a list of big strings": "{{ ['x' * 1000000] * 1000 }}",
    "replace": "{{ ('x' * 1000000)|replace('x', 'y' * 10000) }}",
    "join": "{{ range(100000)|join('x' * 100000) }}",
    "center filter": "{{ 'x'|center(2000000000) }}",
    "str.center": "{{ 'x'.center(2000000000) }}",
    "format filter": "{{ '%2000000000s'|format('x') }}",
    "% operator": "{{ '%2000000000d' % 1 }}",
    "str.format": "{{ '{:>2000000000}'.format('x') }}",
    "% with a nested key": "{{ '%((a))2000000000s' % {'(a)': 'x'} }}",
    "Markup.replace": "{{ (('x' * 1000000)|safe).replace('x', 'y' * 10000) }}",
    "indent": "{{ ('x\\n' * 500000)|indent(5000) }}",
    "tojson indent": "{{ [[[[1]]]]|tojson(indent=2000000000) }}",
    "set block output": "{% set ns = namespace(s='x') %}{% for i in range(20) %}"
                        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{% set y %}"
                        "{% for i in range(100000) %}{{ ns.s }}{% endfor %}{% endset %}"
                        "{{ y|length }}",
    "nested list doubling, printed": "{% set ns = namespace(l=['x']) %}{% for i in range(40) %}"
                                     "{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
    "** in a loop": "{% set ns = namespace(x=2 ** 64) %}{% for i in range(8) %}"
                    "{% set ns.x = ns.x ** 64 %}{% endfor %}{{ ns.x > 0 }}",
    "sum of lists": "{{ ([[0]] * 100000)|sum(start=[])|length }}",  # copies n * n / 2
}

_CHILD = r"""
import json, resource, sys, time
limit = 1 << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
from edgesmith.device_server.templates import ChatTemplate, TemplateRenderError

def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

def reset_peak():  # VmHWM := VmRSS (Linux 4.0+); else the peak is the whole run's
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

start = kib("VmRSS")
for key, source in json.loads(sys.stdin.read()):
    reset_peak()
    base = min(kib("VmRSS"), max(start, kib("VmHWM")))
    t0 = time.monotonic()
    try:
        ChatTemplate(source).render([{"role": "user", "content": "Hi"}])
        kind, message = "rendered", ""
    except TemplateRenderError as exc:
        kind, message = "TemplateRenderError", exc.message
    except BaseException as exc:
        kind, message = type(exc).__name__, str(exc)[:300]
    seconds = time.monotonic() - t0
    print(json.dumps({"key": key, "kind": kind, "message": message, "seconds": seconds,
                      "peak_mib": (kib("VmHWM") - base) / 1024}), flush=True)
"""


def render_in_child(cases: dict[str, str], timeout: float) -> dict[str, dict[str, Any]]:
    """Render each template in one child process; a case missing from the answer did not
    finish before the child was killed."""
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONHASHSEED": "0"})
    try:
        out, _ = proc.communicate(json.dumps(list(cases.items())), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    results = {}
    for line in out.splitlines():
        row = json.loads(line)
        results[row["key"]] = row
    return results


@pytest.fixture(scope="module")
def hostile_results() -> dict[str, dict[str, Any]]:
    cases = {**BOMBS, **HANGS}  # the hangs last: on unbounded code they stop the child
    return render_in_child(cases, timeout=120)  # the bounded code needs about 10 s


@pytest.mark.parametrize("key", [*BOMBS, *HANGS])
def test_hostile_template_fails_fast_with_bounded_memory(
        hostile_results: dict[str, dict[str, Any]], key: str) -> None:
    row = hostile_results.get(key)
    assert row is not None, "the render did not finish: the child was killed at its timeout"
    assert row["kind"] == "TemplateRenderError", row  # not MemoryError, not a 46 s render
    assert "chat template" in row["message"] and "\n" not in row["message"], row
    # a loop stops at its deadline; a memory bomb at a size limit, long before
    assert ("took over 1 s" in row["message"]) == (key in HANGS and key != "lipsum"), row
    assert row["seconds"] < SECONDS, row
    assert row["peak_mib"] < PEAK_MIB, row


def test_loops_stop_at_the_deadline_with_a_clear_message() -> None:
    from edgesmith.device_server.templates import TemplateLimitError, TemplateLimits

    source = HANGS["nested range loops"]
    t = ChatTemplate(source, limits=TemplateLimits(deadline_s=0.3))
    for deadline, limits_s in ((None, "0.3"), (0.1, "0.1")):
        t0 = time.monotonic()
        with pytest.raises(TemplateLimitError, match=f"chat template took over {limits_s} s"):
            t.render(HI, deadline_s=deadline)
        assert time.monotonic() - t0 < SECONDS
    with pytest.raises(ValueError, match="deadline"):
        TemplateLimits(deadline_s=0)


def test_a_render_out_of_time_does_not_touch_another_threads_render() -> None:
    # each render has its own budget: one template looping out its deadline in a server
    # thread does not stop, slow or charge the others
    from edgesmith.device_server.templates import TemplateLimits

    hang = ChatTemplate(HANGS["nested range loops"], limits=TemplateLimits(deadline_s=1.0))
    errors: list[BaseException] = []

    def spin() -> None:
        try:
            hang.render(HI)
        except TemplateRenderError as exc:
            errors.append(exc)

    thread = threading.Thread(target=spin)
    thread.start()
    ok = ChatTemplate(SMOLLM2)
    while thread.is_alive():
        assert ok.render(HI).endswith("<|im_start|>assistant\n")
        time.sleep(0.01)
    thread.join()
    assert len(errors) == 1 and "took over 1 s" in errors[0].message


# --- item 7: any exception in a template is the template's error ----------------------------

@pytest.mark.parametrize(("source", "exc_name"), [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ 1 // 0 }}", "ZeroDivisionError"),
    ("{{ 1 % 0 }}", "ZeroDivisionError"),
    ("{{ 1.5 / 0 }}", "ZeroDivisionError"),
    ("{{ 'x'.encode('no-such-codec') }}", "LookupError"),
    ("{{ 0 ** -1 }}", "ZeroDivisionError"),
    ("{{ range(5)|slice(0)|list }}", "ZeroDivisionError"),  # inside a filter
])
def test_any_exception_in_a_template_is_a_template_render_error(source: str,
                                                                exc_name: str) -> None:
    with pytest.raises(TemplateRenderError) as info:
        ChatTemplate(source).render(HI)
    message = info.value.message
    assert message.startswith("the model's chat template failed: ") and exc_name in message
    assert "tokenizer.chat_template" in info.value.hint


_MEMORY_CHILD = r"""
import json, resource, sys
from edgesmith.device_server.templates import ChatTemplate, TemplateRenderError
# 25 strings of 2 MB kept alive: within the render's limits, over this process's memory
t = ChatTemplate("{% set ns = namespace(s='x', l=[]) %}{% for i in range(21) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{% for i in range(25) %}"
                 "{% set ns.l = ns.l + [namespace(s=ns.s ~ i)] %}{% endfor %}{{ ns.l|length }}")
with open("/proc/self/status") as f:
    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
resource.setrlimit(resource.RLIMIT_AS, (size + (24 << 20), hard))
try:
    t.render([])
    out = {"kind": "rendered"}
except TemplateRenderError as exc:
    out = {"kind": "TemplateRenderError", "message": exc.message}
except BaseException as exc:
    out = {"kind": type(exc).__name__}
resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
print(json.dumps(out))
"""


def test_a_memory_error_is_a_template_render_error() -> None:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["kind"] == "TemplateRenderError", out
    assert out["message"] == "the model's chat template failed: MemoryError", out


# --- the server answers them as the template's error, in time -------------------------------

SERVED = ("{% if messages[0].content == 'loop' %}{% for i in range(100000) %}"
          "{% for j in range(100000) %}{% endfor %}{% endfor %}"
          "{% elif messages[0].content == 'divide' %}{{ 1 / 0 }}{% endif %}"
          "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
          "<|assistant|>")


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("llama_cpp")
    import tiny_gguf

    from edgesmith.device_server.app import ServerConfig, create_app

    path = tiny_gguf.build(tmp_path_factory.mktemp("template-gguf") / "t.gguf",
                           template=SERVED)
    flask_app = create_app(ServerConfig(model=path, threads=1, n_ctx=256))
    yield flask_app
    flask_app.extensions["edgesmith_engine"].close()


def chat(app: Any, content: str) -> tuple[int, dict[str, Any]] | None:
    """The answer, or None when none came within the test's bound (the thread is left)."""
    answer: list[tuple[int, dict[str, Any]]] = []

    def ask() -> None:
        resp = app.test_client().post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": content}], "max_tokens": 2})
        answer.append((resp.status_code, resp.get_json()))

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(SECONDS + 20)
    return answer[0] if answer else None


@pytest.mark.parametrize(("content", "detail"), [
    ("divide", "ZeroDivisionError: division by zero"),
    ("loop", "took over 1 s to render"),
])
def test_the_server_answers_a_failing_template_with_its_error(app: Any, content: str,
                                                              detail: str) -> None:
    t0 = time.monotonic()
    answer = chat(app, content)
    assert answer is not None, "no answer: the template still runs"
    assert time.monotonic() - t0 < SECONDS
    status, out = answer
    assert status == 500, out
    err = out["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
    assert err["message"].startswith("the model's chat template ") and detail in err["message"]
    ok = chat(app, "Hi")  # and the server still serves
    assert ok is not None and ok[0] == 200, ok


# --- real chat templates render exactly as in Jinja's plain sandbox -------------------------

SMOLLM2 = (  # HuggingFaceTB/SmolLM2-135M-Instruct, as in the packaged GGUF
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

LLAMA3 = (  # Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | "
    "trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

GEMMA = (  # google/gemma-2-2b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{'<start_of_turn>model\n'}}{% endif %}")

LLAMA32 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson(indent=4) }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""  # noqa: E501  (meta-llama/Llama-3.2-1B-Instruct, without its custom-tools branch)

QWEN25 = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501  (Qwen/Qwen2.5-0.5B-Instruct, without its tools branch)

DEEPSEEK_R1 = (  # deepseek-ai/DeepSeek-R1-Distill-Qwen (abridged): namespace, split, slices
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(is_first=false, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")

# not a model's: the constructs the limits hook into, each of which must keep its meaning
KITCHEN_SINK = """{%- macro show(m, sep=': ') -%}{{ m.role|upper }}{{ sep }}{{ m.content }}{%- endmacro -%}
{%- macro box() -%}[{{ caller() }}]{%- endmacro -%}
{%- set ns = namespace(n=0, roles=[], text='') -%}
{%- set row = cycler('odd', 'even') -%}{%- set comma = joiner(', ') -%}
{%- for m in messages if m.content is string -%}
  {%- set ns.n = ns.n + loop.length - loop.revindex0 -%}
  {%- set ns.roles = ns.roles + [m.role] -%}
  {%- set ns.text = ns.text ~ m.content[:3] ~ '|' -%}
  {{ comma() }}{{ loop.index }}/{{ loop.length }} {{ row.next() }} {{ show(m) }}
  {%- if loop.first %} first{% elif loop.last %} last{% else %} {{ loop.cycle('a', 'b') }}{% endif %}
{%- else -%}none
{%- endfor %}
{% call box() %}{{ ns.n }} {{ ns.roles|unique|join('+') }} {{ ns.text }}{% endcall %}
{% filter upper %}{{ messages|map(attribute='role')|list|tojson }}{% endfilter %}
{% set block %}{{ messages|selectattr('role', 'equalto', 'user')|list|length }}{% endset %}{{ block }}
{{ messages|groupby('role')|map(attribute='grouper')|join(',') }} {{ messages|length * 2 ** 3 // 3 % 5 }}
{{ '%s-%05.1f-%r' % ('a', 2.25, ['x']) }} {{ '{}/{:>4}/{k}'.format(1, 'b', k=none) }} {{ '%d items'|format(3) }}
{{ -(3 - 10) + +1 }} {{ 7 / 2 }} {{ range(10)|batch(3, 0)|list }} {{ range(7)|slice(3)|list }}
{{ [1, 2, 3][::-1] }} {{ (1, 'two', none) }} {{ {'b': 1, 'a': [2, {'c': 3}]}|dictsort }} {{ messages[-1] }}
{{ [[1], [2, 3]]|sum(start=[]) }} {{ 'a\tb'.expandtabs(4) }} {{ 'x'.center(7, '*') }} {{ '7'.zfill(3) }}
{{ 'a b  c'.split() }} {{ 'l1\\nl2'.splitlines() }} {{ 'abc'.replace('b', 'BB') }} {{ '-'.join(['p', 'q']) }}
{{ 'A long line to wrap here'|wordwrap(8) }} {{ 'text\\nmore'|indent(2, true) }} {{ 'x'|center(5) }}
{{ 'Hello World'|truncate(8, true, '..', 0) }} {{ '<b>x</b> &amp; y'|striptags }} {{ 'a&b'|e }} {{ 'a b'|urlencode }}
{{ {'k': [1, 2]}|tojson(indent=2) }} {{ ['x', 'y']|pprint }} {{ 'word count here'|wordcount }} {{ 'mr x'|title }}
{{ 3.7|int }}{{ '5'|float }}{{ -2|abs }}{{ 2.5|round }} {{ 12345|filesizeformat }} {{ [3, 1, 2]|sort|first }}{{ [3, 1, 2]|max }}
{%- for item in [{'name': 'a', 'kids': [{'name': 'b', 'kids': []}]}] recursive %}
  {{ loop.depth }}{{ item.name }}{% if item.kids %}<{{ loop(item.kids) }}>{% endif %}
{%- endfor %}
{%- for k, v in {'one': 1, 'two': 2}.items() %} {{ k }}={{ v }}{% endfor %}
{%- for c in 'abc' %}{% if c == 'b' %}{% continue %}{% endif %}{{ c }}{% if c == 'c' %}{% break %}{% endif %}{% endfor %}
{{ strftime_now('%Y') }}{{ bos_token }}{{ eos_token }}{{ messages is defined }}{{ tools is undefined }}{{ 'x' in 'xyz' }}
"""  # noqa: E501

CONVERSATIONS = [
    [{"role": "user", "content": "Hi <b> there"}],
    [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "<think>easy</think>4"},
     {"role": "user", "content": "Ünïcödé ✓ and \\ quotes ' \" \n\t tabs"}],
    [{"role": "user", "content": "weather?"},
     {"role": "assistant", "content": "", "tool_calls": [{"function": {
         "name": "get_weather", "arguments": {"city": "Paris", "days": [1, 2]}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"}, {"role": "tool", "content": "sunny"},
     {"role": "assistant", "content": "It is 21 and sunny."}],
    [{"role": "user", "content": f"message {i} " + "word " * (i % 50)} for i in range(300)],
]


def plain_sandbox(source: str) -> Any:
    """Jinja's immutable sandbox as transformers sets it up, without any limit."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])

    def raise_exception(message: str) -> None:
        raise TemplateInputError(message)

    env.globals.update(raise_exception=raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(fmt))
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False,
                                                              indent=indent)
    return env.from_string(source)


@pytest.mark.parametrize("source", [SMOLLM2, LLAMA3, GEMMA, LLAMA32, QWEN25, DEEPSEEK_R1,
                                    KITCHEN_SINK],
                         ids=["smollm2", "llama3", "gemma", "llama3.2", "qwen2.5",
                              "deepseek-r1", "kitchen-sink"])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_real_templates_render_as_in_the_plain_sandbox(source: str, conversation: int,
                                                       add_generation_prompt: bool) -> None:
    messages = CONVERSATIONS[conversation]
    kwargs = {"bos_token": "<s>", "eos_token": "</s>"}
    expected: str | Exception
    try:
        expected = plain_sandbox(source).render(messages=messages, **kwargs,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateInputError as exc:  # Gemma refuses a system message
        expected = exc
    template = ChatTemplate(source, **kwargs)
    if isinstance(expected, Exception):
        with pytest.raises(TemplateInputError, match=re.escape(str(expected))):
            template.render(messages, add_generation_prompt)
    else:
        assert template.render(messages, add_generation_prompt) == expected


ACCUMULATING = (  # builds a list and a string message by message, as some templates do
    "{% set ns = namespace(seen=[], text='') %}{% for m in messages %}"
    "{% set ns.seen = ns.seen + [m] %}{% set ns.text = ns.text ~ m.role[0] %}"
    "{{ ns.seen|length }}:{{ m.content|trim }}\n{% endfor %}{{ ns.text }}{{ messages|tojson }}")


@pytest.mark.parametrize("source", [SMOLLM2, LLAMA32, QWEN25, KITCHEN_SINK, ACCUMULATING],
                         ids=["smollm2", "llama3.2", "qwen2.5", "kitchen-sink", "accumulating"])
def test_a_large_conversation_renders_within_the_limits(source: str) -> None:
    # 2000 messages, about 1 MB of prompt: the server's largest request body by default.
    # The size and memory limits are under test, not this machine's speed: a long deadline.
    from edgesmith.device_server.templates import TemplateLimits

    messages = [{"role": ("user", "assistant")[i % 2], "content": f"{i}: " + "lorem ipsum " * 40}
                for i in range(2000)]
    template = ChatTemplate(source, limits=TemplateLimits(deadline_s=60))
    assert template.render(messages) == plain_sandbox(source).render(
        messages=messages, add_generation_prompt=True, bos_token="", eos_token="")


def test_packaged_smollm2_gguf_template_renders_as_in_the_plain_sandbox() -> None:
    from edgesmith import gguf_file, models

    try:
        path = models.resolve("builtin:smollm2-135m").path
    except Exception as exc:  # the optional model package is not installed
        pytest.skip(f"no packaged SmolLM2 GGUF: {exc}")
    source = gguf_file.read_header(path).fields["tokenizer.chat_template"]
    assert source == SMOLLM2
    for messages in CONVERSATIONS:
        assert ChatTemplate(source).render(messages) == plain_sandbox(source).render(
            messages=messages, add_generation_prompt=True, bos_token="", eos_token="")


def test_the_server_option_sets_the_render_deadline(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    import tiny_gguf

    from edgesmith.device_server.app import ServerConfig, create_app

    path = tiny_gguf.build(tmp_path / "t.gguf", template=SERVED)
    flask_app = create_app(ServerConfig(model=path, threads=1, n_ctx=256,
                                        template_deadline_s=0.2))
    try:
        answer = chat(flask_app, "loop")
        assert answer is not None and answer[0] == 500
        assert "took over 0.2 s to render" in answer[1]["error"]["message"], answer
    finally:
        flask_app.extensions["edgesmith_engine"].close()
