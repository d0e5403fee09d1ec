"""QuantLinear: a drop-in for ``nn.Linear`` holding one packed low-bit weight (attention, shared experts, MLPs)."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, DeviceMismatchError, ShapeError
from ..group_quant import check_group_size, compact_metadata, expand_metadata, q8_shapes, rtn_quantize
from ..kernels import dequantize, qmatmul_op
from ..packing import check_bits, pack, packed_words

_INT32, _FP16 = torch.int32, torch.float16


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight (out, in)`` and ``bias`` (used by ``model.dequantize()``)."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


class QuantLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` stored as b-bit codes and per-group fp16 scale / zero (docs/format.md).

    Buffers: ``qweight`` int32 ``(out, in * bits / 32)``, ``scales`` and ``zeros`` fp16 ``(out, in / group)``,
    optional ``bias`` in ``dtype``. ``metadata="q8"`` (MCConfig's compact metadata, :mod:`optimum_mc.group_quant`):
    the state dict (the checkpoint) holds ``scale_codes`` uint8 ``(out, groups)``, ``scale_exps`` int8
    ``(ceil(out / 16), groups)`` and ``zero_codes`` (the zeros packed at ``bits`` bits) instead of ``scales`` /
    ``zeros``, which stay in memory as non-persistent buffers expanded from them (:meth:`expand_metadata`, exact)
    so every kernel reads what it reads with fp16 metadata.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 128,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        metadata: str = "fp16",
    ) -> None:
        super().__init__()
        if metadata not in ("fp16", "q8"):
            raise CheckpointError(f"metadata must be 'fp16' or 'q8', got {metadata!r}.")
        self.metadata = metadata
        self.bits = check_bits(bits)
        self.group_size = check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.dtype = in_features, out_features, dtype
        groups = in_features // self.group_size
        words = packed_words(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, words, dtype=torch.int32, device=device))
        q8 = metadata == "q8"  # the stored form is compact; the fp16 grid is computed from it (not saved)
        grid = dict(dtype=torch.float16, device=device)
        self.register_buffer("scales", torch.zeros(out_features, groups, **grid), persistent=not q8)
        self.register_buffer("zeros", torch.zeros(out_features, groups, **grid), persistent=not q8)
        if q8:
            for name, (dt, shape) in q8_shapes(out_features, groups, bits).items():
                self.register_buffer(name, torch.zeros(shape, dtype=getattr(torch, dt), device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # "auto" / "float" / "int8": what the CPU decode GEMV takes (kernels.cpu.int8_decode, set_decode_activations)
        self.decode_activations = "auto"

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
        metadata: str = "fp16",
    ) -> QuantLinear:
        """Build from uint8 codes ``(out, in)`` and fp16 scales / zeros ``(out, groups)`` (on the q8 grid for
        ``metadata="q8"``)."""
        out_f, in_f = codes.shape
        group = in_f // scales.shape[1]
        new = cls(in_f, out_f, bits, group, bias is not None, dtype, codes.device, metadata)
        new.set_codes(codes, scales, zeros)
        if bias is not None:
            new.bias.copy_(bias.detach().to(dtype))
        return new

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 128) -> QuantLinear:
        """Round-to-nearest quantization of an ``nn.Linear`` (no calibration)."""
        codes, scales, zeros = rtn_quantize(linear.weight.detach(), bits, group_size)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_codes(codes, scales, zeros, bits, bias, linear.weight.dtype)

    @torch.no_grad()
    def set_codes(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Pack ``codes`` into this module's buffers."""
        if codes.shape != (self.out_features, self.in_features):
            raise CheckpointError(f"codes {tuple(codes.shape)} do not fit {self.out_features}x{self.in_features}.")
        if scales.shape != self.scales.shape or zeros.shape != self.zeros.shape:
            raise CheckpointError(f"scales/zeros must be {tuple(self.scales.shape)}, got {tuple(scales.shape)}.")
        self.qweight.copy_(pack(codes, self.bits))
        self.scales.copy_(scales.to(torch.float16))
        self.zeros.copy_(zeros.to(torch.float16))
        if self.metadata == "q8":
            try:
                compact = compact_metadata(self.scales, self.zeros, self.bits)
            except ShapeError as exc:
                raise CheckpointError(f"{exc}") from exc
            for name, t in zip(("scale_codes", "scale_exps", "zero_codes"), compact):
                self._buffers[name].copy_(t)

    @torch.no_grad()
    def expand_metadata(self) -> None:
        """``metadata="q8"``: (re)compute the fp16 ``scales`` / ``zeros`` the kernels read from the stored compact
        tensors (exact; after loading a checkpoint). A no-op for fp16 metadata."""
        if self.metadata != "q8":
            return
        b = self._buffers
        if b["scale_codes"].is_meta:
            return
        s, z = expand_metadata(b["scale_codes"], b["scale_exps"], b["zero_codes"], self.bits)
        for name, t in (("scales", s), ("zeros", z)):
            old = b[name]
            if old is not None and not old.is_meta and old.shape == t.shape and old.dtype == t.dtype:
                old.copy_(t)
            else:
                b[name] = t

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(out, in)`` weight this module computes with."""
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """An equivalent float ``nn.Linear`` (for ``model.dequantize()``)."""
        return float_linear(self.dequantize_weight(), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The buffers' shapes and dtypes are fixed at construction and checked at load (_load_from_state_dict);
        # _apply keeps scales / zeros in fp16 through .to(dtype). So a call only checks x, then runs the op.
        b = self._buffers
        qw, s, z = b["qweight"], b["scales"], b["zeros"]
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"x has {x.shape[-1]} features, this layer expects {self.in_features}.")
        on_cpu = x.is_cpu  # a flag read; comparing torch.device objects costs more than the rest of a small call
        if on_cpu != qw.is_cpu or (not on_cpu and x.device != qw.device):
            raise DeviceMismatchError(f"x is on {x.device} but the packed weight is on {qw.device}; move one.")
        y = qmatmul_op(x, qw, s, z, self.bits, self.decode_activations)
        bias = b["bias"]
        return y + bias.to(y.dtype) if bias is not None else y

    def _apply(self, fn, recurse: bool = True):
        """Move buffers like any module, but keep the grid fp16 (``model.to(torch.bfloat16)`` must not round it):
        a cast of ``scales`` / ``zeros`` is undone exactly by moving the original to the new device instead."""
        grid = {name: self._buffers[name] for name in ("scales", "zeros")}
        super()._apply(fn, recurse)
        for name, old in grid.items():
            new = self._buffers[name]
            if new is not None and new.dtype != _FP16:
                self._buffers[name] = old.to(device=new.device)
        return self

    def nbytes(self) -> int:
        """Stored size of the weight: codes plus scales and zeros as saved (fp16, or the compact q8 tensors)."""
        names = ("qweight", "scales", "zeros")
        if self.metadata == "q8":
            names = ("qweight", "scale_codes", "scale_exps", "zero_codes")
        return sum(self._buffers[n].numel() * self._buffers[n].element_size() for n in names)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is None or key not in state_dict:
                continue
            got = state_dict[key]
            if got.shape != buf.shape or (name != "bias" and got.dtype != buf.dtype):
                raise CheckpointError(
                    f"{key}: expected {buf.dtype} {tuple(buf.shape)} for a {self.bits}-bit "
                    f"{self.out_features}x{self.in_features} weight (group {self.group_size}), "
                    f"checkpoint has {got.dtype} {tuple(got.shape)}; the checkpoint does not match its config."
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if self.metadata == "q8" and all(
            prefix + n in state_dict for n in ("scale_codes", "scale_exps", "zero_codes")
        ):
            self.expand_metadata()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
            + (", metadata=q8" if self.metadata == "q8" else "")
        )
