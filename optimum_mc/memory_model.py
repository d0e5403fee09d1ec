"""Peak memory of MC quantization, from a model config and the options (docs/scale.md explains every term).

Streamed quantization holds, at its peak, the runtime and either the working set of one layer (its float weights,
the calibration activations, the GPTQ workspace; embeddings and head are parked on disk meanwhile) or, at the end,
the packed model with the embeddings and head. Parameter counts come from the model built on the meta device, so
every family is counted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
RUNTIME_BYTES = int(0.45 * GiB)  # python + torch + transformers + ortools + tokenizer + BLAS buffers (docs/scale.md)
CUDA_CONTEXT_BYTES = int(0.6 * GiB)
# host memory that CUDA's libraries (cuBLAS, cuDNN, kernels) keep resident once a GPU is used: 1.60-1.67 GiB measured
# with torch 2.11+cu130 on an H200 (scripts/bench_scale.py --device cuda, docs/scale.md)
CUDA_HOST_BYTES = int(1.65 * GiB)
# on a GPU the batched GPTQ column loop peaks at about two copies of its chunk's stacked weights + Hessians (H200,
# 4-layer bench model: 1.595 GiB allocated in gptq_quantize_batched, every other phase <= 1.12 GiB; docs/scale.md)
GPU_CHUNK_COPIES = 2
CHOLESKY_TEMPORARIES = 2  # matrices of one Hessian's size alive next to it while it is inverted in place
ROUTING_SKEW = 2.0  # an expert may see this multiple of its fair share (top_k / E) of the calibration tokens


@dataclass
class MemoryEstimate:
    """Bytes, per place, at the peak of a streamed MC quantization."""

    layer_float: int
    activations: int
    gptq_workspace: int
    outside_layers: int
    packed_model: int
    layer_phase: int  # working set while one layer is calibrated and quantized
    end_phase: int  # the packed model read back, embeddings / head, ODP calibration
    device_peak: int | None  # None: calibration on the CPU
    host_peak: int

    def as_gib(self) -> dict[str, float | None]:
        return {k: (None if v is None else round(v / GiB, 2)) for k, v in vars(self).items()}


def _counts(config) -> tuple[int, int, int, list[tuple[int, int, int]]]:
    """(params outside decoder layers, largest layer's params, params of the layers outside their experts,
    [(experts, hidden, intermediate)] of the MoE layers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .architectures import decoder_layers, get_architecture, moe_block
    from .nn.experts import float_experts_shape

    arch = get_architecture(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    outside = sum(p.numel() for p in model.parameters() if id(p) not in in_layers)
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    moe, rest = [], 0
    for i, layer in enumerate(layers):
        blk = moe_block(layer, i, arch)
        expert_ids = set() if blk is None else {id(p) for p in blk.experts.parameters()}
        rest += sum(p.numel() for p in layer.parameters() if id(p) not in expert_ids)
        if blk is not None:
            moe.append(float_experts_shape(blk.experts))
    return outside, largest, rest, moe


def estimate(
    config,
    bits: float = 2.5,
    attn_bits: int = 4,
    num_samples: int = 128,
    seq_len: int = 512,
    dtype_bytes: int = 2,
    group_size: int = 128,
    device: str = "cpu",
) -> MemoryEstimate:
    """Peak memory of quantizing a model of ``config`` (a transformers config) with MC at ``bits``.

    Parameters of the layers outside their experts (attention, dense MLPs, shared experts) count at ``attn_bits``.
    ``device``: where calibration runs ("cpu" or "cuda").
    """
    from .calibration.expert_gptq import chunk_size, stacked_bytes
    from .calibration.hessians import TOKEN_CHUNK
    from .pipeline import ODP_CALIBRATION_BATCH

    outside, largest, rest, moe = _counts(config)
    hidden = moe[0][1] if moe else int(config.hidden_size)
    top_k = int(getattr(config, "num_experts_per_tok", 2) or 2)
    tokens = num_samples * seq_len
    s = dtype_bytes
    layer_float = largest * s  # read straight into its fused parameters
    activations = 2 * tokens * hidden * s  # the layer's inputs (outputs replace them batch by batch) + experts' input
    per_weight = bits / 8 + 4 / group_size  # codes + fp16 scale and zero per group
    gptq = routed = packed_layer = 0
    for e, h, i in moe:
        chunk = min(chunk_size(h, i, device), e) * stacked_bytes(h, i)  # a chunk holds at most the layer's experts
        chunk *= 1 if device == "cpu" else GPU_CHUNK_COPIES
        gptq = max(gptq, chunk + CHOLESKY_TEMPORARIES * 4 * max(h, i) ** 2, chunk + TOKEN_CHUNK * 3 * i * 4)
        routed = max(routed, int(min(1.0, ROUTING_SKEW * top_k / e) * tokens * h * s))
        packed_layer = max(packed_layer, int(3 * e * h * i * per_weight))
    expert_params = sum(3 * e * h * i for e, h, i in moe)
    packed = int(expert_params * per_weight + rest * (attn_bits / 8 + 4 / group_size))
    outside_bytes = outside * s
    layer_phase = layer_float + activations + gptq + routed + packed_layer
    odp = ODP_CALIBRATION_BATCH * seq_len * (8 * hidden + 6 * top_k * max((i for _, _, i in moe), default=0)) * 4
    end_phase = outside_bytes + packed + odp
    if device == "cpu":
        host = RUNTIME_BYTES + max(layer_phase, end_phase)
        dev = None
    else:
        host = RUNTIME_BYTES + CUDA_HOST_BYTES + end_phase
        dev = CUDA_CONTEXT_BYTES + layer_phase
    return MemoryEstimate(layer_float, activations, gptq, outside_bytes, packed, layer_phase, end_phase, dev, host)
