"""label_counts: number of distinct valid tokens among the first j+1 neighbours
(adaptive kNN-MT feature), fused vs the pure-PyTorch reference.

Shape: B = 640 (batch x beam), k = 32 (the largest K of adaptive kNN-MT);
tokens drawn from k/4 distinct ids per row out of V = 42,024, token 0 included
in the pool of every 8th row, every 16th row padded with -1 in its last 4 slots.
"""

from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")

if QUICK:
    SHAPES = ((16, 32),)
else:
    SHAPES = ((640, 32),)
IMPLS = ("fused", "reference")
V = 42024
SEED = 5


@lru_cache(maxsize=1)
def _data(b, k):
    g = torch.Generator().manual_seed(SEED)
    pool = torch.randint(0, V, (b, max(1, k // 4)), generator=g)
    pool[::8, 0] = 0
    tokens = pool.gather(1, torch.randint(0, pool.shape[1], (b, k), generator=g))
    tokens[::16, -4:] = -1
    return tokens.contiguous()


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    _data.cache_clear()


@pytest.mark.parametrize("b,k", SHAPES, ids=[f"B{b}-k{k}" for b, k in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_label_counts(kb, impl, b, k):
    fn = kb.op("label_counts", impl)
    tokens = _data(b, k)
    out = kb.run(lambda: fn(tokens), op="label_counts", impl=impl, shape={"B": b, "k": k}, dtype="int64")
    assert out.shape == (b, k)
