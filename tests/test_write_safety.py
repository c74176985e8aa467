"""Nothing is lost or left half-written: an evaluation file never goes back to an older
checkpoint's score, an export that cannot be written whole leaves OUT_DIR as it was, a write
failure claims no earlier file that was not there, and a file given where a data folder is
expected is called a file."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run
from metalearn.errors import MetalearnError
from metalearn.files import WriteError, append_line, atomic_write_bytes, atomic_write_files, temporary_path
from metalearn.runs import EvaluationSuperseded, RunDir

TINY = ["--dataset", "sinusoid", "--meta-batch-size", 2, "--val-every", 0, "--no-progress"]


def evaluation(step: int, mean: float = 0.5) -> dict:
    return {"metric": "mse", "mean": mean, "ci95": 0.1, "episodes": 4, "step": step}


# -- an evaluation file never goes back to an older checkpoint ------------------------------------


def test_an_evaluation_of_an_older_checkpoint_never_replaces_a_later_one(tmp_path):
    run_dir = RunDir(tmp_path)
    path = run_dir.write_eval(evaluation(200, 0.25))
    before = path.read_bytes()
    with pytest.raises(EvaluationSuperseded) as caught:
        run_dir.write_eval(evaluation(100, 0.75))
    assert str(caught.value) == (f"not written: {path} holds the evaluation of a later checkpoint (mse 0.25 at step "
                                 "200) than this one of step 100: the run trained on while this evaluation ran "
                                 "(evaluate again to score its newer checkpoint), or an older checkpoint was put "
                                 "back (move eval.json away to keep this score)")
    assert caught.value.result == evaluation(100, 0.75)  # the score not filed, for the caller to show
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    # the same step (evaluated again) and a later one replace it; so does a file with no score to keep
    assert json.loads(run_dir.write_eval(evaluation(200, 0.5)).read_text())["mean"] == 0.5
    assert json.loads(run_dir.write_eval(evaluation(300, 0.1)).read_text())["step"] == 300
    path.write_text('{"metric": "mse", "step": 4')  # damaged
    assert json.loads(run_dir.write_eval(evaluation(7)).read_text())["step"] == 7
    # an evaluation of no checkpoint (a maml-rl run's initial weights) has no step to compare
    initial = run_dir.write_eval({"weights": "initial", "mean": 1.0}, {"weights": "initial"})
    run_dir.write_eval({"weights": "initial", "mean": 2.0}, {"weights": "initial"})
    assert json.loads(initial.read_text())["mean"] == 2.0


def test_a_later_evaluation_written_while_this_one_is_on_its_way_to_disk_stays(tmp_path, monkeypatch):
    """The step is compared again just before the rename: a later checkpoint's evaluation that
    another writer put in place while this one's file was written is kept, and this one's
    temporary file goes."""
    run_dir = RunDir(tmp_path)
    path = run_dir.write_eval(evaluation(100))
    fsync, landed = os.fsync, []

    def meanwhile(fd):  # the training run's own test lands, once, while this evaluation is flushed
        fsync(fd)
        if not landed:
            landed.append(True)
            (tmp_path / "theirs").write_text(json.dumps(evaluation(200, 0.125)))
            os.replace(tmp_path / "theirs", path)  # the other writer's rename

    monkeypatch.setattr(os, "fsync", meanwhile)
    with pytest.raises(EvaluationSuperseded, match="later checkpoint \\(mse 0.125 at step 200\\) than this one of "
                                                   "step 100"):
        run_dir.write_eval(evaluation(100, 0.9))
    assert json.loads(path.read_text())["step"] == 200
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def later(path: Path, step: int = 10_000) -> bytes:
    """Make the evaluation in ``path`` one of a later checkpoint (as a training run that went on
    would have written it); its bytes."""
    held = json.loads(path.read_text())
    path.write_text(json.dumps({**held, "step": step}))
    return path.read_bytes()


def test_metalearn_eval_refuses_to_replace_a_later_checkpoints_evaluation(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "maml", "--steps", 2, "--eval-episodes", 4, "--run-dir", run_dir, *TINY], capsys)
    assert code == 0, err
    held = later(run_dir / "eval.json")
    code, out, err = run(["eval", run_dir, "--no-progress"], capsys)
    # refused before the evaluation: the file holds a later step than the run's checkpoint
    assert code == 2 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: {run_dir / 'eval.json'} holds the evaluation of a later checkpoint (mse ")
    assert err.endswith("at step 10000) than the run's checkpoint.pt (step 2), which would not replace it: move "
                        "eval.json away to score this checkpoint\n"), err
    assert (run_dir / "eval.json").read_bytes() == held
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]


def test_the_test_after_training_and_an_ensemble_go_through_the_same_check(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "maml", "--steps", 2, "--stop-at", 1, "--eval-episodes", 4, "--run-dir", run_dir,
                        *TINY], capsys)
    assert code == 0, err
    atomic_write_bytes(run_dir / "eval.json", json.dumps(evaluation(10_000)).encode())
    held = (run_dir / "eval.json").read_bytes()
    code, _, err = run(["train", "maml", "--steps", 2, "--eval-episodes", 4, "--run-dir", run_dir, "--resume",
                        *TINY], capsys)
    assert code == 2 and "holds the evaluation of a later checkpoint (mse 0.5 at step 10000) than this one of step 2" \
        in err, err
    assert (run_dir / "eval.json").read_bytes() == held and RunDir(run_dir).read_checkpoint("step")["step"] == 2

    kept = tmp_path / "kept"
    code, _, err = run(["train", "maml", "--dataset", "sinusoid", "--steps", 2, "--meta-batch-size", 2, "--val-every",
                        1, "--val-episodes", 2, "--keep-best", 2, "--no-eval", "--run-dir", kept, "--no-progress"],
                       capsys)
    assert code == 0, err
    code, _, err = run(["eval", kept, "--ensemble", "--episodes", 3, "--no-progress"], capsys)
    assert code == 0, err
    written = next(kept.glob("eval-*ensemble=2*.json"))
    held = later(written)
    from metalearn.api import evaluate_run

    # refused before the evaluation, in the Python API as in metalearn eval (see above)
    with pytest.raises(MetalearnError, match=f"^{re.escape(str(written))} holds the evaluation of a later checkpoint"):
        evaluate_run(kept, episodes=3, ensemble=True, progress=False)
    # the write's own check: a later checkpoint's evaluation written while this one was scored
    written.unlink()
    with pytest.raises(EvaluationSuperseded, match=f"not written: {written} holds the evaluation of a later"):
        evaluate_run(kept, episodes=3, ensemble=True, progress=False, announce=lambda text: written.write_bytes(held))
    assert written.read_bytes() == held


def test_train_refuses_a_test_result_it_could_not_write_before_training(tmp_path, capsys, monkeypatch):
    """A folder named eval.json in the run folder: train refuses before the first step (as eval
    does), not after training and testing; --no-eval trains. A test result that a full disk
    keeps from being written is still said, in the error line."""
    run_dir = tmp_path / "run"
    (run_dir / "eval.json").mkdir(parents=True)
    code, _, err = run(["train", "maml", "--steps", 2, "--eval-episodes", 4, "--run-dir", run_dir, *TINY], capsys)
    assert code == 2 and err == f"error: {run_dir / 'eval.json'} is a folder, where metalearn eval writes this " \
                                "evaluation: move it away\n"
    assert sorted(p.name for p in run_dir.iterdir()) == ["eval.json"]
    code, _, err = run(["train", "maml", "--steps", 2, "--no-eval", "--run-dir", run_dir, *TINY], capsys)
    assert code == 0, err

    def full_disk(self, *args, **kwargs):
        raise WriteError(self.eval_path, OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(RunDir, "write_eval", full_disk)
    code, _, err = run(["train", "maml", "--steps", 2, "--eval-episodes", 4, "--run-dir", tmp_path / "full", *TINY],
                       capsys)
    assert code == 2 and re.search(r"No space left on device \(.* free there\); the score, not saved: MSE "
                                   r"[0-9.]+ \+/- [0-9.]+ \(95% CI, 4 tasks\)$", err.strip()), err


def test_a_protocol_goes_through_the_same_check(tmp_path, capsys, omniglot_data_dir):
    code, _, err = run(["train", "memory", "--ways", 3, "--shots", 1, "--query", 1, "--memory-size", 16, "--choose-k", 4,
                        "--key-dim", 8, "--model", "conv4-embedding", "--steps", 1, "--meta-batch-size", 1,
                        "--val-every", 0, "--no-eval", "--no-progress", "--run-dir", tmp_path / "r", "--data-dir",
                        omniglot_data_dir], capsys)
    assert code == 0, err
    args = ["eval", tmp_path / "r", "--protocol", "lifelong", "--episodes", 2, "--no-progress", "--data-dir",
            omniglot_data_dir]
    code, out, err = run(args, capsys)
    assert code == 0, err
    written = tmp_path / "r" / "eval-episodes=2-protocol=lifelong.json"
    held = later(written)
    from metalearn.api import evaluate_run

    with pytest.raises(MetalearnError, match="holds the evaluation of a later checkpoint"):  # before scoring
        evaluate_run(tmp_path / "r", episodes=2, protocol="lifelong", data_dir=omniglot_data_dir, progress=False)
    written.unlink()
    with pytest.raises(EvaluationSuperseded) as caught:  # the write's own check: written while it was scored
        evaluate_run(tmp_path / "r", episodes=2, protocol="lifelong", data_dir=omniglot_data_dir, progress=False,
                     announce=lambda text: written.write_bytes(held))
    assert (f"not written: {written} holds the evaluation of a later checkpoint (the lifelong protocol at step 10000) "
            "than this one of step 1") in str(caught.value)
    assert written.read_bytes() == held


# -- an export is written whole or not at all ------------------------------------------------------


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A tiny trained run with a learning curve and a test (its record: summary.json and two plots)."""
    from metalearn.api import resolve_config, train

    run_dir = tmp_path_factory.mktemp("export") / "base"
    config = resolve_config("maml", task={"dataset": "sinusoid"},
                            train={"steps": 3, "meta_batch_size": 2, "log_every": 1, "val_every": 0,
                                   "eval_episodes": 3})
    train(config, run_dir, progress=False)
    return run_dir


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder``: a file's bytes, None for a folder, the target for a link."""
    return {str(p.relative_to(folder)): (os.readlink(p).encode() if p.is_symlink() else None if p.is_dir()
                                         else p.read_bytes()) for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("blocked", ["summary.json", "fits.png", "learning_curves.png"])
def test_an_export_refused_for_a_folder_in_its_way_leaves_out_dir_as_it_was(exported_run, tmp_path, capsys, blocked):
    out = tmp_path / "ed"
    (out / blocked).mkdir(parents=True)
    (out / "notes.txt").write_text("the user's own")
    before = listing(out)
    code, stdout, err = run(["export", exported_run, out], capsys)
    assert code == 2 and stdout == "" and err == (f"error: {out / blocked} is a folder, where metalearn export writes "
                                                  f"the record's {blocked}: move it away (nothing was written to "
                                                  f"{out})\n")
    assert listing(out) == before


def test_an_export_refuses_a_link_of_a_records_name_and_writes_through_none(exported_run, tmp_path, capsys):
    out = tmp_path / "ed"
    out.mkdir()
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"someone else's")
    (out / "fits.png").symlink_to(victim)
    before = listing(out)
    code, _, err = run(["export", exported_run, out], capsys)
    assert code == 2 and f"{out / 'fits.png'} is a link, where metalearn export writes" in err
    assert listing(out) == before and victim.read_bytes() == b"someone else's"


def test_an_export_that_cannot_be_written_whole_writes_nothing(exported_run, tmp_path, monkeypatch):
    """A full disk while the record is written: no file of it is renamed into place, no
    temporary file stays, and an OUT_DIR the export made goes again."""
    from metalearn.api import export_results

    real_open = open

    def full_at_summary(file, mode="r", *args, **kwargs):
        if str(file) == str(temporary_path(out / "summary.json")) and "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    out = tmp_path / "new" / "ed"
    monkeypatch.setattr("builtins.open", full_at_summary)
    with pytest.raises(WriteError, match=rf"^cannot write {out / 'summary.json'}: No space left on device \(.* free "
                                         r"there\)$"):
        export_results(exported_run, out)
    assert not (tmp_path / "new").exists()
    # into a folder holding an earlier record: every file of it stays as it was
    monkeypatch.undo()
    export_results(exported_run, out)
    before = listing(out)
    monkeypatch.setattr("builtins.open", full_at_summary)
    with pytest.raises(WriteError, match="; the previous summary.json is unchanged$"):
        export_results(exported_run, out)
    assert listing(out) == before


def test_an_out_dir_that_is_a_file_is_refused_before_drawing(exported_run, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run(["export", exported_run, tmp_path / "file"], capsys)
    assert code == 2 and err == f"error: OUT_DIR {tmp_path / 'file'} is a file, not a folder; give a folder\n"
    code, _, err = run(["export", exported_run, tmp_path / "file" / "ed"], capsys)
    assert code == 2 and err == f"error: OUT_DIR {tmp_path / 'file' / 'ed'}: {tmp_path / 'file'} is a file, not a folder\n"
    assert (tmp_path / "file").read_text() == "not a folder"


# -- a write failure claims an earlier file only where there was one -------------------------------


def test_a_write_failure_claims_no_previous_file_where_there_was_none(tmp_path):
    (tmp_path / "summary.json").mkdir()
    with pytest.raises(WriteError) as caught:
        atomic_write_bytes(tmp_path / "summary.json", b"{}")
    assert str(caught.value) == f"cannot write {tmp_path / 'summary.json'}: Is a directory"
    err = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert "previous" not in str(WriteError(tmp_path / "none.json", err))
    (tmp_path / "kept.json").write_text("{}")
    assert str(WriteError(tmp_path / "kept.json", err)).endswith("; the previous kept.json is unchanged")


def test_an_append_that_fails_claims_only_the_lines_before_it(tmp_path, monkeypatch):
    """An append cut short may leave part of its line: what stays whole is the lines before."""
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 1}\n')
    real_open = open

    def full(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)

        class Full:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return Full()

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(WriteError, match=r"No space left on device \(.* free there\); the lines before it in "
                                         r"metrics.jsonl are unchanged$"):
        append_line(path, '{"step": 2}\n')


def test_an_append_that_fails_after_writing_part_of_its_line_takes_the_part_back(tmp_path, monkeypatch):
    """A full disk or ``ulimit -f`` midway through the line: the file is back to its bytes
    before the write, so that no cut-off line without newline stays for the next one to glue to."""
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 1}\n')
    before = path.read_bytes()
    real_open = open

    def part_then_full(file, *args, **kwargs):
        handle = real_open(file, *args, **kwargs)

        class PartThenFull:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                handle.close()

            def write(self, text):
                handle.write(text[:5])
                handle.flush()  # the part is on disk, as a write cut off by the file-size limit leaves it
                assert path.read_bytes() == before + text[:5].encode()
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

        return PartThenFull()

    monkeypatch.setattr("builtins.open", part_then_full)
    with pytest.raises(WriteError, match=r"File too large \(beyond this process's file-size limit: ulimit -f\); the "
                                         r"lines before it in metrics.jsonl are unchanged$"):
        append_line(path, '{"step": 2, "loss": 0.5}\n')
    monkeypatch.undo()
    assert path.read_bytes() == before
    append_line(path, '{"step": 2}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


@pytest.mark.skipif(os.name != "posix", reason="no file-size limit (RLIMIT_FSIZE) here")
def test_an_append_beyond_the_file_size_limit_leaves_the_file_as_it_was(tmp_path):
    """The real thing: ``ulimit -f`` lets the first bytes of the line through, then refuses."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n')
    script = ("import resource, sys\n"
              "from pathlib import Path\n"
              "from metalearn.files import WriteError, append_line\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))\n"
              "try:\n"
              "    append_line(Path(sys.argv[1]), '{\"step\": 2, \"loss\": 0.5}\\n')\n"
              "except WriteError as err:\n"
              "    print(err)\n")
    done = subprocess.run([sys.executable, "-c", script, str(path), str(path.stat().st_size + 5)],
                          capture_output=True, text=True, timeout=60)
    assert "beyond this process's file-size limit: ulimit -f" in done.stdout, done.stdout + done.stderr
    assert path.read_text() == '{"step": 1}\n'


def test_several_files_are_written_all_or_none(tmp_path, monkeypatch):
    a, b = tmp_path / "a.png", tmp_path / "summary.json"
    a.write_bytes(b"old a")
    real_open = open

    def full_at_b(file, mode="r", *args, **kwargs):
        if str(file) == str(temporary_path(b)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_at_b)
    with pytest.raises(WriteError, match=f"cannot write {b}"):
        atomic_write_files([(a, b"new a"), (b, b"{}")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"] and a.read_bytes() == b"old a"
    monkeypatch.undo()
    atomic_write_files([(a, b"new a"), (b, b"{}")])
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "summary.json"]


# -- a file where a data folder is expected is called a file ---------------------------------------


def test_a_file_given_as_the_omniglot_folder_is_called_a_file(tmp_path, capsys, monkeypatch):
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0")
    archives = "give the folder that holds images_background.zip and images_evaluation.zip (or their extracted folders)"
    code, _, err = run(["data", "verify", "--data-dir", file], capsys)
    assert code == 2 and err == f"error: --data-dir {file} is a file, not a folder; {archives}\n"
    code, _, err = run(["train", "maml", "--dataset", "omniglot", "--data-dir", file, "--steps", 1, "--no-progress",
                        "--run-dir", tmp_path / "run"], capsys)
    assert code == 2 and err == f"error: --data-dir {file} is a file, not a folder; {archives}\n"
    code, _, err = run(["data", "verify", "--data-dir", file / "omniglot"], capsys)
    assert code == 2 and err == f"error: --data-dir {file / 'omniglot'}: {file} is a file, not a folder; {archives}\n"
    monkeypatch.setenv("METALEARN_DATA", str(file))  # the default folder: named as such
    code, _, err = run(["data", "verify"], capsys)
    assert code == 2 and err == (f"error: {file} is a file, not a folder; point --data-dir or METALEARN_DATA at the "
                                 "folder that holds images_background.zip and images_evaluation.zip (or their "
                                 "extracted folders)\n")
    # a folder that is not there is still Omniglot not found, with how to fetch it
    code, _, err = run(["data", "verify", "--data-dir", tmp_path / "none"], capsys)
    assert code == 2 and err.startswith(f"error: Omniglot not found in {tmp_path / 'none'}: missing")
    assert "point --data-dir or METALEARN_DATA at" in err
    # from Python, the option as Python spells it
    from metalearn.data.omniglot import locate_sources

    with pytest.raises(MetalearnError, match=r"is a file, not a folder; point data_dir or METALEARN_DATA at"):
        locate_sources(file, given=False)
    with pytest.raises(MetalearnError, match=r"^data_dir .* is a file, not a folder; give the folder"):
        locate_sources(file)
    with pytest.raises(MetalearnError, match=r"point data_dir or METALEARN_DATA at the folder that holds them"):
        locate_sources(tmp_path / "none")


def test_a_file_given_as_an_image_folder_is_called_a_file(tmp_path, capsys):
    file = tmp_path / "passwd"
    file.write_text("root:x:0:0")
    for data_dir, said in ((file, f"--data-dir {file} is a file, not a folder"),
                           (file / "x", f"--data-dir {file / 'x'}: {file} is a file, not a folder"),
                           (tmp_path / "none", f"--data-dir {tmp_path / 'none'} does not exist")):
        code, _, err = run(["train", "protonet", "--dataset", "folder", "--data-dir", data_dir, "--steps", 1,
                            "--no-progress", "--run-dir", tmp_path / "run"], capsys)
        assert code == 2 and err == f"error: {said}; give the folder that holds one folder per class\n", err
    assert not (tmp_path / "run").exists()


def test_predict_outputs_are_written_together_or_not_at_all(tmp_path, monkeypatch):
    from metalearn.prediction import write_together

    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the disk fills up while the second output is flushed
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    existing = tmp_path / "predictions.json"
    existing.write_text("old")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WriteError):
        write_together([(existing, b"new"), (tmp_path / "made" / "deeper" / "predictions.csv", b"csv")])
    monkeypatch.undo()
    assert existing.read_text() == "old"  # the first output is not replaced alone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.json"]  # no temporary file, no folder made


def test_an_export_that_cannot_make_its_folder_leaves_none_of_the_folders_it_made(exported_run, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / ("a" * 300)  # a name longer than the file system takes
    code, _, err = run(["export", exported_run, out], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "new").exists()


def test_a_sigterm_to_an_export_cleans_up_as_a_ctrl_c_does(exported_run, tmp_path):
    """A scheduler's SIGTERM (pre-emption) to a command other than training raises where the
    command is, as a Ctrl-C does: its temporary folder of plots is removed, one line, exit 143.
    The export waits a minute before drawing (plot_run wrapped), so the signal always finds it
    with its folder made."""
    import signal
    import subprocess
    import sys
    import time

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    env = {**os.environ, "TMPDIR": str(temporary)}
    slowed = ("import sys, time\n"
              "import metalearn.api as api\n"
              "draw = api.plot_run\n"
              "api.plot_run = lambda *args, **kwargs: time.sleep(60) or draw(*args, **kwargs)\n"
              "from metalearn.cli import main\n"
              "main(sys.argv[1:], whole_process=True)\n")
    process = subprocess.Popen([sys.executable, "-c", slowed, "export", str(exported_run), str(tmp_path / "out")],
                               env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while (not any(p.name.startswith("metalearn-export-") for p in temporary.iterdir()) and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)  # until the plots' folder is made (torch and matplotlib may put files there too)
    assert process.poll() is None, process.communicate()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and err == "terminated (SIGTERM)\n", (process.returncode, err)
    assert not list(temporary.glob("metalearn-export-*")) and not (tmp_path / "out" / "summary.json").exists()
