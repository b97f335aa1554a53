"""ink_loss forward + backward (INK training step loss), fused (knnfast.ink_loss: the logits
buffer becomes its own gradient, knn_kd_loss kernels over it) vs the pure-PyTorch reference
(knnfast.reference.ink_loss), in one run, with the peak extra resident memory of each call.

Issue #6 target (T = 4,096 tokens, V = 42,024, D = 512, k = 32): fused >= 2x faster than the
reference and no [T, V] tensor beyond the logits themselves. Inputs: hidden ~ N(0,1), output
weight ~ 0.05 N(0,1) (gradients for both), neighbour keys ~ N(0,1), alpha = beta = 0.1.
"""
from __future__ import annotations

import os

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")
T, V, D, K = (64, 5000, 64, 8) if QUICK else (4096, 42024, 512, 32)
SEED = 23


def _data():
    g = torch.Generator().manual_seed(SEED)
    return (torch.randn(T, D, generator=g), torch.randn(V, D, generator=g) * 0.05,
            torch.randint(0, V, (T,), generator=g), torch.randn(T, K, D, generator=g),
            torch.randint(0, V, (T, K), generator=g))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_ink_loss(kb, impl):
    import knnfast
    from knnfast import reference
    hidden, weight, targets, keys, tokens = _data()
    fn = knnfast.ink_loss if impl == "fused" else reference.ink_loss
    h, w = hidden.requires_grad_(), weight.requires_grad_()

    def step():
        h.grad = w.grad = None
        with torch.enable_grad():
            loss, _ = fn(h, w, targets, keys, tokens, alpha=0.1, beta=0.1)
            loss.backward()
        return loss.detach()

    out = kb.run(step, op="ink_loss", impl=impl, dtype="float32",
                 shape={"T": T, "V": V, "D": D, "k": K}, measure_memory=True,
                 single_round_above_s=20.0, min_rounds=2)
    assert torch.isfinite(out)
