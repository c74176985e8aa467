"""Meta-training throughput (tasks/s) with 1 and 2 torchrun processes on this machine.

    python benchmarks/distributed.py [--steps 30] [--procs 1 2] [--dataset omniglot] [--json PATH] \\
        [metalearn train maml options, e.g. --ways 20 --meta-batch-size 16]

Each process uses one thread (OMP_NUM_THREADS=1), so N processes use N cores. The trainer logs
every 5 steps; the figure is the median of its tasks/s log entries after the first (warm-up)
entry, so ``--steps`` must be at least 10. Options this script does not know go to ``metalearn
train maml`` (default for Omniglot: ``--ways 5 --shots 1``); when that command fails, its error
is printed on one line and the script exits with status 1. ``--json`` records the tasks/s per
process count with the torch version, the processor, the threads per process, the steps, the
options passed on and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from maml_step import cpu_description, save_json  # noqa: E402

import torch  # noqa: E402

LOG_EVERY = 5  # the trainer's --log-every here: the first entry is the warm-up


def child_error(stderr: str) -> str:
    """The line of a failed ``metalearn train`` (under torchrun) that says what went wrong: the
    command line's ``error: ...``, else the last exception line other than torchrun's own, else
    the last line."""
    lines = [re.sub(r"^\[(?:default)?(?:rank)?\d+\]:\s*", "", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if line.lower().startswith("error:"):
            return line
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head and not head.endswith("ChildFailedError"):
            return line
    return lines[-1] if lines else "(no output)"


def throughput(procs: int, steps: int, dataset: str, extra: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                   "-m", "metalearn", "train", "maml", "--dataset", dataset, "--steps", str(steps),
                   "--log-every", str(LOG_EVERY), "--val-every", "0", "--checkpoint-every", str(steps),
                   "--no-eval", "--no-progress", "--run-dir", str(run_dir), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"distributed.py: metalearn train maml {' '.join(extra)} with {procs} process(es) "
                             f"exited with status {done.returncode}: {child_error(done.stderr)}")
        metrics = run_dir / "metrics.jsonl"
        records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        rates = [r["tasks_per_s"] for r in records if "tasks_per_s" in r][1:]
        if not rates:
            raise SystemExit(f"distributed.py: the run with {procs} process(es) logged no tasks/s after its "
                             f"warm-up entry ({len(records)} log entries in {steps} steps)")
        return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30,
                        help=f"training steps per run; at least {2 * LOG_EVERY} (logged every {LOG_EVERY}, "
                             "the first entry is the warm-up)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="torchrun process counts to time")
    parser.add_argument("--dataset", default="omniglot")
    parser.add_argument("--json", type=Path, help="write the results here")
    args, extra = parser.parse_known_args()
    if args.steps < 2 * LOG_EVERY:
        parser.error(f"--steps must be at least {2 * LOG_EVERY}: the trainer logs tasks/s every {LOG_EVERY} "
                     f"steps and the first entry is the warm-up, so {args.steps} steps leave nothing to time")
    if any(p < 1 for p in args.procs):
        parser.error(f"--procs takes process counts of 1 or more, got {args.procs}")
    if not extra and args.dataset == "omniglot":
        extra = ["--ways", "5", "--shots", "1"]
    load = os.getloadavg()[0]
    results = {p: throughput(p, args.steps, args.dataset, extra) for p in args.procs}
    load_after = os.getloadavg()[0]
    base = results[args.procs[0]]
    print(f"MAML {args.dataset} {' '.join(extra)}, {args.steps} steps, one thread per process, "
          f"{os.cpu_count()} cores ({cpu_description()}), torch {torch.__version__}, "
          f"load {load:.2f} at start, {load_after:.2f} at the end")
    print("| processes | tasks/s | speed-up |\n| ---: | ---: | ---: |")
    for p, rate in results.items():
        print(f"| {p} | {rate:.1f} | {rate / base:.2f}x |")
    if args.json:
        save_json(args.json, {
            "tasks_per_s": results, "speed_up": {p: rate / base for p, rate in results.items()},
            "dataset": args.dataset, "extra": extra, "steps": args.steps, "log_every": LOG_EVERY,
            "threads_per_process": 1, "torch": torch.__version__, "cpu": cpu_description(),
            "cpus": os.cpu_count(), "load": load, "load_after": load_after,
        })


if __name__ == "__main__":
    main()
