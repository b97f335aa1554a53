"""The output layer of an HF model as (weight, bias), and a forward pass that returns the
layer's input instead of computing the logits: what a fused linear loss
(``knnfast.knn_kd_linear_loss``) needs to train without the [B, L, V] logits.

    layer = output_layer(model)                 # ValueError when the logits are not h W^T + b
    hidden, outputs = layer.forward(model, **inputs)   # hidden [B, L, D]; no logits computed
    loss = knnfast.knn_kd_linear_loss(hidden.flatten(0, 1), layer.weight, labels.flatten(),
                                      ..., bias=layer.bias(model))
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import torch
from torch import Tensor, nn

from .capture import lm_head, probe_forward

# Encoder-decoders of the BART family (Marian, mBART, Pegasus, ...) add this buffer to the
# LM head's output outside the head; it is part of the output layer's bias.
EXTRA_BIAS = "final_logits_bias"

# Per model: its OutputLayer, or the error that says why it has none (kept, so automatic
# fusion does not re-run the probe at every training step of a model that cannot fuse).
_LAYERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class OutputLayer:
    """logits = hidden @ weight.T + bias(model), hidden = the input of ``module``, laid out
    like the logits (checked once per model by a probe forward pass)."""
    module: nn.Linear
    extra_bias: Optional[str]   # name of a model attribute added to the head's output

    @property
    def weight(self) -> Tensor:
        return self.module.weight

    def bias(self, model: nn.Module) -> Optional[Tensor]:
        """The head's own bias plus the model's extra bias (read at every call: resizing
        the vocabulary replaces the buffer)."""
        bias = self.module.bias
        if self.extra_bias is None:
            return bias
        extra = getattr(unwrap(model), self.extra_bias).reshape(-1)
        return extra if bias is None else bias + extra

    def forward(self, model: nn.Module, **inputs: Any) -> Tuple[Tensor, Any]:
        """``model(**inputs)`` with the head fed an empty slice of its input, so no logits are
        computed (the model's output holds [..., 0, V] logits). Returns (the head's input,
        [..., D] aligned with the logits' positions, carrying the autograd graph; the model's
        output). ``model`` may be a DistributedDataParallel wrapper: its forward runs whole,
        so gradient synchronisation is set up as usual."""
        seen = []

        def keep_input(module, args):
            seen.append(args[0])
            return (args[0][..., :0, :],) + tuple(args[1:])

        handle = self.module.register_forward_pre_hook(keep_input)
        try:
            outputs = model(**inputs)
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"{type(unwrap(model)).__name__}: the output layer ran {len(seen)} "
                             f"times in one forward pass; use the unfused loss (fused=False)")
        return seen[0], outputs


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DistributedDataParallel wrapper (``.module``), else ``model``."""
    return getattr(model, "module", model)


def output_layer(model: nn.Module) -> OutputLayer:
    """The output layer of ``model`` (or of the model a DDP wrapper holds), found by
    ``lm_head`` and checked on a probe forward pass: the head must be a linear map whose
    input has the logits' layout, and the logits must be its output, or its output plus the
    model's ``final_logits_bias``. Anything else (soft-capping, a time-major or flattened
    head input, a quantised head) is a ValueError naming the reason."""
    model = unwrap(model)
    if model not in _LAYERS:
        try:
            _LAYERS[model] = _checked_layer(model)
        except Exception as e:
            _LAYERS[model] = e
    found = _LAYERS[model]
    if isinstance(found, Exception):
        raise found.with_traceback(None)
    return found


def _checked_layer(model: nn.Module) -> OutputLayer:
    name = type(model).__name__
    head = lm_head(model)
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or not weight.is_floating_point():
        raise ValueError(f"{name}: the module producing the logits ({type(head).__name__}) is "
                         f"not a floating-point nn.Linear; use the unfused loss (fused=False)")
    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    try:
        logits = probe_forward(model).logits
    finally:
        handle.remove()
    x, out = seen[-1]
    if x.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"{name}: the output layer's input {tuple(x.shape)} is not laid out like "
                         f"the logits {tuple(logits.shape)}; use the unfused loss (fused=False)")
    with torch.no_grad():
        linear = torch.nn.functional.linear(x, weight, head.bias)
    if not torch.allclose(linear, out, rtol=1e-4, atol=1e-5):
        raise ValueError(f"{name}: {type(head).__name__} is not x W^T + b; use the unfused "
                         f"loss (fused=False)")
    # the extra bias first: a zero final_logits_bias (a fresh model) may be loaded later
    extra = getattr(model, EXTRA_BIAS, None)
    if isinstance(extra, Tensor) and torch.equal(out + extra, logits):
        return OutputLayer(head, EXTRA_BIAS)
    if torch.equal(out, logits):
        return OutputLayer(head, None)
    raise ValueError(f"{name}: the logits are not the output layer's x W^T + b (e.g. "
                     f"soft-capping or scaling after the head); use the unfused loss "
                     f"(fused=False)")
