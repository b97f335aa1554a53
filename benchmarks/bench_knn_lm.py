"""kNN-LM evaluation throughput (tokens/s): knnfast.integrations.hf.evaluate_lm with exact search over a
1M-entry fp16 datastore, fused path vs the pure-PyTorch reference path (reference
knn_search = chunked matmul + topk, reference knn_gold_logprob), in one run.

Issue #4 target: fused >= 5x the reference path's tokens/s.
Model: a GPT-2 shape built in the benchmark (random weights, no download): n_embd = 512,
2 layers, 8 heads, V = 50,257. Datastore: N = 1,000,000 random fp16 keys (D = 512) with
random values, memmapped from disk as a user would open it. Eval: 8 sequences x 128
tokens per batch (1,016 target positions), k = 1,024, tau = 1, lambda = 0.25 (Xu et al.).
"""
from __future__ import annotations

import os

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")
N = 20_000 if QUICK else 1_000_000
D = 64 if QUICK else 512
V = 1_000 if QUICK else 50_257
K = 64 if QUICK else 1024
SEQS, SEQ_LEN = (2, 16) if QUICK else (8, 128)
SEED = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel
    import knnfast
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=D, n_layer=2, n_head=8,
                                       n_positions=max(SEQ_LEN, 64))).eval()
    path = tmp_path_factory.mktemp("knnlm") / "ds"
    g = torch.Generator().manual_seed(SEED)
    with knnfast.Datastore.create(path, D, torch.float16, vocab_size=V, progress=False) as w:
        for s in range(0, N, 100_000):
            n = min(100_000, N - s)
            w.add(torch.randn(n, D, generator=g), torch.randint(0, V, (n,), generator=g))
    ds = knnfast.Datastore.open(path)
    examples = [torch.randint(0, V, (SEQ_LEN,), generator=g).tolist() for _ in range(SEQS)]
    return model, ds, examples


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_knn_lm_eval(kb, setup, impl):
    import knnfast
    from knnfast.integrations import hf
    model, ds, examples = setup
    dec = knnfast.KNNDecoder(ds, k=K, temperature=1.0, lam=0.25, exact=True, backend=impl)
    fn = lambda: hf.evaluate_lm(model, examples, dec, batch_size=SEQS, progress=False)  # noqa: E731
    res = kb.run(fn, op="knn_lm_eval", impl=impl, dtype="float16",
                 shape={"N": N, "D": D, "V": V, "k": K, "tokens": SEQS * (SEQ_LEN - 1)},
                 single_round_above_s=10.0 if impl == "reference" else None,
                 min_rounds=1 if impl == "reference" else 3, budget_s=15.0)
    assert res.tokens == SEQS * (SEQ_LEN - 1)
    assert res.knn_ppl > 0 and res.base_ppl > 0
