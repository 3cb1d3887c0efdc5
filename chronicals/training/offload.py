"""Activation offloading: the tensors autograd saves during a forward pass go to pinned CPU memory and come back
for the backward pass, with the copies on a side CUDA stream so they overlap compute.

Used with gradient checkpointing, what autograd saves outside the checkpointed regions is mostly each layer's input
(non-reentrant checkpointing saves those through the ordinary saved-tensor mechanism), so GPU memory for
activations drops from O(layers x hidden) to about one layer's worth, at the price of PCIe traffic that the
side stream hides behind the layers' compute.

Overlap: a device->host copy is issued on the side stream after it waits for the compute stream, and
`record_stream` tells the caching allocator that the GPU tensor is still read there, so the forward pass goes on
without waiting. In backward, tensors are unpacked in roughly the reverse order of packing, so each unpack also
starts the host->device copies of the next `prefetch` tensors below it; the compute stream waits only on the
event of the tensor it needs.

On a CPU-only run the same bookkeeping runs with plain synchronous copies, so tests check that results are
bit-identical with and without offloading.
"""

from __future__ import annotations

import torch
from torch import nn


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5, or a build without torch.distributed: no FSDP2 either
        return False
    return isinstance(t, DTensor)


class _Handle:
    __slots__ = ("index", "host", "device_copy", "ready")

    def __init__(self, index: int, host: torch.Tensor):
        self.index = index
        self.host = host
        self.device_copy: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """`with OffloadActivations(model): loss = model(**batch)` and then `loss.backward()` as usual.

    Parameters (and views of them) stay where they are, as do tensors under `min_bytes` (copying those costs
    more in latency than it saves in memory). Make one per forward pass: the packed handles live with the graph.
    """

    def __init__(self, model: nn.Module, *, device: torch.device, min_bytes: int = 1 << 20, prefetch: int = 2):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # tensors report cuda:N, and torch.device("cuda") != cuda:N
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.min_bytes = min_bytes if self.cuda else 0
        self.prefetch = prefetch
        # FSDP2's parameters are DTensor shards, which have no storage of their own to compare with (and are never
        # what autograd saves: the forward uses the gathered weights, which _eligible recognises as parameters).
        self.param_storages = {p.untyped_storage().data_ptr() for p in model.parameters() if not _is_dtensor(p)}
        self.handles: list[_Handle] = []
        self.offloaded_bytes = 0
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        super().__init__(self._pack, self._unpack)

    def _eligible(self, t: torch.Tensor) -> bool:
        return (
            t.device == self.device
            # First: a sparse (or other non-strided) tensor has no storage, and reading one raised in the forward.
            and t.layout == torch.strided
            and not isinstance(t, nn.Parameter)
            # A view of a parameter (linear saves weight.t()), also of one FSDP2 gathered just for this forward,
            # whose storage is in no list made before it: copying it would hold every gathered weight on the host.
            and not isinstance(t._base, nn.Parameter)
            and t.untyped_storage().data_ptr() not in self.param_storages
            and t.numel() * t.element_size() >= self.min_bytes
        )

    def _pack(self, t: torch.Tensor):
        if not self._eligible(t):
            return t
        if self.cuda:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            # The compute stream may free `t` now; the allocator keeps its memory until the side stream is done.
            t.record_stream(self.stream)
        else:
            host = torch.empty(t.shape, dtype=t.dtype)
            host.copy_(t)
        handle = _Handle(len(self.handles), host)
        self.handles.append(handle)
        self.offloaded_bytes += t.numel() * t.element_size()
        return handle

    def _fetch(self, h: _Handle) -> None:
        """Start the host->device copy of `h` (on the side stream on CUDA)."""
        if h.device_copy is not None or h.host is None:
            return
        if self.cuda:
            with torch.cuda.stream(self.stream):
                h.device_copy = h.host.to(self.device, non_blocking=True)
                h.ready = torch.cuda.Event()
                h.ready.record(self.stream)
        else:
            h.device_copy = h.host.clone()

    def _unpack(self, packed):
        if not isinstance(packed, _Handle):
            return packed
        h = packed
        self._fetch(h)
        for j in range(h.index - 1, max(-1, h.index - 1 - self.prefetch), -1):
            self._fetch(self.handles[j])
        out = h.device_copy
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(h.ready)
            # Allocated on the side stream, used and freed on the compute stream.
            out.record_stream(compute)
        # The graph may read a saved tensor again (retain_graph): keep the host copy, drop the device one.
        h.device_copy = None
        h.ready = None
        return out
