"""Retrieval skipping: decide per row whether a decoding step searches the datastore at all.

    skip = RetrievalSkip(confidence=0.9)                  # model already sure: no search
    skip = RetrievalSkip(gate=gate, gate_threshold=0.3)   # He et al. 2021's learned gate
    dec = knnfast.KNNDecoder(ds, skip=skip)               # any decoder takes ``skip=``
    ...
    dec.skip_stats.fraction_rows                          # share of rows that did not search

A row is skipped when the model's max probability (``knnfast.softmax_stats``: one read of the
logits) is >= ``confidence`` or when the gate's predicted λ is < ``gate_threshold`` (either
rule suffices). Skipped rows cost no search:
only the retrieving rows go to the datastore; the others get no neighbours, which every
decoder mixes as λ = 0 (the model's log-probs). Deciding needs the row count on the host:
one host sync per step on CUDA (the ``nonzero``), the price of searching fewer rows, plus one
for ``softmax_stats``' value check while its CUDA path is an ATen composition.

The gate itself (``RetrievalGate``, its features, fit and persistence) is in
``knnfast.methods.gate``; this module only needs its ``lam(hidden, logits)`` and
``check_datastore(ds)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .. import ops


def max_prob(logits: Tensor) -> Tensor:
    """The model's largest probability per row, [B] float32, from ``knnfast.softmax_stats``
    (one read of the logits, no [B, V] temporary). NaN or +inf logits: ValueError."""
    return ops.softmax_stats(logits, 1, entropy=False)[1][:, 0].exp()


class RetrievalSkip:
    """Which rows of a step skip retrieval (see the module docstring).

    Args:
        confidence: skip rows whose max model probability is >= this, in (0, 1]
            (1.0 skips only rows the model is certain of). None: off.
        gate: a fitted ``knnfast.methods.gate.RetrievalGate``. None: off.
        gate_threshold: skip rows whose gate λ is below this, in [0, 1].
    """

    def __init__(self, confidence: Optional[float] = None, gate: Any = None,
                 gate_threshold: float = 0.5):
        if confidence is not None and (isinstance(confidence, bool)
                                       or not isinstance(confidence, (int, float))
                                       or not 0.0 < confidence <= 1.0):
            raise ValueError(f"RetrievalSkip: confidence must be a float in (0, 1] (skip rows "
                             f"whose max model probability reaches it) or None, got "
                             f"{confidence!r}")
        if isinstance(gate_threshold, bool) or not isinstance(gate_threshold, (int, float)) \
                or not 0.0 <= gate_threshold <= 1.0:  # NaN fails the range test too
            raise ValueError(f"RetrievalSkip: gate_threshold must be a float in [0, 1], got "
                             f"{gate_threshold!r}")
        if gate is not None and not callable(getattr(gate, "lam", None)):
            raise ValueError(f"RetrievalSkip: gate must be a knnfast.methods.gate.RetrievalGate, "
                             f"got {type(gate).__name__}")
        self.confidence = None if confidence is None else float(confidence)
        self.gate = gate
        self.gate_threshold = float(gate_threshold)

    def check_datastore(self, datastore: Any) -> None:
        """ValueError unless the gate was fitted for ``datastore`` (no gate: nothing to check)."""
        if self.gate is not None:
            self.gate.check_datastore(datastore)

    def retrieve_mask(self, hidden: Tensor, logits: Tensor) -> Tensor:
        """[B] bool on the logits' device: True where the row searches the datastore."""
        keep = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if self.confidence is not None:
            keep &= max_prob(logits) < self.confidence
        if self.gate is not None:
            with torch.no_grad():
                keep &= ~(self.gate.lam(hidden, logits).to(keep.device) < self.gate_threshold)
        return keep

    def __repr__(self) -> str:
        return (f"RetrievalSkip(confidence={self.confidence}, gate={self.gate is not None}, "
                f"gate_threshold={self.gate_threshold})")


@dataclass
class SkipStats:
    """Counters of the steps a decoder ran with the model's logits at hand (``__call__``,
    ``retrieve_step``): ``steps`` / ``rows`` seen, ``skipped_steps`` (no row
    searched) and ``skipped_rows``. ``reset()`` zeroes them."""
    steps: int = 0
    rows: int = 0
    skipped_steps: int = 0
    skipped_rows: int = 0

    def add(self, rows: int, retrieved: int) -> None:
        self.steps += 1
        self.rows += rows
        self.skipped_rows += rows - retrieved
        self.skipped_steps += int(retrieved == 0 and rows > 0)

    @property
    def fraction_rows(self) -> float:
        """Share of rows that skipped retrieval (0.0 before any step)."""
        return self.skipped_rows / self.rows if self.rows else 0.0

    @property
    def fraction_steps(self) -> float:
        """Share of steps in which no row searched (0.0 before any step)."""
        return self.skipped_steps / self.steps if self.steps else 0.0

    def reset(self) -> None:
        self.steps = self.rows = self.skipped_steps = self.skipped_rows = 0
