"""knn_search_lists: one decoding step's IVF search, fused vs the pure-PyTorch reference (a
loop over the probed lists) vs FAISS IndexIVFFlat at the same lists and nprobe.

Shape: the demo's kNN-MT step, B = 64 queries (batch 16 x beam 4) over N = 132,016 float16
keys of D = 128 in 256 lists (what IVF256 makes of clustered data), nprobe 16, k = 8; the
queries come in groups of 4 near one key (beams of one sentence probe alike). The probes are
computed once outside the timing (the same for every impl). "fused" is plan scan; "fused_bf16"
and "fused_int8" are plans bf16 and int8 over the layout's ``pack_lists_bf16`` /
``pack_lists_int8`` pack (built outside the timing, as ``Datastore.use_lists`` builds it once).
"""

from __future__ import annotations

import os
from functools import lru_cache

import pytest
import torch

import knnfast
from knnfast import pack_lists_bf16, pack_lists_int8

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")

SHAPES = ((16, 8, 20_000, 64, 64, 8),) if QUICK else ((64, 8, 132_016, 128, 256, 16),)
IMPLS = ("fused", "fused_bf16", "fused_int8", "reference", "faiss")
# a packed plan, the build_info() flag of its instruction, the packer
PACKED = {"fused_bf16": ("bf16", "avx512_bf16", pack_lists_bf16),
          "fused_int8": ("int8", "avx512_vnni", pack_lists_int8)}
METRIC = "l2"
SEED = 1717


@lru_cache(maxsize=1)
def _data(b, k, n, d, nlist, nprobe):
    import faiss
    g = torch.Generator().manual_seed(SEED)
    centers = torch.randn(nlist // 4, d, generator=g) * 3
    keys = (centers[torch.randint(0, centers.shape[0], (n,), generator=g)]
            + torch.randn(n, d, generator=g)).half()
    near = keys[torch.randint(0, n, (b // 4,), generator=g)].float().repeat_interleave(4, 0)
    queries = near + 0.5 * torch.randn(b, d, generator=g)
    index = faiss.index_factory(d, f"IVF{nlist},Flat")
    index.train(keys.float().numpy())
    index.add(keys.float().numpy())
    index.nprobe = nprobe
    from knnfast.storage.lists import from_faiss
    layout = from_faiss(index, keys, nprobe, METRIC)
    _, probes = torch.ops.knnfast.knn_search(queries, layout.centroids, nprobe, "l2", None,
                                             None, "stream")
    packs = {impl: packer(layout.keys, layout.offsets) for impl, (_, _, packer) in PACKED.items()}
    return queries, layout, probes, index, packs


@pytest.fixture(scope="module", autouse=True)
def _free_inputs():
    yield
    _data.cache_clear()


@pytest.mark.parametrize("b,k,n,d,nlist,nprobe", SHAPES,
                         ids=[f"B{s[0]}-k{s[1]}-N{s[2]}-D{s[3]}-IVF{s[4]}-nprobe{s[5]}"
                              for s in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_knn_search_lists(kb, impl, b, k, n, d, nlist, nprobe):
    queries, layout, probes, index, packs = _data(b, k, n, d, nlist, nprobe)
    if impl == "faiss":
        q = queries.numpy()
        fn = lambda: index.search(q, k)  # noqa: E731
    elif impl in PACKED:
        plan, flag, _ = PACKED[impl]
        info = knnfast.build_info()
        if not (info.get(flag) or flag in info.get("isa", ())):
            pytest.skip(f"plan {plan} runs its portable body on this CPU (no {flag})")
        op = kb.op("knn_search_lists", "fused")
        fn = lambda: op(queries, layout.keys, layout.offsets, probes, k, METRIC,  # noqa: E731
                        plan=plan, pack=packs[impl])
    else:
        op = kb.op("knn_search_lists", impl)
        kw = {"plan": "scan"} if impl == "fused" else {}
        fn = lambda: op(queries, layout.keys, layout.offsets, probes, k, METRIC, **kw)  # noqa: E731
    kb.run(fn, op="knn_search_lists", impl=impl,
           shape={"B": b, "k": k, "N": n, "D": d, "L": nlist, "nprobe": nprobe},
           dtype="float16", metric=METRIC, query_dtype="float32")
