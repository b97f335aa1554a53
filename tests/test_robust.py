"""RobustKNNDecoder (Robust kNN-MT, Jiang et al. 2022) on a tiny random Marian built from a
config (no downloads): entry log-probs, training (loss falls, perturbation), decoding
(hand-rolled greedy loop == hf.generate, beam search), save/load, λ = 0, bad inputs."""
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import knnfast  # noqa: E402
import knnfast.integrations.hf as H  # noqa: E402
from knnfast import Neighbours, RobustKNNDecoder  # noqa: E402
from knnfast.methods.robust import (RobustFeatures, collect_robust_features,  # noqa: E402
                                    entry_logprobs, fit_robust, robust_features)

V = 61
PAD, EOS, START = 0, 1, 0
K = 8

from helpers import random_sequences, tiny_marian  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")


def _seqs(n, lo, hi, seed):
    return random_sequences(n, lo, hi, seed, V)


@pytest.fixture(scope="module")
def marian():
    model = tiny_marian(V, d_model=16, max_positions=32, pad=PAD, eos=EOS, start=START)
    model.generation_config.forced_eos_token_id = None
    with torch.no_grad():
        model.final_logits_bias.normal_()          # a head with a bias, as real Marians have
    return model


@pytest.fixture(scope="module")
def train(marian):
    return list(zip(_seqs(24, 3, 9, seed=3), _seqs(24, 3, 9, seed=4)))


@pytest.fixture(scope="module")
def ds(marian, train, tmp_path_factory):
    return H.build_datastore(marian, train, str(tmp_path_factory.mktemp("r") / "ds"),
                             key_dtype=torch.float32, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def entry(marian, train, ds):
    return entry_logprobs(marian, train, ds, batch_size=5, progress=False)


@pytest.fixture(scope="module")
def feats(marian, train, ds, entry):
    # dev = half the training pairs (their gold tokens are in the datastore) + fresh pairs
    dev = train[:12] + list(zip(_seqs(12, 3, 9, seed=5), _seqs(12, 3, 9, seed=6)))
    return collect_robust_features(marian, dev, RobustKNNDecoder(ds, k=K, entry_logp=entry),
                                   batch_size=6, progress=False)


def _decoder(ds, entry, seed=0, **kw):
    torch.manual_seed(seed)
    return RobustKNNDecoder(ds, k=K, entry_logp=entry, **kw)


# --------------------------------------------------------------------------- features


def test_entry_logprobs_are_head_of_own_key(marian, ds, entry):
    """entry_logp[i] = log softmax(W k_i + b + final_logits_bias)[v_i] ("ffn" keys)."""
    head = H.lm_head(marian)
    logits = head(ds.keys.float()) + marian.final_logits_bias.reshape(-1)
    want = torch.log_softmax(logits, -1).gather(1, ds.values[:, None]).squeeze(1)
    assert entry.shape == (len(ds),)
    torch.testing.assert_close(entry, want.detach(), atol=1e-5, rtol=1e-5)


def test_entry_logprobs_wrong_corpus(marian, train, ds):
    with pytest.raises(ValueError, match="examples it was built from"):
        entry_logprobs(marian, train[:-1], ds, progress=False)


def test_features_match_log_softmax(ds, entry):
    logits = torch.randn(5, V)
    targets = torch.randint(0, V, (5,))
    nb = RobustKNNDecoder(ds, k=K, entry_logp=entry).retrieve(torch.randn(5, ds.dim))
    f = robust_features(logits, targets, nb)
    lsm = torch.log_softmax(logits, -1)
    torch.testing.assert_close(f.query_logp, lsm.gather(1, nb.tokens))
    torch.testing.assert_close(f.top_logp, lsm.topk(8, 1).values)
    torch.testing.assert_close(f.base_gold_logp, lsm.gather(1, targets[:, None]).squeeze(1))


# --------------------------------------------------------------------------- training


def test_fit_loss_falls(ds, entry, feats):
    # without the perturbation the training loss itself falls
    res = _decoder(ds, entry).fit(feats, epochs=30, batch_size=16, lr=1e-2, perturb=False,
                                  progress=False)
    loss = res["train_loss"]
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    assert last < first - 0.05, (first, last)
    assert res["valid_nll_after"] < res["valid_nll_before"] - 0.05, res
    # with it (the training loss then mixes easy perturbed rows in, at a rate decaying over
    # ~30 updates here, 1000 in the paper's longer runs), the held-out loss falls
    dec = _decoder(ds, entry, noise_decay=30.0)
    res = dec.fit(feats, epochs=30, batch_size=16, lr=1e-2, progress=False)
    assert res["valid_nll_after"] < res["valid_nll_before"] - 0.05, res
    assert not dec.network.training
    assert dec.fit(feats, max_updates=3, progress=False)["updates"] == 3


def test_perturbation(ds, entry, feats):
    """Rate 1: every row is noised and, where the gold token is missing, gets a pseudo-
    neighbour (gold token, distance ~ σ²D) in front; rate 0: nothing changes."""
    dec = _decoder(ds, entry, noise_std=0.01)
    rows = torch.arange(feats.targets.shape[0])
    gen = torch.Generator().manual_seed(0)
    nb = feats.neighbours
    sc, tok, key, query = dec.perturb(feats, rows, 0.0, gen)
    assert torch.equal(tok, nb.tokens) and torch.equal(sc, nb.scores.float())
    assert torch.equal(query, feats.query_logp)
    sc, tok, key, query = dec.perturb(feats, rows, 1.0, gen)
    missing = ~(nb.tokens == feats.targets[:, None]).any(1)
    assert missing.any() and (~missing).any()
    assert torch.equal(tok[missing, 0], feats.targets[missing])
    assert torch.equal(query[missing, 0], feats.base_gold_logp[missing])
    assert (-sc[missing, 0] < 0.01 ** 2 * ds.dim * 4).all()
    assert (sc[:, :-1] >= sc[:, 1:]).all()                  # still sorted by distance
    moved = (sc[~missing] - nb.scores[~missing]).abs()
    assert (moved > 0).all() and (moved < 1.0).all()
    # noisy distance: mean of ||q - k - e||^2 is d + σ²D (sampled from d, no keys needed)
    d = -nb.scores[:1, :1].float()
    one = RobustFeatures(feats.targets[:1], feats.base_gold_logp[:1],
                         Neighbours(nb.scores[:1, :1], nb.tokens[:1, :1], nb.ids[:1, :1]),
                         feats.query_logp[:1, :1], feats.top_logp[:1])
    dec1 = RobustKNNDecoder(ds, k=1, entry_logp=entry, noise_std=0.3)
    one.targets = one.neighbours.tokens[:, 0].clone()     # gold present: no insertion
    draws = torch.stack([-dec1.perturb(one, torch.zeros(1, dtype=torch.long), 1.0, gen)[0]
                         for _ in range(4000)]).flatten()
    assert abs(float(draws.mean()) - float(d + 0.09 * ds.dim)) < 0.05 * float(d + 1)


# --------------------------------------------------------------------------- decoding


def _greedy(model, decoder, src, mask, steps):
    seqs = torch.full((src.shape[0], 1), START)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=src, attention_mask=mask, decoder_input_ids=seqs,
                        output_hidden_states=True)
            logp = decoder(out.decoder_hidden_states[-1][:, -1], out.logits[:, -1])
            assert logp.dtype == torch.float32 and logp.shape == (src.shape[0], V)
            torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(src.shape[0]),
                                       atol=1e-5, rtol=0)
            nxt = torch.where(done, PAD, logp.argmax(-1))
            done |= nxt == EOS
            seqs = torch.cat([seqs, nxt[:, None]], 1)
            if done.all():
                break
    return seqs


@pytest.fixture(scope="module")
def trained(ds, entry, feats):
    dec = _decoder(ds, entry)
    dec.fit(feats, epochs=10, batch_size=16, lr=1e-2, progress=False)
    return dec


def test_generate_greedy_equals_hand_loop_and_beam_runs(marian, train, trained):
    src, mask = H.pad_batch([train[0][0], train[5][0], [7, 8, 9]], PAD)
    kw = dict(input_ids=src, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = H.generate(marian, trained, num_beams=1, **kw)
    assert torch.equal(got, _greedy(marian, trained, src, mask, 6)), got
    base = H.generate(marian, None, num_beams=1, **kw)
    assert not torch.equal(got, base)
    beam = H.generate(marian, trained, num_beams=3, **kw)
    assert beam.shape[0] == 3
    ref = RobustKNNDecoder(trained.datastore, k=K, entry_logp=trained.entry_logp,
                           backend="reference")
    ref.network.load_state_dict(trained.network.state_dict())
    assert torch.equal(H.generate(marian, ref, num_beams=1, **kw), got)


def test_eval_ppl_runs(marian, train, trained):
    res = H.evaluate_lm(marian, train[:6], trained, batch_size=3, progress=False)
    assert math.isfinite(res.knn_ppl) and res.knn_ppl < res.base_ppl


def test_save_load_bitwise(ds, entry, trained, tmp_path):
    hidden, logits = torch.randn(7, ds.dim), torch.randn(7, V)
    trained.save(tmp_path / "robust")
    back = RobustKNNDecoder.load(tmp_path / "robust", ds)
    assert back.k == K and back.network.distance[0].out_features == 32
    assert torch.equal(back(hidden, logits), trained(hidden, logits))
    assert torch.equal(back.entry_logp, trained.entry_logp)


def test_lambda_zero_is_base_model(ds, entry):
    dec = _decoder(ds, entry)
    with torch.no_grad():
        dec.network.distance[-1].bias[0] = -1e4          # a -> -inf: λ = sigmoid(a - s) = 0
    hidden, logits = torch.randn(6, ds.dim), torch.randn(6, V) * 3
    nb = dec.retrieve(hidden)
    assert (dec.mixture(logits, nb)[1] == 0).all()
    torch.testing.assert_close(dec(hidden, logits), torch.log_softmax(logits, -1),
                               atol=1e-6, rtol=0)


def test_weights_are_the_papers_softmax(ds, entry):
    """weights = softmax(-d·sigmoid(t) + c), λ = sigmoid(a - s), by hand from the layers."""
    dec = _decoder(ds, entry, seed=3)
    hidden, logits = torch.randn(4, ds.dim), torch.randn(4, V)
    nb = dec.retrieve(hidden)
    net = dec.network
    with torch.no_grad():
        w, lam = dec.mixture(logits, nb)
        lsm = torch.log_softmax(logits, -1)
        ql, kl, d = lsm.gather(1, nb.tokens), entry[nb.ids], -nb.scores
        c = net.confidence(torch.stack([kl, ql], -1)).squeeze(-1)
        s = net.model_lambda(torch.cat([lsm.topk(8, 1).values, kl, ql], 1)).squeeze(1)
        a, t = net.distance(torch.cat([d, knnfast.label_counts(nb.tokens).float()], 1)).unbind(1)
    torch.testing.assert_close(w, torch.softmax(-d * torch.sigmoid(t)[:, None] + c, 1))
    torch.testing.assert_close(lam, torch.sigmoid(a - s))


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("k", [0, knnfast.defaults.MAX_K + 1, -1, 2.0])
def test_bad_k(ds, entry, k):
    with pytest.raises(ValueError, match="k must be"):
        RobustKNNDecoder(ds, k=k, entry_logp=entry)


def test_bad_inputs(ds, entry, trained, feats, tmp_path):
    with pytest.raises(ValueError, match="queries must have shape"):
        trained(torch.randn(2, ds.dim + 1), torch.randn(2, V))
    with pytest.raises(ValueError, match="entry_logp must have shape"):
        RobustKNNDecoder(ds, k=K, entry_logp=entry[:-1])
    with pytest.raises(ValueError, match="at least 8 columns"):
        trained(torch.randn(2, ds.dim), torch.randn(2, 5))
    with pytest.raises(ValueError, match="neighbours per position"):
        RobustKNNDecoder(ds, k=4, entry_logp=entry).fit(feats, progress=False)
    trained.save(tmp_path / "r")
    with pytest.raises(ValueError, match="trained for k=8"):
        RobustKNNDecoder.load(tmp_path / "r", ds, k=4)
    small = ds.subsample(0.5, path=str(tmp_path / "small"))
    with pytest.raises(ValueError, match="fitted on a datastore"):
        RobustKNNDecoder.load(tmp_path / "r", small)


def test_bad_metric(ds, entry):
    with pytest.raises(ValueError, match="metric must be 'l2'"):
        RobustKNNDecoder(ds, k=K, entry_logp=entry, metric="ip")


def test_fit_robust_hf_path(marian, train, ds, entry):
    dec = _decoder(ds, entry)
    res = fit_robust(marian, train[:8], dec, batch_size=4, max_updates=5, progress=False)
    assert res["updates"] == 5


def test_cli_translate_robust(ds, trained, tmp_path):
    """`knnfast translate --robust DIR` loads the decoder (make_decoder), a bad DIR exits."""
    from knnfast.app import cli
    trained.save(tmp_path / "r")
    args = cli.build_parser().parse_args(["translate", "--model", "m", "--datastore", ds.path,
                                          "--robust", str(tmp_path / "r")])
    dec = cli.make_decoder(args, ds)
    assert isinstance(dec, RobustKNNDecoder) and dec.exact
    hidden, logits = torch.randn(3, ds.dim), torch.randn(3, V)
    assert torch.equal(dec(hidden, logits), trained(hidden, logits))
    args.robust = str(tmp_path / "missing")
    with pytest.raises(SystemExit, match="--robust"):
        cli.make_decoder(args, ds)
