"""Whether a router renormalizes the weights of its selected experts: it decides what ODP does to the kept ones.

ODP's rule is stated on the routing weights the experts actually receive (``top_k_weights``), so it reads the same
for every routing function: a token drops a selected slot when its weight divided by the token's largest weight is
below the layer threshold (scale-free: softmax probabilities, sigmoid scores and DeepSeek's ``routed_scaling_factor``
all give the same ratios). What happens to the kept weights follows what the router would have returned had it
selected only the kept experts:

* a *normalized* router (mixtral's softmax over the top-k, qwen3_moe / deepseek_v3 with ``norm_topk_prob``) gives
  its selected weights a fixed sum (1, or the routed scaling factor): the kept weights are rescaled to that sum;
* an *un-normalized* router (qwen2_moe's softmax over all experts without ``norm_topk_prob``, sigmoid scores without
  renormalization) gives each expert a weight that does not depend on the others selected: the kept weights stay
  as they are and a dropped expert's contribution is simply removed.

Which one a router is, is read from the router itself, not from config names: :func:`routing_is_normalized` runs it
on random hidden states and checks whether every token's selected weights sum to the same value.
"""

from __future__ import annotations

import torch
from torch import nn

PROBE_TOKENS = 64
PROBE_SCALE = 4.0  # spreads the router logits, so an un-normalized router's sums vary visibly


def _router_weight(router: nn.Module) -> torch.Tensor | None:
    """The router's ``(E, H)`` scoring matrix (architectures.py found the router by it)."""
    return next((p for p in router.parameters() if p.dim() == 2), None)


@torch.no_grad()
def routing_is_normalized(router: nn.Module) -> bool:
    """True when ``router`` returns selected weights with one sum for every token (see the module docstring).

    A router the probe cannot run (meta weights, an unexpected signature) counts as normalized: the paper's rule,
    which rescales the kept weights, applies."""
    w = _router_weight(router)
    if w is None or w.is_meta:
        return True
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(PROBE_TOKENS, w.shape[-1], generator=g) * PROBE_SCALE).to(device=w.device, dtype=w.dtype)
    try:
        out = router.forward(x)  # not __call__: no forward hook (ODP's or a user's) sees the probe
    except Exception:  # a router that needs more than hidden states: assume the paper's (normalized) case
        return True
    if not isinstance(out, tuple) or len(out) < 2:
        return True
    sums = out[1].float().reshape(-1, out[1].shape[-1]).sum(-1)
    eps = torch.finfo(out[1].dtype).eps if out[1].is_floating_point() else 1e-6
    spread = float((sums.max() - sums.min()).abs())
    return spread <= 8 * eps * float(sums.abs().mean()) * out[1].shape[-1]
