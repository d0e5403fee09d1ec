"""Where a decoder layer's float weights come from while MC quantizes it, one layer at a time.

- :class:`ResidentLayers`: the float model is already in memory (``quantize_model`` on a loaded model); a layer is
  moved to the calibration device for its turn and its packed result goes back where the layer was.
- :class:`CheckpointLayers`: quantization at load time. The decoder layers are never loaded by transformers: each
  slot holds a parameter-free :class:`PendingLayer` and a layer's float tensors are read straight from the
  checkpoint's safetensors shards (memory-mapped, only that layer's bytes) onto the calibration device, through
  transformers' own key renaming and expert fusing (``convert_and_load_state_dict_in_model``), so every family's
  checkpoint layout is handled exactly as ``from_pretrained`` handles it. The float layer is dropped as soon as its
  packed form exists.

Reading the shards beats the alternatives (keeping the float model in host RAM, or accelerate's disk offload):
host memory stays at one layer whatever the model size, and nothing is copied to an offload folder first
(accelerate would rewrite the 93 GB of Mixtral-8x7B before quantization could start).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import re
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..architectures import decoder_layers, layer_list_name
from ..errors import CheckpointError


class PendingLayer(nn.Module):
    """Holds a decoder layer's slot while the layer's weights are elsewhere (checkpoint or staging folder)."""

    def __init__(self, index: int, like: nn.Module | None = None) -> None:
        super().__init__()
        self.index = index
        if like is None:
            return
        # the layer's plain attributes (its own and its class's), which a model's layer loop may read before the
        # call: inkling2's ``decoder_layer.attention_type`` (a class attribute) picks the layer's mask
        scopes = [vars(like)] + [vars(c) for c in type(like).__mro__ if c not in (nn.Module, object)]
        for scope in scopes:
            for k, v in scope.items():
                if not k.startswith("_") and k != "training" and isinstance(v, (str, int, float, bool)):
                    self.__dict__.setdefault(k, v)

    def forward(self, *args, **kwargs):  # noqa: D401 - a placeholder must never run
        raise RuntimeError(
            f"decoder layer {self.index} is not loaded yet (MC quantization in progress or interrupted); "
            f"load the quantized checkpoint instead."
        )


def release_memory() -> None:
    """Give freed memory back after a layer: Python garbage, CUDA's cache, and glibc's heap (``malloc_trim``;
    without it the host RSS keeps every layer's freed float tensors)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD)
_M_MMAP_THRESHOLD = -3


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> None:
    """Serve allocations of ``threshold`` bytes and more with their own mappings (glibc ``M_MMAP_THRESHOLD``).

    glibc raises its mmap threshold dynamically (up to 32 MiB) after large blocks are freed, so later tensors of a
    few MiB come from the heap, where freed memory stays resident: over a layer's many GPTQ and activation buffers
    the process keeps hundreds of MB it no longer uses (measured: docs/scale.md). Fixing the threshold makes every
    freed tensor of 1 MiB or more go straight back. Process-wide and lasting (glibc has no "restore"); a user's
    own ``MALLOC_MMAP_THRESHOLD_`` setting is left alone. No-op off glibc.
    """
    import os

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold))
    except (OSError, AttributeError):
        pass


def open_unmapped(path: str):
    """A safetensors file opened for reading with pread (its pages are not mapped into this process, so reading
    a tensor costs its copy only), or memory-mapped where safetensors lacks that backend."""
    from safetensors import safe_open

    try:
        return safe_open(path, framework="pt", backend="pread")
    except TypeError:  # safetensors without the pread backend
        return safe_open(path, framework="pt")


def _own_memory(layer: nn.Module) -> None:
    """Copy the tensors that transformers left as views of the memory-mapped shard (those it only renamed; the fused
    experts are new tensors): one small view keeps the whole mapping, and every page read from it, resident."""
    with torch.no_grad():
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            if not t.is_meta and not name.endswith(("up_proj", "down_proj")):  # (up_proj: non-gated experts)
                t.data = t.data.clone()


def init_computed_buffers(model: nn.Module, layer: nn.Module, device) -> None:
    """Compute the non-persistent buffers a layer holds (rotary frequencies inside an attention's compressor, as in
    deepseek_v4): no checkpoint stores them, transformers computes them at init, so on a layer read from meta they
    are still empty. Only parameter-free modules are initialized (``model._init_weights``), which cannot overwrite
    weights read from the checkpoint."""
    init = getattr(model, "_init_weights", None)
    if init is None:
        return
    for module in layer.modules():
        names = [
            n
            for n, b in module.named_buffers(recurse=False)
            if b.is_meta and n in getattr(module, "_non_persistent_buffers_set", ())
        ]
        if not names or next(module.parameters(recurse=False), None) is not None:
            continue
        for n in names:
            b = module._buffers[n]
            module._buffers[n] = torch.empty(b.shape, dtype=b.dtype, device=device)
        with torch.no_grad():
            init(module)


_STACKING_OPS = (("MergeModulelist",), ("MergeModulelist", "Concatenate"))


def fuse_experts_in_place(model: nn.Module, state: dict, weight_mapping: list, device) -> dict:
    """Replace per-expert checkpoint slices (``experts.{e}.w1.weight`` ...) by the fused tensors they form
    (``experts.gate_up_proj``), each built by copying every expert's slice straight into its place.

    transformers' converters would first read every expert's tensors, then stack, then concatenate: about three
    copies of a layer's experts at once, the largest transient of a streamed layer. Only converters made of
    ``MergeModulelist(dim=0)`` and optionally ``Concatenate(dim=1)`` (stack experts, then join the projections'
    rows in source-pattern order: what transformers does for every MoE family's gate/up and down) are fused here;
    anything else, or anything that does not add up to the model's parameter shape, is left to transformers. The
    fused tensor gets the model parameter's dtype, so transformers' own load then only places it.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [m for m in weight_mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in weight_mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    groups: dict[str, list[tuple[str, int, str]]] = {}  # target -> (source pattern, expert, checkpoint key)
    for key in state:
        target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        conv = by_pattern.get(pattern)
        if conv is None or target not in meta:
            continue
        ops = tuple(type(op).__name__ for op in conv.operations)
        if ops not in _STACKING_OPS or any(getattr(op, "dim", None) != d for op, d in zip(conv.operations, (0, 1))):
            continue
        regex = re.escape(pattern).replace(r"\*", r"(\d+)")
        found = re.search(regex, key)
        if found is None or len(found.groups()) != 1:
            continue
        groups.setdefault(target, []).append((pattern, int(found.group(1)), key))
    out = dict(state)
    for target, items in groups.items():
        fused = _fuse(meta[target], items, by_pattern[items[0][0]].source_patterns, state, device)
        if fused is None:
            continue
        for _, _, key in items:
            del out[key]
        out[target] = fused
    return out


def _fuse(param: torch.Tensor, items: list[tuple[str, int, str]], patterns: list[str], state: dict, device):
    """The fused ``(E, rows, ...)`` tensor for ``param``, or ``None`` if the slices do not tile it exactly."""
    num = param.shape[0]
    rows: dict[str, int] = {}
    seen: dict[str, set[int]] = {}
    for pattern, e, key in items:
        shape = tuple(state[key].get_shape())
        if len(shape) != param.dim() - 1 or tuple(shape[1:]) != tuple(param.shape[2:]) or not 0 <= e < num:
            return None
        if rows.setdefault(pattern, shape[0]) != shape[0] or e in seen.setdefault(pattern, set()):
            return None
        seen[pattern].add(e)
    order = [p for p in patterns if p in rows]
    if sum(rows.values()) != param.shape[1] or any(len(seen[p]) != num for p in order):
        return None
    offset = {}
    start = 0
    for p in order:
        offset[p], start = start, start + rows[p]
    fused = torch.empty(param.shape, dtype=param.dtype, device=device)
    for pattern, e, key in items:
        fused[e, offset[pattern] : offset[pattern] + rows[pattern]].copy_(state[key][:])
    return fused


def _other_layer_lists(model: nn.Module, layers: nn.ModuleList) -> list[str]:
    """``"<parent>.layers."`` of every other layer list of ``model`` (a multimodal wrapper's vision and audio
    towers: ``audio_tower.layers.``, ``encoder.layers.``), whose checkpoint keys the ``layers.<i>.`` pattern of
    decoder layer ``i`` must not take."""
    own = [n for n, m in model.named_modules() if m is layers]
    own_tail = ".".join(own[0].split(".")[-2:]) if own else "layers"
    out = []
    for name, m in model.named_modules():
        if m is layers or not isinstance(m, nn.ModuleList) or not name.endswith("layers"):
            continue
        tail = ".".join(name.split(".")[-2:])
        if tail != own_tail and "." in tail:
            out.append(tail + ".")
    return sorted(set(out))


def _merged_transforms(before: list, now: list | None) -> list:
    """``before`` and the transforms of ``now`` it lacks (equal ones, from another copy of the mapping, once:
    a renaming reverted twice would rename twice)."""

    def key(t) -> tuple:
        return type(t).__name__, tuple(getattr(t, "source_patterns", ())), tuple(getattr(t, "target_patterns", ()))

    seen = {key(t) for t in before}
    out = list(before)
    for t in now or []:
        if key(t) not in seen:
            seen.add(key(t))
            out.append(t)
    return out


def _any_layer_key(list_name: str = "layers") -> re.Pattern:
    """Keys of any decoder layer: ``<list_name>.<i>.`` (``layers``; DBRX's ``blocks``)."""
    return re.compile(rf"(^|\.){re.escape(list_name)}\.\d+\.")


def _key_renamer(weight_mapping) -> Callable[[str], str]:
    """The model's name for a checkpoint key, by transformers' conversion mapping: a layer's tensor the checkpoint
    stores outside ``layers.<i>.`` (inkling2's ``attn_res.mlp_queries.<i>`` is ``layers.<i>.mlp_input.query``)
    belongs to layer ``i``. Run on copies of the transforms (renaming marks a transform used)."""
    try:
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older 5.x: keys are taken as stored
        return lambda key: key
    mapping = copy.deepcopy(list(weight_mapping or []))
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]

    def rename(key: str) -> str:
        try:
            return rename_source_key(key, renamings, converters)[0]
        except Exception:  # a transform that needs more than the key: keep it as stored
            return key

    return rename


def _layer_key_pattern(index: int, list_name: str = "layers") -> re.Pattern:
    return re.compile(rf"(^|\.){re.escape(list_name)}\.{index}\.")


@contextlib.contextmanager
def _quiet_transformers_bars() -> Iterator[None]:
    """Silence transformers' per-call "Loading weights" bar while one layer is read (restored afterwards)."""
    from transformers.utils import logging as tlog

    was_disabled = not tlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            tlog.enable_progress_bar()


def _outside_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The input embeddings and (untied) output head, by name: the large modules outside the decoder layers."""
    out = {}
    names = {id(m): n for n, m in model.named_modules()}
    inp, outp = model.get_input_embeddings(), model.get_output_embeddings()
    if outp is not None and getattr(outp, "weight", None) is getattr(inp, "weight", None):
        return {}  # tied: parking would untie them; they stay resident
    for module in (inp, outp):
        if module is not None and id(module) in names and names[id(module)] not in out:
            if any(p.is_meta for p in module.parameters()):
                continue
            out[names[id(module)]] = module
    return out


class ResidentLayers:
    """Layers of a model whose float weights are already loaded."""

    streams_from_disk = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._home: dict[int, torch.device] = {}

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    def structure(self, index: int) -> nn.Module:
        """The layer as a module tree (weights may be anywhere; only its structure is read)."""
        return decoder_layers(self.model)[index]

    def fetch(self, index: int, device: torch.device) -> nn.Module:
        layer = decoder_layers(self.model)[index]
        home = next((p.device for p in layer.parameters()), device)
        self._home[index] = home
        return layer.to(device) if home != device else layer

    def finish(self, index: int, layer: nn.Module) -> nn.Module:
        """Put the quantized layer back where the float one lived; return it."""
        home = self._home.pop(index, None)
        layer = layer.to(home) if home is not None else layer
        decoder_layers(self.model)[index] = layer
        return layer


class CheckpointLayers:
    """Decoder layers streamed from safetensors shards, one at a time (see the module docstring)."""

    streams_from_disk = True

    def __init__(self, model: nn.Module, checkpoint_files: list[str], dtype: torch.dtype | None) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.model = model
        self.files = list(checkpoint_files)
        self.dtype = dtype
        self.weight_mapping = get_model_conversion_mapping(model, None, None)
        try:
            self.dtype_plan = model._get_dtype_plan(dtype)
        except (AttributeError, TypeError):  # older 5.x: no per-module dtype plan
            self.dtype_plan = {}
        layers = decoder_layers(model)
        self._list_name = layer_list_name(model)  # (checkpoint keys of layer i: <name>.<i>.)
        self._other_lists = _other_layer_lists(model, layers)
        self._meta = list(layers)  # float layers on the meta device: structure only, not registered anywhere
        for i in range(len(layers)):
            layers[i] = PendingLayer(i, self._meta[i])
        self._keys = self._index_keys()

    # -- setup ---------------------------------------------------------------------------------------------------
    def _index_keys(self) -> dict[int, list[tuple[str, str]]]:
        from safetensors import safe_open

        out: dict[int, list[tuple[str, str]]] = {i: [] for i in range(len(self._meta))}
        pats = [(i, _layer_key_pattern(i, self._list_name)) for i in out]
        any_layer = _any_layer_key(self._list_name)
        renamed = _key_renamer(self.weight_mapping)
        for path in self.files:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if any(other in key for other in self._other_lists):  # a vision / audio tower's layer
                        continue
                    name = key if any_layer.search(key) else renamed(key)
                    for i, pat in pats:
                        if pat.search(name):
                            out[i].append((path, key))
                            break
        for i, keys in out.items():
            if not keys:
                raise CheckpointError(
                    f"the checkpoint has no tensors for decoder layer {i} ({len(self.files)} file(s)); it is "
                    f"incomplete or not a float checkpoint of this model."
                )
        return out

    def check_finite(self) -> None:
        """Scan every layer tensor of the shards once (one tensor in memory at a time) and refuse NaN/Inf weights
        before any quantization work: a bad router or expert would otherwise surface layers later."""
        from safetensors import safe_open

        from ..errors import NonFiniteWeightError

        bad = []
        by_file: dict[str, list[str]] = {}
        for keys in self._keys.values():
            for path, key in keys:
                by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    t = f.get_tensor(key)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        bad.append(key)
        if bad:
            raise NonFiniteWeightError(
                f"the checkpoint has NaN/Inf weights in {len(bad)} tensors (e.g. {bad[:3]}); quantization needs "
                f"finite weights: re-download or repair the checkpoint."
            )

    def ignore_patterns(self) -> list[str]:
        """Checkpoint keys transformers must not report as unexpected (the layers MC reads itself)."""
        return [_any_layer_key(self._list_name).pattern]

    # -- per layer -----------------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self._meta)

    def structure(self, index: int) -> nn.Module:
        """The float layer on the meta device (structure and shapes only)."""
        return self._meta[index]

    def fetch(self, index: int, device: torch.device) -> nn.Module:
        """Read layer ``index`` from the shards onto ``device`` and install it in its slot; return it."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        layers = decoder_layers(self.model)
        layers[index] = copy.deepcopy(self._meta[index])  # the meta skeleton stays pristine for staged reloads
        prefix = next(n for n, m in self.model.named_modules() if m is layers[index]) + "."
        config = LoadStateDictConfig(
            device_map={"": device}, dtype=self.dtype, dtype_plan=self.dtype_plan, weight_mapping=self.weight_mapping
        )
        with contextlib.ExitStack() as stack:
            handles = {}
            state = {}
            for path, key in self._keys[index]:
                if path not in handles:  # pread, not mmap: pages read are not mapped into this process
                    handles[path] = stack.enter_context(open_unmapped(path))
                state[key] = handles[path].get_slice(key)
            state = fuse_experts_in_place(self.model, state, self.weight_mapping, device)
            before = list(getattr(self.model, "_weight_conversions", None) or [])
            with _quiet_transformers_bars():
                info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
            # transformers keeps the transforms one load used, to revert them when saving: this call's alone would
            # forget the ones the model's own load used (inkling2's embedding renames: saved unreverted, unreadable)
            self.model._weight_conversions = _merged_transforms(before, self.model._weight_conversions)
        layer = layers[index]
        _own_memory(layer)
        init_computed_buffers(self.model, layer, device)
        missing = sorted(k for k in info.missing_keys if k.startswith(prefix))
        on_meta = [n for n, t in list(layer.named_parameters()) + list(layer.named_buffers()) if t.is_meta]
        if missing or on_meta or info.mismatched_keys:
            layers[index] = PendingLayer(index, self._meta[index])
            raise CheckpointError(
                f"decoder layer {index} could not be read completely from the checkpoint: missing "
                f"{(missing or on_meta)[:4]}, mismatched {sorted(info.mismatched_keys)[:2]}; the checkpoint does "
                f"not match this model's config."
            )
        return layer

    def park_outside(self, stage) -> None:
        """Move the embeddings and head to the staging folder while the layers are processed (they are needed only
        to capture the first layer's inputs and, at the end, to run the whole model)."""
        self._outside = _outside_modules(self.model)
        tensors = {}
        for name, module in self._outside.items():  # with submodules' (inkling's embedding holds a norm)
            for pname, p in [*module.named_parameters(), *module.named_buffers()]:
                tensors[f"{name}.{pname}"] = p
        if tensors:
            stage.save_layer("outside", 0, tensors, {"names": sorted(tensors)})
            for module in self._outside.values():
                module.to("meta")
        self._outside_stage = stage if tensors else None

    def restore_outside(self) -> None:
        """Bring the embeddings and head back (see :meth:`park_outside`)."""
        stage = getattr(self, "_outside_stage", None)
        if stage is None:
            return
        tensors, _ = stage.load_layer("outside", 0)
        for name, module in self._outside.items():
            for key, value in tensors.items():
                if not key.startswith(name + "."):
                    continue
                owner, _, leaf = key[len(name) + 1 :].rpartition(".")
                sub = module.get_submodule(owner)
                if leaf in sub._parameters:
                    sub._parameters[leaf] = nn.Parameter(value, requires_grad=sub._parameters[leaf].requires_grad)
                else:
                    sub._buffers[leaf] = value
        self._outside_stage = None

    def finish(self, index: int, layer: nn.Module) -> nn.Module:
        """Keep the quantized layer in its slot (the caller may stage it to disk and park the slot)."""
        decoder_layers(self.model)[index] = layer
        return layer

    def park(self, index: int) -> None:
        """Free the slot (its packed weights are staged on disk)."""
        layers = decoder_layers(self.model)
        layers[index] = PendingLayer(index, layers[index])
