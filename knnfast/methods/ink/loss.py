"""Fused INK loss L_a + alpha L_i + beta L_r (DESIGN §6): the only [B, V] buffer is the logits,
which become their own gradient (knn_kd_loss + the in-place knn_kd_loss_grad_)."""
from __future__ import annotations

import torch

from ... import ops, reference
from ...reference import COS_EPS
from ...reference.losses import check_ink_loss_args, ink_knn_weights, ink_refine


class _LogitsLoss(torch.autograd.Function):
    """L_a + alpha L_i over logits = hidden W^T + b, with the kNN weights w held fixed.

    Forward computes the GEMM, the per-row losses (knn_kd_loss: one read of the logits) and
    log p at the neighbour tokens, then overwrites the logits buffer with d loss / d logits
    (knn_kd_loss_grad_), so one [B, V] buffer serves both directions. Backward only scales it
    and runs the two GEMMs for hidden and the output weight."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tokens, w, alpha, eps, ignore_index, count):
        logits = torch.addmm(bias, hidden, weight.t()) if bias is not None else hidden @ weight.t()
        tau = torch.ones(1, device=hidden.device)
        args = (targets, tokens, None, w, tau, 1.0, float(alpha), float(eps), int(ignore_index))
        rows = torch.ops.knnfast.knn_kd_loss(logits, *args, True)
        live = targets != ignore_index
        y = targets.masked_fill(~live, 0)
        no_nbr = torch.full((logits.shape[0], 1), -1, dtype=torch.long, device=logits.device)
        gold = ops.knn_gold_logprob(logits, y, no_nbr, weights=torch.zeros(no_nbr.shape,
                                                                          device=logits.device),
                                    lam=0.0)
        lse = logits.gather(1, y[:, None]).squeeze(1) - gold
        logp_nbr = logits.gather(1, tokens.clamp(min=0)) - lse[:, None]
        torch.ops.knnfast.knn_kd_loss_grad_(logits, live.float() / count, *args)
        ctx.save_for_backward(logits, hidden, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(logp_nbr)
        return rows.sum() / count, logp_nbr

    @staticmethod
    def backward(ctx, g_loss, _g_logp):
        grad_logits, hidden, weight = ctx.saved_tensors
        # scale in place: a second [B, V] buffer is exactly what this function avoids
        g = grad_logits if bool(g_loss == 1) else grad_logits.mul_(g_loss)
        g_hidden = g @ weight if ctx.needs_input_grad[0] else None
        g_weight = g.t() @ hidden if ctx.needs_input_grad[1] else None
        g_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return g_hidden, g_weight, g_bias, None, None, None, None, None, None, None


def ink_loss(hidden: torch.Tensor, out_weight: torch.Tensor, targets: torch.Tensor,
             nbr_keys: torch.Tensor, nbr_tokens: torch.Tensor, *, alpha: float = 0.1,
             beta: float = 0.1, out_bias: torch.Tensor = None, ignore_index: int = -100,
             variant: str = "paper", detach_knn: bool = False, reference_k: int = 8):
    """INK loss L_a + alpha L_i + beta L_r, mean over the counted rows (DESIGN §6; the same
    contract as knnfast.reference.ink_loss with reduction="mean"), fused: the only [B, V]
    buffer is the logits, which become their own gradient (see _LogitsLoss). The kNN side
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

    loss_ai, logp_nbr = _LogitsLoss.apply(hidden, out_weight, out_bias, targets, tokens,
                                          w.detach(), float(alpha), eps, ignore_index, count)
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

