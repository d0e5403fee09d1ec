"""PMQ bit allocation: each expert's bit-width under an average-bits budget, as an integer program (OR-Tools).

Objective (MC, Huang et al., ICLR 2025). With binary ``x[e, b]`` (expert ``e`` gets candidate width ``b``)::

    minimize  sum_e sum_b  x[e, b] * phi_e^alpha * w_e^beta * eps(e, b)^gamma
    s.t.      sum_b x[e, b] = 1                      (one width per expert)
              sum_e sum_b b * x[e, b] = T            (the bit budget, see below)
              sum_e x[e, top] >= 1, sum_e x[e, second] >= 1   per layer   (optional "constraints")

``phi`` is the activation frequency and ``w`` the routing-weight mass, both normalized to sum 1 per layer (as the
reference implementation's ``norm_experts``), and ``eps(e, b)`` the block-output loss when only ``e`` is quantized
at ``b`` bits. ``top`` / ``second`` are the highest and second-highest candidate widths (with two candidates only
the top one is required; with one candidate the allocation is uniform).

Budget. The paper writes ``sum bits <= budget``; here the total is pinned to ``T``, the largest total the
candidate widths (and constraints) can reach without exceeding ``floor(target * E + 1e-9)``, so the average is
exactly the target whenever it is reachable and no bits are left unused when an extra bit would not lower the
measured loss.

Solvers. The program is a multiple-choice knapsack (plus the required-width constraints). ``solve_dp`` solves it
exactly by dynamic programming: per layer over (experts, exact bit total, which required widths are used yet),
then a min-plus convolution over the layers' totals for the global mode; float64 costs, first-found ties; O(E *
T * C * 4) per layer (milliseconds for 256 experts). OR-Tools CP-SAT is the solver of record
(``allocation_solver="cp-sat"``, the default): it receives the DP optimum as a hint and proves it (or improves
it on its integer-scaled costs) with a single worker and fixed seed (deterministic); a stop at the time limit
before proof is logged and reported (:class:`SolveReport`). Costs are made integral for CP-SAT: each expert's row
is shifted by its minimum (a per-expert constant, so the argmin is unchanged) and scaled so the largest shifted
cost is about 1e12 (smaller differences become ties, which the hint resolves). CP-SAT's presolve is disabled: it
turns this knapsack into a form whose LP bound is weak. ``allocation_solver="dp"`` skips CP-SAT.

Modes. "layer": one program per MoE layer with budget ``floor(target * E_l)``; "global": one program over all
layers with budget ``floor(target * sum_l E_l)`` and the constraints still per layer. Baselines at the per-layer
budget: "random" — experts visited in a seeded random order, each takes a uniformly random width among those that
keep the exact total and the constraints reachable; "frequency" — the same program with ``w`` dropped and the
loss replaced by ``2^-b``, i.e. cost ``phi_e * 2^-b``: a more frequent expert never gets fewer bits than a less
frequent one (swapping their widths would lower the cost), and nothing but frequency matters; "hessian" — the
paper's Hessian-based competitor (HAWQ-style): the cost is ``loss`` itself, which the pipeline fills with the
Hessian-trace importance ``tr(H) / n * ||W - Q_b(W)||^2`` summed over the expert's matrices
(:func:`~optimum_mc.calibration.factors.hessian_trace_loss`).

Granularity. ``granularity="projection"`` (modes "layer" / "global") splits every expert into two items, its gate/up
matrix (2 weight units: 2/3 of its weights) and its down matrix (1 unit), each with its own loss (that projection
alone quantized); the budget is ``floor(target * 3E)`` units and the required widths apply to the items. The same
DP (item sizes ``units * b``) and CP-SAT program solve it.

Exponents. The paper's cost is ``phi * w^1.5 * eps`` with ``eps`` an un-squared Frobenius norm, i.e. alpha=1,
beta=1.5, gamma=1 (the defaults; with them, the authors' released factor files give their released allocations).
"""

from .dp import reachable_totals, solve_dp
from .feasibility import check_feasible, layer_budget, max_total_bits, required_bits
from .objective import GRANULARITIES, MODES, SOLVERS, ExpertFactors, allocation_cost, objective_costs
from .solve import SolveReport, allocate_bits
from .table import format_allocation_table

__all__ = [
    "GRANULARITIES",
    "MODES",
    "SOLVERS",
    "ExpertFactors",
    "SolveReport",
    "allocate_bits",
    "allocation_cost",
    "check_feasible",
    "format_allocation_table",
    "layer_budget",
    "max_total_bits",
    "objective_costs",
    "reachable_totals",
    "required_bits",
    "solve_dp",
]
