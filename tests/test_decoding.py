"""knnfast.methods.decoding: KNNDecoder (fused vs reference backend vs a float64 hand computation,
hand-rolled greedy and beam loops), gold_two_column, AdaptiveKNNDecoder / MetaKNetwork
(mixture math, λ, empty rows, training, save/load), bad inputs."""
import math

import pytest
import torch

import knnfast
import knnfast.reference as ref
from knnfast import AdaptiveKNNDecoder, Datastore, KNNDecoder, Neighbours
from knnfast.methods.decoding import MetaKNetwork, gold_two_column
from helpers import assert_logp_close

V, D, N = 40, 16, 600



pytestmark = pytest.mark.usefixtures("single_threaded")


def _make_ds(path, keys, values, metric="l2", vocab_size=V):
    with Datastore.create(path, keys.shape[1], vocab_size=vocab_size, metric=metric,
                          progress=False) as w:
        half = len(keys) // 2
        w.add(keys[:half], values[:half])
        w.add(keys[half:], values[half:])
    return Datastore.open(path)


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    g = torch.Generator().manual_seed(11)
    keys = torch.randn(N, D, generator=g) * 0.5
    values = torch.randint(0, V, (N,), generator=g)
    return _make_ds(tmp_path_factory.mktemp("dec") / "ds", keys, values)


def _hand_logp(hidden, logits, ds, k, tau, lam, metric):
    """float64: log((1-λ) softmax(logits) + λ Σ_j 1[v_j = v] softmax(s / τ)_j)."""
    keys = ds.keys.float().double()              # the stored fp16 keys
    h = hidden.double()
    s = -torch.cdist(h, keys) ** 2 if metric == "l2" else h @ keys.T
    top = s.topk(k, dim=1)
    w = torch.softmax(top.values / tau, dim=1)
    tok = ds.values.long()[top.indices]
    p_knn = torch.zeros(hidden.shape[0], logits.shape[1], dtype=torch.float64)
    p_knn.scatter_add_(1, tok, w)
    return torch.log((1 - lam) * torch.softmax(logits.double(), -1) + lam * p_knn)


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("B", [1, 7])
def test_decoder_fused_reference_and_hand(ds, k, metric, B):
    hidden = torch.randn(B, D) * 0.5
    logits = torch.randn(B, V) * 2
    for tau, lam in [(1.0, 0.25), (10.0, 0.7), (0.3, 1.0), (100.0, 0.0), (2.0, 0.5)]:
        fused = KNNDecoder(ds, k=k, temperature=tau, lam=lam, metric=metric)
        refd = KNNDecoder(ds, k=k, temperature=tau, lam=lam, metric=metric, backend="reference")
        got = fused(hidden, logits)
        exp = refd(hidden, logits)
        assert got.shape == (B, V) and got.dtype == torch.float32
        assert_logp_close(got, exp, atol=1e-5, rtol=1e-5)
        hand = _hand_logp(hidden, logits, ds, k, tau, lam, metric)
        assert_logp_close(got, hand, atol=1e-4, rtol=1e-4)
        # gold_logprob is the same mixture read at the target
        targets = torch.randint(0, V, (B,))
        nbrs = fused.retrieve(hidden)
        gl = fused.gold_logprob(logits, targets, nbrs)
        assert_logp_close(gl, got.gather(1, targets[:, None]).squeeze(1), atol=1e-5)


def test_decoder_neighbours_and_out(ds):
    hidden = torch.randn(5, D) * 0.5
    logits = torch.randn(5, V)
    dec = KNNDecoder(ds, k=6, temperature=3.0, lam=0.4)
    nb = dec.retrieve(hidden)
    s, i = ref.knn_search(hidden, ds.keys.float(), 6, "l2")
    assert torch.equal(nb.ids, i)
    torch.testing.assert_close(nb.scores, s)
    assert torch.equal(nb.tokens, ds.values.long()[i])
    out = torch.empty(5, V)
    res = dec(hidden, logits, out=out)
    assert res.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, dec(hidden, logits))
    # a datastore loaded into RAM gives the same step
    torch.testing.assert_close(KNNDecoder(ds.to("cpu"), k=6, temperature=3.0, lam=0.4)(hidden, logits),
                               out)
    # tensor λ / τ per row
    lam = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0])
    tau = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    got = KNNDecoder(ds, k=6, temperature=tau, lam=lam)(hidden, logits)
    exp = KNNDecoder(ds, k=6, temperature=tau, lam=lam, backend="reference")(hidden, logits)
    assert_logp_close(got, exp, atol=1e-5)
    for r in range(5):
        assert_logp_close(got[r:r + 1], _hand_logp(hidden[r:r + 1], logits[r:r + 1], ds, 6,
                                                   float(tau[r]), float(lam[r]), "l2"), atol=1e-4)


def test_decoder_with_flat_index(tmp_path):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(300, 8, generator=g), torch.randint(0, V, (300,), generator=g)
    ds = _make_ds(tmp_path / "ds", keys, values)
    hidden, logits = torch.randn(4, 8), torch.randn(4, V)
    want = KNNDecoder(ds, k=5, temperature=5.0, lam=0.5)(hidden, logits)
    ds.build_index("Flat", progress=False, save=False)
    for backend in ("fused", "reference"):
        got = KNNDecoder(ds, k=5, temperature=5.0, lam=0.5, backend=backend)(hidden, logits)
        assert_logp_close(got, want, atol=1e-4)


# --------------------------------------------------------------------------- hand-written loops


class ToyModel:
    """A deterministic 'model': h_t = tanh(0.6 h_{t-1} + E[x_t]), logits = h_t W."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.E = torch.randn(V, D, generator=g)
        self.W = torch.randn(D, V, generator=g) * 0.7

    def step(self, prefixes):
        h = torch.zeros(prefixes.shape[0], D)
        for t in range(prefixes.shape[1]):
            h = torch.tanh(0.6 * h + self.E[prefixes[:, t]])
        return h, h @ self.W


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    model = ToyModel()
    g = torch.Generator().manual_seed(3)
    prefixes = torch.randint(0, V, (400, 4), generator=g)
    keys, _ = model.step(prefixes)
    values = torch.randint(0, V, (400,), generator=g)   # not what the model predicts
    ds = _make_ds(tmp_path_factory.mktemp("toy") / "ds", keys, values)
    return model, ds


def _greedy(model, decoder, prompts, steps):
    seqs = prompts.clone()
    for _ in range(steps):
        h, logits = model.step(seqs)
        logp = torch.log_softmax(logits, -1) if decoder is None else decoder(h, logits)
        seqs = torch.cat([seqs, logp.argmax(-1, keepdim=True)], 1)
    return seqs


def _beam(model, decoder, prompts, steps, beams):
    B = prompts.shape[0]
    seqs = prompts.repeat_interleave(beams, 0)
    scores = torch.full((B, beams), -1e9, dtype=torch.float64)
    scores[:, 0] = 0.0
    for _ in range(steps):
        h, logits = model.step(seqs)
        logp = decoder(h, logits).double()
        cand = (scores.reshape(-1, 1) + logp).view(B, beams * V)
        top = cand.topk(beams, dim=1)
        src = top.indices // V + torch.arange(B)[:, None] * beams
        seqs = torch.cat([seqs[src.reshape(-1)], (top.indices % V).reshape(-1, 1)], 1)
        scores = top.values
    return seqs.view(B, beams, -1), scores


def test_greedy_loop_parity(toy):
    model, ds = toy
    prompts = torch.randint(0, V, (3, 2), generator=torch.Generator().manual_seed(1))
    kw = dict(k=8, temperature=0.5, lam=0.6)
    fused = _greedy(model, KNNDecoder(ds, **kw), prompts, 8)
    refd = _greedy(model, KNNDecoder(ds, backend="reference", **kw), prompts, 8)
    base = _greedy(model, None, prompts, 8)
    assert torch.equal(fused, refd)
    assert not torch.equal(fused, base)   # kNN changed the decisions: the test has teeth


def test_beam_loop_parity(toy):
    model, ds = toy
    prompts = torch.randint(0, V, (2, 2), generator=torch.Generator().manual_seed(2))
    kw = dict(k=8, temperature=0.5, lam=0.5)
    fs, fsc = _beam(model, KNNDecoder(ds, **kw), prompts, 6, 3)
    rs, rsc = _beam(model, KNNDecoder(ds, backend="reference", **kw), prompts, 6, 3)
    bs, _ = _beam(model, KNNDecoder(ds, **dict(kw, lam=0.0)), prompts, 6, 3)
    assert torch.equal(fs, rs)
    torch.testing.assert_close(fsc, rsc, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fs, bs)
    assert (fsc[:, :-1] >= fsc[:, 1:]).all()


# --------------------------------------------------------------------------- gold two-column


def test_gold_two_column_equals_full():
    g = torch.Generator().manual_seed(7)
    B, K = 64, 8
    logits = torch.randn(B, V, generator=g) * 3
    targets = torch.randint(0, V, (B,), generator=g)
    logits[0, targets[0]] = 40.0          # p(y) ~ 1: log(1 - p) branch
    logits[1, targets[1]] = -40.0         # p(y) ~ 0
    logits[2] = 0.0                       # uniform
    tokens = torch.randint(0, V, (B, K), generator=g)
    hit = torch.rand(B, K, generator=g) < 0.3
    tokens = torch.where(hit, targets[:, None], tokens)
    tokens[torch.rand(B, K, generator=g) < 0.15] = -1
    tokens[3] = -1                        # no valid neighbour
    tokens[4] = targets[4]                # all neighbours are the target
    scores = (torch.randn(B, K, generator=g) * 3).masked_fill(tokens < 0, float("-inf"))
    base = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    logits2, tokens2 = gold_two_column(base, tokens, targets)
    assert logits2.shape == (B, 2) and tokens2.shape == (B, K)
    assert torch.equal(tokens2 == -1, tokens == -1)
    assert torch.equal(tokens2 == 0, tokens == targets[:, None])
    zeros = torch.zeros(B, dtype=torch.long)
    for tau, lam in [(1.0, 0.3), (5.0, 0.9), (0.5, 1.0), (2.0, 0.0)]:
        for fn in (knnfast.knn_gold_logprob, ref.knn_gold_logprob):
            two = fn(logits2, zeros, tokens2, scores=scores, temperature=tau, lam=lam)
            full = fn(logits, targets, tokens, scores=scores, temperature=tau, lam=lam)
            assert_logp_close(two, full, atol=2e-5, rtol=1e-5)
        w = torch.rand(B, K, generator=g)
        two = knnfast.knn_gold_logprob(logits2, zeros, tokens2, weights=w, lam=lam)
        full = ref.knn_gold_logprob(logits, targets, tokens, weights=w, lam=lam)
        assert_logp_close(two, full, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------- adaptive


@pytest.mark.parametrize("max_k", [1, 2, 8, 32])
def test_meta_k_network_shape(max_k):
    net = MetaKNetwork(max_k)
    assert net.ks == [0] + [2 ** i for i in range(int(math.log2(max_k)) + 1)]
    assert len(net.ks) == 2 + int(math.log2(max_k))
    assert net.net[0].in_features == 2 * max_k and net.net[-1].out_features == len(net.ks)
    scores = -torch.rand(5, max_k).cumsum(1) * 3
    tokens = torch.randint(0, V, (5, max_k))
    p = net(scores, tokens)
    assert p.shape == (5, len(net.ks))
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    assert (p >= 0).all()
    # features: distances and distinct-label counts
    f = net.features(scores, tokens)
    torch.testing.assert_close(f[:, :max_k], -scores)
    assert torch.equal(f[:, max_k:].long(), ref.label_counts(tokens))


@pytest.mark.parametrize("max_k", [3, 6, 0, 12])
def test_max_k_not_power_of_two(ds, max_k):
    with pytest.raises(ValueError, match="power of two"):
        MetaKNetwork(max_k)
    with pytest.raises(ValueError):
        AdaptiveKNNDecoder(ds, max_k=max_k)


def _hand_mixture(net, scores, tokens, tau):
    """Zheng et al.: p(k=0) p_model + Σ_{r>0} p(k_r) softmax(s[:k_r] / τ) (all slots valid)."""
    p = net(scores, tokens).double()
    B, K = scores.shape
    w = torch.zeros(B, K, dtype=torch.float64)
    for r, kr in enumerate(net.ks[1:], start=1):
        w[:, :kr] += p[:, r:r + 1] * torch.softmax(scores[:, :kr].double() / tau, 1)
    return w, p


def test_mixture_weights_and_lambda():
    torch.manual_seed(0)
    net = MetaKNetwork(8).eval()
    B, K = 6, 8
    scores = -(torch.rand(B, K) * 5).sort(1).values
    tokens = torch.randint(0, V, (B, K))
    tokens[4] = -1                           # no valid neighbour
    scores[4] = float("-inf")
    tokens[5, 3:] = -1                       # three valid neighbours
    scores[5, 3:] = float("-inf")
    with torch.no_grad():
        w, lam = net.mixture(scores, tokens, 2.0)
        p = net(scores, tokens)
    assert w.shape == (B, K) and lam.shape == (B,)
    valid = torch.tensor([True, True, True, True, False, True])
    torch.testing.assert_close(w[valid].sum(1), torch.ones(5))
    torch.testing.assert_close(lam[valid], 1 - p[valid, 0])
    assert lam[4] == 0 and (w[4] == 0).all()
    assert (w[5, 3:] == 0).all()
    hw, hp = _hand_mixture(net, scores[:4], tokens[:4], 2.0)
    torch.testing.assert_close(w[:4].double() * (1 - hp[:, :1]), hw, rtol=1e-5, atol=1e-7)


def test_adaptive_decoder_step(ds):
    torch.manual_seed(0)
    dec = AdaptiveKNNDecoder(ds, max_k=8, temperature=0.5)
    refd = AdaptiveKNNDecoder(ds, max_k=8, temperature=0.5, backend="reference")
    refd.network.load_state_dict(dec.network.state_dict())
    hidden, logits = torch.randn(7, D) * 0.5, torch.randn(7, V) * 2
    got = dec(hidden, logits)
    assert_logp_close(got, refd(hidden, logits), atol=1e-5)
    # independent: log(p0 softmax(logits) + Σ_r p_r P_kNN^(k_r))
    nb = dec.retrieve(hidden)
    with torch.no_grad():
        hw, hp = _hand_mixture(dec.network, nb.scores, nb.tokens, 0.5)
    p_knn = torch.zeros(7, V, dtype=torch.float64).scatter_add_(1, nb.tokens, hw)
    hand = torch.log(hp[:, :1] * torch.softmax(logits.double(), -1) + p_knn)
    assert_logp_close(got, hand, atol=1e-5)
    targets = torch.randint(0, V, (7,))
    gl = dec.gold_logprob(logits, targets, nb)
    assert_logp_close(gl.detach(), got.gather(1, targets[:, None]).squeeze(1), atol=1e-5)


def test_adaptive_no_valid_neighbour_is_base_model(ds):
    dec = AdaptiveKNNDecoder(ds, max_k=4)
    logits = torch.randn(3, V)
    nb = Neighbours(torch.full((3, 4), float("-inf")), torch.full((3, 4), -1, dtype=torch.long),
                    torch.full((3, 4), -1, dtype=torch.long))
    nb.scores[1, :2] = torch.tensor([-1.0, -2.0])
    nb.tokens[1, :2] = torch.tensor([5, 6])
    out = dec.interpolate(logits, nb)
    torch.testing.assert_close(out[[0, 2]], torch.log_softmax(logits[[0, 2]], -1))
    assert not torch.allclose(out[1], torch.log_softmax(logits[1], -1))
    with torch.no_grad():
        _, lam = dec.network.mixture(nb.scores, nb.tokens, dec.temperature)
    assert lam[0] == 0 and lam[2] == 0 and lam[1] > 0


def _synthetic_dev(T=512, K=8, seed=0):
    """Positions where the datastore is informative: close neighbours carry the gold token."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, V, (T,), generator=g)
    base = torch.log(torch.rand(T, generator=g) * 0.05 + 0.01)       # the model is poor
    good = torch.rand(T, generator=g) < 0.7
    dist = torch.rand(T, K, generator=g).cumsum(1) + torch.where(good, 0.0, 5.0)[:, None]
    tokens = torch.randint(0, V, (T, K), generator=g)
    hits = (torch.rand(T, K, generator=g) < 0.9) & good[:, None]
    tokens = torch.where(hits, targets[:, None], tokens)
    return base, targets, Neighbours(-dist, tokens, torch.arange(T * K).view(T, K))


def test_adaptive_fit_lowers_valid_nll(ds):
    torch.manual_seed(0)
    dec = AdaptiveKNNDecoder(ds, max_k=8, temperature=1.0)
    base, targets, nb = _synthetic_dev(T=256)
    res = dec.fit(base, targets, nb, epochs=4, batch_size=64, lr=3e-2, progress=False)
    assert res["valid_nll_after"] < res["valid_nll_before"] - 0.1, res
    assert res["updates"] == len(res["train_loss"]) > 0
    assert not dec.network.training
    # the trained network trusts the datastore more where it is informative
    with torch.no_grad():
        _, lam = dec.network.mixture(nb.scores, nb.tokens, 1.0)
    good = nb.scores[:, 0] > -2
    assert lam[good].mean() > lam[~good].mean()
    # max_updates caps training
    dec2 = AdaptiveKNNDecoder(ds, max_k=8)
    assert dec2.fit(base, targets, nb, max_updates=3, progress=False)["updates"] == 3


def test_adaptive_save_load(ds, tmp_path):
    torch.manual_seed(0)
    dec = AdaptiveKNNDecoder(ds, max_k=8, temperature=3.0, hidden=16)
    base, targets, nb = _synthetic_dev(T=64)
    dec.fit(base, targets, nb, epochs=2, progress=False)
    dec.save(tmp_path / "meta")
    back = AdaptiveKNNDecoder.load(tmp_path / "meta", ds)
    assert back.k == 8 and back.temperature == 3.0 and back.network.net[0].out_features == 16
    hidden, logits = torch.randn(5, D), torch.randn(5, V)
    assert torch.equal(back(hidden, logits), dec(hidden, logits))
    other = AdaptiveKNNDecoder.load(tmp_path / "meta", ds, temperature=1.0, backend="reference")
    assert other.temperature == 1.0 and other.backend == "reference"


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("k", [0, 2049, -1, 2.0, True])
def test_bad_k(ds, k):
    with pytest.raises(ValueError, match="k must be"):
        KNNDecoder(ds, k=k)


def test_bad_backend(ds):
    with pytest.raises(ValueError, match="backend"):
        KNNDecoder(ds, backend="nope")
    with pytest.raises(ValueError, match="backend"):
        AdaptiveKNNDecoder(ds, max_k=4, backend="nope")


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_bad_step_inputs(ds, backend):
    dec = KNNDecoder(ds, k=4, backend=backend)
    with pytest.raises(ValueError, match="hidden"):
        dec(torch.randn(2, 1, D), torch.randn(2, V))
    with pytest.raises(ValueError, match="same B"):
        dec(torch.randn(3, D), torch.randn(2, V))
    with pytest.raises(ValueError, match="logits"):
        dec(torch.randn(2, D), torch.randn(2, 1, V))
    with pytest.raises(ValueError):
        dec(torch.randn(2, D + 1), torch.randn(2, V))
    with pytest.raises(ValueError):           # tokens >= V: logits narrower than the vocab
        KNNDecoder(ds, k=64, lam=0.5, backend=backend)(torch.randn(2, D), torch.randn(2, 3))
