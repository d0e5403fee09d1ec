"""Read an MC folder without loading the model: allocation table, size breakdown, allocation heatmap."""

from __future__ import annotations

import json
from pathlib import Path

from ..allocation import format_allocation_table
from ..bitwidths import split
from ..checkpoint import expert_stored_bits, size_groups
from ..config import MCConfig


def stored_quantization(path: str | Path) -> dict | None:
    """The ``quantization_config`` of a local model folder's config.json (None: not quantized, or unreadable)."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return qc if isinstance(qc, dict) else None


def load_quant_config(path: str | Path) -> MCConfig | None:
    """The MCConfig stored in a model folder's config.json (None if it is not an MC model)."""
    qc = stored_quantization(path)
    if not qc or qc.get("quant_method") != "mc":
        return None
    return MCConfig.from_dict(qc)


def allocation_table(cfg: MCConfig) -> str:
    """Per-layer bit table of the experts."""
    widths = sorted({w for r in cfg.expert_bits for b in r for w in split(b)})
    return format_allocation_table(cfg.expert_bits, cfg.moe_layers, widths)


def size_breakdown(path: str | Path, cfg: MCConfig) -> str:
    """Bytes of experts / quantized linears / float parts, with bits per weight including scales and zeros."""
    groups = size_groups(path, cfg)
    lines = ["part | MB | weights | bits/weight", "--- | --- | --- | ---"]
    total_b = total_n = 0
    for name, (b, n) in groups.items():
        total_b, total_n = total_b + b, total_n + n
        bpw = f"{8 * b / n:.2f}" if n else "-"
        lines.append(f"{name} | {b / 2**20:.2f} | {n:,} | {bpw}")
    lines.append(f"total | {total_b / 2**20:.2f} | {total_n:,} | {8 * total_b / max(total_n, 1):.2f}")
    per_weight = expert_stored_bits(path, cfg)
    if per_weight is not None:
        stored, code = per_weight
        meta = f"scales/zeros {stored - code:.4f}; target bits={cfg.bits} counts {cfg.bits_budget}"
        lines.append(f"\nstored bits per expert weight: {stored:.4f} (codes {code:.4f} + {meta})")
    return "\n".join(lines)


def plot_allocation(cfg: MCConfig, out: str) -> None:
    """Heatmap of bits per (MoE layer, expert), written to ``out`` (PNG); needs matplotlib (extra "plots")."""
    from .plots import plot_allocation as plot

    if plot(cfg.expert_bits, cfg.moe_layers, out) is None:
        from ..errors import MCError

        raise MCError("plotting needs matplotlib: pip install 'optimum-mc[plots]'")
