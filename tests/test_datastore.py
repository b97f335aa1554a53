"""knnfast.Datastore: on-disk round trip, truncation / corruption checks, interrupted and
resumed builds (including a real killed process), add() validation, exact search (in RAM
and streamed from the memmap) against knnfast.reference, FAISS indexes with every
exact x rescore combination, lookup, subsample, to()."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import knnfast.storage.files as dsfiles
import knnfast.storage.search as dssearch
import knnfast.reference as ref
from knnfast import Datastore, DatastoreError
from knnfast.storage import FORMAT_VERSION
from helpers import assert_topk_parity, check_bad_input, exact_scores

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 50



pytestmark = pytest.mark.usefixtures("single_threaded")


def _data(N, D, seed=0, V=V):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, D, generator=g)
    values = torch.randint(0, V, (N,), generator=g)
    return keys, values


def _build(path, keys, values, *, key_dtype=torch.float16, metric="l2", chunks=3,
           vocab_size=V, **kw):
    bounds = torch.linspace(0, len(keys), chunks + 1).long().tolist()
    with Datastore.create(path, keys.shape[1], key_dtype=key_dtype, vocab_size=vocab_size,
                          metric=metric, progress=False, **kw) as w:
        for s, e in zip(bounds[:-1], bounds[1:]):
            w.add(keys[s:e], values[s:e], cursor=e)
    return Datastore.open(path)


@pytest.fixture
def small_ds(tmp_path):
    keys, values = _data(300, 16)
    return _build(tmp_path / "ds", keys, values), keys, values


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_round_trip(tmp_path, key_dtype):
    keys, values = _data(103, 12)
    keys[5] *= 1000.0  # out of fp16's precision sweet spot, still finite
    keys = keys.clamp(-6e4, 6e4)
    path = tmp_path / "ds"
    bounds = [0, 1, 40, 40, 103]  # includes a one-row and an empty chunk
    with Datastore.create(path, 12, key_dtype=key_dtype, vocab_size=V, metric="ip",
                          hidden="att", model_id="tiny", progress=False) as w:
        for s, e in zip(bounds[:-1], bounds[1:]):
            w.add(keys[s:e], values[s:e].to(torch.int32), cursor={"upto": e})
            assert w.count == e and w.cursor == {"upto": e}
    assert not os.path.exists(str(path) + ".building")
    assert isinstance(w.datastore, Datastore)
    ds = Datastore.open(path)
    assert ds.is_memmapped
    stored = keys.to(key_dtype)
    assert ds.keys.dtype == key_dtype and ds.keys.shape == (103, 12)
    assert torch.equal(ds.keys.view(torch.uint8) if key_dtype != torch.float32 else ds.keys,
                       stored.view(torch.uint8) if key_dtype != torch.float32 else stored)
    assert torch.equal(ds.values.long(), values)
    assert ds.values.dtype == torch.int32
    assert len(ds) == 103 and ds.dim == 12 and ds.vocab_size == V and ds.metric == "ip"
    m = ds.meta
    assert m["format_version"] == FORMAT_VERSION == 1
    assert m["size"] == 103 and m["dim"] == 12 and m["vocab_size"] == V
    assert m["metric"] == "ip" and m["hidden"] == "att" and m["model_id"] == "tiny"
    assert m["key_dtype"] == {torch.float16: "float16", torch.bfloat16: "bfloat16",
                              torch.float32: "float32"}[key_dtype]
    es = stored.element_size()
    assert m["bytes"] == {"keys": 103 * 12 * es, "values": 103 * 4, "key_sq_norms": 103 * 4}
    for name, nbytes in m["bytes"].items():
        assert os.path.getsize(path / name) == nbytes
    sf = stored.float()
    assert ds.key_sq_norms.dtype == torch.float32
    torch.testing.assert_close(ds.key_sq_norms, (sf * sf).sum(1), rtol=1e-6, atol=0)
    with open(path / "meta.json") as f:
        assert json.load(f) == m


# --------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("name", ["keys", "values", "key_sq_norms"])
@pytest.mark.parametrize("delta", [-3, 5])
def test_truncated_or_grown_file_detected(small_ds, name, delta):
    ds, _, _ = small_ds
    f = os.path.join(ds.path, name)
    want = os.path.getsize(f)
    if delta < 0:
        os.truncate(f, want + delta)
    else:
        with open(f, "ab") as fh:
            fh.write(b"\0" * delta)
    with pytest.raises(DatastoreError) as e:
        Datastore.open(ds.path)
    msg = str(e.value)
    assert f in msg and str(want) in msg and str(want + delta) in msg


def test_missing_file(small_ds):
    ds, _, _ = small_ds
    os.remove(os.path.join(ds.path, "values"))
    with pytest.raises(DatastoreError, match="values"):
        Datastore.open(ds.path)


def test_missing_meta(small_ds):
    ds, _, _ = small_ds
    os.remove(os.path.join(ds.path, "meta.json"))
    with pytest.raises(DatastoreError, match="meta.json not found"):
        Datastore.open(ds.path)
    with pytest.raises(DatastoreError, match="meta.json not found"):
        Datastore.open(os.path.join(ds.path, "nowhere"))


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_bad_format_version(small_ds, version):
    ds, _, _ = small_ds
    meta = dict(ds.meta, format_version=version)
    with open(os.path.join(ds.path, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(DatastoreError, match="format version"):
        Datastore.open(ds.path)


def test_bad_meta_json(small_ds):
    ds, _, _ = small_ds
    with open(os.path.join(ds.path, "meta.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(DatastoreError, match="not valid JSON"):
        Datastore.open(ds.path)


# --------------------------------------------------------------------------- interrupted builds


def _assert_exact(ds, keys, values, key_dtype=torch.float16):
    assert len(ds) == len(keys)
    assert torch.equal(ds.keys.float(), keys.to(key_dtype).float())
    assert torch.equal(ds.values.long(), values)


def test_interrupted_build_then_resume(tmp_path):
    keys, values = _data(90, 8)
    path = str(tmp_path / "ds")
    with pytest.raises(RuntimeError, match="boom"):
        with Datastore.create(path, 8, vocab_size=V, progress=False) as w:
            w.add(keys[:20], values[:20], cursor=20)
            w.add(keys[20:50], values[20:50], cursor=50)
            raise RuntimeError("boom")
    assert not os.path.exists(path)
    assert os.path.isdir(path + ".building")
    with pytest.raises(DatastoreError) as e:
        Datastore.open(path)
    assert path + ".building" in str(e.value) and "resume=True" in str(e.value)
    with pytest.raises(DatastoreError) as e:
        Datastore.create(path, 8, vocab_size=V, progress=False)
    assert "resume=True" in str(e.value) and "overwrite=True" in str(e.value)
    assert "50" in str(e.value)  # committed count
    assert Datastore.building_cursor(path) == 50
    with Datastore.create(path, 8, vocab_size=V, resume=True, progress=False) as w:
        assert w.count == 50 and w.cursor == 50
        w.add(keys[w.cursor:], values[w.cursor:], cursor=90)
    assert not os.path.exists(path + ".building")
    _assert_exact(Datastore.open(path), keys, values)


def test_overwrite_discards_interrupted_build(tmp_path):
    keys, values = _data(30, 8)
    path = str(tmp_path / "ds")
    w = Datastore.create(path, 8, vocab_size=V, progress=False)
    w.add(keys[:10], values[:10])
    w.close()
    with Datastore.create(path, 8, vocab_size=V, overwrite=True, progress=False) as w:
        assert w.count == 0
        w.add(keys, values)
    _assert_exact(Datastore.open(path), keys, values)
    with pytest.raises(FileExistsError):
        Datastore.create(path, 8, vocab_size=V, progress=False)


def test_resume_drops_uncommitted_bytes(tmp_path):
    """A kill during add(): bytes past the committed count in keys/values are dropped."""
    keys, values = _data(64, 8)
    path = str(tmp_path / "ds")
    w = Datastore.create(path, 8, vocab_size=V, progress=False)
    w.add(keys[:16], values[:16], cursor=16)
    w.add(keys[16:40], values[16:40], cursor=40)
    w.close()
    b = path + ".building"
    with open(os.path.join(b, "keys"), "ab") as f:   # 2.5 rows of a half-written chunk
        f.write(keys[40:43].half().numpy().tobytes()[:40])
    with open(os.path.join(b, "values"), "ab") as f:
        f.write(b"\x07\x00\x00\x00\x09\x00")
    with Datastore.create(path, 8, vocab_size=V, resume=True, progress=False) as w:
        assert (w.count, w.cursor) == (40, 40)
        assert os.path.getsize(os.path.join(b, "keys")) == 40 * 8 * 2
        assert os.path.getsize(os.path.join(b, "values")) == 40 * 4
        w.add(keys[40:], values[40:], cursor=64)
    _assert_exact(Datastore.open(path), keys, values)


def test_resume_with_missing_committed_bytes_raises(tmp_path):
    keys, values = _data(20, 8)
    path = str(tmp_path / "ds")
    w = Datastore.create(path, 8, vocab_size=V, progress=False)
    w.add(keys, values)
    w.close()
    os.truncate(path + ".building/keys", 10)
    with pytest.raises(DatastoreError, match="corrupt"):
        Datastore.create(path, 8, vocab_size=V, resume=True, progress=False)


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {repo!r})
    import knnfast
    keys, values = torch.load({data!r})
    w = knnfast.Datastore.create({path!r}, keys.shape[1], vocab_size=50, progress=False)
    for s, e in [(0, 17), (17, 40), (40, 71)]:
        w.add(keys[s:e], values[s:e], cursor=e)
    # start the next chunk but die before it is committed
    with open(os.path.join(w.tmp_dir, "keys"), "ab") as f:
        f.write(keys[71:80].half().numpy().tobytes()[:100])
    with open(os.path.join(w.tmp_dir, "values"), "ab") as f:
        f.write(values[71:80].int().numpy().tobytes()[:13])
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_resume_after_real_kill(tmp_path):
    keys, values = _data(120, 8)
    data = str(tmp_path / "data.pt")
    torch.save((keys, values), data)
    path = str(tmp_path / "ds")
    script = _KILL_SCRIPT.format(repo=REPO, data=data, path=path)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not os.path.exists(path)
    assert Datastore.building_cursor(path) == 71
    with Datastore.create(path, 8, vocab_size=V, resume=True, progress=False) as w:
        assert (w.count, w.cursor) == (71, 71)
        w.add(keys[71:100], values[71:100], cursor=100)
        w.add(keys[100:], values[100:], cursor=120)
    _assert_exact(Datastore.open(path), keys, values)


@pytest.mark.parametrize("change", [dict(dim=9), dict(key_dtype=torch.float32),
                                    dict(vocab_size=V + 1), dict(metric="ip")],
                         ids=lambda d: next(iter(d)))
def test_resume_with_different_settings_raises(tmp_path, change):
    keys, values = _data(10, 8)
    path = str(tmp_path / "ds")
    w = Datastore.create(path, 8, vocab_size=V, progress=False)
    w.add(keys, values)
    w.close()
    kw = dict(dim=8, key_dtype=torch.float16, vocab_size=V, metric="l2")
    kw.update(change)
    name = next(iter(change))
    with pytest.raises(DatastoreError, match=name):
        Datastore.create(path, kw.pop("dim"), resume=True, progress=False, **kw)


# --------------------------------------------------------------------------- add() validation


@pytest.mark.parametrize("case,arg", [
    ("wrong_dim", "keys"), ("keys_1d", "keys"), ("int_keys", "keys"), ("float_values", "values"),
    ("values_2d", "values"), ("short_values", "values"), ("too_big", "values"),
    ("negative", "values"), ("nan_key", "keys"), ("inf_key", "keys"), ("fp16_overflow", "keys"),
    ("bool_values", "values"),
])
def test_add_bad_inputs(tmp_path, case, arg):
    keys, values = _data(6, 8)
    bad = {
        "wrong_dim": (torch.randn(6, 7), values),
        "keys_1d": (torch.randn(8), values[:1]),
        "int_keys": (torch.ones(6, 8, dtype=torch.long), values),
        "float_values": (keys, values.float()),
        "values_2d": (keys, values[:, None]),
        "short_values": (keys, values[:5]),
        "too_big": (keys, torch.tensor([0, 1, 2, V, 3, 4])),
        "negative": (keys, torch.tensor([0, 1, -1, 2, 3, 4])),
        "nan_key": (keys.index_fill(0, torch.tensor([3]), float("nan")), values),
        "inf_key": (keys.index_fill(0, torch.tensor([2]), float("inf")), values),
        "fp16_overflow": (keys.index_fill(0, torch.tensor([2]), 1e6), values),
        "bool_values": (keys, values > 3),
    }[case]
    path = str(tmp_path / "ds")
    w = Datastore.create(path, 8, vocab_size=V, progress=False)
    w.add(keys[:2], values[:2], cursor=2)
    with pytest.raises(ValueError, match=arg):
        w.add(*bad)
    # nothing of the bad chunk was written or committed
    assert w.count == 2 and w.cursor == 2
    w.add(keys, values)
    ds = w.finalize()
    assert len(ds) == 8
    assert torch.equal(ds.values.long(), torch.cat([values[:2], values]))


def test_finalize_empty_raises(tmp_path):
    with pytest.raises(DatastoreError, match="no entries"):
        with Datastore.create(tmp_path / "ds", 8, progress=False):
            pass
    assert not os.path.exists(tmp_path / "ds")


@pytest.mark.parametrize("kw,match", [(dict(dim=0), "dim"), (dict(dim=3.0), "dim"),
                                      (dict(metric="l1"), "metric"),
                                      (dict(key_dtype=torch.int8), "key_dtype")])
def test_create_bad_args(tmp_path, kw, match):
    args = dict(dim=4)
    args.update(kw)
    check_bad_input(Datastore.create, match, tmp_path / "ds", progress=False, **args)


# --------------------------------------------------------------------------- exact search


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
@pytest.mark.parametrize("key_dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("k", [1, 7])
def test_exact_search_matches_reference(tmp_path, metric, key_dtype, k):
    keys, values = _data(257, 16)
    ds = _build(tmp_path / "ds", keys, values, key_dtype=key_dtype, metric=metric)
    q = torch.randn(9, 16)
    s, i = ds.search(q, k)
    rs, ri = ref.knn_search(q, ds.keys.float(), k, metric)
    assert s.dtype == torch.float32 and i.dtype == torch.int64 and s.shape == (9, k)
    assert_topk_parity(s, i, rs, ri, q, ds.keys, metric)
    # and against float64 brute force over the stored keys
    full = exact_scores(q, ds.keys, metric)
    top = full.topk(k, dim=1)
    torch.testing.assert_close(s.double(), top.values, rtol=1e-4, atol=1e-4)
    # a metric other than the datastore's default
    other = "ip" if metric != "ip" else "l2"
    s2, i2 = ds.search(q, k, metric=other)
    rs2, ri2 = ref.knn_search(q, ds.keys.float(), k, other)
    assert_topk_parity(s2, i2, rs2, ri2, q, ds.keys, other)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_streamed_search_equals_in_ram(tmp_path, monkeypatch, metric):
    keys, values = _data(200, 16)
    keys[150:] = keys[:50]           # exact duplicates in later chunks: ties go to smaller id
    ds = _build(tmp_path / "ds", keys, values, metric=metric)
    ram = ds.to("cpu")
    q = torch.cat([torch.randn(5, 16), keys[:3], keys[160:162]])
    exclude = torch.tensor([-1, 3, -1, 199, 0, 0, 1, -1, 10, 11])
    want = {}
    for kk in (1, 8, 250):
        want[kk] = (ram.search(q, kk), ram.search(q, kk, exclude=exclude))
    calls = []
    real = dssearch.ops.knn_search

    def spy(q_, keys_, *a, **kw):
        calls.append(keys_.shape[0])
        return real(q_, keys_, *a, **kw)

    monkeypatch.setattr(dssearch.ops, "knn_search", spy)
    monkeypatch.setattr(dsfiles, "CHUNK_BYTES", 16 * 2 * 23 // 4 + 1)  # 23-row chunks
    for kk in (1, 8, 250):
        calls.clear()
        (s, i), (se, ie) = ds.search(q, kk), ds.search(q, kk, exclude=exclude)
        assert len(calls) == 2 * 9 and max(calls) == 23  # several chunks were used
        assert torch.equal(i, want[kk][0][1]), (kk, i, want[kk][0][1])
        torch.testing.assert_close(s, want[kk][0][0], rtol=1e-6, atol=1e-6)
        assert torch.equal(ie, want[kk][1][1])
        torch.testing.assert_close(se, want[kk][1][0], rtol=1e-6, atol=1e-6)
    if metric == "l2":  # duplicates of keys[0:3] at 150..152: the smaller id wins
        s, i = ds.search(keys[:3], 2)
        assert i.tolist() == [[0, 150], [1, 151], [2, 152]]


def test_search_exclude(small_ds):
    ds, keys, _ = small_ds
    q = ds.keys[:6].float()
    excl = torch.arange(6)
    s, i = ds.search(q, 5, exclude=excl)
    s1, i1 = ds.search(q, 6)
    assert (i1[:, 0] == excl).all()           # itself is the nearest ...
    assert torch.equal(i, i1[:, 1:])          # ... and excluded, the next 5 follow
    torch.testing.assert_close(s, s1[:, 1:])
    assert not (i == excl[:, None]).any()
    rs, ri = ref.knn_search(q, ds.keys.float(), 5, "l2", exclude=excl)
    assert_topk_parity(s, i, rs, ri, q, ds.keys, "l2")
    s_none, i_none = ds.search(q, 5, exclude=torch.full((6,), -1))
    assert torch.equal(i_none, i1[:, :5])


def test_search_fewer_entries_than_k(tmp_path):
    keys, values = _data(5, 4)
    ds = _build(tmp_path / "ds", keys, values, chunks=2)
    q = torch.randn(3, 4)
    s, i = ds.search(q, 9)
    assert s.shape == (3, 9)
    assert torch.isneginf(s[:, 5:]).all() and (i[:, 5:] == -1).all()
    assert torch.isfinite(s[:, :5]).all()
    assert sorted(i[0, :5].tolist()) == [0, 1, 2, 3, 4]
    assert (ds.lookup(i)[:, 5:] == -1).all()
    s, i = ds.search(q, 5, exclude=torch.tensor([0, -1, 4]))
    assert i[0, 4] == -1 and torch.isneginf(s[0, 4]) and i[1, 4] >= 0


def test_search_bad_inputs(small_ds):
    ds, _, _ = small_ds
    with pytest.raises(ValueError, match="queries"):
        ds.search(torch.randn(2, 15), 3)
    with pytest.raises(ValueError, match="queries"):
        ds.search(torch.randn(16), 3)
    with pytest.raises(ValueError, match="metric"):
        ds.search(torch.randn(2, 16), 3, metric="l1")
    with pytest.raises(ValueError, match="k"):
        ds.search(torch.randn(2, 16), 0)


# --------------------------------------------------------------------------- FAISS

faiss = pytest.importorskip("faiss")


@pytest.fixture
def one_faiss_thread():
    """Train/search FAISS single-threaded: OpenMP spinning on a busy 2-core box costs seconds."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _rows_equal_or_tied(ids, ref_ids, q, keys, metric, tol=1e-3):
    differ = ids != ref_ids
    if differ.any():
        full = exact_scores(q, keys, metric)
        a = full.gather(1, ids.clamp(min=0))[differ]
        b = full.gather(1, ref_ids.clamp(min=0))[differ]
        assert torch.allclose(a, b, rtol=tol, atol=tol), (ids, ref_ids)


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_flat_index_equals_exact(tmp_path, one_faiss_thread, metric):
    keys, values = _data(400, 16)
    ds = _build(tmp_path / "ds", keys, values, metric=metric)
    ds.build_index("Flat", progress=False)
    q = torch.randn(25, 16)
    es, ei = ds.search(q, 8, exact=True)
    fs, fi = ds.search(q, 8)                     # default with an index: FAISS, its scores
    _rows_equal_or_tied(fi, ei, q, ds.keys, metric)
    torch.testing.assert_close(fs, es, rtol=1e-4, atol=1e-3)
    # rescore: exact scores of FAISS's ids
    rs, ri = ds.search(q, 8, exact=False, rescore=True)
    _rows_equal_or_tied(ri, ei, q, ds.keys, metric)
    torch.testing.assert_close(rs, es, rtol=1e-5, atol=1e-5)
    # exact ids, scores as the (lossless) index computes them
    xs, xi = ds.search(q, 8, exact=True, rescore=False)
    assert torch.equal(xi, ei)
    torch.testing.assert_close(xs, es, rtol=1e-4, atol=1e-3)


def test_ivf_all_lists_equals_exact(tmp_path, one_faiss_thread):
    keys, values = _data(400, 16)
    ds = _build(tmp_path / "ds", keys, values)
    ds.build_index("IVF8,Flat", nprobe=8, progress=False)
    q = torch.randn(20, 16)
    es, ei = ds.search(q, 10, exact=True)
    fs, fi = ds.search(q, 10, exact=False)
    _rows_equal_or_tied(fi, ei, q, ds.keys, "l2")
    torch.testing.assert_close(fs, es, rtol=1e-4, atol=1e-3)
    # one list only: still valid entries, exact scores after rescoring
    s1, i1 = ds.search(q, 10, exact=False, rescore=True, nprobe=1)
    torch.testing.assert_close(s1, ref.knn_rescore(q, ds.keys.float(), i1, "l2"))


def test_ivfpq_exact_rescore_combinations(tmp_path, one_faiss_thread):
    keys, values = _data(2000, 16, seed=3)
    ds = _build(tmp_path / "ds", keys, values)
    ds.build_index("IVF4,PQ4x4", nprobe=4, progress=False)
    q = torch.randn(16, 16)
    k = 6
    es, ei = ds.search(q, k, exact=True, rescore=True)
    rs, ri = ref.knn_search(q, ds.keys.float(), k, "l2")
    assert_topk_parity(es, ei, rs, ri, q, ds.keys, "l2")

    # (False, False): the index's ids and its (approximate) scores
    as_, ai = ds.search(q, k, exact=False, rescore=False)
    assert (as_[:, :-1] >= as_[:, 1:]).all()
    true_of_ai = ref.knn_rescore(q, ds.keys.float(), ai, "l2")
    assert not torch.allclose(as_, true_of_ai, rtol=1e-3, atol=1e-3)  # PQ is lossy

    # (False, True): same ids, exact scores, re-sorted descending
    bs, bi = ds.search(q, k, exact=False, rescore=True)
    assert torch.equal(bi.sort(1).values, ai.sort(1).values)
    assert (bs[:, :-1] >= bs[:, 1:]).all()
    torch.testing.assert_close(bs, ref.knn_rescore(q, ds.keys.float(), bi, "l2"))
    torch.testing.assert_close(bs, true_of_ai.sort(1, descending=True).values)

    # (True, False): exact neighbours, scores as the index's reconstructed keys give them
    cs, ci = ds.search(q, k, exact=True, rescore=False)
    assert torch.equal(ci, ei)
    ivf = faiss.extract_index_ivf(ds.index)
    ivf.make_direct_map()
    recon = torch.from_numpy(ds.index.reconstruct_batch(ci.reshape(-1).numpy())).view(16, k, 16)
    torch.testing.assert_close(cs, -((q[:, None, :] - recon) ** 2).sum(-1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(cs, es, rtol=1e-3, atol=1e-3)


def test_index_saved_and_reloaded(tmp_path, one_faiss_thread):
    keys, values = _data(400, 16)
    ds = _build(tmp_path / "ds", keys, values, metric="ip")
    assert not ds.has_saved_index()
    ds.build_index("IVF8,Flat", nprobe=3, seed=7, train_size=300, progress=False)
    assert ds.has_saved_index()
    with open(os.path.join(ds.path, "index.json")) as f:
        info = json.load(f)
    assert info == {"factory": "IVF8,Flat", "metric": "ip", "ntotal": 400, "nprobe": 3,
                    "seed": 7, "train_size": 300}
    q = torch.randn(10, 16)
    want = ds.search(q, 5)
    again = Datastore.open(ds.path)
    assert again._index is None and again.has_saved_index()
    got = again.search(q, 5)                      # default: the saved index, nprobe 3
    assert again._index is not None
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    ex = again.search(q, 5, exact=True)
    ex_ref = ref.knn_search(q, again.keys.float(), 5, "ip")
    assert_topk_parity(ex[0], ex[1], ex_ref[0], ex_ref[1], q, again.keys, "ip")
    with pytest.raises(ValueError, match="metric"):
        again.search(q, 5, exact=False, metric="l2")


def test_index_search_exclude(tmp_path, one_faiss_thread):
    keys, values = _data(300, 16)
    ds = _build(tmp_path / "ds", keys, values)
    ds.build_index("Flat", save=False, progress=False)
    q = ds.keys[:4].float()
    s, i = ds.search(q, 3, exact=False, exclude=torch.arange(4))
    s_all, i_all = ds.search(q, 4, exact=False)
    assert torch.equal(i, i_all[:, 1:])


def test_build_index_bad_factory(small_ds):
    ds, _, _ = small_ds
    with pytest.raises(ValueError, match="factory"):
        ds.build_index("NotAnIndex", progress=False)


# --------------------------------------------------------------------------- lookup, subsample, to


def test_lookup(small_ds):
    ds, _, values = small_ds
    idx = torch.tensor([[0, 5, -1], [299, -1, 7]])
    got = ds.lookup(idx)
    assert got.dtype == torch.int64
    assert got.tolist() == [[int(values[0]), int(values[5]), -1], [int(values[299]), -1, int(values[7])]]
    with pytest.raises(ValueError):
        ds.lookup(torch.tensor([300]))
    with pytest.raises(ValueError):
        ds.lookup(torch.tensor([-2]))


def test_subsample(tmp_path):
    keys, _ = _data(101, 8)
    values = torch.arange(101)                 # values identify the rows
    ds = _build(tmp_path / "ds", keys, values, vocab_size=None)
    a = ds.subsample(0.3, seed=1, progress=False)
    assert len(a) == round(0.3 * 101) == 30
    picked = a.values.long()
    assert (picked[1:] > picked[:-1]).all()    # a subset, original order
    assert torch.equal(a.keys, ds.keys[picked])
    assert torch.equal(a.key_sq_norms, ds.key_sq_norms[picked])
    assert a.path == f"{ds.path}.sub0.3-s1"
    assert a.meta["extra"]["frac"] == 0.3 and a.meta["extra"]["seed"] == 1
    assert a.meta["extra"]["subsampled_from"] == ds.path
    b = ds.subsample(0.3, seed=1, path=tmp_path / "b", progress=False)
    assert torch.equal(b.values, a.values)
    c = ds.subsample(0.3, seed=2, path=tmp_path / "c", progress=False)
    assert not torch.equal(c.values, a.values)
    full = ds.subsample(1.0, seed=5, path=tmp_path / "full", progress=False)
    assert torch.equal(full.values.long(), values)
    for frac in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="frac"):
            ds.subsample(frac, progress=False)


def test_to_cpu(small_ds):
    ds, _, _ = small_ds
    ram = ds.to("cpu")
    assert ds.is_memmapped and not ram.is_memmapped
    assert torch.equal(ram.keys, ds.keys) and torch.equal(ram.values, ds.values)
    assert torch.equal(ram.key_sq_norms, ds.key_sq_norms)
    assert len(ram) == len(ds) and ram.meta == ds.meta
    q = torch.randn(7, 16)
    for metric in ("l2", "ip", "cos"):
        a, b = ds.search(q, 4, metric=metric), ram.search(q, 4, metric=metric)
        assert torch.equal(a[1], b[1])
        torch.testing.assert_close(a[0], b[0])
    ram.keys[0].zero_()                         # a copy, not a view of the file
    assert Datastore.open(ds.path).keys[0].abs().sum() > 0


# --------------------------------------------------------------------------- one writer per path


def test_second_writer_on_one_path_gets_a_clear_error(tmp_path):
    path = str(tmp_path / "ds")
    first = Datastore.create(path, dim=4, vocab_size=10, progress=False)
    first.add(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    for kwargs in ({"resume": True}, {"overwrite": True}):
        with pytest.raises(DatastoreError, match="is being built by another writer"):
            Datastore.create(path, dim=4, vocab_size=10, progress=False, **kwargs)
    first.add(torch.randn(2, 4), torch.tensor([4, 5]))      # overwrite=True destroyed nothing
    first.close()
    with Datastore.create(path, dim=4, vocab_size=10, progress=False, resume=True) as again:
        again.add(torch.randn(1, 4), torch.tensor([6]))
    assert Datastore.open(path).values[:].tolist() == [1, 2, 3, 4, 5, 6]


def test_second_writer_in_another_process(tmp_path):
    """Two processes (e.g. two ranks of a process group) building one path: the second fails
    at once naming the first's pid; the first finishes an intact datastore."""
    path = str(tmp_path / "ds")
    code = ("import sys, torch, knnfast\n"
            f"w = knnfast.Datastore.create({path!r}, dim=4, vocab_size=10, progress=False)\n"
            "w.add(torch.ones(2, 4), torch.tensor([1, 2]))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "w.add(torch.ones(1, 4), torch.tensor([3]))\n"
            "w.finalize()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(DatastoreError, match=f"another writer \\(pid {child.pid};"):
            Datastore.create(path, dim=4, vocab_size=10, progress=False, resume=True)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=120) == 0
    finally:
        child.kill()
    assert Datastore.open(path).values[:].tolist() == [1, 2, 3]


def test_create_makes_missing_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "ds"
    with Datastore.create(str(path), dim=2, vocab_size=5, progress=False) as w:
        w.add(torch.randn(2, 2), torch.tensor([1, 2]))
    assert len(Datastore.open(str(path))) == 2
