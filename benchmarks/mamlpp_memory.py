"""Memory of one meta-step of the MAML++ preset (``metalearn train maml --preset maml++``) in its
two phases: first order with the multi-step loss (its first steps) and second order with the
last step's loss alone (after ``--first-order-steps``). The second is what ``--task-chunk
auto`` has to fit once the preset switches order, which is why the trainer measures the chunk
again there (``MetaLearner.cost_changes``).

The figure is ``metalearn.memory_budget.peak_memory_of`` of ``meta_loss`` + ``backward`` on
``--tasks`` tasks of a synthetic batch, after one untimed call: the rise of the process's
peak resident set on the CPU (what ``--task-chunk auto`` measures), one thread.

    METALEARN_DATA=OMNIGLOT_DIR python benchmarks/mamlpp_memory.py --configs 20w1s 20w5s 5w5s --tasks 2 \\
        --json benchmarks/results/mamlpp_memory.json

(The preset's options resolve as for a run on Omniglot, which needs the data's folder.)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from maml_step import cpu_description, make_batch  # this folder's module
from metalearn.algorithms import make_method_config, method_class
from metalearn.api import resolve_config
from metalearn.memory_budget import peak_memory_of
from metalearn.runtime import tune_allocator
from metalearn.tasks import problem_of

PHASES = {"first order, multi-step loss": 0, "second order, last step's loss": 10**9}


def measure(ways: int, shots: int, tasks: int) -> dict[str, float]:
    config = resolve_config("maml", {"dataset": "omniglot", "ways": ways, "shots": shots}, preset="maml++")
    learner = method_class("maml").build(make_method_config("maml", config.method_config), problem_of(config.task))
    learner.train()
    batch = make_batch(ways, shots, config.task.query, tasks)

    def step() -> None:
        loss, _ = learner.meta_loss(batch)
        loss.backward()

    result = {}
    for phase, at in PHASES.items():
        learner.start_step(min(at, config.train.steps - 1))
        step()  # untimed: first-call costs are not the step's
        result[phase] = peak_memory_of(step, torch.device("cpu")) / 2**30
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["20w1s", "20w5s", "5w5s"], help="WAYSwSHOTSs")
    parser.add_argument("--tasks", type=int, default=2, help="tasks in the measured step")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"allocator tuned: {tune_allocator()}")
    rows = {}
    for name in args.configs:
        ways, shots = (int(part) for part in name.rstrip("s").split("w"))
        rows[name] = measure(ways, shots, args.tasks)
    print(f"torch {torch.__version__}, {cpu_description()}, one thread, "
          f"{args.tasks} tasks a step; GiB, peak resident set's rise")
    print("| configuration | " + " | ".join(PHASES) + " |\n| --- |" + " ---: |" * len(PHASES))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[phase]:.2f}" for phase in PHASES) + " |")
    result = {"torch": torch.__version__, "cpu": cpu_description(), "threads": torch.get_num_threads(), "tasks": args.tasks,
              "gib": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
