"""``knnfast reproduce knnlm-why --quick``: the report's structure (tables, rows, columns,
claims, files) and invariants that hold at any scale (λ = 0 is the base LM, the oracle is
below both, the feature path equals hf.evaluate_lm, a rerun only reads the cache)."""
import json

import pytest

from knnfast import KNNDecoder
from knnfast.app.reproduce import VERDICTS, reproduce
from knnfast.app.reproduce import knnlm_why as K
from knnfast.app.reproduce.lm_world import QUICK, LMWorld
from knnfast.app.reproduce.runner import StudyRun
from knnfast.integrations import hf

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("knnlm_why")
    logs = []
    js = reproduce("knnlm-why", quick=True, out_dir=root / "out", cache_dir=root / "cache",
                   log=logs.append)
    return js, root, logs


def table(js, start):
    hits = [t for t in js["tables"] if t["title"].startswith(start)]
    assert len(hits) == 1, [t["title"] for t in js["tables"]]
    return hits[0]


def test_files_are_written(study):
    js, root, _ = study
    out = root / "out"
    assert json.loads((out / "knnlm-why.json").read_text())["study"] == "knnlm-why"
    md = (out / "knnlm-why.md").read_text()
    assert md.startswith("# Why do nearest neighbor") and "arXiv:2301.02828" in md
    for png in ("knnlm-why-temperature.png", "knnlm-why-size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert js["plots"] == ["knnlm-why-temperature.png", "knnlm-why-size.png"]


def test_tables_rows_and_columns(study):
    js = study[0]
    t = table(js, "Keys × similarity")
    assert t["columns"] == ["keys (h_ds)", "similarity", "k", "τ", "λ", "dev ppl", "test ppl",
                            "oracle ppl"]
    assert [(r["keys (h_ds)"], r["similarity"]) for r in t["rows"]] == [
        ("base LM", "–"), ("att", "L2"), ("att", "IP"), ("ffn", "L2"), ("ffn", "IP")]
    t = table(js, "Exact vs approximate")
    assert [(r["mask (neighbours)"], r["score"]) for r in t["rows"]] == [
        ("real", "real"), ("real", "approx"), ("approx", "real"), ("approx", "approx")]
    t = table(js, "Perplexity against the kNN softmax temperature")
    assert [r["τ"] for r in t["rows"]] == list(K.TEMPERATURES)
    t = table(js, "Perplexity against datastore size")
    entries = [r["datastore entries"] for r in t["rows"]]
    assert len(entries) == len(QUICK.fractions) and entries == sorted(set(entries))
    t = table(js, "Learned multi-embedding")
    assert [r["W_ds"] for r in t["rows"]] == [f"{n} embedding(s) per word" for n in QUICK.me_ns]
    t = table(js, "Evaluation protocol")
    assert [r["protocol"].split()[0] for r in t["rows"]] == ["sliding", "chunks"]
    assert len({r["scored tokens"] for r in t["rows"]}) == 1


def test_settings_table_puts_the_authors_scripts_beside_this_run(study):
    js = study[0]
    t = table(js, "Setting: the authors' scripts")
    assert t["columns"] == ["setting", "paper (authors' scripts)", "this run"]
    rows = {r["setting"]: r for r in t["rows"]}
    assert list(rows) == ["datastore entries", "subsampled datastores", "key dimension", "k",
                          "λ", "FAISS nprobe (approximate search)", "evaluation context"]
    paper = {k: r["paper (authors' scripts)"] for k, r in rows.items()}
    assert paper["datastore entries"] == "153,225,485" and paper["k"] == "1024"
    assert paper["subsampled datastores"] == "5%: 7,661,274, 10%: 15,322,548"
    assert (paper["λ"], paper["key dimension"]) == ("0.25", "1024")
    main = js["results"]["settings"]["att-l2"]
    assert rows["datastore entries"]["this run"] == f"{main['entries']:,}"
    assert rows["k"]["this run"].startswith(f"{main['k']} ")
    sizes = js["results"]["sizes"]
    assert rows["subsampled datastores"]["this run"] == ", ".join(
        f"{s['entries']:,}" for s in sizes[:-1])
    size_claim = next(c for c in js["claims"] if c["claim"].startswith("a larger datastore"))
    assert "7,661,274 (5%)" in size_claim["paper"] and "153,225,485" in size_claim["paper"]


def test_claims_have_valid_verdicts(study):
    claims = study[0]["claims"]
    assert len(claims) == 8
    for c in claims:
        assert c["verdict"] in VERDICTS and c["claim"] and c["ours"] and c["why"]
        assert "2301.02828" not in c["ours"]            # ours = measured, not typed
    oracle = [c for c in claims if c["claim"].startswith("oracle")]
    assert len(oracle) == 1 and oracle[0]["verdict"] != VERDICTS[2]   # measurable at any scale


def test_oracle_is_below_base_and_knn(study):
    res = study[0]["results"]
    for arm in list(res["settings"].values()) + list(res["grid"].values()) + res["sizes"]:
        t = arm["test"]
        assert t["oracle"] <= t["base"] + 1e-9 and t["oracle"] <= t["knn"] + 1e-9
    for p in res["protocol"].values():
        assert p["oracle"] <= min(p["base"], p["knn"]) + 1e-9


def test_same_test_positions_everywhere(study):
    res = study[0]["results"]
    main = res["settings"]["att-l2"]
    base = main["test"]["base"]
    for arm in list(res["settings"].values()) + list(res["grid"].values()) + res["sizes"]:
        assert arm["test"]["base"] == pytest.approx(base, rel=1e-6)
        assert arm["test"]["tokens"] == main["test"]["tokens"]
    for m in res["multi_embedding"]:
        assert m["base_ppl"] == pytest.approx(base, rel=1e-4)
    assert res["protocol"]["sliding"]["tokens"] == main["test"]["tokens"]


def test_feature_path_equals_evaluate_lm(study):
    res = study[0]["results"]
    main, sliding = res["settings"]["att-l2"], res["protocol"]["sliding"]
    for ours, theirs in (("base", "base"), ("knn", "knn"), ("oracle", "oracle")):
        assert main["test"][ours] == pytest.approx(sliding[theirs], rel=1e-4)
    assert res["grid"]["True-True"] == main
    assert res["sizes"][-1]["entries"] == main["entries"]
    at_tau = [e for e in main["sweep"] if e["temperature"] == main["temperature"]][0]
    assert at_tau["test_ppl"] == pytest.approx(main["test"]["knn"], rel=1e-9)


def test_lambda_zero_is_the_base_lm(study):
    _, root, _ = study
    world = LMWorld(StudyRun("knnlm-why", root / "cache", root / "out2", quick=True,
                             log=lambda s: None))
    dec = KNNDecoder(world.datastore("att"), k=max(QUICK.ks), exact=True)
    feats = hf.collect_gold_features(world.model, world.test, dec, hidden="att",
                                     progress=False, scored=world.test_scored)
    r = K.feature_ppl(feats, 4, 10.0, 0.0)
    assert r["knn"] == pytest.approx(r["base"], rel=1e-5)
    e = hf.evaluate_lm(world.model, world.test, KNNDecoder(world.datastore("att"), k=4,
                       temperature=10.0, lam=0.0, exact=True), hidden="att", progress=False,
                       scored=world.test_scored)
    assert e.knn_ppl == pytest.approx(e.base_ppl, rel=1e-5) and e.base_ppl == pytest.approx(
        r["base"], rel=1e-5)


def test_rerun_reads_every_stage_from_the_cache(study):
    js, root, first = study
    logs = []
    again = reproduce("knnlm-why", quick=True, out_dir=root / "out3", cache_dir=root / "cache",
                      log=logs.append)
    stages = [line for line in first if line.endswith(" ...")]
    assert len(stages) >= 12
    assert not [line for line in logs if line.endswith(" ...")]
    assert sum("cached" in line for line in logs) == len(stages)
    assert again["results"]["settings"] == js["results"]["settings"]
    assert again["claims"] == js["claims"]
