"""What Reptile's per-step scores cost at evaluation: ``predict_per_step`` (the accuracy after
every one of the 50 test-time Adam steps, what ``metalearn eval`` reports by default) against
``predict`` (the final predictions alone: ``metalearn eval --final-only`` and training's
validation), on synthetic Omniglot-shaped 1-shot episodes configured as the 5-way and 20-way
reproduction commands of docs/methods/reptile.md, with the carried inner Adam state at zero (its values do not
change the cost). Median of ``--iters`` timed repetitions after one warm-up.

    python benchmarks/reptile_eval.py --threads 1 --episodes 20
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from methods import median_seconds, synthetic_batch  # noqa: E402

from metalearn.algorithms import build_learner  # noqa: E402
from metalearn.api import resolve_config  # noqa: E402
from metalearn.runtime import tune_allocator  # noqa: E402
from metalearn.tasks import problem_of  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=20, help="test episodes per timed call")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    tune_allocator()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}, "
          f"{args.episodes} episodes per call")
    print(f"{'shape':<16} {'per step (s)':>13} {'final only (s)':>15} {'saved':>6}")
    for ways in (5, 20):
        config = resolve_config("reptile", task={"dataset": "omniglot", "ways": ways, "shots": 10,
                                                 "test_shots": 1, "query": 1})
        torch.manual_seed(0)
        learner = build_learner("reptile", config.method_config, problem_of(config.task)).eval()
        batch = synthetic_batch(args.episodes, ways, 1, 1, config.task.image_size, seed=1)
        per_step = median_seconds(lambda: learner.predict_per_step(batch), args.iters)
        final = median_seconds(lambda: learner.predict(batch), args.iters)
        print(f"{f'{ways}-way 1-shot':<16} {per_step:>13.2f} {final:>15.2f} {1 - final / per_step:>6.0%}")


if __name__ == "__main__":
    main()
