"""Where a measured number came from: the commit, the command and the machine, recorded with every benchmark result.

Benchmarks (``scripts/bench_*.py``) put :func:`provenance` into the JSON they write, and
``scripts/readme_results.py`` prints it under each table it generates, so a figure in the README can be traced to
the code and the command that produced it (and rerun).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command(argv: list[str] | None = None) -> str:
    """The command line that ran this process, with the script's path relative to the repository when inside it."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        try:
            argv[0] = os.path.relpath(Path(argv[0]).resolve(), REPO) if Path(argv[0]).exists() else argv[0]
        except ValueError:  # another drive (Windows)
            pass
    return "python " + shlex.join(argv)


def provenance(argv: list[str] | None = None) -> dict:
    """``{"commit", "dirty", "command", "date", "cpu", "cpus", "torch", "transformers"}``; ``commit`` is None outside
    a git checkout, ``dirty`` says whether tracked files differed from it (then the commit alone does not reproduce
    the number)."""
    import torch

    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency of the package
        tf_version = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": _git("rev-parse", "--short=12", "HEAD"),
        "dirty": bool(status) if status is not None else None,
        "command": command(argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": tf_version,
    }
