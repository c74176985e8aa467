"""One writer per run folder: a second training process is refused at once with a line naming
the first, which goes on unharmed; a lock left by a killed process blocks nothing; readers
never wait."""

from __future__ import annotations

import json
import os
import socket

import pytest

import cli_runner
import training_process as child
from metalearn.cli import main
from metalearn.errors import MetalearnError
from metalearn.locking import FolderInUse, FolderLock
from metalearn.runs import RunDir

TRAIN = ["train", "maml", "--dataset", "sinusoid", "--steps", 4, "--meta-batch-size", 2, "--checkpoint-every", 1,
         "--log-every", 1, "--val-every", 0, "--no-progress", "--no-eval"]


def test_a_held_lock_refuses_others_names_its_holder_and_goes_with_its_release(tmp_path):
    folder = tmp_path / "run"
    lock = RunDir(folder).lock()
    assert lock.held and folder.is_dir()
    note = json.loads((folder / ".lock").read_text())
    assert note["pid"] == os.getpid() and note["host"] == socket.gethostname()
    # another open file of the same lock is refused as another process would be
    with pytest.raises(FolderInUse, match=rf"{folder} is in use by this process \({os.getpid()}\), through a lock .*"
                                          "one run folder has one writer.*choose another run_dir$"):
        RunDir(folder).lock()
    lock.release()
    assert not (folder / ".lock").exists()  # no litter
    with RunDir(folder).lock():
        pass


def test_a_lock_file_left_by_a_dead_process_blocks_nothing(tmp_path):
    """What a SIGKILL leaves: the note, without the lock (the kernel dropped it with the process)."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / ".lock").write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "since": "then"}))
    with RunDir(folder).lock() as lock:
        assert lock.held and json.loads((folder / ".lock").read_text())["pid"] == os.getpid()


def test_a_lock_that_creates_its_folder_removes_it_if_nothing_was_written(tmp_path):
    FolderLock.take(tmp_path / "new" / ".lock", "test").release()
    assert not (tmp_path / "new").exists()
    lock = FolderLock.take(tmp_path / "kept" / ".lock", "test")
    (tmp_path / "kept" / "config.json").write_text("{}")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.json"]


def test_a_second_training_process_is_refused_and_the_first_is_unharmed(tmp_path, capsys, one_thread):
    run, go = tmp_path / "run", tmp_path / "go"
    first = child.start([*TRAIN, "--run-dir", run], HOLD_WRITE="2", HOLD_UNTIL=str(go))
    try:
        child.wait_for(first, "WRITING 2")  # it holds the folder, its checkpoint of step 0 is in place
        for extra in ([], ["--resume"], ["--seed", 3]):
            code, _, err = cli_runner.run([*TRAIN, "--run-dir", run, *extra], capsys)
            assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
            assert f"{run} is in use by process {first.pid} on this machine" in err, err
            assert "train maml" in err and "choose another --run-dir" in err, err
        # readers do not wait for the writer
        code, out, err = cli_runner.run(["eval", run, "--episodes", 4, "--no-progress"], capsys)
        assert code == 0 and "MSE" in out, err
        go.touch()
        code, _, err = child.finish(first)
        assert code == 0, err
    finally:
        if first.poll() is None:
            child.kill(first)
    # the first run is what it would have been alone: every step once, the weights of a run
    # trained with no one else about
    alone = tmp_path / "alone"
    main([*map(str, TRAIN), "--run-dir", str(alone)])
    assert [r["step"] for r in RunDir(run).read_metrics()] == [1, 2, 3, 4]
    state, expected = RunDir(run).read_checkpoint(), RunDir(alone).read_checkpoint()
    assert state["step"] == 4 and state["config"] == expected["config"]
    for name, value in expected["learner"].items():
        assert value.equal(state["learner"][name]), name
    assert not (run / ".lock").exists()


def test_a_file_system_without_locks_is_used_unlocked_with_one_warning(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run = tmp_path / "run"
    code, _, err = cli_runner.run([*TRAIN, "--steps", 1, "--run-dir", run], capsys)
    assert code == 0
    assert err == (f"warning: the file system of {run} refuses file locks (No locks available): nothing keeps a "
                   "second process from writing there at the same time\n")
    assert RunDir(run).read_checkpoint()["step"] == 1 and not (run / ".lock").exists()


def test_a_run_whose_folder_is_deleted_and_taken_by_another_stops_without_writing_there(tmp_path, monkeypatch):
    """`rm -rf run` while a process trains it, then a new run in a folder of the same name: the
    old process must not put its metrics or checkpoint into the new run's folder (writes go by
    path), nor delete the new holder's lock file as it lets go."""
    import shutil

    from metalearn.algorithms.maml import MAML
    from metalearn.api import resolve_config
    from metalearn.errors import MetalearnError
    from metalearn.training import build_trainer

    config = resolve_config("maml", task={"dataset": "sinusoid", "shots": 5},
                            train={"steps": 4, "meta_batch_size": 2, "log_every": 1, "val_every": 0,
                                   "checkpoint_every": 1})
    folder = tmp_path / "run"
    trainer = build_trainer(config, folder)
    taken = []
    real_end_step = MAML.end_step

    def end_step(self, world):  # during step 2: the folder goes, and another run takes its name
        real_end_step(self, world)
        if trainer.step == 1 and not taken:
            shutil.rmtree(folder)
            taken.append(RunDir(folder).lock())
            (folder / "theirs.txt").write_text("the new run's file")

    monkeypatch.setattr(MAML, "end_step", end_step)
    with pytest.raises(MetalearnError, match=rf"the run folder {folder} was deleted, moved or replaced while this "
                                             r"process trained it \(at step 2\); stopping without writing"):
        trainer.fit(progress=False)
    assert sorted(p.name for p in folder.iterdir()) == [".lock", "theirs.txt"]  # nothing of the old run
    assert taken[0].still_ours() and taken[0].held  # the new holder's lock file is intact
    taken[0].release()
    assert not (folder / ".lock").exists()


def test_a_run_folder_deleted_just_before_a_write_is_named_as_deleted(tmp_path, monkeypatch):
    """`rm -rf run` after the trainer's look at its folder and before the write: the write fails
    (no such folder) and the message is the same as where the look saw it, not the write's."""
    import shutil

    from metalearn.api import resolve_config
    from metalearn.errors import MetalearnError
    from metalearn.training import build_trainer

    config = resolve_config("maml", task={"dataset": "sinusoid", "shots": 5},
                            train={"steps": 4, "meta_batch_size": 2, "log_every": 1, "val_every": 0,
                                   "checkpoint_every": 1})
    folder = tmp_path / "run"
    trainer = build_trainer(config, folder)
    real_append = RunDir.append_metrics

    def append_metrics(self, record):  # the folder goes between the look and the write
        if record["step"] == 2:
            shutil.rmtree(folder)
        real_append(self, record)

    monkeypatch.setattr(RunDir, "append_metrics", append_metrics)
    with pytest.raises(MetalearnError, match=rf"^the run folder {folder} was deleted, moved or replaced while this "
                                             r"process trained it \(at step 2\); stopping without writing"):
        trainer.fit(progress=False)
    assert not folder.exists()


def test_release_removes_the_folders_the_lock_made_while_they_are_empty(tmp_path):
    """A run refused before it wrote anything leaves no folders behind, its parents included;
    a folder that was there before, or that got a file meanwhile, stays (and stops the walk)."""
    (tmp_path / "runs").mkdir()
    lock = FolderLock.take(tmp_path / "runs" / "a" / "b" / "run" / ".lock", "test")
    lock.release()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["runs"]
    lock = FolderLock.take(tmp_path / "runs" / "a" / "b" / "run" / ".lock", "test")
    (tmp_path / "runs" / "a" / "notes.txt").write_text("kept")
    lock.release()
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["runs", "runs/a", "runs/a/notes.txt"]


@pytest.mark.parametrize("kind", ["link", "link to nowhere", "folder", "fifo"])
def test_a_lock_path_that_is_no_plain_file_is_refused_in_one_line_and_left_as_it_is(tmp_path, capsys, kind):
    """The holder writes its note into .lock and deletes it as it lets go: through a link that
    would overwrite (then delete) the file linked to, outside the run. Anything but a plain file
    there is refused before anything is written, and status reads it without blocking."""
    from metalearn.locking import lock_is_held, read_holder_note

    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("important\n")
    lock_path = run / ".lock"
    make = {"link": lambda: lock_path.symlink_to(victim), "link to nowhere": lambda: lock_path.symlink_to(tmp_path / "no"),
            "folder": lock_path.mkdir, "fifo": lambda: os.mkfifo(lock_path)}
    make[kind]()
    said = {"link": "a symbolic link", "link to nowhere": "a symbolic link", "folder": "a folder", "fifo": "a FIFO"}[kind]
    code, _, err = cli_runner.run([*TRAIN, "--run-dir", run], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (f"error: {lock_path} is {said}, not the lock file metalearn keeps there (a plain file it writes "
                   f"while a process holds {run}): move it away or delete it, then try again\n")
    assert victim.read_text() == "important\n" and not (tmp_path / "no").exists()
    assert os.path.lexists(lock_path) and sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing written
    assert lock_is_held(lock_path) is False and read_holder_note(lock_path) is None  # no wait on the FIFO


def test_a_run_folder_that_is_a_broken_link_says_so(tmp_path, capsys):
    """A link to nowhere fails every time it is opened: named as such, at once, not as the
    lock file missing; its target is not created."""
    run = tmp_path / "run"
    run.symlink_to(tmp_path / "nowhere")
    code, _, err = cli_runner.run([*TRAIN, "--run-dir", run], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err == (f"error: {run} is a broken link (to {tmp_path / 'nowhere'}, which does not exist): create "
                   f"{tmp_path / 'nowhere'} or remove the link, or give another folder than {run}\n")
    assert not (tmp_path / "nowhere").exists() and run.is_symlink()
    below = RunDir(run / "sub")  # a folder below the broken link: the link is named
    with pytest.raises(MetalearnError, match=rf"^{run} is a broken link"):
        below.lock()
    (tmp_path / "nowhere").mkdir()  # once its target is there, the link is a run folder like another
    with RunDir(run).lock() as lock:
        assert lock.held and (tmp_path / "nowhere" / ".lock").is_file()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this system")
def test_a_forked_child_holds_none_of_its_parents_locks(tmp_path):
    """A forked child closes the lock files it inherited: once the parent is gone (a SIGKILL to
    it alone), a child that lives on holds no run folder; while the parent lives its lock holds,
    and the child's lock objects hold nothing (its exit deletes no lock file)."""
    import contextlib
    import signal
    import subprocess
    import sys
    import textwrap
    import time

    from metalearn.locking import lock_is_held

    folder, seen = tmp_path / "run", tmp_path / "child-sees"
    parent = textwrap.dedent(f"""
        import os, pathlib, time
        from metalearn.runs import RunDir
        lock = RunDir({str(folder)!r}).lock()
        child = os.fork()
        if child == 0:
            pathlib.Path({str(seen)!r}).write_text(str(lock.held))
            time.sleep(60)
            os._exit(0)
        print(child, flush=True)
        time.sleep(60)
    """)
    process = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        child_pid = int(process.stdout.readline())
        deadline = time.monotonic() + 30
        while not (seen.exists() and seen.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen.read_text() == "False"
        assert lock_is_held(folder / ".lock")  # the parent's lock holds while the child lives too
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        os.kill(child_pid, 0)  # the child lives on, alone
        assert lock_is_held(folder / ".lock") is False
        with RunDir(folder).lock():
            pass
    finally:
        process.kill()
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, signal.SIGKILL)
