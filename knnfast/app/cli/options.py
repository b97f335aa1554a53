"""The options of every command: value types that reject bad input before any work, and
help texts that always show the default (``option`` adds it, one rule for all)."""
from __future__ import annotations

import argparse
from typing import Callable, List

from ...defaults import ANALYSIS, KNN_LM, KNN_MT, MAX_K, METRICS
from ...storage.format import KEY_DTYPES
from .launch import DEFAULT_TIMEOUT_S


# --------------------------------------------------------------------------- value types
# argparse turns an ArgumentTypeError into a usage error naming the option.

def _number(cast: Callable, low: float, high: float = float("inf"), low_open: bool = False):
    """A type accepting ``cast(text)`` in [low, high] ((low, high] with ``low_open``)."""
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high != float("inf") else \
        (f"> {low:g}" if low_open else f">= {low:g}")

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if cast is int else 'a number'}") from None
        if not (low < value if low_open else low <= value) or value > high or value != value:
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {bounds})")
        return value
    parse.__name__ = "int" if cast is int else "number"
    return parse


positive_int = _number(int, 1)
k_value = _number(int, 1, MAX_K)          # the ops' limit (knnfast.defaults.MAX_K)
positive_float = _number(float, 0.0, low_open=True)
unit_float = _number(float, 0.0, 1.0)     # λ
fraction = _number(float, 0.0, 1.0, low_open=True)


def list_of(item: Callable) -> Callable[[str], List]:
    """A comma-separated list of ``item`` values (at least one)."""
    def parse(text: str) -> List:
        parts = [x.strip() for x in text.split(",") if x.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} holds no values (comma-separated)")
        try:
            return [item(x) for x in parts]
        except argparse.ArgumentTypeError as e:
            raise argparse.ArgumentTypeError(f"in {text!r}: {e}") from None
    parse.__name__ = "list"
    return parse


# --------------------------------------------------------------------------- helpers

def option(p: argparse.ArgumentParser, *names: str, help: str, **kwargs) -> None:
    """``p.add_argument`` with the default written into the help text: flags say "off by
    default"; a computed default (None) is described in ``help`` itself."""
    default = kwargs.get("default")
    if kwargs.get("action") == "store_true":
        help += " (default: off)"
    elif kwargs.get("required"):
        help += " (required)"
    elif default is not None and "default" not in help:
        help += " (default: %(default)s)"
    p.add_argument(*names, help=help, **kwargs)


def _hidden_override(p: argparse.ArgumentParser) -> None:
    option(p, "--hidden", help="key layer of the datastore's keys: 'ffn', 'att' or a module "
           "path (default: the datastore's meta.json field \"hidden\"); needed for datastores "
           "that do not record it")


def _knn(p: argparse.ArgumentParser, preset, name: str, settings: bool = True) -> None:
    """--k/--temperature/--lam (default: ``settings`` file, then the method's preset)."""
    origin = "--settings, else " if settings else ""
    option(p, "--k", type=k_value, help=f"neighbours per step, 1..{MAX_K}; more than the "
           f"datastore holds is clamped with a warning (default: {origin}{preset.k}, the "
           f"{name} preset)")
    option(p, "--temperature", type=positive_float, help="softmax temperature over the "
           f"scores (default: {origin}{preset.temperature:g})")
    option(p, "--lam", type=unit_float, help=f"kNN weight λ in [0, 1] (default: "
           f"{origin}{preset.lam:g})")
    if settings:
        option(p, "--settings", metavar="FILE", help="k, temperature and λ from `knnfast tune "
               "--save FILE`; options given on the command line win (default: none)")
    option(p, "--index", action="store_true",
           help="search the datastore's FAISS index (build-index) instead of exactly")
    option(p, "--lists", action="store_true",
           help="with --index and an IVF index: search its lists with knnfast's fused "
                "kernel, the whole batch in one call (the same lists and nprobe, exact "
                "scores; loads the keys into RAM)")
    option(p, "--backend", choices=("fused", "reference"), default="fused",
           help="knnfast kernels or the pure-PyTorch reference path")
    _hidden_override(p)


def _skip(p: argparse.ArgumentParser) -> None:
    """Retrieval skipping (knnfast.RetrievalSkip): a confidence threshold and/or a learned gate."""
    option(p, "--skip-confidence", type=fraction, metavar="P",
           help="skip retrieval for the rows whose largest model probability reaches P, in "
                "(0, 1] (default: off, every row searches)")
    option(p, "--gate", metavar="DIR",
           help="skip retrieval for the rows whose learned retrieval gate predicts λ below "
                "--gate-threshold: a RetrievalGate fitted for this datastore (fit_gate) and "
                "saved with save() (default: none)")
    option(p, "--gate-threshold", type=unit_float, metavar="T",
           help="with --gate: skip rows whose predicted λ is below T, in [0, 1] (default: 0.5)")


def _model_data(p: argparse.ArgumentParser, corpus_help: str) -> None:
    option(p, "--model", required=True, help="local HF model directory (save_pretrained)")
    option(p, "--datastore", required=True, help="datastore directory (build-datastore)")
    option(p, "--corpus", required=True, help=corpus_help)


CORPUS_HELP = "text lines (causal LM) or source<TAB>target lines (encoder-decoder)"


def _limit(p: argparse.ArgumentParser) -> None:
    option(p, "--limit", type=positive_int, help="use only the first N non-blank corpus lines "
           "(default: all)")


def _batch_limit(p: argparse.ArgumentParser, batch_size: int) -> None:
    option(p, "--batch-size", type=positive_int, default=batch_size,
           help="examples per forward pass")
    _limit(p)


# --------------------------------------------------------------------------- commands

def build_datastore_args(p: argparse.ArgumentParser) -> None:
    option(p, "--model", required=True, help="local HF model directory (save_pretrained)")
    option(p, "--corpus", required=True, help=CORPUS_HELP)
    option(p, "--out", required=True, help="datastore directory to create (its parent must exist)")
    option(p, "--hidden", default="ffn", help="key layer: 'ffn' (input of the LM head), 'att' "
           "(input of the last decoder block's FFN) or a module path")
    _batch_limit(p, 16)
    option(p, "--key-dtype", choices=tuple(KEY_DTYPES), default="float16",
           help="how keys are stored")
    option(p, "--metric", choices=METRICS, default="l2", help="score function the keys are for")
    option(p, "--resume", action="store_true", help="continue an interrupted build")
    option(p, "--overwrite", action="store_true", help="replace an existing datastore or build")
    option(p, "--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
           help="under torchrun (one shard per rank): seconds a rank waits for the others at "
           "a collective (joining, the end of the build) before failing")


def build_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("datastore", help="datastore directory (build-datastore)")
    option(p, "--factory", help="faiss index_factory string, e.g. Flat, IVF1024,Flat, "
           "IVF4096,PQ64 (default: Flat below 1M entries, IVF4096,PQ64 above)")
    option(p, "--metric", choices=METRICS, help="index metric (default: the datastore's, "
           "meta.json field \"metric\")")
    option(p, "--train-size", type=positive_int, default=1_000_000,
           help="keys sampled to train the quantizers")
    option(p, "--nprobe", type=positive_int, default=32,
           help="IVF lists searched per query (recorded for IVF indexes only)")
    option(p, "--device", choices=("auto", "cpu", "cuda", "all"), default="auto",
           help="where FAISS trains and adds (auto: a GPU when faiss has one; all: sharded "
                "over every visible GPU)")


def verify_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a datastore, sharded datastore or kNN-KD teacher store "
                   "directory")


def eval_ppl_args(p: argparse.ArgumentParser) -> None:
    _model_data(p, CORPUS_HELP)
    _batch_limit(p, 8)
    _knn(p, KNN_LM, "kNN-LM")
    _skip(p)


def translate_args(p: argparse.ArgumentParser) -> None:
    option(p, "--model", required=True, help="local HF model directory (save_pretrained)")
    option(p, "--datastore", help="datastore directory (default: none, the bare model)")
    option(p, "--input", default="-", help="source lines, '-' for stdin")
    option(p, "--output", default="-", help="hypotheses, '-' for stdout")
    option(p, "--beams", type=positive_int, default=4, help="beam size (1: greedy)")
    option(p, "--batch-size", type=positive_int, default=16, help="sentences per generate call")
    option(p, "--max-new-tokens", type=positive_int, default=128,
           help="longest output (also capped by the model's position limit)")
    option(p, "--adaptive", metavar="DIR", help="a trained AdaptiveKNNDecoder (meta-k network) "
           "saved with save() (default: none)")
    option(p, "--robust", metavar="DIR", help="a trained RobustKNNDecoder (Robust kNN-MT "
           "combiner) saved with save() (default: none)")
    option(p, "--progress", choices=("auto", "on", "off"), default="auto",
           help="progress bar on stderr (auto: when stderr is a terminal)")
    _knn(p, KNN_MT, "kNN-MT")
    _skip(p)


def tune_args(p: argparse.ArgumentParser) -> None:
    _model_data(p, "dev corpus: " + CORPUS_HELP)
    option(p, "--ks", type=list_of(k_value), default="4,8,16,32", help="k values")
    option(p, "--temperatures", type=list_of(positive_float), default="1,10,100",
           help="temperatures")
    option(p, "--lams", type=list_of(unit_float), default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9",
           help="λ values")
    _batch_limit(p, 16)
    option(p, "--index", action="store_true", help="retrieve through the FAISS index")
    _hidden_override(p)
    option(p, "--grid-out", metavar="FILE", help="write every grid cell as JSON (default: none)")
    option(p, "--save", metavar="FILE", help="write the best k, temperature and λ as a settings "
           "file for `translate/eval-ppl --settings FILE` (default: none)")


def bench_args(p: argparse.ArgumentParser) -> None:
    option(p, "--rows", type=positive_int, default=64, help="B = batch x beam (16 x 4)")
    option(p, "--vocab", type=positive_int, default=42_024, help="vocabulary size V")
    option(p, "--k", type=k_value, default=KNN_MT.k, help="neighbours per row")
    option(p, "--keys", type=positive_int, default=100_000, help="datastore entries")
    option(p, "--dim", type=positive_int, default=512, help="key dimension D")
    option(p, "--seconds", type=positive_float, default=1.0, help="minimum run time per case")


def analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=("frequency", "mask-score", "size", "lambda"),
                   help="which analysis")
    _model_data(p, "the evaluation corpus: " + CORPUS_HELP)
    option(p, "--train-corpus", help="frequency: the corpus whose token frequencies define "
           "the buckets (default: the corpus the datastore was built from, meta.json field "
           "extra.corpus)")
    _limit(p)
    # the analyses' preset (knnfast.defaults.ANALYSIS), as knnfast.methods.analysis
    option(p, "--k", type=k_value, default=ANALYSIS.k, help="neighbours")
    option(p, "--temperature", type=positive_float, default=ANALYSIS.temperature,
           help="softmax temperature")
    option(p, "--lam", type=unit_float, default=ANALYSIS.lam, help="kNN weight λ")
    _hidden_override(p)
    option(p, "--edges", type=list_of(_number(int, 0)), default="0,10,100,1000",
           help="frequency: bucket edges")
    option(p, "--fractions", type=list_of(fraction), default="0.1,0.25,0.5,1.0",
           help="size: datastore fractions")
    option(p, "--lams", type=list_of(unit_float), default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1",
           help="lambda: λ values")
    option(p, "--plot", metavar="PNG", help="write a plot here (default: none)")


def demo_args(p: argparse.ArgumentParser) -> None:
    option(p, "--cache", default=".cache/demo", help="model, datastore and corpus cache")
    option(p, "--out", default="demo-results", help="where results and plots go")
    option(p, "--updates", type=positive_int, help="base-model training updates (fixed and "
           "seeded: the same model on any machine; default: BaseModelConfig.updates, 3000)")
    option(p, "--retrain", action="store_true", help="train the base model again even when "
           "the cache holds one with the same settings")
    option(p, "--export", metavar="DIR", help="only write the demo's corpora as TSV files "
           "(in_train.tsv, in_dev.tsv, in_test.tsv, general_*.tsv) to DIR and stop (default: "
           "none; every run also writes them to CACHE/corpus)")
    option(p, "--locale-dir", help="German gettext catalogs (default: "
           "/usr/share/locale/de/LC_MESSAGES; missing: the kNN-LM fallback demo)")


def reproduce_args(p: argparse.ArgumentParser) -> None:
    from ..reproduce import STUDIES
    p.add_argument("study", choices=list(STUDIES) + ["all"], help="which paper's experiments")
    option(p, "--quick", action="store_true", help="tiny scale: checks structure, not claims")
    option(p, "--out", default="reproduce-results", help="where <study>.md/.json/PNGs go")
    option(p, "--cache", default=".cache/reproduce",
           help="models, datastores and finished stages (a killed run resumes)")
