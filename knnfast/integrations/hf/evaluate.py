"""kNN-LM evaluation (base / kNN / oracle perplexity in one pass) and λ/τ/k tuning from one
retrieval pass over a dev set; sliding-window evaluation (``sliding_windows`` + ``scored``)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ... import ops
from ...methods.decoding import KNNDecoder, Neighbours, count_weighted_scores, gold_two_column
from ...storage import Datastore
from .capture import Example, HiddenSpec, TeacherForcedBatch, target_length, teacher_forced


# --------------------------------------------------------------------------- (b) kNN-LM eval


def sliding_windows(ids: Sequence[int], window: int, stride: int):
    """Sliding-window evaluation of one token stream (Khandelwal et al.'s and Xu et al.'s
    protocol): windows of at most ``window`` tokens whose ends advance by ``stride``; the
    first window scores all its targets, every later one only its last ``stride``, so each
    target ids[1:] is scored exactly once, with at least ``window - stride`` tokens of
    context once the first window is past. Returns (examples, scored) for ``evaluate_lm`` /
    ``collect_gold_features`` / ``tune``; stride = window - 1 is plain chunking."""
    if not 1 <= stride < window:
        raise ValueError(f"sliding_windows: need 1 <= stride < window, got stride={stride}, "
                         f"window={window}")
    if len(ids) < 2:
        raise ValueError(f"sliding_windows: the stream needs >= 2 tokens, got {len(ids)}")
    ids = list(ids)
    end = min(window, len(ids))
    examples, scored = [ids[:end]], [end - 1]
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        examples.append(ids[max(0, new_end - window):new_end])
        scored.append(new_end - end)
        end = new_end
    return examples, scored


def check_scored(examples: Sequence[Example], scored: Optional[Sequence[int]]) -> None:
    """``scored[i]``: how many final target positions of example i count, 0..target_length."""
    if scored is None:
        return
    if len(scored) != len(examples):
        raise ValueError(f"scored has {len(scored)} entries for {len(examples)} examples")
    for i, (e, s) in enumerate(zip(examples, scored)):
        if not 0 <= int(s) <= target_length(e):
            raise ValueError(f"scored[{i}] = {s} is outside [0, {target_length(e)}] "
                             f"(the target positions of example {i})")


def scored_mask(examples: Sequence[Example], scored: Optional[Sequence[int]]) -> Tensor:
    """[positions] bool over every target position (teacher_forced order): True where it is
    among the last ``scored[i]`` of its example (all True when ``scored`` is None)."""
    lengths = [target_length(e) for e in examples]
    if scored is None:
        return torch.ones(sum(lengths), dtype=torch.bool)
    return torch.cat([torch.arange(n) >= n - int(s) for n, s in zip(lengths, scored)]
                     ) if lengths else torch.zeros(0, dtype=torch.bool)


def scored_batches(model: nn.Module, examples: Sequence[Example], scored, hidden: HiddenSpec,
                   batch_size: int):
    """teacher_forced batches (in example order) restricted to the scored positions, so that
    nothing is retrieved for context-only positions."""
    first = 0
    for tf in teacher_forced(model, examples, hidden=hidden, batch_size=batch_size):
        if scored is not None:
            keep = scored_mask(examples[first:first + tf.examples],
                               scored[first:first + tf.examples]).to(tf.targets.device)
            tf = TeacherForcedBatch(tf.hidden[keep], tf.logits[keep], tf.targets[keep],
                                    tf.examples)
        first += tf.examples
        if tf.targets.numel():      # a batch of context-only positions retrieves nothing
            yield tf


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


@torch.no_grad()  # evaluation: a trainable decoder (adaptive, robust) builds no graph
def evaluate_lm(model: nn.Module, examples: Sequence[Example], decoder: KNNDecoder, *,
                hidden: HiddenSpec = "ffn", batch_size: int = 8, return_tokens: bool = False,
                progress: bool = True, scored: Optional[Sequence[int]] = None) -> LMEvalResult:
    """Perplexity of the base model, of kNN-LM (decoder's k, τ, λ), of Xu et al.'s oracle
    (per token max(p_LM, p_kNN), p_kNN the pure kNN distribution) and of the per-token best of
    base and kNN-LM, in one forward pass per batch. Causal LMs and encoder-decoders (target
    side). The decoder's backend ("fused" or "reference") runs the kNN part. ``scored``
    (e.g. from ``sliding_windows``): per example, how many final target positions count;
    the others are context only (not retrieved, not in ``tokens``)."""
    from tqdm.auto import tqdm
    check_scored(examples, scored)
    parts = {name: [] for name in ("base", "knn", "interpolated")}
    t0 = time.perf_counter()
    bar = tqdm(total=len(examples), desc="eval", unit="ex", disable=not progress, leave=False)
    for tf in scored_batches(model, examples, scored, hidden, batch_size):
        nbrs = decoder.retrieve_step(tf.hidden, tf.logits)  # the decoder's skip rule applies
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
        keep = scored_mask(examples, scored)
        result.per_token = dict(lp, **{k: v[keep] for k, v in token_positions(examples).items()})
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
                          batch_size: int = 16, progress: bool = True,
                          scored: Optional[Sequence[int]] = None) -> GoldFeatures:
    """Teacher-forced pass + one search with k (default decoder.k) neighbours per position
    (only the scored ones, see ``evaluate_lm``)."""
    from tqdm.auto import tqdm
    check_scored(examples, scored)
    base, targets, scores, tokens, ids, counts = [], [], [], [], [], []
    bar = tqdm(total=len(examples), desc="dev retrieval", unit="ex", disable=not progress,
               leave=False)
    for tf in scored_batches(model, examples, scored, hidden, batch_size):
        nb = decoder.retrieve(tf.hidden, k or decoder.k)
        base.append(base_gold_logprob(tf.logits, tf.targets).cpu())
        targets.append(tf.targets.cpu())
        scores.append(nb.scores.cpu())
        tokens.append(nb.tokens.cpu())
        ids.append(nb.ids.cpu())
        if nb.log_counts is not None:       # a pruned datastore's merge counts
            counts.append(nb.log_counts.cpu())
        bar.update(tf.examples)
    bar.close()
    return GoldFeatures(torch.cat(base), torch.cat(targets),
                        Neighbours(torch.cat(scores), torch.cat(tokens), torch.cat(ids),
                                   torch.cat(counts) if counts else None))


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
    all T positions (2-column form, see ``gold_two_column``; a pruned datastore's merge
    counts weigh the neighbours as in decoding)."""
    K = feats.neighbours.scores.shape[1]
    if max(ks) > K:
        raise ValueError(f"ks go up to {max(ks)} but only {K} neighbours were retrieved")
    logits2, tokens2 = gold_two_column(feats.base_gold_logp, feats.neighbours.tokens, feats.targets)
    zeros = torch.zeros_like(feats.targets)
    base_nll = float(-feats.base_gold_logp.mean())
    grid = []
    nb = feats.neighbours
    for k in ks:
        tk = tokens2[:, :k].contiguous()
        for tau in temperatures:
            sc = count_weighted_scores(nb, float(tau))[:, :k].contiguous()
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
         progress: bool = True, scored: Optional[Sequence[int]] = None) -> TuneResult:
    """λ/τ/k tuning on a dev set from one retrieval with max(ks) neighbours (``scored``:
    see ``evaluate_lm``)."""
    dec = KNNDecoder(datastore, k=max(ks), exact=exact)
    feats = collect_gold_features(model, examples, dec, hidden=hidden, batch_size=batch_size,
                                  progress=progress, scored=scored)
    return tune_from_features(feats, ks, temperatures, lams)
