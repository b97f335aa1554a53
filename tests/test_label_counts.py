"""label_counts (distinct valid tokens among the first j+1 neighbours): every test of the op.

Sections: parity with knnfast.reference and a Python loop; properties (hypothesis); bad
inputs (shared helper); opcheck; CUDA-only kernel tests; the CUDA value checks switched off
by an environment variable (one block at the end).

Kernel / variant -> tests:

  CPU kernel                         every [cpu] test
  CUDA label_counts_kernel           test_label_counts_agree, every [cuda] test
  CUDA status flags (tokens)         test_bad_values_raise, test_checks_off_never_crash
"""
import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES, requires_cuda
from helpers import bad_input_cases, check_bad_input, check_bad_input_cpu_and_cuda, rand_tokens, check_off_never_crashes


def _python_counts(tokens):
    out = []
    for row in tokens.tolist():
        seen, r = set(), []
        for x in row:
            if x != -1:
                seen.add(x)
            r.append(len(seen))
        out.append(r)
    return torch.tensor(out, dtype=torch.int64).view(tokens.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,k,V", [(1, 1, 1), (3, 4, 3), (17, 64, 10), (5, 1024, 700), (2, 2048, 5000)])
def test_parity(device, B, k, V):
    tok = rand_tokens(B, k, V, invalid_frac=0.2).to(device)
    got = knnfast.label_counts(tok)
    assert got.dtype == torch.int64 and got.shape == (B, k) and got.device == tok.device
    assert torch.equal(got, ref.label_counts(tok))
    assert torch.equal(got.cpu(), _python_counts(tok.cpu()))


@pytest.mark.parametrize("device", DEVICES)
def test_hand_computed_token_zero_counts(device):
    tok = torch.tensor([[0, 0, 5, -1, 0, 5, 7], [-1, -1, -1, -1, -1, -1, -1],
                        [0, 1, 2, 3, 4, 5, 6]], device=device)
    got = knnfast.label_counts(tok)
    assert got.cpu().tolist() == [[1, 1, 2, 2, 2, 2, 3], [0] * 7, [1, 2, 3, 4, 5, 6, 7]]


@pytest.mark.parametrize("device", DEVICES)
@given(
    B=st.integers(1, 6),
    k=st.integers(1, 70),
    V=st.integers(1, 40),
    invalid=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_python(device, B, k, V, invalid, seed):
    g = torch.Generator().manual_seed(seed)
    tok = rand_tokens(B, k, V, invalid_frac=invalid, generator=g).to(device)
    got = knnfast.label_counts(tok)
    exp = _python_counts(tok.cpu())
    assert torch.equal(got.cpu(), exp)
    assert torch.equal(ref.label_counts(tok).cpu(), exp)
    # monotone, increments of 0/1, bounded by the number of valid slots so far
    assert (got[:, 1:] - got[:, :-1] >= 0).all() and (got[:, 1:] - got[:, :-1] <= 1).all()
    assert (got <= torch.cumsum((tok >= 0).long(), 1)).all()
    assert torch.equal(got, knnfast.label_counts(tok))  # deterministic


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    tok = torch.randint(-1, 5, (9, 4), device=device).t()
    assert not tok.is_contiguous()
    assert torch.equal(knnfast.label_counts(tok), knnfast.label_counts(tok.contiguous()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad,match", [
    (lambda d: torch.zeros(4, dtype=torch.int64, device=d), "tokens"),
    (lambda d: torch.zeros(2, 3, 4, dtype=torch.int64, device=d), "tokens"),
    (lambda d: torch.tensor([[0, -2, 1]], device=d), "tokens"),
    (lambda d: torch.zeros(2, 3, device=d), "tokens"),
], ids=["1d", "3d", "below_minus_one", "float"])
def test_bad_inputs(device, bad, match):
    check_bad_input(lambda: knnfast.label_counts(bad(device)), match)


# --------------------------------------------------------------------------- opcheck
def _opcheck_samples(device):
    return [(torch.randint(-1, 5, (4, 9), device=device),),
            (torch.tensor([[0, 0, -1, 3]], device=device),)]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for args in _opcheck_samples(device):
        torch.library.opcheck(torch.ops.knnfast.label_counts.default, args)


# --------------------------------------------------------------------------- CUDA kernels
@requires_cuda
@pytest.mark.parametrize("k", [1, 5, 128, 300])
def test_label_counts_agree(k):
    tokens = torch.randint(-1, 6, (11, k))
    got = knnfast.label_counts(tokens.cuda())
    assert torch.equal(got.cpu(), knnfast.label_counts(tokens))


# value checks inside the kernel: call(device) must raise ValueError matching `match`
CUDA_BAD_VALUES = {
    "label": (lambda d: knnfast.label_counts(torch.tensor([[0, -2]]).to(d)), "tokens must hold ids"),
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
