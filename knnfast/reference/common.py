"""Math shared by the reference ops: the masked neighbour softmax, neighbour weights and the
per-row grouping of equal tokens."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import args

NEG_INF = float("-inf")
#: cos metric: norms are clamped to at least this (DESIGN §2).
COS_EPS = 1e-8


def masked_softmax(scores: Tensor, tokens: Tensor, tau: Tensor) -> Tensor:
    """softmax(scores / tau) over the valid slots (token != -1); 0 elsewhere.

    tau: float32 [B] or [1]. A row without a valid finite score is all zeros (never NaN).
    """
    z = scores.float() / tau.reshape(-1, 1)
    z = z.masked_fill(tokens < 0, NEG_INF)
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)  # exp(-inf) = 0 for invalid slots
    s = e.sum(dim=1, keepdim=True)
    return torch.where(s > 0, e / s, torch.zeros_like(e))


def checked_neighbours(op: str, rows: int, tokens: Tensor, scores: Optional[Tensor],
                       weights: Optional[Tensor], temperature, vocab: Optional[int], device,
                       *, names=("tokens", "scores", "weights")) -> Tuple[Tensor, Tensor]:
    """The ops' neighbour rules, then (tokens int64, per-slot weights w [B, k] float32 with 0
    on invalid slots)."""
    args.exactly_one(op, names[1], scores, names[2], weights)
    tau = args.row_scalar(op, "temperature", temperature, rows, device, True)
    args.check_neighbour_meta(op, rows, tokens, scores, weights, tau, names=names)
    args.check_same_device(op, tokens, **{names[1]: scores, names[2]: weights})
    args.check_values_neighbours(op, tokens, scores, weights, tau, vocab, names=names)
    tokens = tokens.long()
    if scores is not None:
        return tokens, masked_softmax(scores, tokens, tau)
    return tokens, weights.float().masked_fill(tokens < 0, 0.0)


def checked_lam(op: str, lam, rows: int, device) -> Tensor:
    """lam as float32 [rows], range-checked like the kernels do."""
    lam_t = args.row_scalar(op, "lam", lam, rows, device, False)
    args.check_values_row(op, "lam", lam_t, positive=False)
    return lam_t.expand(rows)


def checked_targets(op: str, targets: Tensor, rows: int, vocab: int,
                    ignore_index: int) -> Tuple[Tensor, Tensor]:
    """targets [rows] -> (int64 targets, ignored mask [rows])."""
    args.check_tensor(op, "targets", targets)
    args.check_targets_meta(op, targets, rows)
    args.check_values_targets(op, targets, vocab, ignore_index)
    targets = targets.long()
    return targets, targets == ignore_index


def checked_logits(op: str, logits: Tensor) -> None:
    args.check_logits_input(op, logits)
    args.check_values_logits(op, logits)


def first_occurrence(tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Group equal tokens of each row with a stable sort.

    Returns (perm, group, is_start):
      perm[b, i]     original slot of the i-th smallest token of row b (stable)
      group[b, i]    group id in [0, k) of sorted position i (equal tokens share it)
      is_start[b, i] sorted position i is the first (= smallest original slot) of its group
    """
    sorted_tok, perm = torch.sort(tokens, dim=1, stable=True)
    is_start = torch.ones_like(sorted_tok, dtype=torch.bool)
    if tokens.shape[1] > 1:
        is_start[:, 1:] = sorted_tok[:, 1:] != sorted_tok[:, :-1]
    group = torch.cumsum(is_start.to(torch.int64), dim=1) - 1
    return perm, group, is_start
