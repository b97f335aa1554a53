"""INK datastore refresh between epochs (issue #6): re-encoding a 1M-entry datastore with the
current model (knnfast.integrations.hf.build_datastore: teacher-forced forward + fp16 append/fsync +
finalize with |k|^2), against the teacher-forced forward passes alone over the same corpus.
Report: refresh time, and the share knnfast adds on top of the model's forward passes.

Model: the demo's Marian shape (d=128, 2+2 layers, V=8,000, random weights). Corpus: 20,000
random pairs, source 20 tokens, target 50 tokens (1,000,000 target positions).
"""
from __future__ import annotations

import os

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")
PAIRS = 400 if QUICK else 20_000
SRC, TGT = 20, 50
SEED = 9


@pytest.fixture(scope="module")
def setup():
    from knnfast.app import demo
    cfg = demo.BaseModelConfig()
    torch.manual_seed(SEED)
    model = demo.build_marian(8000, cfg.d_model, cfg.layers, cfg.heads, cfg.ffn_dim, 0.0,
                              cfg.max_positions).eval()
    g = torch.Generator().manual_seed(SEED)
    pairs = [(torch.randint(2, 8000, (SRC,), generator=g).tolist(),
              torch.randint(2, 8000, (TGT,), generator=g).tolist()) for _ in range(PAIRS)]
    return model, pairs


@pytest.mark.parametrize("impl", ["forward_only", "refresh"])
def test_ink_refresh(kb, setup, tmp_path, impl):
    from knnfast.integrations import hf
    model, pairs = setup

    def forward_only():
        n = 0
        for tf in hf.teacher_forced(model, pairs, batch_size=64):
            n += tf.targets.numel()
        return n

    def refresh():
        return len(hf.build_datastore(model, pairs, str(tmp_path / "ds"), batch_size=64,
                                      overwrite=True, resume=False, progress=False))

    n = kb.run(forward_only if impl == "forward_only" else refresh, op="ink_refresh", impl=impl,
               dtype="float16", shape={"entries": PAIRS * TGT, "D": 128},
               single_round_above_s=5.0, min_rounds=1)
    assert n == PAIRS * TGT
