"""Fault injection on kNN-KD teacher stores and INK checkpoints (issue 19; the datastore
cases and README's table are in test_fault_injection.py)."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import knnfast.integrations.hf as H  # noqa: E402
import knnfast.storage.checksums as checksums  # noqa: E402
from knnfast import DatastoreError  # noqa: E402
from knnfast.methods import ink  # noqa: E402
from knnfast.methods.kd import FILES, TeacherStore  # noqa: E402
from knnfast.storage.building import acquire_build_lock  # noqa: E402
from fault_helpers import cell, files_equal, flip_bit, in_child, symlink_loop  # noqa: E402
from helpers import random_sequences, tiny_marian  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")
V = 61


@pytest.fixture(scope="module")
def marian():
    return tiny_marian(V, d_model=32, max_positions=64)


@pytest.fixture(scope="module")
def pairs():
    return list(zip(random_sequences(12, 3, 9, 1, V), [s + [1] for s in
                                                       random_sequences(12, 2, 8, 2, V)]))


@pytest.fixture(scope="module")
def ds(marian, pairs, tmp_path_factory):
    return H.build_datastore(marian, pairs, str(tmp_path_factory.mktemp("fault") / "ds"),
                             batch_size=5, progress=False)


def _teacher(marian, ds, pairs, path, k=4, **kw):
    return TeacherStore.build(marian, ds, pairs, str(path), k=k, batch_size=3, progress=False,
                              **kw)


# --------------------------------------------------------------------------- teacher store

@cell("disk full during a write", "teacher store", "DatastoreError naming the file (File too "
      "large), committed sentences kept; rerunning (resume=True, the default) gives a bitwise "
      "identical store")
def test_teacher_disk_full_then_resume(marian, ds, pairs, tmp_path):
    whole = _teacher(marian, ds, pairs, tmp_path / "whole", k=16)
    path = tmp_path / "t"
    limit = os.path.getsize(os.path.join(whole.path, "tokens")) * 2 // 3
    kind, msg = in_child(lambda: _teacher(marian, ds, pairs, path, k=16),
                         file_size_limit=limit)
    assert kind == "DatastoreError", msg
    assert "t.building/tokens" in msg and "File too large" in msg and "resume=True" in msg
    assert not path.exists()
    assert 0 < len(json.load(open(f"{path}.building/progress.json"))["cursor"]) < len(pairs)
    store = _teacher(marian, ds, pairs, path, k=16)
    assert files_equal(store.path, whole.path, FILES)
    assert TeacherStore.verify(store.path).ok


@cell("two writers on one path", "teacher store", "the second build: DatastoreError \"being "
      "built by another writer (pid N; lock ...)\"; nothing of the first is touched")
def test_teacher_second_writer(marian, ds, pairs, tmp_path):
    lock = acquire_build_lock(str(tmp_path / "t"), "first build")
    try:
        with pytest.raises(DatastoreError, match="being built by another writer"):
            _teacher(marian, ds, pairs, tmp_path / "t", overwrite=True)
    finally:
        os.close(lock)


@cell("truncated file", "teacher store", "open: DatastoreError \"<file> has N bytes but "
      "meta.json says M ...; rebuild it\"; verify lists the file")
@cell("bit-flipped file", "teacher store", "open succeeds; `TeacherStore.verify` / `knnfast "
      "verify` names the file and block")
@cell("newer format version", "teacher store", "DatastoreError \"... has format version 2, "
      "written by a newer knnfast ...; upgrade knnfast to read it\"")
def test_teacher_damaged(marian, ds, pairs, tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "BLOCK_BYTES", 64)
    store = _teacher(marian, ds, pairs, tmp_path / "t")
    assert TeacherStore.verify(store.path).checksummed
    scores = os.path.join(store.path, "scores")
    flip_bit(scores, 100)
    TeacherStore.open(store.path)
    problems = TeacherStore.verify(store.path).problems
    assert len(problems) == 1 and problems[0].startswith(f"{scores}: block 1 (bytes 64..128)")
    os.truncate(os.path.join(store.path, "offsets"), 8)
    with pytest.raises(DatastoreError, match="offsets has 8 bytes but meta.json says 104"):
        TeacherStore.open(store.path)
    meta_file = os.path.join(store.path, "meta.json")
    json.dump(dict(json.load(open(meta_file)), format_version=2), open(meta_file, "w"))
    with pytest.raises(DatastoreError, match="format version 2, written by a newer knnfast"):
        TeacherStore.open(store.path)


@cell("path is a file", "teacher store", "DatastoreError \"<path> is a file, not a store "
      "directory; use another path (nothing was changed)\"")
@cell("symlink loop", "teacher store", "DatastoreError \"cannot use <path> (Too many levels of "
      "symbolic links); use another path or fix the link\"")
def test_teacher_bad_paths(marian, ds, pairs, tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    for path, says in ((str(file), "is a file, not a store directory"),
                       (symlink_loop(str(tmp_path)), "Too many levels of symbolic links")):
        for call in (lambda: _teacher(marian, ds, pairs, path, overwrite=True),
                     lambda: TeacherStore.open(path)):
            with pytest.raises(DatastoreError, match=says):
                call()
    assert file.read_text() == "x"


@cell("read-only directory", "teacher store", "DatastoreError \"cannot create the lock file "
      "<.t.lock> (Permission denied); make the directory writable or build somewhere else "
      "(nothing was written)\"")
def test_teacher_read_only_directory(marian, ds, pairs, tmp_path):
    os.chmod(tmp_path, 0o555)
    try:
        kind, msg = in_child(lambda: _teacher(marian, ds, pairs, tmp_path / "t"), read_only=True)
    finally:
        os.chmod(tmp_path, 0o755)
    assert kind == "DatastoreError", msg
    assert "TeacherStore.build: cannot create the lock file" in msg and "Permission denied" in msg
    assert "make the directory writable" in msg and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- INK

def _ink(pairs, workdir, epochs=1):
    model = tiny_marian(V, d_model=32, max_positions=64)
    return ink.train_ink(model, pairs, str(workdir), epochs=epochs, batch_size=4, k=4,
                         dropout=0.0, progress=False, log=lambda s: None)


@cell("truncated file", "INK checkpoint", "DatastoreError \"checkpoint <ink_ckpt.pt> is "
      "truncated (N of M bytes); delete it (training restarts from epoch 0)\"")
@cell("bit-flipped file", "INK checkpoint", "DatastoreError \"checkpoint ... is corrupt (crc32 "
      "mismatch ...); delete it ...\" (torch.load alone would load the flipped weights)")
def test_ink_damaged_checkpoint(pairs, tmp_path):
    _ink(pairs, tmp_path / "w")
    ckpt = tmp_path / "w" / "ink_ckpt.pt"
    data = ckpt.read_bytes()
    flip_bit(ckpt, len(data) // 2)
    with pytest.raises(DatastoreError, match=f"checkpoint {ckpt} is corrupt \\(crc32 mismatch"):
        _ink(pairs, tmp_path / "w", epochs=2)
    ckpt.write_bytes(data[:len(data) // 3])
    with pytest.raises(DatastoreError, match="is truncated .*delete it \\(training restarts"):
        _ink(pairs, tmp_path / "w", epochs=2)
    ckpt.unlink()                                         # the advice works
    assert [h["epoch"] for h in _ink(pairs, tmp_path / "w", epochs=1)] == [1]


@cell("two writers on one path", "INK checkpoint", "the second train_ink on a workdir: "
      "DatastoreError \"being built by another writer (pid N; lock ...)\" before any work")
@cell("path is a file", "INK checkpoint", "DatastoreError \"<workdir> is a file, not a store "
      "directory; use another path\"")
@cell("symlink loop", "INK checkpoint", "DatastoreError \"cannot use <workdir> (Too many "
      "levels of symbolic links); use another path or fix the link\"")
def test_ink_workdir_faults(pairs, tmp_path):
    lock = acquire_build_lock(str(tmp_path / "w"), "another run")
    try:
        with pytest.raises(DatastoreError, match="being built by another writer"):
            _ink(pairs, tmp_path / "w")
    finally:
        os.close(lock)
    assert not (tmp_path / "w" / "ink_ckpt.pt").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatastoreError, match="f is a file, not a store directory"):
        _ink(pairs, tmp_path / "f")
    with pytest.raises(DatastoreError, match="Too many levels of symbolic links"):
        _ink(pairs, symlink_loop(str(tmp_path)))


@cell("disk full during a write", "INK checkpoint", "DatastoreError \"cannot write the "
      "checkpoint <ink_ckpt.pt> (File too large); the previous checkpoint is intact: free "
      "disk space ...\"; the rerun resumes after the last saved epoch")
def test_ink_disk_full_keeps_the_previous_checkpoint(pairs, tmp_path):
    _ink(pairs, tmp_path / "w")
    ckpt = tmp_path / "w" / "ink_ckpt.pt"
    before = ckpt.read_bytes()
    limit = len(before) - 10          # the datastore files stay below; the checkpoint does not
    kind, msg = in_child(lambda: _ink(pairs, tmp_path / "w", epochs=2), file_size_limit=limit)
    assert kind == "DatastoreError", msg
    assert f"cannot write the checkpoint {ckpt} (File too large)" in msg
    assert "the previous checkpoint is intact" in msg
    assert ckpt.read_bytes() == before
    assert [h["epoch"] for h in _ink(pairs, tmp_path / "w", epochs=2)] == [1, 2]


@cell("read-only directory", "INK checkpoint", "DatastoreError \"Datastore.create: cannot "
      "prepare <workdir>/datastore.building (Permission denied); make the directory writable "
      "...\" before any training; the checkpoint is intact and the rerun resumes")
def test_ink_read_only_workdir(pairs, tmp_path):
    _ink(pairs, tmp_path / "w")
    ckpt = tmp_path / "w" / "ink_ckpt.pt"
    before = ckpt.read_bytes()
    os.chmod(tmp_path / "w", 0o555)
    try:
        kind, msg = in_child(lambda: _ink(pairs, tmp_path / "w", epochs=2), read_only=True)
    finally:
        os.chmod(tmp_path / "w", 0o755)
    assert kind == "DatastoreError", msg
    assert "datastore.building (Permission denied); make the directory writable" in msg, msg
    assert ckpt.read_bytes() == before
    assert [h["epoch"] for h in _ink(pairs, tmp_path / "w", epochs=2)] == [1, 2]


@cell("newer format version", "INK checkpoint", "DatastoreError \"checkpoint <ink_ckpt.pt> has "
      "format version 2, written by a newer knnfast; upgrade knnfast, or delete it (training "
      "restarts from epoch 0)\"")
def test_ink_checkpoint_from_a_newer_knnfast(pairs, tmp_path):
    from knnfast.storage.checkpoint import MAGIC
    _ink(pairs, tmp_path / "w")
    ckpt = tmp_path / "w" / "ink_ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes().replace(MAGIC + b" 1 ", MAGIC + b" 2 ", 1))
    with pytest.raises(DatastoreError, match=f"train_ink: checkpoint {ckpt} has format version "
                       "2, written by a newer knnfast; upgrade knnfast, or delete it"):
        _ink(pairs, tmp_path / "w", epochs=2)
