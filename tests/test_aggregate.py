"""metalearn.aggregate: runs grouped by setting and summarised over their seeds."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from cli_runner import run
from metalearn.aggregate import summarize_runs, t_975
from metalearn.cli import main
from metalearn.errors import MetalearnError

TINY = ["--dataset", "sinusoid", "--steps", 3, "--meta-batch-size", 2, "--val-every", 0, "--eval-episodes", 6,
        "--no-progress"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two inner learning rates x three seeds (and one run of a third rate), each trained and tested."""
    root = tmp_path_factory.mktemp("sweep")
    runs = {}
    for lr, seeds in ((0.01, (0, 1, 2)), (0.003, (0, 1, 2)), (0.1, (5,))):
        for seed in seeds:
            path = root / f"lr{lr}-s{seed}"
            main([str(a) for a in ["train", "maml", *TINY, "--inner-lr", lr, "--seed", seed, "--run-dir", path]])
            runs[(lr, seed)] = path
    return runs


def test_runs_are_grouped_by_what_differs_but_the_seed_and_summarised_over_seeds(sweep):
    """Groups by inner_lr alone; each group's mean, SD (n-1) and Student's t interval over its
    runs' eval.json means, checked against an independent computation; lowest MSE first; a
    group of one run has no SD or interval."""
    summary = summarize_runs(list(sweep.values()))
    assert summary["metric"] == "mse" and summary["options"] == ["inner_lr"] and not summary["higher_is_better"]
    by_lr = {group["group"]["inner_lr"]: group for group in summary["groups"]}
    assert set(by_lr) == {0.01, 0.003, 0.1}
    for lr in (0.01, 0.003):
        scores = [json.loads((sweep[(lr, seed)] / "eval.json").read_text())["mean"] for seed in (0, 1, 2)]
        group = by_lr[lr]
        assert group["seeds"] == [0, 1, 2] and group["scores"] == scores and group["n"] == 3
        assert group["mean"] == pytest.approx(statistics.mean(scores))
        assert group["sd"] == pytest.approx(statistics.stdev(scores))
        assert group["ci95"] == pytest.approx(4.303 * statistics.stdev(scores) / math.sqrt(3))
        assert (group["min"], group["max"], group["step"], group["episodes"]) == (min(scores), max(scores), 3, 6)
    assert by_lr[0.1]["n"] == 1 and by_lr[0.1]["sd"] is None and by_lr[0.1]["ci95"] is None
    means = [group["mean"] for group in summary["groups"]]
    assert means == sorted(means)  # lower is better for an MSE


def test_the_t_quantile_and_its_approximation_past_the_table():
    assert t_975(1) == 12.706 and t_975(30) == 2.042
    for df, exact in ((40, 2.021), (60, 2.000), (120, 1.980)):  # tables of Student's t
        assert abs(t_975(df) - exact) < 0.002


def test_the_command_prints_the_table_and_json_and_refuses_what_would_mix_unlike_numbers(sweep, tmp_path, capsys):
    runs = [sweep[(0.01, seed)] for seed in (0, 1, 2)] + [sweep[(0.003, seed)] for seed in (0, 1, 2)]
    code, out, err = run(["summarize", *runs], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[1] == "| inner_lr | runs | seeds | mean +/- CI | SD | min-max | step | episodes |"
    assert lines[3].startswith("| 0.003 | 3 | 0,1,2 | ") and lines[4].startswith("| 0.01 | 3 | 0,1,2 | ")
    code, out, err = run(["summarize", *runs, "--json", "-"], capsys)
    assert code == 0 and json.loads(out) == json.loads(json.dumps(summarize_runs(runs))), err
    before = (runs[0] / "eval.json").read_bytes()
    code, _, err = run(["summarize", *runs, "--json", runs[0] / "eval.json"], capsys)
    assert code == 2 and "would replace eval.json, an evaluation of the run" in err, err
    assert (runs[0] / "eval.json").read_bytes() == before
    code, _, err = run(["summarize", *runs, "--group-by", "no_such_option"], capsys)
    assert code == 2 and err == ("error: --group-by names 'no_such_option', which is no option of the runs' config.json "
                                 "(e.g. inner_lr, train.meta_lr)\n")
    # a run scored on other episodes than the rest of its group: refused, not averaged
    code, _, err = run(["eval", runs[0], "--episodes", 4, "--no-progress"], capsys)
    (runs[0] / "eval.json").write_text((runs[0] / "eval-episodes=4.json").read_text())
    code, _, err = run(["summarize", *runs[:3]], capsys)
    assert code == 2 and "were scored with different episodes (4, 6): score them alike" in err, err
    # a run trained on since its test: its eval.json scores an old step
    untested = tmp_path / "untested"
    assert run(["train", "maml", *TINY, "--no-eval", "--run-dir", untested], capsys)[0] == 0
    with pytest.raises(MetalearnError, match=f"^{untested} holds no eval.json: score it first"):
        summarize_runs([untested])
    with pytest.raises(MetalearnError, match="takes a list of run folders"):
        summarize_runs(str(untested))


@pytest.mark.parametrize("given", ["", " ", ",,"])
def test_a_group_by_naming_no_option_is_refused_not_read_as_no_grouping(given, tmp_path, capsys):
    code, out, err = run(["summarize", tmp_path, "--group-by", given], capsys)
    assert (code, out, err) == (2, "", f"error: --group-by {given!r} names no option; give the options that make a "
                                       "setting (e.g. inner_lr,train.meta_lr), or leave it out to group by every "
                                       "option the runs differ in\n")


def test_an_evaluation_file_of_an_older_version_groups_with_the_new_ones(sweep, tmp_path):
    """Evaluation files written before episode_seed existed record the generator's seed as
    "seed": such a run groups with runs scored on the same episodes by the current version."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(sweep[(0.01, 1)], old)  # (seed 0's eval.json is rescored by another test)
    scored = json.loads((old / "eval.json").read_text())
    scored["seed"] = scored.pop("episode_seed")  # the older format
    (old / "eval.json").write_text(json.dumps(scored))
    summary = summarize_runs([old, sweep[(0.01, 2)]])
    assert [group["n"] for group in summary["groups"]] == [2]
    scored["seed"] += 1  # other episodes: refused as before
    (old / "eval.json").write_text(json.dumps(scored))
    with pytest.raises(MetalearnError, match="scored with different episode_seed"):
        summarize_runs([old, sweep[(0.01, 2)]])


def test_a_run_counts_once_and_what_the_grouping_leaves_out_is_said(sweep, tmp_path):
    """A run given twice (overlapping globs) or a copy of one would count as two seeds: refused.
    --group-by that leaves out an option the runs differ in pools them, with a warning; an
    evaluation file without one score is refused in one line; a group of one run says no
    interval."""
    import shutil
    import warnings as warnings_module

    from metalearn.errors import MetalearnWarning

    one = sweep[(0.01, 1)]
    with pytest.raises(MetalearnError, match=f"^the run {one}/ is given twice; give each run once$"):
        summarize_runs([one, sweep[(0.01, 2)], f"{one}/"])
    copy = shutil.copytree(one, tmp_path / "copy")
    with pytest.raises(MetalearnError, match=f"^{one} and {copy} are runs of the same options and seed"):
        summarize_runs([one, copy])
    config = json.loads((copy / "config.json").read_text())  # a rerun that logged otherwise: still one seed
    config["train"]["log_every"] = 7
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(MetalearnError, match=r"same options and seed \(bookkeeping such as log_every aside\)"):
        summarize_runs([one, copy])
    with pytest.warns(MetalearnWarning, match=r"^the runs differ also in method_config.inner_lr, which the grouping "
                                              r"leaves out: runs that differ in them are pooled in one group$"):
        pooled = summarize_runs([sweep[(0.01, 0)], sweep[(0.003, 1)]], group_by=["seed"])
    assert [group["group"] for group in pooled["groups"]] in ([{"seed": 0}, {"seed": 1}], [{"seed": 1}, {"seed": 0}])
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("error")
        summarize_runs([sweep[(0.01, 0)], sweep[(0.003, 1)]], group_by=["inner_lr", "seed"])
    (copy / "eval-protocol=lifelong.json").write_text(json.dumps({"k_shot_accuracy": [90.0], "step": 3}))
    with pytest.raises(MetalearnError, match=r"eval-protocol=lifelong.json holds no single score \(a metric and its "
                                             r"mean\)"):
        summarize_runs([copy], evaluation="eval-protocol=lifelong")
