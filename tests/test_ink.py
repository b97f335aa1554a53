"""knnfast.methods.ink adapters and the OPL baseline on tiny GPT-2 / Marian built in the test."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, MarianConfig, MarianMTModel

from helpers import random_pairs, tiny_marian
from knnfast.methods import ink
from knnfast.methods.multi_embedding import MultiEmbeddingSoftmax

pytestmark = pytest.mark.usefixtures("single_threaded")
V = 53


def _marian():
    torch.manual_seed(0)
    return MarianMTModel(MarianConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, max_position_embeddings=64)).eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2,
                                      n_positions=64)).eval()


def _marian_logits(m):
    src = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    dec = torch.tensor([[0, 11, 12], [0, 13, 14]])
    return m(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=dec).logits


@pytest.mark.parametrize("make,blocks", [(_marian, 5), (_gpt2, 2)])
def test_adapters_start_as_identity_and_only_they_train(make, blocks):
    model = make()
    run = _marian_logits if make is _marian else (lambda m: m(input_ids=torch.tensor([[3, 4, 5]])).logits)
    before = run(model)
    adapters = ink.add_adapters(model, size=8, dropout=0.0)
    assert len(adapters) == blocks
    torch.testing.assert_close(run(model), before)              # up-projection starts at 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(ink.ADAPTERS_ATTR) for n in trainable)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        loss = run(model).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = run(model)
    assert not torch.allclose(after, before)                    # the adapters act
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    ink.remove_adapters(model)
    assert not hasattr(model, ink.ADAPTERS_ATTR)
    torch.testing.assert_close(run(model), before)              # original model back
    assert all(p.requires_grad for p in model.parameters())


def test_adapter_hooks_cover_encoder_and_decoder():
    model = _marian()
    adapters = ink.add_adapters(model, size=4, dropout=0.0)
    with torch.no_grad():
        adapters[0].up.bias.fill_(1.0)                          # an encoder block's adapter
    changed = _marian_logits(model)
    with torch.no_grad():
        adapters[0].up.bias.zero_()
        adapters[-1].up.bias.fill_(1.0)                         # the last decoder block's
    changed_dec = _marian_logits(model)
    ink.remove_adapters(model)
    base = _marian_logits(model)
    assert not torch.allclose(changed, base) and not torch.allclose(changed_dec, base)


def test_add_twice_and_remove_without_adapters_raise():
    model = _gpt2()
    ink.add_adapters(model, size=4)
    with pytest.raises(ValueError, match="already"):
        ink.add_adapters(model)
    ink.remove_adapters(model)
    with pytest.raises(ValueError, match="no knnfast adapters"):
        ink.remove_adapters(model)


def test_output_projection_only_unties_and_freezes():
    model = _marian()
    embed = model.get_input_embeddings().weight.detach().clone()
    params = ink.output_projection_only(model)
    head = model.get_output_embeddings().weight
    assert params[0] is head and head.requires_grad
    assert head is not model.get_input_embeddings().weight
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    opt = torch.optim.SGD(params, lr=1.0)
    _marian_logits(model).logsumexp(-1).mean().backward()
    opt.step()
    assert not torch.equal(head, embed)
    assert torch.equal(model.get_input_embeddings().weight, embed)   # embeddings untouched


def test_multi_embedding_softmax():
    torch.manual_seed(0)
    T, D, Vs = 400, 8, 11
    hidden = torch.randn(T, D)
    targets = (hidden[:, 0] > 0).long() * 3 + (hidden[:, 1] > 0).long()   # learnable
    mes = MultiEmbeddingSoftmax(D, Vs, n=3)
    logp = mes(hidden)
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(T))
    # by hand: sum of the n embeddings' softmax mass per word
    z = hidden @ mes.weight.T + mes.bias
    p = torch.softmax(z, 1).view(T, Vs, 3).sum(-1)
    torch.testing.assert_close(logp, p.log(), rtol=1e-5, atol=1e-5)
    losses = mes.fit(hidden, targets, epochs=30, batch_size=100, lr=1e-2)
    assert losses[-1] < 0.5 * losses[0]
    one = MultiEmbeddingSoftmax(D, Vs, n=1)
    torch.testing.assert_close(one(hidden), torch.log_softmax(hidden @ one.weight.T + one.bias, 1))


def test_multi_embedding_interpolated_loss():
    torch.manual_seed(1)
    hidden = torch.randn(50, 4)
    targets = torch.randint(0, 5, (50,))
    mes = MultiEmbeddingSoftmax(4, 5, n=2)
    base = torch.full((50,), -1.0)
    got = mes.loss(hidden, targets, base, lam=0.3)
    p = mes(hidden).gather(1, targets[:, None]).squeeze(1).exp()
    want = -torch.log(0.7 * torch.exp(base) + 0.3 * p).mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="lam"):
        mes.loss(hidden, targets, base, lam=1.0)
    losses = mes.fit(hidden, targets, base_gold_logp=base, lam=0.3, epochs=20, batch_size=25, lr=1e-2)
    assert losses[-1] < losses[0]


def _pairs(n=12, seed=3):
    return random_pairs(V, n, seed)


def _quiet_marian():
    return tiny_marian(V, d_model=32, max_positions=64, dropout=0.0)


def test_ink_training_loop_refines_only_adapters_and_resumes(tmp_path):
    pairs = _pairs()
    frozen = {n: p.clone() for n, p in _quiet_marian().named_parameters()}
    straight = _quiet_marian()
    hist = ink.train_ink(straight, pairs, str(tmp_path / "a"), epochs=2, batch_size=4, k=4,
                         lr=1e-2, dropout=0.0, progress=False, log=lambda s: None)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    for n, p in straight.named_parameters():
        if not n.startswith(ink.ADAPTERS_ATTR):
            assert torch.equal(p, frozen[n]), n                     # only adapters train
    adapted = getattr(straight, ink.ADAPTERS_ATTR)
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "up" in n)
    # one epoch, then resume to two: the same adapters as the straight run
    logs = []
    resumed = _quiet_marian()
    ink.train_ink(resumed, pairs, str(tmp_path / "b"), epochs=1, batch_size=4, k=4, lr=1e-2,
                  dropout=0.0, progress=False, log=logs.append)
    other = _quiet_marian()
    ink.train_ink(other, pairs, str(tmp_path / "b"), epochs=2, batch_size=4, k=4, lr=1e-2,
                  dropout=0.0, progress=False, log=logs.append)
    assert any("resuming after epoch 1" in line for line in logs)
    for (n, a), (_, b) in zip(adapted.state_dict().items(),
                              getattr(other, ink.ADAPTERS_ATTR).state_dict().items()):
        torch.testing.assert_close(a, b, msg=n)
    # the refreshed datastore holds keys of the adapted model
    from knnfast import Datastore
    ds = Datastore.open(str(tmp_path / "a" / "datastore"))
    assert len(ds) == sum(len(t) for _, t in pairs)
    # afterwards: plain decoding, or hybrid with the refreshed datastore
    import knnfast
    import knnfast.integrations.hf as H
    src = torch.tensor([pairs[0][0]])
    plain = H.generate(straight, None, input_ids=src, num_beams=2, max_new_tokens=6)
    final_ds = H.build_datastore(straight, pairs, str(tmp_path / "hybrid"), progress=False)
    straight.generation_config.forced_eos_token_id = None   # Marian forces token 0 at max length
    hybrid = H.generate(straight, knnfast.KNNDecoder(final_ds, k=4, lam=1.0, temperature=1.0),
                        input_ids=src, num_beams=1, max_new_tokens=len(pairs[0][1]))
    assert plain.shape[0] == 1
    assert hybrid[0, 1:].tolist() == pairs[0][1]        # λ = 1 over the adapted model's datastore


def test_ink_loop_with_a_reused_faiss_index(tmp_path):
    pairs = _pairs(n=16, seed=5)
    model = _quiet_marian()
    hist = ink.train_ink(model, pairs, str(tmp_path / "w"), epochs=2, batch_size=4, k=4,
                         lr=1e-2, dropout=0.0, index_factory="IVF4,Flat", nprobe=4,
                         progress=False, log=lambda s: None)
    assert len(hist) == 2 and (tmp_path / "w" / "ink_index.faiss").exists()
    # nprobe = all lists: the same neighbours as exact retrieval, so the same training
    exact = _quiet_marian()
    hist_exact = ink.train_ink(exact, pairs, str(tmp_path / "e"), epochs=2, batch_size=4, k=4,
                               lr=1e-2, dropout=0.0, progress=False, log=lambda s: None)
    assert hist[0]["loss"] == pytest.approx(hist_exact[0]["loss"], rel=1e-4)


def test_ink_without_refresh_keeps_the_first_datastore(tmp_path):
    """refresh=False (the paper's "w/o refresh" ablation): the datastore encoded before training
    is reused, also by a resumed run; with refresh the keys follow the adapters."""
    from knnfast import Datastore
    pairs = _pairs(n=12, seed=7)
    kw = dict(batch_size=4, k=4, lr=1e-2, dropout=0.0, progress=False, log=lambda s: None)
    frozen = _quiet_marian()
    ink.train_ink(frozen, pairs, str(tmp_path / "f"), epochs=1, refresh=False, **kw)
    first = Datastore.open(str(tmp_path / "f" / "datastore")).keys[:].clone()
    hist = ink.train_ink(frozen, pairs, str(tmp_path / "f"), epochs=3, refresh=False, **kw)
    assert [h["refreshed"] for h in hist] == [True, False, False]
    assert torch.equal(Datastore.open(str(tmp_path / "f" / "datastore")).keys[:], first)
    moving = _quiet_marian()
    hist = ink.train_ink(moving, pairs, str(tmp_path / "m"), epochs=3, **kw)
    assert [h["refreshed"] for h in hist] == [True, True, True]
    assert not torch.equal(Datastore.open(str(tmp_path / "m" / "datastore")).keys[:], first)


def test_ink_initial_datastore_replaces_the_first_encoding(tmp_path):
    """initial_datastore: the base model's datastore of the same examples stands in for the
    first epoch's encoding (adapters start as the identity), and for every epoch without
    refresh; the same training as encoding it, the caller's datastore untouched."""
    import knnfast.integrations.hf as H
    pairs = _pairs(n=12, seed=11)
    kw = dict(batch_size=4, k=4, lr=1e-2, dropout=0.0, progress=False, log=lambda s: None,
              index_factory="IVF2,Flat", nprobe=2)
    base = H.build_datastore(_quiet_marian(), pairs, str(tmp_path / "base"), progress=False)
    for refresh in (True, False):
        encoded = ink.train_ink(_quiet_marian(), pairs, str(tmp_path / f"e{refresh}"),
                                epochs=2, refresh=refresh, **kw)
        given = ink.train_ink(_quiet_marian(), pairs, str(tmp_path / f"g{refresh}"), epochs=2,
                              refresh=refresh, initial_datastore=base, **kw)
        for a, b in zip(encoded, given):
            assert a == pytest.approx(b, rel=1e-5)
        # with refresh only the second epoch is encoded; without, nothing is
        assert (tmp_path / f"g{refresh}" / "datastore" / "meta.json").exists() == refresh
    assert not base.has_index()
    with pytest.raises(ValueError, match="initial_datastore has"):
        ink.train_ink(_quiet_marian(), pairs[:-1], str(tmp_path / "bad"),
                      initial_datastore=base, **kw)


def test_ink_hidden_override_and_att_refused(tmp_path):
    pairs = _pairs(n=8, seed=3)
    kw = dict(epochs=1, batch_size=4, k=4, lr=1e-2, dropout=0.0, progress=False,
              log=lambda s: None)
    default = ink.train_ink(_quiet_marian(), pairs, str(tmp_path / "a"), **kw)
    by_path = ink.train_ink(_quiet_marian(), pairs, str(tmp_path / "b"), hidden="lm_head", **kw)
    assert by_path[0]["loss"] == pytest.approx(default[0]["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="hidden must be the input of the output projection"):
        ink.train_ink(_quiet_marian(), pairs, str(tmp_path / "c"), hidden="att", **kw)
