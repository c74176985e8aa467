#!/usr/bin/env python3
"""SIGKILL a real training run many times at random moments (a share of them inside checkpoint
writes), resume it after each kill, and check that the end state is bit-identical to a run
never interrupted: weights, optimiser, scheduler, RNG state and metrics (but their timings).
The CI test (tests/test_kill_resume.py) does three kills; this does as many as asked.

    python scripts/kill-resume.py --kills 40                   # MAML on sinusoids
    python scripts/kill-resume.py --kills 20 --method protonet  # ProtoNets on 5-way 1-shot Omniglot

Any registered method: on 5-way 1-shot Omniglot with its paper's defaults, unless RUNS below
gives its run.

Omniglot is read from $METALEARN_DATA, else from ../shared/data/omniglot beside the project
(as the tests find it).

Prints one line per kill and, at the end, the verdict; exits 1 on a difference.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import training_process as child  # noqa: E402
from metalearn.algorithms import METHODS  # noqa: E402
from metalearn.run_files import RUN_MARKERS  # noqa: E402
from metalearn.runs import RunDir  # noqa: E402

COMMON = ["--checkpoint-every", 1, "--log-every", 1, "--no-progress", "--no-eval", "--val-every", 5,
          "--val-episodes", 4]
# a registered method's run: 5-way 1-shot Omniglot with its paper's defaults, unless named here
OMNIGLOT = ["--dataset", "omniglot", "--ways", 5, "--shots", 1, "--query", 1, "--meta-batch-size", 2,
            "--split", "vinyals"]
RUNS = {
    "maml": ["--dataset", "sinusoid", "--meta-batch-size", 4],
    "maml-rl": ["--env", "nav2d", "--meta-batch-size", 4, "--trajectories", 4, "--test-trajectories", 4,
                "--horizon", 10, "--hidden", 8],
}


def run_of(method: str) -> list:
    """``metalearn train METHOD ...``'s arguments for ``method``'s run (without its length)."""
    if method not in RUNS and METHODS[method].reinforcement:  # no Omniglot: which environment, how small?
        sys.exit(f"{method} learns from MDPs: give its run (--env and small options) in RUNS of {__file__}")
    return ["train", method, *RUNS.get(method, OMNIGLOT), *COMMON]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=40)
    parser.add_argument("--method", choices=sorted(METHODS), default="maml", help="any registered method")
    parser.add_argument("--steps", type=int, default=None, help="default: 10 per kill and 20 more")
    parser.add_argument("--in-writes", type=float, default=0.25, help="share of the kills inside a checkpoint write")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments (not the training)")
    parser.add_argument("--folder", type=Path, default=None, help="where the two runs go (default: a temporary folder)")
    args = parser.parse_args()
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    if not os.environ.get("METALEARN_DATA") and shared.is_dir():
        os.environ["METALEARN_DATA"] = str(shared)  # the children inherit it
    rng = random.Random(args.seed)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    args.steps = args.steps or 10 * args.kills + 20
    train = [*run_of(args.method), "--steps", args.steps]
    reference, killed = folder / "uninterrupted", folder / "killed"

    started = time.monotonic()
    process = child.start([*train, "--run-dir", reference])
    child.wait_for(process, "SAVED 1")
    startup_s = time.monotonic() - started  # until the first checkpoint is in place
    code, _, err = child.finish(process)
    if code:
        sys.exit(f"the uninterrupted run failed: {err[-2000:]}")

    kills, in_writes, finished = 0, 0, False
    while kills < args.kills:
        resume = ["--resume"] if RunDir(killed).config_path.exists() else []
        draw = rng.random()
        if draw < args.in_writes:  # inside the n-th checkpoint write of this process
            write = rng.randint(1, 3)
            process = child.start([*train, "--run-dir", killed, *resume], HOLD_WRITE=str(write))
            marker, delay, moment = f"WRITING {write}", 0.0, f"inside checkpoint write {write}"
        elif draw < args.in_writes + 0.15:  # while it starts: imports, reading the folder, building
            process = child.start([*train, "--run-dir", killed, *resume])
            marker, delay = None, rng.uniform(0, 0.8 * startup_s)
            moment = f"{delay:.2f}s after its start"
        else:  # in a step: shortly after its n-th checkpoint
            saved = rng.randint(1, 3)
            process = child.start([*train, "--run-dir", killed, *resume])
            marker, delay = f"SAVED {saved}", rng.uniform(0, 0.05)
            moment = f"{delay * 1000:.0f} ms after checkpoint write {saved}"
        try:
            if marker:
                child.wait_for(process, marker)
        except AssertionError as err:  # it ended first: the run is complete, or it failed
            if process.returncode != 0:
                sys.exit(f"a resumed run failed: {err}")
            finished = True
            break
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.005)
        if process.poll() is not None:
            code, _, err = child.finish(process)
            if code:
                sys.exit(f"a resumed run failed: {err[-2000:]}")
            finished = True
            break
        child.kill(process)
        in_writes += marker is not None and marker.startswith("WRITING")
        kills += 1
        leftovers = sorted(p.name for p in killed.glob("*.tmp*")) if killed.exists() else []
        step = "none"
        if RunDir(killed).checkpoint_path.exists():
            step = RunDir(killed).read_checkpoint("step")["step"]
        print(f"kill {kills:3d}: {moment}; checkpoint at step {step}; left {leftovers or 'no temporary file'}",
              flush=True)
    if not finished:
        code, _, err = child.finish(child.start([*train, "--run-dir", killed, "--resume"]))
        if code:
            sys.exit(f"the last resume failed: {err[-2000:]}")
    try:
        child.assert_same_state(reference, killed)
    except AssertionError as err:
        print(f"DIFFERENT after {kills} kills ({in_writes} inside checkpoint writes): {err}")
        return 1
    names = sorted(p.name for p in killed.iterdir())
    print(f"bit-identical to the uninterrupted run after {kills} kills ({in_writes} inside checkpoint writes) "
          f"of {args.method}, {args.steps} steps; the folder holds {names}")
    return 0 if names == sorted(RUN_MARKERS) else 1


if __name__ == "__main__":
    sys.exit(main())
