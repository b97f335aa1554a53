"""The README's example and the docstring examples run as written."""
import doctest
import re
from pathlib import Path

import pytest

import importlib

import knnfast.ops

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    logp = namespace["logp"]
    assert logp.shape == (16, 42_024)
    assert ((logp.exp().sum(1) - 1).abs() < 1e-4).all()


# (knnfast.ops.<op> is the op itself; its module is reached through importlib)
@pytest.mark.parametrize("module", ["knnfast.ops.knn_search", "knnfast.ops.knn_interpolate",
                                    "knnfast.ops.settings", "knnfast.topk"])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module),
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0


def test_readme_datastore_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    block = next(b for b in blocks if "KNNDecoder" in b)
    block = block.replace("/tmp/knnfast-ds", str(tmp_path / "ds"))
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    logp = namespace["logp"]
    assert logp.shape == (4, 1000)
    assert ((logp.exp().sum(1) - 1).abs() < 1e-4).all()
    assert namespace["ids"].shape == (4, 8)


def test_datastore_docstring_example():
    import knnfast.storage.datastore
    result = doctest.testmod(knnfast.storage.datastore, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0
