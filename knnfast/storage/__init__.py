"""Storage layer: the on-disk datastore and what every knnfast store shares.

- ``datastore``: ``Datastore`` (create / open / search / lookup / subsample / to / FAISS index)
- ``writer``: ``DatastoreWriter`` (what ``Datastore.create`` returns)
- ``building``: ``ChunkedBuild``, the resumable chunk writer shared by ``Datastore`` and
  ``knnfast.methods.kd.TeacherStore``
- ``index``: FAISS helpers (build, save/load, search, reconstructed scores)
- ``search``: exact search, streamed over a memmap in chunks, and exact rescoring
- ``compact``: smaller datastores (``prune``: greedy merge with counts; ``reduce_dim``: PCA /
  random key projection); ``sidecar``: their side arrays (counts, source ids, ``Projection``)
- ``format``, ``files``: the on-disk format and its primitives (fsync, atomic JSON, memmap)
- ``checksums``, ``verify``: per-block CRC-32s recorded at finalize and ``verify(path)``, which
  checks a store against them (``knnfast verify PATH``)

Depends on ``knnfast.ops`` (search kernels) and ``knnfast.topk`` only.
"""
from .datastore import Datastore
from .files import DatastoreError
from .format import FORMAT_VERSION
from .verify import VerifyReport, verify
from .writer import DatastoreWriter

__all__ = ["Datastore", "DatastoreError", "DatastoreWriter", "FORMAT_VERSION", "VerifyReport",
           "verify"]
