"""One run of a study: its cache directories, its resumable stages and its log.

A stage is a named step whose JSON-serialisable result is saved when it finishes
(``<cache>/stages/<key>.json``, written atomically); a rerun after a kill skips every
finished stage and continues with the first unfinished one. Models and datastores are cached
by the code that builds them, under ``run.cache`` (this study) or ``run.shared`` (what
several studies reuse: the base model, its datastore; those check their own settings hash).

Stages are cached by name, so the study's settings are bound to its cache
(``StudyRun.use_settings``): a run under other settings moves the old cache aside to
``<scale>.stale`` and starts afresh, instead of reusing results computed under the old ones."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from ...storage.files import check_store_path, os_error

Log = Callable[[str], None]
OWNER = "knnfast reproduce"


def machine() -> str:
    """CPU model, cores, torch version and threads: printed beside every measured figure."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def write_json_atomic(path: Path, value: Any, **dump) -> None:
    """``value`` as JSON at ``path``: a unique temporary file, fsynced, then renamed (a kill
    or a second run never leaves a mixed or half-written file). A failed write (disk full,
    read-only) is a DatastoreError naming the file; the previous file stays as it was."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise os_error(OWNER, "write", str(path), e, "make the cache directory writable or "
                       "pass another --cache-dir (finished stages are kept)") from None
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(value, f, ensure_ascii=False, **dump)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise os_error(OWNER, "write", str(path), e, "free disk space or make the cache "
                       "writable, then rerun (finished stages are kept)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stage_crc(seconds: float, result: Any) -> int:
    """CRC-32 of a stage's (seconds, result) in canonical JSON: bit rot in a stage file
    changes it (a flipped digit would still parse as JSON)."""
    text = json.dumps([seconds, result], ensure_ascii=False, sort_keys=True)
    return zlib.crc32(text.encode())


def read_json(path: Path, log: Log, what: str) -> Any:
    """The JSON at ``path``; None when it is missing, or unreadable (truncated, bit rot: a
    warning says so, and the caller recomputes it)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log(f"warning: {path} is unreadable ({e}); the {what} runs again")
        return None


def canonical_settings(settings: dict) -> dict:
    """``settings`` as plain JSON values (dataclasses as dicts, tuples as lists, anything
    else by ``repr``), compared key by key with the settings a cache was built under."""
    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return repr(value)
    return plain(settings)


def make_dir(path: Path) -> None:
    """``path`` and its parents as directories, or a DatastoreError naming what is in the
    way (a file, a symbolic link loop, a read-only parent)."""
    for part in reversed([path, *path.parents]):
        check_store_path(str(part), OWNER)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(OWNER, "create the directory", str(path), e, "make its parent "
                       "writable or pass another --cache-dir / --out") from None


class StudyRun:
    """Where one study keeps its state, and its resumable stages.

    Args:
        study: the study's name (``meta-optimizer``, ...).
        cache_root: the cache of all studies (``.cache/reproduce``).
        out_dir: where the report goes.
        quick: the tiny scale (tests); it never shares a cache with a full run.
    """

    def __init__(self, study: str, cache_root: str | Path, out_dir: str | Path,
                 quick: bool = False, log: Log = print):
        scale = "quick" if quick else "full"
        self.study, self.quick, self.log = study, quick, log
        self.cache = Path(cache_root) / study / scale
        self.shared = Path(cache_root) / "shared" / scale
        self.out = Path(out_dir)
        for d in (self.cache / "stages", self.shared, self.out):
            make_dir(d)
        self.started = time.perf_counter()
        self.stage_seconds: dict[str, float] = {}
        self._nested: list[float] = []   # seconds of stages finished inside the running ones

    def use_settings(self, settings: dict) -> None:
        """Bind the study's ``settings`` (name -> value: its scale, constants, library
        version) to its cache. Stages cached under different settings, or under unrecorded
        ones (a cache from before settings were recorded), are not reused: the old cache
        moves to ``<scale>.stale`` (replacing an older one) and the study runs afresh."""
        wanted = canonical_settings(settings)
        path = self.cache / "settings.json"
        saved = read_json(path, self.log, f"{self.study} study")
        has_stages = any((self.cache / "stages").glob("*.json"))
        if saved != wanted and (saved is not None or has_stages):
            changed = sorted(k for k in set(wanted) | set(saved or {})
                             if (saved or {}).get(k) != wanted.get(k))
            stale = self.cache.with_name(self.cache.name + ".stale")
            self.log(f"[{self.study}] settings changed since the cached stages "
                     f"({', '.join(changed) if saved else 'none recorded'}): the old cache "
                     f"moves to {stale} and the study runs afresh")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(self.cache, stale)
            (self.cache / "stages").mkdir(parents=True)
        write_json_atomic(path, wanted, indent=1, sort_keys=True)

    def stage(self, key: str, fn: Callable[[], Any]) -> Any:
        """``fn()``'s result, computed once: cached as JSON under ``key`` (a file name), with
        its own seconds (a stage that runs another counts only the time outside it)."""
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"StudyRun.stage: key must be a plain file name, got {key!r}")
        path = self.cache / "stages" / f"{key}.json"
        saved = read_json(path, self.log, f"stage {key}")
        if saved is not None and not (isinstance(saved, dict)
                                      and {"seconds", "result", "crc32"} <= set(saved)):
            self.log(f"warning: {path} is not a stage result; the stage {key} runs again")
            saved = None
        if saved is not None and saved["crc32"] != stage_crc(saved["seconds"], saved["result"]):
            self.log(f"warning: {path} is corrupt (crc32 mismatch); the stage {key} runs again")
            saved = None
        if saved is not None:
            self.stage_seconds[key] = saved["seconds"]
            self.log(f"[{self.study}] {key}: done earlier ({saved['seconds']:.0f} s), cached")
            return saved["result"]
        self.log(f"[{self.study}] {key} ...")
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            result = fn()
        finally:
            inner = self._nested.pop()
        elapsed = time.perf_counter() - start
        if self._nested:                 # the enclosing stage does not count this one again
            self._nested[-1] += elapsed
        seconds = elapsed - inner        # own time: a stage run inside it is counted there
        write_json_atomic(path, {"seconds": seconds, "result": result,
                                 "crc32": stage_crc(seconds, result)})
        self.stage_seconds[key] = seconds
        self.log(f"[{self.study}] {key}: {seconds:.0f} s")
        return result

    def record(self, key: str, seconds: float) -> None:
        """Count ``seconds`` of work done outside a stage (a shared model's training, read
        from its cache) in the run's cold-cache time."""
        self.stage_seconds[key] = float(seconds)

    def seconds(self) -> float:
        """Wall-clock seconds of all stages, cached ones counted with their first run's time
        (the cold-cache time of the study)."""
        return sum(self.stage_seconds.values())
