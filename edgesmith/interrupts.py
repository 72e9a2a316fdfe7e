"""Ctrl-C that cannot be lost inside native code.

Python raises KeyboardInterrupt at the next bytecode after SIGINT arrives. When that
bytecode is a ctypes callback (llama-cpp-python routes every llama.cpp log line through
one while a model loads), the exception is raised *inside the callback*, where ctypes
prints it and throws it away: the run goes on as if Ctrl-C was never pressed. The CLI
therefore installs a handler that also records the interrupt, and long loops call
``check()`` after each native call, which raises KeyboardInterrupt again if one was
swallowed.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_pending = threading.Event()


def _handler(signum: int, frame: FrameType | None) -> None:
    _pending.set()
    raise KeyboardInterrupt


def install() -> None:
    """Record Ctrl-C as well as raising it; a no-op where SIGINT is ignored or customised."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _handler)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C arrived, even if native code swallowed it."""
    if _pending.is_set():
        raise KeyboardInterrupt
