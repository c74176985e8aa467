"""A real ``metalearn train`` in a child process that a test can stop at chosen moments.

Run as a script (``python tests/training_process.py train maml ...``) it is the ``metalearn``
command with two test hooks, set through the environment:

* every checkpoint write prints ``WRITING <n>`` once half of the file is written and ``SAVED <n>``
  when it is in place (n counts this process's checkpoint writes, from 1);
* ``HOLD_WRITE=<n>`` holds the n-th write half written until the file ``$HOLD_UNTIL`` exists
  (forever without it), so that a kill lands inside a checkpoint write, or a second process
  meets a folder whose writer is busy.

Imported, it starts such processes and waits for their markers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
SRC = SCRIPT.parents[1] / "src"


def start(args: list, **env: str) -> subprocess.Popen:
    """``metalearn ARGS`` in a child process, stdout as text lines (markers and the CLI's output)."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC), **env}
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(process: subprocess.Popen, marker: str, timeout_s: float = 120) -> list[str]:
    """The child's stdout lines up to and with ``marker``; fails if it ends first or takes too long."""
    timer = threading.Timer(timeout_s, process.kill)
    timer.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == marker:
                return lines
    finally:
        timer.cancel()
    raise AssertionError(f"the child ended before {marker!r} (code {process.wait()}): "
                         f"{lines[-5:]} {process.stderr.read()[-2000:]}")


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()


def finish(process: subprocess.Popen, timeout_s: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout_s)
    return process.returncode, out, err


# what a metrics record measures of the machine, not of the run (maml-rl's env_steps_per_s: its
# rollout speed): two runs that agree in everything else trained alike
TIMING = {"tasks_per_s", "elapsed_s", "validation_s", "env_steps_per_s"}


def assert_same_state(a: Path, b: Path) -> None:
    """Bit for bit: every tensor of the checkpoints (learner, optimiser, scheduler, RNG) and
    every metrics record but its timings."""
    import torch

    from metalearn.runs import RunDir

    sa, sb = RunDir(a).read_checkpoint(), RunDir(b).read_checkpoint()
    assert sa["step"] == sb["step"]

    def same(x, y, where):
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for key in x:
                same(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]")
        else:
            assert x == y, where

    for entry in ("learner", "optimizer", "scheduler", "torch_rng", "config"):
        same(sa[entry], sb[entry], entry)
    strip = lambda run: [{k: v for k, v in r.items() if k not in TIMING} for r in RunDir(run).read_metrics()]
    assert strip(a) == strip(b)


def _run_with_hooks() -> None:
    import torch

    torch.set_num_threads(1)
    import metalearn.runs as runs
    from metalearn.cli import main

    hold_at = int(os.environ.get("HOLD_WRITE", "0"))
    until = os.environ.get("HOLD_UNTIL")
    plain_write = runs.atomic_write_bytes
    writes = 0

    def write_in_halves(path, data):
        nonlocal writes
        if Path(path).name != "checkpoint.pt":
            return plain_write(path, data)
        writes += 1

        def halves(f):
            half = len(data) // 2
            f.write(data[:half])
            f.flush()
            print(f"WRITING {writes}", flush=True)
            while writes == hold_at and not (until and os.path.exists(until)):
                time.sleep(0.02)
            f.write(data[half:])

        runs.atomic_write(path, halves)
        print(f"SAVED {writes}", flush=True)

    runs.atomic_write_bytes = write_in_halves
    main(sys.argv[1:])


if __name__ == "__main__":
    _run_with_hooks()
