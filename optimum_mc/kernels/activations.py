"""The activations the fused MoE op knows by name, and recognising a module's ``act_fn`` as one of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "relu": F.relu,
}


def activation_name(act_fn: Callable[[torch.Tensor], torch.Tensor]) -> str | None:
    """The name in :data:`ACTIVATIONS` computing exactly what ``act_fn`` computes (probed on fixed values), or None.

    Probing instead of matching class names covers every spelling transformers has (``nn.SiLU``,
    ``SiLUActivation``, ``ACT2FN["swish"]``, ...) and never mistakes a look-alike for the real function.
    """
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float32)
    try:
        with torch.no_grad():
            got = act_fn(probe)
    except Exception:  # an activation that cannot run on a CPU fp32 tensor is not one of ours
        return None
    if not isinstance(got, torch.Tensor) or got.shape != probe.shape:
        return None
    for name, fn in ACTIVATIONS.items():
        if torch.allclose(got.float(), fn(probe), rtol=1e-6, atol=1e-7):
            return name
    return None
