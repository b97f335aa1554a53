"""Gradient math shared by the backward passes of knn_interpolate and knn_gold_logprob.

With out = log P, P = (1 - lam) p + lam q, p = softmax(logits), q = M . w and w the neighbour
weights, every factor is a ratio written in log space (exp(log a - out) <= 1 for the parts
of P), so nothing overflows as lam -> 0 or 1 or weights -> 0. The backward passes are
composite PyTorch code: they run only in training / tuning, where a dense gradient of the
logits has to be written anyway.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def as_int64(t: Tensor) -> Tensor:
    """t as int64 without a no-op conversion (a `.long()` that returns its input fails
    opcheck's schema test inside setup_context)."""
    return t if t.dtype == torch.int64 else t.long()


def expand_rows(t: Tensor, rows: int) -> Tensor:
    """A [1] or [rows] per-row parameter as float32 [rows]."""
    return t.reshape(-1).float().expand(rows)


def neighbour_weights(tokens: Tensor, scores: Optional[Tensor], weights: Optional[Tensor],
                      tau: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(w [B, k] float32 with 0 on invalid slots, valid [B, k], has_neighbour [B, 1])."""
    valid = tokens >= 0
    if scores is not None:
        z = (scores.float() / tau[:, None]).masked_fill(~valid, float("-inf"))
        lse = torch.logsumexp(z, dim=1, keepdim=True)
        has = torch.isfinite(lse)
        w = torch.where(has, torch.exp(z - lse.masked_fill(~has, 0.0)), torch.zeros_like(z))
        valid = valid & torch.isfinite(z)
    else:
        w = torch.where(valid, weights.float(), torch.zeros_like(weights, dtype=torch.float32))
        has = (w > 0).any(dim=1, keepdim=True)
    return w, valid, has


def effective_lam(tokens, scores, weights, temperature, lam) -> Tuple[Tensor, Tensor, Tensor]:
    """(tau [B], lam [B] with 0 where a row has no valid neighbour, has_neighbour [B])."""
    rows = tokens.shape[0]
    tau = expand_rows(temperature, rows)
    _, _, has = neighbour_weights(tokens, scores, weights, tau)
    lam_rows = expand_rows(lam, rows)
    return tau, torch.where(has[:, 0], lam_rows, torch.zeros_like(lam_rows)), has[:, 0]


def finite_exp(x: Tensor) -> Tensor:
    """exp(x) with NaN (from -inf - -inf) mapped to 0: the term is absent."""
    return torch.exp(torch.nan_to_num(x, nan=float("-inf")))


def neighbour_grads(g_t: Tensor, out_t: Tensor, tokens: Tensor, scores, weights, tau: Tensor,
                    lam_eff: Tensor):
    """Gradients through P_kNN. g_t [B, k]: upstream gradient at each slot's token; out_t
    [B, k]: the output there. Returns (g_scores, g_weights, g_tau_rows, g_lam_rows_knn)."""
    w, valid, has = neighbour_weights(tokens, scores, weights, tau)
    log_w = torch.log(w)
    log_lam = torch.log(lam_eff)[:, None]
    # share of P at token t_j that comes from slot j: lam w_j / P(t_j), in [0, 1]
    share = finite_exp(log_lam + log_w - out_t) * valid
    g_scores = g_weights = g_tau = None
    if scores is not None:
        a = share * g_t
        g_z = a - w * a.sum(dim=1, keepdim=True)  # d out / d (scores / tau)
        g_scores = torch.where(valid, g_z / tau[:, None], torch.zeros_like(g_z))
        s = torch.where(valid, scores.float(), torch.zeros_like(g_z))
        g_tau = -(g_scores * s).sum(dim=1) / tau
    else:
        g_weights = torch.where(tokens >= 0, g_t * finite_exp(log_lam - out_t),
                                torch.zeros_like(g_t))
    # sum_j g_t w_j / P(t_j): the kNN side of d out / d lam
    g_lam = (g_t * finite_exp(log_w - out_t) * valid).sum(dim=1)
    return g_scores, g_weights, g_tau, g_lam * has[:, 0]


def reduce_to(grad_rows: Optional[Tensor], like: Tensor, needed: bool) -> Optional[Tensor]:
    """Per-row gradient -> the shape of the parameter tensor ([1] sums the rows)."""
    if not needed or grad_rows is None:
        return None
    g = grad_rows.sum().reshape(1) if like.numel() == 1 else grad_rows
    return g.reshape(like.shape).to(like.dtype)
