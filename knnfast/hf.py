"""HuggingFace transformers drop-in: datastore capture, kNN-LM evaluation, kNN generate.

Works with any causal LM or encoder-decoder that has an output embedding
(``model.get_output_embeddings()``); nothing is keyed on the model type. Which hidden
state is the key (Xu et al.'s names):

    "ffn"   the input of the LM head (the decoder's final hidden state; default)
    "att"   the input of the last decoder block's feed-forward sub-layer
    "<dotted.module.path>" or a callable(model) -> module: the input of that module

Examples (``ids`` are token-id lists; for seq2seq, (source_ids, target_ids) pairs)::

    ds = knnfast.hf.build_datastore(model, train_examples, "ds/")          # teacher forced
    knn = knnfast.KNNDecoder(ds, k=8, temperature=10.0, lam=0.7)
    out = knnfast.hf.generate(model, knn, input_ids=src, num_beams=4)    # kNN-MT / kNN-LM
    res = knnfast.hf.evaluate_lm(model, test_examples, knn)              # base/kNN/oracle ppl
    best = knnfast.hf.tune(model, dev_examples, ds, ks=(4, 8, 16))       # λ/τ/k grid
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops
from .datastore import Datastore
from .decoding import KNNDecoder, Neighbours, gold_two_column

HiddenSpec = Union[str, Callable[[nn.Module], nn.Module]]
Example = Union[Sequence[int], Tuple[Sequence[int], Sequence[int]]]

# Names of the feed-forward sub-layer (or its first projection) across HF architectures;
# the first one found inside the last decoder block wins. Its *input* is the "att" state.
_FFN_NAMES = ("mlp", "feed_forward", "ffn", "DenseReluDense", "fc1", "c_fc",
              "dense_h_to_4h", "w1", "intermediate")


# --------------------------------------------------------------------------- locating layers


def lm_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() "
                         f"is None); pass hidden=<module path> to pick the key layer")
    return head


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
    """Forward pre-hook that keeps the last input of a module ([B, T, D])."""

    def __init__(self, model: nn.Module, hidden: HiddenSpec = "ffn"):
        self.module = hidden_module(model, hidden)
        self.last: Optional[Tensor] = None
        self._handle = None

    def _hook(self, module, args, kwargs):
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        self.last = x

    def __enter__(self) -> "HiddenCapture":
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None
        self.last = None

    def step(self) -> Tensor:
        """Hidden state of the newest position of every row, [B, D]."""
        if self.last is None:
            raise RuntimeError("HiddenCapture: the hooked module has not run yet")
        return self.last[:, -1, :]


# --------------------------------------------------------------------------- teacher forcing


def _is_seq2seq(model: nn.Module) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _pad(rows: List[Sequence[int]], pad: int) -> Tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    return 0 if pad is None else int(pad)


@dataclass
class TeacherForcedBatch:
    """Non-pad target positions of a batch: hidden [n, D], logits [n, V], targets [n]."""
    hidden: Tensor
    logits: Tensor
    targets: Tensor
    examples: int


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
    seq2seq, pad = _is_seq2seq(model), _pad_id(model)
    model.eval()
    with HiddenCapture(model, hidden) as cap:
        for s in range(start, len(order), batch_size):
            batch = [examples[i] for i in order[s:s + batch_size]]
            if seq2seq:
                out, targets, mask = _seq2seq_forward(model, batch, pad, device)
            else:
                out, targets, mask = _causal_forward(model, batch, pad, device)
            keep = mask.bool()
            yield TeacherForcedBatch(cap.last[keep], out.logits[keep], targets[keep], len(batch))


def _causal_forward(model, batch, pad, device):
    for e in batch:
        if isinstance(e, tuple) or len(e) < 2:
            raise ValueError("causal LM examples must be token-id lists of length >= 2, got "
                             f"{e if isinstance(e, tuple) else len(e)}")
    ids, mask = _pad(batch, pad)
    ids, mask = ids.to(device), mask.to(device)
    out = model(input_ids=ids, attention_mask=mask)
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], pad)], 1)
    tmask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
    return out, targets, tmask


def _seq2seq_forward(model, batch, pad, device):
    for e in batch:
        if not (isinstance(e, tuple) and len(e) == 2 and len(e[0]) and len(e[1])):
            raise ValueError("encoder-decoder examples must be (source_ids, target_ids) tuples "
                             "of non-empty token-id lists")
    src, src_mask = _pad([e[0] for e in batch], pad)
    tgt, tgt_mask = _pad([e[1] for e in batch], pad)
    start = model.config.decoder_start_token_id
    start = pad if start is None else start
    dec_in = torch.cat([torch.full_like(tgt[:, :1], start), tgt[:, :-1]], 1)
    out = model(input_ids=src.to(device), attention_mask=src_mask.to(device),
                decoder_input_ids=dec_in.to(device), decoder_attention_mask=tgt_mask.to(device))
    return out, tgt.to(device), tgt_mask.to(device)


# --------------------------------------------------------------------------- (a) capture


def build_datastore(model: nn.Module, examples: Sequence[Example], path: str, *,
                    hidden: HiddenSpec = "ffn", batch_size: int = 16,
                    key_dtype: torch.dtype = torch.float16, metric: str = "l2",
                    model_id: Optional[str] = None, resume: bool = True,
                    overwrite: bool = False, progress: bool = True) -> Datastore:
    """Capture a datastore (key = hidden state before target t, value = target t) from a
    model and a corpus, teacher forced, pad positions dropped.

    Examples are processed shortest first (``length_order``); every committed chunk records
    how many were consumed, so a killed build resumes where it stopped (``resume=True``)
    without losing or duplicating entries.
    """
    from tqdm.auto import tqdm
    d_model = _hidden_dim(model, examples, hidden)
    order = length_order(examples)
    vocab = int(lm_head(model).weight.shape[0]) if hasattr(lm_head(model), "weight") else None
    name = hidden if isinstance(hidden, str) else getattr(hidden, "__name__", "custom")
    writer = Datastore.create(path, d_model, key_dtype, vocab, metric, hidden=name,
                              model_id=model_id or getattr(model.config, "name_or_path", None) or
                              type(model).__name__,
                              extra={"examples": len(examples), "causal": not _is_seq2seq(model),
                                     "corpus_sha256": corpus_fingerprint(examples)},
                              resume=resume, overwrite=overwrite, progress=False)
    start = int(writer.cursor or 0)
    bar = tqdm(total=len(examples), initial=start, desc="capture", unit="ex",
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
    return writer.datastore


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


# --------------------------------------------------------------------------- (b) kNN-LM eval


@dataclass
class LMEvalResult:
    """Perplexities over ``tokens`` target positions (one forward pass per batch)."""
    tokens: int
    base_ppl: float
    knn_ppl: float
    oracle_ppl: float
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def evaluate_lm(model: nn.Module, examples: Sequence[Example], decoder: KNNDecoder, *,
                hidden: HiddenSpec = "ffn", batch_size: int = 8,
                progress: bool = True) -> LMEvalResult:
    """Perplexity of the base model, of kNN-LM (decoder's k, τ, λ) and of the oracle that
    picks, per token, the better of the two. Causal LMs and encoder-decoders (target side).
    The decoder's backend ("fused" or "reference") runs the kNN part."""
    from tqdm.auto import tqdm
    base_nll = knn_nll = oracle_nll = 0.0
    n = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(examples), desc="eval", unit="ex", disable=not progress, leave=False)
    for tf in teacher_forced(model, examples, hidden=hidden, batch_size=batch_size):
        nbrs = decoder.retrieve(tf.hidden)
        knn = decoder.gold_logprob(tf.logits, tf.targets, nbrs)
        base = _base_gold_logprob(tf.logits, tf.targets, decoder.backend)
        base_nll -= float(base.sum())
        knn_nll -= float(knn.sum())
        oracle_nll -= float(torch.maximum(base, knn).sum())
        n += tf.targets.numel()
        bar.update(tf.examples)
    bar.close()
    secs = time.perf_counter() - t0
    ppl = lambda nll: math.exp(nll / max(n, 1))  # noqa: E731
    return LMEvalResult(n, ppl(base_nll), ppl(knn_nll), ppl(oracle_nll), secs)


def _base_gold_logprob(logits: Tensor, targets: Tensor, backend: str = "fused") -> Tensor:
    if backend == "fused":
        empty = torch.full((logits.shape[0], 1), -1, dtype=torch.long, device=logits.device)
        return ops.knn_gold_logprob(logits, targets, empty,
                                    weights=torch.zeros(empty.shape, device=logits.device), lam=0.0)
    return torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)


# --------------------------------------------------------------------------- (d) tuning


@dataclass
class GoldFeatures:
    """One retrieval pass over a dev set: what λ/τ/k tuning and the adaptive network need."""
    base_gold_logp: Tensor   # [T] log p_model(y_t)
    targets: Tensor          # [T]
    neighbours: Neighbours   # K neighbours of each position


def collect_gold_features(model: nn.Module, examples: Sequence[Example], decoder: KNNDecoder,
                          k: Optional[int] = None, *, hidden: HiddenSpec = "ffn",
                          batch_size: int = 16, progress: bool = True) -> GoldFeatures:
    """Teacher-forced pass + one search with k (default decoder.k) neighbours per position."""
    from tqdm.auto import tqdm
    base, targets, scores, tokens, ids = [], [], [], [], []
    bar = tqdm(total=len(examples), desc="dev retrieval", unit="ex", disable=not progress,
               leave=False)
    for tf in teacher_forced(model, examples, hidden=hidden, batch_size=batch_size):
        nb = decoder.retrieve(tf.hidden, k or decoder.k)
        base.append(_base_gold_logprob(tf.logits, tf.targets).cpu())
        targets.append(tf.targets.cpu())
        scores.append(nb.scores.cpu())
        tokens.append(nb.tokens.cpu())
        ids.append(nb.ids.cpu())
        bar.update(tf.examples)
    bar.close()
    return GoldFeatures(torch.cat(base), torch.cat(targets),
                        Neighbours(torch.cat(scores), torch.cat(tokens), torch.cat(ids)))


@dataclass
class TuneResult:
    best: dict                       # {"k", "temperature", "lam", "nll", "ppl"}
    base_nll: float
    grid: List[dict] = field(default_factory=list)


def tune_from_features(feats: GoldFeatures, ks: Sequence[int] = (4, 8, 16, 32),
                       temperatures: Sequence[float] = (1.0, 10.0, 100.0),
                       lams: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
                       ) -> TuneResult:
    """Grid over (k, τ, λ) of the mean gold NLL, each cell one fused knn_gold_logprob over
    all T positions (2-column form, see ``gold_two_column``)."""
    K = feats.neighbours.scores.shape[1]
    if max(ks) > K:
        raise ValueError(f"ks go up to {max(ks)} but only {K} neighbours were retrieved")
    logits2, tokens2 = gold_two_column(feats.base_gold_logp, feats.neighbours.tokens, feats.targets)
    zeros = torch.zeros_like(feats.targets)
    base_nll = float(-feats.base_gold_logp.mean())
    grid = []
    for k in ks:
        sc, tk = feats.neighbours.scores[:, :k].contiguous(), tokens2[:, :k].contiguous()
        for tau in temperatures:
            for lam in lams:
                nll = float(-ops.knn_gold_logprob(logits2, zeros, tk, scores=sc,
                                                  temperature=float(tau), lam=float(lam)).mean())
                grid.append({"k": int(k), "temperature": float(tau), "lam": float(lam),
                             "nll": nll, "ppl": math.exp(nll)})
    best = min(grid, key=lambda g: g["nll"])
    return TuneResult(best, base_nll, grid)


def tune(model: nn.Module, examples: Sequence[Example], datastore: Datastore, *,
         ks: Sequence[int] = (4, 8, 16, 32), temperatures: Sequence[float] = (1.0, 10.0, 100.0),
         lams: Sequence[float] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
         hidden: HiddenSpec = "ffn", batch_size: int = 16, exact: Optional[bool] = None,
         progress: bool = True) -> TuneResult:
    """λ/τ/k tuning on a dev set from one retrieval with max(ks) neighbours."""
    dec = KNNDecoder(datastore, k=max(ks), exact=exact)
    feats = collect_gold_features(model, examples, dec, hidden=hidden, batch_size=batch_size,
                                  progress=progress)
    return tune_from_features(feats, ks, temperatures, lams)


# --------------------------------------------------------------------------- (c) generate


def _logits_processor_base():
    from transformers import LogitsProcessor
    return LogitsProcessor


class KNNLogitsProcessor(_logits_processor_base()):
    """A transformers LogitsProcessor that replaces each step's scores by the kNN mixture.

    Greedy search hands it logits, beam search log-softmaxed logits; log_softmax is
    idempotent, so the mixture is the same. Rows are batch x beam in the model's order,
    the same order in which the captured hidden states arrive.
    """

    def __init__(self, decoder: KNNDecoder, capture: HiddenCapture):
        self.decoder = decoder
        self.capture = capture

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        nbrs = self.decoder.retrieve(self.capture.step())
        logp = self.decoder.interpolate(scores, nbrs)
        # transformers runs its own processors (min length, bad words, forced EOS, ...)
        # before user ones: what they forbade (-inf) must stay forbidden after the mixture.
        # Off the k neighbour tokens the mixture of a -inf score is already -inf, so only
        # those k slots per row need the fix (no extra pass over [B, V]).
        tok = nbrs.tokens.to(scores.device)
        slot = tok.clamp(min=0)
        forbidden = torch.isneginf(scores.gather(1, slot)) & (tok >= 0)
        logp.scatter_(1, slot, logp.gather(1, slot).masked_fill_(forbidden, float("-inf")))
        return logp


@contextmanager
def knn_processor(model: nn.Module, decoder: KNNDecoder, hidden: HiddenSpec = "ffn"):
    """Yields a KNNLogitsProcessor wired to a hidden-state hook on ``model``."""
    with HiddenCapture(model, hidden) as cap:
        yield KNNLogitsProcessor(decoder, cap)


def generate(model: nn.Module, decoder: Optional[KNNDecoder], *args, hidden: HiddenSpec = "ffn",
             **kwargs) -> Any:
    """``model.generate(*args, **kwargs)`` with kNN mixed into every step (greedy, beam,
    sampling; causal LMs and encoder-decoders; any batch). ``decoder=None`` = bare model.
    Extra ``logits_processor`` entries run after the kNN one."""
    if decoder is None:
        return model.generate(*args, **kwargs)
    from transformers import LogitsProcessorList
    user = kwargs.pop("logits_processor", None) or []
    with knn_processor(model, decoder, hidden) as proc:
        return model.generate(*args, logits_processor=LogitsProcessorList([proc, *user]), **kwargs)


class KNNModel(nn.Module):
    """Wrap a model so that ``forward`` returns kNN log-probs as ``logits`` and
    ``generate`` decodes with kNN. Everything else is delegated to the model."""

    def __init__(self, model: nn.Module, decoder: KNNDecoder, hidden: HiddenSpec = "ffn"):
        super().__init__()
        self.model = model
        self.decoder = decoder
        self.hidden = hidden

    def forward(self, *args, **kwargs):
        with HiddenCapture(self.model, self.hidden) as cap:
            out = self.model(*args, **kwargs)
            h = cap.last
        B, T, V = out.logits.shape
        h = h[:, -T:, :]
        out.logits = self.decoder(h.reshape(B * T, -1), out.logits.reshape(B * T, V)).view(B, T, V)
        return out

    def generate(self, *args, **kwargs):
        return generate(self.model, self.decoder, *args, hidden=self.hidden, **kwargs)

    @property
    def config(self):
        return self.model.config
