"""The resumable chunk writer shared by every knnfast store (``Datastore``, ``TeacherStore``).

A build lives in ``<path>.building/``: append-only files of fixed-size rows plus
``progress.json``. Every ``append`` writes and fsyncs each file, then commits the row count,
an optional caller cursor (any JSON value) and the build's settings to ``progress.json`` with
an atomic rename. A killed build therefore holds an exact prefix of what was appended; it
resumes with ``resume=True`` (bytes past the last commit are dropped) or fails with a message
naming both ``resume=True`` and ``overwrite=True``. ``publish`` writes ``meta.json`` and
renames the finished directory into place, so ``<path>`` exists only when complete.

Each commit also records the running per-block CRC-32 of every file
(``knnfast.storage.checksums``), computed from the appended bytes, so the finished store's
meta.json can say what every block must hold. A failed write (disk full, file size limit,
permissions) is a ``DatastoreError`` naming the file; the committed prefix stays resumable.

One writer per path: ``<dir>/.<name>.lock`` is locked with ``flock`` for the whole build. The
kernel drops the lock when its process exits, however it dies, so a lock file left behind is
never stale (it is kept on purpose, see ``lock_path``); only a live writer blocks another.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
from typing import Any, Dict, Mapping, Optional

from .checksums import BlockCRC
from .files import (DatastoreError, PathLike, check_store_path, fsync_dir, fsync_file,
                    fsync_write_json, os_error)

PROGRESS = "progress.json"


def building_cursor(path: PathLike) -> Optional[Any]:
    """The cursor committed by an interrupted build of ``path`` (None if there is none)."""
    progress_file = os.path.join(os.fspath(path) + ".building", PROGRESS)
    if not os.path.exists(progress_file):
        return None
    with open(progress_file) as f:
        return json.load(f).get("cursor")


def lock_path(path: PathLike) -> str:
    """The lock file of builds of ``path``: hidden, next to it, never deleted (deleting a lock
    file others may hold open would let two writers lock different files)."""
    path = os.path.abspath(os.fspath(path))
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


def acquire_build_lock(path: PathLike, owner: str) -> int:
    """An exclusive lock on builds of ``path`` (the open file descriptor; closing it releases
    the lock). A second writer, in this process or another (e.g. two ranks of a process group
    building one path), gets a DatastoreError at once instead of a corrupted store."""
    name = lock_path(path)
    try:
        os.makedirs(os.path.dirname(name), exist_ok=True)  # the build creates missing parents
        fd = os.open(name, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise os_error(owner, "create the lock file", name, e, "make the directory writable "
                       "or build somewhere else (nothing was written)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise DatastoreError(f"{owner}: {os.fspath(path)} is being built by another writer "
                             f"(pid {holder}; lock {name}); one writer per path: wait for it "
                             f"to finish, or build a different path") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


class ChunkedBuild:
    """One resumable build of the files ``row_bytes`` names (file name -> bytes per row).

    Args:
        path: the finished store's directory; the build runs in ``<path>.building``.
        meta: the build's settings; resuming with different settings fails.
        owner: who builds, for messages (e.g. "Datastore.create").
        resume, overwrite: continue an interrupted build / delete an existing store or build.
        exists_hint: advice put before "pass overwrite=True" when ``path`` already exists.

    ``count`` (committed rows) and ``cursor`` (the last committed cursor) are read back on
    resume.
    """

    def __init__(self, path: PathLike, meta: dict, row_bytes: Mapping[str, int], *, owner: str,
                 resume: bool, overwrite: bool, exists_hint: str = ""):
        self.path = os.fspath(path)
        self.tmp = self.path + ".building"
        self.meta, self.owner = meta, owner
        self.row_bytes = dict(row_bytes)
        self.failed: Optional[str] = None  # why an append failed (the build is then unusable)
        for p in (self.path, self.tmp):
            check_store_path(p, owner)
        # before anything is deleted or read: overwrite=True must not destroy a live build
        self._lock: Optional[int] = acquire_build_lock(self.path, owner)
        try:
            self._open(resume, overwrite, exists_hint)
        except BaseException:
            self.release()
            raise

    def _open(self, resume: bool, overwrite: bool, exists_hint: str) -> None:
        owner = self.owner
        try:
            if overwrite:
                for p in (self.path, self.tmp):
                    if os.path.exists(p):
                        shutil.rmtree(p)
            if os.path.exists(self.path):
                raise FileExistsError(f"{owner}: {self.path} already exists; {exists_hint}"
                                      f"pass overwrite=True")
            state = self._resume_state(resume)
            self.count, self.cursor = 0, None
            self.crcs = {name: BlockCRC() for name in self.row_bytes}
            if state is None:
                os.makedirs(self.tmp)
                self._commit(self.count, self.cursor, self.crcs)
            else:
                self.count, self.cursor = int(state["count"]), state.get("cursor")
            self._truncate_to_commit()
            if state is not None:
                self.crcs = self._resumed_crcs(state)
        except OSError as e:
            if isinstance(e, FileExistsError) and not e.errno:
                raise
            raise os_error(owner, "prepare", self.tmp, e, "make the directory writable or "
                           "build somewhere else") from None

    def release(self) -> None:
        """Give up the build lock (the committed prefix stays resumable). Idempotent."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def file(self, name: str) -> str:
        """Path of one of the build's files."""
        return os.path.join(self.tmp, name)

    def _resume_state(self, resume: bool) -> Optional[dict]:
        if not os.path.exists(self.tmp):
            return None
        try:
            with open(self.file(PROGRESS)) as f:
                state = json.load(f)
        except (OSError, ValueError) as e:
            raise DatastoreError(f"interrupted build at {self.tmp} has no readable {PROGRESS} "
                                 f"({e}); delete it or pass overwrite=True") from None
        if not resume:
            raise DatastoreError(
                f"an interrupted build exists at {self.tmp} ({state['count']} entries "
                f"committed); pass resume=True to continue it or overwrite=True to start over")
        if not isinstance(state, dict) or "count" not in state or "meta" not in state:
            raise DatastoreError(f"interrupted build at {self.tmp}: {PROGRESS} lacks count / "
                                 f"meta; delete it or pass overwrite=True")
        was = state["meta"]
        diff = {k: (was.get(k), self.meta.get(k)) for k in sorted(set(was) | set(self.meta))
                if was.get(k) != self.meta.get(k)}
        if diff:
            raise DatastoreError(f"cannot resume {self.tmp}: it was started with different "
                                 f"settings (was, now): {diff}; pass overwrite=True to start over")
        return state

    # The committed count is the truth: bytes beyond it were written by a killed process.
    def _truncate_to_commit(self) -> None:
        for name, row in self.row_bytes.items():
            f = self.file(name)
            if not os.path.exists(f):
                open(f, "wb").close()
            have, want = os.path.getsize(f), self.count * row
            if have < want:
                raise DatastoreError(
                    f"interrupted build at {self.tmp} is corrupt: {name} has {have} bytes "
                    f"but {self.count} committed entries need {want}; delete it or pass "
                    f"overwrite=True")
            if have > want:
                os.truncate(f, want)

    def _resumed_crcs(self, state: dict) -> Dict[str, BlockCRC]:
        """The committed running CRCs; a build from before they were recorded gets them from
        its committed bytes (read once)."""
        saved = state.get("checksums") or {}
        if set(saved) == set(self.row_bytes):
            return {name: BlockCRC.from_state(saved[name]) for name in self.row_bytes}
        crcs = {}
        for name in self.row_bytes:
            crcs[name] = BlockCRC()
            with open(self.file(name), "rb") as f:
                for piece in iter(lambda: f.read(1 << 24), b""):
                    crcs[name].update(piece)
        return crcs

    def _commit(self, count: int, cursor: Any, crcs: Mapping[str, BlockCRC]) -> None:
        fsync_write_json(self.file(PROGRESS),
                         {"count": count, "cursor": cursor, "meta": self.meta,
                          "checksums": {name: c.state() for name, c in crcs.items()}})

    def append(self, chunks: Mapping[str, bytes], rows: int, cursor: Any = None) -> None:
        """Append ``rows`` rows (the bytes of each file), fsync, then commit count + cursor
        (and the files' running CRCs). A failed write leaves the last commit in place."""
        if self.failed:
            raise DatastoreError(f"{self.owner}: this build of {self.path} failed earlier "
                                 f"({self.failed}); resume it with resume=True")
        for name, data in chunks.items():
            if len(data) != rows * self.row_bytes[name]:
                raise ValueError(f"{self.owner}: {len(data)} bytes for {rows} rows of {name}")
        crcs = {name: BlockCRC.from_state(c.state()) for name, c in self.crcs.items()}
        target = PROGRESS
        try:
            for name, data in chunks.items():
                target = name
                with open(self.file(name), "ab") as f:
                    f.write(data)
                    fsync_file(f)
                crcs[name].update(data)
            target = PROGRESS
            self._commit(self.count + rows, cursor, crcs)
        except OSError as e:
            self.failed = f"{e.strerror or e} writing {target}"
            raise os_error(self.owner, "write", self.file(target), e,
                           f"the {self.count} entries committed before stay in {self.tmp}: "
                           f"free disk space (or raise the file size limit) and resume with "
                           f"resume=True") from None
        self.count += rows
        self.cursor = cursor
        self.crcs = crcs

    def publish(self, meta: dict, directory: Optional[str] = None) -> None:
        """Write ``meta.json`` into ``directory`` (default: the build directory, else a
        finished copy next to it) and rename it to ``path`` atomically."""
        directory = directory or self.tmp
        try:
            fsync_write_json(os.path.join(directory, "meta.json"), meta)
        except OSError as e:
            raise os_error(self.owner, "write", os.path.join(directory, "meta.json"), e,
                           f"every entry is committed in {self.tmp}: free disk space and "
                           f"resume with resume=True") from None
        if os.path.exists(self.path):
            raise DatastoreError(f"{self.owner}: {self.path} appeared during the build; "
                                 f"the finished build stays in {directory}")
        # Rename first: a kill at any point leaves either a resumable build or a complete
        # store (with a stray progress.json that nothing reads).
        os.replace(directory, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        if directory == self.tmp:
            os.remove(os.path.join(self.path, PROGRESS))
        else:
            shutil.rmtree(self.tmp)
        self.release()
