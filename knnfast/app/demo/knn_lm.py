"""Fallback demo: kNN-LM on text that ships with Python (the language reference in
``pydoc_data``), when no gettext catalogs are installed."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

import knnfast
from knnfast.integrations import hf

from ..corpus import TextCodec, train_tokenizer
from .base_model import Log, pad_rows, save_atomic, sha256_json

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


LM_UPDATES = 1200


def train_small_lm(examples: list[list[int]], vocab_size: int, cache_dir: Path,
                   updates: int = LM_UPDATES, log: Log = print, *, n_embd: int = 192,
                   n_layer: int = 3, seed: int = 0, name: str = "lm"):
    """A small GPT-2 shape trained for a fixed number of seeded ``updates`` of 32 chunks
    (cached in ``cache_dir/<name>``; the same model on any machine and load)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    path = cache_dir / name
    stamp = sha256_json({"n": len(examples), "first": examples[:2], "v": vocab_size,
                         "updates": updates, "shape": [n_embd, n_layer], "seed": seed})
    if (path / "stamp.json").exists() and json.loads((path / "stamp.json").read_text()) == stamp:
        log(f"LM: loaded from cache {path}")
        return GPT2LMHeadModel.from_pretrained(path).eval()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer,
                                       n_head=4, n_positions=LM_CHUNK, pad_token_id=0,
                                       eos_token_id=1, bos_token_id=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [order[s:s + 32] for s in range(0, len(order), 32)]
    rng = random.Random(seed)
    bar = tqdm(total=updates, desc="train LM", unit="update", leave=False)
    model.train()
    while bar.n < updates:
        rng.shuffle(batches)
        for b in batches[:updates - bar.n]:
            rows = [examples[i] for i in b]
            ids = pad_rows(rows, 0)
            labels = ids.masked_fill(pad_rows([[1] * len(r) for r in rows], 0) == 0, -100)
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2f}")
    bar.close()
    model.eval()

    def write(p: Path) -> None:
        model.save_pretrained(p)
        (p / "stamp.json").write_text(json.dumps(stamp))
    save_atomic(write, path)
    log(f"LM: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {updates} "
        f"updates in {time.perf_counter() - start:.0f} s")
    return model


def run_knn_lm_fallback(cache_dir: Path, out_dir: Path, log: Log) -> dict:
    """kNN-LM on the Python language reference: base vs kNN-LM perplexity on unseen topics."""
    train, dev, test = python_doc_chunks()
    codec = TextCodec(train_tokenizer(train, vocab_size=4000))
    tr, dv, te = (_lm_examples(codec, x) for x in (train, dev, test))
    log(f"corpus: Python language reference (pydoc_data.topics): {len(tr)} train / {len(dv)} dev / "
        f"{len(te)} test chunks of ≤ {LM_CHUNK} tokens")
    model = train_small_lm(tr, codec.vocab_size, cache_dir, log=log)
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
