#!/usr/bin/env python3
"""Evaluate a trained Memory Module run the way docs/methods/memory.md reports it, and write the
committable record.

    python scripts/memory-reproduction.py RUN_DIR results/memory-omniglot-5w1s

On the run's latest checkpoint, one network for every row:

* the standard episodes (protocol (a)), 1000 test episodes of seed 0 with the run's query count
  (15 per class), mean with 95% CI: 5-way 1-shot (the run's own ``eval.json``), 5-way 5-shot,
  20-way 1-shot, 20-way 5-shot (``metalearn eval RUN --ways 20 --shots 5`` and so on);
* the paper's lifelong protocol (protocol (b)) on episodes of 5 classes x 6 showings (the
  authors' ``--episode_width=5 --episode_length=30``) and of 20 classes x 6 showings:
  ``metalearn eval RUN --protocol lifelong --query 5 [--ways 20]``;

then ``metalearn export RUN OUT_DIR`` (``summary.json`` with every evaluation, and
``learning_curves.png``) and ``OUT_DIR/lifelong.json`` (both lifelong results, by episode width).
An evaluation already in the run folder for the checkpoint's step is reused, not redone.
Prints each evaluation's wall time, the processor, and the table rows with the paper's numbers.

``--episodes N`` scores fewer episodes (a quick check; the files then say so in their names).
Omniglot is read from $METALEARN_DATA (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

from metalearn.api import evaluate_run, evaluation_labels, export_results
from metalearn.runs import RunDir

# the paper's Omniglot table (ConvNet with Memory Module), test accuracy in %
PAPER = {(5, 1): 98.4, (5, 5): 99.6, (20, 1): 95.0, (20, 5): 98.6}


def processor() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def evaluate(run_dir: Path, step: int, episodes: int | None, data_dir, shape: dict, protocol: str | None):
    """The evaluation of ``shape`` (and ``protocol``): read back if the run folder holds it for
    ``step``, else computed (and written there). Returns (result, wall seconds or None)."""
    run = RunDir(run_dir)
    labels = evaluation_labels(run.read_config(), None, shape, episodes, 0)
    if protocol is not None:
        labels["protocol"] = protocol
    path = run.eval_file(labels)
    if path.exists():
        saved = json.loads(path.read_text())
        if int(saved.get("step", -1)) == step:
            print(f"{path.name}: reused (step {step})", flush=True)
            return saved, None
    start = time.perf_counter()
    result = evaluate_run(run_dir, episodes=episodes, data_dir=data_dir, progress=False, episode_shape=shape,
                          protocol=protocol)
    wall = time.perf_counter() - start
    print(f"{path.name}: {wall:.0f} s wall", flush=True)
    return result, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=None, help="test episodes (default: the run's, 1000)")
    parser.add_argument("--data-dir", type=Path, default=None)
    args = parser.parse_args()

    run = RunDir(args.run_dir)
    config = run.read_config()
    step = int(run.read_checkpoint("step")["step"])
    task = config.task
    trained = f"{task.ways}-way {task.shots}-shot"
    print(f"run {args.run_dir}: step {step} of {config.train.steps}, trained on {trained} episodes; "
          f"processor: {processor()}", flush=True)

    rows = []
    for ways, shots in PAPER:
        shape = {}
        if ways != (task.test_ways or task.ways):
            shape["ways"] = ways
        if shots != (task.test_shots or task.shots):
            shape["shots"] = shots
        result, wall = evaluate(args.run_dir, step, args.episodes, args.data_dir, shape, None)
        rows.append((ways, shots, result, wall))

    lifelong = {}
    for ways in (5, 20):
        shape = {"query": 6 - (task.test_shots or task.shots)}  # 6 showings of each class, as the authors'
        if ways != (task.test_ways or task.ways):
            shape["ways"] = ways
        result, wall = evaluate(args.run_dir, step, args.episodes, args.data_dir, shape, "lifelong")
        if wall is not None:
            result = {**result, "wall_s": round(wall, 1)}
        lifelong[f"{ways}-way"] = result

    export_results(args.run_dir, args.out_dir, data_dir=args.data_dir)
    (args.out_dir / "lifelong.json").write_text(json.dumps(lifelong, indent=2) + "\n")
    print(f"wrote {args.out_dir}/summary.json, learning_curves.png, lifelong.json")

    print(f"\nstandard episodes (network trained on {trained} episodes, step {step}):")
    print("| test episodes | paper | metalearn | wall time of the evaluation |")
    print("|---|---:|---:|---:|")
    for ways, shots, result, wall in rows:
        took = "reused" if wall is None else f"{wall:.0f} s"
        print(f"| {ways}-way {shots}-shot, {result['episodes']} episodes | {PAPER[ways, shots]} | "
              f"**{result['mean']:.2f} ± {result['ci95']:.2f}** | {took} |")
    print("\nlifelong protocol, accuracy (%) on a class's k-th showing, k = 0..5:")
    for name, result in lifelong.items():
        cells = " | ".join("n/a" if math.isnan(v) else f"{v:.1f} ± {ci:.1f}"
                           for v, ci in zip(result["k_shot"], result["k_shot_ci95"]))
        print(f"| {name} ({result['episode_width']} x {result['episode_length'] // result['episode_width']}, "
              f"{result['episodes']} episodes) | {cells} |")
    wall = run.read_checkpoint("step").get("elapsed_s")
    if wall is not None:
        print(f"\ntraining wall time: {wall:.0f} s ({wall / 3600:.2f} h) for {step} steps")


if __name__ == "__main__":
    main()
