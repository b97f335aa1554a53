"""`knnfast reproduce knn-kd --quick`: one run of the quick study (tiny model, real gettext
split), then its tables, claims, files, invariants that hold at any scale, and the resume."""
import json

import pytest

from knnfast.app.reproduce import VERDICTS, reproduce
from knnfast.app.reproduce import knn_kd
from knnfast.app.reproduce.mt_world import QUICK
from knnfast.app.reproduce.report import Report

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("knn_kd")
    kw = dict(quick=True, out_dir=tmp / "out", cache_dir=tmp / "cache")
    first = reproduce("knn-kd", log=lambda line: None, **kw)
    logs = []
    second = reproduce("knn-kd", log=logs.append, **kw)
    return {"json": first, "again": second, "logs": logs, "out": tmp / "out"}


def table(study, title_start):
    tables = [t for t in study["json"]["tables"] if t["title"].startswith(title_start)]
    assert len(tables) == 1, [t["title"] for t in study["json"]["tables"]]
    return tables[0]


def test_files_are_written(study):
    out = study["out"]
    assert (out / "knn-kd.md").read_text().startswith("# kNN-KD")
    assert json.loads((out / "knn-kd.json").read_text())["study"] == "knn-kd"
    assert study["json"]["plots"] == ["knn_kd_sweep.png"]
    assert (out / "knn_kd_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "knn-kd.md").read_text()
    assert "## Claims" in md and "![" in md and "arXiv:2205.00479" in md


def test_systems_table(study):
    t = table(study, "Systems")
    assert t["columns"] == ["system", "decoding", "in_test BLEU", "in_test chrF",
                            "general_dev BLEU", "sentences/s", "× base speed"]
    systems = [r["system"] for r in t["rows"]]
    assert systems[:3] == ["base model", "kNN-MT", "CE fine-tuning"]
    assert [s.split(",")[0] for s in systems[3:]] == ["kNN-KD", "kNN-KD"]
    for row in t["rows"]:
        assert 0 <= row["in_test BLEU"] <= 100 and row["general_dev BLEU"] is not None
        assert row["sentences/s"] > 0
    assert t["rows"][0]["× base speed"] == 1.0


def test_training_table_same_updates_for_every_arm(study):
    t = table(study, "Training cost")
    assert [r["arm"].split(",")[0] for r in t["rows"]] == ["CE fine-tuning", "kNN-KD", "kNN-KD"]
    assert all(r["updates"] == QUICK.finetune_updates for r in t["rows"])
    assert t["rows"][0]["× CE updates/s"] == 1.0
    trained = study["json"]["results"]["trained"]
    assert all(v["updates"] == QUICK.finetune_updates for v in trained.values())


def test_sweep_is_the_k_and_tau_cross_around_the_main_cell(study):
    t = table(study, "k/τ sweep")
    assert t["columns"] == ["k", "τ", "in_test BLEU", "in_test chrF", "Δ BLEU vs CE",
                            "Δ BLEU vs kNN-MT"]
    tau = study["json"]["results"]["tuned_knn_mt"]["best"]["temperature"]
    cells = {(r["k"], float(r["τ"])) for r in t["rows"]}
    expected = {(k, tau) for k in knn_kd.SWEEP_KS} | {(knn_kd.MAIN_K, x) for x in knn_kd.SWEEP_TAUS}
    assert cells == expected and len(t["rows"]) == len(expected)
    # the main cell is the kd_code arm itself (not trained twice)
    main = next(r for r in t["rows"] if (r["k"], float(r["τ"])) == (knn_kd.MAIN_K, tau))
    assert main["in_test BLEU"] == study["json"]["results"]["evaluations"]["kd_code"]["in_test"]["bleu"]
    ce = study["json"]["results"]["evaluations"]["ce"]["in_test"]["bleu"]
    assert all(r["Δ BLEU vs CE"] == pytest.approx(r["in_test BLEU"] - ce) for r in t["rows"])


def test_settings_table_puts_the_paper_beside_this_run(study):
    t = table(study, "Datastores and settings")
    assert [r["data"] for r in t["rows"]][:-1] == ["IWSLT'14 De-En", "IWSLT'15 En-Vi", "Koran",
                                                    "Medical", "Law"]
    ours = t["rows"][-1]
    assert ours["datastore entries"] == study["json"]["results"]["teacher"]["datastore_entries"]
    assert ours["kNN-KD k"] == knn_kd.MAIN_K


def test_paper_bleu_table_quotes_the_paper_beside_this_run(study):
    t = table(study, "The paper's kNN-KD BLEU")
    assert t["columns"] == ["data", "kNN-KD BLEU", "kNN-MT BLEU", "CE BLEU"]
    quoted = knn_kd.PAPER_NUMBERS["reported_bleu"]
    paper, ours = t["rows"][:3], t["rows"][3:]
    assert [(r["data"], r["kNN-KD BLEU"]) for r in paper] == [
        ("Koran", 24.86), ("Medical", 56.50), ("Law", 61.89)]
    assert all(quoted[r["data"]] == r["kNN-KD BLEU"] for r in paper)
    assert all(r["kNN-MT BLEU"] is None and r["CE BLEU"] is None for r in paper)
    ev, base = study["json"]["results"]["evaluations"], study["json"]["results"]["baselines"]
    assert [r["kNN-KD BLEU"] for r in ours] == [ev["kd_paper"]["in_test"]["bleu"],
                                               ev["kd_code"]["in_test"]["bleu"]]
    assert {r["kNN-MT BLEU"] for r in ours} == {base["knn_mt"]["in_test"]["bleu"]}
    assert {r["CE BLEU"] for r in ours} == {ev["ce"]["in_test"]["bleu"]}
    assert "issues/3" in t["note"]


def test_paper_bleu_table_maps_each_loss_to_its_arm():
    # at --quick both kNN-KD arms score the same BLEU, so the mapping is checked on distinct
    # synthetic scores
    report = Report("knn-kd", "t", "p", quick=True)
    ev = lambda bleu: {"in_test": {"bleu": bleu}}  # noqa: E731
    knn_kd.paper_bleu_table(report, {"knn_mt": ev(3.0)},
                            {"ce": ev(1.0), "kd_paper": ev(2.0), "kd_code": ev(4.0)})
    ours = report.tables[0].rows[3:]
    assert [(r["data"][-11:], r["kNN-KD BLEU"], r["kNN-MT BLEU"], r["CE BLEU"]) for r in ours] \
        == [("paper loss)", 2.0, 3.0, 1.0), ("(code loss)", 4.0, 3.0, 1.0)]


def test_claims_have_valid_verdicts(study):
    claims = study["json"]["claims"]
    assert len(claims) == 5
    for c in claims:
        assert c["verdict"] in VERDICTS and c["paper"] and c["ours"] and c["why"]
    assert any("0.22–0.40" in c["paper"] for c in claims)
    bleu_claims = [c for c in claims if c["claim"].startswith("kNN-KD beats")]
    assert len(bleu_claims) == 2
    assert all("Koran 24.86, Medical 56.50, Law 61.89" in c["paper"] for c in bleu_claims)


def test_lambda_zero_decodes_like_the_base_model(study):
    check = study["json"]["results"]["checks"]
    assert check["lambda0_sentences"] > 0
    assert check["lambda0_identical"] == check["lambda0_sentences"]


def test_fused_loss_without_kd_equals_ce(study):
    assert study["json"]["results"]["checks"]["ce_vs_fused_loss_abs_diff"] < 1e-4


def test_teacher_covers_every_datastore_entry_sorted(study):
    teacher = study["json"]["results"]["teacher"]
    assert teacher["positions"] == teacher["datastore_entries"]
    assert teacher["sorted_by_score"] is True
    assert teacher["k"] == min(knn_kd.STORE_K, teacher["datastore_entries"])
    # self-match kept (as in the paper): the nearest neighbour is the position itself
    assert teacher["nearest_is_gold"] > 0.9
    assert teacher["nearest_is_gold"] <= teacher["gold_in_top_k"] <= 1.0


def test_paper_numbers_name_their_source():
    for key, entry in knn_kd.PAPER_NUMBERS.items():
        assert entry["source"], key


def test_resume_reruns_no_stage(study):
    stage_lines = [line for line in study["logs"] if line.startswith("[knn-kd] ")
                   and not line.startswith("[knn-kd] report")
                   and "fine-tunings" not in line]
    assert stage_lines and all("cached" in line for line in stage_lines), stage_lines
    assert study["again"]["tables"] == study["json"]["tables"]
    assert study["again"]["claims"] == study["json"]["claims"]
