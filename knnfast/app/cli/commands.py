"""The commands: each reads its options (``args``), checks its inputs before any work and
prints strict JSON; ``STOPPED`` says, per command, where a Ctrl-C left the work."""
from __future__ import annotations

import os
import re
import shlex
import sys
import time

from ...defaults import KNN_LM, KNN_MT
from ...storage.format import KEY_DTYPES
from . import launch
from .errors import DataError, UsageError, from_library, warn
from .loading import (check_readable, check_writable, dumps, load_model, open_datastore, print_json,
                      read_corpus, read_lines, resolve_knn, tokenizer_fingerprint, write_json)
from .pairing import check_index, check_pairing, fit_k, make_decoder


def command_line(argv, drop=(), add=()) -> str:
    """The command as a user would retype it, without ``drop`` and with ``add`` flags."""
    words = [w for w in argv if w not in drop]
    return shlex.join(["knnfast", *words, *(a for a in add if a not in words)])


# --------------------------------------------------------------------------- build-datastore

def cmd_build_datastore(args) -> None:
    """One datastore; under torchrun a sharded one, a shard per rank (rank 0 commits the
    manifest and prints the summary)."""
    with launch.process_group(args.dist_timeout) as (rank, world):
        model, tok, examples = launch.on_every_rank(lambda: _build_inputs(args, world > 1))
        t0 = time.perf_counter()
        ds = _build(args, model, examples, world > 1, progress=rank == 0)
        stamp = dict(corpus=os.path.abspath(args.corpus), tokenizer_sha256=tokenizer_fingerprint(tok))
        # the manifest (or meta.json) has one writer; every rank learns whether it failed
        launch.on_every_rank(lambda: rank == 0 and ds.update_extra(**stamp))
        summary = {"datastore": ds.path, "entries": len(ds), "dim": ds.dim, "hidden": args.hidden,
                   "examples": len(examples), "seconds": round(time.perf_counter() - t0, 2)}
        if rank == 0:
            print_json(dict(summary, shards=len(ds.meta["shards"]), ranks=world)
                       if world > 1 else summary)


def _build_inputs(args, sharded: bool):
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    _check_build_target(args, sharded)
    args.total = len(examples)
    return model, tok, examples


def _build(args, model, examples, sharded: bool, progress: bool):
    from ...integrations import hf
    from ...storage import DatastoreError
    try:
        # sharded: build_sharded exchanges failures itself, so every rank raises here
        return hf.build_datastore(model, examples, args.out, hidden=args.hidden,
                                  batch_size=args.batch_size,
                                  key_dtype=KEY_DTYPES[args.key_dtype], metric=args.metric,
                                  model_id=os.path.abspath(args.model), resume=args.resume,
                                  overwrite=args.overwrite, progress=progress, sharded=sharded)
    except (DatastoreError, FileExistsError) as e:
        raise from_library(e, f"--out {args.out!r}: ") from None


def _check_build_target(args, sharded: bool) -> None:
    """An existing datastore or interrupted build at --out, said in the options' words."""
    from ...storage.sharded import unfinished_sharded
    if args.overwrite:
        return
    if sharded and unfinished_sharded(args.out):
        if args.resume:
            return
        raise DataError(f"an interrupted sharded build of {args.out!r} exists (shards, no "
                        f"manifest.json)", "pass --resume to continue it or --overwrite to "
                        "start over")
    if os.path.exists(args.out):
        raise DataError(f"--out {args.out!r} already exists", "pass --overwrite to replace it")
    building = args.out + ".building"
    if not sharded and os.path.exists(building) and not args.resume:
        raise DataError(f"an interrupted build of {args.out!r} exists ({building})",
                        "pass --resume to continue it or --overwrite to start over")


def stopped_build_datastore(args, argv) -> str:
    from ...storage import Datastore
    resume = command_line(argv, drop=('--overwrite',), add=('--resume',))
    if launch.torchrun_world() > 1:
        return (f"every rank's committed chunks are kept under {args.out}; resume: the same "
                f"torchrun command running {resume}")
    try:
        done = Datastore.building_cursor(args.out)
    except (OSError, ValueError):
        done = None
    where = (f"after {done or 0} of {getattr(args, 'total', '?')} examples were committed to "
             f"{args.out}.building")
    return f"{where}; resume: {resume}"


# --------------------------------------------------------------------------- build-index

def cmd_build_index(args) -> None:
    import json
    ds = open_datastore(args.datastore, "datastore")
    factory = args.factory or None
    if factory:
        _check_factory(factory, ds, args.train_size)
    if args.metric and args.metric != ds.metric:
        warn(f"--metric {args.metric!r} differs from the datastore's {ds.metric!r} (meta.json "
             f"field \"metric\"); searches through this index score with {args.metric!r}")
    t0 = time.perf_counter()
    try:
        ds.build_index(factory, metric=args.metric, train_size=args.train_size,
                       device=args.device, nprobe=args.nprobe)
    except ValueError as e:
        raise from_library(e, "--factory: ") from None
    with open(os.path.join(ds.path, "index.json")) as f:
        info = json.load(f)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    print_json(info)


def _check_factory(factory: str, ds, train_size: int) -> None:
    import faiss
    try:
        faiss.index_factory(ds.dim, factory)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1].rsplit(": ", 1)[-1]  # faiss's own words
        raise UsageError(f"--factory {factory!r} is not a FAISS index_factory string for "
                         f"{ds.dim}-dim keys ({reason})",
                         "e.g. --factory Flat, IVF1024,Flat or IVF4096,PQ64 (PQ m must divide "
                         "D)") from None
    ivf = re.match(r"IVF(\d+)", factory)
    if ivf and int(ivf.group(1)) > min(len(ds), train_size):
        lists, n = int(ivf.group(1)), min(len(ds), train_size)
        raise DataError(f"--factory {factory} has {lists} lists but only {n} keys to train "
                        f"them ({len(ds)} entries, --train-size {train_size})",
                        f"use at most {n} lists, e.g. --factory IVF{max(1, int(n ** 0.5))},Flat, "
                        f"or Flat")


# --------------------------------------------------------------------------- verify

def cmd_verify(args) -> None:
    """Print the store's verify report as JSON; a damaged store is a data error (exit 3)
    naming its first problem, a store without checksums a warning."""
    from ...storage import verify
    path = args.path
    if not os.path.lexists(path):
        raise DataError(f"{path!r} does not exist", "give a datastore, sharded datastore or "
                        "teacher store directory")
    report = _teacher_verify(path) or verify(path)
    print_json(report.as_dict())
    for note in report.notes:
        warn(note)
    problems = report.problems
    if problems:
        count = f"{len(problems)} problems, the first: " if len(problems) > 1 else ""
        raise from_library(ValueError(problems[0]), f"{report.kind} {path}: {count}")


def _teacher_verify(path: str):
    """The report of a kNN-KD teacher store at ``path`` (None when it is not one)."""
    from ...methods.kd import TeacherStore
    return TeacherStore.verify(path) if TeacherStore.is_store(path) else None


# --------------------------------------------------------------------------- eval-ppl

def knn_settings(args, hidden: str, k: int) -> dict:
    """What a result was computed with (echoed in every result)."""
    return {"k": k, "temperature": args.temperature, "lam": args.lam, "hidden": hidden,
            "index": bool(getattr(args, "index", False)),
            "lists": bool(getattr(args, "lists", False)),
            "backend": getattr(args, "backend", "fused"),
            "skip_confidence": getattr(args, "skip_confidence", None),
            "gate": getattr(args, "gate", None),
            "gate_threshold": getattr(args, "gate_threshold", None)}


def skipped_rows(decoder):
    """Share of decoding rows that skipped retrieval (None without a skip rule)."""
    if decoder is None or getattr(decoder, "skip", None) is None:
        return None
    return round(decoder.skip_stats.fraction_rows, 4)


def cmd_eval_ppl(args) -> None:
    from ...integrations import hf
    resolve_knn(args, KNN_LM)
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    ds = open_datastore(args.datastore)
    hidden = check_pairing(args, model, tok, ds)
    decoder = make_decoder(args, ds)
    res = hf.evaluate_lm(model, examples, decoder, hidden=hidden, batch_size=args.batch_size)
    print_json({"settings": knn_settings(args, hidden, decoder.k),
                "tokens": res.tokens, "base_ppl": res.base_ppl, "knn_ppl": res.knn_ppl,
                "oracle_ppl": res.oracle_ppl, "best_of_ppl": res.best_of_ppl,
                "tokens_per_s": res.tokens_per_s, "skipped_rows": skipped_rows(decoder)})


# --------------------------------------------------------------------------- translate

def cmd_translate(args) -> None:
    resolve_knn(args, KNN_MT)
    check_writable("--output", args.output)
    if args.input != "-":
        check_readable("--input", args.input, "a file of source lines, or '-' for stdin")
    model, tok = load_model(args.model)
    decoder, hidden, settings = None, "ffn", None
    if args.datastore:
        ds = open_datastore(args.datastore)
        hidden = check_pairing(args, model, tok, ds)
        decoder = make_decoder(args, ds)
        settings = knn_settings(args, hidden, getattr(decoder, "k", args.k))
    elif args.adaptive or args.robust or args.skip_confidence is not None or args.gate:
        raise UsageError("--adaptive / --robust / --skip-confidence / --gate need a datastore",
                         "pass --datastore DIR")
    lines = read_lines("--input", args.input, "a file of source lines, or '-' for stdin")
    t0 = time.perf_counter()
    _translate_lines(args, model, tok, decoder, hidden, lines)
    secs = time.perf_counter() - t0
    print(dumps({"settings": settings, "sentences": len(lines), "seconds": round(secs, 3),
                 "sentences_per_s": round(len(lines) / max(secs, 1e-9), 2),
                 "skipped_rows": skipped_rows(decoder)}, indent=None), file=sys.stderr)


def _translate_lines(args, model, tok, decoder, hidden, lines) -> None:
    from tqdm.auto import tqdm
    from ...integrations import hf
    limit = min(args.max_new_tokens, getattr(model.config, "max_position_embeddings", 10**9))
    show = {"on": True, "off": False}.get(args.progress, sys.stderr.isatty())
    bar = tqdm(total=len(lines), unit="sent", desc="translate", disable=not show, file=sys.stderr)
    out = open(args.output, "w", encoding="utf-8") if args.output != "-" else sys.stdout
    args.done = 0
    try:
        for s in range(0, len(lines), args.batch_size):
            enc = tok(lines[s:s + args.batch_size], return_tensors="pt", padding=True)
            gen = hf.generate(model, decoder, **enc, num_beams=args.beams,
                              max_new_tokens=limit, hidden=hidden)
            for text in tok.batch_decode(gen, skip_special_tokens=True):
                out.write(text + "\n")
            batch = enc["input_ids"].shape[0]
            args.done += batch
            bar.update(batch)
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()


def stopped_translate(args, argv) -> str:
    where = f"after {getattr(args, 'done', 0)} sentences"
    if args.output != "-":
        where += f" (written to {args.output})"
    return f"{where}; translate does not resume, rerun: {command_line(argv)}"


# --------------------------------------------------------------------------- tune

def cmd_tune(args) -> None:
    from ...integrations import hf
    for option, path in (("--grid-out", args.grid_out), ("--save", args.save)):
        check_writable(option, path)
    model, tok = load_model(args.model)
    examples = read_corpus(args.corpus, model, tok, args.limit)
    ds = open_datastore(args.datastore)
    hidden = check_pairing(args, model, tok, ds)
    check_index(args, ds)
    ks = list(dict.fromkeys(fit_k(k, ds, "--ks value") for k in args.ks))
    res = hf.tune(model, examples, ds, ks=ks, temperatures=args.temperatures, lams=args.lams,
                  hidden=hidden, batch_size=args.batch_size, exact=not args.index)
    if args.grid_out:
        write_json("--grid-out", args.grid_out, res.grid)
    settings = {"ks": ks, "temperatures": args.temperatures, "lams": args.lams,
                "hidden": hidden, "index": bool(args.index)}
    if args.save:
        write_json("--save", args.save, dict(res.best, hidden=hidden, index=bool(args.index),
                                             datastore=os.path.abspath(args.datastore),
                                             tuned_on=os.path.abspath(args.corpus)))
    print_json({"settings": settings, "best": res.best, "base_nll": res.base_nll,
                "cells": len(res.grid), "saved": args.save})
