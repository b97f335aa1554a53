"""``knnfast reproduce meta-optimizer``: Gao et al. 2023 in miniature.

Arms, all from the same base model and in-domain data (PostgreSQL messages):
base; kNN-MT and adaptive kNN-MT (datastore of the base model); output-projection-only
fine-tuning (OPL); full fine-tuning (FT); adapters at three sizes (the paper's r = 64/128/256
at d_model = 1024, scaled to our d_model); adaptive kNN-MT over a datastore re-encoded by the
largest adapter model (the paper's "kNN-MT + adapter"). Every fine-tuned arm gets the same
number of updates, batches and seed. Scores: in-domain BLEU/chrF (in_test), out-of-domain
BLEU/chrF (general_dev: forgetting), decoding speed; the word-level analyses: recall of
reference words in the translations per in-domain training frequency bucket, the gold
token's recall among the k neighbours per bucket (base keys vs adapter keys), and how often
kNN-MT's next-token choice agrees with each fine-tuned model's (teacher forced on in_test:
the "dual view" with OPL fine-tuning).
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Callable, Optional

import torch

import knnfast
from knnfast.integrations import hf
from knnfast.methods.analysis import frequency_buckets, retrieval_by_frequency, target_counts
from knnfast.methods.ink import add_adapters, output_projection_only

from ..demo.knn_mt import IVF_NPROBE, ivf_factory, train_adaptive, tune_knn
from ..plots import plot_grouped_bars
from . import mt_world
from .mt_world import MTWorld, save_model
from .report import Report
from .runner import StudyRun

STUDY = "meta-optimizer"
TITLE = "kNN-MT is a meta-optimizer on the output projection layer, in miniature"
PAPER = ("Gao, Zhang, Du, Liu, Wang (2023): Nearest Neighbor Machine Translation is "
         "Meta-Optimizer on Output Projection Layer. EMNLP 2023, arXiv:2305.13034")
# The paper's findings as its abstract states them. Searched offline (issue 13) for its
# per-domain BLEU tables (WMT19 De-En on IT / Medical / Koran / Law) and its word-recall
# analysis: the stored pages (arXiv/ACL abstract pages, emergentmind, researchtrend, sotaverified,
# liner.com) are read from their beginning, which holds the abstract only; the released code
# (RuizGao/knnmt-meta-optimizer) has a README without results and no scripts with numbers; no
# issue thread quotes the tables. The abstract itself states no number, so none is quoted.
PAPER_FINDINGS = {
    "dual": "kNN-MT implicitly runs gradient descent on the output projection layer: a dual "
            "view of explicit OPL fine-tuning, with highly similar predictions (abstract, §3-4)",
    "adapter": "kNN-MT + adapters reaches in-domain quality comparable to entire-model "
               "fine-tuning (abstract, finding 1)",
    "forgetting": "... while doing better than fine-tuning on out-of-domain test sets "
                  "(abstract, finding 1)",
    "low_freq": "fine-tuning recalls in-domain low-frequency words much better than kNN-MT; "
                "adapters on the context representations close the gap (abstract, finding 2)",
}
NO_NUMBERS = "numbers not available offline (the paper's tables are not stored here)"
ADAPTER_FRACTIONS = (16, 8, 4)      # r = d_model / 16, / 8, / 4 (paper: 64/128/256 at 1024)
WORD_EDGES = (0, 1, 5, 25, 125)     # word frequency in in_train's references
TOKEN_EDGES = (0, 10, 100, 1000)    # gold-token frequency in the datastore
LR = {"OPL": 1e-3, "FT": 5e-4, "adapter": 1e-3}


def cache_settings(quick: bool) -> dict:
    """What this study's cached stages depend on (``StudyRun.use_settings``)."""
    return {"world": mt_world.scale(quick), "adapter_fractions": ADAPTER_FRACTIONS,
            "word_edges": WORD_EDGES, "token_edges": TOKEN_EDGES, "lr": LR, "nprobe": IVF_NPROBE}


def slug(name: str) -> str:
    """A system's name as a file name."""
    return re.sub(r"\W+", "_", name).strip("_")


def adapter_sizes(d_model: int) -> list[int]:
    """The three adapter bottlenecks, scaled to the model as the paper's 64/128/256 are to 1024."""
    return [max(2, d_model // f) for f in ADAPTER_FRACTIONS]


class _Arms:
    """The fine-tuned arms: how each is prepared, trained once and reloaded from its cache."""

    def __init__(self, run: StudyRun, world: MTWorld):
        self.run, self.world = run, world
        self.sizes = adapter_sizes(world.model.config.d_model)
        self.names = ["OPL", "FT"] + [f"adapter r={r}" for r in self.sizes]

    def _prepare(self, name: str):
        model = self.world.fresh_model()
        if name == "OPL":
            return model, output_projection_only(model), LR["OPL"]
        if name == "FT":
            return model, list(model.parameters()), LR["FT"]
        adapters = add_adapters(model, size=int(name.split("=")[1]), dropout=0.1)
        return model, list(adapters.parameters()), LR["adapter"]

    def _path(self, name: str):
        return self.run.cache / "models" / f"{slug(name)}.pt"

    def info(self, name: str) -> dict:
        """Training figures of an arm (trains it the first time)."""
        return self.run.stage(f"train-{slug(name)}", lambda: self.train(name))

    def train(self, name: str) -> dict:
        model, params, lr = self._prepare(name)
        info = self.world.fine_tune(model, params, self.world.split.in_train, lr=lr,
                                    desc=f"fine-tune {name}")
        info["trainable_parameters"] = sum(p.numel() for p in params)
        save_model(model, self._path(name))
        return info

    def model(self, name: str):
        self.info(name)
        model, _, _ = self._prepare(name)
        model.load_state_dict(torch.load(self._path(name), weights_only=True))
        return model.eval()


def _adapter_datastore(run: StudyRun, world: MTWorld, model):
    """The in_train datastore re-encoded by an adapter model (+ its IVF index), cached."""
    path = run.cache / "adapter_datastore"
    if (path / "index.faiss").exists():
        ds = knnfast.Datastore.open(path)
        ds.load_index()
        return ds
    ds = hf.build_datastore(model, world.examples(world.split.in_train), str(path),
                            hidden="ffn", batch_size=64, overwrite=path.exists(), progress=False)
    ds.build_index(ivf_factory(len(ds)), nprobe=IVF_NPROBE, progress=False)
    return ds


def _scores(world: MTWorld, model, decoder=None) -> dict:
    """In-domain and out-of-domain scores of one system, with the in-domain hypotheses."""
    ind = world.evaluate(model, world.split.in_test, decoder)
    out = world.evaluate(model, world.split.general_dev, decoder)
    return {"in_bleu": ind["bleu"], "in_chrf": ind["chrf"], "out_bleu": out["bleu"],
            "out_chrf": out["chrf"], "sentences_per_s": ind["sentences_per_s"],
            "hyps": ind["hyps"]}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_recall(hyps: list[str], refs: list[str], train_counts: Counter,
                edges=WORD_EDGES) -> list[dict]:
    """Per bucket of in-domain training frequency: the share of reference word occurrences
    found in the hypothesis (clipped counts), and the number of occurrences."""
    buckets = frequency_buckets(edges)
    hit, total = [0] * len(buckets), [0] * len(buckets)
    for hyp, ref in zip(hyps, refs):
        have = Counter(_words(hyp))
        for word, n in Counter(_words(ref)).items():
            freq = train_counts.get(word, 0)
            b = next(i for i, b in enumerate(buckets) if b.high is None or freq < b.high)
            hit[b] += min(n, have.get(word, 0))
            total[b] += n
    return [{"bucket": b.label, "words": t, "recall": h / t if t else None}
            for b, h, t in zip(buckets, hit, total)]


@torch.no_grad()
def agreement(world: MTWorld, decoder, models: dict) -> dict:
    """Teacher forced on in_test: the share of target positions where kNN-MT's top-1 token
    equals each model's top-1 token (and each model's gold-token accuracy)."""
    examples = world.examples(world.split.in_test)
    same = Counter()
    gold = Counter()
    n = 0
    runs = {name: hf.teacher_forced(m, examples, batch_size=64) for name, m in models.items()}
    for tf in hf.teacher_forced(world.model, examples, batch_size=64):
        knn_top = decoder(tf.hidden, tf.logits).argmax(-1)
        gold["kNN-MT"] += int((knn_top == tf.targets).sum())
        for name, it in runs.items():
            top = next(it).logits.argmax(-1)
            same[name] += int((top == knn_top).sum())
            gold[name] += int((top == tf.targets).sum())
        n += tf.targets.numel()
    return {"positions": n, "agree_with_knn": {k: v / n for k, v in same.items()},
            "gold_accuracy": {k: v / n for k, v in gold.items()}}


def run(run: StudyRun, split=None) -> Report:
    world = MTWorld(run, split)
    report = Report(STUDY, TITLE, PAPER, run.quick)
    report.setup += world.describe()
    tuned = run.stage("tune", lambda: tune_knn(world.model, world.codec, world.split,
                                               world.datastore, run.log)["best"])
    k, tau, lam = tuned["k"], tuned["temperature"], tuned["lam"]
    knn = knnfast.KNNDecoder(world.datastore, k=k, temperature=tau, lam=lam, exact=False)
    arms = _Arms(run, world)
    report.setup.append(f"kNN-MT tuned on in_dev: k={k}, τ={tau:g}, λ={lam:g}; fine-tuning: "
                        f"{world.scale.finetune_updates} updates per arm on in_train, AdamW, "
                        f"lr {LR}; adapters r = d_model/16, /8, /4 = {arms.sizes} (paper: "
                        f"64/128/256 at d_model 1024)")
    systems = _systems(run, world, arms, knn, tau)
    results = {name: run.stage(f"eval-{slug(name)}", lambda f=factory: _scores(world, *f()))
               for name, factory in systems.items()}
    training = {name: arms.info(name) for name in arms.names}
    _tables(report, world, results, training)
    _word_tables(run, report, world, results, arms, k)
    dual = run.stage("agreement", lambda: agreement(
        world, knn, {"base": world.model, "OPL": arms.model("OPL"), "FT": arms.model("FT")}))
    report.table("kNN-MT's next-token choice against each model's (teacher forced, in_test)",
                 ["model", "agrees with kNN-MT", "gold-token accuracy"],
                 [{"model": m, "agrees with kNN-MT": dual["agree_with_knn"].get(m),
                   "gold-token accuracy": dual["gold_accuracy"][m]}
                  for m in ("kNN-MT", "base", "OPL", "FT")], digits=3,
                 note=f"{dual['positions']:,} target positions.")
    _claims(report, results, dual, arms)
    report.results = {"tuned": tuned, "systems": {n: {k_: v for k_, v in r.items() if k_ != "hyps"}
                                                  for n, r in results.items()},
                      "training": training, "agreement": dual}
    return report


def _systems(run: StudyRun, world: MTWorld, arms: _Arms, knn, tau) -> dict[str, Callable]:
    """name -> () -> (model, decoder or None); built only when a system is evaluated."""
    def adaptive(model, ds, where):
        dec, _ = train_adaptive(model, world.codec, world.split, ds, tau, run.cache / where,
                                run.log)
        return dec

    def knn_adapter():
        model = arms.model(arms.names[-1])
        return model, adaptive(model, _adapter_datastore(run, world, model), "adapter_knn")

    systems = {"base": lambda: (world.model, None), "kNN-MT": lambda: (world.model, knn),
               "adaptive kNN-MT": lambda: (world.model, adaptive(world.model, world.datastore,
                                                                  "base_knn"))}
    for name in arms.names:
        systems[name] = lambda name=name: (arms.model(name), None)
    systems[f"adaptive kNN-MT + {arms.names[-1]}"] = knn_adapter
    return systems


def _tables(report: Report, world: MTWorld, results: dict, training: dict) -> None:
    rows = []
    for name, r in results.items():
        t = training.get(name) or {}
        rows.append({"system": name, "in-domain BLEU": r["in_bleu"], "in-domain chrF": r["in_chrf"],
                     "out-of-domain BLEU": r["out_bleu"], "out-of-domain chrF": r["out_chrf"],
                     "sentences/s": r["sentences_per_s"],
                     "trained parameters": t.get("trainable_parameters")})
    report.table("Translation quality (in-domain: PostgreSQL in_test; out-of-domain: general_dev)",
                 list(rows[0]), rows,
                 note=f"beam {world.scale.beam}, batch {world.scale.batch}; kNN systems keep "
                      "retrieving from the in-domain datastore on out-of-domain text.")


def _word_tables(run: StudyRun, report: Report, world: MTWorld, results: dict, arms: _Arms,
                 k: int) -> None:
    refs = [t for _, t in world.split.in_test]
    counts = Counter(w for _, t in world.split.in_train for w in _words(t))
    recall = {name: word_recall(r["hyps"], refs, counts) for name, r in results.items()}
    labels = [b["bucket"] for b in next(iter(recall.values()))]
    words = {b["bucket"]: b["words"] for b in next(iter(recall.values()))}
    report.table("Recall of reference words in the translations, by the word's frequency in "
                 "in_train's references", ["system"] + labels,
                 [dict({"system": n}, **{b["bucket"]: b["recall"] for b in rs})
                  for n, rs in recall.items()], digits=3,
                 note="reference word occurrences per bucket: "
                      + ", ".join(f"{l}: {words[l]:,}" for l in labels))
    plot_grouped_bars({n: [b["recall"] or 0.0 for b in rs] for n, rs in recall.items()
                       if n in ("base", "kNN-MT", "FT", arms.names[-1],
                                f"adaptive kNN-MT + {arms.names[-1]}")},
                      labels, str(run.out / "meta_optimizer_word_recall.png"),
                      "in-domain training frequency of the word", "recall",
                      "Word recall by frequency bucket")
    report.plot("meta_optimizer_word_recall.png", "Word recall by frequency bucket")
    token_counts = target_counts(world.examples(world.split.in_train))
    retrieval = run.stage("retrieval-by-frequency", lambda: {
        keys: [vars(b) for b in retrieval_by_frequency(
            model, world.examples(world.split.in_test), ds, token_counts, k=k,
            edges=TOKEN_EDGES)]
        for keys, model, ds in _keyed(run, world, arms)})
    base, adapted = retrieval["base"], retrieval["adapter"]
    report.table(f"Gold token among the k={k} retrieved neighbours, by its frequency in the "
                 "datastore (in_test positions)",
                 ["bucket", "positions", "recall@k, base keys", "recall@k, adapter keys",
                  "kNN accuracy, base keys", "kNN accuracy, adapter keys"],
                 [{"bucket": _bucket_label(b), "positions": b["positions"],
                   "recall@k, base keys": b["recall"], "recall@k, adapter keys": a["recall"],
                   "kNN accuracy, base keys": b["knn_accuracy"],
                   "kNN accuracy, adapter keys": a["knn_accuracy"]}
                  for b, a in zip(base, adapted)], digits=3)


def _bucket_label(b: dict) -> str:
    return f"[{b['low']}, {b['high']})" if b["high"] is not None else f">= {b['low']}"


def _keyed(run: StudyRun, world: MTWorld, arms: _Arms):
    model = arms.model(arms.names[-1])
    yield "base", world.model, world.datastore
    yield "adapter", model, _adapter_datastore(run, world, model)


def _claims(report: Report, results: dict, dual: dict, arms: _Arms) -> None:
    r = results
    big = arms.names[-1]
    hybrid = f"adaptive kNN-MT + {big}"
    agree = dual["agree_with_knn"]
    report.claim(PAPER_FINDINGS["dual"], NO_NUMBERS,
                 f"kNN-MT's top-1 agrees with OPL's on {agree['OPL']:.1%} of positions, with "
                 f"FT's on {agree['FT']:.1%}, with the base model's on {agree['base']:.1%}",
                 agree["OPL"] > agree["base"],
                 "holds if OPL fine-tuning moves the base model's top-1 toward kNN-MT's "
                 "(agreement above the base model's); "
                 + ("full fine-tuning agrees even more, so in miniature the agreement is not "
                    "specific to the output projection" if agree["FT"] > agree["OPL"] else
                    "OPL agrees more than full fine-tuning, as the dual view predicts"))
    report.claim(PAPER_FINDINGS["adapter"], NO_NUMBERS,
                 f"in-domain BLEU {r[hybrid]['in_bleu']:.1f} ({hybrid}) vs "
                 f"{r['FT']['in_bleu']:.1f} (FT)",
                 r[hybrid]["in_bleu"] >= r["FT"]["in_bleu"] - 1.0,
                 "comparable = within 1 BLEU or better")
    report.claim(PAPER_FINDINGS["forgetting"], NO_NUMBERS,
                 f"out-of-domain BLEU {r[hybrid]['out_bleu']:.1f} ({hybrid}) vs "
                 f"{r['FT']['out_bleu']:.1f} (FT), base {r['base']['out_bleu']:.1f}",
                 r[hybrid]["out_bleu"] > r["FT"]["out_bleu"],
                 "the kNN systems keep the base weights (adapters aside); FT overwrites them")
    low = lambda name: _low_recall(report, name)  # noqa: E731
    ft, knn_mt, hyb = low("FT"), low("kNN-MT"), low(hybrid)
    report.claim(PAPER_FINDINGS["low_freq"], NO_NUMBERS,
                 f"recall of the rarest seen in-domain words: FT {ft:.3f}, kNN-MT {knn_mt:.3f}, "
                 f"{hybrid} {hyb:.3f}",
                 ft > knn_mt and hyb > knn_mt,
                 "compares the lowest non-empty bucket of seen words ([1, 5) occurrences) in "
                 "the word-recall table")


def _low_recall(report: Report, system: str) -> float:
    table = next(t for t in report.tables if t.title.startswith("Recall of reference words"))
    row = next(r for r in table.rows if r["system"] == system)
    label = next(c for c in table.columns[1:] if not c.startswith("[0,"))
    return row[label] or 0.0
