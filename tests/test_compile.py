"""One kNN-LM decoding step under torch.compile(fullgraph=True) matches eager."""
import pytest
import torch

import knnfast
from conftest import DEVICES


def decode_step(hidden, logits, keys, values, lam):
    scores, idx = knnfast.knn_search(hidden, keys, 8, "l2")
    tokens = torch.where(idx >= 0, values[idx.clamp(min=0)], torch.full_like(idx, -1))
    return knnfast.knn_interpolate(logits, tokens, scores=scores, temperature=10.0, lam=lam)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_decoding_step_matches_eager(device, backend):
    torch._dynamo.reset()
    B, D, N, V = 4, 16, 500, 97
    keys = torch.randn(N, D, device=device).half()
    values = torch.randint(0, V, (N,), device=device)
    step = torch.compile(decode_step, fullgraph=True, backend=backend)
    for lam in (0.25, torch.rand(B, device=device)):
        hidden = torch.randn(B, D, device=device)
        logits = torch.randn(B, V, device=device)
        eager = decode_step(hidden, logits, keys, values, lam)
        compiled = step(hidden, logits, keys, values, lam)
        assert compiled.dtype == torch.float32 and compiled.shape == (B, V)
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
