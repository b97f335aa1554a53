"""Where the key comes from and how a corpus is run teacher forced: locating the LM head,
decoder blocks and FFN sub-layers of any HF model, the forward pre-hook that captures a
hidden state, batching/padding of examples, and datastore capture (``build_datastore``)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ...storage import Datastore

HiddenSpec = Union[str, Callable[[nn.Module], nn.Module]]
Example = Union[Sequence[int], Tuple[Sequence[int], Sequence[int]]]

# Names of the feed-forward sub-layer (or its first projection) across HF architectures;
# the first one found inside the last decoder block wins. Its *input* is the "att" state.
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "DenseReluDense", "fc1", "c_fc",
              "dense_h_to_4h", "w1", "intermediate")


# --------------------------------------------------------------------------- locating layers


# Per model: the module that produces the logits; per module: the layout of its input
# ("batch_major" [B, T, D], "time_major" [T, B, D] or "flat" [B * T, D]).
_LOGITS_MODULES: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_LAYOUT: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def lm_head(model: nn.Module) -> nn.Module:
    """The module that produces the logits; its input is the "ffn" key.

    Found once per model from a probe forward pass, not from ``get_output_embeddings()``,
    which on some models is an input embedding (FSMT returns the decoder's ``embed_tokens``):
    the last module whose output is the logits, or, where the model changes the projection's
    output (a final bias, soft-capping), the last weighted module with a vocabulary-sized
    output."""
    if model not in _LOGITS_MODULES:
        _LOGITS_MODULES[model] = _find_logits_module(model)
    return _LOGITS_MODULES[model]


@torch.no_grad()
def probe_forward(model: nn.Module, target_len: int = 2):
    """A tiny teacher-forced forward pass (batch 1) in eval mode; the mode is restored."""
    device = next(model.parameters()).device
    src = torch.tensor([[0, 1]], device=device)
    tgt = torch.arange(target_len, device=device)[None] % 2
    was_training = model.training
    model.eval()
    try:
        if is_seq2seq(model):
            start = model.config.decoder_start_token_id
            tgt[0, 0] = pad_id(model) if start is None else start
            return model(input_ids=src, attention_mask=torch.ones_like(src),
                         decoder_input_ids=tgt, use_cache=False)
        return model(input_ids=tgt, attention_mask=torch.ones_like(tgt), use_cache=False)
    finally:
        model.train(was_training)


def _find_logits_module(model: nn.Module) -> nn.Module:
    seen = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, out)))
               for m in model.modules() if m is not model]
    try:
        logits = getattr(probe_forward(model), "logits", None)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(logits, Tensor):
        raise ValueError(f"{type(model).__name__} returns no logits; pass hidden=<module path> "
                         f"to pick the key layer")
    sized = [(m, out) for m, out in seen
             if isinstance(out, Tensor) and out.shape[-1] == logits.shape[-1]
             and isinstance(getattr(m, "weight", None), Tensor) and not isinstance(m, nn.Embedding)]
    exact = [m for m, out in sized if out.shape == logits.shape and torch.equal(out, logits)]
    if exact:
        return exact[-1]
    if sized:
        return sized[-1][0]
    raise ValueError(f"no module of {type(model).__name__} produces its logits; pass "
                     f"hidden=<module path> to pick the key layer")


def input_layout(model: nn.Module, module: nn.Module) -> str:
    """How ``module`` receives the hidden states, found by a probe: "time_major" [T, B, D]
    (FSMT's decoder blocks), "flat" [B * T, D] (OPT's fc1) or "batch_major" [B, T, D]."""
    if module not in _LAYOUT:
        shapes = []
        handle = module.register_forward_pre_hook(
            lambda mod, args: shapes.append(tuple(args[0].shape)) if args else None)
        try:
            probe_forward(model, target_len=3)
        finally:
            handle.remove()
        shape = shapes[-1] if shapes else ()
        _LAYOUT[module] = ("flat" if len(shape) == 2 else
                           "time_major" if shape[:2] == (3, 1) else "batch_major")
    return _LAYOUT[module]


def runs_time_major(model: nn.Module, module: nn.Module) -> bool:
    """True when ``module`` receives [T, B, D] (FSMT's decoder blocks), found by a probe."""
    return input_layout(model, module) == "time_major"


def _enclosing_block(model: nn.Module, module: nn.Module) -> nn.Module:
    """The decoder block holding ``module`` (its input gives [B, T] to a flat module)."""
    for block in decoder_blocks(model):
        if any(m is module for m in block.modules()):
            return block
    raise ValueError(f"{type(module).__name__} receives flattened [B * T, D] states outside "
                     f"the decoder blocks; pass hidden=<module path> of a module that receives "
                     f"[B, T, D] (e.g. a decoder block)")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks: the ModuleList holding most parameters
    (inside ``get_decoder()`` for encoder-decoders, so encoder blocks are never picked)."""
    root = model
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_decoder"):
        root = model.get_decoder()
    lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and len({type(b) for b in m}) == 1]
    if not lists:
        raise ValueError(f"no list of decoder blocks found in {type(model).__name__}; pass "
                         f"hidden=<module path> (e.g. 'model.decoder.layers.5.fc1')")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def ffn_module(block: nn.Module) -> nn.Module:
    """The feed-forward sub-layer (or its first projection) of one block."""
    named = dict(block.named_modules())
    for want in _FFN_NAMES:
        for name, mod in named.items():
            if name.split(".")[-1] == want:
                return mod
    raise ValueError(f"no feed-forward sub-layer ({', '.join(_FFN_NAMES)}) in "
                     f"{type(block).__name__}; pass hidden=<module path>")


def hidden_module(model: nn.Module, hidden: HiddenSpec = "ffn") -> nn.Module:
    """Resolve a hidden-state spec to the module whose input is captured."""
    if callable(hidden) and not isinstance(hidden, str):
        return hidden(model)
    if hidden == "ffn":
        return lm_head(model)
    if hidden == "att":
        return ffn_module(decoder_blocks(model)[-1])
    try:
        return model.get_submodule(hidden)
    except AttributeError:
        raise ValueError(f"hidden must be 'ffn', 'att', a module path of {type(model).__name__} "
                         f"or a callable, got {hidden!r}") from None


class HiddenCapture:
    """Forward pre-hook that keeps the last input of a module as [B, T, D] (time-major
    inputs, as in FSMT's decoder blocks, are transposed)."""

    def __init__(self, model: nn.Module, hidden: HiddenSpec = "ffn"):
        self.module = hidden_module(model, hidden)
        self.layout = input_layout(model, self.module)
        self.time_major = self.layout == "time_major"
        # a flat [B * T, D] input (OPT's fc1) is unflattened with its decoder block's [B, T]
        self._block = _enclosing_block(model, self.module) if self.layout == "flat" else None
        self._rows: Optional[Tuple[int, int]] = None
        self.last: Optional[Tensor] = None
        self._handles = []

    @staticmethod
    def _first_tensor(args, kwargs) -> Optional[Tensor]:
        return args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)),
                                         None)

    def _block_hook(self, module, args, kwargs):
        x = self._first_tensor(args, kwargs)
        self._rows = None if x is None else tuple(x.shape[:2])

    def _hook(self, module, args, kwargs):
        x = self._first_tensor(args, kwargs)
        if x is not None and self.time_major:
            x = x.transpose(0, 1)
        elif x is not None and self._block is not None:
            x = x.reshape(*self._rows, x.shape[-1])
        self.last = x

    def __enter__(self) -> "HiddenCapture":
        if self._block is not None:
            self._handles.append(self._block.register_forward_pre_hook(self._block_hook,
                                                                       with_kwargs=True))
        self._handles.append(self.module.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.last = None

    def step(self) -> Tensor:
        """Hidden state of the newest position of every row, [B, D]."""
        if self.last is None:
            raise RuntimeError("HiddenCapture: the hooked module has not run yet")
        return self.last[:, -1, :]


# --------------------------------------------------------------------------- teacher forcing


def is_seq2seq(model: nn.Module) -> bool:
    """True for encoder-decoders (examples are (source ids, target ids) pairs)."""
    return bool(getattr(model.config, "is_encoder_decoder", False))


def pad_batch(rows: List[Sequence[int]], pad: int) -> Tuple[Tensor, Tensor]:
    """Right-padded ids [B, T] int64 and the attention mask [B, T] (1 = token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def pad_id(model: nn.Module) -> int:
    """The model's pad id (else its EOS id, else 0), checked against the vocabulary: padded
    positions are masked, but their ids still go through the embedding."""
    name = "pad_token_id"
    pad = getattr(model.config, name, None)
    if pad is None:
        name = "eos_token_id"
        pad = getattr(model.config, name, None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    if pad is None:
        return 0
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    if vocab is not None and not 0 <= int(pad) < vocab:
        raise ValueError(f"{type(model).__name__}: config.{name} = {pad} is outside the "
                         f"vocabulary [0, {vocab}); set model.config.pad_token_id to a valid id "
                         f"(any id works: padded positions are masked)")
    return int(pad)


@dataclass
class TeacherForcedBatch:
    """Non-pad target positions of a batch: hidden [n, D], logits [n, V], targets [n]."""
    hidden: Tensor
    logits: Tensor
    targets: Tensor
    examples: int


def target_length(example: Example) -> int:
    """Target positions of an example (causal LM: len - 1, seq2seq: len(target))."""
    return len(example[1]) if isinstance(example, tuple) else len(example) - 1


def length_order(examples: Sequence[Example]) -> List[int]:
    """Deterministic shortest-first order (less padding per batch)."""
    def length(i):
        e = examples[i]
        return len(e[1]) if isinstance(e, tuple) else len(e)
    return sorted(range(len(examples)), key=lambda i: (length(i), i))


@torch.no_grad()
def teacher_forced(model: nn.Module, examples: Sequence[Example], *, hidden: HiddenSpec = "ffn",
                   batch_size: int = 16, start: int = 0, order: Optional[List[int]] = None,
                   device: Optional[torch.device] = None) -> Iterator[TeacherForcedBatch]:
    """Run the model teacher forced over ``examples`` (in ``order``, from ``start``) and
    yield the key hidden state, the logits and the gold next token of every non-pad
    position. Causal LM: example = token ids, position t predicts ids[t+1]. Encoder-decoder:
    example = (source ids, target ids), position t predicts target[t] from target[:t]."""
    device = device or next(model.parameters()).device
    order = list(range(len(examples))) if order is None else order
    seq2seq, pad = is_seq2seq(model), pad_id(model)
    model.eval()
    with HiddenCapture(model, hidden) as cap:
        for s in range(start, len(order), batch_size):
            batch = [examples[i] for i in order[s:s + batch_size]]
            out, targets, mask = forward_batch(model, batch, pad, device, seq2seq)
            keep = mask.bool()
            yield TeacherForcedBatch(cap.last[keep], out.logits[keep], targets[keep], len(batch))


def forward_batch(model: nn.Module, batch: Sequence[Example], pad: int, device,
                  seq2seq: Optional[bool] = None):
    """Teacher-forced forward pass of one batch of examples: (model output, targets [B, T],
    target mask [B, T]); position t of row b predicts targets[b, t] where the mask is 1."""
    seq2seq = is_seq2seq(model) if seq2seq is None else seq2seq
    return (_seq2seq_forward if seq2seq else _causal_forward)(model, batch, pad, device)


def _causal_forward(model, batch, pad, device):
    for e in batch:
        if isinstance(e, tuple) or len(e) < 2:
            raise ValueError("causal LM examples must be token-id lists of length >= 2, got "
                             f"{e if isinstance(e, tuple) else len(e)}")
    ids, mask = pad_batch(batch, pad)
    ids, mask = ids.to(device), mask.to(device)
    # use_cache=False: some models (FSMT) build no causal mask when caching, so every
    # position would see the whole sequence
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad)], 1)
    tmask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    return out, targets, tmask


def _seq2seq_forward(model, batch, pad, device):
    for e in batch:
        if not (isinstance(e, tuple) and len(e) == 2 and len(e[0]) and len(e[1])):
            raise ValueError("encoder-decoder examples must be (source_ids, target_ids) tuples "
                             "of non-empty token-id lists")
    src, src_mask = pad_batch([e[0] for e in batch], pad)
    tgt, tgt_mask = pad_batch([e[1] for e in batch], pad)
    start = model.config.decoder_start_token_id
    start = pad if start is None else start
    dec_in = torch.cat([torch.full_like(tgt[:, :1], start), tgt[:, :-1]], 1)
    out = model(input_ids=src.to(device), attention_mask=src_mask.to(device),
                decoder_input_ids=dec_in.to(device), decoder_attention_mask=tgt_mask.to(device),
                use_cache=False)
    return out, tgt.to(device), tgt_mask.to(device)


# --------------------------------------------------------------------------- (a) capture


def build_datastore(model: nn.Module, examples: Sequence[Example], path: str, *,
                    hidden: HiddenSpec = "ffn", batch_size: int = 16,
                    key_dtype: torch.dtype = torch.float16, metric: str = "l2",
                    model_id: Optional[str] = None, resume: bool = True,
                    overwrite: bool = False, progress: bool = True,
                    sharded: Optional[bool] = None, group: Any = None) -> Datastore:
    """Capture a datastore (key = hidden state before target t, value = target t) from a
    model and a corpus, teacher forced, pad positions dropped.

    Examples are processed shortest first (``length_order``); every committed chunk records
    how many were consumed, so a killed build resumes where it stopped (``resume=True``)
    without losing or duplicating entries.

    ``sharded`` (default: when a ``torch.distributed`` process group is initialized) builds a
    sharded datastore with every rank of ``group`` (call it on every rank): the batches, in
    the order above, are split into contiguous runs, one shard per rank, and rank 0 writes
    the manifest when all are done. The global ids and key bytes are those of the
    single-process build whatever the world size. Returns the whole datastore on every rank.
    """
    from ... import distributed
    order = length_order(examples)
    if sharded or (sharded is None and distributed.is_initialized()):
        n_batches = -(-len(order) // batch_size)

        def shard(shard_path: str, first: int, last: int) -> None:
            capture_datastore(model, examples, shard_path, order[first * batch_size:
                                                                 last * batch_size],
                              hidden=hidden, batch_size=batch_size, key_dtype=key_dtype,
                              metric=metric, model_id=model_id, resume=resume,
                              overwrite=overwrite, progress=progress,
                              shard_extra={"order_range": [first * batch_size,
                                                           min(len(order), last * batch_size)]})
        return distributed.build_sharded(path, n_batches, shard, group=group, resume=resume,
                                         overwrite=overwrite, owner="build_datastore")
    return capture_datastore(model, examples, path, order, hidden=hidden,
                             batch_size=batch_size, key_dtype=key_dtype, metric=metric,
                             model_id=model_id, resume=resume, overwrite=overwrite,
                             progress=progress)


def capture_datastore(model: nn.Module, examples: Sequence[Example], path: str,
                      order: List[int], *, hidden: HiddenSpec = "ffn", batch_size: int = 16,
                      key_dtype: torch.dtype = torch.float16, metric: str = "l2",
                      model_id: Optional[str] = None, resume: bool = True,
                      overwrite: bool = False, progress: bool = True,
                      shard_extra: Optional[dict] = None) -> Datastore:
    """``build_datastore`` of the examples ``order`` lists, in that order (one shard of a
    sharded build; ``shard_extra`` is recorded in meta.json's extra as "shard")."""
    from tqdm.auto import tqdm
    d_model = _hidden_dim(model, examples, hidden)
    vocab = int(lm_head(model).weight.shape[0]) if hasattr(lm_head(model), "weight") else None
    name = hidden if isinstance(hidden, str) else getattr(hidden, "__name__", "custom")
    extra = {"examples": len(examples), "causal": not is_seq2seq(model),
             "corpus_sha256": corpus_fingerprint(examples)}
    if shard_extra is not None:  # a resumed shard must cover the same examples
        extra["shard"] = shard_extra
    writer = Datastore.create(path, d_model, key_dtype, vocab, metric, hidden=name,
                              model_id=model_id or getattr(model.config, "name_or_path", None) or
                              type(model).__name__,
                              extra=extra, resume=resume, overwrite=overwrite, progress=False)
    start = int(writer.cursor or 0)
    bar = tqdm(total=len(order), initial=start, desc="capture", unit="ex",
               disable=not progress, leave=False)
    with writer:
        done = start
        for tf in teacher_forced(model, examples, hidden=hidden, batch_size=batch_size,
                                 start=start, order=order):
            done += tf.examples
            writer.add(tf.hidden, tf.targets, cursor=done)
            bar.update(tf.examples)
            bar.set_postfix(entries=writer.count)
    bar.close()
    ds = writer.datastore
    ds.set_provenance(torch.tensor(order), torch.tensor([target_length(examples[i]) for i in order]))
    return ds


def corpus_fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of every token id, so that a resumed capture refuses a different corpus."""
    import hashlib
    h = hashlib.sha256()
    for e in examples:
        for part in (e if isinstance(e, tuple) else (e,)):
            h.update(",".join(map(str, part)).encode())
            h.update(b";")
    return h.hexdigest()


def _hidden_dim(model: nn.Module, examples: Sequence[Example], hidden: HiddenSpec) -> int:
    """Width of the captured state, read off a forward pass over the first example."""
    if not len(examples):
        raise ValueError("build_datastore: examples is empty")
    first = next(teacher_forced(model, [examples[0]], hidden=hidden, batch_size=1))
    return int(first.hidden.shape[-1])
