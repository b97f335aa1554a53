"""Exact search over datastore keys: one ``knn_search`` for keys in memory, or streamed over
a memmap in chunks of ``4 * files.CHUNK_BYTES`` (so datastores larger than RAM work), the
per-chunk top-k lists merged by ``knnfast.topk.merge_topk``; and exact rescoring of given
candidates (the "real score" of an approximate search)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from ..topk import merge_topk
from . import files


def exact_search(queries: Tensor, keys: Tensor, key_sq_norms: Optional[Tensor], k: int,
                 metric: str, exclude: Optional[Tensor], *, streamed: bool
                 ) -> Tuple[Tensor, Tensor]:
    """(scores [B, k], ids [B, k]) on the keys' device; ``streamed`` reads ``keys`` (a
    memmap) chunk by chunk. ``key_sq_norms`` is ignored for "ip"."""
    q = queries.detach().to(keys.device)
    excl = None if exclude is None else exclude.to(keys.device, torch.int64)
    norms = key_sq_norms if metric != "ip" else None
    if not streamed:
        return ops.knn_search(q, keys, k, metric, key_sq_norms=norms, exclude=excl)
    best_s = best_i = None
    row_bytes = keys.shape[1] * keys.element_size()
    for s, e in files.row_chunks(keys.shape[0], row_bytes, 4 * files.CHUNK_BYTES):
        local_excl = None
        if excl is not None:
            local_excl = torch.where((excl >= s) & (excl < e), excl - s, -1)
        cs, ci = ops.knn_search(q, keys[s:e], k, metric,
                                key_sq_norms=None if norms is None else norms[s:e],
                                exclude=local_excl)
        ci = torch.where(ci >= 0, ci + s, ci)
        best_s, best_i = (cs, ci) if best_s is None else merge_topk(best_s, best_i, cs, ci, k)
    return best_s, best_i


def rescore(queries: Tensor, keys: Tensor, ids: Tensor, metric: str) -> Tuple[Tensor, Tensor]:
    """Exact scores of candidate ids [B, k], re-sorted (on the keys' device)."""
    q = queries.detach().to(keys.device)
    scores = ops.knn_rescore(q, keys, ids.to(keys.device), metric)
    return sort_by_score(scores, ids.to(keys.device))


def sort_by_score(scores: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Sort rows by score descending, ties to the smaller id (invalid -1 last)."""
    key_ids = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    order = key_ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), ids.gather(1, order)
