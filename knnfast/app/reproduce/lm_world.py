"""The language-model world of the ``knnlm-why`` study: English text this machine ships (the
Python language reference in ``pydoc_data`` and the docstrings of the standard library's own
source files), split by document into train / dev / test, a byte-level BPE, a small GPT-2
trained for a fixed, seeded number of updates, and its "att" and "ffn" datastores over the
training chunks (an IVF-PQ index on the "att" one for approximate search).

Everything is deterministic for one CPython version (the text is the interpreter's own) and
cached under ``run.cache``; nothing is built before a stage asks for it."""
from __future__ import annotations

import ast
import dataclasses
import functools
import json
import math
import random
import sys
import sysconfig
from pathlib import Path
from typing import Optional

import torch

import knnfast
from knnfast.integrations import hf

from ..corpus import TextCodec, train_tokenizer
from ..demo.base_model import sha256_json
from ..demo.knn_lm import LM_CHUNK, python_doc_chunks, train_small_lm
from .runner import StudyRun

# Directories of the standard library whose files are not library text (tests, vendored code).
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclasses.dataclass(frozen=True)
class LMScale:
    """Sizes of a run. ``doc_files``: standard-library files read (None: all); ``paragraphs``:
    train paragraphs kept (None: all); dev/test are cut to their first ``*_tokens`` targets."""
    name: str
    vocab: int
    n_embd: int
    n_layer: int
    updates: int
    doc_files: Optional[int]
    paragraphs: Optional[int]
    dev_tokens: int
    test_tokens: int
    stride: int
    ks: tuple
    fractions: tuple
    me_ns: tuple
    me_epochs: int


FULL = LMScale("full", vocab=4000, n_embd=128, n_layer=3, updates=800, doc_files=None,
               paragraphs=None, dev_tokens=6000, test_tokens=12000, stride=LM_CHUNK // 2,
               ks=(8, 32, 128), fractions=(0.05, 0.15, 0.4, 1.0), me_ns=(1, 3), me_epochs=1)
QUICK = LMScale("quick", vocab=300, n_embd=32, n_layer=1, updates=12, doc_files=10,
                paragraphs=120, dev_tokens=240, test_tokens=300, stride=LM_CHUNK // 2,
                ks=(4, 8), fractions=(0.5, 1.0), me_ns=(1, 2), me_epochs=1)


def stdlib_docstrings(max_files: Optional[int] = None) -> list[tuple[str, list[str]]]:
    """(file, paragraphs) of every module / class / function docstring in the standard
    library's own .py files (sorted; parsed, never imported), paragraphs of >= 4 words."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts))
    out = []
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        paragraphs = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                paragraphs += [" ".join(p.split()) for p in doc.split("\n\n") if len(p.split()) >= 4]
        if paragraphs:
            out.append((str(path.relative_to(root)), paragraphs))
    return out


def split_texts(scale: LMScale, seed: int = 0) -> dict[str, list[str]]:
    """train / dev / test paragraphs: the language reference split by topic
    (``python_doc_chunks``) plus the docstrings split by file (10 % dev, 10 % test); no dev or
    test paragraph occurs verbatim in an earlier split."""
    train, dev, test = python_doc_chunks(seed)
    files = stdlib_docstrings(scale.doc_files)
    random.Random(seed).shuffle(files)
    n = max(1, len(files) // 10)
    for part, chunk in ((test, files[:n]), (dev, files[n:2 * n]), (train, files[2 * n:])):
        part += [p for _, paragraphs in chunk for p in paragraphs]
    train = list(dict.fromkeys(train))[:scale.paragraphs]
    seen = set(train)
    dev = [p for p in dict.fromkeys(dev) if p not in seen]
    seen.update(dev)
    test = [p for p in dict.fromkeys(test) if p not in seen]
    return {"train": train, "dev": dev, "test": test}



def scale(quick: bool) -> LMScale:
    """The scale of a run (``--quick``: QUICK)."""
    return QUICK if quick else FULL

class LMWorld:
    """Corpus, tokenizer, LM and datastores of one scale, each built on first use.

    Attributes (lazy): texts, codec, train (chunks of LM_CHUNK tokens), dev / test
    (sliding windows) with dev_scored / test_scored, model, datastore(hidden)."""

    def __init__(self, run: StudyRun):
        self.run, self.log = run, run.log
        self.scale = scale(run.quick)
        self.window = LM_CHUNK
        self._stores: dict[str, knnfast.Datastore] = {}

    @functools.cached_property
    def texts(self) -> dict[str, list[str]]:
        return split_texts(self.scale)

    @functools.cached_property
    def codec(self) -> TextCodec:
        from tokenizers import Tokenizer
        path = self.run.cache / f"tokenizer-{sha256_json(self.texts['train'])[:16]}.json"
        if not path.exists():
            tok = train_tokenizer(self.texts["train"], vocab_size=self.scale.vocab)
            tmp = path.with_suffix(".tmp")
            tok.save(str(tmp))
            tmp.replace(path)
        return TextCodec(Tokenizer.from_file(str(path)))

    def stream(self, split: str) -> list[int]:
        """The split as one token stream (every paragraph ends with </s>)."""
        return [i for t in self.texts[split] for i in self.codec.encode(t)]

    @functools.cached_property
    def train(self) -> list[list[int]]:
        ids = self.stream("train")
        return [ids[s:s + self.window] for s in range(0, len(ids), self.window)
                if len(ids[s:s + self.window]) >= 2]

    def windows(self, split: str, tokens: int, stride: Optional[int] = None):
        """(windows, scored) over the first ``tokens`` targets of the split's stream."""
        return hf.sliding_windows(self.stream(split)[:tokens + 1], self.window,
                                  stride or self.scale.stride)

    @functools.cached_property
    def _dev(self):
        return self.windows("dev", self.scale.dev_tokens)

    @functools.cached_property
    def _test(self):
        return self.windows("test", self.scale.test_tokens)

    dev = property(lambda self: self._dev[0])
    dev_scored = property(lambda self: self._dev[1])
    test = property(lambda self: self._test[0])
    test_scored = property(lambda self: self._test[1])

    @functools.cached_property
    def model(self):
        s = self.scale
        return train_small_lm(self.train, self.codec.vocab_size, self.run.cache, s.updates,
                              self.log, n_embd=s.n_embd, n_layer=s.n_layer, name="lm")

    def model_stamp(self) -> str:
        self.model  # noqa: B018  (trains or loads it)
        return (self.run.cache / "lm" / "stamp.json").read_text()

    def datastore(self, hidden: str) -> knnfast.Datastore:
        """The training chunks' datastore with ``hidden`` keys ("att" or "ffn"); the metric
        is a search argument (``KNNDecoder(metric=...)``), so one store serves L2 and IP.
        A killed build resumes; a store of another model or corpus is rebuilt."""
        if hidden in self._stores:
            return self._stores[hidden]
        path = self.run.cache / f"datastore-{hidden}"
        stamp = sha256_json({"model": self.model_stamp(), "chunks": len(self.train)})
        done, started = path / "world_stamp.json", self.run.cache / f"datastore-{hidden}.stamp"
        if done.exists() and done.read_text() == stamp:
            ds = knnfast.Datastore.open(path)
        else:
            resume = started.exists() and started.read_text() == stamp
            started.write_text(stamp)
            ds = hf.build_datastore(self.model, self.train, str(path), hidden=hidden,
                                    batch_size=64, model_id="knnlm-why-gpt2", resume=True,
                                    overwrite=path.exists() and not resume, progress=False)
            done.write_text(stamp)
        self._stores[hidden] = ds
        return ds

    def index_factory(self, n: int, dim: int) -> str:
        """IVF with product-quantised lists: approximate neighbours and approximate scores."""
        lists = max(2, min(256, int(math.sqrt(n) / 2)))
        # 4-bit codes: faiss trains 8-bit PQ codebooks far slower (~40 s for 18k keys here)
        return f"IVF{lists},PQ{dim // 4}x4"

    def indexed(self, hidden: str = "att", nprobe: int = 8) -> knnfast.Datastore:
        """The datastore with its FAISS index (built once, saved next to it)."""
        ds = self.datastore(hidden)
        factory = self.index_factory(len(ds), ds.dim)
        stamp = json.dumps([(Path(ds.path) / "world_stamp.json").read_text(), factory, nprobe])
        mark = Path(ds.path) / "index_stamp.json"
        if not (mark.exists() and mark.read_text() == stamp and ds.has_saved_index()):
            ds.build_index(factory, metric="l2", nprobe=nprobe, progress=False)
            mark.write_text(stamp)
        ds.load_index("cpu")
        return ds

    def describe(self) -> list[str]:
        c = self.model.config
        n = sum(p.numel() for p in self.model.parameters())
        return [f"data: the Python {sys.version.split()[0]} language reference (pydoc_data "
                f"topics, split by topic) + the docstrings of the standard library's .py files "
                f"(split by file), {len(self.texts['train']):,} / {len(self.texts['dev']):,} / "
                f"{len(self.texts['test']):,} train / dev / test paragraphs",
                f"LM: GPT-2 shape, {c.n_layer} layers, d={c.n_embd}, vocab {c.vocab_size} "
                f"(byte-level BPE), {n / 1e6:.2f}M parameters, {self.scale.updates} updates of "
                f"32 chunks of {self.window} tokens (seed 0); {len(self.train):,} training chunks",
                f"evaluation: sliding windows of {self.window} tokens, stride "
                f"{self.scale.stride} (each token scored once, with >= "
                f"{self.window - self.scale.stride} tokens of context after the first window); "
                f"dev {sum(self.dev_scored):,} tokens (tuning), test {sum(self.test_scored):,} "
                f"tokens"]


def lm_features(model, examples, scored, hidden: str = "att", batch_size: int = 32):
    """(hidden [T, D] float32, targets [T], base log p(y) [T]) of the scored positions."""
    hs, ts, lps = [], [], []
    for tf in hf.teacher_forced(model, examples, hidden=hidden, batch_size=batch_size):
        hs.append(tf.hidden.float())
        ts.append(tf.targets)
        lps.append(hf.base_gold_logprob(tf.logits, tf.targets))
    keep = hf.scored_mask(examples, scored)
    return torch.cat(hs)[keep], torch.cat(ts)[keep], torch.cat(lps)[keep]
