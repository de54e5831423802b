"""The allocator setting the CPU executors apply: freed memory is reused, not faulted in again.

Each case runs in a fresh interpreter (no torch), as malloc's state is per process: 20 rounds of
allocating, touching and freeing three 20 MiB blocks, counting the minor page faults of the rounds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

ROUNDS = """
import resource, sys
if sys.argv[1] == "keep":
    from voidprompt.allocator import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
del [bytearray(20 << 20) for _ in range(3)][:]
before = faults()
for _ in range(20):
    blocks = [bytearray(20 << 20) for _ in range(3)]
    del blocks
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_blocks_are_reused_without_page_faults() -> None:
    pages = 20 * 3 * (20 << 20) // 4096  # every round touching fresh pages faults each one in
    default = _faults("default")
    kept = _faults("keep")
    # malloc as it ships: freed blocks beyond its (self-raising) trim threshold go back to the OS,
    # and a third of the pages fault in again round after round.
    assert default > pages // 4
    assert kept < pages // 100
