"""INK's training loop (2023): refine the representation space with adapters against kNN
knowledge, with the datastore re-encoded every epoch. HF models only (through
``knnfast.integrations.hf``, imported when the loop runs)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ... import distributed
from ...storage import Datastore, DatastoreError
from ...storage import index as faiss_index
from ...storage.building import acquire_build_lock
from ...storage.checkpoint import load_checkpoint, save_checkpoint
from ...storage.files import check_store_path, os_error
from .adapters import ADAPTERS_ATTR, add_adapters
from .loss import ink_loss

PARTS = ("align", "kd", "refine")


def _output_layer(model: nn.Module):
    """(output weight [V, D], output bias [V] or None) of the LM head, frozen."""
    from ...integrations.hf import lm_head
    head = lm_head(model)
    bias = getattr(head, "bias", None)
    extra = getattr(model, "final_logits_bias", None)  # Marian / BART add it to the logits
    if extra is not None:
        extra = extra.reshape(-1)
        bias = extra if bias is None else bias + extra
    return head.weight.detach(), None if bias is None else bias.detach()


@dataclass
class _Settings:
    """What one INK update needs besides the batch."""
    k: int
    alpha: float
    beta: float
    variant: str
    exact: bool
    hidden: object = "ffn"


class _EntryIds:
    """Datastore entry ids of each example's positions: ``build_datastore`` captures the
    examples in length order, so example ``order[s]`` owns a contiguous run of entries."""

    def __init__(self, examples: Sequence, order: List[int]):
        from ...integrations.hf import target_length
        self.lengths = [target_length(examples[i]) for i in order]
        self.start = [0]
        for n in self.lengths[:-1]:
            self.start.append(self.start[-1] + n)
        self.total = sum(self.lengths)

    def of(self, slots: List[int]) -> torch.Tensor:
        return torch.cat([torch.arange(self.start[s], self.start[s] + self.lengths[s])
                          for s in slots])

    def rows(self, slots: List[int]) -> int:
        return sum(self.lengths[s] for s in slots)


@dataclass
class _Epoch:
    """One epoch's inputs: the examples in length order (``order``), the batches as lists of
    slots into it, their entry ids, and this rank's place in the process group."""
    examples: Sequence
    order: List[int]
    batches: List[List[int]]
    entries: _EntryIds
    group: Any = None

    def share(self, slots: List[int]) -> List[int]:
        """This rank's contiguous share of a batch (all of it in a single process)."""
        start, end = distributed.split(len(slots), *distributed.rank_and_world(self.group))
        return slots[start:end]


def train_ink(model: nn.Module, examples, workdir: str, *, epochs: int = 1,
              batch_size: int = 16, k: int = 32, alpha: float = 0.1, beta: float = 0.1,
              lr: float = 1e-3, adapter_size: int = 64, dropout: float = 0.1,
              variant: str = "paper", seed: int = 0, index_factory: str = None,
              nprobe: int = 16, hidden="ffn", refresh: bool = True,
              initial_datastore: Optional[Datastore] = None, progress: bool = True, log=print,
              group: Any = None):
    """INK (2023): refine the representation space with adapters against kNN knowledge.

    Every epoch re-encodes the datastore keys with the current adapters (teacher-forced
    capture of ``examples``, the ``hidden`` state), then for every training batch retrieves the k
    nearest entries of each position with its own entry excluded and minimizes ink_loss with
    only the adapters trainable. A checkpoint (adapters, optimizer, epoch) is written after
    each epoch to ``workdir/ink_ckpt.pt`` (atomically, with a CRC-32: a damaged checkpoint is
    a DatastoreError naming it); calling again with more epochs resumes there. One run per
    ``workdir`` at a time (a lock; a second run fails at once).
    With ``index_factory`` (e.g. "IVF1024,PQ32") retrieval goes through FAISS (exact scores
    of the candidates): the quantizers are trained once, on the first epoch's keys, and reused
    for every refreshed datastore (INK's released code does the same). Returns a per-epoch log.
    Afterwards the model decodes with no datastore, or with one
    (``knnfast.integrations.hf.build_datastore`` on the adapted model + a KNNDecoder: hybrid).

    ``hidden`` is the captured state: "ffn" (the input of the module producing the logits) or
    a module path / callable naming that same input on a model where it is not found on its
    own; ink_loss multiplies it by the output weight, so "att" is refused.
    ``refresh=False`` is the paper's "w/o refresh" ablation: the datastore is encoded once,
    by the model before training (kept in ``workdir`` for resumed runs), and reused.
    ``initial_datastore``: the datastore of ``examples`` as the model encodes them before
    training, used instead of encoding it again for the first epoch (and, without refresh, for
    every epoch). Adapters start as the identity, so the base model's datastore of the same
    examples (``build_datastore``, same ``hidden``) qualifies; its length is checked.

    Under an initialized ``torch.distributed`` process group (call it on every rank of
    ``group`` with the same arguments; ``workdir`` on a filesystem every rank sees) the work
    is split across the ranks: every refresh encodes a sharded datastore, each rank its
    contiguous share of the examples (``build_datastore``), and every batch's examples are
    split across the ranks, each rank's loss weighted by its share of the batch's target
    positions and the adapter gradients summed with one all-reduce per step: the update is
    the single-process one (up to float rounding; adapter dropout draws differ per rank). Rank
    0 locks, checkpoints and logs; a failure raises on every rank; no ``index_factory``.
    """
    from ...integrations import hf
    if hidden == "att":
        raise ValueError("train_ink: hidden must be the input of the output projection ('ffn' "
                         "or its module path), got 'att' (ink_loss multiplies it by the "
                         "output weight)")
    rank, world = distributed.rank_and_world(group)
    if world > 1 and index_factory:
        raise ValueError("train_ink: index_factory is single-process only; under a process "
                         "group of several ranks train with exact search (index_factory=None)")
    with _locked_workdir(workdir, group):
        if not hasattr(model, ADAPTERS_ATTR):
            add_adapters(model, size=adapter_size, dropout=dropout)
        adapters = getattr(model, ADAPTERS_ATTR)
        opt = torch.optim.Adam(adapters.parameters(), lr=lr)
        ckpt_path = os.path.join(workdir, "ink_ckpt.pt")
        history, start = _resume(ckpt_path, adapters, opt, log)
        order = hf.length_order(examples)
        entries = _EntryIds(examples, order)
        settings = _Settings(k, alpha, beta, variant, exact=not index_factory, hidden=hidden)
        if initial_datastore is not None and len(initial_datastore) != entries.total:
            raise ValueError(f"train_ink: initial_datastore has {len(initial_datastore)} "
                             f"entries, the examples have {entries.total} target positions")
        ds = None
        for epoch in range(start, epochs):
            model.eval()
            if refresh or ds is None:
                ds = _epoch_store(model, examples, workdir, epoch, refresh, initial_datastore,
                                  hidden, (index_factory, nprobe), group)
            batches = _shuffled_batches(len(order), batch_size, seed + epoch)
            entry = _train_epoch(model, _Epoch(examples, order, batches, entries, group), ds,
                                 opt, settings, f"INK epoch {epoch + 1}", progress and rank == 0)
            entry["epoch"] = epoch + 1
            entry["refreshed"] = bool(refresh or epoch == 0)
            history.append(entry)
            if rank == 0:
                log(f"INK epoch {epoch + 1}: loss {entry['loss']:.4f} (" +
                    ", ".join(f"{name} {entry[name]:.4f}" for name in PARTS) + ")")
            _save(ckpt_path, adapters, opt, epoch + 1, history, group)
        return history


def _shuffled_batches(n: int, batch_size: int, seed: int) -> List[List[int]]:
    """Consecutive slots [0, n) in batches of ``batch_size``, the batches in a seeded order."""
    gen = torch.Generator().manual_seed(seed)
    batches = [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


@contextlib.contextmanager
def _locked_workdir(workdir: str, group: Any = None):
    """Create ``workdir`` and hold its lock for the run (a second run there fails at once);
    under a process group rank 0 holds it for all ranks, which learn of its failure."""
    rank, world = distributed.rank_and_world(group)
    lock, error = None, None
    if rank == 0:
        try:
            lock = _lock_workdir(workdir)
        except (OSError, ValueError) as e:
            if world == 1:
                raise
            error = e
    try:
        if world > 1:
            distributed.agree(f"train_ink: locking {workdir}", error, group)
        yield
    finally:
        if lock is not None:
            os.close(lock)


def _lock_workdir(workdir: str) -> int:
    check_store_path(workdir, "train_ink")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise os_error("train_ink", "create the work directory", workdir, e,
                       "make its parent writable or use another workdir") from None
    return acquire_build_lock(workdir, "train_ink")


def _epoch_store(model: nn.Module, examples, workdir: str, epoch: int, refresh: bool,
                 initial: Optional[Datastore], hidden, index: tuple, group: Any) -> Datastore:
    """The datastore epoch ``epoch`` retrieves from: the caller's initial one (first epoch,
    or every epoch without refresh), else encoded (or reused) in ``workdir``; with its FAISS
    index when ``index`` = (factory, nprobe) names one."""
    if initial is not None and (epoch == 0 or not refresh):
        ds = _own_handle(initial)  # the index attached below stays off the caller's object
    else:
        ds = _epoch_datastore(model, examples, os.path.join(workdir, "datastore"), hidden,
                              reuse=not refresh and epoch > 0, group=group)
    factory, nprobe = index
    if factory:
        _refresh_index(ds, factory, nprobe, os.path.join(workdir, "ink_index.faiss"))
    return ds


def _own_handle(ds: Datastore) -> Datastore:
    """The same stored datastore, opened again (or ``ds`` itself when it lives in memory)."""
    return Datastore.open(ds.path) if ds.path is not None else ds


def _epoch_datastore(model: nn.Module, examples, path: str, hidden, reuse: bool,
                     group: Any = None) -> Datastore:
    """The epoch's datastore: re-encoded by the current model (sharded across the ranks of
    a process group), or (``reuse``, no refresh) the one an earlier epoch of this run
    encoded."""
    from ...integrations import hf
    from ...storage.sharded import is_sharded
    if reuse and (os.path.exists(os.path.join(path, "meta.json")) or is_sharded(path)):
        return Datastore.open(path)
    return hf.build_datastore(model, examples, path, hidden=hidden, overwrite=True,
                              resume=False, progress=False,
                              sharded=distributed.rank_and_world(group)[1] > 1, group=group)


def _train_epoch(model: nn.Module, epoch: _Epoch, ds: Datastore, opt: torch.optim.Optimizer,
                 settings: _Settings, desc: str, progress: bool) -> dict:
    """One pass over the epoch's batches; returns the mean loss and parts."""
    from tqdm.auto import tqdm
    model.train()
    weight, bias = _output_layer(model)
    params = [p for p in opt.param_groups[0]["params"]]
    sums = dict.fromkeys(("loss",) + PARTS, 0.0)
    bar = tqdm(range(len(epoch.batches)), desc=desc, disable=not progress, leave=False)
    for b in bar:
        slots = epoch.batches[b]
        if distributed.rank_and_world(epoch.group)[1] == 1:
            loss, parts = _ink_step(model, [epoch.examples[epoch.order[s]] for s in slots],
                                    epoch.entries.of(slots), ds, weight, bias, settings)
            opt.zero_grad()
            loss.backward()
            stats = [float(loss.detach())] + [parts[name] for name in PARTS]
        else:
            opt.zero_grad()
            stats = _shared_step(model, epoch, slots, ds, weight, bias, settings, params,
                                 f"train_ink: {desc}, batch {b + 1}")
        opt.step()
        for name, value in zip(("loss",) + PARTS, stats):
            sums[name] += value
        bar.set_postfix(loss=f"{stats[0]:.3f}")
    model.eval()
    return {name: v / max(1, len(epoch.batches)) for name, v in sums.items()}


def _shared_step(model: nn.Module, epoch: _Epoch, slots: List[int], ds: Datastore,
                 weight: torch.Tensor, bias: Optional[torch.Tensor], settings: _Settings,
                 params: List[torch.Tensor], what: str) -> List[float]:
    """This rank's share of one batch: its loss weighted by its share of the batch's target
    positions (so the ranks' losses add up to the batch mean), backward, then the gradients
    and loss parts summed over the ranks in one all-reduce. Leaves the batch gradient in
    ``params``; returns [loss, *parts] of the whole batch."""
    mine = epoch.share(slots)
    stats, error = torch.zeros(1 + len(PARTS), dtype=torch.float64), None
    try:
        if mine:
            loss, parts = _ink_step(model, [epoch.examples[epoch.order[s]] for s in mine],
                                    epoch.entries.of(mine), ds, weight, bias, settings)
            weight_share = epoch.entries.rows(mine) / epoch.entries.rows(slots)
            (loss * weight_share).backward()
            stats = torch.tensor([float(loss.detach())] + [parts[n] for n in PARTS],
                                 dtype=torch.float64) * weight_share
    except Exception as e:  # the other ranks must not wait in the all-reduce for this one
        error = e
    distributed.agree(what, error, epoch.group)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).double() for g in grads] + [stats])
    dist.all_reduce(flat, group=epoch.group)
    at = 0
    for p in params:
        p.grad = flat[at:at + p.numel()].view_as(p).to(p.dtype)
        at += p.numel()
    return flat[at:].tolist()


def _ink_step(model: nn.Module, batch: list, ids: torch.Tensor, ds: Datastore,
              weight: torch.Tensor, bias: Optional[torch.Tensor], settings: _Settings):
    """ink_loss of one batch: capture the "ffn" states, retrieve each position's k
    neighbours with its own entry excluded."""
    from ...integrations import hf
    with hf.HiddenCapture(model, settings.hidden) as cap:
        _, targets, mask = hf.forward_batch(model, batch, hf.pad_id(model), weight.device)
        keep = mask.bool()
        hidden = cap.last[keep]
    targets = targets[keep]
    # ids: entry ids of these positions in the datastore (same length order as the capture)
    _, nbr = ds.search(hidden.detach(), settings.k, exact=settings.exact, rescore=True,
                       exclude=ids)
    tokens = ds.lookup(nbr, check=False)
    keys = ds.key_rows(nbr).float()
    return ink_loss(hidden, weight, targets, keys, tokens, alpha=settings.alpha,
                    beta=settings.beta, out_bias=bias, variant=settings.variant)


def _resume(ckpt_path: str, adapters: nn.Module, opt: torch.optim.Optimizer,
            log: Callable[[str], None]):
    """(history, epochs done) of an earlier run's checkpoint, restored into adapters + opt."""
    state = load_checkpoint(ckpt_path, "train_ink", "training restarts from epoch 0")
    if state is None:
        return [], 0
    if not isinstance(state, dict) or not {"adapters", "optimizer", "epoch",
                                            "history"} <= set(state):
        raise DatastoreError(f"train_ink: checkpoint {ckpt_path} is not an INK checkpoint; "
                             f"delete it (training restarts from epoch 0)")
    adapters.load_state_dict(state["adapters"])
    opt.load_state_dict(state["optimizer"])
    log(f"INK: resuming after epoch {state['epoch']}")
    return state["history"], state["epoch"]


def _save(ckpt_path: str, adapters: nn.Module, opt: torch.optim.Optimizer, epoch: int,
          history: list, group: Any = None) -> None:
    """Rank 0 writes the checkpoint; every rank learns whether it was written."""
    rank, world = distributed.rank_and_world(group)
    error = None
    try:
        if rank == 0:
            save_checkpoint({"adapters": adapters.state_dict(), "optimizer": opt.state_dict(),
                             "epoch": epoch, "history": history}, ckpt_path, "train_ink")
    except (OSError, DatastoreError) as e:
        if world == 1:
            raise
        error = e
    if world > 1:
        distributed.agree(f"train_ink: saving {ckpt_path}", error, group)


def _refresh_index(ds: Datastore, factory: str, nprobe: int, template_path: str) -> None:
    """Fill the datastore's index from a template trained once (first call trains it)."""
    import faiss
    if not os.path.exists(template_path):
        ds.build_index(factory, nprobe=nprobe, save=False, progress=False)
        template = faiss.clone_index(ds.index)
        template.reset()
        faiss.write_index(template, template_path)
    index = faiss.read_index(template_path)
    faiss_index.add_keys(index, ds.keys, ds.metric)
    faiss_index.set_nprobe(index, nprobe)
    ds.use_index(index, {"factory": factory, "metric": ds.metric, "ntotal": len(ds),
                         "nprobe": nprobe})
