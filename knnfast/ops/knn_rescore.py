"""knn_rescore: exact fp32 scores of given candidate ids (wrapper + fake kernel).

C++: csrc/cpu/knn_rescore_cpu.cpp, csrc/cuda/knn_rescore{.cu,_cuda.cpp};
reference: knnfast.reference.knn_rescore; tests: tests/test_knn_rescore.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import args
from .library import OPS


def knn_rescore(queries: Tensor, keys: Tensor, indices: Tensor, metric: str = "l2") -> Tensor:
    """Exact fp32 scores [B, k] of the candidate ids `indices` [B, k] (-1 -> -inf).

    The "real score" of an approximate (e.g. FAISS IVFPQ) search: rows of `keys` are
    gathered by index without copying the datastore; l2 uses the direct difference.
    """
    op = "knn_rescore"
    for name, t in (("queries", queries), ("keys", keys), ("indices", indices)):
        args.check_tensor(op, name, t)
    args.check_metric(op, metric)
    return OPS.knn_rescore(queries, keys, indices, metric)


def check_rescore_meta(op, queries, keys, indices) -> None:
    args.check_float_input(op, "queries", queries)
    args.check_float_input(op, "keys", keys)
    args.check_index_input(op, "indices", indices)
    args.check_same_device(op, queries, keys=keys, indices=indices)
    args.need(queries.shape[1] == keys.shape[1], op,
              lambda: f"queries and keys must have the same dimension D, got queries "
                      f"{list(queries.shape)} and keys {list(keys.shape)}")
    args.check_rows(op, "indices", indices, queries.shape[0])


@torch.library.register_fake("knnfast::knn_rescore")
def _(queries, keys, indices, metric):
    check_rescore_meta("knn_rescore", queries, keys, indices)
    return queries.new_empty(indices.shape, dtype=torch.float32)
