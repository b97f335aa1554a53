"""knn_search_lists' packed CPU plans: "bf16" (``pack_lists_bf16``) and "int8"
(``pack_lists_int8``), each test run for both (``kind``).

A plan ranks with the pack's residuals (bf16, or int8 codes with per-key scales and exact error
norms) and a rigorous error bound per (query, key), then rescores the survivors exactly, so it
must return what an exact search returns. The tests run it with configure("debug", 1), which
checks every approximate rank against float64 (the bound is what makes the plan exact), and
compare with the float64 oracle of tests/test_knn_search_lists.py.

Kernel / variant -> tests:

  dot_tile16_bf16 AVX512-BF16 / dot_tile16_int8       every test here (on a CPU with
    AVX512-VNNI body + vector push                    the instruction)
  portable bodies (KNNFAST_SIMD=generic)             test_portable_body_matches
  the bound itself (verify_tile)                     test_debug_catches_a_pack_of_other_keys
  the int8 quantization terms (b u_j)                test_int8_bound_needs_its_quantization_terms
  a row over the candidate cap -> plan scan          test_candidate_overflow_falls_back
"""
import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
from helpers import KEY_DTYPES, METRICS, both_simd_levels
from knnfast.ops import settings
from test_knn_search_lists import assert_lists_topk, case

HAS_BF16 = bool(knnfast.build_info().get("avx512_bf16"))
HAS_VNNI = "avx512_vnni" in knnfast.build_info().get("isa", ())
KINDS = ["bf16", "int8"]
PACK = {"bf16": knnfast.pack_lists_bf16, "int8": knnfast.pack_lists_int8}
FAST = {"bf16": HAS_BF16, "int8": HAS_VNNI}  # auto takes the pack on such a CPU


def clustered(B, N, D, L, P, dtype=torch.float32, seed=0, spread=3.0, offset=0.0):
    """Keys in L clusters (list l holds cluster l, as an IVF index makes them), queries near
    keys; a common offset of the whole space, like real hidden states'."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.multinomial(torch.ones(L), N, replacement=True, generator=g).bincount(
        minlength=L)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    centers = torch.randn(L, D, generator=g) * spread + offset
    keys = (centers.repeat_interleave(sizes, 0) + torch.randn(N, D, generator=g)).to(dtype)
    q = keys[torch.randint(0, N, (B,), generator=g)].float() + 0.3 * torch.randn(B, D, generator=g)
    probes = torch.randint(-1, L, (B, P), generator=g)
    return q, keys, offsets, probes


def search(kind, q, keys, offsets, probes, k, metric, **kw):
    pack = PACK[kind](keys, offsets)
    with settings.override(debug=True):  # every approximate rank checked against float64
        return knnfast.knn_search_lists(q, keys, offsets, probes, k, metric, plan=kind,
                                        pack=pack, **kw)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,L,P,k", [(1, 1, 1, 1, 1, 1), (3, 50, 7, 4, 2, 5),
                                         (37, 3000, 32, 40, 5, 8), (16, 4000, 128, 64, 8, 16),
                                         (5, 300, 17, 3, 3, 64), (20, 3000, 33, 100, 1, 3)])
def test_exact_random_keys(kind, B, N, D, L, P, k, dtype, metric):
    q, keys, offsets, probes, ex = case(B, N, D, L, P, dtype, exclude=True)
    s, i = search(kind, q, keys, offsets, probes, k, metric, exclude=ex)
    assert_lists_topk(s, i, q, keys, offsets, probes, k, metric, ex)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("offset", [0.0, 20.0])
@pytest.mark.parametrize("D", [64, 100])
def test_exact_clustered_keys_equal_plan_scan(kind, metric, offset, D):
    """Where the plan pays (lists are clusters): the ids of plan scan, scores within fp32."""
    q, keys, offsets, probes = clustered(48, 6000, D, 32, 6, torch.float16, offset=offset)
    s, i = search(kind, q, keys, offsets, probes, 8, metric)
    s0, i0 = knnfast.knn_search_lists(q, keys, offsets, probes, 8, metric, plan="scan")
    assert_lists_topk(s, i, q, keys, offsets, probes, 8, metric)
    torch.testing.assert_close(s, s0, rtol=1e-5, atol=1e-4 * s0.abs().max().item())
    assert (i == i0).float().mean() > 0.99  # near-ties may order differently


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
def test_exact_with_outlier_coordinates_and_tiny_keys(kind, metric):
    """Keys whose residuals have one huge coordinate (int8 codes round the others to 0: a
    large error, which the stored norm carries) and keys near 1e-30 (scales near fp32's
    smallest normals): the bounds hold and the result is exact."""
    q, keys, offsets, probes = clustered(12, 900, 20, 6, 3, seed=3)
    g = torch.Generator().manual_seed(4)
    spikes = torch.randint(0, 900, (60,), generator=g)
    keys[spikes, torch.randint(0, 20, (60,), generator=g)] += 1e4
    keys[offsets[2]:offsets[3]] *= 1e-30  # a whole list of tiny keys
    q[:3] *= 1e-30
    s, i = search(kind, q, keys, offsets, probes, 9, metric)
    assert_lists_topk(s, i, q, keys, offsets, probes, 9, metric)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_takes_the_pack(kind):
    q, keys, offsets, probes = clustered(8, 500, 40, 8, 3)
    pack = PACK[kind](keys, offsets)
    forced = knnfast.knn_search_lists(q, keys, offsets, probes, 5, plan=kind, pack=pack)
    scan = knnfast.knn_search_lists(q, keys, offsets, probes, 5, plan="scan")
    auto = knnfast.knn_search_lists(q, keys, offsets, probes, 5, pack=pack)
    expected = forced if FAST[kind] else scan
    assert torch.equal(auto[0], expected[0]) and torch.equal(auto[1], expected[1])


@pytest.mark.parametrize("kind", KINDS)
def test_duplicates_empty_lists_and_batch(kind):
    q, keys, offsets, probes = clustered(6, 400, 24, 10, 4)
    offsets = torch.cat([offsets[:3], offsets[2:3], offsets[3:]])  # an empty list
    probes = torch.tensor([[0, 0, 0, -1], [2, 2, -1, -1], [-1, -1, -1, -1], [1, 3, 3, 5],
                           [10, 9, 2, 2], [4, 4, 4, 4]])
    s, i = search(kind, q, keys, offsets, probes, 7, "l2")
    assert_lists_topk(s, i, q, keys, offsets, probes, 7, "l2")
    assert (i[1] == -1).all() and (i[2] == -1).all()  # an empty list; no list
    s, i = search(kind, q[:0], keys, offsets, probes[:0], 3, "ip")
    assert s.shape == (0, 3) and i.shape == (0, 3)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("metric", METRICS)
def test_nan_and_inf_keys_as_plan_scan(kind, metric):
    q, keys, offsets, probes = clustered(5, 300, 12, 4, 4)
    keys[7] = float("nan")
    keys[40, 3] = float("inf")
    keys[41, 0] = float("-inf")
    pack = PACK[kind](keys, offsets)
    s, i = knnfast.knn_search_lists(q, keys, offsets, probes, 300, metric, plan=kind, pack=pack)
    s0, i0 = knnfast.knn_search_lists(q, keys, offsets, probes, 300, metric, plan="scan")
    assert torch.equal(i >= 0, i0 >= 0) and not (i == 7).any()
    assert torch.equal(i.sort(1).values, i0.sort(1).values)


@pytest.mark.parametrize("kind", KINDS)
def test_candidate_overflow_falls_back(kind):
    """70,000 equal keys in one list: every bound overlaps, the row's candidates outgrow their
    cap (65,536) and the row is searched by plan scan: the smallest rows win the tie."""
    keys = torch.ones(70_000, 4)
    offsets = torch.tensor([0, 70_000])
    q = torch.tensor([[1.0, 1.0, 1.0, 1.5], [0.0, 0.0, 0.0, 0.0]])
    probes = torch.tensor([[0], [-1]])
    s, i = search(kind, q, keys, offsets, probes, 3, "l2")
    assert i.tolist() == [[0, 1, 2], [-1, -1, -1]]
    assert s[0].tolist() == [-0.25] * 3


@pytest.mark.parametrize("kind", KINDS)
def test_custom_centers_and_bad_centers_stay_exact(kind):
    """Any finite centers keep the result exact (the bound accounts for them); far ones only
    make it slower."""
    q, keys, offsets, probes = clustered(10, 800, 20, 8, 3)
    for centers in (torch.zeros(8, 20), torch.full((8, 20), 50.0)):
        pack = PACK[kind](keys, offsets, centers)
        with settings.override(debug=True):
            s, i = knnfast.knn_search_lists(q, keys, offsets, probes, 6, "l2", plan=kind,
                                            pack=pack)
        assert_lists_topk(s, i, q, keys, offsets, probes, 6, "l2")


@pytest.mark.parametrize("kind", KINDS)
def test_debug_catches_a_pack_of_other_keys(kind):
    """The bound check is live: a pack built over other keys breaks it, loudly."""
    q, keys, offsets, probes = clustered(4, 200, 16, 4, 4)
    pack = PACK[kind](keys + 5.0, offsets)
    with settings.override(debug=True), pytest.raises(RuntimeError, match="error bound failed"):
        knnfast.knn_search_lists(q, keys, offsets, probes, 3, plan=kind, pack=pack)


@pytest.mark.parametrize("kind", KINDS)
@given(B=st.integers(1, 12), N=st.integers(1, 300), D=st.integers(1, 70), L=st.integers(1, 20),
       P=st.integers(1, 5), k=st.integers(1, 30), metric=st.sampled_from(METRICS),
       seed=st.integers(0, 2**31 - 1), offset=st.sampled_from([0.0, 30.0]),
       q_scale=st.sampled_from([1.0, 1e-40, 1e-35, 1e-30, 1e-18, 1e6, 1e15]),
       k_scale=st.sampled_from([1.0, 1e-40, 1e-35, 1e-30, 1e-18, 1e6, 1e15]))
def test_property_exact(kind, B, N, D, L, P, k, metric, seed, offset, q_scale, k_scale):
    """Exact at any scale of queries and keys, apart or together (fp32 squares of 1e-30
    underflow: the bounds' norms must not)."""
    q, keys, offsets, probes = clustered(B, N, D, L, P, seed=seed, offset=offset)
    q, keys = q * q_scale, keys * k_scale
    ex = torch.randint(-1, N, (B,), generator=torch.Generator().manual_seed(seed))
    s, i = search(kind, q, keys, offsets, probes, k, metric, exclude=ex)
    assert_lists_topk(s, i, q, keys, offsets, probes, k, metric, ex)


@pytest.mark.parametrize("kind", KINDS)
def test_portable_body_matches(kind):
    """KNNFAST_SIMD=generic (plain-loop dots, scalar push) returns what the vdpbf16ps /
    vpdpbusd body does."""
    if knnfast.build_info()["simd"] != "avx512" or not FAST[kind]:
        pytest.skip(f"CPU has no {kind} dot instruction")
    script = (
        "import json, sys, torch, knnfast\n"
        "g = torch.Generator().manual_seed(5)\n"
        "keys = torch.randn(3000, 45, generator=g).half() + 4\n"
        "q = keys[:9].float() + 0.2 * torch.randn(9, 45, generator=g)\n"
        "off = torch.tensor([0, 100, 1000, 1001, 2500, 3000])\n"
        "pr = torch.randint(-1, 5, (9, 3), generator=g)\n"
        f"pack = knnfast.pack_lists_{kind}(keys, off)\n"
        "out = []\n"
        "for m in ('l2', 'ip', 'cos'):\n"
        f"    s, i = knnfast.knn_search_lists(q, keys, off, pr, 10, m, plan='{kind}', pack=pack)\n"
        "    out += [s.tolist(), i.tolist()]\n"
        "json.dump([knnfast.build_info()['simd'], *out], sys.stdout)\n")
    fast, portable = both_simd_levels(script)
    for a, b in zip(fast, portable):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("kind", KINDS)
def test_bad_packs_name_the_argument(kind):
    q, keys, offsets, probes = clustered(3, 100, 8, 4, 2)
    pack = PACK[kind](keys, offsets)
    other = PACK["int8" if kind == "bf16" else "bf16"](keys, offsets)
    call = lambda **kw: knnfast.knn_search_lists(q, keys, offsets, probes, 2, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=f'plan "{kind}" needs the {kind} pack'):
        call(plan=kind)
    with pytest.raises(ValueError, match=f'plan "{kind}" needs the {kind} pack'):
        call(plan=kind, pack=other)
    with pytest.raises(ValueError, match="pack must come from knnfast.pack_lists_bf16"):
        call(pack=tuple(pack))
    bad = [pack._replace(centers=pack.centers[:-1]),
           pack._replace(**{pack._fields[1]: pack[1].float()}),
           pack._replace(**{pack._fields[2]: pack[2][:, :1].contiguous()}),
           pack._replace(**{pack._fields[1]: pack[1].t().contiguous().t()})]
    for b, name in zip(bad, ["centers", "residuals", "residual_norms", "residuals"]):
        with pytest.raises(ValueError, match=f"knn_search_lists: {name} must be a contiguous"):
            call(pack=b)
        with pytest.raises(ValueError, match=f"knn_search_lists: {name} must be a contiguous"):
            torch.ops.knnfast.knn_search_lists(q.to("meta"), keys.to("meta"), offsets.to("meta"),
                                               probes.to("meta"), 2, "l2", None, "auto",
                                               *(t.to("meta") for t in b))
    nan_center = pack.centers.index_fill(0, torch.tensor([1]), float("nan"))
    with pytest.raises(ValueError, match="centers must be finite"):
        call(pack=pack._replace(centers=nan_center), plan=kind)
    with pytest.raises(ValueError, match="come together"):
        torch.ops.knnfast.knn_search_lists(q, keys, offsets, probes, 2, "l2", None, "auto",
                                           pack.centers, None, pack[2])


@pytest.mark.parametrize("kind", KINDS)
def test_bad_pack_inputs_name_the_argument(kind):
    keys, op = torch.randn(10, 4), f"pack_lists_{kind}"
    with pytest.raises(ValueError, match=f"{op}: list_offsets must rise from 0 to N"):
        PACK[kind](keys, torch.tensor([0, 5, 9]))
    with pytest.raises(ValueError, match=f"{op}: list_offsets must rise"):
        PACK[kind](keys, torch.tensor([0, 6, 5, 10]))
    with pytest.raises(ValueError, match=rf"{op}: centers must have shape \[2, 4\]"):
        PACK[kind](keys, torch.tensor([0, 5, 10]), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=f"{op}: keys must be a float tensor"):
        PACK[kind](keys.long(), torch.tensor([0, 5, 10]))


def test_int8_pack_takes_d_up_to_65536():
    with pytest.raises(ValueError, match="pack_lists_int8: keys must have D <= 65536, got 65537"):
        knnfast.pack_lists_int8(torch.randn(1, 65537), torch.tensor([0, 1]))


def test_pack_is_what_it_says():
    keys = torch.randn(30, 6, generator=torch.Generator().manual_seed(0)).half()
    offsets = torch.tensor([0, 10, 10, 30])
    pack = knnfast.pack_lists_bf16(keys, offsets)
    k64 = keys.double()
    mean = torch.stack([k64[:10].mean(0), torch.zeros(6, dtype=torch.float64), k64[10:].mean(0)])
    torch.testing.assert_close(pack.centers, mean.float())
    r = k64 - pack.centers.double().repeat_interleave(torch.tensor([10, 0, 20]), 0)
    torch.testing.assert_close(pack.residuals, r.float().to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(pack.residual_norms[:, 0], r.norm(dim=1).float())
    torch.testing.assert_close(pack.residual_norms[:, 1], k64.norm(dim=1).float())


def test_int8_pack_is_what_it_says():
    """Codes round r / scale with the largest coordinate at +-127; the stored error is an
    upper bound of |r - scale codes| (and tight); code sums are the codes'."""
    keys = torch.randn(30, 6, generator=torch.Generator().manual_seed(0)) * 3
    keys[4] = 1.0  # a key equal to ... its list's other keys' pattern: any residual works
    offsets = torch.tensor([0, 10, 10, 30])
    pack = knnfast.pack_lists_int8(keys, offsets)
    assert pack.codes.dtype == torch.int8 and pack.key_terms.shape == (30, 5)
    k64 = keys.double()
    r = k64 - pack.centers.double().repeat_interleave(torch.tensor([10, 0, 20]), 0)
    scale, err, rn, kn, sums = pack.key_terms.double().unbind(1)
    torch.testing.assert_close(scale, (r.abs().amax(1) / 127).float().double())
    assert (pack.codes.abs().amax(1) == 127).all()
    assert torch.equal(pack.codes.double(), (r / scale[:, None]).round())
    miss = (r - pack.codes.double() * scale[:, None]).norm(dim=1)
    assert (err >= miss).all() and (err <= miss * 1.0001 + 1e-30).all()
    torch.testing.assert_close(rn, r.norm(dim=1).float().double())
    torch.testing.assert_close(kn, k64.norm(dim=1).float().double())
    assert torch.equal(sums, pack.codes.double().sum(1))


def test_int8_bound_needs_its_quantization_terms():
    """The keys' quantization error is what keeps the int8 ranks inside their bound: with the
    stored errors zeroed, the debug check fails. (ip, queries of whole numbers up to 127:
    their codes are exact, so only the keys' share is left.)"""
    g = torch.Generator().manual_seed(1)
    keys, offsets = torch.randn(400, 24, generator=g), torch.tensor([0, 200, 400])
    q = torch.randint(-127, 128, (6, 24), generator=g).float()
    q[:, 0] = 127
    probes = torch.tensor([[0, 1]] * 6)
    pack = knnfast.pack_lists_int8(keys, offsets)
    with settings.override(debug=True):
        knnfast.knn_search_lists(q, keys, offsets, probes, 3, "ip", plan="int8", pack=pack)
    terms = pack.key_terms.clone()
    terms[:, 1] = 0.0
    with settings.override(debug=True), pytest.raises(RuntimeError, match="error bound failed"):
        knnfast.knn_search_lists(q, keys, offsets, probes, 3, "ip", plan="int8",
                                 pack=pack._replace(key_terms=terms))


@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(kind):
    q, keys, offsets, probes = clustered(4, 120, 8, 5, 2)
    c, r, n = PACK[kind](keys, offsets)
    for metric in METRICS:
        torch.library.opcheck(torch.ops.knnfast.knn_search_lists.default,
                              (q, keys, offsets, probes, 4, metric, None, kind, c, r, n))
