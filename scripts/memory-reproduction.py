#!/usr/bin/env python3
"""Evaluate a trained Memory Module run the way docs/methods/memory.md reports it, and write the
committable record.

    python scripts/memory-reproduction.py RUN_DIR results/memory-omniglot-5w1s

(the printed docs text names the record ``results/<OUT_DIR's name>``).

On the run's latest checkpoint, one network for every row:

* the standard episodes (protocol (a)), 1000 test episodes of seed 0 with the run's query count
  (15 per class), mean with 95% CI: 5-way 1-shot (the run's own ``eval.json``), 5-way 5-shot,
  20-way 1-shot, 20-way 5-shot (``metalearn eval RUN --ways 20 --shots 5`` and so on);
* the paper's lifelong protocol (protocol (b)) on episodes of 5 classes x 6 showings (the
  authors' ``--episode_width=5 --episode_length=30``) and of 20 classes x 6 showings:
  ``metalearn eval RUN --protocol lifelong --query 5 [--ways 20]``;

then ``metalearn export RUN OUT_DIR`` (``summary.json`` with every evaluation, and
``learning_curves.png``) and ``OUT_DIR/lifelong.json`` (both lifelong results, by episode width).
An evaluation already in the run folder for the checkpoint's step is reused, not redone; its
wall time in the table is the one this script recorded when it ran it, "with training" for the
run's own ``eval.json`` (the trainer's), and "—" for any other (``metalearn eval`` records none).
Prints each evaluation's wall time, then the "### Results" subsection of docs/methods/memory.md and
the README's and docs/reproductions.md's table rows, with the paper's numbers beside ours;
``--update-docs ROOT`` writes them into the checkout at ROOT.

``--episodes N`` scores fewer episodes (a quick check; the files then say so in their names).
Omniglot is read from $METALEARN_DATA (or --data-dir).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import textwrap
import time
from pathlib import Path

from metalearn.api import evaluate_run, export_results
from metalearn.evaluation_setup import evaluation_labels
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


# the wall-time cell of an evaluation whose time is not known: reused from the run folder,
# where `metalearn eval` wrote it without one
UNTIMED = "—"


def evaluate(run_dir: Path, step: int, episodes: int | None, data_dir, shape: dict, protocol: str | None):
    """The evaluation of ``shape`` (and ``protocol``): read back if the run folder holds it for
    ``step``, else computed (and written there, with its wall time ``wall_s``). Returns (result,
    wall-time cell): the seconds it took here or when this script wrote it; for a reused
    evaluation without ``wall_s``, "with training" when it is the run's own ``eval.json`` (the
    trainer's evaluation, timed with the training), else :data:`UNTIMED`."""
    run = RunDir(run_dir)
    labels = evaluation_labels(run.read_config(), None, shape, episodes, 0)
    if protocol is not None:
        labels["protocol"] = protocol
    path = run.eval_file(labels)
    if path.exists():
        saved = json.loads(path.read_text())
        if int(saved.get("step", -1)) == step:
            print(f"{path.name}: reused (step {step})", flush=True)
            return saved, wall_cell(saved.get("wall_s"), own=path == run.eval_path)
    start = time.perf_counter()
    evaluate_run(run_dir, episodes=episodes, data_dir=data_dir, progress=False, episode_shape=shape,
                 protocol=protocol)
    wall = time.perf_counter() - start
    result = {**json.loads(path.read_text()), "wall_s": round(wall, 1)}  # kept for a later reuse
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{path.name}: {wall:.0f} s wall", flush=True)
    return result, wall_cell(result["wall_s"])  # the recorded value, as a later reuse shows it


def wall_cell(wall: float | None, own: bool = False) -> str:
    """An evaluation's wall time as the Results table shows it: seconds where known; the run's own
    untimed ``eval.json`` ran at the end of training ("with training"); any other untimed one
    :data:`UNTIMED`."""
    if wall is not None:
        return f"{wall:.0f} s"
    return "with training" if own else UNTIMED


def shot_cell(value: float | None, ci95: float | None = None) -> str:
    """A lifelong accuracy (and its CI) as a table cell; "n/a" for a showing the episodes lack
    (``lifelong_accuracy`` gives None, a JSON null; an older file NaN)."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.1f}" if ci95 is None else f"{value:.2f} ± {ci95:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--episodes", type=int, default=None, help="test episodes (default: the run's, 1000)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--update-docs", type=Path, default=None, metavar="ROOT",
                        help="write the Results subsection and the table rows into the checkout at ROOT")
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
        result, took = evaluate(args.run_dir, step, args.episodes, args.data_dir, shape, None)
        rows.append((ways, shots, result, took))

    lifelong = {}
    for ways in (5, 20):
        shape = {"query": 6 - (task.test_shots or task.shots)}  # 6 showings of each class, as the authors'
        if ways != (task.test_ways or task.ways):
            shape["ways"] = ways
        result, _ = evaluate(args.run_dir, step, args.episodes, args.data_dir, shape, "lifelong")
        lifelong[f"{ways}-way"] = result

    export_results(args.run_dir, args.out_dir, data_dir=args.data_dir)
    (args.out_dir / "lifelong.json").write_text(json.dumps(lifelong, indent=2) + "\n")
    print(f"wrote {args.out_dir}/summary.json, learning_curves.png, lifelong.json")

    section, readme_row, reproductions_row = results_section(
        args.out_dir, config, step, rows, lifelong, run.read_metrics(), run.read_checkpoint("step").get("elapsed_s"))
    print(f"\n{section}\nREADME.md row:\n{readme_row}\n\ndocs/reproductions.md row:\n{reproductions_row}\n")
    if args.update_docs is not None:
        update_docs(args.update_docs, section, readme_row, reproductions_row)


def results_section(out_dir: Path, config, step: int, rows: list, lifelong: dict, records: list,
                    wall: float | None) -> str:
    """The "### Results" subsection of docs/methods/memory.md and the rows of the README's and
    docs/reproductions.md's Omniglot tables, from the evaluations."""
    task = config.task
    out = f"results/{out_dir.name}"  # where the record is committed
    trained_for = "" if wall is None else f", {wall:,.0f} s ({wall / 3600:.1f} h) of training"
    episodes, lifelong_episodes = rows[0][2]["episodes"], lifelong["5-way"]["episodes"]
    lines = ["### Results", "", *textwrap.wrap(
             f"`{out}/` (`summary.json`, `learning_curves.png`, `lifelong.json`): step {step:,} of the command "
             f"above{trained_for} on one thread of a 2-core "
             f"\"{processor()}\" (`lscpu` model name) shared with other processes. Every row tests that one network, "
             f"trained on {task.ways}-way episodes of {task.shots + task.query} showings per class; protocol (a) over "
             f"{episodes} standard episodes ({task.test_query or task.query} queries per class), protocol (b) the "
             f"accuracy on a class's $K$-th showing over {lifelong_episodes} episodes of {task.shots + task.query} showings, "
             f"each with its 95% CI:", 100), "",
             "| test | paper | metalearn, protocol (a) | metalearn, protocol (b) | evaluation wall time (a) |",
             "|---|---:|---:|---:|---:|"]
    for ways, shots, result, took in rows:
        life = lifelong[f"{ways}-way"]
        lines.append(f"| {ways}-way {shots}-shot | {PAPER[ways, shots]} | **{result['mean']:.2f} ± {result['ci95']:.2f}** "
                     f"| {shot_cell(life['k_shot'][shots], life['k_shot_ci95'][shots])} | {took} |")
    validation = [r for r in records if "val_accuracy" in r]
    if validation:
        shown = validation[1::2] if len(validation) > 8 else validation
        lines += ["", f"Validation accuracy ({config.train.val_episodes} episodes of {task.ways}-way {task.shots}-shot, "
                      f"`{out}/learning_curves.png`):", "",
                  "| step | " + " | ".join(f"{r['step']:,}" for r in shown) + " |",
                  "|---|" + "---:|" * len(shown),
                  "| accuracy (%) | " + " | ".join(f"{r['val_accuracy']:.1f}" for r in shown) + " |"]
    lines += ["", f"![learning curves](../{out}/learning_curves.png)", "",
              "Protocol (b), every showing (`lifelong.json`):", "",
              "| episodes | 0-shot | 1-shot | 2-shot | 3-shot | 4-shot | 5-shot |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, result in lifelong.items():
        cells = " | ".join(shot_cell(v) for v in result["k_shot"])
        lines.append(f"| {result['episode_width']} classes x {result['episode_length'] // result['episode_width']} "
                     f"showings | {cells} |")
    lines += ["", *textwrap.wrap(
        "(the authors' README, step 4000 of their run, one validation batch of 5 x 6: 0.044, 0.960, 1.000, 0.988, "
        "0.972, 0.992; their 0-shot is chance on the zero keys of their cleared memory, ours is 0 since empty slots "
        "are never neighbours).", 100)]
    cells = " | ".join(f"{PAPER[ways, shots]} / **{result['mean']:.2f}**" + (f" ({step / 1000:.1f}k of 100k)" if i == 0
                       else " (same network)") for i, (ways, shots, result, _) in enumerate(rows))
    anchor = "memory.md#reproduction-omniglot-vinyals-split"
    return ("\n".join(lines) + "\n", f"| [Memory Module](docs/methods/{anchor}) | {cells} |",
            f"| [Memory Module](methods/{anchor}) | {cells} |")


def update_docs(root: Path, section: str, readme_row: str, reproductions_row: str) -> None:
    """Put the Results subsection into docs/methods/memory.md (everything from its "### Results"
    to the next "## " heading) and the rows into README.md and docs/reproductions.md (the line
    that starts with "| [Memory Module]")."""
    page = root / "docs/methods/memory.md"
    text = page.read_text()
    start = text.index("### Results\n")
    end = text.index("\n## ", start) + 1
    page.write_text(text[:start] + section + "\n" + text[end:])
    for path, row in ((root / "README.md", readme_row), (root / "docs/reproductions.md", reproductions_row)):
        lines = path.read_text().split("\n")
        at = [i for i, line in enumerate(lines) if line.startswith("| [Memory Module](")]
        if len(at) != 1:
            raise SystemExit(f"{path}: expected one Memory Module row, found {len(at)}")
        lines[at[0]] = row
        path.write_text("\n".join(lines))
    print(f"updated {page}, {root / 'README.md'}, {root / 'docs/reproductions.md'}")

if __name__ == "__main__":
    main()
