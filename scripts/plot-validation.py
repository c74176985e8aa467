"""Validation accuracy of several runs on one chart, against meta-steps and against time.

    python scripts/plot-validation.py OUT.png SOURCE[=LABEL] [SOURCE[=LABEL] ...] \
        [--step-seconds LABEL=SECONDS ...]

A SOURCE is a run folder (its metrics.jsonl) or a summary.json that `metalearn export` wrote.
The time axis is each run's training wall time as it logged it (``elapsed_s``; a summary
without it: the run's mean rate, drawn dashed). ``--step-seconds LABEL=S`` puts that run on a
compute-time axis instead: meta-steps x S seconds, S measured once on an idle machine (e.g. by
benchmarks/maml_step.py), which compares runs that trained under different loads. A run whose
step changes cost on a schedule takes one rate per phase, each after the step it starts at:
``--step-seconds "MAML++=0.635,0.387@5000,0.812@25000"`` (MAML++'s preset: the multi-step loss
until step 5,000, first order until 25,000).
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
from metalearn.runs import RunDir  # noqa: E402


def curve(source: Path) -> tuple[list[int], list[float], list[float], bool]:
    """(steps, val accuracy %, elapsed seconds, elapsed exact?) of a run folder or summary.json;
    ValueError, with what is wrong, for a source that is neither."""
    if source.is_dir():
        metrics = RunDir(source).metrics_path
        if not metrics.is_file():
            raise ValueError(f"{source}: a folder without metrics.jsonl, not a run folder")
        try:
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{metrics}: not JSON lines ({err})") from None
        trained_for = {r["step"]: r["elapsed_s"] for r in records if "loss" in r and "elapsed_s" in r}
        vals = [r for r in records if "val_accuracy" in r and "step" in r]
        elapsed = [r.get("elapsed_s", trained_for.get(r["step"], float("nan"))) for r in vals]
        return [r["step"] for r in vals], [r["val_accuracy"] for r in vals], elapsed, True
    if not source.is_file():
        raise ValueError(f"{source}: no such run folder or summary file")
    try:
        summary = json.loads(source.read_text())
        vals = summary["validation"]
        steps, accuracy = [r["step"] for r in vals], [r["val_accuracy"] for r in vals]
        if all("elapsed_s" in r for r in vals):
            return steps, accuracy, [r["elapsed_s"] for r in vals], True
        rate = summary["training_wall_time_s"] / summary["step"]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{source}: not a summary.json of `metalearn export` ({err})") from None
    except (KeyError, TypeError, ZeroDivisionError) as err:
        raise ValueError(f"{source}: not a summary.json of `metalearn export` (no usable {err})") from None
    return steps, accuracy, [step * rate for step in steps], False


def parse_rates(text: str) -> list[tuple[int, float]]:
    """``S0[,S1@FROM1,...]`` -> [(0, S0), (FROM1, S1), ...], phases in order of their first step;
    ValueError, with what is wrong, for anything else."""
    phases = []
    for i, part in enumerate(text.split(",")):
        seconds, at, start = part.partition("@")
        if (i == 0) != (not at):
            raise ValueError(f"{text!r}: the first rate has no @STEP, every later one has one")
        try:
            rate, first = float(seconds), int(start) if at else 0
        except ValueError:
            raise ValueError(f"{text!r}: {part!r} is not SECONDS or SECONDS@STEP") from None
        if not rate > 0 or rate == float("inf"):
            raise ValueError(f"{text!r}: seconds a step must be a positive number, got {seconds!r}")
        if at and first < 1:
            raise ValueError(f"{text!r}: a phase starts at a step of 1 or more, got {start!r}")
        phases.append((first, rate))
    if [start for start, _ in phases] != sorted({start for start, _ in phases}):
        raise ValueError(f"{text!r}: the phases' first steps must increase")
    return phases


def compute_seconds(step: int, phases: list[tuple[int, float]]) -> float:
    """The time of meta-steps 1..``step`` at the phases' rates."""
    total = 0.0
    for i, (start, seconds) in enumerate(phases):
        end = phases[i + 1][0] if i + 1 < len(phases) else step
        total += max(0, min(step, end) - start) * seconds
    return total


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("sources", nargs="+")
    parser.add_argument("--step-seconds", action="append", default=[], metavar="LABEL=S")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    step_seconds = {}
    for item in args.step_seconds:
        label, equals, rates = item.partition("=")
        if not equals or not label:
            parser.error(f"--step-seconds {item!r}: give LABEL=SECONDS (or LABEL=S0,S1@STEP,...)")
        try:
            step_seconds[label] = parse_rates(rates)
        except ValueError as err:
            parser.error(f"--step-seconds {label}={err}")
    runs = []
    for item in args.sources:
        path, _, label = item.partition("=")
        label = label or Path(path).name
        try:
            runs.append((label, *curve(Path(path))))
        except ValueError as err:
            parser.error(str(err))
    unknown = sorted(set(step_seconds) - {label for label, *_ in runs})
    if unknown:
        parser.error(f"--step-seconds names {', '.join(unknown)}, which no SOURCE is labelled "
                     f"(labels: {', '.join(label for label, *_ in runs)})")
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, steps, accuracy, elapsed, exact in runs:
        if not steps:
            print(f"{label}: no validation entries to draw", file=sys.stderr)
        by_step.plot(steps, accuracy, marker=".", label=label)
        if label in step_seconds:
            phases = step_seconds[label]
            hours = [compute_seconds(s, phases) / 3600 for s in steps]
            how = " then ".join(f"{seconds:g}" + (f" from {start}" if start else "") for start, seconds in phases)
            how += " s/step"
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
