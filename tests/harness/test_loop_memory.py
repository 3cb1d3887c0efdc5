"""The harness loop's peak memory counts what CUDA graph pools hold beyond live tensors (a graphed backend's saved
activations are no longer counted as allocated once captured), and only those pools: the default pool's cached free
blocks are the allocator's slack for every backend alike."""

import torch

from harness.loop import graph_pool_bytes


def segment(pool, total, allocated):
    return {"segment_pool_id": pool, "total_size": total, "allocated_size": allocated, "blocks": []}


def test_counts_free_bytes_of_graph_pools_only(monkeypatch):
    snapshot = [segment((0, 0), 1 << 30, 1 << 20),  # default pool: cached free blocks are not counted
                segment((1, 0), 64 << 20, 16 << 20),  # a graph pool: 48 MiB held for its replays
                segment((1, 0), 32 << 20, 0),
                segment((2, 1), 8 << 20, 8 << 20)]  # fully allocated: live tensors, already in max_memory_allocated
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: snapshot)
    assert graph_pool_bytes() == (48 << 20) + (32 << 20)


def test_no_graph_pool_means_nothing_added(monkeypatch):
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: [segment((0, 0), 1 << 30, 0)])
    assert graph_pool_bytes() == 0
