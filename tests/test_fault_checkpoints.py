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


@cell("read-only directory", "demo base-model checkpoint", "DatastoreError \"cannot create "
      "the lock file <cache>/.base_model.lock (Permission denied); make the directory "
      "writable or build somewhere else (nothing was written)\"")
def test_demo_read_only_cache(tmp_path):
    os.chmod(tmp_path, 0o555)
    try:
        kind, msg = in_child(lambda: _demo_train(tmp_path), read_only=True)
    finally:
        os.chmod(tmp_path, 0o755)
    assert kind == "DatastoreError", msg
    assert "knnfast demo: cannot create the lock file" in msg and "Permission denied" in msg
    assert list(tmp_path.iterdir()) == []


@cell("path is a file", "demo base-model checkpoint", "DatastoreError \"<cache> is a file, not "
      "a store directory; use another path (nothing was changed)\"")
@cell("symlink loop", "demo base-model checkpoint", "DatastoreError \"cannot use <cache> (Too "
      "many levels of symbolic links); use another path or fix the link\"; the links stay")
def test_demo_cache_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatastoreError, match="knnfast demo: .*f is a file, not a store dir"):
        _demo_train(tmp_path / "f")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "base_model").write_text("x")
    with pytest.raises(DatastoreError, match="base_model is a file, not a store directory"):
        _demo_train(tmp_path / "c")
    loop = symlink_loop(str(tmp_path))
    with pytest.raises(DatastoreError, match="knnfast demo: cannot use .*Too many levels"):
        _demo_train(loop)
    assert os.path.islink(loop) and (tmp_path / "f").read_text() == "x"


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


@cell("disk full during a write", "reproduce stage cache", "DatastoreError \"cannot write "
      "<stage>.json (File too large); free disk space or make the cache writable, then rerun "
      "(finished stages are kept)\"; no partial file; the rerun runs only that stage")
def test_reproduce_disk_full_keeps_finished_stages(tmp_path):
    from knnfast.app.reproduce.runner import StudyRun
    _stage_run(tmp_path, lambda s: None)

    def two_stages():
        run = StudyRun("study", tmp_path, tmp_path / "out", quick=True, log=lambda s: None)
        run.stage("numbers", lambda: 0)
        return run.stage("more", lambda: ["x" * 5000])
    kind, msg = in_child(two_stages, file_size_limit=2000)
    assert kind == "DatastoreError", msg
    assert "cannot write" in msg and "more.json (File too large)" in msg
    assert "finished stages are kept" in msg
    stages = tmp_path / "study" / "quick" / "stages"
    assert sorted(p.name for p in stages.iterdir()) == ["numbers.json"]
    run, result, calls = _stage_run(tmp_path, lambda s: None)
    assert result == {"bleu": 1.5} and calls == []            # the finished stage is reused


@cell("read-only directory", "reproduce stage cache", "finished stages load; a new stage: "
      "DatastoreError \"cannot write <stage>.json (Permission denied); make the cache "
      "directory writable or pass another --cache-dir (finished stages are kept)\"")
def test_reproduce_read_only_cache(tmp_path):
    from knnfast.app.reproduce.runner import StudyRun
    _stage_run(tmp_path, lambda s: None)
    stages = tmp_path / "study" / "quick" / "stages"
    os.chmod(stages, 0o555)

    def rerun():
        run = StudyRun("study", tmp_path, tmp_path / "out", quick=True, log=lambda s: None)
        cached = run.stage("numbers", lambda: 0)
        return cached, run.stage("more", lambda: 1)
    try:
        kind, msg = in_child(rerun, read_only=True)
    finally:
        os.chmod(stages, 0o755)
    assert kind == "DatastoreError", msg
    assert "knnfast reproduce: cannot write" in msg and "more.json (Permission denied)" in msg
    assert "pass another --cache-dir" in msg
    assert sorted(p.name for p in stages.iterdir()) == ["numbers.json"]


@cell("bit-flipped file", "reproduce stage cache", "each stage file carries a CRC-32 of its "
      "result: a warning \"<stage>.json is corrupt (crc32 mismatch); the stage ... runs "
      "again\" and the stage is recomputed (a flipped digit would still parse as JSON)")
def test_reproduce_bit_flipped_stage_runs_again(tmp_path):
    logs = []
    run, result, calls = _stage_run(tmp_path, logs.append)
    stage = run.cache / "stages" / "numbers.json"
    text = stage.read_text()
    stage.write_text(text.replace("1.5", "1.4"))          # '5' -> '4': one flipped bit
    run, again, calls = _stage_run(tmp_path, logs.append)
    assert again == result == {"bleu": 1.5} and calls == [1]
    assert any("numbers.json is corrupt (crc32 mismatch)" in line for line in logs)


@cell("newer format version", "reproduce stage cache", "the cache's settings.json records the "
      "knnfast version it was built by: another version's cache moves to `<scale>.stale` (a "
      "log line names the changed settings) and the study runs afresh")
def test_reproduce_cache_from_another_version_is_set_aside(tmp_path):
    import json
    from knnfast.app.reproduce.runner import StudyRun
    logs = []
    settings = {"knnfast": "1.0", "scale": "quick"}  # as reproduce() records it
    run = StudyRun("study", tmp_path, tmp_path / "out", quick=True, log=logs.append)
    run.use_settings(settings)
    run.stage("numbers", lambda: 1)
    saved = json.loads((run.cache / "settings.json").read_text())
    (run.cache / "settings.json").write_text(json.dumps(dict(saved, knnfast="99.0")))
    run = StudyRun("study", tmp_path, tmp_path / "out", quick=True, log=logs.append)
    run.use_settings(settings)
    assert any("settings changed" in line and "knnfast" in line and ".stale" in line
               for line in logs)
    assert list((run.cache / "stages").iterdir()) == []
    assert (tmp_path / "study" / "quick.stale" / "stages" / "numbers.json").exists()


@cell("path is a file", "reproduce stage cache", "DatastoreError \"<cache> is a file, not a "
      "store directory; use another path (nothing was changed)\"")
@cell("symlink loop", "reproduce stage cache", "DatastoreError \"cannot use <cache> (Too many "
      "levels of symbolic links); use another path or fix the link\"; the links stay")
def test_reproduce_cache_in_the_way(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(DatastoreError, match="knnfast reproduce: .*f is a file, not a store"):
        _stage_run(tmp_path / "f", lambda s: None)
    loop = symlink_loop(str(tmp_path))
    with pytest.raises(DatastoreError, match="knnfast reproduce: cannot use .*Too many levels"):
        _stage_run(tmp_path / "loop", lambda s: None)
    assert os.path.islink(loop) and (tmp_path / "f").read_text() == "x"
