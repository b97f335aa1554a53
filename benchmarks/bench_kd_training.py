"""kNN-KD training cost (issue #5), in one run:

1. op="kd_train_step": one optimizer update of the demo-size Marian (d=128, 2+2 layers,
   V=8,000, random weights) on 32 sentence pairs:
   - impl="ce": plain label-smoothed cross-entropy training (model forward,
     torch.nn.functional.cross_entropy(label_smoothing=0.1), backward, Adam step);
   - impl="knn_kd": the same update with kNN-KD: TeacherStore.batch (memmap read) +
     knnfast.knn_kd_loss (LS-CE(0.1) + KL, k=64, tau=100) instead of the cross-entropy.
   Target: knn_kd updates/s >= 0.95x ce (the paper reports 1.06x).
2. op="teacher_build": TeacherStore.build throughput (target positions/s) with exact search
   and with a FAISS index (IVF, Flat lists), k = 64. Reported, no target.

Assets: the demo's trained model and in-domain pairs / datastore when `make demo` has run
(.cache/demo), else the same architecture with random weights over random sentences
(recorded as extra_info["assets"]).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")
REPO = Path(__file__).resolve().parents[1]
DEMO_CACHE = Path(os.environ.get("KNNFAST_DEMO_CACHE", REPO / ".cache" / "demo"))
BATCH, K, TAU = 32, 64, 100.0
UPDATES = 2 if QUICK else 8
N_PAIRS = 200 if QUICK else 2000
SEED = 4


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import knnfast
    from knnfast.app import demo
    from knnfast.integrations import hf
    from knnfast.methods.kd import TeacherStore
    if (DEMO_CACHE / "datastore" / "meta.json").exists() and not QUICK:
        model, codec = demo.load_cached_model(DEMO_CACHE)
        split = demo.load_split()
        pairs = demo.pair_examples(codec, split.in_train[:N_PAIRS], model.config.max_position_embeddings)
        label = "demo cache (trained model, in_train pairs)"
    else:
        cfg = demo.BaseModelConfig()
        torch.manual_seed(SEED)
        model = demo.build_marian(8000, cfg.d_model, cfg.layers, cfg.heads, cfg.ffn_dim, 0.0,
                                  cfg.max_positions).eval()
        g = torch.Generator().manual_seed(SEED)
        rand = lambda: torch.randint(2, 8000, (int(torch.randint(8, 30, (1,), generator=g)),),  # noqa: E731
                                     generator=g).tolist() + [1]
        pairs = [(rand(), rand()) for _ in range(N_PAIRS)]
        label = f"synthetic (random weights, {N_PAIRS} random pairs)"
    work = tmp_path_factory.mktemp("kd")
    ds = hf.build_datastore(model, pairs, str(work / "ds"), batch_size=64, progress=False)
    store = TeacherStore.build(model, ds, pairs, str(work / "teacher"), k=K, batch_size=64,
                               progress=False)
    return model, pairs, ds, store, work, label, knnfast


def _update(model, opt, pairs, ids, store):
    from knnfast.methods.kd import distillation_loss, seq2seq_batch
    batch = seq2seq_batch(pairs, ids)
    labels = batch.pop("labels")
    with torch.enable_grad():
        logits = model(**batch).logits
        if store is None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                   label_smoothing=0.1)
        else:
            loss = distillation_loss(logits, labels, store.batch(ids, length=labels.shape[1]),
                                     temperature=TAU)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.detach()


@pytest.mark.parametrize("impl", ["ce", "knn_kd"])
def test_kd_train_step(kb, assets, impl):
    model, pairs, ds, store, work, label, _ = assets
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    # every timed call makes the same UPDATES updates (same batches, same lengths) for both
    batches = [list(range(i * BATCH, (i + 1) * BATCH)) for i in range(UPDATES)]

    def step():
        for ids in batches:
            loss = _update(model, opt, pairs, ids, None if impl == "ce" else store)
        return loss

    out = kb.run(step, op="kd_train_step", impl=impl, dtype="float32",
                 shape={"batch": BATCH, "V": model.config.vocab_size, "k": K}, assets=label,
                 budget_s=12.0, updates_per_call=UPDATES)
    model.eval()
    assert torch.isfinite(out)


@pytest.mark.parametrize("impl", ["exact", "faiss"])
def test_teacher_build(kb, assets, impl):
    model, pairs, ds, store, work, label, knnfast = assets
    from knnfast.methods.kd import TeacherStore
    if impl == "faiss" and not ds.has_saved_index():
        ds.build_index(f"IVF{max(1, int(len(ds) ** 0.5))},Flat", nprobe=16, progress=False)
    runs = {"n": 0}

    def build():
        runs["n"] += 1
        return TeacherStore.build(model, ds, pairs, str(work / f"t-{impl}-{runs['n']}"), k=K,
                                  batch_size=64, exact=impl == "exact", progress=False)

    out = kb.run(build, op="teacher_build", impl=impl, dtype="float16",
                 shape={"positions": store.meta["positions"], "k": K, "N": len(ds)}, assets=label,
                 min_rounds=2, budget_s=5.0)
    assert out.meta["positions"] == store.meta["positions"]
