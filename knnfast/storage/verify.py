"""Checking a store on disk against what its build recorded (``knnfast verify PATH``):
meta.json (or a sharded store's manifest) readable and of a known format version, every file
present with its recorded byte size, and every block's CRC-32 (``knnfast.storage.checksums``)
equal to the one recorded at finalize. Nothing is modified; every problem is collected, so
the report names each bad file and block at once.

    report = knnfast.storage.verify("ds/")       # datastore or sharded datastore
    report.ok, report.problems                   # False, ["ds/keys: block 2 (...) ..."]
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from . import checksums
from .files import DatastoreError, PathLike, check_format_version, load_meta, size_problems
from .format import FILES, FORMAT_VERSION

#: What verify says of a store built before checksums were recorded (sizes are still checked)
NO_CHECKSUMS = ("no checksums recorded (built before knnfast recorded them in meta.json, "
                "format 1 without \"checksums\"): sizes checked, contents not; rebuild it to "
                "add them")


@dataclass
class FileCheck:
    """The outcome for one file: ``status`` is "ok", "bad" (``detail`` says what differs),
    "missing" or "unchecked" (no checksum recorded: only its size was checked)."""
    file: str
    status: str
    detail: str = ""


@dataclass
class VerifyReport:
    """What ``verify`` found at ``path``. ``ok`` is True when nothing is wrong; ``problems``
    lists one line per bad file or block and per store-level error (unreadable meta.json,
    unknown format version, a shard the manifest does not describe)."""
    path: str
    kind: str
    files: List[FileCheck] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def checksummed(self) -> bool:
        """True when every file checked had recorded checksums."""
        return bool(self.files) and all(f.status != "unchecked" for f in self.files)

    @property
    def problems(self) -> List[str]:
        return self.errors + [f"{f.file}: {f.detail}" for f in self.files
                              if f.status in ("bad", "missing")]

    def as_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "ok": self.ok,
                "checksummed": self.checksummed, "problems": self.problems,
                "notes": self.notes, "files": [vars(f) for f in self.files]}


def verify_store(path: PathLike, kind: str, format_version: int, files: Tuple[str, ...],
                 size_keys: Tuple[str, ...] = ("size",), resume_call: str = "resume=True"
                 ) -> VerifyReport:
    """Check one store directory whose meta.json lists ``files`` (their ``bytes`` and, when
    built by a knnfast that records them, ``checksums``)."""
    path = os.fspath(path)
    report = VerifyReport(path, kind)
    try:
        meta = load_meta(path, f"verify {kind}", resume_call)
        check_format_version(meta, os.path.join(path, "meta.json"), f"verify {kind}",
                             format_version)
    except DatastoreError as e:
        report.errors.append(str(e))
        return report
    sums = meta.get("checksums")
    for name in files:
        report.files.append(_check_file(path, name, meta, sums))
    bad_sizes = size_problems(path, meta, (), size_keys)  # meta.json's own fields
    report.errors += bad_sizes
    if sums is None:
        report.notes.append(f"{path}: {NO_CHECKSUMS}")
    return report


def _check_file(path: str, name: str, meta: dict, sums: Optional[dict]) -> FileCheck:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        return FileCheck(file, "missing", "missing; the store is incomplete, rebuild it")
    problems = size_problems(path, meta, (name,), ())
    if problems:
        return FileCheck(file, "bad", problems[0].split(": ", 1)[-1])
    if sums is None:
        return FileCheck(file, "unchecked", "size ok, no checksum recorded")
    if sums.get("algorithm") != checksums.ALGORITHM or name not in sums.get("files", {}):
        return FileCheck(file, "bad", f"meta.json's checksums do not cover it (algorithm "
                                      f"{sums.get('algorithm')!r}); rebuild the store")
    try:
        bad = checksums.mismatches(file, sums["files"][name], int(sums["block_bytes"]))
    except OSError as e:
        return FileCheck(file, "bad", f"unreadable ({e.strerror or e})")
    if bad:
        return FileCheck(file, "bad", ", ".join(bad) + ": bit rot or a modified file; "
                                                       "rebuild the store")
    return FileCheck(file, "ok")


def verify_datastore(path: PathLike) -> VerifyReport:
    """``verify_store`` for a plain datastore."""
    return verify_store(path, "datastore", FORMAT_VERSION, FILES, ("size", "dim"),
                        "Datastore.create(..., resume=True)")


def verify_sharded(path: PathLike) -> VerifyReport:
    """Check a sharded datastore: its manifest, then every shard it lists (as a datastore,
    and against the manifest's record of it)."""
    from .sharded import read_manifest, shard_differs  # sharded imports datastore: at call time
    path = os.fspath(path)
    report = VerifyReport(path, "sharded datastore")
    try:
        manifest = read_manifest(path, "verify sharded datastore")
    except DatastoreError as e:
        report.errors.append(str(e))
        return report
    for i, entry in enumerate(manifest["shards"]):
        shard_dir = os.path.join(path, entry["path"])
        sub = verify_datastore(shard_dir)
        report.files += sub.files
        report.errors += [f"shard {i}: {e}" for e in sub.errors]
        report.notes += sub.notes
        if not sub.errors:
            meta = load_meta(shard_dir, "verify sharded datastore", "resume=True")
            if shard_differs(meta, entry):
                report.errors.append(f"shard {i} ({shard_dir}) is not the shard manifest.json "
                                     f"recorded (size, bytes or checksums differ): it was "
                                     f"replaced after the manifest was written; rebuild it")
    return report


def verify(path: PathLike) -> VerifyReport:
    """Check the datastore (plain or sharded) at ``path``; see ``VerifyReport``.
    ``knnfast.methods.kd.TeacherStore.verify`` checks teacher stores the same way."""
    from .sharded import is_sharded, unfinished_sharded
    path = os.fspath(path)
    if is_sharded(path):
        return verify_sharded(path)
    if unfinished_sharded(path):
        return VerifyReport(path, "sharded datastore", errors=[
            f"{path} has shard directories but no manifest.json: its sharded build did not "
            f"finish; resume it with resume=True"])
    return verify_datastore(path)
