"""On-disk primitives shared by every knnfast store (datastores, kNN-KD teacher stores):
atomic JSON writes, fsync, copy-on-write memmaps and row-chunked streaming.

Public because stores outside ``knnfast.storage`` (``knnfast.methods.kd.TeacherStore``) and
the application build on them.
"""
from __future__ import annotations

import json
import math
import os
from typing import IO, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]

#: Streaming granularity for memmapped keys (norms, copies, index fills); exact search streams
#: ``4 * CHUNK_BYTES`` at a time. Read at call time, so tests may shrink it.
CHUNK_BYTES = 256 << 20


class DatastoreError(ValueError):
    """A datastore on disk is missing, truncated, inconsistent or of an unknown format."""


def fsync_file(f: IO) -> None:
    """Flush a file object and fsync it (its bytes are on disk when this returns)."""
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """fsync a directory, so that renames inside it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_write_json(path: str, obj: dict) -> None:
    """Write JSON to path atomically: temp file, fsync, rename, fsync the directory."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        fsync_file(f)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def memmap(path: str, np_dtype, shape: Tuple[int, ...]) -> Tensor:
    """Copy-on-write memmap as a tensor: pages are read lazily, nothing is written back."""
    if math.prod(shape) == 0:
        return torch.from_numpy(np.zeros(shape, dtype=np_dtype))
    return torch.from_numpy(np.memmap(path, dtype=np_dtype, mode="c", shape=shape))


def row_chunks(n: int, row_bytes: int, chunk_bytes: Optional[int] = None
               ) -> Iterator[Tuple[int, int]]:
    """(start, end) row ranges of about ``chunk_bytes`` (default ``CHUNK_BYTES``) each."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    step = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def progress_bar(total: Optional[int], desc: str, enabled: bool, unit: str = "keys"):
    """A tqdm bar (disabled unless ``enabled``) that does not stay on screen."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                dynamic_ncols=True, leave=False)


def read_checked_meta(path: str, owner: str, format_version: int, files: Tuple[str, ...],
                      size_keys: Tuple[str, ...], resume_call: str) -> dict:
    """meta.json of a finished store at ``path``, after checking its format version and every
    file's byte size against it (``DatastoreError`` naming the file, actual and expected
    bytes). ``size_keys`` are the meta entries quoted in that message; ``resume_call`` is how
    an interrupted build found next to a missing store would be resumed."""
    meta_file = os.path.join(path, "meta.json")
    if not os.path.exists(meta_file):
        hint = (f"; an interrupted build exists at {path}.building (resume it with "
                f"{resume_call})" if os.path.exists(path + ".building") else "")
        raise DatastoreError(f"{owner}: {meta_file} not found{hint}")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except ValueError as e:
        raise DatastoreError(f"{owner}: {meta_file} is not valid JSON ({e})") from None
    if meta.get("format_version") != format_version:
        raise DatastoreError(f"{owner}: {path} has format version "
                             f"{meta.get('format_version')!r}; this knnfast reads {format_version}")
    sizes = ", ".join(f"{k}={meta[k]}" for k in size_keys)
    for name in files:
        f = os.path.join(path, name)
        want = meta["bytes"][name]
        have = os.path.getsize(f) if os.path.exists(f) else None
        if have != want:
            raise DatastoreError(
                f"{owner}: {f} has {have if have is not None else 'no'} bytes but meta.json "
                f"says {want} ({sizes}): the store is truncated or was modified after it was "
                f"built")
    return meta
