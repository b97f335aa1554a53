"""knnfast: fused kNN kernels for retrieval-augmented decoding (kNN-MT, kNN-LM) in PyTorch.

    import knnfast
    scores, ids = knnfast.knn_search(queries, keys, k=8)             # exact, fused top-k
    logp = knnfast.knn_interpolate(logits, values[ids], scores=scores,
                                   temperature=10.0, lam=0.25)      # log((1-λ)p_LM + λ p_kNN)

Every op is registered as ``torch.ops.knnfast.<op>`` (works with torch.compile and
torch.library.opcheck) and has a pure-PyTorch twin in ``knnfast.reference``.
"""
from ._version import __version__
from . import ops  # noqa: F401  (loads the library, registers fake kernels)
from .ops import (
    build_info,
    knn_gold_logprob,
    knn_interpolate,
    knn_probs,
    knn_probs_sparse,
    knn_rescore,
    knn_search,
    label_counts,
)

__all__ = [
    "__version__",
    "build_info",
    "knn_search",
    "knn_rescore",
    "knn_probs",
    "knn_probs_sparse",
    "knn_interpolate",
    "knn_gold_logprob",
    "label_counts",
]
