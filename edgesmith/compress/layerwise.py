"""Layer-by-layer passes (GPTQ, later SparseGPT): one decoder layer in memory at a time.

A pass that changes a decoder layer given the inputs it sees (``LayerPass.process``) runs here:

1. the inputs of the first layer are captured by running the model's top (embeddings, rotary
   position embeddings, the attention mask) on the calibration chunks, with a stand-in for
   layer 0 that records what it is called with and stops the forward;
2. each layer is loaded (memory-mapped safetensors, cast to fp32 on the pass's device, or taken
   from an in-memory model), handed to the pass with its inputs, run on them to make the next
   layer's inputs, handed to a sink (a checkpoint writer, or back into the model), and dropped.

Only the calibration activations (samples x seq_len x hidden) live between layers, so memory
does not grow with depth: a model larger than RAM can be processed. Progress is one step per
layer through ``ctx.progress``.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from edgesmith.errors import ModelError


class _Captured(Exception):
    """Raised by the stand-in for layer 0 once it has its inputs."""


@dataclass
class LayerInputs:
    """What every decoder layer is called with: hidden states per batch + shared kwargs."""

    hidden: list[torch.Tensor]  # [batch, seq, hidden] each
    kwargs: dict[str, Any] = field(default_factory=dict)

    def run(self, layer: torch.nn.Module) -> list[torch.Tensor]:
        """The layer's outputs on every batch (the next layer's inputs)."""
        outs = []
        with torch.inference_mode():
            for h in self.hidden:
                out = layer(h, **self.kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


class _Stop(Exception):
    """Ends a layer's forward once the inputs wanted have been seen."""


def collect(layer: torch.nn.Module, inputs: LayerInputs, modules: dict[str, torch.nn.Module],
            on_input: Callable[[str, torch.Tensor], None], stop: bool = False) -> None:
    """Run ``layer`` on every batch, calling ``on_input(name, x)`` with each of ``modules``'
    inputs; with ``stop``, the forward ends right after the last of them (the rest of the
    layer is not computed)."""
    left: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: Any, args: tuple[Any, ...]) -> None:
            on_input(name, args[0])
            left.discard(name)
            if stop and not left:
                raise _Stop
        return fn

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.inference_mode():
            for h in inputs.hidden:
                left.update(modules)
                with contextlib.suppress(_Stop):
                    layer(h, **inputs.kwargs)
    finally:
        for hk in hooks:
            hk.remove()


class LayerPass(Protocol):
    def process(self, index: int, prefix: str, layer: torch.nn.Module,
                inputs: LayerInputs) -> None:
        """Change ``layer`` (module name ``prefix``, e.g. ``model.layers.3``) in place."""


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda was asked for, but torch sees no CUDA GPU",
                         "use device: auto or cpu")
    return torch.device(device)


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The ModuleList of decoder layers and its name (``model.layers`` for Llama/Qwen2)."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name.endswith(
                ("layers", "h", "blocks")):
            return name, mod
    raise ModelError(f"cannot find the decoder layers of {type(model).__name__}",
                     "layer-by-layer passes support Llama-like decoder models")


def calibration_batches(tokenizer: Any, text: str, samples: int, seq_len: int,
                        batch_size: int) -> list[torch.Tensor]:
    """Consecutive ``seq_len``-token chunks of ``text`` (at most ``samples``), in batches."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    n = min(samples, len(ids) // seq_len)
    if n < 1:
        raise ModelError(f"calibration text has {len(ids)} tokens, less than one chunk of "
                         f"{seq_len}", "use a longer calibration text or a smaller seq_len")
    chunks = torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)
    return list(chunks.split(batch_size))


def capture(top: torch.nn.Module, layers: torch.nn.ModuleList, batches: list[torch.Tensor],
            device: torch.device) -> LayerInputs:
    """Run the model's top on ``batches`` and record the inputs of layer 0."""
    seen: dict[str, Any] = {"hidden": []}

    class Catcher(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.attention_type = getattr(inner, "attention_type", "full_attention")

        def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if args:
                raise ModelError("a decoder layer was called with positional arguments",
                                 "layer-by-layer passes support Llama-like decoder models")
            seen["hidden"].append(hidden.detach())
            seen["kwargs"] = kwargs
            raise _Captured

    first = layers[0]
    layers[0] = Catcher(first)
    try:
        with torch.inference_mode():
            for b in batches:
                with contextlib.suppress(_Captured):
                    top(input_ids=b.to(device), use_cache=False)
    finally:
        layers[0] = first
    kwargs = {k: v for k, v in seen["kwargs"].items() if k not in ("past_key_values",
                                                                   "past_key_value")}
    kwargs["use_cache"] = False
    return LayerInputs(seen["hidden"], kwargs)


class ModelSource:
    """Layers of an in-memory HF model (moved to the device while processed)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.prefix, self.layers = decoder_layers(model)

    def capture(self, batches: list[torch.Tensor]) -> LayerInputs:
        moved = self._top_to(self.device)
        try:
            return capture(self.model, self.layers, batches, self.device)
        finally:
            for m in moved:
                m.to("cpu")

    def _top_to(self, device: torch.device) -> list[torch.nn.Module]:
        if device.type == "cpu":
            return []
        tops = [m for n, m in self.model.named_children()]
        inner = [m for m in tops if any(c is self.layers for c in m.children())]
        mods = [c for m in inner for c in m.children() if c is not self.layers]
        for m in mods:
            m.to(device)
        return mods

    def __len__(self) -> int:
        return len(self.layers)

    def load(self, i: int) -> torch.nn.Module:
        return self.layers[i].to(self.device)

    def release(self, i: int, layer: torch.nn.Module) -> None:
        layer.to("cpu")


class DirSource:
    """Layers of a safetensors HF directory, read one at a time (memory-mapped)."""

    def __init__(self, hf_dir: Path, device: torch.device) -> None:
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dir, self.device = Path(hf_dir), device
        self.config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            self.weight_map = {}
            for shard in sorted(self.dir.glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    self.weight_map.update({k: shard.name for k in f.keys()})  # noqa: SIM118
        if not self.weight_map:
            raise ModelError(f"{hf_dir} has no safetensors weights", "point to an HF model dir")
        self._files: dict[str, Any] = {}
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.prefix, self.layers = decoder_layers(self.skeleton)
        self.n = len(self.layers)

    def _open(self, shard: str) -> Any:
        from safetensors import safe_open

        if shard not in self._files:
            self._files[shard] = safe_open(str(self.dir / shard), framework="pt")
        return self._files[shard]

    def tensor(self, key: str) -> torch.Tensor:
        return self._open(self.weight_map[key]).get_tensor(key)

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self.weight_map if k.startswith(prefix)]

    def non_layer_keys(self) -> list[str]:
        return [k for k in self.weight_map if not k.startswith(self.prefix + ".")]

    def capture(self, batches: list[torch.Tensor]) -> LayerInputs:
        """Build the model's top on the device (no decoder layers), load its weights, capture."""
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(self.config)
        cfg.num_hidden_layers = 1  # one real (random) layer 0, replaced by the catcher
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = cfg.layer_types[:1]
        top = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _, layers = decoder_layers(top)
        state = {k: self.tensor(k).float() for k in self.non_layer_keys()}
        missing, unexpected = top.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.startswith(self.prefix + ".")
               and k not in ("lm_head.weight",)]
        if bad or unexpected:
            raise ModelError(f"{self.dir}: weights do not match the model ({bad or unexpected})",
                             "the directory must be a transformers checkpoint")
        top.to(self.device).eval()
        try:
            return capture(top, layers, batches, self.device)
        finally:
            del top

    def __len__(self) -> int:
        return self.n

    def load(self, i: int) -> torch.nn.Module:
        layer = copy.deepcopy(self.layers[i])  # a meta module: no memory
        pre = f"{self.prefix}.{i}."
        state = {k[len(pre):]: self.tensor(k).to(self.device, torch.float32)
                 for k in self.keys(pre)}
        try:
            layer.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as exc:
            raise ModelError(f"layer {i} of {self.dir} does not match its config: {exc}",
                             "the directory must be a transformers checkpoint") from exc
        if any(b.is_meta for b in layer.buffers()):
            raise ModelError(f"layer {i} of {self.dir} has buffers not in the checkpoint",
                             "layer-by-layer passes support Llama-like decoder models")
        return layer.eval()

    def release(self, i: int, layer: torch.nn.Module) -> None:
        layer.to("meta")
        self._files.clear()  # unmap: the pages read stay in the page cache, not in our RSS

    def close(self) -> None:
        self._files.clear()


Sink = Callable[[int, str, torch.nn.Module], None]


def run(source: ModelSource | DirSource, batches: list[torch.Tensor], layer_pass: LayerPass,
        sink: Sink | None = None, progress: Any = None, label: str = "layer") -> None:
    """Capture layer 0's inputs, then per layer: pass, forward (next inputs), sink, release."""
    inputs = source.capture(batches)
    task = progress.add_task(label, total=len(source)) if progress is not None else None
    for i in range(len(source)):
        layer = source.load(i)
        prefix = f"{source.prefix}.{i}"
        layer_pass.process(i, prefix, layer, inputs)
        inputs = LayerInputs(inputs.run(layer), inputs.kwargs)
        if sink is not None:
            sink(i, prefix, layer)
        source.release(i, layer)
        if task is not None:
            progress.advance(task)


def linears(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            yield name, m


def sequential_groups(layer: torch.nn.Module, inputs: LayerInputs) -> list[list[str]]:
    """The layer's Linears in the order the forward uses them, grouped by shared input.

    Linears fed the same tensor (q/k/v, gate/up) form one group; for a Llama layer this is
    ``[[q, k, v], [o], [gate, up], [down]]``, the "true sequential" order of GPTQ.
    """
    order: list[tuple[str, torch.Tensor]] = []  # the inputs kept alive: their ids stay unique
    hooks = []
    for name, m in linears(layer):
        def hook(_m: Any, args: tuple[Any, ...], name: str = name) -> None:
            order.append((name, args[0]))
        hooks.append(m.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            layer(inputs.hidden[0], **inputs.kwargs)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last: torch.Tensor | None = None
    for name, x in order:
        if any(name in g for g in groups):
            continue
        if x is last and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups
