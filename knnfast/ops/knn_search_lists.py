"""knn_search_lists: exact top-k over the inverted lists each query probes, the search step of
an IVF index with exact in-list scores (wrapper + fake kernel; no autograd).

C++: csrc/cpu/knn_search_lists_cpu.cpp, csrc/cuda/knn_search_lists_cuda.cpp;
reference: knnfast.reference.knn_search_lists; tests: tests/test_knn_search_lists.py.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from . import args
from .library import OPS

#: Kernel plans per device type: CPU "scan" (each probed list read once for all its queries),
#: "rescore" (candidates scored by knn_rescore, then one topk: the code CUDA runs), "bf16" (a
#: ``pack_lists_bf16`` pack scanned with vdpbf16ps, survivors rescored exactly) or "int8" (a
#: ``pack_lists_int8`` pack scanned with vpdpbusd, the same way); CPU auto = the pack's plan on
#: a CPU with its instruction (AVX512-BF16 / AVX512-VNNI), else scan. CUDA: only "rescore".
PLANS = {"cpu": ("auto", "scan", "rescore", "bf16", "int8"), "cuda": ("auto", "rescore")}
#: The columns of ``ListsInt8.key_terms``.
INT8_KEY_TERMS = ("scale", "error", "residual_norm", "key_norm", "code_sum")
#: The largest D the int8 pack takes (255 * 127 * D must fit an int32).
INT8_MAX_DIM = 65536


class ListsBf16(NamedTuple):
    """The bf16 pack of a list layout (``pack_lists_bf16``), for ``knn_search_lists(pack=)``."""
    centers: Tensor         # [L, D] float32: each list's center (its keys' mean)
    residuals: Tensor       # [N, D] bfloat16: key - its list's center, rounded to nearest
    residual_norms: Tensor  # [N, 2] float32: |key - center|, |key| (from float64)


class ListsInt8(NamedTuple):
    """The int8 pack of a list layout (``pack_lists_int8``), for ``knn_search_lists(pack=)``."""
    centers: Tensor    # [L, D] float32: each list's center (its keys' mean)
    codes: Tensor      # [N, D] int8: round((key - center) / scale), in [-127, 127]
    key_terms: Tensor  # [N, 5] float32: INT8_KEY_TERMS (error rounded up; from float64)


def pack_lists_bf16(keys: Tensor, list_offsets: Tensor, centers: Optional[Tensor] = None,
                    *, chunk: int = 65536) -> ListsBf16:
    """Packs keys grouped by list for ``knn_search_lists(..., pack=)`` (plan "bf16").

    Each key is stored as its residual from its list's center, rounded to bfloat16, with the
    norms the plan's error bounds need. The search stays exact: the residuals only rank, with a
    rigorous bound per (query, key), and the survivors are rescored from ``keys``. The pack
    is as large as fp16 keys; build it once per layout.

    Args:
        keys: [N, D] float32/float16/bfloat16, grouped by list (as for knn_search_lists).
        list_offsets: [L + 1] integer offsets of the lists.
        centers: optional [L, D] centers; default each list's mean (the tightest bounds).
        chunk: keys converted per step (memory: chunk x D float64).

    Example:
        >>> keys = torch.randn(6, 4)
        >>> offsets = torch.tensor([0, 2, 6])
        >>> pack = pack_lists_bf16(keys, offsets)
        >>> s, i = knn_search_lists(keys[:2], keys, offsets, torch.tensor([[0], [1]]), k=2,
        ...                         pack=pack)
        >>> i[0].tolist()
        [0, 1]
    """
    centers32, list_of_row = list_centers("pack_lists_bf16", keys, list_offsets, centers)
    N, D = keys.shape
    residuals = torch.empty(N, D, dtype=torch.bfloat16, device=keys.device)
    norms = torch.empty(N, 2, dtype=torch.float32, device=keys.device)
    c64 = centers32.double()  # the center the kernel uses, exactly
    for first in range(0, N, chunk):
        k64 = keys[first:first + chunk].double()
        r64 = k64 - c64[list_of_row[first:first + chunk]]
        residuals[first:first + chunk] = r64.float()  # float64 -> fp32 -> bf16 (< 1 bf16 ulp)
        norms[first:first + chunk, 0] = r64.norm(dim=1).float()
        norms[first:first + chunk, 1] = k64.norm(dim=1).float()
    return ListsBf16(centers32, residuals, norms)


def pack_lists_int8(keys: Tensor, list_offsets: Tensor, centers: Optional[Tensor] = None,
                    *, chunk: int = 65536) -> ListsInt8:
    """Packs keys grouped by list for ``knn_search_lists(..., pack=)`` (plan "int8").

    As ``pack_lists_bf16``, at 1 byte per dimension: each key's residual from its list's
    center is stored as int8 codes with a per-key scale (its largest coordinate maps to 127)
    and the exact norm of what the rounding lost, which the plan's rigorous error bound uses;
    the survivors are rescored from ``keys``, so the search stays exact. Half the bytes of the
    bf16 pack for a scan to read; D <= 65536.

    Args:
        keys: [N, D] float32/float16/bfloat16, grouped by list (as for knn_search_lists).
        list_offsets: [L + 1] integer offsets of the lists.
        centers: optional [L, D] centers; default each list's mean (the tightest bounds).
        chunk: keys converted per step (memory: a few chunk x D float64).

    Example:
        >>> keys = torch.randn(6, 4)
        >>> offsets = torch.tensor([0, 2, 6])
        >>> pack = pack_lists_int8(keys, offsets)
        >>> s, i = knn_search_lists(keys[:2], keys, offsets, torch.tensor([[0], [1]]), k=2,
        ...                         pack=pack)
        >>> i[0].tolist()
        [0, 1]
    """
    op = "pack_lists_int8"
    centers32, list_of_row = list_centers(op, keys, list_offsets, centers)
    N, D = keys.shape
    args.need(D <= INT8_MAX_DIM, op, lambda: f"keys must have D <= {INT8_MAX_DIM}, got {D}")
    codes = torch.empty(N, D, dtype=torch.int8, device=keys.device)
    terms = torch.empty(N, len(INT8_KEY_TERMS), dtype=torch.float32, device=keys.device)
    c64 = centers32.double()
    up = 1.0 + (D + 2) * 2.0 ** -52  # past float64's rounding of D-term sums (then fp32's)
    for first in range(0, N, chunk):
        k64 = keys[first:first + chunk].double()
        r64 = k64 - c64[list_of_row[first:first + chunk]]
        # a non-finite key gets scale 0 and error inf (NaN): it reaches the exact rescoring
        # whenever its score might (+inf for ip), as in plan scan, and NaN never does
        finite = torch.isfinite(r64).all(dim=1, keepdim=True)
        scale = (r64.abs().amax(dim=1, keepdim=True) / 127).float().double()  # as the kernel
        scale = torch.where(finite, scale, torch.zeros_like(scale))
        q = torch.where(scale > 0, r64 / scale, torch.zeros_like(r64)).round().clamp(-127, 127)
        err = (r64 - q * scale).norm(dim=1) * up  # q * scale is exact in float64
        codes[first:first + chunk] = q.to(torch.int8)
        rows = terms[first:first + chunk]
        rows[:, 0] = scale[:, 0].float()
        rows[:, 1] = err.float() * (1 + 2.0 ** -22)
        rows[:, 2] = r64.norm(dim=1).float()
        rows[:, 3] = k64.norm(dim=1).float()
        rows[:, 4] = q.sum(dim=1).float()
    return ListsInt8(centers32, codes, terms)


def list_centers(op: str, keys: Tensor, list_offsets: Tensor, centers: Optional[Tensor]
                 ) -> Tuple[Tensor, Tensor]:
    """A pack's checked inputs: (centers [L, D] float32, finite; each key row's list [N])."""
    args.check_tensor(op, "keys", keys)
    args.check_tensor(op, "list_offsets", list_offsets)
    args.need(keys.dim() == 2 and keys.is_floating_point(), op,
              lambda: f"keys must be a float tensor [N, D], got {keys.dtype} "
                      f"{list(keys.shape)}")
    args.check_index_input(op, "list_offsets", list_offsets, dim=1)
    N, D = keys.shape
    offsets = list_offsets.long().cpu()
    sizes = offsets.diff()
    args.need(offsets.numel() >= 2 and int(offsets[0]) == 0 and int(offsets[-1]) == N
              and bool((sizes >= 0).all()), op,
              lambda: f"list_offsets must rise from 0 to N = {N}, got {offsets.tolist()[:8]}")
    L = sizes.numel()
    list_of_row = torch.repeat_interleave(torch.arange(L), sizes).to(keys.device)
    if centers is None:
        sums = torch.zeros(L, D, dtype=torch.float64, device=keys.device)
        sums.index_add_(0, list_of_row, keys.double())
        centers = sums / sizes.clamp_min(1).to(keys.device, torch.float64).unsqueeze(1)
    args.check_tensor(op, "centers", centers)
    args.need(tuple(centers.shape) == (L, D), op,
              lambda: f"centers must have shape [{L}, {D}], got {list(centers.shape)}")
    centers32 = centers.to(keys.device, torch.float32).nan_to_num(0.0, 0.0, 0.0).contiguous()
    return centers32, list_of_row


def knn_search_lists(queries: Tensor, keys: Tensor, list_offsets: Tensor, probes: Tensor,
                     k: int, metric: str = "l2", *, exclude: Optional[Tensor] = None,
                     plan: str = "auto", pack: Optional[Union[ListsBf16, ListsInt8]] = None
                     ) -> Tuple[Tensor, Tensor]:
    """Exact k nearest keys of every query among the lists it probes, in one call.

    The keys are grouped by list: list ``l`` is rows ``list_offsets[l]:list_offsets[l+1]``
    (an IVF index's inverted lists stored contiguously). Each query is scored exactly against
    the union of the lists in its row of ``probes``; every probed list is read once per call
    for all the queries that probe it, which is what makes batched decoding cheap.

    Args:
        queries: [B, D] float32/float16/bfloat16.
        keys: [N, D] float32/float16/bfloat16, grouped by list.
        list_offsets: [L + 1] integer: 0, non-decreasing, ending at N.
        probes: [B, P] integer list ids per query, in [-1, L); -1 = none; a list named twice
            in a row is searched once.
        k: neighbours per query, 1 <= k <= 2048; fewer candidates pad with (-inf, -1).
        metric: "l2" (score = -|q-k|^2), "ip" or "cos", as ``knn_search``.
        exclude: optional [B] integer: one key row per query never returned (-1 = none).
        plan: kernel variant (``PLANS``); every plan is exact. CPU "scan" (the default)
            reads each probed list once for all the queries that probe it; "rescore" expands
            the probed lists into candidates for ``knn_rescore`` and takes the k best by one
            topk (B x the most keys a row probes in memory; its scores are knn_rescore's, so
            near-ties may order differently): the code CUDA runs. "bf16" (needs ``pack``)
            ranks with the pack's bf16 residuals and a rigorous error bound per (query, key),
            then rescores the survivors from ``keys``; the default when a bf16 pack is given
            on a CPU with AVX512-BF16 (``build_info()["avx512_bf16"]``). "int8" (needs an
            int8 pack) does the same from int8 codes (half the bytes): the default when an
            int8 pack is given on a CPU with AVX512-VNNI (``"avx512_vnni" in
            build_info()["isa"]``).
        pack: optional ``pack_lists_bf16(keys, list_offsets)`` or ``pack_lists_int8(...)``,
            built once per layout; unused by the other plans and on CUDA (checked all the
            same).

    Returns:
        (scores [B, k] float32 descending, indices [B, k] int64 rows of ``keys``); ties go to
        the smaller row. Equal to ``knn_search`` over the probed rows only.

    Example:
        >>> keys = torch.randn(6, 4)
        >>> offsets = torch.tensor([0, 2, 6])            # list 0: rows 0-1, list 1: rows 2-5
        >>> s, i = knn_search_lists(keys[:2], keys, offsets, torch.tensor([[0], [1]]), k=2)
        >>> i[0].tolist(), sorted(i[1].tolist())[0] >= 2
        ([0, 1], True)
    """
    op = "knn_search_lists"
    check_lists_call(op, queries, keys, list_offsets, probes, k, metric, exclude)
    args.check_choice(op, "plan", plan, PLANS.get(queries.device.type, ("auto",)))
    if pack is not None and not isinstance(pack, (ListsBf16, ListsInt8)):
        raise ValueError(f"{op}: pack must come from knnfast.pack_lists_bf16 or "
                         f"pack_lists_int8, got {type(pack).__name__}")
    centers, residuals, norms = pack if pack is not None else (None, None, None)
    return OPS.knn_search_lists(queries, keys, list_offsets, probes, k, metric, exclude, plan,
                                centers, residuals, norms)


def check_lists_call(op: str, queries, keys, list_offsets, probes, k, metric, exclude) -> None:
    """What C++ cannot see: the Python types of the arguments, k and metric."""
    for name, t in (("queries", queries), ("keys", keys), ("list_offsets", list_offsets),
                    ("probes", probes)):
        args.check_tensor(op, name, t)
    if exclude is not None:
        args.check_tensor(op, "exclude", exclude)
    args.check_k(op, k)
    args.check_metric(op, metric)


def check_lists_meta(op: str, queries: Tensor, keys: Tensor, list_offsets: Tensor,
                     probes: Tensor, k: int, exclude: Optional[Tensor]) -> None:
    """The metadata rules of knn_search_lists (C++: check_knn_search_lists_args)."""
    args.check_search_meta(op, queries, keys, k, None, exclude)
    args.check_index_input(op, "list_offsets", list_offsets, dim=1)
    args.check_index_input(op, "probes", probes)
    args.check_same_device(op, queries, list_offsets=list_offsets, probes=probes)
    args.need(list_offsets.shape[0] >= 2, op,
              lambda: f"list_offsets must have shape [L + 1] with L >= 1 lists, got "
                      f"{list(list_offsets.shape)}")
    args.need(probes.shape[0] == queries.shape[0] and probes.shape[1] >= 1, op,
              lambda: f"probes must have shape [{queries.shape[0]}, P] with P >= 1 (list ids "
                      f"per query), got {list(probes.shape)}")


@torch.library.register_fake("knnfast::knn_search_lists")
def _(queries, keys, list_offsets, probes, k, metric, exclude, plan="auto", centers=None,
      residuals=None, residual_norms=None):
    op = "knn_search_lists"
    check_lists_meta(op, queries, keys, list_offsets, probes, k, exclude)
    parts = (centers, residuals, residual_norms)
    given = sum(t is not None for t in parts)
    args.need(given in (0, 3), op, lambda: f"centers, residuals and residual_norms come "
              f"together (knnfast.pack_lists_bf16 / pack_lists_int8 make all three); got "
              f"{given} of them")
    int8 = given == 3 and residuals.dtype == torch.int8
    if queries.device.type == "cpu":
        args.need(plan != "bf16" or (given == 3 and not int8), op,
                  lambda: 'plan "bf16" needs the bf16 pack (centers, residuals, '
                          'residual_norms from knnfast.pack_lists_bf16)')
        args.need(plan != "int8" or int8, op,
                  lambda: 'plan "int8" needs the int8 pack (from knnfast.pack_lists_int8)')
    if given:
        N, D = keys.shape
        L = list_offsets.shape[0] - 1
        for name, t, dtype, shape in (
                ("centers", centers, torch.float32, (L, D)),
                ("residuals", residuals, torch.int8 if int8 else torch.bfloat16, (N, D)),
                ("residual_norms", residual_norms, torch.float32, (N, 5 if int8 else 2))):
            args.check_same_device(op, queries, **{name: t})
            args.need(t.dtype == dtype and tuple(t.shape) == shape and t.is_contiguous(), op,
                      lambda: f"{name} must be a contiguous {dtype} tensor of shape "
                              f"{list(shape)}, got {t.dtype} {list(t.shape)}")
        args.need(not int8 or D <= INT8_MAX_DIM, op,
                  lambda: f"the int8 pack takes D <= {INT8_MAX_DIM}, got D = {D}")
    shape = (queries.shape[0], k)
    return (queries.new_empty(shape, dtype=torch.float32),
            queries.new_empty(shape, dtype=torch.int64))
