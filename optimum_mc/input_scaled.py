"""MoE blocks whose experts see inputs already scaled by the routing weights (Llama 4), as MC's router / experts pair.

transformers' shared MoE interface is a router returning ``(router_logits, top_k_weights, top_k_index)`` and an
experts module ``forward(hidden_states, top_k_index, top_k_weights)`` that weights each expert's *output*:
``sum_k w_k f_{e_k}(x)``. Some blocks deviate (Llama 4's ``Llama4TextMoe``):

* the router is a plain ``(E, H)`` linear layer that returns a **dense** ``(T, E)`` score matrix (the score of the
  top-k logits, 0 elsewhere) and the logits;
* the experts take ``forward(hidden_states)`` only: ``E * T`` rows, sorted per expert, every expert applied to every
  token's **input scaled by its score**: ``sum_k f_{e_k}(w_k x)`` (not ``w_k f_{e_k}(x)``: the gate is not linear);
* shared experts are added to the routed output.

:func:`adapt_input_scaled_blocks` finds such blocks by structure (an experts module with 3-D ``gate_up_proj`` whose
forward takes only the hidden states, next to a child with an ``(E, H)`` weight returning a dense ``(T, E)`` score
matrix) and replaces each by an :class:`InputScaledMoE` with the same parameter names (checkpoint keys unchanged):

* :class:`TopKRouter`: the same ``(E, H)`` weight, returning ``(logits, top_k_weights, top_k_index)``; how the
  scores are made from the logits (sigmoid / softmax of the top-k logits, softmax over all) is read by probing the
  original router with a random weight;
* :class:`RoutedExperts`: the same fused weights (any layout :mod:`.expert_layout` reads) behind the shared
  interface: the ordinary experts contract, so calibration, GPTQ and :class:`~optimum_mc.nn.MCExperts` apply as is;
* the block itself scales the inputs: each ``(token, slot)`` becomes one row ``w_k x`` routed to its expert with
  weight 1, and the rows' outputs are summed per token. A slot ODP drops (index ``E``, weight 0) is skipped.

The adapter is checked against the original block on real weights (:meth:`InputScaledMoE.check_original`) before
it is quantized; a block of this structure that it does not reproduce is refused with a typed error.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedArchitectureError

_PROBE_TOKENS = 16
_SCORES = ("sigmoid_topk", "softmax_topk", "softmax_all")


def _takes_hidden_only(module: nn.Module) -> bool:
    """``forward(hidden_states)``: no other parameter (no routing passed in, not even an optional one)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return False
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD)


def _scores(kind: str, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_weights, top_k_index)`` of ``logits`` (T, E) for a score function of :data:`_SCORES`."""
    top, index = torch.topk(logits, top_k, dim=-1)
    if kind == "sigmoid_topk":
        weights = torch.sigmoid(top.float())
    elif kind == "softmax_topk":
        weights = torch.softmax(top.float(), dim=-1)
    else:
        weights = torch.softmax(logits.float(), dim=-1).gather(-1, index)
    return weights.to(logits.dtype), index


class TopKRouter(nn.Module):
    """A linear router returning ``(router_logits, top_k_weights, top_k_index)`` (transformers' router contract);
    ``weight`` (and ``bias``) keep the replaced router's parameter names."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, top_k: int, kind: str) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.num_experts, self.hidden_dim = int(weight.shape[0]), int(weight.shape[1])
        self.top_k = int(top_k)
        self.kind = kind
        # what architectures.discover records as the router's scoring (router_probabilities)
        self.score_fn = "sigmoid" if kind == "sigmoid_topk" else "softmax"

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight, self.bias)
        weights, index = _scores(self.kind, logits, self.top_k)
        return logits, weights, index

    def extra_repr(self) -> str:
        return f"{self.hidden_dim} -> {self.num_experts}, top_k={self.top_k}, scores={self.kind}"


class RoutedExperts(nn.Module):
    """Fused experts (the replaced module's ``gate_up_proj`` / ``down_proj`` and ``act_fn``, in its storage
    layout) behind transformers' experts contract ``forward(hidden_states, top_k_index, top_k_weights)``."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter, act_fn, num_experts: int) -> None:
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn
        self.num_experts = int(num_experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        from .expert_layout import canonical_tensors, experts_layout
        from .kernels.activations import gated

        layout = experts_layout(self, type(self).__name__)
        w = canonical_tensors(self, layout)
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if e < 0 or e >= self.num_experts:
                continue
            token, slot = torch.where(top_k_index == e)
            h = hidden_states[token] @ w["gate_up_proj"][e].t()
            y = gated(layout.act_fn, *h.chunk(2, dim=-1)) @ w["down_proj"][e].t()
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class InputScaledMoE(nn.Module):
    """``shared(x) + sum_k f_{e_k}(w_k x)`` from a :class:`TopKRouter` and an experts module following the shared
    contract (float :class:`RoutedExperts`, or :class:`~optimum_mc.nn.MCExperts` once quantized). Returns what the
    replaced block returned (``(output, router_logits)``, output flattened to ``(tokens, hidden)`` or not)."""

    scales_expert_inputs = True  # read by ODP: the experts receive one row per (token, slot) with weight 1

    def __init__(
        self,
        router: TopKRouter,
        experts: nn.Module,
        shared: dict[str, nn.Module],
        router_attr: str,
        experts_attr: str,
        flat_output: bool,
        returns_logits: bool,
    ) -> None:
        super().__init__()
        self.router_attr, self.experts_attr = router_attr, experts_attr
        setattr(self, router_attr, router)
        setattr(self, experts_attr, experts)
        self.shared_attrs = tuple(shared)
        for name, module in shared.items():
            setattr(self, name, module)
        self.hidden_dim = router.hidden_dim
        self.flat_output, self.returns_logits = flat_output, returns_logits

    def routed(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """``sum_k f_{e_k}(w_k x)`` of flat ``hidden_states`` (T, H)."""
        t, k = top_k_index.shape
        rows = (hidden_states.unsqueeze(1) * top_k_weights.unsqueeze(-1).to(hidden_states.dtype)).reshape(t * k, -1)
        ones = torch.ones(t * k, 1, dtype=hidden_states.dtype, device=hidden_states.device)
        experts = getattr(self, self.experts_attr)
        return experts(rows, top_k_index.reshape(t * k, 1), ones).reshape(t, k, -1).sum(1)

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_dim)
        logits, weights, index = getattr(self, self.router_attr)(x)
        out = self.routed(x, index, weights)
        for name in self.shared_attrs:
            out = out + getattr(self, name)(x)
        if not self.flat_output:
            out = out.reshape(shape)
        return (out, logits) if self.returns_logits else out

    def check_original(self) -> None:
        """Compare with the replaced block on this block's (real) weights; typed error when they differ. Run once
        (the replaced block is dropped afterwards); nothing to do on the meta device or when already done."""
        original = self.__dict__.get("_mc_original")
        experts = getattr(self, self.experts_attr)
        if original is None or not isinstance(experts, RoutedExperts) or experts.gate_up_proj.is_meta:
            return
        original.load_state_dict(self.state_dict(), assign=True)
        dev, dtype = experts.gate_up_proj.device, experts.gate_up_proj.dtype
        with torch.device("cpu"):
            x = torch.randn(1, _PROBE_TOKENS, self.hidden_dim, generator=torch.Generator().manual_seed(0))
        x = x.to(device=dev, dtype=dtype)
        with torch.no_grad():
            want, got = original(x), self(x)
        want = want[0] if isinstance(want, tuple) else want
        got = got[0] if isinstance(got, tuple) else got
        err = float((want.float() - got.float()).abs().max())
        tol = (1e-4 if dtype == torch.float32 else 3e-2) * (float(want.float().abs().max()) + 1e-6)
        del self.__dict__["_mc_original"]
        if not err <= tol:
            kind = getattr(self, self.router_attr).kind
            raise UnsupportedArchitectureError(
                f"MoE block {type(original).__name__}: read as a dense-score router ({kind}) and experts on inputs "
                f"scaled by their scores, the adapter does not reproduce its forward (max |diff| {err:.3g}) "
                f"(check: input-scaled experts)."
            )


def _router_kind(name: str, router: nn.Module, num_experts: int, hidden: int) -> tuple[str, int]:
    """``(score function, top_k)`` of a router returning a dense ``(T, E)`` score matrix, read by running a probe
    copy with a random weight; typed error when no score function of :data:`_SCORES` reproduces it."""
    with torch.device("cpu"), torch.no_grad():  # the model may be built under a meta-device context
        return _read_router_kind(name, router, num_experts, hidden)


def _read_router_kind(name: str, router: nn.Module, num_experts: int, hidden: int) -> tuple[str, int]:
    probe = nn.Module.__new__(type(router))
    probe.__dict__.update(router.__dict__)
    g = torch.Generator().manual_seed(0)
    probe._parameters = dict(router._parameters)
    probe._parameters["weight"] = nn.Parameter(torch.randn(num_experts, hidden, generator=g), requires_grad=False)
    if probe._parameters.get("bias") is not None:
        probe._parameters["bias"] = nn.Parameter(torch.randn(num_experts, generator=g), requires_grad=False)
    x = torch.randn(_PROBE_TOKENS, hidden, generator=g)
    try:
        out = probe.forward(x)  # not __call__: no hook sees the probe
    except Exception as exc:
        raise UnsupportedArchitectureError(
            f"router `{name}` ({type(router).__name__}) does not run on (tokens, hidden) states ({exc}) "
            f"(check: router)."
        ) from exc
    scores = out[0] if isinstance(out, tuple) else out
    logits = F.linear(x, probe._parameters["weight"], probe._parameters.get("bias"))
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (_PROBE_TOKENS, num_experts):
        raise UnsupportedArchitectureError(
            f"router `{name}` ({type(router).__name__}) returns no dense ({_PROBE_TOKENS}, {num_experts}) score "
            f"matrix first (check: router)."
        )
    top_k = int(getattr(router, "top_k", 0) or int((scores != 0).sum(-1).max()))
    for kind in _SCORES:
        weights, index = _scores(kind, logits, top_k)
        dense = torch.zeros_like(logits).scatter(-1, index, weights)
        if torch.allclose(dense, scores.float(), rtol=1e-5, atol=1e-6):
            return kind, top_k
    raise UnsupportedArchitectureError(
        f"router `{name}` ({type(router).__name__}) returns dense scores that no top-{top_k} score function "
        f"({', '.join(_SCORES)}) of its logits reproduces (check: router)."
    )


def _candidate(block: nn.Module) -> tuple[str, nn.Module, str, nn.Module] | None:
    """``(experts_attr, experts, router_attr, router)`` of a block of the input-scaled structure, else None."""
    experts = [
        (n, c)
        for n, c in block.named_children()
        if isinstance(getattr(c, "gate_up_proj", None), torch.Tensor)
        and c.gate_up_proj.dim() == 3
        and not isinstance(c, RoutedExperts)
        and _takes_hidden_only(c)
    ]
    if len(experts) != 1:
        return None
    e_attr, ex = experts[0]
    e = int(ex.gate_up_proj.shape[0])
    dims = set(ex.gate_up_proj.shape[1:]) | set(ex.down_proj.shape[1:])
    routers = [
        (n, c)
        for n, c in block.named_children()
        if c is not ex
        and isinstance(getattr(c, "weight", None), torch.Tensor)
        and c.weight.dim() == 2
        and c.weight.shape[0] == e
        and int(c.weight.shape[1]) in dims
        and not isinstance(c, TopKRouter)
    ]
    if len(routers) != 1:
        return None
    return e_attr, ex, routers[0][0], routers[0][1]


def _adapt(name: str, block: nn.Module) -> InputScaledMoE | None:
    found = _candidate(block)
    if found is None:
        return None
    e_attr, ex, r_attr, router = found
    e, hidden = int(router.weight.shape[0]), int(router.weight.shape[1])
    kind, top_k = _router_kind(f"{name}.{r_attr}", router, e, hidden)
    # the block's output structure, read on the meta device (shapes only)
    with torch.device("meta"):
        meta_block = _meta_copy(block)
        out = meta_block(torch.empty(2, 3, hidden))
    first = out[0] if isinstance(out, tuple) else out
    if not isinstance(first, torch.Tensor) or first.numel() != 6 * hidden:
        raise UnsupportedArchitectureError(
            f"MoE block `{name}` ({type(block).__name__}) returns {type(out).__name__}; expected the block output "
            f"(and the router logits) (check: input-scaled experts)."
        )
    shared = {n: c for n, c in block.named_children() if c is not ex and c is not router}
    new = InputScaledMoE(
        TopKRouter(router.weight, getattr(router, "bias", None), top_k, kind),
        RoutedExperts(ex.gate_up_proj, ex.down_proj, ex.act_fn, getattr(ex, "num_experts", e)),
        shared,
        r_attr,
        e_attr,
        flat_output=first.dim() == 2,
        returns_logits=isinstance(out, tuple),
    )
    new.__dict__["_mc_original"] = block  # compared with on real weights (check_original), then dropped
    return new


def _meta_copy(block: nn.Module) -> nn.Module:
    """A copy of ``block`` with its parameters and buffers on the meta device (real ones are not copied)."""
    import copy

    memo = {}
    for t in list(block.parameters()) + list(block.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(block, memo)


def replace_blocks(layers: nn.ModuleList, adapted: type, adapt) -> int:
    """Replace each child of the decoder ``layers`` for which ``adapt(name, child)`` returns a module (children
    already of type ``adapted`` are left as they are); the number replaced."""
    n = 0
    for i, layer in enumerate(layers):
        for name, child in list(layer.named_children()):
            if isinstance(child, adapted):
                continue
            new = adapt(f"layers.{i}.{name}", child)
            if new is not None:
                setattr(layer, name, new)
                n += 1
    return n


def adapt_input_scaled_blocks(layers: nn.ModuleList) -> int:
    """Replace every input-scaled MoE block of the decoder ``layers`` (see the module docstring) by an
    :class:`InputScaledMoE`; the number replaced."""
    return replace_blocks(layers, InputScaledMoE, _adapt)
