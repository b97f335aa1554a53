"""kNN-LM evaluation (base / kNN / oracle perplexity in one pass) and λ/τ/k tuning from one
retrieval pass over a dev set."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ... import ops
from ...methods.decoding import KNNDecoder, Neighbours, gold_two_column
from ...storage import Datastore
from .capture import Example, HiddenSpec, target_length, teacher_forced


# --------------------------------------------------------------------------- (b) kNN-LM eval


@dataclass
class LMEvalResult:
    """Perplexities over ``tokens`` target positions (one forward pass per batch).

    ``oracle_ppl`` is Xu et al.'s oracle: per token the better of the base model and the pure
    kNN distribution, max(p_LM(y), p_kNN(y)). ``best_of_ppl`` is a different quantity: per
    token the better of the base model and the interpolated kNN-LM. With
    ``return_tokens=True``, ``per_token`` holds the per-position log-probs ([tokens] float32
    each, in the order of ``examples`` and their target positions): "base", "knn" (pure
    kNN, λ = 1; -inf where no neighbour has the gold token), "interpolated", "example"
    (index into ``examples``) and "position" (target position within the example)."""
    tokens: int
    base_ppl: float
    knn_ppl: float
    oracle_ppl: float
    seconds: float
    best_of_ppl: float = float("nan")
    per_token: Optional[dict] = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def evaluate_lm(model: nn.Module, examples: Sequence[Example], decoder: KNNDecoder, *,
                hidden: HiddenSpec = "ffn", batch_size: int = 8, return_tokens: bool = False,
                progress: bool = True) -> LMEvalResult:
    """Perplexity of the base model, of kNN-LM (decoder's k, τ, λ), of Xu et al.'s oracle
    (per token max(p_LM, p_kNN), p_kNN the pure kNN distribution) and of the per-token best of
    base and kNN-LM, in one forward pass per batch. Causal LMs and encoder-decoders (target
    side). The decoder's backend ("fused" or "reference") runs the kNN part."""
    from tqdm.auto import tqdm
    parts = {name: [] for name in ("base", "knn", "interpolated")}
    t0 = time.perf_counter()
    bar = tqdm(total=len(examples), desc="eval", unit="ex", disable=not progress, leave=False)
    for tf in teacher_forced(model, examples, hidden=hidden, batch_size=batch_size):
        nbrs = decoder.retrieve(tf.hidden)
        parts["interpolated"].append(decoder.gold_logprob(tf.logits, tf.targets, nbrs).cpu())
        parts["knn"].append(decoder.gold_logprob(tf.logits, tf.targets, nbrs, lam=1.0).cpu())
        parts["base"].append(base_gold_logprob(tf.logits, tf.targets, decoder.backend).cpu())
        bar.update(tf.examples)
    bar.close()
    secs = time.perf_counter() - t0
    lp = {name: torch.cat(v) if v else torch.zeros(0) for name, v in parts.items()}
    n = lp["base"].numel()
    ppl = lambda logp: math.exp(-float(logp.double().sum()) / max(n, 1))  # noqa: E731
    result = LMEvalResult(n, ppl(lp["base"]), ppl(lp["interpolated"]),
                          ppl(torch.maximum(lp["base"], lp["knn"])), secs,
                          best_of_ppl=ppl(torch.maximum(lp["base"], lp["interpolated"])))
    if return_tokens:
        result.per_token = dict(lp, **token_positions(examples))
    return result


def token_positions(examples: Sequence[Example]) -> dict:
    """(example index, target position) of every target position, in teacher_forced order."""
    lengths = [target_length(e) for e in examples]
    example = torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(lengths))
    position = torch.cat([torch.arange(n) for n in lengths]) if lengths else torch.zeros(0)
    return {"example": example, "position": position.long()}


def base_gold_logprob(logits: Tensor, targets: Tensor, backend: str = "fused") -> Tensor:
    """log softmax(logits)[target] per row, [B] float32 ("fused": one knn_gold_logprob
    with no neighbours and λ = 0, on the logits' device)."""
    if backend == "fused":
        empty = torch.full((logits.shape[0], 1), -1, dtype=torch.long, device=logits.device)
        return ops.knn_gold_logprob(logits, targets, empty,
                                    weights=torch.zeros(empty.shape, device=logits.device), lam=0.0)
    return torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)


# --------------------------------------------------------------------------- (d) tuning


@dataclass
class GoldFeatures:
    """One retrieval pass over a dev set: what λ/τ/k tuning and the adaptive network need."""
    base_gold_logp: Tensor   # [T] log p_model(y_t)
    targets: Tensor          # [T]
    neighbours: Neighbours   # K neighbours of each position


def collect_gold_features(model: nn.Module, examples: Sequence[Example], decoder: KNNDecoder,
                          k: Optional[int] = None, *, hidden: HiddenSpec = "ffn",
                          batch_size: int = 16, progress: bool = True) -> GoldFeatures:
    """Teacher-forced pass + one search with k (default decoder.k) neighbours per position."""
    from tqdm.auto import tqdm
    base, targets, scores, tokens, ids = [], [], [], [], []
    bar = tqdm(total=len(examples), desc="dev retrieval", unit="ex", disable=not progress,
               leave=False)
    for tf in teacher_forced(model, examples, hidden=hidden, batch_size=batch_size):
        nb = decoder.retrieve(tf.hidden, k or decoder.k)
        base.append(base_gold_logprob(tf.logits, tf.targets).cpu())
        targets.append(tf.targets.cpu())
        scores.append(nb.scores.cpu())
        tokens.append(nb.tokens.cpu())
        ids.append(nb.ids.cpu())
        bar.update(tf.examples)
    bar.close()
    return GoldFeatures(torch.cat(base), torch.cat(targets),
                        Neighbours(torch.cat(scores), torch.cat(tokens), torch.cat(ids)))


@dataclass
class TuneResult:
    best: dict                       # {"k", "temperature", "lam", "nll", "ppl"}
    base_nll: float
    grid: List[dict] = field(default_factory=list)


#: The default λ/τ/k grid of ``tune``.
TUNE_KS = (4, 8, 16, 32)
TUNE_TEMPERATURES = (1.0, 10.0, 100.0)
TUNE_LAMS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def tune_from_features(feats: GoldFeatures, ks: Sequence[int] = TUNE_KS,
                       temperatures: Sequence[float] = TUNE_TEMPERATURES,
                       lams: Sequence[float] = TUNE_LAMS) -> TuneResult:
    """Grid over (k, τ, λ) of the mean gold NLL, each cell one fused knn_gold_logprob over
    all T positions (2-column form, see ``gold_two_column``)."""
    K = feats.neighbours.scores.shape[1]
    if max(ks) > K:
        raise ValueError(f"ks go up to {max(ks)} but only {K} neighbours were retrieved")
    logits2, tokens2 = gold_two_column(feats.base_gold_logp, feats.neighbours.tokens, feats.targets)
    zeros = torch.zeros_like(feats.targets)
    base_nll = float(-feats.base_gold_logp.mean())
    grid = []
    for k in ks:
        sc, tk = feats.neighbours.scores[:, :k].contiguous(), tokens2[:, :k].contiguous()
        for tau in temperatures:
            for lam in lams:
                nll = float(-ops.knn_gold_logprob(logits2, zeros, tk, scores=sc,
                                                  temperature=float(tau), lam=float(lam)).mean())
                grid.append({"k": int(k), "temperature": float(tau), "lam": float(lam),
                             "nll": nll, "ppl": math.exp(nll)})
    best = min(grid, key=lambda g: g["nll"])
    return TuneResult(best, base_nll, grid)


def tune(model: nn.Module, examples: Sequence[Example], datastore: Datastore, *,
         ks: Sequence[int] = TUNE_KS, temperatures: Sequence[float] = TUNE_TEMPERATURES,
         lams: Sequence[float] = TUNE_LAMS,
         hidden: HiddenSpec = "ffn", batch_size: int = 16, exact: Optional[bool] = None,
         progress: bool = True) -> TuneResult:
    """λ/τ/k tuning on a dev set from one retrieval with max(ks) neighbours."""
    dec = KNNDecoder(datastore, k=max(ks), exact=exact)
    feats = collect_gold_features(model, examples, dec, hidden=hidden, batch_size=batch_size,
                                  progress=progress)
    return tune_from_features(feats, ks, temperatures, lams)
