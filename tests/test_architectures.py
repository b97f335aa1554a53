"""Key capture right by construction, per architecture (issue 12, first part): tiny models built
from configs in the test, no downloads.

For each model:
* "ffn" keys times the output projection (+ its bias, + Marian's final_logits_bias)
  reproduce the model's logits: a test that fails when the wrong tensor is captured (on FSMT,
  ``get_output_embeddings()`` is the decoder's input embedding);
* causality: changing a later target token leaves the keys of earlier positions bitwise
  unchanged, for "ffn" and "att" (FSMT builds no causal mask while caching, and its decoder
  blocks run time-major);
* ``build_datastore`` works with "ffn" and "att";
* ``output_projection_only`` trains exactly the output projection, nothing tied to an input
  embedding.
"""
import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
from transformers import (FSMTConfig, FSMTForConditionalGeneration, GPT2Config,  # noqa: E402
                          GPT2LMHeadModel, MarianConfig, MarianMTModel)

from knnfast import Datastore  # noqa: E402
from knnfast.integrations import hf  # noqa: E402
from knnfast.methods import ink  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")
V = 40


def tiny_gpt2():
    cfg = GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_marian():
    cfg = MarianConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=2,
                       encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                       decoder_ffn_dim=32, max_position_embeddings=32, pad_token_id=1,
                       eos_token_id=2, decoder_start_token_id=1)
    return MarianMTModel(cfg)


def tiny_fsmt():
    cfg = FSMTConfig(langs=["en", "de"], src_vocab_size=V + 3, tgt_vocab_size=V, d_model=16,
                     encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                     max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
                     eos_token_id=2, decoder_start_token_id=2)
    return FSMTForConditionalGeneration(cfg)


BUILDERS = {"gpt2": tiny_gpt2, "marian": tiny_marian, "fsmt": tiny_fsmt}


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
    if name == "gpt2":
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
    first_seeing = cut if name == "gpt2" else cut + 1
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
