"""MediaPipe LLM Inference's ``.task`` for a model with a SentencePiece tokenizer.

MediaPipe's ``genai.bundler`` (``mediapipe==0.10.35``, part of the ``litert`` extra) packs the
prefill/decode ``.tflite``, the SentencePiece ``tokenizer.model`` and a metadata record (start
token, stop tokens, the text put around each user and model turn) into one ``.task`` file; it
takes no HF BPE tokenizer (``tokenizer.json`` only, SmolLM2's): such a model gets the
``.litertlm`` alone. The turn affixes are read off the model's own chat template (a user turn
rendered around a marker), so the app's prompt is the one the model was trained on.

The ``.task`` is checked like the ``.litertlm``: LiteRT-LM opens ``.task`` files too, so its
greedy chat answer must equal the same ``.tflite``'s in LiteRT's interpreter.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any

from edgesmith.errors import DependencyError, ModelError

TASK_FILE = "model.task"
MARK = "\x00EDGESMITH_TURN\x00"


def sentencepiece_model(hf_dir: Path) -> Path | None:
    """The model's SentencePiece ``tokenizer.model``, or None (an HF BPE tokenizer)."""
    path = Path(hf_dir) / "tokenizer.model"
    if not path.is_file():
        return None
    import sentencepiece as spm

    try:
        spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as exc:
        raise ModelError(f"{path} is not a SentencePiece model ({exc})",
                         "remove it or replace it with the tokenizer's real tokenizer.model"
                         ) from exc
    return path


def turn_affixes(tok: Any) -> tuple[str, dict[str, str]]:
    """The start token and the text the chat template puts before and after a user turn (up to
    the model's turn), from one user message rendered around a marker. The start token is the
    BOS only where the template writes it (then it is cut from the prefix: MediaPipe writes the
    start token itself, and twice would change the answer)."""
    text = tok.apply_chat_template([{"role": "user", "content": MARK}], tokenize=False,
                                   add_generation_prompt=True)
    if not isinstance(text, str) or text.count(MARK) != 1:
        raise ModelError("the chat template does not render a user turn's text once",
                         "give the model a chat template that writes the message content")
    before, after = text.split(MARK)
    bos = str(tok.bos_token or "")
    start = ""
    if bos and before.startswith(bos):
        start, before = bos, before[len(bos):]
    return start, {"prompt_prefix_user": before, "prompt_suffix_user": after,
                   "prompt_prefix_model": "", "prompt_suffix_model": ""}


def build(tflite: Path, hf_dir: Path, dest: Path) -> dict[str, Any]:
    """``dest`` (a ``.task``) from ``tflite`` and the model's SentencePiece tokenizer; returns
    what went into its metadata."""
    from transformers import AutoTokenizer

    from edgesmith.export import litertlm

    sp = sentencepiece_model(hf_dir)
    if sp is None:
        raise ModelError(f"{hf_dir} has no SentencePiece tokenizer.model",
                         "MediaPipe's .task needs one; ship the .litertlm instead")
    try:
        from mediapipe.tasks.python.genai import bundler
    except ImportError as exc:
        raise DependencyError(f"MediaPipe's bundler is not installed ({exc})",
                              "pip install 'edgesmith[litert]'") from exc
    tok = AutoTokenizer.from_pretrained(hf_dir)
    stops = [str(tok.convert_ids_to_tokens(int(i))) for i in litertlm.stop_tokens(hf_dir, tok)]
    if tok.chat_template:
        start, affixes = turn_affixes(tok)
    else:  # plain text: the start token where the tokenizer writes one
        start, affixes = (str(tok.bos_token) if litertlm.adds_bos(tok) else ""), {}
    tmp = dest.with_name(dest.stem + ".partial.task")  # the bundler appends .task otherwise
    cfg = bundler.BundleConfig(tflite_model=str(tflite), tokenizer_model=str(sp),
                               start_token=start, stop_tokens=stops,
                               output_filename=str(tmp), **affixes)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # compress --json owns stdout
            bundler.create_bundle(cfg)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return {"start_token": start, "stop_tokens": stops, **affixes}
