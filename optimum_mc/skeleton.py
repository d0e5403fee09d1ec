"""Empty packed modules in place of float ones, shaped from stored bit-widths (checkpoint loading and staging)."""

from __future__ import annotations

from torch import nn

from .architectures import MoEArchitecture, moe_block, set_submodule
from .bitwidths import ExpertBits


def install_packed_skeleton(
    layer: nn.Module,
    layer_idx: int,
    arch: MoEArchitecture,
    expert_bits: list[ExpertBits] | None,
    linear_bits: dict[str, int],
    group_size: int,
    nonexpert_method: str,
    device: str = "meta",
    metadata: str = "fp16",
) -> None:
    """Replace, inside one decoder ``layer``, the experts and the linears named in ``linear_bits`` (names relative
    to the layer) by empty packed modules on ``device``, ready for ``load_state_dict(..., assign=True)``."""
    from .nn import QuantLinear
    from .nn.experts import packed_like
    from .nn.nf4_linear import NF4Linear

    blk = moe_block(layer, layer_idx, arch)
    if expert_bits is not None and blk is not None:
        new = packed_like(blk.experts, list(expert_bits), group_size, device=device, metadata=metadata)
        setattr(blk.block, arch.experts_attr, new)
    for name, b in linear_bits.items():
        m = layer.get_submodule(name)
        kw = dict(bias=m.bias is not None, dtype=m.weight.dtype, device=device)
        qkw = dict(kw, metadata=metadata)
        if nonexpert_method == "bnb_nf4":
            set_submodule(layer, name, NF4Linear(m.in_features, m.out_features, **kw))
        else:
            set_submodule(layer, name, QuantLinear(m.in_features, m.out_features, b, group_size, **qkw))
