"""One ProtoNets meta-step per network (``--networks``, default conv4-embedding and resnet12) on
photograph-shaped episodes: what a bigger backbone costs a step.

Each network is built from the registry (``metalearn.models.NETWORKS``) as ``metalearn train
protonet --model NAME`` builds it for ``--channels`` x ``--image-size`` images, and timed on a
fixed synthetic batch (no data on disk) of ``--meta-batch`` episodes of ``--ways``-way
``--shots``-shot with ``--query`` queries per class:

  step  -- ``meta_loss`` + ``backward`` + an Adam step, the training step;
  eval  -- ``predict`` of the same batch without gradients, the test episode.

The networks are timed round-robin (one call of each per round, after one warm-up round), so a
change in machine load affects them alike; the median of ``--iters`` rounds. As the ``metalearn``
command does, the allocator is tuned first (``metalearn.runtime``).

    OMP_NUM_THREADS=1 python benchmarks/networks.py --threads 1 --json benchmarks/results/networks_1thread.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import metalearn
from metalearn.algorithms import build_learner
from metalearn.models import network_names
from metalearn.runtime import tune_allocator
from metalearn.tasks.batch import Problem, TaskBatch

EMBEDDINGS = network_names("embedding", "image")  # what a ProtoNets step can embed with

from maml_step import cpu_description  # this folder's module


def synthetic_batch(tasks: int, ways: int, shots: int, query: int, channels: int, size: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways)
    return TaskBatch(torch.rand(tasks, ways * shots, channels, size, size, generator=g),
                     labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, ways * query, channels, size, size, generator=g),
                     labels.repeat_interleave(query).expand(tasks, -1).contiguous(), ways=ways)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--networks", default="conv4-embedding,resnet12",
                        help=f"comma-separated embedding networks of the registry: {', '.join(EMBEDDINGS)}")
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--query", type=int, default=15, help="queries per class")
    parser.add_argument("--meta-batch", type=int, default=1, help="episodes per step (ProtoNets' paper: 1)")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=84)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    names = args.networks.split(",")
    unknown = [name for name in names if name not in EMBEDDINGS]
    if unknown:
        parser.error(f"--networks: {', '.join(unknown)} is no embedding network of the registry: "
                     f"{', '.join(EMBEDDINGS)}")
    tuned = tune_allocator()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), allocator {'tuned' if tuned else 'default'}, "
          f"load average {load:.2f} on {os.cpu_count()} cpus ({cpu_description()})")
    batch = synthetic_batch(args.meta_batch, args.ways, args.shots, args.query, args.channels, args.image_size)
    problem = Problem((args.channels, args.image_size, args.image_size), args.ways, True)

    steps, predictions, sizes = {}, {}, {}
    for name in names:
        torch.manual_seed(0)
        learner = build_learner("protonet", {"model": name}, problem)
        optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
        sizes[name] = sum(p.numel() for p in learner.parameters())

        def step(learner=learner, optimizer=optimizer):
            loss, _ = learner.meta_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def predict(learner=learner):
            with torch.no_grad():
                learner.predict(batch)

        steps[name], predictions[name] = step, predict

    times: dict[str, dict[str, list[float]]] = {name: {"step": [], "eval": []} for name in names}
    for round in range(args.iters + 1):  # round 0: the warm-up
        for name in names:
            for kind, fn in (("step", steps[name]), ("eval", predictions[name])):
                start = time.perf_counter()
                fn()
                if round:
                    times[name][kind].append(time.perf_counter() - start)

    shape = (f"{args.meta_batch} x {args.ways}-way {args.shots}-shot, {args.query} query/class, "
             f"{args.channels}x{args.image_size}x{args.image_size}")
    print(f"protonet, {shape}")
    print(f"{'network':18s} {'parameters':>12s} {'ms/step':>9s} {'ms/eval':>9s}")
    rows = []
    for name in names:
        row = {"network": name, "parameters": sizes[name],
               "step_ms": 1000 * statistics.median(times[name]["step"]),
               "eval_ms": 1000 * statistics.median(times[name]["eval"])}
        rows.append(row)
        print(f"{name:18s} {row['parameters']:12,d} {row['step_ms']:9.0f} {row['eval_ms']:9.0f}")
    end_load = os.getloadavg()[0]
    print(f"load average {end_load:.2f} at the end")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metalearn": metalearn.__version__, "torch": torch.__version__, "threads": args.threads,
                       "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "allocator": "tuned" if tuned else "default", "cpu": cpu_description(), "cpus": os.cpu_count(),
                       "load_average_at_start": load, "load_average_at_end": end_load, "method": "protonet",
                       "shape": shape, "iters": args.iters, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
