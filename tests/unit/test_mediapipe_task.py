"""MediaPipe's `.task` for a model with a SentencePiece tokenizer: a tiny Llama with its own
trained SentencePiece model through the LiteRT exporter, the `.task` built by MediaPipe's bundler
and answering a chat in LiteRT-LM like the same `.tflite` in LiteRT's interpreter, carried into
the Android bundle; a BPE model gets none."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("litert_torch")
pytest.importorskip("litert_lm")
pytest.importorskip("mediapipe")

from edgesmith.context import Artifact, RunContext, make_progress
from edgesmith.errors import ModelError
from edgesmith.export import mediapipe_task
from edgesmith.export.litert import LiteRTExportConfig, LiteRTExporter

# Llama-2 style: the template writes the BOS itself
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
            "{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def spm_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama (hidden 128, 2 layers) with a 512-piece SentencePiece tokenizer trained
    here on the bundled calibration text, as transformers converts it (tokenizer.json) and as
    it is (tokenizer.model)."""
    import sentencepiece as spm
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from edgesmith.compress.imatrix import CalibrationConfig

    tmp = tmp_path_factory.mktemp("spm")
    (tmp / "text.txt").write_text(CalibrationConfig().text()[:200_000])
    # Gemma's settings: byte fallback, no normalization, no dummy prefix (so that transformers'
    # conversion of it and SentencePiece itself tokenize a prompt alike)
    spm.SentencePieceTrainer.train(
        input=str(tmp / "text.txt"), model_prefix=str(tmp / "sp"), vocab_size=512,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2)
    dest = tmp / "tiny-spm-llama"
    src = tmp / "tok"
    src.mkdir()
    shutil.copy(tmp / "sp.model", src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "legacy": False}))
    tok = AutoTokenizer.from_pretrained(src)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=[2, end])
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
        # a random model would write stray bytes (byte-fallback pieces), whose text depends on
        # how each runtime groups incomplete UTF-8: zero rows keep their (tied) logits at 0
        byte_ids = [i for i in range(512) if tok.convert_ids_to_tokens(i).startswith("<0x")]
        assert len(byte_ids) == 256
        model.get_input_embeddings().weight[byte_ids] = 0.0
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    shutil.copy(tmp / "sp.model", dest / "tokenizer.model")
    (dest / "chat_template.jinja").write_text(TEMPLATE)
    return dest


@pytest.fixture(scope="module")
def exported(spm_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    tmp = tmp_path_factory.mktemp("litert-spm")
    ctx = RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)
    cfg = LiteRTExportConfig(prefill_length=32, cache_length=256)
    return LiteRTExporter(cfg).export(spm_llama, ctx, tmp / "fp32")


def test_task_is_built_and_answers_in_litert_lm(exported: Artifact, spm_llama: Path) -> None:
    task = exported.path / mediapipe_task.TASK_FILE
    assert task.is_file() and exported.meta["task_bytes"] == task.stat().st_size
    with zipfile.ZipFile(task) as z:
        names = set(z.namelist())
        assert {"TF_LITE_PREFILL_DECODE", "TOKENIZER_MODEL", "METADATA"} <= names
        # the very .tflite and tokenizer.model, not copies of something else
        assert z.read("TOKENIZER_MODEL") == (spm_llama / "tokenizer.model").read_bytes()
        assert z.read("TF_LITE_PREFILL_DECODE") == \
            (exported.path / "model.tflite").read_bytes()
    md = exported.meta["task_metadata"]
    # the template writes the BOS: it is the start token, cut from the user prefix
    assert md["start_token"] == "<s>"
    assert md["prompt_prefix_user"] == "<|im_start|>user\n"
    assert md["prompt_suffix_user"] == "<|im_end|>\n<|im_start|>assistant\n"
    assert set(md["stop_tokens"]) == {"</s>", "<|im_end|>"}
    checks = {c["name"]: c for c in exported.meta["checks"]}
    got = checks["litert-lm chat (.task)"]
    assert got["passed"], got["detail"]
    # the .litertlm of the same model (its template writes the BOS too) answers alike
    assert checks["litert-lm chat"]["passed"], checks["litert-lm chat"]["detail"]
    # the tokenizer ships beside the model for the app, too
    assert (exported.path / "tokenizer.model").read_bytes() == \
        (spm_llama / "tokenizer.model").read_bytes()


def test_bundle_carries_the_task(exported: Artifact, tmp_path: Path) -> None:
    from edgesmith.export import bundle

    files = sorted(p.name for p in exported.path.iterdir())
    assert "model.task" in files
    side = {n: exported.path / n for n in files if n in bundle.TOKENIZER_FILES}
    info = bundle._mediapipe_task("android", side, ["model.tflite", "model.litertlm",
                                                    "model.task"])
    assert info is not None and info["built"] is True and info["path"] == "model.task"


def test_a_bpe_model_gets_no_task(tiny_llama: Path) -> None:
    assert mediapipe_task.sentencepiece_model(tiny_llama) is None
    with pytest.raises(ModelError, match="no SentencePiece"):
        mediapipe_task.build(tiny_llama / "model.tflite", tiny_llama, tiny_llama / "x.task")


def test_a_broken_tokenizer_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelError, match="not a SentencePiece model"):
        mediapipe_task.sentencepiece_model(tmp_path)
