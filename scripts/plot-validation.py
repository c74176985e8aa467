"""Validation accuracy of several runs on one chart, against meta-steps and against time.

    python scripts/plot-validation.py OUT.png SOURCE[=LABEL] [SOURCE[=LABEL] ...] \
        [--step-seconds LABEL=SECONDS ...]

A SOURCE is a run folder (its metrics.jsonl) or a summary.json that `metalearn export` wrote.
The time axis is each run's training wall time as it logged it (``elapsed_s``; a summary
without it: the run's mean rate, drawn dashed). ``--step-seconds LABEL=S`` puts that run on a
compute-time axis instead: meta-steps x S seconds, S measured once on an idle machine (e.g. by
benchmarks/maml_step.py), which compares runs that trained under different loads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from metalearn.plotting import save_figure  # noqa: E402


def curve(source: Path) -> tuple[list[int], list[float], list[float], bool]:
    """(steps, val accuracy %, elapsed seconds, elapsed exact?) of a run folder or summary.json."""
    if source.is_dir():
        records = [json.loads(line) for line in (source / "metrics.jsonl").read_text().splitlines() if line.strip()]
        trained_for = {r["step"]: r["elapsed_s"] for r in records if "loss" in r and "elapsed_s" in r}
        vals = [r for r in records if "val_accuracy" in r]
        elapsed = [r.get("elapsed_s", trained_for.get(r["step"], float("nan"))) for r in vals]
        return [r["step"] for r in vals], [r["val_accuracy"] for r in vals], elapsed, True
    summary = json.loads(source.read_text())
    vals = summary["validation"]
    if all("elapsed_s" in r for r in vals):
        return [r["step"] for r in vals], [r["val_accuracy"] for r in vals], [r["elapsed_s"] for r in vals], True
    rate = summary["training_wall_time_s"] / summary["step"]
    return ([r["step"] for r in vals], [r["val_accuracy"] for r in vals], [r["step"] * rate for r in vals], False)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--step-seconds", action="append", default=[], metavar="LABEL=S")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    step_seconds = dict((k, float(v)) for k, v in (item.split("=", 1) for item in args.step_seconds))
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for item in args.sources:
        path, _, label = item.partition("=")
        label = label or Path(path).name
        steps, accuracy, elapsed, exact = curve(Path(path))
        by_step.plot(steps, accuracy, marker=".", label=label)
        if label in step_seconds:
            hours, how = [s * step_seconds[label] / 3600 for s in steps], f"{step_seconds[label]:g} s/step"
        else:
            hours, how = [e / 3600 for e in elapsed], "as logged" if exact else "mean rate"
        by_time.plot(hours, accuracy, marker=".", linestyle="-" if exact or label in step_seconds else "--",
                     label=f"{label} ({how})")
    by_step.set_xlabel("meta-step")
    by_time.set_xlabel("compute time (h)" if step_seconds else "training wall time (h)")
    for ax in (by_step, by_time):
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(args.title)
    print(save_figure(fig, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
