"""The learned alternative to a datastore of Xu et al., "Why do Nearest Neighbor Language
Models Work?" (§4): several output embeddings per word type."""
from __future__ import annotations

import torch
from torch import nn

from ..defaults import KNN_LM

class MultiEmbeddingSoftmax(nn.Module):
    """The learned alternative to a datastore (Xu et al., "Why do Nearest Neighbor Language
    Models Work?", §4): n output embeddings per word type, a softmax over all V·n of them,
    the probability of a word the sum over its n embeddings:

        log p(v | h) = logsumexp_i (h · w_{v,i} + b_{v,i}) - logsumexp_{u,i} (h · w_{u,i} + b_{u,i})

    Trained on frozen features (the "att" or "ffn" state of a fixed model) with ``fit``,
    optionally through the interpolated loss -log((1 - λ) p_LM(y) + λ p(y)).
    """

    def __init__(self, d_model: int, vocab_size: int, n: int = 2, init_from: torch.Tensor = None):
        super().__init__()
        if n < 1:
            raise ValueError(f"MultiEmbeddingSoftmax: n must be >= 1, got {n}")
        self.n, self.vocab_size = n, vocab_size
        self.weight = nn.Parameter(torch.randn(vocab_size * n, d_model) * d_model ** -0.5)
        self.bias = nn.Parameter(torch.zeros(vocab_size * n))
        if init_from is not None:  # start from the LM's output embedding (+ small noise)
            with torch.no_grad():
                self.weight.copy_(init_from.repeat_interleave(n, 0)
                                  + 1e-3 * torch.randn_like(self.weight))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """log p(v | h): [T, D] -> [T, V] float32."""
        z = torch.nn.functional.linear(hidden.float(), self.weight, self.bias)
        per_word = torch.logsumexp(z.view(-1, self.vocab_size, self.n), dim=-1)
        return per_word - torch.logsumexp(z, dim=-1, keepdim=True)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor,
             base_gold_logp: torch.Tensor = None, lam: float = KNN_LM.lam) -> torch.Tensor:
        """Mean NLL of targets; with ``base_gold_logp`` [T] (the LM's log p(y)), the
        interpolated loss -log((1 - lam) p_LM(y) + lam p(y))."""
        gold = self.forward(hidden).gather(1, targets[:, None].long()).squeeze(1)
        if base_gold_logp is None:
            return -gold.mean()
        if not 0.0 < lam < 1.0:
            raise ValueError(f"lam must be in (0, 1) for the interpolated loss, got {lam}")
        mixed = torch.logaddexp(torch.log1p(torch.tensor(-lam)) + base_gold_logp.float(),
                                torch.log(torch.tensor(lam)) + gold)
        return -mixed.mean()

    def fit(self, hidden: torch.Tensor, targets: torch.Tensor, *, base_gold_logp=None,
            lam: float = KNN_LM.lam, epochs: int = 5, batch_size: int = 256, lr: float = 1e-3,
            seed: int = 0) -> list:
        """Adam on frozen features; returns the loss of every update."""
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        hidden, targets = hidden.detach(), targets.detach()
        losses = []
        for _ in range(epochs):
            order = torch.randperm(hidden.shape[0], generator=gen)
            for s in range(0, len(order), batch_size):
                rows = order[s:s + batch_size]
                base = None if base_gold_logp is None else base_gold_logp[rows]
                loss = self.loss(hidden[rows], targets[rows], base, lam)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

