"""The command line: real runs end to end, and bad input as one clear line with exit code 2."""

from __future__ import annotations

import json
import re
import shutil
import signal
import statistics
from pathlib import Path

import pytest
import torch

from cli_runner import ClosedPipe, FullDisk, run
from metalearn.errors import MetalearnError
from metalearn.runs import RunDir





def test_train_eval_plot_sinusoid(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 6, "--meta-batch-size", 4,
                          "--eval-episodes", 10, "--log-every", 2, "--val-every", 3, "--val-episodes", 4, "--run-dir", run_dir,
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "MSE" in out and (run_dir / "checkpoint.pt").is_file() and (run_dir / "eval.json").is_file()
    code, out, _ = run(["eval", run_dir, "--episodes", 12, "--no-progress"], capsys)
    assert code == 0 and "12 tasks" in out and "eval-episodes=12.json" in out
    # a check with other episodes gets its own file: the run's own evaluation stays
    assert json.loads((run_dir / "eval.json").read_text())["episodes"] == 10
    assert json.loads((run_dir / "eval-episodes=12.json").read_text())["episodes"] == 12
    code, out, _ = run(["eval", run_dir, "--episodes", 10, "--seed", 3, "--no-progress"], capsys)
    assert code == 0 and (run_dir / "eval-seed=3.json").is_file()
    code, _, err = run(["plot", run_dir, "--data-dir", tmp_path], capsys)  # generated tasks: refused before a figure
    assert code == 2 and "sinusoid tasks are generated" in err and not (run_dir / "plots").exists()
    code, out, _ = run(["plot", run_dir], capsys)
    assert code == 0
    assert (run_dir / "plots" / "learning_curves.png").stat().st_size > 1000
    assert (run_dir / "plots" / "fits.png").stat().st_size > 1000
    code, out, _ = run(["export", run_dir, tmp_path / "results"], capsys)
    assert code == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert summary["step"] == 6 and summary["training_wall_time_s"] > 0
    assert summary["machines"] == RunDir(run_dir).read_checkpoint()["machines"]
    assert [m["from_step"] for m in summary["machines"]] == [0] and summary["machines"][0]["processor"]
    assert summary["evaluations"]["eval"]["episodes"] == 10 and "scores" not in summary["evaluations"]["eval"]
    assert summary["evaluations"]["eval-episodes=12"]["episodes"] == 12
    records = RunDir(run_dir).read_metrics()
    logged = [r for r in records if "loss" in r]
    assert summary["config"] == RunDir(run_dir).read_config().to_dict() and summary["config"]["train"]["steps"] == 6
    assert summary["last_train_metrics"] == logged[-1] and logged[-1]["step"] == 6
    assert [r["step"] for r in summary["validation"]] == [3, 6]
    assert summary["validation"] == [r for r in records if "val_mse" in r]
    curve = summary["training_curve"]
    assert curve["window"] == 1 and [p["last_step"] for p in curve["points"]] == [r["step"] for r in logged] == [2, 4, 6]
    assert [p["loss"] for p in curve["points"]] == pytest.approx([r["loss"] for r in logged], rel=1e-5)
    assert (tmp_path / "results" / "fits.png").is_file()


def test_plot_draws_the_true_functions_and_the_predictions_after_0_1_and_10_steps(tmp_path, capsys, monkeypatch):
    """What ``plot`` draws in fits.png, read from the figure rather than the PNG: per test task
    the predictions after 0, 1 and 10 steps of the trained learner on a 200-point grid, the
    true sinusoid there (computed here from the task's amplitude and phase) and the K points."""
    import matplotlib.figure
    import numpy as np

    from metalearn.runs import RunDir
    from metalearn.tasks import SinusoidTasks, TaskBatch
    from metalearn.checkpoints import load_trained
    from metalearn.training import TEST_SEED_OFFSET

    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--no-eval",
                "--no-progress", "--run-dir", run_dir], capsys)[0] == 0
    saved, rendered = {}, []

    def recording_savefig(figure, target, *args, **kwargs):  # keeps the figure, skips the rendering
        rendered.append(figure)

    def recording_write(path, data):  # save_figure renders in memory, then writes the file whole
        saved[Path(path).name] = rendered[-1]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    monkeypatch.setattr("metalearn.plotting.atomic_write_bytes", recording_write)
    assert run(["plot", run_dir], capsys)[0] == 0
    axes = saved["fits.png"].axes

    # the plot's tasks: the first 4 test episodes, of the test shape (their support points are
    # drawn after the amplitudes and phases, from an x of shots + query points per task)
    test_shape = RunDir(run_dir).read_config().task.for_testing()
    assert (test_shape.shots, test_shape.query) == (5, 100)
    batch = SinusoidTasks(shots=5, query=100).sample(4, torch.Generator().manual_seed(TEST_SEED_OFFSET))
    x = np.linspace(-5.0, 5.0, 200)
    amplitude, phase = batch.task_params["amplitude"].numpy(), batch.task_params["phase"].numpy()
    grid = torch.linspace(-5.0, 5.0, 200).view(1, -1, 1).expand(4, -1, -1)
    on_grid = TaskBatch(batch.support_x, batch.support_y, grid,
                        torch.as_tensor(amplitude[:, None, None] * np.sin(x[None, :, None] - phase[:, None, None])),
                        0, batch.task_params)
    _, learner, _ = load_trained(run_dir)
    predictions = learner.predict_per_step(on_grid)  # (11, 4, 200, 1): the sinusoid default is 10 test steps
    assert predictions.shape[0] == 11
    assert len(axes) == 4
    for t, ax in enumerate(axes):
        *fits, truth = ax.get_lines()
        assert [line.get_label() for line in fits] == ["after 0 steps", "after 1 step", "after 10 steps"]
        for step, line in zip((0, 1, 10), fits):
            np.testing.assert_allclose(line.get_xdata(), x, rtol=0, atol=1e-6)
            np.testing.assert_allclose(line.get_ydata(), predictions[step, t, :, 0].numpy(), rtol=1e-5, atol=1e-6)
        assert truth.get_label() == "ground truth"
        np.testing.assert_allclose(truth.get_xdata(), x, rtol=0, atol=1e-6)
        np.testing.assert_allclose(truth.get_ydata(), amplitude[t] * np.sin(x - phase[t]), rtol=1e-5, atol=1e-5)
        support = np.column_stack([batch.support_x[t, :, 0].numpy(), batch.support_y[t, :, 0].numpy()])
        np.testing.assert_allclose(ax.collections[0].get_offsets(), support, rtol=1e-6)
    # the three steps draw three different curves (the learner adapts)
    assert not np.allclose(axes[0].get_lines()[0].get_ydata(), axes[0].get_lines()[2].get_ydata(), atol=1e-3)


def test_plot_out_dir_takes_the_figures_and_until_step_ends_the_curves(tmp_path, capsys, monkeypatch):
    import metalearn.plotting

    run_dir, out = tmp_path / "run", tmp_path / "figures"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 4, "--meta-batch-size", 2, "--log-every", 1,
                "--val-every", 0, "--no-eval", "--no-progress", "--run-dir", run_dir], capsys)[0] == 0
    drawn, draw = [], metalearn.plotting.plot_learning_curves

    def recording(records, *args, **kwargs):  # the records the curves are drawn from, then drawn
        drawn.append([record["step"] for record in records])
        return draw(records, *args, **kwargs)

    monkeypatch.setattr(metalearn.plotting, "plot_learning_curves", recording)
    code, printed, err = run(["plot", run_dir, "--out-dir", out, "--until-step", 2], capsys)
    assert code == 0, err
    assert f"wrote {out / 'learning_curves.png'}" in printed and (out / "learning_curves.png").stat().st_size > 1000
    assert (out / "fits.png").is_file() and not (run_dir / "plots").exists()
    assert drawn == [[1, 2]]
    assert run(["plot", run_dir, "--out-dir", out], capsys)[0] == 0 and drawn[-1] == [1, 2, 3, 4]
    code, _, err = run(["plot", run_dir, "--until-step", -1], capsys)
    assert code == 2 and "Invalid value for '--until-step'" in err and len(drawn) == 2, err
    # a step before the first one logged: the run has curves, the option cuts them all off
    code, _, err = run(["plot", run_dir, "--until-step", 0], capsys)
    assert code == 2 and err.count("\n") == 1 and len(drawn) == 2, err
    assert f"--until-step 0 is before the first step {run_dir} logged (1): nothing to draw; give a step from 1 on, " \
           "or leave --until-step out" in err and "no metrics" not in err, err
    from metalearn.api import plot_run
    from metalearn.errors import OptionError

    with pytest.raises(OptionError, match=r"^until_step=0 is before the first step .* logged \(1\): .*leave "
                                          r"until_step out$"):
        plot_run(run_dir, until_step=0)


def test_plot_refuses_an_out_dir_where_export_refuses_its_out_dir(tmp_path, capsys):
    """The image folder a run trained on (its checkpoint records it: no --data-dir needed),
    another run's folder, the run folder itself and its best/ are refused in one line naming
    --out-dir, before anything is drawn; a folder of one's own inside the run folder is taken."""
    from images import colours
    from metalearn.api import plot_run

    data = colours(tmp_path / "photos", 6, 2)
    run_dir = tmp_path / "run"
    assert run(["train", "protonet", "--dataset", "folder", "--data-dir", data, "--ways", 2, "--shots", 1,
                "--image-size", 16, "--steps", 1, "--log-every", 1, "--val-every", 0, "--split-fractions",
                "0.5,0,0.5", "--no-eval", "--run-dir", run_dir, "--no-progress"], capsys)[0] == 0
    other = shutil.copytree(run_dir, tmp_path / "other")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    images = data.resolve()
    inside_images = (f"lies inside {images}, the image folder the run trained on (its checkpoint records it): its "
                     f"files would be read as images of the dataset; give a folder outside {images}")
    refusals = [(data / "figs", inside_images), (data / "class 0", inside_images),
                (other, f"is the folder of another run, {other}: the figures would lie among that run's files; give "
                        "another folder (e.g. results/run)"),
                (other / "figs", f"lies inside the folder of another run, {other}: the figures would lie among that "
                                 "run's files; give another folder (e.g. results/run)"),
                (run_dir, f"is the run folder {run_dir}: the figures would lie among the run's own files; give "
                          f"another folder (e.g. results/run, or {run_dir / 'plots'})"),
                (run_dir / "best" / "x", f"lies inside the best checkpoints' folder of {run_dir}: the figures would "
                                         "lie among the run's own files; give another folder (e.g. results/run, or "
                                         f"{run_dir / 'plots'})")]
    for out, why in refusals:
        code, _, err = run(["plot", run_dir, "--out-dir", out], capsys)
        assert code == 2 and err == f"error: --out-dir {out} {why}\n", err
    code, _, err = run(["plot", run_dir, "--out-dir", data / "figs", "--data-dir", data], capsys)
    assert code == 2 and err == (f"error: --out-dir {data / 'figs'} lies inside --data-dir {data}: its files would be "
                                 f"read as images of the dataset; give a folder outside {data}\n"), err
    with pytest.raises(MetalearnError) as refused:  # from Python, the keyword
        plot_run(run_dir, out_dir=other / "figs")
    assert str(refused.value).startswith(f"out_dir {other / 'figs'} lies inside the folder of another run, {other}: ")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing written, nothing made
    assert sorted(p.name for p in tmp_path.rglob("figs")) == []
    code, _, err = run(["plot", run_dir, "--out-dir", run_dir / "figs"], capsys)  # a folder of one's own in the run's
    assert code == 0 and (run_dir / "figs" / "learning_curves.png").is_file(), err


def test_resume_from_the_command_line_takes_the_saved_configuration(tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["train", "maml", "--dataset", "sinusoid", "--meta-batch-size", 4, "--run-dir", run_dir,
            "--no-progress", "--no-eval"]
    assert run(args + ["--steps", 3], capsys)[0] == 0
    code, out, _ = run(["train", "maml", "--run-dir", run_dir, "--resume", "--steps", 5, "--no-progress",
                        "--no-eval"], capsys)
    assert code == 0 and "resuming at step 3" in out
    # a complete run resumed trains nothing and leaves its checkpoint as it is
    saved = (run_dir / "checkpoint.pt").stat()
    code, out, _ = run(["train", "maml", "--run-dir", run_dir, "--resume", "--no-progress", "--no-eval"], capsys)
    assert code == 0 and "complete already (step 5 of 5), nothing to train" in out
    after = (run_dir / "checkpoint.pt").stat()
    assert (after.st_ino, after.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)  # not written again
    code, _, err = run(["train", "maml", "--run-dir", run_dir, "--resume", "--inner-lr", 0.5, "--no-progress"], capsys)
    assert code == 2 and "(--inner-lr: " in err and "--init-from RUN keeps its weights" in err, err
    assert "Traceback" not in err
    # another dataset makes the saved options invalid (ways 0): the message names the dataset
    code, _, err = run(["train", "maml", "--run-dir", run_dir, "--resume", "--dataset", "omniglot"], capsys)
    assert code == 2 and "--dataset: 'sinusoid' there, 'omniglot' requested" in err
    # options a resumed run would store and never use meet the checks of a new run's
    code, _, err = run(["train", "maml", "--run-dir", run_dir, "--resume", "--no-progress", "--val-every", 0,
                        "--keep-best", 2], capsys)
    assert code == 2 and "--keep-best applies only with validation" in err, err


def tick_ten_seconds_a_call(monkeypatch) -> None:
    """Replace the clock of --time-limit by one that moves 10 s at every reading."""
    import metalearn.training as training

    clock = {"t": 0.0}

    def ticking():
        clock["t"] += 10.0
        return clock["t"]

    monkeypatch.setattr(training, "now", ticking)


def test_time_limit_from_the_command_line(tmp_path, capsys, monkeypatch):
    """--time-limit counts from the command's start (a clock of 10 s per call here): training
    stops with a checkpoint, exit status 75 and the resume command, and skips the evaluation;
    --resume takes a limit of its own or none. Durations in every accepted spelling; a bad one
    is one line and exit 2."""
    from metalearn.cli import Duration

    tick_ten_seconds_a_call(monkeypatch)
    run_dir = tmp_path / "run"
    args = ["train", "maml", "--dataset", "sinusoid", "--meta-batch-size", 2, "--steps", 1000, "--val-every", 0,
            "--run-dir", run_dir, "--no-progress"]
    code, out, err = run(args + ["--time-limit", "2m"], capsys)
    step = RunDir(run_dir).read_checkpoint("step")["step"]
    assert code == 75 and 0 < step < 1000 and "MSE" not in out
    assert f"stopped at its time limit after step {step} of 1000" in err and "--resume" in err
    code, out, err = run(["train", "maml", "--run-dir", run_dir, "--resume", "--no-progress", "--no-eval",
                          "--time-limit", "1:00"], capsys)
    assert code == 75 and f"resuming at step {step}" in out
    assert RunDir(run_dir).read_checkpoint("step")["step"] > step
    assert [Duration().convert(text, None, None) for text in ("5400", "90m", "1h30m", "1:30:00", "0.5d", "2m30s")] == \
        [5400, 5400, 5400, 5400, 43200, 150]
    # Slurm's days-hours[:minutes[:seconds]], as squeue and sbatch --time write a limit of a day or more
    assert [Duration().convert(text, None, None) for text in ("1-00:00:00", "2-12", "1-1:30", "0-0:10")] == \
        [86400, 216000, 91800, 600]
    assert Duration().convert("1e-3", None, None) == 0.001  # an exponent's minus is no days' dash
    for bad, message in (("soon", "'soon' is not a length of time"), ("0", "'0' is not a positive length"),
                         ("h", "'h' is not a length of time"), ("1:2:3:4", "is not a length of time"),
                         ("1:-30", "is not a length of time"), ("1-2-3", "is not a length of time"),
                         ("-0-1", "is not a length of time"),
                         ("2h-1h", "'2h-1h' is not a length of time")):  # no negative part in the unit form either
        code, _, err = run(args + ["--time-limit", bad], capsys)
        assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_stop_at_from_the_command_line(tmp_path, capsys):
    """--stop-at: the checkpoint of that step, exit status 0, the resume command, no test
    evaluation; the same command again does nothing and exits 0; a resume goes on to the end
    and evaluates. A step the run has passed, one not before its last, or not a positive
    integer: one line, exit 2 (with --print-config too), and no run folder made."""
    run_dir = tmp_path / "run"
    args = ["train", "maml", "--dataset", "sinusoid", "--meta-batch-size", 2, "--steps", 6, "--val-every", 0,
            "--eval-episodes", 4, "--run-dir", run_dir, "--no-progress"]
    code, out, err = run(args + ["--stop-at", 2], capsys)
    assert code == 0 and "MSE" not in out and RunDir(run_dir).read_checkpoint("step")["step"] == 2
    assert "stopped as asked (--stop-at) after step 2 of 6" in err and "--resume" in err
    resume = ["train", "maml", "--run-dir", run_dir, "--resume", "--no-progress"]
    code, out, err = run(resume + ["--stop-at", 2], capsys)  # the same command again: nothing to do
    assert code == 0 and "at step 2 of 6 already" in err and "MSE" not in out
    for step, message in ((1, "--stop-at 1: the run is already at step 2"),
                          (6, "--stop-at 6 is not before the run's last step (6)")):
        code, out, err = run(resume + ["--stop-at", step], capsys)
        assert code == 2 and message in err and "resuming" not in out and len(err.strip().splitlines()) == 1
        code, out, err = run(resume + ["--stop-at", step, "--print-config"], capsys)
        assert code == 2 and message in err and not out
    code, out, _ = run(resume, capsys)
    assert code == 0 and "resuming at step 2" in out and "MSE" in out
    for bad in (0, -3):
        code, _, err = run(args[:-3] + ["--run-dir", tmp_path / f"new{bad}", "--stop-at", bad], capsys)
        assert code == 2 and "a positive integer" in err and not (tmp_path / f"new{bad}").exists()
    code, _, err = run(args[:-3] + ["--run-dir", tmp_path / "x", "--stop-at", "soon"], capsys)
    assert code == 2 and "'soon' is not a valid integer" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--shots", 10, "--query", 15], "omniglot has 20 images per class; --shots 10 with --query 15 needs 25"),
        (["--ways", 2000], "--ways 2000 is more than that"),
        # 200 classes fit the training part but not the validation part (100), whose episodes
        # take the test shape: the message says where an option the user never typed comes from
        (["--ways", 200], "--test-ways 200 (it defaults to --ways) is more than that"),
        # test episodes' shape: the message names train's --test-* options and eval's own
        (["--test-shots", 20], "--test-shots 20 with --test-query 1 needs 21. Lower --test-shots or "
                               "--test-query (in metalearn eval and compare: --shots or --query)"),
        (["--split", "nope"], "valid splits: vinyals, lake, maml"),
        (["--split", "lake", "--steps", 1], None),
        (["--split", "lake", "--steps", 1, "--val-every", 1], "--val-every cannot apply: the lake split has no validation part"),
    ],
)
def test_bad_episode_options(tmp_path, capsys, omniglot_data_dir, extra, message):
    code, out, err = run(["train", "maml", "--dataset", "omniglot", "--data-dir", omniglot_data_dir,
                          "--run-dir", tmp_path / "r", "--no-progress", "--meta-batch-size", 2,
                          "--no-eval"] + extra, capsys)
    if message is None:  # lake has no validation part: training runs without validating, unless asked to
        assert code == 0, err
        return
    assert code == 2
    assert message in err and "Traceback" not in err


def test_unknown_dataset_lists_the_valid_ones(tmp_path, capsys):
    code, _, err = run(["train", "maml", "--dataset", "mnist", "--run-dir", tmp_path], capsys)
    assert code == 2 and ("--dataset must be one of omniglot, folder, mini-imagenet, sinusoid, sine-or-line, "
                          "got 'mnist'") in err
    # a reinforcement-learning method lists the environments, by the name its help gives them
    code, _, err = run(["train", "maml-rl", "--env", "nav3d", "--run-dir", tmp_path], capsys)
    assert code == 2 and err == ("error: --env must be an environment for maml-rl (one of nav2d, cheetah-vel, "
                                 "cheetah-dir), got 'nav3d' (one of your own: name its module in METALEARN_PLUGINS)\n"), err


def test_missing_data_directory_says_where_to_put_the_archives(tmp_path, capsys):
    code, _, err = run(["data", "info", "--data-dir", tmp_path / "empty"], capsys)
    assert code == 2
    assert "images_background.zip" in err and "--download" in err


def test_eval_of_a_folder_without_a_run(tmp_path, capsys):
    code, _, err = run(["eval", tmp_path], capsys)
    assert code == 2 and "not a metalearn run directory" in err
    # from Python, where no option type checks the path first: a run's file, a path that is not there
    from metalearn.api import evaluate_run

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MetalearnError, match=rf"^{tmp_path / 'config.json'} is a file of the run in {tmp_path}: give "
                                             rf"the run's folder, {tmp_path}$"):
        evaluate_run(tmp_path / "config.json")
    with pytest.raises(MetalearnError, match=rf"^{tmp_path / 'typo'} does not exist: give a run folder"):
        evaluate_run(tmp_path / "typo")


def test_data_info_and_verify(capsys, omniglot_data_dir):
    code, out, _ = run(["data", "info", "--data-dir", omniglot_data_dir], capsys)
    assert code == 0
    assert "1623 characters, 32460 images" in out
    assert "vinyals          train        1028     4112" in out
    assert "vinyals-trainval train        1200     4800" in out
    code, out, _ = run(["data", "verify", "--data-dir", omniglot_data_dir], capsys)
    assert code == 0 and out.count("ok") == 2


def test_eval_with_a_changed_method_option(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--run-dir",
                run_dir, "--no-progress", "--no-eval"], capsys)[0] == 0
    code, out, _ = run(["eval", run_dir, "--episodes", 10, "--set", "test_inner_steps=3", "--no-progress"], capsys)
    assert code == 0 and "after 0..3 adaptation steps" in out
    saved = json.loads((run_dir / "eval-episodes=10-test_inner_steps=3.json").read_text())
    assert len(saved["per_step"]) == 4 and saved["overrides"] == {"test_inner_steps": 3}
    code, _, err = run(["eval", run_dir, "--set", "no_such_option=1"], capsys)
    assert code == 2 and "no_such_option" in err
    code, _, err = run(["eval", run_dir, "--ways", 3], capsys)
    assert code == 2 and "regression" in err


def test_platipus_plot_beside_maml_and_compare(tmp_path, capsys):
    common = ["--dataset", "sine-or-line", "--steps", 3, "--meta-batch-size", 2, "--no-progress", "--no-eval"]
    assert run(["train", "platipus", *common, "--run-dir", tmp_path / "platipus"], capsys)[0] == 0
    assert run(["train", "maml", *common, "--run-dir", tmp_path / "maml"], capsys)[0] == 0
    code, out, err = run(["plot", tmp_path / "platipus", "--compare", tmp_path / "maml"], capsys)
    assert code == 0, err
    assert (tmp_path / "platipus" / "plots" / "samples.png").stat().st_size > 1000
    # --compare needs a run of the same tasks, beside a run that samples functions
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--no-progress",
                "--no-eval", "--run-dir", tmp_path / "maml-sinusoid"], capsys)[0] == 0
    code, _, err = run(["plot", tmp_path / "platipus", "--compare", tmp_path / "maml-sinusoid"], capsys)
    assert code == 2 and "trained on other tasks than this run (dataset sinusoid vs sine-or-line" in err
    assert "TaskConfig(" not in err  # what differs, not two dataclass dumps
    code, _, err = run(["plot", tmp_path / "maml", "--compare", tmp_path / "platipus"], capsys)
    assert code == 2 and "only a probabilistic method on regression tasks has" in err
    code, out, err = run(["compare", tmp_path / "platipus", tmp_path / "maml", "--episodes", 10, "--samples", 4,
                          "--set", "test_inner_steps=2", "--json", tmp_path / "cmp.json"], capsys)
    assert code == 0, err
    assert "| platipus |" in out and "| maml |" in out and "coverage_minmax" in out
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["episodes"] == 10
    # one prediction: an empty band, 0 by definition; null as the table's n/a, and so is its difference
    for name in ("coverage_minmax", "coverage_interval"):
        assert saved["maml"][name] == {"mean": None, "ci95": None, "difference": {"mean": None, "ci95": None}}
    assert re.search(r"^\| maml \|.* n/a \| n/a \|$", out, re.M), out
    assert saved["platipus"]["coverage_minmax"]["mean"] > 0.0  # sampled functions bracket the truth somewhere
    # paired on the same episodes: the differences' mean is the difference of the means, and their
    # interval is that of the per-episode differences
    difference = saved["maml"]["mse"]["difference"]
    assert difference["mean"] == pytest.approx(saved["maml"]["mse"]["mean"] - saved["platipus"]["mse"]["mean"])
    assert 0 < difference["ci95"] and "difference" not in saved["platipus"]["mse"]
    assert "paired differences from platipus on the same episodes" in out
    assert f"| maml | {difference['mean']:+.4g} +/- {difference['ci95']:#.2g} |" in out
    code, out, err = run(["compare", tmp_path / "platipus", tmp_path / "maml", "--episodes", 10, "--samples", 4,
                          "--set", "test_inner_steps=2", "--json", "-"], capsys)
    assert code == 0 and json.loads(out) == saved, err  # `-`: the JSON alone on the output, for a script
    # the one-model run first: the sampling run's own coverage stands, its difference from an empty band does not
    code, out, err = run(["compare", tmp_path / "maml", tmp_path / "platipus", "--episodes", 10, "--samples", 4,
                          "--json", "-"], capsys)
    assert code == 0, err
    swapped = json.loads(out)
    assert swapped["maml"]["coverage_minmax"] == {"mean": None, "ci95": None}
    assert swapped["platipus"]["coverage_minmax"]["mean"] > 0.0
    assert swapped["platipus"]["coverage_minmax"]["difference"] == {"mean": None, "ci95": None}
    assert isinstance(swapped["platipus"]["mse"]["difference"]["mean"], float)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--test-ways", 3], "tested with as many ways as it is trained with"),
        (["--model", "conv4-embedding"], "conv4-embedding has no output layer"),
        (["--log-every", 0], "--log-every must be at least 1"),
        (["--meta-batch-size", 0], "--meta-batch-size must be at least 1, got 0"),
        (["--steps", -5], "--steps must be >= 0, got -5"),
        (["--noise-std", 0.1], "--noise-std does not apply to omniglot, a classification dataset"),
        (["--ways", 1], "--ways must be at least 2"),
        (["--test-query", 0], "--test-query must be at least 1"),
        (["--split", "lake", "--test-shots", 10, "--test-query", 15], "--test-shots 10 with --test-query 15 needs 25"),
    ],
)
def test_bad_options_are_refused_before_training(tmp_path, capsys, omniglot_data_dir, extra, message):
    code, _, err = run(["train", "maml", "--dataset", "omniglot", "--data-dir", omniglot_data_dir, "--run-dir",
                        tmp_path / "r", "--no-progress", "--meta-batch-size", 2, "--steps", 1] + extra, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.parametrize("setting, message", [  # an option is named as it was given: --set NAME
                                              ("test_inner_steps=abc", "--set test_inner_steps must be int, got 'abc'"),
                                              ("test_inner_steps=2.5", "--set test_inner_steps must be int"),
                                              ("per_step_bn_statistics=maybe", "--set per_step_bn_statistics must be bool (true or false)"),
                                              ("model=conv4", "a network cannot change at evaluation"),
                                              ("learn_inner_lr=true", "--set learn_inner_lr changes the trained "
                                                                      "network; Missing key(s)")])
def test_bad_set_values_are_refused(tmp_path, capsys, setting, message):
    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--run-dir",
                run_dir, "--no-progress", "--no-eval"], capsys)[0] == 0
    code, _, err = run(["eval", run_dir, "--set", setting], capsys)
    assert code == 2 and message in err
    code, _, err = run(["eval", run_dir, "--episodes", 0], capsys)  # not "the default number"
    assert code == 2 and "0 is not in the range 1<=x<=10000000" in err and not (run_dir / "eval.json").exists()
    code, out, _ = run(["eval", run_dir, "--episodes", 4, "--set", "test_inner_steps=2", "--no-progress"], capsys)
    assert code == 0
    # an option of meta-training alone would score the run unchanged under its name
    for setting in ("first_order=True", "multi_step_loss=true", "inner_steps=3"):
        code, _, err = run(["eval", run_dir, "--episodes", 4, "--set", setting, "--no-progress"], capsys)
        assert code == 2 and f"--set {setting.split('=')[0]}=" in err and "is an option of meta-training" in err
    code, _, err = run(["eval", run_dir, "--set", "eval_bn_statistics=batch"], capsys)
    assert code == 2 and "applies only with per_step_bn_statistics True; the run has per_step_bn_statistics False" \
        in err
    assert [p.name for p in run_dir.glob("eval-*.json")] == ["eval-episodes=4-test_inner_steps=2.json"]


def test_a_set_that_only_starts_a_learned_tensor_is_refused(tmp_path, capsys):
    """With learned step sizes, --set inner_lr would only set where they start; the checkpoint's
    learned values replace it, so the evaluation would carry a name it does not deserve."""
    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--learn-inner-lr", "--steps", 1, "--meta-batch-size", 2,
                "--run-dir", run_dir, "--no-progress", "--no-eval"], capsys)[0] == 0
    code, _, err = run(["eval", run_dir, "--episodes", 2, "--set", "inner_lr=0.5", "--no-progress"], capsys)
    assert code == 2 and "--set inner_lr=0.5: inner_lr only sets the starting value" in err
    assert not list(run_dir.glob("eval*.json"))
    code, _, err = run(["eval", run_dir, "--episodes", 2, "--set", "test_inner_steps=2", "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = run(["eval", run_dir, "--episodes", 2, "--set", "test_inner_steps=2", "--set", "inner_lr=0.5",
                        "--no-progress"], capsys)  # among other overrides, still named
    assert code == 2 and "--set inner_lr=0.5: inner_lr only sets the starting value" in err


def test_overrides_are_checked_together_for_starting_values():
    """Each override is built with the others applied: memory_size 64 is seen with the user's own
    choose_k 32, not the run's 256 (which memory_size 64 alone would make invalid)."""
    from metalearn.api import resolve_config
    from metalearn.checkpoints import check_overrides_leave_weights

    config = resolve_config("memory", task={"dataset": "omniglot"}, method_config={"model": "conv4-embedding"})
    assert config.method_config.get("choose_k", 256) > 64
    check_overrides_leave_weights(config, {"memory_size": 64, "choose_k": 32})  # nothing to refuse
    with pytest.raises(MetalearnError, match=r"choose_k must be at most .*memory_size \(64\), got 128"):
        check_overrides_leave_weights(config, {"memory_size": 64, "choose_k": 128})  # the user's own value named


def test_eval_on_episodes_of_another_shape(tmp_path, capsys, omniglot_data_dir):
    """ProtoNets trains 60-way and is tested 5- and 20-way (its paper); a method with one output
    per class cannot be, and impossible or meaningless shapes are refused in one line."""
    proto, maml = tmp_path / "proto", tmp_path / "maml"
    common = ["--data-dir", omniglot_data_dir, "--steps", 1, "--no-progress", "--no-eval"]
    assert run(["train", "protonet", "--ways", 10, "--query", 2, "--run-dir", proto] + common, capsys)[0] == 0
    code, out, _ = run(["eval", proto, "--ways", 20, "--shots", 5, "--query", 1, "--episodes", 4,
                        "--data-dir", omniglot_data_dir, "--no-progress"], capsys)
    assert code == 0 and "eval-episodes=4-query=1-shots=5-ways=20.json" in out
    saved = json.loads((proto / "eval-episodes=4-query=1-shots=5-ways=20.json").read_text())
    assert (saved["ways"], saved["shots"], saved["query"], saved["episodes"]) == (20, 5, 1, 4)
    # eval's own options set the shape (it has no --test-ways): the refusal names them, not train's
    code, _, err = run(["eval", proto, "--ways", 5000, "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and err == ("error: omniglot split maml/test has 423 classes; --ways 5000 is more than that. "
                                 "Lower --ways to 423 or fewer.\n"), err
    code, _, err = run(["eval", proto, "--shots", 19, "--query", 3, "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and err == ("error: omniglot has 20 images per class; --shots 19 with --query 3 needs 22. Lower "
                                 "--shots or --query.\n"), err
    shutil.copytree(proto, tmp_path / "copy")  # compare's options are eval's, and so are its refusals
    code, _, err = run(["compare", proto, tmp_path / "copy", "--ways", 500, "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and err == ("error: omniglot split maml/test has 423 classes; --ways 500 is more than that. "
                                 "Lower --ways to 423 or fewer.\n"), err
    code, _, err = run(["compare", proto, tmp_path / "copy", "--shots", 19, "--query", 3, "--data-dir",
                        omniglot_data_dir], capsys)
    assert code == 2 and "--shots 19 with --query 3 needs 22. Lower --shots or --query." in err, err
    assert "test-" not in err and "Traceback" not in err
    code, _, err = run(["eval", proto, "--shots", 0, "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and err == "error: --shots must be a whole number of at least 1, got 0\n", err
    code, _, err = run(["eval", proto, "--ways", 1, "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and err == "error: --ways must be a whole number of at least 2, got 1\n", err
    from metalearn.api import evaluate_run

    with pytest.raises(MetalearnError, match=r"^episode_shape's query must be a whole number of at least 1, got 0$"):
        evaluate_run(proto, episode_shape={"query": 0}, data_dir=omniglot_data_dir)
    with pytest.raises(MetalearnError) as caught:  # from Python: the shape as evaluate_run takes it
        evaluate_run(proto, episode_shape={"ways": 5000}, data_dir=omniglot_data_dir)
    assert str(caught.value) == ("omniglot split maml/test has 423 classes; episode_shape's ways 5000 is more than "
                                 "that. Lower episode_shape's ways to 423 or fewer.")

    assert run(["train", "maml", "--meta-batch-size", 1, "--run-dir", maml] + common, capsys)[0] == 0
    code, _, err = run(["eval", maml, "--ways", 20, "--data-dir", omniglot_data_dir], capsys)
    assert code == 2 and "one output per class" in err
    code, out, _ = run(["eval", maml, "--shots", 2, "--episodes", 2, "--data-dir", omniglot_data_dir,
                        "--no-progress"], capsys)
    assert code == 0 and "eval-episodes=2-shots=2.json" in out and "after 0..3 adaptation steps" in out
    code, out, _ = run(["eval", maml, "--shots", 2, "--episodes", 2, "--data-dir", omniglot_data_dir,
                        "--no-progress", "--final-only"], capsys)
    assert code == 0 and "accuracy" in out and "adaptation steps" not in out


@pytest.mark.parametrize("failure", [
    MemoryError(),
    RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592 bytes."),
])
def test_running_out_of_memory_is_a_message_not_a_traceback(tmp_path, capsys, monkeypatch, failure):
    def out_of_memory(*args, **kwargs):
        raise failure

    trained = tmp_path / "trained"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--run-dir", trained,
                "--no-progress", "--no-eval"], capsys)[0] == 0
    monkeypatch.setattr("metalearn.api.train", out_of_memory)
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--run-dir", tmp_path / "r"], capsys)
    assert code == 2 and "out of memory" in err and "--meta-batch-size" in err and "Traceback" not in err
    assert "--resume" not in err  # a run that holds no checkpoint has nothing to continue from
    code, _, err = run(["train", "maml", "--run-dir", trained, "--resume", "--steps", 2], capsys)
    assert code == 2 and "Continue with --resume --task-chunk auto (or a smaller --task-chunk)" in err
    assert "in a new --run-dir (--init-from this run keeps its weights): a smaller --meta-batch-size" in err
    from metalearn.cli import _has_checkpoint

    assert _has_checkpoint(["train", "maml", f"--run-dir={trained}"])
    assert not _has_checkpoint(["train", "maml", "--run-dir", str(trained), "--print-config"])  # a dry run
    # the advice names options of the command that ran out, which its dataset and method take
    monkeypatch.setattr("metalearn.api.evaluate_run", out_of_memory)
    code, _, err = run(["eval", trained, "--no-progress"], capsys)
    assert code == 2 and "out of memory" in err and "--meta-batch-size" not in err and "--resume" not in err
    assert err.endswith(" Ask for less at once: fewer --shots or --query.\n"), err  # sinusoid: no ways, no images
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--run-dir", tmp_path / "r"], capsys)
    assert err.endswith(" Give --task-chunk auto (or a smaller --task-chunk): the same meta-gradient in less memory. "
                        "Or ask for less at once: a smaller --meta-batch-size, fewer --shots, --query or "
                        "--inner-steps.\n"), err
    code, _, err = run(["train", "maml-rl", "--hidden", 10**14, "--run-dir", tmp_path / "rl"], capsys)
    assert code == 2 and err.endswith(" Ask for less at once: a smaller --meta-batch-size, fewer --inner-steps or "
                                      "--trajectories, a shorter --horizon, a smaller --hidden.\n"), err
    from metalearn.cli import memory_advice

    assert memory_advice(["train", "maml", "--ways", "5"]).endswith(
        "Or ask for less at once: a smaller --meta-batch-size, fewer --ways, --shots, --query or --inner-steps, a "
        "smaller --image-size.")  # omniglot, the default
    from metalearn.cli import MEMORY_OPTIONS
    from metalearn.options import MEMORY_WORDS

    assert {words for words, _ in MEMORY_OPTIONS} == set(MEMORY_WORDS)  # a method's option finds its group
    # a method's own options, where its Config says they set the memory held (option(..., memory=...))
    assert memory_advice(["train", "memory"]).endswith("a smaller --image-size or --memory-size.")
    assert memory_advice(["train", "statistician"]).endswith("a smaller --image-size or --hidden-dim.")
    assert memory_advice(["--allocator", "default", "data", "info"]) == "Ask for less at once: a smaller --image-size."
    assert memory_advice(["export", trained, tmp_path / "out"]) == "Use a machine with more memory."
    # --task-chunk auto ran out all the same: one task at a time; at 1, nothing smaller to give
    resumed = ["train", "maml", "--run-dir", str(trained), "--resume"]
    assert memory_advice([*resumed, "--task-chunk", "auto"]).startswith(
        "Continue with --resume --task-chunk 1, one task at a time: the same meta-gradient in the least memory, "
        "from the run's last checkpoint.")
    assert memory_advice([*resumed, "--task-chunk=1"]).startswith("The other options cannot change on a --resume")


def test_an_import_that_runs_out_of_memory_is_the_same_message(tmp_path, capsys, monkeypatch):
    """torch imports some modules late (torch._dynamo with the first optimiser): memory running
    out there ends as an ImportError or SystemError whose context is the MemoryError. Also
    where the advice itself cannot be worked out for want of memory."""
    def import_out_of_memory(*args, **kwargs):
        try:
            raise MemoryError()
        except MemoryError:
            raise ImportError("cannot import name 'NP_SUPPORTED_MODULES' from 'torch._dynamo.utils'")

    monkeypatch.setattr("metalearn.api.train", import_out_of_memory)
    train = ["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--run-dir", tmp_path / "r"]
    code, _, err = run(train, capsys)
    assert code == 2 and err.startswith("error: out of memory (MemoryError). Give --task-chunk auto"), err
    monkeypatch.setattr("metalearn.cli.memory_advice", lambda argv: import_out_of_memory())
    code, _, err = run(train, capsys)
    assert (code, err) == (2, "error: out of memory (MemoryError). Ask for less at once, or use a machine with more "
                              "memory.\n")
    monkeypatch.setattr("metalearn.api.train", lambda *args, **kwargs: {}["unrelated"])
    with pytest.raises(KeyError):  # a bug is no memory failure: its traceback stays
        run(train, capsys)

    def bug_while_handling(*args, **kwargs):
        try:
            raise MemoryError()
        except MemoryError:
            return {}["unrelated"]

    monkeypatch.setattr("metalearn.api.train", bug_while_handling)
    with pytest.raises(KeyError):  # also one met while handling an out-of-memory error
        run(train, capsys)


def test_print_config_shows_the_resolved_paper_settings_and_trains_nothing(tmp_path, capsys, omniglot_data_dir):
    code, out, err = run(["train", "maml", "--ways", 20, "--shots", 5, "--run-dir", tmp_path / "r",
                          "--data-dir", omniglot_data_dir, "--print-config"], capsys)
    assert code == 0, err
    config = json.loads(out)
    assert config["method_config"]["inner_lr"] == 0.1 and config["method_config"]["inner_steps"] == 5
    assert config["train"]["meta_batch_size"] == 16 and config["task"]["query"] == 5
    assert config["method_config"]["adapt_norm"] is True and config["method_config"]["model"] == "conv4"
    assert not (tmp_path / "r").exists()
    code, out, err = run(["train", "maml", "--model", "conv4-reference", "--no-adapt-norm", "--run-dir", tmp_path / "r",
                          "--data-dir", omniglot_data_dir, "--print-config"], capsys)
    assert code == 0, err
    options = json.loads(out)["method_config"]
    assert options["adapt_norm"] is False and options["model"] == "conv4-reference"
    # a dry run refuses what training would refuse
    for args, message in ((["protonet", "--dataset", "sinusoid"], "classification"),
                          (["maml", "--ways", 5000], "--ways 5000 is more than that"),
                          (["maml", "--test-ways", 10], "one output per class"),
                          (["maml", "--dataset", "sinusoid", "--no-adapt-norm"], "this network has none"),
                          (["maml", "--dataset", "sinusoid"], "sinusoid tasks are generated, not read from files"),
                          (["maml-rl", "--env", "nav2d"], "nav2d tasks are generated, not read from files")):
        code, out, err = run(["train", *args, "--data-dir", omniglot_data_dir, "--print-config"], capsys)
        assert code == 2 and message in err and out == "", (args, err)


@pytest.mark.parametrize("args, message", [
    (["maml", "--inner-lr", "inf"], "--inner-lr must be a finite number > 0, got inf"),
    (["maml", "--meta-lr", "1e39"],  # beyond float32
     "--meta-lr must be a finite number > 0 and at most 3.403e+38 (float32's largest), got 1e+39"),
    (["maml", "--meta-lr", "nan"], "--meta-lr must be a finite number > 0, got nan"),
    (["maml", "--noise-std", "inf"], "--noise-std must be a finite number >= 0, got inf"),
    (["maml", "--inner-steps", 0], "--inner-steps must be at least 1, got 0"),
    (["maml", "--test-inner-steps", -1], "--test-inner-steps must be >= 0, got -1"),
    (["platipus", "--prior-step-init", -1], "--prior-step-init must be a finite number >= 0, got -1.0"),
    (["platipus", "--kl-weight", "inf"], "--kl-weight must be a finite number >= 0, got inf"),
    (["platipus", "--std-init", 0], "--std-init must be a finite number > 0, got 0.0"),
    (["matchingnet", "--scale", "inf"], "--scale must be a finite number > 0, got inf"),
    (["maml", "--meta-batch-size", "99999999999999999999"], "--meta-batch-size"),  # beyond int64: click's range
    (["maml", "--task-chunk", "92233720368547758070"], "92233720368547758070 does not fit in a 64-bit integer"),
    # below float32's normal range: 1e-320 is 0 to the network, a learning rate that adapts nothing
    (["maml", "--inner-lr", "1e-320"], "--inner-lr must be at least 1.175e-38 (float32's smallest normal number; a "
                                       "smaller one loses its precision or becomes 0), got 1e-320"),
    (["maml", "--grad-clip", "1e-320"], "--grad-clip must be 0 or at least 1.175e-38 (float32's smallest normal "
                                        "number; a smaller one loses its precision or becomes 0), got 1e-320"),
    (["maml", "--memory-budget", "1e-320"],
     "--memory-budget must be at least 1.175e-38 (float32's smallest normal number), got 1e-320"),
])
def test_numbers_that_would_only_fail_later_are_refused_at_once(capsys, args, message):
    """Infinite or NaN step sizes used to pass the "> 0" checks and end in a NaN loss whose
    message blamed something else; integers beyond int64 ended in a traceback from torch."""
    dataset = [] if args[0] == "matchingnet" else ["--dataset", "sinusoid"]
    code, out, err = run(["train", *args, *dataset, "--print-config"], capsys)
    assert code == 2 and message in err and "Traceback" not in err and out == "", err


def test_sizes_too_large_for_torch_s_arithmetic_are_a_message_not_a_traceback(tmp_path, capsys):
    """2**63 - 1 units, ways, tasks or examples overflow torch's 64-bit size arithmetic (a
    RuntimeError "Storage size calculation overflowed", a TypeError "Overflow when unpacking
    long long"): one line that quotes torch's first and names what to make smaller, whether the
    network is built (a dry run too) or a step draws its tasks."""
    largest = 2**63 - 1
    code, out, err = run(["train", "maml-rl", "--hidden", largest, "--print-config"], capsys)
    assert (code, out) == (2, "") and err == (
        "error: maml-rl's network is too large to build (Storage size calculation overflowed with sizes="
        f"[{largest}, 2]): give smaller sizes (of its input, its output, its layers or its memory)\n"), err
    sinusoid = ["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--no-progress", "--no-eval"]
    overflowed = f"(Storage size calculation overflowed with sizes=[{largest}]"
    for args, quoted in ((["--meta-batch-size", largest], overflowed),
                         (["--shots", 2**62, "--meta-batch-size", 2], "(rand(): argument 'size' failed to unpack")):
        code, _, err = run([*sinusoid, *args, "--run-dir", tmp_path / str(len(args))], capsys)
        assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
        assert err.startswith(f"error: the sizes asked for are too large to compute with {quoted}"), err
        assert err.endswith("): give smaller ones (a smaller --meta-batch-size, fewer --shots, --query or "
                            "--inner-steps)\n"), err
    from metalearn.errors import size_overflow_in

    assert [size_overflow_in(e) is e for e in (OverflowError("int too large"), TypeError("Overflow when unpacking "
            "long long"), RuntimeError("Storage size calculation overflowed"), RuntimeError("shape mismatch"),
            TypeError("Overflow"), ValueError("overflow"), RuntimeError("value cannot be converted to type float "
            "without overflow"))] == [False, True, True, False, False, False, False]


def test_a_dry_run_refuses_the_run_folder_device_and_init_from_that_training_would(tmp_path, capsys):
    common = ["--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--no-progress", "--no-eval"]
    assert run(["train", "maml", *common, "--run-dir", tmp_path / "small"], capsys)[0] == 0
    (tmp_path / "empty").mkdir()
    for args, message in (
        (["--resume", "--run-dir", tmp_path / "empty"], "cannot resume"),
        (["--run-dir", tmp_path / "small"], "already holds a run"),
        (["--resume", "--run-dir", tmp_path / "small", "--inner-lr", 0.5], "--inner-lr: "),
        (["--init-from", tmp_path / "nowhere"], "no checkpoint there"),
        (["--init-from", tmp_path / "small", "--dataset", "sine-or-line"], None),  # the same network: accepted
        (["--device", "foo"], "--device must be cpu, cuda, cuda:N or auto"),
    ):
        code, out, err = run(["train", "maml", *common, *args, "--print-config"], capsys)
        if message is None:
            assert code == 0, err
            continue
        assert code == 2 and message in err and out == "" and "Traceback" not in err, (args, err)
    # the dry run wrote nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "small"] and not any((tmp_path / "empty").iterdir())


def test_init_from_between_an_embedding_and_a_classifier_advises_only_what_loads(tmp_path, capsys):
    """A ProtoNets run's embedding has no output layer, which MAML's network needs: said plainly,
    with no --model to try. MAML++'s network, which ProtoNets cannot take, is never advised: the
    plain conv4s that take its weights are; the reference conv4's tensors no ProtoNets network
    takes."""
    from images import colours

    images = colours(tmp_path / "images", 6, 2)
    common = ["--dataset", "folder", "--data-dir", images, "--image-size", 16, "--ways", 2, "--shots", 1, "--query",
              1, "--steps", 1, "--meta-batch-size", 1, "--val-every", 0, "--no-progress", "--no-eval"]
    for method, model in (("protonet", "conv4-embedding"), ("maml", "conv4-mamlpp"), ("maml", "conv4-reference")):
        code, _, err = run(["train", method, *common, "--model", model, "--run-dir", tmp_path / model], capsys)
        assert code == 0, err

    def refusal(method: str, model: str, source: str) -> str:
        code, out, err = run(["train", method, *common, "--model", model, "--init-from", tmp_path / source,
                              "--print-config"], capsys)
        assert code == 2 and out == "" and "Traceback" not in err, err
        return err

    err = refusal("maml", "conv4", "conv4-embedding")
    assert err == (f"error: --init-from {tmp_path / 'conv4-embedding'}: its weights cannot carry over: protonet "
                   "trains a network without an output layer, and maml's needs one (at model.head.weight; --model "
                   "conv4-embedding there, conv4 here); train without --init-from\n"), err
    err = refusal("protonet", "conv4-maxpool-32", "conv4-mamlpp")
    assert ("both runs need the same network: --model conv4 (or conv4-maxpool, conv4-embedding, conv4-flat) with "
            "the same image size, channels and number of ways\n") in err, err
    assert run(["train", "protonet", *common, "--model", "conv4", "--init-from", tmp_path / "conv4-mamlpp",
                "--print-config"], capsys)[0] == 0  # the advice holds
    err = refusal("protonet", "conv4-embedding", "conv4-reference")
    assert "its weights cannot carry over: no network of protonet takes the weights of its maml network" in err, err
    assert err.endswith("; train without --init-from\n"), err


@pytest.mark.parametrize("extra, message", [
    (["--ways", 7], "--ways does not apply to sinusoid, a regression dataset"),
    (["--split", "vinyals", "--image-size", 32], "--split, --image-size do not apply"),
    (["--noise-std", -1], "--noise-std must be a finite number >= 0, got -1.0"),
])
def test_options_that_do_not_fit_a_regression_task_are_refused(tmp_path, capsys, extra, message):
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--run-dir", tmp_path / "r",
                        "--no-progress"] + extra, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_validation_evaluation_keeps_the_test_result_and_redraws_the_trainers_episodes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--eval-episodes", 6,
                "--val-every", 2, "--val-episodes", 6, "--seed", 3, "--run-dir", run_dir, "--no-progress"], capsys)[0] == 0
    test_result = (run_dir / "eval.json").read_text()
    code, out, err = run(["eval", run_dir, "--part", "val", "--episodes", 6, "--seed", 3, "--final-only",
                          "--no-progress"], capsys)
    assert code == 0, err
    assert f"written to {run_dir / 'eval-part=val-seed=3.json'}" in out
    assert (run_dir / "eval.json").read_text() == test_result
    saved = json.loads((run_dir / "eval-part=val-seed=3.json").read_text())
    assert saved["part"] == "val" and saved["episodes"] == 6
    # the seed given, which repeats the episodes, and the generator's (the validation offset added)
    from metalearn.training import VALIDATION_SEED_OFFSET

    assert (saved["seed"], saved["episode_seed"]) == (3, 3 + VALIDATION_SEED_OFFSET)
    assert json.loads(test_result)["seed"] == 0
    # the episodes the trainer validated on at the last step (the run's seed, 3), not the test episodes
    validated = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "val_mse" in r]
    assert saved["mean"] == pytest.approx(validated[-1]["val_mse"], rel=1e-6)
    assert saved["mean"] != json.loads(test_result)["mean"]


def test_training_classes_are_scored_in_the_test_shape_on_their_own_episodes(tmp_path, capsys):
    from metalearn.runs import RunDir
    from metalearn.tasks import build_task_source

    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--shots", 10, "--test-shots", 5, "--steps", 2,
                "--meta-batch-size", 2, "--eval-episodes", 6, "--run-dir", run_dir, "--no-progress"], capsys)[0] == 0
    code, out, err = run(["eval", run_dir, "--part", "train", "--final-only", "--no-progress"], capsys)
    assert code == 0, err
    assert f"written to {run_dir / 'eval-part=train.json'}" in out
    saved = json.loads((run_dir / "eval-part=train.json").read_text())
    assert saved["part"] == "train" and saved["episodes"] == 6 and saved["shots"] == 5
    # one task family for every part here: the training part's episodes are its own, not the test's
    assert saved["mean"] != json.loads((run_dir / "eval.json").read_text())["mean"]
    task = RunDir(run_dir).read_config().task
    evaluated = build_task_source(task, "train", evaluation=True).sample(1, torch.Generator().manual_seed(0))
    trained = build_task_source(task, "train").sample(1, torch.Generator().manual_seed(0))
    assert evaluated.support_x.shape[1] == 5 and trained.support_x.shape[1] == 10


def test_compare_names_the_episode_shape_that_differs(tmp_path, capsys):
    for shots in (5, 10):
        assert run(["train", "maml", "--dataset", "sinusoid", "--shots", shots, "--steps", 1, "--meta-batch-size", 2,
                    "--run-dir", tmp_path / f"k{shots}", "--no-progress", "--no-eval"], capsys)[0] == 0
    code, _, err = run(["compare", tmp_path / "k5", tmp_path / "k10", "--episodes", 4], capsys)
    assert code == 2 and "(shots 5 vs 10); score them on one shape (metalearn compare --ways, --shots" in err, err
    # --shots scores both on one shape: the episodes `eval --shots` scores, said in the heading
    code, out, err = run(["compare", tmp_path / "k5", tmp_path / "k10", "--episodes", 4, "--shots", 10, "--query", 20,
                          "--json", tmp_path / "c.json"], capsys)
    assert code == 0, err
    assert out.startswith("4 test episodes of sinusoid (10 support and 20 query points), seed 0"), out
    result = json.loads((tmp_path / "c.json").read_text())
    assert (result["shots"], result["query"]) == (10, 20)
    for name in ("k5", "k10"):
        assert run(["eval", tmp_path / name, "--episodes", 4, "--shots", 10, "--query", 20], capsys)[0] == 0
        evaluated = json.loads((tmp_path / name / "eval-episodes=4-query=20-shots=10.json").read_text())
        assert result[name]["mse"]["mean"] == pytest.approx(evaluated["mean"], rel=1e-5), name
    code, out, err = run(["compare", tmp_path / "k5", "--episodes", 4, "--ways", 3], capsys)
    assert code == 2 and err == "error: run 'k5': sinusoid is regression: its tasks have no ways (leave out --ways)\n", err


def test_compare_takes_runs_tested_on_the_same_episodes(tmp_path, capsys):
    # trained on K=10 and tested on K=5, or trained and tested on K=5: the same test episodes
    common = ["--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--no-progress", "--no-eval"]
    assert run(["train", "maml", "--shots", 10, "--test-shots", 5, "--run-dir", tmp_path / "a"] + common, capsys)[0] == 0
    assert run(["train", "maml", "--shots", 5, "--run-dir", tmp_path / "b"] + common, capsys)[0] == 0
    # --samples, for methods that sample models, is refused as predict refuses it: no MAML run would use it
    code, out, err = run(["compare", tmp_path / "a", tmp_path / "b", "--episodes", 3, "--samples", 2], capsys)
    assert code == 2 and out == "" and err == ("error: --samples is for methods that sample models (platipus); maml "
                                               "gives one prediction per query: leave --samples out\n"), err
    code, out, err = run(["compare", tmp_path / "a", tmp_path / "b", "--episodes", 3], capsys)
    assert code == 0, err
    assert "| a |" in out and "| b |" in out
    (tmp_path / "link").symlink_to(tmp_path / "a")  # one run under two paths is one run
    for twice in ([tmp_path / "a", tmp_path / "b", tmp_path / "a"], [tmp_path / "a", tmp_path / "link"]):
        code, out, err = run(["compare", *twice, "--episodes", 3], capsys)
        assert code == 2 and out == "" and err == f"error: the run {twice[-1]} is given twice; give each run once\n"
    # a folder named as one of the result's own fields, and two folders of one name: their paths
    shutil.copytree(tmp_path / "b", tmp_path / "episodes")
    shutil.copytree(tmp_path / "b", tmp_path / "x" / "b")
    code, out, err = run(["compare", tmp_path / "episodes", tmp_path / "b", tmp_path / "x" / "b", "--episodes", 3,
                          "--json", tmp_path / "c.json"], capsys)
    assert code == 0, err
    assert out.startswith("3 test episodes of sinusoid") and f"| {tmp_path / 'episodes'} |" in out
    result = json.loads((tmp_path / "c.json").read_text())
    assert result["episodes"] == 3 and {str(tmp_path / "b"), str(tmp_path / "x" / "b")} <= set(result)
    # --part val scores the episodes eval --part val scores
    code, out, err = run(["compare", tmp_path / "b", "--episodes", 3, "--part", "val", "--json", tmp_path / "v.json"],
                         capsys)
    assert code == 0 and out.startswith("3 val episodes of sinusoid"), err
    assert run(["eval", tmp_path / "b", "--episodes", 3, "--part", "val"], capsys)[0] == 0
    val = json.loads((tmp_path / "b" / "eval-episodes=3-part=val.json").read_text())["mean"]
    assert json.loads((tmp_path / "v.json").read_text())["b"]["mse"]["mean"] == pytest.approx(val, rel=1e-6)
    assert result[str(tmp_path / "b")]["mse"]["mean"] != pytest.approx(val, rel=1e-3)  # the test episodes differ
    from metalearn.uncertainty import compare_learners

    with pytest.raises(MetalearnError, match="cannot label a run 'seed'"):
        compare_learners({"seed": tmp_path / "a"}, episodes=3)
    # each part scores the episodes `metalearn eval --part` scores, not the test part's
    from metalearn.api import evaluate_run

    for part in ("val", "test"):
        compared = compare_learners({"a": tmp_path / "a"}, episodes=3, part=part)["a"]["mse"]["mean"]
        evaluated = evaluate_run(tmp_path / "a", episodes=3, part=part, progress=False, per_step=False)["mean"]
        assert compared == pytest.approx(evaluated, rel=1e-5), part



def test_compare_takes_eval_s_device_and_progress(tmp_path, capsys, monkeypatch):
    """compare's --device and --progress/--no-progress are eval's: the same numbers on the CPU
    whether asked or not, a bar only where asked (or on a terminal), and a device this machine
    cannot give refused in eval's one line, before any run is scored."""
    import sys

    from metalearn.errors import OptionError
    from metalearn.uncertainty import compare_learners

    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2, "--no-progress",
                "--no-eval", "--run-dir", tmp_path / "a"], capsys)[0] == 0
    compare = ["compare", tmp_path / "a", "--episodes", 3, "--json", "-"]
    code, plain, err = run(compare, capsys)
    assert code == 0 and "%|" not in err, err  # the error output is no terminal here: no bar by default
    code, out, err = run([*compare, "--device", "cpu", "--no-progress"], capsys)
    assert code == 0 and json.loads(out) == json.loads(plain) and "%|" not in err, err
    code, out, err = run([*compare, "--progress"], capsys)
    assert code == 0 and json.loads(out) == json.loads(plain) and "comparing:" in err and "%|" in err, err
    with monkeypatch.context() as patched:  # on a terminal: a bar unless told not to draw one
        patched.setattr(sys.stderr, "isatty", lambda: True, raising=False)
        assert "%|" in run(compare, capsys)[2] and "%|" not in run([*compare, "--no-progress"], capsys)[2]
    runs = {"a": tmp_path / "a"}
    for progress, drawn in ((False, False), (True, True)):
        result = compare_learners(runs, episodes=3, device="cpu", progress=progress)
        # the JSON's coverage of a one-model run is null (the table's n/a), Python's the 0 it is by definition
        assert {**result["a"], "coverage_minmax": None, "coverage_interval": None} == {
            **json.loads(plain)["a"], "coverage_minmax": None, "coverage_interval": None}
        assert result["a"]["coverage_minmax"]["mean"] == 0.0 and json.loads(plain)["a"]["coverage_minmax"] == {
            "mean": None, "ci95": None}
        assert ("%|" in capsys.readouterr().err) is drawn, progress
    # eval's refusals, word for word: a name that is no device, and a GPU this machine lacks
    refusals = [("tpu", "{} must be cpu, cuda, cuda:N or auto, got 'tpu'", ("--device", "device"))]
    if not torch.cuda.is_available():
        refusals.append(("cuda", "{}: this torch build sees no GPU (torch.cuda.is_available() is False); use {}, or "
                                 "install a CUDA build of torch", ("--device cuda", "device='cuda'"),
                         ("--device cpu", "device='cpu'")))
    for device, message, *names in refusals:
        said = message.format(*(flag for flag, _ in names))
        for command in (["eval", tmp_path / "a", "--episodes", 3], compare):
            assert run([*command, "--device", device], capsys) == (2, "", f"error: {said}\n"), command
        with pytest.raises(OptionError) as refused:
            compare_learners(runs, episodes=3, device=device, progress=False)
        assert str(refused.value) == message.format(*(keyword for _, keyword in names))
    assert not (tmp_path / "a" / "eval-episodes=3.json").exists()  # eval refused it before writing any file


def test_unusable_paths_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2,
                        "--run-dir", tmp_path / "file", "--no-progress"], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'file'} is a file, not a folder; give a folder path\n"
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2,
                        "--run-dir", tmp_path / "file" / "run", "--no-progress"], capsys)
    assert code == 2 and err == f"error: {tmp_path / 'file' / 'run'}: {tmp_path / 'file'} is a file, not a folder\n"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2,
                "--run-dir", tmp_path / "run", "--no-progress", "--no-eval"], capsys)[0] == 0
    code, _, err = run(["export", tmp_path / "run", tmp_path / "file"], capsys)
    assert code == 2 and err.startswith("error:") and "Traceback" not in err
    # refused before evaluating, not after minutes of it
    code, out, err = run(["compare", tmp_path / "run", "--json", tmp_path], capsys)
    assert code == 2 and "is a folder" in err and out == ""
    code, out, err = run(["compare", tmp_path / "run", "--json", tmp_path / "file" / "deeper" / "c.json"], capsys)
    assert code == 2 and f"{tmp_path / 'file'} is a file, not a folder" in err and out == ""


def test_a_bare_command_shows_its_help(capsys):
    for args in ([], ["train"], ["data"]):
        code, out, err = run(args, capsys)
        assert code == 2 and err.startswith("Usage: metalearn") and "error:" not in err, (args, err)


def test_every_training_option_says_what_it_does():
    from metalearn.cli import PAPER_DEFAULT, cli

    import click

    group = cli.commands["train"]
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        for param in group.get_command(ctx, name).params:
            text = (param.help or "").replace(PAPER_DEFAULT, "").strip()
            assert len(text) > 10, (name, param.name, param.help)
    maml_help = {p.name: p.help for p in group.get_command(ctx, "maml").params}
    assert "conv4-embedding" not in maml_help["model"]  # MAML needs a head
    assert "LSLR" in maml_help["learn_inner_lr"]


@pytest.mark.parametrize("args, message", [
    (["matchingnet", "--processing-steps", 3], "--processing-steps applies only with --full-context-embeddings"),
    (["reptile", "--inner-optimizer", "sgd", "--inner-beta1", 0.9], "--inner-beta1 applies only with --inner-optimizer adam"),
])
def test_options_that_would_go_unused_are_refused(capsys, omniglot_data_dir, args, message):
    code, _, err = run(["train", *args, "--print-config"], capsys)
    assert code == 2 and message in err
    # the defaults alone are fine
    assert run(["train", *args[:1], "--data-dir", omniglot_data_dir, "--print-config"], capsys)[0] == 0


# -- hardening: what the resolved configuration says, re-evaluations, start-up ------------------


def test_an_unknown_dataset_is_named_also_with_options_of_a_kind(capsys):
    for options in ([], ["--ways", 5], ["--noise-std", 0.1]):
        code, _, err = run(["train", "maml", "--dataset", "nope", *options, "--print-config"], capsys)
        assert code == 2 and err.startswith("error: --dataset must be one of omniglot, "), err
        assert err.endswith(", got 'nope' (one of your own: name its module in METALEARN_PLUGINS)\n"), err
        assert err.count("\n") == 1, err


def test_a_split_without_a_validation_part_resolves_to_validation_off(capsys, omniglot_data_dir):
    code, out, err = run(["train", "protonet", "--split", "lake", "--print-config"], capsys)
    assert code == 0, err
    assert json.loads(out)["train"]["val_every"] == 0  # what happens, not the paper's 1000
    code, out, err = run(["train", "protonet", "--split", "vinyals", "--print-config"], capsys)
    assert json.loads(out)["train"]["val_every"] == 1000


@pytest.mark.parametrize("steps, warned", [(20000, False), (22000, False), (22001, True), (75000, True)])
def test_a_schedule_that_halves_the_rate_to_nothing_is_one_warning_line(capsys, steps, warned):
    """ProtoNets' paper halves the rate every 2,000 of its 20,000 steps (9 halvings); kept for a
    run of 75,000 steps it halves it 37 times."""
    from metalearn.api import resolve_config

    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": steps, "lr_halve_every": 2000})
    messages = [str(w.message) for w in caught]
    if not warned:
        assert messages == []
        return
    halvings = (steps - 1) // 2000
    # from Python the options as Python gives them; the command line's flags are the next test's
    assert messages == [f"lr_halve_every=2000 halves the meta learning rate {halvings} times over steps={steps}, "
                        f"to {1e-3 * 0.5 ** halvings:.2g} (from meta_lr=0.001), where its steps barely change the "
                        f"weights; give lr_halve_every={-(-steps // 11)} (at most 10 halvings) or 0 (none)"]
    assert (steps - 1) // -(-steps // 11) <= 10


def test_the_schedule_warning_is_one_line_on_the_command_line(capsys):
    code, out, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 75000, "--lr-halve-every", 2000,
                          "--print-config"], capsys)
    assert code == 0 and json.loads(out)["train"]["lr_halve_every"] == 2000
    assert err.startswith("warning: --lr-halve-every 2000 halves the meta learning rate 37 times over --steps 75000")
    assert err.count("\n") == 1


def test_evaluating_again_says_that_it_replaces_the_earlier_evaluation(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2,
                        "--eval-episodes", 4, "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    earlier = json.loads((run_dir / "eval.json").read_text())
    (run_dir / "eval.json").write_text(json.dumps({**earlier, "mean": 0.123456}))
    code, out, err = run(["eval", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == (f"written to {run_dir / 'eval.json'} (replacing the earlier evaluation there: "
                                    "mse 0.1235 at step 2)")
    # without a progress bar (a log file) a line says what the wait before the score is
    assert err == "evaluating the checkpoint of step 2 on 4 test episodes...\n", err
    code, out, err = run(["eval", run_dir, "--progress", "--episodes", 3], capsys)
    assert code == 0 and "evaluating the checkpoint" not in err, err
    code, out, err = run(["eval", run_dir, "--no-progress", "--seed", 1], capsys)  # a file of its own: new
    assert out.splitlines()[-1] == f"written to {run_dir / 'eval-seed=1.json'}"


def test_a_run_extended_by_steps_logs_at_the_default_of_its_new_length(tmp_path, capsys):
    common = ["--dataset", "sinusoid", "--meta-batch-size", 2, "--val-every", 0, "--no-progress", "--no-eval"]
    assert run(["train", "maml", "--steps", 10, "--run-dir", tmp_path / "a"] + common, capsys)[0] == 0
    assert run(["train", "maml", "--steps", 10, "--log-every", 1, "--run-dir", tmp_path / "b"] + common, capsys)[0] == 0
    assert run(["train", "maml", "--steps", 10, "--log-every", 5, "--run-dir", tmp_path / "c"] + common, capsys)[0] == 0
    for name in "abc":
        assert run(["train", "maml", "--steps", 20, "--resume", "--run-dir", tmp_path / name] + common, capsys)[0] == 0
    steps = lambda name: [json.loads(line)["step"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    # the default of 10 steps (1) becomes the default of 20 (2), also where it was given as 1;
    # another number given is the user's and stays
    assert steps("a") == steps("b") == list(range(1, 11)) + list(range(12, 21, 2))
    assert steps("c") == list(range(5, 21, 5))
    assert RunDir(tmp_path / "a").read_config().train.log_every == 2


def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path):
    """The console script's entry point catches an interrupt during the import of torch (the
    first seconds of every command), run here as the installed script runs it."""
    import os
    import signal
    import subprocess
    import sys
    import tomllib

    entry = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]["metalearn"]
    module, function = entry.split(":")
    program = f"""
import sys, time
class TorchImportsSlowly:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("importing torch", flush=True)
            time.sleep(60)
sys.meta_path.insert(0, TorchImportsSlowly())
sys.argv = ["metalearn", "--help"]
from {module} import {function}
sys.exit({function}())
"""
    child = subprocess.Popen([sys.executable, "-c", program], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert child.stdout.readline() == "importing torch\n"
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 130 and err == "interrupted while starting\n", err


def test_a_full_disk_met_outside_the_run_folder_is_the_same_one_line():
    import errno
    import os

    from metalearn.cli import describe_os_error

    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/results/fits.png")
    assert re.fullmatch(r"cannot write /tmp/results/fits.png: No space left on device \(\d.* free there\)",
                        describe_os_error(err))


def test_status_is_not_fooled_by_lock_notes_and_odd_folders(tmp_path, capsys):
    """A lock note whose process id is alive but whose lock no one holds (the id reused after a
    kill) is no training; another host's note reads as training there only while its lock is
    held, else as unknown; metrics without checkpoint.pt cannot be resumed, and status says so;
    a folder run's resume command asks for its images again; metrics lines without a step or
    with a non-numeric validation value are skipped, not a traceback."""
    import os
    import socket

    from PIL import Image

    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 6, "--meta-batch-size", 2, "--val-every", 0,
                "--log-every", 1, "--stop-at", 2, "--run-dir", run_dir, "--no-progress"], capsys)[0] == 0
    state = lambda: json.loads(run(["status", run_dir, "--json"], capsys)[1])[0]
    note = {"pid": os.getpid(), "host": socket.gethostname(), "since": "then"}  # alive, but holding nothing
    (run_dir / ".lock").write_text(json.dumps(note))
    assert state()["state"] == "stopped"
    (run_dir / ".lock").write_text(json.dumps({**note, "host": "elsewhere.example"}))
    assert state()["state"] == "unknown"
    assert "unknown from here: the lock names elsewhere.example" in run(["status", run_dir], capsys)[1]
    with RunDir(run_dir).lock():
        (run_dir / ".lock").write_text(json.dumps({**note, "host": "elsewhere.example"}))
        assert state()["state"] == "training elsewhere"
    with open(run_dir / "metrics.jsonl", "a") as metrics:
        metrics.write(json.dumps({"loss": 1.0}) + "\n" + json.dumps({"step": 5, "val_mse": "x"}) + "\n")
    code, out, err = run(["status", run_dir], capsys)
    assert code == 0 and "last logged (step 2)" in out and "validation" not in out, err
    (run_dir / "checkpoint.pt").unlink()
    assert state()["state"] == "no checkpoint"
    assert "cannot be resumed; start afresh" in run(["status", run_dir], capsys)[1]

    images = tmp_path / "images"
    rng = __import__("numpy").random.default_rng(0)
    for c in range(12):
        (images / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype="uint8")).save(images / f"class{c}" / f"{i}.png")
    folder_run = tmp_path / "folder-run"
    code, _, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", images, "--image-size", 16, "--ways", 2,
                        "--shots", 1, "--query", 1, "--steps", 4, "--stop-at", 1, "--val-every", 0,
                        "--run-dir", folder_run, "--no-progress"], capsys)
    assert code == 0, err
    # the checkpoint records the folder: a resume reads it; where it has moved, it needs --data-dir
    hint = f"metalearn train protonet --run-dir {folder_run} --resume"
    assert json.loads(run(["status", folder_run, "--json"], capsys)[1])[0]["resume"] == hint
    images.rename(tmp_path / "moved")
    hint = f"metalearn train protonet --run-dir {folder_run} --data-dir IMAGE_FOLDER --resume"
    assert json.loads(run(["status", folder_run, "--json"], capsys)[1])[0]["resume"] == hint
    assert f"stopped; continue with `{hint}`" in run(["status", folder_run], capsys)[1]


def test_ctrl_c_during_the_test_evaluation_says_training_is_complete(tmp_path, capsys, monkeypatch):
    """A Ctrl-C after the last step, while the run is tested, keeps the saved checkpoint: the
    message says so and names the command that tests it, and status says it is untested."""
    import metalearn.api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(metalearn.api, "_evaluate", interrupted)
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--val-every",
                        0, "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 130
    assert err.strip().splitlines()[-1] == (f"interrupted during the test evaluation at step 2; training is complete; "
                                            f"evaluate with `metalearn eval {run_dir}`")
    assert RunDir(run_dir).read_checkpoint("step")["step"] == 2 and not RunDir(run_dir).eval_path.exists()
    code, out, _ = run(["status", run_dir], capsys)
    assert code == 0 and f"; complete; not tested yet: `metalearn eval {run_dir}`" in out


def test_ctrl_c_while_the_data_is_read_names_the_command_that_goes_on(tmp_path, capsys, monkeypatch):
    """A Ctrl-C before training begins (a new folder's first preparation): a new run has nothing
    to resume and leaves no folder; a resumed run is told --resume."""
    import metalearn.training

    built = metalearn.training.build_task_source

    def interrupted(*args, **kwargs):  # while the data is read, after the run folder's lock is taken
        raise KeyboardInterrupt

    options = ["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--val-every", 0,
               "--no-progress", "--no-eval"]
    monkeypatch.setattr(metalearn.training, "build_task_source", interrupted)
    code, _, err = run([*options, "--run-dir", tmp_path / "new" / "run"], capsys)
    assert code == 130
    assert err.strip().splitlines()[-1] == ("interrupted before training began; nothing was trained or saved: run the "
                                            "same command again to start")
    assert not (tmp_path / "new").exists()  # the lock made new/ and new/run/; both are gone
    run_dir = tmp_path / "run"
    monkeypatch.setattr(metalearn.training, "build_task_source", built)
    assert run([*options, "--stop-at", 1, "--run-dir", run_dir], capsys)[0] == 0
    monkeypatch.setattr(metalearn.training, "build_task_source", interrupted)
    code, _, err = run([*options, "--run-dir", run_dir, "--resume"], capsys)
    assert code == 130
    assert err.strip().splitlines()[-1] == (f"interrupted before training began; continue with `metalearn train maml "
                                            f"--run-dir {run_dir} --resume`")
    # from Python, the same stop names the Python call that goes on
    from metalearn.api import resolve_config, train
    from metalearn.errors import TrainingInterrupted

    config = resolve_config("maml", task={"dataset": "sinusoid"}, train={"steps": 2, "meta_batch_size": 2,
                                                                          "val_every": 0})
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, run_dir, resume=True, evaluate_after=False, announce=None)
    assert str(stopped.value) == (f"interrupted before training began; continue with `metalearn.train(config, "
                                  f"run_dir={str(run_dir)!r}, resume=True)`")
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, tmp_path / "fresh", evaluate_after=False, announce=None)
    assert str(stopped.value) == ("interrupted before training began; nothing was trained or saved: call train the "
                                  "same way again to start")
    # a SIGTERM there (a scheduler's, in the first seconds of a job) says the same, with its status 143:
    # a requeue that follows the exit table would otherwise --resume a run that holds nothing
    from metalearn.errors import Terminated

    def terminated(*args, **kwargs):
        raise Terminated

    monkeypatch.setattr(metalearn.training, "build_task_source", terminated)
    code, _, err = run([*options, "--run-dir", tmp_path / "other"], capsys)
    assert code == 143
    assert err.strip().splitlines()[-1] == ("terminated (SIGTERM) before training began; nothing was trained or "
                                            "saved: run the same command again to start")
    # a scheduler's warning (Slurm's --signal=USR1@120) there: the same, with its own name and status
    if hasattr(signal, "SIGUSR1"):
        def warned(*args, **kwargs):
            raise Terminated(signal.SIGUSR1)

        monkeypatch.setattr(metalearn.training, "build_task_source", warned)
        code, _, err = run([*options, "--run-dir", tmp_path / "other"], capsys)
        assert code == 128 + signal.SIGUSR1
        assert err.strip().splitlines()[-1].startswith("terminated (SIGUSR1) before training began; nothing was")


def test_status_says_where_runs_stand_without_touching_them(tmp_path, capsys, monkeypatch):
    """``metalearn status``: a complete run (step, validation best and latest, its evaluation),
    the same run while this process holds its lock (training, with the pid), after a holder
    that died left its note (no longer training), a stopped run with its resume command, and
    a listing of $METALEARN_RUNS in which a damaged run is one line and hides no other. It
    writes nothing: the folders' files are unchanged."""
    import os
    import subprocess
    import sys

    root = tmp_path / "runs"
    done = root / "done"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 4, "--meta-batch-size", 2, "--val-every", 2,
                "--val-episodes", 4, "--eval-episodes", 4, "--log-every", 1, "--run-dir", done, "--no-progress"],
               capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()}
    code, out, err = run(["status", done], capsys)
    assert code == 0, err
    assert out.startswith(f"{done}: maml on sinusoid K=5\n  step 4 of 4 (100%)") and "; complete;" in out
    assert "last logged (step 4): loss " in out and "validation mse: " in out and "eval: mse " in out
    assert "the remaining" not in out
    status = json.loads(run(["status", done, "--json"], capsys)[1])[0]
    metrics = RunDir(done).read_metrics()
    validation = [r for r in metrics if "val_mse" in r]
    assert status["state"] == "complete" and status["step"] == 4 and status["holder"] is None
    assert status["validation"]["latest"] == validation[-1]
    assert status["validation"]["best"] == min(validation, key=lambda r: (r["val_mse"], r["step"]))
    assert status["evaluations"]["eval"]["episodes"] == 4
    from metalearn.cli import format_machine
    from metalearn.runtime import machine

    assert status["machines"] == [{"from_step": 0, **machine()}]
    assert f"  trained on: {machine()['processor']} (" in out and ") from step 0\n" in out
    assert format_machine({"from_step": 5, "processor": "X", "device": "NVIDIA H100", "cores": 16, "torch_threads": 1,
                           "processes": 2}) == "X, NVIDIA H100 (16 cores, 1 torch thread, 2 processes) from step 5"
    assert format_machine({"from_step": 0, "processor": "Y", "cpu_capability": "AVX2", "cores": 2,
                           "torch_threads": 2}) == "Y (AVX2, 2 cores, 2 torch threads) from step 0"
    with RunDir(done).lock():  # as a training process would hold it: past the last step, for its test
        state = json.loads(run(["status", done, "--json"], capsys)[1])[0]
        assert state["state"] == "testing" and state["holder"]["pid"] == os.getpid()
        assert f"complete; being tested now by the process that trained it (process {os.getpid()})" in \
            run(["status", done], capsys)[1]
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (done / ".lock").write_text(json.dumps({"pid": int(ended.stdout), "host": __import__("socket").gethostname()}))
    assert json.loads(run(["status", done, "--json"], capsys)[1])[0]["state"] == "complete"
    (done / ".lock").unlink()
    assert {p.name: p.read_bytes() for p in done.iterdir() if p.is_file()} == before

    tick_ten_seconds_a_call(monkeypatch)
    stopped = root / "stopped"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 100, "--meta-batch-size", 2, "--val-every", 0,
                "--log-every", 1, "--time-limit", 60, "--run-dir", stopped, "--no-progress"], capsys)[0] == 75
    out = run(["status", stopped], capsys)[1]
    assert f"stopped; continue with `metalearn train maml --run-dir {stopped} --resume`" in out
    state = json.loads(run(["status", stopped, "--json"], capsys)[1])[0]
    # the time left: the remaining steps (2 tasks each) at the median rate of the last 20 windows
    last = state["last"]
    rates = [r["tasks_per_s"] for r in RunDir(stopped).read_metrics() if "loss" in r]
    assert state["seconds_left"] == pytest.approx((100 - last["step"]) * 2 / statistics.median(rates[-20:]))
    assert f"the remaining {100 - last['step']} steps: about " in out
    # windows slowed 1000-fold (the process paused) do not skew it while they are fewer than half
    for extra in range(1, 4):
        RunDir(stopped).append_metrics({**last, "step": last["step"] + extra, "tasks_per_s": min(rates) / 1000})
    paused = json.loads(run(["status", stopped, "--json"], capsys)[1])[0]
    assert paused["last"]["step"] == paused["step"] == last["step"] + 3
    # stopped: a resume goes on from the checkpoint, at the last step it logged before these
    assert paused["checkpoint_step"] == last["step"] and paused["steps_left"] == 100 - last["step"]
    assert paused["seconds_left"] <= (100 - last["step"]) * 2 / min(rates)
    assert not paused["validates"] and "(validation" not in out  # it never validates
    assert paused["cost_changes"] == []
    # with validation every 2 steps, the validations still to come at their recent median length
    validating = root / "validating"
    # (and first order for 50 steps: the second-order steps after them are named, not projected)
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 100, "--meta-batch-size", 2, "--val-every", 2,
                "--val-episodes", 2, "--log-every", 1, "--time-limit", 60, "--run-dir", validating, "--no-progress",
                "--first-order-steps", 50], capsys)[0] == 75
    state = json.loads(run(["status", validating, "--json"], capsys)[1])[0]
    records = RunDir(validating).read_metrics()
    rates = [r["tasks_per_s"] for r in records if "loss" in r]
    lengths = [r["validation_s"] for r in records if "val_mse" in r]
    at = max(r["step"] for r in records if "loss" in r)
    assert lengths and state["validation_counted"]
    assert state["seconds_left"] == pytest.approx(
        (100 - at) * 2 / statistics.median(rates) + (50 - at // 2) * statistics.median(lengths))
    assert state["cost_changes"] == [[50, "second-order meta-steps (slower, and more memory)"]]
    out = run(["status", validating], capsys)[1]
    assert "(validation included)" in out and "  not in that estimate: after step 50, second-order meta-steps" in out
    (root / "damaged").mkdir()
    (root / "damaged" / "config.json").write_text("{not json")
    monkeypatch.setenv("METALEARN_RUNS", str(root))
    code, out, _ = run(["status"], capsys)
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == \
        [str(root / "damaged"), str(done), str(stopped), str(validating)]
    assert f"{root / 'damaged'}: error: " in out and "is not valid JSON" in out
    code, _, err = run(["status", tmp_path], capsys)
    assert code == 2 and "is not a metalearn run directory" in err and len(err.strip().splitlines()) == 1
    # a good run beside a bad one is still shown; the bad one is one error line, and the exit 2
    code, out, err = run(["status", done, tmp_path / "nosuch"], capsys)
    assert code == 2 and out.startswith(f"{done}: ") and err.count("error: ") == 1 and "nosuch" in err
    monkeypatch.setenv("METALEARN_RUNS", str(tmp_path / "none"))
    assert run(["status"], capsys)[1] == f"no runs: METALEARN_RUNS {tmp_path / 'none'} does not exist\n"


def test_progress_bars_only_on_a_terminal_unless_asked(tmp_path, capsys, monkeypatch):
    """Without --progress/--no-progress a bar is drawn only when the error output is a terminal:
    into a log file (nohup, a scheduler) each redraw would be a line. --progress draws it there too."""
    import sys

    from metalearn.cli import show_progress

    options = ["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--no-eval"]
    for flag, terminal, drawn in (([], False, False), (["--progress"], False, True), (["--no-progress"], True, False),
                                  ([], True, True)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal, raising=False)
        assert show_progress(None) is terminal
        run_dir = tmp_path / f"run-{len(flag)}-{terminal}"
        code, out, err = run([*options, *flag, "--run-dir", run_dir], capsys)
        assert code == 0, err
        assert ("2/2" in err) is drawn, (flag, terminal, err)


def test_durations_read_as_hours_minutes_or_seconds():
    from metalearn.cli import format_duration

    assert [format_duration(s) for s in (0, 40.7, 60, 192, 3599, 3600, 31_957)] == [
        "0 s", "40 s", "1 min 0 s", "3 min 12 s", "59 min 59 s", "1 h 0 min", "8 h 52 min"]


def test_progress_is_off_when_the_error_output_is_closed_or_has_no_isatty(monkeypatch):
    """`metalearn train ... 2>&-` leaves sys.stderr None; a replaced stream may lack isatty."""
    import sys

    from metalearn.cli import show_progress

    for stream in (None, object()):
        monkeypatch.setattr(sys, "stderr", stream)
        assert show_progress(None) is False and show_progress(True) is True


def test_status_says_a_run_is_being_tested_while_its_final_test_runs(tmp_path, monkeypatch):
    """train keeps the run folder locked through the test after its last step: status says the
    run is being tested (it said "not tested yet", inviting a second evaluation), and the lock
    is let go after the test."""
    import metalearn.api as api
    from metalearn.cli import format_status

    seen = {}
    original = api._evaluate

    def spy(run_dir, *args, **kwargs):
        seen["status"] = api.run_status(run_dir)
        return original(run_dir, *args, **kwargs)

    monkeypatch.setattr(api, "_evaluate", spy)
    config = api.resolve_config("maml", task={"dataset": "sinusoid"},
                                train={"steps": 2, "meta_batch_size": 2, "eval_episodes": 2, "val_every": 0})
    api.train(config, tmp_path / "r", progress=False, announce=lambda text: None)
    assert seen["status"]["state"] == "testing"
    assert "complete; being tested now by the process that trained it" in format_status(seen["status"])
    assert api.run_status(tmp_path / "r")["state"] == "complete" and not (tmp_path / "r" / ".lock").exists()


def test_the_time_limit_counts_from_the_command_s_start(monkeypatch, capsys, tmp_path):
    """--time-limit is "since the command started": the interpreter's start and the imports
    (seconds on a busy machine, which a scheduler's hard limit counts too) come off it."""
    import subprocess
    import sys

    import metalearn.api
    import metalearn.runtime

    given = {}

    def train(config, **kwargs):
        given["limit"] = kwargs["time_limit_s"]
        return tmp_path, None

    import metalearn.cli

    monkeypatch.setattr(metalearn.api, "train", train)
    monkeypatch.setattr(metalearn.runtime, "process_age_s", lambda: 100.0)

    def command(*args):  # as the `metalearn` command runs it: a process of its own
        import signal

        # a whole process ignores its stop signals once its work is done: put back for the tests after
        previous = {each: signal.getsignal(each) for each in metalearn.cli.STOP_SIGNALS}
        try:
            metalearn.cli.main([str(a) for a in args], whole_process=True)
        except SystemExit as exit:
            return exit.code
        finally:
            for each, handler in previous.items():
                signal.signal(each, handler)
        return 0

    assert command("train", "maml", "--dataset", "sinusoid", "--time-limit", "150", "--no-eval") == 0
    assert given["limit"] == pytest.approx(50.0)
    assert command("train", "maml", "--dataset", "sinusoid", "--time-limit", "60", "--no-eval") == 0
    assert 0 < given["limit"] < 0.01  # already past: stops before its first step, with a checkpoint
    # called in a process that does other things (a notebook, a test): from the call
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--time-limit", "150", "--no-eval"], capsys)
    assert code == 0 and given["limit"] == 150
    # the age itself: a process that slept for half a second before asking
    age = subprocess.run([sys.executable, "-c", "import time; time.sleep(0.5); from metalearn.runtime import "
                          "process_age_s; print(process_age_s())"], capture_output=True, text=True, check=True)
    assert 0.5 <= float(age.stdout) < 60


def test_export_draws_outside_the_run_folder(tmp_path, capsys):
    """An archived run (read-only, or another user's) exports: the plots are drawn elsewhere and
    only copied into OUT_DIR; the run folder is left exactly as it was."""
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--log-every", 1,
                        "--eval-episodes", 4, "--run-dir", run_dir, "--no-progress"], capsys)
    assert code == 0, err
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    code, _, err = run(["export", run_dir, tmp_path / "out"], capsys)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before and not (run_dir / "plots").exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fits.png", "learning_curves.png", "summary.json"]


def test_eval_refuses_a_run_folder_it_cannot_write_before_evaluating(tmp_path, capsys, monkeypatch):
    """A read-only run folder (archived, another user's): refused at once, not after the whole
    evaluation, with what to do; a folder where the file would go is named as such."""
    import errno

    import metalearn.api
    import metalearn.runs
    from metalearn.files import WriteError

    run_dir = tmp_path / "run"
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--meta-batch-size", 2,
                        "--run-dir", run_dir, "--no-progress", "--no-eval"], capsys)
    assert code == 0, err

    def refused(path):  # root may write anywhere: the file system's refusal stood in for
        raise WriteError(path, OSError(errno.EROFS, "Read-only file system"))

    monkeypatch.setattr(metalearn.runs, "probe_writable", refused)
    monkeypatch.setattr(metalearn.api, "_evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    code, _, err = run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
    assert code == 2 and err == (f"error: cannot write {run_dir / 'eval-episodes=2.json'}: Read-only file system: "
                                 "copy the run folder to one you can write and evaluate the copy\n"), err
    monkeypatch.undo()
    monkeypatch.setattr(metalearn.api, "_evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    (run_dir / "eval-episodes=2.json").mkdir()
    code, _, err = run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
    assert code == 2 and err == (f"error: {run_dir / 'eval-episodes=2.json'} is a folder, where metalearn eval "
                                 "writes this evaluation: move it away\n"), err


def test_status_text_and_json_agree_on_a_run_logged_past_its_checkpoint(tmp_path, capsys):
    """A run killed between checkpoints (or training now) logged steps after its last checkpoint:
    the text and --json show the same step, the logged one, with its training time (the
    checkpoint's would read "0 s" until the next checkpoint), and --json's checkpoint_step is the
    step a resume starts from. The time left of a stopped run counts from its checkpoint (a
    resume trains the steps logged after it again), of a live one from the step it logged."""
    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 10, "--meta-batch-size", 2, "--log-every", 1,
                "--val-every", 0, "--no-eval", "--stop-at", 2, "--run-dir", run_dir, "--no-progress"], capsys)[0] == 0
    last = [record for record in RunDir(run_dir).read_metrics() if "loss" in record][-1]
    assert last["step"] == 2 and RunDir(run_dir).read_checkpoint("step")["step"] == 2
    for step in (3, 4, 5):  # as a run killed before its next checkpoint leaves them
        RunDir(run_dir).append_metrics({**last, "step": step, "elapsed_s": 2 * 3600 + 55 + step})
    rates = [record["tasks_per_s"] for record in RunDir(run_dir).read_metrics() if "loss" in record]
    status = json.loads(run(["status", run_dir, "--json"], capsys)[1])[0]
    out = run(["status", run_dir], capsys)[1]
    assert status["state"] == "stopped" and (status["step"], status["checkpoint_step"]) == (5, 2), status
    assert status["training_time_s"] == 2 * 3600 + 60
    assert "  step 5 of 10 (50%, checkpoint at 2), 2 h 1 min of training; stopped; continue with" in out, out
    assert status["steps_left"] == 8
    assert status["seconds_left"] == pytest.approx(8 * 2 / statistics.median(rates))
    assert "  the remaining 8 steps from step 2, the checkpoint's: about " in out, out
    with RunDir(run_dir).lock():  # as the process training it holds it: it goes on from the step it logged
        status = json.loads(run(["status", run_dir, "--json"], capsys)[1])[0]
        out = run(["status", run_dir], capsys)[1]
    assert status["state"] == "training" and (status["step"], status["checkpoint_step"]) == (5, 2), status
    assert "  step 5 of 10 (50%, checkpoint at 2), 2 h 1 min of training; training now" in out, out
    assert status["steps_left"] == 5 and status["seconds_left"] == pytest.approx(5 * 2 / statistics.median(rates))
    assert "  the remaining 5 steps: about " in out, out


def test_status_names_an_evaluation_of_an_earlier_checkpoint(tmp_path, capsys):
    """A run resumed after an evaluation: the evaluation scored an earlier checkpoint, and its
    line says so (export notes it too), so that an old score is not read as the run's."""
    run_dir = tmp_path / "run"
    common = ["--no-progress"]
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--val-every", 0,
                "--no-eval", "--run-dir", run_dir, *common], capsys)[0] == 0
    assert run(["eval", run_dir, "--episodes", 2, *common], capsys)[0] == 0
    assert "tasks, step 2)\n" in run(["status", run_dir], capsys)[1]
    assert run(["train", "maml", "--resume", "--steps", 3, "--no-eval", "--run-dir", run_dir, *common], capsys)[0] == 0
    out = run(["status", run_dir], capsys)[1]
    assert "tasks, step 2, an earlier checkpoint than the run's of step 3)" in out, out


def test_status_names_an_ensemble_of_other_checkpoints_than_the_best_now(tmp_path, capsys):
    """An ensemble scores fixed checkpoints: a run trained on without changing its best ones is not
    outdated by its later step; one whose best checkpoints changed is."""
    from metalearn.api import run_status

    run_dir = tmp_path / "run"
    common = ["--dataset", "sinusoid", "--meta-batch-size", 2, "--val-every", 2, "--val-episodes", 2,
              "--keep-best", 2, "--no-eval", "--run-dir", run_dir, "--no-progress"]
    assert run(["train", "maml", "--steps", 4, *common], capsys)[0] == 0
    assert run(["eval", run_dir, "--ensemble", "--episodes", 2, "--no-progress"], capsys)[0] == 0
    assert run(["train", "maml", "--steps", 5, "--resume", *common], capsys)[0] == 0  # no validation at step 5
    (evaluation,) = run_status(run_dir)["evaluations"].values()
    assert evaluation["ensemble"] == [2, 4] or evaluation["ensemble"] == [4, 2], evaluation
    assert evaluation["outdated"] is False and evaluation["step"] == 4
    out = run(["status", run_dir], capsys)[1]
    assert "tasks, step 4)\n" in out, out
    path = next(run_dir.glob("eval-ensemble=*.json"))
    path.write_text(json.dumps({**json.loads(path.read_text()), "ensemble": [2]}))  # as if best/ had changed since
    assert run_status(run_dir)["evaluations"][path.stem]["outdated"] is True
    out = run(["status", run_dir], capsys)[1]
    assert "tasks, step 4, other checkpoints than the run's best now)" in out, out


def test_status_json_is_always_json(tmp_path, capsys, monkeypatch):
    """A script piping `status --json` to a JSON reader gets a list also when there is nothing to
    show: no runs in the runs folder, or only named folders that are no runs (said on stderr)."""
    monkeypatch.setenv("METALEARN_RUNS", str(tmp_path / "empty"))
    code, out, err = run(["status", "--json"], capsys)
    assert code == 0 and json.loads(out) == [] and f"METALEARN_RUNS {tmp_path / 'empty'} does not exist" in err
    code, out, err = run(["status", "--json", tmp_path / "nothing"], capsys)
    assert code == 2 and json.loads(out) == [] and err.startswith("error: ")


def test_an_option_before_the_method_says_where_options_go(capsys):
    code, _, err = run(["train", "--dataset", "omniglot", "protonet"], capsys)
    assert code == 2 and err == ("error: No such option '--dataset': the options come after the method, metalearn train "
                                 "METHOD [OPTIONS]. (see metalearn train --help)\n"), err


def test_eval_ensemble_names_the_file_of_the_checkpoints_it_averaged(tmp_path, capsys, monkeypatch):
    """The file's name counts the checkpoints averaged: a training run that kept one more while the
    evaluation read best/ gets the file of that count named, not the count seen before."""
    import metalearn.runs

    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 4, "--meta-batch-size", 2, "--val-every", 2,
                "--val-episodes", 2, "--keep-best", 3, "--no-eval", "--run-dir", run_dir, "--no-progress"],
               capsys)[0] == 0
    real = metalearn.runs.RunDir.read_best_checkpoints

    def one_more(self, load):  # as if a third checkpoint had entered best/ after the count was taken
        members = real(self, load)
        return [*members, (members[0][0], members[0][1], 99)]

    monkeypatch.setattr(metalearn.runs.RunDir, "read_best_checkpoints", one_more)
    code, out, err = run(["eval", run_dir, "--ensemble", "--episodes", 2, "--no-progress"], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == f"written to {run_dir / 'eval-ensemble=3-episodes=2.json'}", out
    saved = json.loads((run_dir / "eval-ensemble=3-episodes=2.json").read_text())
    assert len(saved["ensemble"]) == 3 and saved["ensemble"][-1] == 99


@pytest.mark.parametrize("args, message", [
    (["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--run-dir", ""], "--run-dir is empty; give a folder path"),
    (["train", "maml", "--dataset", "sinusoid", "--steps", 1, "--init-from", ""], "--init-from is empty; give a run folder"),
    (["train", "maml", "--dataset", "folder", "--split-file", ""], "--split-file is empty; give a JSON file"),
    (["train", "maml", "--data-dir", ""], "--data-dir is empty; give a folder path"),
    (["eval", ""], "RUN_DIR is empty; give a run folder"),
    (["eval", "RUN", "--split-file", " "], "--split-file is empty; give a JSON file"),
    (["export", "RUN", ""], "OUT_DIR is empty; give a folder path"),
    (["plot", "RUN", "--compare", ""], "--compare is empty; give a run folder"),
    (["sample", "RUN", "--support", ""], "--support is empty; give an image file or folder"),
    (["sample", "RUN", "--support", "x.png", "--out", ""], "--out is empty; give a file path"),
    (["predict", "RUN", "--support", "", "--query", "q"], "--support is empty; give an image file or folder"),
    (["predict", "RUN", "--support", "s", "--query", "q", "--csv", ""], "--csv is empty; give a file path"),
    (["compare", "RUN", "", "--episodes", 2], "one of RUN_DIRS is empty; give a run folder"),
    (["compare", "RUN", "--json", ""], "--json is empty; give a file path"),
    (["status", "RUN", ""], "one of RUN_DIRS is empty; give a run folder"),
    (["data", "info", "--data-dir", ""], "--data-dir is empty; give a folder path"),
])
def test_an_empty_path_is_refused_not_read_as_the_current_folder(tmp_path, capsys, monkeypatch, args, message):
    """click.Path turns '' into Path('.'): a run, an export or a read would land in the current
    folder unasked. Every path option and argument refuses it, naming the option, before any work."""
    monkeypatch.chdir(tmp_path)
    code, out, err = run(args, capsys)
    assert (code, out, err) == (2, "", f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_a_set_without_an_option_name_is_refused(tmp_path, capsys):
    for setting in ("=5", " =5", "test_inner_steps"):
        for command in (["eval", tmp_path], ["compare", tmp_path]):
            code, _, err = run([*command, "--set", setting], capsys)
            assert (code, err) == (2, f"error: --set {setting}: give OPTION=VALUE, e.g. --set test_inner_steps=10\n")


def test_sample_num_out_of_range_is_one_wording(tmp_path, capsys):
    for num in (0, -3, 1001, 10**20):
        code, _, err = run(["sample", tmp_path, "--support", tmp_path, "--num", num], capsys)
        assert (code, err) == (2, f"error: --num must be a whole number from 1 to 1000, got {num}\n")


def test_status_of_values_that_cannot_be_shown(tmp_path, capsys, monkeypatch):
    """A metrics line with a time of Infinity (or NaN) reads "?" and prints standard JSON (null),
    and a run whose status cannot be formatted is its one error line: it hides no other run."""
    from metalearn.cli import format_duration

    assert [format_duration(s) for s in (float("inf"), float("nan"), -5)] == ["?", "?", "?"]
    root = tmp_path / "runs"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--val-every", 0,
                "--no-eval", "--run-dir", root / "a", "--no-progress"], capsys)[0] == 0
    shutil.copytree(root / "a", root / "b")
    with open(root / "a" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 31, "loss": NaN, "elapsed_s": Infinity}\n')
    code, out, err = run(["status", root / "a"], capsys)
    assert code == 0 and "step 31 of 2 (1550%, checkpoint at 2), " in out, err
    with open(root / "b" / "metrics.jsonl", "a") as metrics:  # a training accuracy (a fraction) reads in percent
        metrics.write('{"step": 3, "loss": 0.5, "accuracy": 0.9375}\n')
    assert "last logged (step 3): loss 0.5, accuracy 93.75%\n" in run(["status", root / "b"], capsys)[1]

    def reject(text):
        raise AssertionError(f"not standard JSON: {text}")

    code, out, _ = run(["status", root / "a", root / "b", "--json"], capsys)
    statuses = json.loads(out, parse_constant=reject)
    assert code == 0 and statuses[0]["last"] == {"step": 31, "loss": None, "elapsed_s": None}
    import metalearn.cli

    real = metalearn.cli.format_status

    def broken_for_a(status):
        if status["run"] == str(root / "a"):
            raise OverflowError("cannot convert float infinity to integer")
        return real(status)

    monkeypatch.setattr(metalearn.cli, "format_status", broken_for_a)
    monkeypatch.setenv("METALEARN_RUNS", str(root))
    code, out, err = run(["status"], capsys)
    assert code == 0 and out.startswith(f"{root / 'a'}: error: a record holds a value that cannot be shown "
                                        "(cannot convert float infinity to integer)\n"), out
    assert f"{root / 'b'}: maml on sinusoid" in out and err == ""
    code, out, err = run(["status", root / "a", root / "b"], capsys)  # named: an error line and exit 2
    assert code == 2 and out.startswith(f"{root / 'b'}: maml on sinusoid") and str(root / "a") not in out
    assert err == (f"error: {root / 'a'}: a record holds a value that cannot be shown (cannot convert float "
                   "infinity to integer)\n")
    # a run folder that refuses to be read (chmod 000, as another user's) is its own error line
    # of the listing, not the listing's end
    monkeypatch.undo()
    monkeypatch.setenv("METALEARN_RUNS", str(root))
    real_is_file = Path.is_file

    def unreadable_a(path):
        if path.parent == root / "a":
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_file(path)

    monkeypatch.setattr(Path, "is_file", unreadable_a)
    code, out, err = run(["status"], capsys)
    assert code == 0 and out.startswith(f"{root / 'a'}: error: {root / 'a' / 'config.json'}: Permission denied\n")
    assert f"{root / 'b'}: maml on sinusoid" in out and err == ""


def test_a_closed_output_stops_no_training(tmp_path, capsys, monkeypatch):
    """With its output's reader gone, train still trains, saves and tests, says nothing of the
    pipe, and exits with the status of its work."""
    import sys

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 3, "--meta-batch-size", 2, "--val-every",
                        0, "--eval-episodes", 2, "--run-dir", tmp_path / "run", "--no-progress"], capsys)
    assert (code, err) == (0, "")
    assert RunDir(tmp_path / "run").read_checkpoint()["step"] == 3 and (tmp_path / "run" / "eval.json").is_file()
    assert isinstance(sys.stdout, ClosedPipe)  # the command's own stream is given back
    code, _, err = run(["eval", tmp_path / "nosuch"], capsys)  # a mistake is still said, on the error output
    assert code == 2 and err.startswith("error: ")


def test_an_output_that_cannot_be_written_stops_no_training_and_is_said_at_the_end(tmp_path, capsys, monkeypatch):
    """A full disk under the progress bar (the error output) loses no step: training goes on,
    saves and tests. Under the standard output, the work is done too, and the command ends
    with exit 2 and a line saying that what it printed is incomplete."""
    import sys

    train = ["train", "maml", "--dataset", "sinusoid", "--steps", 3, "--meta-batch-size", 2, "--val-every", 0,
             "--eval-episodes", 2, "--progress"]
    monkeypatch.setattr(sys, "stderr", FullDisk())
    code, out, _ = run([*train, "--run-dir", tmp_path / "bar"], capsys)
    assert code == 0 and "run directory:" in out
    assert RunDir(tmp_path / "bar").read_checkpoint()["step"] == 3 and (tmp_path / "bar" / "eval.json").is_file()
    monkeypatch.undo()
    monkeypatch.setattr(sys, "stdout", FullDisk())
    code, _, err = run([*train, "--run-dir", tmp_path / "out"], capsys)
    assert code == 2 and (tmp_path / "out" / "eval.json").is_file()
    assert err.splitlines()[-1] == ("error: could not write the standard output (No space left on device); the "
                                    "command's work is done, what it printed is incomplete")
    code, _, err = run(["status", tmp_path / "out", "--json"], capsys)  # the output is the work: lost, said
    assert code == 2 and "could not write the standard output" in err
    code, _, err = run(["eval", tmp_path / "nosuch"], capsys)  # an error of the command's own keeps its line
    assert code == 2 and err.startswith("error: ") and "standard output" not in err


def test_a_closed_pipe_in_a_real_process_is_quiet(tmp_path):
    """The process itself: no message at exit, where Python would flush into the closed pipe."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    errors = tmp_path / "stderr"  # a file, which never fills up as an unread pipe would
    with errors.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "metalearn", "train", "maml", "--dataset", "sinusoid",
                                    "--steps", "2", "--meta-batch-size", "2", "--val-every", "0", "--eval-episodes", "2",
                                    "--run-dir", str(run_dir), "--no-progress"], stdout=subprocess.PIPE, stderr=stderr)
        process.stdout.close()  # the reader leaves before the first line
        assert process.wait(timeout=120) == 0
    assert errors.read_bytes() == b"" and (run_dir / "eval.json").is_file()


def test_an_option_that_may_be_none_is_set_back_to_none_with_none(capsys, omniglot_data_dir):
    """--test-shots none: the test episodes follow --shots again, where the method's defaults (the
    Neural Statistician tests on 1 shot) set a number; leaving the flag out cannot say that."""
    def test_shots(*given):
        code, out, err = run(["train", "statistician", "--data-dir", omniglot_data_dir, *given, "--print-config"],
                             capsys)
        assert code == 0, err
        return json.loads(out)["task"]["test_shots"]

    assert test_shots() == 1 and test_shots("--test-shots", 3) == 3
    assert test_shots("--test-shots", "none") is None and test_shots("--test-shots", "None") is None
    code, _, err = run(["train", "maml", "--test-shots", "nope", "--print-config"], capsys)
    assert code == 2 and "'nope' is not a valid integer" in err
    code, out, _ = run(["train", "maml", "--help"], capsys)
    assert "--test-shots INTEGER|none" in out


def test_an_eof_error_is_a_file_that_ended_early_not_an_interruption(monkeypatch, capsys):
    """click turns an EOFError into the Abort of a Ctrl-C: a reader's EOFError (an empty file)
    is one error line with exit 2, not 'interrupted' with 130."""
    import metalearn.cli

    def ended(*args, **kwargs):
        raise EOFError("No data left in file")

    import metalearn.runs

    monkeypatch.setattr(metalearn.runs, "default_runs_root", ended)  # inside the command: click's Abort
    code, _, err = run(["status"], capsys)
    assert code == 2 and err.strip().splitlines()[-1] == (
        "error: a file ended before its end (EOFError: No data left in file)"), err
    monkeypatch.setattr(metalearn.cli, "load_plugins", ended)  # before click: the EOFError itself
    code, _, err = run(["status"], capsys)
    assert code == 2 and err.strip() == "error: a file ended before its end (EOFError: No data left in file)", err


def test_a_score_s_warnings_go_to_the_error_output_once_and_the_score_alone_to_the_output(tmp_path, capsys):
    """Diverged episodes are warned of on stderr, once, as every warning (the library's
    MetalearnWarning, spelled with the command line's flags): a script that reads eval's output
    reads the score. So after train's test, and for compare."""
    run_dir = tmp_path / "run"
    assert run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--val-every", 0,
                "--no-progress", "--no-eval", "--run-dir", run_dir], capsys)[0] == 0
    code, out, err = run(["eval", run_dir, "--set", "inner_lr=1e6", "--episodes", 4, "--no-progress"], capsys)
    assert code == 0, err
    assert "warning:" not in out and out.startswith("MSE nan"), out
    said = ("warning: 4 of 4 episodes diverged (non-finite score); try fewer test-time steps, e.g. --set "
            "test_inner_steps=1")
    assert err.count("diverged") == 1 and said in err.splitlines(), err
    code, out, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 0, "--inner-lr", 1e6, "--eval-episodes",
                          4, "--no-progress", "--run-dir", tmp_path / "untrained"], capsys)
    assert code == 0, err
    assert "warning:" not in out and "MSE nan" in out, out
    assert err.count("diverged") == 1 and said in err.splitlines(), err
    code, out, err = run(["compare", run_dir, "--set", "inner_lr=1e6", "--episodes", 4], capsys)
    assert code == 0, err
    assert "warning:" not in out and err.count("diverged") == 1, err
    assert f"warning: 4 of 4 episodes of {run_dir.name} diverged (non-finite predictions), which makes its measures " \
        "NaN; try fewer test-time steps, e.g. --set test_inner_steps=1" in err.splitlines(), err


def test_a_sigterm_that_a_library_turned_into_its_own_error_still_ends_as_a_sigterm(monkeypatch, capsys):
    """matplotlib's drawing, called back into Python, turns the SIGTERM's exception into a
    ValueError: recorded by the handler, it ends with 143 and one line, not exit 1 and a
    traceback. Once a whole process's command is done, a SIGTERM is ignored: the second of the
    interpreter's shut-down would otherwise end a finished job with 143 and no word."""
    import signal

    import metalearn.cli
    import metalearn.runs

    def drawing(*args, **kwargs):
        metalearn.cli._STOP_SIGNAL_RECEIVED = signal.SIGTERM  # as the handler records it, before raising
        raise ValueError("Invalid affine transformation matrix")

    def whole_process(args):  # as the `metalearn` command runs: its stop signals' handlers put back after
        previous = {each: signal.getsignal(each) for each in metalearn.cli.STOP_SIGNALS}
        try:
            metalearn.cli.main(args, whole_process=True)
        except SystemExit as exit:
            return exit.code, signal.getsignal(signal.SIGTERM)
        finally:
            for each, handler in previous.items():
                signal.signal(each, handler)

    monkeypatch.setattr(metalearn.runs, "default_runs_root", drawing)
    code, after = whole_process(["status"])
    assert code == 143 and capsys.readouterr().err.strip() == "terminated (SIGTERM)"
    assert after is signal.SIG_IGN  # the work done: a SIGTERM while the interpreter shuts down is ignored
    monkeypatch.setattr(metalearn.runs, "default_runs_root", lambda: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):  # the next command's error is its own, no earlier SIGTERM's
        whole_process(["status"])
