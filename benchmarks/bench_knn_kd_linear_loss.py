"""knn_kd_linear_loss forward + backward (output projection fused with the kNN-KD loss) against
F.linear + the fused knn_kd_loss (today's path: [T, V] logits and their gradient), by both
of the op's strategies (default "auto" = row chunks here; "vocab" = vocabulary chunks), against
the pure-PyTorch chunked reference (knnfast.reference.knn_kd_linear_loss) and against the dense
pure-PyTorch path (F.linear + knnfast.reference.knn_kd_loss), with the peak extra resident
memory of each call.

Issue #18 targets (D = 512, float32): peak extra memory at T = 8,192, V = 42,024, k = 64 at
most 5% of one fp32 [T, V] tensor (66 MiB) besides the parameter gradients; fwd + bwd time
<= 1.25x F.linear + knn_kd_loss and >= 1.3x faster than the dense reference. Inputs: hidden ~
N(0, 1), weight ~ N(0, 1) / sqrt(D), bias, teacher scores in [-100, 0], tau = 100, label
smoothing 0.1, KL form, every 50th target = ignore_index. "grad_mib" in extra_info is the
size of the gradients every path must return (grad_hidden + grad_weight + grad_bias):
subtract it from peak_extra_mib for the loss's own working memory.

Peak memory is measured in a fresh process per cell and path (``python
bench_knn_kd_linear_loss.py --memory IMPL T V K``, run by each test): the growth of the peak
resident set (VmHWM) over one forward + backward. In the pytest process it would mean little:
memory freed by an earlier cell stays in glibc's heap and is reused without growing the
resident set (a whole run on an AMD EPYC read 0 MiB for most cells). The probe fixes glibc's
mmap threshold at 64 KiB (MALLOC_MMAP_THRESHOLD_), so every large buffer is mapped when
allocated and unmapped when freed, and first runs its path once on a small shape (T = 256,
V = 4,096): a process's first call also grows by ~40 MiB of one-time library state (OpenMP
threads, GEMM buffers; 45 MiB beyond the gradients for a cold call at that small shape on the
EPYC), which is not the loss's working memory.

Cells: T in {4096, 8192} x V in {42024, 50257} x k in {16, 64}. On a busy or small machine
select one with -k, e.g. -k "4096-42024-64".
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")
D = 64 if QUICK else 512
CELLS = [(64, 5000, 16)] if QUICK else [
    (T, V, k) for T in (4096, 8192) for V in (42024, 50257) for k in (16, 64)]
SEED = 23
# fused: the op as called by default (strategy "auto": the row strategy here, a gradient of a
# mean); fused_vocab: strategy="vocab" (vocabulary chunks, backward recomputes the logits)
IMPLS = ["fused", "fused_vocab", "linear+knn_kd_loss", "reference", "dense_reference"]


def _data(T, V, k):
    g = torch.Generator().manual_seed(SEED)
    hidden = torch.randn(T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5
    bias = torch.randn(V, generator=g) * 0.1
    targets = torch.randint(0, V, (T,), generator=g)
    targets[::50] = -100
    tokens = torch.randint(0, V, (T, k), generator=g)
    scores = -torch.rand(T, k, generator=g) * 100
    return hidden, weight, bias, targets, tokens, scores


def _loss_fn(kb, impl):
    if impl in ("linear+knn_kd_loss", "dense_reference"):
        kd = kb.op("knn_kd_loss", "fused" if impl == "linear+knn_kd_loss" else "reference")
        return lambda h, w, y, t, s, **kw: kd(F.linear(h, w, kw.pop("bias")), y, t, s, **kw)
    if impl == "fused_vocab":
        return functools.partial(kb.op("knn_kd_linear_loss", "fused"), strategy="vocab")
    return kb.op("knn_kd_linear_loss", "fused" if impl == "fused" else "reference")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T,V,k", CELLS, ids=lambda v: str(v))
def test_knn_kd_linear_loss(kb, T, V, k, impl):
    peak = _peak_extra_mib(impl, T, V, k)   # first: a fresh process, nothing else running
    hidden, weight, bias, targets, tokens, scores = _data(T, V, k)
    step = _step(_loss_fn(kb, impl), hidden, weight, bias, targets, tokens, scores)
    grad_mib = (hidden.numel() + weight.numel() + bias.numel()) * 4 / 2 ** 20
    out = kb.run(step, op="knn_kd_linear_loss", impl=impl, dtype="float32",
                 shape={"T": T, "V": V, "D": D, "k": k}, peak_extra_mib=peak,
                 memory_method="fresh process, warmed up, mmap threshold 64 KiB",
                 grad_mib=round(grad_mib, 1), dense_tv_mib=round(T * V * 4 / 2 ** 20, 1),
                 single_round_above_s=20.0)
    assert torch.isfinite(out)


def _peak_extra_mib(impl, T, V, k):
    """VmHWM growth (MiB) of one forward + backward in a fresh process (module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    run = subprocess.run([sys.executable, __file__, "--memory", impl, str(T), str(V), str(k)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def _memory_probe(impl, T, V, k):
    """Runs in the probe's own process (started as a script from benchmarks/, so the suite's
    conftest imports as a module; no benchmark fixture: KnnBench only looks the ops up)."""
    from conftest import KnnBench, reset_peak_rss, status_kib
    fn_loss = _loss_fn(KnnBench(None), impl)
    _step(fn_loss, *_data(256, 4096, k))()  # warm-up: one-time library state
    step = _step(fn_loss, *_data(T, V, k))
    rss0 = status_kib("VmRSS")
    assert reset_peak_rss(), "the memory probe needs Linux's /proc/self/clear_refs"
    step()
    print(json.dumps({"peak_extra_mib": round((status_kib("VmHWM") - rss0) / 1024.0, 1)}))


def _step(fn_loss, hidden, weight, bias, targets, tokens, scores):
    """One forward + backward of ``fn_loss``, the gradients dropped first."""
    h, w, b = (t.requires_grad_() for t in (hidden, weight, bias))

    def step():
        h.grad = w.grad = b.grad = None
        with torch.enable_grad():
            loss = fn_loss(h, w, targets, tokens, scores, bias=b, temperature=100.0,
                           label_smoothing=0.1, kd="kl")
            loss.backward()
        return loss.detach()
    return step


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--memory":
    _memory_probe(sys.argv[2], *(int(a) for a in sys.argv[3:]))
