"""kNN-MT decoding cost with the demo model (issue #4), all cells in one run.

1. op="decode_step" at batch 16 x beam 4 (B = 64 rows), k = 8:
   - impl="bare": one step of the bare model's beam search = HF generate time / steps
     (min_new_tokens = max_new_tokens = 24, so every run takes the same number of steps);
   - impl="knn_fused": the kNN work after the search (value lookup, weights, interpolation
     into the vocabulary) = Datastore.lookup + knnfast.knn_interpolate;
   - impl="knn_reference": the same work the knn-transformers way (lookup, dense
     scatter_add_ of softmax(-d/T), logaddexp with log_softmax) = knnfast.reference.
   Target: knn_fused <= 5% of bare (the reference share is reported beside it).
2. op="knnmt_decode": sentences/s of beam-4 generation over 64 sources (batch 16), bare vs
   kNN-MT through a FAISS IVF index (fused or reference post-search path). Target: kNN-MT
   fused >= 0.7x bare sentences/s.

Assets: the demo's cached model, in-domain datastore and IVF index (``make demo``) when
present (.cache/demo); otherwise the demo architecture with random weights, a synthetic
200k-entry datastore and random sources (recorded as extra_info["assets"]).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")
REPO = Path(__file__).resolve().parents[1]
DEMO_CACHE = Path(os.environ.get("KNNFAST_DEMO_CACHE", REPO / ".cache" / "demo"))
BATCH, BEAMS, K = 16, 4, 8
STEPS = 8 if QUICK else 24
N_SOURCES = 16 if QUICK else 64
SYNTH_N = 20_000 if QUICK else 200_000
SEED = 3


def _demo_assets():
    """(model, datastore with IVF index, source id lists, assets label)."""
    import knnfast
    from knnfast.app import demo
    if (DEMO_CACHE / "datastore" / "index.faiss").exists() and not QUICK:
        model, codec = demo.load_cached_model(DEMO_CACHE)
        ds = knnfast.Datastore.open(DEMO_CACHE / "datastore")
        split = demo.load_split(DEMO_CACHE)
        sources = [codec.encode(s) for s, _ in split.in_test[:N_SOURCES]]
        ds.load_index()
        return model, ds, sources, "demo cache (trained model, in-domain datastore)"
    cfg = demo.BaseModelConfig()
    vocab = 8000
    torch.manual_seed(SEED)
    model = demo.build_marian(vocab, cfg.d_model, cfg.layers, cfg.heads, cfg.ffn_dim, 0.0,
                              cfg.max_positions).eval()
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"knnfast-bench-ds-{SYNTH_N}-{cfg.d_model}"
    if not (path / "index.faiss").exists():
        g = torch.Generator().manual_seed(SEED)
        with knnfast.Datastore.create(path, cfg.d_model, vocab_size=vocab, overwrite=True,
                                      progress=False) as w:
            w.add(torch.randn(SYNTH_N, cfg.d_model, generator=g),
                  torch.randint(2, vocab, (SYNTH_N,), generator=g))
        ds = knnfast.Datastore.open(path)
        ds.build_index("IVF256,Flat", nprobe=16, progress=False)
    ds = knnfast.Datastore.open(path)
    ds.load_index()
    g = torch.Generator().manual_seed(SEED)
    sources = [torch.randint(2, vocab, (20,), generator=g).tolist() + [1] for _ in range(N_SOURCES)]
    return model, ds, sources, f"synthetic (random weights, {SYNTH_N} random keys)"


@pytest.fixture(scope="module")
def assets():
    return _demo_assets()


def _generate_all(model, sources, decoder, fixed_steps: bool):
    from knnfast.integrations import hf
    out = []
    for s in range(0, len(sources), BATCH):
        rows = sources[s:s + BATCH]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long()
        kw = dict(num_beams=BEAMS, max_new_tokens=STEPS if fixed_steps else 64)
        if fixed_steps:
            kw["min_new_tokens"] = STEPS
        out.append(hf.generate(model, decoder, input_ids=ids, attention_mask=mask, **kw))
    return out


def test_decode_step_bare(kb, assets):
    model, ds, sources, label = assets
    fn = lambda: _generate_all(model, sources[:BATCH], None, True)  # noqa: E731
    kb.run(fn, op="decode_step", impl="bare", dtype="float32",
           shape={"B": BATCH * BEAMS, "V": model.config.vocab_size, "k": K, "steps": STEPS},
           assets=label, per_call_steps=STEPS, min_rounds=3, budget_s=10.0)


@pytest.mark.parametrize("impl", ["knn_fused", "knn_reference"])
def test_decode_step_knn_work(kb, assets, impl):
    import knnfast
    from knnfast import reference
    model, ds, sources, label = assets
    B, V = BATCH * BEAMS, model.config.vocab_size
    g = torch.Generator().manual_seed(SEED)
    logits = torch.randn(B, V, generator=g)
    queries = ds.keys[torch.randint(0, len(ds), (B,), generator=g)].float()
    scores, ids = ds.search(queries, K)  # the search itself is not part of this cell
    interp = knnfast.knn_interpolate if impl == "knn_fused" else reference.knn_interpolate
    fn = lambda: interp(logits, ds.lookup(ids), scores=scores, temperature=10.0, lam=0.7)  # noqa: E731
    out = kb.run(fn, op="decode_step", impl=impl, dtype="float32",
                 shape={"B": B, "V": V, "k": K, "steps": STEPS}, assets=label, per_call_steps=1)
    assert out.shape == (B, V)


@pytest.mark.parametrize("impl", ["bare", "knn_fused", "knn_reference"])
def test_knnmt_decode(kb, assets, impl):
    import knnfast
    model, ds, sources, label = assets
    dec = None
    if impl != "bare":
        dec = knnfast.KNNDecoder(ds, k=K, temperature=10.0, lam=0.7, exact=False, rescore=False,
                                 backend="fused" if impl == "knn_fused" else "reference")
    # Random weights and random values never agree on EOS: fix the length when synthetic.
    fixed = label.startswith("synthetic")
    fn = lambda: _generate_all(model, sources, dec, fixed)  # noqa: E731
    kb.run(fn, op="knnmt_decode", impl=impl, dtype="float32",
           shape={"sentences": len(sources), "batch": BATCH, "beams": BEAMS, "k": K},
           assets=label, index=ds._index.info["factory"],
           min_rounds=2, budget_s=10.0, single_round_above_s=30.0)
