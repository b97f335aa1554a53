"""knnfast.methods.kd.TeacherStore on a tiny random Marian built in the test: round trip, alignment
(the stored neighbours of position t are those of the context y_<t), self-match kept or
excluded, resume after a failure, the compact form, batch() padding, bad inputs, and the
loss on a stored batch."""
import pytest
import torch
from transformers import MarianConfig, MarianMTModel

import knnfast
import knnfast.integrations.hf as H
from knnfast.methods.kd import TeacherStore, TeacherWriter

from helpers import check_bad_input, random_sequences, tiny_marian

pytestmark = pytest.mark.usefixtures("single_threaded")
V = 61


def _seqs(n, lo, hi, seed):
    return random_sequences(n, lo, hi, seed, V)


@pytest.fixture(scope="module")
def marian():
    return tiny_marian(V, d_model=32, max_positions=64)


@pytest.fixture(scope="module")
def pairs():
    return list(zip(_seqs(12, 3, 9, seed=1), _seqs(12, 2, 8, seed=2)))


@pytest.fixture(scope="module")
def ds(marian, pairs, tmp_path_factory):
    return H.build_datastore(marian, pairs, str(tmp_path_factory.mktemp("kd") / "ds"),
                             batch_size=5, progress=False)


def _context_neighbours(marian, ds, pair, k, exclude=None):
    tf = next(H.teacher_forced(marian, [pair], batch_size=1))
    return ds.search(tf.hidden, k, exclude=exclude)


def test_round_trip_and_alignment(marian, pairs, ds, tmp_path):
    store = TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=5, batch_size=4,
                               progress=False)
    assert len(store) == len(pairs) and store.k == 5
    assert store.meta["positions"] == sum(len(t) for _, t in pairs)
    assert store.offsets.tolist()[-1] == store.meta["positions"]
    again = TeacherStore.open(str(tmp_path / "t"))
    for i in (0, 5, 11):                                # corpus order, whatever the build order
        tok, sc = again.positions(i)
        want_s, want_i = _context_neighbours(marian, ds, pairs[i], 5)
        assert torch.equal(tok, ds.lookup(want_i))
        rel = want_s - want_s[:, :1]
        torch.testing.assert_close(sc, rel.half().float())
    # self-match kept: every position's best neighbour is itself (its own token, distance 0)
    tok0 = torch.cat([again.positions(i)[0][:, 0] for i in range(len(pairs))])
    gold = torch.cat([torch.tensor(t) for _, t in pairs])
    assert torch.equal(tok0, gold)


def test_exclude_self(marian, pairs, ds, tmp_path):
    store = TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=3, exclude_self=True,
                               progress=False)
    order = H.length_order(pairs)
    entry = {}
    pos = 0
    for i in order:
        entry[i] = pos
        pos += len(pairs[i][1])
    for i in (2, 7):
        n = len(pairs[i][1])
        excl = torch.arange(entry[i], entry[i] + n)
        want_s, want_i = _context_neighbours(marian, ds, pairs[i], 3, exclude=excl)
        assert torch.equal(store.positions(i)[0], ds.lookup(want_i))
    other = [(s, t[::-1]) for s, t in pairs]
    with pytest.raises(ValueError, match="exclude_self"):
        TeacherStore.build(marian, ds, other, str(tmp_path / "o"), k=3, exclude_self=True,
                           progress=False)


def test_resume_after_failure_equals_one_go(marian, pairs, ds, tmp_path, monkeypatch):
    whole = TeacherStore.build(marian, ds, pairs, str(tmp_path / "whole"), k=4, batch_size=3,
                               progress=False)
    real = TeacherWriter.add
    calls = []

    def flaky(self, *a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(self, *a)

    monkeypatch.setattr(TeacherWriter, "add", flaky)
    with pytest.raises(RuntimeError, match="killed"):
        TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=4, batch_size=3, progress=False)
    monkeypatch.setattr(TeacherWriter, "add", real)
    with open(str(tmp_path / "t.building" / "tokens"), "ab") as f:
        f.write(b"\x07" * 10)                              # half-written bytes of the killed chunk
    with pytest.raises(knnfast.DatastoreError, match="resume=True"):
        TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=4, batch_size=3,
                           resume=False, progress=False)
    store = TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=4, batch_size=3,
                               progress=False)
    assert torch.equal(store.tokens, whole.tokens) and torch.equal(store.scores, whole.scores)
    assert torch.equal(store.offsets, whole.offsets)


def test_batch_padding_and_loss(marian, pairs, ds, tmp_path):
    store = TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=4, progress=False)
    ids = [3, 0, 9]
    tokens, scores = store.batch(ids)
    L = max(len(pairs[i][1]) for i in ids)
    assert tokens.shape == (3, L, 4) and scores.shape == (3, L, 4)
    for b, i in enumerate(ids):
        n = len(pairs[i][1])
        assert torch.equal(tokens[b, :n], store.positions(i)[0])
        assert (tokens[b, n:] == -1).all() and torch.isneginf(scores[b, n:]).all()
    labels = torch.full((3, L), -100)
    for b, i in enumerate(ids):
        labels[b, :len(pairs[i][1])] = torch.tensor(pairs[i][1])
    logits = torch.randn(3, L, V)
    loss = knnfast.knn_kd_loss(logits.flatten(0, 1), labels.flatten(), tokens.flatten(0, 1),
                               scores.flatten(0, 1), temperature=10.0)
    want = knnfast.reference.knn_kd_loss(logits.flatten(0, 1), labels.flatten(),
                                         tokens.flatten(0, 1), scores.flatten(0, 1),
                                         temperature=10.0)
    torch.testing.assert_close(loss, want)
    with pytest.raises(IndexError, match="sentence id"):
        store.batch([0, 99])


def test_compact_form(marian, pairs, ds, tmp_path):
    full = TeacherStore.build(marian, ds, pairs, str(tmp_path / "f"), k=6, progress=False)
    compact = TeacherStore.build(marian, ds, pairs, str(tmp_path / "c"), k=6,
                                 compact_temperature=10.0, progress=False)
    assert compact.compact and not full.compact
    tok, probs = compact.positions(4)
    torch.testing.assert_close(probs.sum(1), torch.ones(probs.shape[0]), atol=2e-3, rtol=0)
    t_full, s_full = full.positions(4)
    want_t, want_p = knnfast.knn_probs_sparse(s_full, t_full, 10.0)
    assert torch.equal(tok, want_t)
    torch.testing.assert_close(probs, want_p.half().float())
    _, cp = compact.batch([4, 0])
    assert (cp[0, len(pairs[4][1]):] == 0).all()


@pytest.mark.parametrize("kw,match", [(dict(k=0), "k must be"),
                                      (dict(compact_temperature=0.0), "compact_temperature")])
def test_bad_arguments(marian, pairs, ds, tmp_path, kw, match):
    args = dict(k=4, progress=False)
    args.update(kw)
    check_bad_input(TeacherStore.build, match, marian, ds, pairs, str(tmp_path / "t"), **args)


def test_open_detects_truncation(marian, pairs, ds, tmp_path):
    TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=4, progress=False)
    f = tmp_path / "t" / "scores"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(knnfast.DatastoreError, match="scores"):
        TeacherStore.open(str(tmp_path / "t"))


# --------------------------------------------------------------------------- training
from knnfast.methods.kd import distillation_loss, knn_kd_trainer_class, seq2seq_batch, train_step  # noqa: E402


def test_distillation_loss_is_the_flat_op_and_checks_shapes(marian, pairs, ds, tmp_path):
    store = TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=4, progress=False)
    ids = [1, 2, 3]
    batch = seq2seq_batch(pairs, ids)
    labels = batch.pop("labels")
    logits = marian(**batch).logits
    teacher = store.batch(ids, length=labels.shape[1])
    got = distillation_loss(logits, labels, teacher, temperature=50.0)
    want = knnfast.knn_kd_loss(logits.flatten(0, 1), labels.flatten(), teacher[0].flatten(0, 1),
                               teacher[1].flatten(0, 1), temperature=50.0, label_smoothing=0.1,
                               kd="kl")
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="share"):
        distillation_loss(logits[:, :-1], labels, teacher)


def test_plain_loop_learns_the_teacher(pairs, ds, tmp_path):
    torch.manual_seed(0)
    student = MarianMTModel(MarianConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0, max_position_embeddings=64))
    teacher_model = _teacher_model()
    store = TeacherStore.build(teacher_model, ds, pairs, str(tmp_path / "t"), k=4, progress=False)
    opt = torch.optim.Adam(student.parameters(), lr=5e-3)
    losses = [train_step(student, opt, pairs, list(range(i % 3 * 4, i % 3 * 4 + 4)), store,
                         temperature=10.0) for i in range(60)]
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3])
    plain = train_step(student, opt, pairs, [0, 1], None)          # CE-only path runs too
    assert plain > 0


def _teacher_model():
    return tiny_marian(V, d_model=32, max_positions=64)


def test_trainer_compute_loss(marian, pairs, ds, tmp_path):
    from transformers import Seq2SeqTrainingArguments
    store = TeacherStore.build(marian, ds, pairs, str(tmp_path / "t"), k=4, progress=False)

    def collate(rows):
        ids = [r["sentence_ids"] for r in rows]
        out = seq2seq_batch(pairs, ids)
        out["sentence_ids"] = torch.tensor(ids)
        return out

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2,
                                    per_device_train_batch_size=4, remove_unused_columns=False,
                                    report_to=[], use_cpu=True, save_strategy="no",
                                    logging_strategy="no", learning_rate=1e-3)
    dataset = [{"sentence_ids": i} for i in range(len(pairs))]
    trainer = knn_kd_trainer_class()(model=_teacher_model(), args=args, train_dataset=dataset,
                                     data_collator=collate, teacher_store=store,
                                     kd_kwargs=dict(temperature=10.0))
    batch = collate(dataset[:4])
    got = trainer.compute_loss(trainer.model, dict(batch))
    labels = batch.pop("labels")
    ids = batch.pop("sentence_ids").tolist()
    want = distillation_loss(trainer.model(**batch).logits, labels,
                             store.batch(ids, length=labels.shape[1]), temperature=10.0)
    torch.testing.assert_close(got, want)
    assert trainer.train().global_step == 2


def test_resume_after_a_real_kill(marian, pairs, ds, tmp_path):
    """A build process SIGKILLed mid-way (no cleanup at all) resumes to the one-go result."""
    import json
    import subprocess
    import sys
    whole = TeacherStore.build(marian, ds, pairs, str(tmp_path / "whole"), k=4, batch_size=3,
                               progress=False)
    marian.save_pretrained(tmp_path / "model")
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    child = f"""
import json, os, signal, torch
from transformers import MarianMTModel
import knnfast
from knnfast.methods.kd import TeacherStore, TeacherWriter
torch.set_num_threads(1)
model = MarianMTModel.from_pretrained({str(tmp_path / "model")!r}).eval()
pairs = [tuple(p) for p in json.load(open({str(tmp_path / "pairs.json")!r}))]
real, calls = TeacherWriter.add, []
def add(self, *a):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *a)
TeacherWriter.add = add
TeacherStore.build(model, knnfast.Datastore.open({ds.path!r}), pairs, {str(tmp_path / "t")!r},
                   k=4, batch_size=3, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert (tmp_path / "t.building").exists() and not (tmp_path / "t").exists()
    pairs_back = [tuple(p) for p in json.loads((tmp_path / "pairs.json").read_text())]
    same_model = MarianMTModel.from_pretrained(tmp_path / "model").eval()  # same model id
    with pytest.raises(knnfast.DatastoreError, match="model_id"):
        TeacherStore.build(marian, ds, pairs_back, str(tmp_path / "t"), k=4, progress=False)
    store = TeacherStore.build(same_model, ds, pairs_back, str(tmp_path / "t"), k=4, batch_size=3,
                               progress=False)
    assert torch.equal(store.tokens, whole.tokens) and torch.equal(store.scores, whole.scores)
