"""torchrun environment detection and the split of data across ranks."""

import pytest

from chronicals.training import distributed
from chronicals.training.build import SetupError
from chronicals.training.distributed import DistEnv


def test_detect_reads_torchrun_env(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = distributed.detect()
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.enabled) == (3, 4, 1, False, True)
    assert env.loss_scale == 4.0


def test_detect_without_torchrun_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.detect() == DistEnv(0, 1, 0)


def test_detect_rejects_inconsistent_env(monkeypatch):
    monkeypatch.setenv("RANK", "4")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(RuntimeError, match="RANK=4, WORLD_SIZE=4"):
        distributed.detect()


@pytest.mark.parametrize("n, world", [(10, 3), (9, 3), (7, 2), (5, 1)])
def test_shard_splits_without_duplication_and_evenly(n, world):
    items = list(range(n))
    shards = [distributed.shard(items, DistEnv(r, world, r)) for r in range(world)]
    assert [x for s in shards for x in s] == items  # every item once, in rank order
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_device_this_machine_lacks_is_a_setup_error(monkeypatch):
    # A SetupError (exit 2 with one line from the CLI), not a RuntimeError traceback.
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SetupError, match="'device' is 'cuda' but no CUDA GPU is visible; use device: auto or cpu"):
        distributed.device_for(DistEnv(), "cuda")
    assert distributed.device_for(DistEnv(), "auto").type == "cpu"
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    with pytest.raises(SetupError, match="LOCAL_RANK=2 but the node shows only 2 CUDA GPU"):
        distributed.device_for(DistEnv(rank=2, world_size=4, local_rank=2), "auto")


def test_the_global_label_count_is_summed_exactly(monkeypatch):
    # The count was summed as fp32, which rounds past 2**24: 2**24 + 1 tokens on each of two ranks came out 2**25.
    def two_ranks(t, op=None):
        t.add_(t)  # what an all-reduce sum over two ranks holding the same value gives

    monkeypatch.setattr(distributed.dist, "all_reduce", two_ranks)
    n = 2**24 + 1
    assert distributed.all_reduce_count(n, DistEnv(0, 2, 0), "cpu") == 2 * n
    assert distributed.all_reduce_count(n, DistEnv(), "cpu") == n
