"""Register / spill / shared-memory report of the CUDA kernels, from the ptxas output that
`make cuda-check` writes to build/cuda-check.log (nvcc -Xptxas -v, sm_80 and sm_90).

    python benchmarks/ptxas_report.py [build/cuda-check.log] [--update benchmarks/RESULTS.md]

Prints a markdown section; with --update it replaces the section between the
<!-- ptxas --> markers of RESULTS.md (or appends it). write_results.py includes the same
section whenever the log exists.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_LOG = REPO / "build" / "cuda-check.log"
BEGIN, END = "<!-- ptxas -->", "<!-- /ptxas -->"


def _demangle(names):
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def _short(name):
    name = name.replace("(anonymous namespace)::", "").replace("knnfast::cuda::", "")
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "f16")


def parse(log_path):
    rows, source, arch, entry = [], "?", "?", None
    spills = (0, 0)
    for line in Path(log_path).read_text().splitlines():
        m = re.match(r"== (\S+) (sm_\d+)", line)
        if m:
            source, arch = Path(m.group(1)).name, m.group(2)
            continue
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            entry = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            spills = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", line)
        if m and entry:
            rows.append(dict(source=source, arch=arch, entry=entry, regs=int(m.group(1)),
                             smem=int(m.group(2) or 0), spill_st=spills[0], spill_ld=spills[1]))
            entry, spills = None, (0, 0)
    names = _demangle(sorted({r["entry"] for r in rows}))
    for r in rows:
        r["kernel"] = _short(names.get(r["entry"], r["entry"]))
    return rows


def render(log_path=DEFAULT_LOG):
    if not Path(log_path).exists():
        return None
    rows = [r for r in parse(log_path) if not r["source"].endswith("_check.cu")]
    if not rows:
        return None
    lines = [BEGIN, "## CUDA kernels: registers and spills (compile-only, `make cuda-check`)", "",
             "nvcc 13 `-O3 -Xptxas -v`; static shared memory only (dynamic shared memory is "
             "sized at launch). Max registers over template instances per kernel and arch.", "",
             "| source | kernel | sm_80 regs | sm_90 regs | spill bytes (st/ld) | static smem |",
             "|---|---|---|---|---|---|"]
    agg = {}
    for r in rows:
        base = re.sub(r"<.*", "", r["kernel"])
        a = agg.setdefault((r["source"], base), {"sm_80": 0, "sm_90": 0, "spill": [0, 0], "smem": 0, "n": 0})
        a[r["arch"]] = max(a.get(r["arch"], 0), r["regs"])
        a["spill"][0] = max(a["spill"][0], r["spill_st"])
        a["spill"][1] = max(a["spill"][1], r["spill_ld"])
        a["smem"] = max(a["smem"], r["smem"])
        a["n"] += 1
    for (source, kernel), a in sorted(agg.items()):
        inst = f" ({a['n'] // 2} instances)" if a["n"] > 2 else ""
        lines.append(f"| {source} | `{kernel}`{inst} | {a['sm_80']} | {a['sm_90']} | "
                     f"{a['spill'][0]}/{a['spill'][1]} | {a['smem']} B |")
    lines.append(END)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", nargs="?", default=str(DEFAULT_LOG))
    p.add_argument("--update", help="RESULTS.md to update in place")
    args = p.parse_args()
    section = render(args.log)
    if section is None:
        raise SystemExit(f"no ptxas report in {args.log}; run `make cuda-check` first")
    if not args.update:
        print(section)
        return
    path = Path(args.update)
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
