"""Packed-tensor shapes, checks and holders shared by the vLLM plugin's linear and MoE methods (imports no vLLM)."""

from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import CheckpointError
from ...group_quant import expand_metadata, q8_shapes
from ...packing import WORD_BITS

EXPERT_NAME = re.compile(r"packed\.(\d+)\.(gate_up|down)\.(qweight|scales|zeros|scale_codes|scale_exps|zero_codes)")
_TENSOR_DTYPES = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.float16}
# the stored compact form of a matrix's scales / zeros (metadata="q8", format 3: docs/format.md), expanded to the fp16
# scales / zeros at load as transformers does (group_quant.expand_metadata: exact)
COMPACT = ("scale_codes", "scale_exps", "zero_codes")


def working_tp_sizes(size: int, group: int, limit: int = 64) -> list[int]:
    """Tensor-parallel sizes that split ``size`` input columns only at ``group`` boundaries."""
    if group <= 0:
        return [1]
    return [t for t in range(1, limit + 1) if size % t == 0 and (size // t) % group == 0]


def packed_shape(rows: int, cols: int, bits: int, group: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(qweight shape, scales/zeros shape)`` of a ``rows x cols`` matrix at ``bits`` (group -1: whole row)."""
    group = cols if group <= 0 else group
    return (rows, cols * bits // WORD_BITS), (rows, cols // group)


def check_tensor(where: str, name: str, got: torch.Tensor, shape: tuple[int, int], bits: int) -> None:
    want = _TENSOR_DTYPES[name]
    if got.dtype != want or tuple(got.shape) != tuple(shape):
        hint = ""
        if name == "qweight" and got.dim() == 2 and got.shape[0] == shape[0] and got.shape[1] != shape[1]:
            hint = f" ({got.shape[1] * WORD_BITS / max(shape[1] * WORD_BITS // bits, 1):g}-bit words?)"
        raise CheckpointError(
            f"{where}.{name}: expected {want} {tuple(shape)} for {bits}-bit weights as quantization_config says, "
            f"the checkpoint has {got.dtype} {tuple(got.shape)}{hint}; the checkpoint does not match its config "
            "(truncated, edited, or expert_bits / linear_bits disagree with the tensors)."
        )


def check_compact(where: str, name: str, got: torch.Tensor, rows: int, groups: int, bits: int) -> None:
    """Check one stored compact-metadata tensor of a ``rows x groups`` grid (``name`` one of :data:`COMPACT`)."""
    dtype, shape = q8_shapes(rows, groups, bits)[name]
    if got.dtype != getattr(torch, dtype) or tuple(got.shape) != tuple(shape):
        raise CheckpointError(
            f"{where}.{name}: expected {dtype} {tuple(shape)} for {bits}-bit weights with compact (q8) metadata as "
            f"quantization_config says, the checkpoint has {got.dtype} {tuple(got.shape)}; the checkpoint does not "
            "match its config (truncated, edited, or expert_bits / linear_bits / metadata disagree with the tensors)."
        )


class CompactMetadata:
    """Collects the three compact tensors of each matrix as a loading loop hands them over, in any order; gives the
    matrix's fp16 ``(scales, zeros)`` once all three are in (:func:`~optimum_mc.group_quant.expand_metadata`)."""

    def __init__(self) -> None:
        self.pending: dict = {}

    def add(self, key, name: str, tensor: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        got = self.pending.setdefault(key, {})
        got[name] = tensor
        if len(got) < len(COMPACT):
            return None
        del self.pending[key]
        return expand_metadata(got["scale_codes"], got["scale_exps"], got["zero_codes"], bits)

    def incomplete(self) -> list[str]:
        """``<key>: <names missing>`` of every matrix with some but not all of its compact tensors."""
        return [f"{k}: {' '.join(sorted(set(COMPACT) - set(v)))}" for k, v in self.pending.items()]


def compact_placeholders(module: nn.Module) -> None:
    """Empty parameters under the compact tensors' names, so that a model's own loading loop (DeepSeek's) finds the
    checkpoint's names in ``named_parameters()`` and calls their ``weight_loader`` (which expands them)."""
    for name in COMPACT:
        dtype = torch.uint8 if name == "scale_codes" else torch.int8 if name == "scale_exps" else torch.int32
        module.register_parameter(name, nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False))


def allow_amx() -> None:
    """Ask Linux for AMX tile state for this process (once per process; no-op elsewhere).

    vLLM 0.32's CPU attention kernel uses AMX without asking for it, relying on torch's oneDNN having asked during
    an earlier bf16 matmul. With every linear running on optimum-mc's kernels no oneDNN bf16 GEMM runs first, and
    the attention kernel died with SIGILL on the first request (seen on this repository's tiny MC Mixtral)."""
    init = getattr(getattr(torch._C, "_cpu", None), "_init_amx", None)
    if init is not None:
        try:
            init()
        except Exception:  # noqa: BLE001 - a CPU without AMX: nothing to ask for
            pass


class PackedMatrix(nn.Module):
    """One packed matrix's parameters; ``remote``: another rank's (expert parallelism), held as empty placeholders so
    that its checkpoint names exist in ``named_parameters()`` (models with their own loading loop look them up)."""

    def __init__(self, rows: int, cols: int, bits: int, group: int, remote: bool = False, compact: bool = False):
        super().__init__()
        qshape, gshape = ((0,), (0,)) if remote else packed_shape(rows, cols, bits, group)
        self.qweight = nn.Parameter(torch.empty(qshape, dtype=torch.int32), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(gshape, dtype=torch.float16), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(gshape, dtype=torch.float16), requires_grad=False)
        if compact:  # the checkpoint stores scale_codes / scale_exps / zero_codes: expanded into scales / zeros
            compact_placeholders(self)


class PackedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int, gate_up_bits: int, down_bits: int, group: int, inter_group: int,
                 remote: bool = False, compact: bool = False, gated: bool = True):  # fmt: skip
        super().__init__()  # gated: gate then up rows (2I); else the I up rows only (Nemotron-H's ReLU² experts)
        self.gate_up = PackedMatrix((2 if gated else 1) * inter, hidden, gate_up_bits, group, remote, compact)
        self.down = PackedMatrix(hidden, inter, down_bits, inter_group, remote, compact)


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a served model's parameters: ``packed`` (MC's int32 words, fp16 scales / zeros), ``float`` (the
    rest: embeddings, norms, routers, unquantized linears). For ``LLM.apply_model`` (a module-level function, so
    vLLM's workers can unpickle it by reference)."""
    out = {"packed": 0, "float": 0}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in COMPACT:  # empty placeholders (their tensors were expanded into scales / zeros)
            continue
        kind = "packed" if leaf in _TENSOR_DTYPES and p.dtype == _TENSOR_DTYPES[leaf] else "float"
        out[kind] += p.numel() * p.element_size()
    return out
