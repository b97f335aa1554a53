"""Shared machinery for the knnfast pytest-benchmark suites (benchmarks/bench_<op>.py).

Run:
    python -m pytest benchmarks --benchmark-json benchmarks/results.json
    python benchmarks/write_results.py benchmarks/results.json     # -> benchmarks/RESULTS.md
Smoke test (every shape shrunk, whole suite < 1 minute):
    KNNFAST_BENCH_QUICK=1 python -m pytest benchmarks -q

Collection: the suites are named bench_*.py, which pytest's default `python_files`
pattern never collects. This conftest collects them, and only when the benchmarks/
directory (or a file in it) was named on the command line, so `pytest tests` or a
bare `pytest` at the repository root never runs a benchmark.

Every benchmark goes through the `kb` fixture:
    out = kb.run(fn, op=..., impl=..., shape={...}, dtype=..., **extra_info)
It makes one untimed call (warm-up, memory high-water mark when asked, result
returned to the caller for recall checks), chooses rounds/iterations from that
call's duration and a per-cell time budget, then times `fn` with
benchmark.pedantic. extra_info carries op/impl/shape/dtype so that
write_results.py can pair the fused, reference, FAISS and copy rows of one cell.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")

# Time spent timing one cell (beyond the untimed first call). Cells slower than
# budget / MIN_ROUNDS still get MIN_ROUNDS rounds.
BUDGET_S = 0.1 if QUICK else 3.0
MIN_ROUNDS = 3
MAX_ROUNDS = 200 if QUICK else 1000
# A round shorter than this is made of several iterations (timer resolution).
MIN_ROUND_S = 1e-3


# --------------------------------------------------------------------------- collection


def _bench_dir_requested(config) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        p = Path(str(arg).split("::", 1)[0])
        if not p.is_absolute():
            p = base / p
        try:
            p = p.resolve()
        except OSError:
            continue
        if p == HERE or HERE in p.parents:
            return True
    return False


def pytest_collect_file(file_path, parent):
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        # named explicitly on the command line: pytest's own python plugin collects it
        return None
    if not _bench_dir_requested(parent.config):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "knnfast_bench: a knnfast pytest-benchmark suite (benchmarks/bench_*.py)"
    )


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.knnfast_bench)


# --------------------------------------------------------------------------- implementations

# The benchmarks compare the built extension with its reference twin: a missing build or
# op is an error here (a skipped cell would leave a hole in RESULTS.md), not a skip.
import knnfast  # noqa: E402
from knnfast import reference as _reference  # noqa: E402


def fused_op(name):
    return getattr(knnfast, name)


def reference_op(name):
    return getattr(_reference, name)


# --------------------------------------------------------------------------- memory


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the fixture


class KnnBench:
    """Wraps pytest-benchmark's fixture with the knnfast bookkeeping."""

    quick = QUICK

    def __init__(self, benchmark):
        self.benchmark = benchmark

    fused = staticmethod(fused_op)
    reference = staticmethod(reference_op)

    def op(self, name, impl):
        """The callable for `impl` in {"fused", "fused_out", "reference"} (others: None)."""
        if impl.startswith("fused"):
            return fused_op(name)
        if impl == "reference":
            return reference_op(name)
        return None

    def run(
        self,
        fn,
        *,
        op,
        impl,
        shape,
        dtype,
        group=None,
        measure_memory=False,
        single_round_above_s=None,
        budget_s=None,
        min_rounds=MIN_ROUNDS,
        **extra,
    ):
        """Time `fn()`; returns the result of the untimed first call.

        single_round_above_s: if the first call took at least this long, time one
        round with no warm-up (the first call was the warm-up).
        """
        import torch

        bm = self.benchmark
        shape = {k: int(v) for k, v in shape.items()}
        info = {
            "op": op,
            "impl": impl,
            "shape": shape,
            "dtype": str(dtype).replace("torch.", ""),
            "device": "cpu",
            "quick": QUICK,
            "torch_threads": torch.get_num_threads(),
        }
        info.update(extra)
        if group is None:
            group = op + " " + " ".join(f"{k}={v}" for k, v in shape.items())
            for key in ("variant", "metric"):
                if key in extra:
                    group += f" {key}={extra[key]}"
        bm.group = group
        bm.extra_info.update(info)

        gc.collect()
        mem_ok = False
        if measure_memory:
            rss0 = status_kib("VmRSS")
            mem_ok = rss0 is not None and reset_peak_rss()
        t0 = time.perf_counter()
        result = fn()
        t_first = time.perf_counter() - t0
        if mem_ok:
            hwm = status_kib("VmHWM")
            bm.extra_info["peak_extra_mib"] = round(max(0, hwm - rss0) / 1024.0, 1)
        bm.extra_info["first_call_s"] = round(t_first, 6)

        t = t_first
        if t < 0.1:  # the first call may include one-time costs: time a second one
            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        budget = BUDGET_S if budget_s is None else budget_s

        if single_round_above_s is not None and t >= single_round_above_s:
            rounds, warmup, iterations = 1, 0, 1
        else:
            iterations = 1 if t >= MIN_ROUND_S else min(1000, max(1, math.ceil(MIN_ROUND_S / max(t, 1e-7))))
            per_round = t * iterations
            rounds = int(min(MAX_ROUNDS, max(min_rounds, math.ceil(budget / per_round))))
            warmup = 1 if per_round < 0.5 else 0
        bm.extra_info["rounds"] = rounds
        bm.extra_info["iterations"] = iterations
        bm.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=iterations)
        return result


@pytest.fixture
def kb(benchmark):
    return KnnBench(benchmark)


@pytest.fixture(autouse=True)
def _no_grad():
    import torch

    with torch.no_grad():
        yield


# --------------------------------------------------------------------------- machine info


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def _mem_total_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def knnfast_machine_info():
    import torch

    info = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "mem_total_gib": _mem_total_gib(),
        "python": sys.version.split()[0],
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "quick": QUICK,
    }
    try:
        import faiss

        info["faiss_version"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except Exception as e:
        info["faiss_version"] = f"unavailable ({type(e).__name__})"
    info["knnfast_build_info"] = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                                  for k, v in knnfast.build_info().items()}
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["knnfast"] = knnfast_machine_info()
