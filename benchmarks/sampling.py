"""Time episode sampling, and its share of a second-order MAML meta-step, in one run.

For each split (default: the train parts of ``vinyals`` and ``maml``) and each query size
(default 1 and 15 images per class), times ``EpisodeSampler.sample(meta_batch, generator)`` for
5-way 1-shot Omniglot (28x28, from ``--data-dir``, else ``$METALEARN_DATA`` or the cache, via
``metalearn.data.omniglot.load_omniglot``). For each query size it then times metalearn's
second-order vmapped MAML meta-step (forward + backward, Conv4, the function that times row (a)
of ``maml_step.py``) on a batch that sampler drew, and reports sampling time / meta-step time.
Building the sampler (rotating the class bank) happens once per split and is not timed.

    python benchmarks/sampling.py --json benchmarks/results/sampling.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_step import cpu_description, save_json, time_metalearn_maml, warn_if_loaded  # noqa: E402

from metalearn.data.omniglot import default_data_dir, load_omniglot  # noqa: E402
from metalearn.data.splits import omniglot_split  # noqa: E402
from metalearn.tasks import EpisodeSampler  # noqa: E402



def time_sampling(sampler: EpisodeSampler, meta_batch: int, iters: int, warmup: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        sampler.sample(meta_batch, generator)
        elapsed = (time.perf_counter() - start) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return times


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="Omniglot archives (default: $METALEARN_DATA, else the cache folder)")
    p.add_argument("--splits", default="vinyals/train,maml/train", help="comma-separated split/part")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", default="1,15", help="comma-separated query images per class")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=100, help="timed sample() calls per setting")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--maml-iters", type=int, default=10, help="timed MAML meta-steps per query size")
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--inner-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    data_dir = args.data_dir or default_data_dir()
    queries = [int(q) for q in args.queries.split(",")]
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]

    print(f"torch {torch.__version__}, threads {threads}, cpus {os.cpu_count()} ({cpu_description()}), "
          f"load average {os.getloadavg()}; data {data_dir}")
    warn_if_loaded(threads)
    omniglot = load_omniglot(data_dir)
    images = torch.from_numpy(omniglot.images)

    rows, batches = [], {}
    for split in splits:
        name, part = split.split("/")
        pool = omniglot_split(omniglot, name, part)
        for query in queries:
            sampler = EpisodeSampler(images, pool, args.ways, args.shots, query)
            times = time_sampling(sampler, args.meta_batch, args.iters, args.warmup, args.seed)
            batches.setdefault(query, sampler.sample(args.meta_batch, torch.Generator().manual_seed(args.seed)))
            rows.append({"split": split, "classes": len(pool), "query": query,
                         "median_ms": statistics.median(times), "mean_ms": statistics.fmean(times),
                         "times_ms": times})
            print(f"sampled {split} query {query}: {rows[-1]['median_ms']:.2f} ms", flush=True)

    steps = {}
    for query, batch in batches.items():
        print(f"timing second-order MAML meta-step, query {query} ...", flush=True)
        steps[query] = time_metalearn_maml(batch, first_order=False, inner_lr=args.inner_lr,
                                           inner_steps=args.inner_steps, iters=args.maml_iters,
                                           warmup=args.warmup, seed=args.seed)
    for row in rows:
        step = steps[row["query"]]["median_ms"]
        row["maml_step_ms"] = step
        row["share_of_step"] = row["median_ms"] / step

    lines = [
        f"| split | classes | {args.ways}-way {args.shots}-shot, query/class | sample() ms/meta-batch "
        f"(median) | mean | 2nd-order MAML step ms (median) | sampling / step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['split']} | {r['classes']} | {r['query']} | {r['median_ms']:.2f} | "
                     f"{r['mean_ms']:.2f} | {r['maml_step_ms']:.1f} | {100 * r['share_of_step']:.2f}% |")
    table = "\n".join(lines)
    print()
    print(f"meta-batch {args.meta_batch}; {args.iters} timed sample() calls and {args.maml_iters} timed "
          f"meta-steps per setting, after {args.warmup} warm-up")
    print(table)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__, "threads": threads, "cpu": cpu_description(), "load_average": os.getloadavg(),
        "rows": rows, "maml_steps": {str(q): s for q, s in steps.items()}, "table": table,
    }
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
