"""Data-parallel kNN-KD over gloo on 127.0.0.1: two spawned ranks each wrap the same tiny Marian
in DistributedDataParallel, take their share of a global batch of sentence ids
(``kd.rank_slice``), read those sentences' teachers from one TeacherStore memmap, and after two
SGD steps hold the parameters one process gets by training on the whole batches.

Why the batches are chosen as they are: DDP averages the ranks' gradients, and ``train_step``'s
loss is a mean over the rank's own target tokens. The average of the two means is the mean over
the whole batch only when both shares hold as many tokens, so step 1 uses ``train_step`` on a
batch whose halves have 8 target tokens each. Step 2's shares hold 2 and 9 tokens: each rank
takes the loss summed over its tokens, times world / global token count, so the averaged
gradient is again the whole batch's mean (what ``rank_slice``'s docstring says to do).

Every collective has a 20 s timeout and the ranks a 120 s deadline."""
import datetime
import gc
import os

import pytest
import torch

pytest.importorskip("transformers")

import knnfast.integrations.hf as H  # noqa: E402
from helpers import random_sequences, run_ranks, tiny_marian  # noqa: E402
from knnfast.methods import kd  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")

V, D, LR, TEMPERATURE = 61, 32, 0.5, 10.0
TARGET_LENGTHS = (3, 5, 4, 4, 2, 6, 3, 7, 5, 5, 5)
EQUAL = [0, 1, 2, 3]        # shares [0, 1] and [2, 3]: 3 + 5 = 4 + 4 target tokens
UNEQUAL = [4, 5, 6]         # shares [4] and [5, 6]: 2 and 9 target tokens
TRAINER = [1, 8, 9, 10]     # 5 target tokens each: any split of the Trainer's sampler is even
TRAINER_UNEQUAL = [4, 5, 7, 8]  # 2, 6, 7, 5 target tokens: every split into 2 + 2 is uneven
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=20)
DEADLINE_S = 120


def _pairs():
    sources = random_sequences(len(TARGET_LENGTHS), 3, 9, 1, V)
    g = torch.Generator().manual_seed(2)
    return [(s, torch.randint(2, V, (n,), generator=g).tolist())
            for s, n in zip(sources, TARGET_LENGTHS)]


def _student():
    """The same seeded Marian on every call, without dropout: the Trainer trains in train
    mode, and dropout masks would differ between the ranks and the single process."""
    from transformers import MarianMTModel
    cfg = tiny_marian(V, d_model=D, max_positions=64).config
    cfg.dropout = cfg.attention_dropout = cfg.activation_dropout = 0.0
    torch.manual_seed(3)
    return MarianMTModel(cfg).eval()


def _weighted_step(model, opt, pairs, ids, store, world):
    """Step 2: loss summed over this rank's tokens, scaled so DDP's gradient average is the
    whole batch's mean (``n_global``: every rank knows the whole batch)."""
    n_global = sum(H.target_length(pairs[i]) for i in UNEQUAL)
    batch = kd.seq2seq_batch(pairs, ids)
    labels = batch.pop("labels")
    teacher = store.batch(ids, length=labels.shape[1])
    loss = kd.distillation_loss(model(**batch).logits, labels, teacher, reduction="sum",
                                temperature=TEMPERATURE) * (world / n_global)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _collate(rows):
    ids = [r["sentence_ids"] for r in rows]
    out = kd.seq2seq_batch(_pairs(), ids)
    out["sentence_ids"] = torch.tensor(ids)
    return out


def _trainer(root, out, per_device, sentences=TRAINER, accumulation=1):
    """knn_kd_trainer_class on ``sentences``, one SGD step, no clipping."""
    from transformers import Seq2SeqTrainingArguments
    args = Seq2SeqTrainingArguments(
        output_dir=os.path.join(root, out), max_steps=1, per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
        logging_strategy="no", learning_rate=LR, optim="sgd", max_grad_norm=0.0,
        lr_scheduler_type="constant", ddp_timeout=int(COLLECTIVE_TIMEOUT.total_seconds()))
    store = kd.TeacherStore.open(os.path.join(root, "teacher"))
    return kd.knn_kd_trainer_class()(
        model=_student(), args=args, train_dataset=[{"sentence_ids": i} for i in sentences],
        data_collator=_collate, teacher_store=store, kd_kwargs=dict(temperature=TEMPERATURE))


def _trainer_worker(rank, world, port, root, sentences):
    """The HF Trainer as torchrun starts it: the environment says rank and world, the
    Trainer (accelerate) joins the group and wraps the model in DDP itself."""
    from accelerate.state import AcceleratorState, PartialState
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    AcceleratorState._reset_state(reset_partial_state=True)  # no leftover singleton
    trainer = _trainer(root, f"trainer-rank{rank}", per_device=len(sentences) // world,
                       sentences=sentences)
    trainer.train()
    torch.save({"params": trainer.model.state_dict()}, os.path.join(root, f"trainer{rank}.pt"))
    import torch.distributed as dist
    trainer = None
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate holds the group too
    _leave(dist)


def _worker(rank, world, port, root):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    model = opt = None
    try:
        pairs, store = _pairs(), kd.TeacherStore.open(os.path.join(root, "teacher"))
        model = DistributedDataParallel(_student())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        shares = [kd.rank_slice(EQUAL), kd.rank_slice(UNEQUAL)]
        kd.train_step(model, opt, pairs, shares[0], store, temperature=TEMPERATURE)
        _weighted_step(model, opt, pairs, shares[1], store, world)
        torch.save({"shares": shares, "params": model.module.state_dict()},
                   os.path.join(root, f"rank{rank}.pt"))
    finally:
        model = opt = None  # noqa: F841 (DDP's reducer holds the group: see _leave)
        _leave(dist)


def _leave(dist):
    """Destroy the group once its holders are gone (the caller dropped DDP's wrapper, whose
    reducer holds the group; collect any cycle around it), so the group's threads end here
    and not in interpreter teardown, and only after every rank is done with it."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def _run_ranks(world, root, target=_worker, *args):
    return run_ranks(target, world, root, *args, deadline_s=DEADLINE_S)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kd_ddp")
    teacher = tiny_marian(V, d_model=D, max_positions=64)
    ds = H.build_datastore(teacher, _pairs(), str(root / "ds"), batch_size=4, progress=False)
    kd.TeacherStore.build(teacher, ds, _pairs(), str(root / "teacher"), k=4, progress=False)
    return str(root)


def test_batches_as_the_docstring_says():
    lengths = [H.target_length(p) for p in _pairs()]
    assert sum(lengths[i] for i in EQUAL[:2]) == sum(lengths[i] for i in EQUAL[2:])
    assert [lengths[i] for i in UNEQUAL] == [2, 6, 3]


def test_rank_slice_without_a_group_is_the_whole_batch():
    assert kd.rank_slice([5, 3, 9]) == [5, 3, 9] and kd.rank_slice([]) == []


def test_ddp_two_ranks_equal_one_process(root):
    assert _run_ranks(2, root) == [0, 0]
    ranks = [torch.load(os.path.join(root, f"rank{r}.pt")) for r in range(2)]
    assert [r["shares"] for r in ranks] == [[[0, 1], [4]], [[2, 3], [5, 6]]]

    pairs, store = _pairs(), kd.TeacherStore.open(os.path.join(root, "teacher"))
    model = _student()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for ids in (EQUAL, UNEQUAL):
        kd.train_step(model, opt, pairs, ids, store, temperature=TEMPERATURE)
    want = model.state_dict()
    assert any(not torch.equal(start[k], want[k]) for k in want)  # training moved something
    for name, value in want.items():
        for r, res in enumerate(ranks):
            torch.testing.assert_close(res["params"][name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {r}, {name}: {m}")
    # DDP kept the replicas identical
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in want)


@pytest.mark.parametrize("sentences", [TRAINER, TRAINER_UNEQUAL], ids=["equal", "unequal"])
def test_hf_trainer_two_ranks_equal_one_process(root, sentences):
    """knn_kd_trainer_class under DDP (the Trainer's own, as under torchrun): one step of
    2 ranks x 2 sentences equals one process's step on the 4, also when the ranks hold
    different numbers of target tokens (the loss is summed and divided by the Trainer's
    num_items_in_batch, counted across ranks)."""
    assert _run_ranks(2, root, _trainer_worker, sentences) == [0, 0]
    want = _trained(root, "trainer-single", per_device=len(sentences), sentences=sentences)
    for r in range(2):
        got = torch.load(os.path.join(root, f"trainer{r}.pt"))["params"]
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"rank {r}, {name}: {m}")


def test_hf_trainer_gradient_accumulation_equals_one_batch(root):
    """Two micro-batches of 2 sentences (2 + 6 and 7 + 5 target tokens) accumulated equal
    one batch of 4: the Trainer counts num_items_in_batch over both."""
    want = _trained(root, "trainer-whole", per_device=4, sentences=TRAINER_UNEQUAL)
    got = _trained(root, "trainer-accumulated", per_device=2, sentences=TRAINER_UNEQUAL,
                   accumulation=2)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


def _trained(root, out, **kw):
    trainer = _trainer(root, out, **kw)
    assert trainer.train().global_step == 1
    params = trainer.model.state_dict()
    start = _student().state_dict()
    assert any(not torch.equal(start[k], params[k]) for k in params)   # training moved something
    return params