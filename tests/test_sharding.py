"""Sharding over ranks: who does what, results back in input order, failures raised on every
rank, interruptions; fake worlds of threads, then two real gloo processes."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from spherical_channels import sharding
from spherical_channels.training.distributed import DistributedContext


def contexts(world: int) -> list[DistributedContext]:
    return [DistributedContext(rank=r, world_size=world, local_rank=r) for r in range(world)]


# ---------------------------------------------------------------------- who does what


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("block", [1, 2, 4])
@pytest.mark.parametrize("count", [0, 1, 2, 7, 12, 13])
def test_the_shares_cover_every_item_once_in_blocks_dealt_in_turn(count: int, world: int, block: int) -> None:
    shares = [sharding.shard_indices(count, r, world, block) for r in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(count))
    for rank, share in enumerate(shares):
        assert share == sorted(share)
        assert all((i // block) % world == rank for i in share)  # block b goes to rank b % world
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= block  # balanced to within one block
    # assemble is the inverse: each rank's results (here: the index itself) back in input order
    assert sharding.assemble(shares, count, block) == list(range(count))


def test_the_shares_of_two_ranks_alternate() -> None:
    assert sharding.shard_indices(5, 0, 2) == [0, 2, 4] and sharding.shard_indices(5, 1, 2) == [1, 3]
    assert sharding.shard_indices(7, 1, 2, block=2) == [2, 3, 6]


@pytest.mark.parametrize("args", [(-1, 0, 1), (3, 0, 0), (3, 2, 2), (3, -1, 2), (3, 0, 1, 0)])
def test_bad_sharding_arguments_are_errors(args: tuple) -> None:
    with pytest.raises(ValueError, match="cannot shard"):
        sharding.shard_indices(*args)


def test_assemble_refuses_a_share_of_the_wrong_length() -> None:
    with pytest.raises(ValueError, match="rank 1 has 1 results for its 2 items"):
        sharding.assemble([[0, 2], [1]], 4)


def test_file_names_per_rank() -> None:
    out = Path("runs/relaxed.extxyz")
    assert sharding.partial_path(out, None) == Path("runs/.relaxed.extxyz.partial")
    assert sharding.partial_path(out, DistributedContext()) == Path("runs/.relaxed.extxyz.partial")
    ctx = contexts(4)[2]
    assert sharding.partial_path(out, ctx) == Path("runs/.relaxed.extxyz.rank2-of-4.partial")
    assert sharding.kept_path(out, ctx) == Path("runs/relaxed.rank2-of-4.extxyz")
    assert sharding.kept_path(out, ctx, ".json") == Path("runs/relaxed.rank2-of-4.json")


# ---------------------------------------------------------------------- a fake world of threads


class FakeDist:
    """The object collectives of ``torch.distributed`` among threads, one per rank; objects
    travel pickled, as they do between processes."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.rank_of: dict[int, int] = {}
        self.slots: list = [None] * world
        self.meet = threading.Barrier(world, timeout=30)
        self.exchanges = 0  # as rank 0 counts them

    def _exchange(self, obj: object) -> list:
        rank = self.rank_of[threading.get_ident()]
        self.slots[rank] = pickle.dumps(obj)
        self.meet.wait()
        out = [pickle.loads(s) for s in self.slots]
        self.meet.wait()  # nobody overwrites a slot before everyone read it
        self.exchanges += rank == 0
        return out

    def all_gather_object(self, out: list, obj: object, group: object = None) -> None:
        out[:] = self._exchange(obj)

    def gather_object(self, obj: object, out: list | None, dst: int = 0, group: object = None) -> None:
        everything = self._exchange(obj)
        if self.rank_of[threading.get_ident()] == dst:
            out[:] = everything
        else:
            assert out is None

    def broadcast_object_list(self, box: list, src: int = 0, group: object = None) -> None:
        box[0] = self._exchange(box[0])[src]

    def barrier(self, group: object = None) -> None:
        self._exchange(None)


def in_fake_world(world: int, body, monkeypatch, fake: FakeDist | None = None) -> list:  # noqa: ANN001
    """``body(ctx)`` on ``world`` threads, one per rank; each rank's return value, or the
    exception it raised."""
    fake = fake or FakeDist(world)
    monkeypatch.setattr(sharding, "_dist", lambda: fake)
    outcomes: list = [None] * world

    def run(ctx: DistributedContext) -> None:
        fake.rank_of[threading.get_ident()] = ctx.rank
        try:
            outcomes[ctx.rank] = body(ctx)
        except BaseException as err:  # noqa: BLE001 - handed to the test
            outcomes[ctx.rank] = err

    threads = [threading.Thread(target=run, args=(ctx,)) for ctx in contexts(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hangs"
    return outcomes


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(("count", "block", "per_message"), [(0, 1, 1), (1, 1, 1), (2, 1, 64), (11, 1, 2),
                                                              (11, 3, 1), (40, 2, 3)])
@pytest.mark.parametrize("everywhere", [False, True])
def test_results_come_back_in_input_order(world: int, count: int, block: int, per_message: int, everywhere: bool,
                                          monkeypatch) -> None:
    seen: list = [[] for _ in range(world)]

    def body(ctx: DistributedContext) -> list:
        def work(indices: list[int]) -> list[str]:
            seen[ctx.rank] = indices
            return [f"result {i}" for i in indices]

        mine = sharding.run_share(work, count, ctx, block=block)
        return list(sharding.gather_in_order(mine, count, ctx, block=block, everywhere=everywhere,
                                             blocks_per_message=per_message))

    outcomes = in_fake_world(world, body, monkeypatch)
    expected = [(i, f"result {i}") for i in range(count)]
    assert outcomes[0] == expected
    for rank in range(1, world):
        assert outcomes[rank] == (expected if everywhere else [])
    assert seen == [sharding.shard_indices(count, r, world, block) for r in range(world)]


def test_results_are_handed_out_as_soon_as_every_earlier_one_is_in(monkeypatch) -> None:
    """With 2 ranks and one block per message, rank 0 hands out indices 2k and 2k + 1 after
    round k (exchange k + 2, after the exchange of statuses): it holds one round, not all."""
    count, world = 9, 2
    fake = FakeDist(world)
    handed: list = []

    def body(ctx: DistributedContext) -> None:
        mine = sharding.run_share(lambda ix: ix, count, ctx)
        for index, _ in sharding.gather_in_order(mine, count, ctx, blocks_per_message=1):
            handed.append((index, fake.exchanges))

    assert in_fake_world(world, body, monkeypatch, fake) == [None, None]
    assert handed == [(i, i // 2 + 2) for i in range(count)]


def test_a_failure_on_one_rank_is_raised_on_every_rank(monkeypatch) -> None:
    def body(ctx: DistributedContext) -> list:
        def work(indices: list[int]) -> list[int]:
            if ctx.rank == 1:
                raise ValueError(f"structure {indices[0]}: broken")
            return indices

        return sharding.run_share(work, 6, ctx)

    outcomes = in_fake_world(3, body, monkeypatch)
    assert all(isinstance(err, ValueError) and str(err) == "structure 1: broken" for err in outcomes)
    assert "rank 1 of 3" in " ".join(getattr(outcomes[0], "__notes__", []))
    assert not getattr(outcomes[1], "__notes__", None)  # the failing rank raises its own


def test_the_lowest_failing_rank_wins_and_unpicklable_errors_are_named(monkeypatch) -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:  # pickles, but does not unpickle
            super().__init__(f"odd {a} {b}")

    def body(ctx: DistributedContext) -> list:
        def work(indices: list[int]) -> list[int]:
            if ctx.rank == 1:
                raise Odd(1, 2)
            if ctx.rank == 2:
                raise KeyError("later rank")
            return indices

        return sharding.run_share(work, 6, ctx)

    outcomes = in_fake_world(3, body, monkeypatch)
    assert isinstance(outcomes[1], Odd)
    for rank in (0, 2):
        assert type(outcomes[rank]) is RuntimeError and str(outcomes[rank]) == "Odd: odd 1 2"


def test_work_must_give_one_result_per_index(monkeypatch) -> None:
    outcomes = in_fake_world(2, lambda ctx: sharding.run_share(lambda ix: ix[:1], 4, ctx), monkeypatch)
    assert all(isinstance(err, ValueError) and "1 results for 2 items" in str(err) for err in outcomes)
    with pytest.raises(ValueError, match="2 results for 3 items"):
        sharding.run_share(lambda ix: ix[:2], 3, None)
    with pytest.raises(ValueError, match="rank 0 has 1 results for its 3 items"):
        list(sharding.gather_in_order([0], 3, None))


def test_a_plain_run_calls_the_work_once_and_sends_nothing(monkeypatch) -> None:
    monkeypatch.setattr(sharding, "_dist", lambda: pytest.fail("no collective in a plain run"))
    for ctx in (None, DistributedContext()):
        assert sharding.run_share(lambda ix: [i * i for i in ix], 4, ctx) == [0, 1, 4, 9]
        assert list(sharding.gather_in_order(["a", "b"], 2, ctx)) == [(0, "a"), (1, "b")]
        sharding.finish(ctx, None)
        sharding.barrier(ctx)
    with pytest.raises(SystemExit) as exc:
        sharding.finish(None, "scn relax: 1 of 3 structures failed")
    assert exc.value.code == "scn relax: 1 of 3 structures failed"


def test_finish_gives_rank_0s_message_to_all_and_status_1_elsewhere(monkeypatch) -> None:
    def body(ctx: DistributedContext) -> object:
        try:
            sharding.finish(ctx, "scn eval: broken" if ctx.is_main else None)
        except SystemExit as exc:
            return exc.code
        return "no exit"

    assert in_fake_world(3, body, monkeypatch) == ["scn eval: broken", 1, 1]
    assert in_fake_world(2, lambda ctx: sharding.finish(ctx, None if ctx.is_main else "ignored"), monkeypatch) == [
        None, None]


def test_progress_bars_are_labelled_by_rank() -> None:
    import io

    with sharding.progress(range(3), contexts(2)[1], desc="relax", file=io.StringIO()) as bar:
        assert bar.desc == "relax [rank 1/2]" and abs(bar.pos) == 1  # on line LOCAL_RANK
        assert list(bar) == [0, 1, 2]
    with sharding.progress(range(3), None, desc="relax", file=io.StringIO()) as bar:
        assert bar.desc == "relax" and bar.pos == 0


def test_under_torchrun_the_first_sigterm_interrupts_and_later_ones_are_ignored() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with sharding.interruptible(contexts(2)[0]):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**6):  # the handler runs between bytecodes
                    pass
                pytest.fail("SIGTERM did not interrupt")
            finally:  # the cleanup is not interrupted by the next one
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**5):
                    pass
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with sharding.interruptible(None):  # a plain run: Python's own handlers
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# ---------------------------------------------------------------------- two real processes

SCRIPT = """
import json, sys
from spherical_channels import sharding
ctx = sharding.join("test", "cpu")
assert ctx.world_size == 2 and ctx.device.type == "cpu"
out = {}
mine = sharding.run_share(lambda ix: [{"index": i, "rank": ctx.rank} for i in ix], 7, ctx)
out["main"] = list(sharding.gather_in_order(mine, 7, ctx, blocks_per_message=2))
out["everywhere"] = list(sharding.gather_in_order(mine, 7, ctx, everywhere=True))
def work(ix):
    if ctx.rank == 1:
        raise ValueError("structure 1: broken")
    return ix
try:
    sharding.run_share(work, 4, ctx)
except ValueError as err:
    out["error"] = str(err)
json.dump(out, open(sys.argv[1] + f".rank{ctx.rank}.json", "w"))
sharding.finish(ctx, "scn test: " + out["error"] if ctx.is_main else None)
"""


def test_two_gloo_processes_share_gather_and_fail_together(tmp_path: Path) -> None:
    script = tmp_path / "shard.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr[-3000:]  # finish(): rank 0 with the message, rank 1 with status 1
    assert done.stderr.count("scn test: structure 1: broken") == 1
    import json

    rank0, rank1 = (json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1))
    expected = [[i, {"index": i, "rank": i % 2}] for i in range(7)]
    assert rank0["main"] == expected and rank1["main"] == []
    assert rank0["everywhere"] == rank1["everywhere"] == expected
    assert rank0["error"] == rank1["error"] == "structure 1: broken"
