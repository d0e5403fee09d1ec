"""MCConfig: every option of MC quantization and online dynamic pruning, validated before any weight is loaded."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import math
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .bitwidths import is_int as _is_int
from .errors import AlreadyQuantizedError, CheckpointVersionError, MCConfigError
from .packing import SUPPORTED_BITS
from .version import FORMAT_VERSION, __version__, format_for

ALLOCATION_MODES = ("layer", "global", "random", "frequency", "hessian")
LOSS_METHODS = ("rtn", "heldout", "insample")
ALLOCATION_SOLVERS = ("cp-sat", "dp")
ALLOCATION_GRANULARITIES = ("expert", "projection")
ZERO_POINTS = ("float", "int")
EXPERT_HESSIANS = ("routed", "router-weighted")
LOSS_NORMALIZERS = ("block", "residual")
NONEXPERT_METHODS = ("gptq", "bnb_nf4")
EXPERT_BITS = (1, 2, 3, 4)
# candidate_bits=None (budget.check_budget): [1, 2, 3] from this many code bits per expert weight up, below it
# [2, 3] where every MoE layer's budget can be met with them. Measured on both reference models
# (docs/low-bit-study.md): a 1-bit candidate is worse at 2.0-2.25 code bits and no better at 2.5.
KEEP_1_BIT_FROM = 2.5
# What ``bits`` counts: "codes" (the packed integer codes only, MC's and the paper's meaning) or "stored" (codes plus
# the fp16 scales and zeros of every group: the bytes on disk per expert weight, as llama.cpp's bits per weight).
BITS_BUDGETS = ("codes", "stored")
# How each group's scale and zero are stored (group_quant.py): "fp16" (an fp16 scale and zero, 32 bits per group) or
# "q8" (integer zeros at the code width, 8-bit scale codes on a power-of-two exponent per 16 rows: 8.5 + b bits).
METADATA_FORMS = ("fp16", "q8")

# Options grouped out of the top level, each group one keyword of MCConfig taking a dict of these names (the names
# config.json records): GPTQ's own knobs; the allocation program's objective and solver; and the research options
# docs/results.md measured and found not better than the defaults. config.json keeps every option flat (the record of
# what was done), and the constructor also takes the flat names: that is how checkpoints load.
GPTQ_OPTIONS = {"damp_percent": 0.01, "act_order": True, "block_size": 128, "min_expert_tokens": 16}
ALLOCATION_OPTIONS = {
    "alpha": 1.0,
    "beta": 1.5,
    "gamma": 1.0,
    "allocation_solver": "cp-sat",
    "allocation_time_limit": 60.0,
    "allocation_constraints": True,
}
EXPERIMENTAL_OPTIONS = {
    "loss_method": "rtn",
    "loss_normalizer": "block",
    "heldout_fraction": 0.25,
    "tune_exponents": False,
    "allocation_granularity": "expert",
    "nonexpert_method": "gptq",
    "clip_search": False,
    "expert_hessian": "routed",
    "metadata": "fp16",
}
_GROUPS = {"gptq": GPTQ_OPTIONS, "allocation_options": ALLOCATION_OPTIONS, "experimental": EXPERIMENTAL_OPTIONS}
# a datasets source's own options: keys of a ``dataset`` dict, flat options in config.json
DATASET_KEYS = {"config": "dataset_config", "split": "dataset_split", "text_column": "text_column"}

# Results of quantization written into config.json; users do not set them.
_RESULT_FIELDS = (
    "moe_layers",
    "expert_bits",
    "expert_factors",
    "linear_bits",
    "odp_thresholds",
    "odp_layer_scores",
    "tuned_exponents",
    "base_model",  # Hub id of the float model quantized (None when it was a local folder)
)

# Options that apply when an MC checkpoint is loaded (the rest were fixed when it was quantized).
LOADING_ATTRIBUTES = ("odp", "odp_threshold", "odp_protect_ratio", "odp_layers", "decode_activations")

# Options that change nothing about the result (neither what is quantized nor how it loads).
_COSMETIC = ("show_progress",)

# What the CPU decode kernels of MCExperts and QuantLinear feed their GEMVs (nn/experts.py: set_decode_activations).
DECODE_ACTIVATIONS = ("auto", "float", "int8")


# Options added after the first versioned release, left out of to_dict() (config.json) while at these defaults: a
# checkpoint that does not use them stays loadable by optimum-mc versions that do not know them.
_OMITTED_AT_DEFAULT = {
    "allocation_granularity": "expert",
    "clip_search": False,
    "decode_activations": "auto",
    "bits_budget": "codes",
    "metadata": "fp16",
}

# Written into every to_dict() (config.json): which format and which optimum-mc wrote it.
_VERSION_FIELDS = ("format_version", "optimum_mc_version")


def _err(msg: str) -> MCConfigError:
    return MCConfigError(msg)


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        raise _err(f"{name} must be True or False, got {v!r} ({type(v).__name__}); strings like 'no' are not read.")


class MCConfig(QuantizationConfigMixin):
    """Configuration of MC (Mixture Compressor) quantization, registered with transformers as method ``"mc"``.

    Quantization (PMQ):
        bits: target average bit-width of the routed experts (e.g. 2.5), counted as ``bits_budget`` says.
        bits_budget: what ``bits`` counts per expert weight: ``"codes"`` (default; the packed integer codes only,
            MC's meaning) or ``"stored"`` (codes plus the fp16 scale and zero of every group, i.e. the checkpoint's
            bytes per expert weight, comparable with llama.cpp's bits per weight): ``32 / group_size`` bits more
            (0.25 at group_size 128), so ``bits=2.25, bits_budget="stored"`` allocates like ``bits=2.0``. With
            ``group_size=-1`` the overhead depends on the expert's shape and is resolved per model. With
            ``metadata="q8"`` the metadata costs ``(8.5 + b) / group_size`` bits per b-bit weight (0.082 at 2 bits
            and group_size 128), so a stored budget buys ``(bits - 8.5 / g) / (1 + 1 / g)`` code bits.
        candidate_bits: bit-widths an expert may get (from {1, 2, 3, 4}); ``[2]`` means uniform 2-bit. ``None``
            (default): ``[1, 2, 3]`` (the paper's) at 2.5 code bits per expert weight and above; below, ``[2, 3]``
            where every MoE layer's budget can be met with them (with ``allocation_constraints``), else
            ``[1, 2, 3]``. Resolved when quantization starts and recorded in config.json (a 1-bit candidate
            measured worse at 2.0-2.25 code bits and no better at 2.5: docs/low-bit-study.md).
        attn_bits: bits for attention, shared experts and dense MLPs (2/3/4/8); ``None`` keeps them in float.
        group_size: quantization group size along the input dimension (-1: one group per row).
        zero_point: ``"float"`` (fp16 ``-min / scale``) or ``"int"`` (GPTQ grid through 0, integer zero codes;
            1-bit keeps its binary form); both are stored in the same fp16 zero tensor.
        allocation: ``"layer"`` (the paper: the same budget in every MoE layer), ``"global"`` (one budget over
            all layers), or the baselines ``"random"`` / ``"frequency"`` / ``"hessian"`` (Hessian-trace
            importance) at the same per-layer budget.
        modules_to_not_convert: module names (or name suffixes) kept in float.
    Grouped options (each a dict of these names; config.json records them flat, and the flat names are accepted):
        gptq: ``damp_percent`` (0.01: Hessian damping as a fraction of its mean diagonal), ``act_order`` (True:
            columns by decreasing Hessian diagonal, groups keep their original columns), ``block_size`` (128:
            columns per lazy-batch update), ``min_expert_tokens`` (16: experts routed fewer calibration tokens use
            calibration-free quantization).
        allocation_options: ``alpha``, ``beta``, ``gamma`` (1, 1.5, 1: exponents of the objective
            phi^alpha * w^beta * eps^gamma, activation frequency, routing-weight mass, quantization loss as an
            un-squared norm: the paper's phi * w^1.5 * eps); ``allocation_solver`` (``"cp-sat"``: OR-Tools,
            hinted with the exact DP optimum, the solver of record; or ``"dp"``, the exact dynamic program alone);
            ``allocation_time_limit`` (60: CP-SAT seconds per program); ``allocation_constraints`` (True: at least
            one expert at the top and one at the middle candidate width per layer, the paper's constraints).
        experimental: research options measured and not better than the defaults (docs/results.md, "Options
            measured and not better"): ``loss_method`` (``"rtn"``; ``"heldout"``: GPTQ on a split of the routed
            tokens, eps on the rest; ``"insample"``), ``heldout_fraction`` (0.25), ``loss_normalizer``
            (``"block"``; ``"residual"``: relative to the decoder layer's output), ``tune_exponents`` (False: per
            layer, pick the exponents from a grid by held-out block error; layer allocation only),
            ``allocation_granularity`` (``"expert"``; ``"projection"``: gate/up and down get their own widths,
            layer/global allocation and ``loss_method="rtn"`` only), ``nonexpert_method`` (``"gptq"``;
            ``"bnb_nf4"``: bitsandbytes NF4 for attention / dense layers, needs ``pip install
            optimum-mc[nf4]``), ``clip_search`` (False: shrink GPTQ group ranges by a Hessian-weighted search),
            ``expert_hessian`` (``"routed"``; ``"router-weighted"``: every token weighted by router probability),
            ``metadata`` (``"fp16"``: an fp16 scale and zero per group, 32 bits; ``"q8"``: integer zeros at the
            code width and 8-bit scale codes times a power of two shared by 16 rows of the group column,
            ``8.5 + b`` bits per group, codes chosen on the stored grid; needs ``zero_point="int"`` and
            ``group_size`` other than -1; only the checkpoint shrinks, loading expands it to the fp16 grid the
            kernels read; measured no better at the same stored bits: docs/low-bit-study.md).
    Calibration:
        dataset: ``None``/``"builtin"`` (offline text shipped with the package), a list of strings, a path to a
            text file or folder of .txt files, a ``datasets`` name (``"name"`` or ``"name:config"``), or one of the
            GPTQ tooling's names ``"wikitext2"`` / ``"c4"``; for a ``datasets`` source also a dict
            ``{"name": ..., "config": ..., "split": ..., "text_column": ...}`` (configuration name, default none;
            split, default ``"train"``; text column, default ``"text"``; the named sources bring their own, a given
            value overrides them). Texts passed as a list are stored in config.json as a description with their
            sha256 (``{"texts": n, "characters": c, "sha256": ...}``), not verbatim.
        tokenizer: tokenizer object or path (default: the model's own).
        num_samples, seq_len: number and length (tokens) of calibration sequences.
        seed: seed of everything random (sampling, random allocation).
        show_progress: tqdm progress bars.
    Scale:
        device: where calibration forwards and GPTQ run (``None``: ``"cuda"`` when available, else ``"cpu"``),
            independent of where the model is placed. At load time the float decoder layers are streamed from the
            checkpoint one at a time onto this device; only packed layers are kept.
        resume_dir: folder where each finished layer is staged; a run interrupted (Ctrl-C, killed) restarts from
            the last finished layer when given the same folder, model and options, and writes the same bytes.
        offload_folder: where modules the final device map sends to ``"disk"`` are offloaded (default: a
            temporary folder).
    Online dynamic pruning (ODP):
        odp: enable ODP at inference.
        odp_threshold: ``None`` (per-layer median ratio from calibration), a float in (0, 1], or one per MoE layer.
        odp_protect_ratio: fraction of tokens per sequence that keep all experts (in [0, 1]).
        odp_layers: ``None`` (default share of the MoE layers, ranked on calibration), an int (how many), or a
            list of layer indices.
    Inference:
        decode_activations: ``"int8"``: the CPU decode kernels round each group of the packed GEMVs' inputs
            (experts, 4-bit linears) to int8 with its own scale (as llama.cpp does) and take exact integer dots,
            1.5-2x faster per GEMV than fp32 decode, no measurable perplexity change; ``"float"``: fp32 inputs;
            ``"auto"`` (default): int8 for bf16 / fp16 models (their activations carry 8 / 11 significant bits)
            on CPUs with AVX512-VNNI/VBMI, float otherwise. Eager and ``torch.compile`` agree; prefill and GPUs
            stay float. Also settable later with ``optimum_mc.set_decode_activations``.
    """

    def __init__(
        self,
        bits: float = 2.5,
        bits_budget: str = "codes",
        candidate_bits: list[int] | tuple[int, ...] | None = None,
        attn_bits: int | None = 4,
        group_size: int = 128,
        zero_point: str = "float",
        allocation: str = "layer",
        modules_to_not_convert: list[str] | None = None,
        dataset: str | list[str] | dict | None = None,
        tokenizer: Any = None,
        num_samples: int = 128,
        seq_len: int = 512,
        seed: int = 0,
        show_progress: bool = True,
        device: str | None = None,
        resume_dir: str | None = None,
        offload_folder: str | None = None,
        odp: bool = False,
        odp_threshold: float | list[float] | None = None,
        odp_protect_ratio: float = 0.02,
        odp_layers: int | list[int] | None = None,
        decode_activations: str = "auto",
        gptq: dict[str, Any] | None = None,
        allocation_options: dict[str, Any] | None = None,
        experimental: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        o = _grouped({"gptq": gptq, "allocation_options": allocation_options, "experimental": experimental}, kwargs)
        dataset, ds = _dataset_options(dataset, kwargs)
        self.quant_method = "mc"
        self.bits = bits
        self.bits_budget = bits_budget
        self.candidate_bits = list(candidate_bits) if candidate_bits is not None else None
        self.attn_bits = attn_bits
        self.group_size = group_size
        self.allocation = allocation
        self.alpha, self.beta, self.gamma = o["alpha"], o["beta"], o["gamma"]
        self.loss_method = o["loss_method"]
        self.loss_normalizer = o["loss_normalizer"]
        self.heldout_fraction = o["heldout_fraction"]
        self.tune_exponents = o["tune_exponents"]
        self.allocation_solver = o["allocation_solver"]
        self.allocation_time_limit = o["allocation_time_limit"]
        self.allocation_constraints = o["allocation_constraints"]
        self.allocation_granularity = o["allocation_granularity"]
        self.nonexpert_method = o["nonexpert_method"]
        mtc = modules_to_not_convert
        self.modules_to_not_convert = list(mtc) if isinstance(mtc, (list, tuple)) else mtc
        self.damp_percent = o["damp_percent"]
        self.act_order = o["act_order"]
        self.block_size = o["block_size"]
        self.min_expert_tokens = o["min_expert_tokens"]
        self.zero_point = zero_point
        self.metadata = o["metadata"]
        self.clip_search = o["clip_search"]
        self.expert_hessian = o["expert_hessian"]
        self.dataset = list(dataset) if isinstance(dataset, (list, tuple)) else dataset
        self.dataset_config = ds["dataset_config"]
        self.dataset_split = ds["dataset_split"]
        self.text_column = ds["text_column"]
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.seed = seed
        self.show_progress = show_progress
        self.device = str(device) if device is not None and not isinstance(device, str) else device
        self.resume_dir = os.fspath(resume_dir) if resume_dir is not None else None
        self.offload_folder = os.fspath(offload_folder) if offload_folder is not None else None
        self.odp = odp
        self.odp_threshold = list(odp_threshold) if isinstance(odp_threshold, (list, tuple)) else odp_threshold
        self.odp_protect_ratio = odp_protect_ratio
        self.odp_layers = list(odp_layers) if isinstance(odp_layers, (list, tuple)) else odp_layers
        self.decode_activations = decode_activations
        kwargs.pop("quant_method", None)
        for name in _RESULT_FIELDS:
            setattr(self, name, kwargs.pop(name, None))
        _check_version(kwargs.pop("format_version", None), kwargs.pop("optimum_mc_version", None), sorted(kwargs))
        if kwargs:
            raise _err(f"unknown MCConfig option(s): {', '.join(sorted(kwargs))}.")
        self.post_init()

    # ------------------------------------------------------------------ validation
    def post_init(self) -> None:
        """Validate every option; raise :class:`MCConfigError` naming the problem and the fix."""
        cb = self.candidate_bits
        if cb is not None:  # None: resolved per model (budget.check_budget); the widest default bounds ``bits`` here
            if not cb or any(isinstance(b, bool) or not isinstance(b, int) or b not in EXPERT_BITS for b in cb):
                raise _err(f"candidate_bits must be a non-empty list drawn from {EXPERT_BITS}, got {cb!r}.")
            if len(set(cb)) != len(cb):
                raise _err(f"candidate_bits has duplicates: {cb!r}.")
            self.candidate_bits = sorted(cb)
        cb = self.candidate_bits or [1, 2, 3]
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)) or not math.isfinite(self.bits):
            raise _err(f"bits must be a number, got {self.bits!r}.")
        if self.bits_budget not in BITS_BUDGETS:
            raise _err(f"bits_budget must be one of {BITS_BUDGETS}, got {self.bits_budget!r}.")
        lo, hi = min(cb), max(cb)
        if self.metadata not in METADATA_FORMS:
            raise _err(f"metadata must be one of {METADATA_FORMS}, got {self.metadata!r}.")
        if self.bits_budget == "stored" and _is_int(self.group_size) and self.group_size > 0:
            from .bitwidths import group_metadata_bits

            lo = lo + group_metadata_bits(lo, self.metadata) / self.group_size  # per group, whatever the matrix
            hi = hi + group_metadata_bits(hi, self.metadata) / self.group_size
        elif self.bits_budget == "stored":  # group_size=-1: 32 bits per row, resolved per model (at most 1 bit)
            lo, hi = lo, hi + 1
        if not lo <= self.bits <= hi:
            what = " stored bits (codes + scales + zeros)" if self.bits_budget == "stored" else ""
            raise _err(
                f"bits={self.bits} is infeasible with candidate_bits={cb}: the average{what} must lie in "
                f"[{lo:g}, {hi:g}]; change bits or candidate_bits."
            )
        if self.attn_bits is not None and (
            not _is_int(self.attn_bits) or self.attn_bits not in SUPPORTED_BITS or self.attn_bits == 1
        ):
            raise _err(f"attn_bits must be one of (2, 3, 4, 8) or None (keep float), got {self.attn_bits!r}.")
        if (
            not isinstance(self.group_size, int)
            or isinstance(self.group_size, bool)
            or not (self.group_size == -1 or (self.group_size > 0 and self.group_size % 32 == 0))
        ):
            raise _err(
                f"group_size must be a positive multiple of 32 or -1 (one group per row), got {self.group_size!r}."
            )
        if self.allocation not in ALLOCATION_MODES:
            raise _err(f"allocation must be one of {ALLOCATION_MODES}, got {self.allocation!r}.")
        for name in ("alpha", "beta", "gamma"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise _err(f"{name} must be a finite number >= 0, got {v!r}.")
        self._check_pmq()
        self._check_metadata()
        if self.nonexpert_method not in NONEXPERT_METHODS:
            raise _err(f"nonexpert_method must be one of {NONEXPERT_METHODS}, got {self.nonexpert_method!r}.")
        if self.nonexpert_method == "bnb_nf4" and importlib.util.find_spec("bitsandbytes") is None:
            raise _err(
                "nonexpert_method='bnb_nf4' needs bitsandbytes, an optional dependency: pip install 'optimum-mc[nf4]' "
                "(or bitsandbytes>=0.45)."
            )
        if not (isinstance(self.damp_percent, (int, float)) and 0 < self.damp_percent < 1):
            raise _err(f"damp_percent must be in (0, 1), got {self.damp_percent!r}.")
        for name in ("block_size", "num_samples", "seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise _err(f"{name} must be a positive integer, got {v!r}.")
        if self.seq_len < 8:
            raise _err(f"seq_len={self.seq_len} is too short for calibration; use at least 8 tokens (512 typical).")
        if (
            isinstance(self.min_expert_tokens, bool)
            or not isinstance(self.min_expert_tokens, int)
            or (self.min_expert_tokens < 0)
        ):
            raise _err(f"min_expert_tokens must be an integer >= 0, got {self.min_expert_tokens!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise _err(f"seed must be an integer, got {self.seed!r}.")
        self._check_dataset()
        self._check_types()
        self._check_scale()
        self._check_odp()

    def _check_dataset(self) -> None:
        ds = self.dataset
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
        given = [n for n in ("dataset_config", "dataset_split", "text_column") if getattr(self, n) is not None]
        for name in given:
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise _err(f"{name} must be a non-empty string or None, got {v!r}.")
        if given and (not isinstance(ds, str) or ds == "builtin"):
            raise _err(
                f"{', '.join(given)} only apply to a `datasets` source (dataset='name'), not to dataset={_short(ds)}."
            )
        if self.dataset_config is not None and ":" in ds:
            raise _err(f"dataset={ds!r} already names a config after ':'; drop it or drop dataset_config.")

    def _check_types(self) -> None:
        """Booleans are bools, module lists are lists of names, the tokenizer is a tokenizer or a path."""
        for name in ("allocation_constraints", "act_order", "clip_search", "show_progress", "odp"):
            _check_bool(name, getattr(self, name))
        mtc = self.modules_to_not_convert
        if mtc is not None and (not isinstance(mtc, list) or not all(isinstance(m, str) and m for m in mtc)):
            raise _err(f"modules_to_not_convert must be a list of module names, e.g. ['q_proj'], got {mtc!r}.")
        tok = self.tokenizer
        if tok is not None and not isinstance(tok, str) and not callable(getattr(tok, "encode", None)):
            raise _err(f"tokenizer must be None, a path / Hub id, or a tokenizer object, got {tok!r}.")
        if isinstance(tok, str) and not tok.strip():
            raise _err("tokenizer='' names nothing; use None (the model's own tokenizer) or a path / Hub id.")

    def _check_scale(self) -> None:
        import torch

        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise _err(
                    f"device={self.device!r} is not a torch device; pass e.g. 'cpu', 'cuda' or 'cuda:1'."
                ) from exc
        for name in ("resume_dir", "offload_folder"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip()):
                raise _err(f"{name} must be a folder path, got {v!r}.")

    def _check_pmq(self) -> None:
        for name, allowed in (
            ("loss_method", LOSS_METHODS),
            ("loss_normalizer", LOSS_NORMALIZERS),
            ("allocation_solver", ALLOCATION_SOLVERS),
            ("allocation_granularity", ALLOCATION_GRANULARITIES),
            ("zero_point", ZERO_POINTS),
            ("expert_hessian", EXPERT_HESSIANS),
        ):
            if getattr(self, name) not in allowed:
                raise _err(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        f = self.heldout_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise _err(f"heldout_fraction must lie in (0, 1), got {f!r}.")
        if not isinstance(self.tune_exponents, bool):
            raise _err(f"tune_exponents must be True or False, got {self.tune_exponents!r}.")
        if self.tune_exponents and self.allocation != "layer":
            raise _err(f"tune_exponents=True needs allocation='layer', got allocation={self.allocation!r}.")
        if self.allocation_granularity == "projection":
            if self.allocation not in ("layer", "global"):
                raise _err(
                    f"allocation_granularity='projection' needs allocation 'layer' or 'global' (MC's objective), got "
                    f"allocation={self.allocation!r}."
                )
            if self.loss_method != "rtn" or self.tune_exponents:
                raise _err(
                    "allocation_granularity='projection' measures each projection's loss by round-to-nearest: it "
                    f"needs loss_method='rtn' and tune_exponents=False (got {self.loss_method!r}, "
                    f"{self.tune_exponents!r})."
                )
        t = self.allocation_time_limit
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise _err(f"allocation_time_limit must be a positive number of seconds, got {t!r}.")

    def _check_metadata(self) -> None:
        """``metadata="q8"`` stores integer zeros and per-group scales: the combinations the format describes."""
        if self.metadata != "q8":
            return
        works = (
            "metadata='fp16' (any zero_point, any group_size), or metadata='q8' with zero_point='int' and a "
            "group_size that is a multiple of 32"
        )
        if self.zero_point != "int":
            raise _err(
                f"metadata='q8' stores integer zero points; zero_point={self.zero_point!r} cannot be stored that way. "
                f"Combinations that work: {works}."
            )
        if self.group_size == -1:
            raise _err(
                f"metadata='q8' shares scale exponents between rows of a group column; group_size=-1 (one fp16 "
                f"pair per row, already <= 32 / in_features bits per weight) is not served. Combinations that work: "
                f"{works}."
            )

    def _check_odp(self) -> None:
        thr = self.odp_threshold
        vals = thr if isinstance(thr, list) else ([] if thr is None else [thr])
        for t in vals:
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
                raise _err(f"odp_threshold values must lie in (0, 1], got {t!r}.")
        r = self.odp_protect_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise _err(f"odp_protect_ratio must lie in [0, 1], got {r!r}.")
        layers = self.odp_layers
        if isinstance(layers, list):
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise _err(f"odp_layers must be layer indices >= 0, got {layers!r}.")
        elif layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise _err(f"odp_layers must be None, a count >= 0 or a list of layer indices, got {layers!r}.")
        if self.decode_activations not in DECODE_ACTIVATIONS:
            raise _err(f"decode_activations must be one of {DECODE_ACTIVATIONS}, got {self.decode_activations!r}.")

    # ------------------------------------------------------------------ derived
    def code_bits(self, hidden: int, intermediate: int) -> float:
        """The target average of code bits per expert weight for experts of this shape: ``bits`` itself, or with
        ``bits_budget="stored"`` ``bits`` less the scales' and zeros' bits per weight (the same for every width, so
        the allocation program is unchanged and only its budget moves)."""
        if self.bits_budget == "codes":
            return float(self.bits)
        from .bitwidths import code_bits_for_stored

        return code_bits_for_stored(float(self.bits), hidden, intermediate, self.group_size, self.metadata)

    @property
    def is_uniform(self) -> bool:
        return self.candidate_bits is not None and len(self.candidate_bits) == 1

    @property
    def is_quantized(self) -> bool:
        """True once quantization results (per-expert bits) are stored in the config."""
        return self.expert_bits is not None

    def dataset_options(self) -> dict[str, str | None]:
        """``dataset_config`` / ``dataset_split`` / ``text_column``, as ``calibration.data.load_documents`` takes."""
        names = ("dataset_config", "dataset_split", "text_column")
        return {n: getattr(self, n) for n in names}

    def get_loading_attributes(self) -> dict[str, Any]:
        """Options a config passed to ``from_pretrained`` of an MC checkpoint sets on the stored one: ODP's.

        transformers merges them for config types in its loading-attributes list (``registration.py`` adds
        MCConfig); everything else comes from the checkpoint.
        """
        out = {name: copy.deepcopy(getattr(self, name)) for name in LOADING_ATTRIBUTES}
        requested = self.quantization_options_set()
        if requested:  # checked against the stored config by MCQuantizer.validate_environment (then refused)
            out["_requested_quantization"] = requested
        return out

    def quantization_options_set(self) -> dict[str, Any]:
        """The quantization options (neither loading attributes nor results) this config sets to something other
        than their defaults: what a config passed to ``from_pretrained`` of an already-quantized model would
        silently lose."""
        default = MCConfig().__dict__
        skip = set(LOADING_ATTRIBUTES) | set(_RESULT_FIELDS) | set(_COSMETIC) | {"quant_method"}
        return {
            k: v for k, v in self.__dict__.items()
            if not k.startswith("_") and k not in skip and k in default and not _same_option(v, default[k])
        }  # fmt: skip

    def check_not_requantized(self, requested: dict[str, Any]) -> None:
        """Raise :class:`AlreadyQuantizedError` when ``requested`` (a passed config's
        :meth:`quantization_options_set`) asks for quantization options this stored config does not hold."""
        differ = {k: v for k, v in requested.items() if not _same_option(v, getattr(self, k, None))}
        if not differ:
            return
        asked = ", ".join(f"{k}={_short(v)}" for k, v in sorted(differ.items()))
        held = ", ".join(f"{k}={_short(getattr(self, k, None))}" for k in sorted(differ))
        raise AlreadyQuantizedError(
            f"this model is already MC-quantized ({held}); the quantization options you passed ({asked}) cannot "
            f"apply to it. To quantize with them, pass the float model it came from; to load it, pass no "
            f"quantization_config or only loading options ({', '.join(LOADING_ATTRIBUTES)})."
        )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """Every option and result, JSON-ready, with the format / package version; calibration texts as a record."""
        d = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_") and k != "tokenizer"}
        for k, default in _OMITTED_AT_DEFAULT.items():
            if d.get(k) == default and type(d.get(k)) is type(default):
                del d[k]
        if self.tokenizer is not None and isinstance(self.tokenizer, str):
            d["tokenizer"] = self.tokenizer
        if isinstance(self.dataset, list):
            d["dataset"] = texts_record(self.dataset)
        d["format_version"] = format_for(self.expert_bits, self.metadata)
        d["optimum_mc_version"] = __version__
        return d

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MCConfig) and self.to_dict() == other.to_dict()


# ---------------------------------------------------------------------------------------------- helpers


def _grouped(groups: dict[str, dict | None], flat: dict[str, Any]) -> dict[str, Any]:
    """The grouped options' values: defaults, then each group's dict, then flat names in ``flat`` (popped: the form
    config.json records). Unknown names, non-dict groups and one option given twice are refused."""
    out = {}
    for group, defaults in _GROUPS.items():
        out.update(defaults)
        given = groups[group]
        if given is None:
            continue
        if not isinstance(given, dict):
            raise _err(f"{group} must be a dict of options ({', '.join(defaults)}), got {_short(given)}.")
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            where = {n: g for g, d in _GROUPS.items() for n in d}
            hint = "; ".join(f"{n} belongs in {where[n]}=" for n in unknown if n in where)
            raise _err(
                f"unknown {group} option(s): {', '.join(unknown)}; {group} takes {', '.join(defaults)}"
                + (f" ({hint})" if hint else "")
                + "."
            )
        out.update(given)
    for name in [n for n in flat if n in out]:
        group = next(g for g, d in _GROUPS.items() if name in d)
        if groups[group] is not None and name in groups[group]:
            raise _err(f"{name} given twice (as {name}= and in {group}=); give it once.")
        out[name] = flat.pop(name)
    return out


def _dataset_options(dataset: Any, flat: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``dataset`` and its datasets-source options: a dict ``{"name": ..., "config": ..., "split": ...,
    "text_column": ...}`` or the flat ``dataset_config`` / ``dataset_split`` / ``text_column`` (popped from
    ``flat``: the form config.json records)."""
    ds = {n: flat.pop(n, None) for n in DATASET_KEYS.values()}
    if isinstance(dataset, dict) and "name" in dataset:
        unknown = sorted(set(dataset) - {"name", *DATASET_KEYS})
        if unknown:
            raise _err(f"dataset dict keys must be among name, {', '.join(DATASET_KEYS)}; got {', '.join(unknown)}.")
        for key, name in DATASET_KEYS.items():
            if key in dataset:
                if ds[name] is not None:
                    raise _err(f"{name} given twice (as {name}= and as dataset['{key}']); give it once.")
                ds[name] = dataset[key]
        dataset = dataset["name"]
    return dataset, ds


def _same_option(a: Any, b: Any) -> bool:
    """Option values compared as config.json stores them (tuples and lists alike, 2 and 2.0 alike)."""
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def texts_record(texts: list[str]) -> dict[str, Any]:
    """What config.json keeps of calibration texts: their count, characters and a sha256 over all of them."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return {"texts": len(texts), "characters": sum(len(t) for t in texts), "sha256": h.hexdigest()}


def _is_text_record(d: dict) -> bool:
    return set(d) == {"texts", "characters", "sha256"} and isinstance(d["sha256"], str)


def _check_version(fmt: Any, writer: Any, unknown: list[str]) -> None:
    """Refuse a config written by a newer optimum-mc (newer format, or options this version does not know)."""
    from packaging.version import InvalidVersion, Version

    if fmt is not None and (isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1):
        raise _err(f"format_version must be a positive integer, got {fmt!r}.")
    try:
        newer_writer = writer is not None and Version(str(writer)) > Version(__version__)
    except InvalidVersion:
        newer_writer = False
    if (fmt is not None and fmt > FORMAT_VERSION) or (unknown and newer_writer):
        need = str(writer) if newer_writer else f"> {__version__}"
        what = (
            f"checkpoint format {fmt} (this version reads up to {FORMAT_VERSION})"
            if fmt is not None and fmt > FORMAT_VERSION
            else f"option(s) this version does not know: {', '.join(unknown)}"
        )
        raise CheckpointVersionError(
            f"this checkpoint needs optimum-mc >= {need}; upgrade optimum-mc (pip install -U optimum-mc). It was "
            f"written by optimum-mc {writer or 'unknown'} and uses {what}; installed: optimum-mc {__version__}."
        )
