"""Sharding the inference commands over ``torchrun`` processes: each rank works on its share,
rank 0 gathers the results in input order and reports.

``torchrun --nproc_per_node=N $(which scn) relax|predict|eval ...`` starts N processes
(``--nnodes`` with a rendezvous endpoint spans several machines). Every process reads the
same input, and :func:`shard_indices` deals the work items (structures, or batches of them)
out block-cyclically: block ``b``, items ``b * block`` to ``b * block + block - 1``, goes to
rank ``b % world_size``. Neighbouring items of a data set tend to be alike in size, so
dealing them round-robin balances the ranks better than cutting the list into ``world_size``
contiguous pieces, and it lets the results come back in input order a little at a time.

A command's per-rank work is a function from its share of item indices to one result per
index (:func:`run_share`); :func:`gather_in_order` then streams the results to rank 0 (or to
every rank) in input order, a few blocks per rank per message, so rank 0 holds its own share
and one round of the others', never everything. Only rank 0 writes outputs and prints
tables (:func:`finish` makes its exit status every rank's); progress bars are per rank, the
rank in their label (:func:`progress`).

Failures do not leave ranks waiting forever: an exception in one rank's share is sent to all
ranks and raised on every one of them (the lowest failing rank's, when several fail), so all
take the same error path. Under ``torchrun`` the first SIGTERM (torchrun's way of stopping
the other ranks when one dies; also a batch scheduler's) or SIGINT raises
``KeyboardInterrupt`` and later ones are ignored until the command has saved what it did
(:func:`interruptible`). Messages between ranks go over a gloo group of their own with a long
timeout: a rank that finishes early may have to wait hours for the slowest one, longer than
the default timeouts of gloo (30 min) or NCCL (10 min).

A plain run (no ``torchrun``, or ``ctx=None``) is one rank of one: nothing is sent and the
commands behave exactly as before.
"""

from __future__ import annotations

import math
import os
import pickle
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .training.distributed import DistributedContext

__all__ = [
    "assemble",
    "barrier",
    "finish",
    "gather_in_order",
    "interruptible",
    "join",
    "kept_path",
    "partial_path",
    "progress",
    "run_share",
    "shard_indices",
]

T = TypeVar("T")

#: How long a rank waits for the others in one exchange (its share done, the slowest one's not).
WAIT = timedelta(days=7)

_group: Any = None  # the gloo group of the exchanges, made by join()
_owned = False  # whether join() started the process group (then finish() leaves it)


def _world(ctx: DistributedContext | None) -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` for a plain run."""
    return (0, 1) if ctx is None else (ctx.rank, ctx.world_size)


def _distributed(ctx: DistributedContext | None) -> bool:
    return ctx is not None and ctx.world_size > 1


# ---------------------------------------------------------------------- who does what


def shard_indices(count: int, rank: int, world_size: int, block: int = 1) -> list[int]:
    """The items of ``range(count)`` that ``rank`` of ``world_size`` works on, in order: every
    ``world_size``-th block of ``block`` consecutive items, starting with block ``rank``.

    Raises:
        ValueError: a negative ``count``, ``world_size`` or ``block`` below 1, a rank outside
            ``0 .. world_size - 1``.
    """
    if count < 0 or world_size < 1 or block < 1 or not 0 <= rank < world_size:
        raise ValueError(f"cannot shard {count} items into blocks of {block} for rank {rank} of {world_size}")
    mine: list[int] = []
    for start in range(rank * block, count, world_size * block):
        mine.extend(range(start, min(start + block, count)))
    return mine


def assemble(shares: Sequence[Sequence[T]], count: int, block: int = 1) -> list[T]:
    """The inverse of :func:`shard_indices`: ``shares[r]`` holds rank ``r``'s results in its
    order; the result is all of them in input order.

    Raises:
        ValueError: a share whose length is not its rank's number of items.
    """
    out: list[Any] = [None] * count
    for rank, share in enumerate(shares):
        indices = shard_indices(count, rank, len(shares), block)
        if len(share) != len(indices):
            raise ValueError(f"rank {rank} has {len(share)} results for its {len(indices)} items")
        for index, value in zip(indices, share):
            out[index] = value
    return out


def partial_path(output: Path, ctx: DistributedContext | None) -> Path:
    """The hidden file a command streams its results to next to ``output``:
    ``.NAME.partial`` in a plain run, ``.NAME.rankR-of-W.partial`` for rank R of W."""
    rank, world = _world(ctx)
    tag = f".rank{rank}-of-{world}" if world > 1 else ""
    return output.with_name(f".{output.name}{tag}.partial")


def kept_path(output: Path, ctx: DistributedContext | None, suffix: str | None = None) -> Path:
    """Where rank R of W keeps its share of ``output`` when a sharded run stops before
    rank 0 could write ``output``: ``STEM.rankR-of-W.SUFFIX`` (``suffix`` defaults to the
    output's own)."""
    rank, world = _world(ctx)
    suffix = output.suffix if suffix is None else suffix
    return output.with_name(f"{output.stem}.rank{rank}-of-{world}{suffix}")


# ---------------------------------------------------------------------- joining and leaving


def join(command: str, device: str) -> DistributedContext:
    """This process's place among ``torchrun``'s processes, on its device: ``device`` as
    given in a plain run; under ``torchrun`` ``"cuda"`` means ``cuda:LOCAL_RANK`` (gloo on
    CPUs, NCCL on GPUs). A device that cannot be used is a one-line ``SystemExit`` (rank 0
    says why, the others exit with status 1)."""
    from .cli.common import check_device, one_line
    from .training.distributed import DistributedContext, init_distributed

    global _group, _owned
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistributedContext(device=check_device(command, device))
    main = int(os.environ.get("RANK", "0")) == 0
    dist = _dist()
    joined = dist.is_initialized()  # by a script that runs commands in a row: it leaves the group itself
    try:
        ctx = init_distributed(device)
    except (RuntimeError, ValueError) as err:
        message = f"scn {command}: cannot start on {device!r} with the other torchrun processes: {one_line(err)}"
        raise SystemExit(message if main else 1) from None
    try:
        check_device(command, str(ctx.device))
    except SystemExit as err:
        raise SystemExit(err.code if main else 1) from None
    _owned = not joined
    if _group is None or not joined:
        _group = dist.new_group(backend="gloo", timeout=WAIT)
    return ctx


def barrier(ctx: DistributedContext | None) -> None:
    """Wait until every rank is here (nothing in a plain run)."""
    if _distributed(ctx):
        _dist().barrier(group=_group)


def finish(ctx: DistributedContext | None, message: str | None) -> None:
    """End a command the same way on every rank: rank 0's ``message`` (None: success)
    decides. Leaves the process group if :func:`join` started it (a script that started it
    itself, to run several commands in a row, leaves it itself), then raises
    ``SystemExit(message)`` on rank 0 and ``SystemExit(1)`` on the others if there is a
    message."""
    global _group
    if _distributed(ctx):
        box = [message if ctx.is_main else None]
        _dist().broadcast_object_list(box, src=0, group=_group)
        message = box[0]
        if _owned:
            _group = None
            ctx.close()
        else:
            barrier(ctx)
    if message:
        raise SystemExit(message if ctx is None or ctx.is_main else 1)


@contextmanager
def interruptible(ctx: DistributedContext | None) -> Iterator[None]:
    """Under ``torchrun``: the first SIGINT or SIGTERM raises ``KeyboardInterrupt``; later
    ones are ignored until the block is left, so that the command can save what it did
    (torchrun answers Ctrl-C by sending SIGINT again, and gives 30 s before SIGKILL). A plain
    run keeps Python's own handling (SIGINT raises, SIGTERM ends the process)."""
    if not _distributed(ctx) or threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------- the work and its results


def run_share(
    work: Callable[[list[int]], Sequence[T]],
    count: int,
    ctx: DistributedContext | None,
    block: int = 1,
) -> list[T]:
    """``work(my indices)``: this rank's share of ``range(count)`` (:func:`shard_indices`),
    one result per index, in the same order. Under ``torchrun`` all ranks then compare notes:
    if ``work`` raised on any rank, the lowest failing rank's exception is raised on every
    rank (the original on its own rank; elsewhere a copy, or a ``RuntimeError`` naming it if
    it cannot be pickled). ``KeyboardInterrupt`` is not caught.

    Raises:
        ValueError: ``work`` returned a number of results other than its number of indices.
    """
    rank, world = _world(ctx)
    mine = shard_indices(count, rank, world, block)
    if not _distributed(ctx):
        return _checked(work(mine), mine)
    failure: Exception | None = None
    results: list[T] = []
    try:
        results = _checked(work(mine), mine)
    except Exception as err:  # noqa: BLE001 - every rank must hear of it, or some wait forever
        failure = err
    statuses: list[Any] = [None] * world
    _dist().all_gather_object(statuses, None if failure is None else _shareable(failure), group=_group)
    for other, status in enumerate(statuses):
        if status is None:
            continue
        if other == rank:
            raise failure
        status.add_note(f"(raised on rank {other} of {world})")
        raise status
    return results


def gather_in_order(
    results: Sequence[T],
    count: int,
    ctx: DistributedContext | None,
    block: int = 1,
    everywhere: bool = False,
    blocks_per_message: int = 64,
) -> Iterator[tuple[int, T]]:
    """``(index, result)`` for every item of ``range(count)``, in input order, on rank 0 (on
    every rank with ``everywhere``); ``results`` is this rank's from :func:`run_share`. The
    other ranks get nothing, but must run the iterator to its end too: it sends their
    results, ``blocks_per_message`` blocks at a time.

    Raises:
        ValueError: ``results`` does not match this rank's share.
    """
    rank, world = _world(ctx)
    mine = shard_indices(count, rank, world, block)
    if len(results) != len(mine):
        raise ValueError(f"rank {rank} has {len(results)} results for its {len(mine)} items")
    if not _distributed(ctx):
        yield from zip(mine, results)
        return
    dist = _dist()
    receives = everywhere or rank == 0
    shares = [shard_indices(count, r, world, block) for r in range(world)] if receives else []
    per_message = blocks_per_message * block  # items a rank sends per round
    rounds = math.ceil(math.ceil(count / block) / world / blocks_per_message)
    pending: dict[int, T] = {}
    following = 0
    for k in range(rounds):
        part = list(results[k * per_message : (k + 1) * per_message])
        if everywhere:
            received: list[Any] = [None] * world
            dist.all_gather_object(received, part, group=_group)
        else:
            received = [None] * world if rank == 0 else None
            dist.gather_object(part, received, dst=0, group=_group)
        if not receives:
            continue
        for r, values in enumerate(received):
            pending.update(zip(shares[r][k * per_message : (k + 1) * per_message], values))
        # after round k every rank has sent its first (k + 1) * blocks_per_message blocks:
        # together, all blocks before (k + 1) * blocks_per_message * world
        while following in pending:
            yield following, pending.pop(following)
            following += 1
    if receives and following != count:  # a rank sent fewer results than its share
        raise RuntimeError(f"gathered {following} of {count} results in order")


def progress(iterable: Iterable[T], ctx: DistributedContext | None, desc: str, **kwargs: Any) -> Iterable[T]:
    """``tqdm(iterable, desc=desc, **kwargs)``; under ``torchrun`` one bar per rank, labelled
    ``desc [rank R/W]`` on line ``LOCAL_RANK`` of its machine's terminal."""
    from tqdm import tqdm

    if _distributed(ctx):
        desc = f"{desc} [rank {ctx.rank}/{ctx.world_size}]"
        kwargs.setdefault("position", ctx.local_rank)
    return tqdm(iterable, desc=desc, **kwargs)


def _checked(results: Sequence[T], indices: list[int]) -> list[T]:
    results = list(results)
    if len(results) != len(indices):
        raise ValueError(f"the work returned {len(results)} results for {len(indices)} items")
    return results


def _shareable(err: Exception) -> Exception:
    """``err`` if it survives pickling as itself, else a ``RuntimeError`` that names it."""
    try:
        if type(pickle.loads(pickle.dumps(err))) is type(err):
            return err
    except Exception:  # noqa: BLE001 - an exception that does not pickle: send its text
        pass
    return RuntimeError(f"{type(err).__name__}: {err}")


def _dist() -> Any:
    import torch.distributed as dist

    return dist
