"""Framework-free kNN decoding: ``decoder(hidden, logits) -> log-probs`` for any loop.

    ds = knnfast.Datastore.open("ds")
    knn = knnfast.KNNDecoder(ds, k=8, temperature=10.0, lam=0.7)
    for step in range(max_len):                     # greedy or beam: rows = batch x beam
        hidden, logits = my_model_step(...)         # hidden [B, D] (datastore's key space)
        logp = knn(hidden, logits)                  # [B, V] float32 log-probs
        next_tokens = logp.argmax(-1)

``backend="reference"`` runs the same steps through knnfast.reference (pure PyTorch:
matmul + topk search, dense scatter_add_ and logaddexp, as knn-transformers does) for
parity checks and speed comparisons.

AdaptiveKNNDecoder is the meta-k network of Zheng et al. (2021): from the distances and
distinct-label counts of the K retrieved neighbours it predicts a distribution over
k in {0, 1, 2, 4, ..., K}; k = 0 means "trust the model", so lambda = 1 - p(k=0). It is
trained on a dev set with the gold-token objective after a single retrieval pass.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .. import ops, reference
from ..defaults import KNN_MT, MAX_K, OPS
from ..storage import Datastore
from .skipping import RetrievalSkip, SkipStats

Scalar = Union[float, Tensor]


@dataclass
class Neighbours:
    """Retrieved neighbours of B queries: scores [B, k] float32 (-inf pads), tokens [B, k]
    int64 (-1 pads), ids [B, k] datastore entry ids (-1 pads). ``log_counts`` [B, k] float32
    (0 on pads): log of how many entries each neighbour stands for in a pruned datastore
    (``Datastore.prune``), None for an unpruned one."""
    scores: Tensor
    tokens: Tensor
    ids: Tensor
    log_counts: Optional[Tensor] = None


def empty_neighbours(rows: int, k: int, device: torch.device, counted: bool) -> Neighbours:
    """``rows`` rows with no neighbour (what a skipped row gets: mixed as λ = 0)."""
    return Neighbours(torch.full((rows, k), float("-inf"), device=device),
                      torch.full((rows, k), -1, dtype=torch.long, device=device),
                      torch.full((rows, k), -1, dtype=torch.long, device=device),
                      torch.zeros(rows, k, device=device) if counted else None)


def count_weighted_scores(nbrs: Neighbours, temperature: Scalar) -> Tensor:
    """Scores with each neighbour's merge count folded in, s + τ·log c, so that
    softmax(s'/τ) ∝ c·exp(s/τ): a merged entry weighs as the c entries it replaced (He et
    al. 2021). The scores themselves when the datastore is not pruned."""
    if nbrs.log_counts is None:
        return nbrs.scores
    tau = torch.as_tensor(temperature, dtype=torch.float32, device=nbrs.scores.device)
    return nbrs.scores + (tau.reshape(-1, 1) if tau.dim() else tau) * nbrs.log_counts


def _check_backend(backend: str) -> None:
    if backend not in ("fused", "reference"):
        raise ValueError(f"backend must be 'fused' or 'reference', got {backend!r}")


class KNNDecoder:
    """kNN-MT / kNN-LM step: log((1 - lam) softmax(logits) + lam P_kNN(hidden)).

    Args:
        datastore: a Datastore (memmapped, moved with ``to``, or with a FAISS index).
        k, temperature, lam: neighbours, softmax temperature over scores (scores are
            -squared L2 for "l2", so this is the papers' exp(-d / T)), interpolation weight.
        metric: defaults to the datastore's metric.
        exact, rescore: how to search (see ``Datastore.search``); default exact search when
            the datastore has no index, else the index with its own scores.
        nprobe: IVF lists to visit (index search only).
        backend: "fused" (knnfast ops) or "reference" (pure PyTorch twin).
        skip: a ``RetrievalSkip`` (confidence threshold and/or learned gate): rows it skips
            are not searched and get the model's log-probs. None (default): every row
            retrieves. ``skip_stats`` counts skipped rows and steps (``reset()`` zeroes it).
    """

    def __init__(self, datastore: Datastore, k: int = KNN_MT.k,
                 temperature: Scalar = KNN_MT.temperature, lam: Scalar = KNN_MT.lam, metric: Optional[str] = None, exact: Optional[bool] = None,
                 rescore: Optional[bool] = None, nprobe: Optional[int] = None,
                 backend: str = "fused", skip: Optional[RetrievalSkip] = None):
        _check_backend(backend)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"KNNDecoder: k must be an int in [1, {MAX_K}], got {k!r}")
        self.datastore = datastore
        self.k = k
        self.temperature = temperature
        self.lam = lam
        self.metric = metric or datastore.metric
        self.exact = exact
        self.rescore = rescore
        self.nprobe = nprobe
        self.backend = backend
        self.skip = skip
        self.skip_stats = SkipStats()

    @property
    def skip(self) -> Optional[RetrievalSkip]:
        """The retrieval-skipping rule (None: every row retrieves)."""
        return self._skip

    @skip.setter
    def skip(self, skip: Optional[RetrievalSkip]) -> None:
        if skip is not None and not isinstance(skip, RetrievalSkip):
            raise ValueError(f"skip must be a knnfast.RetrievalSkip or None, got "
                             f"{type(skip).__name__}")
        if skip is not None:
            skip.check_datastore(self.datastore)
        self._skip = skip

    def retrieve(self, hidden: Tensor, k: Optional[int] = None, *,
                 logits: Optional[Tensor] = None, rows: Optional[Tensor] = None) -> Neighbours:
        """Search the datastore for every row of hidden [B, D] and look up the neighbours'
        tokens (no skipping: dev-set passes, tuning and fitting use this). With ``logits``
        it is ``retrieve_step(hidden, logits, k)``. ``rows`` [B] bool (a datastore that
        ``masks_rows``): only those rows search, the others get no neighbours."""
        if logits is not None:
            return self.retrieve_step(hidden, logits, k)
        k = k or self.k
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [B, D] (flatten batch x beam first), "
                             f"got {tuple(hidden.shape)}")
        ds = self.datastore
        if self.backend == "reference" and (self.exact or (self.exact is None and not ds.has_index())):
            q = ds.project(hidden.detach()).to(ds.keys.device)
            scores, ids = reference.knn_search(q, ds.keys, k, self.metric)
            scores, ids = scores.to(hidden.device), ids.to(hidden.device)
            tokens = ds.lookup(ids, check=False)
        else:
            masked = {} if rows is None else {"rows": rows}
            search = dict(exact=self.exact, rescore=self.rescore, metric=self.metric,
                          nprobe=self.nprobe, **masked)
            if hasattr(ds, "neighbours"):  # tokens looked up where the datastore lives
                scores, ids, tokens = ds.neighbours(hidden, k, **search)
            else:  # a torch.distributed ShardedDatastore
                scores, ids = ds.search(hidden, k, **search)
                tokens = ds.lookup(ids, check=False)
        log_counts = self.datastore_counts()
        if log_counts is not None:
            idx = ids.to(log_counts.device)
            log_counts = log_counts[idx.clamp(min=0)].masked_fill(idx < 0, 0.0).to(ids.device)
        return Neighbours(scores, tokens, ids, log_counts)

    def retrieve_step(self, hidden: Tensor, logits: Tensor, k: Optional[int] = None) -> Neighbours:
        """The neighbours of one decoding step: counted in ``skip_stats``; with a ``skip``
        rule only the rows it keeps go to ``retrieve``, the others get no neighbours (score
        -inf, token -1, id -1), which every decoder mixes as λ = 0."""
        if hidden.dim() != 2 or logits.dim() != 2 or hidden.shape[0] != logits.shape[0]:
            raise ValueError(f"hidden [B, D] and logits [B, V] must have the same B, got "
                             f"{tuple(hidden.shape)} and {tuple(logits.shape)}")
        B = hidden.shape[0]
        if self.skip is None:
            self.skip_stats.add(B, B)
            return self.retrieve(hidden, k)
        mask = self.skip.retrieve_mask(hidden, logits).to(hidden.device)
        masks_rows = getattr(self.datastore, "masks_rows", lambda exact: False)
        if self.backend == "fused" and masks_rows(self.exact):
            # the lists search leaves unselected rows unsearched at no cost: no batch split
            searched = int(mask.sum())
            self.skip_stats.add(B, searched)
            if searched == 0:
                return empty_neighbours(B, k or self.k, hidden.device,
                                        self.datastore_counts() is not None)
            return self.retrieve(hidden, k, rows=None if searched == B else mask)
        rows = mask.nonzero().squeeze(1)
        self.skip_stats.add(B, rows.numel())
        if rows.numel() == B:
            return self.retrieve(hidden, k)
        out = empty_neighbours(B, k or self.k, hidden.device, self.datastore_counts() is not None)
        if rows.numel():
            found = self.retrieve(hidden[rows], k)
            for name in ("scores", "tokens", "ids", "log_counts"):
                if getattr(out, name) is not None:
                    getattr(out, name)[rows] = getattr(found, name).to(hidden.device)
        return out

    def datastore_counts(self) -> Optional[Tensor]:
        """log merge counts [N] of a pruned datastore (None: unpruned)."""
        return getattr(self.datastore, "log_counts", None)  # sharded stores are never pruned

    def interpolate(self, logits: Tensor, nbrs: Neighbours, *, lam: Optional[Scalar] = None,
                    temperature: Optional[Scalar] = None, out: Optional[Tensor] = None) -> Tensor:
        """Mix already retrieved neighbours into logits [B, V] -> float32 log-probs [B, V]."""
        fn = ops.knn_interpolate if self.backend == "fused" else reference.knn_interpolate
        tau = self.temperature if temperature is None else temperature
        return fn(logits, nbrs.tokens.to(logits.device),
                  scores=count_weighted_scores(nbrs, tau).to(logits.device),
                  temperature=tau, lam=self.lam if lam is None else lam, out=out)

    def __call__(self, hidden: Tensor, logits: Tensor, *, out: Optional[Tensor] = None) -> Tensor:
        """One decoding step: hidden [B, D], logits [B, V] -> float32 log-probs [B, V]."""
        return self.interpolate(logits, self.retrieve_step(hidden, logits), out=out)

    def gold_logprob(self, logits: Tensor, targets: Tensor, nbrs: Neighbours, *,
                     lam: Optional[Scalar] = None, temperature: Optional[Scalar] = None,
                     ignore_index: int = -100) -> Tensor:
        """log P(target) under the mixture, [B] float32 (perplexity, tuning)."""
        fn = ops.knn_gold_logprob if self.backend == "fused" else reference.knn_gold_logprob
        tau = self.temperature if temperature is None else temperature
        return fn(logits, targets, nbrs.tokens.to(logits.device),
                  scores=count_weighted_scores(nbrs, tau).to(logits.device),
                  temperature=tau, lam=self.lam if lam is None else lam,
                  ignore_index=ignore_index)


# --------------------------------------------------------------------------- gold-only math


def gold_two_column(base_gold_logp: Tensor, tokens: Tensor, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """Rewrite a gold-token problem over V classes as one over 2 classes.

    With logits [log p(y), log(1 - p(y))] and tokens mapped to 0 (== y) / 1 (!= y) / -1,
    ``knn_gold_logprob(logits2, zeros, tokens2, ...)`` equals the V-class gold log-prob
    log((1-λ) p(y) + λ Σ_{v_j = y} w_j). Tuning and adaptive training then only need the
    gold log-prob of the base model per position, not the [T, V] logits.
    """
    lp = base_gold_logp.float().clamp(max=0.0)
    log1m = torch.where(lp > -0.6931, torch.log(-torch.expm1(lp)), torch.log1p(-torch.exp(lp)))
    logits2 = torch.stack([lp, log1m], 1)
    tokens2 = torch.where(tokens < 0, -1, (tokens != targets[:, None]).long())
    return logits2, tokens2



def fit_gold_network(network: nn.Module, nll, T: int, *, epochs: int = 50, batch_size: int = 32,
                     lr: float = 3e-4, max_updates: int = 5000, valid_fraction: float = 0.1,
                     seed: int = 0, progress: bool = True, desc: str = "fit") -> dict:
    """Adam on ``nll(rows, update)`` (mean gold NLL of dev positions ``rows``; ``update`` is
    the update number while training, None for the held-out evaluation) over T positions,
    a ``valid_fraction`` of them held out. Returns {"train_loss": [...], "valid_nll_before",
    "valid_nll_after", "updates"}; the network is left in eval mode."""
    from tqdm.auto import tqdm
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(T, generator=gen)
    n_valid = max(1, int(T * valid_fraction)) if T > 1 else 0
    valid, train = perm[:n_valid], perm[n_valid:]
    torch.manual_seed(seed)
    opt = torch.optim.Adam(network.parameters(), lr=lr)
    network.eval()
    with torch.no_grad():
        before = float(nll(valid, None)) if n_valid else float("nan")
    history: List[float] = []
    updates = 0
    bar = tqdm(total=min(max_updates, epochs * math.ceil(len(train) / batch_size)),
               desc=desc, disable=not progress, leave=False)
    network.train()
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=gen)]
        for s in range(0, len(order), batch_size):
            if updates >= max_updates:
                break
            loss = nll(order[s:s + batch_size], updates)
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
            updates += 1
            bar.update(1)
    bar.close()
    network.eval()
    with torch.no_grad():
        after = float(nll(valid, None)) if n_valid else float("nan")
    return {"train_loss": history, "valid_nll_before": before, "valid_nll_after": after,
            "updates": updates}


# --------------------------------------------------------------------------- adaptive


class MetaKNetwork(nn.Module):
    """Linear(2K, hidden) - tanh - Linear(hidden, 2 + log2 K) - softmax over k in
    {0, 1, 2, 4, ..., K} (Zheng et al. 2021)."""

    def __init__(self, max_k: int, hidden: int = 32, dropout: float = 0.0):
        super().__init__()
        if max_k < 1 or max_k & (max_k - 1):
            raise ValueError(f"max_k must be a power of two >= 1, got {max_k}")
        self.max_k = max_k
        self.ks = [0] + [2 ** i for i in range(int(math.log2(max_k)) + 1)]
        self.net = nn.Sequential(nn.Linear(2 * max_k, hidden), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(hidden, len(self.ks)))

    def features(self, scores: Tensor, tokens: Tensor) -> Tensor:
        """[distances, distinct-label counts] of the K neighbours; -inf pads become a large
        finite distance (the reference code's +1000 mask is replaced by a finite 1e4
        feature only here; the weights themselves use -inf)."""
        dist = (-scores.float()).clamp(max=1e4)
        counts = ops.label_counts(tokens).float()
        return torch.cat([dist, counts], 1)

    def forward(self, scores: Tensor, tokens: Tensor) -> Tensor:
        """p(k) [B, len(ks)]."""
        return torch.softmax(self.net(self.features(scores, tokens)), dim=-1)

    def mixture(self, scores: Tensor, tokens: Tensor, temperature: Scalar,
                log_counts: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Per-neighbour weights [B, K] (rows sum to 1 where valid) and λ [B] = 1 - p(k=0);
        ``log_counts`` (pruned datastores) multiplies each weight by its merge count."""
        p_k = self.forward(scores, tokens)
        K = self.max_k
        s = scores.float().masked_fill(tokens < 0, float("-inf"))
        tau = torch.as_tensor(temperature, dtype=torch.float32, device=s.device)
        z = s / (tau.reshape(-1, 1) if tau.dim() else tau)
        if log_counts is not None:
            z = z + log_counts.to(z.device)
        weights = torch.zeros_like(z)
        cols = torch.arange(K, device=s.device)
        for r, kr in enumerate(self.ks[1:], start=1):
            zr = z.masked_fill(cols[None, :] >= kr, float("-inf"))
            w = torch.softmax(zr, dim=1).nan_to_num(0.0)  # rows with no valid slot -> 0
            weights = weights + p_k[:, r:r + 1] * w
        lam = 1.0 - p_k[:, 0]
        norm = weights.sum(1, keepdim=True)
        weights = torch.where(norm > 0, weights / norm.clamp_min(1e-30), weights)
        lam = torch.where(norm.squeeze(1) > 0, lam, torch.zeros_like(lam))
        return weights, lam.clamp(0.0, 1.0)


class AdaptiveKNNDecoder(KNNDecoder):
    """Adaptive kNN-MT: λ and the effective k predicted per step by a meta-k network.

    Args:
        datastore, temperature, metric, exact, rescore, nprobe, backend, skip: as KNNDecoder.
        max_k: K neighbours retrieved (power of two; the reference code uses 4-32).
        hidden: width of the meta-k network.
    """

    def __init__(self, datastore: Datastore, max_k: int = KNN_MT.k,
                 temperature: Scalar = KNN_MT.temperature, hidden: int = 32, metric: Optional[str] = None, exact: Optional[bool] = None,
                 rescore: Optional[bool] = None, nprobe: Optional[int] = None,
                 backend: str = "fused", skip: Optional[RetrievalSkip] = None):
        # lam is a placeholder: the meta-k network predicts λ per row
        super().__init__(datastore, k=max_k, temperature=temperature, lam=OPS.lam, metric=metric,
                         exact=exact, rescore=rescore, nprobe=nprobe, backend=backend, skip=skip)
        self.network = MetaKNetwork(max_k, hidden)

    def interpolate(self, logits: Tensor, nbrs: Neighbours, *, lam=None, temperature=None,
                    out: Optional[Tensor] = None) -> Tensor:
        with torch.no_grad():
            weights, lam_rows = self.network.mixture(nbrs.scores.to(logits.device),
                                                     nbrs.tokens.to(logits.device),
                                                     self.temperature, nbrs.log_counts)
        fn = ops.knn_interpolate if self.backend == "fused" else reference.knn_interpolate
        return fn(logits, nbrs.tokens.to(logits.device), weights=weights, lam=lam_rows, out=out)

    def gold_logprob(self, logits: Tensor, targets: Tensor, nbrs: Neighbours, *,
                     lam=None, temperature=None, ignore_index: int = -100) -> Tensor:
        weights, lam_rows = self.network.mixture(nbrs.scores.to(logits.device),
                                                 nbrs.tokens.to(logits.device), self.temperature,
                                                 nbrs.log_counts)
        fn = ops.knn_gold_logprob if self.backend == "fused" else reference.knn_gold_logprob
        return fn(logits, targets, nbrs.tokens.to(logits.device), weights=weights,
                  lam=lam_rows, ignore_index=ignore_index)

    def fit(self, base_gold_logp: Tensor, targets: Tensor, nbrs: Neighbours, *,
            epochs: int = 50, batch_size: int = 32, lr: float = 3e-4, max_updates: int = 5000,
            valid_fraction: float = 0.1, seed: int = 0, progress: bool = True) -> dict:
        """Train the meta-k network on one retrieval pass over a dev set.

        Args:
            base_gold_logp: [T] log p_model(y_t) of the base model (teacher forced).
            targets: [T] gold tokens; nbrs: the K neighbours of each position.
        Returns:
            {"train_loss": [...], "valid_nll_before": x, "valid_nll_after": y} where valid
            is a held-out ``valid_fraction`` of the positions (mean -log P(y)).
        """
        logits2, tokens2 = gold_two_column(base_gold_logp, nbrs.tokens, targets)
        scores, tokens, counts = nbrs.scores.float(), nbrs.tokens, nbrs.log_counts
        zeros = torch.zeros(targets.shape[0], dtype=torch.long, device=targets.device)

        def nll(rows: Tensor, update: Optional[int]) -> Tensor:
            w, lam = self.network.mixture(scores[rows], tokens[rows], self.temperature,
                                          None if counts is None else counts[rows])
            return -ops.knn_gold_logprob(logits2[rows], zeros[rows], tokens2[rows], weights=w,
                                         lam=lam).mean()

        return fit_gold_network(self.network, nll, targets.shape[0], epochs=epochs,
                                batch_size=batch_size, lr=lr, max_updates=max_updates,
                                valid_fraction=valid_fraction, seed=seed, progress=progress,
                                desc="meta-k")

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save the meta-k network (+ its settings) to a directory."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, "meta_k.pt.tmp")
        torch.save(self.network.state_dict(), tmp)
        os.replace(tmp, os.path.join(path, "meta_k.pt"))
        cfg = {"max_k": self.k, "hidden": self.network.net[0].out_features,
               "temperature": float(self.temperature)}
        with open(os.path.join(path, "meta_k.json"), "w") as f:
            json.dump(cfg, f)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], datastore: Datastore, **kwargs) -> "AdaptiveKNNDecoder":
        """Load a meta-k network saved with ``save`` for use with ``datastore``."""
        path = os.fspath(path)
        with open(os.path.join(path, "meta_k.json")) as f:
            cfg = json.load(f)
        dec = cls(datastore, max_k=cfg["max_k"], temperature=kwargs.pop("temperature", cfg["temperature"]),
                  hidden=cfg["hidden"], **kwargs)
        dec.network.load_state_dict(torch.load(os.path.join(path, "meta_k.pt"), weights_only=True))
        dec.network.eval()
        return dec
