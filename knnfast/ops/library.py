"""Loads the compiled library (knnfast/_C*.so) once and exposes its raw ops as ``OPS``
(= ``torch.ops.knnfast``), plus ``build_info()``."""
from __future__ import annotations

import glob
import os

import torch

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_library() -> None:
    candidates = sorted(glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")))
    if not candidates:
        raise ImportError(
            "knnfast: the compiled library (knnfast/_C*.so) is missing; build it with "
            "`pip install --no-build-isolation -e .` (or `make build`)"
        )
    torch.ops.load_library(candidates[0])


load_library()
OPS = torch.ops.knnfast


def build_info() -> dict:
    """How knnfast was built and what it will use here.

    Keys: version, torch_version, cuda_compiled (CUDA kernels built in), cuda_available,
    openmp, openmp_threads, simd ("avx512" or "generic" for the CPU kernels),
    avx512_bf16 (bf16 dot products available to the bf16 GEMM search path), max_k (the
    largest k the kernels accept), cpu_plans (the knn_search plans this CPU can run).
    """
    info: dict = {}
    for item in OPS.build_info().split(";"):
        key, _, value = item.partition("=")
        info[key] = value
    for key in ("cuda_compiled", "openmp", "avx512_bf16"):
        info[key] = info.get(key) == "1"
    info["openmp_threads"] = int(info.get("openmp_threads", "0"))
    if "max_k" in info:
        info["max_k"] = int(info["max_k"])
    if "cpu_plans" in info:
        info["cpu_plans"] = tuple(p for p in info["cpu_plans"].split(",") if p)
    info["torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
