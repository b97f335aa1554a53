"""On-disk kNN datastore: fp16/bf16/fp32 keys + int32 values, memmapped, with FAISS indexes.

A datastore is a directory (DESIGN §4)::

    keys            N x D raw little-endian (float16 by default; bfloat16 stored as its bits)
    values          N int32 token ids
    key_sq_norms    N float32 |k|^2, computed once at finalize (l2/cos search reuse it)
    meta.json       N, D, dtypes, vocab size, metric, captured hidden state, model id,
                    created-at, format version and the byte size of every file
    index.faiss     optional FAISS index (+ index.json describing it)

Building writes into ``<path>.building/``: every ``add`` appends and fsyncs both files, then
commits the new entry count (and an optional caller cursor) to ``progress.json`` with an
atomic rename. A killed build therefore holds an exact prefix of what was added; it resumes
with ``create(..., resume=True)`` (half-written bytes past the last commit are dropped) or
fails with a message naming both options. ``finalize`` renames the whole directory into
place, so ``<path>`` exists only when complete.

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

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from . import ops

FORMAT_VERSION = 1
FILES = ("keys", "values", "key_sq_norms")
KEY_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_STORAGE = {torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float32: np.float32}
DEFAULT_IVFPQ = "IVF4096,PQ64"
FLAT_BELOW = 1_000_000
_CHUNK_BYTES = 256 << 20  # memmap streaming granularity for exact search, norms, copies

PathLike = Union[str, os.PathLike]


class DatastoreError(ValueError):
    """A datastore on disk is missing, truncated, inconsistent or of an unknown format."""


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in KEY_DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"key_dtype must be one of {sorted(KEY_DTYPES)}, got {dtype}")


def _fsync_write_json(path: str, obj: dict) -> None:
    """Write JSON to path atomically: temp file, fsync, rename, fsync the directory."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _memmap(path: str, np_dtype, shape: Tuple[int, ...]) -> Tensor:
    """Copy-on-write memmap as a tensor: pages are read lazily, nothing is written back."""
    if math.prod(shape) == 0:
        return torch.from_numpy(np.zeros(shape, dtype=np_dtype))
    return torch.from_numpy(np.memmap(path, dtype=np_dtype, mode="c", shape=shape))


def _progress(total: Optional[int], desc: str, enabled: bool, unit: str = "keys"):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, disable=not enabled,
                dynamic_ncols=True, leave=False)


def _row_chunks(n: int, row_bytes: int, chunk_bytes: int = _CHUNK_BYTES) -> Iterator[Tuple[int, int]]:
    step = max(1, chunk_bytes // max(1, row_bytes))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _sq_norms(keys: Tensor) -> Tensor:
    """fp32 |k|^2 of a key block (the kernels' accumulation precision)."""
    k = keys.float()
    return (k * k).sum(1)


# --------------------------------------------------------------------------- writer


class DatastoreWriter:
    """Appends (keys, values) chunks into ``<path>.building`` and finalizes atomically.

    Use as a context manager: a clean exit finalizes, an exception leaves the committed
    prefix on disk for ``Datastore.create(path, ..., resume=True)``.
    """

    def __init__(self, path: str, meta: dict, resume_state: Optional[dict], progress: bool,
                 expected_size: Optional[int]):
        self.path = path
        self.tmp_dir = path + ".building"
        self.meta = meta
        self.dim = meta["dim"]
        self.key_dtype = KEY_DTYPES[meta["key_dtype"]]
        self.vocab_size = meta.get("vocab_size")
        self._row_bytes = self.dim * torch.empty((), dtype=self.key_dtype).element_size()
        self.count = 0
        self.cursor: Any = None
        self._closed = False
        if resume_state is not None:
            self.count = int(resume_state["count"])
            self.cursor = resume_state.get("cursor")
        self._truncate_to_commit()
        self._keys_f = open(os.path.join(self.tmp_dir, "keys"), "ab")
        self._values_f = open(os.path.join(self.tmp_dir, "values"), "ab")
        self._bar = _progress(expected_size, f"datastore {os.path.basename(path)}", progress)
        self._bar.update(self.count)

    # The committed count is the truth: bytes beyond it were written by a killed process.
    def _truncate_to_commit(self) -> None:
        for name, row in (("keys", self._row_bytes), ("values", 4)):
            f = os.path.join(self.tmp_dir, name)
            if not os.path.exists(f):
                open(f, "wb").close()
            have, want = os.path.getsize(f), self.count * row
            if have < want:
                raise DatastoreError(
                    f"interrupted build at {self.tmp_dir} is corrupt: {name} has {have} bytes "
                    f"but {self.count} committed entries need {want}; delete it or pass "
                    f"overwrite=True")
            if have > want:
                os.truncate(f, want)

    def add(self, keys: Tensor, values: Tensor, cursor: Any = None) -> None:
        """Append keys [n, D] (any float dtype, stored as the datastore's key dtype) and
        values [n] (token ids). ``cursor`` is any JSON value committed with the chunk (for
        example the number of corpus sentences consumed) and read back on resume."""
        if self._closed:
            raise RuntimeError("DatastoreWriter.add: the writer is closed")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"Datastore.add: keys must have shape [n, {self.dim}], "
                             f"got {tuple(keys.shape)}")
        if not keys.is_floating_point():
            raise ValueError(f"Datastore.add: keys must be floating point, got {keys.dtype}")
        if values.dim() != 1 or values.shape[0] != keys.shape[0]:
            raise ValueError(f"Datastore.add: values must have shape [{keys.shape[0]}], "
                             f"got {tuple(values.shape)}")
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"Datastore.add: values must be integer token ids, got {values.dtype}")
        keys = keys.detach().to("cpu", self.key_dtype).contiguous()
        values = values.detach().to("cpu", torch.int64)
        self._check_values(keys, values)
        key_bytes = keys.view(torch.uint16 if keys.element_size() == 2 else torch.int32).numpy()
        self._keys_f.write(key_bytes.tobytes())
        self._values_f.write(values.to(torch.int32).numpy().tobytes())
        for f in (self._keys_f, self._values_f):
            f.flush()
            os.fsync(f.fileno())
        self.count += keys.shape[0]
        self.cursor = cursor
        _fsync_write_json(os.path.join(self.tmp_dir, "progress.json"),
                          {"count": self.count, "cursor": cursor, "meta": self.meta})
        self._bar.update(keys.shape[0])

    def _check_values(self, keys: Tensor, values: Tensor) -> None:
        if values.numel() == 0:
            return
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or (self.vocab_size is not None and hi >= self.vocab_size):
            bad = lo if lo < 0 else hi
            raise ValueError(f"Datastore.add: values must be token ids in [0, "
                             f"{self.vocab_size}), got {bad}")
        if not torch.isfinite(keys).all():
            row = int((~torch.isfinite(keys)).any(1).nonzero()[0])
            raise ValueError(f"Datastore.add: keys row {row} of this chunk is not finite "
                             f"(after conversion to {self.meta['key_dtype']})")

    def finalize(self) -> "Datastore":
        """Compute |k|^2, write meta.json and move the directory into place atomically."""
        self._close_files()
        if self.count == 0:
            raise DatastoreError(f"Datastore.finalize: no entries were added to {self.path}")
        keys = _memmap(os.path.join(self.tmp_dir, "keys"), _STORAGE[self.key_dtype],
                       (self.count, self.dim))
        if self.key_dtype == torch.bfloat16:
            keys = keys.view(torch.bfloat16)
        norms = torch.empty(self.count, dtype=torch.float32)
        for s, e in _row_chunks(self.count, self._row_bytes):
            norms[s:e] = _sq_norms(keys[s:e])
        with open(os.path.join(self.tmp_dir, "key_sq_norms"), "wb") as f:
            f.write(norms.numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        meta = dict(self.meta, size=self.count, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    bytes={"keys": self.count * self._row_bytes, "values": self.count * 4,
                           "key_sq_norms": self.count * 4})
        _fsync_write_json(os.path.join(self.tmp_dir, "meta.json"), meta)
        if os.path.exists(self.path):
            raise DatastoreError(f"Datastore.finalize: {self.path} appeared during the build; "
                                 f"the finished build stays in {self.tmp_dir}")
        # Rename first: a kill at any point leaves either a resumable build or a complete
        # datastore (with a stray progress.json that nothing reads).
        os.replace(self.tmp_dir, self.path)
        _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        os.remove(os.path.join(self.path, "progress.json"))
        return Datastore.open(self.path)

    def _close_files(self) -> None:
        if not self._closed:
            self._keys_f.close()
            self._values_f.close()
            self._bar.close()
            self._closed = True

    def close(self) -> None:
        """Stop without finalizing; the committed prefix stays resumable."""
        self._close_files()

    def __enter__(self) -> "DatastoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.datastore = self.finalize()
        else:
            self._close_files()


# --------------------------------------------------------------------------- datastore


@dataclass
class _Index:
    index: Any
    info: dict
    gpu_resources: Any = None  # faiss.StandardGpuResources must outlive its GPU index


class Datastore:
    """An opened datastore: ``keys`` [N, D] and ``values`` [N] (memmapped until ``to``)."""

    def __init__(self, path: Optional[str], meta: dict, keys: Tensor, values: Tensor,
                 key_sq_norms: Tensor, memmapped: bool = False):
        self.path = path
        self.meta = meta
        self.keys = keys
        self.values = values
        self.key_sq_norms = key_sq_norms
        self._index: Optional[_Index] = None
        self._memmapped = memmapped

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
        if metric not in ops.METRICS:
            raise ValueError(f"Datastore.create: metric must be one of {ops.METRICS}, got {metric!r}")
        meta = {"format_version": FORMAT_VERSION, "dim": dim, "key_dtype": _dtype_name(key_dtype),
                "value_dtype": "int32", "vocab_size": vocab_size, "metric": metric,
                "hidden": hidden, "model_id": model_id, "extra": extra or {}}
        tmp = path + ".building"
        if overwrite:
            for p in (path, tmp):
                if os.path.exists(p):
                    shutil.rmtree(p)
        if os.path.exists(path):
            raise FileExistsError(f"Datastore.create: {path} already exists; open it with "
                                  f"Datastore.open or pass overwrite=True")
        state = cls._resume_state(tmp, meta, resume)
        if state is None:
            os.makedirs(tmp)
            _fsync_write_json(os.path.join(tmp, "progress.json"),
                              {"count": 0, "cursor": None, "meta": meta})
        return DatastoreWriter(path, meta, state, progress, expected_size)

    @staticmethod
    def _resume_state(tmp: str, meta: dict, resume: bool) -> Optional[dict]:
        if not os.path.exists(tmp):
            return None
        progress_file = os.path.join(tmp, "progress.json")
        try:
            with open(progress_file) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise DatastoreError(f"interrupted build at {tmp} has no readable progress.json "
                                 f"({e}); delete it or pass overwrite=True") from None
        if not resume:
            raise DatastoreError(
                f"an interrupted build exists at {tmp} ({state['count']} entries committed); "
                f"pass resume=True to continue it or overwrite=True to start over")
        fixed = ("dim", "key_dtype", "vocab_size", "metric", "hidden", "model_id", "extra")
        diff = {k: (state["meta"].get(k), meta[k]) for k in fixed if state["meta"].get(k) != meta[k]}
        if diff:
            raise DatastoreError(f"cannot resume {tmp}: it was started with different "
                                 f"settings (was, now): {diff}")
        return state

    @classmethod
    def building_cursor(cls, path: PathLike) -> Optional[Any]:
        """The cursor committed by an interrupted build at ``path`` (None if there is none)."""
        progress_file = os.fspath(path) + ".building/progress.json"
        if not os.path.exists(progress_file):
            return None
        with open(progress_file) as f:
            return json.load(f).get("cursor")

    @classmethod
    def open(cls, path: PathLike) -> "Datastore":
        """Memmap a finalized datastore, checking every file against meta.json."""
        path = os.fspath(path)
        meta_file = os.path.join(path, "meta.json")
        if not os.path.exists(meta_file):
            hint = (f"; an interrupted build exists at {path}.building (resume it with "
                    f"Datastore.create(..., resume=True))" if os.path.exists(path + ".building") else "")
            raise DatastoreError(f"Datastore.open: {meta_file} not found{hint}")
        try:
            with open(meta_file) as f:
                meta = json.load(f)
        except ValueError as e:
            raise DatastoreError(f"Datastore.open: {meta_file} is not valid JSON ({e})") from None
        if meta.get("format_version") != FORMAT_VERSION:
            raise DatastoreError(f"Datastore.open: {path} has format version "
                                 f"{meta.get('format_version')!r}; this knnfast reads {FORMAT_VERSION}")
        for name in FILES:
            f = os.path.join(path, name)
            want = meta["bytes"][name]
            have = os.path.getsize(f) if os.path.exists(f) else None
            if have != want:
                raise DatastoreError(
                    f"Datastore.open: {f} has {have if have is not None else 'no'} bytes but "
                    f"meta.json says {want} (N={meta['size']}, D={meta['dim']}): the datastore "
                    f"is truncated or was modified after it was built")
        n, d, key_dtype = meta["size"], meta["dim"], KEY_DTYPES[meta["key_dtype"]]
        keys = _memmap(os.path.join(path, "keys"), _STORAGE[key_dtype], (n, d))
        if key_dtype == torch.bfloat16:
            keys = keys.view(torch.bfloat16)
        values = _memmap(os.path.join(path, "values"), np.int32, (n,))
        norms = _memmap(os.path.join(path, "key_sq_norms"), np.float32, (n,))
        return cls(path, meta, keys, values, norms, memmapped=True)

    # ---- properties

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
    def device(self) -> torch.device:
        return self.keys.device

    def __repr__(self) -> str:
        return (f"Datastore({self.path!r}, N={len(self)}, D={self.dim}, "
                f"keys={self.meta['key_dtype']}, metric={self.metric!r}, device={self.device})")

    def to(self, device: Union[str, torch.device]) -> "Datastore":
        """A datastore whose keys, values and |k|^2 live on ``device`` (copied in chunks;
        ``to("cpu")`` loads a memmapped datastore into RAM). The index is shared."""
        device = torch.device(device)
        keys = torch.empty(self.keys.shape, dtype=self.keys.dtype, device=device)
        row_bytes = self.keys.shape[1] * self.keys.element_size()
        for s, e in _row_chunks(len(self), row_bytes):
            keys[s:e].copy_(self.keys[s:e])
        other = Datastore(self.path, self.meta, keys, self.values.to(device, copy=True),
                          self.key_sq_norms.to(device, copy=True))
        other._index = self._index
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

    # ---- search

    def search(self, queries: Tensor, k: int, exact: Optional[bool] = None,
               rescore: Optional[bool] = None, *, metric: Optional[str] = None,
               exclude: Optional[Tensor] = None, nprobe: Optional[int] = None
               ) -> Tuple[Tensor, Tensor]:
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
        datastores larger than RAM work. Results are on the queries' device.
        """
        metric = metric or self.metric
        if metric not in ops.METRICS:
            raise ValueError(f"Datastore.search: metric must be one of {ops.METRICS}, got {metric!r}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"Datastore.search: queries must have shape [B, {self.dim}], "
                             f"got {tuple(queries.shape)}")
        if exact is None:
            exact = self._index is None and not self.has_saved_index()
        rescore = exact if rescore is None else rescore
        if exact:
            scores, ids = self._exact_search(queries, k, metric, exclude)
            if not rescore:
                scores = self._approximate_scores(queries, ids, metric)
        else:
            scores, ids = self._index_search(queries, k, metric, exclude, nprobe)
            if rescore:
                scores, ids = self._rescore(queries, ids, metric)
        return scores.to(queries.device), ids.to(queries.device)

    def _exact_search(self, queries: Tensor, k: int, metric: str,
                      exclude: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        q = queries.detach().to(self.keys.device)
        excl = None if exclude is None else exclude.to(self.keys.device, torch.int64)
        norms = self.key_sq_norms if metric != "ip" else None
        if not self.is_memmapped:
            return ops.knn_search(q, self.keys, k, metric, key_sq_norms=norms, exclude=excl)
        best_s = best_i = None
        row_bytes = self.dim * self.keys.element_size()
        for s, e in _row_chunks(len(self), row_bytes, 4 * _CHUNK_BYTES):
            local_excl = None
            if excl is not None:
                local_excl = torch.where((excl >= s) & (excl < e), excl - s, -1)
            cs, ci = ops.knn_search(q, self.keys[s:e], k, metric,
                                    key_sq_norms=None if norms is None else norms[s:e],
                                    exclude=local_excl)
            ci = torch.where(ci >= 0, ci + s, ci)
            best_s, best_i = (cs, ci) if best_s is None else _merge_topk(best_s, best_i, cs, ci, k)
        return best_s, best_i

    @property
    def is_memmapped(self) -> bool:
        """True while the keys are read from disk (not yet moved with ``to``)."""
        return self._memmapped

    def _rescore(self, queries: Tensor, ids: Tensor, metric: str) -> Tuple[Tensor, Tensor]:
        q = queries.detach().to(self.keys.device)
        scores = ops.knn_rescore(q, self.keys, ids.to(self.keys.device), metric)
        return _sort_by_score(scores, ids.to(self.keys.device))

    # ---- FAISS index

    def has_saved_index(self) -> bool:
        return self.path is not None and os.path.exists(os.path.join(self.path, "index.faiss"))

    def build_index(self, factory: Optional[str] = None, metric: Optional[str] = None,
                    train_size: int = 1_000_000, device: str = "auto", *, nprobe: int = 32,
                    seed: int = 0, save: bool = True, progress: bool = True) -> Any:
        """Train and fill a FAISS index over the keys (saved as ``index.faiss``).

        Args:
            factory: any ``faiss.index_factory`` string. Default: "Flat" below 1M entries,
                "IVF4096,PQ64" from 1M on (PQ sub-quantizers reduced to divide D).
            metric: "l2" or "ip"; "cos" indexes normalized keys with inner product.
            train_size: keys sampled (seeded) to train the quantizers.
            device: "auto" (GPU when faiss has GPUs and torch sees CUDA), "cpu" or "cuda".
            nprobe: IVF lists visited per query (stored, overridable in ``search``).
        """
        import faiss
        metric = metric or self.metric
        if metric not in ops.METRICS:
            raise ValueError(f"Datastore.build_index: metric must be one of {ops.METRICS}, got {metric!r}")
        factory = factory or default_factory(len(self), self.dim)
        faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        try:
            index = faiss.index_factory(self.dim, factory, faiss_metric)
        except RuntimeError as e:
            raise ValueError(f"Datastore.build_index: faiss rejected factory {factory!r}: "
                             f"{str(e).strip().splitlines()[-1]}") from None
        use_gpu = _resolve_faiss_device(device)
        res = faiss.StandardGpuResources() if use_gpu else None
        work = faiss.index_cpu_to_gpu(res, 0, index) if use_gpu else index
        if not index.is_trained:
            gen = torch.Generator().manual_seed(seed)
            n_train = min(len(self), train_size)
            pick = torch.randperm(len(self), generator=gen)[:n_train].sort().values
            sample = _faiss_rows(self.keys.cpu()[pick] if self.keys.is_cuda else self.keys[pick], metric)
            try:
                work.train(sample)
            except RuntimeError as e:
                raise ValueError(f"Datastore.build_index: training {factory!r} on {n_train} keys "
                                 f"failed: {str(e).strip().splitlines()[-1]}") from None
        bar = _progress(len(self), "index add", progress)
        row_bytes = self.dim * self.keys.element_size()
        for s, e in _row_chunks(len(self), row_bytes):
            work.add(_faiss_rows(self.keys[s:e], metric))
            bar.update(e - s)
        bar.close()
        cpu_index = faiss.index_gpu_to_cpu(work) if use_gpu else work
        info = {"factory": factory, "metric": metric, "ntotal": int(cpu_index.ntotal),
                "nprobe": nprobe, "seed": seed, "train_size": min(len(self), train_size)}
        _set_nprobe(work, nprobe)
        self._index = _Index(work, info, res)
        if save and self.path is not None:
            tmp = os.path.join(self.path, "index.faiss.tmp")
            faiss.write_index(cpu_index, tmp)
            os.replace(tmp, os.path.join(self.path, "index.faiss"))
            _fsync_write_json(os.path.join(self.path, "index.json"), info)
        return work

    def load_index(self, device: str = "auto") -> Any:
        """Load ``index.faiss`` (onto the GPU when ``device`` allows)."""
        import faiss
        if not self.has_saved_index():
            raise DatastoreError(f"Datastore.load_index: no index.faiss in {self.path}; "
                                 f"call build_index first")
        with open(os.path.join(self.path, "index.json")) as f:
            info = json.load(f)
        index = faiss.read_index(os.path.join(self.path, "index.faiss"))
        if index.ntotal != len(self):
            raise DatastoreError(f"Datastore.load_index: index.faiss holds {index.ntotal} "
                                 f"entries but the datastore has {len(self)}; rebuild it")
        use_gpu = _resolve_faiss_device(device)
        res = faiss.StandardGpuResources() if use_gpu else None
        if use_gpu:
            index = faiss.index_cpu_to_gpu(res, 0, index)
        _set_nprobe(index, info.get("nprobe", 32))
        self._index = _Index(index, info, res)
        return index

    @property
    def index(self) -> Any:
        """The FAISS index (loaded from disk on first use)."""
        if self._index is None:
            self.load_index()
        return self._index.index

    def _index_search(self, queries: Tensor, k: int, metric: str, exclude: Optional[Tensor],
                      nprobe: Optional[int]) -> Tuple[Tensor, Tensor]:
        index = self.index
        if self._index.info["metric"] != metric:
            raise ValueError(f"Datastore.search: the index was built for metric "
                             f"{self._index.info['metric']!r}, not {metric!r}")
        if nprobe is not None:
            _set_nprobe(index, nprobe)
        extra = 0 if exclude is None else 1
        dist, ids = index.search(_faiss_rows(queries.detach(), metric), k + extra)
        scores = torch.from_numpy(dist).float()
        ids = torch.from_numpy(ids).long()
        if metric == "l2":
            scores = -scores
        scores = scores.masked_fill(ids < 0, float("-inf"))
        if exclude is not None:
            scores, ids = _drop_excluded(scores, ids, exclude.cpu().long(), k)
        return scores, ids

    def _approximate_scores(self, queries: Tensor, ids: Tensor, metric: str) -> Tensor:
        """Scores of given entries as the index sees them (its reconstructed keys)."""
        index = self.index
        import faiss
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.make_direct_map()
        flat_ids = ids.reshape(-1).cpu()
        valid = flat_ids >= 0
        recon = torch.zeros(flat_ids.numel(), self.dim)
        if valid.any():
            recon[valid] = torch.from_numpy(index.reconstruct_batch(flat_ids[valid].numpy()))
        recon = recon.view(*ids.shape, self.dim)
        q = _faiss_rows(queries.detach(), metric)
        q = torch.from_numpy(q)[:, None, :]
        scores = -((q - recon) ** 2).sum(-1) if metric == "l2" else (q * recon).sum(-1)
        return scores.masked_fill(ids.cpu() < 0, float("-inf"))

    # ---- subsampling

    def subsample(self, frac: float, seed: int = 0, path: Optional[PathLike] = None, *,
                  progress: bool = True) -> "Datastore":
        """A datastore of round(frac * N) entries drawn without replacement (seeded), in
        their original order. Written to ``path`` (default ``<path>.sub<frac>-s<seed>``)."""
        if not 0.0 < frac <= 1.0:
            raise ValueError(f"Datastore.subsample: frac must be in (0, 1], got {frac!r}")
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
            for s, e in _row_chunks(n, self.dim * self.keys.element_size()):
                rows = pick[s:e].to(self.keys.device)
                writer.add(self.keys[rows], self.values[rows])
        return writer.datastore


# --------------------------------------------------------------------------- helpers


def default_factory(n: int, dim: int) -> str:
    """"Flat" below 1M entries, else IVF4096 with 8-bit PQ (sub-quantizers dividing D)."""
    if n < FLAT_BELOW:
        return "Flat"
    m = max(d for d in range(1, 65) if dim % d == 0)
    return f"IVF4096,PQ{m}"


def _resolve_faiss_device(device: str) -> bool:
    import faiss
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and gpus == 0:
        raise ValueError("device='cuda' needs faiss-gpu with a visible GPU "
                         "(this faiss has no GPU support)")
    return device == "cuda" or (device == "auto" and gpus > 0 and torch.cuda.is_available())


def _set_nprobe(index: Any, nprobe: int) -> None:
    import faiss
    try:
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    except RuntimeError:  # not an IVF index
        pass
    except AttributeError:  # GPU index
        try:
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
        except RuntimeError:
            pass


def _faiss_rows(x: Tensor, metric: str) -> np.ndarray:
    """fp32 contiguous numpy rows as faiss wants them; cos rows are normalized."""
    x = x.detach().to("cpu", torch.float32)
    if metric == "cos":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return np.ascontiguousarray(x.numpy())


def _sort_by_score(scores: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Sort rows by score descending, ties to the smaller id (invalid -1 last)."""
    key_ids = torch.where(ids < 0, torch.iinfo(torch.int64).max, ids)
    order = key_ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, order), ids.gather(1, order)
    order = scores.argsort(dim=1, descending=True, stable=True)
    return scores.gather(1, order), ids.gather(1, order)


def _merge_topk(a_s: Tensor, a_i: Tensor, b_s: Tensor, b_i: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Merge two sorted top-k lists whose ids are disjoint and all of a's < all of b's:
    a stable descending sort of [a, b] keeps ties on the smaller id."""
    s = torch.cat([a_s, b_s], 1)
    i = torch.cat([a_i, b_i], 1)
    # A pad (-1, -inf) of a must not sit before a real entry of b that also scores -inf.
    pad_last = torch.where(i < 0, 1, 0)
    order = pad_last.argsort(dim=1, stable=True)
    s, i = s.gather(1, order), i.gather(1, order)
    order = s.argsort(dim=1, descending=True, stable=True)[:, :k]
    return s.gather(1, order), i.gather(1, order)


def _drop_excluded(scores: Tensor, ids: Tensor, exclude: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Remove each row's excluded id from k+1 candidates, keeping the first k others."""
    keep = ids != exclude[:, None]
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :k]
    return scores.gather(1, order), ids.gather(1, order)
