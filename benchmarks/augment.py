"""Time drawing training episodes with and without ``--augment``.

Times ``EpisodeSampler.sample(meta_batch, generator)`` of 5-way 1-shot 15-query 84x84 RGB
episodes (the MAML paper's mini-ImageNet episode; a meta-batch of 32 of them, the benchmark's
choice, where that paper takes 4: 2,560 images) from a bank of random
uint8 images (sampling does not depend on what the pixels show), with no augmentation, each part
alone and all three (``crop,flip,color``). The settings are timed round-robin, in a new
shuffled order every round, so that a change of the machine's load falls on all of them alike.
glibc's allocator is tuned as the ``metalearn`` command tunes it
(:func:`metalearn.runtime.tune_allocator`), so that a meta-batch's 217 MB of floats are not
page-faulted in again at every draw.

    python benchmarks/augment.py --threads 1 --json benchmarks/results/augment.json
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_step import cpu_description, save_json, warn_if_loaded  # noqa: E402

from metalearn.data.splits import ClassPool  # noqa: E402
from metalearn.runtime import tune_allocator  # noqa: E402
from metalearn.tasks.episodes import EpisodeSampler  # noqa: E402

SETTINGS = ("", "crop", "flip", "color", "crop,flip,color")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=int, default=64, help="classes in the bank (mini-ImageNet's train part: 64)")
    p.add_argument("--per-class", type=int, default=60, help="images per class in the bank")
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--query", type=int, default=15)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=20, help="timed sample() calls per setting")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    tune_allocator()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, threads {threads}, cpus {os.cpu_count()} ({cpu_description()}), "
          f"load average {os.getloadavg()}", flush=True)
    warn_if_loaded(threads)
    side, n = args.image_size, args.classes * args.per_class
    images = torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    pool = ClassPool("bank", torch.arange(args.classes), torch.zeros(args.classes, dtype=torch.long))
    sizes = torch.full((args.classes,), args.per_class)
    samplers = {augment: EpisodeSampler(images, pool, args.ways, args.shots, args.query, class_sizes=sizes,
                                        augment=augment) for augment in SETTINGS}
    generators = {augment: torch.Generator().manual_seed(1) for augment in SETTINGS}
    times: dict[str, list[float]] = {augment: [] for augment in SETTINGS}
    order = list(SETTINGS)
    shuffle = random.Random(0)
    for round_ in range(args.warmup + args.rounds):
        shuffle.shuffle(order)
        for augment in order:
            start = time.perf_counter()
            samplers[augment].sample(args.meta_batch, generators[augment])
            if round_ >= args.warmup:
                times[augment].append((time.perf_counter() - start) * 1e3)
    plain = statistics.median(times[""])
    rows = [{"augment": augment, "median_ms": statistics.median(times[augment]), "min_ms": min(times[augment]),
             "extra_ms": statistics.median(times[augment]) - plain, "times_ms": times[augment]}
            for augment in SETTINGS]
    images_drawn = args.meta_batch * args.ways * (args.shots + args.query)
    lines = [f"| --augment | sample({args.meta_batch}) ms (median) | fastest | beyond no augmentation | "
             "per image |", "| --- | ---: | ---: | ---: | ---: |"]
    for row in rows:
        extra = row["extra_ms"] if row["augment"] else 0.0
        lines.append(f"| {row['augment'] or '(none)'} | {row['median_ms']:.0f} | {row['min_ms']:.0f} | "
                     f"{extra:+.0f} ms | {1e3 * extra / images_drawn:.0f} us |")
    table = "\n".join(lines)
    print(f"\n{args.meta_batch} tasks of {args.ways}-way {args.shots}-shot {args.query}-query {side}x{side} RGB "
          f"({images_drawn} images); {args.rounds} timed rounds after {args.warmup}")
    print(table)
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "torch": torch.__version__, "threads": threads, "cpu": cpu_description(),
              "load_average": os.getloadavg(), "images_per_batch": images_drawn, "rows": rows, "table": table}
    if args.json:
        save_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
