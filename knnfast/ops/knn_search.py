"""knn_search: exact k nearest keys of every query (wrapper + fake kernel; no autograd).

C++: csrc/cpu/knn_search_cpu.cpp (+ knn_search_bf16.cpp), csrc/cuda/knn_search{.cu,_cuda.cpp};
reference: knnfast.reference.knn_search; tests: tests/test_knn_search.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import args, plan_choice
from .library import OPS

#: Kernel plans per device type ("auto" picks by shape and CPU features; on CPU by measurement,
#: see plan_choice).
PLANS = {"cpu": ("auto", "stream", "gemm_f32", "bf16", "bf16_gemm"),
         "cuda": ("auto", "stream", "tensor", "tensor_recheck")}


def knn_search(queries: Tensor, keys: Tensor, k: int, metric: str = "l2", *,
               key_sq_norms: Optional[Tensor] = None, exclude: Optional[Tensor] = None,
               plan: str = "auto") -> Tuple[Tensor, Tensor]:
    """Exact k nearest keys of every query, fused (never materializes B x N).

    Args:
        queries: [B, D] float32/float16/bfloat16.
        keys: [N, D] float32/float16/bfloat16 (need not match the queries' dtype).
        k: neighbours per query, 1 <= k <= 2048. N < k pads with (-inf, -1).
        metric: "l2" (score = -|q-k|^2), "ip" (q.k) or "cos".
        key_sq_norms: optional float32 [N] cache of |k|^2 (used by l2 and cos).
        exclude: optional int64 [B]: one entry id per query never returned (-1 = none).
        plan: kernel variant; "auto" chooses by shape and CPU features (on CPU: the fastest
            plan timed once per shape bucket, see knnfast.ops.plan_choice). CPU: "stream"
            (streaming fp32 dot products), "gemm_f32" (sgemm tiles), "bf16" (AVX512-BF16
            ranking with rigorous bounds + exact rescoring), "bf16_gemm" (the same bounds
            with the ranking from ATen's bf16 matmul: AMX where present). CUDA: "stream", "tensor"
            (tensor-core GEMM tiles + per-row proof), "tensor_recheck" (the tensor plan with
            every row re-searched on the stream plan). Every plan is exact.

    Returns:
        (scores [B, k] float32 sorted descending, indices [B, k] int64); ties go to the
        smaller index. Queries with NaN/inf raise ValueError; NaN keys are never returned.

    Example:
        >>> keys = torch.randn(1000, 64)
        >>> scores, ids = knn_search(keys[:4], keys, k=3)
        >>> ids[:, 0].tolist()
        [0, 1, 2, 3]
    """
    op = "knn_search"
    args.check_tensor(op, "queries", queries)
    args.check_tensor(op, "keys", keys)
    args.check_k(op, k)
    args.check_metric(op, metric)
    args.check_choice(op, "plan", plan, PLANS.get(queries.device.type, ("auto",)))
    if plan == "auto":
        plan = plan_choice.choose(queries, keys, k, metric)
    return OPS.knn_search(queries, keys, k, metric, key_sq_norms, exclude, plan)


@torch.library.register_fake("knnfast::knn_search")
def _(queries, keys, k, metric, key_sq_norms, exclude, plan="auto"):
    args.check_search_meta("knn_search", queries, keys, k, key_sq_norms, exclude)
    shape = (queries.shape[0], k)
    return (queries.new_empty(shape, dtype=torch.float32),
            queries.new_empty(shape, dtype=torch.int64))
