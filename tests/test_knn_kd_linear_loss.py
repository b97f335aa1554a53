"""knn_kd_linear_loss (the kNN-KD / cross-entropy loss fused with the output projection) and
its raw backward op: every test of the op.

Sections: the chunked reference twin (knnfast.reference.knn_kd_linear_loss) against the dense
float64 path ref.knn_kd_loss(F.linear(...)), gradcheck in double; the fused CPU op against the
dense float64 path (values and gradients of hidden, weight, bias over loss forms, label
smoothing, ignore_index, reductions, padded teacher slots, teacher scores / probs, dtypes),
the plain cross-entropy drop-in, chunk independence, gradcheck, opcheck, bad inputs, and that
no [T, V]-sized buffer is allocated; CUDA parity (skipped without a GPU).

Kernel / variant -> tests:

  CPU knn_kd_linear_loss / _backward         test_op_*, test_no_dense_buffer
  CUDA knn_kd_linear_loss{,_backward} kernels test_cuda_matches_cpu
"""
import pytest
import torch
import torch.nn.functional as F

import knnfast
import knnfast.reference as ref
from conftest import requires_cuda
from helpers import check_bad_input
from knnfast.ops import knn_kd_linear_rows as row_strategy
from knnfast.ops.knn_kd_linear_loss import pick_strategy

pytestmark = pytest.mark.usefixtures("single_threaded")

CHUNK = {"vocab": 64, "rows": 5}   # columns / rows per chunk in the tests of both strategies
HALF_RTOL = {torch.float32: 1e-4, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _data(T=11, D=6, V=37, k=5, seed=0, dtype=torch.float32, probs=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(T, D, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(V, D, generator=g)).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype)
    targets = torch.randint(0, V, (T,), generator=g)
    targets[2] = -100
    tokens = torch.randint(0, V, (T, k), generator=g)
    tokens[:, 1] = tokens[:, 0]                       # duplicate teacher tokens
    tokens[3, 2:] = -1                                # padded slots
    tokens[4] = -1                                    # no teacher at all
    scores = -torch.rand(T, k, generator=g) * 30
    scores[tokens < 0] = float("-inf")
    if probs:  # used as given: mass on padded slots, rows not normalised
        scores = torch.rand(T, k, generator=g) / 3
    teacher = dict(teacher_probs=scores) if probs else dict(teacher_scores=scores,
                                                            temperature=7.0)
    return hidden, weight, bias, targets, tokens, teacher


def _dense64(hidden, weight, bias, targets, tokens, teacher, **kw):
    """The float64 oracle: the dense reference on F.linear's logits."""
    logits = F.linear(hidden, weight, bias)
    if tokens is None:
        return ref.knn_kd_loss(logits, targets, torch.full((len(targets), 1), -1),
                               teacher_probs=torch.zeros(len(targets), 1), **kw)
    return ref.knn_kd_loss(logits, targets, tokens, **teacher, **kw)


def _grads(fn, tensors, upstream=None):
    xs = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*xs)
    (out * upstream if upstream is not None else out).sum().backward()
    return out.detach(), [x.grad for x in xs]


def _double(teacher):
    return {n: (v.double() if isinstance(v, torch.Tensor) else v) for n, v in teacher.items()}


# --------------------------------------------------------------------------- reference twin
@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_reference_equals_dense_float64(kd, probs, reduction):
    h, w, b, y, tokens, teacher = _data(seed=1, probs=probs)
    kw = dict(ce_weight=0.8, kd_weight=0.6, label_smoothing=0.1, kd=kd, reduction=reduction)
    up = torch.rand(len(y), dtype=torch.float64) if reduction == "none" else None
    t64 = _double(teacher)
    got, got_g = _grads(lambda h_, w_, b_: ref.knn_kd_linear_loss(
        h_, w_, y, tokens, bias=b_, chunk=8, **t64, **kw), (h.double(), w.double(), b.double()), up)
    want, want_g = _grads(lambda h_, w_, b_: _dense64(h_, w_, b_, y, tokens, t64, **kw),
                          (h.double(), w.double(), b.double()), up)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("kd", ["ce", "kl"])
def test_reference_gradcheck_double(kd):
    h, w, b, y, tokens, teacher = _data(T=5, D=3, V=9, k=3, seed=2)
    fn = lambda h_, w_, b_: ref.knn_kd_linear_loss(  # noqa: E731
        h_, w_, y, tokens, bias=b_, chunk=4, label_smoothing=0.1, kd=kd, ce_weight=0.7,
        kd_weight=0.3, **_double(teacher))
    xs = tuple(t.double().requires_grad_() for t in (h, w, b))
    assert torch.autograd.gradcheck(fn, xs)


# --------------------------------------------------------------------------- fused op (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
# the rows strategy needs a scalar loss: no reduction="none" (refused: test_strategy_bad_values)
@pytest.mark.parametrize("strategy,eps,reduction", [
    (strategy, eps, reduction) for strategy in ("vocab", "rows")
    for eps, reduction in ((0.0, "mean"), (0.1, "sum"), (0.1, "none"))
    if not (strategy == "rows" and reduction == "none")])
def test_op_matches_dense_float64(dtype, kd, probs, eps, reduction, with_bias, strategy):
    """Value (float32) to 1e-4 relative; gradients to 1e-4 relative for float32 inputs and
    to the rounding of the gradient's own dtype (it is returned in the input's dtype) for
    float16 / bfloat16 inputs: the kernels accumulate in float32 either way. chunk: 64
    vocabulary columns or 5 rows (several chunks either way)."""
    h, w, b, y, tokens, teacher = _data(T=23, D=16, V=301, k=7, seed=3, dtype=dtype,
                                        probs=probs)
    b = b if with_bias else None
    kw = dict(ce_weight=0.9, kd_weight=0.5, label_smoothing=eps, kd=kd, reduction=reduction)
    up = torch.rand(len(y), dtype=torch.float64) if reduction == "none" else None
    inputs = (h, w) + ((b,) if with_bias else ())
    op = lambda h_, w_, b_=None: knnfast.knn_kd_linear_loss(  # noqa: E731
        h_, w_, y, tokens, bias=b_, chunk=CHUNK[strategy], strategy=strategy, **teacher, **kw)
    got, got_g = _grads(op, inputs, None if up is None else up.float())
    want, want_g = _grads(lambda h_, w_, b_=None: _dense64(h_, w_, b_, y, tokens,
                                                           _double(teacher), **kw),
                          tuple(t.double() for t in inputs), up)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    for a, e in zip(got_g, want_g):
        assert a.dtype == dtype
        tol = HALF_RTOL[dtype]
        torch.testing.assert_close(a.double(), e, rtol=tol, atol=tol * e.abs().max().item())
    assert (got_g[0][2] == 0).all()                   # the ignored row gets no gradient


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("reduction,strategy", [("mean", "vocab"), ("sum", "vocab"),
                                                ("none", "vocab"), ("mean", "rows"),
                                                ("sum", "rows")])
def test_op_without_teacher_is_cross_entropy(eps, reduction, strategy):
    h, w, b, y, _, _ = _data(T=19, D=8, V=203, seed=4)
    up = torch.rand(len(y)) if reduction == "none" else None
    chunk = 50 if strategy == "vocab" else 4
    got, got_g = _grads(lambda h_, w_, b_: knnfast.knn_kd_linear_loss(
        h_, w_, y, bias=b_, label_smoothing=eps, reduction=reduction, chunk=chunk,
        strategy=strategy), (h, w, b), up)
    want, want_g = _grads(lambda h_, w_, b_: F.cross_entropy(
        F.linear(h_, w_, b_), y, label_smoothing=eps, reduction=reduction), (h, w, b), up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, e in zip(got_g, want_g):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_kd_weight_zero_is_plain_cross_entropy():
    h, w, b, y, tokens, teacher = _data(seed=5)
    a = knnfast.knn_kd_linear_loss(h, w, y, tokens, **teacher, bias=b, kd_weight=0.0)
    e = knnfast.knn_kd_linear_loss(h, w, y, bias=b)
    torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_op_equals_fused_knn_kd_loss_on_the_logits():
    h, w, b, y, tokens, teacher = _data(T=31, D=12, V=500, k=9, seed=6)
    kw = dict(label_smoothing=0.1, kd="kl", reduction="none", **teacher)
    got = knnfast.knn_kd_linear_loss(h, w, y, tokens, bias=b, **kw)
    want = knnfast.knn_kd_loss(F.linear(h, w, b), y, tokens, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_chunk_size_does_not_change_the_result():
    h, w, b, y, tokens, teacher = _data(T=9, D=5, V=53, k=6, seed=7)
    results = []
    for chunk in (0, 1, 7, 53, 1000):
        loss, grads = _grads(lambda h_, w_, b_: knnfast.knn_kd_linear_loss(
            h_, w_, y, tokens, bias=b_, chunk=chunk, kd="kl", label_smoothing=0.1,
            reduction="none", **teacher), (h, w, b))
        results.append((loss, grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-5)
        for a, e in zip(grads, results[0][1]):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_only_requested_gradients():
    h, w, b, y, tokens, teacher = _data(seed=8)
    w = w.requires_grad_()
    knnfast.knn_kd_linear_loss(h, w, y, tokens, bias=b, **teacher).backward()
    assert w.grad is not None and w.grad.shape == w.shape and not h.requires_grad


@pytest.mark.parametrize("strategy", ["vocab", "rows"])
def test_op_gradcheck(strategy):
    h, w, b, y, tokens, teacher = _data(T=5, D=3, V=7, k=3, seed=9)
    fn = lambda h_, w_, b_: knnfast.knn_kd_linear_loss(  # noqa: E731
        h_, w_, y, tokens, bias=b_, chunk=3 if strategy == "vocab" else 2,
        label_smoothing=0.1, kd="kl", strategy=strategy, **teacher)
    xs = tuple(t.double().requires_grad_() for t in (h, w, b))
    # the kernels compute in float32: a coarse step keeps rounding out of the differences
    assert torch.autograd.gradcheck(fn, xs, eps=1e-2, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("with_bias", [True, False])
def test_op_opcheck(with_bias):
    h, w, b, y, tokens, teacher = _data(T=5, D=4, V=13, k=3, seed=10)
    tau = torch.tensor([2.0])
    args = (h.requires_grad_(), w.requires_grad_(),
            b.requires_grad_() if with_bias else None, y, tokens,
            teacher["teacher_scores"], None, tau, 1.0, 0.5, 0.1, -100, True, 4)
    torch.library.opcheck(torch.ops.knnfast.knn_kd_linear_loss.default, args)


BAD = [
    (dict(weight=torch.randn(20, 5)), r"weight must have shape \[V, 4\]"),
    (dict(weight=torch.randn(20)), "weight must be 2-D"),
    (dict(weight=torch.randn(0, 4)), "with V > 0"),
    (dict(bias=torch.randn(19)), r"bias must have shape \[20\]"),
    (dict(bias=torch.randn(20, 1)), r"bias must have shape \[20\]"),
    (dict(hidden=torch.randn(0, 4), targets=torch.zeros(0, dtype=torch.long),
          teacher_tokens=torch.zeros(0, 2, dtype=torch.long), teacher_scores=torch.zeros(0, 2)),
     r"hidden must have at least one row \(T = 0\)"),
    (dict(teacher_tokens=torch.tensor([[0, 20], [1, 2], [3, 4]])),
     r"teacher_tokens must hold ids in \[-1, 20\)"),
    (dict(targets=torch.tensor([0, 20, 1])), r"targets must be in \[0, 20\)"),
    (dict(targets=torch.tensor([0, 1])), "targets must have shape"),
    (dict(teacher_scores=torch.zeros(3, 3)), "teacher_scores must have the shape"),
    (dict(teacher_probs=torch.zeros(3, 2)), "exactly one of teacher_scores or teacher_probs"),
    (dict(hidden=torch.full((3, 4), float("nan"))), "NaN"),
    (dict(temperature=0.0), "temperature"),
    (dict(label_smoothing=1.0), "label_smoothing"),
    (dict(reduction="avg"), "reduction"),
    (dict(kd="js"), "kd must be"),
    (dict(chunk=-1), "chunk must be an int"),
    (dict(hidden=torch.randint(0, 3, (3, 4))), "hidden must be a floating-point tensor"),
]


@pytest.mark.parametrize("fn", [knnfast.knn_kd_linear_loss, ref.knn_kd_linear_loss],
                         ids=["op", "reference"])
@pytest.mark.parametrize("change,match", BAD)
def test_bad_inputs(fn, change, match):
    kw = dict(hidden=torch.randn(3, 4), weight=torch.randn(20, 4), bias=torch.randn(20),
              targets=torch.tensor([0, 1, 2]), teacher_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]),
              teacher_scores=torch.zeros(3, 2), temperature=1.0)
    kw.update(change)
    check_bad_input(fn, match, **kw)


def test_direct_op_call_rejects_empty_rows():
    h, w = torch.randn(0, 4), torch.randn(20, 4)
    empty = torch.zeros(0, 0)
    check_bad_input(torch.ops.knnfast.knn_kd_linear_loss, r"T = 0", h, w, None,
                    torch.zeros(0, dtype=torch.long), empty.long(), None, empty,
                    torch.ones(1), 1.0, 1.0, 0.0, -100, False)


def _largest_allocation(fn) -> int:
    """Largest memory one op allocates itself (bytes) while fn() runs: the profiler's
    self_cpu_memory_usage (a leaf-only count would miss aten::addmm, which has children)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


def test_no_dense_buffer():
    """No allocation of T x V floats (forward or backward); the dense path makes several."""
    T, D, V = 64, 16, 4096            # auto chunk: the tile is [64, 4096] = T x V: force 256
    g = torch.Generator().manual_seed(11)
    h = torch.randn(T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (T,), generator=g)
    tokens = torch.randint(0, V, (T, 8), generator=g)
    scores = torch.randn(T, 8, generator=g)
    dense_bytes = T * V * 4

    def fused():
        knnfast.knn_kd_linear_loss(h, w, y, tokens, scores, chunk=256).backward()

    def dense():
        knnfast.knn_kd_loss(F.linear(h, w), y, tokens, scores).backward()

    assert _largest_allocation(dense) >= dense_bytes
    biggest = _largest_allocation(fused)
    assert biggest <= V * D * 4                       # grad_weight (an output) is the largest
    assert biggest < dense_bytes / 2


# --------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("probs,with_bias", [(False, True), (True, False)])
@pytest.mark.parametrize("chunk", [0, 1, 4, 100])
def test_strategies_agree(reduction, probs, with_bias, chunk):
    """rows (chunk: rows) and vocab (chunk 0 / 7 columns) give the same loss and gradients,
    also under a scaled loss (the rows strategy's backward scales its saved gradients)."""
    h, w, b, y, tokens, teacher = _data(T=13, D=6, V=53, k=5, seed=12, probs=probs)
    inputs = (h, w, b) if with_bias else (h, w)
    kw = dict(label_smoothing=0.1, kd="kl", reduction=reduction, ce_weight=0.7, **teacher)
    runs = {}
    for strategy, c in (("rows", chunk), ("vocab", 7), ("vocab", 0)):
        runs[strategy, c] = _grads(lambda h_, w_, b_=None: 2.5 * knnfast.knn_kd_linear_loss(
            h_, w_, y, tokens, bias=b_, chunk=c, strategy=strategy, **kw), inputs)
    want, want_g = runs["vocab", 0]
    for got, got_g in runs.values():
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        for a, e in zip(got_g, want_g):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_rows_strategy_only_requested_gradients_and_backward_twice():
    h, w, b, y, tokens, teacher = _data(seed=13)
    w.requires_grad_()
    loss = 3 * knnfast.knn_kd_linear_loss(h, w, y, tokens, bias=b, strategy="rows", **teacher)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()                                   # the saved gradients were not scaled
    torch.testing.assert_close(w.grad, 2 * first)
    assert h.grad is None and b.grad is None


def test_auto_strategy_choice():
    p = torch.zeros(2, requires_grad=True)
    assert pick_strategy("auto", "mean", 0, p) == "rows" and pick_strategy("auto", "sum", 0, None, p) == "rows"
    assert pick_strategy("auto", "none", 0, p) == "vocab"      # per-row losses: backward needs rows
    assert pick_strategy("auto", "mean", 64, p) == "vocab"     # an explicit vocabulary chunk
    assert pick_strategy("auto", "mean", 0, p.detach()) == "vocab"
    with torch.no_grad():
        assert pick_strategy("auto", "mean", 0, p) == "vocab"
    assert pick_strategy("vocab", "mean", 0, p) == "vocab" and pick_strategy("rows", "sum", 3, p) == "rows"


@pytest.mark.parametrize("change,match", [
    (dict(strategy="fast"), "strategy must be one of"),
    (dict(strategy="rows", reduction="none"), "strategy='rows' needs reduction"),
    (dict(strategy=None), "strategy must be one of"),
])
def test_strategy_bad_values(change, match):
    h, w, b, y, tokens, teacher = _data(seed=14)
    check_bad_input(knnfast.knn_kd_linear_loss, match, h.requires_grad_(), w, y, tokens,
                    bias=b, **teacher, **change)


@pytest.mark.parametrize("change,match", [c for c in BAD if "chunk" not in c[1]
                                          and "reduction" not in c[1]])
def test_bad_inputs_rows_strategy(change, match):
    """The row strategy (hidden needs a gradient) rejects what the op rejects: shapes before
    any GEMM, values in the row kernels (knn_kd_loss's messages)."""
    kw = dict(hidden=torch.randn(3, 4), weight=torch.randn(20, 4), bias=torch.randn(20),
              targets=torch.tensor([0, 1, 2]), teacher_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]),
              teacher_scores=torch.zeros(3, 2), temperature=1.0, strategy="rows")
    kw.update(change)
    if kw["hidden"].is_floating_point():
        kw["hidden"] = kw["hidden"].requires_grad_()
    check_bad_input(knnfast.knn_kd_linear_loss, match, **kw)


def test_row_chunk_bound():
    row_chunk = row_strategy.row_chunk
    budget = row_strategy.ROW_BUFFER_BYTES
    for T, V in [(1, 7), (5, 50257), (128, 50000), (4096, 42024), (8192, 50257), (10 ** 6, 3)]:
        rows = row_chunk(T, V)
        assert 1 <= rows <= T
        assert rows == 1 or (rows * V * 4 <= budget and rows * 4 <= T)
    assert row_chunk(4096, 42024) == budget // (4 * 42024)   # the byte budget binds
    assert row_chunk(100, 10) == 25                           # a quarter of T binds
    assert row_chunk(100, 10, chunk=7) == 7 and row_chunk(5, 10, chunk=7) == 5


def test_rows_strategy_largest_buffer_is_the_chunk():
    """The profiler's largest allocation is the bounded [rows, V] buffer (or a gradient),
    where the dense path allocates T x V: auto chunk with the byte budget binding."""
    T, D, V = 1024, 4, 40_000                         # dense: 156 MiB; chunk: 209 rows, 32 MiB
    g = torch.Generator().manual_seed(15)
    h = torch.randn(T, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (T,), generator=g)
    tokens = torch.randint(0, V, (T, 8), generator=g)
    scores = torch.randn(T, 8, generator=g)
    buffer = row_strategy.row_chunk(T, V) * V * 4
    biggest = _largest_allocation(
        lambda: knnfast.knn_kd_linear_loss(h, w, y, tokens, scores).backward())
    assert biggest == buffer <= 32 << 20                # the documented budget
    assert buffer < T * V * 4 / 4


# --------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kd", ["ce", "kl"])
@pytest.mark.parametrize("probs", [False, True])
@pytest.mark.parametrize("V", [37, 1000, 42024])
def test_cuda_matches_cpu(dtype, kd, probs, V):
    h, w, b, y, tokens, teacher = _data(T=70, D=64, V=V, k=16, seed=V, dtype=dtype, probs=probs)
    kw = dict(ce_weight=0.7, kd_weight=0.5, label_smoothing=0.1, kd=kd, reduction="none")
    outs, grads = [], []
    for dev in ("cpu", "cuda"):
        t = {n: (v.to(dev) if isinstance(v, torch.Tensor) else v) for n, v in teacher.items()}
        loss, g = _grads(lambda h_, w_, b_: knnfast.knn_kd_linear_loss(
            h_, w_, y.to(dev), tokens.to(dev), bias=b_, **t, **kw),
            (h.to(dev), w.to(dev), b.to(dev)), torch.linspace(0.5, 1.5, len(y), device=dev))
        outs.append(loss.cpu())
        grads.append([x.float().cpu() for x in g])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for a, e in zip(grads[1], grads[0]):
        tol = HALF_RTOL[dtype]
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * e.abs().max().item())


@requires_cuda
@pytest.mark.parametrize("change,match", [
    (dict(targets=torch.tensor([0, 99, 1])), "targets"),
    (dict(teacher_tokens=torch.tensor([[0, 50], [1, 2], [3, 4]])), "teacher_tokens"),
    (dict(hidden=torch.full((3, 4), float("nan"))), "NaN"),
])
def test_cuda_bad_values(change, match):
    kw = dict(hidden=torch.randn(3, 4), weight=torch.randn(20, 4),
              targets=torch.tensor([0, 1, 2]), teacher_tokens=torch.tensor([[0, 1], [1, 2], [3, 4]]),
              teacher_scores=torch.zeros(3, 2))
    kw.update(change)
    kw = {n: v.cuda() for n, v in kw.items()}
    check_bad_input(knnfast.knn_kd_linear_loss, match, **kw)
