"""A workaround for vLLM 0.32's CPU rotary-embedding kernel, which the vLLM plugin installs on the CPU platform.

``RotaryEmbedding.forward_cpu`` hands query and key to the C kernel ``_C.rotary_embedding``, which rotates them right
only as 2-D ``(tokens, heads * head_size)`` tensors (what attention layers with a fused QKV projection pass).
Multi-head latent attention (DeepSeek-V2/V3, ``vllm/model_executor/layers/mla.py``) passes the rope part of the
query as a 3-D ``(tokens, heads, rope_dim)`` view and the shared rope key as a ``(tokens, 1, rope_dim)`` view of the
latent projection: the kernel then leaves the key unrotated and writes the query's rotation into the wrong heads
(measured against ``forward_native``, which is right: up to 7 in absolute error on unit-variance inputs, contiguous
or not, at DeepSeek-V3's own sizes too). Served through vLLM's CPU build, a DeepSeek model (float or MC) then attends
with wrong positions: its prompt logprobs differed from transformers' by 0.3-1.0 on a tiny model, fp32 or bf16
(2e-6 with this fix).

The fix routes every call with a query or key that is not 2-D to ``forward_native`` and writes the result back into
the given tensors (callers may rely on the kernel's in-place update); 2-D calls keep the kernel. Nothing else of vLLM
is changed, and only on the CPU platform. It is installed by the process that loads an MC checkpoint (when vLLM builds
its ``MCVllmConfig``), not by the plugin's registration, so a vLLM process serving other models keeps vLLM's code as
it is; ``OPTIMUM_MC_VLLM_CPU_ROPE_FIX=1`` installs it in every vLLM process (the family check sets it so that the
float reference models are served with the same rope as the MC ones).
"""

from __future__ import annotations

ENV_ALL_MODELS = "OPTIMUM_MC_VLLM_CPU_ROPE_FIX"


def install() -> bool:
    """Patch ``RotaryEmbedding.forward_cpu`` (once per process); False where not on vLLM's CPU platform."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    kernel = RotaryEmbedding.forward_cpu
    if getattr(kernel, "_optimum_mc", False):
        return True

    def forward_cpu(self, positions, query, key=None):
        if query.dim() == 2 and (key is None or key.dim() == 2):
            return kernel(self, positions, query, key)
        q, k = self.forward_native(positions, query, key)
        query.copy_(q)
        if key is not None:
            key.copy_(k)
        return query, key

    forward_cpu._optimum_mc = True
    RotaryEmbedding.forward_cpu = forward_cpu
    return True
