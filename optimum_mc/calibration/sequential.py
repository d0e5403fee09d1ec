"""The layer-by-layer driver: capture the inputs of decoder layer 0, then run one layer at a time.

Besides the hidden states, a model's layer loop may hand each layer its own arguments: gemma4's per-layer input
embeddings (``per_layer_inputs[:, :, i]``, positional), the rotary tables and mask of the layer's attention type.
The capture therefore runs the model's layer loop once with every layer standing in as the identity and keeps, per
layer, the arguments that are not layer 0's (by identity: a table shared by all layers of a type is kept once).

Only one layer's activations live at once (plus the calibration hidden states), so peak memory stays near the
model plus one layer's workspace. Layers placed on other devices by an accelerate device map are honoured: inputs
are moved to each layer's device (accelerate's own hooks, when present, do the same).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..architectures import decoder_layers


class _StopForward(Exception):
    """Raised by the capture hook once layer 0 has seen its inputs."""


@dataclass
class LayerBatch:
    """The positional hidden states and keyword arguments one decoder layer is called with, for one batch; the
    positional arguments after the hidden states; and, per layer index, the ``(args, kwargs)`` of a layer called
    with other ones than layer 0 (see the module docstring)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]
    args: tuple = ()
    per_layer: dict[int, tuple[tuple, dict[str, Any]]] | None = None

    def inputs(self, idx: int | None) -> tuple[tuple, dict[str, Any]]:
        """``(args, kwargs)`` of decoder layer ``idx`` (None: layer 0's)."""
        if idx is not None and self.per_layer and idx in self.per_layer:
            return self.per_layer[idx]
        return self.args, self.kwargs

    def with_hidden(self, hidden: torch.Tensor) -> LayerBatch:
        return replace(self, hidden=hidden)


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
def _same(a: Any, b: Any) -> bool:
    """Identical arguments: the same objects (tensors by identity), in the same structure."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    try:
        return bool(a is b or a == b)
    except Exception:  # objects whose == is not a truth value
        return False


def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, batch_size: int) -> list[LayerBatch]:
    """Run the embedding part of ``model`` on ``input_ids`` ``(N, L)`` and record what layer 0 receives, and what
    every other layer would receive besides the hidden states where that differs (the model's layer loop is run
    with every layer standing in as the identity; the last one stops the forward). A loop that unpacks more from
    a layer is run with stand-ins returning ``(hidden, None, ...)`` (kolibri1_1's ``(hidden, index_pool)``: what a
    layer hands the next one is not captured, each layer gets what the loop passes it before any layer ran); a
    loop no stand-in runs through gets layer 0's arguments for every layer, as before per-layer arguments were
    read."""
    for width in _STAND_IN_WIDTHS:
        try:
            return _capture(model, input_ids, batch_size, every_layer=True, width=width)
        except _StandInFailed:
            continue
    return _capture(model, input_ids, batch_size, every_layer=False)


# what a stand-in layer returns: the hidden states alone, or a tuple of them and Nones for a loop that unpacks more
# (kolibri1_1's layers return (hidden, index_pool): the candidate keys an indexer layer selects, None before one)
_STAND_IN_WIDTHS = (1, 2, 3)


class _StandInFailed(Exception):
    """The model's layer loop did not run with identity layers."""


def _capture(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, every_layer: bool, width: int = 1
) -> list[LayerBatch]:
    layers = decoder_layers(model)
    last = len(layers) - 1 if every_layer else 0
    captured: list[LayerBatch] = []
    calls: list[tuple[torch.Tensor, tuple, dict]] = []

    def stand_in(i: int):
        def forward(*args, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw["cache" if "cache" in kw else "past_key_values"] = None  # no KV cache during calibration
            kw["use_cache"] = False
            calls.append((hidden, tuple(args[1:]), kw))
            if i == last:
                raise _StopForward
            return hidden if width == 1 else (hidden,) + (None,) * (width - 1)

        return forward

    saved = {i: layer.__dict__.get("forward") for i, layer in enumerate(layers[: last + 1])}
    for i in saved:
        layers[i].__dict__["forward"] = stand_in(i)  # (an instance attribute: nn.Module.__call__ runs it, hooks too)
    device = _module_device(model.get_input_embeddings())
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            calls.clear()
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            except Exception as exc:
                if every_layer and calls:  # the loop failed past layer 0, on what a stand-in returned
                    raise _StandInFailed from exc
                raise
            if every_layer and len(calls) != len(layers):
                raise _StandInFailed
            hidden, args, kw = calls[0]
            per_layer = {i: (a, k) for i, (_, a, k) in enumerate(calls) if i and not (_same(a, args) and _same(k, kw))}
            captured.append(LayerBatch(hidden.detach(), kw, args, per_layer or None))
    finally:
        calls.clear()
        for i, fn in saved.items():
            if fn is None:
                layers[i].__dict__.pop("forward", None)
            else:
                layers[i].__dict__["forward"] = fn
    return captured


@torch.no_grad()
def run_layer(
    layer: nn.Module,
    batches: list[LayerBatch],
    keep: bool = True,
    replace: bool = False,
    on_output: Callable[[torch.Tensor], None] | None = None,
    idx: int | None = None,
) -> list[LayerBatch] | None:
    """Run ``layer`` on every batch; return the batches with its outputs as the next layer's inputs.

    ``keep=False`` drops each output at once (a pass run only for what hooks record; ``on_output(y)`` still sees
    every output); ``replace=True`` writes each output into its batch in place of the input, so the inputs and
    outputs of all batches never coexist (the caller must not need the inputs afterwards). ``idx``: the layer's
    index, for the arguments the model hands that layer alone (:meth:`LayerBatch.inputs`)."""
    device = _module_device(layer)
    out = []
    for b in batches:
        args, kwargs = b.inputs(idx)
        y = layer(move_to(b.hidden, device), *move_to(args, device), **move_to(kwargs, device))
        y = (y[0] if isinstance(y, tuple) else y).detach()
        if on_output is not None:
            on_output(y)
        if replace:
            b.hidden = y
        elif keep:
            out.append(b.with_hidden(y))
        del y
    if replace:
        return batches
    return out if keep else None


def iterate_layers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """``(index, layer)`` for every decoder layer, in order."""
    yield from enumerate(decoder_layers(model))
