"""knn_rescore: exact scores of given ids, parity with the reference, bad inputs."""
import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import KEY_DTYPES, METRICS, exact_scores, gather_exact, score_scale


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
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs(device, case):
    fn, match = BAD_CASES[case]
    with pytest.raises(ValueError, match=match):
        fn(*_ok(device))


@requires_cuda
def test_device_mismatch():
    q, k, i = _ok("cpu")
    with pytest.raises(ValueError, match="keys|queries|indices"):
        knnfast.knn_rescore(q.cuda(), k, i.cuda())
    with pytest.raises(ValueError, match="indices|queries"):
        knnfast.knn_rescore(q.cuda(), k.cuda(), i)
