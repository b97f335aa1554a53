"""Retrieval skipping (knnfast.methods.skipping, knnfast.methods.gate): confidence threshold
and learned gate on KNNDecoder / AdaptiveKNNDecoder / RobustKNNDecoder, skipped rows = the
model's log-probs (λ = 0) and never searched, bitwise-identical outputs with skipping off,
counters, gate fit / save / load and its datastore checks, bad inputs; evaluate_lm and
generate (greedy and beam) on tiny HF models built from configs."""
import math

import pytest
import torch

from knnfast import (AdaptiveKNNDecoder, Datastore, KNNDecoder, RetrievalSkip,
                     RobustKNNDecoder, ops)
from knnfast.methods.gate import (GateFeatures, RetrievalGate, distribution_stats, fit_gate,
                                  gate_features)
from knnfast.methods.skipping import SkipStats, max_prob

V, D, N = 40, 16, 500

pytestmark = pytest.mark.usefixtures("single_threaded")


def _make_ds(path, seed=11):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(N, D, generator=g) * 0.5
    values = torch.randint(0, V, (N,), generator=g)
    with Datastore.create(path, D, vocab_size=V, progress=False) as w:
        w.add(keys, values)
    return Datastore.open(path)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return _make_ds(tmp_path_factory.mktemp("skip") / "ds")


def _step(B=12, seed=0, confident=(1, 4, 7)):
    """hidden [B, D], logits [B, V]; rows ``confident`` put ~all mass on one token."""
    g = torch.Generator().manual_seed(seed)
    hidden, logits = torch.randn(B, D, generator=g) * 0.5, torch.randn(B, V, generator=g)
    for r in confident:
        logits[r, r % V] = 30.0
    return hidden, logits


def _decoders(ds):
    torch.manual_seed(0)
    entry = torch.log(torch.rand(N) * 0.9 + 0.05)
    return [KNNDecoder(ds, k=8, temperature=2.0, lam=0.6),
            AdaptiveKNNDecoder(ds, max_k=8, temperature=2.0),
            RobustKNNDecoder(ds, k=8, entry_logp=entry)]


def _counting_search(monkeypatch, ds):
    """The rows of every datastore search (``search`` and ``neighbours`` both go through
    ``_search``)."""
    rows = []
    search = Datastore._search

    def counted(self, queries, *a, **kw):
        rows.append(queries.shape[0])
        return search(self, queries, *a, **kw)
    monkeypatch.setattr(Datastore, "_search", counted)
    return rows


# --------------------------------------------------------------------------- off = today


def test_off_is_bitwise_todays_step(ds):
    """No skip, an empty RetrievalSkip, confidence 1.0 on unsure rows and a gate threshold
    of 0 all give exactly the ops' output (what the decoder computed before skipping)."""
    hidden, logits = _step(confident=())
    scores, ids = ds.search(hidden, 8)
    today = ops.knn_interpolate(logits, ds.lookup(ids), scores=scores, temperature=2.0, lam=0.6)
    for skip in (None, RetrievalSkip(), RetrievalSkip(confidence=1.0)):
        dec = KNNDecoder(ds, k=8, temperature=2.0, lam=0.6, skip=skip)
        assert torch.equal(dec(hidden, logits), today)
        assert dec.skip_stats.skipped_rows == 0 and dec.skip_stats.rows == 12


@pytest.mark.parametrize("which", [0, 1, 2])
def test_off_is_bitwise_for_every_decoder(ds, which):
    hidden, logits = _step(confident=())
    plain = _decoders(ds)[which]
    skipping = _decoders(ds)[which]
    skipping.skip = RetrievalSkip(confidence=1.0)
    assert torch.equal(plain(hidden, logits), skipping(hidden, logits))
    nb = plain.retrieve(hidden)
    assert torch.equal(plain.interpolate(logits, nb), skipping(hidden, logits))


# --------------------------------------------------------------------------- confidence


@pytest.mark.parametrize("which", [0, 1, 2])
def test_confidence_skips_rows_as_lambda_zero(ds, which, monkeypatch):
    hidden, logits = _step()
    full = _decoders(ds)[which](hidden, logits)
    dec = _decoders(ds)[which]
    dec.skip = RetrievalSkip(confidence=0.99)
    rows = _counting_search(monkeypatch, ds)
    got = dec(hidden, logits)
    skipped = torch.tensor([1, 4, 7])
    kept = torch.tensor([r for r in range(12) if r not in (1, 4, 7)])
    assert rows == [9]                              # only the retrieving rows are searched
    lam0 = ops.knn_interpolate(logits, torch.full((12, 1), -1), weights=torch.zeros(12, 1),
                               lam=0.0)
    assert torch.equal(got[skipped], lam0[skipped])        # exactly what λ = 0 gives
    torch.testing.assert_close(got[kept], full[kept], rtol=0, atol=1e-6)
    assert dec.skip_stats.skipped_rows == 3 and dec.skip_stats.fraction_rows == 0.25


def test_all_rows_skipped_searches_nothing(ds, monkeypatch):
    hidden, logits = _step()
    dec = KNNDecoder(ds, k=8, skip=RetrievalSkip(confidence=1e-6))   # 1/V > 1e-6: all skip
    rows = _counting_search(monkeypatch, ds)
    out = dec(hidden, logits)
    assert rows == []
    assert torch.allclose(out, torch.log_softmax(logits, -1), atol=1e-6)
    s = dec.skip_stats
    assert (s.steps, s.rows, s.skipped_rows, s.skipped_steps) == (1, 12, 12, 1)
    assert s.fraction_steps == 1.0 and s.fraction_rows == 1.0
    s.reset()
    assert (s.steps, s.rows, s.fraction_rows, s.fraction_steps) == (0, 0, 0.0, 0.0)


def test_retrieve_without_logits_never_skips(ds):
    """Dev-set passes (tuning, fitting) call retrieve(hidden): every row, nothing counted."""
    hidden, _ = _step()
    dec = KNNDecoder(ds, k=8, skip=RetrievalSkip(confidence=1e-6))
    assert (dec.retrieve(hidden).tokens >= 0).all()
    assert dec.skip_stats.steps == 0


def test_max_prob():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0]])
    torch.testing.assert_close(max_prob(logits), torch.tensor([0.5, 1.0 / (1 + math.exp(-20))]))


def test_distribution_stats_masked_logits():
    """Masked (-inf) logits add nothing to the entropy and clamp at -1e4 among the top-4,
    never NaN; the entropy is -sum p log p of the rest."""
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf, -math.inf],
                           [1.0, 2.0, 3.0, 4.0, 5.0]])
    stats = distribution_stats(logits)
    p = torch.softmax(logits[1].double(), 0)
    torch.testing.assert_close(stats[:, 0], torch.tensor([math.log(2), float(-(p * p.log()).sum())]))
    torch.testing.assert_close(stats[0, 1:], torch.tensor([math.log(0.5)] * 2 + [-1e4] * 2))
    torch.testing.assert_close(stats[1, 1:], p.log().flip(0)[:4].float())


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01, float("nan"), True, "0.5"])
def test_bad_confidence(bad):
    with pytest.raises(ValueError, match="confidence"):
        RetrievalSkip(confidence=bad)


@pytest.mark.parametrize("bad", [-0.01, 1.5, float("nan"), None, False])
def test_bad_gate_threshold(bad):
    with pytest.raises(ValueError, match="gate_threshold"):
        RetrievalSkip(gate_threshold=bad)


def test_bad_skip_and_gate_objects(ds):
    with pytest.raises(ValueError, match="skip must be"):
        KNNDecoder(ds, skip=0.9)
    with pytest.raises(ValueError, match="gate must be"):
        RetrievalSkip(gate="gate")
    with pytest.raises(ValueError, match="not fitted"):
        KNNDecoder(ds, skip=RetrievalSkip(gate=RetrievalGate(D)))


# --------------------------------------------------------------------------- gate


def _dev(ds, T=400, seed=3):
    """Dev positions whose gold token is the nearest neighbour's where the model is unsure
    (entropy high) and the model's argmax where it is sure: the gate should learn λ from
    the distribution statistics."""
    g = torch.Generator().manual_seed(seed)
    hidden = ds.keys[torch.randint(0, N, (T,), generator=g)].float() + 0.01 * torch.randn(T, D, generator=g)
    logits = torch.randn(T, V, generator=g)
    sure = torch.rand(T, generator=g) < 0.5
    argmax = torch.randint(0, V, (T,), generator=g)
    logits[sure, argmax[sure]] += 12.0
    dec = KNNDecoder(ds, k=4, temperature=1.0, lam=0.5)
    nearest = dec.retrieve(hidden).tokens[:, 0]
    targets = torch.where(sure, argmax, nearest)
    return gate_features(hidden, logits, targets, dec), dec, sure, hidden, logits


@pytest.fixture(scope="module")
def fitted(ds):
    feats, dec, sure, hidden, logits = _dev(ds)
    torch.manual_seed(0)
    gate = RetrievalGate(D, hidden=32, dropout=0.0)
    report = fit_gate(gate, feats, epochs=30, max_updates=800, lr=3e-3, progress=False)
    return gate, report, sure, hidden, logits


def test_gate_fit_learns_lambda(fitted):
    gate, report, sure, hidden, logits = fitted
    assert report["valid_nll_after"] < 0.7 * report["valid_nll_before"]
    lam = gate.lam(hidden, logits)
    assert lam[sure].mean() < 0.3 < 0.7 < lam[~sure].mean()


def test_gate_skips_below_threshold(ds, fitted, monkeypatch):
    gate, _, sure, hidden, logits = fitted
    h, x = hidden[:40], logits[:40]
    dec = KNNDecoder(ds, k=4, temperature=1.0, lam=0.5,
                     skip=RetrievalSkip(gate=gate, gate_threshold=0.5))
    rows = _counting_search(monkeypatch, ds)
    got = dec(h, x)
    skip = gate.lam(h, x) < 0.5
    assert rows == [int((~skip).sum())] and 0 < int(skip.sum()) < 40
    lam0 = ops.knn_interpolate(x, torch.full((40, 1), -1), weights=torch.zeros(40, 1), lam=0.0)
    assert torch.equal(got[skip], lam0[skip])
    full = KNNDecoder(ds, k=4, temperature=1.0, lam=0.5)(h, x)
    torch.testing.assert_close(got[~skip], full[~skip], rtol=0, atol=1e-6)
    assert dec.skip_stats.skipped_rows == int(skip.sum())
    # either rule suffices: confidence 1e-6 skips everything whatever the gate says
    dec.skip = RetrievalSkip(confidence=1e-6, gate=gate, gate_threshold=0.0)
    dec.skip_stats.reset()
    dec(h, x)
    assert dec.skip_stats.fraction_rows == 1.0


def test_gate_save_load_and_datastore_checks(ds, fitted, tmp_path):
    gate, _, _, hidden, logits = fitted
    gate.save(tmp_path / "gate")
    back = RetrievalGate.load(tmp_path / "gate", ds)
    assert torch.equal(back.lam(hidden, logits), gate.lam(hidden, logits))
    other = _make_ds(tmp_path / "other", seed=12)
    with pytest.raises(ValueError, match="fitted for datastore"):
        RetrievalGate.load(tmp_path / "gate", other)
    with pytest.raises(ValueError, match="fitted for datastore"):
        KNNDecoder(other, skip=RetrievalSkip(gate=gate))
    class Unfingerprinted:            # e.g. a torch.distributed ShardedDatastore
        dim = query_dim = D

        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n
    recorded = gate.fitted_for
    try:   # fitted on such a store: matched on size and width only
        gate.fitted_for = dict(recorded, fingerprint=None)
        gate.check_datastore(Unfingerprinted(N))
        with pytest.raises(ValueError, match="fitted for datastore"):
            gate.check_datastore(Unfingerprinted(N + 1))
    finally:
        gate.fitted_for = recorded
    with pytest.raises(ValueError, match="width D=16"):
        gate.lam(hidden[:, :8], logits)
    feats = _dev(ds, T=20)[0]
    with pytest.raises(ValueError, match="D=8"):
        fit_gate(RetrievalGate(8), feats, progress=False)
    with pytest.raises(ValueError, match="not fitted"):
        RetrievalGate(D).save(tmp_path / "nope")


def test_gate_stats_only_and_bad_config(ds):
    feats = _dev(ds, T=60)[0]
    gate = RetrievalGate(D, use_hidden=False, hidden=8)
    fit_gate(gate, feats, epochs=1, progress=False)
    assert gate.lam(torch.randn(3, D), torch.randn(3, V)).shape == (3,)
    for kw, name in [(dict(dim=0), "dim"), (dict(dim=D, layers=0), "layers"),
                     (dict(dim=D, dropout=1.0), "dropout")]:
        with pytest.raises(ValueError, match=name):
            RetrievalGate(**kw)
    with pytest.raises(ValueError, match="V >= 4"):
        distribution_stats(torch.randn(2, 3))
    stats = distribution_stats(torch.zeros(1, 8))
    torch.testing.assert_close(stats[0, 0], torch.tensor(math.log(8)))
    assert isinstance(feats, GateFeatures) and isinstance(SkipStats(), SkipStats)


# --------------------------------------------------------------------------- HF


V_HF, PAD, EOS, START = 97, 0, 1, 0


@pytest.fixture(scope="module")
def hf_world(tmp_path_factory):
    pytest.importorskip("transformers")
    import knnfast.integrations.hf as H
    from helpers import random_sequences, tiny_gpt2, tiny_marian
    gpt2 = tiny_gpt2(V_HF, n_embd=32, n_layer=2, n_positions=64, pad=PAD, eos=EOS)
    marian = tiny_marian(V_HF, d_model=32, decoder_layers=2, max_positions=64, pad=PAD,
                         eos=EOS, start=START)
    marian.generation_config.forced_eos_token_id = None
    lm = random_sequences(14, 3, 12, 1, V_HF), random_sequences(5, 3, 10, 2, V_HF)
    mt = list(zip(random_sequences(16, 3, 10, 3, V_HF), random_sequences(16, 3, 10, 4, V_HF)))
    root = tmp_path_factory.mktemp("hfskip")
    gds = H.build_datastore(gpt2, lm[0], str(root / "g"), batch_size=4, progress=False)
    mds = H.build_datastore(marian, mt, str(root / "m"), batch_size=4, progress=False)
    return H, gpt2, marian, lm, mt, gds, mds


def test_evaluate_lm_skipping(hf_world):
    H, gpt2, _, lm, _, gds, _ = hf_world
    kw = dict(k=8, temperature=1.0, lam=0.5)
    base = H.evaluate_lm(gpt2, lm[1], KNNDecoder(gds, **kw), return_tokens=True, progress=False)
    off = H.evaluate_lm(gpt2, lm[1], KNNDecoder(gds, skip=RetrievalSkip(confidence=1.0), **kw),
                        return_tokens=True, progress=False)
    for name in ("base", "knn", "interpolated"):
        assert torch.equal(off.per_token[name], base.per_token[name])
    dec = KNNDecoder(gds, skip=RetrievalSkip(confidence=0.05), **kw)
    res = H.evaluate_lm(gpt2, lm[1], dec, return_tokens=True, progress=False)
    assert res.tokens == base.tokens
    frac = dec.skip_stats.fraction_rows
    assert 0 < frac < 1 and dec.skip_stats.rows == res.tokens
    skipped = res.per_token["interpolated"] != base.per_token["interpolated"]
    assert int(skipped.sum()) == dec.skip_stats.skipped_rows
    assert torch.equal(res.per_token["interpolated"][skipped], res.per_token["base"][skipped])


def test_generate_skipping_beam_and_greedy(hf_world):
    from transformers import LogitsProcessorList
    H, _, marian, _, mt, _, mds = hf_world
    src, mask = H.pad_batch([mt[0][0], mt[5][0], [7, 8, 9]], PAD)
    kw = dict(k=8, temperature=1.0, lam=0.6)
    for beams in (1, 3):
        gen = dict(input_ids=src, attention_mask=mask, max_new_tokens=6, num_beams=beams,
                   do_sample=False)
        bare = H.generate(marian, None, **gen)
        full = H.generate(marian, KNNDecoder(mds, **kw), **gen)
        assert not torch.equal(full, bare)
        off = H.generate(marian, KNNDecoder(mds, skip=RetrievalSkip(confidence=1.0), **kw), **gen)
        assert torch.equal(off, full)
        every = KNNDecoder(mds, skip=RetrievalSkip(confidence=1e-6), **kw)
        assert torch.equal(H.generate(marian, every, **gen), bare)
        assert every.skip_stats.fraction_rows == 1.0
        assert every.skip_stats.rows % (3 * beams) == 0
        seen = _Recording(mds, **kw)
        assert torch.equal(H.generate(marian, seen, **gen), full)
        median = float(torch.cat(seen.max_probs).median())
        some = KNNDecoder(mds, skip=RetrievalSkip(confidence=median), **kw)
        got = H.generate(marian, some, **gen)
        assert 0 < some.skip_stats.fraction_rows < 1
        proc = KNNDecoder(mds, skip=RetrievalSkip(confidence=median), **kw)
        with H.knn_processor(marian, proc) as p:          # the LogitsProcessor form skips too
            H.generate(marian, None, logits_processor=LogitsProcessorList([p]), **gen)
        assert proc.skip_stats.skipped_rows > 0
        assert got.shape[0] == 3


class _Recording(KNNDecoder):
    """Records each step's max model probability (to pick a threshold that splits rows)."""
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.max_probs = []

    def __call__(self, hidden, logits, **kw):
        self.max_probs.append(max_prob(logits))
        return super().__call__(hidden, logits, **kw)


def test_tune_on_a_pruned_store_weighs_counts_as_decoding(hf_world, tmp_path):
    """tune_from_features over a pruned store's neighbours = evaluate_lm with that cell."""
    H, gpt2, _, lm, _, gds, _ = hf_world
    pr = gds.prune(tmp_path / "pr", k=8, progress=False)
    assert int(pr.counts.max()) > 1
    feats = H.collect_gold_features(gpt2, lm[1], KNNDecoder(pr, k=8), progress=False)
    assert feats.neighbours.log_counts is not None
    res = H.tune_from_features(feats, ks=(4, 8), temperatures=(1.0, 10.0), lams=(0.5,))
    for cell in res.grid:
        dec = KNNDecoder(pr, k=cell["k"], temperature=cell["temperature"], lam=cell["lam"])
        ev = H.evaluate_lm(gpt2, lm[1], dec, progress=False)
        assert cell["ppl"] == pytest.approx(ev.knn_ppl, rel=1e-5), cell


def test_subclass_overriding_retrieve_sees_only_the_retrieving_rows(ds):
    """Skipping sits in retrieve_step, so a subclass's retrieve(hidden, k) keeps working
    (test_architectures' RecordingDecoder) and is asked only for the rows that search."""
    class Recording(KNNDecoder):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.asked = []

        def retrieve(self, hidden, k=None):
            self.asked.append(hidden.shape[0])
            return super().retrieve(hidden, k)
    hidden, logits = _step()
    dec = Recording(ds, k=8, skip=RetrievalSkip(confidence=0.99))
    dec(hidden, logits)
    assert dec.asked == [9]
