"""ink_loss, reference twin (knnfast.reference): the oracle for the fused kernels of issue 6.
Checked against a per-row loop written from DESIGN §6, with gradcheck in double (hidden,
out_weight, neighbour keys), the detach option, padding, and bad inputs."""
import math

import pytest
import torch

import knnfast.reference as ref
from helpers import check_bad_input

pytestmark = pytest.mark.usefixtures("single_threaded")


def _data(B=7, V=13, D=6, k=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B,), generator=g)
    targets[1] = -100
    keys = hidden[:, None, :] + 0.5 * torch.randn(B, k, D, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (B, k), generator=g)
    tokens[:, 0] = targets.clamp(min=0)           # most rows have the gold among the neighbours
    tokens[:, 2] = tokens[:, 3]                    # duplicates
    tokens[3, 1:] = -1                             # padding
    tokens[4] = -1                                 # no neighbours at all
    tokens[5, 0] = (targets[5] + 1) % V            # gold token absent
    tokens[5] = torch.where(tokens[5] == targets[5], (targets[5] + 2) % V, tokens[5])
    return hidden, weight, targets, keys, tokens


def _oracle(hidden, weight, targets, keys, tokens, alpha, beta, variant, ref_k=8):
    rows = []
    for b in range(hidden.shape[0]):
        y = int(targets[b])
        if y == -100:
            rows.append(0.0)
            continue
        logp = torch.log_softmax(hidden[b] @ weight.T, 0)
        eps = 0.1 if variant == "reference" else 0.0
        la = -(1 - eps) * float(logp[y]) - eps * float(logp.mean())
        cos = [float(torch.nn.functional.cosine_similarity(hidden[b], keys[b, j], dim=0))
               for j in range(keys.shape[1])]
        slots = [j for j in range(keys.shape[1]) if int(tokens[b, j]) >= 0]
        kd_slots = slots if variant == "paper" else [j for j in slots if j < ref_k]
        li = 0.0
        if kd_slots:
            z = [cos[j] if variant == "paper" else math.exp(cos[j]) for j in kd_slots]
            m = max(z)
            e = [math.exp(v - m) for v in z]
            p = {}
            for j, ej in zip(kd_slots, e):
                p[int(tokens[b, j])] = p.get(int(tokens[b, j]), 0.0) + ej / sum(e)
            li = sum(pv * (math.log(pv) - float(logp[v])) for v, pv in p.items() if pv > 0)
        lr = 0.0
        num = sum(math.exp(cos[j]) for j in slots if int(tokens[b, j]) == y)
        if num > 0:
            lr = -math.log(num / sum(math.exp(cos[j]) for j in slots))
        rows.append(la + alpha * li + beta * lr)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("alpha,beta", [(0.1, 0.1), (0.2, 0.1), (0.0, 0.0), (1.0, 2.0)])
def test_matches_per_row_oracle(variant, alpha, beta):
    data = _data(k=10)
    got, parts = ref.ink_loss(*data, alpha=alpha, beta=beta, variant=variant, reduction="none")
    torch.testing.assert_close(got, _oracle(*data, alpha, beta, variant))
    torch.testing.assert_close(got, parts["align"] + alpha * parts["kd"] + beta * parts["refine"])
    assert parts["refine"][4] == 0 and parts["kd"][4] == 0     # no neighbours
    assert parts["refine"][5] == 0                             # gold absent
    assert got[1] == 0                                         # ignored row


def test_reductions():
    data = _data()
    rows, _ = ref.ink_loss(*data, reduction="none")
    total, _ = ref.ink_loss(*data, reduction="sum")
    mean, parts = ref.ink_loss(*data, reduction="mean")
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(mean, rows.sum() / 6)            # one of 7 rows ignored
    assert set(parts) == {"align", "kd", "refine"}


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_gradcheck_double(variant):
    hidden, weight, targets, keys, tokens = _data(B=6, V=7, D=4, k=4, seed=2)
    h, w, kk = (t.clone().requires_grad_() for t in (hidden, weight, keys))
    fn = lambda a, b, c: ref.ink_loss(a, b, targets, c, tokens, alpha=0.2, beta=0.3,  # noqa: E731
                                      variant=variant)[0]
    assert torch.autograd.gradcheck(fn, (h, w, kk))


def test_no_nan_gradient_from_empty_rows():
    hidden, weight, targets, keys, tokens = _data()
    h = hidden.clone().requires_grad_()
    ref.ink_loss(h, weight, targets, keys, tokens)[0].backward()
    assert torch.isfinite(h.grad).all()


def test_detach_knn_stops_the_gradient_through_p_knn():
    hidden, weight, targets, keys, tokens = _data(seed=4)
    grads = []
    for detach in (False, True):
        h = hidden.clone().requires_grad_()
        ref.ink_loss(h, weight, targets, keys, tokens, alpha=1.0, beta=0.0,
                     detach_knn=detach)[0].backward()
        grads.append(h.grad)
    assert not torch.allclose(grads[0], grads[1])
    # with p_kNN detached, L_i's gradient is that of a cross-entropy against a fixed target
    h = hidden.clone().requires_grad_()
    loss, parts = ref.ink_loss(h, weight, targets, keys, tokens, alpha=1.0, beta=0.0,
                               detach_knn=True)
    parts["kd"].backward()
    assert torch.isfinite(h.grad).all()


@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 99, 1])), "targets must be in"),
    (dict(nbr_tokens=torch.tensor([[0, 50], [1, 2], [3, 4]])), "nbr_tokens must hold ids in"),
    (dict(nbr_keys=torch.zeros(3, 2, 5)), "nbr_keys must have shape"),
    (dict(out_weight=torch.zeros(10, 5)), "out_weight must have shape"),
    (dict(variant="robust"), "variant"),
    (dict(alpha=-1.0), "alpha"),
])
def test_bad_inputs(change, match):
    kw = dict(hidden=torch.randn(3, 4), out_weight=torch.randn(10, 4),
              targets=torch.tensor([0, 1, 2]), nbr_keys=torch.randn(3, 2, 4),
              nbr_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]))
    kw.update(change)
    check_bad_input(ref.ink_loss, match, **kw)


# --------------------------------------------------------------------------- fused
from knnfast.methods import ink  # noqa: E402


@pytest.mark.parametrize("variant", ["paper", "reference"])
@pytest.mark.parametrize("detach", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_reference_value_and_gradients(variant, detach, bias):
    hidden, weight, targets, keys, tokens = _data(B=9, V=40, D=8, k=10, seed=5)
    b = torch.randn(40, dtype=torch.float64) if bias else None
    kw = dict(alpha=0.3, beta=0.2, variant=variant, detach_knn=detach)
    grads = []
    for impl, dt in ((ref.ink_loss, torch.float64), (ink.ink_loss, torch.float32)):
        h, w, kk = (t.to(dt).clone().requires_grad_() for t in (hidden, weight, keys))
        bb = None if b is None else b.to(dt).clone().requires_grad_()
        loss, parts = impl(h, w, targets, kk, tokens, out_bias=bb, **kw)
        loss.backward()
        grads.append([loss.detach().double(), h.grad.double(), w.grad.double(), kk.grad.double()]
                     + ([bb.grad.double()] if bb is not None else []))
        if impl is ref.ink_loss:
            want_parts = {n: float(v.detach()) for n, v in parts.items()}
        else:
            for n in ("align", "kd", "refine"):
                assert parts[n] == pytest.approx(want_parts[n], rel=1e-4, abs=1e-5), n
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_other_dtypes_take_the_reference_path():
    hidden, weight, targets, keys, tokens = _data()
    a, _ = ink.ink_loss(hidden, weight, targets, keys, tokens)
    b, _ = ref.ink_loss(hidden, weight, targets, keys, tokens)
    torch.testing.assert_close(a, b)


def test_fused_scales_by_the_upstream_gradient():
    hidden, weight, targets, keys, tokens = _data(B=6, V=20, D=8, k=4, seed=8)
    grads = []
    for scale in (1.0, 3.0):
        h = hidden.float().clone().requires_grad_()
        loss, _ = ink.ink_loss(h, weight.float(), targets, keys.float(), tokens)
        (scale * loss).backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[1], 3 * grads[0])
