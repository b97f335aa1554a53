"""Reference probability ops: dense / sparse P_kNN, the interpolation with the model's softmax,
its value at the gold token, and label counts. Vectorised scatter_add_ / logaddexp code in
the style of knn-transformers; duplicate merging and label counts use a per-row stable sort
(O(k log k), no k x k matrices)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..defaults import MAX_K, OPS as DEFAULTS
from ..ops import args
from .common import checked_lam, checked_logits, checked_neighbours, checked_targets
from .common import first_occurrence


def knn_probs(scores: Tensor, tokens: Tensor, vocab_size: int,
              temperature: args.RowScalar = DEFAULTS.temperature) -> Tensor:
    """Dense P_kNN[B, V] = M . softmax(scores / tau) over valid slots (rows without one: 0)."""
    op = "knn_probs"
    args.check_tensor(op, "scores", scores)
    args.check_int(op, "vocab_size", vocab_size, 1)
    args.check_dim(op, "scores", scores, 2)
    B = scores.shape[0]
    tokens, w = checked_neighbours(op, B, tokens, scores, None, temperature, vocab_size,
                                   scores.device)
    probs = torch.zeros(B, vocab_size, dtype=torch.float32, device=scores.device)
    return probs.scatter_add_(1, tokens.clamp(min=0), w)


def knn_probs_sparse(scores: Tensor, tokens: Tensor,
                     temperature: args.RowScalar = DEFAULTS.temperature) -> Tuple[Tensor, Tensor]:
    """Sparse P_kNN: (tokens_u[B,k] int64, probs[B,k] float32), duplicates merged.

    The first valid occurrence of a token keeps its slot and the summed probability;
    later duplicates and invalid slots (token -1 or score -inf) become (-1, 0).
    """
    op = "knn_probs_sparse"
    args.check_tensor(op, "scores", scores)
    args.check_dim(op, "scores", scores, 2)
    tokens, w = checked_neighbours(op, scores.shape[0], tokens, scores, None, temperature, None,
                                   scores.device)
    # a -inf slot is invalid even with a token: it neither keeps nor takes a slot
    tokens = tokens.masked_fill(scores == float("-inf"), -1)
    perm, group, is_start = first_occurrence(tokens)
    sums = torch.zeros_like(w).scatter_add_(1, group, w.gather(1, perm))
    # original slot of each sorted position; keep the group starts of valid tokens
    keep = is_start & (tokens.gather(1, perm) >= 0)
    out_tok = torch.full_like(tokens, -1)
    out_p = torch.zeros_like(w)
    out_tok.scatter_(1, perm, torch.where(keep, tokens.gather(1, perm), out_tok))
    out_p.scatter_(1, perm, torch.where(keep, sums.gather(1, group), out_p))
    return out_tok, out_p


def mixture_inputs(op: str, logits: Tensor, tokens: Tensor, scores, weights, temperature, lam):
    """The ops' rules for (logits, neighbours, lam), then (tokens int64, w [B, k], lam [B, 1]
    with 0 where a row has no valid neighbour)."""
    args.check_tensor(op, "logits", logits)
    args.check_logits_input(op, logits)
    B, V = logits.shape
    tokens, w = checked_neighbours(op, B, tokens, scores, weights, temperature, V, logits.device)
    args.check_same_device(op, logits, tokens=tokens)
    lam_t = checked_lam(op, lam, B, logits.device)[:, None]
    checked_logits(op, logits)
    has_nbr = w.sum(dim=1, keepdim=True) > 0
    return tokens, w, torch.where(has_nbr, lam_t, torch.zeros_like(lam_t))


def knn_interpolate(logits: Tensor, tokens: Tensor, *, scores: Optional[Tensor] = None,
                    weights: Optional[Tensor] = None,
                    temperature: args.RowScalar = DEFAULTS.temperature,
                    lam: args.RowScalar = DEFAULTS.lam, out: Optional[Tensor] = None) -> Tensor:
    """log((1 - lam) * softmax(logits) + lam * P_kNN) as float32 [B, V].

    knn-transformers style: log_softmax of the logits, dense P_kNN by
    scatter_add_, mixed in log space with torch.logaddexp. Rows without a valid
    neighbour get log_softmax(logits) (lam treated as 0).
    """
    op = "knn_interpolate"
    tokens, w, lam_t = mixture_inputs(op, logits, tokens, scores, weights, temperature, lam)
    B, V = logits.shape
    if out is not None:
        args.check_tensor(op, "out", out)
        args.check_same_device(op, logits, out=out)
        if out.dtype != torch.float32 or tuple(out.shape) != (B, V) or not out.is_contiguous():
            args.fail(op, f"out must be a contiguous float32 tensor of shape {[B, V]}, "
                          f"got {out.dtype} {list(out.shape)}")
    logp_model = torch.log_softmax(logits.float(), dim=-1)
    p_knn = torch.zeros(B, V, dtype=torch.float32, device=logits.device)
    p_knn.scatter_add_(1, tokens.clamp(min=0), w)
    res = torch.logaddexp(torch.log1p(-lam_t) + logp_model, torch.log(lam_t) + torch.log(p_knn))
    if out is not None:
        return out.copy_(res)
    return res


def knn_gold_logprob(logits: Tensor, targets: Tensor, tokens: Tensor, *,
                     scores: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                     temperature: args.RowScalar = DEFAULTS.temperature,
                     lam: args.RowScalar = DEFAULTS.lam, ignore_index: int = -100) -> Tensor:
    """knn_interpolate(...)[b, targets[b]] as float32 [B], computed sparsely; ignored rows -> 0."""
    op = "knn_gold_logprob"
    args.check_tensor(op, "logits", logits)
    args.check_logits_input(op, logits)
    targets, ignored = checked_targets(op, targets, logits.shape[0], logits.shape[1],
                                       ignore_index)
    tokens, w, lam_t = mixture_inputs(op, logits, tokens, scores, weights, temperature, lam)
    lam_t = lam_t.squeeze(1)
    t = targets.masked_fill(ignored, 0)
    lf = logits.float()
    logp_model = lf.gather(1, t.unsqueeze(1)).squeeze(1) - torch.logsumexp(lf, dim=-1)
    p_knn = (w * (tokens == t.unsqueeze(1))).sum(dim=1)
    res = torch.logaddexp(torch.log1p(-lam_t) + logp_model, torch.log(lam_t) + torch.log(p_knn))
    return res.masked_fill(ignored, 0.0)


def label_counts(tokens: Tensor) -> Tensor:
    """counts[b, j] = number of distinct valid (!= -1) tokens among tokens[b, :j+1]."""
    op = "label_counts"
    args.check_tensor(op, "tokens", tokens)
    args.check_index_input(op, "tokens", tokens)
    args.check_values_ids(op, "tokens", tokens, None)
    tokens = tokens.long()
    perm, _, is_start = first_occurrence(tokens)
    first = torch.zeros_like(is_start).scatter_(1, perm, is_start) & (tokens >= 0)
    return torch.cumsum(first.to(torch.int64), dim=1)


def softmax_stats(logits: Tensor, top: int = 1, *, entropy: bool = True) -> Tuple[Tensor, Tensor]:
    """(entropy [B], top_logp [B, top]) float32 of softmax(logits): -sum p log p (0 log 0 = 0)
    and the ``top`` largest log-probabilities, descending; a row of only -inf gives (0, -inf).
    torch.log_softmax, a where for the 0 log 0 terms, torch.topk. ``entropy=False``: the first
    output is empty [0]."""
    op = "softmax_stats"
    args.check_tensor(op, "logits", logits)
    args.check_int(op, "top", top, 1, MAX_K)
    args.check_bool(op, "entropy", entropy)
    checked_logits(op, logits)
    V = logits.shape[1]
    if top > V:
        args.fail(op, f"top must be an int in [1, {min(V, MAX_K)}] (the vocabulary size V = "
                      f"{V}, at most MAX_K = {MAX_K}), got {top}")
    x = logits.detach().float()
    dead = torch.isneginf(x).all(1, keepdim=True)
    logp = torch.log_softmax(x.masked_fill(dead, 0.0), 1).masked_fill(dead, float("-inf"))
    top_logp = logp.topk(top, 1).values
    if not entropy:
        return x.new_empty(0), top_logp
    terms = torch.where(torch.isneginf(logp), 0.0, logp.exp() * logp)
    return -terms.sum(1), top_logp
