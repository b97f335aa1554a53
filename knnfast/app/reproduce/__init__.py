"""``knnfast reproduce <study>``: the four source papers' experiments in miniature, one
command each, on text this machine ships (gettext catalogs, Python's documentation).

Each study module has ``STUDY`` (its command name), ``TITLE``, ``PAPER`` (citation), the
paper's own numbers (with the table they come from) and ``run(run: StudyRun, **kw) ->
Report``. ``reproduce`` runs one, writes ``<out>/<study>.md`` + ``.json`` + PNG plots and
returns the JSON. Stages are cached (``runner.StudyRun``): a killed run resumes.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

import knnfast
from knnfast.storage.building import acquire_build_lock

from .report import DOES_NOT_HOLD, HOLDS, UNTESTABLE, VERDICTS, Claim, Report, Table, verdict
from .runner import StudyRun, canonical_settings, machine

# command name -> module (imported only when run: each pulls in transformers & co.)
STUDIES = {"meta-optimizer": "meta_optimizer", "knn-kd": "knn_kd", "ink": "ink",
           "knnlm-why": "knnlm_why"}

__all__ = ["STUDIES", "reproduce", "write_index", "StudyRun", "canonical_settings", "Report",
           "Claim", "Table", "verdict", "HOLDS",
           "DOES_NOT_HOLD", "UNTESTABLE", "VERDICTS", "machine"]


def study_module(study: str):
    """The module of a study, by its command name."""
    if study not in STUDIES:
        raise ValueError(f"unknown study {study!r}; choose one of {', '.join(STUDIES)}")
    return importlib.import_module(f"{__name__}.{STUDIES[study]}")


def reproduce(study: str, *, quick: bool = False, out_dir: str | Path = "reproduce-results",
              cache_dir: str | Path = ".cache/reproduce", log: Callable[[str], None] = print,
              **kwargs) -> dict:
    """Run one study (``quick``: the tiny scale of the tests) and write its report to
    ``out_dir``; returns the report's JSON. ``kwargs`` go to the study's ``run``."""
    module = study_module(study)
    run = StudyRun(study, cache_dir, out_dir, quick=quick, log=log)
    # one run per study cache: a second one fails at once instead of mixing their stages
    lock = acquire_build_lock(run.cache, f"knnfast reproduce {study}")
    try:
        run.use_settings({**module.cache_settings(quick), "knnfast": knnfast.__version__})
        report = module.run(run, **kwargs)
    finally:
        os.close(lock)
    m = machine()
    md, js = report.write(run.out, m, run.seconds(), run.stage_seconds)
    log(f"[{study}] report: {md} and {js.name} ({run.seconds() / 60:.1f} min of stages)")
    write_index(run.out)
    return report.to_json(m, run.seconds(), run.stage_seconds)


def write_index(out_dir: str | Path) -> Path:
    """``<out>/index.md``: every study report found in ``out_dir`` (its JSON) with its run
    time and each claim's verdict, generated, never hand-edited."""
    import json
    out = Path(out_dir)
    lines = ["# knnfast reproduce: the papers' claims in miniature", "",
             "Generated from the reports in this directory (`knnfast reproduce <study>`).", ""]
    for study in STUDIES:
        path = out / f"{study}.json"
        if not path.exists():
            lines += [f"## {study}", "", "not run yet", ""]
            continue
        r = json.loads(path.read_text())
        scale = "quick scale (structure only)" if r["quick"] else "full scale"
        lines += [f"## [{r['title']}]({study}.md)", "",
                  f"{r['paper']}. {scale}, {r['date']}, {r['seconds'] / 60:.1f} min from a "
                  f"cold cache on {r['machine']}.", "", "| claim | verdict |", "|---|---|"]
        lines += [f"| {c['claim'].replace('|', '/')} | {c['verdict']} |" for c in r["claims"]]
        lines.append("")
    path = out / "index.md"
    path.write_text("\n".join(lines))
    return path
