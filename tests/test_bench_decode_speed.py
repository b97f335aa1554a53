"""benchmarks/bench_decode_speed.py at a tiny scale: the arms (bare, kNN, +skip, +gate,
+prune, +pca, combined) on tiny GPT-2 (kNN-LM) and Marian (kNN-MT beams) models built from
configs, the table / JSON / Pareto PNG it writes and the Pareto rule. No speed asserted."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import knnfast.integrations.hf as H  # noqa: E402
from helpers import random_sequences, tiny_gpt2, tiny_marian  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
V, PAD, EOS, START = 97, 0, 1, 0

pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location(
        "bench_decode_speed", ROOT / "benchmarks" / "bench_decode_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _arms(bench, model, ds, dev, work):
    return bench.make_arms(ds, work, k=8, temperature=1.0, lam=0.5, confidence=0.05,
                           gate_threshold=0.5, prune_k=4, pca_dim=8,
                           fit_gate_on=bench.gate_fitter(model, dev, updates=20))


def test_lm_study_tiny(bench, tmp_path):
    model = tiny_gpt2(V, n_embd=32, n_layer=2, n_positions=64, pad=PAD, eos=EOS)
    train, dev, test = (random_sequences(n, 4, 12, s, V) for n, s in ((20, 1), (6, 2), (6, 3)))
    ds = H.build_datastore(model, train, str(tmp_path / "ds"), batch_size=4, progress=False)
    arms = _arms(bench, model, ds, dev, tmp_path / "work")
    names = [n for n, _ in arms]
    assert names == ["bare", "kNN", "+skip", "+gate", "+prune", "+pca8", "combined"]
    rows = bench.run_arms(arms, bench.lm_runner(model, test, batch_size=4), "tokens_per_s")
    base = H.evaluate_lm(model, test, arms[1][1], batch_size=4, progress=False)
    by = {r["system"]: r for r in rows}
    assert by["bare"]["ppl"] == pytest.approx(base.base_ppl, rel=1e-5)
    assert by["kNN"]["ppl"] == pytest.approx(base.knn_ppl, rel=1e-6)
    assert by["bare"]["speed_ratio"] == 1.0 and by["kNN"]["skipped"] == 0.0
    assert by["+pca8"]["dim"] == 8 and by["+prune"]["entries"] < len(ds)
    assert 0 < by["+skip"]["skipped"] <= 1
    report = bench.write_outputs(rows, tmp_path / "out", "lm", "ppl", False, "tiny")
    md = (tmp_path / "out" / "lm.md").read_text()
    assert all(f"| {n} |" in md for n in names) and "Pareto" in md
    assert json.loads((tmp_path / "out" / "lm.json").read_text())["pareto"] == report["pareto"]
    assert (tmp_path / "out" / "lm.png").read_bytes()[:4] == b"\x89PNG"
    # derived stores are reused on a second run (resumable work directory)
    again = _arms(bench, model, ds, dev, tmp_path / "work")
    assert again[4][1].datastore.fingerprint == arms[4][1].datastore.fingerprint


def test_mt_study_tiny(bench, tmp_path):
    model = tiny_marian(V, d_model=32, decoder_layers=2, max_positions=64, pad=PAD, eos=EOS,
                        start=START)
    model.generation_config.forced_eos_token_id = None
    pairs = list(zip(random_sequences(20, 3, 9, 4, V), random_sequences(20, 3, 9, 5, V)))
    ds = H.build_datastore(model, pairs, str(tmp_path / "ds"), batch_size=4, progress=False)
    arms = _arms(bench, model, ds, pairs[:6], tmp_path / "work")
    src, mask = H.pad_batch([s for s, _ in pairs[:4]], PAD)
    refs = [t for _, t in pairs[:4]]

    def translate(dec):
        out = H.generate(model, dec, input_ids=src, attention_mask=mask, num_beams=2,
                         max_new_tokens=6, do_sample=False)
        return out.tolist(), 1.0

    def score(hyps):   # token overlap stands in for BLEU at this scale
        hits = sum(len(set(h) & set(r)) for h, r in zip(hyps, refs))
        return {"bleu": hits / sum(len(r) for r in refs), "chrf": 0.0}
    rows = bench.run_arms(arms, bench.mt_runner(translate, score, 4), "sentences_per_s")
    assert [r["sentences_per_s"] for r in rows] == [4.0] * 7
    bench.write_outputs(rows, tmp_path / "out", "mt", "bleu", True, "tiny MT")
    assert (tmp_path / "out" / "mt.png").exists()


def test_pareto_rule(bench):
    rows = [dict(system="a", speed_ratio=1.0, q=10.0), dict(system="b", speed_ratio=0.5, q=20.0),
            dict(system="c", speed_ratio=0.4, q=15.0), dict(system="d", speed_ratio=1.0, q=9.0)]
    assert bench.pareto(rows, "q", True) == ["a", "b"]
    assert bench.pareto(rows, "q", False) == ["d"]      # perplexity: lower is better


@pytest.mark.parametrize("search", ["lists", "lists-bf16", "lists-int8"])
def test_lists_search_mode_adds_an_exact_arm(bench, tmp_path, search):
    """--search lists: every store gets an IVF index searched through knn_search_lists, and a
    kNN-exact arm is timed beside it. With every list probed the lists find what exact search
    finds, so the two perplexities agree. lists-bf16 / lists-int8: the same through a pack."""
    model = tiny_gpt2(V, n_embd=32, n_layer=2, n_positions=64, pad=PAD, eos=EOS)
    train, dev, test = (random_sequences(n, 4, 12, s, V) for n, s in ((20, 1), (6, 2), (6, 3)))
    ds = H.build_datastore(model, train, str(tmp_path / "ds"), batch_size=4, progress=False)
    arms = bench.make_arms(ds, tmp_path / "work", k=8, temperature=1.0, lam=0.5,
                           confidence=0.05, gate_threshold=0.5, prune_k=4, pca_dim=8,
                           fit_gate_on=bench.gate_fitter(model, dev, updates=20),
                           search=search, factory="IVF4,Flat", nprobe=4)
    names = [n for n, _ in arms]
    assert names[:3] == ["bare", "kNN-exact", "kNN"]
    by = dict(arms)
    assert by["kNN"].datastore._lists is not None and by["kNN-exact"].exact is True
    assert by["+prune"].datastore._lists is not None
    packed = [type(by[n].datastore._lists.pack).__name__ for n in ("kNN", "+prune")]
    want = {"lists": "NoneType", "lists-bf16": "ListsBf16", "lists-int8": "ListsInt8"}
    assert packed == [want[search]] * 2
    rows = {r["system"]: r for r in bench.run_arms(arms[:3], bench.lm_runner(model, test,
                                                                             batch_size=4),
                                                   "tokens_per_s")}
    assert rows["kNN"]["ppl"] == pytest.approx(rows["kNN-exact"]["ppl"], rel=1e-5)
