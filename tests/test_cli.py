"""Smoke tests of the ``knnfast`` command (knnfast.app.cli) on tiny models built in the test
(tests/cli_env.py). Commands run in-process through ``knnfast.app.cli.main`` (their JSON is
read back from stdout / stderr); one subprocess test checks ``python -m knnfast --help`` and
a sub-command's examples epilog. The mistake cases are in test_cli_errors.py, the help
examples in test_cli_examples.py.
"""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
faiss = pytest.importorskip("faiss")

from cli_env import PAIRS, env, fail, gpt2_ds, marian_ds, run_json  # noqa: E402,F401
from knnfast import Datastore  # noqa: E402
from knnfast.app.cli import main  # noqa: E402
from knnfast.defaults import KNN_LM  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures("single_threaded")


def _target_tokens(tok):
    return sum(len(ids) for ids in tok(text_target=[t for _, t in PAIRS])["input_ids"])


# --------------------------------------------------------------------------- help


def test_help_subprocess():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for argv, want in ((["--help"], "build-datastore"), (["translate", "--help"], "examples:")):
        r = subprocess.run([sys.executable, "-m", "knnfast", *argv], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert want in r.stdout
    assert "knnfast translate --model" in r.stdout          # the epilog, unwrapped


# --------------------------------------------------------------------------- build-datastore


def test_build_datastore(env, marian_ds, capsys):
    ds = Datastore.open(marian_ds)
    assert len(ds) == _target_tokens(env["tok"])
    assert ds.meta["hidden"] == "ffn" and ds.dim == 32 and ds.vocab_size == len(env["tok"])
    assert ds.meta["extra"]["causal"] is False and ds.meta["extra"]["examples"] == len(PAIRS)

    out = str(env["root"] / "ds_att")
    res = run_json(capsys, "build-datastore", "--model", env["marian"], "--corpus", env["tsv"],
                   "--out", out, "--hidden", "att", "--limit", "10")
    n10 = sum(len(ids) for ids in env["tok"](text_target=[t for _, t in PAIRS[:10]])["input_ids"])
    assert res["entries"] == n10 and res["examples"] == 10 and res["dim"] == 32
    assert res["datastore"] == out
    att = Datastore.open(out)
    assert att.meta["hidden"] == "att" and len(att) == n10


def test_build_datastore_json_and_overwrite(env, capsys):
    out = str(env["root"] / "ds_again")
    argv = ["build-datastore", "--model", env["marian"], "--corpus", env["tsv"], "--out", out,
            "--limit", "6"]
    res = run_json(capsys, *argv)
    n6 = sum(len(ids) for ids in env["tok"](text_target=[t for _, t in PAIRS[:6]])["input_ids"])
    assert res["entries"] == n6 and res["examples"] == 6
    assert "already exists" in fail(capsys, *argv)
    assert len(Datastore.open(out)) == n6                    # left intact
    res = run_json(capsys, *argv[:-1], "3", "--overwrite")
    n3 = sum(len(ids) for ids in env["tok"](text_target=[t for _, t in PAIRS[:3]])["input_ids"])
    assert res["entries"] == n3 and len(Datastore.open(out)) == n3


def test_build_datastore_exists_is_cli_error(env, marian_ds, capsys):
    msg = fail(capsys, "build-datastore", "--model", env["marian"], "--corpus", env["tsv"],
               "--out", marian_ds)
    assert "--overwrite" in msg


# --------------------------------------------------------------------------- build-index


def test_build_index_and_translate_with_index(env, marian_ds, capsys, tmp_path):
    ds_dir = str(tmp_path / "ds")
    shutil.copytree(marian_ds, ds_dir)            # keep the shared datastore index-free
    info = run_json(capsys, "build-index", ds_dir, "--factory", "Flat", "--device", "cpu")
    n = len(Datastore.open(ds_dir))
    assert info["factory"] == "Flat" and info["ntotal"] == n and info["metric"] == "l2"
    assert os.path.exists(os.path.join(ds_dir, "index.faiss"))
    out = tmp_path / "hyp.txt"
    res = run_json(capsys, "translate", "--model", env["marian"], "--datastore", ds_dir, "--index",
                   "--input", env["src"], "--output", out, "--beams", "2", "--k", "2",
                   "--max-new-tokens", "12", stream="err")
    assert res["sentences"] == len(PAIRS)
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(PAIRS)


# --------------------------------------------------------------------------- eval-ppl


def test_eval_ppl(env, gpt2_ds, capsys):
    argv = ["eval-ppl", "--model", env["gpt2"], "--datastore", gpt2_ds, "--corpus", env["txt"],
            "--k", "4", "--temperature", "1", "--lam", "0.25", "--limit", "20"]
    res = run_json(capsys, *argv)
    ids = env["tok"]([line for s, t in PAIRS for line in (s, t)][:20])["input_ids"]
    assert res["tokens"] == sum(len(x) - 1 for x in ids)
    for key in ("base_ppl", "knn_ppl", "oracle_ppl"):
        assert math.isfinite(res[key]) and res[key] >= 1.0, res
    assert res["oracle_ppl"] <= res["best_of_ppl"] * (1 + 1e-6)
    assert res["best_of_ppl"] <= min(res["base_ppl"], res["knn_ppl"]) * (1 + 1e-6)
    assert res["knn_ppl"] < res["base_ppl"]        # evaluated on the datastore's own corpus
    ref = run_json(capsys, *argv, "--backend", "reference")
    assert ref["tokens"] == res["tokens"]
    for key in ("base_ppl", "knn_ppl", "oracle_ppl"):
        assert ref[key] == pytest.approx(res[key], rel=1e-4)


def test_eval_ppl_seq2seq(env, marian_ds, capsys):
    res = run_json(capsys, "eval-ppl", "--model", env["marian"], "--datastore", marian_ds,
                   "--corpus", env["tsv"], "--k", "4", "--limit", "8")
    assert res["tokens"] == sum(len(x) for x in env["tok"](text_target=[t for _, t in PAIRS[:8]])["input_ids"])
    assert res["oracle_ppl"] <= res["best_of_ppl"] * (1 + 1e-6)
    assert res["best_of_ppl"] <= min(res["base_ppl"], res["knn_ppl"]) * (1 + 1e-6)


@pytest.fixture(scope="module")
def ivf_ppl(env, gpt2_ds, tmp_path_factory):
    """eval-ppl (k = 8) on a copy of the GPT-2 datastore: exact, then after build-index of a
    coarse IVF index (nprobe 1 of 4 lists) without and with --index."""
    ds = str(tmp_path_factory.mktemp("ivf") / "ds")
    shutil.copytree(gpt2_ds, ds)
    argv = ["eval-ppl", "--model", env["gpt2"], "--datastore", ds, "--corpus", env["txt"],
            "--k", "8"]

    def ppl(*extra):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            assert main(argv + list(extra)) == 0
        return json.loads(buf.getvalue())

    exact = ppl()
    with contextlib.redirect_stdout(io.StringIO()):
        main(["build-index", ds, "--factory", "IVF4,Flat", "--nprobe", "1", "--device", "cpu"])
    return {"exact": exact, "after": ppl(), "index": ppl("--index"),
            "lists": ppl("--index", "--lists")}


def test_eval_ppl_index(ivf_ppl):
    exact, index = ivf_ppl["exact"], ivf_ppl["index"]
    assert index["tokens"] == exact["tokens"] and index["base_ppl"] == exact["base_ppl"]
    assert math.isfinite(index["knn_ppl"])
    # nprobe 1 misses neighbours: the approximate search gives another kNN ppl
    assert index["knn_ppl"] != pytest.approx(exact["knn_ppl"], rel=1e-6)


def test_eval_ppl_lists_search_the_same_lists(ivf_ppl):
    """--lists: the IVF index's lists through knn_search_lists find FAISS's neighbours (the
    same list at nprobe 1): the same perplexity up to fp32 score rounding."""
    index, lists = ivf_ppl["index"], ivf_ppl["lists"]
    assert lists["settings"]["lists"] and not index["settings"]["lists"]
    assert lists["knn_ppl"] == pytest.approx(index["knn_ppl"], rel=1e-4)
    assert lists["knn_ppl"] != pytest.approx(ivf_ppl["exact"]["knn_ppl"], rel=1e-6)


def test_lists_needs_an_ivf_index(env, gpt2_ds, capsys, tmp_path):
    argv = ["eval-ppl", "--model", env["gpt2"], "--datastore", gpt2_ds, "--corpus", env["txt"]]
    assert main(argv + ["--lists"]) == 2
    assert "--lists searches the FAISS index's lists (add --index)" in capsys.readouterr().err
    ds = str(tmp_path / "flat")
    shutil.copytree(gpt2_ds, ds)
    with contextlib.redirect_stdout(io.StringIO()):
        main(["build-index", ds, "--factory", "Flat", "--device", "cpu"])
    argv[4] = ds
    assert main(argv + ["--index", "--lists"]) == 3
    assert "--lists: Datastore.use_lists: the index is IndexFlat" in capsys.readouterr().err


def _saved_gate(gpt2_ds, path, datastore=None):
    """An unfitted-by-training RetrievalGate recorded as fitted for ``datastore`` (default: the
    GPT-2 datastore) and saved: its λ is a sigmoid, strictly inside (0, 1)."""
    from knnfast import KNNDecoder
    from knnfast.methods.gate import RetrievalGate, decoder_record
    ds = datastore or Datastore.open(gpt2_ds)
    gate = RetrievalGate(ds.dim)
    gate.fitted_for = decoder_record(KNNDecoder(ds, k=4))
    gate.save(path)
    return str(path)


def test_eval_ppl_skipping(env, gpt2_ds, capsys, tmp_path):
    """--skip-confidence / --gate: a row that skips is mixed with λ = 0, so skipping every row
    gives the base model's perplexity and skipping none gives plain kNN-LM's; the share of
    skipped rows is reported and the options are echoed."""
    argv = ["eval-ppl", "--model", env["gpt2"], "--datastore", gpt2_ds, "--corpus", env["txt"],
            "--k", "4", "--lam", "0.5", "--limit", "12"]
    plain = run_json(capsys, *argv)
    gate = _saved_gate(gpt2_ds, tmp_path / "gate")
    for extra, share in ((["--skip-confidence", "1e-9"], 1.0), (["--skip-confidence", "1"], 0.0),
                         (["--gate", gate, "--gate-threshold", "1"], 1.0),
                         (["--gate", gate, "--gate-threshold", "0"], 0.0)):
        res = run_json(capsys, *argv, *extra)
        assert res["skipped_rows"] == share, extra
        want = plain["base_ppl"] if share == 1.0 else plain["knn_ppl"]
        assert res["knn_ppl"] == pytest.approx(want, rel=1e-6), extra
    assert res["settings"]["gate"] == gate and res["settings"]["gate_threshold"] == 0.0
    assert plain["knn_ppl"] != pytest.approx(plain["base_ppl"], rel=1e-3)


def test_skip_option_errors(env, gpt2_ds, marian_ds, capsys, tmp_path):
    argv = ["eval-ppl", "--model", env["gpt2"], "--datastore", gpt2_ds, "--corpus", env["txt"]]
    for bad, code, text in ((["--skip-confidence", "0"], 2, "--skip-confidence"),
                            (["--skip-confidence", "1.5"], 2, "--skip-confidence"),
                            (["--gate-threshold", "0.3"], 2, "add --gate DIR"),
                            (["--gate", str(tmp_path / "none")], 3, "--gate"),
                            (["--gate", _saved_gate(gpt2_ds, tmp_path / "other",
                                                    Datastore.open(marian_ds))], 3,
                             "fit a gate for it")):
        capsys.readouterr()
        assert main(argv + bad) == code, bad
        assert text in capsys.readouterr().err, bad
    capsys.readouterr()
    assert main(["translate", "--model", env["marian"], "--skip-confidence", "0.9"]) == 2
    assert "need a datastore" in capsys.readouterr().err


def test_eval_ppl_without_index_flag_is_exact(ivf_ppl):
    assert ivf_ppl["after"]["knn_ppl"] == pytest.approx(ivf_ppl["exact"]["knn_ppl"], rel=1e-6)


# --------------------------------------------------------------------------- translate


def test_translate_files(env, marian_ds, capsys, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("the cat sits\nsave the file\n\nopen the door please\n", encoding="utf-8")
    for extra in ([], ["--datastore", marian_ds]):
        out = tmp_path / f"out{len(extra)}.txt"
        res = run_json(capsys, "translate", "--model", env["marian"], "--input", inp, "--output", out,
                       "--beams", "2", "--batch-size", "3", "--max-new-tokens", "10", *extra,
                       stream="err")
        assert res["sentences"] == 4
        assert len(out.read_text(encoding="utf-8").split("\n")) == 4 + 1   # trailing newline


def test_translate_skipping_every_row_is_the_bare_model(env, marian_ds, capsys, tmp_path):
    """--skip-confidence 1e-9 skips every row (λ = 0): the bare model's translations, and the
    summary reports the share skipped."""
    outs = {}
    for name, extra in (("bare", []), ("skip", ["--datastore", marian_ds, "--lam", "0.9",
                                                "--skip-confidence", "1e-9"])):
        out = tmp_path / f"{name}.txt"
        res = run_json(capsys, "translate", "--model", env["marian"], "--input", env["src"],
                       "--output", out, "--beams", "2", "--max-new-tokens", "12", *extra,
                       stream="err")
        outs[name] = (out.read_text(encoding="utf-8"), res)
    assert outs["skip"][0] == outs["bare"][0]
    assert outs["skip"][1]["skipped_rows"] == 1.0 and outs["bare"][1]["skipped_rows"] is None
    assert outs["skip"][1]["settings"]["skip_confidence"] == 1e-9


def test_translate_stdout(env, marian_ds, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the dog runs\nhello\n"))
    capsys.readouterr()
    main(["translate", "--model", env["marian"], "--datastore", marian_ds, "--beams", "1",
          "--max-new-tokens", "8"])
    cap = capsys.readouterr()
    assert len(cap.out.split("\n")) == 3
    assert json.loads(cap.err.strip().splitlines()[-1])["sentences"] == 2


def test_translate_oracle_datastore(env, marian_ds, capsys, tmp_path):
    """λ = 1, k = 1, greedy: each step copies the value of the datastore entry captured at
    the same (source, target prefix), so the training targets come back."""
    out = tmp_path / "hyp.txt"
    run_json(capsys, "translate", "--model", env["marian"], "--datastore", marian_ds,
             "--input", env["src"], "--output", out, "--lam", "1.0", "--k", "1", "--beams", "1",
             "--batch-size", "8", "--max-new-tokens", "20", stream="err")
    hyps = out.read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(PAIRS)
    same = sum(h.strip() == t for h, (_, t) in zip(hyps, PAIRS))
    assert same >= 0.8 * len(PAIRS), list(zip(hyps, PAIRS))

    # the bare model (random weights) does not know them
    bare = tmp_path / "bare.txt"
    run_json(capsys, "translate", "--model", env["marian"], "--input", env["src"], "--output", bare,
             "--beams", "1", "--batch-size", "8", "--max-new-tokens", "20", stream="err")
    bare_hyps = bare.read_text(encoding="utf-8").splitlines()
    assert len(bare_hyps) == len(PAIRS)
    assert sum(h.strip() == t for h, (_, t) in zip(bare_hyps, PAIRS)) < same


# --------------------------------------------------------------------------- tune


def test_tune(env, marian_ds, capsys, tmp_path):
    ks, temps, lams = [1, 2, 4], [1.0, 10.0], [0.25, 0.5, 0.75]
    grid_out = tmp_path / "grid.json"
    res = run_json(capsys, "tune", "--model", env["marian"], "--datastore", marian_ds,
                   "--corpus", env["tsv"], "--ks", ",".join(map(str, ks)),
                   "--temperatures", ",".join(map(str, temps)), "--lams", ",".join(map(str, lams)),
                   "--limit", "12", "--grid-out", grid_out)
    grid = json.loads(grid_out.read_text())
    assert len(grid) == res["cells"] == len(ks) * len(temps) * len(lams)
    assert {(g["k"], g["temperature"], g["lam"]) for g in grid} == \
        {(k, t, lam) for k in ks for t in temps for lam in lams}
    best = res["best"]
    assert best["k"] in ks and best["temperature"] in temps and best["lam"] in lams
    assert best == min(grid, key=lambda g: g["nll"])
    assert math.isfinite(res["base_nll"]) and best["nll"] <= res["base_nll"]


# --------------------------------------------------------------------------- bench


def test_bench(capsys):
    res = run_json(capsys, "bench", "--rows", "4", "--vocab", "100", "--k", "4", "--keys", "1000",
                   "--dim", "16", "--seconds", "0.05")
    assert res["shape"]["rows"] == 4 and res["shape"]["vocab"] == 100
    for case in ("knn_interpolate", "knn_search"):
        row = res["results"][case]
        assert row["fused_ms"] > 0 and row["reference_ms"] > 0 and row["speedup"] > 0


# --------------------------------------------------------------------------- errors


def test_error_missing_model(env, tmp_path, capsys):
    msg = fail(capsys, "build-datastore", "--model", tmp_path / "nope", "--corpus", env["tsv"],
               "--out", tmp_path / "ds")
    assert "--model" in msg and "nope" in msg
    assert not os.path.exists(tmp_path / "ds")


def test_error_missing_corpus(env, tmp_path, capsys):
    msg = fail(capsys, "build-datastore", "--model", env["marian"], "--corpus", tmp_path / "no.tsv",
               "--out", tmp_path / "ds")
    assert "--corpus" in msg and "no.tsv" in msg
    assert not os.path.exists(tmp_path / "ds") and not os.path.exists(tmp_path / "ds.building")


def test_error_tsv_without_tab(env, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("hello\thallo\nthe cat\tdie katze\nno tab here\nworld\twelt\n", encoding="utf-8")
    msg = fail(capsys, "build-datastore", "--model", env["marian"], "--corpus", bad,
               "--out", tmp_path / "ds")
    assert f"{bad}:3:" in msg and "TAB" in msg
    # a text corpus is fine for the causal model (no tab needed)
    res = run_json(capsys, "build-datastore", "--model", env["gpt2"], "--corpus", bad,
                   "--out", tmp_path / "ds_gpt2")
    assert res["examples"] == 4


def test_error_tsv_line_number_counts_blank_lines(env, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("hello\thallo\n\nno tab here\n", encoding="utf-8")
    msg = fail(capsys, "build-datastore", "--model", env["marian"], "--corpus", bad,
               "--out", tmp_path / "ds")
    assert f"{bad}:3:" in msg


def test_error_missing_datastore(env, tmp_path, capsys):
    msg = fail(capsys, "eval-ppl", "--model", env["gpt2"], "--datastore", tmp_path / "no_ds",
               "--corpus", env["txt"], "--k", "4")
    assert "cannot open datastore" in msg
    msg = fail(capsys, "translate", "--model", env["marian"], "--datastore", tmp_path / "no_ds",
               "--input", env["src"], "--output", tmp_path / "o.txt")
    assert "cannot open datastore" in msg


def test_error_bad_arguments(capsys):
    assert main([]) == 2                             # a command is required
    assert main(["build-datastore", "--corpus", "x"]) == 2   # --model / --out missing
    assert "--model" in capsys.readouterr().err


def test_analyze(env, gpt2_ds, capsys, tmp_path):
    base = ["--model", env["gpt2"], "--datastore", gpt2_ds, "--corpus", env["txt"], "--k", "4",
            "--limit", "10"]
    freq = run_json(capsys, "analyze", "frequency", *base, "--edges", "0,2,5",
                    "--plot", tmp_path / "f.png")
    # frequencies come from the datastore's own corpus (recorded by build-datastore), said so
    assert freq["frequencies_from"] == {"path": os.path.abspath(env["txt"]),
                                        "from": "the datastore's meta.json (extra.corpus)"}
    buckets = freq["buckets"]
    assert [b["bucket"] for b in buckets] == ["[0, 2)", "[2, 5)", ">= 5"]
    assert sum(b["positions"] for b in buckets) > 0
    assert all(0 <= b["knn_accuracy"] <= b["recall"] <= 1 for b in buckets)
    assert (tmp_path / "f.png").exists()
    given = run_json(capsys, "analyze", "frequency", *base, "--train-corpus", env["txt"])
    assert given["frequencies_from"]["from"] == "--train-corpus"
    sizes = run_json(capsys, "analyze", "size", *base, "--fractions", "0.5,1",
                     "--plot", tmp_path / "s.png")
    assert sizes["settings"] == {"k": 4, "temperature": 1.0, "lam": 0.25, "hidden": "ffn"}
    points = sizes["points"]
    assert points[0]["entries"] < points[1]["entries"] and (tmp_path / "s.png").exists()
    lam = run_json(capsys, "analyze", "lambda", *base, "--lams", "0,0.5,1",
                   "--plot", tmp_path / "lam.png")
    assert [p["lam"] for p in lam["points"]] == [0.0, 0.5, 1.0]
    # an infinite perplexity is null in the JSON and named (not silently dropped from the plot)
    assert lam["infinite_ppl_at"] == [p["lam"] for p in lam["points"] if p["ppl"] is None]
    assert (tmp_path / "lam.png").exists()
    assert lam["points"][0]["ppl"] == pytest.approx(lam["base_ppl"], rel=1e-4)


def test_analyze_frequency_without_a_known_training_corpus(env, gpt2_ds, capsys, tmp_path):
    """A datastore that does not record its corpus: no silent fallback to the test corpus."""
    ds = tmp_path / "ds"
    shutil.copytree(gpt2_ds, ds)
    meta = json.loads((ds / "meta.json").read_text())
    meta["extra"].pop("corpus")
    (ds / "meta.json").write_text(json.dumps(meta))
    msg = fail(capsys, "analyze", "frequency", "--model", env["gpt2"], "--datastore", ds,
               "--corpus", env["txt"], "--limit", "4")
    assert "needs --train-corpus" in msg


def test_eval_ppl_echoes_its_settings(env, gpt2_ds, capsys):
    capsys.readouterr()
    assert main(["eval-ppl", "--model", env["gpt2"], "--datastore", gpt2_ds,
                 "--corpus", env["txt"], "--limit", "4"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out)
    # k = 1024 (the kNN-LM preset) is more than the tiny datastore holds: clamped, said
    n = len(Datastore.open(gpt2_ds))
    assert KNN_LM.k > n
    assert res["settings"] == {"k": n, "temperature": KNN_LM.temperature,
                               "lam": KNN_LM.lam, "hidden": "ffn", "index": False, "lists": False,
                               "backend": "fused", "skip_confidence": None, "gate": None,
                               "gate_threshold": None}
    assert res["skipped_rows"] is None
    assert f"knnfast: warning: --k {KNN_LM.k} is more than the {n} entries" in err


def test_tune_save_feeds_settings(env, marian_ds, capsys, tmp_path):
    """`tune --save FILE` -> `eval-ppl/translate --settings FILE`; the command line wins."""
    saved = tmp_path / "tuned.json"
    res = run_json(capsys, "tune", "--model", env["marian"], "--datastore", marian_ds,
                   "--corpus", env["tsv"], "--ks", "2,4", "--temperatures", "1,10",
                   "--lams", "0.3,0.6", "--limit", "8", "--save", saved)
    best = {key: res["best"][key] for key in ("k", "temperature", "lam")}
    assert res["settings"]["ks"] == [2, 4] and res["saved"] == str(saved)
    assert {key: json.loads(saved.read_text())[key] for key in best} == best
    base = ["eval-ppl", "--model", env["marian"], "--datastore", marian_ds, "--corpus",
            env["tsv"], "--limit", "4", "--settings", saved]
    echoed = run_json(capsys, *base)["settings"]
    assert {key: echoed[key] for key in best} == best
    assert run_json(capsys, *base, "--lam", "0.05")["settings"]["lam"] == 0.05
    out = tmp_path / "hyp.txt"
    res = run_json(capsys, "translate", "--model", env["marian"], "--datastore", marian_ds,
                   "--settings", saved, "--input", env["src"], "--output", out, "--beams", "1",
                   "--max-new-tokens", "6", stream="err")
    assert {key: res["settings"][key] for key in best} == best


def test_translate_progress_bar(env, capsys, tmp_path):
    capsys.readouterr()
    assert main(["translate", "--model", env["marian"], "--input", env["src"], "--output",
                 str(tmp_path / "o.txt"), "--beams", "1", "--max-new-tokens", "4",
                 "--progress", "on"]) == 0
    assert f"{len(PAIRS)}/{len(PAIRS)}" in capsys.readouterr().err
    main(["translate", "--model", env["marian"], "--input", env["src"], "--output",
          str(tmp_path / "o.txt"), "--beams", "1", "--max-new-tokens", "4", "--progress", "off"])
    assert f"{len(PAIRS)}/{len(PAIRS)}" not in capsys.readouterr().err


def test_build_index_records_nprobe_only_for_ivf(marian_ds, capsys, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(marian_ds, ds)
    assert "nprobe" not in run_json(capsys, "build-index", ds, "--factory", "Flat")
    assert run_json(capsys, "build-index", ds, "--factory", "IVF4,Flat", "--nprobe", "3",
                    "--device", "cpu")["nprobe"] == 3
