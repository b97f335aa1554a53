"""``knnfast analyze``: the source papers' retrieval analyses (JSON + PNG)."""
from __future__ import annotations

import math

from .errors import DataError
from .loading import check_writable, load_model, open_datastore, print_json, read_corpus
from .pairing import check_pairing, fit_k


def cmd_analyze(args) -> None:
    from ...methods import analysis
    check_writable("--plot", args.plot)
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    ds = open_datastore(args.datastore)
    hidden = check_pairing(args, model, tok, ds)
    args.k = fit_k(args.k, ds)
    settings = {"k": args.k, "temperature": args.temperature, "lam": args.lam, "hidden": hidden}
    if args.kind == "frequency":
        print_json(_frequency(args, model, tok, examples, ds, hidden))
    elif args.kind == "mask-score":
        print_json({"settings": settings,
                    "grid": analysis.mask_score_grid(model, examples, ds, k=args.k,
                                                     temperature=args.temperature, lam=args.lam,
                                                     hidden=hidden)})
    elif args.kind == "size":
        print_json(_size(args, model, examples, ds, settings))
    else:
        print_json(_lambda(args, model, examples, ds, settings))


def _frequency(args, model, tok, examples, ds, hidden) -> dict:
    from ...methods import analysis
    from .. import plots
    source = frequency_corpus(args, ds)
    train = read_corpus(source["path"], model, tok, None, option=source["from"])
    buckets = analysis.retrieval_by_frequency(model, examples, ds, analysis.target_counts(train),
                                              k=args.k, edges=args.edges, hidden=hidden)
    if args.plot:
        plots.plot_buckets(buckets, args.plot, "kNN accuracy and recall by frequency")
    return {"frequencies_from": source, "settings": {"k": args.k, "hidden": hidden},
            "buckets": [{"bucket": b.label, "positions": b.positions,
                         "knn_accuracy": b.knn_accuracy, "recall": b.recall} for b in buckets]}


def _size(args, model, examples, ds, settings) -> dict:
    from ...methods import analysis
    from .. import plots
    points = analysis.size_sweep(model, examples, ds, args.fractions, k=args.k,
                                 temperature=args.temperature, lam=args.lam,
                                 hidden=settings["hidden"])
    if args.plot:
        plots.plot_curve(points, args.plot, "datastore entries", "kNN-LM perplexity",
                         "perplexity against datastore size", logx=True)
    return {"settings": settings, "points": [{"entries": n, "knn_ppl": p} for n, p in points]}


def _lambda(args, model, examples, ds, settings) -> dict:
    from ...integrations import hf
    from .. import plots
    res = hf.tune(model, examples, ds, ks=[args.k], temperatures=[args.temperature],
                  lams=args.lams, hidden=settings["hidden"], progress=False)
    points = [(g["lam"], g["ppl"]) for g in res.grid]
    # an infinite perplexity (λ = 1: some gold token has no neighbour) cannot be drawn; the
    # plot says which λ it leaves out instead of dropping them silently
    infinite = [lam for lam, ppl in points if not math.isfinite(ppl)]
    if args.plot:
        note = f"; λ = {', '.join(f'{x:g}' for x in infinite)}: infinite, not drawn" if infinite else ""
        plots.plot_curve([p for p in points if math.isfinite(p[1])], args.plot, "λ",
                         "perplexity (gold-token NLL)",
                         f"k={args.k}, τ={args.temperature:g}{note}")
    return {"settings": dict(settings, lam=None), "base_ppl": math.exp(res.base_nll),
            "points": [{"lam": a, "ppl": b} for a, b in points], "infinite_ppl_at": infinite}


def frequency_corpus(args, ds) -> dict:
    """Where `analyze frequency` counts token frequencies: --train-corpus, else the corpus the
    datastore was built from (recorded by build-datastore); never silently the test corpus."""
    if args.train_corpus:
        return {"path": args.train_corpus, "from": "--train-corpus"}
    recorded = ds.meta.get("extra", {}).get("corpus")
    if recorded:
        return {"path": recorded, "from": "the datastore's meta.json (extra.corpus)"}
    raise DataError("analyze frequency needs --train-corpus: the datastore records no "
                    "training corpus (meta.json field extra.corpus)",
                    "pass --train-corpus FILE, the corpus the datastore was built from")
