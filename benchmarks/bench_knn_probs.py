"""knn_probs (dense M . softmax(scores / tau) -> [B, V]) and knn_probs_sparse
(duplicates merged -> [B, k]), fused vs the pure-PyTorch reference.

Shape: B = 160 (batch x beam), V = 42,024 (WMT19 de-en), k = 64, tau = 10.
Neighbour tokens are drawn from k/4 distinct ids per row (kNN-MT neighbours
often share their token); every 16th row has an invalid last slot (-1, -inf).
"""

from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")

if QUICK:
    SHAPES = ((16, 5000, 64),)
else:
    SHAPES = ((160, 42024, 64),)
IMPLS = ("fused", "reference")
TEMPERATURE = 10.0
SEED = 99


@lru_cache(maxsize=1)
def _data(b, v, k):
    g = torch.Generator().manual_seed(SEED)
    pool = torch.randint(0, v, (b, max(1, k // 4)), generator=g)
    tokens = pool.gather(1, torch.randint(0, pool.shape[1], (b, k), generator=g))
    scores = -(torch.rand(b, k, generator=g) * 200 + 300).sort(dim=1).values
    tokens[::16, -1] = -1
    scores[::16, -1] = float("-inf")
    return scores.contiguous(), tokens.contiguous()


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    _data.cache_clear()


_IDS = [f"B{b}-V{v}-k{k}" for b, v, k in SHAPES]


@pytest.mark.parametrize("b,v,k", SHAPES, ids=_IDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_knn_probs_dense(kb, impl, b, v, k):
    fn = kb.op("knn_probs", impl)
    scores, tokens = _data(b, v, k)
    out = kb.run(
        lambda: fn(scores, tokens, v, TEMPERATURE),
        op="knn_probs", impl=impl, shape={"B": b, "V": v, "k": k}, dtype="float32",
        variant="dense", temperature=TEMPERATURE,
    )
    assert out.shape == (b, v)


@pytest.mark.parametrize("b,v,k", SHAPES, ids=_IDS)
@pytest.mark.parametrize("impl", IMPLS)
def test_knn_probs_sparse(kb, impl, b, v, k):
    fn = kb.op("knn_probs_sparse", impl)
    scores, tokens = _data(b, v, k)
    tok_u, probs = kb.run(
        lambda: fn(scores, tokens, TEMPERATURE),
        op="knn_probs_sparse", impl=impl, shape={"B": b, "V": v, "k": k}, dtype="float32",
        variant="sparse", temperature=TEMPERATURE,
    )
    assert tok_u.shape == (b, k) and probs.shape == (b, k)
