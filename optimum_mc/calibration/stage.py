"""The staging folder: finished layers on disk, so quantization can stop and resume, and host RAM stays flat.

After each decoder layer the folder receives, each written to a temporary name and renamed into place:

1. ``layer-NNNNN.safetensors`` — the quantized layer's tensors, with its record (bits, factors, linear widths) in
   the safetensors metadata;
2. ``inputs.safetensors`` — the hidden states that feed the next layer (the calibration batches);
3. ``progress.json`` — written last, the commit point: fingerprint, phase and the next layer to run.

A run killed at any moment leaves either the previous or the new ``progress.json``, and whatever it names is
complete. ``resume`` reads it back; the fingerprint (model config, checkpoint files, every quantization option)
must match, so a folder from another model or config is refused instead of mixing results. Calibration inputs of
a resumed run are the saved ones, bit for bit, so a resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import MCConfigError
from ..placement import check_writable_folder

FORMAT = "optimum-mc-stage/1"
_PROGRESS = "progress.json"
_INPUTS = "inputs.safetensors"
_HELD = "held-inputs.safetensors"  # the current layer's inputs while its weights are quantized (not a commit)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(cpu, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def _save_batches(path: Path, hidden: list[torch.Tensor]) -> None:
    _atomic_save_tensors(path, {f"batch.{i}": h for i, h in enumerate(hidden)}, None)


def _load_batches(path: Path, devices: list[torch.device | str]) -> list[torch.Tensor]:
    """The batches :func:`_save_batches` wrote, on ``devices`` (read with pread: no mapped pages on top)."""
    from .layer_source import open_unmapped

    with open_unmapped(str(path)) as f:
        return [f.get_tensor(f"batch.{i}").to(d) for i, d in enumerate(devices)]


def _ours(name: str) -> bool:
    """A file this module writes (a run interrupted before its first commit leaves some: not a foreign folder)."""
    return name in (_INPUTS, _HELD) or re.fullmatch(r"[a-z]+-layer-\d{5}\.safetensors", name) is not None


def fingerprint(parts: dict[str, Any]) -> str:
    """A stable digest of everything that decides a run's bytes."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


@dataclass
class Progress:
    """What a staging folder says was finished."""

    phase: str  # "factors" (global allocation's measuring pass) or "quantize"
    next_layer: int
    hidden: list[torch.Tensor]
    extra: dict[str, Any]


class Stage:
    """A staging folder (the user's ``resume_dir``, or a temporary folder removed at the end)."""

    def __init__(self, path: str | os.PathLike | None, digest: str) -> None:
        self.temporary = path is None
        if path is None:
            path = tempfile.mkdtemp(prefix="optimum-mc-stage-")
        self.path = Path(path)
        self.digest = digest
        if self.path.is_file():
            raise MCConfigError(f"resume_dir {str(self.path)!r} is a file; pass a folder.")
        check_writable_folder(str(self.path), "resume_dir")

    # -- resume -------------------------------------------------------------------------------------------------
    def resume(self) -> Progress | None:
        """The progress recorded by an earlier run of the same fingerprint, or ``None`` for a fresh folder."""
        p = self.path / _PROGRESS
        if not p.exists():
            stray = [f.name for f in self.path.iterdir() if not f.name.startswith(".") and not _ours(f.name)]
            if stray:
                raise MCConfigError(
                    f"resume_dir {str(self.path)!r} is not empty and holds no optimum-mc progress ({stray[:3]}); "
                    f"pass an empty or new folder."
                )
            return None
        try:
            state = json.loads(p.read_text())
        except ValueError as exc:
            raise MCConfigError(f"{p} is corrupt ({exc}); delete the folder to start over.") from exc
        if state.get("format") != FORMAT or state.get("fingerprint") != self.digest:
            raise MCConfigError(
                f"resume_dir {str(self.path)!r} holds a run of another model, checkpoint or MCConfig (fingerprint "
                f"mismatch); pass a new folder, or the same model and options as the interrupted run."
            )
        hidden = _load_batches(self.path / _INPUTS, ["cpu"] * int(state["num_batches"]))
        return Progress(state["phase"], int(state["next_layer"]), hidden, state.get("extra", {}))

    # -- writing ------------------------------------------------------------------------------------------------
    def layer_path(self, phase: str, index: int) -> Path:
        return self.path / f"{phase}-layer-{index:05d}.safetensors"

    def save_layer(self, phase: str, index: int, tensors: dict[str, torch.Tensor], record: dict) -> None:
        _atomic_save_tensors(self.layer_path(phase, index), tensors, {"record": json.dumps(record, sort_keys=True)})

    def load_layer(self, phase: str, index: int, device: torch.device | str = "cpu") -> tuple[dict, dict]:
        from .layer_source import open_unmapped

        path = self.layer_path(phase, index)
        with open_unmapped(str(path)) as f:
            record = json.loads(f.metadata()["record"])
            tensors = {k: f.get_tensor(k).to(device) for k in f.keys()}
        return tensors, record

    def commit(self, phase: str, next_layer: int, hidden: list[torch.Tensor], extra: dict | None = None) -> None:
        """Record that every layer before ``next_layer`` of ``phase`` is done and ``hidden`` feeds the next one."""
        _save_batches(self.path / _INPUTS, hidden)
        state = {
            "format": FORMAT,
            "fingerprint": self.digest,
            "phase": phase,
            "next_layer": next_layer,
            "num_batches": len(hidden),
            "extra": extra or {},
        }
        _atomic_write_bytes(self.path / _PROGRESS, json.dumps(state, indent=1, sort_keys=True).encode())

    def hold_inputs(self, hidden: list[torch.Tensor]) -> None:
        """Keep the current layer's input batches on disk while its weights are quantized (they are needed again
        only to run the quantized layer); :meth:`take_inputs` brings them back."""
        _save_batches(self.path / _HELD, hidden)

    def take_inputs(self, devices: list[torch.device]) -> list[torch.Tensor]:
        """The batches :meth:`hold_inputs` stored, on their devices; the file is removed."""
        path = self.path / _HELD
        hidden = _load_batches(path, devices)
        path.unlink()
        return hidden

    def drop_inputs(self) -> None:
        """Forget the batches :meth:`hold_inputs` stored (the last layer's: nothing needs them again)."""
        (self.path / _HELD).unlink(missing_ok=True)

    def cleanup(self) -> None:
        """Remove a temporary folder (a user's ``resume_dir`` is kept)."""
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)
