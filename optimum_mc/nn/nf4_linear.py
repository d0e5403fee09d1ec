"""NF4Linear: attention / dense layers in bitsandbytes 4-bit NF4 (``MCConfig(nonexpert_method="bnb_nf4")``).

Quantization and the matmul are bitsandbytes' own (``quantize_4bit`` / ``matmul_4bit``); this module only keeps
the packed weight and its statistics as plain buffers, so MC checkpoints save and load them like any other
tensor (safetensors, no bitsandbytes-specific serialization, exact round trips).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, ShapeError
from .linear import float_linear

NF4_BLOCKSIZE = 64


def _bnb():
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_f

    return bnb, bnb_f


class NF4Linear(nn.Module):
    """A drop-in for ``nn.Linear`` holding an NF4 weight (block-wise absmax, ``blocksize`` values per block)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        blocksize: int = NF4_BLOCKSIZE,
    ) -> None:
        super().__init__()
        n = in_features * out_features
        if n % blocksize or n % 2:
            raise ShapeError(f"NF4 needs in*out ({n}) divisible by the block size {blocksize}.")
        self.in_features, self.out_features, self.blocksize, self.dtype = in_features, out_features, blocksize, dtype
        self.register_buffer("weight_nf4", torch.zeros(n // 2, 1, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(n // blocksize, dtype=torch.float32, device=device))
        self.register_buffer("quant_map", torch.zeros(16, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = NF4_BLOCKSIZE) -> NF4Linear:
        _, bnb_f = _bnb()
        w = linear.weight.detach()
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, w.device, blocksize)
        packed, state = bnb_f.quantize_4bit(w.float(), blocksize=blocksize, quant_type="nf4")
        new.weight_nf4.copy_(packed.reshape(new.weight_nf4.shape))
        new.absmax.copy_(state.absmax)
        new.quant_map.copy_(state.code)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach())
        return new

    def _state(self):
        _, bnb_f = _bnb()
        return bnb_f.QuantState(
            absmax=self.absmax,
            shape=torch.Size((self.out_features, self.in_features)),
            code=self.quant_map,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=torch.float32,
        )

    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        _, bnb_f = _bnb()
        return bnb_f.dequantize_4bit(self.weight_nf4, self._state()).to(dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """An equivalent float ``nn.Linear`` (for ``model.dequantize()``)."""
        return float_linear(self.dequantize_weight(), self.bias)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed NF4 codes, under the attribute name peft reads a quantized base layer's device from."""
        return self.weight_nf4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bnb, _ = _bnb()
        y = bnb.matmul_4bit(x.float(), self.weight_nf4.t(), self._state()).to(x.dtype)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                raise CheckpointError(
                    f"{key}: expected shape {tuple(buf.shape)}, checkpoint has {tuple(state_dict[key].shape)}."
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize={self.blocksize}"
