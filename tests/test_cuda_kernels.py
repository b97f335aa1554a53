"""CUDA backend: CPU <-> CUDA agreement and kernel-level tests of every CUDA kernel.

The shared tests (test_<op>.py) already run on "cuda" wherever a GPU and a CUDA build of
knnfast exist. This file adds what only the CUDA backend has: its plans and kernel variants,
forced one by one through the environment switches the wrappers read at every call, and the
in-kernel value checks. Which test reaches which kernel:

  stream_scan_kernel, merge_lists_kernel   test_search_plans (stream), test_search_row_groups
  key_sq_norms_kernel, select_tile_kernel,
  knn_rescore (as candidate scorer), verify_kernel     test_search_plans (tensor)
  re-search of unproven rows                test_search_tensor_unproven_rows
  knn_rescore_kernel                        test_rescore_agrees
  knn_probs_kernel / knn_probs_sparse_kernel   test_probs_agree
  knn_interpolate_kernel <T, VEC, CACHE>    test_interpolate_variants
  knn_gold_logprob_kernel <T, VEC>          test_gold_logprob_variants
  label_counts_kernel                       test_label_counts_agree
  knn_kd_loss_kernel / _backward_kernel <T, VEC>   test_kd_loss_variants, test_kd_loss_bad_values
  status flags                              test_bad_values_raise, test_checks_off_never_crash
"""
import pytest
import torch

import knnfast
from conftest import requires_cuda
from helpers import METRICS, assert_logp_close, assert_topk_parity, assert_topk_valid

pytestmark = requires_cuda

NEG_INF = float("-inf")


def _both(t):
    return t, t.cuda()


def _neighbours(B, k, V, invalid=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (B, k), generator=g)
    tokens = tokens.masked_fill(torch.rand(B, k, generator=g) < invalid, -1)
    # duplicates on purpose: the leader logic merges them
    tokens[:, 1::3] = tokens[:, 0::3][:, : tokens[:, 1::3].shape[1]]
    scores = (torch.randn(B, k, generator=g) * 3).masked_fill(tokens < 0, NEG_INF)
    return tokens, scores


# --------------------------------------------------------------------------- knn_search
def _clustered(N, D, dtype, seed=0):
    """Keys in tight clusters: many near-ties, the hard case for the tensor-core proof."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(1, N // 500), D, generator=g) * 4
    keys = centres[torch.randint(0, centres.shape[0], (N,), generator=g)]
    keys = keys + 0.05 * torch.randn(N, D, generator=g)
    return keys.to(dtype)


@pytest.mark.parametrize("plan", ["stream", "tensor"])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("B,N,D,k", [(1, 5000, 64, 8), (40, 3000, 96, 16), (64, 20000, 128, 64),
                                     (70, 777, 33, 100), (3, 100, 16, 256)])
def test_search_plans(monkeypatch, plan, metric, key_dtype, B, N, D, k):
    monkeypatch.setenv("KNNFAST_CUDA_SEARCH_PATH", plan)
    q = torch.randn(B, D)
    keys = _clustered(N, D, key_dtype)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), k, metric)
    cs, ci = knnfast.knn_search(q, keys, k, metric)
    assert s.is_cuda and i.is_cuda
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, k, metric)
    assert_topk_parity(s.cpu(), i.cpu(), cs, ci, q, keys, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_search_tensor_unproven_rows(monkeypatch, metric):
    """Every row's proof forced to fail: all rows are searched again exactly."""
    monkeypatch.setenv("KNNFAST_CUDA_SEARCH_PATH", "tensor")
    monkeypatch.setenv("KNNFAST_CUDA_SEARCH_PROOF", "fail")
    q, keys = torch.randn(48, 64), _clustered(4000, 64, torch.float16)
    ex = torch.randint(-1, 4000, (48,))
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 10, metric, exclude=ex.cuda())
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, 10, metric, exclude=ex)


@pytest.mark.parametrize("plan", ["stream", "tensor"])
def test_search_cached_norms_exclude_and_padding(monkeypatch, plan):
    monkeypatch.setenv("KNNFAST_CUDA_SEARCH_PATH", plan)
    q, keys = torch.randn(50, 32), torch.randn(20, 32).half()
    norms = keys.float().pow(2).sum(1)
    ex = torch.arange(50) % 21 - 1  # -1 .. 19
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 30, "l2", key_sq_norms=norms.cuda(),
                              exclude=ex.cuda())
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, 30, "l2", exclude=ex)
    assert (i[:, 19:] == -1).all() and torch.isneginf(s[:, 19:]).all()


def test_search_row_groups_and_large_k():
    """B > 32 on the stream plan runs in row groups; k = 2048 exercises long lists."""
    q, keys = torch.randn(70, 24), torch.randn(3000, 24)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 2048, "ip")
    assert_topk_valid(s.cpu(), i.cpu(), q, keys, 2048, "ip")


def test_search_ties_smaller_index_and_deterministic():
    keys = torch.zeros(1000, 8)
    keys[::7] = 1.0  # many exact ties
    q = torch.ones(3, 8)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 20, "ip")
    assert i.cpu()[:, :20].tolist() == [list(range(0, 140, 7))] * 3
    s2, i2 = knnfast.knn_search(q.cuda(), keys.cuda(), 20, "ip")
    assert torch.equal(s, s2) and torch.equal(i, i2)


def test_search_nan_keys_never_returned():
    keys = torch.randn(500, 16)
    keys[::3, 0] = float("nan")
    q = torch.randn(4, 16)
    s, i = knnfast.knn_search(q.cuda(), keys.cuda(), 50)
    assert (i.cpu() % 3 != 0).all()


# --------------------------------------------------------------------------- rescore
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_rescore_agrees(metric, key_dtype):
    q, keys = torch.randn(9, 70), torch.randn(400, 70).to(key_dtype)
    idx = torch.randint(-1, 400, (9, 33))
    got = knnfast.knn_rescore(q.cuda(), keys.cuda(), idx.cuda(), metric).cpu()
    exp = knnfast.knn_rescore(q, keys, idx, metric)
    assert torch.equal(torch.isneginf(got), idx == -1)
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- probs
@pytest.mark.parametrize("k", [1, 8, 300])
def test_probs_agree(k):
    tokens, scores = _neighbours(7, k, 50)
    tau = torch.rand(7) + 0.1
    dense = knnfast.knn_probs(scores.cuda(), tokens.cuda(), 50, tau.cuda())
    torch.testing.assert_close(dense.cpu(), knnfast.knn_probs(scores, tokens, 50, tau))
    tu, pu = knnfast.knn_probs_sparse(scores.cuda(), tokens.cuda(), tau.cuda())
    etu, epu = knnfast.knn_probs_sparse(scores, tokens, tau)
    assert torch.equal(tu.cpu(), etu)
    torch.testing.assert_close(pu.cpu(), epu)
    again = knnfast.knn_probs(scores.cuda(), tokens.cuda(), 50, tau.cuda())
    assert torch.equal(dense, again)


# --------------------------------------------------------------------------- interpolate
@pytest.mark.parametrize("row_cache", ["1", "0"])
@pytest.mark.parametrize("V", [1, 7, 1000, 42024, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
def test_interpolate_variants(monkeypatch, row_cache, V, dtype):
    """Vector (V % 8 == 0) and scalar rows, rows kept in shared memory or re-read."""
    monkeypatch.setenv("KNNFAST_CUDA_ROW_CACHE", row_cache)
    logits = (torch.randn(6, V) * 4).to(dtype)
    tokens, scores = _neighbours(6, 12, V)
    lam = torch.rand(6)
    got = knnfast.knn_interpolate(logits.cuda(), tokens.cuda(), scores=scores.cuda(),
                                  temperature=2.0, lam=lam.cuda())
    exp = knnfast.knn_interpolate(logits, tokens, scores=scores, temperature=2.0, lam=lam)
    assert_logp_close(got, exp, atol=2e-5, rtol=2e-5)


def test_interpolate_weights_out_alias_and_misaligned_view():
    logits = torch.randn(5, 1025)
    tokens, _ = _neighbours(5, 9, 1024)
    w = torch.rand(5, 9)
    exp = knnfast.knn_interpolate(logits[:, 1:], tokens, weights=w, lam=0.3)
    view = logits.cuda()[:, 1:]  # non-contiguous, and its rows start off 16-byte alignment
    got = knnfast.knn_interpolate(view, tokens.cuda(), weights=w.cuda(), lam=0.3)
    assert_logp_close(got, exp)
    buf = logits[:, 1:].contiguous().cuda()
    knnfast.knn_interpolate(buf, tokens.cuda(), weights=w.cuda(), lam=0.3, out=buf)
    assert_logp_close(buf, exp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("V", [9, 4096])
def test_gold_logprob_variants(dtype, V):
    logits = (torch.randn(20, V) * 3).to(dtype)
    tokens, scores = _neighbours(20, 16, V)
    targets = torch.randint(0, V, (20,))
    targets[:: 5] = tokens[:: 5, 0].clamp(min=0)
    targets[3] = -100
    got = knnfast.knn_gold_logprob(logits.cuda(), targets.cuda(), tokens.cuda(),
                                   scores=scores.cuda(), lam=0.4, temperature=3.0)
    exp = knnfast.knn_gold_logprob(logits, targets, tokens, scores=scores, lam=0.4,
                                   temperature=3.0)
    assert_logp_close(got, exp)
    assert got[3].item() == 0.0


@pytest.mark.parametrize("k", [1, 5, 128, 300])
def test_label_counts_agree(k):
    tokens = torch.randint(-1, 6, (11, k))
    got = knnfast.label_counts(tokens.cuda())
    assert torch.equal(got.cpu(), knnfast.label_counts(tokens))


# --------------------------------------------------------------------------- value checks
def _bad_cases():
    l, t = torch.randn(2, 6), torch.tensor([[1, 2], [3, -1]])
    s = torch.tensor([[0.0, -1.0], [2.0, NEG_INF]])
    y = torch.tensor([1, 2])
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    nan_l = l.clone()
    nan_l[1, 3] = float("nan")
    return {
        "token": (lambda d: knnfast.knn_interpolate(l.to(d), torch.tensor([[1, 6], [0, 0]]).to(d),
                                                    scores=s.to(d)), "tokens must hold ids"),
        "score": (lambda d: knnfast.knn_probs(torch.tensor([[0.0, float("nan")], [0, 0]]).to(d),
                                              t.to(d), 6), "scores must be finite"),
        "weight": (lambda d: knnfast.knn_interpolate(l.to(d), t.to(d),
                                                     weights=torch.tensor([[0.5, -1.0], [1, 0]]).to(d)),
                   "weights must be finite and >= 0"),
        "temperature": (lambda d: knnfast.knn_probs(s.to(d), t.to(d), 6,
                                                    torch.tensor([1.0, 0.0]).to(d)),
                        "temperature must be > 0"),
        "lam": (lambda d: knnfast.knn_interpolate(l.to(d), t.to(d), scores=s.to(d),
                                                  lam=torch.tensor([0.5, 1.5]).to(d)),
                r"lam must be in \[0, 1\]"),
        "logits": (lambda d: knnfast.knn_interpolate(nan_l.to(d), t.to(d), scores=s.to(d)),
                   "logits row 1 contains NaN"),
        "target": (lambda d: knnfast.knn_gold_logprob(l.to(d), torch.tensor([1, 9]).to(d), t.to(d),
                                                      scores=s.to(d)), "targets must be in"),
        "query": (lambda d: knnfast.knn_search(torch.full((2, 4), float("nan")).to(d), keys.to(d), 3),
                  "queries contain NaN"),
        "exclude": (lambda d: knnfast.knn_search(q.to(d), keys.to(d), 3,
                                                 exclude=torch.tensor([0, 10]).to(d)),
                    "exclude must hold ids"),
        "index": (lambda d: knnfast.knn_rescore(q.to(d), keys.to(d), torch.tensor([[0], [10]]).to(d)),
                  "indices must hold ids"),
        "label": (lambda d: knnfast.label_counts(torch.tensor([[0, -2]]).to(d)),
                  "tokens must hold ids"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_bad_values_raise(case):
    """The in-kernel checks raise the same ValueError as the CPU checks."""
    fn, match = _bad_cases()[case]
    with pytest.raises(ValueError, match=match):
        fn("cpu")
    with pytest.raises(ValueError, match=match):
        fn("cuda")
        torch.cuda.synchronize()


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_checks_off_never_crash(monkeypatch, case):
    """KNNFAST_CUDA_CHECKS=0: no report, but no out-of-bounds access either."""
    monkeypatch.setenv("KNNFAST_CUDA_CHECKS", "0")
    fn, _ = _bad_cases()[case]
    fn("cuda")
    torch.cuda.synchronize()


def test_bad_exclude_reports_the_absolute_row():
    """Row groups of the stream plan report rows of the whole batch, as on CPU."""
    q, keys = torch.randn(50, 8), torch.randn(30, 8)
    ex = torch.full((50,), -1)
    ex[40] = 30
    for d in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="got 30 at row 40"):
            knnfast.knn_search(q.to(d), keys.to(d), 3, exclude=ex.to(d))


def test_rescore_nan_query_with_only_padding_ids():
    q, keys = torch.randn(2, 4), torch.randn(10, 4)
    q[1, 0] = float("nan")
    idx = torch.tensor([[0, 1], [-1, -1]])
    for d in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="queries contain NaN"):
            knnfast.knn_rescore(q.to(d), keys.to(d), idx.to(d))


def test_weights_non_finite_reported_before_negative():
    l, t = torch.randn(1, 6), torch.tensor([[1, 2, 3, 4]])
    w = torch.tensor([[-1.0, 0.5, 0.5, float("nan")]])
    for d in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="weights must be finite or -inf"):
            knnfast.knn_interpolate(l.to(d), t.to(d), weights=w.to(d))


def test_direct_op_call_with_a_cpu_tensor_is_a_value_error():
    l, t, s = torch.randn(2, 6), torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 2)
    tau, lam = torch.ones(1), torch.full((1,), 0.5)
    with pytest.raises(ValueError, match="logits must be on the same device"):
        torch.ops.knnfast.knn_interpolate(l, t.cuda(), s.cuda(), None, tau.cuda(), lam.cuda())


# --------------------------------------------------------------------------- knn_kd_loss
@pytest.mark.parametrize("V", [7, 1000, 42024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("probs", [False, True])
def test_kd_loss_variants(V, dtype, kd, probs):
    B, k = 37, 24
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (B,), generator=g)
    targets[::7] = -100
    tokens, scores = _neighbours(B, k, V, seed=V)
    tokens[3] = -1
    teacher = dict(teacher_scores=scores, temperature=10.0)
    if probs:
        w = torch.softmax((scores / 10.0).masked_fill(tokens < 0, NEG_INF), 1).nan_to_num(0.0)
        teacher = dict(teacher_probs=w)
    kw = dict(ce_weight=0.7, kd_weight=0.5, label_smoothing=0.1, kd=kd, reduction="none")
    outs, grads = [], []
    for dev in ("cpu", "cuda"):
        x = logits.to(dev).requires_grad_()
        t = {n: (v.to(dev) if isinstance(v, torch.Tensor) else v) for n, v in teacher.items()}
        loss = knnfast.knn_kd_loss(x, targets.to(dev), tokens.to(dev), **t, **kw)
        (loss * torch.linspace(0.5, 1.5, B, device=dev)).sum().backward()
        outs.append(loss.cpu())
        grads.append(x.grad.float().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    again = knnfast.knn_kd_loss(logits.cuda(), targets.cuda(), tokens.cuda(),
                                **{n: (v.cuda() if isinstance(v, torch.Tensor) else v)
                                   for n, v in teacher.items()}, **kw)
    assert torch.equal(again.cpu(), outs[1])          # deterministic


@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 99, 1])), "targets"),
    (dict(teacher_tokens=torch.tensor([[0, 50], [1, 2], [3, 4]])), "tokens"),
    (dict(teacher_scores=torch.tensor([[0.0, float("nan")], [0.0, 0.0], [0.0, 0.0]])), "scores"),
    (dict(logits=torch.full((3, 10), float("nan"))), "NaN"),
])
def test_kd_loss_bad_values(change, match):
    kw = dict(logits=torch.randn(3, 10), targets=torch.tensor([0, 1, 2]),
              teacher_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]),
              teacher_scores=torch.zeros(3, 2))
    kw.update(change)
    kw = {n: v.cuda() for n, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        knnfast.knn_kd_loss(**kw, temperature=1.0)
