"""Loads the compiled library (knnfast/_C*.so, or the file named by KNNFAST_LIBRARY) once and
exposes its raw ops as ``OPS`` (= ``torch.ops.knnfast``), plus ``build_info()``; checks the
running torch against the supported range and the one the library was built against
(``compat``)."""
from __future__ import annotations

import glob
import os

import torch

from .compat import REBUILD, check_supported, warn_on_mismatch

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: another build of the library to load instead of knnfast/_C*.so (`make sanitize` uses it)
LIBRARY_VARIABLE = "KNNFAST_LIBRARY"


def library_path() -> str:
    override = os.environ.get(LIBRARY_VARIABLE, "").strip()
    if override:
        if not os.path.isfile(override):
            raise ImportError(f"knnfast: {LIBRARY_VARIABLE}={override!r} is not a file")
        return override
    candidates = sorted(glob.glob(os.path.join(PACKAGE_DIR, "_C*.so")))
    if not candidates:
        raise ImportError(
            "knnfast: the compiled library (knnfast/_C*.so) is missing; build it with "
            "`pip install --no-build-isolation -e .` (or `make build`)"
        )
    return candidates[0]


def load_library() -> None:
    path = library_path()
    try:
        torch.ops.load_library(path)
    except OSError as e:  # typically undefined torch symbols: built against another torch
        raise ImportError(
            f"knnfast: cannot load {path} under torch {torch.__version__} ({e}); it was most "
            f"likely built against another torch. Rebuild it in this environment: {REBUILD}"
        ) from e


#: knn_search CPU plans chosen by measurement in this process, bucket -> plan
#: (knnfast/ops/plan_choice.py fills it; build_info() reports it)
CHOSEN_CPU_PLANS: dict = {}


def cpu_model() -> str:
    """The CPU's marketing name ("model name" in /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine() or "unknown"


def parse_build_info(raw: str) -> dict:
    """The library's "key=value;..." string as a dict of strings."""
    return dict(item.partition("=")[::2] for item in raw.split(";"))


check_supported(torch.__version__)
load_library()
OPS = torch.ops.knnfast
warn_on_mismatch(parse_build_info(OPS.build_info()).get("built_with_torch", ""),
                 torch.__version__)


def build_info() -> dict:
    """How knnfast was built and what it will use here.

    Keys: version, torch_version (the torch running now), built_with_torch (the torch the
    library was compiled against; "unknown" for a library older than this key; import warns
    when the two releases differ), cuda_compiled (CUDA kernels built in), cuda_available,
    openmp, openmp_threads, simd ("avx512" or "generic" for the CPU kernels), avx512_bf16
    (bf16 dot products available to the bf16 GEMM search path), max_k (the largest k the
    kernels accept), cpu_plans (the knn_search plans this CPU can run), cpu_model, isa (the
    x86 extensions present among avx512f, avx512_bf16, avx512_vnni, avx512_fp16, amx_tile,
    amx_bf16, amx_fp16), cpu_plans_chosen (bucket -> plan: the measured choices of plan="auto" so far,
    see knnfast/ops/plan_choice.py).
    """
    info = parse_build_info(OPS.build_info())
    info.setdefault("built_with_torch", "unknown")
    for key in ("cuda_compiled", "openmp", "avx512_bf16"):
        info[key] = info.get(key) == "1"
    info["openmp_threads"] = int(info.get("openmp_threads", "0"))
    if "max_k" in info:
        info["max_k"] = int(info["max_k"])
    for key in ("cpu_plans", "isa"):
        if key in info:
            info[key] = tuple(p for p in info[key].split(",") if p)
    info["cpu_model"] = cpu_model()
    info["cpu_plans_chosen"] = dict(CHOSEN_CPU_PLANS)
    info["torch_version"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info
