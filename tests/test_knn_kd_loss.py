"""knn_kd_loss and its raw backward ops (knn_kd_loss_backward, knn_kd_loss_grad_): every
test of the op.

Sections: the reference twin (knnfast.reference.knn_kd_loss) against a per-row loop written
from the paper's formulas, with gradcheck in double, padding, duplicate teacher tokens and bad
inputs; the fused CPU op against the reference (values, gradients, gradcheck, opcheck, bad
inputs, the in-place gradient op); CUDA-only kernel tests. No kernel path of knn_kd_loss is
forced by an environment variable.

Kernel / variant -> tests:

  CPU knn_kd_loss / knn_kd_loss_backward     test_fused_*
  CPU knn_kd_loss_grad_ (in place)           test_in_place_gradient_equals_backward_op
  CUDA knn_kd_loss_kernel / _backward_kernel <T, VEC>   test_kd_loss_variants
  CUDA status flags                          test_kd_loss_bad_values
"""
import math

import pytest
import torch

import knnfast.reference as ref
from conftest import requires_cuda
from helpers import check_bad_input, neighbours_with_duplicates

pytestmark = pytest.mark.usefixtures("single_threaded")


def _per_row_loss(logits, targets, tokens, scores, tau, ce_w, kd_w, eps, ignore, kd):
    """Independent oracle: plain Python over rows, duplicates merged by hand."""
    out = []
    for b in range(logits.shape[0]):
        y = int(targets[b])
        if y == ignore:
            out.append(0.0)
            continue
        logp = torch.log_softmax(logits[b].double(), 0)
        ce = -(1 - eps) * float(logp[y]) - eps * float(logp.mean())
        valid = [(int(t), float(s)) for t, s in zip(tokens[b], scores[b]) if int(t) >= 0]
        kd_val = 0.0
        if valid:
            z = torch.tensor([s / tau for _, s in valid], dtype=torch.float64)
            p = torch.softmax(z, 0)
            merged = {}
            for (t, _), pj in zip(valid, p.tolist()):
                merged[t] = merged.get(t, 0.0) + pj
            kd_val = -sum(pt * float(logp[t]) for t, pt in merged.items())
            if kd == "kl":
                kd_val += sum(pt * math.log(pt) for pt in merged.values() if pt > 0)
        out.append(ce_w * ce + kd_w * kd_val)
    return torch.tensor(out, dtype=torch.float64)


def _data(B=9, V=23, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, V, generator=g) * 3
    targets = torch.randint(0, V, (B,), generator=g)
    targets[2] = -100
    tokens = torch.randint(0, V, (B, k), generator=g)
    tokens[:, 1] = tokens[:, 0]                 # duplicate neighbour tokens
    tokens[3, 2:] = -1                           # padding
    tokens[4] = -1                               # no teacher at all
    scores = -torch.rand(B, k, generator=g) * 40
    scores[tokens < 0] = float("-inf")
    return logits, targets, tokens, scores


@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 1.0), (1.0, 0.0)])
def test_matches_per_row_oracle(kd, eps, weights):
    logits, targets, tokens, scores = _data()
    ce_w, kd_w = weights
    got = ref.knn_kd_loss(logits, targets, tokens, scores, temperature=10.0, ce_weight=ce_w,
                          kd_weight=kd_w, label_smoothing=eps, reduction="none", kd=kd)
    want = _per_row_loss(logits, targets, tokens, scores, 10.0, ce_w, kd_w, eps, -100, kd)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_reductions_and_mean_over_counted_rows():
    logits, targets, tokens, scores = _data()
    rows = ref.knn_kd_loss(logits, targets, tokens, scores, reduction="none")
    total = ref.knn_kd_loss(logits, targets, tokens, scores, reduction="sum")
    mean = ref.knn_kd_loss(logits, targets, tokens, scores, reduction="mean")
    assert rows[2] == 0
    torch.testing.assert_close(total, rows.sum())
    torch.testing.assert_close(mean, rows.sum() / (targets != -100).sum())
    all_ignored = torch.full_like(targets, -100)
    assert ref.knn_kd_loss(logits, all_ignored, tokens, scores).item() == 0.0


def test_sparse_teacher_probs_equal_scores_path():
    logits, targets, tokens, scores = _data()
    w = torch.softmax((scores / 10.0).masked_fill(tokens < 0, float("-inf")), 1).nan_to_num(0.0)
    a = ref.knn_kd_loss(logits, targets, tokens, scores, temperature=10.0, reduction="none", kd="kl")
    b = ref.knn_kd_loss(logits, targets, tokens, teacher_probs=w, reduction="none", kd="kl")
    torch.testing.assert_close(a, b)


def test_kl_is_ce_minus_teacher_entropy_and_zero_at_the_teacher():
    V = 7
    tokens = torch.tensor([[1, 3, 3, -1]])
    probs = torch.tensor([[0.2, 0.3, 0.5, 0.0]])
    p = torch.zeros(1, V).scatter_add_(1, tokens.clamp(min=0), probs)
    logits = torch.where(p > 0, p.log(), torch.full_like(p, -30.0))
    t = torch.tensor([3])
    kl = ref.knn_kd_loss(logits, t, tokens, teacher_probs=probs, ce_weight=0.0, kd="kl")
    assert abs(kl.item()) < 1e-4      # the student equals the teacher
    ce = ref.knn_kd_loss(logits, t, tokens, teacher_probs=probs, ce_weight=0.0, kd="ce")
    entropy = -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))
    assert ce.item() == pytest.approx(entropy + kl.item(), abs=1e-4)


@pytest.mark.parametrize("kd", ["ce", "kl"])
def test_gradcheck_double(kd):
    logits, targets, tokens, scores = _data(B=5, V=8, k=4, seed=3)
    x = logits.double().requires_grad_()
    fn = lambda lg: ref.knn_kd_loss(lg, targets, tokens, scores, temperature=5.0,  # noqa: E731
                                    label_smoothing=0.1, kd=kd, ce_weight=0.7, kd_weight=0.3)
    assert torch.autograd.gradcheck(fn, (x,))


def test_gradient_is_softmax_minus_target_mix():
    """d loss / d logits = (ce_w + kd_w [teacher]) softmax - ce_w((1-eps) onehot + eps/V)
    - kd_w p_T: the sparse form the fused backward will write."""
    logits, targets, tokens, scores = _data(seed=5)
    targets[2] = 1                                   # every row counted
    x = logits.double().requires_grad_()
    ce_w, kd_w, eps = 0.6, 0.4, 0.1
    ref.knn_kd_loss(x, targets, tokens, scores, temperature=10.0, ce_weight=ce_w, kd_weight=kd_w,
                    label_smoothing=eps, reduction="sum").backward()
    B, V = logits.shape
    w = torch.softmax((scores / 10.0).masked_fill(tokens < 0, float("-inf")), 1).nan_to_num(0.0)
    p_t = torch.zeros(B, V, dtype=torch.float64).scatter_add_(1, tokens.clamp(min=0), w.double())
    has = (p_t.sum(1, keepdim=True) > 0).double()
    sm = torch.softmax(logits.double(), 1)
    onehot = torch.nn.functional.one_hot(targets, V).double()
    want = (ce_w + kd_w * has) * sm - ce_w * ((1 - eps) * onehot + eps / V) - kd_w * p_t
    torch.testing.assert_close(x.grad, want)


@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 99, 1])), "targets must be in"),
    (dict(teacher_tokens=torch.tensor([[0, 50], [1, 2], [3, 4]])), "teacher_tokens must hold ids in"),
    (dict(temperature=0.0), "temperature"),
    (dict(teacher_tokens=torch.tensor([[0, 1, 2], [1, 2, 3], [3, 4, 5]])), "teacher_scores must have the shape"),
    (dict(teacher_probs=torch.zeros(3, 2)), "exactly one of teacher_scores or teacher_probs"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(reduction="avg"), "reduction"),
    (dict(kd="js"), "kd must be"),
    (dict(kd_weight=-1.0), "kd_weight"),
    (dict(teacher_scores=torch.tensor([[0.0, float("nan")], [0.0, 0.0], [0.0, 0.0]])), "teacher_scores must be finite"),
])
def test_bad_inputs(change, match):
    kw = dict(logits=torch.randn(3, 10), targets=torch.tensor([0, 1, 2]),
              teacher_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]),
              teacher_scores=torch.zeros(3, 2), temperature=1.0)
    kw.update(change)
    check_bad_input(ref.knn_kd_loss, match, **kw)


# --------------------------------------------------------------------------- fused (CPU)
import knnfast  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_fused_matches_reference(dtype, kd, eps, reduction):
    logits, targets, tokens, scores = _data(B=17, V=301, k=9, seed=7)
    logits = logits.to(dtype)
    kw = dict(temperature=10.0, ce_weight=0.8, kd_weight=0.6, label_smoothing=eps, kd=kd,
              reduction=reduction)
    got = knnfast.knn_kd_loss(logits, targets, tokens, scores, **kw)
    want = ref.knn_kd_loss(logits.float(), targets, tokens, scores, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("probs", [False, True])
def test_fused_gradient_matches_reference(kd, probs):
    logits, targets, tokens, scores = _data(B=13, V=97, k=8, seed=9)
    w = torch.softmax((scores / 5.0).masked_fill(tokens < 0, float("-inf")), 1).nan_to_num(0.0)
    teacher = dict(teacher_probs=w) if probs else dict(teacher_scores=scores, temperature=5.0)
    kw = dict(ce_weight=0.9, kd_weight=0.4, label_smoothing=0.1, kd=kd, **teacher)
    x1 = logits.clone().requires_grad_()
    x2 = logits.double().requires_grad_()
    upstream = torch.rand(13, dtype=torch.float64)
    (knnfast.knn_kd_loss(x1, targets, tokens, reduction="none", **kw) * upstream.float()).sum().backward()
    (ref.knn_kd_loss(x2, targets, tokens, reduction="none", **kw) * upstream).sum().backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-4, atol=1e-6)
    assert (x1.grad[2] == 0).all()                       # ignored row


@pytest.mark.parametrize("kd", ["ce", "kl"])
def test_fused_gradient_with_teacher_mass_not_one(kd):
    """teacher_probs are used as given (API.md: "as given, >= 0"): mass on padded -1 slots
    does not count, so the valid mass M_r is below 1 (or above it) and the softmax term of
    the gradient is (ce_w + kd_w M_r) softmax, not (ce_w + kd_w) softmax."""
    logits, targets, tokens, _ = _data(B=13, V=97, k=8, seed=19)
    g = torch.Generator().manual_seed(19)
    probs = torch.rand(13, 8, generator=g) / 4          # row masses 0 .. 2, not normalised
    tokens[5, 3:] = -1                                  # mass on padded slots
    tokens[6, ::2] = -1
    kw = dict(teacher_probs=probs, ce_weight=0.9, kd_weight=0.7, label_smoothing=0.1, kd=kd)
    x1 = logits.clone().requires_grad_()
    x2 = logits.double().requires_grad_()
    upstream = torch.rand(13, dtype=torch.float64)
    (knnfast.knn_kd_loss(x1, targets, tokens, reduction="none", **kw) * upstream.float()).sum().backward()
    (ref.knn_kd_loss(x2, targets, tokens, reduction="none", **kw) * upstream).sum().backward()
    torch.testing.assert_close(x1.grad.double(), x2.grad, rtol=1e-4, atol=1e-6)


def test_fused_gradcheck():
    logits, targets, tokens, scores = _data(B=5, V=6, k=3, seed=11)
    x = logits.double().requires_grad_()
    fn = lambda lg: knnfast.knn_kd_loss(lg, targets, tokens, scores, temperature=5.0,  # noqa: E731
                                        label_smoothing=0.1, kd="kl", reduction="mean")
    # the kernels compute in float32: a coarse step keeps rounding out of the finite differences
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-2, atol=1e-3, rtol=1e-2)


def test_fused_opcheck():
    logits, targets, tokens, scores = _data(B=5, V=11, k=4, seed=13)
    tau = torch.tensor([2.0])
    args = (logits.requires_grad_(), targets, tokens, scores, None, tau, 1.0, 0.5, 0.1, -100, True)
    torch.library.opcheck(torch.ops.knnfast.knn_kd_loss.default, args)


def test_fused_large_vocab_rows_and_no_nan():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 42_024, generator=g) * 4
    targets = torch.randint(0, 42_024, (64,), generator=g)
    tokens = torch.randint(0, 42_024, (64, 64), generator=g)
    tokens[::5] = -1                                      # rows without a teacher
    scores = -torch.rand(64, 64, generator=g) * 200
    got = knnfast.knn_kd_loss(logits, targets, tokens, scores, temperature=100.0, kd="kl",
                              label_smoothing=0.1, reduction="none")
    want = ref.knn_kd_loss(logits, targets, tokens, scores, temperature=100.0, kd="kl",
                           label_smoothing=0.1, reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 99, 1])), "targets must be in"),
    (dict(teacher_tokens=torch.tensor([[0, 50], [1, 2], [3, 4]])), "teacher_tokens must hold ids"),
    (dict(temperature=0.0), "temperature"),
    (dict(teacher_tokens=torch.tensor([[0, 1, 2], [1, 2, 3], [3, 4, 5]])), "teacher_scores must have the shape"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(reduction="avg"), "reduction"),
    (dict(kd="js"), "kd must be"),
    (dict(kd_weight=-1.0), "kd_weight"),
    (dict(teacher_scores=torch.tensor([[0.0, float("nan")], [0.0, 0.0], [0.0, 0.0]])), "teacher_scores must be finite"),
    (dict(logits=torch.full((3, 10), float("nan"))), "NaN"),
    (dict(teacher_probs=torch.zeros(3, 2)), "exactly one of teacher_scores or teacher_probs"),
])
def test_fused_bad_inputs(change, match):
    kw = dict(logits=torch.randn(3, 10), targets=torch.tensor([0, 1, 2]),
              teacher_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]),
              teacher_scores=torch.zeros(3, 2), temperature=1.0)
    kw.update(change)
    check_bad_input(knnfast.knn_kd_loss, match, **kw)


def test_in_place_gradient_equals_backward_op():
    logits, targets, tokens, scores = _data(B=11, V=203, k=7, seed=17)
    tau = torch.tensor([10.0])
    g = torch.rand(11)
    args = (targets, tokens, scores, None, tau, 0.7, 0.4, 0.1, -100)
    want = torch.ops.knnfast.knn_kd_loss_backward(g, logits, *args)
    buf = logits.clone()
    torch.ops.knnfast.knn_kd_loss_grad_(buf, g, *args)
    torch.testing.assert_close(buf, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="float32 logits"):
        torch.ops.knnfast.knn_kd_loss_grad_(logits.double(), g, *args)


# --------------------------------------------------------------------------- CUDA kernels
@requires_cuda
@pytest.mark.parametrize("V", [7, 1000, 42024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("probs", [False, True])
def test_kd_loss_variants(V, dtype, kd, probs):
    B, k = 37, 24
    g = torch.Generator().manual_seed(V)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, V, (B,), generator=g)
    targets[::7] = -100
    tokens, scores = neighbours_with_duplicates(B, k, V, seed=V)
    tokens[3] = -1
    teacher = dict(teacher_scores=scores, temperature=10.0)
    if probs:
        w = torch.softmax((scores / 10.0).masked_fill(tokens < 0, float("-inf")), 1).nan_to_num(0.0)
        teacher = dict(teacher_probs=w)
    kw = dict(ce_weight=0.7, kd_weight=0.5, label_smoothing=0.1, kd=kd, reduction="none")
    outs, grads = [], []
    for dev in ("cpu", "cuda"):
        x = logits.to(dev).requires_grad_()
        t = {n: (v.to(dev) if isinstance(v, torch.Tensor) else v) for n, v in teacher.items()}
        loss = knnfast.knn_kd_loss(x, targets.to(dev), tokens.to(dev), **t, **kw)
        (loss * torch.linspace(0.5, 1.5, B, device=dev)).sum().backward()
        outs.append(loss.cpu())
        grads.append(x.grad.float().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    again = knnfast.knn_kd_loss(logits.cuda(), targets.cuda(), tokens.cuda(),
                                **{n: (v.cuda() if isinstance(v, torch.Tensor) else v)
                                   for n, v in teacher.items()}, **kw)
    assert torch.equal(again.cpu(), outs[1])          # deterministic


@requires_cuda
@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 99, 1])), "targets"),
    (dict(teacher_tokens=torch.tensor([[0, 50], [1, 2], [3, 4]])), "tokens"),
    (dict(teacher_scores=torch.tensor([[0.0, float("nan")], [0.0, 0.0], [0.0, 0.0]])), "scores"),
    (dict(logits=torch.full((3, 10), float("nan"))), "NaN"),
])
def test_kd_loss_bad_values(change, match):
    kw = dict(logits=torch.randn(3, 10), targets=torch.tensor([0, 1, 2]),
              teacher_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]),
              teacher_scores=torch.zeros(3, 2))
    kw.update(change)
    kw = {n: v.cuda() for n, v in kw.items()}
    check_bad_input(knnfast.knn_kd_loss, match, **kw, temperature=1.0)
