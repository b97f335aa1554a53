"""knn_search_lists: every test of the op.

Sections: the exact top-k over the probed lists (float64 oracle) and parity with
knnfast.reference; equivalences (every list probed = knn_search; duplicate and -1 probes);
properties (hypothesis); bad values; opcheck and torch.compile. Argument rules: the
knn_search_lists rows of tests/test_op_arguments.py. Storage (``Datastore.use_lists``):
tests/test_datastore_lists.py.

Kernel / variant -> tests:

  CPU plan scan: AVX-512 dot_tile16 (transpose-tree sums) every [cpu-scan] test
  CPU plan scan: portable body (KNNFAST_SIMD=generic)      test_portable_body_matches
  plan rescore (common/lists_rescore.cpp: CUDA's code)     every [cpu-rescore] test
  CUDA wrapper (plan rescore over knn_rescore's kernel)    every [cuda-rescore] test (never ran)
  CPU plans bf16, int8 (pack_lists_bf16 / _int8 packs)    tests/test_knn_search_lists_packed.py
"""
import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import KEY_DTYPES, METRICS, NEG_INF, both_simd_levels, exact_scores, score_scale


# (device, plan): every plan of every device; "rescore" on CPU is the composition CUDA runs
DEVICE_PLANS = [pytest.param("cpu", "scan", id="cpu-scan"),
                pytest.param("cpu", "rescore", id="cpu-rescore"),
                pytest.param("cuda", "rescore", id="cuda-rescore", marks=requires_cuda)]
CPU_PLANS = ["scan", "rescore"]


def random_lists(N, L, generator=None):
    """list_offsets [L + 1] cutting N rows into L lists (some may be empty)."""
    cuts = torch.sort(torch.randint(0, N + 1, (L - 1,), generator=generator)).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([N])])


def candidate_mask(offsets, probes, N):
    """[B, N] bool: row b may return key j (j lies in a list row b probes)."""
    L = offsets.numel() - 1
    list_of_row = torch.repeat_interleave(torch.arange(L), offsets[1:] - offsets[:-1])
    member = torch.zeros(probes.shape[0], L + 1, dtype=torch.bool)
    member.scatter_(1, torch.where(probes < 0, L, probes), True)
    return member[:, :L][:, list_of_row] if N else torch.zeros(probes.shape[0], 0, dtype=torch.bool)


def assert_lists_topk(scores, ids, q, keys, offsets, probes, k, metric, exclude=None,
                      rtol=1e-4, atol_rel=1e-4):
    """The result is the exact top-k of each row over its probed lists (float64 oracle):
    ids inside the probed lists, scores the exact scores of the ids, the j-th score equal to
    the true j-th, padding exactly where fewer candidates exist."""
    B, N = q.shape[0], keys.shape[0]
    assert scores.shape == (B, k) and ids.shape == (B, k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64
    s, idx = scores.cpu().double(), ids.cpu()
    full = torch.nan_to_num(exact_scores(q, keys, metric), nan=NEG_INF)
    full = full.masked_fill(~candidate_mask(offsets.cpu(), probes.cpu().long(), N), NEG_INF)
    if exclude is not None:
        rows = (exclude.cpu() >= 0).nonzero().flatten()
        full[rows, exclude.cpu()[rows]] = NEG_INF
    atol = atol_rel * score_scale(q, keys, metric)
    valid = idx >= 0
    assert torch.equal(~valid, torch.isneginf(s)), (s, idx)
    assert (s[:, :-1] >= s[:, 1:]).all()
    got = full.gather(1, idx.clamp_min(0)).masked_fill(~valid, NEG_INF)
    assert not torch.isneginf(got[valid]).any(), "an id outside the probed lists (or excluded)"
    for b in range(B):
        v = idx[b][valid[b]]
        assert v.unique().numel() == v.numel(), f"duplicate ids in row {b}"
    tol = (atol + rtol * got.abs()).masked_fill(~valid, 1.0)
    assert ((s - got).abs().masked_fill(~valid, 0.0) <= tol).all(), "scores are not exact"
    true = torch.sort(full, dim=1, descending=True).values[:, :k]
    if true.shape[1] < k:
        true = torch.cat([true, torch.full((B, k - true.shape[1]), NEG_INF, dtype=true.dtype)], 1)
    assert torch.equal(torch.isfinite(true), valid), "padding count differs from the candidates"
    tol = (atol + rtol * true.abs()).masked_fill(~valid, 1.0)
    assert ((got - true).abs().masked_fill(~valid, 0.0) <= tol).all(), "not the top k"


def case(B, N, D, L, P, dtype=torch.float32, device="cpu", seed=0, exclude=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g)
    keys = torch.randn(N, D, generator=g).to(dtype)
    offsets = random_lists(N, L, g)
    probes = torch.randint(-1, L, (B, P), generator=g)
    ex = torch.randint(-1, N, (B,), generator=g) if exclude else None
    move = lambda t: None if t is None else t.to(device)
    return move(q), move(keys), move(offsets), move(probes), move(ex)


# ------------------------------------------------------------------ the exact top-k, parity


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,L,P,k", [(1, 1, 1, 1, 1, 1), (3, 50, 7, 4, 2, 5),
                                         (37, 5000, 32, 40, 5, 8), (64, 20000, 128, 256, 16, 16),
                                         (5, 300, 17, 3, 3, 64), (20, 3000, 33, 100, 1, 3)])
def test_exact_over_probed_lists(device, plan, B, N, D, L, P, k, dtype, metric):
    q, keys, offsets, probes, ex = case(B, N, D, L, P, dtype, device, exclude=True)
    s, i = knnfast.knn_search_lists(q, keys, offsets, probes, k, metric, exclude=ex, plan=plan)
    assert s.device == q.device and i.device == q.device
    assert_lists_topk(s, i, q, keys, offsets, probes, k, metric, ex)
    rs, ri = ref.knn_search_lists(q, keys, offsets, probes, k, metric, exclude=ex)
    assert_lists_topk(rs, ri, q, keys, offsets, probes, k, metric, ex)


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
@pytest.mark.parametrize("metric", METRICS)
def test_every_list_probed_is_knn_search(device, plan, metric):
    """Probing all lists searches all keys: the same ids as knn_search, ties included (the
    data are integers, so ties are exact and go to the smaller row in both)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-3, 4, (23, 16), generator=g).float().to(device)
    keys = torch.randint(-3, 4, (2000, 16), generator=g).half().to(device)
    offsets = random_lists(2000, 30, g).to(device)
    probes = torch.arange(30).repeat(23, 1).to(device)
    s, i = knnfast.knn_search_lists(q, keys, offsets, probes, 12, metric, plan=plan)
    es, ei = knnfast.knn_search(q, keys, 12, metric)
    torch.testing.assert_close(s, es, rtol=1e-6, atol=1e-5)
    if plan == "rescore" and metric == "cos":
        # knn_rescore's cos, q.k / (|q| |k|), rounds differently from knn_search's (q.k / |k|)
        # / |q|: exact ties in real arithmetic may differ by an ulp, and then order differently
        return assert_lists_topk(s, i, q, keys, offsets, probes, 12, metric)
    assert torch.equal(i, ei)


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
def test_zero_scores_tie(device, plan):
    """Zero scores (ip: orthogonal keys; l2: exact matches, scored -0) tie and go to the
    smaller row."""
    q = torch.tensor([[1.0, 0.0]], device=device)
    keys = torch.tensor([[0.0, 5.0], [-0.0, -0.0], [1.0, 0.0], [-1.0, 0.0], [1.0, -0.0]],
                        device=device)
    args = (torch.tensor([0, 5], device=device), torch.tensor([[0]], device=device), 5)
    s, i = knnfast.knn_search_lists(q, keys, *args, "ip", plan=plan)
    assert i.cpu().tolist() == [[2, 4, 0, 1, 3]]
    assert s.cpu().tolist() == [[1.0, 1.0, 0.0, 0.0, -1.0]]
    s, i = knnfast.knn_search_lists(q, keys, *args, "l2", plan=plan)
    assert i.cpu().tolist() == [[2, 4, 1, 3, 0]] and s[0, :2].cpu().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
def test_duplicate_and_missing_probes(device, plan):
    """A list probed twice counts once; -1 probes nothing; a row without lists is padding."""
    q, keys, offsets, _, _ = case(4, 400, 8, 6, 1, device=device)
    once = torch.tensor([[2, -1, -1], [0, 5, -1], [-1, -1, -1], [3, 4, 1]], device=device)
    twice = torch.tensor([[2, 2, 2], [5, 0, 5], [-1, -1, -1], [1, 3, 4]], device=device)
    a = knnfast.knn_search_lists(q, keys, offsets, once, 7, "l2", plan=plan)
    b = knnfast.knn_search_lists(q, keys, offsets, twice, 7, "l2", plan=plan)
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert (a[1][2] == -1).all() and torch.isneginf(a[0][2]).all()
    assert_lists_topk(*a, q, keys, offsets, once, 7, "l2")


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
def test_empty_batch_and_empty_lists(device, plan):
    q, keys, offsets, probes, _ = case(0, 100, 8, 5, 2, device=device)
    s, i = knnfast.knn_search_lists(q, keys, offsets, probes, 3, plan=plan)
    assert s.shape == (0, 3) and i.shape == (0, 3)
    offsets = torch.tensor([0, 0, 100, 100], device=device)  # lists 0 and 2 are empty
    q = torch.randn(2, 8, device=device)
    probes = torch.tensor([[0, 2], [1, 0]], device=device)
    s, i = knnfast.knn_search_lists(q, keys, offsets, probes, 3, plan=plan)
    assert (i[0] == -1).all() and (i[1] >= 0).all()
    assert torch.isneginf(s[0]).all() and torch.isfinite(s[1]).all()


@pytest.mark.parametrize("plan", CPU_PLANS)
def test_nan_and_inf_keys(plan):
    """NaN keys are never returned; an inf key with ip is returned with its exact +-inf
    score (as knn_search does), and the padding after the candidates is (-inf, -1)."""
    q, keys, offsets, probes, _ = case(6, 300, 8, 3, 3)
    keys[::2] = float("nan")
    s, i = knnfast.knn_search_lists(q, keys, offsets, probes, 200, plan=plan)
    assert not torch.isnan(s).any()
    assert ((i < 0) | (i % 2 == 1)).all()
    assert torch.equal(torch.isneginf(s), i < 0)
    q = torch.ones(1, 8)
    keys = torch.zeros(10, 8)
    keys[3, 0] = float("inf")
    keys[6, 0] = -float("inf")
    s, i = knnfast.knn_search_lists(q, keys, torch.tensor([0, 10]), torch.tensor([[0]]), 12,
                                    "ip", plan=plan)
    es, ei = knnfast.knn_search(q, keys, 12, "ip")
    assert torch.equal(i, ei) and torch.equal(s, es)
    assert i[0, 0] == 3 and s[0, 0] == float("inf") and (i[0, -3:] == -1).all()


@pytest.mark.skipif(knnfast.build_info()["simd"] != "avx512", reason="CPU has no AVX-512")
def test_portable_body_matches():
    """KNNFAST_SIMD=generic (the portable dot loop) returns what the AVX-512 kernel does."""
    script = (
        "import json, sys, torch, knnfast\n"
        "g = torch.Generator().manual_seed(3)\n"
        "q = torch.randn(9, 37, generator=g); keys = torch.randn(3000, 37, generator=g).half()\n"
        "off = torch.tensor([0, 100, 1000, 1001, 2500, 3000])\n"
        "pr = torch.randint(-1, 5, (9, 3), generator=g)\n"
        "s, i = knnfast.knn_search_lists(q, keys, off, pr, 10, 'cos')\n"
        "json.dump([knnfast.build_info()['simd'], s.tolist(), i.tolist()], sys.stdout)\n")
    (s_fast, i_fast), (s_portable, i_portable) = both_simd_levels(script)
    assert i_fast == i_portable
    torch.testing.assert_close(torch.tensor(s_fast), torch.tensor(s_portable), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ properties


@given(B=st.integers(1, 20), N=st.integers(1, 400), D=st.integers(1, 40), L=st.integers(1, 30),
       P=st.integers(1, 6), k=st.integers(1, 40), metric=st.sampled_from(METRICS),
       seed=st.integers(0, 2**31 - 1), half=st.booleans())
def test_property_exact_over_probed_lists(B, N, D, L, P, k, metric, seed, half):
    q, keys, offsets, probes, ex = case(B, N, D, L, P, torch.float16 if half else torch.float32,
                                        seed=seed, exclude=True)
    s, i = knnfast.knn_search_lists(q, keys, offsets, probes, k, metric, exclude=ex)
    assert_lists_topk(s, i, q, keys, offsets, probes, k, metric, ex)
    # the rescore plan (CUDA's code) is exact too; its scores round differently (knn_rescore's
    # formulas), so near-ties may order differently: exact ties are tested on integer data
    rs, ri = knnfast.knn_search_lists(q, keys, offsets, probes, k, metric, exclude=ex,
                                      plan="rescore")
    assert_lists_topk(rs, ri, q, keys, offsets, probes, k, metric, ex)


# ------------------------------------------------------------------ bad values, opcheck, compile


@pytest.mark.parametrize("plan", CPU_PLANS)
def test_bad_values_name_the_argument(plan):
    """The same messages from the CPU kernel and from the rescore plan's tensor checks (the
    ones CUDA runs)."""
    q, keys, offsets, probes, _ = case(3, 50, 4, 4, 2)
    with pytest.raises(ValueError, match="knn_search_lists: list_offsets .* got 49 at position 4"):
        knnfast.knn_search_lists(q, keys, torch.tensor([0, 10, 20, 30, 49]), probes, 2, plan=plan)
    with pytest.raises(ValueError, match="knn_search_lists: list_offsets .* got 5 at position 2"):
        knnfast.knn_search_lists(q, keys, torch.tensor([0, 10, 5, 30, 50]), probes, 2, plan=plan)
    with pytest.raises(ValueError, match="knn_search_lists: list_offsets .* got 1 at position 0"):
        knnfast.knn_search_lists(q, keys, torch.tensor([1, 10, 20, 30, 50]), probes, 2, plan=plan)
    with pytest.raises(ValueError, match="knn_search_lists: probes must hold ids in \\[-1, 4\\)"):
        knnfast.knn_search_lists(q, keys, offsets, torch.full((3, 2), 4), 2, plan=plan)
    with pytest.raises(ValueError, match="knn_search_lists: exclude"):
        knnfast.knn_search_lists(q, keys, offsets, probes, 2, exclude=torch.tensor([0, 50, 1]),
                                 plan=plan)
    with pytest.raises(ValueError, match="knn_search_lists: .*quer"):
        knnfast.knn_search_lists(q.masked_fill(q > 0, float("nan")), keys, offsets, probes, 2,
                                 plan=plan)


def test_rescore_plan_accepts_and_rejects_what_scan_does():
    """tests/test_op_arguments.py's knn_search_lists rows through both CPU plans: the same
    calls accepted, the same messages for the rejected ones (the rescore plan's value checks
    are tensor code, CUDA's)."""
    from test_op_arguments import CASES, base_call, outcome
    rows = [c for c in CASES if c[0] == "knn_search_lists"]
    assert len(rows) > 20
    for _, name, change, _ in rows:
        results = []
        for plan in CPU_PLANS:
            a, kw = base_call("knn_search_lists")
            change(a, kw)
            results.append(outcome(knnfast.knn_search_lists, a, dict(kw, plan=plan)))
        assert results[0] == results[1], name


def test_bad_plan_names_the_plans_of_the_device():
    q, keys, offsets, probes, _ = case(3, 50, 4, 4, 2)
    with pytest.raises(ValueError, match=r"knn_search_lists: plan must be one of \('auto', "
                                         r"'scan', 'rescore', 'bf16', 'int8'\), got 'stream'"):
        knnfast.knn_search_lists(q, keys, offsets, probes, 2, plan="stream")
    with pytest.raises(ValueError, match=r"knn_search_lists: plan must be one of 'auto', "
                                         r"'scan', 'rescore', 'bf16', 'int8' on CPU, got 'tensor'"):
        torch.ops.knnfast.knn_search_lists(q, keys, offsets, probes, 2, "l2", None, "tensor")


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
def test_opcheck(device, plan):
    for dtype in (torch.float32, torch.float16):
        q, keys, offsets, probes, ex = case(5, 300, 16, 7, 3, dtype, device, exclude=True)
        for metric in METRICS:
            torch.library.opcheck(torch.ops.knnfast.knn_search_lists.default,
                                  (q, keys, offsets, probes, 4, metric, ex, plan))
            torch.library.opcheck(torch.ops.knnfast.knn_search_lists.default,
                                  (q, keys, offsets.int(), probes.int(), 4, metric, None, plan))


def test_compiles_without_graph_breaks():
    q, keys, offsets, probes, _ = case(6, 500, 16, 8, 3)

    @torch.compile(fullgraph=True, backend="eager")
    def step(q):
        s, i = knnfast.knn_search_lists(q, keys, offsets, probes, 5, "ip")
        return s.softmax(-1), i

    s, i = step(q)
    es, ei = knnfast.knn_search_lists(q, keys, offsets, probes, 5, "ip")
    assert torch.equal(i, ei)
    torch.testing.assert_close(s, es.softmax(-1))
