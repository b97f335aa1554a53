"""softmax_stats (entropy and top-k log-probabilities of softmax(logits) per row): every test
of the op.

Sections: parity with knnfast.reference and float64 math; hand-computed rows; properties
(hypothesis); bad inputs; opcheck; the portable body; CUDA (the ATen composition).

Kernel / variant -> tests:

  CPU plan fused: AVX-512 body (row_entropy, row_top_values) every [cpu-fused] test
  CPU plan fused: portable body (KNNFAST_SIMD=generic)        test_portable_body_matches
  plan aten (common/softmax_stats_aten.cpp: CUDA's code)      every [cpu-aten] test
  CUDA wrapper (plan aten)                                    every [cuda-aten] test (never ran)
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import requires_cuda
from helpers import both_simd_levels, check_bad_input

INF = float("inf")
# (device, plan): every plan of every device; "aten" on CPU is the composition CUDA runs
DEVICE_PLANS = [pytest.param("cpu", "fused", id="cpu-fused"),
                pytest.param("cpu", "aten", id="cpu-aten"),
                pytest.param("cuda", "aten", id="cuda-aten", marks=requires_cuda)]
CPU_PLANS = ["fused", "aten"]


def _float64_stats(logits, top):
    """The definition in float64: -sum p log p over p > 0, the top log p descending."""
    x = logits.double()
    rows = []
    for row in x:
        if torch.isneginf(row).all():
            rows.append((0.0, [-INF] * top))
            continue
        logp = torch.log_softmax(row, 0)
        p = logp.exp()
        live = ~torch.isneginf(logp)
        rows.append((float(-(p[live] * logp[live]).sum()), logp.sort(descending=True).values[:top].tolist()))
    entropy = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    return entropy, torch.tensor([r[1] for r in rows], dtype=torch.float64).view(len(rows), top)


def _logits(B, V, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * 4
    if masked:
        x[torch.rand(B, V, generator=g) < masked] = -INF
    return x.to(dtype)


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("B,V,top", [(1, 1, 1), (3, 7, 4), (5, 33, 33), (64, 8000, 4),
                                     (2, 1000, 200), (4, 17, 1)])
@pytest.mark.parametrize("masked", [0.0, 0.3])
def test_parity(device, plan, dtype, B, V, top, masked):
    x = _logits(B, V, dtype, masked).to(device)
    entropy, top_logp = knnfast.softmax_stats(x, top, plan=plan)
    assert entropy.dtype == top_logp.dtype == torch.float32
    assert entropy.shape == (B,) and top_logp.shape == (B, top) and entropy.device == x.device
    r_entropy, r_top = ref.softmax_stats(x, top)
    # fp32 sums over V terms (the portable body adds them in order): |error| ~ 1e-5 at V = 8,000
    tol = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(entropy, r_entropy, **tol)
    torch.testing.assert_close(top_logp, r_top, **tol)
    e64, t64 = _float64_stats(x.cpu(), top)
    torch.testing.assert_close(entropy.cpu().double(), e64, **tol)
    torch.testing.assert_close(top_logp.cpu().double(), t64, **tol)


def _impls(plan):
    return [lambda *a, **kw: knnfast.softmax_stats(*a, **kw, plan=plan), ref.softmax_stats]


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
@pytest.mark.parametrize("which", [0, 1], ids=["op", "reference"])
def test_hand_computed(device, plan, which):
    impl = _impls(plan)[which]
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0],                  # uniform: log 4
                      [0.0, 0.0, -INF, -INF],                # masked: log 2, then -inf
                      [-INF, -INF, -INF, -INF],              # no mass: (0, -inf)
                      [100.0, 0.0, 0.0, 0.0]], device=device)  # near certain
    entropy, top = impl(x, 3)
    assert entropy[:3].cpu().tolist() == pytest.approx([math.log(4), math.log(2), 0.0], abs=1e-6)
    assert 0.0 <= float(entropy[3]) < 1e-38 or float(entropy[3]) == pytest.approx(0.0, abs=1e-30)
    assert top[1].cpu().tolist() == pytest.approx([math.log(0.5), math.log(0.5), -INF])
    assert top[2].cpu().tolist() == [-INF] * 3
    assert float(top[3, 0]) == pytest.approx(0.0, abs=1e-6) and float(top[3, 1]) == pytest.approx(-100.0)
    assert not torch.isnan(entropy).any() and not torch.isnan(top).any()


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
def test_empty_batch_and_non_contiguous(device, plan):
    e, t = knnfast.softmax_stats(torch.zeros(0, 5, device=device), 2, plan=plan)
    assert e.shape == (0,) and t.shape == (0, 2)
    x = _logits(9, 40, torch.float32, 0.1).to(device)
    a = knnfast.softmax_stats(x.t().contiguous().t(), 3, plan=plan)
    b = knnfast.softmax_stats(x, 3, plan=plan)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
@pytest.mark.parametrize("which", [0, 1], ids=["op", "reference"])
def test_without_entropy(device, plan, which):
    """entropy=False: the same top log-probs, an empty entropy (its pass skipped)."""
    impl = _impls(plan)[which]
    x = _logits(6, 300, torch.float32, 0.2).to(device)
    entropy, top = impl(x, 3, entropy=False)
    assert entropy.shape == (0,) and entropy.dtype == torch.float32
    assert torch.equal(top, impl(x, 3)[1])
    with pytest.raises(ValueError, match="entropy"):
        impl(x, 3, entropy=1)


@pytest.mark.parametrize("plan", CPU_PLANS)
def test_ties_and_duplicates(plan):
    """Equal values each take a slot (values, not distinct values)."""
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    _, top = knnfast.softmax_stats(x, 4, plan=plan)
    lse = torch.logsumexp(x, 1)
    torch.testing.assert_close(top, (torch.tensor([[3.0, 3.0, 3.0, 2.0]]) - lse))


@given(B=st.integers(1, 5), V=st.integers(1, 300), top_frac=st.floats(0.0, 1.0),
       scale=st.sampled_from([0.1, 3.0, 80.0]), masked=st.sampled_from([0.0, 0.5, 0.95]),
       seed=st.integers(0, 2**31 - 1))
def test_property_matches_float64(B, V, top_frac, scale, masked, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, V, generator=g) * scale
    x[torch.rand(B, V, generator=g) < masked] = -INF
    top = max(1, min(V, round(top_frac * V)))
    e64, t64 = _float64_stats(x, top)
    for plan in CPU_PLANS:
        entropy, top_logp = knnfast.softmax_stats(x, top, plan=plan)
        torch.testing.assert_close(entropy.double(), e64, rtol=1e-5, atol=5e-5)
        torch.testing.assert_close(top_logp.double(), t64, rtol=1e-5, atol=5e-5)
        assert (entropy >= -1e-5).all()
        assert (entropy <= torch.log((x > -INF).sum(1).clamp(min=1).double()).float() + 1e-4).all()
        assert (top_logp[:, 1:] <= top_logp[:, :-1]).all()


# ------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("impl", [knnfast.softmax_stats, ref.softmax_stats,
                                  lambda x, top: knnfast.softmax_stats(x, top, plan="aten")],
                         ids=["op", "reference", "op-aten"])
@pytest.mark.parametrize("bad,top,match", [
    (torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), 1, "logits row 0 contains NaN"),
    (torch.tensor([[0.0, 1.0], [INF, 1.0]]), 1, "logits row 1 contains NaN or \\+inf"),
    (torch.zeros(3, 4), 0, "top"),
    (torch.zeros(3, 4), 5, "top"),
    (torch.zeros(3, 4), True, "top"),
    (torch.zeros(3, 4), 2.0, "top"),
    (torch.zeros(4), 1, "logits"),
    (torch.zeros(3, 4, dtype=torch.long), 1, "logits"),
    (torch.zeros(3, 0), 1, "logits|top"),
    ([[0.0, 1.0]], 1, "logits"),
], ids=["nan", "+inf", "top 0", "top > V", "top bool", "top float", "1-D", "int", "V=0", "list"])
def test_bad_inputs(impl, bad, top, match):
    check_bad_input(lambda: impl(bad, top), match)


def test_top_above_max_k():
    with pytest.raises(ValueError, match="top"):
        knnfast.softmax_stats(torch.zeros(1, 5000), 2049)


def test_bad_plan_names_the_plans_of_the_device():
    with pytest.raises(ValueError, match=r"softmax_stats: plan must be one of \('auto', "
                                         r"'fused', 'aten'\), got 'rescore'"):
        knnfast.softmax_stats(torch.zeros(2, 5), 1, plan="rescore")
    with pytest.raises(ValueError, match=r"softmax_stats: plan must be one of 'auto', 'fused', "
                                         r"'aten' on CPU, got 'x'"):
        torch.ops.knnfast.softmax_stats(torch.zeros(2, 5), 1, True, "x")


# ---------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device,plan", DEVICE_PLANS)
def test_opcheck(device, plan):
    for x, top in [(_logits(4, 50, torch.float32, 0.2), 3), (_logits(2, 9, torch.float16, 0.0), 9),
                   (torch.full((2, 6), -INF), 2)]:
        for entropy in (True, False):
            torch.library.opcheck(torch.ops.knnfast.softmax_stats.default,
                                  (x.to(device), top, entropy, plan))


def test_compiles():
    fn = torch.compile(lambda x: knnfast.softmax_stats(x, 4), fullgraph=True, backend="eager")
    x = _logits(3, 100, torch.float32, 0.1)
    got, want = fn(x), knnfast.softmax_stats(x, 4)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_not_differentiable():
    """It reads logits.detach(): outputs carry no graph (the skip decision is not trained)."""
    x = torch.randn(2, 10, requires_grad=True)
    entropy, top = knnfast.softmax_stats(x, 2)
    assert not entropy.requires_grad and not top.requires_grad


@pytest.mark.skipif(knnfast.build_info()["simd"] != "avx512", reason="CPU has no AVX-512")
def test_portable_body_matches():
    """KNNFAST_SIMD=generic (scalar entropy and top values) returns what AVX-512 does."""
    script = (
        "import json, sys, torch, knnfast\n"
        "g = torch.Generator().manual_seed(5)\n"
        "x = torch.randn(7, 1001, generator=g) * 5\n"
        "x[torch.rand(7, 1001, generator=g) < 0.2] = -float('inf')\n"
        "e, t = knnfast.softmax_stats(x, 6)\n"
        "json.dump([knnfast.build_info()['simd'], e.tolist(), t.tolist()], sys.stdout)\n")
    # the two bodies' exp differ in the last bits, not the values picked
    for fast, portable in zip(*both_simd_levels(script)):
        torch.testing.assert_close(torch.tensor(fast), torch.tensor(portable), rtol=1e-5, atol=1e-5)
