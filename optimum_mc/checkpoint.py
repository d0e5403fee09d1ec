"""Check a quantized checkpoint's tensors against its MC config before any weight is loaded.

transformers would otherwise fail late with a generic size-mismatch error, or worse, leave missing buffers
uninitialized. We read only the safetensors headers (cheap) and compare every expected packed tensor: present,
right dtype, right shape for its bit-width, and its bytes actually inside the file (truncation).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from .errors import CheckpointError
from .packing import WORD_BITS

logger = logging.getLogger(__name__)

_DTYPES = {"I32": "int32", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "U8": "uint8", "I8": "int8"}
_ELEM = {"I32": 4, "F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I8": 1, "I64": 8, "F64": 8}
# the tensors of a packed matrix besides its codes (``qweight``): fp16 metadata, or the compact q8 form
_METADATA_SUFFIXES = (".scales", ".zeros", ".scale_codes", ".scale_exps", ".zero_codes")


# safetensors metadata keys of MC shards (string values, as safetensors requires)
FORMAT_KEY = "mc_format_version"
VERSION_KEY = "optimum_mc_version"


def shard_metadata(expert_bits=None, metadata: str = "fp16") -> dict[str, str]:
    """The ``__metadata__`` entries every saved MC shard carries (besides transformers' ``format: pt``): the
    format the model's ``expert_bits`` and ``metadata`` need (``version.format_for``) and the writing optimum-mc's
    version."""
    from .version import __version__, format_for

    return {FORMAT_KEY: str(format_for(expert_bits, metadata)), VERSION_KEY: __version__}


def sort_shard_metadata(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` entries sorted by key.

    safetensors writes the metadata in hash-map order, which varies between saves; with more than one entry (ours
    plus transformers' ``format``) two saves of the same model would differ in bytes. The rewritten header has the
    same keys and values, hence the same length; tensor entries and data are untouched. A header this code cannot
    reproduce byte for byte before sorting is left as written.
    """

    def dump(header: dict) -> bytes:
        return json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    with open(path, "r+b") as f:
        raw8 = f.read(8)
        if len(raw8) < 8:
            return
        (n,) = struct.unpack("<Q", raw8)
        raw = f.read(n)
        try:
            header = json.loads(raw)
        except ValueError:
            return
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2 or dump(header) != raw.rstrip(b" "):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        new = dump(header)
        if len(new) != len(raw.rstrip(b" ")):  # pragma: no cover - same content, same length
            return
        f.seek(8)
        f.write(new + raw[len(new) :])


def read_safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (``{}`` when it has none)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-save or re-download it.")
        (n,) = struct.unpack("<Q", raw)
        try:
            return dict(json.loads(f.read(n)).get("__metadata__") or {})
        except ValueError as exc:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({exc}).") from exc


def check_format_metadata(files: Iterable[str]) -> None:
    """Refuse shards whose ``mc_format_version`` is newer than this optimum-mc reads (shards without it: format 1)."""
    from .errors import CheckpointVersionError
    from .version import FORMAT_VERSION, __version__

    for path in files:
        meta = read_safetensors_metadata(str(path))
        fmt = meta.get(FORMAT_KEY, "1")
        if not fmt.isdigit() or int(fmt) > FORMAT_VERSION:
            writer = meta.get(VERSION_KEY, "a newer version")
            raise CheckpointVersionError(
                f"this checkpoint needs optimum-mc >= {writer}; upgrade optimum-mc (pip install -U optimum-mc). "
                f"{os.path.basename(str(path))} uses MC format {fmt!r}; installed optimum-mc {__version__} "
                f"reads up to format {FORMAT_VERSION}."
            )


def read_safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, with each tensor's end offset checked against the file size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is truncated (no safetensors header); re-save or re-download it.")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path} is truncated (header of {n} bytes in a {size}-byte file).")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise CheckpointError(f"{path} has a corrupt safetensors header ({exc}).") from exc
    data = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        end = info["data_offsets"][1]
        if end > data:
            raise CheckpointError(
                f"{path} is truncated: tensor {key!r} ends at byte {end} of a {data}-byte data section; "
                f"re-save or re-download the checkpoint."
            )
    header.pop("__metadata__", None)
    return header


def packed_shapes(
    out_features: int, in_features: int, bits: int, group_size: int, metadata: str = "fp16"
) -> dict[str, tuple]:
    """Expected (dtype, shape) of the stored packed buffers of one matrix (codes, then fp16 or q8 metadata)."""
    g = in_features if group_size == -1 else group_size
    groups = in_features // g
    out = {"qweight": ("int32", (out_features, in_features * bits // WORD_BITS))}
    if metadata == "q8":
        from .group_quant import q8_shapes

        return {**out, **q8_shapes(out_features, groups, bits)}
    return {**out, "scales": ("float16", (out_features, groups)), "zeros": ("float16", (out_features, groups))}


def nf4_shapes(out_features: int, in_features: int, blocksize: int = 64) -> dict[str, tuple]:
    """Expected (dtype, shape) of the buffers of one NF4Linear."""
    n = out_features * in_features
    return {
        "weight_nf4": ("uint8", (n // 2, 1)),
        "absmax": ("float32", (n // blocksize,)),
        "quant_map": ("float32", (16,)),
    }


def _layer_key(key: str, list_name: str = "layers") -> tuple[int, str] | None:
    """``(layer index, rest after the MoE/attention attribute)`` for keys like ``...layers.3.<attr>.<rest>``
    (``list_name``: the decoder layer list's attribute, DBRX's ``blocks``)."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == list_name and parts[i + 1].isdigit():
            return int(parts[i + 1]), ".".join(parts[i + 2 :])
    return None


def key_renamer(model, quantizer=None):
    """``rename(checkpoint key) -> (model keys, converted)`` with transformers' conversion mapping of ``model`` (the
    renamings and merges transformers applies when loading: ``shared_expert.`` -> ``shared_experts.``, a fused
    ``in_proj`` split in four, ...). ``converted`` when a weight converter (merge / split) matched, whose target
    shapes differ from the stored ones; a split lists every key it fills. Without a conversion mapping in this
    transformers: the identity."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # pragma: no cover - another transformers layout
        return lambda key: ([key], False)
    meta = model.state_dict()
    transforms = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None)

    def rename(key: str) -> tuple[list[str], bool]:
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if name not in meta and key in meta:  # as transformers loads: a key the model has is not renamed
            name, pattern = rename_source_key(key, [], [], prefix, meta)
        if pattern is None:
            return [name], False
        targets = next((c.target_patterns for c in converters if pattern in c.source_patterns), [])
        first = targets[0] if targets else ""
        names = [name] + [name.replace(first, t) for t in targets[1:] if first and first in name]
        return names, True

    return rename


def save_converter(model):
    """``pattern(model key) -> str | None``: the pattern of the weight converter (a merge or split of tensors, not a
    renaming) transformers applies to that key when saving ``model``, or None. A packed linear's buffers under such
    a key would be concatenated or cut like float weights (lara_mini's ``in_proj_qkv / z / b / a`` saved merged
    as one ``in_proj``), which their packed layout cannot follow, so such linears stay float."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_converters
    except ImportError:  # pragma: no cover - another transformers layout: nothing is converted
        return lambda key: None
    transforms = getattr(model, "_weight_conversions", None)
    if transforms is None:
        transforms = get_model_conversion_mapping(model, add_legacy=False)
    reverse = [t.reverse_transform() for t in (transforms or [])[::-1]]
    converters = [t for t in reverse if isinstance(t, WeightConverter)]
    round_trip = _renaming_round_trip(model)

    def pattern(key: str) -> str | None:
        found = apply_converters(key, converters)[1] if converters else None
        return found if found is not None else round_trip(key)

    return pattern


def _renaming_round_trip(model):
    """``key -> str | None``: a description when transformers' renamings, reverted at save and applied at load,
    do not give ``key`` back (a renaming of the ``.weight`` suffix: inkling2's ``sconv.weight_proj.weight``
    saved as ``weight_proj`` turns a packed ``weight_proj.qweight`` into ``weight_proj.weight.qweight`` at
    load), else None. Checked against the model's whole mapping (layers streamed later use it too)."""
    import copy

    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, apply_renamings, rename_source_key
    except ImportError:  # pragma: no cover - another transformers layout
        return lambda key: None
    try:
        transforms = list(get_model_conversion_mapping(model, add_legacy=False) or [])
    except Exception:  # pragma: no cover - a model without a mapping
        return lambda key: None
    if not transforms:
        return lambda key: None
    reverse = [t.reverse_transform() for t in copy.deepcopy(transforms)[::-1]]
    rev_renamings = [t for t in reverse if not isinstance(t, WeightConverter)]
    forward = copy.deepcopy(transforms)  # (renaming marks a transform used: never the model's own)
    renamings = [t for t in forward if not isinstance(t, WeightConverter)]
    converters = [t for t in forward if isinstance(t, WeightConverter)]

    def check(key: str) -> str | None:
        try:
            saved = apply_renamings(key, rev_renamings)
            back = rename_source_key(saved, renamings, converters)[0]
        except Exception:
            return None
        return None if back == key else f"renamed {saved!r} when saved, read back as {back!r}"

    return check


def check_checkpoint(
    files: Iterable[str], expected: dict[tuple[int, str], tuple[str, tuple]], rename=None, list_name: str = "layers"
) -> None:
    """Compare ``expected[(layer, suffix)] = (dtype, shape)`` with the checkpoint; raise CheckpointError.

    ``suffix`` is matched against the end of each checkpoint key of that layer, so renamed block attributes
    (e.g. Mixtral's ``mlp`` saved as ``block_sparse_moe``) do not matter. ``rename`` (:func:`key_renamer`) maps
    checkpoint keys to the model's names first: transformers saves a model's keys under its checkpoint names
    (``shared_experts.`` saved as ``shared_expert.``), which no suffix of the model's names matches.
    """
    files = list(files)
    check_format_metadata(f for f in files if str(f).endswith(".safetensors"))
    found: dict[tuple[int, str], tuple[str, tuple]] = {}
    by_layer: dict[int, list[tuple[str, dict]]] = {}
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(f"{path}: MC checkpoints are read from safetensors only (no pickle).")
        for key, info in read_safetensors_header(str(path)).items():
            lk = _layer_key(rename(key)[0][0] if rename is not None else key, list_name)
            if lk is not None:
                by_layer.setdefault(lk[0], []).append((lk[1], info))
    problems = []
    for (layer, suffix), (dtype, shape) in expected.items():
        hit = next(
            (info for rest, info in by_layer.get(layer, []) if rest == suffix or rest.endswith("." + suffix)), None
        )
        if hit is None:
            problems.append(f"missing layers.{layer}.*{suffix}")
            continue
        got = (_DTYPES.get(hit["dtype"], hit["dtype"]), tuple(hit["shape"]))
        found[(layer, suffix)] = got
        if got != (dtype, shape):
            problems.append(f"layers.{layer}.*{suffix}: expected {dtype}{list(shape)}, found {got[0]}{list(got[1])}")
    if problems:
        head = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise CheckpointError(
            f"the checkpoint's tensors disagree with its quantization_config (per-expert bits / group size): {head}. "
            f"The checkpoint is incomplete, truncated or was edited; re-save it from the quantized model."
        )


def _ignored_missing(model) -> list:
    import re

    return [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]


def check_all_tensors(model, files: Iterable[str], quantizer=None) -> None:
    """Every tensor the (meta, skeleton-built) model expects must be in the checkpoint with its shape.

    Checkpoint keys are mapped to model keys with transformers' own conversion mapping (renamed block attributes,
    base-model prefix); tied weights and keys the model declares optional are not required. Catches a checkpoint
    missing its router, embeddings, norms or any quantized linear before transformers would initialize them
    randomly.
    """
    meta = model.state_dict()
    rename = key_renamer(model, quantizer)
    found: set[str] = set()
    converted = False
    problems = []
    for path in files:
        for key, info in read_safetensors_header(str(path)).items():
            names, by_converter = rename(key)
            name = names[0]
            if by_converter:  # merged / split by a converter: shapes change, only presence is known
                converted = True
                found.update(names)
                continue
            found.add(name)
            want = meta.get(name)
            if want is not None and tuple(want.shape) != tuple(info["shape"]):
                problems.append(f"{key}: expected shape {list(want.shape)}, found {list(info['shape'])}")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    ignore = _ignored_missing(model)
    missing = [k for k in meta if k not in found and k not in tied and not any(p.search(k) for p in ignore)]
    if converted:  # a converter's other targets are filled from the same sources
        missing = [k for k in missing if not any(k.rsplit(".", 1)[0] in f for f in found)]
    problems = [f"missing {k}" for k in missing] + problems
    if problems:
        head = "; ".join(problems[:8]) + (f"; ... ({len(problems)} problems)" if len(problems) > 8 else "")
        raise CheckpointError(
            f"the checkpoint does not hold every tensor of the model: {head}. Those weights would be initialized "
            f"randomly; re-save the checkpoint from the quantized model (or re-download it)."
        )


# ------------------------------------------------------------------------------------------ sizes


def _bits_for(key: str, cfg) -> int:
    """Bit-width of the packed matrix stored under ``key`` according to the config."""
    if ".packed." in key:
        from .bitwidths import split

        parts = key.split(".")
        at = parts.index("packed")
        layer = int(next(p for p in reversed(parts[:at]) if p.isdigit()))  # (layers.<i>., DBRX's blocks.<i>.)
        expert = int(parts[at + 1])
        gu, dn = split(cfg.expert_bits[cfg.moe_layers.index(layer)][expert])
        return dn if parts[parts.index("packed") + 2] == "down" else gu
    return int(cfg.attn_bits or 4)


SIZE_GROUPS = ("experts (packed)", "linears (packed)", "float (embeddings, norms, routers, head)")


def size_groups(path: str | Path, cfg) -> dict[str, tuple[int, int]]:
    """``{part: (bytes stored, weights represented)}`` of an MC folder's safetensors files (scales / zeros included
    in the bytes; a packed matrix represents its unpacked ``out x in`` weights)."""
    names = SIZE_GROUPS
    groups = {n: [0, 0] for n in names}
    for f in sorted(Path(path).glob("*.safetensors")):
        for key, info in read_safetensors_header(str(f)).items():
            n = 1
            for d in info["shape"]:
                n *= d
            nbytes = n * _ELEM.get(info["dtype"], 4)
            packed = key.endswith((".qweight", *_METADATA_SUFFIXES, ".weight_nf4", ".absmax", ".quant_map"))
            g = names[0] if ".packed." in key else names[1] if packed else names[2]
            groups[g][0] += nbytes
            if key.endswith(".qweight"):
                rows, words = info["shape"]
                groups[g][1] += rows * words * 32 // _bits_for(key, cfg)
            elif key.endswith(".weight_nf4"):
                groups[g][1] += 2 * n
            elif not packed:
                groups[g][1] += n
    return {k: (b, n) for k, (b, n) in groups.items()}


def expert_stored_bits(path: str | Path, cfg) -> tuple[float, float] | None:
    """``(stored, code)`` bits per routed-expert weight of an MC folder, from its safetensors headers: stored counts
    every byte of the experts' ``qweight`` and scales / zeros as stored (fp16 or the compact q8 tensors; biases not
    counted), code the ``qweight`` bytes alone (None: no packed experts)."""
    stored = codes = weights = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        for key, info in read_safetensors_header(str(f)).items():
            if ".packed." not in key or not key.endswith((".qweight", *_METADATA_SUFFIXES)):
                continue
            n = 1
            for d in info["shape"]:
                n *= d
            nbytes = n * _ELEM.get(info["dtype"], 4)
            stored += nbytes
            if key.endswith(".qweight"):
                codes += nbytes
                rows, words = info["shape"]
                weights += rows * words * 32 // _bits_for(key, cfg)
    return (8 * stored / weights, 8 * codes / weights) if weights else None
