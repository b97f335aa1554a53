"""A FAISS IVF index's inverted lists, searched by knnfast's fused ``knn_search_lists``.

FAISS scans an IVF index query by query. Decoding searches a batch (sentences x beams) every
step, and the queries of one step probe largely the same lists, so ``ListLayout`` keeps the
datastore's keys in list order (a copy, in the keys' dtype) and the whole batch is searched in
one call: the probes come from an exact ``knn_search`` over the coarse centroids, then every
probed list is read once and scored exactly against all the queries that probe it. On
request (``pack="int8"`` / ``"bf16"``) the layout also packs the keys as residuals from their
list's mean (``pack_lists_int8`` / ``pack_lists_bf16``): the scan ranks with those and rescores
the few survivors exactly.

The neighbours are those of the same index at the same ``nprobe``, scored exactly from the
stored keys (for IVF-Flat: FAISS's own results up to ties and fp32 rounding; for IVF-PQ: the
lists' exact top-k, not the PQ approximation). Ids are datastore ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from .files import DatastoreError

#: The packs ``from_faiss`` (and ``Datastore.use_lists``) can keep: None, or the packer's kind.
PACKS = (None, "int8", "bf16")


@dataclass
class ListLayout:
    """The lists of one IVF index over one datastore's keys."""
    centroids: Tensor   # [L, D] float32, the coarse quantizer's
    offsets: Tensor     # [L + 1] int64: list l = positions offsets[l]:offsets[l + 1]
    ids: Tensor         # [N + 1] int64: position -> datastore id; ids[-1] = -1 (padding)
    positions: Tensor   # [N] int64: datastore id -> position
    keys: Tensor        # [N, D] the datastore's keys in list order
    probe_metric: str   # the quantizer's metric: "l2" or "ip"
    nprobe: int
    metric: str         # the index's (and datastore's) metric: "l2", "ip" or "cos"
    centroids_t: Tensor = None     # [D, L] the centroids transposed, contiguous (probe GEMM)
    neg_centroid_sq: Tensor = None  # [L] -|c|^2 (l2 probes)
    pack: Optional[Union[ops.ListsBf16, ops.ListsInt8]] = None  # the keys' residuals, or None
    plan: str = "auto"  # with a pack, auto runs its plan where the CPU has the instruction

    def __post_init__(self) -> None:
        self.centroids_t = self.centroids.t().contiguous()
        self.neg_centroid_sq = -(self.centroids * self.centroids).sum(1)


def from_faiss(index: Any, keys: Tensor, nprobe: int, metric: str,
               pack: Optional[str] = None) -> ListLayout:
    """The layout of a FAISS IVF ``index`` (CPU or GPU) built for ``metric`` over ``keys``
    [N, D] in order. ``pack`` ("int8", "bf16"; CPU only): also pack the keys as residuals for
    ``knn_search_lists``' plan of that name (exact; see ``Datastore.use_lists``)."""
    import faiss
    if hasattr(index, "getDevice"):
        index = faiss.index_gpu_to_cpu(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        raise DatastoreError(f"Datastore.use_lists: the index is {type(index).__name__}, not "
                             f"an IVF index (build one with a factory such as 'IVF1024,Flat')")
    if ivf.ntotal != keys.shape[0]:
        raise DatastoreError(f"Datastore.use_lists: the index holds {ivf.ntotal} entries but "
                             f"the datastore has {keys.shape[0]}; rebuild the index")
    nlist = ivf.nlist
    sizes = [ivf.invlists.list_size(l) for l in range(nlist)]
    ids = torch.empty(ivf.ntotal, dtype=torch.int64)
    at = 0
    for l, n in enumerate(sizes):
        if n:
            ids[at:at + n] = torch.from_numpy(
                faiss.rev_swig_ptr(ivf.invlists.get_ids(l), n).copy()).long()
            at += n
    positions = torch.empty_like(ids)
    positions[ids] = torch.arange(ids.numel())
    offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    offsets[1:] = torch.tensor(sizes, dtype=torch.int64).cumsum(0)
    # a tensor once faiss.contrib.torch_utils is imported, else numpy
    centroids = torch.as_tensor(ivf.quantizer.reconstruct_n(0, nlist)).float()
    device = keys.device
    padded = torch.cat([ids, ids.new_full((1,), -1)])  # position -1 (padding) -> id -1
    layout = ListLayout(centroids.to(device), offsets.to(device), padded.to(device),
                        positions.to(device), keys[ids.to(keys.device)].contiguous(),
                        "l2" if ivf.metric_type == faiss.METRIC_L2 else "ip", nprobe, metric)
    if pack is not None and device.type == "cpu":
        packer = ops.pack_lists_int8 if pack == "int8" else ops.pack_lists_bf16
        layout.pack = packer(layout.keys, layout.offsets)
    return layout


def search(layout: ListLayout, queries: Tensor, k: int, metric: str,
           exclude: Optional[Tensor], nprobe: Optional[int],
           rows: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(scores [B, k] exact, descending; datastore ids [B, k]) on the keys' device: the
    ``nprobe`` nearest lists of each query, then one ``knn_search_lists`` over them. ``rows``
    [B] bool: only those rows search (the others probe no list and get (-inf, -1) padding,
    at no cost and without splitting the batch)."""
    if metric != layout.metric:
        raise ValueError(f"Datastore.search: the index was built for metric "
                         f"{layout.metric!r}, not {metric!r}")
    nprobe = layout.nprobe if nprobe is None else nprobe
    if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
        raise ValueError(f"Datastore.search: nprobe must be an int >= 1, got {nprobe!r}")
    q = queries.detach().to(layout.keys.device)
    probe_q = q.float()
    if metric == "cos":  # the index holds normalized keys; its quantizer sees unit queries
        probe_q = probe_q / probe_q.norm(dim=1, keepdim=True).clamp_min(1e-8)
    probes = nearest_lists(layout, probe_q, min(nprobe, layout.centroids.shape[0]))
    if rows is not None:
        probes = probes.masked_fill(~rows.to(probes.device, torch.bool).view(-1, 1), -1)
    excl = None
    if exclude is not None:
        exclude = exclude.to(layout.keys.device, torch.int64)
        n = layout.positions.numel()
        bad = ((exclude < -1) | (exclude >= n)).nonzero()
        if bad.numel():
            row = int(bad[0, 0])
            raise ValueError(f"Datastore.search: exclude must hold ids in [-1, {n}), got "
                             f"{int(exclude[row])} at row {row}")
        excl = torch.where(exclude >= 0, layout.positions[exclude.clamp_min(0)], -1)
    scores, pos = ops.knn_search_lists(q, layout.keys, layout.offsets, probes, k, metric,
                                       exclude=excl, plan=layout.plan, pack=layout.pack)
    return scores, layout.ids[pos]  # one gather: padding position -1 reads the -1 at the end


def nearest_lists(layout: ListLayout, queries: Tensor, nprobe: int) -> Tensor:
    """The ``nprobe`` best lists of each query [B, nprobe]: one GEMM against the centroids
    and a top-k (a probe set, unordered; at B x L this small a fused knn_search call costs
    more than the work). NaN queries are refused later by knn_search_lists."""
    if layout.probe_metric == "l2":  # 2 q.c - |c|^2 = |q|^2 - |q - c|^2: the row's order
        scores = torch.addmm(layout.neg_centroid_sq, queries, layout.centroids_t, alpha=2.0)
    else:
        scores = queries @ layout.centroids_t
    return scores.topk(nprobe, dim=1, sorted=False).indices
