"""Test layout: tests/<subpackage>/ mirrors optimum_mc/<subpackage>/ (kernels, nn, pruning, calibration, integrations,
tools); tests of top-level modules and end-to-end runs sit in tests/. Shared builders live in tests/tiny_models.py and
tests/helpers/, importable from every folder (this directory is put on sys.path)."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
