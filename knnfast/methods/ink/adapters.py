"""INK (2023) adapters for HF models: bottleneck adapters after every transformer block, and
the output-projection-only (OPL) baseline of the meta-optimizer paper.

    from knnfast.methods import ink
    adapters = ink.add_adapters(model, size=64)     # only adapters train from here on
    ...                                             # training loop (ink.train_ink / ink_loss)
    ink.remove_adapters(model)                      # back to the original model

Each adapter maps a block's output x to x + Dropout(up(ReLU(down(LayerNorm(x))))) (INK's
released code, after each FFN block, post-LN, encoder and decoder). `up` starts at zero, so a
freshly adapted model computes exactly what the original model computed.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

ADAPTERS_ATTR = "knnfast_adapters"


class Adapter(nn.Module):
    """LayerNorm -> Linear(d, size) -> ReLU -> Linear(size, d) -> Dropout, added residually."""

    def __init__(self, d_model: int, size: int = 64, dropout: float = 0.1):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, size)
        self.up = nn.Linear(size, d_model)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.up(torch.relu(self.down(self.norm(x)))))


def transformer_blocks(model: nn.Module) -> List[nn.Module]:
    """Every transformer block of the model: the encoder's and the decoder's (the ModuleLists
    of identical modules holding most parameters under each), found without a model list."""
    from ...integrations.hf import decoder_blocks
    blocks = list(decoder_blocks(model))
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        lists = [m for m in model.get_encoder().modules()
                 if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1]
        if lists:
            blocks = list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))) + blocks
    return blocks


def _hidden_size(model: nn.Module) -> int:
    cfg = model.config
    for name in ("d_model", "hidden_size", "n_embd"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise ValueError("cannot tell the model width: config has no d_model / hidden_size / n_embd")


def add_adapters(model: nn.Module, size: int = 64, dropout: float = 0.1,
                 freeze: bool = True) -> nn.ModuleList:
    """Insert an Adapter after every transformer block (a forward hook rewrites the block's
    hidden-state output) and, with ``freeze``, make only adapter parameters trainable. The
    adapters live in ``model.knnfast_adapters`` (saved and moved with the model)."""
    if hasattr(model, ADAPTERS_ATTR):
        raise ValueError("add_adapters: this model already has knnfast adapters")
    if size <= 0:
        raise ValueError(f"add_adapters: size must be > 0, got {size}")
    blocks = transformer_blocks(model)
    d = _hidden_size(model)
    param = next(model.parameters())
    adapters = nn.ModuleList(Adapter(d, size, dropout) for _ in blocks).to(param.device, param.dtype)
    if freeze:
        for p in model.parameters():
            p.requires_grad_(False)
    setattr(model, ADAPTERS_ATTR, adapters)
    handles = []
    for block, adapter in zip(blocks, adapters):
        def hook(module, args, output, adapter=adapter):
            if isinstance(output, tuple):
                return (adapter(output[0]),) + output[1:]
            return adapter(output)
        handles.append(block.register_forward_hook(hook))
    adapters._knnfast_handles = handles
    return adapters


def remove_adapters(model: nn.Module, unfreeze: bool = True) -> None:
    """Remove the adapters (and their hooks); ``unfreeze`` makes the model trainable again."""
    adapters = getattr(model, ADAPTERS_ATTR, None)
    if adapters is None:
        raise ValueError("remove_adapters: the model has no knnfast adapters")
    for h in adapters._knnfast_handles:
        h.remove()
    delattr(model, ADAPTERS_ATTR)
    if unfreeze:
        for p in model.parameters():
            p.requires_grad_(True)


def output_projection_only(model: nn.Module) -> List[nn.Parameter]:
    """OPL baseline: freeze everything but the output projection (and its bias). A projection
    tied to the input embeddings is untied first, so training it leaves the embeddings as they
    were. Returns the trainable parameters."""
    from ...integrations.hf import lm_head
    head = lm_head(model)  # the module producing the logits (FSMT: not get_output_embeddings)
    if any(isinstance(m, nn.Embedding) and m.weight is head.weight for m in model.modules()):
        head.weight = nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [head.weight]
    if getattr(head, "bias", None) is not None:
        trainable.append(head.bias)
    # Marian / BART keep an extra output bias as a buffer; it stays fixed (not a parameter)
    for p in trainable:
        p.requires_grad_(True)
    return trainable

