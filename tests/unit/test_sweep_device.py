"""``sweep --device NAME=URL``: a real device server (on loopback) serving one variant of a
tiny-Llama sweep is benched through its bench endpoint; its measured speed decides the
target named NAME; the variant it does not serve gets the copy step, not an upload."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgesmith.fsutil import sha256_file
from edgesmith.sweep import core, plan

BENCH = {"prompt_tokens": 16, "gen_tokens": 8, "repeat": 1, "warmup": 0}


def variants() -> list[plan.Variant]:
    st = plan.Settings("raspberry-pi-5", {}, 2, 128, 128, 2)
    return [plan.build_variant("Q4_0", "plain", st), plan.build_variant("Q8_0", "plain", st)]


def options(out: Path, **kw: Any) -> core.SweepOptions:
    return core.SweepOptions(out, ["raspberry-pi-5"], ctx=512, jobs=1, threads=1, bench=None,
                             log=lambda m: None, **kw)


@pytest.fixture(scope="module")
def swept(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dev") / "s"
    core.sweep(str(tiny_llama), variants(), options(out))
    return out


@pytest.fixture()
def server(swept: Path) -> Iterator[str]:
    from waitress.server import create_server

    from edgesmith.device_server.app import ServerConfig, create_app

    served = next((swept / "Q8_0").glob("*.gguf"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    cfg = ServerConfig(model=str(served), api_key="k3y", threads=1, n_ctx=256)
    srv = create_server(create_app(cfg), host="127.0.0.1", port=port, threads=2)
    threading.Thread(target=srv.run, daemon=True).start()
    yield f"http://127.0.0.1:{srv.effective_port}"
    srv.close()


def test_device_benches_the_served_variant(swept: Path, server: str, tiny_llama: Path,
                                           tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("k3y\n")
    o = options(swept, devices={"raspberry-pi-5": server}, api_key_file=key)
    o.bench = dict(BENCH)
    s = core.sweep(str(tiny_llama), variants(), o)
    assert all(r["resumed"] for r in s["results"])  # nothing rebuilt for the device
    rows = {d["variant"]: d for d in s["devices"]}
    assert rows["Q8_0"]["status"] == "measured" and rows["Q8_0"]["decode_tps"] > 0
    assert rows["Q4_0"]["status"] == "not served" and rows["Q4_0"]["decode_tps"] is None
    assert "scp " in rows["Q4_0"]["copy_step"] and "127.0.0.1:models/" in rows["Q4_0"][
        "copy_step"]
    bench = json.loads((swept / rows["Q8_0"]["file"]).read_text())
    assert bench["source"] == server and bench["device"] == "raspberry-pi-5"
    assert bench["artifact"]["sha256"] == sha256_file(next((swept / "Q8_0").glob("*.gguf")))
    assert bench["settings"]["reload_each_repeat"] is False  # the server's loaded model
    rec = s["recommendations"][0]
    # the measured variant decides "fastest" (never ranked against a roofline estimate)
    assert rec["fastest"]["variant"] == "Q8_0"
    assert rec["fastest"]["speed_source"] == "measured on raspberry-pi-5"
    assert rec["fastest"]["decode_tps"] == bench["metrics"]["decode_tps"]["median"]
    assert rec["smallest"]["variant"] == "Q4_0"
