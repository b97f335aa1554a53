"""Every mistake a new user made in the first hour with ``knnfast`` (issue 14), run through
the real entry point: one ``knnfast: <what> (<how to fix>)`` line, the documented exit code,
no traceback. The same runs produce the table in the README's CLI section:

    KNNFAST_UPDATE_README=1 pytest tests/test_cli_errors.py   # rewrites the marked block

and ``test_readme_table_is_generated`` fails when the README and the cases disagree.
"""
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("faiss")

from cli_env import env, gpt2_ds, marian_ds  # noqa: E402,F401
from knnfast import Datastore  # noqa: E402
from knnfast.app import cli  # noqa: E402
from knnfast.storage.writer import DatastoreWriter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BEGIN, END = "<!-- cli-mistakes:begin -->", "<!-- cli-mistakes:end -->"

pytestmark = pytest.mark.usefixtures("single_threaded")

_MD = ["--model", "marian", "--datastore", "ds_marian"]
_GD = ["--model", "gpt2", "--datastore", "ds_gpt2"]

#: (mistake, argv in the fixtures' directory, exit code, what the message must say);
#: the README table lists them in this order.
CASES = [
    ("k above the ops' limit", ["eval-ppl", *_GD, "--corpus", "train.txt", "--k", "5000"],
     2, ["--k", "5000", "out of range"]),
    ("λ outside [0, 1]", ["translate", *_MD, "--lam", "1.5"], 2, ["--lam", "1.5"]),
    ("a list with a non-number", ["tune", *_MD, "--corpus", "train.tsv", "--ks", "8,abc"],
     2, ["--ks", "abc"]),
    ("an unknown option", ["translate", "--model", "marian", "--num-beams", "4"], 2,
     ["--num-beams"]),
    ("an invalid FAISS factory", ["build-index", "ds_marian", "--factory", "IVF,Nope"], 2,
     ["--factory", "index_factory"]),
    ("IVF with more lists than keys", ["build-index", "ds_marian", "--factory", "IVF4096,Flat"],
     3, ["4096 lists", "--factory IVF"]),
    ("a missing --input", ["translate", *_MD, "--input", "missing.txt"], 3,
     ["--input", "missing.txt", "does not exist"]),
    ("--output into a missing directory", ["translate", *_MD, "--input", "src.txt",
                                           "--output", "nodir/hyp.txt"], 3,
     ["--output", "does not exist", "mkdir -p"]),
    ("a model directory without config.json", ["eval-ppl", "--model", "noconfig",
                                               "--datastore", "ds_marian", "--corpus",
                                               "train.tsv"], 3, ["config.json"]),
    ("a missing datastore", ["eval-ppl", "--model", "gpt2", "--datastore", "no_ds", "--corpus",
                             "train.txt"], 3, ["cannot open datastore"]),
    ("an empty corpus", ["build-datastore", "--model", "marian", "--corpus", "empty.tsv",
                         "--out", "ds_new"], 3, ["empty.tsv", "no non-blank lines"]),
    ("a corpus of blank lines", ["build-datastore", "--model", "marian", "--corpus",
                                 "blank.tsv", "--out", "ds_new"], 3, ["no non-blank lines"]),
    ("a TSV line without a TAB", ["build-datastore", "--model", "marian", "--corpus",
                                  "notab.tsv", "--out", "ds_new"], 3, ["notab.tsv:2:", "TAB"]),
    ("--out exists", ["build-datastore", "--model", "marian", "--corpus", "train.tsv",
                      "--out", "ds_marian"], 3, ["already exists", "--overwrite"]),
    ("an interrupted build, neither --resume nor --overwrite",
     ["build-datastore", "--model", "marian", "--corpus", "train.tsv", "--out", "ds_half"], 3,
     ["interrupted build", "--resume", "--overwrite"]),
    ("datastore keys of another width", ["eval-ppl", "--model", "marian", "--datastore",
                                         "ds_dim16", "--corpus", "train.tsv"], 3,
     ['meta.json field "dim"', "16-dim", "32-dim", "marian"]),
    ("datastore of another vocabulary", ["translate", "--model", "marian", "--datastore",
                                         "ds_vocab8000", "--input", "src.txt"], 3,
     ['meta.json field "vocab_size"', "8000", "marian"]),
    ("datastore built with another tokenizer", ["eval-ppl", "--model", "marian", "--datastore",
                                                "ds_othertok", "--corpus", "train.tsv"], 3,
     ["tokenizer_sha256"]),
    ("datastore from Python without a key layer", ["eval-ppl", "--model", "marian",
                                                   "--datastore", "ds_unknown", "--corpus",
                                                   "train.tsv"], 3,
     ['meta.json field "hidden"', "'unknown'", "--hidden"]),
    ("--index without an index", ["eval-ppl", *_MD, "--corpus", "train.tsv", "--index"], 3,
     ["no index", "knnfast build-index ds_marian"]),
    ("a bad --settings file", ["translate", *_MD, "--settings", "train.tsv"], 3,
     ["--settings", "not valid JSON"]),
    ("Ctrl-C in build-datastore", ["build-datastore", "--model", "marian", "--corpus",
                                   "train.tsv", "--out", "ds_ctrlc", "--batch-size", "8"], 130,
     ["interrupted", "8 of 30 examples", "--resume"]),
    ("Ctrl-C in demo", ["demo", "--cache", "democache", "--out", "demo_out"], 130,
     ["interrupted", "resume: knnfast demo --cache democache --out demo_out"]),
]


@pytest.fixture(scope="module")
def world(env, marian_ds, gpt2_ds):
    """The fixtures' directory with every broken file the cases need."""
    root = env["root"]
    (root / "empty.tsv").write_text("", encoding="utf-8")
    (root / "blank.tsv").write_text("\n  \n\t\n", encoding="utf-8")
    (root / "notab.tsv").write_text("a cat\tdie katze\nno tab here\n", encoding="utf-8")
    (root / "noconfig").mkdir(exist_ok=True)
    ds = Datastore.open(marian_ds)
    V = len(env["tok"])
    _python_store(root / "ds_unknown", ds.dim, V)
    _python_store(root / "ds_dim16", 16, V, hidden="ffn")
    _python_store(root / "ds_vocab8000", ds.dim, 8000, hidden="ffn")
    shutil.copytree(marian_ds, root / "ds_othertok", dirs_exist_ok=True)
    other = Datastore.open(root / "ds_othertok")
    other.update_extra(tokenizer_sha256="0" * 64)
    w = Datastore.create(root / "ds_half", ds.dim, vocab_size=V, hidden="ffn", progress=False)
    w.add(torch.randn(4, ds.dim), torch.zeros(4, dtype=torch.long), cursor=1)
    w.close()
    return root


def _python_store(path, dim, vocab, **kw):
    with Datastore.create(path, dim, vocab_size=vocab, overwrite=True, progress=False, **kw) as w:
        w.add(torch.randn(40, dim), torch.randint(0, min(vocab, 100), (40,)))


@contextlib.contextmanager
def _interrupts(monkeypatch, argv):
    """Ctrl-C at the point each interrupted case names."""
    if argv[0] == "build-datastore":
        add, calls = DatastoreWriter.add, []

        def add_then_stop(self, *a, **kw):
            calls.append(1)
            if len(calls) == 2:          # after the first committed chunk
                raise KeyboardInterrupt
            return add(self, *a, **kw)
        monkeypatch.setattr(DatastoreWriter, "add", add_then_stop)
    else:
        import knnfast.app.demo as demo

        def stop(**kw):
            raise KeyboardInterrupt
        monkeypatch.setattr(demo, "main", stop)
    yield
    monkeypatch.undo()


def run_case(root, argv, capsys, monkeypatch, interrupt=False):
    """(exit code, stderr lines) of ``knnfast argv`` in the fixtures' directory."""
    capsys.readouterr()
    with contextlib.chdir(root):
        if interrupt:
            with _interrupts(monkeypatch, argv):
                code = cli.main(argv)
        else:
            code = cli.main(argv)
    err = capsys.readouterr().err.replace(str(root) + os.sep, "")
    return code, err.strip().splitlines()


@pytest.fixture(scope="module")
def outcomes(world):
    return {}


@pytest.mark.parametrize("mistake,argv,code,says", CASES, ids=[c[0] for c in CASES])
def test_mistake(world, outcomes, capsys, monkeypatch, mistake, argv, code, says):
    got, lines = run_case(world, argv, capsys, monkeypatch, interrupt=code == 130)
    assert got == code, lines
    assert lines and "Traceback" not in "\n".join(lines)
    line = lines[-1]
    assert re.fullmatch(r"knnfast: .+ \(.+\)", line), line
    for part in says:
        assert part in line, (part, line)
    outcomes[mistake] = (got, line)


def test_ctrl_c_resume_command_resumes(world, capsys, monkeypatch):
    """The command printed after Ctrl-C in build-datastore finishes the build."""
    argv = ["build-datastore", "--model", "marian", "--corpus", "train.tsv", "--out",
            "ds_resume", "--batch-size", "8"]
    code, lines = run_case(world, argv, capsys, monkeypatch, interrupt=True)
    assert code == 130
    resume = shlex.split(lines[-1].split("resume: ", 1)[1].rstrip(")"))
    assert resume[0] == "knnfast" and "--resume" in resume
    code, _ = run_case(world, resume[1:], capsys, monkeypatch)
    assert code == 0
    assert len(Datastore.open(world / "ds_resume")) == len(Datastore.open(world / "ds_marian"))


def test_k_above_datastore_size_warns_and_clamps(world, capsys, monkeypatch):
    n = len(Datastore.open(world / "ds_marian"))
    code, lines = run_case(world, ["tune", *_MD, "--corpus", "train.tsv", "--ks", "4,2048",
                                   "--limit", "4"], capsys, monkeypatch)
    assert code == 0
    assert f"knnfast: warning: --ks value 2048 is more than the {n} entries of ds_marian; " \
        f"using k = {n}" in lines
    code, lines = run_case(world, ["eval-ppl", "--model", "marian", "--datastore", "ds_unknown",
                                   "--hidden", "ffn", "--corpus", "train.tsv", "--k", "64",
                                   "--limit", "4"], capsys, monkeypatch)
    assert code == 0
    assert "knnfast: warning: --k 64 is more than the 40 entries of ds_unknown; using k = 40" \
        in lines


def test_a_reduced_store_pairs_with_the_model_its_keys_came_from(world, capsys, monkeypatch):
    """reduce_dim keeps the model's width as the query width: the CLI checks that, not the
    stored key width (issue 17)."""
    ds = Datastore.open(world / "ds_marian")
    ds.reduce_dim(world / "ds_reduced", ds.dim // 2, method="random")
    code, lines = run_case(world, ["eval-ppl", "--model", "marian", "--datastore", "ds_reduced",
                                   "--corpus", "train.tsv", "--limit", "4"], capsys, monkeypatch)
    assert code == 0, lines
    Datastore.open(world / "ds_dim16").reduce_dim(world / "ds_dim16_reduced", 8,
                                                  method="random")
    code, lines = run_case(world, ["eval-ppl", "--model", "marian", "--datastore",
                                   "ds_dim16_reduced", "--corpus", "train.tsv"], capsys,
                           monkeypatch)
    assert code == 3 and "8-dim keys projected from 16-dim states" in lines[-1], lines


def test_strict_json_for_infinite_perplexity(world, capsys):
    """λ = 1 on a corpus whose gold tokens the datastore lacks: the kNN-LM perplexity is
    infinite, written as null (strict JSON), not Infinity."""
    capsys.readouterr()
    with contextlib.chdir(world):
        assert cli.main(["eval-ppl", "--model", "marian", "--datastore", "ds_unknown",
                         "--hidden", "ffn", "--corpus", "train.tsv", "--lam", "1",
                         "--k", "4", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    assert "Infinity" not in out and "NaN" not in out
    res = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert res["knn_ppl"] is None and res["settings"]["lam"] == 1.0


def _subprocess(argv, cwd):
    return subprocess.run([sys.executable, "-m", "knnfast", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_exit_codes_and_debug_in_a_real_process(world):
    """The real process: exit code 3 and one line; --debug adds the traceback."""
    argv = ["eval-ppl", "--model", "marian", "--datastore", "ds_dim16", "--corpus", "train.tsv"]
    r = _subprocess(argv, world)
    assert r.returncode == 3 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("knnfast: datastore ds_dim16 has 16-dim")
    r = _subprocess(["--debug", *argv], world)
    assert r.returncode == 3 and "Traceback" in r.stderr


def test_ctrl_c_in_a_real_process(world):
    """A real KeyboardInterrupt reaching ``python -m knnfast``'s main: exit 130, one line."""
    code = ("import sys, knnfast.app.demo as d\n"
            "def stop(**kw): raise KeyboardInterrupt\n"
            "d.main = stop\n"
            "from knnfast.app.cli import main\n"
            "sys.exit(main(['demo', '--cache', 'c']))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=world, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip().splitlines() == [
        "knnfast: interrupted (after the stages cached in c; resume: knnfast demo --cache c)"]


# --------------------------------------------------------------------------- README table

def render_table(outcomes) -> str:
    rows = ["| mistake | command | exit | message |", "|---|---|---:|---|"]
    for mistake, argv, _, _ in CASES:
        code, line = outcomes[mistake]
        cmd = shlex.join(["knnfast", *argv]).replace("|", "\\|")
        rows.append(f"| {mistake} | `{cmd}` | {code} | {line.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


def test_readme_table_is_generated(world, outcomes, capsys, monkeypatch):
    """The README's block equals the table of every case's outcome. Cases that did not run
    in this session (a -k selection) run here once; the full module fills ``outcomes``
    first, so nothing runs twice (a second Ctrl-C build would meet its own leftovers)."""
    for mistake, argv, code, _ in CASES:
        if mistake not in outcomes:
            got, lines = run_case(world, argv, capsys, monkeypatch, interrupt=code == 130)
            outcomes[mistake] = (got, lines[-1] if lines else "")
    table = render_table(outcomes)
    text = README.read_text(encoding="utf-8")
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if os.environ.get("KNNFAST_UPDATE_README"):
        README.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")
        return
    block = rest.partition(END)[0].strip()
    assert block == table, "README's CLI mistake table is stale: KNNFAST_UPDATE_README=1 " \
        "pytest tests/test_cli_errors.py rewrites it"
