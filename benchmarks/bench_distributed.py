"""Scale-out over torch.distributed (issue 16): search latency, all-gather cost per step and
build throughput with 1 and 2 ranks (gloo on 127.0.0.1, one CPU thread per rank).

The ranks run in forked processes and time themselves (minimum over repetitions, after a
warm-up), because pytest-benchmark can only time the calling process; what they measured is
recorded in each row's extra_info (``rank_ms`` / ``entries_per_s``), and the row's own
timing is the whole run (spawn included) for reference only.

- search: a sharded datastore of N = 500,000 fp16 keys, D = 256, two shards; world 1 holds
  both shards, world 2 one each; exact fused search + the one all_gather of [3, B, k] int64.
- all_gather: that collective alone, for the same [3, B, k] shapes.
- build: ``knnfast.integrations.hf.build_datastore`` of a small random GPT-2 over a random
  corpus, 1 rank vs 2 ranks (each rank captures its half of the batches and writes a shard).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import socket
import time

import pytest
import torch

QUICK = os.environ.get("KNNFAST_BENCH_QUICK", "").strip() not in ("", "0", "false", "False")
N, D = (20_000, 64) if QUICK else (500_000, 256)
SHAPES = ((1, 8), (16, 8), (160, 64))           # (B, k) of a decoding step
REPEATS = 3 if QUICK else 20
BUILD_SENTENCES, BUILD_LEN = (40, 16) if QUICK else (1_200, 64)
GATHER_REPEATS = 20 if QUICK else 200
TIMEOUT_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, target, *args) -> None:
    """``target(rank, world, port, *args)`` in ``world`` forked ranks; fails if any fails."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    port, ctx = _free_port(), multiprocessing.get_context("fork")
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world, f"ranks exited with {codes}"


def _init(rank: int, world: int, port: int):
    import datetime
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    return dist


def _min_ms(fn, repeats: int) -> float:
    fn()                                        # warm-up: page faults, first-call costs
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _dump(path: str, rank: int, result: dict) -> None:
    if rank == 0:
        with open(path, "w") as f:
            json.dump(result, f)


# ------------------------------------------------------------------------------ search


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A two-shard datastore of N random fp16 keys (values: random token ids)."""
    from knnfast import Datastore
    from knnfast.storage import sharded
    root = tmp_path_factory.mktemp("scaleout")
    g = torch.Generator().manual_seed(0)
    names, half = [], N // 2
    for i in range(2):
        names.append(sharded.shard_name(i))
        with Datastore.create(str(root / names[-1]), D, torch.float16, 32_000,
                              progress=False) as w:
            for s in range(0, half, 50_000):
                n = min(50_000, half - s)
                w.add(torch.randn(n, D, generator=g), torch.randint(0, 32_000, (n,), generator=g))
    sharded.write_manifest(str(root), names)
    return str(root)


def _search_worker(rank, world, port, path, out):
    from knnfast.distributed import ShardedDatastore
    dist = _init(rank, world, port)
    ds = ShardedDatastore.open(path)
    result = {}
    for b, k in SHAPES:
        q = torch.randn(b, D, generator=torch.Generator().manual_seed(b))
        result[f"{b},{k}"] = {
            "search_ms": _min_ms(lambda: ds.search(q, k, exact=True), REPEATS),
            "all_gather_ms": _gather_ms(dist, world, b, k)}
    _dump(out, rank, result)
    dist.destroy_process_group()


def _gather_ms(dist, world: int, b: int, k: int) -> float:
    packed = torch.zeros(3, b, k, dtype=torch.int64)
    parts = [torch.empty_like(packed) for _ in range(world)]
    if world == 1:
        return 0.0
    dist.barrier()
    return _min_ms(lambda: dist.all_gather(parts, packed), GATHER_REPEATS)


@pytest.mark.parametrize("world", [1, 2])
def test_distributed_search(benchmark, store, tmp_path, world):
    out = str(tmp_path / "search.json")
    benchmark.pedantic(_run, args=(world, _search_worker, store, out), rounds=1, iterations=1)
    result = json.load(open(out))
    benchmark.extra_info.update(op="distributed_search", impl=f"world{world}", dtype="float16",
                                shape={"N": N, "D": D}, quick=QUICK, rank_ms=result,
                                threads_per_rank=1)


# ------------------------------------------------------------------------------- build


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=8000, n_embd=256, n_layer=2, n_head=4, n_positions=128,
                     pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def _build_worker(rank, world, port, path, out):
    from knnfast.integrations import hf
    dist = _init(rank, world, port)
    g = torch.Generator().manual_seed(1)
    corpus = [torch.randint(2, 8000, (BUILD_LEN,), generator=g).tolist()
              for _ in range(BUILD_SENTENCES)]
    model = _gpt2()
    dist.barrier()
    t0 = time.perf_counter()
    ds = hf.build_datastore(model, corpus, path, batch_size=16, progress=False,
                            sharded=True, overwrite=True, resume=False)
    seconds = time.perf_counter() - t0
    _dump(out, rank, {"entries": len(ds), "seconds": seconds,
                      "entries_per_s": len(ds) / seconds})
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_distributed_build(benchmark, tmp_path, world):
    out = str(tmp_path / "build.json")
    benchmark.pedantic(_run, args=(world, _build_worker, str(tmp_path / "ds"), out),
                       rounds=1, iterations=1)
    result = json.load(open(out))
    benchmark.extra_info.update(op="distributed_build", impl=f"world{world}", dtype="float16",
                                shape={"sentences": BUILD_SENTENCES, "length": BUILD_LEN,
                                       "D": 256}, quick=QUICK, threads_per_rank=1, **result)
