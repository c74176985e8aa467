"""What the per-step scores cost at evaluation, for the methods that adapt in steps:
``predict_per_step`` (the accuracy after every test-time step, what ``metalearn eval`` reports
by default) against ``predict`` (the final predictions alone: ``metalearn eval --final-only``
and training's validation; the same final numbers: tests/test_maml.py, test_platipus.py,
test_reptile.py).

Configurations, on synthetic Omniglot-shaped 1-shot episodes (random weights: the values do not
change the cost), each as its reproduction command trains it:

- ``reptile5``, ``reptile20``: Reptile, 5- and 20-way (50 test-time Adam steps, transductive,
  docs/methods/reptile.md), its carried inner Adam state at zero;
- ``maml5``, ``maml20``: MAML at the paper's Omniglot settings (3 test-time steps at 5-way, 5
  at 20-way);
- ``maml++20``: MAML's ``--preset maml++`` at 20-way 1-shot (5 test-time steps, per-step batch
  norm, its max-pool network);
- ``platipus5``: PLATIPUS at 5-way (its sampled models, each adapted in steps).

Median of ``--iters`` timed repetitions after one warm-up. ``--json`` records the rows with the
torch version, the threads, the processor and the load average.

    python benchmarks/eval_final_only.py --threads 1 --episodes 20 [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from maml_step import cpu_description, save_json  # noqa: E402
from methods import median_seconds, synthetic_batch  # noqa: E402

from metalearn.algorithms import build_learner  # noqa: E402
from metalearn.api import resolve_config  # noqa: E402
from metalearn.runtime import tune_allocator  # noqa: E402
from metalearn.tasks import problem_of  # noqa: E402

# name: (method, preset, ways, the task options of its training run)
CONFIGS = {
    "reptile5": ("reptile", None, 5, {"shots": 10, "test_shots": 1, "query": 1}),
    "reptile20": ("reptile", None, 20, {"shots": 10, "test_shots": 1, "query": 1}),
    "maml5": ("maml", None, 5, {"shots": 1, "query": 1}),
    "maml20": ("maml", None, 20, {"shots": 1, "query": 1}),
    "maml++20": ("maml", "maml++", 20, {"shots": 1, "query": 1}),
    "platipus5": ("platipus", None, 5, {"shots": 1, "query": 1}),
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--episodes", type=int, default=20, help="test episodes per timed call")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    for name in ("episodes", "iters", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} takes 1 or more, got {getattr(args, name)}")
    tune_allocator()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cpus ({cpu_description()}), "
          f"load average {load:.2f}, {args.episodes} episodes per call")
    print(f"{'configuration':<14} {'steps':>5} {'per step (s)':>13} {'final only (s)':>15} {'saved':>6}")
    rows = []
    for name in args.configs:
        method, preset, ways, task = CONFIGS[name]
        config = resolve_config(method, task={"dataset": "omniglot", "ways": ways, **task}, preset=preset)
        torch.manual_seed(0)
        learner = build_learner(method, config.method_config, problem_of(config.task)).eval()
        batch = synthetic_batch(args.episodes, ways, 1, 1, config.task.image_size, seed=1)
        per_step = median_seconds(lambda: learner.predict_per_step(batch), args.iters)
        final = median_seconds(lambda: learner.predict(batch), args.iters)
        steps = config.method_config["test_inner_steps"]
        print(f"{name:<14} {steps:>5} {per_step:>13.2f} {final:>15.2f} {1 - final / per_step:>6.0%}")
        rows.append({"configuration": name, "test_inner_steps": steps, "per_step_s": per_step,
                     "final_only_s": final, "saved": 1 - final / per_step})
    if args.json:
        save_json(args.json, {
            "rows": rows, "episodes": args.episodes, "iters": args.iters, "threads": args.threads,
            "torch": torch.__version__, "cpu": cpu_description(), "cpus": os.cpu_count(),
            "load_average": load, "load_average_after": os.getloadavg()[0],
        })


if __name__ == "__main__":
    main()
