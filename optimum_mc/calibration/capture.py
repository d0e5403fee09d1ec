"""Forward hooks that record what calibration needs from one decoder layer.

- :class:`LinearInputs`: input Hessians ``2/n X^T X`` of plain ``nn.Linear`` modules (attention, shared experts,
  dense MLPs) for GPTQ.
- :class:`RoutingCapture`: for one MoE block, the router's per-expert probabilities and the tokens routed to each
  expert together with their routing weights (what the experts module receives).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..architectures import MoEArchitecture, router_output_positions, router_probabilities
from ..expert_layout import gate_up_weight
from ..gptq import HessianAccumulator


class _Hooks:
    """Owns forward hook handles; ``remove()`` detaches them all."""

    _handles: list

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class LinearInputs(_Hooks):
    """Accumulate the input Hessian of each given ``nn.Linear`` while the layer runs.

    Modules fed the very same input tensor (q/k/v projections, gate/up of a dense MLP) share one accumulator: their
    Hessians are identical, so it is computed once (``hessians[k] is hessians[q]``).
    """

    def __init__(self, modules: dict[str, nn.Linear], device: torch.device | str = "cpu") -> None:
        self.hessians = {
            name: HessianAccumulator(m.in_features, device=torch.device(device)) for name, m in modules.items()
        }
        self._previous: tuple[torch.Tensor, HessianAccumulator] | None = None
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self._previous is not None and self._previous[0] is x:
                self.hessians[name] = self._previous[1]  # same input as the module before: same Hessian
                return
            acc = self.hessians[name]
            acc.add(x.detach())
            self._previous = (x, acc)

        return hook

    def remove(self) -> None:
        super().remove()
        self._previous = None


@dataclass
class ExpertTokens:
    """Calibration tokens routed to one expert, as indices into the recorded experts inputs (no copies).

    ``cat`` gathers them: inputs ``(n, H)`` (fp32, or the model dtype with ``native=True``: half the memory, for
    consumers that convert chunk by chunk) and routing weights ``(n,)``, on the calibration device.
    """

    store: list[torch.Tensor]
    rows: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    token_ids: list[torch.Tensor] = field(default_factory=list)  # position among all tokens the block saw

    def ids(self) -> torch.Tensor:
        return torch.cat(self.token_ids) if self.token_ids else torch.zeros(0, dtype=torch.long)

    def cat(self, hidden_dim: int, native: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.rows:
            device = self.store[0].device if self.store else "cpu"
            return torch.zeros(0, hidden_dim, device=device), torch.zeros(0, device=device)
        x = torch.cat([self.store[b][tok] for b, tok in self.rows])
        return (x if native else x.float()), torch.cat(self.weights)


class RoutingCapture(_Hooks):
    """Record routing statistics and per-expert routed tokens of one MoE block."""

    def __init__(self, arch: MoEArchitecture, router: nn.Module, experts: nn.Module, keep_all: bool = False) -> None:
        self.arch = arch
        self.keep_all = keep_all  # also keep every token's router probabilities (router-weighted GPTQ)
        self.all_probs: list[torch.Tensor] = []
        self.num_experts = int(experts.num_experts)
        self.hidden_dim = int(getattr(experts, "hidden_dim", None) or gate_up_weight(experts).shape[-1])
        e = self.num_experts
        self.tokens = 0
        self.counts = torch.zeros(e, dtype=torch.float64)
        self.prob_sum = torch.zeros(e, dtype=torch.float64)  # sum of the router probability over selecting tokens
        self.ratios: list[torch.Tensor] = []  # routing weight of slots 2..k divided by the top-1 weight
        self.inputs: list[torch.Tensor] = []  # the experts module's input of every batch, (T, H), model dtype
        self.experts = [ExpertTokens(self.inputs) for _ in range(e)]
        self.output_energy = 0.0  # sum over tokens of ||experts output||^2 (the routed part of the block output)
        self.residual_energy = 0.0  # the same for the decoder layer's output (run_layer's on_output: layer_output)
        self.seen = 0  # tokens the experts module has received so far
        self._handles = [
            router.register_forward_hook(self._router_hook),
            experts.register_forward_pre_hook(self._experts_hook),
            experts.register_forward_hook(self._experts_out_hook),
        ]

    def layer_output(self, y: torch.Tensor) -> None:
        """Accumulate the decoder layer's output energy (``loss_normalizer="residual"``); given to ``run_layer``."""
        self.residual_energy += float(y.float().pow(2).sum())

    def _router_hook(self, module: nn.Module, args: tuple, output: tuple) -> None:
        logits, weights, index = (output[i] for i in router_output_positions(output))
        probs = router_probabilities(self.arch, logits.reshape(-1, logits.shape[-1]).detach())
        if self.keep_all:
            self.all_probs.append(probs.float())
        index = index.reshape(-1, index.shape[-1])
        self.tokens += index.shape[0]
        selected = probs.gather(1, index).double().cpu().reshape(-1)
        flat = index.reshape(-1).cpu()
        # a router may score experts the experts module lacks (zero / identity / skip ones): their slots, and slots
        # handed to a real expert with weight 0 in their stead (zaya's skip expert), are no expert's tokens
        own = (flat < self.num_experts) & (weights.reshape(-1) != 0).cpu()
        flat, selected = flat[own], selected[own]
        self.counts += torch.bincount(flat, minlength=self.num_experts).double()
        self.prob_sum.index_add_(0, flat, selected)
        w = weights.reshape(index.shape).detach().float()
        if w.shape[-1] > 1:
            top1 = w.max(-1, keepdim=True).values.clamp_min(1e-20)
            ratio = (w / top1).sort(-1, descending=True).values[:, 1:]
            self.ratios.append(ratio.cpu())

    def _experts_hook(self, module: nn.Module, args: tuple) -> None:
        hidden, index, weights = args[0], args[1], args[2]
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        index = index.detach()
        weights = weights.detach().float()
        batch = len(self.inputs)
        self.inputs.append(hidden)  # kept once, in the model dtype; experts index into it
        for e in torch.unique(index).tolist():
            if e >= self.num_experts:
                continue
            # a slot of weight 0 adds nothing to the output (a block routing its identity experts' slots to a real
            # expert with weight 0, longcat_flash): not a calibration token of that expert
            tok, slot = torch.where((index == e) & (weights != 0))
            if tok.numel() == 0:
                continue
            self.experts[e].rows.append((batch, tok))
            self.experts[e].weights.append(weights[tok, slot])
            self.experts[e].token_ids.append(tok + self.seen)
        self.seen += hidden.shape[0]

    def _experts_out_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.output_energy += output.detach().float().pow(2).sum().item()

    def router_weighted(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every calibration token's input ``(N, H)`` (model dtype) and its router probability for ``expert``
        ``(N,)`` (needs ``keep_all=True``)."""
        x = torch.cat(self.inputs)
        return x, torch.cat(self.all_probs)[:, expert].to(x.device)
