"""FAISS index placement (issue 16): device="all" shards the index over every visible GPU
(faiss-gpu only); without GPU support every GPU placement is a clear ValueError, never a
crash deep inside faiss."""
import pytest
import torch

import knnfast
from knnfast.storage import index as faiss_index


def _store(tmp_path):
    g = torch.Generator().manual_seed(0)
    with knnfast.Datastore.create(str(tmp_path / "ds"), 8, torch.float32, 50,
                                  progress=False) as w:
        w.add(torch.randn(300, 8, generator=g), torch.randint(0, 50, (300,), generator=g))
    return knnfast.Datastore.open(str(tmp_path / "ds"))


def _gpus():
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def test_device_names_are_checked():
    with pytest.raises(ValueError, match="'auto', 'cpu', 'cuda' or 'all'"):
        faiss_index.resolve_faiss_device("gpu")


@pytest.mark.skipif(_gpus() > 0, reason="this faiss sees GPUs")
@pytest.mark.parametrize("device", ["cuda", "all"])
def test_gpu_placements_need_faiss_gpu(tmp_path, device):
    ds = _store(tmp_path)
    with pytest.raises(ValueError, match=f"device='{device}' needs faiss-gpu"):
        ds.build_index("IVF8,Flat", device=device)
    ds.build_index("IVF8,Flat", device="cpu")
    with pytest.raises(ValueError, match=f"device='{device}' needs faiss-gpu"):
        ds.load_index(device=device)


@pytest.mark.skipif(_gpus() < 1, reason="needs faiss-gpu and a GPU")
def test_index_sharded_over_all_gpus_finds_what_the_cpu_index_finds(tmp_path):
    ds = _store(tmp_path)
    ds.build_index("Flat", device="cpu")
    q = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    want = ds.search(q, 4, exact=False)
    ds.load_index(device="all")
    got = ds.search(q, 4, exact=False)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)


def _cpu_stand_in_for_all_gpus(monkeypatch, gpus=2):
    """faiss's multi-GPU cloner replaced by what it builds, on CPU: an IndexShards whose g-th
    part holds the g-th contiguous run of the entries (``shard=True``; ids successive), so
    the device="all" plumbing runs here. Returns the cloner options it was called with."""
    import faiss
    seen, kept = [], []

    class Options:
        shard = False

    def to_all(index, co=None):
        seen.append(co)
        assert co is not None and co.shard, "device='all' must shard, not replicate"
        vectors = index.reconstruct_n(0, index.ntotal)
        shards = faiss.IndexShards(index.d, False, True)
        parts = []
        for g in range(gpus):
            part = faiss.IndexFlat(index.d, index.metric_type)
            part.add(vectors[g * len(vectors) // gpus:(g + 1) * len(vectors) // gpus])
            parts.append(part)
            shards.add_shard(part)
        kept.extend(parts)  # IndexShards does not own its parts
        return shards

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: gpus, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all, raising=False)
    return seen


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_device_all_plumbing_with_a_cpu_stand_in(tmp_path, monkeypatch, metric):
    """Not a GPU test: the cloner is a CPU stand-in. It checks that load_index("all") asks
    for a sharded clone and that search maps the shards' successive ids back to entries."""
    ds = _store(tmp_path)
    ds.build_index("Flat", metric=metric, device="cpu")
    q = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    want = ds.search(q, 5, exact=False, metric=metric)
    seen = _cpu_stand_in_for_all_gpus(monkeypatch)
    ds.load_index(device="all")
    assert len(seen) == 1 and seen[0].shard
    got = ds.search(q, 5, exact=False, metric=metric)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])


# ------------------------------------------------------------- FAISS with torch tensors (issue 17)

@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_search_through_torch_utils_equals_the_numpy_path(tmp_path, monkeypatch, metric):
    """FAISS is queried with torch tensors (faiss.contrib.torch_utils); a FAISS without
    that module takes numpy. Both give the same neighbours, scores and excluded ids."""
    import sys
    ds = _store(tmp_path)
    ds.build_index("IVF8,Flat", metric=metric, nprobe=8, device="cpu", progress=False)
    q = torch.randn(6, 8, generator=torch.Generator().manual_seed(2))
    exclude = torch.tensor([-1, 3, 0, -1, 7, 299])
    got = ds.search(q, 5, exact=False, metric=metric, exclude=exclude)
    monkeypatch.setitem(sys.modules, "faiss.contrib.torch_utils", None)  # import fails
    want = ds.search(q, 5, exact=False, metric=metric, exclude=exclude)
    assert got[0].device.type == got[1].device.type == "cpu"
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert not (got[1] == exclude[:, None]).any()
    exact = ds.search(q, 5, exact=True, metric=metric)
    assert torch.equal(got[1][:, 0][exclude == -1], exact[1][:, 0][exclude == -1])


def test_direct_map_is_made_once_per_index(tmp_path, monkeypatch):
    """reconstructed_scores (exact neighbours, the index's own scores) needs the IVF direct
    map; it is built on the first such search, not on every one."""
    import faiss
    ds = _store(tmp_path)
    ds.build_index("IVF8,Flat", nprobe=8, device="cpu", progress=False)
    calls = []
    make = faiss.IndexIVF.make_direct_map
    monkeypatch.setattr(faiss.IndexIVF, "make_direct_map",
                        lambda self, *a: calls.append(1) or make(self, *a))
    q = torch.randn(3, 8, generator=torch.Generator().manual_seed(3))
    first = ds.search(q, 4, exact=True, rescore=False)
    second = ds.search(q, 4, exact=True, rescore=False)
    assert len(calls) == 1
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    exact = ds.search(q, 4, exact=True, rescore=True)
    assert torch.equal(first[1], exact[1])
    torch.testing.assert_close(first[0], exact[0], rtol=1e-4, atol=1e-4)
