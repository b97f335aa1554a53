"""label_counts: distinct valid tokens among the first j+1 neighbours."""
import pytest
import torch
from hypothesis import given, strategies as st

import knnfast
import knnfast.reference as ref
from conftest import DEVICES
from helpers import rand_tokens


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
    with pytest.raises(ValueError, match=match):
        knnfast.label_counts(bad(device))
