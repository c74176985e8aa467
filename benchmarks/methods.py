"""Episodes per second of every method, training and evaluation, on Omniglot-shaped tasks.

Each method is configured as its reproduction command (docs/methods/) for 5-way 1-shot configures it
(``metalearn.api.resolve_config``: the paper's defaults plus the command's task options) and
timed on fixed synthetic batches of that shape (no sampling, no data on disk):

  train -- one meta-step: ``meta_loss`` + ``backward`` + the meta-optimiser's step, on a batch of
           ``meta_batch_size`` training tasks; episodes/s = tasks per step / time per step, sets/s
           = classes (each one set of support images, the Neural Statistician's unit) per second;
  eval  -- ``predict_per_step`` on a chunk of 50 test episodes (the evaluator's chunk), in the
           test shape (``--test-ways/--test-shots/--test-query``); episodes/s and the time that
           1000 test episodes take.

As the ``metalearn`` command does, the allocator is tuned first (``metalearn.runtime``);
``--default-allocator`` measures without. Median of ``--iters`` timed repetitions after one
warm-up. ``--device cuda`` measures on a GPU, each repetition until its last kernel has finished.

    python benchmarks/methods.py --threads 2 --json benchmarks/results/methods.json
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
from metalearn.api import resolve_config
from metalearn.runtime import tune_allocator
from metalearn.tasks import problem_of
from metalearn.tasks.batch import TaskBatch

from maml_step import checked_device, cpu_description, select_gpu_kernels, synchronize  # this folder's module

# the 5-way 1-shot reproduction commands of docs/methods/, as task options
COMMANDS = {
    "maml": {"ways": 5, "shots": 1},
    "platipus": {"ways": 5, "shots": 1},
    "protonet": {"split": "vinyals", "ways": 60, "shots": 1, "query": 5, "test_ways": 5, "test_query": 15},
    "matchingnet": {"split": "vinyals", "ways": 5, "shots": 1, "query": 5, "test_query": 15},
    "matchingnet-fce": {"split": "vinyals", "ways": 5, "shots": 1, "query": 5, "test_query": 15},
    "reptile": {"ways": 5, "shots": 10, "test_shots": 1, "query": 1},
    # the authors' episodes: 5 classes x 6 examples; memory-conv4: with the Conv4 embedding
    "memory": {"split": "vinyals", "ways": 5, "shots": 1, "query": 5, "test_query": 15},
    "memory-conv4": {"split": "vinyals", "ways": 5, "shots": 1, "query": 5, "test_query": 15},
    # trained on sets of 5 images of a character (5-way 5-shot episodes), tested 5-way 1-shot
    "statistician": {"split": "vinyals", "ways": 5, "shots": 5, "query": 1, "test_shots": 1, "test_query": 5},
}
METHOD_OPTIONS = {"matchingnet-fce": {"full_context_embeddings": True}, "memory-conv4": {"model": "conv4-embedding"}}
EVAL_CHUNK = 50


def synthetic_batch(tasks: int, ways: int, shots: int, query: int, size: int, seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return TaskBatch(torch.rand(tasks, ways * shots, 1, size, size, generator=g),
                     labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
                     torch.rand(tasks, ways * query, 1, size, size, generator=g),
                     labels.repeat_interleave(query).expand(tasks, -1).contiguous(), ways=ways)


def median_seconds(fn, iters: int, device: torch.device = torch.device("cpu")) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(method: str, iters: int, device: torch.device = torch.device("cpu")) -> dict:
    name = method.split("-")[0]
    config = resolve_config(name, task={"dataset": "omniglot", **COMMANDS[method]},
                            method_config=METHOD_OPTIONS.get(method, {}))
    torch.manual_seed(0)
    learner = build_learner(name, config.method_config, problem_of(config.task)).to(device)
    train = config.train
    optimizer = (torch.optim.Adam if train.meta_optimizer == "adam" else torch.optim.SGD)(
        learner.parameters(), lr=train.meta_lr)
    task, test = config.task, config.task.for_testing()
    train_batch = synthetic_batch(train.meta_batch_size, task.ways, task.shots, task.query, task.image_size).to(device)
    test_batch = synthetic_batch(EVAL_CHUNK, test.ways, test.shots, test.query, task.image_size, seed=1).to(device)

    def train_step():
        loss, _ = learner.meta_loss(train_batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_chunk():
        learner.predict_per_step(test_batch)

    learner.train()
    step_s = median_seconds(train_step, iters, device)
    learner.eval()
    chunk_s = median_seconds(eval_chunk, iters, device)
    split = memory_split(learner, train_batch, test_batch, iters, device) if name == "memory" else {}
    return {
        **split, **({"memory_size": learner.config.memory_size} if split else {}),
        "method": method,
        "train_shape": f"{train.meta_batch_size} x {task.ways}-way {task.shots}-shot, {task.query} query/class",
        "test_shape": f"{test.ways}-way {test.shots}-shot, {test.query} query/class",
        "train_step_ms": 1000 * step_s,
        "train_episodes_per_s": train.meta_batch_size / step_s,
        "train_sets_per_s": train.meta_batch_size * task.ways / step_s,  # classes of support images: the statistician's sets
        "eval_episodes_per_s": EVAL_CHUNK / chunk_s,
        "eval_1000_episodes_s": 1000 * chunk_s / EVAL_CHUNK,
    }


def memory_split(learner, train_batch: TaskBatch, test_batch: TaskBatch, iters: int, device: torch.device) -> dict:
    """Where a Memory Module step spends its time, forward only: the CNN (embedding and
    projection of every example) against the memory's rounds (nearest-neighbour search over all
    ``memory_size`` slots, loss and update, on the precomputed queries); and at evaluation the
    CNN against writing the support set and scoring the queries."""

    ways = train_batch.ways
    labels = torch.cat([train_batch.support_y, train_batch.query_y], dim=1)
    with torch.no_grad():
        learner.train()
        support, query = learner.queries(train_batch)
        examples = torch.cat([support, query], dim=1)
        cnn_s = median_seconds(lambda: learner.queries(train_batch), iters, device)
        memory_s = median_seconds(lambda: learner.sequence_loss(examples, labels, support.shape[1], ways), iters, device)
        learner.eval()
        test_support, _ = learner.queries(test_batch)
        eval_cnn_s = median_seconds(lambda: learner.queries(test_batch), iters, device)
        eval_memory_s = median_seconds(
            lambda: learner.predict_from_queries(*learner.queries(test_batch), test_batch.support_y, test_batch.ways),
            iters, device) - eval_cnn_s
    return {"train_cnn_forward_ms": 1000 * cnn_s, "train_memory_ms": 1000 * memory_s,
            "eval_cnn_forward_ms": 1000 * eval_cnn_s, "eval_memory_ms": 1000 * max(eval_memory_s, 0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(COMMANDS))
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--default-allocator", action="store_true", help="do not tune the allocator")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--gpu-kernels", choices=("reproducible", "fast"), default="reproducible",
                        help="reproducible: what metalearn runs (full float32, deterministic cuDNN); fast: torch's defaults")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = checked_device(parser, args.device)
    select_gpu_kernels(device, args.gpu_kernels)
    tuned = False if args.default_allocator else tune_allocator()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), allocator {'tuned' if tuned else 'default'}, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cpus ({cpu_description()}), device {device}"
          + (f" ({torch.cuda.get_device_name(device)}, {args.gpu_kernels} kernels)" if device.type == "cuda" else ""))
    rows = []
    header = (f"{'method':16s} {'train shape':38s} {'ms/step':>8s} {'train ep/s':>10s} {'sets/s':>7s} {'eval ep/s':>9s} "
              f"{'1000 eval eps':>13s}")
    print(header)
    for method in args.methods.split(","):
        row = measure(method, args.iters, device)
        rows.append(row)
        print(f"{method:16s} {row['train_shape']:38s} {row['train_step_ms']:8.0f} {row['train_episodes_per_s']:10.1f} "
              f"{row['train_sets_per_s']:7.1f} {row['eval_episodes_per_s']:9.1f} {row['eval_1000_episodes_s']:12.1f}s",
              flush=True)
        if "train_memory_ms" in row:
            print(f"{'':16s} forward of a train step: CNN {row['train_cnn_forward_ms']:.0f} ms, memory (search over "
                  f"{row['memory_size']} slots, loss, update) {row['train_memory_ms']:.0f} ms; eval chunk: CNN "
                  f"{row['eval_cnn_forward_ms']:.0f} ms, memory {row['eval_memory_ms']:.0f} ms", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"metalearn": metalearn.__version__, "torch": torch.__version__, "threads": args.threads,
                       "allocator": "tuned" if tuned else "default", "cpu": cpu_description(),
                       "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg()[0], "device": str(device), "gpu_kernels": args.gpu_kernels,
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
