"""The translation world the three kNN-MT studies share: the demo's English→German gettext
split, its tokenizer, its base model (general domain only) and the in-domain (PostgreSQL)
datastore with its IVF index, at a full or a quick scale; plus translation, scoring and a
fixed-update fine-tuning loop every study's arms use.

Everything expensive is cached under ``run.shared`` (one base model and datastore for all
studies of a scale) and trained for a fixed, seeded number of updates: the same models and
tables on any machine and load."""
from __future__ import annotations

import copy
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from ..corpus import DemoSplit, Pair, TextCodec, load_catalogs, split_domains, train_tokenizer
from ..demo.base_model import (BaseModelConfig, evaluate_bleu, seq2seq_loss, token_batches)
from ..demo.knn_mt import build_in_domain_datastore, pair_examples, translate_knn
from .runner import StudyRun

# (model, source rows, target rows, indices of the batch's pairs) -> mean loss with its graph
LossFn = Callable[[torch.nn.Module, list, list, list], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class MTScale:
    """Sizes of a run. ``limits`` cut each split to its first n pairs (None: all)."""
    name: str
    model: BaseModelConfig
    vocab: int
    limits: dict
    finetune_updates: int
    beam: int
    batch: int = 16
    max_new_tokens: Optional[int] = None


FULL = MTScale("full", BaseModelConfig(), 8000,
               {"general_train": None, "general_dev": 500, "in_train": None, "in_dev": None,
                "in_test": 500}, finetune_updates=600, beam=4)
# quick: structure only (tests). An untrained model never says </s>, so its output length
# is capped to keep decoding to seconds.
QUICK = MTScale("quick", BaseModelConfig(d_model=32, layers=1, heads=2, ffn_dim=64, updates=40,
                                         warmup_steps=10, max_positions=64),
                400, {"general_train": 400, "general_dev": 12, "in_train": 160, "in_dev": 24,
                      "in_test": 12}, finetune_updates=6, beam=1, batch=12, max_new_tokens=12)


def scale(quick: bool) -> MTScale:
    """The scale of a run (``--quick``: QUICK)."""
    return QUICK if quick else FULL


def _cut(split: DemoSplit, limits: dict) -> DemoSplit:
    return DemoSplit(**{name: getattr(split, name)[:n] if n else getattr(split, name)
                        for name, n in limits.items()})


class MTWorld:
    """Split, tokenizer, base model and in-domain datastore of one scale (built or loaded).

    Attributes: scale, split, codec, model (the base model, eval mode: never train it, take
    ``fresh_model()``), datastore (``"ffn"`` keys of in_train, IVF index loaded), max_len.
    """

    def __init__(self, run: StudyRun, split: Optional[DemoSplit] = None):
        from ..demo.base_model import train_base_model
        self.run, self.log = run, run.log
        self.scale = scale(run.quick)
        self.split = _cut(split or split_domains(load_catalogs()), self.scale.limits)
        self.codec = TextCodec(train_tokenizer(
            (t for pair in self.split.general_train for t in pair), vocab_size=self.scale.vocab))
        self.model = train_base_model(self.split, self.codec, run.shared, log=self.log,
                                      config=self.scale.model)
        self.max_len = self.model.config.max_position_embeddings
        self.datastore = build_in_domain_datastore(self.model, self.codec, self.split,
                                                   run.shared, self.log)
        # the shared pieces' cold-cache cost counts in every study's stated time
        meta = json.loads((run.shared / "base_model" / "train_meta.json").read_text())
        run.record("base model (shared)", meta["train_seconds"])
        run.record("datastore + index (shared)",
                   self.datastore.meta.get("extra", {}).get("build_seconds", 0.0))

    def describe(self) -> list[str]:
        """Setup lines for a report."""
        c = self.model.config
        n = sum(p.numel() for p in self.model.parameters())
        return [f"data: English→German gettext catalogs of this machine; {self.split.sizes()} "
                f"(general = every non-PostgreSQL catalog, in-domain = PostgreSQL)",
                f"base model: Marian d_model={c.d_model}, {c.encoder_layers}+{c.decoder_layers} "
                f"layers, vocab {c.vocab_size}, {n / 1e6:.2f}M parameters, "
                f"{self.scale.model.updates} updates on general_train (seed 0)",
                f"datastore: {len(self.datastore):,} entries (in_train target tokens), "
                f"D={self.datastore.dim}, \"ffn\" keys (input of the output projection)"]

    def examples(self, pairs: Sequence[Pair]) -> list:
        """(source ids, target ids) of text pairs."""
        return pair_examples(self.codec, list(pairs), self.max_len)

    def fresh_model(self) -> torch.nn.Module:
        """A trainable copy of the base model."""
        return copy.deepcopy(self.model).train()

    def evaluate(self, model, pairs: Sequence[Pair], decoder=None) -> dict:
        """BLEU, chrF, seconds and sentences/s of beam search over ``pairs`` (kNN mixed in
        when ``decoder`` is given), with the hypotheses under "hyps"."""
        model.eval()
        sources, refs = [s for s, _ in pairs], [t for _, t in pairs]
        hyps, secs = translate_knn(model, self.codec, sources, decoder,
                                   batch_size=self.scale.batch, num_beams=self.scale.beam,
                                   max_new_tokens=self.scale.max_new_tokens)
        return dict(evaluate_bleu(hyps, refs), seconds=secs,
                    sentences_per_s=len(sources) / max(secs, 1e-9), hyps=hyps)

    def fine_tune(self, model, params: Sequence[torch.nn.Parameter], pairs: Sequence[Pair], *,
                  updates: Optional[int] = None, lr: float = 5e-4, seed: int = 0,
                  loss_fn: Optional[LossFn] = None, desc: str = "fine-tune") -> dict:
        """``updates`` (default: the scale's) AdamW steps on ``params`` over token batches of
        ``pairs``, label-smoothed CE unless ``loss_fn``; returns updates, seconds,
        updates/s, target tokens/s and the mean loss of the last 50 updates."""
        updates = updates or self.scale.finetune_updates
        params = [p for p in params if p.requires_grad]
        if not params:
            raise ValueError("fine_tune: no trainable parameter was given")
        ex = self.examples(pairs)
        srcs, tgts = [s for s, _ in ex], [t for _, t in ex]
        batches = token_batches(srcs, tgts, self.scale.model.max_tokens)
        rng = random.Random(seed)
        torch.manual_seed(seed)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        pad, smoothing = self.codec.pad_id, self.scale.model.label_smoothing
        losses, tokens = [], 0
        model.train()
        start = time.perf_counter()
        for step in tqdm(range(updates), desc=desc, unit="update", leave=False):
            if step % len(batches) == 0:
                rng.shuffle(batches)
            b = batches[step % len(batches)]
            s, t = [srcs[i] for i in b], [tgts[i] for i in b]
            loss = loss_fn(model, s, t, b) if loss_fn else seq2seq_loss(model, s, t, pad, smoothing)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tokens += sum(map(len, t))
        secs = time.perf_counter() - start
        model.eval()
        return {"updates": updates, "seconds": secs, "updates_per_s": updates / secs,
                "target_tokens_per_s": tokens / secs, "final_loss": sum(losses[-50:]) / len(losses[-50:])}


def save_model(model, path: Path) -> None:
    """A fine-tuned arm's weights (state dict, atomically)."""
    from ..demo.base_model import save_atomic
    save_atomic(lambda tmp: torch.save(model.state_dict(), tmp), path)
