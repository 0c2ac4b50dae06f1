"""How many bytes torch ops allocate: a dispatch-level meter that works on any device.

Benchmarks and tests use it to compare what a decode step allocates (the SAQ cache attending in
place against a dequantized copy, or against a DynamicCache) without a GPU's allocator stats.
"""

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Allocations:
    total: int = 0  # bytes of every new storage an op returned
    peak: int = 0  # most bytes of those alive at once
    ops: int = 0  # ops run
    live: int = 0


class AllocationMeter(TorchDispatchMode):
    """`with AllocationMeter() as meter:` counts the storages ops create (views and in-place
    results are not new), their peak while alive, and the ops, in `meter.allocations`."""

    def __init__(self):
        super().__init__()
        self.allocations = Allocations()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        counted = self.allocations
        counted.ops += 1
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in inputs or not storage.nbytes():
                continue
            inputs.add(storage.data_ptr())
            size = storage.nbytes()
            counted.total += size
            counted.live += size
            counted.peak = max(counted.peak, counted.live)
            weakref.finalize(tensor, _release, counted, size)
        return out


def _release(counted: Allocations, size: int) -> None:
    counted.live -= size
