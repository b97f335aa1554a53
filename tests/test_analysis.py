"""knnfast.methods.analysis on a tiny GPT-2 built in the test: frequency buckets, retrieval accuracy
and recall, the mask/score grid, the size sweep, and the plots."""
import pytest
import torch

import knnfast.integrations.hf as H
from knnfast import KNNDecoder
from knnfast.app import plots
from knnfast.methods import analysis

from helpers import tiny_gpt2

pytestmark = pytest.mark.usefixtures("single_threaded")
V = 41


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_gpt2(V, n_embd=32, n_layer=1, n_positions=64)
    g = torch.Generator().manual_seed(1)
    train = [torch.randint(2, V, (int(torch.randint(5, 15, (1,), generator=g)),), generator=g).tolist()
             for _ in range(30)]
    ds = H.build_datastore(model, train, str(tmp_path_factory.mktemp("an") / "ds"), progress=False)
    ds.build_index("IVF4,PQ4x4", nprobe=1, progress=False)
    return model, train, ds


def test_target_counts_and_buckets():
    counts = analysis.target_counts([[1, 2, 2, 3], ([9], [2, 4])])
    assert counts == {2: 3, 3: 1, 4: 1}
    b = analysis.frequency_buckets((0, 2, 5))
    assert [x.label for x in b] == ["[0, 2)", "[2, 5)", ">= 5"]
    with pytest.raises(ValueError, match="increasing"):
        analysis.frequency_buckets((5, 2))


def test_retrieval_on_the_training_set_finds_itself(setup, tmp_path):
    model, train, ds = setup
    counts = analysis.target_counts(train)
    buckets = analysis.retrieval_by_frequency(model, train, ds, counts, k=4, edges=(0, 2, 4),
                                              exact=True)
    assert sum(b.positions for b in buckets) == len(ds)
    for b in buckets:
        if b.positions:
            assert b.recall == 1.0                     # the self-match is always retrieved
            assert 0.25 <= b.knn_accuracy <= 1.0
    # a hand computation for one bucket
    feats = H.collect_gold_features(model, train, KNNDecoder(ds, k=4, exact=True), 4)
    freq = torch.tensor([counts[int(t)] for t in feats.targets])
    sel = freq >= 4
    want = ((feats.neighbours.tokens == feats.targets[:, None]).float().mean(1))[sel].mean()
    assert buckets[-1].knn_accuracy == pytest.approx(float(want))
    plots.plot_buckets(buckets, str(tmp_path / "b.png"), "test")
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"


def test_mask_score_grid(setup):
    model, train, ds = setup
    grid = analysis.mask_score_grid(model, train[:8], ds, k=4, temperature=1.0, lam=0.5)
    assert set(grid) == {"base", "real mask, real score", "real mask, approx score",
                         "approx mask, real score", "approx mask, approx score"}
    exact = H.evaluate_lm(model, train[:8], KNNDecoder(ds, k=4, temperature=1.0, lam=0.5,
                                                         exact=True), progress=False)
    assert grid["real mask, real score"] == pytest.approx(exact.knn_ppl)
    assert grid["base"] == pytest.approx(exact.base_ppl)
    assert grid["approx mask, approx score"] != pytest.approx(grid["real mask, real score"])


def test_size_sweep(setup, tmp_path):
    model, train, ds = setup
    points = analysis.size_sweep(model, train[:8], ds, fractions=(0.2, 1.0), k=4)
    assert points[0][0] == round(0.2 * len(ds)) and points[1][0] == len(ds)
    assert points[1][1] < points[0][1]                 # the full datastore contains the test set
    plots.plot_curve(points, str(tmp_path / "s.png"), "entries", "ppl", logx=True)
    assert (tmp_path / "s.png").exists()
