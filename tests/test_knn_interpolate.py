"""knn_interpolate: parity with the knn-transformers-style reference, λ edge cases,
properties, out=, bad inputs."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import NEG_INF, assert_logp_close, log_pknn64, rand_scores, rand_tokens, f32_tensor, with_value

SHAPES = [(1, 1, 1), (3, 10, 4), (17, 300, 64), (4, 50257, 8), (2, 5000, 1024)]
LOGIT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(B, V, k, device, logit_dtype=torch.float32, invalid_frac=0.2):
    logits = (torch.randn(B, V) * 3).to(logit_dtype)
    tok = rand_tokens(B, k, V, invalid_frac=invalid_frac)
    sc = rand_scores(B, k, tok)
    if B > 2:  # one row without any valid neighbour
        tok[2] = -1
        sc[2] = NEG_INF
    return logits.to(device), tok.to(device), sc.to(device)


def _lams(B, device):
    return {"0": 0.0, "0.25": 0.25, "1": 1.0, "tensor": torch.rand(B, device=device).index_fill(0, torch.tensor([0], device=device), 1.0)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,V,k", SHAPES)
@pytest.mark.parametrize("lam_id", ["0", "0.25", "1", "tensor"])
@pytest.mark.parametrize("tau", [1.0, 0.1, "tensor"])
def test_parity_scores(device, B, V, k, lam_id, tau):
    logits, tok, sc = _inputs(B, V, k, device)
    lam = _lams(B, device)[lam_id]
    t = (torch.rand(B, device=device) * 3 + 0.05) if tau == "tensor" else tau
    got = knnfast.knn_interpolate(logits, tok, scores=sc, temperature=t, lam=lam)
    exp = ref.knn_interpolate(logits, tok, scores=sc, temperature=t, lam=lam)
    assert got.shape == (B, V) and got.device == logits.device
    assert_logp_close(got, exp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,V,k", SHAPES)
@pytest.mark.parametrize("lam_id", ["0", "0.25", "1", "tensor"])
@pytest.mark.parametrize("normalised", [True, False])
def test_parity_weights(device, B, V, k, lam_id, normalised):
    logits, tok, _ = _inputs(B, V, k, device)
    w = torch.rand(B, k, device=device).masked_fill(torch.rand(B, k, device=device) < 0.2, 0.0)
    if B > 3:
        w[3] = 0.0  # zero total weight -> empty row
    if normalised:
        w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    lam = _lams(B, device)[lam_id]
    got = knnfast.knn_interpolate(logits, tok, weights=w, lam=lam)
    exp = ref.knn_interpolate(logits, tok, weights=w, lam=lam)
    assert_logp_close(got, exp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("logit_dtype", LOGIT_DTYPES, ids=str)
def test_logit_dtypes(device, logit_dtype):
    logits, tok, sc = _inputs(5, 777, 16, device, logit_dtype)
    got = knnfast.knn_interpolate(logits, tok, scores=sc, temperature=0.5, lam=0.3)
    assert got.dtype == torch.float32
    exp = ref.knn_interpolate(logits, tok, scores=sc, temperature=0.5, lam=0.3)
    assert_logp_close(got, exp, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed(device):
    logits = torch.tensor([[0.0, math.log(3.0), 0.0]], device=device)  # softmax = .2 .6 .2
    tok = torch.tensor([[2, 2, -1]], device=device)
    sc = torch.tensor([[0.0, 5.0, NEG_INF]], device=device)
    got = knnfast.knn_interpolate(logits, tok, scores=sc, lam=0.5)
    exp = torch.log(torch.tensor([[0.1, 0.3, 0.1 + 0.5]]))
    torch.testing.assert_close(got.cpu(), exp)
    w = torch.tensor([[0.25, 0.25, 0.7]], device=device)  # slot 2 invalid -> ignored
    got = knnfast.knn_interpolate(logits, tok, weights=w, lam=0.5)
    exp = torch.log(torch.tensor([[0.1, 0.3, 0.1 + 0.25]]))  # weights used as given
    torch.testing.assert_close(got.cpu(), exp)


@pytest.mark.parametrize("device", DEVICES)
def test_neg_inf_logits_allowed(device):
    logits = torch.tensor([[NEG_INF, 0.0, 1.0, NEG_INF]], device=device)
    tok = torch.tensor([[0, -1]], device=device)
    sc = torch.tensor([[0.0, NEG_INF]], device=device)
    got = knnfast.knn_interpolate(logits, tok, scores=sc, lam=0.5)
    assert not torch.isnan(got).any()
    assert torch.isneginf(got[0, 3]) and torch.isfinite(got[0, :3]).all()
    torch.testing.assert_close(got[0, 0].cpu(), torch.tensor(math.log(0.5)))
    assert_logp_close(got, ref.knn_interpolate(logits, tok, scores=sc, lam=0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits_stable(device):
    logits = torch.tensor([[1e4, -1e4, 0.0], [-3e4, -3e4, -3e4]], device=device)
    tok = torch.tensor([[1], [2]], device=device)
    sc = torch.zeros(2, 1, device=device)
    got = knnfast.knn_interpolate(logits, tok, scores=sc, lam=0.1)
    assert_logp_close(got, ref.knn_interpolate(logits, tok, scores=sc, lam=0.1))
    torch.testing.assert_close(got[0, 1].cpu(), torch.tensor(math.log(0.1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 100.0, 2000.0])
def test_lam0_is_log_softmax_with_offset_logits(device, offset):
    """lam = 0 gives exactly log_softmax (DESIGN section 3), which is shift invariant:
    a common offset on the logits must not cost precision (torch.log_softmax keeps it)."""
    logits = torch.randn(16, 1000) * 3 - offset
    tok = torch.randint(0, 1000, (16, 8))
    sc = torch.randn(16, 8)
    got = knnfast.knn_interpolate(logits.to(device), tok.to(device), scores=sc.to(device), lam=0.0)
    torch.testing.assert_close(got.cpu(), torch.log_softmax(logits, -1), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- #
# properties                                                                  #
# --------------------------------------------------------------------------- #
_props = dict(
    B=st.integers(1, 5),
    V=st.integers(1, 60),
    k=st.integers(1, 30),
    invalid=st.floats(0.0, 1.0),
    tau=st.floats(0.01, 50.0),
    use_weights=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def _prop_inputs(B, V, k, invalid, use_weights, seed, device):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 4
    tok = rand_tokens(B, k, V, invalid_frac=invalid, generator=g)
    sc = (torch.randn(B, k, generator=g) * 3).masked_fill(tok < 0, NEG_INF)
    w = torch.rand(B, k, generator=g)
    kw = dict(weights=w.to(device)) if use_weights else dict(scores=sc.to(device))
    return logits.to(device), tok.to(device), kw


@pytest.mark.parametrize("device", DEVICES)
@given(**_props)
def test_property_lam0_is_log_softmax(device, B, V, k, invalid, tau, use_weights, seed):
    logits, tok, kw = _prop_inputs(B, V, k, invalid, use_weights, seed, device)
    got = knnfast.knn_interpolate(logits, tok, temperature=tau, lam=0.0, **kw)
    torch.testing.assert_close(got, torch.log_softmax(logits, -1), atol=1e-5, rtol=0)
    got_t = knnfast.knn_interpolate(logits, tok, temperature=tau, lam=torch.zeros(B, device=device), **kw)
    torch.testing.assert_close(got_t, torch.log_softmax(logits, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@given(**_props)
def test_property_lam1_is_log_pknn(device, B, V, k, invalid, tau, use_weights, seed):
    logits, tok, kw = _prop_inputs(B, V, k, invalid, use_weights, seed, device)
    got = knnfast.knn_interpolate(logits, tok, temperature=tau, lam=1.0, **kw)
    assert not torch.isnan(got).any()
    lp = log_pknn64(tok, V, temperature=tau, **kw)  # float64, log space
    has = ~torch.isneginf(lp).all(1)
    g = got.detach().cpu().double()
    # rows with neighbours: exactly -inf off the neighbour tokens, log P_kNN on them
    # (a probability below exp(-80) may underflow to -inf: see assert_logp_close)
    off = torch.isneginf(lp[has])
    assert torch.isneginf(g[has][off]).all(), (g[has], lp[has])
    assert_logp_close(got[has.to(got.device)], lp[has], atol=1e-4, rtol=1e-5)
    # rows without: log_softmax (as if lam = 0)
    torch.testing.assert_close(got[~has.to(got.device)], torch.log_softmax(logits[~has.to(got.device)], -1),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@given(lam=st.floats(0.0, 1.0), **_props)
def test_property_parity_and_normalised(device, lam, B, V, k, invalid, tau, use_weights, seed):
    logits, tok, kw = _prop_inputs(B, V, k, invalid, use_weights, seed, device)
    if use_weights:  # normalise so the mixture is a distribution
        kw["weights"] = kw["weights"].masked_fill(tok < 0, 0)
        kw["weights"] = kw["weights"] / kw["weights"].sum(1, keepdim=True).clamp_min(1e-30)
    got = knnfast.knn_interpolate(logits, tok, temperature=tau, lam=lam, **kw)
    exp = ref.knn_interpolate(logits, tok, temperature=tau, lam=lam, **kw)
    assert_logp_close(got, exp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.logsumexp(got, -1).cpu(), torch.zeros(B), atol=1e-5, rtol=0)
    again = knnfast.knn_interpolate(logits, tok, temperature=tau, lam=lam, **kw)
    assert torch.equal(got, again)  # deterministic


# --------------------------------------------------------------------------- #
# out=, non-contiguous                                                        #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("device", DEVICES)
def test_out_buffer(device):
    logits, tok, sc = _inputs(4, 100, 8, device)
    out = torch.full((4, 100), 123.0, device=device)
    ptr = out.data_ptr()
    res = knnfast.knn_interpolate(logits, tok, scores=sc, temperature=2.0, lam=0.4, out=out)
    assert res is out or (res.data_ptr() == ptr and res.shape == out.shape)
    assert out.data_ptr() == ptr
    exp = knnfast.knn_interpolate(logits, tok, scores=sc, temperature=2.0, lam=0.4)
    assert torch.equal(out, exp)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    B, V, k = 6, 40, 5
    logits = torch.randn(V, B, device=device).t()
    tok = torch.randint(-1, V, (k, B), device=device).t()
    sc = torch.randn(k, B, device=device).t()
    w = torch.rand(k, B, device=device).t()
    lam = torch.rand(2 * B, device=device)[::2]
    tau = torch.rand(2 * B, device=device)[1::2] + 0.1
    for kw in (dict(scores=sc, temperature=tau), dict(weights=w)):
        a = knnfast.knn_interpolate(logits, tok, lam=lam, **kw)
        kwc = {n: v.contiguous() for n, v in kw.items()}
        b = knnfast.knn_interpolate(logits.contiguous(), tok.contiguous(), lam=lam.contiguous(), **kwc)
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- #
# bad inputs                                                                  #
# --------------------------------------------------------------------------- #
def _ok(device="cpu"):
    return (torch.randn(3, 8, device=device), torch.randint(0, 8, (3, 4), device=device),
            torch.randn(3, 4, device=device))


KI = knnfast.knn_interpolate
BAD = {
    "logits_1d": (lambda l, t, s: KI(l[0], t, scores=s), "logits"),
    "logits_3d": (lambda l, t, s: KI(l[None], t, scores=s), "logits"),
    "tokens_1d": (lambda l, t, s: KI(l, t[0], scores=s), "tokens"),
    "tokens_rows": (lambda l, t, s: KI(l, t[:2], scores=s[:2]), "tokens|logits"),
    "scores_shape": (lambda l, t, s: KI(l, t, scores=s[:, :3]), "scores"),
    "weights_shape": (lambda l, t, s: KI(l, t, weights=s.abs()[:2]), "weights"),
    "token_ge_v": (lambda l, t, s: KI(l, with_value(t, (0, 1), 8), scores=s), "tokens"),
    "token_lt_m1": (lambda l, t, s: KI(l, with_value(t, (2, 3), -2), scores=s), "tokens"),
    "both_sources": (lambda l, t, s: KI(l, t, scores=s, weights=s.abs()), "scores|weights"),
    "no_source": (lambda l, t, s: KI(l, t), "scores|weights"),
    "weights_negative": (lambda l, t, s: KI(l, t, weights=with_value(s.abs(), (1, 1), -0.5)), "weights"),
    "tau_zero": (lambda l, t, s: KI(l, t, scores=s, temperature=0.0), "temperature"),
    "tau_negative": (lambda l, t, s: KI(l, t, scores=s, temperature=-2.0), "temperature"),
    "tau_tensor": (lambda l, t, s: KI(l, t, scores=s, temperature=f32_tensor([1, 0, 1], l.device)), "temperature"),
    "tau_tensor_shape": (lambda l, t, s: KI(l, t, scores=s, temperature=f32_tensor([1, 1], l.device)), "temperature"),
    "lam_negative": (lambda l, t, s: KI(l, t, scores=s, lam=-0.1), "lam"),
    "lam_above_one": (lambda l, t, s: KI(l, t, scores=s, lam=1.5), "lam"),
    "lam_nan": (lambda l, t, s: KI(l, t, scores=s, lam=float("nan")), "lam"),
    "lam_tensor": (lambda l, t, s: KI(l, t, scores=s, lam=f32_tensor([0.5, 1.01, 0.2], l.device)), "lam"),
    "lam_tensor_neg": (lambda l, t, s: KI(l, t, scores=s, lam=f32_tensor([-0.5, 0.1, 0.2], l.device)), "lam"),
    "lam_tensor_shape": (lambda l, t, s: KI(l, t, scores=s, lam=f32_tensor([0.5] * 4, l.device)), "lam"),
    "logits_nan": (lambda l, t, s: KI(with_value(l, (1, 5), float("nan")), t, scores=s), "logits"),
    "logits_posinf": (lambda l, t, s: KI(with_value(l, (2, 0), float("inf")), t, scores=s), "logits"),
    "out_shape": (lambda l, t, s: KI(l, t, scores=s, out=torch.empty(3, 7, device=l.device)), r"\bout\b"),
    "out_dtype": (lambda l, t, s: KI(l, t, scores=s, out=torch.empty(3, 8, dtype=torch.float16, device=l.device)), r"\bout\b"),
    "out_noncontig": (lambda l, t, s: KI(l, t, scores=s, out=torch.empty(8, 3, device=l.device).t()), r"\bout\b"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs(device, case):
    fn, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        fn(*_ok(device))


@requires_cuda
def test_device_mismatch():
    l, t, s = _ok("cpu")
    with pytest.raises(ValueError, match="tokens|logits"):
        KI(l.cuda(), t, scores=s.cuda())
    with pytest.raises(ValueError, match="scores|logits"):
        KI(l.cuda(), t.cuda(), scores=s)
    with pytest.raises(ValueError, match="lam"):
        KI(l.cuda(), t.cuda(), scores=s.cuda(), lam=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"\bout\b"):
        KI(l.cuda(), t.cuda(), scores=s.cuda(), out=torch.empty(3, 8))
