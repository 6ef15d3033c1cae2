"""usn_perception/allocator.py: freed memory stays in the process (on glibc), idempotently."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import resource, numpy as np
from usn_perception.allocator import keep_freed_memory
if {keep}:
    assert keep_freed_memory() and keep_freed_memory()  # idempotent
def churn():
    for _ in range(20):
        a = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, beyond glibc's adaptive mmap limit
        del a
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(keep: bool) -> int:
    out = subprocess.run([sys.executable, '-c', SCRIPT.format(keep=keep)], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip())


def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    if not sys.platform.startswith('linux'):
        return
    churned, kept = _page_faults(False), _page_faults(True)
    assert churned >= 20  # every block faulted in again (2 MiB pages: 32 faults a block)
    assert kept < 20 and kept <= churned // 10
