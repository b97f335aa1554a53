"""English→German kNN-MT demo: a small Marian model trained on general gettext catalogs,
adapted to PostgreSQL messages by retrieval (``make demo``).

    python -m knnfast demo          # same as `make demo`

Corpus → tokenizer → base model (trained once, cached in ``.cache/demo/base_model``) →
in-domain datastore + IVF index (``.cache/demo/datastore``) → λ/τ/k tuning and the adaptive
meta-k network on in_dev → BLEU/chrF and sentences/s of base, kNN-MT, adaptive kNN-MT and
the reference path on in_test → BLEU against λ (PNG). Without the catalogs: a kNN-LM demo
on the Python language reference (``pydoc_data``).
"""
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
import torch.nn.functional as F
from tqdm import tqdm
from transformers import MarianConfig, MarianMTModel

from .datastore import Datastore
from .corpus import (DemoSplit, Pair, TextCodec, load_catalogs,
                     split_domains, train_tokenizer)

Log = Callable[[str], None]

# ============================================================================================
# Base model: build, train (cached, resumable), translate, score
# ============================================================================================


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
    max_epochs: int = 20
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


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _token_batches(srcs: list[list[int]], tgts: list[list[int]],
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


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def _train_step(model: MarianMTModel, srcs: list[list[int]], tgts: list[list[int]],
                pad_id: int, label_smoothing: float) -> tuple[torch.Tensor, int]:
    """Forward + backward of one batch; returns (mean token loss, number of target tokens)."""
    input_ids = _pad(srcs, pad_id)
    labels = _pad(tgts, -100)
    decoder_input_ids = torch.cat(
        [torch.full((len(tgts), 1), model.config.decoder_start_token_id, dtype=torch.long),
         labels[:, :-1].clamp(min=0)], dim=1)  # -100 → 0 (= pad); masked by causality
    logits = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long(),
                   decoder_input_ids=decoder_input_ids).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing)
    loss.backward()
    return loss.detach(), int((labels != -100).sum())


def _inverse_sqrt(warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        step = max(step, 1)
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))
    return factor


def _save_atomic(write: Callable[[Path], None], target: Path) -> None:
    """Write a file or directory via ``write(tmp_path)`` next to ``target``, then move it into
    place with os.replace, so ``target`` is either the old or the complete new version.
    Leftovers of an earlier interrupted save are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.tmp*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        tmp = tmp_dir / target.name
        write(tmp)
        if target.is_dir():
            os.replace(target, tmp_dir / "stale")  # a non-empty directory cannot be replaced
        os.replace(tmp, target)
    finally:
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
        _save_atomic(lambda tmp: torch.save(ckpt, tmp), path)

    def restore(self, path: Path) -> bool:
        """Continue from the checkpoint at ``path`` if it belongs to this run (same key)."""
        if not path.exists():
            return False
        ckpt = torch.load(path, weights_only=False)
        if ckpt.get("hash") != self.key:
            return False
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        torch.set_rng_state(ckpt["rng"])
        self.state = ckpt["state"]
        return True

    def step(self, srcs: list[list[int]], tgts: list[list[int]], pad_id: int) -> float:
        """One optimiser step on a batch; returns its loss."""
        loss, n_tokens = _train_step(self.model, srcs, tgts, pad_id, self.config.label_smoothing)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.state["batch"] += 1
        self.state["tokens"] += n_tokens
        return loss.item()


def _train_loop(run: _TrainingRun, srcs: list[list[int]], tgts: list[list[int]],
                pad_id: int, time_budget_s: float, ckpt_path: Path) -> None:
    """Epochs of shuffled token batches until the time budget or ``max_epochs``; checkpoints
    every ``checkpoint_every_s`` and on Ctrl-C."""
    config, state = run.config, run.state
    batches = _token_batches(srcs, tgts, config.max_tokens)
    bar = tqdm(total=round(time_budget_s), initial=round(state["elapsed_s"]), unit="s",
               desc="training", bar_format="{l_bar}{bar}| {n:.0f}/{total} s{postfix}")
    start = last_ckpt = time.perf_counter()
    start -= state["elapsed_s"]
    run.model.train()
    try:
        while state["epoch"] < config.max_epochs and state["elapsed_s"] < time_budget_s:
            order = list(range(len(batches)))
            random.Random(run.seed * 1_000_003 + state["epoch"]).shuffle(order)
            for b in order[state["batch"]:]:
                loss = run.step([srcs[i] for i in batches[b]], [tgts[i] for i in batches[b]],
                                pad_id)
                state["elapsed_s"] = time.perf_counter() - start
                bar.update(round(state["elapsed_s"]) - bar.n)
                bar.set_postfix(epoch=state["epoch"], loss=f"{loss:.2f}", refresh=False,
                                tgt_tok_s=f"{state['tokens'] / state['elapsed_s']:.0f}")
                if state["elapsed_s"] >= time_budget_s:
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


def _cache_key(split: DemoSplit, codec: TextCodec, config: BaseModelConfig, seed: int,
               time_budget_s: float) -> str:
    return _sha256({"config": dataclasses.asdict(config), "seed": seed,
                    "time_budget_s": time_budget_s,
                    "tokenizer": hashlib.sha256(codec.to_json().encode()).hexdigest(),
                    "data": _sha256(split.general_train)})


def train_base_model(split: DemoSplit, codec: TextCodec, cache_dir: str | Path,
                     time_budget_s: float = 240.0, seed: int = 0, log: Log = print,
                     config: BaseModelConfig = BaseModelConfig(),
                     threads: int | None = None) -> MarianMTModel:
    """Train the base model on ``split.general_train``, or load it from ``cache_dir``.

    AdamW with inverse-sqrt warmup and label smoothing, length-bucketed token batches,
    until ``time_budget_s`` of training or ``config.max_epochs``. The result goes to
    ``cache_dir/base_model`` (weights, tokenizer.json, train_meta.json with the hash of
    config, seed, budget, tokenizer and data); a cache whose hash matches is loaded instead
    of training. A checkpoint (``cache_dir/base_model.ckpt``) is written every
    ``config.checkpoint_every_s`` and on Ctrl-C, and the next call resumes from it. Uses
    ``threads`` (default: all) CPU threads.
    """
    torch.set_num_threads(threads or os.cpu_count() or 1)
    cache_dir = Path(cache_dir)
    final_dir, ckpt_path = cache_dir / "base_model", cache_dir / "base_model.ckpt"
    key = _cache_key(split, codec, config, seed, time_budget_s)
    meta_path = final_dir / "train_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("hash") == key:
        log(f"base model: loaded from {final_dir} (trained {meta['steps']} steps in "
            f"{meta['train_seconds']:.0f} s, {meta['target_tokens'] / meta['train_seconds']:.0f}"
            f" target tokens/s)")
        return MarianMTModel.from_pretrained(final_dir).eval()

    run = _TrainingRun(codec.vocab_size, config, seed, key)
    if run.restore(ckpt_path):
        log(f"base model: resuming from {ckpt_path} at step {run.state['step']}")
    srcs = codec.encode_rows([s for s, _ in split.general_train], config.max_positions)
    tgts = codec.encode_rows([t for _, t in split.general_train], config.max_positions)
    n_params = sum(p.numel() for p in run.model.parameters())
    log(f"base model: {n_params / 1e6:.2f}M parameters, {len(srcs)} pairs, budget "
        f"{time_budget_s:.0f} s, {torch.get_num_threads()} threads")
    _train_loop(run, srcs, tgts, codec.pad_id, time_budget_s, ckpt_path)
    state = run.state
    log(f"base model: {state['step']} steps, {state['epoch']} full epochs, "
        f"{state['elapsed_s']:.0f} s, {state['tokens'] / state['elapsed_s']:.0f} target tokens/s")

    meta = {"hash": key, "config": dataclasses.asdict(config), "seed": seed,
            "time_budget_s": time_budget_s, "steps": state["step"],
            "train_seconds": state["elapsed_s"], "target_tokens": state["tokens"],
            "parameters": n_params}

    def write(path: Path) -> None:
        run.model.save_pretrained(path)
        codec.save(path / "tokenizer.json")
        (path / "train_meta.json").write_text(json.dumps(meta, indent=2))
    _save_atomic(write, final_dir)
    ckpt_path.unlink(missing_ok=True)
    log(f"base model: saved to {final_dir}")
    return run.model


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


# ============================================================================================
# kNN-MT on the in-domain (PostgreSQL) catalogs
# ============================================================================================

KNN_K = 8
LAMBDA_GRID = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
IVF_LISTS = 256   # at most; fewer for small datastores (faiss needs N >= lists)
IVF_NPROBE = 16


def ivf_factory(n: int) -> str:
    """IVF with exact (Flat) lists: 256 lists for the demo's ~130k entries."""
    return f"IVF{max(1, min(IVF_LISTS, int(math.sqrt(n))))},Flat"


def export_hf_tokenizer(codec: TextCodec, path: str | Path) -> None:
    """Save the codec as a transformers tokenizer next to the model, so that
    ``AutoTokenizer.from_pretrained(path)`` (and the ``knnfast`` CLI) can use the model dir."""
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=codec.tokenizer, pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>")
    tok.save_pretrained(str(path))


def load_cached_model(cache_dir: str | Path = None):
    """(model, codec) of a finished demo run, from ``cache_dir/base_model``."""
    path = Path(cache_dir or CACHE_DIR) / "base_model"
    if not (path / "tokenizer.json").exists():
        raise FileNotFoundError(f"no cached demo model in {path}; run `make demo` first")
    return MarianMTModel.from_pretrained(path).eval(), TextCodec.load(path / "tokenizer.json")


def load_split(cache_dir: str | Path = None) -> DemoSplit:
    """The demo's corpus split (recomputed from the catalogs; deterministic)."""
    del cache_dir
    return split_domains(load_catalogs())


def _examples(codec: TextCodec, pairs: list[Pair], max_len: int) -> list[tuple[list[int], list[int]]]:
    src = codec.encode_rows([s for s, _ in pairs], max_len)
    tgt = codec.encode_rows([t for _, t in pairs], max_len)
    return list(zip(src, tgt))


def build_in_domain_datastore(model: MarianMTModel, codec: TextCodec, split: DemoSplit,
                              cache_dir: Path, log: Log) -> "Datastore":
    """Teacher-forced datastore over ``split.in_train`` + an IVF index (cached, resumable)."""
    import knnfast
    from knnfast import hf
    path = cache_dir / "datastore"
    stamp = _sha256({"model": _model_stamp(cache_dir), "pairs": len(split.in_train),
                     "first": split.in_train[:3], "index": [IVF_LISTS, IVF_NPROBE]})
    if (path / "index.faiss").exists():
        ds = knnfast.Datastore.open(path)
        if ds.meta.get("extra", {}).get("demo_stamp") == stamp:
            log(f"datastore: loaded from cache {path} ({len(ds):,} entries)")
            ds.load_index()
            return ds
    start = time.perf_counter()
    examples = _examples(codec, split.in_train, model.config.max_position_embeddings)
    ds = hf.build_datastore(model, examples, str(path), hidden="ffn", batch_size=64,
                            model_id="knnfast-demo-marian", resume=True,
                            overwrite=(path / "meta.json").exists())
    ds.meta.setdefault("extra", {})["demo_stamp"] = stamp
    _rewrite_meta(ds)
    built = time.perf_counter() - start
    start = time.perf_counter()
    ds.build_index(ivf_factory(len(ds)), nprobe=IVF_NPROBE, progress=False)
    log(f"datastore: {len(ds):,} entries from {len(examples):,} in-domain pairs in {built:.1f} s; "
        f"index {ivf_factory(len(ds))} (nprobe {IVF_NPROBE}) in {time.perf_counter() - start:.1f} s")
    return ds


def _rewrite_meta(ds) -> None:
    from knnfast.datastore import _fsync_write_json
    _fsync_write_json(str(Path(ds.path) / "meta.json"), ds.meta)


def _model_stamp(cache_dir: Path) -> str:
    meta = cache_dir / "base_model" / "train_meta.json"
    return meta.read_text() if meta.exists() else ""


@torch.inference_mode()
def translate_knn(model: MarianMTModel, codec: TextCodec, sources: list[str], decoder,
                  batch_size: int = 16, num_beams: int = 4) -> tuple[list[str], float]:
    """(translations, seconds) with kNN mixed into every beam-search step (``decoder=None``:
    the bare model through the same code path)."""
    from knnfast import hf
    max_positions = model.config.max_position_embeddings
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    start = time.perf_counter()
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        ids, mask = codec.encode_batch([sources[i] for i in chunk], max_positions)
        limit = min(max_positions, 2 * ids.shape[1] + 10)
        gen = hf.generate(model, decoder, input_ids=ids, attention_mask=mask,
                          num_beams=num_beams, do_sample=False, max_new_tokens=limit)
        for i, row in zip(chunk, gen):
            out[i] = codec.decode(row)
    return out, time.perf_counter() - start


def tune_knn(model, codec, split, ds, log: Log) -> dict:
    """λ/τ/k on in_dev from one retrieval (gold-token NLL grid)."""
    from knnfast import hf
    start = time.perf_counter()
    examples = _examples(codec, split.in_dev, model.config.max_position_embeddings)
    res = hf.tune(model, examples, ds, ks=(4, 8, 16), temperatures=(1.0, 10.0, 100.0),
                  lams=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8), batch_size=64, exact=True,
                  progress=False)
    b = res.best
    log(f"tune (in_dev, {len(res.grid)} cells, one retrieval, {time.perf_counter() - start:.1f} s): "
        f"k={b['k']} τ={b['temperature']:g} λ={b['lam']:g}  dev NLL {res.base_nll:.3f} → {b['nll']:.3f}")
    return {"best": b, "base_nll": res.base_nll}


def train_adaptive(model, codec, split, ds, temperature: float, cache_dir: Path, log: Log):
    """Meta-k network (Zheng et al. 2021) trained on in_dev after one retrieval."""
    import knnfast
    from knnfast import hf
    start = time.perf_counter()
    torch.manual_seed(0)  # the meta-k network's initial weights
    dec = knnfast.AdaptiveKNNDecoder(ds, max_k=KNN_K, temperature=temperature, exact=False,
                                     rescore=True)
    examples = _examples(codec, split.in_dev, model.config.max_position_embeddings)
    feats = hf.collect_gold_features(model, examples, dec, batch_size=64, progress=False)
    with _threads(1):  # tiny network: one thread avoids OpenMP overhead on 2 cores
        info = dec.fit(feats.base_gold_logp, feats.targets, feats.neighbours, epochs=30,
                       progress=False)
    dec.save(cache_dir / "adaptive")
    log(f"adaptive kNN-MT: meta-k network trained on {feats.targets.numel():,} in_dev positions, "
        f"{info['updates']} updates in {time.perf_counter() - start:.1f} s; held-out NLL "
        f"{info['valid_nll_before']:.3f} → {info['valid_nll_after']:.3f}")
    return dec, info


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def plot_bleu_vs_lambda(points: list[tuple[float, float]], base_bleu: float, path: Path,
                        title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="kNN-MT")
    ax.axhline(base_bleu, color="gray", ls="--", label=f"base model ({base_bleu:.1f})")
    ax.set_xlabel("λ (kNN weight)")
    ax.set_ylabel("BLEU")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_knn_mt(model, codec, split, cache_dir: Path, out_dir: Path, log: Log) -> dict:
    """Datastore, tuning, adaptive network, the three systems on in_test, speed, λ sweep."""
    import knnfast
    ds = build_in_domain_datastore(model, codec, split, cache_dir, log)
    tuned = tune_knn(model, codec, split, ds, log)
    k, tau, lam = tuned["best"]["k"], tuned["best"]["temperature"], tuned["best"]["lam"]
    adaptive, adaptive_info = train_adaptive(model, codec, split, ds, tau, cache_dir, log)
    sources = [s for s, _ in split.in_test]
    refs = [t for _, t in split.in_test]
    systems = {
        "base": None,
        "kNN-MT": knnfast.KNNDecoder(ds, k=k, temperature=tau, lam=lam, exact=False),
        "adaptive kNN-MT": adaptive,
        "kNN-MT (reference path)": knnfast.KNNDecoder(ds, k=k, temperature=tau, lam=lam,
                                                      exact=False, backend="reference"),
    }
    results = {}
    for name, dec in systems.items():
        hyps, secs = translate_knn(model, codec, sources, dec)
        scores = evaluate_bleu(hyps, refs)
        results[name] = dict(scores, seconds=secs, sentences_per_s=len(sources) / secs)
        log(f"  {name:24s} BLEU {scores['bleu']:5.1f}  chrF {scores['chrf']:5.1f}  "
            f"{len(sources) / secs:6.1f} sentences/s")
        if name == "kNN-MT":
            examples_out = [{"source": s, "reference": r, "base": None, "knn": h}
                            for s, r, h in list(zip(sources, refs, hyps))[:5]]
        if name == "base":
            base_hyps = hyps
    for e, b in zip(examples_out, base_hyps):
        e["base"] = b
    sweep_sources = sources[:200]
    points = []
    for lam_i in LAMBDA_GRID:
        dec = knnfast.KNNDecoder(ds, k=k, temperature=tau, lam=lam_i, exact=False)
        hyps, _ = translate_knn(model, codec, sweep_sources, dec)
        points.append((lam_i, evaluate_bleu(hyps, refs[:200])["bleu"]))
    log("  BLEU vs λ (first 200 in_test): " + ", ".join(f"{a:g}: {b:.1f}" for a, b in points))
    plot_bleu_vs_lambda(points, points[0][1], out_dir / "bleu_vs_lambda.png",
                        f"kNN-MT on PostgreSQL messages (k={k}, τ={tau:g})")
    return {"datastore": {"entries": len(ds), "dim": ds.dim, "index": ivf_factory(len(ds)),
                          "nprobe": IVF_NPROBE, "path": str(ds.path)},
            "tuned": tuned, "adaptive": {k_: v for k_, v in adaptive_info.items() if k_ != "train_loss"},
            "systems": results, "bleu_vs_lambda": points, "examples": examples_out}


# ============================================================================================
# Fallback: kNN-LM on text that ships with Python (when no gettext catalogs are installed)
# ============================================================================================

LM_CHUNK = 96


def python_doc_chunks(seed: int = 0) -> tuple[list[str], list[str], list[str]]:
    """(train, dev, test) paragraphs of the Python language reference shipped with CPython
    (``pydoc_data.topics``), split by topic; no dev/test paragraph occurs in train."""
    from pydoc_data.topics import topics
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    n_test, n_dev = max(1, len(names) // 5), max(1, len(names) // 10)
    parts = {"test": names[:n_test], "dev": names[n_test:n_test + n_dev],
             "train": names[n_test + n_dev:]}

    def paragraphs(keys):
        out = []
        for key in keys:
            out += [" ".join(p.split()) for p in topics[key].split("\n\n") if len(p.split()) >= 4]
        return out
    # Topics share paragraphs verbatim: a paragraph seen in training never counts as held out.
    train = list(dict.fromkeys(paragraphs(parts["train"])))
    seen = set(train)
    dev = [p for p in dict.fromkeys(paragraphs(parts["dev"])) if p not in seen]
    seen.update(dev)
    test = [p for p in dict.fromkeys(paragraphs(parts["test"])) if p not in seen]
    return train, dev, test


def _lm_examples(codec: TextCodec, texts: list[str]) -> list[list[int]]:
    rows = []
    for ids in (codec.encode(t) for t in texts):
        rows += [ids[s:s + LM_CHUNK] for s in range(0, len(ids), LM_CHUNK) if len(ids[s:s + LM_CHUNK]) >= 2]
    return rows


def train_small_lm(examples: list[list[int]], vocab_size: int, cache_dir: Path,
                   time_budget_s: float, log: Log):
    """A 2-layer GPT-2 shape trained for ``time_budget_s`` (cached in cache_dir/lm)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    path = cache_dir / "lm"
    stamp = _sha256({"n": len(examples), "first": examples[:2], "v": vocab_size,
                     "budget": time_budget_s})
    if (path / "stamp.json").exists() and json.loads((path / "stamp.json").read_text()) == stamp:
        log(f"LM: loaded from cache {path}")
        return GPT2LMHeadModel.from_pretrained(path).eval()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=192, n_layer=3, n_head=4,
                                       n_positions=LM_CHUNK, pad_token_id=0, eos_token_id=1,
                                       bos_token_id=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start, step = time.perf_counter(), 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [order[s:s + 32] for s in range(0, len(order), 32)]
    rng = random.Random(0)
    bar = tqdm(total=int(time_budget_s), desc="train LM", unit="s", leave=False)
    model.train()
    while time.perf_counter() - start < time_budget_s:
        rng.shuffle(batches)
        for b in batches:
            rows = [examples[i] for i in b]
            ids = _pad(rows, 0)
            labels = ids.masked_fill(_pad([[1] * len(r) for r in rows], 0) == 0, -100)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            bar.n = min(int(time.perf_counter() - start), int(time_budget_s))
            bar.set_postfix(loss=f"{loss.item():.2f}")
            bar.refresh()
            if time.perf_counter() - start >= time_budget_s:
                break
    bar.close()
    model.eval()

    def write(p: Path) -> None:
        model.save_pretrained(p)
        (p / "stamp.json").write_text(json.dumps(stamp))
    _save_atomic(write, path)
    log(f"LM: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {step} steps "
        f"in {time.perf_counter() - start:.0f} s")
    return model


def run_knn_lm_fallback(cache_dir: Path, out_dir: Path, time_budget_s: float, log: Log) -> dict:
    """kNN-LM on the Python language reference: base vs kNN-LM perplexity on unseen topics."""
    import knnfast
    from knnfast import hf
    train, dev, test = python_doc_chunks()
    codec = TextCodec(train_tokenizer(train, vocab_size=4000))
    tr, dv, te = (_lm_examples(codec, x) for x in (train, dev, test))
    log(f"corpus: Python language reference (pydoc_data.topics): {len(tr)} train / {len(dv)} dev / "
        f"{len(te)} test chunks of ≤ {LM_CHUNK} tokens")
    model = train_small_lm(tr, codec.vocab_size, cache_dir, min(time_budget_s, 120.0), log)
    ds = hf.build_datastore(model, tr, str(cache_dir / "lm_datastore"), overwrite=True,
                            batch_size=32, progress=False)
    tuned = hf.tune(model, dv, ds, ks=(16, 64), temperatures=(1.0, 10.0, 100.0),
                    lams=(0.1, 0.25, 0.4, 0.6), batch_size=32, progress=False)
    b = tuned.best
    res = {}
    for backend in ("fused", "reference"):
        dec = knnfast.KNNDecoder(ds, k=b["k"], temperature=b["temperature"], lam=b["lam"],
                                 backend=backend)
        r = hf.evaluate_lm(model, te, dec, batch_size=32, progress=False)
        res[backend] = {"base_ppl": r.base_ppl, "knn_ppl": r.knn_ppl, "oracle_ppl": r.oracle_ppl,
                        "tokens": r.tokens, "tokens_per_s": r.tokens_per_s}
    f = res["fused"]
    log(f"kNN-LM on unseen topics ({f['tokens']:,} tokens, datastore {len(ds):,} entries, "
        f"k={b['k']} τ={b['temperature']:g} λ={b['lam']:g}): perplexity {f['base_ppl']:.1f} → "
        f"{f['knn_ppl']:.1f} (oracle {f['oracle_ppl']:.1f}); {f['tokens_per_s']:,.0f} tokens/s fused, "
        f"{res['reference']['tokens_per_s']:,.0f} reference")
    return {"mode": "knn-lm fallback", "tuned": b, "results": res, "datastore_entries": len(ds)}


# ============================================================================================
# main
# ============================================================================================

REPO_ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO_ROOT / ".cache" / "demo"


def _write_report(out_dir: Path, report: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    (out_dir / "results.md").write_text(render_report(report))


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
             f"- datastore: {report['knn']['datastore']['entries']:,} entries "
             f"(in_train target tokens), D={report['knn']['datastore']['dim']}, "
             f"index {report['knn']['datastore']['index']} nprobe {report['knn']['datastore']['nprobe']}",
             f"- tuned on in_dev: {report['knn']['tuned']['best']}", "",
             "| system (in_test, beam 4, batch 16) | BLEU | chrF | sentences/s |", "|---|---:|---:|---:|"]
    for name, r in report["knn"]["systems"].items():
        lines.append(f"| {name} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['sentences_per_s']:.1f} |")
    lines += ["", "BLEU against λ (first 200 in_test sentences): "
              + ", ".join(f"λ={a:g}: {b:.1f}" for a, b in report["knn"]["bleu_vs_lambda"]),
              "", "![BLEU vs λ](bleu_vs_lambda.png)", "", "## Examples", ""]
    for e in report["knn"]["examples"]:
        lines += [f"- source: {e['source']}", f"  - reference: {e['reference']}",
                  f"  - base: {e['base']}", f"  - kNN-MT: {e['knn']}"]
    return "\n".join(lines) + "\n"


def _machine() -> str:
    import platform
    return (f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def main(cache_dir: str | Path | None = None, time_budget_s: float = 240.0,
         out_dir: str | Path = "demo-results", log: Log = print,
         locale_dir: str | Path | None = None) -> dict:
    """The whole demo; returns the report (also written to out_dir). Without the German
    gettext catalogs (``locale_dir``), it says what to install and runs the kNN-LM
    fallback on the Python language reference instead."""
    cache_dir = Path(cache_dir or CACHE_DIR)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        catalogs = load_catalogs(locale_dir) if locale_dir else load_catalogs()
    except FileNotFoundError as e:
        log(f"gettext catalogs not available: {e}")
        log("falling back to a kNN-LM demo on the Python language reference shipped with Python")
        report = run_knn_lm_fallback(cache_dir, out_dir, time_budget_s, log)
        report["why"] = str(e)
        _write_report(out_dir, report)
        return report
    split = split_domains(catalogs)
    log(f"corpus: {split.sizes()}")
    codec = TextCodec(train_tokenizer(t for pair in split.general_train for t in pair))
    model = train_base_model(split, codec, cache_dir, time_budget_s=time_budget_s, log=log)
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
        "knn": knn, "seconds": time.perf_counter() - t_all,
    }
    _write_report(out_dir, report)
    log(f"demo done in {report['seconds']:.0f} s; results in {out_dir}/ (results.md, results.json, "
        f"bleu_vs_lambda.png); model + datastore cached in {cache_dir}/")
    return report


if __name__ == "__main__":
    main()
