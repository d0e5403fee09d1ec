"""Package version and the version of the checkpoint format it writes (``quantization_config`` and packed tensors)."""

__version__ = "0.1.0"

# Bumped when a checkpoint written by this version cannot be read correctly by an older optimum-mc (new tensors,
# a new meaning of a stored option). Version 1: the first versioned format (config.json and safetensors metadata
# carry it); checkpoints without a version are read as version 1.
FORMAT_VERSION = 1
