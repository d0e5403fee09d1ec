"""Package version and the version of the checkpoint format it writes (``quantization_config`` and packed tensors)."""

__version__ = "0.2.0"

# Bumped when a checkpoint written by this version cannot be read correctly by an older optimum-mc (new tensors,
# a new meaning of a stored option). Version 1: the first versioned format (config.json and safetensors metadata
# carry it); checkpoints without a version are read as version 1. Version 2: an expert's width in ``expert_bits``
# may be ``[gate_up, down]`` (per-projection allocation, optimum_mc.bitwidths). FORMAT_VERSION is the newest format
# this version reads; a checkpoint is written with the oldest format that describes it (:func:`format_for`), so
# checkpoints without per-projection widths stay readable by optimum-mc versions that read format 1.
FORMAT_VERSION = 2


def format_for(expert_bits) -> int:
    """The checkpoint format a model with these ``expert_bits`` needs: 2 with per-projection widths, else 1."""
    rows = expert_bits or []
    return 2 if any(isinstance(b, (list, tuple)) for row in rows for b in row) else 1
