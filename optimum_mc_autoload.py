"""Lazily register optimum-mc with transformers, so "mc" checkpoints never load silently as float models.

Installed next to optimum_mc with a ``.pth`` line that imports this module at interpreter start-up. It imports
nothing heavy: it only adds an import hook that, once ``transformers.quantizers.auto`` has been imported by
anyone, registers method "mc" (importing optimum_mc then). ``OPTIMUM_MC_NO_AUTOLOAD=1`` disables the automatic
registration, not the guard: loading an "mc" checkpoint then raises ``PluginNotImportedError`` until ``optimum_mc``
is imported. The guard also refuses a config whose ``quant_method`` was changed although it holds MC results.
Limits: under ``python -S`` (no ``.pth`` files) nothing runs before ``import optimum_mc``, and a checkpoint whose
``quantization_config`` was deleted is a plain float checkpoint to transformers.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

_TARGET = "transformers.quantizers.auto"
_METHOD = "mc"
_MC_RESULT_KEYS = ("expert_bits", "moe_layers")


def _not_imported(message: str) -> Exception:
    from optimum_mc.errors import PluginNotImportedError

    return PluginNotImportedError(message)


def install_guard(auto) -> None:
    """Wrap ``AutoHfQuantizer.supports_quant_method`` of module ``auto`` (transformers.quantizers.auto) so an MC
    checkpoint is never skipped as an unknown method (which loads it as a float model with random experts)."""
    original = auto.AutoHfQuantizer.supports_quant_method
    if getattr(original, "_mc_guard", False):
        return

    def supports_quant_method(quantization_config_dict):
        d = quantization_config_dict
        if isinstance(d, dict):
            method = d.get("quant_method")
            if method == _METHOD and _METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
                raise _not_imported(
                    "this is an optimum-mc (quant_method 'mc') checkpoint but optimum_mc is not registered with "
                    "transformers (OPTIMUM_MC_NO_AUTOLOAD is set, or its start-up hook did not run): "
                    "`import optimum_mc` before from_pretrained."
                )
            if method != _METHOD and all(k in d for k in _MC_RESULT_KEYS):
                raise _not_imported(
                    f"this checkpoint's quantization_config holds optimum-mc results ({', '.join(_MC_RESULT_KEYS)}) "
                    f'but its quant_method is {method!r}; set "quant_method": "mc" in config.json to load it.'
                )
        return original(d)

    supports_quant_method._mc_guard = True
    auto.AutoHfQuantizer.supports_quant_method = staticmethod(supports_quant_method)


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        try:
            install_guard(module)
        except Exception as exc:  # never break transformers because of the plug-in
            print(f"optimum-mc: could not install the 'mc' checkpoint guard: {exc}", file=sys.stderr)
        if os.environ.get("OPTIMUM_MC_NO_AUTOLOAD"):
            return
        try:
            from optimum_mc.registration import register

            register()
        except Exception as exc:  # never break transformers because of the plug-in
            print(f"optimum-mc: could not register quantization method 'mc': {exc}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisterAfterLoad(spec.loader)
                return spec
        return None


def install() -> None:
    """Add the hook (once); guard and register right away if transformers' quantizers are already imported."""
    if _TARGET in sys.modules:
        install_guard(sys.modules[_TARGET])
        if not os.environ.get("OPTIMUM_MC_NO_AUTOLOAD"):
            from optimum_mc.registration import register

            register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # noqa: BLE001 - a start-up hook must never stop Python from starting
    pass
