"""Which torch knnfast runs with.

A C++ extension is tied to the torch headers it was compiled with: under another torch it
fails to load (undefined symbols) or, worse, loads with a different ABI. So knnfast is built
against the torch already installed (``pip install --no-build-isolation .``; pyproject.toml
pins no torch), the library records that torch's version (``build_info()["built_with_torch"]``)
and import checks the running one:

* below :data:`MIN_TORCH` -> ImportError (the Python side needs torch.library.register_fake
  and register_autograd, new in torch 2.4);
* a release other than the one the library was built against -> :class:`TorchVersionWarning`
  saying how to rebuild.

CI and every measurement in this repository use :data:`TESTED_TORCH`.
"""
from __future__ import annotations

import re
import warnings
from typing import Optional, Tuple

MIN_TORCH = (2, 4)
TESTED_TORCH = "2.13.0"
REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."


class TorchVersionWarning(RuntimeWarning):
    """The running torch is not the one knnfast's compiled library was built against."""


def release(version: str) -> Tuple[int, ...]:
    """(major, minor, patch) of a torch version string ("2.13.0+cpu" -> (2, 13, 0))."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def check_supported(running: str) -> None:
    """ImportError when the running torch is older than knnfast supports."""
    if release(running)[:2] < MIN_TORCH:
        floor = ".".join(map(str, MIN_TORCH))
        raise ImportError(
            f"knnfast needs torch >= {floor} (tested with {TESTED_TORCH}); torch {running} "
            f"is installed. Upgrade torch, then rebuild knnfast: {REBUILD}")


def mismatch_message(built_with: str, running: str) -> Optional[str]:
    """The warning text when the library was built against another torch release, else None.

    The local tag (+cpu, +cu124) is ignored: CPU kernels are the same under either."""
    if built_with in ("", "unknown") or release(built_with) == release(running):
        return None
    return (f"knnfast's compiled library was built against torch {built_with} but torch "
            f"{running} is running; a C++ extension only works with the torch it was built "
            f"against (expect crashes). Rebuild knnfast in this environment: {REBUILD}")


def warn_on_mismatch(built_with: str, running: str) -> None:
    message = mismatch_message(built_with, running)
    if message is not None:
        warnings.warn(message, TorchVersionWarning, stacklevel=2)
