"""Ctrl-C that arrives while native code runs a ctypes callback (as llama.cpp's log callback
does during every model load) is swallowed by ctypes; interrupts.check() must still see it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# SIGINT is delivered while C code (libc's qsort) runs a Python comparator callback: Python
# raises KeyboardInterrupt inside the callback, ctypes prints and discards it, and qsort
# returns normally.
_SCRIPT = textwrap.dedent("""
    import ctypes, ctypes.util, os, signal, sys
    from edgesmith import interrupts

    # a parent started without job control may have left SIGINT ignored: restore Python's own
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.argv[1] == "install":
        interrupts.install()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    sent = []

    def cmp(a, b):
        if not sent:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # handled at the callback's next bytecode
            sum(range(1000))
        return a[0] - b[0]

    arr = (ctypes.c_int * 8)(5, 3, 7, 1, 8, 2, 6, 4)
    try:
        libc.qsort(arr, 8, ctypes.sizeof(ctypes.c_int), CMP(cmp))
        print("qsort returned", list(arr))
        interrupts.check()
        print("interrupt lost")
    except KeyboardInterrupt:
        print("interrupt seen")
""")


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                          timeout=60)


def test_ctypes_callback_swallows_ctrl_c_without_the_handler() -> None:
    p = _run("plain")
    assert "qsort returned [1, 2, 3, 4, 5, 6, 7, 8]" in p.stdout, p.stderr
    assert "interrupt lost" in p.stdout  # the failure mode the handler exists for
    assert "KeyboardInterrupt" in p.stderr  # ctypes' "Exception ignored" report


def test_check_raises_the_swallowed_ctrl_c() -> None:
    p = _run("install")
    assert "qsort returned" in p.stdout, p.stderr
    assert "interrupt seen" in p.stdout and "interrupt lost" not in p.stdout
