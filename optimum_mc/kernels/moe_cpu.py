"""CPU implementation of ``optimum_mc::moe`` on the C kernels (``csrc/``).

A few tokens (decode: at most ``cpu.moe_decode_tokens(int8)``, 12, or 32 with int8 activations) run the whole layer
in one C call (``mc_moe_decode``), ODP's rule and counts included (fp32 routing weights). What that call needs of a
layer's packed experts (pointer tables, bit-widths, shapes, checked once) is a :class:`DecodePlan`, cached here keyed
on the buffers' identity (:func:`decode_plan`): callers pass tensors, never plans. With more tokens (prefill,
:mod:`.moe_prefill`), token-expert pairs are sorted by expert (dropped slots sort last and are never computed) and
each projection runs over every expert:

- experts with at most ``cpu.gemv_rows(...)`` routed rows (decode; 12, or 5 for bf16 on AMX): ``mc_moe_gemv``,
  threaded over (expert, 64-row output block) work items, reading the packed bits directly, every bit-width in
  the same call;
- experts with more rows (prefill), bf16 hidden states: a fused C kernel dequantizes small blocks of the expert's
  weight into bf16 and multiplies them while they are in cache (AMX ``mc_amx_linear``; else, with AVX512-BF16,
  ``mc_bf16_linear_fma`` / ``mc_bf16_linear``: weights rounded to bf16, fp32 sums); on CPUs with neither, the
  hidden states are widened to fp32 and ``mc_fma_linear`` (AVX2 + FMA) multiplies them with exact fp32 weights;
- experts with more rows, fp32 hidden states (or none of those kernels built): the weight is dequantized in C in
  16 MiB fp32 blocks and multiplied with fp32 BLAS.

Each projection's sums go through a C epilogue (:mod:`.moe_prefill`; inside the AMX kernel): ``glu(gate, up)``
(:data:`~.activations.GATED`) after gate/up, the routing-weighted scatter-add into the tokens' rows after down.
Everything is computed in fp32 except the bf16-rounded weights of the bf16 prefill kernels (their products are
exact in fp32 and summed in fp32) and, for bf16 hidden states, the activated hidden (rounded to bf16 as a bf16
float model's is).
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from ..bitwidths import from_op_bits
from . import cpu
from .moe import check_index_values
from .moe_prefill import ACT_CODES
from .moe_prefill import prefill as _prefill
from .moe_prefill import ptrs as _ptrs
from .odp_rule import apply_odp, counters
from .reference import moe_reference

_INT32, _FP16 = torch.int32, torch.float16


def _fits(qws, ss, zs, bits: list[int], out_f: int, in_f: int) -> bool:
    """Whether every expert's matrix is what the C kernels read: canonical dtypes, contiguous, ``(out_f, in_f)``
    at its bits, one group count for all, groups of whole 32-code blocks. Cheap (shape and flag reads only)."""
    groups = ss[0].shape[1] if ss[0].dim() == 2 else 0
    if not groups or in_f % groups or (in_f // groups) % 32 or len(qws) != len(bits):
        return False
    for qw, s, z, b in zip(qws, ss, zs, bits):
        if (
            qw.dtype != _INT32 or s.dtype != _FP16 or z.dtype != _FP16
            or qw.shape != (out_f, in_f * b // 32) or s.shape != (out_f, groups) or z.shape != (out_f, groups)
            or not (qw.is_contiguous() and s.is_contiguous() and z.is_contiguous())
            or b not in (1, 2, 3, 4, 8)
        ):  # fmt: skip
            return False
    return True


class DecodePlan:
    """What ``mc_moe_decode`` needs of one layer's packed experts (pointer tables, bit-widths, shapes), checked
    (:func:`_fits`) and built once, then reused while the op is called with the same buffer objects (a module that
    replaces a buffer, e.g. ``.to()`` or loading, gets a new plan). Saves ~50 µs of checks per layer and step. Holds
    weak references only: a plan never keeps a model's buffers alive."""

    def __init__(self, lists: tuple[list[torch.Tensor], ...], bits: list[int], activation: str,
                 checked: bool = False) -> None:  # fmt: skip
        gq, gs, gz, dq, ds, dz = lists
        self.refs = [weakref.ref(t) for lst in lists for t in lst]
        self.addresses = [t.data_ptr() for lst in lists for t in lst]
        self.num_experts, self.activation, self.op_bits = len(gq), activation, list(bits)
        gu_bits, dn_bits = from_op_bits(bits, len(gq))
        self.hidden, self.inter = gq[0].shape[1] * 32 // gu_bits[0], gq[0].shape[0] // 2
        lib = cpu.library()
        self.ok = (
            lib is not None
            and activation in ACT_CODES
            and self.inter > 0
            and (checked or _fits(gq, gs, gz, gu_bits, 2 * self.inter, self.hidden))
            and (checked or _fits(dq, ds, dz, dn_bits, self.hidden, self.inter))
        )
        if self.ok:
            self.lib = lib
            self.tables = tuple(_ptrs(t) for t in lists)
            self.bits = (ctypes.c_int32 * (2 * len(gq)))(*gu_bits, *dn_bits)  # mc_moe_decode: gate/up, then down
            self.groups = (self.hidden // gs[0].shape[1], self.inter // ds[0].shape[1])

    def matches(self, lists: tuple[list[torch.Tensor], ...]) -> bool:
        """True while every buffer is the object, with the memory, this plan was built from."""
        mine, where = iter(self.refs), iter(self.addresses)
        same = all(
            (r := next(mine, None)) is not None and r() is t and t.data_ptr() == next(where)
            for lst in lists
            for t in lst
        )
        return same and next(mine, None) is None

    def __call__(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 odp_threshold: float = 0.0, odp_counts: torch.Tensor | None = None,
                 int8: bool = False, gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """A few tokens (at most ``cpu.moe_decode_tokens(int8)``): the whole layer in one C call, optionally with
        ODP's rule (``odp_threshold`` > 0), ODP's counters (int64 ``E + 3``, CPU, contiguous), int8 activations in the
        GEMVs (``int8``: each group of the inputs rounded to int8 with its own scale, as llama.cpp does) and the
        experts' biases (``(E, 2I)`` / ``(E, H)``, read as fp32)."""
        (tokens, hidden), k = x.shape, top_k_index.shape[1]
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        idx = top_k_index if top_k_index.dtype == torch.int64 else top_k_index.long()
        w = top_k_weights if top_k_weights.dtype == torch.float32 else top_k_weights.float()
        idx, w = idx.contiguous(), w.contiguous()
        out = torch.empty(tokens, hidden, dtype=torch.float32)
        gb, db = (None if b is None else b.float().contiguous() for b in (gate_up_bias, down_bias))
        rc = self.lib.mc_moe_decode(
            xf.data_ptr(), tokens, k, idx.data_ptr(), w.data_ptr(), *self.tables, self.bits, self.num_experts,
            hidden, self.inter, self.groups[0], self.groups[1], ACT_CODES[self.activation], out.data_ptr(),
            torch.get_num_threads(), odp_threshold, None if odp_counts is None else odp_counts.data_ptr(), int(int8),
            None if gb is None else gb.data_ptr(), None if db is None else db.data_ptr(),
        )  # fmt: skip
        if rc == -3:
            check_index_values(top_k_index, self.num_experts)  # raises the typed error
        if rc == -2:
            raise MemoryError("optimum-mc CPU MoE kernel could not allocate its buffers")
        if rc:
            raise RuntimeError(f"optimum-mc CPU MoE kernel failed with code {rc} (internal error)")
        return out if x.dtype == torch.float32 else out.to(x.dtype)


_PLANS: dict[int, DecodePlan] = {}  # id of a layer's first gate/up qweight -> the plan of its buffers


def decode_plan(lists: tuple[list[torch.Tensor], ...], bits: list[int], activation: str) -> DecodePlan:
    """The cached :class:`DecodePlan` of these buffers (built on first use, or when a buffer was replaced, its
    memory moved, or the bit-widths / activation differ); dropped when the layer's first buffer is freed."""
    first = lists[0][0]
    key = id(first)
    plan = _PLANS.get(key)
    if plan is not None and plan.activation == activation and plan.op_bits == bits and plan.matches(lists):
        return plan
    if plan is None:
        weakref.finalize(first, _PLANS.pop, key, None)  # the id is free again once the tensor is gone
    plan = DecodePlan(lists, bits, activation)
    _PLANS[key] = plan
    return plan


def _decode(lib, x, top_k_index, top_k_weights, gu, dn, bits: list[int], activation: str, int8: bool = False,
            biases=(None, None), odp_threshold: float = 0.0,
            odp_counts: torch.Tensor | None = None) -> torch.Tensor | None:  # fmt: skip
    """A few tokens: the whole layer in one C call (``mc_moe_decode``), ODP's rule and counts inside it for fp32
    routing weights and CPU int64 counters (else applied here in torch ops first); None when the C kernel does not
    take these experts (:func:`_fits`)."""
    plan = decode_plan((*gu, *dn), bits, activation)
    if not plan.ok:
        return None
    odp_counts = counters(odp_counts)
    odp = odp_threshold > 0 or odp_counts is not None
    c = odp_counts
    if odp and not (
        top_k_weights.dtype == torch.float32
        and (c is None or (c.dtype == torch.int64 and c.is_cpu and c.is_contiguous()))
    ):  # (bf16 weights: the rule's renormalized weights are rounded to bf16 in torch; the kernel keeps fp32)
        top_k_index, top_k_weights = apply_odp(top_k_index, top_k_weights, odp_threshold, odp_counts, plan.num_experts)
        odp_threshold, odp_counts = 0.0, None
    return plan(x, top_k_index, top_k_weights, odp_threshold, odp_counts, int8, biases[0], biases[1])


def moe_cpu(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight,
            down_scales, down_zeros, bits: list[int], activation: str, decode_activations: str = "float",
            gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
            odp_threshold: float = 0.0, odp_counts: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """CPU implementation of ``optimum_mc::moe`` (the reference serves inputs the C kernels do not take)."""
    lib = cpu.library()
    gu, dn = (gate_up_qweight, gate_up_scales, gate_up_zeros), (down_qweight, down_scales, down_zeros)
    biases = (gate_up_bias, down_bias)
    if lib is not None and x.dim() == 2 and activation in ACT_CODES and gate_up_qweight[0].shape[0] >= 2:
        int8 = cpu.int8_decode(decode_activations, x.dtype)
        if x.shape[0] <= cpu.moe_decode_tokens(int8):
            out = _decode(lib, x, top_k_index, top_k_weights, gu, dn, bits, activation, int8, biases, odp_threshold,
                          odp_counts)  # fmt: skip
            if out is not None:
                return out
    num_experts = len(gate_up_qweight)
    check_index_values(top_k_index, num_experts)
    top_k_index, top_k_weights = apply_odp(top_k_index, top_k_weights, odp_threshold, odp_counts, num_experts)
    hidden, inter = x.shape[-1], (gate_up_qweight[0].shape[0] // 2 if gate_up_qweight else 0)
    gu_bits, dn_bits = from_op_bits(bits, num_experts)
    if (
        lib is None
        or x.dim() != 2
        or activation not in ACT_CODES
        or not inter
        or not _fits(*gu, gu_bits, 2 * inter, hidden)
        or not _fits(*dn, dn_bits, hidden, inter)
    ):
        return moe_reference(x, top_k_index, top_k_weights, list(zip(*gu)), list(zip(*dn)), bits, activation,
                             gate_up_bias, down_bias)  # fmt: skip
    return _prefill(lib, x, top_k_index, top_k_weights, gu, dn, bits, activation, biases)


_LIB = None


def register() -> None:
    """Register the CPU implementation of ``optimum_mc::moe`` (idempotent)."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("optimum_mc", "IMPL")
        _LIB.impl("moe", moe_cpu, "CPU")
