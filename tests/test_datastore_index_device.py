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
