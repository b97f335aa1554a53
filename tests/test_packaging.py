"""Packaging: knnfast builds against the torch already installed, says so when it cannot, and
its wheel works outside the source tree.

* pyproject.toml lists no torch in build-system.requires (a second torch for the build);
* the sdist carries what a wheel build needs (CMake description, csrc/, every subpackage);
* import checks the running torch: below the supported floor -> ImportError, another release
  than the library was built against -> TorchVersionWarning, an unloadable library ->
  ImportError saying how to rebuild;
* the wheel installs into a fresh venv and runs there (needs a built wheel: `make
  package-check` builds one, sets KNNFAST_WHEEL and runs this file; a few minutes, so not
  part of `make test`).
"""
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib

import pytest
import torch

import knnfast
from knnfast.ops.compat import MIN_TORCH, TorchVersionWarning, mismatch_message, release

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300


def run_python(code, env=None, cwd=None, python=sys.executable):
    return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                          env=env, cwd=cwd)


def test_build_requires_no_torch():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        requires = tomllib.load(f)["build-system"]["requires"]
    assert not [r for r in requires if r.lower().startswith("torch")], requires


def test_sdist_has_the_sources_a_wheel_build_needs(tmp_path):
    # from a copy without build products: setuptools also packs every file a stale
    # knnfast.egg-info/SOURCES.txt lists, which would hide a file the config no longer includes
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".cache", "build", "*.egg-info", "*.so", "__pycache__", "demo-results",
        "docs", "benchmarks", "examples"))
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                    str(tmp_path)], cwd=src, check=True, capture_output=True, timeout=TIMEOUT)
    (sdist,) = tmp_path.glob("knnfast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    packages = {os.path.relpath(d, ROOT) for d, _, files in os.walk(os.path.join(ROOT, "knnfast"))
                if "__init__.py" in files}
    needed = {"CMakeLists.txt", "setup.py", "pyproject.toml", "csrc/ops.cpp",
              "csrc/build_info.cpp", "knnfast/_version.py"}
    needed |= {f"{p}/__init__.py" for p in packages}
    assert needed <= names, sorted(needed - names)
    assert not [n for n in names if n.endswith(".so")], "a compiled library leaked into the sdist"


def test_release_parsing():
    assert release("2.13.0+cpu") == (2, 13, 0)
    assert release("2.14.0a0+git1234") == (2, 14, 0)
    assert release("2.4") == (2, 4)


def test_mismatch_message():
    assert mismatch_message("2.13.0+cpu", "2.13.0+cu124") is None  # local tag ignored
    assert mismatch_message("unknown", "2.13.0") is None  # a library older than the key
    message = mismatch_message("2.12.1", "2.13.0")
    assert "built against torch 2.12.1" in message and "torch 2.13.0 is running" in message
    assert "--no-build-isolation" in message


def test_build_info_records_the_torch_it_was_built_against():
    info = knnfast.build_info()
    assert info["torch_version"] == torch.__version__
    # `make build` compiles against the torch that runs the tests
    assert info["built_with_torch"] == torch.__version__


def test_import_warns_under_another_torch_release():
    code = ("import warnings, torch; torch.__version__ = '2.99.0'\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always'); import knnfast\n"
            "for w in caught: print(type(w.message).__name__, w.message)")
    out = run_python(code, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert TorchVersionWarning.__name__ in out.stdout, out.stdout
    assert f"built against torch {torch.__version__}" in out.stdout
    assert "torch 2.99.0 is running" in out.stdout


def test_import_refuses_a_torch_below_the_floor():
    out = run_python("import torch; torch.__version__ = '2.3.1'; import knnfast", cwd=ROOT)
    assert out.returncode != 0
    floor = ".".join(map(str, MIN_TORCH))
    assert f"ImportError: knnfast needs torch >= {floor}" in out.stderr, out.stderr
    assert "2.3.1 is installed" in out.stderr


@pytest.mark.parametrize("content", [None, b"not a shared library\n"], ids=["missing", "garbage"])
def test_unloadable_library_is_a_clear_import_error(tmp_path, content):
    path = tmp_path / "_C.so"
    if content is not None:
        path.write_bytes(content)
    env = dict(os.environ, KNNFAST_LIBRARY=str(path))
    out = run_python("import knnfast", env=env, cwd=ROOT)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: knnfast:") and str(path) in last, out.stderr
    if content is not None:
        assert "Rebuild it in this environment" in last


SMOKE = r"""
import json, os, sys, torch, knnfast
import knnfast.app.cli  # the console script's module: every subpackage was installed
q = torch.randn(5, 16)
scores, ids = knnfast.knn_search(q, q, 1)
info = knnfast.build_info()
print(json.dumps({"file": knnfast.__file__, "ids": ids[:, 0].tolist(),
                  "built_with_torch": info["built_with_torch"], "torch": torch.__version__}))
"""


def fresh_venv_with_wheel(tmp_path, wheel, env):
    """A venv without pip whose only extra package is the wheel; torch and numpy come from
    this interpreter's site-packages through a .pth file (a venv cannot inherit another
    venv's packages, and installing torch would need the network). The .pth is written after
    the install: through it pip would see this environment's (editable) knnfast as already
    installed and skip the wheel."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=TIMEOUT)
    python = str(venv / "bin" / "python")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet",
                    "--no-deps", "--no-index", "--disable-pip-version-check", wheel],
                   check=True, timeout=TIMEOUT, env=env, cwd=str(tmp_path))
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = run_python(code, env=env, python=python).stdout.strip()
    with open(os.path.join(purelib, "outer_site.pth"), "w") as f:
        f.write(run_python(code).stdout.strip() + "\n")
    return venv, python


@pytest.mark.skipif(not os.environ.get("KNNFAST_WHEEL"),
                    reason="needs a built wheel: `make package-check` builds one and runs this")
def test_wheel_installs_into_a_fresh_venv(tmp_path):
    import json
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KNNFAST_LIBRARY")}
    wheel = os.path.abspath(os.environ["KNNFAST_WHEEL"])
    venv, python = fresh_venv_with_wheel(tmp_path, wheel, env)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_python(SMOKE, env=env, cwd=str(elsewhere), python=python)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["file"].startswith(str(venv)), result  # the wheel's copy, not the source tree
    assert result["ids"] == [0, 1, 2, 3, 4]
    assert result["built_with_torch"] == result["torch"]
    cli = subprocess.run([str(venv / "bin" / "knnfast"), "--help"], capture_output=True,
                         text=True, timeout=TIMEOUT, env=env, cwd=str(elsewhere))
    assert cli.returncode == 0 and "usage" in cli.stdout.lower(), cli.stderr
