"""keep_freed_memory: freed memory stays in the process (no fresh, page-faulting memory for the next tensor)."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning applies to glibc on Linux only")

RETAINED_MIB = """
import os, sys
import numpy as np
from nnunetv2_gtv.allocator import keep_freed_memory

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # a second call is harmless
elif sys.argv[1] == "keep-small":
    assert keep_freed_memory(64 * 2**20)  # more than glibc allows: 32 MiB
before = rss_mib()
small = [np.ones(16 * 2**20, dtype=np.uint8) for _ in range(4)]  # 4 x 16 MiB, touched
large = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MiB, touched
del small, large
print(rss_mib() - before)
"""


def _retained_mib(mode: str) -> float:
    result = subprocess.run([sys.executable, "-c", RETAINED_MIB, mode], check=True, capture_output=True, text=True)
    return float(result.stdout.strip())


def test_freed_blocks_stay_in_the_process_only_when_asked():
    assert _retained_mib("default") < 20  # glibc returns large freed blocks to the kernel
    assert _retained_mib("keep") > 250  # all kept: the next tensors reuse these pages without faulting them in
    assert 50 < _retained_mib("keep-small") < 100  # the 16 MiB blocks kept, the 200 MiB one returned
