"""Validation of every MCConfig option (called by ``MCConfig.post_init``, before any weight is loaded): each
problem is a :class:`~optimum_mc.errors.MCConfigError` that names the option, the value and the fix."""

from __future__ import annotations

import importlib.util
import math

from .bitwidths import is_int as _is_int
from .config import (
    ALLOCATION_GRANULARITIES,
    ALLOCATION_MODES,
    ALLOCATION_SOLVERS,
    BITS_BUDGETS,
    DECODE_ACTIVATIONS,
    EXPERT_BITS,
    EXPERT_HESSIANS,
    LOSS_METHODS,
    LOSS_NORMALIZERS,
    METADATA_FORMS,
    NONEXPERT_METHODS,
    ZERO_POINTS,
    MCConfig,
    _check_bool,
    _err,
    _is_text_record,
    _short,
)
from .group_quant import GROUP_FITS
from .packing import SUPPORTED_BITS


def validate(cfg: MCConfig) -> None:
    """Validate every option; raise :class:`MCConfigError` naming the problem and the fix."""
    cb = cfg.candidate_bits
    if cb is not None:  # None: resolved per model (budget.check_budget); the widest default bounds ``bits`` here
        if not cb or any(isinstance(b, bool) or not isinstance(b, int) or b not in EXPERT_BITS for b in cb):
            raise _err(f"candidate_bits must be a non-empty list drawn from {EXPERT_BITS}, got {cb!r}.")
        if len(set(cb)) != len(cb):
            raise _err(f"candidate_bits has duplicates: {cb!r}.")
        cfg.candidate_bits = sorted(cb)
    cb = cfg.candidate_bits or [1, 2, 3]
    if isinstance(cfg.bits, bool) or not isinstance(cfg.bits, (int, float)) or not math.isfinite(cfg.bits):
        raise _err(f"bits must be a number, got {cfg.bits!r}.")
    if cfg.bits_budget not in BITS_BUDGETS:
        raise _err(f"bits_budget must be one of {BITS_BUDGETS}, got {cfg.bits_budget!r}.")
    lo, hi = min(cb), max(cb)
    if cfg.metadata not in METADATA_FORMS:
        raise _err(f"metadata must be one of {METADATA_FORMS}, got {cfg.metadata!r}.")
    if cfg.bits_budget == "stored" and _is_int(cfg.group_size) and cfg.group_size > 0:
        from .bitwidths import group_metadata_bits

        lo = lo + group_metadata_bits(lo, cfg.metadata) / cfg.group_size  # per group, whatever the matrix
        hi = hi + group_metadata_bits(hi, cfg.metadata) / cfg.group_size
    elif cfg.bits_budget == "stored":  # group_size=-1: 32 bits per row, resolved per model (at most 1 bit)
        lo, hi = lo, hi + 1
    if not lo <= cfg.bits <= hi:
        what = " stored bits (codes + scales + zeros)" if cfg.bits_budget == "stored" else ""
        raise _err(
            f"bits={cfg.bits} is infeasible with candidate_bits={cb}: the average{what} must lie in "
            f"[{lo:g}, {hi:g}]; change bits or candidate_bits."
        )
    if cfg.attn_bits is not None and (
        not _is_int(cfg.attn_bits) or cfg.attn_bits not in SUPPORTED_BITS or cfg.attn_bits == 1
    ):
        raise _err(f"attn_bits must be one of (2, 3, 4, 8) or None (keep float), got {cfg.attn_bits!r}.")
    if (
        not isinstance(cfg.group_size, int)
        or isinstance(cfg.group_size, bool)
        or not (cfg.group_size == -1 or (cfg.group_size > 0 and cfg.group_size % 32 == 0))
    ):
        raise _err(f"group_size must be a positive multiple of 32 or -1 (one group per row), got {cfg.group_size!r}.")
    if cfg.allocation not in ALLOCATION_MODES:
        raise _err(f"allocation must be one of {ALLOCATION_MODES}, got {cfg.allocation!r}.")
    for name in ("alpha", "beta", "gamma"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise _err(f"{name} must be a finite number >= 0, got {v!r}.")
    _check_pmq(cfg)
    _check_metadata(cfg)
    _check_group_fit(cfg)
    if cfg.nonexpert_method not in NONEXPERT_METHODS:
        raise _err(f"nonexpert_method must be one of {NONEXPERT_METHODS}, got {cfg.nonexpert_method!r}.")
    if cfg.nonexpert_method == "bnb_nf4" and importlib.util.find_spec("bitsandbytes") is None:
        raise _err(
            "nonexpert_method='bnb_nf4' needs bitsandbytes, an optional dependency: pip install 'optimum-mc[nf4]' "
            "(or bitsandbytes>=0.45)."
        )
    if not (isinstance(cfg.damp_percent, (int, float)) and 0 < cfg.damp_percent < 1):
        raise _err(f"damp_percent must be in (0, 1), got {cfg.damp_percent!r}.")
    for name in ("block_size", "num_samples", "seq_len"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise _err(f"{name} must be a positive integer, got {v!r}.")
    if cfg.seq_len < 8:
        raise _err(f"seq_len={cfg.seq_len} is too short for calibration; use at least 8 tokens (512 typical).")
    if (
        isinstance(cfg.min_expert_tokens, bool)
        or not isinstance(cfg.min_expert_tokens, int)
        or (cfg.min_expert_tokens < 0)
    ):
        raise _err(f"min_expert_tokens must be an integer >= 0, got {cfg.min_expert_tokens!r}.")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool):
        raise _err(f"seed must be an integer, got {cfg.seed!r}.")
    _check_dataset(cfg)
    _check_types(cfg)
    _check_scale(cfg)
    _check_odp(cfg)


def _check_dataset(cfg: MCConfig) -> None:
    ds = cfg.dataset
    if isinstance(ds, list) and (not ds or not all(isinstance(t, str) for t in ds)):
        raise _err("dataset given as a list must be a non-empty list of strings (calibration texts).")
    if isinstance(ds, dict) and not _is_text_record(ds):
        raise _err(
            f"dataset given as a dict must be the record of calibration texts that to_dict() writes "
            f"({{'texts': n, 'characters': c, 'sha256': ...}}), got {ds!r}."
        )
    if ds is not None and not isinstance(ds, (str, list, dict)):
        raise _err(f"dataset must be None, 'builtin', a path, a datasets name or a list of texts, got {ds!r}.")
    if isinstance(ds, str) and not ds.strip():
        raise _err("dataset='' names nothing; use None (builtin text), a path, a datasets name or a text list.")
    given = [n for n in ("dataset_config", "dataset_split", "text_column") if getattr(cfg, n) is not None]
    for name in given:
        v = getattr(cfg, name)
        if not isinstance(v, str) or not v.strip():
            raise _err(f"{name} must be a non-empty string or None, got {v!r}.")
    if given and (not isinstance(ds, str) or ds == "builtin"):
        raise _err(
            f"{', '.join(given)} only apply to a `datasets` source (dataset='name'), not to dataset={_short(ds)}."
        )
    if cfg.dataset_config is not None and ":" in ds:
        raise _err(f"dataset={ds!r} already names a config after ':'; drop it or drop dataset_config.")


def _check_types(cfg: MCConfig) -> None:
    """Booleans are bools, module lists are lists of names, the tokenizer is a tokenizer or a path."""
    for name in ("allocation_constraints", "act_order", "clip_search", "show_progress", "odp"):
        _check_bool(name, getattr(cfg, name))
    mtc = cfg.modules_to_not_convert
    if mtc is not None and (not isinstance(mtc, list) or not all(isinstance(m, str) and m for m in mtc)):
        raise _err(f"modules_to_not_convert must be a list of module names, e.g. ['q_proj'], got {mtc!r}.")
    tok = cfg.tokenizer
    if tok is not None and not isinstance(tok, str) and not callable(getattr(tok, "encode", None)):
        raise _err(f"tokenizer must be None, a path / Hub id, or a tokenizer object, got {tok!r}.")
    if isinstance(tok, str) and not tok.strip():
        raise _err("tokenizer='' names nothing; use None (the model's own tokenizer) or a path / Hub id.")


def _check_scale(cfg: MCConfig) -> None:
    import torch

    if cfg.device is not None:
        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError) as exc:
            raise _err(f"device={cfg.device!r} is not a torch device; pass e.g. 'cpu', 'cuda' or 'cuda:1'.") from exc
    for name in ("resume_dir", "offload_folder"):
        v = getattr(cfg, name)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise _err(f"{name} must be a folder path, got {v!r}.")


def _check_pmq(cfg: MCConfig) -> None:
    for name, allowed in (
        ("loss_method", LOSS_METHODS),
        ("loss_normalizer", LOSS_NORMALIZERS),
        ("allocation_solver", ALLOCATION_SOLVERS),
        ("allocation_granularity", ALLOCATION_GRANULARITIES),
        ("zero_point", ZERO_POINTS),
        ("expert_hessian", EXPERT_HESSIANS),
        ("group_fit", GROUP_FITS),
    ):
        if getattr(cfg, name) not in allowed:
            raise _err(f"{name} must be one of {allowed}, got {getattr(cfg, name)!r}.")
    f = cfg.heldout_fraction
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
        raise _err(f"heldout_fraction must lie in (0, 1), got {f!r}.")
    if not isinstance(cfg.tune_exponents, bool):
        raise _err(f"tune_exponents must be True or False, got {cfg.tune_exponents!r}.")
    if cfg.tune_exponents and cfg.allocation != "layer":
        raise _err(f"tune_exponents=True needs allocation='layer', got allocation={cfg.allocation!r}.")
    if cfg.allocation_granularity == "projection":
        if cfg.allocation not in ("layer", "global"):
            raise _err(
                f"allocation_granularity='projection' needs allocation 'layer' or 'global' (MC's objective), got "
                f"allocation={cfg.allocation!r}."
            )
        if cfg.loss_method != "rtn" or cfg.tune_exponents:
            raise _err(
                "allocation_granularity='projection' measures each projection's loss by round-to-nearest: it "
                f"needs loss_method='rtn' and tune_exponents=False (got {cfg.loss_method!r}, "
                f"{cfg.tune_exponents!r})."
            )
    t = cfg.allocation_time_limit
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise _err(f"allocation_time_limit must be a positive number of seconds, got {t!r}.")


def _check_group_fit(cfg: MCConfig) -> None:
    """``group_fit="lsq"`` fits the fp16 grid by least squares: not combined with the clip search (another way of
    choosing the same grid) nor the q8 grid (whose scales are rounded on shared exponents)."""
    if cfg.group_fit != "lsq":
        return
    if cfg.clip_search:
        raise _err("group_fit='lsq' and clip_search=True both choose the groups' grids; use one of them.")
    if cfg.metadata != "fp16":
        raise _err(f"group_fit='lsq' fits fp16 scales and zeros; metadata={cfg.metadata!r} cannot take them. Use "
                   "metadata='fp16' with it.")  # fmt: skip


def _check_metadata(cfg: MCConfig) -> None:
    """``metadata="q8"`` stores integer zeros and per-group scales: the combinations the format describes."""
    if cfg.metadata != "q8":
        return
    works = (
        "metadata='fp16' (any zero_point, any group_size), or metadata='q8' with zero_point='int' and a "
        "group_size that is a multiple of 32"
    )
    if cfg.zero_point != "int":
        raise _err(
            f"metadata='q8' stores integer zero points; zero_point={cfg.zero_point!r} cannot be stored that way. "
            f"Combinations that work: {works}."
        )
    if cfg.group_size == -1:
        raise _err(
            f"metadata='q8' shares scale exponents between rows of a group column; group_size=-1 (one fp16 "
            f"pair per row, already <= 32 / in_features bits per weight) is not served. Combinations that work: "
            f"{works}."
        )


def _check_odp(cfg: MCConfig) -> None:
    thr = cfg.odp_threshold
    vals = thr if isinstance(thr, list) else ([] if thr is None else [thr])
    for t in vals:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise _err(f"odp_threshold values must lie in (0, 1], got {t!r}.")
    r = cfg.odp_protect_ratio
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
        raise _err(f"odp_protect_ratio must lie in [0, 1], got {r!r}.")
    layers = cfg.odp_layers
    if isinstance(layers, list):
        if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise _err(f"odp_layers must be layer indices >= 0, got {layers!r}.")
    elif layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
        raise _err(f"odp_layers must be None, a count >= 0 or a list of layer indices, got {layers!r}.")
    if cfg.decode_activations not in DECODE_ACTIVATIONS:
        raise _err(f"decode_activations must be one of {DECODE_ACTIVATIONS}, got {cfg.decode_activations!r}.")
