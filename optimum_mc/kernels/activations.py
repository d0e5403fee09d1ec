"""The activations the fused MoE op knows by name, and recognising a module's ``act_fn`` as one of them.

Every path of the op computes a *gated* intermediate ``glu(gate, up)`` from the two halves of the gate/up
projection: ``act(gate) * up`` for the element-wise activations of :data:`ACTIVATIONS`, or gpt-oss's clamped SwiGLU
(``"clamped_swiglu"``: ``gate`` clamped to at most ``limit``, ``up`` to ``[-limit, limit]``, then
``(up + 1) * gate * sigmoid(alpha * gate)`` with alpha 1.702 and limit 7.0, the values of every gpt-oss config).
:data:`GATED` holds all of them as ``glu(gate, up)``.
"""

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

SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0  # the fused op's "clamped_swiglu" (gpt-oss's defaults)


def clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, alpha: float = SWIGLU_ALPHA,
                   limit: float = SWIGLU_LIMIT) -> torch.Tensor:  # fmt: skip
    """gpt-oss's gate: ``(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _times_up(act: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda gate, up: act(gate) * up


GATED: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    **{name: _times_up(fn) for name, fn in ACTIVATIONS.items()},
    "clamped_swiglu": clamped_swiglu,
}


class ClampedSwiGLU:
    """A gated activation object (``glu(gate, up)``; no element-wise ``act``) with gpt-oss's parameters."""

    def __init__(self, alpha: float = SWIGLU_ALPHA, limit: float = SWIGLU_LIMIT) -> None:
        self.alpha, self.limit = float(alpha), float(limit)

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return clamped_swiglu(gate, up, self.alpha, self.limit)

    def __repr__(self) -> str:
        return f"ClampedSwiGLU(alpha={self.alpha}, limit={self.limit})"


class Ungated:
    """A non-gated expert activation (Nemotron-H's experts: ``down(act(up(x)))``, ReLU², no gate rows): the
    experts' "gate/up" projection holds only the ``I`` up rows and the intermediate is ``act(h)`` of all of it.
    Not callable and without ``glu``, so code that splits the projection into halves cannot take it by mistake:
    :func:`intermediate` is the one way to evaluate it. The fused op has no non-gated mode
    (:func:`activation_name` is None): packed experts with it run the per-expert loop of the pure-torch path."""

    gated = False

    def __init__(self, act) -> None:
        self.act = act

    def mid(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(h)

    def __repr__(self) -> str:
        return f"Ungated({self.act!r})"


def is_gated(act_fn) -> bool:
    """Whether ``act_fn`` takes gate and up halves (every activation but :class:`Ungated`'s)."""
    return getattr(act_fn, "gated", True) is not False


def projection_rows(act_fn, inter: int) -> int:
    """Rows of an expert's gate/up projection: ``2I`` (gate, then up) for a gated activation, ``I`` otherwise."""
    return 2 * inter if is_gated(act_fn) else inter


def intermediate(act_fn, h: torch.Tensor) -> torch.Tensor:
    """The expert intermediate from its gate/up projection output ``h``: ``glu`` of the two halves (gate, up), or
    ``act(h)`` for a non-gated activation (:class:`Ungated`)."""
    mid = getattr(act_fn, "mid", None)
    return mid(h) if mid is not None else gated(act_fn, *h.chunk(2, dim=-1))


class BiasedGLU:
    """``act_fn`` of one expert whose gate/up projection has a bias: ``glu(gate + b_gate, up + b_up)``."""

    def __init__(self, act_fn, bias: torch.Tensor) -> None:
        self.act_fn, self.bias = act_fn, bias.detach()
        self.gated = is_gated(act_fn)

    def mid(self, h: torch.Tensor) -> torch.Tensor:
        return intermediate(self.act_fn, h + self.bias.to(device=h.device, dtype=h.dtype))

    def glu(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        b = self.bias.to(device=gate.device, dtype=gate.dtype)
        inter = gate.shape[-1]
        return gated(self.act_fn, gate + b[:inter], up + b[inter:])


def gated(act_fn, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``glu(gate, up)`` of a gated activation object, ``act_fn(gate) * up`` of an element-wise one."""
    glu = getattr(act_fn, "glu", None)
    return glu(gate, up) if glu is not None else act_fn(gate) * up


def activation_name(act_fn) -> str | None:
    """The name in :data:`GATED` computing exactly what ``act_fn`` computes (probed on fixed values), or None.

    Probing instead of matching class names covers every spelling transformers has (``nn.SiLU``,
    ``SiLUActivation``, ``ACT2FN["swish"]``, ...) and never mistakes a look-alike for the real function (a
    :class:`ClampedSwiGLU` with other parameters than the op's is not ``"clamped_swiglu"``). Element-wise
    activations are probed on ``act(gate)`` alone, gated objects (with ``glu``) on a grid of ``(gate, up)``.
    """
    if not is_gated(act_fn):  # (the op computes gated intermediates only)
        return None
    probe = torch.linspace(-9.0, 9.0, 97, dtype=torch.float32, device="cpu")
    glu = getattr(act_fn, "glu", None)
    try:
        with torch.no_grad():
            if glu is not None:
                gate, up = probe[:, None].expand(97, 97), probe[None, :].expand(97, 97)
                got, table = glu(gate, up), {n: f(gate, up) for n, f in GATED.items()}
            else:
                got, table = act_fn(probe), {n: f(probe) for n, f in ACTIVATIONS.items()}
    except Exception:  # an activation that cannot run on a CPU fp32 tensor is not one of ours
        return None
    for name, want in table.items():
        if isinstance(got, torch.Tensor) and got.shape == want.shape:
            if torch.allclose(got.float(), want, rtol=1e-6, atol=1e-7):
                return name
    return None
