"""Results over seeds: runs of one setting trained with several seeds, grouped and summarised.

One run's 95% interval (``eval.json``'s ``ci95``) is over its test episodes: it leaves out the
randomness of training (initial weights, the tasks drawn), so two seeds of one setting often
differ by more than it. A setting is judged by several seeds: :func:`summarize_runs` groups runs
by the options in which they differ (all but the seed and bookkeeping such as ``log_every``),
and gives each group the mean of its runs' scores, their standard deviation and a 95% interval
over the seeds (Student's t), as the field reports results over seeds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from metalearn.config import flat_options
from metalearn.errors import MetalearnError, OptionError, keyword_only_after
from metalearn.evaluation_setup import episode_seed
from metalearn.runs import RunDir

# options that do not change what a run learns and scores: never a group's
BOOKKEEPING = frozenset({"train.seed", "train.log_every", "train.checkpoint_every", "train.keep_best",
                         "train.val_every", "train.val_episodes", "train.eval_episodes", "train.memory_budget",
                         "train.task_chunk"})
# ...except for an ensemble's evaluation, whose members the validation chose
CHOOSE_CHECKPOINTS = frozenset({"train.keep_best", "train.val_every", "train.val_episodes"})

# Student's t, 0.975 quantile, for 1 to 30 degrees of freedom (a 95% interval over few seeds)
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_975(df: int) -> float:
    """Student's t 0.975 quantile for ``df`` degrees of freedom (beyond 30: 1.96 + 2.5 / df,
    within 0.0015 of the exact value, on the wide side)."""
    return T_975[df - 1] if df <= len(T_975) else 1.96 + 2.5 / df


def _short(names: list[str]) -> dict[str, str]:
    """Each option's last part (``inner_lr``) where that names it alone among ``names``."""
    last = [name.rsplit(".", 1)[-1] for name in names]
    return {name: short if last.count(short) == 1 else name for name, short in zip(names, last)}


@keyword_only_after(1)
def summarize_runs(run_dirs: list[Path | str], *, group_by: list[str] | None = None,
                   evaluation: str = "eval") -> dict[str, Any]:
    """Group trained and tested runs (``run_dirs``, a list of run folders) by setting and
    summarise each group over its seeds.

    Each run's score is its evaluation ``evaluation`` (the file stem: ``eval``, the run's own
    test; ``eval-ensemble=5`` for an ensemble's), which must score the run's current
    checkpoint. Runs are grouped by ``group_by`` (option names, ``inner_lr`` or
    ``method_config.inner_lr``), by default by every option in which they differ except the
    seed and bookkeeping (:data:`BOOKKEEPING`; for an ensemble's evaluation the options of
    validation count, :data:`CHOOSE_CHECKPOINTS`), and, for runs on image folders, by the
    folder each trained on (``data_dir``, as its checkpoint records it). Options in which the
    runs differ that ``group_by`` leaves out are warned of (their runs are pooled). A group's
    runs must have been scored alike (metric, part, episodes, evaluation seed, step), and no
    two of them may share the seed and every option but bookkeeping: mixing would average
    unlike numbers, and a run given twice (or a copy or rerun of it) would count as two seeds.

    Returns ``{"metric", "higher_is_better", "evaluation", "options" (the grouping options),
    "groups": [{"group" ({option: value}), "runs", "seeds", "scores", "n", "mean", "sd",
    "ci95" (Student's t over the runs; None for one run), "min", "max", "diverged", "step",
    "episodes"}]}``, the groups best first. A run whose score is not finite (diverged) makes
    its group's mean NaN and is counted in ``diverged``."""
    import warnings

    from metalearn.checkpoints import read_entries
    from metalearn.errors import MetalearnWarning
    from metalearn.evaluation import HIGHER_IS_BETTER
    from metalearn.files import same_path

    if isinstance(run_dirs, (str, Path)) or not run_dirs:
        raise MetalearnError("summarize_runs takes a list of run folders (the runs of every seed and setting)")
    twice = next((d for i, d in enumerate(run_dirs) if any(same_path(d, e) for e in run_dirs[:i])), None)
    if twice is not None:  # overlapping globs: one run would count as two seeds
        raise MetalearnError(f"the run {twice} is given twice; give each run once")
    runs = []
    for run_dir in run_dirs:
        run = RunDir(run_dir)
        config = run.read_config().to_dict()
        scores = run.read_evaluations()
        if evaluation not in scores:  # the evaluation as the caller would run it: evaluate_run, or metalearn eval
            raise OptionError(f"{run.path} holds no {evaluation}.json: score it first ({{score}}"
                              + ("" if evaluation == "eval" else ", with the options the name lists") + ")",
                              score=(f"evaluate_run({str(run.path)!r})", f"metalearn eval {run.path}"))
        scored = scores[evaluation]
        mean = scored.get("mean")
        if isinstance(mean, bool) or not isinstance(mean, (int, float)) or not isinstance(scored.get("metric"), str):
            raise MetalearnError(f"{run.path}/{evaluation}.json holds no single score (a metric and its mean): "
                                 "summarise evaluation files of one score each")
        state = read_entries(run, "step", optional=("data_dir",))
        step = int(state["step"])
        if scored.get("step") != step:
            raise MetalearnError(f"{run.path}/{evaluation}.json scored step {scored.get('step')}, but the run is at "
                                 f"step {step}: score it again (metalearn eval {run.path})")
        options = flat_options(config)
        if isinstance(state.get("data_dir"), str):  # an image folder's: runs on other folders are other settings
            options["data_dir"] = state["data_dir"]
        runs.append((run.path, options, scored, step))
    names = sorted({name for _, options, _, _ in runs for name in options})
    differ = [name for name in names if len({repr(options.get(name)) for _, options, _, _ in runs}) > 1]
    ignored = BOOKKEEPING - CHOOSE_CHECKPOINTS if evaluation.startswith("eval-ensemble") else BOOKKEEPING
    if group_by is None:
        grouping = [name for name in differ if name not in ignored]
    else:
        grouping = []
        for given in group_by:
            found = [name for name in names if name == given or name.rsplit(".", 1)[-1] == given]
            if not found:
                raise OptionError(f"{{group_by}} names {given!r}, which is no option of the runs' config.json (e.g. "
                                  "inner_lr, train.meta_lr)", group_by="group_by")
            if len(found) > 1:
                raise OptionError(f"{{group_by}} names {given!r}, which is ambiguous: {', '.join(found)}; give the "
                                  "full name", group_by="group_by")
            grouping.append(found[0])
        pooled = [name for name in differ if name not in ignored and name not in grouping]
        if pooled:
            warnings.warn(MetalearnWarning(
                f"the runs differ also in {', '.join(pooled)}, which the grouping leaves out: runs that differ in "
                "them are pooled in one group"))
    metric = {scored.get("metric") for _, _, scored, _ in runs}
    if len(metric) != 1:
        raise MetalearnError(f"the runs are scored by different measures ({', '.join(sorted(map(str, metric)))}): "
                             "summarise runs of one kind of task at a time")
    metric = metric.pop()
    groups: dict[tuple, list] = {}
    for path, options, scored, step in runs:
        groups.setdefault(tuple(repr(options.get(name)) for name in grouping), []).append((path, options, scored, step))
    out = []
    short = _short(grouping)
    for members in groups.values():
        for what in ("part", "episodes", "episode_seed", "ways", "shots", "query"):
            # the generator's seed as every version recorded it (older files: as "seed")
            seen = {repr(episode_seed(scored) if what == "episode_seed" else scored.get(what))
                    for _, _, scored, _ in members}
            if len(seen) > 1:
                raise MetalearnError(f"the runs of one group ({', '.join(str(p) for p, _, _, _ in members)}) were scored "
                                     f"with different {what} ({', '.join(sorted(seen))}): score them alike, or group "
                                     "them apart")
        # every option that matters the same, the seed too (bookkeeping such as log_every aside): one
        # run twice (a copy, or a rerun), not two seeds
        alike = [repr(sorted((k, v) for k, v in options.items() if k == "train.seed" or k not in ignored))
                 for _, options, _, _ in members]
        copy = next((i for i, one in enumerate(alike) if one in alike[:i]), None)
        if copy is not None:
            first = members[alike.index(alike[copy])][0]
            raise MetalearnError(f"{first} and {members[copy][0]} are runs of the same options and seed (bookkeeping "
                                 "such as log_every aside): one run twice, a copy or a rerun, would count as two "
                                 "seeds; give it once")
        steps = {step for _, _, _, step in members}
        if len(steps) > 1:
            raise MetalearnError(f"the runs of one group ({', '.join(str(p) for p, _, _, _ in members)}) are at "
                                 f"different steps ({', '.join(map(str, sorted(steps)))}): train them to the same step "
                                 "(or group them apart)")
        values = [float(scored["mean"]) for _, _, scored, _ in members]
        n = len(values)
        mean = sum(values) / n
        finite = all(math.isfinite(v) for v in values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 and finite else None
        out.append({
            "group": {short[name]: members[0][1].get(name) for name in grouping},
            "runs": [str(path) for path, _, _, _ in members],
            "seeds": [options.get("train.seed") for _, options, _, _ in members],
            "scores": values, "n": n, "mean": mean, "sd": sd,
            "ci95": t_975(n - 1) * sd / math.sqrt(n) if sd is not None else None,
            # of the finite scores (a diverged run's NaN would make either anything)
            "min": min((v for v in values if math.isfinite(v)), default=math.nan),
            "max": max((v for v in values if math.isfinite(v)), default=math.nan),
            "diverged": sum(not math.isfinite(v) for v in values),
            "step": members[0][3], "episodes": members[0][2].get("episodes"),
        })
    higher = HIGHER_IS_BETTER.get(metric, True)
    out.sort(key=lambda g: (not math.isfinite(g["mean"]), -g["mean"] if higher else g["mean"]))
    return {"metric": metric, "higher_is_better": higher, "evaluation": evaluation,
            "options": [short[name] for name in grouping], "groups": out}


def format_summary(summary: dict[str, Any]) -> str:
    """:func:`summarize_runs` as a Markdown table, the best group first."""
    options = summary["options"]
    metric = summary["metric"] + (" (%)" if summary["metric"] == "accuracy" else "")
    lines = [f"{metric} of {summary['evaluation']}.json over seeds: mean +/- 95% CI (Student's t over the runs), "
             f"SD, min-max; {'higher' if summary['higher_is_better'] else 'lower'} is better",
             "| " + " | ".join([*options, "runs", "seeds", "mean +/- CI", "SD", "min-max", "step", "episodes"]) + " |",
             "| " + " | ".join(["---"] * len(options) + ["---:"] * 7) + " |"]
    for group in summary["groups"]:
        ci = f" +/- {group['ci95']:#.2g}" if group["ci95"] is not None else ""  # an uncertainty: two figures
        sd = f"{group['sd']:#.2g}" if group["sd"] is not None else "-"
        diverged = f" ({group['diverged']} diverged)" if group["diverged"] else ""
        cells = [str(group["group"][name]) for name in options] + [
            str(group["n"]), ",".join(map(str, group["seeds"])), f"{group['mean']:.4g}{ci}{diverged}", sd,
            f"{group['min']:.4g}-{group['max']:.4g}", str(group["step"]), str(group["episodes"])]
        lines.append("| " + " | ".join(cells) + " |")
    if not options and summary["groups"] and summary["groups"][0]["n"] > 1:
        lines.append("(the runs differ in their seeds only: one setting)")
    return "\n".join(lines)
