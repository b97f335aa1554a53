"""Where datastore entries came from: ``provenance.npy`` ([S, 2] int64: example id, first
entry of that example's target positions), written by ``Datastore.set_provenance`` and read by
``Datastore.provenance`` (the methods are the API; these are their file and lookup rules)."""
from __future__ import annotations

import os
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from .files import DatastoreError, fsync_file

FILE = "provenance.npy"


def write_table(directory: str, entries: int, example_ids: Tensor, lengths: Tensor) -> int:
    """Writes the table of ``entries`` entries (``lengths[s]`` target positions of example
    ``example_ids[s]``, in order) atomically into ``directory``; returns its row count."""
    example_ids = torch.as_tensor(example_ids, dtype=torch.int64).reshape(-1)
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    if example_ids.shape != lengths.shape or int(lengths.sum()) != entries \
            or bool((lengths < 0).any()):
        raise ValueError(f"Datastore.set_provenance: {lengths.numel()} example lengths "
                         f"summing to {int(lengths.sum())} for {entries} entries")
    starts = torch.cumsum(lengths, 0) - lengths
    table = torch.stack([example_ids, starts], 1).numpy()
    tmp = os.path.join(directory, FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
        fsync_file(f)
    os.replace(tmp, os.path.join(directory, FILE))
    return int(len(table))


def read_table(directory: str, info: dict) -> Tensor:
    """The table that meta.json's ``extra.provenance`` (``info``) describes, shape-checked."""
    file = os.path.join(directory, info["file"])
    try:
        table = torch.from_numpy(np.load(file))
    except (OSError, ValueError) as e:
        raise DatastoreError(f"Datastore.provenance: cannot read {file}: {e}") from None
    if tuple(table.shape) != (info["examples"], 2):
        raise DatastoreError(f"Datastore.provenance: {file} has shape {tuple(table.shape)}, "
                             f"meta.json says [{info['examples']}, 2]")
    return table


def locate(table: Tensor, entries: int, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """(example index, target position) of entry ids (any shape; -1 -> (-1, -1))."""
    ids = torch.as_tensor(ids)
    flat = ids.reshape(-1).to("cpu", torch.int64)
    if flat.numel() and (int(flat.max()) >= entries or int(flat.min()) < -1):
        raise ValueError(f"Datastore.provenance: ids must lie in [-1, {entries}), got "
                         f"min {int(flat.min())} max {int(flat.max())}")
    row = torch.searchsorted(table[:, 1].contiguous(), flat.clamp(min=0), right=True) - 1
    example = torch.where(flat >= 0, table[row, 0], -1)
    position = torch.where(flat >= 0, flat - table[row, 1], -1)
    return example.reshape(ids.shape), position.reshape(ids.shape)
