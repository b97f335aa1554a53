"""Sliding-window evaluation: hf.sliding_windows and the ``scored`` argument of evaluate_lm,
collect_gold_features and tune (only the last ``scored[i]`` targets of example i count)."""
import math

import pytest
import torch

import knnfast.integrations.hf as H
from knnfast import KNNDecoder

from helpers import random_sequences, tiny_gpt2

pytestmark = pytest.mark.usefixtures("single_threaded")
V = 37


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_gpt2(V, n_embd=32, n_layer=1, n_positions=32)
    train = random_sequences(20, 5, 15, seed=1, vocab=V)
    ds = H.build_datastore(model, train, str(tmp_path_factory.mktemp("sw") / "ds"),
                           progress=False)
    stream = [t for row in random_sequences(6, 8, 20, seed=2, vocab=V) for t in row]
    return model, ds, stream


@pytest.mark.parametrize("n,window,stride", [(2, 2, 1), (10, 4, 1), (10, 4, 3), (23, 8, 5),
                                             (7, 16, 4), (40, 12, 11)])
def test_windows_score_every_target_once(n, window, stride):
    ids = list(range(100, 100 + n))
    wins, scored = H.sliding_windows(ids, window, stride)
    assert len(wins) == len(scored)
    seen = []
    for i, (w, s) in enumerate(zip(wins, scored)):
        assert 2 <= len(w) <= window and w == ids[w[0] - 100:w[-1] - 100 + 1]
        assert 1 <= s <= len(w) - 1
        targets = w[len(w) - s:]
        if i:   # every later window gives its scored targets >= window - stride of context
            assert len(w) - s >= min(window - stride, w[0] - 100 + len(w) - s)
            assert s <= stride
        seen += targets
    assert seen == ids[1:]                       # each target exactly once, in order


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="stride < window"):
        H.sliding_windows([1, 2, 3], 4, 4)
    with pytest.raises(ValueError, match="stride < window"):
        H.sliding_windows([1, 2, 3], 4, 0)
    with pytest.raises(ValueError, match=">= 2 tokens"):
        H.sliding_windows([5], 4, 2)


def test_scored_equals_masking_the_per_token_results(setup):
    model, ds, stream = setup
    wins, scored = H.sliding_windows(stream, 12, 5)
    dec = KNNDecoder(ds, k=4, temperature=10.0, lam=0.3, exact=True)
    full = H.evaluate_lm(model, wins, dec, batch_size=3, return_tokens=True, progress=False)
    part = H.evaluate_lm(model, wins, dec, batch_size=3, return_tokens=True, progress=False,
                         scored=scored)
    keep = H.scored_mask(wins, scored)
    assert part.tokens == len(stream) - 1 == int(keep.sum()) < full.tokens
    for name in ("base", "knn", "interpolated", "example", "position"):
        torch.testing.assert_close(part.per_token[name], full.per_token[name][keep])
    ppl = lambda lp: math.exp(-float(lp.double().mean()))  # noqa: E731
    assert part.base_ppl == pytest.approx(ppl(full.per_token["base"][keep]), rel=1e-6)
    assert part.knn_ppl == pytest.approx(ppl(full.per_token["interpolated"][keep]), rel=1e-6)
    oracle = torch.maximum(full.per_token["base"], full.per_token["knn"])[keep]
    assert part.oracle_ppl == pytest.approx(ppl(oracle), rel=1e-6)


def test_one_window_is_the_plain_evaluation(setup):
    model, ds, stream = setup
    short = stream[:30]
    wins, scored = H.sliding_windows(short, 32, 8)
    assert wins == [short] and scored == [29]
    dec = KNNDecoder(ds, k=4, temperature=10.0, lam=0.3, exact=True)
    a = H.evaluate_lm(model, wins, dec, scored=scored, progress=False)
    b = H.evaluate_lm(model, [short], dec, progress=False)
    assert (a.tokens, a.base_ppl, a.knn_ppl) == (b.tokens, b.base_ppl, b.knn_ppl)


def test_features_and_tuning_keep_only_scored_positions(setup):
    model, ds, stream = setup
    wins, scored = H.sliding_windows(stream, 10, 3)
    dec = KNNDecoder(ds, k=4, exact=True)
    full = H.collect_gold_features(model, wins, dec, batch_size=4, progress=False)
    part = H.collect_gold_features(model, wins, dec, batch_size=4, progress=False,
                                   scored=scored)
    keep = H.scored_mask(wins, scored)
    torch.testing.assert_close(part.targets, full.targets[keep])
    torch.testing.assert_close(part.base_gold_logp, full.base_gold_logp[keep])
    torch.testing.assert_close(part.neighbours.ids, full.neighbours.ids[keep])
    a = H.tune(model, wins, ds, ks=(2, 4), temperatures=(1.0, 10.0), lams=(0.2, 0.5),
               exact=True, progress=False, scored=scored)
    b = H.tune_from_features(part, (2, 4), (1.0, 10.0), (0.2, 0.5))
    assert a.best == b.best


def test_zero_scored_batches_and_bad_scored(setup):
    model, ds, stream = setup
    wins, scored = H.sliding_windows(stream, 10, 3)
    scored = [0] * 4 + scored[4:]               # a whole first batch of context only
    dec = KNNDecoder(ds, k=4, exact=True)
    res = H.evaluate_lm(model, wins, dec, batch_size=4, progress=False, scored=scored)
    assert res.tokens == sum(scored)
    with pytest.raises(ValueError, match="entries for"):
        H.evaluate_lm(model, wins, dec, progress=False, scored=scored[:-1])
    with pytest.raises(ValueError, match=r"scored\[0\] = 10 is outside \[0, 9\]"):
        H.evaluate_lm(model, wins, dec, progress=False, scored=[10] + scored[1:])
