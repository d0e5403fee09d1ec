"""The kernel contract (docs/kernels.md): every schema in kernels/ops.py, ODP inside ``optimum_mc::moe`` (drops and
counts exactly what the torch rule does, compiles without a graph break), and no code outside ``optimum_mc/kernels``
reaching past the package's exports into kernel internals."""

from __future__ import annotations

import ast
import gc
import weakref
from pathlib import Path

import pytest
import torch
from helpers.moe import BITS, random_experts, random_routing, tolerance
from tiny_models import tiny_model

import optimum_mc
from optimum_mc.architectures import moe_blocks
from optimum_mc.kernels import cpu, moe_cpu, moe_op, ops
from optimum_mc.kernels.reference import moe_default, moe_reference
from optimum_mc.pruning.rule import apply_drop, count_routing, drop_mask

PACKAGE = Path(optimum_mc.__file__).parent
# what code outside optimum_mc/kernels may import: the package's exports, the activation functions and ODP's rule
PUBLIC = {"optimum_mc.kernels", "optimum_mc.kernels.activations", "optimum_mc.kernels.odp_rule"}


def _lists(gate_up, down):
    return [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]


def _old_path(x, idx, w, gate_up, down, threshold, experts):
    """What the experts did before ODP was an argument of the op: the rule and the counts as torch ops
    (pruning/rule.py), then the reference on the pruned routing."""
    counts = torch.zeros(experts + 3, dtype=torch.int64)
    if threshold > 0:
        idx, w = apply_drop(idx, w, drop_mask(w, threshold), experts)
    count_routing(counts, idx, None, experts)
    return moe_reference(x, idx, w, gate_up, down, BITS, "silu"), counts


def test_every_schema_is_defined_in_ops():
    for name in ops.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"optimum_mc::{name}", "CompositeExplicitAutograd")
    src = "\n".join(p.read_text() for p in (PACKAGE / "kernels").glob("*.py") if p.name != "ops.py")
    assert "custom_op(" not in src and ".define(" not in src  # no schema written anywhere else


@pytest.mark.parametrize("weights_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 40])  # C decode kernel (rule inside it for fp32 weights); grouped prefill
@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.9])
def test_odp_op_drops_and_counts_what_the_torch_rule_does(threshold, tokens, weights_dtype):
    e = len(BITS)
    gate_up, down = random_experts(BITS)
    idx, w = random_routing(tokens, e, k=3, seed=tokens)
    w = w.to(weights_dtype)
    idx[0, 2] = e  # a slot already dropped upstream stays dropped and is counted as such
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
    want, want_counts = _old_path(x, idx, w, gate_up, down, threshold, e)
    for run in (moe_op, moe_default):  # the registered CPU kernel and the pure-torch default
        counts = torch.zeros(e + 3, dtype=torch.int64)
        got = run(x, idx, w, *_lists(gate_up, down), BITS, "silu", "float", None, None, threshold, counts)
        assert torch.equal(counts, want_counts), run
        torch.testing.assert_close(got, want, **tolerance(want, torch.float32, tokens > 12))
    assert int(want_counts[e + 2]) == tokens and int(want_counts[: e + 1].sum()) == 3 * tokens


def test_odp_op_with_counts_only_changes_nothing_but_the_counts():
    gate_up, down = random_experts(BITS)
    idx, w = random_routing(3, len(BITS), seed=2)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    counts = torch.zeros(len(BITS) + 3, dtype=torch.int64)
    plain = moe_op(x, idx, w, *_lists(gate_up, down), BITS, "silu")
    got = moe_op(x, idx, w, *_lists(gate_up, down), BITS, "silu", "float", None, None, 0.0, counts)
    assert torch.equal(got, plain)
    assert int(counts.sum()) == idx.numel() + 3


def _odp_experts():
    from helpers.moe import quantized_blocks

    from optimum_mc.pruning import set_odp

    model = quantized_blocks(tiny_model("mixtral")).eval()
    set_odp(model, True, threshold=0.8, layers=2)
    experts = next(b.experts for b in moe_blocks(model) if b.experts.odp is not None and b.experts.odp.enabled)
    return model, experts


def test_mcexperts_with_odp_compiles_without_graph_breaks():
    model, experts = _odp_experts()
    st = experts.odp
    idx, w = random_routing(4, experts.num_experts, seed=7)
    w = w.float()
    x = torch.randn(4, experts.hidden_dim, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        st.counts = None  # fresh counters
        eager = experts(x, idx, w)
        eager_counts = st.counts.clone()
        st.counts.zero_()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(experts)(x, idx, w)
        assert explained.graph_break_count == 0, explained.break_reasons
        st.counts.zero_()
        compiled = torch.compile(experts, fullgraph=True)(x, idx, w)
    assert torch.equal(compiled, eager)
    assert torch.equal(st.counts, eager_counts)  # the op's in-place counting survives functionalization
    assert int(eager_counts[experts.num_experts]) > 0  # the rule dropped something


@pytest.mark.skipif(cpu.library() is None, reason="C kernels unavailable")
def test_decode_plan_is_cached_in_the_backend_and_holds_no_buffer():
    gate_up, down = random_experts(BITS)
    lists = _lists(gate_up, down)
    plan = moe_cpu.decode_plan(tuple(lists), BITS, "silu")
    assert plan.ok and moe_cpu.decode_plan(tuple(lists), BITS, "silu") is plan  # reused while the buffers are
    key, ref = id(lists[0][0]), weakref.ref(lists[0][0])
    del gate_up, down, lists
    gc.collect()
    assert ref() is None and key not in moe_cpu._PLANS  # the plan let the buffers go and left with them


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in a module of the package, relative imports resolved."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, mod))
            found += [(node.lineno, f"{mod}.{a.name}") for a in node.names]  # from ..kernels import cpu
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return found


def test_no_module_outside_kernels_reaches_kernel_internals():
    exported = set(__import__("optimum_mc.kernels", fromlist=["__all__"]).__all__)
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "kernels") in path.parents:
            continue
        text = path.read_text()
        if "torch.ops.optimum_mc" in text:
            bad.append(f"{path.relative_to(PACKAGE)}: calls torch.ops.optimum_mc (use the kernels entry points)")
        for line, mod in _imports(path):
            if not mod.startswith("optimum_mc.kernels") or mod in PUBLIC:
                continue
            name = mod.rsplit(".", 1)[1]
            if mod.count(".") == 2 and name in exported:  # from optimum_mc.kernels import <exported name>
                continue
            if any(mod.startswith(p + ".") for p in PUBLIC - {"optimum_mc.kernels"}):  # names of a public module
                continue
            bad.append(f"{path.relative_to(PACKAGE)}:{line}: imports {mod}")
    assert not bad, "\n".join(bad)


TRITON_ODP_CHECK = r"""
import torch
from helpers.moe import BITS, random_experts, random_routing
from optimum_mc.kernels.moe_fused import cuda_moe
from optimum_mc.kernels.reference import moe_reference
from optimum_mc.pruning.rule import apply_drop, count_routing, drop_mask

e = len(BITS)
gate_up, down = random_experts(BITS)
lists = [[m[j] for m in gate_up] for j in range(3)] + [[m[j] for m in down] for j in range(3)]
for tokens in (3, 20):  # the per-pair decode kernels and the aligned (tiled) ones
    idx, w = random_routing(tokens, e, k=3, seed=tokens)
    x = torch.randn(tokens, 128, generator=torch.Generator().manual_seed(tokens))
    counts = torch.zeros(e + 3, dtype=torch.int64)
    got = cuda_moe(x, idx, w, *lists, BITS, "silu", "float", None, None, 0.7, counts)
    i2, w2 = apply_drop(idx, w, drop_mask(w, 0.7), e)
    want = torch.zeros(e + 3, dtype=torch.int64)
    count_routing(want, i2, None, e)
    ref = moe_reference(x, i2, w2, gate_up, down, BITS, "silu")
    assert torch.equal(counts, want), (counts, want)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
print("ok")
"""


def test_triton_backend_applies_odp_like_the_torch_rule_under_interpreter():
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    tests = str(Path(__file__).parents[1])
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, "-c", TRITON_ODP_CHECK], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
