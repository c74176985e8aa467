"""SIGKILL at any moment, also in the middle of a checkpoint write, then --resume: the same
weights, optimiser state, random state and metrics as a run never interrupted. Real training
processes, killed for real (scripts/kill-resume.py kills more, at random moments)."""

from __future__ import annotations

from pathlib import Path

import pytest

import training_process as child
from metalearn.cli import main
from metalearn.runs import RunDir

TRAIN = ["train", "maml", "--dataset", "sinusoid", "--steps", 6, "--meta-batch-size", 2, "--checkpoint-every", 1,
         "--log-every", 1, "--val-every", 3, "--val-episodes", 4, "--no-progress", "--no-eval"]


@pytest.fixture
def uninterrupted(tmp_path, one_thread) -> Path:
    """The run never interrupted, trained in this process (one thread, as the children)."""
    path = tmp_path / "uninterrupted"
    main([*map(str, TRAIN), "--run-dir", str(path)])
    return path


def checkpoint_step(run: Path) -> int:
    return int(RunDir(run).read_checkpoint("step")["step"])


def test_killed_in_and_between_checkpoint_writes_resumes_bit_identically(uninterrupted, tmp_path):
    run = tmp_path / "run"
    # killed inside the very first checkpoint write: config.json is there, no checkpoint yet,
    # a half-written temporary file and the lock file of the dead process are left behind
    process = child.start([*TRAIN, "--run-dir", run], HOLD_WRITE="1")
    child.wait_for(process, "WRITING 1")
    child.kill(process)
    assert RunDir(run).never_started()
    assert [p.name for p in run.glob("checkpoint.pt.tmp*")] == [f"checkpoint.pt.tmp{process.pid}"]
    assert (run / ".lock").is_file()
    # the run never started: --resume starts it (as would a plain start); killed inside the
    # write of its fourth checkpoint (step 3), the checkpoint of step 2 stays
    process = child.start([*TRAIN, "--run-dir", run, "--resume"], HOLD_WRITE="4")
    child.wait_for(process, "WRITING 4")
    child.kill(process)
    assert checkpoint_step(run) == 2
    # killed just after a checkpoint is in place, somewhere in the next step
    process = child.start([*TRAIN, "--run-dir", run, "--resume"])
    child.wait_for(process, "SAVED 2")
    child.kill(process)
    assert checkpoint_step(run) >= 4
    code, _, err = child.finish(child.start([*TRAIN, "--run-dir", run, "--resume"]))
    assert code == 0, err
    child.assert_same_state(uninterrupted, run)
    # the killed writers' temporary files and lock file are gone
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
