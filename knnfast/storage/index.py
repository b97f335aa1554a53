"""FAISS index helpers of a datastore: build (train + fill in chunks, CPU or GPU), save and
load (``index.faiss`` + ``index.json``), search (with a per-row excluded id) and the index's
own scores of given entries.

Public so that a caller can keep an index outside a ``Datastore`` (e.g. INK's training loop
trains the quantizers once and refills them for every refreshed datastore) and attach it
with ``Datastore.use_index``. faiss is imported only when a function needs it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .files import DatastoreError, fsync_write_json, progress_bar, row_chunks

#: below this many entries the default index is exact ("Flat")
FLAT_BELOW = 1_000_000
INDEX_FILE, INFO_FILE = "index.faiss", "index.json"


@dataclass
class FaissIndex:
    """A FAISS index and what it was built with (``info``: factory, metric, ntotal, nprobe,
    ...)."""
    index: Any
    info: dict
    gpu_resources: Any = None  # faiss.StandardGpuResources must outlive its GPU index


def default_factory(n: int, dim: int) -> str:
    """"Flat" below 1M entries, else IVF4096 with 8-bit PQ (sub-quantizers dividing D)."""
    if n < FLAT_BELOW:
        return "Flat"
    m = max(d for d in range(1, 65) if dim % d == 0)
    return f"IVF4096,PQ{m}"


def resolve_faiss_device(device: str) -> str:
    """Where an index lives: "cpu", "cuda" (GPU 0) or "all" (sharded over every visible GPU),
    from ``device`` ("auto": the GPU when faiss-gpu sees one and torch has CUDA)."""
    import faiss
    if device not in ("auto", "cpu", "cuda", "all"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'all', got {device!r}")
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device in ("cuda", "all") and gpus == 0:
        raise ValueError(f"device={device!r} needs faiss-gpu with a visible GPU "
                         f"(this faiss has no GPU support or sees no GPU)")
    if device == "auto":
        return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    return device


def to_device(index: Any, where: str) -> Tuple[Any, Any]:
    """(the index on ``where``, the GPU resources that must outlive it). "all" shards the
    entries over every visible GPU (each GPU holds 1/G of them and searches its part; FAISS
    merges the per-GPU top-k), for datastores larger than one GPU's memory."""
    import faiss
    if where == "cpu":
        return index, None
    if where == "cuda":
        res = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(res, 0, index), res
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    return faiss.index_cpu_to_all_gpus(index, co=options), None


def set_nprobe(index: Any, nprobe: int) -> None:
    """IVF lists visited per query; a no-op for indexes without lists."""
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


def faiss_rows(x: Tensor, metric: str) -> np.ndarray:
    """fp32 contiguous numpy rows as faiss wants them; cos rows are normalized."""
    return np.ascontiguousarray(faiss_queries(x, metric).numpy())


def add_keys(index: Any, keys: Tensor, metric: str, progress: bool = False) -> None:
    """Add keys [N, D] (memmapped or not) to a trained index, streamed in row chunks."""
    bar = progress_bar(keys.shape[0], "index add", progress)
    for s, e in row_chunks(keys.shape[0], keys.shape[1] * keys.element_size()):
        index.add(faiss_rows(keys[s:e], metric))
        bar.update(e - s)
    bar.close()


def build(keys: Tensor, factory: str, metric: str, *, train_size: int, device: str,
          nprobe: int, seed: int, progress: bool) -> Tuple[FaissIndex, Any]:
    """Train ``factory`` on a seeded sample of ``train_size`` keys and add every key.
    Returns (the index on its device, its CPU copy for saving)."""
    import faiss
    n, dim = keys.shape
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    try:
        index = faiss.index_factory(dim, factory, faiss_metric)
    except RuntimeError as e:
        raise ValueError(f"Datastore.build_index: faiss rejected factory {factory!r}: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    where = resolve_faiss_device(device)
    work, res = to_device(index, where)
    if not index.is_trained:
        gen = torch.Generator().manual_seed(seed)
        n_train = min(n, train_size)
        pick = torch.randperm(n, generator=gen)[:n_train].sort().values
        sample = faiss_rows(keys.cpu()[pick] if keys.is_cuda else keys[pick], metric)
        try:
            work.train(sample)
        except RuntimeError as e:
            raise ValueError(f"Datastore.build_index: training {factory!r} on {n_train} keys "
                             f"failed: {str(e).strip().splitlines()[-1]}") from None
    add_keys(work, keys, metric, progress)
    cpu_index = faiss.index_gpu_to_cpu(work) if where != "cpu" else work
    info = {"factory": factory, "metric": metric, "ntotal": int(cpu_index.ntotal),
            "seed": seed, "train_size": min(n, train_size)}
    if faiss.try_extract_index_ivf(cpu_index) is not None:  # nprobe means nothing elsewhere
        info["nprobe"] = nprobe
    set_nprobe(work, nprobe)
    return FaissIndex(work, info, res), cpu_index


def save(directory: str, cpu_index: Any, info: dict) -> None:
    """Write ``index.faiss`` (atomically renamed) and ``index.json`` into ``directory``."""
    import faiss
    tmp = os.path.join(directory, INDEX_FILE + ".tmp")
    faiss.write_index(cpu_index, tmp)
    os.replace(tmp, os.path.join(directory, INDEX_FILE))
    fsync_write_json(os.path.join(directory, INFO_FILE), info)


def has_saved(directory: Optional[str]) -> bool:
    """True when ``directory`` holds an ``index.faiss``."""
    return directory is not None and os.path.exists(os.path.join(directory, INDEX_FILE))


def load(directory: str, size: int, device: str = "auto") -> FaissIndex:
    """Read the index saved in ``directory`` (onto the GPU when ``device`` allows); its entry
    count must equal ``size``."""
    import faiss
    if not has_saved(directory):
        raise DatastoreError(f"Datastore.load_index: no {INDEX_FILE} in {directory}; "
                             f"call build_index first")
    with open(os.path.join(directory, INFO_FILE)) as f:
        info = json.load(f)
    index = faiss.read_index(os.path.join(directory, INDEX_FILE))
    if index.ntotal != size:
        raise DatastoreError(f"Datastore.load_index: {INDEX_FILE} holds {index.ntotal} "
                             f"entries but the datastore has {size}; rebuild it")
    index, res = to_device(index, resolve_faiss_device(device))
    set_nprobe(index, info.get("nprobe", 32))
    return FaissIndex(index, info, res)


def search(idx: FaissIndex, queries: Tensor, k: int, metric: str, exclude: Optional[Tensor],
           nprobe: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The index's k neighbours and scores (larger = closer, -inf pads); ``exclude`` [B] drops
    one entry id per row (one extra candidate is fetched). FAISS is called with torch tensors
    (``faiss.contrib.torch_utils``): CUDA queries of a single-GPU index stay on the GPU and so
    do the results; everything else goes through the CPU."""
    if idx.info["metric"] != metric:
        raise ValueError(f"Datastore.search: the index was built for metric "
                         f"{idx.info['metric']!r}, not {metric!r}")
    if nprobe is not None:
        set_nprobe(idx.index, nprobe)
    extra = 0 if exclude is None else 1
    on_one_gpu = hasattr(idx.index, "getDevice")  # GPU index classes; not IndexShards
    dist, ids = _torch_search(idx.index, faiss_queries(queries, metric, keep_cuda=on_one_gpu),
                              k + extra)
    scores, ids = dist.float(), ids.long()
    if metric == "l2":
        scores = -scores
    scores = scores.masked_fill(ids < 0, float("-inf"))
    if exclude is not None:
        scores, ids = drop_excluded(scores, ids, exclude.to(ids.device).long(), k)
    return scores, ids


def faiss_queries(x: Tensor, metric: str, keep_cuda: bool = False) -> Tensor:
    """fp32 contiguous query rows (cos rows normalized) on the CPU; CUDA rows stay on the GPU
    with ``keep_cuda`` (an index that lives on one GPU; others take host memory)."""
    x = x.detach().to(x.device if keep_cuda and x.is_cuda else "cpu", torch.float32)
    if metric == "cos":
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return x.contiguous()


def _torch_search(index: Any, queries: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """``index.search`` on torch tensors (torch_utils' wrappers; numpy where a FAISS build
    lacks them, so the results are torch tensors either way)."""
    try:
        import faiss.contrib.torch_utils  # noqa: F401 - registers the torch-tensor methods
    except ImportError:
        dist, ids = index.search(queries.cpu().numpy(), k)
        return torch.from_numpy(dist), torch.from_numpy(ids)
    return index.search(queries, k)


def reconstructed_scores(index: Any, queries: Tensor, ids: Tensor, metric: str) -> Tensor:
    """Scores of given entries as the index sees them (its reconstructed keys), CPU."""
    import faiss
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()  # once per index: it walks every list
    flat_ids = ids.reshape(-1).cpu()
    valid = flat_ids >= 0
    recon = torch.zeros(flat_ids.numel(), index.d)
    if valid.any():
        recon[valid] = torch.from_numpy(index.reconstruct_batch(flat_ids[valid].numpy()))
    recon = recon.view(*ids.shape, index.d)
    q = torch.from_numpy(faiss_rows(queries.detach(), metric))[:, None, :]
    scores = -((q - recon) ** 2).sum(-1) if metric == "l2" else (q * recon).sum(-1)
    return scores.masked_fill(ids.cpu() < 0, float("-inf"))


def drop_excluded(scores: Tensor, ids: Tensor, exclude: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Remove each row's excluded id from k+1 candidates, keeping the first k others."""
    keep = ids != exclude[:, None]
    order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :k]
    return scores.gather(1, order), ids.gather(1, order)
