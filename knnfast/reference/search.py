"""Reference knn_search and knn_rescore: a matmul per key tile + torch.topk + a merge into a
running top-k (never a B x N matrix), as a competent PyTorch user would write it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..ops import args
from ..ops.knn_rescore import check_rescore_meta
from ..ops.knn_search_lists import check_lists_call, check_lists_meta
from ..topk import merge_topk
from .common import COS_EPS, NEG_INF

# Keys scored per tile in knn_search: bounds the temporary at B x KEY_TILE floats.
KEY_TILE = 65536


def topk_smallest_index(s: Tensor, kk: int) -> Tuple[Tensor, Tensor]:
    """Top-kk of each row of s (no NaN), ties at the k-th value to the smaller index.

    Returns (values, positions), unordered within a row except that positions
    are a valid top-kk set. torch.topk alone leaves the choice among equal
    values at the boundary unspecified; rows where that matters are redone
    with an exact (threshold + cumulative count) selection.
    """
    vals, pos = torch.topk(s, kk, dim=1, largest=True, sorted=False)
    thr = vals.amin(dim=1, keepdim=True)
    n_ge = (s >= thr).sum(dim=1)
    tied = n_ge > kk
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        sub, t = s[rows], thr[rows]
        gt = sub > t
        eq = sub == t
        need = kk - gt.sum(dim=1, keepdim=True)
        sel = gt | (eq & (torch.cumsum(eq.to(torch.int64), dim=1) <= need))
        p = sel.nonzero()[:, 1].view(rows.numel(), kk)  # row-major: ascending position
        vals[rows] = sub.gather(1, p)
        pos[rows] = p
    return vals, pos


def sorted_candidates(scores: Tensor, ids: Tensor) -> Tuple[Tensor, Tensor]:
    """Candidates of one tile ordered by (-score, id), the order merge_topk expects."""
    ids, order = torch.sort(ids, dim=1)
    scores = scores.gather(1, order)
    scores, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return scores, ids.gather(1, order)


def tile_scores(q: Tensor, q_sq: Optional[Tensor], q_norm: Optional[Tensor],
                kt: Tensor, kt_sq: Optional[Tensor], metric: str) -> Tensor:
    dots = q @ kt.t()  # [B, T] float32
    if metric == "ip":
        return dots
    if metric == "l2":
        d = (q_sq - 2.0 * dots) + kt_sq.unsqueeze(0)
        return -d.clamp_min_(0.0)
    k_norm = kt_sq.sqrt().clamp_min(COS_EPS)
    return dots / (q_norm * k_norm.unsqueeze(0))


def check_search(queries, keys, k, metric, key_sq_norms, exclude) -> None:
    """Exactly the rules of the fused op (knnfast.ops.args + the kernels' value checks)."""
    op = "knn_search"
    args.check_tensor(op, "queries", queries)
    args.check_tensor(op, "keys", keys)
    args.check_k(op, k)
    args.check_metric(op, metric)
    args.check_search_meta(op, queries, keys, k, key_sq_norms, exclude)
    args.check_values_queries(op, queries.float())
    if exclude is not None:
        args.check_values_ids(op, "exclude", exclude, keys.shape[0], where="row")


def knn_search(queries: Tensor, keys: Tensor, k: int, metric: str = "l2", *,
               key_sq_norms: Optional[Tensor] = None,
               exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact top-k by score. Returns (scores[B,k] float32 descending, indices[B,k] int64)."""
    check_search(queries, keys, k, metric, key_sq_norms, exclude)
    B, N = queries.shape[0], keys.shape[0]
    q = queries.float()
    q_sq = (q * q).sum(dim=1, keepdim=True) if metric == "l2" else None
    q_norm = q.norm(dim=1, keepdim=True).clamp_min(COS_EPS) if metric == "cos" else None
    run_s = torch.full((B, k), NEG_INF, dtype=torch.float32, device=queries.device)
    run_i = torch.full((B, k), -1, dtype=torch.int64, device=queries.device)
    if B == 0:
        return run_s, run_i
    if exclude is not None:
        ex_rows = (exclude >= 0).nonzero().squeeze(1)
        ex_ids = exclude[ex_rows].long()
    for start in range(0, N, KEY_TILE):
        end = min(start + KEY_TILE, N)
        kt = keys[start:end].float()
        kt_sq = None
        if metric != "ip":
            kt_sq = (key_sq_norms[start:end].float() if key_sq_norms is not None
                     else (kt * kt).sum(dim=1))
        s = tile_scores(q, q_sq, q_norm, kt, kt_sq, metric)
        s = torch.nan_to_num_(s, nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF)
        if exclude is not None and ex_rows.numel():
            inside = (ex_ids >= start) & (ex_ids < end)
            s[ex_rows[inside], ex_ids[inside] - start] = NEG_INF
        vals, pos = topk_smallest_index(s, min(k, end - start))
        run_s, run_i = merge_topk(run_s, run_i, *sorted_candidates(vals, pos + start), k)
    run_i = run_i.masked_fill(run_s == NEG_INF, -1)
    return run_s.contiguous(), run_i.contiguous()


def knn_rescore(queries: Tensor, keys: Tensor, indices: Tensor, metric: str = "l2") -> Tensor:
    """Exact float32 scores of the given candidate ids; id -1 -> -inf."""
    op = "knn_rescore"
    for name, t in (("queries", queries), ("keys", keys), ("indices", indices)):
        args.check_tensor(op, name, t)
    args.check_metric(op, metric)
    check_rescore_meta(op, queries, keys, indices)
    q = queries.float()
    args.check_values_queries(op, q)
    args.check_values_ids(op, "indices", indices, keys.shape[0])
    indices = indices.long()
    valid = indices >= 0
    kg = keys[indices.clamp(min=0)].float()  # [B, k, D]; only the candidate rows
    if metric == "l2":
        s = -(kg - q.unsqueeze(1)).pow(2).sum(dim=-1)
    else:
        s = torch.bmm(kg, q.unsqueeze(2)).squeeze(2)
        if metric == "cos":
            qn = q.norm(dim=1, keepdim=True).clamp_min(COS_EPS)
            kn = kg.norm(dim=-1).clamp_min(COS_EPS)
            s = s / (qn * kn)
    return s.masked_fill(~valid, NEG_INF).contiguous()




def knn_search_lists(queries: Tensor, keys: Tensor, list_offsets: Tensor, probes: Tensor,
                     k: int, metric: str = "l2", *,
                     exclude: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Exact top-k of each query over the lists it probes: a loop over the probed lists, each
    scored (matmul) against the queries that probe it and merged into their running top-k,
    as one would write an IVF scan in PyTorch."""
    op = "knn_search_lists"
    check_lists_call(op, queries, keys, list_offsets, probes, k, metric, exclude)
    check_lists_meta(op, queries, keys, list_offsets, probes, k, exclude)
    q = queries.float()
    args.check_values_queries(op, q)
    N, L = keys.shape[0], list_offsets.shape[0] - 1
    check_values_offsets(op, list_offsets, N)
    args.check_values_ids(op, "probes", probes, L)
    if exclude is not None:
        args.check_values_ids(op, "exclude", exclude, N, where="row")
    B = q.shape[0]
    run_s = torch.full((B, k), NEG_INF, dtype=torch.float32, device=q.device)
    run_i = torch.full((B, k), -1, dtype=torch.int64, device=q.device)
    member = torch.zeros(B, L + 1, dtype=torch.bool, device=q.device)  # column L: "none"
    member.scatter_(1, torch.where(probes < 0, L, probes.long()), True)
    offsets = list_offsets.tolist()
    for lst in member[:, :L].any(0).nonzero().flatten().tolist():
        start, end = offsets[lst], offsets[lst + 1]
        if start == end:
            continue
        rows = member[:, lst].nonzero().flatten()
        kt = keys[start:end].float()
        qr = q[rows]
        kt_sq = (kt * kt).sum(dim=1) if metric != "ip" else None
        q_sq = (qr * qr).sum(dim=1, keepdim=True) if metric == "l2" else None
        q_norm = qr.norm(dim=1, keepdim=True).clamp_min(COS_EPS) if metric == "cos" else None
        s = tile_scores(qr, q_sq, q_norm, kt, kt_sq, metric)
        s = torch.nan_to_num_(s, nan=NEG_INF, posinf=float("inf"), neginf=NEG_INF)
        if exclude is not None:
            ex = exclude[rows].long()
            hit = (ex >= start) & (ex < end)
            s[hit.nonzero().flatten(), ex[hit] - start] = NEG_INF
        vals, pos = topk_smallest_index(s, min(k, end - start))
        run_s[rows], run_i[rows] = merge_topk(run_s[rows], run_i[rows],
                                              *sorted_candidates(vals, pos + start), k)
    run_i = run_i.masked_fill(run_s == NEG_INF, -1)
    return run_s.contiguous(), run_i.contiguous()


def check_values_offsets(op: str, list_offsets: Tensor, entries: int) -> None:
    """list_offsets partition the key rows: start at 0, never decrease, end at N."""
    o = list_offsets.long()
    bad = torch.zeros_like(o, dtype=torch.bool)
    bad[0] = o[0] != 0
    bad[1:] = o[1:] < o[:-1]
    bad[-1] |= o[-1] != entries
    bad |= o > entries
    pos = args.first_bad(bad)
    if pos is not None:
        args.fail(op, f"list_offsets must start at 0, never decrease and end at N = {entries} "
                      f"(the keys' rows), got {int(o[pos])} at position {pos}")
