"""`knnfast reproduce ink --quick`: one run of the quick study (tiny model, real gettext split),
then its tables, claims, files, invariants that hold at any scale, and the resume."""
import json

import pytest

import knnfast
from knnfast.app.reproduce import VERDICTS, reproduce
from knnfast.app.reproduce import ink, ink_arms
from knnfast.app.reproduce.mt_world import MTWorld
from knnfast.app.reproduce.report import Report
from knnfast.app.reproduce.runner import StudyRun

pytestmark = pytest.mark.usefixtures("single_threaded")

SYSTEMS = ["base", "kNN-MT", "adaptive kNN-MT", "robust kNN-MT", "adapter", "INK",
           "INK w/o L_i", "INK w/o L_r", "INK w/o refresh", "INK + kNN"]
RETRIEVAL = {"kNN-MT", "adaptive kNN-MT", "robust kNN-MT", "INK + kNN"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ink")
    kw = dict(quick=True, out_dir=tmp / "out", cache_dir=tmp / "cache")
    first_logs, logs = [], []
    first = reproduce("ink", log=first_logs.append, **kw)
    second = reproduce("ink", log=logs.append, **kw)
    return {"json": first, "again": second, "first_logs": first_logs, "logs": logs,
            "out": tmp / "out", "cache": tmp / "cache"}


@pytest.fixture(scope="module")
def world(study):
    """The quick world again, from the study's cache (nothing is trained)."""
    run = StudyRun("ink", study["cache"], study["out"], quick=True, log=lambda line: None)
    return run, MTWorld(run)


def table(study, title_start):
    tables = [t for t in study["json"]["tables"] if t["title"].startswith(title_start)]
    assert len(tables) == 1, [t["title"] for t in study["json"]["tables"]]
    return tables[0]


def rows_by(t, key):
    return {r[key]: r for r in t["rows"]}


def test_files_are_written(study):
    out = study["out"]
    md = (out / "ink.md").read_text()
    assert md.startswith("# INK in miniature")
    assert "## Claims" in md and "arXiv:2306.06381" in md and "![" in md
    assert json.loads((out / "ink.json").read_text())["study"] == "ink"
    assert study["json"]["plots"] == ["ink_knn_accuracy.png"]
    assert (out / "ink_knn_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_systems_table(study):
    t = table(study, "Systems on in_test")
    assert t["columns"] == ["system", "datastore while decoding", "BLEU", "chrF", "sentences/s",
                            "× base speed", "× kNN-MT speed"]
    assert [r["system"] for r in t["rows"]] == SYSTEMS
    for r in t["rows"]:
        assert 0 <= r["BLEU"] <= 100 and 0 <= r["chrF"] <= 100 and r["sentences/s"] > 0
        assert r["datastore while decoding"] == ("yes" if r["system"] in RETRIEVAL else "no")
    rows = rows_by(t, "system")
    assert rows["base"]["× base speed"] == 1.0 and rows["kNN-MT"]["× kNN-MT speed"] == 1.0


def test_ablation_table_sets_what_it_says(study):
    t = table(study, "INK ablations")
    rows = rows_by(t, "variant")
    assert list(rows) == ["INK", "INK w/o L_i", "INK w/o L_r", "INK w/o refresh"]
    s = ink_arms.QUICK_INK
    settings = {n: (r["α (L_i)"], r["β (L_r)"], r["refresh"]) for n, r in rows.items()}
    assert settings == {"INK": (s.alpha, s.beta, "every epoch"),
                        "INK w/o L_i": (0.0, s.beta, "every epoch"),
                        "INK w/o L_r": (s.alpha, 0.0, "every epoch"),
                        "INK w/o refresh": (s.alpha, s.beta, "never")}
    assert rows["INK"]["Δ BLEU vs INK"] == 0
    systems = rows_by(table(study, "Systems on in_test"), "system")
    for name, r in rows.items():
        assert r["BLEU"] == systems[name]["BLEU"]
        assert r["last-epoch L_a"] > 0 and r["L_i"] >= 0 and r["L_r"] >= 0


def test_every_arm_trains_the_same_updates_and_refreshes_as_declared(study):
    trained = study["json"]["results"]["trained"]
    epochs = ink_arms.QUICK_INK.epochs
    updates = study["json"]["results"]["systems"]["adapter"]["train"]["updates"]
    assert updates > 0 and all(t["updates"] == updates for t in trained.values())
    for name, t in trained.items():
        assert [h["epoch"] for h in t["history"]] == list(range(1, epochs + 1))
        refreshed = [h["refreshed"] for h in t["history"]]
        assert refreshed == ([True] + [False] * (epochs - 1) if name == "INK w/o refresh"
                             else [True] * epochs)
    t = table(study, "Training cost")
    assert t["columns"] == ["arm", "updates", "trained here", "seconds", "updates/s",
                            "includes"]
    rows = rows_by(t, "arm")
    assert list(rows) == ["adapter (CE)", "INK", "INK w/o L_i", "INK w/o L_r",
                          "INK w/o refresh"]
    assert all(r["updates"] == updates for r in t["rows"])
    # INK w/o refresh starts from INK's first-epoch checkpoint: it trains the later epochs
    per_epoch = updates // epochs
    assert rows["INK w/o refresh"]["trained here"] == updates - per_epoch
    assert all(r["trained here"] == updates for n, r in rows.items() if n != "INK w/o refresh")
    trained_epochs = [line.split(":")[0] for line in study["first_logs"]
                      if line.startswith("INK epoch ")]
    assert trained_epochs == ["INK epoch 1", "INK epoch 2"] * 3 + ["INK epoch 2"]
    assert trained["INK w/o refresh"]["history"][0] == trained["INK"]["history"][0]


def test_memory_table(study):
    t = table(study, "Memory beside the base model")
    assert t["columns"] == ["system", "kept", "entries + parameters", "MB", "× kNN-MT"]
    rows = rows_by(t, "system")
    assert list(rows) == ["base", "kNN-MT", "adaptive kNN-MT", "robust kNN-MT", "adapter",
                          "INK", "INK + kNN"]
    mem = study["json"]["results"]["memory"]
    assert mem["adapter_bytes"] == 4 * mem["adapter_params"]  # float32 adapters
    assert rows["INK"]["MB"] == rows["adapter"]["MB"] == mem["adapter_bytes"] / 1e6
    assert rows["kNN-MT"]["× kNN-MT"] == 1.0 and rows["base"]["MB"] == 0
    # the INK datastore holds the same in_train positions as the base datastore
    assert mem["ink_datastore"]["entries"] == mem["datastore"]["entries"] > 0
    assert rows["robust kNN-MT"]["MB"] > rows["kNN-MT"]["MB"] > rows["INK"]["MB"]


def test_paper_table_puts_the_abstract_beside_this_run(study):
    t = table(study, "INK against the state-of-the-art kNN-MT system")
    assert t["columns"] == ["measure", "paper", "this run (INK vs robust kNN-MT)"]
    rows = rows_by(t, "measure")
    assert list(rows) == ["BLEU gain", "COMET gain", "× memory", "× inference speed"]
    assert [r["paper"] for r in rows.values()] == [1.0, 1.99, 0.02, 1.9]
    ours = {m: r["this run (INK vs robust kNN-MT)"] for m, r in rows.items()}
    systems, mem = study["json"]["results"]["systems"], study["json"]["results"]["memory"]
    assert ours["BLEU gain"] == pytest.approx(
        systems["INK"]["bleu"] - systems["robust kNN-MT"]["bleu"])
    assert ours["COMET gain"] is None                  # not measured: no COMET model offline
    assert ours["× inference speed"] == pytest.approx(
        systems["INK"]["sentences_per_s"] / systems["robust kNN-MT"]["sentences_per_s"])
    # the same robust kNN-MT bytes as the memory table's row
    robust_mb = rows_by(table(study, "Memory beside"), "system")["robust kNN-MT"]["MB"]
    assert ours["× memory"] == pytest.approx(mem["adapter_bytes"] / (robust_mb * 1e6))


def test_paper_table_compares_ink_with_robust_knn_mt():
    # distinct synthetic figures (at --quick several of them coincide)
    systems = {"INK": {"bleu": 5.0, "sentences_per_s": 10.0},
               "robust kNN-MT": {"bleu": 3.0, "sentences_per_s": 4.0, "extra_params": 10,
                                 "extra_bytes": 60}}
    mem = {"adapter_bytes": 50, "datastore": {"store": 700, "index": 200}}
    report = Report("ink", "t", "p", quick=True)
    ink.paper_table(report, systems, mem)
    ours = [r["this run (INK vs robust kNN-MT)"] for r in report.tables[0].rows]
    assert ours == [2.0, None, pytest.approx(50 / 1000), 2.5]   # robust: 700 + 200 + 4·10 + 60


def test_knn_accuracy_table(study):
    t = table(study, "Mean kNN accuracy by gold-token frequency")
    assert [r["gold-token frequency in in_train"] for r in t["rows"]] == [
        "[0, 10)", "[10, 100)", "[100, 1000)", ">= 1000"]
    acc = study["json"]["results"]["knn_accuracy"]
    # same test positions in the same buckets for both representations
    assert [b["positions"] for b in acc["base"]] == [b["positions"] for b in acc["INK"]]
    assert sum(r["positions"] for r in t["rows"]) > 0
    for r in t["rows"]:
        if r["positions"] == 0:
            assert r["base kNN accuracy"] is None and r["Δ"] is None
            continue
        for who in ("base", "INK"):
            assert 0 <= r[f"{who} kNN accuracy"] <= r[f"{who} recall@k"] <= 1
        assert r["Δ"] == pytest.approx(r["INK kNN accuracy"] - r["base kNN accuracy"])


def test_claims(study):
    claims = study["json"]["claims"]
    assert len(claims) == 8
    assert all(c["verdict"] in VERDICTS and c["paper"] and c["ours"] and c["why"]
               for c in claims)
    by_start = {c["claim"].split(" ")[0] + c["claim"].split(" ")[1]: c for c in claims}
    assert "1.9×" in by_start["INKdecodes"]["paper"]
    assert "0.02×" in by_start["INKneeds"]["paper"]
    assert "1.99 COMET" in by_start["INKbeats"]["paper"]
    assert sum("not available offline" in c["paper"] for c in claims) == 5


def test_resume_reruns_no_stage(study):
    stages = [line for line in study["logs"] if line.startswith("[ink] ") and
              line.endswith(" ...")]
    assert stages == []
    cached = [line for line in study["logs"] if line.startswith("[ink] ") and
              line.endswith(", cached")]
    own = [k for k in study["json"]["stage_seconds"] if not k.endswith("(shared)")]
    assert len(cached) == len(own) == 17
    assert not any("INK epoch" in line for line in study["logs"])
    assert study["again"]["tables"] == study["json"]["tables"]
    assert study["again"]["claims"] == study["json"]["claims"]


def test_fresh_adapters_reproduce_the_base_model(study, world):
    """Adapters start with a zero up-projection: before training they change nothing."""
    run, w = world
    s = ink_arms.settings(run)
    pairs = ink_arms.test_pairs(w, s)[:3]
    base = w.evaluate(w.model, pairs)["hyps"]
    assert w.evaluate(ink_arms.adapted_model(w, s), pairs)["hyps"] == base
    assert base == study["json"]["results"]["systems"]["base"]["first_hyps"]


def test_trained_ink_reloads_and_lambda_zero_is_ink_alone(study, world):
    """The INK arm reloads from its checkpoint (no training) and decodes what the study
    decoded; kNN with λ = 0 over the INK datastore reproduces INK alone."""
    run, w = world
    s = ink_arms.settings(run)
    model, history = ink_arms.ink_model(run, w, s, ink_arms.ARMS["INK"])
    assert len(history) == s.epochs
    pairs = ink_arms.test_pairs(w, s)[:3]
    alone = w.evaluate(model, pairs)["hyps"]
    assert alone == study["json"]["results"]["systems"]["INK"]["first_hyps"]
    ds = ink_arms.ink_datastore(run, w, model)
    dec = knnfast.KNNDecoder(ds, k=4, temperature=10.0, lam=0.0, exact=True)
    assert w.evaluate(model, pairs, dec)["hyps"] == alone


def test_paper_numbers_are_the_abstracts():
    assert ink.PAPER_NUMBERS["source"] == "arXiv:2306.06381, abstract"
    assert (ink.PAPER_NUMBERS["speedup"], ink.PAPER_NUMBERS["memory_ratio"]) == (1.9, 0.02)
    assert ink.STUDY == "ink" and "arXiv:2306.06381" in ink.PAPER
