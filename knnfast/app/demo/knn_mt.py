"""kNN-MT on the in-domain (PostgreSQL) catalogs: datastore + IVF index, λ/τ/k tuning, the
adaptive meta-k network, robust kNN-MT's combiner, the systems on in_test and BLEU against
λ."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from transformers import MarianMTModel

import knnfast
from knnfast.defaults import KNN_MT
from knnfast.integrations import hf
from knnfast.methods.robust import collect_robust_features, entry_logprobs

from ..corpus import DemoSplit, Pair, TextCodec, load_catalogs, split_domains
from ..plots import plot_bleu_vs_lambda
from .base_model import Log, evaluate_bleu, sha256_json

REPO_ROOT = Path(__file__).resolve().parents[3]
CACHE_DIR = REPO_ROOT / ".cache" / "demo"

KNN_K = KNN_MT.k  # neighbours of the adaptive meta-k network
LAMBDA_GRID = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0)
SWEEP_SENTENCES = 200  # BLEU against λ on the first in_test sentences (8 decodes of them)
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


def pair_examples(codec: TextCodec, pairs: list[Pair], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(source ids, target ids) examples of text pairs, each side cut to ``max_len``."""
    src = codec.encode_rows([s for s, _ in pairs], max_len)
    tgt = codec.encode_rows([t for _, t in pairs], max_len)
    return list(zip(src, tgt))


def build_in_domain_datastore(model: MarianMTModel, codec: TextCodec, split: DemoSplit,
                              cache_dir: Path, log: Log) -> knnfast.Datastore:
    """Teacher-forced datastore over ``split.in_train`` + an IVF index (cached, resumable)."""
    path = cache_dir / "datastore"
    stamp = sha256_json({"model": _model_stamp(cache_dir), "pairs": len(split.in_train),
                     "first": split.in_train[:3], "index": [IVF_LISTS, IVF_NPROBE]})
    if (path / "index.faiss").exists():
        ds = knnfast.Datastore.open(path)
        if ds.meta.get("extra", {}).get("demo_stamp") == stamp:
            log(f"datastore: loaded from cache {path} ({len(ds):,} entries)")
            ds.load_index()
            return ds
    start = time.perf_counter()
    examples = pair_examples(codec, split.in_train, model.config.max_position_embeddings)
    ds = hf.build_datastore(model, examples, str(path), hidden="ffn", batch_size=64,
                            model_id="knnfast-demo-marian", resume=True,
                            overwrite=(path / "meta.json").exists())
    built = time.perf_counter() - start
    start = time.perf_counter()
    ds.build_index(ivf_factory(len(ds)), nprobe=IVF_NPROBE, progress=False)
    ds.update_extra(demo_stamp=stamp, build_seconds=built + time.perf_counter() - start)
    log(f"datastore: {len(ds):,} entries from {len(examples):,} in-domain pairs in {built:.1f} s; "
        f"index {ivf_factory(len(ds))} (nprobe {IVF_NPROBE}) in {time.perf_counter() - start:.1f} s")
    return ds


def _model_stamp(cache_dir: Path) -> str:
    meta = cache_dir / "base_model" / "train_meta.json"
    return meta.read_text() if meta.exists() else ""


@torch.inference_mode()
def translate_knn(model: MarianMTModel, codec: TextCodec, sources: list[str], decoder,
                  batch_size: int = 16, num_beams: int = 4,
                  max_new_tokens: int | None = None) -> tuple[list[str], float]:
    """(translations, seconds) with kNN mixed into every beam-search step (``decoder=None``:
    the bare model through the same code path). Output length: at most twice the source
    length + 10, the model's position limit and ``max_new_tokens``."""
    max_positions = model.config.max_position_embeddings
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    start = time.perf_counter()
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        ids, mask = codec.encode_batch([sources[i] for i in chunk], max_positions)
        limit = min(max_positions, 2 * ids.shape[1] + 10, max_new_tokens or max_positions)
        gen = hf.generate(model, decoder, input_ids=ids, attention_mask=mask,
                          num_beams=num_beams, do_sample=False, max_new_tokens=limit)
        for i, row in zip(chunk, gen):
            out[i] = codec.decode(row)
    return out, time.perf_counter() - start


def tune_knn(model, codec, split, ds, log: Log) -> dict:
    """λ/τ/k on in_dev from one retrieval (gold-token NLL grid)."""
    start = time.perf_counter()
    examples = pair_examples(codec, split.in_dev, model.config.max_position_embeddings)
    res = hf.tune(model, examples, ds, ks=(4, 8, 16), temperatures=(1.0, 10.0, 100.0),
                  lams=(0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8), batch_size=64, exact=True,
                  progress=False)
    b = res.best
    log(f"tune (in_dev, {len(res.grid)} cells, one retrieval, {time.perf_counter() - start:.1f} s): "
        f"k={b['k']} τ={b['temperature']:g} λ={b['lam']:g}  dev NLL {res.base_nll:.3f} → {b['nll']:.3f}")
    return {"best": b, "base_nll": res.base_nll}


def train_adaptive(model, codec, split, ds, temperature: float, cache_dir: Path, log: Log):
    """Meta-k network (Zheng et al. 2021) trained on in_dev after one retrieval."""
    start = time.perf_counter()
    torch.manual_seed(0)  # the meta-k network's initial weights
    dec = knnfast.AdaptiveKNNDecoder(ds, max_k=KNN_K, temperature=temperature, exact=False,
                                     rescore=True)
    examples = pair_examples(codec, split.in_dev, model.config.max_position_embeddings)
    feats = hf.collect_gold_features(model, examples, dec, batch_size=64, progress=False)
    with _threads(1):  # tiny network: one thread avoids OpenMP overhead on 2 cores
        info = dec.fit(feats.base_gold_logp, feats.targets, feats.neighbours, epochs=30,
                       progress=False)
    dec.save(cache_dir / "adaptive")
    log(f"adaptive kNN-MT: meta-k network trained on {feats.targets.numel():,} in_dev positions, "
        f"{info['updates']} updates in {time.perf_counter() - start:.1f} s; held-out NLL "
        f"{info['valid_nll_before']:.3f} → {info['valid_nll_after']:.3f}")
    return dec, info


def train_robust(model, codec, split, ds, cache_dir: Path, log: Log):
    """Robust kNN-MT's combiner (Jiang et al. 2022): entry log-probs over in_train (the
    datastore's own examples), then one retrieval over in_dev and the perturbed fit."""
    start = time.perf_counter()
    torch.manual_seed(0)  # the combiner's initial weights
    max_len = model.config.max_position_embeddings
    entry = entry_logprobs(model, pair_examples(codec, split.in_train, max_len), ds,
                           batch_size=64, progress=False)
    dec = knnfast.RobustKNNDecoder(ds, k=KNN_K, entry_logp=entry, exact=False, rescore=True)
    feats = collect_robust_features(model, pair_examples(codec, split.in_dev, max_len), dec,
                                    batch_size=64, progress=False)
    with _threads(1):  # tiny network: one thread avoids OpenMP overhead on 2 cores
        info = dec.fit(feats, progress=False)
    dec.save(cache_dir / "robust")
    log(f"robust kNN-MT: combiner trained on {feats.targets.numel():,} in_dev positions, "
        f"{info['updates']} updates in {time.perf_counter() - start:.1f} s; held-out NLL "
        f"{info['valid_nll_before']:.3f} → {info['valid_nll_after']:.3f}")
    return dec, info


def _summary(fit_info: dict) -> dict:
    return {k: v for k, v in fit_info.items() if k != "train_loss"}


class _threads:
    def __init__(self, n: int):
        self.n = n

    def __enter__(self):
        self.old = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)


def run_knn_mt(model, codec, split, cache_dir: Path, out_dir: Path, log: Log) -> dict:
    """Datastore, tuning, adaptive network, robust combiner, the systems on in_test, speed,
    λ sweep. The decoders search the IVF index's lists with knnfast's fused kernel
    (``Datastore.use_lists``: FAISS's neighbours, exact scores, one call per step)."""
    ds = build_in_domain_datastore(model, codec, split, cache_dir, log)
    ds = (ds.to("cpu") if ds.is_memmapped else ds).use_lists()
    tuned = tune_knn(model, codec, split, ds, log)
    k, tau, lam = tuned["best"]["k"], tuned["best"]["temperature"], tuned["best"]["lam"]
    adaptive, adaptive_info = train_adaptive(model, codec, split, ds, tau, cache_dir, log)
    robust, robust_info = train_robust(model, codec, split, ds, cache_dir, log)
    sources = [s for s, _ in split.in_test]
    refs = [t for _, t in split.in_test]
    systems = {
        "base": None,
        "kNN-MT": knnfast.KNNDecoder(ds, k=k, temperature=tau, lam=lam, exact=False),
        "adaptive kNN-MT": adaptive,
        "robust kNN-MT": robust,
        "kNN-MT (reference path)": knnfast.KNNDecoder(ds, k=k, temperature=tau, lam=lam,
                                                      exact=False, backend="reference"),
    }
    results, subset = {}, {}
    for name, dec in systems.items():
        hyps, secs = translate_knn(model, codec, sources, dec)
        scores = evaluate_bleu(hyps, refs)
        results[name] = dict(scores, seconds=secs, sentences_per_s=len(sources) / secs)
        subset[name] = evaluate_bleu(hyps[:SWEEP_SENTENCES], refs[:SWEEP_SENTENCES])["bleu"]
        log(f"  {name:24s} BLEU {scores['bleu']:5.1f}  chrF {scores['chrf']:5.1f}  "
            f"{len(sources) / secs:6.1f} sentences/s")
        if name == "kNN-MT":
            examples_out = [{"source": s, "reference": r, "base": None, "knn": h}
                            for s, r, h in list(zip(sources, refs, hyps))[:5]]
        if name == "base":
            base_hyps = hyps
    for e, b in zip(examples_out, base_hyps):
        e["base"] = b
    points = _bleu_vs_lambda(model, codec, ds, sources, refs, k, tau, log)
    # the sweep's subset, so the plot's adaptive line and λ marker match its own points
    n = min(SWEEP_SENTENCES, len(sources))
    plot_bleu_vs_lambda(points, subset["base"], out_dir / "bleu_vs_lambda.png",
                        f"kNN-MT, first {n} in_test sentences (k={k}, τ={tau:g})",
                        tuned_lam=lam, adaptive_bleu=subset["adaptive kNN-MT"])
    return {"datastore": {"entries": len(ds), "dim": ds.dim, "index": ivf_factory(len(ds)),
                          "nprobe": IVF_NPROBE, "path": str(ds.path),
                          "search": "the index's lists by knn_search_lists (Datastore.use_lists)"},
            "tuned": tuned, "adaptive": _summary(adaptive_info), "robust": _summary(robust_info),
            "systems": results, "bleu_vs_lambda": points,
            "bleu_vs_lambda_subset": {"sentences": n, "which": f"the first {n} in_test sentences",
                                      "bleu_by_system": subset},
            "examples": examples_out}


def _bleu_vs_lambda(model, codec, ds, sources, refs, k, tau, log) -> list:
    """BLEU at each λ of LAMBDA_GRID on the first SWEEP_SENTENCES in_test sentences."""
    points = []
    for lam_i in LAMBDA_GRID:
        dec = knnfast.KNNDecoder(ds, k=k, temperature=tau, lam=lam_i, exact=False)
        hyps, _ = translate_knn(model, codec, sources[:SWEEP_SENTENCES], dec)
        points.append((lam_i, evaluate_bleu(hyps, refs[:SWEEP_SENTENCES])["bleu"]))
    log(f"  BLEU vs λ (first {SWEEP_SENTENCES} in_test): "
        + ", ".join(f"{a:g}: {b:.1f}" for a, b in points))
    return points
