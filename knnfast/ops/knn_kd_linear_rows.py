"""knn_kd_linear_loss's row strategy (Liger-Kernel style): the loss AND its gradients are
computed in the forward, over row chunks of hidden, from existing ops; backward only scales
the saved gradients by grad_output.

Why: the vocabulary strategy (the registered op) recomputes every logits tile in backward:
4 [T, V, D] GEMMs where F.linear + knn_kd_loss runs 3. Here each row chunk's logits buffer
[rows, V] (float32) is built once, turned into d(loss)/d(logits) in place by
knn_kd_loss_grad_, and consumed by the two gradient GEMMs: 3 GEMMs, no [T, V] tensor. It
applies only when the gradient of a scalar (reduction "mean" / "sum") is wanted: the
per-row weights of the reduction are known in the forward. The price: the gradients exist
from the forward on (they would exist after backward anyway). The registered op keeps the
vocabulary strategy, so its schema / fake kernel / opcheck are unchanged; this is a
torch.autograd.Function the Python wrapper calls.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .knn_kd_loss import reduce_rows
from .library import OPS

#: the row chunk's float32 logits buffer [rows, V] holds at most this many bytes ...
ROW_BUFFER_BYTES = 32 << 20
#: ... and at most this fraction of one [T, V] tensor, so it never is one (small T).
ROW_BUFFER_SHARE = 4


def row_chunk(T: int, V: int, chunk: int = 0) -> int:
    """Rows per chunk: `chunk` when given (> 0), else the most rows whose [rows, V] float32
    buffer fits ROW_BUFFER_BYTES and a 1/ROW_BUFFER_SHARE of T x V; at least 1, at most T."""
    if chunk > 0:
        return min(chunk, T)
    by_bytes = ROW_BUFFER_BYTES // (4 * V)
    by_share = T // ROW_BUFFER_SHARE
    return max(1, min(T, by_bytes, by_share))


def _row_weights(targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """d(reduced loss)/d(row loss): 1 ("sum") or 1 / counted rows ("mean"); 0 when ignored."""
    live = (targets != ignore_index).to(torch.float32)
    if reduction == "sum":
        return live
    return live / live.sum().clamp(min=1)


def _rows_of(t: Optional[Tensor], s: int, e: int) -> Optional[Tensor]:
    return None if t is None else t[s:e]


class RowChunkedLinearKD(torch.autograd.Function):
    """(reduced loss, lse [T] or None) of knn_kd_loss(hidden @ weight.T + bias, ...); see the
    module docstring. The gradients are float32 accumulators, cast to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, tokens, scores, probs, tau, ce_w, kd_w,
                eps, ignore_index, kl, reduction, rows, want_lse):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T, D = hidden.shape
        w32 = weight.float()          # a float32 copy only for float16 / bfloat16 weights
        b32 = None if bias is None else bias.float()
        grad_rows = _row_weights(targets, ignore_index, reduction)
        loss_rows = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(loss_rows) if want_lse else None
        g_h = torch.empty(T, D, dtype=torch.float32, device=hidden.device) if need_h else None
        g_w = torch.zeros_like(w32) if need_w else None
        g_b = torch.zeros_like(b32) if need_b and b32 is not None else None
        row_args = (ce_w, kd_w, eps, ignore_index)
        # one buffer for every chunk: a fresh ~32 MiB block per chunk fragments the heap
        # (measured: resident memory grew by ~3 buffers, not 1)
        whole = torch.empty(rows, w32.shape[0], dtype=torch.float32, device=hidden.device)
        for s in range(0, T, rows):
            e = min(T, s + rows)
            h = hidden[s:e].float()
            buf = whole[:e - s]
            if b32 is None:
                torch.mm(h, w32.t(), out=buf)
            else:
                torch.addmm(b32, h, w32.t(), out=buf)
            teacher = (targets[s:e], tokens[s:e], _rows_of(scores, s, e), _rows_of(probs, s, e),
                       tau if tau.numel() == 1 else tau[s:e])
            loss_rows[s:e] = OPS.knn_kd_loss(buf, *teacher, *row_args, kl)
            if want_lse:
                torch.logsumexp(buf, dim=1, out=lse[s:e])
            OPS.knn_kd_loss_grad_(buf, grad_rows[s:e], *teacher, *row_args)  # buf = dL/dlogits
            if need_h:
                torch.mm(buf, w32, out=g_h[s:e])
            if need_w:
                g_w.addmm_(buf.t(), h)
            if g_b is not None:
                g_b += buf.sum(0)
        ctx.save_for_backward(_cast(g_h, hidden), _cast(g_w, weight), _cast(g_b, bias))
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return reduce_rows(loss_rows, targets, ignore_index, reduction), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_lse):
        # grad_loss == 1 (loss.backward()): the saved gradients as they are, no copy; saved
        # with save_for_backward, they are released right after this call, so AccumulateGrad
        # takes them over. Else (a scaled loss) a scaled copy: never in place, so a retained
        # graph can run backward again. The check reads one scalar (a sync on CUDA).
        grads = ctx.saved_tensors
        if not bool(grad_loss == 1):
            grads = tuple(None if g is None else g * grad_loss.to(g.dtype) for g in grads)
        return tuple(grads) + (None,) * 13


def _cast(grad: Optional[Tensor], like: Optional[Tensor]) -> Optional[Tensor]:
    return None if grad is None else grad.to(like.dtype)


def linear_kd_rows(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                   tokens: Tensor, scores: Optional[Tensor], probs: Optional[Tensor],
                   tau: Tensor, ce_w: float, kd_w: float, eps: float, ignore_index: int,
                   kl: bool, reduction: str, chunk: int = 0,
                   want_lse: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """The row strategy on checked op arguments (reduction "mean" or "sum"): (loss, lse [T]
    without gradient, or None)."""
    rows = row_chunk(hidden.shape[0], weight.shape[0], chunk)
    return RowChunkedLinearKD.apply(hidden, weight, bias, targets, tokens, scores, probs, tau,
                                    float(ce_w), float(kd_w), float(eps), int(ignore_index),
                                    bool(kl), reduction, rows, want_lse)
