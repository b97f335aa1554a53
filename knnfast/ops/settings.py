"""Process-wide settings of the kernels: the one table of knnfast's environment variables.

| variable                 | read                     | effect                                              |
|--------------------------|--------------------------|-----------------------------------------------------|
| ``KNNFAST_CUDA_CHECKS``  | once, at ``import knnfast`` | how CUDA ops report bad values (never out of bounds): ``auto`` (default; also ``1``): each op raises at once, except inside knnfast's decoding loops (``deferred_checks``); ``sync``: every op raises at once, loops included (debugging); ``deferred``: never at the call, only from ``check_cuda_errors``; ``off`` (``0``): never. |
| ``KNNFAST_DEBUG``        | once, at ``import knnfast`` | ``1``: the bf16 CPU search checks every approximate rank against its float64 value (RuntimeError if a bound fails; slow) and prints its candidate counts to stderr. Default ``0``. |
| ``KNNFAST_CALIBRATE``    | once, at ``import knnfast`` | ``0``: ``knn_search(plan="auto")`` on CPU keeps the fixed batch rule instead of timing the plans once per shape bucket (reproducible benchmarks; at run time ``knnfast.ops.plan_choice.set_calibration`` / ``calibration``). Default ``1``. |
| ``KNNFAST_PLAN_CACHE``   | at each first choice per bucket | JSON file of the measured CPU plan choices (``knnfast/ops/plan_choice.py``). Default ``$XDG_CACHE_HOME/knnfast/plans.json``, else ``~/.cache/knnfast/plans.json``. |
| ``KNNFAST_SIMD``         | once, when the library loads | ``generic``: the CPU kernels use the portable code instead of AVX-512. |
| ``KNNFAST_LIBRARY``      | once, when the library loads | path of another build of the compiled library to load instead of ``knnfast/_C*.so`` (``make sanitize`` loads its ASan/UBSan build this way). |
| ``KNNFAST_CUDA``, ``KNNFAST_BUILD_TYPE``, ``MAX_JOBS`` | at build time (setup.py) | build switches, see README. |
| ``KNNFAST_BENCH_QUICK``, ``KNNFAST_DEMO_CACHE`` | by the benchmark suites (benchmarks/), never by the library | shrink every benchmark shape; where the demo's cached model lives. |

Kernel variants are not settings: they are the ``plan=`` argument of the ops that have more
than one (``knn_search``, ``knn_interpolate``). Change a setting at run time with
:func:`configure` or, scoped, :func:`override`::

    >>> with override(debug=False):
    ...     pass

CUDA value checks. A CUDA op that reads its status back waits for its kernels: one host sync
per op, two or more per decoding step. Under ``deferred_checks()`` (which ``generate`` and
``evaluate_lm`` use, and hand-written loops can) the ops of a loop record bad values into one
buffer per device and never wait; leaving the block reads it once and raises the first bad
value found (``check_cuda_errors``), so a loop costs one sync, and a step can be captured in
a CUDA graph::

    >>> with deferred_checks():
    ...     pass                        # decoding steps: no host sync from knnfast's checks
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, Optional, Union

import torch

from .library import OPS

#: setting -> (environment variable, default)
SETTINGS = {"cuda_checks": ("KNNFAST_CUDA_CHECKS", "auto"), "debug": ("KNNFAST_DEBUG", False)}
#: cuda_checks modes -> the C++ setting (common/settings.h: 0 off, 1 per call, 2 deferred);
#: "auto" is per call outside deferred_checks() and deferred inside
CUDA_CHECKS = {"off": 0, "sync": 1, "auto": 1, "deferred": 2}
#: what each slot of the status buffer reports (csrc/cuda/kernel_args.h, StatusCode order)
STATUS_CODES = ("tokens with an id outside their range", "NaN or +inf neighbour scores",
                "NaN or +inf neighbour weights", "negative neighbour weights",
                "a temperature that is not finite and > 0", "a lam outside [0, 1]",
                "NaN or +inf in a logits row", "a target outside [0, V) and not ignore_index",
                "NaN or inf in a query row", "an exclude id outside [-1, N)")
_state = {"cuda_checks": "auto", "deferred_depth": 0}
_lock = threading.Lock()


def _cuda_checks_mode(value: Union[bool, str]) -> str:
    if value is True:
        return "auto"
    if value is False:
        return "off"
    if value not in CUDA_CHECKS:
        raise ValueError(f"configure: cuda_checks must be one of {tuple(CUDA_CHECKS)} (or a "
                         f"bool), got {value!r}")
    return value


def _apply_cuda_checks() -> None:
    mode = _state["cuda_checks"]
    deferred = mode == "auto" and _state["deferred_depth"] > 0
    OPS.configure("cuda_checks", CUDA_CHECKS["deferred"] if deferred else CUDA_CHECKS[mode])


def configure(name: str, value: Union[bool, str]) -> Union[bool, str]:
    """Set a process-wide kernel setting; returns the previous value. ``debug``: a bool;
    ``cuda_checks``: "auto", "sync", "deferred" or "off" (True = "auto", False = "off")."""
    if name not in SETTINGS:
        raise ValueError(f"configure: name must be one of {tuple(SETTINGS)}, got {name!r}")
    if name == "cuda_checks":
        with _lock:
            previous, _state["cuda_checks"] = _state["cuda_checks"], _cuda_checks_mode(value)
            _apply_cuda_checks()
        return previous
    return bool(OPS.configure(name, int(bool(value))))


@contextlib.contextmanager
def deferred_checks(device: Optional[torch.device] = None) -> Iterator[None]:
    """Inside: CUDA ops do not wait for their kernels to report bad values (under the default
    "auto" mode; "sync" still raises at each call, for debugging). On leaving: one host sync,
    and the first bad value recorded raises ValueError (``check_cuda_errors(device)``, every
    visible device by default). Process-wide: other threads' ops are deferred meanwhile too."""
    with _lock:
        _state["deferred_depth"] += 1
        _apply_cuda_checks()
    try:
        yield
    except BaseException:
        _leave_deferred()
        with contextlib.suppress(Exception):  # the block's own error wins; stale reports go
            take_cuda_status(device)
        raise
    _leave_deferred()
    if _state["deferred_depth"] == 0:
        check_cuda_errors(device)


def _leave_deferred() -> None:
    with _lock:
        _state["deferred_depth"] -= 1
        _apply_cuda_checks()


def take_cuda_status(device: Optional[Union[torch.device, str, int]] = None) -> list:
    """[(device, status code, first bad flat position)] recorded by deferred CUDA checks on
    ``device`` (default: every visible CUDA device), which are cleared. Waits for the
    devices' queued kernels; [] without a CUDA build of knnfast or a visible GPU."""
    from .library import build_info
    if not (torch.cuda.is_available() and build_info().get("cuda_compiled")):
        return []
    if device is None:
        devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    else:
        devices = [torch.device("cuda", device) if isinstance(device, int) else torch.device(device)]
    found = []
    for dev in (d for d in devices if d.type == "cuda"):
        status = OPS.take_cuda_status(torch.empty(0, device=dev)).tolist()
        found += [(dev, code, pos) for code, pos in enumerate(status) if pos != -1]
    return found


def check_cuda_errors(device: Optional[Union[torch.device, str, int]] = None) -> None:
    """Raise ValueError naming the first kind of bad value that CUDA ops with deferred checks
    recorded on ``device`` (default: every visible device) since the last check, and clear
    it (``take_cuda_status``). A no-op without CUDA."""
    found = take_cuda_status(device)
    if found:
        dev, code, pos = found[0]
        raise ValueError(f"knnfast: a CUDA op with deferred checks on {dev} met "
                         f"{STATUS_CODES[code]} (first at flat position {pos}); rerun with "
                         f"knnfast.ops.settings.configure('cuda_checks', 'sync') to raise at "
                         f"the call with its value")


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


def env_cuda_checks(variable: str, default: str) -> str:
    raw = os.environ.get(variable, "").strip().lower()
    if not raw:
        return default
    named = {"1": "auto", "true": "auto", "on": "auto", "yes": "auto", "0": "off",
             "false": "off", "no": "off"}
    mode = named.get(raw, raw)
    if mode not in CUDA_CHECKS:
        raise ValueError(f"{variable} must be one of {tuple(CUDA_CHECKS)} (or 1 / 0), got "
                         f"{raw!r}")
    return mode


def env_flag(variable: str, default: bool) -> bool:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    return raw not in ("0", "false", "False", "no", "off")


def configure_from_environment() -> None:
    for name, (variable, default) in SETTINGS.items():
        read = env_cuda_checks if name == "cuda_checks" else env_flag
        configure(name, read(variable, default))


configure_from_environment()
