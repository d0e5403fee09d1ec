"""Packed-tensor shapes, checks and holders shared by the vLLM plugin's linear and MoE methods (imports no vLLM)."""

from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import CheckpointError
from ...packing import WORD_BITS

EXPERT_NAME = re.compile(r"packed\.(\d+)\.(gate_up|down)\.(qweight|scales|zeros)")
_TENSOR_DTYPES = {"qweight": torch.int32, "scales": torch.float16, "zeros": torch.float16}


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

    def __init__(self, rows: int, cols: int, bits: int, group: int, remote: bool = False) -> None:
        super().__init__()
        qshape, gshape = ((0,), (0,)) if remote else packed_shape(rows, cols, bits, group)
        self.qweight = nn.Parameter(torch.empty(qshape, dtype=torch.int32), requires_grad=False)
        self.scales = nn.Parameter(torch.empty(gshape, dtype=torch.float16), requires_grad=False)
        self.zeros = nn.Parameter(torch.empty(gshape, dtype=torch.float16), requires_grad=False)


class PackedExpert(nn.Module):
    def __init__(self, hidden: int, inter: int, gate_up_bits: int, down_bits: int, group: int, inter_group: int,
                 remote: bool = False):  # fmt: skip
        super().__init__()
        self.gate_up = PackedMatrix(2 * inter, hidden, gate_up_bits, group, remote)
        self.down = PackedMatrix(hidden, inter, down_bits, inter_group, remote)


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of a served model's parameters: ``packed`` (MC's int32 words, fp16 scales / zeros), ``float`` (the
    rest: embeddings, norms, routers, unquantized linears). For ``LLM.apply_model`` (a module-level function, so
    vLLM's workers can unpickle it by reference)."""
    out = {"packed": 0, "float": 0}
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        kind = "packed" if leaf in _TENSOR_DTYPES and p.dtype == _TENSOR_DTYPES[leaf] else "float"
        out[kind] += p.numel() * p.element_size()
    return out
