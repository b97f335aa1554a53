"""Gradients of knn_interpolate and knn_gold_logprob (logits, scores or weights, per-row lam
and temperature) against autograd through a float64 oracle, plus torch.autograd.gradcheck."""
import pytest
import torch

import knnfast

torch.set_default_dtype(torch.float32)


def oracle_interpolate(logits, tokens, scores=None, weights=None, tau=1.0, lam=0.5):
    """log((1-lam) softmax(logits) + lam P_kNN) in float64, differentiable in every input."""
    logits = logits.double()
    B, V = logits.shape
    valid = tokens >= 0
    if scores is not None:
        tau = torch.as_tensor(tau, dtype=torch.float64).reshape(-1, 1)
        z = (scores.double() / tau).masked_fill(~valid, float("-inf"))
        has = torch.isfinite(z).any(1, keepdim=True)
        w = torch.softmax(z.masked_fill(~has, 0.0), dim=1) * has * valid
    else:
        w = weights.double() * valid
        has = (w > 0).any(1, keepdim=True)
    q = torch.zeros(B, V, dtype=torch.float64).scatter_add(1, tokens.clamp(min=0), w)
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1, 1) * has
    # log(q) with a zero gradient where q == 0 (plain log would give 0 * inf = NaN there)
    log_q = torch.where(q > 0, torch.log(torch.where(q > 0, q, torch.ones_like(q))), float("-inf"))
    return torch.logaddexp(torch.log1p(-lam) + torch.log_softmax(logits, 1), torch.log(lam) + log_q)


def _inputs(B=5, V=40, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 2
    tokens = torch.randint(0, V, (B, k), generator=g)
    tokens[:, 1] = tokens[:, 0]          # duplicates
    tokens[0, -2:] = -1                  # invalid slots
    scores = -torch.rand(B, k, generator=g) * 6
    weights = torch.softmax(torch.randn(B, k, generator=g), 1)
    lam = torch.rand(B, generator=g) * 0.8 + 0.1
    tau = torch.rand(B, generator=g) + 0.5
    return logits, tokens, scores, weights, lam, tau


def _grads(out, upstream, tensors):
    return torch.autograd.grad((out.double() * upstream).sum(), tensors, allow_unused=True)


@pytest.mark.parametrize("mode", ["scores", "weights"])
def test_interpolate_grads_match_float64_oracle(mode):
    logits, tokens, scores, weights, lam, tau = _inputs()
    nbr = scores if mode == "scores" else weights
    upstream = torch.randn(logits.shape, dtype=torch.float64)
    ours_in = [t.clone().requires_grad_() for t in (logits, nbr, lam, tau)]
    ref_in = [t.double().clone().requires_grad_() for t in (logits, nbr, lam, tau)]
    kw = lambda x: {mode: x[1]}  # noqa: E731
    ours = knnfast.knn_interpolate(ours_in[0], tokens, **kw(ours_in), temperature=ours_in[3], lam=ours_in[2])
    ref = oracle_interpolate(ref_in[0], tokens, **kw(ref_in), tau=ref_in[3], lam=ref_in[2])
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    g_ours = _grads(ours, upstream, ours_in if mode == "scores" else ours_in[:3])
    g_ref = _grads(ref, upstream, ref_in if mode == "scores" else ref_in[:3])
    for name, a, b in zip(("logits", mode, "lam", "temperature"), g_ours, g_ref):
        assert a is not None, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("mode", ["scores", "weights"])
def test_gold_logprob_grads_match_float64_oracle(mode):
    logits, tokens, scores, weights, lam, tau = _inputs(seed=1)
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
    ref = torch.where(live, full.gather(1, targets.clamp(min=0)[:, None])[:, 0], torch.zeros(()).double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-5)
    n = 4 if mode == "scores" else 3
    g_ours = _grads(ours, upstream, ours_in[:n])
    g_ref = _grads(ref, upstream, ref_in[:n])
    for name, a, b in zip(("logits", mode, "lam", "temperature"), g_ours, g_ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=name)
    assert (g_ours[0][3] == 0).all()


def test_scalar_lam_and_temperature_tensors_get_summed_grads():
    logits, tokens, scores, _, _, _ = _inputs()
    lam = torch.tensor(0.3, requires_grad=True)
    tau = torch.tensor([2.0], requires_grad=True)
    knnfast.knn_interpolate(logits, tokens, scores=scores, temperature=tau, lam=lam).sum().backward()
    lam64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    tau64 = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    oracle_interpolate(logits, tokens, scores=scores, tau=tau64, lam=lam64).sum().backward()
    assert lam.grad.shape == lam.shape and tau.grad.shape == tau.shape
    torch.testing.assert_close(lam.grad.double(), lam64.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(tau.grad.double(), tau64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_gradients_finite_at_lam_edges(lam):
    """lam = 1 makes off-neighbour log-probs -inf; a loss that only reads the gold/neighbour
    entries must still get finite gradients (no NaN leaking from the -inf entries)."""
    logits, tokens, scores, _, _, _ = _inputs()
    logits.requires_grad_()
    scores.requires_grad_()
    targets = tokens[:, 0]
    out = knnfast.knn_gold_logprob(logits, targets, tokens, scores=scores, lam=lam)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(scores.grad).all()
    logp = knnfast.knn_interpolate(logits, tokens, scores=scores, lam=lam)
    g_logits, g_scores = torch.autograd.grad(logp.gather(1, targets[:, None]).sum(), (logits, scores))
    assert torch.isfinite(g_logits).all() and torch.isfinite(g_scores).all()


def test_empty_rows_have_zero_knn_gradient():
    logits, tokens, scores, _, lam, _ = _inputs()
    tokens[1] = -1
    scores.requires_grad_()
    lam.requires_grad_()
    knnfast.knn_interpolate(logits, tokens, scores=scores, lam=lam).sum().backward()
    assert (scores.grad[1] == 0).all() and lam.grad[1] == 0


def test_gradcheck():
    """torch.autograd.gradcheck on the fused op (float32 kernels, so loose tolerances)."""
    logits, tokens, scores, _, lam, tau = _inputs(B=3, V=12, k=4, seed=3)
    inputs = tuple(t.double().requires_grad_() for t in (logits, scores, lam, tau))

    def fn(lg, sc, lm, tu):
        return knnfast.knn_interpolate(lg, tokens, scores=sc.float(), temperature=tu.float(),
                                       lam=lm.float()).double()

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-3, atol=2e-3, rtol=2e-3)


def test_out_buffer_refuses_gradients():
    logits, tokens, scores, _, _, _ = _inputs()
    logits.requires_grad_()
    with pytest.raises(ValueError, match="out= is not differentiable"):
        knnfast.knn_interpolate(logits, tokens, scores=scores, out=torch.empty(logits.shape))
