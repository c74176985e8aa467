"""The run directory: metrics that survive a kill mid-line, what counts as a run, and files
written whole or not at all."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import cli_runner
from metalearn.cli import main
from metalearn.errors import MetalearnError
from metalearn.files import WriteError
from metalearn.runs import RunDir, atomic_write, atomic_write_bytes


def test_a_metrics_line_cut_short_by_a_kill_is_dropped_and_resume_writes_on_cleanly(tmp_path):
    run = RunDir(tmp_path)
    for step in range(1, 8):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    run.append_metrics({"step": 6, "val_mse": 0.5})  # validation records share the steps
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 7, "lo')  # the kill came in the middle of a write: no closing brace, no newline
    records = run.read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 6]
    assert records[2] == {"step": 3, "loss": 1 / 3} and records[-1] == {"step": 6, "val_mse": 0.5}
    # resuming from the checkpoint of step 5 drops the later records and the broken line, so the
    # next record starts a line of its own instead of being glued to the cut one (and lost)
    inode = os.stat(run.metrics_path).st_ino
    run.truncate_metrics(5)
    assert os.stat(run.metrics_path).st_ino == inode  # cut in place: `tail -f` goes on following it
    run.append_metrics({"step": 6, "loss": 0.25})
    assert run.read_metrics() == [*records[:5], {"step": 6, "loss": 0.25}]
    assert run.metrics_path.read_text().endswith('{"step": 6, "loss": 0.25}\n')


def test_truncating_the_metrics_cuts_the_file_in_place_and_writes_nothing_where_nothing_must_go(tmp_path):
    run = RunDir(tmp_path)
    run.truncate_metrics(3)
    assert not run.metrics_path.exists()  # no file: none made
    lines = ['{"step": 1, "loss": 1.0}\n', "a note of the user's own\n", '{"step": 2, "loss": 0.5}\n',
             '{"step": 2, "val_mse": 0.4}\n']
    run.metrics_path.write_text("".join(lines))
    before = os.stat(run.metrics_path)
    for step in (2, 3):  # nothing past the step: not even opened for writing
        run.truncate_metrics(step)
        after = os.stat(run.metrics_path)
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert run.metrics_path.read_text() == "".join(lines)
    # a line that is no record stays (read as before: skipped); the cut is at the first record past the step
    run.truncate_metrics(1)
    assert os.stat(run.metrics_path).st_ino == before.st_ino and run.metrics_path.read_text() == "".join(lines[:2])
    # a last line cut just before its newline holds a whole record: kept, and given its newline
    run.metrics_path.write_text("".join(lines) + '{"step": 3, "loss": 0.25}')
    run.truncate_metrics(3)
    assert run.metrics_path.read_text() == "".join(lines) + '{"step": 3, "loss": 0.25}\n'
    run.metrics_path.write_text("".join(lines) + '{"step": 3, "loss": 0.25}')
    run.truncate_metrics(2)  # ... unless it is past the step
    assert run.metrics_path.read_text() == "".join(lines)


def test_truncating_the_metrics_never_writes_through_a_link(tmp_path):
    target = tmp_path / "elsewhere.jsonl"
    target.write_text('{"step": 1}\n{"step": 2}\n')
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics_path.symlink_to(target)
    with pytest.raises(WriteError, match="it is a symbolic link, which metalearn does not write through"):
        run.truncate_metrics(1)
    assert target.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_resume_keeps_the_metrics_file_and_cuts_only_the_steps_after_its_checkpoint(tmp_path, capsys):
    """A pause (--stop-at) leaves nothing to drop: the resume appends to the same file, its
    bytes untouched. A kill after logging steps its checkpoint does not hold: the resume cuts
    them, and the cut line, off the same file, and logs those steps again."""
    run_dir = tmp_path / "run"
    train = ["train", "maml", "--run-dir", run_dir, "--steps", 4, *TINY_RUN]
    code, _, err = cli_runner.run([*train, "--stop-at", 2], capsys)
    assert code == 0, err
    metrics = run_dir / "metrics.jsonl"
    inode, paused = os.stat(metrics).st_ino, metrics.read_bytes()
    assert [r["step"] for r in RunDir(run_dir).read_metrics()] == [1, 2]
    code, _, err = cli_runner.run([*train, "--resume", "--stop-at", 3], capsys)
    assert code == 0, err
    assert os.stat(metrics).st_ino == inode and metrics.read_bytes().startswith(paused)
    assert [r["step"] for r in RunDir(run_dir).read_metrics()] == [1, 2, 3]
    # as a kill would leave it: step 4 logged after the checkpoint of step 3, and a line cut short
    with open(metrics, "a") as f:
        f.write('{"step": 4, "loss": 123.0}\n{"step": 4, "val_mse": 1')
    code, _, err = cli_runner.run([*train, "--resume"], capsys)
    assert code == 0, err
    records = RunDir(run_dir).read_metrics()
    assert os.stat(metrics).st_ino == inode and [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["loss"] != 123.0 and metrics.read_text().count("\n") == 4


def test_no_metrics_file_reads_as_no_records(tmp_path):
    assert RunDir(tmp_path / "fresh").read_metrics() == []


@pytest.mark.parametrize("trace", ["checkpoint.pt", "metrics.jsonl"])
def test_any_trace_of_a_started_run_holds_the_folder(tmp_path, trace):
    """A new run must not start over a folder holding either (e.g. a run whose config was lost
    still has its checkpoint): each alone is enough. config.json alone is a run that never
    started (it is written just before the first checkpoint): it does not hold the folder."""
    run = RunDir(tmp_path)
    assert not run.holds_run()
    (tmp_path / "notes.txt").write_text("a folder of the user's own")
    (tmp_path / "plots").mkdir()
    (tmp_path / "config.json").write_text("{}")
    assert not run.holds_run() and run.never_started()
    (tmp_path / trace).write_text("{}")
    assert run.holds_run() and not run.never_started()


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "eval.json"
    atomic_write_bytes(path, b'{"mean": 1.0}\n')

    def failing_write(f):
        f.write(b'{"mean": 2.')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteError, match=r"cannot write .*eval.json: No space left on device \(.* free there\); "
                                         "the previous eval.json is unchanged"):
        atomic_write(path, failing_write)
    assert path.read_bytes() == b'{"mean": 1.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]  # the .tmpPID file is gone
    atomic_write_bytes(path, b'{"mean": 2.0}\n')  # and the next write replaces it whole
    assert json.loads(path.read_text()) == {"mean": 2.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_checkpoint_round_trip_and_a_damaged_one_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path)
    run.write_checkpoint({"step": 3, "weights": torch.arange(4.0)})
    state = run.read_checkpoint()
    assert state["step"] == 3 and torch.equal(state["weights"], torch.arange(4.0))
    run.checkpoint_path.write_bytes(run.checkpoint_path.read_bytes()[:40])  # cut short outside atomic_write
    with pytest.raises(MetalearnError, match="checkpoint.pt is unreadable"):
        run.read_checkpoint()


# -- damaged or foreign files and diverged runs: one line, exit code 2, no traceback -----------


TINY_RUN = ["--dataset", "sinusoid", "--meta-batch-size", 2, "--log-every", 1, "--no-progress", "--no-eval"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished two-step MAML sinusoid run; tests copy it before damaging anything."""
    path = tmp_path_factory.mktemp("tiny") / "run"
    main([str(a) for a in ["train", "maml", "--steps", 2, "--run-dir", path, *TINY_RUN]])
    return path


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def refused(code: int, err: str, *messages: str) -> None:
    """Exit code 2 and one line of error holding every one of ``messages``."""
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1, err
    for message in messages:
        assert message in err, err


def test_an_update_that_makes_the_weights_non_finite_stops_before_their_checkpoint(tmp_path, capsys):
    """A finite gradient times a huge --meta-lr overflows to inf weights with a finite loss: the
    step stops there, so the checkpoint kept is the one from before it, and it evaluates."""
    run_dir = tmp_path / "run"
    code, _, err = cli_runner.run(["train", "maml", "--steps", 3, "--checkpoint-every", 1, "--meta-optimizer", "sgd",
                        "--meta-lr", 3e38, "--inner-lr", 1, "--run-dir", run_dir, *TINY_RUN], capsys)
    refused(code, err, "the update made the parameters non-finite at step 1",
            "the last good checkpoint in", "training stopped before saving it", "smaller --meta-lr")
    state = RunDir(run_dir).read_checkpoint()
    assert state["step"] == 0
    assert all(torch.isfinite(w).all() for w in state["learner"].values())


def test_eval_and_resume_refuse_a_checkpoint_with_non_finite_weights(tiny_run, tmp_path, capsys):
    run_dir = copy_of(tiny_run, tmp_path)
    state = RunDir(run_dir).read_checkpoint()
    name = next(iter(state["learner"]))
    state["learner"][name].view(-1)[0] = float("nan")  # saved by a version that did not check its updates
    RunDir(run_dir).write_checkpoint(state)
    message = f"the checkpoint in {run_dir} holds non-finite weights ({name})"
    refused(*cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)[::2], message, "smaller --meta-lr")
    refused(*cli_runner.run(["train", "maml", "--resume", "--run-dir", run_dir, "--steps", 4, "--no-progress"], capsys)[::2],
            message)
    assert not RunDir(run_dir).eval_file({"episodes": 2}).exists()


@pytest.mark.parametrize("content", ["a dict of its own", "a tensor", "random bytes", "cut in half"])
def test_eval_refuses_a_checkpoint_that_is_not_a_metalearn_one_in_one_line(tiny_run, tmp_path, capsys, content):
    run_dir = copy_of(tiny_run, tmp_path)
    path = run_dir / "checkpoint.pt"
    if content == "a dict of its own":
        torch.save({"foo": 1}, path)
    elif content == "a tensor":
        torch.save(torch.zeros(3), path)
    elif content == "random bytes":
        path.write_bytes(os.urandom(4096))
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
    refused(code, err, f"{path} is unreadable", "truncated, corrupt or not a metalearn checkpoint",
            "Put back the run's own checkpoint.pt, or train the run again")
    assert "weights_only" not in err


@pytest.mark.parametrize("text", ['{"mean": 0.5, "ci95"', "5"])
def test_export_refuses_a_damaged_eval_json_and_writes_nothing(tiny_run, tmp_path, capsys, text):
    run_dir = copy_of(tiny_run, tmp_path)
    (run_dir / "eval.json").write_text(text)
    code, _, err = cli_runner.run(["export", run_dir, tmp_path / "out"], capsys)
    refused(code, err, f"{run_dir / 'eval.json'} ", f"delete it or rerun `metalearn eval {run_dir}`")
    assert not (tmp_path / "out").exists()


def test_export_records_the_checkpoints_step_not_steps_logged_after_it(tiny_run, tmp_path, capsys, monkeypatch):
    """A run training (or killed) past its last checkpoint has logged steps that the checkpoint
    does not hold, and a resume drops: the summary is of the checkpoint's step alone."""
    run_dir = copy_of(tiny_run, tmp_path)
    step = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write(json.dumps({"step": step + 10, "loss": 0.5, "tasks_per_s": 1.0, "elapsed_s": 9.0}) + "\n")
        file.write(json.dumps({"step": step + 10, "val_mse": 0.1, "val_ci95": 0.01}) + "\n")
    import metalearn.plotting

    drawn = []
    real = metalearn.plotting.plot_learning_curves
    monkeypatch.setattr(metalearn.plotting, "plot_learning_curves",
                        lambda records, *args: (drawn.append(max(r["step"] for r in records)), real(records, *args))[1])
    code, out, err = cli_runner.run(["export", run_dir, tmp_path / "out"], capsys)
    assert code == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["step"] == step and summary["last_train_metrics"]["step"] == step
    assert all(record["step"] <= step for record in summary["validation"])
    assert max(point["last_step"] for point in summary["training_curve"]["points"]) <= step
    assert drawn == [step]  # the exported curves too


def test_a_folder_that_never_trained_has_nothing_to_plot(tiny_run, tmp_path, capsys):
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    shutil.copy(tiny_run / "config.json", run_dir / "config.json")
    code, _, err = cli_runner.run(["plot", run_dir], capsys)
    refused(code, err, f"{run_dir} has not trained yet (no metrics, no checkpoint): nothing to draw")


def test_a_run_without_metrics_exports_its_evaluations_and_has_nothing_to_plot(tiny_run, tmp_path, capsys):
    """A --steps 0 baseline (or a run stopped before its first logged step) has no curve: plot
    says so; export records its step and evaluations, without plots."""
    run_dir = copy_of(tiny_run, tmp_path)
    (run_dir / "metrics.jsonl").unlink()
    code, _, err = cli_runner.run(["plot", run_dir], capsys)
    refused(code, err, "has no metrics yet (no step logged: a --steps 0 run")
    code, out, err = cli_runner.run(["export", run_dir, tmp_path / "out"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["validation"] == [] and summary["step"] >= 1 and "evaluations" in summary


def test_export_into_the_runs_own_plots_folder_keeps_the_plots(tiny_run, tmp_path, capsys):
    """The plots already in place are left as they are (no copy of a file onto itself), and the
    summary is written beside them."""
    run_dir = copy_of(tiny_run, tmp_path)
    code, _, err = cli_runner.run(["export", run_dir, run_dir / "plots"], capsys)
    assert code == 0, err
    plots = run_dir / "plots"
    assert (plots / "summary.json").is_file() and (plots / "learning_curves.png").stat().st_size > 0
    assert not list(plots.glob("*.tmp*"))


def test_export_notes_an_evaluation_of_another_step_and_a_plot_it_did_not_write(tiny_run, tmp_path, capsys):
    run_dir = copy_of(tiny_run, tmp_path)
    # an evaluation of step 1's model; the run trained on after it
    (run_dir / "eval.json").write_text(json.dumps({"metric": "mse", "mean": 1.5, "ci95": 0.1, "step": 1}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "samples.png").write_bytes(b"another run's plot")
    code, _, err = cli_runner.run(["export", run_dir, out], capsys)
    assert code == 0, err
    assert err.splitlines() == [
        f"note: eval scored the model of step 1, not the exported step 2: evaluate {run_dir} again for a "
        "record of one step",
        f"note: {out / 'samples.png'} was not written by this export (from another run or drawn separately?)"]
    assert (out / "samples.png").read_bytes() == b"another run's plot"  # noted, not deleted
    assert json.loads((out / "summary.json").read_text())["step"] == 2
    # a step that is no whole number (a hand edit) is no step to note, not a traceback after the record
    (run_dir / "eval.json").write_text(json.dumps({"metric": "mse", "mean": 1.5, "ci95": 0.1, "step": "abc"}))
    code, _, err = cli_runner.run(["export", run_dir, tmp_path / "out-abc"], capsys)
    assert code == 0 and err == "", err
    # an ensemble averages fixed checkpoints: noted only when the run keeps other best ones now
    (run_dir / "eval.json").unlink()
    RunDir(run_dir).keep_best({"step": 1}, 0.5, keep=1, higher_is_better=True)
    ensemble = {"metric": "mse", "mean": 1.4, "ci95": 0.1, "step": 1, "ensemble": [1]}
    (run_dir / "eval-ensemble=1.json").write_text(json.dumps(ensemble))
    code, _, err = cli_runner.run(["export", run_dir, tmp_path / "out2"], capsys)
    assert code == 0 and err == "", err
    (run_dir / "eval-ensemble=1.json").write_text(json.dumps({**ensemble, "ensemble": [0]}))
    code, _, err = cli_runner.run(["export", run_dir, tmp_path / "out3"], capsys)
    assert err.splitlines() == [f"note: eval-ensemble=1 averaged the checkpoints of steps [0], not the run's best "
                                f"now ([1]): evaluate {run_dir} --ensemble again"]


def test_metrics_lines_that_are_no_record_are_skipped_and_a_damaged_config_is_one_line(tiny_run, tmp_path):
    run_dir = copy_of(tiny_run, tmp_path)
    run = RunDir(run_dir)
    records = run.read_metrics()
    with open(run.metrics_path, "ab") as f:
        f.write(b'5\n[1, 2]\n"loss"\n\xff\xfe garbage \x00\n')  # JSON that is no object, and no text at all
    run.append_metrics({"step": 3, "loss": 0.5})
    assert run.read_metrics() == [*records, {"step": 3, "loss": 0.5}]
    lines = run.iter_metrics()  # one line at a time (status keeps what it needs of a long log)
    assert next(lines) == records[0] and list(lines) == [*records[1:], {"step": 3, "loss": 0.5}]
    from metalearn.plotting import plot_learning_curves

    plot_learning_curves(run.read_metrics(), tmp_path / "curves.png", "tiny")  # plot no longer meets a bare 5
    run.append_metrics({"step": 4, "val_mse": "x", "loss": None})  # values that are no number
    run.append_metrics({"step": "5", "loss": 0.4})
    plot_learning_curves(run.read_metrics(), tmp_path / "curves.png", "tiny")
    run.config_path.write_bytes(b"\xff\xfe\x00\x01 not JSON")
    with pytest.raises(MetalearnError, match="config.json is not valid JSON .*put back the run's own config.json"):
        run.read_config()
    run.config_path.write_text("[]")
    with pytest.raises(MetalearnError, match="config.json holds a JSON array"):
        run.read_config()


def test_resuming_a_run_as_another_method_names_the_method_it_is(tiny_run, tmp_path, capsys):
    run_dir = copy_of(tiny_run, tmp_path)
    before = (run_dir / "config.json").read_text()
    for other in ("protonet", "reptile"):
        code, _, err = cli_runner.run(["train", other, "--resume", "--run-dir", run_dir, "--no-progress"], capsys)
        refused(code, err, f"{run_dir} is a maml run, not {other}",
                f"`metalearn train maml --resume --run-dir {run_dir}`")
    assert (run_dir / "config.json").read_text() == before


def damage_entry(run_dir: Path, entry: str, value) -> None:
    """Replace the ``entry`` of the run's checkpoint.pt by ``value`` (a hand edit, another tool)."""
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state[entry] = value
    torch.save(state, path)


RESUME = ["train", "maml", "--resume", "--steps", 4, "--no-progress", "--no-eval"]


@pytest.mark.parametrize("entry, value, said", [
    ("optimizer", {"bad": 1}, "its optimizer does not load: KeyError: 'param_groups'"),
    ("scheduler", None, "its scheduler is None, not a schedule's state"),
    ("torch_rng", torch.zeros(3, dtype=torch.uint8), "its torch_rng does not load: RuntimeError: "),
    ("elapsed_s", "abc", "its elapsed_s is 'abc', not a number of seconds"),
    ("machines", [1, 2], "its machines is [1, 2], not a list of machine records"),
    ("machines", 5, "its machines is 5, not a list of machine records"),
    ("config", "abc", "its config is 'abc', not a run configuration"),
    ("data_fingerprint", 5, "its data_fingerprint is 5, not a fingerprint (a string)"),
    ("data_dir", 5, "its data_dir is 5, not a folder's path (a string)"),
])
def test_a_checkpoint_entry_of_the_wrong_kind_is_refused_in_one_line_by_the_commands_that_read_it(
        tiny_run, tmp_path, capsys, entry, value, said):
    """An entry that is there but holds a value of another kind is an unreadable checkpoint,
    named with the entry, where it is read: resume reads them all, status the step, training
    time and machines, eval the step, config, learner and data fingerprint (with the weights it
    belongs to). What a command does not read does not refuse it, and a refused resume leaves the
    checkpoint as it was."""
    run_dir = copy_of(tiny_run, tmp_path)
    damage_entry(run_dir, entry, value)
    path = run_dir / "checkpoint.pt"
    before = path.read_bytes()
    unreadable = (f"{path} is unreadable ({said}", "truncated, corrupt or not a metalearn checkpoint")
    if entry != "data_dir":  # an image folder's path: a resume of this run (of Omniglot) neither reads nor keeps it
        refused(*cli_runner.run([*RESUME, "--run-dir", run_dir], capsys)[::2], *unreadable)
        assert path.read_bytes() == before
    code, _, err = cli_runner.run(["status", run_dir], capsys)
    if entry in ("elapsed_s", "machines", "data_dir"):
        refused(code, err, *unreadable)
    else:
        assert code == 0, err
    code, _, err = cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
    if entry in ("config", "data_fingerprint", "data_dir"):
        refused(code, err, *unreadable)
    else:
        assert code == 0, err


def test_a_checkpoint_config_with_a_bad_value_is_named_as_the_checkpoints(tiny_run, tmp_path, capsys):
    """The configuration inside checkpoint.pt, not config.json (where the user would look)."""
    run_dir = copy_of(tiny_run, tmp_path)
    config = torch.load(run_dir / "checkpoint.pt", weights_only=True)["config"]
    damage_entry(run_dir, "config", {**config, "train": {**config["train"], "meta_lr": "fast"}})
    message = f"{run_dir / 'checkpoint.pt'}: invalid run configuration: TrainConfig.meta_lr"
    refused(*cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)[::2], message)
    refused(*cli_runner.run([*RESUME, "--run-dir", run_dir], capsys)[::2], message)


@pytest.fixture(scope="module")
def kept_best(tmp_path_factory) -> Path:
    """A finished four-step MAML sinusoid run that validates every step and keeps its 3 best."""
    path = tmp_path_factory.mktemp("best") / "run"
    main([str(a) for a in ["train", "maml", "--steps", 4, "--val-every", 1, "--val-episodes", 2, "--keep-best", 3,
                           "--run-dir", path, *TINY_RUN]])
    return path


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("index", ['{"step-2.pt": "x", "step-3.pt": null}', '{"step-2.pt": NaN}'])
def test_a_best_index_whose_scores_are_no_numbers_is_refused_before_a_resume_trains(kept_best, tmp_path, capsys,
                                                                                     index):
    """Refused by the resume before its first step (not by the ranking at its first validation,
    after steps were trained) and by eval --ensemble, in one line that names the index and the
    repair; the repair given, deleting best/, lets the resume keep best checkpoints anew."""
    run_dir = copy_of(kept_best, tmp_path)
    (run_dir / "best" / "index.json").write_text(index)
    before = run_files(run_dir)
    message = (f"{run_dir / 'best' / 'index.json'} gives step-2.pt the score", "not a finite number",
               f"delete {run_dir / 'best'}: the validations after a --resume")
    resume = [*RESUME[:3], "--steps", 6, *RESUME[5:], "--run-dir", run_dir]
    refused(*cli_runner.run(resume, capsys)[::2], *message)
    assert run_files(run_dir) == before  # nothing trained, nothing lost
    refused(*cli_runner.run(["eval", run_dir, "--ensemble", "--episodes", 2, "--no-progress"], capsys)[::2], *message)
    shutil.rmtree(run_dir / "best")
    code, _, err = cli_runner.run(resume, capsys)
    assert code == 0, err
    assert sorted(RunDir(run_dir).best_steps()) == [5, 6]


def test_a_best_checkpoint_holding_another_steps_state_is_refused_where_it_is_loaded(kept_best, tmp_path, capsys):
    """best/step-N.pt names its step, which the ensemble reports: another step's state under
    that name (a file copied over it) is refused, not scored as step N."""
    run_dir = copy_of(kept_best, tmp_path)
    first, *_, last = sorted(RunDir(run_dir).best_steps())
    shutil.copy(run_dir / "best" / f"step-{last}.pt", run_dir / "best" / f"step-{first}.pt")
    message = f"{run_dir / 'best' / f'step-{first}.pt'} holds the state of step {last}, not of step {first}"
    refused(*cli_runner.run(["eval", run_dir, "--ensemble", "--episodes", 2, "--no-progress"], capsys)[::2], message)
    with pytest.raises(MetalearnError, match="as its name says"):
        RunDir(run_dir).read_best_checkpoints()


# -- a full disk, temporary files of killed writers ----------------------------------------------


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this system")
def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys):
    """torch's zip writer hides the ENOSPC of a file it writes to (a RuntimeError "enforce fail
    at inline_container.cc ... unexpected pos"): the checkpoint is serialised in memory and
    written here, so a full disk is one line naming the file and the free space."""
    run_dir = tmp_path / "run"
    assert cli_runner.run(["train", "maml", "--steps", 2, "--run-dir", run_dir, *TINY_RUN], capsys)[0] == 0
    before = (run_dir / "checkpoint.pt").read_bytes()
    # the checkpoint this process writes next lands on a full disk (every write: ENOSPC)
    (run_dir / f"checkpoint.pt.tmp{os.getpid()}").symlink_to("/dev/full")
    code, _, err = cli_runner.run(["train", "maml", "--steps", 4, "--run-dir", run_dir, "--resume", *TINY_RUN], capsys)
    refused(code, err, f"cannot write {run_dir / 'checkpoint.pt'}: No space left on device (",
            " free there); the previous checkpoint.pt is unchanged")
    assert (run_dir / "checkpoint.pt").read_bytes() == before
    assert not (run_dir / f"checkpoint.pt.tmp{os.getpid()}").exists()
    code, _, err = cli_runner.run(["train", "maml", "--steps", 4, "--run-dir", run_dir, "--resume", *TINY_RUN], capsys)
    assert code == 0, err  # space again: it resumes from the checkpoint kept


def test_a_training_start_removes_the_temporary_files_killed_writers_left(tiny_run, tmp_path, capsys):
    run_dir = copy_of(tiny_run, tmp_path)
    dead = 2**22 + 11  # above Linux's largest process id: no process has it
    litter = [f"checkpoint.pt.tmp{dead}", f"config.json.tmp{dead}", f"metrics.jsonl.tmp{dead}"]
    for name in litter:
        (run_dir / name).write_bytes(b"\0" * 1000)
    code, _, err = cli_runner.run(["train", "maml", "--steps", 3, "--run-dir", run_dir, "--resume", *TINY_RUN], capsys)
    assert code == 0, err
    assert not [name for name in litter if (run_dir / name).exists()]
    assert RunDir(run_dir).read_checkpoint()["step"] == 3


def test_a_figure_replaces_the_old_picture_whole_or_not_at_all(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from metalearn.plotting import save_figure

    path = tmp_path / "plots" / "curve.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert save_figure(fig, path) == path
    old = path.read_bytes()
    assert old.startswith(b"\x89PNG") and sorted(p.name for p in path.parent.iterdir()) == ["curve.png"]

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])

    def killed_half_way(target, **kwargs):  # writes part of a PNG, then the process is interrupted
        if hasattr(target, "write"):
            target.write(b"\x89PNG half")
        else:
            Path(target).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    fig.savefig = killed_half_way
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path)
    assert path.read_bytes() == old and sorted(p.name for p in path.parent.iterdir()) == ["curve.png"]


def test_an_exports_training_curve_pools_windows_of_a_round_number_of_steps():
    """250 logged steps make windows of 5 (the smallest of 1, 2, 5, 10, ... giving at most 100):
    each point the mean of its 5 records, ``elapsed_s`` the last of them, validation left out,
    and 1000 steps logged every 10 make windows of 10 (one record each), one more record 20."""
    from metalearn.api import training_curve

    records = [{"step": s, "loss": float(s), "return": -float(s), "elapsed_s": 2.0 * s} for s in range(1, 251)]
    records.insert(100, {"step": 100, "val_accuracy": 50.0})
    curve = training_curve(records)
    assert curve["window"] == 5 and len(curve["points"]) == 50
    first, last = curve["points"][0], curve["points"][-1]
    assert first == {"first_step": 1, "last_step": 5, "records": 5, "loss": 3.0, "return": -3.0, "elapsed_s": 10.0}
    assert last["first_step"] == 246 and last["loss"] == 248.0 and last["elapsed_s"] == 500.0
    assert all("val_accuracy" not in p for p in curve["points"])
    # the mean of whole windows is the mean of their steps (here steps 1..50: 25.5)
    assert sum(p["loss"] for p in curve["points"][:10]) / 10 == pytest.approx(25.5)
    every_tenth = [{"step": s, "loss": 1.0} for s in range(10, 1001, 10)]
    assert training_curve(every_tenth)["window"] == 10
    assert training_curve(every_tenth + [{"step": 1010, "loss": 1.0}])["window"] == 20
    assert training_curve([{"step": 5, "val_mse": 1.0}]) == {"window": 0, "points": []}
    # summary.json: indented, one line a point, the same data read back (a config string that
    # looks like the writer's placeholder stays a string)
    from metalearn.api import summary_json

    summary = {"config": {"run": "@point0@"}, "step": 250, "training_curve": curve}
    text = summary_json(summary)
    assert json.loads(text) == summary
    assert sum(1 for line in text.splitlines() if line.lstrip().startswith('{"first_step"')) == 50


def test_best_checkpoints_refuses_an_index_naming_other_files_and_forgets_steps_past_a_resume(tmp_path):
    run = RunDir(tmp_path)
    for step, score in ((2, 0.5), (4, 0.9), (6, 0.7)):
        run.keep_best({"step": step}, score, keep=3, higher_is_better=True)
    assert [p.name for p in run.best_checkpoints()] == ["step-4.pt", "step-6.pt", "step-2.pt"]
    run.drop_best_after(4)  # a resume from step 4's checkpoint
    assert [p.name for p in run.best_checkpoints()] == ["step-4.pt", "step-2.pt"]
    assert not (run.best_dir / "step-6.pt").exists()
    other = RunDir(tmp_path / "other")  # a resume from before the first validation leaves an empty index
    other.keep_best({"step": 3}, 0.5, keep=2, higher_is_better=True)
    other.drop_best_after(2)
    assert json.loads((other.best_dir / "index.json").read_text()) == {}
    with pytest.raises(MetalearnError, match="holds no best checkpoints yet"):
        other.best_checkpoints()  # an ensemble of none: refused here, not by torch.stack
    (run.best_dir / "step-2.pt").unlink()
    with pytest.raises(MetalearnError, match="lists step-2.pt, which is not a best checkpoint"):
        run.best_checkpoints()
    atomic_write_bytes(run.best_dir / "index.json", json.dumps({"../checkpoint.pt": 1.0}).encode())
    with pytest.raises(MetalearnError, match=r"lists \.\./checkpoint\.pt"):
        run.best_checkpoints()


def test_keep_best_ranks_by_the_metric_direction_and_drops_what_it_displaces(tmp_path):
    """Lower is better for MSE: the two lowest scores stay (ties: the earlier step), the file
    displaced is deleted, a step validated again replaces its score, a NaN is never kept, and
    a foreign name in an edited index is dropped from it but never deleted."""
    run = RunDir(tmp_path)
    for step, score in ((1, 0.5), (2, 0.2), (3, 0.5), (4, float("nan"))):
        run.keep_best({"step": step}, score, keep=2, higher_is_better=False)
    assert [p.name for p in run.best_checkpoints()] == ["step-2.pt", "step-1.pt"]
    assert sorted(p.name for p in run.best_dir.glob("*.pt")) == ["step-1.pt", "step-2.pt"]
    assert torch.load(run.best_dir / "step-1.pt") == {"step": 1}
    run.keep_best({"step": 1}, 0.9, keep=2, higher_is_better=False)  # step 1 validated again after a resume
    assert json.loads((run.best_dir / "index.json").read_text()) == {"step-2.pt": 0.2, "step-1.pt": 0.9}
    run.keep_best({"step": 5}, 0.3, keep=2, higher_is_better=False)
    assert [p.name for p in run.best_checkpoints()] == ["step-2.pt", "step-5.pt"]
    assert not (run.best_dir / "step-1.pt").exists()
    run.keep_best({"step": 5}, 0.9, keep=2, higher_is_better=True)  # accuracy: higher is better
    run.keep_best({"step": 7}, 0.4, keep=2, higher_is_better=True)
    assert [p.name for p in run.best_checkpoints()] == ["step-5.pt", "step-7.pt"]
    (tmp_path / "keep.pt").write_bytes(b"x")
    atomic_write_bytes(run.best_dir / "index.json", json.dumps({"../keep.pt": 0.0, "step-5.pt": 0.9}).encode())
    run.keep_best({"step": 6}, 0.1, keep=1, higher_is_better=True)
    assert [p.name for p in run.best_checkpoints()] == ["step-5.pt"]
    assert (tmp_path / "keep.pt").read_bytes() == b"x" and not (run.best_dir / "step-6.pt").exists()


def test_a_full_disk_while_keeping_a_best_checkpoint_is_one_line_and_keeps_best_as_it_was(tmp_path):
    """Like checkpoint.pt, a best checkpoint is serialised in memory and written whole: a disk
    that fills midway is a WriteError naming the file, not torch's RuntimeError ("enforce fail
    at inline_container.cc ... unexpected pos", from the short write a filling disk makes), and
    the index does not list the file that could not be written. A file size limit makes the
    writes of a filling disk: a short write, then an error (EFBIG, one of a full disk's)."""
    import signal

    resource = pytest.importorskip("resource")  # POSIX file size limits
    run = RunDir(tmp_path)
    run.keep_best({"step": 1, "weights": torch.zeros(1000)}, 0.5, keep=2, higher_is_better=True)
    index = (run.best_dir / "index.json").read_bytes()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        with pytest.raises(WriteError, match=rf"^cannot write {run.best_dir / 'step-2.pt'}: File too large "
                                             r"\(beyond this process's file-size limit: ulimit -f\)$"):
            run.keep_best({"step": 2, "weights": torch.ones(100_000)}, 0.9, keep=2, higher_is_better=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert (run.best_dir / "index.json").read_bytes() == index
    assert sorted(p.name for p in run.best_dir.iterdir()) == ["index.json", "step-1.pt"]


class Killed(BaseException):
    """A SIGKILL, as far as the files are concerned: nothing after it runs (not even ``except
    Exception`` blocks)."""


# a run validating every step, with checkpoints on even steps: (step, score), higher is better
VALIDATIONS = [(1, 0.5), (2, 0.7), (3, 0.6), (4, 0.9), (5, 0.8), (6, 0.95)]


def best_files(run: RunDir) -> dict[str, object]:
    """best/ as a reader sees it: the index, and each file's step."""
    return {"index": json.loads((run.best_dir / "index.json").read_text()),
            "files": {p.name: torch.load(p, weights_only=True)["step"] for p in sorted(run.best_dir.glob("*.pt"))}}


@pytest.mark.parametrize("killed_at", [step for step, _ in VALIDATIONS])
@pytest.mark.parametrize("moment", ["checkpoint written, not listed", "index written, displaced not deleted",
                                    "resume's drop: index written, files not deleted"])
def test_a_kill_anywhere_in_keeping_the_best_leaves_best_as_an_uninterrupted_run_has_it(tmp_path, monkeypatch,
                                                                                        killed_at, moment):
    """best/ is updated file first, then the index, then the displaced file deleted: a kill
    between two of these leaves a file the index does not list (never a listed one missing),
    which the next holder of the run's lock deletes. The resumed run (from the last checkpoint,
    dropping the best checkpoints after it, validating those steps again) then ends with the
    very best/ of a run never killed."""
    import metalearn.runs as runs

    alone = RunDir(tmp_path / "alone")
    for step, score in VALIDATIONS:
        alone.keep_best({"step": step}, score, keep=2, higher_is_better=True)

    run = RunDir(tmp_path / "run")
    checkpoint = (killed_at - 1) // 2 * 2  # validation comes before the checkpoint of its step
    for step, score in VALIDATIONS[:killed_at - 1]:
        run.keep_best({"step": step}, score, keep=2, higher_is_better=True)
    real_save, real_replace = runs.save_state, runs.atomic_write_bytes

    def kill_after_save(path, state):
        real_save(path, state)
        raise Killed

    def kill_after_index(path, data):
        real_replace(path, data)
        if path.name == "index.json":
            raise Killed

    resumed_at = checkpoint
    if moment == "checkpoint written, not listed":
        monkeypatch.setattr(runs, "save_state", kill_after_save)
    elif moment == "index written, displaced not deleted":
        monkeypatch.setattr(runs, "atomic_write_bytes", kill_after_index)
    try:
        run.keep_best({"step": killed_at}, dict(VALIDATIONS)[killed_at], keep=2, higher_is_better=True)
        if moment == "resume's drop: index written, files not deleted":
            # killed again, as the resume drops what came after its checkpoint
            monkeypatch.setattr(runs, "atomic_write_bytes", kill_after_index)
            run.drop_best_after(checkpoint)
    except Killed:
        pass
    monkeypatch.undo()
    # whatever a kill left, the index lists no missing file: a reader never fails on it
    listed = json.loads((run.best_dir / "index.json").read_text()) if (run.best_dir / "index.json").exists() else {}
    assert all((run.best_dir / name).is_file() for name in listed)

    with run.lock():  # the resume: its lock's holder deletes the unlisted files, then it goes on
        listed = json.loads((run.best_dir / "index.json").read_text()) if listed else {}
        assert sorted(p.name for p in run.best_dir.glob("*.pt")) == sorted(listed)
        run.drop_best_after(resumed_at)
        for step, score in VALIDATIONS[resumed_at:]:
            run.keep_best({"step": step}, score, keep=2, higher_is_better=True)
    assert best_files(run) == best_files(alone)
    assert sorted(p.name for p in run.best_dir.iterdir()) == sorted(p.name for p in alone.best_dir.iterdir())


def test_best_checkpoints_replaced_while_they_are_read_are_read_again_from_the_new_index(tmp_path, monkeypatch):
    """`eval --ensemble` beside a training run: between reading best/index.json and loading a
    file it lists, the run can displace that file by a better one. The reader then reads the
    index again and loads the whole new set (never two indexes mixed); the file found gone is
    never called a run to train first, nor a damaged best/ to delete."""
    import metalearn.runs as runs

    run = RunDir(tmp_path)
    for step, score in ((1, 0.5), (2, 0.6)):
        run.keep_best({"step": step}, score, keep=2, higher_is_better=True)
    # what callers did so far: the paths, then each loaded; the writer moves in between
    paths = run.best_checkpoints()
    run.keep_best({"step": 3}, 0.9, keep=2, higher_is_better=True)  # displaces step 1
    assert run.read_checkpoint(path=paths[0])["step"] == 2
    with pytest.raises(MetalearnError) as caught:
        run.read_checkpoint("step", path=paths[1])
    assert str(caught.value).startswith(f"{paths[1]} is gone: the run dropped it from its best checkpoints")
    assert "train first" not in str(caught.value)

    loaded = []

    def load(path):  # the writer displaces the file the reader is about to load next
        if not loaded:
            run.keep_best({"step": 4}, 0.95, keep=2, higher_is_better=True)  # displaces step 2, listed second
        loaded.append(path.name)
        return run.read_checkpoint("step", path=path)["step"]

    assert run.read_best_checkpoints(load) == [4, 3]
    assert loaded == ["step-3.pt", "step-2.pt", "step-4.pt", "step-3.pt"]
    assert [state["step"] for state in run.read_best_checkpoints()] == [4, 3]
    # a file found missing while the index changes under the reader is looked up in the new index
    real_read = runs.read_json_object
    moved = []

    def read_then_displace(path, advice):
        data = real_read(path, advice)
        if path.name == "index.json" and not moved:
            moved.append(path)  # first: keep_best reads the index too
            run.keep_best({"step": 5}, 0.99, keep=2, higher_is_better=True)  # displaces step 3
        return data

    monkeypatch.setattr(runs, "read_json_object", read_then_displace)
    assert [p.name for p in run.best_checkpoints()] == ["step-5.pt", "step-4.pt"]
    # a writer faster than any read: a clear line, after a bounded number of tries
    monkeypatch.setattr(runs, "read_json_object", real_read)
    step = iter(range(6, 100))

    def always_displaced(path):
        run.keep_best({"step": next(step)}, 1.0 + len(loaded), keep=1, higher_is_better=True)
        loaded.append(path)
        return run.read_checkpoint(path=path)

    with pytest.raises(MetalearnError, match=rf"^the best checkpoints of {tmp_path} changed 10 times while they "
                                             "were read"):
        run.read_best_checkpoints(always_displaced)


def test_an_eval_file_that_cannot_be_written_is_found_before_the_evaluation(tmp_path, monkeypatch):
    """What `metalearn eval` can call before evaluating: the file's own checks (a folder in its
    place), then a probe of the file system, which ``os.access`` does not see
    for root (a read-only mount, permissions the server decides); nothing is left behind."""
    run = RunDir(tmp_path)
    assert run.writable_eval_file() == tmp_path / "eval.json"
    assert run.writable_eval_file({"ways": 20}, "val") == tmp_path / "eval-part=val-ways=20.json"
    assert list(tmp_path.iterdir()) == []
    real_open = os.open

    def read_only_mount(path, flags, *args):
        if flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", read_only_mount)
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'eval.json'}: Read-only file system$"):
        run.writable_eval_file()
    monkeypatch.undo()
    (tmp_path / "eval.json").mkdir()
    with pytest.raises(MetalearnError, match="eval.json is a folder, where metalearn eval writes this evaluation: "
                                             "move it away"):
        run.writable_eval_file()


def test_a_hand_edited_config_or_checkpoint_step_is_named_as_the_file_has_it(tiny_run, tmp_path, capsys):
    """A value of the wrong type in config.json is named by its field and the file, never as a
    command-line flag nobody typed; a checkpoint whose step is no count is unreadable in one
    line, for status and export as for eval."""
    run_dir = copy_of(tiny_run, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["method_config"]["inner_lr"] = "fast"
    (run_dir / "config.json").write_text(json.dumps(config))
    refused(*cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)[::2],
            f"error: {run_dir / 'config.json'}: invalid run configuration: MAML.Config.inner_lr")
    shutil.copy(tiny_run / "config.json", run_dir / "config.json")
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    state["step"] = "abc"
    torch.save(state, run_dir / "checkpoint.pt")
    for command in (["status", run_dir], ["export", run_dir, tmp_path / "out"], ["eval", run_dir, "--episodes", 2]):
        refused(*cli_runner.run(command, capsys)[::2], "its step is 'abc', not a count of meta-steps")


def test_eval_of_a_run_whose_split_json_is_damaged_says_to_delete_it_not_to_fix_a_split_file(tmp_path, capsys):
    """A run on class folders evaluates on the split it recorded (split.json, passed on as its
    split file). A damaged one is the run's file, named with what to do about it; never a
    --split-file the user did not give."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for c in range(10):
        (images / f"c{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(images / f"c{c}" / f"{i}.png")
    run_dir = tmp_path / "run"
    code, _, err = cli_runner.run(["train", "protonet", "--dataset", "folder", "--data-dir", images, "--image-size",
                                   16, "--ways", 2, "--shots", 1, "--query", 1, "--steps", 1, "--val-every", 0,
                                   "--no-eval", "--no-progress", "--run-dir", run_dir], capsys)
    assert code == 0, err
    split = run_dir / "split.json"
    recorded = json.loads(split.read_text())
    for damage, what in [("not json{", "is not valid JSON"), ('{"train": 3, "test": []}', "is damaged"),
                         ('{"tset": ["c1"]}', "is damaged"), ('{"train": ["c1"], "val": []}', "is damaged"),
                         ("[]", "holds a JSON array")]:
        split.write_text(damage)
        code, _, err = cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
        refused(code, err, f"error: {split} {what}", "delete it: the next resume writes it again")
        assert "--split-file" not in err
    split.unlink()  # as the message says: the resume writes the run's split again
    code, _, err = cli_runner.run(["train", "protonet", "--resume", "--run-dir", run_dir, "--steps", 2,
                                   "--no-eval", "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads(split.read_text()) == recorded
    code, out, err = cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)
    assert code == 0 and "written to" in out, err


def test_json_nested_beyond_python_s_recursion_is_damage_not_a_traceback(tiny_run, tmp_path, capsys):
    """Arrays nested 5000 deep make json.loads raise RecursionError, which no reader took for
    damage: a metrics line is skipped as a damaged one is; config.json, eval.json and a
    --split-file are refused in one line naming them."""
    nested = "[" * 5000 + "]" * 5000
    run_dir = copy_of(tiny_run, tmp_path)
    (run_dir / "metrics.jsonl").write_text((run_dir / "metrics.jsonl").read_text() + nested + "\n")
    code, out, err = cli_runner.run(["status", run_dir], capsys)
    assert code == 0 and "Traceback" not in err, err
    (run_dir / "eval.json").write_text(nested)
    refused(*cli_runner.run(["status", run_dir], capsys)[::2], "eval.json is not valid JSON (nested too deeply)")
    (run_dir / "config.json").write_text(nested)
    refused(*cli_runner.run(["eval", run_dir, "--episodes", 2, "--no-progress"], capsys)[::2],
            "config.json is not valid JSON (nested too deeply)")
    split = tmp_path / "split.json"
    split.write_text(nested)
    from metalearn.data.folder import read_split_file
    from metalearn.errors import MetalearnError

    with pytest.raises(MetalearnError, match="split_file .*split.json: cannot read it as JSON \\(nested too deeply\\)"):
        read_split_file(split)


def test_a_best_folder_a_resume_cannot_write_is_refused_before_it_trains(kept_best, tmp_path, capsys):
    """best/index.json a folder, or best/ a file: refused before the first step, not at the
    first validation after steps that no checkpoint kept."""
    resume = [*RESUME[:3], "--steps", 6, *RESUME[5:]]
    run_dir = copy_of(kept_best, tmp_path)
    (run_dir / "best" / "index.json").unlink()
    (run_dir / "best" / "index.json").mkdir()
    before = run_files(run_dir)
    refused(*cli_runner.run([*resume, "--run-dir", run_dir], capsys)[::2],
            f"{run_dir / 'best' / 'index.json'} is a folder, where the run lists its best checkpoints: move it away")
    assert run_files(run_dir) == before  # the checkpoints too: a folder is no missing index
    refused(*cli_runner.run(["eval", run_dir, "--ensemble", "--episodes", 2, "--no-progress"], capsys)[::2],
            f"{run_dir / 'best' / 'index.json'} is a folder, not the list of {run_dir}'s best checkpoints")
    shutil.rmtree(run_dir / "best")
    (run_dir / "best").write_text("not a folder")
    refused(*cli_runner.run([*resume, "--run-dir", run_dir], capsys)[::2],
            f"{run_dir / 'best'} is a file, where the run keeps its best checkpoints: move it away")


def test_best_checkpoints_kept_through_links_resume_and_evaluate(kept_best, tmp_path, capsys):
    """best/ a link to a folder on another disk, index.json a link to a file (a git-annex or DVC
    layout): a resume keeps best checkpoints there, eval --ensemble reads them."""
    run_dir = copy_of(kept_best, tmp_path)
    elsewhere = tmp_path / "bigdisk" / "best"
    elsewhere.parent.mkdir()
    shutil.move(run_dir / "best", elsewhere)
    (run_dir / "best").symlink_to(elsewhere, target_is_directory=True)
    code, _, err = cli_runner.run(["eval", run_dir, "--ensemble", "--episodes", 2, "--no-progress"], capsys)
    assert code == 0, err
    (elsewhere / "index.json").rename(tmp_path / "index.json")
    (elsewhere / "index.json").symlink_to(tmp_path / "index.json")
    code, _, err = cli_runner.run(["eval", run_dir, "--ensemble", "--episodes", 2, "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = cli_runner.run([*RESUME[:3], "--steps", 6, *RESUME[5:], "--run-dir", run_dir], capsys)
    assert code == 0, err
    assert (run_dir / "best").is_symlink()  # kept where it was, the index rewritten there
    listed = json.loads((elsewhere / "index.json").read_text())
    assert len(listed) == 3 and all((elsewhere / file).is_file() for file in listed)
    assert [path.parent for path in RunDir(run_dir).best_checkpoints()] == [run_dir / "best"] * 3


def test_a_received_run_whose_best_or_plots_link_out_of_it_touches_nothing_there(kept_best, tmp_path, capsys):
    """A run folder from someone else, its best/ a link to another run's best/ (or to a folder of
    other files), its plots/ a link out of it: a resume would have deleted the other run's best
    checkpoints and temporary-looking files, plot would have written there. Each is refused in
    one line (a resume, which writes no plot, goes on beside the plots/ link), and nothing
    there changes."""
    resume = [*RESUME[:3], "--steps", 6, *RESUME[5:]]
    mine = copy_of(kept_best, tmp_path)
    received = Path(shutil.copytree(kept_best, tmp_path / "received"))
    shutil.rmtree(received / "best")
    (received / "best").symlink_to(mine / "best", target_is_directory=True)
    before = run_files(mine)
    refused(*cli_runner.run([*resume, "--run-dir", received], capsys)[::2],
            f"{received / 'best'} is a link into another run's folder ({mine / 'best'})")
    documents = tmp_path / "documents"
    documents.mkdir()
    (documents / "thesis.tex.tmp1").write_text("a draft")
    (received / "best").unlink()
    (received / "best").symlink_to(documents, target_is_directory=True)
    refused(*cli_runner.run([*resume, "--run-dir", received], capsys)[::2],
            f"{received / 'best'} is a link to {documents}, which holds other files than best checkpoints "
            "(thesis.tex.tmp1)")
    (received / "best").unlink()
    (received / "plots").symlink_to(documents, target_is_directory=True)
    refused(*cli_runner.run(["plot", received], capsys)[::2],
            f"{received / 'plots'} is a link to {documents}, outside the run folder")
    code, _, err = cli_runner.run([*resume, "--run-dir", received], capsys)  # training writes no plot: it goes on
    assert code == 0, err
    assert sorted(p.name for p in documents.iterdir()) == ["thesis.tex.tmp1"]
    assert run_files(mine) == before


def test_a_best_index_that_lists_a_deleted_file_does_not_cost_a_checkpoint_that_is_there(kept_best, tmp_path,
                                                                                          capsys):
    """A listed file deleted by hand outranked, and so deleted, a kept checkpoint that was there:
    it is forgotten instead."""
    run_dir = copy_of(kept_best, tmp_path)
    index = json.loads((run_dir / "best" / "index.json").read_text())
    best = min(index, key=index.get)  # the lowest MSE: first in rank
    (run_dir / "best" / best).unlink()
    RunDir(run_dir).keep_best({"step": 9}, max(index.values()) + 1.0, keep=3, higher_is_better=False)
    after = json.loads((run_dir / "best" / "index.json").read_text())
    assert best not in after and all((run_dir / "best" / file).is_file() for file in after)
    assert set(after) == set(index) - {best} | {"step-9.pt"}


def test_export_refuses_a_config_json_of_another_run_and_writes_nothing(tiny_run, tmp_path, capsys):
    """config.json copied from another run would give the record that run's configuration beside
    this one's evaluations: refused as eval refuses it."""
    run_dir = copy_of(tiny_run, tmp_path)
    config = json.loads((run_dir / "config.json").read_text())
    config["method_config"]["inner_lr"] = 0.5  # another run's network trains otherwise
    (run_dir / "config.json").write_text(json.dumps(config))
    refused(*cli_runner.run(["export", run_dir, tmp_path / "out"], capsys)[::2],
            "Its config.json and checkpoint.pt come from different runs")
    assert not (tmp_path / "out").exists()


def strict_json(text: str):
    """json.loads as a strict parser (JavaScript's JSON.parse) reads: NaN and Infinity refused."""
    def refuse(constant):
        raise ValueError(f"{constant} is no JSON")

    return json.loads(text, parse_constant=refuse)


def test_what_metalearn_writes_for_other_programs_is_standard_json(tiny_run, tmp_path, capsys):
    """A diverged evaluation's NaN scores: export's summary.json and compare --json write null,
    as status --json does; the run's own eval file keeps NaN, which its readers take."""
    run_dir = copy_of(tiny_run, tmp_path)
    code, _, err = cli_runner.run(["eval", run_dir, "--set", "inner_lr=1e6", "--episodes", 3, "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = cli_runner.run(["export", run_dir, tmp_path / "record"], capsys)
    assert code == 0, err
    summary = strict_json((tmp_path / "record" / "summary.json").read_text())
    diverged = next(result for name, result in summary["evaluations"].items() if "inner_lr" in name)
    assert diverged["mean"] is None and diverged["diverged"] == 3
    code, _, err = cli_runner.run(["compare", run_dir, "--episodes", 3, "--set", "inner_lr=1e6",
                                   "--json", tmp_path / "compare.json"], capsys)
    assert code == 0, err
    strict_json((tmp_path / "compare.json").read_text())
