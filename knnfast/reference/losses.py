"""Reference losses: kNN-KD (dense teacher) and INK's L_a + alpha L_i + beta L_r."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..defaults import OPS as DEFAULTS
from ..ops import args
from ..ops.knn_kd_loss import TEACHER_NAMES, reduce_rows
from .common import (COS_EPS, NEG_INF, checked_logits, checked_neighbours, checked_targets,
                     first_occurrence)


def knn_kd_loss(logits: Tensor, targets: Tensor, teacher_tokens: Tensor,
                teacher_scores: Optional[Tensor] = None, *,
                teacher_probs: Optional[Tensor] = None,
                temperature: args.RowScalar = DEFAULTS.temperature, ce_weight: float = 1.0,
                kd_weight: float = 1.0, label_smoothing: float = 0.0, ignore_index: int = -100,
                reduction: str = "mean", kd: str = "ce") -> Tensor:
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
    args.check_tensor(op, "logits", logits)
    args.check_reduction(op, reduction)
    args.check_choice(op, "kd", kd, args.KD_FORMS)
    args.check_kd_weights(op, ce_weight, kd_weight, label_smoothing)
    args.check_logits_input(op, logits)
    B, V = logits.shape
    targets, ignored = checked_targets(op, targets, B, V, ignore_index)
    tokens, w = checked_neighbours(op, B, teacher_tokens, teacher_scores, teacher_probs,
                                   temperature, V, logits.device, names=TEACHER_NAMES)
    checked_logits(op, logits)
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
    return reduce_rows(loss, targets, ignore_index, reduction)


#: knn_kd_linear_loss's automatic chunk: a [T, C] tile of at most this many elements (the
#: kernels' rule, csrc/cpu/knn_kd_linear_loss_cpu.cpp), and never fewer than 128 columns.
LINEAR_TILE = 1 << 21


def knn_kd_linear_loss(hidden: Tensor, weight: Tensor, targets: Tensor,
                       teacher_tokens: Optional[Tensor] = None,
                       teacher_scores: Optional[Tensor] = None, *,
                       teacher_probs: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                       temperature: args.RowScalar = DEFAULTS.temperature,
                       ce_weight: float = 1.0, kd_weight: float = 1.0,
                       label_smoothing: float = 0.0, ignore_index: int = -100,
                       reduction: str = "mean", kd: str = "ce", chunk: int = 0) -> Tensor:
    """knn_kd_loss(F.linear(hidden, weight, bias), ...) in vocabulary chunks, pure PyTorch.

    Each chunk's logits [T, C] (float32, float64 for float64 inputs) exist only inside
    torch.utils.checkpoint, which keeps per-row statistics (chunk log-sum-exp, row sum, the
    target and teacher logits in the chunk) and recomputes the chunk in backward, so no
    [T, V] tensor is built in either direction; autograd does the rest. teacher_tokens None:
    plain label-smoothed cross-entropy (times ce_weight).
    """
    op = "knn_kd_linear_loss"
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        args.check_tensor(op, name, t)
    args.check_linear_meta(op, hidden, weight, bias)
    args.check_reduction(op, reduction)
    args.check_choice(op, "kd", kd, args.KD_FORMS)
    args.check_kd_weights(op, ce_weight, kd_weight, label_smoothing)
    args.check_int(op, "chunk", chunk, 0)
    (T, D), V = hidden.shape, weight.shape[0]
    targets, ignored = checked_targets(op, targets, T, V, ignore_index)
    tokens, w = linear_teacher(op, hidden, teacher_tokens, teacher_scores, teacher_probs,
                               temperature, V)
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    C = chunk or max(128, LINEAR_TILE // T)
    h = hidden.to(dt)
    parts = [checkpoint(_chunk_stats, h, w_c, b_c, c0, targets, tokens, use_reentrant=False)
             for c0, w_c, b_c in _chunks(weight, bias, C)]
    lse_c, x_y, x_t, x_sum = (torch.stack(p, 0) for p in zip(*parts))
    lse = torch.logsumexp(lse_c, dim=0)
    _check_rows(op, lse, ignored)
    x_y, x_t, x_sum = x_y.sum(0), x_t.sum(0), x_sum.sum(0)
    ce = (1.0 - label_smoothing) * (lse - x_y) + label_smoothing * (lse - x_sum / V)
    kd_row = (w.to(dt) * (lse[:, None] - x_t)).sum(1)
    if kd == "kl":
        kd_row = kd_row + _teacher_neg_entropy(tokens, w.to(dt))
    loss = (ce_weight * ce + kd_weight * kd_row).masked_fill(ignored, 0.0)
    return reduce_rows(loss, targets, ignore_index, reduction)


def linear_teacher(op, hidden, tokens, scores, probs, temperature, V) -> Tuple[Tensor, Tensor]:
    """(tokens [T, k] int64, slot weights [T, k]); no teacher: k = 0."""
    T = hidden.shape[0]
    if tokens is None:
        if scores is not None or probs is not None:
            args.fail(op, "teacher_scores / teacher_probs need teacher_tokens")
        empty = torch.empty((T, 0), device=hidden.device)
        return empty.long(), empty
    args.check_tensor(op, "teacher_tokens", tokens)
    return checked_neighbours(op, T, tokens, scores, probs, temperature, V, hidden.device,
                              names=TEACHER_NAMES)


def _chunks(weight: Tensor, bias: Optional[Tensor], C: int):
    # one split (not a slice per chunk): autograd concatenates the chunk gradients once
    w_parts = weight.split(C)
    b_parts = bias.split(C) if bias is not None else [None] * len(w_parts)
    return zip(range(0, weight.shape[0], C), w_parts, b_parts)


def _chunk_stats(h: Tensor, w_c: Tensor, b_c: Optional[Tensor], c0: int, targets: Tensor,
                 tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Row statistics of one chunk's logits: (logsumexp, target logit or 0, teacher logits
    or 0 [T, k], row sum)."""
    x = torch.nn.functional.linear(h, w_c.to(h.dtype), None if b_c is None else b_c.to(h.dtype))
    n = x.shape[1]

    def pick(ids: Tensor) -> Tensor:
        inside = (ids >= c0) & (ids < c0 + n)
        local = torch.where(inside, ids - c0, torch.zeros_like(ids))
        return x.gather(1, local).masked_fill(~inside, 0.0)

    return (torch.logsumexp(x, dim=1), pick(targets[:, None]).squeeze(1), pick(tokens),
            x.sum(1))


def _check_rows(op: str, lse: Tensor, ignored: Tensor) -> None:
    """A NaN / +inf logit makes its row's log-sum-exp NaN / +inf (rows not ignored)."""
    row = args.first_bad(~torch.isfinite(lse) & ~ignored)
    if row is not None:
        args.fail(op, f"logits row {row} contains NaN or +inf (log_softmax is undefined)")


def _teacher_neg_entropy(tokens: Tensor, w: Tensor) -> Tensor:
    """sum_v P_v log P_v per row, equal tokens merged (invalid slots carry weight 0)."""
    perm, group, _ = first_occurrence(tokens)
    mass = torch.zeros_like(w).scatter_add_(1, group, w.gather(1, perm))
    return torch.xlogy(mass, mass).sum(1)


INK_VARIANTS = ("paper", "reference")


def check_ink_loss_args(hidden, out_weight, targets, nbr_keys, nbr_tokens, alpha, beta,
                        ignore_index, variant, reduction) -> Tuple[Tensor, Tensor]:
    """ink_loss's argument rules (the fused knnfast.ink_loss applies the same ones).
    Returns (int64 targets, ignored mask)."""
    op = "ink_loss"
    args.check_choice(op, "variant", variant, INK_VARIANTS)
    args.check_reduction(op, reduction)
    args.check_dim(op, "hidden", hidden, 2)
    args.check_dim(op, "out_weight", out_weight, 2)
    B, D = hidden.shape
    V = out_weight.shape[0]
    if out_weight.shape[1] != D:
        args.fail(op, f"out_weight must have shape [V, {D}], got {list(out_weight.shape)}")
    args.check_tensor(op, "nbr_keys", nbr_keys)
    if nbr_keys.dim() != 3 or nbr_keys.shape[0] != B or nbr_keys.shape[2] != D:
        args.fail(op, f"nbr_keys must have shape [{B}, k, {D}], got {list(nbr_keys.shape)}")
    args.check_index_input(op, "nbr_tokens", nbr_tokens)
    if tuple(nbr_tokens.shape) != (B, nbr_keys.shape[1]):
        args.fail(op, f"nbr_tokens must have shape [{B}, {nbr_keys.shape[1]}], "
                      f"got {list(nbr_tokens.shape)}")
    args.check_values_ids(op, "nbr_tokens", nbr_tokens, V)
    for name, val in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(float(val)) or float(val) < 0:
            args.fail(op, f"{name} must be a finite number >= 0, got {val}")
    return checked_targets(op, targets, B, V, ignore_index)


def ink_knn_weights(cos: Tensor, valid: Tensor, variant: str, reference_k: int) -> Tensor:
    """INK's neighbour weights: softmax_j(cos) over the valid slots (variant "paper") or
    softmax_j(exp(cos)) over the first `reference_k` valid slots (the released code)."""
    z = cos if variant == "paper" else torch.exp(cos)
    kd_valid = valid.clone()
    if variant == "reference":
        kd_valid[:, reference_k:] = False
    zk = z.masked_fill(~kd_valid, NEG_INF)
    has = kd_valid.any(dim=1)
    return torch.softmax(zk.masked_fill(~has[:, None], 0.0), dim=1) * kd_valid


def ink_refine(cos: Tensor, valid: Tensor, match: Tensor) -> Tensor:
    """L_r per row: -log sum_{v_j = y} exp(c_j) / sum_j exp(c_j); 0 without a matching slot.
    Rows whose log-sum-exp would be over nothing get finite stand-ins (their term is 0 and
    torch.where must not back-propagate NaN from the unused branch)."""
    any_match = match.any(dim=1, keepdim=True)
    den = torch.logsumexp(torch.where(any_match, cos.masked_fill(~valid, NEG_INF), 0.0), dim=1)
    num = torch.logsumexp(torch.where(any_match, cos.masked_fill(~match, NEG_INF), 0.0), dim=1)
    return torch.where(any_match[:, 0], den - num, torch.zeros_like(den))


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
    targets, ignored = check_ink_loss_args(hidden, out_weight, targets, nbr_keys, nbr_tokens,
                                           alpha, beta, ignore_index, variant, reduction)
    B, V = hidden.shape[0], out_weight.shape[0]
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
    w = ink_knn_weights(cos, valid, variant, reference_k)
    if detach_knn:
        w = w.detach()
    p_knn = torch.zeros(B, V, dtype=dt, device=hidden.device).scatter_add(1, tokens.clamp(min=0), w)
    # p log p with a finite slope at p = 0 (empty vocabulary entries must not send inf * 0)
    log_p_knn = torch.log(p_knn.clamp_min(torch.finfo(dt).tiny))
    kd = (p_knn * (log_p_knn - logp)).sum(dim=1)
    refine = ink_refine(cos, valid, valid & (tokens == y[:, None]))

    parts = {"align": align, "kd": kd, "refine": refine}
    parts = {k_: v.masked_fill(ignored, 0.0) for k_, v in parts.items()}
    loss = parts["align"] + alpha * parts["kd"] + beta * parts["refine"]
    if reduction == "none":
        return loss, parts
    if reduction == "sum":
        return loss.sum(), {k_: v.sum() for k_, v in parts.items()}
    n = (~ignored).sum().clamp(min=1).to(dt)
    return loss.sum() / n, {k_: v.sum() / n for k_, v in parts.items()}
