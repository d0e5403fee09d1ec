"""The results of one MC run, in one dataclass, and the one place they are written into ``MCConfig`` (and from
there config.json). ODP thresholds are added to the config later, by ODP calibration on the packed model."""

from __future__ import annotations

from dataclasses import dataclass, field

from .allocation import SolveReport, format_allocation_table
from .bitwidths import ExpertBits, join, split
from .config import MCConfig
from .pmq import PMQ, LayerFactors


@dataclass
class MCResults:
    """What a run chose and measured: per MoE layer its experts' widths and factors; every quantized linear's
    width; the solver reports; the run's wall time and calibration size."""

    moe_layers: list[int]
    expert_bits: list[list[ExpertBits]]
    linear_bits: dict[str, int]
    factors: list[LayerFactors]
    tuned_exponents: list[list[float]] | None = None
    solve_reports: list[SolveReport] = field(default_factory=list)
    seconds: float = 0.0
    calibration_tokens: int = 0

    @classmethod
    def collect(cls, pmq: PMQ, linear_bits: dict[str, int]) -> MCResults:
        layers = list(pmq.moe_layers)
        return cls(
            moe_layers=layers,
            expert_bits=[[join(*split(b)) for b in pmq.bits[i]] for i in layers],
            linear_bits=dict(sorted(linear_bits.items())),
            factors=[pmq.factors[i] for i in layers],
            tuned_exponents=[pmq.tuned[i] for i in layers] if pmq.tuned else None,
            solve_reports=list(pmq.solve_reports),
        )

    def store(self, config: MCConfig) -> None:
        """Fill the result fields of ``config`` (what config.json records and a reload rebuilds from)."""
        config.moe_layers = list(self.moe_layers)
        config.expert_bits = [list(b) for b in self.expert_bits]
        config.linear_bits = dict(self.linear_bits)
        config.tuned_exponents = self.tuned_exponents
        config.expert_factors = [factors_dict(lf) for lf in self.factors]

    def allocation_table(self, candidate_bits: list[int]) -> str:
        return format_allocation_table(self.expert_bits, self.moe_layers, candidate_bits)

    def summary(self) -> dict:
        """Timing and solver figures (benchmarks write them to JSON)."""
        return {
            "seconds": self.seconds,
            "calibration_tokens": self.calibration_tokens,
            "allocation": [vars(r) for r in self.solve_reports],
        }


def factors_dict(lf: LayerFactors) -> dict:
    """A layer's factors as config.json stores them (rounded: for reading, not for resuming)."""
    f = lf.factors
    proj = {}
    if f.projection_loss is not None:  # per-projection allocation only; absent otherwise
        proj = {
            "projection_loss": [[[float(f"{v:.6g}") for v in p] for p in row] for row in f.projection_loss.tolist()]
        }
    return {
        "frequency": [round(float(v), 6) for v in f.frequency],
        "weight_mass": [round(float(v), 6) for v in f.weight_mass],
        "loss": [[float(f"{v:.6g}") for v in row] for row in f.loss.tolist()],
        **proj,
        "method": list(lf.methods),
    }
