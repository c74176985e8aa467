"""Commands in child processes, as a user runs them from the shell: ``metalearn train``, and a
program under torchrun on local CPU processes."""

from __future__ import annotations

import os
import subprocess
import sys


def env(dist_timeout_s: int = 120):
    """A collective timeout long enough for a loaded CI machine; the dead-rank test shortens it."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "METALEARN_DIST_TIMEOUT": str(dist_timeout_s)}


def metalearn(args, tmp_path):
    done = subprocess.run([sys.executable, "-m", "metalearn", "train", *map(str, args)], env=env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def launch(program: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """torchrun ``program`` (a script and its arguments, or ``-m module ...``) on ``nproc``
    local processes; it must succeed."""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           *program], env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done
