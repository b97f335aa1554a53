"""Sharded datastores: a directory of ordinary datastores plus ``manifest.json`` (DESIGN §9).

Layout::

    <path>/manifest.json     written last: format version, N, D, dtypes, vocab size, metric,
                             provenance fields (hidden, model id, extra, created-at) and the
                             shards in global-id order, each with its directory, global id
                             offset, size and the byte size of every file
    <path>/shard-00000/      an ordinary knnfast datastore (``Datastore.open`` reads it alone)
    <path>/shard-00001/ ...

Global id = shard offset + id inside the shard; the shards' order is the global order, so the
concatenation of the shards is the datastore a single process would have built.

``ShardedStore`` searches a contiguous run of shards (all of them for ``Datastore.open`` of a
sharded directory; one rank's share in ``knnfast.distributed``) and merges the per-shard top-k
lists with ``knnfast.topk.merge_topk``; every shard's ids are larger than the previous
shard's, so ties go to the smaller global id and the result equals single-store search bitwise.
"""
from __future__ import annotations

import os
import time
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..topk import merge_topk
from .datastore import Datastore, MetaFields
from .files import (DatastoreError, PathLike, check_format_version, check_store_path,
                    fsync_write_json, read_checked_meta)
from .format import FILES, FORMAT_VERSION

MANIFEST = "manifest.json"
SHARDED_FORMAT_VERSION = 1
#: meta.json fields every shard must agree on (and the manifest repeats)
SHARED_FIELDS = ("dim", "key_dtype", "value_dtype", "vocab_size", "metric", "hidden", "model_id")
#: meta.json extra entries that describe one shard only (never copied into the manifest)
PER_SHARD_EXTRA = ("shard", "provenance")


def shard_name(index: int) -> str:
    """Directory name of shard ``index`` inside a sharded datastore."""
    return f"shard-{index:05d}"


def is_sharded(path: PathLike) -> bool:
    """True when ``path`` holds a committed sharded datastore (its manifest exists)."""
    return os.path.exists(os.path.join(os.fspath(path), MANIFEST))


def unfinished_sharded(path: PathLike) -> bool:
    """True when ``path`` has shard directories but no manifest: a build that did not commit."""
    path = os.fspath(path)
    return (os.path.isdir(path) and not is_sharded(path)
            and any(n.startswith("shard-") for n in os.listdir(path)))


# --------------------------------------------------------------------------- manifest


def write_manifest(path: PathLike, shard_dirs: Sequence[str]) -> dict:
    """Commit a sharded datastore: check the finished shards ``shard_dirs`` (names inside
    ``path``, in global-id order) agree, then write ``manifest.json`` atomically. Call it only
    after every shard is finalized: the manifest's existence is what makes the store whole."""
    path = os.fspath(path)
    if not shard_dirs:
        raise ValueError("write_manifest: shard_dirs is empty")
    metas = [_shard_meta(path, i, name) for i, name in enumerate(shard_dirs)]
    first = metas[0]
    for i, meta in enumerate(metas):
        diff = {f: (first.get(f), meta.get(f)) for f in SHARED_FIELDS
                if first.get(f) != meta.get(f)}
        if diff:
            raise DatastoreError(f"write_manifest: shard {i} ({shard_dirs[i]}) differs from "
                                 f"shard 0 in {diff}")
    shards, offset = [], 0
    for name, meta in zip(shard_dirs, metas):
        shards.append({"path": name, "offset": offset, "size": meta["size"],
                       "bytes": meta["bytes"], "checksums": meta.get("checksums")})
        offset += meta["size"]
    manifest = {f: first.get(f) for f in SHARED_FIELDS}
    manifest.update(format_version=SHARDED_FORMAT_VERSION, kind="sharded", size=offset,
                    shards=shards, extra=_common_extra(metas),
                    created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    fsync_write_json(os.path.join(path, MANIFEST), manifest)
    return manifest


def _common_extra(metas: Sequence[dict]) -> dict:
    """The ``extra`` entries every shard agrees on (per-shard build details stay in the
    shards, so the manifest does not depend on how the corpus was split)."""
    first = metas[0].get("extra", {})
    return {k: v for k, v in first.items() if k not in PER_SHARD_EXTRA
            and all(m.get("extra", {}).get(k) == v for m in metas)}


def read_manifest(path: PathLike, owner: str) -> dict:
    """``manifest.json`` of a sharded datastore, its version and shard table checked."""
    import json
    check_store_path(os.fspath(path), owner)
    file = os.path.join(os.fspath(path), MANIFEST)
    try:
        with open(file) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise DatastoreError(f"{owner}: {file} not found (not a sharded datastore, or its "
                             f"build did not finish)") from None
    except ValueError as e:
        raise DatastoreError(f"{owner}: {file} is not valid JSON ({e}): the sharded store is "
                             f"corrupt; rebuild it") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DatastoreError(f"{owner}: {file} holds no shard table: the sharded store is "
                             f"corrupt; rebuild it")
    check_format_version(manifest, file, owner, SHARDED_FORMAT_VERSION)
    offset = 0
    for i, shard in enumerate(manifest["shards"]):
        if shard["offset"] != offset:
            raise DatastoreError(f"{owner}: {file}: shard {i} starts at {shard['offset']}, "
                                 f"expected {offset} (shards must be in global-id order)")
        offset += shard["size"]
    if offset != manifest["size"]:
        raise DatastoreError(f"{owner}: {file}: shards hold {offset} entries, size says "
                             f"{manifest['size']}")
    return manifest


def _shard_meta(path: str, index: int, name: str) -> dict:
    try:
        return read_checked_meta(os.path.join(path, name), f"shard {index} ({name})",
                                 FORMAT_VERSION, FILES, ("size", "dim"),
                                 "the sharded build with resume=True")
    except FileNotFoundError as e:  # meta.json present, a data file missing
        raise DatastoreError(f"shard {index} ({name}) of {path}: {e}") from None


def shard_differs(meta: dict, entry: dict) -> bool:
    """True when a shard's meta.json is not the one the manifest entry recorded (size, byte
    sizes, and checksums where both have them)."""
    if meta["size"] != entry["size"] or meta["bytes"] != entry["bytes"]:
        return True
    return None not in (meta.get("checksums"), entry.get("checksums")) and \
        meta["checksums"] != entry["checksums"]


def open_shard(path: PathLike, manifest: dict, index: int, owner: str) -> Datastore:
    """Shard ``index`` of a sharded datastore, checked against the manifest: a missing,
    truncated or replaced shard is a ``DatastoreError`` naming it."""
    path = os.fspath(path)
    entry = manifest["shards"][index]
    where = f"{owner}: shard {index} ({os.path.join(path, entry['path'])})"
    if not os.path.isdir(os.path.join(path, entry["path"])):
        raise DatastoreError(f"{where} is missing; manifest.json lists "
                             f"{len(manifest['shards'])} shards")
    try:
        meta = _shard_meta(path, index, entry["path"])
    except DatastoreError as e:
        raise DatastoreError(f"{where}: {e}") from None
    if shard_differs(meta, entry):
        raise DatastoreError(f"{where} holds {meta['size']} entries ({meta['bytes']}) but "
                             f"manifest.json says {entry['size']} ({entry['bytes']}): it was "
                             f"replaced after the manifest was written")
    return Datastore.open(os.path.join(path, entry["path"]))


# --------------------------------------------------------------------------- search


class ShardedStore(MetaFields):
    """A contiguous run of a sharded datastore's shards, searched as one datastore.

    ``Datastore.open`` returns one over every shard. ``len``, ``dim``, ``metric``,
    ``vocab_size`` and ``meta`` describe the whole sharded datastore; ``search`` and
    ``lookup`` cover the shards held (ids outside them are -1 / invalid). The surface
    ``KNNDecoder`` uses: ``search``, ``lookup``, ``has_index``, ``metric``.
    """

    def __init__(self, path: Optional[str], manifest: dict, shards: List[Datastore],
                 offsets: List[int]):
        self.path = path
        self.meta = manifest
        self.shards = shards
        self.offsets = offsets  # global id of each held shard's first entry

    @classmethod
    def open(cls, path: PathLike, indices: Optional[Sequence[int]] = None, *,
             owner: str = "Datastore.open") -> "ShardedStore":
        """Open shards ``indices`` (default: all) of the sharded datastore at ``path``."""
        path = os.fspath(path)
        manifest = read_manifest(path, owner)
        indices = range(len(manifest["shards"])) if indices is None else list(indices)
        shards = [open_shard(path, manifest, i, owner) for i in indices]
        return cls(path, manifest, shards, [manifest["shards"][i]["offset"] for i in indices])

    @property
    def held(self) -> Tuple[int, int]:
        """[first, last) global ids of the shards held."""
        if not self.shards:
            return 0, 0
        return self.offsets[0], self.offsets[-1] + len(self.shards[-1])

    def __repr__(self) -> str:
        return (f"ShardedStore({self.path!r}, N={len(self)}, D={self.dim}, "
                f"shards={len(self.shards)}/{len(self.meta['shards'])}, metric={self.metric!r})")

    def update_extra(self, **items) -> None:
        """Add entries to the manifest's ``extra`` and rewrite manifest.json atomically (a
        stamp about the whole datastore; the shards' meta.json files stay as built)."""
        self.meta.setdefault("extra", {}).update(items)
        if self.path is not None:
            fsync_write_json(os.path.join(self.path, MANIFEST), self.meta)

    def to(self, device: Union[str, torch.device]) -> "ShardedStore":
        """Every held shard's keys, values and |k|^2 on ``device``."""
        return ShardedStore(self.path, self.meta, [s.to(device) for s in self.shards],
                            self.offsets)

    def has_index(self) -> bool:
        """True when every held shard has a FAISS index (``search`` then defaults to it)."""
        return bool(self.shards) and all(s.has_index() for s in self.shards)

    def search(self, queries: Tensor, k: int, exact: Optional[bool] = None,
               rescore: Optional[bool] = None, *, metric: Optional[str] = None,
               exclude: Optional[Tensor] = None, nprobe: Optional[int] = None
               ) -> Tuple[Tensor, Tensor]:
        """Top-k over the held shards: (scores [B, k] float32, global ids [B, k] int64) on the
        queries' device; each shard is searched as ``Datastore.search`` (same arguments;
        ``exclude`` holds global ids) and the lists are merged, ties to the smaller id."""
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"ShardedStore.search: queries must have shape [B, {self.dim}], "
                             f"got {tuple(queries.shape)}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ShardedStore.search: k must be a positive int, got {k!r}")
        if exact is None:
            exact = not self.has_index()
        best_s = torch.full((queries.shape[0], k), float("-inf"), device=queries.device)
        best_i = torch.full((queries.shape[0], k), -1, dtype=torch.int64, device=queries.device)
        for shard, offset in zip(self.shards, self.offsets):
            local = None if exclude is None else _local_ids(exclude.to(queries.device), offset,
                                                            len(shard))
            s, i = shard.search(queries, k, exact, rescore, metric=metric, exclude=local,
                                nprobe=nprobe)
            i = torch.where(i >= 0, i + offset, i)
            best_s, best_i = merge_topk(best_s, best_i, s, i, k)
        return best_s, best_i

    def lookup(self, indices: Tensor, *, check: bool = True) -> Tensor:
        """Values (int64) of global ids on the held shards; -1 stays -1. ``check`` raises for
        ids outside [-1, N) or not held here; unchecked, those read as -1."""
        if indices.is_floating_point():
            raise ValueError(f"ShardedStore.lookup: indices must be integer, got {indices.dtype}")
        lo, hi = self.held
        if check and indices.numel():
            outside = (indices != -1) & ((indices < lo) | (indices >= hi))
            if bool(outside.any()):
                bad = int(indices[outside][0])
                raise ValueError(f"ShardedStore.lookup: indices must be -1 or global ids held "
                                 f"here, in [{lo}, {hi}) of N={len(self)}; got {bad}")
        tokens = torch.full(indices.shape, -1, dtype=torch.int64, device=indices.device)
        for shard, offset in zip(self.shards, self.offsets):
            local = _local_ids(indices, offset, len(shard))
            tokens = torch.where(local >= 0, shard.lookup(local, check=False), tokens)
        return tokens

    def key_rows(self, indices: Tensor) -> Tensor:
        """Keys (as stored) of global ids on the held shards [..., D], on ``indices``' device;
        -1 slots and ids not held here read zeros. No range check: ids from ``search``."""
        dtype = self.shards[0].keys.dtype if self.shards else torch.float32
        rows = torch.zeros(*indices.shape, self.dim, dtype=dtype, device=indices.device)
        for shard, offset in zip(self.shards, self.offsets):
            local = _local_ids(indices, offset, len(shard))
            inside = local >= 0
            rows[inside] = shard.key_rows(local[inside])
        return rows


def _local_ids(ids: Tensor, offset: int, size: int) -> Tensor:
    """Global ids -> ids inside the shard [offset, offset + size); -1 for the rest."""
    inside = (ids >= offset) & (ids < offset + size)
    return torch.where(inside, ids - offset, torch.full_like(ids, -1))
