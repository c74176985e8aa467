"""Meta-training throughput (tasks/s) with 1 and 2 torchrun processes on this machine.

    python benchmarks/distributed.py [--steps 30] [--procs 1 2] [--dataset omniglot] [--json PATH]

Each process uses one thread (OMP_NUM_THREADS=1), so N processes use N cores. The figure is the
median of the trainer's own tasks/s log entries after the first (warm-up) entry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def throughput(procs: int, steps: int, dataset: str, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "-m", "metalearn", "train", "maml", "--dataset", dataset, "--steps", str(steps),
                   "--log-every", "5", "--val-every", "0", "--checkpoint-every", str(steps), "--no-eval",
                   "--no-progress", "--run-dir", str(run_dir), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [r["tasks_per_s"] for r in records if "tasks_per_s" in r][1:]
        return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dataset", default="omniglot")
    parser.add_argument("--json", type=Path)
    args, extra = parser.parse_known_args()
    extra = extra or ["--ways", "5", "--shots", "1"] if args.dataset == "omniglot" else extra
    load = os.getloadavg()[0]
    results = {p: throughput(p, args.steps, args.dataset, extra) for p in args.procs}
    base = results[args.procs[0]]
    print(f"MAML {args.dataset} {' '.join(extra)}, {os.cpu_count()} cores, load {load:.2f} at start")
    print("| processes | tasks/s | speed-up |\n| ---: | ---: | ---: |")
    for p, rate in results.items():
        print(f"| {p} | {rate:.1f} | {rate / base:.2f}x |")
    if args.json:
        args.json.write_text(json.dumps({"load": load, "tasks_per_s": results, "extra": extra}, indent=2))


if __name__ == "__main__":
    main()
