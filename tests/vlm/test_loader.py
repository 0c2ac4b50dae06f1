"""Model loading helpers that need no weights."""

import platform
import resource

import pytest
import torch

from core.vlm.loader import keep_freed_memory


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def temporaries() -> None:
    """Four 8 MiB tensors alive at once, then freed: a prefill layer's pattern."""
    held = [torch.empty(2 << 20).fill_(1.0) for _ in range(4)]
    del held


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_kept_heap_serves_repeated_temporaries_without_page_faults():
    # glibc's defaults hand this memory back each time: 10 rounds fault in ~14k pages.
    assert keep_freed_memory()
    temporaries()
    temporaries()
    before = minor_faults()
    for _ in range(10):
        temporaries()
    assert minor_faults() - before < 2_500  # at most one tensor's pages, once
