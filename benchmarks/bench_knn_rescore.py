"""knn_rescore: exact scores of given candidate ids (the "real score" after an
approximate FAISS search), fused vs the pure-PyTorch reference (gather + distance).

Shape: B = 640 queries, k = 64 candidates each, N = 100,000 keys of D = 1,024
(float32 and float16 keys: kNN-MT/LM datastores store float16). Every 10th row
has its last candidate set to -1 (padding from the approximate search).
"""

from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")

if QUICK:
    SHAPES = ((16, 64, 20_000, 256),)
else:
    SHAPES = ((640, 64, 100_000, 1024),)
DTYPES = ("float32", "float16")
IMPLS = ("fused", "reference")
METRIC = "l2"
SEED = 4321


@lru_cache(maxsize=1)
def _data(b, k, n, d):
    g = torch.Generator().manual_seed(SEED)
    keys = torch.randn(n, d, generator=g)
    queries = torch.randn(b, d, generator=g)
    indices = torch.randint(0, n, (b, k), generator=g)
    indices[::10, -1] = -1
    return queries, {"float32": keys, "float16": keys.to(torch.float16)}, indices


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    _data.cache_clear()


@pytest.mark.parametrize("b,k,n,d", SHAPES, ids=[f"B{b}-k{k}-N{n}-D{d}" for b, k, n, d in SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", IMPLS)
def test_knn_rescore(kb, impl, dtype, b, k, n, d):
    fn = kb.op("knn_rescore", impl)
    queries, keys, indices = _data(b, k, n, d)
    kk = keys[dtype]
    out = kb.run(
        lambda: fn(queries, kk, indices, METRIC),
        op="knn_rescore", impl=impl, shape={"B": b, "k": k, "N": n, "D": d}, dtype=dtype,
        metric=METRIC, query_dtype="float32",
    )
    assert out.shape == (b, k)
