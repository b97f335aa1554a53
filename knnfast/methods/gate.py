"""The learned retrieval gate of He et al. 2021 ("Efficient Nearest Neighbor Language
Models", §4 adaptive retrieval): a small MLP on the model's features predicts the
interpolation weight λ of each position; where it predicts a λ below a threshold, the step
does not search the datastore (``RetrievalSkip(gate=..., gate_threshold=...)``).

    feats = collect_gate_features(model, dev_examples, decoder)   # one retrieval pass
    gate = RetrievalGate(decoder.datastore.query_dim)
    fit_gate(gate, feats)                                          # gold-token objective
    gate.save("gate/");  gate = RetrievalGate.load("gate/", ds)
    decoder.skip = RetrievalSkip(gate=gate, gate_threshold=0.3)

Features: the model's state at the key layer (the query, ``use_hidden=True``) and
statistics of its next-token distribution: the entropy and the top-4 log-probabilities
(the paper also uses n-gram frequency and fertility features of the training corpus, which
a decoder does not have at hand; left out). Inputs are standardised with the training
set's mean and std, then Linear-ReLU-Dropout blocks and Linear(·, 1)-sigmoid give λ.

Training minimises -log((1 - λ) p_model(y) + λ p_kNN(y)) over the dev positions with the
decoder's own k neighbours and temperature (merge counts of a pruned store included), i.e.
the λ that the plain kNN-LM mixture wants per position. At decoding time the gate only
decides retrieval; rows that retrieve are mixed by the decoder as usual (its own λ, or its
network's for adaptive / robust decoders). Deviation from the paper: it mixes with the
predicted λ; here λ stays the decoder's, so the gate composes with every decoder.

The gate records the datastore it was fitted for (``Datastore.fingerprint``, size) and the
width D of the states it reads: ``load`` with another datastore, a decoder over another
datastore, or states of another width are ValueErrors.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import ops
from .decoding import KNNDecoder, Neighbours, count_weighted_scores, fit_gold_network, \
    gold_two_column

TOP = 4                      # top-k log-probs among the distribution features
STATS = TOP + 1              # + entropy


def distribution_stats(logits: Tensor) -> Tensor:
    """[B, 5] float32: entropy and top-4 log-probabilities of softmax(logits)."""
    if logits.dim() != 2 or logits.shape[1] < TOP:
        raise ValueError(f"RetrievalGate: logits must be [B, V] with V >= {TOP}, got "
                         f"{tuple(logits.shape)}")
    entropy, top = ops.softmax_stats(logits, TOP)  # one read of the logits
    return torch.cat([entropy[:, None], top.clamp(min=-1e4)], 1)


class RetrievalGate(nn.Module):
    """λ [B] from (hidden [B, D], logits [B, V]) (module docstring).

    Args:
        dim: width D of the model states (``datastore.query_dim``).
        hidden: MLP width. layers: hidden layers. dropout: after each hidden layer.
        use_hidden: read the states (else the distribution statistics only).
    """

    def __init__(self, dim: int, hidden: int = 128, layers: int = 2, dropout: float = 0.2,
                 use_hidden: bool = True):
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden), ("layers", layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RetrievalGate: {name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"RetrievalGate: dropout must be in [0, 1), got {dropout!r}")
        self.config = {"dim": dim, "hidden": hidden, "layers": layers, "dropout": dropout,
                       "use_hidden": bool(use_hidden)}
        width = (dim if use_hidden else 0) + STATS
        self.register_buffer("shift", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        blocks = []
        for i in range(layers):
            blocks += [nn.Linear(width if i == 0 else hidden, hidden), nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, 1))
        self.fitted_for: Optional[dict] = None   # {"fingerprint", "size", "dim", "k", "temperature"}
        self.eval()

    @property
    def dim(self) -> int:
        return self.config["dim"]

    def features(self, hidden: Tensor, logits: Tensor) -> Tensor:
        """The gate's inputs [B, F] (unstandardised)."""
        if hidden.dim() != 2 or hidden.shape[1] != self.dim:
            raise ValueError(f"RetrievalGate: it was built for states of width D={self.dim}, "
                             f"got hidden of shape {tuple(hidden.shape)}")
        stats = distribution_stats(logits).to(hidden.device)
        return torch.cat([hidden.detach().float(), stats], 1) if self.config["use_hidden"] \
            else stats

    def forward(self, inputs: Tensor) -> Tensor:
        """λ [B] in (0, 1) from ``features`` output."""
        return torch.sigmoid(self.net((inputs - self.shift) / self.scale).squeeze(1))

    def lam(self, hidden: Tensor, logits: Tensor) -> Tensor:
        """Predicted λ [B] of one decoding step (on the gate's device)."""
        device = self.shift.device
        return self.forward(self.features(hidden, logits).to(device))

    def check_datastore(self, datastore: Any) -> None:
        """ValueError unless fitted for ``datastore`` (same fingerprint and state width)."""
        f = self.fitted_for
        if f is None:
            raise ValueError("RetrievalGate: the gate is not fitted (fit_gate it on a dev set "
                             "of this datastore, or RetrievalGate.load a fitted one)")
        fp, d = getattr(datastore, "fingerprint", None), getattr(datastore, "query_dim",
                                                                 datastore.dim)
        # a store without a fingerprint (a torch.distributed ShardedDatastore) is matched
        # on its size and width only
        if fp != f["fingerprint"] or d != f["dim"] or len(datastore) != f["size"]:
            raise ValueError(f"RetrievalGate: fitted for datastore {f['fingerprint']} "
                             f"({f['size']} entries, states of D={f['dim']}), this one is "
                             f"{fp} ({len(datastore)} entries, D={d}); fit a gate for it")

    # ----------------------------------------------------------------------- persistence

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save weights, settings and what it was fitted for to a directory."""
        if self.fitted_for is None:
            raise ValueError("RetrievalGate.save: the gate is not fitted")
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(path, "gate.pt.tmp"))
        os.replace(os.path.join(path, "gate.pt.tmp"), os.path.join(path, "gate.pt"))
        with open(os.path.join(path, "gate.json.tmp"), "w") as f:
            json.dump({"config": self.config, "fitted_for": self.fitted_for}, f)
        os.replace(os.path.join(path, "gate.json.tmp"), os.path.join(path, "gate.json"))

    @classmethod
    def load(cls, path: Union[str, os.PathLike], datastore: Any = None) -> "RetrievalGate":
        """Load a gate saved with ``save``; with ``datastore``, check it was fitted for it."""
        path = os.fspath(path)
        with open(os.path.join(path, "gate.json")) as f:
            saved = json.load(f)
        gate = cls(**saved["config"])
        gate.load_state_dict(torch.load(os.path.join(path, "gate.pt"), weights_only=True))
        gate.fitted_for = saved["fitted_for"]
        gate.eval()
        if datastore is not None:
            gate.check_datastore(datastore)
        return gate


# --------------------------------------------------------------------------- training


@dataclass
class GateFeatures:
    """One retrieval pass over a dev set: per position the gold token, log p_model(y), the
    decoder's neighbours, the state [T, D] and ``distribution_stats`` [T, 5]; ``decoder``
    holds what the decoder was ({"fingerprint", "size", "dim", "k", "temperature"})."""
    targets: Tensor
    base_gold_logp: Tensor
    neighbours: Neighbours
    hidden: Tensor
    stats: Tensor
    decoder: dict


def decoder_record(decoder: KNNDecoder) -> dict:
    """What a gate records about the decoder (and datastore) it was fitted for."""
    ds = decoder.datastore
    return {"fingerprint": getattr(ds, "fingerprint", None), "size": len(ds),
            "dim": getattr(ds, "query_dim", ds.dim), "k": decoder.k,
            "temperature": float(decoder.temperature)}


def gate_features(hidden: Tensor, logits: Tensor, targets: Tensor, decoder: KNNDecoder
                  ) -> GateFeatures:
    """GateFeatures of positions whose states [T, D] and logits [T, V] are at hand (one
    search for all of them, no skipping)."""
    nbrs = decoder.retrieve(hidden)
    x = logits.float()
    gold = x.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(x, 1)
    return GateFeatures(targets, gold, nbrs, hidden.detach().float(), distribution_stats(x),
                        decoder_record(decoder))


def fit_gate(gate: RetrievalGate, feats: GateFeatures, **fit_kwargs) -> dict:
    """Train ``gate`` on ``feats`` (module docstring) with ``fit_gold_network`` (its
    keyword arguments: epochs, batch_size, lr, max_updates, valid_fraction, seed, progress);
    records what it was fitted for. Returns ``fit_gold_network``'s report."""
    rec = feats.decoder
    if rec["dim"] != gate.dim:
        raise ValueError(f"fit_gate: the gate reads states of D={gate.dim}, the features "
                         f"were collected with D={rec['dim']}")
    inputs = torch.cat([feats.hidden.float(), feats.stats.float()], 1) \
        if gate.config["use_hidden"] else feats.stats.float()
    gate.shift.copy_(inputs.mean(0))
    gate.scale.copy_(inputs.std(0).nan_to_num(1.0).clamp(min=1e-6))
    nb = feats.neighbours
    scores = count_weighted_scores(nb, rec["temperature"]).float()
    logits2, tokens2 = gold_two_column(feats.base_gold_logp, nb.tokens, feats.targets)
    zeros = torch.zeros_like(feats.targets)

    def nll(rows: Tensor, update: Optional[int]) -> Tensor:
        lam = gate(inputs[rows])
        return -ops.knn_gold_logprob(logits2[rows], zeros[rows], tokens2[rows],
                                     scores=scores[rows], temperature=rec["temperature"],
                                     lam=lam).mean()

    fit_kwargs.setdefault("desc", "gate")
    report = fit_gold_network(gate, nll, feats.targets.shape[0], **fit_kwargs)
    gate.fitted_for = dict(rec)
    return report


def collect_gate_features(model: nn.Module, dev_examples: Sequence, decoder: KNNDecoder, *,
                          hidden: Any = "ffn", batch_size: int = 16,
                          progress: bool = True) -> GateFeatures:
    """Teacher-forced pass over a dev set (HF model) + one search per position:
    GateFeatures on the CPU."""
    from tqdm.auto import tqdm
    from ..integrations import hf
    parts = []
    bar = tqdm(total=len(dev_examples), desc="dev retrieval", unit="ex", disable=not progress,
               leave=False)
    for tf in hf.teacher_forced(model, dev_examples, hidden=hidden, batch_size=batch_size):
        f = gate_features(tf.hidden, tf.logits, tf.targets, decoder)
        nb = f.neighbours
        parts.append([None if x is None else x.cpu() for x in
                      (f.targets, f.base_gold_logp, nb.scores, nb.tokens, nb.ids, nb.log_counts,
                       f.hidden, f.stats)])
        bar.update(tf.examples)
    bar.close()
    if not parts:
        raise ValueError("collect_gate_features: dev_examples is empty")
    y, gold, sc, tok, ids, lc, h, st = (None if c[0] is None else torch.cat(c)
                                        for c in zip(*parts))
    return GateFeatures(y, gold, Neighbours(sc, tok, ids, lc), h, st, decoder_record(decoder))
