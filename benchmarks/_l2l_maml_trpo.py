"""The learn2learn side of ``benchmarks/rl.py``; runs in a peer virtualenv with learn2learn,
cherry-rl and gym (see ``rl.py`` for how to build it).

Not meant to be run by hand: ``rl.py --peer-python PY --l2l-example FILE`` starts it. It imports
learn2learn's own MAML-TRPO example (``examples/rl/maml_trpo.py`` from learn2learn's
repository, with its ``policies.py`` in the same folder; nothing of it is copied here) and runs
its ``main()`` unchanged on ``Particles2D-v1`` (2D navigation, horizon 100) with the paper's
meta-batch 20 and 20 trajectories per task, observing it from outside:

- the start of each meta-iteration: the example iterates over ``tqdm(..., desc='Data')`` once
  per iteration; the module's ``tqdm`` is replaced by a pass-through that records the time;
- the sampling: ``cherry.envs.Runner.run`` is wrapped to time it and count the transitions it
  returns (what the example learns from);
- the meta-objective's evaluations (``meta_surrogate_loss``, which re-adapts every task): once
  for the TRPO direction, then once per line-search step, counted per meta-iteration;
- CPU time: this process's ``time.process_time()`` plus the user and system time of the
  example's environment workers (``AsyncVectorEnv``'s processes, read from ``/proc``).

Two compatibility shims, neither of which changes what is computed: cherry-rl 0.1.4's
``LinearValue.fit`` calls ``torch.lstsq(b, A)``, removed from torch, which is mapped to
``torch.linalg.lstsq(A, b)`` (the same solution of the square system); the example's prints
are sent to stderr so that stdout holds only the result, one line prefixed with ``@@``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import os
import platform
import sys
import time


def children_cpu_seconds() -> float:
    """User plus system CPU seconds of this process's live children (Linux ``/proc``)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--example", required=True, help="learn2learn's examples/rl/maml_trpo.py")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--workers", type=int, default=10, help="the example's num_workers (its default: 10)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not hasattr(torch, "gels"):
        torch.lstsq = lambda b, A: (torch.linalg.lstsq(A, b).solution, None)

    sys.path.insert(0, os.path.dirname(os.path.abspath(args.example)))
    spec = importlib.util.spec_from_file_location("maml_trpo", args.example)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    import cherry
    import learn2learn

    starts: list[tuple[float, float]] = []   # (wall, cpu) at the start of each meta-iteration
    sampling = {"seconds": 0.0, "transitions": 0}

    def clocks() -> tuple[float, float]:
        return time.perf_counter(), time.process_time() + children_cpu_seconds()

    run = cherry.envs.Runner.run

    def timed_run(self, *a, **k):
        start = time.perf_counter()
        replay = run(self, *a, **k)
        sampling["seconds"] += time.perf_counter() - start
        sampling["transitions"] += len(replay)
        return replay

    surrogate = example.meta_surrogate_loss
    evaluations: list[int] = []

    def counted_surrogate(*a, **k):
        evaluations[-1] += 1
        return surrogate(*a, **k)

    def tqdm(iterable, *_, desc=None, **__):
        if desc == "Data":
            starts.append(clocks())
            evaluations.append(0)
        return iterable

    example.meta_surrogate_loss = counted_surrogate
    example.tqdm = tqdm
    example.print = lambda *a, **k: print(*a, **k, file=sys.stderr)
    cherry.envs.Runner.run = timed_run
    main_start = clocks()
    example.main(num_iterations=args.iterations, meta_bsz=20, adapt_bsz=20, num_workers=args.workers)
    # the workers are still alive (the example never closes its environment): read them now
    starts.append(clocks())
    wall = [b[0] - a[0] for a, b in zip(starts, starts[1:])]
    cpu = [b[1] - a[1] for a, b in zip(starts, starts[1:])]
    import gym

    result = {
        "torch": torch.__version__, "learn2learn": learn2learn.__version__, "cherry": cherry.__version__,
        "gym": gym.__version__, "python": platform.python_version(), "threads": args.threads,
        "workers": args.workers, "setup_s": starts[0][0] - main_start[0],
        "meta_iteration_wall_s": wall, "meta_iteration_cpu_s": cpu,
        "objective_evaluations": evaluations,
        "transitions": sampling["transitions"], "sampling_s": sampling["seconds"],
        "env_steps_per_s_with_policy": sampling["transitions"] / sampling["seconds"],
    }
    sys.stdout.write("@@" + json.dumps(result) + "\n")
    sys.stdout.flush()
    for child in multiprocessing.active_children():  # the example leaves its workers running
        child.terminate()


if __name__ == "__main__":
    main()
