"""knn_gold_logprob: parity, equality with knn_interpolate at the targets, bad inputs."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import NEG_INF, assert_logp_close, rand_scores, rand_tokens, f32_tensor, with_value

SHAPES = [(1, 1, 1), (3, 10, 4), (17, 300, 64), (4, 50257, 8), (2, 5000, 1024)]


def _inputs(B, V, k, device, logit_dtype=torch.float32):
    logits = (torch.randn(B, V) * 3).to(logit_dtype)
    tok = rand_tokens(B, k, V, invalid_frac=0.2)
    sc = rand_scores(B, k, tok)
    targets = torch.randint(0, V, (B,))
    # make some targets hit a neighbour token
    hit = tok[:, 0] >= 0
    targets[hit] = tok[hit, 0]
    if B > 2:
        tok[2] = -1
        sc[2] = NEG_INF
    if B > 1:
        targets[1] = -100
    return logits.to(device), targets.to(device), tok.to(device), sc.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,V,k", SHAPES)
@pytest.mark.parametrize("lam", [0.0, 0.25, 1.0, "tensor"])
@pytest.mark.parametrize("source", ["scores", "weights"])
def test_parity(device, B, V, k, lam, source):
    logits, targets, tok, sc = _inputs(B, V, k, device)
    if lam == "tensor":
        lam = torch.rand(B, device=device)
    kw = dict(scores=sc, temperature=0.7) if source == "scores" else \
        dict(weights=torch.rand(B, k, device=device).masked_fill(tok < 0, 0))
    got = knnfast.knn_gold_logprob(logits, targets, tok, lam=lam, **kw)
    assert got.shape == (B,) and got.dtype == torch.float32 and got.device == logits.device
    exp = ref.knn_gold_logprob(logits, targets, tok, lam=lam, **kw)
    assert_logp_close(got, exp, atol=1e-4, rtol=1e-5)
    full = knnfast.knn_interpolate(logits, tok, lam=lam, **kw)
    at = full.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).masked_fill(targets == -100, 0.0)
    assert_logp_close(got, at, atol=1e-4, rtol=1e-5)
    if B > 1:
        assert got[1].item() == 0.0  # ignore_index row


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logit_dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_logit_dtypes(device, logit_dtype):
    logits, targets, tok, sc = _inputs(5, 333, 16, device, logit_dtype)
    got = knnfast.knn_gold_logprob(logits, targets, tok, scores=sc, lam=0.4)
    assert got.dtype == torch.float32
    assert_logp_close(got, ref.knn_gold_logprob(logits, targets, tok, scores=sc, lam=0.4), atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed(device):
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]] * 3, device=device)  # softmax .2 .6 .2
    tok = torch.tensor([[2, 2, -1]] * 3, device=device)
    sc = torch.tensor([[0.0, 5.0, NEG_INF]] * 3, device=device)
    targets = torch.tensor([2, 1, 7], device=device)
    got = knnfast.knn_gold_logprob(logits, targets, tok, scores=sc, lam=0.5, ignore_index=7)
    torch.testing.assert_close(got.cpu(), torch.tensor([math.log(0.6), math.log(0.3), 0.0]))
    got = knnfast.knn_gold_logprob(logits, targets, tok, scores=sc, lam=1.0, ignore_index=7)
    assert got[1].item() == NEG_INF and got[2].item() == 0.0
    torch.testing.assert_close(got[0].cpu(), torch.tensor(0.0))


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index(device):
    logits, targets, tok, sc = _inputs(4, 20, 5, device)
    targets[1] = 0
    targets[3] = -1
    got = knnfast.knn_gold_logprob(logits, targets, tok, scores=sc, ignore_index=-1)
    assert got[3].item() == 0.0
    exp = ref.knn_gold_logprob(logits, targets, tok, scores=sc, ignore_index=-1)
    assert_logp_close(got, exp)


_props = dict(
    B=st.integers(1, 6),
    V=st.integers(1, 50),
    k=st.integers(1, 20),
    lam=st.floats(0.0, 1.0),
    tau=st.floats(0.05, 20.0),
    use_weights=st.booleans(),
    per_row=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


@pytest.mark.parametrize("device", DEVICES)
@given(**_props)
def test_property_equals_interpolate_at_targets(device, B, V, k, lam, tau, use_weights, per_row, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, V, generator=g) * 4).to(device)
    tok = rand_tokens(B, k, V, invalid_frac=0.3, generator=g)
    targets = torch.where(torch.rand(B, generator=g) < 0.5, tok[:, 0].clamp(min=0),
                          torch.randint(0, V, (B,), generator=g))
    targets = targets.masked_fill(torch.rand(B, generator=g) < 0.2, -100).to(device)
    sc = (torch.randn(B, k, generator=g) * 3).masked_fill(tok < 0, NEG_INF).to(device)
    tok = tok.to(device)
    if per_row:
        lam = torch.rand(B, generator=g).to(device)
        tau = (torch.rand(B, generator=g) * tau + 0.05).to(device)
    kw = dict(weights=torch.rand(B, k, generator=g).to(device)) if use_weights else dict(scores=sc)
    got = knnfast.knn_gold_logprob(logits, targets, tok, temperature=tau, lam=lam, **kw)
    full = knnfast.knn_interpolate(logits, tok, temperature=tau, lam=lam, **kw)
    ign = targets == -100
    at = full.gather(1, targets.clamp(min=0)[:, None]).squeeze(1).masked_fill(ign, 0.0)
    assert_logp_close(got, at, atol=2e-5, rtol=1e-5)
    assert (got[ign] == 0).all()
    again = knnfast.knn_gold_logprob(logits, targets, tok, temperature=tau, lam=lam, **kw)
    assert torch.equal(got, again)  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    B, V, k = 6, 30, 4
    logits = torch.randn(V, B, device=device).t()
    tok = torch.randint(-1, V, (k, B), device=device).t()
    sc = torch.randn(k, B, device=device).t()
    targets = torch.randint(0, V, (2 * B,), device=device)[::2]
    a = knnfast.knn_gold_logprob(logits, targets, tok, scores=sc, lam=0.3)
    b = knnfast.knn_gold_logprob(logits.contiguous(), targets.contiguous(), tok.contiguous(),
                                 scores=sc.contiguous(), lam=0.3)
    torch.testing.assert_close(a, b)


def _ok(device="cpu"):
    return (torch.randn(3, 8, device=device), torch.tensor([1, 2, -100], device=device),
            torch.randint(0, 8, (3, 4), device=device), torch.randn(3, 4, device=device))


GL = knnfast.knn_gold_logprob
BAD = {
    "logits_1d": (lambda l, y, t, s: GL(l[0], y, t, scores=s), "logits"),
    "targets_2d": (lambda l, y, t, s: GL(l, y[:, None], t, scores=s), "targets"),
    "targets_len": (lambda l, y, t, s: GL(l, y[:2], t, scores=s), "targets"),
    "target_ge_v": (lambda l, y, t, s: GL(l, with_value(y, 0, 8), t, scores=s), "targets"),
    "target_negative": (lambda l, y, t, s: GL(l, with_value(y, 1, -1), t, scores=s), "targets"),
    "tokens_rows": (lambda l, y, t, s: GL(l, y, t[:2], scores=s[:2]), "tokens|logits"),
    "token_ge_v": (lambda l, y, t, s: GL(l, y, with_value(t, (0, 0), 8), scores=s), "tokens"),
    "token_lt_m1": (lambda l, y, t, s: GL(l, y, with_value(t, (0, 0), -3), scores=s), "tokens"),
    "both_sources": (lambda l, y, t, s: GL(l, y, t, scores=s, weights=s.abs()), "scores|weights"),
    "no_source": (lambda l, y, t, s: GL(l, y, t), "scores|weights"),
    "tau_zero": (lambda l, y, t, s: GL(l, y, t, scores=s, temperature=0.0), "temperature"),
    "tau_tensor": (lambda l, y, t, s: GL(l, y, t, scores=s, temperature=f32_tensor([1, -1, 1], l.device)), "temperature"),
    "lam_above_one": (lambda l, y, t, s: GL(l, y, t, scores=s, lam=1.0001), "lam"),
    "lam_tensor": (lambda l, y, t, s: GL(l, y, t, scores=s, lam=f32_tensor([0.1, 0.2, -0.3], l.device)), "lam"),
    "logits_nan": (lambda l, y, t, s: GL(with_value(l, (0, 3), float("nan")), y, t, scores=s), "logits"),
    "logits_posinf": (lambda l, y, t, s: GL(with_value(l, (1, 3), float("inf")), y, t, scores=s), "logits"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, case):
    fn, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        fn(*_ok(device))


@requires_cuda
def test_device_mismatch():
    l, y, t, s = _ok("cpu")
    with pytest.raises(ValueError, match="targets|logits"):
        GL(l.cuda(), y, t.cuda(), scores=s.cuda())
