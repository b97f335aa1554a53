#!/usr/bin/env python
"""Turn a pytest-benchmark JSON file from the knnfast suites into benchmarks/RESULTS.md.

    python benchmarks/write_results.py benchmarks/results.json [--out benchmarks/RESULTS.md]

Rows are paired through the extra_info each suite records (op, impl, shape,
dtype, metric, variant). Ratios are ratios of medians:
  speed-up over the reference = reference median / fused median
  fused vs copy                = fused_out median / copy median, fused median / clone median
  FAISS ratio (knn_search)     = FAISS float32 median / fused median (per key dtype)
Targets are the "Numbers to reach" of issue #2.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------- targets
INTERP_MIN_SPEEDUP = 20.0
INTERP_MAX_COPY_RATIO = 3.0
GOLD_MAX_COPY_RATIO = 2.0
SEARCH_FP32_MIN_FAISS = 1.0
SEARCH_HALF_MIN_FAISS = 1.5
SEARCH_HALF_DTYPES = ("float16", "bfloat16")
# "No op allocates memory proportional to B x N": judged on search cells whose
# B*N float32 matrix is at least this big; pass when the high-water mark of one
# call grows by less than a quarter of it.
BXN_MIN_MIB = 256.0
BXN_MAX_FRACTION = 0.25

DTYPE_SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "int64"}


# ---------------------------------------------------------------------------------- formatting
def fmt_ms(seconds):
    if seconds is None:
        return "—"
    ms = seconds * 1e3
    if ms >= 1000:
        return f"{ms:,.0f}"
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    if ms >= 0.01:
        return f"{ms:.3f}"
    return f"{ms:.2g}"


def fmt_ratio(r):
    if r is None:
        return "—"
    if r >= 100:
        return f"{r:.0f}×"
    if r >= 10:
        return f"{r:.1f}×"
    if r >= 0.01:
        return f"{r:.2f}×"
    return f"{r:.2g}×"


def fmt_int(n):
    return f"{n:,}"


def ratio(num, den):
    if num is None or den is None or den <= 0:
        return None
    return num / den


def mark(ok):
    if ok is None:
        return "—"
    return "pass" if ok else "**FAIL**"


def _numeric(cell):
    txt = str(cell).strip()
    return all(ch in "0123456789.,×—-–/ ✗e+" for ch in txt)


def table(header, rows, align=None):
    if align is None:  # right-align columns of numbers, left-align the rest
        align = ["r" if all(_numeric(r[i]) for r in rows) else "l" for i in range(len(header))]
    sep = ["---:" if a == "r" else ":---" if a == "l" else ":---:" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- loading
class Row:
    __slots__ = ("op", "impl", "dtype", "shape", "metric", "variant", "median", "min", "rounds", "iterations",
                 "info")

    def __init__(self, bench):
        info = bench.get("extra_info") or {}
        st = bench["stats"]
        self.op = info["op"]
        self.impl = info["impl"]
        self.dtype = info.get("dtype", "")
        self.shape = dict(info.get("shape") or {})
        self.metric = info.get("metric")
        self.variant = info.get("variant")
        self.median = float(st["median"])
        self.min = float(st.get("min", st["median"]))
        self.rounds = int(st.get("rounds", 0))
        self.iterations = int(st.get("iterations", 1))
        self.info = info


def load(paths):
    """Rows of one or more JSON files; a benchmark (same test id) present in several
    files is taken from the last one. Run metadata comes from the last file."""
    data = {}
    by_name = {}
    skipped = 0
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data.get("benchmarks", []):
            info = b.get("extra_info") or {}
            if "op" not in info or "impl" not in info or not b.get("stats"):
                skipped += 1
                continue
            by_name[b.get("fullname") or b.get("name")] = Row(b)
    return data, list(by_name.values()), skipped


def load_all(paths):
    """Every row of every file in file order, without merging: repeated passes of one suite
    (their rows share test ids). Run metadata comes from the last file."""
    data, rows = {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        rows += [Row(b) for b in data.get("benchmarks", [])
                 if {"op", "impl"} <= set(b.get("extra_info") or {}) and b.get("stats")]
    return data, rows


def by_cell(rows, op, key_fn, col_fn):
    cells = defaultdict(dict)
    for r in rows:
        if r.op == op:
            cells[key_fn(r)][col_fn(r)] = r
    return cells


def shape_key(r, names):
    return tuple(r.shape.get(n) for n in names)


def med(cell, col):
    r = cell.get(col)
    return None if r is None else r.median


# ---------------------------------------------------------------------------------- machine
def _live_machine():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        for line in txt.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in txt.splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                info["cpu_flags"] = [w for w in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni",
                                                 "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile") if w in have]
                break
    except OSError:
        info["cpu_model"] = platform.processor() or platform.machine()
    info["cpu_count"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["mem_total_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch_version"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    try:
        import faiss

        info["faiss_version"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except Exception:
        pass
    try:
        import knnfast

        info["knnfast_build_info"] = dict(knnfast.build_info())
    except Exception as e:
        info["knnfast_build_info"] = f"knnfast not importable ({type(e).__name__})"
    return info


def machine_section(data, rows):
    mi = (data.get("machine_info") or {}).get("knnfast")
    source = "recorded by the benchmark run"
    if not mi:
        mi = _live_machine()
        source = "read by write_results.py (the JSON has no knnfast machine info)"
    ci = data.get("commit_info") or {}
    lines = ["## Machine", "", f"_({source})_", ""]
    items = [
        ("CPU", mi.get("cpu_model", "?")),
        ("cores (os.cpu_count)", mi.get("cpu_count", "?")),
        ("SIMD flags", ", ".join(mi.get("cpu_flags") or []) or "?"),
        ("RAM", f"{mi['mem_total_gib']} GiB" if mi.get("mem_total_gib") is not None else "?"),
        ("Python", mi.get("python", platform.python_version())),
        ("torch", f"{mi.get('torch_version', '?')} ({mi.get('torch_threads', '?')} threads)"),
        ("faiss", f"{mi.get('faiss_version', '?')} ({mi.get('faiss_threads', '?')} OpenMP threads)"),
    ]
    bi = mi.get("knnfast_build_info")
    if isinstance(bi, dict):
        items.append(("knnfast.build_info()", ", ".join(f"{k}={v}" for k, v in bi.items())))
    elif bi:
        items.append(("knnfast.build_info()", str(bi)))
    if ci.get("id"):
        items.append(("commit", f"{ci.get('id', '')[:12]} ({ci.get('branch', '?')}{', dirty' if ci.get('dirty') else ''})"))
    lines.append(table(["item", "value"], items, ["l", "l"]))
    return "\n".join(lines), bool(mi.get("quick"))


# ---------------------------------------------------------------------------------- sections
class Targets:
    def __init__(self):
        self.items = []  # (name, n_pass, n_total)

    def add(self, name, results):
        res = [r for r in results if r is not None]
        self.items.append((name, sum(1 for r in res if r), len(res)))

    def section(self):
        rows = []
        for name, n_ok, n in self.items:
            if n == 0:
                verdict = "not measured"
            elif n_ok == n:
                verdict = f"pass ({n}/{n} cells)"
            else:
                verdict = f"**FAIL** ({n - n_ok} of {n} cells)"
            rows.append((name, verdict))
        return "## Targets (issues #2, #4, #5 and #6, \"Numbers to reach\")\n\n" + table(["target", "result"], rows, ["l", "l"])


def section_interpolate(rows, targets):
    cells = by_cell(rows, "knn_interpolate", lambda r: shape_key(r, ("B", "V", "k")), lambda r: r.impl)
    if not cells:
        return None
    b_max = max(k[0] for k in cells)
    out = []
    t_speed, t_copy = [], []
    for (b, v, k), c in sorted(cells.items(), key=lambda kv: (-kv[0][0], kv[0][2])):
        fused, fused_out, ref = med(c, "fused"), med(c, "fused_out"), med(c, "reference")
        copy, clone = med(c, "copy"), med(c, "clone")
        sp = ratio(ref, fused)
        r_copy = ratio(fused_out, copy)
        r_clone = ratio(fused, clone)
        targeted = b == b_max and k in (8, 64)
        ok_sp = (sp >= INTERP_MIN_SPEEDUP) if (targeted and sp is not None) else None
        ok_copy = (r_copy <= INTERP_MAX_COPY_RATIO) if (targeted and r_copy is not None) else None
        ok_clone = (r_clone <= INTERP_MAX_COPY_RATIO) if (targeted and r_clone is not None) else None
        if targeted:
            t_speed.append(ok_sp)
            t_copy.extend([ok_copy, ok_clone])
            parts = [ok_sp, ok_copy, ok_clone]
            overall = None if any(p is None for p in parts) else all(parts)
            verdict = mark(overall) if overall is not None else ("**FAIL**" if False in parts else "incomplete")
        else:
            verdict = "— (no target)"
        out.append((
            fmt_int(b), fmt_int(v), k,
            fmt_ms(fused), fmt_ms(fused_out), fmt_ms(ref), fmt_ms(copy), fmt_ms(clone),
            fmt_ratio(sp), fmt_ratio(r_copy), fmt_ratio(r_clone), verdict,
        ))
    targets.add(f"knn_interpolate B={b_max}: ≥ {INTERP_MIN_SPEEDUP:g}× faster than the reference", t_speed)
    targets.add(f"knn_interpolate B={b_max}: ≤ {INTERP_MAX_COPY_RATIO:g}× one copy of the logits "
                "(fused_out/copy and fused/clone)", t_copy)
    hdr = ["B", "V", "k", "fused ms", "fused_out ms", "reference ms", "copy ms", "clone ms",
           f"ref/fused (≥{INTERP_MIN_SPEEDUP:g}×)", f"fused_out/copy (≤{INTERP_MAX_COPY_RATIO:g}×)",
           f"fused/clone (≤{INTERP_MAX_COPY_RATIO:g}×)", "target"]
    return ("## knn_interpolate\n\n"
            "log((1−λ)·softmax(logits) + λ·P_kNN) over [B, V], float32 logits. `fused_out` writes into a "
            "preallocated buffer (`out=`), `copy` is `out.copy_(logits)` into a preallocated buffer, `clone` is "
            "`logits.clone()`. Targets apply to the largest B.\n\n" + table(hdr, out))


def section_gold(rows, targets):
    cells = by_cell(rows, "knn_gold_logprob", lambda r: shape_key(r, ("B", "V", "k")), lambda r: r.impl)
    if not cells:
        return None
    out, t = [], []
    for (b, v, k), c in sorted(cells.items()):
        fused, ref, copy = med(c, "fused"), med(c, "reference"), med(c, "copy")
        sp = ratio(ref, fused)
        rc = ratio(fused, copy)
        ok = None if rc is None else rc <= GOLD_MAX_COPY_RATIO
        t.append(ok)
        out.append((fmt_int(b), fmt_int(v), fmt_int(k), fmt_ms(fused), fmt_ms(ref), fmt_ms(copy),
                    fmt_ratio(sp), fmt_ratio(rc), mark(ok)))
    targets.add(f"knn_gold_logprob: ≤ {GOLD_MAX_COPY_RATIO:g}× one copy of the logits", t)
    hdr = ["B", "V", "k", "fused ms", "reference ms", "copy ms", "ref/fused",
           f"fused/copy (≤{GOLD_MAX_COPY_RATIO:g}×)", "target"]
    return ("## knn_gold_logprob\n\n"
            "Interpolated log-probability at the target token only; `copy` is `out.copy_(logits)`.\n\n"
            + table(hdr, out))


def section_search(rows, targets):
    cells = by_cell(rows, "knn_search", lambda r: (r.metric or "l2",) + shape_key(r, ("B", "k", "N", "D")),
                    lambda r: (r.impl, r.dtype))
    if not cells:
        return None
    order = sorted(cells, key=lambda key: (key[0] != "l2", key[0], key[3] or 0, key[4] or 0, key[1], key[2]))
    nd = sorted({(key[3], key[4]) for key in order})
    cols = [("faiss", "float32"), ("reference", "float32"), ("fused", "float32"), ("fused", "float16"),
            ("fused", "bfloat16")]

    med_rows, ratio_rows, mem_rows = [], [], []
    t_fp32, t_half, t_recall, t_mem = [], [], [], []
    for key in order:
        metric, b, k, n, d = key
        c = cells[key]
        targeted = metric == "l2"
        faiss_name = "IndexFlatL2" if metric == "l2" else "IndexFlatIP"
        lead = [metric, fmt_int(b), k] + ([f"{fmt_int(n)}×{d}"] if len(nd) > 1 else [])
        med_rows.append(lead + [fmt_ms(med(c, col)) for col in cols])

        faiss_m = med(c, ("faiss", "float32"))
        cell_ok = []
        rcells = []
        for dt in ("float32",) + SEARCH_HALF_DTYPES:
            r = ratio(faiss_m, med(c, ("fused", dt)))
            need = SEARCH_FP32_MIN_FAISS if dt == "float32" else SEARCH_HALF_MIN_FAISS
            ok = None if (r is None or not targeted) else r >= need
            (t_fp32 if dt == "float32" else t_half).append(ok)
            cell_ok.append(ok)
            rcells.append(fmt_ratio(r) + ("" if ok is None or ok else " ✗"))
        sp = ratio(med(c, ("reference", "float32")), med(c, ("fused", "float32")))
        recs = []
        for dt in ("float32",) + SEARCH_HALF_DTYPES:
            fr = c.get(("fused", dt))
            if fr is None or "recall" not in fr.info:
                recs.append("—")
                if dt in SEARCH_HALF_DTYPES and targeted:
                    t_recall.append(None)
                continue
            rs, rt = fr.info["recall"], fr.info.get("recall_tol")
            ok = None if rt is None else rt >= 1.0
            if dt in SEARCH_HALF_DTYPES and targeted:
                t_recall.append(ok)
                cell_ok.append(ok)
            recs.append(f"{rs:.4f} / {rt:.4f}" if rt is not None else f"{rs:.4f}")
        fa = c.get(("faiss", "float32"))
        faiss_rec = f"{fa.info['recall']:.4f}" if fa is not None and "recall" in fa.info else "—"
        if targeted:
            present = [o for o in cell_ok if o is not None]
            verdict = ("**FAIL**" if False in present else
                       "pass" if len(present) == len(cell_ok) and present else "incomplete")
        else:
            verdict = f"— (info, vs {faiss_name})"
        ratio_rows.append(lead + rcells + [fmt_ratio(sp)] + recs + [faiss_rec, verdict])

        bxn_mib = b * n * 4 / 2**20
        peaks = []
        worst = None
        for col in (("fused", "float32"), ("fused", "float16"), ("fused", "bfloat16"), ("faiss", "float32"),
                    ("reference", "float32")):
            r = c.get(col)
            p = None if r is None else r.info.get("peak_extra_mib")
            peaks.append("—" if p is None else f"{p:,.0f}")
            if col[0] == "fused" and p is not None:
                worst = p if worst is None else max(worst, p)
        judged = bxn_mib >= BXN_MIN_MIB and worst is not None
        ok_mem = (worst < BXN_MAX_FRACTION * bxn_mib) if judged else None
        t_mem.append(ok_mem)
        mem_rows.append(lead + [f"{bxn_mib:,.0f}" if bxn_mib >= 10 else f"{bxn_mib:.2g}"] + peaks + [mark(ok_mem) if judged else "—"])

    targets.add(f"knn_search fp32 keys: ≥ {SEARCH_FP32_MIN_FAISS:g}× FAISS IndexFlatL2 speed in every cell", t_fp32)
    targets.add(f"knn_search fp16/bf16 keys: ≥ {SEARCH_HALF_MIN_FAISS:g}× FAISS fp32 speed in every cell", t_half)
    targets.add("knn_search fp16/bf16 keys: recall 1.0 vs exact fp32 within rounding (recall_tol)", t_recall)
    targets.add("knn_search: no allocation proportional to B × N (fused, peak RSS growth "
                f"< {BXN_MAX_FRACTION:g}·B·N·4 bytes where that is ≥ {BXN_MIN_MIB:g} MiB)", t_mem)

    lead_h = ["metric", "B", "k"] + (["N×D"] if len(nd) > 1 else [])
    shape_txt = ", ".join(f"N = {fmt_int(n)}, D = {fmt_int(d)}" for n, d in nd)
    h1 = lead_h + ["FAISS fp32 ms", "reference fp32 ms", "fused fp32 ms", "fused fp16 ms", "fused bf16 ms"]
    h2 = lead_h + [f"FAISS/fused fp32 (≥{SEARCH_FP32_MIN_FAISS:g}×)", f"FAISS/fused fp16 (≥{SEARCH_HALF_MIN_FAISS:g}×)",
                   f"FAISS/fused bf16 (≥{SEARCH_HALF_MIN_FAISS:g}×)", "ref/fused fp32",
                   "recall fp32", "recall fp16", "recall bf16", "recall FAISS", "target"]
    h3 = lead_h + ["B·N·4 MiB", "fused fp32", "fused fp16", "fused bf16", "FAISS", "reference", "target"]
    return ("## knn_search\n\n"
            f"Exact top-k, {shape_txt}, float32 queries. FAISS = IndexFlatL2 (l2) / IndexFlatIP (ip) on float32 keys; "
            "reference = chunked matmul + topk on float32 keys. FAISS ratios are FAISS fp32 median / fused median "
            "(need ≥ 1.0 for fp32 keys, ≥ 1.5 for fp16/bf16 keys; ✗ marks a miss); ip is informational.\n\n"
            "### Medians\n\n" + table(h1, med_rows) + "\n\n"
            "### Ratios and recall\n\n"
            "Recall is shown as `strict / within rounding`: strict = |returned ∩ exact fp32 top-k| / k; within "
            "rounding also accepts an id whose fp32 score is within twice the fp16/bf16 key-rounding error (plus "
            "1e-5 relative) of the exact k-th score (an exact search over the rounded keys always gets 1.0). "
            "Target: within-rounding recall 1.0 for fp16/bf16.\n\n" + table(h2, ratio_rows) + "\n\n"
            "### Memory\n\n"
            "Growth of the process's peak RSS during one call (MiB; Linux VmHWM after clear_refs), against the "
            f"size of a B×N float32 score matrix. Judged where B·N·4 ≥ {BXN_MIN_MIB:g} MiB: pass when every "
            f"fused dtype stays under {BXN_MAX_FRACTION:g} of it.\n\n" + table(h3, mem_rows))


def section_simple(rows, op, title, desc, dims, impls=("fused", "reference")):
    cells = by_cell(rows, op, lambda r: (shape_key(r, dims), r.dtype, r.metric or "", r.variant or ""),
                    lambda r: r.impl)
    if not cells:
        return None
    out = []
    for (shp, dtype, metric, variant), c in sorted(cells.items(), key=lambda kv: str(kv[0])):
        meds = [med(c, i) for i in impls]
        sp = ratio(med(c, "reference"), med(c, "fused"))
        out.append([fmt_int(x) if isinstance(x, int) else str(x) for x in shp]
                   + [DTYPE_SHORT.get(dtype, dtype)] + ([metric] if metric else [])
                   + [fmt_ms(m) for m in meds] + [fmt_ratio(sp)])
    any_metric = any(key[2] for key in cells)
    hdr = list(dims) + ["dtype"] + (["metric"] if any_metric else []) + [f"{i} ms" for i in impls] + ["ref/fused"]
    return f"## {title}\n\n{desc} No numeric target in issue #2 (speed-up is informational).\n\n" + table(hdr, out)


def ptxas_section():
    """The register/spill table of `make cuda-check` (build/cuda-check.log), when present."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ptxas_report import render as render_ptxas
    return render_ptxas()


def section_cuda(rows):
    """GPU cells (benchmarks/bench_cuda.py): time, speed-up over reference / FAISS GPU and
    the fraction of peak HBM bandwidth the fused kernel reaches."""
    out = []
    for op in ("cuda_knn_interpolate", "cuda_knn_search"):
        cells = by_cell(rows, op, lambda r: shape_key(r, ("B", "N", "V", "D", "k")), lambda r: r.impl)
        for key, c in sorted(cells.items(), key=lambda kv: str(kv[0])):
            fused = c.get("fused")
            if fused is None:
                continue
            peak = fused.info.get("peak_bandwidth")
            frac = (fused.info["bytes_moved"] / fused.median / peak) if peak else None
            shape = ", ".join(f"{n}={v}" for n, v in fused.shape.items())
            other = med(c, "faiss_gpu_fp32") or med(c, "copy")
            other_name = "FAISS GPU fp32" if med(c, "faiss_gpu_fp32") else "copy_"
            out.append([op[5:], shape, fused.info.get("gpu", "?"), fmt_ms(fused.median),
                        fmt_ratio(ratio(med(c, "reference"), fused.median)),
                        (f"{fmt_ratio(ratio(other, fused.median))} vs {other_name}" if other else "—"),
                        f"{frac:.0%}" if frac is not None else "—"])
    if not out:
        return None
    hdr = ["op", "shape", "GPU", "fused ms", "ref/fused", "other/fused", "HBM fraction"]
    return ("## CUDA (issue #3)\n\nGPU cells from `benchmarks/bench_cuda.py`; HBM fraction = bytes "
            "that must move (logits read + output write; or the fp16 keys once) / time / peak.\n\n"
            + table(hdr, out))


# ---------------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------------- issue 4
DECODE_MAX_SHARE = 0.05      # kNN work after the search <= 5% of a bare decoding step
KNNMT_MIN_SPEED = 0.7        # kNN-MT sentences/s >= 0.7x the bare model's
KNNLM_MIN_SPEEDUP = 5.0      # kNN-LM eval tokens/s >= 5x the reference path's


def section_decoding(rows, targets):
    step = by_cell(rows, "decode_step", lambda r: shape_key(r, ("B", "V", "k", "steps")), lambda r: r.impl)
    dec = by_cell(rows, "knnmt_decode", lambda r: shape_key(r, ("sentences", "batch", "beams", "k")),
                  lambda r: r.impl)
    if not step and not dec:
        return None
    parts = ["## kNN-MT decoding (issue #4)", ""]
    t_share, t_speed = [], []
    if step:
        out = []
        for (b, v, k, steps), c in sorted(step.items()):
            bare = c.get("bare")
            bare_step = None if bare is None else bare.median / bare.info.get("per_call_steps", steps)
            fused, ref = med(c, "knn_fused"), med(c, "knn_reference")
            sf, sr = ratio(fused, bare_step), ratio(ref, bare_step)
            ok = None if sf is None else sf <= DECODE_MAX_SHARE
            t_share.append(ok)
            assets = next(iter(c.values())).info.get("assets", "?")
            out.append((fmt_int(b), fmt_int(v), k, fmt_ms(bare_step), fmt_ms(fused), fmt_ms(ref),
                        "—" if sf is None else f"{100 * sf:.2f}%", "—" if sr is None else f"{100 * sr:.1f}%",
                        mark(ok), assets))
        hdr = ["B (16×4)", "V", "k", "bare step ms", "kNN work fused ms", "kNN work reference ms",
               f"fused share (≤{100 * DECODE_MAX_SHARE:g}%)", "reference share", "target", "assets"]
        parts += ["Per decoding step: `bare step` = HF beam-search generate time / steps (fixed length); "
                  "`kNN work` = everything after the search (value lookup, weights, interpolation into the "
                  "vocabulary); the reference is the knn-transformers-style path (dense scatter_add_ + logaddexp).",
                  "", table(hdr, out), ""]
    if dec:
        out = []
        for (n, batch, beams, k), c in sorted(dec.items()):
            bare, fused, ref = med(c, "bare"), med(c, "knn_fused"), med(c, "knn_reference")
            rf, rr = ratio(bare, fused), ratio(bare, ref)
            ok = None if rf is None else rf >= KNNMT_MIN_SPEED
            t_speed.append(ok)
            info = next(iter(c.values())).info
            sps = lambda m: "—" if m is None else f"{n / m:.1f}"  # noqa: E731
            out.append((fmt_int(n), f"{batch}×{beams}", k, sps(bare), sps(fused), sps(ref), fmt_ratio(rf),
                        fmt_ratio(rr), mark(ok), info.get("index", "?"), info.get("assets", "?")))
        hdr = ["sentences", "batch×beam", "k", "bare sent/s", "kNN-MT fused sent/s", "kNN-MT reference sent/s",
               f"fused/bare (≥{KNNMT_MIN_SPEED:g}×)", "reference/bare", "target", "index", "assets"]
        parts += ["End-to-end beam search (HF `generate` + `knnfast.integrations.hf`), FAISS IVF search every step.", "",
                  table(hdr, out)]
    targets.add(f"kNN-MT step: kNN work after the search ≤ {100 * DECODE_MAX_SHARE:g}% of a bare step", t_share)
    targets.add(f"kNN-MT decoding through FAISS IVF: ≥ {KNNMT_MIN_SPEED:g}× bare sentences/s", t_speed)
    return "\n".join(parts)


def section_knn_lm(rows, targets):
    cells = by_cell(rows, "knn_lm_eval", lambda r: shape_key(r, ("N", "D", "V", "k", "tokens")), lambda r: r.impl)
    if not cells:
        return None
    out, t = [], []
    for (n, d, v, k, tokens), c in sorted(cells.items()):
        fused, ref = med(c, "fused"), med(c, "reference")
        sp = ratio(ref, fused)
        ok = None if sp is None else sp >= KNNLM_MIN_SPEEDUP
        t.append(ok)
        tps = lambda m: "—" if m is None else f"{tokens / m:,.0f}"  # noqa: E731
        out.append((fmt_int(n), d, fmt_int(v), fmt_int(k), fmt_int(tokens), fmt_ms(fused), fmt_ms(ref),
                    tps(fused), tps(ref), fmt_ratio(sp), mark(ok)))
    targets.add(f"kNN-LM eval, exact search over 1M fp16: ≥ {KNNLM_MIN_SPEEDUP:g}× the reference tokens/s", t)
    hdr = ["N", "D", "V", "k", "tokens", "fused ms", "reference ms", "fused tok/s", "reference tok/s",
           f"fused/ref (≥{KNNLM_MIN_SPEEDUP:g}×)", "target"]
    return ("## kNN-LM evaluation (issue #4)\n\n`knnfast.integrations.hf.evaluate_lm` (one forward pass per batch, exact "
            "search over a memmapped fp16 datastore, base/kNN/oracle perplexity), GPT-2-shaped model with random "
            "weights; reference = the same loop through `knnfast.reference`.\n\n" + table(hdr, out))


KD_MIN_SPEEDUP = 4.0          # knn_kd_loss fwd+bwd >= 4x the dense PyTorch path (issue 5)


def section_kd_loss(rows, targets):
    cells = by_cell(rows, "knn_kd_loss", lambda r: shape_key(r, ("T", "V", "k")), lambda r: r.impl)
    if not cells:
        return None
    out, t = [], []
    for (T, v, k), c in sorted(cells.items()):
        fused, ref = med(c, "fused"), med(c, "reference")
        sp = ratio(ref, fused)
        ok = None if sp is None else sp >= KD_MIN_SPEEDUP
        t.append(ok)
        mem = lambda impl: c[impl].info.get("peak_extra_mib", "—") if impl in c else "—"  # noqa: E731
        out.append((fmt_int(T), fmt_int(v), k, fmt_ms(fused), fmt_ms(ref), fmt_ratio(sp),
                    mem("fused"), mem("reference"), mark(ok)))
    targets.add(f"knn_kd_loss fwd+bwd: ≥ {KD_MIN_SPEEDUP:g}× the dense PyTorch path", t)
    hdr = ["T", "V", "k", "fused ms", "dense reference ms", f"ref/fused (≥{KD_MIN_SPEEDUP:g}×)",
           "fused peak extra MiB", "reference peak extra MiB", "target"]
    return ("## knn_kd_loss (issue #5)\n\nForward + backward of the kNN-KD loss (KL form, label smoothing "
            "0.1, τ = 100). Peak extra MiB = resident-set growth during the first call, the [T, V] "
            "logits gradient (the same for both) included; the reference also builds a dense [T, V] "
            "teacher.\n\n" + table(hdr, out))


KD_MIN_TRAIN_SPEED = 0.95     # kNN-KD updates/s >= 0.95x plain CE training (issue 5)


def section_kd_training(rows, targets):
    steps = by_cell(rows, "kd_train_step", lambda r: shape_key(r, ("batch", "V", "k")), lambda r: r.impl)
    builds = by_cell(rows, "teacher_build", lambda r: shape_key(r, ("positions", "k", "N")), lambda r: r.impl)
    if not steps and not builds:
        return None
    parts, t = ["## kNN-KD training (issue #5)", ""], []
    if steps:
        out = []
        for (b, v, k), c in sorted(steps.items()):
            per = lambda impl: None if impl not in c else c[impl].median / c[impl].info.get(  # noqa: E731
                "updates_per_call", 1)
            ce, kd = per("ce"), per("knn_kd")
            r = ratio(ce, kd)
            ok = None if r is None else r >= KD_MIN_TRAIN_SPEED
            t.append(ok)
            ups = lambda m: "—" if m is None else f"{1 / m:.2f}"  # noqa: E731
            out.append((b, fmt_int(v), k, fmt_ms(ce), fmt_ms(kd), ups(ce), ups(kd), fmt_ratio(r), mark(ok),
                        next(iter(c.values())).info.get("assets", "?")))
        hdr = ["sentences/batch", "V", "k", "CE step ms", "kNN-KD step ms", "CE updates/s", "kNN-KD updates/s",
               f"kNN-KD/CE speed (≥{KD_MIN_TRAIN_SPEED:g}×)", "target", "assets"]
        parts += ["One Adam update of the demo-size Marian: label-smoothed `F.cross_entropy` vs teacher "
                  "batch from the memmapped TeacherStore + `knnfast.knn_kd_loss` (LS-CE + KL, τ = 100).", "",
                  table(hdr, out), ""]
    if builds:
        out = []
        for (n, k, N), c in sorted(builds.items()):
            row = [fmt_int(n), k, fmt_int(N)]
            for impl in ("exact", "faiss"):
                m = med(c, impl)
                row += [fmt_ms(m), "—" if m is None else f"{n / m:,.0f}"]
            out.append(row + [next(iter(c.values())).info.get("assets", "?")])
        hdr = ["positions", "k", "datastore N", "exact ms", "exact positions/s", "FAISS IVF ms",
               "FAISS positions/s", "assets"]
        parts += ["TeacherStore.build (teacher-forced forward, search, lookup, fp16 write, reorder to corpus "
                  "order). Reported, no target.", "", table(hdr, out)]
    targets.add(f"kNN-KD training: ≥ {KD_MIN_TRAIN_SPEED:g}× plain CE updates/s", t)
    return "\n".join(parts)


INK_MIN_SPEEDUP = 2.0         # ink_loss fwd+bwd >= 2x the PyTorch reference (issue 6)


def section_ink_loss(rows, targets):
    cells = by_cell(rows, "ink_loss", lambda r: shape_key(r, ("T", "V", "D", "k")), lambda r: r.impl)
    if not cells:
        return None
    out, t = [], []
    for (T, v, d, k), c in sorted(cells.items()):
        fused, ref = med(c, "fused"), med(c, "reference")
        sp = ratio(ref, fused)
        ok = None if sp is None else sp >= INK_MIN_SPEEDUP
        t.append(ok)
        mem = lambda impl: c[impl].info.get("peak_extra_mib", "—") if impl in c else "—"  # noqa: E731
        out.append((fmt_int(T), fmt_int(v), d, k, fmt_ms(fused), fmt_ms(ref), fmt_ratio(sp),
                    mem("fused"), mem("reference"), mark(ok)))
    targets.add(f"ink_loss fwd+bwd: ≥ {INK_MIN_SPEEDUP:g}× the PyTorch reference", t)
    hdr = ["T", "V", "D", "k", "fused ms", "reference ms", f"ref/fused (≥{INK_MIN_SPEEDUP:g}×)",
           "fused peak extra MiB", "reference peak extra MiB", "target"]
    return ("## ink_loss (issue #6)\n\nForward + backward of L_a + 0.1·L_i + 0.1·L_r with gradients for hidden "
            "and the output weight. One [T, V] float32 buffer is "
            f"{4096 * 42024 * 4 / 2**20:.0f} MiB at the full shape; the fused path keeps only the logits (which "
            "become their own gradient).\n\n" + table(hdr, out))


def section_ink_refresh(rows, targets):
    cells = by_cell(rows, "ink_refresh", lambda r: shape_key(r, ("entries", "D")), lambda r: r.impl)
    if not cells:
        return None
    out = []
    for (n, d), c in sorted(cells.items()):
        fwd, ref = med(c, "forward_only"), med(c, "refresh")
        share = None if fwd is None or ref is None else (ref - fwd) / ref
        out.append((fmt_int(n), d, fmt_ms(ref), fmt_ms(fwd),
                    "—" if share is None else f"{100 * share:.1f}%",
                    "—" if share is None else ("forward-dominated" if share < 0.5 else "knnfast-dominated")))
    hdr = ["entries", "D", "refresh ms", "model forward only ms", "knnfast share", "verdict"]
    return ("## INK datastore refresh (issue #6)\n\nRe-encoding the datastore between INK epochs "
            "(`knnfast.integrations.hf.build_datastore`) against the teacher-forced forward passes alone over the same "
            "corpus; knnfast share = (refresh − forward) / refresh.\n\n" + table(hdr, out))


def section_scaleout(rows):
    """Issue 16: what the ranks measured themselves (extra_info), 1 vs 2 ranks."""
    search = {r.impl: r for r in rows if r.op == "distributed_search"}
    build = {r.impl: r for r in rows if r.op == "distributed_build"}
    if not search and not build:
        return None
    out = ["## Scale-out over torch.distributed (issue 16)", "",
           "gloo on 127.0.0.1, one CPU thread per rank, ranks forked by the benchmark; each rank "
           "times itself (minimum over repetitions) and rank 0's figures are shown. World 1 "
           "holds both shards of the datastore, world 2 one each.", ""]
    if search:
        any_row = next(iter(search.values()))
        n, d = any_row.shape.get("N"), any_row.shape.get("D")
        out.append(f"Exact search over N = {fmt_int(n)} fp16 keys, D = {d} "
                   "(search = local fused search + the one all_gather of [3, B, k] int64):")
        out.append("")
        hdr = ["B, k", "search ms, 1 rank", "search ms, 2 ranks", "speed-up",
               "all_gather ms (2 ranks)", "all_gather share"]
        one, two = search.get("world1"), search.get("world2")
        cells = []
        for key in sorted((one or two).info["rank_ms"], key=lambda s: tuple(map(int, s.split(",")))):
            a = one.info["rank_ms"][key]["search_ms"] if one else None
            b2 = two.info["rank_ms"].get(key, {}) if two else {}
            b, g = b2.get("search_ms"), b2.get("all_gather_ms")
            cells.append((key.replace(",", ", "), fmt_ms(a / 1e3) if a else "—",
                          fmt_ms(b / 1e3) if b else "—", fmt_ratio(ratio(a, b)),
                          fmt_ms(g / 1e3) if g is not None else "—",
                          f"{100 * g / b:.1f}%" if g is not None and b else "—"))
        out += [table(hdr, cells), ""]
    if build:
        any_row = next(iter(build.values()))
        sh = any_row.shape
        out.append(f"`hf.build_datastore` of a random GPT-2 (D = {sh.get('D')}) over "
                   f"{fmt_int(sh.get('sentences'))} sentences of {sh.get('length')} tokens:")
        out.append("")
        cells = [(w.replace("world", ""), fmt_int(r.info.get("entries")),
                  f"{r.info.get('seconds', 0):.2f}", fmt_int(round(r.info.get("entries_per_s", 0))))
                 for w, r in sorted(build.items())]
        out += [table(["ranks", "entries", "seconds", "entries/s"], cells), ""]
    return "\n".join(out)


KDLIN_MAX_VS_LINEAR = 1.25   # fused fwd+bwd <= 1.25x F.linear + knn_kd_loss (issue 18)
KDLIN_MIN_VS_DENSE = 1.3     # and >= 1.3x faster than the dense pure-PyTorch path
KDLIN_MAX_EXTRA_MIB = 66.0   # peak extra at T=8192, V=42024, D=512, k=64: 5% of one fp32 [T, V]
KDLIN_MEMORY_CELL = (8192, 42024, 512, 64)
KDLIN_IMPLS = ("fused", "linear+knn_kd_loss", "dense_reference")
KDLIN_VOCAB = "fused_vocab"  # the op's vocabulary strategy, when a pass measured it too


def _mib(x):
    """MiB without a sign on rounding noise (resident-set growth can come out a little < 0)."""
    return "0" if abs(x) < 0.5 else f"{x:,.0f}"


def section_kd_linear(rows):
    """Issue 18: knn_kd_linear_loss against F.linear + knn_kd_loss and the dense PyTorch path.
    Several passes of the suite may be given (``load_all``): times are the minimum over every
    timed round of every pass, peak memory the largest first-call growth of any pass."""
    cells = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.op == "knn_kd_linear_loss" and r.impl in KDLIN_IMPLS + (KDLIN_VOCAB,):
            cells[shape_key(r, ("T", "V", "D", "k"))][r.impl].append(r)
    if not cells:
        return None
    out, lin_ok, dense_ok, memory = [], [], [], None
    for key, c in sorted(cells.items()):
        T, v, d, k = key
        best = {i: min(x.min for x in rs) for i, rs in c.items()}
        peak = {i: max(x.info.get("peak_extra_mib", float("nan")) for x in rs) for i, rs in c.items()}
        grad = next(iter(c.values()))[0].info.get("grad_mib", float("nan"))
        f, lin, dense = (best.get(i) for i in KDLIN_IMPLS)
        vs_lin, vs_dense = ratio(f, lin), ratio(dense, f)
        voc = best.get(KDLIN_VOCAB)
        lin_ok.append(None if vs_lin is None else vs_lin <= KDLIN_MAX_VS_LINEAR)
        dense_ok.append(None if vs_dense is None else vs_dense >= KDLIN_MIN_VS_DENSE)
        if key == KDLIN_MEMORY_CELL and "fused" in peak:
            memory = (peak["fused"], grad)
        reps = "/".join(f"{len(c[i])}×{min(x.rounds for x in c[i])}" if i in c else "—"
                        for i in KDLIN_IMPLS + (KDLIN_VOCAB,))
        mib = lambda i: "—" if i not in peak else f"{peak[i]:,.0f}"  # noqa: E731
        out.append((fmt_int(T), fmt_int(v), k, fmt_ms(f), fmt_ms(voc), fmt_ms(lin), fmt_ms(dense),
                    f"{fmt_ratio(vs_lin)} {mark(lin_ok[-1])}", fmt_ratio(ratio(voc, lin)),
                    f"{fmt_ratio(vs_dense)} {mark(dense_ok[-1])}",
                    mib("fused"), _mib(peak.get("fused", float("nan")) - grad), mib(KDLIN_VOCAB),
                    mib("linear+knn_kd_loss"), mib("dense_reference"), f"{grad:,.0f}", reps))
    hdr = ["T", "V", "k", "fused ms", "vocab strategy ms", "F.linear + knn_kd_loss ms", "dense PyTorch ms",
           f"fused / linear (≤ {KDLIN_MAX_VS_LINEAR:g}×)", "vocab / linear",
           f"dense / fused (≥ {KDLIN_MIN_VS_DENSE:g}×)", "fused peak extra MiB", "fused minus gradients MiB",
           "vocab peak extra MiB", "linear peak extra MiB", "dense peak extra MiB", "gradients MiB",
           "passes × rounds (fused/linear/dense/vocab)"]
    verdicts = [_kdlin_verdict(f"fwd+bwd ≤ {KDLIN_MAX_VS_LINEAR:g}× F.linear + knn_kd_loss", lin_ok),
                _kdlin_verdict(f"fwd+bwd ≥ {KDLIN_MIN_VS_DENSE:g}× faster than the dense PyTorch path", dense_ok)]
    if memory is not None:
        total, grad = memory
        verdicts.append(f"- peak extra memory at T = 8,192, V = 42,024, D = 512, k = 64 ≤ "
                        f"{KDLIN_MAX_EXTRA_MIB:g} MiB: {total:,.0f} MiB in all, "
                        f"{mark(total <= KDLIN_MAX_EXTRA_MIB)}; {_mib(total - grad)} MiB beyond the {grad:,.0f} MiB "
                        f"of gradients every path returns, {mark(total - grad <= KDLIN_MAX_EXTRA_MIB)}")
    return ("## knn_kd_linear_loss (issue 18)\n\nForward + backward of the kNN-KD loss of hidden·Wᵀ + b "
            "(KL form, label smoothing 0.1, τ = 100, every 50th target ignored; D = 512, fp32): the fused op "
            "as called by default (strategy \"auto\": row chunks for the gradient of a mean; \"vocab strategy\": "
            "strategy=\"vocab\", vocabulary chunks, backward recomputes the logits) "
            "against F.linear + the fused `knn_kd_loss` (the [T, V] logits and their gradient) and against the "
            "dense pure-PyTorch path (F.linear + `reference.knn_kd_loss`). Times: minimum over every timed round "
            "of every pass (passes run one after another, each cell's three paths back to back). Peak extra MiB: "
            "growth of the peak resident set (VmHWM) over one forward + backward in a fresh process, after one "
            "call on a small shape (one-time library state) and with glibc's mmap threshold fixed at 64 KiB, so "
            "freed buffers leave the process (largest over passes); the gradients of hidden, weight and bias "
            "included.\n\n" + table(hdr, out) + "\n\nIssue 18's \"Must hold\" targets:\n\n"
            + "\n".join(verdicts) + _ink_after_issue18(rows))


def _ink_after_issue18(rows):
    """ink_loss rows run with the kd_linear passes: INK's L_a + α·L_i moved onto
    knn_kd_linear_loss in issue 18 (the issue-6 section above measured the one-buffer path)."""
    cells = by_cell(rows, "ink_loss", lambda r: shape_key(r, ("T", "V", "D", "k")), lambda r: r.impl)
    if not cells:
        return ""
    out = []
    for (T, v, d, k), c in sorted(cells.items()):
        best = {i: r.min for i, r in c.items()}
        mib = lambda i: "—" if i not in c else f"{c[i].info.get('peak_extra_mib', float('nan')):,.0f}"  # noqa: E731
        sp = ratio(best.get("reference"), best.get("fused"))
        out.append((fmt_int(T), fmt_int(v), d, k, fmt_ms(best.get("fused")), fmt_ms(best.get("reference")),
                    f"{fmt_ratio(sp)} {mark(None if sp is None else sp >= INK_MIN_SPEEDUP)}",
                    mib("fused"), mib("reference")))
    hdr = ["T", "V", "D", "k", "fused ms (min)", "reference ms (min)", f"ref/fused (≥ {INK_MIN_SPEEDUP:g}×)",
           "fused peak extra MiB", "reference peak extra MiB"]
    return ("\n\n`ink_loss` after issue 18 (L_a + α·L_i through `knn_kd_linear_loss`, no [T, V] tensor; "
            "`benchmarks/bench_ink_loss.py` in the same session):\n\n" + table(hdr, out))


def _kdlin_verdict(name, oks):
    known = [o for o in oks if o is not None]
    if not known:
        return f"- {name}: not measured"
    held = sum(known)
    return f"- {name}: holds in {held} of {len(known)} cells" + ("" if held == len(known) else " (**FAIL**)")


def render(json_paths):
    if isinstance(json_paths, (str, Path)):
        json_paths = [json_paths]
    data, rows, skipped = load(json_paths)
    machine, quick = machine_section(data, rows)
    quick = quick or any(r.info.get("quick") for r in rows)
    run_dt = data.get("datetime", "?")
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    targets = Targets()

    sections = [
        section_interpolate(rows, targets),
        section_gold(rows, targets),
        section_search(rows, targets),
        section_simple(rows, "knn_rescore", "knn_rescore",
                       "Exact scores of given candidate ids (B×k gathers from N keys).", ("B", "k", "N", "D")),
        section_simple(rows, "knn_probs", "knn_probs (dense)",
                       "Dense M·softmax(scores/τ) → [B, V].", ("B", "V", "k")),
        section_simple(rows, "knn_probs_sparse", "knn_probs_sparse",
                       "Duplicates merged → (tokens [B, k], probs [B, k]).", ("B", "V", "k")),
        section_simple(rows, "label_counts", "label_counts",
                       "Distinct valid tokens among the first j+1 neighbours.", ("B", "k")),
        section_decoding(rows, targets),
        section_knn_lm(rows, targets),
        section_kd_loss(rows, targets),
        section_kd_training(rows, targets),
        section_ink_loss(rows, targets),
        section_ink_refresh(rows, targets),
        section_scaleout(rows),
        section_cuda(rows),
        ptxas_section(),
    ]
    sections = [s for s in sections if s]

    head = ["# knnfast benchmark results", ""]
    if quick:
        head += ["> **QUICK smoke run** (`KNNFAST_BENCH_QUICK=1`): every shape is shrunk, so the numbers and the "
                 "pass/fail marks below say nothing about the issue's targets; they only check that the suites "
                 "and this report work.", ""]
    rounds = [r.rounds for r in rows]
    head += [
        f"- benchmark run: {run_dt}",
        f"- report written: {now} by `benchmarks/write_results.py {' '.join(Path(p).name for p in json_paths)}`",
        f"- {len(rows)} benchmark rows"
        + (f" ({min(rounds)}–{max(rounds)} timed rounds each)" if rounds else "")
        + (f"; {skipped} rows without knnfast extra_info ignored" if skipped else ""),
        "- all times are medians in milliseconds (pytest-benchmark pedantic rounds after an untimed first call); "
        + ("ratios are ratios of medians measured in the same run" if len(json_paths) == 1 else
           f"ratios are ratios of medians; rows merged from {len(json_paths)} runs (later files win)"),
        "- reproduce: `make bench` (or `python -m pytest benchmarks --benchmark-json benchmarks/results.json && "
        "python benchmarks/write_results.py benchmarks/results.json`)",
        "",
    ]
    missing = [name for name, _, n in targets.items if n == 0]
    body = [machine, targets.section()] + sections
    if missing:
        body.insert(2, "Targets marked *not measured* had no benchmark rows (implementation skipped or not run).")
    return "\n".join(head) + "\n" + "\n\n".join(body) + "\n"


# Sections appended by other tools (benchmarks/compare.py: before/after checks on one machine)
# start with this marker; regenerating the file keeps them.
APPENDED = "<!-- appended:"


def kept_sections(path: Path) -> str:
    """The appended sections of the existing report, from the first marker to the end."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(APPENDED)
    return "" if at < 0 else "\n" + text[at:]


# Suites measured on their own (another day or machine than the main tables): their section
# is appended after the marker, with the run's machine and date, replacing an older one.
APPENDABLE = {"scaleout": section_scaleout, "kd_linear": section_kd_linear}


SUITES = {"scaleout": "bench_distributed.py", "kd_linear": "bench_knn_kd_linear_loss.py"}


def appended_section(name, json_paths):
    """``## ...`` of suite ``name`` from its own run, headed by that run's CPU and date."""
    data, rows = load_all(json_paths)   # repeated passes of one suite are all kept
    text = APPENDABLE[name](rows)
    if text is None:
        raise SystemExit(f"write_results: no {name} rows in {', '.join(map(str, json_paths))}")
    info = (data.get("machine_info") or {}).get("knnfast") or {}
    title, _, rest = text.partition("\n")
    where = (f"Measured {data.get('datetime', '?')[:16].replace('T', ' ')} UTC on "
             f"{info.get('cpu_model', '?')} ({info.get('cpu_count', '?')} cores, "
             f"{', '.join(info.get('cpu_flags', []))}), torch {info.get('torch_version', '?')}; "
             f"`python -m pytest benchmarks/{SUITES[name]} --benchmark-json J && "
             f"python benchmarks/write_results.py --appended {name} J [J2 ...]`.")
    return f"{APPENDED} write_results.py --appended {name} -->\n{title}\n\n{where}\n{rest}\n"


def replace_appended(report: str, name: str, section: str) -> str:
    """``report`` with the appended section ``name`` replaced (or added at the end)."""
    marker = f"{APPENDED} write_results.py --appended {name} -->"
    at = report.find(marker)
    if at < 0:
        return report.rstrip("\n") + "\n\n" + section
    end = report.find(APPENDED, at + len(marker))
    return report[:at] + section + ("\n" + report[end:] if end >= 0 else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+",
                   help="pytest-benchmark JSON file(s) (--benchmark-json output); later files override "
                        "earlier ones for the same benchmark")
    p.add_argument("--out", default=str(HERE / "RESULTS.md"), help="markdown file to write (default: %(default)s)")
    p.add_argument("--appended", choices=sorted(APPENDABLE),
                   help="only (re)write this suite's appended section, from its own run")
    args = p.parse_args(argv)
    if args.appended:
        out = Path(args.out)
        md = replace_appended(out.read_text() if out.exists() else "", args.appended,
                              appended_section(args.appended, args.json))
        out.write_text(md)
        print(f"wrote the {args.appended} section of {args.out}")
        return 0
    md = render(args.json) + kept_sections(Path(args.out))
    Path(args.out).write_text(md)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
