"""The one canonical packed layout for b-bit integer codes, b in {1, 2, 3, 4, 8}.

Codes of one weight row are written as a little-endian bit stream: bit ``j`` of code ``i`` sits at stream position
``i * b + j``, and stream position ``p`` is bit ``p % 32`` of int32 word ``p // 32``. A row of ``n`` codes therefore
takes exactly ``n * b / 32`` words (``n`` must be a multiple of 32); for b in {1, 2, 4, 8} this is the usual
"code ``i`` at shift ``(i % (32 // b)) * b`` of word ``i // (32 // b)``" layout, and for b = 3 codes straddle words.
See docs/format.md.

Hand-written because no library packs 1/2/3-bit codes in a layout shared by our CPU, Triton and reference kernels.
"""

from __future__ import annotations

import torch

from .errors import DTypeError, ShapeError, UnsupportedBitsError

SUPPORTED_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
WORD_BITS = 32


def check_bits(bits: int) -> int:
    """Return ``bits`` if supported, else raise :class:`UnsupportedBitsError`."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise UnsupportedBitsError(f"bits={bits!r} is not supported; choose one of {SUPPORTED_BITS}.")
    return bits


def packed_words(n: int, bits: int) -> int:
    """Number of int32 words holding ``n`` codes of ``bits`` bits (``n`` must be a multiple of 32)."""
    check_bits(bits)
    if n % WORD_BITS:
        raise ShapeError(
            f"the packed dimension must be a multiple of {WORD_BITS}, got {n}; pad or pick another shape."
        )
    return n * bits // WORD_BITS


# int64 elements of the bit-stream temporaries per chunk of rows (16 MiB): the stream is ``bits`` times the codes'
# size in int64, several hundred MB for one expert matrix if built at once.
_STREAM_ELEMENTS = 1 << 21


def _row_chunks(rows: int, per_row: int) -> range:
    return range(0, rows, max(1, _STREAM_ELEMENTS // max(per_row, 1)))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(..., n)`` with values in ``[0, 2**bits)`` into int32 words ``(..., n * bits / 32)``."""
    check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise DTypeError(f"pack expects an integer tensor of codes, got {codes.dtype}.")
    n = codes.shape[-1]
    words = packed_words(n, bits)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing.")
    flat = codes.reshape(-1, n)
    out = torch.empty(flat.shape[0], words, dtype=torch.int32, device=codes.device)
    shifts = torch.arange(bits, device=codes.device, dtype=torch.int64)
    word_shifts = torch.arange(WORD_BITS, device=codes.device, dtype=torch.int64)
    step = _row_chunks(flat.shape[0], n * bits).step
    for r0 in range(0, flat.shape[0], step):
        c = flat[r0 : r0 + step].to(torch.int64)
        stream = (c.unsqueeze(-1) >> shifts) & 1  # (rows, n, bits): the bit stream, code-major
        stream = stream.reshape(c.shape[0], words, WORD_BITS)
        value = (stream << word_shifts).sum(-1)  # unsigned 32-bit value in an int64
        out[r0 : r0 + step] = torch.where(value >= 1 << 31, value - (1 << 32), value).to(torch.int32)
    return out.reshape(*codes.shape[:-1], words)


def unpack(packed: torch.Tensor, bits: int, n: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words ``(..., w)`` to uint8 codes ``(..., n)`` (``n`` defaults to all)."""
    check_bits(bits)
    if packed.dtype != torch.int32:
        raise DTypeError(f"unpack expects int32 packed words, got {packed.dtype}.")
    total = packed.shape[-1] * WORD_BITS // bits
    if n is None:
        n = total
    if n != total:
        raise ShapeError(f"{packed.shape[-1]} words hold {total} {bits}-bit codes, not {n}.")
    flat = packed.reshape(-1, packed.shape[-1])
    out = torch.empty(flat.shape[0], n, dtype=torch.uint8, device=packed.device)
    word_shifts = torch.arange(WORD_BITS, device=packed.device, dtype=torch.int32)
    shifts = torch.arange(bits, device=packed.device, dtype=torch.int32)
    step = _row_chunks(flat.shape[0], n * bits // 2).step  # int32 temporaries: half the int64 budget's bytes
    for r0 in range(0, flat.shape[0], step):
        w = flat[r0 : r0 + step]
        stream = (w.unsqueeze(-1) >> word_shifts) & 1  # (rows, w, 32)
        stream = stream.reshape(w.shape[0], n, bits)
        out[r0 : r0 + step] = (stream << shifts).sum(-1).to(torch.uint8)
    return out.reshape(*packed.shape[:-1], n)


def packed_nbytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes used by one packed matrix: codes plus fp16 scale and zero per group."""
    groups = in_features // group_size
    return out_features * packed_words(in_features, bits) * 4 + 2 * 2 * out_features * groups


def ideal_nbytes(out_features: int, in_features: int, bits: int, group_size: int) -> float:
    """The information-theoretic size: n * b / 8 bytes plus two 16-bit numbers per group."""
    n = out_features * in_features
    return n * bits / 8 + 2 * 2 * out_features * (in_features // group_size)
