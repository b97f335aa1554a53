"""Every limit and default value of knnfast, defined once (C++ mirrors the limits in
csrc/common/limits.h; a test checks that the two agree).

Defaults come in presets because the methods differ in what works: kNN-MT decodes with a few
neighbours, a high temperature and a large λ (Khandelwal et al. 2021: k = 8, τ = 10); kNN-LM
evaluates with many neighbours, τ = 1 and λ = 0.25 (Khandelwal et al. 2020). The ops
themselves default to τ = 1 and λ = 0.5 (no method assumed).
"""
from __future__ import annotations

from dataclasses import dataclass

#: Largest k any op accepts (neighbours per row).
MAX_K = 2048
#: Score functions: "l2" = -|q - k|^2, "ip" = q.k, "cos" = cosine similarity.
METRICS = ("l2", "ip", "cos")
#: Loss reductions of the kNN-KD / INK losses.
REDUCTIONS = ("none", "sum", "mean")


@dataclass(frozen=True)
class KNNDefaults:
    """Default neighbours per step, temperature and interpolation weight of one method."""
    k: int
    temperature: float
    lam: float


#: The ops' own defaults (knn_interpolate, knn_gold_logprob, knn_probs): no method assumed.
OPS = KNNDefaults(k=8, temperature=1.0, lam=0.5)
#: kNN-MT decoding (KNNDecoder, translate, the demo before tuning).
KNN_MT = KNNDefaults(k=8, temperature=10.0, lam=0.7)
#: kNN-LM evaluation (eval-ppl, evaluate_lm).
KNN_LM = KNNDefaults(k=1024, temperature=1.0, lam=0.25)
#: The analyses of Xu et al. (knnfast.methods.analysis, ``knnfast analyze``): kNN-LM's τ and λ
#: (they analyse kNN-LM), with few neighbours per position (k = 8), as they always defaulted.
ANALYSIS = KNNDefaults(k=8, temperature=KNN_LM.temperature, lam=KNN_LM.lam)
