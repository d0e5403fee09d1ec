"""Save an MC model and load it back, asserting every tensor of the state dict comes back bit-identical."""

from __future__ import annotations

import torch


def reload_identical(model, folder):
    """``model.save_pretrained(folder)``, then ``from_pretrained(folder)``: the same state-dict keys (packed experts
    among them) and every tensor ``torch.equal``; returns the reloaded model."""
    from transformers import AutoModelForCausalLM

    model.save_pretrained(folder)
    again = AutoModelForCausalLM.from_pretrained(folder)
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and any(".experts.packed." in k for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return again
