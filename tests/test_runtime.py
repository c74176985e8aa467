"""The allocator setting the ``metalearn`` command applies."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from metalearn.runtime import OPT_OUT_VARIABLE, tune_allocator


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT_VARIABLE, "1")
    assert tune_allocator() is False


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
                    reason="glibc only")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    """After tuning, a freed 100 MB block is reused: allocating it again costs no page faults
    (without tuning glibc unmaps it on free and every page faults in again)."""
    script = (
        "import resource, torch\n"
        "from metalearn.runtime import tune_allocator\n"
        "assert tune_allocator()\n"
        "faults = []\n"
        "for _ in range(7):\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    x = torch.ones(25_000_000); del x\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "print(min(faults[1:]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert int(out.stdout) < 1000  # 100 MB is 24,000 pages of 4 KiB
