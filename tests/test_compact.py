"""Smaller datastores (knnfast.storage.compact): greedy-merge pruning (hand-checked merges,
counts as weights in every decoder = the unpruned store for exact duplicates), dimension
reduction (PCA exact on a low-rank store, seeded random projection, queries projected at
search time), resumability of both after an interruption, wrong query widths, broken side
files and bad arguments."""
import os

import numpy as np
import pytest
import torch

from knnfast import AdaptiveKNNDecoder, Datastore, DatastoreError, KNNDecoder, RobustKNNDecoder
from knnfast.storage import compact, files
from knnfast.storage.compact import greedy_merge

V, D = 30, 16

pytestmark = pytest.mark.usefixtures("single_threaded")


def _store(path, keys, values, vocab=V):
    with Datastore.create(path, keys.shape[1], vocab_size=vocab, progress=False) as w:
        w.add(keys, values)
    return Datastore.open(path)


VD = 64        # the duplicates' vocabulary: one value per distinct key


@pytest.fixture(scope="module")
def dup(tmp_path_factory):
    """60 distinct keys with distinct values, key i stored 1 + i % 3 times (same key, same
    value), the copies interleaved: 120 entries."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(60, D, generator=g)
    vals = torch.randperm(VD, generator=g)[:60]
    mult = 1 + torch.arange(60) % 3
    rows = torch.cat([torch.nonzero(mult > r).squeeze(1) for r in range(3)])
    root = tmp_path_factory.mktemp("dup")
    return _store(root / "ds", base[rows], vals[rows], vocab=VD), base, vals, mult


@pytest.fixture(scope="module")
def rand_ds(tmp_path_factory):
    g = torch.Generator().manual_seed(7)
    keys, values = torch.randn(400, D, generator=g), torch.randint(0, 4, (400,), generator=g)
    return _store(tmp_path_factory.mktemp("rand") / "ds", keys, values)


def _files(ds):
    out = {}
    for name in sorted(os.listdir(ds.path)):
        if name != "meta.json":
            with open(os.path.join(ds.path, name), "rb") as f:
                out[name] = f.read()
    return out


# --------------------------------------------------------------------------- pruning


def test_greedy_merge_by_hand():
    # entry: 0   1   2   3   4      values a a b a b; neighbours listed per entry
    nbrs = np.array([[1, 3], [0, 3], [4, 0], [1, 0], [2, -1]])
    values = np.array([0, 0, 1, 0, 1])
    kept, counts = greedy_merge(nbrs, values, np.ones(5, np.int64))
    # 0 absorbs 1 and 3; 2 absorbs 4
    assert kept.tolist() == [0, 2] and counts.tolist() == [3, 2]
    # earlier kept entries are never absorbed; source counts add up
    kept, counts = greedy_merge(np.array([[1], [0]]), np.array([0, 0]), np.array([2, 5]))
    assert kept.tolist() == [0] and counts.tolist() == [7]
    kept, counts = greedy_merge(np.array([[1], [0]]), np.array([0, 1]), np.ones(2, np.int64))
    assert kept.tolist() == [0, 1] and counts.tolist() == [1, 1]
    # entry 1 has the earlier, kept entry 0 as a same-value neighbour: 0 is not absorbed
    kept, counts = greedy_merge(np.array([[-1], [0]]), np.array([0, 0]), np.ones(2, np.int64))
    assert kept.tolist() == [0, 1] and counts.tolist() == [1, 1]


def test_prune_duplicates_keeps_one_with_its_count(dup, tmp_path):
    ds, base, vals, mult = dup
    pr = ds.prune(tmp_path / "pr", k=2, progress=False)
    assert len(pr) == 60 and torch.equal(pr.counts, mult)
    assert torch.equal(pr.keys.float(), base.half().float())
    assert torch.equal(pr.values.long(), vals)
    src = np.load(os.path.join(pr.path, "source_ids.npy"))
    assert src.tolist() == list(range(60))
    extra = pr.meta["extra"]
    assert extra["pruned"]["entries_before"] == 120 and extra["pruned"]["from"] == ds.fingerprint
    assert pr.fingerprint != ds.fingerprint
    assert not os.path.exists(str(tmp_path / "pr") + compact.NEIGHBOURS)


def test_counts_weigh_like_the_duplicates_in_every_decoder(dup, tmp_path):
    """kNN over every pruned entry with its count = kNN over every entry of the full store
    (the copies of a key weigh as its count), in each decoder."""
    ds, base, _, mult = dup
    pr = ds.prune(tmp_path / "pr", k=2, progress=False)
    g = torch.Generator().manual_seed(1)
    hidden, logits = torch.randn(5, D, generator=g), torch.randn(5, VD, generator=g)
    full = KNNDecoder(ds, k=120, temperature=3.0, lam=0.5)(hidden, logits)
    dec = KNNDecoder(pr, k=60, temperature=3.0, lam=0.5)
    got = dec(hidden, logits)
    torch.testing.assert_close(got, full, rtol=0, atol=1e-5)
    targets = torch.randint(0, VD, (5,), generator=g)
    torch.testing.assert_close(dec.gold_logprob(logits, targets, dec.retrieve(hidden)),
                               got.gather(1, targets[:, None]).squeeze(1), rtol=0, atol=1e-5)
    # adaptive: each per-k softmax gets + log c (= scores + τ log c with p(k) held fixed)
    a_pr = AdaptiveKNNDecoder(pr, max_k=4, temperature=3.0)
    nb = a_pr.retrieve(hidden)
    torch.testing.assert_close(nb.log_counts, mult[nb.ids].double().log().float())
    with torch.no_grad():
        a_pr.network.net[0].weight.zero_()            # p(k) no longer reads the scores
        w, _ = a_pr.network.mixture(nb.scores, nb.tokens, 3.0, nb.log_counts)
        w0, _ = a_pr.network.mixture(nb.scores + 3.0 * nb.log_counts, nb.tokens, 3.0)
    torch.testing.assert_close(w, w0)
    assert not torch.allclose(w, a_pr.network.mixture(nb.scores, nb.tokens, 3.0)[0])
    # robust: the combiner's softmax gets + log c
    r = RobustKNNDecoder(pr, k=4, entry_logp=torch.zeros(len(pr)))
    nb = r.retrieve(hidden)
    w, _ = r.mixture(logits, nb)
    nb.log_counts = None
    w0, _ = r.mixture(logits, nb)
    hand = w0 * mult[nb.ids]
    torch.testing.assert_close(w, hand / hand.sum(1, keepdim=True))


def test_prune_random_store_and_its_decoder(rand_ds, tmp_path):
    pr = rand_ds.prune(tmp_path / "pr", k=8, progress=False)
    assert 0 < len(pr) < len(rand_ds) and int(pr.counts.sum()) == len(rand_ds)
    src = torch.from_numpy(np.load(os.path.join(pr.path, "source_ids.npy")))
    assert torch.equal(pr.values, rand_ds.values[src])
    assert torch.equal(pr.keys, rand_ds.keys[src])
    out = KNNDecoder(pr, k=8)(torch.randn(3, D), torch.randn(3, V))
    assert out.shape == (3, V) and torch.isfinite(out).all()
    # pruning a pruned store adds up the counts
    pr2 = pr.prune(tmp_path / "pr2", k=8, progress=False)
    assert int(pr2.counts.sum()) == len(rand_ds) and len(pr2) <= len(pr)


def test_prune_resumes_after_interruptions(rand_ds, tmp_path, monkeypatch):
    want = _files(rand_ds.prune(tmp_path / "whole", k=6, progress=False))
    monkeypatch.setattr(files, "CHUNK_BYTES", 1024)   # many chunks per stage
    search, calls = Datastore.search, []

    def flaky_search(self, *a, **kw):                  # stage 1 dies after 2 chunks
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed in stage 1")
        return search(self, *a, **kw)
    monkeypatch.setattr(Datastore, "search", flaky_search)
    with pytest.raises(RuntimeError, match="stage 1"):
        rand_ds.prune(tmp_path / "p", k=6, progress=False)
    scratch = str(tmp_path / "p") + compact.NEIGHBOURS + ".building"
    assert os.path.exists(scratch) and not os.path.exists(tmp_path / "p")
    with pytest.raises(DatastoreError, match="resume=True"):
        rand_ds.prune(tmp_path / "p", k=6, resume=False, progress=False)
    monkeypatch.setattr(Datastore, "search", search)
    from knnfast.storage.writer import DatastoreWriter
    add, adds = DatastoreWriter.add, []

    def flaky_add(self, *a, **kw):                     # stage 2 dies after 2 chunks
        adds.append(1)
        if len(adds) == 3:
            raise RuntimeError("killed in stage 2")
        return add(self, *a, **kw)
    monkeypatch.setattr(DatastoreWriter, "add", flaky_add)
    with pytest.raises(RuntimeError, match="stage 2"):
        rand_ds.prune(tmp_path / "p", k=6, progress=False)
    assert os.path.exists(str(tmp_path / "p") + ".building")
    monkeypatch.setattr(DatastoreWriter, "add", add)
    got = rand_ds.prune(tmp_path / "p", k=6, progress=False)
    assert _files(got) == want


def test_prune_bad_arguments(rand_ds, tmp_path):
    for k in (0, 2049, 1.5, True):
        with pytest.raises(ValueError, match="k must be"):
            rand_ds.prune(tmp_path / "x", k=k, progress=False)
    rand_ds.prune(tmp_path / "y", k=2, progress=False)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        rand_ds.prune(tmp_path / "y", k=2, progress=False)
    assert len(rand_ds.prune(tmp_path / "y", k=2, overwrite=True, progress=False)) > 0


def test_broken_side_files_do_not_open(rand_ds, tmp_path):
    pr = rand_ds.prune(tmp_path / "pr", k=4, progress=False)
    np.save(os.path.join(pr.path, "counts.npy"), np.ones(3, np.int64))
    with pytest.raises(DatastoreError, match="counts.npy has shape"):
        Datastore.open(pr.path)
    np.save(os.path.join(pr.path, "counts.npy"), np.zeros(len(pr), np.int64))
    with pytest.raises(DatastoreError, match="count below 1"):
        Datastore.open(pr.path)
    os.remove(os.path.join(pr.path, "counts.npy"))
    with pytest.raises(DatastoreError, match="cannot read"):
        Datastore.open(pr.path)


# --------------------------------------------------------------------------- reduction


@pytest.fixture(scope="module")
def low_rank(tmp_path_factory):
    """Keys in a 4-dim affine subspace of R^16 (PCA to 4 keeps every l2 distance)."""
    g = torch.Generator().manual_seed(9)
    basis = torch.linalg.qr(torch.randn(D, 4, generator=g))[0]
    coef = torch.randn(300, 4, generator=g) * 2
    keys = (coef @ basis.T + 1.5).float()
    values = torch.randint(0, V, (300,), generator=g)
    ds = _store(tmp_path_factory.mktemp("lr") / "ds", keys.to(torch.float32), values)
    return ds, basis, keys


def test_pca_on_low_rank_store_keeps_neighbours(low_rank, tmp_path):
    ds, basis, keys = low_rank
    rd = ds.reduce_dim(tmp_path / "rd", 4, progress=False)
    assert (rd.dim, rd.query_dim, len(rd)) == (4, D, len(ds))
    assert rd.meta["extra"]["projection"]["method"] == "pca"
    q = (torch.randn(6, 4) @ basis.T + 1.5).float()
    s0, i0 = ds.search(q, 5)
    s1, i1 = rd.search(q, 5)
    assert torch.equal(i0, i1)
    torch.testing.assert_close(s1, s0, rtol=1e-2, atol=1e-2)   # fp16 keys after projection
    out = KNNDecoder(rd, k=5, temperature=10.0)(q, torch.randn(6, V))   # decoders unchanged
    ref = KNNDecoder(ds, k=5, temperature=10.0)(q, torch.randn(6, V))
    assert out.shape == ref.shape
    ref_backend = KNNDecoder(rd, k=5, backend="reference").retrieve(q)
    assert torch.equal(ref_backend.ids, i1)
    with pytest.raises(ValueError, match=r"\[B, 16\].*pca projection to 4"):
        rd.search(torch.randn(2, 4), 3)
    assert torch.equal(rd.search(rd.keys[:2].float(), 1, projected=True)[1].squeeze(1),
                       torch.tensor([0, 1]))


def test_random_projection_is_seeded(rand_ds, tmp_path):
    a = rand_ds.reduce_dim(tmp_path / "a", 8, method="random", seed=3, progress=False)
    b = rand_ds.reduce_dim(tmp_path / "b", 8, method="random", seed=3, progress=False)
    c = rand_ds.reduce_dim(tmp_path / "c", 8, method="random", seed=4, progress=False)
    assert _files(a) == _files(b) != _files(c)
    m = torch.from_numpy(np.load(os.path.join(a.path, "projection.npy")))
    torch.testing.assert_close(a.keys.float(), (rand_ds.keys.float() @ m).half().float())


def test_reduce_a_pruned_store_keeps_counts_and_prune_a_reduced_one(rand_ds, tmp_path):
    pr = rand_ds.prune(tmp_path / "pr", k=8, progress=False)
    rd = pr.reduce_dim(tmp_path / "rd", 6, progress=False)
    assert torch.equal(rd.counts, pr.counts)
    rd0 = rand_ds.reduce_dim(tmp_path / "rd0", 6, progress=False)
    pr0 = rd0.prune(tmp_path / "pr0", k=8, progress=False)
    assert pr0.projection is not None and pr0.query_dim == D
    assert KNNDecoder(pr0, k=4)(torch.randn(2, D), torch.randn(2, V)).shape == (2, V)


def test_reduce_dim_resumes_after_interruption(rand_ds, tmp_path, monkeypatch):
    want = _files(rand_ds.reduce_dim(tmp_path / "whole", 5, progress=False))
    monkeypatch.setattr(files, "CHUNK_BYTES", 512)
    from knnfast.storage.writer import DatastoreWriter
    add, adds = DatastoreWriter.add, []

    def flaky_add(self, *a, **kw):
        adds.append(1)
        if len(adds) == 4:
            raise RuntimeError("killed")
        return add(self, *a, **kw)
    monkeypatch.setattr(DatastoreWriter, "add", flaky_add)
    with pytest.raises(RuntimeError, match="killed"):
        rand_ds.reduce_dim(tmp_path / "r", 5, progress=False)
    assert not os.path.exists(tmp_path / "r")
    fit = compact.fit_projection
    monkeypatch.setattr(compact, "fit_projection", lambda *a, **kw: pytest.fail("refitted"))
    monkeypatch.setattr(DatastoreWriter, "add", add)
    got = rand_ds.reduce_dim(tmp_path / "r", 5, progress=False)
    assert _files(got) == want and fit is not None


def test_reduce_dim_bad_arguments(rand_ds, low_rank, tmp_path):
    for dim in (0, D, 20, 2.0, True):
        with pytest.raises(ValueError, match="dim must be"):
            rand_ds.reduce_dim(tmp_path / "x", dim, progress=False)
    with pytest.raises(ValueError, match="method must be"):
        rand_ds.reduce_dim(tmp_path / "x", 4, method="svd", progress=False)
    with pytest.raises(ValueError, match="train_size"):
        rand_ds.reduce_dim(tmp_path / "x", 4, train_size=0, progress=False)
    rd = low_rank[0].reduce_dim(tmp_path / "rd", 4, progress=False)
    with pytest.raises(ValueError, match="already reduced"):
        rd.reduce_dim(tmp_path / "rd2", 2, progress=False)
    os.remove(os.path.join(rd.path, "projection_mean.npy"))
    with pytest.raises(DatastoreError, match="projection_mean.npy"):
        Datastore.open(rd.path)


def test_faiss_pq_recipe_on_a_reduced_store_and_prune_through_an_index(low_rank, tmp_path):
    """The documented recipe: PQ index candidates, exact rescoring, on a reduced store (the
    queries are projected before FAISS); prune's neighbour search through the index."""
    ds = low_rank[0]
    rd = ds.reduce_dim(tmp_path / "rd", 4, progress=False)
    rd.build_index("PQ2x4", train_size=300, save=False, progress=False)
    q = torch.randn(5, D)
    scores, ids = rd.search(q, 8, exact=False, rescore=True)
    exact = -torch.cdist(rd.project(q), rd.keys.float()) ** 2
    torch.testing.assert_close(scores, exact.gather(1, ids), rtol=1e-4, atol=1e-4)
    assert (scores[:, :-1] >= scores[:, 1:]).all()                   # re-sorted
    dec = KNNDecoder(rd, k=8, exact=False, rescore=True)
    assert torch.equal(dec.retrieve(q).ids, ids)
    flat = ds.to("cpu")
    flat.build_index("Flat", save=False, progress=False)
    a = flat.prune(tmp_path / "a", k=4, exact=False, progress=False)
    b = ds.prune(tmp_path / "b", k=4, exact=True, progress=False)
    assert torch.equal(a.counts, b.counts) and int(a.counts.sum()) == len(ds)


def test_derived_stores_verify_and_refuse_subsample(rand_ds, tmp_path):
    pr = rand_ds.prune(tmp_path / "pr", k=4, progress=False)
    rd = rand_ds.reduce_dim(tmp_path / "rd", 4, progress=False)
    for store in (pr, rd):
        assert Datastore.verify(store.path).ok
        with pytest.raises(ValueError, match="pruned or dimension-reduced"):
            store.subsample(0.5, path=tmp_path / "sub")
