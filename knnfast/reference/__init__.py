"""Pure-PyTorch twin of every knnfast op (``knnfast/API.md``).

This package serves two purposes:

* **Test oracle.** Every function here has the same name, signature and
  documented semantics as the fused op in :mod:`knnfast.ops`, and accepts exactly
  the calls the op accepts (the same rules, from :mod:`knnfast.ops.args`; a test
  feeds both one table of accepted and rejected arguments). The parity tests in
  ``tests/`` compare the C++/CUDA kernels against these functions.
* **Benchmark baseline.** The benchmarks time these functions next to the fused
  kernels, so they are written the way a competent PyTorch user would write
  them, not as a strawman: ``knn_search`` streams the keys in tiles (a matmul
  per tile + ``torch.topk`` + a merge into a running top-k, never a B x N
  matrix); the probability ops are vectorised ``scatter_add_`` / ``logaddexp``
  code in the style of knn-transformers; duplicate merging and label counts use
  a per-row stable sort (O(k log k), no k x k matrices).

Modules: ``search`` (knn_search, knn_rescore), ``probs`` (knn_probs,
knn_probs_sparse, knn_interpolate, knn_gold_logprob, label_counts, softmax_stats), ``losses``
(knn_kd_loss, ink_loss), ``common`` (shared math).

Conventions (DESIGN.md section 2): scores, not distances (larger = closer):
``l2``: s = -||q - k||^2, ``ip``: s = q.k,
``cos``: s = q.k / (max(||q||, 1e-8) * max(||k||, 1e-8)). Accumulation is
float32 (half/bfloat16 keys and queries are upcast tile by tile). Invalid
neighbour slots carry token id -1 and score -inf and get weight 0.

Choices where the contract is silent (the kernels match them):

* ``knn_search``: a slot whose score is -inf carries index -1 (padding when
  fewer than k entries remain after ``exclude`` / NaN keys). NaN scores (NaN
  keys) are treated as -inf, so NaN keys are never returned.
* ``key_sq_norms`` replaces ||k||^2 for ``l2`` and ||k|| = sqrt(key_sq_norms)
  for ``cos``; it is ignored for ``ip``.
* A neighbour slot is valid iff its token id is not -1; a valid slot with
  score -inf simply gets weight 0 (so a row whose valid slots are all -inf is
  treated as having no valid neighbour).
"""
from ..ops import __all__ as ops_all
from .common import COS_EPS
from .losses import ink_loss, knn_kd_linear_loss, knn_kd_loss
from .probs import knn_gold_logprob, knn_interpolate, knn_probs, knn_probs_sparse, label_counts
from .probs import softmax_stats
from .search import KEY_TILE, knn_rescore, knn_search, knn_search_lists

# the ops' names (knnfast.ops.__all__ less build_info) plus ink_loss, whose fused twin is a
# method (knnfast.methods.ink), not an op
__all__ = [name for name in ops_all if name != "build_info"] + ["ink_loss"]
