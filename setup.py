"""Build glue: everything is declared in setup.cfg; this only ships the start-up ``.pth`` hook.

The ``.pth`` file makes Python import the tiny ``optimum_mc_autoload`` module at start-up, which registers method
"mc" with transformers as soon as transformers' quantizers are imported, so an MC checkpoint loaded without
``import optimum_mc`` still loads correctly instead of silently becoming a float model with random experts.
"""

import os

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "optimum_mc-autoload.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        strategy = super()._select_strategy(name, tag, build_lib)
        here = os.path.abspath(os.path.dirname(__file__))

        class WithPth:
            def __call__(self, wheel, files, mapping):
                strategy(wheel, files, mapping)
                with open(os.path.join(here, PTH), encoding="utf-8") as f:
                    wheel.writestr(PTH, f.read())

            def __enter__(self):
                strategy.__enter__()
                return self

            def __exit__(self, *exc):
                return strategy.__exit__(*exc)

        return WithPth()


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
