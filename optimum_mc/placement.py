"""Devices: where calibration runs (``MCConfig.device``) and where the packed model ends (the user's device map)."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .errors import MCConfigError

logger = logging.getLogger(__name__)

DEVICE_MAP_STRINGS = ("auto", "balanced", "balanced_low_0", "sequential")


@contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """On a GPU, torch's deterministic kernels for the duration (``index_add_`` and scatters otherwise add in a
    run-dependent order, and the same inputs and seed must give the same bytes); the caller's setting is restored."""
    if device.type == "cpu":
        yield
        return
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def resolve_device(spec: str | torch.device | int | None) -> torch.device:
    """The calibration device: ``None`` -> ``cuda`` when available, else ``cpu``; typed error if it does not exist."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise MCConfigError(f"device={spec!r} is not a torch device; pass e.g. 'cpu', 'cuda' or 'cuda:1'.") from exc
    if dev.type == "cpu" or dev.type == "meta":
        if dev.type == "meta":
            raise MCConfigError("device='meta' cannot run calibration; pass 'cpu' or a GPU such as 'cuda'.")
        return torch.device("cpu")
    module = getattr(torch, dev.type, None)
    if module is None or not hasattr(module, "is_available") or not module.is_available():
        raise MCConfigError(f"device={spec!r}: no {dev.type} device is available here; pass device='cpu'.")
    count = module.device_count() if hasattr(module, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise MCConfigError(f"device={spec!r}: only {count} {dev.type} device(s) exist (0..{count - 1}).")
    return dev if dev.index is not None else torch.device(dev.type, 0)


def check_device_map(device_map) -> None:
    """Reject device maps MC cannot honour, before any weight is read."""
    if device_map is None or isinstance(device_map, (torch.device, int)):
        return
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRINGS:
            resolve_device(device_map)
        return
    if not isinstance(device_map, dict):
        raise MCConfigError(f"device_map must be None, a string, a device or a dict, got {type(device_map).__name__}.")
    for name, dev in device_map.items():
        if dev == "disk":
            continue
        try:
            resolve_device(dev if not isinstance(dev, int) else torch.device("cuda", dev))
        except MCConfigError as exc:
            raise MCConfigError(f"device_map[{name!r}]: {exc}") from exc


def check_writable_folder(path: str | None, option: str) -> None:
    """Create ``path`` if needed and prove it writable, or raise :class:`MCConfigError` (before any work)."""
    if path is None:
        return
    import os

    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".optimum-mc-probe-{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise MCConfigError(
            f"{option}={path!r} is not a writable folder ({exc}); pass a folder you can write to."
        ) from exc


def input_device(model: nn.Module) -> torch.device:
    """Where a model's ``input_ids`` belong: its embeddings' execution device (accelerate hooks) or weights."""
    emb = model.get_input_embeddings()
    hook = getattr(emb, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device(dev if not isinstance(dev, int) else f"cuda:{dev}")
    return next(iter(emb.parameters())).device


def _plain_device(model: nn.Module) -> torch.device:
    emb = model.get_input_embeddings()
    return next(iter(emb.parameters())).device


def place_model(
    model: nn.Module,
    device_map,
    max_memory: dict | None,
    offload_folder: str | None,
) -> dict | None:
    """Move the packed ``model`` where ``device_map`` asks (``None``: beside its embeddings). Return the final map.

    String maps are inferred on the packed model (its real size, not the float one) with ``max_memory``; modules
    mapped to ``"disk"`` go to ``offload_folder`` (a temporary folder, with a warning, when none was given).
    """
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(model, recurse=True)  # transformers dispatched the layer-less skeleton
    if device_map is None:
        model.to(_plain_device(model))
        return None
    if isinstance(device_map, (torch.device, int)) or (
        isinstance(device_map, str) and device_map not in DEVICE_MAP_STRINGS
    ):
        model.to(device_map if not isinstance(device_map, int) else torch.device("cuda", device_map))
        return None
    if isinstance(device_map, str):
        device_map = infer_auto_device_map(
            model, max_memory=max_memory, no_split_module_classes=getattr(model, "_no_split_modules", None)
        )
    devices = set(device_map.values())
    if len(devices) == 1 and "disk" not in devices:
        model.to(next(iter(devices)))
        return device_map
    if "disk" in devices:
        if offload_folder is None:
            offload_folder = tempfile.mkdtemp(prefix="optimum-mc-offload-")
            logger.warning("part of the packed model is mapped to disk; offloading it to %s", offload_folder)
        _offload_to_disk(model, device_map, offload_folder)
    dispatch_model(model, device_map=device_map, offload_dir=offload_folder, offload_buffers=True)
    return device_map


def _offload_to_disk(model: nn.Module, device_map: dict, folder: str) -> None:
    """Write the tensors of every module mapped to ``"disk"`` into ``folder`` (accelerate's offload index)."""
    from accelerate.utils import offload_state_dict

    state = {}
    for name, dev in device_map.items():
        if dev != "disk":
            continue
        module = model.get_submodule(name) if name else model
        prefix = f"{name}." if name else ""
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}  # non-persistent ones too
        state.update({prefix + k: v.detach() for k, v in tensors.items()})
    offload_state_dict(folder, state)
