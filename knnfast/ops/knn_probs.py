"""knn_probs (dense P_kNN) and knn_probs_sparse (P_kNN in the k slots): wrappers + fake
kernels. C++: csrc/cpu/knn_probs_cpu.cpp, csrc/cuda/knn_probs{.cu,_cuda.cpp};
reference: knnfast.reference.knn_probs / knn_probs_sparse; tests: tests/test_knn_probs.py.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..defaults import OPS as DEFAULTS
from . import args
from .library import OPS


def knn_probs(scores: Tensor, tokens: Tensor, vocab_size: int,
              temperature: args.RowScalar = DEFAULTS.temperature) -> Tensor:
    """Dense P_kNN [B, V] = M . softmax(scores / temperature) (rows without a valid
    neighbour are all zeros)."""
    op = "knn_probs"
    args.check_tensor(op, "scores", scores)
    args.check_tensor(op, "tokens", tokens)
    args.check_int(op, "vocab_size", vocab_size, 1)
    tau = args.row_scalar(op, "temperature", temperature, scores.shape[0], scores.device, True)
    return OPS.knn_probs(scores, tokens, vocab_size, tau)


def knn_probs_sparse(scores: Tensor, tokens: Tensor,
                     temperature: args.RowScalar = DEFAULTS.temperature) -> Tuple[Tensor, Tensor]:
    """P_kNN in k slots: (tokens_u [B, k] int64, probs [B, k] float32). Duplicate tokens are
    merged into their first occurrence; the later slots become (-1, 0)."""
    op = "knn_probs_sparse"
    args.check_tensor(op, "scores", scores)
    args.check_tensor(op, "tokens", tokens)
    tau = args.row_scalar(op, "temperature", temperature, scores.shape[0], scores.device, True)
    return OPS.knn_probs_sparse(scores, tokens, tau)


def check_probs_meta(op: str, scores: Tensor, tokens: Tensor, temperature: Tensor) -> None:
    args.check_dim(op, "scores", scores, 2)
    args.check_same_device(op, scores, tokens=tokens, temperature=temperature)
    args.check_neighbour_meta(op, scores.shape[0], tokens, scores, None, temperature)


@torch.library.register_fake("knnfast::knn_probs")
def _(scores, tokens, vocab_size, temperature):
    check_probs_meta("knn_probs", scores, tokens, temperature)
    args.need(vocab_size > 0, "knn_probs", lambda: f"vocab_size must be > 0, got {vocab_size}")
    return scores.new_empty((scores.shape[0], vocab_size), dtype=torch.float32)


@torch.library.register_fake("knnfast::knn_probs_sparse")
def _(scores, tokens, temperature):
    check_probs_meta("knn_probs_sparse", scores, tokens, temperature)
    return (tokens.new_empty(tokens.shape, dtype=torch.int64),
            scores.new_empty(scores.shape, dtype=torch.float32))
