"""Smaller datastores (He et al. 2021, "Efficient Nearest Neighbor Language Models"):
greedy-merge pruning and key dimension reduction, each writing a new datastore through the
resumable chunk writer (atomic: ``path`` exists only when complete; a killed run resumes
with ``resume=True``, the default).

Pruning: every entry's k nearest neighbours are searched (stage 1, its own resumable build
``<path>.prune-neighbours``, deleted at the end); then entries are visited in id order and
each entry not yet merged absorbs those of its neighbours that come later, are not merged
yet and carry the same value (stage 2, deterministic, recomputed on resume). Kept entries
record their merge count (``counts.npy``), which the decoders use as a weight in the kNN
distribution (p_kNN(v) ∝ Σ_j c_j exp(s_j / τ)), and their id in the source store
(``source_ids.npy``).

Dimension reduction: keys = (k - mean) @ P with P [D_in, D] from PCA over a seeded sample of
keys (centred for "l2", uncentred for "ip"/"cos", whose scores centring would change) or a
seeded Gaussian random projection (N(0, 1/D) entries). P is stored with the datastore and
applied to queries by ``Datastore.search``, so decoders work unchanged.
"""
from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch import Tensor

from .building import ChunkedBuild
from .files import DatastoreError, PathLike, row_chunks
from .format import KEY_DTYPES
from .sidecar import COUNTS, PROJECTION, PROJECTION_MEAN, SOURCE_IDS, Projection, save_array

if TYPE_CHECKING:
    from .datastore import Datastore

METHODS = ("pca", "random")
NEIGHBOURS = ".prune-neighbours"


def _check_plain(ds: "Datastore", owner: str) -> None:
    if not hasattr(ds, "keys"):
        raise ValueError(f"{owner}: needs a single (unsharded) Datastore, got "
                         f"{type(ds).__name__}")


def _check_int(owner: str, name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{owner}: {name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _create(ds: "Datastore", path: PathLike, dim: int, extra: dict, *, resume: bool,
            overwrite: bool, size: int, progress: bool):
    """A DatastoreWriter for a store derived from ``ds`` (same dtype, vocabulary, metric)."""
    from .datastore import Datastore
    meta = ds.meta
    return Datastore.create(path, dim, KEY_DTYPES[meta["key_dtype"]], meta.get("vocab_size"),
                            meta["metric"], hidden=meta.get("hidden", "unknown"),
                            model_id=meta.get("model_id"), extra=extra, resume=resume,
                            overwrite=overwrite, expected_size=size, progress=progress)


def _derived_extra(ds: "Datastore", **items) -> dict:
    """``extra`` of a derived store: the source's, minus what describes the source's own
    entries (provenance), plus ``items``."""
    extra = {k: v for k, v in (ds.meta.get("extra") or {}).items() if k != "provenance"}
    extra.update(items)
    return extra


def _finish(writer, sidecars: dict):
    """Write the side arrays into the build directory, then finalize (atomic rename)."""
    try:
        for name, array in sidecars.items():
            save_array(writer.tmp_dir, name, array)
        return writer.finalize()
    except BaseException:
        writer.close()
        raise


# --------------------------------------------------------------------------- pruning


def neighbour_lists(ds: "Datastore", path: str, k: int, *, exact: Optional[bool],
                    nprobe: Optional[int], resume: bool) -> np.ndarray:
    """Stage 1 of ``prune``: [N, k] int64 ids of every entry's k nearest other entries
    (-1 pads), built resumably at ``path`` (reused when it was built for this store and k)."""
    n, row = len(ds), k * 8
    meta = {"kind": "prune-neighbours", "source": ds.fingerprint, "size": n, "k": k,
            "exact": exact, "nprobe": nprobe}
    if os.path.exists(path):
        done = _published_neighbours(path, meta)
        if done is not None:
            return done
        shutil.rmtree(path)
    build = ChunkedBuild(path, meta, {"ids": row}, owner="Datastore.prune", resume=resume,
                         overwrite=False)
    try:
        start = build.count
        for s, e in row_chunks(n - start, ds.dim * ds.keys.element_size() * 4):
            s, e = s + start, e + start
            own = torch.arange(s, e)
            _, ids = ds.search(ds.keys[s:e].float(), k, exact=exact, exclude=own, nprobe=nprobe,
                               projected=True)
            build.append({"ids": ids.cpu().numpy().astype(np.int64).tobytes()}, e - s, cursor=e)
        build.publish(dict(meta, rows=n))
    finally:
        build.release()
    return _published_neighbours(path, meta)


def _published_neighbours(path: str, meta: dict) -> Optional[np.ndarray]:
    import json
    try:
        with open(os.path.join(path, "meta.json")) as f:
            done = json.load(f)
    except (OSError, ValueError):
        return None
    if {k: done.get(k) for k in meta} != meta:
        return None
    ids = np.fromfile(os.path.join(path, "ids"), dtype=np.int64)
    if ids.size != meta["size"] * meta["k"]:
        return None
    return ids.reshape(meta["size"], meta["k"])


def greedy_merge(neighbours: np.ndarray, values: np.ndarray, counts: np.ndarray):
    """Stage 2 of ``prune``: (kept ids [M] ascending, their merged counts [M]). Entry i, if
    not merged yet, absorbs each neighbour j > i not merged yet with values[j] == values[i]."""
    n = len(values)
    counts = counts.astype(np.int64).copy()
    merged = np.zeros(n, dtype=bool)
    valid = neighbours >= 0
    later = valid & (neighbours > np.arange(n)[:, None])
    same = later & (values[np.where(valid, neighbours, 0)] == values[:, None])
    for i in np.flatnonzero(same.any(1)):   # only entries with a candidate need the loop
        if merged[i]:
            continue
        for j in neighbours[i][same[i]]:
            if not merged[j]:
                merged[j] = True
                counts[i] += counts[j]
    kept = np.flatnonzero(~merged)
    return kept, counts[kept]


def prune(ds: "Datastore", path: PathLike, k: int = 8, *, exact: Optional[bool] = None,
          nprobe: Optional[int] = None, resume: bool = True, overwrite: bool = False,
          progress: bool = True) -> "Datastore":
    """Greedy-merge pruning (module docstring) of ``ds`` into a new datastore at ``path``.

    Args:
        k: neighbours searched per entry (He et al. use up to 16 with an index).
        exact, nprobe: how stage 1 searches (as ``Datastore.search``; an index when the
            store has one, else exact).
        resume: continue an interrupted prune of the same store (the default);
            ``resume=False`` refuses to touch an interrupted one. overwrite: start over.
    Returns the pruned datastore (its ``counts`` say how many entries each one stands for).
    """
    owner = "Datastore.prune"
    _check_plain(ds, owner)
    from ..defaults import MAX_K
    k = _check_int(owner, "k", k, 1, MAX_K)
    path = os.fspath(path)
    scratch = path + NEIGHBOURS
    if overwrite:
        for p in (scratch, scratch + ".building"):
            if os.path.exists(p):
                shutil.rmtree(p)
    elif os.path.exists(path):
        raise FileExistsError(f"{owner}: {path} already exists; open it with Datastore.open "
                              f"or pass overwrite=True")
    neighbours = neighbour_lists(ds, scratch, k, exact=exact, nprobe=nprobe, resume=resume)
    counts = np.ones(len(ds), np.int64) if ds.counts is None else ds.counts.cpu().numpy()
    kept, kept_counts = greedy_merge(neighbours, ds.values.cpu().numpy(), counts)
    extra = _derived_extra(ds, counts=COUNTS, source_ids=SOURCE_IDS,
                           pruned={"from": ds.fingerprint, "from_path": ds.path, "k": k,
                                   "entries_before": len(ds)})
    writer = _create(ds, path, ds.dim, extra, resume=resume, overwrite=overwrite,
                     size=len(kept), progress=progress)
    sidecars = {COUNTS: kept_counts, SOURCE_IDS: kept.astype(np.int64)}
    try:
        if ds.projection is not None:   # the keys stay in the source's reduced space
            writer_projection(writer, ds.projection)
        _copy_rows(ds, writer, torch.from_numpy(kept), lambda keys: keys)
    except BaseException:
        writer.close()
        raise
    out = _finish(writer, sidecars)
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def _copy_rows(ds: "Datastore", writer, rows: Tensor, transform) -> None:
    """Append ``transform(keys[rows])`` / ``values[rows]`` from the writer's committed count
    on, in chunks; the cursor is the number of rows written."""
    row_bytes = ds.dim * ds.keys.element_size()
    start = writer.count
    for s, e in row_chunks(len(rows) - start, row_bytes):
        pick = rows[start + s:start + e].to(ds.keys.device)
        writer.add(transform(ds.keys[pick]), ds.values[pick], cursor=start + e)


def writer_projection(writer, projection: Projection) -> None:
    """The projection's files in the build directory (before any row: a resumed build finds
    them there)."""
    projection.save(writer.tmp_dir)


# --------------------------------------------------------------------------- reduction


def fit_projection(ds: "Datastore", dim: int, method: str, *, train_size: int,
                   seed: int) -> Projection:
    """P [D_in, dim] (module docstring), seeded."""
    d_in = ds.dim
    gen = torch.Generator().manual_seed(seed)
    if method == "random":
        matrix = torch.randn(d_in, dim, generator=gen, dtype=torch.float64) / dim ** 0.5
        return Projection(matrix, torch.zeros(d_in), "random")
    n = min(train_size, len(ds))
    pick = torch.randperm(len(ds), generator=gen)[:n].sort().values
    x = torch.cat([ds.keys[pick[s:e].to(ds.keys.device)].double().cpu()
                   for s, e in row_chunks(n, d_in * 8)])
    center = ds.metric == "l2"
    mean = x.mean(0) if center else torch.zeros(d_in, dtype=torch.float64)
    xc = x - mean
    _, vecs = torch.linalg.eigh(xc.T @ xc / max(n, 1))
    matrix = vecs.flip(1)[:, :dim]                      # largest eigenvalues first
    signs = torch.sign(matrix.gather(0, matrix.abs().argmax(0, keepdim=True)))
    signs = torch.where(signs == 0, 1.0, signs)
    return Projection(matrix * signs, mean, "pca")      # signs fixed: deterministic output


def reduce_dim(ds: "Datastore", path: PathLike, dim: int, method: str = "pca", *,
               train_size: int = 100_000, seed: int = 0, resume: bool = True,
               overwrite: bool = False, progress: bool = True) -> "Datastore":
    """A copy of ``ds`` at ``path`` whose keys are projected to ``dim`` < D dimensions
    (module docstring); merge counts of a pruned store are kept.

    Args:
        dim: the new key width, 1 <= dim < D. method: "pca" or "random".
        train_size: keys sampled (seeded) to fit the PCA.
        resume, overwrite: as ``prune``.
    """
    owner = "Datastore.reduce_dim"
    _check_plain(ds, owner)
    if ds.projection is not None:
        raise ValueError(f"{owner}: {ds.path} is already reduced (from {ds.query_dim} to "
                         f"{ds.dim} dims); reduce the original datastore instead")
    dim = _check_int(owner, "dim", dim, 1, ds.dim - 1)
    if method not in METHODS:
        raise ValueError(f"{owner}: method must be one of {METHODS}, got {method!r}")
    _check_int(owner, "train_size", train_size, 1, 1 << 62)
    path = os.fspath(path)
    extra = _derived_extra(ds, projection={"method": method, "input_dim": ds.dim,
                                           "file": PROJECTION, "mean_file": PROJECTION_MEAN},
                           reduced={"from": ds.fingerprint, "from_path": ds.path,
                                    "method": method, "seed": seed, "train_size": train_size})
    if ds.counts is not None:
        extra.update(counts=COUNTS)
    writer = _create(ds, path, dim, extra, resume=resume, overwrite=overwrite, size=len(ds),
                     progress=progress)
    try:
        projection = _resumed_projection(writer, ds.dim, dim, owner)
        if projection is None:
            projection = fit_projection(ds, dim, method, train_size=train_size, seed=seed)
            writer_projection(writer, projection)
        _copy_rows(ds, writer, torch.arange(len(ds)), projection)
    except BaseException:
        writer.close()
        raise
    sidecars = {} if ds.counts is None else {COUNTS: ds.counts.cpu().numpy().astype(np.int64)}
    return _finish(writer, sidecars)


def _resumed_projection(writer, d_in: int, dim: int, owner: str) -> Optional[Projection]:
    """The projection an interrupted reduction saved before its first row (None: none)."""
    if not os.path.exists(os.path.join(writer.tmp_dir, PROJECTION)):
        if writer.count:
            raise DatastoreError(f"{owner}: the interrupted build at {writer.tmp_dir} has "
                                 f"rows but no projection.npy; pass overwrite=True")
        return None
    return Projection.load(writer.tmp_dir, {"method": "resumed", "input_dim": d_in,
                                            "file": PROJECTION, "mean_file": PROJECTION_MEAN},
                           dim, owner)
