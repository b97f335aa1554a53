"""build_info(): the keys API.md promises, with sensible types."""
import pytest
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


def test_limits_agree_between_python_and_cpp():
    """MAX_K is defined once per language (knnfast/defaults.py, csrc/common/limits.h)."""
    from knnfast.defaults import MAX_K
    assert knnfast.build_info()["max_k"] == MAX_K


def test_cpu_plans_reported_and_accepted():
    plans = knnfast.build_info()["cpu_plans"]
    assert plans[0] == "auto" and {"stream", "gemm_f32"} <= set(plans)
    q = torch.randn(4, 8)
    for plan in plans:
        s, i = knnfast.knn_search(q, q, 1, plan=plan)
        assert i[:, 0].tolist() == [0, 1, 2, 3], plan


def test_settings_configure_and_override():
    from knnfast.ops import settings
    before = settings.configure("debug", False)
    try:
        with settings.override(debug=True, cuda_checks=False):
            assert settings.configure("debug", True) is True
            assert settings.configure("cuda_checks", False) == "off"
        assert settings.configure("debug", False) is False
        assert settings.configure("cuda_checks", True) == "auto"   # True is the default mode
    finally:
        settings.configure("debug", before)
    with pytest.raises(ValueError, match="name must be one of"):
        settings.configure("simd", True)
    with pytest.raises(ValueError, match="cuda_checks"):  # the C++ side names its settings too
        torch.ops.knnfast.configure("nope", 1)


def test_settings_read_from_the_environment_once_at_import():
    import subprocess
    import sys
    code = ("import knnfast, torch; from knnfast.ops import settings; "
            "print(settings.configure('debug', False), settings.configure('cuda_checks', True))")
    env = dict(__import__("os").environ, KNNFAST_DEBUG="1", KNNFAST_CUDA_CHECKS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["True", "off"]
