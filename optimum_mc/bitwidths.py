"""An expert's bit-width: one width for both projections, or one per projection.

With ``MCConfig(allocation_granularity="projection")`` an expert's fused gate/up matrix ``(2I, H)`` and its down
matrix ``(H, I)`` get their own widths. An expert's width is then written ``[gate_up, down]``, and a plain ``int``
when both are equal (the only form of ``"expert"`` granularity and of older checkpoints), in ``config.json``
(``quantization_config.expert_bits``) as everywhere else. The gate/up matrix holds 2/3 of the expert's weights,
so its width counts twice in averages and budgets.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import CheckpointError, ShapeError

ExpertBits = int | list[int]  # both projections at one width, or [gate_up, down]
PROJECTION_UNITS = (2, 1)  # weights of gate/up and down, in units of I * H


def split(bits: ExpertBits) -> tuple[int, int]:
    """``(gate_up, down)`` widths of an expert's bit-width; typed error for anything else."""
    if isinstance(bits, bool):
        raise CheckpointError(f"an expert bit-width must be an int or [gate_up, down], got {bits!r}.")
    if isinstance(bits, int):
        return bits, bits
    if isinstance(bits, (list, tuple)) and len(bits) == 2 and all(is_int(b) for b in bits):
        return int(bits[0]), int(bits[1])
    raise CheckpointError(f"an expert bit-width must be an int or [gate_up, down], got {bits!r}.")


def is_int(b: object) -> bool:
    """An int that is not a bool (``True`` is not a bit-width)."""
    return isinstance(b, int) and not isinstance(b, bool)


def join(gate_up: int, down: int) -> ExpertBits:
    """The canonical form: an ``int`` when both widths are equal, else ``[gate_up, down]``."""
    return int(gate_up) if gate_up == down else [int(gate_up), int(down)]


def mean_bits(bits: ExpertBits) -> float:
    """Code bits per weight of one expert (gate/up counts twice: it holds 2/3 of the weights)."""
    gu, dn = split(bits)
    return (PROJECTION_UNITS[0] * gu + PROJECTION_UNITS[1] * dn) / sum(PROJECTION_UNITS)


# fp16 scale + fp16 zero stored per group of ``group_size`` weights (docs/format.md)
METADATA_BITS_PER_GROUP = 32
# metadata="q8": an 8-bit scale code, the zero at the code width, and 1/16 of an int8 exponent per group
Q8_FIXED_BITS_PER_GROUP = 8.5


def group_metadata_bits(bits: int, metadata: str = "fp16") -> float:
    """Stored metadata bits of one group of ``bits``-bit codes: 32 (fp16 scale + zero) or ``8.5 + bits`` (q8)."""
    return METADATA_BITS_PER_GROUP if metadata == "fp16" else Q8_FIXED_BITS_PER_GROUP + bits


def group_of(in_features: int, group_size: int) -> int:
    """The group a matrix with ``in_features`` inputs is quantized in (``-1``: the whole row)."""
    return in_features if group_size == -1 else group_size


def metadata_bits(hidden: int, intermediate: int, group_size: int) -> float:
    """Bits of scales and zeros per expert weight: 32 per group of the gate/up ``(2I, H)`` matrix (groups along
    ``H``) and of the down ``(H, I)`` matrix (groups along ``I``), averaged over the expert's weights (gate/up holds
    2/3 of them). The same for every bit-width: 0.25 at ``group_size=128``."""
    gu = METADATA_BITS_PER_GROUP / group_of(hidden, group_size)
    dn = METADATA_BITS_PER_GROUP / group_of(intermediate, group_size)
    return (PROJECTION_UNITS[0] * gu + PROJECTION_UNITS[1] * dn) / sum(PROJECTION_UNITS)


def _q8_slope(hidden: int, intermediate: int, group_size: int) -> float:
    """Groups per expert weight (gate/up counts twice): the ``1 / g`` of both projections, averaged."""
    gu, dn = 1 / group_of(hidden, group_size), 1 / group_of(intermediate, group_size)
    return (PROJECTION_UNITS[0] * gu + PROJECTION_UNITS[1] * dn) / sum(PROJECTION_UNITS)


def stored_bits(bits: ExpertBits, hidden: int, intermediate: int, group_size: int, metadata: str = "fp16") -> float:
    """Stored bits per weight of one expert: packed codes plus scales and zeros (biases not counted); ``metadata``
    ``"q8"``: ``(8.5 + b) / g`` bits of metadata per b-bit weight (padding of the packed zeros not counted)."""
    if metadata == "fp16":
        return mean_bits(bits) + metadata_bits(hidden, intermediate, group_size)
    gu, dn = split(bits)
    per = [
        group_metadata_bits(b, metadata) / group_of(n, group_size) + b for b, n in ((gu, hidden), (dn, intermediate))
    ]
    return (PROJECTION_UNITS[0] * per[0] + PROJECTION_UNITS[1] * per[1]) / sum(PROJECTION_UNITS)


def code_bits_for_stored(
    stored: float, hidden: int, intermediate: int, group_size: int, metadata: str = "fp16"
) -> float:
    """The average code bits per expert weight whose stored bits (:func:`stored_bits`) are ``stored``: the stored
    budget less the metadata. For ``"q8"`` the metadata grows with the width, ``b (1 + s) + 8.5 s`` stored bits per
    b-bit weight with ``s`` groups per weight (``1 / g``): linear in ``b``, so the code-bit budget is exact."""
    if metadata == "fp16":
        return stored - metadata_bits(hidden, intermediate, group_size)
    slope = _q8_slope(hidden, intermediate, group_size)
    return (stored - Q8_FIXED_BITS_PER_GROUP * slope) / (1 + slope)


def op_bits(bits: Sequence[ExpertBits]) -> list[int]:
    """The ``bits`` argument of ``optimum_mc::moe``: ``E`` ints when every expert has one width for both
    projections, else ``2E`` (the gate/up widths, then the down widths)."""
    pairs = [split(b) for b in bits]
    gu, dn = [p[0] for p in pairs], [p[1] for p in pairs]
    return gu if gu == dn else gu + dn


def label(bits: ExpertBits) -> str:
    """Short display form: ``"3"`` or ``"2/3"`` (gate/up / down)."""
    gu, dn = split(bits)
    return str(gu) if gu == dn else f"{gu}/{dn}"


def from_op_bits(bits: Sequence[int], num_experts: int) -> tuple[list[int], list[int]]:
    """Inverse of :func:`op_bits`: the gate/up and the down widths of ``num_experts`` experts."""
    bits = [int(b) for b in bits]
    if len(bits) == num_experts:
        return bits, bits
    if len(bits) == 2 * num_experts:
        return bits[:num_experts], bits[num_experts:]
    raise ShapeError(f"got {len(bits)} bit-widths for {num_experts} experts; need {num_experts} or {2 * num_experts}.")
