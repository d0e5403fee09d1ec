"""The allocation heatmap (``optimum-mc inspect --plot``, the demo): bits per (MoE layer, expert), read at a glance.

One colour per whole bit-width (1, 2, 3, 4, 8: far apart, so 2 and 3 bits never look alike), the width written in
every cell, the average expert bits in the title. Cells have a fixed size in inches and text a fixed size in points,
so a 32-expert layer stays as legible as an 8-expert one. Needs matplotlib (the ``plots`` extra).
"""

from __future__ import annotations

from pathlib import Path

from ..bitwidths import ExpertBits, label, mean_bits

# whole bit-width -> (cell colour, text colour); colour-blind-safe hues far apart in lightness and hue
COLOURS = {
    1: ("#b2182b", "white"),
    2: ("#f4a582", "black"),
    3: ("#92c5de", "black"),
    4: ("#2166ac", "white"),
    8: ("#1a1a1a", "white"),
}
CELL_INCHES = (0.42, 0.36)  # width, height of one (layer, expert) cell
FONT_POINTS = 9
DPI = 110


def plot_allocation(expert_bits: list[list[ExpertBits]], moe_layers: list[int], path: str | Path) -> Path | None:
    """Write the heatmap of ``expert_bits`` (one row per MoE layer) to ``path`` (PNG); None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import BoundaryNorm, ListedColormap
        from matplotlib.figure import Figure
    except ImportError:
        return None
    bits = [[mean_bits(b) for b in row] for row in expert_bits]
    rows, cols = len(bits), max(len(r) for r in bits)
    widths = sorted(COLOURS)
    cmap = ListedColormap([COLOURS[w][0] for w in widths])
    norm = BoundaryNorm([w - 0.5 for w in widths] + [widths[-1] + 0.5], cmap.N)  # per-projection means: nearest
    fig = Figure(figsize=(max(4.5, 1.6 + CELL_INCHES[0] * cols), max(2.4, 1.3 + CELL_INCHES[1] * rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    grid = [r + [float("nan")] * (cols - len(r)) for r in bits]
    ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for i, row in enumerate(expert_bits):
        for j, b in enumerate(row):
            text_colour = COLOURS[min(widths, key=lambda w: abs(w - bits[i][j]))][1]
            ax.text(j, i, label(b), ha="center", va="center", color=text_colour, fontsize=FONT_POINTS)
    step = 1 if cols <= 16 else 4
    ax.set_xticks(range(0, cols, step))
    ax.set_yticks(range(rows), [str(i) for i in moe_layers])
    ax.tick_params(labelsize=FONT_POINTS)
    ax.set_xlabel("expert", fontsize=FONT_POINTS + 1)
    ax.set_ylabel("MoE layer", fontsize=FONT_POINTS + 1)
    flat = [b for r in bits for b in r]
    ax.set_title(f"MC bits per expert: {sum(flat) / len(flat):.2f} on average", fontsize=FONT_POINTS + 3)
    used = sorted({min(widths, key=lambda w: abs(w - b)) for b in flat})
    handles = [_patch(COLOURS[w][0], f"{w} bit{'s' * (w > 1)}") for w in used]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=FONT_POINTS)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def _patch(colour: str, text: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=colour, edgecolor="none", label=text)
