"""kNN-KD worked example on the demo's corpus and model (run `make demo` first).

The base Marian model of `make demo` was trained on general-domain gettext catalogs. Here it is
fine-tuned on the in-domain (PostgreSQL) training pairs twice, for the same number of updates:
once with plain label-smoothed cross-entropy, once with kNN-KD (Yang et al. 2022), whose
teacher is the kNN distribution over the in-domain datastore, searched once, offline, for every
target position. Both fine-tuned models then translate the held-out in-domain test set
*without* any datastore (plain-model decoding speed), next to the base model.

    python examples/knn_kd_demo.py                    # plain training loop
    python examples/knn_kd_demo.py --trainer          # the same through an HF Trainer subclass

Writes demo-results/knn_kd.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from pathlib import Path

import torch

import knnfast
from knnfast.app import demo
from knnfast.methods.kd import TeacherStore, knn_kd_trainer_class, seq2seq_batch, train_step

REPO = Path(__file__).resolve().parents[1]


def fine_tune(model, pairs, store, updates, batch_size, lr, seed, **loss_kwargs):
    """Plain loop: `updates` Adam steps over shuffled batches (kNN-KD when store is given)."""
    model = copy.deepcopy(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    order = list(range(len(pairs)))
    rng = random.Random(seed)
    losses, step = [], 0
    while step < updates:
        rng.shuffle(order)
        for s in range(0, len(order) - batch_size + 1, batch_size):
            losses.append(train_step(model, opt, pairs, order[s:s + batch_size], store, **loss_kwargs))
            step += 1
            if step >= updates:
                break
    return model.eval(), losses


def fine_tune_trainer(model, pairs, store, updates, batch_size, lr, out_dir, **loss_kwargs):
    """The same kNN-KD fine-tuning through transformers' Seq2SeqTrainer."""
    from transformers import Seq2SeqTrainingArguments

    def collate(rows):
        ids = [r["sentence_ids"] for r in rows]
        batch = seq2seq_batch(pairs, ids)
        batch["sentence_ids"] = torch.tensor(ids)
        return batch

    args = Seq2SeqTrainingArguments(output_dir=str(out_dir), max_steps=updates,
                                    per_device_train_batch_size=batch_size, learning_rate=lr,
                                    lr_scheduler_type="constant", remove_unused_columns=False,
                                    report_to=[], use_cpu=True, save_strategy="no",
                                    logging_strategy="no", seed=0)
    trainer = knn_kd_trainer_class()(model=copy.deepcopy(model), args=args,
                                     train_dataset=[{"sentence_ids": i} for i in range(len(pairs))],
                                     data_collator=collate, teacher_store=store,
                                     kd_kwargs=loss_kwargs)
    trainer.train()
    return trainer.model.eval()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=str(REPO / ".cache" / "demo"))
    p.add_argument("--out", default=str(REPO / "demo-results"))
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--trainer", action="store_true", help="fine-tune kNN-KD with the HF Trainer")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    try:
        model, codec = demo.load_cached_model(cache)
    except FileNotFoundError as e:
        sys.exit(f"{e}")
    split = demo.load_split()
    max_len = model.config.max_position_embeddings
    pairs = demo.pair_examples(codec, split.in_train, max_len)
    ds = knnfast.Datastore.open(cache / "datastore")   # captured from these pairs by make demo

    t0 = time.perf_counter()
    store = TeacherStore.build(model, ds, pairs, str(cache / "teacher"), k=args.k, exact=True,
                               overwrite=True, batch_size=64)
    build_s = time.perf_counter() - t0
    print(f"teacher store: {store.meta['positions']:,} positions x k={args.k} in {build_s:.1f} s")

    loss_kwargs = dict(temperature=args.temperature, label_smoothing=0.1)
    t0 = time.perf_counter()
    ce_model, _ = fine_tune(model, pairs, None, args.updates, args.batch_size, args.lr, 0,
                            label_smoothing=0.1)
    ce_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if args.trainer:
        kd_model = fine_tune_trainer(model, pairs, store, args.updates, args.batch_size, args.lr,
                                     cache / "trainer", **loss_kwargs)
    else:
        kd_model, _ = fine_tune(model, pairs, store, args.updates, args.batch_size, args.lr, 0,
                                **loss_kwargs)
    kd_s = time.perf_counter() - t0

    sources = [s for s, _ in split.in_test]
    refs = [t for _, t in split.in_test]
    results = {"teacher": {"positions": store.meta["positions"], "k": args.k,
                           "seconds": build_s, "temperature": args.temperature},
               "updates": args.updates, "batch_size": args.batch_size,
               "train_seconds": {"ce": ce_s, "knn_kd": kd_s}, "systems": {}}
    for name, m in (("base", model), ("fine-tuned CE", ce_model), ("fine-tuned kNN-KD", kd_model)):
        hyps, secs = demo.translate_knn(m, codec, sources, None)
        scores = demo.evaluate_bleu(hyps, refs)
        results["systems"][name] = dict(scores, sentences_per_s=len(sources) / secs)
        print(f"  {name:18s} BLEU {scores['bleu']:5.1f}  chrF {scores['chrf']:5.1f}  "
              f"{len(sources) / secs:5.1f} sentences/s (no datastore)")
    print(f"training time for {args.updates} updates: CE {ce_s:.0f} s, kNN-KD {kd_s:.0f} s")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "knn_kd.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
