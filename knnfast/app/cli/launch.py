"""``knnfast`` under ``torchrun``: the process group a command joins when torchrun started it
(RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT in the environment, WORLD_SIZE > 1), and the
exchange that makes every rank fail with the same one-line error and exit code.

    torchrun --nproc-per-node 2 -m knnfast build-datastore --model M --corpus C --out ds/

Without torchrun (or with WORLD_SIZE 1) nothing here talks to another process."""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Callable, Iterator, Tuple, TypeVar

from .errors import CLIError, DataError, UsageError, from_library

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Seconds a rank waits at a collective. The wait at the end of a build lasts as long as the
#: slowest rank's extra work (the last rank gets the longest sentences), so it is generous:
#: torch's own default for gloo. A dead rank is noticed at once when its socket closes.
DEFAULT_TIMEOUT_S = 1800.0
#: Seconds a failing rank waits for the others before it exits (see ``_leave_together``).
LEAVE_TIMEOUT_S = 10.0
T = TypeVar("T")


def torchrun_world() -> int:
    """The world size torchrun started this process with; 1 outside torchrun."""
    raw = os.environ.get("WORLD_SIZE")
    if raw is None:
        return 1
    try:
        world = int(raw)
    except ValueError:
        raise UsageError(f"WORLD_SIZE={raw!r} is not an integer",
                         "launch with torchrun, or unset WORLD_SIZE") from None
    if world <= 1:
        return 1
    missing = [name for name in TORCHRUN_VARS if not os.environ.get(name)]
    if missing:
        raise UsageError(f"WORLD_SIZE={world} is set but {', '.join(missing)} is not",
                         "launch with torchrun --nproc-per-node N -m knnfast ..., or unset "
                         "WORLD_SIZE")
    return world


@contextlib.contextmanager
def process_group(timeout_s: float) -> Iterator[Tuple[int, int]]:
    """Join torchrun's process group for the body (gloo; nccl when CUDA is available and
    this rank has a GPU of its own, GPU LOCAL_RANK) and always leave it. Yields (rank, world size): (0, 1), and no
    group, outside torchrun."""
    world = torchrun_world()
    if world == 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist
    rank, backend = int(os.environ["RANK"]), "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        backend = "nccl"  # one GPU per rank; more ranks than GPUs stay on gloo
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:  # torch's DistNetworkError / DistStoreError
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        raise DataError(f"rank {rank} of {world} could not join the {backend} process group "
                        f"at {where} ({(str(e).strip().splitlines() or [''])[0]})",
                        "start every rank with the same torchrun command; raise "
                        "--dist-timeout when ranks start far apart") from None
    try:
        yield rank, world
    except BaseException:
        _leave_together(dist)
        raise
    finally:
        dist.destroy_process_group()


def _leave_together(dist) -> None:
    """Wait (briefly) for the other ranks before leaving with an error: torchrun stops every
    rank as soon as the first exits, so a rank that left first could cut the others off
    before they print their line."""
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=LEAVE_TIMEOUT_S))
    except RuntimeError:  # a rank died or is not failing: its error says so, not this wait
        pass


def on_every_rank(step: Callable[[], T]) -> T:
    """Run ``step`` on this rank; when any rank of the process group fails, raise the first
    failing rank's error on every rank (its line names the rank, its exit code is kept), so
    no rank goes on to a collective the failed one never reaches. Without a group: ``step()``.
    The library's errors count as data errors, as in ``main``."""
    from ... import distributed
    rank, world = distributed.rank_and_world()
    if world == 1:
        return step()
    result, mine = None, None
    try:
        result = step()
    except CLIError as e:
        mine = (isinstance(e, UsageError), e.what, e.fix)
    except (ValueError, OSError, RuntimeError) as e:
        error = from_library(e)
        mine = (False, error.what, error.fix)
    failed = [(r, p) for r, p in enumerate(distributed.agree("knnfast", None, payload=mine))
              if p is not None]
    if failed:
        r, (usage, what, fix) = failed[0]
        raise (UsageError if usage else DataError)(f"rank {r} of {world}: {what}", fix)
    return result
