"""What a run stages per finished layer and how a resumed run takes it back (the staging folder itself:
calibration/stage.py). A resumed run must see exactly what the interrupted one computed, so factors are staged
losslessly, and its bytes equal an uninterrupted run's."""

from __future__ import annotations

import copy
import hashlib
import os

import torch
from torch import nn

from .allocation import ExpertFactors
from .calibration.layer_source import init_computed_buffers
from .calibration.linear_gptq import LinearGPTQ
from .calibration.stage import Stage, fingerprint
from .config import _RESULT_FIELDS, MCConfig
from .pmq import PMQ, LayerFactors
from .skeleton import install_packed_skeleton

# options that do not change a run's bytes (a resume with another value of them is the same run)
_NOT_IN_FINGERPRINT = (
    "show_progress",
    "resume_dir",
    "offload_folder",
    "odp",
    "odp_threshold",
    "odp_protect_ratio",
    "odp_layers",
    *_RESULT_FIELDS,
)


def run_fingerprint(model: nn.Module, config: MCConfig, source, input_ids: torch.Tensor, device) -> str:
    """Digest of what decides a run's bytes: model config, checkpoint files, options, calibration tokens, device."""
    options = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_FINGERPRINT}
    files = [(os.path.basename(f), os.path.getsize(f)) for f in getattr(source, "files", [])]
    tokens = hashlib.sha256(input_ids.cpu().numpy().tobytes()).hexdigest()
    return fingerprint(
        {
            "model": model.config.to_diff_dict() if hasattr(model.config, "to_diff_dict") else str(model.config),
            "files": files,
            "options": options,
            "tokens": tokens,
            "device": device.type,
            "dtype": str(next(iter(source.structure(0).parameters())).dtype),
        }
    )


def factors_exact(lf: LayerFactors) -> dict:
    """Lossless form for staging (a resumed global allocation must see exactly the same factors)."""
    f = lf.factors
    return {
        "frequency": f.frequency.tolist(),
        "weight_mass": f.weight_mass.tolist(),
        "loss": f.loss.tolist(),
        "projection_loss": f.projection_loss.tolist() if f.projection_loss is not None else None,
        "method": list(lf.methods),
    }


def factors_from_dict(d: dict) -> LayerFactors:
    proj = d.get("projection_loss")
    f = ExpertFactors(
        frequency=torch.tensor(d["frequency"], dtype=torch.float32),
        weight_mass=torch.tensor(d["weight_mass"], dtype=torch.float32),
        loss=torch.tensor(d["loss"], dtype=torch.float32),
        projection_loss=torch.tensor(proj, dtype=torch.float32) if proj is not None else None,
    )
    return LayerFactors(f, list(d.get("method", [])))


class Resume:
    """A run's staging: each finished layer's tensors and record (bits, linear widths, factors, tuned exponents)
    go to the :class:`Stage` folder; a resumed run adopts the records and rebuilds the packed layers."""

    def __init__(self, stage: Stage | None, pmq: PMQ, linears: LinearGPTQ) -> None:
        self.stage, self.pmq, self.linears = stage, pmq, linears

    def record(self, idx: int) -> dict:
        """What staging must remember of a finished layer to rebuild it and the run's results."""
        lf = self.pmq.factors.get(idx)
        return {
            "bits": self.pmq.bits.get(idx),
            "linear_bits": self.linears.record(idx),
            "factors": factors_exact(lf) if lf is not None else None,
            "tuned": self.pmq.tuned.get(idx),
        }

    def adopt(self, idx: int, record: dict) -> None:
        """Take a staged layer's results as this run's."""
        if record.get("factors") is not None:
            self.pmq.factors[idx] = factors_from_dict(record["factors"])
        if record.get("bits") is not None:
            self.pmq.bits[idx] = list(record["bits"])
        if record.get("tuned") is not None:
            self.pmq.tuned[idx] = list(record["tuned"])
        self.linears.adopt(idx, record.get("linear_bits", {}))

    def save(self, phase: str, idx: int, layer: nn.Module | None, next_hidden: list[torch.Tensor]) -> None:
        """Stage a finished layer (its tensors in the "quantize" phase; the measuring pass of ``allocation="global"``
        stores MoE layers' records alone), then commit the inputs of the next one."""
        if self.stage is None:
            return
        if phase == "quantize":
            self.stage.save_layer(phase, idx, layer.state_dict(), self.record(idx))
        elif idx in self.pmq.moe_layers:
            self.stage.save_layer(phase, idx, {}, self.record(idx))
        self.stage.commit(phase, idx + 1, next_hidden)

    def adopt_factors(self, layers) -> None:
        """The measuring pass's records of ``layers`` (a resumed global allocation)."""
        for idx in layers:
            if idx in self.pmq.moe_layers:
                _, record = self.stage.load_layer("factors", idx)
                self.adopt(idx, record)

    def rebuild(self, idx: int, model: nn.Module, source) -> None:
        """Put staged layer ``idx`` (packed) back into the model, on the CPU."""
        config, arch = self.pmq.config, self.pmq.arch
        tensors, record = self.stage.load_layer("quantize", idx)
        layer = copy.deepcopy(source.structure(idx)) if source.streams_from_disk else source.structure(idx)
        install_packed_skeleton(
            layer,
            idx,
            arch,
            record.get("bits"),
            record.get("linear_bits", {}),
            config.group_size,
            config.nonexpert_method,
            metadata=config.metadata,
        )
        layer.load_state_dict(tensors, strict=True, assign=True)  # q8 linears expand their metadata as they load
        init_computed_buffers(model, layer, "cpu")  # not in a state dict: computed, as transformers does
        source.finish(idx, layer)
        self.adopt(idx, record)
