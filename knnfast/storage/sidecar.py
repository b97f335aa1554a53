"""Per-datastore arrays beside the key/value files: the merge counts of a pruned datastore
and the key projection of a dimension-reduced one (``knnfast.storage.compact`` writes
them, ``Datastore.open`` loads them).

Files (NumPy ``.npy``, so each carries its own shape and dtype; written atomically):

    counts.npy           int64 [N]: how many entries of the unpruned store each entry stands for
    source_ids.npy       int64 [N]: each entry's id in the store it was pruned from
    projection.npy       float32 [D_in, D]: keys = (state - mean) @ projection
    projection_mean.npy  float32 [D_in]: zeros unless the projection is centred (l2 PCA)

meta.json ``extra`` says which are present: ``counts`` (the file name) and ``projection``
({"method", "input_dim", "file", "mean_file"}). A store whose meta names a file that is
missing or has the wrong shape does not open (``DatastoreError`` naming the file).
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .files import DatastoreError, fsync_file

COUNTS = "counts.npy"
SOURCE_IDS = "source_ids.npy"
PROJECTION = "projection.npy"
PROJECTION_MEAN = "projection_mean.npy"


def save_array(directory: str, name: str, array: np.ndarray) -> None:
    """Write ``directory/name`` atomically (temporary file, fsync, rename)."""
    tmp = os.path.join(directory, name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        fsync_file(f)
    os.replace(tmp, os.path.join(directory, name))


def load_array(directory: str, name: str, shape: Tuple[int, ...], owner: str) -> np.ndarray:
    """``directory/name`` checked to have ``shape`` (DatastoreError naming the file)."""
    file = os.path.join(directory, name)
    try:
        array = np.load(file)
    except (OSError, ValueError) as e:
        raise DatastoreError(f"{owner}: cannot read {file} (meta.json names it): {e}") from None
    if tuple(array.shape) != tuple(shape):
        raise DatastoreError(f"{owner}: {file} has shape {tuple(array.shape)}, the datastore "
                             f"needs {tuple(shape)}")
    return array


class Projection:
    """A linear map of the model's states [B, D_in] into a reduced key space [B, D]:
    ``(x - mean) @ matrix`` in float32, on the queries' device (copies cached per device)."""

    def __init__(self, matrix: Tensor, mean: Tensor, method: str):
        self.matrix = matrix.detach().float().cpu().contiguous()
        self.mean = mean.detach().float().cpu().contiguous()
        self.method = method
        self._on: Dict[torch.device, Tuple[Tensor, Tensor]] = {}

    @property
    def input_dim(self) -> int:
        return self.matrix.shape[0]

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def __call__(self, x: Tensor) -> Tensor:
        if x.device not in self._on:
            self._on[x.device] = (self.matrix.to(x.device), self.mean.to(x.device))
        matrix, mean = self._on[x.device]
        return (x.detach().float() - mean) @ matrix

    def save(self, directory: str) -> dict:
        """Write the two files; returns the meta.json ``extra["projection"]`` entry."""
        save_array(directory, PROJECTION, self.matrix.numpy())
        save_array(directory, PROJECTION_MEAN, self.mean.numpy())
        return {"method": self.method, "input_dim": self.input_dim, "file": PROJECTION,
                "mean_file": PROJECTION_MEAN}

    @classmethod
    def load(cls, directory: str, info: dict, dim: int, owner: str) -> "Projection":
        d_in = int(info["input_dim"])
        matrix = load_array(directory, info["file"], (d_in, dim), owner)
        mean = load_array(directory, info["mean_file"], (d_in,), owner)
        return cls(torch.from_numpy(matrix), torch.from_numpy(mean), info["method"])


def load_sidecars(path: str, meta: dict, owner: str = "Datastore.open"
                  ) -> Tuple[Optional[Tensor], Optional[Projection]]:
    """(counts [N] int64 or None, Projection or None) of the datastore at ``path``."""
    extra = meta.get("extra") or {}
    counts = projection = None
    if extra.get("counts"):
        array = load_array(path, extra["counts"], (int(meta["size"]),), owner)
        counts = torch.from_numpy(array.astype(np.int64))
        if counts.numel() and int(counts.min()) < 1:
            raise DatastoreError(f"{owner}: {os.path.join(path, extra['counts'])} holds a "
                                 f"count below 1")
    if extra.get("projection"):
        projection = Projection.load(path, extra["projection"], int(meta["dim"]), owner)
    return counts, projection
