"""llama.cpp's own sources, taken from the sdist of the installed llama-cpp-python.

The converter (convert_hf_to_gguf.py with its gguf-py) and, for benchmarks, llama.cpp's tools
(llama-quantize, llama-imatrix, llama-bench) come from the exact llama-cpp-python version that
runs the artifacts, so the converter, the quantizer and the runtime are always one llama.cpp.
The sdist is fetched once through pip (PyPI; pip's own cache makes it instant after the first
install) and extracted into the cache. EDGESMITH_LLAMA_CPP_SDIST=/path/to/sdist.tar.gz skips pip.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tarfile
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesmith.errors import DependencyError, ToolError
from edgesmith.fsutil import cache_root, temp_path

DIST = "llama-cpp-python"


def installed_version() -> str:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError as exc:
        raise DependencyError(
            "llama-cpp-python is not installed", "pip install 'edgesmith[gguf]'"
        ) from exc


def _fetch_sdist(version: str, dest_dir: Path) -> Path:
    local = os.environ.get("EDGESMITH_LLAMA_CPP_SDIST")
    if local:
        return Path(local)
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-q", "-d", str(dest_dir), f"{DIST}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest_dir.glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not found:
        raise ToolError(
            f"could not fetch the {DIST} {version} sdist for llama.cpp's converter: "
            f"{proc.stderr.strip().splitlines()[-1:] or 'no file'}",
            "check PyPI access, or set EDGESMITH_LLAMA_CPP_SDIST to a local sdist .tar.gz",
        )
    return found[0]


def source_dir(progress: Any = None) -> Path:
    """vendor/llama.cpp of the installed llama-cpp-python's sdist, extracted in the cache."""
    version = installed_version()
    root = cache_root() / "llama.cpp" / version
    src = root / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists() and (root / ".complete").exists():
        return src
    task = progress.add_task(f"llama.cpp {version} sources (sdist, once)", total=None) \
        if progress is not None else None  # first run only: pip download + extraction
    root.mkdir(parents=True, exist_ok=True)
    sdist = _fetch_sdist(version, root / "sdist")
    tmp = temp_path(root / "extract")  # owner-tagged: a kill -9 leaves it to the cache sweep
    tmp.mkdir()
    try:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                raise ToolError(f"{sdist} has no {prefix}", "use the official sdist")
            tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        os.replace(tmp / prefix, src)
        (root / ".complete").write_text(str(sdist))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if task is not None:
        progress.update(task, total=1, completed=1)
    return src


def convert_script(progress: Any = None) -> Path:
    return source_dir(progress) / "convert_hf_to_gguf.py"


def cpu_cmake_args() -> list[str]:
    """CMake flags for llama.cpp on this CPU: native, with AMX compiled out on x86-64.

    llama.cpp's AMX matmul crashes (SIGSEGV in ggml_backend_amx_mul_mat,
    ggml-org/llama.cpp#20824) on Sapphire Rapids machines that report AMX; the Makefile
    builds llama-cpp-python with the same flags.
    """
    args = ["-DGGML_NATIVE=ON"]
    if platform.machine() in ("x86_64", "AMD64"):
        cc = os.environ.get("CC", "cc")
        off = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
        ok = shutil.which(cc) and subprocess.run(
            [cc, *off.split(), "-x", "c", "-E", os.devnull], capture_output=True).returncode == 0
        if ok:
            args += [f"-DCMAKE_C_FLAGS={off}", f"-DCMAKE_CXX_FLAGS={off}"]
    return args


def build_tools(targets: tuple[str, ...] = ("llama-quantize", "llama-imatrix", "llama-bench"),
                jobs: int | None = None) -> Path:
    """Build llama.cpp's own tools from the same sdist (for benchmarks); returns the bin dir."""
    src = source_dir()
    flags = cpu_cmake_args()
    build = src.parent / f"build-{hashlib.sha256(' '.join(flags).encode()).hexdigest()[:12]}"
    bindir = build / "bin"
    if all((bindir / t).exists() for t in targets):
        return bindir
    if shutil.which("cmake") is None:
        raise DependencyError("cmake is needed to build llama.cpp's tools", "apt-get install cmake")
    cfg = ["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
           "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", *flags, "-DLLAMA_BUILD_TESTS=OFF",
           "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    for cmd in (cfg, ["cmake", "--build", str(build), "-j", str(jobs or os.cpu_count() or 2),
                      "--target", *targets]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise ToolError(f"building llama.cpp tools failed: {' | '.join(tail)}",
                            "see the cmake output above; install a C++ compiler and cmake")
    return bindir
