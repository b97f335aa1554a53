"""On-disk kNN datastore: fp16/bf16/fp32 keys + int32 values, memmapped, with FAISS indexes.

A datastore is a directory (``knnfast.storage.format``: keys, values, key_sq_norms,
meta.json, optional index.faiss + index.json).

Building writes into ``<path>.building/`` through the resumable chunk writer
(``knnfast.storage.building``): a killed build holds an exact prefix of what was added; it
resumes with ``create(..., resume=True)`` or fails with a message naming both options.
``finalize`` renames the whole directory into place, so ``<path>`` exists only when complete.

Example:
    >>> import tempfile, torch, knnfast
    >>> path = tempfile.mkdtemp() + "/ds"
    >>> with knnfast.Datastore.create(path, dim=4, vocab_size=10, progress=False) as w:
    ...     w.add(torch.eye(4), torch.tensor([1, 2, 3, 4]))
    >>> ds = knnfast.Datastore.open(path)
    >>> scores, ids = ds.search(torch.eye(4)[:2], k=1)
    >>> ds.lookup(ids).tolist()
    [[1], [2]]
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from ..defaults import METRICS
from . import index as faiss_index
from . import lists as ivf_lists
from . import provenance
from . import search as exact_search
from .building import building_cursor
from .files import (DatastoreError, PathLike, fsync_write_json, memmap,
                    read_checked_meta, row_chunks)
from .format import FILES, FORMAT_VERSION, KEY_DTYPES, dtype_name, memmap_keys
from .sidecar import Projection, load_sidecars
from .writer import DatastoreWriter


def _check_metric(where: str, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"Datastore.{where}: metric must be one of {METRICS}, got {metric!r}")


class MetaFields:
    """Size, key width, metric and vocabulary read from ``self.meta`` (meta.json or a sharded
    store's manifest): one definition for every kind of store."""
    meta: dict
    #: merge counts [N] / their logs of a pruned store, the key projection of a reduced one
    counts: Optional[Tensor] = None
    log_counts: Optional[Tensor] = None
    projection: Optional[Projection] = None

    def __len__(self) -> int:
        return int(self.meta["size"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def metric(self) -> str:
        return self.meta["metric"]

    @property
    def vocab_size(self) -> Optional[int]:
        return self.meta.get("vocab_size")

    @property
    def query_dim(self) -> int:
        """Width of the states ``search`` takes: the model's D_in for a dimension-reduced
        store (its keys are projected, ``dim`` < D_in), else ``dim``."""
        return self.dim if self.projection is None else self.projection.input_dim

    @property
    def fingerprint(self) -> str:
        """16 hex digits identifying this store's contents: a hash of its meta without
        ``extra`` (size, dim, dtypes, metric, creation time, per-block checksums), so a
        rebuilt, pruned or reduced store has another one. What trained decoder parts (the
        retrieval gate) record to refuse another datastore."""
        meta = {k: v for k, v in self.meta.items() if k != "extra"}
        return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()
                              ).hexdigest()[:16]


class Datastore(MetaFields):
    """An opened datastore: ``keys`` [N, D] and ``values`` [N] (memmapped until ``to``)."""

    def __init__(self, path: Optional[str], meta: dict, keys: Tensor, values: Tensor,
                 key_sq_norms: Tensor, memmapped: bool = False):
        self.path = path
        self.meta = meta
        self.keys = keys
        self.values = values
        self.key_sq_norms = key_sq_norms
        self._index: Optional[faiss_index.FaissIndex] = None
        self._lists: Optional[ivf_lists.ListLayout] = None
        self._memmapped = memmapped
        self._provenance: Optional[Tensor] = None  # [S, 2] (example id, first entry), lazily

    def set_sidecars(self, counts: Optional[Tensor], projection: Optional[Projection]) -> None:
        """Attach merge counts [N] (pruned store) and a key projection (reduced store)."""
        self.counts = None if counts is None else counts.to(self.values.device)
        self.log_counts = None if counts is None else self.counts.double().log().float()
        self.projection = projection

    # ---- construction

    @classmethod
    def create(cls, path: PathLike, dim: int, key_dtype: torch.dtype = torch.float16,
               vocab_size: Optional[int] = None, metric: str = "l2", *,
               hidden: str = "unknown", model_id: Optional[str] = None,
               extra: Optional[dict] = None, resume: bool = False, overwrite: bool = False,
               expected_size: Optional[int] = None, progress: bool = True) -> DatastoreWriter:
        """Start (or with ``resume=True`` continue) building a datastore at ``path``.

        Args:
            dim: key dimension D. key_dtype: float16 (default), bfloat16 or float32.
            vocab_size: values are checked to lie in [0, vocab_size).
            metric: the metric the keys are meant for ("l2", "ip", "cos"); the default of
                ``search`` and ``build_index``.
            hidden: which hidden state the keys are ("ffn", "att", ...), recorded in meta.
            resume: continue an interrupted build of the same shape; its ``cursor``
                (what the caller committed with the last ``add``) is on the writer.
            overwrite: delete an existing datastore or interrupted build at ``path`` first.
            expected_size: total entries, for the progress bar only.
        """
        path = os.fspath(path)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"Datastore.create: dim must be a positive int, got {dim!r}")
        _check_metric("create", metric)
        meta = {"format_version": FORMAT_VERSION, "dim": dim, "key_dtype": dtype_name(key_dtype),
                "value_dtype": "int32", "vocab_size": vocab_size, "metric": metric,
                "hidden": hidden, "model_id": model_id, "extra": extra or {}}
        return DatastoreWriter(path, meta, resume=resume, overwrite=overwrite, progress=progress,
                               expected_size=expected_size)

    @classmethod
    def building_cursor(cls, path: PathLike) -> Optional[Any]:
        """The cursor committed by an interrupted build at ``path`` (None if there is none)."""
        return building_cursor(path)

    @classmethod
    def open(cls, path: PathLike) -> "Datastore":
        """Memmap a finalized datastore, checking every file against meta.json. A sharded
        directory (``manifest.json``) opens as a ``ShardedStore`` over all its shards."""
        path = os.fspath(path)
        from . import sharded  # imports this module: resolved at call time
        if sharded.is_sharded(path):
            return sharded.ShardedStore.open(path)  # type: ignore[return-value]
        if sharded.unfinished_sharded(path):
            raise DatastoreError(f"Datastore.open: {path} has shard directories but no "
                                 f"{sharded.MANIFEST}: its sharded build did not finish "
                                 f"(rerun it with resume=True)")
        meta = read_checked_meta(path, "Datastore.open", FORMAT_VERSION, FILES, ("size", "dim"),
                                 "Datastore.create(..., resume=True)")
        n, d, key_dtype = meta["size"], meta["dim"], KEY_DTYPES[meta["key_dtype"]]
        keys = memmap_keys(path, n, d, key_dtype)
        values = memmap(os.path.join(path, "values"), np.int32, (n,))
        norms = memmap(os.path.join(path, "key_sq_norms"), np.float32, (n,))
        ds = cls(path, meta, keys, values, norms, memmapped=True)
        ds.set_sidecars(*load_sidecars(path, meta))
        return ds

    @classmethod
    def verify(cls, path: PathLike) -> Any:
        """Check the datastore (plain or sharded) at ``path`` against the sizes and per-block
        CRC-32s recorded when it was built: a ``knnfast.storage.VerifyReport`` naming every
        bad file and block (``knnfast verify PATH`` prints it)."""
        from .verify import verify
        return verify(path)

    def update_extra(self, **items: Any) -> None:
        """Add entries to ``meta["extra"]`` and rewrite meta.json atomically (e.g. a stamp
        saying what the datastore was built from)."""
        self.meta.setdefault("extra", {}).update(items)
        if self.path is not None:
            fsync_write_json(os.path.join(self.path, "meta.json"), self.meta)

    # ---- properties

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def is_memmapped(self) -> bool:
        """True while the keys are read from disk (not yet moved with ``to``)."""
        return self._memmapped

    def __repr__(self) -> str:
        return (f"Datastore({self.path!r}, N={len(self)}, D={self.dim}, "
                f"keys={self.meta['key_dtype']}, metric={self.metric!r}, device={self.device})")

    def to(self, device: Union[str, torch.device]) -> "Datastore":
        """A datastore whose keys, values and |k|^2 live on ``device`` (copied in chunks;
        ``to("cpu")`` loads a memmapped datastore into RAM). The index is shared."""
        device = torch.device(device)
        keys = torch.empty(self.keys.shape, dtype=self.keys.dtype, device=device)
        row_bytes = self.keys.shape[1] * self.keys.element_size()
        for s, e in row_chunks(len(self), row_bytes):
            keys[s:e].copy_(self.keys[s:e])
        other = Datastore(self.path, self.meta, keys, self.values.to(device, copy=True),
                          self.key_sq_norms.to(device, copy=True))
        other._index = self._index
        other.set_sidecars(self.counts, self.projection)
        return other

    # ---- lookup

    def lookup(self, indices: Tensor, *, check: bool = True) -> Tensor:
        """Values (token ids, int64) of entry ids ``indices``; -1 stays -1. Same device as
        ``indices``. ``check=False`` skips the range check (two reductions and, on a GPU, a
        host sync) for ids that come from ``search``."""
        if indices.is_floating_point():
            raise ValueError(f"Datastore.lookup: indices must be integer, got {indices.dtype}")
        if check and indices.numel() and (int(indices.max()) >= len(self) or int(indices.min()) < -1):
            raise ValueError(f"Datastore.lookup: indices must lie in [-1, {len(self)}), got "
                             f"min {int(indices.min())} max {int(indices.max())}")
        idx = indices.to(self.values.device)
        tokens = self.values[idx.clamp(min=0)].to(torch.int64)
        return tokens.masked_fill_(idx < 0, -1).to(indices.device)

    def key_rows(self, indices: Tensor) -> Tensor:
        """Keys (as stored) of entry ids ``indices`` [..., D] on ``indices``' device; -1 slots
        read entry 0 (mask them by ``lookup``'s -1). No range check: ids from ``search``."""
        idx = indices.to(self.keys.device).clamp(min=0)
        return self.keys[idx].to(indices.device)

    # ---- provenance

    def set_provenance(self, example_ids: Tensor, lengths: Tensor) -> None:
        """Record where the entries came from: the entries are the target positions of
        ``example_ids[0]``, then of ``example_ids[1]``, ... (``lengths[s]`` positions each, in
        order). Written atomically to ``provenance.npy`` ([S, 2] int64: example id, first
        entry) and noted in meta.json; ``knnfast.integrations.hf.build_datastore`` calls it."""
        if self.path is None:
            raise DatastoreError("Datastore.set_provenance: the datastore has no directory")
        rows = provenance.write_table(self.path, len(self), example_ids, lengths)
        self.update_extra(provenance={"file": provenance.FILE, "examples": rows})
        self._provenance = None

    def provenance(self, ids: Tensor) -> Tuple[Tensor, Tensor]:
        """(example index, target position) of entry ids (any shape; -1 -> (-1, -1)): which
        training context each neighbour came from."""
        if self._provenance is None:
            info = self.meta.get("extra", {}).get("provenance")
            if not info or self.path is None:
                raise DatastoreError("Datastore.provenance: this datastore records no provenance "
                                     "(datastores built by knnfast.integrations.hf."
                                     "build_datastore record it)")
            self._provenance = provenance.read_table(self.path, info)
        return provenance.locate(self._provenance, len(self), ids)

    # ---- search

    def project(self, queries: Tensor) -> Tensor:
        """Model states [B, query_dim] in the keys' space: the stored projection applied
        (float32) for a dimension-reduced store, the states themselves otherwise."""
        if self.projection is None:
            return queries
        if queries.dim() != 2 or queries.shape[1] != self.projection.input_dim:
            raise ValueError(f"Datastore.search: queries must have shape "
                             f"[B, {self.projection.input_dim}] (the model's states; this "
                             f"datastore keeps their {self.projection.method} projection to "
                             f"{self.dim} dims), got {tuple(queries.shape)}")
        return self.projection(queries)

    def search(self, queries: Tensor, k: int, exact: Optional[bool] = None,
               rescore: Optional[bool] = None, *, metric: Optional[str] = None,
               exclude: Optional[Tensor] = None, nprobe: Optional[int] = None,
               projected: bool = False, rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """k nearest entries of each query: (scores [B, k] float32 descending, ids [B, k]).

        ``exact`` picks the neighbours, ``rescore`` the scores (DESIGN §4):

        ==========  =========  ==================================================
        exact       rescore    result
        ==========  =========  ==================================================
        True        True       exact neighbours, exact scores (knn_search)
        True        False      exact neighbours, scores as the index computes them
        False       False      the index's neighbours and scores (FAISS)
        False       True       the index's neighbours, exact scores, re-sorted
        ==========  =========  ==================================================

        Defaults: ``exact`` is True when there is no index, ``rescore`` follows ``exact``.
        Exact search runs on the keys' device and streams a memmap in chunks, so
        datastores larger than RAM work. Results are on the queries' device. A
        dimension-reduced store projects the queries first (``projected=True``: they are
        already in the keys' space, e.g. keys of this store). ``rows`` [B] bool: only
        those rows need neighbours (retrieval skipping); the others may come back as
        (-inf, -1) padding. Only the lists search (``use_lists``) uses it: there a row costs
        nothing when it probes no list; elsewhere every row is searched (``masks_rows``).
        """
        scores, ids = self._search(queries, k, exact, rescore, metric, exclude, nprobe,
                                   projected, rows)
        return scores.to(queries.device), ids.to(queries.device)

    def neighbours(self, queries: Tensor, k: int, exact: Optional[bool] = None,
                   rescore: Optional[bool] = None, **search_args: Any
                   ) -> Tuple[Tensor, Tensor, Tensor]:
        """``search`` and ``lookup`` in one call: (scores, ids, tokens [B, k] int64, -1 for
        padding) on the queries' device. The tokens are looked up on the datastore's device
        before anything moves, so a datastore in host memory serving a model on a GPU sends
        the three results over once instead of sending ids to the host and tokens back.
        ``search_args``: those of ``search`` (metric, exclude, nprobe, projected, rows)."""
        scores, ids = self._search(queries, k, exact, rescore, search_args.get("metric"),
                                   search_args.get("exclude"), search_args.get("nprobe"),
                                   search_args.get("projected", False), search_args.get("rows"))
        tokens = self.lookup(ids, check=False)  # on the values' device, where ids are
        return tuple(t.to(queries.device) for t in (scores, ids, tokens))

    def _search(self, queries: Tensor, k: int, exact: Optional[bool], rescore: Optional[bool],
                metric: Optional[str], exclude: Optional[Tensor], nprobe: Optional[int],
                projected: bool, rows: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """``search`` with the results left on the datastore's device."""
        metric = metric or self.metric
        _check_metric("search", metric)
        if not projected:
            queries = self.project(queries)
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"Datastore.search: queries must have shape [B, {self.dim}], "
                             f"got {tuple(queries.shape)}")
        if exact is None:
            exact = not self.has_index()
        rescore = exact if rescore is None else rescore
        if exact:
            scores, ids = exact_search.exact_search(queries, self.keys, self.key_sq_norms, k, metric,
                                             exclude, streamed=self.is_memmapped)
            if not rescore:
                scores = faiss_index.reconstructed_scores(self.index, queries, ids, metric)
        elif self._lists is not None:  # exact in-list scores: rescoring would change nothing
            scores, ids = ivf_lists.search(self._lists, queries, k, metric, exclude, nprobe,
                                           rows)
        else:
            scores, ids = faiss_index.search(self._faiss(), queries, k, metric, exclude, nprobe)
            if rescore:
                scores, ids = exact_search.rescore(queries, self.keys, ids, metric)
        return scores, ids

    # ---- FAISS index

    def has_saved_index(self) -> bool:
        """True when ``index.faiss`` exists next to the datastore."""
        return faiss_index.has_saved(self.path)

    def has_index(self) -> bool:
        """True when an index is loaded, attached or saved (``search`` then defaults to it)."""
        return self._index is not None or self.has_saved_index()

    def build_index(self, factory: Optional[str] = None, metric: Optional[str] = None,
                    train_size: int = 1_000_000, device: str = "auto", *, nprobe: int = 32,
                    seed: int = 0, save: bool = True, progress: bool = True) -> Any:
        """Train and fill a FAISS index over the keys (saved as ``index.faiss``).

        Args:
            factory: any ``faiss.index_factory`` string. Default: "Flat" below 1M entries,
                "IVF4096,PQ64" from 1M on (PQ sub-quantizers reduced to divide D).
            metric: "l2" or "ip"; "cos" indexes normalized keys with inner product.
            train_size: keys sampled (seeded) to train the quantizers.
            device: "auto" (GPU when faiss has GPUs and torch sees CUDA), "cpu", "cuda" or
                "all" (sharded over every visible GPU, for an index larger than one GPU).
            nprobe: IVF lists visited per query (stored, overridable in ``search``).
        """
        metric = metric or self.metric
        _check_metric("build_index", metric)
        factory = factory or faiss_index.default_factory(len(self), self.dim)
        built, cpu_index = faiss_index.build(self.keys, factory, metric, train_size=train_size,
                                             device=device, nprobe=nprobe, seed=seed,
                                             progress=progress)
        self._index = built
        if save and self.path is not None:
            faiss_index.save(self.path, cpu_index, built.info)
        return built.index

    def load_index(self, device: str = "auto") -> Any:
        """Load ``index.faiss`` onto ``device`` (as ``build_index``: "all" shards it over
        every visible GPU)."""
        self._index = faiss_index.load(self.path, len(self), device)
        return self._index.index

    def use_index(self, index: Any, info: dict) -> None:
        """Search through a FAISS index filled elsewhere over exactly these keys, in order
        (``info`` as ``index.json``: at least ``metric``). Not saved."""
        self._index = faiss_index.FaissIndex(index, info)

    def masks_rows(self, exact: Optional[bool] = None) -> bool:
        """True when ``search(exact=exact, rows=...)`` leaves the unselected rows unsearched
        (the lists search): a skipping decoder then passes its row mask instead of splitting
        the batch."""
        return self._lists is not None and not exact  # lists imply an index: None = index

    def use_lists(self, nprobe: Optional[int] = None, pack: Optional[str] = None
                  ) -> "Datastore":
        """Search the IVF index's lists with knnfast's fused ``knn_search_lists`` from now on
        (``search(exact=False)``): the same lists and ``nprobe`` (default: the index's), the
        whole batch in one call, exact scores from the stored keys. Keeps a copy of the keys
        in list order on the keys' device (N x D in the keys' dtype). Returns ``self``.

        Example (decoding with the demo's IVF256,Flat store)::

            ds = knnfast.Datastore.open(path).to("cpu").use_lists(pack="int8")
            scores, ids = ds.search(hidden, k=8)   # FAISS's neighbours, exactly scored

        (benchmarks/bench_knn_search_lists.py: 1.82 ms against IndexIVFFlat's 3.14 ms for
        64 queries, nprobe 16 of 256 lists, AMD EPYC, 2 threads, without a pack.) ``to()``
        does not carry the lists: call ``use_lists`` on the moved store.

        ``pack`` (CPU stores): also keep the keys as residuals from their list's mean, which
        ``knn_search_lists`` ranks with before rescoring the few survivors exactly (results
        unchanged): "int8" (``pack_lists_int8``: another N x D bytes; its plan runs where the
        CPU has AVX512-VNNI) or "bf16" (``pack_lists_bf16``: N x D x 2 bytes; AVX512-BF16).
        On the demo's recorded decoding calls (AMD EPYC, 2 threads) int8 searched 1.5x and
        bf16 1.3x as fast as no pack (benchmarks/RESULTS.md), though end to end the step
        did not measurably change (the search is ~6% of it); None (default) keeps no copy.
        """
        if self.is_memmapped:
            raise DatastoreError("Datastore.use_lists: the keys are memmapped; load them "
                                 "first (ds = ds.to('cpu'))")
        faiss = self._faiss()
        nprobe = faiss.info.get("nprobe", 32) if nprobe is None else nprobe
        if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
            raise ValueError(f"Datastore.use_lists: nprobe must be an int >= 1, got {nprobe!r}")
        if faiss.info["metric"] != self.metric:
            raise ValueError(f"Datastore.use_lists: the index was built for metric "
                             f"{faiss.info['metric']!r}, the datastore's is {self.metric!r}")
        if pack not in ivf_lists.PACKS:
            raise ValueError(f"Datastore.use_lists: pack must be one of "
                             f"{', '.join(map(repr, ivf_lists.PACKS))}, got {pack!r}")
        self._lists = ivf_lists.from_faiss(faiss.index, self.keys, nprobe, self.metric, pack)
        return self

    def _faiss(self) -> faiss_index.FaissIndex:
        if self._index is None:
            self.load_index()
        return self._index

    @property
    def index(self) -> Any:
        """The FAISS index (loaded from disk on first use)."""
        return self._faiss().index

    # ---- subsampling

    def subsample(self, frac: float, seed: int = 0, path: Optional[PathLike] = None, *,
                  progress: bool = True) -> "Datastore":
        """A datastore of round(frac * N) entries drawn without replacement (seeded), in
        their original order. Written to ``path`` (default ``<path>.sub<frac>-s<seed>``)."""
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"Datastore.subsample: frac must be in (0, 1], got {frac!r}")
        if self.counts is not None or self.projection is not None:
            raise ValueError(f"Datastore.subsample: {self.path} is pruned or dimension-reduced "
                             f"(its side arrays would not follow); subsample the source "
                             f"datastore, then prune / reduce the result")
        n = max(1, round(frac * len(self)))
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(len(self), generator=gen)[:n].sort().values
        if path is None:
            if self.path is None:
                raise ValueError("Datastore.subsample: pass path= for a datastore without one")
            path = f"{self.path}.sub{frac:g}-s{seed}"
        meta = self.meta
        extra = dict(meta.get("extra", {}), subsampled_from=self.path, frac=frac, seed=seed)
        writer = Datastore.create(path, self.dim, KEY_DTYPES[meta["key_dtype"]], meta.get("vocab_size"),
                                  meta["metric"], hidden=meta.get("hidden", "unknown"),
                                  model_id=meta.get("model_id"), extra=extra, overwrite=True,
                                  expected_size=n, progress=progress)
        with writer:
            for s, e in row_chunks(n, self.dim * self.keys.element_size()):
                rows = pick[s:e].to(self.keys.device)
                writer.add(self.keys[rows], self.values[rows])
        return writer.datastore

    # ---- smaller datastores (knnfast.storage.compact)

    def prune(self, path: PathLike, k: int = 8, **kwargs: Any) -> "Datastore":
        """Greedy-merge pruning (He et al. 2021) into a new datastore at ``path``: each entry
        absorbs its later same-value neighbours among its k nearest, their count kept as a
        weight (``counts``). Atomic, resumable; see ``knnfast.storage.compact.prune``."""
        from . import compact
        return compact.prune(self, path, k, **kwargs)

    def reduce_dim(self, path: PathLike, dim: int, method: str = "pca",
                   **kwargs: Any) -> "Datastore":
        """A copy at ``path`` with keys projected to ``dim`` dims ("pca" or "random"); the
        projection is stored and applied to queries by ``search``. Atomic, resumable; see
        ``knnfast.storage.compact.reduce_dim``."""
        from . import compact
        return compact.reduce_dim(self, path, dim, method, **kwargs)
