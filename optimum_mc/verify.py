"""Checks run by the quantizer around weight loading: refuse bad models and checkpoints before expensive work."""

from __future__ import annotations

import torch
from torch import nn

from .errors import CheckpointError, NonFiniteWeightError

PACKED_FLOAT_BUFFERS = ("scales", "zeros", "absmax", "quant_map")


def _nonfinite(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all())


def check_finite_weights(model: nn.Module) -> None:
    """Every float parameter must be finite before quantizing (a NaN router or expert poisons calibration)."""
    bad = [n for n, p in model.named_parameters() if _nonfinite(p)]
    if bad:
        raise NonFiniteWeightError(
            f"the model has NaN/Inf weights in {len(bad)} tensors (e.g. {bad[:3]}); quantization needs finite "
            f"weights: re-download or repair the checkpoint."
        )


def check_finite_loaded(model: nn.Module) -> None:
    """A loaded MC checkpoint's scales / zeros (and every float parameter) must be finite."""
    bad = [n for n, b in model.named_buffers() if n.rsplit(".", 1)[-1] in PACKED_FLOAT_BUFFERS and _nonfinite(b)]
    bad += [n for n, p in model.named_parameters() if _nonfinite(p)]
    if bad:
        raise CheckpointError(
            f"the checkpoint holds NaN/Inf values in {len(bad)} tensors (e.g. {bad[:3]}); it is corrupt: re-save "
            f"it from the quantized model or re-download it."
        )
