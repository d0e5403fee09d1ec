"""MoE blocks whose router returns logits only and that select the top-k themselves (DBRX), as MC's router /
experts pair.

transformers' shared MoE interface is a router returning ``(router_logits, top_k_weights, top_k_index)`` (what MC's
routing capture and ODP hook) and an experts module ``forward(hidden_states, top_k_index, top_k_weights)``. Some
blocks keep the experts contract but route in the block: the router returns the ``(T, E)`` logits alone and the
block's forward turns them into top-k weights and indices (DBRX's ``DbrxFFN``: softmax, top-k, weights divided by
their p-norm).

:func:`adapt_topk_blocks` finds such blocks by structure (a child with an ``(E, H)`` weight returning a ``(T, E)``
floating tensor only, next to an experts module :func:`~optimum_mc.architectures.is_experts` reads) and replaces
each by a :class:`TopKBlock`:

* its router is a :class:`LogitsTopKRouter`: the replaced router's own parameters and submodules (the same objects,
  the same names: checkpoint keys unchanged) and forward for the logits, followed by the top-k the block did; which
  score function that is (``input_scaled._SCORES``) is read by running the block with a stand-in router returning
  fixed logits and a stand-in experts module recording what it is handed;
* the experts module is kept as is; the block returns the experts' output in the shape of its input.

The adapter is checked against the replaced block on real weights (:meth:`TopKBlock.check_original`) before it is
quantized; a block of this structure that it does not reproduce is refused with a typed error.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import UnsupportedArchitectureError
from .input_scaled import _SCORES, _meta_copy, _scores, replace_blocks

_PROBE_TOKENS = 16


class LogitsTopKRouter(nn.Module):
    """A logits-only router followed by the top-k its block did: returns ``(logits, top_k_weights, top_k_index)``.
    Shares the replaced router's parameter, buffer and submodule dictionaries (the same tensors under the same
    names) and runs its class's forward for the logits."""

    def __init__(self, router: nn.Module, top_k: int, kind: str, num_experts: int, hidden: int) -> None:
        super().__init__()
        self._parameters, self._buffers, self._modules = router._parameters, router._buffers, router._modules
        self.__dict__["_mc_logits"] = router  # (not a submodule: its tensors are this module's own)
        self.top_k, self.kind, self.num_experts, self.hidden_dim = int(top_k), kind, int(num_experts), int(hidden)
        self.score_fn = "sigmoid" if kind == "sigmoid_topk" else "softmax"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inner = self.__dict__["_mc_logits"]
        inner.training = self.training
        logits = type(inner).forward(inner, hidden_states.reshape(-1, self.hidden_dim))
        weights, index = _scores(self.kind, logits, self.top_k)
        return logits, weights, index

    def extra_repr(self) -> str:
        return f"{self.hidden_dim} -> {self.num_experts}, top_k={self.top_k}, scores={self.kind}"


class TopKBlock(nn.Module):
    """``experts(x, *router(x))`` from a :class:`LogitsTopKRouter` and an experts module following the shared
    contract, returned in the shape of the input (what the replaced block returned)."""

    float_experts_canonical = True  # model.dequantize(): float experts in MC's layout (CanonicalExperts) here

    def __init__(self, router: LogitsTopKRouter, experts: nn.Module, router_attr: str, experts_attr: str) -> None:
        super().__init__()
        self.router_attr, self.experts_attr = router_attr, experts_attr
        setattr(self, router_attr, router)
        setattr(self, experts_attr, experts)
        self.hidden_dim = router.hidden_dim

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, self.hidden_dim)
        _, weights, index = getattr(self, self.router_attr)(x)
        return getattr(self, self.experts_attr)(x, index, weights).reshape(hidden_states.shape)

    def check_original(self) -> None:
        """Compare with the replaced block on this block's (real) weights; typed error when they differ. Run once
        (the replaced block is dropped afterwards); nothing to do on the meta device or when already done."""
        original = self.__dict__.get("_mc_original")
        w = next(self.parameters(), None)
        if original is None or w is None or w.is_meta:
            return
        original.load_state_dict(self.state_dict(), assign=True)
        with torch.device("cpu"):
            x = torch.randn(1, _PROBE_TOKENS, self.hidden_dim, generator=torch.Generator().manual_seed(0))
        x = x.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            want, got = original(x), self(x)
        want = (want[0] if isinstance(want, tuple) else want).float().reshape(got.shape)
        err = float((want - got.float()).abs().max())
        tol = (1e-4 if w.dtype == torch.float32 else 3e-2) * (float(want.abs().max()) + 1e-6)
        del self.__dict__["_mc_original"]
        if not err <= tol:
            raise UnsupportedArchitectureError(
                f"MoE block {type(original).__name__}: read as a logits-only router and a top-k "
                f"({getattr(self, self.router_attr).kind}) in the block, the adapter does not reproduce its forward "
                f"(max |diff| {err:.3g}) (check: block top-k)."
            )


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits


class _Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        self.seen.append((top_k_index, top_k_weights))
        return torch.zeros_like(hidden_states)


def _logits_only(router: nn.Module, num_experts: int, hidden: int) -> bool:
    """The router's forward (on a meta copy: shapes only) returns one ``(T, E)`` floating tensor."""
    try:
        with torch.device("meta"), torch.no_grad():
            out = type(router).forward(_meta_copy(router), torch.empty(3, hidden))
    except Exception:
        return False
    return isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) == (3, num_experts)


def _candidate(block: nn.Module) -> tuple[str, nn.Module, str, nn.Module] | None:
    """``(experts_attr, experts, router_attr, router)`` of a block of this structure, else None."""
    from .architectures import is_experts
    from .expert_layout import experts_layout

    experts = [(n, c) for n, c in block.named_children() if is_experts(c) and not hasattr(c, "packed")]
    if len(experts) != 1 or isinstance(block, TopKBlock):
        return None
    e_attr, ex = experts[0]
    try:
        layout = experts_layout(ex, e_attr)
    except UnsupportedArchitectureError:
        return None
    routers = [
        (n, c)
        for n, c in block.named_children()
        if c is not ex
        and any(p.dim() == 2 and tuple(p.shape) == (layout.num_experts, layout.hidden) for p in c.parameters())
    ]
    if len(routers) != 1 or not _logits_only(routers[0][1], layout.num_experts, layout.hidden):
        return None
    return e_attr, ex, routers[0][0], routers[0][1]


def _block_kind(name: str, block: nn.Module, r_attr: str, e_attr: str, e: int, hidden: int) -> tuple[str, int]:
    """``(score function, top_k)`` of the block's own top-k: the block run on CPU with a stand-in router returning
    random logits and a stand-in experts module recording the ``(index, weights)`` it is handed."""
    with torch.device("cpu"), torch.no_grad():
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(_PROBE_TOKENS, e, generator=g) * 2
        probe = copy.copy(block)
        recorder = _Recorder()
        probe._modules = {**block._modules, r_attr: _FixedLogits(logits), e_attr: recorder}
        try:
            probe.forward(torch.randn(1, _PROBE_TOKENS, hidden, generator=g))
        except Exception as exc:
            raise UnsupportedArchitectureError(
                f"MoE block `{name}` ({type(block).__name__}): its router `{name}.{r_attr}` "
                f"({type(block._modules[r_attr]).__name__}) returns logits only, and the block does not run with a "
                f"stand-in router and experts ({type(exc).__name__}: {exc}) (check: block top-k)."
            ) from exc
    if len(recorder.seen) != 1:
        raise UnsupportedArchitectureError(
            f"MoE block `{name}` ({type(block).__name__}) calls its experts {len(recorder.seen)} times; expected "
            f"once (check: block top-k)."
        )
    index, weights = recorder.seen[0]
    k = int(index.shape[-1])
    got = torch.zeros_like(logits).scatter(-1, index.reshape(-1, k).long(), weights.reshape(-1, k).float())
    for kind in _SCORES:
        w, i = _scores(kind, logits, k)
        if torch.allclose(torch.zeros_like(logits).scatter(-1, i, w), got, rtol=1e-5, atol=1e-6):
            return kind, k
    raise UnsupportedArchitectureError(
        f"MoE block `{name}` ({type(block).__name__}) turns its router's logits into top-{k} weights that no score "
        f"function ({', '.join(_SCORES)}) reproduces (check: block top-k)."
    )


def _adapt(name: str, block: nn.Module) -> TopKBlock | None:
    found = _candidate(block)
    if found is None:
        return None
    e_attr, ex, r_attr, router = found
    from .expert_layout import experts_layout

    layout = experts_layout(ex, e_attr)
    kind, top_k = _block_kind(name, block, r_attr, e_attr, layout.num_experts, layout.hidden)
    new = TopKBlock(LogitsTopKRouter(router, top_k, kind, layout.num_experts, layout.hidden), ex, r_attr, e_attr)
    new.__dict__["_mc_original"] = block  # compared with on real weights (check_original), then dropped
    return new


def adapt_topk_blocks(layers: nn.ModuleList) -> int:
    """Replace every block of the decoder ``layers`` that routes in the block (see the module docstring) by a
    :class:`TopKBlock`; the number replaced."""
    return replace_blocks(layers, TopKBlock, _adapt)
