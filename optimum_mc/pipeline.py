"""Quantize a loaded float MoE model in place with MC's PMQ.

calibration data -> layer 0 inputs -> for each decoder layer: record routing and Hessians on the float layer ->
expert candidates (GPTQ at each candidate bit-width) and their losses -> bit allocation (OR-Tools) -> packed
modules replace the float ones -> the quantized layer's outputs feed the next layer.

``allocation="global"`` needs every layer's factors before any bits are known: a first pass measures them with
float activations, the allocation is solved once, and a second pass quantizes sequentially at the chosen bits.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .allocation import ExpertFactors, SolveReport, allocate_bits, check_feasible, format_allocation_table
from .architectures import MoEArchitecture, MoEBlock, layer_module_names, moe_blocks, require_moe, set_submodule
from .calibration.capture import LinearInputs, RoutingCapture
from .calibration.data import calibration_batches
from .calibration.factors import ExpertQuant, GPTQOptions, expert_losses, quantize_expert
from .calibration.sequential import LayerBatch, capture_layer_inputs, iterate_layers, run_layer
from .calibration.tuning import tune_layer
from .config import MCConfig
from .errors import CalibrationError
from .gptq import gptq_quantize
from .group_quant import check_finite
from .nn import MCExperts, QuantLinear
from .nn.nf4_linear import NF4Linear

logger = logging.getLogger(__name__)

CALIBRATION_BATCH_SIZE = 8
ODP_CALIBRATION_SAMPLES = 16  # sequences used to measure ODP thresholds and layer sensitivity after quantizing


@dataclass
class LayerFactors:
    """What calibration measured for one MoE layer."""

    factors: ExpertFactors
    methods: list[str] = field(default_factory=list)


def linear_targets(layer: nn.Module, block: MoEBlock | None, arch: MoEArchitecture, config: MCConfig) -> dict:
    """The ``nn.Linear`` modules of a decoder layer quantized at ``attn_bits`` (name relative to the layer)."""
    if config.attn_bits is None:
        return {}
    skip_ids = set()
    if block is not None:
        skip_ids |= {id(m) for m in block.router.modules()} | {id(m) for m in block.experts.modules()}
    skip_names = tuple(config.modules_to_not_convert or ()) + ("shared_expert_gate",)
    out = {}
    for name, m in layer.named_modules():
        if type(m) is not nn.Linear or id(m) in skip_ids:
            continue
        if any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip_names):
            continue
        g = m.in_features if config.group_size == -1 else config.group_size
        if m.in_features % g or m.in_features % 32:
            logger.warning(
                "keeping %s in float: in_features=%d is not divisible by group_size=%d", name, m.in_features, g
            )
            continue
        out[name] = m
    return out


def _gptq_opts(config: MCConfig) -> GPTQOptions:
    return GPTQOptions(
        group_size=config.group_size,
        damp_percent=config.damp_percent,
        block_size=config.block_size,
        act_order=config.act_order,
        min_tokens=config.min_expert_tokens,
        zero_point=config.zero_point,
    )


class _Run:
    """State of one quantization run (kept off the modules and out of globals)."""

    def __init__(self, model: nn.Module, config: MCConfig, arch: MoEArchitecture) -> None:
        self.model, self.config, self.arch = model, config, arch
        self.opts = _gptq_opts(config)
        self.blocks = {b.layer_idx: b for b in moe_blocks(model, arch)}
        self.moe_layers = sorted(self.blocks)
        self.layer_names = layer_module_names(model)
        self.factors: dict[int, LayerFactors] = {}
        self.bits: dict[int, list[int]] = {}
        self.linear_bits: dict[str, int] = {}
        self.solve_reports: list[SolveReport] = []
        self.tuned: dict[int, list[float]] = {}
        self.progress = config.show_progress

    # -- one layer ---------------------------------------------------------------------------------------------
    def measure(self, idx: int, layer: nn.Module, batches: list[LayerBatch], with_linears: bool):
        block = self.blocks.get(idx)
        lin = linear_targets(layer, block, self.arch, self.config) if with_linears else {}
        for name, m in lin.items():
            check_finite(m.weight, f"layer {idx} {name}.weight")
        lin_capture = LinearInputs(lin if self.config.nonexpert_method == "gptq" else {})
        keep_all = self.config.expert_hessian == "router-weighted"
        routing = RoutingCapture(self.arch, block.router, block.experts, keep_all) if block is not None else None
        try:
            float_out = run_layer(layer, batches)
        finally:
            lin_capture.remove()
            if routing is not None:
                routing.remove()
        return lin, lin_capture, routing, float_out

    def expert_candidates(self, idx: int, routing: RoutingCapture, bits_to_try: list[list[int]], need_loss: bool):
        """Quantize each expert at each requested bit-width; return candidates and losses (E, C)."""
        cfg = self.config
        experts = self.blocks[idx].experts
        cb = cfg.candidate_bits
        e_total = routing.num_experts
        cands: list[dict[int, ExpertQuant]] = [{} for _ in range(e_total)]
        loss = torch.zeros(e_total, len(cb), dtype=torch.float64)
        method = "hessian" if cfg.allocation == "hessian" else cfg.loss_method
        for e in tqdm(range(e_total), desc=f"layer {idx} experts", leave=False, disable=not self.progress):
            w_gu, w_dn = experts.gate_up_proj[e].detach().float(), experts.down_proj[e].detach().float()
            check_finite(w_gu, f"layer {idx} expert {e} gate_up_proj")
            check_finite(w_dn, f"layer {idx} expert {e} down_proj")
            cands[e] = self.quantize_one(routing, e, w_gu, w_dn, experts.act_fn, bits_to_try[e])
            if need_loss:
                x, r = routing.experts[e].cat(routing.hidden_dim)
                loss[e] = torch.tensor(
                    expert_losses(
                        method, x, r, w_gu, w_dn, experts.act_fn, cb, self.opts, routing.output_energy,
                        routing.tokens, cfg.heldout_fraction, seed=cfg.seed + 1009 * idx + e, candidates=cands[e],
                    ),
                    dtype=torch.float64,
                )
        return cands, loss

    def quantize_one(self, routing: RoutingCapture, e: int, w_gu, w_dn, act_fn, bits: list[int]) -> dict:
        """GPTQ of expert ``e`` at ``bits`` from its routed tokens, or (``expert_hessian="router-weighted"``) from
        every token weighted by its router probability."""
        if self.config.expert_hessian == "router-weighted":
            x, p = routing.router_weighted(e)
            return quantize_expert(w_gu, w_dn, x, act_fn, bits, self.opts, token_weights=p)
        x, _ = routing.experts[e].cat(routing.hidden_dim)
        return quantize_expert(w_gu, w_dn, x, act_fn, bits, self.opts)

    def layer_factors(self, idx: int, routing: RoutingCapture, loss: torch.Tensor, cands) -> LayerFactors:
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
        return LayerFactors(ExpertFactors(frequency=freq, weight_mass=mass, loss=loss.float()), methods)

    def quantize_linears(self, idx: int, layer: nn.Module, lin: dict, capture: LinearInputs) -> None:
        bits = self.config.attn_bits
        for name, m in lin.items():
            self.linear_bits[f"{self.layer_names[idx]}.{name}"] = bits
            if self.config.nonexpert_method == "bnb_nf4":
                set_submodule(layer, name, NF4Linear.from_linear(m))
                continue
            h = capture.hessians[name]
            w = m.weight.detach().float()
            codes, scales, zeros = gptq_quantize(
                w,
                h.hessian,
                bits,
                self.config.group_size,
                damp_percent=self.config.damp_percent,
                block_size=self.config.block_size,
                act_order=self.config.act_order,
                zero_point=self.config.zero_point,
            )
            bias = m.bias.detach() if m.bias is not None else None
            new = QuantLinear.from_codes(codes, scales, zeros, bits, bias=bias, dtype=m.weight.dtype)
            set_submodule(layer, name, new.to(m.weight.device))

    def replace_experts(self, idx: int, bits: list[int], cands: list[dict[int, ExpertQuant]]) -> None:
        block = self.blocks[idx]
        old = block.experts
        dtype, device = old.gate_up_proj.dtype, old.gate_up_proj.device
        new = MCExperts(
            int(old.num_experts),
            int(old.gate_up_proj.shape[2]),
            int(old.gate_up_proj.shape[1] // 2),
            bits,
            self.config.group_size,
            old.act_fn,
            dtype=dtype,
            device=device,
        )
        for e, b in enumerate(bits):
            q = cands[e][b]
            new.set_expert(e, gate_up=q.gate_up, down=q.down)
        setattr(block.block, self.arch.experts_attr, new)
        block.experts = new

    # -- passes ------------------------------------------------------------------------------------------------
    def bits_to_try(self, idx: int, num_experts: int, known: list[int] | None) -> tuple[list[list[int]], bool]:
        """Widths to GPTQ before allocation, and whether losses are needed. Only ``loss_method="insample"`` needs
        GPTQ at every candidate width; otherwise GPTQ runs after allocation at the chosen width only."""
        cfg = self.config
        if known is not None:
            return [[] for _ in known], False
        if cfg.is_uniform:
            return [list(cfg.candidate_bits) for _ in range(num_experts)], False
        if cfg.allocation in ("layer", "global") and cfg.loss_method == "insample":
            return [list(cfg.candidate_bits) for _ in range(num_experts)], True
        need_loss = cfg.allocation in ("layer", "global", "hessian")
        return [[] for _ in range(num_experts)], need_loss

    def allocate_layer(self, idx: int, lf: LayerFactors, routing: RoutingCapture | None = None) -> list[int]:
        cfg = self.config
        e = lf.factors.frequency.numel()
        if cfg.is_uniform:
            return [cfg.candidate_bits[0]] * e
        exponents = (cfg.alpha, cfg.beta, cfg.gamma)
        if cfg.tune_exponents and cfg.allocation == "layer" and routing is not None:
            exponents = tune_layer(routing, self.blocks[idx].experts, lf.factors, cfg, cfg.seed + 7919 * idx)
            self.tuned[idx] = list(exponents)
        return allocate_bits(
            [lf.factors],
            cfg.candidate_bits,
            cfg.bits,
            cfg.allocation,
            *exponents,
            constraints=cfg.allocation_constraints,
            seed=cfg.seed + idx,
            solver=cfg.allocation_solver,
            time_limit=cfg.allocation_time_limit,
            report=self.solve_reports,
        )[0]

    def sequential_pass(self, batches: list[LayerBatch], known: dict[int, list[int]] | None, quantize: bool) -> None:
        """One pass over the decoder layers. ``quantize=False`` only measures factors (float propagation)."""
        layers = list(iterate_layers(self.model))
        desc = "MC quantization" if quantize else "MC factors (global pass)"
        for idx, layer in tqdm(layers, desc=desc, disable=not self.progress):
            lin, lin_capture, routing, float_out = self.measure(idx, layer, batches, with_linears=quantize)
            if routing is not None:
                kb = known.get(idx) if known else None
                tries, need_loss = self.bits_to_try(idx, routing.num_experts, kb)
                cands, loss = self.expert_candidates(idx, routing, tries, need_loss)
                lf = self.layer_factors(idx, routing, loss, cands)
                if not quantize or idx not in self.factors:
                    self.factors[idx] = lf
                if quantize:
                    bits = kb if kb is not None else self.allocate_layer(idx, self.factors[idx], routing)
                    experts = self.blocks[idx].experts
                    for e, b in enumerate(bits):
                        if b not in cands[e]:  # GPTQ at the allocated width only
                            w_gu, w_dn = experts.gate_up_proj[e].detach(), experts.down_proj[e].detach()
                            cands[e].update(self.quantize_one(routing, e, w_gu, w_dn, experts.act_fn, [b]))
                    self.factors[idx].methods = [cands[e][b].method for e, b in enumerate(bits)]
                    self.bits[idx] = bits
                    self.replace_experts(idx, bits, cands)
                del cands, routing
            if quantize:
                self.quantize_linears(idx, layer, lin, lin_capture)
                batches = run_layer(layer, batches)
            else:
                batches = float_out

    def store(self) -> None:
        cfg = self.config
        cfg.moe_layers = list(self.moe_layers)
        cfg.expert_bits = [list(map(int, self.bits[i])) for i in self.moe_layers]
        cfg.linear_bits = dict(sorted(self.linear_bits.items()))
        cfg.tuned_exponents = [self.tuned[i] for i in self.moe_layers] if self.tuned else None
        cfg.expert_factors = [
            {
                "frequency": [round(float(v), 6) for v in self.factors[i].factors.frequency],
                "weight_mass": [round(float(v), 6) for v in self.factors[i].factors.weight_mass],
                "loss": [[float(f"{v:.6g}") for v in row] for row in self.factors[i].factors.loss.tolist()],
                "method": self.factors[i].methods,
            }
            for i in self.moe_layers
        ]


def resolve_tokenizer(model: nn.Module, tok=None):
    """The tokenizer for calibration: ``tok`` (object or path) or the model's own."""
    from transformers import AutoTokenizer

    if tok is not None and not isinstance(tok, str):
        return tok
    path = tok or getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # noqa: BLE001 - any failure means the same fix for the user
        raise CalibrationError(
            f"could not load a tokenizer for calibration from {path!r} ({exc}); pass MCConfig(tokenizer=...)."
        ) from exc


def quantize_model(model: nn.Module, config: MCConfig, tokenizer=None) -> dict:
    """Quantize ``model`` in place with MC; fill the result fields of ``config``; return timing info."""
    arch = require_moe(model)
    blocks = list(moe_blocks(model, arch))
    check_feasible(
        [int(b.experts.num_experts) for b in blocks], config.candidate_bits, config.bits, config.allocation_constraints
    )
    t0 = time.perf_counter()
    tok = tokenizer if tokenizer is not None else resolve_tokenizer(model, config.tokenizer)
    input_ids = calibration_batches(config.dataset, tok, config.num_samples, config.seq_len, config.seed)
    input_ids = getattr(input_ids, "input_ids", input_ids)
    run = _Run(model, config, arch)
    was_training = model.training
    model.eval()
    known = None
    if config.allocation == "global" and not config.is_uniform:
        run.sequential_pass(capture_layer_inputs(model, input_ids, CALIBRATION_BATCH_SIZE), None, quantize=False)
        factors = [run.factors[i].factors for i in run.moe_layers]
        solved = allocate_bits(
            factors,
            config.candidate_bits,
            config.bits,
            "global",
            config.alpha,
            config.beta,
            config.gamma,
            constraints=config.allocation_constraints,
            seed=config.seed,
            solver=config.allocation_solver,
            time_limit=config.allocation_time_limit,
            report=run.solve_reports,
        )
        known = dict(zip(run.moe_layers, solved))
    run.sequential_pass(capture_layer_inputs(model, input_ids, CALIBRATION_BATCH_SIZE), known, quantize=True)
    run.store()
    from .pruning import calibrate_odp

    calibrate_odp(model, input_ids=input_ids[:ODP_CALIBRATION_SAMPLES])
    model.train(was_training)
    logger.info(
        "MC bit allocation:\n%s", format_allocation_table(config.expert_bits, config.moe_layers, config.candidate_bits)
    )
    return {
        "seconds": time.perf_counter() - t0,
        "calibration_tokens": int(input_ids.numel()),
        "allocation": [vars(r) for r in run.solve_reports],
    }
