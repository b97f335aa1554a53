"""Per-block CRC-32 checksums of a store's files, recorded in meta.json at finalize and
checked by ``knnfast.storage.verify`` (``knnfast verify PATH``) to detect bit rot.

Every file is cut into consecutive blocks of ``block_bytes`` (the last one shorter); meta.json
holds one CRC-32 (zlib) per block::

    "checksums": {"algorithm": "crc32", "block_bytes": 67108864,
                  "files": {"keys": [crc of block 0, crc of block 1, ...], ...}}

so a mismatch names the file and the byte range that changed. Builds compute the CRCs from
the bytes they append (``BlockCRC``, its state committed with each chunk), never by reading
the files back: what is on disk is checked against what the build meant to write.
"""
from __future__ import annotations

import os
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

ALGORITHM = "crc32"
#: Bytes per checksummed block (64 MiB: a 100 GB file has 1600 CRCs in meta.json). Read at
#: call time, so tests may shrink it; a store records the value it was built with.
BLOCK_BYTES = 64 << 20


class BlockCRC:
    """Running CRC-32 of consecutive ``block_bytes`` blocks of one file's bytes.

    ``update`` takes the bytes in order, in pieces of any size; ``state`` / ``from_state``
    round-trip through JSON (a build commits it with each chunk and reads it back on resume).
    """

    def __init__(self, block_bytes: Optional[int] = None):
        self.block_bytes = int(block_bytes or BLOCK_BYTES)
        self.blocks: List[int] = []   # CRCs of the finished blocks
        self.tail, self.tail_bytes = 0, 0  # CRC and length of the unfinished last block

    def update(self, data) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), self.block_bytes - self.tail_bytes)
            self.tail = zlib.crc32(view[:take], self.tail)
            self.tail_bytes += take
            view = view[take:]
            if self.tail_bytes == self.block_bytes:
                self.blocks.append(self.tail)
                self.tail, self.tail_bytes = 0, 0

    def digest(self) -> List[int]:
        """One CRC per block, the shorter last block included."""
        return self.blocks + ([self.tail] if self.tail_bytes else [])

    def state(self) -> dict:
        return {"block_bytes": self.block_bytes, "blocks": list(self.blocks),
                "tail": self.tail, "tail_bytes": self.tail_bytes}

    @classmethod
    def from_state(cls, state: dict) -> "BlockCRC":
        crc = cls(state["block_bytes"])
        crc.blocks = [int(c) for c in state["blocks"]]
        crc.tail, crc.tail_bytes = int(state["tail"]), int(state["tail_bytes"])
        return crc


def record(crcs: Dict[str, BlockCRC]) -> dict:
    """The meta.json ``checksums`` entry of files whose ``BlockCRC`` saw all their bytes."""
    sizes = {c.block_bytes for c in crcs.values()}
    if len(sizes) > 1:
        raise ValueError(f"checksums.record: files checksummed in different block sizes {sizes}")
    return {"algorithm": ALGORITHM, "block_bytes": sizes.pop() if sizes else BLOCK_BYTES,
            "files": {name: c.digest() for name, c in crcs.items()}}


def file_blocks(path: str, block_bytes: int) -> Iterator[Tuple[int, int]]:
    """(block index, CRC-32) of every block of the file at ``path``, read in order."""
    buf = bytearray(block_bytes)
    with open(path, "rb", buffering=0) as f:
        index = 0
        while True:
            n = f.readinto(buf)
            if not n:
                return
            yield index, zlib.crc32(memoryview(buf)[:n])
            index += 1


def mismatches(path: str, expected: List[int], block_bytes: int) -> List[str]:
    """What differs between the file at ``path`` and its recorded block CRCs: one line per
    bad block ("block 3 (bytes 192..256 MiB)"), or a missing / extra block count."""
    bad, seen = [], 0
    for index, crc in file_blocks(path, block_bytes):
        seen = index + 1
        if index < len(expected) and crc != expected[index]:
            lo, hi = index * block_bytes, min((index + 1) * block_bytes, os.path.getsize(path))
            bad.append(f"block {index} (bytes {lo}..{hi}) has crc32 {crc:08x}, "
                       f"meta.json records {expected[index]:08x}")
    if seen != len(expected):
        bad.append(f"{seen} blocks of {block_bytes} bytes, meta.json records {len(expected)}")
    return bad
