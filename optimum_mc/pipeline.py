"""Quantize a float MoE model with MC's PMQ, one decoder layer at a time.

calibration data -> layer 0 inputs -> for each decoder layer: bring its float weights onto the calibration device
(from memory, or straight from the checkpoint shards: calibration/layer_source.py) -> record routing and Hessians
-> expert candidates and their losses -> bit allocation (OR-Tools) -> packed modules replace the float ones -> the
quantized layer's outputs feed the next layer -> the layer is staged (calibration/stage.py: resume, flat memory).

``allocation="global"`` needs every layer's factors before any bits are known: a first pass measures them with
float activations, the allocation is solved once, and a second pass quantizes sequentially at the chosen bits.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import inspect
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils.logging import tqdm  # silenced by disable_progress_bar() / HF_HUB_DISABLE_PROGRESS_BARS

from .allocation import ExpertFactors, SolveReport, allocate_bits, check_feasible, format_allocation_table
from .architectures import MoEArchitecture, MoEBlock, get_architecture, layer_module_names, moe_block, set_submodule
from .bitwidths import ExpertBits, join, split
from .calibration.capture import LinearInputs, RoutingCapture
from .calibration.data import calibration_batches, resolve_tokenizer
from .calibration.expert_gptq import quantize_experts
from .calibration.factors import ExpertQuant, GPTQOptions, expert_losses, quantize_expert, rtn_loss_table
from .calibration.layer_source import (
    ResidentLayers,
    init_computed_buffers,
    release_memory,
    return_large_frees_to_the_os,
)
from .calibration.sequential import LayerBatch, capture_layer_inputs, move_to, run_layer
from .calibration.stage import Stage, fingerprint
from .calibration.tuning import tune_layer
from .checkpoint import save_converter
from .config import _RESULT_FIELDS, KEEP_1_BIT_FROM, MCConfig
from .errors import CalibrationError, MCConfigError, UnsupportedArchitectureError
from .expert_layout import canonical_experts, expert_act, experts_layout
from .gptq import gptq_quantize
from .group_quant import check_finite, grid_of
from .nn import MCExperts, QuantLinear
from .nn.experts import packed_like
from .nn.nf4_linear import NF4Linear
from .placement import deterministic_kernels, resolve_device
from .skeleton import install_packed_skeleton

logger = logging.getLogger(__name__)

CALIBRATION_BATCH_TOKENS = 2048  # tokens per calibration forward: bounds attention / expert temporaries of a batch
ODP_CALIBRATION_SAMPLES = 16  # sequences used to measure ODP thresholds and layer sensitivity after quantizing
ODP_CALIBRATION_BATCH = 1  # sequences per forward there: its activations come on top of the whole packed model
# Round-to-nearest eps of an expert is measured on at most this many of its routed tokens (evenly spaced; the
# squared error is rescaled to all of them): a relative output error is estimated to a few percent from 4k tokens,
# while the full count would make eps cost 4 expert forwards over every routed token (docs/scale.md).
RTN_LOSS_MAX_TOKENS = 4096


@dataclass
class LayerFactors:
    """What calibration measured for one MoE layer."""

    factors: ExpertFactors
    methods: list[str] = field(default_factory=list)


@functools.cache
def _class_source(cls: type) -> str:
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def _weight_read_directly(layer: nn.Module) -> set[int]:
    """Linears whose ``.weight`` an ancestor's code reads itself (``self.weights_proj.weight.dtype``, a fused
    kernel taking ``self.out_proj.weight``, ergo's decoder layer reading ``self.self_attn.o_proj.weight.dtype``):
    a quantized linear has no ``weight``, so they stay in float."""
    out = set()
    for parent in layer.modules():
        src = _class_source(type(parent))
        if ".weight" not in src:
            continue
        for name, child in parent.named_modules():
            if name and type(child) is nn.Linear and f"self.{name}.weight" in src:
                out.add(id(child))
    return out


def linear_targets(
    layer: nn.Module,
    block: MoEBlock | None,
    arch: MoEArchitecture,
    config: MCConfig,
    prefix: str = "",
    converted=None,
) -> dict:
    """The ``nn.Linear`` modules of a decoder layer quantized at ``attn_bits`` (name relative to the layer).

    ``converted`` (:func:`checkpoint.save_converter`) names the transformers weight converter that would merge or
    split a linear's saved tensors (keys ``prefix.name.*``); such linears stay float (logged), at save and reload
    alike, since their packed buffers cannot be cut or concatenated like float weights."""
    if config.attn_bits is None:
        return {}
    skip_ids = set()
    if block is not None:
        skip_ids |= {id(m) for m in block.router.modules()} | {id(m) for m in block.experts.modules()}
    skip_names = tuple(config.modules_to_not_convert or ()) + ("shared_expert_gate",)
    skip_ids |= _weight_read_directly(layer)
    out = {}
    for name, m in layer.named_modules():
        if type(m) is not nn.Linear or id(m) in skip_ids:
            continue
        if any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip_names):
            continue
        pattern = converted(f"{prefix}{name}.qweight") if converted is not None else None
        if pattern is not None:
            logger.warning(
                "keeping %s%s in float: transformers' conversion mapping merges, splits or renames its saved "
                "tensors in a way packed buffers cannot follow (%s)",
                prefix,
                name,
                pattern,
            )
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
        zero_point=grid_of(config.zero_point, config.metadata),
        clip_search=config.clip_search,
    )


def expert_code_bits(config: MCConfig, experts: nn.Module) -> float:
    """:meth:`MCConfig.code_bits` for one MoE layer's experts (float or packed; weights may be on meta)."""
    if hasattr(experts, "packed"):
        return config.code_bits(int(experts.hidden_dim), int(experts.intermediate_dim))
    layout = experts_layout(experts)
    return config.code_bits(layout.hidden, layout.inter)


def global_code_bits(num_experts: list[int], code_bits: list[float]) -> float:
    """The code-bit target of ``allocation="global"``: the layers' targets averaged over their experts (equal to each
    of them when every MoE layer's experts have the same shape)."""
    return sum(n * t for n, t in zip(num_experts, code_bits)) / sum(num_experts)


def check_budget(config: MCConfig, num_experts: list[int], code_bits: list[float]) -> None:
    """:func:`~optimum_mc.allocation.check_feasible` for every MoE layer's code-bit target; with
    ``bits_budget="stored"`` the error says how the stored-bits target was converted. ``candidate_bits=None`` is
    resolved here (:data:`~optimum_mc.config.KEEP_1_BIT_FROM`)."""
    if config.candidate_bits is None:
        # 1 bit left out only below KEEP_1_BIT_FROM code bits (where it was measured to lose) and where [2, 3] fit
        low = [] if code_bits and min(code_bits) >= KEEP_1_BIT_FROM else [(2, 3)]
        for cands in [*low, (1, 2, 3)]:
            config.candidate_bits = list(cands)
            try:
                _check_layers(config, num_experts, code_bits)
                return
            except MCConfigError:
                continue
    _check_layers(config, num_experts, code_bits)


def _check_layers(config: MCConfig, num_experts: list[int], code_bits: list[float]) -> None:
    for t in sorted(set(code_bits)):
        sizes = [n for n, c in zip(num_experts, code_bits) if c == t]
        try:
            check_feasible(sizes, config.candidate_bits, t, config.allocation_constraints)
        except MCConfigError as exc:
            if config.bits_budget != "stored":
                raise
            raise MCConfigError(
                f"bits={config.bits} stored bits per expert weight (bits_budget='stored') leaves {t:.4g} bits for "
                f"codes after {config.bits - t:.4g} bits of {config.metadata} scales and zeros "
                f"(group_size={config.group_size}): "
                f"{exc}"
            ) from exc


class _Run:
    """State of one quantization run (kept off the modules and out of globals)."""

    def __init__(self, model: nn.Module, config: MCConfig, arch: MoEArchitecture, source, device, stage) -> None:
        self.model, self.config, self.arch = model, config, arch
        self.source, self.device, self.stage = source, device, stage
        self.opts = _gptq_opts(config)
        structures = [source.structure(i) for i in range(source.num_layers)]
        self.moe_layers = [i for i, layer in enumerate(structures) if moe_block(layer, i, arch) is not None]
        self.num_experts = {i: int(moe_block(structures[i], i, arch).experts.num_experts) for i in self.moe_layers}
        # the allocation's target in code bits per MoE layer (config.bits less scales / zeros when it counts them)
        self.code_bits = {
            i: expert_code_bits(config, moe_block(structures[i], i, arch).experts) for i in self.moe_layers
        }
        self.blocks: dict[int, MoEBlock] = {}  # MoE parts of the layer being processed
        self.layer_names = layer_module_names(model)
        self.converted = save_converter(model)
        self.factors: dict[int, LayerFactors] = {}
        self.bits: dict[int, list[ExpertBits]] = {}
        self.linear_bits: dict[str, int] = {}
        self.solve_reports: list[SolveReport] = []
        self.tuned: dict[int, list[float]] = {}
        self.progress = config.show_progress

    # -- one layer ---------------------------------------------------------------------------------------------
    def fetch(self, idx: int) -> nn.Module:
        """Layer ``idx`` with float weights on the calibration device."""
        layer = self.source.fetch(idx, self.device)
        release_memory()  # the per-expert tensors transformers fused
        blk = moe_block(layer, idx, self.arch)
        if blk is not None and callable(getattr(blk.block, "check_original", None)):
            blk.block.check_original()  # an adapted block (input_scaled.py) reproduces the replaced one
        if blk is not None:  # transposed / interleaved / biased experts (gpt-oss, Aria) in MC's layout, same forward
            experts = canonical_experts(blk.experts, f"layers.{idx}.{self.arch.block_attr}.{self.arch.experts_attr}")
            if experts is not blk.experts:
                setattr(blk.block, self.arch.experts_attr, experts)
                blk.experts = experts
        self.blocks = {idx: blk} if blk is not None else {}
        return layer

    def measure(self, idx: int, layer: nn.Module, batches: list[LayerBatch], with_linears: bool, keep: bool = True):
        """Run the float layer with hooks recording linear-input Hessians and routing; its outputs are returned
        when ``keep`` (the factors pass propagates them) and dropped at once otherwise."""
        block = self.blocks.get(idx)
        lin = {}
        if with_linears:
            prefix = self.layer_names[idx] + "."
            lin = linear_targets(layer, block, self.arch, self.config, prefix, self.converted)
        for name, m in lin.items():
            check_finite(m.weight, f"layer {idx} {name}.weight")
        lin_capture = LinearInputs(lin if self.config.nonexpert_method == "gptq" else {}, device=self.device)
        keep_all = self.config.expert_hessian == "router-weighted"
        routing = RoutingCapture(self.arch, block.router, block.experts, keep_all) if block is not None else None
        energy = [0.0]

        def residual_energy(y: torch.Tensor) -> None:  # the decoder layer's output (loss_normalizer="residual")
            energy[0] += float(y.float().pow(2).sum())

        try:
            on_output = residual_energy if routing is not None else None
            float_out = run_layer(layer, batches, keep, on_output=on_output, idx=idx)
        finally:
            lin_capture.remove()
            if routing is not None:
                routing.remove()
        if routing is not None:
            routing.residual_energy = energy[0]
        return lin, lin_capture, routing, float_out

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
            if need_loss:
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
                loss[e] = torch.tensor(
                    expert_losses(
                        method,
                        x,
                        r,
                        w_gu,
                        w_dn,
                        act,
                        cb,
                        self.opts,
                        energy,
                        routing.tokens,
                        cfg.heldout_fraction,
                        seed=cfg.seed + 1009 * idx + e,
                        candidates=cands[e],
                    ),
                    dtype=torch.float64,
                )
        return cands, loss, proj

    def quantize_one(self, routing: RoutingCapture, e: int, w_gu, w_dn, act_fn, bits: list[int]) -> dict:
        """GPTQ of expert ``e`` at ``bits`` from its routed tokens, or (``expert_hessian="router-weighted"``) from
        every token weighted by its router probability."""
        if self.config.expert_hessian == "router-weighted":
            x, p = routing.router_weighted(e)
            return quantize_expert(w_gu, w_dn, x, act_fn, bits, self.opts, token_weights=p)
        x, _ = routing.experts[e].cat(routing.hidden_dim)
        return quantize_expert(w_gu, w_dn, x, act_fn, bits, self.opts)

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

    def quantize_linears(self, idx: int, layer: nn.Module, lin: dict, capture: LinearInputs) -> None:
        bits = self.config.attn_bits
        for name, m in lin.items():
            full = f"{self.layer_names[idx]}.{name}"
            if self.config.nonexpert_method == "bnb_nf4":
                self.linear_bits[full] = bits
                set_submodule(layer, name, NF4Linear.from_linear(m))
                continue
            h = capture.hessians[name]
            if h.num_tokens == 0:  # not in linear_bits: the reload skeleton keeps it float as well
                logger.warning("keeping %s in float: calibration never reached it (no input recorded)", full)
                continue
            self.linear_bits[full] = bits
            w = m.weight.detach().float()
            codes, scales, zeros = gptq_quantize(
                w,
                h.hessian,
                bits,
                self.config.group_size,
                damp_percent=self.config.damp_percent,
                block_size=self.config.block_size,
                act_order=self.config.act_order,
                zero_point=grid_of(self.config.zero_point, self.config.metadata),
                clip_search=self.config.clip_search,
            )
            bias = m.bias.detach() if m.bias is not None else None
            new = QuantLinear.from_codes(
                codes, scales, zeros, bits, bias=bias, dtype=m.weight.dtype, metadata=self.config.metadata
            )
            set_submodule(layer, name, new.to(m.weight.device))

    def packed_experts(self, idx: int, bits: list[int]) -> MCExperts:
        """An empty packed experts module for MoE layer ``idx`` at ``bits`` (filled expert by expert)."""
        return packed_like(self.blocks[idx].experts, bits, self.config.group_size, metadata=self.config.metadata)

    def replace_experts(self, idx: int, new: MCExperts) -> None:
        block = self.blocks[idx]
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
            return [[] for _ in range(num_experts)], False
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
            exponents = tune_layer(
                routing, self.blocks[idx].experts, lf.factors, cfg, cfg.seed + 7919 * idx, self.code_bits[idx]
            )
            self.tuned[idx] = list(exponents)
        return allocate_bits(
            [lf.factors],
            cfg.candidate_bits,
            self.code_bits[idx],
            cfg.allocation,
            *exponents,
            constraints=cfg.allocation_constraints,
            seed=cfg.seed + idx,
            solver=cfg.allocation_solver,
            time_limit=cfg.allocation_time_limit,
            report=self.solve_reports,
            granularity=cfg.allocation_granularity,
        )[0]

    def quantize_layer(
        self, idx: int, layer: nn.Module, batches: list[LayerBatch], known: list[int] | None, propagate: bool = True
    ):
        """Quantize one fetched float layer in place; return the next layer's inputs (``propagate=False``, for the
        last layer: nothing needs them, the batches are returned emptied)."""
        lin, lin_capture, routing, _ = self.measure(idx, layer, batches, with_linears=True, keep=False)
        held = self.stage is not None and routing is not None
        if held:  # the layer's inputs wait on disk while its experts are quantized (the largest working set)
            devices = [b.hidden.device for b in batches]
            self.stage.hold_inputs([b.hidden for b in batches])
            for b in batches:
                b.hidden = None
        if routing is not None:
            tries, need_loss = self.bits_to_try(idx, routing.num_experts, known)
            cands, loss, proj = self.expert_candidates(idx, routing, tries, need_loss)
            lf = self.layer_factors(idx, routing, loss, cands, proj)
            if idx not in self.factors:
                self.factors[idx] = lf
            bits = known if known is not None else self.allocate_layer(idx, self.factors[idx], routing)
            new = self.packed_experts(idx, bits)
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
            del routing, new
        self.quantize_linears(idx, layer, lin, lin_capture)
        if not propagate:
            if held:
                self.stage.drop_inputs()
            for b in batches:
                b.hidden = None
            return batches
        if held:
            for b, h in zip(batches, self.stage.take_inputs(devices)):
                b.hidden = h
        return run_layer(layer, batches, replace=True, idx=idx)

    def layer_record(self, idx: int) -> dict:
        """What staging must remember of a finished layer to rebuild it and the run's results."""
        prefix = self.layer_names[idx] + "."
        lf = self.factors.get(idx)
        return {
            "bits": self.bits.get(idx),
            "linear_bits": {n[len(prefix) :]: b for n, b in self.linear_bits.items() if n.startswith(prefix)},
            "factors": _factors_exact(lf) if lf is not None else None,
            "tuned": self.tuned.get(idx),
        }

    def adopt_record(self, idx: int, record: dict) -> None:
        """Take a staged layer's results as this run's."""
        if record.get("factors") is not None:
            self.factors[idx] = _factors_from_dict(record["factors"])
        if record.get("bits") is not None:
            self.bits[idx] = list(record["bits"])
        if record.get("tuned") is not None:
            self.tuned[idx] = list(record["tuned"])
        prefix = self.layer_names[idx] + "."
        self.linear_bits.update({prefix + n: b for n, b in record.get("linear_bits", {}).items()})

    def rebuild_layer(self, idx: int) -> None:
        """Put staged layer ``idx`` (packed) back into the model, on the CPU."""
        tensors, record = self.stage.load_layer("quantize", idx)
        if self.source.streams_from_disk:
            layer = copy.deepcopy(self.source.structure(idx))
        else:
            layer = self.source.structure(idx)
        install_packed_skeleton(
            layer,
            idx,
            self.arch,
            record.get("bits"),
            record.get("linear_bits", {}),
            self.config.group_size,
            self.config.nonexpert_method,
            metadata=self.config.metadata,
        )
        layer.load_state_dict(tensors, strict=True, assign=True)  # q8 linears expand their metadata as they load
        init_computed_buffers(self.model, layer, "cpu")  # not in a state dict: computed, as transformers does
        self.source.finish(idx, layer)
        self.adopt_record(idx, record)

    def factors_pass(self, batches: list[LayerBatch], start: int) -> None:
        """Global allocation's first pass: factors of every MoE layer with float propagation (nothing replaced)."""
        for idx in range(start):
            if idx in self.moe_layers:
                _, record = self.stage.load_layer("factors", idx)
                self.adopt_record(idx, record)
        for idx in tqdm(
            range(start, self.source.num_layers), desc="MC factors (global pass)", disable=not self.progress
        ):
            layer = self.fetch(idx)
            _, _, routing, batches = self.measure(idx, layer, batches, with_linears=False)
            if routing is not None:
                tries, need_loss = self.bits_to_try(idx, routing.num_experts, None)
                cands, loss, proj = self.expert_candidates(idx, routing, tries, need_loss)
                self.factors[idx] = self.layer_factors(idx, routing, loss, cands, proj)
                del cands, routing
            self.source.finish(idx, layer)  # resident: back home; streamed: parked below
            if self.source.streams_from_disk:
                self.source.park(idx)
            del layer
            release_memory()
            if self.stage is not None:
                if idx in self.moe_layers:
                    self.stage.save_layer("factors", idx, {}, self.layer_record(idx))
                self.stage.commit("factors", idx + 1, [b.hidden for b in batches])

    def quantize_pass(self, batches: list[LayerBatch], start: int, known: dict[int, list[int]] | None) -> None:
        """Quantize every layer from ``start`` on, sequentially (quantized outputs feed the next layer)."""
        for idx in range(start):
            self.rebuild_layer(idx)
            if self.source.streams_from_disk:
                self.source.park(idx)
        for idx in tqdm(range(start, self.source.num_layers), desc="MC quantization", disable=not self.progress):
            layer = self.fetch(idx)
            last = idx + 1 == self.source.num_layers  # its outputs feed nothing: not computed, not kept
            batches = self.quantize_layer(idx, layer, batches, known.get(idx) if known else None, not last)
            layer = self.source.finish(idx, layer)
            if self.stage is not None:
                self.stage.save_layer("quantize", idx, layer.state_dict(), self.layer_record(idx))
                self.stage.commit("quantize", idx + 1, [] if last else [b.hidden for b in batches])
            if self.source.streams_from_disk:
                self.source.park(idx)
            del layer
            release_memory()
        if self.source.streams_from_disk:
            for idx in range(self.source.num_layers):
                self.rebuild_layer(idx)

    def store(self) -> None:
        cfg = self.config
        cfg.moe_layers = list(self.moe_layers)
        cfg.expert_bits = [[join(*split(b)) for b in self.bits[i]] for i in self.moe_layers]
        cfg.linear_bits = dict(sorted(self.linear_bits.items()))
        cfg.tuned_exponents = [self.tuned[i] for i in self.moe_layers] if self.tuned else None
        cfg.expert_factors = [_factors_dict(self.factors[i]) for i in self.moe_layers]


def _factors_dict(lf: LayerFactors) -> dict:
    return {
        "frequency": [round(float(v), 6) for v in lf.factors.frequency],
        "weight_mass": [round(float(v), 6) for v in lf.factors.weight_mass],
        "loss": [[float(f"{v:.6g}") for v in row] for row in lf.factors.loss.tolist()],
        **_projection_dict(lf.factors.projection_loss),
        "method": list(lf.methods),
    }


def _projection_dict(proj: torch.Tensor | None) -> dict:
    """``projection_loss`` for config.json (per-projection allocation only; absent otherwise)."""
    if proj is None:
        return {}
    return {"projection_loss": [[[float(f"{v:.6g}") for v in p] for p in row] for row in proj.tolist()]}


def _factors_exact(lf: LayerFactors) -> dict:
    """Lossless form for staging (a resumed global allocation must see exactly the same factors)."""
    f = lf.factors
    return {
        "frequency": f.frequency.tolist(),
        "weight_mass": f.weight_mass.tolist(),
        "loss": f.loss.tolist(),
        "projection_loss": f.projection_loss.tolist() if f.projection_loss is not None else None,
        "method": list(lf.methods),
    }


def _factors_from_dict(d: dict) -> LayerFactors:
    proj = d.get("projection_loss")
    f = ExpertFactors(
        frequency=torch.tensor(d["frequency"], dtype=torch.float32),
        weight_mass=torch.tensor(d["weight_mass"], dtype=torch.float32),
        loss=torch.tensor(d["loss"], dtype=torch.float32),
        projection_loss=torch.tensor(proj, dtype=torch.float32) if proj is not None else None,
    )
    return LayerFactors(f, list(d.get("method", [])))


def run_fingerprint(model: nn.Module, config: MCConfig, source, input_ids: torch.Tensor, device) -> str:
    """Digest of what decides a run's bytes: model config, checkpoint files, options, calibration tokens, device."""
    options = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    files = [(os.path.basename(f), os.path.getsize(f)) for f in getattr(source, "files", [])]
    tokens = hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()
    return fingerprint(
        {
            "model": model.config.to_diff_dict() if hasattr(model.config, "to_diff_dict") else str(model.config),
            "files": files,
            "options": options,
            "tokens": tokens,
            "device": device.type,
            "dtype": str(next(iter(source.structure(0).parameters())).dtype),
        }
    )


_NOT_IN_FINGERPRINT = (
    "show_progress",
    "resume_dir",
    "offload_folder",
    "odp",
    "odp_threshold",
    "odp_protect_ratio",
    "odp_layers",
    *_RESULT_FIELDS,
)


def _to_device(batches: list[LayerBatch], device: torch.device) -> list[LayerBatch]:
    # (the arguments of single layers move when their layer runs: tables shared by layers are not copied per layer)
    return [
        LayerBatch(b.hidden.to(device), move_to(b.kwargs, device), move_to(b.args, device), b.per_layer)
        for b in batches
    ]


def quantize_model(model: nn.Module, config: MCConfig, tokenizer=None, source=None, place=None) -> dict:
    """Quantize ``model`` in place with MC; fill the result fields of ``config``; return timing info.

    ``source`` says where the float decoder layers are (default: in ``model``; the quantizer passes a
    :class:`CheckpointLayers` to stream them from the checkpoint). The packed layers end on the CPU when streamed,
    or where the float layers were; ``place(model)``, when given, then moves the packed model to its final devices
    before ODP thresholds are measured on it.
    """
    with deterministic_kernels(resolve_device(config.device)):
        return _quantize_model(model, config, tokenizer, source, place)


def _quantize_model(model: nn.Module, config: MCConfig, tokenizer, source, place) -> dict:
    arch = get_architecture(model.config)
    source = source if source is not None else ResidentLayers(model)
    t0 = time.perf_counter()
    return_large_frees_to_the_os()
    device = resolve_device(config.device)
    tok = tokenizer if tokenizer is not None else resolve_tokenizer(model, config.tokenizer)
    input_ids = calibration_batches(
        config.dataset, tok, config.num_samples, config.seq_len, config.seed, **config.dataset_options()
    )
    input_ids = getattr(input_ids, "input_ids", input_ids)
    stage = None
    if config.resume_dir is not None or source.streams_from_disk:
        stage = Stage(config.resume_dir, run_fingerprint(model, config, source, input_ids, device))
    run = _Run(model, config, arch, source, device, stage)
    if not run.moe_layers:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no MoE layers; MC quantizes MoE models.")
    check_budget(config, [run.num_experts[i] for i in run.moe_layers], [run.code_bits[i] for i in run.moe_layers])
    was_training = model.training
    model.eval()
    progress = stage.resume() if stage is not None and not stage.temporary else None
    if progress is not None:
        logger.info(
            "resuming MC quantization from %s (%s pass, layer %d)", stage.path, progress.phase, progress.next_layer
        )

    def batches_from(hidden: list[torch.Tensor] | None) -> list[LayerBatch]:
        batch = max(1, CALIBRATION_BATCH_TOKENS // max(int(input_ids.shape[-1]), 1))
        fresh = _to_device(capture_layer_inputs(model, input_ids, batch), device)
        if hidden is None:
            return fresh
        return [b.with_hidden(h.to(device)) for h, b in zip(hidden, fresh)]

    try:
        known = None
        if config.allocation == "global" and not config.is_uniform:
            if progress is None or progress.phase == "factors":
                start = progress.next_layer if progress is not None else 0
                run.factors_pass(batches_from(progress.hidden if progress is not None else None), start)
                progress = None
            else:
                for idx in run.moe_layers:
                    _, record = stage.load_layer("factors", idx)
                    run.adopt_record(idx, record)
            factors = [run.factors[i].factors for i in run.moe_layers]
            solved = allocate_bits(
                factors,
                config.candidate_bits,
                global_code_bits(*zip(*[(run.num_experts[i], run.code_bits[i]) for i in run.moe_layers])),
                "global",
                config.alpha,
                config.beta,
                config.gamma,
                constraints=config.allocation_constraints,
                seed=config.seed,
                solver=config.allocation_solver,
                time_limit=config.allocation_time_limit,
                report=run.solve_reports,
                granularity=config.allocation_granularity,
            )
            known = dict(zip(run.moe_layers, solved))
        start = progress.next_layer if progress is not None else 0
        batches = batches_from(progress.hidden if progress is not None else None)
        if source.streams_from_disk:
            source.park_outside(stage)
        try:
            run.quantize_pass(batches, start, known)
        finally:
            if source.streams_from_disk:
                source.restore_outside()
    finally:
        if stage is not None:
            stage.cleanup()
    run.store()
    if place is not None:
        place(model)
    from .pruning import calibrate_odp

    release_memory()
    calibrate_odp(model, input_ids=input_ids[:ODP_CALIBRATION_SAMPLES], batch_size=ODP_CALIBRATION_BATCH)
    model.train(was_training)
    logger.info(
        "MC bit allocation:\n%s", format_allocation_table(config.expert_bits, config.moe_layers, config.candidate_bits)
    )
    return {
        "seconds": time.perf_counter() - t0,
        "calibration_tokens": int(input_ids.numel()),
        "allocation": [vars(r) for r in run.solve_reports],
    }
