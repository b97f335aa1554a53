"""knn_probs (dense) and knn_probs_sparse: every test of the two ops.

Sections: parity with knnfast.reference and hand-computed values; properties (hypothesis);
bad inputs (shared helper, device mismatch); opcheck; CUDA-only kernel tests. No kernel path
of these ops is forced by an environment variable except the CUDA value checks (one block at
the end).

Kernel / variant -> tests:

  CPU kernels                                 every [cpu] test
  CUDA knn_probs_kernel / knn_probs_sparse_kernel   test_probs_agree, every [cuda] test
  CUDA status flags (scores, temperature)     test_bad_values_raise, test_checks_off_never_crash
"""
import math

import pytest
import torch
from hypothesis import example, given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import (
    NEG_INF,
    bad_input_cases,
    check_bad_input,
    check_bad_input_cpu_and_cuda,
    f32_tensor,
    neighbours_with_duplicates,
    on_meta,
    opcheck_neighbours,
    rand_scores,
    rand_tokens, check_off_never_crashes)

SHAPES = [(1, 1, 1), (3, 4, 10), (17, 64, 300), (5, 64, 7), (4, 1024, 5000), (2, 2048, 50)]


def _inputs(B, k, V, device, invalid_frac=0.2, empty_row=True):
    tok = rand_tokens(B, k, V, invalid_frac=invalid_frac)
    sc = rand_scores(B, k, tok)
    if empty_row and B > 2:
        tok[1] = -1
        sc[1] = NEG_INF
    return sc.to(device), tok.to(device)


def _taus(B, device):
    return [1.0, 0.05, 10.0, (torch.rand(B) * 5 + 0.01).to(device)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,k,V", SHAPES)
@pytest.mark.parametrize("tau_i", range(4))
def test_dense_parity(device, B, k, V, tau_i):
    sc, tok = _inputs(B, k, V, device)
    tau = _taus(B, device)[tau_i]
    got = knnfast.knn_probs(sc, tok, V, tau)
    exp = ref.knn_probs(sc, tok, V, tau)
    assert got.dtype == torch.float32 and got.shape == (B, V) and got.device == sc.device
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,k,V", SHAPES)
@pytest.mark.parametrize("tau_i", range(4))
def test_sparse_parity(device, B, k, V, tau_i):
    sc, tok = _inputs(B, k, V, device)
    tau = _taus(B, device)[tau_i]
    tu, pu = knnfast.knn_probs_sparse(sc, tok, tau)
    etu, epu = ref.knn_probs_sparse(sc, tok, tau)
    assert tu.dtype == torch.int64 and pu.dtype == torch.float32
    assert tu.shape == (B, k) and pu.shape == (B, k)
    assert torch.equal(tu, etu)
    torch.testing.assert_close(pu, epu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed(device):
    sc = torch.tensor([[0.0, math.log(3.0), NEG_INF, 0.0]], device=device)
    tok = torch.tensor([[2, 0, -1, 2]], device=device)
    p = knnfast.knn_probs(sc, tok, 4, 1.0)
    torch.testing.assert_close(p.cpu(), torch.tensor([[0.6, 0.0, 0.4, 0.0]]))
    tu, pu = knnfast.knn_probs_sparse(sc, tok, 1.0)
    assert tu.cpu().tolist() == [[2, 0, -1, -1]]
    torch.testing.assert_close(pu.cpu(), torch.tensor([[0.4, 0.6, 0.0, 0.0]]))
    # temperature 2 halves the scores: weights 1, sqrt(3), 1
    p = knnfast.knn_probs(sc, tok, 4, 2.0)
    z = 2.0 + math.sqrt(3.0)
    torch.testing.assert_close(p.cpu(), torch.tensor([[math.sqrt(3.0) / z, 0.0, 2.0 / z, 0.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_minus_inf_slot_with_a_token_is_invalid(device):
    """A slot scored -inf is invalid even when it carries a token (a pruned or masked
    neighbour): the token's first valid occurrence keeps the slot, and a row of only such
    slots comes out all (-1, 0), as FAISS padding does. Op and reference alike."""
    sc = torch.tensor([[NEG_INF, 1.0, 0.0], [1.0, NEG_INF, NEG_INF], [NEG_INF] * 3],
                      device=device)
    tok = torch.tensor([[5, 5, 7], [6, 6, 2], [1, 2, 3]], device=device)
    for tu, pu in (knnfast.knn_probs_sparse(sc, tok, 1.0), ref.knn_probs_sparse(sc, tok, 1.0)):
        assert tu.cpu().tolist() == [[-1, 5, 7], [6, -1, -1], [-1, -1, -1]]
        e = 1.0 / (1.0 + math.exp(-1.0))
        torch.testing.assert_close(pu.cpu(), torch.tensor([[0.0, e, 1 - e], [1.0, 0.0, 0.0],
                                                           [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("device", DEVICES)
def test_token_zero_and_extremes(device):
    """Token id 0 is a normal token; very large / very negative scores are stable."""
    sc = torch.tensor([[1e4, 1e4 - 1.0, -1e30], [-1e4, -1e4, -1e4]], device=device)
    tok = torch.tensor([[0, 0, 1], [0, 1, 2]], device=device)
    p = knnfast.knn_probs(sc, tok, 3, 1.0)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.cpu(), torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0.0, 100.0, 2000.0])
def test_large_score_offset(device, offset):
    """kNN-LM style: raw negative squared L2 distances (hundreds to thousands) with
    temperature 1. softmax is shift invariant, so the result must not lose precision
    with the offset (torch.softmax does not)."""
    sc = -offset + torch.randn(16, 64) * 5
    tok = torch.randint(0, 100, (16, 64))
    exp = ref.knn_probs(sc - sc.amax(1, keepdim=True), tok, 100, 1.0)  # the shifted problem
    got = knnfast.knn_probs(sc.to(device), tok.to(device), 100, 1.0)
    torch.testing.assert_close(got.cpu(), exp, rtol=1e-5, atol=1e-6)
    tu, pu = knnfast.knn_probs_sparse(sc.to(device), tok.to(device), 1.0)
    etu, epu = ref.knn_probs_sparse(sc - sc.amax(1, keepdim=True), tok, 1.0)
    assert torch.equal(tu.cpu(), etu)
    torch.testing.assert_close(pu.cpu(), epu, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_rows_are_zero(device):
    sc = torch.tensor([[NEG_INF, NEG_INF], [1.0, 2.0], [0.5, NEG_INF]], device=device)
    tok = torch.tensor([[-1, -1], [-1, -1], [3, -1]], device=device)
    p = knnfast.knn_probs(sc, tok, 4, 1.0)
    assert torch.equal(p[0], torch.zeros(4, device=device))
    assert torch.equal(p[1], torch.zeros(4, device=device)), "token -1 slot must get weight 0"
    torch.testing.assert_close(p[2].cpu(), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    tu, pu = knnfast.knn_probs_sparse(sc, tok, 1.0)
    assert tu.cpu().tolist() == [[-1, -1], [-1, -1], [3, -1]]
    assert pu.cpu().tolist() == [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]


# --------------------------------------------------------------------------- #
# properties                                                                  #
# --------------------------------------------------------------------------- #
_props = dict(
    B=st.integers(1, 6),
    k=st.integers(1, 40),
    V=st.integers(1, 30),
    invalid=st.floats(0.0, 1.0),
    per_row_tau=st.booleans(),
    tau=st.floats(0.01, 100.0),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)


def _prop_inputs(B, k, V, invalid, per_row_tau, tau, ties, seed, device):
    g = torch.Generator().manual_seed(seed)
    tok = rand_tokens(B, k, V, invalid_frac=invalid, generator=g)
    if ties:
        sc = torch.randint(-3, 1, (B, k), generator=g).float()
    else:
        sc = torch.randn(B, k, generator=g) * 5
    sc = sc.masked_fill(tok < 0, NEG_INF)
    t = (torch.rand(B, generator=g) * tau + 0.01).to(device) if per_row_tau else tau
    return sc.to(device), tok.to(device), t


@pytest.mark.parametrize("device", DEVICES)
@given(**_props)
@example(B=5, k=27, V=1, invalid=0.0, per_row_tau=False, tau=0.03125, ties=False, seed=0)
def test_property_rows_sum_to_one(device, B, k, V, invalid, per_row_tau, tau, ties, seed):
    sc, tok, t = _prop_inputs(B, k, V, invalid, per_row_tau, tau, ties, seed, device)
    p = knnfast.knn_probs(sc, tok, V, t)
    assert (p >= 0).all() and not torch.isnan(p).any()
    has = (tok >= 0).any(1)
    sums = p.sum(1)
    torch.testing.assert_close(sums[has].cpu(), torch.ones(int(has.sum())), atol=1e-5, rtol=0)
    assert (sums[~has] == 0).all()
    # mass only on neighbour tokens
    on = torch.zeros(B, V, device=device).scatter_add_(1, tok.clamp(min=0), (tok >= 0).float()) > 0
    assert (p[~on] == 0).all()
    torch.testing.assert_close(p, ref.knn_probs(sc, tok, V, t), rtol=1e-5, atol=1e-6)
    assert torch.equal(p, knnfast.knn_probs(sc, tok, V, t))  # deterministic


@pytest.mark.parametrize("device", DEVICES)
@given(**_props)
@example(B=3, k=28, V=1, invalid=0.25, per_row_tau=False, tau=0.01171875, ties=False, seed=148)
def test_property_sparse_matches_dense(device, B, k, V, invalid, per_row_tau, tau, ties, seed):
    sc, tok, t = _prop_inputs(B, k, V, invalid, per_row_tau, tau, ties, seed, device)
    dense = knnfast.knn_probs(sc, tok, V, t)
    tu, pu = knnfast.knn_probs_sparse(sc, tok, t)
    tuc, puc, tokc = tu.cpu(), pu.cpu(), tok.cpu()
    # each valid token appears exactly once, at its first occurrence
    for b in range(B):
        seen = {}
        for j in range(k):
            x = int(tokc[b, j])
            if x >= 0 and x not in seen:
                seen[x] = j
        kept = {int(tuc[b, j]): j for j in range(k) if tuc[b, j] >= 0}
        assert kept == seen, (tokc[b], tuc[b])
        assert ((tuc[b] == -1) <= (puc[b] == 0)).all()
    # mass equals the dense probs gathered at the kept tokens; merging preserves mass
    gathered = dense.gather(1, tu.clamp(min=0)).masked_fill(tu < 0, 0)
    torch.testing.assert_close(pu, gathered, rtol=1e-5, atol=1e-6)
    has = (tok >= 0).any(1)
    torch.testing.assert_close(pu.sum(1)[has].cpu(), torch.ones(int(has.sum())), atol=1e-5, rtol=0)
    a = knnfast.knn_probs_sparse(sc, tok, t)
    assert torch.equal(a[0], tu) and torch.equal(a[1], pu)  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    sc = torch.randn(12, 5, device=device).t()
    tok = torch.randint(-1, 9, (12, 5), device=device).t()
    assert not sc.is_contiguous() and not tok.is_contiguous()
    torch.testing.assert_close(knnfast.knn_probs(sc, tok, 9, 0.7),
                               knnfast.knn_probs(sc.contiguous(), tok.contiguous(), 9, 0.7))
    a = knnfast.knn_probs_sparse(sc, tok, 0.7)
    b = knnfast.knn_probs_sparse(sc.contiguous(), tok.contiguous(), 0.7)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    tau = torch.rand(10, device=device)[::2] + 0.5  # strided per-row tau
    torch.testing.assert_close(knnfast.knn_probs(sc, tok, 9, tau),
                               knnfast.knn_probs(sc.contiguous(), tok.contiguous(), 9, tau.contiguous()))


# --------------------------------------------------------------------------- #
# bad inputs                                                                  #
# --------------------------------------------------------------------------- #
def _ok(device="cpu"):
    return torch.randn(3, 4, device=device), torch.randint(0, 6, (3, 4), device=device)


def _set(t, val):
    t = t.clone()
    t[1, 2] = val
    return t


DENSE_BAD = {
    "scores_1d": (lambda s, t: knnfast.knn_probs(s[0], t, 6), "scores"),
    "tokens_3d": (lambda s, t: knnfast.knn_probs(s, t[None], 6), "tokens"),
    "shape_mismatch": (lambda s, t: knnfast.knn_probs(s, t[:, :3], 6), "tokens|scores"),
    "token_ge_v": (lambda s, t: knnfast.knn_probs(s, _set(t, 6), 6), "tokens"),
    "token_lt_m1": (lambda s, t: knnfast.knn_probs(s, _set(t, -2), 6), "tokens"),
    "tokens_float": (lambda s, t: knnfast.knn_probs(s, t.float(), 6), "tokens"),
    "vocab_zero": (lambda s, t: knnfast.knn_probs(s, t.clamp(max=-1), 0), "vocab_size"),
    "tau_zero": (lambda s, t: knnfast.knn_probs(s, t, 6, 0.0), "temperature"),
    "tau_negative": (lambda s, t: knnfast.knn_probs(s, t, 6, -1.0), "temperature"),
    "tau_nan": (lambda s, t: knnfast.knn_probs(s, t, 6, float("nan")), "temperature"),
    "tau_tensor_zero": (lambda s, t: knnfast.knn_probs(s, t, 6, torch.tensor([1.0, 0.0, 1.0], device=s.device)), "temperature"),
    "tau_tensor_neg": (lambda s, t: knnfast.knn_probs(s, t, 6, torch.tensor([1.0, 1.0, -2.0], device=s.device)), "temperature"),
    "tau_tensor_shape": (lambda s, t: knnfast.knn_probs(s, t, 6, torch.ones(4, device=s.device)), "temperature"),
    "tau_tensor_2d": (lambda s, t: knnfast.knn_probs(s, t, 6, torch.ones(3, 1, device=s.device)), "temperature"),
}

SPARSE_BAD = {
    "scores_1d": (lambda s, t: knnfast.knn_probs_sparse(s[0], t), "scores"),
    "tokens_1d": (lambda s, t: knnfast.knn_probs_sparse(s, t[0]), "tokens"),
    "shape_mismatch": (lambda s, t: knnfast.knn_probs_sparse(s, t[:2]), "tokens|scores"),
    "token_lt_m1": (lambda s, t: knnfast.knn_probs_sparse(s, _set(t, -5)), "tokens"),
    "tau_zero": (lambda s, t: knnfast.knn_probs_sparse(s, t, 0.0), "temperature"),
    "tau_tensor_zero": (lambda s, t: knnfast.knn_probs_sparse(s, t, torch.tensor([1.0, 0.0, 1.0], device=s.device)), "temperature"),
    "tau_tensor_shape": (lambda s, t: knnfast.knn_probs_sparse(s, t, torch.ones(2, device=s.device)), "temperature"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call,match", bad_input_cases(DENSE_BAD))
def test_dense_bad_inputs(device, call, match):
    check_bad_input(call, match, *_ok(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("call,match", bad_input_cases(SPARSE_BAD))
def test_sparse_bad_inputs(device, call, match):
    check_bad_input(call, match, *_ok(device))


@requires_cuda
def test_device_mismatch():
    s, t = _ok("cpu")
    with pytest.raises(ValueError, match="tokens|scores"):
        knnfast.knn_probs(s.cuda(), t, 6)
    with pytest.raises(ValueError, match="temperature"):
        knnfast.knn_probs(s.cuda(), t.cuda(), 6, torch.ones(3))
    with pytest.raises(ValueError, match="tokens|scores"):
        knnfast.knn_probs_sparse(s, t.cuda())


def test_temperature_on_other_device():
    """A tensor on the `meta` device stands in for "another device" (no GPU needed)."""
    scores = torch.randn(2, 3)
    tokens = torch.randint(0, 7, (2, 3))
    with pytest.raises(ValueError, match="temperature is on meta"):
        knnfast.knn_probs(scores, tokens, 7, temperature=on_meta(torch.rand(2)))


# --------------------------------------------------------------------------- #
# opcheck (the raw ops; temperature is a float32 tensor of 1 or B elements)   #
# --------------------------------------------------------------------------- #
def _opcheck_samples_dense(device):
    tok, sc = opcheck_neighbours(4, 6, 11, device)
    return [(sc, tok, 11, f32_tensor([1.0], device)),
            (sc, tok, 11, torch.rand(4, device=device) + 0.1)]


def _opcheck_samples_sparse(device):
    tok, sc = opcheck_neighbours(4, 6, 5, device)
    return [(sc, tok, f32_tensor([0.5], device)), (sc, tok, torch.rand(4, device=device) + 0.1)]


OPCHECK_SAMPLES = {"knn_probs": _opcheck_samples_dense, "knn_probs_sparse": _opcheck_samples_sparse}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPCHECK_SAMPLES))
def test_opcheck(device, name):
    op = getattr(torch.ops.knnfast, name).default
    for args in OPCHECK_SAMPLES[name](device):
        torch.library.opcheck(op, args)


# --------------------------------------------------------------------------- #
# CUDA kernels                                                                #
# --------------------------------------------------------------------------- #
@requires_cuda
@pytest.mark.parametrize("k", [1, 8, 300])
def test_probs_agree(k):
    tokens, scores = neighbours_with_duplicates(7, k, 50)
    tau = torch.rand(7) + 0.1
    dense = knnfast.knn_probs(scores.cuda(), tokens.cuda(), 50, tau.cuda())
    torch.testing.assert_close(dense.cpu(), knnfast.knn_probs(scores, tokens, 50, tau))
    tu, pu = knnfast.knn_probs_sparse(scores.cuda(), tokens.cuda(), tau.cuda())
    etu, epu = knnfast.knn_probs_sparse(scores, tokens, tau)
    assert torch.equal(tu.cpu(), etu)
    torch.testing.assert_close(pu.cpu(), epu)
    again = knnfast.knn_probs(scores.cuda(), tokens.cuda(), 50, tau.cuda())
    assert torch.equal(dense, again)


# value checks inside the kernels: call(device) must raise ValueError matching `match`
CUDA_BAD_VALUES = {
    "score": (lambda d: knnfast.knn_probs(torch.tensor([[0.0, float("nan")], [0, 0]]).to(d),
                                          torch.tensor([[1, 2], [3, -1]]).to(d), 6),
              "scores must be finite"),
    "temperature": (lambda d: knnfast.knn_probs(torch.tensor([[0.0, -1.0], [2.0, NEG_INF]]).to(d),
                                                torch.tensor([[1, 2], [3, -1]]).to(d), 6,
                                                torch.tensor([1.0, 0.0]).to(d)),
                    "temperature must be > 0"),
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
