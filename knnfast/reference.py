"""Pure-PyTorch twin of every knnfast op (``knnfast/API.md``).

This module serves two purposes:

* **Test oracle.** Every function here has the same name, signature and
  documented semantics as the fused op in :mod:`knnfast.ops`. The parity tests
  in ``tests/`` compare the C++/CUDA kernels against these functions.
* **Benchmark baseline.** The benchmarks time these functions next to the fused
  kernels, so they are written the way a competent PyTorch user would write
  them, not as a strawman: ``knn_search`` streams the keys in tiles (a matmul
  per tile + ``torch.topk`` + a merge into a running top-k, never a B x N
  matrix); the probability ops are vectorised ``scatter_add_`` / ``logaddexp``
  code in the style of knn-transformers; duplicate merging and label counts use
  a per-row stable sort (O(k log k), no k x k matrices).

Conventions (DESIGN.md section 2): scores, not distances (larger = closer):
``l2``: s = -||q - k||^2, ``ip``: s = q.k,
``cos``: s = q.k / (max(||q||, 1e-8) * max(||k||, 1e-8)). Accumulation is
float32 (half/bfloat16 keys and queries are upcast tile by tile). Invalid
neighbour slots carry token id -1 and score -inf and get weight 0.
``temperature`` and ``lam`` are a Python float or a float32 tensor of shape
[B]. Argument errors raise ``ValueError`` naming the argument; the checks here
are the cheap ones (shapes, ranges of small tensors) - they exist so that the
oracle never silently computes something the contract does not define.

Choices where the contract is silent (the kernels are expected to match):

* ``knn_search``: a slot whose score is -inf carries index -1 (padding when
  fewer than k entries remain after ``exclude`` / NaN keys). NaN scores (NaN
  keys) are treated as -inf, so NaN keys are never returned.
* ``key_sq_norms`` replaces ||k||^2 for ``l2`` and ||k|| = sqrt(key_sq_norms)
  for ``cos``; it is ignored for ``ip``.
* A neighbour slot is valid iff its token id is not -1; a valid slot with
  score -inf simply gets weight 0 (so a row whose valid slots are all -inf is
  treated as having no valid neighbour).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "knn_search",
    "knn_rescore",
    "knn_probs",
    "knn_probs_sparse",
    "knn_interpolate",
    "knn_gold_logprob",
    "label_counts",
    "knn_kd_loss",
    "ink_loss",
]

Scalar = Union[float, Tensor]

METRICS = ("l2", "ip", "cos")
MAX_K = 2048
COS_EPS = 1e-8
# Keys scored per tile in knn_search: bounds the temporary at B x KEY_TILE floats.
KEY_TILE = 65536
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NEG_INF = float("-inf")


# --------------------------------------------------------------------------- #
# small helpers                                                               #
# --------------------------------------------------------------------------- #
def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _check_2d(op: str, name: str, t, dtypes=None) -> None:
    if not isinstance(t, Tensor):
        _fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        _fail(op, f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(op, f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def _check_same_device(op: str, ref_name: str, ref: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and isinstance(t, Tensor) and t.device != ref.device:
            _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_metric(op: str, metric: str) -> None:
    if metric not in METRICS:
        _fail(op, f"metric must be one of {METRICS}, got {metric!r}")


def _per_row(op: str, name: str, value: Scalar, B: int, device, lo: float, hi: float,
             lo_open: bool) -> Tensor:
    """tau / lam as a float32 [B, 1] tensor, range-checked."""
    rng = f"({lo}, inf)" if lo_open else f"[{lo}, {hi}]"
    if isinstance(value, Tensor):
        if value.dtype != torch.float32:
            _fail(op, f"{name} tensor must be float32, got {value.dtype}")
        if value.dim() != 1 or value.shape[0] != B:
            _fail(op, f"{name} tensor must have shape [{B}], got {tuple(value.shape)}")
        if value.device != device:
            _fail(op, f"{name} is on {value.device} but the inputs are on {device}")
        bad = ((value <= lo) if lo_open else (value < lo)) | (value > hi) | torch.isnan(value)
        if bool(bad.any()):
            _fail(op, f"{name} must be in {rng}, got {value[bad][0].item()}")
        return value.view(B, 1)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(op, f"{name} must be a float or a float32 tensor, got {type(value).__name__}")
    f = float(value)
    if not ((f > lo) if lo_open else (f >= lo)) or f > hi or math.isnan(f):
        _fail(op, f"{name} must be in {rng}, got {f}")
    return torch.full((B, 1), f, dtype=torch.float32, device=device)


def _tau(op: str, temperature: Scalar, B: int, device) -> Tensor:
    return _per_row(op, "temperature", temperature, B, device, 0.0, math.inf, True)


def _lam(op: str, lam: Scalar, B: int, device) -> Tensor:
    return _per_row(op, "lam", lam, B, device, 0.0, 1.0, False)


def _check_tokens(op: str, tokens: Tensor, B: int, k: Optional[int], V: Optional[int],
                  name: str = "tokens") -> None:
    _check_2d(op, name, tokens)
    if tokens.dtype not in (torch.int64, torch.int32):
        _fail(op, f"{name} must be int64 (or int32), got {tokens.dtype}")
    if tokens.shape[0] != B or (k is not None and tokens.shape[1] != k):
        exp = f"[{B}, {k}]" if k is not None else f"[{B}, k]"
        _fail(op, f"{name} must have shape {exp}, got {tuple(tokens.shape)}")
    if tokens.numel():
        lo = int(tokens.min())
        if lo < -1:
            _fail(op, f"{name} must be in [-1, V), got {lo}")
        if V is not None:
            hi = int(tokens.max())
            if hi >= V:
                _fail(op, f"{name} must be in [-1, {V}), got {hi}")


def _check_targets(op: str, targets, B: int, V: int, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """targets [B] int -> (int64 targets, ignored mask); ids in [0, V) or ignore_index."""
    if not isinstance(targets, Tensor) or targets.dim() != 1 or targets.shape[0] != B:
        _fail(op, f"targets must be a 1-D tensor of shape [{B}], got "
                  f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        _fail(op, f"targets must be int64, got {targets.dtype}")
    targets = targets.long()
    ignored = targets == ignore_index
    bad = ~ignored & ((targets < 0) | (targets >= V))
    if bool(bad.any()):
        _fail(op, f"targets must be in [0, {V}) or ignore_index={ignore_index}, "
                  f"got {int(targets[bad][0])}")
    return targets, ignored


def _check_logits(op: str, logits: Tensor) -> None:
    _check_2d(op, "logits", logits)
    if not logits.is_floating_point():
        _fail(op, f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[1] < 1:
        _fail(op, "logits must have at least one column (vocab_size >= 1)")
    if bool((torch.isnan(logits) | torch.isposinf(logits)).any()):
        _fail(op, "logits contain NaN or +inf")


def _masked_softmax(scores: Tensor, tokens: Tensor, tau: Tensor) -> Tensor:
    """softmax(scores / tau) over the valid slots (token != -1); 0 elsewhere.

    A row without a valid finite score is all zeros (never NaN).
    """
    z = scores.float() / tau
    z = z.masked_fill(tokens < 0, _NEG_INF)
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(z - m)  # exp(-inf) = 0 for invalid slots
    s = e.sum(dim=1, keepdim=True)
    return torch.where(s > 0, e / s, torch.zeros_like(e))


def _neighbour_weights(op: str, tokens: Tensor, scores: Optional[Tensor],
                       weights: Optional[Tensor], temperature: Scalar) -> Tensor:
    """Per-slot weights w[B, k] (float32, 0 on invalid slots)."""
    B, k = tokens.shape
    if (scores is None) == (weights is None):
        _fail(op, "exactly one of scores or weights must be given, got "
                  + ("both" if scores is not None else "neither"))
    if scores is not None:
        _check_2d(op, "scores", scores)
        if tuple(scores.shape) != (B, k):
            _fail(op, f"scores must have shape [{B}, {k}] like tokens, got {tuple(scores.shape)}")
        _check_same_device(op, "tokens", tokens, scores=scores)
        return _masked_softmax(scores, tokens, _tau(op, temperature, B, tokens.device))
    _check_2d(op, "weights", weights)
    if tuple(weights.shape) != (B, k):
        _fail(op, f"weights must have shape [{B}, {k}] like tokens, got {tuple(weights.shape)}")
    _check_same_device(op, "tokens", tokens, weights=weights)
    w = weights.float()
    if bool((w < 0).any()) or bool(torch.isnan(w).any()):
        _fail(op, "weights must be >= 0")
    return w.masked_fill(tokens < 0, 0.0)


def _first_occurrence(tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
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


# --------------------------------------------------------------------------- #
# search                                                                      #
# --------------------------------------------------------------------------- #
def _topk_smallest_index(s: Tensor, kk: int) -> Tuple[Tensor, Tensor]:
    """Top-kk of each row of s (no NaN), ties at the k-th value to the smaller index.

    Returns (values, positions), unordered within a row except that positions
    are a valid top-kk set. torch.topk alone leaves the choice among equal
    values at the boundary unspecified; rows where that matters are redone
    with an exact (threshold + cumulative count) selection.
    """
    vals, pos = torch.topk(s, kk, dim=1, largest=True, sorted=False)
    thr = vals.amin(dim=1, keepdim=True)
    n_ge = (s >= thr).sum(dim=1)
    tied = n_ge > kk
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sub, t = s[rows], thr[rows]
        gt = sub > t
        eq = sub == t
        need = kk - gt.sum(dim=1, keepdim=True)
        sel = gt | (eq & (torch.cumsum(eq.to(torch.int64), dim=1) <= need))
        p = sel.nonzero()[:, 1].view(rows.numel(), kk)  # row-major: ascending position
        vals[rows] = sub.gather(1, p)
        pos[rows] = p
    return vals, pos


def _merge(run_s: Tensor, run_i: Tensor, new_s: Tensor, new_i: Tensor, k: int):
    """Merge a running top-k (sorted by (-score, index)) with tile candidates.

    All tile indices are larger than all running indices, so after ordering the
    tile candidates by index, a stable descending sort of the concatenation
    orders equal scores by ascending index.
    """
    new_i, order = torch.sort(new_i, dim=1)
    new_s = new_s.gather(1, order)
    cat_s = torch.cat([run_s, new_s], dim=1)
    cat_i = torch.cat([run_i, new_i], dim=1)
    srt, order = torch.sort(cat_s, dim=1, descending=True, stable=True)
    return srt[:, :k], cat_i.gather(1, order[:, :k])


def _tile_scores(q: Tensor, q_sq: Optional[Tensor], q_norm: Optional[Tensor],
                 kt: Tensor, kt_sq: Optional[Tensor], metric: str) -> Tensor:
    dots = q @ kt.t()  # [B, T] float32
    if metric == "ip":
        return dots
    if metric == "l2":
        d = (q_sq - 2.0 * dots) + kt_sq.unsqueeze(0)
        return -d.clamp_min_(0.0)
    k_norm = kt_sq.sqrt().clamp_min(COS_EPS)
    return dots / (q_norm * k_norm.unsqueeze(0))


def knn_search(queries: Tensor, keys: Tensor, k: int, metric: str = "l2", *,
               key_sq_norms: Optional[Tensor] = None,
               exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact top-k by score. Returns (scores[B,k] float32 descending, indices[B,k] int64)."""
    op = "knn_search"
    _check_2d(op, "queries", queries, _FLOAT_DTYPES)
    _check_2d(op, "keys", keys, _FLOAT_DTYPES)
    _check_metric(op, metric)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        _fail(op, f"k must be in [1, {MAX_K}], got {k}")
    B, D = queries.shape
    N = keys.shape[0]
    if N == 0:
        _fail(op, "keys must have at least one row (N >= 1), got N = 0")
    if keys.shape[1] != D:
        _fail(op, f"keys must have D = {D} columns like queries, got keys shape {tuple(keys.shape)}")
    _check_same_device(op, "queries", queries, keys=keys, key_sq_norms=key_sq_norms, exclude=exclude)
    if key_sq_norms is not None:
        if key_sq_norms.dtype != torch.float32 or tuple(key_sq_norms.shape) != (N,):
            _fail(op, f"key_sq_norms must be float32 of shape [{N}], got "
                      f"{key_sq_norms.dtype} {tuple(key_sq_norms.shape)}")
    if exclude is not None:
        if exclude.dtype != torch.int64 or tuple(exclude.shape) != (B,):
            _fail(op, f"exclude must be int64 of shape [{B}], got {exclude.dtype} {tuple(exclude.shape)}")
        if B and (int(exclude.min()) < -1 or int(exclude.max()) >= N):
            _fail(op, f"exclude entries must be in [-1, {N}), got "
                      f"{int(exclude.min()) if int(exclude.min()) < -1 else int(exclude.max())}")
    q = queries.float()
    if not bool(torch.isfinite(q).all()):
        _fail(op, "queries contain NaN or inf")

    device = queries.device
    q_sq = q_norm = None
    if metric == "l2":
        q_sq = (q * q).sum(dim=1, keepdim=True)
    elif metric == "cos":
        q_norm = q.norm(dim=1, keepdim=True).clamp_min(COS_EPS)

    run_s = torch.full((B, k), _NEG_INF, dtype=torch.float32, device=device)
    run_i = torch.full((B, k), -1, dtype=torch.int64, device=device)
    if B == 0:
        return run_s, run_i
    if exclude is not None:
        ex_rows = (exclude >= 0).nonzero().squeeze(1)
        ex_ids = exclude[ex_rows]

    for start in range(0, N, KEY_TILE):
        end = min(start + KEY_TILE, N)
        kt = keys[start:end].float()
        kt_sq = None
        if metric != "ip":
            kt_sq = key_sq_norms[start:end] if key_sq_norms is not None else (kt * kt).sum(dim=1)
        s = _tile_scores(q, q_sq, q_norm, kt, kt_sq, metric)
        s = torch.nan_to_num_(s, nan=_NEG_INF, posinf=float("inf"), neginf=_NEG_INF)
        if exclude is not None and ex_rows.numel():
            inside = (ex_ids >= start) & (ex_ids < end)
            s[ex_rows[inside], ex_ids[inside] - start] = _NEG_INF
        kk = min(k, end - start)
        vals, pos = _topk_smallest_index(s, kk)
        run_s, run_i = _merge(run_s, run_i, vals, pos + start, k)

    run_i = run_i.masked_fill(run_s == _NEG_INF, -1)
    return run_s.contiguous(), run_i.contiguous()


def knn_rescore(queries: Tensor, keys: Tensor, indices: Tensor, metric: str = "l2") -> Tensor:
    """Exact float32 scores of the given candidate ids; id -1 -> -inf."""
    op = "knn_rescore"
    _check_2d(op, "queries", queries, _FLOAT_DTYPES)
    _check_2d(op, "keys", keys, _FLOAT_DTYPES)
    _check_2d(op, "indices", indices, (torch.int64,))
    _check_metric(op, metric)
    B, D = queries.shape
    N = keys.shape[0]
    if keys.shape[1] != D:
        _fail(op, f"keys must have D = {D} columns like queries, got keys shape {tuple(keys.shape)}")
    if indices.shape[0] != B:
        _fail(op, f"indices must have {B} rows like queries, got shape {tuple(indices.shape)}")
    _check_same_device(op, "queries", queries, keys=keys, indices=indices)
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < -1 or hi >= N:
            _fail(op, f"indices must be in [-1, {N}), got {lo if lo < -1 else hi}")
    q = queries.float()
    valid = indices >= 0
    kg = keys[indices.clamp(min=0)].float()  # [B, k, D]; only the candidate rows
    if metric == "l2":
        s = -(kg - q.unsqueeze(1)).pow(2).sum(dim=-1)
    else:
        s = torch.bmm(kg, q.unsqueeze(2)).squeeze(2)
        if metric == "cos":
            qn = q.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
            kn = kg.norm(dim=-1).clamp_min(COS_EPS)
            s = s / (qn * kn)
    return s.masked_fill(~valid, _NEG_INF).contiguous()


# --------------------------------------------------------------------------- #
# probabilities                                                               #
# --------------------------------------------------------------------------- #
def knn_probs(scores: Tensor, tokens: Tensor, vocab_size: int,
              temperature: Scalar = 1.0) -> Tensor:
    """Dense P_kNN[B, V] = M . softmax(scores / tau) over valid slots (rows without one: 0)."""
    op = "knn_probs"
    _check_2d(op, "scores", scores)
    B, k = scores.shape
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        _fail(op, f"vocab_size must be a positive int, got {vocab_size}")
    _check_tokens(op, tokens, B, k, vocab_size)
    _check_same_device(op, "scores", scores, tokens=tokens)
    w = _masked_softmax(scores, tokens, _tau(op, temperature, B, scores.device))
    probs = torch.zeros(B, vocab_size, dtype=torch.float32, device=scores.device)
    return probs.scatter_add_(1, tokens.long().clamp(min=0), w)


def knn_probs_sparse(scores: Tensor, tokens: Tensor,
                     temperature: Scalar = 1.0) -> Tuple[Tensor, Tensor]:
    """Sparse P_kNN: (tokens_u[B,k] int64, probs[B,k] float32), duplicates merged.

    The first occurrence of a token keeps its slot and the summed probability;
    later duplicates and invalid slots become (-1, 0).
    """
    op = "knn_probs_sparse"
    _check_2d(op, "scores", scores)
    B, k = scores.shape
    _check_tokens(op, tokens, B, k, None)
    _check_same_device(op, "scores", scores, tokens=tokens)
    tokens = tokens.long()
    w = _masked_softmax(scores, tokens, _tau(op, temperature, B, scores.device))
    perm, group, is_start = _first_occurrence(tokens)
    sums = torch.zeros_like(w).scatter_add_(1, group, w.gather(1, perm))
    # original slot of each sorted position; keep the group starts of valid tokens
    keep = is_start & (tokens.gather(1, perm) >= 0)
    out_tok = torch.full_like(tokens, -1)
    out_p = torch.zeros_like(w)
    out_tok.scatter_(1, perm, torch.where(keep, tokens.gather(1, perm), out_tok))
    out_p.scatter_(1, perm, torch.where(keep, sums.gather(1, group), out_p))
    return out_tok, out_p


def knn_interpolate(logits: Tensor, tokens: Tensor, *, scores: Optional[Tensor] = None,
                    weights: Optional[Tensor] = None, temperature: Scalar = 1.0,
                    lam: Scalar = 0.5, out: Optional[Tensor] = None) -> Tensor:
    """log((1 - lam) * softmax(logits) + lam * P_kNN) as float32 [B, V].

    knn-transformers style: log_softmax of the logits, dense P_kNN by
    scatter_add_, mixed in log space with torch.logaddexp. Rows without a valid
    neighbour get log_softmax(logits) (lam treated as 0).
    """
    op = "knn_interpolate"
    _check_logits(op, logits)
    B, V = logits.shape
    _check_tokens(op, tokens, B, None, V)
    _check_same_device(op, "logits", logits, tokens=tokens, scores=scores, weights=weights, out=out)
    if out is not None:
        if out.dtype != torch.float32 or tuple(out.shape) != (B, V) or not out.is_contiguous():
            _fail(op, f"out must be a contiguous float32 tensor of shape [{B}, {V}], got "
                      f"{out.dtype} {tuple(out.shape)}")
    tokens = tokens.long()
    w = _neighbour_weights(op, tokens, scores, weights, temperature)
    lam_t = _lam(op, lam, B, logits.device)
    has_nbr = w.sum(dim=1, keepdim=True) > 0
    lam_t = torch.where(has_nbr, lam_t, torch.zeros_like(lam_t))

    logp_model = torch.log_softmax(logits.float(), dim=-1)
    p_knn = torch.zeros(B, V, dtype=torch.float32, device=logits.device)
    p_knn.scatter_add_(1, tokens.clamp(min=0), w)
    res = torch.logaddexp(torch.log1p(-lam_t) + logp_model, torch.log(lam_t) + torch.log(p_knn))
    if out is not None:
        return out.copy_(res)
    return res


def knn_gold_logprob(logits: Tensor, targets: Tensor, tokens: Tensor, *,
                     scores: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                     temperature: Scalar = 1.0, lam: Scalar = 0.5,
                     ignore_index: int = -100) -> Tensor:
    """knn_interpolate(...)[b, targets[b]] as float32 [B], computed sparsely; ignored rows -> 0."""
    op = "knn_gold_logprob"
    _check_logits(op, logits)
    B, V = logits.shape
    targets, ignored = _check_targets(op, targets, B, V, ignore_index)
    _check_tokens(op, tokens, B, None, V)
    _check_same_device(op, "logits", logits, targets=targets, tokens=tokens,
                       scores=scores, weights=weights)
    tokens = tokens.long()
    w = _neighbour_weights(op, tokens, scores, weights, temperature)
    lam_t = _lam(op, lam, B, logits.device).squeeze(1)
    has_nbr = w.sum(dim=1) > 0
    lam_t = torch.where(has_nbr, lam_t, torch.zeros_like(lam_t))

    t = targets.masked_fill(ignored, 0)
    lf = logits.float()
    logp_model = lf.gather(1, t.unsqueeze(1)).squeeze(1) - torch.logsumexp(lf, dim=-1)
    p_knn = (w * (tokens == t.unsqueeze(1))).sum(dim=1)
    res = torch.logaddexp(torch.log1p(-lam_t) + logp_model, torch.log(lam_t) + torch.log(p_knn))
    return res.masked_fill(ignored, 0.0)


def label_counts(tokens: Tensor) -> Tensor:
    """counts[b, j] = number of distinct valid (!= -1) tokens among tokens[b, :j+1]."""
    op = "label_counts"
    _check_2d(op, "tokens", tokens)
    if tokens.dtype not in (torch.int64, torch.int32):
        _fail(op, f"tokens must be int64 (or int32), got {tokens.dtype}")
    if tokens.numel() and int(tokens.min()) < -1:
        _fail(op, f"tokens must be >= -1, got {int(tokens.min())}")
    tokens = tokens.long()
    perm, _, is_start = _first_occurrence(tokens)
    first = torch.zeros_like(is_start).scatter_(1, perm, is_start) & (tokens >= 0)
    return torch.cumsum(first.to(torch.int64), dim=1)


def knn_kd_loss(logits: Tensor, targets: Tensor, teacher_tokens: Tensor,
                teacher_scores: Optional[Tensor] = None, *,
                teacher_probs: Optional[Tensor] = None, temperature: Scalar = 1.0,
                ce_weight: float = 1.0, kd_weight: float = 1.0, label_smoothing: float = 0.0,
                ignore_index: int = -100, reduction: str = "mean", kd: str = "ce") -> Tensor:
    """kNN-KD loss (Yang et al. 2022), dense PyTorch path (the ANCHORS "dense teacher").

    Per row: ce_weight * CE_ls(logits, y) + kd_weight * KD, with the teacher
    p_T = M . softmax(teacher_scores / temperature) (or M . teacher_probs, a precomputed
    sparse teacher) scattered into a dense [B, V] tensor, and
    KD = H(p_T, softmax(logits)) for kd="ce" (the paper's form: weights (1 - a, a)) or
    KL(p_T || softmax(logits)) for kd="kl" (the released code: LS-CE(0.1) + rate * KL).
    Rows with targets == ignore_index contribute 0 and are not counted; a row without a
    valid teacher slot has KD = 0. reduction: "none" -> [B], "sum", or "mean" (sum over the
    counted rows / their number; 0 when there are none). Gradients reach logits only.
    """
    op = "knn_kd_loss"
    _check_logits(op, logits)
    B, V = logits.shape
    targets, ignored = _check_targets(op, targets, B, V, ignore_index)
    _check_tokens(op, teacher_tokens, B, None, V, name="teacher_tokens")
    _check_same_device(op, "logits", logits, targets=targets, teacher_tokens=teacher_tokens,
                       teacher_scores=teacher_scores, teacher_probs=teacher_probs)
    if reduction not in ("none", "sum", "mean"):
        _fail(op, f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    if kd not in ("ce", "kl"):
        _fail(op, f"kd must be 'ce' or 'kl', got {kd!r}")
    if not 0.0 <= float(label_smoothing) < 1.0:
        _fail(op, f"label_smoothing must be in [0, 1), got {label_smoothing}")
    for name, val in (("ce_weight", ce_weight), ("kd_weight", kd_weight)):
        if not math.isfinite(float(val)) or float(val) < 0:
            _fail(op, f"{name} must be a finite number >= 0, got {val}")
    tokens = teacher_tokens.long()
    if (teacher_scores is None) == (teacher_probs is None):
        _fail(op, "exactly one of teacher_scores or teacher_probs must be given, got "
                  + ("both" if teacher_scores is not None else "neither"))
    for name, t in (("teacher_scores", teacher_scores), ("teacher_probs", teacher_probs)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != tuple(tokens.shape)):
            _fail(op, f"{name} must have shape {list(tokens.shape)} like teacher_tokens, got "
                      f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    w = _neighbour_weights(op, tokens, teacher_scores, teacher_probs, temperature)
    if teacher_scores is not None and bool((torch.isnan(teacher_scores) |
                                            torch.isposinf(teacher_scores)).any()):
        _fail(op, "teacher_scores contain NaN or +inf")

    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.log_softmax(logits.to(dt), dim=-1)
    safe_t = targets.masked_fill(ignored, 0)
    nll = -logp.gather(1, safe_t[:, None]).squeeze(1)
    ce = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=1)
    p_teacher = torch.zeros(B, V, dtype=dt, device=logits.device)
    p_teacher.scatter_add_(1, tokens.clamp(min=0), w.to(dt))
    kd_row = -(p_teacher * logp).sum(dim=1)
    if kd == "kl":
        kd_row = kd_row + torch.xlogy(p_teacher, p_teacher).sum(dim=1)
    loss = (ce_weight * ce + kd_weight * kd_row).masked_fill(ignored, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    count = (~ignored).sum()
    return loss.sum() / count.clamp(min=1).to(loss.dtype)


def ink_loss(hidden: Tensor, out_weight: Tensor, targets: Tensor, nbr_keys: Tensor,
             nbr_tokens: Tensor, *, alpha: float = 0.1, beta: float = 0.1,
             out_bias: Optional[Tensor] = None, ignore_index: int = -100,
             variant: str = "paper", detach_knn: bool = False, reference_k: int = 8,
             reduction: str = "mean") -> Tuple[Tensor, dict]:
    """INK (2023) representation-refinement loss L_a + alpha L_i + beta L_r (DESIGN §6).

    hidden [B, D] (decoder states, through the adapters), out_weight [V, D] (and out_bias [V])
    give logits = hidden W^T + b; nbr_keys [B, k, D] / nbr_tokens [B, k] are the retrieved
    datastore keys and their tokens (-1 = padding).
      L_a = CE(softmax(logits), y)   (label smoothing 0.1 in variant="reference")
      L_i = KL(p_kNN || softmax(logits)), p_kNN(v) = sum_{v_j = v} softmax_j(c_j) with
            c_j = cos(h, k_j) (kappa = exp(cos)); variant="reference": softmax_j(exp(c_j))
            over the first `reference_k` neighbours only (the released code)
      L_r = -log sum_{v_j = y} exp(c_j) / sum_j exp(c_j)   (0 when no neighbour has token y)
    Gradients flow into hidden, out_weight (and nbr_keys) and through p_kNN unless
    `detach_knn`. Rows with targets == ignore_index are masked; "mean" averages the counted
    rows. Returns (loss, {"align", "kd", "refine"}) with each part reduced the same way.
    """
    op = "ink_loss"
    if variant not in ("paper", "reference"):
        _fail(op, f"variant must be 'paper' or 'reference', got {variant!r}")
    if reduction not in ("none", "sum", "mean"):
        _fail(op, f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    _check_2d(op, "hidden", hidden)
    _check_2d(op, "out_weight", out_weight)
    B, D = hidden.shape
    V = out_weight.shape[0]
    if out_weight.shape[1] != D:
        _fail(op, f"out_weight must have shape [V, {D}], got {tuple(out_weight.shape)}")
    if not isinstance(nbr_keys, Tensor) or nbr_keys.dim() != 3 or nbr_keys.shape[0] != B \
            or nbr_keys.shape[2] != D:
        _fail(op, f"nbr_keys must have shape [{B}, k, {D}], got "
                  f"{tuple(nbr_keys.shape) if isinstance(nbr_keys, Tensor) else type(nbr_keys).__name__}")
    _check_tokens(op, nbr_tokens, B, nbr_keys.shape[1], V, name="nbr_tokens")
    targets, ignored = _check_targets(op, targets, B, V, ignore_index)
    for name, val in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(float(val)) or float(val) < 0:
            _fail(op, f"{name} must be a finite number >= 0, got {val}")

    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.to(dt)
    logits = h @ out_weight.to(dt).T
    if out_bias is not None:
        logits = logits + out_bias.to(dt)
    logp = torch.log_softmax(logits, dim=-1)
    y = targets.masked_fill(ignored, 0)
    eps = 0.1 if variant == "reference" else 0.0
    align = -(1 - eps) * logp.gather(1, y[:, None]).squeeze(1) - eps * logp.mean(dim=1)

    tokens = nbr_tokens.long()
    valid = tokens >= 0
    cos = torch.nn.functional.cosine_similarity(h[:, None, :], nbr_keys.to(dt), dim=-1,
                                                eps=COS_EPS)
    z = cos if variant == "paper" else torch.exp(cos)
    kd_valid = valid.clone()
    if variant == "reference":
        kd_valid[:, reference_k:] = False
    zk = z.masked_fill(~kd_valid, _NEG_INF)
    has = kd_valid.any(dim=1)
    w = torch.softmax(zk.masked_fill(~has[:, None], 0.0), dim=1) * kd_valid
    if detach_knn:
        w = w.detach()
    p_knn = torch.zeros(B, V, dtype=dt, device=hidden.device).scatter_add(1, tokens.clamp(min=0), w)
    # p log p with a finite slope at p = 0 (empty vocabulary entries must not send inf * 0)
    log_p_knn = torch.log(p_knn.clamp_min(torch.finfo(dt).tiny))
    kd = (p_knn * (log_p_knn - logp)).sum(dim=1)

    # rows whose log-sum-exp would be over nothing get finite stand-ins (their term is 0 and
    # torch.where must not back-propagate NaN from the unused branch)
    match = valid & (tokens == y[:, None])
    any_match = match.any(dim=1, keepdim=True)
    den = torch.logsumexp(torch.where(any_match, cos.masked_fill(~valid, _NEG_INF), 0.0), dim=1)
    num = torch.logsumexp(torch.where(any_match, cos.masked_fill(~match, _NEG_INF), 0.0), dim=1)
    refine = torch.where(any_match[:, 0], den - num, torch.zeros_like(den))

    parts = {"align": align, "kd": kd, "refine": refine}
    parts = {k_: v.masked_fill(ignored, 0.0) for k_, v in parts.items()}
    loss = parts["align"] + alpha * parts["kd"] + beta * parts["refine"]
    if reduction == "none":
        return loss, parts
    if reduction == "sum":
        return loss.sum(), {k_: v.sum() for k_, v in parts.items()}
    n = (~ignored).sum().clamp(min=1).to(dt)
    return loss.sum() / n, {k_: v.sum() / n for k_, v in parts.items()}
