"""Register MCConfig / MCQuantizer with transformers as quantization method "mc" (idempotent)."""

from __future__ import annotations

METHOD = "mc"


def register() -> None:
    """Make ``quant_method="mc"`` known to transformers; safe to call any number of times."""
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from .config import MCConfig
    from .quantizer import MCQuantizer

    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not MCConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)
        register_quantization_config(METHOD)(MCConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not MCQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        register_quantizer(METHOD)(MCQuantizer)
    _honour_loading_attributes()
    _guard()


def _honour_loading_attributes() -> None:
    """Let ``from_pretrained(mc_checkpoint, quantization_config=MCConfig(odp=True, ...))`` apply the passed ODP
    options: transformers copies ``get_loading_attributes()`` from the passed config only for the config types
    listed in ``LOADING_ATTRIBUTES_CONFIG_TYPES`` (read at call time); MCConfig joins that list."""
    import transformers.quantizers.auto as auto

    from .config import MCConfig

    types = getattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if types is None or MCConfig in types:
        return
    kept = tuple(t for t in types if t.__qualname__ != MCConfig.__qualname__ or t.__module__ != MCConfig.__module__)
    auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*kept, MCConfig)


def _guard() -> None:
    """Refuse configs holding MC results under another quant_method (see optimum_mc_autoload), even under -S."""
    try:
        import transformers.quantizers.auto as auto

        from optimum_mc_autoload import install_guard
    except ImportError:  # pragma: no cover - the start-up module is installed with the package
        return
    install_guard(auto)


def is_registered() -> bool:
    """Whether transformers currently maps "mc" to optimum-mc's classes."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    return AUTO_QUANTIZER_MAPPING.get(METHOD) is not None
