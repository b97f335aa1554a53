"""Robust kNN-MT (Jiang et al. 2022, "Towards Robust k-Nearest-Neighbor Machine Translation").

A confidence-aware combiner: per decoding step, small networks predict the interpolation
weight λ, a per-neighbour confidence c_j and a distance scale from

* log p_NMT(v_j | k_j): the model's probability of neighbour j's value given its own key
  (a per-entry constant ``entry_logp`` [N], computed once per datastore),
* log p_NMT(v_j | q): the model's probability of v_j at the current step,
* the model's top-8 log-probabilities at the current step,
* the squared-L2 distances d_j and the distinct-label counts of neighbours 1..j.

Formulas (the released combiner, DeepLearnXMU/Robust-knn-mt, ``distance_base``)::

    c_j = Linear(4, 1)(tanh(Linear(2, 4)([log p(v_j|k_j), log p(v_j|q)])))
    s   = Linear(2K + 8, 1)([top-8 log p(.|q), log p(v|k) (K), log p(v|q) (K)])
    (a, t) = Linear(hidden, 2)(tanh(Linear(2K, hidden)([d (K), label counts (K)])))
    λ   = softmax([a, s])[0] = sigmoid(a - s)
    p_kNN(v) = Σ_{j: v_j = v} softmax_j(-d_j · sigmoid(t) + c_j)
    p(v) = (1 - λ) p_NMT(v | q) + λ p_kNN(v)

Training (``fit``) on a dev set, gold-token objective -log p(y), with the paper's
perturbation at rate r = exp(-update / 1000) (per position, independently): with
probability r every neighbour key gets Gaussian noise N(0, σ²I), σ = 0.01; with probability
r, where the gold token is not among the neighbours, a pseudo-neighbour (query + noise, gold
token) is put in front and the last neighbour dropped; the list is re-sorted by distance.

Deviations from the released code, all stated:

* the perturbation is applied to the features, not to keys in memory: the noisy distance
  ||q - k - ε||² = d - 2σ√d·z + σ²χ²_D (z ~ N(0, 1)) is sampled exactly from d, so training
  needs only [T, K] inputs; log p(v_j | k_j + ε) is approximated by log p(v_j | k_j) and the
  pseudo-neighbour's by the model's gold log-prob at the query (σ = 0.01 moves them little);
* the loss is the gold-token NLL (no label smoothing over V), computed by the fused
  ``knn_gold_logprob`` in its two-column form (``gold_two_column``);
* label counts are ``knnfast.label_counts`` (distinct labels among neighbours 1..j), the
  adaptive kNN-MT feature; log-prob features are floored at -50 and distance features
  capped at 1e4 so padded neighbours and -inf scores stay finite;
* ``entry_logp`` for HF models is the model's own gold log-prob at each datastore entry's
  training position (``entry_logprobs``): for "ffn" keys that is exactly p(v_i | k_i).

HF path::

    ds = hf.build_datastore(model, train_examples, "ds/")
    dec = RobustKNNDecoder(ds, k=8, entry_logp=entry_logprobs(model, train_examples, ds))
    fit_robust(model, dev_examples, dec)
    dec.save("robust/");  dec = RobustKNNDecoder.load("robust/", ds)
    out = hf.generate(model, dec, input_ids=src, num_beams=4)
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops, reference
from ..defaults import KNN_MT
from ..storage import Datastore
from .decoding import KNNDecoder, Neighbours, fit_gold_network, gold_two_column
from .skipping import RetrievalSkip

LOGP_FLOOR = -50.0
DIST_CAP = 1e4
TOP = 8


@dataclass
class RobustFeatures:
    """What ``RobustKNNDecoder.fit`` needs per dev position (T positions, one device)."""
    targets: Tensor          # [T] gold tokens
    base_gold_logp: Tensor   # [T] log p_NMT(y_t | q_t)
    neighbours: Neighbours   # [T, K] scores (-squared L2), tokens, ids
    query_logp: Tensor       # [T, K] log p_NMT(v_j | q_t)
    top_logp: Tensor         # [T, 8] the model's top-8 log-probs at q_t


def model_logp_features(logits: Tensor, tokens: Tensor, top: int = TOP) -> Tuple[Tensor, Tensor]:
    """(log p(v_j | q) [B, K] at the neighbours' tokens, top-``top`` log-probs [B, top]) from
    logits [B, V], float32, without materializing a [B, V] log-softmax."""
    x = logits.float()
    if x.shape[1] < top:
        raise ValueError(f"logits must have at least {top} columns (the top-{top} feature), "
                         f"got {tuple(logits.shape)}")
    lse = torch.logsumexp(x, 1, keepdim=True)
    query = x.gather(1, tokens.to(x.device).clamp(min=0)) - lse
    return query, x.topk(top, dim=1).values - lse


def robust_features(logits: Tensor, targets: Tensor, nbrs: Neighbours) -> RobustFeatures:
    """RobustFeatures of positions whose logits [T, V] are at hand (one batch of a dev set)."""
    query, top = model_logp_features(logits, nbrs.tokens)
    gold = logits.float().gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits.float(), 1)
    return RobustFeatures(targets, gold, nbrs, query, top)


class RobustCombiner(nn.Module):
    """The three small networks of Robust kNN-MT (see the module docstring)."""

    def __init__(self, k: int, hidden: int = 32, top: int = TOP):
        super().__init__()
        self.k, self.top = k, top
        self.confidence = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        self.model_lambda = nn.Linear(2 * k + top, 1)
        self.distance = nn.Sequential(nn.Linear(2 * k, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, scores: Tensor, tokens: Tensor, key_logp: Tensor, query_logp: Tensor,
                top_logp: Tensor, log_counts: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-neighbour weights [B, K] (rows sum to 1 where a neighbour is valid, else 0)
        and λ [B] (0 where no neighbour is valid). ``log_counts`` (pruned datastores)
        multiplies each weight by its entry's merge count."""
        valid = tokens >= 0
        dist = (-scores.float()).clamp(max=DIST_CAP).masked_fill(~valid, DIST_CAP)
        kl = key_logp.float().clamp(min=LOGP_FLOOR).masked_fill(~valid, LOGP_FLOOR)
        ql = query_logp.float().clamp(min=LOGP_FLOOR).masked_fill(~valid, LOGP_FLOOR)
        top = top_logp.float().clamp(min=LOGP_FLOOR)
        conf = self.confidence(torch.stack([kl, ql], -1)).squeeze(-1)
        s = self.model_lambda(torch.cat([top, kl, ql], 1)).squeeze(1)
        a, t = self.distance(torch.cat([dist, ops.label_counts(tokens).float()], 1)).unbind(1)
        z = conf - dist * torch.sigmoid(t)[:, None]
        if log_counts is not None:
            z = z + log_counts.to(z.device)
        z = z.masked_fill(~valid, float("-inf"))
        weights = torch.softmax(z, 1).nan_to_num(0.0)
        lam = torch.where(valid.any(1), torch.sigmoid(a - s), torch.zeros_like(a))
        return weights, lam


class RobustKNNDecoder(KNNDecoder):
    """Robust kNN-MT: λ, per-neighbour confidence and distance scale predicted per step.

    Args:
        datastore, k, exact, rescore, nprobe, backend, skip: as KNNDecoder (metric must be
            "l2").
        entry_logp: [N] float, log p_NMT(v_i | k_i) of every datastore entry
            (``entry_logprobs`` for HF models).
        hidden: width of the distance network. noise_std, noise_decay: the training
            perturbation (σ and the update scale of r = exp(-update / noise_decay)).
    """

    def __init__(self, datastore: Datastore, k: int = KNN_MT.k, *, entry_logp: Tensor,
                 hidden: int = 32, noise_std: float = 0.01, noise_decay: float = 1000.0,
                 metric: Optional[str] = None, exact: Optional[bool] = None,
                 rescore: Optional[bool] = None, nprobe: Optional[int] = None,
                 backend: str = "fused", skip: Optional[RetrievalSkip] = None):
        super().__init__(datastore, k=k, metric=metric, exact=exact, rescore=rescore, nprobe=nprobe,
                         backend=backend, skip=skip)
        if self.metric != "l2":
            raise ValueError(f"RobustKNNDecoder: the datastore's metric must be 'l2' (the "
                             f"combiner reads squared L2 distances), got {self.metric!r}")
        entry_logp = torch.as_tensor(entry_logp)
        if entry_logp.dim() != 1 or entry_logp.shape[0] != len(datastore):
            raise ValueError(f"RobustKNNDecoder: entry_logp must have shape [{len(datastore)}] "
                             f"(one per datastore entry), got {tuple(entry_logp.shape)}")
        self.entry_logp = entry_logp.detach().float()
        self.noise_std, self.noise_decay = float(noise_std), float(noise_decay)
        self.network = RobustCombiner(k, hidden)
        self.network.eval()

    def key_logp(self, ids: Tensor) -> Tensor:
        """log p(v | own key) of entries ``ids`` [B, K] (-1 pads -> the floor)."""
        if self.entry_logp.device != ids.device:
            self.entry_logp = self.entry_logp.to(ids.device)
        return self.entry_logp[ids.clamp(min=0)].masked_fill(ids < 0, LOGP_FLOOR)

    def mixture(self, logits: Tensor, nbrs: Neighbours) -> Tuple[Tensor, Tensor]:
        """(weights [B, K], λ [B]) of one step from logits [B, V] and the neighbours."""
        tokens = nbrs.tokens.to(logits.device)
        query, top = model_logp_features(logits, tokens)
        return self.network(nbrs.scores.to(logits.device), tokens,
                            self.key_logp(nbrs.ids.to(logits.device)), query, top, nbrs.log_counts)

    def interpolate(self, logits: Tensor, nbrs: Neighbours, *, lam=None, temperature=None,
                    out: Optional[Tensor] = None) -> Tensor:
        with torch.no_grad():
            weights, lam_rows = self.mixture(logits, nbrs)
        fn = ops.knn_interpolate if self.backend == "fused" else reference.knn_interpolate
        return fn(logits, nbrs.tokens.to(logits.device), weights=weights,
                  lam=lam_rows if lam is None else lam, out=out)

    def gold_logprob(self, logits: Tensor, targets: Tensor, nbrs: Neighbours, *,
                     lam=None, temperature=None, ignore_index: int = -100) -> Tensor:
        with torch.no_grad():
            weights, lam_rows = self.mixture(logits, nbrs)
        fn = ops.knn_gold_logprob if self.backend == "fused" else reference.knn_gold_logprob
        return fn(logits, targets, nbrs.tokens.to(logits.device), weights=weights,
                  lam=lam_rows if lam is None else lam, ignore_index=ignore_index)

    # ----------------------------------------------------------------------- training

    def perturb(self, f: RobustFeatures, rows: Tensor, rate: float,
                gen: torch.Generator) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The paper's perturbation of positions ``rows`` at rate ``rate`` (module docstring):
        (scores, tokens, key_logp, query_logp), each [n, K], re-sorted by distance."""
        nb, dev = f.neighbours, f.targets.device
        scores, tokens = nb.scores[rows].float(), nb.tokens[rows]
        key, query, y = self.key_logp(nb.ids[rows].to(dev)), f.query_logp[rows].float(), f.targets[rows]
        n, K = tokens.shape
        sig, D = self.noise_std, self.datastore.dim
        chi2 = lambda *shape: torch.randn(*shape, D, generator=gen, device=dev).pow(2).sum(-1)  # noqa: E731
        d = (-scores).clamp(min=0, max=DIST_CAP)
        noisy = (d - 2 * sig * d.sqrt() * torch.randn(n, K, generator=gen, device=dev)
                 + sig ** 2 * chi2(n, K)).clamp(min=0)
        keyed = torch.rand(n, 1, generator=gen, device=dev) < rate
        d = torch.where(keyed & (tokens >= 0), noisy, d)
        gold = f.base_gold_logp[rows].float()[:, None]
        insert = ((torch.rand(n, generator=gen, device=dev) < rate)
                  & ~(tokens == y[:, None]).any(1))[:, None]
        shift = lambda new, x: torch.where(insert, torch.cat([new, x[:, :-1]], 1), x)  # noqa: E731
        d = shift(sig ** 2 * chi2(n, 1), d)
        tokens, key, query = shift(y[:, None], tokens), shift(gold, key), shift(gold, query)
        d = d.masked_fill(tokens < 0, float("inf"))
        order = torch.sort(d, dim=1, stable=True).indices
        pick = lambda x: x.gather(1, order)  # noqa: E731
        return -pick(d), pick(tokens), pick(key), pick(query)

    def fit(self, feats: RobustFeatures, *, epochs: int = 50, batch_size: int = 32,
            lr: float = 3e-4, max_updates: int = 5000, valid_fraction: float = 0.1,
            perturb: bool = True, seed: int = 0, progress: bool = True) -> dict:
        """Train the combiner on one retrieval pass over a dev set (``collect_robust_features``
        or ``robust_features``), the perturbation on unless ``perturb=False``; the held-out
        ``valid_fraction`` is scored unperturbed. Returns what ``fit_gold_network`` returns."""
        K = feats.neighbours.tokens.shape[1]
        if K != self.k:
            raise ValueError(f"RobustKNNDecoder.fit: features have {K} neighbours per position, "
                             f"the decoder k={self.k}")
        gen = torch.Generator(device=feats.targets.device).manual_seed(seed + 1)
        nb = feats.neighbours

        def nll(rows: Tensor, update: Optional[int]) -> Tensor:
            rows = rows.to(feats.targets.device)
            if update is not None and perturb:
                rate = math.exp(-update / self.noise_decay)
                scores, tokens, key, query = self.perturb(feats, rows, rate, gen)
            else:
                scores, tokens = nb.scores[rows], nb.tokens[rows]
                key, query = self.key_logp(nb.ids[rows]), feats.query_logp[rows]
            w, lam = self.network(scores, tokens, key, query, feats.top_logp[rows])
            logits2, tokens2 = gold_two_column(feats.base_gold_logp[rows], tokens, feats.targets[rows])
            return -ops.knn_gold_logprob(logits2, torch.zeros_like(rows), tokens2, weights=w,
                                         lam=lam).mean()

        return fit_gold_network(self.network, nll, feats.targets.shape[0], epochs=epochs,
                                batch_size=batch_size, lr=lr, max_updates=max_updates,
                                valid_fraction=valid_fraction, seed=seed, progress=progress,
                                desc="robust")

    # ----------------------------------------------------------------------- persistence

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save the combiner, its settings and ``entry_logp`` to a directory."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        for name, obj in (("robust.pt", self.network.state_dict()),
                          ("entry_logp.pt", self.entry_logp.cpu())):
            torch.save(obj, os.path.join(path, name + ".tmp"))
            os.replace(os.path.join(path, name + ".tmp"), os.path.join(path, name))
        cfg = {"k": self.k, "hidden": self.network.distance[0].out_features,
               "noise_std": self.noise_std, "noise_decay": self.noise_decay,
               "entries": len(self.datastore), "dim": self.datastore.dim}
        with open(os.path.join(path, "robust.json"), "w") as f:
            json.dump(cfg, f)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], datastore: Datastore,
             **kwargs) -> "RobustKNNDecoder":
        """Load a combiner saved with ``save`` for ``datastore`` (the one it was fitted on:
        same size and key width). ``k``, if given, must equal the saved k."""
        path = os.fspath(path)
        with open(os.path.join(path, "robust.json")) as f:
            cfg = json.load(f)
        k = kwargs.pop("k", cfg["k"])
        if k != cfg["k"]:
            raise ValueError(f"RobustKNNDecoder.load: {path} was trained for k={cfg['k']}, "
                             f"got k={k!r}")
        if (cfg["entries"], cfg["dim"]) != (len(datastore), datastore.dim):
            raise ValueError(f"RobustKNNDecoder.load: {path} was fitted on a datastore of "
                             f"{cfg['entries']} entries x D={cfg['dim']}, this one has "
                             f"{len(datastore)} x D={datastore.dim}")
        entry = torch.load(os.path.join(path, "entry_logp.pt"), weights_only=True)
        dec = cls(datastore, k=k, entry_logp=entry, hidden=cfg["hidden"],
                  noise_std=cfg["noise_std"], noise_decay=cfg["noise_decay"], **kwargs)
        dec.network.load_state_dict(torch.load(os.path.join(path, "robust.pt"), weights_only=True))
        dec.network.eval()
        return dec


# --------------------------------------------------------------------------- HF glue


def entry_logprobs(model: nn.Module, train_examples: Sequence, datastore: Datastore, *,
                   batch_size: int = 16, progress: bool = True) -> Tensor:
    """log p_model(v_i | context of entry i) for every entry of a datastore built by
    ``hf.build_datastore(model, train_examples, ...)`` (same examples, same order): one
    teacher-forced pass in the build's length order. [N] float32 on the CPU."""
    from tqdm.auto import tqdm
    from ..integrations import hf
    parts = []
    bar = tqdm(total=len(train_examples), desc="entry log-probs", unit="ex",
               disable=not progress, leave=False)
    for tf in hf.teacher_forced(model, train_examples, batch_size=batch_size,
                                order=hf.length_order(train_examples)):
        parts.append(hf.base_gold_logprob(tf.logits, tf.targets).cpu())
        bar.update(tf.examples)
    bar.close()
    out = torch.cat(parts) if parts else torch.zeros(0)
    if out.shape[0] != len(datastore):
        raise ValueError(f"entry_logprobs: the examples have {out.shape[0]} target positions, "
                         f"the datastore {len(datastore)} entries: pass the examples it was "
                         f"built from")
    return out


def collect_robust_features(model: nn.Module, dev_examples: Sequence, decoder: RobustKNNDecoder,
                            *, hidden="ffn", batch_size: int = 16,
                            progress: bool = True) -> RobustFeatures:
    """Teacher-forced pass over a dev set + one search per position: RobustFeatures on the
    CPU ([T, K] and [T, 8] per position; no [T, V] tensor is kept)."""
    from tqdm.auto import tqdm
    from ..integrations import hf
    parts = []
    bar = tqdm(total=len(dev_examples), desc="dev retrieval", unit="ex", disable=not progress,
               leave=False)
    for tf in hf.teacher_forced(model, dev_examples, hidden=hidden, batch_size=batch_size):
        f = robust_features(tf.logits, tf.targets, decoder.retrieve(tf.hidden))
        nb = f.neighbours
        parts.append([x.cpu() for x in (f.targets, f.base_gold_logp, nb.scores, nb.tokens,
                                        nb.ids, f.query_logp, f.top_logp)])
        bar.update(tf.examples)
    bar.close()
    if not parts:
        raise ValueError("collect_robust_features: dev_examples is empty")
    y, gold, sc, tok, ids, query, top = (torch.cat(c) for c in zip(*parts))
    return RobustFeatures(y, gold, Neighbours(sc, tok, ids), query, top)


def fit_robust(model: nn.Module, dev_examples: Sequence, decoder: RobustKNNDecoder, *,
               hidden="ffn", batch_size: int = 16, progress: bool = True, **fit_kwargs) -> dict:
    """``decoder.fit(collect_robust_features(model, dev_examples, decoder))``."""
    feats = collect_robust_features(model, dev_examples, decoder, hidden=hidden,
                                    batch_size=batch_size, progress=progress)
    return decoder.fit(feats, progress=progress, **fit_kwargs)
