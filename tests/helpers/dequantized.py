"""An independent reference for a quantized model: transformers' own float model of the same checkpoint (its own
MoE blocks, no MC module), holding the quantized model's dequantized weights."""

from __future__ import annotations

import torch


def dequantized_reference(q, src: str):
    """transformers' float model loaded from ``src`` with every packed weight of ``q`` (experts and linears)
    replaced by its dequantized value; experts stored transposed by the family (Llama 4) are written transposed."""
    from transformers import AutoModelForCausalLM

    from optimum_mc.nn import MCExperts, QuantLinear

    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    done, experts = 0, []
    with torch.no_grad():
        for name, m in q.named_modules():
            if any(name.startswith(e + ".") for e in experts):
                continue  # the per-expert packed matrices inside MCExperts
            if isinstance(m, MCExperts):
                experts.append(name)
                gu, dn = m.dequantize()  # MC's layout (E, 2I, H) / (E, H, I)
                ex = ref.get_submodule(name)
                transposed = tuple(ex.gate_up_proj.shape) != tuple(gu.shape)
                ex.gate_up_proj.copy_(gu.transpose(1, 2) if transposed else gu)
                ex.down_proj.copy_(dn.transpose(1, 2) if transposed else dn)
                done += 1
            elif isinstance(m, QuantLinear):
                ref.get_submodule(name).weight.copy_(m.dequantize_weight())
                done += 1
    assert done > 1
    return ref


def assert_matches_reference(model, logits: torch.Tensor, ref, ids: torch.Tensor) -> None:
    """``logits`` (the quantized model's on ``ids``) within 1e-4 x max of the reference's, and greedy 4-token
    completions of the first 5 ids equal."""
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    err = float((logits - want).abs().max())
    assert err <= 1e-4 * float(want.abs().max()), err
    out = model.generate(ids[:, :5], max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref.generate(ids[:, :5], max_new_tokens=4, do_sample=False))
