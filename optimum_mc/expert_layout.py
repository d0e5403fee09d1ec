"""How a transformers fused experts module stores its experts, read from the module, and MC's layout of them.

MC's layout (what calibration, GPTQ and :class:`~optimum_mc.nn.MCExperts` work on) is the one most families use:
``gate_up_proj (E, 2I, H)`` with the gate rows then the up rows, ``down_proj (E, H, I)``, ``y = x @ W.T``, and
``act(gate) * up`` between the projections. Some families deviate; :func:`experts_layout` reads how, from the
module itself:

- **transposed** storage (``gate_up_proj (E, H, 2I)``, ``down_proj (E, I, H)``, ``y = x @ W``: gpt-oss, Aria) from
  the shapes alone. The two readings never both fit: the down matrix would need ``H == H / 2``.
- **non-gated** experts (``up_proj (E, I, H)``, ``down_proj (E, H, I)``, ``down(act(up(x)))``: Nemotron-H's
  ReLU² experts) from the parameters present: MC's gate/up projection then holds the ``I`` up rows alone and the
  gate is :class:`~optimum_mc.kernels.activations.Ungated` (``act(h)`` of the whole projection output).
- **biases** (``gate_up_proj_bias (E, 2I)``, ``down_proj_bias (E, H)``: gpt-oss) from the parameters present.
- **stacked 2-D** experts (three ``(E * I, H)`` matrices, each expert's ``I`` rows one after the other, the down
  one stored ``(I, H)`` per expert: ``y = (act(x @ G_e.T) * (x @ U_e.T)) @ D_e``; DBRX's ``w1`` / ``v1`` / ``w2``)
  from the parameters present; which matrix is the gate, the up and the down one is read from the module's
  forward on its real weights, the gate is its only parameter-free leaf submodule (:mod:`.stacked_experts`).
- the **gate** between the projections and whether gate / up columns are **interleaved** (``[..., ::2]`` /
  ``[..., 1::2]``: gpt-oss) rather than two halves: by probing the module's ``_apply_gate`` (transformers' hook
  for it, taking the ``(S, 2I)`` gate/up output) on fixed random values against every candidate, the module's
  ``act_fn`` as ``act(gate) * up`` and, for a module with ``alpha`` and ``limit`` (gpt-oss's config values), the
  clamped SwiGLU, each on halves and on interleaved columns. Probing needs no weights, so it works on the meta
  device; a module without ``_apply_gate`` is read as ``act_fn(gate) * up`` on halves. A gate no candidate names
  (hy_v4's, minimax_m3_vl's, deepseek_v4's), or a module with neither ``_apply_gate`` nor ``act_fn``, is read from
  the module's forward instead (:func:`~optimum_mc.expert_activation.probed_act_fn`): a plain activation, or a
  :class:`~optimum_mc.expert_activation.GatedActivation` evaluated by the module's own code (halves, MC's layout);
  a gate that is not elementwise in ``(gate_j, up_j)`` pairs is refused (check: experts activation).

:func:`canonical_experts` converts a deviating module (with real weights) into :class:`CanonicalExperts` (MC's
layout, biases kept as float tensors) and checks that it reproduces the original's forward on random routed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import UnsupportedArchitectureError
from .kernels.activations import BiasedGLU, ClampedSwiGLU, Ungated, gated, intermediate
from .stacked_experts import stacked_act, stacked_tensors, stacked_weights


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its experts (see the module docstring)."""

    num_experts: int
    hidden: int
    inter: int
    transposed: bool = False
    interleaved: bool = False
    gate_up_bias: bool = False
    down_bias: bool = False
    act_fn: Any = None  # element-wise act (act(gate) * up), a gated object (glu(gate, up)) or Ungated (act(up))
    gated: bool = True  # False: up_proj (E, I, H) alone, no gate rows
    stacked: bool = False  # three 2-D (E * I, H) matrices (stacked_weights)

    @property
    def bias(self) -> bool:
        return self.gate_up_bias or self.down_bias

    @property
    def rows(self) -> int:
        """Rows of one expert's gate/up projection in MC's layout: ``2I``, or ``I`` for non-gated experts."""
        return 2 * self.inter if self.gated else self.inter

    @property
    def canonical(self) -> bool:
        """Stored as MC's layout already (biases and the gate are carried, not converted)."""
        return not (self.transposed or self.interleaved or not self.gated or self.stacked)


def gate_up_weight(module: nn.Module) -> torch.Tensor | None:
    """The 3-D gate/up weight of a float experts module: ``gate_up_proj``, or ``up_proj`` of non-gated experts
    (a module with ``num_experts`` and no separate ``gate_proj``: inkling's stacked shared-expert MLP, with a 3-D
    gate_proj, up_proj and down_proj and no routing, is not one)."""
    t = getattr(module, "gate_up_proj", None)
    if isinstance(t, torch.Tensor) and t.dim() == 3:
        return t
    t = getattr(module, "up_proj", None)
    if isinstance(t, torch.Tensor) and t.dim() == 3:
        if getattr(module, "gate_proj", None) is None and getattr(module, "num_experts", None) is not None:
            return t
    return None


def experts_weight(module: nn.Module) -> torch.Tensor | None:
    """A weight of a float experts module, for its dtype and device: its gate/up weight, or a stacked matrix."""
    w = gate_up_weight(module)
    if w is None:
        stacked = stacked_weights(module)
        w = stacked[0][1] if stacked else None
    return w


def _is_ungated(module: nn.Module) -> bool:
    """Non-gated experts: transformers' (``up_proj`` without ``gate_up_proj``) or MC's float
    :class:`CanonicalExperts` of them (a ``gate_up_proj`` of up rows alone, an :class:`Ungated` gate)."""
    if isinstance(getattr(module, "act_fn", None), Ungated):
        return True
    return not isinstance(getattr(module, "gate_up_proj", None), torch.Tensor) and gate_up_weight(module) is not None


def _ungated_shape(name: str, module: nn.Module, e: int, dn: torch.Tensor, hidden: int | None):
    up = gate_up_weight(module)
    ue, a, b = (int(s) for s in up.shape)
    if ue == e and tuple(dn.shape) == (e, b, a):
        # (E, I, H) / (E, H, I), or transposed (E, H, I) / (E, I, H) (ergo's): the shapes fit both readings, so the
        # model's hidden size tells, else transformers' declaration (@use_experts_implementation's is_transposed)
        transposed = a == hidden if hidden else bool(getattr(module, "is_transposed", False))
        if transposed and (not hidden or a == hidden):
            return e, a, b, True
        if not hidden or b == hidden:
            return e, b, a, False
    raise UnsupportedArchitectureError(
        f"experts module `{name}` ({type(module).__name__}): up_proj {tuple(up.shape)} and down_proj "
        f"{tuple(dn.shape)} with num_experts={e} are not the non-gated (E, I, H) / (E, H, I) layout (check: experts "
        f"layout)."
    )


def _shape(name: str, module: nn.Module, hidden: int | None) -> tuple[int, int, int, bool]:
    cls = type(module).__name__
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    e = getattr(module, "num_experts", None)
    if e is None:
        raise UnsupportedArchitectureError(f"experts module `{name}` ({cls}) has no `num_experts` (check: experts).")
    if not isinstance(dn, torch.Tensor) or dn.dim() != 3:
        raise UnsupportedArchitectureError(
            f"experts module `{name}` ({cls}) has no 3-D down_proj; expected (E, H, I) (check: experts layout)."
        )
    if _is_ungated(module):  # up_proj alone
        return _ungated_shape(name, module, int(e), dn, hidden)
    ge, a, b = (int(s) for s in gu.shape)
    if ge == int(e) and a % 2 == 0 and tuple(dn.shape) == (ge, b, a // 2) and (not hidden or b == hidden):
        return ge, b, a // 2, False
    if ge == int(e) and b % 2 == 0 and tuple(dn.shape) == (ge, b // 2, a) and (not hidden or a == hidden):
        return ge, a, b // 2, True
    raise UnsupportedArchitectureError(
        f"experts module `{name}` ({cls}): gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dn.shape)} with "
        f"num_experts={e} are not the (E, 2I, H) / (E, H, I) layout, nor its transpose (E, H, 2I) / (E, I, H) "
        f"(check: experts layout)."
    )


def _bias(name: str, module: nn.Module, attr: str, shape: tuple[int, int]) -> bool:
    b = getattr(module, attr, None)
    if b is None:
        return False
    if not isinstance(b, torch.Tensor) or tuple(b.shape) != shape:
        got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
        raise UnsupportedArchitectureError(
            f"experts module `{name}` ({type(module).__name__}): {attr} is {got}, expected {shape} (check: experts "
            f"biases)."
        )
    return True


def _is_gate(act: Any) -> bool:
    """An element-wise activation (callable) or a gated object (with ``glu(gate, up)``)."""
    return callable(act) or callable(getattr(act, "glu", None))


def _candidates(module: nn.Module) -> list[Any]:
    out = []
    if _is_gate(getattr(module, "act_fn", None)):
        out.append(module.act_fn)
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if isinstance(alpha, (int, float)) and isinstance(limit, (int, float)):
        out.append(ClampedSwiGLU(alpha, limit))
    return out


def _split(h: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return (h[..., ::2], h[..., 1::2]) if interleaved else h.chunk(2, dim=-1)


def _gate(name: str, module: nn.Module, inter: int) -> tuple[bool, Any]:
    """``(interleaved, act_fn)`` of the module's gate (probed, see the module docstring). A gate none of the
    candidates names (or a module with neither ``_apply_gate`` nor ``act_fn``) is read from the module's forward
    by :func:`~optimum_mc.expert_activation.probed_act_fn` (on halves): a plain activation or a
    :class:`~optimum_mc.expert_activation.GatedActivation`; typed error when that finds none either."""
    cands = _candidates(module)
    apply_gate = getattr(module, "_apply_gate", None)
    if not callable(apply_gate):
        if _is_gate(getattr(module, "act_fn", None)):
            return False, module.act_fn
        return False, _probed(name, module, "it has neither `act_fn` nor `_apply_gate`")
    h = torch.randn(16, 2 * inter, generator=torch.Generator().manual_seed(0), device="cpu") * 6
    try:
        with torch.no_grad():
            got = apply_gate(h)
    except Exception as exc:  # a gate that needs more than the gate/up output: perhaps its forward tells
        return False, _probed(name, module, f"its _apply_gate does not run on a (tokens, 2I) tensor "
                                            f"({type(exc).__name__}: {exc})")  # fmt: skip
    for interleaved in (False, True):
        for act in cands:
            try:
                want = gated(act, *_split(h, interleaved))
            except TypeError:  # an act_fn of (gate, up) (inkling2's): not act(gate) * up; read from the forward
                continue
            if isinstance(got, torch.Tensor) and got.shape == want.shape and torch.allclose(got, want, 1e-5, 1e-6):
                return interleaved, act
    return False, _probed(
        name,
        module,
        "its _apply_gate matches none of act_fn(gate) * up and the clamped SwiGLU, on gate / up "
        "halves or interleaved columns",
    )


def _probed(name: str, module: nn.Module, why: str) -> Any:
    """The gate read from the module's forward (:func:`~optimum_mc.expert_activation.probed_act_fn`); typed
    error naming the check when there is none."""
    from .expert_activation import probed_act_fn

    act = probed_act_fn(module)
    if act is None:
        raise UnsupportedArchitectureError(
            f"experts module `{name}` ({type(module).__name__}): {why}; nor is its forward an elementwise gated "
            f"activation of (gate, up) that a probe with identity weights can read (check: experts activation)."
        )
    return act


def _ungated_layout(name: str, module: nn.Module, e: int, h: int, i: int, transposed: bool) -> ExpertsLayout:
    act = getattr(module, "act_fn", None)
    if isinstance(act, Ungated):
        act = act.act
    if not callable(act):
        raise UnsupportedArchitectureError(
            f"experts module `{name}` ({type(module).__name__}) holds non-gated experts (up_proj, down_proj) "
            f"without an element-wise `act_fn` (check: experts activation)."
        )
    return ExpertsLayout(
        e,
        h,
        i,
        transposed=transposed,
        gate_up_bias=_bias(name, module, "up_proj_bias", (e, i)) or _bias(name, module, "gate_up_proj_bias", (e, i)),
        down_bias=_bias(name, module, "down_proj_bias", (e, h)),
        act_fn=Ungated(act),
        gated=False,
    )


def experts_layout(module: nn.Module, name: str = "experts", hidden: int | None = None) -> ExpertsLayout:
    """How ``module`` (a transformers fused experts module, weights possibly on the meta device) stores its
    experts; typed error naming the failed check otherwise. ``hidden``: the model's hidden size, when known."""
    stacked = stacked_weights(module)
    if stacked is not None:
        rows, h = (int(s) for s in stacked[0][1].shape)
        e = int(module.num_experts)
        if hidden and h != hidden:
            raise UnsupportedArchitectureError(
                f"experts module `{name}` ({type(module).__name__}): stacked 2-D experts of {h} columns in a model "
                f"of hidden size {hidden} (check: experts layout)."
            )
        return ExpertsLayout(e, h, rows // e, act_fn=stacked_act(name, module), stacked=True)
    e, h, i, transposed = _shape(name, module, hidden)
    if _is_ungated(module):
        return _ungated_layout(name, module, e, h, i, transposed)
    interleaved, act = _gate(name, module, i)
    return ExpertsLayout(
        e,
        h,
        i,
        transposed=transposed,
        interleaved=interleaved,
        gate_up_bias=_bias(name, module, "gate_up_proj_bias", (e, 2 * i)),
        down_bias=_bias(name, module, "down_proj_bias", (e, h)),
        act_fn=act,
    )


def canonical_tensors(module: nn.Module, layout: ExpertsLayout) -> dict[str, torch.Tensor | None]:
    """The module's weights in MC's layout: ``gate_up_proj (E, 2I, H)`` (gate rows, then up rows), ``down_proj
    (E, H, I)``, ``gate_up_proj_bias (E, 2I)`` in the same row order and ``down_proj_bias (E, H)`` (None where the
    module has none). Exact copies (transposes and column permutations only)."""
    if layout.stacked:
        return stacked_tensors(module, layout.num_experts, layout.inter, layout.act_fn)
    gu, dn = gate_up_weight(module).detach(), module.down_proj.detach()
    if layout.transposed:
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    gb = None
    if layout.gate_up_bias:
        gb = getattr(module, "gate_up_proj_bias", None)
        gb = (gb if isinstance(gb, torch.Tensor) else module.up_proj_bias).detach()
    if layout.interleaved:
        gu = torch.cat([gu[:, 0::2], gu[:, 1::2]], dim=1)
        gb = torch.cat([gb[:, 0::2], gb[:, 1::2]], dim=1) if gb is not None else None
    db = module.down_proj_bias.detach() if layout.down_bias else None
    out = {"gate_up_proj": gu, "down_proj": dn, "gate_up_proj_bias": gb, "down_proj_bias": db}
    return {k: (v.contiguous() if v is not None else None) for k, v in out.items()}


class CanonicalExperts(nn.Module):
    """Float experts in MC's layout, with optional biases and a gated ``act_fn``: what a deviating module
    (gpt-oss, Aria) is converted into before calibration. Same forward interface as transformers' experts."""

    def __init__(self, tensors: dict[str, torch.Tensor | None], act_fn: Any) -> None:
        super().__init__()
        gu, dn = tensors["gate_up_proj"], tensors["down_proj"]
        self.num_experts, self.hidden_dim, self.intermediate_dim = gu.shape[0], gu.shape[2], dn.shape[2]
        self.gate_up_proj = nn.Parameter(gu, requires_grad=False)
        self.down_proj = nn.Parameter(dn, requires_grad=False)
        for k in ("gate_up_proj_bias", "down_proj_bias"):
            t = tensors.get(k)
            setattr(self, k, nn.Parameter(t, requires_grad=False) if t is not None else None)
        self.act_fn = act_fn

    def expert_act(self, e: int) -> Any:
        """The gate of expert ``e`` with its gate/up bias folded in (what calibration multiplies through)."""
        return self.act_fn if self.gate_up_proj_bias is None else BiasedGLU(self.act_fn, self.gate_up_proj_bias[e])

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.gate_up_proj[e].t()
        if self.gate_up_proj_bias is not None:
            h = h + self.gate_up_proj_bias[e]
        y = intermediate(self.act_fn, h) @ self.down_proj[e].t()
        return y + self.down_proj_bias[e] if self.down_proj_bias is not None else y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            y = self.expert_forward(e, hidden_states[token]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def expert_act(experts: nn.Module, e: int) -> Any:
    """The gate calibration uses for expert ``e`` of a float experts module (its bias folded in where it has one):
    a :class:`CanonicalExperts`' own, else the gate :func:`experts_layout` reads (the module's ``act_fn``, or a
    :class:`~optimum_mc.expert_activation.GatedActivation` for a gate it cannot name)."""
    fn = getattr(experts, "expert_act", None)
    return fn(e) if callable(fn) else experts_layout(experts, type(experts).__name__).act_fn


def _check_same(name: str, original: nn.Module, new: CanonicalExperts, layout: ExpertsLayout) -> None:
    """The converted module must reproduce the original's forward on random routed tokens (fp32 copies)."""
    g = torch.Generator().manual_seed(0)
    dev = new.gate_up_proj.device
    tokens, k = 16, min(2, layout.num_experts)
    x = torch.randn(tokens, layout.hidden, generator=g).to(dev)
    idx = torch.stack([torch.randperm(layout.num_experts, generator=g)[:k] for _ in range(tokens)]).to(dev)
    w = torch.rand(tokens, k, generator=g).to(dev)
    dtype = new.gate_up_proj.dtype
    with torch.no_grad():
        got = new(x.to(dtype), idx, w.to(dtype)).float()
        want = original(x.to(dtype), idx, w.to(dtype)).float().reshape(got.shape)  # (dbrx's: (T, 1, H))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = float((got - want).abs().max())
    if not err <= tol * (float(want.abs().max()) + 1e-6):
        cls, extra = type(original).__name__, _unread_parameters(original)
        if extra:  # (the parameters first: the support table keeps a row's first 300 characters)
            raise UnsupportedArchitectureError(
                f"experts module `{name}` ({cls}) computes more than its two projections: it holds parameters no "
                f"expert layout reads ({extra}), and read as {layout_summary(layout)} it does not reproduce its "
                f"forward after conversion (max |diff| {err:.3g}). A per-expert computation beyond the projections "
                f"(ergo's RMSNorm of each expert's output, after the down projection) neither folds into the "
                f"quantized matrices nor runs in float in front of them (check: experts layout)."
            )
        raise UnsupportedArchitectureError(
            f"experts module `{name}` ({cls}) read as {layout_summary(layout)} does not reproduce its forward after "
            f"conversion (max |diff| {err:.3g}) (check: experts layout)."
        )


_READ = {"gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias", "down_proj_bias"}


def _unread_parameters(module: nn.Module) -> str:
    """``name (shape) (Class)`` of every parameter of ``module`` an experts layout does not read."""
    out, stacked = [], {n for n, _ in stacked_weights(module) or []}
    for n, p in module.named_parameters():
        if n not in _READ and n not in stacked:
            owner = module.get_submodule(n.rpartition(".")[0]) if "." in n else module
            out.append(f"{n} {tuple(p.shape)} ({type(owner).__name__})")
    return ", ".join(out)


def _probed_gate(act: Any) -> bool:
    from .expert_activation import GatedActivation

    return isinstance(act, GatedActivation)


def layout_summary(layout: ExpertsLayout) -> str:
    parts = ["transposed" if layout.transposed else "(E, 2I, H)"]
    parts += ["interleaved gate/up"] if layout.interleaved else []
    parts += ["non-gated"] if not layout.gated else []
    parts += ["stacked 2-D"] if layout.stacked else []
    parts += ["biases"] if layout.bias else []
    return ", ".join(parts) + f", gate {layout.act_fn!r}"


def canonical_experts(module: nn.Module, name: str = "experts") -> nn.Module:
    """``module`` itself when it is in MC's layout without biases, else an equivalent :class:`CanonicalExperts`
    (checked against the original's forward)."""
    if isinstance(module, CanonicalExperts) or hasattr(module, "packed"):
        return module
    layout = experts_layout(module, name)
    if layout.canonical and not layout.bias and (_probed_gate(layout.act_fn) or not hasattr(layout.act_fn, "glu")):
        return module  # (a gate read from the module's forward is evaluated by that module's own code)
    new = CanonicalExperts(canonical_tensors(module, layout), layout.act_fn)
    _check_same(name, module, new, layout)
    return new
