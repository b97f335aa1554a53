"""knn_search_lists: exact top-k over the inverted lists each query probes, the search step of
an IVF index with exact in-list scores (wrapper + fake kernel; no autograd).

C++: csrc/cpu/knn_search_lists_cpu.cpp, csrc/cuda/knn_search_lists_cuda.cpp;
reference: knnfast.reference.knn_search_lists; tests: tests/test_knn_search_lists.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import args
from .library import OPS

#: Kernel plans per device type: CPU "scan" (auto: each probed list read once for all its
#: queries) or "rescore" (candidates scored by knn_rescore, then one topk: the code CUDA runs);
#: CUDA has only "rescore" for now.
PLANS = {"cpu": ("auto", "scan", "rescore"), "cuda": ("auto", "rescore")}


def knn_search_lists(queries: Tensor, keys: Tensor, list_offsets: Tensor, probes: Tensor,
                     k: int, metric: str = "l2", *, exclude: Optional[Tensor] = None,
                     plan: str = "auto") -> Tuple[Tensor, Tensor]:
    """Exact k nearest keys of every query among the lists it probes, in one call.

    The keys are grouped by list: list ``l`` is rows ``list_offsets[l]:list_offsets[l+1]``
    (an IVF index's inverted lists stored contiguously). Each query is scored exactly against
    the union of the lists in its row of ``probes``; every probed list is read once per call
    for all the queries that probe it, which is what makes batched decoding cheap.

    Args:
        queries: [B, D] float32/float16/bfloat16.
        keys: [N, D] float32/float16/bfloat16, grouped by list.
        list_offsets: [L + 1] integer: 0, non-decreasing, ending at N.
        probes: [B, P] integer list ids per query, in [-1, L); -1 = none; a list named twice
            in a row is searched once.
        k: neighbours per query, 1 <= k <= 2048; fewer candidates pad with (-inf, -1).
        metric: "l2" (score = -|q-k|^2), "ip" or "cos", as ``knn_search``.
        exclude: optional [B] integer: one key row per query never returned (-1 = none).
        plan: kernel variant (``PLANS``); every plan is exact. CPU "scan" (the default)
            reads each probed list once for all the queries that probe it; "rescore" expands
            the probed lists into candidates for ``knn_rescore`` and takes the k best by one
            topk (B x the most keys a row probes in memory; its scores are knn_rescore's, so
            near-ties may order differently): the code CUDA runs.

    Returns:
        (scores [B, k] float32 descending, indices [B, k] int64 rows of ``keys``); ties go to
        the smaller row. Equal to ``knn_search`` over the probed rows only.

    Example:
        >>> keys = torch.randn(6, 4)
        >>> offsets = torch.tensor([0, 2, 6])            # list 0: rows 0-1, list 1: rows 2-5
        >>> s, i = knn_search_lists(keys[:2], keys, offsets, torch.tensor([[0], [1]]), k=2)
        >>> i[0].tolist(), sorted(i[1].tolist())[0] >= 2
        ([0, 1], True)
    """
    op = "knn_search_lists"
    check_lists_call(op, queries, keys, list_offsets, probes, k, metric, exclude)
    args.check_choice(op, "plan", plan, PLANS.get(queries.device.type, ("auto",)))
    return OPS.knn_search_lists(queries, keys, list_offsets, probes, k, metric, exclude, plan)


def check_lists_call(op: str, queries, keys, list_offsets, probes, k, metric, exclude) -> None:
    """What C++ cannot see: the Python types of the arguments, k and metric."""
    for name, t in (("queries", queries), ("keys", keys), ("list_offsets", list_offsets),
                    ("probes", probes)):
        args.check_tensor(op, name, t)
    if exclude is not None:
        args.check_tensor(op, "exclude", exclude)
    args.check_k(op, k)
    args.check_metric(op, metric)


def check_lists_meta(op: str, queries: Tensor, keys: Tensor, list_offsets: Tensor,
                     probes: Tensor, k: int, exclude: Optional[Tensor]) -> None:
    """The metadata rules of knn_search_lists (C++: check_knn_search_lists_args)."""
    args.check_search_meta(op, queries, keys, k, None, exclude)
    args.check_index_input(op, "list_offsets", list_offsets, dim=1)
    args.check_index_input(op, "probes", probes)
    args.check_same_device(op, queries, list_offsets=list_offsets, probes=probes)
    args.need(list_offsets.shape[0] >= 2, op,
              lambda: f"list_offsets must have shape [L + 1] with L >= 1 lists, got "
                      f"{list(list_offsets.shape)}")
    args.need(probes.shape[0] == queries.shape[0] and probes.shape[1] >= 1, op,
              lambda: f"probes must have shape [{queries.shape[0]}, P] with P >= 1 (list ids "
                      f"per query), got {list(probes.shape)}")


@torch.library.register_fake("knnfast::knn_search_lists")
def _(queries, keys, list_offsets, probes, k, metric, exclude, plan="auto"):
    check_lists_meta("knn_search_lists", queries, keys, list_offsets, probes, k, exclude)
    shape = (queries.shape[0], k)
    return (queries.new_empty(shape, dtype=torch.float32),
            queries.new_empty(shape, dtype=torch.int64))
