"""What llama.cpp's converter supports, read from the converter itself (not a hand table).

The converter (``convert_hf_to_gguf.py`` + its ``conversion`` package, from the sdist of the
installed llama-cpp-python) registers one model class per HF ``architectures[0]`` name, each
with its GGUF ``model_arch``; BPE tokenizers are recognised by the sha256 of the token ids of a
fixed test string (``get_vocab_base_pre``). Both are read once per llama.cpp version: the
registry by importing the converter's own modules in a subprocess (its bundled gguf-py must not
replace the installed one in this process), the hashes from its source. The result is cached.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from edgesmith.errors import ToolError
from edgesmith.export import llamacpp_src
from edgesmith.fsutil import write_json_atomic

# Run inside the converter's directory: import every text-model module the converter lazily
# loads and dump {hf_arch: gguf arch name}.
_DUMP = r"""
import json, sys, logging
logging.disable(logging.CRITICAL)
sys.path.insert(0, sys.argv[1]); sys.path.insert(1, sys.argv[1] + "/gguf-py")
import gguf, conversion
out = {}
for hf_arch, module in sorted(conversion.TEXT_MODEL_MAP.items()):
    try:
        cls = conversion.get_model_class(hf_arch)
        out[hf_arch] = {"arch": gguf.MODEL_ARCH_NAMES[cls.model_arch], "class": cls.__name__,
                        "module": module}
    except Exception as exc:  # one broken module must not hide the others
        out[hf_arch] = {"error": f"{type(exc).__name__}: {exc}", "module": module}
print(json.dumps(out))
"""


def _cache_file(name: str) -> Path:
    return llamacpp_src.source_dir().parent / name


@lru_cache(maxsize=1)
def registry() -> dict[str, dict[str, Any]]:
    """HF architecture name -> {"arch": GGUF arch name, "class", "module"} (or {"error"})."""
    cached = _cache_file("converter-registry.json")
    if cached.exists():
        return json.loads(cached.read_text())
    src = llamacpp_src.source_dir()
    proc = subprocess.run([sys.executable, "-c", _DUMP, str(src)], capture_output=True,
                          text=True, cwd=src, timeout=600)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ToolError(f"could not read llama.cpp's converter registry: {tail[0]}",
                        "reinstall llama-cpp-python (pip install 'edgesmith[gguf]')")
    data = json.loads(proc.stdout)
    write_json_atomic(cached, data)
    return data


def gguf_arch(hf_architecture: str) -> str | None:
    """The GGUF architecture llama.cpp's converter writes for ``hf_architecture``, or None."""
    entry = registry().get(hf_architecture)
    return entry.get("arch") if entry else None


def _base_py() -> Path:
    src = llamacpp_src.source_dir()
    base = src / "conversion" / "base.py"
    return base if base.exists() else src / "convert_hf_to_gguf.py"


@lru_cache(maxsize=1)
def pre_tokenizer_check() -> tuple[str, dict[str, str]]:
    """(the converter's test string, {sha256 of its token ids: llama.cpp pre-tokenizer name})."""
    text = _base_py().read_text(encoding="utf-8")
    m = re.search(r"^\s*chktxt = (.+)$", text, re.M)
    if m is None:
        raise ToolError("llama.cpp's converter has no pre-tokenizer test string",
                        "this llama-cpp-python version is not supported")
    chktxt = ast.literal_eval(m.group(1))
    hashes = dict(re.findall(r'if chkhsh == "([0-9a-f]{64})":\s*\n(?:\s*#.*\n)*\s*res = "([^"]+)"',
                             text))
    return chktxt, hashes


def tokenizer_hash(token_ids: list[int]) -> str:
    """The converter's identity of a BPE pre-tokenizer: sha256 of str(token ids)."""
    return hashlib.sha256(str(token_ids).encode()).hexdigest()
