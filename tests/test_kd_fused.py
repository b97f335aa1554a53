"""kNN-KD and INK trained through the output layer without the [T, V] logits (issue 18):
``distillation_loss(hidden=, weight=, bias=)``, ``train_step`` and the Trainer subclass take
``knn_kd_linear_loss`` by default and equal the logits path (value and every parameter's
gradient, fp32, ~1e-5) on tiny HF models built here from configs: a Marian with a non-zero
``final_logits_bias`` and a GPT-2 whose head has its own bias. Models whose logits are not
h W^T + b fall back (automatic) or fail (fused=True); bad argument combinations are clear
ValueErrors; the profiler sees no T x V allocation on the fused paths (Trainer, train_step,
ink_loss). Every architecture of the issue-12 matrix fuses and matches."""
import pytest
import torch

pytest.importorskip("transformers")

from transformers import GPT2LMHeadModel  # noqa: E402

import knnfast  # noqa: E402
from helpers import check_bad_input, random_sequences, tiny_gpt2, tiny_marian  # noqa: E402
from knnfast.integrations.hf import output_layer  # noqa: E402
from knnfast.methods import ink, kd  # noqa: E402
from test_architectures import BUILDERS as ARCHITECTURES, SEQ2SEQ  # noqa: E402
from test_architectures import build as build_architecture  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")
V, K = 61, 4
TOL = dict(rtol=1e-5, atol=1e-5)


def _marian(vocab=V, d_model=32, bias_seed=0):
    """Marian without dropout, with a random final_logits_bias (pretrained Marian checkpoints
    carry one; a fresh model's is zero)."""
    model = tiny_marian(vocab, d_model=d_model, max_positions=64)
    cfg = model.config
    cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = 0.0
    g = torch.Generator().manual_seed(bias_seed)
    model.final_logits_bias.copy_(torch.randn(model.final_logits_bias.shape, generator=g))
    return model


def _pairs(n=6, vocab=V, lo=2, hi=8, seed=1):
    return list(zip(random_sequences(n, 3, 9, seed, vocab),
                    random_sequences(n, lo, hi, seed + 1, vocab)))


class StubStore:
    """What train_step / the Trainer read from a TeacherStore: batch(ids, length), compact."""

    def __init__(self, vocab=V, k=K, compact=False, seed=0):
        self.vocab, self.k, self.compact, self.seed = vocab, k, compact, seed

    def batch(self, ids, length):
        g = torch.Generator().manual_seed(self.seed + sum(ids))
        tokens = torch.randint(0, self.vocab, (len(ids), length, self.k), generator=g)
        tokens[..., -1] = -1                                        # a padded slot
        if self.compact:
            values = torch.rand(tokens.shape, generator=g).masked_fill(tokens < 0, 0.0)
            values = values / values.sum(-1, keepdim=True)
        else:
            values = (-20 * torch.rand(tokens.shape, generator=g)).masked_fill(tokens < 0,
                                                                               float("-inf"))
        return tokens, values


def _loss_and_grads(model, loss_fn):
    model.zero_grad()
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TOL, msg=name)


# --------------------------------------------------------------------------- equality


@pytest.mark.parametrize("compact,kd_form,smoothing", [(False, "kl", 0.1), (True, "ce", 0.0),
                                                      (False, "ce", 0.2)])
def test_batch_loss_fused_equals_logits_path_marian(compact, kd_form, smoothing):
    model, pairs, ids = _marian(), _pairs(), [0, 3, 5]
    batch = kd.seq2seq_batch(pairs, ids)
    labels = batch.pop("labels")
    teacher = StubStore(compact=compact).batch(ids, labels.shape[1])
    kw = dict(compact=compact, kd=kd_form, label_smoothing=smoothing, temperature=10.0)
    layer = output_layer(model)
    assert layer.extra_bias == "final_logits_bias"
    runs = [_loss_and_grads(model, lambda: kd.batch_loss(model, batch, labels, teacher,
                                                         layer=lay, **kw)[0])
            for lay in (None, layer)]
    _assert_same(runs[1], runs[0])


def test_distillation_loss_hidden_equals_logits_with_head_bias():
    """GPT-2 with a biased head: hidden from the fused forward, grads of every parameter."""
    model = tiny_gpt2(V, n_embd=16, n_layer=1, n_positions=32)
    model.config.resid_pdrop = model.config.embd_pdrop = 0.0
    torch.manual_seed(4)
    model.lm_head = torch.nn.Linear(16, V, bias=True)
    ids = torch.randint(2, V, (3, 7))
    labels = ids.clone()
    labels[0, 5:] = -100
    teacher = StubStore().batch([0, 1, 2], 7)
    layer = output_layer(model)
    assert layer.extra_bias is None and layer.bias(model) is model.lm_head.bias

    def unfused():
        return kd.distillation_loss(model(input_ids=ids).logits, labels, teacher, kd="ce")

    def fused():
        hidden, out = layer.forward(model, input_ids=ids)
        assert hidden.shape == (3, 7, 16) and out.logits.shape == (3, 0, V)
        return kd.distillation_loss(hidden=hidden, weight=layer.weight, bias=layer.bias(model),
                                    labels=labels, teacher=teacher, kd="ce")

    _assert_same(_loss_and_grads(model, fused), _loss_and_grads(model, unfused))


def test_train_step_fused_by_default_and_equal(monkeypatch):
    pairs, ids = _pairs(), [1, 2, 4]
    calls = []
    real = knnfast.ops.knn_kd_linear_loss
    monkeypatch.setattr(knnfast.ops, "knn_kd_linear_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    params = []
    for fused in (False, None, True):
        model = _marian()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for store in (StubStore(), None):                  # kNN-KD, then the CE-only path
            kd.train_step(model, opt, pairs, ids, store, fused=fused, temperature=10.0)
        params.append(dict(model.named_parameters()))
    assert len(calls) == 4                                  # None and True: both steps fused
    for other in params[1:]:
        for name, p in params[0].items():
            torch.testing.assert_close(other[name], p, **TOL, msg=name)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_of_the_matrix_fuses_and_matches(name):
    """The issue-12 matrix (tests/test_architectures.py: random head biases and
    final_logits_bias): output_layer finds a usable head on all 16 architectures (FSMT's
    output projection, T5's rescaled input, Phi's biased head) and the fused loss equals the
    logits path, value and every parameter's gradient."""
    model = build_architecture(name)
    layer = output_layer(model)
    g = torch.Generator().manual_seed(0)
    vocab = layer.weight.shape[0]
    L = 5
    inputs = {"input_ids": torch.randint(3, vocab, (2, 6), generator=g)}
    if name in SEQ2SEQ:
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (2, L), generator=g)
    else:
        inputs["input_ids"] = inputs["input_ids"][:, :L]
    labels = torch.randint(0, vocab, (2, L), generator=g)
    teacher = StubStore(vocab=vocab).batch([0, 1], L)
    runs = [_loss_and_grads(model, lambda: kd.batch_loss(model, dict(inputs), labels, teacher,
                                                         compact=False, layer=lay,
                                                         temperature=2.0)[0])
            for lay in (None, layer)]
    _assert_same(runs[1], runs[0])


# --------------------------------------------------------------------------- Trainer


def _trainer(model, pairs, tmp_path, store, **kw):
    from transformers import Seq2SeqTrainingArguments

    def collate(rows):
        ids = [r["sentence_ids"] for r in rows]
        out = kd.seq2seq_batch(pairs, ids)
        out["sentence_ids"] = torch.tensor(ids)
        return out

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2,
                                    per_device_train_batch_size=2,
                                    gradient_accumulation_steps=2, remove_unused_columns=False,
                                    report_to=[], use_cpu=True, save_strategy="no",
                                    logging_strategy="no", learning_rate=0.5, seed=0,
                                    data_seed=0, optim="sgd")   # AdamW would blow the
    # rounding noise of exactly-zero gradients (attention key biases) up to +-lr steps
    dataset = [{"sentence_ids": i} for i in range(len(pairs))]
    trainer = kd.knn_kd_trainer_class()(model=model, args=args, train_dataset=dataset,
                                        data_collator=collate, teacher_store=store,
                                        kd_kwargs=dict(temperature=10.0), **kw)
    return trainer, collate(dataset[:3])


def test_trainer_fused_equals_unfused_with_gradient_accumulation(tmp_path, monkeypatch):
    """Two updates of two accumulated micro-batches each: the same parameters with and
    without fusion, and compute_loss divides the summed loss by num_items_in_batch on both
    paths (without it: the mean over the micro-batch's tokens)."""
    pairs, store = _pairs(n=8), StubStore()
    calls = []
    real = knnfast.ops.knn_kd_linear_loss
    monkeypatch.setattr(knnfast.ops, "knn_kd_linear_loss",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for fused in (False, None):
        trainer, batch = _trainer(_marian(), pairs, tmp_path, store, fused=fused)
        losses = [trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
                  for n in (None, 7)]
        tokens = int((batch["labels"] != -100).sum())
        torch.testing.assert_close(losses[1], losses[0] * tokens / 7)
        loss, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
        assert outputs.logits.shape[-1] == V                # predictions need the logits
        torch.testing.assert_close(loss, losses[0], **TOL)
        assert trainer.train().global_step == 2
        results.append((losses[0].detach(), dict(trainer.model.named_parameters())))
    assert len(calls) == 2 + 4                              # 2 compute_loss + 2 x 2 micro-batches
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    for name, p in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], p, **TOL, msg=name)


# --------------------------------------------------------------------------- not fusable


class SoftCapped(GPT2LMHeadModel):
    """Logits soft-capped after the head (as Gemma-2 does): not h W^T + b."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = 3.0 * torch.tanh(out.logits / 3.0)
        return out


def test_models_whose_logits_are_not_linear(tmp_path):
    capped = SoftCapped(tiny_gpt2(V, n_embd=16, n_layer=1, n_positions=32).config)
    forwards = []
    capped.register_forward_pre_hook(lambda *a: forwards.append(1))
    check_bad_input(output_layer, "soft-capping", capped)
    probes = len(forwards)
    assert kd.fused_layer(capped, None) is None and kd.fused_layer(capped, False) is None
    assert kd.fused_layer(capped, None) is None and len(forwards) == probes  # no new probe
    check_bad_input(kd.fused_layer, "soft-capping.*fused=False", capped, True)
    odd = _with_weighted_head()
    assert kd.fused_layer(odd, None) is None
    check_bad_input(kd.fused_layer, "not a floating-point nn.Linear", odd, True)
    check_bad_input(_trainer, "not a floating-point nn.Linear", odd, _pairs(), tmp_path,
                    StubStore(), fused=True)


def _with_weighted_head():
    """A GPT-2 whose logits come from a module with a weight that is not an nn.Linear."""
    model = tiny_gpt2(V, n_embd=16, n_layer=1, n_positions=32)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(V, 16))

        def forward(self, x):
            return x @ self.weight.t()

    model.lm_head = Head()
    return model


@pytest.mark.parametrize("call,match", [
    (lambda x, y, t, w: kd.distillation_loss(x, y, t, hidden=x, weight=w), "not both"),
    (lambda x, y, t, w: kd.distillation_loss(x, y, t, bias=w[:, 0]), "not both"),
    (lambda x, y, t, w: kd.distillation_loss(labels=y, teacher=t), "neither"),
    (lambda x, y, t, w: kd.distillation_loss(labels=y, teacher=t, hidden=x), "hidden without weight"),
    (lambda x, y, t, w: kd.distillation_loss(labels=y, teacher=t, weight=w), "weight without hidden"),
    (lambda x, y, t, w: kd.distillation_loss(hidden=x, weight=w, teacher=t), "labels and teacher"),
    (lambda x, y, t, w: kd.distillation_loss(hidden=x[:, :-1], weight=w, labels=y, teacher=t),
     r"hidden \(2, 2, 8\).*share"),
    (lambda x, y, t, w: kd.distillation_loss(hidden=x, weight=w[:, :-1], labels=y, teacher=t),
     "weight must have shape"),
])
def test_distillation_loss_bad_arguments(call, match):
    x = torch.randn(2, 3, 8)
    y = torch.randint(0, V, (2, 3))
    teacher = StubStore().batch([0, 1], 3)
    check_bad_input(call, match, x, y, teacher, torch.randn(V, 8))


# --------------------------------------------------------------------------- memory


def _largest_allocation(fn) -> int:
    """Largest memory one op allocates itself (bytes) while fn() runs: the profiler's
    self_cpu_memory_usage, which also sees an op with children (aten::mm under no_grad
    allocates its output itself but has children, so a leaf-only count misses it)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    return max(e.self_cpu_memory_usage for e in prof.events())


BIG_V = 50_000     # T x V = 128 x 50,000 floats = 24 MiB > the op's 8 MiB logits tile


def test_fused_train_step_and_trainer_allocate_no_t_by_v_tensor(tmp_path):
    pairs = _pairs(n=8, vocab=BIG_V, lo=16, hi=17, seed=7)
    ids = list(range(8))
    store = StubStore(vocab=BIG_V, k=8)
    dense = 8 * 16 * BIG_V * 4
    model = _marian(vocab=BIG_V, d_model=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(fused):
        return lambda: kd.train_step(model, opt, pairs, ids, store, fused=fused)

    assert _largest_allocation(step(False)) >= dense
    assert _largest_allocation(step(None)) < dense / 2
    trainer, _ = _trainer(model, pairs, tmp_path, store)
    batch = kd.seq2seq_batch(pairs, ids)
    batch["sentence_ids"] = torch.tensor(ids)
    assert _largest_allocation(
        lambda: trainer.compute_loss(trainer.model, dict(batch)).backward()) < dense / 2


def test_fused_ink_loss_allocates_no_t_by_v_tensor():
    T, D, k = 128, 16, 8
    g = torch.Generator().manual_seed(3)
    h = torch.randn(T, D, generator=g, requires_grad=True)
    w = torch.randn(BIG_V, D, generator=g, requires_grad=True)
    y = torch.randint(0, BIG_V, (T,), generator=g)
    keys = h.detach()[:, None] + torch.randn(T, k, D, generator=g)
    tokens = torch.randint(0, BIG_V, (T, k), generator=g)
    biggest = _largest_allocation(lambda: ink.ink_loss(h, w, y, keys, tokens)[0].backward())
    assert biggest <= 8 << 20                           # the op's logits tile
    assert biggest < T * BIG_V * 4 / 2
