"""knnfast.distributed over gloo on 127.0.0.1, 2 and 3 ranks spawned here (no launcher):
ShardedDatastore search / lookup / KNNDecoder bitwise equal to single-process search over the
concatenated datastore (ties, k larger than a shard, exclude, a rank holding several shards);
a missing shard fails on every rank naming the rank and the shard; build_datastore under a
process group gives the same global datastore with 1, 2 and 3 ranks as the plain build; a rank
killed mid-build makes the others fail with a clear error (not a hang), and rerunning the build
resumes to the same bytes.
Every collective has the group's 20 s timeout and every spawn a 120 s deadline."""
import datetime
import os
import shutil
import signal

import pytest
import torch

import knnfast
from helpers import run_ranks, tiny_gpt2
from knnfast import Datastore, DatastoreError
from knnfast.storage import sharded
from test_sharded import build_pair

pytestmark = pytest.mark.usefixtures("single_threaded")

SIZES = (37, 5, 90, 3)   # 2 ranks: [37+5 | 90+3]; 3 ranks: [37 | 5 | 90+3]
KS = (1, 6, 50, 200)     # 6 and 50 exceed the small shards, 200 exceeds N
V, PAD, EOS = 24, 0, 1
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=20)
SPAWN_DEADLINE_S = 120


def _gpt2():
    return tiny_gpt2(V, n_embd=16, n_layer=1, n_positions=32, pad=PAD, eos=EOS)


def _corpus():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, V, (int(n),), generator=g).tolist()
            for n in torch.randint(2, 12, (17,), generator=g)]


def _searches(ds, q, exclude):
    out = {}
    for k in KS:
        for name, ex in (("all", None), ("excl", exclude)):
            s, i = ds.search(q, k, exclude=ex)
            out[(k, name)] = (s, i, ds.lookup(i))
    return out


def _lm_uses(ds):
    """What the decoding APIs make of ``ds`` (a Datastore or a ShardedDatastore, unchanged):
    kNN-LM and adaptive kNN-LM perplexities (evaluate_lm) and kNN beam search (generate)."""
    import dataclasses
    from knnfast.integrations import hf
    model, corpus = _gpt2(), _corpus()
    torch.manual_seed(0)   # the adaptive decoder's meta-k network starts from this seed
    decoders = {"knn": knnfast.KNNDecoder(ds, k=4, temperature=5.0, lam=0.3),
                "adaptive": knnfast.AdaptiveKNNDecoder(ds, max_k=4, temperature=5.0)}
    out = {name: dataclasses.asdict(hf.evaluate_lm(model, corpus, dec, batch_size=4,
                                                   progress=False)) for name, dec in decoders.items()}
    for result in out.values():
        del result["seconds"]                 # wall time: the only field that may differ
    prompt = torch.tensor([corpus[0][:3], corpus[1][:3]])
    out["generate"] = hf.generate(model, decoders["knn"], prompt, max_new_tokens=4, num_beams=2,
                                  do_sample=False, pad_token_id=PAD)
    return out


def _worker(rank, world, port, root):
    import torch.distributed as dist
    from knnfast import distributed
    from knnfast.integrations import hf
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        q, exclude, hidden, logits, ids = torch.load(os.path.join(root, "inputs.pt"))
        ds = distributed.ShardedDatastore.open(os.path.join(root, "sharded"))
        res = {"search": _searches(ds, q, exclude), "len": len(ds), "held": ds.local.held,
               "lookup": ds.lookup(ids),  # not the last search's ids: the all_reduce path
               "decoder": knnfast.KNNDecoder(ds, k=6, temperature=5.0, lam=0.4)(hidden, logits)}
        try:
            distributed.ShardedDatastore.open(os.path.join(root, "broken"))
            res["broken"] = None
        except DatastoreError as e:
            res["broken"] = str(e)
        built = hf.build_datastore(_gpt2(), _corpus(), os.path.join(root, f"build-w{world}"),
                                   batch_size=3, key_dtype=torch.float32, progress=False)
        res["lm"] = _lm_uses(distributed.ShardedDatastore.open(built.path))
        torch.save(res, os.path.join(root, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist"))
    single, sh, keys = build_pair(root, "l2", SIZES)
    shutil.copytree(sh.path, os.path.join(root, "broken"))
    shutil.rmtree(os.path.join(root, "broken", "shard-00002"))
    q = torch.cat([torch.randn(5, 12), keys[[0, 5, 38, 41, 100, 134]]])  # ties: 100..109 = 0..9
    exclude = torch.tensor([-1, 3, 40, 134, 0, -1, 0, 105, 38, -1, 134])
    ids = torch.tensor([[0, 36, 37, 41], [42, 131, 134, -1]])
    torch.save((q, exclude, keys[:7] + 0.01, torch.randn(7, 40), ids),
               os.path.join(root, "inputs.pt"))
    return root


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def ranks(request, root):
    world = request.param
    assert run_ranks(_worker, world, root, deadline_s=SPAWN_DEADLINE_S) == [0] * world
    return world, [torch.load(os.path.join(root, f"rank{r}.pt")) for r in range(world)]


def test_search_equals_single_store_bitwise(root, ranks):
    world, results = ranks
    single = Datastore.open(os.path.join(root, "single"))
    q, exclude, hidden, logits, ids = torch.load(os.path.join(root, "inputs.pt"))
    want = _searches(single, q, exclude)
    for rank, res in enumerate(results):
        assert res["len"] == sum(SIZES)
        for key, (s, i, t) in want.items():
            gs, gi, gt = res["search"][key]
            assert torch.equal(gi, i), (rank, key, gi, i)
            assert torch.equal(gs.view(torch.int32), s.view(torch.int32)), (rank, key)
            assert torch.equal(gt, t), (rank, key)
        assert torch.equal(res["lookup"], single.lookup(ids))
        want_logp = knnfast.KNNDecoder(single, k=6, temperature=5.0, lam=0.4)(hidden, logits)
        assert torch.equal(res["decoder"], want_logp)
    # every rank held a different, contiguous part of the ids
    assert [r["held"] for r in results] == ([(0, 42), (42, 135)] if world == 2 else
                                            [(0, 37), (37, 42), (42, 135)])


def test_decoding_apis_take_a_sharded_datastore_unchanged(root, ranks):
    """evaluate_lm (KNNDecoder and AdaptiveKNNDecoder) and kNN generate on every rank give
    what they give over the single-process datastore of the same build."""
    from knnfast.integrations import hf
    world, results = ranks
    plain = os.path.join(root, "plain-lm")
    if not os.path.exists(plain):
        hf.build_datastore(_gpt2(), _corpus(), plain, batch_size=3, progress=False,
                           key_dtype=torch.float32)
    want = _lm_uses(Datastore.open(plain))
    for rank, res in enumerate(results):
        for name in ("knn", "adaptive"):
            assert res["lm"][name] == want[name], (rank, name)
        assert torch.equal(res["lm"]["generate"], want["generate"]), rank


def test_missing_shard_fails_on_every_rank(ranks):
    world, results = ranks
    holder = 1 if world == 2 else 2  # the rank whose share includes shard 2
    for rank, res in enumerate(results):
        msg = res["broken"]
        assert msg is not None, f"rank {rank} opened a datastore with a missing shard"
        assert f"failed on 1 of {world} ranks (this is rank {rank})" in msg
        assert f"rank {holder}: DatastoreError" in msg and "shard 2 (" in msg
        assert "shard-00002) is missing" in msg


def global_bytes(path):
    ds = Datastore.open(path)
    shards = ds.shards if isinstance(ds, sharded.ShardedStore) else [ds]
    out = {}
    for name in ("keys", "values", "key_sq_norms"):
        out[name] = b"".join(open(os.path.join(s.path, name), "rb").read() for s in shards)
    out["provenance"] = torch.cat([s.provenance(torch.arange(len(s)))[0] for s in shards])
    return out, ds


def test_builds_identical_for_1_2_3_ranks(root, ranks):
    from knnfast.integrations import hf
    world, _ = ranks
    plain, one = os.path.join(root, "plain"), os.path.join(root, "build-w1")
    if not os.path.exists(plain):
        # float32 keys: a build that batched differently would not round to the same bytes
        hf.build_datastore(_gpt2(), _corpus(), plain, batch_size=3, progress=False,
                           key_dtype=torch.float32)
        hf.build_datastore(_gpt2(), _corpus(), one, batch_size=3, progress=False,
                           key_dtype=torch.float32, sharded=True)  # no group: 1 rank
    want, plain_ds = global_bytes(plain)
    for path in (one, os.path.join(root, f"build-w{world}")):
        got, ds = global_bytes(path)
        assert isinstance(ds, sharded.ShardedStore)
        assert len(ds.meta["shards"]) == (1 if path == one else world)
        for name in ("keys", "values", "key_sq_norms"):
            assert got[name] == want[name], (path, name)
        assert torch.equal(got["provenance"], want["provenance"])
        for field in ("dim", "vocab_size", "metric", "hidden", "model_id", "key_dtype"):
            assert ds.meta[field] == plain_ds.meta[field], field
        assert ds.meta["extra"] == {k: v for k, v in plain_ds.meta["extra"].items()
                                    if k != "provenance"}


# ------------------------------------------------------------------- a rank killed mid-build

KILL_AT_CHUNK = 3   # rank 1 dies as it is about to write its 3rd chunk (2 are committed)


def _count_chunks(die_at=None):
    """Count the chunks this process writes (the returned list's one element); with
    ``die_at``, SIGKILL itself (no cleanup, no exception) as it is about to write that one."""
    from knnfast.storage.writer import DatastoreWriter
    add, seen = DatastoreWriter.add, [0]

    def counting_add(self, *args, **kwargs):
        seen[0] += 1
        if die_at is not None and seen[0] >= die_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return add(self, *args, **kwargs)
    DatastoreWriter.add = counting_add   # this rank's own copy of the class
    return seen


def _build_worker(rank, world, port, root, kill):
    import torch.distributed as dist
    from knnfast.integrations import hf
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    chunks = _count_chunks(KILL_AT_CHUNK if kill and rank == 1 else None)
    try:
        hf.build_datastore(_gpt2(), _corpus(), os.path.join(root, "killed"), batch_size=3,
                           key_dtype=torch.float32, progress=False)
        outcome = f"ok, {chunks[0]} chunks written"
    except Exception as e:  # what the surviving rank tells its user
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(root, f"outcome{rank}"), "w") as f:
        f.write(outcome)
    # a group left to interpreter teardown can abort the rank ("terminate called without an
    # active exception", exit -6: seen once in CI on the resumed run)
    dist.destroy_process_group()


def _run_ranks(world, root, kill):
    return run_ranks(_build_worker, world, root, kill, deadline_s=SPAWN_DEADLINE_S)


def test_rank_killed_mid_build_fails_clearly_then_resumes(tmp_path):
    from knnfast.integrations import hf
    root = str(tmp_path)
    codes = _run_ranks(2, root, kill=True)
    assert codes[1] == -signal.SIGKILL and codes[0] == 0
    survivor = open(os.path.join(root, "outcome0")).read()
    assert survivor.startswith("DatastoreError: build_datastore"), survivor
    assert "this is rank 0" in survivor and "rerun" in survivor, survivor
    killed = os.path.join(root, "killed")
    assert not sharded.is_sharded(killed)             # no manifest: nothing half-committed
    assert os.path.exists(os.path.join(killed, "shard-00000", "meta.json"))
    partial = Datastore.building_cursor(os.path.join(killed, "shard-00001"))
    assert partial is not None and partial > 0         # rank 1 had committed 2 chunks

    assert _run_ranks(2, root, kill=False) == [0, 0]  # the same command again resumes
    # rank 0's shard was finished and is kept; rank 1 writes only its 3rd and last chunk
    assert [open(os.path.join(root, f"outcome{r}")).read() for r in range(2)] == [
        "ok, 0 chunks written", "ok, 1 chunks written"]
    plain = os.path.join(root, "plain")
    hf.build_datastore(_gpt2(), _corpus(), plain, batch_size=3, progress=False,
                       key_dtype=torch.float32)
    got, ds = global_bytes(killed)
    want, _ = global_bytes(plain)
    assert len(ds.meta["shards"]) == 2
    for name in ("keys", "values", "key_sq_norms"):
        assert got[name] == want[name], name
    assert torch.equal(got["provenance"], want["provenance"])


# ------------------------------------------------------------ a teacher store built in parallel

TEACHER_K = 4


def _teacher_worker(rank, world, port, root):
    import torch.distributed as dist
    from knnfast.methods.kd import TeacherStore
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        store = TeacherStore.build(_gpt2(), Datastore.open(os.path.join(root, "plain")),
                                   _corpus(), os.path.join(root, f"teacher-w{world}"),
                                   k=TEACHER_K, batch_size=3, exclude_self=True, progress=False)
        outcome = f"ok {len(store)}"
    except Exception as e:
        outcome = f"{type(e).__name__}: {e}"
    with open(os.path.join(root, f"teacher{rank}"), "w") as f:
        f.write(outcome)


def _run_teacher_ranks(world, root):
    run_ranks(_teacher_worker, world, root, deadline_s=SPAWN_DEADLINE_S)
    return [open(os.path.join(root, f"teacher{r}")).read() for r in range(world)]


@pytest.fixture(scope="module")
def teacher_root(tmp_path_factory):
    from knnfast.integrations import hf
    from knnfast.methods.kd import TeacherStore
    root = str(tmp_path_factory.mktemp("teacher"))
    hf.build_datastore(_gpt2(), _corpus(), os.path.join(root, "plain"), batch_size=3,
                       progress=False, key_dtype=torch.float32)
    TeacherStore.build(_gpt2(), Datastore.open(os.path.join(root, "plain")), _corpus(),
                       os.path.join(root, "teacher-single"), k=TEACHER_K, batch_size=3,
                       exclude_self=True, progress=False)
    return root


@pytest.mark.parametrize("world", [2, 3])
def test_teacher_store_built_in_parallel_equals_single_process(teacher_root, world):
    """Parallel TeacherStore.build: each rank a contiguous run of batches (exclude_self needs
    each rank's first datastore id right), rank 0 merges: the single-process bytes."""
    assert _run_teacher_ranks(world, teacher_root) == [f"ok {len(_corpus())}"] * world
    single = os.path.join(teacher_root, "teacher-single")
    parallel = os.path.join(teacher_root, f"teacher-w{world}")
    for name in ("tokens", "scores", "offsets"):
        with open(os.path.join(single, name), "rb") as a, \
                open(os.path.join(parallel, name), "rb") as b:
            assert a.read() == b.read(), name
    assert not os.path.exists(parallel + ".parts")      # merged parts are removed
    from knnfast.methods.kd import TeacherStore
    assert TeacherStore.verify(parallel).ok
