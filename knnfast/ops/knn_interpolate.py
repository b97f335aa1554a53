"""knn_interpolate: log((1 - lam) softmax(logits) + lam P_kNN) (wrapper, fake kernel, autograd).

C++: csrc/cpu/knn_interpolate_cpu.cpp, csrc/cuda/knn_interpolate{.cu,_cuda.cpp};
reference: knnfast.reference.knn_interpolate; tests: tests/test_knn_interpolate.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..defaults import OPS as DEFAULTS
from . import args
from . import neighbour_grads as ng
from .library import OPS

#: Kernel plans per device type. CUDA: "row_cache" keeps each logits row in shared memory
#: where it fits ("auto" does the same), "global" always re-reads it from global memory.
PLANS = {"cpu": ("auto",), "cuda": ("auto", "row_cache", "global")}


def knn_interpolate(logits: Tensor, tokens: Tensor, *, scores: Optional[Tensor] = None,
                    weights: Optional[Tensor] = None,
                    temperature: args.RowScalar = DEFAULTS.temperature,
                    lam: args.RowScalar = DEFAULTS.lam, out: Optional[Tensor] = None,
                    plan: str = "auto") -> Tensor:
    """log((1 - lam) softmax(logits) + lam P_kNN) as float32 [B, V].

    P_kNN = M . softmax(scores / temperature), or M . weights for given neighbour weights
    (adaptive methods). A row with no valid neighbour returns log_softmax(logits) (as if
    lam = 0); lam = 1 gives log P_kNN (-inf off the neighbours). NaN or +inf in a logits
    row raises ValueError. `out` (float32 [B, V], contiguous) is written in place and
    returned; it may be `logits` itself when logits are float32. `plan` picks a kernel
    variant (see PLANS); every plan gives the same result.

    Example:
        >>> logits = torch.randn(2, 10)
        >>> tokens = torch.tensor([[3, 3, 7], [1, -1, -1]])
        >>> scores = torch.tensor([[-1.0, -2.0, -4.0], [0.0, float("-inf"), float("-inf")]])
        >>> logp = knn_interpolate(logits, tokens, scores=scores, temperature=1.0, lam=0.5)
        >>> bool(torch.allclose(logp.exp().sum(1), torch.ones(2)))
        True
    """
    op = "knn_interpolate"
    args.check_tensor(op, "logits", logits)
    args.check_tensor(op, "tokens", tokens)
    args.exactly_one(op, "scores", scores, "weights", weights)
    args.check_choice(op, "plan", plan, PLANS.get(logits.device.type, ("auto",)))
    rows = logits.shape[0]
    tau = args.row_scalar(op, "temperature", temperature, rows, logits.device, True)
    lam_t = args.row_scalar(op, "lam", lam, rows, logits.device, False)
    if out is None:
        return OPS.knn_interpolate(logits, tokens, scores, weights, tau, lam_t, plan)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                       for t in (logits, scores, weights, temperature, lam)):
        args.fail(op, "out= is not differentiable; drop out= when gradients are needed")
    OPS.knn_interpolate.out(logits, tokens, scores, weights, tau, lam_t, plan, out=out)
    return out


def check_interpolate_meta(op: str, logits, tokens, scores, weights, temperature, lam) -> None:
    args.check_logits_input(op, logits)
    args.check_same_device(op, logits, tokens=tokens, scores=scores, weights=weights,
                           temperature=temperature, lam=lam)
    args.check_neighbour_meta(op, logits.shape[0], tokens, scores, weights, temperature)
    args.check_row_param(op, "lam", lam, logits.shape[0])


@torch.library.register_fake("knnfast::knn_interpolate")
def _(logits, tokens, scores, weights, temperature, lam, plan="auto"):
    check_interpolate_meta("knn_interpolate", logits, tokens, scores, weights, temperature, lam)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_interpolate.out")
def _(logits, tokens, scores, weights, temperature, lam, plan="auto", *, out):
    op = "knn_interpolate"
    check_interpolate_meta(op, logits, tokens, scores, weights, temperature, lam)
    args.check_same_device(op, logits, out=out)
    args.need(out.dtype == torch.float32 and out.shape == logits.shape and out.is_contiguous(),
              op, lambda: f"out must be a contiguous float32 tensor of shape "
                          f"{list(logits.shape)}, got {out.dtype} {list(out.shape)}")
    return None


# ----------------------------------------------------------------------------- autograd
# Saved: the [B] log-sum-exp of the logits and the logits / output at the k neighbour tokens
# ([B, k]); the [B, V] logits only when their gradient is needed, never the [B, V] output.


def _setup_context(ctx, inputs, output):
    logits, tokens, scores, weights, temperature, lam = inputs[:6]  # then plan, if passed
    ctx.n_inputs = len(inputs)
    idx = ng.as_int64(tokens.clamp(min=0))
    # (grad mode is off here; no alias ops such as detach() or a same-dtype .float(), which
    # return their input and fail opcheck's schema test)
    lf = logits if logits.dtype == torch.float32 else logits.float()
    lse = torch.logsumexp(lf, dim=1)
    logit_t = lf.gather(1, idx)
    out_t = output.gather(1, idx)
    kept_logits = logits if ctx.needs_input_grad[0] else None
    ctx.save_for_backward(kept_logits, tokens, scores, weights, temperature, lam, lse,
                          logit_t, out_t)


def _at_neighbours(base: Tensor, tokens: Tensor, values: Tensor) -> Tensor:
    """base with base[b, tokens[b, j]] = values[b, j] for every valid slot (duplicate slots
    carry equal values, so the write order does not matter)."""
    rows, slots = (tokens >= 0).nonzero(as_tuple=True)
    base[rows, tokens[rows, slots]] = values[rows, slots]
    return base


def _backward(ctx, grad):
    logits, tokens, scores, weights, temperature, lam, lse, logit_t, out_t = ctx.saved_tensors
    needs = ctx.needs_input_grad
    tokens = tokens.long()
    tau, lam_eff, has = ng.effective_lam(tokens, scores, weights, temperature, lam)
    g = grad.float()
    g_t = g.gather(1, tokens.clamp(min=0))
    logp_t = logit_t - lse[:, None]
    log_keep = torch.log1p(-lam_eff)[:, None]  # log(1 - lam)
    g_logits = g_lam = None
    if needs[0]:
        logp = logits.float() - lse[:, None]
        # d out_v / d logp_v = (1 - lam) p_v / P_v: exactly 1 off the neighbours, where
        # P_v = (1 - lam) p_v (0 where the model puts no mass: lam = 1 or a -inf logit)
        gr = g.masked_fill(torch.isneginf(logp) | (lam_eff >= 1)[:, None], 0.0)
        gr = _at_neighbours(gr, tokens, g_t * ng.finite_exp(log_keep + logp_t - out_t))
        g_logits = (gr - torch.exp(logp) * gr.sum(dim=1, keepdim=True)).to(logits.dtype)
    g_scores, g_weights, g_tau, g_lam_knn = ng.neighbour_grads(
        g_t, out_t, tokens, scores, weights, tau, lam_eff)
    if needs[5]:
        # sum_v g_v p_v / P_v, with p_v / P_v = 1 / (1 - lam) off the neighbours
        ratio = torch.exp(-log_keep).expand_as(g).clone()
        ratio = _at_neighbours(ratio, tokens, ng.finite_exp(logp_t - out_t))
        g_lam = g_lam_knn - (g * ratio).sum(dim=1) * has
    return (g_logits, None, g_scores if needs[2] else None, g_weights if needs[3] else None,
            ng.reduce_to(g_tau, temperature, needs[4]),
            ng.reduce_to(g_lam, lam, needs[5]))[:ctx.n_inputs] + (None,) * (ctx.n_inputs - 6)


torch.library.register_autograd("knnfast::knn_interpolate", _backward,
                                setup_context=_setup_context)
