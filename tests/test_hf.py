"""knnfast.integrations.hf on tiny random GPT-2 / Marian models built from configs (no downloads):
layer lookup, datastore capture (keys == the model's hidden states), resumable capture,
kNN-LM evaluation, kNN generate (greedy / beam, vs hand-rolled loops and the reference
backend), KNNModel, λ/τ/k tuning."""
import math

import pytest
import numpy as np
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LogitsProcessorList  # noqa: E402

import knnfast  # noqa: E402
import knnfast.integrations.hf as H  # noqa: E402
import knnfast.reference as ref  # noqa: E402
from knnfast import Datastore, DatastoreWriter, KNNDecoder  # noqa: E402
from helpers import assert_logp_close, random_sequences, tiny_gpt2, tiny_marian  # noqa: E402

V = 97
PAD, EOS, START = 0, 1, 0



pytestmark = pytest.mark.usefixtures("single_threaded")


def _gpt2():
    return tiny_gpt2(V, n_embd=32, n_layer=2, n_positions=64, pad=PAD, eos=EOS)


def _marian():
    model = tiny_marian(V, d_model=32, decoder_layers=2, max_positions=64, pad=PAD, eos=EOS,
                        start=START)
    # MarianConfig forces token 0 at max_length by default; the hand-rolled loops don't
    model.generation_config.forced_eos_token_id = None
    return model


def _seqs(n, lo, hi, seed):
    return random_sequences(n, lo, hi, seed, V)


@pytest.fixture(scope="module")
def gpt2():
    return _gpt2()


@pytest.fixture(scope="module")
def marian():
    return _marian()


@pytest.fixture(scope="module")
def lm_data():
    return _seqs(14, 3, 12, seed=1), _seqs(5, 3, 10, seed=2)


@pytest.fixture(scope="module")
def mt_data():
    return list(zip(_seqs(16, 3, 10, seed=3), _seqs(16, 3, 10, seed=4)))


@pytest.fixture(scope="module")
def gpt2_ds(gpt2, lm_data, tmp_path_factory):
    return H.build_datastore(gpt2, lm_data[0], str(tmp_path_factory.mktemp("g") / "ds"),
                             batch_size=4, progress=False)


@pytest.fixture(scope="module")
def marian_ds(marian, mt_data, tmp_path_factory):
    return H.build_datastore(marian, mt_data, str(tmp_path_factory.mktemp("m") / "ds"),
                             batch_size=4, progress=False)


# --------------------------------------------------------------------------- layer lookup


def test_hidden_module(gpt2, marian):
    assert H.hidden_module(gpt2, "ffn") is gpt2.lm_head
    assert H.hidden_module(gpt2, "att") is gpt2.transformer.h[-1].mlp
    assert H.hidden_module(marian, "ffn") is marian.lm_head
    assert H.hidden_module(marian, "att") is marian.model.decoder.layers[-1].fc1
    assert H.decoder_blocks(marian) is marian.model.decoder.layers   # never the encoder's
    assert H.hidden_module(gpt2, "transformer.h.0.mlp.c_fc") is gpt2.transformer.h[0].mlp.c_fc
    assert H.hidden_module(marian, "model.decoder.layers.0.fc2") is marian.model.decoder.layers[0].fc2
    assert H.hidden_module(gpt2, lambda m: m.transformer.ln_f) is gpt2.transformer.ln_f
    for bad in ("transformer.h.9.mlp", "nope", "lm_head.weight.x"):
        with pytest.raises(ValueError, match="hidden"):
            H.hidden_module(gpt2, bad)


# --------------------------------------------------------------------------- capture


def _manual_causal(model, examples, order):
    keys, att, logits, targets = [], [], [], []
    ln2 = model.transformer.h[-1].ln_2
    box = {}
    handle = ln2.register_forward_hook(lambda m, a, out: box.__setitem__("att", out))
    try:
        with torch.no_grad():
            for i in order:
                ids = torch.tensor([examples[i]])
                out = model(ids, output_hidden_states=True)
                keys.append(out.hidden_states[-1][0, :-1])     # after ln_f = lm_head input
                att.append(box["att"][0, :-1])
                logits.append(out.logits[0, :-1])
                targets.append(ids[0, 1:])
    finally:
        handle.remove()
    return torch.cat(keys), torch.cat(att), torch.cat(logits), torch.cat(targets)


def test_build_datastore_gpt2(gpt2, gpt2_ds, lm_data, tmp_path):
    train = lm_data[0]
    ds = gpt2_ds
    assert len(ds) == sum(len(e) - 1 for e in train)
    assert ds.dim == 32 and ds.vocab_size == V and ds.meta["hidden"] == "ffn"
    assert ds.meta["extra"] == {"examples": len(train), "causal": True,
                                "corpus_sha256": H.corpus_fingerprint(train),
                                "provenance": {"file": "provenance.npy", "examples": len(train)}}
    order = H.length_order(train)
    assert order == sorted(range(len(train)), key=lambda i: (len(train[i]), i))
    keys, att, _, targets = _manual_causal(gpt2, train, order)
    assert torch.equal(ds.values.long(), targets)
    torch.testing.assert_close(ds.keys.float(), keys.half().float(), atol=2e-3, rtol=2e-3)
    ds_att = H.build_datastore(gpt2, train, str(tmp_path / "att"), hidden="att", batch_size=5,
                               progress=False)
    assert ds_att.meta["hidden"] == "att" and len(ds_att) == len(ds)
    assert torch.equal(ds_att.values, ds.values)
    torch.testing.assert_close(ds_att.keys.float(), att.half().float(), atol=2e-3, rtol=2e-3)
    assert (ds_att.keys.float() - ds.keys.float()).abs().max() > 0.1


def test_build_datastore_marian(marian, marian_ds, mt_data):
    ds = marian_ds
    assert len(ds) == sum(len(t) for _, t in mt_data)
    order = H.length_order(mt_data)
    assert order == sorted(range(len(mt_data)), key=lambda i: (len(mt_data[i][1]), i))
    assert ds.values.tolist() == [tok for i in order for tok in mt_data[i][1]]
    assert ds.meta["extra"]["causal"] is False
    keys = []
    with torch.no_grad():
        for i in order:
            src, tgt = mt_data[i]
            dec_in = torch.tensor([[START] + tgt[:-1]])
            out = marian(input_ids=torch.tensor([src]), decoder_input_ids=dec_in,
                         output_hidden_states=True)
            keys.append(out.decoder_hidden_states[-1][0])
    torch.testing.assert_close(ds.keys.float(), torch.cat(keys).half().float(), atol=2e-3, rtol=2e-3)


def test_build_datastore_resumes_after_failing_add(gpt2, lm_data, tmp_path, monkeypatch):
    train = lm_data[0]
    whole = H.build_datastore(gpt2, train, str(tmp_path / "whole"), batch_size=3, progress=False)
    path = str(tmp_path / "ds")
    real_add = DatastoreWriter.add
    calls = []

    def flaky_add(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk on fire")
        return real_add(self, *a, **kw)

    monkeypatch.setattr(DatastoreWriter, "add", flaky_add)
    with pytest.raises(RuntimeError, match="disk on fire"):
        H.build_datastore(gpt2, train, path, batch_size=3, progress=False)
    monkeypatch.setattr(DatastoreWriter, "add", real_add)
    assert Datastore.building_cursor(path) == 6          # two batches of 3 examples
    with pytest.raises(knnfast.DatastoreError):
        H.build_datastore(gpt2, train, path, batch_size=3, resume=False, progress=False)
    other = [list(e) for e in train]
    other[0][0] = (other[0][0] + 1) % V
    with pytest.raises(knnfast.DatastoreError, match="corpus_sha256"):
        H.build_datastore(gpt2, other, path, batch_size=3, resume=True, progress=False)
    ds = H.build_datastore(gpt2, train, path, batch_size=3, resume=True, progress=False)
    assert torch.equal(ds.keys, whole.keys) and torch.equal(ds.values, whole.values)


class _FlakyExamples(list):
    """Raises on the n-th integer __getitem__ (a corpus reader dying mid-way)."""

    def __init__(self, items, fail_at):
        super().__init__(items)
        self.fail_at, self.reads = fail_at, 0

    def __getitem__(self, i):
        if isinstance(i, int):
            self.reads += 1
            if self.reads == self.fail_at:
                raise IOError("corpus read failed")
        return super().__getitem__(i)


def test_build_datastore_resumes_after_failing_corpus(marian, mt_data, tmp_path):
    whole = H.build_datastore(marian, mt_data, str(tmp_path / "whole"), batch_size=4,
                              progress=False)
    path = str(tmp_path / "ds")
    # len(examples) reads for length_order, then one batch of 4, then fail inside batch 3
    flaky = _FlakyExamples(mt_data, fail_at=len(mt_data) + 4 + 4 + 2)
    with pytest.raises(IOError, match="corpus read failed"):
        H.build_datastore(marian, flaky, path, batch_size=4, progress=False)
    assert Datastore.building_cursor(path) == 8
    ds = H.build_datastore(marian, mt_data, path, batch_size=4, resume=True, progress=False)
    assert torch.equal(ds.keys, whole.keys) and torch.equal(ds.values, whole.values)


def test_build_datastore_bad_examples(gpt2, marian, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        H.build_datastore(gpt2, [], str(tmp_path / "a"), progress=False)
    with pytest.raises(ValueError, match="length >= 2"):
        H.build_datastore(gpt2, [[5, 6], [7]], str(tmp_path / "b"), progress=False)
    with pytest.raises(ValueError, match="tuples"):
        H.build_datastore(marian, [[5, 6, 7]], str(tmp_path / "c"), progress=False)


# --------------------------------------------------------------------------- evaluate_lm


def test_evaluate_lm(gpt2, gpt2_ds, lm_data):
    test = lm_data[1]
    k, tau, lam = 8, 3.0, 0.4
    dec = KNNDecoder(gpt2_ds, k=k, temperature=tau, lam=lam)
    res = H.evaluate_lm(gpt2, test, dec, batch_size=2, progress=False)
    keys, _, logits, targets = _manual_causal(gpt2, test, range(len(test)))
    assert res.tokens == len(targets) == sum(len(e) - 1 for e in test)
    base = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    assert res.base_ppl == pytest.approx(math.exp(-base.mean().item()), rel=1e-5)
    s, i = ref.knn_search(keys, gpt2_ds.keys.float(), k, "l2")
    knn = ref.knn_gold_logprob(logits, targets, gpt2_ds.values.long()[i], scores=s,
                               temperature=tau, lam=lam)
    assert res.knn_ppl == pytest.approx(math.exp(-knn.double().mean().item()), rel=1e-4)
    # Xu et al.'s oracle: per token max(p_LM, p_kNN) with the pure kNN distribution (λ = 1)
    pure = ref.knn_gold_logprob(logits, targets, gpt2_ds.values.long()[i], scores=s,
                                temperature=tau, lam=1.0)
    oracle = torch.maximum(base.float(), pure)
    assert res.oracle_ppl == pytest.approx(math.exp(-oracle.double().mean().item()), rel=1e-4)
    best_of = torch.maximum(base.float(), knn)
    assert res.best_of_ppl == pytest.approx(math.exp(-best_of.double().mean().item()), rel=1e-4)
    assert res.oracle_ppl <= res.best_of_ppl <= min(res.base_ppl, res.knn_ppl)
    assert res.oracle_ppl < res.best_of_ppl  # the two definitions differ on this data
    assert abs(res.knn_ppl - res.base_ppl) > 1e-3 * res.base_ppl      # kNN did something
    r2 = H.evaluate_lm(gpt2, test, KNNDecoder(gpt2_ds, k=k, temperature=tau, lam=lam,
                                              backend="reference"), batch_size=3, progress=False)
    assert r2.tokens == res.tokens
    assert r2.base_ppl == pytest.approx(res.base_ppl, rel=1e-5)
    assert r2.knn_ppl == pytest.approx(res.knn_ppl, rel=1e-5)
    assert r2.oracle_ppl == pytest.approx(res.oracle_ppl, rel=1e-5)
    assert res.seconds > 0 and res.tokens_per_s > 0
    assert res.per_token is None


def test_evaluate_lm_per_token(gpt2, gpt2_ds, lm_data):
    test = lm_data[1]
    dec = KNNDecoder(gpt2_ds, k=8, temperature=3.0, lam=0.4)
    res = H.evaluate_lm(gpt2, test, dec, batch_size=2, return_tokens=True, progress=False)
    t = res.per_token
    assert all(t[name].shape == (res.tokens,) for name in
               ("base", "knn", "interpolated", "example", "position"))
    # aligned with the input: example e, position p predicts test[e][p + 1]
    _, _, logits, targets = _manual_causal(gpt2, test, range(len(test)))
    base = torch.log_softmax(logits.double(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(t["base"].double(), base, rtol=1e-5, atol=1e-5)
    for j in (0, res.tokens // 2, res.tokens - 1):
        e, p = int(t["example"][j]), int(t["position"][j])
        assert int(targets[j]) == test[e][p + 1]
    assert res.base_ppl == pytest.approx(math.exp(-t["base"].double().mean().item()), rel=1e-6)
    assert res.knn_ppl == pytest.approx(math.exp(-t["interpolated"].double().mean().item()),
                                        rel=1e-6)


def test_evaluate_lm_seq2seq(marian, marian_ds, mt_data):
    dec = KNNDecoder(marian_ds, k=4, temperature=2.0, lam=0.5)
    res = H.evaluate_lm(marian, mt_data[:5], dec, batch_size=2, progress=False)
    assert res.tokens == sum(len(t) for _, t in mt_data[:5])
    nll = 0.0
    with torch.no_grad():
        for src, tgt in mt_data[:5]:
            out = marian(input_ids=torch.tensor([src]), decoder_input_ids=torch.tensor([[START] + tgt[:-1]]))
            nll -= torch.log_softmax(out.logits[0].double(), -1).gather(1, torch.tensor(tgt)[:, None]).sum().item()
    assert res.base_ppl == pytest.approx(math.exp(nll / res.tokens), rel=1e-5)
    # every training target is its own nearest neighbour: kNN beats the random model
    assert res.knn_ppl < res.base_ppl


def test_base_gold_logprob_follows_logits_device():
    logits = torch.randn(4, 10, device="meta")
    targets = torch.zeros(4, dtype=torch.long, device="meta")
    out = H.base_gold_logprob(logits, targets)          # fake kernel: shapes only
    assert out.shape == (4,) and out.device.type == "meta"


# --------------------------------------------------------------------------- generate


def _greedy_marian(model, decoder, src, mask, steps):
    seqs = torch.full((src.shape[0], 1), START)
    done = torch.zeros(src.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=src, attention_mask=mask, decoder_input_ids=seqs,
                        output_hidden_states=True)
            h, logits = out.decoder_hidden_states[-1][:, -1], out.logits[:, -1]
            logp = torch.log_softmax(logits, -1) if decoder is None else decoder(h, logits)
            nxt = torch.where(done, PAD, logp.argmax(-1))
            done |= nxt == EOS
            seqs = torch.cat([seqs, nxt[:, None]], 1)
            if done.all():
                break
    return seqs


def _src_batch(mt_data):
    return H.pad_batch([mt_data[0][0], mt_data[5][0], [7, 8, 9]], PAD)


def test_generate_greedy_marian_equals_hand_loop(marian, marian_ds, mt_data):
    src, mask = _src_batch(mt_data)
    kw = dict(k=8, temperature=1.0, lam=0.6)
    fused, refd = KNNDecoder(marian_ds, **kw), KNNDecoder(marian_ds, backend="reference", **kw)
    got = H.generate(marian, fused, input_ids=src, attention_mask=mask, max_new_tokens=8,
                     num_beams=1, do_sample=False)
    want = _greedy_marian(marian, refd, src, mask, 8)
    assert torch.equal(got, want), (got, want)
    base = H.generate(marian, None, input_ids=src, attention_mask=mask, max_new_tokens=8,
                      num_beams=1, do_sample=False)
    assert torch.equal(base, marian.generate(input_ids=src, attention_mask=mask,
                                             max_new_tokens=8, num_beams=1, do_sample=False))
    assert torch.equal(base, _greedy_marian(marian, None, src, mask, 8))
    assert not torch.equal(got, base)
    assert len(H.hidden_module(marian)._forward_pre_hooks) == 0   # the hook is removed


def _beam_marian(model, decoder, src, mask, steps, beams):
    """Plain beam search without EOS (the test model cannot emit it), no KV cache."""
    B = src.shape[0]
    src_b, mask_b = src.repeat_interleave(beams, 0), mask.repeat_interleave(beams, 0)
    seqs = torch.full((B * beams, 1), START)
    scores = torch.full((B, beams), -1e9)
    scores[:, 0] = 0.0
    with torch.no_grad():
        for _ in range(steps):
            out = model(input_ids=src_b, attention_mask=mask_b, decoder_input_ids=seqs,
                        output_hidden_states=True)
            logp = decoder(out.decoder_hidden_states[-1][:, -1], out.logits[:, -1])
            assert torch.isneginf(logp[:, EOS]).all()
            cand = (scores.reshape(-1, 1) + logp).view(B, -1)
            top = cand.topk(beams, dim=1)
            src_rows = (top.indices // V + torch.arange(B)[:, None] * beams).reshape(-1)
            seqs = torch.cat([seqs[src_rows], (top.indices % V).reshape(-1, 1)], 1)
            scores = top.values
    return seqs.view(B, beams, -1)[:, 0]


@pytest.fixture(scope="module")
def marian_no_eos():
    model = _marian()
    with torch.no_grad():
        model.final_logits_bias[0, EOS] = float("-inf")   # plain beam search == HF's
    return model


def test_generate_beam_marian(marian_no_eos, marian_ds, mt_data):
    model = marian_no_eos
    src, mask = _src_batch(mt_data)
    kw = dict(k=8, temperature=1.0, lam=0.6)
    fused, refd = KNNDecoder(marian_ds, **kw), KNNDecoder(marian_ds, backend="reference", **kw)
    gen_kw = dict(input_ids=src, attention_mask=mask, max_new_tokens=7, num_beams=3,
                  do_sample=False)
    got = H.generate(model, fused, **gen_kw)
    with H.HiddenCapture(model, "ffn") as cap:
        via_ref = model.generate(logits_processor=LogitsProcessorList(
            [H.KNNLogitsProcessor(refd, cap)]), **gen_kw)
    assert torch.equal(got, via_ref)
    assert torch.equal(got, _beam_marian(model, refd, src, mask, 7, 3))
    base = H.generate(model, None, **gen_kw)
    assert torch.equal(base, model.generate(**gen_kw))
    assert not torch.equal(got, base)
    # KNNModel.generate is the same thing
    assert torch.equal(H.KNNModel(model, fused).generate(**gen_kw), got)


def _greedy_gpt2(model, decoder, ids, mask, steps):
    seqs, mask = ids.clone(), mask.clone()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=seqs, attention_mask=mask, position_ids=pos,
                        output_hidden_states=True)
            h, logits = out.hidden_states[-1][:, -1], out.logits[:, -1]
            logp = torch.log_softmax(logits, -1) if decoder is None else decoder(h, logits)
            nxt = torch.where(done, PAD, logp.argmax(-1))
            done |= nxt == EOS
            seqs = torch.cat([seqs, nxt[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if done.all():
                break
    return seqs


def test_generate_greedy_gpt2_left_padding(gpt2, gpt2_ds, lm_data):
    prompts = [lm_data[1][0][:2], lm_data[1][1][:5]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(k=8, temperature=2.0, lam=0.6)
    fused, refd = KNNDecoder(gpt2_ds, **kw), KNNDecoder(gpt2_ds, backend="reference", **kw)
    gen_kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False)
    got = H.generate(gpt2, fused, **gen_kw)
    assert torch.equal(got, _greedy_gpt2(gpt2, refd, ids, mask, 7))
    with H.knn_processor(gpt2, refd) as proc:
        assert torch.equal(gpt2.generate(logits_processor=LogitsProcessorList([proc]), **gen_kw), got)
    base = H.generate(gpt2, None, **gen_kw)
    assert torch.equal(base, gpt2.generate(**gen_kw))
    assert torch.equal(base, _greedy_gpt2(gpt2, None, ids, mask, 7))
    assert not torch.equal(got, base)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_greedy_gpt2_att_keys(gpt2, lm_data, tmp_path, use_cache):
    """hidden="att": the hooked module sees every prompt position (no logits_to_keep), so
    the step must read the newest one."""
    ds = H.build_datastore(gpt2, lm_data[0], str(tmp_path / "att"), hidden="att",
                           batch_size=4, progress=False)
    refd = KNNDecoder(ds, k=8, temperature=2.0, lam=0.6, backend="reference")
    ids = torch.tensor([lm_data[1][0][:4], lm_data[1][1][:4]])
    mask = torch.ones_like(ids)
    got = H.generate(gpt2, KNNDecoder(ds, k=8, temperature=2.0, lam=0.6), input_ids=ids,
                     attention_mask=mask, max_new_tokens=6, do_sample=False, hidden="att",
                     use_cache=use_cache)
    box = {}
    handle = gpt2.transformer.h[-1].ln_2.register_forward_hook(
        lambda m, a, out: box.__setitem__("h", out))
    try:
        seqs = ids
        with torch.no_grad():
            for _ in range(6):
                logits = gpt2(input_ids=seqs).logits[:, -1]
                nxt = refd(box["h"][:, -1], logits).argmax(-1)
                assert not (nxt == EOS).any()
                seqs = torch.cat([seqs, nxt[:, None]], 1)
    finally:
        handle.remove()
    assert torch.equal(got, seqs)
    assert not torch.equal(got, gpt2.generate(input_ids=ids, attention_mask=mask,
                                              max_new_tokens=6, do_sample=False))


def test_hidden_capture_step_before_forward(gpt2):
    with H.HiddenCapture(gpt2) as cap:
        with pytest.raises(RuntimeError, match="has not run"):
            cap.step()


def test_generate_beam_gpt2_reference_processor(gpt2, gpt2_ds, lm_data):
    ids = torch.tensor([lm_data[1][2][:3], lm_data[1][3][:3]])
    kw = dict(k=8, temperature=2.0, lam=0.6)
    fused, refd = KNNDecoder(gpt2_ds, **kw), KNNDecoder(gpt2_ds, backend="reference", **kw)
    gen_kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                  num_beams=3, do_sample=False)
    got = H.generate(gpt2, fused, **gen_kw)
    with H.knn_processor(gpt2, refd) as proc:
        assert torch.equal(gpt2.generate(logits_processor=LogitsProcessorList([proc]), **gen_kw), got)
    assert not torch.equal(got, gpt2.generate(**gen_kw))


@pytest.mark.parametrize("constraint,token", [("min_new_tokens", EOS), ("suppress_tokens", EOS),
                                              ("bad_words_ids", 50)])
def test_generate_respects_hard_constraints(gpt2, tmp_path, constraint, token):
    with Datastore.create(tmp_path / "ds", 32, vocab_size=V, progress=False) as w:
        w.add(torch.randn(20, 32), torch.full((20,), token))    # the datastore insists on it
    dec = KNNDecoder(Datastore.open(tmp_path / "ds"), k=4, temperature=1.0, lam=0.9)
    ids = torch.tensor([[5, 6, 7]])
    extra = {"min_new_tokens": dict(min_new_tokens=4), "suppress_tokens": dict(suppress_tokens=[EOS]),
             "bad_words_ids": dict(bad_words_ids=[[50]])}[constraint]
    assert H.generate(gpt2, dec, input_ids=ids, max_new_tokens=6, do_sample=False)[0, 3] == token
    out = H.generate(gpt2, dec, input_ids=ids, max_new_tokens=6, do_sample=False, **extra)
    assert out.shape[1] >= 3 + 4 and (out[0, 3:7] != token).all(), out


def test_knn_model_forward(gpt2, gpt2_ds, marian, marian_ds, mt_data):
    kw = dict(k=4, temperature=2.0, lam=0.3)
    dec, refd = KNNDecoder(gpt2_ds, **kw), KNNDecoder(gpt2_ds, backend="reference", **kw)
    wrapped = H.KNNModel(gpt2, dec)
    assert wrapped.config is gpt2.config
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = (ids != 0).long()
    with torch.no_grad():
        out = wrapped(input_ids=ids, attention_mask=mask)
        base = gpt2(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h = base.hidden_states[-1].reshape(12, -1)
    want = refd(h, base.logits.reshape(12, -1)).view(2, 6, V)
    assert out.logits.shape == (2, 6, V)
    assert_logp_close(out.logits, want, atol=1e-5)
    torch.testing.assert_close(out.logits.exp().sum(-1), torch.ones(2, 6))

    mdec = KNNDecoder(marian_ds, k=4, temperature=2.0, lam=0.3, backend="reference")
    src, smask = _src_batch(mt_data)
    dec_in = torch.tensor([[START, 5, 6, 7]] * 3)
    with torch.no_grad():
        out = H.KNNModel(marian, KNNDecoder(marian_ds, k=4, temperature=2.0, lam=0.3))(
            input_ids=src, attention_mask=smask, decoder_input_ids=dec_in)
        base = marian(input_ids=src, attention_mask=smask, decoder_input_ids=dec_in,
                      output_hidden_states=True)
    want = mdec(base.decoder_hidden_states[-1].reshape(12, -1), base.logits.reshape(12, -1))
    assert_logp_close(out.logits.reshape(12, -1), want, atol=1e-5)


# --------------------------------------------------------------------------- tuning


def test_tune_from_features(gpt2, gpt2_ds, lm_data):
    dev = lm_data[1]
    dec = KNNDecoder(gpt2_ds, k=8)
    feats = H.collect_gold_features(gpt2, dev, dec, batch_size=2, progress=False)
    keys, _, logits, targets = _manual_causal(gpt2, dev, range(len(dev)))
    assert torch.equal(feats.targets, targets)
    torch.testing.assert_close(feats.base_gold_logp,
                               torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1))
    assert feats.neighbours.scores.shape == (len(targets), 8)
    ks, taus, lams = (1, 2, 8), (1.0, 10.0), (0.2, 0.5, 0.9)
    res = H.tune_from_features(feats, ks, taus, lams)
    assert len(res.grid) == len(ks) * len(taus) * len(lams)
    assert res.best["nll"] == min(c["nll"] for c in res.grid)
    assert res.base_nll == pytest.approx(-feats.base_gold_logp.mean().item())
    nb = feats.neighbours
    for cell in res.grid:   # brute force: the full [T, V] logits through the reference
        k = cell["k"]
        nll = -ref.knn_gold_logprob(logits, targets, nb.tokens[:, :k], scores=nb.scores[:, :k],
                                    temperature=cell["temperature"], lam=cell["lam"]).mean()
        assert cell["nll"] == pytest.approx(nll.item(), rel=1e-5, abs=1e-6), cell
        assert cell["ppl"] == pytest.approx(math.exp(cell["nll"]))
    assert len({round(c["nll"], 6) for c in res.grid}) > 1
    # tune() is collect + tune_from_features
    res2 = H.tune(gpt2, dev, gpt2_ds, ks=ks, temperatures=taus, lams=lams, batch_size=2,
                  progress=False)
    assert res2.best["nll"] == pytest.approx(res.best["nll"], rel=1e-6)
    assert {k: res2.best[k] for k in ("k", "temperature", "lam")} == \
        {k: res.best[k] for k in ("k", "temperature", "lam")}
    with pytest.raises(ValueError, match="neighbours were retrieved"):
        H.tune_from_features(feats, ks=(4, 16))


def test_pad_id_outside_the_vocabulary_is_a_clear_error(tmp_path):
    """GPT-2 pads with its eos id; an eos id >= vocab used to crash inside the embedding."""
    cfg = GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32,
                     bos_token_id=60, eos_token_id=60)
    model = GPT2LMHeadModel(cfg).eval()
    with pytest.raises(ValueError, match=r"eos_token_id = 60 is outside the vocabulary \[0, 50\)"):
        H.build_datastore(model, [[1, 2, 3], [4, 5, 6, 7, 8]], str(tmp_path / "ds"),
                          progress=False)
    model.config.pad_token_id = 0
    ds = H.build_datastore(model, [[1, 2, 3], [4, 5, 6, 7, 8]], str(tmp_path / "ds2"),
                           progress=False)
    assert len(ds) == 2 + 4


def test_provenance_maps_entries_back_to_their_examples(gpt2, gpt2_ds, lm_data, marian,
                                                        marian_ds, mt_data):
    """build_datastore reorders examples shortest first; ds.provenance(ids) still says which
    example and target position every entry (e.g. a retrieved neighbour) came from."""
    ids = torch.arange(len(gpt2_ds))
    example, position = gpt2_ds.provenance(ids)
    targets = torch.tensor([lm_data[0][e][p + 1] for e, p in zip(example.tolist(),
                                                                 position.tolist())])
    assert torch.equal(gpt2_ds.values[:].long(), targets)
    assert sorted(zip(example.tolist(), position.tolist())) == \
        [(e, p) for e, ex in enumerate(lm_data[0]) for p in range(len(ex) - 1)]
    ex, pos = marian_ds.provenance(torch.tensor([[0, -1], [len(marian_ds) - 1, 5]]))
    assert ex.shape == (2, 2) and ex[0, 1] == -1 and pos[0, 1] == -1
    assert int(marian_ds.values[len(marian_ds) - 1]) == mt_data[int(ex[1, 0])][1][int(pos[1, 0])]
    with pytest.raises(ValueError, match="ids must lie in"):
        gpt2_ds.provenance(torch.tensor([len(gpt2_ds)]))


def test_provenance_missing_is_a_clear_error(tmp_path):
    with knnfast.Datastore.create(str(tmp_path / "ds"), dim=2, vocab_size=5,
                                  progress=False) as w:
        w.add(torch.randn(3, 2), torch.tensor([1, 2, 3]))
    with pytest.raises(knnfast.DatastoreError, match="records no provenance"):
        knnfast.Datastore.open(str(tmp_path / "ds")).provenance(torch.tensor([0]))


def test_provenance_written_by_hand_and_its_bad_inputs(tmp_path):
    """set_provenance round trip (a second writer sees it after open), lengths that do not
    cover the entries, and a provenance file that does not match meta.json."""
    path = str(tmp_path / "ds")
    with knnfast.Datastore.create(path, dim=2, vocab_size=5, progress=False) as w:
        w.add(torch.randn(5, 2), torch.tensor([1, 2, 3, 4, 0]))
    ds = knnfast.Datastore.open(path)
    ds.set_provenance(torch.tensor([7, 3]), torch.tensor([2, 3]))
    ex, pos = knnfast.Datastore.open(path).provenance(torch.tensor([0, 1, 2, 4, -1]))
    assert ex.tolist() == [7, 7, 3, 3, -1] and pos.tolist() == [0, 1, 0, 2, -1]
    for lengths in ([2, 2], [6, -1], [4]):
        with pytest.raises(ValueError, match="example lengths"):
            ds.set_provenance(torch.tensor([0, 1])[:len(lengths)], torch.tensor(lengths))
    np.save(tmp_path / "ds" / "provenance.npy", np.zeros((3, 2), np.int64))
    with pytest.raises(knnfast.DatastoreError, match=r"has shape \(3, 2\), meta.json says \[2, 2\]"):
        knnfast.Datastore.open(path).provenance(torch.tensor([0]))
    (tmp_path / "ds" / "provenance.npy").write_bytes(b"not numpy")
    with pytest.raises(knnfast.DatastoreError, match="cannot read"):
        knnfast.Datastore.open(path).provenance(torch.tensor([0]))


@pytest.mark.parametrize("extra", [dict(no_repeat_ngram_size=1), dict(min_new_tokens=5)],
                         ids=["no_repeat_ngram", "min_new_tokens"])
def test_generate_processors_act_on_the_mixture(gpt2, gpt2_ds, lm_data, extra):
    """kNN is mixed into the model's own output, before transformers' processors: with λ = 0
    kNN generate is plain generate even when processors forbid tokens under beam search
    (mixing after them renormalised the model distribution per beam and changed the beams)."""
    dec = KNNDecoder(gpt2_ds, k=8, temperature=2.0, lam=0.0)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, V, (2, 4), generator=g)
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                  num_beams=3, do_sample=False, **extra)
        assert torch.equal(H.generate(gpt2, dec, **kw), gpt2.generate(**kw)), seed


def test_bad_capture_inputs_are_clear_errors(gpt2, lm_data, tmp_path):
    with pytest.raises(ValueError, match="hidden must be 'ffn', 'att', a module path"):
        H.build_datastore(gpt2, lm_data[0], str(tmp_path / "a"), hidden="transformer.nope",
                          progress=False)

    class NoBlocks(torch.nn.Module):  # an LM without any list of decoder blocks
        config = gpt2.config

        def forward(self, input_ids=None, **kw):
            return gpt2(input_ids=input_ids, **kw)

    with pytest.raises(ValueError, match="no list of decoder blocks .* pass hidden=<module path>"):
        H.hidden_module(NoBlocks(), "att")
    # a model whose hidden size does not match an interrupted build of the same path
    w = knnfast.Datastore.create(str(tmp_path / "b"), dim=7, vocab_size=V, progress=False)
    w.add(torch.randn(2, 7), torch.tensor([1, 2]))
    w.close()
    with pytest.raises(knnfast.DatastoreError, match=r"different settings .*'dim': \(7, 32\)"):
        H.build_datastore(gpt2, lm_data[0], str(tmp_path / "b"), progress=False)


def test_flat_input_outside_the_decoder_blocks_is_a_clear_error(lm_data, tmp_path):
    """A key module fed [B * T, D] outside every decoder block cannot be unflattened (no
    block gives [B, T]): a clear error naming the override, not a wrong reshape."""
    cfg = GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                     bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()

    class FlatHead(torch.nn.Module):  # the LM head applied to flattened rows
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    model.lm_head = FlatHead(model.lm_head)
    with pytest.raises(ValueError, match=r"flattened \[B \* T, D\] states outside the decoder "
                                         r"blocks; pass hidden=<module path>"):
        H.build_datastore(model, lm_data[0], str(tmp_path / "ds"), hidden="lm_head.inner",
                          progress=False)
