"""softmax_stats: the entropy and the largest log-probabilities of softmax(logits) per row, in
one read of the logits and without a [B, V] temporary (what retrieval skipping decides from).
C++: csrc/cpu/softmax_stats_cpu.cpp, csrc/cuda/softmax_stats_cuda.cpp; reference:
knnfast.reference.softmax_stats; tests: tests/test_softmax_stats.py.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..defaults import MAX_K
from . import args
from .library import OPS

#: Kernel plans per device type: CPU "fused" (auto: one pass per statistic over each row, no
#: [B, V] temporary) or "aten" (log-softmax and topk in ATen ops: the code CUDA runs); CUDA has
#: only "aten".
PLANS = {"cpu": ("auto", "fused", "aten"), "cuda": ("auto", "aten")}


def softmax_stats(logits: Tensor, top: int = 1, *, entropy: bool = True,
                  plan: str = "auto") -> Tuple[Tensor, Tensor]:
    """(entropy [B], top_logp [B, top]), float32, of p = softmax(logits [B, V]).

    entropy = -sum_v p_v log p_v (masked -inf logits add 0); top_logp = the ``top`` largest
    log p_v, descending (``exp(top_logp[:, 0])`` is the largest probability). A row of only
    -inf gives (0, -inf); NaN or +inf in a row is a ValueError. ``top`` in [1, min(V, MAX_K)].
    ``entropy=False`` skips the entropy's pass over the logits (the first output is then an
    empty [0] tensor): what a max-probability test needs. Not differentiable: it reads
    ``logits.detach()``. ``plan``: kernel variant (``PLANS``), the same result either way.

        entropy, top = knnfast.softmax_stats(logits, top=4)
    """
    op = "softmax_stats"
    args.check_tensor(op, "logits", logits)
    args.check_int(op, "top", top, 1, MAX_K)
    args.check_bool(op, "entropy", entropy)
    args.check_choice(op, "plan", plan, PLANS.get(logits.device.type, ("auto",)))
    return OPS.softmax_stats(logits.detach(), top, entropy, plan)


@torch.library.register_fake("knnfast::softmax_stats")
def _(logits, top, entropy=True, plan="auto"):
    op = "softmax_stats"
    args.check_logits_input(op, logits)
    most = min(logits.shape[1], MAX_K)
    args.need(1 <= top <= most, op, lambda: f"top must be an int in [1, {most}], got {top}")
    rows = logits.shape[0]
    return (logits.new_empty((rows if entropy else 0,), dtype=torch.float32),
            logits.new_empty((rows, top), dtype=torch.float32))
