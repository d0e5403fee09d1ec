"""A readable table of an allocation (logged after quantizing; ``optimum-cli mc inspect``)."""

from __future__ import annotations

import numpy as np

from ..bitwidths import ExpertBits, mean_bits, split


def format_allocation_table(
    bits_per_layer: list[list[ExpertBits]], layer_indices: list[int], candidate_bits: list[int]
) -> str:
    """A readable per-layer table: each expert's width (one digit per expert, in groups of 8; with per-projection
    widths the gate/up digits, then ``/`` and the down digits), how many matrices got each width, and the layer's
    average bits per weight; then the overall average."""
    cb = sorted(candidate_bits)
    rows = []
    for idx, bits in zip(layer_indices, bits_per_layer):
        pairs = [split(b) for b in bits]
        parts = [[p[0] for p in pairs]] + ([[p[1] for p in pairs]] if any(g != d for g, d in pairs) else [])
        digits = ["".join(str(b) for b in part) for part in parts]
        packed = " / ".join(" ".join(d[i : i + 8] for i in range(0, len(d), 8)) for d in digits)
        widths = [w for part in parts for w in part]
        counts = " ".join(f"{widths.count(b):>4d}" for b in cb)
        rows.append((f"{idx:>5d}", packed, counts, f"{np.mean([mean_bits(b) for b in bits]):.3f}" if bits else "-"))
    width = max([len(r[1]) for r in rows] + [len("experts (e0, e1, ...)")])
    head = f"layer | {'experts (e0, e1, ...)':<{width}} | " + " ".join(f"{f'#{b}b':>4s}" for b in cb) + " |   avg"
    lines = [head, "-" * len(head)]
    lines += [f"{a} | {b:<{width}} | {c} | {d:>5s}" for a, b, c, d in rows]
    total = [mean_bits(b) for layer in bits_per_layer for b in layer]
    lines.append(f"overall average expert bits: {np.mean(total):.3f}" if total else "no MoE layers")
    if any(isinstance(b, list) for layer in bits_per_layer for b in layer):
        lines.append("(per-projection widths: gate/up digits / down digits; averages per weight, gate/up counts 2x)")
    return "\n".join(lines)
