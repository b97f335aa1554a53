"""Every example in ``knnfast <command> --help`` and in the README's CLI section runs.

The examples are written for the files `make demo` leaves (.cache/demo/base_model and
.cache/demo/corpus/*); here the demo model is the tiny Marian of tests/cli_env.py and the
corpora its tiny TSV, substituted into each line, which then runs through ``main()`` in a
fresh directory, in --help order (later examples use what earlier ones wrote). Three
commands are too heavy to run for real in a test: ``bench`` gets small shapes appended (the
last value of an option wins), ``demo`` and ``reproduce`` run with their work functions
replaced by recorders (they have their own tests). The `torchrun ...` example of
build-datastore runs in tests/test_cli_torchrun.py."""
import contextlib
import io
import re
import shlex
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("faiss")

from cli_env import PAIRS, env  # noqa: E402,F401
from knnfast.app import cli  # noqa: E402
from knnfast.app.cli.examples import CORPUS, DEMO_MODEL  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
BENCH_SMALL = ["--rows", "4", "--vocab", "1000", "--keys", "2000", "--dim", "16",
               "--seconds", "0.01"]

pytestmark = pytest.mark.usefixtures("single_threaded")


def example_lines(text: str):
    """(stdin text or None, argv) of every `knnfast ...` line, `echo "x" | knnfast ...` too."""
    for line in text.splitlines():
        line = line.strip()
        stdin = None
        echo = re.match(r'echo "([^"]*)" \| (.*)', line)
        if echo:
            stdin, line = echo.group(1) + "\n", echo.group(2)
        if line.startswith("knnfast "):
            yield stdin, shlex.split(line, comments=True)[1:]


def substitute(argv, env):
    """The demo's files -> the tiny stand-ins."""
    files = {DEMO_MODEL: env["marian"], f"{CORPUS}/in_test.src": env["src"]}
    files.update({f"{CORPUS}/{name}.tsv": env["tsv"] for name in ("in_train", "in_dev", "in_test")})
    argv = [files.get(a, a) for a in argv]
    # a demo file this test has no stand-in for
    assert not any(a.startswith((CORPUS, DEMO_MODEL)) for a in argv), argv
    return argv + BENCH_SMALL if argv[0] == "bench" else argv


@pytest.fixture
def recorders(monkeypatch):
    """demo and reproduce record their calls instead of training."""
    import knnfast.app.demo as demo
    import knnfast.app.reproduce as reproduce
    from knnfast.app.corpus import DemoSplit
    calls = []
    split = DemoSplit(*([p] for p in PAIRS[:5]))
    monkeypatch.setattr(demo, "main", lambda **kw: calls.append(("demo", kw)))
    monkeypatch.setattr(demo, "export_corpora", lambda d, locale_dir=None: demo.write_split(split, d))
    monkeypatch.setattr(reproduce, "reproduce", lambda study, **kw: calls.append((study, kw)))
    return calls


def run_examples(lines, env, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ran = []
    for stdin, argv in lines:
        argv = substitute(argv, env)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        code = cli.main(argv)
        err = capsys.readouterr().err
        assert code == 0, (argv, err)
        ran.append(argv)
    return ran


def test_help_examples_run(env, tmp_path, monkeypatch, capsys, recorders):
    lines = [x for name, *_ in cli.COMMANDS for x in example_lines(cli.EXAMPLES[name])]
    ran = run_examples(lines, env, tmp_path, monkeypatch, capsys)
    assert {argv[0] for argv in ran} == {name for name, *_ in cli.COMMANDS}
    assert (tmp_path / "ds" / "postgres" / "index.faiss").exists()
    assert (tmp_path / "tuned.json").exists() and (tmp_path / "hyp.txt").exists()
    assert (tmp_path / "corpora" / "in_train.tsv").exists()     # demo --export
    assert [c[0] for c in recorders] == ["demo", "demo", "meta-optimizer",
                                         *cli_studies(), "knnlm-why"]
    assert recorders[1][1]["retrain"] is True and recorders[1][1]["updates"] == 3000


def cli_studies():
    from knnfast.app.reproduce import STUDIES
    return list(STUDIES)


def test_readme_examples_run(env, tmp_path, monkeypatch, capsys, recorders):
    text = README.read_text(encoding="utf-8")
    section = text.split("## The `knnfast` command", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    lines = [x for block in blocks for x in example_lines(block)]
    assert len(lines) >= 4
    ran = run_examples(lines, env, tmp_path, monkeypatch, capsys)
    assert [a[0] for a in ran] == ["build-datastore", "tune", "translate", "eval-ppl"]


def _option_entries(help_text: str):
    """Each option's entry of a --help text (its continuation lines joined)."""
    entries, section = [], None
    for line in help_text.splitlines():
        if line and not line.startswith(" "):
            section = line
        elif section == "options:" and re.match(r"  -", line):
            entries.append(line.strip())
        elif section == "options:" and entries and line.startswith("     "):
            entries[-1] += " " + line.strip()
    return entries


@pytest.mark.parametrize("command", [c[0] for c in cli.COMMANDS])
def test_every_option_has_help_and_default(command):
    parser = cli.build_parser()
    with contextlib.redirect_stdout(io.StringIO()) as out, pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    entries = [e for e in _option_entries(out.getvalue()) if not e.startswith("-h, --help")]
    assert entries
    for entry in entries:
        assert "default" in entry or "(required)" in entry, entry


def test_top_level_help_is_plain_text():
    text = cli.build_parser().format_help()
    assert "``" not in text and ":class:" not in text and ":func:" not in text
    assert "exit codes:" in text and "130" in text


def test_readme_lists_every_command_and_exit_code():
    section = README.read_text(encoding="utf-8").split("## The `knnfast` command", 1)[1]
    for name, *_ in cli.COMMANDS:
        assert f"`{name}`" in section, name
    for code, meaning in cli.EXIT_CODES:
        assert f"| {code} | {meaning} |" in section, code


def test_examples_name_the_files_the_demo_writes(tmp_path):
    """DEMO_MODEL and CORPUS are where `knnfast demo` (default --cache) puts its model and
    corpora, and every corpus file an example names is one the demo writes."""
    from knnfast.app import demo
    from knnfast.app.corpus import DemoSplit
    cache = cli.build_parser().parse_args(["demo"]).cache
    assert DEMO_MODEL == f"{cache}/base_model" and CORPUS == f"{cache}/corpus"
    written = {Path(p).name for p in demo.write_split(DemoSplit(*([p] for p in PAIRS[:5])),
                                                      tmp_path)}
    named = set(re.findall(re.escape(CORPUS) + r"/(\S+)", "\n".join(cli.EXAMPLES.values())))
    assert named and named <= written, named - written
