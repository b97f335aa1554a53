"""INK training split across gloo ranks on 127.0.0.1 (``train_ink`` under a process group):
every epoch's refresh is built as a sharded datastore, one shard per rank, and every batch's
examples are split across the ranks, whose weighted gradients are summed. Two and three
spawned ranks must end with the adapters one process trains (to float rounding: the ranks sum
their gradients in a different order), log the same losses, write one checkpoint, and resume
from it; a rank that cannot take part makes every rank fail with its error.

The batches (size 7 over 36 examples) split unevenly across 2 and 3 ranks, and their target
positions differ per example, so an unweighted average of the ranks' means would be wrong.
The refresh captures in batches of 16, three of them: every rank of 3 writes a shard.
Every collective has a 20 s timeout and the ranks a 180 s deadline."""
import datetime
import os

import pytest
import torch

pytest.importorskip("transformers")

from helpers import random_pairs, run_ranks, tiny_marian  # noqa: E402
from knnfast import Datastore  # noqa: E402
from knnfast.methods import ink  # noqa: E402
from knnfast.methods.ink.train import PARTS  # noqa: E402
from knnfast.storage import DatastoreError  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_threaded")

V = 53
SETTINGS = dict(batch_size=7, k=4, lr=1e-2, dropout=0.0, progress=False)
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=20)
DEADLINE_S = 180


def _pairs():
    return random_pairs(V, 36, seed=3)


def _model():
    return tiny_marian(V, d_model=32, max_positions=64, dropout=0.0)


def _adapters(model):
    return {n: p.detach().clone() for n, p in getattr(model, ink.ADAPTERS_ATTR).state_dict().items()}


def _worker(rank, world, port, root, epochs_runs):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        logs, model = [], _model()
        for epochs in epochs_runs:  # several calls: the later ones resume
            hist = ink.train_ink(model, _pairs(), os.path.join(root, "work"), epochs=epochs,
                                 log=logs.append, **SETTINGS)
        torch.save({"hist": hist, "logs": logs, "adapters": _adapters(model)},
                   os.path.join(root, f"rank{rank}.pt"))
    except DatastoreError as e:
        torch.save({"error": str(e)}, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(root, world, epochs_runs=(2,)):
    assert run_ranks(_worker, world, str(root), list(epochs_runs),
                     deadline_s=DEADLINE_S) == [0] * world
    return [torch.load(os.path.join(root, f"rank{r}.pt")) for r in range(world)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    model, logs = _model(), []
    hist = ink.train_ink(model, _pairs(), str(tmp_path_factory.mktemp("one") / "work"),
                         epochs=2, log=logs.append, **SETTINGS)
    return {"hist": hist, "logs": logs, "adapters": _adapters(model)}


def _assert_same_training(got, want):
    for name, value in want["adapters"].items():
        # Adam divides by sqrt(v): a gradient summed in another order moves an entry by ~1e-6;
        # a wrong weighting moves whole tensors by ~lr = 1e-2
        torch.testing.assert_close(got["adapters"][name], value, rtol=1e-4, atol=1e-5)
    for g, w in zip(got["hist"], want["hist"]):
        assert g.keys() == w.keys()
        for key in ("loss",) + PARTS:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_train_the_single_process_adapters(tmp_path, single, world):
    ranks = _run(tmp_path, world)
    assert all(torch.equal(ranks[0]["adapters"][n], r["adapters"][n])
               for r in ranks[1:] for n in r["adapters"])          # replicas stay identical
    _assert_same_training(ranks[0], single)
    assert len(ranks[0]["logs"]) == 2 and all(r["logs"] == [] for r in ranks[1:])  # rank 0 logs
    work = tmp_path / "work"
    assert (work / "datastore" / "manifest.json").exists()            # the refresh was sharded
    ds = Datastore.open(str(work / "datastore"))
    assert len(ds.shards) == world and len(ds) == sum(len(t) for _, t in _pairs())


def test_ranks_resume_from_rank_zeros_checkpoint(tmp_path, single):
    ranks = _run(tmp_path, 2, epochs_runs=(1, 2))
    assert any("resuming after epoch 1" in line for line in ranks[0]["logs"])
    _assert_same_training(ranks[0], single)


def test_a_rank_that_cannot_start_fails_every_rank(tmp_path):
    (tmp_path / "work").write_text("a file where the workdir should be")
    ranks = _run(tmp_path, 2)
    for r in ranks:
        assert "rank 0" in r["error"] and "work" in r["error"], r["error"]


def test_index_factory_is_refused_under_several_ranks(tmp_path, monkeypatch):
    from knnfast import distributed
    monkeypatch.setattr(distributed, "rank_and_world", lambda group=None: (0, 2))
    with pytest.raises(ValueError, match="index_factory is single-process only"):
        ink.train_ink(_model(), _pairs(), str(tmp_path / "w"), index_factory="Flat",
                      **SETTINGS)
