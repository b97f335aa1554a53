"""Fault injection on datastores and sharded datastores (issue 19): a full disk mid-build
(then resume = bitwise the uninterrupted build), a read-only directory, a second writer,
truncated and bit-flipped files (open raises or ``verify`` names the block), a newer format,
a path that is a file, a symlink loop. Every case ends in a DatastoreError naming the file
and what to do. The other formats' cases are in test_fault_stores.py and
test_fault_checkpoints.py; README's reliability table is rendered from all of them here:

    KNNFAST_UPDATE_README=1 pytest tests/test_fault_injection.py   # rewrites the block
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import knnfast.storage.checksums as checksums
from knnfast import Datastore, DatastoreError
from knnfast.distributed import build_sharded
from knnfast.storage import sharded, verify
from knnfast.storage.building import acquire_build_lock
from knnfast.storage.format import FILES
from fault_helpers import (FAULTS, FORMATS, TABLE, cell, cells, files_equal, flip_bit, in_child,
                           render_table, symlink_loop)

import test_fault_checkpoints  # noqa: F401  (their cells join the table)
import test_fault_stores  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_threaded")

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- reliability:begin -->", "<!-- reliability:end -->"
N, D, CHUNK, V = 240, 16, 40, 50


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """512-byte checksum blocks, so that these small files have several."""
    monkeypatch.setattr(checksums, "BLOCK_BYTES", 512)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, V, (N,), generator=g)


def _build(path, resume=False, start=0):
    keys, values = _data()
    with Datastore.create(path, D, vocab_size=V, resume=resume, progress=False) as w:
        for s in range(w.count if resume else start, N, CHUNK):
            w.add(keys[s:s + CHUNK], values[s:s + CHUNK], cursor=s + CHUNK)
    return Datastore.open(path)


def _same_store(a, b, names=FILES):
    meta_a, meta_b = (json.load(open(os.path.join(p, "meta.json"))) for p in (a, b))
    meta_a.pop("created_at"), meta_b.pop("created_at")
    return files_equal(a, b, names) and meta_a == meta_b


@pytest.fixture
def ds(tmp_path):
    return _build(str(tmp_path / "ds"))


# --------------------------------------------------------------------------- disk full

@cell("disk full during a write", "datastore", "DatastoreError naming the file (File too "
      "large / No space left), committed chunks kept; `resume=True` after freeing space gives "
      "a bitwise identical datastore")
def test_disk_full_then_resume_is_bitwise_identical(tmp_path):
    reference = _build(str(tmp_path / "ref")).path
    path = str(tmp_path / "ds")
    limit = 5 * CHUNK * D * 2 + 100        # the keys file fills up in the 6th chunk
    kind, msg = in_child(lambda: _build(path), file_size_limit=limit)
    assert kind == "DatastoreError", msg
    assert "ds.building/keys" in msg and "File too large" in msg and "resume=True" in msg
    assert "the 200 entries committed before stay in" in msg
    assert not os.path.exists(path)
    assert Datastore.building_cursor(path) == 5 * CHUNK
    _build(path, resume=True)
    assert _same_store(path, reference)
    assert verify(path).ok


@cell("disk full during a write", "sharded datastore", "the shard's DatastoreError, raised "
      "on every rank; no manifest is written; rerunning with `resume=True` keeps finished "
      "shards and gives a bitwise identical store")
def test_disk_full_in_a_sharded_build(tmp_path):
    reference = _build(str(tmp_path / "ref")).path

    def shard(path, start, end):
        _build(path, resume=True)

    path = str(tmp_path / "sh")
    kind, msg = in_child(lambda: build_sharded(path, 1, shard), file_size_limit=4000)
    assert kind == "DatastoreError", msg
    assert "shard-00000.building/keys" in msg and "File too large" in msg
    assert not sharded.is_sharded(path)
    store = build_sharded(path, 1, shard, resume=True)
    assert len(store) == N and files_equal(os.path.join(path, "shard-00000"), reference, FILES)
    assert verify(path).ok


# --------------------------------------------------------------------------- read-only

@cell("read-only directory", "datastore", "building: DatastoreError \"cannot create the "
      "lock file ... (Permission denied); make the directory writable or build somewhere "
      "else\"; an existing store opens, searches and verifies read-only")
@cell("read-only directory", "sharded datastore", "building: DatastoreError \"preparing "
      "<path> failed ...: cannot create <path> (Permission denied); make the parent directory "
      "writable or build somewhere else\" on every rank; an existing store opens and verifies "
      "read-only")
def test_read_only_directory(ds, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    os.rename(ds.path, parent / "ds")
    os.chmod(parent, 0o555)
    try:
        def build_there():
            _build(str(parent / "new"))

        def build_sharded_there():
            build_sharded(str(parent / "sh"), 1, lambda p, s, e: _build(p))

        def read():
            store = Datastore.open(str(parent / "ds"))
            return len(store), verify(store.path).ok, store.search(_data()[0][:2], 1)[1].tolist()
        for fn, advice in ((build_there, "make the directory writable"),
                           (build_sharded_there, "make the parent directory writable")):
            kind, msg = in_child(fn, read_only=True)
            assert kind == "DatastoreError", msg
            assert "Permission denied" in msg and advice in msg and str(parent) in msg
        assert in_child(read, read_only=True) == ("ok", (N, True, [[0], [1]]))
    finally:
        os.chmod(parent, 0o755)


# --------------------------------------------------------------------------- two writers

@cells(("two writers on one path", "datastore"), ("two writers on one path", "sharded datastore"),
       outcome="the second writer: DatastoreError \"being built by another writer (pid N; "
       "lock ...)\" at once (per shard for a sharded build); the first finishes intact "
       "(flock, released when its process ends, however it ends)")
def test_second_writer_and_a_dead_writers_lock(tmp_path):
    path, sh = str(tmp_path / "ds"), str(tmp_path / "sh")
    locks = [acquire_build_lock(p, "another build")     # held as another writer would
             for p in (path, os.path.join(sh, sharded.shard_name(0)))]
    try:
        with pytest.raises(DatastoreError, match="being built by another writer"):
            _build(path)
        with pytest.raises(DatastoreError, match="shard-00000 is being built by another"):
            build_sharded(sh, 1, lambda p, s, e: _build(p))
    finally:
        for lock in locks:
            os.close(lock)
    assert not os.path.exists(path) and not sharded.is_sharded(sh)
    # a writer killed while holding the lock leaves its lock file, never a stale lock
    code = (f"import os, signal, sys; sys.path.insert(0, {os.getcwd()!r})\n"
            f"from knnfast.storage.building import acquire_build_lock\n"
            f"acquire_build_lock({path!r}, 'doomed'); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == -9
    assert _build(path).meta["size"] == N


# --------------------------------------------------------------------------- damaged files

@cells(("truncated file", "datastore"), ("truncated file", "sharded datastore"),
       outcome="open: DatastoreError \"<file> has N bytes but meta.json says M ...; rebuild "
       "it\"; verify lists the file")
def test_truncated_file(ds, tmp_path):
    os.truncate(os.path.join(ds.path, "values"), N * 4 - 3)
    with pytest.raises(DatastoreError, match="ds/values has 957 bytes but meta.json says 960"):
        Datastore.open(ds.path)
    report = verify(ds.path)
    assert not report.ok and [f.file for f in report.files if f.status == "bad"] == \
        [os.path.join(ds.path, "values")]
    sh = _sharded(tmp_path)
    os.truncate(os.path.join(sh, "shard-00001", "keys"), 10)
    with pytest.raises(DatastoreError, match="shard 1 .*shard-00001/keys has 10 bytes"):
        Datastore.open(sh)
    assert any("shard-00001/keys" in p for p in verify(sh).problems)


def _sharded(tmp_path):
    keys, values = _data()
    path = str(tmp_path / "sh")
    os.makedirs(path)
    for i, (s, e) in enumerate(((0, 100), (100, N))):
        with Datastore.create(os.path.join(path, sharded.shard_name(i)), D, vocab_size=V,
                              progress=False) as w:
            w.add(keys[s:e], values[s:e])
    sharded.write_manifest(path, [sharded.shard_name(0), sharded.shard_name(1)])
    return path


@cells(("bit-flipped file", "datastore"), ("bit-flipped file", "sharded datastore"),
       outcome="open succeeds (sizes match); `knnfast verify` / `verify()` names the file and "
       "block: \"block 1 (bytes 512..1024) has crc32 ..., meta.json records ...\"")
def test_bit_flip_found_by_verify(ds, tmp_path):
    assert verify(ds.path).ok and verify(ds.path).checksummed
    for name in FILES:
        path = os.path.join(ds.path, name)
        flip_bit(path, 600)
        assert len(Datastore.open(ds.path)) == N    # sizes match: only verify can tell
        report = verify(ds.path)
        assert [p.split(": ", 1)[0] for p in report.problems] == [path]
        assert "block 1 (bytes 512.." in report.problems[0]
        flip_bit(path, 600)                         # flipped back: intact again
        assert verify(ds.path).ok
    sh = _sharded(tmp_path)
    flip_bit(os.path.join(sh, "shard-00001", "key_sq_norms"), 7)
    problems = verify(sh).problems
    assert len(problems) == 1 and "shard-00001/key_sq_norms: block 0" in problems[0]


def test_verify_of_a_store_without_checksums(ds):
    """A datastore built before checksums were recorded: verified by size, with a note."""
    meta_file = os.path.join(ds.path, "meta.json")
    meta = json.load(open(meta_file))
    del meta["checksums"]
    json.dump(meta, open(meta_file, "w"))
    report = verify(ds.path)
    assert report.ok and not report.checksummed
    assert report.notes == [f"{ds.path}: {checksums_note()}"]
    os.truncate(os.path.join(ds.path, "keys"), 5)
    assert not verify(ds.path).ok


def checksums_note():
    from knnfast.storage.verify import NO_CHECKSUMS
    assert NO_CHECKSUMS.startswith("no checksums recorded (built before")
    return NO_CHECKSUMS


# --------------------------------------------------------------------------- format, path

@cells(("newer format version", "datastore"), ("newer format version", "sharded datastore"),
       outcome="DatastoreError \"<meta.json / manifest.json> has format version 2, written by "
       "a newer knnfast (this one reads 1); upgrade knnfast to read it\"")
def test_newer_format_version(ds, tmp_path):
    sh = _sharded(tmp_path)
    for path, name in ((ds.path, "meta.json"), (sh, "manifest.json")):
        file = os.path.join(path, name)
        meta = json.load(open(file))
        json.dump(dict(meta, format_version=2), open(file, "w"))
        want = f"{file} has format version 2, written by a newer knnfast .*upgrade knnfast"
        with pytest.raises(DatastoreError, match=want):
            Datastore.open(path)
        assert "upgrade knnfast" in verify(path).problems[0]


@cell("path is a file", "datastore", "DatastoreError \"<path> is a file, not a store "
      "directory; use another path (nothing was changed)\", from open, create (even with "
      "overwrite=True) and verify; the file is untouched")
@cell("path is a file", "sharded datastore", "open / verify as a datastore; build_sharded: "
      "DatastoreError \"preparing <path> failed ...: <path> is a file, not a store "
      "directory; use another path (nothing was changed)\"; the file is untouched")
def test_path_is_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    for call in (lambda: Datastore.open(str(path)), lambda: _build(str(path)),
                 lambda: Datastore.create(str(path), D, overwrite=True, progress=False)):
        with pytest.raises(DatastoreError, match="notes.txt is a file, not a store directory"):
            call()
    with pytest.raises(DatastoreError, match="preparing .*notes.txt failed.*is a file, not a "
                       "store directory; use another path"):
        build_sharded(str(path), 1, lambda p, s, e: _build(p))
    assert "is a file" in verify(str(path)).problems[0]
    assert path.read_text() == "precious"


@cell("symlink loop", "datastore", "DatastoreError \"cannot use <path> (Too many levels of "
      "symbolic links); use another path or fix the link\" from open, create and verify; "
      "the links stay")
@cell("symlink loop", "sharded datastore", "open / verify as a datastore; build_sharded: "
      "DatastoreError \"preparing <path> failed ...: cannot use <path> (Too many levels of "
      "symbolic links); use another path or fix the link\"; the links stay")
def test_symlink_loop(tmp_path):
    loop = symlink_loop(str(tmp_path))
    for call in (lambda: Datastore.open(loop), lambda: _build(loop)):
        with pytest.raises(DatastoreError, match="Too many levels of symbolic links"):
            call()
    with pytest.raises(DatastoreError, match="preparing .*loop failed.*Too many levels of "
                       "symbolic links.*use another path"):
        build_sharded(loop, 1, lambda p, s, e: _build(p))
    assert "Too many levels" in verify(loop).problems[0]
    assert os.path.islink(loop) and not os.path.exists(loop + ".building")


# --------------------------------------------------------------------------- README

def test_every_cell_has_a_known_fault_and_format():
    assert set(TABLE) <= {(f, m) for f in FAULTS for m in FORMATS}


def test_readme_reliability_table_is_generated():
    table = render_table()
    text = README.read_text(encoding="utf-8")
    head, found, rest = text.partition(BEGIN)
    assert found, f"README.md has no {BEGIN} block"
    _, _, tail = rest.partition(END)
    if os.environ.get("KNNFAST_UPDATE_README"):
        README.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")
        return
    assert rest.partition(END)[0].strip() == table, "README's reliability table is stale: " \
        "KNNFAST_UPDATE_README=1 pytest tests/test_fault_injection.py rewrites it"
