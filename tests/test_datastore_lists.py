"""``Datastore.use_lists``: an IVF index's lists searched by the fused ``knn_search_lists``
(issue 17). The neighbours are FAISS IVF-Flat's at the same nprobe (the same lists, exact
scores), ids are datastore ids, exclude works in datastore ids, and every misuse is a clear
error."""
import pytest
import torch

import knnfast
from knnfast import KNNDecoder


def _store(tmp_path, n=3000, d=16, metric="l2", name="ds"):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(20, d, generator=g) * 4
    keys = centers[torch.randint(0, 20, (n,), generator=g)] + torch.randn(n, d, generator=g)
    with knnfast.Datastore.create(str(tmp_path / name), d, torch.float16, 50, metric=metric,
                                  progress=False) as w:
        w.add(keys, torch.randint(0, 50, (n,), generator=g))
    return knnfast.Datastore.open(str(tmp_path / name))


def _queries(ds, b=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, len(ds), (b,), generator=g)
    return ds.keys[pick].float() + 0.5 * torch.randn(b, ds.dim, generator=g)


@pytest.mark.parametrize("pack", [None, "bf16", "int8"], ids=["scan", "bf16-pack", "int8-pack"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_lists_find_what_faiss_ivf_flat_finds(tmp_path, metric, pack):
    ds = _store(tmp_path, metric=metric).to("cpu")
    ds.build_index("IVF32,Flat", nprobe=4, progress=False)
    q = _queries(ds)
    want_s, want_i = ds.search(q, 10, exact=False)
    ds.use_lists(pack=pack)
    kinds = {None: type(None), "bf16": knnfast.ListsBf16, "int8": knnfast.ListsInt8}
    assert isinstance(ds._lists.pack, kinds[pack]) and ds._lists.plan == "auto"
    got_s, got_i = ds.search(q, 10, exact=False)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_s, want_s, rtol=1e-3, atol=1e-3)
    # the scores are knn_search's fp32 scores of the ids: rescoring agrees to fp32 rounding
    torch.testing.assert_close(got_s, knnfast.knn_rescore(q, ds.keys, got_i, metric),
                               rtol=1e-4, atol=1e-4)
    for nprobe in (1, 32):  # a per-call nprobe, as FAISS's
        s, i = ds.search(q, 10, exact=False, nprobe=nprobe)
        ds._lists, lists = None, ds._lists
        assert torch.equal(i, ds.search(q, 10, exact=False, nprobe=nprobe)[1])
        ds._lists = lists


def test_all_lists_probed_is_exact_search(tmp_path):
    ds = _store(tmp_path).to("cpu")
    ds.build_index("IVF16,Flat", nprobe=16, progress=False)
    ds.use_lists()
    q = _queries(ds)
    s, i = ds.search(q, 7, exact=False)
    es, ei = ds.search(q, 7, exact=True)
    assert torch.equal(i, ei)
    torch.testing.assert_close(s, es, rtol=1e-5, atol=1e-4)


def test_exclude_is_in_datastore_ids(tmp_path):
    ds = _store(tmp_path).to("cpu")
    ds.build_index("IVF16,Flat", nprobe=16, progress=False)
    ds.use_lists()
    q = ds.keys[[5, 700, 2999]].float()
    ex = torch.tensor([5, -1, 2999])
    s, i = ds.search(q, 3, exact=False, exclude=ex)
    es, ei = ds.search(q, 3, exact=True, exclude=ex)
    assert torch.equal(i, ei)
    assert i[1, 0] == 700 and 5 not in i[0].tolist() and 2999 not in i[2].tolist()
    with pytest.raises(ValueError, match=r"exclude must hold ids in \[-1, 3000\), got 3000 at row 1"):
        ds.search(q, 3, exact=False, exclude=torch.tensor([5, 3000, -1]))


def test_decoder_through_lists_equals_decoder_through_faiss(tmp_path):
    ds = _store(tmp_path).to("cpu")
    ds.build_index("IVF32,Flat", nprobe=8, progress=False)
    hidden, logits = _queries(ds, 12), torch.randn(12, 50)
    want = KNNDecoder(ds, k=8, temperature=10.0, lam=0.5)(hidden, logits)
    got = KNNDecoder(ds.use_lists(), k=8, temperature=10.0, lam=0.5)(hidden, logits)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_reduced_and_pruned_stores_search_their_lists(tmp_path):
    ds = _store(tmp_path)
    for small in (ds.reduce_dim(str(tmp_path / "pca"), 8, progress=False),
                  ds.prune(str(tmp_path / "pruned"), k=4, progress=False)):
        small = small.to("cpu")
        small.build_index("IVF8,Flat", nprobe=8, progress=False)
        q = _queries(ds, 6)
        es, ei = small.search(q, 5, exact=True)
        s, i = small.use_lists().search(q, 5, exact=False)
        assert torch.equal(i, ei)


def test_misuse_is_a_clear_error(tmp_path):
    ds = _store(tmp_path)
    ds.build_index("IVF8,Flat", nprobe=2, progress=False)
    with pytest.raises(knnfast.DatastoreError, match="memmapped; load them first"):
        ds.use_lists()
    ram = ds.to("cpu")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="use_lists: nprobe must be an int >= 1"):
            ram.use_lists(bad)
    with pytest.raises(ValueError, match="use_lists: pack must be one of None, 'int8', "
                                         "'bf16', got 'yes'"):
        ram.use_lists(pack="yes")
    ram.use_lists()
    with pytest.raises(ValueError, match="nprobe must be an int >= 1"):
        ram.search(_queries(ram), 3, exact=False, nprobe=0)
    with pytest.raises(ValueError, match="built for metric 'l2', not 'ip'"):
        ram.search(_queries(ram), 3, exact=False, metric="ip")
    flat = _store(tmp_path, name="flat").to("cpu")
    flat.build_index("Flat", progress=False)
    with pytest.raises(knnfast.DatastoreError, match="not an IVF index"):
        flat.use_lists()
    with pytest.raises(knnfast.DatastoreError, match="no index.faiss"):
        _store(tmp_path, name="none").to("cpu").use_lists()


def test_skipped_rows_probe_nothing_instead_of_splitting_the_batch(tmp_path, monkeypatch):
    """With a skip rule, the lists search takes the row mask (skipped rows probe no list):
    the same neighbours and log-probs as splitting the batch, and the same skip counts."""
    from knnfast import RetrievalSkip
    ds = _store(tmp_path).to("cpu")
    ds.build_index("IVF32,Flat", nprobe=8, progress=False)
    ds.use_lists()
    assert ds.masks_rows() and ds.masks_rows(False) and not ds.masks_rows(True)
    hidden = _queries(ds, 16)
    logits = torch.randn(16, 50)
    logits[::3, 7] = 30.0  # confident rows: skipped
    dec = KNNDecoder(ds, k=8, temperature=10.0, lam=0.5, skip=RetrievalSkip(confidence=0.9))
    calls = []
    real = ds.neighbours
    monkeypatch.setattr(ds, "neighbours",
                        lambda *a, **kw: calls.append(kw.get("rows")) or real(*a, **kw))
    masked = dec(hidden, logits)
    assert calls[-1] is not None and calls[-1].shape == (16,) and int(calls[-1].sum()) == 10
    nb = dec.retrieve_step(hidden, logits)
    assert (nb.ids[::3] == -1).all() and (nb.ids[1::3] >= 0).all()
    monkeypatch.setattr(ds, "masks_rows", lambda exact=None: False)
    split = dec(hidden, logits)
    assert calls[-1] is None  # the split path searched the 10 kept rows only
    assert torch.equal(masked, split)
    assert dec.skip_stats.rows == 48 and dec.skip_stats.skipped_rows == 18


def test_neighbours_is_search_and_lookup_in_one_call(tmp_path):
    """Datastore.neighbours: search + lookup with the tokens looked up where the datastore
    lives; the same scores, ids and tokens as the two calls, for exact search, FAISS and the
    lists, with exclude and a row mask."""
    ds = _store(tmp_path).to("cpu")
    ds.build_index("IVF16,Flat", nprobe=4, progress=False)
    q = _queries(ds, 9)
    ex = torch.tensor([3, -1, 5, -1, -1, 2999, -1, 0, -1])
    rows = torch.tensor([True, False] * 4 + [True])
    for exact, lists in ((True, False), (False, False), (False, True)):
        if lists:
            ds.use_lists()
        kw = dict(exclude=ex, rows=rows) if lists else dict(exclude=ex)
        s, i = ds.search(q, 6, exact=exact, **kw)
        ns, ni, nt = ds.neighbours(q, 6, exact=exact, **kw)
        assert torch.equal(ns, s) and torch.equal(ni, i)
        assert nt.dtype == torch.int64 and torch.equal(nt, ds.lookup(i))
        if lists:
            assert (ni[~rows] == -1).all() and (nt[~rows] == -1).all()
