"""knn_kd_linear_loss: knn_kd_loss (or plain cross-entropy) of hidden @ weight.T + bias without
the [T, V] logits (wrapper, fake kernels, autograd).

C++: csrc/cpu/knn_kd_linear_loss_cpu.cpp, csrc/cuda/knn_kd_linear_loss{.cu,_cuda.cpp};
reference: knnfast.reference.knn_kd_linear_loss; tests: tests/test_knn_kd_linear_loss.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..defaults import OPS as DEFAULTS
from . import args
from .knn_kd_linear_rows import linear_kd_rows
from .knn_kd_loss import TEACHER_NAMES, reduce_rows
from .library import OPS

OP = "knn_kd_linear_loss"
STRATEGIES = ("auto", "rows", "vocab")


def knn_kd_linear_loss(hidden: Tensor, weight: Tensor, targets: Tensor,
                       teacher_tokens: Optional[Tensor] = None,
                       teacher_scores: Optional[Tensor] = None, *,
                       teacher_probs: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                       temperature: args.RowScalar = DEFAULTS.temperature,
                       ce_weight: float = 1.0, kd_weight: float = 1.0,
                       label_smoothing: float = 0.0, ignore_index: int = -100,
                       reduction: str = "mean", kd: str = "ce", chunk: int = 0,
                       strategy: str = "auto") -> Tensor:
    """knn_kd_loss(hidden @ weight.T + bias, targets, teacher_tokens, ...) without the [T, V]
    logits, by one of two strategies:

    "vocab": the vocabulary is processed in chunks of `chunk` columns (0: automatic, a tile
    of at most 2 Mi floats) with an online log-sum-exp, and backward recomputes each chunk
    and accumulates the gradients of hidden, weight and bias (4 GEMMs over [T, V, D]).
    "rows": the forward walks row chunks of `chunk` rows (0: automatic, a [rows, V] float32
    buffer of at most 32 MiB and a quarter of T x V), computing the loss and the gradients
    at once (3 GEMMs); backward only scales them. Needs reduction "mean" or "sum".
    "auto": "rows" when a gradient is wanted, reduction is "mean" / "sum" and chunk is 0
    (an explicit chunk keeps its older meaning, vocabulary columns); else "vocab". Without a teacher
    (teacher_tokens None) it is label-smoothed cross-entropy times ce_weight: with the
    defaults a drop-in for F.cross_entropy(F.linear(hidden, weight, bias), targets). Inputs
    may be float32 / float16 / bfloat16 (float32 accumulation); the loss is float32.
    """
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        args.check_tensor(OP, name, t)
    args.check_dim(OP, "hidden", hidden, 2)
    tokens, scores, probs = teacher_inputs(hidden, teacher_tokens, teacher_scores, teacher_probs)
    args.check_reduction(OP, reduction)
    args.check_choice(OP, "kd", kd, args.KD_FORMS)
    args.check_int(OP, "chunk", chunk, 0)
    tau = args.row_scalar(OP, "temperature", temperature, hidden.shape[0], hidden.device, True)
    weights = (ce_weight, kd_weight, label_smoothing, ignore_index)
    if pick_strategy(strategy, reduction, chunk, hidden, weight, bias) == "rows":
        check_linear_kd_meta(hidden, weight, bias, targets, tokens, scores, probs, tau)
        return linear_kd_rows(hidden, weight, bias, targets, tokens, scores, probs, tau,
                              *weights, kd == "kl", reduction, chunk)[0]
    rows, _ = OPS.knn_kd_linear_loss(hidden, weight, bias, targets, tokens, scores, probs, tau,
                                     float(ce_weight), float(kd_weight), float(label_smoothing),
                                     int(ignore_index), kd == "kl", chunk)
    return reduce_rows(rows, targets, ignore_index, reduction)


def pick_strategy(strategy: str, reduction: str, chunk: int, *params) -> str:
    """"rows" or "vocab" (see knn_kd_linear_loss); rows on request needs a scalar loss."""
    args.check_choice(OP, "strategy", strategy, STRATEGIES)
    scalar = reduction in ("mean", "sum")
    if strategy == "rows" and not scalar:
        args.fail(OP, f"strategy='rows' needs reduction 'mean' or 'sum', got {reduction!r}")
    if strategy != "auto":
        return strategy
    grad = torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)
    return "rows" if grad and scalar and chunk == 0 else "vocab"


def teacher_inputs(hidden: Tensor, tokens: Optional[Tensor], scores: Optional[Tensor],
                   probs: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The teacher as the op takes it; no teacher is k = 0 slots (plain cross-entropy)."""
    if tokens is None:
        if scores is not None or probs is not None:
            args.fail(OP, "teacher_scores / teacher_probs need teacher_tokens")
        T = hidden.shape[0]
        return (torch.empty((T, 0), dtype=torch.int64, device=hidden.device), None,
                torch.empty((T, 0), dtype=torch.float32, device=hidden.device))
    args.check_tensor(OP, "teacher_tokens", tokens)
    args.exactly_one(OP, "teacher_scores", scores, "teacher_probs", probs)
    return tokens, scores, probs


def check_linear_kd_meta(hidden, weight, bias, targets, tokens, scores, probs,
                         temperature) -> None:
    args.check_linear_meta(OP, hidden, weight, bias)
    args.check_same_device(OP, hidden, targets=targets, teacher_tokens=tokens,
                           teacher_scores=scores, teacher_probs=probs, temperature=temperature)
    args.check_targets_meta(OP, targets, hidden.shape[0])
    args.check_neighbour_meta(OP, hidden.shape[0], tokens, scores, probs, temperature,
                              names=TEACHER_NAMES)


@torch.library.register_fake("knnfast::knn_kd_linear_loss")
def _(hidden, weight, bias, targets, teacher_tokens, teacher_scores, teacher_probs, temperature,
      ce_weight, kd_weight, label_smoothing, ignore_index, kl, chunk=0):
    check_linear_kd_meta(hidden, weight, bias, targets, teacher_tokens, teacher_scores,
                         teacher_probs, temperature)
    T = hidden.shape[0]
    return (hidden.new_empty((T,), dtype=torch.float32),
            hidden.new_empty((T,), dtype=torch.float32))


@torch.library.register_fake("knnfast::knn_kd_linear_loss_backward")
def _(grad_rows, hidden, weight, bias, targets, teacher_tokens, teacher_scores, teacher_probs,
      temperature, lse, ce_weight, kd_weight, label_smoothing, ignore_index, chunk=0):
    check_linear_kd_meta(hidden, weight, bias, targets, teacher_tokens, teacher_scores,
                         teacher_probs, temperature)
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty((weight.shape[0],), dtype=bias_dtype))


# ----------------------------------------------------------------------------- autograd
# Saved: the inputs (autograd keeps them anyway) and the forward's per-row log-sum-exp [T],
# so backward is one pass over the chunks; nothing of size [T, V] is saved.


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, tokens, scores, probs, temperature, ce_w, kd_w, eps,
     ignore_index, _kl, chunk) = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.args = (ce_w, kd_w, eps, ignore_index, chunk)
    ctx.save_for_backward(hidden, weight, bias, targets, tokens, scores, probs, temperature,
                          output[1])


def _backward(ctx, grad_rows, _grad_lse):
    hidden, weight, bias, targets, tokens, scores, probs, temperature, lse = ctx.saved_tensors
    grad_h, grad_w, grad_b = OPS.knn_kd_linear_loss_backward(
        grad_rows.contiguous(), hidden, weight, bias, targets, tokens, scores, probs,
        temperature, lse, *ctx.args)
    need = ctx.needs_input_grad
    return ((grad_h if need[0] else None), (grad_w if need[1] else None),
            (grad_b if bias is not None and need[2] else None)) + (None,) * 11


torch.library.register_autograd("knnfast::knn_kd_linear_loss", _backward,
                                setup_context=_setup_context)
