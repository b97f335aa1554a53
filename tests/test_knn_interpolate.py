"""knn_interpolate: every test of the op.

Sections: parity with the knn-transformers-style reference, λ edge cases; properties
(hypothesis); out=, non-contiguous inputs; bad inputs (shared helper, device mismatch);
opcheck (also of the .out overload); autograd (against a float64 oracle, gradcheck); CUDA-only
kernel tests; forced kernel paths (environment variables, one block at the end).

Kernel / variant -> tests:

  CPU kernel (AVX-512 / portable bodies)     every [cpu] test; portable against AVX-512:
                                              test_simd.py
  CPU / CUDA backward (autograd)             test_interpolate_grads_match_float64_oracle,
                                              test_scalar_lam_and_temperature_tensors_get_summed_grads,
                                              test_empty_rows_have_zero_knn_gradient, test_gradcheck
  CUDA knn_interpolate_kernel <T, VEC, CACHE>  test_interpolate_variants (row cache forced on/off)
  CUDA misaligned rows, out= aliasing        test_interpolate_weights_out_alias_and_misaligned_view
  CUDA status flags (token, weight, lam, logits)   test_bad_values_raise, test_checks_off_never_crash,
                                              test_weights_non_finite_reported_before_negative
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import (
    NEG_INF,
    assert_logp_close,
    autograd_inputs,
    bad_input_cases,
    check_bad_input,
    check_bad_input_cpu_and_cuda,
    f32_tensor,
    grads_against,
    log_pknn64,
    neighbours_with_duplicates,
    on_meta,
    opcheck_neighbours,
    oracle_interpolate,
    rand_scores,
    rand_tokens,
    with_value, check_off_never_crashes)

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
@pytest.mark.parametrize("call,match", bad_input_cases(BAD))
def test_bad_inputs(device, call, match):
    check_bad_input(call, match, *_ok(device))


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


def test_arguments_on_other_device():
    """A tensor on the `meta` device stands in for "another device" (no GPU needed)."""
    logits = torch.randn(2, 7)
    tokens = torch.randint(0, 7, (2, 3))
    scores = torch.randn(2, 3)
    with pytest.raises(ValueError, match="tokens is on meta"):
        knnfast.knn_interpolate(logits, on_meta(tokens), scores=scores)
    with pytest.raises(ValueError, match="lam is on meta"):
        knnfast.knn_interpolate(logits, tokens, scores=scores, lam=on_meta(torch.rand(2)))


# --------------------------------------------------------------------------- #
# opcheck (the raw op: temperature / lam are float32 tensors of 1 or B         #
# elements, optional tensors may be None)                                      #
# --------------------------------------------------------------------------- #
def _opcheck_samples(device):
    B, V, k = 4, 13, 6
    logits = torch.randn(B, V, device=device)
    tok, sc = opcheck_neighbours(B, k, V, device)
    w = torch.rand(B, k, device=device)
    return [
        (logits, tok, sc, None, f32_tensor([1.0], device), f32_tensor([0.5], device)),
        (logits, tok, None, w, f32_tensor([1.0], device), torch.rand(B, device=device)),
        (logits.half(), tok, sc, None, torch.rand(B, device=device) + 0.1, f32_tensor([1.0], device)),
        (logits.bfloat16(), tok, sc, None, f32_tensor([2.0], device), f32_tensor([0.0], device)),
        # differentiable inputs: opcheck then also checks the autograd registration
        (logits.clone().requires_grad_(), tok, sc.clone().requires_grad_(), None,
         (torch.rand(B, device=device) + 0.5).requires_grad_(),
         (torch.rand(B, device=device) * 0.8 + 0.1).requires_grad_()),
        (logits.clone().requires_grad_(), tok, None, w.clone().requires_grad_(),
         f32_tensor([1.0], device), f32_tensor([0.3], device).requires_grad_()),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    op = torch.ops.knnfast.knn_interpolate.default  # an OpOverload: the op also has .out
    for args in _opcheck_samples(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_interpolate_out(device):
    op = torch.ops.knnfast.knn_interpolate.out
    for args in _opcheck_samples(device):
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            continue  # out= is inference-only
        out = torch.empty(args[0].shape, dtype=torch.float32, device=device)
        torch.library.opcheck(op, args, {"out": out})


# --------------------------------------------------------------------------- #
# autograd (logits, scores or weights, per-row lam and temperature)           #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("mode", ["scores", "weights"])
def test_interpolate_grads_match_float64_oracle(mode):
    logits, tokens, scores, weights, lam, tau = autograd_inputs()
    nbr = scores if mode == "scores" else weights
    upstream = torch.randn(logits.shape, dtype=torch.float64)
    ours_in = [t.clone().requires_grad_() for t in (logits, nbr, lam, tau)]
    ref_in = [t.double().clone().requires_grad_() for t in (logits, nbr, lam, tau)]
    kw = lambda x: {mode: x[1]}  # noqa: E731
    ours = knnfast.knn_interpolate(ours_in[0], tokens, **kw(ours_in), temperature=ours_in[3], lam=ours_in[2])
    want = oracle_interpolate(ref_in[0], tokens, **kw(ref_in), tau=ref_in[3], lam=ref_in[2])
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
    g_ours = grads_against(ours, upstream, ours_in if mode == "scores" else ours_in[:3])
    g_ref = grads_against(want, upstream, ref_in if mode == "scores" else ref_in[:3])
    for name, a, b in zip(("logits", mode, "lam", "temperature"), g_ours, g_ref):
        assert a is not None, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


def test_scalar_lam_and_temperature_tensors_get_summed_grads():
    logits, tokens, scores, _, _, _ = autograd_inputs()
    lam = torch.tensor(0.3, requires_grad=True)
    tau = torch.tensor([2.0], requires_grad=True)
    knnfast.knn_interpolate(logits, tokens, scores=scores, temperature=tau, lam=lam).sum().backward()
    lam64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    tau64 = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    oracle_interpolate(logits, tokens, scores=scores, tau=tau64, lam=lam64).sum().backward()
    assert lam.grad.shape == lam.shape and tau.grad.shape == tau.shape
    torch.testing.assert_close(lam.grad.double(), lam64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tau.grad.double(), tau64.grad, rtol=1e-4, atol=1e-4)


def test_empty_rows_have_zero_knn_gradient():
    logits, tokens, scores, _, lam, _ = autograd_inputs()
    tokens[1] = -1
    scores.requires_grad_()
    lam.requires_grad_()
    knnfast.knn_interpolate(logits, tokens, scores=scores, lam=lam).sum().backward()
    assert (scores.grad[1] == 0).all() and lam.grad[1] == 0


def test_gradcheck():
    """torch.autograd.gradcheck on the fused op (float32 kernels, so loose tolerances)."""
    logits, tokens, scores, _, lam, tau = autograd_inputs(B=3, V=12, k=4, seed=3)
    inputs = tuple(t.double().requires_grad_() for t in (logits, scores, lam, tau))

    def fn(lg, sc, lm, tu):
        return knnfast.knn_interpolate(lg, tokens, scores=sc.float(), temperature=tu.float(),
                                       lam=lm.float()).double()

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_out_buffer_refuses_gradients():
    logits, tokens, scores, _, _, _ = autograd_inputs()
    logits.requires_grad_()
    with pytest.raises(ValueError, match="out= is not differentiable"):
        knnfast.knn_interpolate(logits, tokens, scores=scores, out=torch.empty(logits.shape))


# --------------------------------------------------------------------------- #
# CUDA kernels (CPU <-> CUDA agreement, in-kernel value checks)               #
# --------------------------------------------------------------------------- #
@requires_cuda
def test_interpolate_weights_out_alias_and_misaligned_view():
    logits = torch.randn(5, 1025)
    tokens, _ = neighbours_with_duplicates(5, 9, 1024)
    w = torch.rand(5, 9)
    exp = knnfast.knn_interpolate(logits[:, 1:], tokens, weights=w, lam=0.3)
    view = logits.cuda()[:, 1:]  # non-contiguous, and its rows start off 16-byte alignment
    got = knnfast.knn_interpolate(view, tokens.cuda(), weights=w.cuda(), lam=0.3)
    assert_logp_close(got, exp)
    buf = logits[:, 1:].contiguous().cuda()
    knnfast.knn_interpolate(buf, tokens.cuda(), weights=w.cuda(), lam=0.3, out=buf)
    assert_logp_close(buf, exp)


def _nan_logits():
    logits = torch.randn(2, 6)
    logits[1, 3] = float("nan")
    return logits


_T = [[1, 2], [3, -1]]                    # neighbour tokens of the value-check cases
_S = [[0.0, -1.0], [2.0, NEG_INF]]        # their scores

# value checks inside the kernel: call(device) must raise ValueError matching `match`
CUDA_BAD_VALUES = {
    "lam": (lambda d: knnfast.knn_interpolate(torch.randn(2, 6).to(d), torch.tensor(_T).to(d),
                                              scores=torch.tensor(_S).to(d),
                                              lam=torch.tensor([0.5, 1.5]).to(d)),
            r"lam must be in \[0, 1\]"),
    "logits": (lambda d: knnfast.knn_interpolate(_nan_logits().to(d), torch.tensor(_T).to(d),
                                                 scores=torch.tensor(_S).to(d)),
               "logits row 1 contains NaN"),
    "token": (lambda d: knnfast.knn_interpolate(torch.randn(2, 6).to(d),
                                                torch.tensor([[1, 6], [0, 0]]).to(d),
                                                scores=torch.tensor(_S).to(d)),
              "tokens must hold ids"),
    "weight": (lambda d: knnfast.knn_interpolate(torch.randn(2, 6).to(d), torch.tensor(_T).to(d),
                                                 weights=torch.tensor([[0.5, -1.0], [1, 0]]).to(d)),
               "weights must be finite and >= 0"),
}


@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_bad_values_raise(call, match):
    """The in-kernel checks raise the same ValueError as the CPU checks."""
    check_bad_input_cpu_and_cuda(call, match)


@requires_cuda
def test_weights_non_finite_reported_before_negative():
    l, t = torch.randn(1, 6), torch.tensor([[1, 2, 3, 4]])
    w = torch.tensor([[-1.0, 0.5, 0.5, float("nan")]])
    for d in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="weights must be finite or -inf"):
            knnfast.knn_interpolate(l.to(d), t.to(d), weights=w.to(d))


@requires_cuda
def test_direct_op_call_with_a_cpu_tensor_is_a_value_error():
    l, t, s = torch.randn(2, 6), torch.tensor([[1, 2], [3, 4]]), torch.randn(2, 2)
    tau, lam = torch.ones(1), torch.full((1,), 0.5)
    with pytest.raises(ValueError, match="logits must be on the same device"):
        torch.ops.knnfast.knn_interpolate(l, t.cuda(), s.cuda(), None, tau.cuda(), lam.cuda())


# =========================================================================== #
# FORCED KERNEL PATHS                                                         #
# plan= row_cache / global (CUDA), and value checks switched off              #
# (settings.override).                                                        #
# =========================================================================== #
@requires_cuda
@pytest.mark.parametrize("plan", ["row_cache", "global"])
@pytest.mark.parametrize("V", [1, 7, 1000, 42024, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
def test_interpolate_variants(plan, V, dtype):
    """Vector (V % 8 == 0) and scalar rows, rows kept in shared memory or re-read."""
    logits = (torch.randn(6, V) * 4).to(dtype)
    tokens, scores = neighbours_with_duplicates(6, 12, V)
    lam = torch.rand(6)
    got = knnfast.knn_interpolate(logits.cuda(), tokens.cuda(), scores=scores.cuda(),
                                  temperature=2.0, lam=lam.cuda(), plan=plan)
    exp = knnfast.knn_interpolate(logits, tokens, scores=scores, temperature=2.0, lam=lam)
    assert_logp_close(got, exp, atol=2e-5, rtol=2e-5)


@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_checks_off_never_crash(call, match):
    check_off_never_crashes(call)


# =========================================================================== #
# WHAT AUTOGRAD SAVES                                                         #
# =========================================================================== #
def saved_tensors_of(fn):
    """The tensors autograd saves while `fn()` runs its forward."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("logits_grad", [False, True])
def test_autograd_saves_no_dense_output(logits_grad):
    """Only the [B] log-sum-exp and [B, k] values are saved; the [B, V] logits only when
    their gradient is needed (then the input itself, not a copy), never the [B, V] output."""
    B, V, k = 4, 1000, 6
    logits = torch.randn(B, V, requires_grad=logits_grad)
    tokens = torch.randint(-1, V, (B, k))
    scores = torch.randn(B, k, requires_grad=True)
    out, saved = saved_tensors_of(lambda: knnfast.knn_interpolate(
        logits, tokens, scores=scores, temperature=2.0, lam=torch.full((B,), 0.3)))
    dense = [t for t in saved if t.numel() >= B * V]
    if logits_grad:
        assert len(dense) == 1 and dense[0].data_ptr() == logits.data_ptr()
    else:
        assert dense == []
    assert all(t.data_ptr() != out.data_ptr() for t in saved)
    out.sum().backward()
    assert scores.grad is not None and (logits.grad is not None) == logits_grad
