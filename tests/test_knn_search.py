"""knn_search: every test of the op.

Sections: parity with knnfast.reference; ties, exclude, key_sq_norms, NaN keys; properties
(hypothesis); bad inputs (shared helper, device mismatch); opcheck; CUDA-only kernel tests;
forced kernel paths (environment variables, one block at the end).

Kernel / variant -> tests:

  CPU stream / gemm_f32 / bf16 paths       test_forced_search_path_is_exact,
                                            test_forced_search_path_key_sq_norms (each forced)
  CPU bf16 candidate bounds and rescan      test_bf16_path_exact_with_large_common_component,
                                            test_bf16_path_rescans_rows_over_the_candidate_cap
  CPU path picked by B (bf16-GEMM, B >= 32) test_half_keys_large_batch_*, test_anisotropic_*
  CUDA stream_scan_kernel, merge_lists_kernel   test_search_plans (stream), test_search_row_groups_and_large_k
  CUDA key_sq_norms_kernel, select_tile_kernel,
       knn_rescore (as candidate scorer), verify_kernel   test_search_plans (tensor)
  CUDA re-search of unproven rows           test_search_tensor_unproven_rows
  CUDA status flags (exclude, query)        test_bad_values_raise, test_checks_off_never_crash,
                                            test_bad_exclude_reports_the_absolute_row
  every CPU/CUDA device parametrization     the tests with a [cpu] / [cuda] id
"""
import itertools
import re

import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from knnfast.ops.settings import override
from conftest import DEVICES, requires_cuda
from helpers import (
    KEY_DTYPES,
    METRICS,
    assert_topk_parity,
    assert_topk_valid,
    bad_input_cases,
    check_bad_input,
    check_bad_input_cpu_and_cuda,
    exact_scores,
    on_meta, check_off_never_crashes)


def _grid():
    for B, N, D, k in itertools.product((1, 3, 17), (1, 5, 300, 4099), (1, 7, 64), (1, 4, 64)):
        if k <= N:
            yield B, N, D, k


GRID = list(_grid())


def _data(B, N, D, key_dtype=torch.float32, q_dtype=torch.float32, device="cpu"):
    q = torch.randn(B, D).to(q_dtype)
    keys = torch.randn(N, D).to(key_dtype)
    return q.to(device), keys.to(device)


# --------------------------------------------------------------------------- #
# parity                                                                      #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,k", GRID, ids=lambda v: str(v))
def test_parity_grid(device, B, N, D, k, key_dtype, metric):
    q, keys = _data(B, N, D, key_dtype, device=device)
    s, i = knnfast.knn_search(q, keys, k, metric)
    # the kernel upconverts half keys: the reference runs on keys.float()
    rs, ri = ref.knn_search(q, keys.float(), k, metric)
    assert s.device == q.device and i.device == q.device
    assert_topk_parity(s, i, rs, ri, q, keys, metric)
    assert_topk_valid(s, i, q, keys, k, metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("q_dtype", KEY_DTYPES, ids=str)
def test_parity_query_dtypes(device, q_dtype, key_dtype, metric):
    q, keys = _data(6, 300, 16, key_dtype, q_dtype, device=device)
    s, i = knnfast.knn_search(q, keys, 8, metric)
    rs, ri = ref.knn_search(q.float(), keys.float(), 8, metric)
    assert_topk_parity(s, i, rs, ri, q, keys, metric)
    assert_topk_valid(s, i, q, keys, 8, metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("N,k", [(5, 64), (1, 4), (3, 2048)])
def test_k_greater_than_n_pads(device, N, k, key_dtype, metric):
    q, keys = _data(3, N, 7, key_dtype, device=device)
    s, i = knnfast.knn_search(q, keys, k, metric)
    rs, ri = ref.knn_search(q, keys.float(), k, metric)
    assert s.shape == (3, k) and i.shape == (3, k)
    assert (i[:, N:] == -1).all() and torch.isneginf(s[:, N:]).all()
    assert (i[:, :N] >= 0).all() and torch.isfinite(s[:, :N]).all()
    assert_topk_parity(s, i, rs, ri, q, keys, metric)
    assert_topk_valid(s, i, q, keys, k, metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("q_dtype", ["float32", "same"])
@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_keys_large_batch_exact_topk(device, key_dtype, q_dtype, metric):
    """B >= 32 with half keys takes the bf16-GEMM + exact-rescore path: recall 1.0."""
    qd = torch.float32 if q_dtype == "float32" else key_dtype
    B, N, D, k = 40, 5000, 64, 8
    q, keys = _data(B, N, D, key_dtype, qd, device=device)
    s, i = knnfast.knn_search(q, keys, k, metric)
    assert_topk_valid(s, i, q, keys, k, metric)
    rs, ri = ref.knn_search(q.float(), keys.float(), k, metric)
    assert_topk_parity(s, i, rs, ri, q, keys, metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B", [5, 40])
def test_anisotropic_keys_exact_topk(device, B, key_dtype, metric):
    """Transformer hidden states are anisotropic (a large common component; mean
    cosine ~0.9 here). The search is exact (DESIGN section 3) on every path, including
    the bf16-GEMM candidate path for half keys with B >= 32."""
    N, D, k = 5000, 512, 8
    keys = (torch.randn(N, D) + 3.0).to(key_dtype).to(device)
    q = (torch.randn(B, D) + 3.0).to(device)
    s, i = knnfast.knn_search(q, keys, k, metric)
    assert_topk_valid(s, i, q, keys, k, metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_keys_large_batch_large_k(device, key_dtype):
    B, N, D, k = 33, 3000, 32, 300
    q, keys = _data(B, N, D, key_dtype, device=device)
    s, i = knnfast.knn_search(q, keys, k, "l2")
    assert_topk_valid(s, i, q, keys, k, "l2")


# --------------------------------------------------------------------------- #
# ties, exclude, key_sq_norms, NaN keys                                       #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B", [3, 40])
def test_ties_go_to_smaller_index(device, B, key_dtype, metric):
    """Small integer data: every score is exact in fp32/bf16, so ties are exact
    and the order (score desc, index asc) is fully determined."""
    N, D, k = 700, 4, 50
    q = torch.randint(-2, 3, (B, D)).float().to(device)
    keys = torch.randint(-1, 2, (N, D)).to(key_dtype).to(device)
    s, i = knnfast.knn_search(q, keys, k, metric)
    full = exact_scores(q, keys, metric)
    exp_s, exp_i = torch.sort(full, dim=1, descending=True, stable=True)
    assert torch.equal(i.cpu(), exp_i[:, :k]), f"tie order differs:\n{i.cpu()[:2]}\n{exp_i[:2, :k]}"
    assert torch.equal(s.cpu().double(), exp_s[:, :k])
    rs, ri = ref.knn_search(q, keys.float(), k, metric)
    assert torch.equal(ri.cpu(), exp_i[:, :k])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B", [5, 40])
def test_exclude_self_match(device, B, key_dtype, metric):
    N, D, k = 400, 16, 10
    keys = torch.randn(N, D).to(key_dtype)
    ids = torch.randperm(N)[:B]
    q = keys[ids].float()
    exclude = ids.clone()
    exclude[::3] = -1  # some rows keep their self-match
    q, keys, exclude = q.to(device), keys.to(device), exclude.to(device)
    s, i = knnfast.knn_search(q, keys, k, metric, exclude=exclude)
    assert_topk_valid(s, i, q, keys, k, metric, exclude=exclude)
    rs, ri = ref.knn_search(q, keys.float(), k, metric, exclude=exclude)
    assert_topk_parity(s, i, rs, ri, q, keys, metric)
    kept = exclude.cpu() == -1
    if metric != "ip":  # the self-match is the top-1 for l2/cos
        assert torch.equal(i.cpu()[kept, 0], ids[kept])


@pytest.mark.parametrize("device", DEVICES)
def test_exclude_all_minus_one_is_noop(device):
    q, keys = _data(7, 300, 8, device=device)
    ex = torch.full((7,), -1, dtype=torch.int64, device=device)
    a = knnfast.knn_search(q, keys, 5, "l2", exclude=ex)
    b = knnfast.knn_search(q, keys, 5, "l2")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
def test_exclude_with_k_equal_n_pads(device):
    q, keys = _data(4, 5, 3, device=device)
    ex = torch.tensor([0, 4, -1, 2], device=device)
    s, i = knnfast.knn_search(q, keys, 5, "l2", exclude=ex)
    assert_topk_valid(s, i, q, keys, 5, "l2", exclude=ex)
    assert (i[[0, 1, 3], -1] == -1).all() and (i[2] >= 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B", [4, 40])
def test_key_sq_norms_cache(device, B, key_dtype, metric):
    q, keys = _data(B, 1000, 32, key_dtype, device=device)
    norms = keys.float().pow(2).sum(1)
    s, i = knnfast.knn_search(q, keys, 16, metric, key_sq_norms=norms)
    s0, i0 = knnfast.knn_search(q, keys, 16, metric)
    assert_topk_parity(s, i, s0, i0, q, keys, metric)
    rs, ri = ref.knn_search(q, keys.float(), 16, metric, key_sq_norms=norms)
    assert_topk_parity(s, i, rs, ri, q, keys, metric)
    assert_topk_valid(s, i, q, keys, 16, metric)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B", [3, 40])
def test_nan_keys_never_returned(device, B, key_dtype, metric):
    N = 50
    q, keys = _data(B, N, 8, key_dtype)
    keys[7] = float("nan")
    keys[20, 3] = float("nan")
    q, keys = q.to(device), keys.to(device)
    s, i = knnfast.knn_search(q, keys, N, metric)
    assert not ((i == 7) | (i == 20)).any()
    assert (i[:, -2:] == -1).all() and torch.isneginf(s[:, -2:]).all()
    assert_topk_valid(s, i, q, keys, N, metric)


# --------------------------------------------------------------------------- #
# properties                                                                  #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
@given(
    B=st.integers(1, 6),
    N=st.integers(1, 120),
    D=st.integers(1, 9),
    k=st.integers(1, 130),
    metric=st.sampled_from(METRICS),
    key_dtype=st.sampled_from(KEY_DTYPES),
    integer_data=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_topk_equals_full_sort(device, B, N, D, k, metric, key_dtype, integer_data, seed):
    g = torch.Generator().manual_seed(seed)
    if integer_data:
        q = torch.randint(-3, 4, (B, D), generator=g).float()
        keys = torch.randint(-2, 3, (N, D), generator=g).to(key_dtype)
    else:
        q = torch.randn(B, D, generator=g)
        keys = torch.randn(N, D, generator=g).to(key_dtype)
    q, keys = q.to(device), keys.to(device)
    s, i = knnfast.knn_search(q, keys, k, metric)
    assert_topk_valid(s, i, q, keys, k, metric)
    if integer_data and metric != "cos":
        full = exact_scores(q, keys, metric)
        exp_s, exp_i = torch.sort(full, dim=1, descending=True, stable=True)
        m = min(k, N)
        assert torch.equal(i.cpu()[:, :m], exp_i[:, :m])
        assert torch.equal(s.cpu()[:, :m].double(), exp_s[:, :m])


@pytest.mark.parametrize("device", DEVICES)
@given(
    B=st.integers(1, 6),
    N=st.integers(1, 60),
    k=st.integers(1, 70),
    metric=st.sampled_from(METRICS),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_exclude_never_returned(device, B, N, k, metric, seed):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, 5, generator=g)
    exclude = torch.randint(-1, N, (B,), generator=g)
    q = torch.where((exclude >= 0)[:, None], keys[exclude.clamp(min=0)], torch.randn(B, 5, generator=g))
    q, keys, exclude = q.to(device), keys.to(device), exclude.to(device)
    s, i = knnfast.knn_search(q, keys, k, metric, exclude=exclude)
    assert not (i == exclude[:, None]).masked_fill((exclude < 0)[:, None], False).any()
    assert_topk_valid(s, i, q, keys, k, metric, exclude=exclude)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,key_dtype", [(5, torch.float32), (40, torch.float16), (40, torch.bfloat16)])
@pytest.mark.parametrize("metric", METRICS)
def test_deterministic(device, B, key_dtype, metric):
    q, keys = _data(B, 3000, 24, key_dtype, device=device)
    a = knnfast.knn_search(q, keys, 32, metric)
    b = knnfast.knn_search(q, keys, 32, metric)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_non_contiguous_inputs(device, key_dtype, metric):
    B, N, D, k = 6, 200, 12, 9
    qt = torch.randn(D, B).to(device)
    kt = torch.randn(D, N).to(key_dtype).to(device)
    q, keys = qt.t(), kt.t()  # transposed views
    assert not q.is_contiguous() and not keys.is_contiguous()
    wide = torch.randn(N, 2 * D).to(key_dtype).to(device)
    ex = torch.arange(0, 2 * B, 2, device=device)[:B]
    s, i = knnfast.knn_search(q, keys, k, metric, exclude=ex)
    s2, i2 = knnfast.knn_search(q.contiguous(), keys.contiguous(), k, metric, exclude=ex)
    assert torch.equal(i, i2)
    torch.testing.assert_close(s, s2)
    s, i = knnfast.knn_search(q.contiguous(), wide[:, ::2], k, metric)  # strided columns
    s2, i2 = knnfast.knn_search(q.contiguous(), wide[:, ::2].contiguous(), k, metric)
    assert torch.equal(i, i2)
    torch.testing.assert_close(s, s2)


@pytest.mark.parametrize("device", DEVICES)
def test_output_types(device):
    q, keys = _data(3, 10, 4, torch.float16, torch.bfloat16, device=device)
    s, i = knnfast.knn_search(q, keys, 4)
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert s.is_contiguous() and i.is_contiguous()
    assert s.device == q.device and i.device == q.device


# --------------------------------------------------------------------------- #
# bad inputs                                                                  #
# --------------------------------------------------------------------------- #
def _ok(device="cpu"):
    return torch.randn(3, 4, device=device), torch.randn(10, 4, device=device)


BAD_CASES = {
    "queries_1d": (lambda q, k: knnfast.knn_search(q[0], k, 2), "queries"),
    "queries_3d": (lambda q, k: knnfast.knn_search(q[None], k, 2), "queries"),
    "keys_1d": (lambda q, k: knnfast.knn_search(q, k[0], 2), "keys"),
    "keys_3d": (lambda q, k: knnfast.knn_search(q, k[None], 2), "keys"),
    "d_mismatch": (lambda q, k: knnfast.knn_search(q, k[:, :3], 2), "keys|queries"),
    "k_zero": (lambda q, k: knnfast.knn_search(q, k, 0), r"\bk\b"),
    "k_negative": (lambda q, k: knnfast.knn_search(q, k, -1), r"\bk\b"),
    "k_too_big": (lambda q, k: knnfast.knn_search(q, k, 2049), r"\bk\b"),
    "n_zero": (lambda q, k: knnfast.knn_search(q, k[:0], 2), "keys"),
    "metric": (lambda q, k: knnfast.knn_search(q, k, 2, "hamming"), "metric"),
    "nan_query": (lambda q, k: knnfast.knn_search(q.index_fill(0, torch.tensor([1], device=q.device), float("nan")), k, 2), "queries"),
    "inf_query": (lambda q, k: knnfast.knn_search(q.index_fill(0, torch.tensor([0], device=q.device), float("inf")), k, 2), "queries"),
    "exclude_shape": (lambda q, k: knnfast.knn_search(q, k, 2, exclude=torch.zeros(4, dtype=torch.int64, device=q.device)), "exclude"),
    "exclude_2d": (lambda q, k: knnfast.knn_search(q, k, 2, exclude=torch.zeros(3, 1, dtype=torch.int64, device=q.device)), "exclude"),
    "exclude_range": (lambda q, k: knnfast.knn_search(q, k, 2, exclude=torch.tensor([0, 10, -1], device=q.device)), "exclude"),
    "exclude_below": (lambda q, k: knnfast.knn_search(q, k, 2, exclude=torch.tensor([0, -2, -1], device=q.device)), "exclude"),
    "norms_shape": (lambda q, k: knnfast.knn_search(q, k, 2, key_sq_norms=torch.ones(9, device=q.device)), "key_sq_norms"),
    "queries_int": (lambda q, k: knnfast.knn_search(q.long(), k, 2), "queries"),
    "keys_float64": (lambda q, k: knnfast.knn_search(q, k.double(), 2), "keys"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call,match", bad_input_cases(BAD_CASES))
def test_bad_inputs(device, call, match):
    check_bad_input(call, match, *_ok(device))


@requires_cuda
def test_device_mismatch():
    q, k = _ok("cpu")
    with pytest.raises(ValueError, match="keys|queries"):
        knnfast.knn_search(q, k.cuda(), 2)
    with pytest.raises(ValueError, match="exclude"):
        knnfast.knn_search(q.cuda(), k.cuda(), 2, exclude=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_sq_norms"):
        knnfast.knn_search(q.cuda(), k.cuda(), 2, key_sq_norms=torch.ones(10))


def test_knn_search_keys_on_other_device():
    """Device mismatches raise ValueError naming the argument, checked without a GPU: a tensor
    on the `meta` device stands in for "another device"."""
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="keys is on meta"):
        knnfast.knn_search(q, on_meta(keys), 3)
    with pytest.raises(ValueError, match="exclude is on meta"):
        knnfast.knn_search(q, keys, 3, exclude=on_meta(torch.zeros(2, dtype=torch.long)))


# --------------------------------------------------------------------------- #
# opcheck (the raw op torch.ops.knnfast.knn_search, as the wrapper calls it)  #
# --------------------------------------------------------------------------- #
def _opcheck_samples(device):
    B, N, D = 5, 70, 8
    q = torch.randn(B, D, device=device)
    keys = torch.randn(N, D, device=device)
    keys_h = keys.half()
    keys_b = keys.bfloat16()
    norms = keys.pow(2).sum(1)
    ex = torch.tensor([0, -1, 3, 69, -1], device=device)
    q40 = torch.randn(40, D, device=device)
    return [
        (q, keys, 4, "l2", None, None),
        (q, keys, 4, "ip", norms, ex),
        (q, keys, 100, "cos", None, ex),
        (q.half(), keys_h, 3, "l2", norms, None),
        (q, keys_b, 7, "cos", None, None),
        (q40, keys_h, 8, "l2", None, None),
        (q40.bfloat16(), keys_b, 8, "ip", None, None),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.knnfast.knn_search.default, args)


# --------------------------------------------------------------------------- #
# CUDA kernels (CPU <-> CUDA agreement, in-kernel value checks)               #
# --------------------------------------------------------------------------- #
@requires_cuda
def test_search_row_groups_and_large_k():
    """B > 32 on the stream plan runs in row groups; k = 2048 exercises long lists."""
    q, keys = torch.randn(70, 24), torch.randn(3000, 24)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 2048, "ip")
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, 2048, "ip")


@requires_cuda
def test_search_ties_smaller_index_and_deterministic():
    keys = torch.zeros(1000, 8)
    keys[::7] = 1.0  # many exact ties
    q = torch.ones(3, 8)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 20, "ip")
    assert i.cpu()[:, :20].tolist() == [list(range(0, 140, 7))] * 3
    s2, i2 = knnfast.knn_search(q.cuda(), keys.cuda(), 20, "ip")
    assert torch.equal(s, s2) and torch.equal(i, i2)


@requires_cuda
def test_search_nan_keys_never_returned():
    keys = torch.randn(500, 16)
    keys[::3, 0] = float("nan")
    q = torch.randn(4, 16)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 50)
    assert (i.cpu() % 3 != 0).all()


# value checks inside the kernels: call(device) must raise ValueError matching `match`
CUDA_BAD_VALUES = {
    "exclude": (lambda d: knnfast.knn_search(torch.randn(2, 4).to(d), torch.randn(10, 4).to(d), 3,
                                             exclude=torch.tensor([0, 10]).to(d)),
                "exclude must hold ids"),
    "query": (lambda d: knnfast.knn_search(torch.full((2, 4), float("nan")).to(d),
                                           torch.randn(10, 4).to(d), 3),
              "queries contain NaN"),
}


@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_bad_values_raise(call, match):
    """The in-kernel checks raise the same ValueError as the CPU checks."""
    check_bad_input_cpu_and_cuda(call, match)


@requires_cuda
def test_bad_exclude_reports_the_absolute_row():
    """Row groups of the stream plan report rows of the whole batch, as on CPU."""
    q, keys = torch.randn(50, 8), torch.randn(30, 8)
    ex = torch.full((50,), -1)
    ex[40] = 30
    for d in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="got 30 at row 40"):
            knnfast.knn_search(q.to(d), keys.to(d), 3, exclude=ex.to(d))


# =========================================================================== #
# FORCED KERNEL PATHS                                                         #
# Every test below forces a kernel variant with plan= (CPU stream, gemm_f32,  #
# bf16; CUDA stream, tensor, tensor_recheck) or a setting with                #
# knnfast.ops.settings.override (debug, cuda_checks).                        #
# =========================================================================== #
SEARCH_PATHS = (["stream", "gemm_f32"] + (["bf16"] if knnfast.build_info()["avx512_bf16"] else [])
                + ["bf16_gemm"])
# the plans that rank with bf16 bounds and rescore the candidates exactly
BOUNDED_PATHS = [p for p in SEARCH_PATHS if p.startswith("bf16")]


@pytest.fixture
def search_path(request):
    return request.param


def _clustered_queries_keys(B, N, D, dtype, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, D, generator=g) + offset
    keys = centres[torch.randint(0, 16, (N,), generator=g)] + 0.5 * torch.randn(N, D, generator=g)
    queries = centres[torch.randint(0, 16, (B,), generator=g)] + 0.5 * torch.randn(B, D, generator=g)
    return queries, keys.to(dtype)


@pytest.mark.parametrize("search_path", SEARCH_PATHS, indirect=True)
@pytest.mark.parametrize("B,N,D,k", [(3, 700, 33, 5), (40, 4500, 64, 16), (33, 300, 7, 300)])
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_forced_search_path_is_exact(search_path, B, N, D, k, key_dtype, metric):
    """CPU: tiles span several blocks (N > tile), D is odd for the bf16 pair packing, and
    k = N makes every key a candidate; each path must return the exact top-k."""
    q, keys = _clustered_queries_keys(B, N, D, key_dtype, offset=0.0)
    exclude = torch.randint(-1, N, (B,))
    s, i = knnfast.knn_search(q, keys, k, metric, exclude=exclude, plan=search_path)
    assert_topk_valid(s, i, q, keys, k, metric, exclude=exclude)
    rs, ri = ref.knn_search(q, keys, k, metric, exclude=exclude)
    torch.testing.assert_close(s, rs, rtol=1e-4, atol=1e-3 * float(rs[rs.isfinite()].abs().max()))


@pytest.mark.parametrize("search_path", SEARCH_PATHS, indirect=True)
@pytest.mark.parametrize("metric", METRICS)
def test_forced_search_path_key_sq_norms(search_path, metric):
    q, keys = _clustered_queries_keys(36, 900, 48, torch.float16, offset=1.0)
    norms = keys.float().pow(2).sum(1)
    s, i = knnfast.knn_search(q, keys, 9, metric, key_sq_norms=norms, plan=search_path)
    assert_topk_valid(s, i, q, keys, 9, metric)


@pytest.mark.parametrize("plan", BOUNDED_PATHS)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("offset", [10.0, 30.0])
def test_bf16_path_exact_with_large_common_component(capfd, plan, metric, offset):
    """Real hidden states share a large common component; bf16 rounding alone would lose the
    ranking there. The bounds must keep every true neighbour as a candidate."""
    g = torch.Generator().manual_seed(1)
    keys = (torch.randn(3000, 256, generator=g) + offset).to(torch.bfloat16)
    q = torch.randn(40, 256, generator=g) + offset
    with override(debug=True):
        s, i = knnfast.knn_search(q, keys, 8, metric, plan=plan)
    assert_topk_valid(s, i, q, keys, 8, metric)
    assert f"[{plan}]" in capfd.readouterr().err


@pytest.mark.parametrize("plan", BOUNDED_PATHS)
def test_bf16_path_rescans_rows_over_the_candidate_cap(capfd, plan):
    """140,000 keys whose cosines to the query all agree within the bf16 error bound: every
    key stays a candidate, the cap (65,536 per row and thread) is exceeded, and the rows must
    be searched again exactly instead of being cut short."""
    g = torch.Generator().manual_seed(2)
    keys = 1000.0 + 1e-3 * torch.randn(140_000, 16, generator=g)
    q = 1000.0 + 1e-3 * torch.randn(2, 16, generator=g)
    with override(debug=True):
        s, i = knnfast.knn_search(q, keys, 5, "cos", plan=plan)
    assert_topk_valid(s, i, q, keys, 5, "cos")
    over_cap = re.search(r"(\d+) rows over the candidate cap", capfd.readouterr().err)
    assert over_cap and int(over_cap.group(1)) == 2


def _clustered_keys(N, D, dtype, seed=0):
    """Keys in tight clusters: many near-ties, the hard case for the tensor-core proof."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, N // 500), D, generator=g) * 4
    keys = centres[torch.randint(0, centres.shape[0], (N,), generator=g)]
    keys = keys + 0.05 * torch.randn(N, D, generator=g)
    return keys.to(dtype)


@requires_cuda
@pytest.mark.parametrize("plan", ["stream", "tensor"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,N,D,k", [(1, 5000, 64, 8), (40, 3000, 96, 16), (64, 20000, 128, 64),
                                     (70, 777, 33, 100), (3, 100, 16, 256)])
def test_search_plans(plan, metric, key_dtype, B, N, D, k):
    q = torch.randn(B, D)
    keys = _clustered_keys(N, D, key_dtype)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), k, metric, plan=plan)
    cs, ci = knnfast.knn_search(q, keys, k, metric)
    assert s.is_cuda and i.is_cuda
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, k, metric)
    assert_topk_parity(s.cpu(), i.cpu(), cs, ci, q, keys, metric)


@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
def test_search_tensor_unproven_rows(metric):
    """Every row's proof forced to fail (plan tensor_recheck): all rows are searched again
    exactly."""
    q, keys = torch.randn(48, 64), _clustered_keys(4000, 64, torch.float16)
    ex = torch.randint(-1, 4000, (48,))
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 10, metric, exclude=ex.cuda(),
                              plan="tensor_recheck")
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, 10, metric, exclude=ex)


@requires_cuda
@pytest.mark.parametrize("plan", ["stream", "tensor"])
def test_search_cached_norms_exclude_and_padding(plan):
    q, keys = torch.randn(50, 32), torch.randn(20, 32).half()
    norms = keys.float().pow(2).sum(1)
    ex = torch.arange(50) % 21 - 1  # -1 .. 19
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 30, "l2", key_sq_norms=norms.cuda(),
                              exclude=ex.cuda(), plan=plan)
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, 30, "l2", exclude=ex)
    assert (i[:, 19:] == -1).all() and torch.isneginf(s[:, 19:]).all()


@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_checks_off_never_crash(call, match):
    check_off_never_crashes(call)


@pytest.mark.parametrize("plan", ["tensor", "nope", "AUTO"])
def test_plan_must_be_one_of_the_devices_plans(plan):
    q = torch.randn(3, 4)
    with pytest.raises(ValueError, match="knn_search: plan"):
        knnfast.knn_search(q, q, 1, plan=plan)
    with pytest.raises(ValueError, match="plan"):  # the C++ check, for direct torch.ops calls
        torch.ops.knnfast.knn_search(q, q, 1, "l2", None, None, plan)


@pytest.mark.skipif("bf16" not in SEARCH_PATHS, reason="CPU has no AVX512-BF16")
def test_forced_plan_is_the_plan_that_runs(capfd):
    """B = 40 would take the bf16 plan on its own; plan="stream" must not, plan="bf16" must."""
    q, keys = _clustered_queries_keys(40, 500, 32, torch.float16, offset=0.0)
    with override(debug=True):
        knnfast.knn_search(q, keys, 4, plan="stream")
        assert "candidates rescored" not in capfd.readouterr().err
        knnfast.knn_search(q, keys, 4, plan="bf16")
        assert "candidates rescored" in capfd.readouterr().err
        knnfast.knn_search(q, keys, 4)
        assert "candidates rescored" in capfd.readouterr().err
