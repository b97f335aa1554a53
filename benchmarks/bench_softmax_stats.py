"""softmax_stats: the entropy and top-4 log-probabilities of softmax(logits) per row (what
retrieval skipping and the learned gate decide from), fused vs the pure-PyTorch reference
(log_softmax, the 0 log 0 terms masked, topk).

Shape: one kNN-MT decoding step of the demo, B = 64 (batch 16 x beam 4), V = 8,000, float32
logits, top = 4 (the gate's features; max_prob takes top = 1).
"""

from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")

SHAPES = ((8, 1000, 4),) if QUICK else ((64, 8000, 4),)
IMPLS = ("fused", "reference")
SEED = 11


@lru_cache(maxsize=1)
def _data(b, v):
    g = torch.Generator().manual_seed(SEED)
    return torch.randn(b, v, generator=g) * 3


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    _data.cache_clear()


@pytest.mark.parametrize("b,v,top", SHAPES, ids=[f"B{b}-V{v}-top{t}" for b, v, t in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_softmax_stats(kb, impl, b, v, top):
    fn = kb.op("softmax_stats", impl)
    logits = _data(b, v)
    out = kb.run(lambda: fn(logits, top), op="softmax_stats", impl=impl,
                 shape={"B": b, "V": v, "top": top}, dtype="float32")
    assert out[1].shape == (b, top)
