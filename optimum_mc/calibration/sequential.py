"""The layer-by-layer driver: capture the inputs of decoder layer 0, then run one layer at a time.

Only one layer's activations live at once (plus the calibration hidden states), so peak memory stays near the
model plus one layer's workspace. Layers placed on other devices by an accelerate device map are honoured: inputs
are moved to each layer's device (accelerate's own hooks, when present, do the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..architectures import decoder_layers


class _StopForward(Exception):
    """Raised by the capture hook once layer 0 has seen its inputs."""


@dataclass
class LayerBatch:
    """The positional hidden states and keyword arguments one decoder layer is called with, for one batch."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` (tensors inside tuples / lists / dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [move_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> list[LayerBatch]:
    """Run the embedding part of ``model`` on ``input_ids`` ``(N, L)`` and record what layer 0 receives."""
    first = decoder_layers(model)[0]
    captured: list[LayerBatch] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["cache" if "cache" in kw else "past_key_values"] = None  # no KV cache during calibration
        kw["use_cache"] = False
        captured.append(LayerBatch(hidden.detach(), kw))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    device = _module_device(model.get_input_embeddings())
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    batches: list[LayerBatch],
    keep: bool = True,
    replace: bool = False,
    on_output: Callable[[torch.Tensor], None] | None = None,
) -> list[LayerBatch] | None:
    """Run ``layer`` on every batch; return the batches with its outputs as the next layer's inputs.

    ``keep=False`` drops each output at once (a pass run only for what hooks record; ``on_output(y)`` still sees
    every output); ``replace=True`` writes each output into its batch in place of the input, so the inputs and
    outputs of all batches never coexist (the caller must not need the inputs afterwards)."""
    device = _module_device(layer)
    out = []
    for b in batches:
        y = layer(move_to(b.hidden, device), **move_to(b.kwargs, device))
        y = (y[0] if isinstance(y, tuple) else y).detach()
        if on_output is not None:
            on_output(y)
        if replace:
            b.hidden = y
        elif keep:
            out.append(LayerBatch(y, b.kwargs))
        del y
    if replace:
        return batches
    return out if keep else None


def iterate_layers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """``(index, layer)`` for every decoder layer, in order."""
    yield from enumerate(decoder_layers(model))
