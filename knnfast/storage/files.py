"""On-disk primitives shared by every knnfast store (datastores, kNN-KD teacher stores):
atomic JSON writes, fsync, copy-on-write memmaps and row-chunked streaming.

Public because stores outside ``knnfast.storage`` (``knnfast.methods.kd.TeacherStore``) and
the application build on them.
"""
from __future__ import annotations

import json
import math
import os
from typing import IO, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, os.PathLike]

#: Streaming granularity for memmapped keys (norms, copies, index fills); exact search streams
#: ``4 * CHUNK_BYTES`` at a time. Read at call time, so tests may shrink it.
CHUNK_BYTES = 256 << 20


class DatastoreError(ValueError):
    """A knnfast store or checkpoint on disk (datastore, sharded datastore, teacher store, INK
    checkpoint) is missing, truncated, corrupt, unwritable, locked by another writer or of an
    unknown format. The message names the file and ends with what to do."""


def check_store_path(path: str, owner: str) -> None:
    """Refuse a store path that is a symlink loop or an existing non-directory (a file)
    before anything reads or writes through it (``os.path.exists`` is False for a loop, and a
    build would otherwise rename its directory over the link)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise DatastoreError(f"{owner}: {path} is a dangling symbolic link; remove it or "
                                 f"use another path") from None
        return
    except OSError as e:  # ELOOP, ENOTDIR in a parent, EACCES
        raise DatastoreError(f"{owner}: cannot use {path} ({e.strerror}); use another path "
                             f"or fix the link (a symbolic link loop?)") from None
    if not os.path.isdir(path):
        raise DatastoreError(f"{owner}: {path} is a file, not a store directory; use another "
                             f"path (nothing was changed)")


def os_error(owner: str, action: str, path: str, error: Exception, fix: str) -> DatastoreError:
    """A DatastoreError for a failed file operation: what, where, the system's reason, and
    what to do (``fix``)."""
    reason = getattr(error, "strerror", None) or error
    return DatastoreError(f"{owner}: cannot {action} {path} ({reason}); {fix}")


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
    meta = load_meta(path, owner, resume_call)
    check_format_version(meta, os.path.join(path, "meta.json"), owner, format_version)
    problems = size_problems(path, meta, files, size_keys)
    if problems:
        raise DatastoreError(f"{owner}: {problems[0]}")
    return meta


def load_meta(path: str, owner: str, resume_call: str) -> dict:
    """The parsed meta.json of the store at ``path`` (DatastoreError when the path is not a
    store directory, or meta.json is missing, unreadable or not JSON)."""
    check_store_path(path, owner)
    meta_file = os.path.join(path, "meta.json")
    if not os.path.exists(meta_file):
        hint = (f"; an interrupted build exists at {path}.building (resume it with "
                f"{resume_call})" if os.path.exists(path + ".building") else "")
        raise DatastoreError(f"{owner}: {meta_file} not found{hint}")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except ValueError as e:
        raise DatastoreError(f"{owner}: {meta_file} is not valid JSON ({e}): the store is "
                             f"corrupt; rebuild it") from None
    except OSError as e:
        raise os_error(owner, "read", meta_file, e, "check its permissions") from None
    if not isinstance(meta, dict):
        raise DatastoreError(f"{owner}: {meta_file} is not a JSON object: the store is "
                             f"corrupt; rebuild it")
    return meta


def size_problems(path: str, meta: dict, files: Tuple[str, ...],
                  size_keys: Tuple[str, ...]) -> List[str]:
    """One sentence per file of ``files`` whose byte size differs from meta.json's (or that
    meta.json does not list): empty when every size matches."""
    meta_file = os.path.join(path, "meta.json")
    lacking = [k for k in ("bytes", *size_keys) if k not in meta]
    lacking += [f for f in files if f not in meta.get("bytes", {})]
    if lacking:
        return [f"{meta_file} lacks {lacking}: it is corrupt or not this kind of store; "
                f"rebuild it"]
    sizes = ", ".join(f"{k}={meta[k]}" for k in size_keys)
    problems = []
    for name in files:
        f = os.path.join(path, name)
        want = meta["bytes"][name]
        have = os.path.getsize(f) if os.path.exists(f) else None
        if have != want:
            problems.append(
                f"{f} has {have if have is not None else 'no'} bytes but meta.json says {want} "
                f"({sizes}): the store is truncated or was modified after it was built; "
                f"rebuild it")
    return problems


def check_format_version(meta: dict, file: str, owner: str, format_version: int) -> None:
    """A format version other than ``format_version`` is a DatastoreError saying whether a
    newer knnfast wrote the file (upgrade) or it is not a version at all (corrupt)."""
    have = meta.get("format_version")
    if have == format_version:
        return
    if isinstance(have, int) and not isinstance(have, bool) and have > format_version:
        raise DatastoreError(f"{owner}: {file} has format version {have}, written by a newer "
                             f"knnfast (this one reads {format_version}); upgrade knnfast to "
                             f"read it")
    raise DatastoreError(f"{owner}: {file} has format version {have!r}; this knnfast reads "
                         f"{format_version}: it is corrupt or not a knnfast store; rebuild it")
