"""Every knnfast op once per kernel variant, on small inputs, with each result checked against
knnfast.reference: the program that `tests/cuda/gpu_check.sh sanitize` runs under
compute-sanitizer (memcheck, racecheck, synccheck), where the pytest suite would take too long.

    python tests/cuda/exercise_ops.py --device cuda     # on a GPU (what gpu_check.sh runs)
    python tests/cuda/exercise_ops.py --device cpu      # the same calls on CPU (a test runs it)

Also drives each op's bad-value path once (the kernels' status report) and, on CUDA, one
deferred-checks block. Shapes are odd on purpose (tails of every vector width and tile) and
small, so the sanitizer's 10-100x slowdown stays within seconds. Exits 1 with the names of the
calls whose results differ from the reference; prints one line per call.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from pathlib import Path
from typing import Callable, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import knnfast  # noqa: E402
import knnfast.reference as ref  # noqa: E402
from knnfast.ops import settings  # noqa: E402

# the op modules (knnfast.ops re-exports their functions under the same names)
SEARCH_PLANS = importlib.import_module("knnfast.ops.knn_search").PLANS
INTERPOLATE_PLANS = importlib.import_module("knnfast.ops.knn_interpolate").PLANS
LISTS_PLANS = importlib.import_module("knnfast.ops.knn_search_lists").PLANS
STATS_PLANS = importlib.import_module("knnfast.ops.softmax_stats").PLANS

B, N, D, K, V = 37, 1203, 70, 8, 997


def close(a, b, tol=1e-4) -> bool:
    return torch.allclose(a.float().cpu(), b.float().cpu(), rtol=tol, atol=tol, equal_nan=True)


def same_neighbours(s, i, rs, ri) -> bool:
    """Equal scores (ids may differ only among exact ties)."""
    return close(s, rs) and bool(((i.cpu() == ri.cpu()) | torch.isclose(s.cpu(), rs.cpu())).all())


def search_calls(dev: str) -> List[tuple]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=g)
    calls = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        keys = torch.randn(N, D, generator=g).to(dtype)
        for metric in ("l2", "ip", "cos"):
            rs, ri = ref.knn_search(q, keys.float(), K, metric)
            for plan in SEARCH_PLANS[dev.split(":")[0]]:
                def run(plan=plan, keys=keys, metric=metric, rs=rs, ri=ri):
                    s, i = knnfast.knn_search(q.to(dev), keys.to(dev), K, metric, plan=plan)
                    return same_neighbours(s, i, rs, ri)
                calls.append((f"knn_search {dtype} {metric} plan={plan}", run))
    keys = torch.randn(N, D, generator=g).half()
    offsets = torch.tensor([0, 5, 5, 400, 401, 900, N])
    probes = torch.randint(-1, 6, (B, 3), generator=g)

    # the packs of plans bf16 / int8 (CPU); CUDA checks them and ignores them
    packs = {"bf16": knnfast.pack_lists_bf16(keys, offsets),
             "int8": knnfast.pack_lists_int8(keys, offsets)}
    for plan in LISTS_PLANS[dev.split(":")[0]]:
        for kind, pack in packs.items():
            if plan in packs and plan != kind:
                continue  # a packed plan takes its own pack only
            def lists(plan=plan, pack=pack):
                s, i = knnfast.knn_search_lists(q.to(dev), keys.to(dev), offsets.to(dev),
                                                probes.to(dev), K, "l2", plan=plan,
                                                pack=type(pack)(*(t.to(dev) for t in pack)))
                rs, ri = ref.knn_search_lists(q, keys.float(), offsets, probes, K, "l2")
                return same_neighbours(s, i, rs, ri)
            calls.append((f"knn_search_lists fp16 l2 plan={plan} {kind} pack", lists))
    idx = torch.randint(-1, N, (B, K), generator=g)

    def rescore():
        out = knnfast.knn_rescore(q.to(dev), keys.to(dev), idx.to(dev), "ip")
        return close(out, ref.knn_rescore(q, keys.float(), idx, "ip"))
    calls.append(("knn_rescore fp16 ip", rescore))
    return calls


def row_calls(dev: str) -> List[tuple]:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(B, K, generator=g)
    scores[0] = float("-inf")  # an empty neighbour set
    tokens = torch.randint(0, V, (B, K), generator=g)
    tokens[1, :3] = tokens[1, 5]  # repeated tokens
    logits = torch.randn(B, V, generator=g)
    targets = torch.randint(0, V, (B,), generator=g)
    targets[2] = -100
    temp, lam = torch.rand(B, generator=g) + 0.5, torch.rand(B, generator=g)
    d = lambda t: t.to(dev)  # noqa: E731
    calls = [
        ("knn_probs", lambda: close(knnfast.knn_probs(d(scores), d(tokens), V, d(temp)),
                                    ref.knn_probs(scores, tokens, V, temp))),
        ("knn_probs_sparse", lambda: all(close(a, b) for a, b in zip(
            knnfast.knn_probs_sparse(d(scores), d(tokens), d(temp)),
            ref.knn_probs_sparse(scores, tokens, temp)))),
        ("knn_gold_logprob", lambda: close(
            knnfast.knn_gold_logprob(d(logits), d(targets), d(tokens), scores=d(scores),
                                     temperature=d(temp), lam=d(lam)),
            ref.knn_gold_logprob(logits, targets, tokens, scores=scores, temperature=temp,
                                 lam=lam))),
        ("label_counts", lambda: close(knnfast.label_counts(d(tokens)),
                                       ref.label_counts(tokens))),
    ]
    for plan in STATS_PLANS[dev.split(":")[0]]:
        calls.append((f"softmax_stats plan={plan}", lambda plan=plan: all(
            close(a, b) for a, b in zip(knnfast.softmax_stats(d(logits), 3, plan=plan),
                                        ref.softmax_stats(logits, 3)))))
    for plan in INTERPOLATE_PLANS[dev.split(":")[0]]:
        calls.append((f"knn_interpolate plan={plan}", lambda plan=plan: close(
            knnfast.knn_interpolate(d(logits), d(tokens), scores=d(scores), temperature=d(temp),
                                    lam=d(lam), plan=plan),
            ref.knn_interpolate(logits, tokens, scores=scores, temperature=temp, lam=lam))))
    return calls + loss_calls(dev, logits, targets, tokens, scores, temp)


def loss_calls(dev, logits, targets, tokens, scores, temp) -> List[tuple]:
    d = lambda t: t.to(dev)  # noqa: E731
    kw = dict(temperature=temp, label_smoothing=0.1, kd_weight=0.5, reduction="sum")

    def kd_loss():
        x = d(logits).detach().clone().requires_grad_()
        loss = knnfast.knn_kd_loss(x, d(targets), d(tokens), d(scores), **dict(kw, temperature=d(temp)))
        loss.backward()
        y = logits.detach().clone().requires_grad_()
        expected = ref.knn_kd_loss(y, targets, tokens, scores, **kw)
        expected.backward()
        return close(loss, expected, 1e-3) and close(x.grad, y.grad, 1e-3)

    g = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(B, 48, generator=g), torch.randn(V, 48, generator=g) / 7

    def kd_linear_loss():
        h, w = (d(t).detach().clone().requires_grad_() for t in (hidden, weight))
        loss = knnfast.knn_kd_linear_loss(h, w, d(targets), d(tokens), d(scores),
                                          **dict(kw, temperature=d(temp)))
        loss.backward()
        h2, w2 = (t.detach().clone().requires_grad_() for t in (hidden, weight))
        expected = ref.knn_kd_loss(h2 @ w2.t(), targets, tokens, scores, **kw)
        expected.backward()
        return close(loss, expected, 1e-3) and close(h.grad, h2.grad, 1e-3) and close(
            w.grad, w2.grad, 1e-3)
    return [("knn_kd_loss + backward", kd_loss), ("knn_kd_linear_loss + backward", kd_linear_loss)]


def bad_value_calls(dev: str) -> List[tuple]:
    """Values only the kernels see: each must raise ValueError (the status path)."""
    def raises(call: Callable) -> Callable:
        def run():
            try:
                call()
                if dev.startswith("cuda"):
                    torch.cuda.synchronize()
            except ValueError:
                return True
            return False
        return run
    tokens = torch.tensor([[1, 2], [3, 10_000]], device=dev)
    scores = torch.zeros(2, 2, device=dev)
    logits = torch.zeros(2, 50, device=dev)
    nan_q = torch.full((2, 8), float("nan"), device=dev)
    return [
        ("bad token id -> ValueError (knn_probs)", raises(lambda: knnfast.knn_probs(
            scores, tokens, 50, 1.0))),
        ("bad token id -> ValueError (knn_interpolate)", raises(lambda: knnfast.knn_interpolate(
            logits, tokens, scores=scores))),
        ("NaN query -> ValueError (knn_search)", raises(lambda: knnfast.knn_search(
            nan_q, torch.randn(30, 8, device=dev), 2))),
    ]


def deferred_calls(dev: str) -> List[tuple]:
    """A bad value inside deferred_checks(): no raise at the call, ValueError on leaving."""
    if not dev.startswith("cuda"):
        return []

    def run():
        tokens = torch.tensor([[1, 2], [3, 10_000]], device=dev)
        try:
            with settings.deferred_checks():
                knnfast.knn_probs(torch.zeros(2, 2, device=dev), tokens, 50, 1.0)
        except ValueError:
            return True
        return False
    return [("deferred_checks: raises on leaving", run)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    dev = parser.parse_args(argv).device
    failed = []
    for name, call in (search_calls(dev) + row_calls(dev) + bad_value_calls(dev)
                       + deferred_calls(dev)):
        try:
            ok = bool(call())
        except Exception:  # a crash is a failure to report, not a reason to stop
            traceback.print_exc()
            ok = False
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
        if not ok:
            failed.append(name)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"{len(failed)} failed: {failed}" if failed else "all calls ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
