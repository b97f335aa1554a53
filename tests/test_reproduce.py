"""`knnfast reproduce`: the study framework (stages, report) and the meta-optimizer study at
its quick scale (tiny Marian on a cut of this machine's gettext catalogs)."""
import json

import pytest

from knnfast.app import reproduce as rp
from knnfast.app.reproduce import meta_optimizer as mo
from knnfast.app.reproduce.report import Report, Table

pytestmark = pytest.mark.usefixtures("single_threaded")


# ------------------------------------------------------------------------------ framework

def test_stage_runs_once_and_resumes(tmp_path):
    calls, logs = [], []
    run = rp.StudyRun("s", tmp_path / "c", tmp_path / "o", log=logs.append)
    assert run.stage("a", lambda: calls.append(1) or {"x": 1}) == {"x": 1}
    again = rp.StudyRun("s", tmp_path / "c", tmp_path / "o", log=logs.append)
    assert again.stage("a", lambda: calls.append(2) or {"x": 2}) == {"x": 1}
    assert calls == [1] and any("cached" in line for line in logs)
    assert again.seconds() == pytest.approx(run.stage_seconds["a"])


def test_stage_failure_leaves_no_result(tmp_path):
    run = rp.StudyRun("s", tmp_path / "c", tmp_path / "o", log=lambda s: None)
    with pytest.raises(RuntimeError):
        run.stage("a", lambda: (_ for _ in ()).throw(RuntimeError("killed")))
    assert run.stage("a", lambda: 5) == 5


def test_quick_and_full_never_share_a_cache(tmp_path):
    q = rp.StudyRun("s", tmp_path, tmp_path / "o", quick=True, log=lambda s: None)
    f = rp.StudyRun("s", tmp_path, tmp_path / "o", quick=False, log=lambda s: None)
    assert q.cache != f.cache and q.shared != f.shared


def test_same_settings_reuse_the_cached_stages(tmp_path):
    run = rp.StudyRun("s", tmp_path, tmp_path / "o", log=lambda s: None)
    run.use_settings({"k": 8, "scale": (1, 2)})
    run.stage("a", lambda: 1)
    again = rp.StudyRun("s", tmp_path, tmp_path / "o", log=lambda s: None)
    again.use_settings({"k": 8, "scale": (1, 2)})
    assert again.stage("a", lambda: 2) == 1


def test_changed_settings_move_the_stale_cache_aside(tmp_path):
    logs = []
    run = rp.StudyRun("s", tmp_path, tmp_path / "o", log=logs.append)
    run.use_settings({"k": 8, "tau": 10.0})
    run.stage("a", lambda: 1)
    again = rp.StudyRun("s", tmp_path, tmp_path / "o", log=logs.append)
    again.use_settings({"k": 16, "tau": 10.0})
    assert again.stage("a", lambda: 2) == 2
    assert any("settings changed" in line and "(k)" in line for line in logs)
    stale = tmp_path / "s" / "full.stale"
    assert json.loads((stale / "stages" / "a.json").read_text())["result"] == 1


def test_a_cache_without_recorded_settings_is_not_trusted(tmp_path):
    run = rp.StudyRun("s", tmp_path, tmp_path / "o", log=lambda s: None)
    run.stage("a", lambda: 1)                     # a cache from before settings were recorded
    again = rp.StudyRun("s", tmp_path, tmp_path / "o", log=lambda s: None)
    again.use_settings({"k": 8})
    assert again.stage("a", lambda: 2) == 2


def test_settings_of_every_study_are_plain_json():
    for name in rp.STUDIES:
        for quick in (True, False):
            settings = rp.study_module(name).cache_settings(quick)
            plain = rp.canonical_settings(settings)
            assert json.loads(json.dumps(plain)) == plain and plain["world"]["name"] == (
                "quick" if quick else "full")


@pytest.mark.parametrize("key", ["", "a/b", ".hidden"])
def test_stage_key_must_be_a_file_name(tmp_path, key):
    run = rp.StudyRun("s", tmp_path, tmp_path / "o", log=lambda s: None)
    with pytest.raises(ValueError, match="key"):
        run.stage(key, lambda: 1)


def test_unknown_study_names_the_choices():
    with pytest.raises(ValueError, match="meta-optimizer"):
        rp.reproduce("nope")


def test_report_renders_claims_tables_and_json(tmp_path):
    r = Report("demo", "Title", "Paper 2023", quick=True)
    r.setup.append("setup line")
    r.table("T", ["a", "b"], [{"a": "x|y", "b": 1.25}, {"a": "z", "b": None}], digits=2)
    r.claim("c", "p", "o", True, "w")
    r.claim("c2", "p", "o", None, "w")
    md, js = r.write(tmp_path, "machine", 61.0, {"s": 61.0})
    text = md.read_text()
    assert "| x|y | 1.25 |" in text and "| z | – |" in text
    assert "**holds in miniature**" in text and "**cannot be tested here**" in text
    assert "--quick" in text and "1.0 min from a cold cache" in text
    text = r.markdown("m", 120.0, {"base model (shared)": 30.0, "s": 90.0})
    assert "2.0 min from a cold cache (base model 0.5 min, shared" in text
    assert "this study's own stages 1.5 min" in text
    data = json.loads(js.read_text())
    assert [c["verdict"] for c in data["claims"]] == [rp.HOLDS, rp.UNTESTABLE]
    assert data["tables"][0]["rows"][0]["b"] == 1.25


def test_table_rows_need_every_column():
    with pytest.raises(ValueError, match="lacks columns"):
        Table("T", ["a", "b"], [{"a": 1}])


def test_claim_verdict_is_checked():
    with pytest.raises(ValueError, match="verdict"):
        rp.Claim("c", "p", "o", "maybe", "w")


def test_word_recall_counts_clipped_occurrences():
    counts = {"tabelle": 3}
    out = mo.word_recall(["die Tabelle Tabelle"], ["die Tabelle Tabelle Tabelle"], counts,
                         edges=(0, 1, 5))
    assert out == [{"bucket": "[0, 1)", "words": 1, "recall": 1.0},
                   {"bucket": "[1, 5)", "words": 3, "recall": 2 / 3},
                   {"bucket": ">= 5", "words": 0, "recall": None}]


# ------------------------------------------------------------------------------ meta-optimizer

@pytest.fixture(scope="module")
def meta(reproduce_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta-out")
    logs = []
    report = rp.reproduce("meta-optimizer", quick=True, out_dir=out, cache_dir=reproduce_cache,
                          log=logs.append)
    return report, out, logs


def _table(report, prefix):
    return next(t for t in report["tables"] if t["title"].startswith(prefix))


def test_meta_writes_markdown_json_and_plot(meta):
    report, out, _ = meta
    assert (out / "meta-optimizer.md").read_text().startswith("# kNN-MT is a meta-optimizer")
    assert json.loads((out / "meta-optimizer.json").read_text())["study"] == "meta-optimizer"
    for plot in report["plots"]:
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"


def test_meta_has_every_arm(meta):
    report, _, _ = meta
    rows = _table(report, "Translation quality")["rows"]
    names = [r["system"] for r in rows]
    sizes = mo.adapter_sizes(32)
    assert names == (["base", "kNN-MT", "adaptive kNN-MT", "OPL", "FT"]
                     + [f"adapter r={r}" for r in sizes]
                     + [f"adaptive kNN-MT + adapter r={sizes[-1]}"])
    for r in rows:
        assert 0 <= r["in-domain BLEU"] <= 100 and 0 <= r["out-of-domain BLEU"] <= 100
        assert r["sentences/s"] > 0
    trained = {r["system"]: r["trained parameters"] for r in rows}
    assert trained["OPL"] < trained["FT"] and trained["adapter r=2"] < trained["adapter r=8"]


def test_meta_claims_have_verdicts(meta):
    report, _, _ = meta
    assert len(report["claims"]) == 4
    assert all(c["verdict"] in rp.VERDICTS and c["ours"] for c in report["claims"])


def test_meta_word_tables(meta):
    report, _, _ = meta
    recall = _table(report, "Recall of reference words")
    assert recall["columns"][0] == "system" and len(recall["rows"]) == 9
    for row in recall["rows"]:
        assert all(v is None or 0 <= v <= 1 for k, v in row.items() if k != "system")
    gold = _table(report, "Gold token among")
    assert [r["bucket"] for r in gold["rows"]] == ["[0, 10)", "[10, 100)", "[100, 1000)", ">= 1000"]
    for r in gold["rows"]:   # accuracy (share of the k) never exceeds recall (any of the k)
        assert r["kNN accuracy, base keys"] <= r["recall@k, base keys"] + 1e-9


def test_meta_agreement_is_a_share(meta):
    report, _, _ = meta
    rows = _table(report, "kNN-MT's next-token choice")["rows"]
    assert [r["model"] for r in rows] == ["kNN-MT", "base", "OPL", "FT"]
    assert rows[0]["agrees with kNN-MT"] is None
    assert all(0 <= r["gold-token accuracy"] <= 1 for r in rows)


def test_meta_resumes_without_rerunning_a_stage(meta, reproduce_cache, tmp_path):
    _, _, first = meta
    logs = []
    rp.reproduce("meta-optimizer", quick=True, out_dir=tmp_path, cache_dir=reproduce_cache,
                 log=logs.append)
    stages = [line for line in logs if line.startswith("[meta-optimizer]") and ": " in line
              and "report" not in line]
    assert stages and all("cached" in line for line in stages)


def test_nested_stage_time_is_counted_once(tmp_path):
    import time
    run = rp.StudyRun("s", tmp_path, tmp_path / "o", log=lambda s: None)

    def outer():
        run.stage("inner", lambda: time.sleep(0.2))
        time.sleep(0.1)

    run.stage("outer", outer)
    assert run.stage_seconds["inner"] >= 0.2
    assert 0.1 <= run.stage_seconds["outer"] < 0.2
    assert run.seconds() == pytest.approx(run.stage_seconds["inner"] + run.stage_seconds["outer"])


def test_index_lists_every_study_and_its_verdicts(meta):
    report, out, _ = meta
    text = (out / "index.md").read_text()
    assert "(meta-optimizer.md)" in text and "quick scale" in text
    assert all(c["verdict"] in text for c in report["claims"])
    assert text.count("not run yet") == len(rp.STUDIES) - 1
