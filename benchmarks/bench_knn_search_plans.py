"""knn_search on CPU: plan="auto" (chosen by measurement) vs every forced plan vs FAISS
IndexFlatL2, on the issue-15 grid, for the CPU this runs on (issue 15: one table per CPU kind).

    python benchmarks/bench_knn_search_plans.py [--n 1000000] [--out results.json]

prints a markdown table headed by the CPU model and ISA (knnfast.build_info()). Every time is
the minimum of --repeats calls (one call when a call takes over 3 s), after one untimed call;
"auto first" is that untimed first call of plan="auto" with an empty plan cache: the search plus
its one-off calibration. FAISS ratios (FAISS fp32 time / fused time) come from the same run.
Each forced plan's scores are checked against gemm_f32's (all plans are exact). Data: clustered
keys as in bench_knn_search.py (1,024 Gaussian centres, members at sigma 0.5, seeded).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

SLOW_CALL_S = 3.0


def clustered(n, d, b_max, seed=1234, clusters=1024, sigma=0.5):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    keys = torch.empty(n, d)
    for s in range(0, n, 1 << 16):
        e = min(n, s + (1 << 16))
        keys[s:e].normal_(generator=g).mul_(sigma).add_(centres[torch.randint(0, clusters, (e - s,), generator=g)])
    queries = centres[torch.randint(0, clusters, (b_max,), generator=g)] + sigma * torch.randn(b_max, d, generator=g)
    return queries.contiguous(), keys


def best_time(fn, repeats):
    result = fn()  # untimed first call
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if times[-1] > SLOW_CALL_S:
            break
    return min(times) * 1e3, result


def run(args):
    import knnfast
    from knnfast.ops import plan_choice
    info = knnfast.build_info()
    plans = [p for p in info["cpu_plans"] if p != "auto" and (not args.plans or p in args.plans)]
    queries, keys32 = clustered(args.n, args.d, max(args.batches))
    rows = []
    faiss_ms = {}
    try:
        import faiss
        index = faiss.IndexFlatL2(args.d)
        index.add(keys32.numpy())
    except ImportError:
        index = None
    for b in args.batches:
        for k in args.ks:
            q = queries[:b].contiguous()
            if index is not None:
                faiss_ms[(b, k)], _ = best_time(lambda: index.search(q.numpy(), k), args.repeats)
            for dtype in args.dtypes:
                keys = keys32.to(getattr(torch, dtype))
                start = time.perf_counter()
                knnfast.knn_search(q, keys, k)  # calibrates this bucket
                first_ms = (time.perf_counter() - start) * 1e3
                row = {"B": b, "k": k, "dtype": dtype, "auto_first_ms": first_ms,
                       "faiss_ms": faiss_ms.get((b, k))}
                row["auto_ms"], _ = best_time(lambda: knnfast.knn_search(q, keys, k), args.repeats)
                row["auto_plan"] = knnfast.build_info()["cpu_plans_chosen"].get(
                    plan_choice.bucket_key(q, keys, k), "fixed rule")
                ref_scores = None
                for plan in ["gemm_f32"] + [p for p in plans if p != "gemm_f32"]:
                    row[f"{plan}_ms"], (s, _) = best_time(
                        lambda: knnfast.knn_search(q, keys, k, plan=plan), args.repeats)
                    if ref_scores is None:
                        ref_scores = s
                    torch.testing.assert_close(s, ref_scores, rtol=1e-5, atol=1e-3)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del keys
    return info, plans, rows


def markdown(info, plans, rows, args):
    head = (f"CPU: {info['cpu_model']}; ISA: {', '.join(info['isa']) or 'none of the listed'}; "
            f"{info['openmp_threads']} threads; torch {info['torch_version']}; "
            f"N = {args.n:,}, D = {args.d:,}, l2, float32 queries; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.")
    cols = ["keys", "B", "k", "FAISS fp32", "auto (plan)", "auto first"] + plans + ["FAISS / auto"]
    out = [head, "", "| " + " | ".join(cols) + " |", "|" + " :--- |" * 1 + " ---: |" * (len(cols) - 1)]
    for r in rows:
        f = r["faiss_ms"]
        cells = [r["dtype"], str(r["B"]), str(r["k"]), f"{f:,.0f}" if f else "—",
                 f"{r['auto_ms']:,.0f} ({r['auto_plan']})", f"{r['auto_first_ms']:,.0f}"]
        cells += [f"{r[p + '_ms']:,.0f}" for p in plans]
        cells.append(f"{f / r['auto_ms']:.2f}×" if f else "—")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 160, 640])
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=["float32", "float16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plans", type=lambda s: s.split(","), default=None,
                   help="forced plans to time besides auto (default: every plan of this CPU; "
                        "gemm_f32 is always timed, the reference of the score check)")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()
    # a private plan cache: every bucket is calibrated in this run
    os.environ["KNNFAST_PLAN_CACHE"] = os.path.join(tempfile.mkdtemp(), "plans.json")
    info, plans, rows = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": {k: str(v) for k, v in info.items()}, "rows": rows}, f, indent=1)
    print(markdown(info, plans, rows, args))


if __name__ == "__main__":
    main()
