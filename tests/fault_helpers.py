"""Faults for tests/test_fault_*.py: a disk that fills up (RLIMIT_FSIZE in a forked child), a
read-only directory (that root cannot write either), flipped bits, symlink loops; and the
registry of (fault, format) -> outcome that README's reliability table is rendered from."""
import ctypes
import faulthandler
import os
import pickle
import resource
import select
import signal
import time
import traceback

import torch

FAULTS = ("disk full during a write", "read-only directory", "two writers on one path",
          "truncated file", "bit-flipped file", "newer format version", "path is a file",
          "symlink loop")
FORMATS = ("datastore", "sharded datastore", "teacher store", "INK checkpoint",
           "demo base-model checkpoint", "reproduce stage cache")

#: (fault, format) -> the outcome a test asserts, filled by ``@cell`` as the test modules load
TABLE = {}


def cell(fault, fmt, outcome):
    """Register the outcome a test checks for one (fault, format) cell of README's table."""
    assert fault in FAULTS and fmt in FORMATS, (fault, fmt)

    def mark(test):
        assert (fault, fmt) not in TABLE, (fault, fmt)
        TABLE[(fault, fmt)] = outcome
        return test
    return mark


def cells(*pairs, outcome):
    """``cell`` for several (fault, format) pairs sharing one outcome and one test."""
    def mark(test):
        for fault, fmt in pairs:
            cell(fault, fmt, outcome)(test)
        return test
    return mark


# --------------------------------------------------------------------------- a forked child

def in_child(fn, *, file_size_limit=None, read_only=False, deadline_s=120):
    """Run ``fn()`` in a forked child; returns ``("ok", value)`` or ``(exception type name,
    message)``. ``file_size_limit``: RLIMIT_FSIZE in bytes, with SIGXFSZ ignored so a write
    past it fails with EFBIG ("File too large"), as on a full disk. ``read_only``: the child
    loses CAP_DAC_OVERRIDE, so root too is held to the permission bits (chmod a-w).
    A child still running after ``deadline_s`` is killed and fails the test (its Python
    stack is on stderr) instead of hanging the suite."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(r)
        try:
            faulthandler.dump_traceback_later(max(1, deadline_s - 5))
            torch.set_num_threads(1)
            if file_size_limit is not None:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, hard))
            if read_only:
                drop_dac_override()
            result = ("ok", fn())
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            result = (type(e).__name__, str(e) if isinstance(e, ValueError)
                      else f"{e}\n{traceback.format_exc()}")
        with os.fdopen(w, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(w)
    data = _read_until(r, pid, deadline_s)
    os.waitpid(pid, 0)
    return pickle.loads(data)


def _read_until(fd, pid, deadline_s):
    """Everything the child writes to ``fd`` until it closes it; the child is killed and the
    test fails if that takes longer than ``deadline_s``."""
    deadline, chunks = time.monotonic() + deadline_s, []
    with os.fdopen(fd, "rb", buffering=0) as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"in_child: the forked child still ran after {deadline_s} s "
                                     "(its stack is on stderr)")
            chunk = f.read(1 << 16)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def drop_dac_override():
    """Clear CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from this process's effective set (a
    no-op for a non-root user, who never had them)."""
    if os.geteuid() != 0:
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= ~((1 << 1) | (1 << 2))
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


# --------------------------------------------------------------------------- damage

def flip_bit(path, offset, bit=3):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def symlink_loop(directory, name="loop"):
    """``directory/name`` -> ``name.b`` -> ``name``: a loop; returns its path."""
    a, b = os.path.join(directory, name), os.path.join(directory, name + ".b")
    os.symlink(b, a)
    os.symlink(a, b)
    return a


def files_equal(a, b, names):
    """True when the files ``names`` are byte for byte the same in directories a and b."""
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def render_table():
    """README's reliability table: one row per fault, one column per format."""
    rows = ["| fault | " + " | ".join(FORMATS) + " |", "|---" * (len(FORMATS) + 1) + "|"]
    for fault in FAULTS:
        rows.append(f"| {fault} | " + " | ".join(TABLE.get((fault, fmt), "not tested")
                                                 for fmt in FORMATS) + " |")
    return "\n".join(rows)
