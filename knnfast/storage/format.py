"""The datastore's on-disk format (version 1), a directory::

    keys            N x D raw little-endian (float16 by default; bfloat16 stored as its bits)
    values          N int32 token ids
    key_sq_norms    N float32 |k|^2, computed once at finalize (l2/cos search reuse it)
    meta.json       N, D, dtypes, vocab size, metric, captured hidden state, model id,
                    created-at, format version and the byte size of every file
    index.faiss     optional FAISS index (+ index.json describing it)
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from .files import memmap

FORMAT_VERSION = 1
FILES = ("keys", "values", "key_sq_norms")
KEY_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: numpy dtype each key dtype is stored as (bfloat16 as its raw 16 bits)
STORAGE_DTYPES = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}
VALUE_BYTES = 4  # int32 token ids


def dtype_name(dtype: torch.dtype) -> str:
    """The meta.json name of a key dtype."""
    for name, dt in KEY_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"key_dtype must be one of {sorted(KEY_DTYPES)}, got {dtype}")


def key_row_bytes(dim: int, key_dtype: torch.dtype) -> int:
    """Bytes of one stored key."""
    return dim * torch.empty((), dtype=key_dtype).element_size()


def memmap_keys(directory: str, n: int, dim: int, key_dtype: torch.dtype) -> Tensor:
    """The ``keys`` file of a datastore (or build) directory as an [n, dim] tensor."""
    keys = memmap(os.path.join(directory, "keys"), STORAGE_DTYPES[key_dtype], (n, dim))
    return keys.view(torch.bfloat16) if key_dtype == torch.bfloat16 else keys


def key_bytes(keys: Tensor) -> bytes:
    """Raw little-endian bytes of a contiguous CPU key block in its stored dtype."""
    return keys.view(torch.uint16 if keys.element_size() == 2 else torch.int32).numpy().tobytes()


def sq_norms(keys: Tensor) -> Tensor:
    """fp32 |k|^2 of a key block (the kernels' accumulation precision)."""
    k = keys.float()
    return (k * k).sum(1)
