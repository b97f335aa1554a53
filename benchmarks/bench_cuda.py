"""CUDA benchmarks (issue #3 targets), skipped with the reason printed where no GPU or no CUDA
build of knnfast exists. Every timed call ends with torch.cuda.synchronize(), so medians are
wall-clock GPU times.

Cells:
  cuda_knn_interpolate  B = 640, V = 42,024, k = 8: fused vs reference vs one copy_;
                        extra_info hbm_fraction = (one read of the logits + one write of the
                        output) / time / peak HBM bandwidth (3.35 TB/s H100 SXM, 4.8 TB/s H200).
  cuda_knn_search       fp16 keys, N = 1,000,000, D = 1,024, k = 64, l2, B in {1, 16, 640}:
                        fused vs reference vs FAISS GPU brute force in fp32 (faiss-gpu, when
                        importable); extra_info key_hbm_fraction = N*D*2 bytes / time / peak.
Targets: knn_interpolate >= 70% of HBM bandwidth; knn_search B <= 16 >= 60% of HBM bandwidth
over the keys, B = 640 >= 1.5x faster than FAISS GPU fp32 and >= 5x faster than the reference.
"""
from __future__ import annotations

import os

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")


def _cuda_ready():
    if not torch.cuda.is_available():
        return "no CUDA device"
    import knnfast
    if not knnfast.build_info()["cuda_compiled"]:
        return "knnfast was built without its CUDA kernels"
    return None


pytestmark = pytest.mark.skipif(_cuda_ready() is not None, reason=str(_cuda_ready()))

PEAK_HBM = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def _peak_bandwidth():
    name = torch.cuda.get_device_name()
    for key, bw in PEAK_HBM.items():
        if key in name:
            return name, bw
    return name, None


def _synced(fn):
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


INTERP = (16, 5000, 8) if QUICK else (640, 42024, 8)


@pytest.mark.parametrize("impl", ["fused", "reference", "copy"])
def test_cuda_knn_interpolate(kb, impl):
    import knnfast
    import knnfast.reference as ref
    B, V, k = INTERP
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(B, V, generator=g) * 3).cuda()
    tokens = torch.randint(0, V, (B, k), generator=g).cuda()
    scores = (-(torch.rand(B, k, generator=g) * 200 + 300)).cuda()
    out = torch.empty_like(logits)
    fn = {
        "fused": lambda: knnfast.knn_interpolate(logits, tokens, scores=scores, temperature=10.0, lam=0.25),
        "reference": lambda: ref.knn_interpolate(logits, tokens, scores=scores, temperature=10.0, lam=0.25),
        "copy": lambda: out.copy_(logits),
    }[impl]
    name, peak = _peak_bandwidth()
    kb.run(_synced(fn), op="cuda_knn_interpolate", impl=impl, shape=dict(B=B, V=V, k=k),
           dtype=torch.float32, device="cuda", gpu=name, bytes_moved=2 * B * V * 4,
           peak_bandwidth=peak)


SEARCH_N, SEARCH_D = (50_000, 256) if QUICK else (1_000_000, 1024)


@pytest.fixture(scope="module")
def search_keys():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(SEARCH_N, SEARCH_D, generator=g).half().cuda()
    yield keys
    del keys
    torch.cuda.empty_cache()


@pytest.mark.parametrize("B", [1, 16, 640])
@pytest.mark.parametrize("impl", ["fused", "reference", "faiss_gpu_fp32"])
def test_cuda_knn_search(kb, search_keys, B, impl):
    import knnfast
    import knnfast.reference as ref
    k = 64
    q = torch.randn(B, SEARCH_D, generator=torch.Generator().manual_seed(B)).cuda()
    if impl == "fused":
        fn = lambda: knnfast.knn_search(q, search_keys, k, "l2")  # noqa: E731
    elif impl == "reference":
        fn = lambda: ref.knn_search(q, search_keys.float(), k, "l2")  # noqa: E731
    else:
        faiss = pytest.importorskip("faiss")
        if not hasattr(faiss, "StandardGpuResources"):
            pytest.skip("faiss has no GPU support (install faiss-gpu)")
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(res, SEARCH_D)
        index.add(search_keys.float().cpu().numpy())
        qn = q.cpu().numpy()
        fn = lambda: index.search(qn, k)  # noqa: E731
    name, peak = _peak_bandwidth()
    kb.run(_synced(fn), op="cuda_knn_search", impl=impl,
           shape=dict(B=B, N=SEARCH_N, D=SEARCH_D, k=k), dtype=torch.float16, device="cuda",
           gpu=name, bytes_moved=SEARCH_N * SEARCH_D * 2, peak_bandwidth=peak)
