"""Speed-quality study of the kNN decoding speed options (issue 17, deliverable 4).

    python benchmarks/bench_decode_speed.py --out demo-results/decode-speed   # full study
    python benchmarks/bench_decode_speed.py --quick --out /tmp/ds-quick       # a smoke run

Arms, each timed end to end in one process, ratios against the bare model of the same run:
bare, kNN (full retrieval), +skip (confidence threshold), +gate (He et al.'s learned gate,
fitted on the dev set), +prune (greedy merge), +pca (keys reduced to ``--pca-dim``), and
combined (pruned + reduced store, gate). Derived stores are built once under ``--work``
(resumable) and get the source's FAISS index factory when it has one.

1. kNN-MT: the demo's model and in-domain datastore (``make demo`` first), beam-4
   translation of in_test: sentences/s and BLEU / chrF.
2. kNN-LM: the demo's small GPT-2 shape trained on the Python language reference (the
   demo's fallback corpus; cached under ``--work``), test topics cut into 96-token
   windows, teacher forced: tokens/s and perplexity (``--study lm``).

Writes ``<out>/<study>.md`` (table), ``<out>/<study>.json`` and ``<out>/<study>.png`` (speed
ratio against quality, the Pareto front marked). ``tests/test_bench_decode_speed.py`` runs
the same code on tiny models built from configs; no speed is asserted anywhere.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import knnfast  # noqa: E402
from knnfast import KNNDecoder, RetrievalSkip  # noqa: E402
from knnfast.methods.gate import RetrievalGate, collect_gate_features, fit_gate  # noqa: E402

Arm = Tuple[str, Optional[KNNDecoder]]


def derived_store(ds, path: Path, build: Callable, progress: bool, search: str = "exact",
                  **index_args):
    """A pruned / reduced store at ``path`` (reused when finished), searched like ``ds``:
    keys in RAM for exact search, or (``search="index"`` / ``"lists"``) indexed like ``ds``."""
    out = knnfast.Datastore.open(path) if (path / "meta.json").exists() else build(path)
    return searched_as(out, search, like=ds, progress=progress, **index_args)


def searched_as(store, search: str, like=None, progress: bool = False,
                factory: str = "IVF1024,Flat", nprobe: Optional[int] = None):
    """``store`` ready for the arms: "exact" loads the keys into RAM (the fused exact search,
    no memmap streaming); "index" loads its saved FAISS index, or builds one with the
    factory of ``like``'s; "lists" does the same and then searches the index's lists with
    the fused ``knn_search_lists`` (keys in RAM). A store without an index of its own or
    from ``like`` gets ``factory`` (saved next to it); ``nprobe``: the lists visited per
    query (None: the index's own, 8 for a new one)."""
    if search == "exact":
        return store.to("cpu") if store.is_memmapped else store
    lists = search.startswith("lists")
    if lists and store.is_memmapped:
        store = store.to("cpu")
    if store.has_saved_index():
        store.load_index("cpu" if lists else "auto")
    elif like is not None and like.has_saved_index() and not store.has_index():
        info = json.loads((Path(like.path) / "index.json").read_text())
        store.build_index(info.get("factory"), nprobe=info.get("nprobe", 32), progress=progress)
    elif not store.has_index():
        store.build_index(factory, nprobe=nprobe or 8, progress=progress)
    pack = search[len("lists-"):] if search.startswith("lists-") else None
    return store.use_lists(nprobe, pack=pack) if lists else store


def make_arms(ds, work: Path, *, k: int, temperature: float, lam: float, confidence: float,
              gate_threshold: float, prune_k: int, pca_dim: int, fit_gate_on: Callable,
              progress: bool = False, search: str = "exact", factory: str = "IVF1024,Flat",
              nprobe: Optional[int] = None) -> List[Arm]:
    """The study's (name, decoder) arms; ``fit_gate_on(decoder) -> fitted RetrievalGate``.
    Every arm searches the same way (``search``: "exact" fused search over keys in RAM, or
    "index": FAISS; "lists": the index's lists through knn_search_lists). A store with no
    index of its own or from its source gets ``factory``; ``nprobe`` (None: each index's
    own) is the lists visited per query."""
    work.mkdir(parents=True, exist_ok=True)
    source = ds
    pruned = derived_store(source, work / "pruned",
                           lambda p: source.prune(p, k=prune_k, progress=progress), progress,
                           search, factory=factory, nprobe=nprobe)
    reduced = derived_store(source, work / f"pca{pca_dim}",
                            lambda p: source.reduce_dim(p, pca_dim, progress=progress),
                            progress, search, factory=factory, nprobe=nprobe)
    both = derived_store(source, work / f"pruned-pca{pca_dim}",
                         lambda p: pruned.reduce_dim(p, pca_dim, progress=progress), progress,
                         search, factory=factory, nprobe=nprobe)
    ds = searched_as(source, search, factory=factory, nprobe=nprobe)

    def dec(store, skip=None, exact=None):
        return KNNDecoder(store, k=k, temperature=temperature, lam=lam, skip=skip, exact=exact)

    gate_full, gate_both = fit_gate_on(dec(ds)), fit_gate_on(dec(both))
    # with an index, full kNN against exact search too (the "today's exact path")
    in_ram = ds.to("cpu") if ds.is_memmapped else ds  # ("index" leaves the keys on disk)
    exact_arm = [] if search == "exact" else [("kNN-exact", dec(in_ram, exact=True))]
    return [("bare", None), *exact_arm, ("kNN", dec(ds)),
            ("+skip", dec(ds, RetrievalSkip(confidence=confidence))),
            ("+gate", dec(ds, RetrievalSkip(gate=gate_full, gate_threshold=gate_threshold))),
            ("+prune", dec(pruned)), (f"+pca{pca_dim}", dec(reduced)),
            ("combined", dec(both, RetrievalSkip(gate=gate_both, gate_threshold=gate_threshold)))]


def gate_fitter(model, dev_examples, *, hidden="ffn", updates: int = 2000) -> Callable:
    """``fit_gate_on(decoder)``: a gate fitted on one retrieval pass over ``dev_examples``."""
    def fit(decoder: KNNDecoder) -> RetrievalGate:
        feats = collect_gate_features(model, dev_examples, decoder, hidden=hidden,
                                      progress=False)
        gate = RetrievalGate(feats.hidden.shape[1])
        fit_gate(gate, feats, max_updates=updates, progress=False)
        return gate
    return fit


def run_arms(arms: Sequence[Arm], run_one: Callable, speed_unit: str,
             repeats: int = 1) -> List[dict]:
    """``run_one(decoder) -> (quality dict, work units, seconds)`` per arm, ``repeats`` times
    (the fastest counts: the first run of an arm pays one-off costs such as knn_search's plan
    calibration); adds the speed, its ratio to the bare arm (the first) and the skipped
    fraction. The repeats go round the arms in turn, so that a machine whose speed drifts
    during the study (a shared VM) slows every arm alike instead of the arms timed last."""
    runs = [[] for _ in arms]
    for _ in range(repeats):
        for i, (_, dec) in enumerate(arms):
            runs[i].append(run_one(dec))
    rows = []
    for (name, dec), arm_runs in zip(arms, runs):
        quality, units, seconds = min(arm_runs, key=lambda r: r[2])
        rows.append(dict(system=name, seconds=seconds, **quality,
                         **{speed_unit: units / seconds if seconds > 0 else float("inf")},
                         skipped=dec.skip_stats.fraction_rows if dec is not None else 1.0,
                         entries=len(dec.datastore) if dec is not None else 0,
                         dim=dec.datastore.dim if dec is not None else 0))
    for r in rows:
        r["speed_ratio"] = r[speed_unit] / rows[0][speed_unit]
    return rows


def pareto(rows: Sequence[dict], quality: str, higher_better: bool) -> List[str]:
    """Systems no other system beats on both speed and quality."""
    sign = 1 if higher_better else -1

    def beats(a, b):
        return (a["speed_ratio"] >= b["speed_ratio"] and sign * a[quality] >= sign * b[quality]
                and (a["speed_ratio"] > b["speed_ratio"] or sign * a[quality] > sign * b[quality]))
    return [r["system"] for r in rows if not any(beats(o, r) for o in rows)]


def write_outputs(rows: Sequence[dict], out: Path, study: str, quality: str,
                  higher_better: bool, title: str) -> dict:
    """``<study>.md`` / ``.json`` / ``.png`` under ``out``; returns the report."""
    out.mkdir(parents=True, exist_ok=True)
    front = pareto(rows, quality, higher_better)
    cols = [c for c in rows[0] if c not in ("system",)]
    lines = [f"# {title}", "", f"Machine: {machine()}; {time.strftime('%Y-%m-%d')}.", "",
             "| system | " + " | ".join(cols) + " | Pareto |",
             "|---" * (len(cols) + 2) + "|"]
    for r in rows:
        cells = [f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        lines.append(f"| {r['system']} | " + " | ".join(cells) +
                     f" | {'✓' if r['system'] in front else ''} |")
    report = {"title": title, "machine": machine(), "rows": list(rows), "pareto": front}
    (out / f"{study}.md").write_text("\n".join(lines) + "\n")
    (out / f"{study}.json").write_text(json.dumps(report, indent=1))
    plot(rows, front, quality, out / f"{study}.png", title)
    return report


def plot(rows, front, quality: str, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in rows:
        on = r["system"] in front
        ax.scatter(r["speed_ratio"], r[quality], marker="o" if on else "x",
                   color="C0" if on else "C7")
        ax.annotate(r["system"], (r["speed_ratio"], r[quality]), fontsize=8,
                    xytext=(3, 3), textcoords="offset points")
    pts = sorted((r["speed_ratio"], r[quality]) for r in rows if r["system"] in front)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="C0", alpha=0.5)
    ax.set_xlabel("speed / bare model's (same run)")
    ax.set_ylabel(quality)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def machine() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


# --------------------------------------------------------------------------- the studies


def lm_runner(model, examples, *, hidden="ffn", batch_size: int = 8) -> Callable:
    """``run_one`` for kNN-LM: (perplexity, tokens, seconds); the bare arm times the teacher-
    forced forward passes alone."""
    from knnfast.integrations import hf

    def run(dec):
        if dec is None:
            start, tokens, nll = time.perf_counter(), 0, 0.0
            with torch.no_grad():
                for tf in hf.teacher_forced(model, examples, hidden=hidden, batch_size=batch_size):
                    nll -= float(hf.base_gold_logprob(tf.logits, tf.targets).double().sum())
                    tokens += tf.targets.numel()
            secs = time.perf_counter() - start
            return {"ppl": float(torch.tensor(nll / max(tokens, 1)).exp())}, tokens, secs
        res = hf.evaluate_lm(model, examples, dec, hidden=hidden, batch_size=batch_size,
                             progress=False)
        return {"ppl": res.knn_ppl}, res.tokens, res.seconds
    return run


def mt_runner(translate: Callable, score: Callable, n_sentences: int) -> Callable:
    """``run_one`` for kNN-MT: ``translate(decoder) -> (hyps, seconds)``, ``score(hyps) ->
    {"bleu", "chrf"}``."""
    def run(dec):
        hyps, secs = translate(dec)
        return score(hyps), n_sentences, secs
    return run


def demo_mt(args) -> dict:
    from knnfast.app import demo
    cache = Path(args.cache)
    model, codec = demo.load_cached_model(cache)
    split = demo.load_split(cache)
    ds = knnfast.Datastore.open(cache / "datastore")
    tests = split.in_test[:args.sentences] if args.sentences else split.in_test
    dev = demo.pair_examples(codec, split.in_dev, model.config.max_position_embeddings)
    arms = make_arms(ds, Path(args.work) / "mt", k=args.k, temperature=args.temperature,
                     lam=args.lam, confidence=args.confidence,
                     gate_threshold=args.gate_threshold, prune_k=args.prune_k,
                     pca_dim=args.pca_dim, fit_gate_on=gate_fitter(model, dev),
                     search=args.search, factory=args.lists_factory, nprobe=args.nprobe)
    sources, refs = [s for s, _ in tests], [t for _, t in tests]
    run = mt_runner(lambda dec: demo.translate_knn(model, codec, sources, dec),
                    lambda hyps: {**demo.evaluate_bleu(hyps, refs),
                                  "out_tokens": sum(len(codec.encode(h)) for h in hyps)},
                    len(sources))
    rows = run_arms(arms, run, "sentences_per_s", repeats=args.repeats)
    # sentences/s is the measure, but the bare model's degenerate repetitions make its
    # outputs longer: output tokens/s, relative to the bare arm's, is reported beside it
    for r in rows:
        r["token_speed_ratio"] = (r["out_tokens"] / r["seconds"]) / (
            rows[0]["out_tokens"] / rows[0]["seconds"])
    return write_outputs(rows, Path(args.out), "decode_speed_mt", "bleu", True,
                         f"kNN-MT speed options, demo in_test ({len(sources)} sentences)")


def demo_lm(args) -> dict:
    """kNN-LM arm: the demo's small GPT-2 shape on the Python language reference (trained
    once, cached under ``--work``), token streams cut into windows of ``LM_WINDOW``."""
    from knnfast.app.corpus import TextCodec, train_tokenizer
    from knnfast.app.demo import knn_lm
    from knnfast.integrations import hf
    work = Path(args.work) / "lm"
    train, dev, test = knn_lm.python_doc_chunks()
    codec = TextCodec(train_tokenizer(train, vocab_size=4000))

    def windows(texts, limit=None):
        ids = [i for t in texts for i in codec.encode(t)][:limit]
        return hf.sliding_windows(ids, LM_WINDOW, LM_WINDOW - 1)[0]   # plain chunks
    tr, dv = windows(train), windows(dev)
    te = windows(test, args.lm_tokens or None)
    model = knn_lm.train_small_lm(tr, codec.vocab_size, work)
    path = work / "datastore"
    ds = knnfast.Datastore.open(path) if (path / "meta.json").exists() else \
        hf.build_datastore(model, tr, str(path), batch_size=32, resume=True, progress=False)
    arms = make_arms(ds, work, k=args.lm_k, temperature=args.lm_temperature,
                     lam=args.lm_lam, confidence=args.confidence,
                     gate_threshold=args.gate_threshold, prune_k=args.prune_k,
                     pca_dim=min(args.pca_dim, ds.dim // 2), fit_gate_on=gate_fitter(model, dv),
                     search=args.search, factory=args.lists_factory, nprobe=args.nprobe)
    rows = run_arms(arms, lm_runner(model, te), "tokens_per_s", repeats=args.repeats)
    return write_outputs(rows, Path(args.out), "decode_speed_lm", "ppl", False,
                         f"kNN-LM speed options, Python reference test topics "
                         f"({rows[0]['seconds']:.0f} s bare)")


LM_WINDOW = 96


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(REPO / ".cache" / "demo"))
    p.add_argument("--work", default=str(REPO / ".cache" / "decode-speed"))
    p.add_argument("--out", default=str(REPO / "demo-results" / "decode-speed"))
    p.add_argument("--sentences", type=int, default=0, help="first N of in_test (0: all)")
    p.add_argument("--quick", action="store_true", help="--sentences 32")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--temperature", type=float, default=100.0)
    p.add_argument("--lam", type=float, default=0.7)
    p.add_argument("--confidence", type=float, default=0.9)
    p.add_argument("--gate-threshold", type=float, default=0.3)
    p.add_argument("--prune-k", type=int, default=8)
    p.add_argument("--pca-dim", type=int, default=64)
    p.add_argument("--study", choices=("mt", "lm", "both"), default="both")
    p.add_argument("--search", choices=("exact", "index", "lists", "lists-bf16", "lists-int8"),
                   default="exact",
                   help="every arm: fused exact search over keys in RAM, the FAISS index, or "
                        "the index's lists searched by knn_search_lists (Datastore.use_lists; "
                        "lists-bf16 / lists-int8: with that pack, plan bf16 / int8)")
    p.add_argument("--lists-factory", default="IVF1024,Flat",
                   help="--search index/lists: the index of a store that has none (the demo's "
                        "datastore has its own)")
    p.add_argument("--nprobe", type=int, default=None,
                   help="--search lists: lists visited per query (default: each index's own; "
                        "8 for an index built with --lists-factory)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per arm; the fastest is reported")
    p.add_argument("--lm-k", type=int, default=16)
    p.add_argument("--lm-temperature", type=float, default=10.0)
    p.add_argument("--lm-lam", type=float, default=0.25)
    p.add_argument("--lm-tokens", type=int, default=0, help="first N test tokens (0: all)")
    args = p.parse_args(argv)
    if args.quick:
        args.sentences = args.sentences or 32
        args.lm_tokens = args.lm_tokens or 4000
    studies = {"mt": [demo_mt], "lm": [demo_lm], "both": [demo_mt, demo_lm]}[args.study]
    for study in studies:
        report = study(args)
        print(report["title"], "- Pareto:", ", ".join(report["pareto"]))
    print(f"tables and plots in {args.out}")


if __name__ == "__main__":
    main()
