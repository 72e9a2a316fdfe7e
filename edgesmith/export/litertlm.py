"""The ``.litertlm`` package LiteRT-LM loads, and its check in LiteRT-LM's own runtime.

The package holds the ``.tflite`` (prefill + decode), the HF tokenizer and an ``LlmMetadata``
(start token, stop tokens, chat template, context length, sampler). We write the metadata
ourselves instead of ``litert_torch``'s ``litert_lm_builder`` defaults, fixing two bugs the chat
check found on SmolLM2:

- the start token: LiteRT-LM prepends ``start_token`` to every prompt. litert_torch sets it to
  the tokenizer's ``bos_token`` whenever one exists, but SmolLM2's tokenizer never prepends its
  BOS (``<|im_start|>``, which its chat template already writes), so the prompt began with
  ``<|im_start|><|im_start|>`` and the answer went astray. We set it only when the HF tokenizer
  itself prepends BOS (``tok("a", add_special_tokens=True)`` starts with it).
- the chat template: LiteRT-LM's Jinja passes a message's ``content`` as a list of parts
  (``[{"type": "text", "text": ...}]``), and a template that concatenates strings
  (``'<|im_start|>' + message['content']``) fails there. ``tolerant_template`` rewrites every
  ``X['content']`` / ``X.content`` into a macro call that accepts a string or a list of parts.

``chat_check`` runs a greedy chat answer through LiteRT-LM's conversation API
(``litert_lm.Engine``) and compares it with the greedy answer of the same ``.tflite`` in LiteRT's
interpreter, fed the tokens the HF chat template gives: only the packaging (start token, template,
stop tokens, tokenizer) can make the two differ. transformers' fp32 answer is recorded beside
them: an int8 model may fork from it legitimately (SmolLM2 int8 says "Paris, France." where fp32
says "Paris."), so it is not what the check compares.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgesmith.errors import DependencyError

FIXES = ["start token only when the HF tokenizer prepends BOS itself",
         "chat template reads message content as a string or a list of parts"]
# greedy, explicitly: top-p with k 1 (LiteRT-LM 0.18's CPU sampler implements neither GREEDY
# nor TOP_K: "Sampler type ... not implemented yet"); an app may set its own sampler
SAMPLER: str | None = "TOP_P"
CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 48
# what chat_check compares (2: the same .tflite in the interpreter, not transformers;
# 3: a SentencePiece model's .task is built and checked too)
CHECK_VERSION = 3

_MACRO = ("{%- macro _es_text(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
          "{%- for p in c -%}{%- if p is string -%}{{ p }}{%- elif p['text'] is defined -%}"
          "{{ p['text'] }}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}")
# message['content'], messages[0]['content'], m.content (not already inside the macro)
_CONTENT = re.compile(r"""(?<![\w.])([A-Za-z_]\w*(?:\[\d+\])?)"""
                      r"""(?:\[\s*['"]content['"]\s*\]|\.content\b)""")


def tolerant_template(template: str) -> str:
    """The chat template with each message content read through a macro that takes a string
    or a list of text parts (LiteRT-LM's form)."""
    if "_es_text(" in template:
        return template
    body = _CONTENT.sub(lambda m: f"_es_text({m.group(1)}['content'])", template)
    # `X['content'] is string` tests and `is defined` tests must see the raw value
    body = re.sub(r"_es_text\(([^()]+)\)(\s+is\s+(?:not\s+)?(?:string|defined|none|mapping"
                  r"|iterable|sequence))", r"\1\2", body)
    return _MACRO + body


def adds_bos(tok: Any) -> bool:
    """Does the HF tokenizer itself prepend its BOS token (then LiteRT-LM must too)?"""
    if tok.bos_token_id is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def stop_tokens(hf_dir: Path, tok: Any) -> list[int]:
    from transformers import GenerationConfig

    ids: set[int] = set()
    try:
        eos = GenerationConfig.from_pretrained(hf_dir).eos_token_id
    except OSError:
        eos = None
    for e in (eos if isinstance(eos, list) else [eos]):
        if isinstance(e, int):
            ids.add(e)
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    return sorted(ids)


def metadata(hf_dir: Path, tok: Any, context_length: int) -> bytes:
    """The LlmMetadata proto: start token (only if the tokenizer adds one), stop tokens, the
    tolerant Jinja chat template, greedy sampling (an app may override it), the context
    length."""
    from litert_lm_builder.runtime.proto import (
        llm_metadata_pb2,
        llm_model_type_pb2,
        sampler_params_pb2,
    )

    md = llm_metadata_pb2.LlmMetadata()
    if adds_bos(tok):
        md.start_token.token_ids.ids.append(int(tok.bos_token_id))
    for t in stop_tokens(hf_dir, tok):
        md.stop_tokens.add().token_ids.ids.append(t)
    if tok.chat_template:
        md.jinja_prompt_template = tolerant_template(str(tok.chat_template))
    if SAMPLER is not None:
        sp = md.sampler_params
        sp.type = getattr(sampler_params_pb2.SamplerParameters, SAMPLER)
        sp.k = 1
        sp.p = 0.0
        sp.temperature = 1.0
    md.max_num_tokens = context_length
    md.llm_model_type.CopyFrom(
        llm_model_type_pb2.LlmModelType(generic_model=llm_model_type_pb2.GenericModel()))
    return md.SerializeToString()


def package(tflite: Path, hf_dir: Path, dest: Path, context_length: int) -> None:
    """Write ``dest`` (.litertlm): the model, the HF tokenizer.json and the metadata."""
    import litert_lm_builder as litertlm_builder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    md_file = dest.with_name(dest.name + ".metadata.pb")
    md_file.write_bytes(metadata(hf_dir, tok, context_length))
    try:
        builder = litertlm_builder.LitertLmFileBuilder()
        builder.add_system_metadata(litertlm_builder.Metadata(
            key="Authors", value="edgesmith", dtype=litertlm_builder.DType.STRING))
        builder.add_llm_metadata(str(md_file))
        builder.add_hf_tokenizer(str(hf_dir / "tokenizer.json"))
        builder.add_tflite_model(str(tflite), litertlm_builder.TfLiteModelType.PREFILL_DECODE)
        with open(dest, "wb") as f:
            builder.build(f)
    finally:
        md_file.unlink(missing_ok=True)


def transformers_answer(hf_dir: Path, messages: list[dict[str, Any]]) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return str(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()


def litert_lm_answer(litertlm: Path, messages: list[dict[str, Any]]) -> str:
    """The greedy answer of LiteRT-LM's conversation API (its own runtime, CPU)."""
    try:
        import litert_lm
    except ImportError as exc:
        raise DependencyError(f"LiteRT-LM is not installed ({exc})",
                              "pip install 'edgesmith[litert]'") from exc
    import tempfile

    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    # its XNNPACK weight cache goes to a scratch dir, not beside the model (the published folder)
    with tempfile.TemporaryDirectory(prefix="litert-lm-") as scratch:
        engine = litert_lm.Engine(str(litertlm), cache_dir=scratch)
        with engine, engine.create_conversation() as conv:
            reply = conv.send_message(messages[-1]["content"],
                                      max_output_tokens=MAX_NEW_TOKENS)
    content = reply.get("content") if isinstance(reply, dict) else reply
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content).strip()


def interpreter_answer(tflite: Path, hf_dir: Path, messages: list[dict[str, Any]]) -> str:
    """The greedy answer of ``tflite`` in LiteRT's interpreter, prompted with the HF tokenizer's
    chat template, up to the first stop token (what LiteRT-LM should reproduce)."""
    from transformers import AutoTokenizer

    from edgesmith.bench.runners.litert import LiteRTSession

    tok = AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                  return_dict=True)["input_ids"]
    stops = set(stop_tokens(hf_dir, tok))
    sess = LiteRTSession(tflite)
    try:
        n = min(MAX_NEW_TOKENS, sess.cache_len - len(ids))
        toks = sess.generate([int(t) for t in ids], n).generated_tokens
    finally:
        sess.close()
    cut = next((i for i, t in enumerate(toks) if t in stops), len(toks))
    return str(tok.decode(toks[:cut], skip_special_tokens=True)).strip()


def chat_checks(packages: dict[str, Path], hf_dir: Path, tflite: Path) -> list[dict[str, Any]]:
    """One {"name", "passed", "detail"} per package (check name -> a ``.litertlm`` or ``.task``
    packing ``tflite``): LiteRT-LM's greedy chat answer equals the greedy answer of ``tflite``
    in LiteRT's interpreter on the HF chat template's tokens (compared over the shorter of the
    two: the reference stops at MAX_NEW_TOKENS). transformers' fp32 answer is in ``detail`` and
    ``matches_transformers``. The two reference answers are computed once for all packages."""
    from transformers import AutoTokenizer

    if not AutoTokenizer.from_pretrained(hf_dir).chat_template:
        return [{"name": name, "passed": False, "skipped": True,
                 "detail": "the model has no chat template: LiteRT-LM's conversation API needs "
                           "one (add chat_template.jinja to the model)"} for name in packages]
    want = interpreter_answer(tflite, hf_dir, CHECK_MESSAGES)
    fp32 = transformers_answer(hf_dir, CHECK_MESSAGES)

    def same(a: str, b: str) -> bool:
        n = min(len(a), len(b))
        return bool(a) and bool(b) and a[:n] == b[:n]

    checks = []
    for name, package in packages.items():
        try:
            got = litert_lm_answer(package, CHECK_MESSAGES)
        except DependencyError:
            raise
        except Exception as exc:  # LiteRT-LM raises RuntimeError with its status text
            checks.append({"name": name, "passed": False,
                           "detail": f"LiteRT-LM failed: {str(exc).splitlines()[0][:300]}"})
            continue
        checks.append({
            "name": name, "passed": same(got, want), "matches_transformers": same(got, fp32),
            "detail": f"asked {CHECK_MESSAGES[-1]['content']!r}: LiteRT-LM answered "
                      f"{got[:160]!r}, the same .tflite in LiteRT's interpreter {want[:160]!r}, "
                      f"transformers (fp32, greedy) {fp32[:160]!r}"})
    return checks


def chat_check(litertlm: Path, hf_dir: Path, tflite: Path) -> dict[str, Any]:
    """chat_checks for one ``.litertlm``."""
    return chat_checks({"litert-lm chat": litertlm}, hf_dir, tflite)[0]
