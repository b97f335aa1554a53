"""English→German kNN-MT demo: a small Marian model trained on general gettext catalogs,
adapted to PostgreSQL messages by retrieval (``make demo``).

    python -m knnfast demo          # same as `make demo`

Corpus → tokenizer → base model (a fixed number of seeded updates, cached in
``.cache/demo/base_model``; ``base_model``) → in-domain datastore + IVF index
(``.cache/demo/datastore``) → λ/τ/k tuning, the adaptive meta-k network and robust kNN-MT's
combiner on in_dev → BLEU/chrF and sentences/s of base, kNN-MT, adaptive and robust kNN-MT
and the reference path on in_test → BLEU against λ (PNG) (``knn_mt``).
Without the catalogs: a kNN-LM demo on the Python language reference (``pydoc_data``;
``knn_lm``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from ..corpus import TextCodec, load_catalogs, split_domains, train_tokenizer
from .base_model import (BaseModelConfig, Log, build_marian, evaluate_bleu, train_base_model,
                         translate)
from .knn_lm import python_doc_chunks, run_knn_lm_fallback, train_small_lm
from .knn_mt import (CACHE_DIR, IVF_NPROBE, KNN_K, LAMBDA_GRID, REPO_ROOT,
                     build_in_domain_datastore, export_hf_tokenizer, ivf_factory,
                     load_cached_model, load_split, pair_examples, run_knn_mt, train_adaptive,
                     translate_knn, tune_knn)

__all__ = ["BaseModelConfig", "build_marian", "train_base_model", "translate", "evaluate_bleu",
           "python_doc_chunks", "train_small_lm", "run_knn_lm_fallback", "CACHE_DIR",
           "IVF_NPROBE", "KNN_K", "LAMBDA_GRID", "REPO_ROOT", "build_in_domain_datastore",
           "export_hf_tokenizer", "ivf_factory", "load_cached_model", "load_split",
           "pair_examples", "run_knn_mt", "train_adaptive", "translate_knn", "tune_knn",
           "render_report", "export_corpora", "write_split", "main"]


def _write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out_dir / "results.md").write_text(render_report(report))


def write_split(split, directory: str | Path) -> list[str]:
    """The split as ``<name>.tsv`` (source<TAB>target) files, plus ``in_test.src`` (sources
    only, for ``knnfast translate --input``), so the CLI's examples have their corpora."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for name, pairs in dataclasses.asdict(split).items():
        path = directory / f"{name}.tsv"
        path.write_text("".join(f"{s}\t{t}\n" for s, t in pairs), encoding="utf-8")
        files.append(str(path))
    path = directory / "in_test.src"
    path.write_text("".join(f"{s}\n" for s, _ in split.in_test), encoding="utf-8")
    return files + [str(path)]


def export_corpora(directory: str | Path, locale_dir: str | Path | None = None) -> list[str]:
    """``knnfast demo --export DIR``: the demo's corpora as files, nothing trained."""
    catalogs = load_catalogs(locale_dir) if locale_dir else load_catalogs()
    return write_split(split_domains(catalogs), directory)


def _training(cache_dir: Path, since: float) -> dict:
    """Updates, throughput and wall time of the base model's training (train_meta.json);
    a train_meta.json older than ``since`` (this run's training call) was reused."""
    path = cache_dir / "base_model" / "train_meta.json"
    meta, reused = json.loads(path.read_text()), path.stat().st_mtime < since
    return {"updates": meta["steps"], "train_seconds": meta["train_seconds"],
            "target_tokens": meta["target_tokens"],
            "target_tokens_per_s": meta["target_tokens"] / max(meta["train_seconds"], 1e-9),
            "reused_from_cache": reused}


def render_report(report: dict) -> str:
    """Markdown summary of a demo run (what results.md holds)."""
    if report.get("mode") == "knn-lm fallback":
        r = report["results"]["fused"]
        return (f"# knnfast demo (kNN-LM fallback)\n\n{report['why']}\n\n"
                f"| system | perplexity |\n|---|---|\n| base LM | {r['base_ppl']:.2f} |\n"
                f"| kNN-LM | {r['knn_ppl']:.2f} |\n| oracle | {r['oracle_ppl']:.2f} |\n")
    lines = ["# knnfast demo: English→German kNN-MT on PostgreSQL messages", "",
             f"- date {report['date']}, machine: {report['machine']}",
             f"- split: {report['split']}",
             f"- base model: {report['model']}",
             *_training_line(report.get("training")),
             f"- datastore: {report['knn']['datastore']['entries']:,} entries "
             f"(in_train target tokens), D={report['knn']['datastore']['dim']}, "
             f"index {report['knn']['datastore']['index']} nprobe {report['knn']['datastore']['nprobe']}"
             + (f", searched as {report['knn']['datastore']['search']}"
                if report['knn']['datastore'].get("search") else ""),
             f"- tuned on in_dev: {report['knn']['tuned']['best']}", "",
             "| system (in_test, beam 4, batch 16) | BLEU | chrF | sentences/s |", "|---|---:|---:|---:|"]
    for name, r in report["knn"]["systems"].items():
        lines.append(f"| {name} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['sentences_per_s']:.1f} |")
    by_system = report["knn"].get("bleu_vs_lambda_subset", {}).get("bleu_by_system", {})
    lines += ["", f"BLEU against λ ({_subset(report)}): "
              + ", ".join(f"λ={a:g}: {b:.1f}" for a, b in report["knn"]["bleu_vs_lambda"])
              + "".join(f"; {name} on the same sentences: {b:.1f}" for name, b in by_system.items()
                        if name == "adaptive kNN-MT"),
              "", "![BLEU vs λ](bleu_vs_lambda.png)", "", "## Examples", ""]
    for e in report["knn"]["examples"]:
        lines += [f"- source: {e['source']}", f"  - reference: {e['reference']}",
                  f"  - base: {e['base']}", f"  - kNN-MT: {e['knn']}"]
    return "\n".join(lines) + "\n"


def _training_line(t: dict | None) -> list[str]:
    if not t:
        return []
    how = "reused from the cache" if t["reused_from_cache"] else "trained in this run"
    return [f"- base-model training ({how}): {t['updates']:,} updates, "
            f"{t['target_tokens_per_s']:,.0f} target tokens/s, {t['train_seconds']:.0f} s wall time"]


def _subset(report: dict) -> str:
    return report["knn"].get("bleu_vs_lambda_subset", {}).get("which", "first 200 in_test sentences")


def _machine() -> str:
    import platform
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main(cache_dir: str | Path | None = None, updates: int | None = None,
         out_dir: str | Path = "demo-results", log: Log = print,
         locale_dir: str | Path | None = None, retrain: bool = False) -> dict:
    """The whole demo; returns the report (also written to out_dir). Without the German
    gettext catalogs (``locale_dir``), it says what to install and runs the kNN-LM
    fallback on the Python language reference instead. ``retrain``: train the base model
    even when the cache holds one with the same settings. The corpora are written to
    ``cache_dir/corpus`` (``write_split``) for the CLI's examples."""
    cache_dir = Path(cache_dir or CACHE_DIR)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        catalogs = load_catalogs(locale_dir) if locale_dir else load_catalogs()
    except FileNotFoundError as e:
        log(f"gettext catalogs not available: {e}")
        log("falling back to a kNN-LM demo on the Python language reference shipped with Python")
        report = run_knn_lm_fallback(cache_dir, out_dir, log)
        report["why"] = str(e)
        _write_report(out_dir, report)
        return report
    split = split_domains(catalogs)
    log(f"corpus: {split.sizes()}")
    write_split(split, cache_dir / "corpus")
    codec = TextCodec(train_tokenizer(t for pair in split.general_train for t in pair))
    t_train = time.time()
    model = train_base_model(split, codec, cache_dir, retrain=retrain, log=log,
                             config=dataclasses.replace(BaseModelConfig(),
                                                        updates=updates or BaseModelConfig.updates))
    export_hf_tokenizer(codec, cache_dir / "base_model")
    n_params = sum(p.numel() for p in model.parameters())
    log("in-domain kNN-MT (in_test = held-out PostgreSQL messages):")
    knn = run_knn_mt(model, codec, split, cache_dir, out_dir, log)
    c = model.config
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": _machine(),
        "split": split.sizes(),
        "model": (f"Marian d_model={c.d_model}, {c.encoder_layers}+{c.decoder_layers} layers, "
                  f"ffn {c.encoder_ffn_dim}, vocab {c.vocab_size}, {n_params / 1e6:.1f}M parameters, "
                  f"trained on general_train only"),
        "training": _training(cache_dir, t_train),
        "knn": knn, "seconds": time.perf_counter() - t_all,
    }
    _write_report(out_dir, report)
    log(f"demo done in {report['seconds']:.0f} s; results in {out_dir}/ (results.md, results.json, "
        f"bleu_vs_lambda.png); model + datastore cached in {cache_dir}/")
    return report

