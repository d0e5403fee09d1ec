"""Per-projection allocation (``MCConfig(allocation_granularity="projection")``): the weighted knapsack against brute
force, the ``[gate_up, down]`` width form, the fused op with 2E widths, and the pipeline end to end."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from helpers.moe import random_routing
from safetensors import safe_open
from test_quantize_e2e import IDS, logits, quantize
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from optimum_mc import MCConfig
from optimum_mc.allocation import ExpertFactors, allocate_bits, format_allocation_table, objective_costs, required_bits
from optimum_mc.bitwidths import from_op_bits, join, label, mean_bits, op_bits, split
from optimum_mc.errors import CheckpointError, CheckpointVersionError, MCConfigError, ShapeError
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels import cpu, moe
from optimum_mc.kernels.reference import dequantize_reference, moe_reference
from optimum_mc.nn import MCExperts
from optimum_mc.packing import pack

EXPONENTS = dict(alpha=1.0, beta=1.5, gamma=1.0)


def projection_factors(num_experts: int, cb, seed: int, down_scale: float = 1.0) -> ExpertFactors:
    gen = torch.Generator().manual_seed(seed)
    freq = torch.rand(num_experts, generator=gen).pow(2) + 1e-3
    mass = freq * (0.5 + torch.rand(num_experts, generator=gen))
    widths = torch.tensor(sorted(cb), dtype=torch.float32)
    proj = torch.exp(torch.randn(num_experts, 2, 1, generator=gen)) * 2.0 ** (-widths)
    proj = proj * (0.8 + 0.4 * torch.rand(num_experts, 2, len(cb), generator=gen))
    proj[:, 1] *= down_scale
    return ExpertFactors(freq, mass, proj.sum(1), projection_loss=proj)


def brute_force(factors: list[ExpertFactors], cb, target: float, constraints: bool, per_layer: bool):
    """Cheapest per-projection allocation: the largest reachable weighted total <= the budget, then min cost."""
    cb = sorted(cb)
    req = required_bits(cb, constraints)
    costs = [
        np.concatenate(
            [
                objective_costs(ExpertFactors(f.frequency, f.weight_mass, f.projection_loss[:, k]), **EXPONENTS)
                for k in (0, 1)
            ]
        )  # fmt: skip
        for f in factors
    ]
    sizes = [f.num_experts for f in factors]
    budgets = [int(np.floor(target * 3 * n + 1e-9)) for n in sizes]
    results = {}  # total -> best cost
    for choice in itertools.product(range(len(cb)), repeat=2 * sum(sizes)):
        start, totals, cost, ok = 0, [], 0.0, True
        for c, n in zip(costs, sizes):
            j = choice[start : start + 2 * n]
            widths = [cb[i] for i in j]
            if any(r not in widths for r in req):
                ok = False
                break
            totals.append(2 * sum(widths[:n]) + sum(widths[n:]))
            cost += float(c[np.arange(2 * n), list(j)].sum())
            start += 2 * n
        if not ok:
            continue
        if per_layer:
            if any(t > b for t, b in zip(totals, budgets)):
                continue
            key = tuple(totals)
        else:
            if sum(totals) > int(np.floor(target * 3 * sum(sizes) + 1e-9)):
                continue
            key = sum(totals)
        results[key] = min(results.get(key, np.inf), cost)
    best_key = max(results, key=lambda k: sum(k) if per_layer else k)
    return best_key, results[best_key]


def cost_of(bits, factors):
    cb_costs = 0.0
    for row, f in zip(bits, factors):
        for k, part in enumerate((0, 1)):
            c = objective_costs(ExpertFactors(f.frequency, f.weight_mass, f.projection_loss[:, part]), **EXPONENTS)
            cb_costs += sum(c[e, [1, 2, 3].index(split(b)[k])] for e, b in enumerate(row))
    return cb_costs


@pytest.mark.parametrize("target,constraints", [(2.5, True), (2.0, True), (1.75, False), (2.34, True)])
@pytest.mark.parametrize("solver", ["dp", "cp-sat"])
def test_layer_mode_equals_brute_force(target, constraints, solver):
    for seed in range(2):
        factors = [projection_factors(3, [1, 2, 3], seed)]
        bits = allocate_bits(factors, [1, 2, 3], target, "layer", constraints=constraints, solver=solver,
                             granularity="projection", **EXPONENTS)  # fmt: skip
        key, best = brute_force(factors, [1, 2, 3], target, constraints, per_layer=True)
        assert sum(3 * mean_bits(b) for b in bits[0]) == pytest.approx(key[0])
        assert cost_of(bits, factors) == pytest.approx(best, rel=1e-9)


def test_global_mode_equals_brute_force():
    factors = [projection_factors(2, [1, 2, 3], 5), projection_factors(2, [1, 2, 3], 6)]
    bits = allocate_bits(factors, [1, 2, 3], 2.5, "global", granularity="projection", **EXPONENTS)
    key, best = brute_force(factors, [1, 2, 3], 2.5, True, per_layer=False)
    assert sum(3 * mean_bits(b) for row in bits for b in row) == pytest.approx(key)
    assert cost_of(bits, factors) == pytest.approx(best, rel=1e-9)


def test_the_more_sensitive_projection_gets_the_bits():
    """With down matrices 50x more sensitive, every down matrix gets at least its gate/up matrix's width, and the
    average over weights is still exactly the target."""
    f = projection_factors(8, [1, 2, 3], 0, down_scale=50.0)
    (bits,) = allocate_bits([f], [1, 2, 3], 2.5, "layer", granularity="projection", **EXPONENTS)
    assert all(split(b)[1] >= split(b)[0] for b in bits)
    assert any(isinstance(b, list) for b in bits)
    assert np.mean([mean_bits(b) for b in bits]) == pytest.approx(2.5)
    # the expert-level program over the same factors cannot split an expert
    (whole,) = allocate_bits([f], [1, 2, 3], 2.5, "layer", **EXPONENTS)
    assert all(isinstance(b, int) for b in whole)


def test_projection_granularity_errors():
    f = projection_factors(4, [1, 2, 3], 0)
    with pytest.raises(MCConfigError, match="needs allocation 'layer' or 'global'"):
        allocate_bits([f], [1, 2, 3], 2.5, "frequency", granularity="projection")
    with pytest.raises(MCConfigError, match="allocation_granularity must be one of"):
        allocate_bits([f], [1, 2, 3], 2.5, "layer", granularity="matrix")
    bare = ExpertFactors(f.frequency, f.weight_mass, f.loss)
    with pytest.raises(ShapeError, match="projection_loss"):
        allocate_bits([bare], [1, 2, 3], 2.5, "layer", granularity="projection")
    with pytest.raises(MCConfigError, match="loss_method='rtn'"):
        MCConfig(allocation_granularity="projection", loss_method="heldout")
    with pytest.raises(MCConfigError, match="needs allocation 'layer' or 'global'"):
        MCConfig(allocation_granularity="projection", allocation="random")
    with pytest.raises(MCConfigError, match="allocation_granularity must be one of"):
        MCConfig(allocation_granularity="tensor")


def test_width_forms():
    assert split(3) == (3, 3) and split([2, 3]) == (2, 3) and split((1, 2)) == (1, 2)
    assert join(2, 2) == 2 and join(2, 3) == [2, 3]
    assert mean_bits([2, 3]) == pytest.approx(7 / 3) and mean_bits(2) == 2
    assert label([1, 3]) == "1/3" and label(4) == "4"
    assert op_bits([2, 3, 1]) == [2, 3, 1]
    assert op_bits([2, [2, 3], 1]) == [2, 2, 1, 2, 3, 1]
    assert from_op_bits([2, 2, 1, 2, 3, 1], 3) == ([2, 2, 1], [2, 3, 1])
    for bad in (True, [2], [2, 3, 4], "3", [2.0, 3]):
        with pytest.raises(CheckpointError):
            split(bad)
    with pytest.raises(ShapeError):
        from_op_bits([1, 2, 3], 2)
    table = format_allocation_table([[3, [2, 3], 1, [3, 1]]], [0], [1, 2, 3])
    assert "3213 / 3311" in table and "2.167" in table.splitlines()[2]


GU_BITS, DN_BITS = [1, 2, 3, 4, 2, 3], [3, 2, 4, 1, 8, 2]


def _split_experts(hidden=128, inter=96, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate_up, down = [], []
    for bg, bd in zip(GU_BITS, DN_BITS):
        q, s, z = rtn_quantize(torch.randn(2 * inter, hidden, generator=g) * 0.1, bg, group)
        gate_up.append((pack(q, bg), s, z))
        q, s, z = rtn_quantize(torch.randn(hidden, inter, generator=g) * 0.1, bd, group)
        down.append((pack(q, bd), s, z))
    return gate_up, down


def _dense_oracle(x, idx, w, gate_up, down):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e >= len(gate_up):
                continue
            wg = dequantize_reference(*gate_up[e], GU_BITS[e], torch.float64)
            wd = dequantize_reference(*down[e], DN_BITS[e], torch.float64)
            gate, up = (x[t].double() @ wg.t()).chunk(2)
            out[t] += w[t, k].double() * (torch.nn.functional.silu(gate) * up @ wd.t())
    return out


@pytest.mark.parametrize("tokens", [1, cpu.GEMV_MAX_ROWS, 40])
def test_fused_op_reads_each_projection_at_its_width(tokens):
    gate_up, down = _split_experts()
    idx, w = random_routing(tokens, len(GU_BITS), skew=tokens == 40)
    idx[0, 1] = len(GU_BITS)  # dropped by ODP
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(3))
    bits = GU_BITS + DN_BITS
    oracle = _dense_oracle(x, idx, w, gate_up, down)
    ref = moe_reference(x, idx, w, gate_up, down, bits, "silu")
    got = moe(x, idx, w, gate_up, down, bits, "silu")
    scale = oracle.abs().max().item()
    torch.testing.assert_close(ref.double(), oracle, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(got.double(), oracle, rtol=1e-5, atol=1e-5 * scale)
    with pytest.raises(ShapeError):  # a width list that is neither E nor 2E long
        moe(x, idx, w, gate_up, down, bits[:-1], "silu")


def test_mcexperts_with_projection_widths_match_their_per_expert_path():
    torch.manual_seed(0)
    ex = MCExperts(6, 128, 96, [join(g, d) for g, d in zip(GU_BITS, DN_BITS)], 32, torch.nn.functional.silu,
                   torch.float32)  # fmt: skip
    gate_up, down = _split_experts()
    for e in range(6):
        ex.packed[e].gate_up.set_codes(*rtn_quantize(dequantize_reference(*gate_up[e], GU_BITS[e], torch.float32),
                                                     GU_BITS[e], 32))  # fmt: skip
        ex.packed[e].down.set_codes(*rtn_quantize(dequantize_reference(*down[e], DN_BITS[e], torch.float32),
                                                  DN_BITS[e], 32))  # fmt: skip
    assert ex.op_bits == GU_BITS + DN_BITS
    assert [ex.packed[e].down.bits for e in range(6)] == DN_BITS
    for tokens in (1, 5, 40):
        idx, w = random_routing(tokens, 6)
        x = torch.randn(tokens, 128)
        with torch.no_grad():
            torch.testing.assert_close(ex(x, idx, w), ex.forward_per_expert(x, idx, w), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("mixtral-proj"))


def test_pipeline_allocates_per_projection_and_round_trips(mixtral_dir, tmp_path, monkeypatch):
    model = quantize(mixtral_dir, allocation_granularity="projection")
    qc = model.config.quantization_config
    for bits, f in zip(qc.expert_bits, qc.expert_factors):
        assert np.mean([mean_bits(b) for b in bits]) == pytest.approx(2.5)  # budget per weight, exactly
        assert torch.tensor(f["projection_loss"]).shape == (len(bits), 2, 3)
    layer = model.model.layers[0].mlp.experts
    assert isinstance(layer, MCExperts)
    for p, b in zip(layer.packed, qc.expert_bits[0]):
        assert (p.gate_up.bits, p.down.bits) == split(b)
    model.save_pretrained(tmp_path / "q")
    # per-projection widths need checkpoint format 2, in config.json and in the shard metadata
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["format_version"] == 2
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["mc_format_version"] == "2"
    card = (tmp_path / "q" / "README.md").read_text()
    assert "bits per expert, gate/up / down" in card and "checkpoint format 2" in card
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.expert_bits == qc.expert_bits
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd if k.endswith((".zeros", ".scales", ".qweight")))
    assert torch.equal(logits(again), logits(model))
    # deterministic: the same run gives the same widths and bytes
    twin = quantize(mixtral_dir, allocation_granularity="projection")
    assert twin.config.quantization_config.expert_bits == qc.expert_bits
    sd3 = twin.state_dict()
    assert all(torch.equal(sd[k], sd3[k]) for k in sd if k.endswith((".zeros", ".scales", ".qweight")))
    assert logits(model, IDS).isfinite().all()
    # an optimum-mc that reads only format 1 refuses it and says to upgrade
    monkeypatch.setattr("optimum_mc.config.FORMAT_VERSION", 1)
    with pytest.raises(CheckpointVersionError, match="upgrade"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_global_projection_allocation_keeps_the_total_budget(mixtral_dir):
    qc = quantize(mixtral_dir, allocation="global", allocation_granularity="projection").config.quantization_config
    flat = [mean_bits(b) for row in qc.expert_bits for b in row]
    assert np.mean(flat) == pytest.approx(2.5)
