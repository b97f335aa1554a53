"""kNN-KD (Yang et al. 2022): teacher tensors searched once, offline, for every target position
of a training corpus, and the fused distillation loss (``knnfast.knn_kd_loss``).

    from knnfast.methods.kd import TeacherStore                 # needs transformers
    store = TeacherStore.build(model, datastore, train_examples, "teacher/", k=64)
    store = TeacherStore.open("teacher/")                       # memmap
    tokens, scores = store.batch([3, 17, 4])                     # [3, T_max, k], pads = -1
    loss = knnfast.knn_kd_loss(logits.flatten(0, 1), labels.flatten(),
                               tokens.flatten(0, 1), scores.flatten(0, 1), temperature=100.0)

On-disk format (version 1), a directory:

    tokens      int32 [T, k]   neighbour token ids, -1 = padding (fewer than k neighbours)
    scores      float16 [T, k] neighbour scores relative to the row's best one (s - s_max <= 0;
                                the teacher softmax(s / tau) is unchanged by the shift and fp16
                                cannot overflow); -inf on padding. Compact stores hold the
                                merged teacher probabilities instead (``compact_temperature``).
    offsets     int64 [S + 1]  sentence i's positions are rows offsets[i] .. offsets[i + 1]
    meta.json   format_version, k, positions T, sentences S, exclude_self, compact_temperature,
                datastore (path, size, metric, hidden), model_id, corpus_sha256, byte sizes

Rows follow the corpus order (sentence 0 first), whatever order the build ran in. Building
goes through the same resumable chunk writer as a Datastore build
(``knnfast.storage.building``): chunks are appended, fsynced and committed; a killed build
continues with ``resume=True`` (nothing lost or duplicated).

Training (the distillation loss over batches, fused with the output layer or from the
logits, ``train_step``, the HF Trainer subclass) lives in ``kd_training`` and is re-exported
here.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import distributed, ops
from ..defaults import MAX_K
from ..integrations.hf import (Example, HiddenSpec, corpus_fingerprint, length_order,
                               target_length, teacher_forced)
from ..storage import Datastore
from ..storage import checksums
from ..storage.building import ChunkedBuild
from ..storage.files import DatastoreError, fsync_file, memmap, os_error, read_checked_meta
from ..storage.verify import VerifyReport, verify_store
from .kd_training import (batch_loss, distillation_loss, fused_layer,  # noqa: F401 (re-exported)
                          knn_kd_trainer_class, rank_slice, seq2seq_batch, train_step)

FORMAT_VERSION = 1
FILES = ("tokens", "scores", "offsets")


class TeacherStore:
    """Per-position kNN teachers of a corpus: ``tokens`` / ``scores`` [T, k], ``offsets``."""

    def __init__(self, path: str, meta: dict, tokens: Tensor, scores: Tensor, offsets: Tensor):
        self.path, self.meta = path, meta
        self.tokens, self.scores, self.offsets = tokens, scores, offsets

    # ---- build

    @classmethod
    def build(cls, model: nn.Module, datastore: Datastore, examples: Sequence[Example],
              path: str, k: int = 64, *, hidden: Optional[HiddenSpec] = None,
              batch_size: int = 32, exact: Optional[bool] = None, exclude_self: bool = False,
              compact_temperature: Optional[float] = None, resume: bool = True,
              overwrite: bool = False, progress: bool = True,
              parallel: Optional[bool] = None, group: Any = None) -> "TeacherStore":
        """Search the datastore once for every target position of ``examples``.

        The query of position t is the same hidden state the datastore holds (teacher
        forced, ``hidden`` defaults to the datastore's). ``exclude_self`` drops each
        position's own datastore entry; it needs the datastore to have been captured from
        these very examples (checked through the corpus fingerprint). ``compact_temperature``
        stores M . softmax(scores / tau) with duplicate tokens merged instead of the scores.

        ``parallel`` (default: when a ``torch.distributed`` process group is initialized;
        call it on every rank of ``group``) splits the length-ordered batches into contiguous
        runs, one per rank; each rank writes its part (resumable) under ``<path>.parts/`` and
        rank 0 merges the parts into one store in corpus order, the same bytes as a
        single-process build. Every rank returns the finished store.
        """
        path = os.fspath(path)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise ValueError(f"TeacherStore.build: k must be an int in [1, {MAX_K}], got {k!r}")
        if compact_temperature is not None and not compact_temperature > 0:
            raise ValueError(f"TeacherStore.build: compact_temperature must be > 0, "
                             f"got {compact_temperature!r}")
        hidden = hidden or datastore.meta.get("hidden", "ffn")
        fingerprint = corpus_fingerprint(examples)
        if exclude_self and datastore.meta.get("extra", {}).get("corpus_sha256") != fingerprint:
            raise ValueError("TeacherStore.build: exclude_self needs a datastore captured from "
                             "these examples (knnfast.hf.build_datastore); its corpus "
                             "fingerprint differs")
        meta = {"format_version": FORMAT_VERSION, "k": k, "sentences": len(examples),
                "exclude_self": exclude_self, "compact_temperature": compact_temperature,
                "datastore": {"path": datastore.path, "size": len(datastore),
                              "metric": datastore.metric, "hidden": datastore.meta.get("hidden")},
                "hidden": hidden if isinstance(hidden, str) else "custom",
                "model_id": getattr(getattr(model, "config", None), "name_or_path", None)
                or type(model).__name__,
                "corpus_sha256": fingerprint}
        order = length_order(examples)
        search = dict(k=k, hidden=hidden, batch_size=batch_size, exact=exact,
                      exclude_self=exclude_self, compact_temperature=compact_temperature,
                      progress=progress)
        if parallel or (parallel is None and distributed.is_initialized()):
            return cls._build_parallel(model, datastore, examples, order, path, meta, search,
                                       resume=resume, overwrite=overwrite, group=group)
        writer = TeacherWriter(path, meta, resume=resume, overwrite=overwrite)
        cls._fill(writer, model, datastore, examples, order, 0, **search)
        try:
            return writer.finalize(examples)
        finally:
            writer.release()  # a failed finalize keeps every sentence committed, resumable

    @staticmethod
    def _fill(writer: "TeacherWriter", model: nn.Module, datastore: Datastore,
              examples: Sequence[Example], order: List[int], first_entry: int, *, k: int,
              hidden: HiddenSpec, batch_size: int, exact: Optional[bool], exclude_self: bool,
              compact_temperature: Optional[float], progress: bool) -> None:
        """Append the teachers of ``order``'s examples not yet committed by ``writer``;
        ``first_entry`` is the datastore id of the first target position of ``order``."""
        from tqdm.auto import tqdm
        bar = tqdm(total=len(order), initial=writer.sentences, desc="teacher", unit="ex",
                   disable=not progress, leave=False)
        done = writer.sentences
        entry = first_entry + sum(target_length(examples[i]) for i in order[:done])
        try:
            for tf in teacher_forced(model, examples, hidden=hidden, batch_size=batch_size,
                                     start=done, order=order):
                n = tf.targets.numel()
                excl = torch.arange(entry, entry + n) if exclude_self else None
                scores, ids = datastore.search(tf.hidden, k, exact=exact, exclude=excl)
                tokens = datastore.lookup(ids, check=False)
                if compact_temperature is not None:
                    tokens, scores = ops.knn_probs_sparse(scores, tokens, float(compact_temperature))
                else:
                    scores = scores - scores[:, :1].clamp(min=torch.finfo(torch.float32).min)
                writer.add(order[done:done + tf.examples], tokens, scores)
                done += tf.examples
                entry += n
                bar.update(tf.examples)
        except BaseException:
            writer.release()  # the committed prefix stays resumable, by this process too
            raise
        bar.close()

    @classmethod
    def _build_parallel(cls, model: nn.Module, datastore: Datastore,
                        examples: Sequence[Example], order: List[int], path: str, meta: dict,
                        search: dict, *, resume: bool, overwrite: bool,
                        group: Any) -> "TeacherStore":
        """``build`` split across the ranks of ``group`` (see ``build``'s ``parallel``)."""
        rank, world = distributed.rank_and_world(group)
        parts = path + ".parts"
        n_batches = -(-len(order) // search["batch_size"])
        first, last = (b * search["batch_size"] for b in distributed.split(n_batches, rank, world))
        error = None
        try:
            writer = TeacherWriter(part_path(parts, rank), meta, resume=resume,
                                   overwrite=overwrite)
            first_entry = sum(target_length(examples[i]) for i in order[:first])
            cls._fill(writer, model, datastore, examples, order[first:last], first_entry,
                      **search)
            writer.release()
        except Exception as e:  # every rank must hear of it, not wait for this one
            error = e
        distributed.agree(f"TeacherStore.build: part {rank} of {path}", error, group)
        error = None
        if rank == 0:
            try:
                merge_parts(path, parts, world, meta, examples, resume=resume,
                            overwrite=overwrite)
            except Exception as e:
                error = e
        distributed.agree(f"TeacherStore.build: merging the parts into {path}", error, group)
        return cls.open(path)

    # ---- read

    @classmethod
    def open(cls, path: str) -> "TeacherStore":
        """Memmap a finished store, checking file sizes against meta.json."""
        path = os.fspath(path)
        meta = read_checked_meta(path, "TeacherStore.open", FORMAT_VERSION, FILES,
                                 ("positions", "k", "sentences"),
                                 "TeacherStore.build(..., resume=True)")
        T, k, S = meta["positions"], meta["k"], meta["sentences"]
        return cls(path, meta, memmap(os.path.join(path, "tokens"), np.int32, (T, k)),
                   memmap(os.path.join(path, "scores"), np.float16, (T, k)),
                   memmap(os.path.join(path, "offsets"), np.int64, (S + 1,)))

    @classmethod
    def verify(cls, path: str) -> VerifyReport:
        """Check a finished store against the sizes and per-block CRC-32s recorded when it
        was built (``knnfast.storage.verify`` for teacher stores)."""
        return verify_store(path, "teacher store", FORMAT_VERSION, FILES,
                            ("positions", "k", "sentences"), "TeacherStore.build(..., resume=True)")

    @staticmethod
    def is_store(path: str) -> bool:
        """True when ``path`` holds a meta.json describing a teacher store's files."""
        import json
        try:
            with open(os.path.join(path, "meta.json")) as f:
                return set(FILES) <= set(json.load(f).get("bytes", {}))
        except (OSError, ValueError, AttributeError):
            return False

    def __len__(self) -> int:
        return int(self.meta["sentences"])

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def compact(self) -> bool:
        return self.meta.get("compact_temperature") is not None

    def positions(self, sentence: int) -> Tuple[Tensor, Tensor]:
        """(tokens [n, k] int64, scores [n, k] float32) of one sentence's target positions."""
        s, e = int(self.offsets[sentence]), int(self.offsets[sentence + 1])
        return self.tokens[s:e].long(), self.scores[s:e].float()

    def batch(self, sentence_ids: Sequence[int], length: Optional[int] = None
              ) -> Tuple[Tensor, Tensor]:
        """Teachers of a batch aligned to target positions: tokens [B, L, k] int64 (pads -1)
        and scores [B, L, k] float32 (pads -inf; probabilities, pads 0, for compact stores).
        L = ``length`` or the longest sentence; row t of sentence i is the teacher of its
        target t (the neighbours of the context y_<t)."""
        ids = [int(i) for i in sentence_ids]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"TeacherStore.batch: sentence id {bad[0]} outside [0, {len(self)})")
        parts = [self.positions(i) for i in ids]
        L = length if length is not None else max((p[0].shape[0] for p in parts), default=0)
        pad = 0.0 if self.compact else float("-inf")
        tokens = torch.full((len(ids), L, self.k), -1, dtype=torch.long)
        scores = torch.full((len(ids), L, self.k), pad, dtype=torch.float32)
        for b, (t, s) in enumerate(parts):
            n = min(L, t.shape[0])
            tokens[b, :n], scores[b, :n] = t[:n], s[:n]
        return tokens, scores


class TeacherWriter:
    """Appends per-sentence teachers in build order through the shared resumable chunk writer
    (``knnfast.storage.building.ChunkedBuild``; its cursor is the list of sentence ids done);
    ``finalize`` writes them in corpus order. Made by ``TeacherStore.build``."""

    def __init__(self, path: str, meta: dict, *, resume: bool, overwrite: bool):
        self.path, self.meta = path, meta
        k = meta["k"]
        self._build = ChunkedBuild(path, meta, {"tokens": 4 * k, "scores": 2 * k},
                                   owner="TeacherStore.build", resume=resume, overwrite=overwrite)
        self.done_ids: List[int] = list(self._build.cursor or [])

    @property
    def sentences(self) -> int:
        """Sentences committed so far."""
        return len(self.done_ids)

    @property
    def rows(self) -> int:
        """Target positions committed so far."""
        return self._build.count

    def file(self, name: str) -> str:
        """The building file ``name`` ("tokens" or "scores")."""
        return self._build.file(name)

    def add(self, sentence_ids: List[int], tokens: Tensor, scores: Tensor) -> None:
        """Append the teachers (tokens / scores [n, k]) of these sentences' positions."""
        done = self.done_ids + [int(i) for i in sentence_ids]
        self._build.append({"tokens": tokens.to(torch.int32).contiguous().cpu().numpy().tobytes(),
                            "scores": scores.to(torch.float16).contiguous().cpu().numpy().tobytes()},
                           tokens.shape[0], cursor=done)
        self.done_ids = done

    def release(self) -> None:
        """Give up the build lock without finalizing (the committed prefix stays resumable)."""
        self._build.release()

    def finalize(self, examples: Sequence[Example],
                 sources: Optional[Sequence["TeacherWriter"]] = None) -> TeacherStore:
        """Reorder the rows into corpus order, write offsets and meta.json, move into place.
        ``sources``: the writers whose rows make the store (default: this one; a parallel
        build passes every rank's part)."""
        sources = list(sources) if sources is not None else [self]
        k, S = self.meta["k"], len(examples)
        T = sum(w.rows for w in sources)
        lengths = torch.tensor([target_length(e) for e in examples], dtype=torch.int64)
        offsets = torch.zeros(S + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(lengths, 0)
        rows = corpus_rows(sources, lengths)
        tokens = [memmap(w.file("tokens"), np.int32, (w.rows, k)) for w in sources]
        scores = [memmap(w.file("scores"), np.float16, (w.rows, k)) for w in sources]
        bases = [0] + np.cumsum([w.rows for w in sources]).tolist()
        out_dir = self._build.tmp + ".final"
        crcs = {name: checksums.BlockCRC() for name in FILES}
        try:
            os.makedirs(out_dir, exist_ok=True)
            for name, src in (("tokens", tokens), ("scores", scores)):
                with open(os.path.join(out_dir, name), "wb") as f:
                    for s in range(0, T, 1 << 16):
                        piece = gather_rows(src, bases, rows[s:s + (1 << 16)]).numpy().tobytes()
                        f.write(piece)
                        crcs[name].update(piece)
                    fsync_file(f)
            with open(os.path.join(out_dir, "offsets"), "wb") as f:
                f.write(offsets.numpy().tobytes())
                crcs["offsets"].update(offsets.numpy())
                fsync_file(f)
        except OSError as e:
            self.release()
            raise os_error("TeacherStore.build", "write", out_dir, e, "every sentence is "
                           "committed: free disk space and resume with resume=True") from None
        meta = dict(self.meta, positions=T, created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    bytes={"tokens": T * k * 4, "scores": T * k * 2, "offsets": (S + 1) * 8},
                    checksums=checksums.record(crcs))
        self._build.publish(meta, out_dir)
        return TeacherStore.open(self.path)


def corpus_rows(sources: Sequence[TeacherWriter], lengths: Tensor) -> Tensor:
    """Row of every target position, in corpus order, in the concatenation of the sources'
    rows (each source holds whole sentences, in its build order)."""
    S = lengths.shape[0]
    start = torch.full((S,), -1, dtype=torch.int64)
    base = 0
    for w in sources:
        ids = torch.tensor(w.done_ids, dtype=torch.int64)
        if ids.numel():
            start[ids] = base + torch.cumsum(lengths[ids], 0) - lengths[ids]
        base += w.rows
    missing = int((start < 0).sum())
    if missing:
        raise DatastoreError(f"TeacherStore.build: {missing} of {S} sentences have no teacher "
                             f"rows in the build's parts; rerun the build (resume=True)")
    if not S:
        return torch.zeros(0, dtype=torch.int64)
    return torch.cat([torch.arange(start[i], start[i] + lengths[i]) for i in range(S)])


def gather_rows(sources: Sequence[Tensor], bases: Sequence[int], rows: Tensor) -> Tensor:
    """``rows`` of the concatenation of ``sources`` (bases[p] = first row of source p)."""
    out = torch.empty((rows.shape[0],) + tuple(sources[0].shape[1:]), dtype=sources[0].dtype)
    for p, src in enumerate(sources):
        mine = (rows >= bases[p]) & (rows < bases[p + 1])
        if mine.any():
            out[mine] = src[rows[mine] - bases[p]]
    return out


def part_path(parts: str, rank: int) -> str:
    """Rank ``rank``'s part of a parallel teacher build."""
    return os.path.join(parts, f"part-{rank:05d}")


def merge_parts(path: str, parts: str, world: int, meta: dict, examples: Sequence[Example], *,
                resume: bool, overwrite: bool) -> None:
    """Write the ``world`` parts of a parallel build into one store at ``path`` (corpus
    order, the bytes of a single-process build), then delete the parts."""
    sources = [TeacherWriter(part_path(parts, r), meta, resume=True, overwrite=False)
               for r in range(world)]
    final = TeacherWriter(path, meta, resume=resume, overwrite=overwrite)
    try:
        final.finalize(examples, sources)
    finally:
        for w in sources + [final]:
            w.release()
    shutil.rmtree(parts)
