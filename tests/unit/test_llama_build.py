"""The installed llama-cpp-python is the one `make install` builds: no AMX (it crashes here,
llama.cpp#20824), and a build that has it is named with the way to rebuild."""

from __future__ import annotations

import pytest

from edgesmith.bench.runners import llama_cpp as runner


def test_installed_build_has_no_amx() -> None:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AVX" in info or "NEON" in info, info  # a real CPU feature line
    assert "AMX_INT8 = 1" not in info, "rebuild with make install (CMAKE_ARGS without AMX)"


def test_amx_build_warns_once(monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    import llama_cpp

    monkeypatch.setattr(runner, "_AMX_WARNED", False)
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: b"CPU : AMX_INT8 = 1 |")
    runner.require_llama_cpp("gguf")
    runner.require_llama_cpp("gguf")
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "-mno-amx-int8" in err and "llama.cpp#20824" in err
