"""The one Python merge of sorted top-k lists (the C++ kernels merge in csrc/common).

Used by the chunked exact search of a memmapped datastore (``knnfast.storage.search``) and by
``knnfast.reference``; pure PyTorch, any device.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def merge_topk(a_scores: Tensor, a_ids: Tensor, b_scores: Tensor, b_ids: Tensor,
               k: int) -> Tuple[Tensor, Tensor]:
    """Merge two top-k lists into the top ``k`` of their union.

    Args:
        a_scores, a_ids: [B, ka] scores sorted descending and their int64 ids (-1 = pad,
            scored -inf), ties already ordered by smaller id.
        b_scores, b_ids: [B, kb] the same for ids that are disjoint from a's and all larger
            than a's (e.g. a later chunk of the keys).
        k: entries to keep (at most ka + kb).

    Returns:
        (scores [B, k], ids [B, k]) sorted descending; ties go to the smaller id, pads last.

    Example:
        >>> import torch
        >>> s, i = merge_topk(torch.tensor([[3., 1.]]), torch.tensor([[0, 1]]),
        ...                   torch.tensor([[3., 2.]]), torch.tensor([[5, 6]]), 3)
        >>> i.tolist()
        [[0, 5, 6]]
    """
    s = torch.cat([a_scores, b_scores], 1)
    i = torch.cat([a_ids, b_ids], 1)
    # A pad (-1, -inf) of a must not sit before a real entry of b that also scores -inf.
    pad_last = torch.where(i < 0, 1, 0)
    order = pad_last.argsort(dim=1, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    # a stable descending sort of [a, b] keeps ties on the smaller id (a's ids < b's)
    order = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), i.gather(1, order)
