"""Keep freed memory in the process for reuse, instead of handing it back to the kernel after every tensor.

PyTorch has no caching allocator on the CPU: every activation is a fresh ``malloc``. glibc serves blocks above
its mmap threshold with a new ``mmap`` and returns them with ``munmap`` on free (and trims the heap top above
128 KiB), so the next tensor of the same size starts on fresh pages, and the kernel zero-fills each 4 KiB page
on first touch. For this network, whose layers are cheap per byte (1x3x3 convolutions, Project & Excite and the
attention modules are element-wise passes over full-size tensors), those page faults cost as much as the
arithmetic: on the 2-core AMD EPYC of this project, one training step at batch 16 took 8.2 s with glibc's
defaults and 4.5 s with freed memory kept (single thread; ``benchmarks/network_speed.py`` measures it side by side).

:func:`keep_freed_memory` sets glibc's ``mallopt`` so that blocks come from the heap and freed memory stays
there for the next tensor (what PyTorch's CPU tuning guide gets by preloading jemalloc or tcmalloc, without a
preload). Training keeps every block (batch-16 activations are 67-134 MB; resident memory keeps its high-water
mark, about +3 % at batch 16); gtv-predict keeps blocks up to 32 MiB, which holds every activation of a two-tile
batch while CT volumes and probability maps are still returned (six models on a clinical CT: 3.4 GiB peak, as
before, instead of 5.0 GiB when every block is kept). Outputs are unchanged: only where the bytes live differs.
Elsewhere than glibc on Linux it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
# glibc's upper limit for M_MMAP_THRESHOLD on 64-bit systems
LARGEST_MMAP_THRESHOLD = 32 * 2**20
# heap top kept unreturned: a C int, so the largest value mallopt accepts for it
KEEP_UP_TO_BYTES = 2**31 - 1


@functools.lru_cache(maxsize=None)
def keep_freed_memory(blocks_up_to: int | None = None) -> bool:
    """Keep freed memory on the heap for reuse (glibc only); True when glibc accepted it.

    ``blocks_up_to``: None keeps every block (training: a batch-16 activation is 67-134 MB); a size keeps blocks
    up to it (at most 32 MiB, glibc's limit) and still maps and returns larger ones, so large arrays that live
    once per case (CT volumes, probability maps) do not stay resident (inference: a two-tile batch's largest
    activation is 17 MB). Applies to the whole process from the call on.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    served_from_heap = (libc.mallopt(M_MMAP_MAX, 0) if blocks_up_to is None
                        else libc.mallopt(M_MMAP_THRESHOLD, min(int(blocks_up_to), LARGEST_MMAP_THRESHOLD)))
    return bool(served_from_heap) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO_BYTES))
