"""The canonical packed layout: exact round trips, the documented bit order, storage size, bad input."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_mc.errors import DTypeError, ShapeError, UnsupportedBitsError
from optimum_mc.packing import SUPPORTED_BITS, ideal_nbytes, pack, packed_nbytes, unpack


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from(SUPPORTED_BITS),
    rows=st.integers(1, 9),
    words=st.integers(1, 6),
    lead=st.integers(0, 2),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, rows, words, lead, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (*([2] * lead), rows, 32 * words)
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (*shape[:-1], 32 * words * bits // 32)
    assert torch.equal(unpack(packed, bits).long(), codes)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_bit_order_is_little_endian_stream(bits):
    codes = torch.randint(0, 1 << bits, (3, 64), generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    words = [int(w) & 0xFFFFFFFF for w in packed[1]]
    stream = sum(w << (32 * i) for i, w in enumerate(words))
    for i, c in enumerate(codes[1].tolist()):
        assert (stream >> (i * bits)) & ((1 << bits) - 1) == c


def test_three_bit_codes_straddle_words():
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 0b111  # bits 30, 31, 32: crosses from word 0 into word 1
    packed = pack(codes, 3)
    assert int(packed[0, 0]) & 0xFFFFFFFF == 0b11 << 30
    assert int(packed[0, 1]) == 1


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape,group", [((256, 512), 128), ((512, 256), 128), ((4096, 14336), 128), ((64, 64), 32)])
def test_storage_within_two_percent_of_ideal(bits, shape, group):
    assert packed_nbytes(*shape, bits, group) <= 1.02 * ideal_nbytes(*shape, bits, group)


def test_bad_input_errors():
    with pytest.raises(UnsupportedBitsError, match="choose one of"):
        pack(torch.zeros(1, 32, dtype=torch.long), 5)
    with pytest.raises(ShapeError, match="multiple of 32"):
        pack(torch.zeros(1, 30, dtype=torch.long), 2)
    with pytest.raises(DTypeError):
        pack(torch.zeros(1, 32), 2)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack(torch.full((1, 32), 4), 2)
    with pytest.raises(DTypeError):
        unpack(torch.zeros(1, 2, dtype=torch.int64), 2)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_chunked_packing_equals_one_piece(bits, monkeypatch):
    """Packing / unpacking in row chunks (bounded bit-stream temporaries) gives the same words and codes."""
    import optimum_mc.packing as packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 7, 64), generator=g, dtype=torch.uint8)
    whole = packing.pack(codes, bits)
    monkeypatch.setattr(packing, "_STREAM_ELEMENTS", 64 * bits * 2)  # two rows per chunk: 11 chunks
    chunked = packing.pack(codes, bits)
    assert torch.equal(chunked, whole)
    assert torch.equal(packing.unpack(chunked, bits), codes)
