"""kNN inside ``model.generate``: a forward hook that mixes kNN into the model's own output
(what ``generate`` uses), a LogitsProcessor form for hand-built processor lists, and a model
wrapper whose ``forward`` returns kNN log-probs. Needs transformers at import."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ...methods.decoding import KNNDecoder
from ...ops.settings import deferred_checks
from .capture import HiddenCapture, HiddenSpec


# --------------------------------------------------------------------------- (c) generate


def _logits_processor_base():
    from transformers import LogitsProcessor
    return LogitsProcessor


class KNNLogitsProcessor(_logits_processor_base()):
    """A transformers LogitsProcessor that replaces each step's scores by the kNN mixture.

    Greedy search hands it logits, beam search log-softmaxed logits; log_softmax is
    idempotent, so the mixture is the same. Rows are batch x beam in the model's order,
    the same order in which the captured hidden states arrive.
    """

    def __init__(self, decoder: KNNDecoder, capture: HiddenCapture):
        self.decoder = decoder
        self.capture = capture

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        nbrs = self.decoder.retrieve_step(self.capture.step(), scores)
        logp = self.decoder.interpolate(scores, nbrs)
        # transformers runs its own processors (min length, bad words, forced EOS, ...)
        # before user ones: what they forbade (-inf) must stay forbidden after the mixture.
        # Off the k neighbour tokens the mixture of a -inf score is already -inf, so only
        # those k slots per row need the fix (no extra pass over [B, V]).
        tok = nbrs.tokens.to(scores.device)
        slot = tok.clamp(min=0)
        forbidden = torch.isneginf(scores.gather(1, slot)) & (tok >= 0)
        logp.scatter_(1, slot, logp.gather(1, slot).masked_fill_(forbidden, float("-inf")))
        return logp


@contextmanager
def knn_processor(model: nn.Module, decoder: KNNDecoder, hidden: HiddenSpec = "ffn"):
    """Yields a KNNLogitsProcessor wired to a hidden-state hook on ``model``."""
    with HiddenCapture(model, hidden) as cap:
        yield KNNLogitsProcessor(decoder, cap)


@contextmanager
def knn_logits(model: nn.Module, decoder: KNNDecoder, hidden: HiddenSpec = "ffn"):
    """While active, ``model``'s output carries the kNN log-probs at its newest position: a
    forward hook mixes them in before ``generate`` sees the logits, so transformers' own
    processors (no-repeat n-grams, min length, bad words, forced tokens, ...) act on the
    mixture, as in kNN-MT implementations that mix inside the model, instead of the mixture
    being taken over a model distribution they already renormalised."""
    with HiddenCapture(model, hidden) as cap:
        def mix(module, args, output):
            logits = getattr(output, "logits", None)
            if logits is None or logits.dim() != 3:
                return output
            mixed = decoder(cap.step(), logits[:, -1, :])[:, None, :]
            output.logits = mixed if logits.shape[1] == 1 else \
                torch.cat([logits[:, :-1, :].float(), mixed], 1)
            return output
        handle = model.register_forward_hook(mix)
        try:
            yield
        finally:
            handle.remove()


def generate(model: nn.Module, decoder: Optional[KNNDecoder], *args, hidden: HiddenSpec = "ffn",
             **kwargs) -> Any:
    """``model.generate(*args, **kwargs)`` with kNN mixed into every step (greedy, beam,
    sampling; causal LMs and encoder-decoders; any batch). ``decoder=None`` = bare model.
    The mixture replaces the model's own next-token logits (``knn_logits``), so every
    processor and warper of ``generate`` (and a user ``logits_processor``) sees it."""
    if decoder is None:
        return model.generate(*args, **kwargs)
    # CUDA: the kNN ops of the steps report bad values once, at the end (no host sync per step)
    with knn_logits(model, decoder, hidden), deferred_checks():
        return model.generate(*args, **kwargs)


class KNNModel(nn.Module):
    """Wrap a model so that ``forward`` returns kNN log-probs as ``logits`` and
    ``generate`` decodes with kNN. Everything else is delegated to the model."""

    def __init__(self, model: nn.Module, decoder: KNNDecoder, hidden: HiddenSpec = "ffn"):
        super().__init__()
        self.model = model
        self.decoder = decoder
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        with HiddenCapture(self.model, self.hidden) as cap:
            out = self.model(*args, **kwargs)
            h = cap.last
        B, T, V = out.logits.shape
        h = h[:, -T:, :]
        out.logits = self.decoder(h.reshape(B * T, -1), out.logits.reshape(B * T, V)).view(B, T, V)
        return out

    def generate(self, *args, **kwargs):
        return generate(self.model, self.decoder, *args, hidden=self.hidden, **kwargs)

    @property
    def config(self):
        return self.model.config
