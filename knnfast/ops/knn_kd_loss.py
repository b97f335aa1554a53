"""knn_kd_loss: kNN-KD loss without a dense teacher, its backward op and the in-place gradient
op knn_kd_loss_grad_ (wrapper, fake kernels, autograd).

C++: csrc/cpu/knn_kd_loss_cpu.cpp, csrc/cuda/knn_kd_loss{.cu,_cuda.cpp};
reference: knnfast.reference.knn_kd_loss; tests: tests/test_knn_kd_loss.py.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..defaults import OPS as DEFAULTS
from . import args
from .library import OPS

TEACHER_NAMES = ("teacher_tokens", "teacher_scores", "teacher_probs")


def knn_kd_loss(logits: Tensor, targets: Tensor, teacher_tokens: Tensor,
                teacher_scores: Optional[Tensor] = None, *,
                teacher_probs: Optional[Tensor] = None,
                temperature: args.RowScalar = DEFAULTS.temperature, ce_weight: float = 1.0,
                kd_weight: float = 1.0, label_smoothing: float = 0.0, ignore_index: int = -100,
                reduction: str = "mean", kd: str = "ce") -> Tensor:
    """kNN-KD loss without a dense teacher: ce_weight * CE_ls(logits, y) + kd_weight * KD.

    KD = H(p_T, softmax(logits)) (kd="ce") or KL(p_T || softmax(logits)) (kd="kl"), with the
    teacher p_T = M . softmax(teacher_scores / temperature) over the k stored neighbours
    (token -1 = padding) or M . teacher_probs. The paper's (1 - a) CE + a KD is
    ce_weight=1-a, kd_weight=a; the released code's LS-CE(0.1) + rate * KL is
    label_smoothing=0.1, kd="kl", kd_weight=rate. Rows with targets == ignore_index give 0
    and are not counted by "mean". Forward reads the logits once; backward writes
    softmax - target mix directly. Gradients reach logits only.
    """
    op = "knn_kd_loss"
    for name, t in (("logits", logits), ("targets", targets), ("teacher_tokens", teacher_tokens)):
        args.check_tensor(op, name, t)
    args.exactly_one(op, "teacher_scores", teacher_scores, "teacher_probs", teacher_probs)
    args.check_reduction(op, reduction)
    args.check_choice(op, "kd", kd, args.KD_FORMS)
    tau = args.row_scalar(op, "temperature", temperature, logits.shape[0], logits.device, True)
    rows = OPS.knn_kd_loss(logits, targets, teacher_tokens, teacher_scores, teacher_probs, tau,
                           float(ce_weight), float(kd_weight), float(label_smoothing),
                           int(ignore_index), kd == "kl")
    return reduce_rows(rows, targets, ignore_index, reduction)


def reduce_rows(rows: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Per-row losses -> "none" / "sum" / "mean" over the rows whose target is not ignored."""
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    count = (targets != ignore_index).sum().clamp(min=1)
    return rows.sum() / count.to(rows.dtype)


def check_kd_meta(logits, targets, tokens, scores, probs, temperature) -> None:
    op = "knn_kd_loss"
    args.check_logits_input(op, logits)
    args.check_same_device(op, logits, targets=targets, teacher_tokens=tokens,
                           teacher_scores=scores, teacher_probs=probs, temperature=temperature)
    args.check_targets_meta(op, targets, logits.shape[0])
    args.check_neighbour_meta(op, logits.shape[0], tokens, scores, probs, temperature,
                              names=TEACHER_NAMES)


@torch.library.register_fake("knnfast::knn_kd_loss")
def _(logits, targets, teacher_tokens, teacher_scores, teacher_probs, temperature, ce_weight,
      kd_weight, label_smoothing, ignore_index, kl):
    check_kd_meta(logits, targets, teacher_tokens, teacher_scores, teacher_probs, temperature)
    return logits.new_empty((logits.shape[0],), dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_kd_loss_backward")
def _(grad_rows, logits, targets, teacher_tokens, teacher_scores, teacher_probs, temperature,
      ce_weight, kd_weight, label_smoothing, ignore_index):
    check_kd_meta(logits, targets, teacher_tokens, teacher_scores, teacher_probs, temperature)
    return logits.new_empty(logits.shape, dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_kd_loss_grad_")
def _(logits, grad_rows, targets, teacher_tokens, teacher_scores, teacher_probs, temperature,
      ce_weight, kd_weight, label_smoothing, ignore_index):
    check_kd_meta(logits, targets, teacher_tokens, teacher_scores, teacher_probs, temperature)
    return None


# ----------------------------------------------------------------------------- autograd
# The backward kernel recomputes the row softmax from the logits (which autograd keeps
# anyway as an input) and the sparse teacher; nothing of size [B, V] is saved.


def _setup_context(ctx, inputs, output):
    (logits, targets, tokens, scores, probs, temperature, ce_w, kd_w, eps, ignore_index,
     _kl) = inputs
    ctx.args = (ce_w, kd_w, eps, ignore_index)
    ctx.save_for_backward(logits, targets, tokens, scores, probs, temperature)


def _backward(ctx, grad_rows):
    logits, targets, tokens, scores, probs, temperature = ctx.saved_tensors
    grad = OPS.knn_kd_loss_backward(grad_rows.contiguous(), logits, targets, tokens, scores,
                                    probs, temperature, *ctx.args)
    return (grad.to(logits.dtype),) + (None,) * 10


torch.library.register_autograd("knnfast::knn_kd_loss", _backward, setup_context=_setup_context)
