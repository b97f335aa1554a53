"""The kernels layer: one module per op, each holding the op's Python wrapper, its fake
kernel (metadata checks for torch.compile / meta tensors) and its autograd, side by side.

    knnfast/ops/<op>.py        wrapper + fake kernel + autograd (ARCHITECTURE.md lists all seven
                               places an op lives)
    knnfast/ops/args.py        the Python-side argument rules, shared with knnfast.reference
    knnfast/ops/library.py     loads knnfast/_C*.so; build_info()
    knnfast/ops/settings.py    process-wide settings (KNNFAST_* environment), CUDA check modes

Every op is registered as ``torch.ops.knnfast.<op>``; C++ checks every argument on the data,
so the wrappers only check what C++ cannot see (Python scalar types, float -> tensor).
"""
from . import library
from . import settings  # reads the KNNFAST_* environment, once, at import
from .library import build_info
from .settings import check_cuda_errors, deferred_checks
from .knn_search import knn_search
from .knn_rescore import knn_rescore
from .knn_search_lists import (ListsBf16, ListsInt8, knn_search_lists, pack_lists_bf16,
                               pack_lists_int8)
from .knn_probs import knn_probs, knn_probs_sparse
from .knn_interpolate import knn_interpolate
from .knn_gold_logprob import knn_gold_logprob
from .label_counts import label_counts
from .softmax_stats import softmax_stats
from .knn_kd_loss import knn_kd_loss
from .knn_kd_linear_loss import knn_kd_linear_loss

__all__ = [
    "build_info",
    "check_cuda_errors",
    "deferred_checks",
    "knn_search",
    "knn_rescore",
    "knn_search_lists",
    "pack_lists_bf16",
    "ListsBf16",
    "pack_lists_int8",
    "ListsInt8",
    "knn_probs",
    "knn_probs_sparse",
    "knn_interpolate",
    "knn_gold_logprob",
    "label_counts",
    "softmax_stats",
    "knn_kd_loss",
    "knn_kd_linear_loss",
]
