"""Fused INK loss L_a + alpha L_i + beta L_r (DESIGN §6) without any [B, V] tensor: L_a + alpha
L_i go through knn_kd_linear_loss (the output projection fused with the loss, in row or
vocabulary chunks), the kNN side is [B, k] PyTorch code."""
from __future__ import annotations

import torch

from ... import reference
from ...ops.knn_kd_linear_loss import pick_strategy
from ...ops.knn_kd_linear_rows import linear_kd_rows
from ...reference import COS_EPS
from ...reference.losses import check_ink_loss_args, ink_knn_weights, ink_refine


# The neighbour logits h . W[t_j] + b[t_j] are gathered in row blocks of at most this many
# weight floats (8 MiB), so no [B, k, D] copy of the weight rows is ever whole.
GATHER_FLOATS = 1 << 21


def _align_and_kd(hidden, weight, bias, targets, tokens, w, alpha, eps, ignore_index, count):
    """(L_a + alpha L_i with the kNN weights ``w`` held fixed, mean over the ``count``
    counted rows; log p at every neighbour slot [B, k], without gradient).

    One knn_kd_linear_loss pass with ``w`` as the teacher probabilities (KL form), by its
    row strategy when a gradient is wanted (row chunks, loss and gradients in one walk), else
    by the registered op (vocabulary chunks): no [B, V] tensor exists. Its
    per-row log-sum-exp gives log p(t_j) = h . W[t_j] + b[t_j] - lse from k dot products per
    row: nothing of INK needs the full logits."""
    tau = torch.ones(1, device=hidden.device)
    if pick_strategy("auto", "mean", 0, hidden, weight, bias) == "rows":
        # knn_kd_linear_loss's row strategy: 3 GEMMs instead of the vocabulary strategy's 4
        loss, lse = linear_kd_rows(hidden, weight, bias, targets, tokens, None, w, tau, 1.0,
                                   alpha, eps, ignore_index, True, "mean", want_lse=True)
    else:
        rows, lse = torch.ops.knnfast.knn_kd_linear_loss(
            hidden, weight, bias, targets, tokens, None, w, tau, 1.0, float(alpha), float(eps),
            int(ignore_index), True, 0)
        loss = rows.sum() / count
    with torch.no_grad():
        logp_nbr = _neighbour_logits(hidden, weight, bias, tokens) - lse[:, None]
    return loss, logp_nbr


def _neighbour_logits(hidden, weight, bias, tokens):
    """[B, k] logits of the neighbour tokens (padding -1 reads token 0; callers mask it)."""
    idx = tokens.clamp(min=0)
    step = max(1, GATHER_FLOATS // max(1, tokens.shape[1] * hidden.shape[1]))
    out = torch.cat([torch.einsum("bd,bkd->bk", hidden[s:s + step], weight[idx[s:s + step]])
                     for s in range(0, hidden.shape[0], step)])
    return out if bias is None else out + bias[idx]


def ink_loss(hidden: torch.Tensor, out_weight: torch.Tensor, targets: torch.Tensor,
             nbr_keys: torch.Tensor, nbr_tokens: torch.Tensor, *, alpha: float = 0.1,
             beta: float = 0.1, out_bias: torch.Tensor = None, ignore_index: int = -100,
             variant: str = "paper", detach_knn: bool = False, reference_k: int = 8):
    """INK loss L_a + alpha L_i + beta L_r, mean over the counted rows (DESIGN §6; the same
    contract as knnfast.reference.ink_loss with reduction="mean"), fused: no [B, V] tensor
    in forward or backward (see _align_and_kd). The kNN side
    ([B, k] cosine kernels, p_kNN merged per token, L_r) is small PyTorch code; the gradient
    through p_kNN enters via a surrogate with the value 0. Returns (loss, {"align", "kd",
    "refine"}) with the parts detached."""
    targets, ignored = check_ink_loss_args(hidden, out_weight, targets, nbr_keys, nbr_tokens,
                                           alpha, beta, ignore_index, variant, "mean")
    if hidden.dtype != torch.float32 or out_weight.dtype != torch.float32:
        # the fused path works in float32; other dtypes take the reference path
        return reference.ink_loss(hidden, out_weight, targets, nbr_keys, nbr_tokens, alpha=alpha,
                                  beta=beta, out_bias=out_bias, ignore_index=ignore_index,
                                  variant=variant, detach_knn=detach_knn, reference_k=reference_k)
    tokens = nbr_tokens.long()
    live = ~ignored
    count = live.sum().clamp(min=1).float()
    eps = 0.1 if variant == "reference" else 0.0

    valid = tokens >= 0
    cos = torch.nn.functional.cosine_similarity(hidden[:, None, :], nbr_keys.float(), dim=-1,
                                                eps=COS_EPS)
    w = ink_knn_weights(cos, valid, variant, reference_k)
    kd_valid = w > 0  # softmax weights of cosines never underflow: > 0 exactly on the used slots

    loss_ai, logp_nbr = _align_and_kd(hidden, out_weight, out_bias, targets, tokens,
                                      w.detach(), alpha, eps, ignore_index, count)
    # p_kNN at each slot's token (duplicates merged) and the L_i gradient through w:
    # d L_i / d w_j = log P(t_j) + 1 - log p(t_j); the +1 sums to 0 over a softmax.
    same = (tokens[:, :, None] == tokens[:, None, :]) & kd_valid[:, None, :]
    p_tok = (w.detach()[:, None, :] * same).sum(-1)
    kd_part = ((w.detach() * (torch.log(p_tok.clamp_min(1e-38)) - logp_nbr)) * kd_valid).sum(1)
    surrogate = torch.zeros((), device=hidden.device)
    if not detach_knn and alpha > 0:
        coef = (torch.log(p_tok.clamp_min(1e-38)) - logp_nbr) * kd_valid * live[:, None]
        surrogate = alpha * ((w * coef).sum() - (w * coef).sum().detach()) / count

    match = valid & (tokens == targets.masked_fill(~live, 0)[:, None])
    refine = ink_refine(cos, valid, match).masked_fill(~live, 0.0)
    loss = loss_ai + surrogate + beta * refine.sum() / count
    kd_mean = float((kd_part * live).sum() / count)
    parts = {"kd": kd_mean, "refine": float(refine.detach().sum() / count),
             "align": float(loss_ai.detach()) - alpha * kd_mean}
    return loss, parts

