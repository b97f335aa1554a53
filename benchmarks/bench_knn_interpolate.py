"""knn_interpolate: log((1 - lam) * softmax(logits) + lam * P_kNN) over the whole
vocabulary, fused vs the knn-transformers-style reference (log_softmax + dense
scatter_add + logaddexp) vs one plain copy of the logits.

impl:
  fused      knnfast.knn_interpolate(...), allocates its [B, V] output
  fused_out  the same writing into a preallocated float32 [B, V] buffer (out=)
  reference  knnfast.reference.knn_interpolate(...)
  copy       out.copy_(logits) into a preallocated buffer (read B*V + write B*V)
  clone      logits.clone() (allocation + read + write)

Issue #2 targets (B = 640, V = 42,024, k = 8 and 64): fused at least 20x faster
than the reference, and at most 3x the time of one plain copy of the logits.
B = 160, k = 8 is recorded for reference (no target).
Inputs: float32 logits ~ 3*N(0, 1); l2 scores in [-500, -300] sorted descending,
tau = 10, lam = 0.25; tokens drawn from k/4 distinct ids per row; every 16th row
has an invalid last slot (-1, -inf).
"""

from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")

if QUICK:
    SHAPES = ((16, 5000, 8), (16, 5000, 64), (4, 5000, 8))
else:
    SHAPES = ((640, 42024, 8), (640, 42024, 64), (160, 42024, 8))
IMPLS = ("fused", "fused_out", "reference", "copy", "clone")
TEMPERATURE = 10.0
LAM = 0.25
SEED = 7


@lru_cache(maxsize=1)
def _data(b, v, k):
    g = torch.Generator().manual_seed(SEED + k)
    logits = torch.randn(b, v, generator=g).mul_(3.0)
    pool = torch.randint(0, v, (b, max(1, k // 4)), generator=g)
    tokens = pool.gather(1, torch.randint(0, pool.shape[1], (b, k), generator=g))
    scores = -(torch.rand(b, k, generator=g) * 200 + 300).sort(dim=1).values
    tokens[::16, -1] = -1
    scores[::16, -1] = float("-inf")
    return logits, tokens.contiguous(), scores.contiguous()


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    _data.cache_clear()


def _cells():
    return [pytest.param(b, v, k, impl, id=f"B{b}-V{v}-k{k}-{impl}") for b, v, k in SHAPES for impl in IMPLS]


@pytest.mark.parametrize("b,v,k,impl", _cells())
def test_knn_interpolate(kb, b, v, k, impl):
    logits, tokens, scores = _data(b, v, k)
    if impl == "copy":
        buf = torch.empty_like(logits)
        fn = lambda: buf.copy_(logits)  # noqa: E731
    elif impl == "clone":
        fn = lambda: logits.clone()  # noqa: E731
    elif impl == "fused_out":
        op = kb.op("knn_interpolate", impl)
        buf = torch.empty(b, v, dtype=torch.float32)
        fn = lambda: op(logits, tokens, scores=scores, temperature=TEMPERATURE, lam=LAM, out=buf)  # noqa: E731
    else:
        op = kb.op("knn_interpolate", impl)
        fn = lambda: op(logits, tokens, scores=scores, temperature=TEMPERATURE, lam=LAM)  # noqa: E731
    out = kb.run(
        fn, op="knn_interpolate", impl=impl, shape={"B": b, "V": v, "k": k}, dtype="float32",
        temperature=TEMPERATURE, lam=LAM,
    )
    assert out.shape == (b, v)
