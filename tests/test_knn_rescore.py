"""knn_rescore: every test of the op.

Sections: exact scores of given ids and parity with knnfast.reference; properties
(hypothesis); bad inputs (shared helper, device mismatch); opcheck; CUDA-only kernel tests.
No kernel path of knn_rescore is forced by an environment variable.

Kernel / variant -> tests:

  CPU kernel (AVX-512 / portable bodies)   every [cpu] test; the portable body against
                                            AVX-512: test_simd.py
  CUDA knn_rescore_kernel                   test_rescore_agrees, every [cuda] test
  CUDA status flags (indices, queries)      test_bad_values_raise, test_checks_off_never_crash,
                                            test_rescore_nan_query_with_only_padding_ids
"""
import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import (
    KEY_DTYPES,
    METRICS,
    bad_input_cases,
    check_bad_input,
    check_bad_input_cpu_and_cuda,
    exact_scores,
    gather_exact,
    on_meta,
    score_scale, check_off_never_crashes)


def _check_exact(got, q, keys, idx, metric, rtol=1e-5, atol_rel=1e-5):
    assert got.dtype == torch.float32 and got.shape == idx.shape
    exp = gather_exact(exact_scores(q, keys, metric), idx)
    g = got.detach().cpu().double()
    assert torch.equal(torch.isneginf(g), idx.cpu() == -1)
    fin = idx.cpu() >= 0
    tol = atol_rel * score_scale(q, keys, metric) + rtol * exp.abs()
    assert ((g - exp).abs().masked_fill(~fin, 0) <= tol.masked_fill(~fin, 1)).all(), (g, exp)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("q_dtype", KEY_DTYPES, ids=str)
@pytest.mark.parametrize("B,N,D,k", [(1, 1, 1, 1), (3, 5, 7, 4), (17, 300, 64, 64), (4, 4099, 7, 9)])
def test_parity(device, B, N, D, k, q_dtype, key_dtype, metric):
    q = torch.randn(B, D).to(q_dtype).to(device)
    keys = torch.randn(N, D).to(key_dtype).to(device)
    idx = torch.randint(-1, N, (B, k)).to(device)
    got = knnfast.knn_rescore(q, keys, idx, metric)
    assert got.device == q.device
    _check_exact(got, q, keys, idx, metric)
    exp = ref.knn_rescore(q.float(), keys.float(), idx, metric)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-4 * float(score_scale(q, keys, metric).max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", KEY_DTYPES, ids=str)
def test_rescore_matches_search_scores(device, metric, key_dtype):
    """The scores knn_search returns are the exact scores of the returned ids."""
    for B in (5, 40):
        q = torch.randn(B, 32, device=device)
        keys = torch.randn(2000, 32).to(key_dtype).to(device)
        s, i = knnfast.knn_search(q, keys, 16, metric)
        r = knnfast.knn_rescore(q, keys, i, metric)
        scale = float(score_scale(q, keys, metric).max())
        torch.testing.assert_close(s, r, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("device", DEVICES)
def test_default_metric_is_l2(device):
    q = torch.randn(3, 5, device=device)
    keys = torch.randn(20, 5, device=device)
    idx = torch.randint(0, 20, (3, 4), device=device)
    assert torch.equal(knnfast.knn_rescore(q, keys, idx), knnfast.knn_rescore(q, keys, idx, "l2"))


@pytest.mark.parametrize("device", DEVICES)
@given(
    B=st.integers(1, 5),
    N=st.integers(1, 50),
    D=st.integers(1, 20),
    k=st.integers(1, 20),
    metric=st.sampled_from(METRICS),
    key_dtype=st.sampled_from(KEY_DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_exact(device, B, N, D, k, metric, key_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, D, generator=g).to(device)
    keys = (torch.randn(N, D, generator=g) * 3).to(key_dtype).to(device)
    idx = torch.randint(-1, N, (B, k), generator=g).to(device)
    got = knnfast.knn_rescore(q, keys, idx, metric)
    _check_exact(got, q, keys, idx, metric)
    assert torch.equal(got, knnfast.knn_rescore(q, keys, idx, metric))  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_zero_vectors_cos(device):
    q = torch.zeros(2, 4, device=device)
    q[1] = 1.0
    keys = torch.zeros(3, 4, device=device)
    keys[2] = 2.0
    idx = torch.tensor([[0, 2], [0, 2]], device=device)
    got = knnfast.knn_rescore(q, keys, idx, "cos")
    torch.testing.assert_close(got.cpu(), torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    q = torch.randn(6, 5, device=device).t()
    keys = torch.randn(6, 40, device=device).t()
    idx = torch.randint(-1, 40, (3, 5), device=device).t()
    for metric in METRICS:
        a = knnfast.knn_rescore(q, keys, idx, metric)
        b = knnfast.knn_rescore(q.contiguous(), keys.contiguous(), idx.contiguous(), metric)
        torch.testing.assert_close(a, b)


def _ok(device="cpu"):
    return (torch.randn(3, 4, device=device), torch.randn(10, 4, device=device),
            torch.randint(0, 10, (3, 5), device=device))


BAD_CASES = {
    "queries_1d": (lambda q, k, i: knnfast.knn_rescore(q[0], k, i), "queries"),
    "keys_3d": (lambda q, k, i: knnfast.knn_rescore(q, k[None], i), "keys"),
    "indices_1d": (lambda q, k, i: knnfast.knn_rescore(q, k, i[0]), "indices"),
    "indices_rows": (lambda q, k, i: knnfast.knn_rescore(q, k, i[:2]), "indices"),
    "d_mismatch": (lambda q, k, i: knnfast.knn_rescore(q, k[:, :2], i), "keys|queries"),
    "index_n": (lambda q, k, i: knnfast.knn_rescore(q, k, i.index_fill(1, torch.tensor([2], device=i.device), 10)), "indices"),
    "index_big": (lambda q, k, i: knnfast.knn_rescore(q, k, i.index_fill(1, torch.tensor([0], device=i.device), 1 << 40)), "indices"),
    "index_minus_two": (lambda q, k, i: knnfast.knn_rescore(q, k, i.index_fill(1, torch.tensor([4], device=i.device), -2)), "indices"),
    "indices_float": (lambda q, k, i: knnfast.knn_rescore(q, k, i.float()), "indices"),
    "metric": (lambda q, k, i: knnfast.knn_rescore(q, k, i, "dot"), "metric"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call,match", bad_input_cases(BAD_CASES))
def test_bad_inputs(device, call, match):
    check_bad_input(call, match, *_ok(device))


@requires_cuda
def test_device_mismatch():
    q, k, i = _ok("cpu")
    with pytest.raises(ValueError, match="keys|queries|indices"):
        knnfast.knn_rescore(q.cuda(), k, i.cuda())
    with pytest.raises(ValueError, match="indices|queries"):
        knnfast.knn_rescore(q.cuda(), k.cuda(), i)


def test_knn_rescore_indices_on_other_device():
    """A tensor on the `meta` device stands in for "another device" (no GPU needed)."""
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="indices is on meta"):
        knnfast.knn_rescore(q, keys, on_meta(torch.zeros(2, 3, dtype=torch.long)))


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    q = torch.randn(4, 6, device=device)
    keys = torch.randn(30, 6, device=device)
    idx = torch.randint(-1, 30, (4, 5), device=device)
    return [(q, keys, idx, "l2"), (q, keys.half(), idx, "ip"), (q.bfloat16(), keys, idx, "cos")]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.knnfast.knn_rescore.default, args)


# --------------------------------------------------------------------------- CUDA kernels
@requires_cuda
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rescore_agrees(metric, key_dtype):
    q, keys = torch.randn(9, 70), torch.randn(400, 70).to(key_dtype)
    idx = torch.randint(-1, 400, (9, 33))
    got = knnfast.knn_rescore(q.cuda(), keys.cuda(), idx.cuda(), metric).cpu()
    exp = knnfast.knn_rescore(q, keys, idx, metric)
    assert torch.equal(torch.isneginf(got), idx == -1)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-4)


# value checks inside the kernel: call(device) must raise ValueError matching `match`
CUDA_BAD_VALUES = {
    "index": (lambda d: knnfast.knn_rescore(torch.randn(2, 4).to(d), torch.randn(10, 4).to(d),
                                            torch.tensor([[0], [10]]).to(d)),
              "indices must hold ids"),
}


@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_bad_values_raise(call, match):
    """The in-kernel checks raise the same ValueError as the CPU checks."""
    check_bad_input_cpu_and_cuda(call, match)


@requires_cuda
def test_rescore_nan_query_with_only_padding_ids():
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    q[1, 0] = float("nan")
    idx = torch.tensor([[0, 1], [-1, -1]])
    for d in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="queries contain NaN"):
            knnfast.knn_rescore(q.to(d), keys.to(d), idx.to(d))


# =========================================================================== #
# FORCED KERNEL PATHS: value checks switched off (settings.override)        #
# =========================================================================== #
@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_checks_off_never_crash(call, match):
    check_off_never_crashes(call)
