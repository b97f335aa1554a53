"""INK (2023): adapters (``adapters``), the fused loss (``loss``) and the training loop with
per-epoch datastore refresh (``train``)."""
from .adapters import (ADAPTERS_ATTR, Adapter, add_adapters, output_projection_only,
                       remove_adapters, transformer_blocks)
from .loss import ink_loss
from .train import train_ink

__all__ = ["ADAPTERS_ATTR", "Adapter", "add_adapters", "remove_adapters", "transformer_blocks",
           "output_projection_only", "ink_loss", "train_ink"]
