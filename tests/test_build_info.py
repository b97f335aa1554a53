"""build_info(): the keys API.md promises, with sensible types."""
import torch

import knnfast


def test_build_info_keys_and_types():
    info = knnfast.build_info()
    assert isinstance(info, dict)
    for key in ("version", "torch_version", "cuda_compiled", "openmp_threads", "simd"):
        assert key in info, f"build_info() lacks {key!r}: {sorted(info)}"
    assert isinstance(info["version"], str) and info["version"]
    assert info["version"] == knnfast.__version__
    assert isinstance(info["torch_version"], str)
    # built against the torch that is running (major.minor at least)
    assert info["torch_version"].split(".")[:2] == torch.__version__.split(".")[:2]
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["openmp_threads"], int) and info["openmp_threads"] >= 1
    assert isinstance(info["simd"], str)


def test_build_info_cuda_consistent():
    info = knnfast.build_info()
    if torch.cuda.is_available() and info["cuda_compiled"]:
        # the CUDA kernels are registered: a tiny call on the GPU works
        q = torch.randn(2, 3, device="cuda")
        s, i = knnfast.knn_search(q, q, 1)
        assert s.device.type == "cuda" and i.tolist() == [[0], [1]]
    if not torch.version.cuda:
        assert info["cuda_compiled"] is False


def test_ops_registered():
    for name in ("knn_search", "knn_rescore", "knn_probs", "knn_probs_sparse",
                 "knn_interpolate", "knn_gold_logprob", "label_counts"):
        assert callable(getattr(knnfast, name)), name
        assert hasattr(torch.ops.knnfast, name), f"torch.ops.knnfast.{name} is not registered"
