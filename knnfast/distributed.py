"""Sharded datastores over ``torch.distributed`` (DESIGN §9): search and builds across ranks.

Every rank of a process group (gloo on CPU, NCCL on GPUs; started by ``torchrun`` or by the
caller) runs the same program on the same queries. ``ShardedDatastore.open`` gives each rank a
contiguous run of the shards; ``search`` searches them with the fused ``knn_search`` (or each
shard's FAISS index), then merges the per-rank [B, k] lists with one ``all_gather`` per step,
ties to the smaller global id, so every rank gets exactly what single-process search over the
whole datastore returns. ``build_sharded`` splits a build across ranks; rank 0 writes the
manifest once every shard is finished.

No call here can hang on a failed rank forever: failures are exchanged (``agree``) so every rank
raises the same error naming the rank, and a rank that died is noticed when the group's
collective timeout expires; pass ``timeout=`` to ``torch.distributed.init_process_group``.

Example (every rank)::

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    ds = knnfast.distributed.ShardedDatastore.open("ds/")
    knn = knnfast.KNNDecoder(ds, k=8)          # hidden/logits identical on every rank
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from .storage.datastore import Datastore
from .storage.files import DatastoreError, PathLike, check_store_path, os_error
from .storage.sharded import (MANIFEST, ShardedStore, is_sharded, read_manifest, shard_name,
                              write_manifest)
from .topk import merge_topk


def is_initialized() -> bool:
    """True when a ``torch.distributed`` process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world(group: Any = None) -> Tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) without an initialized process group."""
    if not is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def split(n: int, rank: int, world: int) -> Tuple[int, int]:
    """[start, end) of ``rank``'s contiguous share of ``n`` items (sizes differ by <= 1)."""
    return n * rank // world, n * (rank + 1) // world


def agree(what: str, error: Optional[BaseException], group: Any = None,
          payload: Any = None) -> List[Any]:
    """Exchange every rank's failure (and a picklable ``payload``); raise on every rank if any
    rank failed, naming the ranks and their errors. Returns the ranks' payloads.

    A rank that failed before reaching this call is not waited for forever: the collective
    ends with the process group's timeout."""
    rank, world = rank_and_world(group)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    if world == 1:
        gathered = [(mine, payload)]
    else:
        gathered = [None] * world
        try:
            dist.all_gather_object(gathered, (mine, payload), group=group)
        except RuntimeError as lost:  # gloo/NCCL: a peer died or the group's timeout expired
            raise DatastoreError(
                f"{what} failed: this is rank {rank} of {world}, and another rank stopped "
                f"answering (it died, or did not reach this step within the process group's "
                f"timeout){'; this rank failed too: ' + mine if mine else ''}. Finished work "
                f"is kept: rerun the same command on every rank to resume ({lost})") from lost
    failed = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if failed:
        lines = "; ".join(f"rank {r}: {e}" for r, e in failed)
        raise DatastoreError(f"{what} failed on {len(failed)} of {world} ranks "
                             f"(this is rank {rank}): {lines}") from error
    return [p for _, p in gathered]


def _collective_device(group: Any, fallback: torch.device) -> torch.device:
    # NCCL moves CUDA tensors only; gloo is used here with CPU tensors
    if dist.get_backend(group) == "nccl":
        return fallback if fallback.type == "cuda" else torch.device("cuda",
                                                                     torch.cuda.current_device())
    return torch.device("cpu")


def _tokens_for(ids: Tensor, all_ids: Tensor, all_tokens: Tensor) -> Tensor:
    """Tokens of ``ids`` [B, k] read off the gathered (ids, tokens) [B, W*k]: ids are unique
    per row across ranks (disjoint shards), so a sorted search finds each one."""
    big = torch.iinfo(torch.int64).max
    sorted_ids, perm = torch.where(all_ids < 0, big, all_ids).sort(dim=1)
    pos = torch.searchsorted(sorted_ids, ids.clamp(min=0)).clamp(max=all_ids.shape[1] - 1)
    return all_tokens.gather(1, perm.gather(1, pos)).masked_fill(ids < 0, -1)


class ShardedDatastore:
    """One rank's view of a sharded datastore searched by the whole process group.

    ``len``, ``dim``, ``metric``, ``vocab_size`` and ``meta`` describe the whole datastore.
    ``search`` and ``lookup`` are collectives: every rank of the group calls them in the same
    order with the same queries / ids, and every rank gets the same result.
    """

    def __init__(self, local: ShardedStore, group: Any, indexed: bool):
        self.local = local
        self.group = group
        self.rank, self.world = rank_and_world(group)
        self._indexed = indexed
        self._last: Optional[Tuple[Tensor, Tensor]] = None  # (ids, tokens) of the last search

    @classmethod
    def open(cls, path: PathLike, group: Any = None, *,
             device: Optional[torch.device] = None) -> "ShardedDatastore":
        """Open this rank's shards of the sharded datastore at ``path`` (memmapped, or moved
        to ``device``). Rank r of W holds shards [S*r//W, S*(r+1)//W). A missing, truncated
        or replaced shard, or ranks reading different manifests, raises ``DatastoreError``
        on every rank, naming the rank and the shard."""
        path = os.fspath(path)
        rank, world = rank_and_world(group)
        local, error, payload = None, None, None
        try:
            manifest = read_manifest(path, f"ShardedDatastore.open (rank {rank})")
            start, end = split(len(manifest["shards"]), rank, world)
            local = ShardedStore.open(path, range(start, end),
                                      owner=f"ShardedDatastore.open (rank {rank})")
            local = local if device is None else local.to(device)
            digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
            payload = (digest, local.has_index() or not local.shards)
        except (OSError, ValueError) as e:  # DatastoreError is a ValueError
            error = e
        payloads = agree(f"ShardedDatastore.open({path!r})", error, group, payload)
        if len({p[0] for p in payloads}) != 1:
            raise DatastoreError(f"ShardedDatastore.open({path!r}): the ranks read different "
                                 f"{MANIFEST} files (one path, one datastore for all ranks)")
        # search defaults to the indexes only when every rank has them: all ranks must agree
        return cls(local, group, all(p[1] for p in payloads))

    def __len__(self) -> int:
        return len(self.local)

    @property
    def dim(self) -> int:
        return self.local.dim

    @property
    def metric(self) -> str:
        return self.local.metric

    @property
    def vocab_size(self) -> Optional[int]:
        return self.local.vocab_size

    @property
    def meta(self) -> dict:
        return self.local.meta

    def has_index(self) -> bool:
        """True when every rank's shards have FAISS indexes (``search`` then uses them)."""
        return self._indexed

    def __repr__(self) -> str:
        lo, hi = self.local.held
        return (f"ShardedDatastore({self.local.path!r}, N={len(self)}, rank {self.rank}/"
                f"{self.world} holds ids [{lo}, {hi}))")

    def search(self, queries: Tensor, k: int, exact: Optional[bool] = None,
               rescore: Optional[bool] = None, *, metric: Optional[str] = None,
               exclude: Optional[Tensor] = None, nprobe: Optional[int] = None
               ) -> Tuple[Tensor, Tensor]:
        """Top-k over every rank's shards (collective; same queries on every rank): (scores
        [B, k] float32, global ids [B, k] int64) on the queries' device, ties to the smaller
        id. Arguments as ``Datastore.search``; ``exclude`` holds global ids. One all_gather of
        [3, B, k] int64 (score bits, ids, tokens) per call; the tokens serve ``lookup``."""
        exact = (not self._indexed) if exact is None else exact
        s, i = self.local.search(queries, k, exact, rescore, metric=metric, exclude=exclude,
                                 nprobe=nprobe)
        tokens = self.local.lookup(i, check=False)
        packed = torch.stack([s.view(torch.int32).to(torch.int64), i, tokens])
        if self.world > 1:
            packed = packed.to(_collective_device(self.group, queries.device))
            parts = [torch.empty_like(packed) for _ in range(self.world)]
            dist.all_gather(parts, packed, group=self.group)
            packed = torch.cat(parts, 2).to(queries.device)
        all_s = packed[0].to(torch.int32).view(torch.float32)
        all_i, all_t = packed[1], packed[2]
        # ranks hold increasing id ranges, so merging in rank order keeps merge_topk's
        # precondition (later ids larger) and its tie rule
        best_s, best_i = all_s[:, :k], all_i[:, :k]
        for r in range(1, self.world):
            best_s, best_i = merge_topk(best_s, best_i, all_s[:, r * k:(r + 1) * k],
                                        all_i[:, r * k:(r + 1) * k], k)
        self._last = (best_i, _tokens_for(best_i, all_i, all_t))
        return best_s, best_i

    def lookup(self, indices: Tensor, *, check: bool = True) -> Tensor:
        """Values (int64) of global ids; -1 stays -1. The ids ``search`` just returned are
        answered from its gathered tokens (no communication); other ids take one all_reduce
        (collective: same ids on every rank)."""
        if indices.is_floating_point():
            raise ValueError(f"ShardedDatastore.lookup: indices must be integer, got "
                             f"{indices.dtype}")
        if self._last is not None and (indices is self._last[0] or (
                indices.shape == self._last[0].shape and torch.equal(indices, self._last[0]))):
            return self._last[1].to(indices.device)
        if check and indices.numel() and (int(indices.max()) >= len(self)
                                          or int(indices.min()) < -1):
            raise ValueError(f"ShardedDatastore.lookup: indices must lie in [-1, {len(self)}), "
                             f"got min {int(indices.min())} max {int(indices.max())}")
        lo, hi = self.local.held
        mine = torch.where((indices >= lo) & (indices < hi), indices, -1)
        tokens = self.local.lookup(mine, check=False)  # -1 where another rank holds the id
        if self.world > 1:
            tokens = tokens.to(_collective_device(self.group, indices.device))
            dist.all_reduce(tokens, op=dist.ReduceOp.MAX, group=self.group)
        return tokens.to(indices.device)


def build_sharded(path: PathLike, n_units: int, build_shard: Callable[[str, int, int], Any],
                  *, group: Any = None, resume: bool = True, overwrite: bool = False,
                  owner: str = "build_sharded") -> ShardedStore:
    """Build a sharded datastore with every rank of ``group``: rank r calls
    ``build_shard(shard_path, start, end)`` for its contiguous units [start, end) of
    ``n_units`` (e.g. batches of a corpus in a fixed order) and must leave a finished
    datastore at ``shard_path``; ranks with no units write no shard. After every rank is done
    rank 0 writes the manifest. A finished shard is kept on ``resume``. Returns the whole
    datastore (``ShardedStore``) on every rank; a failure anywhere raises on every rank."""
    path = os.fspath(path)
    rank, world = rank_and_world(group)
    error = None
    try:
        if rank == 0:
            _prepare(path, overwrite, owner)
    except (OSError, ValueError) as e:
        error = e
    agree(f"{owner}: preparing {path}", error, group)
    start, end = split(n_units, rank, world)
    shard = os.path.join(path, shard_name(rank))
    error = None
    try:
        if end > start and not (resume and os.path.exists(os.path.join(shard, "meta.json"))):
            build_shard(shard, start, end)
    except Exception as e:  # any failure must reach the other ranks, not leave them waiting
        error = e
    agree(f"{owner}: building shard {shard_name(rank)}", error, group)
    error = None
    try:
        if rank == 0:
            write_manifest(path, [shard_name(r) for r in range(world)
                                  if split(n_units, r, world)[1] > split(n_units, r, world)[0]])
    except (OSError, ValueError) as e:
        error = e
    agree(f"{owner}: committing {path}", error, group)
    return ShardedStore.open(path, owner=owner)


def _prepare(path: str, overwrite: bool, owner: str) -> None:
    check_store_path(path, owner)  # a file or a symlink loop: refused before anything is done
    if overwrite and os.path.exists(path):
        shutil.rmtree(path)
    if is_sharded(path):
        raise FileExistsError(f"{owner}: {path} already holds a sharded datastore; open it "
                              f"with Datastore.open or pass overwrite=True")
    if os.path.exists(os.path.join(path, "meta.json")):
        raise FileExistsError(f"{owner}: {path} already holds a datastore; pass overwrite=True")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise os_error(owner, "create", path, e, "make the parent directory writable or build "
                       "somewhere else (nothing was written)") from None


def open_datastore(path: PathLike, group: Any = None) -> Any:
    """``ShardedDatastore.open`` under an initialized process group of more than one rank,
    else ``Datastore.open`` (a plain or sharded directory in this process)."""
    if rank_and_world(group)[1] > 1:
        return ShardedDatastore.open(path, group)
    return Datastore.open(path)


__all__ = ["ShardedDatastore", "agree", "build_sharded", "is_initialized", "open_datastore",
           "rank_and_world", "split"]
