"""knn_gold_logprob: every test of the op.

Sections: parity with knnfast.reference and equality with knn_interpolate at the targets;
properties (hypothesis); bad inputs (shared helper, device mismatch); opcheck; autograd
(against a float64 oracle); CUDA-only kernel tests; the CUDA value checks switched off by an
environment variable (one block at the end).

Kernel / variant -> tests:

  CPU kernel (AVX-512 / portable bodies)   every [cpu] test; portable against AVX-512:
                                            test_simd.py
  CPU / CUDA backward (autograd)           test_gold_logprob_grads_match_float64_oracle,
                                            test_gradients_finite_at_lam_edges
  CUDA knn_gold_logprob_kernel <T, VEC>    test_gold_logprob_variants, every [cuda] test
  CUDA status flags (targets)              test_bad_values_raise, test_checks_off_never_crash
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
    neighbours_with_duplicates,
    on_meta,
    opcheck_neighbours,
    oracle_interpolate,
    rand_scores,
    rand_tokens,
    with_value, check_off_never_crashes)

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
@pytest.mark.parametrize("call,match", bad_input_cases(BAD))
def test_bad_inputs(device, call, match):
    check_bad_input(call, match, *_ok(device))


@requires_cuda
def test_device_mismatch():
    l, y, t, s = _ok("cpu")
    with pytest.raises(ValueError, match="targets|logits"):
        GL(l.cuda(), y, t.cuda(), scores=s.cuda())


def test_scores_on_other_device():
    """A tensor on the `meta` device stands in for "another device" (no GPU needed)."""
    logits = torch.randn(2, 7)
    tokens = torch.randint(0, 7, (2, 3))
    scores = torch.randn(2, 3)
    with pytest.raises(ValueError, match="scores is on meta"):
        knnfast.knn_gold_logprob(logits, tokens[:, 0], tokens, scores=on_meta(scores))


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    B, V, k = 4, 13, 6
    logits = torch.randn(B, V, device=device)
    tok, sc = opcheck_neighbours(B, k, V, device)
    targets = torch.tensor([0, 12, -100, 3], device=device)
    w = torch.rand(B, k, device=device)
    one = f32_tensor([1.0], device)
    return [
        (logits, targets, tok, sc, None, one, f32_tensor([0.5], device), -100),
        (logits, targets, tok, None, w, one, torch.rand(B, device=device), -100),
        (logits.half(), targets, tok, sc, None, torch.rand(B, device=device) + 0.1, one, -100),
        (logits.clone().requires_grad_(), targets, tok, sc.clone().requires_grad_(), None,
         (torch.rand(B, device=device) + 0.5).requires_grad_(),
         (torch.rand(B, device=device) * 0.8 + 0.1).requires_grad_(), -100),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.knnfast.knn_gold_logprob.default, args)


# --------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("mode", ["scores", "weights"])
def test_gold_logprob_grads_match_float64_oracle(mode):
    logits, tokens, scores, weights, lam, tau = autograd_inputs(seed=1)
    targets = tokens[:, 0].clone()
    targets[2] = 7                          # gold token maybe outside the neighbours
    targets[3] = -100                       # ignored row: zero gradient
    nbr = scores if mode == "scores" else weights
    upstream = torch.randn(logits.shape[0], dtype=torch.float64)
    ours_in = [t.clone().requires_grad_() for t in (logits, nbr, lam, tau)]
    ref_in = [t.double().clone().requires_grad_() for t in (logits, nbr, lam, tau)]
    ours = knnfast.knn_gold_logprob(ours_in[0], targets, tokens, **{mode: ours_in[1]},
                                    temperature=ours_in[3], lam=ours_in[2])
    full = oracle_interpolate(ref_in[0], tokens, **{mode: ref_in[1]}, tau=ref_in[3], lam=ref_in[2])
    live = targets != -100
    want = torch.where(live, full.gather(1, targets.clamp(min=0)[:, None])[:, 0], torch.zeros(()).double())
    torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-5)
    n = 4 if mode == "scores" else 3
    g_ours = grads_against(ours, upstream, ours_in[:n])
    g_ref = grads_against(want, upstream, ref_in[:n])
    for name, a, b in zip(("logits", mode, "lam", "temperature"), g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)
    assert (g_ours[0][3] == 0).all()


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_gradients_finite_at_lam_edges(lam):
    """lam = 1 makes off-neighbour log-probs -inf; a loss that only reads the gold/neighbour
    entries must still get finite gradients (no NaN leaking from the -inf entries), from
    knn_gold_logprob and from knn_interpolate gathered at the targets."""
    logits, tokens, scores, _, _, _ = autograd_inputs()
    logits.requires_grad_()
    scores.requires_grad_()
    targets = tokens[:, 0]
    out = knnfast.knn_gold_logprob(logits, targets, tokens, scores=scores, lam=lam)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(scores.grad).all()
    logp = knnfast.knn_interpolate(logits, tokens, scores=scores, lam=lam)
    g_logits, g_scores = torch.autograd.grad(logp.gather(1, targets[:, None]).sum(), (logits, scores))
    assert torch.isfinite(g_logits).all() and torch.isfinite(g_scores).all()


# --------------------------------------------------------------------------- CUDA kernels
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("V", [9, 4096])
def test_gold_logprob_variants(dtype, V):
    logits = (torch.randn(20, V) * 3).to(dtype)
    tokens, scores = neighbours_with_duplicates(20, 16, V)
    targets = torch.randint(0, V, (20,))
    targets[:: 5] = tokens[:: 5, 0].clamp(min=0)
    targets[3] = -100
    got = knnfast.knn_gold_logprob(logits.cuda(), targets.cuda(), tokens.cuda(),
                                   scores=scores.cuda(), lam=0.4, temperature=3.0)
    exp = knnfast.knn_gold_logprob(logits, targets, tokens, scores=scores, lam=0.4,
                                   temperature=3.0)
    assert_logp_close(got, exp)
    assert got[3].item() == 0.0


# value checks inside the kernel: call(device) must raise ValueError matching `match`
CUDA_BAD_VALUES = {
    "target": (lambda d: knnfast.knn_gold_logprob(torch.randn(2, 6).to(d), torch.tensor([1, 9]).to(d),
                                                  torch.tensor([[1, 2], [3, -1]]).to(d),
                                                  scores=torch.tensor([[0.0, -1.0], [2.0, NEG_INF]]).to(d)),
               "targets must be in"),
}


@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_bad_values_raise(call, match):
    """The in-kernel checks raise the same ValueError as the CPU checks."""
    check_bad_input_cpu_and_cuda(call, match)


# =========================================================================== #
# FORCED KERNEL PATHS: value checks switched off (settings.override)        #
# =========================================================================== #
@requires_cuda
@pytest.mark.parametrize("call,match", bad_input_cases(CUDA_BAD_VALUES))
def test_checks_off_never_crash(call, match):
    check_off_never_crashes(call)


@pytest.mark.parametrize("logits_grad", [False, True])
def test_autograd_saves_logits_only_for_their_gradient(logits_grad):
    B, V, k = 4, 1000, 6
    logits = torch.randn(B, V, requires_grad=logits_grad)
    tokens = torch.randint(-1, V, (B, k))
    lam = torch.full((B,), 0.3, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = knnfast.knn_gold_logprob(logits, torch.randint(0, V, (B,)), tokens,
                                       scores=torch.randn(B, k), lam=lam)
    dense = [t for t in saved if t.numel() >= B * V]
    assert len(dense) == int(logits_grad)
    out.sum().backward()
    assert lam.grad is not None
