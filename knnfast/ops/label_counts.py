"""label_counts: distinct valid tokens among the first j+1 neighbours (adaptive kNN-MT's
feature). C++: csrc/cpu/label_counts_cpu.cpp, csrc/cuda/label_counts{.cu,_cuda.cpp};
reference: knnfast.reference.label_counts; tests: tests/test_label_counts.py.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import args
from .library import OPS


def label_counts(tokens: Tensor) -> Tensor:
    """counts[b, j] = number of distinct valid (!= -1) tokens in tokens[b, :j+1] (int64);
    the adaptive kNN-MT feature. Token 0 counts like any other."""
    args.check_tensor("label_counts", "tokens", tokens)
    return OPS.label_counts(tokens)


@torch.library.register_fake("knnfast::label_counts")
def _(tokens):
    args.check_index_input("label_counts", "tokens", tokens)
    return tokens.new_empty(tokens.shape, dtype=torch.int64)
