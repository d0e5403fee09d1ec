"""Lazily register optimum-mc with transformers, so "mc" checkpoints never load silently as float models.

Installed next to optimum_mc with a ``.pth`` line that imports this module at interpreter start-up. It imports
nothing heavy: it only adds an import hook that, once ``transformers.quantizers.auto`` has been imported by
anyone, registers method "mc" (importing optimum_mc then). Set ``OPTIMUM_MC_NO_AUTOLOAD=1`` to disable.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

_TARGET = "transformers.quantizers.auto"


class _RegisterAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
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
    """Add the hook (once); register right away if transformers' quantizers are already imported."""
    if os.environ.get("OPTIMUM_MC_NO_AUTOLOAD"):
        return
    if _TARGET in sys.modules:
        from optimum_mc.registration import register

        register()
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


try:
    install()
except Exception:  # noqa: BLE001 - a start-up hook must never stop Python from starting
    pass
