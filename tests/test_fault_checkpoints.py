"""Fault injection on the checksummed training checkpoints (knnfast.storage.checkpoint: INK
and the demo's base model) and on the caches of the demo and of `knnfast reproduce` (issue
19; README's table is rendered in test_fault_injection.py)."""
import os

import pytest
import torch

from knnfast import DatastoreError
from knnfast.storage.building import acquire_build_lock
from knnfast.storage.checkpoint import MAGIC, load_checkpoint, save_checkpoint
from fault_helpers import cell, flip_bit, in_child, symlink_loop

pytestmark = pytest.mark.usefixtures("single_threaded")

STATE = {"weights": torch.arange(1000, dtype=torch.float32), "step": 7}


def _load(path):
    return load_checkpoint(path, "trainer", "training restarts")


def test_round_trip_and_plain_torch_files(tmp_path):
    path = tmp_path / "c.pt"
    assert _load(path) is None
    save_checkpoint(STATE, path, "trainer")
    assert path.read_bytes().startswith(MAGIC)
    got = _load(path)
    assert torch.equal(got["weights"], STATE["weights"]) and got["step"] == 7
    torch.save(STATE, path)                 # a checkpoint from before the header: still read
    assert _load(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]   # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "flip", "newer", "header"])
def test_damaged_checkpoint_is_named(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(STATE, path, "trainer")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-100])
        says = "is truncated"
    elif damage == "flip":
        flip_bit(path, len(data) - 2000)      # inside the tensor bytes torch.load would accept
        says = "is corrupt \\(crc32 mismatch"
    elif damage == "newer":
        path.write_bytes(data.replace(MAGIC + b" 1 ", MAGIC + b" 2 ", 1))
        says = "format version 2, written by a newer knnfast; upgrade knnfast, or delete it"
    else:
        path.write_bytes(MAGIC + b" x\n" + data)
        says = "is corrupt \\(unreadable header\\)"
    with pytest.raises(DatastoreError, match=f"trainer: checkpoint {path} {says}"
                       if damage != "newer" else says):
        _load(path)


def test_disk_full_and_read_only_keep_the_previous_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"step": 1}, path, "trainer")
    before = path.read_bytes()
    kind, msg = in_child(lambda: save_checkpoint(STATE, path, "trainer"), file_size_limit=1000)
    assert kind == "DatastoreError", msg
    assert "cannot write the checkpoint" in msg and "File too large" in msg
    assert "the previous checkpoint is intact" in msg
    os.chmod(tmp_path, 0o555)
    try:
        kind, msg = in_child(lambda: save_checkpoint(STATE, path, "trainer"), read_only=True)
    finally:
        os.chmod(tmp_path, 0o755)
    assert kind == "DatastoreError" and "Permission denied" in msg, msg
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_checkpoint_path_faults(tmp_path):
    with pytest.raises(DatastoreError, match="cannot read the checkpoint .*Is a directory"):
        _load(tmp_path)
    with pytest.raises(DatastoreError, match="Too many levels of symbolic links"):
        _load(symlink_loop(str(tmp_path)))


# --------------------------------------------------------------------------- the demo

def _demo_train(cache):
    pytest.importorskip("transformers")
    from knnfast.app.corpus import DemoSplit, TextCodec, train_tokenizer
    from knnfast.app.demo.base_model import BaseModelConfig, train_base_model
    pairs = [("could not open file", "konnte Datei nicht öffnen"), ("read table", "Tabelle lesen")]
    split = DemoSplit(general_train=pairs * 4, general_dev=pairs, in_train=pairs, in_dev=pairs,
                      in_test=pairs)
    codec = TextCodec(train_tokenizer([t for p in pairs for t in p], vocab_size=60))
    config = BaseModelConfig(d_model=16, layers=1, heads=2, ffn_dim=32, updates=2,
                             max_positions=32)
    return train_base_model(split, codec, cache, log=lambda s: None, config=config, threads=1)


@cell("truncated file", "demo base-model checkpoint", "DatastoreError \"checkpoint "
      "<base_model.ckpt> is truncated ...; delete it (training restarts from update 0)\"")
@cell("bit-flipped file", "demo base-model checkpoint", "DatastoreError \"checkpoint ... is "
      "corrupt (crc32 mismatch ...); delete it ...\"")
@cell("newer format version", "demo base-model checkpoint", "DatastoreError \"checkpoint ... "
      "has format version 2, written by a newer knnfast; upgrade knnfast, or delete it\"")
def test_demo_damaged_checkpoint(tmp_path):
    ckpt = tmp_path / "base_model.ckpt"
    save_checkpoint(STATE, ckpt, "knnfast demo")
    data = ckpt.read_bytes()
    for damaged, says in ((data[:500], "is truncated"),
                          (data.replace(MAGIC + b" 1 ", MAGIC + b" 2 "), "format version 2"),
                          (None, "crc32 mismatch")):
        if damaged is None:
            ckpt.write_bytes(data)
            flip_bit(ckpt, len(data) - 2000)
        else:
            ckpt.write_bytes(damaged)
        with pytest.raises(DatastoreError, match=f"knnfast demo: checkpoint {ckpt} .*{says}"):
            _demo_train(tmp_path)
    ckpt.unlink()
    assert _demo_train(tmp_path) is not None and (tmp_path / "base_model").is_dir()


@cell("two writers on one path", "demo base-model checkpoint", "the second `knnfast demo` on "
      "a cache: DatastoreError \"base_model is being built by another writer (pid N; ...)\"")
def test_demo_second_trainer(tmp_path):
    lock = acquire_build_lock(str(tmp_path / "base_model"), "the first demo")
    try:
        with pytest.raises(DatastoreError, match="base_model is being built by another writer"):
            _demo_train(tmp_path)
    finally:
        os.close(lock)


@cell("disk full during a write", "demo base-model checkpoint", "DatastoreError \"cannot "
      "save <cache>/base_model (File too large); free disk space ..., then rerun (the "
      "previous version is kept)\"")
def test_demo_disk_full(tmp_path):
    kind, msg = in_child(lambda: _demo_train(tmp_path), file_size_limit=4000)
    assert kind == "DatastoreError", msg
    assert f"cannot save {tmp_path / 'base_model'} (" in msg and "File too large" in msg
    assert not (tmp_path / "base_model").exists()


# --------------------------------------------------------------------------- reproduce

def _stage_run(cache, log):
    from knnfast.app.reproduce.runner import StudyRun
    run = StudyRun("study", cache, cache / "out", quick=True, log=log)
    calls = []
    result = run.stage("numbers", lambda: calls.append(1) or {"bleu": 1.5})
    return run, result, calls


@cell("truncated file", "reproduce stage cache", "a warning naming the stage file "
      "(\"unreadable ...; the stage runs again\") and the stage is recomputed")
def test_reproduce_truncated_stage_runs_again(tmp_path):
    logs = []
    run, result, calls = _stage_run(tmp_path, logs.append)
    stage = next((run.cache / "stages").glob("numbers.json"))
    stage.write_text(stage.read_text()[:10])
    run, again, calls = _stage_run(tmp_path, logs.append)
    assert again == result and calls == [1]
    assert any("numbers.json" in line and "unreadable" in line for line in logs)


@cell("two writers on one path", "reproduce stage cache", "the second `knnfast reproduce "
      "<study>` on a cache: DatastoreError \"... is being built by another writer (pid N; "
      "lock ...)\" before any stage runs")
def test_reproduce_second_run_on_a_cache_fails_at_once(tmp_path):
    from knnfast.app import reproduce as rp
    from knnfast.storage.building import acquire_build_lock
    first = rp.StudyRun("knn-kd", tmp_path, tmp_path / "out", quick=True, log=lambda s: None)
    held = acquire_build_lock(first.cache, "the first run")
    logs = []
    try:
        with pytest.raises(DatastoreError, match="being built by another writer"):
            rp.reproduce("knn-kd", quick=True, out_dir=tmp_path / "out", cache_dir=tmp_path,
                         log=logs.append)
    finally:
        os.close(held)
    assert not any("..." in line for line in logs)   # no stage started
