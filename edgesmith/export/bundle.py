"""App asset bundles: what an Android or iOS app ships beside its code, from a compress result.

``build(result_dir, out_dir, platform)`` copies the verified model files of a ``compress``
result (``manifest.json`` lists them with their sha256; a result that does not match its
manifest is refused), the tokenizer (``tokenizer.json`` and, where the model has one, the
SentencePiece ``tokenizer.model``), the chat template and the generation defaults, and writes
``bundle.json``: every file's sha256 and size, the model's context length, the RAM it is expected
to need at that context, the quality figures and gates of the result, and the edgesmith
version. ``verify(bundle_dir)`` re-hashes every file: a changed byte, a missing or an extra
file is reported.

Android: the ``.tflite``/``.litertlm`` of the LiteRT exporter (LiteRT-LM loads the
``.litertlm``, which carries the tokenizer too) and, for a SentencePiece tokenizer, the
exporter's MediaPipe ``.task``, or a GGUF for llama.cpp; for an HF BPE tokenizer (SmolLM2's)
the bundle says why there is no ``.task`` instead of failing late. iOS: the ``.mlpackage``
(or a GGUF) in a folder Xcode adds as a resource.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgesmith import __version__
from edgesmith.errors import OutputError, ResultsError
from edgesmith.fsutil import MANIFEST, Publication, check_result_writable, verify_result

SCHEMA = "edgesmith.bundle"
BUNDLE_MANIFEST = "bundle.json"
PLATFORMS: dict[str, tuple[str, ...]] = {"android": ("litert", "gguf"), "ios": ("coreml", "gguf")}
DEFAULT_PLATFORM = {"litert": "android", "coreml": "ios"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                   "special_tokens_map.json")
GENERATION_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens",
                   "do_sample", "bos_token_id", "eos_token_id", "pad_token_id")
RUNTIME_BASE_BYTES = 150e6  # the app's runtime library and its buffers, beside the weights
# bytes per KV-cache element the runtime keeps: LiteRT's exported cache is fp32, Core ML's
# and llama.cpp's fp16
KV_BYTES = {"litert": 4, "coreml": 2, "gguf": 2}


def _result(result_dir: Path) -> dict[str, Any]:
    """The compress result's manifest, after checking that every file matches it."""
    man_path = result_dir / MANIFEST
    if not man_path.is_file():
        raise ResultsError(f"{result_dir} holds no {MANIFEST}",
                           "pass the -o folder of `edgesmith compress`")
    from edgesmith import manifest

    man = manifest.read(man_path)
    problems = verify_result(result_dir)
    if problems:
        raise ResultsError(f"{result_dir} does not match its {MANIFEST}: {problems[0]}",
                           "re-run the compress command that wrote it")
    if not man.get("artifacts"):
        raise ResultsError(f"{man_path} lists no artifact", "re-run compress")
    return man


def _platform(man: dict[str, Any], platform: str | None) -> str:
    fmt = man["artifacts"][0]["format"]
    if platform is None:
        platform = DEFAULT_PLATFORM.get(fmt)
        if platform is None:
            raise ResultsError(f"a {fmt} result has no default platform",
                               "pass --platform android or --platform ios")
    if platform not in PLATFORMS:
        raise ResultsError(f"unknown platform {platform!r}",
                           f"use one of: {', '.join(PLATFORMS)}")
    if fmt not in PLATFORMS[platform]:
        raise ResultsError(f"a {fmt} artifact does not run on {platform}",
                           f"{platform} takes {' or '.join(PLATFORMS[platform])}: compress for "
                           f"{'android-midrange' if platform == 'android' else 'iphone-15'}")
    return platform


def _model_files(man: dict[str, Any]) -> list[str]:
    """The published files of the artifact (everything but the report)."""
    return [e["path"] for e in man["files"] if e["path"] != "report.md"]


def _hf_dir(man: dict[str, Any]) -> Path | None:
    """The input model's HF directory (for the tokenizer, chat template, config), if it can be
    found again: an HF input's own path, a GGUF input's dequantized copy in the cache."""
    from edgesmith import models

    spec = man.get("input", {}).get("spec")
    if not spec:
        return None
    try:
        ref = models.resolve(spec)
        return models.as_hf_dir(ref) if ref.kind != "hf" else Path(ref.path)
    except Exception:  # the tokenizer then comes from the result only
        return None


def _side_files(result_dir: Path, hf_dir: Path | None, model_files: list[str]) -> dict[str, Path]:
    """Tokenizer and config files to ship: the result's own copies first, else the input's."""
    found: dict[str, Path] = {}
    for name in (*TOKENIZER_FILES, "config.json", "generation_config.json",
                 "chat_template.jinja"):
        for base in (result_dir, hf_dir):
            if base is not None and (base / name).is_file() and name not in model_files:
                found[name] = base / name
                break
    return found


def _chat_template(side: dict[str, Path], model: Path) -> str | None:
    """The chat template: the model folder's file, its tokenizer_config.json's, or (a GGUF)
    the one in its metadata."""
    if "chat_template.jinja" in side:
        return side["chat_template.jinja"].read_text(encoding="utf-8")
    if "tokenizer_config.json" in side:
        tpl = json.loads(side["tokenizer_config.json"].read_text(encoding="utf-8")) \
            .get("chat_template")
        if isinstance(tpl, str):
            return tpl
    if model.suffix == ".gguf":
        from edgesmith.gguf_file import read_header

        tpl = read_header(model).field("tokenizer.chat_template")
        return tpl if isinstance(tpl, str) else None
    return None


def _generation(side: dict[str, Path]) -> dict[str, Any]:
    if "generation_config.json" not in side:
        return {}
    cfg = json.loads(side["generation_config.json"].read_text(encoding="utf-8"))
    return {k: cfg[k] for k in GENERATION_KEYS if k in cfg}


def _memory(fmt: str, model_bytes: int, config: dict[str, Any], ctx: int) -> dict[str, Any]:
    """RAM the model needs at ``ctx`` tokens: weights (mapped) + KV cache + runtime."""
    from edgesmith.targets.fit import config_attention, kv_bytes_per_token

    kv = 0  # no config.json found: the weights and the runtime only
    if config:
        layers, _, kv_heads, head_dim = config_attention(config)
        kv = kv_bytes_per_token(layers, kv_heads, head_dim, KV_BYTES.get(fmt, 2)) * ctx
    return {"ctx": ctx, "weights_bytes": model_bytes, "kv_cache_bytes": kv,
            "runtime_bytes": int(RUNTIME_BASE_BYTES),
            "total_bytes": int(model_bytes + kv + RUNTIME_BASE_BYTES),
            "how": "model files + K/V cache at the context length "
                   f"({KV_BYTES.get(fmt, 2)} bytes per element) + {RUNTIME_BASE_BYTES / 1e6:.0f}"
                   " MB for the runtime"}


def _target_fit(man: dict[str, Any], total: int) -> dict[str, Any] | None:
    from edgesmith.targets import profile

    name = man.get("target")
    if not name:
        return None
    try:
        target = profile.load(name)
    except Exception:  # a result for a target this version no longer knows
        return None
    usable = target.usable_ram_bytes
    return {"target": name, "usable_ram_bytes": usable, "fits": total <= usable,
            "headroom_bytes": usable - total}


def _mediapipe_task(platform: str, side: dict[str, Path],
                    model_files: list[str]) -> dict[str, Any] | None:
    if platform != "android":
        return None
    if "model.task" in model_files:
        return {"built": True, "path": "model.task",
                "how": "MediaPipe's genai.bundler: the .tflite, the SentencePiece "
                       "tokenizer.model and the chat template's turn affixes; checked in "
                       "LiteRT-LM (checks: 'litert-lm chat (.task)')"}
    if "tokenizer.model" not in side and "tokenizer.model" not in model_files:
        return {"built": False,
                "why": "MediaPipe LLM Inference's .task bundler takes only a SentencePiece "
                       "tokenizer (tokenizer.model); this model has an HF BPE tokenizer: load "
                       "the .litertlm with LiteRT-LM instead"}
    return {"built": False,
            "why": "the compress result holds no model.task (a GGUF, or a LiteRT export made "
                   "before edgesmith built one): compress it again with the litert format"}


def build(result_dir: Path, out_dir: Path, platform: str | None = None, force: bool = False,
          ctx: int | None = None, progress: Any = None) -> dict[str, Any]:
    """Copy a compress result's model files and what the app needs beside them into
    ``out_dir``, with ``bundle.json`` (written last); returns that manifest."""
    result_dir, out_dir = Path(result_dir), Path(out_dir)
    man = _result(result_dir)
    platform = _platform(man, platform)
    if out_dir.resolve() == result_dir.resolve():
        raise OutputError("the bundle folder is the compress result itself",
                          "pass another -o folder (e.g. MyApp/assets/model/)")
    art = man["artifacts"][0]
    model_files = _model_files(man)
    side = _side_files(result_dir, _hf_dir(man), model_files)
    template = _chat_template(side, result_dir / art["path"])
    generation = _generation(side)
    config = json.loads(side["config.json"].read_text(encoding="utf-8")) \
        if "config.json" in side else {}
    trained_ctx = config.get("max_position_embeddings")
    ctx = ctx or art.get("context_length") or (min(int(trained_ctx), 4096) if trained_ctx
                                                else 2048)
    names = [*model_files, *(n for n in side if n != "chat_template.jinja")]
    if template is not None:
        names.append("chat_template.jinja")
    if generation:
        names.append("generation.json")
    check_result_writable(out_dir, names, force)
    model_bytes = sum(e["size_bytes"] for e in man["files"] if e["path"] in model_files)
    memory = _memory(art["format"], model_bytes, config, int(ctx))
    bundle: dict[str, Any] = {
        "schema": SCHEMA, "schema_version": 1, "edgesmith_version": __version__,
        "platform": platform,
        "model": {"path": art["path"], "format": art["format"], "type": art.get("type"),
                  "runtime": art.get("runtime"), "files": model_files,
                  "sha256": art.get("sha256")},
        "source": {"spec": man.get("input", {}).get("spec"),
                   "sha256": man.get("input", {}).get("sha256"),
                   "recipe": man.get("recipe", {}).get("name"),
                   "result_manifest_created": man.get("created")},
        "context_length": int(ctx), "trained_context_length": trained_ctx,
        "memory": memory, "fit": _target_fit(man, memory["total_bytes"]),
        "quality": {"reference": man.get("reference"), "artifact": art.get("quality"),
                    "verified": art.get("verified", "in its runtime"),
                    "checks": art.get("checks", []), "gates": man.get("gates")},
        "tokenizer": {"files": [n for n in side if n in TOKENIZER_FILES],
                      "sentencepiece": "tokenizer.model" in side},
        "chat_template": "chat_template.jinja" if template is not None else None,
        "generation": "generation.json" if generation else None,
        "mediapipe_task": _mediapipe_task(platform, side, model_files),
    }
    with Publication(out_dir, names, force, manifest=BUNDLE_MANIFEST) as pub:
        for name in model_files:
            pub.copy(result_dir / name, name, progress)
        for name, src in side.items():
            if name != "chat_template.jinja":
                pub.copy(src, name)
        if template is not None:
            pub.write_text("chat_template.jinja", template)
        if generation:
            pub.write_text("generation.json", json.dumps(generation, indent=2) + "\n")
        return pub.commit(bundle)


def verify(bundle_dir: Path) -> dict[str, Any]:
    """Re-hash every file of a bundle against ``bundle.json``; also flag files it does not
    list. Returns ``{"ok": bool, "problems": [...], "files": n}``."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / BUNDLE_MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{bundle_dir} holds no {BUNDLE_MANIFEST}",
                           "pass a folder written by `edgesmith bundle`") from None
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path} is unreadable: {exc}", "rebuild the bundle") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"{path} is not an edgesmith bundle manifest",
                           "pass a folder written by `edgesmith bundle`")
    problems = verify_result(bundle_dir, BUNDLE_MANIFEST)
    listed = {e.get("path") for e in data.get("files", []) if isinstance(e, dict)}
    for f in sorted(bundle_dir.rglob("*")):
        rel = f.relative_to(bundle_dir).as_posix()
        if f.is_file() and rel != BUNDLE_MANIFEST and rel not in listed:
            problems.append(f"{rel} is not listed in {BUNDLE_MANIFEST}")
    return {"ok": not problems, "problems": problems, "files": len(listed)}
