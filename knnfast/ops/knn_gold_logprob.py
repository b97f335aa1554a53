"""knn_gold_logprob: knn_interpolate at the target token only (wrapper, fake kernel, autograd).

C++: csrc/cpu/knn_gold_logprob_cpu.cpp, csrc/cuda/knn_gold_logprob{.cu,_cuda.cpp};
reference: knnfast.reference.knn_gold_logprob; tests: tests/test_knn_gold_logprob.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..defaults import OPS as DEFAULTS
from . import args
from . import neighbour_grads as ng
from .library import OPS


def knn_gold_logprob(logits: Tensor, targets: Tensor, tokens: Tensor, *,
                     scores: Optional[Tensor] = None, weights: Optional[Tensor] = None,
                     temperature: args.RowScalar = DEFAULTS.temperature,
                     lam: args.RowScalar = DEFAULTS.lam, ignore_index: int = -100) -> Tensor:
    """knn_interpolate at the target token only: float32 [B] (0 where targets ==
    ignore_index). Reads the logits once; for perplexity evaluation and λ/τ tuning."""
    op = "knn_gold_logprob"
    for name, t in (("logits", logits), ("targets", targets), ("tokens", tokens)):
        args.check_tensor(op, name, t)
    args.exactly_one(op, "scores", scores, "weights", weights)
    rows = logits.shape[0]
    tau = args.row_scalar(op, "temperature", temperature, rows, logits.device, True)
    lam_t = args.row_scalar(op, "lam", lam, rows, logits.device, False)
    return OPS.knn_gold_logprob(logits, targets, tokens, scores, weights, tau, lam_t,
                                int(ignore_index))


@torch.library.register_fake("knnfast::knn_gold_logprob")
def _(logits, targets, tokens, scores, weights, temperature, lam, ignore_index):
    op = "knn_gold_logprob"
    args.check_logits_input(op, logits)
    args.check_same_device(op, logits, targets=targets, tokens=tokens, scores=scores,
                           weights=weights, temperature=temperature, lam=lam)
    args.check_targets_meta(op, targets, logits.shape[0])
    args.check_neighbour_meta(op, logits.shape[0], tokens, scores, weights, temperature)
    args.check_row_param(op, "lam", lam, logits.shape[0])
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


# ----------------------------------------------------------------------------- autograd
# Saved: log p(y) [B]; the [B, V] logits only when their gradient is needed.


def _setup_context(ctx, inputs, output):
    logits, targets, tokens, scores, weights, temperature, lam, ignore_index = inputs
    y = ng.as_int64(torch.where(targets != ignore_index, targets, torch.zeros_like(targets)))
    # log p(y) through log_softmax, as the backward's softmax is computed, so that the lam /
    # weight gradients round exactly like the logits gradient (a [B, V] temporary, not saved).
    # No alias op (a same-dtype .float() returns its input and fails opcheck's schema test).
    lf = logits if logits.dtype == torch.float32 else logits.float()
    logp_y = torch.log_softmax(lf, dim=1).gather(1, y[:, None])[:, 0]
    ctx.ignore_index = ignore_index
    kept_logits = logits if ctx.needs_input_grad[0] else None
    ctx.save_for_backward(kept_logits, targets, tokens, scores, weights, temperature, lam,
                          output, logp_y)


def _backward(ctx, grad):
    (logits, targets, tokens, scores, weights, temperature, lam, out,
     logp_y) = ctx.saved_tensors
    needs = ctx.needs_input_grad
    tokens = tokens.long()
    live = targets != ctx.ignore_index
    y = torch.where(live, targets.long(), torch.zeros_like(targets, dtype=torch.long))
    tau, lam_eff, has = ng.effective_lam(tokens, scores, weights, temperature, lam)
    g = torch.where(live, grad.float(), torch.zeros_like(grad, dtype=torch.float32))
    g_logits = g_lam = None
    if needs[0]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        model_share = ng.finite_exp(torch.log1p(-lam_eff) + logp_y - out)
        coef = (g * model_share)[:, None]
        onehot = torch.zeros_like(logp).scatter_(1, y[:, None], 1.0)
        g_logits = (coef * (onehot - torch.exp(logp))).to(logits.dtype)
    g_t = g[:, None] * (tokens == y[:, None])
    g_scores, g_weights, g_tau, g_lam_knn = ng.neighbour_grads(
        g_t, out[:, None].expand_as(g_t), tokens, scores, weights, tau, lam_eff)
    if needs[6]:
        g_lam = g_lam_knn - g * ng.finite_exp(logp_y - out) * has
    return (g_logits, None, None, g_scores if needs[3] else None,
            g_weights if needs[4] else None, ng.reduce_to(g_tau, temperature, needs[5]),
            ng.reduce_to(g_lam, lam, needs[6]), None)


torch.library.register_autograd("knnfast::knn_gold_logprob", _backward,
                                setup_context=_setup_context)
