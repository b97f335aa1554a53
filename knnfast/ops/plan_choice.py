"""knn_search on CPU, plan="auto": the plan chosen by measurement instead of a fixed batch rule.

Every CPU plan is exact, so the choice changes only the speed, never a result. Which plan is
fastest depends on the CPU (AMX makes bf16_gemm win big batches; on a CPU without it gemm_f32
or bf16 win), the key dtype and the shape, so on first use per bucket

    (CPU model and ISA, key dtype, D, N, B, k rounded up to powers of two, threads)

a short calibration times every eligible plan on the first 32,768 keys (512 k for large k;
each plan run once to warm up, then the best of 3 to 9 runs; about 2 s per bucket at
B = 640, D = 1,024, less for smaller batches, once per machine) and keeps the fastest.
Choices live in memory and in a JSON file (``KNNFAST_PLAN_CACHE``, default
``$XDG_CACHE_HOME/knnfast/plans.json`` or ``~/.cache/knnfast/plans.json``; written atomically,
a corrupt or unreadable file is ignored with a warning). They are listed in
``build_info()["cpu_plans_chosen"]``.

The fixed rule in C++ (csrc/cpu/knn_search_cpu.cpp) is used instead when calibration is off
(``KNNFAST_CALIBRATE=0`` at import, ``set_calibration(False)`` or, scoped,
``with calibration(False):``: reproducible benchmarks), under
torch.compile or for tensor subclasses (fake tensors: nothing to time), off the CPU, and for
searches too small to be worth a measurement.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import threading
import time
import warnings
from typing import Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import settings
from .library import CHOSEN_CPU_PLANS, OPS, build_info, cpu_model

CACHE_VARIABLE = "KNNFAST_PLAN_CACHE"
CALIBRATE_VARIABLE = "KNNFAST_CALIBRATE"
CACHE_VERSION = 1
#: searches with fewer multiply-adds (B * N * D) keep the fixed rule: they take a few ms at most
MIN_WORK = 1 << 27
#: the stream plan rereads every key per block of queries: never the fastest beyond this batch
STREAM_MAX_BATCH = 256

_lock = threading.Lock()
_loaded_from: Optional[str] = None
_enabled = settings.env_flag(CALIBRATE_VARIABLE, True)


def set_calibration(enabled: bool) -> bool:
    """Turns the measurement on or off for the process; returns the previous state."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


@contextlib.contextmanager
def calibration(enabled: bool) -> Iterator[None]:
    """``with calibration(False): ...`` runs a block on the fixed rule."""
    previous = set_calibration(enabled)
    try:
        yield
    finally:
        set_calibration(previous)


def cache_path() -> str:
    override = os.environ.get(CACHE_VARIABLE, "").strip()
    if override:
        return override
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache")
    return os.path.join(base, "knnfast", "plans.json")


def bucket(n: int) -> int:
    """n rounded up to a power of two."""
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=1)
def machine_key() -> str:
    """CPU model and ISA flags: fixed for the process, and build_info() costs ~80 us, too
    much to pay on every decoding step."""
    return "|".join((cpu_model(), "+".join(build_info()["isa"])))


def bucket_key(queries: Tensor, keys: Tensor, k: int) -> str:
    return "|".join((machine_key(), str(keys.dtype).replace("torch.", ""),
                     f"D{bucket(queries.shape[1])}", f"N{bucket(keys.shape[0])}",
                     f"B{bucket(queries.shape[0])}",
                     f"k{bucket(k)}", f"t{torch.get_num_threads()}"))


def eligible_plans(batch: int) -> Tuple[str, ...]:
    plans = [p for p in build_info()["cpu_plans"] if p != "auto"]
    if batch > STREAM_MAX_BATCH:
        plans.remove("stream")
    return tuple(plans)


def sample_size(N: int, k: int) -> int:
    """Keys to time on: well past the start of a scan, where every plan keeps nearly every key
    while its k-th best is still poor and fixed costs weigh most. Smaller samples misled:
    on an AMD EPYC (Zen 4) at N = 1M, D = 1,024, samples of 2,048-4,096 keys picked stream or
    gemm_f32 at B = 16 (~370 ms; bf16: 149 ms) and gemm_f32 at B = 160, k = 64 (1.9 s;
    bf16: 0.66 s); a line through two samples (8k, 32k keys) picked bf16_gemm at B = 1
    (200 ms; stream: 64 ms), its slope lost in the timing noise."""
    return min(N, max(32768, 512 * k))


def calibrate(queries: Tensor, keys: Tensor, k: int, metric: str) -> Tuple[str, Dict[str, float]]:
    """Times every eligible plan on the first sample_size() keys; returns the fastest and the
    times in ms."""
    sample = keys[: sample_size(keys.shape[0], k)].contiguous()
    times = {plan: round(time_plan(queries, sample, k, metric, plan), 3)
             for plan in eligible_plans(queries.shape[0])}
    return min(times, key=times.get), times


def time_plan(queries: Tensor, keys: Tensor, k: int, metric: str, plan: str) -> float:
    """The best timed run of one plan after a warm-up run (oneDNN JIT), in ms: at least 3
    runs, more (up to 9) while they add up to less than 0.2 s. Short runs vary most (bf16 at
    B = 16 on 32k keys: 8-18 ms from one run to the next on a 2-core EPYC)."""
    OPS.knn_search(queries, keys, k, metric, None, None, plan)
    best, spent, runs = float("inf"), 0.0, 0
    while runs < 3 or (spent < 0.2 and runs < 9):
        start = time.perf_counter()
        OPS.knn_search(queries, keys, k, metric, None, None, plan)
        took = time.perf_counter() - start
        best, spent, runs = min(best, took), spent + took, runs + 1
    return best * 1e3


def read_cache(path: str) -> Dict[str, dict]:
    """The cache file's choices; {} (with a warning) when it is missing parts or corrupt."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            raise ValueError(f"not a version {CACHE_VERSION} plan cache")
        choices = data.get("choices")
        if not isinstance(choices, dict):
            raise ValueError("no 'choices' object")
        return {key: entry for key, entry in choices.items()
                if isinstance(entry, dict) and isinstance(entry.get("plan"), str)}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"knnfast: ignoring the knn_search plan cache {path} ({e}); plans will "
                      f"be measured again", RuntimeWarning, stacklevel=4)
        return {}


def write_cache(path: str, key: str, entry: dict) -> None:
    """Adds one choice to the file: read, merge, write a temporary file, rename (atomic: a
    reader never sees half a file). Two processes writing at once can drop each other's new
    entry, never corrupt the file; a dropped entry is measured again."""
    choices = read_cache(path)
    choices[key] = entry
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=".plans.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"version": CACHE_VERSION, "choices": choices}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"knnfast: cannot write the knn_search plan cache {path} ({e}); the "
                      f"choice is kept in memory only", RuntimeWarning, stacklevel=4)


def load_choices() -> None:
    """Reads the cache file into memory once per path (under _lock)."""
    global _loaded_from
    path = cache_path()
    if _loaded_from == path:
        return
    runnable = set(build_info()["cpu_plans"])
    for key, entry in read_cache(path).items():
        if entry["plan"] in runnable:
            CHOSEN_CPU_PLANS.setdefault(key, entry["plan"])
    _loaded_from = path


def forget_choices() -> None:
    """Drops the in-memory choices (tests; the file stays)."""
    global _loaded_from
    with _lock:
        CHOSEN_CPU_PLANS.clear()
        _loaded_from = None


def wants_measurement(queries: Tensor, keys: Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_scripting():
        return False
    if type(queries) is not Tensor or type(keys) is not Tensor:  # fake / functional tensors
        return False
    if queries.device.type != "cpu" or keys.device.type != "cpu" or queries.dim() != 2:
        return False
    return _enabled


def choose(queries: Tensor, keys: Tensor, k: int, metric: str) -> str:
    """The plan knn_search runs for plan="auto" ("auto" = the C++ fixed rule)."""
    if not wants_measurement(queries, keys):
        return "auto"
    B, D = queries.shape
    if B * keys.shape[0] * D < MIN_WORK or keys.dim() != 2 or keys.shape[1] != D:
        return "auto"  # small (or malformed: C++ reports it) searches keep the fixed rule
    key = bucket_key(queries, keys, k)
    with _lock:  # one calibration per bucket, even with several threads searching
        load_choices()
        if key not in CHOSEN_CPU_PLANS:
            q = queries.float().contiguous()
            plan, times = calibrate(q, keys, k, metric)
            CHOSEN_CPU_PLANS[key] = plan
            write_cache(cache_path(), key, {"plan": plan, "times_ms": times,
                                            "measured": time.strftime("%Y-%m-%d")})
        return CHOSEN_CPU_PLANS[key]
