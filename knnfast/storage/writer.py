"""``DatastoreWriter``: appends (keys, values) chunks through the shared resumable
``ChunkedBuild`` and finalizes a datastore atomically (|k|^2, meta.json, rename)."""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from torch import Tensor

from . import checksums
from .building import ChunkedBuild
from .files import DatastoreError, fsync_file, os_error, progress_bar, row_chunks
from .format import KEY_DTYPES, VALUE_BYTES, key_bytes, key_row_bytes, memmap_keys, sq_norms

if TYPE_CHECKING:
    from .datastore import Datastore


class DatastoreWriter:
    """Appends (keys, values) chunks into ``<path>.building`` and finalizes atomically.

    Made by ``Datastore.create``. Use as a context manager: a clean exit finalizes (the
    result is ``writer.datastore``), an exception leaves the committed prefix on disk for
    ``Datastore.create(path, ..., resume=True)``.
    """

    def __init__(self, path: str, meta: dict, *, resume: bool, overwrite: bool, progress: bool,
                 expected_size: Optional[int]):
        self.path = path
        self.meta = meta
        self.dim = meta["dim"]
        self.key_dtype = KEY_DTYPES[meta["key_dtype"]]
        self.vocab_size = meta.get("vocab_size")
        self._row_bytes = key_row_bytes(self.dim, self.key_dtype)
        self._build = ChunkedBuild(path, meta, {"keys": self._row_bytes, "values": VALUE_BYTES},
                                   owner="Datastore.create", resume=resume, overwrite=overwrite,
                                   exists_hint="open it with Datastore.open or ")
        self.tmp_dir = self._build.tmp
        self._closed = False
        self._bar = progress_bar(expected_size, f"datastore {os.path.basename(path)}", progress)
        self._bar.update(self.count)

    @property
    def count(self) -> int:
        """Entries committed so far (including those of a resumed build)."""
        return self._build.count

    @property
    def cursor(self) -> Any:
        """The cursor committed with the last ``add`` (read back on resume)."""
        return self._build.cursor

    def add(self, keys: Tensor, values: Tensor, cursor: Any = None) -> None:
        """Append keys [n, D] (any float dtype, stored as the datastore's key dtype) and
        values [n] (token ids). ``cursor`` is any JSON value committed with the chunk (for
        example the number of corpus sentences consumed) and read back on resume."""
        if self._closed:
            raise RuntimeError("DatastoreWriter.add: the writer is closed")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"Datastore.add: keys must have shape [n, {self.dim}], "
                             f"got {tuple(keys.shape)}")
        if not keys.is_floating_point():
            raise ValueError(f"Datastore.add: keys must be floating point, got {keys.dtype}")
        if values.dim() != 1 or values.shape[0] != keys.shape[0]:
            raise ValueError(f"Datastore.add: values must have shape [{keys.shape[0]}], "
                             f"got {tuple(values.shape)}")
        if values.is_floating_point() or values.dtype == torch.bool:
            raise ValueError(f"Datastore.add: values must be integer token ids, got {values.dtype}")
        keys = keys.detach().to("cpu", self.key_dtype).contiguous()
        values = values.detach().to("cpu", torch.int64)
        self._check_values(keys, values)
        self._build.append({"keys": key_bytes(keys),
                            "values": values.to(torch.int32).numpy().tobytes()},
                           keys.shape[0], cursor)
        self._bar.update(keys.shape[0])

    def _check_values(self, keys: Tensor, values: Tensor) -> None:
        if values.numel() == 0:
            return
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or (self.vocab_size is not None and hi >= self.vocab_size):
            bad = lo if lo < 0 else hi
            raise ValueError(f"Datastore.add: values must be token ids in [0, "
                             f"{self.vocab_size}), got {bad}")
        if not torch.isfinite(keys).all():
            row = int((~torch.isfinite(keys)).any(1).nonzero()[0])
            raise ValueError(f"Datastore.add: keys row {row} of this chunk is not finite "
                             f"(after conversion to {self.meta['key_dtype']})")

    def finalize(self) -> "Datastore":
        """Compute |k|^2, write meta.json and move the directory into place atomically."""
        from .datastore import Datastore
        self._bar.close()  # the build lock is held until publish has renamed the directory
        if self.count == 0:
            self.close()
            raise DatastoreError(f"Datastore.finalize: no entries were added to {self.path}")
        keys = memmap_keys(self.tmp_dir, self.count, self.dim, self.key_dtype)
        norms = torch.empty(self.count, dtype=torch.float32)
        for s, e in row_chunks(self.count, self._row_bytes):
            norms[s:e] = sq_norms(keys[s:e])
        norms_crc = checksums.BlockCRC(self._build.crcs["keys"].block_bytes)
        norms_crc.update(norms.numpy())
        norms_file = self._build.file("key_sq_norms")
        try:
            with open(norms_file, "wb") as f:
                f.write(norms.numpy().tobytes())
                fsync_file(f)
        except OSError as e:
            self.close()
            raise os_error("Datastore.finalize", "write", norms_file, e, "every entry is "
                           "committed: free disk space and resume with resume=True") from None
        meta = dict(self.meta, size=self.count, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    bytes={"keys": self.count * self._row_bytes,
                           "values": self.count * VALUE_BYTES,
                           "key_sq_norms": self.count * np.dtype(np.float32).itemsize},
                    checksums=checksums.record(dict(self._build.crcs, key_sq_norms=norms_crc)))
        try:
            self._build.publish(meta)
        finally:
            self.close()
        return Datastore.open(self.path)

    def close(self) -> None:
        """Stop without finalizing; the committed prefix stays resumable."""
        if not self._closed:
            self._bar.close()
            self._build.release()
            self._closed = True

    def __enter__(self) -> "DatastoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.datastore = self.finalize()
        else:
            self.close()
