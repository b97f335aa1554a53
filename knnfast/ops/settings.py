"""Process-wide settings of the kernels: the one table of knnfast's environment variables.

| variable                 | read                     | effect                                              |
|--------------------------|--------------------------|-----------------------------------------------------|
| ``KNNFAST_CUDA_CHECKS``  | once, at ``import knnfast`` | ``0``: CUDA ops skip reading their value-check status back (no host sync per call; bad values then go unreported, never out of bounds). Default ``1``. |
| ``KNNFAST_DEBUG``        | once, at ``import knnfast`` | ``1``: the bf16 CPU search prints its candidate counts to stderr. Default ``0``. |
| ``KNNFAST_SIMD``         | once, when the library loads | ``generic``: the CPU kernels use the portable code instead of AVX-512. |
| ``KNNFAST_LIBRARY``      | once, when the library loads | path of another build of the compiled library to load instead of ``knnfast/_C*.so`` (``make sanitize`` loads its ASan/UBSan build this way). |
| ``KNNFAST_CUDA``, ``KNNFAST_BUILD_TYPE``, ``MAX_JOBS`` | at build time (setup.py) | build switches, see README. |
| ``KNNFAST_BENCH_QUICK``, ``KNNFAST_DEMO_CACHE`` | by the benchmark suites (benchmarks/), never by the library | shrink every benchmark shape; where the demo's cached model lives. |

Kernel variants are not settings: they are the ``plan=`` argument of the ops that have more
than one (``knn_search``, ``knn_interpolate``). Change a setting at run time with
:func:`configure` or, scoped, :func:`override`::

    >>> with override(debug=False):
    ...     pass
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, Iterator

from .library import OPS

#: setting -> (environment variable, default)
SETTINGS = {"cuda_checks": ("KNNFAST_CUDA_CHECKS", True), "debug": ("KNNFAST_DEBUG", False)}


def configure(name: str, value: bool) -> bool:
    """Set a process-wide kernel setting; returns the previous value."""
    if name not in SETTINGS:
        raise ValueError(f"configure: name must be one of {tuple(SETTINGS)}, got {name!r}")
    return bool(OPS.configure(name, int(bool(value))))


@contextlib.contextmanager
def override(**values: bool) -> Iterator[None]:
    """Temporarily change settings, e.g. ``with override(cuda_checks=False): ...``."""
    previous: Dict[str, bool] = {}
    try:
        for name, value in values.items():
            previous[name] = configure(name, value)
        yield
    finally:
        for name, value in previous.items():
            configure(name, value)


def env_flag(variable: str, default: bool) -> bool:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    return raw not in ("0", "false", "False", "no", "off")


def configure_from_environment() -> None:
    for name, (variable, default) in SETTINGS.items():
        configure(name, env_flag(variable, default))


configure_from_environment()
