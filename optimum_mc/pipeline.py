"""Quantize a float MoE model with MC, one decoder layer at a time: the driver.

For each decoder layer, in the shape of llm-compressor's sequential pipeline:

1. **fetch** its float weights onto the calibration device (from memory, or straight from the checkpoint shards:
   calibration/layer_source.py);
2. **calibrate**: one forward with hooks recording the routing, each expert's routed tokens
   (:meth:`PMQ.capture <optimum_mc.pmq.PMQ.capture>`) and the non-expert linears' input Hessians
   (:class:`~optimum_mc.calibration.linear_gptq.LinearGPTQ`);
3. **compress**: PMQ (factors -> allocation on OR-Tools -> GPTQ -> packed ``MCExperts``, pmq.py) and GPTQ of the
   linears at ``attn_bits``;
4. **propagate**: the quantized layer's outputs become the next layer's inputs;
5. **stage** the finished layer (resume.py over calibration/stage.py: resume, flat memory).

``allocation="global"`` needs every layer's factors before any bits are known: a first pass measures them with
float activations (fetch -> calibrate -> factors -> float outputs propagate), the allocation is solved once, and
the second pass quantizes sequentially at the chosen bits. The run's results come back as one
:class:`~optimum_mc.results.MCResults`, stored into the config in one place; ODP thresholds are then calibrated on
the packed model.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from transformers.utils.logging import tqdm  # silenced by disable_progress_bar() / HF_HUB_DISABLE_PROGRESS_BARS

from .architectures import get_architecture, layer_module_names
from .budget import check_budget
from .calibration.data import calibration_batches, resolve_tokenizer
from .calibration.layer_source import ResidentLayers, release_memory, return_large_frees_to_the_os
from .calibration.linear_gptq import LinearGPTQ
from .calibration.sequential import LayerBatch, capture_layer_inputs, move_to, run_layer
from .calibration.stage import Progress, Stage
from .checkpoint import save_converter
from .config import MCConfig
from .errors import UnsupportedArchitectureError
from .placement import deterministic_kernels, resolve_device
from .pmq import PMQ
from .results import MCResults
from .resume import Resume, run_fingerprint

logger = logging.getLogger(__name__)

CALIBRATION_BATCH_TOKENS = 2048  # tokens per calibration forward: bounds attention / expert temporaries of a batch
ODP_CALIBRATION_SAMPLES = 16  # sequences used to measure ODP thresholds and layer sensitivity after quantizing
ODP_CALIBRATION_BATCH = 1  # sequences per forward there: its activations come on top of the whole packed model


class SequentialPipeline:
    """One quantization run over a model's decoder layers (state kept here: off the modules, out of globals)."""

    def __init__(self, model: nn.Module, config: MCConfig, source, device: torch.device, stage: Stage | None) -> None:
        self.model, self.config, self.source, self.device = model, config, source, device
        arch = get_architecture(model.config)
        self.pmq = PMQ(config, arch, [source.structure(i) for i in range(source.num_layers)])
        self.linears = LinearGPTQ(config, arch, layer_module_names(model), save_converter(model))
        self.resume = Resume(stage, self.pmq, self.linears)
        self.progress = config.show_progress

    # -- the stages of one layer -------------------------------------------------------------------------------
    def fetch(self, idx: int) -> nn.Module:
        """Layer ``idx`` with float weights on the calibration device, its experts in MC's layout."""
        layer = self.source.fetch(idx, self.device)
        release_memory()  # the per-expert tensors transformers fused
        self.pmq.prepare(idx, layer)
        return layer

    def calibrate(self, idx: int, layer: nn.Module, batches: list[LayerBatch], with_linears: bool, keep: bool):
        """Run the float layer with hooks recording linear-input Hessians and routing; its outputs are returned
        when ``keep`` (the factors pass propagates them) and dropped at once otherwise."""
        lin = self.linears.targets(idx, layer, self.pmq.blocks.get(idx)) if with_linears else {}
        lin_capture = self.linears.capture(lin, self.device)
        routing = self.pmq.capture(idx)
        try:
            on_output = routing.layer_output if routing is not None else None
            float_out = run_layer(layer, batches, keep, on_output=on_output, idx=idx)
        finally:
            lin_capture.remove()
            if routing is not None:
                routing.remove()
        return lin, lin_capture, routing, float_out

    def quantize_layer(
        self, idx: int, layer: nn.Module, batches: list[LayerBatch], known: list | None, propagate: bool = True
    ) -> list[LayerBatch]:
        """calibrate -> compress -> propagate for one fetched float layer (in place); return the next layer's inputs
        (``propagate=False``, for the last layer: nothing needs them, the batches are returned emptied)."""
        lin, lin_capture, routing, _ = self.calibrate(idx, layer, batches, with_linears=True, keep=False)
        stage = self.resume.stage
        held = stage is not None and routing is not None
        if held:  # the layer's inputs wait on disk while its experts are quantized (the largest working set)
            devices = [b.hidden.device for b in batches]
            stage.hold_inputs([b.hidden for b in batches])
            for b in batches:
                b.hidden = None
        if routing is not None:
            self.pmq.compress(idx, routing, known)
            del routing
        self.linears.compress(idx, layer, lin, lin_capture)
        if not propagate:
            if held:
                stage.drop_inputs()
            for b in batches:
                b.hidden = None
            return batches
        if held:
            for b, h in zip(batches, stage.take_inputs(devices)):
                b.hidden = h
        return run_layer(layer, batches, replace=True, idx=idx)

    # -- the passes --------------------------------------------------------------------------------------------
    def factors_pass(self, batches: list[LayerBatch], start: int) -> None:
        """Global allocation's first pass: factors of every MoE layer with float propagation (nothing replaced)."""
        self.resume.adopt_factors(range(start))
        source = self.source
        for idx in tqdm(range(start, source.num_layers), desc="MC factors (global pass)", disable=not self.progress):
            layer = self.fetch(idx)
            _, _, routing, batches = self.calibrate(idx, layer, batches, with_linears=False, keep=True)
            if routing is not None:
                self.pmq.measure(idx, routing)
                del routing
            source.finish(idx, layer)  # resident: back home; streamed: parked below
            if source.streams_from_disk:
                source.park(idx)
            del layer
            release_memory()
            self.resume.save("factors", idx, None, [b.hidden for b in batches])

    def quantize_pass(self, batches: list[LayerBatch], start: int, known: dict[int, list] | None) -> None:
        """Quantize every layer from ``start`` on, sequentially (quantized outputs feed the next layer)."""
        source = self.source
        for idx in range(start):
            self.resume.rebuild(idx, self.model, source)
            if source.streams_from_disk:
                source.park(idx)
        for idx in tqdm(range(start, source.num_layers), desc="MC quantization", disable=not self.progress):
            layer = self.fetch(idx)
            last = idx + 1 == source.num_layers  # its outputs feed nothing: not computed, not kept
            batches = self.quantize_layer(idx, layer, batches, known.get(idx) if known else None, not last)
            layer = source.finish(idx, layer)
            self.resume.save("quantize", idx, layer, [] if last else [b.hidden for b in batches])
            if source.streams_from_disk:
                source.park(idx)
            del layer
            release_memory()
        if source.streams_from_disk:
            for idx in range(source.num_layers):
                self.resume.rebuild(idx, self.model, source)

    def run(self, batches_from, progress: Progress | None) -> MCResults:
        """Both passes (the first only for ``allocation="global"``), resumed from ``progress`` where given;
        ``batches_from(hidden)`` makes the calibration batches (from saved hidden states when resuming)."""
        config, source = self.config, self.source
        known = None
        if config.allocation == "global" and not config.is_uniform:
            if progress is None or progress.phase == "factors":
                start = progress.next_layer if progress is not None else 0
                self.factors_pass(batches_from(progress.hidden if progress is not None else None), start)
                progress = None
            else:
                self.resume.adopt_factors(self.pmq.moe_layers)
            known = self.pmq.allocate_global()
        start = progress.next_layer if progress is not None else 0
        batches = batches_from(progress.hidden if progress is not None else None)
        if source.streams_from_disk:
            source.park_outside(self.resume.stage)
        try:
            self.quantize_pass(batches, start, known)
        finally:
            if source.streams_from_disk:
                source.restore_outside()
        return MCResults.collect(self.pmq, self.linears.bits)


def _to_device(batches: list[LayerBatch], device: torch.device) -> list[LayerBatch]:
    # (the arguments of single layers move when their layer runs: tables shared by layers are not copied per layer)
    return [
        LayerBatch(b.hidden.to(device), move_to(b.kwargs, device), move_to(b.args, device), b.per_layer)
        for b in batches
    ]


def quantize_model(model: nn.Module, config: MCConfig, tokenizer=None, source=None, place=None) -> MCResults:
    """Quantize ``model`` in place with MC; fill the result fields of ``config``; return the run's results.

    ``source`` says where the float decoder layers are (default: in ``model``; the quantizer passes a
    :class:`CheckpointLayers` to stream them from the checkpoint). The packed layers end on the CPU when streamed,
    or where the float layers were; ``place(model)``, when given, then moves the packed model to its final devices
    before ODP thresholds are measured on it.
    """
    with deterministic_kernels(resolve_device(config.device)):
        return _quantize_model(model, config, tokenizer, source, place)


def _quantize_model(model: nn.Module, config: MCConfig, tokenizer, source, place) -> MCResults:
    get_architecture(model.config)  # an unsupported model is refused before calibration data is read
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
    pipe = SequentialPipeline(model, config, source, device, stage)
    pmq = pipe.pmq
    if not pmq.moe_layers:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no MoE layers; MC quantizes MoE models.")
    check_budget(config, [pmq.num_experts[i] for i in pmq.moe_layers], [pmq.code_bits[i] for i in pmq.moe_layers])
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
        results = pipe.run(batches_from, progress)
    finally:
        if stage is not None:
            stage.cleanup()
    results.store(config)
    if place is not None:
        place(model)
    from .pruning import calibrate_odp

    release_memory()
    calibrate_odp(model, input_ids=input_ids[:ODP_CALIBRATION_SAMPLES], batch_size=ODP_CALIBRATION_BATCH)
    model.train(was_training)
    logger.info("MC bit allocation:\n%s", results.allocation_table(config.candidate_bits))
    results.seconds = time.perf_counter() - t0
    results.calibration_tokens = int(input_ids.numel())
    return results
