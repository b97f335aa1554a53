"""Compare two benchmark runs of the same suites (e.g. before and after a refactor), measured
one after the other on one machine: per benchmark, the two medians and their ratio.

    python -m pytest benchmarks/bench_knn_interpolate.py --benchmark-json before.json
    ... change the code, rebuild ...
    python -m pytest benchmarks/bench_knn_interpolate.py --benchmark-json after.json
    python benchmarks/compare.py --a before.json --b after.json [--label-a before --label-b after]

Several files per side are merged (e.g. one JSON per suite).

Prints a markdown section (the machine from the second run's metadata, every matched row,
and the rows whose ratio is outside ±tolerance) to append to RESULTS.md after a line
starting with ``<!-- appended:`` (write_results.py keeps such sections when it regenerates
the file).
"""
from __future__ import annotations

import argparse
import json
import statistics

from write_results import fmt_ms, load, table


def cpu_model(paths) -> str:
    with open(paths[-1]) as f:
        data = json.load(f)
    machine = data.get("machine_info") or {}
    cpu = machine.get("cpu") or {}
    return cpu.get("brand_raw") or machine.get("processor") or "unknown CPU"


def cell_name(row) -> str:
    shape = ", ".join(f"{k}={v}" for k, v in row.shape.items())
    extras = [x for x in (row.metric, row.variant, row.dtype) if x]
    return f"{row.op} {row.impl} [{shape}]" + (f" {'/'.join(extras)}" if extras else "")


def compare(paths_a, paths_b, label_a: str, label_b: str, tolerance: float) -> str:
    _, rows_a, _ = load(paths_a)
    _, rows_b, _ = load(paths_b)
    a = {cell_name(r): r for r in rows_a}
    b = {cell_name(r): r for r in rows_b}
    names = [n for n in b if n in a]
    lines = []
    ratios = []
    for n in names:
        r = b[n].median / a[n].median
        ratios.append(r)
        lines.append([n, fmt_ms(a[n].median), fmt_ms(b[n].median), f"{r:.2f}"])
    out = [f"CPU: {cpu_model(paths_b)}. {len(names)} benchmarks in both runs "
           f"({len(set(a) - set(b))} only in {label_a}, {len(set(b) - set(a))} only in {label_b}); "
           f"times are medians in ms, ratio = {label_b} / {label_a}."]
    if ratios:
        out.append(f"Median ratio {statistics.median(ratios):.3f}, range "
                   f"{min(ratios):.2f}–{max(ratios):.2f}.")
        outside = [l for l in lines if abs(float(l[3]) - 1) > tolerance]
        out.append(f"Outside ±{tolerance:.0%}: {len(outside)} of {len(lines)}.")
    out.append("")
    out.append(table(["benchmark", label_a, label_b, "ratio"], lines))
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", nargs="+", required=True, help="first run (pytest-benchmark JSONs)")
    p.add_argument("--b", nargs="+", required=True, help="second run (pytest-benchmark JSONs)")
    p.add_argument("--label-a", default="before")
    p.add_argument("--label-b", default="after")
    p.add_argument("--tolerance", type=float, default=0.10,
                   help="relative change reported as outside the noise (default 0.10)")
    args = p.parse_args(argv)
    print(compare(args.a, args.b, args.label_a, args.label_b, args.tolerance))


if __name__ == "__main__":
    main()
