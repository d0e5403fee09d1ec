"""MCConfig: every option of MC quantization and online dynamic pruning, validated before any weight is loaded."""

from __future__ import annotations

import copy
import hashlib
import os
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .errors import AlreadyQuantizedError, CheckpointVersionError, MCConfigError
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
GPTQ_OPTIONS = {
    "damp_percent": 0.01,
    "act_order": True,
    "block_size": 128,
    "min_expert_tokens": 16,
    "group_fit": "minmax",
}
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
    "group_fit": "minmax",
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
            calibration-free quantization), ``group_fit`` (``"minmax"``: each group's grid spans its [min, max];
            ``"lsq"``: scale and zero fitted by least squares when GPTQ reaches the group, best with
            ``act_order=False``; docs/low-bit-study.md).
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
        self.group_fit = o["group_fit"]
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
        """Validate every option; raise :class:`MCConfigError` naming the problem and the fix (config_checks.py)."""
        from .config_checks import validate

        validate(self)

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
