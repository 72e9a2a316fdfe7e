"""Chat templates from GGUF metadata, rendered in a bounded Jinja2 sandbox.

A chat template ships inside the model file, so it is untrusted input. It is compiled in an
``ImmutableSandboxedEnvironment``, where reaching Python internals (``__class__``,
``__subclasses__``, ``mro``...) or mutating objects raises ``SecurityError`` instead of
running code, and its rendering is bounded in time and memory (``TemplateLimits``):

- **Time.** A render has a deadline (``deadline_s``, 1 s by default), checked at every step
  that can repeat: each iteration of every ``for`` loop (over any iterable: the compiler wraps
  the loop's iterable), every call (macros, recursive ``loop()``, methods, globals) and every
  filter. A template that loops without output stops at its deadline.
- **Memory.** Every value an operation produces is checked before it can grow further: strings
  and the text of containers (counted deeply, so ``[x, x]`` doubling is seen) up to
  ``max_value_chars``, containers up to ``max_items`` entries, integers up to ``max_int_bits``.
  Operations that could build a huge value in one step (``*``, ``**``, ``%``, ``+``, ``~``,
  ``replace``, ``join``, ``center``, ``indent``, ``format``, ``batch``, ``sum``, ``tojson``,
  ``str.center``/``zfill``/``expandtabs``/``split``...) are estimated *before* they run. All
  values made by one render, plus its output pieces (in macros and ``set`` blocks too), are
  charged to a budget of ``max_render_bytes``, so memory stays bounded even when each value is
  small.
- ``lipsum`` is removed (``lipsum(n=1000000)`` took 46 s). No template we know uses it.

Why hooks inside the render rather than a worker process with a timeout: a worker bounds
everything, but costs every request the IPC of its messages and prompt, a spare Python
process on the Pi (and its respawn after a kill), and a queue when requests come together.
The hooks cost a function call per loop iteration, call, filter and output piece: a
fraction of a millisecond for real templates. ``sys.settrace`` would slow every line, and
resource limits (``RLIMIT_AS``) apply to the whole server. Jinja compiles ``for`` into
Python loops that call nothing per iteration, so the deadline needs the compiler's help
(``_CodeGenerator``); calls, binary operators, attribute access and ``str.format`` already
pass through the sandbox's own hooks, and the filters are wrapped.

Any failure of a template while rendering (a sandbox violation, a limit, ``1 / 0``, a
MemoryError...) is a ``TemplateRenderError`` naming the template; the template's own
``raise_exception(...)`` (used to reject, say, non-alternating roles) is the caller's fault
and becomes ``TemplateInputError``.
"""

from __future__ import annotations

import contextvars
import json
import math
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import update_wrapper
from types import BuiltinMethodType, MethodType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import make_attrgetter
from jinja2.runtime import LoopContext, Macro, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter, SecurityError
from jinja2.utils import Namespace, _PassArg, pass_context
from markupsafe import EscapeFormatter, Markup

from edgesmith.errors import EdgesmithError, ModelError

# Used when a GGUF has no tokenizer.chat_template: ChatML, the most common format.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_RENDERED_CHARS = 4_000_000
DEFAULT_RENDER_DEADLINE_S = 1.0
HINT = "fix tokenizer.chat_template in the GGUF metadata"


@dataclass(frozen=True)
class TemplateLimits:
    """What one render of a chat template may spend."""

    deadline_s: float = DEFAULT_RENDER_DEADLINE_S  # wall-clock time of one render
    max_output_chars: int = MAX_RENDERED_CHARS  # the rendered prompt
    max_value_chars: int = MAX_RENDERED_CHARS  # any value's text (a string, a list's repr)
    max_items: int = 100_000  # entries of any container (Jinja's own range() limit)
    max_int_bits: int = 1 << 16
    max_render_bytes: int = 64 << 20  # all values and output pieces of one render

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ValueError("the template render deadline must be positive")


class TemplateInputError(EdgesmithError):
    """The messages were rejected by the template itself (raise_exception)."""


class TemplateRenderError(EdgesmithError):
    """The template failed: a sandbox violation, a limit, or a bug in the template."""


class TemplateLimitError(TemplateRenderError):
    """The template went over one of its TemplateLimits (time, size, memory)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"the model's chat template {problem}", HINT)


_CALL_BYTES = 64  # per call
_SLOT_BYTES = 64  # per entry of a container a call or filter made: the small object it may hold
_MACRO_BYTES = 1024  # per macro definition executed (a function, its closure)
_MAX_DEPTH = 200  # nesting of a value whose size is measured
_TICK_EVERY = 1024  # entries measured between two deadline checks
_MESSAGE_CHARS = 1000  # of a raise_exception() message
# what str.split() splits on, and what str.splitlines() breaks at
_SPACES = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
           "\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")
_LINE_BREAKS = "\n\x0b\x0c\r\x1c\x1d\x1e\x85\u2028\u2029"
_PRINTF_REST = re.compile(r"[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.S)
_SPEC_NUMBER = re.compile(r"\d+")


class _Render:
    """The limits and what is spent of them, for one render (or none: only the size checks)."""

    __slots__ = ("_count", "bytes_left", "deadline", "deadline_s", "limits", "sizes")

    def __init__(self, limits: TemplateLimits, deadline_s: float | None) -> None:
        self.limits = limits
        self.deadline_s = deadline_s
        bounded = deadline_s is not None
        self.deadline = time.monotonic() + deadline_s if bounded else math.inf
        self.bytes_left: float = limits.max_render_bytes if bounded else math.inf
        # sizes of the containers seen (values cannot be mutated in the immutable sandbox),
        # holding the container so that its id stays its own
        self.sizes: dict[int, tuple[Any, int]] | None = {} if bounded else None
        self._count = 0

    # -- time and memory ------------------------------------------------------------------
    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"took over {self.deadline_s:g} s to render")

    def charge(self, nbytes: float) -> None:
        self.bytes_left -= nbytes
        if self.bytes_left < 0:
            raise TemplateLimitError(
                f"allocated over {self.limits.max_render_bytes >> 20} MiB while rendering")

    def metered(self, iterable: Iterable[Any]) -> Iterator[Any]:
        deadline, monotonic = self.deadline, time.monotonic
        for item in iterable:
            # time only: an iteration keeps nothing by itself (what a loop keeps, a value or
            # output, is charged where it is made); an empty loop is the deadline's, so its
            # error says so instead of a misleading memory figure
            if monotonic() > deadline:
                self.tick()
            yield item

    # -- sizes ----------------------------------------------------------------------------
    def too_big(self, what: str) -> TemplateLimitError:
        return TemplateLimitError(
            f"built a value of over {self.limits.max_value_chars} characters ({what})")

    def check_chars(self, n: int, what: str) -> None:
        if n > self.limits.max_value_chars:
            raise self.too_big(what)

    def check_count(self, n: Any, what: str) -> None:
        if isinstance(n, int) and n > self.limits.max_items:
            raise TemplateLimitError(
                f"built a sequence of over {self.limits.max_items} items ({what})")

    def check_items(self, value: Any, what: str) -> None:
        """A value about to be iterated by a filter or method (a string: its characters)."""
        if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset, range)) \
                or type(value).__name__ in ("dict_keys", "dict_values", "dict_items"):
            self.check_count(len(value), what)

    def size(self, value: Any, what: str) -> int:
        """About the length of ``str(value)``, counting shared parts each time they appear;
        raises when over ``max_value_chars``."""
        if isinstance(value, str):
            return len(value)
        return self._measure(value, False, 0, 0, what)

    def text_size(self, value: Any, what: str, indent: int = 0) -> int:
        """An upper bound of the length of ``str(value)`` (``indent``: of JSON or pprint text
        indented by that many characters per level), checked against ``max_value_chars``."""
        if isinstance(value, str):
            self.check_chars(len(value), what)
            return len(value)
        return self._measure(value, True, indent, 0, what)  # as long to walk as to print

    def _measure(self, obj: Any, exact: bool, indent: int, depth: int, what: str) -> int:
        if isinstance(obj, str):
            if not exact:
                return len(obj) + 2
            # repr() and JSON escape quotes, backslashes, line breaks and tabs with two
            # characters, other unprintable characters with up to ten (\U000f0000)
            n = len(obj) + obj.count("\\") + obj.count("'") + obj.count('"') + 2
            if not obj.isprintable():
                rest = obj.replace("\n", "").replace("\t", "").replace("\r", "")
                if not rest.isprintable():
                    return 10 * len(obj) + 2
                n += len(obj) - len(rest)
            return n
        if isinstance(obj, bool) or obj is None:
            return 5
        if isinstance(obj, int):
            return obj.bit_length() // 3 + 2
        if isinstance(obj, float):
            return 24
        if isinstance(obj, (bytes, bytearray)):
            return 4 * len(obj) + 3
        if isinstance(obj, Undefined):
            return 16
        if isinstance(obj, Namespace):  # mutable: never cached
            attrs = object.__getattribute__(obj, "_Namespace__attrs")
            return 64 + (self._measure(attrs, exact, indent, depth + 1, what) if exact else 0)
        view = type(obj).__name__ in ("dict_keys", "dict_values", "dict_items")
        if not (view or isinstance(obj, (list, tuple, dict, set, frozenset))):
            return 100  # another object's repr: its type and address
        cache = self.sizes if not exact and not view and not indent else None
        if cache is not None:
            known = cache.get(id(obj))
            if known is not None:
                return known[1]
        if depth > _MAX_DEPTH:
            raise TemplateLimitError(f"built a value nested over {_MAX_DEPTH} levels ({what})")
        self.check_count(len(obj), what)
        limit = self.limits.max_value_chars
        per_item = 2 + (indent * (depth + 1) + 1 if indent else 0)
        total = 16
        items: Iterable[Any] = obj.items() if isinstance(obj, dict) else obj
        is_dict = isinstance(obj, dict)
        for item in items:
            if is_dict:
                key, item = item
                total += (len(key) + 4 if type(key) is str and not exact
                          else self._measure(key, exact, indent, depth + 1, what) + 2)
            kind = type(item)  # the common leaves without a call
            if kind is str and not exact:
                total += len(item) + 2 + per_item
            elif kind is int:
                total += item.bit_length() // 3 + 2 + per_item
            elif kind is float:
                total += 24 + per_item
            elif kind is bool or item is None:
                total += 5 + per_item
            else:
                total += self._measure(item, exact, indent, depth + 1, what) + per_item
            if total > limit:
                raise self.too_big(what)
            self._count += 1
            if self._count % _TICK_EVERY == 0:
                self.tick()
        if cache is not None:
            cache[id(obj)] = (obj, total)
        return total

    def admit(self, value: Any, what: str, fresh: bool = False, size: int | None = None
              ) -> Any:
        """A value an operation produced: check its size and charge its memory (``fresh``:
        a container whose entries the operation may have made, as ``str.split`` does;
        ``size``: its size, known from its parts', so not measured again)."""
        if isinstance(value, str):
            if len(value) > self.limits.max_value_chars:
                raise self.too_big(what)
            self.bytes_left -= sys.getsizeof(value)
            if self.bytes_left < 0:
                self.charge(0)
        elif isinstance(value, (list, tuple, dict, set, frozenset)):
            self.check_count(len(value), what)
            if size is None or self.sizes is None:
                self.size(value, what)
            else:  # a list built of lists: measuring it would be quadratic in a loop
                self.check_chars(size, what)
                self.sizes[id(value)] = (value, size)
            self.charge(sys.getsizeof(value) + (_SLOT_BYTES * len(value) if fresh else 0))
        elif isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > self.limits.max_int_bits:
                raise TemplateLimitError(
                    f"built an integer of over {self.limits.max_int_bits} bits ({what})")
            self.charge(sys.getsizeof(value))
        elif isinstance(value, (bytes, bytearray)):
            self.check_chars(len(value), what)
            self.charge(sys.getsizeof(value))
        else:
            self.charge(_SLOT_BYTES)
        return value


_RENDER: contextvars.ContextVar[_Render | None] = contextvars.ContextVar(
    "edgesmith_template_render", default=None)
_IDLE = _Render(TemplateLimits(), None)


def _current() -> _Render:
    return _RENDER.get() or _IDLE


def _arg(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str,
         default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _count_any(s: str | bytes, chars: str) -> int:
    if isinstance(s, str):
        return sum(s.count(c) for c in chars)
    return sum(s.count(c.encode()) for c in chars if c.isascii())


def _printf_specs(fmt: str) -> Iterator[tuple[str | None, str | None, str | None]]:
    """The (mapping key, width, precision) of each conversion of a %-format, parsed as
    CPython does (a key may hold nested parentheses)."""
    i, n = 0, len(fmt)
    while True:
        i = fmt.find("%", i) + 1
        if not 0 < i < n:
            return
        key = None
        if fmt[i] == "(":
            depth, j = 1, i + 1
            while j < n and depth:
                depth += (fmt[j] == "(") - (fmt[j] == ")")
                j += 1
            key, i = fmt[i + 1:j - 1], j
        m = _PRINTF_REST.match(fmt, i)
        if m is None:
            return
        i = m.end()
        if m.group(3) != "%":
            yield key, m.group(1), m.group(2)


def _printf_size(r: _Render, fmt: str, values: Any, what: str) -> int:
    """An upper bound of the length of ``fmt % values``."""
    if fmt.count("%") > 2 * r.limits.max_items:
        raise TemplateLimitError(f"has a %-format of over {r.limits.max_items} fields ({what})")
    mapping = values if isinstance(values, Mapping) else None
    args: tuple[Any, ...] = values if isinstance(values, tuple) else (values,)
    escape = 6 if isinstance(fmt, Markup) else 1  # Markup % escapes the values
    total = len(fmt)
    pos = 0
    for key, width, precision in _printf_specs(fmt):
        for number in (width, precision):
            if number == "*":  # taken from the values
                star = args[pos] if key is None and pos < len(args) else 0
                pos += 1
                total += abs(star) if isinstance(star, int) else 0
            elif number:
                if len(number) > 9:
                    raise r.too_big(what)
                total += int(number)
        if key is not None:
            value = mapping.get(key) if mapping is not None and key in mapping else None
        else:
            value = args[pos] if pos < len(args) else None
            pos += 1
        total += escape * r.text_size(value, what) + (330 if isinstance(value, float) else 0)
        r.check_chars(total, what)  # 330: %f of 1e308
    return total


# -- the sandbox's hooks ------------------------------------------------------------------
def _check_text_method(r: _Render, s: str | bytes, name: str, args: tuple[Any, ...],
                       kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Estimate a str/bytes method's result before it runs (what it builds in one step)."""
    what = f"str.{name}"
    n = len(s)
    escape = 6 if isinstance(s, Markup) else 1  # Markup's methods escape their arguments
    estimate = 0
    if name in ("center", "ljust", "rjust", "zfill"):
        estimate = max(n, _int(_arg(args, kwargs, 0, "width", 0)))
    elif name == "expandtabs":
        tab = "\t" if isinstance(s, str) else b"\t"
        estimate = n + s.count(tab) * max(_int(_arg(args, kwargs, 0, "tabsize", 8)), 0)  # type: ignore[arg-type]
    elif name == "replace" and len(args) >= 2 \
            and isinstance(args[0], type(s[:0])) and isinstance(args[1], type(s[:0])):
        old, new = args[0], args[1]
        count = _int(_arg(args, kwargs, 2, "count", -1))
        hits = s.count(old) if old else n + 1
        if count >= 0:
            hits = min(hits, count)
        estimate = n + hits * escape * len(new)
    elif name == "join" and args:
        r.check_items(args[0], what)
        items = args[0] if isinstance(args[0], (list, tuple)) else list(args[0])
        r.check_count(len(items), what)
        args = (items, *args[1:])
        estimate = escape * sum(len(x) for x in items if isinstance(x, (str, bytes))) \
            + max(len(items) - 1, 0) * n
    elif name in ("split", "rsplit", "splitlines"):
        if name == "splitlines":
            pieces = _count_any(s, _LINE_BREAKS) + 1
        else:
            sep = _arg(args, kwargs, 0, "sep", None)
            pieces = s.count(sep) + 1 if isinstance(sep, (str, bytes)) and sep \
                else _count_any(s, _SPACES) + 1
            maxsplit = _int(_arg(args, kwargs, 1, "maxsplit", -1))
            if maxsplit >= 0:
                pieces = min(pieces, maxsplit + 1)
        r.check_count(pieces, what)
        r.charge(sys.getsizeof(s))  # the pieces' own text
    elif name == "encode":
        estimate = 10 * n  # unicode_escape: \U0001f600
    elif name == "translate" and args:
        table = args[0]
        if not isinstance(table, (dict, list, tuple, bytes)):
            raise SecurityError(f"str.translate with a {type(table).__name__} table")
        values = table.values() if isinstance(table, dict) else table
        if not isinstance(table, bytes):
            r.check_items(values, what)
        longest = max((len(v) for v in values if isinstance(v, (str, bytes))), default=1)
        estimate = n * max(longest, 1)
    elif name in ("striptags", "unescape"):  # Markup's, one Python call per entity
        r.check_count(n, what)
    r.check_chars(estimate, what)
    return args


def _name(obj: Any) -> str:
    name = obj.name if isinstance(obj, Macro) else getattr(obj, "__name__", None)
    return name[:64] if isinstance(name, str) and name else type(obj).__name__


class _BoundedFormatter(SandboxedFormatter):
    """``str.format`` in the sandbox, counting what each field adds."""

    def __init__(self, env: jinja2.Environment, **kwargs: Any) -> None:
        super().__init__(env, **kwargs)
        self._render = _current()
        self._total = 0

    def convert_field(self, value: Any, conversion: str | None) -> Any:
        if conversion:
            self._render.text_size(value, "str.format")
        return super().convert_field(value, conversion)

    def format_field(self, value: Any, format_spec: str) -> Any:
        r = self._render
        for number in _SPEC_NUMBER.findall(format_spec):
            if len(number) > 9 or int(number) > r.limits.max_value_chars:
                raise r.too_big("str.format")
        r.text_size(value, "str.format")
        out = super().format_field(value, format_spec)
        self._total += len(out)
        r.check_chars(self._total, "str.format")
        return out


class _BoundedEscapeFormatter(_BoundedFormatter, EscapeFormatter):
    pass


# filters: checks made before the filter runs, given (the render, the filter's name, the
# context, the value, the arguments); each returns the value to filter
_Pre = Callable[[_Render, str, Any, Any, tuple[Any, ...], dict[str, Any]], Any]


def _slow(r: _Render, n: int, what: str, cap: int) -> None:
    """A filter taking one Python step per word or item of its text: its input is capped,
    as the deadline is not checked inside it."""
    if n > cap:
        raise TemplateLimitError(f"gave over {cap} characters to the {what!r} filter")


def _text_pre(factor: int = 1, slow: bool = False) -> _Pre:
    """A filter making text of its value: at most ``factor`` times its size."""
    def pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> Any:
        n = r.text_size(value, what)
        r.check_chars(n * factor, what)
        if slow:
            _slow(r, n, what, r.limits.max_items)
        return value
    return pre


def _items_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    r.check_items(value, what)
    return value


def _batch_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
               kwargs: dict[str, Any]) -> Any:
    r.check_items(value, what)
    r.check_count(_arg(args, kwargs, 0, "linecount" if what == "batch" else "slices", 0), what)
    return value


def _listed(r: _Render, value: Any, what: str) -> list[Any]:
    r.check_items(value, what)
    items = list(value)
    r.check_count(len(items), what)
    return items


def _join_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    items = _listed(r, value, what)
    attribute = _arg(args, kwargs, 1, "attribute", None)
    parts = map(make_attrgetter(ctx.environment, attribute), items) \
        if attribute is not None else items
    total = max(len(items) - 1, 0) * r.text_size(_arg(args, kwargs, 0, "d", ""), what)
    for part in parts:
        total += r.text_size(part, what)
        r.check_chars(total, what)
    return items


def _sum_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
    items = _listed(r, value, what)
    attribute = _arg(args, kwargs, 0, "attribute", None)
    start = _arg(args, kwargs, 1, "start", 0)
    parts = map(make_attrgetter(ctx.environment, attribute), items) \
        if attribute is not None else items
    length = len(start) if isinstance(start, (list, tuple)) else 0
    copied = 0
    for part in parts:  # sum() of sequences copies the running total at each step
        if isinstance(part, (list, tuple)):
            length += len(part)
            copied += length
            r.check_count(length, what)
            if copied > 10 * r.limits.max_items:
                raise TemplateLimitError(f"would copy over {10 * r.limits.max_items} items "
                                         f"to sum lists ({what})")
    return items


def _center_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    n = r.text_size(value, what)
    r.check_chars(max(n, _int(_arg(args, kwargs, 0, "width", 80))), what)
    return value


def _indent_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    n = r.text_size(value, what)
    width = _arg(args, kwargs, 0, "width", 4)
    width = r.text_size(width, what) if isinstance(width, str) else _int(width)
    r.check_chars(width, what)
    lines = _count_any(value, _LINE_BREAKS) + 2 if isinstance(value, str) else n + 2
    r.check_chars(n + lines * width, what)
    return value


def _replace_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> Any:
    n = r.text_size(value, what)
    old = _arg(args, kwargs, 0, "old", "")
    new_n = r.text_size(_arg(args, kwargs, 1, "new", ""), what)
    count = _arg(args, kwargs, 2, "count", None)
    hits = value.count(old) if isinstance(value, str) and isinstance(old, str) and old \
        else n + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    r.check_chars(n + hits * new_n, what)
    return value


def _wordwrap_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> Any:
    n = r.text_size(value, what)
    _slow(r, n, what, r.limits.max_items)
    wrap = _arg(args, kwargs, 2, "wrapstring", None)
    wrap_n = r.text_size(wrap, what) if wrap is not None else 2
    r.check_chars(n + (n + 1) * wrap_n, what)
    return value


def _urlize_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    n = r.text_size(value, what)
    _slow(r, n, what, r.limits.max_items)
    extra = sum(r.text_size(_arg(args, kwargs, i, key, ""), what)
                for i, key in ((2, "target"), (3, "rel")))
    r.check_chars(3 * n + (n // 2 + 1) * (extra + 64), what)
    return value


def _format_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    r.text_size(value, what)
    _printf_size(r, value if isinstance(value, str) else str(value), kwargs or args, what)
    return value


def _json_pre(r: _Render, what: str, ctx: Any, value: Any, args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
    indent = _arg(args, kwargs, 0, "indent", None) if what == "tojson" else 1
    width = r.text_size(indent, what) if isinstance(indent, str) else _int(indent)
    r.check_chars(width, what)
    n = r.text_size(value, what, max(width, 0))
    if indent is not None:  # pprint, and json.dumps with an indent, run in Python
        _slow(r, n, what, 4 * r.limits.max_items)
    return value


_FILTER_PRE: dict[str, _Pre] = {
    "batch": _batch_pre, "slice": _batch_pre, "join": _join_pre, "sum": _sum_pre,
    "center": _center_pre, "indent": _indent_pre, "replace": _replace_pre,
    "wordwrap": _wordwrap_pre, "urlize": _urlize_pre, "format": _format_pre,
    "tojson": _json_pre, "pprint": _json_pre,
    **{name: _items_pre for name in (
        "dictsort", "groupby", "items", "list", "map", "max", "min", "reject", "rejectattr",
        "select", "selectattr", "sort", "unique")},
    **{name: _text_pre() for name in (
        "capitalize", "lower", "upper", "trim", "truncate", "string", "safe")},
    **{name: _text_pre(6) for name in ("e", "escape", "forceescape", "xmlattr")},
    "urlencode": _text_pre(12, slow=True),
    **{name: _text_pre(slow=True) for name in ("title", "striptags", "wordcount")},
}


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    pass_arg = _PassArg.from_obj(func)
    pre = _FILTER_PRE.get(name)
    what = f"the {name!r} filter"

    def bounded(context: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        r = _current()
        r.tick()
        if pre is not None:
            value = pre(r, name, context, value, args, kwargs)
        if pass_arg is _PassArg.context:
            result = func(context, value, *args, **kwargs)
        elif pass_arg is _PassArg.eval_context:
            result = func(context.eval_ctx, value, *args, **kwargs)
        elif pass_arg is _PassArg.environment:
            result = func(context.environment, value, *args, **kwargs)
        else:
            result = func(value, *args, **kwargs)
        return r.admit(result, what, fresh=True)

    update_wrapper(bounded, func)
    # a context filter is never run at compile time (constant folding), outside the limits
    return pass_context(bounded)


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, routing what can repeat or allocate through the limits:
    ``for`` iterables, ``~``, literals, slices, output pieces and macro definitions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_iters: dict[int, nodes.Node] = {}  # Jinja allows no custom node type

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) in self._loop_iters:  # the iterable of a for loop
            self.write("environment.metered_iter(")
            super().visit(node, *args, **kwargs)
            self.write(")")
            return None
        return super().visit(node, *args, **kwargs)

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._loop_iters[id(node.iter)] = node.iter
        super().visit_For(node, frame)

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile:
            func = "(markup_join if context.eval_ctx.volatile else str_join)"
        elif frame.eval_ctx.autoescape:
            func = "markup_join"
        else:
            func = "str_join"
        self.write(f"environment.bounded_concat({func}, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _admit(self, visit: Callable[[Any, Frame], None], node: nodes.Node,
               frame: Frame) -> None:
        self.write("environment.admit(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: nodes.List, frame: Frame) -> None:
        self._admit(super().visit_List, node, frame)

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self._admit(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: nodes.Tuple, frame: Frame) -> None:
        if node.ctx == "load":
            self._admit(super().visit_Tuple, node, frame)
        else:  # an assignment or loop target
            super().visit_Tuple(node, frame)

    def visit_Const(self, node: nodes.Const, frame: Frame) -> None:
        if isinstance(node.value, (list, dict)):  # a folded literal: a new one each time
            self._admit(super().visit_Const, node, frame)
        else:
            super().visit_Const(node, frame)

    def visit_Getitem(self, node: nodes.Getitem, frame: Frame) -> None:
        if isinstance(node.arg, nodes.Slice):  # slices bypass the sandbox's getitem
            self._admit(super().visit_Getitem, node, frame)
        else:
            super().visit_Getitem(node, frame)

    def _output_child_pre(self, node: nodes.Expr, frame: Frame,
                          finalize: CodeGenerator._FinalizeInfo) -> None:
        self.write("environment.output_text(")
        super()._output_child_pre(node, frame, finalize)
        self.write("environment.output_value(")

    def _output_child_post(self, node: nodes.Expr, frame: Frame,
                           finalize: CodeGenerator._FinalizeInfo) -> None:
        self.write(")")
        super()._output_child_post(node, frame, finalize)
        self.write(")")

    def _output_const_repr(self, group: Iterable[Any]) -> str:
        return f"environment.output_text({super()._output_const_repr(group)})"

    def macro_def(self, macro_ref: Any, frame: Frame) -> None:
        self.write("environment.bounded_macro(")
        super().macro_def(macro_ref, frame)
        self.write(")")


class _SandboxEnv(ImmutableSandboxedEnvironment):
    """The immutable sandbox, failing on any unsafe attribute, with the limits of the
    current render checked by its hooks (see the module's docstring)."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.globals.pop("lipsum", None)

    def bound_filters(self) -> None:
        """Wrap every filter (call once all are registered)."""
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja's sandbox returns an Undefined that renders as "" when printed; fail instead,
        # so a template probing for Python internals is reported, not silently emptied
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} "
                            "object is unsafe")

    # -- operators ------------------------------------------------------------------------
    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        r = _current()
        if operator == "+" and type(left) is str and type(right) is str:  # the common case
            r.check_chars(len(left) + len(right), "'+'")
            result = left + right
            r.charge(sys.getsizeof(result))
            return result
        what = f"{operator!r}"
        known = None  # the size of a list or tuple result
        if operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                known = r.size(left, what) + r.size(right, what)
                r.check_chars(known, what)
                if isinstance(left, (list, tuple)):
                    r.check_count(len(left) + len(right), what)
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and n > 0:
                    known = r.size(seq, what) * n
                    r.check_chars(known, what)
                    if isinstance(seq, (list, tuple)):
                        r.check_count(len(seq) * n, what)
            if isinstance(left, int) and isinstance(right, int) \
                    and left.bit_length() + right.bit_length() > r.limits.max_int_bits:
                raise TemplateLimitError(f"built an integer of over "
                                         f"{r.limits.max_int_bits} bits ({what})")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and abs(left) > 1 and left.bit_length() * right > r.limits.max_int_bits:
                raise TemplateLimitError(f"built an integer of over "
                                         f"{r.limits.max_int_bits} bits ({what})")
        elif operator == "%" and isinstance(left, str):
            _printf_size(r, left, right, what)
        result = super().call_binop(context, operator, left, right)
        return r.admit(result, what, size=known if isinstance(result, (list, tuple)) else None)

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        return _current().admit(super().call_unop(context, operator, arg), f"{operator!r}")

    def bounded_concat(self, join: Callable[[Iterable[Any]], str], parts: tuple[Any, ...]
                       ) -> str:
        r = _current()
        total = 0
        for part in parts:
            total += r.text_size(part, "'~'")
            r.check_chars(total, "'~'")
        return r.admit(join(parts), "'~'")  # type: ignore[no-any-return]

    # -- loops, calls, literals, output ---------------------------------------------------
    def metered_iter(self, iterable: Iterable[Any]) -> Iterable[Any]:
        r = _RENDER.get()
        return iterable if r is None else r.metered(iterable)

    def admit(self, value: Any) -> Any:
        return _current().admit(value, "a literal or slice")

    def bounded_macro(self, macro: Any) -> Any:
        _current().charge(_MACRO_BYTES)
        return macro

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        """The output of a macro, ``set`` block, filter block or recursive loop (its pieces
        were charged as they were written)."""
        return _current().admit("".join(pieces), "a block's output")  # type: ignore[no-any-return]

    def output_value(self, value: Any) -> Any:
        if not isinstance(value, str):
            _current().text_size(value, "output")
        return value

    def output_text(self, text: str) -> str:
        _current().charge(sys.getsizeof(text))
        return text

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        r = _current()
        r.tick()
        r.charge(_CALL_BYTES)
        if not self.is_safe_callable(obj):
            raise SecurityError(f"{obj!r} is not safely callable")
        name = _name(obj)
        if isinstance(obj, LoopContext) and args:  # a recursive loop's next level
            args = (self.metered_iter(args[0]), *args[1:])
        owner = getattr(obj, "__self__", None)
        if isinstance(obj, (BuiltinMethodType, MethodType)):
            if isinstance(owner, (str, bytes, bytearray)):
                args = _check_text_method(r, owner, name, args, kwargs)
            elif name == "to_bytes":
                r.check_chars(_int(_arg(args, kwargs, 0, "length", 1)), "int.to_bytes")
            elif name == "fromkeys" and args:
                r.check_items(args[0], "dict.fromkeys")
        return r.admit(context.call(obj, *args, **kwargs), f"a call of {name}", fresh=True)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """``str.format``/``format_map``, as the sandbox's, with a formatter that bounds the
        width, precision and total size of what it makes."""
        if not isinstance(value, (MethodType, BuiltinMethodType)) \
                or value.__name__ not in ("format", "format_map") \
                or not isinstance(value.__self__, str):
            return None
        f_self: str = value.__self__
        str_type = type(f_self)
        is_format_map = value.__name__ == "format_map"
        env = self

        def wrapper(*args: Any, **kwargs: Any) -> str:
            formatter: _BoundedFormatter = _BoundedEscapeFormatter(env, escape=f_self.escape) \
                if isinstance(f_self, Markup) else _BoundedFormatter(env)
            if is_format_map:
                if kwargs:
                    raise TypeError("format_map() takes no keyword arguments")
                if len(args) != 1:
                    raise TypeError(f"format_map() takes exactly one argument ({len(args)} "
                                    "given)")
                kwargs = args[0]
                args = ()
            return str_type(formatter.vformat(f_self, args, kwargs))

        return update_wrapper(wrapper, value)


# -- the template's globals and filters ---------------------------------------------------
def _raise_exception(message: Any) -> None:
    _current().text_size(message, "raise_exception")
    text = str(message)
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + "..."
    raise TemplateInputError(text)


def _strftime_now(fmt: str) -> str:
    if isinstance(fmt, str):
        _current().check_chars(len(fmt) + 64 * fmt.count("%"), "strftime_now")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    # as transformers does: plain JSON, not HTML-escaped (a prompt is not a web page)
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _failure(exc: BaseException) -> TemplateRenderError:
    detail = " ".join(str(exc).split())
    if len(detail) > 500:
        detail = detail[:500] + "..."
    name = type(exc).__name__
    return TemplateRenderError(
        f"the model's chat template failed: {name}: {detail}" if detail
        else f"the model's chat template failed: {name}", HINT)


class ChatTemplate:
    """A compiled chat template plus the special tokens it may reference."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "",
                 limits: TemplateLimits | None = None) -> None:
        self.limits = limits or TemplateLimits()
        # Undefined (not StrictUndefined), as transformers renders them: real templates test
        # optional variables with `{% if tools %}`.
        env = _SandboxEnv(trim_blocks=True, lstrip_blocks=True, autoescape=False,
                          extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        env.bound_filters()
        try:
            self._template = env.from_string(source)
        except Exception as exc:  # a syntax error, or a source too deeply nested to compile
            detail = exc if isinstance(exc, jinja2.TemplateError) else _failure(exc).message
            raise ModelError(f"the model's chat template does not compile: {detail}",
                             HINT) from exc
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               deadline_s: float | None = None) -> str:
        """The prompt; ``deadline_s`` overrides the limits' deadline for this render."""
        limit = self.limits.max_output_chars
        render = _Render(self.limits, self.limits.deadline_s if deadline_s is None
                         else deadline_s)
        token = _RENDER.set(render)
        parts: list[str] = []
        size = 0
        gen = self._template.generate(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token,
        )
        try:
            # generated piece by piece, so a template that loops without end is stopped at
            # max_output_chars instead of filling the memory first
            for part in gen:
                size += len(part)
                if size > limit:
                    raise TemplateLimitError(f"produced over {limit} characters")
                parts.append(part)
        except (TemplateInputError, TemplateRenderError):
            raise
        except Exception as exc:  # SecurityError, 1 / 0, MemoryError, RecursionError...
            raise _failure(exc) from exc
        finally:
            gen.close()
            _RENDER.reset(token)
        return "".join(parts)


def from_metadata(metadata: dict[str, str], token_text: dict[int, str],
                  limits: TemplateLimits | None = None) -> ChatTemplate:
    """The GGUF's ``tokenizer.chat_template`` (ChatML when it has none).

    ``token_text`` maps the BOS/EOS ids to their text, for templates using bos_token.
    """
    source = metadata.get("tokenizer.chat_template") or CHATML

    def special(key: str) -> str:
        raw = metadata.get(key)
        return token_text.get(int(raw), "") if raw is not None and raw.isdigit() else ""

    return ChatTemplate(source, special("tokenizer.ggml.bos_token_id"),
                        special("tokenizer.ggml.eos_token_id"), limits)
