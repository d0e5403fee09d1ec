"""When a module may call a registered kernel directly instead of through the ``torch.library`` dispatcher.

The custom-op layers (Python autograd and backend wrappers) cost 20-40 µs per call, more than the kernel itself
on small matrices. In plain eager mode the dispatcher would pick the same kernel, so calling it directly changes
nothing but the time. Anything else (``torch.compile`` tracing, fake tensors, tensor subclasses, a dispatch mode,
inputs that need a gradient) goes through the dispatcher.
"""

from __future__ import annotations

import torch


def plain_eager(x: torch.Tensor) -> bool:
    """True outside tracing / fake-tensor / dispatch modes, for a plain tensor that does not need a gradient."""
    return (
        type(x) is torch.Tensor
        and not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not (x.requires_grad and torch.is_grad_enabled())
    )
