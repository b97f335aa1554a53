"""The demo's base model: a small Marian model trained on the general-domain gettext pairs
(cached in ``<cache>/base_model``, checkpointed and resumable), translation and BLEU/chrF."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import sacrebleu
import torch
from safetensors import SafetensorError
import torch.nn.functional as F
from tqdm import tqdm
from transformers import MarianConfig, MarianMTModel

from ...storage.building import acquire_build_lock
from ...storage.checkpoint import load_checkpoint, save_checkpoint
from ...storage.files import check_store_path, os_error
from ..corpus import DemoSplit, TextCodec

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """Size of the base model and how it is trained."""
    d_model: int = 128
    layers: int = 2               # encoder and decoder each
    heads: int = 4
    ffn_dim: int = 512
    dropout: float = 0.1
    max_positions: int = 128
    lr: float = 2e-3              # peak, reached after warmup_steps, then ∝ 1/sqrt(step)
    warmup_steps: int = 100
    max_tokens: int = 1500        # per batch, source + target, padding included
    updates: int = 3000           # fixed, so every machine trains the same model
    label_smoothing: float = 0.1
    checkpoint_every_s: float = 60.0


def build_marian(vocab_size: int, d_model: int = BaseModelConfig.d_model,
                 layers: int = BaseModelConfig.layers, heads: int = BaseModelConfig.heads,
                 ffn_dim: int = BaseModelConfig.ffn_dim, dropout: float = BaseModelConfig.dropout,
                 max_positions: int = BaseModelConfig.max_positions) -> MarianMTModel:
    """A randomly initialised MarianMTModel with the :class:`TextCodec` ids (pad=0 is also the
    decoder start, eos=1) and one embedding matrix shared by encoder, decoder and output."""
    config = MarianConfig(
        vocab_size=vocab_size, d_model=d_model,
        encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim,
        dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
        activation_function="gelu", max_position_embeddings=max_positions,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, forced_eos_token_id=1, decoder_start_token_id=0)
    return MarianMTModel(config)


def sha256_json(obj) -> str:
    """sha256 of an object's canonical JSON (cache keys and stamps)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def token_batches(srcs: list[list[int]], tgts: list[list[int]],
                   max_tokens: int) -> list[list[int]]:
    """Index batches of pairs of similar length, each ≤ ``max_tokens`` padded tokens
    (source + target)."""
    order = sorted(range(len(srcs)), key=lambda i: (len(srcs[i]), len(tgts[i])))
    batches: list[list[int]] = []
    batch: list[int] = []
    src_width = tgt_width = 0
    for i in order:
        src_w, tgt_w = max(src_width, len(srcs[i])), max(tgt_width, len(tgts[i]))
        if batch and (src_w + tgt_w) * (len(batch) + 1) > max_tokens:
            batches.append(batch)
            batch, src_w, tgt_w = [], len(srcs[i]), len(tgts[i])
        batch.append(i)
        src_width, tgt_width = src_w, tgt_w
    if batch:
        batches.append(batch)
    return batches


def pad_rows(rows: list[list[int]], value: int) -> torch.Tensor:
    """Right-padded [len(rows), longest] int64 tensor."""
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def seq2seq_loss(model: MarianMTModel, srcs: list[list[int]], tgts: list[list[int]],
                 pad_id: int, label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Teacher-forced label-smoothed CE of one batch: (mean token loss with its graph,
    number of target tokens)."""
    input_ids = pad_rows(srcs, pad_id)
    labels = pad_rows(tgts, -100)
    decoder_input_ids = torch.cat(
        [torch.full((len(tgts), 1), model.config.decoder_start_token_id, dtype=torch.long),
         labels[:, :-1].clamp(min=0)], dim=1)  # -100 → 0 (= pad); masked by causality
    logits = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long(),
                   decoder_input_ids=decoder_input_ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)
    return loss, int((labels != -100).sum())


def _inverse_sqrt(warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        step = max(step, 1)
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))
    return factor


def save_atomic(write: Callable[[Path], None], target: Path) -> None:
    """Write a file or directory via ``write(tmp_path)`` next to ``target``, then move it into
    place with os.replace, so ``target`` is either the old or the complete new version.
    Leftovers of an earlier interrupted save are removed. A failed write (disk full, a
    read-only directory) is a DatastoreError naming ``target``; the old version stays."""
    tmp_dir = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in target.parent.glob(f".{target.name}.tmp*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
        tmp = tmp_dir / target.name
        write(tmp)
        if target.is_dir():
            os.replace(target, tmp_dir / "stale")  # a non-empty directory cannot be replaced
        os.replace(tmp, target)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as its own error
        raise os_error("knnfast demo", "save", str(target), e, "free disk space or make the "
                       "directory writable, then rerun (the previous version is kept)") from None
    finally:
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


class _TrainingRun:
    """Model, optimiser, lr schedule and progress of one training run; checkpointable."""

    def __init__(self, vocab_size: int, config: BaseModelConfig, seed: int, key: str):
        torch.manual_seed(seed)
        self.config, self.seed, self.key = config, seed, key
        self.model = build_marian(vocab_size, config.d_model, config.layers, config.heads,
                                  config.ffn_dim, config.dropout, config.max_positions)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           betas=(0.9, 0.98), eps=1e-9, weight_decay=0.01)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _inverse_sqrt(config.warmup_steps))
        self.state = {"epoch": 0, "batch": 0, "step": 0, "elapsed_s": 0.0, "tokens": 0}

    def save(self, path: Path) -> None:
        ckpt = {"hash": self.key, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "rng": torch.get_rng_state(), "state": self.state}
        save_checkpoint(ckpt, path, "knnfast demo")

    def restore(self, path: Path) -> bool:
        """Continue from the checkpoint at ``path`` if it belongs to this run (same key); a
        damaged one is a DatastoreError naming it."""
        ckpt = load_checkpoint(path, "knnfast demo", "training restarts from update 0")
        if not isinstance(ckpt, dict) or ckpt.get("hash") != self.key:
            return False
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        torch.set_rng_state(ckpt["rng"])
        self.state = ckpt["state"]
        return True

    def step(self, srcs: list[list[int]], tgts: list[list[int]], pad_id: int) -> float:
        """One optimiser step on a batch; returns its loss."""
        loss, n_tokens = seq2seq_loss(self.model, srcs, tgts, pad_id, self.config.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.state["batch"] += 1
        self.state["tokens"] += n_tokens
        return loss.detach().item()


def _train_loop(run: _TrainingRun, srcs: list[list[int]], tgts: list[list[int]],
                pad_id: int, ckpt_path: Path) -> None:
    """Epochs of shuffled token batches until ``config.updates`` optimiser steps (a fixed
    count, never a time budget: the same model on any machine and load); checkpoints every
    ``checkpoint_every_s`` and on Ctrl-C."""
    config, state = run.config, run.state
    batches = token_batches(srcs, tgts, config.max_tokens)
    bar = tqdm(total=config.updates, initial=state["step"], unit="update", desc="training")
    start = last_ckpt = time.perf_counter()
    start -= state["elapsed_s"]
    run.model.train()
    try:
        while state["step"] < config.updates:
            order = list(range(len(batches)))
            random.Random(run.seed * 1_000_003 + state["epoch"]).shuffle(order)
            for b in order[state["batch"]:]:
                loss = run.step([srcs[i] for i in batches[b]], [tgts[i] for i in batches[b]],
                                pad_id)
                state["elapsed_s"] = time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(epoch=state["epoch"], loss=f"{loss:.2f}", refresh=False,
                                tgt_tok_s=f"{state['tokens'] / state['elapsed_s']:.0f}")
                if state["step"] >= config.updates:
                    break
                if time.perf_counter() - last_ckpt >= config.checkpoint_every_s:
                    run.save(ckpt_path)
                    last_ckpt = time.perf_counter()
            else:
                state["epoch"] += 1
                state["batch"] = 0
    except KeyboardInterrupt:
        run.save(ckpt_path)
        raise
    finally:
        bar.close()
    run.model.eval()


def _cache_key(split: DemoSplit, codec: TextCodec, config: BaseModelConfig, seed: int) -> str:
    return sha256_json({"config": dataclasses.asdict(config), "seed": seed,
                    "tokenizer": hashlib.sha256(codec.to_json().encode()).hexdigest(),
                    "data": sha256_json(split.general_train)})


def train_base_model(split: DemoSplit, codec: TextCodec, cache_dir: str | Path,
                     seed: int = 0, log: Log = print,
                     config: BaseModelConfig = BaseModelConfig(),
                     threads: int | None = None, retrain: bool = False) -> MarianMTModel:
    """Train the base model on ``split.general_train``, or load it from ``cache_dir``.

    AdamW with inverse-sqrt warmup and label smoothing, length-bucketed token batches,
    for ``config.updates`` seeded updates (progress bar with a time estimate). The result
    goes to ``cache_dir/base_model`` (weights, tokenizer.json, train_meta.json with the hash
    of config, seed, tokenizer and data); a cache whose hash matches is loaded instead
    of training (with a warning line; ``retrain=True`` trains anyway). A checkpoint (``cache_dir/base_model.ckpt``) is written every
    ``config.checkpoint_every_s`` and on Ctrl-C, and the next call resumes from it. Trains
    on ``threads`` CPU threads (default: torch's setting, e.g. from OMP_NUM_THREADS); the
    caller's setting is restored afterwards.
    """
    cache_dir = Path(cache_dir)
    for path in (cache_dir, cache_dir / "base_model"):  # a file or a link loop in the way
        check_store_path(str(path), "knnfast demo")
    final_dir, ckpt_path = cache_dir / "base_model", cache_dir / "base_model.ckpt"
    key = _cache_key(split, codec, config, seed)
    meta = _cached_meta(final_dir / "train_meta.json", log)
    if meta.get("hash") == key and not retrain:
        log(f"warning: base model reused from the cache {final_dir} (trained {meta['steps']} "
            f"updates in {meta['train_seconds']:.0f} s, "
            f"{meta['target_tokens'] / meta['train_seconds']:.0f} target tokens/s, same "
            f"settings, seed, tokenizer and data); retrain=True (`knnfast demo --retrain`) "
            f"trains it again")
        return MarianMTModel.from_pretrained(final_dir).eval()

    caller_threads = torch.get_num_threads()
    torch.set_num_threads(threads or caller_threads)
    lock = acquire_build_lock(final_dir, "knnfast demo")  # one trainer per cache
    try:
        run = _train(split, codec, config, seed, key, ckpt_path, log)
        _save_model(run, codec, key, final_dir)
    finally:
        os.close(lock)
        torch.set_num_threads(caller_threads)
    ckpt_path.unlink(missing_ok=True)
    log(f"base model: saved to {final_dir}")
    return run.model


def _cached_meta(path: Path, log: Log) -> dict:
    """train_meta.json of the cached model ({} when there is none, or it is unreadable: a
    damaged cache is trained again, never trusted)."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log(f"warning: {path} is unreadable ({e}); the base model is trained again")
        return {}
    return meta if isinstance(meta, dict) else {}


def _save_model(run: _TrainingRun, codec: TextCodec, key: str, final_dir: Path) -> None:
    state = run.state
    meta = {"hash": key, "config": dataclasses.asdict(run.config), "seed": run.seed,
            "steps": state["step"],
            "train_seconds": state["elapsed_s"], "target_tokens": state["tokens"],
            "parameters": sum(p.numel() for p in run.model.parameters())}

    def write(path: Path) -> None:
        run.model.save_pretrained(path)
        codec.save(path / "tokenizer.json")
        (path / "train_meta.json").write_text(json.dumps(meta, indent=2))
    save_atomic(write, final_dir)


def _train(split: DemoSplit, codec: TextCodec, config: BaseModelConfig, seed: int, key: str,
           ckpt_path: Path, log: Log) -> _TrainingRun:
    """A training run from scratch or from its checkpoint, to the end."""
    run = _TrainingRun(codec.vocab_size, config, seed, key)
    if run.restore(ckpt_path):
        log(f"base model: resuming from {ckpt_path} at step {run.state['step']}")
    srcs = codec.encode_rows([s for s, _ in split.general_train], config.max_positions)
    tgts = codec.encode_rows([t for _, t in split.general_train], config.max_positions)
    n_params = sum(p.numel() for p in run.model.parameters())
    log(f"base model: {n_params / 1e6:.2f}M parameters, {len(srcs)} pairs, {config.updates} "
        f"updates, {torch.get_num_threads()} threads")
    _train_loop(run, srcs, tgts, codec.pad_id, ckpt_path)
    state = run.state
    log(f"base model: {state['step']} steps, {state['epoch']} full epochs, "
        f"{state['elapsed_s']:.0f} s, {state['tokens'] / state['elapsed_s']:.0f} target tokens/s")
    return run


@torch.inference_mode()
def translate(model: MarianMTModel, codec: TextCodec, sources: list[str],
              batch_size: int = 32, num_beams: int = 4,
              max_new_tokens: int | None = None) -> list[str]:
    """Translations of ``sources`` (beam search; ``num_beams=1`` is greedy). Batches group
    sources of similar length; the result is in input order. ``max_new_tokens`` defaults to
    twice the batch's source length + 10, capped at the model's position limit."""
    model.eval()
    max_positions = model.config.max_position_embeddings
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out: list[str] = [""] * len(sources)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = codec.encode_batch([sources[i] for i in chunk], max_positions)
        limit = max_new_tokens or min(max_positions, 2 * ids.shape[1] + 10)
        generated = model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams,
                                   do_sample=False, max_new_tokens=limit)
        for i, row in zip(chunk, generated):
            out[i] = codec.decode(row)
    return out


def evaluate_bleu(hyps: list[str], refs: list[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenisation, chrF β=2)."""
    return {"bleu": sacrebleu.corpus_bleu(hyps, [refs]).score,
            "chrf": sacrebleu.corpus_chrf(hyps, [refs]).score}
