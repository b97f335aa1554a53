"""The demo's side of issue 14: a cached base model is reused with a warning, ``retrain=True``
(`knnfast demo --retrain`) trains again, the report records updates, target tokens/s and
wall time, and `knnfast demo --export` fails cleanly without catalogs."""
import json
import time

import pytest
import torch

pytest.importorskip("transformers")

from knnfast.app import demo  # noqa: E402
from knnfast.app.cli import main  # noqa: E402
from knnfast.app.corpus import DemoSplit, TextCodec, train_tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")

PAIRS = [("open the file", "öffne die Datei"), ("close the table", "schließe die Tabelle"),
         ("read the index", "lies den Index"), ("write the role", "schreibe die Rolle")]
TINY = demo.BaseModelConfig(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0,
                            max_positions=32, warmup_steps=2, updates=3)


def test_reuse_warns_and_retrain_trains(tmp_path):
    split = DemoSplit(PAIRS, PAIRS[:1], PAIRS, PAIRS[:2], PAIRS[:2])
    codec = TextCodec(train_tokenizer([t for p in PAIRS for t in p], vocab_size=80))
    logs = []
    torch.manual_seed(0)
    demo.train_base_model(split, codec, tmp_path, log=logs.append, config=TINY, threads=1)
    meta = tmp_path / "base_model" / "train_meta.json"
    assert json.loads(meta.read_text())["steps"] == 3
    assert not any("warning" in line for line in logs)
    first = meta.stat().st_mtime_ns
    logs.clear()
    demo.train_base_model(split, codec, tmp_path, log=logs.append, config=TINY, threads=1)
    warning = [line for line in logs if line.startswith("warning: base model reused")]
    assert warning and "--retrain" in warning[0] and "3 updates" in warning[0]
    assert meta.stat().st_mtime_ns == first
    logs.clear()
    time.sleep(0.01)
    demo.train_base_model(split, codec, tmp_path, log=logs.append, config=TINY, threads=1,
                          retrain=True)
    assert not any("reused" in line for line in logs)
    assert meta.stat().st_mtime_ns > first


def test_report_records_training_and_the_plot_subset():
    report = {"date": "d", "machine": "m", "split": {}, "model": "tiny",
              "training": {"updates": 3000, "train_seconds": 200.0, "target_tokens": 2_000_000,
                           "target_tokens_per_s": 10_000.0, "reused_from_cache": True},
              "knn": {"datastore": {"entries": 10, "dim": 4, "index": "IVF3,Flat", "nprobe": 2},
                      "tuned": {"best": {}}, "systems": {}, "bleu_vs_lambda": [(0.0, 1.0)],
                      "bleu_vs_lambda_subset": {"which": "the first 200 in_test sentences",
                                                "bleu_by_system": {"adaptive kNN-MT": 3.5}},
                      "examples": []}}
    md = demo.render_report(report)
    assert "reused from the cache): 3,000 updates, 10,000 target tokens/s, 200 s wall time" in md
    assert "BLEU against λ (the first 200 in_test sentences)" in md
    assert "adaptive kNN-MT on the same sentences: 3.5" in md


def test_export_without_catalogs_is_one_line(tmp_path, capsys):
    code = main(["demo", "--export", str(tmp_path / "out"), "--locale-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith("knnfast: --export: ") and "--locale-dir" in err[-1]
