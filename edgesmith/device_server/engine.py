"""One llama.cpp context, one worker thread, a bounded queue in front of it.

HTTP threads ``submit`` generation jobs; the worker runs them in order on the single loaded
``llama_cpp.Llama`` and pushes text deltas into each job's own event queue as tokens are
sampled, so a streaming response can forward them one by one. When the queue is full,
``submit`` raises ``QueueFull`` at once (the server answers 503) instead of piling up.

A job is cancelled by ``job.cancel()`` (the HTTP side does it when a streaming client goes
away) or by its ``disconnected`` callable (waitress's ``client_disconnected``); the worker
checks between tokens and skips a job cancelled while it waited.

Exclusive work, for the benchmark endpoint (``bench_api``): ``engine.run_exclusive(fn)``
queues ``fn`` behind the requests already waiting (blocking while the queue is full, never
refused), runs ``fn(llama)`` on the worker thread with nothing else touching the model, and
returns its result or re-raises its exception in the caller. ``fn`` may change the context
(threads, KV cache) but must leave the model usable; the next generation re-evaluates its
prompt, so no KV state needs restoring.
"""

from __future__ import annotations

import codecs
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from edgesmith.device_server import chat_prompt, templates
from edgesmith.device_server.metrics import Metrics
from edgesmith.errors import EdgesmithError

log = logging.getLogger("edgesmith.server")
T = TypeVar("T")


class QueueFull(Exception):
    """The bounded request queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the request queue is full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    error: BaseException


def _failure(stop: str) -> list[int]:
    """KMP failure table: fail[k] is the longest proper border of stop[:k + 1]."""
    fail, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return fail


class StopBuffer:
    """Holds back text that may be the start of a stop string; cuts at the first stop.

    Incremental: each stop string has a KMP matcher whose state is the length of its longest
    prefix that the text so far ends with, so each generated character costs amortized O(1)
    per stop however long the stops are, and only the text that may still begin a stop (at
    most the longest stop minus one character) is held back. The first stop to complete wins
    (of two completing at the same character, the one starting first), whatever way the text
    is split into tokens.
    """

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(dict.fromkeys(s for s in stops if s))
        self._fail = [_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        buf = self.pending + text
        if not self.stops:
            self.pending = ""
            return buf, False
        base = len(self.pending)
        for j, ch in enumerate(text):
            start = None
            for k, stop in enumerate(self.stops):
                state, fail = self._state[k], self._fail[k]
                while state and stop[state] != ch:
                    state = fail[state - 1]
                if stop[state] == ch:
                    state += 1
                if state == len(stop):
                    at = base + j + 1 - len(stop)
                    start = at if start is None else min(start, at)
                self._state[k] = state
            if start is not None:
                self.pending = ""
                return buf[:start], True
        cut = len(buf) - max(self._state)
        out, self.pending = buf[:cut], buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Job:
    prompt_tokens: list[int]
    params: SamplingParams
    disconnected: Callable[[], bool] | None = None
    events: queue.SimpleQueue[str | Finished | Failed] = field(default_factory=queue.SimpleQueue)
    _cancel: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set() or bool(self.disconnected and self.disconnected())

    def deltas(self) -> Iterator[str]:
        """Yield text deltas as the worker produces them; return the ``Finished`` event."""
        while True:
            event = self.events.get()
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Finished):
                return event
            yield event

    def result(self) -> tuple[str, Finished]:
        """Block until done: (the whole text, the Finished event)."""
        parts: list[str] = []
        gen = self.deltas()
        while True:
            try:
                parts.append(next(gen))
            except StopIteration as stop:
                return "".join(parts), stop.value


@dataclass
class _Exclusive:
    fn: Callable[[Any], Any]
    future: Future[Any] = field(default_factory=Future)


class Engine:
    """The loaded model and its worker; see the module docstring."""

    def __init__(self, model_path: Path, *, n_ctx: int, threads: int, queue_size: int,
                 metrics: Metrics, template_limits: templates.TemplateLimits | None = None
                 ) -> None:
        from edgesmith.bench.runners.llama_cpp import (
            CONTEXT_DEFAULTS,
            open_llama,
            require_llama_cpp,
        )

        require_llama_cpp("server")
        import llama_cpp
        from llama_cpp import llama_vocab_is_eog

        self.model_path = Path(model_path)
        self.metrics = metrics
        t0 = time.perf_counter()
        # the header and chat templates are checked first; a refusal names llama.cpp's reason
        self.llm = open_llama(self.model_path, n_ctx=n_ctx, n_threads=threads,
                              n_threads_batch=threads, **CONTEXT_DEFAULTS)
        self.load_s = time.perf_counter() - t0
        self.n_ctx = self.llm.n_ctx()
        self.n_vocab = self.llm.n_vocab()
        vocab = self.llm._model.vocab
        self._is_eog = lambda tok: bool(llama_vocab_is_eog(vocab, tok))
        # the tokens that only special=True parses from text (llama.cpp's tokenizer_st_partition)
        parsed_special = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        self._is_control = lambda tok: bool(llama_cpp.llama_vocab_get_attr(vocab, tok)
                                            & parsed_special)
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self._add_eos = bool(llama_cpp.llama_vocab_get_add_eos(vocab))
        ids = (self.llm.token_bos(), self.llm.token_eos())
        self.template = templates.from_metadata(
            self.llm.metadata,
            {i: self.llm.detokenize([i], special=True).decode("utf-8", "replace")
             for i in ids if i >= 0}, template_limits)
        self.queue_size = queue_size
        self._queue: queue.Queue[Job | _Exclusive | None] = queue.Queue(maxsize=queue_size)
        self._busy = False
        self._avg_job_s = 1.0
        self._worker = threading.Thread(target=self._loop, name="edgesmith-engine", daemon=True)
        self._worker.start()

    # -- called from HTTP threads ---------------------------------------------------------
    def tokenize(self, text: str, special: bool) -> list[int]:
        """Tokens of ``text`` (BOS added when the model wants it; never an empty list)."""
        toks = self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=special)
        bos = self.llm.token_bos()
        if len(toks) > 1 and toks[0] == toks[1] == bos:  # the template wrote BOS too
            toks = toks[1:]
        return toks or [bos]

    def chat_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt of a chat through the model's template: special tokens are parsed in the
        template's own text, never in a message's content (chat_prompt.py). Raises the
        template's errors and ``chat_prompt.ControlTokenText``."""
        return chat_prompt.prompt_tokens(
            self.template, messages, self._raw_tokens, self._is_control,
            whole=lambda text: self.tokenize(text, special=True), finish=self._finish)

    def _raw_tokens(self, text: str, special: bool) -> list[int]:
        if not text:
            return []
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))

    def _finish(self, toks: list[int]) -> list[int]:
        """What ``tokenize`` adds around a prompt tokenized in pieces: BOS (once, if the
        template wrote it too), EOS where the vocabulary asks for it."""
        bos = self.llm.token_bos()
        if self._add_bos and not (toks and toks[0] == bos):
            toks = [bos, *toks]
        if self._add_eos:
            toks = [*toks, self.llm.token_eos()]
        return toks or [bos]

    def submit(self, prompt_tokens: list[int], params: SamplingParams,
               disconnected: Callable[[], bool] | None = None) -> Job:
        job = Job(prompt_tokens, params, disconnected)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(self.retry_after_s()) from None
        return job

    def run_exclusive(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(llama)`` on the worker thread between requests; return its result."""
        item = _Exclusive(fn)
        self._queue.put(item)
        return item.future.result()

    def queue_depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return self._queue.qsize()

    def busy(self) -> bool:
        return self._busy

    def alive(self) -> bool:
        """Whether the worker thread runs (it only stops on ``close``)."""
        return self._worker.is_alive()

    def retry_after_s(self) -> int:
        return max(1, min(120, math.ceil(self._avg_job_s * (self.queue_depth() + 1))))

    def close(self) -> None:
        """Stop the worker after the queued work; then free the model."""
        self._queue.put(None)
        self._worker.join()
        self.llm.close()

    # -- the worker thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            self._busy = True
            t0 = time.perf_counter()
            try:
                if isinstance(item, _Exclusive):
                    self._exclusive(item)
                else:
                    self._serve(item)
            finally:
                self._busy = False
                self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.perf_counter() - t0)

    def _exclusive(self, item: _Exclusive) -> None:
        try:
            item.future.set_result(item.fn(self.llm))
        except Exception as exc:  # handed to the caller, which re-raises it
            item.future.set_exception(exc)

    def _serve(self, job: Job) -> None:
        if job.cancelled:
            job.events.put(Finished("cancelled", 0, 0))
            self.metrics.record_generation(0, 0, None, None, cancelled=True)
            return
        try:
            job.events.put(self._generate(job))
        except Exception as exc:  # handed to the request, which answers 500
            log.exception("generation failed")
            job.events.put(Failed(EdgesmithError(f"generation failed: {exc}")))

    def _generate(self, job: Job) -> Finished:
        llm, p = self.llm, job.params
        llm.set_seed(p.seed if p.seed is not None else random.getrandbits(31))
        if p.seed is not None:
            # a seeded request is evaluated from an empty cache: reusing a cached prompt
            # prefix evaluates the rest in other batch shapes, and with flash attention those
            # give slightly different logits, which can change what a seed samples
            llm.reset()
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stops = StopBuffer(p.stop)
        t0 = time.perf_counter()
        t_first = t_last = 0.0
        sampled = n = 0
        finish, stop_hit = "length", False
        gen = llm.generate(job.prompt_tokens, temp=p.temperature, top_p=p.top_p, top_k=0,
                           min_p=0.0, repeat_penalty=1.0)
        try:
            for tok in gen:
                t_last = time.perf_counter()
                sampled += 1
                if sampled == 1:
                    t_first = t_last
                if self._is_eog(tok):
                    finish = "stop"
                    break
                n += 1
                text, hit = stops.push(decoder.decode(llm.detokenize([tok])))
                if text:
                    job.events.put(text)
                if hit:
                    finish, stop_hit = "stop", True
                    break
                if n >= p.max_tokens:
                    break
                if job.cancelled:
                    finish = "cancelled"
                    break
        finally:
            gen.close()
        if not stop_hit:  # text held back as a possible stop prefix, or a partial character
            tail = stops.push(decoder.decode(b"", final=True))[0] + stops.flush()
            if tail:
                job.events.put(tail)
        tps = (sampled - 1) / (t_last - t_first) if sampled > 1 and t_last > t_first else None
        self.metrics.record_generation(len(job.prompt_tokens), n,
                                       t_first - t0 if sampled else None, tps,
                                       cancelled=finish == "cancelled")
        return Finished(finish, len(job.prompt_tokens), n)
