"""The architecture matrix (issue 12): tiny models built from configs in the test, no
downloads, a few thousand parameters each. Encoder-decoder: Marian, FSMT, BART, mBART, T5,
M2M100 (NLLB), Pegasus; decoder-only: GPT-2, GPT-Neo, GPT-NeoX, OPT, Llama, Mistral, Qwen2,
Gemma, Phi.

For each model:
* "ffn" keys times the output projection (+ its bias, + Marian's final_logits_bias)
  reproduce the model's logits: a test that fails when the wrong tensor is captured (on FSMT,
  ``get_output_embeddings()`` is the decoder's input embedding);
* causality: changing a later target token leaves the keys of earlier positions bitwise
  unchanged, for "ffn" and "att" (FSMT builds no causal mask while caching, and its decoder
  blocks run time-major);
* ``build_datastore`` works with "ffn" and "att";
* ``output_projection_only`` trains exactly the output projection, nothing tied to an input
  embedding;
* kNN ``generate``, greedy and beam, batch 2: one [batch x beam, D] query per step, and at
  λ = 0 the plain ``model.generate`` output (OPT's fc1 receives [B * T, D]: the capture
  unflattens it with its block's [B, T]); with "att" keys too, greedy, the first query being
  the teacher-forced key (FSMT's time-major and OPT's flat inputs, one position at a time);
* ``evaluate_lm`` (the target side for encoder-decoders): base perplexity from the logits,
  kNN-LM far better on the datastore's own corpus;
* ``add_adapters`` / ``remove_adapters``: logits bit-exact with fresh adapters and after
  removal, one adapter per encoder and decoder block, live;
* one ``train_ink`` epoch.
"""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers as T  # noqa: E402

from knnfast import Datastore, KNNDecoder  # noqa: E402
from knnfast.integrations import hf  # noqa: E402
from knnfast.methods import ink  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")
V = 40


def tiny_gpt2():
    cfg = T.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return T.GPT2LMHeadModel(cfg)


def tiny_marian():
    cfg = T.MarianConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=2,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                       decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1,
                       eos_token_id=2, decoder_start_token_id=1)
    return T.MarianMTModel(cfg)


def tiny_fsmt():
    cfg = T.FSMTConfig(langs=["en", "de"], src_vocab_size=V + 3, tgt_vocab_size=V, d_model=16,
                     encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2)
    return T.FSMTForConditionalGeneration(cfg)


def tiny_enc_dec(config, model, **overrides):
    """BART-style config (BART, mBART, M2M100 / NLLB, Pegasus): 1 encoder + 2 decoder layers."""
    kw = dict(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=2,
              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
              decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
              eos_token_id=2, decoder_start_token_id=2)
    kw.update(overrides)
    return model(config(**kw))


def tiny_t5():
    # num_layers == num_decoder_layers: the installed transformers' T5 generate raises
    # IndexError otherwise (not ours)
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
        num_heads=2, relative_attention_num_buckets=8, pad_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))


# Llama-style config shared by most decoder-only families: 2 layers of width 16
DECODER = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=32, bos_token_id=0, eos_token_id=2,
               pad_token_id=1)


def tiny_decoder(config, model, **overrides):
    return model(config(**{**DECODER, **overrides}))


def tiny_gpt_neo():
    return T.GPTNeoForCausalLM(T.GPTNeoConfig(
        vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, window_size=4,
        attention_types=[[["global", "local"], 1]], intermediate_size=32,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=2, pad_token_id=1))


def tiny_opt():
    return T.OPTForCausalLM(T.OPTConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
        word_embed_proj_dim=16, max_position_embeddings=32, bos_token_id=0, eos_token_id=2,
        pad_token_id=1))


BUILDERS = {
    # encoder-decoder
    "marian": tiny_marian,
    "fsmt": tiny_fsmt,
    "bart": lambda: tiny_enc_dec(T.BartConfig, T.BartForConditionalGeneration),
    "mbart": lambda: tiny_enc_dec(T.MBartConfig, T.MBartForConditionalGeneration),
    "t5": tiny_t5,
    "m2m100": lambda: tiny_enc_dec(T.M2M100Config, T.M2M100ForConditionalGeneration),
    "pegasus": lambda: tiny_enc_dec(T.PegasusConfig, T.PegasusForConditionalGeneration,
                                    decoder_start_token_id=1),
    # decoder-only
    "gpt2": tiny_gpt2,
    "gpt_neo": tiny_gpt_neo,
    "gpt_neox": lambda: tiny_decoder(T.GPTNeoXConfig, T.GPTNeoXForCausalLM),
    "opt": tiny_opt,
    "llama": lambda: tiny_decoder(T.LlamaConfig, T.LlamaForCausalLM),
    "mistral": lambda: tiny_decoder(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=1),
    "qwen2": lambda: tiny_decoder(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=1),
    "gemma": lambda: tiny_decoder(T.GemmaConfig, T.GemmaForCausalLM, num_key_value_heads=1,
                                  head_dim=8),
    "phi": lambda: tiny_decoder(T.PhiConfig, T.PhiForCausalLM),
}
SEQ2SEQ = {"marian", "fsmt", "bart", "mbart", "t5", "m2m100", "pegasus"}


def build(name):
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    # random biases, so that a forgotten bias cannot pass the logits check by being zero
    head = hf.lm_head(model)
    if getattr(model, "final_logits_bias", None) is not None:
        model.final_logits_bias.normal_()
    if getattr(head, "bias", None) is not None:
        torch.nn.init.normal_(head.bias)
    return model


def examples(name, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, V, (int(5 + i),), generator=g).tolist() for i in range(n)]
    if name not in SEQ2SEQ:
        return rows
    return [(r[:4], r) for r in rows]


def keys_and_logits(model, exs, hidden):
    batches = list(hf.teacher_forced(model, exs, hidden=hidden, batch_size=2))
    return (torch.cat([b.hidden for b in batches]), torch.cat([b.logits for b in batches]))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_ffn_keys_times_output_projection_are_the_logits(name):
    model = build(name)
    keys, logits = keys_and_logits(model, examples(name), "ffn")
    head = hf.lm_head(model)
    assert head.weight.shape == (V, keys.shape[1])
    expect = keys @ head.weight.T
    if getattr(head, "bias", None) is not None:
        expect = expect + head.bias
    if getattr(model, "final_logits_bias", None) is not None:
        expect = expect + model.final_logits_bias.reshape(-1)
    torch.testing.assert_close(expect, logits, rtol=1e-5, atol=1e-5)


def test_fsmt_head_is_the_output_projection_not_the_input_embedding():
    model = build("fsmt")
    assert isinstance(model.get_output_embeddings(), torch.nn.Embedding)  # the trap
    assert hf.lm_head(model) is model.model.decoder.output_projection


@pytest.mark.parametrize("hidden", ["ffn", "att"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_keys_of_earlier_positions_ignore_later_tokens(name, hidden):
    model = build(name)
    ex = examples(name, n=1)[0]
    changed = list(ex[1] if isinstance(ex, tuple) else ex)
    cut = len(changed) - 2
    changed[cut] = 3 if changed[cut] != 3 else 4
    other = (ex[0], changed) if isinstance(ex, tuple) else changed
    a, _ = keys_and_logits(model, [ex], hidden)
    b, _ = keys_and_logits(model, [other], hidden)
    # causal LM: key t is the state at input t (predicting t + 1); seq2seq: key t sees
    # target[:t]; either way keys before position `cut` must not see target[cut]
    first_seeing = cut if name not in SEQ2SEQ else cut + 1
    assert torch.equal(a[:first_seeing], b[:first_seeing])
    assert not torch.equal(a[first_seeing:], b[first_seeing:])


@pytest.mark.parametrize("hidden", ["ffn", "att"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_build_datastore(tmp_path, name, hidden):
    model = build(name)
    exs = examples(name)
    ds = hf.build_datastore(model, exs, str(tmp_path / "ds"), hidden=hidden, progress=False,
                            key_dtype=torch.float32)
    keys, _ = keys_and_logits(model, [exs[i] for i in hf.length_order(exs)], hidden)
    assert isinstance(ds, Datastore) and len(ds) == keys.shape[0]
    torch.testing.assert_close(ds.keys[:], keys)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_output_projection_only_trains_exactly_the_projection(name):
    model = build(name)
    embeddings = {n: m.weight.detach().clone() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Embedding)}
    params = ink.output_projection_only(model)
    head = hf.lm_head(model)
    assert params[0] is head.weight
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    opt = torch.optim.SGD(params, lr=1.0)
    keys, logits = keys_and_logits(model, examples(name), "ffn")
    # one step through the projection alone moves it and leaves every embedding as it was
    loss = (head(keys.detach()) ** 2).mean()
    loss.backward()
    before = head.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, head.weight)
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Embedding):
            assert torch.equal(m.weight, embeddings[n]), n


# --------------------------------------------------------------------------- decoding, INK


def own_datastore(model, name, tmp_path):
    """A tiny "ffn" datastore captured from the model itself on its training examples."""
    return hf.build_datastore(model, examples(name), str(tmp_path / "ds"), progress=False,
                              key_dtype=torch.float32)


class RecordingDecoder(KNNDecoder):
    """A KNNDecoder that keeps every query it is asked (and its shape)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queries, self.states = [], []

    def retrieve(self, hidden, k=None):
        self.queries.append(tuple(hidden.shape))
        self.states.append(hidden.detach().clone())
        return super().retrieve(hidden, k)


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_knn_generate_batch_of_two(tmp_path, name, num_beams):
    model = build(name)
    ds = own_datastore(model, name, tmp_path)
    ids = torch.randint(3, V, (2, 4), generator=torch.Generator().manual_seed(2))
    new = 5
    # no EOS, so no processor masks tokens: every row runs `new` steps, and at λ = 0 beam
    # search sees the model's scores (a masking processor runs before the kNN one, whose
    # renormalisation then shifts the beam scores; tests/test_hf.py masks EOS likewise)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
              num_beams=num_beams, do_sample=False, eos_token_id=None,
              forced_eos_token_id=None, forced_bos_token_id=None)
    plain = model.generate(**kw)
    assert plain.shape == (2, (1 if name in SEQ2SEQ else ids.shape[1]) + new)
    # λ = 0: the kNN step is the model's own distribution, so the output is the plain one
    assert torch.equal(hf.generate(model, KNNDecoder(ds, k=4, lam=0.0), **kw), plain)
    # λ > 0: one [batch x beam, D] query per step, through the whole generation
    dec = RecordingDecoder(ds, k=4, temperature=1.0, lam=0.8)
    got = hf.generate(model, dec, **kw)
    assert got.shape == plain.shape
    assert dec.queries == [(2 * num_beams, ds.dim)] * new


@pytest.mark.parametrize("name", list(BUILDERS))
def test_knn_generate_with_att_keys(tmp_path, name):
    """The "att" state one position at a time (cached decoding): FSMT's blocks run
    time-major, OPT's fc1 sees [B * T, D]; the first query is the teacher-forced key."""
    model = build(name)
    exs = examples(name, n=2)
    ds = hf.build_datastore(model, exs, str(tmp_path / "ds"), hidden="att", progress=False,
                            key_dtype=torch.float32)
    if name in SEQ2SEQ:
        ids = torch.tensor([list(e[0]) for e in exs])
    else:
        ids = torch.tensor([list(e[:4]) for e in exs])
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
              num_beams=1,  # FSMT configs default to 5 beams
              do_sample=False, eos_token_id=None, forced_eos_token_id=None,
              forced_bos_token_id=None)
    plain = model.generate(**kw)
    assert torch.equal(hf.generate(model, KNNDecoder(ds, k=4, lam=0.0), hidden="att", **kw),
                       plain)
    dec = RecordingDecoder(ds, k=4, temperature=1.0, lam=0.8)
    assert hf.generate(model, dec, hidden="att", **kw).shape == plain.shape
    assert dec.queries == [(2, ds.dim)] * 3
    # step 1 queries the state before the first new token: the teacher-forced key of the
    # prompt's last position (causal LM) or of target position 0 (seq2seq)
    tf = [(e[0], [3]) for e in exs] if name in SEQ2SEQ else [list(e[:4]) + [3] for e in exs]
    keys, _ = keys_and_logits(model, tf, "att")
    first = keys if name in SEQ2SEQ else keys[3::4]
    torch.testing.assert_close(dec.states[0], first, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_evaluate_lm(tmp_path, name):
    model = build(name)
    ds = own_datastore(model, name, tmp_path)
    exs = examples(name)
    res = hf.evaluate_lm(model, exs, KNNDecoder(ds, k=4, temperature=1.0, lam=0.5),
                         batch_size=2, progress=False)
    _, logits = keys_and_logits(model, exs, "ffn")
    targets = torch.cat([b.targets for b in hf.teacher_forced(model, exs, batch_size=2)])
    assert res.tokens == targets.numel() == sum(hf.target_length(e) for e in exs)
    base = torch.nn.functional.cross_entropy(logits.float(), targets).exp()
    assert res.base_ppl == pytest.approx(float(base), rel=1e-4)
    # the datastore holds these very positions: the nearest neighbour (distance 0) is the gold
    # token, so kNN-LM is far better than the (random) model
    assert res.knn_ppl < res.base_ppl / 2


@pytest.mark.parametrize("name", list(BUILDERS))
def test_adapters_round_trip_is_bit_exact(name):
    model = build(name)
    exs = examples(name)
    _, before = keys_and_logits(model, exs, "ffn")
    # Frozen parameters can take other kernels (seen: FSMT on AMD EPYC, 2.6e-8 apart), so
    # the adapted model (frozen by add_adapters) is compared with the frozen original.
    for p in model.parameters():
        p.requires_grad_(False)
    _, frozen = keys_and_logits(model, exs, "ffn")
    adapters = ink.add_adapters(model, size=4)
    layers = 4 if name == "t5" else 3 if name in SEQ2SEQ else 2  # encoder + decoder blocks
    assert len(adapters) == layers
    assert ({id(p) for p in model.parameters() if p.requires_grad}
            == {id(p) for p in adapters.parameters()})
    _, fresh = keys_and_logits(model, exs, "ffn")
    assert torch.equal(fresh, frozen)  # zero-initialised up-projections: the same model
    with torch.no_grad():
        adapters[-1].up.bias.fill_(0.5)  # the last decoder block's adapter is live
    _, moved = keys_and_logits(model, exs, "ffn")
    assert not torch.equal(moved, before)
    ink.remove_adapters(model)
    _, after = keys_and_logits(model, exs, "ffn")
    assert torch.equal(after, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_train_ink_one_epoch(tmp_path, name):
    model = build(name)
    history = ink.train_ink(model, examples(name), str(tmp_path / "ink"), epochs=1,
                            batch_size=2, k=4, adapter_size=4, progress=False,
                            log=lambda *_: None)
    assert len(history) == 1 and history[0]["epoch"] == 1
    assert all(torch.isfinite(torch.tensor(history[0][p])) for p in ("loss",) + ink.train.PARTS)
    adapters = getattr(model, ink.ADAPTERS_ATTR)
    assert any(a.up.weight.abs().sum() > 0 for a in adapters)  # the adapters trained
