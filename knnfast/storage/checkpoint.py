"""Training checkpoints with a checksum (INK's ``ink_ckpt.pt``, the demo's base-model
checkpoint): ``torch.load`` reads a bit-flipped tensor without complaint, so the file is a
one-line header, then the ``torch.save`` bytes::

    KNNFAST-CKPT <version> <crc32 of the payload, hex> <payload bytes>\\n<payload>

Saving writes a unique temporary file next to the target, fsyncs it and renames it into place
(the previous checkpoint stays whole until then). Loading checks the header, the length and
the CRC before unpickling; a plain ``torch.save`` file (written before the header existed) is
loaded as it is.
"""
from __future__ import annotations

import io
import os
import tempfile
import zlib
from typing import Any, Optional

import torch

from .files import DatastoreError, PathLike, fsync_dir, os_error

MAGIC = b"KNNFAST-CKPT"
CHECKPOINT_VERSION = 1


def save_checkpoint(obj: Any, path: PathLike, owner: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with the header and its CRC-32."""
    path = os.fspath(path)
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getbuffer()
    header = b"%s %d %08x %d\n" % (MAGIC, CHECKPOINT_VERSION, zlib.crc32(payload), len(payload))
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        keep = "the previous checkpoint is intact" if os.path.exists(path) else "nothing saved"
        raise os_error(owner, "write the checkpoint", path, e,
                       f"{keep}: free disk space or make the directory writable, then "
                       f"rerun") from None


def load_checkpoint(path: PathLike, owner: str, restart: str) -> Optional[Any]:
    """The object saved at ``path`` (None when there is none). A truncated, bit-flipped or
    otherwise unreadable checkpoint is a DatastoreError naming it; ``restart`` says what
    deleting it does (e.g. "training restarts from epoch 0")."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise os_error(owner, "read the checkpoint", path, e, f"delete it or fix the path "
                       f"({restart})") from None

    def corrupt(why: str) -> DatastoreError:
        return DatastoreError(f"{owner}: checkpoint {path} is {why}; delete it ({restart})")

    payload = data
    if data.startswith(MAGIC):
        head, _, payload = data.partition(b"\n")
        try:
            _, version, crc, size = head.split(b" ")
            version, crc, size = int(version), int(crc, 16), int(size)
        except ValueError:
            raise corrupt("corrupt (unreadable header)") from None
        if version > CHECKPOINT_VERSION:
            raise DatastoreError(f"{owner}: checkpoint {path} has format version {version}, "
                                 f"written by a newer knnfast; upgrade knnfast, or delete it "
                                 f"({restart})")
        if len(payload) != size:
            raise corrupt(f"truncated ({len(payload)} of {size} bytes)")
        if zlib.crc32(payload) != crc:
            raise corrupt("corrupt (crc32 mismatch: bit rot or a modified file)")
    try:
        return torch.load(io.BytesIO(payload), weights_only=False)
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways on a damaged file
        raise corrupt(f"unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
                      ) from None
