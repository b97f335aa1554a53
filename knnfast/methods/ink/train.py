"""INK's training loop (2023): refine the representation space with adapters against kNN
knowledge, with the datastore re-encoded every epoch. HF models only (through
``knnfast.integrations.hf``, imported when the loop runs)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn

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


def train_ink(model: nn.Module, examples, workdir: str, *, epochs: int = 1,
              batch_size: int = 16, k: int = 32, alpha: float = 0.1, beta: float = 0.1,
              lr: float = 1e-3, adapter_size: int = 64, dropout: float = 0.1,
              variant: str = "paper", seed: int = 0, index_factory: str = None,
              nprobe: int = 16, hidden="ffn", refresh: bool = True,
              initial_datastore: Optional[Datastore] = None, progress: bool = True, log=print):
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
    """
    from ...integrations import hf
    if hidden == "att":
        raise ValueError("train_ink: hidden must be the input of the output projection ('ffn' "
                         "or its module path), got 'att' (ink_loss multiplies it by the "
                         "output weight)")
    with _locked_workdir(workdir):
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
                if initial_datastore is not None and (epoch == 0 or not refresh):
                    # an own handle: the index attached below stays off the caller's object
                    ds = _own_handle(initial_datastore)
                else:
                    ds = _epoch_datastore(model, examples, os.path.join(workdir, "datastore"),
                                          hidden, reuse=not refresh and epoch > 0)
                if index_factory:
                    _refresh_index(ds, index_factory, nprobe,
                                   os.path.join(workdir, "ink_index.faiss"))
            gen = torch.Generator().manual_seed(seed + epoch)
            batches = [list(range(s, min(s + batch_size, len(order))))
                       for s in range(0, len(order), batch_size)]
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
            entry = _train_epoch(model, [[examples[order[s]] for s in b] for b in batches],
                                 [entries.of(b) for b in batches], ds, opt, settings,
                                 f"INK epoch {epoch + 1}", progress)
            entry["epoch"] = epoch + 1
            entry["refreshed"] = bool(refresh or epoch == 0)
            history.append(entry)
            log(f"INK epoch {epoch + 1}: loss {entry['loss']:.4f} (align {entry['align']:.4f}, "
                f"kd {entry['kd']:.4f}, refine {entry['refine']:.4f})")
            _save(ckpt_path, adapters, opt, epoch + 1, history)
        return history


@contextlib.contextmanager
def _locked_workdir(workdir: str):
    """Create ``workdir`` and hold its lock for the run (a second run there fails at once)."""
    check_store_path(workdir, "train_ink")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise os_error("train_ink", "create the work directory", workdir, e,
                       "make its parent writable or use another workdir") from None
    lock = acquire_build_lock(workdir, "train_ink")
    try:
        yield
    finally:
        os.close(lock)


def _own_handle(ds: Datastore) -> Datastore:
    """The same stored datastore, opened again (or ``ds`` itself when it lives in memory)."""
    return Datastore.open(ds.path) if ds.path is not None else ds


def _epoch_datastore(model: nn.Module, examples, path: str, hidden, reuse: bool) -> Datastore:
    """The epoch's datastore: re-encoded by the current model, or (``reuse``, no refresh) the
    one an earlier epoch of this run encoded."""
    from ...integrations import hf
    if reuse and os.path.exists(os.path.join(path, "meta.json")):
        return Datastore.open(path)
    return hf.build_datastore(model, examples, path, hidden=hidden, overwrite=True,
                              resume=False, progress=False)


def _train_epoch(model: nn.Module, batches: List[list], entry_ids: List[torch.Tensor],
                 ds: Datastore, opt: torch.optim.Optimizer, settings: _Settings, desc: str,
                 progress: bool) -> dict:
    """One pass over the batches (examples, and their positions' datastore entry ids);
    returns the mean loss and parts."""
    from tqdm.auto import tqdm
    model.train()
    weight, bias = _output_layer(model)
    sums = dict.fromkeys(("loss",) + PARTS, 0.0)
    bar = tqdm(range(len(batches)), desc=desc, disable=not progress, leave=False)
    for b in bar:
        loss, parts = _ink_step(model, batches[b], entry_ids[b], ds, weight, bias, settings)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sums["loss"] += float(loss.detach())
        for name in PARTS:
            sums[name] += parts[name]
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    model.eval()
    return {name: v / max(1, len(batches)) for name, v in sums.items()}


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
    keys = ds.keys[nbr.clamp(min=0)].float()
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
          history: list) -> None:
    save_checkpoint({"adapters": adapters.state_dict(), "optimizer": opt.state_dict(),
                     "epoch": epoch, "history": history}, ckpt_path, "train_ink")


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
