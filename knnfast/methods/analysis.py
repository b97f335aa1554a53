"""Analysis tools of the source papers, on a model + datastore + evaluation corpus.

These are computations a user calls from Python (they return numbers, not files), so they
stay in the library; drawing them is the application's job (``knnfast.app.plots``, used by
``knnfast analyze``).

- ``frequency_buckets``: gold-token frequency buckets over the training targets.
- ``retrieval_by_frequency``: per bucket, the mean kNN accuracy (share of the k neighbours whose
  token is the gold token; INK Table 3) and the recall of the gold token in the top k
  (meta-optimizer paper).
- ``mask_score_grid``: perplexity under the four "mask / score" combinations of Xu et al.
  (exact or approximate neighbours x exact or approximate scores), plus the base model's.
- ``size_sweep``: kNN-LM perplexity against datastore size (seeded subsamples).

Oracle perplexity and λ/τ sweeps are ``knnfast.integrations.hf.evaluate_lm`` and ``tune``.
Defaults: k of the kNN-MT preset (a few neighbours), τ and λ of the kNN-LM preset.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..defaults import ANALYSIS
from ..integrations.hf import Example, HiddenSpec, collect_gold_features, evaluate_lm
from ..storage import Datastore
from .decoding import KNNDecoder


@dataclass
class Bucket:
    """Targets whose training frequency lies in [low, high)."""
    low: int
    high: Optional[int]
    positions: int = 0
    knn_accuracy: float = 0.0
    recall: float = 0.0

    @property
    def label(self) -> str:
        return f"[{self.low}, {self.high})" if self.high is not None else f">= {self.low}"


def target_counts(examples: Sequence[Example]) -> Counter:
    """How often each token is a target in ``examples`` (the datastore's values)."""
    counts: Counter = Counter()
    for e in examples:
        counts.update(e[1] if isinstance(e, tuple) else e[1:])
    return counts


def frequency_buckets(edges: Sequence[int] = (0, 10, 100, 1000)) -> List[Bucket]:
    """Buckets [e_i, e_{i+1}) and a last open one, from increasing edges."""
    edges = list(edges)
    if edges != sorted(set(edges)) or edges[0] < 0:
        raise ValueError(f"edges must be increasing and >= 0, got {edges}")
    return [Bucket(lo, hi) for lo, hi in zip(edges, edges[1:] + [None])]


def retrieval_by_frequency(model, examples: Sequence[Example], datastore: Datastore,
                           train_counts: Counter, k: int = ANALYSIS.k, *,
                           edges: Sequence[int] = (0, 10, 100, 1000),
                           hidden: HiddenSpec = "ffn", exact: Optional[bool] = None,
                           batch_size: int = 16, progress: bool = False) -> List[Bucket]:
    """Per frequency bucket of the gold token: mean kNN accuracy (share of the k neighbours
    carrying the gold token) and recall (the gold token is among them)."""
    feats = collect_gold_features(model, examples, KNNDecoder(datastore, k=k, exact=exact), k,
                                  hidden=hidden, batch_size=batch_size, progress=progress)
    tokens, gold = feats.neighbours.tokens, feats.targets
    hits = (tokens == gold[:, None]).float()
    accuracy = hits.sum(1) / k
    recall = hits.amax(1)
    freq = torch.tensor([train_counts.get(int(t), 0) for t in gold.tolist()])
    buckets = frequency_buckets(edges)
    for b in buckets:
        sel = (freq >= b.low) & (freq < b.high if b.high is not None else torch.ones_like(freq, dtype=torch.bool))
        b.positions = int(sel.sum())
        if b.positions:
            b.knn_accuracy = float(accuracy[sel].mean())
            b.recall = float(recall[sel].mean())
    return buckets


def mask_score_grid(model, examples: Sequence[Example], datastore: Datastore, *,
                    k: int = ANALYSIS.k, temperature: float = ANALYSIS.temperature,
                    lam: float = ANALYSIS.lam, hidden: HiddenSpec = "ffn",
                    batch_size: int = 16) -> Dict[str, float]:
    """kNN-LM perplexity for exact/approximate neighbours ("mask") x exact/approximate scores
    (Xu et al. §3); the datastore needs an index for the approximate parts."""
    out = {}
    for exact in (True, False):
        for rescore in (True, False):
            dec = KNNDecoder(datastore, k=k, temperature=temperature, lam=lam, exact=exact,
                             rescore=rescore)
            res = evaluate_lm(model, examples, dec, hidden=hidden, batch_size=batch_size,
                              progress=False)
            mask = "real mask" if exact else "approx mask"
            score = "real score" if rescore else "approx score"
            out[f"{mask}, {score}"] = res.knn_ppl
            out["base"] = res.base_ppl
    return out


def size_sweep(model, examples: Sequence[Example], datastore: Datastore,
               fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0), *, k: int = ANALYSIS.k,
               temperature: float = ANALYSIS.temperature, lam: float = ANALYSIS.lam, seed: int = 0,
               hidden: HiddenSpec = "ffn", batch_size: int = 16) -> List[Tuple[int, float]]:
    """(datastore size, kNN-LM perplexity) for seeded subsamples of the datastore."""
    points = []
    for frac in fractions:
        ds = datastore if frac >= 1.0 else datastore.subsample(frac, seed=seed, progress=False)
        dec = KNNDecoder(ds, k=k, temperature=temperature, lam=lam, exact=True)
        res = evaluate_lm(model, examples, dec, hidden=hidden, batch_size=batch_size,
                          progress=False)
        points.append((len(ds), res.knn_ppl))
    return points
