"""``knnfast reproduce knn-kd``: Nearest Neighbor Knowledge Distillation (Yang et al. 2022) in
miniature, on the demo's English→German gettext split (mt_world).

Arms, all from the same base model (general domain only) and, for the fine-tuned ones, the same
updates, batches, learning rate and seed on the in-domain training pairs:

- base model; kNN-MT (λ/τ/k tuned on in_dev, IVF search at every decoding step);
- CE fine-tuning (label-smoothed CE, ε = 0.1);
- kNN-KD with the paper's loss (1 − α)·CE + α·H(p_kNN, p_model);
- kNN-KD with the released code's loss LS-CE(0.1) + 1.0·KL(p_kNN ‖ p_model);
- a k/τ sweep of the released loss (k at the main τ, τ at the main k).

The kNN teacher is searched once, offline, over in_train (``TeacherStore``, self-match kept as
in the paper); every kNN-KD model decodes without a datastore.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

import torch

import knnfast
from knnfast.methods.kd import TeacherStore, distillation_loss, seq2seq_batch

from ..corpus import DemoSplit
from ..demo.base_model import seq2seq_loss
from ..demo.knn_mt import tune_knn
from ..plots import plot_grouped_bars
from . import mt_world
from .knn_kd_paper import PAPER_NUMBERS, quote, quoted_bleu
from .mt_world import MTWorld, save_model
from .report import Report
from .runner import StudyRun

STUDY = "knn-kd"
TITLE = "kNN-KD in miniature: distilling the kNN distribution into the NMT model"
PAPER = ("Zhixian Yang, Renliang Sun, Xiaojun Wan. Nearest Neighbor Knowledge Distillation for "
         "Neural Machine Translation. NAACL 2022, arXiv:2205.00479 "
         "(code: github.com/FadedCosine/kNN-KD)")

# The paper's own numbers and statements, each with where it comes from. Searched offline
STORE_K = 64                 # the teacher store keeps the paper's largest k; cells use a prefix
MAIN_K = 16                  # the paper's k for Koran, its datastore closest to ours in size
SWEEP_KS = (4, 16, 64)       # the paper's k values (Medical/Law, Koran, IWSLT)
SWEEP_TAUS = (1.0, 10.0, 100.0)   # the kNN-MT tuning grid (the paper used 10 and 100)
ALPHA = 0.5                  # our choice: the paper's α is not available offline
CODE_SMOOTHING, CODE_RATE = 0.1, 1.0
LAMBDA0_SENTENCES = 100      # the λ = 0 check decodes this many in_test sentences
QUICK_EVAL_SENTENCES = 8     # --quick decodes one batch per split: its model emits max-length junk
SAME_SPEED = 0.8             # "about the same speed": at least 80 % (a shared 2-core VM is noisy)


def cache_settings(quick: bool) -> dict:
    """What this study's cached stages depend on (``StudyRun.use_settings``)."""
    return {"world": mt_world.scale(quick), "store_k": STORE_K, "main_k": MAIN_K,
            "sweep_ks": SWEEP_KS, "sweep_taus": SWEEP_TAUS, "alpha": ALPHA,
            "code_smoothing": CODE_SMOOTHING, "code_rate": CODE_RATE, "lambda0_sentences": LAMBDA0_SENTENCES,
            "quick_eval_sentences": QUICK_EVAL_SENTENCES}


@dataclasses.dataclass(frozen=True)
class Arm:
    """One fine-tuned model: CE (``kd`` None) or kNN-KD with its loss weights and teacher."""
    name: str
    label: str
    kd: Optional[str] = None          # "ce" (the paper's H(p_T, p)) or "kl" (the code's)
    k: int = MAIN_K
    tau: float = 10.0
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    smoothing: float = CODE_SMOOTHING


def main_arms(tau: float) -> list[Arm]:
    """CE fine-tuning and kNN-KD with the paper's and with the released code's loss."""
    return [Arm("ce", "CE fine-tuning"),
            Arm("kd_paper", f"kNN-KD, paper loss (1−α)·CE + α·KD, α={ALPHA:g}", "ce", MAIN_K, tau,
                1.0 - ALPHA, ALPHA, 0.0),
            Arm("kd_code", "kNN-KD, code loss LS-CE + KL", "kl", MAIN_K, tau, 1.0, CODE_RATE,
                CODE_SMOOTHING)]


def sweep_arms(tau: float) -> list[Arm]:
    """The released loss at k ∈ SWEEP_KS (τ = tau) and τ ∈ SWEEP_TAUS (k = MAIN_K); the cell
    (MAIN_K, tau) is the main kd_code arm."""
    cells = [(k, tau) for k in SWEEP_KS] + [(MAIN_K, t) for t in SWEEP_TAUS if t != tau]
    return [Arm("kd_code" if (k, t) == (MAIN_K, tau) else f"kd_code_k{k}_t{t:g}",
                f"kNN-KD code loss, k={k}, τ={t:g}", "kl", k, t, 1.0, CODE_RATE, CODE_SMOOTHING)
            for k, t in sorted(set(cells))]


# ------------------------------------------------------------------------------ pieces


def scores_of(result: dict) -> dict:
    """An evaluation without its hypotheses (the stage JSON stays small) but with 3 examples."""
    return {k: v for k, v in result.items() if k != "hyps"} | {"first_hyps": result["hyps"][:3]}


def kd_loss_fn(arm: Arm, store: TeacherStore, examples: list, pad_id: int):
    """world.fine_tune's loss_fn for a kNN-KD arm: the batch's in_train ids select the rows of
    the precomputed teacher (its first ``arm.k`` neighbours, sorted by score)."""
    def loss(model, srcs, tgts, idx):
        del srcs, tgts  # the same rows, rebuilt aligned with the teacher by seq2seq_batch
        batch = seq2seq_batch(examples, idx, pad_id, model.config.decoder_start_token_id)
        labels = batch.pop("labels")
        tokens, scores = store.batch(idx, length=labels.shape[1])
        logits = model(**batch).logits
        return distillation_loss(logits, labels, (tokens[..., :arm.k], scores[..., :arm.k]),
                                 temperature=arm.tau, ce_weight=arm.ce_weight,
                                 kd_weight=arm.kd_weight, label_smoothing=arm.smoothing,
                                 kd=arm.kd)
    return loss


def eval_pairs(run: StudyRun, world: MTWorld, split: str) -> list:
    """The pairs an evaluation decodes: the whole split, or its first QUICK_EVAL_SENTENCES
    under --quick (16 decodes of an untrained model's max-length output dominate the tests)."""
    pairs = getattr(world.split, split)
    return pairs[:QUICK_EVAL_SENTENCES] if run.quick else pairs


def teacher_path(run: StudyRun) -> Path:
    return run.cache / f"teacher_k{STORE_K}"


def open_teacher(run: StudyRun, world: MTWorld) -> TeacherStore:
    """The in_train teacher store (built once, exact search, self-match kept as in the paper);
    rebuilt if it belongs to another datastore."""
    path, ds = teacher_path(run), world.datastore
    k = min(STORE_K, len(ds))
    if (path / "meta.json").exists():
        store = TeacherStore.open(str(path))
        if store.meta["datastore"]["size"] == len(ds) and store.k == k:
            return store
    return TeacherStore.build(world.model, ds, world.examples(world.split.in_train), str(path),
                              k=k, exact=True, batch_size=64, overwrite=path.exists())


def teacher_stats(store: TeacherStore, world: MTWorld) -> dict:
    """Size of the store; how often the nearest neighbour's token, and any of the first MAIN_K,
    is the gold token (self-match kept: the teacher sees the answer, as in the paper); whether
    every row is sorted by score (a k-prefix is then the top-k teacher)."""
    gold = torch.cat([torch.tensor(t) for _, t in world.examples(world.split.in_train)])
    tokens = store.tokens[:, :MAIN_K].long()
    top1 = tokens[:, 0]
    return {"positions": int(store.meta["positions"]), "k": store.k,
            "bytes": int(sum(store.meta["bytes"].values())),
            "datastore_entries": len(world.datastore),
            "nearest_is_gold": float((top1 == gold).float().mean()),
            "gold_in_top_k": float((tokens == gold[:, None]).any(1).float().mean()),
            "sorted_by_score": bool((store.scores[:, :1].float() == 0).all()
                                    and (store.scores.float().diff(dim=1).nan_to_num(0) <= 0).all())}


def train_arm(run: StudyRun, world: MTWorld, arm: Arm, store: TeacherStore) -> dict:
    """Fine-tune a fresh copy of the base model (stage ``train_<name>``); weights cached."""
    def fit():
        model = world.fresh_model()
        loss_fn = None if arm.kd is None else kd_loss_fn(
            arm, store, world.examples(world.split.in_train), world.codec.pad_id)
        info = world.fine_tune(model, list(model.parameters()), world.split.in_train,
                               loss_fn=loss_fn, desc=arm.name)
        save_model(model, run.cache / "models" / f"{arm.name}.pt")
        return info
    return run.stage(f"train_{arm.name}", fit)


def eval_arm(run: StudyRun, world: MTWorld, arm: Arm, general: bool) -> dict:
    """Plain beam search (no datastore) of a fine-tuned arm on in_test (+ general_dev)."""
    def evaluate():
        model = world.fresh_model()
        model.load_state_dict(torch.load(run.cache / "models" / f"{arm.name}.pt"))
        out = {"in_test": scores_of(world.evaluate(model, eval_pairs(run, world, "in_test")))}
        if general:
            out["general_dev"] = scores_of(world.evaluate(
                model, eval_pairs(run, world, "general_dev")))
        return out
    return run.stage(f"eval_{arm.name}", evaluate)


def knn_decoder(world: MTWorld, best: dict, lam: Optional[float] = None):
    return knnfast.KNNDecoder(world.datastore, k=best["k"], temperature=best["temperature"],
                              lam=best["lam"] if lam is None else lam, exact=False)


def baselines(run: StudyRun, world: MTWorld, best: dict) -> dict:
    """Base model and kNN-MT on in_test and general_dev (stages ``eval_base``, ``eval_knn_mt``)."""
    out = {}
    for name, dec in (("base", None), ("knn_mt", knn_decoder(world, best))):
        out[name] = run.stage(f"eval_{name}", lambda dec=dec: {
            split: scores_of(world.evaluate(world.model, eval_pairs(run, world, split), dec))
            for split in ("in_test", "general_dev")})
    return out


def checks(run: StudyRun, world: MTWorld, store: TeacherStore, best: dict) -> dict:
    """Invariants at any scale: kNN-MT with λ = 0 decodes exactly like the base model; the
    fused kNN-KD loss with no KD term equals the CE arm's loss on the same batch."""
    def compute():
        pairs = eval_pairs(run, world, "in_test")[:LAMBDA0_SENTENCES]
        plain = world.evaluate(world.model, pairs)["hyps"]
        lam0 = world.evaluate(world.model, pairs, knn_decoder(world, best, lam=0.0))["hyps"]
        examples = world.examples(world.split.in_train)
        idx = list(range(min(8, len(examples))))
        model, pad = world.model, world.codec.pad_id
        with torch.no_grad():
            ce = seq2seq_loss(model, [examples[i][0] for i in idx], [examples[i][1] for i in idx],
                              pad, world.scale.model.label_smoothing)[0]
            arm = Arm("check", "", "kl", MAIN_K, best["temperature"], 1.0, 0.0,
                      world.scale.model.label_smoothing)
            fused = kd_loss_fn(arm, store, examples, pad)(model, None, None, idx)
        return {"lambda0_sentences": len(pairs),
                "lambda0_identical": sum(a == b for a, b in zip(plain, lam0)),
                "ce_vs_fused_loss_abs_diff": abs(float(ce) - float(fused))}
    return run.stage("checks", compute)


# ------------------------------------------------------------------------------ the run

# Rates measured on this 2-core machine (mt_world's FULL scale), for the printed estimate only;
# the fixed part is kNN-MT tuning, the teacher's teacher-forced pass + search, and the checks.
EST_UPDATES_PER_S, EST_PLAIN_SENT_PER_S, EST_KNN_SENT_PER_S, EST_FIXED_S = 8.0, 45.0, 25.0, 150.0


def estimate_minutes(world: MTWorld, finetunes: int, general_evals: int) -> float:
    """Minutes of this study's own stages (base model and datastore not included)."""
    n = world.split.sizes()
    plain = (finetunes + 1) * n["in_test"] + general_evals * n["general_dev"] + LAMBDA0_SENTENCES
    knn = n["in_test"] + n["general_dev"] + LAMBDA0_SENTENCES
    return (finetunes * world.scale.finetune_updates / EST_UPDATES_PER_S
            + plain / EST_PLAIN_SENT_PER_S + knn / EST_KNN_SENT_PER_S + EST_FIXED_S) / 60


def run(run: StudyRun, split: Optional[DemoSplit] = None) -> Report:
    """Base, kNN-MT, CE fine-tuning, kNN-KD (paper and code loss), the k/τ sweep; the report."""
    world = MTWorld(run, split)
    tuned = run.stage("tune_knn_mt", lambda: tune_knn(world.model, world.codec, world.split,
                                                      world.datastore, run.log))
    best = tuned["best"]
    arms = main_arms(float(best["temperature"]))
    extra = [a for a in sweep_arms(float(best["temperature"])) if a.name != "kd_code"]
    run.log(f"[{STUDY}] {len(arms + extra)} fine-tunings x {world.scale.finetune_updates} "
            f"updates; estimate ≈ {estimate_minutes(world, len(arms + extra), len(arms) + 1):.0f}"
            f" min on a 2-core machine after the shared base model and datastore")

    def build_teacher():
        start = time.perf_counter()
        store = open_teacher(run, world)
        return dict(teacher_stats(store, world), seconds=time.perf_counter() - start)
    teacher = run.stage("teacher", build_teacher)
    store = open_teacher(run, world)
    base = baselines(run, world, best)
    check = checks(run, world, store, best)
    trained = {a.name: train_arm(run, world, a, store) for a in arms + extra}
    evals = {a.name: eval_arm(run, world, a, general=a in arms) for a in arms + extra}

    report = Report(STUDY, TITLE, PAPER, run.quick)
    report.setup += world.describe() + setup_lines(world, best, teacher)
    if run.quick:
        report.setup.append(f"--quick: every evaluation decodes the first {QUICK_EVAL_SENTENCES}"
                            f" sentences of its split")
    systems_table(report, base, evals, arms)
    paper_bleu_table(report, base, evals)
    training_table(report, trained, arms, teacher)
    cells = sweep_table(report, evals, sweep_arms(float(best["temperature"])), base)
    checks_table(report, check, teacher)
    settings_table(report, world, best)
    claims(report, world, base, evals, trained)
    plot_sweep(run, report, cells, evals, base["knn_mt"]["in_test"]["bleu"])
    report.results = {"paper": PAPER_NUMBERS, "tuned_knn_mt": tuned, "teacher": teacher,
                      "baselines": base, "trained": trained, "evaluations": evals,
                      "checks": check, "arms": [dataclasses.asdict(a) for a in arms + extra]}
    return report


def setup_lines(world: MTWorld, best: dict, teacher: dict) -> list[str]:
    s = world.scale
    return [f"kNN-MT: k={best['k']}, τ={best['temperature']:g}, λ={best['lam']:g} tuned on "
            f"in_dev (gold-token NLL grid), IVF search (exact=False) at every step",
            f"fine-tuning (every arm): all parameters, {s.finetune_updates} AdamW updates, "
            f"lr 5e-4, seed 0, the same token batches of in_train; beam {s.beam}, batch {s.batch}",
            f"kNN-KD teacher: exact search over the in-domain datastore for each of the "
            f"{teacher['positions']:,} in_train target positions, k={teacher['k']} stored "
            f"(self-match kept, as in the paper); main arms use the first k={MAIN_K} (the "
            f"paper's Koran setting) and τ = the tuned kNN-MT τ (the paper uses one τ for both)",
            f"paper loss: (1−α)·CE + α·H(p_kNN, p_model), α={ALPHA:g} (our choice; the paper's α "
            f"is not available offline); code loss: LS-CE(ε={CODE_SMOOTHING:g}) + "
            f"{CODE_RATE:g}·KL(p_kNN ‖ p_model) (released criterion 'knn_kd')",
            "kNN-KD and CE models decode with plain beam search: no datastore at test time"]


def _row(system: str, decoding: str, res: dict, base_speed: float) -> dict:
    general = res.get("general_dev")
    return {"system": system, "decoding": decoding, "in_test BLEU": res["in_test"]["bleu"],
            "in_test chrF": res["in_test"]["chrf"],
            "general_dev BLEU": general["bleu"] if general else None,
            "sentences/s": res["in_test"]["sentences_per_s"],
            "× base speed": res["in_test"]["sentences_per_s"] / base_speed}


def systems_table(report: Report, base: dict, evals: dict, arms: list[Arm]) -> None:
    speed = base["base"]["in_test"]["sentences_per_s"]
    rows = [_row("base model", "plain", base["base"], speed),
            _row("kNN-MT", "kNN search every step", base["knn_mt"], speed)]
    rows += [_row(a.label, "plain", evals[a.name], speed) for a in arms]
    report.table("Systems (in_test = in-domain PostgreSQL, general_dev = out-of-domain)",
                 ["system", "decoding", "in_test BLEU", "in_test chrF", "general_dev BLEU",
                  "sentences/s", "× base speed"], rows, digits=2,
                 note="sentences/s of beam search over in_test on this machine; a fine-tuned "
                      "model's speed also moves with the length of what it generates.")


def paper_bleu_table(report: Report, base: dict, evals: dict) -> None:
    """The paper's kNN-KD BLEU per domain (as quoted) beside this run's systems."""
    quoted = PAPER_NUMBERS["reported_bleu"]
    rows = [{"data": d, "kNN-KD BLEU": quoted[d], "kNN-MT BLEU": None, "CE BLEU": None}
            for d in ("Koran", "Medical", "Law")]
    rows += [{"data": f"this run, PostgreSQL in_test ({loss} loss)",
              "kNN-KD BLEU": evals[arm]["in_test"]["bleu"],
              "kNN-MT BLEU": base["knn_mt"]["in_test"]["bleu"],
              "CE BLEU": evals["ce"]["in_test"]["bleu"]}
             for loss, arm in (("paper", "kd_paper"), ("code", "kd_code"))]
    report.table("The paper's kNN-KD BLEU (as quoted) beside this run's",
                 ["data", "kNN-KD BLEU", "kNN-MT BLEU", "CE BLEU"], rows, digits=2,
                 note=f"Paper rows: {quoted['source']}; its kNN-MT and CE BLEU are not "
                      "available offline (–). Different data and model scale: compare the "
                      "order of the systems, not the values.")


def training_table(report: Report, trained: dict, arms: list[Arm], teacher: dict) -> None:
    ce = trained["ce"]["updates_per_s"]
    rows = [{"arm": a.label, "updates": trained[a.name]["updates"],
             "updates/s": trained[a.name]["updates_per_s"],
             "× CE updates/s": trained[a.name]["updates_per_s"] / ce,
             "target tokens/s": trained[a.name]["target_tokens_per_s"],
             "final loss": trained[a.name]["final_loss"]} for a in arms]
    report.table("Training cost per update (same batches and seed)",
                 ["arm", "updates", "updates/s", "× CE updates/s", "target tokens/s",
                  "final loss"], rows, digits=2,
                 note=f"kNN-KD's one-off offline search: {teacher['positions']:,} positions × "
                      f"k={teacher['k']} in {teacher['seconds']:.1f} s, "
                      f"{teacher['bytes'] / 2**20:.1f} MiB on disk (not in updates/s). "
                      "Losses are not comparable across arms (different objectives).")


def sweep_table(report: Report, evals: dict, cells: list[Arm], base: dict) -> list[Arm]:
    ce, knn = evals["ce"]["in_test"]["bleu"], base["knn_mt"]["in_test"]["bleu"]
    rows = [{"k": a.k, "τ": f"{a.tau:g}", "in_test BLEU": evals[a.name]["in_test"]["bleu"],
             "in_test chrF": evals[a.name]["in_test"]["chrf"],
             "Δ BLEU vs CE": evals[a.name]["in_test"]["bleu"] - ce,
             "Δ BLEU vs kNN-MT": evals[a.name]["in_test"]["bleu"] - knn} for a in cells]
    report.table("k/τ sweep of the teacher (code loss LS-CE + KL)",
                 ["k", "τ", "in_test BLEU", "in_test chrF", "Δ BLEU vs CE", "Δ BLEU vs kNN-MT"],
                 rows, digits=2,
                 note=f"k varies at the main τ, τ at k={MAIN_K}; each cell is a full "
                      "fine-tuning with the same updates, batches and seed.")
    return cells


def settings_table(report: Report, world: MTWorld, best: dict) -> None:
    """The paper's datastores and hyperparameters (released README) beside this run's."""
    kd, mt = PAPER_NUMBERS["kd_settings"], PAPER_NUMBERS["knn_mt_settings"]
    rows = [{"data": name, "datastore entries": size, "kNN-KD k": kd[name]["k"],
             "kNN-KD τ": f"{kd[name]['temperature']:g}", "kNN-MT k": mt[name]["k"],
             "kNN-MT λ": f"{mt[name]['lambda']:g}", "kNN-MT τ": f"{mt[name]['temperature']:g}"}
            for name, size in PAPER_NUMBERS["datastore_sizes"].items() if name != "source"]
    rows.append({"data": "this run: PostgreSQL messages", "datastore entries": len(world.datastore),
                 "kNN-KD k": MAIN_K, "kNN-KD τ": f"{best['temperature']:g}",
                 "kNN-MT k": best["k"], "kNN-MT λ": f"{best['lam']:g}",
                 "kNN-MT τ": f"{best['temperature']:g}"})
    report.table("Datastores and settings: the paper's (released README) and this run's",
                 ["data", "datastore entries", "kNN-KD k", "kNN-KD τ", "kNN-MT k", "kNN-MT λ",
                  "kNN-MT τ"], rows,
                 note=f"Paper rows: {PAPER_NUMBERS['kd_settings']['source']}; "
                      f"{PAPER_NUMBERS['knn_mt_settings']['source']}. This run's kNN-MT "
                      "setting is tuned on in_dev; its kNN-KD k is the paper's Koran k.")


def checks_table(report: Report, check: dict, teacher: dict) -> None:
    n = check["lambda0_sentences"]
    rows = [{"check": "kNN-MT with λ = 0 decodes like the base model",
             "expected": f"{n}/{n} identical", "measured": f"{check['lambda0_identical']}/{n}"},
            {"check": "fused kNN-KD loss with KD weight 0 = the CE arm's loss (one batch)",
             "expected": "abs. difference < 1e-4", "measured": f"{check['ce_vs_fused_loss_abs_diff']:.2e}"},
            {"check": "teacher rows = datastore entries (same corpus, self kept)",
             "expected": str(teacher["datastore_entries"]), "measured": str(teacher["positions"])},
            {"check": "teacher rows sorted by score (a k-prefix is the top-k)",
             "expected": "True", "measured": str(teacher["sorted_by_score"])},
            {"check": "nearest neighbour's token is the gold token (self-match)",
             "expected": "≈ 1", "measured": f"{teacher['nearest_is_gold']:.3f}"}]
    report.table("Sanity checks", ["check", "expected", "measured"], rows)


def claims(report: Report, world: MTWorld, base: dict, evals: dict, trained: dict) -> None:
    bleu = {n: r["in_test"]["bleu"] for n, r in (base | evals).items()}
    speed = {n: r["in_test"]["sentences_per_s"] for n, r in (base | evals).items()}
    kd = ("kd_paper", "kd_code")
    sizes = world.split.sizes()
    params = sum(p.numel() for p in world.model.parameters()) / 1e6
    small = (f"{world.scale.finetune_updates} updates on {sizes['in_train']:,} short gettext "
             f"messages are far from the paper's training to convergence, and BLEU on "
             f"{sizes['in_test']} sentences moves by about a point between seeds")
    theirs = [v for k, v in PAPER_NUMBERS["datastore_sizes"].items() if k != "source"]
    report.claim(
        "kNN-KD beats CE fine-tuning in BLEU", quote("quality") + "; " + quoted_bleu(),
        f"BLEU CE {bleu['ce']:.2f}; kNN-KD paper loss {bleu['kd_paper']:.2f}, code loss "
        f"{bleu['kd_code']:.2f}", all(bleu[n] > bleu["ce"] for n in kd),
        "both kNN-KD losses beat CE on in_test" if all(bleu[n] > bleu["ce"] for n in kd) else
        f"required for both losses; likely cause: scale ({small})")
    beats = all(bleu[n] > bleu["knn_mt"] for n in kd)
    report.claim(
        "kNN-KD beats kNN-MT in BLEU", quote("quality") + "; " + quoted_bleu(),
        f"BLEU kNN-MT {bleu['knn_mt']:.2f}; kNN-KD paper loss {bleu['kd_paper']:.2f}, code "
        f"loss {bleu['kd_code']:.2f}", beats,
        "both kNN-KD losses beat kNN-MT" if beats else
        "kNN-MT reads the in-domain datastore at every step (exact phrases of near-duplicate "
        f"messages), while the distilled model must store them in {params:.2f}M parameters; "
        f"{small}")
    ratio = {n: speed[n] / speed["base"] for n in kd}
    same = all(r >= SAME_SPEED for r in ratio.values())
    report.claim(
        "kNN-KD decodes at the base model's speed (no datastore at test time)", quote("speed"),
        f"× base sentences/s: paper loss {ratio['kd_paper']:.2f}, code loss "
        f"{ratio['kd_code']:.2f}", same,
        "same architecture and plain beam search; differences come from output lengths and "
        "machine noise" if same else "the fine-tuned models generate longer outputs or the "
        "machine was busy: the decoding path is identical to the base model's")
    knn_ratio = speed["knn_mt"] / speed["base"]
    anchor = PAPER_NUMBERS["knn_mt_speed_vs_base"]
    faster = all(speed[n] > speed["knn_mt"] for n in kd)
    report.claim(
        "kNN-KD decodes much faster than kNN-MT",
        f"kNN-MT at {anchor['low']:.2f}–{anchor['high']:.2f}× the base model's speed "
        f"({anchor['source']})",
        f"kNN-MT {knn_ratio:.2f}× base; kNN-KD / kNN-MT: paper loss "
        f"{speed['kd_paper'] / speed['knn_mt']:.2f}×, code loss "
        f"{speed['kd_code'] / speed['knn_mt']:.2f}×", faster,
        ("kNN-KD skips the per-step search" + (
            f"; the gap is smaller than the paper's because our datastore "
            f"({len(world.datastore):,} entries, D={world.datastore.dim}, IVF on CPU) is tiny "
            f"next to theirs ({min(theirs) / 1e6:.1f}M–{max(theirs) / 1e6:.1f}M entries)"
            if knn_ratio > anchor["high"] else "")) if faster else
        "kNN-MT's per-step search is cheap on this tiny datastore and the fine-tuned models "
        "generate longer outputs")
    tr = {n: trained[n]["updates_per_s"] / trained["ce"]["updates_per_s"] for n in kd}
    cheap = all(r >= SAME_SPEED for r in tr.values())
    report.claim(
        "kNN-KD costs about the same per training update as CE (the teacher is precomputed)",
        quote("speed"), f"× CE updates/s: paper loss {tr['kd_paper']:.2f}, code loss "
        f"{tr['kd_code']:.2f}", cheap,
        "the teacher rows are read from a memmap and the fused loss never builds a dense "
        "teacher" if cheap else "reading the teacher rows or the loss costs more than CE here; "
        "or machine noise (2 shared cores)")


def plot_sweep(run: StudyRun, report: Report, cells: list[Arm], evals: dict, knn: float) -> None:
    """Bars: in_test BLEU of each sweep cell, next to CE fine-tuning and kNN-MT."""
    n, ce = len(cells), evals["ce"]["in_test"]["bleu"]
    plot_grouped_bars({"kNN-KD (code loss)": [evals[a.name]["in_test"]["bleu"] for a in cells],
                       "CE fine-tuning": [ce] * n, "kNN-MT": [knn] * n},
                      [f"k={a.k}\nτ={a.tau:g}" for a in cells], run.out / "knn_kd_sweep.png",
                      "teacher (k neighbours, temperature τ)", "in_test BLEU",
                      "kNN-KD teacher settings")
    report.plot("knn_kd_sweep.png", "in_test BLEU of the k/τ sweep cells (kNN-KD, code loss), "
                "with CE fine-tuning and kNN-MT repeated as reference bars")
