"""The arms of ``knnfast reproduce ink`` (``ink.py`` writes the report): INK's settings and
ablations, the kNN-MT baselines, the CE adapter arm, the INK arms (each trained by
``knnfast.methods.ink.train_ink``, resumable per epoch), INK + kNN, and the measurements
behind the memory and kNN-accuracy tables. Each function returns JSON for a stage."""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

import knnfast
from knnfast.integrations import hf
from knnfast.methods.analysis import retrieval_by_frequency, target_counts
from knnfast.methods.ink import ADAPTERS_ATTR, add_adapters, train_ink
from knnfast.storage.checkpoint import load_checkpoint

from ..demo.base_model import seq2seq_loss
from ..demo.knn_mt import IVF_NPROBE, ivf_factory, train_adaptive, train_robust, tune_knn
from .mt_world import MTWorld, save_model
from .runner import StudyRun

ACCURACY_EDGES = (0, 10, 100, 1000)   # gold-token frequency in in_train (the datastore's values)


@dataclasses.dataclass(frozen=True)
class InkSettings:
    """INK's training at one scale. k, α, β: the paper's (DESIGN §6: k = 32, α, β ∈ {0.1,
    0.2}); epochs sized to the 30-minute budget (each re-encodes in_train); the adapter
    bottleneck d_model / 2 and the training retrieval's nprobe (half the decoding one: the
    search is the largest part of an update) are our choices."""
    epochs: int = 2
    batch_size: int = 32
    k: int = 32
    alpha: float = 0.1
    beta: float = 0.1
    lr: float = 1e-3
    adapter_fraction: int = 2
    train_nprobe: int = 8          # IVF lists searched per training query (decoding: 16)
    accuracy_k: int = 8            # neighbours behind the kNN-accuracy table
    min_positions: int = 20        # buckets with fewer test positions carry no verdict
    decoded: Optional[int] = None  # in_test sentences decoded per system (None: all)


FULL_INK = InkSettings()
# quick: 8 sentences per system and k = 8 keep the tiny run within seconds
QUICK_INK = InkSettings(k=8, min_positions=1, decoded=8)


@dataclasses.dataclass(frozen=True)
class Arm:
    """An INK training run: its file name, loss weights switched on, datastore refresh."""
    slug: str
    use_li: bool = True
    use_lr: bool = True
    refresh: bool = True
    first_epoch_of: Optional[str] = None   # the arm whose first epoch this one's equals

    def alpha(self, s: InkSettings) -> float:
        return s.alpha if self.use_li else 0.0

    def beta(self, s: InkSettings) -> float:
        return s.beta if self.use_lr else 0.0


ARMS = {"INK": Arm("ink"), "INK w/o L_i": Arm("ink_no_li", use_li=False),
        "INK w/o L_r": Arm("ink_no_lr", use_lr=False),
        "INK w/o refresh": Arm("ink_no_refresh", refresh=False, first_epoch_of="ink")}
CHECKPOINT = "ink_ckpt.pt"   # train_ink's checkpoint in an arm's workdir
KNN_SYSTEMS = ("kNN-MT", "adaptive kNN-MT", "robust kNN-MT")

# Rough costs in seconds on the idle 2-core machine (full scale), for the plan printed at the
# start only: the shared base model + datastore, tuning and the adaptive / robust fits, one INK
# update (32 pairs; measured at one thread on a busy machine: forward 0.17, IVF search 0.24 at
# nprobe 16, loss 0.05, backward 0.09), one encoding of in_train, one CE update, one decoding
# of in_test without / with kNN, the kNN-accuracy stage.
ESTIMATE_S = {"shared": 570, "fits": 100, "ink_update": 0.25, "encode": 60, "ce_update": 0.12,
              "decode": 11, "decode_knn": 20, "accuracy": 30}


def settings(run: StudyRun) -> InkSettings:
    return QUICK_INK if run.quick else FULL_INK


def adapter_size(world: MTWorld, s: InkSettings) -> int:
    return max(1, world.model.config.d_model // s.adapter_fraction)


def ink_updates(world: MTWorld, s: InkSettings) -> int:
    """INK's optimizer updates: one per batch of in_train pairs, every epoch."""
    return s.epochs * math.ceil(len(world.split.in_train) / s.batch_size)


def test_pairs(world: MTWorld, s: InkSettings) -> list:
    """The in_test pairs every system translates."""
    return world.split.in_test[:s.decoded] if s.decoded else world.split.in_test


def evaluate(world: MTWorld, model, pairs: list, decoder=None) -> dict:
    """world.evaluate after one warm-up sentence: the first beam search of a process (or over
    a new index) pays one-off costs that would otherwise count against one system's speed."""
    world.evaluate(model, pairs[:1], decoder)
    return scores_of(world.evaluate(model, pairs, decoder))


def scores_of(result: dict) -> dict:
    """An evaluation without its hypotheses, but with the first 3 (the stage JSON stays
    small)."""
    return {k: v for k, v in result.items() if k != "hyps"} | {"first_hyps": result["hyps"][:3]}


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def datastore_bytes(ds: knnfast.Datastore) -> dict:
    """Bytes on disk of what kNN decoding reads: keys + values + key norms, and the IVF
    index (which keeps its own float32 copy of the keys)."""
    index = Path(ds.path) / "index.faiss"
    return {"entries": len(ds), "store": int(sum(ds.meta["bytes"].values())),
            "index": index.stat().st_size if index.exists() else 0}


def log_plan(run: StudyRun, world: MTWorld, s: InkSettings) -> None:
    """What the run does, and (full scale) a rough time estimate from a cold cache."""
    steps, e = ink_updates(world, s), ESTIMATE_S
    epochs = len(ARMS) * s.epochs - sum(1 for a in ARMS.values() if a.first_epoch_of)
    encodes = sum(s.epochs - 1 for a in ARMS.values() if a.refresh) + 1  # + INK + kNN's
    est = (e["shared"] + e["fits"] + epochs * steps // s.epochs * e["ink_update"]
           + encodes * e["encode"] + steps * e["ce_update"] + 6 * e["decode"]
           + 4 * e["decode_knn"] + e["accuracy"])
    run.log(f"[ink] plan: {len(ARMS)} INK arms × {s.epochs} epochs of {steps // s.epochs} "
            f"updates ({epochs} epochs trained, {encodes} encodings of in_train), an adapter "
            f"arm of {steps} CE updates, 10 systems decoded on {len(test_pairs(world, s))} "
            f"in_test sentences"
            + ("" if run.quick else f"; roughly {est / 60:.0f} min from a cold cache on an idle "
               "2-core machine (cached stages are skipped)"))


# ------------------------------------------------------------------------------ baselines


def baselines(run: StudyRun, world: MTWorld, s: InkSettings, tuned: dict) -> dict:
    """base, kNN-MT, adaptive and robust kNN-MT on in_test (each its own stage)."""
    ds, test = world.datastore, test_pairs(world, s)
    b = tuned["best"]
    args = (world.model, world.codec, world.split, ds)

    def knn():
        dec = knnfast.KNNDecoder(ds, k=b["k"], temperature=b["temperature"], lam=b["lam"],
                                 exact=False)
        return evaluate(world, world.model, test, dec)

    def adaptive():
        dec, info = train_adaptive(*args, b["temperature"], run.cache, run.log)
        return evaluate(world, world.model, test, dec) | {
            "extra_params": count_params(dec.network), "extra_bytes": 0,
            "fit": {k: v for k, v in info.items() if k != "train_loss"}}

    def robust():
        dec, info = train_robust(*args, run.cache, run.log)
        return evaluate(world, world.model, test, dec) | {
            "extra_params": count_params(dec.network),
            "extra_bytes": dec.entry_logp.numel() * dec.entry_logp.element_size(),
            "fit": {k: v for k, v in info.items() if k != "train_loss"}}

    return {"base": run.stage("eval_base", lambda: evaluate(world, world.model, test)),
            "kNN-MT": run.stage("eval_knn_mt", knn),
            "adaptive kNN-MT": run.stage("eval_adaptive", adaptive),
            "robust kNN-MT": run.stage("eval_robust", robust)}


# ------------------------------------------------------------------------------ adapters


def adapted_model(world: MTWorld, s: InkSettings):
    """A fresh copy of the base model with seeded, zero-output adapters (only they train)."""
    torch.manual_seed(0)
    model = world.fresh_model()
    add_adapters(model, size=adapter_size(world, s))
    return model


def adapter_arm(run: StudyRun, world: MTWorld, s: InkSettings) -> dict:
    """The adapters trained with plain CE (INK's L_a alone) for as many updates as INK
    (weights cached)."""
    model = adapted_model(world, s)
    path = run.cache / "adapter" / "model.pt"
    info_path = path.with_suffix(".json")
    if path.exists() and info_path.exists():
        model.load_state_dict(torch.load(path))
        info = json.loads(info_path.read_text())
    else:
        trainable = [p for p in model.parameters() if p.requires_grad]
        pad = world.codec.pad_id

        def plain_ce(m, srcs, tgts, _ids):  # INK's L_a: CE without label smoothing
            return seq2seq_loss(m, srcs, tgts, pad, 0.0)[0]
        info = world.fine_tune(model, trainable, world.split.in_train, loss_fn=plain_ce,
                               updates=ink_updates(world, s), lr=s.lr, desc="adapter (CE)")
        save_model(model, path)
        info_path.write_text(json.dumps(info))
    return evaluate(world, model, test_pairs(world, s)) | {"train": info}


def ink_model(run: StudyRun, world: MTWorld, s: InkSettings, arm: Arm,
              epochs: Optional[int] = None):
    """(model, per-epoch log) of an INK arm after ``epochs`` (default: all): trained, or
    resumed from its checkpoint (``train_ink`` continues after the last finished epoch, so a
    finished arm only loads). The first epoch searches the base datastore: adapters start as
    the identity, so it is what encoding in_train again would give."""
    model = adapted_model(world, s)
    history = train_ink(model, world.examples(world.split.in_train), str(workdir(run, arm)),
                        epochs=epochs or s.epochs, batch_size=s.batch_size, k=s.k,
                        alpha=arm.alpha(s), beta=arm.beta(s), lr=s.lr,
                        index_factory=ivf_factory(len(world.datastore)),
                        nprobe=s.train_nprobe, refresh=arm.refresh,
                        initial_datastore=world.datastore, log=run.log)
    model.eval()
    return model, history


def workdir(run: StudyRun, arm: Arm) -> Path:
    return run.cache / arm.slug


def train_arm(run: StudyRun, world: MTWorld, s: InkSettings, arm: Arm) -> dict:
    """Train one INK arm. INK w/o refresh differs from INK only from the second epoch on (same
    loss, first datastore and batch order), so INK's first-epoch checkpoint starts it."""
    start = time.perf_counter()
    done = len(checkpoint_history(workdir(run, arm) / CHECKPOINT))  # epochs trained before
    shares = [a for a in ARMS.values() if a.first_epoch_of == arm.slug]
    if shares:
        ink_model(run, world, s, arm, epochs=1)
        source = workdir(run, arm) / CHECKPOINT
        for other in shares:  # only a first-epoch checkpoint (a rerun may find a later one)
            target = workdir(run, other) / CHECKPOINT
            if not target.exists() and len(checkpoint_history(source)) == 1:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
    per_epoch = ink_updates(world, s) // s.epochs
    history = ink_model(run, world, s, arm)[1]
    return {"history": history, "seconds": time.perf_counter() - start,
            "updates": ink_updates(world, s),
            "updates_here": (len(history) - done) * per_epoch, "alpha": arm.alpha(s),
            "beta": arm.beta(s), "refresh": arm.refresh, "first_epoch_of": arm.first_epoch_of}


def checkpoint_history(checkpoint: Path) -> list:
    """The per-epoch log in a train_ink checkpoint ([] when there is none)."""
    saved = load_checkpoint(checkpoint, "knnfast reproduce ink", "the arm trains again")
    return saved["history"] if saved is not None else []


def ink_arms(run: StudyRun, world: MTWorld, s: InkSettings) -> tuple[dict, dict]:
    """(training logs, in_test scores) of every INK arm, two stages per arm."""
    trained, scores = {}, {}
    for name, arm in ARMS.items():
        def decode(arm=arm):
            return evaluate(world, ink_model(run, world, s, arm)[0], test_pairs(world, s))
        trained[name] = run.stage(f"train_{arm.slug}",
                                  lambda arm=arm: train_arm(run, world, s, arm))
        scores[name] = run.stage(f"eval_{arm.slug}", decode)
    return trained, scores


def ink_datastore(run: StudyRun, world: MTWorld, model) -> knnfast.Datastore:
    """in_train re-encoded by the final INK model, with the base datastore's IVF index kind
    (cached; a killed build resumes)."""
    path = run.cache / "ink_datastore"
    if (path / "meta.json").exists():  # finalized
        ds = knnfast.Datastore.open(path)
    else:
        ds = hf.build_datastore(model, world.examples(world.split.in_train), str(path),
                                hidden="ffn", batch_size=64, model_id="knnfast-reproduce-ink",
                                resume=True, progress=False)
    if ds.has_saved_index():
        ds.load_index()
    else:
        ds.build_index(ivf_factory(len(ds)), nprobe=IVF_NPROBE, progress=False)
    return ds


def hybrid(run: StudyRun, world: MTWorld, s: InkSettings) -> dict:
    """INK + kNN: kNN-MT over the INK model's own datastore, λ/τ/k re-tuned on in_dev."""
    model = ink_model(run, world, s, ARMS["INK"])[0]
    ds = ink_datastore(run, world, model)
    tuned = tune_knn(model, world.codec, world.split, ds, run.log)
    b = tuned["best"]
    dec = knnfast.KNNDecoder(ds, k=b["k"], temperature=b["temperature"], lam=b["lam"],
                             exact=False)
    return evaluate(world, model, test_pairs(world, s), dec) | {"tuned": tuned}


def accuracy(run: StudyRun, world: MTWorld, s: InkSettings) -> dict:
    """Mean kNN accuracy and recall@k by gold-token frequency (in_test, exact search): base
    keys against the base datastore, INK keys against the INK datastore."""
    counts = target_counts(world.examples(world.split.in_train))
    test = world.examples(world.split.in_test)
    model = ink_model(run, world, s, ARMS["INK"])[0]
    out = {}
    for name, m, ds in (("base", world.model, world.datastore),
                        ("INK", model, ink_datastore(run, world, model))):
        buckets = retrieval_by_frequency(m, test, ds, counts, k=s.accuracy_k,
                                         edges=ACCURACY_EDGES, exact=True, batch_size=64)
        out[name] = [dataclasses.asdict(b) | {"label": b.label} for b in buckets]
    return out


def memory(run: StudyRun, world: MTWorld, s: InkSettings) -> dict:
    """What each system keeps beside the base model: datastores, indexes, networks."""
    adapters = getattr(adapted_model(world, s), ADAPTERS_ATTR)
    model = ink_model(run, world, s, ARMS["INK"])[0]
    return {"datastore": datastore_bytes(world.datastore),
            "ink_datastore": datastore_bytes(ink_datastore(run, world, model)),
            "adapter_params": count_params(adapters),
            "adapter_bytes": sum(p.numel() * p.element_size() for p in adapters.parameters()),
            "base_params": count_params(world.model)}
