"""Typed exceptions for optimum-mc.

Every user-facing error derives from :class:`MCError` so callers can catch all of them at once; each subclass also
derives from the builtin exception a Python user would expect (``ValueError``, ``TypeError``, ...).
"""

from __future__ import annotations


class MCError(Exception):
    """Base class of all optimum-mc errors."""


class MCConfigError(MCError, ValueError):
    """An MCConfig option (or a combination of options) is invalid or infeasible."""


class AlreadyQuantizedError(MCConfigError):
    """Quantization options were passed for a model that is already quantized (they would be ignored)."""


class CheckpointVersionError(MCConfigError):
    """A checkpoint (its quantization_config) was written by a newer optimum-mc than the installed one."""


class UnsupportedBitsError(MCError, ValueError):
    """A bit-width outside the supported set was requested."""


class ShapeError(MCError, ValueError):
    """A tensor has a shape that does not fit the packed format (e.g. in_features not divisible by group size)."""


class DTypeError(MCError, TypeError):
    """A tensor has a dtype the operation does not accept."""


class DeviceMismatchError(MCError, ValueError):
    """Tensors that must live on one device do not."""


class RoutingError(MCError, ValueError):
    """Routing indices / weights passed to the fused MoE op are out of range or of the wrong shape."""


class CheckpointError(MCError, ValueError):
    """A quantized checkpoint's tensors disagree with its quantization config."""


class UnsupportedArchitectureError(MCError, ValueError):
    """The model is not a supported Mixture-of-Experts architecture."""


class CalibrationError(MCError, ValueError):
    """Calibration data is missing, empty, too short, or produced unusable statistics."""


class NonFiniteWeightError(MCError, ValueError):
    """A weight to be quantized contains NaN or Inf values."""


class PluginNotImportedError(MCError, RuntimeError):
    """An "mc" checkpoint is being loaded while optimum_mc is not registered with transformers."""


class OutputPathError(MCError, ValueError):
    """A save target is unusable: a file, the source model's own folder, or not writable."""


class SaveError(MCError, OSError):
    """A save did not complete or its result did not verify; the previous content of the target is intact."""


class GraphCaptureError(MCError, RuntimeError):
    """Work that must run once eagerly (building the GPU layout of packed experts) was first asked for inside
    CUDA-graph capture."""
