"""`edgesmith doctor`: what will and will not work for a model, before any heavy work.

Reads headers only (config.json, the safetensors headers, the tokenizer files, a GGUF's header)
and answers, per target format: can the architecture be converted, does every layer's width
suit the recipe's block or group sizes, does it fit the target's RAM at the context, which
tokenizer and chat template it has, and what is missing. ``compress`` runs the same checks
first and stops with the first failing line.
"""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgesmith import models
from edgesmith.errors import EdgesmithError, ModelError

# llama.cpp's k-quant super-block: a row whose length is not a multiple of it cannot be stored
# in that type, and llama.cpp's quantizer falls back (src/llama-quant.cpp) to these types.
QK_K = 256
K_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# Formats an exporter exists for in this version; the others are reported, not guessed.
EXPORTER_FORMATS = {"gguf", "onnx", "litert", "coreml"}
# formats whose exporter module has its own ``doctor_checks(ref)`` (imported when needed: the
# module's heavy dependencies are not, it only says whether they are installed)
FORMAT_CHECKS = {"litert": "edgesmith.export.litert", "coreml": "edgesmith.export.coreml"}
STATUS_ORDER = {"fail": 0, "warn": 1, "ok": 2, "info": 3}


@dataclass
class Check:
    section: str  # "model", or a format: "gguf", "onnx", ...
    name: str
    status: str  # ok | warn | fail | info
    detail: str
    fix: str = ""

    def line(self) -> str:
        fix = f" (fix: {self.fix})" if self.fix and self.status == "fail" else ""
        return f"doctor: {self.section} {self.name}: {self.detail}{fix}"


@dataclass
class Report:
    model: str
    target: str | None
    recipe: str | None
    ctx: int
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if c.status == "fail"]

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "target": self.target, "recipe": self.recipe,
                "ctx": self.ctx, "ok": not self.failures, "seconds": round(self.seconds, 3),
                "checks": [asdict(c) for c in self.checks]}


# ----------------------------------------------------------------------------- headers


def _safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from every shard's header (no weights are read)."""
    shapes: dict[str, list[int]] = {}
    for shard in sorted(path.glob("*.safetensors")):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__" and isinstance(meta, dict):
                shapes[name] = [int(d) for d in meta.get("shape", [])]
    return shapes


@dataclass
class _Linear:
    name: str  # module name, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int


def _linears(shapes: dict[str, list[int]]) -> list[_Linear]:
    """The 2-D weights a quantizer takes (embeddings excluded; a head is a linear)."""
    out = []
    for name, shape in shapes.items():
        if not name.endswith(".weight") or len(shape) != 2:
            continue
        base = name[: -len(".weight")]
        if "embed" in base.split(".")[-1] or base.endswith(("wte", "wpe")):
            continue
        out.append(_Linear(base, shape[1], shape[0]))
    return out


def _group(names: Iterable[str]) -> str:
    """model.layers.3.mlp.up_proj, ... -> 'mlp.up_proj (30 layers)' summaries."""
    kinds: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(p for p in parts if not p.isdigit() and p not in ("model", "layers"))
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{k} x{v}" if v > 1 else k for k, v in sorted(kinds.items()))


# ----------------------------------------------------------------------------- checks


def _recipe_types(recipe: Any) -> tuple[list[str], list[tuple[str, int]]]:
    """(GGUF quant types the recipe asks for, [(pass name, group size)] of grouped passes)."""
    qtypes, groups = [], []
    if recipe is None:
        return ["Q4_K_M"], []
    for s in recipe.steps:
        t = getattr(s.config, "type", None)
        if s.kind == "format" and isinstance(t, str):
            qtypes.append(t)
        g = getattr(s.config, "group_size", None)
        if s.kind == "torch" and isinstance(g, int) and g > 0:
            groups.append((s.name, g))
    return qtypes, groups


def _kquant_widths(linears: list[_Linear], qtypes: list[str]) -> list[Check]:
    ks = [t for t in qtypes if "_K" in t]
    if not ks:
        return []
    odd = [lin for lin in linears if lin.in_features % QK_K]
    if not odd:
        return [Check("gguf", "k-quant rows", "ok",
                      f"every weight row is a multiple of {QK_K} "
                      f"({', '.join(ks)} stored as asked)")]
    widths = sorted({lin.in_features for lin in odd})
    # a mix (_S/_M/_L) also stores some tensors as Q6_K
    wanted = {k for k in K_FALLBACK for t in ks if t.startswith(k)} | (
        {"Q6_K"} if any(t[-2:] in ("_S", "_M", "_L") for t in ks) else set())
    falls = [f"{k}->{K_FALLBACK[k]}" for k in sorted(wanted)]
    return [Check(
        "gguf", "k-quant rows", "warn",
        f"{len(odd)} of {len(linears)} weight tensors have rows of {widths} values, not a "
        f"multiple of {QK_K}: llama.cpp falls back ({', '.join(falls)}) "
        f"for them (a larger file than the type's name suggests): "
        f"{_group(lin.name for lin in odd)}")]


def _group_sizes(linears: list[_Linear], groups: list[tuple[str, int]]) -> list[Check]:
    out = []
    for pass_name, g in groups:
        bad = [lin for lin in linears if lin.in_features % g]
        if not bad:
            out.append(Check("gguf", f"{pass_name} groups", "ok",
                             f"every layer's input width is a multiple of group_size {g}"))
            continue
        ok_sizes = [s for s in (32, 64, 128) if all(lin.in_features % s == 0 for lin in linears)]
        first = bad[0]
        out.append(Check(
            "gguf", f"{pass_name} groups", "fail",
            f"{first.name} has {first.in_features} inputs, not a multiple of group_size {g} "
            f"({len(bad)} layers like it)",
            f"use group_size {' or '.join(map(str, ok_sizes))}" if ok_sizes
            else "use a per-channel group (group_size: -1) or another method"))
    return out


def _converter(arch: str) -> Check:
    from edgesmith.export import converter_info

    try:
        entry = converter_info.registry().get(arch)
    except EdgesmithError as exc:
        return Check("gguf", "converter", "fail", exc.message, exc.hint)
    if entry is None:
        return Check("gguf", "converter", "fail",
                     f"llama.cpp's converter has no class for {arch}",
                     "use a model whose architecture llama.cpp supports")
    if "error" in entry:
        return Check("gguf", "converter", "fail",
                     f"llama.cpp's converter module for {arch} fails to load: {entry['error']}",
                     "report it; another llama-cpp-python version may convert it")
    return Check("gguf", "converter", "ok",
                 f"llama.cpp's {entry['class']} converts {arch} to GGUF arch '{entry['arch']}'")


def _tokenizer(path: Path) -> list[Check]:
    tj, tm = path / "tokenizer.json", path / "tokenizer.model"
    if not tj.exists() and not tm.exists():
        return [Check("gguf", "tokenizer", "fail", "no tokenizer.json or tokenizer.model",
                      "add the model's tokenizer files to the directory")]
    kind = "SentencePiece (tokenizer.model)" if tm.exists() else "?"
    if tj.exists():
        try:
            tok_model = json.loads(tj.read_text(encoding="utf-8")).get("model", {})
            kind = f"{tok_model.get('type', '?')} (tokenizer.json)" + (
                " + tokenizer.model" if tm.exists() else "")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
            return [Check("gguf", "tokenizer", "fail", f"tokenizer.json is not valid JSON: {exc}",
                          "repair or re-download tokenizer.json")]
    checks = [Check("gguf", "tokenizer", "info", kind)]
    if tj.exists() and kind.startswith("BPE") and not tm.exists():
        checks.append(_pre_tokenizer(path))
    return checks


def _pre_tokenizer(path: Path) -> Check:
    """llama.cpp's converter refuses a BPE tokenizer whose pre-tokenizer it cannot identify."""
    from edgesmith.export import converter_info

    try:
        chktxt, known = converter_info.pre_tokenizer_check()
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        h = converter_info.tokenizer_hash(tok.encode(chktxt))
    except EdgesmithError as exc:
        return Check("gguf", "pre-tokenizer", "warn", f"not checked: {exc.message}")
    except Exception as exc:  # a tokenizer transformers cannot load fails the conversion too
        return Check("gguf", "pre-tokenizer", "fail",
                     f"transformers cannot load the tokenizer: {type(exc).__name__}: {exc}",
                     "repair the tokenizer files")
    if h in known:
        return Check("gguf", "pre-tokenizer", "ok",
                     f"llama.cpp recognises the BPE pre-tokenizer as '{known[h]}'")
    return Check("gguf", "pre-tokenizer", "fail",
                 f"llama.cpp's converter does not recognise this BPE pre-tokenizer "
                 f"(hash {h[:12]}...), so conversion would stop",
                 "use the model's original tokenizer files; a retrained or modified vocabulary "
                 "needs support in llama.cpp's convert_hf_to_gguf_update.py")


def _chat_template(source: str | None, where: str) -> Check:
    if not source:
        return Check("model", "chat template", "warn",
                     f"none in {where}: chat requests need a template",
                     "add chat_template to tokenizer_config.json")
    from edgesmith.device_server.templates import ChatTemplate

    try:
        ChatTemplate(source)
    except EdgesmithError as exc:
        return Check("model", "chat template", "warn",
                     f"does not compile in the sandbox: {exc.message}",
                     "fix the template; completions still work")
    return Check("model", "chat template", "ok", f"compiles in the sandbox ({where})")


def _hf_chat_template(path: Path) -> str | None:
    jinja = path / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8", errors="replace")
    cfg = path / "tokenizer_config.json"
    if cfg.exists():
        try:
            t = json.loads(cfg.read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            return None
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if isinstance(x, dict)
                      and x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def _fit(ref: models.ModelRef, target: Any, ctx: int, quant: str | None) -> Check:
    from edgesmith.targets import fit

    try:
        q = quant if quant in fit.BITS_PER_WEIGHT else None
        rep = fit.estimate(ref, target, ctx, None if ref.kind == "gguf" else (q or "Q4_K_M"))
    except (KeyError, ValueError, TypeError, StopIteration) as exc:
        return Check("gguf", "fits RAM", "warn", f"not estimated: {exc}")
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    detail = (f"{mb(rep.total_bytes)} needed at ctx {ctx} ({rep.quant}) of "
              f"{mb(rep.usable_ram_bytes)} usable on {target.name}; largest ctx that fits "
              f"{rep.max_ctx_that_fits:,}")
    if not rep.fits:
        return Check("gguf", "fits RAM", "fail", detail,
                     "use a smaller quantization, a shorter context or a bigger device")
    if rep.ctx_beyond_model:
        return Check("gguf", "fits RAM", "warn",
                     detail + f"; ctx is beyond the model's trained {rep.model_ctx_limit:,}")
    return Check("gguf", "fits RAM", "ok", detail)


def _llama_cpp_quirks(path: Path, arch: str) -> list[Check]:
    """What llama.cpp does differently from transformers for some architectures, found while
    testing each one (tests/unit/test_architectures.py): checked on config.json/tokenizer."""
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return []
    out: list[Check] = []
    if arch.startswith("Gemma2") or arch.startswith("Gemma3"):
        head = cfg.get("head_dim") or (cfg.get("hidden_size", 0) // max(1, cfg.get(
            "num_attention_heads", 1)))
        q = cfg.get("query_pre_attn_scalar")
        if q is not None and head and q != head:
            out.append(Check(
                "gguf", "attention scale", "warn",
                f"query_pre_attn_scalar {q} differs from head_dim {head}: llama.cpp scales "
                f"attention by 1/sqrt(head_dim) for this architecture, so the GGUF's logits "
                f"differ from transformers' (the F16 baseline's KLD shows by how much)"))
    if arch.startswith("Phi3"):
        cfg_tok = path / "tokenizer_config.json"
        try:
            tok_cfg = json.loads(cfg_tok.read_text(encoding="utf-8")) if cfg_tok.exists() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            tok_cfg = {}
        if not isinstance(tok_cfg, dict) or "tokenizer_class" not in tok_cfg:
            out.append(Check("gguf", "phi3 tokenizer", "fail",
                             "tokenizer_config.json has no tokenizer_class, which llama.cpp's "
                             "Phi-3 converter reads", "add the model's tokenizer_config.json"))
        vocab = _vocab(path)
        needed = ["<unk>", "<s>", "</s>", "<|endoftext|>"]
        if vocab is not None and (missing := [t for t in needed if t not in vocab]):
            out.append(Check("gguf", "phi3 tokenizer", "fail",
                             f"the vocabulary lacks {', '.join(missing)}, which llama.cpp looks "
                             "up in every phi3 model (it fails to load: unordered_map::at)",
                             "use the model's original tokenizer"))
    return out


def _vocab(path: Path) -> set[str] | None:
    tj = path / "tokenizer.json"
    if not tj.exists():
        return None
    try:
        data = json.loads(tj.read_text(encoding="utf-8"))
        vocab = data.get("model", {}).get("vocab", {})
        names = set(vocab) if isinstance(vocab, dict) else {v[0] for v in vocab
                                                               if isinstance(v, list) and v}
        names |= {t.get("content") for t in data.get("added_tokens", []) if isinstance(t, dict)}
        return {n for n in names if isinstance(n, str)}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError):
        return None


def _runtime() -> Check:
    if importlib.util.find_spec("llama_cpp") is None:
        return Check("gguf", "runtime", "fail", "llama-cpp-python is not installed",
                     "pip install 'edgesmith[gguf]'")
    from edgesmith.export import llamacpp_src

    return Check("gguf", "runtime", "ok", f"llama-cpp-python {llamacpp_src.installed_version()}")


# ----------------------------------------------------------------------------- run


def _formats(target: Any) -> list[str]:
    return list(target.formats) if target is not None else ["gguf"]


def run(spec: str, target_name: str | None = None, recipe: Any = None, ctx: int = 4096,
        allow_pickle: bool = False, ref: models.ModelRef | None = None) -> Report:
    """All checks for model ``spec`` (with a target and/or a parsed Recipe)."""
    from edgesmith.targets import profile

    t0 = time.perf_counter()
    if recipe is not None and target_name is None:
        target_name = recipe.model.target
    target = profile.load(target_name) if target_name else None
    rep = Report(spec, target_name, getattr(recipe, "name", None), ctx)
    ref = ref or models.resolve(spec, allow_pickle=allow_pickle)
    qtypes, groups = _recipe_types(recipe)
    arch = ref.architecture()
    rep.checks.append(Check("model", "architecture", "info",
                            f"{arch} ({ref.kind} {'file' if ref.kind == 'gguf' else 'dir'})"))
    shapes: dict[str, list[int]] = {}
    if ref.kind == "hf":
        shapes = _safetensors_shapes(ref.path)
        linears = _linears(shapes)
        n_params = sum(_prod(s) for s in shapes.values())
        rep.checks.append(Check("model", "parameters", "info",
                                f"{n_params / 1e6:,.1f} M in {len(shapes)} tensors"))
        rep.checks.append(_chat_template(_hf_chat_template(ref.path), "tokenizer_config.json"))
    else:
        from edgesmith.gguf_file import read_header

        header = read_header(ref.path)
        linears = [_Linear(t.name.removesuffix(".weight"), int(t.shape[0]), int(t.shape[1]))
                   for t in header.tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]
        rep.checks.append(Check("model", "parameters", "info",
                                f"{sum(t.n_elements for t in header.tensors) / 1e6:,.1f} M in "
                                f"{len(header.tensors)} tensors"))
        src = header.field("tokenizer.chat_template")
        rep.checks.append(_chat_template(src if isinstance(src, str) else None, "GGUF metadata"))
    for fmt in _formats(target):
        if fmt == "onnx":
            from edgesmith import doctor_onnx

            rep.checks.extend(doctor_onnx.checks(ref, target, shapes if ref.kind == "hf"
                                                 else None))
            rep.checks.extend(_group_sizes(linears, groups))
            continue
        if fmt in FORMAT_CHECKS:
            import importlib

            rep.checks.extend(importlib.import_module(FORMAT_CHECKS[fmt]).doctor_checks(ref))
            continue
        if fmt not in EXPORTER_FORMATS:
            rep.checks.append(Check(fmt, "exporter", "fail",
                                    f"edgesmith has no {fmt} exporter in this version",
                                    f"choose a target whose format is one of "
                                    f"{', '.join(sorted(EXPORTER_FORMATS))}"))
            continue
        rep.checks.append(_runtime())
        if ref.kind == "hf":
            rep.checks.append(_converter(arch))
            rep.checks.extend(_tokenizer(ref.path))
            rep.checks.extend(_llama_cpp_quirks(ref.path, arch))
        rep.checks.extend(_kquant_widths(linears, qtypes))
        rep.checks.extend(_group_sizes(linears, groups))
        if target is not None:
            rep.checks.append(_fit(ref, target, ctx, qtypes[-1] if qtypes else None))
    rep.seconds = time.perf_counter() - t0
    return rep


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def preflight(spec: str, recipe: Any, ref: models.ModelRef, ctx: int = 4096) -> Report:
    """The doctor's checks before ``compress``: the first failure stops the run at once."""
    rep = run(spec, recipe=recipe, ctx=ctx, ref=ref)
    if rep.failures:
        first = rep.failures[0]
        raise ModelError(first.line().removeprefix("doctor: "),
                         (first.fix + "; " if first.fix else "") + f"see `edgesmith doctor {spec}"
                         f"{' --recipe ' + str(recipe.source) if recipe.source else ''}`")
    return rep


def render(rep: Report, console: Any) -> None:
    """One table per section (the model, then each target format)."""
    from rich.table import Table

    style = {"ok": "green", "warn": "yellow", "fail": "bold red", "info": "cyan"}
    sections: dict[str, list[Check]] = {}
    for c in rep.checks:
        sections.setdefault(c.section, []).append(c)
    for section, checks in sections.items():
        title = "model" if section == "model" else f"format {section}"
        table = Table(title=f"{title} — {rep.model}" + (f" on {rep.target}" if rep.target else ""),
                      title_justify="left", show_lines=False)
        table.add_column("check")
        table.add_column("status")
        table.add_column("detail", overflow="fold")
        for c in checks:
            detail = c.detail + (f"\n[dim]fix: {c.fix}[/dim]" if c.fix and c.status == "fail"
                                 else "")
            table.add_row(c.name, f"[{style[c.status]}]{c.status}[/]", detail)
        console.print(table)
    verdict = "[bold red]will not work[/]" if rep.failures else "[green]ready[/]"
    console.print(f"{verdict} ({len(rep.failures)} failing checks, {rep.seconds:.1f} s)")
