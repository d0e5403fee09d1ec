"""ODP: online dynamic pruning of routed experts (rule, token protection, statistics)."""

from .odp import calibrate_odp, check_odp_supported, get_odp_stats, reset_odp_stats, set_odp, set_odp_from_config

__all__ = [
    "calibrate_odp",
    "check_odp_supported",
    "get_odp_stats",
    "reset_odp_stats",
    "set_odp",
    "set_odp_from_config",
]
