"""PMQ, per MoE layer: routing statistics and per-expert losses (the factors) -> bit allocation (OR-Tools) -> GPTQ of
every expert at its width, packed into one :class:`~optimum_mc.nn.MCExperts`.

The pipeline driver (pipeline.py) calls it at fixed points of each decoder layer: :meth:`PMQ.prepare` once the
float layer is fetched, :meth:`PMQ.capture` around the calibration forward, then :meth:`PMQ.measure` (factors
only: the first pass of ``allocation="global"``) or :meth:`PMQ.compress` (factors, allocation, GPTQ, packing).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils.logging import tqdm  # silenced by disable_progress_bar() / HF_HUB_DISABLE_PROGRESS_BARS

from .allocation import ExpertFactors, SolveReport, allocate_bits
from .architectures import MoEArchitecture, MoEBlock, moe_block
from .bitwidths import ExpertBits
from .budget import expert_code_bits, global_code_bits
from .calibration.capture import RoutingCapture
from .calibration.expert_gptq import quantize_experts
from .calibration.factors import ExpertQuant, GPTQOptions, expert_losses, quantize_expert, rtn_loss_table
from .calibration.tuning import tune_layer
from .config import MCConfig
from .errors import CalibrationError
from .expert_layout import canonical_experts, expert_act, experts_layout
from .group_quant import check_finite
from .nn import MCExperts
from .nn.experts import packed_like

logger = logging.getLogger(__name__)

# Round-to-nearest eps of an expert is measured on at most this many of its routed tokens (evenly spaced; the
# squared error is rescaled to all of them): a relative output error is estimated to a few percent from 4k tokens,
# while the full count would make eps cost 4 expert forwards over every routed token (docs/scale.md).
RTN_LOSS_MAX_TOKENS = 4096


@dataclass
class LayerFactors:
    """What calibration measured for one MoE layer."""

    factors: ExpertFactors
    methods: list[str] = field(default_factory=list)


class PMQ:
    """Mixed-precision quantization of a model's routed experts; holds what it measured and chose per MoE layer."""

    def __init__(self, config: MCConfig, arch: MoEArchitecture, structures: list[nn.Module]) -> None:
        self.config, self.arch = config, arch
        self.opts = GPTQOptions.from_config(config)
        blocks = {i: moe_block(layer, i, arch) for i, layer in enumerate(structures)}
        self.moe_layers = [i for i, b in blocks.items() if b is not None]
        self.num_experts = {i: int(blocks[i].experts.num_experts) for i in self.moe_layers}
        # the allocation's target in code bits per MoE layer (config.bits less scales / zeros when it counts them)
        self.code_bits = {i: expert_code_bits(config, blocks[i].experts) for i in self.moe_layers}
        self.factors: dict[int, LayerFactors] = {}
        self.bits: dict[int, list[ExpertBits]] = {}
        self.tuned: dict[int, list[float]] = {}
        self.solve_reports: list[SolveReport] = []
        self.blocks: dict[int, MoEBlock] = {}  # MoE parts of the layer being processed
        self.progress = config.show_progress

    # -- the layer being processed -----------------------------------------------------------------------------
    def prepare(self, idx: int, layer: nn.Module) -> MoEBlock | None:
        """Find the fetched float layer's MoE block and bring its experts into MC's layout (same forward)."""
        blk = moe_block(layer, idx, self.arch)
        if blk is not None and callable(getattr(blk.block, "check_original", None)):
            blk.block.check_original()  # an adapted block (input_scaled.py) reproduces the replaced one
        if blk is not None:  # transposed / interleaved / biased experts (gpt-oss, Aria) in MC's layout, same forward
            experts = canonical_experts(blk.experts, f"layers.{idx}.{self.arch.block_attr}.{self.arch.experts_attr}")
            if experts is not blk.experts:
                setattr(blk.block, self.arch.experts_attr, experts)
                blk.experts = experts
        self.blocks = {idx: blk} if blk is not None else {}
        return blk

    def capture(self, idx: int) -> RoutingCapture | None:
        """Hooks recording the layer's routing and each expert's routed tokens (None for a dense layer)."""
        block = self.blocks.get(idx)
        if block is None:
            return None
        keep_all = self.config.expert_hessian == "router-weighted"
        return RoutingCapture(self.arch, block.router, block.experts, keep_all)

    def measure(self, idx: int, routing: RoutingCapture) -> None:
        """The layer's factors only (``allocation="global"``'s first pass; nothing is quantized)."""
        tries, need_loss = self.bits_to_try(idx, routing.num_experts, None)
        cands, loss, proj = self.expert_candidates(idx, routing, tries, need_loss)
        self.factors[idx] = self.layer_factors(idx, routing, loss, cands, proj)

    def compress(self, idx: int, routing: RoutingCapture, known: list[ExpertBits] | None) -> None:
        """Factors, widths (``known``: solved already by the global allocation), GPTQ and packing of the layer's
        experts; the packed module replaces the float one."""
        tries, need_loss = self.bits_to_try(idx, routing.num_experts, known)
        cands, loss, proj = self.expert_candidates(idx, routing, tries, need_loss)
        lf = self.layer_factors(idx, routing, loss, cands, proj)
        if idx not in self.factors:
            self.factors[idx] = lf
        bits = known if known is not None else self.allocate_layer(idx, self.factors[idx], routing)
        new = packed_like(self.blocks[idx].experts, bits, self.config.group_size, metadata=self.config.metadata)
        methods = [""] * len(bits)
        old = self.blocks[idx].experts
        biases = getattr(old, "gate_up_proj_bias", None), getattr(old, "down_proj_bias", None)

        def emit(e: int, q: ExpertQuant) -> None:  # packed at once: unpacked codes never pile up
            new.set_expert(e, gate_up=q.gate_up, down=q.down)
            new.set_bias(e, *biases)
            methods[e] = q.method

        todo = {}
        for e, b in enumerate(bits):
            if isinstance(b, int) and b in cands[e]:
                emit(e, cands[e][b])
            else:
                todo[e] = b  # GPTQ at the allocated width only
        del cands
        self.quantize_batch(idx, routing, todo, emit)
        self.factors[idx].methods = methods
        self.bits[idx] = bits
        self.replace_experts(idx, new)

    def replace_experts(self, idx: int, new: MCExperts) -> None:
        block = self.blocks[idx]
        setattr(block.block, self.arch.experts_attr, new)
        block.experts = new

    # -- factors -----------------------------------------------------------------------------------------------
    def bits_to_try(self, idx: int, num_experts: int, known: list[int] | None) -> tuple[list[list[int]], bool]:
        """Widths to GPTQ before allocation, and whether losses are needed. Only ``loss_method="insample"`` needs
        GPTQ at every candidate width; otherwise GPTQ runs after allocation at the chosen width only."""
        cfg = self.config
        if known is not None:
            return [[] for _ in known], False
        if cfg.is_uniform:
            return [[] for _ in range(num_experts)], False
        if cfg.allocation in ("layer", "global") and cfg.loss_method == "insample":
            return [list(cfg.candidate_bits) for _ in range(num_experts)], True
        need_loss = cfg.allocation in ("layer", "global", "hessian")
        return [[] for _ in range(num_experts)], need_loss

    def expert_candidates(self, idx: int, routing: RoutingCapture, bits_to_try: list[list[int]], need_loss: bool):
        """Quantize each expert at each requested bit-width; return candidates and losses (E, C)."""
        cfg = self.config
        experts = self.blocks[idx].experts
        cb = cfg.candidate_bits
        e_total = routing.num_experts
        cands: list[dict[int, ExpertQuant]] = [{} for _ in range(e_total)]
        loss = torch.zeros(e_total, len(cb), dtype=torch.float64)
        per_projection = cfg.allocation_granularity == "projection" and need_loss
        proj = torch.zeros(e_total, 2, len(cb), dtype=torch.float64) if per_projection else None
        method = "hessian" if cfg.allocation == "hessian" else cfg.loss_method
        for e in tqdm(range(e_total), desc=f"layer {idx} experts", leave=False, disable=not self.progress):
            w_gu, w_dn = experts.gate_up_proj[e].detach().float(), experts.down_proj[e].detach().float()
            check_finite(w_gu, f"layer {idx} expert {e} gate_up_proj")
            check_finite(w_dn, f"layer {idx} expert {e} down_proj")
            act = expert_act(experts, e)  # its gate/up bias folded in, where it has one
            cands[e] = self.quantize_one(routing, e, w_gu, w_dn, act, bits_to_try[e])
            if not need_loss:
                continue
            x, r = routing.experts[e].cat(routing.hidden_dim)
            energy = routing.output_energy if cfg.loss_normalizer == "block" else routing.residual_energy
            if method == "rtn" and x.shape[0] > RTN_LOSS_MAX_TOKENS:  # an evenly spaced sample, error rescaled
                keep = torch.linspace(0, x.shape[0] - 1, RTN_LOSS_MAX_TOKENS, device=x.device).long()
                energy = energy * RTN_LOSS_MAX_TOKENS / x.shape[0]
                x, r = x[keep], r[keep]
            if proj is not None:  # loss_method "rtn" (checked by MCConfig): whole and per-projection in one pass
                args = (x, r, w_gu, w_dn, act, cb, self.opts.group_size, energy, self.opts.zero_point)
                whole, per = rtn_loss_table(*args)
                loss[e], proj[e] = torch.tensor(whole, dtype=torch.float64), torch.tensor(per, dtype=torch.float64)
                continue
            seed = cfg.seed + 1009 * idx + e
            losses = expert_losses(
                method, x, r, w_gu, w_dn, act, cb, self.opts, energy, routing.tokens, cfg.heldout_fraction,
                seed=seed, candidates=cands[e],
            )  # fmt: skip
            loss[e] = torch.tensor(losses, dtype=torch.float64)
        return cands, loss, proj

    def quantize_one(self, routing: RoutingCapture, e: int, w_gu, w_dn, act_fn, bits: list[int]) -> dict:
        """GPTQ of expert ``e`` at ``bits`` from its routed tokens, or (``expert_hessian="router-weighted"``) from
        every token weighted by its router probability."""
        if self.config.expert_hessian == "router-weighted":
            x, p = routing.router_weighted(e)
            return quantize_expert(w_gu, w_dn, x, act_fn, bits, self.opts, token_weights=p)
        x, _ = routing.experts[e].cat(routing.hidden_dim)
        return quantize_expert(w_gu, w_dn, x, act_fn, bits, self.opts)

    def layer_factors(self, idx: int, routing: RoutingCapture, loss: torch.Tensor, cands, proj=None) -> LayerFactors:
        if routing.tokens == 0:
            raise CalibrationError(f"MoE layer {idx} saw no calibration tokens.")
        freq = (routing.counts / routing.tokens).float()
        mass = (routing.prob_sum / routing.tokens).float()
        never = [e for e in range(routing.num_experts) if routing.counts[e] == 0]
        if never:
            logger.warning(
                "layer %d: experts %s were never routed on the calibration data; they get calibration-free "
                "quantization and the lowest importance (use more or more varied calibration text to measure them)",
                idx,
                never,
            )
        methods = [next(iter(c.values())).method if c else "" for c in cands]
        proj = proj.float() if proj is not None else None
        return LayerFactors(ExpertFactors(freq, mass, loss.float(), projection_loss=proj), methods)

    # -- allocation --------------------------------------------------------------------------------------------
    def _allocate(self, factors: list[ExpertFactors], code_bits: float, allocation: str, exponents, seed: int):
        cfg = self.config
        return allocate_bits(
            factors,
            cfg.candidate_bits,
            code_bits,
            allocation,
            *exponents,
            constraints=cfg.allocation_constraints,
            seed=seed,
            solver=cfg.allocation_solver,
            time_limit=cfg.allocation_time_limit,
            report=self.solve_reports,
            granularity=cfg.allocation_granularity,
        )

    def allocate_layer(self, idx: int, lf: LayerFactors, routing: RoutingCapture | None = None) -> list[ExpertBits]:
        cfg = self.config
        if cfg.is_uniform:
            return [cfg.candidate_bits[0]] * lf.factors.frequency.numel()
        exponents = (cfg.alpha, cfg.beta, cfg.gamma)
        if cfg.tune_exponents and cfg.allocation == "layer" and routing is not None:
            exponents = tune_layer(
                routing, self.blocks[idx].experts, lf.factors, cfg, cfg.seed + 7919 * idx, self.code_bits[idx]
            )
            self.tuned[idx] = list(exponents)
        return self._allocate([lf.factors], self.code_bits[idx], cfg.allocation, exponents, cfg.seed + idx)[0]

    def allocate_global(self) -> dict[int, list[ExpertBits]]:
        """One program over every MoE layer's factors (``allocation="global"``, after the measuring pass)."""
        cfg = self.config
        factors = [self.factors[i].factors for i in self.moe_layers]
        target = global_code_bits(
            [self.num_experts[i] for i in self.moe_layers], [self.code_bits[i] for i in self.moe_layers]
        )
        solved = self._allocate(factors, target, "global", (cfg.alpha, cfg.beta, cfg.gamma), cfg.seed)
        return dict(zip(self.moe_layers, solved))

    # -- GPTQ --------------------------------------------------------------------------------------------------
    def quantize_batch(self, idx: int, routing: RoutingCapture, bits: dict[int, int], emit) -> None:
        """GPTQ of the experts in ``bits`` (expert -> width) in batched column loops (same result as one by one);
        each result goes to ``emit(e, quant)`` as soon as its chunk is done."""
        experts = self.blocks[idx].experts
        weighted = self.config.expert_hessian == "router-weighted"

        def weights(e: int):
            return experts.gate_up_proj[e].detach().float(), experts.down_proj[e].detach().float()

        def tokens(e: int):
            if weighted:
                return routing.router_weighted(e)
            return routing.experts[e].cat(routing.hidden_dim, native=True)[0], None

        def count(e: int) -> int:  # rows tokens(e) returns: every calibration token, or those routed to e
            return int(routing.tokens) if weighted else int(routing.counts[e])

        acts = functools.partial(expert_act, experts)
        act_fn = experts_layout(experts, type(experts).__name__).act_fn
        quantize_experts(weights, tokens, act_fn, bits, self.opts, emit=emit, count=count, expert_act=acts)
