"""The ``knnfast`` command: build datastores and indexes, evaluate, translate, tune, bench.

Models and tokenizers are read from local HF directories (``save_pretrained`` output);
nothing is downloaded. Corpora are plain UTF-8 files: one text per line for causal LMs,
``source<TAB>target`` per line for encoder-decoders. Results are printed as JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional, Sequence

from ..defaults import ANALYSIS, KNN_LM, KNN_MT, METRICS
from ..storage.format import KEY_DTYPES

EXAMPLES = {
    "build-datastore": """examples:
  knnfast build-datastore --model .cache/demo/model --corpus in_train.tsv --out ds/postgres
  knnfast build-datastore --model my-gpt2 --corpus wiki.txt --out ds/wiki --hidden att --resume""",
    "build-index": """examples:
  knnfast build-index ds/postgres                      # Flat below 1M entries, IVF4096,PQ64 above
  knnfast build-index ds/wiki --factory IVF1024,PQ32 --train-size 200000 --nprobe 16""",
    "eval-ppl": """examples:
  knnfast eval-ppl --model my-gpt2 --datastore ds/wiki --corpus test.txt --k 1024 --lam 0.25
  knnfast eval-ppl --model .cache/demo/model --datastore ds/postgres --corpus in_test.tsv --index""",
    "translate": """examples:
  echo "could not open file" | knnfast translate --model .cache/demo/model --datastore ds/postgres
  knnfast translate --model M --datastore D --input src.txt --output hyp.txt --beams 4 --lam 0.7
  knnfast translate --model M --input src.txt              # bare model, no kNN""",
    "tune": """examples:
  knnfast tune --model .cache/demo/model --datastore ds/postgres --corpus in_dev.tsv
  knnfast tune --model M --datastore D --corpus dev.tsv --ks 4,8,16 --temperatures 1,10,100""",
    "bench": """examples:
  knnfast bench                      # fused vs pure-PyTorch reference, decoding-step shapes
  knnfast bench --rows 640 --vocab 42024 --k 8""",
    "analyze": """examples:
  knnfast analyze frequency --model M --datastore D --corpus test.tsv --train-corpus train.tsv --plot f.png
  knnfast analyze mask-score --model M --datastore D --corpus test.txt --k 1024 --lam 0.25
  knnfast analyze size --model M --datastore D --corpus test.txt --fractions 0.05,0.25,1 --plot s.png
  knnfast analyze lambda --model M --datastore D --corpus dev.tsv --plot lam.png""",
    "demo": """examples:
  knnfast demo                       # the English->German kNN-MT demo (same as `make demo`)
  knnfast demo --cache .cache/demo --updates 3000""",
    "reproduce": """examples:
  knnfast reproduce meta-optimizer          # full run (<= 30 min on 2 cores), report in reproduce-results/
  knnfast reproduce all --quick             # every study at the tiny test scale (seconds each)
  knnfast reproduce knnlm-why --out docs/reproduce --cache .cache/reproduce""",
}


def _floats(text: str) -> List[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> List[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _print(obj) -> None:
    print(json.dumps(obj, indent=1, sort_keys=True))


# --------------------------------------------------------------------------- loading


def load_model(path: str):
    """A local HF model directory -> (model in eval mode, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    if not os.path.isdir(path):
        raise SystemExit(f"knnfast: --model {path!r} is not a directory (a save_pretrained output)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(path, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def read_corpus(path: str, model, tokenizer, limit: Optional[int] = None):
    """Token-id examples from a text file (causal) or TSV (encoder-decoder)."""
    if not os.path.exists(path):
        raise SystemExit(f"knnfast: --corpus {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        numbered = [(no, line.rstrip("\r\n")) for no, line in enumerate(f, 1)
                    if line.strip()][:limit]
    lines = [line for _, line in numbered]
    if model.config.is_encoder_decoder:
        bad = [no for no, line in numbered if "\t" not in line]
        if bad:
            raise SystemExit(f"knnfast: {path}:{bad[0]}: encoder-decoder corpora need "
                             f"'source<TAB>target' lines")
        src, tgt = zip(*(line.split("\t", 1) for line in lines))
        s_ids = tokenizer(list(src))["input_ids"]
        t_ids = tokenizer(text_target=list(tgt))["input_ids"]
        return list(zip(s_ids, t_ids))
    ids = tokenizer(lines)["input_ids"]
    return [x for x in ids if len(x) >= 2]


def open_datastore(path: str):
    from ..storage import Datastore, DatastoreError
    try:
        return Datastore.open(path)
    except (DatastoreError, OSError) as e:
        raise SystemExit(f"knnfast: cannot open datastore: {e}")


def make_decoder(args, datastore):
    if getattr(args, "index", False) and not datastore.has_saved_index():
        raise SystemExit(f"knnfast: --index given but {datastore.path} has no index; run "
                         f"`knnfast build-index {datastore.path}` first")
    from ..methods.decoding import AdaptiveKNNDecoder, KNNDecoder
    # --index: the FAISS index; otherwise exact search, even when index.faiss exists
    exact = not getattr(args, "index", False)
    if getattr(args, "adaptive", None):
        return AdaptiveKNNDecoder.load(args.adaptive, datastore, exact=exact)
    if getattr(args, "robust", None):
        from ..methods.robust import RobustKNNDecoder
        try:
            return RobustKNNDecoder.load(args.robust, datastore, exact=exact)
        except (OSError, ValueError) as e:
            raise SystemExit(f"knnfast: --robust: {e}") from None
    return KNNDecoder(datastore, k=args.k, temperature=args.temperature, lam=args.lam,
                      exact=exact, backend=args.backend)


# --------------------------------------------------------------------------- commands


def cmd_build_datastore(args) -> None:
    from ..integrations import hf
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    dtype = KEY_DTYPES[args.key_dtype]
    t0 = time.perf_counter()
    from ..storage import DatastoreError
    try:
        ds = hf.build_datastore(model, examples, args.out, hidden=args.hidden,
                                batch_size=args.batch_size, key_dtype=dtype, metric=args.metric,
                                model_id=os.path.abspath(args.model), resume=args.resume,
                                overwrite=args.overwrite)
    except FileExistsError:
        raise SystemExit(f"knnfast: --out {args.out!r} already exists; pass --overwrite to "
                         f"replace it") from None
    except DatastoreError as e:
        raise SystemExit(f"knnfast: {e} (CLI: --resume / --overwrite)") from None
    ds.update_extra(corpus=os.path.abspath(args.corpus))
    _print({"datastore": ds.path, "entries": len(ds), "dim": ds.dim,
            "examples": len(examples), "seconds": round(time.perf_counter() - t0, 2)})


def cmd_build_index(args) -> None:
    ds = open_datastore(args.datastore)
    t0 = time.perf_counter()
    ds.build_index(args.factory, metric=args.metric, train_size=args.train_size,
                   device=args.device, nprobe=args.nprobe)
    with open(os.path.join(ds.path, "index.json")) as f:
        info = json.load(f)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    _print(info)


def cmd_eval_ppl(args) -> None:
    from ..integrations import hf
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    ds = open_datastore(args.datastore)
    res = hf.evaluate_lm(model, examples, make_decoder(args, ds), hidden=ds.meta.get("hidden", "ffn"),
                         batch_size=args.batch_size)
    _print({"settings": {"k": args.k, "temperature": args.temperature, "lam": args.lam,
                         "hidden": ds.meta.get("hidden", "ffn"), "index": bool(args.index)},
            "tokens": res.tokens, "base_ppl": res.base_ppl, "knn_ppl": res.knn_ppl,
            "oracle_ppl": res.oracle_ppl, "best_of_ppl": res.best_of_ppl,
            "tokens_per_s": res.tokens_per_s})


def cmd_translate(args) -> None:
    from ..integrations import hf
    model, tok = load_model(args.model)
    if args.input == "-":
        lines = [line.rstrip("\r\n") for line in sys.stdin]
    else:
        with open(args.input, encoding="utf-8") as src:
            lines = [line.rstrip("\r\n") for line in src]
    decoder, hidden = None, "ffn"
    if args.datastore:
        ds = open_datastore(args.datastore)
        decoder, hidden = make_decoder(args, ds), ds.meta.get("hidden", "ffn")
    limit = min(args.max_new_tokens, getattr(model.config, "max_position_embeddings", 10**9))
    out = open(args.output, "w", encoding="utf-8") if args.output != "-" else sys.stdout
    t0 = time.perf_counter()
    try:
        for s in range(0, len(lines), args.batch_size):
            enc = tok(lines[s:s + args.batch_size], return_tensors="pt", padding=True)
            gen = hf.generate(model, decoder, **enc, num_beams=args.beams,
                              max_new_tokens=limit, hidden=hidden)
            for text in tok.batch_decode(gen, skip_special_tokens=True):
                out.write(text + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
    secs = time.perf_counter() - t0
    print(json.dumps({"sentences": len(lines), "seconds": round(secs, 3),
                      "sentences_per_s": round(len(lines) / max(secs, 1e-9), 2)}), file=sys.stderr)


def cmd_tune(args) -> None:
    from ..integrations import hf
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    ds = open_datastore(args.datastore)
    if args.index and not ds.has_saved_index():
        raise SystemExit(f"knnfast: --index given but {ds.path} has no index; run "
                         f"`knnfast build-index {ds.path}` first")
    res = hf.tune(model, examples, ds, ks=_ints(args.ks), temperatures=_floats(args.temperatures),
                  lams=_floats(args.lams), hidden=ds.meta.get("hidden", "ffn"),
                  batch_size=args.batch_size, exact=not args.index)
    if args.grid_out:
        with open(args.grid_out, "w") as f:
            json.dump(res.grid, f, indent=1)
    _print({"best": res.best, "base_nll": res.base_nll, "cells": len(res.grid)})


def cmd_bench(args) -> None:
    import torch
    from torch.utils import benchmark
    from .. import ops, reference
    torch.manual_seed(0)
    B, V, k = args.rows, args.vocab, args.k
    logits = torch.randn(B, V)
    tokens = torch.randint(0, V, (B, k))
    scores = -torch.rand(B, k) * 100
    keys = torch.randn(args.keys, args.dim).half()
    queries = torch.randn(B, args.dim)
    cases = {
        "knn_interpolate": (lambda: ops.knn_interpolate(logits, tokens, scores=scores, temperature=10.0, lam=0.5),
                            lambda: reference.knn_interpolate(logits, tokens, scores=scores, temperature=10.0, lam=0.5)),
        "knn_search": (lambda: ops.knn_search(queries, keys, k),
                       lambda: reference.knn_search(queries, keys, k)),
    }
    rows = {}
    for name, (fused, ref) in cases.items():
        tf = benchmark.Timer("f()", globals={"f": fused}).blocked_autorange(min_run_time=args.seconds).median
        tr = benchmark.Timer("f()", globals={"f": ref}).blocked_autorange(min_run_time=args.seconds).median
        rows[name] = {"fused_ms": round(tf * 1e3, 3), "reference_ms": round(tr * 1e3, 3),
                      "speedup": round(tr / tf, 2)}
    _print({"shape": {"rows": B, "vocab": V, "k": k, "keys": args.keys, "dim": args.dim,
                      "threads": torch.get_num_threads()}, "results": rows})


def cmd_analyze(args) -> None:
    from ..integrations import hf
    from ..methods import analysis
    from . import plots
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    ds = open_datastore(args.datastore)
    hidden = ds.meta.get("hidden", "ffn")
    settings = {"k": args.k, "temperature": args.temperature, "lam": args.lam, "hidden": hidden}
    if args.kind == "frequency":
        source = frequency_corpus(args, ds)
        train = read_corpus(source["path"], model, tok, None)
        buckets = analysis.retrieval_by_frequency(model, examples, ds, analysis.target_counts(train),
                                                  k=args.k, edges=_ints(args.edges), hidden=hidden)
        if args.plot:
            plots.plot_buckets(buckets, args.plot, "kNN accuracy and recall by frequency")
        _print({"frequencies_from": source, "settings": {"k": args.k, "hidden": hidden},
                "buckets": [{"bucket": b.label, "positions": b.positions,
                             "knn_accuracy": b.knn_accuracy, "recall": b.recall}
                            for b in buckets]})
    elif args.kind == "mask-score":
        _print({"settings": settings,
                "grid": analysis.mask_score_grid(model, examples, ds, k=args.k,
                                                 temperature=args.temperature, lam=args.lam,
                                                 hidden=hidden)})
    elif args.kind == "size":
        points = analysis.size_sweep(model, examples, ds, _floats(args.fractions), k=args.k,
                                     temperature=args.temperature, lam=args.lam, hidden=hidden)
        if args.plot:
            plots.plot_curve(points, args.plot, "datastore entries", "kNN-LM perplexity",
                                "perplexity against datastore size", logx=True)
        _print({"settings": settings, "points": [{"entries": n, "knn_ppl": p} for n, p in points]})
    else:  # lambda
        res = hf.tune(model, examples, ds, ks=[args.k], temperatures=[args.temperature],
                      lams=_floats(args.lams), hidden=hidden, progress=False)
        points = [(g["lam"], g["ppl"]) for g in res.grid]
        if args.plot:
            plots.plot_curve(points, args.plot, "λ", "perplexity (gold-token NLL)",
                                f"k={args.k}, τ={args.temperature:g}")
        _print({"settings": dict(settings, lam=None), "base_ppl": math.exp(res.base_nll),
                "points": [{"lam": a, "ppl": b} for a, b in points]})


def frequency_corpus(args, ds) -> dict:
    """Where `analyze frequency` counts token frequencies: --train-corpus, else the corpus the
    datastore was built from (recorded by build-datastore); never silently the test corpus."""
    if args.train_corpus:
        return {"path": args.train_corpus, "from": "--train-corpus"}
    recorded = ds.meta.get("extra", {}).get("corpus")
    if recorded:
        return {"path": recorded, "from": "the datastore's meta.json (extra.corpus)"}
    raise SystemExit("knnfast: analyze frequency needs --train-corpus: the datastore records no "
                     "training corpus (datastores built by `knnfast build-datastore` do)")


def cmd_demo(args) -> None:
    from . import demo
    demo.main(cache_dir=args.cache, updates=args.updates, out_dir=args.out,
              locale_dir=args.locale_dir)


# --------------------------------------------------------------------------- parser


def _add_knn_args(p: argparse.ArgumentParser, k: int, temperature: float, lam: float) -> None:
    p.add_argument("--k", type=int, default=k, help=f"neighbours per step (default {k})")
    p.add_argument("--temperature", type=float, default=temperature,
                   help=f"softmax temperature over -squared L2 (default {temperature})")
    p.add_argument("--lam", type=float, default=lam, help=f"kNN weight λ (default {lam})")
    p.add_argument("--index", action="store_true",
                   help="search the datastore's FAISS index (build-index) instead of exactly")
    p.add_argument("--backend", choices=("fused", "reference"), default="fused",
                   help="knnfast kernels or the pure-PyTorch reference path")


def _add_model_data(p: argparse.ArgumentParser, corpus_help: Optional[str] = None) -> None:
    """--model, --datastore, --corpus (all required)."""
    p.add_argument("--model", required=True)
    p.add_argument("--datastore", required=True)
    p.add_argument("--corpus", required=True, help=corpus_help)


def _build_datastore_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model directory")
    p.add_argument("--corpus", required=True, help="text lines (causal) or source<TAB>target (seq2seq)")
    p.add_argument("--out", required=True, help="datastore directory to create")
    p.add_argument("--hidden", default="ffn", help="'ffn' (LM-head input), 'att' or a module path")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--key-dtype", choices=tuple(KEY_DTYPES), default="float16")
    p.add_argument("--metric", choices=METRICS, default="l2")
    p.add_argument("--limit", type=int, help="use only the first N corpus lines")
    p.add_argument("--resume", action="store_true", help="continue an interrupted build")
    p.add_argument("--overwrite", action="store_true", help="replace an existing datastore")


def _build_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("datastore")
    p.add_argument("--factory", help="faiss index_factory string (default: by size)")
    p.add_argument("--metric", choices=METRICS)
    p.add_argument("--train-size", type=int, default=1_000_000)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _eval_ppl_args(p: argparse.ArgumentParser) -> None:
    _add_model_data(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int)
    _add_knn_args(p, KNN_LM.k, KNN_LM.temperature, KNN_LM.lam)


def _translate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--datastore", help="omit for the bare model")
    p.add_argument("--input", default="-", help="source lines (default stdin)")
    p.add_argument("--output", default="-", help="hypotheses (default stdout)")
    p.add_argument("--beams", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--adaptive", help="directory of a trained AdaptiveKNNDecoder (meta-k network)")
    p.add_argument("--robust", help="directory of a trained RobustKNNDecoder (Robust kNN-MT "
                   "combiner, saved with RobustKNNDecoder.save)")
    _add_knn_args(p, KNN_MT.k, KNN_MT.temperature, KNN_MT.lam)


def _tune_args(p: argparse.ArgumentParser) -> None:
    _add_model_data(p)
    p.add_argument("--ks", default="4,8,16,32")
    p.add_argument("--temperatures", default="1,10,100")
    p.add_argument("--lams", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int)
    p.add_argument("--index", action="store_true", help="retrieve through the FAISS index")
    p.add_argument("--grid-out", help="write every grid cell as JSON here")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=64, help="B = batch x beam (default 16 x 4)")
    p.add_argument("--vocab", type=int, default=42_024)
    p.add_argument("--k", type=int, default=KNN_MT.k)
    p.add_argument("--keys", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--seconds", type=float, default=1.0, help="minimum run time per case")


def _analyze_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", choices=("frequency", "mask-score", "size", "lambda"))
    _add_model_data(p, "the evaluation corpus")
    p.add_argument("--train-corpus", help="frequency: the corpus whose token frequencies define "
                   "the buckets (default: the corpus the datastore was built from, as recorded "
                   "by build-datastore)")
    p.add_argument("--limit", type=int)
    # the analyses' preset (knnfast.defaults.ANALYSIS: kNN-LM's τ and λ, k = 8), the same as
    # the Python functions of knnfast.methods.analysis
    p.add_argument("--k", type=int, default=ANALYSIS.k, help=f"neighbours (default {ANALYSIS.k})")
    p.add_argument("--temperature", type=float, default=ANALYSIS.temperature,
                   help=f"softmax temperature (default {ANALYSIS.temperature:g}, as eval-ppl)")
    p.add_argument("--lam", type=float, default=ANALYSIS.lam,
                   help=f"kNN weight λ (default {ANALYSIS.lam:g})")
    p.add_argument("--edges", default="0,10,100,1000", help="frequency bucket edges")
    p.add_argument("--fractions", default="0.1,0.25,0.5,1.0", help="size: datastore fractions")
    p.add_argument("--lams", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1")
    p.add_argument("--plot", help="write a PNG here")


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=".cache/demo", help="model/datastore cache directory")
    p.add_argument("--out", default="demo-results", help="where results and plots go")
    p.add_argument("--updates", type=int, default=None,
                   help="base-model training updates (fixed and seeded, so the same model on "
                   "any machine; default: the demo's BaseModelConfig.updates)")
    p.add_argument("--locale-dir", help="German gettext catalogs (default "
                   "/usr/share/locale/de/LC_MESSAGES; missing -> kNN-LM fallback demo)")


def cmd_reproduce(args) -> None:
    from . import reproduce
    studies = list(reproduce.STUDIES) if args.study == "all" else [args.study]
    for study in studies:
        reproduce.reproduce(study, quick=args.quick, out_dir=args.out, cache_dir=args.cache)


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    from .reproduce import STUDIES
    p.add_argument("study", choices=list(STUDIES) + ["all"], help="which paper's experiments")
    p.add_argument("--quick", action="store_true", help="tiny scale: checks structure, not claims")
    p.add_argument("--out", default="reproduce-results", help="where <study>.md/.json/PNGs go")
    p.add_argument("--cache", default=".cache/reproduce",
                   help="models, datastores and finished stages (a killed run resumes)")


#: (name, function, help, arguments) of every command, in --help order.
COMMANDS = (
    ("build-datastore", cmd_build_datastore,
     "capture a datastore (hidden state -> next token) from a model and a corpus",
     _build_datastore_args),
    ("build-index", cmd_build_index, "train and fill a FAISS index over a datastore",
     _build_index_args),
    ("eval-ppl", cmd_eval_ppl, "perplexity of the base model, kNN-LM and the oracle",
     _eval_ppl_args),
    ("translate", cmd_translate, "generate with kNN (kNN-MT / kNN-LM), beam or greedy",
     _translate_args),
    ("tune", cmd_tune, "grid-search k, temperature and λ on a dev set from one retrieval",
     _tune_args),
    ("bench", cmd_bench, "time fused ops against the pure-PyTorch reference", _bench_args),
    ("analyze", cmd_analyze, "retrieval analyses of the source papers (JSON + PNG)",
     _analyze_args),
    ("demo", cmd_demo, "English->German kNN-MT demo on the system's gettext catalogs",
     _demo_args),
    ("reproduce", cmd_reproduce, "rerun a source paper's experiments in miniature (report with "
     "the paper's claims beside ours)", _reproduce_args),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="knnfast", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, func, help_, add_arguments in COMMANDS:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        add_arguments(p)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
