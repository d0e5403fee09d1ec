"""Package version and the version of the checkpoint format it writes (``quantization_config`` and packed tensors)."""

__version__ = "0.2.0"

# Bumped when a checkpoint written by this version cannot be read correctly by an older optimum-mc (new tensors,
# a new meaning of a stored option). Version 1: the first versioned format (config.json and safetensors metadata
# carry it); checkpoints without a version are read as version 1. Version 2: an expert's width in ``expert_bits``
# may be ``[gate_up, down]`` (per-projection allocation, optimum_mc.bitwidths). FORMAT_VERSION is the newest format
# this version reads; a checkpoint is written with the oldest format that describes it (:func:`format_for`), so
# checkpoints without per-projection widths stay readable by optimum-mc versions that read format 1.
# Version 3: compact metadata (``metadata="q8"``): packed matrices store ``scale_codes`` / ``scale_exps`` /
# ``zero_codes`` instead of fp16 ``scales`` / ``zeros`` (optimum_mc.group_quant).
FORMAT_VERSION = 3


def format_for(expert_bits, metadata: str = "fp16") -> int:
    """The checkpoint format a model needs: 3 with compact (``"q8"``) metadata, 2 with per-projection widths,
    else 1."""
    if metadata == "q8":
        return 3
    rows = expert_bits or []
    return 2 if any(isinstance(b, (list, tuple)) for row in rows for b in row) else 1
