"""optimum-mc: MC (Mixture Compressor) for Mixture-of-Experts LLMs, as a transformers quantizer.

``import optimum_mc`` registers quantization method "mc" with transformers.
"""

from .config import MCConfig
from .errors import MCError
from .nn.experts import set_decode_activations
from .pruning import calibrate_odp, get_odp_stats, reset_odp_stats, set_odp
from .registration import register as _register
from .version import __version__

_register()

__all__ = [
    "MCConfig",
    "MCError",
    "calibrate_odp",
    "get_odp_stats",
    "reset_odp_stats",
    "set_decode_activations",
    "set_odp",
    "__version__",
]
