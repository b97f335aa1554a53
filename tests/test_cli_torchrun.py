"""`torchrun --nproc-per-node 2 -m knnfast build-datastore ...` for real: the torchrun example of
`knnfast build-datastore --help`, run as a subprocess on the tiny Marian and TSV of
tests/cli_env.py (gloo on 127.0.0.1, a free port), gives a sharded datastore, one shard per
rank, whose global bytes equal the single-process build; rank 0 alone prints the summary.
Failures print the same one-line error and exit code on every rank: an existing --out (every
rank fails its check), and a shard only rank 1 cannot write (the other rank learns of it;
rerun with --resume, the build finishes keeping rank 0's shard).
Half a torchrun environment (WORLD_SIZE > 1 without MASTER_ADDR, a non-integer WORLD_SIZE) is
a usage error before any work; WORLD_SIZE 1 is the plain single-process build.

Every rank's collectives time out after --dist-timeout 60 s and every torchrun run has a
deadline, after which its whole process group is killed: a failure never hangs the suite."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from cli_env import env, fail  # noqa: E402,F401
from helpers import free_port  # noqa: E402
from knnfast.app.cli import EXAMPLES, main  # noqa: E402
from knnfast.app.cli.examples import CORPUS, DEMO_MODEL  # noqa: E402
from knnfast.storage import sharded  # noqa: E402
from test_distributed import global_bytes  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")
DEADLINE_S = 240
REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.usefixtures("single_threaded"),
              pytest.mark.skipif(not TORCHRUN.exists(), reason=f"no {TORCHRUN}")]



def _example_argv():
    """The torchrun line of `knnfast build-datastore --help` (after `torchrun`), comment cut."""
    lines = [line.strip() for line in EXAMPLES["build-datastore"].splitlines()
             if line.strip().startswith("torchrun ")]
    assert len(lines) == 1, lines
    return shlex.split(lines[0], comments=True)[1:]


def torchrun(argv, env, cwd):
    """Run torchrun with ``argv`` (a free local port added): (returncode, stdout, stderr)."""
    demo = {DEMO_MODEL: env["marian"], f"{CORPUS}/in_train.tsv": env["tsv"]}
    argv = [demo.get(a, a) for a in argv]
    cmd = [str(TORCHRUN), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           *argv, "--dist-timeout", "60"]
    child_env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
                     PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, cwd=cwd, env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # torchrun and its ranks: their own session
        out, err = proc.communicate()
        pytest.fail(f"torchrun still running after {DEADLINE_S} s: {err[-2000:]}")
    return proc.returncode, out, err


def assert_no_rank_traceback(err):
    """The only traceback is torchrun's own report that its children failed."""
    tracebacks = err.split("Traceback (most recent call last):")[1:]
    assert len(tracebacks) == 1 and "torchrun" in tracebacks[0].splitlines()[1], err[-3000:]


def assert_exit_codes(err):
    """torchrun's failure report: the first rank out exited with 3 (a data error); torchrun
    then stops the others (SIGTERM) if they have not exited yet."""
    codes = re.findall(r"^\s+exitcode\s+: (-?\d+)", err, re.M)
    assert len(codes) == 2 and "3" in codes and set(codes) <= {"3", "-15"}, err[-3000:]


def knnfast_lines(err):
    return [line for line in err.splitlines() if line.startswith("knnfast: ")]


@pytest.fixture(scope="module")
def built(env, tmp_path_factory):
    """The example run under torchrun, and the same build in one process."""
    cwd = tmp_path_factory.mktemp("torchrun")
    (cwd / "ds").mkdir()
    argv = _example_argv()
    code, out, err = torchrun(argv, env, cwd)
    assert code == 0, err[-3000:]
    out_dir = argv[argv.index("--out") + 1]
    single = str(cwd / "single")
    assert main(["build-datastore", "--model", env["marian"], "--corpus", env["tsv"],
                 "--out", single]) == 0
    return {"cwd": cwd, "argv": argv, "out": str(cwd / out_dir), "stdout": out,
            "single": single}


def test_torchrun_build_equals_single_process(built):
    got, ds = global_bytes(built["out"])
    want, plain = global_bytes(built["single"])
    assert isinstance(ds, sharded.ShardedStore) and len(ds.meta["shards"]) == 2
    for name in ("keys", "values", "key_sq_norms"):
        assert got[name] == want[name], name
    assert (got["provenance"] == want["provenance"]).all()
    for field in ("dim", "vocab_size", "metric", "hidden", "key_dtype"):
        assert ds.meta[field] == plain.meta[field], field
    # the CLI's stamp reaches the manifest: later commands check the tokenizer against it
    for field in ("corpus", "tokenizer_sha256"):
        assert ds.meta["extra"][field] == plain.meta["extra"][field], field


def test_torchrun_summary_printed_once(built):
    summary = json.loads(built["stdout"])   # one JSON object: rank 0's alone
    assert summary["shards"] == 2 and summary["ranks"] == 2
    assert summary["entries"] == len(global_bytes(built["single"])[1])
    assert os.path.samefile(built["cwd"] / summary["datastore"], built["out"])


def test_existing_out_fails_on_every_rank(built, env):
    code, out, err = torchrun(built["argv"], env, built["cwd"])
    assert code != 0 and out == ""
    lines = knnfast_lines(err)
    want = (f"knnfast: rank 0 of 2: --out {built['argv'][built['argv'].index('--out') + 1]!r} "
            f"already exists (pass --overwrite to replace it)")
    assert lines == [want, want], err[-3000:]
    assert_exit_codes(err)
    assert_no_rank_traceback(err)


def test_one_rank_failing_fails_every_rank_then_resumes(built, env):
    """rank 1 cannot create its shard (a file is in the way); rank 0 builds its shard and
    then fails too, with the same line, instead of committing a manifest or waiting. With
    the file gone, rerunning with --resume keeps rank 0's shard and finishes the build."""
    argv = list(built["argv"])
    out_dir = Path(built["cwd"]) / "ds" / "blocked"
    out_dir.mkdir()
    (out_dir / sharded.shard_name(1)).write_text("in the way")
    argv[argv.index("--out") + 1] = str(out_dir)
    code, out, err = torchrun([*argv, "--resume"], env, built["cwd"])
    assert code != 0 and out == ""
    lines = knnfast_lines(err)
    assert sorted(re.search(r"this is rank (\d)", line).group(1) for line in lines) == \
        ["0", "1"], err[-3000:]
    for line in lines:   # the same error, each rank saying which it is
        assert "failed on 1 of 2 ranks" in line and line.endswith(")"), line
        assert "rank 1: DatastoreError" in line and "shard-00001 is a file" in line, line
    assert not sharded.is_sharded(out_dir)              # nothing committed
    assert_exit_codes(err)
    assert_no_rank_traceback(err)

    # out of the way, the same command resumes: rank 0's finished shard is kept as it is
    finished = out_dir / sharded.shard_name(0) / "meta.json"
    stamp = finished.stat().st_mtime_ns
    (out_dir / sharded.shard_name(1)).unlink()
    code, out, err = torchrun([*argv, "--resume"], env, built["cwd"])
    assert code == 0, err[-3000:]
    assert finished.stat().st_mtime_ns == stamp
    got, _ = global_bytes(str(out_dir))
    want, _ = global_bytes(built["single"])
    assert all(got[name] == want[name] for name in ("keys", "values", "key_sq_norms"))


@pytest.mark.parametrize("environ, words", [
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, "WORLD_SIZE=2 is set but MASTER_ADDR"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
])
def test_half_a_torchrun_environment_is_a_usage_error(env, environ, words, monkeypatch,
                                                      capsys, tmp_path):
    """Before any work or any wait for other ranks: exit 2, one line naming the variable."""
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    argv = ["build-datastore", "--model", env["marian"], "--corpus", env["tsv"], "--out",
            str(tmp_path / "ds")]
    line = fail(capsys, *argv)
    assert words in line and "torchrun" in line, line
    assert main(argv) == 2 and not (tmp_path / "ds").exists()


def test_world_size_one_is_a_plain_build(env, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "1")
    out = tmp_path / "ds"
    assert main(["build-datastore", "--model", env["marian"], "--corpus", env["tsv"],
                 "--out", str(out)]) == 0
    assert (out / "meta.json").exists() and not sharded.is_sharded(out)


def test_ctrl_c_under_torchrun_says_rerun_with_resume(monkeypatch):
    from knnfast.app.cli import STOPPED, build_parser
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    argv = ["build-datastore", "--model", "m", "--corpus", "c.tsv", "--out", "ds/x",
            "--overwrite"]
    where = STOPPED["build-datastore"](build_parser().parse_args(argv), argv)
    assert where == ("every rank's committed chunks are kept under ds/x; resume: the same "
                     "torchrun command running knnfast build-datastore --model m --corpus "
                     "c.tsv --out ds/x --resume")
